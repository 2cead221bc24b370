#!/usr/bin/env bash
# Runs levi's bench_train and PyTorch's bench_train.py (same model, data sizes and batch
# slicing) at 1 and 2 threads, alternating the two so both see the same machine load, and
# prints each one's steps/s and the ratio levi / PyTorch.
#
# Usage: bench/run_train.sh [path/to/bench_train]   (default: <repo>/build/bench_train)
# Environment: PYTORCH_BENCH_DIR (default <repo>/../shared/bench/pytorch), PYTHON (default
#   /usr/bin/python3, which has torch), STEPS (2000), THREADS ("1 2"), REPEATS (1; the best
#   of REPEATS runs is kept for each side, as PERFORMANCE.md advises for two threads).
# Two ratios are printed: wall clock, and per CPU-second (steps/s divided by cpu/wall). On a
# machine shared with other work the second is the fairer one at one thread, because a
# preempted process loses wall time but not CPU time; at two threads only wall clock counts.
# Not for: correctness (ctest) or timings of anything but the cached-feature training step.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${1:-$ROOT/build/bench_train}
PYDIR=${PYTORCH_BENCH_DIR:-$ROOT/../shared/bench/pytorch}
PY=${PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-2000}
THREADS=${THREADS:-"1 2"}
REPEATS=${REPEATS:-1}

if [[ ! -x $BENCH ]]; then
    echo "run_train.sh: $BENCH is not an executable (build the bench_train target, or pass its path)" >&2
    exit 2
fi
if [[ ! -f $PYDIR/bench_train.py ]]; then
    echo "run_train.sh: $PYDIR/bench_train.py not found (set PYTORCH_BENCH_DIR)" >&2
    exit 2
fi

field() { # field NAME LINE -> the number after "NAME="
    grep -o "$1=[0-9.]*" <<<"$2" | head -n1 | cut -d= -f2
}
best() { # best A B -> the larger (empty counts as 0)
    awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { print (a > b ? a : b) }'
}

printf '%-8s %-10s %12s %12s %14s\n' threads side steps/s cpu/wall steps/cpu-s
for t in $THREADS; do
    lw=0 lc=0 pw=0 pc=0
    for ((r = 0; r < REPEATS; r++)); do
        # PASSIVE: idle OpenMP workers sleep instead of spinning against OpenBLAS's threads.
        lo=$(OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t \
            "$BENCH" --threads "$t" --steps "$STEPS" | tail -n1)
        po=$(OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t \
            "$PY" "$PYDIR/bench_train.py" --threads "$t" --steps "$STEPS" | tail -n1)
        ls=$(field steps/s "$lo") lcw=$(field cpu/wall "$lo")
        ps=$(field steps/s "$po") pcw=$(field cpu/wall "$po")
        lw=$(best "$lw" "$ls")
        pw=$(best "$pw" "$ps")
        lc=$(best "$lc" "$(awk -v s="$ls" -v c="$lcw" 'BEGIN { printf "%.1f", s / c }')")
        pc=$(best "$pc" "$(awk -v s="$ps" -v c="$pcw" 'BEGIN { printf "%.1f", s / c }')")
        printf '%-8s %-10s %12s %12s %14s\n' "$t" levi "$ls" "$lcw" \
            "$(awk -v s="$ls" -v c="$lcw" 'BEGIN { printf "%.1f", s / c }')"
        printf '%-8s %-10s %12s %12s %14s\n' "$t" pytorch "$ps" "$pcw" \
            "$(awk -v s="$ps" -v c="$pcw" 'BEGIN { printf "%.1f", s / c }')"
    done
    awk -v t="$t" -v lw="$lw" -v pw="$pw" -v lc="$lc" -v pc="$pc" 'BEGIN {
        printf "threads=%s  best levi %.1f vs pytorch %.1f steps/s: ratio %.2f (wall), %.2f (per CPU-second)\n",
               t, lw, pw, lw / pw, lc / pc }'
done
