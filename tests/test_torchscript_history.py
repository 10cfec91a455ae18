"""TorchScript history policies (frame stack, causal Transformer, encoder + body .pt files): ingested through
torch.onnx into the same graph as their ONNX twins, history found from the module, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeq.deploy.history import episode_windows
from edgeq.errors import PolicyFormatError
from edgeq.ingest import load_policy
from edgeq.policy import FloatPolicy

FIXTURES = Path(__file__).parent / "fixtures" / "policies"
TS = {"framestack": [FIXTURES / "torchscript-framestack-mlp-pendulum.pt"],
      "transformer": [FIXTURES / "torchscript-transformer-pendulum.pt"],
      "encoder-body": [FIXTURES / "torchscript-encoder-pendulum.pt", FIXTURES / "torchscript-body-pendulum.pt"]}
ONNX = {"framestack": [FIXTURES / "framestack-mlp-pendulum.onnx"],
        "transformer": [FIXTURES / "transformer-pendulum.onnx"],
        "encoder-body": [FIXTURES / "encoder-pendulum.onnx", FIXTURES / "body-pendulum.onnx"]}


def _load(files: list[Path], **kw: object) -> FloatPolicy:
    return load_policy(files[0] if len(files) == 1 else files, **kw)


def _act(fp: FloatPolicy, windows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(fp.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run([fp.output_name], {fp.input_name: windows})[0])


@pytest.mark.parametrize("name", sorted(TS))
def test_torchscript_history_policy_matches_its_onnx_twin(name: str) -> None:
    fp = _load(TS[name], obs_dim=3)
    assert fp.source.kind == "torchscript" and fp.history is not None
    assert (fp.history.length, fp.history.obs_dim, fp.history.reset) == (8, 3, "zeros")
    assert fp.obs_space.shape == (3,) and fp.input_size == 24
    assert fp.source.details["verification"]["max_abs_action_diff"] < 1e-4
    assert [Path(m["path"]).name for m in fp.source.details["modules"]] == [p.name for p in TS[name]]
    rng = np.random.default_rng(0)
    th = rng.uniform(-np.pi, np.pi, (6, 20))
    obs = np.concatenate([episode_windows(np.stack([np.cos(t), np.sin(t), rng.uniform(-8, 8, 20)], -1), 8)
                          for t in th]).astype(np.float32)
    ours, twin = _act(fp, obs), _act(_load(ONNX[name]), obs)
    np.testing.assert_allclose(ours, twin, atol=1e-5)  # the same trained weights, the same policy
    assert np.abs(ours).max() > 0.1  # not a constant


def test_torchscript_transformer_keeps_its_attention_products() -> None:
    from edgeq.graph.analysis import find_activation_matmuls

    fp = _load(TS["transformer"], obs_dim=3)
    assert _load(TS["transformer"], obs_dim=3).model == fp.model  # the export is deterministic
    roles = sorted(a.role for a in find_activation_matmuls(fp.model))
    assert roles == ["attention-scores"] * 2 + ["attention-values"] * 2
    record = json.loads((FIXTURES / "torchscript-transformer-pendulum.json").read_text())
    assert record["weights_from"][0]["path"].endswith("transformer-pendulum.onnx")


def test_torchscript_history_input_errors_name_the_fix() -> None:
    with pytest.raises(PolicyFormatError, match="--env"):
        _load(TS["transformer"])  # no observation size: the module's input shape is unknown
    with pytest.raises(PolicyFormatError, match="none of the inputs"):
        _load(TS["framestack"], obs_dim=3, history=5)  # the module holds 8
    with pytest.raises(PolicyFormatError, match="none of the inputs"):
        _load(TS["framestack"], obs_dim=4)  # the env's observation does not fit


def test_flat_frame_stack_sequential_takes_the_history_option(tmp_path: Path) -> None:
    """A humanoid-gym style export: a scripted Sequential over K * obs_dim stacked features."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4 * 3, 16), torch.nn.ELU(), torch.nn.Linear(16, 2))
    path = tmp_path / "policy.pt"
    torch.jit.script(net).save(str(path))
    fp = load_policy(path, history=4, obs_dim=3)
    assert fp.history is not None and (fp.history.length, fp.history.obs_dim) == (4, 3)
    assert fp.obs_space.shape == (3,) and fp.source.details["modules"] == {"actor": "Sequential"}
    x = np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_act(fp, x), net(torch.from_numpy(x)).numpy(), atol=1e-5)
    with pytest.raises(PolicyFormatError, match="give --history 4"):
        load_policy(path, obs_dim=3)  # 12 inputs, a 3-feature env: the stack length must be given


def test_torchscript_conv1d_encoder_with_stride_padding_dilation_groups(tmp_path: Path) -> None:
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv1d(3, 6, 3, stride=2, padding=1, dilation=2, groups=3), nn.ELU(),
                                      nn.Conv1d(6, 4, 2, padding="same", groups=2), nn.ELU())
            self.head = nn.Linear(4 * 3, 2)

        def forward(self, obs_history: torch.Tensor) -> torch.Tensor:  # [B, 8, 3]
            return torch.tanh(self.head(self.conv(obs_history.transpose(1, 2)).flatten(1)))

    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    module = Encoder().eval()
    torch.jit.script(module).save(str(path))
    with pytest.raises(PolicyFormatError, match=r"history lengths \[7, 8\]; give --history K"):
        load_policy(path, obs_dim=3)  # stride 2 with padding: 7 steps give the head its 3 outputs too
    fp = load_policy(path, obs_dim=3, history=8)
    assert fp.history is not None and fp.history.length == 8
    assert not any(n.op_type == "Conv" for n in fp.model.graph.node)
    assert len(fp.source.details["normalization"]["lowered_convs"]) == 2
    x = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_act(fp, x), module(torch.from_numpy(x).reshape(-1, 8, 3)).numpy(), atol=1e-5)
