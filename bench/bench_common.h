/* Helpers shared by levi's benchmark programs (bench/bench_*.c): CPU time, peak memory,
 * medians, and the one machine-readable result line that bench/run.sh parses.
 *
 * For: the benchmark executables only (static functions, header-only, so each bench_*.c
 * stays one translation unit as the CMake glob builds it).
 * Not for: the library (it prints nothing and has its own clock, levi_now).
 *
 * The result line is the protocol between a benchmark and bench/run.sh, identical for the
 * PyTorch scripts in bench/pytorch/ (common.py prints the same):
 *   BENCH case=<a|b|c|d|peak> side=<levi|torch> threads=<T> unit=<what value counts>
 *         value=<throughput, median> gflops=<GFLOP/s at the median> maxrss_mib=<peak RSS>
 *         cpu_wall=<process CPU s / wall s> [more key=value pairs]
 * on one line, the last line the program prints. Values never contain spaces.
 */
#ifndef LEVI_BENCH_COMMON_H
#define LEVI_BENCH_COMMON_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

/* Process CPU seconds: cpu/wall near the thread count means the run had the cores to itself;
 * well below means other processes took them and the figures are unreliable. */
static inline double bench_cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Peak resident set of this process in MiB (Linux reports ru_maxrss in KiB). */
static inline double bench_maxrss_mib(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return -1.0;
    return (double)ru.ru_maxrss / 1024.0;
}

static inline int bench_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts v in place; returns the median (upper median for even n, as the Python scripts'
 * sorted(v)[n // 2]). */
static inline double bench_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, bench_cmp_double);
    return v[n / 2];
}

/* Prints the BENCH line: the fixed fields, then `extra_fmt` (more " key=value" pairs, may be
 * ""). */
static inline void bench_result(const char *bench_case, int threads, const char *unit, double value,
                                double gflops, double cpu_wall, const char *extra_fmt, ...)
    __attribute__((format(printf, 7, 8)));
static inline void bench_result(const char *bench_case, int threads, const char *unit, double value,
                                double gflops, double cpu_wall, const char *extra_fmt, ...) {
    printf("BENCH case=%s side=levi threads=%d unit=%s value=%.4g gflops=%.2f maxrss_mib=%.1f "
           "cpu_wall=%.2f",
           bench_case, threads, unit, value, gflops, bench_maxrss_mib(), cpu_wall);
    va_list ap;
    va_start(ap, extra_fmt);
    vprintf(extra_fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

#endif /* LEVI_BENCH_COMMON_H */
