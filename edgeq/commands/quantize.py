"""``edgeq quantize`` and ``edgeq info``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgeq.commands._app import app, console, err_console, print_summary, progress_factory, run_guarded


@app.command()
def quantize(
    policy: Annotated[Path, typer.Argument(help="Policy file: a Stable-Baselines3 / sb3-contrib .zip (incl. "
                                                "RecurrentPPO), or a TorchScript policy.pt (legged_gym / rsl_rl / "
                                                "Isaac Lab export). TorchScript is code: pass only files you trust.")],
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
    calib_env: Annotated[str | None, typer.Option(help="Calibrate in this env (gymnasium id or module:callable; "
                                                       "default: --env), e.g. one with disturbances.")] = None,
    calib_env_kwargs: Annotated[str | None, typer.Option(help="JSON keyword arguments for --calib-env (default: "
                                                              "--env-kwargs when it is the same env).")] = None,
    calib_perturb: Annotated[list[str] | None, typer.Option(
        help="Disturbance during calibration, repeatable: 'push:speed=1.5,interval=40-120' (MuJoCo root-velocity "
             "kicks) or 'action_noise:std=0.2'.")] = None,
    perturb: Annotated[list[str] | None, typer.Option(
        help="Also validate float and int8 under this disturbance schedule (same syntax, repeatable); reports "
             "termination/fall rates with 95% CIs.")] = None,
    cell_precision: Annotated[str, typer.Option(help="Recurrent policies: LSTM/GRU gate MatMuls in 'int8' or kept "
                                                     "in 'fp32' (the MLP is int8 either way).")] = "int8",
    saturation_warn: Annotated[float, typer.Option(help="Warn when a quantized tensor's values fall outside its "
                                                        "calibrated range more often than this fraction.")] = 1e-3,
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
                                num_envs=num_envs, overwrite=overwrite, calib_env=calib_env,
                                calib_env_kwargs=parse_env_kwargs(calib_env_kwargs) if calib_env_kwargs else None,
                                calib_perturb=calib_perturb or (), perturb=perturb or (),
                                cell_precision=cell_precision, saturation_warn=saturation_warn,
                                progress=progress_factory(prog))

    result = run_guarded(go)
    if json_out:
        console.print_json(json.dumps(result.validation))
    else:
        print_summary(result.validation, result.manifest)
        console.print(f"bundle: {result.bundle}")


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")]) -> None:
    """Print a bundle's manifest (after checking every file's SHA-256)."""
    from edgeq.deploy.bundle_format import read_manifest

    manifest = run_guarded(lambda: read_manifest(bundle))
    console.print_json(json.dumps(manifest))
