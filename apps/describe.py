"""``edge-duet inspect``: what a bundle, or the bundle a checkpoint would export to, will do on a device.

Reads JSON and file headers only (no weights, no torch): the protocol (prompt, frame timing, per-frame pixel
budget, each with where it came from), the tokens one turn costs for a camera size, how much video the context
holds, the graphs with their precision and size, and the memory the bundle needs to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_duet.errors import UsageError
from edge_duet.manifest import MANIFEST_NAME, Manifest, PreprocessSpec

GB = 1024**3


def parse_size(text: str) -> tuple[int, int]:
    """``640x480`` (width x height) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--camera-size {text!r}: give width x height, e.g. 640x480") from None
    if w <= 0 or h <= 0:
        raise UsageError(f"--camera-size {text!r}: both sides must be positive")
    return h, w


def _turn_tokens(tokenizer_path: Path, manifest_tokens, merge: int, grid: tuple[int, int, int], frames: int,
                 prompt) -> tuple[int, int]:
    """(tokens of a silent turn: user frames + NO REPLY, tokens of the system prompt), rendered exactly."""
    from tokenizers import Tokenizer

    from edge_duet.runtime.chat import ChatRenderer, num_tokens

    r = ChatRenderer(Tokenizer.from_file(str(tokenizer_path)), manifest_tokens, merge)
    turn = r.user([grid] * frames) + r.assistant_start(None)
    silent = num_tokens(turn) + len(r.text_ids(prompt.no_reply_text)) + num_tokens(r.assistant_end())
    return silent, num_tokens(r.system(prompt.system_prompt))


def _frame(pre: PreprocessSpec, hw: tuple[int, int]) -> dict[str, Any]:
    from edge_duet.runtime.preprocess import smart_resize

    factor = pre.patch_size * pre.merge_size
    h, w = smart_resize(hw[0], hw[1], factor, pre.min_pixels, pre.max_pixels)
    return {"camera_hw": list(hw), "model_hw": [h, w], "visual_tokens": (h // factor) * (w // factor),
            "grid": (1, h // pre.patch_size, w // pre.patch_size)}


def _kv_bytes_per_token(text) -> int:
    return text.num_layers * 2 * text.num_kv_heads * text.head_dim * 4  # float32 cache


def describe(path: str | Path, camera_hw: tuple[int, int] = (480, 640)) -> dict[str, Any]:
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return _describe_bundle(path, camera_hw)
    if (path / "config.json").is_file():
        return _describe_checkpoint(path, camera_hw)
    raise UsageError(f"{path} is neither an edge-duet bundle (no {MANIFEST_NAME}) nor a checkpoint (no config.json)")


def _protocol(prompt, pre: PreprocessSpec, sources: dict, frame: dict, silent: int, system: int) -> dict[str, Any]:
    per_turn_video_s = prompt.frames_per_turn * prompt.frame_interval_s
    turns = max(0, (prompt.max_context_tokens - system) // silent)
    return {
        "system_prompt": prompt.system_prompt, "frame_interval_s": prompt.frame_interval_s,
        "frames_per_turn": prompt.frames_per_turn, "max_context_tokens": prompt.max_context_tokens,
        "max_pixels": pre.max_pixels, "sources": sources, "frame": {k: v for k, v in frame.items() if k != "grid"},
        "tokens_per_silent_turn": silent, "system_prompt_tokens": system,
        "silent_turns_in_context": turns, "video_seconds_in_context": round(turns * per_turn_video_s, 1),
    }


def _describe_bundle(path: Path, camera_hw) -> dict[str, Any]:
    m = Manifest.load(path)
    frame = _frame(m.preprocess, camera_hw)
    silent, system = _turn_tokens(path / m.tokenizer, m.tokens, m.vision.merge_size, frame["grid"],
                                  m.prompt.frames_per_turn, m.prompt)
    graphs = {}
    for name, g in m.graphs.items():
        files = [path / g.path, *(path / d for d in g.external_data)]
        graphs[name] = {"file": g.path, "precision": g.precision,
                        "bytes": sum(f.stat().st_size for f in files if f.is_file())}
    weights = sum(g["bytes"] for g in graphs.values())
    kv = _kv_bytes_per_token(m.text) * m.prompt.max_context_tokens
    return {
        "kind": "bundle", "path": str(path), "name": m.name, "variant": m.variant,
        "protocol": _protocol(m.prompt, m.preprocess, m.protocol_sources, frame, silent, system),
        "graphs": graphs,
        "memory": {"weights_bytes": weights, "kv_cache_bytes_at_max_context": kv,
                   "estimate_bytes": weights + kv,
                   "note": "weights as stored plus the float32 KV cache at the full context; a GPU provider holds "
                           "both in GPU memory (the same numbers), the CPU provider in RAM (plus ~0.3-0.6 GB of "
                           "libraries and activations, measured in docs/3b.md)"},
    }


def _describe_checkpoint(path: Path, camera_hw) -> dict[str, Any]:
    from edge_duet.export.checkpoint import inspect_checkpoint
    from edge_duet.export.memory import available_memory_gb, memory_plan
    from edge_duet.manifest import TokenSpec
    from edge_duet.errors import CheckpointError

    info = inspect_checkpoint(path)
    cfg = info.config
    vc = cfg.get("vision_config", {})
    pre = PreprocessSpec.from_preprocessor_config(info.preprocessor, vc.get("patch_size", 14),
                                                  vc.get("spatial_merge_size", 2), vc.get("temporal_patch_size", 2))
    prompt, max_pixels, sources = info.proactive.resolve(pre.max_pixels)
    stock = pre.max_pixels
    import dataclasses

    pre = dataclasses.replace(pre, max_pixels=max_pixels)
    frame = _frame(pre, camera_hw)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokens = TokenSpec.from_tokenizer(tok.token_to_id, lambda t: CheckpointError(f"tokenizer.json lacks {t}"))
    silent, system = _turn_tokens(path / "tokenizer.json", tokens, pre.merge_size, frame["grid"],
                                  prompt.frames_per_turn, prompt)
    plan = memory_plan(info)
    p = plan.params
    fp32_graphs = {"vision": p["vision"] * 4, "embed": p["embed"] * 4,
                   "decoder": (p["decoder"] + (p["embed"] if plan.tied else p["lm_head"])) * 4}
    return {
        "kind": "checkpoint", "path": str(path), "name": path.name,
        "has_proactive_json": (path / "proactive.json").is_file(), "checkpoint_max_pixels": stock,
        "protocol": _protocol(prompt, pre, sources, frame, silent, system),
        "parameters": p, "checkpoint_bytes": plan.checkpoint_bytes,
        "graphs": {k: {"file": f"{k}.onnx", "precision": "fp32", "bytes": v} for k, v in fp32_graphs.items()},
        "export": {"memory_needed_gb": round(plan.need_gb(True), 1),
                   "memory_needed_without_validation_gb": round(plan.need_gb(False), 1),
                   "memory_available_gb": round(available_memory_gb(), 1)},
    }


def render(info: dict[str, Any]) -> str:
    pr = info["protocol"]
    fr = pr["frame"]
    src = pr["sources"]
    lines = [f"{info['kind']} {info['path']}" + (f" (variant {info['variant']})" if "variant" in info else "")]
    if info["kind"] == "checkpoint":
        lines.append(f"  settings file proactive.json: {'yes' if info['has_proactive_json'] else 'no (MMDuet2 as published: its defaults apply)'}")
    lines += [
        "protocol:",
        f"  system prompt        [{src.get('system_prompt', '?')}] {pr['system_prompt']!r}",
        f"  frames               {pr['frames_per_turn']} per turn [{src.get('frames_per_turn', '?')}], "
        f"{pr['frame_interval_s']:g} s apart [{src.get('frame_interval_s', '?')}]",
        f"  frame budget         {pr['max_pixels']} px per frame [{src.get('max_pixels', '?')}]"
        + (f" (the checkpoint's preprocessor allows {info['checkpoint_max_pixels']})"
           if info.get("checkpoint_max_pixels", pr["max_pixels"]) != pr["max_pixels"] else ""),
        f"  camera {fr['camera_hw'][1]}x{fr['camera_hw'][0]}       -> model sees {fr['model_hw'][1]}x{fr['model_hw'][0]}, "
        f"{fr['visual_tokens']} visual tokens per frame",
        f"  one silent turn      {pr['tokens_per_silent_turn']} tokens (system prompt {pr['system_prompt_tokens']})",
        f"  context              {pr['max_context_tokens']} tokens [{src.get('max_context_tokens', '?')}]: "
        f"~{pr['silent_turns_in_context']} silent turns, {pr['video_seconds_in_context']:g} s of video before eviction",
        "graphs:",
    ]
    for name, g in info["graphs"].items():
        lines.append(f"  {name:<8} {g['precision']:<24} {g['bytes'] / GB:7.2f} GB  {g['file']}")
    if info["kind"] == "bundle":
        mem = info["memory"]
        lines.append(f"memory: weights {mem['weights_bytes'] / GB:.2f} GB + KV cache at full context "
                     f"{mem['kv_cache_bytes_at_max_context'] / GB:.2f} GB = {mem['estimate_bytes'] / GB:.2f} GB")
    else:
        ex = info["export"]
        lines.append(f"parameters: {sum(info['parameters'].values()) / 1e9:.2f} B "
                     f"({', '.join(f'{k} {v / 1e6:.0f} M' for k, v in info['parameters'].items())})")
        lines.append(f"export needs ~{ex['memory_needed_gb']} GB ({ex['memory_needed_without_validation_gb']} GB "
                     f"with --no-validate); {ex['memory_available_gb']} GB available now")
    return "\n".join(lines)
