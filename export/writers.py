"""The torch -> ONNX writers of the three graphs (vision, embed, decoder) over a loaded model's parts.

Small graphs go through the TorchScript exporter; graphs over ``EXTERNAL_DATA_OVER_BYTES`` through the dynamo
exporter, the decoder of a big model streamed weight by weight (``_streamed_export``). ``onnx_export`` decides
which part is exported when, and in which process; ``fused.py`` writes the fused decoder flavour.
"""

from __future__ import annotations

from pathlib import Path

from edge_duet.graph_io import decoder_io, dynamic_axes, embed_io, kv_names, vision_io
from edge_duet.manifest import EXTERNAL_DATA_OVER_BYTES as BIG_GRAPH, GraphSpec, VisionSpec


# BIG_GRAPH (edge_duet.manifest.EXTERNAL_DATA_OVER_BYTES): graphs whose weights pass it take the memory-frugal exporter


def _torch_export(graph, args, path: Path, input_names, output_names, dynamic_axes: dict, arg_groups=None,
                  opset: int = 18, force_dynamo: bool = False, weights=None) -> tuple[str, ...]:
    """Export ``graph`` to ``path``; returns the external-data files written beside it.

    Small graphs go through the TorchScript exporter (fast, one self-contained file). Graphs over ~1.5 GB go
    through the dynamo exporter, whose ONNX model references the torch weights instead of copying them and
    streams them into one ``<name>.data`` file: the TorchScript route would hold a second copy of every weight
    in memory, which does not fit a 24 GB machine for the 3B decoder. (Batch is then fixed to 1, which is all
    the runtime uses.) ``arg_groups`` tells how ``args`` map to the forward's parameters when it takes
    ``*varargs`` (their count as one tuple entry for dynamo).

    ``weights`` streams the weights: ``graph``'s parameters are on the meta device (no memory), it is traced
    on meta inputs, and each initializer is read by ``weights(parameter)`` (a float32 numpy array) only while it
    is written to ``<name>.data``, so exporting the 3B decoder holds one weight at a time instead of 12.4 GB.
    Such a graph is saved without onnxscript's optimizer, which reads every weight (ONNX Runtime optimizes the
    graph when it loads it).
    """
    import torch

    if weights is not None:
        return _streamed_export(graph, args, path, input_names, output_names, dynamic_axes, arg_groups, opset,
                                weights)
    big = force_dynamo or _param_bytes(graph) > BIG_GRAPH
    if not big:
        torch.onnx.export(graph, args, str(path), input_names=input_names, output_names=output_names,
                          opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes)
        return ()
    from torch.export import Dim

    def spec(name):
        return {ax: Dim.DYNAMIC for ax, label in dynamic_axes.get(name, {}).items() if label != "batch"}

    specs = [spec(n) for n in input_names]
    if arg_groups:  # e.g. (4, None): four named parameters, then the rest as one *varargs tuple
        fixed = arg_groups[0]
        specs = specs[:fixed] + [tuple(specs[fixed:])]
    torch.onnx.export(graph, args, str(path), input_names=input_names, output_names=output_names,
                      opset_version=opset, dynamo=True, dynamic_shapes=tuple(specs), external_data=True,
                      optimize=True, verbose=False)
    return tuple(sorted(p.name for p in path.parent.glob(path.name + ".data")))


def _dynamic_specs(input_names, dynamic_axes, arg_groups):
    from torch.export import Dim

    def spec(name):
        return {ax: Dim.DYNAMIC for ax, label in dynamic_axes.get(name, {}).items() if label != "batch"}

    specs = [spec(n) for n in input_names]
    if arg_groups:
        fixed = arg_groups[0]
        specs = specs[:fixed] + [tuple(specs[fixed:])]
    return tuple(specs)


def _streamed_export(graph, args, path: Path, input_names, output_names, dynamic_axes, arg_groups, opset,
                     weights) -> tuple[str, ...]:
    import numpy as np
    import onnx_ir as ir
    import torch

    buffers = {name: b.detach().cpu().numpy().copy() for name, b in graph.named_buffers()}  # computed, not weights
    params = dict(graph.named_parameters(remove_duplicate=False))
    graph.to("meta")
    meta_args = tuple(a.to("meta") for a in args)
    program = torch.onnx.export(graph, meta_args, None, input_names=input_names, output_names=output_names,
                                opset_version=opset, dynamo=True, optimize=False, verbose=False,
                                dynamic_shapes=_dynamic_specs(input_names, dynamic_axes, arg_groups))

    transposed = _fold_weight_transposes(program.model.graph, set(params))

    def reader(param, transpose):
        def read():
            w = weights(param)
            return ir.Tensor(np.ascontiguousarray(w.T if transpose else w, dtype=np.float32))
        return read

    for name, value in program.model.graph.initializers.items():
        if name in buffers:
            value.const_value = ir.Tensor(buffers[name], name=name)
        elif name in params:
            value.const_value = ir.LazyTensor(reader(params[name], name in transposed), dtype=ir.DataType.FLOAT,
                                              shape=ir.Shape(list(value.shape)), name=name)
        else:
            raise RuntimeError(f"exported graph has an initializer {name!r} that is no parameter or buffer of it")
    program.save(str(path), external_data=True)
    return tuple(sorted(p.name for p in path.parent.glob(path.name + ".data")))


def _fold_weight_transposes(graph, weights: set[str]) -> set[str]:
    """``MatMul(x, Transpose(W))`` -> ``MatMul(x, W')`` with W' = W transposed, stored: what onnxscript's constant
    folding does to every linear layer, done here without reading W (the streamed export reads it transposed when
    it writes it). Quantizers need it: they take MatMuls whose B is an initializer. Returns the weights it turned."""
    out = set()
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        w = node.inputs[0]
        if w is None or w.name not in weights or w.name not in graph.initializers or len(w.uses()) != 1:
            continue
        perm = node.attributes.get("perm")
        if w.shape is None or len(w.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        w.shape = type(w.shape)([w.shape[1], w.shape[0]])
        node.outputs[0].replace_all_uses_with(w)
        graph.remove(node, safe=True)
        out.add(w.name)
    return out


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())


def export_vision(model, out: Path, opset: int, force_dynamo: bool = False) -> GraphSpec:
    import numpy as np
    import torch

    from edge_duet.runtime.vision_index import vision_inputs

    from .graphs import VisionGraph

    vc = model.config.vision_config
    graph = VisionGraph(model.model.visual).eval()
    ps, tps = vc.patch_size, vc.temporal_patch_size
    dim = vc.in_channels * tps * ps * ps
    grids = [(1, 8, 12), (1, 4, 4)]  # two frames of different sizes: exercises every dynamic axis
    n = sum(t * h * w for t, h, w in grids)
    spec = _vision_spec(model)
    feeds = vision_inputs(np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32), grids, spec)
    inputs, outputs = vision_io(dim, vc.out_hidden_size)
    names = [t.name for t in inputs]
    path = out / "vision.onnx"
    ext = _torch_export(
        graph, tuple(torch.from_numpy(feeds[k]) for k in names), path, names, [t.name for t in outputs],
        dynamic_axes(inputs + outputs), opset=opset, force_dynamo=force_dynamo)
    return GraphSpec(path=path.name, external_data=ext, inputs=inputs, outputs=outputs)


def _vision_spec(model) -> VisionSpec:
    vc = model.config.vision_config
    return VisionSpec(
        depth=vc.depth, hidden_size=vc.hidden_size, num_heads=vc.num_heads, out_hidden_size=vc.out_hidden_size,
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        window_size=vc.window_size, fullatt_block_indexes=tuple(vc.fullatt_block_indexes), in_channels=vc.in_channels,
    )


def export_embed(model, out: Path, opset: int, force_dynamo: bool = False) -> GraphSpec:
    import torch

    from .graphs import EmbedGraph

    emb = model.model.language_model.embed_tokens
    graph = EmbedGraph(emb).eval()
    inputs, outputs = embed_io(emb.embedding_dim)
    path = out / "embed.onnx"
    ext = _torch_export(
        graph, (torch.zeros(1, 3, dtype=torch.long),), path, [t.name for t in inputs], [t.name for t in outputs],
        dynamic_axes(inputs + outputs), opset=opset, force_dynamo=force_dynamo)
    return GraphSpec(path=path.name, external_data=ext, inputs=inputs, outputs=outputs)


def export_decoder(model, out: Path, opset: int, force_dynamo: bool = False, weights=None) -> GraphSpec:
    import torch

    from .graphs import DecoderGraph

    tc = model.config.text_config
    graph = DecoderGraph(model).eval()
    n_layers, kvh, hd = tc.num_hidden_layers, tc.num_key_value_heads, graph.head_dim
    inputs, outputs = decoder_io(tc.hidden_size, tc.vocab_size, n_layers, kvh, hd)
    s, p = 5, 3
    args = (
        torch.randn(1, s, tc.hidden_size),
        torch.arange(p, p + s).view(1, 1, s).expand(3, 1, s).contiguous(),
        torch.ones(1, p + s, dtype=torch.long),
        torch.tensor([s - 2, s - 1]),
        *[torch.randn(1, kvh, p, hd) for _ in kv_names(n_layers, "past")],
    )
    path = out / "decoder.onnx"
    ext = _torch_export(
        graph, args, path, [t.name for t in inputs], [t.name for t in outputs], dynamic_axes(inputs + outputs),
        arg_groups=(4, None), opset=opset, force_dynamo=force_dynamo, weights=weights)
    return GraphSpec(path=path.name, external_data=ext, inputs=inputs, outputs=outputs)
