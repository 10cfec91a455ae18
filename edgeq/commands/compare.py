"""``edgeq compare``: several bundles or ONNX policies side by side on the same seeds, in one table and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgeq.commands._app import app, console, err_console, run_guarded
from edgeq.commands._progress import progress_reporter
from edgeq.commands.validate import parse_seeds
from edgeq.errors import EdgeqError


def print_comparison(cmp: dict[str, Any]) -> None:
    lat = cmp.get("latency", {}).get("models", {})
    table = Table(title=f"edgeq compare on {cmp['env_id']} ({len(cmp['seeds'])} paired episodes, {cmp['target']})")
    for col in ("model", "file", "return", "- float (interval)", "fail float / model", "≠ floor",
                "action err mean / max", "b1 median us", "verdict"):
        table.add_column(col, justify="right")
    f = cmp["float"]
    table.add_row("float (ref)", cmp["reference"].get("file", "-"), f"{f['mean']:.1f} ± {f['std']:.1f}", "-", "-", "-",
                  "-", f"{lat['float']['batch1']['median_us']:.1f}" if "float" in lat else "-", "-")
    for name, r in cmp["candidates"].items():
        d = r["paired_difference"]
        ae = r["action_error"]["on_float_trajectory"]
        fl = r.get("noise_floor")
        v = r["verdict"]
        lo, hi = v.get("returns", {}).get("interval", d["ci95"])
        fails = v.get("failures", {})
        table.add_row(name, r.get("file", "-"), f"{r['int8']['mean']:.1f} ± {r['int8']['std']:.1f}",
                      f"{d['mean']:+.3g} [{lo:+.3g}, {hi:+.3g}]",
                      f"{fails.get('float_failures', '-')} / {fails.get('int8_failures', '-')}",
                      ("yes" if fl["distinguishable"] else "no") if fl else "-",
                      f"{ae['mean_abs']:.3g} / {ae['max_abs']:.3g}",
                      f"{lat[name]['batch1']['median_us']:.1f}" if name in lat else "-",
                      {"PASS": "[bold green]PASS[/]", "FAIL": "[bold red]FAIL[/]"}.get(
                          v["status"], f"[bold yellow]{v['status']}[/]"))
    console.print(table)
    for w in cmp.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


@app.command()
def compare(
    models: Annotated[list[Path], typer.Argument(help="Bundle directories and/or .onnx policies (obs → actions).")],
    env: Annotated[str | None, typer.Option(help="Gymnasium env id (default: the first bundle's).")] = None,
    env_kwargs: Annotated[str | None, typer.Option(help="JSON object of keyword arguments for the env.")] = None,
    reference: Annotated[Path | None, typer.Option(help="Float reference: a bundle (its fp32 model) or an .onnx "
                                                        "file (default: the first bundle's fp32 model).")] = None,
    names: Annotated[str | None, typer.Option(help="Comma-separated display names, one per model.")] = None,
    episodes: Annotated[int, typer.Option(help="Paired episodes.")] = 10,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    seeds: Annotated[str | None, typer.Option(help="Explicit seeds, e.g. '0-9,20'.")] = None,
    target: Annotated[str, typer.Option(help="Where to run: cpu, cuda or trt.")] = "cpu",
    rel_tol: Annotated[float, typer.Option(help="The band: a model may lose at most rel_tol x |float mean| (the "
                                                "whole interval of model - float inside it).")] = 0.01,
    floor_draws: Annotated[int, typer.Option(help="Noise-floor draws; 0: off.")] = 3,
    latency_calls: Annotated[int, typer.Option(help="Batch-1 latency calls per model; 0: off.")] = 2000,
    per_layer: Annotated[bool, typer.Option(help="Per-layer SQNR (and ranking for edgeq bundles).")] = True,
    num_envs: Annotated[int, typer.Option(help="Environments stepped in parallel.")] = 8,
    out: Annotated[Path, typer.Option(help="Directory for compare.json, compare.html, compare.md.")
                   ] = Path("edgeq-compare"),
    gate: Annotated[bool, typer.Option(help="Exit 1 if any model FAILs the tolerance, else 3 if any is "
                                            "INCONCLUSIVE (like edgeq validate).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print compare.json instead of the table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines; print only the verdict and "
                                                         "where the results are.")] = False,
) -> None:
    """Compare several quantized policies against one float reference on the same seeds (one table, one report)."""
    from edgeq.envs import env_factory_for, parse_env_kwargs
    from edgeq.validate.compare import compare_models, load_candidate
    from edgeq.validate.report import write_compare_report
    from edgeq.validate.validator import atomic_write
    from edgeq.validate.verdict import Tolerance

    def go() -> dict[str, Any]:
        label = [n.strip() for n in names.split(",")] if names else [None] * len(models)
        if len(label) != len(models):
            raise EdgeqError(f"--names has {len(label)} names for {len(models)} models")
        cands = [load_candidate(m, n, target=target) for m, n in zip(models, label, strict=True)]
        bundles = [c for c in cands if c.kind == "bundle"]
        env_ids = {c.manifest["env"]["id"] for c in bundles if c.manifest and c.manifest.get("env")}
        env_id = env or (bundles[0].manifest["env"]["id"] if bundles and bundles[0].manifest else None)
        if env_id is None:
            raise EdgeqError("no --env given and no bundle among the models to take it from")
        if env is None and len(env_ids) > 1:
            raise EdgeqError(f"the bundles were made for different envs {sorted(env_ids)}; pass --env")
        kwargs = parse_env_kwargs(env_kwargs) if env_kwargs else (
            bundles[0].manifest["env"].get("kwargs", {}) if bundles and bundles[0].manifest else {})
        if reference is not None:
            ref = load_candidate(reference, "float", precision="fp32", target=target)
        elif bundles and bundles[0].float_model is not None:
            ref = load_candidate(bundles[0].model.parent, "float", precision="fp32", target=target)
        else:
            raise EdgeqError("no bundle among the models: pass --reference FLOAT.onnx (the float policy)")
        record = dict(bundles[0].manifest["env"]) if bundles and bundles[0].manifest and env is None else {}
        make_env = env_factory_for({**record, "id": env_id, "kwargs": kwargs})
        probe = make_env()
        try:
            low, high = probe.action_space.low, probe.action_space.high
            ep_len = getattr(getattr(probe, "spec", None), "max_episode_steps", None)
        finally:
            probe.close()
        from edgeq.export.bundle import check_output_dir

        check_output_dir(out, "--out")  # before the rollouts
        with progress_reporter(err_console, quiet=quiet or json_out) as prog:
            cmp = compare_models(ref, cands, make_env, parse_seeds(seeds, episodes, seed), env_id=env_id,
                                 action_low=low, action_high=high, target=target,
                                 tolerance=Tolerance(relative=rel_tol), num_envs=num_envs, floor_draws=floor_draws,
                                 latency_calls=latency_calls, per_layer=per_layer, episode_steps=ep_len,
                                 progress=prog)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "compare.json", (json.dumps(cmp, indent=2, allow_nan=False) + "\n").encode())
            write_compare_report(out, cmp)
        return cmp

    cmp = run_guarded(go)
    if json_out:
        console.print_json(json.dumps(cmp))
    elif quiet:
        for name, r in cmp["candidates"].items():
            console.print(f"{name}: {r['verdict'].get('status', 'PASS' if r['verdict']['passed'] else 'FAIL')}",
                          highlight=False, markup=False)
        console.print(f"report: {out / 'compare.html'}", highlight=False, markup=False)
    else:
        print_comparison(cmp)
        console.print(f"report: {out / 'compare.html'}", highlight=False, markup=False)
    statuses = [r["verdict"]["status"] for r in cmp["candidates"].values()]
    code = 1 if "FAIL" in statuses else 3 if "INCONCLUSIVE" in statuses else 0
    raise typer.Exit(code if gate else 0)
