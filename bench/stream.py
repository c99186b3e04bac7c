"""The bench's stream: options every job shares, the generated camera frames, and the script that fixes each
turn's path (random weights decide nothing sensible, so every job follows one script: a question at turn 1, a
reply of ``reply_tokens`` tokens at the scripted reply turns, ``NO REPLY`` at every other turn). The script acts
on the logits after the model ran (the wanted token's logit is raised above the rest, or tokens are banned), so
every graph still runs in full: it only fixes which path each turn takes, the same in every job.

Numpy only: the peers' child processes (another interpreter, see ``peer_worker.py``) get the frames and the
script's token ids from the parent, not by importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchOptions:
    """What every job of one bench run shares."""

    turns: int = 200
    report_turns: tuple[int, ...] = (1, 10, 50, 200)
    frame_size: tuple[int, int] = (640, 480)  # (width, height) of the generated camera frames
    frames_per_turn: int = 2
    frame_interval_s: float = 1.0
    reply_turns: tuple[int, ...] = (2, 20, 60, 100, 140, 180)  # 1-based turns that reply; all others are silent
    reply_tokens: int = 32
    question: str = "Tell me whenever something changes."
    max_context_tokens: int | None = None  # None: the bundle's default
    threads: int | None = None  # None: every core
    window: int = 2  # per-turn cost at turn T = median of the silent turns T-window .. T+window

    @classmethod
    def from_dict(cls, d: dict) -> "BenchOptions":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------- the stream


def synthetic_frames(turn: int, opts: BenchOptions, seed: int = 0) -> list[np.ndarray]:
    """``frames_per_turn`` RGB uint8 frames of a camera-like scene: a fixed textured background, a square that
    drifts across it, a little sensor noise. Consecutive frames are alike, as in real video (token drop sees it)."""
    w, h = opts.frame_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([60 + 120 * xx / w, 80 + 100 * yy / h, 140 - 60 * xx / w], -1) + rng.normal(0, 12, (h, w, 3))
    out = []
    for k in range(opts.frames_per_turn):
        i = (turn - 1) * opts.frames_per_turn + k
        frame = base.copy()
        side = max(h // 5, 2)
        x0 = int((i * 7) % max(w - side, 1))
        y0 = int((h - side) * (0.5 + 0.4 * np.sin(i / 15)))
        frame[y0:y0 + side, x0:x0 + side] = (220, 40, 40)
        frame += np.random.default_rng(seed + 1 + i).normal(0, 2, frame.shape)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


@dataclass(frozen=True)
class Script:
    """The scripted decisions, applied to logits rows (numpy). ``text_vocab``: ids at or above it are not in the
    tokenizer (the model's vocabulary is padded) and are never chosen for a reply."""

    no_reply: tuple[int, ...]
    im_end: int
    eos: tuple[int, ...]
    text_vocab: int

    @property
    def silence(self) -> tuple[int, ...]:  # what a silent turn generates: NO REPLY<|im_end|>
        return self.no_reply + (self.im_end,)

    @staticmethod
    def force(row: np.ndarray, token: int) -> None:
        row[token] = row.max() + 1.0

    def ban(self, row: np.ndarray, first: bool) -> None:
        """A reply token: never a stop token, never beyond the tokenizer, and (first token) never ``NO``."""
        row[self.text_vocab:] = -np.inf
        row[list(self.eos) + ([self.no_reply[0]] if first else [])] = -np.inf

    def pick(self, row: np.ndarray, k: int, reply: bool) -> int:
        """The ``k``-th generated token of a scripted turn (greedy, ``row`` edited in place): the silence's ``k``-th
        token, or a reply token."""
        if reply:
            self.ban(row, first=k == 0)
        else:
            self.force(row, self.silence[min(k, len(self.silence) - 1)])
        return int(np.argmax(row))
