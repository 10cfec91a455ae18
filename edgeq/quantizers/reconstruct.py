"""Whole-network output reconstruction (BRECQ-style): every layer's rounding and every input scale at once.

A policy is a handful of layers, so instead of fitting each layer's output in turn (AdaRound), the
rounding variables of **all** quantized weights (int8 and int4, see *Integer grids* below) and the int8
scales of **all** layer inputs are optimized jointly against what matters, the float policy's
**actions** on the calibration states::

    L = mean_n  sum_j  w_nj ((a^_nj - a_nj) / half_range_j)^2  /  L_0

where ``a^`` is the fake-quantized network's action (differentiable: the int8 graph's arithmetic
written in torch), ``a`` the float action, ``w_nj`` optional per-state, per-dimension weights (the
closed-loop sensitivity of :mod:`edgeq.quantizers.sensitivity`; default 1), ``L_0`` the loss of
the starting plan, and ``R`` AdaRound's rounding regularizer.

* Weights: ``W~ = s clip(b + h(V), -qmax, qmax)`` with ``b = clip(floor(W / s), q0 - 1, q0)`` (``q0``
  the plan's integer: the start is exactly the plan, whatever rounding made it, nearest, GPTQ or
  AdaRound) and ``h`` a hard 0/1 choice with a straight-through gradient (started at each weight's
  fractional part); the scales ``s`` stay those of the plan.
* Integer grids (:class:`Grid`): a static int8 layer is ``[-127, 127]`` with one scale per output
  channel; an int4 layer (W4A8, :mod:`edgeq.quantizers.int4`) is ``[-7, 7]`` with one scale per output
  channel or per block of inputs (the per-element scale carries the granularity). A plan that mixes
  them (the precision search's candidates) is reconstructed jointly, int8 and int4 layers together,
  and every layer stays on its own grid.
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

from edgeq.quantizers.adam import Adam
from edgeq.quantizers.int4 import INT4_QMAX, Int4Weight
from edgeq.quantizers.plan import ActivationQuant, LayerQuant, QuantPlan
from edgeq.quantizers.weights import QMAX, QuantizedWeight

__all__ = ["METHODS", "SUPPORTED_OPS", "Grid", "ReconstructResult", "fake_quant_actions", "layer_grid", "reconstruct"]

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
                 "Clip", "Identity", "Constant", "Softplus", "Neg", "Selu", "HardSigmoid", "Flatten", "Gather")


@dataclass(frozen=True)
class ReconstructResult:
    """The reconstructed plan (or the input plan, when not supported) and what happened."""

    plan: QuantPlan
    supported: bool
    report: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Grid:
    """The integer grid of one quantized layer's weight, in the layer's stored orientation.

    Attributes:
        q: The plan's integers (int8 array; the reconstruction's start).
        scale: float32, the scale of every element (the weight's shape): per output channel, or per
            block of inputs for blocked int4.
        qmax: Largest magnitude (127 for int8, 7 for int4).
        live: Elements of groups (channels or blocks) that hold a non-zero integer; a group quantized to
            all zeros (a dead channel, a scale that was not a normal float) stays zero.
        group: int64, the index of every element's scale in the stored scale array (flattened, C order):
            the granularity (per channel or per block).
    """

    q: np.ndarray
    scale: np.ndarray
    qmax: int
    live: np.ndarray
    group: np.ndarray

    def with_integers(self, layer: LayerQuant, q: np.ndarray, scale: np.ndarray | None = None,
                      rounding: str = "brecq") -> LayerQuant:
        """``layer`` with its weight's integers replaced by ``q`` (same grid) and, given, its stored scales by
        ``scale`` (one per group, in the order of :attr:`group`)."""
        q8 = np.asarray(q).astype(np.int8)
        if layer.precision == "int4":
            w4 = layer.weight4
            assert w4 is not None
            s4 = w4.scale.copy() if scale is None else np.asarray(scale, np.float32).reshape(w4.scale.shape)
            return replace(layer, weight4=Int4Weight(q8, s4, w4.axis, w4.block_size), rounding=rounding,
                           notes={**layer.notes, "brecq_start_rounding": layer.rounding})
        w8 = layer.weight
        assert w8 is not None
        s8 = w8.scale.copy() if scale is None else np.asarray(scale, np.float32).reshape(w8.scale.shape)
        return replace(layer, weight=QuantizedWeight(q8, s8, w8.axis), rounding=rounding)


def layer_grid(layer: LayerQuant) -> Grid | None:
    """The grid of a static int8 layer or an int4 (W4A8) layer; None for any other layer."""
    if layer.precision == "int4" and layer.weight4 is not None:
        w4 = layer.weight4
        q_oi, _ = w4.out_in()
        block = q_oi.shape[1] if w4.block_size == 0 else w4.block_size
        nb = w4.blocks
        pad = nb * block - q_oi.shape[1]
        g = np.concatenate([q_oi, np.zeros((len(q_oi), pad), np.int8)], axis=1).reshape(len(q_oi), nb, block)
        live_oi = np.repeat(np.any(g != 0, axis=2), block, axis=1)[:, : q_oi.shape[1]]
        live = live_oi if w4.axis == 0 else live_oi.T
        idx = np.arange(w4.scale.size, dtype=np.int64).reshape(w4.scale.shape)
        if w4.block_size == 0:
            shape = [1, 1]
            shape[w4.axis] = w4.scale.size
            group = np.broadcast_to(idx.reshape(shape), w4.q.shape)
        else:
            k = w4.q.shape[w4.in_axis]
            group = np.repeat(idx, w4.block_size, axis=w4.in_axis).take(range(k), axis=w4.in_axis)
        return Grid(w4.q, np.ascontiguousarray(w4.scale_full(), np.float32), INT4_QMAX, np.ascontiguousarray(live),
                    np.ascontiguousarray(group))
    if layer.precision == "int8" and layer.scheme == "static" and layer.weight is not None:
        w8 = layer.weight
        other = tuple(i for i in range(w8.q.ndim) if i != w8.axis)
        live = np.broadcast_to(np.any(w8.q != 0, axis=other, keepdims=True), w8.q.shape)
        group = np.broadcast_to(np.arange(w8.scale.size, dtype=np.int64).reshape(w8.scale_broadcast().shape),
                                w8.q.shape)
        return Grid(w8.q, np.broadcast_to(w8.scale_broadcast(), w8.q.shape).astype(np.float32), QMAX,
                    np.ascontiguousarray(live), np.ascontiguousarray(group))
    return None


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
            elif op == "Gather":  # constant indices (an input split's duplicated columns)
                y = torch.index_select(ins[0], int(a.get("axis", 0)) % ins[0].dim(), ins[1].long().reshape(-1))
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
                patience: int = 0, learn_weight_scales: bool = False, weight_scale_lr: float = 5e-4,
                learn_bias: bool = False, bias_lr: float = 1e-3, method: str = "brecq", rho: float = 200.0,
                grad_clamp: float = 1.0, start_margin: float = 0.0, tail_weight: float = 0.0,
                tail_fraction: float = 0.02) -> ReconstructResult:
    """Jointly round every static int8 and int4 layer's weight and learn every input scale of ``plan``.

    ``method="discquant"`` is DiscQuant's rounding (see :data:`METHODS`): the weights interpolate
    continuously between their two grid points, the gradient is ``-c + clamp(rho ∇L, ±grad_clamp)``,
    the scales stay fixed.

    Args:
        work: The float graph with the plan's exact rewrites applied (the graph the plan's weights belong to).
        plan: The starting plan (its integers are the starting rounding; its weight scales, per channel
            or per int4 block, are kept). Each layer stays on its own grid (:func:`layer_grid`).
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
        learn_weight_scales, weight_scale_lr: Also learn every weight scale group (per channel, per int4
            block) in log space (LSQ): the grid is rescaled, its integers stay in range; the stored float32
            scales change.
        learn_bias, bias_lr: Also learn the float bias of every layer whose bias the exported file
            carries (a Gemm's C input, any int4 layer's bias): a joint bias correction.
        method: ``brecq`` or ``discquant``; rho, grad_clamp: DiscQuant's loss weight and gradient clamp.
        start_margin: ``brecq``: a plan integer that is not the float weight's nearest (a GPTQ or AdaRound
            start) starts this far inside its side of the 1/2 threshold (0: on it, where the first Adam steps
            flip them all at once); nearest-rounded integers start at their fractional part either way.
        tail_weight, tail_fraction: A tail-aware (CVaR) loss: the mean per-state error plus ``tail_weight`` times
            the mean of the worst ``tail_fraction`` of the states in each batch (and in the evaluation rows that
            choose the best point); 0: the plain mean.
    """
    if method not in METHODS:
        raise ValueError(f"reconstruction method must be one of {METHODS}, got {method!r}")
    import torch

    unsupported = sorted({n.op_type for n in work.graph.node if n.op_type not in SUPPORTED_OPS})
    layers = [la for la in plan.layers if layer_grid(la) is not None]
    if unsupported or not layers or len(work.graph.input) != 1 or len(work.graph.output) != 1:
        why = (f"ops {unsupported} are not in the reconstruction interpreter" if unsupported else
               "no static int8 or int4 layer" if not layers else "a graph with one input and one output is needed")
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
                            patience=patience, t0=t0, learn_weight_scales=learn_weight_scales and method == "brecq",
                            weight_scale_lr=weight_scale_lr, learn_bias=learn_bias and method == "brecq",
                            bias_lr=bias_lr, method=method, rho=rho, grad_clamp=grad_clamp, start_margin=start_margin,
                            tail_weight=tail_weight, tail_fraction=tail_fraction)
    finally:
        torch.set_num_threads(threads)


def _reconstruct(work: onnx.ModelProto, plan: QuantPlan, layers: list[Any], inits: dict[str, np.ndarray],
                 states: np.ndarray, half_range: np.ndarray, state_weights: np.ndarray | None, *, iters: int,
                 batch: int, lr: float, scale_lr: float, eval_every: int, eval_rows: int, learn_scales: bool,
                 seed: int, time_limit_s: float, patience: int, t0: float, learn_weight_scales: bool,
                 weight_scale_lr: float, learn_bias: bool, bias_lr: float, method: str = "brecq",
                 rho: float = 200.0, grad_clamp: float = 1.0, start_margin: float = 0.0, tail_weight: float = 0.0,
                 tail_fraction: float = 0.02) -> ReconstructResult:
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
    grids = {la.node: layer_grid(la) for la in layers}
    floor: dict[str, Any] = {}
    scale: dict[str, Any] = {}
    live: dict[str, Any] = {}
    qmax: dict[str, float] = {}
    u: dict[str, Any] = {}
    group: dict[str, Any] = {}
    log_ws: dict[str, Any] = {}
    plan_up: dict[str, np.ndarray] = {}
    c_lin: dict[str, Any] = {}  # DiscQuant's linear term 2y - 1 (y: the weight's place between its grid points)
    for la in layers:
        grid = grids[la.node]
        assert grid is not None
        w = np.asarray(inits[la.weight_name], np.float64)
        s = grid.scale.astype(np.float64)
        q0 = grid.q.astype(np.float64)
        # the lower of the two integers a weight may take: its floor, moved next to the plan's integer
        # (GPTQ/AdaRound may have put it elsewhere) so that the start is exactly the plan
        f = np.clip(np.floor(w / s), q0 - 1.0, q0)
        frac = np.clip(w / s - f, 0.0, 1.0)
        up = q0 - f >= 1.0
        # a plan integer that is not the float weight's nearest (GPTQ, AdaRound) starts start_margin inside its
        # side of 1/2, not on it: else Adam's first steps flip all of them at once on one mini-batch's gradient
        m = float(start_margin)
        u0 = (np.where(up, np.maximum(frac, 0.5 + m * (frac < 0.5)), np.minimum(frac, 0.499 - m * (frac >= 0.5)))
              if method == "brecq" else frac)
        c_lin[la.node] = torch.from_numpy((2.0 * frac - 1.0).astype(np.float32))
        plan_up[la.node] = up
        floor[la.node] = torch.from_numpy(f.astype(np.float32))
        scale[la.node] = torch.from_numpy(s.astype(np.float32))
        live[la.node] = torch.from_numpy(grid.live.astype(np.float32))
        qmax[la.node] = float(grid.qmax)
        u[la.node] = torch.nn.Parameter(torch.from_numpy(u0.astype(np.float32)))
        group[la.node] = torch.from_numpy(grid.group)
        log_ws[la.node] = torch.nn.Parameter(torch.zeros(int(grid.group.max()) + 1 if grid.group.size else 0))
    acts = sorted({la.input for la in layers})
    log_amax = {t: torch.nn.Parameter(torch.tensor(float(np.log(max(plan.activations[t].amax, 1e-12))),
                                                   dtype=torch.float32)) for t in acts}
    biases: dict[str, Any] = {}
    for la in layers:
        b = _exported_bias(work, la, inits, include_graph_bias=learn_bias)
        if b is not None:
            biases[la.node] = torch.from_numpy(b)
    if learn_bias:
        biases = {k: torch.nn.Parameter(v) for k, v in biases.items()}

    def fq(x: Any, t: str) -> Any:
        s = torch.exp(log_amax[t]) / 127.0
        z = x / s
        z = z + (torch.round(z) - z).detach()  # straight-through rounding (LSQ gradient for the scale)
        return torch.clamp(z, -128.0, 127.0) * s

    def weight(node: str) -> Any:
        if method == "discquant":  # the continuous interpolation between the two grid points
            return scale[node] * torch.clamp(floor[node] + u[node], -qmax[node], qmax[node]) * live[node]
        h = u[node] + ((u[node] >= 0.5).float() - u[node]).detach()  # hard forward, straight-through backward
        s = scale[node] * torch.exp(log_ws[node])[group[node]] if learn_weight_scales else scale[node]
        return s * torch.clamp(floor[node] + h, -qmax[node], qmax[node]) * live[node]

    def layer_fn(n: onnx.NodeProto, x: Any) -> Any:
        la = by_node.get(n.name)
        if la is None:
            return _float_layer(n, x, tinits)
        return _float_layer(n, fq(x, la.input), tinits, weight=weight(n.name), bias=biases.get(n.name))

    def loss_of(a: Any, ref: Any, wts: Any) -> Any:
        e = ((a - ref) / hr) ** 2
        if wts is not None:
            e = e * wts
        rows = e.sum(dim=1)
        if tail_weight <= 0:
            return rows.mean()
        k = max(1, int(round(tail_fraction * rows.shape[0])))
        return rows.mean() + tail_weight * torch.topk(rows, k).values.mean()

    gen = torch.Generator().manual_seed(seed)
    n_rows = len(x_all)
    ev = torch.randperm(n_rows, generator=gen)[: min(eval_rows, n_rows)]

    def snapshot() -> tuple[dict[str, Any], dict[str, float], dict[str, Any], dict[str, Any]]:
        return ({k: (p.detach() >= 0.5).clone() for k, p in u.items()},
                {t: float(torch.exp(p.detach())) for t, p in log_amax.items()},
                {k: p.detach().clone() for k, p in log_ws.items()}, {k: p.detach().clone() for k, p in biases.items()})

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
    if learn_weight_scales:
        params.append({"params": list(log_ws.values()), "lr": weight_scale_lr})
    if learn_bias and biases:
        params.append({"params": list(biases.values()), "lr": bias_lr})
    optim = Adam(params)
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
    up_best, amax_best, log_ws_best, bias_best = best_state
    new_layers = []
    flipped = total = 0
    changed: dict[str, float] = {}
    for la in plan.layers:
        grid = grids.get(la.node)
        if grid is not None:
            q = (torch.clamp(floor[la.node] + up_best[la.node].float(), -qmax[la.node], qmax[la.node])
                 * live[la.node]).numpy()
            q8 = q.astype(np.int8)
            n_flip = int(np.sum(q8 != grid.q))
            flipped += n_flip
            total += q8.size
            changed[la.node] = round(n_flip / max(q8.size, 1), 6)
            new_scale = None
            if learn_weight_scales:
                old_w = la.weight4 if la.precision == "int4" else la.weight
                assert old_w is not None
                new_scale = (old_w.scale.reshape(-1) * np.exp(log_ws_best[la.node].numpy())).astype(np.float32)
            la = grid.with_integers(la, q8, new_scale, rounding=method)
            if learn_bias and la.node in bias_best:
                la = replace(la, bias=bias_best[la.node].numpy().astype(np.float32).copy())
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
              "changed_weight_fraction_by_layer": changed,
              "grids": {n: f"{by_node[n].precision} [-{int(qmax[n])}, {int(qmax[n])}]" for n in by_node},
              "amax_ratio": {t: round(float(new_acts[t].amax / plan.activations[t].amax), 4) for t in acts},
              "learn_scales": learn_scales, "learn_weight_scales": learn_weight_scales, "learn_bias": learn_bias,
              "weighted": sw is not None, "method": method,
              **({"rho": rho, "grad_clamp": grad_clamp, "lr": lr} if method == "discquant" else {})}
    return ReconstructResult(replace(plan, layers=new_layers, activations=new_acts), True, report)


def _exported_bias(work: onnx.ModelProto, layer: LayerQuant, inits: dict[str, np.ndarray], *,
                   include_graph_bias: bool) -> np.ndarray | None:
    """The bias the exported file gives ``layer`` where it differs from the graph's (a corrected Gemm C, any
    int4 layer's corrected bias); with ``include_graph_bias`` also a Gemm's own C (to be learned)."""
    node = next((n for n in work.graph.node if n.name == layer.node), None)
    c_name = (node.input[2] if node is not None and node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
              else None)
    if layer.bias is not None and (c_name is not None or layer.precision == "int4"):
        return np.asarray(layer.bias, np.float32).reshape(-1).copy()
    if include_graph_bias and c_name is not None:
        return np.asarray(inits[c_name], np.float32).reshape(-1).copy()
    return None


def fake_quant_actions(work: onnx.ModelProto, plan: QuantPlan, states: np.ndarray) -> np.ndarray:
    """The actions of ``plan`` on ``states`` as the reconstruction models its arithmetic (torch, float32): each
    static int8 / int4 layer's input fake-quantized to int8 at the plan's scale (round half to even, saturated
    to ``[-128, 127]``), its weight the plan's integers times their scales, its bias the exported one; every
    other layer in float. What ONNX Runtime computes from ``apply_plan(work, plan)`` up to float rounding
    (tests/test_int4_reconstruct.py checks it), so the optimized loss is the exported file's."""
    import torch

    unsupported = sorted({n.op_type for n in work.graph.node if n.op_type not in SUPPORTED_OPS})
    if unsupported:
        raise ValueError(f"ops {unsupported} are not in the reconstruction interpreter")
    inits = {t.name: np.array(numpy_helper.to_array(t)) for t in work.graph.initializer}
    tinits: dict[str, Any] = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in inits.items()}
    by_node = {la.node: la for la in plan.layers if layer_grid(la) is not None}

    def layer_fn(n: onnx.NodeProto, x: Any) -> Any:
        la = by_node.get(n.name)
        if la is None:
            return _float_layer(n, x, tinits)
        grid = layer_grid(la)
        assert grid is not None
        s = float(plan.activations[la.input].scale)
        xq = torch.clamp(torch.round(x / s), -128.0, 127.0) * s
        w = torch.from_numpy(grid.q.astype(np.float32) * grid.scale)
        b = _exported_bias(work, la, inits, include_graph_bias=False)
        return _float_layer(n, xq, tinits, weight=w, bias=None if b is None else torch.from_numpy(b))

    with torch.no_grad():
        out = _interpreter(work)(torch.from_numpy(np.ascontiguousarray(states, np.float32)), layer_fn)
    return np.asarray(out.numpy(), np.float32)


def _tensor(v: Any) -> Any:
    import torch

    return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, np.float32))


def _float_layer(n: onnx.NodeProto, x: Any, inits: dict[str, Any], *, weight: Any = None,
                 bias: Any = None) -> Any:
    """A Gemm/MatMul with a constant weight (``weight`` overrides the stored one, same layout; ``bias`` the C input)."""

    w = weight if weight is not None else _tensor(inits[n.input[1]])
    if n.op_type == "MatMul":
        return x @ w if bias is None else x @ w + bias
    a = _attrs(n)
    aa = x.T if a.get("transA", 0) else x
    y = a.get("alpha", 1.0) * (aa @ (w.T if a.get("transB", 0) else w))
    if len(n.input) > 2 and n.input[2]:
        c = bias if bias is not None else _tensor(inits[n.input[2]])
        y = y + a.get("beta", 1.0) * c
    return y
