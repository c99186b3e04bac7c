"""Eviction without a stall: the window the next eviction will keep, prefilled a slice per turn beside the live cache.

Eviction (``Session._evict``) keeps the system prompt, the newest whole turns that fit in half the budget and the
text of the newest dropped question, and re-prefills them from position 0: done all at once, the turn that evicts
pays for about half a context of prefill (seconds at 8k tokens). The kept window is a prefix-closed sequence of
segments that already exist before the eviction, so it can be built ahead of time in a second :class:`Context`::

    live context:   [system | t0 | t1 | ... | t40 | t41 | t42 ]   <- turns keep landing here
    shadow context: [system | q text, answer | t30 | t31 | ... ]   <- a few segments per turn, from position 0
                                                         at the eviction: swap, then prefill only the newest turns

Each turn predicts which segment the next eviction will start at (``plan_eviction`` on the dialogue plus the
turns that still fit, each the size of the last one). While the prediction holds, the shadow grows by up to a
token budget per turn, never taking the newest turn (a provisional silence may still change it). At the
eviction the plan actually computed is compared with the shadow's: equal, the shadow becomes the live context and
only the segments it lacks are prefilled; different (a reply or a question changed the sizes), the shadow is
dropped and the whole window is re-prefilled as before. Either way the cache then holds exactly the kept window
from position 0, so the output is that of plain eviction. Memory: one more cache of the context budget.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Sequence

from .context import Context


def predict_plan(rest: Sequence, context_tokens: int, max_context_tokens: int, max_new_tokens: int, budget: int,
                 planner: Callable) -> tuple[int, int | None] | None:
    """The (start, q_at) the next eviction will compute if every coming turn is the size of the last one;
    None when the dialogue has no complete turn yet."""
    if len(rest) < 2:
        return None
    user, asst = rest[-2], rest[-1]
    pair = user.num_tokens + asst.num_tokens
    incoming = user.num_tokens + asst.chunks[0].num_tokens  # the user turn and the assistant start
    future, tokens = 0, context_tokens
    while tokens + incoming + max_new_tokens <= max_context_tokens and future < 10_000:
        tokens += pair
        future += 1
    fake = [SimpleNamespace(num_tokens=n, role=r, question=None)
            for _ in range(future) for n, r in ((user.num_tokens, "user"), (asst.num_tokens, "assistant"))]
    return planner(list(rest) + fake, budget)


class Reanchor:
    """The shadow context and how far it got (see the module docstring)."""

    def __init__(self, engine, capacity: int):
        self.engine = engine
        self.capacity = capacity
        self.ctx: Context | None = None  # allocated at first use, then reused
        self.swaps = 0  # evictions served by the shadow
        self.misses = 0  # evictions whose plan differed from the shadow's (full re-prefill)
        self.reset()

    def reset(self) -> None:
        self.plan: tuple[int, int | None] | None = None
        self.head_fed = False
        self.fed = 0  # segments of rest[plan.start:] in the shadow
        if self.ctx is not None:
            self.ctx.reset()

    def advance(self, segments: Sequence, plan: tuple[int, int | None] | None, head: Callable[[], list],
                budget_tokens: int) -> int:
        """One turn's share of the work: restart if ``plan`` changed, then feed whole stable segments (all but
        the newest turn) until ``budget_tokens`` are spent. ``head()``: the chunks before ``rest[start:]`` (the
        system prompt, and the kept question's text and answer). Returns the tokens fed."""
        if plan != self.plan:
            self.reset()
            self.plan = plan
        if plan is None:
            return 0
        if self.ctx is None:
            self.ctx = Context(self.engine, self.capacity)
        fed_tokens = 0
        if not self.head_fed:
            chunks = head()
            self.ctx.prefill(chunks)
            fed_tokens += sum(c.num_tokens for c in chunks)
            self.head_fed = True
        rest = segments[1:]
        stable = len(rest) - 2
        while plan[0] + self.fed < stable and fed_tokens < budget_tokens:
            seg = rest[plan[0] + self.fed]
            self.ctx.prefill(seg.chunks)
            fed_tokens += seg.num_tokens
            self.fed += 1
        return fed_tokens

    def take(self, plan: tuple[int, int | None]) -> tuple[Context, int] | None:
        """At an eviction that computed ``plan``: the shadow context and the number of ``rest[start:]`` segments it
        holds when it was built for that plan; None (counted as a miss) when it was not."""
        if self.plan == plan and self.head_fed and self.ctx is not None:
            self.swaps += 1
            return self.ctx, self.fed
        if self.plan is not None:
            self.misses += 1
        return None
