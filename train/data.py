"""Training dialogues for the demo model: benchmark examples rendered exactly as the runtime serves them.

One dialogue, as token ids (PROTOCOL.md; the same stretches runtime/chat.py renders)::

    <|im_start|>system\\n{prompt}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>x16<|vision_end|><|vision_start|>...<|vision_end|>{question}<|im_end|>\\n
    <|im_start|>assistant\\n[I must reply.\\n]{reply | NO REPLY}<|im_end|>\\n
    ...

Loss is on the assistant tokens after ``assistant\\n`` (and after the must-reply prefill, which the runtime
writes itself) through ``<|im_end|>``. The first of them is the reply decision and can be weighted up.

Auxiliary targets (training only, see TRAINING-NOTES.md): for every visual token, what is in its 28-px cell:
colour (0 = nothing), shape (0 = nothing) and what happened there since the previous frame (nothing, appeared,
moved, changed colour, an object left this cell). They give a dense signal where the text gives one decision
token per turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_duet.eval import benchmark as bm
from edge_duet.eval import scenes as sc
from edge_duet.protocol import DEMO_SYSTEM_PROMPT
from edge_duet.protocol import QWEN_SYSTEM_PROMPT as QWEN_DEFAULT_SYSTEM
EVENTS = ("none", "appeared", "moved", "recoloured", "left")
N_COLOUR, N_SHAPE, N_EVENT = len(sc.COLOUR_NAMES) + 1, len(sc.SHAPES) + 1, len(EVENTS)

FRAME_SIDE = 224  # rendered frames (what the benchmark videos have)
MODEL_SIDE = 112  # what the image processor resizes them to: 4x4 visual tokens of 28 px
GRID = MODEL_SIDE // 28


def corpus_lines() -> list[str]:
    """Every sentence the benchmark can say, for fitting the tokenizer."""
    lines = [bm.NO_REPLY, bm.MUST_REPLY_PREFIX, DEMO_SYSTEM_PROMPT, QWEN_DEFAULT_SYSTEM,
             bm.Q_APPEAR_ANY, bm.Q_LEAVE, bm.Q_RECOLOUR, bm.Q_MOVE, bm.Q_COUNT, bm.Q_HOW_MANY]
    for c in sc.COLOUR_NAMES:
        lines += [bm.Q_APPEAR_COLOUR.format(colour=c), bm.Q_WHAT_SHAPE.format(colour=c)]
        for s in sc.SHAPES:
            for tpl in (bm.Q_LEAVE_ONE, bm.A_APPEAR, bm.A_LEAVE, bm.A_RECOLOUR, bm.A_MOVE, bm.A_WHAT_COLOUR,
                        bm.A_WHAT_SHAPE):
                lines.append(tpl.format(colour=c, shape=s))
    for s in sc.SHAPES:
        lines += [bm.Q_APPEAR_SHAPE.format(shape=s), bm.Q_WHAT_COLOUR.format(shape=s)]
    lines += [bm.a_count(n) for n in range(len(bm.NUMBERS))]
    return lines


def make_image_processor(side: int = MODEL_SIDE):
    """The transformers Qwen2-VL image processor (PIL backend; torchvision is not needed) pinned to one size."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


@dataclass
class Encoded:
    """One dialogue. L tokens, F frames, 16 visual tokens per frame."""

    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, -100 where no loss
    weights: np.ndarray  # (L,) float32 loss weight of each labelled token
    decision_pos: list[int]  # index of each assistant turn's first generated token
    reply_turn: list[bool]  # per turn: does the gold say something (not NO REPLY)
    pixel_values: np.ndarray  # (F*64, 1176) float32
    grid_thw: np.ndarray  # (F, 3) int64
    cells: np.ndarray  # (F*16, 3) int64: colour, shape, event per visual token


def frame_cells(scene: sc.Scene, t: float, prev_t: float | None) -> np.ndarray:
    """(GRID*GRID, 3) auxiliary labels of the frame at ``t`` (see module docstring)."""
    idx = sc.cell_objects(scene, t, GRID, MODEL_SIDE)
    prev = sc.cell_objects(scene, prev_t, GRID, MODEL_SIDE) if prev_t is not None else None
    out = np.zeros((GRID * GRID, 3), np.int64)
    for c, i in enumerate(idx):
        if i >= 0:
            o = scene.objects[i]
            out[c, 0] = sc.COLOUR_NAMES.index(o.colour_at(t)) + 1
            out[c, 1] = sc.SHAPES.index(o.shape) + 1
            if prev_t is not None:
                if not o.visible(prev_t):
                    out[c, 2] = 1
                elif o.centre_at(prev_t) != o.centre_at(t):
                    out[c, 2] = 2
                elif o.colour_at(prev_t) != o.colour_at(t):
                    out[c, 2] = 3
        elif prev is not None and prev[c] >= 0 and not scene.objects[prev[c]].visible(t):
            out[c, 2] = 4
    return out


class DialogueEncoder:
    """Turns :class:`~edge_duet.eval.benchmark.Example` into :class:`Encoded` with a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer, clock: bm.Clock = bm.Clock(), decision_weight: float = 2.0):
        self.tok = tokenizer
        self.clock = clock
        self.decision_weight = decision_weight
        self.processor = make_image_processor()
        self.image_pad = tokenizer.token_to_id("<|image_pad|>")
        self.pad_id = tokenizer.token_to_id("<|endoftext|>")
        self.im_end = tokenizer.token_to_id("<|im_end|>")
        self.tokens_per_frame = GRID * GRID

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def frames(self, example: bm.Example, times, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """Rendered RGB frames; with ``rng``, half of the dialogues get JPEG artefacts (videos are compressed)."""
        import cv2

        quality = int(rng.integers(35, 95)) if rng is not None and rng.random() < 0.5 else None
        out = []
        for t in times:
            bgr = sc.render_frame(example.scene, t, FRAME_SIDE)
            if quality is not None:
                ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
                bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            out.append(np.ascontiguousarray(bgr[..., ::-1]))
        return out

    def encode(self, example: bm.Example, system_prompt: str | None = DEMO_SYSTEM_PROMPT,
               rng: np.random.Generator | None = None) -> Encoded:
        turns = bm.turns(example, self.clock)
        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        decision_pos: list[int] = []

        def add(seq: list[int], label: bool = False) -> None:
            ids.extend(seq)
            labels.extend(seq if label else [-100] * len(seq))
            weights.extend([1.0 if label else 0.0] * len(seq))

        if system_prompt is not None:
            add(self.ids(f"<|im_start|>system\n{system_prompt}<|im_end|>\n"))
        pad = "<|vision_start|>" + "<|image_pad|>" * self.tokens_per_frame + "<|vision_end|>"
        times: list[float] = []
        for turn in turns:
            times += turn.frame_times
            add(self.ids("<|im_start|>user\n" + pad * len(turn.frame_times) + (turn.text or "") + "<|im_end|>\n"))
            head = "<|im_start|>assistant\n" + (bm.MUST_REPLY_PREFIX if turn.must_reply else "")
            head_ids = self.ids(head)
            full = self.ids(head + turn.reply + "<|im_end|>")
            if full[: len(head_ids)] != head_ids:  # pre-tokenization splits at "\n", so this cannot happen
                raise AssertionError(f"reply tokenization merges into the prefill: {head!r} + {turn.reply!r}")
            add(head_ids)
            decision_pos.append(len(ids))
            add(full[len(head_ids):], label=True)
            weights[decision_pos[-1]] = self.decision_weight
            add(self.ids("\n"))
        rgb = self.frames(example, times, rng)
        proc = self.processor(images=rgb, return_tensors="np")
        prev = [None] + times[:-1]
        cells = np.concatenate([frame_cells(example.scene, t, p) for t, p in zip(times, prev)])
        return Encoded(
            input_ids=np.asarray(ids, np.int64), labels=np.asarray(labels, np.int64),
            weights=np.asarray(weights, np.float32), decision_pos=decision_pos,
            reply_turn=[t.reply != bm.NO_REPLY for t in turns],
            pixel_values=np.asarray(proc["pixel_values"], np.float32),
            grid_thw=np.asarray(proc["image_grid_thw"], np.int64), cells=cells,
        )


def random_example(rng: np.random.Generator, duration_s: float, clock: bm.Clock = bm.Clock(),
                   subsets: tuple[str, ...] = bm.SUBSETS) -> bm.Example:
    subset = subsets[int(rng.integers(len(subsets)))]
    return bm.make_example(rng, subset, duration_s, clock, "train")


def random_system_prompt(rng: np.random.Generator) -> str:
    """Mostly the checkpoint's prompt; sometimes Qwen's default (what the template inserts without one)."""
    return DEMO_SYSTEM_PROMPT if rng.random() < 0.85 else QWEN_DEFAULT_SYSTEM


def collate(batch: list[Encoded], pad_id: int, image_pad: int):
    """Right-padded torch tensors for a batch of dialogues."""
    import torch

    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    weights = torch.zeros((len(batch), n))
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for b, e in enumerate(batch):
        k = len(e.input_ids)
        ids[b, :k] = torch.from_numpy(e.input_ids)
        labels[b, :k] = torch.from_numpy(e.labels)
        weights[b, :k] = torch.from_numpy(e.weights)
        mask[b, :k] = 1
    return {
        "input_ids": ids, "labels": labels, "weights": weights, "attention_mask": mask,
        "mm_token_type_ids": (ids == image_pad).int(),
        "pixel_values": torch.from_numpy(np.concatenate([e.pixel_values for e in batch])),
        "image_grid_thw": torch.from_numpy(np.concatenate([e.grid_thw for e in batch])),
        "cells": torch.from_numpy(np.concatenate([e.cells for e in batch])),
    }
