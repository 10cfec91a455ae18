"""History-policy fixtures through the whole pipeline: bundle with io.history, deploy keeps the window,
every matrix product INT8 (attention's Q·Kᵀ and A·V included), edgeq check clean, verdict PASS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import QUICK_MEASURE, QUICK_OVERRIDES, QUICK_PLAN

import edgeq
import edgeq.deploy
from edgeq.deploy.history import episode_windows
from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import EdgeqError
from edgeq.export.trt_rules import check_qdq_model

FIXTURES = Path(__file__).parent / "fixtures" / "policies"
FRAMESTACK = FIXTURES / "framestack-mlp-pendulum.onnx"
TRANSFORMER = FIXTURES / "transformer-pendulum.onnx"
ENCODER, BODY = FIXTURES / "encoder-pendulum.onnx", FIXTURES / "body-pendulum.onnx"
QUICK = {"episodes": 4, "holdout_episodes": 2, "auto": False}


def _matrix_products_int8(path: Path) -> tuple[int, list[str]]:
    """How many MatMul/Gemm/Conv the INT8 QDQ file has, and those whose inputs are not all dequantized."""
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    products = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    float_ones = [n.name for n in products
                  if not all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                             for i in n.input[:2])]
    return len(products), float_ones


def test_transformer_fixture_is_a_causal_attention_policy() -> None:
    from edgeq.graph.analysis import find_activation_matmuls
    from edgeq.ingest import load_policy

    fp = load_policy(TRANSFORMER)
    assert fp.history is not None and (fp.history.length, fp.history.obs_dim) == (8, 3)
    roles = sorted(a.role for a in find_activation_matmuls(fp.model))
    assert roles == ["attention-scores"] * 2 + ["attention-values"] * 2  # 2 blocks
    ops = {n.op_type for n in fp.model.graph.node}
    assert {"Softmax", "LayerNormalization", "Erf"} <= ops  # GELU exported as x·Φ(x) with Erf
    assert len(fp.source.details["normalization"]["attention_scales_moved"]) == 2
    record = json.loads((FIXTURES / "transformer-pendulum.json").read_text())
    assert record["eval"]["mean_return"] > -250  # Pendulum: a random policy scores about -1200


#: Float return a competent policy reaches (Pendulum: a random policy scores about -1200; the SAC expert
#: -109 ± 65; HalfCheetah: the SAC expert 6718 ± 72).
COMPETENT = {"Pendulum-v1": -250.0, "HalfCheetah-v5": 6000.0}


HISTORY_RECORDS = sorted(p for p in FIXTURES.glob("*.json")
                         if isinstance(json.loads(p.read_text()).get("history"), dict))


def test_every_history_fixture_has_a_record() -> None:
    assert {p.stem for p in HISTORY_RECORDS} >= {"framestack-mlp-pendulum", "transformer-pendulum",
                                                 "encoder-body-pendulum"}


@pytest.mark.parametrize("record", HISTORY_RECORDS, ids=lambda p: p.stem)
def test_history_fixture_records_a_competent_float_return(record: Path) -> None:
    d = json.loads(record.read_text())
    assert all((FIXTURES / f).is_file() for f in d["files"])
    ev = d["eval"]
    assert ev["episodes"] == len(ev["returns"]) >= 10
    assert ev["mean_return"] == pytest.approx(float(np.mean(ev["returns"])), abs=1e-2)
    assert ev["mean_return"] > COMPETENT[d["env_id"]], (record.name, ev["mean_return"])
    # ONNX fixtures: the file vs the trained torch module; TorchScript twins: the .pt vs the ONNX file
    assert d.get("onnx_vs_torch_max_abs_diff", d.get("torchscript_vs_onnx_max_abs_diff")) < 1e-4


def test_framestack_bundle_carries_history_and_deploy_keeps_the_window(tmp_path: Path) -> None:
    out = tmp_path / "b"
    # a frame stack trained with the first observation repeated at episode starts (the same architecture)
    res = edgeq.quantize(FIXTURES / "framestack-mlp-firstobs-pendulum.onnx", "Pendulum-v1", out, episodes=2,
                         recipe_overrides=QUICK, history_reset="first-observation")
    io = res.manifest["io"]
    assert io["history"] == {"input": "obs", "length": 8, "obs_dim": 3, "reset": "first-observation",
                             "layout": "oldest-first, flattened [batch, length * obs_dim]"}
    assert res.manifest["observation_space"]["shape"] == [3]
    n, not_int8 = _matrix_products_int8(out / "policy.int8.onnx")
    fp16 = [la["node"] for la in res.manifest["quantization"]["layers"] if la["precision"] == "fp16"]
    assert n == 3 and sorted(not_int8) == sorted(fp16)  # the fp16 fallback's layers, and no other
    policy = edgeq.deploy.load(out, backend="cpu", precision="fp32", allow_unsigned=True)
    raw = OrtPolicy(out / "policy.fp32.onnx")
    obs = np.random.default_rng(0).uniform(-1, 1, (12, 3)).astype(np.float32)
    got = np.stack([policy.act(o) for o in obs])
    first = "first-observation"  # the window starts as 8 copies of the episode's first observation
    np.testing.assert_allclose(got, raw.act(episode_windows(obs, 8, first)), rtol=1e-5, atol=1e-6)
    policy.reset()
    np.testing.assert_allclose(policy.act(obs[3]), raw.act(episode_windows(obs[3:4], 8, first))[0], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(EdgeqError, match="history-reset"):
        edgeq.quantize(FIXTURES / "sac-pendulum.zip", "Pendulum-v1", tmp_path / "c", history_reset="first-observation")
    with pytest.raises(EdgeqError, match="first-observation"):
        edgeq.quantize(FRAMESTACK, "Pendulum-v1", tmp_path / "d", history_reset="ones")


#: The whole pipeline on each history fixture at test cost: a short calibration (2 episodes for
#: HalfCheetah, 4 for Pendulum, 1 held out), no per-layer search and no fp16 fallback (the search is
#: tested on the Transformer by test_per_layer_search_also_chooses_the_attention_calibrators), a fixed
#: number of paired validation episodes and no report. The full check, "PASS with the defaults"
#: (``--episodes auto``, the per-layer search, 30-90 paired episodes, 2-4 minutes each on 2 cores), is
#: the benchmark benchmarks/results/history.md (commands there), not a timed test.
CHEAP = {"Pendulum-v1": {"episodes": 10, "calib": 4}, "HalfCheetah-v5": {"episodes": 3, "calib": 2}}


@pytest.mark.slow
@pytest.mark.parametrize(("files", "env"), [
    ([FRAMESTACK], "Pendulum-v1"), ([TRANSFORMER], "Pendulum-v1"), ([ENCODER, BODY], "Pendulum-v1"),
    ([FIXTURES / "framestack-mlp-halfcheetah.onnx"], "HalfCheetah-v5"),
    ([FIXTURES / "transformer-halfcheetah.onnx"], "HalfCheetah-v5"),
    ([FIXTURES / "encoder-halfcheetah.onnx", FIXTURES / "body-halfcheetah.onnx"], "HalfCheetah-v5")],
    ids=["framestack", "transformer", "encoder-body", "framestack-halfcheetah", "transformer-halfcheetah",
         "encoder-body-halfcheetah"])
def test_history_fixture_runs_int8_and_keeps_its_return(tmp_path: Path, files: list[Path], env: str) -> None:
    """Every matrix product INT8 (attention's included), ``edgeq check`` clean, and the INT8 return within 3%
    of float on the same seeds (not FAIL). A cheaper property than the benchmark's PASS with the defaults
    (benchmarks/results/history.md), which it does not replace: it fails when quantization breaks the
    policy, not when a 1% band is missed."""
    from edgeq.validate.validator import ValidationOptions

    out = tmp_path / "b"
    cheap = CHEAP[env]
    res = edgeq.quantize(files[0] if len(files) == 1 else files, env, out, episodes=cheap["episodes"], report=False,
                         recipe_overrides={"episodes": cheap["calib"], "holdout_episodes": 1, "auto": False,
                                           "fp16_fallback": 0},
                         validation=ValidationOptions.light(floor_draws=1, per_layer=False, latency_calls=200),
                         overrides={**QUICK_OVERRIDES, "export.cpu_layer_selection": "width"})
    cpu = res.validation["targets"]["cpu"]
    f, q = np.array(cpu["float"]["returns"]), np.array(cpu["int8"]["returns"])
    assert len(f) == len(q) == cheap["episodes"]
    assert f.mean() > COMPETENT[env], f.mean()
    assert q.mean() >= f.mean() - 0.03 * abs(f.mean()), (f.mean(), q.mean())
    assert res.validation["verdict"]["status"] != "FAIL", res.validation["verdict"]
    n, float_products = _matrix_products_int8(out / "policy.int8.onnx")
    assert n > 0 and float_products == []
    assert not [v for v in check_qdq_model(out / "policy.int8.onnx")]
    plan = res.manifest["quantization"]
    assert all(m["precision"] == "int8" for m in plan.get("activation_matmuls", []))


def test_per_layer_ranking_shows_attention_products_and_blocks() -> None:
    from edgeq.calibration.collect import observe_states
    from edgeq.export.qdq import apply_plan
    from edgeq.ingest import load_policy
    from edgeq.quantizers.plan import make_plan
    from edgeq.validate.layers import per_layer_error

    fp = load_policy(TRANSFORMER)
    assert fp.history is not None
    rng = np.random.default_rng(0)
    th = rng.uniform(-np.pi, np.pi, (3, 40))
    episodes = [np.stack([np.cos(t), np.sin(t), rng.uniform(-4, 4, 40)], -1).astype(np.float32) for t in th]
    windows = np.concatenate([episode_windows(ep, 8) for ep in episodes])
    plan = make_plan(fp.model, observe_states(fp.model, windows), calibrator="max")
    assert len(plan.int8_matmuls()) == 4 and len(plan.int8_layers()) == 14
    io = {"input": "obs", "output": "actions", "state": [], "history": fp.history.to_json()}
    res = per_layer_error(fp.model, apply_plan(fp.model, plan), io, episodes, plan=plan)
    roles = sorted(r["role"] for r in res["ranking"])
    assert roles.count("attention-scores") == 2 and roles.count("attention-values") == 2
    assert sum(r["share"] for r in res["ranking"]) == pytest.approx(1.0)
    blocks = {b["block"]: b for b in res["ranking_by_block"]}
    attn = blocks["/inner/blocks/blocks.0/attn"]
    assert len(attn["units"]) == 6  # q, k, v, o projections and the two products
    assert res["plan_reproduces_model_max_abs"] < 1e-5


def test_per_layer_search_also_chooses_the_attention_calibrators() -> None:
    from edgeq.calibration.collect import CalibrationStats, observe_states
    from edgeq.export.qdq import apply_plan
    from edgeq.ingest import load_policy
    from edgeq.quantizers.build import QuantOptions, build_plan

    fp = load_policy(TRANSFORMER)
    rng = np.random.default_rng(1)

    def windows(n: int) -> np.ndarray:
        th = rng.uniform(-np.pi, np.pi, (n, 30))
        eps = [np.stack([np.cos(t), np.sin(t), rng.uniform(-4, 4, 30)], -1).astype(np.float32) for t in th]
        return np.concatenate([episode_windows(ep, 8) for ep in eps])

    calib, held = windows(4), windows(2)
    stats = CalibrationStats(observe_states(fp.model, calib), calib, None, len(calib), 0.0, {}, held)
    opts = QuantOptions(auto=True, auto_calibrators=[("max", {}), ("percentile", {"percentile": 99.9})],
                        auto_transforms=[("none", None)], auto_weight_methods=[])
    plan = build_plan(fp.model, stats, opts, lower=apply_plan, half_range=np.array([2.0]))
    search = plan.metrics["activation_matmul_search"]
    assert sorted(search) == sorted(m.node for m in plan.matmuls) and len(search) == 4
    assert all(m.precision == "int8" and "searched" in m.reason for m in plan.matmuls)
    assert {t for m in plan.matmuls for t in m.inputs} <= set(plan.activations)


def test_cli_takes_an_encoder_and_a_body_and_refuses_bad_history_input(tmp_path: Path) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "edgeq.cli", "quantize"]
    out = tmp_path / "b"
    res = subprocess.run([*cli, "--policy", str(ENCODER), "--policy", str(BODY), "--env", "Pendulum-v1", "--out",
                          str(out), "--episodes", "2", "--calib-episodes", "4", "--no-auto", "--json", *QUICK_PLAN,
                          *QUICK_MEASURE, "--set", "export.cpu_layer_selection=width"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["io"]["history"]["length"] == 8 and manifest["io"]["history"]["reset"] == "zeros"
    assert [Path(m["path"]).name for m in manifest["source"]["details"]["modules"]] == [ENCODER.name, BODY.name]
    assert manifest["source"]["details"]["normalization"]["lowered_convs"]  # the two Conv1d, as MatMuls
    for bad, needle in ((["--history", "5"], "holds 8"), ([], "--policy FILE")):
        args = [str(TRANSFORMER)] if bad else []
        res = subprocess.run([*cli, *args, *bad, "--env", "Pendulum-v1", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and needle in res.stderr, res.stderr
        assert not (tmp_path / "x").exists()
