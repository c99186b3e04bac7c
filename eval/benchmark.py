"""A synthetic proactive benchmark in ProactiveVideoQA's format, and the dialogues the demo model trains on.

An :class:`Example` is a scene (eval/scenes.py) plus a dialogue of one of MMDuet2's two kinds:

- one question at the start, answered in every span where the video shows the answer (subsets ``appear``,
  ``leave``, ``change``, ``move``, ``count``);
- several questions arriving at any time (subset ``multi``): a "tell me when" question asked mid-stream, and
  questions that need an answer now (``must_reply``: the assistant turn is pre-filled with ``I must reply.``).

The language is templated (see ``Q_*`` / ``A_*``): an answer names the colour and shape it is about, so an
overlap judge can score it and a small model can learn it. Scenes are varied (backgrounds, noise, jitter,
distractor events that must not be answered), and a split is fixed by its seed: training uses other seeds.

Times. Frames are sampled every ``frame_interval_s`` from t = 0; a turn holds ``frames_per_turn`` frames and its
time is frames seen so far x interval (PROTOCOL.md). An event at time e is *due* in the turn holding the first
sampled frame that shows it. Its related span is [e, min(e + 4 s, next answer, duration)]; the reply span adds
1 s, clipped to the duration, as in ProactiveVideoQA. A question asked at a turn has the time of the turn's start.

Why one module of ~550 lines: a split is defined by its seed through the exact order of the random draws made by
the planner and the dialogue writers together; keeping them in one file keeps that order readable in one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_duet.protocol import MUST_REPLY_PREFIX, NO_REPLY

from . import scenes as sc

SUBSETS: tuple[str, ...] = ("appear", "leave", "change", "move", "count", "multi")
DURATIONS_S: tuple[float, ...] = (16.0, 18.0, 20.0, 22.0, 24.0)
RELATED_S = 4.0  # how long after an event its answer stays relevant
MIN_GAP_S = 3.0  # events of one scene are at least this far apart (> one 2-s turn: one event per turn)

Q_APPEAR_ANY = "Tell me when something appears."
Q_APPEAR_COLOUR = "Tell me when a {colour} object appears."
Q_APPEAR_SHAPE = "Tell me when a {shape} appears."
Q_LEAVE = "Tell me when something leaves."
Q_LEAVE_ONE = "Tell me when the {colour} {shape} leaves."
Q_RECOLOUR = "Tell me when something changes colour."
Q_MOVE = "Tell me when something starts moving."
Q_COUNT = "How many objects are there? Tell me when the number changes."
Q_WHAT_COLOUR = "What colour is the {shape}?"
Q_WHAT_SHAPE = "What shape is the {colour} object?"
Q_HOW_MANY = "How many objects are there?"

A_APPEAR = "A {colour} {shape} appeared."
A_LEAVE = "The {colour} {shape} left."
A_RECOLOUR = "The {shape} turned {colour}."
A_MOVE = "The {colour} {shape} started moving."
EVENT_KINDS: tuple[str, ...] = ("appear", "leave", "recolour", "move")  # what can happen to an object
EVENT_ANSWERS = {"appear": A_APPEAR, "leave": A_LEAVE, "recolour": A_RECOLOUR, "move": A_MOVE}  # one per kind
A_WHAT_COLOUR = "The {shape} is {colour}."
A_WHAT_SHAPE = "The {colour} object is a {shape}."
NUMBERS = ("zero", "one", "two", "three", "four", "five")  # "zero", not "no": the judge drops stop words


def a_count(n: int) -> str:
    return "There is one object." if n == 1 else f"There are {NUMBERS[n]} objects."


@dataclass(frozen=True)
class Clock:
    """How a stream is cut into turns."""

    frame_interval_s: float = 1.0
    frames_per_turn: int = 2

    @property
    def turn_s(self) -> float:
        return self.frame_interval_s * self.frames_per_turn

    def num_frames(self, duration_s: float) -> int:
        return int(math.floor(duration_s / self.frame_interval_s + 1e-6))

    def frame_time(self, i: int) -> float:
        return round(i * self.frame_interval_s, 6)

    def turn_of_frame(self, i: int) -> int:
        return i // self.frames_per_turn

    def turn_start(self, k: int) -> float:
        return round(k * self.turn_s, 6)

    def turn_time(self, k: int, duration_s: float) -> float:
        seen = min((k + 1) * self.frames_per_turn, self.num_frames(duration_s))
        return round(seen * self.frame_interval_s, 6)

    def num_turns(self, duration_s: float) -> int:
        return -(-self.num_frames(duration_s) // self.frames_per_turn)


@dataclass(frozen=True)
class Question:
    time_s: float
    text: str
    must_reply: bool = False


@dataclass(frozen=True)
class Answer:
    text: str
    start_s: float  # the event (or the question) the answer is about
    due_turn: int  # the turn that first shows it
    must_reply: bool = False
    end_s: float = 0.0  # related span end, filled in by _close_spans


@dataclass(frozen=True)
class Example:
    question_id: str
    subset: str
    scene: sc.Scene
    questions: tuple[Question, ...]
    answers: tuple[Answer, ...]

    @property
    def duration_s(self) -> float:
        return self.scene.duration_s


@dataclass(frozen=True)
class Turn:
    """One user turn and the gold assistant reply (``NO_REPLY`` when nothing is due)."""

    index: int
    frame_times: tuple[float, ...]
    time_s: float
    text: str | None
    must_reply: bool
    reply: str


# ------------------------------------------------------------------------------------------- scene planning


class _Planner:
    """Assigns scene events to objects so that every object has a distinct shape, colour and anchor slot."""

    def __init__(self, rng: np.random.Generator, reserved_colours: tuple[str, ...] = ()):
        self.rng = rng
        self.shapes = list(rng.permutation(sc.SHAPES))
        free = [c for c in rng.permutation(sc.COLOUR_NAMES) if c not in reserved_colours]
        self.colours = list(reserved_colours) + free  # reserved ones are taken first, on request
        self.reserved = set(reserved_colours)
        self.slots = [int(s) for s in rng.permutation(len(sc.SLOTS))]
        self.objects: list[sc.SceneObject] = []

    def _take_colour(self, colour: str | None) -> str | None:
        if colour is not None:
            if colour not in self.colours:
                return None
            self.colours.remove(colour)
            return colour
        for c in self.colours:
            if c not in self.reserved:
                self.colours.remove(c)
                return c
        return None

    def new_object(self, appear_s: float, shape: str | None = None, colour: str | None = None) -> int | None:
        if shape is not None and shape not in self.shapes:
            return None
        if not self.shapes or not self.slots:
            return None
        colour = self._take_colour(colour)
        if colour is None:
            return None
        shape = shape or self.shapes[0]
        self.shapes.remove(shape)
        obj = sc.random_object(self.rng, shape, colour, self.slots.pop())
        self.objects.append(sc.SceneObject(**{**obj.__dict__, "appear_s": appear_s}))
        return len(self.objects) - 1

    def _busy(self, o: sc.SceneObject, t: float) -> bool:
        return o.move_start_s - 0.5 <= t <= o.move_end_s + 0.5

    def _pick(self, t: float, ok) -> int | None:
        cands = [i for i, o in enumerate(self.objects) if o.visible(t) and o.leave_s == sc.NEVER and
                 not self._busy(o, t) and ok(o)]
        if not cands:
            i = self.new_object(0.0)
            return i if i is not None and ok(self.objects[i]) else None
        return cands[int(self.rng.integers(len(cands)))]

    def event(self, kind: str, t: float, **constraint) -> int | None:
        if kind == "appear":
            return self.new_object(t, constraint.get("shape"), constraint.get("colour"))
        if kind == "leave":
            i = self._pick(t, lambda o: True)
            if i is not None:
                self.objects[i] = _replace(self.objects[i], leave_s=t)
            return i
        if kind == "recolour":
            i = self._pick(t, lambda o: o.recolour_s == sc.NEVER)
            colour = self._take_colour(None) if i is not None else None
            if i is None or colour is None:
                return None
            self.objects[i] = _replace(self.objects[i], recolour_s=t, new_colour=colour)
            return i
        if kind == "move":
            i = self._pick(t, lambda o: o.move_start_s == sc.NEVER)
            if i is None or not self.slots:
                return None
            self.objects[i] = sc.with_move(self.objects[i], self.rng, t, self.slots.pop())
            return i
        raise ValueError(kind)


def _replace(obj: sc.SceneObject, **kw) -> sc.SceneObject:
    from dataclasses import replace

    return replace(obj, **kw)


def _event_times(rng: np.random.Generator, n: int, duration_s: float, lo: float) -> list[float]:
    """``n`` sorted times in [lo, duration - 4] at least MIN_GAP_S apart (fewer if they do not fit)."""
    hi = duration_s - 4.0
    n = max(0, min(n, int((hi - lo) // MIN_GAP_S) + 1))
    if n == 0:
        return []
    slack = (hi - lo) - (n - 1) * MIN_GAP_S
    cuts = np.sort(rng.uniform(0, slack, n))
    return [round(lo + c + k * MIN_GAP_S, 1) for k, c in enumerate(cuts)]


def _scene_events(scene: sc.Scene) -> list[tuple[float, str, int]]:
    """(time, kind, object index) of everything that happens after t = 0, in time order."""
    out = []
    for i, o in enumerate(scene.objects):
        if o.appear_s > 0:
            out.append((o.appear_s, "appear", i))
        if o.leave_s != sc.NEVER:
            out.append((o.leave_s, "leave", i))
        if o.recolour_s != sc.NEVER:
            out.append((o.recolour_s, "recolour", i))
        if o.move_start_s != sc.NEVER:
            out.append((o.move_start_s, "move", i))
    return sorted(out)


def _due_turn(scene: sc.Scene, clock: Clock, obj: int, t: float) -> int | None:
    """The turn holding the first sampled frame at or after ``t`` where object ``obj`` looks different from just
    before ``t`` (a move shows only once the object has left its place)."""
    o = scene.objects[obj]
    before = o.state_at(t - 1e-6)
    for i in range(clock.num_frames(scene.duration_s)):
        f = clock.frame_time(i)
        if f >= t - 1e-9 and o.state_at(f) != before:
            return clock.turn_of_frame(i)
    return None


# ----------------------------------------------------------------------------------------------- dialogues


def _answer_for(kind: str, o: sc.SceneObject, t: float) -> str:
    # the colour it is named by: before it left, after it changed, at the time otherwise
    colour = {"leave": o.colour_at(t - 1e-6), "recolour": o.new_colour}.get(kind) or o.colour_at(t)
    return EVENT_ANSWERS[kind].format(colour=colour, shape=o.shape)


def _watch_answers(scene: sc.Scene, clock: Clock, after_s: float, match) -> list[Answer]:
    out = []
    for t, kind, i in _scene_events(scene):
        if t >= after_s and match(kind, scene.objects[i]):
            due = _due_turn(scene, clock, i, t)
            if due is not None:
                out.append(Answer(_answer_for(kind, scene.objects[i], t), t, due))
    return out


def _count_at(scene: sc.Scene, t: float) -> int:
    return len(scene.visible_objects(t))


def _close_spans(answers: list[Answer], duration_s: float) -> tuple[Answer, ...]:
    answers = sorted(answers, key=lambda a: (a.start_s, a.due_turn))
    out = []
    for k, a in enumerate(answers):
        nxt = next((b.start_s for b in answers[k + 1:] if b.start_s > a.start_s), math.inf)
        end = min(a.start_s + RELATED_S, nxt, duration_s)
        out.append(Answer(a.text, round(float(a.start_s), 3), a.due_turn, a.must_reply, round(float(end), 3)))
    return tuple(out)


def _stable_turns(scene: sc.Scene, clock: Clock, busy: set[int]) -> list[int]:
    """Turns in which nothing changes (from the previous turn's last frame on) and no answer is due."""
    n = clock.num_frames(scene.duration_s)
    out = []
    for k in range(clock.num_turns(scene.duration_s)):
        if k in busy:
            continue
        lo, hi = max(0, k * clock.frames_per_turn - 1), min(n, (k + 1) * clock.frames_per_turn)
        states = {tuple(o.state_at(clock.frame_time(i)) for o in scene.objects) for i in range(lo, hi)}
        if len(states) == 1:
            out.append(k)
    return out


def make_example(rng: np.random.Generator, subset: str, duration_s: float, clock: Clock,
                 question_id: str) -> Example:
    """One example of ``subset`` (see SUBSETS): plan events, build the scene, derive the dialogue and answers."""
    style = sc.random_scene_style(rng, duration_s)
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731 (inclusive)
    others = lambda *kinds: [str(k) for k in rng.choice(kinds, r(0, 2))]  # noqa: E731
    constraint: dict = {}
    variant = ""
    if subset == "appear":
        variant = str(rng.choice(["any", "any", "colour", "shape"]))
        if variant == "any":
            kinds = ["appear"] * r(1, 3) + others("leave", "recolour", "move")[:1]
        else:
            kinds = ["appear"] * r(2, 3) + others("leave", "recolour", "move")[:1]
    elif subset == "leave":
        kinds = ["leave"] * r(1, 2) + others("appear", "recolour", "move")
    elif subset == "change":
        kinds = ["recolour"] * r(1, 2) + others("appear", "leave", "move")
    elif subset == "move":
        kinds = ["move"] * r(1, 2) + others("appear", "leave", "recolour")
    elif subset == "count":
        kinds = [str(k) for k in rng.choice(["appear", "leave"], r(1, 3))] + others("recolour", "move")[:1]
    elif subset == "multi":
        kinds = [str(k) for k in rng.choice(["appear", "leave", "recolour", "move"], r(2, 3))]
        if "appear" not in kinds and "leave" not in kinds:
            kinds[0] = str(rng.choice(["appear", "leave"]))
    else:
        raise ValueError(f"unknown subset {subset!r}; choose one of {SUBSETS}")
    kinds = [str(k) for k in rng.permutation(kinds)]
    # Nothing happens during the first turn: its frames show the scene the question is asked about.
    times = _event_times(rng, len(kinds), duration_s, lo=max(1.0, clock.turn_s))
    kinds = kinds[: len(times)]
    if subset == "appear" and "appear" not in kinds:
        variant = "any"

    reserved: tuple[str, ...] = ()
    target_pos = 0
    if subset == "appear" and variant != "any":
        target_pos = [j for j, k in enumerate(kinds) if k == "appear"][r(0, kinds.count("appear") - 1)]
        if variant == "colour":
            constraint = {"colour": str(rng.choice(sc.COLOUR_NAMES))}
            reserved = (constraint["colour"],)
        else:
            constraint = {"shape": str(rng.choice(sc.SHAPES))}
    planner = _Planner(rng, reserved)
    for _ in range(r(0, 2) if subset != "count" else r(1, 3)):
        planner.new_object(0.0)
    for j, (kind, t) in enumerate(zip(kinds, times)):
        planner.event(kind, t, **(constraint if j == target_pos and constraint else {}))
    if subset == "appear" and constraint and not any(
        o.appear_s > 0 and all(getattr(o, k) == v for k, v in constraint.items()) for o in planner.objects
    ):  # the filtered target could not be placed (pools exhausted): fall back to the unfiltered question
        variant, constraint = "any", {}
    scene = sc.Scene(**{**style.__dict__, "objects": tuple(planner.objects)})

    questions: list[Question]
    answers: list[Answer]
    if subset == "appear":
        if variant == "colour":
            q = Q_APPEAR_COLOUR.format(colour=constraint["colour"])
            match = lambda k, o: k == "appear" and o.colour == constraint["colour"]  # noqa: E731
        elif variant == "shape":
            q = Q_APPEAR_SHAPE.format(shape=constraint["shape"])
            match = lambda k, o: k == "appear" and o.shape == constraint["shape"]  # noqa: E731
        else:
            q = Q_APPEAR_ANY
            match = lambda k, o: k == "appear"  # noqa: E731
        questions = [Question(0.0, q)]
        answers = _watch_answers(scene, clock, 0.0, match)
    elif subset in ("leave", "change", "move"):
        kind = {"leave": "leave", "change": "recolour", "move": "move"}[subset]
        q = {"leave": Q_LEAVE, "change": Q_RECOLOUR, "move": Q_MOVE}[subset]
        questions = [Question(0.0, q)]
        answers = _watch_answers(scene, clock, 0.0, lambda k, o: k == kind)
    elif subset == "count":
        questions = [Question(0.0, Q_COUNT)]
        answers = [Answer(a_count(_count_at(scene, 0.0)), 0.0, 0)]
        for t, kind, i in _scene_events(scene):
            if kind in ("appear", "leave"):
                due = _due_turn(scene, clock, i, t)
                if due is not None:
                    answers.append(Answer(a_count(_count_at(scene, t)), t, due))
    else:
        questions, answers = _multi_dialogue(rng, scene, clock)
    return Example(question_id, subset, scene, tuple(questions), _close_spans(answers, duration_s))


def _multi_dialogue(rng: np.random.Generator, scene: sc.Scene, clock: Clock) -> tuple[list[Question], list[Answer]]:
    """A "tell me when" question about one later event, asked at a random earlier turn, plus 1-2 questions that
    need an answer now, at turns where nothing changes."""
    questions: list[Question] = []
    answers: list[Answer] = []
    targets = []
    for t, kind, i in _scene_events(scene):
        o = scene.objects[i]
        if kind == "appear":
            targets.append((t, kind, i, Q_APPEAR_COLOUR.format(colour=o.colour)))
        elif kind == "leave" and o.recolour_s == sc.NEVER:
            targets.append((t, kind, i, Q_LEAVE_ONE.format(colour=o.colour, shape=o.shape)))
    busy: set[int] = set()
    if targets:
        t, kind, i, text = targets[int(rng.integers(len(targets)))]
        due = _due_turn(scene, clock, i, t)
        appear_s = scene.objects[i].appear_s
        first = 0 if kind == "appear" or appear_s == 0 else clock.turn_of_frame(
            int(math.ceil(appear_s / clock.frame_interval_s))) + 1
        last = min(due if due is not None else 0, clock.turn_of_frame(int(t // clock.frame_interval_s))) - 1
        if due is not None and last >= first:
            k = int(rng.integers(first, last + 1))
            questions.append(Question(clock.turn_start(k), text))
            answers.append(Answer(_answer_for(kind, scene.objects[i], t), t, due))
            busy |= {k, due}
    stable = [k for k in _stable_turns(scene, clock, busy)]
    n_now = int(rng.integers(1, 3)) if questions else int(rng.integers(2, 4))
    for k in sorted(int(v) for v in rng.permutation(stable)[:n_now]):
        t_end = clock.frame_time(min((k + 1) * clock.frames_per_turn, clock.num_frames(scene.duration_s)) - 1)
        visible = [o for o in scene.objects if o.visible(t_end)]
        choice = int(rng.integers(3)) if visible else 2
        if choice == 0:
            o = visible[int(rng.integers(len(visible)))]
            q, a = Q_WHAT_COLOUR.format(shape=o.shape), A_WHAT_COLOUR.format(shape=o.shape, colour=o.colour_at(t_end))
        elif choice == 1:
            o = visible[int(rng.integers(len(visible)))]
            c = o.colour_at(t_end)
            q, a = Q_WHAT_SHAPE.format(colour=c), A_WHAT_SHAPE.format(colour=c, shape=o.shape)
        else:
            q, a = Q_HOW_MANY, a_count(len(visible))
        if any(b.text == a for b in answers):
            # the same question with the same answer again: the gold would hold a reply that the duplicate
            # metric counts against any model that gives it (drawn anyway, so the other examples stay the same)
            continue
        questions.append(Question(clock.turn_start(k), q, must_reply=True))
        answers.append(Answer(a, clock.turn_start(k), k, must_reply=True))
    questions.sort(key=lambda q: q.time_s)
    return questions, answers


def turns(example: Example, clock: Clock) -> list[Turn]:
    """The stream as the model sees it: frames, question text, must-reply flag and the gold reply per turn."""
    n_frames = clock.num_frames(example.duration_s)
    out = []
    for k in range(clock.num_turns(example.duration_s)):
        idx = range(k * clock.frames_per_turn, min((k + 1) * clock.frames_per_turn, n_frames))
        start = clock.turn_start(k)
        qs = [q for q in example.questions if abs(q.time_s - start) < 1e-6]
        due = [a for a in example.answers if a.due_turn == k]
        due.sort(key=lambda a: (not a.must_reply, a.start_s))
        must = any(q.must_reply for q in qs)
        reply = " ".join(a.text for a in due) if due else NO_REPLY
        out.append(Turn(k, tuple(clock.frame_time(i) for i in idx), clock.turn_time(k, example.duration_s),
                        " ".join(q.text for q in qs) or None, must, reply))
    return out


def sample_examples(seed: int, n: int, clock: Clock = Clock(), subsets: tuple[str, ...] = SUBSETS,
                    durations_s: tuple[float, ...] = DURATIONS_S) -> list[Example]:
    """``n`` examples, subsets in rotation; example ``i`` depends only on ``(seed, i)``."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        duration = float(durations_s[int(rng.integers(len(durations_s)))])
        out.append(make_example(rng, subsets[i % len(subsets)], duration, clock, f"s{seed}-{i:04d}"))
    return out


# ------------------------------------------------------------------------------------------------- files


def gold_entry(example: Example, video: str) -> dict:
    """ProactiveVideoQA's example format, plus ``subset`` and ``must_reply`` on questions that need it."""
    conv = []
    for q in example.questions:
        entry = {"role": "user", "content": q.text, "time": q.time_s}
        if q.must_reply:
            entry["must_reply"] = True
        conv.append(entry)
    answers = [
        {"role": "assistant", "content": a.text, "related_timespan": [a.start_s, a.end_s],
         "reply_timespan": [a.start_s, round(min(a.end_s + 1.0, example.duration_s), 3)]}
        for a in example.answers
    ]
    return {"video": video, "question_id": example.question_id, "duration": example.duration_s,
            "subset": example.subset, "conversation": conv, "answer": answers}


def infer_entry(example: Example, clock: Clock, frame_path) -> dict:
    """``edge-duet infer``'s frame-input format (MMDuet2's): one user turn per ``frames_per_turn`` frames."""
    conv = []
    for turn in turns(example, clock):
        content = [{"type": "image", "image": frame_path(t)} for t in turn.frame_times]
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        entry = {"role": "user", "content": content, "time": turn.time_s}
        if turn.must_reply:
            entry["must_reply"] = True
        conv.append(entry)
    return {"question_id": example.question_id, "conversation": conv}


def write_benchmark(out_dir: str | Path, seed: int, n_examples: int, clock: Clock = Clock(), size: int = 224,
                    fps: float = 10.0, progress: bool = False) -> Path:
    """Write ``videos/*.mp4``, ``frames/<id>/*.png``, ``gold.json``, ``infer_input.json`` (paths inside are
    relative to ``out_dir``) and ``scenes.json`` (every object's timeline, for debugging) under ``out_dir``."""
    import cv2

    from edge_duet.errors import InputError, UsageError

    if n_examples < 1:
        raise UsageError(f"`n_examples` must be at least 1, got {n_examples}")
    if clock.frame_interval_s <= 0 or clock.frames_per_turn < 1:
        raise UsageError("`frame_interval_s` must be > 0 and `frames_per_turn` >= 1")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    examples = sample_examples(seed, n_examples, clock)
    gold, infer, scene_log = [], [], {}
    it = examples
    if progress:
        from tqdm import tqdm

        it = tqdm(examples, desc="make-benchmark", unit="video")
    for ex in it:
        video = f"videos/{ex.question_id}.mp4"
        writer = cv2.VideoWriter(str(out / video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
        if not writer.isOpened():
            raise InputError(f"OpenCV cannot write {out / video} (no mp4v encoder in this OpenCV build)")
        for j in range(int(round(ex.duration_s * fps))):
            writer.write(sc.render_frame(ex.scene, round(j / fps, 6), size))
        writer.release()
        frame_dir = out / "frames" / ex.question_id
        frame_dir.mkdir(parents=True, exist_ok=True)
        names = {}
        for i in range(clock.num_frames(ex.duration_s)):
            t = clock.frame_time(i)
            names[t] = f"frames/{ex.question_id}/{i:04d}.png"
            cv2.imwrite(str(out / names[t]), sc.render_frame(ex.scene, t, size))
        gold.append(gold_entry(ex, video))
        infer.append(infer_entry(ex, clock, names.__getitem__))
        scene_log[ex.question_id] = ex.scene.to_dict()
    meta = {"seed": seed, "frame_interval_s": clock.frame_interval_s, "frames_per_turn": clock.frames_per_turn}
    (out / "gold.json").write_text(json.dumps(gold, indent=1) + "\n")
    (out / "infer_input.json").write_text(json.dumps(infer, indent=1) + "\n")
    (out / "scenes.json").write_text(json.dumps({"meta": meta, "scenes": scene_log}, indent=1) + "\n")
    return out
