"""edgeq's Adam gives torch.optim.Adam's bits (so the fits that moved off torch.optim kept their results)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.quantizers.adam import Adam
from edgeq.quantizers.affine import learn_input_affine


def _fit(opt: type) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(50, 20, generator=g))
    b = torch.nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(3))
    o = opt([{"params": [a, unused], "lr": 0.01}, {"params": [b], "lr": 0.003}])
    for _ in range(60):
        loss = (a.sin().sum() * b.cos().sum().float()) ** 2 + (a**3).mean()
        o.zero_grad()
        loss.backward()
        o.step()
    assert torch.equal(unused.detach(), torch.ones(3))  # no gradient: not touched
    return a.detach().clone(), b.detach().clone()


def test_adam_matches_torch_optim_bit_for_bit() -> None:
    (a1, b1), (a2, b2) = _fit(torch.optim.Adam), _fit(Adam)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a2, torch.randn(50, 20, generator=torch.Generator().manual_seed(1)))  # it moved


def test_affine_fit_is_the_torch_optim_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2000, 17)) * rng.uniform(0.1, 10, 17)).astype(np.float32)
    w = rng.normal(size=(64, 17))
    mine = learn_input_affine(x, w, np.ones(17), float(np.abs(x).max()), iters=80)
    import edgeq.quantizers.affine as affine

    monkeypatch.setattr(affine, "Adam", torch.optim.Adam)
    ref = learn_input_affine(x, w, np.ones(17), float(np.abs(x).max()), iters=80)
    assert mine.loss_end < mine.loss_start
    assert np.array_equal(mine.factors, ref.factors) and np.array_equal(mine.shift, ref.shift)
