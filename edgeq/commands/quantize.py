"""``edgeq quantize`` and ``edgeq info``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeq.commands._app import (
    ExecutorOption,
    RayAddressOption,
    WorkersOption,
    app,
    console,
    err_console,
    executor_config,
    print_quiet,
    print_summary,
    run_guarded,
)
from edgeq.commands._progress import progress_reporter
from edgeq.config import KEYWORD_FIELDS


@app.command()
def quantize(
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to create.")],
    policy: Annotated[list[Path] | None, typer.Argument(
        help="Policy file: a Stable-Baselines3 / sb3-contrib .zip (incl. RecurrentPPO), an RL Zoo run folder "
             "(logs/sac/HalfCheetah-v3_1/: archive, vecnormalize.pkl, config.yml, args.yml), a float ONNX policy "
             "(.onnx, e.g. Isaac Lab's policy.onnx), or a TorchScript policy.pt (legged_gym / rsl_rl / Isaac Lab "
             "export). TorchScript is code: pass only files you trust. Two .onnx files are an encoder and a body. "
             "Omit it with -f/--algo/--env.")] = None,
    policy_files: Annotated[list[Path] | None, typer.Option(
        "--policy", help="Policy file, repeatable: --policy encoder.onnx --policy body.onnx (or two TorchScript .pt "
                         "files) joins a history encoder and a body into one policy (the same as giving them as "
                         "arguments).")] = None,
    history: Annotated[int | None, typer.Option(
        help="ONNX/TorchScript policies whose one flat input stacks this many observations (oldest first); a "
             "[batch, K, obs_dim] input needs no option (for TorchScript, K is found by running the module).")] = None,
    history_reset: Annotated[str | None, typer.Option(
        "--history-reset", help="What fills a history policy's window at an episode start, as it was trained: "
                                "zeros (default) or first-observation (the first observation repeated).")] = None,
    env: Annotated[str | None, typer.Option("--env", help="Gymnasium env id (e.g. HalfCheetah-v5) or module:callable "
                                                          "(imported from the current directory too). Optional "
                                                          "with --calib-data and RL Zoo folders; with -f, the "
                                                          "RL Zoo run's env id.")] = None,
    folder: Annotated[Path | None, typer.Option("-f", "--folder", help="RL Zoo log folder (rl_zoo3's -f): with "
                                                                       "--algo, --env and --exp-id it names the run "
                                                                       "FOLDER/ALGO/ENV_EXPID.")] = None,
    algo: Annotated[str | None, typer.Option(help="RL Zoo algorithm folder name (sac, ppo, ...), with -f.")] = None,
    exp_id: Annotated[int, typer.Option(help="RL Zoo experiment id, with -f (0: the latest).")] = 0,
    env_wrapper: Annotated[list[str] | None, typer.Option(
        help="Gymnasium wrapper the policy was trained with, repeatable: a class path from sb3_contrib.common."
             "wrappers or gymnasium.wrappers (TimeFeatureWrapper for short), optionally ':{JSON kwargs}'. "
             "Read from config.yml for RL Zoo folders.")] = None,
    cpu_float_layers: Annotated[str | None, typer.Option(
        help="Replay a recorded choice of the layers policy.int8.cpu.onnx runs in float (comma-separated names "
             "from manifest cpu_layer_selection.float_layers, or 'none') instead of timing them at export.")] = None,
    frame_stack: Annotated[int | None, typer.Option(help="Observations stacked as SB3's VecFrameStack in training "
                                                         "(RL Zoo's frame_stack).")] = None,
    episodes: Annotated[str | None, typer.Option(help="Paired validation episodes (float vs int8, same seeds): 'auto' "
                                               "(batches until PASS or FAIL, at most --max-episodes) or a number.")
                        ] = None,
    max_episodes: Annotated[int | None, typer.Option(help="--episodes auto: at most this many paired episodes (then "
                                                   "INCONCLUSIVE; default 200).")] = None,
    time_budget: Annotated[float | None, typer.Option(help="--episodes auto: stop adding batches after this many "
                                                           "seconds of validation rollouts.")] = None,
    rel_tol: Annotated[float | None, typer.Option(help="The band: int8 may lose at most rel_tol x |float mean| of "
                                                       "return (default 0.01).")] = None,
    abs_tol: Annotated[float | None, typer.Option(help="The band in return units instead of --rel-tol.")] = None,
    fail_tol: Annotated[float | None, typer.Option(help="int8's failure rate may exceed float's by at most this "
                                                        "(0.02 = 2 percentage points; default 0.02).")] = None,
    failure: Annotated[str | None, typer.Option(help="Which episode ends are failures: 'terminated' (default, or the "
                                                     "recipe's 'failure'), 'none', or a predicate on the last step "
                                                     "such as 'reward<=-100' or 'info.fell'.")] = None,
    seed: Annotated[int | None, typer.Option(help="First validation seed; episode k uses seed+k (default 0).")] = None,
    recipe: Annotated[str | None, typer.Option(help="Calibration recipe: a YAML path or a name in calibration/.")
                      ] = None,
    profile: Annotated[str | None, typer.Option(help="Export profile: a YAML path or a name in export/ (default "
                                                     "cpu-ort).")] = None,
    calibrator: Annotated[str | None, typer.Option(help="Activation calibrator: max, percentile, mse, entropy.")
                          ] = None,
    percentile: Annotated[float | None, typer.Option(help="Percentile for the percentile calibrator.")] = None,
    weight_method: Annotated[str | None, typer.Option(help="Per-channel weight quantizer: absmax or mse.")
                             ] = None,
    calib_episodes: Annotated[int | None, typer.Option(help="Calibration episodes (overrides the recipe).")
                              ] = None,
    noise: Annotated[float | None, typer.Option(help="Gaussian exploration noise during calibration "
                                                     "(fraction of the action half-range).")] = None,
    noise_epsilon: Annotated[float | None, typer.Option(help="Probability that a calibration step takes a uniform "
                                                             "random action instead.")] = None,
    holdout_episodes: Annotated[int | None, typer.Option(help="Held-out calibration episodes that score "
                                                              "per-layer choices.")] = None,
    transform: Annotated[str | None, typer.Option(help="Input rewrite before int8: none, crossquant (static "
                                                       "CrossQuant) or equalize (SmoothQuant-style).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Strength of the rewrite (CrossQuant's row exponent, "
                                                     "equalization's migration strength), in [0, 1].")] = None,
    transform_layers: Annotated[str | None, typer.Option(help="Layers the rewrite applies to: first or all.")
                                ] = None,
    dynamic: Annotated[bool | None, typer.Option("--dynamic/--static", help="CrossQuant's dynamic form (run-time "
                                                 "row scales; ONNX Runtime CPU only, not TensorRT).")] = None,
    auto: Annotated[bool | None, typer.Option("--auto/--no-auto", help="Choose each layer's calibrator and rewrite "
                                              "by the action error on held-out states.")] = None,
    rounding: Annotated[str | None, typer.Option(help="Weight rounding: nearest, adaround, gptq, stochastic, brecq "
                                                      "(every layer's rounding and input scale jointly against the "
                                                      "float actions), gptq+brecq, adaround+brecq, discquant "
                                                      "(DiscQuant's relaxed rounding of every layer) or "
                                                      "adaround+discquant.")] = None,
    bias_correction: Annotated[bool | None, typer.Option("--bias-correction/--no-bias-correction",
                                                         help="Empirical bias correction per layer.")] = None,
    fp16_fallback: Annotated[int | None, typer.Option(help="At most this many layers go to fp16 when int8 "
                                                           "cannot reach --max-action-error (default 0: every "
                                                           "layer int8; fp16 layers are reported as such).")] = None,
    prune: Annotated[float | None, typer.Option(help="Structured pruning before quantization: remove this fraction "
                                                    "of every hidden layer's units (lowest saliency, e.g. 0.25); "
                                                    "validated against the unpruned float policy.")] = None,
    max_action_error: Annotated[float | None, typer.Option(help="Held-out mean action error (fraction of the "
                                                                "action half-range) the fp16 fallback aims for.")
                                ] = None,
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
    cell_precision: Annotated[str | None, typer.Option(help="Recurrent policies: LSTM/GRU gate MatMuls in 'int8' or "
                                                            "kept in 'fp32' (the MLP is int8 either way; default "
                                                            "int8).")] = None,
    saturation_warn: Annotated[float | None, typer.Option(help="Warn when a quantized tensor's values fall outside its "
                                                        "calibrated range more often than this fraction "
                                                        "(default 0.001).")] = None,
    num_envs: Annotated[int | None, typer.Option(help="Environments stepped in parallel (vector env; default 8).")
                        ] = None,
    workers: WorkersOption = 1,
    executor: ExecutorOption = "serial",
    ray_address: RayAddressOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    sign_key: Annotated[Path | None, typer.Option(help="Sign the bundle's manifest with this Ed25519 private key "
                                                       "(edgeq keygen); robots load it with its .pub as a trusted "
                                                       "key.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print validation.json instead of the table.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with the verdict's code like 'edgeq validate' "
                                                          "(0 PASS, 1 FAIL, 3 INCONCLUSIVE) instead of 0 once the "
                                                          "bundle is written.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines; print only the verdict and "
                                                         "where the results are.")] = False,
    calib_data: Annotated[str | None, typer.Option(
        "--calib-data", help="Calibrate on logged observations: a .npz (array 'obs' or 'observations'), "
                             "minari:DATASET_ID or a Minari dataset directory. Without --env, validation is the "
                             "open-loop action error on the held-out end of the data.")] = None,
    calib_key: Annotated[str | None, typer.Option(help="Array name in the --calib-data .npz.")] = None,
    holdout: Annotated[float | None, typer.Option(help="Fraction of --calib-data held out for validation (without "
                                                       "--env; default 0.2).")] = None,
    action_low: Annotated[str | None, typer.Option(help="ONNX policies: action lower bound, one number or a comma "
                                                        "list (default: from --env, else unbounded).")] = None,
    action_high: Annotated[str | None, typer.Option(help="ONNX policies: action upper bound (see --action-low).")
                           ] = None,
    onnx_input: Annotated[str | None, typer.Option(help="ONNX policies: the observation input's name, if several.")
                          ] = None,
    onnx_output: Annotated[str | None, typer.Option(help="ONNX policies: the action output's name, if several.")
                           ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Set any config field, repeatable: --set quantization.rounding=nearest --set "
                      "calibration.exploration.gaussian=0.2 (the value is read as YAML; fields: edgeq.config).")
                      ] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Start from this config: a YAML file of sections (edgeq.config.QuantizeConfig) or a "
                         "bundle directory (the config it was made with, its measured CPU layer choice replayed), "
                         "instead of a recipe and a profile.")
                      ] = None,
) -> None:
    """Calibrate, export and validate POLICY in one go; writes a bundle to --out.

    Every setting is a field of edgeq's config (edgeq.config.QuantizeConfig): the options below set the
    fields of the table edgeq.config.KEYWORD_FIELDS, --set SECTION.FIELD=VALUE any field, --config a whole
    config (a YAML file or a bundle, to make it again)."""
    options = {k: v for k, v in locals().items() if k in KEYWORD_FIELDS}

    def go() -> Any:
        from edgeq.commands.validate import parse_episodes
        from edgeq.config import QuantizeConfig, keyword_overrides, parse_set
        from edgeq.envs import parse_env_kwargs
        from edgeq.errors import EdgeqError
        from edgeq.pipeline import quantize as run_quantize

        nonlocal env
        # the config's overrides, checked before anything is read
        given = dict(options, env=None, episodes=None if episodes is None else parse_episodes(episodes),
                     env_kwargs=parse_env_kwargs(env_kwargs) if env_kwargs else None,
                     calib_env_kwargs=parse_env_kwargs(calib_env_kwargs) if calib_env_kwargs else None,
                     action_low=_numbers(action_low, "--action-low"),
                     action_high=_numbers(action_high, "--action-high"),
                     calibrator_params={"percentile": percentile} if percentile is not None else None,
                     cpu_float_layers=None if cpu_float_layers is None else
                     [] if cpu_float_layers.strip() in ("", "none") else
                     [n.strip() for n in cpu_float_layers.split(",") if n.strip()])
        given = {k: (v or None) if isinstance(v, list) and k != "cpu_float_layers" else v for k, v in given.items()}
        given.pop("env")
        overrides = {**keyword_overrides(given), **parse_set(set_ or [])}
        base = None
        if config is not None:
            if recipe is not None or profile is not None:
                raise EdgeqError("--config already holds a recipe and a profile; drop --recipe/--profile (or "
                                 "use --set to change fields)")
            base = (QuantizeConfig.from_bundle(config) if config.is_dir() else QuantizeConfig.from_yaml(config))
        (base or QuantizeConfig()).with_overrides(overrides)
        paths = [*(policy or []), *(policy_files or [])]
        if folder is not None:
            from edgeq.ingest.rl_zoo import find_zoo_run

            if paths or not algo or not env:
                raise EdgeqError("-f/--folder names an RL Zoo run with --algo and --env (and --exp-id); give those "
                                 "instead of POLICY, e.g. -f logs/ --algo sac --env HalfCheetah-v3 --exp-id 1")
            paths, env = [find_zoo_run(folder, algo, env, exp_id)], None
        if not paths:
            raise EdgeqError("Missing argument 'POLICY': pass a .zip, an RL Zoo run folder, an .onnx or a .pt (or "
                             "--policy FILE, twice for an encoder and a body), or name an RL Zoo run with -f FOLDER "
                             "--algo ALGO --env ENV_ID (see edgeq quantize --help)")
        with progress_reporter(err_console, quiet=quiet or json_out) as prog:
            return run_quantize(paths[0] if len(paths) == 1 else paths, env, out, base, overrides=overrides,
                                recipe=recipe, profile=profile, progress=prog, overwrite=overwrite,
                                sign_key=sign_key, executor=executor_config(executor, workers, ray_address))

    result = run_guarded(go)
    if json_out:
        console.print_json(json.dumps(result.validation))
    elif quiet:
        print_quiet(result.validation, result.bundle, label="bundle")
    elif result.validation.get("closed_loop") is False:
        print_open_loop_summary(result.validation, result.manifest)
        console.print(f"bundle: {result.bundle}", highlight=False, markup=False)
    else:
        print_summary(result.validation, result.manifest)
        console.print(f"bundle: {result.bundle}", highlight=False, markup=False)
    code = (result.validation.get("verdict") or {}).get("exit_code")
    if strict and code is not None:
        raise typer.Exit(int(code))


def _numbers(text: str | None, option: str) -> list[float] | None:
    """``"-1,-1,2"`` or ``"2"`` → floats, with a clear error."""
    from edgeq.errors import EdgeqError

    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise EdgeqError(f"{option} {text!r}: expected a number or comma-separated numbers such as '-1,-1,-2'") \
            from None


def print_open_loop_summary(validation: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The summary without an env: action error on held-out logged observations, no returns."""
    from rich.table import Table

    held = validation["held_out"]
    table = Table(title=f"edgeq: {manifest['source'].get('algorithm') or manifest['source']['kind']} policy, "
                        f"open-loop on {held['samples']} held-out logged observations")
    for col in ("target", "action err mean", "p99 step max", "max"):
        table.add_column(col, justify="right")
    for target, r in validation["targets"].items():
        ae = r["action_error"]["on_held_out_observations"]
        table.add_row(target, f"{ae['mean_abs']:.4f}", f"{ae['p99_step_max_abs']:.4f}", f"{ae['max_abs']:.4f}")
    console.print(table)
    console.print(f"[yellow]no return measured[/]: {validation['reason']}", highlight=False)


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
         json_out: Annotated[bool, typer.Option("--json", help="Print the whole manifest.json instead.")] = False
         ) -> None:
    """Summarize a bundle (after checking every file's SHA-256): policy, normalization, env, layers, versions,
    validation; --json prints the manifest."""
    from edgeq.deploy.bundle_format import VALIDATION, read_manifest
    from edgeq.describe import info_lines

    manifest = run_guarded(lambda: read_manifest(bundle))
    if json_out:
        console.print_json(json.dumps(manifest))
        return
    validation = None
    if (bundle / VALIDATION).is_file():
        try:
            validation = json.loads((bundle / VALIDATION).read_text())
        except json.JSONDecodeError:
            validation = None
    console.print(f"bundle: {bundle} (format {manifest.get('format_version')})", highlight=False, markup=False)
    for line in info_lines(manifest, validation):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
def keygen(out: Annotated[Path, typer.Option("--out", help="Private key file to write (mode 0600); the public key "
                                                           "goes to OUT.pub.")]) -> None:
    """Make an Ed25519 key pair for signing bundles (edgeq quantize --sign-key, edgeq sign)."""
    from edgeq.deploy.signing import generate_keypair, key_id, load_public_keys

    priv, pub = run_guarded(lambda: generate_keypair(out))
    console.print(f"private key: {priv} (keep it secret)\npublic key:  {pub} (key id "
                  f"{key_id(load_public_keys(pub)[0])}): give it to the robots as a trusted key", highlight=False)


@app.command()
def sign(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
         key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (edgeq keygen).")]) -> None:
    """Sign BUNDLE's manifest (after checking every file's SHA-256) with KEY: writes manifest.sig."""
    from edgeq.deploy.bundle_format import read_manifest
    from edgeq.deploy.signing import sign_bundle

    def go() -> str:
        read_manifest(bundle, verify=True)
        return sign_bundle(bundle, key)

    kid = run_guarded(go)
    console.print(f"signed {bundle / 'manifest.json'} with key {kid}", highlight=False)
