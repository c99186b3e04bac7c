"""The incremental proactive session: the dialogue (segments, pending ids) over one ``Context`` (context.py),
which owns the KV cache, its length and the next M-RoPE position.

Each turn computes only what is new::

    frames --preprocess--> patches --vision.onnx--> visual embeds ─┐
    [pending ids] + user turn + assistant start --embed.onnx-------┴─> one decoder call (prefill) -> first token
        first token starts "NO REPLY"?  yes -> provisional Silence; "NO REPLY<|im_end|>\\n" becomes the
                                               pending ids of the next turn's prefill, verified from its logits
                                        no  -> decode the reply token by token (TokenDelta ... Reply)

Silence therefore costs one decoder call, and the output is exactly plain greedy decoding: when the next prefill
shows the model would not have continued "NO REPLY" the cache is rolled back to the first wrong token and the
reply is decoded normally (it arrives one turn late, stamped with its own turn and time).

Memory is bounded: when the context would pass ``max_context_tokens``, old turns are evicted and the kept
window is re-prefilled from position 0 (see ``_evict``), by default mostly ahead of time, a few segments per turn
in a second context (reanchor.py), so no turn stalls. See runtime/DESIGN.md for the whole story.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from edge_duet.errors import InputError, UsageError
from edge_duet.manifest import Manifest

from .chat import ChatRenderer, ImagePiece, Piece
from .context import Chunk, Context, frames_to_chunks
from .engine import Engine, open_engine
from .reanchor import Reanchor, predict_plan
from .events import Event, Evicted, Reply, Silence, TokenDelta, TurnStarted, TurnStats
from .preprocess import preprocess_frame


REPREFILL_CHUNK = 512  # tokens per decoder call when the kept window is re-prefilled after eviction


@dataclass(frozen=True)
class SessionOptions:
    system_prompt: str | None = None  # None: the bundle's default
    max_new_tokens: int = 64
    max_context_tokens: int | None = None  # None: the bundle's default
    token_drop_threshold: float | None = None  # cosine similarity above which a visual token is dropped; None: off
    max_pixels: int | None = None  # per-frame pixel budget; None: the bundle's (MMDuet2's ~128 tokens by default)
    temperature: float = 0.0  # 0: greedy (the protocol's setting)
    top_k: int = 0
    seed: int | None = None
    speculate_silence: bool = True  # greedy only; off gives the same output with more decoder calls
    providers: tuple[str, ...] | str | None = None
    threads: int | None = None
    decoder: str = "auto"  # decoder flavour: "auto" (fused on the CPU when the bundle has it), "plain" or "fused"
    # re-prefill the window the next eviction keeps a few segments per turn, beside the live cache (one more
    # cache of memory; same output), instead of all in the turn that evicts (see reanchor.py)
    smooth_eviction: bool = True


@dataclass
class Segment:
    """One message of the dialogue, kept for eviction and re-prefill."""

    turn: int
    role: str
    chunks: list[Chunk]
    question: str | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class _Pending:
    """Ids appended to the dialogue but not yet in the cache; fed at the start of the next prefill.

    ``verify`` > 0: the first ``verify`` ids are speculated generated tokens (a provisional ``NO REPLY``) whose
    logits must confirm them."""

    ids: list[int] = field(default_factory=list)
    verify: int = 0
    turn: int = -1
    t: float = 0.0
    started: float = 0.0


def eviction_budget(max_context_tokens: int, system_tokens: int) -> int:
    """The tokens an eviction keeps after the system prompt: half the context. Both sessions' evictions, and the
    re-anchoring's prediction of the next one (which must plan exactly what the eviction will), use this."""
    return max_context_tokens // 2 - system_tokens


def plan_eviction(rest: Sequence, budget: int, max_images: int | None = None) -> tuple[int, int | None]:
    """The context policy both sessions follow. ``rest``: the dialogue after the system prompt, alternating user and
    assistant items (each with ``num_tokens``, ``role``, ``question``; with ``max_images``, ``images`` too).
    Keeps whole (user, assistant) pairs, newest first, within ``budget`` tokens (and ``max_images`` images).
    Returns ``(i, q_at)``: ``rest[i:]`` is kept; ``q_at`` is the index in ``rest[:i]`` of the newest dropped user
    item with a question, which the caller keeps as text with the answer after it (None when there is none)."""
    used = images = 0
    i = len(rest)
    while i >= 2:
        pair = rest[i - 2:i]
        n = sum(item.num_tokens for item in pair)
        k = sum(len(item.images) for item in pair) if max_images is not None else 0
        if used + n > budget or (max_images is not None and images + k > max_images):
            break
        used += n
        images += k
        i -= 2
    q_at = next((j for j in range(i - 1, -1, -1) if rest[j].role == "user" and rest[j].question), None)
    return i, q_at


@runtime_checkable
class SessionLike(Protocol):
    """The verbs and the few attributes a driver (``Assistant``, the CLI, the server) uses: :class:`Session`,
    ``RemoteSession`` and the test fakes satisfy it (``isinstance`` checks the names)."""

    manifest: object  # .name, .variant, .prompt
    max_context_tokens: int
    turn: int

    def ask(self, text: str, must_reply: bool = False) -> None: ...
    def add_frames(self, frames: Sequence, t: float, channels: str = "bgr") -> None: ...
    def step(self) -> Iterator[Event]: ...
    def finish(self) -> Iterator[Event]: ...
    def reset(self, system_prompt: str | None = None) -> None: ...
    def cancel(self) -> None: ...


class QuestionInbox:
    """The next turn's question, shared by the local :class:`Session` and the remote session: ``ask`` collects
    text until ``step`` takes it (``_question``, ``_must_reply``, ``_t``)."""

    _question: str | None = None
    _must_reply: bool = False
    _t: float = 0.0

    def ask(self, text: str, must_reply: bool = False, t: float | None = None) -> None:
        """Attach ``text`` (a question or subtitle) to the next turn; several calls join with a newline.
        ``t``: the turn's video time, for a turn that brings no frames."""
        if t is not None:
            self._t = float(t)
        text = text.strip()
        if not text:
            raise InputError("empty question: type some text")
        self._question = text if self._question is None else self._question + "\n" + text
        self._must_reply = self._must_reply or must_reply


class Session(QuestionInbox):
    """A proactive dialogue over a bundle. Single-threaded except :meth:`cancel`. See docs/CONTRACTS.md."""

    def __init__(self, bundle: str | Path, options: SessionOptions = SessionOptions(), engine: Engine | None = None):
        from tokenizers import Tokenizer

        self.bundle_dir = Path(bundle)
        self.options = options
        self.engine = engine or open_engine(self.bundle_dir, providers=options.providers, threads=options.threads,
                                            decoder=options.decoder)
        self.manifest: Manifest = self.engine.manifest
        self.tokenizer = Tokenizer.from_file(str(self.bundle_dir / self.manifest.tokenizer))
        self.renderer = ChatRenderer(self.tokenizer, self.manifest.tokens, self.manifest.vision.merge_size)
        prompt = self.manifest.prompt
        self.max_context_tokens = options.max_context_tokens or prompt.max_context_tokens
        self.preprocess = self.manifest.preprocess
        if options.max_pixels is not None:
            if options.max_pixels < self.preprocess.min_pixels:
                raise UsageError(f"max_pixels {options.max_pixels} is below the model's minimum frame size "
                                 f"({self.preprocess.min_pixels} px)")
            self.preprocess = dataclasses.replace(self.preprocess, max_pixels=options.max_pixels)
        if options.max_new_tokens < 1:
            raise UsageError("max_new_tokens must be at least 1")
        self._no_reply_ids = self.renderer.text_ids(prompt.no_reply_text)
        self._nl_ids = list(self.renderer.assistant_end()[0].ids[1:])  # "\n" after <|im_end|>
        self._eos = set(self.manifest.tokens.eos_ids)
        self._rng = np.random.default_rng(options.seed)
        self._cancel = threading.Event()
        self.context = Context(self.engine, self.max_context_tokens)  # the KV cache, allocated once when fused
        self._reanchor = Reanchor(self.engine, self.max_context_tokens) if options.smooth_eviction else None
        self.reset()

    # ------------------------------------------------------------------ public verbs
    def reset(self, system_prompt: str | None = None) -> None:
        """Forget the dialogue; the next step starts from the system prompt (``system_prompt`` if given, else
        the session's default)."""
        self.system_prompt = system_prompt or self.options.system_prompt or self.manifest.prompt.system_prompt
        self.context.reset()
        if self._reanchor is not None:
            self._reanchor.reset()
        self.turn = 0
        self.segments: list[Segment] = []
        self._pending = _Pending()
        self._frames: list[tuple[np.ndarray, tuple[int, int, int]]] = []
        self._t = 0.0
        self._question: str | None = None
        self._must_reply = False
        self._prev_frame: tuple[tuple[int, int], np.ndarray] | None = None
        system = Segment(-1, "system", self._text_chunks(self.renderer.system(self.system_prompt)))
        self.segments.append(system)
        self._pending.ids = list(system.chunks[0].ids)

    def add_frames(self, frames: Sequence, t: float, channels: str = "bgr") -> None:
        """Queue frames for the next turn. ``frames``: HxWx3 uint8 arrays (``channels`` "bgr" from OpenCV or
        "rgb") or PIL images; ``t``: the turn's video time in seconds."""
        for frame in frames:
            self._frames.append(preprocess_frame(frame, self.preprocess, channels=channels))
        self._t = float(t)

    def cancel(self) -> None:
        """Stop the reply being decoded (thread-safe). The reply ends where it is, closed like a normal one."""
        self._cancel.set()

    @property
    def context_tokens(self) -> int:
        return self.context.length + len(self._pending.ids)

    @property
    def cache(self):
        """The decoder's KV cache (owned by :attr:`context`)."""
        return self.context.cache

    @property
    def next_pos(self) -> int:
        """The next M-RoPE position (owned by :attr:`context`)."""
        return self.context.next_pos

    @property
    def decoder_calls_total(self) -> int:
        return self.engine.decoder_calls

    def step(self) -> Iterator[Event]:
        """Run one user turn with the frames and text added since the last step."""
        if not self._frames and self._question is None:
            return
        self._cancel.clear()
        turn, t, started = self.turn, self._t, time.perf_counter()
        self.turn += 1
        calls0 = self.engine.decoder_calls
        frames, question, must_reply = self._frames, self._question, self._must_reply
        self._frames, self._question, self._must_reply = [], None, False
        yield TurnStarted(turn, t, len(frames), question, must_reply)

        tv = time.perf_counter()
        frame_chunks, kept, dropped = self._encode_frames(frames)
        vision_s = time.perf_counter() - tv

        prefix = self.manifest.prompt.must_reply_prefix if must_reply else None
        user_pieces = self.renderer.user([g for _, g in frames], question)
        asst_pieces = self.renderer.assistant_start(prefix)
        user = Segment(turn, "user", self._chunks(user_pieces, iter(frame_chunks)), question)
        asst = Segment(turn, "assistant", self._text_chunks(asst_pieces))
        incoming = user.num_tokens + asst.num_tokens
        if incoming + self.options.max_new_tokens + 64 > self.max_context_tokens:
            raise UsageError(
                f"one turn needs {incoming} tokens, too many for max_context_tokens={self.max_context_tokens}: "
                "raise `max_context_tokens` or lower the frame resolution"
            )
        if self.context_tokens + incoming + self.options.max_new_tokens > self.max_context_tokens:
            yield from self._evict(incoming)

        tp = time.perf_counter()
        logits = yield from self._prefill_turn(user, asst)
        prefill_s = time.perf_counter() - tp

        td = time.perf_counter()
        yield from self._answer(turn, t, started, logits, asst, must_reply)
        decode_s = time.perf_counter() - td
        yield TurnStats(turn, t, vision_s, prefill_s, decode_s, self.engine.decoder_calls - calls0, incoming,
                        self.context_tokens, self.max_context_tokens, kept, dropped)
        if self._reanchor is not None and self.context_tokens >= self.max_context_tokens // 2:
            self._prepare_eviction(2 * incoming + 64)

    def _prepare_eviction(self, budget_tokens: int) -> None:
        """This turn's share of the next eviction's re-prefill (reanchor.py); after the turn's events, so a
        reply's latency does not include it."""
        rest = self.segments[1:]
        budget = eviction_budget(self.max_context_tokens, self.segments[0].num_tokens)
        plan = predict_plan(rest, self.context_tokens, self.max_context_tokens, self.options.max_new_tokens, budget,
                            plan_eviction)
        self._reanchor.advance(self.segments, plan, lambda: [c for seg in self._kept_head(plan) for c in seg.chunks],
                               budget_tokens)

    def _kept_head(self, plan: tuple[int, int | None]) -> list[Segment]:
        """What an eviction with ``plan`` keeps before ``rest[start:]``: the system prompt, and the newest dropped
        question as text (its frames go) with the answer that followed it."""
        system, dropped = self.segments[0], self.segments[1:][:plan[0]]
        q_at = plan[1]
        if q_at is None:
            return [system]
        q = dropped[q_at]
        return [system, Segment(q.turn, "user", self._text_chunks(self.renderer.user([], q.question)), q.question),
                *dropped[q_at + 1:q_at + 2]]

    def finish(self) -> Iterator[Event]:
        """End of stream: confirm a provisional silence (one decoder call) or decode the reply it hid."""
        if not self._pending.verify:
            return
        mark = self.context.length, self.context.next_pos
        logits = self.context.prefill([Chunk(ids=tuple(self._pending.ids))], list(range(self._pending.verify - 1)))
        if (yield from self._resolve_speculation(logits, mark)):
            self._pending = _Pending()

    # ------------------------------------------------------------------ turn internals
    def _encode_frames(self, frames) -> tuple[list[Chunk], int, int]:
        if not frames:
            return [], 0, 0
        patches = np.concatenate([p for p, _ in frames])
        embeds = self.engine.encode_frames(patches, [g for _, g in frames])
        chunks, kept, dropped = [], 0, 0
        for whole in frames_to_chunks(embeds, [g for _, g in frames], self.manifest.vision.merge_size):
            grid, emb, n = whole.grid, whole.embeds, whole.num_tokens
            keep = self._drop_mask(grid, emb)
            self._prev_frame = (grid, emb)
            if keep is None:
                chunks.append(whole)
                kept += n
            else:
                chunks.append(Chunk(embeds=emb[keep], grid=grid, keep=keep))
                kept += int(keep.sum())
                dropped += n - int(keep.sum())
        return chunks, kept, dropped

    def _drop_mask(self, grid: tuple[int, int], emb: np.ndarray) -> np.ndarray | None:
        """TimeChat-Online-style visual token drop: drop tokens nearly identical to the same token of the
        previous frame (same grid only). At least one token is kept so every frame stays in the sequence."""
        thr = self.options.token_drop_threshold
        if thr is None or self._prev_frame is None or self._prev_frame[0] != grid:
            return None
        prev = self._prev_frame[1]
        num = (emb * prev).sum(-1)
        den = np.linalg.norm(emb, axis=-1) * np.linalg.norm(prev, axis=-1) + 1e-12
        sim = num / den
        keep = sim <= thr
        if not keep.any():
            keep[int(np.argmin(sim))] = True
        return keep

    def _text_chunks(self, pieces: Sequence[Piece]) -> list[Chunk]:
        return [Chunk(ids=tuple(p.ids)) for p in pieces]

    def _chunks(self, pieces: Sequence[Piece], frames: Iterator[Chunk]) -> list[Chunk]:
        return [next(frames) if isinstance(p, ImagePiece) else Chunk(ids=tuple(p.ids)) for p in pieces]

    def dialogue_ids(self) -> list[int]:
        """The whole dialogue as token ids (frames as image-pad ids; dropped visual tokens left out), including
        ids appended but not yet in the cache. For tests and debugging."""
        pad = self.manifest.tokens.image_pad
        return [i for s in self.segments for c in s.chunks
                for i in (c.ids if c.embeds is None else [pad] * c.num_tokens)]

    def _prefill_turn(self, user: Segment, asst: Segment):
        """Feed pending ids + the user turn + the assistant start in one decoder call; returns the last logits.
        (A generator: resolving a speculated silence may yield a late Reply.)"""
        pend = self._pending
        mark = self.context.length, self.context.next_pos
        chunks = ([Chunk(ids=tuple(pend.ids))] if pend.ids else []) + user.chunks + asst.chunks
        index = list(range(max(pend.verify - 1, 0))) + [sum(c.num_tokens for c in chunks) - 1]
        logits = self.context.prefill(chunks, index)
        if pend.verify and not (yield from self._resolve_speculation(logits[:-1], mark)):
            # the cache was rolled back into the previous turn's reply: prefill this turn again
            chunks = [Chunk(ids=tuple(self._pending.ids))] + user.chunks + asst.chunks
            logits = self.context.prefill(chunks)
        self._pending = _Pending()
        self.segments += [user, asst]
        return logits[-1]

    def _resolve_speculation(self, logits: np.ndarray, mark: tuple[int, int]):
        """Check a provisional ``NO REPLY``, fed from ``mark`` (the context's (length, next position) before it),
        against ``logits`` (one row per speculated token but the last). Returns True when confirmed; otherwise
        rolls the context back to the first wrong token, decodes the real reply of that turn, and returns False."""
        pend = self._pending
        spec = pend.ids[:pend.verify]
        wrong = next((i for i in range(len(spec) - 1) if int(np.argmax(logits[i])) != spec[i + 1]), None)
        if wrong is None:
            return True
        keep = wrong + 1  # speculated tokens the model did produce
        self.context.truncate(mark[0] + keep, mark[1] + keep)  # speculated ids are text: one position each
        asst = self.segments[-1]
        asst.chunks.pop()  # the speculated "NO REPLY<|im_end|>\n"
        self._pending = _Pending()
        yield from self._decode(pend.turn, pend.t, pend.started, spec[:keep], int(np.argmax(logits[wrong])), asst,
                                must_reply=False)
        return False

    def _answer(self, turn: int, t: float, started: float, logits: np.ndarray, asst: Segment, must_reply: bool):
        first = self._pick(logits)
        nr = self._no_reply_ids
        speculate = (self.options.speculate_silence and self.options.temperature == 0 and not must_reply
                     and nr and first == nr[0] and self.options.max_new_tokens >= len(nr) + 1)
        if speculate:
            spec = list(nr) + [self.manifest.tokens.im_end]
            self._pending = _Pending(ids=spec + self._nl_ids, verify=len(spec), turn=turn, t=t, started=started)
            asst.chunks.append(Chunk(ids=tuple(self._pending.ids)))
            yield Silence(turn, t)
            return
        yield from self._decode(turn, t, started, [], first, asst, must_reply)

    def _decode(self, turn: int, t: float, started: float, generated: list[int], token: int, asst: Segment,
                must_reply: bool):
        """Greedy/sampled decoding from ``token`` (not yet in the cache) until a stop token or the budget.
        The closing ids (<|im_end|>\\n) are left pending for the next prefill."""
        generated = list(generated)
        shown = ""
        im_end = self.manifest.tokens.im_end
        while True:
            if token in self._eos:
                closing = [token] + ([im_end] if token != im_end else [])
                break
            generated.append(token)
            text = self._text(generated)
            if not text.endswith("\ufffd"):  # hold back an incomplete multi-byte character
                yield TokenDelta(turn, t, text[len(shown):], token)
                shown = text
            if len(generated) >= self.options.max_new_tokens or self._cancel.is_set():
                closing = [token, im_end]  # the last token is not in the cache yet
                break
            token = self._pick(self.context.decode(token))
        self._pending = _Pending(ids=closing + self._nl_ids)
        in_cache = generated[:-1] if closing[0] not in self._eos else generated
        asst.chunks.append(Chunk(ids=tuple(in_cache) + tuple(self._pending.ids)))
        text = self._text(generated)
        if not text.strip() or text.strip() == self.manifest.prompt.no_reply_text:
            yield Silence(turn, t)  # an empty reply, or NO REPLY even after a must-reply prefill, says nothing
        else:
            yield Reply(turn, t, text, tuple(generated), time.perf_counter() - started)

    def _pick(self, logits: np.ndarray) -> int:
        o = self.options
        if o.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / o.temperature
        if o.top_k > 0:
            cut = np.partition(z, -o.top_k)[-o.top_k]
            z = np.where(z >= cut, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(self._rng.choice(len(p), p=p))

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ bounded memory
    def _evict(self, incoming: int):
        """Drop the oldest turns and re-prefill the kept window from position 0.

        Kept: the system prompt; the newest turns that fit in half the budget; and the text of the newest
        question if its turn fell out (its frames go). Re-anchoring at position 0 keeps positions inside the
        range the model was trained on, however long the stream runs. Cost: one prefill of the kept window
        (about half the context, in slices of ``REPREFILL_CHUNK`` tokens so the attention scores stay small)
        every ~half-context tokens of stream.
        """
        if self._pending.verify:  # settle a provisional silence first: it becomes part of the kept history
            yield from self.finish()
        t0 = time.perf_counter()
        before = self.context_tokens
        system, rest = self.segments[0], self.segments[1:]
        plan = plan_eviction(rest, eviction_budget(self.max_context_tokens, system.num_tokens))
        kept = self._kept_head(plan) + list(rest[plan[0]:])
        shadow = self._reanchor.take(plan) if self._reanchor is not None else None
        # In slices: one call over the whole window would build (window x window) attention scores at once.
        if shadow is None:
            self.context.reset()
            self.context.prefill([c for s in kept for c in s.chunks], slice_tokens=REPREFILL_CHUNK)
        else:  # the shadow holds the kept window but its newest segments: swap, feed those
            ctx, fed = shadow
            self.context, self._reanchor.ctx = ctx, self.context
            missing = [c for s in rest[plan[0] + fed:] for c in s.chunks]
            if missing:
                self.context.prefill(missing, slice_tokens=REPREFILL_CHUNK)
        if self._reanchor is not None:
            self._reanchor.reset()
        self.segments = kept
        self._pending = _Pending()
        yield Evicted(self.turn - 1, self._t, before - self.context_tokens, self.context_tokens,
                      time.perf_counter() - t0)
