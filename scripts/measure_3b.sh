#!/usr/bin/env bash
# The 3B table of docs/3b.md, measured: MMDuet2's shape (random weights, bf16, its published file layout) from
# checkpoint to running int4 bundle on this machine, each step under /usr/bin/time -v (wall time, peak RSS).
#   bash scripts/measure_3b.sh [WORKDIR]        # default /tmp/edge-duet-3b; needs ~60 GB of disk, ~45 min on 2 cores
#   STEPS="export quantize-cpu" bash scripts/measure_3b.sh    # only some steps (they reuse what earlier runs left)
# Steps: checkpoint export quantize-cpu quantize-jetson export-quantize bench-cpu inspect (also bench-jetson,
# bench-fp32: those bundles on the CPU; the fp32 one needs ~16 GB). Results: WORKDIR/3b.tsv
# (step, wall s, peak RSS GB, exit code) and each step's log beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/edge_duet_on_path.sh
W=${1:-/tmp/edge-duet-3b}
STEPS=${STEPS:-"checkpoint export quantize-cpu quantize-jetson export-quantize bench-cpu inspect"}
mkdir -p "$W"
TSV="$W/3b.tsv"
[ -f "$TSV" ] || printf 'step\twall_s\tpeak_rss_gb\texit\n' > "$TSV"

measure() {  # measure NAME COMMAND...: run it under /usr/bin/time -v, append its numbers to the table
  local name=$1; shift
  echo "== $name: $*" >&2
  set +e
  /usr/bin/time -v -o "$W/$name.time" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  set -e
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$W/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.2f", $2/1024/1024}' "$W/$name.time")
  printf '%s\t%s\t%s\t%s\n' "$name" "$wall" "$rss" "$rc" >> "$TSV"
  echo "   $name: ${wall} s, peak ${rss} GB, exit $rc" >&2
  tail -5 "$W/$name.log" >&2
}

for step in $STEPS; do
  case $step in
    checkpoint) rm -rf "$W/ckpt"; measure checkpoint edge-duet make-checkpoint "$W/ckpt" --shape 3b --dtype bfloat16 --flat-config ;;
    export) measure export edge-duet export "$W/ckpt" "$W/fp32" --overwrite ;;
    quantize-cpu) measure quantize-cpu edge-duet quantize "$W/fp32" "$W/cpu" --recipe cpu --overwrite ;;
    quantize-jetson) measure quantize-jetson edge-duet quantize "$W/fp32" "$W/jetson" --recipe jetson --overwrite ;;
    export-quantize) measure export-quantize edge-duet export "$W/ckpt" "$W/cpu-direct" --quantize cpu --overwrite ;;
    bench-*) b=${step#bench-}  # bench-cpu, bench-jetson, bench-fp32: that bundle on the CPU provider
       measure "$step" edge-duet bench "$W/$b" --providers cpu --baseline none --turns 6 --at 1,6 \
                 --reply-tokens 16 --no-drop-runs --json "$W/$step.json" ;;
    inspect) for b in fp32 cpu jetson; do [ -d "$W/$b" ] && edge-duet inspect "$W/$b" > "$W/inspect-$b.txt"; done; true ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
column -t "$TSV"
