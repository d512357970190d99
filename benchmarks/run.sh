#!/usr/bin/env bash
# Regenerates benchmarks/results/: the quickstart recipe and the edge-cpu recipe (base preset with a minimal
# teacher: training the full base model takes hours on a CPU), each measured in one run on this machine.
# Usage: benchmarks/run.sh [quickstart|edge-cpu|all]   (from the repository root, with vlmedge installed)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
mkdir -p benchmarks/results
export HF_HUB_OFFLINE=1
if [[ "$what" == quickstart || "$what" == all ]]; then
  /usr/bin/time -f "quickstart wall time: %e s" vlmedge compress recipes/quickstart.yaml --out runs/bench-quickstart \
    2>&1 | tee benchmarks/results/quickstart.log
  cp runs/bench-quickstart/report.md benchmarks/results/quickstart.md
  cp runs/bench-quickstart/report.json benchmarks/results/quickstart.json
  cp runs/bench-quickstart/pareto.png benchmarks/results/quickstart-pareto.png
fi
if [[ "$what" == edge-cpu || "$what" == all ]]; then
  /usr/bin/time -f "edge-cpu wall time: %e s" vlmedge compress recipes/edge-cpu.yaml --out runs/bench-edge-cpu \
    --set stages.train.steps=2 --set stages.train.batch_size=8 --set stages.distill.steps=2 \
    --set stages.distill.batch_size=8 --set data.count=256 --set eval.zero_shot_images=72 \
    --set eval.retrieval_pairs=64 --set eval.hard_negative_pairs=16 \
    2>&1 | tee benchmarks/results/edge-cpu.log
  cp runs/bench-edge-cpu/report.md benchmarks/results/edge-cpu.md
  cp runs/bench-edge-cpu/report.json benchmarks/results/edge-cpu.json
fi
