"""The typer app, consoles, error handling and the summary table shared by every command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from typer.exceptions import TyperException

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


_STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "INCONCLUSIVE": "bold yellow"}


def _status(status: str | None) -> str:
    return f"[{_STATUS_STYLE.get(status or '', 'bold')}]{status}[/]" if status else "-"


def _outcomes(r: dict[str, Any], side: str) -> str:
    o = (r.get("outcomes") or {}).get(side)
    return f"{o['success']}/{o['failure']}/{o['timeout']}" if o else "-"


def _interval(lo: float | None, hi: float | None) -> str:
    def one(x: float | None, inf: str) -> str:
        return inf if x is None else f"{x:+.4g}"

    return f"[{one(lo, '-inf')}, {one(hi, '+inf')}]"


def print_summary(validation: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Float vs int8 per target, each row naming the files and runtime that produced it: returns, the
    verdict's interval and band, success/failure/time-out counts, action error, verdict; then the
    reasons (generated from the numbers), noise floor, latency notes and file sizes."""
    label = manifest["source"]["algorithm"] or manifest["source"]["kind"]
    eps = sorted({len(r["float"]["returns"]) for r in validation["targets"].values()})
    table = Table(title=f"edgeq: {label} on {validation['env_id']} "
                        f"({'/'.join(map(str, eps))} paired episodes)")
    has_floor = any("noise_floor" in r for r in validation["targets"].values())
    has_verdict = any("verdict" in r for r in validation["targets"].values())
    cols = ["target", "float return", "int8 return", "int8 - float [interval]", "band",
            "succ/fail/timeout float | int8"]
    cols += ["≠ floor"] if has_floor else []
    cols += ["action err mean / max"] + (["verdict"] if has_verdict else [])
    for col in cols:
        table.add_column(col, justify="right")
    for target, r in validation["targets"].items():
        d = r["paired_difference"]
        ae = r["action_error"]["on_float_trajectory"]
        v = r.get("verdict", {})
        ret = v.get("returns", {})
        iv = ret.get("interval", d["ci95"])
        band = ret.get("band")
        row = [target, f"{r['float']['mean']:.1f} ± {r['float']['std']:.1f}",
               f"{r['int8']['mean']:.1f} ± {r['int8']['std']:.1f}", f"{d['mean']:+.4g} {_interval(*iv)}",
               _interval(*band) if band else "-", f"{_outcomes(r, 'float')} | {_outcomes(r, 'int8')}"]
        if has_floor:
            fl = r.get("noise_floor")
            row += ["yes" if fl["distinguishable"] else "no"] if fl else ["-"]
        row.append(f"{ae['mean_abs']:.4f} / {ae['max_abs']:.4f}")
        if has_verdict:
            row.append(_status(v.get("status")))
        table.add_row(*row)
    console.print(table)
    for target, r in validation["targets"].items():
        console.print(f"{target}: every figure above is {r.get('float_model', '?')} vs {r.get('int8_model', '?')} on "
                      f"{r.get('runtime', '?')}, {len(r['float']['returns'])} paired episodes", highlight=False,
                      soft_wrap=True)
    for target, reason in validation.get("unavailable_targets", {}).items():
        console.print(f"{target}: unavailable here ({reason})", highlight=False)
    verdict = validation.get("verdict")
    if verdict:
        console.print(f"verdict: {_status(verdict['status'])} (exit code {verdict.get('exit_code')})", highlight=False)
        for target, r in validation["targets"].items():
            vd = r.get("verdict", {})
            files = f"{target}, {r.get('float_model', '?')} vs {r.get('int8_model', '?')}"
            for line in [*vd.get("reasons", []), vd.get("floor_text")]:
                if line:
                    console.print(f"  {files}: {line}", highlight=False, soft_wrap=True)
            if vd.get("stop_reason"):
                design = (r.get("episodes") or {}).get("design", {})
                proc = design.get("returns_procedure", "")
                console.print(f"  {target}: episodes: {vd['stop_reason']}" + (f"; returns judged by the {proc}"
                                                                               if proc else ""),
                              highlight=False, soft_wrap=True)
            if vd.get("status") == "INCONCLUSIVE":
                need = vd.get("needed_episodes")
                console.print(f"  {target}: INCONCLUSIVE is not a pass: "
                              + (f"about {need} paired episodes would decide at the observed spread "
                                 f"(--max-episodes {need})" if need else
                                 "more episodes are not expected to decide at the observed means; "
                                 "reconsider the tolerance"), highlight=False, soft_wrap=True)
        for r in validation["targets"].values():
            for note in [*r.get("notes", []), *r.get("latency_notes", [])]:
                console.print(f"[bold yellow]note:[/] {note}", highlight=False, soft_wrap=True)
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
    matmuls = manifest.get("quantization", {}).get("activation_matmuls", [])
    if matmuls:
        roles: dict[str, list[int]] = {}
        for m in matmuls:
            r = roles.setdefault(m.get("role", "matmul"), [0, 0])
            r[0] += m["precision"] == "int8"
            r[1] += 1
        console.print("activation x activation MatMuls (both inputs per-tensor int8): "
                      + ", ".join(f"{role} {a}/{b} int8" for role, (a, b) in roles.items())
                      + "; Softmax, LayerNorm and residual Adds in float", highlight=False, soft_wrap=True)
    history = manifest.get("io", {}).get("history")
    if history:
        console.print(f"observation history: the runtime keeps the last {history['length']} observations "
                      f"(reset: {history['reset']}); act(obs) takes one", highlight=False, soft_wrap=True)
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


def describe_error(exc: BaseException) -> str:
    """One line for any failure: the :class:`EdgeqError` message as written, an OS error with the file
    and the fix, and anything else as an internal error that names its type (``--debug`` shows where)."""
    if isinstance(exc, EdgeqError):
        text = str(exc)
    elif isinstance(exc, RecursionError):
        text = ("input nested too deeply to read (Python's recursion limit): the file is corrupt or hostile; "
                "pass a file written by its own tool")
    elif isinstance(exc, MemoryError):
        text = "out of memory: an input is larger than this machine can hold; pass a smaller file"
    elif isinstance(exc, OSError):
        text = describe_os_error(exc)
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = (f"unexpected {type(exc).__name__}: {first}; edgeq did not recognise this input (rerun with "
                "--debug for the traceback and report it)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason (ERRNO)`` plus what to do about it."""
    import errno

    where = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    fix = {
        errno.ENOSPC: "free disk space or choose another --out",
        errno.EFBIG: "the file size limit (ulimit -f) is too low; raise it or choose another --out",
        errno.EROFS: "the file system is read-only; choose a writable --out",
        errno.EACCES: "no permission; choose a location you can write (or read) or fix its permissions",
        errno.EPERM: "not permitted; choose a location you can write (or read)",
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
        errno.EISDIR: "expected a file, found a directory",
        errno.EDQUOT: "disk quota exceeded; free space or choose another --out",
    }.get(exc.errno or 0, "check the path and the file system")
    return f"{where}: {reason}{f' ({code})' if code else ''}; {fix}"


def is_debug() -> bool:
    return bool(_state["debug"])


def fail_one_line(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with ``code``."""
    import sys

    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; any failure becomes one line ``error: ...`` on stderr and exit status 2.

    Exit statuses of every command: 0 success, 1 a verdict of FAIL (or rule violations in ``check``),
    2 any error (bad input, unwritable output, a crash). ``--debug`` re-raises with the traceback.
    """
    try:
        return fn()
    except (typer.Exit, typer.Abort, TyperException):
        raise
    except Exception as exc:  # noqa: BLE001 - one error path for every failure
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(describe_error(exc))}", highlight=False, soft_wrap=True)
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
