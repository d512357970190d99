#!/usr/bin/env bash
# Regenerates benchmarks/results/ from the shipped recipes, each run from scratch and measured in one run on this
# machine (run it with the CPU otherwise idle): quickstart, vqa-quickstart and rerank-quickstart as shipped, and
# edge-cpu (base preset) with a minimal teacher (training base on a CPU takes hours: its latency and size mean
# something, its accuracy does not). Per recipe: NAME.json (the report, with the provenance record: command, commit,
# environment, load average before and after), NAME.md, NAME.log, and NAME-planted.xml: the recipe's gates judged
# on the run as if its quantize step were removed (`vlmedge gate RUN --step export --remeasure 0`), the regression
# its gate on what quantizing bought must catch. `python benchmarks/tables.py` then regenerates the docs' tables.
# Usage: benchmarks/run.sh [quickstart|vqa-quickstart|rerank-quickstart|edge-cpu|all] [--quick DIR]
#   (from the repository root, vlmedge installed; all: the four, about 45 minutes on 2 cores)
# --quick DIR: the suite's check of this script: the dual-encoder recipes on the tiny preset, every stage a few
# steps, results and runs under DIR instead of benchmarks/results and runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
results=benchmarks/results runs=runs quick=()
if [[ "${2:-}" == --quick ]]; then
  results="${3:?--quick needs a folder}" runs="${3}/runs"
  quick=(--set model.preset=tiny --set data.count=256 --set stages.train.steps=2 --set stages.train.batch_size=8
         --set stages.prune.calibration_batches=1 --set stages.prune.batch_size=8 --set stages.distill.steps=2
         --set stages.distill.batch_size=8 --set stages.quantize.tune_threads=false --set stages.export.tune_threads=false
         --set eval.zero_shot_images=36 --set eval.retrieval_pairs=32 --set eval.hard_negative_pairs=16
         --set measure.rounds=1 --set measure.warmup=1 --set measure.min_runs=3 --set measure.min_seconds=0)
fi
mkdir -p "$results"
export HF_HUB_OFFLINE=1

# NAME RECIPE [--set ...]: run it, copy its report here, stamp the copy with where and how it was measured
measure() {
  local name="$1" recipe="$2" started load
  shift 2
  started=$(date +%s) load=$(cut -d' ' -f1-3 /proc/loadavg)
  /usr/bin/time -f "$name wall time: %e s" vlmedge compress "$recipe" --out "$runs/bench-$name" "$@" "${quick[@]}" \
    2>&1 | tee "$results/$name.log"
  # stamped in the run folder, before anything lands in the results folder (its commit is the tree's as measured)
  python3 benchmarks/provenance.py stamp "$runs/bench-$name/report.json" --started "$started" --load-before $load \
    --command "benchmarks/run.sh $what${quick:+ --quick $results}"
  cp "$runs/bench-$name/report.md" "$results/$name.md"
  cp "$runs/bench-$name/report.json" "$results/$name.json"
  [[ ! -f "$runs/bench-$name/pareto.png" ]] || cp "$runs/bench-$name/pareto.png" "$results/$name-pareto.png"
  vlmedge gate "$runs/bench-$name" --step export --remeasure 0 --junit "$results/$name-planted.xml" >/dev/null \
    || true  # failing is what it is for; the verdicts are in the XML
}

if [[ "$what" == quickstart || "$what" == all ]]; then
  measure quickstart recipes/quickstart.yaml
fi
for name in vqa-quickstart rerank-quickstart; do
  if [[ "$what" == "$name" || "$what" == all ]]; then
    if (( ${#quick[@]} )); then echo "$name: not in --quick (its families' tiny runs are in the test suite)"
    else measure "$name" "recipes/$name.yaml"; fi
  fi
done
if [[ "$what" == edge-cpu || "$what" == all ]]; then
  measure edge-cpu recipes/edge-cpu.yaml \
    --set stages.train.steps=2 --set stages.train.batch_size=8 --set stages.distill.steps=2 \
    --set stages.distill.batch_size=8 --set data.count=256 --set eval.zero_shot_images=72 \
    --set eval.retrieval_pairs=64 --set eval.hard_negative_pairs=16
fi
