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

# Issue 15: the peers beside edge-duet in one lockstep run on the same checkpoint and stream (60 turns of two
# 224x224 frames): the transformers loops, onnxruntime-genai and llama.cpp. The peers live in their own venv, so
# that onnxruntime-genai's onnxruntime never replaces the project's (see docs/performance.md, "Peers"):
#   python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install onnxruntime-genai llama-cpp-python
#   pip download --no-deps --no-binary :all: llama-cpp-python   # its sdist holds vendor/llama.cpp (the converter)
PEER_PYTHON=${PEER_PYTHON:-/work/peers-venv/bin/python}
LLAMA_CPP_SRC=${LLAMA_CPP_SRC:-/work/peers-build/llama_cpp_python-0.3.36/vendor/llama.cpp}
edge-duet bench --shape bench --threads 1 --frame-size 224x224 --turns 60 --at 1,10,50,60 \
    --quantize int8 --quantize int4 --baseline both --no-drop-runs --peers both \
    --peer-python "$PEER_PYTHON" --llama-cpp-src "$LLAMA_CPP_SRC" \
    --json "$OUT/cpu2-bench-peers-1.json" --plot docs/performance-peers.png
# The same again, twice, to see the run-to-run spread on a shared machine (and run 4: a later session, another CPU).
for run in 2 3 4; do
    edge-duet bench --shape bench --threads 1 --frame-size 224x224 --turns 60 --at 1,10,50,60 \
        --quantize int8 --quantize int4 --baseline both --no-drop-runs --peers both \
        --peer-python "$PEER_PYTHON" --llama-cpp-src "$LLAMA_CPP_SRC" --json "$OUT/cpu2-bench-peers-$run.json"
done

# The same stream to turn 200 with the jobs the issue asks about (edge-duet fp32 and int8, transformers with KV
# reuse, the two peers): docs/performance.md, "200 turns with the peers".
edge-duet bench --shape bench --threads 1 --frame-size 224x224 --turns 200 --at 1,10,50,200 --quantize int8 \
    --baseline kv --no-drop-runs --peers both --peer-python "$PEER_PYTHON" --llama-cpp-src "$LLAMA_CPP_SRC" \
    --json "$OUT/cpu2-bench-peers-200.json" --plot docs/performance-peers-200.png
