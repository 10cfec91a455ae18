"""``edgeq check MODEL.onnx``: the static TensorRT QDQ conformance check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeq.commands._app import app, console, run_guarded


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="An ONNX model (e.g. a bundle's policy.int8.onnx).")],
    strict: Annotated[bool, typer.Option(help="Fail on warnings too.")] = False,
) -> None:
    """Check a QDQ ONNX model against TensorRT's explicit-quantization rules; exit 1 on violations."""
    from edgeq.errors import EdgeqError
    from edgeq.export.trt_rules import check_qdq_model, format_report

    def go() -> list:
        if not model.is_file():
            raise EdgeqError(f"{model}: no such file (expected an ONNX model)")
        return check_qdq_model(model)

    violations = run_guarded(go)
    console.print(format_report(violations), highlight=False)
    errors = [v for v in violations if v.severity == "error"]
    if errors or (strict and violations):
        raise typer.Exit(1)
