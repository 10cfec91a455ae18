"""The typer app, consoles, error handling and the summary table shared by every command."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from typer.core import TyperOption
from typer.exceptions import TyperException

from edgeq.errors import EdgeqError

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="edgeq: INT8 quantization for robot-control policies that keeps their return.")

#: Width of the output when it is not a terminal (a log, a pipe, CI): wide enough that no table is cut.
LOG_WIDTH = 400


def make_console(stderr: bool = False) -> Console:
    """A rich console; off a terminal (a log, a pipe, CI) wide, so tables are never truncated."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    columns = os.environ.get("COLUMNS", "")
    return Console(stderr=stderr, width=None if tty else max(LOG_WIDTH, int(columns) if columns.isdigit() else 0))


console = make_console()
err_console = make_console(stderr=True)
_state = {"debug": False}



def patch_flag_help(option_class: Any = TyperOption) -> bool:
    """Show boolean flags as flags in the rich help: typer versions that have
    ``TyperOption.display_type_rich`` would print "--json <bool>" as if the flag took a value.

    Feature-detected: typer versions without that method (their help does not print the type of a
    flag, or prints it another way) are left alone, so the CLI starts with any typer edgeq supports.
    Returns whether the method was patched.
    """
    original = getattr(option_class, "display_type_rich", None)
    if not callable(original) or getattr(original, "_edgeq_flag_patch", False):
        return False

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._edgeq_flag_patch = True  # type: ignore[attr-defined]
    option_class.display_type_rich = display_type_rich
    return True


patch_flag_help()


def _print_version(value: bool) -> None:
    if value:
        from edgeq import __version__

        print(f"edgeq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the edgeq version and exit.")] = False) -> None:
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
    from edgeq.describe import loaded_lines, result_rows

    for line in loaded_lines(manifest):
        console.print(f"loaded: {line}", highlight=False, markup=False, soft_wrap=True)
    label = manifest["source"]["algorithm"] or manifest["source"]["kind"]
    eps = sorted({len(r["float"]["returns"]) for _, r in result_rows(validation)})
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
    for target, r in result_rows(validation):
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
    console.print(SUMMARY_LEGEND, highlight=False, markup=False, soft_wrap=True)
    from edgeq.describe import file_headline, return_ratio_text

    for target, r in result_rows(validation):
        head = file_headline(manifest, str(r.get("int8_model")))
        console.print(f"{target}: every figure above is {r.get('float_model', '?')} vs {r.get('int8_model', '?')} on "
                      f"{r.get('runtime', '?')}, {len(r['float']['returns'])} paired episodes; "
                      f"{return_ratio_text(r)}" + (f"; {head}" if head else ""), highlight=False,
                      soft_wrap=True, markup=False)
    for target, reason in validation.get("unavailable_targets", {}).items():
        console.print(f"{target}: unavailable here ({reason})", highlight=False, markup=False)
    verdict = validation.get("verdict")
    if verdict:
        console.print(f"verdict: {_status(verdict['status'])} (exit code {verdict.get('exit_code')})", highlight=False)
        for target, r in result_rows(validation):
            vd = r.get("verdict", {})
            files = f"{target}, {r.get('float_model', '?')} vs {r.get('int8_model', '?')}"
            for line in [*vd.get("reasons", []), vd.get("floor_text")]:
                if line:
                    console.print(f"  {files}: {line}", highlight=False, soft_wrap=True, markup=False)
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
                console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
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
        console.print(f"{target}: " + "; ".join(parts), highlight=False, soft_wrap=True, markup=False)
    sizes = validation.get("sizes", {})
    if sizes:
        f, q = sizes.get("policy.fp32.onnx", 0), sizes.get("policy.int8.onnx", 0)
        console.print(f"files: policy.fp32.onnx {_fmt_size(f)}, policy.int8.onnx {_fmt_size(q)} "
                      f"({f / max(q, 1):.2f}x smaller)")
    from edgeq.describe import cpu_float_text, file_headlines, precision_counts, pruning_text

    settings = manifest.get("quantization", {}).get("settings", {})
    heads = file_headlines(manifest)
    if heads:  # counted from each shipped file's graph
        for line in heads:
            console.print(f"layers: {line}", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"layers: {precision_counts(manifest)}; weights: per-channel int8 (per-layer method in the "
                      "table)", highlight=False, markup=False, soft_wrap=True)
    cpu_text = cpu_float_text(manifest)
    if cpu_text:
        console.print(cpu_text, highlight=False, markup=False, soft_wrap=True)
    pruned = pruning_text(manifest)
    if pruned:
        console.print(pruned, highlight=False, markup=False, soft_wrap=True)
    matmuls = manifest.get("quantization", {}).get("activation_matmuls", [])
    if matmuls:
        roles: dict[str, list[int]] = {}
        for m in matmuls:
            cnt = roles.setdefault(m.get("role", "matmul"), [0, 0])
            cnt[0] += m["precision"] == "int8"
            cnt[1] += 1
        console.print("activation x activation MatMuls (both inputs per-tensor int8): "
                      + ", ".join(f"{role} {a}/{b} int8" for role, (a, b) in roles.items())
                      + "; Softmax, LayerNorm and residual Adds in float", highlight=False, soft_wrap=True)
    by_block = (validation.get("per_layer") or {}).get("ranking_by_block")
    if by_block:
        console.print("share of the int8 action error by block (each unit int8 alone): "
                      + ", ".join(f"{b['block']} {b['share']:.0%}" for b in by_block[:6]),
                      highlight=False, soft_wrap=True)
    history = manifest.get("io", {}).get("history")
    if history:
        console.print(f"observation history: the runtime keeps the last {history['length']} observations "
                      f"(reset: {history['reset']}); act(obs) takes one", highlight=False, soft_wrap=True)
    cell = settings.get("recurrent_cell")
    if cell:
        console.print(f"recurrent cell: {cell['precision']} ({len(cell.get('gate_nodes', []))} gate MatMuls)")
    print_layer_choices(manifest.get("quantization", {}), manifest.get("cpu_float_layers") or [], manifest)
    t = validation.get("timings", {})
    if t:
        console.print("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items()))
    for w in validation.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


#: What each column of the summary table means.
SUMMARY_LEGEND = (
    "columns: target = where the int8 file ran (the line below the table names the files); float / int8 return "
    "= mean ± std of the episode return over the paired episodes (same seeds); int8 - float [interval] = mean "
    "paired difference and the interval the verdict uses; band = the tolerance band it is judged against; "
    "succ/fail/timeout = episodes that reached success / failed (e.g. fell: terminated early) / ran to the time "
    "limit, float | int8; ≠ floor = whether int8's difference is distinguishable from the float policy re-run with "
    "1e-6 action noise (what rounding alone moves); action err = |int8 action - float action| on the float "
    "policy's states, mean / max, in action units; verdict = PASS / FAIL / INCONCLUSIVE (reasons below)")
#: What each column of the per-layer table means.
LAYER_LEGEND = (
    "columns: policy.int8.onnx / cpu file = what the layer runs as in the TensorRT/CUDA QDQ file and in "
    "policy.int8.cpu.onnx (float (int8 weights): int8-stored weights dequantized, float arithmetic); input "
    "quantizer = the activation calibrator (+ input rewrite) the per-layer search chose; weights = per-channel "
    "weight quantizer and rounding; bias corr. = empirical bias correction applied; kernel (per-tensor) = fraction "
    "of the layer's int8 inputs that round to zero with the chosen quantizer (with a plain per-tensor one)")


def print_layer_choices(quantization: dict[str, Any], cpu_float_layers: list[str] | tuple[str, ...] = (),
                        manifest: dict[str, Any] | None = None) -> None:
    """Per layer: what it runs as in each file (read from the files when ``manifest`` records them), the input
    quantizer chosen, rounding, bias correction, kernel."""
    from edgeq.describe import layer_precisions

    layers = quantization.get("layers", [])
    if not layers:
        return
    in_files = {r["node"]: r for r in layer_precisions(manifest)} if manifest else {}
    table = Table(title="per-layer quantization", title_justify="left")
    for col in ("layer", "policy.int8.onnx", "cpu file", "input quantizer", "weights", "bias corr.",
                "kernel (per-tensor)"):
        table.add_column(col)
    for la in layers:
        choice = (la.get("choice") or {}).get("label", "")
        if la["precision"] == "int8" and not choice:
            choice = la.get("scheme", "static")
        kernel = f"{la['kernel']:.3f} ({la['kernel_per_tensor']:.3f})" if "kernel" in la else ""
        weights = f"{la.get('weight_method', '')} {la.get('rounding', '')}".strip() if la["precision"] == "int8" else ""
        cpu = "float (int8 weights)" if la["precision"] == "int8" and la["node"] in cpu_float_layers \
            else la["precision"]
        qdq = la["precision"]
        if la["node"] in in_files:
            qdq, cpu = in_files[la["node"]]["tensorrt"], in_files[la["node"]]["cpu"]
        table.add_row(escape(la["node"]), qdq, cpu, escape(choice), weights,
                      "yes" if la.get("bias_corrected") else "", kernel)
    console.print(table)
    console.print(LAYER_LEGEND, highlight=False, markup=False, soft_wrap=True)
    for la in layers:
        if la["precision"] != "int8" and la.get("reason"):
            console.print(f"[bold yellow]{la['precision']}[/]: {escape(la['node'])}: {escape(la['reason'])}",
                          highlight=False)
    if quantization.get("tensorrt_compatible") is False:
        console.print("[bold yellow]note[/]: CrossQuant dynamic layers: this INT8 model runs on ONNX Runtime only, "
                      "not TensorRT", highlight=False)
    err = quantization.get("metrics", {}).get("heldout_action_error")
    if err:
        stages = quantization["metrics"].get("heldout_score_by_stage", {})
        console.print("held-out action error (fraction of action half-range): "
                      f"mean {err['mean']:.4f}, p99 {err['p99']:.4f}, max {err['max']:.4f}; score by stage "
                      "(held-out score = mean + tail weight x worst-1% mean, after each step of the search: the "
                      "recipe's start, the per-layer choice, AdaRound, bias correction, fp16 fallback; a step is "
                      "kept only if it lowers the score): "
                      + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()), highlight=False, soft_wrap=True)


def print_quiet(validation: dict[str, Any], where: Any = None, label: str = "results") -> None:
    """``--quiet``: one verdict line (with each target's status) and where the results are."""
    verdict = validation.get("verdict") or {}
    per_target = [f"{t} {r['verdict'].get('status') or ('PASS' if r['verdict'].get('passed') else 'FAIL')}"
                  for t, r in validation.get("targets", {}).items() if r.get("verdict")]
    status = verdict.get("status", "no verdict (open loop)" if validation.get("closed_loop") is False else "-")
    console.print(f"verdict: {status}" + (f" ({', '.join(per_target)})" if per_target else ""),
                  highlight=False, markup=False)
    if where is not None:
        console.print(f"{label}: {where}", highlight=False, markup=False)


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
