"""PAUC and duplicate proportion on hand-made cases, the published worked example, and a property test against an
independent transcription of the published formula (and a brute-force integral)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_duet.errors import UsageError
from edge_duet.eval.baselines import every_turn_predictions, silent_predictions, turn_times
from edge_duet.eval.evaluator import evaluate
from edge_duet.eval.formats import GoldAnswer, GoldExample, Prediction, Reply
from edge_duet.eval.judges import Judgement, OverlapJudge
from edge_duet.eval.pauc import duplicate_percent, in_span, pauc_span, step_line

# ------------------------------------------------------------------------------------------------ the formula


def test_published_worked_example():
    # span [311, 360], replies at 312, 328, 344, 352 scored 0, 1, 2, 2, omega = 0: 48.5 / 98
    value = pauc_span((311, 360), [(312, 0), (328, 1), (344, 2), (352, 2)], omega=0)
    assert value == pytest.approx(48.5 / 98, abs=1e-12)
    assert round(value, 3) == 0.495


@pytest.mark.parametrize("omega", [0.0, 0.25, 0.5, 1.0])
def test_silence_is_a_quarter(omega):
    assert pauc_span((3.1, 6.0), [], omega) == pytest.approx(0.25)


def test_wrong_reply_lowers_the_line_below_half():
    # a 0 at t=2 in [0, 10] at omega 0: 2 s at 0.5 then 8 s at 0 -> 1 / 20
    assert pauc_span((0, 10), [(2, 0)], omega=0) == pytest.approx(0.05)
    assert pauc_span((0, 10), [(2, 0)], omega=0) < pauc_span((0, 10), [], omega=0)


def test_omega_zero_and_one():
    points = [(312, 0), (328, 1), (344, 2), (352, 1)]
    # omega = 1: every reply moves to t0, only the final accumulated score counts
    assert pauc_span((311, 360), points, omega=1) == pytest.approx(1 / 2)
    assert pauc_span((311, 360), points[:3], omega=1) == pytest.approx(1.0)
    # omega = 0: times as they are
    expected = (1 * 0.5 + 16 * 0 + 16 * 1 + 8 * 2 + 8 * 1) / 98
    assert pauc_span((311, 360), points, omega=0) == pytest.approx(expected)
    # omega = 0.5 halves every delay: reply at 312 -> 311.5, ...
    half = (0.5 * 0.5 + 8 * 0 + 8 * 1 + 4 * 2 + (360 - 331.5) * 1) / 98
    assert pauc_span((311, 360), points, omega=0.5) == pytest.approx(half)


def test_span_edges_are_closed():
    # our reading (module doc of eval.pauc): t0 <= tau <= t1, as the released evaluator selects replies
    assert in_span(2.0, (2.0, 6.0)) and in_span(6.0, (2.0, 6.0))
    assert not in_span(6.0 + 1e-3, (2.0, 6.0)) and not in_span(2.0 - 1e-3, (2.0, 6.0))
    assert in_span(0.1 * 3, (0.1, 0.3))  # float noise from turn-time arithmetic stays on the edge
    assert pauc_span((0.1, 0.3), [(0.1 * 3, 2)], omega=0) == pytest.approx(0.25)
    assert pauc_span((2, 6), [(2, 2)], omega=0) == pytest.approx(1.0)  # a right reply at t0: full marks
    assert pauc_span((2, 6), [(6, 2)], omega=0) == pytest.approx(0.25)  # at t1 and omega 0: zero width
    # at t1 with omega 0.5 it moves to the middle of the span: 2 s at 0.5, 2 s at 2 -> 5 / 8
    assert pauc_span((2, 6), [(6, 2)], omega=0.5) == pytest.approx(0.625)


def test_unparsed_scores_add_no_step_and_equal_times_keep_input_order():
    assert pauc_span((0, 10), [(2, None), (4, 2)], omega=0) == pauc_span((0, 10), [(4, 2)], omega=0)
    assert pauc_span((0, 10), [(4, 0), (4, 2)], omega=0) == pytest.approx((4 * 0.5 + 6 * 2) / 20)


def test_bad_inputs():
    with pytest.raises(ValueError):
        pauc_span((5, 5), [])
    with pytest.raises(ValueError):
        step_line((0, 10), [(11, 2)])
    with pytest.raises(UsageError):
        pauc_span((0, 10), [], omega=1.5)


def transcription(t0, t1, times, scores, omega, S=2):
    """PROTOCOL.md's formula, term by term, after the omega shift."""
    tau = [t0 + (1 - omega) * (t - t0) for t in times]
    P = len(tau)
    if P == 0:
        return 0.5 * (t1 - t0) / ((t1 - t0) * S)
    total = (tau[0] - t0) * 0.5
    for p in range(P - 1):
        total += (tau[p + 1] - tau[p]) * scores[p]
    total += (t1 - tau[P - 1]) * scores[P - 1]
    return total / ((t1 - t0) * S)


def brute_force(t0, t1, times, scores, omega, n=4000, S=2):
    """Midpoint-rule integral of the step function, evaluated pointwise."""
    shifted = [t0 + (1 - omega) * (t - t0) for t in times]
    width = (t1 - t0) / n
    area = 0.0
    for i in range(n):
        x = t0 + (i + 0.5) * width
        height = 0.5
        for tau, s in zip(shifted, scores):
            if tau <= x:
                height = s
        area += height * width
    return area / ((t1 - t0) * S)


@st.composite
def cases(draw):
    t0 = draw(st.floats(0, 500, allow_nan=False))
    length = draw(st.floats(0.5, 120, allow_nan=False))
    t1 = t0 + length
    fractions = sorted(draw(st.lists(st.floats(0, 1), max_size=8)))
    times = [t0 + f * length for f in fractions]
    scores = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=len(times), max_size=len(times)))
    omega = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)))
    return t0, t1, times, scores, omega


@settings(max_examples=300, deadline=None)
@given(cases())
def test_matches_the_published_formula(case):
    t0, t1, times, scores, omega = case
    ours = pauc_span((t0, t1), list(zip(times, scores)), omega)
    assert ours == pytest.approx(transcription(t0, t1, times, scores, omega), abs=1e-9)
    assert -1e-12 <= ours <= 1.0 + 1e-12  # a sum of areas: exact 1.0 may round to 1.0000000000000002


@settings(max_examples=40, deadline=None)
@given(cases())
def test_matches_a_brute_force_integral(case):
    t0, t1, times, scores, omega = case
    ours = pauc_span((t0, t1), list(zip(times, scores)), omega)
    # each breakpoint can misplace at most one cell of the grid
    assert ours == pytest.approx(brute_force(t0, t1, times, scores, omega), abs=2 * (len(times) + 1) / 4000)


# ------------------------------------------------------------------------------------------------ evaluate()


def example(qid="q", spans=((2.0, 6.0),), answers=None, subset="all", duration=20.0, question="What appears?"):
    answers = answers or ["A red circle appeared."] * len(spans)
    return GoldExample(qid, question, tuple(GoldAnswer(a, s) for a, s in zip(answers, spans)), subset, duration)


def pred(qid, *replies, turns=()):
    return Prediction(qid, tuple(Reply(t, c) for t, c in replies), tuple(turns))


class ScriptedJudge:
    """Scores from a table keyed by the accumulated replies; records what it was asked."""

    id = "scripted"
    cacheable = False
    max_workers = 1

    def __init__(self, scores, duplicates=None):
        self.scores, self.duplicates = scores, duplicates or {}
        self.asked = []

    def score(self, question, answer, replies):
        self.asked.append(("score", tuple(replies)))
        return Judgement(self.scores.get(tuple(replies)), "scripted")

    def is_duplicate(self, earlier, reply):
        self.asked.append(("duplicate", tuple(earlier), reply))
        return Judgement(self.duplicates.get(reply, 0), "scripted")


def test_evaluate_reproduces_the_worked_example_through_the_judge():
    replies = [(312, "r1"), (328, "r2"), (344, "r3"), (352, "r4")]
    judge = ScriptedJudge({("r1",): 0, ("r1", "r2"): 1, ("r1", "r2", "r3"): 2, ("r1", "r2", "r3", "r4"): 2})
    report = evaluate([example(spans=[(311, 360)], duration=400)], [pred("q", *replies)], judge, omega=0)
    assert report.overall.pauc == pytest.approx(100 * 48.5 / 98)
    # the judge saw the accumulated replies, not each reply alone
    assert [a[1] for a in judge.asked if a[0] == "score"] == [("r1",), ("r1", "r2"), ("r1", "r2", "r3"),
                                                                ("r1", "r2", "r3", "r4")]  # fmt: skip


def test_silence_everywhere_scores_25():
    gold = [example("a", spans=[(0, 4), (5, 9)]), example("b", spans=[(1, 30)], subset="ego")]
    report = evaluate(gold, [], OverlapJudge())
    assert report.overall.pauc == pytest.approx(25.0)
    assert report.subset("ego").pauc == pytest.approx(25.0)
    assert report.missing_predictions == ("a", "b")
    silent = evaluate(gold, silent_predictions(gold), OverlapJudge())
    assert silent.overall.pauc == pytest.approx(25.0) and not silent.missing_predictions


def test_replies_outside_every_span_count_as_silence_and_are_counted():
    gold = [example(spans=[(2, 6), (10, 12)])]
    report = evaluate(gold, [pred("q", (1.0, "A red circle appeared."), (8, "A red circle appeared."))])
    assert report.overall.pauc == pytest.approx(25.0)
    assert report.overall.n_replies == 2 and report.overall.n_replies_in_span == 0
    assert report.overall.n_replies_out_of_span == 2


def test_reply_at_a_span_edge():
    gold = [example(spans=[(2, 6)])]
    at_end = evaluate(gold, [pred("q", (6.0, "A red circle appeared."))], omega=0.5)
    assert at_end.overall.pauc == pytest.approx(62.5) and at_end.overall.n_replies_in_span == 1
    past_end = evaluate(gold, [pred("q", (6.001, "A red circle appeared."))], omega=0.5)
    assert past_end.overall.pauc == pytest.approx(25.0) and past_end.overall.n_replies_in_span == 0
    at_start = evaluate(gold, [pred("q", (2.0, "A red circle appeared."))], omega=0)
    assert at_start.overall.pauc == pytest.approx(100.0)


def test_a_wrong_reply_keeps_costing_after_the_right_one():
    gold = [example(spans=[(0, 10)])]
    right = evaluate(gold, [pred("q", (4, "A red circle appeared."))], omega=0)
    replies = [(2, "A blue circle appeared."), (4, "A red circle appeared.")]
    wrong_then_right = evaluate(gold, [pred("q", *replies)], omega=0)
    # right only: 4 s at 0.5 then 6 s at 2; wrong first: 2 s at 0.5, then 0 (the strict judge: the blue stays said)
    assert right.overall.pauc == pytest.approx(100 * (4 * 0.5 + 6 * 2) / 20)
    assert wrong_then_right.overall.pauc == pytest.approx(100 * (2 * 0.5) / 20)
    # the overlap judge caps a wrong colour at 1: 2 s at 0.5, 2 s at 1, then only 1
    lenient = evaluate(gold, [pred("q", *replies)], OverlapJudge(), omega=0)
    assert lenient.overall.pauc == pytest.approx(100 * (2 * 0.5 + 2 * 1 + 6 * 1) / 20)
    wrong = evaluate(gold, [pred("q", (2, "Nothing happened."))], omega=0)
    assert wrong.overall.pauc < 25.0


def test_exact_repeats_are_not_rejudged_and_unparsed_scores_are_counted():
    judge = ScriptedJudge({("a",): 2, ("a", "b"): None})
    report = evaluate([example(spans=[(0, 10)])], [pred("q", (2, "a"), (4, "A."), (6, "b"))], judge, omega=0)
    assert [a for a in judge.asked if a[0] == "score"] == [("score", ("a",)), ("score", ("a", "b"))]
    span = report.spans[0]
    assert [r.score for r in span.replies] == [2, 2, None]
    assert span.n_unparsed == 1 and report.overall.n_unparsed == 1
    assert span.pauc == pytest.approx((2 * 0.5 + 8 * 2) / 20)  # the unparsed score leaves the line at 2


def test_duplicate_proportion():
    gold = [example(spans=[(0, 10), (20, 30)])]
    replies = [
        (2, "A red circle appeared."),  # first in span 0: never a candidate
        (4, "a red circle appeared"),  # exact repeat (normalised): duplicate, decided without the judge
        (6, "The red circle moved left."),  # new words: not a duplicate
        (15, "A red circle appeared."),  # out of every span: not counted at all
        (22, "The red circle moved left."),  # first in span 1: not a candidate, though it repeats
        (24, "Red circle."),  # repeats words said before (in span 0): duplicate
    ]
    report = evaluate(gold, [pred("q", *replies)], OverlapJudge())
    dups = [[r.duplicate for r in s.replies] for s in report.spans]
    assert dups == [[None, True, False], [None, True]]
    assert report.overall.n_duplicates == 2 and report.overall.n_duplicate_candidates == 3
    assert report.overall.duplicate_pct == pytest.approx(100 * 2 / 3)
    assert duplicate_percent(0, 0) == 0.0


def test_subsets_and_overall_pool_spans():
    gold = [example("a", spans=[(0, 10)], subset="web"), example("b", spans=[(0, 10), (10, 20)], subset="ego")]
    report = evaluate(gold, [pred("a", (0, "A red circle appeared."))], omega=0)
    assert [s.name for s in report.subsets] == ["ego", "web"]
    assert report.subset("web").pauc == pytest.approx(100.0)
    assert report.subset("ego").pauc == pytest.approx(25.0)
    assert report.overall.pauc == pytest.approx((100 + 25 + 25) / 3)  # mean over spans, not over subsets


def test_every_turn_baseline_repeats_the_latest_model_reply():
    gold = [example(spans=[(3, 7)], duration=8)]
    preds = [pred("q", (4, "A red circle appeared."))]
    every = every_turn_predictions(gold, preds, turn_interval_s=2.0)
    assert [(r.time_s, r.content) for r in every[0].replies] == [(4, "A red circle appeared."),
                                                                 (6, "A red circle appeared."),
                                                                 (8, "A red circle appeared.")]  # fmt: skip
    assert turn_times(gold[0], preds[0], 2.0) == (2.0, 4.0, 6.0, 8.0)
    with_turns = pred("q", (4, "x"), turns=(1, 4, 5))
    assert turn_times(gold[0], with_turns, None) == (1, 4, 5)
    with pytest.raises(UsageError, match="`turn_interval_s`"):
        every_turn_predictions(gold, preds, None)
    report = evaluate(gold, every, omega=0.5)
    assert report.overall.duplicate_pct == pytest.approx(100.0)
