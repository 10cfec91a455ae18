"""Read an ONNX file's graph (nodes, attributes, constant tensors) without the ``onnx`` package.

The robot side never imports ``onnx`` (``tests/test_deploy_imports.py``), and ONNX Runtime exposes
no initializers, yet the fused GPU backend needs the int8 weights and scales of the bundle's
verified ONNX file. ``onnx.proto`` is a protocol-buffer schema; ``google.protobuf`` (a dependency of
ONNX Runtime) can only decode it with generated classes, which ship with ``onnx``. So this module
decodes the protobuf wire format itself (varints, length-delimited fields, fixed32/64), for the few
fields a policy graph uses, following ``onnx/onnx.proto`` (IR version 3-11):

* ``ModelProto``: 1 ir_version, 7 graph, 8 opset_import;
* ``GraphProto``: 1 node, 5 initializer, 11 input, 12 output;
* ``NodeProto``: 1 input, 2 output, 3 name, 4 op_type, 5 attribute, 7 domain;
* ``AttributeProto``: 1 name, 2 f, 3 i, 4 s, 7 floats, 8 ints, 20 type;
* ``TensorProto``: 1 dims, 2 data_type, 4 float_data, 5 int32_data, 7 int64_data, 8 name, 9 raw_data,
  10 double_data, 14 external_data (refused: a bundle's models are self-contained).

Anything else is skipped. ``tests/test_onnx_graph.py`` checks the result against ``onnx`` itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import BundleError

# TensorProto.DataType → numpy
_DTYPES: dict[int, Any] = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
                           7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("malformed varint")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: ints for varint/fixed, bytes for length-delimited."""
    out: list[tuple[int, int, Any]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        value: Any
        if wt == 0:
            value, pos = _varint(buf, pos)
        elif wt == 1:
            value = buf[pos:pos + 8]
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            value = buf[pos:pos + n]
            if len(value) != n:
                raise ValueError("truncated field")
            pos += n
        elif wt == 5:
            value = buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        out.append((num, wt, value))
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _packed_varints(value: Any, wt: int) -> list[int]:
    if wt == 0:
        return [_signed64(value)]
    vals, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        vals.append(_signed64(v))
    return vals


@dataclass
class Node:
    """One graph node: op type, inputs and outputs (tensor names), name and attributes."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    name: str = ""
    domain: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """An ONNX graph: nodes in file order, constant tensors by name, input and output names."""

    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    opset: int


def _tensor(buf: bytes) -> tuple[str, np.ndarray]:
    dims: list[int] = []
    dtype = 0
    name = ""
    raw: bytes | None = None
    floats: list[float] = []
    ints: list[int] = []
    doubles: list[float] = []
    for num, wt, v in _fields(buf):
        if num == 1:
            dims.extend(_packed_varints(v, wt))
        elif num == 2:
            dtype = v
        elif num == 4:
            data = v if wt == 2 else v
            floats.extend(struct.unpack(f"<{len(data) // 4}f", data))
        elif num in (5, 7):
            ints.extend(_packed_varints(v, wt))
        elif num == 8:
            name = v.decode()
        elif num == 9:
            raw = bytes(v)
        elif num == 10:
            doubles.extend(struct.unpack(f"<{len(v) // 8}d", v))
        elif num == 14:
            raise BundleError(f"tensor {name or '?'} keeps its data in an external file; edgeq's bundles embed "
                              "every weight: re-export the bundle")
    if dtype not in _DTYPES:
        raise BundleError(f"tensor {name!r} has ONNX data type {dtype}, which edgeq's GPU backend does not read")
    np_dtype = np.dtype(_DTYPES[dtype])
    if raw is not None:
        arr = np.frombuffer(raw, dtype=np_dtype.newbyteorder("<")).astype(np_dtype)
    elif dtype == 1:
        arr = np.asarray(floats, np.float32)
    elif dtype == 11:
        arr = np.asarray(doubles, np.float64)
    elif dtype == 10:  # fp16 in int32_data: the bit patterns
        arr = np.asarray(ints, np.uint16).view(np.float16)
    else:
        arr = np.asarray(ints, np.int64).astype(np_dtype)
    count = int(np.prod(dims)) if dims else 1
    if arr.size != count:
        raise BundleError(f"tensor {name!r} holds {arr.size} values for shape {dims}")
    return name, arr.reshape(dims)


def _attribute(buf: bytes) -> tuple[str, Any]:
    name = ""
    atype = 0
    f: float | None = None
    i: int | None = None
    s: bytes | None = None
    floats: list[float] = []
    ints: list[int] = []
    for num, wt, v in _fields(buf):
        if num == 1:
            name = v.decode()
        elif num == 2:
            f = struct.unpack("<f", v)[0]
        elif num == 3:
            i = _signed64(v)
        elif num == 4:
            s = bytes(v)
        elif num == 7:
            floats.extend(struct.unpack(f"<{len(v) // 4}f", v) if wt == 2 else struct.unpack("<f", v))
        elif num == 8:
            ints.extend(_packed_varints(v, wt))
        elif num == 20:
            atype = v
    value: Any = {1: f, 2: i, 3: s, 6: floats, 7: ints}.get(atype)
    if atype == 3 and s is not None:
        value = s.decode(errors="replace")
    return name, value


def _node(buf: bytes) -> Node:
    node = Node("", [], [])
    for num, _wt, v in _fields(buf):
        if num == 1:
            node.inputs.append(v.decode())
        elif num == 2:
            node.outputs.append(v.decode())
        elif num == 3:
            node.name = v.decode()
        elif num == 4:
            node.op_type = v.decode()
        elif num == 5:
            k, val = _attribute(v)
            node.attributes[k] = val
        elif num == 7:
            node.domain = v.decode()
    return node


def _value_info_name(buf: bytes) -> str:
    for num, _wt, v in _fields(buf):
        if num == 1:
            return str(v.decode())
    return ""


def parse_model(data: bytes, where: str = "model") -> Graph:
    """The graph of a serialized ``ModelProto``; raises :class:`BundleError` if it is not one."""
    try:
        graph_buf: bytes | None = None
        opset = 0
        for num, _wt, v in _fields(data):
            if num == 7:
                graph_buf = v
            elif num == 8:
                domain, version = "", 0
                for n2, _w2, v2 in _fields(v):
                    if n2 == 1:
                        domain = v2.decode()
                    elif n2 == 2:
                        version = v2
                if domain in ("", "ai.onnx"):
                    opset = version
        if graph_buf is None:
            raise BundleError(f"{where} has no graph: not an ONNX model")
        nodes: list[Node] = []
        inits: dict[str, np.ndarray] = {}
        inputs: list[str] = []
        outputs: list[str] = []
        for num, _wt, v in _fields(graph_buf):
            if num == 1:
                nodes.append(_node(v))
            elif num == 5:
                name, arr = _tensor(v)
                inits[name] = arr
            elif num == 11:
                inputs.append(_value_info_name(v))
            elif num == 12:
                outputs.append(_value_info_name(v))
    except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
        raise BundleError(f"{where} is not a readable ONNX model ({exc}); re-export the bundle") from None
    inputs = [i for i in inputs if i not in inits]
    return Graph(nodes, inits, inputs, outputs, opset)


def load_graph(path: str | Path) -> Graph:
    """:func:`parse_model` of the file at ``path``."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"ONNX model not found: {p}")
    return parse_model(p.read_bytes(), str(p))


__all__ = ["Graph", "Node", "load_graph", "parse_model"]
