"""LSTM/GRU cells unrolled into gate MatMuls: the same steps as torch, and INT8 gates in the QDQ export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeq.calibration.observers import TensorObserver
from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import PolicyFormatError
from edgeq.export.qdq import apply_plan
from edgeq.graph.analysis import find_weighted_layers
from edgeq.graph.layers import Activation, Linear
from edgeq.graph.recurrent import RecurrentCell, recurrent_policy_to_onnx
from edgeq.quantizers.plan import make_plan

OBS, HIDDEN, ACT = 5, 16, 2


def _cell_and_head(kind: str, layers: int, seed: int = 0):
    torch.manual_seed(seed)
    rnn = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(OBS, HIDDEN, layers)
    head = torch.nn.Linear(HIDDEN, ACT)
    sd = {f"rnn.{k}": v.detach().numpy() for k, v in rnn.state_dict().items()}
    cell = RecurrentCell.from_state_dict(kind, sd, "rnn", source="test")
    post = [Activation("elu", 1.0), Linear("head", head.weight.detach().numpy(), head.bias.detach().numpy())]
    graph = recurrent_policy_to_onnx([], cell, post, OBS, ACT, "test_rnn")
    return rnn, head, graph


def _runtime(graph) -> OrtPolicy:
    return OrtPolicy(graph.model.SerializeToString(), state=[s.to_json() for s in graph.state])


@pytest.mark.parametrize("kind,layers", [("lstm", 1), ("lstm", 2), ("gru", 1), ("gru", 3)])
def test_unrolled_cell_matches_torch_step_by_step(kind: str, layers: int) -> None:
    rnn, head, graph = _cell_and_head(kind, layers)
    rt = _runtime(graph)
    batch, steps = 3, 300
    x = np.random.default_rng(1).normal(size=(steps, batch, OBS)).astype(np.float32) * 2
    state = None
    max_diff = 0.0
    with torch.no_grad():
        for t in range(steps):
            if t == 150:  # new episodes in rows 0 and 2: both sides zero those rows only
                mask = np.array([True, False, True])
                rt.reset(mask)
                keep = torch.from_numpy((~mask).astype(np.float32))[None, :, None]
                state = tuple(s * keep for s in state) if kind == "lstm" else state * keep
            out, state = rnn(torch.from_numpy(x[t])[None], state)
            ref = head(torch.nn.functional.elu(out[0])).numpy()
            max_diff = max(max_diff, float(np.abs(rt.act(x[t]) - ref).max()))
    assert max_diff <= 1e-5
    assert [s.input_name for s in graph.state] == (["h_in", "c_in"] if kind == "lstm" else ["h_in"])
    assert all(s.shape == (layers, HIDDEN) for s in graph.state)


def test_gate_matmuls_are_weighted_layers_and_become_int8() -> None:
    _, _, graph = _cell_and_head("lstm", 2)
    found = [w.node for w in find_weighted_layers(graph.model)]
    assert set(graph.gate_nodes) <= set(found) and len(graph.gate_nodes) == 4  # ih + hh per layer
    # calibrate on random steps, then export with the gates int8
    from edgeq.calibration.collect import calibration_tensors, instrumented

    tensors = calibration_tensors(graph.model)
    assert "rnn.l0.h_prev" in tensors and "rnn.l1.h_prev" in tensors  # the previous hidden state is calibrated
    rt = OrtPolicy(instrumented(graph.model, tensors).SerializeToString(),
                   state=[s.to_json() for s in graph.state])
    observers = {t: TensorObserver(t) for t in tensors}
    x = np.random.default_rng(2).normal(size=(200, 4, OBS)).astype(np.float32)
    for step in x:
        out = rt.run(step, ["actions", *tensors])
        for t in tensors:
            observers[t].update(out[t])
    plan = make_plan(graph.model, observers, calibrator="max")
    assert {layer.node for layer in plan.int8_layers()} >= set(graph.gate_nodes)
    qmodel = apply_plan(graph.model, plan)
    weights_int8 = {i.name for i in qmodel.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert {"rnn.l0.ih.weight.int8", "rnn.l0.hh.weight.int8", "rnn.l1.hh.weight.int8"} <= weights_int8
    # keep_float=gate nodes: the cell stays float, the head is int8
    plan_f = make_plan(graph.model, observers, calibrator="max", keep_float=graph.gate_nodes)
    assert {layer.node for layer in plan_f.int8_layers()} == {"head/Gemm"}
    # both run with state, and the int8 actions stay close to float on these inputs
    f, q = _runtime(graph), OrtPolicy(qmodel.SerializeToString(), state=[s.to_json() for s in graph.state])
    err = max(float(np.abs(f.act(s) - q.act(s)).max()) for s in x)
    scale = max(float(np.abs(f.act(s)).max()) for s in x[:5])
    assert 0 < err < 0.1 * max(scale, 1.0)


def test_bad_recurrent_weights_name_the_problem() -> None:
    rnn = torch.nn.LSTM(OBS, HIDDEN, 1, bidirectional=True)
    sd = {f"m.{k}": v.detach().numpy() for k, v in rnn.state_dict().items()}
    with pytest.raises(PolicyFormatError, match="bidirectional"):
        RecurrentCell.from_state_dict("lstm", sd, "m", source="x.pt")
    sd = {f"m.{k}": v.detach().numpy() for k, v in torch.nn.GRU(OBS, HIDDEN).state_dict().items()}
    with pytest.raises(PolicyFormatError, match=r"expected \[4\*16"):
        RecurrentCell.from_state_dict("lstm", sd, "m", source="x.pt")  # GRU weights read as an LSTM
    with pytest.raises(PolicyFormatError, match="no m.weight_ih_l0"):
        RecurrentCell.from_state_dict("lstm", {}, "m", source="x.pt")
