"""Whole-network output reconstruction (BRECQ-style): every layer's rounding and every input scale at once.

A policy is a handful of layers, so instead of fitting each layer's output in turn (AdaRound), the
rounding variables of **all** int8 weights and the int8 scales of **all** layer inputs are optimized
jointly against what matters, the float policy's **actions** on the calibration states::

    L = mean_n  sum_j  w_nj ((a^_nj - a_nj) / half_range_j)^2  /  L_0

where ``a^`` is the fake-quantized network's action (differentiable: the int8 graph's arithmetic
written in torch), ``a`` the float action, ``w_nj`` optional per-state, per-dimension weights (the
closed-loop sensitivity of :mod:`edgeq.quantizers.sensitivity`; default 1), ``L_0`` the loss of
the starting plan, and ``R`` AdaRound's rounding regularizer.

* Weights: ``W~ = s (floor(W / s) + h(V))`` per output channel, ``h`` AdaRound's rectified sigmoid
  (started at each weight's fractional part, so the first forward is the float weight); the
  per-channel scales ``s`` stay those of the plan.
* Activations: per-tensor ``amax`` (``scale = amax / 127``) learned in log space with the
  straight-through estimator (LSQ); the fake quantizer saturates to ``[-128, 127]`` and rounds half
  to even, as ONNX ``QuantizeLinear``.
* Adam on mini-batches of the calibration states (seeded), ``iters`` steps; every ``eval_every``
  steps the network's loss on fixed calibration rows is measured and the best point (the start
  included) is returned, so the calibration loss never goes up.

The graph is evaluated by a small torch interpreter of the float ONNX graph (Gemm, MatMul, the
elementwise ops and activations policies use); a graph with any other op is reported as not
supported and the plan is returned unchanged. The caller (:func:`edgeq.quantizers.build.build_plan`)
keeps the result only if the real ONNX Runtime graph's held-out action error is lower.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.quantizers.plan import ActivationQuant, QuantPlan
from edgeq.quantizers.weights import QMAX, QuantizedWeight

__all__ = ["METHODS", "SUPPORTED_OPS", "ReconstructResult", "reconstruct"]

#: ``brecq``: AdaRound-style hard rounding variables (straight-through) and learned input scales.
#: ``discquant``: DiscQuant (Chee et al. 2025): each weight is ``s (floor(W/s) + x)`` with ``x`` in ``[0, 1]``
#: started at the float weight (``x = y``, its fractional part), optimized by projected gradient steps on
#: ``rho L(x) - <2y - 1, x>`` (the loss gradient clamped to ``±grad_clamp``): the linear term pulls the
#: relaxed point to a vertex of the rounding polytope (towards nearest rounding) while the action loss moves
#: the weights that matter; the result is rounded (``x >= 1/2``). The input scales stay the plan's.
METHODS = ("brecq", "discquant")

_DEBUG = bool(__import__("os").environ.get("EDGEQ_RECONSTRUCT_DEBUG"))

#: ONNX ops the torch interpreter evaluates.
SUPPORTED_OPS = ("Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Tanh", "Sigmoid", "Elu", "LeakyRelu",
                 "Clip", "Identity", "Constant", "Softplus", "Neg", "Selu", "HardSigmoid", "Flatten")


@dataclass(frozen=True)
class ReconstructResult:
    """The reconstructed plan (or the input plan, when not supported) and what happened."""

    plan: QuantPlan
    supported: bool
    report: dict[str, Any]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _interpreter(model: onnx.ModelProto) -> Callable[..., Any]:
    """``run(x, layer_fn)``: the graph in torch; ``layer_fn(node, x_input, default)`` evaluates weighted layers."""
    import torch

    consts = {t.name: torch.from_numpy(np.array(numpy_helper.to_array(t), np.float32)) for t in model.graph.initializer}
    nodes = list(model.graph.node)
    for n in nodes:
        if n.op_type == "Constant":
            consts[n.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(_attrs(n)["value"]), np.float32))
    in_name, out_name = model.graph.input[0].name, model.graph.output[0].name

    def run(x: Any, layer_fn: Callable[[onnx.NodeProto, Any], Any]) -> Any:
        env: dict[str, Any] = {in_name: x, **consts}
        for n in nodes:
            op, a = n.op_type, _attrs(n)
            ins: list[Any] = [env[i] if i else None for i in n.input]
            if op == "Constant":
                continue
            if op in ("Gemm", "MatMul") and n.input[1] in consts:
                y = layer_fn(n, ins[0])
            elif op == "Gemm":
                aa = ins[0].T if a.get("transA", 0) else ins[0]
                bb = ins[1].T if a.get("transB", 0) else ins[1]
                y = a.get("alpha", 1.0) * (aa @ bb)
                if len(ins) > 2 and ins[2] is not None:
                    y = y + a.get("beta", 1.0) * ins[2]
            elif op == "MatMul":
                y = ins[0] @ ins[1]
            elif op == "Add":
                y = ins[0] + ins[1]
            elif op == "Sub":
                y = ins[0] - ins[1]
            elif op == "Mul":
                y = ins[0] * ins[1]
            elif op == "Div":
                y = ins[0] / ins[1]
            elif op == "Relu":
                y = torch.relu(ins[0])
            elif op == "Tanh":
                y = torch.tanh(ins[0])
            elif op == "Sigmoid":
                y = torch.sigmoid(ins[0])
            elif op == "Elu":
                y = torch.nn.functional.elu(ins[0], alpha=a.get("alpha", 1.0))
            elif op == "Selu":
                y = torch.nn.functional.selu(ins[0])
            elif op == "LeakyRelu":
                y = torch.nn.functional.leaky_relu(ins[0], a.get("alpha", 0.01))
            elif op == "Softplus":
                y = torch.nn.functional.softplus(ins[0])
            elif op == "HardSigmoid":
                y = torch.clamp(a.get("alpha", 0.2) * ins[0] + a.get("beta", 0.5), 0.0, 1.0)
            elif op == "Neg":
                y = -ins[0]
            elif op == "Flatten":
                y = ins[0].reshape(ins[0].shape[0], -1)
            elif op == "Clip":
                lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
                hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
                y = ins[0]
                if lo is not None:
                    y = torch.maximum(y, torch.as_tensor(lo, dtype=y.dtype))
                if hi is not None:
                    y = torch.minimum(y, torch.as_tensor(hi, dtype=y.dtype))
            elif op == "Identity":
                y = ins[0]
            else:  # pragma: no cover - guarded by the support check
                raise NotImplementedError(op)
            env[n.output[0]] = y
        return env[out_name]

    return run


def reconstruct(work: onnx.ModelProto, plan: QuantPlan, states: np.ndarray, half_range: np.ndarray, *,
                state_weights: np.ndarray | None = None, iters: int = 1000, batch: int = 512,
                lr: float = 0.005, scale_lr: float = 2e-3, eval_every: int = 25, eval_rows: int = 4096,
                learn_scales: bool = True, seed: int = 0, time_limit_s: float = 120.0,
                patience: int = 0, method: str = "brecq", rho: float = 200.0,
                grad_clamp: float = 1.0) -> ReconstructResult:
    """Jointly round every static int8 layer's weight and learn every input scale of ``plan``.

    ``method="discquant"`` is DiscQuant's rounding (see :data:`METHODS`): the weights interpolate
    continuously between their two grid points, the gradient is ``-c + clamp(rho ∇L, ±grad_clamp)``,
    the scales stay fixed.

    Args:
        work: The float graph with the plan's exact rewrites applied (the graph the plan's weights belong to).
        plan: The starting plan (its integers are the starting rounding; its per-channel weight
            scales are kept).
        states: ``[N, obs]`` calibration states.
        half_range: Action half-ranges (the units of the error).
        state_weights: Optional ``[N]`` or ``[N, act]`` non-negative weights of the squared errors.
        iters, batch, lr, scale_lr: Adam steps, mini-batch rows, learning rates of the rounding
            variables and of the log-amax.
        eval_every, eval_rows: Every this many steps the hard-rounded network's loss on (at most)
            ``eval_rows`` fixed calibration rows is measured; the best point (the start included) is
            returned.
        learn_scales: Also learn the activation scales (else only the rounding).
        seed: Mini-batch order.
        time_limit_s: Stop the optimization after this many seconds.
        patience: Stop after this many evaluations without a better point (0: run every step).
        method: ``brecq`` or ``discquant``; rho, grad_clamp: DiscQuant's loss weight and gradient clamp.
    """
    if method not in METHODS:
        raise ValueError(f"reconstruction method must be one of {METHODS}, got {method!r}")
    import torch

    unsupported = sorted({n.op_type for n in work.graph.node if n.op_type not in SUPPORTED_OPS})
    layers = [la for la in plan.int8_layers() if la.scheme == "static"]
    if unsupported or not layers or len(work.graph.input) != 1 or len(work.graph.output) != 1:
        why = (f"ops {unsupported} are not in the reconstruction interpreter" if unsupported else
               "no static int8 layer" if not layers else "a graph with one input and one output is needed")
        return ReconstructResult(plan, False, {"supported": False, "reason": why})
    t0 = time.perf_counter()
    inits = {t.name: np.array(numpy_helper.to_array(t)) for t in work.graph.initializer}
    inits.update({n.output[0]: np.array(numpy_helper.to_array(_attrs(n)["value"])) for n in work.graph.node
                  if n.op_type == "Constant"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and polite on a shared machine
    try:
        return _reconstruct(work, plan, layers, inits, states, half_range, state_weights, iters=iters, batch=batch,
                            lr=lr, scale_lr=scale_lr, eval_every=eval_every, eval_rows=eval_rows,
                            learn_scales=learn_scales and method == "brecq", seed=seed, time_limit_s=time_limit_s,
                            patience=patience, t0=t0, method=method, rho=rho, grad_clamp=grad_clamp)
    finally:
        torch.set_num_threads(threads)


def _reconstruct(work: onnx.ModelProto, plan: QuantPlan, layers: list[Any], inits: dict[str, np.ndarray],
                 states: np.ndarray, half_range: np.ndarray, state_weights: np.ndarray | None, *, iters: int,
                 batch: int, lr: float, scale_lr: float, eval_every: int, eval_rows: int, learn_scales: bool,
                 seed: int, time_limit_s: float, patience: int, t0: float, method: str = "brecq",
                 rho: float = 200.0, grad_clamp: float = 1.0) -> ReconstructResult:
    import torch

    run = _interpreter(work)
    tinits: dict[str, Any] = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in inits.items()}  # once
    x_all = torch.from_numpy(np.ascontiguousarray(states, np.float32))
    hr = torch.from_numpy(np.asarray(half_range, np.float32).reshape(1, -1))
    with torch.no_grad():
        target = run(x_all, lambda n, x: _float_layer(n, x, tinits))
    sw = None
    if state_weights is not None:
        sw_np = np.asarray(state_weights, np.float32)
        sw = torch.from_numpy(sw_np.reshape(len(sw_np), -1))

    by_node = {la.node: la for la in layers}
    floor: dict[str, Any] = {}
    scale: dict[str, Any] = {}
    live: dict[str, Any] = {}
    u: dict[str, Any] = {}
    plan_up: dict[str, np.ndarray] = {}
    c_lin: dict[str, Any] = {}  # DiscQuant's linear term 2y - 1 (y: the weight's place between its grid points)
    for la in layers:
        assert la.weight is not None
        w = np.asarray(inits[la.weight_name], np.float64)
        s = la.weight.scale_broadcast().astype(np.float64)
        f = np.floor(w / s)
        frac = np.clip(w / s - f, 0.0, 1.0)
        up = la.weight.q.astype(np.float64) - f >= 1.0  # the plan's own rounding is the start
        u0 = np.where(up, np.maximum(frac, 0.5), np.minimum(frac, 0.499)) if method == "brecq" else frac
        c_lin[la.node] = torch.from_numpy((2.0 * frac - 1.0).astype(np.float32))
        plan_up[la.node] = up
        floor[la.node] = torch.from_numpy(f.astype(np.float32))
        scale[la.node] = torch.from_numpy(s.astype(np.float32))
        dead = np.all(la.weight.q == 0, axis=tuple(i for i in range(w.ndim) if i != la.weight_axis), keepdims=True)
        live[la.node] = torch.from_numpy(np.broadcast_to(~dead, w.shape).astype(np.float32))
        u[la.node] = torch.nn.Parameter(torch.from_numpy(u0.astype(np.float32)))
    acts = sorted({la.input for la in layers})
    log_amax = {t: torch.nn.Parameter(torch.tensor(float(np.log(max(plan.activations[t].amax, 1e-12))),
                                                   dtype=torch.float32)) for t in acts}
    biases = {la.node: torch.from_numpy(np.asarray(la.bias, np.float32).reshape(-1)) for la in layers
              if la.bias is not None}

    def fq(x: Any, t: str) -> Any:
        s = torch.exp(log_amax[t]) / 127.0
        z = x / s
        z = z + (torch.round(z) - z).detach()  # straight-through rounding (LSQ gradient for the scale)
        return torch.clamp(z, -128.0, 127.0) * s

    def weight(node: str) -> Any:
        if method == "discquant":  # the continuous interpolation between the two grid points
            return scale[node] * torch.clamp(floor[node] + u[node], -QMAX, QMAX) * live[node]
        h = u[node] + ((u[node] >= 0.5).float() - u[node]).detach()  # hard forward, straight-through backward
        return scale[node] * torch.clamp(floor[node] + h, -QMAX, QMAX) * live[node]

    def layer_fn(n: onnx.NodeProto, x: Any) -> Any:
        la = by_node.get(n.name)
        if la is None:
            return _float_layer(n, x, tinits)
        return _float_layer(n, fq(x, la.input), tinits, weight=weight(n.name), bias=biases.get(n.name))

    def loss_of(a: Any, ref: Any, wts: Any) -> Any:
        e = ((a - ref) / hr) ** 2
        if wts is not None:
            e = e * wts
        return e.sum(dim=1).mean()

    gen = torch.Generator().manual_seed(seed)
    n_rows = len(x_all)
    ev = torch.randperm(n_rows, generator=gen)[: min(eval_rows, n_rows)]

    def snapshot() -> tuple[dict[str, Any], dict[str, float]]:
        return ({k: (p.detach() >= 0.5).clone() for k, p in u.items()},
                {t: float(torch.exp(p.detach())) for t, p in log_amax.items()})

    def eval_loss() -> float:
        """The hard-rounded network's loss (DiscQuant: its relaxed weights rounded to the nearer grid point)."""
        with torch.no_grad():
            soft = {k: p.detach().clone() for k, p in u.items()} if method == "discquant" else {}
            for k, v in soft.items():
                u[k].copy_((v >= 0.5).float())
            try:
                return float(loss_of(run(x_all[ev], layer_fn), target[ev], None if sw is None else sw[ev]))
            finally:
                for k, v in soft.items():
                    u[k].copy_(v)

    if method == "discquant":  # the start that counts is the plan's own rounding (x starts at the float weight)
        with torch.no_grad():
            relaxed = {k: p.detach().clone() for k, p in u.items()}
            for k, p in u.items():
                p.copy_(torch.from_numpy(plan_up[k].astype(np.float32)))
            loss0, start_state = eval_loss(), snapshot()
            for k, p in u.items():
                p.copy_(relaxed[k])
    else:
        loss0, start_state = eval_loss(), snapshot()
    best, best_state, best_it = loss0, start_state, 0
    norm = max(loss0, 1e-12)
    params = [{"params": list(u.values()), "lr": lr}]
    if learn_scales:
        params.append({"params": list(log_amax.values()), "lr": scale_lr})
    optim = torch.optim.Adam(params)
    done = 0
    for it in range(int(iters)):
        if time.perf_counter() - t0 > time_limit_s:
            break
        idx = torch.randint(0, n_rows, (min(batch, n_rows),), generator=gen)
        loss = loss_of(run(x_all[idx], layer_fn), target[idx], None if sw is None else sw[idx]) / norm
        optim.zero_grad()
        loss.backward()
        if method == "discquant":  # -c pulls each weight to its nearer grid point, the loss keeps the actions
            with torch.no_grad():
                for k, p in u.items():
                    assert p.grad is not None
                    p.grad.copy_(-c_lin[k] + torch.clamp(rho * p.grad, -grad_clamp, grad_clamp))
        optim.step()
        with torch.no_grad():
            for p in u.values():
                p.clamp_(0.0, 1.0)
        done = it + 1
        if done % max(1, eval_every) == 0 or done == iters:
            e = eval_loss()
            if _DEBUG:
                print(done, float(loss), e / norm)
            if e < best:
                best, best_state, best_it = e, snapshot(), done
            elif patience and done - best_it >= patience * max(1, eval_every):
                break  # no better point for `patience` evaluations
    up_best, amax_best = best_state
    new_layers = []
    flipped = total = 0
    for la in plan.layers:
        if la.node in by_node:
            assert la.weight is not None
            q = (torch.clamp(floor[la.node] + up_best[la.node].float(), -QMAX, QMAX) * live[la.node]).numpy()
            q8 = q.astype(np.int8)
            flipped += int(np.sum(q8 != la.weight.q))
            total += q8.size
            la = replace(la, weight=QuantizedWeight(q8, la.weight.scale.copy(), la.weight.axis), rounding=method)
        new_layers.append(la)
    new_acts = dict(plan.activations)
    for t in acts:
        old = plan.activations[t]
        if learn_scales and amax_best[t] != old.amax:  # (a fixed scale would only pick up exp(log()) rounding)
            new_acts[t] = ActivationQuant(t, amax_best[t], old.calibrator,
                                          {**old.params, "reconstructed_from_amax": old.amax})
    report = {"supported": True, "iters": done, "best_iter": best_it, "seconds": round(time.perf_counter() - t0, 2),
              "calibration_loss_start": loss0, "calibration_loss_best": best,
              "changed_weight_fraction": round(flipped / max(total, 1), 6),
              "amax_ratio": {t: round(float(new_acts[t].amax / plan.activations[t].amax), 4) for t in acts},
              "learn_scales": learn_scales, "weighted": sw is not None, "method": method,
              **({"rho": rho, "grad_clamp": grad_clamp, "lr": lr} if method == "discquant" else {})}
    return ReconstructResult(replace(plan, layers=new_layers, activations=new_acts), True, report)


def _tensor(v: Any) -> Any:
    import torch

    return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, np.float32))


def _float_layer(n: onnx.NodeProto, x: Any, inits: dict[str, Any], *, weight: Any = None,
                 bias: Any = None) -> Any:
    """A Gemm/MatMul with a constant weight (``weight`` overrides the stored one, same layout; ``bias`` the C input)."""

    w = weight if weight is not None else _tensor(inits[n.input[1]])
    if n.op_type == "MatMul":
        return x @ w
    a = _attrs(n)
    aa = x.T if a.get("transA", 0) else x
    y = a.get("alpha", 1.0) * (aa @ (w.T if a.get("transB", 0) else w))
    if len(n.input) > 2 and n.input[2]:
        c = bias if bias is not None else _tensor(inits[n.input[2]])
        y = y + a.get("beta", 1.0) * c
    return y
