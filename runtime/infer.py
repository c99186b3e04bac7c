"""Offline inference over MMDuet2's frame-input format (what `edge-duet infer` runs).

Input: a JSON list of examples::

    {"question_id": "...", "conversation": [
        {"role": "system", "content": "..."},                                  (optional)
        {"role": "user", "content": [{"type": "image", "image": "f1.png"}, ..., {"type": "text", "text": "..."}],
         "time": 4.0, "must_reply": false}, ...]}

Output: one JSON line per example, ``{"question_id", "model_response_list": [{"role", "content", "time"}, ...]}``
holding one user entry per input turn (its text, ``""`` for a turn that brought frames only) and the replies that
are not ``NO REPLY``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edge_duet.errors import InputError

from .events import Reply
from .session import Session


@dataclass(frozen=True)
class UserTurn:
    images: tuple[Path, ...]
    text: str | None
    time: float
    must_reply: bool


@dataclass(frozen=True)
class Example:
    question_id: str
    system: str | None
    turns: tuple[UserTurn, ...]


def load_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except IsADirectoryError:
        hint = " (make-benchmark writes infer_input.json into it)" if (path / "infer_input.json").is_file() else ""
        raise InputError(f"{path} is a folder; give the examples' JSON file{hint}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    base = path.parent
    return [_parse_example(ex, i, base, path) for i, ex in enumerate(data)]


def _parse_example(ex, i: int, base: Path, path: Path) -> Example:
    where = f"{path}: example {i}"
    if not isinstance(ex, dict) or "conversation" not in ex:
        raise InputError(f"{where}: expected an object with 'question_id' and 'conversation'")
    qid = str(ex.get("question_id", i))
    where = f"{path}: example {qid!r}"
    conv = ex["conversation"]
    if not isinstance(conv, list) or not conv:
        raise InputError(f"{where}: 'conversation' must be a non-empty list")
    system, turns = None, []
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or "role" not in msg:
            raise InputError(f"{where}, turn {j}: expected an object with 'role'")
        if msg["role"] == "system":
            if j != 0:
                raise InputError(f"{where}, turn {j}: a system turn may only come first")
            system = msg.get("content") if isinstance(msg.get("content"), str) else None
            continue
        if msg["role"] != "user":
            raise InputError(f"{where}, turn {j}: role must be 'system' or 'user', got {msg['role']!r}")
        content = msg.get("content", [])
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        images, texts = [], []
        for c in content:
            kind = c.get("type") if isinstance(c, dict) else None
            if kind == "image":
                img = Path(str(c.get("image", "")))
                img = img if img.is_absolute() else base / img
                if not img.is_file():
                    raise InputError(f"{where}, turn {j}: image {img} does not exist")
                images.append(img)
            elif kind == "text":
                texts.append(str(c.get("text", "")))
            else:
                raise InputError(f"{where}, turn {j}: content items must have type 'image' or 'text'")
        if "time" not in msg:
            raise InputError(f"{where}, turn {j}: missing 'time' (seconds of video seen at this turn)")
        try:
            t = float(msg["time"])
        except (TypeError, ValueError):
            raise InputError(f"{where}, turn {j}: 'time' must be a number") from None
        text = "".join(texts).strip() or None
        turns.append(UserTurn(tuple(images), text, t, bool(msg.get("must_reply", False))))
    return Example(qid, system, tuple(turns))


def _read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def run_example(session: Session, ex: Example) -> dict:
    """Run one example from a fresh dialogue; returns its output record."""
    session.reset(ex.system)
    responses = []

    def collect(events: Iterator) -> None:
        for ev in events:
            if isinstance(ev, Reply):
                responses.append({"role": "assistant", "content": ev.text, "time": ev.t})

    for turn in ex.turns:
        # one user entry per input turn (content "" when it brought frames only): the evaluator takes the turn
        # times from them, e.g. for its reply-every-turn baseline
        responses.append({"role": "user", "content": turn.text or "", "time": turn.time})
        if turn.text:
            session.ask(turn.text, must_reply=turn.must_reply, t=turn.time)
        if turn.images:
            session.add_frames([_read_image(p) for p in turn.images], t=turn.time)
        collect(session.step())
    collect(session.finish())
    responses.sort(key=lambda r: (r["time"], r["role"] != "user"))  # a late-confirmed reply goes back in order
    return {"question_id": ex.question_id, "model_response_list": responses}
