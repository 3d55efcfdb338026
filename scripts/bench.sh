#!/usr/bin/env bash
# Benchmarks (custom/bench/): scripts/bench.sh [ROWS] [QUICK]   (make bench ONLY=<row,...> QUICK=1)
# Prints the table and writes it to bench/results/bench.md and bench.json ($BENCH_RESULTS: elsewhere); the rows work
# under workspace/bench/.
source "$(dirname "$0")/common.sh"
rows=${1:-} quick=$(flag QUICK "${2:-}")
check_var ONLY "$rows" rows
args=(--work "$WORK/bench" --out "${BENCH_RESULTS:-$REPO/bench/results}")
[[ -n $rows ]] && args+=(--only "$rows")
[[ $quick == true ]] && args+=(--quick)
python -m bench "${args[@]}"
