"""The RL reward (eval/reward.py) reproduces every worked value of MMDuet2's reward and each penalty."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from edge_duet.eval import reward as rw
from edge_duet.eval.reward import RewardWeights, SpanGold, compute_score, ground_truth_json, trajectory_reward

GOLD = "A red star appeared."
RIGHT, WRONG = "A red star appeared.", "The red star left."
SPAN = SpanGold(GOLD, (4.0, 12.0))
TIMES = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]  # turns; 4..12 are inside the span, 2, 14, 16 outside
SILENT = ["NO REPLY"] * len(TIMES)


def replies_at(**at: str) -> list[str]:
    out = list(SILENT)
    for t, text in at.items():
        out[TIMES.index(float(t[1:]))] = text
    return out


def r_pauc(turns: list[str]) -> float:
    return trajectory_reward(TIMES, turns, [SPAN]).pauc


@pytest.mark.parametrize("turns, expected", [
    (SILENT, 0.125),  # the line stays at 0.5 of 4
    (replies_at(t4=RIGHT), 1.0),  # perfect at the span's start
    (replies_at(t8=RIGHT), 0.78125),  # at its middle: x' = 4 * 0.5 = 2 of 8 -> (2 * 0.5 + 6 * 4) / 32
    (replies_at(t12=RIGHT), 0.5625),  # at its end: x' = 4 of 8 -> (4 * 0.5 + 4 * 4) / 32
    (replies_at(t4=WRONG), 0.0),  # a wrong early reply is worse than silence
    (replies_at(t4="A star appeared."), 0.5),  # partial (strict 1 -> 2 of 4) at the start
    (replies_at(t4=WRONG, t8=RIGHT), (2 * 0.0 + 6 * 4) / 32),  # judged one by one: the right reply still lifts it
])
def test_pauc_term_worked_values(turns, expected):
    assert r_pauc(turns) == pytest.approx(expected)


def test_exact_repeat_is_skipped_in_pauc_and_counts_as_duplicate():
    b = trajectory_reward(TIMES, replies_at(t4=WRONG, t8=WRONG + " ", t10=RIGHT), [SPAN])
    assert b.pauc == pytest.approx((3 * 0.0 + 5 * 4) / 32)  # the repeat at 8 adds no step; the right one at 10 does
    assert b.rep == pytest.approx(-1 / 3)  # the second WRONG is an exact repeat; RIGHT is new (kind differs)


def test_repetition_penalty_uses_the_judge_and_the_context():
    b = trajectory_reward(TIMES, replies_at(t4=RIGHT, t6="The red star."), [SPAN])
    assert b.rep == pytest.approx(-0.5)  # "The red star." says nothing the first reply did not
    b = trajectory_reward(TIMES, replies_at(t4=RIGHT), [SPAN], context_replies=["A red star appeared."])
    assert b.rep == -1.0  # the ground-truth reply before the span already said it
    assert trajectory_reward(TIMES, SILENT, [SPAN]).rep == 0.0


def test_out_of_span_penalty():
    b = trajectory_reward(TIMES, replies_at(t2=RIGHT, t16="A blue circle appeared."), [SPAN])
    assert b.outspan == pytest.approx(-2 / 3)  # 2 replies at the 3 turns outside the span
    assert trajectory_reward(TIMES, replies_at(t4=RIGHT), [SPAN]).outspan == 0.0
    every = trajectory_reward(TIMES, [RIGHT] * len(TIMES), [SPAN])
    assert every.outspan == -1.0 and every.rep == pytest.approx(-7 / 8)


def test_common_prefix_penalty():
    long_a = "The red star appeared in the top left corner of the frame, and it is large."
    long_b = "The red star appeared in the top left corner of the frame, then it moved."
    assert long_a[:50] == long_b[:50] and long_a != long_b
    b = trajectory_reward(TIMES, replies_at(t4=long_a, t6=long_b), [SPAN])
    assert b.pfx == pytest.approx(-1 / len(TIMES))  # one turn of eight shares a 50-character prefix
    short = trajectory_reward(TIMES, replies_at(t4=RIGHT, t6=RIGHT), [SPAN])
    assert short.pfx == 0.0  # under 50 characters: the repetition term's job
    assert trajectory_reward(TIMES, replies_at(t4=long_a, t6=long_b), [SPAN],
                             weights=RewardWeights(prefix_chars=80)).pfx == 0.0


def test_total_is_the_weighted_sum_with_the_papers_weights():
    turns = replies_at(t2=WRONG, t4=RIGHT, t6=RIGHT)
    b = trajectory_reward(TIMES, turns, [SPAN])
    assert b.total == pytest.approx(3 * b.pauc + 2 * b.rep + 0.5 * b.outspan + 2 * b.pfx)
    w = RewardWeights(pauc=1, rep=0, outspan=0, pfx=0)
    assert trajectory_reward(TIMES, turns, [SPAN], weights=w).total == pytest.approx(b.pauc)
    assert RewardWeights() == RewardWeights(3.0, 2.0, 0.5, 2.0, 0.5, 50)


def test_spans_not_started_are_left_out_and_must_reply_prefix_is_not_said():
    late = SpanGold("The blue circle left.", (30.0, 35.0))
    b = trajectory_reward(TIMES, replies_at(t4="I must reply.\n" + RIGHT), [SPAN, late])
    assert b.n_spans == 1 and b.pauc == pytest.approx(1.0)
    assert trajectory_reward(TIMES, replies_at(t4="I must reply.\nNO REPLY"), [SPAN]).n_replies == 0


def test_verl_hook_from_transcript_and_from_extra_info():
    turns = replies_at(t4=RIGHT, t16=WRONG)
    gt = ground_truth_json(TIMES, [SPAN], question="Tell me when something appears.")
    transcript = "".join(f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
                         f"<|im_start|>assistant\n{r}<|im_end|>\n" for r in turns)
    direct = trajectory_reward(TIMES, turns, [SPAN], "Tell me when something appears.")
    out = compute_score("edge-duet-synthetic", transcript, gt)
    assert out["score"] == pytest.approx(direct.total) and out["pauc"] == pytest.approx(1.0)
    assert compute_score("x", "", gt, {"turn_replies": turns})["score"] == pytest.approx(direct.total)
    w = {"pauc": 1.0, "rep": 0.0, "outspan": 0.0, "pfx": 0.0}
    assert compute_score("x", "", json.loads(gt), {"turn_replies": turns, "weights": w})["score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="assistant turns"):
        compute_score("x", "A red star appeared.", gt)
    with pytest.raises(ValueError, match="ground_truth"):
        compute_score("x", transcript, "{}")


def test_verl_can_load_the_file_by_path(monkeypatch):
    # verl's custom_reward_function.path imports the file as "custom_module", outside its package (as verl's
    # get_custom_reward_fn does): no relative imports
    spec = importlib.util.spec_from_file_location("custom_module", rw.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "custom_module", mod)
    spec.loader.exec_module(mod)
    gt = ground_truth_json(TIMES, [SPAN])
    assert mod.compute_score("x", "", gt, {"turn_replies": SILENT})["pauc"] == pytest.approx(0.125)


def test_bad_weights_are_refused():
    from edge_duet.errors import UsageError

    with pytest.raises(UsageError, match="omega"):
        RewardWeights(omega=1.0).check()
    with pytest.raises(UsageError, match="rep"):
        RewardWeights(rep=-1).check()
