"""Per-call decoder time, plain vs fused flavour, side by side in one process (docs/performance.md, "Decoder
flavours"). Usage: python scripts/measure_decoder_flavours.py BUNDLE [--threads 1] [--reps 7]

Each case: a cache of ``past`` tokens (random embeddings, text positions), then the timed call: a prefill of
``new`` tokens or one decode step; the median of ``reps`` runs, the flavours interleaved so load changes on a
shared machine hit both. Logits agree across flavours (checked, printed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edge_duet.runtime.context import Context
from edge_duet.runtime.engine import Engine

CASES = [("prefill 128 on 0", 0, 128), ("prefill 128 on 1024", 1024, 128), ("prefill 128 on 3072", 3072, 128),
         ("decode 1 on 128", 128, 1), ("decode 1 on 1024", 1024, 1), ("decode 1 on 3072", 3072, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    engines = {f: Engine(args.bundle, providers="cpu", threads=args.threads, graphs=("decoder",), decoder=f)
               for f in ("plain", "fused")}
    hidden = engines["plain"].manifest.text.hidden_size
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((4096, hidden)) * 0.02).astype(np.float32)
    pos = np.stack([np.arange(4096)] * 3)
    print(f"bundle {args.bundle} ({engines['plain'].manifest.variant}), {args.threads} thread(s), median of {args.reps}")
    print("| call | plain ms | fused ms | plain / fused | max abs dlogit |")
    print("|---|---|---|---|---|")
    for name, past, new in CASES:
        ctxs = {f: Context(e, past + new) for f, e in engines.items()}
        for c in ctxs.values():
            for s in range(0, past, 512):  # the cache, in slices
                c.feed(emb[s:min(past, s + 512)], pos[:, s:min(past, s + 512)])
        snap = {f: c.cache for f, c in ctxs.items()}  # plain: contiguous arrays, as a real call's outputs are
        times = {f: [] for f in ctxs}
        out = {}
        for _ in range(args.reps):
            for f, c in ctxs.items():
                t0 = time.perf_counter()
                out[f] = c.feed(emb[past:past + new], pos[:, past:past + new])
                times[f].append(time.perf_counter() - t0)
                c.cache = snap[f]  # the next rep feeds the same call again (fused: the same buffers, a length)
        p, fz = (statistics.median(times[f]) * 1000 for f in ("plain", "fused"))
        diff = float(np.abs(out["plain"] - out["fused"]).max())
        print(f"| {name} | {p:.1f} | {fz:.1f} | {p / fz:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
