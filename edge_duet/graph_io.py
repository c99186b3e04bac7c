"""The inputs and outputs of a bundle's graphs: their names, dtypes and shapes, in one place.

The export writes each graph with these names and records these specs in the manifest; the runtime feeds and binds
these names (and checks at load that the graph it loaded has them, ``runtime.engine.check_io``); the GPU profiles
give concrete shapes for them. Shapes hold ints and names of dynamic dimensions:

- vision: ``num_patches`` (14x14 patches of every frame of the call), ``num_tokens`` (after the 2x2 merge)
- embed and decoder: ``batch`` (always 1 at run time), ``seq`` (new tokens of the call), ``num_logits`` (rows of
  logits the call returns)
- plain decoder: ``past`` (cached tokens coming in), ``total`` (``past + seq``, the cache going out)
- fused decoder: ``capacity`` (the KV buffers' fixed length, the context budget; written in place)
"""

from __future__ import annotations

from collections.abc import Iterable

from .manifest import TensorSpec

KV_KINDS = ("key", "value")
IO = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]  # (inputs, outputs)


def kv_names(n_layers: int, direction: str) -> list[str]:
    """``past.{i}.key``, ``past.{i}.value``, ... (direction "past": the cache fed in) or ``present.*`` (out)."""
    if direction not in ("past", "present"):
        raise ValueError(f"direction must be 'past' or 'present', not {direction!r}")
    return [f"{direction}.{i}.{kind}" for i in range(n_layers) for kind in KV_KINDS]


def vision_io(patch_dim: int, out_hidden: int) -> IO:
    """The vision graph: flattened patches and their index tensors in, one embedding per merged token out."""
    return (
        (TensorSpec("pixel_values", "float32", ("num_patches", patch_dim)),
         TensorSpec("rotary_pos_ids", "int64", ("num_patches", 2)),
         TensorSpec("full_segment_ids", "int64", ("num_patches",)),
         TensorSpec("window_segment_ids", "int64", ("num_patches",)),
         TensorSpec("reverse_index", "int64", ("num_tokens",))),
        (TensorSpec("image_embeds", "float32", ("num_tokens", out_hidden)),),
    )


def embed_io(hidden: int) -> IO:
    """The token-embedding graph."""
    return ((TensorSpec("input_ids", "int64", ("batch", "seq")),),
            (TensorSpec("inputs_embeds", "float32", ("batch", "seq", hidden)),))


def decoder_io(hidden: int, vocab: int, n_layers: int, kv_heads: int, head_dim: int) -> IO:
    """The plain decoder: the past cache comes in as inputs, the grown cache goes out as new outputs."""
    return (
        (TensorSpec("inputs_embeds", "float32", ("batch", "seq", hidden)),
         TensorSpec("position_ids", "int64", (3, "batch", "seq")),
         TensorSpec("attention_mask", "int64", ("batch", "total")),
         TensorSpec("logits_index", "int64", ("num_logits",)),
         *[TensorSpec(n, "float32", ("batch", kv_heads, "past", head_dim)) for n in kv_names(n_layers, "past")]),
        (TensorSpec("logits", "float32", ("batch", "num_logits", vocab)),
         *[TensorSpec(n, "float32", ("batch", kv_heads, "total", head_dim)) for n in kv_names(n_layers, "present")]),
    )


def fused_decoder_io(hidden: int, vocab: int, n_layers: int, kv_heads: int, head_dim: int) -> IO:
    """The fused decoder: KV buffers of a fixed capacity, bound as both ``past`` and ``present`` (written in
    place); ``seqlens_k`` is the valid length - 1 after the call, GroupQueryAttention's convention."""
    kv = ("batch", kv_heads, "capacity", head_dim)
    return (
        (TensorSpec("inputs_embeds", "float32", ("batch", "seq", hidden)),
         TensorSpec("position_ids", "int64", (3, "batch", "seq")),
         TensorSpec("logits_index", "int64", ("num_logits",)),
         TensorSpec("seqlens_k", "int32", ("batch",)),
         TensorSpec("total_sequence_length", "int32", ()),
         *[TensorSpec(n, "float32", kv) for n in kv_names(n_layers, "past")]),
        (TensorSpec("logits", "float32", ("batch", "num_logits", vocab)),
         *[TensorSpec(n, "float32", kv) for n in kv_names(n_layers, "present")]),
    )


def dynamic_axes(specs: Iterable[TensorSpec]) -> dict[str, dict[int, str]]:
    """``{name: {axis: dimension name}}`` for every named dimension: what ``torch.onnx.export`` takes."""
    return {s.name: {a: d for a, d in enumerate(s.shape) if isinstance(d, str)} for s in specs
            if any(isinstance(d, str) for d in s.shape)}


def concrete_shapes(specs: Iterable[TensorSpec], dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Each spec's shape with its named dimensions set from ``dims`` (a missing name is a KeyError)."""
    return {s.name: tuple(d if isinstance(d, int) else dims[d] for d in s.shape) for s in specs}
