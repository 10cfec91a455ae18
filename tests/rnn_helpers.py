"""Synthetic INT8 recurrent policies made by edgeq's own exporter, for the fused recurrent backend's tests.

:func:`int8_recurrent` builds an LSTM or GRU policy (optionally with observation normalization and an
INT8 encoder layer before the cell, and an MLP head after it) with random weights, calibrates it on
random steps and exports it with the QDQ exporter (``edgeq.export.qdq.apply_plan``): the same graph
layout as a bundle's ``policy.int8.onnx`` for a recurrent policy (``edgeq quantize`` of an
sb3-contrib RecurrentPPO archive or an rsl_rl TorchScript LSTM/GRU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from edgeq.calibration.collect import calibration_tensors, instrumented
from edgeq.calibration.observers import TensorObserver
from edgeq.deploy.runtime import OrtPolicy
from edgeq.export.qdq import apply_plan
from edgeq.graph.layers import Activation, Clip, Linear, Normalize
from edgeq.graph.recurrent import RecurrentCell, recurrent_policy_to_onnx
from edgeq.quantizers.plan import make_plan


def int8_recurrent(kind: str, layers: int, *, obs_dim: int = 5, hidden: int = 16, act_dim: int = 2,
                   encoder: int = 0, head: tuple[int, ...] = (32,), activation: str = "elu",
                   seed: int = 0) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """An INT8 QDQ recurrent policy and its state specs (``io.state`` of a manifest)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pre: list[Any] = [Normalize("obs_norm", rng.normal(size=obs_dim).astype(np.float32),
                                rng.uniform(0.5, 2.0, obs_dim).astype(np.float32), 10.0)]
    cell_in = obs_dim
    if encoder:
        enc = torch.nn.Linear(obs_dim, encoder)
        pre += [Linear("encoder", enc.weight.detach().numpy(), enc.bias.detach().numpy()), Activation("relu")]
        cell_in = encoder
    rnn = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(cell_in, hidden, layers)
    sd = {f"rnn.{k}": v.detach().numpy() for k, v in rnn.state_dict().items()}
    cell = RecurrentCell.from_state_dict(kind, sd, "rnn", source="test")
    post: list[Any] = []
    width = hidden
    for i, n in enumerate((*head, act_dim)):
        lin = torch.nn.Linear(width, n)
        post.append(Linear(f"head{i}", lin.weight.detach().numpy(), lin.bias.detach().numpy()))
        if i < len(head):
            post.append(Activation(activation, 1.0 if activation == "elu" else None))
        width = n
    post.append(Clip(-1.0, 1.0))
    graph = recurrent_policy_to_onnx(pre, cell, post, obs_dim, act_dim, f"test_{kind}{layers}")
    state = [s.to_json() for s in graph.state]
    tensors = calibration_tensors(graph.model)
    rt = OrtPolicy(instrumented(graph.model, tensors).SerializeToString(), state=state)
    observers = {t: TensorObserver(t) for t in tensors}
    for step in rng.normal(size=(150, 4, obs_dim)).astype(np.float32) * 2:
        out = rt.run(step, ["actions", *tensors])
        for t in tensors:
            observers[t].update(out[t])
    plan = make_plan(graph.model, observers, calibrator="max")
    return apply_plan(graph.model, plan), state
