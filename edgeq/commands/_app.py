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
    """Float vs int8 per target: mean ± std, paired difference, noise floor, action error, verdict, file sizes."""
    label = manifest["source"]["algorithm"] or manifest["source"]["kind"]
    table = Table(title=f"edgeq: {label} on {validation['env_id']} "
                        f"({len(validation['seeds'])} paired episodes)")
    has_floor = any("noise_floor" in r for r in validation["targets"].values())
    has_verdict = any("verdict" in r for r in validation["targets"].values())
    cols = ["target", "float return", "int8 return", "int8 - float (95% CI)", "int8/float"]
    cols += ["noise floor", "≠ floor"] if has_floor else []
    cols += ["action err mean / max"] + (["verdict"] if has_verdict else [])
    for col in cols:
        table.add_column(col, justify="right")
    for target, r in validation["targets"].items():
        d = r["paired_difference"]
        ae = r["action_error"]["on_float_trajectory"]
        row = [target, f"{r['float']['mean']:.1f} ± {r['float']['std']:.1f}",
               f"{r['int8']['mean']:.1f} ± {r['int8']['std']:.1f}",
               f"{d['mean']:+.4g} [{d['ci95'][0]:+.4g}, {d['ci95'][1]:+.4g}]",
               "-" if d.get("ratio_of_means") is None else f"{d['ratio_of_means']:.4f}"]
        if has_floor:
            fl = r.get("noise_floor")
            row += ([f"±{max(abs(fl['band'][0]), abs(fl['band'][1])):.2g}", "yes" if fl["distinguishable"] else "no"]
                    if fl else ["-", "-"])
        row.append(f"{ae['mean_abs']:.4f} / {ae['max_abs']:.4f}")
        if has_verdict:
            v = r.get("verdict", {})
            row.append("[bold green]PASS[/]" if v.get("passed") else "[bold red]FAIL[/]" if v else "-")
        table.add_row(*row)
    console.print(table)
    for target, reason in validation.get("unavailable_targets", {}).items():
        console.print(f"{target}: unavailable here ({reason})", highlight=False)
    verdict = validation.get("verdict")
    if verdict:
        style = "bold green" if verdict["passed"] else "bold red"
        console.print(f"verdict: [{style}]{verdict['status']}[/]", highlight=False)
        for target, r in validation["targets"].items():
            for line in [*r.get("verdict", {}).get("reasons", []), r.get("verdict", {}).get("floor_text")]:
                if line:
                    console.print(f"  {target}: {line}", highlight=False, soft_wrap=True)
    for target, r in validation["targets"].items():
        if "saturation" not in r and "perturbed" not in r:
            continue
        parts = []
        sat = r.get("saturation")
        if sat:
            parts.append(f"int8 saturation max {100 * sat['max_rate']:.3g}% ({sat['max_tensor']})")
        parts.append(f"terminated float {_falls(r['float'])} / int8 {_falls(r['int8'])}")
        pert = r.get("perturbed")
        if pert:
            d = pert["paired_difference"]
            psat = pert.get("saturation")
            parts.append(f"under {', '.join(p.get('kind', '?') for p in pert.get('perturbation', []))}: "
                         f"float {pert['float']['mean']:.1f} / int8 {pert['int8']['mean']:.1f} "
                         f"(diff {d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]), terminated "
                         f"{_falls(pert['float'])} / {_falls(pert['int8'])}"
                         + (f", saturation max {100 * psat['max_rate']:.3g}%" if psat else ""))
        console.print(f"{target}: " + "; ".join(parts), highlight=False, soft_wrap=True)
    sizes = validation.get("sizes", {})
    if sizes:
        f, q = sizes.get("policy.fp32.onnx", 0), sizes.get("policy.int8.onnx", 0)
        console.print(f"files: policy.fp32.onnx {_fmt_size(f)}, policy.int8.onnx {_fmt_size(q)} "
                      f"({f / max(q, 1):.2f}x smaller)")
    layers = manifest.get("quantization", {}).get("layers", [])
    n8 = sum(1 for layer in layers if layer["precision"] == "int8")
    settings = manifest.get("quantization", {}).get("settings", {})
    n16 = sum(1 for layer in layers if layer["precision"] == "fp16")
    auto = settings.get("options", {}).get("auto", False)
    console.print(f"int8 layers: {n8}/{len(layers)}" + (f" (fp16: {n16})" if n16 else "") + "; activations: "
                  + ("chosen per layer (search started at " if auto else "")
                  + f"{settings.get('activation_calibrator')} {settings.get('calibrator_params', {})}"
                  + (")" if auto else "") + f"; weights: per-channel {settings.get('weight_method')}")
    cpu_float = manifest.get("cpu_float_layers") or []
    if cpu_float:
        below = manifest.get("profile", {}).get("cpu_float_below")
        console.print(f"ONNX Runtime CPU file: {len(cpu_float)} layer(s) narrower than {below} run in float on their "
                      f"int8 weights ({', '.join(cpu_float)}): faster than ORT's int8 kernel at that size; "
                      "the TensorRT file quantizes every layer", highlight=False, soft_wrap=True)
    cell = settings.get("recurrent_cell")
    if cell:
        console.print(f"recurrent cell: {cell['precision']} ({len(cell.get('gate_nodes', []))} gate MatMuls)")
    print_layer_choices(manifest.get("quantization", {}))
    t = validation.get("timings", {})
    if t:
        console.print("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items()))
    for w in validation.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def print_layer_choices(quantization: dict[str, Any]) -> None:
    """Per layer: precision, the input quantizer chosen, rounding, bias correction, quantization kernel."""
    layers = quantization.get("layers", [])
    if not layers:
        return
    table = Table(title="per-layer quantization", title_justify="left")
    for col in ("layer", "precision", "input quantizer", "weights", "bias corr.", "kernel (per-tensor)"):
        table.add_column(col)
    for la in layers:
        choice = (la.get("choice") or {}).get("label", "")
        if la["precision"] == "int8" and not choice:
            choice = la.get("scheme", "static")
        kernel = f"{la['kernel']:.3f} ({la['kernel_per_tensor']:.3f})" if "kernel" in la else ""
        weights = f"{la.get('weight_method', '')} {la.get('rounding', '')}".strip() if la["precision"] == "int8" else ""
        table.add_row(la["node"], la["precision"], choice, weights, "yes" if la.get("bias_corrected") else "",
                      kernel)
    console.print(table)
    for la in layers:
        if la["precision"] != "int8" and la.get("reason"):
            console.print(f"[bold yellow]{la['precision']}[/]: {la['node']}: {la['reason']}", highlight=False)
    if quantization.get("tensorrt_compatible") is False:
        console.print("[bold yellow]note[/]: CrossQuant dynamic layers: this INT8 model runs on ONNX Runtime only, "
                      "not TensorRT", highlight=False)
    err = quantization.get("metrics", {}).get("heldout_action_error")
    if err:
        stages = quantization["metrics"].get("heldout_score_by_stage", {})
        console.print("held-out action error (fraction of action half-range): "
                      f"mean {err['mean']:.4f}, p99 {err['p99']:.4f}, max {err['max']:.4f}; score by stage: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()), highlight=False)


def run_guarded(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except EdgeqError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


#: ``--workers``, ``--executor`` and ``--ray-address``: the same three options on every command that rolls out
WorkersOption = Annotated[int, typer.Option(help="Processes that run validation episodes (results are identical "
                                                 "for any number).")]
ExecutorOption = Annotated[str, typer.Option(help="Where validation episodes run: serial, processes (--workers "
                                                  "local processes) or ray (a Ray cluster; pip install "
                                                  "'edgeq\\[ray]').")]
RayAddressOption = Annotated[str | None, typer.Option(help="With --executor ray: the cluster to join ('auto', "
                                                           "'ray://host:10001'); default: a local Ray instance "
                                                           "with --workers CPUs.")]


def executor_config(executor: str, workers: int, ray_address: str | None) -> Any:
    """The :class:`~edgeq.validate.executor.ExecutorConfig` for the three options above."""
    from edgeq.validate.executor import ExecutorConfig

    if ray_address is not None and executor != "ray":
        raise EdgeqError("--ray-address goes with --executor ray")
    return ExecutorConfig(kind=executor, workers=workers, address=ray_address)
