"""``edgeq validate`` / ``edgeq compare`` on real Pendulum rollouts of the trained SAC fixture.

Known cases: a bundle whose "int8" model is the float model itself must give a paired difference of
exactly 0 and PASS (exit 0); one whose int8 model adds a constant to every action must FAIL (exit
1); a broken bundle is an error (exit 2); too few episodes to tell is INCONCLUSIVE (exit 3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import QUICK_OVERRIDES
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from edgeq.cli import app
from edgeq.deploy.bundle_format import MANIFEST, sha256_of

FAST = ["--episodes", "4", "--floor-draws", "2", "--no-sensitivity", "--latency-calls", "200", "--large-batch", "64",
        "--targets", "cpu", "--num-envs", "4"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, sac_pendulum: Path) -> Path:
    from edgeq.pipeline import quantize

    out = tmp_path_factory.mktemp("validate") / "bundle"
    # the CPU file's float layers by the width rule, not by timing (which depends on the machine's load)
    quantize(sac_pendulum, "Pendulum-v1", out, episodes=3, calib_episodes=4, num_envs=4,
             overrides={**QUICK_OVERRIDES, "export.cpu_layer_selection": "width"})
    return out


def _replace_model(src: Path, dst: Path, model: onnx.ModelProto) -> Path:
    """A copy of bundle ``src`` whose int8 model is ``model`` (manifest hashes refreshed).

    The CPU-specialized copy is dropped from the manifest so every target runs ``model``.
    """
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["models"].pop("int8-cpu", None)
    target = dst / manifest["models"]["int8"]
    target.write_bytes(model.SerializeToString())
    manifest["files"][target.name] = sha256_of(target)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def action_offset(model: onnx.ModelProto, offset: float) -> onnx.ModelProto:
    """``model`` with ``offset`` added to every action (a graph edit on the output)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0].name
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = f"{out}_before_offset"
    act_dim = m.graph.output[0].type.tensor_type.shape.dim[-1].dim_value or 1
    m.graph.initializer.append(numpy_helper.from_array(np.full(act_dim, offset, np.float32), "edgeq_test_offset"))
    m.graph.node.append(helper.make_node("Add", [f"{out}_before_offset", "edgeq_test_offset"], [out],
                                         name="edgeq_test_offset/Add"))
    onnx.checker.check_model(m)
    return m


def test_quantize_writes_verdict_floor_per_layer_and_reports(bundle: Path) -> None:
    val = json.loads((bundle / "validation.json").read_text())
    cpu = val["targets"]["cpu"]
    assert cpu["verdict"]["status"] in ("PASS", "FAIL", "INCONCLUSIVE") and val["verdict"]["exit_code"] in (0, 1, 3)
    # every figure names the files and the runtime that produced it
    assert cpu["float_model"] == "policy.fp32.onnx" and cpu["int8_model"] == "policy.int8.cpu.onnx"
    assert cpu["runtime"] == "onnxruntime-cpu" and cpu["verdict"]["files"]["int8"] == "policy.int8.cpu.onnx"
    assert cpu["episodes"]["episodes"] == 3 and cpu["episodes"]["design"]["mode"] == "fixed"
    assert cpu["outcomes"]["float"] == {"success": 0, "failure": 0, "timeout": 3}  # Pendulum only times out
    # the bundle records the decision
    decision = json.loads((bundle / MANIFEST).read_text())["decision"]
    assert decision["status"] == val["verdict"]["status"] and decision["procedure"]["mode"] == "fixed"
    assert decision["targets"]["cpu"]["int8_model"] == "policy.int8.cpu.onnx"
    assert decision["targets"]["cpu"]["episodes"] == 3 and decision["failure_rule"]["rule"] == "terminated"
    assert cpu["noise_floor"]["draws"] == 3 and len(cpu["noise_floor"]["returns"]) == 3
    assert "latency" not in cpu  # measured values live in measurements.json (unhashed), not validation.json
    measured = json.loads((bundle / "measurements.json").read_text())["targets"]["cpu"]
    assert measured["latency"]["models"]["int8"]["batch1"]["calls"] == 2000
    assert "sensitivity" not in val  # the light validation inside quantize
    pl = val["per_layer"]
    assert [r["fused"] for r in pl["layers"]] == ["Gemm+Relu", "Gemm+Relu", "Gemm+Tanh"]
    assert pl["plan_reproduces_model_max_abs"] == 0.0  # the manifest's plan rebuilds the int8 model exactly
    assert sum(r["share"] for r in pl["ranking"]) == pytest.approx(1.0)
    for name in ("report.html", "report.md", "report/returns.png", "report/per_layer.png"):
        assert (bundle / name).is_file(), name
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert "report.html" in manifest["unhashed"] and "report.html" not in manifest["files"]  # shows latency
    assert manifest["files"]["validation.json"] == sha256_of(bundle / "validation.json")


def test_identical_policies_differ_by_exactly_zero_and_pass(bundle: Path, tmp_path: Path) -> None:
    same = _replace_model(bundle, tmp_path / "same", onnx.load(str(bundle / "policy.fp32.onnx")))
    res = CliRunner().invoke(app, ["validate", str(same), *FAST, "--no-report"])
    assert res.exit_code == 0, res.output
    val = json.loads((same / "validation.json").read_text())
    cpu = val["targets"]["cpu"]
    assert cpu["paired_difference"]["per_episode"] == [0.0] * 4
    assert cpu["paired_difference"]["ci95"] == [0.0, 0.0]
    assert cpu["float"]["returns"] == cpu["int8"]["returns"]
    assert cpu["action_error"]["on_float_trajectory"]["max_abs"] == 0.0
    assert cpu["divergence"]["final_median"] == 0.0
    assert cpu["verdict"]["passed"] and not cpu["verdict"]["distinguishable_from_floor"]
    # no error at all: SQNR is infinite, written as null (strict JSON), relative error exactly 0
    assert all(r["sqnr_db"] is None and r["relative_error"] == 0.0 for r in val["per_layer"]["layers"])
    assert "PASS" in res.output and "exit code 0" in res.output
    assert "cpu, policy.fp32.onnx vs policy.int8.onnx: returns:" in " ".join(res.output.split())  # files behind it
    assert json.loads((same / MANIFEST).read_text())["decision"]["status"] == "PASS"
    # the removed "a CI containing 0 passes" rule: --ci-pass is refused, --no-ci-pass is a no-op with a warning
    res = CliRunner().invoke(app, ["validate", str(same), "--ci-pass"])
    assert res.exit_code == 2 and "--ci-pass was removed" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["validate", str(same), *FAST, "--no-ci-pass", "--no-report", "--no-per-layer",
                                   "--latency-calls", "0"])
    assert res.exit_code == 0 and "deprecated" in res.output
    # the bundle still verifies after validate rewrote validation.json
    assert CliRunner().invoke(app, ["info", str(same)]).exit_code == 0


def test_constant_action_offset_fails(bundle: Path, tmp_path: Path) -> None:
    bad = _replace_model(bundle, tmp_path / "offset", action_offset(onnx.load(str(bundle / "policy.fp32.onnx")), 1.5))
    res = CliRunner().invoke(app, ["validate", str(bad), *FAST, "--no-per-layer", "--no-report"])
    assert res.exit_code == 1, res.output
    val = json.loads((bad / "validation.json").read_text())
    cpu = val["targets"]["cpu"]
    d = cpu["paired_difference"]
    assert d["ci95"][1] < 0 and d["relative_mean"] < -0.01  # consistently worse by more than 1 %
    assert cpu["verdict"]["status"] == "FAIL" and cpu["verdict"]["distinguishable_from_floor"]
    # 1.5 added to every action the policy outputs (the env clips what it receives, not what we measure)
    err = cpu["action_error"]["on_float_trajectory"]
    assert err["max_abs"] == pytest.approx(1.5, abs=1e-5) and err["mean_abs"] == pytest.approx(1.5, abs=1e-5)
    assert "FAIL" in res.output
    # a looser tolerance turns it into a PASS: the exit code follows the user's tolerance
    loose = CliRunner().invoke(app, ["validate", str(bad), *FAST, "--no-per-layer", "--no-report", "--latency-calls",
                                     "0", "--rel-tol", "10"])
    assert loose.exit_code == 0, loose.output


def test_validate_defaults_to_episodes_auto(bundle: Path, tmp_path: Path) -> None:
    """No --episodes: the sequential loop (small caps here), its design and looks recorded."""
    out = tmp_path / "auto"
    res = CliRunner().invoke(app, ["validate", str(bundle), *FAST[2:], "--min-episodes", "10", "--max-episodes", "20",
                                   "--no-per-layer", "--latency-calls", "0", "--no-report", "--out", str(out)])
    assert res.exit_code in (0, 1, 3), res.output
    cpu = json.loads((out / "validation.json").read_text())["targets"]["cpu"]
    eps = cpu["episodes"]
    assert eps["design"]["mode"] == "auto" and eps["design"]["max_episodes"] == 20
    assert eps["episodes"] in (10, 20) and [x["episodes"] for x in eps["looks"]] == [10, 20][: len(eps["looks"])]
    assert cpu["verdict"]["status"] == eps["looks"][-1]["status"]
    assert "asymptotic confidence sequence" in cpu["verdict"]["returns"]["method"]


def test_validate_keeps_the_bundles_failure_rule(bundle: Path, tmp_path: Path) -> None:
    """The failure rule recorded in the manifest's decision applies on re-validation unless --failure overrides it."""
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["decision"]["failure_rule"] = {"rule": "reward<=-100"}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    args = ["validate", str(copy), *FAST[2:], "--episodes", "3", "--no-per-layer", "--latency-calls", "0",
            "--no-report", "--floor-draws", "0"]
    CliRunner().invoke(app, [*args, "--out", str(tmp_path / "kept")])
    kept = json.loads((tmp_path / "kept" / "validation.json").read_text())
    assert kept["options"]["failure"]["rule"] == "reward<=-100"
    assert kept["targets"]["cpu"]["verdict"]["failures"]["applies"]  # a declared predicate: failures possible
    CliRunner().invoke(app, [*args, "--failure", "none", "--out", str(tmp_path / "none")])
    none = json.loads((tmp_path / "none" / "validation.json").read_text())
    assert none["options"]["failure"]["rule"] == "none" and not none["targets"]["cpu"]["verdict"]["failures"]["applies"]


def test_too_few_episodes_exit_3_inconclusive(bundle: Path, tmp_path: Path) -> None:
    """With a zero-width band (--rel-tol 0) two episodes of the real quantized policy cannot show "no loss at all":
    the interval reaches below 0, and it is not wholly below it either."""
    out = tmp_path / "v"
    res = CliRunner().invoke(app, ["validate", str(bundle), *FAST[2:], "--episodes", "2", "--rel-tol", "0",
                                   "--no-per-layer", "--latency-calls", "0", "--no-report", "--out", str(out)])
    assert res.exit_code == 3, res.output
    v = json.loads((out / "validation.json").read_text())["targets"]["cpu"]["verdict"]
    lo, hi = v["returns"]["interval"]
    assert v["status"] == "INCONCLUSIVE" and lo < 0 < hi and v["returns"]["band_size"] == 0.0
    assert "INCONCLUSIVE is not a pass" in " ".join(res.output.split())


def test_errors_exit_2_and_unavailable_targets_are_reported(bundle: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "manifest.json" in res.output
    res = CliRunner().invoke(app, ["validate", str(bundle), "--targets", "tpu"])
    assert res.exit_code == 2 and "unknown target" in res.output
    res = CliRunner().invoke(app, ["validate", str(bundle), "--seeds", "3-1"])
    assert res.exit_code == 2 and "--seeds" in res.output
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res = CliRunner().invoke(app, ["validate", str(bundle), "--targets", "cuda"])
        assert res.exit_code == 2 and "none of the requested targets" in res.output
        out = tmp_path / "elsewhere"
        res = CliRunner().invoke(app, ["validate", str(bundle), *FAST[:-4], "--targets", "cpu,cuda", "--no-per-layer",
                                       "--out", str(out), "--no-report"])
        assert res.exit_code in (0, 1, 3), res.output
        val = json.loads((out / "validation.json").read_text())
        assert list(val["targets"]) == ["cpu"] and "cuda" in val["unavailable_targets"]


def test_full_validation_sensitivity_and_seeds(bundle: Path, tmp_path: Path) -> None:
    from edgeq.validate.validator import ValidationOptions, validate_bundle

    opts = ValidationOptions(targets=("cpu",), floor_draws=2, sensitivity_levels=(1e-3, 0.3, 1.0),
                             sensitivity_draws=2, latency_calls=300, latency_large_batch=128, num_envs=3)
    val, _ = validate_bundle(bundle, seeds=[5, 7, 11], options=opts)
    assert val["seeds"] == [5, 7, 11] and val["targets"]["cpu"]["float"]["seeds"] == [5, 7, 11]
    sens = val["sensitivity"]
    assert [r["sigma"] for r in sens["levels"]] == [1e-3, 0.3, 1.0]
    # full-scale action noise ruins Pendulum; tiny noise does not
    assert sens["levels"][2]["relative_drop"] > 0.05 > abs(sens["levels"][0]["relative_drop"])
    assert sens["budget_sigma"] is not None and 1e-3 < sens["budget_sigma"] <= 1.0
    assert sens["int8_normalized_rms"] == val["targets"]["cpu"]["action_error"]["on_float_trajectory"]["normalized_rms"]
    series = val["targets"]["cpu"]["action_error_series"]
    assert series["seed"] == 5 and len(series["abs_error"]) == 200


def test_compare_bundle_and_plain_onnx_from_another_tool(bundle: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            th = rng.uniform(-np.pi, np.pi, 256)
            obs = np.stack([np.cos(th), np.sin(th), rng.uniform(-8, 8, 256)], 1).astype(np.float32)
            self.batches = iter([{"obs": obs[i:i + 64]} for i in range(0, 256, 64)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    other = tmp_path / "ort_qdq.onnx"
    quantize_static(str(bundle / "policy.fp32.onnx"), str(other), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(bundle), str(other), "--names", "edgeq,ort", "--episodes", "3",
                                   "--floor-draws", "2", "--latency-calls", "100", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cmp = json.loads((out / "compare.json").read_text())
    assert list(cmp["candidates"]) == ["edgeq", "ort"]
    f = cmp["float"]["returns"]
    for r in cmp["candidates"].values():
        assert r["float"]["returns"] == f  # one reference, same seeds for every candidate
        assert len(r["int8"]["returns"]) == 3 and r["verdict"]["status"] in ("PASS", "FAIL", "INCONCLUSIVE")
    # the bundle's own validation (made with the plan object at quantize time) ranks every int8 layer;
    # re-validation ranks only plans the manifest fully describes (no input scalings / AdaRound)
    own = json.loads((bundle / "validation.json").read_text())
    assert own["per_layer"]["ranking"]
    assert cmp["candidates"]["edgeq"]["per_layer"]["layers"]
    assert cmp["candidates"]["ort"]["per_layer"]["ranking"] is None  # foreign model: SQNR only
    assert any(np.isfinite(r.get("sqnr_db", np.nan)) for r in cmp["candidates"]["ort"]["per_layer"]["layers"])
    assert set(cmp["latency"]["models"]) == {"float", "edgeq", "ort"}
    assert (out / "compare.html").is_file() and (out / "compare.md").is_file()
    res = CliRunner().invoke(app, ["compare", str(other), "--env", "Pendulum-v1"])
    assert res.exit_code == 2 and "--reference" in res.output
    # without any bundle: a plain float ONNX reference and a plain QDQ candidate
    res = CliRunner().invoke(app, ["compare", str(other), "--env", "Pendulum-v1", "--reference",
                                   str(bundle / "policy.fp32.onnx"), "--episodes", "2", "--floor-draws", "0",
                                   "--latency-calls", "0", "--no-per-layer", "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "plain" / "compare.json").read_text())
    assert plain["candidates"]["ort_qdq"]["int8"]["returns"] == cmp["candidates"]["ort"]["int8"]["returns"][:2]


def test_success_rate_from_env_info(bundle: Path) -> None:
    import gymnasium as gym

    from edgeq.validate.validator import ValidationOptions, validate_models

    class Upright(gym.Wrapper):
        """Pendulum that reports success when the pole is up (cos θ > 0.95) at a step."""

        def step(self, action):  # type: ignore[no-untyped-def]
            obs, reward, term, trunc, info = self.env.step(action)
            return obs, reward, term, trunc, {**info, "is_success": bool(obs[0] > 0.95)}

    opts = ValidationOptions(targets=("cpu",), floor_draws=0, sensitivity=False, per_layer=False, latency_calls=0,
                             num_envs=3)
    val = validate_models(bundle / "policy.fp32.onnx", bundle / "policy.int8.onnx", {},
                          lambda: Upright(gym.make("Pendulum-v1")), [0, 1, 2], env_id="Pendulum-v1",
                          action_low=np.array([-2.0]), action_high=np.array([2.0]), options=opts)
    term = val["targets"]["cpu"]["termination"]
    assert term["float_success_rate"] == 1.0  # the trained SAC swings up and holds on every seed
    assert 0.0 <= term["int8_success_rate"] <= 1.0 and term["float_rate"] == 0.0


def test_revalidation_ranks_layers_of_a_crossquant_bundle(sac_pendulum: Path, tmp_path: Path) -> None:
    """The manifest stores the input scalings' factors, so ``edgeq validate`` rebuilds the plan and
    ranks the layers one at a time for a bundle made with CrossQuant on every layer."""
    from edgeq.config import QuantizeConfig
    from edgeq.pipeline import quantize

    config = QuantizeConfig.from_recipe(None, env="Pendulum-v1").with_overrides(
        {"quantization.auto": False, "quantization.transform": "crossquant", "quantization.transform_layers": "all",
         "quantization.alpha": 0.15, "quantization.fp16_fallback": 0})
    out = tmp_path / "bundle"
    quantize(sac_pendulum, "Pendulum-v1", out, config, episodes=2, calib_episodes=4, num_envs=4)
    quant = json.loads((out / MANIFEST).read_text())["quantization"]
    assert len(quant["transforms"]) == 3 and all(len(t["factors"]) > 0 for t in quant["transforms"])
    res = CliRunner().invoke(app, ["validate", str(out), *FAST, "--no-report", "--json"])
    assert res.exit_code in (0, 1, 3), res.output
    pl = json.loads((out / "validation.json").read_text())["per_layer"]
    assert pl["plan_reproduces_model_max_abs"] == 0.0
    assert len(pl["ranking"]) == 3 and sum(r["share"] for r in pl["ranking"]) == pytest.approx(1.0)


def test_plan_rebuild_takes_rounding_and_corrected_bias_from_the_int8_model(sac_pendulum: Path) -> None:
    """AdaRound's rounding and bias correction cannot be recomputed from the manifest: the rebuilt plan
    takes the stored int8 weights and corrected biases, and reproduces the INT8 model exactly."""
    import dataclasses

    from edgeq.calibration.collect import calibrate_observations
    from edgeq.deploy.runtime import OrtPolicy
    from edgeq.export.qdq import apply_plan
    from edgeq.graph.analysis import constant_value
    from edgeq.ingest.sb3 import load_sb3
    from edgeq.quantizers.build import QuantOptions, build_plan
    from edgeq.quantizers.weights import QuantizedWeight
    from edgeq.validate.layers import plan_from_manifest

    policy = load_sb3(sac_pendulum)
    obs = np.random.default_rng(5).uniform([-1, -1, -8], [1, 1, 8], (1024, 3)).astype(np.float32)
    plan = build_plan(policy.model, calibrate_observations(policy, obs[:512]),
                      QuantOptions(transform="crossquant", alpha=0.15), lower=apply_plan)
    # what AdaRound and bias correction leave behind: weights rounded the other way, a shifted bias
    mid = plan.layers[1]
    assert mid.weight is not None
    q = mid.weight.q.copy()
    flip = np.random.default_rng(6).random(q.shape) < 0.2
    q[flip] = np.clip(q[flip].astype(np.int16) + np.where(q[flip] >= 0, -1, 1), -127, 127).astype(np.int8)
    bias = np.asarray(constant_value(policy.model, "actor.latent_pi.2.bias"), np.float32) + 0.01
    plan.layers[1] = dataclasses.replace(mid, weight=QuantizedWeight(q, mid.weight.scale, mid.weight.axis),
                                         rounding="adaround", bias=bias)
    int8_model = apply_plan(policy.model, plan)
    quant = json.loads(json.dumps(plan.to_json()))
    with pytest.raises(ValueError, match="needs the bundle's INT8 model"):
        plan_from_manifest(policy.model, quant)
    rebuilt = plan_from_manifest(policy.model, quant, int8_model)
    np.testing.assert_array_equal(rebuilt.layers[1].weight.q, q)
    np.testing.assert_array_equal(OrtPolicy(apply_plan(policy.model, rebuilt).SerializeToString()).act(obs),
                                  OrtPolicy(int8_model.SerializeToString()).act(obs))
