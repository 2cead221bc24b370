/* Benchmark: the machine's attainable fp32 peak, measured in the same run as the other
 * benchmarks so "% of peak" compares against what this machine delivers now, not a datasheet.
 *
 * Two figures, at --threads T:
 *  - sgemm: C[512,512] = A[512,512] B[512,512] through levi_gemm (its back end, oneDNN or
 *    OpenBLAS, is printed as gemm=), best of --reps
 *    calls after warmup; 2 * 512^3 FLOP per call. This is the denominator of run.sh's
 *    "% of peak": it is what a BLAS-bound workload can reach here.
 *  - fma: an FMA loop over 12 independent vector accumulators per thread (vector width as
 *    compiled: 256-bit lanes with -march=native on AVX2/AVX-512 machines), best of --reps;
 *    2 FLOP per lane per FMA. The arithmetic ceiling; SGEMM reaches ~90% of it.
 * Not for: BLAS comparisons at other shapes (docs/PERFORMANCE.md has those).
 *
 * Usage: bench_peak [--threads 1] [--reps 20]
 */
#include "bench_common.h"
#include "levi/core.h"

#include <stdint.h>
#include <string.h>

typedef float bench_v8 __attribute__((vector_size(32)));
enum { FMA_ACC = 12, FMA_ITERS = 4000000 };

/* FMA_ITERS * FMA_ACC vector FMAs per thread; returns a value that depends on all of them so
 * the loop cannot be removed. 12 accumulators cover 2 FMA pipes x 4-5 cycles of latency. */
static float fma_loop(float seed) {
    bench_v8 x, y, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
    for (int k = 0; k < 8; k++) x[k] = 1.0f - 1e-7f * (float)k, y[k] = 1e-7f * seed;
    /* Distinct starting values: equal ones would let the compiler merge the chains. */
    a0 = y + seed, a1 = y + 1, a2 = y + 2, a3 = y + 3, a4 = y + 4, a5 = y + 5;
    a6 = y + 6, a7 = y + 7, a8 = y + 8, a9 = y + 9, a10 = y + 10, a11 = y + 11;
    /* Named accumulators, not an array: an array is kept in memory by the compiler and the
     * loop then measures store-to-load forwarding instead of the FMA units. */
    for (long i = 0; i < FMA_ITERS; i++) {
        a0 = a0 * x + y, a1 = a1 * x + y, a2 = a2 * x + y, a3 = a3 * x + y;
        a4 = a4 * x + y, a5 = a5 * x + y, a6 = a6 * x + y, a7 = a7 * x + y;
        a8 = a8 * x + y, a9 = a9 * x + y, a10 = a10 * x + y, a11 = a11 * x + y;
    }
    bench_v8 s8 = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    float s = 0;
    for (int k = 0; k < 8; k++) s += s8[k];
    return s;
}

int main(int argc, char **argv) {
    int threads = 1, reps = 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--threads N] [--reps R]\n", argv[0]);
            return 2;
        }
    }
    if (threads < 1 || reps < 1) {
        fprintf(stderr, "bench_peak: --threads and --reps must be >= 1\n");
        return 2;
    }
    levi_set_num_threads(threads);

    enum { N = 512 };
    float *A = levi_xmalloc(sizeof(float) * N * N), *B = levi_xmalloc(sizeof(float) * N * N),
          *C = levi_xmalloc(sizeof(float) * N * N);
    levi_rng r;
    levi_rng_seed(&r, 0);
    for (int i = 0; i < N * N; i++) A[i] = levi_rng_uniform(&r) - 0.5f, B[i] = levi_rng_uniform(&r);
    const double gemm_flop = 2.0 * N * N * N;
    double best_gemm = 1e30, c0 = bench_cpu_seconds(), w0 = levi_now();
    for (int i = 0; i < reps + 3; i++) {
        double t0 = levi_now();
        levi_gemm(0, 0, N, N, N, 1.0f, A, N, B, N, 0.0f, C, N);
        double dt = levi_now() - t0;
        if (i >= 3 && dt < best_gemm) best_gemm = dt; /* 3 warmup calls: buffers, threads */
    }
    const double cpu_wall = (bench_cpu_seconds() - c0) / (levi_now() - w0);
    volatile float sink = C[N * N / 2];
    (void)sink;

    /* Without OpenMP the loop runs on one thread only, and the figure says so. */
#ifdef _OPENMP
    const int fma_threads = threads;
#else
    const int fma_threads = 1;
#endif
    double best_fma = 1e30;
    volatile float fsink = 0;
    for (int i = 0; i < (reps < 5 ? reps : 5); i++) {
        double t0 = levi_now();
        float s = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(fma_threads) reduction(+ : s)
#endif
        for (int t = 0; t < fma_threads; t++) s += fma_loop((float)t);
        double dt = levi_now() - t0;
        fsink += s;
        if (dt < best_fma) best_fma = dt;
    }
    const double fma_flop = (double)fma_threads * FMA_ITERS * FMA_ACC * 8 * 2;
    const double sgemm_gf = gemm_flop / best_gemm * 1e-9, fma_gf = fma_flop / best_fma * 1e-9;
    printf("peak threads=%d: sgemm 512^3 via levi_gemm (%s) best %.2f ms = %.1f GFLOP/s; "
           "fma loop (12 x 256-bit accumulators, %d thread%s) %.1f GFLOP/s\n",
           threads, levi_gemm_backend(), best_gemm * 1e3, sgemm_gf, fma_threads,
           fma_threads == 1 ? "" : "s", fma_gf);
    bench_result("peak", threads, "GFLOP/s", sgemm_gf, sgemm_gf, cpu_wall,
                 " sgemm512_gflops=%.2f fma_gflops=%.2f fma_threads=%d gemm=%s", sgemm_gf, fma_gf,
                 fma_threads, levi_gemm_backend());
    levi_free(A), levi_free(B), levi_free(C);
    return 0;
}
