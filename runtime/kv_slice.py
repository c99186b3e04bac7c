"""The KV-slicing graph of the IO-binding path, written as ONNX bytes without the ``onnx`` package.

``BoundEngine.slice_cache`` cuts every layer's keys and values to their first ``length`` positions on the device
(roll-back after a speculated silence, eviction), which takes a tiny ONNX graph: one ``Slice`` per tensor.
``pip install edge-duet`` has no ``onnx`` (see DESIGN.md, "What it may import"), so the graph is serialised here
by hand: a ``ModelProto`` is a handful of protobuf fields (varints and length-delimited bytes), written in field
order exactly as protobuf writes them. ``tests/test_gpu.py`` checks the bytes are identical to what ``onnx.helper``
makes of the same graph, and that ONNX Runtime runs them.

Field numbers are those of ``onnx/onnx.proto`` (ModelProto, GraphProto, NodeProto, TensorProto, ValueInfoProto,
TypeProto, TensorShapeProto, OperatorSetIdProto).
"""

from __future__ import annotations

from collections.abc import Sequence

_VARINT, _BYTES = 0, 2
_FLOAT, _INT64 = 1, 7  # TensorProto.DataType
IR_VERSION, OPSET = 8, 17


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf writes it
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3 | _VARINT) + _varint(n)


def _len(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | _BYTES) + _varint(len(payload)) + payload


def _str(field: int, s: str) -> bytes:
    return _len(field, s.encode())


def _tensor_int64(name: str, values: Sequence[int]) -> bytes:
    """TensorProto: dims (1), data_type (2), int64_data (7, packed), name (8)."""
    packed = b"".join(_varint(v) for v in values)
    return _int(1, len(values)) + _int(2, _INT64) + _len(7, packed) + _str(8, name)


def _value_info(name: str, elem_type: int, shape: Sequence[int | str]) -> bytes:
    """ValueInfoProto: name (1), type (2) = TypeProto.tensor_type (1) = elem_type (1), shape (2) of dims (1),
    each a dim_value (1) or a dim_param (2)."""
    dims = b"".join(_len(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in shape)
    tensor_type = _int(1, elem_type) + _len(2, dims)
    return _str(1, name) + _len(2, _len(1, tensor_type))


def _node(op_type: str, inputs: Sequence[str], outputs: Sequence[str]) -> bytes:
    """NodeProto: input (1), output (2), op_type (4)."""
    return b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs) + _str(4, op_type)


def kv_slice_model(n: int) -> bytes:
    """A serialised ONNX model: ``out_i = kv_i[:, :, :length]`` for ``n`` float tensors ``kv0..kv{n-1}`` of shape
    (1, heads, T, head_dim), ``length`` an int64 tensor of shape (1,)."""
    nodes = b"".join(_len(1, _node("Slice", [f"kv{i}", "zero", "length", "axis"], [f"out{i}"])) for i in range(n))
    inits = _len(5, _tensor_int64("zero", [0])) + _len(5, _tensor_int64("axis", [2]))
    ins = b"".join(_len(11, _value_info(f"kv{i}", _FLOAT, [1, "h", "t", "d"])) for i in range(n))
    ins += _len(11, _value_info("length", _INT64, [1]))
    outs = b"".join(_len(12, _value_info(f"out{i}", _FLOAT, [1, "h", "l", "d"])) for i in range(n))
    graph = nodes + _str(2, "kv_slice") + inits + ins + outs
    opset = _str(1, "") + _int(2, OPSET)  # OperatorSetIdProto: domain (1), version (2)
    return _int(1, IR_VERSION) + _len(7, graph) + _len(8, opset)  # ModelProto: ir_version, graph, opset_import
