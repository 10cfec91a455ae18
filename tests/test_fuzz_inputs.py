"""Fuzz the CLI's input path: thousands of mutated SB3 archives, vecnormalize pickles and ONNX files.

Each input goes through ``edgeq quantize`` (and ONNX files also through ``edgeq check``) in this
process. The run is stopped right after the policy is read (the env factory is replaced by one that
exits with status 99, "accepted"), so each input costs milliseconds. Every input must end in exactly
one of: accepted (99), ``check``'s 0/1 verdict, or exit 2 with exactly one line ``error: ...`` on
stderr. The corpus is generated here from the committed fixtures with fixed seeds (same inputs every
run): byte flips, truncations and insertions, plus structure-aware edits of the JSON ``data`` entry,
the ``policy.pth`` tensors, the pickle's fields and the ONNX graph.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import hostile_inputs as h
import numpy as np
import pytest

from edgeq.cli import main

ACCEPTED = 99
#: Inputs per family (the test asserts the totals, so a silently shrunken corpus fails).
N_ZIP_BYTES, N_ZIP_DATA, N_ZIP_STATE, N_PICKLE, N_ONNX_BYTES, N_ONNX_GRAPH = 500, 450, 300, 300, 250, 200


def _run(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.bad: list[str] = []
        self.generic: list[str] = []

    def check(self, label: str, argv: list[str], allowed: tuple[int, ...] = (ACCEPTED,)) -> None:
        code, err = _run(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 2:
            ok = len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
            self.outcomes["exit 2, one line" if ok else "exit 2, NOT one line"] += 1
            if ok and lines[0].startswith("error: unexpected "):
                self.outcomes["exit 2 via the generic handler"] += 1
                self.generic.append(f"{label}: {lines[0][:300]}")
        elif code in allowed:
            ok = True
            self.outcomes[f"exit {code}"] += 1
        else:
            ok = False
            self.outcomes[f"exit {code}"] += 1
        if not ok and len(self.bad) < 10:
            self.bad.append(f"{label}: exit {code}: {err[-400:]}")


# -- the seed files ---------------------------------------------------------------------------------
def _small_archive(src: Path, dest: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``src`` without optimizer and critic state (the part edgeq reads), as data JSON + state dict."""
    import torch

    entries = h.read_entries(src)
    sd = torch.load(io.BytesIO(entries["policy.pth"]), weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.startswith(("critic", "qf", "value_net", "mlp_extractor.value"))}
    buf = io.BytesIO()
    torch.save(sd, buf)
    h.write_zip(dest, {"data": entries["data"], "policy.pth": buf.getvalue(),
                       "_stable_baselines3_version": entries.get("_stable_baselines3_version", b"2.3.0")})
    return json.loads(entries["data"]), sd


def _mutate_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # flip a few bytes
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
    elif kind == 1:  # truncate
        b = b[: int(rng.integers(0, len(b)))]
    elif kind == 2:  # insert junk
        at = int(rng.integers(len(b)))
        b[at:at] = rng.bytes(int(rng.integers(1, 64)))
    else:  # overwrite a run with a repeated byte (zeros, 0xff)
        at, n = int(rng.integers(len(b))), int(rng.integers(1, 256))
        b[at:at + n] = bytes([int(rng.choice([0, 0xFF, 0x7F]))]) * min(n, len(b) - at)
    return bytes(b)


_ODD_VALUES: list[Any] = [None, True, 0, -1, 2**63, 1e308, -0.0, "", "x" * 1000, [], {}, [1, 2, 3], {"a": None},
                          "inf", "nan", [[[]]], {":type:": "<class 'gymnasium.spaces.box.Box'>"},
                          {":serialized:": "gARLAS4="}, {":serialized:": "not base64!"}]


def _odd(rng: np.random.Generator) -> Any:
    return copy.deepcopy(_ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))])


def _mutate_json(rng: np.random.Generator, data: dict[str, Any]) -> Any:
    d = copy.deepcopy(data)
    if rng.random() < 0.05:
        return _odd(rng)
    for _ in range(int(rng.integers(1, 4))):
        key = list(d)[int(rng.integers(len(d)))] if d else "x"
        target: Any = d
        value = d.get(key)
        if isinstance(value, dict) and value and rng.random() < 0.7:  # one level down (spaces, policy_kwargs)
            target, key = value, list(value)[int(rng.integers(len(value)))]
        op = rng.integers(3)
        if op == 0:
            target.pop(key, None)
        elif op == 1:
            target[key] = _odd(rng)
        else:  # perturb a string field such as a shape or a numpy repr
            text = str(target.get(key, ""))
            if text:
                i = int(rng.integers(len(text)))
                junk = str(rng.choice(["9" * 12, "-", "[", "]", ",", "nan", "", "e400"]))
                target[key] = text[:i] + junk + text[i + 1:]
    return d


def _mutate_state(rng: np.random.Generator, sd: dict[str, Any]) -> dict[str, Any]:
    import torch

    out = dict(sd)
    keys = sorted(out)
    for _ in range(int(rng.integers(1, 3))):
        key = keys[int(rng.integers(len(keys)))]
        op = rng.integers(7)
        if key not in out:
            continue
        if op == 0:
            out.pop(key)
        elif op == 1:
            out[key] = torch.zeros(tuple(int(rng.integers(0, 9)) for _ in range(int(rng.integers(0, 4)))))
        elif op == 2:
            t = out[key].clone().float()
            if t.numel():
                t.view(-1)[int(rng.integers(t.numel()))] = float(rng.choice([np.nan, np.inf, -np.inf, 1e30]))
            out[key] = t
        elif op == 3:
            out[key] = out[key].to(torch.int8 if rng.random() < 0.5 else torch.float16)
        elif op == 4:
            out[key.replace(".0.", f".{int(rng.choice([7, 300, 10**9]))}.")] = torch.zeros(2, 2)
        elif op == 5:
            out[key] = torch.zeros(1).expand(int(rng.integers(1, 10**5)), int(rng.integers(1, 10**5)))
        else:
            out[key] = out[key].T.contiguous() if out[key].ndim == 2 else out[key]
    return out


def _mutate_onnx_graph(rng: np.random.Generator, model: Any) -> Any:
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    op = rng.integers(8)
    if op == 0 and g.input:
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            dims[int(rng.integers(len(dims)))].dim_value = int(rng.choice([0, 1, 7, 2**31 - 1, 2_000_000_000]))
    elif op == 1 and g.initializer:
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        if t.dims:
            t.dims[int(rng.integers(len(t.dims)))] = int(rng.choice([0, 3, 10**6, 2**40]))
    elif op == 2 and g.node:
        g.node[int(rng.integers(len(g.node)))].op_type = str(rng.choice(["Loop", "Bogus", "Conv", "If", "Relu"]))
    elif op == 3 and g.node:
        del g.node[int(rng.integers(len(g.node)))]
    elif op == 4 and g.node:
        n = g.node[int(rng.integers(len(g.node)))]
        if n.input:
            n.input[int(rng.integers(len(n.input)))] = str(rng.choice(["", "missing", g.output[0].name]))
    elif op == 5:
        m.opset_import[0].version = int(rng.choice([1, 7, 99, -3]))
    elif op == 6 and g.initializer:
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        t.data_type = int(rng.choice([onnx.TensorProto.STRING, onnx.TensorProto.INT8, onnx.TensorProto.DOUBLE, 99]))
    else:
        g.node.append(helper.make_node("Identity", [g.output[0].name], [g.output[0].name]))
    return m


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import onnx

    d = tmp_path_factory.mktemp("fuzz-seeds")
    sac_data, sac_sd = _small_archive(h.SAC_PENDULUM, d / "sac.zip")
    _small_archive(h.PPO_VECNORM, d / "ppo.zip")
    return {"dir": d, "sac_zip": (d / "sac.zip").read_bytes(), "sac_data": sac_data, "sac_sd": sac_sd,
            "ppo_zip": d / "ppo.zip", "pkl": h.VECNORM_PKL.read_bytes(),
            "onnx_bytes": h.ISAAC_ONNX.read_bytes(), "onnx": onnx.load(str(h.ISAAC_ONNX))}


def test_fuzz_every_input_is_accepted_or_one_line_exit_2(seeds: dict[str, Any], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    import edgeq.pipeline

    def accepted(*a: Any, **k: Any) -> Any:
        raise typer.Exit(ACCEPTED)

    monkeypatch.setattr(edgeq.pipeline, "env_factory", accepted)
    # per-run costs that do not depend on the input (tested elsewhere): the output probe, YAML parsing
    import edgeq.export.bundle

    monkeypatch.setattr(edgeq.export.bundle, "check_writable", lambda out: None)
    from edgeq.config import QuantizeConfig

    real = QuantizeConfig.from_recipe.__func__  # type: ignore[attr-defined]
    cache: dict[Any, QuantizeConfig] = {}

    def cached(cls: type[QuantizeConfig], *a: Any, **k: Any) -> QuantizeConfig:
        key = (a, tuple(sorted(k.items())))
        if key not in cache:
            cache[key] = real(cls, *a, **k)
        return cache[key]  # frozen: shared safely

    monkeypatch.setattr(QuantizeConfig, "from_recipe", classmethod(cached))
    rng = np.random.default_rng(20261203)
    tally = Tally()
    out = str(tmp_path / "never-written")
    policy = tmp_path / "policy.zip"
    counts: Counter[str] = Counter()
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    def quantize(path: Path, *extra: str) -> list[str]:
        return ["quantize", str(path), "--env", "Pendulum-v1", "--out", out, *extra]

    # sanity: the unmutated seeds are accepted
    policy.write_bytes(seeds["sac_zip"])
    assert _run(quantize(policy))[0] == ACCEPTED, _run(quantize(policy))

    for i in range(N_ZIP_BYTES):
        policy.write_bytes(_mutate_bytes(rng, seeds["sac_zip"]))
        tally.check(f"zip bytes #{i}", quantize(policy))
        counts["zip bytes"] += 1
    times["zip bytes"] = time.perf_counter() - t0
    entries = h.read_entries(seeds["dir"] / "sac.zip")
    for i in range(N_ZIP_DATA):
        data = _mutate_json(rng, seeds["sac_data"])
        raw = json.dumps(data).encode() if rng.random() < 0.9 else _mutate_bytes(rng, json.dumps(data).encode())
        h.write_zip(policy, {**entries, "data": raw}, compression=zipfile.ZIP_STORED)
        tally.check(f"zip data #{i}", quantize(policy))
        counts["zip data JSON"] += 1
    times["zip data JSON"] = time.perf_counter() - t0 - sum(times.values())
    import torch

    for i in range(N_ZIP_STATE):
        buf = io.BytesIO()
        torch.save(_mutate_state(rng, seeds["sac_sd"]), buf)
        raw = buf.getvalue() if rng.random() < 0.85 else _mutate_bytes(rng, buf.getvalue())
        h.write_zip(policy, {**entries, "policy.pth": raw}, compression=zipfile.ZIP_STORED)
        tally.check(f"zip policy.pth #{i}", quantize(policy))
        counts["zip policy.pth"] += 1
    times["zip policy.pth"] = time.perf_counter() - t0 - sum(times.values())

    pkl = tmp_path / "vecnormalize.pkl"
    for i in range(N_PICKLE):
        if rng.random() < 0.6:
            pkl.write_bytes(_mutate_bytes(rng, seeds["pkl"]))
        else:
            n = 17
            fields: dict[str, Any] = {"mean": np.zeros(n), "var": np.ones(n)}
            key = str(rng.choice(["mean", "var", "epsilon", "clip_obs"]))
            fields[key] = _odd(rng) if rng.random() < 0.5 else np.asarray(rng.choice([-1.0, np.nan, np.inf, 0.0]))
            pkl.write_bytes(h.vecnorm_pickle(**fields))
        tally.check(f"pickle #{i}", ["quantize", str(seeds["ppo_zip"]), "--env", "HalfCheetah-v5", "--out", out,
                                     "--vecnormalize", str(pkl)])
        counts["vecnormalize.pkl"] += 1
    times["vecnormalize.pkl"] = time.perf_counter() - t0 - sum(times.values())


    model_path = tmp_path / "policy.onnx"
    for i in range(N_ONNX_BYTES + N_ONNX_GRAPH):
        if i < N_ONNX_BYTES:
            model_path.write_bytes(_mutate_bytes(rng, seeds["onnx_bytes"]))
            counts["onnx bytes"] += 1
        else:
            model_path.write_bytes(_mutate_onnx_graph(rng, seeds["onnx"]).SerializeToString())
            counts["onnx graph"] += 1
        tally.check(f"onnx #{i} quantize", quantize(model_path))
        tally.check(f"onnx #{i} check", ["check", str(model_path)], allowed=(0, 1))
        if i == N_ONNX_BYTES - 1:
            times["onnx bytes"] = time.perf_counter() - t0 - sum(times.values())
    times["onnx graph"] = time.perf_counter() - t0 - sum(times.values())
    elapsed = time.perf_counter() - t0
    total = sum(counts.values())
    runs = sum(v for k, v in tally.outcomes.items() if k != "exit 2 via the generic handler")
    print(f"\nfuzz: {total} inputs, {runs} CLI runs in {elapsed:.1f}s; by family {dict(counts)}; "
          f"outcomes {dict(tally.outcomes)}; seconds {({k: round(v, 1) for k, v in times.items()})}")
    for line in tally.generic:
        print("generic:", line)
    assert not tally.bad, "\n".join(tally.bad)
    assert total == N_ZIP_BYTES + N_ZIP_DATA + N_ZIP_STATE + N_PICKLE + N_ONNX_BYTES + N_ONNX_GRAPH
    assert tally.outcomes["exit 2, one line"] > total // 2  # most mutations are refused, each in one line
    assert not Path(out).exists()
    # every refusal names the file it read: the generic handler (an exception no reader anticipated) is
    # the exception, and it must stay rare
    assert len(tally.generic) <= total // 100, "\n".join(tally.generic)
