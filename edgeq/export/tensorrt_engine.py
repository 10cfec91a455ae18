"""Build TensorRT engines from edgeq's ONNX exports and report which layers really run in int8.

The build side (workstation) of edgeq's TensorRT support. The runner, the compatibility rule and
this machine's facts (:class:`TrtPolicyRunner`, :func:`check_engine_compat`, :func:`current_platform`)
are the robot side, :mod:`edgeq.deploy.tensorrt_runner`; this module imports them (and re-exports
them for convenience), never the other way round. Two parts:

* :func:`build_engine` turns an ONNX file into a serialized engine with the TensorRT 10/11 Python API:
  ``precision="int8"`` builds the QDQ graph strongly typed (the int8 regions come from the graph);
  ``"fp16"`` builds a strongly typed engine from :func:`fp16_onnx_with_casts` (fp16 inside, fp32 IO);
  ``"fp32"`` builds the float graph as is. ``strongly_typed=False`` is the weakly typed path of
  TensorRT 10 (INT8/FP16 builder flags, needed on JetPack 5/6 and TensorRT < 10.12); TensorRT 11 has
  strong typing only and refuses it with a clear error. The result, :class:`EngineInfo`, records the
  TensorRT version, GPU and compute capability the engine is tied to, and the per-layer precision
  report of TensorRT's engine inspector (rule 16 of the QDQ notes: check that int8 really ran).
* :func:`fp16_onnx_with_casts` (needs only onnx and numpy) makes the fp16 model for strongly typed
  builds: weights in fp16, a Cast after each float input and before each float output.

Dependencies: ``tensorrt`` (10.x or 11.x) for building. Importing this module never fails for lack of TensorRT:
:data:`TENSORRT_AVAILABLE` says whether it can be used, and every function that needs it raises
:class:`TensorRTUnavailableError` (an ``ImportError``) with the install hint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgeq.deploy.tensorrt_runner import (
    TensorRTUnavailableError,
    TrtPolicyRunner,
    check_engine_compat,
    current_platform,
    engine_dims,
    make_logger,
    require_tensorrt,
)
from edgeq.errors import EdgeqError

if TYPE_CHECKING:
    import onnx

_TRT_IMPORT_ERROR: str | None
try:
    import tensorrt as trt
except (ImportError, OSError) as _exc:  # OSError: the package is there but its libraries are not
    TENSORRT_AVAILABLE = False
    _TRT_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    # `tensorrt-stubs` installs a `tensorrt/` folder of .pyi files only, which imports as an empty
    # namespace package: that is not TensorRT.
    TENSORRT_AVAILABLE = hasattr(trt, "Builder")
    _TRT_IMPORT_ERROR = None if TENSORRT_AVAILABLE else "only type stubs are installed (no runtime)"

__all__ = [
    "TENSORRT_AVAILABLE",
    "EngineBuildConfig",
    "EngineBuildError",
    "EngineInfo",
    "TensorRTUnavailableError",
    "TrtPolicyRunner",
    "build_engine",
    "check_engine_compat",
    "current_platform",
    "fp16_onnx_with_casts",
    "inspect_layers",
    "parse_layer_information",
    "summarize_layers",
]

_log = logging.getLogger("edgeq.tensorrt")

Precision = Literal["int8", "fp16", "fp32"]
_PRECISIONS = ("int8", "fp16", "fp32")


class EngineBuildError(EdgeqError):
    """TensorRT (or edgeq's pre-build check) refused to build an engine from an ONNX model."""


def _require_trt() -> None:
    require_tensorrt(TENSORRT_AVAILABLE, _TRT_IMPORT_ERROR)


def _trt_major() -> int:
    return int(str(trt.__version__).split(".")[0])


# --- build configuration and result ---------------------------------------------------------------


@dataclass(frozen=True)
class EngineBuildConfig:
    """How to build one engine.

    Attributes:
        precision: ``"int8"`` builds the QDQ ONNX strongly typed (its Q/DQ nodes decide what runs in
            int8); ``"fp16"`` builds an fp16 engine (strongly typed: from :func:`fp16_onnx_with_casts`);
            ``"fp32"`` builds the float graph.
        strongly_typed: False selects TensorRT 10's weakly typed mode (INT8 and FP16 builder flags):
            for JetPack 5/6 and TensorRT < 10.12. TensorRT 11 is strongly typed only.
        min_batch, opt_batch, max_batch: the optimization profile of the batch axis (axis 0 of every
            input); TensorRT tunes kernels for ``opt_batch``.
        workspace_bytes: the builder's workspace memory pool limit.
        timing_cache: a timing cache file: loaded if it exists, written after the build, so that
            rebuilding on the same GPU and TensorRT version is fast.
        check_qdq: for int8, run :func:`edgeq.export.trt_rules.check_qdq_model` first and refuse a graph
            with rule errors (TensorRT's own messages for those are much less clear).
    """

    precision: Precision
    strongly_typed: bool = True
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 64
    workspace_bytes: int = 1 << 30
    timing_cache: Path | None = None
    check_qdq: bool = True

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}; got {self.precision!r}")
        for name in ("min_batch", "opt_batch", "max_batch", "workspace_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int; got {value!r}")
        if self.min_batch < 1:
            raise ValueError(f"min_batch must be at least 1; got {self.min_batch}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                "batch sizes must satisfy min_batch <= opt_batch <= max_batch; got "
                f"min_batch={self.min_batch}, opt_batch={self.opt_batch}, max_batch={self.max_batch}"
            )
        if self.workspace_bytes <= 0:
            raise ValueError(f"workspace_bytes must be positive; got {self.workspace_bytes}")
        if self.timing_cache is not None and not isinstance(self.timing_cache, Path):
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))


@dataclass
class EngineInfo:
    """What was built, for the bundle manifest and for the user.

    ``tensorrt_version``, ``compute_capability`` and ``engine_sha256`` are what
    :func:`check_engine_compat` compares on the robot; ``layers`` is the inspector's per-layer report
    (name, type, precision, input/output types) and ``precision_counts``/``int8_layers`` summarise it.
    """

    engine_path: str
    onnx_path: str
    tensorrt_version: str
    gpu_name: str | None
    compute_capability: str | None
    precision: str
    strongly_typed: bool
    min_batch: int
    opt_batch: int
    max_batch: int
    build_seconds: float
    engine_bytes: int
    engine_sha256: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    precision_counts: dict[str, int] = field(default_factory=dict)
    int8_layers: int = 0
    reformat_layers: int = 0
    timing_cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest record)."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The record as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)


# --- layer report ----------------------------------------------------------------------------------

_TYPE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("uint8", "uint8"),
    ("int8", "int8"),
    ("fp8", "fp8"),
    ("e4m3", "fp8"),
    ("int4", "int4"),
    ("fp4", "fp4"),
    ("bf16", "bf16"),
    ("bfloat16", "bf16"),
    ("fp16", "fp16"),
    ("half", "fp16"),
    ("fp32", "fp32"),
    ("float", "fp32"),
    ("int32", "int32"),
    ("int64", "int64"),
    ("bool", "bool"),
)


def _tensor_type(tensor: object) -> str:
    """The data type of one inspector tensor entry (TensorRT 10 "Format/Datatype", 11 "DataType")."""
    if not isinstance(tensor, Mapping):
        return "unknown"
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format") or "")
    lowered = text.lower()
    for pattern, name in _TYPE_PATTERNS:
        if pattern in lowered:
            return name
    return "unknown"


def parse_layer_information(json_text: str) -> list[dict[str, Any]]:
    """Parse ``IEngineInspector.get_engine_information(JSON)`` into one dict per engine layer.

    Each dict has ``name``, ``type`` (TensorRT's LayerType, e.g. "CaskGemm", "Reformat"),
    ``precision`` (the type of the layer's first input, else first output: "int8", "fp16", "fp32",
    ... or "unknown"), ``input_types``, ``output_types``, ``tactic`` and ``metadata`` (the ONNX nodes
    TensorRT fused into it, where reported). Works for the TensorRT 10 and 11 schemas and for engines
    built without detailed verbosity (names only).
    """
    data = json.loads(json_text)
    raw = data.get("Layers", []) if isinstance(data, Mapping) else data
    layers: list[dict[str, Any]] = []
    for entry in raw:
        if isinstance(entry, str):
            layers.append(
                {
                    "name": entry,
                    "type": "unknown",
                    "precision": "unknown",
                    "input_types": [],
                    "output_types": [],
                }
            )
            continue
        if not isinstance(entry, Mapping):
            continue
        in_types = [_tensor_type(t) for t in entry.get("Inputs", []) or []]
        out_types = [_tensor_type(t) for t in entry.get("Outputs", []) or []]
        known_in = [t for t in in_types if t != "unknown"]
        known_out = [t for t in out_types if t != "unknown"]
        precision = known_in[0] if known_in else known_out[0] if known_out else "unknown"
        layers.append(
            {
                "name": str(entry.get("Name", "")),
                "type": str(entry.get("LayerType", "unknown")),
                "precision": precision,
                "input_types": in_types,
                "output_types": out_types,
                "tactic": entry.get("TacticName") or entry.get("TacticValue"),
                "metadata": entry.get("Metadata"),
            }
        )
    return layers


def summarize_layers(layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts over a layer report: layers per precision, int8 compute layers, reformat layers.

    ``int8_layers`` counts layers whose precision is int8, not counting reformats (which convert
    between formats and compute nothing). Many reformats mean Q/DQ that TensorRT could not fuse.
    """
    counts: dict[str, int] = {}
    int8 = reformats = 0
    for layer in layers:
        precision = str(layer.get("precision", "unknown"))
        counts[precision] = counts.get(precision, 0) + 1
        is_reformat = "reformat" in str(layer.get("type", "")).lower()
        reformats += is_reformat
        int8 += precision == "int8" and not is_reformat
    return {
        "total": len(layers),
        "precision_counts": counts,
        "int8_layers": int8,
        "reformat_layers": reformats,
    }


def inspect_layers(engine: trt.ICudaEngine, context: trt.IExecutionContext | None = None) -> list[dict[str, Any]]:
    """Per-layer precision report of a built engine (see :func:`parse_layer_information`).

    The engine must have been built with ``ProfilingVerbosity.DETAILED`` (build_engine does so). Pass an
    execution context whose input shapes are set to get formats for dynamic-shape engines (else
    TensorRT reports "N/A due to dynamic shapes" for them). Use :func:`summarize_layers` for counts.
    """
    _require_trt()
    inspector = engine.create_engine_inspector()
    if context is not None:
        inspector.execution_context = context
    return parse_layer_information(inspector.get_engine_information(trt.LayerInformationFormat.JSON))



def _strongly_typed_flag() -> int:
    # TensorRT 10: opt in with STRONGLY_TYPED. TensorRT 11: always strongly typed; the flag is kept
    # (deprecated, ignored) for compatibility, so setting it is harmless where it exists.
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _parser_errors(parser: trt.OnnxParser) -> list[str]:
    messages = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        try:
            node_name, node_op, node_index = err.node_name(), err.node_operator(), err.node()
            if node_index >= 0 or node_name:
                where = f"node {node_name or '#' + str(node_index)} ({node_op}): "
        except AttributeError:  # very old parsers report no node
            pass
        messages.append(f"{where}{err.desc()}")
    return messages


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _io_tensors(engine: trt.ICudaEngine) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        record = {
            "name": name,
            "dtype": engine.get_tensor_dtype(name).name,
            "shape": engine_dims(engine.get_tensor_shape(name)),
        }
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs.append(record)
        else:
            outputs.append(record)
    return inputs, outputs


def build_engine(
    onnx_path: Path | str, engine_path: Path | str, config: EngineBuildConfig, input_name: str = "obs"
) -> EngineInfo:
    """Build a TensorRT engine from an ONNX model and write it to ``engine_path``.

    Args:
        onnx_path: the ONNX model: a QDQ model for ``precision="int8"``, a float model otherwise.
        engine_path: where the serialized engine goes (parent folders are created).
        config: precision, typing mode, batch profile, workspace and timing cache.
        input_name: the observation input; every input's axis 0 is the batch axis of the profile.

    Returns:
        The :class:`EngineInfo` record, with the per-layer precision report.

    Raises:
        TensorRTUnavailableError: TensorRT is not installed here.
        EngineBuildError: the QDQ check, the ONNX parser or the builder refused the model; the message
            carries TensorRT's own errors (the parser's name the ONNX node).
    """
    _require_trt()
    import onnx

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"ONNX model not found: {onnx_path}")
    version = str(trt.__version__)
    if not config.strongly_typed and _trt_major() >= 11:
        raise EngineBuildError(
            f"TensorRT {version} builds strongly typed networks only (the INT8/FP16 builder flags were "
            "removed in TensorRT 11): use strongly_typed=True"
        )
    model = onnx.load(str(onnx_path))
    if config.precision == "int8" and config.check_qdq:
        from edgeq.export.trt_rules import check_qdq_model, format_report

        violations = check_qdq_model(model)
        blocking = [v for v in violations if v.severity == "error" or v.rule == "no-qdq"]
        if blocking:
            raise EngineBuildError(
                f"{onnx_path} is not a QDQ graph TensorRT can build in int8:\n{format_report(blocking)}"
            )
        for v in violations:
            _log.warning("QDQ check: [%s] %s: %s", v.rule, v.node, v.message)
    if config.precision == "fp16" and config.strongly_typed:
        model = fp16_onnx_with_casts(model)

    sink: list[str] = []
    logger = make_logger(sink)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flag() if config.strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        details = "\n  ".join(_parser_errors(parser)) or "\n  ".join(sink) or "no details"
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {details}")

    network_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in network_inputs]
    if input_name not in names:
        raise EngineBuildError(f"the model has no input {input_name!r}; its inputs are {names}")
    profile = builder.create_optimization_profile()
    dynamic = False
    batches = (config.min_batch, config.opt_batch, config.max_batch)
    for tensor in network_inputs:
        dims = engine_dims(tensor.shape)
        if not dims:
            continue
        if any(d < 0 for d in dims[1:]):
            raise EngineBuildError(
                f"input {tensor.name!r} has dynamic dimensions {dims} beyond the batch axis; export the "
                "ONNX with fixed feature dimensions"
            )
        if dims[0] < 0:
            dynamic = True
            lo, opt, hi = ([b, *dims[1:]] for b in batches)
            profile.set_shape(tensor.name, trt.Dims(lo), trt.Dims(opt), trt.Dims(hi))
        elif batches != (dims[0],) * 3:
            raise EngineBuildError(
                f"input {tensor.name!r} has a static batch of {dims[0]} but the config asks for batches "
                f"{config.min_batch}..{config.max_batch}: export the ONNX with a dynamic batch axis, or set "
                f"min_batch=opt_batch=max_batch={dims[0]}"
            )

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if dynamic:
        builder_config.add_optimization_profile(profile)
    if not config.strongly_typed and config.precision != "fp32":
        # Weakly typed (TensorRT 10, deprecated since 10.12): int8 regions still come from the Q/DQ
        # nodes; FP16 lets the rest fall back to fp16 rather than fp32.
        if not (hasattr(trt.BuilderFlag, "INT8") and hasattr(trt.BuilderFlag, "FP16")):
            raise EngineBuildError(
                f"TensorRT {version} has no INT8/FP16 builder flags (strongly typed only): use strongly_typed=True"
            )
        if config.precision == "int8":
            builder_config.set_flag(trt.BuilderFlag.INT8)
        builder_config.set_flag(trt.BuilderFlag.FP16)

    cache_path = config.timing_cache
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = builder_config.create_timing_cache(cache_bytes)
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        _log.warning("timing cache %s was made on another GPU or TensorRT version: starting afresh", cache_path)
        cache = builder_config.create_timing_cache(b"")
        builder_config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    build_seconds = time.perf_counter() - started
    if serialized is None:
        details = "\n  ".join(sink[-20:]) or "no details"
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}:\n  {details}")
    data = bytes(memoryview(serialized))
    _write_atomic(engine_path, data)
    if cache_path is not None:
        _write_atomic(cache_path, bytes(memoryview(builder_config.get_timing_cache().serialize())))

    # Per-layer precision report: deserialize, set the input shapes (opt batch), ask the inspector.
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineBuildError(f"TensorRT built {engine_path} but cannot load it back: {'; '.join(sink[-5:])}")
    context = engine.create_execution_context()
    inputs, outputs = _io_tensors(engine)
    for record in inputs:
        shape = list(record["shape"])
        if shape and shape[0] < 0:
            shape[0] = config.opt_batch
        context.set_input_shape(record["name"], tuple(shape))
    layers = inspect_layers(engine, context)
    summary = summarize_layers(layers)
    platform = current_platform()
    info = EngineInfo(
        engine_path=str(engine_path),
        onnx_path=str(onnx_path),
        tensorrt_version=version,
        gpu_name=platform["gpu_name"],
        compute_capability=platform["compute_capability"],
        precision=config.precision,
        strongly_typed=config.strongly_typed or _trt_major() >= 11,
        min_batch=config.min_batch,
        opt_batch=config.opt_batch,
        max_batch=config.max_batch,
        build_seconds=round(build_seconds, 3),
        engine_bytes=len(data),
        engine_sha256=hashlib.sha256(data).hexdigest(),
        inputs=inputs,
        outputs=outputs,
        layers=layers,
        precision_counts=summary["precision_counts"],
        int8_layers=summary["int8_layers"],
        reformat_layers=summary["reformat_layers"],
        timing_cache=str(cache_path) if cache_path is not None else None,
    )
    if config.precision == "int8" and info.int8_layers == 0:
        _log.warning("engine %s has no int8 layer: TensorRT ran every Q/DQ region in float", engine_path)
    return info



# --- fp16 model for strongly typed builds ------------------------------------------------------------


def fp16_onnx_with_casts(float_model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph cast to fp16 inside, fp32 inputs and outputs: :func:`edgeq.export.fp16.fp16_onnx_with_casts`.

    Imported on first use, so that importing this module needs neither onnx nor onnx_ir.
    """
    from edgeq.export.fp16 import fp16_onnx_with_casts as convert

    return convert(float_model)
