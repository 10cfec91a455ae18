"""The precision search under a return budget (edgeq.search) on the SAC Pendulum fixture, with few episodes."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from edgeq.deploy.bundle_format import read_manifest
from edgeq.export.qdq import apply_plan
from edgeq.quantizers.plan import QuantPlan


@pytest.fixture(scope="module")
def base_bundle(sac_pendulum: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataclasses import replace

    from edgeq.config import load_profile
    from edgeq.pipeline import quantize
    from edgeq.validate.validator import ValidationOptions

    out = tmp_path_factory.mktemp("search") / "bundle"
    quantize(sac_pendulum, "Pendulum-v1", out, episodes=4, seed=3, report=False,
             recipe_overrides={"episodes": 4, "auto": False},
             profile=replace(load_profile("cpu-ort"), cpu_layer_selection="width"),
             validation=ValidationOptions.light(floor_draws=0, per_layer=False, latency_calls=0))
    return out


def test_search_returns_a_passing_candidate_smaller_than_int8_and_saves_it(base_bundle: Path, tmp_path: Path) -> None:
    from edgeq.search import search

    out = tmp_path / "s"
    res = search(base_bundle, out, max_loss=0.05, episodes=10, fp16_layers=0, state_episodes=2, max_states=1500,
                 latency_calls=50)
    assert res.status == "PASS" and res.exit_code == 0 and res.best is not None
    rows = {r["name"]: r for r in res.rows}
    assert rows["W4A8"]["file_bytes"] < rows["W8A8"]["file_bytes"]
    assert res.best["verdict"] == "PASS" and res.best["file_bytes"] < rows["W8A8"]["file_bytes"]
    # validated in size order and stopped at the first confirmed PASS: every smaller candidate was validated and
    # did not PASS, or did not PASS again on the confirmation seeds
    assert res.best["confirmation"]["verdict"] == "PASS" and res.best["confirmation"]["seeds"][0] == 100_000
    smaller = [r for r in res.rows if r["file_bytes"] < res.best["file_bytes"]]
    assert all(r["verdict"] in ("FAIL", "INCONCLUSIVE") or r["confirmation"]["verdict"] != "PASS" for r in smaller)
    assert all(r["verdict"] == "NOT RUN" for r in res.rows if r["file_bytes"] > res.best["file_bytes"])
    best = out / "best"
    m = read_manifest(best)  # every SHA-256 verifies
    assert m["decision"]["status"] == "PASS"
    mp = m["mixed_precision"]
    assert mp["candidate"] == res.best["name"]
    precisions = {row["layer"]: row["precision"] for row in mp["layers"]}
    assert precisions == res.best["precisions"] and "int4" in precisions.values()
    assert {la["node"]: la["precision"] for la in m["quantization"]["layers"]} == precisions
    # the plan rebuilds the portable file byte for byte; the CPU file runs int4 layers as MatMulNBits
    plan = QuantPlan.from_bundle(best)
    q = apply_plan(onnx.load(str(best / "policy.fp32.onnx")), plan)
    assert q.SerializeToString(deterministic=True) == (best / "policy.int8.onnx").read_bytes()
    cpu_ops = [n.op_type for n in onnx.load(str(best / "policy.int8.cpu.onnx")).graph.node]
    assert cpu_ops.count("MatMulNBits") == list(precisions.values()).count("int4")
    assert (best / "policy.w4.trt.onnx").is_file() and m["tensorrt_qdq_check"]["errors"] > 0  # W4A8 is not TRT's
    # what each shipped file computes, read from the files: int4 layers W4A8, none called int8
    from edgeq.describe import precision_counts

    fp = m["file_precision"]["policy.int8.cpu.onnx"]["layers"]
    assert sorted(r["status"] for r in fp) == sorted("w4a8" if p == "int4" else p for p in precisions.values())
    assert "W4A8" in precision_counts(m)
    record = json.loads((out / "search.json").read_text())
    assert record["status"] == "PASS" and len(record["candidates"]) == len(res.rows)


def test_search_rejects_bad_options(base_bundle: Path, tmp_path: Path) -> None:
    from edgeq.commands.search import parse_loss
    from edgeq.errors import EdgeqError
    from edgeq.search import search

    assert parse_loss("1%") == pytest.approx(0.01) and parse_loss("0.02") == pytest.approx(0.02)
    for bad in ("abc", "0%", "150%"):
        with pytest.raises(EdgeqError):
            parse_loss(bad)
    with pytest.raises(EdgeqError, match="objective"):
        search(base_bundle, tmp_path / "x", objective="speed")


def test_latency_objective_validates_fastest_first(base_bundle: Path, tmp_path: Path) -> None:
    from edgeq.search import search

    res = search(base_bundle, tmp_path / "lat", objective="latency", max_loss=0.05, episodes=10, fp16_layers=0,
                 state_episodes=2, max_states=1500, latency_calls=50)
    lat = [r["latency_us"]["batch1_median"] for r in res.rows]
    assert lat == sorted(lat)  # candidates in the order they were validated
    assert res.best is not None and res.best["verdict"] == "PASS"
    # the first candidate (fastest first) that PASSed and PASSed again on the confirmation seeds
    accepted = next(r for r in res.rows if r["verdict"] == "PASS" and r["confirmation"]["verdict"] == "PASS")
    assert accepted is res.best and res.best.get("accepted")


def test_cli_search_says_when_nothing_passes_and_saves_nothing(base_bundle: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from edgeq.cli import main

    out = tmp_path / "none"
    # a band no candidate can prove at 10 episodes: every candidate INCONCLUSIVE or FAIL, exit 1 or 3, no best/
    with pytest.raises(SystemExit) as exc:
        main(["search", str(base_bundle), "--out", str(out), "--max-loss", "0.0001%", "--episodes", "10",
              "--fp16-layers", "0", "--int4-rounding", "nearest"])
    assert exc.value.code in (1, 3)
    assert "no candidate PASSed" in capsys.readouterr().out and not (out / "best").exists()
    rec = json.loads((out / "search.json").read_text())
    assert rec["status"] in ("FAIL", "INCONCLUSIVE") and rec["best"] is None
    assert all(r["verdict"] in ("FAIL", "INCONCLUSIVE") for r in rec["candidates"])


def test_search_with_joint_int4_reconstruction(base_bundle: Path, tmp_path: Path) -> None:
    """``--int4-rounding nearest,gptq+brecq``: the GPTQ int4 candidates are reconstructed jointly (every int4
    and int8 layer on its own grid), kept only where the held-out action error drops, and validated like any
    other; ``only`` runs just the chosen one."""
    import numpy as np

    from edgeq.search import search

    out = tmp_path / "rec"
    res = search(base_bundle, out, max_loss=0.05, episodes=4, fp16_layers=0, state_episodes=2, max_states=1500,
                 latency_calls=20, rounding="nearest,gptq+brecq", reconstruct_iters=60, confirm=False,
                 only=["W4A8+gptq+brecq"])
    rows = {r["name"]: r for r in res.rows}
    assert "W4A8" in rows and "W4A8+gptq+brecq" in rows
    rec = rows["W4A8+gptq+brecq"]["reconstruction"]
    assert rec["kept"] and rec["heldout_action_error"] < rec["heldout_action_error_start"]
    assert rec["options"] == {"start_margin": 0.25}
    assert rows["W4A8+gptq+brecq"]["heldout_action_error"] == pytest.approx(rec["heldout_action_error"], rel=1e-4)
    assert rows["W4A8+gptq+brecq"]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert rows["W4A8+gptq+brecq"]["episodes"] == 4
    assert all(r["verdict"] == "NOT RUN" for n, r in rows.items() if n != "W4A8+gptq+brecq")
    # the candidate's portable file holds int4 integers in [-7, 7] for every layer
    from edgeq.export.int4 import int4_layer_names, tensor_int4_values

    q = onnx.load(str(out / "candidates" / "W4A8+gptq+brecq" / "policy.int8.onnx"))
    assert len(int4_layer_names(q)) == 3
    ints = [tensor_int4_values(t) for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert ints and all(int(np.abs(v).max()) <= 7 for v in ints)
    assert json.loads((out / "search.json").read_text())["int4_rounding"] == "nearest,gptq+brecq"
