"""Synthetic scenes for the proactive benchmark and the demo model: coloured shapes that appear, move, leave and
change colour at known times, drawn with OpenCV over varied backgrounds with noise and camera jitter.

A :class:`Scene` is pure data (frozen dataclasses, positions and sizes as fractions of the frame), so the same
scene renders at any size and any time ``t`` with :func:`render_frame`; every random choice made while drawing
(noise, jitter) is a function of the scene's seed and ``t``, never of call order. A frame rendered twice is
byte-identical, and a video frame at ``t`` equals the extracted frame at ``t``.

Sizes: objects have a radius of 11-15 % of the frame side. The demo model sees frames at 112x112, where one
visual token covers a 28-px cell (a quarter of the side), so an object spans about 2x2 cells and its shape is
visible inside a cell, not only its colour.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

# BGR (OpenCV order). Saturated colours far apart in hue, so they survive noise, tinting and JPEG/MPEG coding.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (40, 40, 225),
    "green": (50, 190, 40),
    "blue": (225, 90, 20),
    "yellow": (30, 215, 235),
    "purple": (190, 50, 160),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "stripes", "blotches", "checker")
NEVER = math.inf

# Non-overlapping anchor positions (fractions of the frame); objects start at one and may move to another.
SLOTS: tuple[tuple[float, float], ...] = tuple((x, y) for y in (0.22, 0.5, 0.78) for x in (0.22, 0.5, 0.78))


@dataclass(frozen=True)
class SceneObject:
    """One shape and its whole life. Times in seconds of video; ``NEVER`` (inf) for events that do not happen.

    Position ``(x, y)`` and ``radius`` are fractions of the frame side. Between ``move_start_s`` and
    ``move_end_s`` the centre moves linearly from ``(x, y)`` to ``(x1, y1)`` and stays there afterwards.
    """

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    angle_deg: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)
    appear_s: float = 0.0
    leave_s: float = NEVER
    recolour_s: float = NEVER
    new_colour: str = ""
    move_start_s: float = NEVER
    move_end_s: float = NEVER
    x1: float = 0.0
    y1: float = 0.0

    @property
    def name(self) -> str:
        """How the dialogue names it: colour at first sight and shape ("red circle")."""
        return f"{self.colour} {self.shape}"

    def visible(self, t: float) -> bool:
        return self.appear_s <= t < self.leave_s

    def colour_at(self, t: float) -> str:
        return self.new_colour if t >= self.recolour_s else self.colour

    def centre_at(self, t: float) -> tuple[float, float]:
        if t <= self.move_start_s:
            return self.x, self.y
        if t >= self.move_end_s:
            return self.x1, self.y1
        a = (t - self.move_start_s) / (self.move_end_s - self.move_start_s)
        return self.x + a * (self.x1 - self.x), self.y + a * (self.y1 - self.y)

    def state_at(self, t: float) -> tuple:
        """What a viewer could tell apart between two frames: visible, colour, position."""
        if not self.visible(t):
            return (False,)
        cx, cy = self.centre_at(t)
        return (True, self.colour_at(t), round(cx, 4), round(cy, 4))

    def to_dict(self) -> dict:
        def num(v: float):
            return None if math.isinf(v) else round(v, 3)

        return {
            "shape": self.shape, "colour": self.colour, "x": round(self.x, 3), "y": round(self.y, 3),
            "radius": round(self.radius, 3), "appear_s": num(self.appear_s), "leave_s": num(self.leave_s),
            "recolour_s": num(self.recolour_s), "new_colour": self.new_colour or None,
            "move_start_s": num(self.move_start_s), "move_end_s": num(self.move_end_s),
            "x1": round(self.x1, 3), "y1": round(self.y1, 3),
        }


@dataclass(frozen=True)
class Background:
    kind: str
    base: tuple[int, int, int]
    accent: tuple[int, int, int]
    period: float = 0.25  # stripes/checker period as a fraction of the frame side
    seed: int = 0


@dataclass(frozen=True)
class Scene:
    """A background, objects, and how the camera misbehaves. ``seed`` drives per-frame noise."""

    duration_s: float
    background: Background
    objects: tuple[SceneObject, ...] = ()
    noise_sigma: float = 0.0
    jitter_px: float = 0.0  # amplitude at 224 px; scales with the frame size
    jitter_phase: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    seed: int = 0

    def visible_objects(self, t: float) -> list[SceneObject]:
        return [o for o in self.objects if o.visible(t)]

    def to_dict(self) -> dict:
        b = self.background
        return {
            "duration_s": self.duration_s, "background": {"kind": b.kind, "base": list(b.base),
                                                            "accent": list(b.accent)},
            "noise_sigma": round(self.noise_sigma, 2), "jitter_px": round(self.jitter_px, 2),
            "objects": [o.to_dict() for o in self.objects],
        }


# ------------------------------------------------------------------------------------------------ sampling


def random_background(rng: np.random.Generator) -> Background:
    """A low-saturation background (grey-ish, any brightness) so that object colours stay the salient thing."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    level = int(rng.integers(25, 215))

    def greyish(v: int) -> tuple[int, int, int]:
        return tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for _ in range(3))  # type: ignore[return-value]

    contrast = int(rng.integers(15, 45)) * (1 if level < 128 else -1)
    return Background(kind, greyish(level), greyish(level + contrast), float(rng.uniform(0.12, 0.35)),
                      int(rng.integers(1 << 30)))


def random_scene_style(rng: np.random.Generator, duration_s: float) -> Scene:
    """An empty scene: background, noise level, camera jitter."""
    return Scene(
        duration_s=float(duration_s),
        background=random_background(rng),
        noise_sigma=float(rng.choice([0.0, 3.0, 6.0, 10.0])),
        jitter_px=float(rng.choice([0.0, 1.5, 3.0])),
        jitter_phase=tuple(float(v) for v in rng.uniform(0, 2 * math.pi, 4)),  # type: ignore[arg-type]
        seed=int(rng.integers(1 << 30)),
    )


def random_object(rng: np.random.Generator, shape: str, colour: str, slot: int) -> SceneObject:
    sx, sy = SLOTS[slot]
    return SceneObject(
        shape=shape,
        colour=colour,
        x=float(sx + rng.uniform(-0.04, 0.04)),
        y=float(sy + rng.uniform(-0.04, 0.04)),
        radius=float(rng.uniform(0.11, 0.15)),
        angle_deg=float(rng.uniform(-15, 15)) if shape != "circle" else 0.0,
        tint=tuple(int(v) for v in rng.integers(-20, 21, 3)),  # type: ignore[arg-type]
    )


def with_move(obj: SceneObject, rng: np.random.Generator, start_s: float, slot: int) -> SceneObject:
    """``obj`` starting to move at ``start_s`` towards anchor ``slot`` (2-3.5 s of travel)."""
    sx, sy = SLOTS[slot]
    return replace(obj, move_start_s=start_s, move_end_s=start_s + float(rng.uniform(2.0, 3.5)),
                   x1=float(sx + rng.uniform(-0.03, 0.03)), y1=float(sy + rng.uniform(-0.03, 0.03)))


# ----------------------------------------------------------------------------------------------- rendering


def _jitter(scene: Scene, t: float, size: int) -> tuple[int, int]:
    if scene.jitter_px <= 0:
        return 0, 0
    a = scene.jitter_px * size / 224
    p = scene.jitter_phase
    dx = a * (0.7 * math.sin(2.3 * t + p[0]) + 0.3 * math.sin(7.1 * t + p[1]))
    dy = a * (0.7 * math.sin(1.9 * t + p[2]) + 0.3 * math.sin(6.3 * t + p[3]))
    return int(round(dx)), int(round(dy))


@functools.lru_cache(maxsize=16)
def _background_image(bg: Background, size: int) -> np.ndarray:
    """The background at ``size`` plus a margin on every side for camera jitter. Read-only, cached."""
    n = size + 2 * _margin(size)
    base = np.array(bg.base, np.float32)
    accent = np.array(bg.accent, np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    if bg.kind == "flat":
        w = np.zeros((n, n), np.float32)
    elif bg.kind == "gradient":
        w = (xx + yy) / 2
    elif bg.kind == "stripes":
        w = (np.floor(xx / bg.period) % 2).astype(np.float32)
    elif bg.kind == "checker":
        w = ((np.floor(xx / bg.period) + np.floor(yy / bg.period)) % 2).astype(np.float32)
    else:  # blotches: smooth random field
        rng = np.random.default_rng(bg.seed)
        coarse = rng.random((5, 5)).astype(np.float32)
        w = cv2.resize(coarse, (n, n), interpolation=cv2.INTER_CUBIC)
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-6)
    img = base[None, None, :] * (1 - w[..., None]) + accent[None, None, :] * w[..., None]
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


def _margin(size: int) -> int:
    return max(4, size // 32)


def _polygon(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> np.ndarray | None:
    """Vertices (float, pixels) of a polygonal shape, or None for a circle. Areas roughly match a circle of r."""
    a0 = math.radians(angle_deg)
    if shape == "square":
        h = 0.89 * r  # half side: area 3.2 r^2, about a circle's
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        R = 1.35 * r
        pts = [(R * math.sin(2 * math.pi * k / 3), -R * math.cos(2 * math.pi * k / 3)) for k in range(3)]
        pts = [(x, y + 0.2 * r) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            R = 1.4 * r if k % 2 == 0 else 0.6 * r
            a = math.pi * k / 5
            pts.append((R * math.sin(a), -R * math.cos(a)))
    else:
        return None
    c, s = math.cos(a0), math.sin(a0)
    return np.array([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], np.float64)


_SHIFT = 4  # cv2 fixed-point bits: sub-pixel accurate edges


def _draw(img: np.ndarray, obj: SceneObject, t: float, size: int, off: tuple[int, int], value, aa: bool) -> None:
    cx, cy = obj.centre_at(t)
    px, py = cx * size + off[0], cy * size + off[1]
    r = obj.radius * size
    line = cv2.LINE_AA if aa else cv2.LINE_8
    poly = _polygon(obj.shape, px, py, r, obj.angle_deg)
    k = 1 << _SHIFT
    if poly is None:
        cv2.circle(img, (int(round(px * k)), int(round(py * k))), int(round(r * k)), value, -1, line, _SHIFT)
    else:
        cv2.fillPoly(img, [np.round(poly * k).astype(np.int32)], value, line, _SHIFT)


def object_bgr(obj: SceneObject, t: float) -> tuple[int, int, int]:
    base = COLOURS[obj.colour_at(t)]
    return tuple(int(np.clip(b + d, 0, 255)) for b, d in zip(base, obj.tint))  # type: ignore[return-value]


def render_frame(scene: Scene, t: float, size: int = 224) -> np.ndarray:
    """The frame at video time ``t``: ``size``x``size``x3 uint8, BGR."""
    m = _margin(size)
    dx, dy = _jitter(scene, t, size)
    img = _background_image(scene.background, size)[m + dy: m + dy + size, m + dx: m + dx + size].copy()
    for obj in scene.objects:
        if obj.visible(t):
            _draw(img, obj, t, size, (-dx, -dy), object_bgr(obj, t), aa=True)
    if scene.noise_sigma > 0:
        rng = np.random.default_rng((scene.seed, int(round(t * 1000))))
        noise = rng.normal(0.0, scene.noise_sigma, img.shape).astype(np.float32)
        img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return img


def object_id_map(scene: Scene, t: float, size: int) -> np.ndarray:
    """``size``x``size`` uint8: 1 + index of the topmost object covering each pixel, 0 for background.
    The camera jitter of :func:`render_frame` applies here too (the crop moves by ``+jitter``, so the content
    moves by ``-jitter``)."""
    ids = np.zeros((size, size), np.uint8)
    dx, dy = _jitter(scene, t, size)
    for i, obj in enumerate(scene.objects):
        if obj.visible(t):
            _draw(ids, obj, t, size, (-dx, -dy), i + 1, aa=False)
    return ids


def cell_objects(scene: Scene, t: float, grid: int, size: int = 112, min_cover: float = 0.12) -> np.ndarray:
    """Which object dominates each cell of a ``grid``x``grid`` raster (the visual tokens' order) at time ``t``:
    ``(grid*grid,)`` int64 indices into ``scene.objects``, -1 where no object covers ``min_cover`` of the cell."""
    ids = object_id_map(scene, t, size)
    cell = size // grid
    counts = np.zeros((grid * grid, len(scene.objects) + 1), np.int64)
    blocks = ids[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(grid * grid, cell * cell)
    for k in range(len(scene.objects) + 1):
        counts[:, k] = (blocks == k).sum(1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    cover = counts[np.arange(grid * grid), best] / (cell * cell)
    return np.where(cover >= min_cover, best - 1, -1).astype(np.int64)
