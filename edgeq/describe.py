"""Human descriptions of a bundle's manifest, shared by the CLI summary, ``edgeq info`` and the report.

Every sentence is built from what the manifest records (never from the recipe's defaults), so the
summary, ``info`` and the report say the same thing: what was loaded (normalization, wrappers, the
env), what each layer really runs as in each file, and which software made the bundle.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

#: Distributions whose versions a bundle records (``manifest["environment"]["versions"]``).
VERSIONED = ("edgeq", "onnxruntime", "onnx", "torch", "gymnasium", "mujoco", "stable-baselines3", "sb3-contrib",
             "numpy")


def software_versions(names: Iterable[str] = VERSIONED) -> dict[str, str]:
    """Installed versions (``"not installed"`` where absent); edgeq's own from :data:`edgeq.__version__`."""
    out: dict[str, str] = {}
    for name in names:
        if name == "edgeq":
            from edgeq._version import __version__

            out[name] = __version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_environment() -> dict[str, Any]:
    """Where a bundle was made: versions, machine, Python (the date is a measurement: :func:`made_utc`)."""
    return {"versions": software_versions(), "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {_cpu_model()}, {os.cpu_count()} logical CPUs"}


def made_utc() -> str:
    """Now, as the bundle's date (kept in measurements.json, out of the hashed manifest)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def loaded_lines(manifest: Mapping[str, Any]) -> list[str]:
    """What was loaded and how the env is built: policy file and hash, normalization, wrappers, env."""
    src = manifest.get("source", {})
    det = src.get("details", {})
    name = Path(str(src.get("path", "?"))).name
    mods = det.get("modules")
    # an encoder + body policy: both files, each with its own hash (TorchScript sources list submodule names)
    if isinstance(mods, list) and mods and all(isinstance(m, dict) and "path" in m for m in mods):
        name = " + ".join(f"{Path(str(m['path'])).name} ({str(m['sha256'])[:12]}…)" for m in mods)
    kinds = {"sb3": "Stable-Baselines3 archive", "onnx": "ONNX file", "torchscript": "TorchScript module"}
    what = " ".join(x for x in (src.get("algorithm"), kinds.get(src.get("kind", ""), src.get("kind"))) if x)
    lines = [f"policy: {what} {name} (SHA-256 {src.get('sha256', '?')})"]
    zoo = det.get("rl_zoo")
    if zoo:
        lines.append(f"RL Zoo run: {zoo['folder']} ({', '.join(zoo.get('files', [])) or 'no config files'})")
    norm = manifest.get("preprocess", {}).get("normalize")
    if norm:
        stack = f", per frame of {norm['frame_stack']} stacked" if norm.get("frame_stack") else ""
        lines.append(f"observation normalization: {Path(norm['source']).name} ({norm.get('features', '?')} features, "
                     f"clip ±{norm['clip']:g}{stack}), applied in the graph as an fp32 pre-op")
    elif src.get("kind") == "sb3":
        lines.append("observation normalization: none (no vecnormalize.pkl beside the archive or given)")
    env = manifest.get("env")
    if env:
        parts = [env["id"]]
        if env.get("kwargs"):
            parts.append(f"kwargs {env['kwargs']}")
        for w in env.get("wrappers", []):
            kw = f"({w['kwargs']})" if w.get("kwargs") else ""
            parts.append(f"wrapped in {w['class'].rsplit('.', 1)[-1]}{kw}")
        if env.get("frame_stack"):
            parts.append(f"{env['frame_stack']} frames stacked")
        lines.append("env: " + ", ".join(parts) + (f" ({env['note']})" if env.get("note") else ""))
    return lines


#: The bundle's shipped INT8 files and who runs them, in the order the summary lists them.
SHIPPED_FILES = {"policy.int8.onnx": "TensorRT, edgeq's fused CUDA kernel",
                 "policy.int8.cpu.onnx": "ONNX Runtime CPU", "policy.int8.cuda.onnx": "ONNX Runtime CUDA EP"}
#: How a status of :mod:`edgeq.export.file_precision` reads in a layer table.
_STATUS_TEXT = {"float on int8 weights": "float (int8 weights)"}


def _file_status(manifest: Mapping[str, Any], file: str) -> dict[str, str]:
    rec = (manifest.get("file_precision") or {}).get(file) or {}
    return {r["node"]: _STATUS_TEXT.get(r["status"], r["status"]) for r in rec.get("layers", [])
            if r.get("weight") != "none"}


def layer_precisions(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer, what it really runs as in each file: ``{"node", "tensorrt", "cpu", "cuda", "choice"}``.

    Read from the files themselves where the manifest has ``file_precision`` (bundles since issue 12):
    a layer the ONNX Runtime CPU file runs in float on its int8-stored weights says ``float (int8
    weights)`` there, an fp16 layer ``fp16``; it is never called INT8 in that file.
    """
    quant = manifest.get("quantization", {})
    cpu_float = set(manifest.get("cpu_float_layers") or [])
    by_file = {f: _file_status(manifest, f) for f in SHIPPED_FILES}
    rows = []
    for la in quant.get("layers", []):
        prec = la["precision"]
        qdq = "int8" if prec == "int8" else prec
        cpu = "float (int8 weights)" if prec == "int8" and la["node"] in cpu_float else qdq
        choice = (la.get("choice") or {}).get("label") or (la.get("scheme", "static") if prec == "int8" else "")
        rows.append({"node": la["node"], "tensorrt": by_file["policy.int8.onnx"].get(la["node"], qdq),
                     "cpu": by_file["policy.int8.cpu.onnx"].get(la["node"], cpu),
                     "cuda": by_file["policy.int8.cuda.onnx"].get(la["node"], qdq), "choice": choice,
                     "reason": la.get("reason")})
    return rows


def _why(manifest: Mapping[str, Any], file: str, status: str, nodes: list[str]) -> str:
    """Why these layers of ``file`` are not int8 (from the manifest's records), for the headline."""
    if status == "float on int8 weights" and file == "policy.int8.cpu.onnx":
        method = (manifest.get("cpu_layer_selection") or {}).get("method")
        return {"measured": "chosen by measured latency", "replayed": "a replayed measured-latency choice"}.get(
            str(method), f"narrower than {manifest.get('profile', {}).get('cpu_float_below')} (width rule)")
    if status == "int8-rounded, float32 compute":
        return "ONNX Runtime's CUDA EP has no int8 GEMM"
    reasons = {la["node"]: la.get("reason") or "" for la in manifest.get("quantization", {}).get("layers", [])}
    why = sorted({reasons.get(n, "").split(":")[0].strip() for n in nodes} - {""})
    return "; ".join(why) if why else "kept in float by the plan"


def file_headline(manifest: Mapping[str, Any], file: str) -> str | None:
    """``"policy.int8.cpu.onnx: 2 of 3 layers int8 (weights+activations), 1 float on int8 weights (chosen by
    measured latency)"``: counted from the file (``manifest["file_precision"]``); None if not recorded."""
    rec = (manifest.get("file_precision") or {}).get(file)
    if not rec:
        return None
    layers = [r for r in rec.get("layers", []) if r.get("weight") != "none"]
    n = len(layers)
    if n == 0:
        return f"{file}: no weight layers"
    by_status: dict[str, list[str]] = {}
    for r in layers:
        by_status.setdefault(r["status"], []).append(r["node"])
    q = len(by_status.pop("int8", []))
    emulated = by_status.get("int8-rounded, float32 compute", [])
    if q == n:
        head = f"{file}: all {n} layers int8 (weights+activations)"
    elif len(emulated) == n:
        return (f"{file}: all {n} layers int8-rounded weights+activations, computed in float32 (ONNX Runtime's "
                "CUDA EP has no int8 GEMM; the same arithmetic as policy.int8.onnx)")
    else:
        head = f"{file}: {q} of {n} layers int8 (weights+activations)"
    parts = []
    for status, nodes in by_status.items():
        label = {"w4a8": "W4A8 (int4 weights, int8 activations)"}.get(status, status)
        parts.append(f"{len(nodes)} {label} ({_why(manifest, file, status, nodes)}: {', '.join(nodes)})")
    mm = [r for r in rec.get("layers", []) if r.get("weight") == "none"]
    if mm:
        parts.append(f"activation x activation MatMuls {sum(r['status'] == 'int8' for r in mm)}/{len(mm)} int8")
    return head + (", " + ", ".join(parts) if parts else "")


def result_rows(validation: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a validation: each target (on the file it runs), then the all-INT8 file on the CPU where the
    CPU target ran a different file (``validation["all_int8_cpu"]``, with its own verdict)."""
    rows = list(validation.get("targets", {}).items())
    extra = validation.get("all_int8_cpu")
    if extra:
        rows.append((f"cpu, {extra.get('int8_model', 'policy.int8.onnx')} (all-INT8)", extra))
    return rows


def return_ratio_text(result: dict[str, Any]) -> str:
    """``"policy.int8.cpu.onnx keeps 99.2% of the float return"`` for one target's (or row's) result."""
    f, q = result["float"]["mean"], result["int8"]["mean"]
    name = result.get("int8_model", "int8")
    if not f:
        return f"{name}: int8 - float return {q - f:+.4g}"
    # for negative returns (costs) the ratio of magnitudes reads backwards: report the relative change too
    return (f"{name} keeps {q / f:.1%} of the float return" if f > 0 else
            f"{name}: return {q:.4g} vs float {f:.4g} ({(q - f) / abs(f):+.2%})")


def pruning_text(manifest: Mapping[str, Any]) -> str | None:
    """``"pruned before quantization: 25% of hidden units (256->192, 256->192; 64 constant units removed exactly);
    every verdict is against the unpruned policy.fp32.onnx"``, or None."""
    rec = manifest.get("pruning")
    if not rec:
        return None
    widths = ", ".join(f"{r['width']}->{r['kept']}" for r in rec.get("layers", []))
    const = sum(int(r.get("constant_units_removed", 0)) for r in rec.get("layers", []))
    return (f"pruned before quantization: {100 * float(rec['ratio']):g}% of each hidden layer's units ({widths}; "
            f"{const} constant on calibration states, removed exactly); every verdict is against the unpruned "
            f"policy.fp32.onnx, the pruned float graph is {rec.get('file')}")


def file_headlines(manifest: Mapping[str, Any]) -> list[str]:
    """:func:`file_headline` for every shipped INT8 file the manifest records, in :data:`SHIPPED_FILES` order."""
    out = []
    for f in SHIPPED_FILES:
        line = file_headline(manifest, f)
        if line:
            out.append(line)
    return out


def precision_counts(manifest: Mapping[str, Any]) -> str:
    """Per shipped file, its layers as the file computes them (:func:`file_headlines`); bundles made before
    the files were read: ``"int8: 3/3 in policy.int8.onnx; ORT CPU file: 1 int8, 2 float on int8 weights"``."""
    heads = file_headlines(manifest)
    if heads:
        return "; ".join(heads)
    rows = layer_precisions(manifest)
    if not rows:
        return "no quantized layers"
    n = len(rows)
    q = sum(r["tensorrt"] == "int8" for r in rows)
    h = sum(r["tensorrt"] == "fp16" for r in rows)
    c8 = sum(r["cpu"] == "int8" for r in rows)
    text = f"{q}/{n} layers int8 in policy.int8.onnx (TensorRT, ORT CUDA)" + (f", {h} fp16" if h else "")
    if c8 != q:
        text += f"; policy.int8.cpu.onnx: {c8} int8, {q - c8} float on int8 weights"
    return text


def cpu_float_text(manifest: Mapping[str, Any]) -> str:
    """Which layers policy.int8.cpu.onnx runs in float (on int8 weights) and why (measured or by width)."""
    cpu_float = manifest.get("cpu_float_layers") or []
    if not cpu_float:
        return ""
    sel = manifest.get("cpu_layer_selection") or {}
    if sel.get("method") == "measured":
        why = f"measured faster at batch 1 at export: {sel.get('summary', '')}".rstrip(": ")
    elif sel.get("method") == "replayed":
        why = "replayed from an earlier measurement"
    else:
        why = f"narrower than {manifest.get('profile', {}).get('cpu_float_below')}: faster than ORT's int8 kernel"
    return (f"policy.int8.cpu.onnx runs {len(cpu_float)} layer(s) in float on their int8-stored weights, not int8: "
            f"{', '.join(cpu_float)} ({why}); policy.int8.onnx (TensorRT/CUDA) quantizes them")


def activation_choices(manifest: dict[str, Any]) -> str:
    """The activation quantizers the search really chose (per layer), not the recipe's starting point."""
    rows = [r for r in layer_precisions(manifest) if r["choice"]]
    settings = manifest.get("quantization", {}).get("settings", {})
    if not rows:
        return f"{settings.get('activation_calibrator')} {settings.get('calibrator_params', {})}"
    distinct = sorted({r["choice"] for r in rows})
    head = "chosen per layer on held-out states" if settings.get("options", {}).get("auto") else "per layer"
    return f"{head}: " + "; ".join(f"{r['node']} {r['choice']}" for r in rows) if len(distinct) > 1 else \
        f"{distinct[0]} (every layer)"


def _status_of(verdict: dict[str, Any]) -> str:
    """PASS / FAIL / INCONCLUSIVE (bundles before the three-way verdict: from ``passed``)."""
    return str(verdict.get("status") or ("PASS" if verdict.get("passed") else "FAIL"))


def info_lines(manifest: dict[str, Any], validation: dict[str, Any] | None) -> list[str]:
    """``edgeq info``: the bundle in a dozen lines."""
    lines = loaded_lines(manifest)
    lines.append("layers: " + precision_counts(manifest))
    pruned = pruning_text(manifest)
    if pruned:
        lines.append(pruned)
    lines.append("activations: " + activation_choices(manifest))
    files = manifest.get("files", {})
    onnx_files = sorted(f for f in files if f.endswith(".onnx"))
    if onnx_files:
        lines.append("files: " + ", ".join(onnx_files) + f" (+{len(files) - len(onnx_files)} others, SHA-256 "
                     "checked)")
    env_rec = manifest.get("environment")
    if env_rec:
        v = env_rec.get("versions", {})
        lines.append("made with: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; Python "
                     f"{env_rec.get('python')}; {env_rec.get('machine')}"
                     + (f"; {env_rec['date_utc']}" if env_rec.get("date_utc") else ""))
    else:
        lines.append(f"made with: edgeq {manifest.get('edgeq_version', '?')}")
    if validation:
        verdict = validation.get("verdict") or {}
        for target, r in result_rows(validation):
            d = r.get("paired_difference")
            if not d:
                continue
            lines.append(f"validation {target}: float {r['float']['mean']:.1f}, int8 {r['int8']['mean']:.1f} "
                         f"over {len(validation.get('seeds', []))} paired episodes (diff {d['mean']:+.3g}, 95% CI "
                         f"[{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}])"
                         + (f", verdict {_status_of(r['verdict'])}" if r.get("verdict") else ""))
        if verdict.get("status"):
            lines.append(f"verdict: {verdict['status']}")
    return lines
