"""GPU latency of recurrent (LSTM/GRU) policies: edgeq's fused recurrent kernel next to ONNX Runtime and torch.

One step per call: observation in (host numpy) → action out (host numpy), the recurrent state carried
from call to call, copies and synchronization included; per-call wall-clock time after warm-up,
cycling through 16 random observation batches; p50 / p99 / p99.9. Variants (each where it runs):

* ``floor: graph launch + sync`` / ``floor: pinned copies`` (``gpu_backends.floor_calls``);
* ``torch eager (fp32)`` / ``torch CUDA graph (fp32)``: the same policy in torch (``nn.LSTM``/``nn.GRU``
  and ``nn.Linear`` layers with the INT8 file's weights dequantized to float32: the same shapes and
  work in fp32), state kept on the GPU; the graph captures pinned copy in, cell + head, the state
  update and pinned copy out;
* ``edgeq cuda-ort int8``: ``policy.int8.cuda.onnx`` through :class:`OrtCudaPolicy` (IO binding, CUDA
  graph, pinned copies; the state goes through the host each call, as that backend carries it);
* ``edgeq cuda-fused recurrent int8``: :class:`FusedRnnPolicy` on ``policy.int8.onnx`` (one CUDA graph:
  copy in, kernel, copy out; state on the GPU); ``... via deploy.load`` adds the input checks;
* ``... kernel only (device time)``: CUDA events around 200 launches of the chosen kernel.

Before timing, each int8 variant runs 40 steps (a reset of every other row at step 20) on the same
observations as ONNX Runtime's CPU provider on ``policy.int8.onnx`` and the largest action difference
is recorded (``max_abs_err_vs_ort_cpu``).

    python benchmarks/gpu_recurrent.py BUNDLE=LABEL ... --batches 1 32 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

Call = Callable[[np.ndarray], np.ndarray]


def torch_recurrent(plan: Any) -> Any:
    """``plan`` in torch, fp32 (INT8 weights dequantized): ``module(x, state) -> (actions, state)``."""
    import torch
    from torch import nn

    def dq(layer: Any) -> tuple[Any, Any]:
        w = (layer.weight.astype(np.float32) * layer.w_scale[None, :]).T  # [N, K]
        return torch.from_numpy(np.ascontiguousarray(w)), torch.from_numpy(layer.bias.copy())

    def ops_fn(ops: list[Any]) -> Callable[[Any], Any]:
        def apply(x: Any) -> Any:
            for o in ops:
                if o.op == "Relu":
                    x = torch.relu(x)
                elif o.op == "Elu":
                    x = torch.nn.functional.elu(x, o.alpha)
                elif o.op == "LeakyRelu":
                    x = torch.nn.functional.leaky_relu(x, o.alpha)
                elif o.op == "Tanh":
                    x = torch.tanh(x)
                elif o.op == "Sigmoid":
                    x = torch.sigmoid(x)
                elif o.op == "Clip":
                    x = torch.clamp(x, o.lo if np.isfinite(o.lo) else None, o.hi if np.isfinite(o.hi) else None)
                else:
                    c = torch.as_tensor(o.const, device=x.device)
                    a, b = (c, x) if o.const_first else (x, c)
                    x = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
                         "Max": torch.maximum, "Min": torch.minimum}[o.op](a, b)
            return x
        return apply

    class Chain(nn.Module):
        def __init__(self, mlp: Any, skip_last: bool = False) -> None:
            super().__init__()
            layers = mlp.layers[:-1] if skip_last else mlp.layers
            self.pre = ops_fn(mlp.pre)
            self.lins = nn.ModuleList()
            self.posts = []
            for la in layers:
                lin = nn.Linear(la.k, la.n)
                w, b = dq(la)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
                self.lins.append(lin)
                self.posts.append(ops_fn(la.post))

        def forward(self, x: Any) -> Any:
            x = self.pre(x)
            for lin, post in zip(self.lins, self.posts, strict=True):
                x = post(lin(x))
            return x

    class Policy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cells = plan.cells
            self.encoder = Chain(cells[0].into, skip_last=True)
            cls = nn.LSTM if plan.kind == "lstm" else nn.GRU
            self.rnn = cls(cells[0].ih.k, plan.hidden, plan.num_layers)
            with torch.no_grad():
                for k, cell in enumerate(cells):
                    w, b = dq(cell.ih)
                    getattr(self.rnn, f"weight_ih_l{k}").copy_(w)
                    getattr(self.rnn, f"bias_ih_l{k}").copy_(b)
                    w, b = dq(cell.hh)
                    getattr(self.rnn, f"weight_hh_l{k}").copy_(w)
                    getattr(self.rnn, f"bias_hh_l{k}").copy_(b)
            self.head = Chain(plan.head)
            self.lstm = plan.kind == "lstm"

        def forward(self, x: Any, h: Any, c: Any) -> tuple[Any, Any, Any]:
            z = self.encoder(x)[None]
            if self.lstm:
                out, (h2, c2) = self.rnn(z, (h, c))
            else:
                out, h2 = self.rnn(z, h)
                c2 = c
            return self.head(out[0]), h2, c2

    return Policy()


def torch_calls(plan: Any, batch: int) -> dict[str, Call]:
    import torch

    dev = torch.device("cuda")
    module = torch_recurrent(plan).to(dev).eval()
    shape = (plan.num_layers, batch, plan.hidden)
    h, c = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    state = {"h": h, "c": c}

    def eager(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(obs).to(dev, non_blocking=False)
            y, state["h"], state["c"] = module(x, state["h"], state["c"])
            return y.cpu().numpy()

    h_in = torch.zeros((batch, plan.obs_dim)).pin_memory()
    h_out = torch.zeros((batch, plan.act_dim)).pin_memory()
    d_in = torch.zeros((batch, plan.obs_dim), device=dev)
    gh, gc = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)

    def body() -> None:
        d_in.copy_(h_in, non_blocking=True)
        y, h2, c2 = module(d_in, gh, gc)
        gh.copy_(h2)
        gc.copy_(c2)
        h_out.copy_(y, non_blocking=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.no_grad(), torch.cuda.graph(graph):
        body()
    gh.zero_()
    gc.zero_()

    def replay(obs: np.ndarray) -> np.ndarray:
        h_in.numpy()[...] = obs
        graph.replay()
        torch.cuda.current_stream().synchronize()
        return h_out.numpy().copy()

    nodes: dict[str, int] = {}
    try:
        from cuda.bindings import driver

        from edgeq.deploy.cuda import graph_node_types

        nodes = graph_node_types(driver.CUgraph(int(graph.raw_cuda_graph())))
    except Exception:  # noqa: BLE001 - a count for the report only
        pass
    replay.nodes = nodes  # type: ignore[attr-defined]
    return {"torch eager (fp32)": eager, "torch CUDA graph (fp32)": replay}


def fused_kernel_time(runner: Any, batch: int, reps: int = 200) -> float:
    from cuda.bindings import driver

    from edgeq.deploy import cuda

    p = runner.path(batch)
    name = runner.choice[batch]
    for _ in range(10):
        runner.launch(name, p)
    start = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
    stop = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
    cuda.check(driver.cuEventRecord(start, runner.stream.handle), "cuEventRecord")
    for _ in range(reps):
        runner.launch(name, p)
    cuda.check(driver.cuEventRecord(stop, runner.stream.handle), "cuEventRecord")
    cuda.check(driver.cuEventSynchronize(stop), "cuEventSynchronize")
    ms = cuda.check(driver.cuEventElapsedTime(start, stop), "cuEventElapsedTime")
    return float(ms) * 1000.0 / reps


def run(bundles: list[tuple[Path, str]], batches: list[int], json_out: Path | None, scale: float) -> dict[str, Any]:
    import torch
    from gpu_backends import bench, floor_calls, run_info

    import edgeq.deploy
    from edgeq.deploy.fused_rnn import FusedRnnPolicy
    from edgeq.deploy.onnx_graph import load_graph
    from edgeq.deploy.rnn_plan import recurrent_plan_from_graph
    from edgeq.deploy.runtime import OrtPolicy

    info = run_info()
    has_ort_cuda = bool(info["ort_cuda"])
    results: dict[str, Any] = {"info": info, "policies": {}}
    rng = np.random.default_rng(0)
    for bundle, label in bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        state = manifest["io"]["state"]
        int8 = bundle / manifest["models"]["int8"]
        int8_cuda = bundle / manifest["models"].get("int8-cuda", manifest["models"]["int8"])
        plan = recurrent_plan_from_graph(load_graph(int8), state)
        fused = FusedRnnPolicy(int8, state=state)
        deployed = edgeq.deploy.load(bundle, backend="cuda", allow_unsigned=True)
        pres: dict[str, Any] = {"obs_dim": plan.obs_dim, "act_dim": plan.act_dim, "plan": plan.describe(),
                                "deploy_cuda_backend": deployed.backend, "deploy_providers": deployed.providers,
                                "batches": {}, "kernels_per_act": {}}
        results["policies"][label] = pres
        print(f"[{label}] deploy.load(cuda) -> {deployed.backend} {deployed.providers}", flush=True)
        for batch in batches:
            warmup = 300 if batch <= 256 else 50
            calls = int((5000 if batch == 1 else 3000 if batch <= 256 else 1000) * scale)
            pool = [(rng.standard_normal((batch, plan.obs_dim)) * 1.5).astype(np.float32) for _ in range(16)]
            check = [(rng.standard_normal((batch, plan.obs_dim)) * 1.5).astype(np.float32) for _ in range(40)]
            rows: dict[str, Any] = {}
            pres["batches"][str(batch)] = rows
            tag = f"[{label}] batch {batch:5d}"

            def error(step: Call, reset: Callable[[Any], None] | None, check: list[np.ndarray] = check,
                      batch: int = batch, int8: Path = int8, state: list[Any] = state) -> float:
                ref = OrtPolicy(int8, state=state)
                worst = 0.0
                for t, x in enumerate(check):
                    if t == 20 and reset is not None:
                        mask = np.arange(batch) % 2 == 0
                        ref.reset(mask)
                        reset(mask)
                    worst = max(worst, float(np.abs(step(x) - ref.act(x)).max()))
                return worst

            def record(key: str, make: Callable[[], tuple[Call, Callable[[Any], None] | None]], checked: bool,
                       rows: dict[str, Any] = rows, pool: list[np.ndarray] = pool, warmup: int = warmup,
                       calls: int = calls, tag: str = tag) -> None:
                try:
                    call, reset = make()
                    err = error(call, reset) if checked else None
                    timing = bench(call, pool, warmup, calls)
                except Exception as exc:  # noqa: BLE001 - a refused variant is a result
                    print(f"{tag}  {key:48s} refused: {str(exc)[:300]}", flush=True)
                    rows[key] = {"error": str(exc)[:400]}
                    return
                rows[key] = {**timing, "max_abs_err_vs_ort_cpu": err}
                print(f"{tag}  {key:48s} p50 {timing['p50_us']:8.1f}  p99 {timing['p99_us']:8.1f}  "
                      f"p99.9 {timing['p999_us']:8.1f} us  err {err if err is None else f'{err:.1e}'}", flush=True)

            for key, call in floor_calls(batch, plan.obs_dim, plan.act_dim).items():
                record(key, lambda c=call: (c, None), False)
            tcalls = torch_calls(plan, batch)
            if batch == 1:
                pres["kernels_per_act"]["torch CUDA graph (fp32)"] = getattr(tcalls["torch CUDA graph (fp32)"],
                                                                             "nodes", {})
            for key, call in tcalls.items():
                record(key, lambda c=call: (c, None), False)
            if has_ort_cuda:
                from edgeq.deploy.ort_cuda import OrtCudaPolicy

                def make_ort(int8_cuda: Path = int8_cuda,
                             state: list[Any] = state) -> tuple[Call, Callable[[Any], None]]:
                    p = OrtCudaPolicy(int8_cuda, state=state, io_binding=True, cuda_graph=True, pinned=True)
                    return p.act, p.reset

                record("edgeq cuda-ort int8 (IO binding, graph, pinned)", make_ort, True)

            def make_fused(fused: Any = fused) -> tuple[Call, Callable[[Any], None]]:
                fused.reset()
                return fused.act, fused.reset

            def make_deployed(deployed: Any = deployed) -> tuple[Call, Callable[[Any], None]]:
                deployed.reset()
                return deployed.act, deployed.reset

            record("edgeq cuda-fused recurrent int8", make_fused, True)
            record("edgeq cuda-fused recurrent int8 via deploy.load", make_deployed, True)
            if batch == 1:
                pres["kernels_per_act"]["edgeq cuda-fused recurrent"] = fused.runner.graph_nodes(1)
            rows["edgeq cuda-fused recurrent kernel only (device time)"] = {
                "p50_us": fused_kernel_time(fused.runner, batch)}
            print(f"{tag}  fused kernel alone "
                  f"{rows['edgeq cuda-fused recurrent kernel only (device time)']['p50_us']:.1f} us "
                  f"({fused.runner.choice[batch]}; autotune µs {fused.runner.tuning.get(batch)})", flush=True)
            fused.reset()
            deployed.reset()
            torch.cuda.synchronize()
        pres["fused_kernel_choice"] = {str(b): n for b, n in fused.runner.choice.items()}
        pres["fused_autotune_us"] = {str(b): t for b, t in fused.runner.tuning.items()}
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=1))
    from gpu_backends import print_tables

    for pres in results["policies"].values():
        pres.setdefault("fused_kernel_choice", None)
    print_tables(results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", help="BUNDLE=LABEL")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 4096])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the number of timed calls")
    args = ap.parse_args()
    pairs = []
    for item in args.bundles:
        path, _, label = item.partition("=")
        pairs.append((Path(path), label or Path(path).name))
    run(pairs, args.batches, args.json, args.scale)


if __name__ == "__main__":
    main()
