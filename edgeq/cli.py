"""The ``edgeq`` command line: thin wrappers, each one call into the stages."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
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


def _progress_factory(progress: Progress) -> Callable[[str, int | None], Callable[[int], None]]:
    def factory(stage: str, total: int | None) -> Callable[[int], None]:
        task = progress.add_task(stage, total=total)
        return lambda n: progress.advance(task, n)

    return factory


def _fmt_size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def print_summary(validation: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Float vs int8 per target: mean ± std, paired difference, action error, file sizes."""
    table = Table(title=f"edgeq: {manifest['source']['algorithm']} on {validation['env_id']} "
                        f"({len(validation['seeds'])} paired episodes)")
    for col in ("target", "float return", "int8 return", "int8 - float (95% CI)", "int8/float",
                "action err mean / max"):
        table.add_column(col, justify="right")
    for target, r in validation["targets"].items():
        d = r["paired_difference"]
        ae = r["action_error"]["on_float_trajectory"]
        table.add_row(target, f"{r['float']['mean']:.1f} ± {r['float']['std']:.1f}",
                      f"{r['int8']['mean']:.1f} ± {r['int8']['std']:.1f}",
                      f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]",
                      f"{d['ratio_of_means']:.4f}", f"{ae['mean_abs']:.4f} / {ae['max_abs']:.4f}")
    console.print(table)
    sizes = validation.get("sizes", {})
    if sizes:
        f, q = sizes.get("policy.fp32.onnx", 0), sizes.get("policy.int8.onnx", 0)
        console.print(f"files: policy.fp32.onnx {_fmt_size(f)}, policy.int8.onnx {_fmt_size(q)} "
                      f"({f / max(q, 1):.2f}x smaller)")
    layers = manifest.get("quantization", {}).get("layers", [])
    n8 = sum(1 for layer in layers if layer["precision"] == "int8")
    settings = manifest.get("quantization", {}).get("settings", {})
    console.print(f"int8 layers: {n8}/{len(layers)}; activations: {settings.get('activation_calibrator')} "
                  f"{settings.get('calibrator_params', {})}; weights: per-channel {settings.get('weight_method')}")
    t = validation.get("timings", {})
    if t:
        console.print("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items()))


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except EdgeqError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def quantize(
    policy: Annotated[Path, typer.Argument(help="Policy file: a Stable-Baselines3 / sb3-contrib .zip.")],
    env: Annotated[str, typer.Option("--env", help="Gymnasium env id (e.g. HalfCheetah-v5) or module:callable.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to create.")],
    episodes: Annotated[int, typer.Option(help="Paired validation episodes (float vs int8, same seeds).")] = 10,
    seed: Annotated[int, typer.Option(help="First validation seed; episode k uses seed+k.")] = 0,
    recipe: Annotated[str | None, typer.Option(help="Calibration recipe: a YAML path or a name in calibration/.")
                      ] = None,
    profile: Annotated[str, typer.Option(help="Export profile: a YAML path or a name in export/.")] = "cpu-ort",
    calibrator: Annotated[str | None, typer.Option(help="Activation calibrator: max, percentile, mse, entropy.")
                          ] = None,
    percentile: Annotated[float | None, typer.Option(help="Percentile for the percentile calibrator.")] = None,
    weight_method: Annotated[str | None, typer.Option(help="Per-channel weight quantizer: absmax or mse.")
                             ] = None,
    calib_episodes: Annotated[int | None, typer.Option(help="Calibration episodes (overrides the recipe).")
                              ] = None,
    noise: Annotated[float | None, typer.Option(help="Gaussian exploration noise during calibration "
                                                     "(fraction of the action half-range).")] = None,
    vecnormalize: Annotated[Path | None, typer.Option(help="vecnormalize.pkl (default: NAME/vecnormalize.pkl "
                                                           "beside NAME.zip if present).")] = None,
    env_kwargs: Annotated[str | None, typer.Option(help="JSON object of keyword arguments for the env.")] = None,
    num_envs: Annotated[int, typer.Option(help="Environments stepped in parallel (vector env).")] = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print validation.json instead of the table.")] = False,
) -> None:
    """Calibrate, export and validate POLICY in one go; writes a bundle to --out."""
    from edgeq.calibration.collect import ExplorationNoise
    from edgeq.envs import parse_env_kwargs
    from edgeq.pipeline import quantize as run_quantize

    def go() -> Any:
        params = {"percentile": percentile} if percentile is not None else None
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=json_out or not err_console.is_terminal) as prog:
            return run_quantize(policy, env, out, episodes=episodes, seed=seed, recipe=recipe, profile=profile,
                                calibrator=calibrator, calibrator_params=params, weight_method=weight_method,
                                calib_episodes=calib_episodes,
                                exploration=ExplorationNoise(gaussian=noise) if noise is not None else None,
                                vecnormalize=vecnormalize, env_kwargs=parse_env_kwargs(env_kwargs),
                                num_envs=num_envs, overwrite=overwrite, progress=_progress_factory(prog))

    result = _run(go)
    if json_out:
        console.print_json(json.dumps(result.validation))
    else:
        print_summary(result.validation, result.manifest)
        console.print(f"bundle: {result.bundle}")


@app.command()
def validate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory made by 'edgeq quantize'.")],
    episodes: Annotated[int, typer.Option(help="Paired episodes.")] = 10,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    targets: Annotated[str, typer.Option(help="Comma-separated targets: cpu,cuda.")] = "cpu",
    num_envs: Annotated[int, typer.Option(help="Environments stepped in parallel.")] = 8,
) -> None:
    """Roll a bundle's float and int8 policies out on the same seeds and print the comparison."""
    from edgeq.deploy.bundle_format import read_manifest
    from edgeq.envs import env_factory
    from edgeq.validate.targets import validate_target

    def go() -> tuple[dict[str, Any], dict[str, Any]]:
        manifest = read_manifest(bundle)
        env_id = manifest["env"]["id"]
        make_env = env_factory(env_id, manifest["env"].get("kwargs"))
        seeds = list(range(seed, seed + episodes))
        res: dict[str, Any] = {"env_id": env_id, "seeds": seeds, "targets": {}}
        for t in targets.split(","):
            res["targets"][t] = validate_target(
                t, bundle / manifest["models"]["fp32"], bundle / manifest["models"]["int8"], manifest["io"],
                make_env, seeds, act_dim=int(manifest["action_space"]["shape"][0]), num_envs=num_envs)
        return res, manifest

    res, manifest = _run(go)
    print_summary(res, manifest)


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")]) -> None:
    """Print a bundle's manifest (after checking every file's SHA-256)."""
    from edgeq.deploy.bundle_format import read_manifest

    manifest = _run(lambda: read_manifest(bundle))
    console.print_json(json.dumps(manifest))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
