"""``edgeq validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeq.commands._app import app, print_summary, run_guarded


@app.command()
def validate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory made by 'edgeq quantize'.")],
    episodes: Annotated[int, typer.Option(help="Paired episodes.")] = 10,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    targets: Annotated[str, typer.Option(help="Comma-separated targets: cpu,cuda.")] = "cpu",
    num_envs: Annotated[int, typer.Option(help="Environments stepped in parallel.")] = 8,
) -> None:
    """Roll a bundle's float and int8 policies out on the same seeds and print the comparison."""
    from edgeq.deploy.bundle_format import model_for, read_manifest
    from edgeq.envs import env_factory
    from edgeq.errors import EdgeqError
    from edgeq.validate.targets import validate_target

    def go() -> tuple[dict[str, Any], dict[str, Any]]:
        manifest = read_manifest(bundle)
        if not manifest.get("env"):
            raise EdgeqError(f"{bundle}: this bundle was calibrated from logged observations without an environment; "
                             "closed-loop validation needs one (quantize again with --env)")
        env_id = manifest["env"]["id"]
        make_env = env_factory(env_id, manifest["env"].get("kwargs"))
        seeds = list(range(seed, seed + episodes))
        res: dict[str, Any] = {"env_id": env_id, "seeds": seeds, "targets": {}}
        for t in targets.split(","):
            res["targets"][t] = validate_target(
                t, bundle / manifest["models"]["fp32"], bundle / model_for(manifest, "int8", t), manifest["io"],
                make_env, seeds, act_dim=int(manifest["action_space"]["shape"][0]), num_envs=num_envs)
        return res, manifest

    res, manifest = run_guarded(go)
    print_summary(res, manifest)
