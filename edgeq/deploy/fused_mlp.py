"""The fused GPU backend: a whole INT8 feed-forward policy in one CUDA kernel, replayed as a CUDA graph.

ONNX Runtime's CUDA EP runs edgeq's QDQ file as 15-24 separate kernels (Quantize, Dequantize, a
float GEMM, bias Add and activation per layer) behind two pageable copies. This backend reads the
same file (:mod:`edgeq.deploy.mlp_plan`, no ``onnx`` import), generates one CUDA kernel for the
whole network with every dimension and offset a compile-time constant, compiles it with NVRTC for
the GPU at hand (:mod:`edgeq.deploy.cuda`, cuda-python; no torch, no ONNX Runtime), and captures
*pinned host → device copy, kernel, device → pinned host copy* as one CUDA graph per batch size:
one graph launch and one wait per call.

The per-call host path is short on purpose (benchmarks/results/gpu_h200.md measures each piece):
the observation is copied into the batch size's pinned buffer, the graph launched and the stream
waited for through the driver's C entry points (:class:`edgeq.deploy.cuda.HotCalls`: plain ctypes
calls, no argument wrapping, nothing allocated), and the wait **spins** on ``cuStreamQuery`` for
batches up to :data:`SPIN_MAX_BATCH` (``sync="auto"``): the calling thread stays on its core and
sees the result as soon as it is there, whatever scheduling flags the context was given (with
``CU_CTX_SCHED_BLOCKING_SYNC``, set by some robot stacks to save CPU, ``cuStreamSynchronize`` of
an empty graph took 26 µs instead of 7 on the H200 machine). Larger batches block in
``cuStreamSynchronize``. ``edgeq.deploy.load(...).act`` checks the observation for NaN/inf *while
the GPU computes* (:meth:`FusedCudaPolicy.act_overlapped`) and discards the result if it was bad.

Arithmetic (the same as ONNX Runtime's integer CPU path, ``MatMulIntegerToFloat``; see
:func:`edgeq.deploy.mlp_plan.reference_forward`): each layer quantizes its input with
``rint(x / s) + zp`` (IEEE division, round half to even, saturated), accumulates ``(q - zp) · w`` in
int32 with ``dp4a`` (exact), then computes ``float(acc) * (s * w_scale_j) + bias_j`` with separately
rounded float32 operations (``--fmad=false``: no contraction), then the activation. So every int8
value matches the CPU's exactly; only the transcendental functions (``expm1f``, ``tanhf``) may differ
by an ulp or so (``expm1f`` matched ONNX Runtime's CPU Elu more often than ``expf(x) - 1``). Where such an
activation feeds a quantizer, a value within an ulp of a rounding boundary can land on the other
int8 step on the GPU than on the CPU (measured in ``tests/test_fused_mlp.py`` and
``benchmarks/results/gpu.md``); ReLU networks have no such step and match to float rounding.

Two kernels, both generated for the plan:

* ``mlp_rows`` (batches up to :data:`ROWS_MAX_BATCH`): one thread block per observation, 512
  threads; each layer is a GEMV in which a group of lanes shares one output column, reads 16 int8
  weights per lane per step (weights stored ``[N][K]``, K padded to the group's width) and reduces
  with warp shuffles.
* ``mlp_tiles_tm{1,2,4}`` (larger batches): one block per tile of ``8 × TM`` observations, 256
  threads; each thread keeps a ``TM × 4`` int32 accumulator tile over 4 output columns, reading
  packed ``int32`` weight quads (stored ``[K/4][N]``, coalesced across the warp) and activation quads
  from shared memory (broadcast across the warp). Activations stay in shared memory as int8
  between layers.

Feed-forward only: recurrent (LSTM/GRU) INT8 policies run on :mod:`edgeq.deploy.fused_rnn` (the same
arithmetic, the cell added, the state kept on the GPU); any graph neither plan reader accepts stays on
ONNX Runtime's CUDA EP (:class:`edgeq.deploy.ort_cuda.OrtCudaPolicy`).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy import cuda
from edgeq.deploy.mlp_plan import ElementOp, MlpPlan, UnsupportedGraph, plan_from_graph
from edgeq.deploy.onnx_graph import load_graph, parse_model
from edgeq.deploy.runtime import LatencyStats
from edgeq.errors import InputError

#: Batches up to this size run the one-block-per-observation kernel; larger ones the tiled kernel.
ROWS_MAX_BATCH = 16
ROWS_THREADS = 512
TILE_THREADS = 256
#: Captured CUDA graphs (one per batch size) kept at most; further batch sizes launch without a graph.
MAX_GRAPHS = 16
#: ``sync="auto"``: batches up to this size wait for the GPU by polling the stream (busy wait), larger
#: ones block in ``cuStreamSynchronize`` (benchmarks/results/gpu_h200.md: why).
SPIN_MAX_BATCH = 256
SYNC_MODES = ("auto", "spin", "block")
_MAX_WIDTH = 2048


def _pow2_floor(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b * b


class _Params:
    """Float constants (multipliers, biases, op vectors) packed into one buffer, by offset."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.size = 0

    def add(self, values: np.ndarray) -> int:
        v = np.ascontiguousarray(values, np.float32).reshape(-1)
        off = self.size
        pad = (-v.size) % 4
        self.chunks.append(np.concatenate([v, np.zeros(pad, np.float32)]) if pad else v)
        self.size += v.size + pad
        return off

    def array(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(4, np.float32)


def _f(x: float) -> str:
    if np.isinf(x):
        return "(-INFINITY)" if x < 0 else "INFINITY"
    return f"{np.float32(x).item()!r}f" if np.isfinite(x) else "NAN"


def _op_code(op: ElementOp, params: _Params, var: str, idx: str) -> str:
    if op.op == "Relu":
        return f"{var} = fmaxf({var}, 0.0f);"
    if op.op == "Elu":
        return f"{var} = {var} > 0.0f ? {var} : __fmul_rn({_f(op.alpha)}, expm1f({var}));"
    if op.op == "LeakyRelu":
        return f"{var} = {var} >= 0.0f ? {var} : __fmul_rn({_f(op.alpha)}, {var});"
    if op.op == "Tanh":
        return f"{var} = tanhf({var});"
    if op.op == "Sigmoid":
        return f"{var} = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-{var})));"
    if op.op == "Clip":
        return f"{var} = fminf(fmaxf({var}, {_f(op.lo)}), {_f(op.hi)});"
    assert op.const is not None
    off = params.add(op.const)
    c = f"P[{off}]" if op.const.size == 1 else f"P[{off} + {idx}]"
    a, b = (c, var) if op.const_first else (var, c)
    fn = {"Add": "__fadd_rn", "Sub": "__fsub_rn", "Mul": "__fmul_rn", "Div": "__fdiv_rn", "Max": "fmaxf",
          "Min": "fminf"}[op.op]
    return f"{var} = {fn}({a}, {b});"


def _ops_code(ops: list[ElementOp], params: _Params, var: str, idx: str) -> str:
    return " ".join(_op_code(o, params, var, idx) for o in ops)


class FusedProgram:
    """The CUDA source, packed weights and constants generated for one :class:`MlpPlan`."""

    def __init__(self, plan: MlpPlan) -> None:
        self.plan = plan
        widths = [la.k for la in plan.layers] + [la.n for la in plan.layers]
        if max(widths) > _MAX_WIDTH:
            raise UnsupportedGraph(f"a layer {max(widths)} wide; the fused backend runs layers up to {_MAX_WIDTH}")
        for la in plan.layers:
            if not ((not la.in_uint8 and la.in_zero_point == 0) or (la.in_uint8 and la.in_zero_point == 128)):
                raise UnsupportedGraph(f"layer {la.name}: activation zero point {la.in_zero_point} "
                                       f"({'uint8' if la.in_uint8 else 'int8'}); the fused backend needs symmetric "
                                       "int8 (0) or uint8 with 128")
        params = _Params()
        wt_chunks: list[np.ndarray] = []
        w4_chunks: list[np.ndarray] = []
        wt_size = w4_size = 0
        self.layers: list[dict[str, Any]] = []
        for la in plan.layers:
            k, n = la.k, la.n
            k16 = _ceil(k, 16)
            lpc = min(32, _pow2_floor(k16 // 16))
            iters = -(-k16 // (16 * lpc))
            kp = iters * 16 * lpc  # row stride of the [N][KP] layout (and of the rows kernel's activations)
            wt = np.zeros((n, kp), np.int8)
            wt[:, :k] = la.weight.T
            kt = _ceil(k, 4)  # row stride of the tiled kernel's activations
            npad = _ceil(n, 128)
            w4 = np.zeros((kt, npad), np.int8)
            w4[:k, :n] = la.weight
            # [KT/4][NPAD] int32 words, each packing k = 4q..4q+3 of one column (little-endian bytes)
            w4_words = w4.reshape(kt // 4, 4, npad).transpose(0, 2, 1).copy().view(np.int32).reshape(kt // 4, npad)
            mult = (np.float32(la.in_scale) * la.w_scale).astype(np.float32)
            self.layers.append(dict(k=k, n=n, kp=kp, lpc=lpc, iters=iters, kt=kt, npad=npad,
                                    wt_off=wt_size, w4_off=w4_size, mult=params.add(mult), bias=params.add(la.bias),
                                    scale=la.in_scale, zp=la.in_zero_point, uint8=la.in_uint8))
            wt_chunks.append(wt.reshape(-1))
            wt_size += wt.size
            w4_chunks.append(w4_words.reshape(-1))
            w4_size += w4_words.size
        self.wt = np.concatenate(wt_chunks)
        self.w4 = np.concatenate(w4_chunks)
        # elementwise code, generated after the layer constants (offsets into P)
        self.pre_code = _ops_code(plan.pre, params, "v", "k")
        self.post_code = [_ops_code(la.post, params, "v", "j") for la in plan.layers]
        self.params = params.array()
        self.rows_kmax = max(max(d["kp"] for d in self.layers), 16)
        self.tile_kmax = max(max(d["kt"] for d in self.layers), 4)
        self.source = self._source()
        self.kernels = ["mlp_rows", "mlp_tiles_tm1", "mlp_tiles_tm2", "mlp_tiles_tm4"]

    # -- code generation ---------------------------------------------------------------------------

    @staticmethod
    def _quant(d: dict[str, Any], var: str) -> str:
        """``var`` (float) → the layer's int8 ``q - zp`` as ``signed char``."""
        lo, hi = (0.0, 255.0) if d["uint8"] else (-128.0, 127.0)
        zp = float(d["zp"])
        return (f"(signed char)((int)fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn({var}, {_f(d['scale'])})), {_f(zp)}), "
                f"{_f(lo)}), {_f(hi)}) - {int(d['zp'])})")

    def _source(self) -> str:
        L = self.layers
        k0 = L[0]["k"]
        n_out = L[-1]["n"]
        parts = [
            "// generated by edgeq.deploy.fused_mlp for one INT8 policy; every dimension is a constant",
            f"#define ROWS_THREADS {ROWS_THREADS}",
            f"#define TILE_THREADS {TILE_THREADS}",
        ]
        # ---- rows kernel: one block per observation
        body = [
            'extern "C" __global__ void __launch_bounds__(ROWS_THREADS) mlp_rows(const float* __restrict__ x, '
            'float* __restrict__ y, const float* __restrict__ P, const signed char* __restrict__ WT, '
            'const int* __restrict__ W4, int batch) {',
            f"  __shared__ __align__(16) signed char bufA[{self.rows_kmax}];",
            f"  __shared__ __align__(16) signed char bufB[{self.rows_kmax}];",
            "  const int row = blockIdx.x; if (row >= batch) return;",
            "  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;",
            f"  for (int k = tid; k < {self.rows_kmax}; k += ROWS_THREADS) {{ bufA[k] = 0; bufB[k] = 0; }}",
            "  __syncthreads();",
            f"  for (int k = tid; k < {k0}; k += ROWS_THREADS) {{ float v = x[(size_t)row * {k0} + k]; "
            f"{self.pre_code} bufA[k] = {self._quant(L[0], 'v')}; }}",
            "  __syncthreads();",
        ]
        for i, d in enumerate(L):
            src, dst = ("bufA", "bufB") if i % 2 == 0 else ("bufB", "bufA")
            cpw = 32 // d["lpc"]
            nwarps = ROWS_THREADS // 32
            last = i == len(L) - 1
            if last:
                store = f"y[(size_t)row * {n_out} + j] = v;"
            else:
                store = f"{dst}[j] = {self._quant(L[i + 1], 'v')};"
            body += [
                f"  {{ // layer {i}: {d['k']} -> {d['n']}",
                f"    const int part = lane % {d['lpc']}, sub = lane / {d['lpc']};",
                f"    const int4* A = reinterpret_cast<const int4*>({src});",
                "    #pragma unroll 4",
                f"    for (int base = warp * {cpw}; base < {d['n']}; base += {nwarps * cpw}) {{",
                "      const int j = base + sub; int acc = 0;",
                f"      if (j < {d['n']}) {{",
                "        const int4* W = reinterpret_cast<const int4*>(",
                f"            WT + {d['wt_off']} + (size_t)j * {d['kp']});",
                "        #pragma unroll",
                f"        for (int it = 0; it < {d['iters']}; ++it) {{",
                f"          const int4 w = __ldg(W + part + it * {d['lpc']});",
                f"          const int4 a = A[part + it * {d['lpc']}];",
                "          acc = __dp4a(a.x, w.x, acc); acc = __dp4a(a.y, w.y, acc);",
                "          acc = __dp4a(a.z, w.z, acc); acc = __dp4a(a.w, w.w, acc);",
                "        }",
                "      }",
                "      #pragma unroll",
                f"      for (int o = {d['lpc']} / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);",
                f"      if (part == 0 && j < {d['n']}) {{",
                f"        float v = __fadd_rn(__fmul_rn((float)acc, P[{d['mult']} + j]), P[{d['bias']} + j]);",
                f"        {self.post_code[i]} {store}",
                "      }",
                "    }",
                "    __syncthreads();",
                "  }",
            ]
        body.append("}")
        parts += body
        # ---- tiled kernels
        for tm in (1, 2, 4):
            bm = 8 * tm
            kmax = self.tile_kmax
            body = [
                'extern "C" __global__ void __launch_bounds__(TILE_THREADS) '
                f'mlp_tiles_tm{tm}(const float* __restrict__ x, float* __restrict__ y, '
                'const float* __restrict__ P, const signed char* __restrict__ WT, '
                'const int* __restrict__ W4, int batch) {',
                "  extern __shared__ int4 smem[];",
                "  signed char* bufA = reinterpret_cast<signed char*>(smem);",
                f"  signed char* bufB = bufA + {bm * kmax};",
                f"  const int row0 = blockIdx.x * {bm};",
                "  const int tid = threadIdx.x, tx = tid & 31, ty = tid >> 5;",
                f"  for (int idx = tid; idx < {bm * L[0]['kt']}; idx += TILE_THREADS) {{",
                f"    const int r = idx / {L[0]['kt']}, k = idx - r * {L[0]['kt']}; signed char q = 0;",
                f"    if (k < {k0} && row0 + r < batch) {{ float v = x[(size_t)(row0 + r) * {k0} + k]; {self.pre_code} "
                f"q = {self._quant(L[0], 'v')}; }}",
                f"    bufA[r * {L[0]['kt']} + k] = q;",
                "  }",
                "  __syncthreads();",
            ]
            for i, d in enumerate(L):
                src, dst = ("bufA", "bufB") if i % 2 == 0 else ("bufB", "bufA")
                last = i == len(L) - 1
                kq = d["kt"] // 4
                if last:
                    store = f"if (row0 + rr < batch) y[(size_t)(row0 + rr) * {n_out} + j] = v;"
                else:
                    store = f"{dst}[rr * {L[i + 1]['kt']} + j] = {self._quant(L[i + 1], 'v')};"
                body += [
                    f"  {{ // layer {i}: {d['k']} -> {d['n']}",
                    f"    const int* A = reinterpret_cast<const int*>({src}) + ty * {tm} * {kq};",
                    f"    for (int c0 = 0; c0 < {d['n']}; c0 += 128) {{",
                    f"      int acc[{tm}][4];",
                    "      #pragma unroll",
                    f"      for (int r = 0; r < {tm}; ++r) {{",
                    "        acc[r][0] = 0; acc[r][1] = 0; acc[r][2] = 0; acc[r][3] = 0;",
                    "      }",
                    f"      const int* W = W4 + {d['w4_off']} + c0 + tx;",
                    "      #pragma unroll 8",
                    f"      for (int q = 0; q < {kq}; ++q) {{",
                    f"        const int* Wq = W + (size_t)q * {d['npad']};",
                    "        const int w0 = __ldg(Wq), w1 = __ldg(Wq + 32), w2 = __ldg(Wq + 64), w3 = __ldg(Wq + 96);",
                    "        #pragma unroll",
                    f"        for (int r = 0; r < {tm}; ++r) {{",
                    f"          const int a = A[r * {kq} + q];",
                    "          acc[r][0] = __dp4a(a, w0, acc[r][0]); acc[r][1] = __dp4a(a, w1, acc[r][1]);",
                    "          acc[r][2] = __dp4a(a, w2, acc[r][2]); acc[r][3] = __dp4a(a, w3, acc[r][3]);",
                    "        }",
                    "      }",
                    "      #pragma unroll",
                    f"      for (int r = 0; r < {tm}; ++r) {{",
                    f"        const int rr = ty * {tm} + r;",
                    "        #pragma unroll",
                    "        for (int c = 0; c < 4; ++c) {",
                    "          const int j = c0 + tx + 32 * c;",
                    f"          if (j < {d['n']}) {{",
                    f"            float v = __fadd_rn(__fmul_rn((float)acc[r][c], P[{d['mult']} + j]),",
                    f"                                P[{d['bias']} + j]);",
                    f"            {self.post_code[i]} {store}",
                    "          }",
                    "        }",
                    "      }",
                    "    }",
                    "    __syncthreads();",
                    "  }",
                ]
            body.append("}")
            parts += body
        return "\n".join(parts) + "\n"

    def tile_shared_bytes(self, tm: int) -> int:
        return 2 * 8 * tm * self.tile_kmax


def kernel_for_batch(batch: int) -> tuple[str, int]:
    """The default kernel for ``batch`` observations and its rows per block (before autotuning)."""
    if batch <= ROWS_MAX_BATCH:
        return "mlp_rows", 1
    tm = 1 if batch <= 256 else 2 if batch <= 1024 else 4
    return f"mlp_tiles_tm{tm}", 8 * tm


def kernel_candidates(batch: int) -> list[str]:
    """The kernels worth timing for ``batch`` (all compute bit-identical results)."""
    names = ["mlp_rows"] if batch <= 1024 else []
    if batch > 1:
        names += ["mlp_tiles_tm1", "mlp_tiles_tm2"] + (["mlp_tiles_tm4"] if batch >= 64 else [])
    return names


def _rows_per_block(name: str) -> int:
    return 1 if name == "mlp_rows" else 8 * int(name.rsplit("tm", 1)[1])


class _BatchPath:
    """Pinned and device buffers for one batch size, and its captured graph (None: launch directly).

    ``in_array``/``out_array`` are the pinned buffers' numpy views and ``exec_handle`` the graph's
    ``CUgraphExec`` as an integer, bound once so that the hot path looks nothing up."""

    def __init__(self, runner: FusedMlpRunner, batch: int, capture: bool) -> None:
        self.batch = batch
        self.host_in = cuda.PinnedBuffer((batch, runner.obs_dim), np.float32, runner.device)
        self.host_out = cuda.PinnedBuffer((batch, runner.act_dim), np.float32, runner.device)
        self.in_array, self.out_array = self.host_in.array, self.host_out.array
        self.dev_in = cuda.DeviceBuffer(self.host_in.nbytes, runner.device)
        self.dev_out = cuda.DeviceBuffer(self.host_out.nbytes, runner.device)
        self.graph: cuda.Graph | None = None
        self.runner = runner
        self.kernel = runner.choose_kernel(batch, int(self.dev_in), int(self.dev_out))
        self.spin = runner.sync == "spin" or (runner.sync == "auto" and batch <= runner.spin_max_batch)
        if capture:
            self.graph = cuda.Graph(runner.stream, self.enqueue)
        self.exec_handle = int(self.graph.exec) if self.graph is not None else 0

    def enqueue(self) -> None:
        r = self.runner
        cuda.copy_htod_async(int(self.dev_in), int(self.host_in), self.host_in.nbytes, r.stream)
        r.launch(self.batch, int(self.dev_in), int(self.dev_out), self.kernel)
        cuda.copy_dtoh_async(int(self.host_out), int(self.dev_out), self.host_out.nbytes, r.stream)


class FusedMlpRunner:
    """A compiled plan on one GPU: ``runner.run(obs)`` → actions, through one CUDA graph per batch size.

    Args:
        plan: the policy (:func:`edgeq.deploy.mlp_plan.plan_from_graph`).
        device: the CUDA device index.
        cuda_graph: capture copies + kernel per batch size as a CUDA graph (else enqueue them each call).
        autotune: time the candidate kernels once per batch size (a few hundred microseconds, at the
            first call of that size) and run the fastest; all candidates compute the same bits.
        sync: how a call waits for its graph: ``"spin"`` polls the stream (``cuStreamQuery`` in a
            loop: the calling thread stays on its core and sees the result at once; it burns that
            core while the GPU works), ``"block"`` calls ``cuStreamSynchronize`` (the driver's wait,
            which the context's scheduling flags decide), ``"auto"`` spins for batches up to
            ``spin_max_batch`` (a few tens of microseconds) and blocks above.
        spin_max_batch: the largest batch that ``sync="auto"`` waits for by spinning.
        native_calls: launch and wait through the driver's C entry points (:class:`edgeq.deploy.cuda.HotCalls`)
            instead of cuda-python's Python wrappers (same calls, less Python per call).

    Raises:
        CudaError: no driver, no GPU, no cuda-python, or a CUDA call that failed.
        UnsupportedGraph: a plan the kernel generator does not handle.
    """

    def __init__(self, plan: MlpPlan, *, device: int = 0, cuda_graph: bool = True, autotune: bool = True,
                 sync: str = "auto", spin_max_batch: int = SPIN_MAX_BATCH, native_calls: bool = True) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync {sync!r}; expected one of {', '.join(SYNC_MODES)}")
        self.plan = plan
        self.sync, self.spin_max_batch = sync, int(spin_max_batch)
        self.autotune = autotune
        #: the kernel run for each batch size, and the autotuning times (µs per launch) behind the choice
        self.choice: dict[int, str] = {}
        self.tuning: dict[int, dict[str, float]] = {}
        self.program = FusedProgram(plan)
        self._driver = cuda.bindings()
        self.device = device
        self.cuda_graph = cuda_graph
        self.obs_dim, self.act_dim = plan.obs_dim, plan.act_dim
        cuda.context(device)
        self.info = cuda.device_info(device)
        self.module = cuda.compile_module(self.program.source, self.program.kernels, device=device,
                                          name="edgeq_fused_mlp.cu", options=["--fmad=false"])
        for tm in (1, 2, 4):
            need = self.program.tile_shared_bytes(tm)
            if need > self.info["max_shared_memory_per_block"]:
                raise UnsupportedGraph(f"the tiled kernel needs {need} bytes of shared memory; the GPU has "
                                       f"{self.info['max_shared_memory_per_block']}")
            if need > 48 * 1024:
                cuda.set_max_dynamic_shared_memory(self.module.function(f"mlp_tiles_tm{tm}"), need)
        self.stream = cuda.Stream(device)
        self._stream = int(self.stream.handle)
        self.hot = cuda.HotCalls() if native_calls else None
        self.params = cuda.DeviceBuffer(self.program.params.nbytes, device)
        self.params.upload(self.program.params)
        self.wt = cuda.DeviceBuffer(self.program.wt.nbytes, device)
        self.wt.upload(self.program.wt)
        self.w4 = cuda.DeviceBuffer(self.program.w4.nbytes, device)
        self.w4.upload(self.program.w4)
        self._paths: dict[int, _BatchPath] = {}
        #: the time from graph launch to the end of the wait, per call (recorded under the runner's lock)
        self.latency = LatencyStats()
        self._graphs = 0
        self._lock = threading.Lock()

    def launch(self, batch: int, x: int, y: int, name: str | None = None) -> None:
        """Enqueue kernel ``name`` (default: the one chosen for ``batch``) for ``batch`` rows from device
        ``x`` into device ``y`` on the runner's stream."""
        name = name or self.choice.get(batch) or kernel_for_batch(batch)[0]
        rows = _rows_per_block(name)
        grid = (-(-batch // rows), 1, 1)
        if name == "mlp_rows":
            block, smem = (ROWS_THREADS, 1, 1), 0
        else:
            block, smem = (TILE_THREADS, 1, 1), self.program.tile_shared_bytes(rows // 8)
        cuda.launch(self.module.function(name), grid, block,
                    [(x, ctypes.c_void_p), (y, ctypes.c_void_p), (int(self.params), ctypes.c_void_p),
                     (int(self.wt), ctypes.c_void_p), (int(self.w4), ctypes.c_void_p), (batch, ctypes.c_int)],
                    self.stream, smem)

    def choose_kernel(self, batch: int, x: int, y: int) -> str:
        """The fastest kernel for ``batch`` on this GPU, timed once with CUDA events (``autotune``), else
        :func:`kernel_for_batch`'s. Every candidate computes the same bits; only the speed differs."""
        if batch in self.choice:
            return self.choice[batch]
        names = kernel_candidates(batch)
        if not self.autotune or len(names) == 1:
            self.choice[batch] = names[0] if len(names) == 1 else kernel_for_batch(batch)[0]
            return self.choice[batch]
        driver = self._driver
        cuda.check(driver.cuMemsetD32Async(x, 0, batch * self.obs_dim, self.stream.handle), "cuMemsetD32Async")
        start = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
        stop = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
        times = {}
        try:
            for name in names:
                for _ in range(2):
                    self.launch(batch, x, y, name)
                cuda.check(driver.cuEventRecord(start, self.stream.handle), "cuEventRecord")
                for _ in range(10):
                    self.launch(batch, x, y, name)
                cuda.check(driver.cuEventRecord(stop, self.stream.handle), "cuEventRecord")
                cuda.check(driver.cuEventSynchronize(stop), "cuEventSynchronize")
                times[name] = float(cuda.check(driver.cuEventElapsedTime(start, stop), "cuEventElapsedTime"))
        finally:
            driver.cuEventDestroy(start)
            driver.cuEventDestroy(stop)
        best = min(times, key=lambda n: times[n])
        self.choice[batch] = best
        self.tuning[batch] = {n: t * 100.0 for n, t in times.items()}  # µs per launch (10 launches, ms)
        return best

    def path(self, batch: int) -> _BatchPath:
        p = self._paths.get(batch)
        if p is None:
            capture = self.cuda_graph and self._graphs < MAX_GRAPHS
            p = _BatchPath(self, batch, capture)
            if p.graph is not None:
                self._graphs += 1
            self._paths[batch] = p
        return p

    def _start(self, p: _BatchPath) -> None:
        """Enqueue ``p``'s copies and kernel (one graph launch)."""
        if p.graph is None:
            p.enqueue()
        elif self.hot is not None:
            err = self.hot.graph_launch(p.exec_handle, self._stream)
            if err:
                cuda.raise_for(err, "cuGraphLaunch")
        else:
            cuda.check(self._driver.cuGraphLaunch(p.graph.exec, self.stream.handle), "cuGraphLaunch")

    def _wait(self, p: _BatchPath) -> None:
        """Wait until the stream's work is done: spin (poll) or block, as ``p.spin`` says."""
        hot = self.hot
        if hot is None:
            if p.spin:
                err, = self._driver.cuStreamQuery(self.stream.handle)
                while int(err) == cuda.CUDA_ERROR_NOT_READY:
                    err, = self._driver.cuStreamQuery(self.stream.handle)
                cuda.check((err,), "cuStreamQuery")
            else:
                cuda.check(self._driver.cuStreamSynchronize(self.stream.handle), "cuStreamSynchronize")
            return
        err = hot.spin(self._stream) if p.spin else hot.stream_synchronize(self._stream)
        if err:
            cuda.raise_for(err, "cuStreamQuery" if p.spin else "cuStreamSynchronize")

    def run(self, obs: np.ndarray) -> np.ndarray:
        """Actions for ``obs`` float32 [batch, obs_dim] (a new array)."""
        batch = int(obs.shape[0])
        with self._lock:
            p = self._paths.get(batch) or self.path(batch)
            np.copyto(p.in_array, obs, casting="same_kind")
            t0 = time.perf_counter()
            self._start(p)
            self._wait(p)
            self.latency.add_serialized(time.perf_counter() - t0)
            return p.out_array.copy()

    def run_overlapped(self, obs: np.ndarray, batch: int,
                       work: Callable[[np.ndarray], bool]) -> tuple[np.ndarray, bool]:
        """:meth:`run` for a float32 ``obs`` of ``batch`` rows (or one observation, ``batch`` 1), with
        ``work(obs)`` done on the host while the GPU computes; returns the actions and what ``work``
        returned. ``work`` must not raise (the stream is always waited for)."""
        with self._lock:
            p = self._paths.get(batch) or self.path(batch)
            np.copyto(p.in_array, obs, casting="same_kind")
            t0 = time.perf_counter()
            self._start(p)
            try:
                ok = work(obs)
            finally:
                self._wait(p)
            self.latency.add_serialized(time.perf_counter() - t0)
            return p.out_array.copy(), ok

    def graph_nodes(self, batch: int) -> dict[str, int]:
        """Kernels and copies captured in ``batch``'s graph (``{"KERNEL": 1, "MEMCPY": 2}``)."""
        p = self.path(batch)
        return p.graph.node_types() if p.graph is not None else {}


class FusedCudaPolicy:
    """An INT8 feed-forward bundle model on the fused GPU kernel; the interface of ``OrtPolicy``.

    Args:
        model: the INT8 QDQ ONNX file (the bundle's ``policy.int8.onnx``) or its (verified) bytes.
        input_name, output_name: the model's observation input and action output.
        device: the CUDA device.
        cuda_graph: replay each batch size's copies + kernel as a CUDA graph.
        sync: how a call waits for the GPU (:class:`FusedMlpRunner`): ``"auto"`` (spin up to
            :data:`SPIN_MAX_BATCH` observations, block above), ``"spin"`` or ``"block"``.

    Raises:
        UnsupportedGraph: not a chain of INT8 layers this backend runs (recurrent, float layers, ...).
        CudaError: CUDA cannot be used here (no driver, GPU or cuda-python).
    """

    state_specs: list[dict[str, Any]] = []

    def __init__(self, model: str | Path | bytes, *, input_name: str = "obs", output_name: str = "actions",
                 device: int = 0, cuda_graph: bool = True, sync: str = "auto") -> None:
        graph = parse_model(model, "model bytes") if isinstance(model, bytes) else load_graph(model)
        plan = plan_from_graph(graph)
        self.model = "(verified bytes)" if isinstance(model, bytes) else Path(model).name
        if plan.input_name != input_name or plan.output_name != output_name:
            raise UnsupportedGraph(f"{self.model}: input/output are {plan.input_name!r}/{plan.output_name!r}, the "
                                   f"manifest names {input_name!r}/{output_name!r}")
        self.plan = plan
        self.runner = FusedMlpRunner(plan, device=device, cuda_graph=cuda_graph, sync=sync)
        self.input_name, self.output_name = input_name, output_name
        self.output_names = [output_name]
        self.state_specs = []
        self.obs_dim = plan.obs_dim
        self._latency = self.runner.latency

    @property
    def providers(self) -> list[str]:
        return [f"edgeq fused int8 CUDA kernel ({self.runner.info['gpu_name']}, "
                f"sm_{self.runner.info['compute_capability'].replace('.', '')})"]

    def describe(self) -> dict[str, Any]:
        return {"runtime": "edgeq-fused-cuda", "model": self.model, "device": self.runner.info,
                "cuda_graph": self.runner.cuda_graph, "sync": self.runner.sync,
                "spin_max_batch": self.runner.spin_max_batch,
                "native_calls": self.runner.hot is not None and self.runner.hot.native, "plan": self.plan.describe()}

    def reset(self, mask: np.ndarray | None = None) -> None:
        """No recurrent state: nothing to reset."""

    def run(self, obs: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else [self.output_name]
        if names != [self.output_name]:
            raise InputError(f"the fused backend computes only {self.output_name!r} (asked for {names})")
        return {self.output_name: self.act(obs)}

    @property
    def latency(self) -> LatencyStats:
        """Backend latency: graph launch to the end of the wait, per call."""
        return self._latency

    def act_overlapped(self, obs: np.ndarray, batch: int,
                       work: Callable[[np.ndarray], bool]) -> tuple[np.ndarray, bool]:
        """The hot path of ``edgeq.deploy.load(...).act``: actions for a C-contiguous float32 ``obs``
        (``batch`` rows, or one observation with ``batch`` 1), with ``work(obs)`` (the caller's input
        check) run on the host while the GPU computes. Returns the actions ``[batch, act_dim]`` and
        ``work``'s result; the caller discards the actions when that says the input was bad."""
        return self.runner.run_overlapped(obs, batch, work)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch of observations (float32 [batch, obs_dim] → [batch, act_dim])."""
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise InputError(f"observation batch of shape {obs.shape}; expected (batch, {self.obs_dim})")
        return self.runner.run(obs)


def fused_support(model: str | Path) -> str | None:
    """None if the fused backend can run ``model`` (graph only; CUDA not checked), else why not."""
    try:
        FusedProgram(plan_from_graph(load_graph(model)))
    except UnsupportedGraph as exc:
        return str(exc)
    return None


__all__ = ["FusedCudaPolicy", "FusedMlpRunner", "FusedProgram", "ROWS_MAX_BATCH", "fused_support",
           "kernel_candidates", "kernel_for_batch"]
