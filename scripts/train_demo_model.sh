#!/usr/bin/env bash
# Reproduce the shipped demo model (edge_duet/models/demo) from nothing: three training stages of
# `edge-duet train-demo`, export, score. About 2.5 h on an idle 2-core CPU (1.0-1.5 s per step); a step count,
# not a time budget, fixes the data and the result whatever the machine's load. See docs/TRAINING.md.
#   bash scripts/train_demo_model.sh            # writes artifacts/demo-stage{1,2,3}, then the bundle
#   RL=1 bash scripts/train_demo_model.sh       # and the multi-turn RL stage measured against it (not shipped:
#                                               # it did not beat stage 3 on the held-out splits, docs/TRAINING.md)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/edge_duet_on_path.sh
A=artifacts

# 1. from scratch: 6-turn dialogues for the first 35 % of the steps, then full-length ones (lr 2e-3)
edge-duet train-demo "$A/demo-stage1" --steps 2000 --seed 0
# 2. and 3. continue with fresh data (other seeds) and lower peak learning rates, full-length dialogues only
edge-duet train-demo "$A/demo-stage2" --init-from "$A/demo-stage1" --steps 1500 --lr 1e-3 --seed 1
edge-duet train-demo "$A/demo-stage3" --init-from "$A/demo-stage2" --steps 1000 --lr 5e-4 --seed 2

edge-duet export "$A/demo-stage3" edge_duet/models/demo --overwrite --name edge-duet-demo
bash benchmarks/score_demo.sh

if [ "${RL:-0}" = 1 ]; then
  # 4. MMDuet2's multi-turn GRPO on stage 3 (~40 min at 2-5 s per step), and the ablation without the out-of-span
  #    term; each exported and scored on the same held-out splits (artifacts/score-<run>/<seed>/report.json)
  edge-duet train-rl "$A/demo-rl" --sft "$A/demo-stage3" --steps 500 --lr 2e-5 --max-new-tokens 24 --seed 0
  edge-duet train-rl "$A/demo-rl-no-outspan" --sft "$A/demo-stage3" --steps 500 --lr 2e-5 --max-new-tokens 24 \
    --seed 0 --w-outspan 0
  for run in demo-rl demo-rl-no-outspan; do
    edge-duet export "$A/$run" "$A/$run-bundle" --overwrite --name "edge-duet-$run"
    bash benchmarks/score_demo.sh "$A/$run-bundle" "$A/score-$run"
  done
fi
