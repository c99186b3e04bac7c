"""Local Qwen2.5-VL / MMDuet2 checkpoints: make small random ones, inspect and load real ones.

A checkpoint is a Hugging Face directory with the ``Qwen2_5_VLForConditionalGeneration`` layout::

    config.json                  nested (transformers 5) or flat hub-style (what Qwen2.5-VL-3B and MMDuet2 ship)
    model.safetensors            or model-0000x-of-0000y.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    preprocessor_config.json     Qwen2-VL image processor settings
    proactive.json               optional, edge-duet's: system prompt and frame timing for proactive use
                                 (absent in MMDuet2 as published: edge_duet.protocol supplies MMDuet2's defaults)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_duet.bundle_io import staged_bundle
from edge_duet.errors import CheckpointError, UsageError
from edge_duet.families import DEFAULT_FAMILY, QWEN2_5_VL, check_geometry, family_for_config
from edge_duet.protocol import PROACTIVE_FILE, ProactiveDefaults, read_proactive

from .tokenizer import build_tokenizer, write_tokenizer_files

__all__ = ["ProactiveDefaults", "read_proactive", "make_checkpoint", "inspect_checkpoint", "load_model"]

ARCHITECTURE = QWEN2_5_VL.architectures[0]  # the class make_checkpoint writes
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CheckpointShape:
    """The numbers that define a Qwen2.5-VL model's shape. Defaults are Qwen2.5-VL-3B-Instruct's."""

    hidden_size: int = 2048
    num_layers: int = 36
    num_attention_heads: int = 16
    num_kv_heads: int = 2
    intermediate_size: int = 11008
    vocab_size: int = 151936
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_num_heads: int = 16
    vision_intermediate_size: int = 3420
    vision_window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    min_pixels: int = 3136
    max_pixels: int = 12845056

    def validate(self) -> None:
        head_dim = self.hidden_size // self.num_attention_heads
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_kv_heads:
            problems.append("num_attention_heads must be divisible by num_kv_heads")
        if sum(self.mrope_section) * 2 != head_dim:
            problems.append(f"sum(mrope_section)*2 = {sum(self.mrope_section) * 2} must equal head_dim = {head_dim}")
        if self.vision_hidden_size % self.vision_num_heads:
            problems.append("vision_hidden_size must be divisible by vision_num_heads")
        if (self.vision_hidden_size // self.vision_num_heads) % 4:
            problems.append("vision head dim must be divisible by 4 (2-D rotary)")
        if any(i >= self.vision_depth for i in self.fullatt_block_indexes):
            problems.append("fullatt_block_indexes must be < vision_depth")
        if problems:
            raise CheckpointError("invalid checkpoint shape: " + "; ".join(problems))


# Named shapes. "tiny*" are for tests (seconds to export); "perf" is Qwen2.5-VL-shaped but small enough to bench
# on a laptop CPU; "3b" / "7b" are the real model shapes (random weights).
SHAPES: dict[str, CheckpointShape] = {
    "3b": CheckpointShape(),
    "7b": CheckpointShape(
        hidden_size=3584, num_layers=28, num_attention_heads=28, num_kv_heads=4, intermediate_size=18944,
        vocab_size=152064, tie_word_embeddings=False, mrope_section=(16, 24, 24),
    ),
    "perf": CheckpointShape(
        hidden_size=896, num_layers=24, num_attention_heads=14, num_kv_heads=2, intermediate_size=4864,
        vocab_size=151936, mrope_section=(8, 12, 12), vision_depth=8, vision_hidden_size=640, vision_num_heads=10,
        vision_intermediate_size=1708, fullatt_block_indexes=(3, 7), min_pixels=3136, max_pixels=200704,
    ),
    # Qwen2.5-VL in miniature with the real vocabulary: what `edge-duet bench` measures (docs/performance.md)
    "bench": CheckpointShape(
        hidden_size=512, num_layers=8, num_attention_heads=8, num_kv_heads=2, intermediate_size=2048,
        mrope_section=(8, 12, 12), vision_depth=4, vision_hidden_size=256, vision_num_heads=4,
        vision_intermediate_size=1024, fullatt_block_indexes=(1, 3), min_pixels=3136, max_pixels=28 * 28 * 64,
    ),
    "tiny": CheckpointShape(
        hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, intermediate_size=128,
        vocab_size=0, mrope_section=(2, 3, 3), vision_depth=2, vision_hidden_size=32, vision_num_heads=2,
        vision_intermediate_size=64, fullatt_block_indexes=(1,), min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64,
    ),
    "tiny-mha": CheckpointShape(
        hidden_size=96, num_layers=3, num_attention_heads=3, num_kv_heads=3, intermediate_size=160,
        vocab_size=0, mrope_section=(4, 6, 6), vision_depth=3, vision_hidden_size=48, vision_num_heads=3,
        vision_intermediate_size=96, fullatt_block_indexes=(0, 2), tie_word_embeddings=False,
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48,
    ),
    "tiny-deep": CheckpointShape(
        hidden_size=128, num_layers=4, num_attention_heads=8, num_kv_heads=1, intermediate_size=256,
        vocab_size=0, mrope_section=(2, 3, 3), vision_depth=4, vision_hidden_size=64, vision_num_heads=4,
        vision_intermediate_size=128, vision_window_size=56, fullatt_block_indexes=(3,),
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 80,
    ),
    # The smallest shape vLLM's CPU attention serves (head_dim 32; it has no kernel for 16); untied so that
    # tests/chatty.py can calibrate it: the remote-backend tests
    "tiny-serve": CheckpointShape(
        hidden_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2, intermediate_size=256,
        vocab_size=0, mrope_section=(4, 6, 6), vision_depth=2, vision_hidden_size=32, vision_num_heads=2,
        vision_intermediate_size=64, fullatt_block_indexes=(1,), tie_word_embeddings=False,
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64,
    ),
}


def shape_from_name(name: str, **overrides: Any) -> CheckpointShape:
    if name not in SHAPES:
        raise CheckpointError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}")
    return replace(SHAPES[name], **overrides)


def hf_config_dict(shape: CheckpointShape, vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """A transformers-5 nested ``config.json`` for ``shape``."""
    head_dim = shape.hidden_size // shape.num_attention_heads
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": shape.tie_word_embeddings,
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "hidden_size": shape.hidden_size,
            "num_hidden_layers": shape.num_layers,
            "num_attention_heads": shape.num_attention_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": head_dim,
            "intermediate_size": shape.intermediate_size,
            "vocab_size": vocab_size,
            "max_position_embeddings": shape.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": shape.rope_theta,
                "mrope_section": list(shape.mrope_section),
            },
            "bos_token_id": token_ids["<|endoftext|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
            "tie_word_embeddings": shape.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": shape.vision_depth,
            "hidden_size": shape.vision_hidden_size,
            "num_heads": shape.vision_num_heads,
            "intermediate_size": shape.vision_intermediate_size,
            "out_hidden_size": shape.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": shape.vision_window_size,
            "fullatt_block_indexes": list(shape.fullatt_block_indexes),
            "in_channels": 3,
            "hidden_act": "silu",
            "tokens_per_second": 2,
        },
    }


def preprocessor_config(shape: CheckpointShape) -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "min_pixels": shape.min_pixels,
        "max_pixels": shape.max_pixels,
        "size": {"shortest_edge": shape.min_pixels, "longest_edge": shape.max_pixels},
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
    }


def make_checkpoint(
    out_dir: str | Path,
    shape: CheckpointShape | str = "tiny",
    seed: int = 0,
    tokenizer=None,
    proactive: ProactiveDefaults | None = None,
    dtype: str = "float32",
    flat_config: bool = False,
    init_std: float | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a random-weight ``Qwen2_5_VLForConditionalGeneration`` checkpoint with MMDuet2's file layout.

    ``shape.vocab_size == 0`` means "the tokenizer's size". A larger vocab (as in the real 3B) pads the embedding.
    ``init_std`` overrides the initializer range (bigger gives sharper, more varied random logits).
    ``flat_config`` writes MMDuet2's published layout: the flat hub ``config.json`` and no ``proactive.json``
    (unless ``proactive`` is given), so an export of it runs on MMDuet2's defaults.
    The files are written into a temporary folder beside ``out_dir`` and renamed into place when complete: a failed or
    interrupted run leaves no half-written checkpoint. An existing checkpoint there is replaced only with
    ``overwrite``; a non-empty folder that is not a checkpoint is never touched.
    """
    torch = _require_torch()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = shape_from_name(shape) if isinstance(shape, str) else shape
    shape.validate()
    out = Path(out_dir)
    _check_checkpoint_target(out, overwrite)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    token_ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    if any(v is None for v in token_ids.values()):
        raise CheckpointError(f"tokenizer lacks Qwen special tokens: {[k for k, v in token_ids.items() if v is None]}")
    vocab = max(shape.vocab_size, tok.get_vocab_size())
    cfg_dict = hf_config_dict(shape, vocab, token_ids)
    config = Qwen2_5_VLConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    if init_std is not None:
        config.initializer_range = init_std
        config.text_config.initializer_range = init_std
        config.vision_config.initializer_range = init_std
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    with staged_bundle(out, overwrite=True) as tmp:  # the target was checked above
        model.save_pretrained(tmp, safe_serialization=True)
        if flat_config:
            (tmp / "config.json").write_text(json.dumps(flat_hub_config(cfg_dict, dtype), indent=2) + "\n")
        write_tokenizer_files(tmp, tok)
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(shape), indent=2) + "\n")
        if proactive is not None or not flat_config:  # flat_config is MMDuet2's layout: no edge-duet settings file
            p = proactive or ProactiveDefaults()
            (tmp / PROACTIVE_FILE).write_text(json.dumps(p.to_json(), indent=2) + "\n")
    return out


def _check_checkpoint_target(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a target ``make_checkpoint`` must not replace."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; a checkpoint is a folder: give a new folder name")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise UsageError(f"{out} is a folder with other files in it, not a checkpoint: give a new folder name "
                             "(nothing was written)")
        if not overwrite:
            raise UsageError(f"{out} already holds a checkpoint; set `overwrite` to replace it")


def flat_hub_config(nested: dict[str, Any], dtype: str = "bfloat16") -> dict[str, Any]:
    """The flat layout of the Qwen2.5-VL-3B / MMDuet2 hub ``config.json`` (text fields at top level)."""
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("model_type", None)
    flat = {
        "architectures": nested["architectures"],
        "model_type": "qwen2_5_vl",
        **text,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
        "image_token_id": nested["image_token_id"],
        "video_token_id": nested["video_token_id"],
        "vision_start_token_id": nested["vision_start_token_id"],
        "vision_end_token_id": nested["vision_end_token_id"],
        "vision_config": nested["vision_config"],
        "torch_dtype": dtype,
    }
    return flat


# --------------------------------------------------------------------------------------------- inspecting


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    proactive: ProactiveDefaults
    preprocessor: dict[str, Any]
    family: str = DEFAULT_FAMILY  # edge_duet.families: the model family its config declares


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Check a checkpoint directory without loading weights; raise one clear :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist (pass a local Hugging Face model directory)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    family = family_for_config(config, where=str(path))
    missing = [n for n in ("tokenizer.json", "preprocessor_config.json") if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: copy the complete model directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is malformed: {exc}") from exc
        files = tuple(path / s for s in shards)
    else:
        files = (path / "model.safetensors",)
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight file {f} is missing: copy the complete model directory")
        _check_safetensors_header(f)
    proactive = read_proactive(path)
    try:
        pre = json.loads((path / "preprocessor_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / 'preprocessor_config.json'} is not valid JSON: {exc}") from exc
    check_geometry(family, pre, where=str(path))
    return CheckpointInfo(path=path, config=config, weight_files=files, proactive=proactive, preprocessor=pre,
                          family=family.name)


def _check_safetensors_header(path: Path) -> None:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON header; the data that
    follows must be exactly as long as the header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"tensors need {8 + n + end} bytes but the file has {size} (truncated?)")
    except (struct.error, ValueError, json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}): re-download or re-save it") from exc


def load_model(path: str | Path, dtype: str = "float32"):
    """Load a checked checkpoint as ``Qwen2_5_VLForConditionalGeneration`` in eval mode (needs the export extra).
    Export does not use it: it reads one part at a time (``PartLoader``)."""
    torch = _require_torch()
    from transformers import Qwen2_5_VLForConditionalGeneration

    info = inspect_checkpoint(path)
    try:
        model, loading = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            info.path, dtype=getattr(torch, dtype), output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {info.path}: {exc}") from exc
    missing = [k for k in loading.get("missing_keys", []) if not k.endswith("lm_head.weight")]
    mismatched = loading.get("mismatched_keys", [])
    if missing or mismatched:
        raise CheckpointError(
            f"{info.path}: weights disagree with config.json: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(mismatched)} of the wrong shape (e.g. {mismatched[:3]})"
        )
    model.eval()
    return model, info


class PartLoader:
    """The model with no weights loaded, filled one part at a time in float32 straight from the safetensors files.

    ``load_model`` gives every weight at once (transformers keeps the checkpoint's tensors alive until the last
    one is released: converting a part to float32 then holds both copies). Export needs one part at a time: the
    vision tower (0.67 B parameters at 3B), then the language model (3.1 B: 12.4 GB in float32). ``load(part)``
    reads exactly that part's tensors, each converted as it is read; ``release(part)`` gives them back.
    Checkpoint keys may use the hub's names (``visual.*``, ``model.layers.*``) or transformers 5's
    (``model.visual.*``, ``model.language_model.*``).
    """

    PARTS = {"vision": ("model.visual.",), "embed": ("model.language_model.embed_tokens.",),
             "text": ("model.language_model.", "lm_head.")}

    def __init__(self, info: "CheckpointInfo"):
        torch = _require_torch()
        from safetensors import safe_open
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        self.info = info
        try:
            config = AutoConfig.from_pretrained(info.path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {info.path / 'config.json'}: {exc}") from exc
        with torch.device("meta"):
            # float32 throughout, as the graphs are: a streamed export traces this very model (its types become
            # the graph's), and loaded parts are float32 anyway
            model = Qwen2_5_VLForConditionalGeneration(config).float()
        # the rotary tables are computed buffers, not weights: build them for real
        visual, lm = model.model.visual, model.model.language_model
        visual.rotary_pos_emb = type(visual.rotary_pos_emb)(config.vision_config)
        lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
        self.model = model.eval()
        self.tied = model.lm_head.weight is lm.embed_tokens.weight
        self._files = {}
        for f in info.weight_files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._files[k] = f

    def _key(self, name: str) -> str | None:
        for k in (name, name.replace("model.language_model.", "model.", 1), name.replace("model.visual.", "visual.", 1)):
            if k in self._files:
                return k
        return None

    def _names(self, part: str) -> list[str]:
        prefixes = self.PARTS[part]
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False) if n.startswith(prefixes)]
        if part == "text":  # the embedding table is its own part (and, tied, the head's weight)
            names = [n for n in names if not n.startswith(self.PARTS["embed"])]
            if self.tied:
                names = [n for n in names if n != "lm_head.weight"]
        return names

    def load(self, part: str) -> None:
        torch = _require_torch()
        from safetensors import safe_open

        names = self._names(part)
        missing = [n for n in names if self._key(n) is None]
        if missing:
            raise CheckpointError(f"{self.info.path}: weights disagree with config.json: {len(missing)} missing "
                                  f"(e.g. {missing[:3]})")
        wrong = []
        for n in names:
            key = self._key(n)
            # one tensor per opening: safetensors memory-maps the file, and the mapped pages a read touched count
            # as this process's memory until the map is closed (6 GB of bf16 pages beside the 12.4 GB float32
            # text model at 3B, had the file stayed open for the whole part)
            with safe_open(str(self._files[key]), framework="pt") as h:
                t = h.get_tensor(key).to(torch.float32)
            module_name, _, attr = n.rpartition(".")
            module = self.model.get_submodule(module_name)
            if tuple(t.shape) != tuple(module._parameters[attr].shape):
                wrong.append(f"{key} {tuple(t.shape)} != {tuple(module._parameters[attr].shape)}")
                continue
            module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        if wrong:
            raise CheckpointError(f"{self.info.path}: weights disagree with config.json: {len(wrong)} of the wrong "
                                  f"shape (e.g. {wrong[:3]})")
        if part == "embed" and self.tied:
            self.model.lm_head.weight = self.model.model.language_model.embed_tokens.weight

    def read(self, param):
        """One weight, as float32 numpy, read from the checkpoint for a (meta) parameter of the model: how a
        streamed export writes weights without loading the part."""
        from safetensors import safe_open

        if not hasattr(self, "_param_names"):
            self._param_names = {}
            for n, p in self.model.named_parameters(remove_duplicate=False):
                self._param_names.setdefault(id(p), []).append(n)
        for n in self._param_names.get(id(param), ()):
            key = self._key(n)
            if key is not None:
                with safe_open(str(self._files[key]), framework="pt") as h:
                    return h.get_tensor(key).float().numpy()
        raise CheckpointError(f"{self.info.path}: no weight in the checkpoint for parameter "
                              f"{self._param_names.get(id(param), ['?'])[0]}")

    def release(self, part: str) -> None:
        """Back to no weights (meta) for the part's parameters."""
        for n in self._names(part):
            module_name, _, attr = n.rpartition(".")
            module = self.model.get_submodule(module_name)
            module._parameters[attr] = module._parameters[attr].to("meta")


def _require_torch():
    from edge_duet.errors import require

    return require("torch", "export", "Making and exporting checkpoints")
