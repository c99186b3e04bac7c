#!/usr/bin/env bash
# The demo model's scores on the held-out benchmark splits, as reported in docs/MODEL_CARD.md:
#   bash benchmarks/score_demo.sh [BUNDLE]      (default: the shipped bundle; ~8 min on a 2-core CPU)
# Seeds 1234 (60 examples, the split used while developing) and 2468 (240 examples: enough replies after the
# first in a span for the duplicate % to mean something) are never used for training data: train-demo draws its
# dialogues from other seeds. Writes artifacts/bench-<seed> and artifacts/score-demo/<seed>/{pred.jsonl,report.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/edge_duet_on_path.sh
BUNDLE=${1:-}
for split in 1234:60 2468:240; do
  seed=${split%%:*} n=${split##*:}
  bench=artifacts/bench-$seed-$n out=artifacts/score-demo/$seed
  mkdir -p "$out"
  [ -f "$bench/gold.json" ] || edge-duet make-benchmark "$bench" --seed "$seed" --examples "$n"
  edge-duet infer "$bench/infer_input.json" ${BUNDLE:+--model "$BUNDLE"} -o "$out/pred.jsonl"
  echo "== held-out split: seed $seed, $n examples"
  edge-duet eval "$bench/gold.json" "$out/pred.jsonl" --baselines --json "$out/report.json"
done
