"""Reading and rewriting the weight-carrying ops of an ONNX graph, for the quantizers (``quantize.py``)."""

from __future__ import annotations

from dataclasses import dataclass

_FLOAT_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


@dataclass(frozen=True)
class WeightOp:
    node: str
    op_type: str
    weight: str
    dtype: str  # fp32, fp16, bf16 or the quantized type's name
    shape: tuple[int, ...]


def weight_ops(model) -> list[WeightOp]:
    """Ops that carry a constant weight: MatMul/Gemm with an initializer B (rank >= 2), Gather from an
    initializer table (rank 2), and the quantized ops that replace them (MatMulNBits, MatMulInteger, ...)."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        slot = {"MatMul": 1, "Gemm": 1, "Gather": 0, "MatMulNBits": 1, "MatMulInteger": 1,
                "DynamicQuantizeMatMul": 1, "GatherBlockQuantized": 0}.get(n.op_type)
        if slot is None or len(n.input) <= slot or n.input[slot] not in inits:
            continue
        t = inits[n.input[slot]]
        if n.op_type in ("MatMul", "Gemm", "Gather") and len(t.dims) < 2:
            continue
        dtype = _FLOAT_TYPES.get(t.data_type) or TensorProto.DataType.Name(t.data_type).lower()
        out.append(WeightOp(n.name, n.op_type, t.name, dtype, tuple(t.dims)))
    return out


def name_nodes(model) -> None:
    """Give unnamed nodes unique names: the quantizers include/exclude nodes by name."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in seen:
                name += "_"
            n.name = name
            seen.add(name)


def gemm_to_matmul(model) -> int:
    """Rewrite ``Gemm(A, W, C)`` with a constant W (alpha=beta=1, transA=0) as ``MatMul(A, W') [+ Add C]``,
    W' stored (in, out). Returns the number rewritten. MatMul on a 2-D A is exactly Gemm's product."""
    from onnx import helper, numpy_helper

    from .lazy import tensor_array

    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    new_nodes, count, made = [], 0, {}
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(n)
            continue
        w_name = n.input[1]
        key = (w_name, bool(attrs.get("transB", 0)))
        if key not in made:
            w = tensor_array(inits[w_name]) if key[1] else None
            w = w.T.copy() if key[1] else w
            made[key] = f"{w_name}_kn" if key[1] else w_name
            if key[1]:
                model.graph.initializer.append(numpy_helper.from_array(w, made[key]))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}_mm" if has_bias else n.output[0]
        new_nodes.append(helper.make_node("MatMul", [n.input[0], made[key]], [mm_out], name=f"{n.name}_matmul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}_bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def find_lm_head(model, vocab_size: int, hidden_size: int) -> str | None:
    """The decoder's vocabulary projection: the weight op whose weight is (hidden, vocab) or (vocab, hidden)."""
    hits = [w.node for w in weight_ops(model) if w.op_type != "Gather" and sorted(w.shape[-2:]) == sorted(
        (vocab_size, hidden_size))]
    return hits[-1] if hits else None


def graph_bytes(model) -> int:
    from .lazy import stored_bytes

    return stored_bytes(model)
