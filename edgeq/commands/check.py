"""``edgeq check MODEL.onnx``: the static TensorRT QDQ conformance check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeq.commands._app import app, console, run_guarded


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="An ONNX model (e.g. a bundle's policy.int8.onnx).")],
    strict: Annotated[bool, typer.Option(help="Fail on warnings too.")] = False,
) -> None:
    """Check a QDQ ONNX model against TensorRT's explicit-quantization rules; exit 1 on violations, 2 on an
    error (a file that is not a readable ONNX model, or a crash)."""
    from edgeq.export.trt_rules import check_qdq_model, format_report

    def go() -> list:
        return check_qdq_model(read_onnx_model(model))

    violations = run_guarded(go)
    console.print(format_report(violations), highlight=False)
    errors = [v for v in violations if v.severity == "error"]
    if errors or (strict and violations):
        raise typer.Exit(1)


def read_onnx_model(path: Path) -> Any:
    """Parse and check ``path`` as an ONNX model with a graph; :class:`EdgeqError` naming the file otherwise."""
    import onnx
    from google.protobuf.message import DecodeError

    from edgeq.errors import EdgeqError

    if not path.is_file():
        raise EdgeqError(f"{path}: no such file (expected an ONNX model)")
    data = path.read_bytes()
    if not data:
        raise EdgeqError(f"{path}: empty file (0 bytes); expected an ONNX model")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise EdgeqError(f"{path}: not an ONNX model ({type(exc).__name__}: {str(exc)[:200]}); pass a .onnx "
                         "file") from None
    if not model.graph.node or not model.graph.output:
        raise EdgeqError(f"{path}: no graph nodes or outputs; expected an ONNX model (is the file truncated?)")
    return model
