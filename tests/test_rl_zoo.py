"""RL Zoo run folders read whole: archive, vecnormalize.pkl, config.yml / args.yml (never executed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_MEASURE, QUICK_PLAN

from edgeq.envs import WrapperSpec, env_factory, resolve_env_id
from edgeq.errors import EdgeqError
from edgeq.ingest.rl_zoo import PythonTag, find_zoo_run, is_zoo_folder, literal_expression, load_zoo_yaml, read_zoo_run

ZOO = Path(__file__).parent / "fixtures" / "zoo" / "logs"
RUN = ZOO / "sac" / "Pendulum-v1_1"
EDGEQ = [sys.executable, "-m", "edgeq.cli"]
TIME_FEATURE = "sb3_contrib.common.wrappers.TimeFeatureWrapper"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEQ, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_fixture_is_laid_out_as_rl_zoo() -> None:
    # rl_zoo3 ExperimentManager: logs/ALGO/ENV_ID_EXPID/ENV_ID.zip + ENV_ID/{config,args}.yml, vecnormalize.pkl
    assert (RUN / "Pendulum-v1.zip").is_file()
    assert {p.name for p in (RUN / "Pendulum-v1").iterdir()} == {"config.yml", "args.yml", "vecnormalize.pkl"}
    assert (RUN / "Pendulum-v1" / "config.yml").read_text().startswith("!!python/object/apply:collections.OrderedDict")
    assert is_zoo_folder(RUN) and not is_zoo_folder(ZOO / "sac")


def test_yaml_tags_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "config.yml"
    evil.write_text(f"""!!python/object/apply:collections.OrderedDict
- - - env_wrapper
    - !!python/object/apply:os.system ["touch {marker}"]
  - - policy_kwargs
    - !!python/name:builtins.print
  - - env
    - !!python/object/new:huggingface_sb3.naming_schemes.EnvironmentName
      - HalfCheetah-v3
  - - train_freq
    - !!python/tuple [1, step]
""")
    data = load_zoo_yaml(evil)
    assert not marker.exists()
    assert isinstance(data["env_wrapper"], PythonTag) and data["env_wrapper"].tag == "object/apply:os.system"
    assert isinstance(data["policy_kwargs"], PythonTag)
    assert data["env"] == "HalfCheetah-v3" and data["train_freq"] == (1, "step")


def test_python_expression_strings_read_as_literals() -> None:
    assert literal_expression("dict(norm_obs=True, norm_reward=False)", "x") == {"norm_obs": True,
                                                                                  "norm_reward": False}
    assert literal_expression("dict(net_arch=[64, 64], activation_fn=nn.ReLU)", "x") == {
        "net_arch": [64, 64], "activation_fn": "nn.ReLU"}
    with pytest.raises(EdgeqError, match="not a literal"):
        literal_expression("__import__('os').system('true')", "config.yml normalize")


def test_read_zoo_run() -> None:
    run = read_zoo_run(RUN)
    assert run.archive == RUN / "Pendulum-v1.zip" and run.env_id == "Pendulum-v1"
    assert run.vecnormalize == RUN / "Pendulum-v1" / "vecnormalize.pkl"
    assert run.wrappers == [WrapperSpec(TIME_FEATURE)]
    assert run.normalize == {"norm_obs": True, "norm_reward": False} and run.frame_stack == 0
    assert find_zoo_run(ZOO, "sac", "Pendulum-v1", 0) == RUN == find_zoo_run(ZOO, "sac", "Pendulum-v1", 1)
    with pytest.raises(EdgeqError, match="--exp-id"):
        find_zoo_run(ZOO, "sac", "Pendulum-v1", 7)


def test_missing_vecnormalize_names_the_fix(tmp_path: Path) -> None:
    run = tmp_path / "Pendulum-v1_1"
    shutil.copytree(RUN, run)
    (run / "Pendulum-v1" / "vecnormalize.pkl").unlink()
    with pytest.raises(EdgeqError, match="vecnormalize.pkl is missing; copy it"):
        read_zoo_run(run)


def test_old_ids_map_by_observation_shape() -> None:
    # HalfCheetah-v3 needs mujoco-py: the newest version with 17 observations is v5
    env, note = resolve_env_id("HalfCheetah-v3", (17,))
    assert env == "HalfCheetah-v5" and "mujoco-py" in note and "(17,)" in note
    # Ant-v3 had 111 observations (contact forces); neither v5 (105) nor v4 (27) has that layout
    with pytest.raises(EdgeqError, match=r"Ant-v5 gives \(105,\); Ant-v4 gives \(27,\)"):
        resolve_env_id("Ant-v3", (111,))
    # with the time feature the env gives 4 observations, as the fixture's policy expects
    assert resolve_env_id("Pendulum-v0", (4,), wrappers=[WrapperSpec(TIME_FEATURE)])[0] == "Pendulum-v1"
    assert resolve_env_id("Pendulum-v1", (4,)) == ("Pendulum-v1", None)


def test_frame_stack_pads_and_orders_like_vecframestack() -> None:
    make = env_factory("Pendulum-v1", frame_stack=3, frame_pad=[10.0, 20.0, 30.0])
    env = make()
    obs0, _ = env.reset(seed=0)
    assert obs0.shape == (9,)
    np.testing.assert_array_equal(obs0[:6], [10, 20, 30, 10, 20, 30])
    obs1, *_ = env.step(np.zeros(1, np.float32))
    np.testing.assert_array_equal(obs1[3:6], obs0[6:])  # oldest first, newest last
    np.testing.assert_array_equal(obs1[:3], [10, 20, 30])


def test_frame_stack_normalization_is_tiled(tmp_path: Path) -> None:
    from edgeq.ingest.sb3 import load_sb3
    from edgeq.ingest.vecnormalize import read_vecnormalize

    vn = RUN / "Pendulum-v1" / "vecnormalize.pkl"
    norm = read_vecnormalize(vn)
    assert norm is not None and norm.mean.shape == (4,)
    fp = load_sb3(RUN / "Pendulum-v1.zip", vecnormalize=vn)
    assert fp.preprocess["normalize"]["features"] == 4 and "frame_stack" not in fp.preprocess["normalize"]


@pytest.fixture(scope="module")
def zoo_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("zoo") / "bundle"
    res = run_cli("quantize", str(RUN) + "/", "--out", str(out), "--episodes", "4", *QUICK_PLAN, *QUICK_MEASURE)
    assert res.returncode == 0, res.stderr
    return out, res


def test_quantize_zoo_folder_whole(zoo_bundle: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, res = zoo_bundle
    m = json.loads((out / "manifest.json").read_text())
    assert m["env"] == {"id": "Pendulum-v1", "kwargs": {}, "wrappers": [{"class": TIME_FEATURE, "kwargs": {}}]}
    assert m["preprocess"]["normalize"]["source"].endswith("Pendulum-v1/vecnormalize.pkl")
    assert m["observation_space"]["shape"] == [4]
    zoo = m["source"]["details"]["rl_zoo"]
    assert zoo["files"] == ["args.yml", "config.yml", "vecnormalize.pkl"]
    assert zoo["normalize"] == {"norm_obs": True, "norm_reward": False}
    # the summary says what was loaded
    assert "vecnormalize.pkl" in res.stdout and "TimeFeatureWrapper" in res.stdout
    v = json.loads((out / "validation.json").read_text())
    assert v["verdict"]["passed"] is True
    # validate rebuilds the same wrapped env from the manifest
    again = run_cli("validate", str(out), "--quick", "--episodes", "2", "--targets", "cpu", "--out",
                    str(out.parent / "v"), "-q", "--no-per-layer", "--latency-calls", "0", "--no-report")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("verdict: PASS")


@pytest.mark.slow
def test_rl_zoo_flags_and_old_id(tmp_path: Path) -> None:
    # rl_zoo3's own flags; args.yml says Pendulum-v0, which gymnasium no longer registers
    run = tmp_path / "logs" / "sac" / "Pendulum-v0_3"
    shutil.copytree(RUN, run)
    (run / "Pendulum-v1.zip").rename(run / "Pendulum-v0.zip")
    (run / "Pendulum-v1").rename(run / "Pendulum-v0")
    args = run / "Pendulum-v0" / "args.yml"
    args.write_text(args.read_text().replace("Pendulum-v1", "Pendulum-v0"))
    out = tmp_path / "b"
    res = run_cli("quantize", "-f", "logs", "--algo", "sac", "--env", "Pendulum-v0", "--exp-id", "0", "--out", str(out),
                  "--episodes", "2", "--calib-episodes", "2", "--no-auto", "-q", *QUICK_PLAN, *QUICK_MEASURE,
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    env = json.loads((out / "manifest.json").read_text())["env"]
    assert env["id"] == "Pendulum-v1" and env["trained_on"] == "Pendulum-v0"
    assert "same observation shape (4,)" in env["note"]
