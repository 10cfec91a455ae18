"""A ``torch.nn.Module`` in Python → :class:`~edgeq.policy.FloatPolicy`.

The module is exported with ``torch.onnx`` with a dynamic batch axis and then normalized exactly
as an ONNX policy file (:func:`edgeq.ingest.onnx_policy.normalize_onnx`).

Two exporters exist in torch 2.x. The default here is the TorchScript-based one
(``dynamo=False``): it needs nothing beyond torch, writes one self-contained model (parameters as
initializers) into memory, and gives byte-identical files for the same weights. The
``torch.export``-based exporter (``exporter="dynamo"``) needs the ``onnxscript`` package; edgeq
takes its in-memory ``model_proto`` (never external data files), and it was also found to be
deterministic for MLP policies. Both write ``Gemm`` for ``nn.Linear``.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.ingest.onnx_policy import TARGET_OPSET, normalize_onnx, policy_from_normalized
from edgeq.policy import ACTIONS_OUTPUT, OBS_INPUT, FloatPolicy, PolicySource
from edgeq.spaces import BoxSpec

EXPORTERS = ("torchscript", "dynamo")


def _as_box(space: Any, what: str) -> BoxSpec | None:
    if space is None:
        return None
    if isinstance(space, BoxSpec):
        return space
    if isinstance(space, (int, np.integer)):
        n = int(space)
        if n <= 0:
            raise PolicyFormatError(f"{what}={n}; expected a positive dimension")
        return BoxSpec((n,), (-math.inf,) * n, (math.inf,) * n)
    if type(space).__name__ == "Box":
        return BoxSpec.from_gym(space)
    raise PolicyFormatError(f"{what} is a {type(space).__name__}; expected a gymnasium Box, an edgeq BoxSpec or "
                            "an int dimension")


def export_module(module: Any, obs_dim: int, *, exporter: str = "torchscript", opset: int = TARGET_OPSET) -> bytes:
    """Export ``module`` (obs [batch, obs_dim] → actions [batch, act_dim]) to ONNX bytes, batch dynamic.

    The module is put in eval mode for the export and its previous mode restored afterwards.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise PolicyFormatError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if exporter not in EXPORTERS:
        raise PolicyFormatError(f"exporter {exporter!r}; expected one of {EXPORTERS}")
    example = torch.zeros(2, obs_dim)  # batch 2: torch.export specializes a batch of 1
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(example)
        if not isinstance(out, torch.Tensor):
            raise PolicyFormatError(f"{type(module).__name__}.forward returns {type(out).__name__}; expected one "
                                    "action tensor (wrap the module to return the actions only)")
        if out.ndim != 2 or out.shape[0] != 2:
            raise PolicyFormatError(f"{type(module).__name__} maps [2, {obs_dim}] to {list(out.shape)}; expected "
                                    "[batch, act_dim]")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                with tempfile.TemporaryDirectory(prefix="edgeq-export-") as tmp:
                    path = Path(tmp) / "policy.onnx"
                    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                                      input_names=[OBS_INPUT], output_names=[ACTIONS_OUTPUT],
                                      dynamic_axes={OBS_INPUT: {0: "batch"}, ACTIONS_OUTPUT: {0: "batch"}},
                                      do_constant_folding=True, export_params=True)
                    return path.read_bytes()
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise PolicyFormatError("exporter 'dynamo' needs the onnxscript package (pip install onnxscript); "
                                        "the default exporter 'torchscript' needs only torch") from None
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=max(opset, 18),
                                        input_names=[OBS_INPUT], output_names=[ACTIONS_OUTPUT],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            assert program is not None
            return bytes(program.model_proto.SerializeToString(deterministic=True))
    except PolicyFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.onnx raises many exception types
        raise PolicyFormatError(f"torch.onnx ({exporter}) cannot export {type(module).__name__}: "
                                f"{type(exc).__name__}: {exc}") from None
    finally:
        module.train(was_training)


def from_torch_module(module: Any, obs_space: Any, action_space: Any = None, *, exporter: str = "torchscript",
                      opset: int = TARGET_OPSET, name: str | None = None) -> FloatPolicy:
    """A deterministic policy module as a :class:`FloatPolicy`.

    ``module`` maps float32 observations [batch, obs_dim] to actions [batch, act_dim] in the env's
    units (put any observation normalization and action squashing inside it). ``obs_space`` is a
    gymnasium ``Box``, a :class:`BoxSpec` or just ``obs_dim``; ``action_space`` likewise, or None to
    take the action dimension from the module's output (bounds then unknown; ``edgeq.quantize`` with
    an env fills them from the env). ``name`` labels the source in the manifest.
    """
    obs = _as_box(obs_space, "obs_space")
    if obs is None:
        raise PolicyFormatError("obs_space is required (a gymnasium Box, a BoxSpec or the observation dimension)")
    if len(obs.shape) != 1:
        raise PolicyFormatError(f"obs_space has shape {obs.shape}; expected a 1-D observation vector")
    act = _as_box(action_space, "action_space")
    data = export_module(module, obs.size, exporter=exporter, opset=opset)
    import onnx

    label = name or f"<{type(module).__module__}.{type(module).__qualname__}>"
    model, report = normalize_onnx(onnx.load_model_from_string(data), origin=label, obs_dim=obs.size)
    import torch

    source = PolicySource(path=label, sha256=hashlib.sha256(data).hexdigest(), kind="torch-module",
                          details={"exporter": exporter, "torch": torch.__version__,
                                   "module_class": f"{type(module).__module__}.{type(module).__qualname__}"})
    return policy_from_normalized(model, report, source, obs_space=obs, action_space=act)
