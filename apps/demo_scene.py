"""The scene `edge-duet run --demo` plays: shapes that appear, move, change colour and leave at scripted times.

Rendered with the benchmark's scene renderer (``edge_duet.eval.scenes``) so the demo model sees the kind of
picture it was trained on; a plain OpenCV drawing stands in where that module is not available. The video is
written once to the user cache and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEMO_QUESTION = "How many objects are there? Tell me when the number changes."
DEMO_DURATION_S = 24.0
DEMO_FPS = 10
DEMO_SIZE = 448

# (shape, colour, x, y, appear_s, leave_s, recolour_s, new_colour, move_start_s, move_end_s, x1, y1)
_SCRIPT = (
    ("circle", "red", 0.25, 0.30, 2.0, 20.0, 13.0, "green", None, None, 0.0, 0.0),
    ("square", "blue", 0.75, 0.70, 6.0, None, None, "", 9.0, 12.0, 0.30, 0.75),
    ("triangle", "yellow", 0.72, 0.25, 16.0, None, None, "", None, None, 0.0, 0.0),
)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "edge-duet"


def _renderer():
    """``(name, t -> BGR frame)``: the benchmark's renderer when it is installed, else a plain drawing."""
    try:
        from edge_duet.eval import scenes
    except ImportError:
        return "plain", _plain_frame
    try:
        inf = float("inf")
        objects = tuple(
            scenes.SceneObject(
                shape=s, colour=c, x=x, y=y, radius=0.13, appear_s=a, leave_s=inf if lv is None else lv,
                recolour_s=inf if rc is None else rc, new_colour=nc, move_start_s=inf if ms is None else ms,
                move_end_s=inf if me is None else me, x1=x1, y1=y1,
            )
            for s, c, x, y, a, lv, rc, nc, ms, me, x1, y1 in _SCRIPT
        )
        scene = scenes.Scene(
            duration_s=DEMO_DURATION_S, background=scenes.Background("gradient", (150, 150, 150), (110, 110, 110)),
            objects=objects, noise_sigma=2.0,
        )
        scenes.render_frame(scene, 0.0, DEMO_SIZE)
    except (AttributeError, TypeError, ValueError, KeyError):  # that module changed shape: draw it ourselves
        return "plain", _plain_frame
    return "scenes", lambda t: scenes.render_frame(scene, t, DEMO_SIZE)


_BGR = {"red": (40, 40, 225), "green": (50, 190, 40), "blue": (225, 90, 20), "yellow": (30, 215, 235)}


def _plain_frame(t: float) -> np.ndarray:
    import cv2

    n = DEMO_SIZE
    img = np.full((n, n, 3), 140, np.uint8)
    for shape, colour, x, y, appear, leave, recolour, new_colour, m0, m1, x1, y1 in _SCRIPT:
        if t < appear or (leave is not None and t >= leave):
            continue
        if m0 is not None and t > m0:
            f = min(1.0, (t - m0) / (m1 - m0))
            x, y = x + f * (x1 - x), y + f * (y1 - y)
        bgr = _BGR[new_colour if recolour is not None and t >= recolour else colour]
        cx, cy, r = int(x * n), int(y * n), int(0.13 * n)
        if shape == "circle":
            cv2.circle(img, (cx, cy), r, bgr, -1, cv2.LINE_AA)
        elif shape == "square":
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), bgr, -1)
        else:
            pts = np.array([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], np.int32)
            cv2.fillPoly(img, [pts], bgr, cv2.LINE_AA)
    return img


def write_demo_video(path: str | Path, duration_s: float = DEMO_DURATION_S, fps: int = DEMO_FPS) -> Path:
    """Render the demo scene to an mp4 file (MPEG-4 Part 2, readable by every OpenCV build)."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    _, render = _renderer()
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (DEMO_SIZE, DEMO_SIZE))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {tmp}")
    try:
        for i in range(int(round(duration_s * fps))):
            writer.write(render(i / fps))
    finally:
        writer.release()
    os.replace(tmp, path)  # a half-written video is never mistaken for the cached one
    return path


def demo_video() -> Path:
    """The demo video, rendered on first use into ``~/.cache/edge-duet/``."""
    kind, _ = _renderer()
    path = _cache_dir() / f"demo-scene-v1-{kind}-{DEMO_SIZE}px.mp4"
    if not path.is_file():
        write_demo_video(path)
    return path
