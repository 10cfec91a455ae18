"""History policies: the runtime's observation window, and ONNX files that read a history (3-D input,
obs + obs_history, Conv1d over time, encoder + body) rewritten exactly into edgeq's one-input form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.deploy.history import HistoryBuffer, ObservationHistory, episode_windows, with_history
from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import InputError, PolicyFormatError
from edgeq.graph.analysis import find_weighted_layers
from edgeq.ingest import load_policy

K, D = 5, 3
RNG = np.random.default_rng(0)


def _save(tmp_path: Path, name: str, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto]) -> Path:
    m = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    p = tmp_path / f"{name}.onnx"
    onnx.save(m, str(p))
    return p


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.5, name)


def _vi(name: str, *dims: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0])


def _windows(n: int) -> np.ndarray:
    return RNG.standard_normal((n, K, D)).astype(np.float32)


def _ingested(fp_model: onnx.ModelProto, windows: np.ndarray) -> np.ndarray:
    return OrtPolicy(fp_model.SerializeToString()).act(windows.reshape(len(windows), -1))


# -- the runtime's window -----------------------------------------------------------------------------
def test_history_buffer_is_oldest_first_zero_padded_and_reset_per_row() -> None:
    h = HistoryBuffer(3, 2)
    w1 = h.push(np.array([[1, 1], [5, 5]], np.float32))
    np.testing.assert_array_equal(w1, [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 5, 5]])
    w2 = h.push(np.array([[2, 2], [6, 6]], np.float32))
    np.testing.assert_array_equal(w2, [[0, 0, 1, 1, 2, 2], [0, 0, 5, 5, 6, 6]])
    h.reset(np.array([False, True]))
    w3 = h.push(np.array([[3, 3], [7, 7]], np.float32))
    np.testing.assert_array_equal(w3, [[1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 7, 7]])
    h.push(np.array([[4, 4], [8, 8]], np.float32))
    np.testing.assert_array_equal(h.window()[0], [2, 2, 3, 3, 4, 4])  # the oldest step dropped
    with pytest.raises(InputError, match="3 features"):
        h.push(np.zeros((2, 3), np.float32))


def test_episode_windows_match_the_buffer() -> None:
    obs = RNG.standard_normal((7, 2)).astype(np.float32)
    h = HistoryBuffer(3, 2)
    np.testing.assert_array_equal(episode_windows(obs, 3), np.concatenate([h.push(o[None]) for o in obs]))


def test_with_history_reads_the_manifest_entry() -> None:
    class Echo:
        state_specs: list[dict[str, object]] = []

        def act(self, x: np.ndarray) -> np.ndarray:
            return x

        def reset(self, mask: np.ndarray | None = None) -> None:
            return None  # stateless

    rt = Echo()
    assert with_history(rt, {"input": "obs"}) is rt
    wrapped = with_history(rt, {"history": {"input": "obs", "length": 2, "obs_dim": 1, "reset": "zeros"}})
    assert isinstance(wrapped, ObservationHistory) and wrapped.state_specs[-1]["history"]
    np.testing.assert_array_equal(wrapped.act(np.array([[3.0]])), [[0.0, 3.0]])
    with pytest.raises(InputError, match="reset"):
        with_history(rt, {"history": {"length": 2, "obs_dim": 1, "reset": "first"}})


def test_first_observation_reset_repeats_the_first_observation_per_row() -> None:
    h = HistoryBuffer(3, 2, "first-observation")
    w1 = h.push(np.array([[1, 1], [5, 5]], np.float32))
    np.testing.assert_array_equal(w1, [[1, 1, 1, 1, 1, 1], [5, 5, 5, 5, 5, 5]])
    w2 = h.push(np.array([[2, 2], [6, 6]], np.float32))
    np.testing.assert_array_equal(w2, [[1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 6, 6]])
    h.reset(np.array([False, True]))  # row 1 starts an episode: its next observation fills its window
    w3 = h.push(np.array([[3, 3], [7, 7]], np.float32))
    np.testing.assert_array_equal(w3, [[1, 1, 2, 2, 3, 3], [7, 7, 7, 7, 7, 7]])
    h.reset()
    np.testing.assert_array_equal(h.push(np.array([[9, 9]], np.float32)), [[9, 9, 9, 9, 9, 9]])
    obs = RNG.standard_normal((6, 2)).astype(np.float32)
    g = HistoryBuffer(3, 2, "first-observation")
    np.testing.assert_array_equal(episode_windows(obs, 3, "first-observation"),
                                  np.concatenate([g.push(o[None]) for o in obs]))
    assert not np.array_equal(episode_windows(obs, 3, "first-observation"), episode_windows(obs, 3))
    with pytest.raises(InputError, match="first-observation"):
        HistoryBuffer(3, 2, "first")


def test_reset_mode_reaches_calibration_and_validation_runtimes() -> None:
    from edgeq.calibration.collect import _runtime
    from edgeq.policy import HistorySpec
    from edgeq.validate.targets import make_runtime

    io = {"input": "obs", "output": "actions", "history": {"input": "obs", "length": 3, "obs_dim": 2,
                                                     "reset": "first-observation"}}
    spec = HistorySpec.from_json(io["history"])
    assert spec.reset == "first-observation" and spec.to_json()["reset"] == "first-observation"
    ident = helper.make_model(helper.make_graph([helper.make_node("Identity", ["obs"], ["actions"])], "id",
                                                [_vi("obs", "batch", 6)], [_vi("actions", "batch", 6)]),
                              opset_imports=[helper.make_opsetid("", 17)])
    ident.ir_version = 8
    obs = np.array([[1.0, 2.0]], np.float32)
    rollout = make_runtime("cpu", ident.SerializeToString(), io, precision="fp32")  # the validation rollouts'
    np.testing.assert_array_equal(rollout.act(obs), [[1, 2, 1, 2, 1, 2]])
    rollout.reset()
    np.testing.assert_array_equal(rollout.act(obs + 1), [[2, 3, 2, 3, 2, 3]])

    class _Fp:  # what calibration reads of a FloatPolicy
        state: tuple[()] = ()
        history = spec

    calib = _runtime(ident, _Fp())  # type: ignore[arg-type]
    np.testing.assert_array_equal(calib.act(obs), [[1, 2, 1, 2, 1, 2]])


# -- ingest ---------------------------------------------------------------------------------------------
def test_three_dimensional_history_input_becomes_the_flat_window(tmp_path: Path) -> None:
    p = _save(tmp_path, "stack", [helper.make_node("Flatten", ["h"], ["f"], axis=1),
                                  helper.make_node("Gemm", ["f", "w", "b"], ["a"], transB=1)],
              [_vi("h", "batch", K, D)], [_vi("a", "batch", 2)], [_w("w", 2, K * D), _w("b", 2)])
    fp = load_policy(p)
    assert fp.history is not None and (fp.history.length, fp.history.obs_dim) == (K, D)
    assert fp.obs_space.shape == (D,) and fp.input_size == K * D
    x = _windows(6)
    np.testing.assert_allclose(_ingested(fp.model, x), _run(p, {"h": x}), rtol=1e-6, atol=1e-6)


def test_obs_and_obs_history_inputs_read_one_window(tmp_path: Path) -> None:
    nodes = [helper.make_node("Flatten", ["obs_history"], ["f"], axis=1),
             helper.make_node("Concat", ["obs", "f"], ["c"], axis=1),
             helper.make_node("Gemm", ["c", "w"], ["a"], transB=1)]
    p = _save(tmp_path, "two", nodes, [_vi("obs", "batch", D), _vi("obs_history", "batch", K, D)],
              [_vi("a", "batch", 2)], [_w("w", 2, D + K * D)])
    fp = load_policy(p)
    assert fp.history is not None and fp.history.length == K
    x = _windows(4)
    expected = _run(p, {"obs": x[:, -1], "obs_history": x})  # the current observation is the window's last row
    np.testing.assert_allclose(_ingested(fp.model, x), expected, rtol=1e-6, atol=1e-6)


def _conv_policy(tmp_path: Path, **conv_attrs: object) -> Path:
    nodes = [helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Conv", ["t", "cw", "cb"], ["c"], name="conv", **conv_attrs),
             helper.make_node("Elu", ["c"], ["e"]),
             helper.make_node("Flatten", ["e"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w"], ["a"], transB=1)]
    out_len = K - 2 if not conv_attrs else (K - 3) // 2 + 1
    return _save(tmp_path, "conv", nodes, [_vi("h", "batch", K, D)], [_vi("a", "batch", 2)],
                 [_w("cw", 4, D, 3), _w("cb", 4), _w("w", 2, 4 * out_len)])


def test_conv1d_over_time_is_lowered_to_an_exact_int8able_matmul(tmp_path: Path) -> None:
    p = _conv_policy(tmp_path)
    fp = load_policy(p)
    assert not any(n.op_type == "Conv" for n in fp.model.graph.node)
    assert "conv" in [wl.node for wl in find_weighted_layers(fp.model)]
    assert fp.source.details["normalization"]["lowered_convs"] == ["conv"]
    x = _windows(8)
    np.testing.assert_allclose(_ingested(fp.model, x), _run(p, {"h": x}), rtol=1e-5, atol=1e-5)


def _general_conv_policy(tmp_path: Path) -> Path:
    """Two Conv1d over 8 steps: depthwise x2 (groups 3) with stride 2, dilation 2, padding 1; then groups 2
    with auto_pad SAME_UPPER. A Transformer-free history encoder of the shapes humanoid policies use."""
    nodes = [helper.make_node("Transpose", ["h"], ["t"], name="to_channels", perm=[0, 2, 1]),
             helper.make_node("Conv", ["t", "cw1", "cb1"], ["c1"], name="conv1", group=3, strides=[2], pads=[1, 1],
                              dilations=[2]),
             helper.make_node("Elu", ["c1"], ["e1"], name="elu1"),
             helper.make_node("Conv", ["e1", "cw2", "cb2"], ["c2"], name="conv2", group=2, auto_pad="SAME_UPPER",
                              kernel_shape=[2]),
             helper.make_node("Elu", ["c2"], ["e2"], name="elu2"),
             helper.make_node("Flatten", ["e2"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "w"], ["g"], name="head", transB=1),
             helper.make_node("Tanh", ["g"], ["a"], name="tanh")]
    return _save(tmp_path, "conv_general", nodes, [_vi("h", "batch", 8, D)], [_vi("a", "batch", 2)],
                 [_w("cw1", 6, 1, 3), _w("cb1", 6), _w("cw2", 4, 3, 2), _w("cb2", 4), _w("w", 2, 4 * 3)])


def test_conv1d_stride_padding_dilation_groups_lower_exactly(tmp_path: Path) -> None:
    p = _general_conv_policy(tmp_path)
    fp = load_policy(p)
    assert fp.history is not None and fp.history.length == 8
    assert not any(n.op_type == "Conv" for n in fp.model.graph.node)
    assert fp.source.details["normalization"]["lowered_convs"] == ["conv1", "conv2"]
    assert {"conv1", "conv2"} <= {wl.node for wl in find_weighted_layers(fp.model)}
    x = RNG.standard_normal((32, 8, D)).astype(np.float32)
    np.testing.assert_allclose(_ingested(fp.model, x), _run(p, {"h": x}), rtol=1e-5, atol=1e-6)
    s, xs = _conv_policy(tmp_path, strides=[2]), _windows(8)  # a strided conv alone
    np.testing.assert_allclose(_ingested(load_policy(s).model, xs), _run(s, {"h": xs}), rtol=1e-5, atol=1e-6)


def test_conv1d_general_quantizes_to_per_channel_int8_and_passes_check(tmp_path: Path) -> None:
    from edgeq.calibration.collect import observe_states
    from edgeq.export.ort_cpu import specialize_for_ort_cpu
    from edgeq.export.qdq import apply_plan
    from edgeq.export.runtime_check import check_file
    from edgeq.quantizers.plan import make_plan

    fp = load_policy(_general_conv_policy(tmp_path))
    calib = RNG.standard_normal((512, 8 * D)).astype(np.float32)
    plan = make_plan(fp.model, observe_states(fp.model, calib), calibrator="max")
    layers = {la.node: la for la in plan.layers}
    assert layers["conv1"].precision == layers["conv2"].precision == "int8"
    qmodel = apply_plan(fp.model, plan)
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    for node in (n for n in qmodel.graph.node if n.name in ("conv1", "conv2")):
        assert all(producer[i].op_type == "DequantizeLinear" for i in node.input[:2])  # both operands int8
        w_dq = producer[node.input[1]]
        assert inits[w_dq.input[1]].shape == (6 if node.name == "conv1" else 4,)  # one scale per output channel
    held = RNG.standard_normal((256, 8 * D)).astype(np.float32)
    ref, q = OrtPolicy(fp.model.SerializeToString()).act(held), OrtPolicy(qmodel.SerializeToString()).act(held)
    assert np.abs(q - ref).max() < 0.05 * np.abs(ref).max() and np.abs(q - ref).max() > 0  # close, and INT8
    files = {"policy.fp32.onnx": fp.model, "policy.int8.onnx": qmodel, "policy.int8.cpu.onnx":
             specialize_for_ort_cpu(qmodel)}
    for name, model in files.items():
        onnx.save(model, str(tmp_path / name))
        result = check_file(tmp_path / name)
        assert result.errors == 0 and not result.violations, (name, result.violations)


def test_conv1d_over_an_unknown_length_is_refused_with_one_line() -> None:
    from edgeq.ingest.history import lower_conv1d

    nodes = [helper.make_node("Conv", ["x", "cw"], ["y"], name="conv", strides=[2])]
    m = helper.make_model(helper.make_graph(nodes, "c", [_vi("x", "batch", D, "steps")], [_vi("y", "batch", 4, "s")],
                                            [_w("cw", 4, D, 3)]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PolicyFormatError, match="fixed number of steps") as err:
        lower_conv1d(m, origin="c.onnx")
    assert "\n" not in str(err.value)


def test_encoder_and_body_files_compose_into_one_policy(tmp_path: Path) -> None:
    enc = _save(tmp_path, "encoder", [helper.make_node("Flatten", ["obs_history"], ["f"], axis=1),
                                      helper.make_node("Gemm", ["f", "we"], ["z0"], transB=1),
                                      helper.make_node("Tanh", ["z0"], ["latent"])],
                [_vi("obs_history", "batch", K, D)], [_vi("latent", "batch", 4)], [_w("we", 4, K * D)])
    body = _save(tmp_path, "body", [helper.make_node("Concat", ["obs", "latent"], ["c"], axis=1),
                                    helper.make_node("Gemm", ["c", "wb"], ["actions"], transB=1)],
                 [_vi("obs", "batch", D), _vi("latent", "batch", 4)], [_vi("actions", "batch", 2)],
                 [_w("wb", 2, D + 4)])
    fp = load_policy([enc, body])
    assert fp.history is not None and fp.history.length == K
    assert [m["path"] for m in fp.source.details["modules"]] == [str(enc), str(body)]
    assert all(len(m["sha256"]) == 64 for m in fp.source.details["modules"])
    x = _windows(5)
    z = _run(enc, {"obs_history": x})
    expected = _run(body, {"obs": x[:, -1], "latent": z})
    np.testing.assert_allclose(_ingested(fp.model, x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(PolicyFormatError, match="two"):
        load_policy([enc, body, body])


def test_flat_stack_needs_the_history_option(tmp_path: Path) -> None:
    p = _save(tmp_path, "flat", [helper.make_node("Gemm", ["x", "w"], ["a"], transB=1)],
              [_vi("x", "batch", K * D)], [_vi("a", "batch", 2)], [_w("w", 2, K * D)])
    assert load_policy(p).history is None
    fp = load_policy(p, history=K)
    assert fp.history is not None and (fp.history.length, fp.history.obs_dim) == (K, D)
    with pytest.raises(PolicyFormatError, match="multiple"):
        load_policy(p, history=4)


def test_serve_snapshot_keeps_which_rows_start_an_episode() -> None:
    from types import SimpleNamespace

    from edgeq.deploy.serve import _restore, _snapshot

    class Echo:
        state_specs: list[dict[str, object]] = []

        def act(self, x: np.ndarray) -> np.ndarray:
            return x

        def reset(self, mask: np.ndarray | None = None) -> None:
            return None  # stateless

    rt = ObservationHistory(Echo(), 2, 1, reset="first-observation")
    policy = SimpleNamespace(runtime=rt)
    rt.act(np.array([[1.0]]))
    rt.reset(np.array([True]))  # client A: a new episode starts on its next observation
    saved = _snapshot(policy)  # type: ignore[arg-type]
    rt.act(np.array([[5.0]]))  # client B uses the runtime meanwhile
    _restore(saved)
    np.testing.assert_array_equal(rt.act(np.array([[3.0]])), [[3.0, 3.0]])  # A's episode starts filled with 3
