"""The fused decoder flavour (``decoder_fused.onnx``), written node by node from the checkpoint's weights.

Same inputs and outputs as the plain decoder (graphs.py) except the cache: ONNX Runtime's contrib ops read and
write per-layer KV buffers allocated once at the context budget, bound as both past and present::

    position_ids (3, 1, S) ─> per-token M-RoPE cos/sin (1, S, 1, d), once for all layers
    inputs_embeds (1, S, H) ─> per layer:
        SimplifiedLayerNormalization ─> MatMul(q|k|v packed) + bias ─> rotary on q, k (outside the op)
        ─> com.microsoft.GroupQueryAttention(q, k, v, past K/V buffer, seqlens_k, total_sequence_length)
             (reads positions [0, total), writes the S new keys/values at [total - S, total) in place)
        ─> MatMul(o) ─> SkipSimplifiedLayerNormalization (residual add + norm in one op)
        ─> MatMul(gate|up packed) ─> SiLU(gate) * up ─> MatMul(down) ─> SkipSimplifiedLayerNormalization
    ─> Gather(logits_index) ─> MatMul(lm_head) ─> logits (1, n, vocab)

``seqlens_k`` (int32 (1,)) is the valid length after this call minus one and ``total_sequence_length`` (int32
scalar) the valid length: the runtime moves them, not memory, to roll back or evict. GQA reads the grouped KV
heads directly (no expansion to the query heads) and never builds scores over the buffer's free tail.

Why by hand and not onnxruntime-genai's model builder: the builder (0.18) does produce a matching Qwen2.5-VL
text decoder (max |dlogit| 2e-6 against ours), as fast per decode step, but it computes logits for every new token
(no ``logits_index``: a 128-token prefill measured 1.8-2.3x slower on the bench shape, docs/performance.md),
reads the checkpoint through its own loader (not the export's one-weight-at-a-time reader that keeps the 3B
export within 24 GB), and ``pip install onnxruntime-genai`` pulls the ``onnxruntime`` package, which replaces
``onnxruntime-gpu`` on GPU machines. Writing the graph takes about 200 lines over weights we already read.

Weights go to ``decoder_fused.onnx.data`` as they are read (one at a time), so the 3B does not hold a second copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edge_duet.graph_io import fused_decoder_io, kv_names
from edge_duet.manifest import GraphSpec

FUSED_NAME = "decoder_fused.onnx"
ALIGN = 4096  # external-data offsets: ONNX Runtime memory-maps aligned weights


class _Writer:
    """Initializers: big ones appended to the external data file as they come, small ones inline. A name is written
    once (ONNX allows one initializer per name): adding the same constant again returns its name."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.file = open(data_path, "wb")
        self.initializers = []
        self.added: dict[str, np.ndarray | None] = {}  # name -> the small array (None: a big one, in the file)

    def add(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto, numpy_helper

        array = np.ascontiguousarray(array)
        if name in self.added:
            if self.added[name] is None or not np.array_equal(self.added[name], array):
                raise ValueError(f"two different initializers named {name!r}")
            return name
        self.added[name] = array if array.nbytes < 1024 else None
        if array.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        pad = (-self.file.tell()) % ALIGN
        self.file.write(b"\0" * pad)
        offset = self.file.tell()
        self.file.write(array.tobytes())
        t = TensorProto()
        t.name = name
        t.data_type = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}[array.dtype]
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.initializers.append(t)
        return name

    def close(self):
        self.file.close()


def export_fused_decoder(model, out: Path, weights: Callable | None = None) -> GraphSpec:
    """Write ``decoder_fused.onnx`` (+ ``.data``) for the text model of a loaded ``Qwen2_5_VLForConditionalGeneration``.
    ``weights(parameter) -> float32 array``: how to read a weight (default: the parameter's own values; the
    streamed export passes its checkpoint reader for meta parameters)."""
    import onnx
    from onnx import TensorProto, helper

    read = weights or (lambda p: p.detach().float().cpu().numpy())
    lm = model.model.language_model
    tc = lm.config
    n_layers, heads, kvh = tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    hidden, vocab = tc.hidden_size, tc.vocab_size
    past, present = kv_names(n_layers, "past"), kv_names(n_layers, "present")
    eps = float(tc.rms_norm_eps)
    path = out / FUSED_NAME
    w = _Writer(out / (FUSED_NAME + ".data"))
    nodes = []

    def node(op, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, domain=domain, **attrs))
        return outs[0]

    def const(name, array):
        return w.add(name, np.asarray(array))

    # M-RoPE: freqs = position * inv_freq per axis (3, 1, S, d/2); each rotary dim takes its band's axis
    inv_freq = lm.rotary_emb.inv_freq.detach().float().cpu().numpy()
    section = list(lm.rotary_emb.mrope_section)
    select = np.zeros((3, 1, 1, hd // 2), np.float32)
    start = 0
    for i, width in enumerate(section):  # time / height / width bands, as DecoderGraph.rope
        select[i % 3, 0, 0, start:start + width] = 1.0
        start += width
    node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["pos_f", const("axis_last", np.array([-1], np.int64))], ["pos_u"])
    node("Mul", ["pos_u", const("inv_freq", inv_freq.astype(np.float32))], ["freqs3"])
    node("Mul", ["freqs3", const("mrope_select", select)], ["freqs_sel"])
    node("ReduceSum", ["freqs_sel", const("axis0", np.array([0], np.int64))], ["freqs"], keepdims=0)  # (1, S, d/2)
    node("Concat", ["freqs", "freqs"], ["rope_emb"], axis=-1)  # (1, S, d)
    node("Unsqueeze", ["rope_emb", const("axis2", np.array([2], np.int64))], ["rope_emb4"])  # (1, S, 1, d)
    node("Cos", ["rope_emb4"], ["cos"])
    node("Sin", ["rope_emb4"], ["sin"])
    const("half_split", np.array([hd // 2, hd // 2], np.int64))

    def rotary(x, n_heads, tag):
        """x (1, S, n_heads*d) -> x*cos + rotate_half(x)*sin, same shape."""
        x4 = node("Reshape", [x, const(f"shape_{n_heads}", np.array([0, 0, n_heads, hd], np.int64))], [f"{tag}_4d"])
        node("Split", [x4, "half_split"], [f"{tag}_a", f"{tag}_b"], axis=-1)
        node("Neg", [f"{tag}_b"], [f"{tag}_nb"])
        node("Concat", [f"{tag}_nb", f"{tag}_a"], [f"{tag}_rot"], axis=-1)
        node("Mul", [x4, "cos"], [f"{tag}_c"])
        node("Mul", [f"{tag}_rot", "sin"], [f"{tag}_s"])
        node("Add", [f"{tag}_c", f"{tag}_s"], [f"{tag}_r4"])
        return node("Reshape", [f"{tag}_r4", const(f"shape_flat_{n_heads}", np.array([0, 0, n_heads * hd], np.int64))],
                    [f"{tag}_r"])

    def linear_t(module):
        return read(module.weight).T.astype(np.float32)  # (in, out): MatMul's B

    const("qkv_split", np.array([heads * hd, kvh * hd, kvh * hd], np.int64))
    inter = lm.layers[0].mlp.gate_proj.out_features
    const("mlp_split", np.array([inter, inter], np.int64))
    h = "inputs_embeds"
    x = node("SimplifiedLayerNormalization", [h, const("norm_in.0", read(lm.layers[0].input_layernorm.weight))],
             ["x.0"], axis=-1, epsilon=eps)
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        wqkv = np.concatenate([linear_t(a.q_proj), linear_t(a.k_proj), linear_t(a.v_proj)], axis=1)
        node("MatMul", [x, w.add(f"layers.{i}.qkv.weight", wqkv)], [f"qkv_mm.{i}"])
        del wqkv
        biases = [read(p.bias) if p.bias is not None else np.zeros(p.out_features, np.float32)
                  for p in (a.q_proj, a.k_proj, a.v_proj)]
        node("Add", [f"qkv_mm.{i}", const(f"layers.{i}.qkv.bias", np.concatenate(biases).astype(np.float32))],
             [f"qkv.{i}"])
        node("Split", [f"qkv.{i}", "qkv_split"], [f"q.{i}", f"k.{i}", f"v.{i}"], axis=-1)
        q = rotary(f"q.{i}", heads, f"q_rope.{i}")
        k = rotary(f"k.{i}", kvh, f"k_rope.{i}")
        node("GroupQueryAttention", [q, k, f"v.{i}", *past[2 * i:2 * i + 2], "seqlens_k", "total_sequence_length"],
             [f"attn.{i}", *present[2 * i:2 * i + 2]], domain="com.microsoft",
             num_heads=heads, kv_num_heads=kvh, scale=float(a.scaling))
        node("MatMul", [f"attn.{i}", w.add(f"layers.{i}.o.weight", linear_t(a.o_proj))], [f"o.{i}"])
        node("SkipSimplifiedLayerNormalization",
             [f"o.{i}", h, const(f"norm_post.{i}", read(layer.post_attention_layernorm.weight))],
             [f"x2.{i}", "", "", f"h_mid.{i}"], domain="com.microsoft", epsilon=eps)
        mlp = layer.mlp
        wgu = np.concatenate([linear_t(mlp.gate_proj), linear_t(mlp.up_proj)], axis=1)
        node("MatMul", [f"x2.{i}", w.add(f"layers.{i}.gate_up.weight", wgu)], [f"gu.{i}"])
        del wgu
        node("Split", [f"gu.{i}", "mlp_split"], [f"gate.{i}", f"up.{i}"], axis=-1)
        node("Sigmoid", [f"gate.{i}"], [f"sig.{i}"])
        node("Mul", [f"gate.{i}", f"sig.{i}"], [f"silu.{i}"])
        node("Mul", [f"silu.{i}", f"up.{i}"], [f"act.{i}"])
        node("MatMul", [f"act.{i}", w.add(f"layers.{i}.down.weight", linear_t(mlp.down_proj))], [f"mlp.{i}"])
        last = i == n_layers - 1
        gamma = lm.norm.weight if last else lm.layers[i + 1].input_layernorm.weight
        x = f"x.{i + 1}" if not last else "final"
        node("SkipSimplifiedLayerNormalization", [f"mlp.{i}", f"h_mid.{i}", const(f"norm_in.{i + 1}", read(gamma))],
             [x, "", "", f"h.{i + 1}"] if not last else [x], domain="com.microsoft", epsilon=eps)
        h = f"h.{i + 1}"
    node("Gather", ["final", "logits_index"], ["final_rows"], axis=1)  # (1, n, H): only rows that need logits
    head = model.lm_head.weight
    node("MatMul", ["final_rows", w.add("lm_head.weight", read(head).T.astype(np.float32))], ["logits"])
    w.close()

    # The graph's own I/O is the manifest's spec (edge_duet.graph_io) with the batch fixed at 1
    io_inputs, io_outputs = fused_decoder_io(hidden, vocab, n_layers, kvh, hd)
    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}
    inputs, outputs = ([helper.make_tensor_value_info(t.name, types[t.dtype], [1 if d == "batch" else d
                                                                              for d in t.shape])
                        for t in specs] for specs in (io_inputs, io_outputs))
    # Types of the contrib ops' outputs, which ONNX's shape inference cannot derive (quantizers rely on it)
    seq = [1, "seq", hidden]
    typed = [(f"x.{i}", seq) for i in range(n_layers)] + [(f"x2.{i}", seq) for i in range(n_layers)]
    typed += [(f"h_mid.{i}", seq) for i in range(n_layers)] + [(f"h.{i}", seq) for i in range(1, n_layers)]
    typed += [(f"attn.{i}", [1, "seq", heads * hd]) for i in range(n_layers)] + [("final", seq)]
    value_info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in typed]
    graph = helper.make_graph(nodes, "decoder_fused", inputs, outputs, initializer=w.initializers,
                              value_info=value_info)
    onnx_model = helper.make_model(graph, ir_version=8, producer_name="edge-duet",
                                   opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save_model(onnx_model, str(path))  # the weights are already in the .data file: only the structure here
    return GraphSpec(path=path.name, external_data=(w.data_path.name,), inputs=io_inputs, outputs=io_outputs)
