"""Tests for edgeq.export.tensorrt_engine (build side) and edgeq.deploy.tensorrt_runner (robot side).

The first part runs anywhere (no TensorRT, no GPU): import without TensorRT, build-config validation,
the manifest compatibility check, the inspector-JSON parser and the fp16 cast pass (checked against
ONNX Runtime on CPU). The second part builds and runs real engines and skips unless the TensorRT
runtime and a CUDA GPU are present.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.deploy import tensorrt_runner as tr
from edgeq.deploy.tensorrt_runner import check_engine_compat
from edgeq.errors import BundleError, InputError
from edgeq.export import tensorrt_engine as te
from edgeq.export.tensorrt_engine import (
    EngineBuildConfig,
    EngineInfo,
    fp16_onnx_with_casts,
    parse_layer_information,
    summarize_layers,
)

MODULE_PATH = Path(te.__file__)
RUNNER_PATH = Path(tr.__file__)
OBS, HIDDEN, ACT = 8, 32, 4
RNG = np.random.default_rng(7)


def _load_module_copy(monkeypatch: pytest.MonkeyPatch, name: str, path: Path = MODULE_PATH) -> ModuleType:
    """Import tensorrt_engine.py (or ``path``) afresh under another name (the real module stays untouched)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


# --- import without TensorRT ----------------------------------------------------------------------


def test_import_without_tensorrt_sets_flag_and_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    mod = _load_module_copy(monkeypatch, "edgeq_trt_without_tensorrt")
    assert mod.TENSORRT_AVAILABLE is False
    cfg = mod.EngineBuildConfig(precision="int8")
    with pytest.raises(ImportError, match="pip install tensorrt") as info:
        mod.build_engine(Path("x.onnx"), Path("x.engine"), cfg)
    assert isinstance(info.value, mod.TensorRTUnavailableError)
    runner = _load_module_copy(monkeypatch, "edgeq_trt_runner_without_tensorrt", RUNNER_PATH)
    assert runner.TENSORRT_AVAILABLE is False and "tensorrt" in str(runner.TENSORRT_IMPORT_ERROR)
    with pytest.raises(ImportError, match="TensorRT"):
        runner.TrtPolicyRunner("x.engine")
    # What needs no TensorRT still works.
    runner.check_engine_compat({"tensorrt_version": "10.13.0"}, {"tensorrt_version": "10.13.0"})
    assert runner.current_platform()["tensorrt_version"] is None


def test_type_stubs_alone_do_not_count_as_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # `pip install --no-deps tensorrt-stubs` leaves a tensorrt/ folder of .pyi files only, which Python
    # imports as an empty namespace package: `import tensorrt` (and pytest.importorskip) succeed.
    monkeypatch.setitem(sys.modules, "tensorrt", ModuleType("tensorrt"))
    mod = _load_module_copy(monkeypatch, "edgeq_trt_stubs_only")
    assert mod.TENSORRT_AVAILABLE is False
    with pytest.raises(ImportError, match="stubs"):
        mod.build_engine(Path("x.onnx"), Path("x.engine"), mod.EngineBuildConfig(precision="fp16"))
    runner = _load_module_copy(monkeypatch, "edgeq_trt_runner_stubs_only", RUNNER_PATH)
    assert runner.TENSORRT_AVAILABLE is False and "stubs" in str(runner.TENSORRT_IMPORT_ERROR)


# --- build config ---------------------------------------------------------------------------------


def test_build_config_defaults_are_valid() -> None:
    cfg = EngineBuildConfig(precision="int8")
    assert (cfg.min_batch, cfg.opt_batch, cfg.max_batch) == (1, 1, 64)
    assert cfg.strongly_typed and cfg.workspace_bytes == 1 << 30 and cfg.timing_cache is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_batch": 4, "opt_batch": 2, "max_batch": 8}, "min_batch <= opt_batch <= max_batch"),
        ({"min_batch": 1, "opt_batch": 16, "max_batch": 8}, "opt_batch=16, max_batch=8"),
        ({"min_batch": 0}, "min_batch must be at least 1"),
        ({"workspace_bytes": 0}, "workspace_bytes must be positive"),
        ({"workspace_bytes": -5}, "workspace_bytes must be positive"),
        ({"precision": "int4"}, "precision must be one of int8, fp16, fp32"),
    ],
)
def test_build_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"precision": "int8", **kwargs}
    with pytest.raises(ValueError, match=match):
        EngineBuildConfig(**args)


def test_build_config_rejects_non_int_batch_and_converts_cache_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="max_batch must be an int"):
        EngineBuildConfig(precision="fp16", max_batch=8.0)  # type: ignore[arg-type]
    cfg = EngineBuildConfig(precision="fp16", timing_cache=str(tmp_path / "t.cache"))  # type: ignore[arg-type]
    assert cfg.timing_cache == tmp_path / "t.cache"


# --- manifest compatibility -----------------------------------------------------------------------

RECORD = {
    "tensorrt_version": "10.13.0.35",
    "gpu_name": "Orin (nvgpu)",
    "compute_capability": "8.7",
    "engine_sha256": "ab" * 32,
}


def test_compat_passes_on_the_same_platform() -> None:
    check_engine_compat(RECORD, dict(RECORD))
    # Build number and capability spelling do not matter; the GPU's marketing name does not either.
    check_engine_compat(RECORD, {**RECORD, "tensorrt_version": "10.13.0.99", "compute_capability": "sm_87"})
    check_engine_compat(RECORD, {**RECORD, "compute_capability": [8, 7], "gpu_name": "Jetson AGX Orin"})


def test_compat_names_a_tensorrt_version_mismatch() -> None:
    with pytest.raises(BundleError, match=r"TensorRT 10\.13\.0\.35.*TensorRT 10\.3\.0"):
        check_engine_compat(RECORD, {**RECORD, "tensorrt_version": "10.3.0.30"})


def test_compat_names_a_gpu_mismatch() -> None:
    actual = {**RECORD, "compute_capability": "9.0", "gpu_name": "NVIDIA H100"}
    with pytest.raises(BundleError, match=r"compute capability 8\.7 \(Orin \(nvgpu\)\).*9\.0 \(NVIDIA H100\)"):
        check_engine_compat(RECORD, actual)


def test_compat_names_every_mismatch_at_once() -> None:
    actual = {"tensorrt_version": "11.4.0.106", "compute_capability": (8, 6), "engine_sha256": "cd" * 32}
    with pytest.raises(BundleError) as info:
        check_engine_compat(RECORD, actual)
    text = str(info.value)
    assert "TensorRT version mismatch" in text and "GPU mismatch" in text and "changed after export" in text


def test_compat_hardware_compatible_engine_runs_on_newer_gpus() -> None:
    record = {**RECORD, "compute_capability": "8.6", "hardware_compatibility_level": "AMPERE_PLUS"}
    check_engine_compat(record, {**RECORD, "compute_capability": "9.0"})
    with pytest.raises(BundleError, match="GPU mismatch"):
        check_engine_compat(record, {**RECORD, "compute_capability": "7.5"})


def test_compat_skips_what_either_side_does_not_know() -> None:
    check_engine_compat(RECORD, {"tensorrt_version": "10.13.0.35"})
    check_engine_compat({}, RECORD)


def test_compat_rejects_a_malformed_capability() -> None:
    with pytest.raises(BundleError, match="compute capability 'orin'"):
        check_engine_compat({"compute_capability": "orin"}, RECORD)


def test_engine_info_json_is_a_manifest_record() -> None:
    info = EngineInfo(
        engine_path="policy.int8.engine",
        onnx_path="policy.qdq.onnx",
        tensorrt_version="10.13.0.35",
        gpu_name="Orin",
        compute_capability="8.7",
        precision="int8",
        strongly_typed=True,
        min_batch=1,
        opt_batch=1,
        max_batch=64,
        build_seconds=12.5,
        engine_bytes=123456,
        engine_sha256="ab" * 32,
        layers=[{"name": "fc1", "type": "CaskGemm", "precision": "int8"}],
        int8_layers=1,
    )
    record = json.loads(info.to_json())
    assert record["compute_capability"] == "8.7" and record["layers"][0]["precision"] == "int8"
    check_engine_compat(record, {**RECORD, "engine_sha256": "ab" * 32})


# --- engine inspector JSON ------------------------------------------------------------------------

TRT10_JSON = json.dumps(
    {
        "Layers": [
            {
                "Name": "obs_Q",
                "LayerType": "Reformat",
                "Inputs": [{"Name": "obs", "Dimensions": [1, 8], "Format/Datatype": "Row major linear FP32"}],
                "Outputs": [{"Name": "obs_q", "Dimensions": [1, 8], "Format/Datatype": "Row major linear Int8"}],
            },
            {
                "Name": "fc1 + relu1 + r_Q",
                "LayerType": "CaskGemm",
                "Inputs": [{"Name": "obs_q", "Format/Datatype": "Thirty-two wide channel vectorized Int8 format"}],
                "Outputs": [{"Name": "r_q", "Format/Datatype": "Row major linear Int8 format"}],
                "TacticName": "sm87_xmma_gemm_i8i8_i32",
                "Metadata": "[ONNX Layer: fc1]",
            },
            {
                "Name": "fc2",
                "LayerType": "CaskGemm",
                "Inputs": [{"Name": "r", "Format/Datatype": "Row major linear FP16 format"}],
                "Outputs": [{"Name": "actions", "Format/Datatype": "Row major linear FP16 format"}],
            },
            {
                "Name": "tanh",
                "LayerType": "PointWiseV2",
                "Inputs": [{"Name": "pre", "Format/Datatype": "N/A due to dynamic shapes"}],
                "Outputs": [],
            },
        ],
        "Bindings": ["obs", "actions"],
    }
)


def test_parse_tensorrt10_layer_information() -> None:
    layers = parse_layer_information(TRT10_JSON)
    assert [(la["name"], la["type"], la["precision"]) for la in layers] == [
        ("obs_Q", "Reformat", "fp32"),
        ("fc1 + relu1 + r_Q", "CaskGemm", "int8"),
        ("fc2", "CaskGemm", "fp16"),
        ("tanh", "PointWiseV2", "unknown"),
    ]
    assert layers[0]["output_types"] == ["int8"]
    assert layers[1]["tactic"] == "sm87_xmma_gemm_i8i8_i32" and layers[1]["metadata"] == "[ONNX Layer: fc1]"
    summary = summarize_layers(layers)
    assert summary["int8_layers"] == 1 and summary["reformat_layers"] == 1
    assert summary["precision_counts"] == {"fp32": 1, "int8": 1, "fp16": 1, "unknown": 1}


def test_parse_tensorrt11_layer_information_and_names_only() -> None:
    trt11 = {
        "Layers": [
            {
                "Name": "fc1",
                "LayerType": "gemm",
                "Inputs": [{"Name": "obs_q", "DataType": "Int8", "Format": "Row major linear (kLINEAR)"}],
                "Outputs": [{"Name": "h", "DataType": "Half", "Format": "Row major linear (kLINEAR)"}],
            },
            {"Name": "cast", "LayerType": "Cast", "Inputs": [{"DataType": "BFloat16"}], "Outputs": []},
        ],
        "I/O Tensors": [{"Name": "obs", "IOMode": "Input", "DataType": "Float"}],
    }
    layers = parse_layer_information(json.dumps(trt11))
    assert [la["precision"] for la in layers] == ["int8", "bf16"]
    assert layers[0]["output_types"] == ["fp16"]
    names_only = parse_layer_information(json.dumps({"Layers": ["fc1", "fc2"], "Bindings": ["obs"]}))
    assert [(la["name"], la["precision"]) for la in names_only] == [("fc1", "unknown"), ("fc2", "unknown")]


# --- fp16 model with casts ------------------------------------------------------------------------


def _float_policy() -> onnx.ModelProto:
    """A float MLP with the things the cast pass must handle: Constant nodes, a Cast to float, Clip."""
    w1 = RNG.normal(size=(HIDDEN, OBS)).astype(np.float32) * 0.5
    b1 = RNG.normal(size=HIDDEN).astype(np.float32) * 0.1
    w2 = RNG.normal(size=(HIDDEN, ACT)).astype(np.float32) * 0.3
    b2 = RNG.normal(size=ACT).astype(np.float32) * 0.1
    nodes = [
        helper.make_node(
            "Constant", [], ["mean"], name="mean_c", value=numpy_helper.from_array(np.full(OBS, 0.1, np.float32))
        ),
        helper.make_node("Constant", [], ["inv_std"], name="std_c", value_float=0.5),
        helper.make_node("Sub", ["obs", "mean"], ["centered"], name="sub"),
        helper.make_node("Mul", ["centered", "inv_std"], ["normed"], name="mul"),
        helper.make_node("Gemm", ["normed", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["pre"], name="bias2"),
        helper.make_node("Tanh", ["pre"], ["t"], name="tanh"),
        helper.make_node("Constant", [], ["two_i"], name="two_c", value=numpy_helper.from_array(np.array(2, np.int64))),
        helper.make_node("Cast", ["two_i"], ["two"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["t", "two"], ["scaled"], name="scale"),
        helper.make_node("Clip", ["scaled", "lo", "hi"], ["actions"], name="clip"),
    ]
    graph = helper.make_graph(
        nodes,
        "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", OBS])],
        [
            helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", ACT]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", HIDDEN]),
        ],
        [
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(b2, "b2"),
            numpy_helper.from_array(np.array(-1.5, np.float32), "lo"),
            numpy_helper.from_array(np.array(1.5, np.float32), "hi"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, obs: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(x) for x in sess.run(None, {"obs": obs})]


def test_fp16_with_casts_is_valid_and_matches_float() -> None:
    float_model = _float_policy()
    before = float_model.SerializeToString()
    half = fp16_onnx_with_casts(float_model)
    assert float_model.SerializeToString() == before  # input untouched
    onnx.checker.check_model(half, full_check=True)
    # IO stays float32; every weight is fp16; the internal Cast now produces fp16.
    assert [v.type.tensor_type.elem_type for v in half.graph.input] == [TensorProto.FLOAT]
    assert {v.type.tensor_type.elem_type for v in half.graph.output} == {TensorProto.FLOAT}
    assert {t.data_type for t in half.graph.initializer} == {TensorProto.FLOAT16}
    casts = {n.name: n for n in half.graph.node if n.op_type == "Cast"}
    assert helper.get_attribute_value(casts["to_float"].attribute[0]) == TensorProto.FLOAT16
    assert {"obs_to_fp16", "actions_to_fp32", "h_to_fp32"} <= set(casts)

    obs = RNG.normal(size=(16, OBS)).astype(np.float32)
    ref_actions, ref_h = _run(float_model, obs)
    actions, h = _run(half, obs)
    assert actions.dtype == np.float32 and h.dtype == np.float32
    np.testing.assert_allclose(actions, ref_actions, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(h, ref_h, rtol=1e-2, atol=2e-2)


def test_fp16_with_casts_refuses_quantized_and_out_of_range_models() -> None:
    model = _float_policy()
    big = numpy_helper.from_array(np.full((HIDDEN, OBS), 1e6, np.float32), "W1")
    next(t for t in model.graph.initializer if t.name == "W1").CopyFrom(big)
    with pytest.raises(ValueError, match="beyond fp16's range"):
        fp16_onnx_with_casts(model)
    qdq = _float_policy()
    qdq.graph.node.append(helper.make_node("QuantizeLinear", ["obs", "hi"], ["obs_q"], name="q"))
    with pytest.raises(ValueError, match="expects a float model"):
        fp16_onnx_with_casts(qdq)


# --- with the TensorRT runtime and a GPU (skipped elsewhere) ------------------------------------------


@pytest.fixture(scope="module")
def trt_gpu() -> ModuleType:
    trt = pytest.importorskip(
        "tensorrt",
        reason="needs the TensorRT runtime (pip install tensorrt on a machine with an NVIDIA GPU)",
    )
    if not hasattr(trt, "Builder"):
        pytest.skip("only tensorrt-stubs is installed, not the TensorRT runtime")
    torch = pytest.importorskip("torch", reason="the runner needs a CUDA build of torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return trt


def _qdq_policy(tmp_path: Path) -> Path:
    """The float policy quantized the TensorRT way by ONNX Runtime (checked clean in test_trt_rules)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            self._it = iter([{"obs": RNG.normal(size=(32, OBS)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    model = _float_policy()
    del model.graph.output[1]  # one output: actions
    onnx.save(model, str(src))
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QDQKeepRemovableActivations": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
        },
    )
    return dst


def test_int8_engine_builds_reports_layers_and_runs(trt_gpu: ModuleType, tmp_path: Path) -> None:
    qdq = _qdq_policy(tmp_path)
    cache = tmp_path / "timing.cache"
    cfg = EngineBuildConfig(precision="int8", max_batch=16, timing_cache=cache)
    info = te.build_engine(qdq, tmp_path / "policy.int8.engine", cfg)
    assert info.tensorrt_version == trt_gpu.__version__ and info.compute_capability
    assert info.layers and info.int8_layers >= 1, info.to_json()
    assert cache.is_file() and (tmp_path / "policy.int8.engine").stat().st_size == info.engine_bytes
    te.build_engine(qdq, tmp_path / "again.engine", cfg)  # reuses the timing cache

    obs = RNG.normal(size=(5, OBS)).astype(np.float32)
    (ref,) = _run(onnx.load(str(qdq)), obs)
    runner = tr.TrtPolicyRunner(tmp_path / "policy.int8.engine", expected=info.to_dict())
    out = runner.run(obs)
    assert isinstance(out, np.ndarray) and out.shape == (5, ACT)
    np.testing.assert_allclose(out, ref, atol=0.1)
    single = runner.run(obs[0])
    assert isinstance(single, np.ndarray) and single.shape == (ACT,)
    with pytest.raises(InputError, match="batch 17"):
        runner.run(np.zeros((17, OBS), np.float32))

    graph_runner = tr.TrtPolicyRunner(tmp_path / "policy.int8.engine", use_cuda_graph=True)
    for i in range(3):
        got = graph_runner.run(obs[i : i + 1])
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, out[i : i + 1], atol=1e-5)
    graph_runner.run(obs)  # another batch size in between
    again = graph_runner.run(obs[:1])
    assert isinstance(again, np.ndarray)
    np.testing.assert_allclose(again, out[:1], atol=1e-5)


def test_fp16_engine_matches_float(trt_gpu: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "float.onnx"
    model = _float_policy()
    onnx.save(model, str(src))
    info = te.build_engine(src, tmp_path / "policy.fp16.engine", EngineBuildConfig(precision="fp16", max_batch=8))
    assert info.precision_counts.get("fp16", 0) >= 1
    obs = RNG.normal(size=(3, OBS)).astype(np.float32)
    ref = _run(model, obs)
    out = tr.TrtPolicyRunner(tmp_path / "policy.fp16.engine").run(obs)
    assert isinstance(out, dict) and set(out) == {"actions", "h"}
    np.testing.assert_allclose(out["actions"], ref[0], atol=2e-2)


def test_runner_refuses_an_engine_for_another_gpu(trt_gpu: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "float.onnx"
    onnx.save(_float_policy(), str(src))
    info = te.build_engine(src, tmp_path / "p.engine", EngineBuildConfig(precision="fp32", max_batch=2))
    record = {**info.to_dict(), "compute_capability": "5.3", "gpu_name": "Jetson Nano"}
    with pytest.raises(BundleError, match="Jetson Nano"):
        tr.TrtPolicyRunner(tmp_path / "p.engine", expected=record)


def test_weak_typing_is_refused_on_tensorrt_11(trt_gpu: ModuleType, tmp_path: Path) -> None:
    if int(trt_gpu.__version__.split(".")[0]) < 11:
        pytest.skip("TensorRT 10 still has weak typing")
    src = tmp_path / "float.onnx"
    onnx.save(_float_policy(), str(src))
    with pytest.raises(te.EngineBuildError, match="strongly typed"):
        te.build_engine(src, tmp_path / "p.engine", EngineBuildConfig(precision="fp16", strongly_typed=False))


def test_build_refuses_a_graph_that_breaks_trt_rules(trt_gpu: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "float.onnx"
    onnx.save(_float_policy(), str(src))
    with pytest.raises(te.EngineBuildError, match="no-qdq"):
        te.build_engine(src, tmp_path / "p.engine", EngineBuildConfig(precision="int8"))
