"""Reading ProactiveVideoQA gold files and model prediction files into frozen dataclasses.

Gold (one JSON list, the ProactiveVideoQA layout; see /work/shared/PROTOCOL.md)::

    [{"question_id": "clip.mp4", "video": "clip.mp4", "duration": 12.87, "subset": "web",   # subset optional
      "conversation": [{"role": "user", "content": "What creatures are shown?", "time": 0}],
      "answer": [{"role": "assistant", "content": "A donkey.",
                  "related_timespan": [3.1, 5.0], "reply_timespan": [3.1, 6.0]}]}]

Predictions (JSONL, one example a line)::

    {"question_id": "clip.mp4", "model_response_list": [
        {"role": "user", "content": "", "time": 2.0},
        {"role": "assistant", "content": "A donkey appeared.", "time": 4.0}]}

Assistant entries are the replies (silent turns are simply absent); user entries only give turn times.
Every malformed field raises :class:`InputError` naming the file, the example and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edge_duet.errors import InputError
from edge_duet.protocol import NO_REPLY


@dataclass(frozen=True)
class GoldAnswer:
    content: str
    reply_timespan_s: tuple[float, float]
    related_timespan_s: tuple[float, float] | None = None


@dataclass(frozen=True)
class GoldExample:
    question_id: str
    question: str  # the first user turn's text ("" when the conversation has none)
    answers: tuple[GoldAnswer, ...]
    subset: str = "all"
    duration_s: float | None = None
    video: str | None = None


@dataclass(frozen=True)
class Reply:
    time_s: float
    content: str


@dataclass(frozen=True)
class Prediction:
    question_id: str
    replies: tuple[Reply, ...]  # sorted by time (stable)
    turn_times_s: tuple[float, ...] = ()  # times of the user entries, sorted; empty when the file has none


# ---------------------------------------------------------------------------------------------------------------
# field helpers: each names where it is looking, so an error points at the exact field


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where} must be a finite number of seconds, got {value!r}")
    return float(value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where} must be a string, got {type(value).__name__} {value!r}")
    return value


def _span(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"{where} must be a list [start, end] in seconds, got {value!r}")
    t0, t1 = _number(value[0], where + "[0]"), _number(value[1], where + "[1]")
    if not t1 > t0:
        raise InputError(f"{where} must have end > start, got [{t0}, {t1}]")
    return t0, t1


def _label(index: int, obj: Any) -> str:
    qid = obj.get("question_id") if isinstance(obj, dict) else None
    return f"example #{index}" + (f" (question_id {qid!r})" if isinstance(qid, str) else "")


# ---------------------------------------------------------------------------------------------------------------
# gold


def parse_gold_example(obj: Any, where: str, default_subset: str = "all") -> GoldExample:
    """One gold example from its JSON object; ``where`` prefixes every error message."""
    if not isinstance(obj, dict):
        raise InputError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if "question_id" not in obj:
        raise InputError(f"{where} has no 'question_id' field (every example needs one to match predictions)")
    qid = _string(obj["question_id"], f"{where}: 'question_id'")

    question = ""
    conversation = obj.get("conversation", [])
    if not isinstance(conversation, list):
        raise InputError(f"{where}: 'conversation' must be a list of turns, got {type(conversation).__name__}")
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise InputError(f"{where}: conversation[{i}] must be an object, got {type(turn).__name__}")
        if turn.get("role") == "user":
            question = _string(turn.get("content", ""), f"{where}: conversation[{i}].content")
            break

    if "answer" not in obj:
        raise InputError(f"{where} has no 'answer' field (the list of gold answers with their reply_timespan)")
    raw_answers = obj["answer"]
    if not isinstance(raw_answers, list):
        raise InputError(f"{where}: 'answer' must be a list, got {type(raw_answers).__name__}")
    answers = []
    for i, ans in enumerate(raw_answers):
        aw = f"{where}: answer[{i}]"
        if not isinstance(ans, dict):
            raise InputError(f"{aw} must be an object, got {type(ans).__name__}")
        if "content" not in ans:
            raise InputError(f"{aw} has no 'content' (the gold answer text)")
        if "reply_timespan" not in ans:
            raise InputError(f"{aw} has no 'reply_timespan' ([start, end] in seconds)")
        related = ans.get("related_timespan")
        answers.append(
            GoldAnswer(
                content=_string(ans["content"], f"{aw}.content"),
                reply_timespan_s=_span(ans["reply_timespan"], f"{aw}.reply_timespan"),
                related_timespan_s=None if related is None else _span(related, f"{aw}.related_timespan"),
            )
        )

    duration = obj.get("duration")
    subset = obj.get("subset", default_subset)
    video = obj.get("video")
    return GoldExample(
        question_id=qid,
        question=question,
        answers=tuple(answers),
        subset=_string(subset, f"{where}: 'subset'"),
        duration_s=None if duration is None else _number(duration, f"{where}: 'duration'"),
        video=None if video is None else _string(video, f"{where}: 'video'"),
    )


def parse_gold(data: Any, source: str = "gold", default_subset: str = "all") -> list[GoldExample]:
    """Gold examples from the decoded JSON list; ``source`` names the file in errors."""
    if not isinstance(data, list):
        raise InputError(
            f"{source}: a ProactiveVideoQA gold file is a JSON list of examples, got a {type(data).__name__}"
        )
    examples, seen = [], {}
    for i, obj in enumerate(data):
        ex = parse_gold_example(obj, f"{source}: {_label(i, obj)}", default_subset)
        if ex.question_id in seen:
            raise InputError(
                f"{source}: {_label(i, obj)} repeats the question_id of example #{seen[ex.question_id]}; "
                "question_id must be unique (it is how predictions find their gold)"
            )
        seen[ex.question_id] = i
        examples.append(ex)
    return examples


def load_gold(path: str | Path, default_subset: str = "all") -> list[GoldExample]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the gold file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return parse_gold(data, str(path), default_subset)


# ---------------------------------------------------------------------------------------------------------------
# predictions


def parse_prediction(obj: Any, where: str) -> Prediction:
    """One prediction line's object; ``where`` prefixes every error message."""
    if not isinstance(obj, dict):
        raise InputError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if "question_id" not in obj:
        raise InputError(f"{where} has no 'question_id' field")
    qid = _string(obj["question_id"], f"{where}: 'question_id'")
    if "model_response_list" not in obj:
        raise InputError(f"{where} has no 'model_response_list' (the list of user/assistant entries with times)")
    entries = obj["model_response_list"]
    if not isinstance(entries, list):
        raise InputError(f"{where}: 'model_response_list' must be a list, got {type(entries).__name__}")
    replies, turns = [], []
    for i, e in enumerate(entries):
        ew = f"{where}: model_response_list[{i}]"
        if not isinstance(e, dict):
            raise InputError(f"{ew} must be an object, got {type(e).__name__}")
        role = e.get("role")
        if role not in ("user", "assistant"):
            raise InputError(f"{ew}.role must be 'user' or 'assistant', got {role!r}")
        if "time" not in e:
            raise InputError(f"{ew} has no 'time' (seconds into the video)")
        t = _number(e["time"], f"{ew}.time")
        if role == "user":  # only its time matters here (its content may be a question, subtitles, or nothing)
            turns.append(t)
            continue
        if "content" not in e:
            raise InputError(f"{ew} has no 'content' (the reply text)")
        content = _string(e["content"], f"{ew}.content")
        if content.strip() == NO_REPLY:
            raise InputError(
                f"{ew} is {NO_REPLY!r}: silent turns must be left out of model_response_list, "
                "only real replies belong there"
            )
        replies.append(Reply(t, content))
    replies.sort(key=lambda r: r.time_s)  # stable: equal times keep file order
    return Prediction(qid, tuple(replies), tuple(sorted(set(turns))))


def parse_predictions(lines: Iterable[str], source: str = "predictions") -> list[Prediction]:
    preds, seen = [], {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        jsonl_hint = " (predictions are JSONL: one JSON object a line, not one JSON list)"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = jsonl_hint if line.lstrip().startswith("[") else ""
            raise InputError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}){hint}") from None
        if isinstance(obj, list):
            raise InputError(f"{where} is a JSON list{jsonl_hint}")
        qid = obj.get("question_id") if isinstance(obj, dict) else None
        if isinstance(qid, str):
            where += f" (question_id {qid!r})"
        pred = parse_prediction(obj, where)
        if pred.question_id in seen:
            raise InputError(f"{where} repeats the question_id of line {seen[pred.question_id]}; one line per example")
        seen[pred.question_id] = lineno
        preds.append(pred)
    return preds


def load_predictions(path: str | Path) -> list[Prediction]:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return parse_predictions(f, str(path))
    except OSError as exc:
        raise InputError(f"cannot read the predictions file {path}: {exc.strerror or exc}") from None
