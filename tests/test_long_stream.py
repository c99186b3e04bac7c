"""A two-hour stream at one turn per second (simulated clock) keeps memory flat and keeps answering."""

from __future__ import annotations

import numpy as np

from edge_duet.runtime.events import Evicted, Reply, Silence, TurnStats
from edge_duet.runtime.session import Session, SessionOptions


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def frame(k: int) -> np.ndarray:
    """A 56x84 scene with a square moving one pixel per frame."""
    img = np.full((56, 84, 3), 40, dtype=np.uint8)
    x = k % 70
    img[20:34, x:x + 14] = (0, 0, 255)
    return img


def test_two_hour_stream_has_flat_memory(tiny_bundle, capsys):
    turns = 2 * 3600  # one turn per second for two hours
    s = Session(tiny_bundle, SessionOptions(max_new_tokens=2, max_context_tokens=640))
    answered, evictions, max_ctx, rss = 0, 0, 0, {}
    for k in range(turns):
        if k % 300 == 5:
            s.ask("What is moving?")
        s.add_frames([frame(2 * k), frame(2 * k + 1)], t=float(k + 1))
        outcome = False
        for ev in s.step():
            if isinstance(ev, (Reply, Silence)) and ev.turn == k:
                outcome = True
            elif isinstance(ev, Evicted):
                evictions += 1
            elif isinstance(ev, TurnStats):
                max_ctx = max(max_ctx, ev.context_tokens)
        answered += outcome
        if k in (600, turns // 2, turns - 1):
            rss[k] = rss_mb()
    assert answered == turns
    assert max_ctx <= 640
    assert evictions > 100  # the window was rebuilt many times over the two hours
    assert len(s.segments) < 200  # the dialogue kept in memory is bounded too
    growth = rss[turns - 1] - rss[600]
    with capsys.disabled():
        print(f"\n[long stream] {turns} turns, {evictions} evictions, context <= {max_ctx} tokens, "
              f"RSS at turn 600 / 3600 / 7199: {rss[600]:.0f} / {rss[turns // 2]:.0f} / {rss[turns - 1]:.0f} MB")
    assert growth < 25, f"memory grew {growth:.1f} MB over the stream"
