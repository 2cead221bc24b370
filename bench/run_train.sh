#!/usr/bin/env bash
# Superseded by bench/run.sh (case a); kept so older instructions still work. Runs the
# cached-feature LEVI training benchmark, levi vs PyTorch, at each thread count of $THREADS.
# Usage: bench/run_train.sh [path/to/bench_train]   (its folder is the build folder)
# Environment: THREADS ("1 2"), REPEATS (rounds, default 1), PYTHON (-> LEVI_BENCH_PYTHON).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/build/bench_train}
[[ -n ${PYTHON:-} ]] && export LEVI_BENCH_PYTHON=$PYTHON
for t in ${THREADS:-1 2}; do
    "$root/bench/run.sh" --build "$(dirname "$bin")" --only a --threads "$t" --rounds "${REPEATS:-1}"
done
