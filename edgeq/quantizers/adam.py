"""Adam for the quantizers' small gradient fits, without ``torch.optim``.

Constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (about 1.5 s a process on the
project's 2-core machine: longer than the AffineQuant fit it serves on a small policy). :class:`Adam`
is the update of ``torch.optim.Adam``'s default CPU path (single-tensor; no AMSGrad, weight decay or
maximize), operation for operation, so a fit gives the same bits as it did with ``torch.optim.Adam``
(``tests/test_adam.py`` compares them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Adam"]


class Adam:
    """Adam over ``params``: tensors, or groups ``{"params": [...], "lr": ...}`` (torch's group form).

    ``zero_grad()`` sets the gradients to None; ``step()`` updates every parameter that has a gradient.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        items = list(params)
        groups: list[Mapping[str, Any]] = items if items and isinstance(items[0], Mapping) else [{"params": items}]
        self.groups: list[tuple[list[Any], float]] = [(list(g["params"]), float(g.get("lr", lr))) for g in groups]
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self._state: dict[int, tuple[Any, Any, list[float]]] = {}

    def zero_grad(self) -> None:
        for ps, _ in self.groups:
            for p in ps:
                p.grad = None

    def step(self) -> None:
        import torch

        b1, b2 = self.beta1, self.beta2
        with torch.no_grad():
            for ps, lr in self.groups:
                for p in ps:
                    if p.grad is None:
                        continue
                    if id(p) not in self._state:
                        self._state[id(p)] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                              torch.zeros_like(p, memory_format=torch.preserve_format), [0.0])
                    exp_avg, exp_avg_sq, steps = self._state[id(p)]
                    steps[0] += 1.0
                    step = steps[0]
                    grad = p.grad
                    exp_avg.lerp_(grad, 1 - b1)
                    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    step_size = lr / (1 - b1**step)
                    bias_correction2_sqrt = (1 - b2**step) ** 0.5
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                    p.addcdiv_(exp_avg, denom, value=-step_size)
