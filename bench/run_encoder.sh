#!/usr/bin/env bash
# Superseded by bench/run.sh (case b); kept so older instructions still work. Runs the encoder
# forward benchmark, levi vs PyTorch, at each thread count of $THREADS (default "1 2").
# Usage: bench/run_encoder.sh [path/to/bench_encoder]   (its folder is the build folder)
# Environment: ROUNDS (3), THREADS ("1 2"), PYTHON (-> LEVI_BENCH_PYTHON).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-${LEVI_BENCH_BIN:-$root/build/bench_encoder}}
[[ -n ${PYTHON:-} ]] && export LEVI_BENCH_PYTHON=$PYTHON
for t in ${THREADS:-1 2}; do
    "$root/bench/run.sh" --build "$(dirname "$bin")" --only b --threads "$t" --rounds "${ROUNDS:-3}"
done
