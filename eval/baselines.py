"""Baselines that put a model's PAUC in context, each a set of predictions scored like the model's own:

- ``silent``: never reply (PAUC 25.0 by construction);
- ``every-turn``: the model's own latest words at every turn (what the choice of *when* to speak is worth);
- ``opencv``: the non-learned colour/contour pipeline of eval/cv_pipeline.py on the benchmark's frames, the same
  input the model gets (a reference ceiling for the synthetic benchmark);
- ``oracle``: the gold answers said at the first turn that shows their event (it reads the gold: the ceiling of
  2-s turns, not a method).

``opencv`` and ``oracle`` need the turns of each stream (frames, questions, times): the infer input file
``edge-duet make-benchmark`` writes beside the gold (``infer_input.json``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from edge_duet.errors import UsageError

from .evaluator import index_predictions
from .formats import GoldExample, Prediction, Reply


def silent_predictions(gold: Sequence[GoldExample]) -> list[Prediction]:
    """Never reply: every span scores 0.5 / 2, i.e. PAUC 25.0."""
    return [Prediction(ex.question_id, ()) for ex in gold]


def turn_times(ex: GoldExample, pred: Prediction | None, turn_interval_s: float | None) -> tuple[float, ...]:
    """The example's turn times: the user entries of its prediction, else k * ``turn_interval_s`` up to the end of
    the video (its duration, else the last answer span's end)."""
    if pred is not None and pred.turn_times_s:
        return pred.turn_times_s
    if turn_interval_s is None:
        raise UsageError(
            f"the reply-every-turn baseline needs turn times, and the prediction for {ex.question_id!r} has no user "
            "entries to take them from: give `turn_interval_s` SECONDS (frames per turn x frame interval)"
        )
    if not turn_interval_s > 0:
        raise UsageError(f"`turn_interval_s` must be > 0 seconds, got {turn_interval_s}")
    end = ex.duration_s if ex.duration_s is not None else max((a.reply_timespan_s[1] for a in ex.answers), default=0.0)
    n = int(end / turn_interval_s + 1e-9)
    return tuple(round(k * turn_interval_s, 9) for k in range(1, n + 1))


def every_turn_predictions(
    gold: Sequence[GoldExample],
    preds: Mapping[str, Prediction] | Iterable[Prediction],
    turn_interval_s: float | None = None,
) -> list[Prediction]:
    """Reply at every turn with the model's own latest words: at each turn, the most recent model reply at or before
    it (silent until the model's first reply). Same words as the model, no restraint: shows what the model's
    choice of *when* to speak is worth, and what constant talking costs in duplicates and out-of-span replies."""
    by_qid = index_predictions(preds)
    out = []
    for ex in gold:
        pred = by_qid.get(ex.question_id)
        model = pred.replies if pred is not None else ()
        replies, k = [], -1
        for t in turn_times(ex, pred, turn_interval_s):
            while k + 1 < len(model) and model[k + 1].time_s <= t:
                k += 1
            if k >= 0:
                replies.append(Reply(t, model[k].content))
        out.append(Prediction(ex.question_id, tuple(replies), turn_times(ex, pred, turn_interval_s)))
    return out


def oracle_predictions(gold: Sequence[GoldExample], streams: Mapping) -> list[Prediction]:
    """The gold answers, each said at the first turn holding a frame at or after its span's start (answers due at
    the same turn are said together). ``streams``: question_id -> runtime.infer.Example (turns with frame times)."""
    out = []
    for ex in gold:
        turns = _stream(streams, ex.question_id).turns
        # a turn at time T after one at P holds frames at P, P + dt, ..., T - dt (a turn's time is frames seen x dt)
        last_frame = [t.time - (t.time - p) / max(1, len(t.images)) for t, p in zip(turns, [0.0] + [
            t.time for t in turns])]
        due: dict[float, list[str]] = {}
        for ans in ex.answers:
            start = ans.reply_timespan_s[0]
            k = next((k for k, f in enumerate(last_frame) if f >= start - 1e-6), None)
            if k is not None:
                due.setdefault(turns[k].time, []).append(ans.content)
        replies = tuple(Reply(t, " ".join(texts)) for t, texts in sorted(due.items()))
        out.append(Prediction(ex.question_id, replies, tuple(t.time for t in turns)))
    return out


def opencv_predictions(gold: Sequence[GoldExample], streams: Mapping, progress: bool = False) -> list[Prediction]:
    """The colour/contour pipeline (eval/cv_pipeline.py) run over each stream's frames and questions."""
    import cv2
    from tqdm import tqdm

    from .cv_pipeline import Dialogue

    out = []
    for ex in tqdm(gold, desc="opencv baseline", unit="example", disable=not progress):
        dialogue, replies = Dialogue(), []
        stream = _stream(streams, ex.question_id)
        for turn in stream.turns:
            frames = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in turn.images]
            reply = dialogue.turn([f for f in frames if f is not None], turn.text)
            if reply is not None:
                replies.append(Reply(turn.time, reply))
        out.append(Prediction(ex.question_id, tuple(replies), tuple(t.time for t in stream.turns)))
    return out


def _stream(streams: Mapping, question_id: str):
    if question_id not in streams:
        raise UsageError(
            f"the frames file has no example {question_id!r}: --frames must be the infer input written with this "
            "gold file (make-benchmark writes both into one folder)"
        )
    return streams[question_id]

