#!/usr/bin/env bash
# Reproduce the shipped demo model (edge_duet/models/demo) from nothing: three training stages of
# `edge-duet train-demo`, export, score. About 2.5 h on an idle 2-core CPU (1.0-1.5 s per step); a step count,
# not a time budget, fixes the data and the result whatever the machine's load. See docs/TRAINING.md.
#   bash scripts/train_demo_model.sh            # writes artifacts/demo-stage{1,2,3}, then the bundle
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
