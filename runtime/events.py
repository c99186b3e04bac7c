"""What a :class:`~edge_duet.runtime.session.Session` tells the world, as frozen dataclasses.

``Session.step()`` yields these in order. A UI shows ``TokenDelta`` as it comes, speaks a ``Reply`` when it is
final, and reads ``TurnStats`` for its status line. Every event carries the turn index and the video time
``t`` (seconds) of the turn it belongs to; because silence is confirmed one turn late (see
``Session`` docs), a ``Reply`` for turn N may arrive while turn N+1 is being processed: trust its ``turn``/``t``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Event:
    turn: int
    t: float

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        return {"event": _KIND_NAMES[type(self)], **asdict(self)}


@dataclass(frozen=True)
class TurnStarted(Event):
    """A user turn was added to the context: ``n_frames`` new frames and maybe a question."""

    n_frames: int
    question: str | None = None
    must_reply: bool = False


@dataclass(frozen=True)
class TokenDelta(Event):
    """New reply text as it is decoded (may be an empty string while a multi-byte character is incomplete)."""

    text: str
    token_id: int


@dataclass(frozen=True)
class Reply(Event):
    """A finished reply (never ``NO REPLY``). ``text`` and ``token_ids`` are what the model generated: a
    must-reply prefill (``I must reply.\\n``) is part of the dialogue but not of the reply."""

    text: str
    token_ids: tuple[int, ...]
    latency_s: float  # from the start of the turn's processing to the last token


@dataclass(frozen=True)
class Silence(Event):
    """The model answered ``NO REPLY`` for this turn (provisional until the next turn confirms it;
    a later ``Reply`` with the same ``turn`` replaces it)."""


@dataclass(frozen=True)
class TurnStats(Event):
    """Cost of one turn. Times in seconds; ``decoder_calls`` counts every decoder graph run in the turn."""

    vision_s: float
    prefill_s: float
    decode_s: float
    decoder_calls: int
    new_tokens: int
    context_tokens: int
    max_context_tokens: int
    visual_tokens_kept: int
    visual_tokens_dropped: int


@dataclass(frozen=True)
class Evicted(Event):
    """The context was full: old turns were dropped and the kept window re-prefilled."""

    removed_tokens: int
    kept_tokens: int
    reprefill_s: float


_KIND_NAMES = {
    TurnStarted: "turn",
    TokenDelta: "token",
    Reply: "reply",
    Silence: "silence",
    TurnStats: "stats",
    Evicted: "evicted",
}
