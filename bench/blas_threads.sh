#!/usr/bin/env bash
# Thread interplay of OpenBLAS and levi's OpenMP loops at 2 threads: runs levi's cases a
# (bench_train) and b (bench_encoder) under each of
#   pthread-passive  Debian's default OpenBLAS (pthreads build), OMP_WAIT_POLICY=PASSIVE
#   pthread-active   the same, OpenMP's default wait policy (workers spin after a region)
#   openmp-default   OpenBLAS's OpenMP build (one libgomp pool for BLAS and levi's loops)
#   openmp-passive   the same with OMP_WAIT_POLICY=PASSIVE
# and, for scale, pthread at 1 thread; configurations interleaved round by round; prints the
# median throughput and cpu/wall of each.
#
# For: deciding which OpenBLAS build levi should link (docs/benchmarks.md, "Threads").
# Not for: comparisons with PyTorch (bench/run.sh).
# The OpenMP build is not installed system-wide: unpack it anywhere, e.g.
#   apt-get download libopenblas0-openmp && dpkg -x libopenblas0-openmp_*.deb /tmp/obo
# and pass the folder holding its libopenblas.so.0 (the benchmarks' RUNPATH names the pthread
# folder, which LD_LIBRARY_PATH overrides; the script checks with ldd which one is loaded).
#
# Usage: bench/blas_threads.sh --openmp-blas DIR [--build DIR] [--rounds 3] [--steps 1000]
#                              [--iters 5]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build omp_dir= rounds=3 steps=1000 iters=5
while (($#)); do
    case $1 in
    --openmp-blas) omp_dir=$2; shift ;;
    --build) build=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --steps) steps=$2; shift ;;
    --iters) iters=$2; shift ;;
    *) echo "usage: bench/blas_threads.sh --openmp-blas DIR [--build DIR] [--rounds R] [--steps S] [--iters N]" >&2
        exit 2 ;;
    esac
    shift
done
if [[ -z $omp_dir || ! -f $omp_dir/libopenblas.so.0 ]]; then
    echo "bench/blas_threads.sh: --openmp-blas DIR must hold libopenblas.so.0 of the OpenMP build" >&2
    exit 2
fi
for b in bench_train bench_encoder; do
    [[ -x $build/$b ]] || { echo "bench/blas_threads.sh: $build/$b not built" >&2; exit 1; }
done
loaded=$(LD_LIBRARY_PATH=$omp_dir ldd "$build/bench_train" | awk '/libopenblas/ { print $3 }')
if [[ $loaded != "$omp_dir"/* ]]; then
    echo "bench/blas_threads.sh: with LD_LIBRARY_PATH=$omp_dir the benchmark still loads $loaded" >&2
    exit 1
fi

configs=(pthread-1t pthread-passive pthread-active openmp-default openmp-passive)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/levi-blas-threads-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
field() { awk -v k="$1" '/^BENCH / { for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) v = substr($i, length(k) + 2) } END { print v }' "$2"; }

run_cfg() { # run_cfg CONFIG BENCH ARGS... -> BENCH line file
    local cfg=$1 bin=$2 t=2 env=(env -u OMP_WAIT_POLICY)
    shift 2
    case $cfg in
    pthread-1t) t=1 ;;
    pthread-passive) env+=(OMP_WAIT_POLICY=PASSIVE) ;;
    pthread-active) ;;
    openmp-default) env+=(LD_LIBRARY_PATH=$omp_dir) ;;
    openmp-passive) env+=(LD_LIBRARY_PATH=$omp_dir OMP_WAIT_POLICY=PASSIVE) ;;
    esac
    "${env[@]}" OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t "$build/$bin" --threads $t "$@"
}

for ((r = 1; r <= rounds; r++)); do
    for cfg in "${configs[@]}"; do
        run_cfg "$cfg" bench_train --steps "$steps" --warmup 20 >"$tmp/a.$cfg.$r"
        run_cfg "$cfg" bench_encoder --iters "$iters" --warmup 1 >"$tmp/b.$cfg.$r"
        printf 'round %d %-16s a %7s steps/s (cpu/wall %s)   b %6s tok/s (cpu/wall %s)\n' "$r" "$cfg" \
            "$(field value "$tmp/a.$cfg.$r")" "$(field cpu_wall "$tmp/a.$cfg.$r")" \
            "$(field value "$tmp/b.$cfg.$r")" "$(field cpu_wall "$tmp/b.$cfg.$r")" >&2
    done
done
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int(NR / 2) + 1] }'; }
printf '%-16s %12s %9s %12s %9s\n' config "a steps/s" cpu/wall "b tok/s" cpu/wall
for cfg in "${configs[@]}"; do
    row=()
    for c in a b; do
        for k in value cpu_wall; do
            row+=("$(for ((r = 1; r <= rounds; r++)); do field $k "$tmp/$c.$cfg.$r"; done | median)")
        done
    done
    printf '%-16s %12s %9s %12s %9s\n' "$cfg" "${row[@]}"
done
echo "(medians over $rounds interleaved rounds; OpenMP build: $loaded)"
