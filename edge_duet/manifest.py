"""The bundle manifest: the one file the runtime reads to know a bundle.

A bundle is a directory::

    bundle/
      manifest.json          this file's schema, versioned
      vision.onnx            frames (pre-patchified) -> merged visual embeddings
      embed.onnx             token ids -> embeddings
      decoder.onnx           embeddings + 3-D M-RoPE positions + KV cache -> logits + new KV cache
      *.onnx.data            external weights where a graph is over 2 GB
      tokenizer.json         Hugging Face `tokenizers` file
      chat_template.jinja    the checkpoint's template (kept for reference; the runtime renders ids itself)

``FORMAT_VERSION`` is bumped on any change a runtime of an older version cannot read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError
from .families import DEFAULT_FAMILY, FAMILIES, family_of_bundle
from .protocol import PromptSpec  # noqa: F401  (the manifest's ``prompt``; declared with the protocol's facts)

FORMAT_NAME = "edge-duet-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The three graphs of a bundle, in the order a turn runs them (each is ``<name>.onnx``): the family's declaration.
GRAPH_NAMES = FAMILIES[DEFAULT_FAMILY].graphs
# Files below this size get a sha256 in the manifest (``files``); bigger ones are checked by size only.
SMALL_FILE_BYTES = 64 * 1024**2
# A graph whose weights pass this is written with external data (``*.onnx.data``) and, on export, by the
# memory-frugal streamed exporter: comfortably below protobuf's hard 2 GB limit on one serialized message.
EXTERNAL_DATA_OVER_BYTES = 1536 * 1024**2
# Decoder flavours a bundle may hold, by the graph name each is stored under. "plain" (plain ONNX ops, every
# provider, TensorRT) is always there; "fused" (ONNX Runtime contrib ops: GroupQueryAttention over a KV buffer
# written in place) is added by newer exports. Older bundles list only "decoder": still format 1.
DECODER_FLAVOURS = {"plain": "decoder", "fused": "decoder_fused"}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` holds ints or names of dynamic dimensions."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...] = ()
    precision: str = "fp32"
    quantized_ops: int = 0


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    mrope_section: tuple[int, ...]
    rope_theta: float
    max_position_embeddings: int


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3


@dataclass(frozen=True)
class PreprocessSpec:
    """What the transformers Qwen2-VL image processor does, as numbers."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255

    @classmethod
    def from_preprocessor_config(cls, pre: dict, patch_size: int, merge_size: int,
                                 temporal_patch_size: int) -> "PreprocessSpec":
        """A checkpoint's ``preprocessor_config.json`` (``pre``), old (min/max_pixels) or new (size) style; the
        vision config's patch, merge and temporal patch sizes fill in what it leaves out."""
        size = pre.get("size") or {}
        return cls(
            min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge", 56 * 56)),
            max_pixels=int(pre.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280)),
            patch_size=int(pre.get("patch_size", patch_size)), merge_size=int(pre.get("merge_size", merge_size)),
            temporal_patch_size=int(pre.get("temporal_patch_size", temporal_patch_size)),
            image_mean=tuple(pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            image_std=tuple(pre.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        )


@dataclass(frozen=True)
class TokenSpec:
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    endoftext: int
    eos_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, token_to_id, missing) -> "TokenSpec":
        """Qwen2.5-VL's special token ids from a tokenizer's ``token_to_id`` (None for an unknown token);
        ``missing(token)`` returns the exception to raise when one is absent."""

        def tid(t: str) -> int:
            i = token_to_id(t)
            if i is None:
                raise missing(t)
            return i

        im_end, endoftext = tid("<|im_end|>"), tid("<|endoftext|>")
        return cls(
            im_start=tid("<|im_start|>"), im_end=im_end, vision_start=tid("<|vision_start|>"),
            vision_end=tid("<|vision_end|>"), image_pad=tid("<|image_pad|>"), video_pad=tid("<|video_pad|>"),
            endoftext=endoftext, eos_ids=(im_end, endoftext),
        )


@dataclass(frozen=True)
class Manifest:
    name: str
    text: TextSpec
    vision: VisionSpec
    preprocess: PreprocessSpec
    tokens: TokenSpec
    prompt: PromptSpec
    graphs: dict[str, GraphSpec]
    tokenizer: str = "tokenizer.json"
    chat_template: str | None = "chat_template.jinja"
    variant: str = "fp32"
    provenance: tuple[dict[str, Any], ...] = ()
    export_info: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (small files only)
    # where each protocol setting came from: "mmduet2-default", "proactive.json", "export option", ...
    protocol_sources: dict[str, str] = field(default_factory=dict)
    family: str = DEFAULT_FAMILY  # edge_duet.families: which model family the graphs are (older bundles: Qwen2.5-VL)
    format_version: int = FORMAT_VERSION

    # ------------------------------------------------------------------ io
    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data = {"format": FORMAT_NAME, **data}
        return data

    def save(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest") -> "Manifest":
        if data.get("format") != FORMAT_NAME:
            raise BundleError(f"{where} is not an edge-duet bundle manifest (format={data.get('format')!r}).")
        version = data.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise BundleError(
                f"{where} has bundle format version {version}, made by a newer edge-duet; this one reads version "
                f"{FORMAT_VERSION}. Upgrade: pip install -U edge-duet"
            )
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where} has bundle format version {version}; this edge-duet reads version {FORMAT_VERSION}. "
                "Re-export the checkpoint with this version: edge-duet export CHECKPOINT BUNDLE --overwrite"
            )
        try:
            graphs = {
                k: GraphSpec(
                    path=g["path"],
                    inputs=tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in g["inputs"]),
                    outputs=tuple(TensorSpec(o["name"], o["dtype"], tuple(o["shape"])) for o in g["outputs"]),
                    external_data=tuple(g.get("external_data", ())),
                    precision=g.get("precision", "fp32"),
                    quantized_ops=int(g.get("quantized_ops", 0)),
                )
                for k, g in data["graphs"].items()
            }
            text = dict(data["text"])
            text["mrope_section"] = tuple(text["mrope_section"])
            vision = dict(data["vision"])
            vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
            pre = dict(data["preprocess"])
            pre["image_mean"] = tuple(pre["image_mean"])
            pre["image_std"] = tuple(pre["image_std"])
            tokens = dict(data["tokens"])
            tokens["eos_ids"] = tuple(tokens["eos_ids"])
            return cls(
                name=data["name"],
                text=TextSpec(**text),
                vision=VisionSpec(**vision),
                preprocess=PreprocessSpec(**pre),
                tokens=TokenSpec(**tokens),
                prompt=PromptSpec(**data["prompt"]),
                graphs=graphs,
                tokenizer=data.get("tokenizer", "tokenizer.json"),
                chat_template=data.get("chat_template"),
                variant=data.get("variant", "fp32"),
                provenance=tuple(data.get("provenance", ())),
                export_info=dict(data.get("export_info", {})),
                files=dict(data.get("files", {})),
                protocol_sources=dict(data.get("protocol_sources", {})),
                family=family_of_bundle(data.get("family", DEFAULT_FAMILY), where).name,
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where} is malformed ({type(exc).__name__}: {exc}). Re-export the bundle.") from exc

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "Manifest":
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.exists():
            raise BundleError(
                f"no model bundle at {bundle_dir}: run `edge-duet export CHECKPOINT {bundle_dir}` first, "
                "or leave `model` out to use the bundled demo model."
            )
        path = bundle_dir / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(
                f"{bundle_dir} has no {MANIFEST_NAME}: it is not an edge-duet bundle "
                f"(run `edge-duet export CHECKPOINT {bundle_dir}` to make one)."
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} is unreadable or not JSON ({exc}). Re-export the bundle.") from exc
        return cls.from_json(data, where=str(path))

    @property
    def decoder_flavours(self) -> tuple[str, ...]:
        """The decoder flavours this bundle has ("plain", and "fused" when it has ``decoder_fused``)."""
        return tuple(f for f, g in DECODER_FLAVOURS.items() if g in self.graphs)

    def check_files(self, bundle_dir: str | Path) -> None:
        """Raise one :class:`BundleError` listing every listed file that is missing or altered."""
        bundle_dir = Path(bundle_dir)
        problems = []
        needed = [g.path for g in self.graphs.values()] + [d for g in self.graphs.values() for d in g.external_data]
        needed.append(self.tokenizer)
        for rel in needed:
            if not (bundle_dir / rel).is_file():
                problems.append(f"missing {rel}")
        for rel, digest in self.files.items():
            p = bundle_dir / rel
            if p.is_file() and sha256_file(p) != digest:
                problems.append(f"{rel} does not match its checksum (corrupt or edited)")
        if problems:
            raise BundleError(
                f"bundle {bundle_dir} is incomplete or corrupt: " + "; ".join(problems)
                + ". Re-export it with `edge-duet export CHECKPOINT BUNDLE --overwrite`."
            )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
