#!/usr/bin/env bash
# One command: build the peers' environments if needed, then run every flow and the harness, and write
# benchmarks/RESULTS.md.   Usage: benchmarks/peers/run.sh [--quick]   (from anywhere; a few minutes with --quick)
set -euo pipefail
cd "$(dirname "$0")/../.."
benchmarks/peers/envs.sh
export HF_HUB_OFFLINE=1
runs/peers/env-inc/bin/python benchmarks/peers/run.py "$@" 2>&1 | tee runs/peers/run.log
