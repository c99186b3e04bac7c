"""Model families as declared data: what differs between vision-language model families, in one place.

edge-duet runs one family today, Qwen2.5-VL (MMDuet2 is a Qwen2.5-VL-3B fine-tune). A family declares the facts
every stage needs to agree on: which checkpoints belong to it, how its visual tokens are laid out, how positions are
assigned, which chat format it speaks, and where each stage's code for it lives. The exporter records the family
in the bundle's manifest (``family``); the runtime refuses a bundle of a family it cannot run, with the reason.

A second family (Qwen3-VL, say) is added by one entry here plus the modules its entry names; ``docs/families.md``
walks through it. Checkpoints of families that are known but not supported get a precise error instead of a
confusing failure deep in the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import BundleError, CheckpointError

DEFAULT_FAMILY = "qwen2.5-vl"  # bundles written before the manifest had a ``family`` field are of this family


@dataclass(frozen=True)
class VisionLayout:
    """How pixels become visual tokens."""

    patch_size: int  # pixels per patch side
    merge_size: int  # patches per merged token side (merge_size**2 patches -> one token)
    temporal_patch_size: int  # frames per temporal patch (a still frame is repeated)
    window_attention: bool  # some vision blocks attend within windows, the rest globally
    deepstack: bool  # intermediate vision features are added into early decoder layers (Qwen3-VL)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values of this family
    architectures: tuple[str, ...]  # config.json "architectures" entries
    vision: VisionLayout
    positions: str  # "mrope": 3-D (t, h, w) rotary sections, contiguous; "mrope-interleaved": Qwen3-VL's layout
    chat_format: str  # "chatml": <|im_start|>role ... <|im_end|>, images as <|vision_start|><|image_pad|>*<|vision_end|>
    image_tokens: tuple[str, str, str]  # (start, pad, end)
    graphs: tuple[str, ...]  # the bundle's graphs, in the order a turn runs them
    # where each stage's code for this family lives (module paths; documentation and a check, not a plugin loader)
    export_module: str  # graph wrappers and dummy inputs over the loaded torch model
    reference_module: str  # the torch model class used as the parity reference
    runtime_modules: tuple[str, ...]  # preprocessing geometry, chat renderer, vision index, positions

    def matches(self, config: Mapping[str, Any]) -> bool:
        archs = config.get("architectures") or []
        return config.get("model_type") in self.model_types or any(a in self.architectures for a in archs)


QWEN2_5_VL = ModelFamily(
    name="qwen2.5-vl",
    model_types=("qwen2_5_vl",),
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    vision=VisionLayout(patch_size=14, merge_size=2, temporal_patch_size=2, window_attention=True, deepstack=False),
    positions="mrope",
    chat_format="chatml",
    image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    graphs=("vision", "embed", "decoder"),
    export_module="edge_duet.export.graphs",
    reference_module="transformers:Qwen2_5_VLForConditionalGeneration",
    runtime_modules=("edge_duet.runtime.preprocess", "edge_duet.runtime.chat", "edge_duet.runtime.vision_index",
                     "edge_duet.runtime.positions"),
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (QWEN2_5_VL,)}

# Families whose checkpoints users bring, with what stands between them and edge-duet (docs/families.md).
NOT_YET_SUPPORTED: dict[str, str] = {
    "qwen3_vl": "Qwen3-VL needs interleaved M-RoPE, DeepStack feature injection into the first decoder layers and "
                "a 16-pixel patch: a second family entry (see docs/families.md)",
    "qwen3_vl_moe": "Qwen3-VL MoE needs the Qwen3-VL family plus expert routing in the decoder graph",
    "qwen2_vl": "Qwen2-VL has no window attention in its vision tower and a different vision MLP: a family entry "
                "close to Qwen2.5-VL's (see docs/families.md)",
}


def family_for_config(config: Mapping[str, Any], where: str = "the checkpoint") -> ModelFamily:
    """The family a Hugging Face ``config.json`` belongs to; a clear :class:`CheckpointError` otherwise."""
    for family in FAMILIES.values():
        if family.matches(config):
            return family
    kind = config.get("model_type")
    archs = config.get("architectures") or []
    supported = ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())
    if kind in NOT_YET_SUPPORTED:
        raise CheckpointError(f"{where} is a {kind!r} checkpoint, not supported yet: {NOT_YET_SUPPORTED[kind]}. "
                              f"edge-duet exports: {supported}")
    raise CheckpointError(f"{where} is a {archs or kind!r} checkpoint; edge-duet exports {supported} "
                          "(MMDuet2 and other Qwen2.5-VL fine-tunes)")


def check_geometry(family: ModelFamily, preprocessor: Mapping[str, Any], where: str = "the checkpoint") -> None:
    """The checkpoint's ``preprocessor_config.json`` must agree with its family's visual token layout."""
    want = {"patch_size": family.vision.patch_size, "merge_size": family.vision.merge_size,
            "temporal_patch_size": family.vision.temporal_patch_size}
    wrong = {k: (preprocessor[k], v) for k, v in want.items() if k in preprocessor and preprocessor[k] != v}
    if wrong:
        said = ", ".join(f"{k}={got} (a {family.name} model has {v})" for k, (got, v) in wrong.items())
        raise CheckpointError(f"{where}'s preprocessor_config.json says {said}: it is not a {family.name} "
                              "checkpoint, or its preprocessor config was edited")


def family_of_bundle(name: str, where: str = "the bundle") -> ModelFamily:
    """The family a manifest names; a clear :class:`BundleError` for one this edge-duet cannot run."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise BundleError(f"{where} holds a {name!r} model; this edge-duet runs {', '.join(FAMILIES)}. "
                          "Upgrade edge-duet (pip install -U edge-duet) or re-export the checkpoint.") from None
