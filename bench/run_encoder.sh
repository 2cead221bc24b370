#!/usr/bin/env bash
# Encoder forward throughput, levi vs PyTorch, measured interleaved (levi, torch, levi, ...)
# at 1 and 2 threads so both see the same machine state; prints each round and the ratio
# of medians and of bests.
#
# For: bench/bench_encoder.c against ../shared/bench/pytorch/bench_encoder.py (MiniLM-L6
# shapes, batch 64 x seq 64, all hidden states, fp32, inference).
# Not for: accuracy (tests/test_bert.c).
#
# Usage: bench/run_encoder.sh [BENCH_BIN [PYTORCH_BENCH_DIR]]
#   BENCH_BIN          levi's bench_encoder (default: $LEVI_BENCH_BIN, else build/bench_encoder)
#   PYTORCH_BENCH_DIR  folder of bench_encoder.py (default: $PYTORCH_BENCH_DIR, else
#                      ../shared/bench/pytorch relative to the repository root)
# Environment: ROUNDS (3), ITERS (10), THREADS ("1 2"), BATCH (64), SEQ (64),
#   PYTHON (/usr/bin/python3, the interpreter with Debian's torch).
# With 2 threads both run with OMP_WAIT_POLICY=PASSIVE: otherwise OpenMP workers spin while
# OpenBLAS's own threads need the cores (docs/PERFORMANCE.md). cpu/wall well below the thread
# count means other processes took the cores during that run: compare ratios, not figures.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-${LEVI_BENCH_BIN:-$root/build/bench_encoder}}
ptdir=${2:-${PYTORCH_BENCH_DIR:-$root/../shared/bench/pytorch}}
rounds=${ROUNDS:-3}
iters=${ITERS:-10}
threads_list=${THREADS:-1 2}
batch=${BATCH:-64}
seq=${SEQ:-64}
python=${PYTHON:-/usr/bin/python3}

if [[ ! -x $bin ]]; then
    echo "run_encoder.sh: levi benchmark '$bin' not found or not executable;" \
        "build it (cmake --build <dir> --target bench_encoder) and pass its path" >&2
    exit 2
fi
if [[ ! -f $ptdir/bench_encoder.py ]]; then
    echo "run_encoder.sh: '$ptdir/bench_encoder.py' not found; pass the folder as the second" \
        "argument or set PYTORCH_BENCH_DIR" >&2
    exit 2
fi
if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "run_encoder.sh: '$python' cannot import torch; set PYTHON" >&2
    exit 2
fi

# "median 912 ms/batch: 70.2 seq/s, 4493 tok/s, ... | best ... | cpu/wall=0.99" -> "4493 <best> 0.99"
parse() {
    awk '/^median/ {
        for (i = 1; i <= NF; i++) if ($i == "tok/s,") { if (!m) m = $(i - 1); else b = $(i - 1) }
        for (i = 1; i <= NF; i++) if ($i ~ /^cpu\/wall=/) { split($i, a, "="); c = a[2] }
        print m, b, c }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
maxof() { sort -g | tail -1; }

echo "levi: $bin"
echo "torch: $ptdir/bench_encoder.py ($("$python" -c 'import torch; print(torch.__version__)'))"
echo "batch $batch x seq $seq, $iters iterations after 2 warmups, median per run; $rounds rounds"
for t in $threads_list; do
    envs=(OMP_NUM_THREADS="$t" OPENBLAS_NUM_THREADS="$t")
    if [[ $t -gt 1 ]]; then envs+=(OMP_WAIT_POLICY=PASSIVE); fi
    lm=() lb=() tm=() tb=()
    for ((r = 1; r <= rounds; r++)); do
        read -r l_med l_best l_cw < <(env "${envs[@]}" "$bin" --threads "$t" --batch "$batch" \
            --seq "$seq" --iters "$iters" | parse)
        read -r t_med t_best t_cw < <(env "${envs[@]}" "$python" "$ptdir/bench_encoder.py" \
            --threads "$t" --batch "$batch" --seq "$seq" --iters "$iters" | parse)
        printf "threads %d round %d: levi %6s tok/s (best %6s, cpu/wall %s) | torch %6s tok/s" \
            "$t" "$r" "$l_med" "$l_best" "$l_cw" "$t_med"
        printf " (best %6s, cpu/wall %s) | ratio %.2f\n" "$t_best" "$t_cw" \
            "$(awk -v a="$l_med" -v b="$t_med" 'BEGIN { print a / b }')"
        lm+=("$l_med") lb+=("$l_best") tm+=("$t_med") tb+=("$t_best")
    done
    l_mm=$(printf "%s\n" "${lm[@]}" | median) t_mm=$(printf "%s\n" "${tm[@]}" | median)
    l_bb=$(printf "%s\n" "${lb[@]}" | maxof) t_bb=$(printf "%s\n" "${tb[@]}" | maxof)
    printf "threads %d: median of medians levi %s / torch %s tok/s = %.2fx;" "$t" "$l_mm" "$t_mm" \
        "$(awk -v a="$l_mm" -v b="$t_mm" 'BEGIN { print a / b }')"
    printf " best levi %s / torch %s tok/s = %.2fx\n" "$l_bb" "$t_bb" \
        "$(awk -v a="$l_bb" -v b="$t_bb" 'BEGIN { print a / b }')"
done
