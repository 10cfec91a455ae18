"""The fused GPU backend for recurrent (LSTM/GRU) INT8 policies: one kernel per step, replayed as a CUDA graph.

The feed-forward backend (:mod:`edgeq.deploy.fused_mlp`) runs a chain of INT8 layers; a recurrent
policy adds the cell: two INT8 gate products per layer, the gate nonlinearities and the state
update in float, and state that must survive from one call to the next. This module generates one
CUDA kernel for the whole step of a :class:`edgeq.deploy.rnn_plan.RecurrentPlan` (observation
pre-ops and encoder layers, every cell layer, the MLP head), compiles it with NVRTC
(:mod:`edgeq.deploy.cuda`; no torch, no ONNX Runtime), and replays *pinned host → device copy of
the observations (and the reset flags), kernel, device → pinned host copy of the actions* as one
CUDA graph per batch size. The recurrent state ``h`` (and ``c``) stays in device memory between
calls and is updated in place by the kernel; it is never copied to the host on the hot path.

``reset(mask)`` costs no GPU call: it sets a per-row flag in the pinned input buffer, which the
next step's copy carries to the GPU, where the kernel reads those rows' previous state as zeros
(the rows then start new episodes, as ONNX Runtime's zero state feeds do). ``reset()`` flags every
row. As on the CPU (:class:`edgeq.deploy.runtime.RecurrentStateMixin`), a batch of another size
than the carried state's is refused until ``reset()``.

Arithmetic: that of ONNX Runtime's CPU provider on the same ``policy.int8.onnx``, bit for bit
where the CPU's own functions are known (:mod:`edgeq.deploy.rnn_plan`): the INT8 products as
``MatMulIntegerToFloat`` (exact ``dp4a`` int32 accumulation, ``float(acc) * (s * w_scale) + bias``),
``Sigmoid``/``Tanh`` with MLAS's polynomials and ``fmaf`` (the same FMAs as its x86-64 FMA3 kernels),
every other op rounded once (``--fmad=false``: no contraction). ``Elu`` uses ``expm1f`` (as the
feed-forward kernel does), which can differ from the CPU's by an ulp; where that lands a value on the
other side of an int8 rounding boundary the actions differ by about one weight step (measured in
``tests/test_fused_rnn.py`` and ``benchmarks/results/gpu_h200.md``).

Kernel: ``rnn_step_r{R}`` handles ``R`` observations per thread block (256 threads; ``R`` in 1, 2,
4, 8, 16, chosen per batch size by timing, all computing the same bits). Each INT8 product is a
GEMV in which a group of lanes shares one output column and reads its 16-byte weight chunks once
for all ``R`` rows (weights stored ``[N][K]``), accumulating with ``dp4a`` and reducing with warp
shuffles; activations stay in shared memory as int8 between products, the gates as float.
"""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy import cuda
from edgeq.deploy.fused_mlp import (
    SPIN_MAX_BATCH,
    SYNC_MODES,
    FusedProgram,
    _ceil,
    _f,
    _op_code,
    _Params,
    _pow2_floor,
)
from edgeq.deploy.mlp_plan import ElementOp, Layer, UnsupportedGraph
from edgeq.deploy.onnx_graph import load_graph, parse_model
from edgeq.deploy.rnn_plan import (
    LOGISTIC_P,
    LOGISTIC_Q,
    LOGISTIC_RANGE,
    TANH_P,
    TANH_Q,
    TANH_RANGE,
    RecurrentPlan,
    recurrent_plan_from_graph,
)
from edgeq.deploy.runtime import LatencyStats
from edgeq.errors import InputError

THREADS = 256
#: Rows per thread block the kernel is generated for (each a separate kernel; autotuned per batch size).
ROWS = (1, 2, 4, 8, 16)
_MAX_WIDTH = 2048
MAX_GRAPHS = 16


def _device_functions() -> str:
    def poly(name: str, coefficients: tuple[float, ...]) -> list[str]:
        lines = [f"  float {name} = fmaf(x2, {_f(coefficients[0])}, {_f(coefficients[1])});"]
        lines += [f"  {name} = fmaf({name}, x2, {_f(c)});" for c in coefficients[2:]]
        return lines

    out = ["// ONNX Runtime's CPU Sigmoid/Tanh (MLAS, x86-64 FMA3 kernels): clamp, polynomials in x^2 with FMAs",
           "__device__ __forceinline__ float mlas_logistic(float x) {",
           f"  x = fminf(fmaxf(x, {_f(-LOGISTIC_RANGE)}), {_f(LOGISTIC_RANGE)});",
           "  const float x2 = __fmul_rn(x, x);"]
    out += poly("p", LOGISTIC_P) + ["  p = __fmul_rn(p, x);"] + poly("q", LOGISTIC_Q)
    out += ["  return fmaxf(__fadd_rn(__fdiv_rn(p, q), 0.5f), 0.0f);", "}",
            "__device__ __forceinline__ float mlas_tanh(float x) {",
            f"  x = fminf(fmaxf(x, {_f(-TANH_RANGE)}), {_f(TANH_RANGE)});",
            "  const float x2 = __fmul_rn(x, x);"]
    out += poly("p", TANH_P) + ["  p = __fmul_rn(p, x);"] + poly("q", TANH_Q)
    out += ["  return __fdiv_rn(p, q);", "}"]
    return "\n".join(out)


def _ops(ops: list[ElementOp], params: _Params, var: str, idx: str) -> str:
    parts = []
    for o in ops:
        if o.op == "Tanh":
            parts.append(f"{var} = mlas_tanh({var});")
        elif o.op == "Sigmoid":
            parts.append(f"{var} = mlas_logistic({var});")
        else:
            parts.append(_op_code(o, params, var, idx))
    return " ".join(parts)


class RecurrentProgram:
    """The CUDA source, packed weights and constants generated for one :class:`RecurrentPlan`."""

    def __init__(self, plan: RecurrentPlan) -> None:
        self.plan = plan
        layers = plan.int8_layers()
        widest = max(max(la.k, la.n) for la in layers)
        if widest > _MAX_WIDTH:
            raise UnsupportedGraph(f"a layer {widest} wide; the fused recurrent backend runs layers up to {_MAX_WIDTH}")
        for la in layers:
            if not ((not la.in_uint8 and la.in_zero_point == 0) or (la.in_uint8 and la.in_zero_point == 128)):
                raise UnsupportedGraph(f"layer {la.name}: activation zero point {la.in_zero_point}; the fused backend "
                                       "needs symmetric int8 (0) or uint8 with 128")
        self.params = _Params()
        self._wt: list[np.ndarray] = []
        self._wt_size = 0
        self.desc: dict[int, dict[str, Any]] = {}
        for la in layers:
            self.desc[id(la)] = self._pack(la)
        self.wt = np.concatenate(self._wt)
        self.sk = max(16, max(d["kp"] for d in self.desc.values()))  # shared row stride of int8 activations
        h, g = plan.hidden, plan.gates
        self.gw = 4 * h if plan.kind == "lstm" else 6 * h  # floats of gates per row (GRU: ih and hh apart)
        self.source = self._source()
        self.param_array = self.params.array()
        self.kernels = [f"rnn_step_r{r}" for r in ROWS]
        assert g in (3, 4)

    def _pack(self, la: Layer) -> dict[str, Any]:
        k, n = la.k, la.n
        k16 = _ceil(k, 16)
        lpc = min(32, _pow2_floor(k16 // 16))
        iters = -(-k16 // (16 * lpc))
        kp = iters * 16 * lpc
        wt = np.zeros((n, kp), np.int8)
        wt[:, :k] = la.weight.T
        mult = (np.float32(la.in_scale) * la.w_scale).astype(np.float32)
        d = dict(k=k, n=n, kp=kp, lpc=lpc, iters=iters, wt_off=self._wt_size, mult=self.params.add(mult),
                 bias=self.params.add(la.bias), scale=la.in_scale, zp=la.in_zero_point, uint8=la.in_uint8,
                 name=la.name)
        self._wt.append(wt.reshape(-1))
        self._wt_size += wt.size
        return d

    def shared_bytes(self, rows: int) -> int:
        return 2 * rows * self.sk + 4 * rows * (self.gw + self.plan.hidden)

    # -- code generation ---------------------------------------------------------------------------------

    def _gemv(self, la: Layer, src: str, store: str, rows: int, post: str = "") -> list[str]:
        """One INT8 product over ``rows`` rows of ``src`` (int8 shared, stride SK); ``store`` uses v, r, j."""
        d = self.desc[id(la)]
        cpw = 32 // d["lpc"]
        nwarps = THREADS // 32
        return [
            f"  {{ // {d['name']}: {d['k']} -> {d['n']}",
            f"    const int part = lane % {d['lpc']}, sub = lane / {d['lpc']};",
            f"    for (int base = warp * {cpw}; base < {d['n']}; base += {nwarps * cpw}) {{",
            f"      const int j = base + sub; int acc[{rows}];",
            "      #pragma unroll",
            f"      for (int r = 0; r < {rows}; ++r) acc[r] = 0;",
            f"      if (j < {d['n']}) {{",
            f"        const int4* W = reinterpret_cast<const int4*>(WT + {d['wt_off']} + (size_t)j * {d['kp']});",
            "        #pragma unroll 4",
            f"        for (int it = 0; it < {d['iters']}; ++it) {{",
            f"          const int4 w = __ldg(W + part + it * {d['lpc']});",
            "          #pragma unroll",
            f"          for (int r = 0; r < {rows}; ++r) {{",
            f"            const int4 a = reinterpret_cast<const int4*>({src} + r * SK)[part + it * {d['lpc']}];",
            "            acc[r] = __dp4a(a.x, w.x, acc[r]); acc[r] = __dp4a(a.y, w.y, acc[r]);",
            "            acc[r] = __dp4a(a.z, w.z, acc[r]); acc[r] = __dp4a(a.w, w.w, acc[r]);",
            "          }",
            "        }",
            "      }",
            "      #pragma unroll",
            f"      for (int r = 0; r < {rows}; ++r) {{",
            "        int a = acc[r];",
            "        #pragma unroll",
            f"        for (int o = {d['lpc']} / 2; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);",
            "        acc[r] = a;",
            "      }",
            f"      if (part == 0 && j < {d['n']}) {{",
            f"        const float m = P[{d['mult']} + j], b = P[{d['bias']} + j];",
            "        #pragma unroll",
            f"        for (int r = 0; r < {rows}; ++r) {{",
            f"          float v = __fadd_rn(__fmul_rn((float)acc[r], m), b); {post} {store}",
            "        }",
            "      }",
            "    }",
            "    __syncthreads();",
            "  }",
        ]

    def _chain(self, layers: list[Layer], first_src: str, last_store: str, last_post: str, rows: int) -> list[str]:
        """Layers ``layers`` from int8 ``first_src``; every layer but the last requantizes into the other buffer."""
        out: list[str] = []
        src = first_src
        for i, la in enumerate(layers):
            other = "qb" if src == "qa" else "qa"
            if i == len(layers) - 1:
                out += self._gemv(la, src, last_store, rows, last_post)
            else:
                nxt = self.desc[id(layers[i + 1])]
                post = _ops(la.post, self.params, "v", "j")
                out += self._gemv(la, src, f"{other}[r * SK + j] = {FusedProgram._quant(nxt, 'v')};", rows, post)
            src = other
        return out

    def _kernel(self, rows: int) -> list[str]:
        plan = self.plan
        hid, nl = plan.hidden, plan.num_layers
        gw = self.gw
        obs_dim, act_dim = plan.obs_dim, plan.act_dim
        lstm = plan.kind == "lstm"
        body = [
            f'extern "C" __global__ void __launch_bounds__({THREADS}) rnn_step_r{rows}('
            "const float* __restrict__ x, float* __restrict__ y, float* __restrict__ Hs, float* __restrict__ Cs, "
            "const float* __restrict__ flags, const float* __restrict__ P, const signed char* __restrict__ WT, "
            "int batch) {",
            "  extern __shared__ int4 smem[];",
            "  signed char* qa = reinterpret_cast<signed char*>(smem);",
            f"  signed char* qb = qa + {rows} * SK;",
            f"  float* G = reinterpret_cast<float*>(qb + {rows} * SK);",
            f"  float* hs = G + {rows * gw};",
            f"  const int row0 = blockIdx.x * {rows};",
            "  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;",
            f"  for (int i = tid; i < {rows} * SK; i += {THREADS}) {{ qa[i] = 0; qb[i] = 0; }}",
            "  __syncthreads();",
        ]
        for k, cell in enumerate(plan.cells):
            into = cell.into
            first = self.desc[id(into.layers[0])]
            # 1. the previous hidden state of layer k (zero for a flagged row), quantized for the hh product
            hh = self.desc[id(cell.hh)]
            body += [
                f"  // ---- cell layer {k}",
                f"  for (int i = tid; i < {rows * hid}; i += {THREADS}) {{",
                f"    const int r = i / {hid}, j = i - r * {hid}, row = row0 + r;",
                f"    const float v = (row < batch && flags[row] == 0.0f) ? Hs[((size_t)row * {nl} + {k}) * {hid} + j] "
                ": 0.0f;",
                f"    qb[r * SK + j] = {FusedProgram._quant(hh, 'v')};",
                "  }",
                "  __syncthreads();",
            ]
            hh_store = "G[r * GW + j] = v;" if lstm else f"G[r * GW + {3 * hid} + j] = v;"
            body += self._gemv(cell.hh, "qb", hh_store, rows)
            # 2. the input of layer k (observation or the layer below's new h), pre-ops, quantized
            pre = _ops(into.pre, self.params, "v", "j")
            if k == 0:
                body += [
                    f"  for (int i = tid; i < {rows * obs_dim}; i += {THREADS}) {{",
                    f"    const int r = i / {obs_dim}, j = i - r * {obs_dim}, row = row0 + r;",
                    f"    float v = row < batch ? x[(size_t)row * {obs_dim} + j] : 0.0f; {pre}",
                    f"    qa[r * SK + j] = {FusedProgram._quant(first, 'v')};",
                    "  }",
                ]
            else:
                body += [
                    f"  for (int i = tid; i < {rows * hid}; i += {THREADS}) {{",
                    f"    const int r = i / {hid}, j = i - r * {hid};",
                    f"    float v = hs[i]; {pre}",
                    f"    qa[r * SK + j] = {FusedProgram._quant(first, 'v')};",
                    "  }",
                ]
            body.append("  __syncthreads();")
            # ih + hh (ONNX Runtime's Add(ih, hh): one rounding, either order)
            ih_store = "G[r * GW + j] = __fadd_rn(v, G[r * GW + j]);" if lstm else "G[r * GW + j] = v;"
            body += self._chain(list(into.layers), "qa", ih_store, "", rows)
            # 3. the cell update, the new state written in place (this block alone reads these rows)
            body += [
                f"  for (int i = tid; i < {rows * hid}; i += {THREADS}) {{",
                f"    const int r = i / {hid}, j = i - r * {hid}, row = row0 + r;",
                "    const float* g = G + r * GW;",
                f"    const size_t at = ((size_t)row * {nl} + {k}) * {hid} + j;",
                "    const bool live = row < batch, fresh = !live || flags[row] != 0.0f;",
            ]
            if lstm:
                body += [
                    "    const float c_prev = fresh ? 0.0f : Cs[at];",
                    f"    const float ig = mlas_logistic(g[j]), fg = mlas_logistic(g[{hid} + j]);",
                    f"    const float gg = mlas_tanh(g[{2 * hid} + j]), og = mlas_logistic(g[{3 * hid} + j]);",
                    "    const float c = __fadd_rn(__fmul_rn(fg, c_prev), __fmul_rn(ig, gg));",
                    "    const float h = __fmul_rn(og, mlas_tanh(c));",
                    "    if (live) { Cs[at] = c; Hs[at] = h; }",
                ]
            else:
                body += [
                    "    const float h_prev = fresh ? 0.0f : Hs[at];",
                    f"    const float rg = mlas_logistic(__fadd_rn(g[j], g[{3 * hid} + j]));",
                    f"    const float zg = mlas_logistic(__fadd_rn(g[{hid} + j], g[{4 * hid} + j]));",
                    f"    const float ng = mlas_tanh(__fadd_rn(g[{2 * hid} + j], __fmul_rn(rg, g[{5 * hid} + j])));",
                    "    const float h = __fadd_rn(__fmul_rn(__fsub_rn(h_prev, ng), zg), ng);",
                    "    if (live) Hs[at] = h;",
                ]
            body += ["    hs[i] = h;", "  }", "  __syncthreads();"]
        # 4. the head
        head = plan.head
        first = self.desc[id(head.layers[0])]
        pre = _ops(head.pre, self.params, "v", "j")
        body += [
            "  // ---- head",
            f"  for (int i = tid; i < {rows * hid}; i += {THREADS}) {{",
            f"    const int r = i / {hid}, j = i - r * {hid};",
            f"    float v = hs[i]; {pre}",
            f"    qa[r * SK + j] = {FusedProgram._quant(first, 'v')};",
            "  }",
            "  __syncthreads();",
        ]
        last_post = _ops(head.layers[-1].post, self.params, "v", "j")
        body += self._chain(list(head.layers), "qa",
                            f"if (row0 + r < batch) y[(size_t)(row0 + r) * {act_dim} + j] = v;", last_post, rows)
        body.append("}")
        return body

    def _source(self) -> str:
        parts = ["// generated by edgeq.deploy.fused_rnn for one INT8 recurrent policy; every dimension is a constant",
                 f"#define SK {self.sk}", f"#define GW {self.gw}", _device_functions()]
        for r in ROWS:
            parts += self._kernel(r)
        return "\n".join(parts) + "\n"


class _Path:
    """Buffers of one batch size: pinned input (observations, then one reset flag per row), device state,
    pinned output, and the captured graph."""

    def __init__(self, runner: FusedRnnRunner, batch: int, capture: bool) -> None:
        self.batch = batch
        plan = runner.plan
        n_in = batch * plan.obs_dim
        self.host_in = cuda.PinnedBuffer((n_in + batch,), np.float32, runner.device)
        self.obs = self.host_in.array[:n_in].reshape(batch, plan.obs_dim)
        self.flags = self.host_in.array[n_in:]
        self.host_out = cuda.PinnedBuffer((batch, plan.act_dim), np.float32, runner.device)
        self.out = self.host_out.array
        self.dev_in = cuda.DeviceBuffer(self.host_in.nbytes, runner.device)
        self.dev_out = cuda.DeviceBuffer(self.host_out.nbytes, runner.device)
        state_floats = batch * plan.num_layers * plan.hidden
        self.dev_h = cuda.DeviceBuffer(4 * state_floats, runner.device)
        self.dev_c = cuda.DeviceBuffer(4 * state_floats, runner.device)
        driver = cuda.bindings()
        for buf in (self.dev_h, self.dev_c, self.dev_in):
            cuda.check(driver.cuMemsetD32(int(buf), 0, buf.nbytes // 4), "cuMemsetD32")
        self.flags_ptr = int(self.dev_in) + 4 * n_in
        self.runner = runner
        self.kernel = runner.choose_kernel(self)
        self.flags[:] = 1.0  # the first step starts every row from zero state (timing runs wrote to it)
        self.pending = True
        self.spin = runner.sync == "spin" or (runner.sync == "auto" and batch <= runner.spin_max_batch)
        self.graph: cuda.Graph | None = cuda.Graph(runner.stream, self.enqueue) if capture else None
        self.exec_handle = int(self.graph.exec) if self.graph is not None else 0

    def launch(self, name: str) -> None:
        self.runner.launch(name, self)

    def enqueue(self) -> None:
        r = self.runner
        cuda.copy_htod_async(int(self.dev_in), int(self.host_in), self.host_in.nbytes, r.stream)
        r.launch(self.kernel, self)
        cuda.copy_dtoh_async(int(self.host_out), int(self.dev_out), self.host_out.nbytes, r.stream)


class FusedRnnRunner:
    """A compiled :class:`RecurrentPlan` on one GPU, with its state: ``runner.step(obs)`` → actions.

    Args mirror :class:`edgeq.deploy.fused_mlp.FusedMlpRunner` (``cuda_graph``, ``autotune``, ``sync``,
    ``spin_max_batch``, ``native_calls``).
    """

    def __init__(self, plan: RecurrentPlan, *, device: int = 0, cuda_graph: bool = True, autotune: bool = True,
                 sync: str = "auto", spin_max_batch: int = SPIN_MAX_BATCH, native_calls: bool = True) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync {sync!r}; expected one of {', '.join(SYNC_MODES)}")
        self.plan = plan
        self.program = RecurrentProgram(plan)
        self.sync, self.spin_max_batch, self.autotune = sync, int(spin_max_batch), autotune
        self.device, self.cuda_graph = device, cuda_graph
        self.choice: dict[int, str] = {}
        self.tuning: dict[int, dict[str, float]] = {}
        cuda.context(device)
        self.info = cuda.device_info(device)
        self._driver = cuda.bindings()
        self.module = cuda.compile_module(self.program.source, self.program.kernels, device=device,
                                          name="edgeq_fused_rnn.cu", options=["--fmad=false"])
        limit = self.info["max_shared_memory_per_block"]
        self.rows = [r for r in ROWS if self.program.shared_bytes(r) <= limit]
        if not self.rows:
            raise UnsupportedGraph(f"the recurrent kernel needs {self.program.shared_bytes(1)} bytes of shared memory; "
                                   f"the GPU has {limit}")
        for r in self.rows:
            need = self.program.shared_bytes(r)
            if need > 48 * 1024:
                cuda.set_max_dynamic_shared_memory(self.module.function(f"rnn_step_r{r}"), need)
        self.stream = cuda.Stream(device)
        self._stream = int(self.stream.handle)
        self.hot = cuda.HotCalls() if native_calls else None
        self.params = cuda.DeviceBuffer(self.program.param_array.nbytes, device)
        self.params.upload(self.program.param_array)
        self.wt = cuda.DeviceBuffer(self.program.wt.nbytes, device)
        self.wt.upload(self.program.wt)
        self._paths: dict[int, _Path] = {}
        self._graphs = 0
        self.latency = LatencyStats()
        self._lock = threading.Lock()
        #: the batch size of the state carried now (None: every row starts from zero at the next step)
        self.state_batch: int | None = None

    def launch(self, name: str, p: _Path) -> None:
        rows = int(name.rsplit("_r", 1)[1])
        grid = (-(-p.batch // rows), 1, 1)
        cuda.launch(self.module.function(name), grid, (THREADS, 1, 1),
                    [(int(p.dev_in), ctypes.c_void_p), (int(p.dev_out), ctypes.c_void_p),
                     (int(p.dev_h), ctypes.c_void_p), (int(p.dev_c), ctypes.c_void_p),
                     (p.flags_ptr, ctypes.c_void_p), (int(self.params), ctypes.c_void_p),
                     (int(self.wt), ctypes.c_void_p), (p.batch, ctypes.c_int)],
                    self.stream, self.program.shared_bytes(rows))

    def candidates(self, batch: int) -> list[str]:
        """Kernels worth timing for ``batch`` rows (all compute the same bits)."""
        rows = [r for r in self.rows if r == 1 or r <= max(1, batch // 2)]
        return [f"rnn_step_r{r}" for r in rows]

    def choose_kernel(self, p: _Path) -> str:
        names = self.candidates(p.batch)
        if not self.autotune or len(names) == 1:
            self.choice[p.batch] = names[-1] if not self.autotune else names[0]
            return self.choice[p.batch]
        driver = self._driver
        start = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
        stop = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
        times: dict[str, float] = {}
        try:
            for name in names:
                for _ in range(2):
                    self.launch(name, p)
                cuda.check(driver.cuEventRecord(start, self.stream.handle), "cuEventRecord")
                for _ in range(10):
                    self.launch(name, p)
                cuda.check(driver.cuEventRecord(stop, self.stream.handle), "cuEventRecord")
                cuda.check(driver.cuEventSynchronize(stop), "cuEventSynchronize")
                times[name] = float(cuda.check(driver.cuEventElapsedTime(start, stop), "cuEventElapsedTime"))
        finally:
            driver.cuEventDestroy(start)
            driver.cuEventDestroy(stop)
        best = min(times, key=lambda n: times[n])
        self.choice[p.batch] = best
        self.tuning[p.batch] = {n: t * 100.0 for n, t in times.items()}  # µs per launch
        return best

    def path(self, batch: int) -> _Path:
        p = self._paths.get(batch)
        if p is None:
            capture = self.cuda_graph and self._graphs < MAX_GRAPHS
            p = _Path(self, batch, capture)
            self._graphs += p.graph is not None
            self._paths[batch] = p
        return p

    def _run(self, p: _Path) -> None:
        t0 = time.perf_counter()
        hot = self.hot
        if p.graph is None:
            p.enqueue()
        elif hot is not None:
            err = hot.graph_launch(p.exec_handle, self._stream)
            if err:
                cuda.raise_for(err, "cuGraphLaunch")
        else:
            cuda.check(self._driver.cuGraphLaunch(p.graph.exec, self.stream.handle), "cuGraphLaunch")
        if hot is not None:
            err = hot.spin(self._stream) if p.spin else hot.stream_synchronize(self._stream)
            if err:
                cuda.raise_for(err, "cuStreamQuery" if p.spin else "cuStreamSynchronize")
        else:
            self.stream.synchronize()
        self.latency.add_serialized(time.perf_counter() - t0)

    def step(self, obs: np.ndarray) -> np.ndarray:
        """Actions for ``obs`` float32 ``[batch, obs_dim]``, advancing the state (a new array)."""
        batch = int(obs.shape[0])
        with self._lock:
            if self.state_batch is not None and self.state_batch != batch:
                raise InputError(f"batch of {batch} observation(s) but the recurrent state carries "
                                 f"{self.state_batch} row(s) from the previous calls; call reset() before changing "
                                 "the batch size (it starts new episodes), or keep one batch size per episode")
            p = self._paths.get(batch) or self.path(batch)
            np.copyto(p.obs, obs, casting="same_kind")
            self._run(p)
            if p.pending:
                p.flags[:] = 0.0
                p.pending = False
            self.state_batch = batch
            return p.out.copy()

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Zero the state of the rows where ``mask`` is True (all rows if None) at the next step."""
        with self._lock:
            if mask is None:
                for p in self._paths.values():
                    p.flags[:] = 1.0
                    p.pending = True
                self.state_batch = None
                return
            if self.state_batch is None:
                return  # every row starts from zero anyway
            p = self._paths[self.state_batch]
            m = np.asarray(mask, bool).reshape(-1)
            if m.size != p.batch:
                raise InputError(f"reset mask of {m.size} row(s); the recurrent state carries {p.batch}")
            if m.any():
                p.flags[m] = 1.0
                p.pending = True

    def state(self) -> dict[str, np.ndarray]:
        """The carried state, copied to the host (tests; not the hot path): ``{h_in: [batch, layers, hidden], ...}``."""
        plan = self.plan
        with self._lock:
            if self.state_batch is None:
                return plan.zero_state(0)
            p = self._paths[self.state_batch]
            self.stream.synchronize()
            out = {}
            for spec, buf in zip(plan.state, (p.dev_h, p.dev_c), strict=False):
                arr = np.empty((p.batch, plan.num_layers, plan.hidden), np.float32)
                buf.download(arr)
                arr[p.flags != 0] = 0.0  # rows flagged for reset start from zero at the next step
                out[spec["input"]] = arr
            return out

    def graph_nodes(self, batch: int) -> dict[str, int]:
        """Kernels and copies captured in ``batch``'s graph (``{"KERNEL": 1, "MEMCPY": 2}``)."""
        p = self._paths.get(batch)
        return p.graph.node_types() if p is not None and p.graph is not None else {}


class FusedRnnPolicy:
    """An INT8 LSTM/GRU bundle model on the fused recurrent kernel; the interface of ``OrtPolicy``.

    Args:
        model: the INT8 QDQ ONNX file (the bundle's ``policy.int8.onnx``) or its (verified) bytes.
        state: the manifest's ``io.state``.
        input_name, output_name, device, cuda_graph, sync: as :class:`edgeq.deploy.fused_mlp.FusedCudaPolicy`.

    Raises:
        UnsupportedGraph: not an INT8 recurrent policy this backend runs (the message says why).
        CudaError: CUDA cannot be used here.
    """

    def __init__(self, model: str | Path | bytes, *, state: list[dict[str, Any]], input_name: str = "obs",
                 output_name: str = "actions", device: int = 0, cuda_graph: bool = True, sync: str = "auto") -> None:
        graph = parse_model(model, "model bytes") if isinstance(model, bytes) else load_graph(model)
        self.plan = recurrent_plan_from_graph(graph, state, input_name=input_name, output_name=output_name)
        self.model = "(verified bytes)" if isinstance(model, bytes) else Path(model).name
        self.runner = FusedRnnRunner(self.plan, device=device, cuda_graph=cuda_graph, sync=sync)
        self.input_name, self.output_name = input_name, output_name
        self.output_names = [output_name, *(s["output"] for s in state)]
        self.state_specs = [dict(s) for s in state]
        self.obs_dim = self.plan.obs_dim

    @property
    def providers(self) -> list[str]:
        return [f"edgeq fused int8 {self.plan.kind.upper()} CUDA kernel ({self.runner.info['gpu_name']}, "
                f"sm_{self.runner.info['compute_capability'].replace('.', '')})"]

    def describe(self) -> dict[str, Any]:
        return {"runtime": "edgeq-fused-cuda-recurrent", "model": self.model, "device": self.runner.info,
                "cuda_graph": self.runner.cuda_graph, "sync": self.runner.sync, "plan": self.plan.describe()}

    @property
    def latency(self) -> LatencyStats:
        """Backend latency: graph launch to the end of the wait, per call."""
        return self.runner.latency

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Zero the recurrent state of the rows where ``mask`` is True (all rows if None)."""
        self.runner.reset(mask)

    def state(self) -> dict[str, np.ndarray]:
        """The carried state on the host (a copy), by state input name."""
        return self.runner.state()

    def run(self, obs: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """One step; ``outputs`` may name the action output and the state outputs (copied from the GPU)."""
        names = list(outputs) if outputs is not None else [self.output_name]
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise InputError(f"the fused recurrent backend computes {self.output_names} (asked for {unknown})")
        actions = self.act(obs)
        result = {self.output_name: actions}
        if len(names) > 1 or names != [self.output_name]:
            state = self.runner.state()
            for spec in self.state_specs:
                result[spec["output"]] = state[spec["input"]]
        return {n: result[n] for n in names}

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch of observations (float32 [batch, obs_dim] → [batch, act_dim]); advances the state."""
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise InputError(f"observation batch of shape {obs.shape}; expected (batch, {self.obs_dim})")
        return self.runner.step(obs)


def fused_rnn_support(model: str | Path | bytes, state: list[dict[str, Any]], *, input_name: str = "obs",
                      output_name: str = "actions") -> str | None:
    """None if the fused recurrent backend can run ``model`` (graph only; CUDA not checked), else why not."""
    try:
        graph = parse_model(model, "model bytes") if isinstance(model, bytes) else load_graph(model)
        RecurrentProgram(recurrent_plan_from_graph(graph, state, input_name=input_name, output_name=output_name))
    except UnsupportedGraph as exc:
        return str(exc)
    return None


__all__ = ["FusedRnnPolicy", "FusedRnnRunner", "ROWS", "RecurrentProgram", "fused_rnn_support"]
