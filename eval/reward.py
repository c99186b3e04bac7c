"""MMDuet2's multi-turn RL reward for one dialogue (one scalar per trajectory), with an offline judge.

    r = 3 r_PAUC + 2 r_rep + 0.5 r_outspan + 2 r_pfx      (the weights MMDuet2 ran with; ../shared/RL-NOTES.md)

- r_PAUC: for every gold answer span [s, e] that has started by the last turn, the model's replies inside it
  (``NO REPLY`` is silence; a reply whose text equals an earlier reply of the dialogue is skipped), each scored
  alone by the judge on the paper's 0-4 scale. The area under a step line that starts at 0.5 and jumps to y_k at
  x'_k = (t_k - s)(1 - w), w = 0.5, up to e - s, over (e - s) * 4; the mean over spans::

      y=4 ┤      ┌───────────── a perfect reply half-way in: (0.5 * 1/4 + 4 * 3/4) / 4 = 0.781
          │      │
      0.5 ┼──────┘            silence: 0.125; perfect at s: 1.0; perfect at e: 0.5625; a 0 at s: 0.0
          └──────┴────────────┴─
          s     x'            e - s

  It is eval/pauc.py's step line with the reward's scale (max 4, start 0.5) and one judgement per reply rather
  than of the accumulated replies. The strict judge's 0/1/2 map to 0/2/4 (wrong/partial/complete); an LLM judge on
  MMDuet2's 5-point rubric would give 0-4 directly.
- r_rep = - mean over replies of "already covered by an earlier reply" (earlier: the context's ground-truth
  replies, then the dialogue's own; an exact repeat is a yes without asking the judge).
- r_outspan = - replies at turns outside every gold span / turns outside every gold span.
- r_pfx = - the fraction of turns whose reply shares a prefix of ``prefix_chars`` (50) characters with an earlier
  reply.

:func:`trajectory_reward` is the typed entry point (edge-duet's trainer calls it); :func:`compute_score` wraps it in
verl's custom-reward signature (``custom_reward_function.path`` = this file, ``.name`` = ``compute_score``) with
the gold as a JSON string in ``ground_truth`` (:func:`ground_truth_json` writes it) and the per-turn replies in
``extra_info["turn_replies"]`` or, failing that, read from the chat transcript in ``solution_str``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

# absolute imports: verl loads this file by path (custom_reward_function.path), outside its package
from edge_duet.eval.judges import Judge, StrictJudge
from edge_duet.eval.pauc import MAX_SCORE, in_span, pauc_span
from edge_duet.eval.textnorm import normalise
from edge_duet.protocol import MUST_REPLY_PREFIX as _MUST_REPLY_LINE
from edge_duet.protocol import NO_REPLY

MUST_REPLY_PREFIX = _MUST_REPLY_LINE.rstrip()  # a sampled reply may go on on the same line
REWARD_MAX_SCORE = 4.0  # the paper's judge scale: a 5-point rubric minus one
REWARD_START_SCORE = 0.5


@dataclass(frozen=True)
class RewardWeights:
    """The weights of the four terms (MMDuet2's run by default) and the term's parameters."""

    pauc: float = 3.0
    rep: float = 2.0
    outspan: float = 0.5
    pfx: float = 2.0
    omega: float = 0.5  # time compression w: x' = (t - s)(1 - w)
    prefix_chars: int = 50

    def check(self) -> "RewardWeights":
        from edge_duet.errors import UsageError

        for name in ("pauc", "rep", "outspan", "pfx"):
            if getattr(self, name) < 0:
                raise UsageError(f"reward weight {name} must be >= 0 (each term is a reward or a penalty by "
                                 f"construction), got {getattr(self, name)}")
        if not 0.0 <= self.omega < 1.0:
            raise UsageError(f"the reward's omega must be within [0, 1), got {self.omega}; MMDuet2 uses 0.5")
        if self.prefix_chars < 1:
            raise UsageError(f"prefix_chars must be at least 1, got {self.prefix_chars}")
        return self


@dataclass(frozen=True)
class SpanGold:
    answer: str
    span_s: tuple[float, float]  # the reply span [s, e]


@dataclass(frozen=True)
class RewardBreakdown:
    total: float
    pauc: float  # r_PAUC in [0, 1]
    rep: float  # r_rep in [-1, 0]
    outspan: float  # r_outspan in [-1, 0]
    pfx: float  # r_pfx in [-1, 0]
    n_replies: int
    n_spans: int
    span_pauc: tuple[float, ...] = field(default=())


def reply_text(raw: str) -> str | None:
    """The reply a turn's generated text says, or None for silence (``NO REPLY``, or nothing)."""
    text = raw.strip()
    if text.startswith(MUST_REPLY_PREFIX):
        text = text[len(MUST_REPLY_PREFIX):].strip()
    if not text or normalise(text) == normalise(NO_REPLY):
        return None
    return text


def trajectory_reward(
    turn_times_s: Sequence[float],
    turn_replies: Sequence[str],
    spans: Sequence[SpanGold],
    question: str = "",
    context_replies: Sequence[str] = (),
    weights: RewardWeights = RewardWeights(),
    judge: Judge | None = None,
) -> RewardBreakdown:
    """The reward of one dialogue: its turns' times and generated texts (``NO REPLY`` included) and the gold."""
    if len(turn_times_s) != len(turn_replies):
        raise ValueError(f"{len(turn_times_s)} turn times for {len(turn_replies)} turn replies")
    judge = judge if judge is not None else StrictJudge()
    scale = REWARD_MAX_SCORE / MAX_SCORE  # every Judge scores 0/1/2 (eval/judges.py): onto the paper's 0-4
    replies = [(t, r) for t, raw in zip(turn_times_s, turn_replies) if (r := reply_text(raw)) is not None]
    last_t = max(turn_times_s) if len(turn_times_s) else 0.0

    # r_PAUC: exact repeats of an earlier reply (in the whole dialogue) add no step
    first_said: dict[str, int] = {}
    for k, (_, r) in enumerate(replies):
        first_said.setdefault(normalise(r), k)
    started = [g for g in spans if g.span_s[0] <= last_t + 1e-6]
    span_values = []
    for g in started:
        points = []
        for k, (t, r) in enumerate(replies):
            if in_span(t, g.span_s) and first_said[normalise(r)] == k:
                score = judge.score(question, g.answer, [r]).score
                points.append((t, None if score is None else score * scale))
        span_values.append(pauc_span(g.span_s, points, weights.omega, REWARD_MAX_SCORE, REWARD_START_SCORE))
    r_pauc = sum(span_values) / len(span_values) if span_values else 0.0

    # r_rep: each reply against everything said before it (context first)
    dup = 0
    earlier = [c for c in (reply_text(x) for x in context_replies) if c is not None]
    for _, r in replies:
        if earlier:
            exact = normalise(r) in {normalise(e) for e in earlier}
            dup += exact or bool(judge.is_duplicate(tuple(dict.fromkeys(earlier)), r).score)
        earlier.append(r)
    r_rep = -dup / len(replies) if replies else 0.0

    # r_outspan: replies at turns outside every span, over such turns
    outside = [not any(in_span(t, g.span_s) for g in spans) for t in turn_times_s]
    said_outside = sum(not any(in_span(t, g.span_s) for g in spans) for t, _ in replies)
    r_out = -said_outside / sum(outside) if sum(outside) else 0.0

    # r_pfx: turns whose reply opens with the same prefix_chars characters as an earlier reply
    n = weights.prefix_chars
    prefixes = [r[:n] for r in (reply_text(x) for x in context_replies) if r is not None and len(r) >= n]
    shared = 0
    for _, r in replies:
        if len(r) >= n and r[:n] in prefixes:
            shared += 1
        if len(r) >= n:
            prefixes.append(r[:n])
    r_pfx = -shared / len(turn_replies) if len(turn_replies) else 0.0

    total = weights.pauc * r_pauc + weights.rep * r_rep + weights.outspan * r_out + weights.pfx * r_pfx
    return RewardBreakdown(total, r_pauc, r_rep, r_out, r_pfx, len(replies), len(started), tuple(span_values))


# ------------------------------------------------------------------------------------------- verl's hook

_ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?)(?:<\|im_end\|>|$)", re.S)


def ground_truth_json(turn_times_s: Sequence[float], spans: Sequence[SpanGold], question: str = "",
                      context_replies: Sequence[str] = ()) -> str:
    """The ``ground_truth`` string :func:`compute_score` reads (one row of a verl dataset's reward_model field)."""
    return json.dumps({
        "turn_times_s": [float(t) for t in turn_times_s],
        "answers": [{"content": g.answer, "reply_timespan": [g.span_s[0], g.span_s[1]]} for g in spans],
        "question": question, "context_replies": list(context_replies),
    })


def _parse_ground_truth(ground_truth: str | Mapping) -> dict:
    try:
        gt = json.loads(ground_truth) if isinstance(ground_truth, str) else dict(ground_truth)
        gt["spans"] = [SpanGold(a["content"], (float(a["reply_timespan"][0]), float(a["reply_timespan"][1])))
                       for a in gt.get("answers", [])]
        gt["turn_times_s"] = [float(t) for t in gt["turn_times_s"]]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"ground_truth is not edge-duet's reward JSON (turn_times_s, answers with content and "
                         f"reply_timespan; see eval.reward.ground_truth_json): {exc}") from None
    return gt


def compute_score(data_source, solution_str: str, ground_truth, extra_info: Mapping | None = None) -> dict:
    """verl's custom reward function: the trajectory reward of one multi-turn rollout.

    ``solution_str``: the decoded rollout with its chat markers (each ``<|im_start|>assistant\\n...<|im_end|>`` is
    one turn's reply), used when ``extra_info`` has no ``turn_replies``. ``extra_info`` may also carry
    ``weights`` (a dict of :class:`RewardWeights` fields). Returns verl's dict form: ``score`` plus each term.
    """
    del data_source  # one task: the reward does not depend on the dataset's name
    info = dict(extra_info or {})
    gt = _parse_ground_truth(ground_truth)
    replies = info.get("turn_replies")
    if replies is None:
        replies = [m.group(1) for m in _ASSISTANT.finditer(solution_str)]
    if len(replies) != len(gt["turn_times_s"]):
        raise ValueError(f"the rollout has {len(replies)} assistant turns but the ground truth {len(gt['turn_times_s'])} "
                         "turn times: decode the rollout with special tokens (skip_special_tokens=False) or pass "
                         "extra_info['turn_replies']")
    weights = RewardWeights(**info.get("weights", {}))
    b = trajectory_reward(gt["turn_times_s"], replies, gt["spans"], gt.get("question", ""),
                          gt.get("context_replies", ()), weights)
    return {"score": b.total, "pauc": b.pauc, "rep": b.rep, "outspan": b.outspan, "pfx": b.pfx,
            "n_replies": b.n_replies}
