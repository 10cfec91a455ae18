"""The validator carries recurrent state: a small hand-built recurrent ONNX policy on Pendulum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H = 8


def recurrent_policy(path: Path, seed: int = 0) -> Path:
    """``h' = tanh(obs W + h U + b)``, ``actions = 2 tanh(h' V)``: obs [B,3], h [B,H] → actions [B,1], h' [B,H]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (3, H)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.5, (H, H)).astype(np.float32), "U"),
             numpy_helper.from_array(rng.normal(0, 0.1, (H,)).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.5, (H, 1)).astype(np.float32), "V"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("MatMul", ["obs", "W"], ["xw"], name="in/MatMul"),
             helper.make_node("MatMul", ["h", "U"], ["hu"], name="rec/MatMul"),
             helper.make_node("Add", ["xw", "hu"], ["pre0"]), helper.make_node("Add", ["pre0", "b"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["h_next"]),
             helper.make_node("MatMul", ["h_next", "V"], ["out_pre"], name="out/MatMul"),
             helper.make_node("Tanh", ["out_pre"], ["squash"]), helper.make_node("Mul", ["squash", "two"], ["actions"])]
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["B", 3]),
                                             helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", H])],
                              [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["B", 1]),
                               helper.make_tensor_value_info("h_next", TensorProto.FLOAT, ["B", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def test_identical_recurrent_policies_give_zero_difference(tmp_path: Path) -> None:
    from edgeq.envs import env_factory
    from edgeq.validate.validator import ValidationOptions, validate_models

    a = recurrent_policy(tmp_path / "a.onnx")
    b = recurrent_policy(tmp_path / "b.onnx")
    io = {"input": "obs", "output": "actions", "state": [{"input": "h", "output": "h_next", "shape": [H]}]}
    opts = ValidationOptions(targets=("cpu",), floor_draws=2, sensitivity=False, latency_calls=100,
                             latency_large_batch=32, per_layer_states=300, num_envs=3)
    val = validate_models(a, b, io, env_factory("Pendulum-v1"), [0, 1, 2, 3], env_id="Pendulum-v1",
                          action_low=np.array([-2.0]), action_high=np.array([2.0]), options=opts)
    cpu = val["targets"]["cpu"]
    assert cpu["paired_difference"]["per_episode"] == [0.0] * 4 and cpu["verdict"]["passed"]
    assert cpu["action_error"]["on_float_trajectory"]["max_abs"] == 0.0
    assert np.all(np.asarray(cpu["action_error_series"]["abs_error"]) == 0.0)
    assert [r["fused"] for r in val["per_layer"]["layers"]] == ["MatMul", "MatMul", "MatMul+Tanh"]
    assert val["per_layer"]["states"] == 300 and val["per_layer"]["action_rms_error"] == 0.0
    # a different recurrent policy: the state is carried, so its trajectories differ from step 1 on
    c = recurrent_policy(tmp_path / "c.onnx", seed=1)
    val2 = validate_models(a, c, io, env_factory("Pendulum-v1"), [0, 1], env_id="Pendulum-v1",
                           action_low=np.array([-2.0]), action_high=np.array([2.0]),
                           options=ValidationOptions(targets=("cpu",), floor_draws=0, sensitivity=False,
                                                     latency_calls=0, per_layer=False, num_envs=2))
    assert val2["targets"]["cpu"]["action_error"]["on_float_trajectory"]["mean_abs"] > 0.01
