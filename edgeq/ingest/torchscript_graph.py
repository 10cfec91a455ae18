"""TorchScript policies with their own ``forward()``: history MLPs, Transformers, encoder + body pairs.

:mod:`edgeq.ingest.torchscript` reads the layout legged_gym/rsl_rl export (normalizer → LSTM/GRU →
``Sequential`` MLP) layer by layer. A module whose ``forward()`` is its own code (a frame-stacked
MLP that flattens inside, a causal Transformer over past observations, a Conv1d history encoder,
an RMA-style body taking ``(obs, latent)``) is instead exported through ``torch.onnx.export`` (the
TorchScript exporter, opset 17, dynamic batch) and then ingested exactly like the ONNX file it
becomes (:func:`edgeq.ingest.onnx_policy.load_onnx_policy`'s normalization and history rewrite).

A TorchScript file does not record its input shapes, so they are found by running the module on
candidate inputs: the observation size comes from the env (``obs_dim``), each ``forward``
argument is an observation ``[batch, obs_dim]``, a history ``[batch, K, obs_dim]`` (or, with
``history=K`` given, a flat ``[batch, K * obs_dim]``) or, for a body, the encoder's latent; the
history length ``K`` is the one the module runs with, unless ``history`` names it: first among the
lengths its own parameter and buffer shapes suggest (a dimension ``n``, or ``n / obs_dim``; a failing
call costs ~0.1 s), then 2..64. Argument
names break ties (``*hist*`` → history, ``obs*`` → observation, anything else → latent). A module
that runs with several layouts or lengths is refused with the option that decides it.

The translation is then checked against the TorchScript module on random windows (largest
difference recorded in ``details.verification``; beyond ``atol + atol * |action|`` it is refused).
TorchScript is code: pass only files you trust.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.policy import FloatPolicy, PolicySource

#: History lengths tried when ``history`` is not given.
HISTORY_PROBE = range(2, 65)
VERIFY_WINDOWS = 256
VERIFY_ATOL = 1e-5
OPSET = 17

#: One forward argument: its role and its shape without the batch axis.
Arg = tuple[str, tuple[int, ...]]


def _arg_names(module: Any) -> list[str]:
    return [a.name for a in module.forward.schema.arguments][1:]


def _output(module: Any, args: Sequence[tuple[int, ...]], *, batch: int = 2) -> tuple[int, ...] | None:
    """The output shape of ``module`` on N(0, 1) inputs of these shapes, or None if it fails."""
    import torch

    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            y = module(*(torch.randn((batch, *s), generator=gen) for s in args))
    except Exception:  # noqa: BLE001 - a shape mismatch raises whatever the module's code raises
        return None
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != batch or not torch.isfinite(y).all():
        return None
    return tuple(int(s) for s in y.shape[1:])


def _score(names: Sequence[str], roles: Sequence[str]) -> int:
    score = 0
    for n, r in zip(names, roles, strict=True):
        n = n.lower()
        if r == "history":
            score += 3 if "hist" in n else 1  # a 3-D history before a flat one
        elif r == "flat_history":
            score += 2 if "hist" in n else 0
        elif r == "obs":
            score += 2 if "obs" in n and "hist" not in n else 0
        elif r == "latent":
            score += 2 if "obs" not in n and "hist" not in n else 0
    return score


def _suggested_lengths(module: Any, obs_dim: int) -> list[int]:
    """History lengths the module's parameter and buffer shapes suggest (a dimension n, or n / obs_dim)."""
    dims = {int(n) for t in (*module.parameters(), *module.buffers()) for n in t.shape}
    out = {n for n in dims if n in HISTORY_PROBE} | {n // obs_dim for n in dims if n % obs_dim == 0
                                                      and n // obs_dim in HISTORY_PROBE}
    return sorted(out)


def _probe(module: Any, names: Sequence[str], obs_dim: int, lengths: Sequence[int | None], history: int | None,
           latent: int | None, found: dict[tuple[Arg, ...], tuple[int, ...]]) -> None:
    """Run ``module`` on each layout with these history lengths (None: no history); record those that work."""
    for k in lengths:
        roles: list[list[Arg]] = []
        for _ in names:
            opts: list[Arg] = [("obs", (obs_dim,))]
            if k is not None:
                opts.append(("history", (k, obs_dim)))
                if history:
                    opts.append(("flat_history", (k * obs_dim,)))
            if latent is not None:
                opts.append(("latent", (latent,)))
            roles.append(opts)
        for combo in itertools.product(*roles):
            kinds = [r for r, _ in combo]
            n_hist = sum(r.endswith("history") for r in kinds)
            if (k is not None) != (n_hist == 1) or n_hist > 1 or kinds.count("obs") > 1:
                continue
            if latent is not None and kinds.count("latent") != 1:
                continue
            out = _output(module, [s for _, s in combo])
            if out is not None:
                found[combo] = out


def find_layout(module: Any, path: Path, obs_dim: int, *, history: int | None = None,
                latent: int | None = None) -> tuple[list[Arg], tuple[int, ...]]:
    """The role and shape of each ``forward`` argument, and the output shape (module docstring)."""
    names = _arg_names(module)
    if not names:
        raise PolicyFormatError(f"{path}: forward() takes no tensor argument")
    found: dict[tuple[Arg, ...], tuple[int, ...]] = {}
    if history:
        lengths = [history]
        _probe(module, names, obs_dim, [history, None], history, latent, found)
    else:  # a failing call costs ~0.1 s: first the lengths the module's own tensors suggest
        suggested = _suggested_lengths(module, obs_dim)
        _probe(module, names, obs_dim, [*suggested, None], history, latent, found)
        lengths = list(HISTORY_PROBE)
        if not any(r.endswith("history") for c in found for r, _ in c):
            _probe(module, names, obs_dim, [k for k in lengths if k not in suggested], history, latent, found)
    if not found:
        need = "--history K (the number of stacked observations)" if history is None else "a different --history"
        raise PolicyFormatError(f"{path}: forward({', '.join(names)}) runs on none of the inputs edgeq tries "
                                f"(observation [batch, {obs_dim}], history [batch, K, {obs_dim}] for K in "
                                f"{lengths[0]}..{lengths[-1]}{', latent' if latent else ''}); check --env, or give "
                                f"{need}")
    hist_lengths = sorted({s[0] for c in found for r, s in c if r == "history"} |
                          {s[0] // obs_dim for c in found for r, s in c if r == "flat_history"})
    if len(hist_lengths) > 1:
        raise PolicyFormatError(f"{path}: forward({', '.join(names)}) runs with history lengths {hist_lengths}; "
                                "give --history K")
    if hist_lengths:  # a history policy: drop the plain-observation layouts
        found = {c: o for c, o in found.items() if any(r.endswith("history") for r, _ in c)} or found
    best = max(_score(names, [r for r, _ in c]) for c in found)
    top = [c for c in found if _score(names, [r for r, _ in c]) == best]
    if len(top) > 1:
        raise PolicyFormatError(f"{path}: cannot tell which argument of forward({', '.join(names)}) is which: it "
                                f"runs as {[[r for r, _ in c] for c in top]}; name the history argument *hist*, the "
                                "observation obs and the encoder's output anything else")
    return list(top[0]), found[top[0]]


def _export(module: Any, layout: Sequence[Arg], names: Sequence[str], output: str) -> Any:
    import onnx
    import torch

    args = tuple(torch.zeros((1, *s)) for _, s in layout)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, input_names=list(names), output_names=[output],  # type: ignore[arg-type]
                          dynamic_axes={n: {0: "batch"} for n in [*names, output]}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    return onnx.load_model_from_string(buf.getvalue())


def _feed(layout: Sequence[Arg], window: np.ndarray, k: int, d: int, latent: Any = None) -> list[Any]:
    import torch

    w = torch.from_numpy(window)
    args: list[Any] = []
    for role, _ in layout:
        if role == "history":
            args.append(w.reshape(-1, k, d))
        elif role == "flat_history":
            args.append(w)
        elif role == "obs":
            args.append(w[:, -d:].contiguous())
        else:
            args.append(latent)
    return args


def load_torchscript_graph(paths: Sequence[Path], modules: Sequence[Any], *, obs_dim: int | None,
                           history: int | None = None, seed: int = 0, atol: float = VERIFY_ATOL) -> FloatPolicy:
    """One TorchScript policy, or an encoder and a body, as a float ONNX policy (module docstring)."""
    import onnxruntime as ort
    import torch

    from edgeq.ingest.history import compose_modules
    from edgeq.ingest.onnx_policy import _finish

    origin = " + ".join(str(p) for p in paths)
    if obs_dim is None:
        raise PolicyFormatError(f"{origin}: a TorchScript module with its own forward() is exported through "
                                "torch.onnx, which needs its input shape: give the env (--env; its observation "
                                "size) or obs_dim")
    if len(modules) == 1:
        layout, out = find_layout(modules[0], paths[0], obs_dim, history=history)
        names = _arg_names(modules[0])
        model = _export(modules[0], layout, names, "actions")
        layouts = [layout]
    elif len(modules) == 2:
        enc_layout, latent = find_layout(modules[0], paths[0], obs_dim, history=history)
        k = next((s[0] for r, s in enc_layout if r == "history"), None) or history
        if k is None:
            raise PolicyFormatError(f"{paths[0]}: the encoder reads no observation history ([batch, K, {obs_dim}])")
        body_layout, out = find_layout(modules[1], paths[1], obs_dim, history=k, latent=int(np.prod(latent)))
        body_names = _arg_names(modules[1])
        latent_name = next(n for n, (r, _) in zip(body_names, body_layout, strict=True) if r == "latent")
        enc = _export(modules[0], enc_layout, _arg_names(modules[0]), latent_name)
        body = _export(modules[1], body_layout, body_names, "actions")
        model = compose_modules(enc, body, origin=origin)
        layouts = [enc_layout, body_layout]
    else:
        raise PolicyFormatError(f"{origin}: give one TorchScript policy file, or two (encoder, body)")
    data = b"".join(p.read_bytes() for p in paths)
    fp = _finish(model, origin, data, [], input_name=None, output_name=None, obs_dim=None, action_low=None,
                 action_high=None, history=history)
    k = fp.history.length if fp.history else 1
    d = fp.history.obs_dim if fp.history else obs_dim
    details: dict[str, Any] = {
        "export": f"torch.onnx.export of the TorchScript graph (opset {OPSET})",
        "inputs": [[{"role": r, "shape": list(s)} for r, s in lay] for lay in layouts],
        "output_shape": list(out),
        "modules": [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                     "class": str(getattr(m, "original_name", type(m).__name__))}
                    for p, m in zip(paths, modules, strict=True)]}
    # check the translation against the module(s) on random windows
    windows = np.random.default_rng(seed).normal(size=(VERIFY_WINDOWS, k * d)).astype(np.float32)
    with torch.no_grad():
        if len(modules) == 1:
            theirs = modules[0](*_feed(layouts[0], windows, k, d)).numpy()
        else:
            z = modules[0](*_feed(layouts[0], windows, k, d))
            theirs = modules[1](*_feed(layouts[1], windows, k, d, z)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(fp.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ours = sess.run([fp.output_name], {fp.input_name: windows})[0]
    diff = np.abs(ours.astype(np.float64) - theirs.reshape(ours.shape))
    details["verification"] = {"windows": VERIFY_WINDOWS, "max_abs_action_diff": float(diff.max()), "atol": atol}
    if float((diff - atol * (1.0 + np.abs(theirs.reshape(ours.shape)))).max()) > 0:
        raise PolicyFormatError(f"{origin}: the ONNX export differs from the TorchScript module by "
                                f"{float(diff.max()):.3g} (beyond {atol:g}); the module's forward() does something "
                                "torch.onnx.export does not reproduce")
    source = PolicySource(path=origin, sha256=hashlib.sha256(data).hexdigest(), kind="torchscript",
                          algorithm="TorchScript", details={**fp.source.details, **details})
    return replace(fp, source=source)
