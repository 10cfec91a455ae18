"""The typer app, consoles, error handling and the summary table shared by every command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edgeq.errors import EdgeqError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="edgeq: INT8 quantization for robot-control policies that keeps their return.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def progress_factory(progress: Progress) -> Callable[[str, int | None], Callable[[int], None]]:
    def factory(stage: str, total: int | None) -> Callable[[int], None]:
        task = progress.add_task(stage, total=total)
        return lambda n: progress.advance(task, n)

    return factory


def _fmt_size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _falls(r: dict[str, Any]) -> str:
    ci = r.get("termination_ci95")
    rate = r.get("termination_rate")
    if rate is None:
        return "-"
    return f"{100 * rate:.0f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def print_summary(validation: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Float vs int8 per target (and under disturbances): returns, paired difference, action error,
    termination rates, the worst INT8 tensor saturation; then file sizes and warnings."""
    table = Table(title=f"edgeq: {manifest['source']['algorithm']} on {validation['env_id']} "
                        f"({len(validation['seeds'])} paired episodes)")
    for col in ("target", "float return", "int8 return", "int8 - float (95% CI)", "int8/float",
                "action err mean / max", "terminated float / int8 (95% CI)", "int8 saturation max"):
        table.add_column(col, justify="right")
    rows: list[tuple[str, dict[str, Any]]] = []
    for target, r in validation["targets"].items():
        rows.append((target, r))
        if r.get("perturbed"):
            rows.append((f"{target} perturbed", r["perturbed"]))
    for name, r in rows:
        d = r["paired_difference"]
        ae = r["action_error"]["on_float_trajectory"]
        sat = r.get("saturation")
        sat_text = "-" if not sat else f"{100 * sat['max_rate']:.3g}% ({sat['max_tensor']})"
        table.add_row(name, f"{r['float']['mean']:.1f} ± {r['float']['std']:.1f}",
                      f"{r['int8']['mean']:.1f} ± {r['int8']['std']:.1f}",
                      f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]",
                      f"{d['ratio_of_means']:.4f}", f"{ae.get('mean_abs', 0):.4f} / {ae.get('max_abs', 0):.4f}",
                      f"{_falls(r['float'])} / {_falls(r['int8'])}", sat_text)
    console.print(table)
    if validation.get("perturbation"):
        console.print("perturbed: " + "; ".join(", ".join(f"{k}={v}" for k, v in p.items())
                                               for p in validation["perturbation"]))
    sizes = validation.get("sizes", {})
    if sizes:
        f, q = sizes.get("policy.fp32.onnx", 0), sizes.get("policy.int8.onnx", 0)
        console.print(f"files: policy.fp32.onnx {_fmt_size(f)}, policy.int8.onnx {_fmt_size(q)} "
                      f"({f / max(q, 1):.2f}x smaller)")
    layers = manifest.get("quantization", {}).get("layers", [])
    n8 = sum(1 for layer in layers if layer["precision"] == "int8")
    settings = manifest.get("quantization", {}).get("settings", {})
    cell = settings.get("recurrent_cell")
    console.print(f"int8 layers: {n8}/{len(layers)}; activations: {settings.get('activation_calibrator')} "
                  f"{settings.get('calibrator_params', {})}; weights: per-channel {settings.get('weight_method')}"
                  + (f"; recurrent cell: {cell['precision']}" if cell else ""))
    t = validation.get("timings", {})
    if t:
        console.print("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items()))
    for w in validation.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def run_guarded(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except EdgeqError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


