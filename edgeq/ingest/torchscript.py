"""TorchScript policies (``policy.pt`` as legged_gym, rsl_rl, Unitree and Isaac Lab export them) → ONNX.

.. warning::
   A TorchScript file is **code**: ``torch.jit.load`` restores its modules and edgeq then calls
   their ``forward`` (to check the translation). Load only files you trust, as you would run a
   Python script from the same source. edgeq refuses plain ``torch.save`` checkpoints (pickles)
   without opening them.

What is read
------------
The module tree, not its code: edgeq recognizes the layouts those exporters write and rebuilds the
same computation from the weights, then **checks** it against the TorchScript module step by step
(:func:`verify_against_torchscript`, 1000 steps by default, max abs difference <= 1e-5); a module
whose code does something else fails that check with a clear error instead of being translated
silently wrong.

* feed-forward: an ``nn.Sequential`` of ``Linear`` and activations (legged_gym's
  ``torch.jit.script(actor)``), or a module with an ``actor``/``student`` Sequential and an optional
  ``normalizer`` (Isaac Lab's exporter);
* recurrent: a module with one ``nn.LSTM``/``nn.GRU`` child (``memory`` in legged_gym / rsl_rl's
  ``PolicyExporterLSTM``, ``rnn`` in Isaac Lab), ``hidden_state`` (and for LSTM ``cell_state``)
  buffers ``[num_layers, 1, hidden]`` that ``forward`` updates in place, a ``reset_memory()`` /
  ``reset()`` method, and an MLP head. The computation is
  ``normalizer → rnn → actor`` for one time step.

The recurrent state kept inside the module becomes explicit graph state: ``h_in``/``c_in`` →
``h_out``/``c_out`` (:mod:`edgeq.graph.recurrent`), zeroed at episode starts as ``reset_memory()``
does. Normalizers with ``_mean``/``_std`` buffers and an ``eps`` attribute (rsl_rl's
``EmpiricalNormalization``: ``(x - mean) / (std + eps)``) become an fp32 pre-op.

Observation and action spaces are not stored in TorchScript files: the policy gets unbounded boxes
of the right sizes, and :func:`edgeq.quantize` adopts the environment's spaces (actions are not
clipped by the graph, as they are not by the TorchScript module: the robot or the env clips them).
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.graph.builder import TORCH_ACTIVATIONS
from edgeq.graph.layers import Activation, Layer, Linear, Normalize, layers_to_onnx
from edgeq.graph.recurrent import RecurrentCell, recurrent_policy_to_onnx
from edgeq.policy import FloatPolicy, PolicySource
from edgeq.spaces import BoxSpec

#: Suffixes dispatched to this loader.
TORCHSCRIPT_SUFFIXES = (".pt", ".jit", ".pth", ".ts")
#: Default number of single steps checked against the TorchScript module at load time.
VERIFY_STEPS = 1000
VERIFY_ATOL = 1e-5
_MLP_NAMES = ("actor", "student", "policy", "mlp")
_RNN_KINDS = {"LSTM": "lstm", "GRU": "gru"}
_SKIPPED = ("Identity", "Dropout", "Flatten")


def is_torchscript_archive(path: str | Path) -> bool:
    """True when ``path`` is a TorchScript zip (it holds ``code/`` and ``constants.pkl`` entries).

    A ``torch.save`` checkpoint is also a zip but has no ``code/``; neither is opened beyond its
    list of entries.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kind(module: Any) -> str:
    return str(getattr(module, "original_name", type(module).__name__))


def _array(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _mlp_layers(module: Any, name: str, path: Path) -> list[Layer]:
    """An ``nn.Sequential`` (possibly nested) of Linear and activation modules as layers."""
    kind = _kind(module)
    if kind == "Linear":
        sd = dict(module.state_dict())
        return [Linear(name, _array(sd["weight"]), _array(sd["bias"]) if "bias" in sd else None)]
    if kind in TORCH_ACTIVATIONS:
        act = TORCH_ACTIVATIONS[kind]
        alpha = None
        if act == "elu":
            alpha = float(getattr(module, "alpha", 1.0))
        elif act == "leaky_relu":
            alpha = float(getattr(module, "negative_slope", 0.01))
        return [] if act == "identity" else [Activation(act, alpha)]
    if kind in _SKIPPED:
        return []
    children = list(module.named_children())
    own_params = list(module.named_parameters(recurse=False))
    if kind == "Sequential" or (children and not own_params):  # nn.Sequential or a subclass (rsl_rl's MLP)
        layers: list[Layer] = []
        for child_name, child in children:
            layers += _mlp_layers(child, f"{name}.{child_name}", path)
        return layers
    raise PolicyFormatError(f"{path}: module {name!r} is a {kind}; edgeq reads Sequential MLPs of Linear and "
                            f"{', '.join(sorted(TORCH_ACTIVATIONS))} layers")


def _normalizer(module: Any, name: str, path: Path) -> Normalize | None:
    buffers = dict(module.named_buffers())
    if "_mean" not in buffers or "_std" not in buffers:
        if _kind(module) in _SKIPPED:
            return None
        raise PolicyFormatError(f"{path}: normalizer {name!r} ({_kind(module)}) has no _mean/_std buffers; "
                                "expected rsl_rl's EmpiricalNormalization or Identity")
    eps = float(getattr(module, "eps", 0.0))
    mean = _array(buffers["_mean"]).reshape(-1)
    std = _array(buffers["_std"]).reshape(-1)
    # forward: (x - mean) / (std + eps), the sum taken in float32 as torch does
    return Normalize(name, mean, (std + np.float32(eps)).astype(np.float32), None)


def _rnn_cell(module: Any, name: str, path: Path) -> RecurrentCell:
    kind = _RNN_KINDS[_kind(module)]
    if bool(getattr(module, "bidirectional", False)) or int(getattr(module, "proj_size", 0) or 0):
        raise PolicyFormatError(f"{path}: {name} is bidirectional or has proj_size; edgeq supports "
                                "unidirectional LSTM/GRU without projections")
    sd = {f"{name}.{k}": _array(v) for k, v in module.state_dict().items()}
    return RecurrentCell.from_state_dict(kind, sd, name, source=str(path))


class TorchScriptStructure:
    """The parts of a TorchScript policy module: optional normalizer, optional RNN, MLP head."""

    def __init__(self, module: Any, path: Path) -> None:
        self.module, self.path = module, path
        children = dict(module.named_children())
        self.normalizer: Normalize | None = None
        self.cell: RecurrentCell | None = None
        self.mlp: list[Layer] = []
        self.parts: dict[str, str] = {}
        top = _kind(module)
        if top == "Sequential" or not children and top == "Linear":
            self.mlp = _mlp_layers(module, "actor", path)
            self.parts["actor"] = top
            return
        rnns = {n: c for n, c in children.items() if _kind(c) in _RNN_KINDS}
        if len(rnns) > 1:
            raise PolicyFormatError(f"{path}: module has {len(rnns)} recurrent children ({sorted(rnns)}); "
                                    "expected one LSTM/GRU")
        for n, c in rnns.items():
            self.cell = _rnn_cell(c, n, path)
            self.parts[n] = _kind(c)
        mlps = [n for n in _MLP_NAMES if n in children] or [
            n for n, c in children.items() if _kind(c) in ("Sequential", "MLP") and n not in rnns]
        if len(mlps) != 1 and not (mlps and mlps[0] in _MLP_NAMES):
            raise PolicyFormatError(f"{path}: cannot tell the policy MLP among children {sorted(children)}; "
                                    "expected an 'actor' (or 'student') Sequential")
        self.mlp = _mlp_layers(children[mlps[0]], mlps[0], path)
        self.parts[mlps[0]] = _kind(children[mlps[0]])
        for n, c in children.items():
            if n in self.parts:
                continue
            if "normalizer" in n or "_mean" in dict(c.named_buffers()):
                self.normalizer = _normalizer(c, n, path)
                self.parts[n] = _kind(c)
            elif _kind(c) not in _SKIPPED:
                raise PolicyFormatError(f"{path}: child module {n!r} ({_kind(c)}) is not a normalizer, an "
                                        "LSTM/GRU or the MLP head; edgeq cannot place it in the computation")
        if not any(isinstance(layer, Linear) for layer in self.mlp):
            raise PolicyFormatError(f"{path}: the policy MLP {mlps[0]!r} has no Linear layer")
        if self.cell is not None:
            self._check_state_buffers()

    def _check_state_buffers(self) -> None:
        assert self.cell is not None
        buffers = dict(self.module.named_buffers(recurse=False))
        names = ["hidden_state"] + (["cell_state"] if self.cell.kind == "lstm" else [])
        want = (self.cell.num_layers, 1, self.cell.hidden_size)
        for n in names:
            if n not in buffers:
                raise PolicyFormatError(f"{self.path}: recurrent module without a {n!r} buffer; edgeq reads modules "
                                        "that keep their state in hidden_state/cell_state buffers (rsl_rl's "
                                        "PolicyExporterLSTM, Isaac Lab's exporter)")
            if tuple(buffers[n].shape) != want:
                raise PolicyFormatError(f"{self.path}: buffer {n} has shape {tuple(buffers[n].shape)}, expected "
                                        f"{want} for this {self.cell.kind.upper()}")

    @property
    def obs_dim(self) -> int:
        if self.normalizer is not None:
            return int(self.normalizer.mean.size)
        if self.cell is not None:
            return self.cell.input_size
        first = next(layer for layer in self.mlp if isinstance(layer, Linear))
        return int(first.weight.shape[1])

    @property
    def act_dim(self) -> int:
        last = [layer for layer in self.mlp if isinstance(layer, Linear)][-1]
        return int(last.weight.shape[0])


def reset_torchscript_state(module: Any) -> None:
    """Zero a TorchScript policy's recurrent state with its own ``reset_memory()``/``reset()``."""
    import torch

    for method in ("reset_memory", "reset"):
        fn = getattr(module, method, None)
        if callable(fn):
            fn()
            return
    with torch.no_grad():
        for name in ("hidden_state", "cell_state"):
            buf = getattr(module, name, None)
            if buf is not None:
                buf.zero_()


def verify_against_torchscript(module: Any, policy: FloatPolicy, *, steps: int = VERIFY_STEPS, seed: int = 0,
                               atol: float = VERIFY_ATOL, observations: np.ndarray | None = None,
                               reset_at: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Step the TorchScript module and the ONNX graph side by side; return the largest differences.

    Each of ``steps`` single observations (``observations`` [steps, obs_dim], or N(0, 1) draws
    from ``seed``) goes through both, carrying state; both are reset at the start and at
    ``reset_at`` steps (default: halfway). Raises :class:`PolicyFormatError` if an action differs
    by more than ``atol + atol * |action|``.
    """
    import onnxruntime as ort
    import torch

    obs_dim = policy.obs_space.size
    if observations is None:
        observations = np.random.default_rng(seed).normal(size=(steps, obs_dim)).astype(np.float32)
    obs = np.asarray(observations, np.float32).reshape(-1, obs_dim)
    resets = set(reset_at if reset_at is not None else (len(obs) // 2,))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(policy.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    zeros = {s.input_name: np.zeros((1, *s.shape), np.float32) for s in policy.state}
    state = dict(zeros)
    fetch = [policy.output_name, *(s.output_name for s in policy.state)]
    reset_torchscript_state(module)
    max_diff = max_state_diff = 0.0
    worst_step = -1
    with torch.no_grad():
        for t, o in enumerate(obs):
            if t in resets:
                reset_torchscript_state(module)
                state = dict(zeros)
            theirs = module(torch.from_numpy(o[None].copy())).detach().cpu().numpy().reshape(1, -1)
            values = sess.run(fetch, {policy.input_name: o[None], **state})
            ours = values[0]
            state = {s.input_name: v for s, v in zip(policy.state, values[1:], strict=True)}
            if ours.shape != theirs.shape:
                raise PolicyFormatError(f"{policy.source.path}: the TorchScript module returns shape "
                                        f"{theirs.shape} for one observation, the translation {ours.shape}")
            d = np.abs(ours.astype(np.float64) - theirs)
            max_diff = max(max_diff, float(d.max()))
            if worst_step < 0 and float((d - atol * (1.0 + np.abs(theirs))).max()) > 0:
                worst_step = t
            for s, buffer in zip(policy.state, ("hidden_state", "cell_state")[: len(policy.state)], strict=True):
                ref = getattr(module, buffer).detach().cpu().numpy()  # [L, 1, H]
                max_state_diff = max(max_state_diff, float(np.abs(state[s.input_name][0] - ref[:, 0, :]).max()))
    reset_torchscript_state(module)
    report = {"steps": len(obs), "max_abs_action_diff": max_diff, "max_abs_state_diff": max_state_diff,
              "atol": atol, "resets_at": sorted(resets)}
    if worst_step >= 0:
        raise PolicyFormatError(
            f"{policy.source.path}: the ONNX translation differs from the TorchScript module by {max_diff:.3g} "
            f"(first beyond {atol:g} at step {worst_step}); the module's forward() does something edgeq's "
            "reading of its layout does not (expected normalizer → LSTM/GRU → MLP as rsl_rl/Isaac Lab export)")
    return report


def load_torchscript_module(path: str | Path) -> Any:
    """``torch.jit.load`` a trusted TorchScript file (in eval mode), refusing anything else with one line."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise PolicyFormatError(f"{p}: no such file (expected a TorchScript policy.pt)")
    if not is_torchscript_archive(p):
        kind = "a torch.save checkpoint (a pickle, which edgeq does not open)" if zipfile.is_zipfile(p) else \
            "not a TorchScript archive"
        raise PolicyFormatError(f"{p}: {kind}; expected a TorchScript module saved with "
                                "torch.jit.script(module).save(path), as legged_gym/rsl_rl/Isaac Lab export policy.pt")
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; policy.pt files still are it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise PolicyFormatError(f"{p}: torch.jit.load failed: {str(exc).splitlines()[0]}") from None
    module.eval()
    return module


def load_torchscript(path: str | Path | Sequence[str | Path], *, verify_steps: int = VERIFY_STEPS, seed: int = 0,
                     history: int | None = None, obs_dim: int | None = None) -> FloatPolicy:
    """Load a trusted TorchScript policy file as a float ONNX policy and check it step by step.

    A module in legged_gym/rsl_rl's layout (normalizer → LSTM/GRU → ``Sequential`` MLP) is read
    layer by layer; with ``history=K`` its flat input holds ``K`` stacked observations (a frame-stacked
    MLP exported flat). Any other module (its own ``forward()``: a Transformer over past
    observations, an MLP that flattens a ``[batch, K, obs_dim]`` history), and two files (an
    encoder and a body), go through :func:`edgeq.ingest.torchscript_graph.load_torchscript_graph`,
    which needs the env's observation size ``obs_dim``.

    TorchScript is code: only pass files you trust (see the module docstring).
    """
    from edgeq.ingest.torchscript_graph import load_torchscript_graph

    paths = [Path(path)] if isinstance(path, str | Path) else [Path(q) for q in path]
    modules = [load_torchscript_module(q) for q in paths]
    if len(paths) != 1:
        return load_torchscript_graph(paths, modules, obs_dim=obs_dim, history=history, seed=seed)
    p, module = paths[0], modules[0]
    try:
        structure = TorchScriptStructure(module, p)
    except PolicyFormatError as exc:
        if obs_dim is None:
            raise PolicyFormatError(f"{exc}; a module with its own forward() (a Transformer, a history encoder) "
                                    "is exported through torch.onnx: give the env (--env) for its input size") from None
        return load_torchscript_graph(paths, modules, obs_dim=obs_dim, history=history, seed=seed)
    if structure.cell is None and obs_dim is not None and structure.obs_dim != obs_dim and history is None:
        stack = (f"; if it stacks {structure.obs_dim // obs_dim} observations, give --history "
                 f"{structure.obs_dim // obs_dim}" if structure.obs_dim % obs_dim == 0 else "")
        raise PolicyFormatError(f"{p}: the module reads {structure.obs_dim} features, the env's observation has "
                                f"{obs_dim}{stack}")
    return _load_structured(p, module, structure, verify_steps=verify_steps, seed=seed, history=history)


def _load_structured(p: Path, module: Any, structure: TorchScriptStructure, *, verify_steps: int, seed: int,
                     history: int | None) -> FloatPolicy:
    obs_dim, act_dim = structure.obs_dim, structure.act_dim
    pre: list[Layer] = [structure.normalizer] if structure.normalizer is not None else []
    meta = {"edgeq.source": p.name, "edgeq.algorithm": "TorchScript"}
    details: dict[str, Any] = {"modules": structure.parts,
                               "net_arch": [int(layer.weight.shape[0]) for layer in structure.mlp
                                            if isinstance(layer, Linear)][:-1],
                               "activations": sorted({layer.kind for layer in structure.mlp
                                                      if isinstance(layer, Activation)})}
    if structure.cell is not None:
        graph = recurrent_policy_to_onnx(pre, structure.cell, structure.mlp, obs_dim, act_dim, "torchscript_actor",
                                         metadata=meta)
        model, state, gate_nodes = graph.model, graph.state, tuple(graph.gate_nodes)
        details["recurrent"] = {**structure.cell.describe(), "gate_nodes": graph.gate_nodes,
                                "state_buffers": ["hidden_state"] + (["cell_state"] if state[1:] else [])}
    else:
        model, state = layers_to_onnx(pre + structure.mlp, obs_dim, act_dim, "torchscript_actor", metadata=meta), ()
        gate_nodes = ()
    unbounded = lambda n: BoxSpec((n,), (-np.inf,) * n, (np.inf,) * n)  # noqa: E731
    source = PolicySource(path=str(p), sha256=_sha256(p), kind="torchscript", algorithm="TorchScript",
                          details=details)
    policy = FloatPolicy(model=model, obs_space=unbounded(obs_dim), action_space=unbounded(act_dim), source=source,
                         state=state, gate_nodes=gate_nodes,
                         preprocess={"normalize": {"source": "module", "kind": "(x - mean) / (std + eps)"}}
                         if structure.normalizer is not None else {},
                         postprocess={"clip": None})
    if verify_steps > 0:
        details["verification"] = verify_against_torchscript(module, policy, steps=verify_steps, seed=seed)
    if history is not None:
        if structure.cell is not None or obs_dim % history:
            raise PolicyFormatError(f"{p}: --history {history} does not apply: the module "
                                    f"{'is recurrent' if structure.cell is not None else f'reads {obs_dim} features'}")
        from edgeq.policy import HistorySpec

        d = obs_dim // history
        policy = replace(policy, obs_space=unbounded(d), history=HistorySpec(int(history), d))
    return policy
