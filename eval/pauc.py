"""PAUC (ProactiveVideoQA, arXiv 2507.09313), the metric itself: pure arithmetic on judged reply times.

For one gold answer with reply span [t0, t1] and the model's replies in it at τ1 <= ... <= τP, each scored
s_p in {0, 1, 2} (the judge scores the *accumulated* replies up to τp), the score is the area under a step line::

      S=2 ┤            ┌──────────── s_3 = 2
          │      ┌─────┘ s_2 = 1
      0.5 ┼──────┤
        0 ┤      └ s_1 = 0   (a wrong reply pulls the line below the 0.5 start)
          └──────┴─────┴─────────────┴──
          t0     τ1    τ2            t1

    PAUC = [ (τ1 - t0)·0.5 + Σ_{p<P} (τ_{p+1} - τ_p)·s_p + (t1 - τP)·s_P ] / [ (t1 - t0)·S ]

after moving every reply time to t0 + (1 - ω)(τ - t0) (ω = timeliness weight: 0 keeps the times, 1 puts every
reply at t0 so only the final accumulated score counts). Silence scores 0.5 / 2 = 0.25.

Edge handling (our decision): a reply belongs to a span when t0 <= τ <= t1, *closed* at both ends. The paper's
text writes strict inequalities, but the released ProactiveVideoQA evaluator and the MMDuet2 reward select replies
with ``t0 <= time <= t1``, and the closed reading is the only one under which PAUC is continuous in the reply
time (a reply at t0 + ε and one at t0 score the same; one at t1 still counts after the ω shift moves it inside).
Reply times within ``EDGE_TOLERANCE_S`` of an edge count as on it (turn times are products like 3 x 0.1 s, and
0.30000000000000004 should not fall out of a span ending at 0.3).
"""

from __future__ import annotations

from typing import Sequence

MAX_SCORE = 2  # S: judge scores are 0, 1, 2
START_SCORE = 0.5  # height of the line before the first reply
DEFAULT_OMEGA = 0.5
EDGE_TOLERANCE_S = 1e-6


def in_span(time_s: float, span_s: tuple[float, float]) -> bool:
    """Whether a reply at ``time_s`` counts for the answer span ``span_s`` (closed interval, see module doc)."""
    return span_s[0] - EDGE_TOLERANCE_S <= time_s <= span_s[1] + EDGE_TOLERANCE_S


def shift_time(time_s: float, t0: float, omega: float) -> float:
    """The timeliness shift: τ -> t0 + (1 - ω)(τ - t0)."""
    return t0 + (1.0 - omega) * (time_s - t0)


def check_omega(omega: float) -> float:
    from edge_duet.errors import UsageError

    if not 0.0 <= omega <= 1.0:
        raise UsageError(f"omega (the timeliness weight) must be within [0, 1], got {omega}; 0.5 is the default")
    return float(omega)


def step_line(
    span_s: tuple[float, float],
    points: Sequence[tuple[float, int | None]],
    omega: float = DEFAULT_OMEGA,
    start_score: float = START_SCORE,
) -> list[tuple[float, float]]:
    """The step line as breakpoints [(x, height from x on)], x already ω-shifted, starting at (t0, 0.5).

    ``points`` are (reply time, judge score of the accumulated replies) for the replies in the span; a score of
    None (the judge's answer could not be parsed) adds no step, so the line keeps its previous height there.
    Points are sorted by time here (stable for equal times: the later one in input order wins).
    """
    t0, t1 = span_s
    steps = [(t0, float(start_score))]
    for time_s, score in sorted(points, key=lambda p: p[0]):
        if score is None:
            continue
        if not in_span(time_s, span_s):
            raise ValueError(f"reply time {time_s} lies outside the span [{t0}, {t1}]")
        time_s = min(max(time_s, t0), t1)  # within the edge tolerance
        steps.append((shift_time(time_s, t0, omega), float(score)))
    return steps


def pauc_span(
    span_s: tuple[float, float],
    points: Sequence[tuple[float, int | None]],
    omega: float = DEFAULT_OMEGA,
    max_score: float = MAX_SCORE,
    start_score: float = START_SCORE,
) -> float:
    """PAUC of one answer span as a fraction in [0, 1] (multiply by 100 to report)."""
    t0, t1 = span_s
    if not t1 > t0:
        raise ValueError(f"an answer span needs t1 > t0, got [{t0}, {t1}]")
    check_omega(omega)
    steps = step_line(span_s, points, omega, start_score)
    # integrate the right-continuous step function over [t0, t1]: each height holds until the next breakpoint
    area = 0.0
    for (x, height), (x_next, _) in zip(steps, steps[1:] + [(t1, 0.0)]):
        area += (x_next - x) * height
    return area / ((t1 - t0) * max_score)


def mean_pauc_percent(values: Sequence[float]) -> float | None:
    """Mean over answer spans, x100 as published; None when there is no span."""
    return 100.0 * sum(values) / len(values) if values else None


def duplicate_percent(n_duplicates: int, n_candidates: int) -> float:
    """Duplicate replies / replies that could be duplicates (all in-span replies but the first of each span), x100.

    0.0 when no span has a second reply, as in the published tables.
    """
    return 100.0 * n_duplicates / n_candidates if n_candidates else 0.0
