#!/usr/bin/env bash
# The runs behind docs/performance.md. Needs the export extra (the transformers baseline, making the random
# checkpoint) and matplotlib (the plot). One thread per job: on a shared machine a 2-thread OpenMP pool loses
# several-fold to other users' processes (PyTorch far more than ONNX Runtime), which would flatter edge-duet.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/edge_duet_on_path.sh
OUT=benchmarks/results

# edge-duet fp32 and int8 (made with `edge-duet quantize --recipe int8`), each with and without token drop,
# beside the MMDuet2 demo loop and transformers with KV reuse, 200 turns in lockstep.
edge-duet bench --shape bench --threads 1 --quantize int8 --baseline both \
    --json "$OUT/cpu2-bench.json" --plot docs/performance-turns.png

# The same model with half the context budget: how flat the per-turn cost stays depends on it.
edge-duet bench --shape bench --threads 1 --baseline none --no-drop-runs --max-context 4096 \
    --json "$OUT/cpu2-bench-context4096.json"

# Decode against the bandwidth limit for every weight format `edge-duet quantize` offers on a CPU.
edge-duet bench --shape bench --threads 1 --quantize int8 --quantize w8 --quantize int4 --baseline none \
    --no-drop-runs --turns 22 --at 1,10,20 --json "$OUT/cpu2-bench-weightonly.json"
