"""``edge-duet bench``, the transformers side: the bench's checkpoints and bundles, and the baseline loops that
drive the same checkpoint "the usual way" in PyTorch (needs the ``export`` extra).

The MMDuet2 reference demo runs each turn like this (its released inference code, transformers 4.5x)::

    messages.append(user turn with the new frames)
    text   = processor.apply_chat_template(messages, add_generation_prompt=True)  # the whole history
    inputs = processor(text=[text], images=every_frame_so_far)                     # every image, every turn
    out    = model.generate(**inputs, past_key_values=cache, max_new_tokens=...)   # greedy
    messages.append(assistant turn with the decoded text, "NO REPLY" included)

As written it is wrong with a cache (4.57 drops the new frames, 5.x gives new image tokens text positions, see
shared/EXPORT-NOTES.md). :class:`DemoLoop` keeps its cost profile and makes it correct:

1. re-render the whole dialogue with the chat template and run the image processor over **every** frame so far,
   expand the image pads and tokenize the whole text (what the demo does each turn);
2. M-RoPE positions from ``get_rope_index`` over the whole token sequence (explicit, correct positions);
3. reuse the cache for the longest common prefix of the new ids and the ids already in it (re-tokenized replies
   can differ from the generated ids: the cache is cropped there), and run the vision tower on the **new**
   frames only;
4. one forward over the uncached ids, then greedy decoding token by token with the cache, as ``generate`` does:
   a silent turn costs one call per token of ``NO REPLY<|im_end|>``.

``rerender=False`` is "transformers with KV reuse": steps 1-2 are replaced by rendering only the new turn
(edge-duet's id-level renderer) and processing only the new frames, with incremental positions; step 4 is
unchanged. The gap between the two is the cost of re-rendering; the gap to edge-duet is the runtime and the
one-call silence.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from edge_duet.errors import CheckpointError
from edge_duet.protocol import NO_REPLY

from edge_duet.export.checkpoint import SHAPES, CheckpointShape, load_model, make_checkpoint, shape_from_name


def bench_shape(name: str) -> CheckpointShape:
    """A named shape of edge_duet.export.checkpoint.SHAPES; "bench" is Qwen2.5-VL in miniature (GQA 4:1, M-RoPE, windowed
    ViT, the real 151,936-token vocabulary) small enough that 200 turns of edge-duet and the transformers loops
    side by side fit in well under an hour on a 2-core CPU (docs/performance.md)."""
    return shape_from_name(name)


def shape_names() -> list[str]:
    return sorted(SHAPES)


def prepare_shape(name: str, cache_dir: str | Path, seed: int = 0, validate: bool = True,
                  log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """A random-weight checkpoint of shape ``name`` and its exported bundle, made once into ``cache_dir``."""
    shape = bench_shape(name)
    key = hashlib.sha1(repr((asdict(shape), seed)).encode()).hexdigest()[:8]
    root = Path(cache_dir) / f"{name}-{key}"
    ckpt, bundle = root / "checkpoint", root / "bundle"
    if not (ckpt / "config.json").is_file():
        log(f"making a random {name} checkpoint in {ckpt} ...")
        dtype = "bfloat16" if shape.hidden_size >= 2048 else "float32"  # 3b/7b: halve the RAM to write it
        make_checkpoint(ckpt, shape, seed=seed, dtype=dtype)
    if not (bundle / "manifest.json").is_file():
        export_into(ckpt, bundle, validate, log)
    return ckpt, bundle


def checkpoint_key(checkpoint: str | Path) -> str:
    """A short key for what is cached from a checkpoint directory: its path and its files' sizes and modification
    times (a changed checkpoint gets a new key)."""
    ckpt = Path(checkpoint)
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in sorted(ckpt.iterdir()) if p.is_file()]
    return hashlib.sha1(repr((str(ckpt.resolve()), stamp)).encode()).hexdigest()[:8]


def prepare_checkpoint(checkpoint: str | Path, cache_dir: str | Path, validate: bool = True,
                       log: Callable[[str], None] = print) -> Path:
    """The bundle of a checkpoint directory, exported once into ``cache_dir`` (keyed by its files' sizes and
    modification times)."""
    ckpt = Path(checkpoint)
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt} is neither a bundle (manifest.json) nor a checkpoint (config.json)")
    bundle = Path(cache_dir) / f"{ckpt.name}-{checkpoint_key(ckpt)}" / "bundle"
    if not (bundle / "manifest.json").is_file():
        export_into(ckpt, bundle, validate, log)
    return bundle


def export_into(ckpt: Path, bundle: Path, validate: bool, log: Callable[[str], None]) -> None:
    from edge_duet.export.onnx_export import ExportOptions, export_bundle

    log(f"exporting {ckpt} to {bundle} ...")
    export_bundle(ckpt, bundle, ExportOptions(validate=validate, overwrite=True), log=log)


# ----------------------------------------------------------------------------------------------- the loops


class DemoLoop:
    """The MMDuet2 demo's turn loop in transformers, made correct (see the module docstring). A bench job:
    ``info`` after loading, ``turn(n) -> record`` per turn (same script and frames as edge-duet's jobs)."""

    def __init__(self, checkpoint: str, options: dict, system_prompt: str, no_reply_text: str = NO_REPLY,
                 rerender: bool = True):
        import torch

        from .stream import BenchOptions, Script

        self.torch = torch
        self.opts = BenchOptions.from_dict(options)
        torch.set_num_threads(self.opts.threads or os.cpu_count() or 1)
        t0 = time.perf_counter()
        self.model, info = load_model(checkpoint)
        self.tok = _hf_tokenizer(info.path)
        self.improc = _image_processor(info.preprocessor)
        cfg = self.model.config
        self.pad = cfg.image_token_id
        self.merge = cfg.vision_config.spatial_merge_size
        self.rerender = rerender
        im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        eos = (im_end, self.tok.convert_tokens_to_ids("<|endoftext|>"))
        self.script = Script(tuple(self.tok.encode(no_reply_text, add_special_tokens=False)), im_end, eos,
                             len(self.tok))
        params = inspect.signature(self.model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.messages: list[dict] = [{"role": "system", "content": system_prompt}]
        self.images: list = []  # every frame so far, as the demo keeps them (PIL)
        self.cache = None
        self.cached: list[int] = []  # the ids whose keys/values are in the cache
        self.next_pos = 0
        self.pos_offset = 0
        if not rerender:
            self._init_incremental(info.path, system_prompt)
        self.info = {"load_s": time.perf_counter() - t0, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "rerender": rerender}

    # ------------------------------------------------------------------ one turn
    def turn(self, n: int) -> dict:
        from PIL import Image

        from .stream import synthetic_frames

        torch, o = self.torch, self.opts
        reply = n in o.reply_turns
        frames = [Image.fromarray(f) for f in synthetic_frames(n, o)]
        question = o.question if n == 1 else None
        t0 = time.perf_counter()
        if self.rerender:
            ids, grids, pixels, t1, t2 = self._rerender(frames, question)
            k = _common_prefix(ids, self.cached)
        else:
            ids, grids, pixels, t1, t2 = self._incremental(frames, question)
            k = len(self.cached)
        with torch.no_grad():
            if self.cache is not None and k < self.cache.get_seq_length():
                self.cache.crop(k)
            new = torch.tensor([ids[k:]])
            emb = self.model.model.language_model.embed_tokens(new)
            mask = new[0] == self.pad
            vis = self._vision(pixels, grids[-len(frames):])
            if int(mask.sum()) != vis.shape[0]:
                raise RuntimeError(f"{int(mask.sum())} uncached image-pad ids but {vis.shape[0]} new visual tokens")
            emb[0, mask] = vis
            t3 = time.perf_counter()
            logits = self._forward(emb, self.positions[:, :, k - self.pos_offset:])
            t4 = time.perf_counter()
            generated = self._generate(logits, reply)
        t5 = time.perf_counter()
        self.cached = list(ids) + generated[:-1]  # generate() leaves the last sampled token out of the cache
        text = self.tok.decode(generated, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        if not self.rerender:
            self._close_incremental(generated)
        rec = {"turn": n, "kind": "reply" if reply else "silent", "total_s": t5 - t0, "render_s": t1 - t0,
               "positions_s": t2 - t1, "vision_s": t3 - t2, "prefill_s": t4 - t3, "decode_s": t5 - t4,
               "calls": len(generated), "prefill_tokens": len(ids) - k, "cache_before": k,
               "cache_after": len(self.cached), "images_processed": len(self.images) if self.rerender else len(frames),
               "top": self.top}
        if reply:
            rec["ttft_s"] = t4 - t0
            rec["decode_tokens"] = len(generated) - 1
        return rec

    def _rerender(self, frames, question):
        """Steps 1-2: the whole dialogue through the template, every frame through the image processor."""
        torch = self.torch
        content = [{"type": "image"} for _ in frames] + ([{"type": "text", "text": question}] if question else [])
        self.messages.append({"role": "user", "content": content})
        self.images.extend(frames)
        text = self.tok.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        proc = self.improc(images=self.images, return_tensors="np")
        grids = [tuple(int(v) for v in g) for g in proc["image_grid_thw"]]
        text = _expand_image_pads(text, grids, self.merge)
        ids = self.tok.encode(text, add_special_tokens=False)
        pixels = proc["pixel_values"][-sum(t * h * w for t, h, w in grids[-len(frames):]):]
        t1 = time.perf_counter()
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            self.positions, _ = self.model.model.get_rope_index(
                input_ids, mm_token_type_ids=(input_ids == self.pad).int(), image_grid_thw=torch.tensor(grids))
        self.next_pos = int(self.positions.max()) + 1
        return ids, grids, pixels, t1, time.perf_counter()

    def _init_incremental(self, ckpt: Path, system_prompt: str) -> None:
        from tokenizers import Tokenizer

        from edge_duet.manifest import TokenSpec
        from edge_duet.runtime.chat import ChatRenderer

        g = self.tok.convert_tokens_to_ids
        spec = TokenSpec(im_start=g("<|im_start|>"), im_end=g("<|im_end|>"), vision_start=g("<|vision_start|>"),
                         vision_end=g("<|vision_end|>"), image_pad=self.pad, video_pad=g("<|video_pad|>"),
                         endoftext=g("<|endoftext|>"), eos_ids=self.script.eos)
        self.renderer = ChatRenderer(Tokenizer.from_file(str(ckpt / "tokenizer.json")), spec, self.merge)
        self.pending = list(self.renderer.system(system_prompt)[0].ids)

    def _incremental(self, frames, question):
        """KV reuse: only the new turn is rendered, only the new frames processed; positions continue."""
        from edge_duet.runtime.chat import ImagePiece
        from edge_duet.runtime.positions import image_advance, image_positions, text_positions

        torch = self.torch
        proc = self.improc(images=frames, return_tensors="np")
        grids = [tuple(int(v) for v in g) for g in proc["image_grid_thw"]]
        pieces = self.renderer.user(grids, question) + self.renderer.assistant_start()
        t1 = time.perf_counter()
        new, pos, p = list(self.pending), [text_positions(self.next_pos, len(self.pending))], self.next_pos
        p += len(self.pending)
        for piece in pieces:
            if isinstance(piece, ImagePiece):
                gh, gw = piece.grid_thw[1] // self.merge, piece.grid_thw[2] // self.merge
                new += [self.pad] * piece.num_tokens
                pos.append(image_positions(p, gh, gw))
                p += image_advance(gh, gw)
            else:
                new += piece.ids
                pos.append(text_positions(p, len(piece.ids)))
                p += len(piece.ids)
        self.pos_offset = len(self.cached)  # self.positions starts there
        self.positions = torch.from_numpy(np.concatenate(pos, axis=1))[:, None, :]
        self.next_pos = p
        return self.cached + new, grids, proc["pixel_values"], t1, time.perf_counter()

    def _close_incremental(self, generated: list[int]) -> None:
        """The ids still to feed next turn: the last generated token (if not a stop token) and ``<|im_end|>\\n``."""
        last = generated[-1]
        closing = ([last] if last not in self.script.eos else []) + [self.script.im_end]
        self.pending = closing + list(self.renderer.assistant_end()[0].ids[1:])

    # ------------------------------------------------------------------ the model
    def _vision(self, pixels: np.ndarray, grids):
        torch = self.torch
        out = self.model.model.get_image_features(torch.from_numpy(pixels), torch.tensor(grids),
                                                  return_dict=True).pooler_output
        return torch.cat(list(out), 0) if isinstance(out, (list, tuple)) else out

    def _forward(self, emb, positions) -> np.ndarray:
        """One cached forward; returns the last row's logits (numpy)."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        out = self.model.model(inputs_embeds=emb, position_ids=positions, use_cache=True,
                               **{self._cache_kw: self.cache})
        return self.model.lm_head(out.last_hidden_state[:, -1]).float().numpy()[0]

    def _generate(self, logits: np.ndarray, reply: bool) -> list[int]:
        """Greedy decoding to a stop token or ``reply_tokens`` tokens; the script picks silence or a reply."""
        torch, s = self.torch, self.script
        generated: list[int] = []
        self.top = int(np.argmax(logits))  # the model's own choice, before the script acts (parity checks)
        while True:
            token = s.pick(logits, len(generated), reply)
            generated.append(token)
            if token in s.eos or len(generated) >= self.opts.reply_tokens:
                return generated
            pos = torch.full((3, 1, 1), self.next_pos, dtype=torch.long)
            self.next_pos += 1
            emb = self.model.model.language_model.embed_tokens(torch.tensor([[token]]))
            logits = self._forward(emb, pos)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _expand_image_pads(text: str, grids, merge: int) -> str:
    """Each ``<|image_pad|>`` repeated t*gh*gw/merge^2 times, in order, as Qwen2VLProcessor does."""
    pad = "<|image_pad|>"
    for t, gh, gw in grids:
        text = text.replace(pad, "<|placeholder|>" * (t * gh * gw // merge**2), 1)
    return text.replace("<|placeholder|>", pad)


def _hf_tokenizer(ckpt: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    template = ckpt / "chat_template.jinja"
    if template.is_file():
        tok.chat_template = template.read_text()
    else:
        cfg_path = ckpt / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if not cfg.get("chat_template"):
            raise CheckpointError(f"{ckpt} has no chat template (chat_template.jinja or tokenizer_config.json)")
        tok.chat_template = cfg["chat_template"]
    return tok


def _image_processor(pre: dict):
    """The Qwen2-VL image processor on numpy + PIL (the stock class needs torchvision, see EXPORT-NOTES)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    size = pre.get("size") or {}
    return Qwen2VLImageProcessorPil(
        min_pixels=pre.get("min_pixels") or size.get("shortest_edge"),
        max_pixels=pre.get("max_pixels") or size.get("longest_edge"),
        patch_size=pre.get("patch_size", 14), merge_size=pre.get("merge_size", 2),
        temporal_patch_size=pre.get("temporal_patch_size", 2), image_mean=pre.get("image_mean"),
        image_std=pre.get("image_std"))
