"""ONNX graphs whose weights stay on disk until a quantizer asks for them.

A 3B decoder holds 12.4 GB of float32 weights in ``decoder.onnx.data``. ``onnx.load`` would copy all of them into
memory, and ONNX Runtime's quantizers then make further copies: 24 GB is not enough. Here the graph is loaded
without its external data; each external initializer points at the absolute path of its data file, so ONNX
Runtime's own block quantizer (which reads weights through ``onnx_ir``, memory-mapped) reads one weight at a time.
What a step cannot do lazily calls :func:`materialize` first, on a graph that is small by then.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _external(t) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _is_external(t) -> bool:
    from onnx import TensorProto

    return t.data_location == TensorProto.EXTERNAL


def load_lazy(path: str | Path):
    """The graph at ``path`` with its external initializers left on disk (absolute locations)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    base = path.resolve().parent
    for t in model.graph.initializer:
        if _is_external(t):
            for e in t.external_data:
                if e.key == "location" and not os.path.isabs(e.value):
                    e.value = str(base / e.value)
    return model


def tensor_array(t, dtype=None) -> np.ndarray:
    """An initializer's values, read from its data file when it is external (``dtype``: the stored type, where a
    tool already changed ``data_type``)."""
    from onnx import helper, numpy_helper

    if not _is_external(t):
        return numpy_helper.to_array(t)
    info = _external(t)
    dtype = dtype or helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        data = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=dtype)
    return data.reshape(tuple(t.dims)).copy()


def materialize(model) -> None:
    """Load every external initializer's bytes into the graph (in place), so it is self-contained."""
    from onnx import TensorProto

    for t in model.graph.initializer:
        if _is_external(t):
            arr = tensor_array(t)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = arr.tobytes()


def stored_bytes(model) -> int:
    """Bytes of the initializers, in memory or on disk."""
    total = 0
    for t in model.graph.initializer:
        total += int(_external(t).get("length", 0)) if _is_external(t) else len(t.raw_data)
    return total


def to_fp16(model, node_block_list: list[str]):
    """ONNX Runtime's ``convert_float_to_float16`` (graph I/O kept float32) on a lazy graph, one weight at a time.

    That function reads every weight it converts. So each external float32 weight that it would convert (every
    consumer is a float16 node: not blocked by name or op type, not an input that must stay float) is converted
    here first, read from disk with the same conversion function and clamping, and so passes through it as already
    float16; weights only blocked nodes use stay on disk; any other external weight is loaded as it is.
    """
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import (
        ALWAYS_FLOAT_INPUTS, DEFAULT_OP_BLOCK_LIST, convert_float_to_float16, convert_np_to_float16,
    )

    model = _infer_shapes(model)  # as the converter would, while every weight is still typed float32
    blocked = set(node_block_list or ())
    uses: dict[str, list[bool]] = {}  # initializer -> per consumer: does it stay float32 there?
    for n in model.graph.node:
        stays = n.op_type in DEFAULT_OP_BLOCK_LIST or n.name in blocked
        for i, name in enumerate(n.input):
            uses.setdefault(name, []).append(stays or i in ALWAYS_FLOAT_INPUTS.get(n.op_type, ()))
    for t in model.graph.initializer:
        if not (_is_external(t) and t.data_type == TensorProto.FLOAT):
            continue
        kinds = uses.get(t.name, [])
        if kinds and not any(kinds):
            half = convert_np_to_float16(tensor_array(t))  # convert_float_to_float16's own defaults
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.data_type = TensorProto.FLOAT16
            t.raw_data = half.astype(np.float16).tobytes()
        elif not all(kinds):  # read whole by the converter
            arr = tensor_array(t)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = arr.tobytes()
    return convert_float_to_float16(model, keep_io_types=True, node_block_list=node_block_list or None,
                                    disable_shape_infer=True)


def _infer_shapes(model):
    """``onnx.shape_inference.infer_shapes`` on a graph of any size: it serializes the graph, which protobuf refuses
    past 2 GB, and it needs no weight values. In-memory weights are set aside (marked external) while it runs."""
    from onnx import TensorProto
    from onnx.shape_inference import infer_shapes

    aside = {}
    for t in model.graph.initializer:
        if not _is_external(t) and t.raw_data:
            aside[t.name] = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            e = t.external_data.add()
            e.key, e.value = "location", "(set aside)"
    try:
        out = infer_shapes(model)
    finally:
        _restore(model, aside)
    _restore(out, aside)
    return out


def _restore(model, aside: dict) -> None:
    from onnx import TensorProto

    for t in model.graph.initializer:
        if t.name in aside and _is_external(t) and [e.value for e in t.external_data] == ["(set aside)"]:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = aside[t.name]
