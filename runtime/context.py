"""The decoder's state in one place: the KV cache, its valid length and the next M-RoPE position.

Everything that feeds the decoder goes through a :class:`Context`::

    chunks (text ids | one frame's visual embeds) ──assemble──> inputs_embeds (S, hidden), positions (3, S)
                                         embed.onnx ─┘            from next_pos ─┘
        ──decoder (on top of the cache)──> logits of the asked rows; cache.length += S; next_pos = end

    prefill(chunks)          a stretch of the sequence (optionally in slices of a fixed size)
    decode(token)            one generated text token
    truncate(length, pos)    roll back to an earlier point (length and position move; no memory is touched)
    reset()                  empty, at position 0

``Session`` (the proactive turn), export validation and quant's probe all drive one, so the model loop exists
once. The cache is whatever the engine's decoder flavour keeps (``Engine.empty_cache``): per layer arrays that
each plain-decoder call returns grown, or the fused decoder's buffers allocated once at ``capacity`` tokens
that it writes in place (see engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_duet.errors import UsageError

from .positions import image_advance, image_positions, text_positions


@dataclass
class Chunk:
    """A stretch of the sequence: text ids, or one frame's kept visual tokens."""

    ids: tuple[int, ...] = ()
    embeds: np.ndarray | None = None  # (kept, hidden) for a frame
    grid: tuple[int, int] | None = None  # merged (gh, gw) for a frame
    keep: np.ndarray | None = None  # bool (gh*gw,) kept tokens; None: all

    @property
    def num_tokens(self) -> int:
        return len(self.ids) if self.embeds is None else int(self.embeds.shape[0])


def frames_to_chunks(embeds: np.ndarray, grids: Sequence[tuple[int, int, int]], merge_size: int) -> list[Chunk]:
    """The vision graph's output for several frames ((M, hidden), frames in order) -> one chunk per frame.
    ``grids``: each frame's patch grid (t, gh, gw) as preprocessing gave it."""
    chunks, start = [], 0
    for t, gh, gw in grids:
        grid = (gh // merge_size, gw // merge_size)
        n = t * grid[0] * grid[1]
        chunks.append(Chunk(embeds=embeds[start:start + n], grid=grid))
        start += n
    return chunks


def assemble(engine, chunks: Sequence[Chunk], start: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks -> inputs_embeds (S, hidden), M-RoPE positions (3, S) from ``start``, and the next position.

    All text of the chunks goes through the embedding graph in one call; frames bring their visual embeddings.
    """
    text_ids = [i for c in chunks if c.embeds is None for i in c.ids]
    text_emb = engine.embed(text_ids) if text_ids else None
    embs, poss, pos, ti = [], [], start, 0
    for c in chunks:
        if c.embeds is None:
            n = len(c.ids)
            if n:
                embs.append(text_emb[ti:ti + n])
                poss.append(text_positions(pos, n))
                ti += n
                pos += n
        else:
            gh, gw = c.grid
            p = image_positions(pos, gh, gw)
            poss.append(p if c.keep is None else p[:, c.keep])  # kept tokens keep their original positions
            embs.append(c.embeds)
            pos += image_advance(gh, gw)
    return np.concatenate(embs), np.concatenate(poss, axis=1), pos


class Context:
    """The one owner of the decoder state of a dialogue (see the module docstring).

    ``capacity``: the most tokens the cache may hold. The fused decoder allocates its buffers at this size once;
    with the plain decoder it is the same promise, checked on every call.
    """

    def __init__(self, engine, capacity: int):
        self.engine = engine
        self.capacity = int(capacity)
        self.cache = engine.empty_cache(self.capacity)
        self.next_pos = 0

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.cache.length

    def reset(self) -> None:
        """Empty the cache (a length, not memory) and start again at position 0."""
        self.cache = self.cache.truncate(0)
        self.next_pos = 0

    def truncate(self, length: int, next_pos: int) -> None:
        """Forget everything after the first ``length`` tokens; ``next_pos`` is the position that follows them
        (the caller knows it: positions are not a function of the token count once frames are in the cache)."""
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot truncate a cache of {self.cache.length} tokens to {length}")
        self.cache = self.cache.truncate(length)
        self.next_pos = int(next_pos)

    def prefill(self, chunks: Sequence[Chunk], logits_index: Sequence[int] | None = None,
                slice_tokens: int | None = None) -> np.ndarray:
        """Feed ``chunks`` at ``next_pos``; returns logits (n, vocab) for ``logits_index`` (rows of the new tokens,
        default: the last). ``slice_tokens``: feed at most this many tokens per decoder call (a long re-prefill
        would otherwise build (S x S) attention scores at once); the logits are then the last slice's last row."""
        emb, pos, end = assemble(self.engine, chunks, self.next_pos)
        if slice_tokens is None or emb.shape[0] <= slice_tokens:
            logits = self.feed(emb, pos, logits_index)
        else:
            if logits_index is not None:
                raise ValueError("logits rows are only returned from a prefill in one call")
            for start in range(0, emb.shape[0], slice_tokens):
                logits = self.feed(emb[start:start + slice_tokens], pos[:, start:start + slice_tokens])
        self.next_pos = end
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Feed one generated text token; returns the logits (vocab,) of the token after it."""
        return self.prefill([Chunk(ids=(int(token),))])[-1]

    def feed(self, embeds: np.ndarray, positions: np.ndarray, logits_index: Sequence[int] | None = None) -> np.ndarray:
        """The decoder on ``embeds`` (S, hidden) at ``positions`` (3, S) on top of the cache. Does not move
        ``next_pos`` (the caller that assembled the inputs knows where they end)."""
        s = embeds.shape[0]
        if self.cache.length + s > self.capacity:
            raise UsageError(f"the decoder context holds {self.capacity} tokens; {self.cache.length} are cached and "
                             f"{s} more were fed. Raise max_context_tokens")
        logits, self.cache = self.engine.decode(embeds, positions, self.cache, logits_index)
        return logits

    def host_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key, value) of the valid tokens, (1, kv_heads, length, head_dim) numpy copies: for
        validation and tests."""
        return self.cache.host_layers()
