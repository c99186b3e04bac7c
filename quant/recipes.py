"""Quantization recipes: which precision each graph of a bundle gets (``vision=fp16,embed=int8,decoder=int4``), the
named presets, and the checks a recipe must pass before any work. What each precision does to a graph is
``quantize.py``'s docstring; the measured effect is docs/quantization.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_duet.errors import UsageError
from edge_duet.manifest import GRAPH_NAMES as GRAPHS

PRECISIONS = ("fp32", "fp16", "int8", "w8", "int4", "w8-fp16", "int4-fp16", "int4-qdq")
LM_HEAD_PRECISIONS = ("fp32", "fp16", "int8", "w8", "int4")
PRESETS: dict[str, str] = {
    "fp16": "vision=fp16,embed=fp16,decoder=fp16",
    "int8": "vision=int8,embed=int8,decoder=int8",
    "w8": "vision=w8,embed=w8,decoder=w8",
    "int4": "vision=int4,embed=int4,decoder=int4",
    # the vision tower and the embedding table stay float: only the decoder's weights go to 4 bits
    "int4-text": "vision=fp32,embed=fp32,decoder=int4",
    # CPU: int8 where VNNI makes it fast, int4 for the decoder's memory-bound decode, int8 vocabulary projection
    "cpu": "vision=int8,embed=int8,decoder=int4,lm_head=int8",
    # Jetson (CUDA EP): float16 vision, int8 embedding table, int4 decoder with fp16 activations, w8 vocabulary
    # projection. The 3B fits an 8 GB Orin Nano with it (docs/quantization.md has the arithmetic).
    "jetson": "vision=fp16,embed=w8,decoder=int4-fp16,lm_head=w8",
    # TensorRT engines (build-engines --precision fp16): plain-op graphs, the decoder's weights int4 via Q/DQ
    "trt-int4": "vision=fp32,embed=fp32,decoder=int4-qdq",
}

@dataclass(frozen=True)
class Recipe:
    """One precision per graph, plus the decoder's vocabulary projection (``None``: same as the decoder)."""

    vision: str = "fp32"
    embed: str = "fp32"
    decoder: str = "fp32"
    lm_head: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """``int4`` (a preset), or ``vision=fp16,embed=fp32,decoder=int4[,lm_head=fp32]`` (missing graphs: fp32)."""
        text = text.strip()
        if text in PRESETS:
            text = PRESETS[text]
        if "=" not in text:
            raise UsageError(
                f"unknown recipe {text!r}: use a preset ({', '.join(PRESETS)}) or per-graph precisions such as "
                "'vision=fp16,embed=fp32,decoder=int4,lm_head=fp32'"
            )
        values: dict[str, str] = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            key, value = key.strip(), value.strip()
            allowed = LM_HEAD_PRECISIONS if key == "lm_head" else PRECISIONS
            if key not in (*GRAPHS, "lm_head"):
                raise UsageError(f"recipe {text!r}: unknown part {key!r}; parts are {', '.join(GRAPHS)}, lm_head")
            if key in values:
                raise UsageError(f"recipe {text!r}: {key} is given twice")
            if value not in allowed:
                raise UsageError(f"recipe {text!r}: {key}={value!r} is not one of {', '.join(allowed)}")
            values[key] = value
        recipe = cls(**values)
        recipe.check()
        return recipe

    def check(self) -> None:
        if is_qdq(self.embed):
            raise UsageError("embed=int4-qdq: ONNX Runtime's Q/DQ quantizer has no Gather; use embed=fp32 (TensorRT "
                             "then stores the table in fp16) or embed=int4 / w8 for the CUDA and CPU providers")
        dec, head = self.decoder, self.lm_head
        if head is None:
            return
        if dec == "fp32" and head != "fp32":
            raise UsageError(f"lm_head={head} needs a quantized decoder; use decoder=fp32 with lm_head left out")
        if head == "int8" and activation_type(dec) == "fp16":
            raise UsageError(f"lm_head=int8 (dynamic) needs float32 activations, but decoder={dec} computes in "
                             "float16: use lm_head=w8 instead")
        if dec.endswith("-qdq") and head not in ("fp32", "int4"):
            raise UsageError(f"lm_head={head} with decoder={dec}: a Q/DQ decoder is for TensorRT, which runs only "
                             "plain ONNX ops; use lm_head=fp32 or lm_head=int4")
        if head == "fp16" and activation_type(dec) == "fp32":
            raise UsageError(f"lm_head=fp16 with decoder={dec}: the decoder computes in float32, so an unquantized "
                             "lm_head stays float32; write lm_head=fp32 (or use an -fp16 decoder precision)")

    @property
    def head(self) -> str:
        return self.lm_head or self.decoder

    def graph_precision(self, graph: str) -> str:
        return getattr(self, graph)

    def precision_label(self, graph: str) -> str:
        """What goes into the manifest's ``GraphSpec.precision``."""
        p = self.graph_precision(graph)
        if graph == "decoder" and self.lm_head is not None and self.lm_head != p:
            return f"{p};lm_head={self.lm_head}"
        return p

    def __str__(self) -> str:
        for name, text in PRESETS.items():
            if Recipe.parse_parts(text) == self:
                return name
        parts = [f"{g}={getattr(self, g)}" for g in GRAPHS]
        if self.lm_head is not None:
            parts.append(f"lm_head={self.lm_head}")
        return ",".join(parts)

    @classmethod
    def parse_parts(cls, text: str) -> "Recipe":
        return cls(**{k.strip(): v.strip() for k, v in (p.split("=") for p in text.split(","))})


def activation_type(precision: str) -> str:
    return "fp16" if precision == "fp16" or precision.endswith("-fp16") else "fp32"


def weight_format(precision: str) -> str:
    """fp32 / fp16 (float weights) or int8 / w8 / int4 (quantized)."""
    return precision.split("-")[0]


def is_qdq(precision: str) -> bool:
    return precision.endswith("-qdq")
