"""Worst turn against the median turn over a stream with evictions, smooth eviction on vs off, one process
(docs/performance.md, "Eviction without a stall"). Usage:
python scripts/measure_eviction_stall.py BUNDLE [--turns 150] [--max-context 2048] [--threads 1]

Both sessions see the same frames, turn by turn in lockstep (so load changes hit both); a turn's time is
``step()`` run to its end, the shadow's share of the next eviction included.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edge_duet.runtime.events import Evicted, Reply
from edge_duet.runtime.session import Session, SessionOptions


def frame(k: int) -> np.ndarray:
    """A 640x480 textured scene with a drifting square and noise (the bench's kind of frame)."""
    rng = np.random.default_rng(k)
    img = np.full((480, 640, 3), 90, dtype=np.uint8)
    img[::16] = 60
    x = (k * 7) % 560
    img[200:280, x:x + 80] = (30, 160, 220)
    return np.clip(img + rng.integers(0, 12, img.shape), 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--turns", type=int, default=150)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sessions = {smooth: Session(args.bundle, SessionOptions(max_new_tokens=8, max_context_tokens=args.max_context,
                                                            threads=args.threads, smooth_eviction=smooth))
                for smooth in (False, True)}
    times = {k: [] for k in sessions}
    evictions = {k: 0 for k in sessions}
    outputs = {k: [] for k in sessions}
    for n in range(args.turns):
        for smooth, s in sessions.items():
            if n == 1:
                s.ask("Tell me when the square reaches the right edge.")
            s.add_frames([frame(2 * n), frame(2 * n + 1)], t=float(n), channels="rgb")
            t0 = time.perf_counter()
            for ev in s.step():
                evictions[smooth] += isinstance(ev, Evicted)
                if isinstance(ev, Reply):
                    outputs[smooth].append((ev.turn, ev.token_ids))
            times[smooth].append(time.perf_counter() - t0)
    s = sessions[True]
    print(f"{args.bundle} ({s.engine.flavour} decoder), {args.turns} turns, max_context {args.max_context}, "
          f"{args.threads} thread(s); same replies: {outputs[True] == outputs[False]} and dialogue: "
          f"{sessions[True].dialogue_ids() == sessions[False].dialogue_ids()}; shadow swaps {s._reanchor.swaps}, "
          f"misses {s._reanchor.misses}")
    print("| eviction | evictions | median turn ms | p90 ms | worst ms | worst / median |")
    print("|---|---|---|---|---|---|")
    for smooth in (False, True):
        t = sorted(times[smooth][5:])  # the first turns warm the arena up
        med, p90, worst = statistics.median(t), t[int(0.9 * len(t))], t[-1]
        name = "smooth (shadow)" if smooth else "in one turn"
        print(f"| {name} | {evictions[smooth]} | {med * 1e3:.0f} | {p90 * 1e3:.0f} | {worst * 1e3:.0f} | "
              f"{worst / med:.2f}x |")


if __name__ == "__main__":
    main()
