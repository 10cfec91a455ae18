"""``edgeq check MODEL.onnx|BUNDLE``: each file against the rules of the runtime it is for."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeq.commands._app import app, console, run_guarded


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="An ONNX model or a bundle directory (every ONNX file in it).")],
    runtime: Annotated[str | None, typer.Option(help="Rules to apply: tensorrt, onnxruntime-cpu or onnxruntime-cuda "
                                                     "(default: by bundle file name: policy.int8.onnx → tensorrt, "
                                                     "policy.int8.cpu/cuda.onnx and policy.fp32.onnx → onnxruntime; "
                                                     "any other file → tensorrt).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
) -> None:
    """Check ONNX files: TensorRT's explicit-quantization rules for the QDQ file, a real ONNX Runtime session and
    call for the ONNX Runtime files; exit 1 on violations, 2 on an error (a file that is not a readable ONNX
    model, or a crash)."""
    from edgeq.export.runtime_check import FileCheck, check_bundle, check_file
    from edgeq.export.trt_rules import format_report

    def go() -> list[FileCheck]:
        if model.is_dir():
            if runtime is not None:
                from edgeq.errors import EdgeqError

                raise EdgeqError("--runtime applies to one file; a bundle's files are each checked for their runtime")
            return check_bundle(model)
        read_onnx_model(model)  # not a readable ONNX model: one line, exit 2
        return [check_file(model, runtime)]

    results = run_guarded(go)
    failed = False
    for r in results:
        head = f"{r.path.name} [{r.runtime}]: "
        if r.runtime == "tensorrt":
            console.print(head + format_report(r.violations).replace("\n", "\n  "), highlight=False, markup=False)
        else:
            for v in r.violations:
                console.print(f"{head}{v.severity.upper()} [{v.rule}] {v.message}; fix: {v.fix}", highlight=False,
                              markup=False)
            if not r.violations:
                console.print(head + "OK: " + "; ".join(r.notes), highlight=False, markup=False)
            else:
                for note in r.notes:
                    console.print(f"  note: {note}", highlight=False, markup=False)
        failed = failed or r.errors > 0 or (strict and bool(r.violations))
    if failed:
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
