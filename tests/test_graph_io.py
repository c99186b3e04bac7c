"""edge_duet.graph_io: each graph's inputs and outputs, declared once.

The bundle's manifest must record exactly what graph_io declares for its geometry (the export writes from it), the
torch exporter's dynamic axes must be the ones the writers spelled out by hand before graph_io existed, and the
GPU profiles give every declared input a concrete shape.
"""

from __future__ import annotations

import pytest

from edge_duet.graph_io import (concrete_shapes, decoder_io, dynamic_axes, embed_io, fused_decoder_io, kv_names,
                                vision_io)
from edge_duet.manifest import Manifest


def test_the_bundle_records_what_graph_io_declares(tiny_bundle):
    m = Manifest.load(tiny_bundle)
    t, v = m.text, m.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    want = {
        "vision": vision_io(patch_dim, v.out_hidden_size),
        "embed": embed_io(t.hidden_size),
        "decoder": decoder_io(t.hidden_size, t.vocab_size, t.num_layers, t.num_kv_heads, t.head_dim),
        "decoder_fused": fused_decoder_io(t.hidden_size, t.vocab_size, t.num_layers, t.num_kv_heads, t.head_dim),
    }
    assert "decoder_fused" in m.graphs
    for name, (inputs, outputs) in want.items():
        assert (m.graphs[name].inputs, m.graphs[name].outputs) == (inputs, outputs), name


def test_kv_names_pair_key_and_value_per_layer():
    assert kv_names(2, "past") == ["past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    assert kv_names(1, "present") == ["present.0.key", "present.0.value"]
    with pytest.raises(ValueError, match="past"):
        kv_names(1, "future")


def test_dynamic_axes_are_the_ones_the_writers_spelled_out():
    # The dictionaries export/writers.py passed to torch.onnx.export by hand before graph_io
    inputs, outputs = decoder_io(64, 100, 2, 2, 16)
    want = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
            "attention_mask": {0: "batch", 1: "total"}, "logits_index": {0: "num_logits"},
            "logits": {0: "batch", 1: "num_logits"}}
    want.update({n: {0: "batch", 2: "past"} for n in kv_names(2, "past")})
    want.update({n: {0: "batch", 2: "total"} for n in kv_names(2, "present")})
    assert dynamic_axes(inputs + outputs) == want
    inputs, outputs = vision_io(1176, 64)
    assert dynamic_axes(inputs + outputs) == {
        "pixel_values": {0: "num_patches"}, "rotary_pos_ids": {0: "num_patches"},
        "full_segment_ids": {0: "num_patches"}, "window_segment_ids": {0: "num_patches"},
        "reverse_index": {0: "num_tokens"}, "image_embeds": {0: "num_tokens"}}
    inputs, outputs = embed_io(64)
    assert dynamic_axes(inputs + outputs) == {"input_ids": {0: "batch", 1: "seq"},
                                              "inputs_embeds": {0: "batch", 1: "seq"}}


def test_concrete_shapes_fill_every_named_dimension():
    inputs, _ = fused_decoder_io(64, 100, 1, 2, 16)
    shapes = concrete_shapes(inputs, {"batch": 1, "seq": 5, "num_logits": 1, "capacity": 32})
    assert shapes == {"inputs_embeds": (1, 5, 64), "position_ids": (3, 1, 5), "logits_index": (1,),
                      "seqlens_k": (1,), "total_sequence_length": (), "past.0.key": (1, 2, 32, 16),
                      "past.0.value": (1, 2, 32, 16)}
    with pytest.raises(KeyError, match="capacity"):
        concrete_shapes(inputs, {"batch": 1, "seq": 5, "num_logits": 1})
