"""``edgeq validate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeq.commands._app import app, console, print_summary, run_guarded


@app.command()
def validate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory made by 'edgeq quantize'.")],
    episodes: Annotated[int, typer.Option(help="Paired episodes.")] = 10,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    targets: Annotated[str, typer.Option(help="Comma-separated targets: cpu, cuda (TensorRT if installed, "
                                              "else ONNX Runtime's CUDA EP), trt.")] = "cpu",
    num_envs: Annotated[int, typer.Option(help="Environments stepped in parallel.")] = 8,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of the table.")
                        ] = False,
) -> None:
    """Roll a bundle's float and int8 policies out on the same seeds and print the comparison."""
    from edgeq.deploy.bundle_format import model_for, read_manifest
    from edgeq.envs import env_factory
    from edgeq.validate.targets import validate_target

    def go() -> tuple[dict[str, Any], dict[str, Any]]:
        manifest = read_manifest(bundle)
        env_id = manifest["env"]["id"]
        make_env = env_factory(env_id, manifest["env"].get("kwargs"))
        seeds = list(range(seed, seed + episodes))
        res: dict[str, Any] = {"env_id": env_id, "seeds": seeds, "targets": {}}
        models = manifest["models"]
        cuda_int8 = bundle / models["int8-cuda"] if "int8-cuda" in models else None
        for t in targets.split(","):
            # cpu runs its specialized copy; cuda/trt get the portable QDQ file (TensorRT builds from it)
            int8 = model_for(manifest, "int8", t) if t == "cpu" else models["int8"]
            res["targets"][t] = validate_target(
                t, bundle / models["fp32"], bundle / int8, manifest["io"], make_env, seeds,
                act_dim=int(manifest["action_space"]["shape"][0]), num_envs=num_envs, cuda_int8_model=cuda_int8)
        return res, manifest

    res, manifest = run_guarded(go)
    if json_out:
        console.print_json(json.dumps(res))
    else:
        print_summary(res, manifest)
