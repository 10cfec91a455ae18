"""Policy sources → :class:`~edgeq.policy.FloatPolicy`. No later stage knows where a policy came from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeq.errors import EdgeqError, PolicyFormatError
from edgeq.policy import FloatPolicy

if TYPE_CHECKING:
    from edgeq.ingest.torch_module import from_torch_module as from_torch_module

__all__ = ["from_torch_module", "load_policy"]

_EXPECTED = "a Stable-Baselines3 / sb3-contrib .zip, a float ONNX policy (.onnx) or a TorchScript policy.pt"
_ONNX_OPTIONS = ("input_name", "output_name", "obs_dim", "action_low", "action_high", "history")
_TORCHSCRIPT_OPTIONS = ("history", "obs_dim")


def load_policy(path: str | Path | Sequence[str | Path], **options: Any) -> FloatPolicy:
    """Load a policy file by its kind.

    * ``.zip``: a Stable-Baselines3 / sb3-contrib archive (options ``vecnormalize``, ``algorithm``);
    * ``.onnx``: a float ONNX policy such as Isaac Lab's ``policy.onnx`` (options ``input_name``,
      ``output_name``, ``obs_dim``, ``action_low``, ``action_high``; see
      :func:`edgeq.ingest.onnx_policy.load_onnx_policy`), ``history`` (a flat input holding that many
      stacked observations); two ``.onnx`` files are an encoder and a body, joined into one graph;

      ``RecurrentPPO`` archives go to :func:`edgeq.ingest.sb3_recurrent.load_sb3_recurrent`;
    * ``.pt`` / ``.jit`` / ``.pth`` / ``.ts``: a TorchScript module (:mod:`edgeq.ingest.torchscript`;
      options ``history``, and ``obs_dim``, the env's observation size, for modules with their own
      ``forward()``: :mod:`edgeq.ingest.torchscript_graph`); two such files are an encoder and a body.
      TorchScript is code: pass only files you trust.

    Options that do not apply to the file's kind and are None are ignored.

    Any failure is a :class:`PolicyFormatError` naming the file (an unexpected exception inside a
    reader too: a file that makes a reader crash is a file edgeq cannot read).
    """
    if not isinstance(path, str | Path):
        paths = [Path(q) for q in path]
        if len(paths) != 1:
            from edgeq.ingest.torchscript import TORCHSCRIPT_SUFFIXES, load_torchscript

            if len(paths) == 2 and all(q.suffix.lower() in TORCHSCRIPT_SUFFIXES for q in paths):
                _reject(paths[0], options, _TORCHSCRIPT_OPTIONS)
                return load_torchscript(paths, **{k: v for k, v in options.items() if k in _TORCHSCRIPT_OPTIONS})
            for q in paths:
                if not q.exists() or q.suffix.lower() != ".onnx":
                    raise PolicyFormatError(f"{q}: a two-module policy needs two existing .onnx files, or two "
                                            "TorchScript .pt files (encoder, then body)")
            from edgeq.ingest.onnx_policy import load_onnx_policy

            _reject(paths[0], options, _ONNX_OPTIONS)
            return load_onnx_policy(paths, **{k: v for k, v in options.items() if k in _ONNX_OPTIONS and v is not None})
        path = paths[0]
    p = Path(path)
    if not p.exists():
        raise PolicyFormatError(f"{p}: no such file (expected {_EXPECTED})")
    if not p.is_file():
        raise PolicyFormatError(f"{p}: not a regular file (expected {_EXPECTED})")
    try:
        return _load_by_kind(p, options)
    except EdgeqError:
        raise
    except RecursionError:
        raise PolicyFormatError(f"{p}: nested too deeply to read; the file is corrupt") from None
    except MemoryError:
        raise PolicyFormatError(f"{p}: reading it needs more memory than this machine has; the file is corrupt "
                                "or not a policy") from None
    except Exception as exc:  # noqa: BLE001 - every reader failure names the file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PolicyFormatError(f"{p}: cannot be read as a policy ({type(exc).__name__}: {first}); the file is "
                                f"corrupt or not supported (expected {_EXPECTED})") from None


def _load_by_kind(p: Path, options: dict[str, Any]) -> FloatPolicy:
    suffix = p.suffix.lower()
    if suffix == ".zip":
        from edgeq.ingest.sb3_recurrent import is_recurrent_archive

        if is_recurrent_archive(p):
            from edgeq.ingest.sb3_recurrent import load_sb3_recurrent

            return load_sb3_recurrent(p, vecnormalize=options.get("vecnormalize"))
        from edgeq.ingest.sb3 import load_sb3

        _reject(p, options, ("vecnormalize", "algorithm", "frame_stack"))
        return load_sb3(p, vecnormalize=options.get("vecnormalize"), algorithm=options.get("algorithm"),
                        frame_stack=int(options.get("frame_stack") or 0))
    if suffix == ".onnx":
        from edgeq.ingest.onnx_policy import load_onnx_policy

        _reject(p, options, _ONNX_OPTIONS)
        return load_onnx_policy(p, **{k: v for k, v in options.items() if k in _ONNX_OPTIONS and v is not None})
    from edgeq.ingest.torchscript import TORCHSCRIPT_SUFFIXES, load_torchscript

    if suffix in TORCHSCRIPT_SUFFIXES:
        _reject(p, options, _TORCHSCRIPT_OPTIONS)
        return load_torchscript(p, **{k: v for k, v in options.items() if k in _TORCHSCRIPT_OPTIONS})
    raise PolicyFormatError(f"{p}: unsupported policy file type {suffix or '(none)'}; expected {_EXPECTED}")


def _reject(path: Path, options: dict[str, Any], accepted: tuple[str, ...]) -> None:
    extra = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if extra:
        raise PolicyFormatError(f"{path}: option(s) {extra} do not apply to a {path.suffix} policy "
                                f"(it takes {list(accepted)})")


def __getattr__(name: str) -> Any:
    # lazy: torch is imported only when a torch module is actually ingested
    if name == "from_torch_module":
        from edgeq.ingest.torch_module import from_torch_module

        return from_torch_module
    raise AttributeError(f"module 'edgeq.ingest' has no attribute {name!r}")
