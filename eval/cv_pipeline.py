"""A non-learned reference for the synthetic benchmark: colour thresholds and contour shapes (OpenCV), a tracker,
and the benchmark's answer templates. It sees exactly what a model sees (the frames and questions of
``infer_input.json``, turn by turn) and never reads the gold; it shows how much of the benchmark a 2-core CPU
solves without learning, i.e. a ceiling a small model should approach.

    frame ──> detect(): pixels far from grey, each given the nearest palette colour; one contour per blob ->
              (colour, shape from vertices and solidity, centre)
          ──> Tracker.update(): match blobs to tracks by position -> events (appear, leave, recolour, move)
    turn  ──> Dialogue.turn(): parse the turn's questions (the benchmark's templates), answer the must-reply ones
              from the last frame, report the events and count changes the open questions ask for
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from . import benchmark as bm
from . import scenes

MIN_CHROMA = 60  # max - min channel on a blurred frame: backgrounds are grey-ish (< ~40), objects >= ~100
MIN_AREA = 0.004  # of the frame area: objects cover ~4-7 %
MATCH_DIST = 0.16  # of the frame side: the farthest a tracked object moves between two frames (1 s apart)
MOVE_DIST = 0.035  # of the frame side: beyond camera jitter (<= 1.4 % each way)

_PALETTE = np.array([scenes.COLOURS[c] for c in scenes.COLOUR_NAMES], np.float32)  # (5, 3) BGR


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str
    x: float  # centre, fractions of the frame side
    y: float


def _shape(contour: np.ndarray) -> str:
    area = cv2.contourArea(contour)
    hull = cv2.contourArea(cv2.convexHull(contour))
    if hull <= 0 or area / hull < 0.8:  # a star's notches: solidity ~0.6; the other shapes are convex
        return "star"
    corners = len(cv2.approxPolyDP(contour, 0.04 * cv2.arcLength(contour, True), True))
    return {3: "triangle", 4: "square"}.get(corners, "circle")


def detect(frame: np.ndarray) -> list[Blob]:
    """The coloured shapes of a BGR frame."""
    size = frame.shape[0]
    img = cv2.GaussianBlur(frame, (5, 5), 0)
    chroma = cv2.subtract(img.max(axis=2), img.min(axis=2))
    coloured = chroma > MIN_CHROMA
    label = np.full(chroma.shape, -1, np.int64)  # index into the palette, -1 for grey pixels
    pixels = img[coloured].astype(np.float32)  # (N, 3)
    label[coloured] = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(axis=2).argmin(axis=1)
    kernel = np.ones((3, 3), np.uint8)
    out = []
    for k, colour in enumerate(scenes.COLOUR_NAMES):
        mask = (label == k).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for c in contours:
            if cv2.contourArea(c) < MIN_AREA * size * size:
                continue
            m = cv2.moments(c)
            out.append(Blob(colour, _shape(c), m["m10"] / m["m00"] / size, m["m01"] / m["m00"] / size))
    return out


@dataclass
class Track:
    colour: str
    x: float
    y: float
    anchor: tuple[float, float]  # where it rests; a move is reported once it is MOVE_DIST away
    shapes: list[str] = field(default_factory=list)  # one vote per frame: a blurred frame can misread a corner
    moved: bool = False

    @property
    def shape(self) -> str:
        return max(set(self.shapes), key=self.shapes.count)


@dataclass(frozen=True)
class Event:
    kind: str  # one of bm.EVENT_KINDS
    colour: str  # the colour the answer names: before leaving, after changing
    shape: str


class Tracker:
    def __init__(self) -> None:
        self.tracks: list[Track] = []
        self.started = False

    def update(self, blobs: Sequence[Blob]) -> list[Event]:
        """Match the frame's blobs to the tracks (nearest first) and return what happened since the last frame."""
        pairs = sorted(
            (math.dist((t.x, t.y), (b.x, b.y)), i, j)
            for i, t in enumerate(self.tracks) for j, b in enumerate(blobs)
        )  # fmt: skip
        matched_t: dict[int, int] = {}
        matched_b: set[int] = set()
        for d, i, j in pairs:
            if d <= MATCH_DIST and i not in matched_t and j not in matched_b:
                matched_t[i] = j
                matched_b.add(j)
        events, kept = [], []
        for i, t in enumerate(self.tracks):
            if i not in matched_t:
                events.append(Event("leave", t.colour, t.shape))
                continue
            b = blobs[matched_t[i]]
            t.x, t.y = b.x, b.y
            t.shapes.append(b.shape)
            if b.colour != t.colour:
                t.colour = b.colour
                events.append(Event("recolour", t.colour, t.shape))
            if not t.moved and math.dist(t.anchor, (t.x, t.y)) > MOVE_DIST:
                t.moved = True
                events.append(Event("move", t.colour, t.shape))
            kept.append(t)
        for j, b in enumerate(blobs):
            if j not in matched_b:
                kept.append(Track(b.colour, b.x, b.y, (b.x, b.y), [b.shape]))
                if self.started:  # objects of the first frame were there all along
                    events.append(Event("appear", b.colour, b.shape))
        self.tracks = kept
        self.started = True
        return events


# ----------------------------------------------------------------------------------------------- dialogue


def _pattern(template: str) -> re.Pattern:
    colours, shapes = "|".join(scenes.COLOUR_NAMES), "|".join(scenes.SHAPES)
    text = re.escape(template).replace(r"\{colour\}", f"(?P<colour>{colours})")
    return re.compile(text.replace(r"\{shape\}", f"(?P<shape>{shapes})"))


# The benchmark's questions, longest first (Q_HOW_MANY is the start of Q_COUNT), with what each asks for.
QUESTIONS: list[tuple[re.Pattern, str]] = [
    (_pattern(bm.Q_COUNT), "count"),
    (_pattern(bm.Q_HOW_MANY), "how-many"),
    (_pattern(bm.Q_APPEAR_ANY), "appear"),
    (_pattern(bm.Q_APPEAR_COLOUR), "appear"),
    (_pattern(bm.Q_APPEAR_SHAPE), "appear"),
    (_pattern(bm.Q_LEAVE_ONE), "leave"),
    (_pattern(bm.Q_LEAVE), "leave"),
    (_pattern(bm.Q_RECOLOUR), "recolour"),
    (_pattern(bm.Q_MOVE), "move"),
    (_pattern(bm.Q_WHAT_COLOUR), "what-colour"),
    (_pattern(bm.Q_WHAT_SHAPE), "what-shape"),
]


@dataclass(frozen=True)
class Watch:
    """An open "tell me when" question: an event kind, optionally about one colour and/or shape."""

    kind: str
    colour: str | None = None
    shape: str | None = None

    def wants(self, e: Event) -> bool:
        return e.kind == self.kind and self.colour in (None, e.colour) and self.shape in (None, e.shape)


class Dialogue:
    """One stream: feed it each turn's frames and question text, get the reply or None (silence)."""

    def __init__(self) -> None:
        self.tracker = Tracker()
        self.watches: list[Watch] = []
        self.count_said: int | None = None  # the last count reported, while a count question is open
        self.counting = False

    def turn(self, frames: Sequence[np.ndarray], text: str | None) -> str | None:
        events = [e for f in frames for e in self.tracker.update(detect(f))]
        now: list[str] = []  # answers to questions of this turn that need one now
        for match, asks in _questions(text or ""):
            colour, shape = match.groupdict().get("colour"), match.groupdict().get("shape")
            if asks == "count":
                self.counting, self.count_said = True, None
            elif asks == "how-many":
                now.append(bm.a_count(len(self.tracker.tracks)))
            elif asks == "what-colour":
                found = [t for t in self.tracker.tracks if t.shape == shape]
                now += [bm.A_WHAT_COLOUR.format(shape=shape, colour=found[0].colour)] if found else []
            elif asks == "what-shape":
                found = [t for t in self.tracker.tracks if t.colour == colour]
                now += [bm.A_WHAT_SHAPE.format(colour=colour, shape=found[0].shape)] if found else []
            else:
                self.watches.append(Watch(asks, colour, shape))
        said = [bm.EVENT_ANSWERS[e.kind].format(colour=e.colour, shape=e.shape)
                for e in events if any(w.wants(e) for w in self.watches)]  # fmt: skip
        n = len(self.tracker.tracks)
        if self.counting and n != self.count_said and n <= len(bm.NUMBERS) - 1:
            said.append(bm.a_count(n))
            self.count_said = n
        replies = list(dict.fromkeys(now + said))
        return " ".join(replies) if replies else None


def _questions(text: str) -> list[tuple[re.Match, str]]:
    """The benchmark questions in ``text``, in order (a turn may bring two)."""
    found = []
    for pattern, asks in QUESTIONS:
        for m in pattern.finditer(text):
            found.append((m, asks))
            text = text[: m.start()] + " " * (m.end() - m.start()) + text[m.end():]  # so Q_HOW_MANY skips Q_COUNT
    return sorted(found, key=lambda f: f[0].start())
