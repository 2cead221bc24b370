/* Tests of include/levi/core.h: errors, checked sizes, arena, parameter table, RNG streams,
 * GEMM against the naive reference, atomic files and SHA-256 (FIPS 180-2 test vectors). */
#include "levi/core.h"
#include "testutil.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static void test_errors(void **state) {
    (void)state;
    levi_error err = {0};
    assert_int_equal(levi_errorf(&err, LEVI_ERR_FORMAT, "%s:%d: bad", "f.txt", 3), LEVI_ERR_FORMAT);
    assert_string_equal(err.msg, "f.txt:3: bad");
    levi_error_prefix(&err, "while loading %s: ", "x");
    assert_string_equal(err.msg, "while loading x: f.txt:3: bad");
    assert_int_equal(err.status, LEVI_ERR_FORMAT);
    assert_int_equal(levi_errorf(NULL, LEVI_ERR_IO, "ignored"), LEVI_ERR_IO);
}

static void test_sizes(void **state) {
    (void)state;
    size_t out = 7;
    assert_true(levi_mul_size(1u << 20, 1u << 10, &out));
    assert_int_equal(out, (size_t)1 << 30);
    out = 7;
    assert_false(levi_mul_size(SIZE_MAX / 2, 3, &out));
    assert_int_equal(out, 7);
    assert_false(levi_add_size(SIZE_MAX, 1, &out));
}

static void test_arena(void **state) {
    (void)state;
    levi_arena *a = levi_arena_init(1024);
    float *x = levi_arena_floats(a, 10);
    char *y = levi_arena_alloc(a, 3);
    float *z = levi_arena_floats(a, 4);
    assert_true(((uintptr_t)x % 64) == 0 && ((uintptr_t)y % 64) == 0 && ((uintptr_t)z % 64) == 0);
    assert_true(levi_arena_used(a) <= 1024);
    for (int i = 0; i < 4; i++) assert_true(z[i] == 0.0f);
    levi_arena_reset(a);
    assert_int_equal(levi_arena_used(a), 0);
    levi_arena_free(a);
    levi_arena_free(NULL);
}

static void test_params(void **state) {
    (void)state;
    levi_params p;
    levi_params_init(&p);
    int64_t s1[2] = {3, 5}, s2[1] = {7};
    int a = levi_params_add(&p, "layer.0.weight", 2, s1);
    int b = levi_params_add(&p, "layer.0.bias", 1, s2);
    levi_params_alloc(&p);
    assert_int_equal(levi_params_find(&p, "layer.0.bias"), b);
    assert_int_equal(levi_params_find(&p, "nope"), -1);
    assert_int_equal(p.items[a].numel, 15);
    assert_true(p.items[b].offset % 16 == 0 && p.items[b].offset >= 15);
    assert_true(levi_params_data(&p, b) == p.data + p.items[b].offset);
    assert_int_equal(levi_params_count_trainable(&p), 22);
    assert_int_equal(levi_params_set_trainable(&p, "layer.0.w", 0), 1);
    assert_int_equal(levi_params_count_trainable(&p), 7);
    levi_tensor t = levi_params_tensor(&p, a);
    assert_string_equal(t.name, "layer.0.weight");
    assert_int_equal(t.shape[1], 5);
    assert_int_equal(t.strides[0], 5);
    levi_params_free(&p);
}

static void test_rng(void **state) {
    (void)state;
    levi_rng r1, r2;
    levi_rng_seed(&r1, 42);
    levi_rng_seed(&r2, 42);
    for (int i = 0; i < 100; i++) assert_true(levi_rng_u64(&r1) == levi_rng_u64(&r2));
    levi_rng_seed(&r2, 43);
    assert_true(levi_rng_u64(&r1) != levi_rng_u64(&r2));
    /* Moments of uniform and normal draws over 200k samples. */
    double su = 0, sn = 0, sn2 = 0;
    int counts[10] = {0};
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        float u = levi_rng_uniform(&r1);
        assert_true(u >= 0.0f && u < 1.0f);
        su += u;
        float g = levi_rng_normal(&r1);
        sn += g;
        sn2 += (double)g * g;
        counts[levi_rng_below(&r1, 10)]++;
    }
    assert_true(fabs(su / n - 0.5) < 0.005);
    assert_true(fabs(sn / n) < 0.01);
    assert_true(fabs(sn2 / n - 1.0) < 0.02);
    for (int k = 0; k < 10; k++) assert_true(abs(counts[k] - n / 10) < n / 100);
    int64_t a[50];
    for (int i = 0; i < 50; i++) a[i] = i;
    levi_rng_shuffle_i64(&r1, a, 50);
    int64_t sum = 0, moved = 0;
    for (int i = 0; i < 50; i++) sum += a[i], moved += a[i] != i;
    assert_int_equal(sum, 49 * 50 / 2);
    assert_true(moved > 25);
}

/* levi_rng_dropout makes the draws n calls of levi_rng_uniform would, in the same order,
 * whichever outputs it writes, and leaves the stream where those calls would. */
static void test_rng_dropout(void **state) {
    (void)state;
    const size_t n = 1003;
    const float ps[] = {0.0f, 0.3f, 0.5f, 0.9f};
    float *mask = malloc(n * sizeof(float)), *x = malloc(n * sizeof(float));
    float *x2 = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
    for (int q = 0; q < 4; q++) {
        const float p = ps[q], keep = 1.0f / (1.0f - p);
        for (int variant = 0; variant < 3; variant++) {
            levi_rng ref, r;
            levi_rng_seed(&ref, 9 + q);
            levi_rng_seed(&r, 9 + q);
            int dropped = 0;
            for (size_t i = 0; i < n; i++) {
                want[i] = levi_rng_uniform(&ref) < p ? 0.0f : keep;
                dropped += want[i] == 0.0f;
                x[i] = x2[i] = 0.25f + (float)i;
            }
            levi_rng_dropout(&r, n, p, variant != 1 ? mask : NULL, variant != 0 ? x : NULL);
            for (size_t i = 0; i < n; i++) {
                if (variant != 1) assert_true(mask[i] == want[i]);
                if (variant != 0) assert_true(x[i] == x2[i] * want[i]);
            }
            assert_true(levi_rng_u64(&r) == levi_rng_u64(&ref));
            assert_true(abs(dropped - (int)(p * (float)n)) < (int)(0.06 * (double)n));
        }
    }
    free(mask), free(x), free(x2), free(want);
}

static void gemm_check(int M, int N, int K, int LD) {
    levi_rng r;
    levi_rng_seed(&r, 1);
    size_t n = (size_t)LD * LD;
    float *A = malloc(n * 4), *B = malloc(n * 4), *C1 = malloc(n * 4), *C2 = malloc(n * 4);
    for (size_t i = 0; i < n; i++) A[i] = levi_rng_normal(&r), B[i] = levi_rng_normal(&r);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            for (size_t i = 0; i < n; i++) C1[i] = C2[i] = (float)(i % 7);
            levi_gemm(ta, tb, M, N, K, 0.5f, A, LD, B, LD, 2.0f, C1, LD);
            levi_gemm_ref(ta, tb, M, N, K, 0.5f, A, LD, B, LD, 2.0f, C2, LD);
            /* outside the M x N block C stays as it was */
            assert_true(levi_test_max_abs_diff(C1, C2, (int)n) < 1e-4f * (1 + K / 64));
        }
    free(A), free(B), free(C1), free(C2);
}

/* The GEMM back ends the tests run on, in turn; levi_set_gemm_backend(gemm_backends[b]) fails
 * (and the test skips it, saying so) when the build lacks one. */
static const char *const gemm_backends[] = {"openblas", "onednn"};
static int use_gemm_backend(int b) {
    levi_error err = {0};
    if (levi_set_gemm_backend(gemm_backends[b], &err) == LEVI_OK) return 1;
    printf("# GEMM back end %s skipped: %s\n", gemm_backends[b], err.msg);
    return 0;
}

/* Both back ends, below and above the size where oneDNN takes over, every transpose. */
static void test_gemm(void **state) {
    (void)state;
    levi_error err = {0};
    for (int b = 0; b < 2; b++) {
        if (!use_gemm_backend(b)) continue;
        assert_string_equal(levi_gemm_backend(), gemm_backends[b]);
        gemm_check(37, 29, 41, 50);   /* 44k multiply-adds: OpenBLAS either way */
        gemm_check(70, 65, 130, 140); /* 591k: oneDNN when chosen */
        gemm_check(3, 200, 1000, 1000);
    }
    assert_int_equal(levi_set_gemm_backend("mkl", &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "mkl"));
    levi_set_gemm_backend(NULL, &err);
    assert_string_equal(levi_gemm_backend(), "openblas");
    levi_set_gemm_backend("onednn", &err);
}

static float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* levi_gemm_bf16 = the naive product of the operands rounded to bfloat16 (to nearest, ties to
 * even), every transpose, alpha and beta, strided operands, on both back ends (oneDNN's
 * bfloat16 matmul; the rounded operands through levi_gemm), a shape repeated after others
 * (the kept primitive) giving the same bits. */
static void test_gemm_bf16(void **state) {
    (void)state;
    assert_true(levi_bf16_round(1.0f) == 1.0f);
    assert_true(levi_bf16_round(bits_float(0x3F808000u)) == 1.0f);       /* tie: to even */
    assert_true(levi_bf16_round(bits_float(0x3F818000u)) == 1.015625f);  /* tie: to even */
    assert_true(levi_bf16_round(bits_float(0x3F80C000u)) == 1.0078125f); /* above the tie */
    assert_true(levi_bf16_round(bits_float(0x3F807FFFu)) == 1.0f);       /* below the tie */
    assert_true(levi_bf16_round(-2.5f) == -2.5f);
    assert_true(isinf(levi_bf16_round(INFINITY)) && isinf(levi_bf16_round(3.4e38f)));
    assert_true(isnan(levi_bf16_round(NAN)) && isnan(levi_bf16_round(bits_float(0x7F800001u))));
    const int shapes[][3] = {{37, 29, 41}, {70, 65, 130}, {200, 256, 384}, {3, 20, 17}};
    enum { LD = 400 };
    size_t n = (size_t)LD * LD;
    levi_rng r;
    levi_rng_seed(&r, 2);
    float *A = malloc(n * 4), *B = malloc(n * 4), *Ar = malloc(n * 4), *Br = malloc(n * 4);
    float *C1 = malloc(n * 4), *C2 = malloc(n * 4), *C3 = malloc(n * 4), *C0 = malloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        A[i] = levi_rng_normal(&r), B[i] = levi_rng_normal(&r);
        Ar[i] = levi_bf16_round(A[i]), Br[i] = levi_bf16_round(B[i]);
    }
    for (int be = 0; be < 2; be++) {
        if (!use_gemm_backend(be)) continue;
        for (int s = 0; s < 4; s++)
            for (int ta = 0; ta < 2; ta++)
                for (int tb = 0; tb < 2; tb++)
                    for (int beta = 0; beta < 3; beta += 2) {
                        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                        for (size_t i = 0; i < n; i++) C0[i] = C1[i] = C2[i] = (float)(i % 7);
                        levi_gemm_bf16(ta, tb, M, N, K, 0.5f, A, LD, B, LD, (float)beta, C1, LD);
                        levi_gemm_ref(ta, tb, M, N, K, 0.5f, Ar, LD, Br, LD, (float)beta, C2, LD);
                        levi_gemm_ref(ta, tb, M, N, K, 0.5f, A, LD, B, LD, (float)beta, C0, LD);
                        /* outside the M x N block C stays as it was */
                        assert_true(levi_test_max_abs_diff(C1, C2, (int)n) < 1e-4f * (1 + K / 64));
                        /* and the operands were rounded: the f32 product is further away */
                        assert_true(levi_test_max_abs_diff(C1, C0, (int)n) > 1e-3f);
                    }
    }
    /* The first shape again, after the others: the same bits as a fresh call sequence. */
    for (int rep = 0; rep < 2; rep++) {
        float *C = rep ? C3 : C1;
        for (size_t i = 0; i < n; i++) C[i] = 1.0f;
        levi_gemm_bf16(1, 0, 200, 256, 384, 1.0f, A, LD, B, LD, 1.0f, C, LD);
        if (!rep)
            for (int s = 0; s < 4; s++)
                levi_gemm_bf16(0, 1, shapes[s][0], shapes[s][1], shapes[s][2], 1.0f, A, LD, B, LD,
                               0.0f, C2, LD);
    }
    assert_memory_equal(C1, C3, n * sizeof(float));
    free(A), free(B), free(Ar), free(Br), free(C0), free(C1), free(C2), free(C3);
}

/* Training is deterministic for a seed and thread count; the large-GEMM back end must not
 * depend on anything else (timing, call order): two calls give the same bits. */
static void test_gemm_repeatable(void **state) {
    (void)state;
    enum { M = 256, N = 384, K = 1024 };
    levi_rng r;
    levi_rng_seed(&r, 2);
    float *A = malloc((size_t)M * K * 4), *B = malloc((size_t)K * N * 4);
    float *C1 = malloc((size_t)K * N * 4), *C2 = malloc((size_t)K * N * 4); /* K > M */
    for (int i = 0; i < M * K; i++) A[i] = levi_rng_normal(&r);
    for (int i = 0; i < K * N; i++) B[i] = levi_rng_normal(&r);
    for (int t = 1; t <= 2; t++) {
        levi_set_num_threads(t);
        /* a weight-gradient shape: A^T B with the long side inside */
        levi_gemm(1, 0, K, N, M, 1.0f, A, K, B, N, 0.0f, C1, N);
        levi_gemm(1, 0, K, N, M, 1.0f, A, K, B, N, 0.0f, C2, N);
        assert_memory_equal(C1, C2, (size_t)K * N * 4);
        levi_gemm(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, C1, N);
        levi_gemm(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, C2, N);
        assert_memory_equal(C1, C2, (size_t)M * N * 4);
    }
    levi_set_num_threads(1);
    free(A), free(B), free(C1), free(C2);
}

/* Packed weights: C = A W^T + beta C against the naive loop for shapes on both sides of the
 * oneDNN threshold, row counts below, at and above the padding limit; every row bit-identical
 * to the same row computed in a larger batch and at 2 threads; a new W is picked up by
 * levi_wpack_set; with the OpenBLAS back end, exactly levi_gemm. */
static void wpack_check(int N, int K) {
    enum { MMAX = 200 };
    levi_rng r;
    levi_rng_seed(&r, 7);
    float *A = malloc((size_t)MMAX * K * 4), *W = malloc((size_t)N * K * 4);
    float *C = malloc((size_t)MMAX * N * 4), *R = malloc((size_t)MMAX * N * 4);
    float *full = malloc((size_t)MMAX * N * 4);
    for (int i = 0; i < MMAX * K; i++) A[i] = levi_rng_normal(&r);
    for (int i = 0; i < N * K; i++) W[i] = levi_rng_normal(&r);
    levi_wpack *p = levi_wpack_new(N, K);
    levi_wpack_set(p, W);
    const int Ms[] = {1, 3, 15, 16, 17, 64, MMAX};
    for (int beta = 0; beta <= 1; beta++)
        for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++) {
            const int M = Ms[mi];
            for (int i = 0; i < M * N; i++) C[i] = R[i] = (float)(i % 5);
            levi_wpack_gemm(p, M, A, (float)beta, C);
            levi_gemm_ref(0, 1, M, N, K, 1.0f, A, K, W, K, (float)beta, R, N);
            assert_true(levi_test_max_abs_diff(C, R, M * N) < 1e-4f * (1 + K / 64));
        }
    levi_wpack_gemm(p, MMAX, A, 0.0f, full);
    const int starts[] = {0, 5, 150}, lens[] = {1, 2, 7, 16, 17, 33};
    for (int si = 0; si < 3; si++)
        for (int li = 0; li < 6; li++) {
            const int s0 = starts[si], L = lens[li];
            levi_wpack_gemm(p, L, A + (size_t)s0 * K, 0.0f, C);
            assert_memory_equal(C, full + (size_t)s0 * N, (size_t)L * N * 4);
        }
    levi_set_num_threads(2);
    levi_wpack_gemm(p, MMAX, A, 0.0f, C);
    levi_set_num_threads(1);
    assert_memory_equal(C, full, (size_t)MMAX * N * 4);
    for (int i = 0; i < N * K; i++) W[i] *= -2.0f; /* a new W: set again, results follow */
    levi_wpack_set(p, W);
    levi_wpack_gemm(p, MMAX, A, 0.0f, C);
    for (int i = 0; i < MMAX * N; i++) assert_true(C[i] == -2.0f * full[i]);
    levi_error err = {0};
    levi_set_gemm_backend("openblas", &err); /* switched after packing: levi_gemm's path */
    levi_wpack_gemm(p, MMAX, A, 0.0f, C);
    levi_gemm(0, 1, MMAX, N, K, 1.0f, A, K, W, K, 0.0f, R, N);
    assert_memory_equal(C, R, (size_t)MMAX * N * 4);
    levi_set_gemm_backend("onednn", &err);
    levi_wpack_free(p);
    free(A), free(W), free(C), free(R), free(full);
}

static void test_wpack(void **state) {
    (void)state;
    levi_set_num_threads(1);
    wpack_check(384, 384); /* the encoder's shapes: oneDNN's matmul when built with it */
    wpack_check(1152, 384);
    wpack_check(100, 600);
    wpack_check(12, 100); /* below the threshold: levi_gemm */
}

/* levi_gemm's rows do not depend on the batch for the small products either (OpenBLAS's
 * small-matrix kernels did: a regression head's output rounded differently by batch size). */
static void test_gemm_rows_independent(void **state) {
    (void)state;
    enum { MMAX = 64 };
    const int shapes[][2] = {{1, 256}, {2, 64}, {12, 100}, {16, 100}, {256, 1}, {40, 300}};
    levi_rng r;
    levi_rng_seed(&r, 9);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int tb = 0; tb < 2; tb++) {
            const int N = shapes[s][0], K = shapes[s][1];
            float *A = malloc((size_t)MMAX * K * 4), *B = malloc((size_t)N * K * 4);
            float *F = malloc((size_t)MMAX * N * 4), *C = malloc((size_t)MMAX * N * 4);
            for (int i = 0; i < MMAX * K; i++) A[i] = levi_rng_normal(&r);
            for (int i = 0; i < N * K; i++) B[i] = levi_rng_normal(&r);
            const int ldb = tb ? K : N;
            for (int t = 1; t <= 2; t++) {
                levi_set_num_threads(t);
                levi_gemm(0, tb, MMAX, N, K, 1.0f, A, K, B, ldb, 0.0f, F, N);
                for (int L = 1; L < MMAX; L++) {
                    levi_gemm(0, tb, L, N, K, 1.0f, A + (size_t)(MMAX - L) * K, K, B, ldb, 0.0f, C,
                              N);
                    assert_memory_equal(C, F + (size_t)(MMAX - L) * N, (size_t)L * N * 4);
                }
            }
            levi_set_num_threads(1);
            free(A), free(B), free(F), free(C);
        }
}

/* Signals during large GEMMs: oneDNN 2.x's sgemm kernels move the stack pointer into the heap,
 * so a handler run on the interrupted stack corrupts the heap (glibc aborts within ~0.1 s
 * under this load). Handlers installed with levi_signal_handler run on an alternate stack
 * and levi's other threads block the signal: thousands of signals, no damage, same results. */
static volatile sig_atomic_t g_alarms;
static void on_alarm(int sig) {
    (void)sig;
    g_alarms++;
}

static void test_signals_during_gemm(void **state) {
    (void)state;
    enum { M = 200, N = 512, K = 192 };
    levi_error err;
    if (levi_signal_handler(SIGALRM, on_alarm, &err) != LEVI_OK) fail_msg("%s", err.msg);
    levi_rng r;
    levi_rng_seed(&r, 3);
    float *A = malloc((size_t)M * K * 4), *B = malloc((size_t)K * N * 4);
    float *ref = malloc((size_t)M * N * 4), *C = malloc((size_t)M * N * 4);
    for (int i = 0; i < M * K; i++) A[i] = levi_rng_normal(&r);
    for (int i = 0; i < K * N; i++) B[i] = levi_rng_normal(&r);
    for (int t = 1; t <= 2; t++) {
        levi_set_num_threads(t);
        levi_gemm(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, ref, N);
        struct itimerval it = {{0, 100}, {0, 100}}, off = {{0, 0}, {0, 0}};
        g_alarms = 0;
        setitimer(ITIMER_REAL, &it, NULL);
        int wrong = 0;
        double t0 = levi_now();
        while (levi_now() - t0 < 0.4) {
            levi_gemm(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);
            wrong += memcmp(C, ref, (size_t)M * N * 4) != 0;
            free(malloc(1000 + (size_t)(g_alarms % 4000))); /* lets glibc notice damage */
        }
        setitimer(ITIMER_REAL, &off, NULL);
        printf("  %d thread(s): %d signals during GEMMs, %d wrong results\n", t, (int)g_alarms,
               wrong);
        assert_int_equal(wrong, 0);
        assert_true(g_alarms > 100);
    }
    signal(SIGALRM, SIG_IGN);
    levi_set_num_threads(1);
    free(A), free(B), free(ref), free(C);
}

static void test_files_and_sha(void **state) {
    (void)state;
    char hex[65];
    levi_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    levi_sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

    char dir[256], path[700], sub[400];
    levi_test_tmpdir(dir, sizeof dir);
    snprintf(sub, sizeof sub, "%s/a/b/c", dir);
    levi_error err = {0};
    assert_int_equal(levi_mkdirs(sub, &err), LEVI_OK);
    assert_int_equal(levi_mkdirs(sub, &err), LEVI_OK);
    snprintf(path, sizeof path, "%s/out.txt", sub);
    assert_int_equal(levi_write_file_atomic(path, "abc", 3, &err), LEVI_OK);
    char *buf;
    size_t len;
    assert_int_equal(levi_read_file(path, &buf, &len, &err), LEVI_OK);
    assert_int_equal(len, 3);
    assert_string_equal(buf, "abc");
    free(buf);
    assert_int_equal(levi_sha256_file(path, hex, &err), LEVI_OK);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    snprintf(path, sizeof path, "%s/missing.txt", sub);
    assert_int_equal(levi_read_file(path, &buf, &len, &err), LEVI_ERR_IO);
    assert_non_null(strstr(err.msg, "missing.txt"));
    snprintf(path, sizeof path, "%s/no/such/dir/x", dir);
    assert_int_equal(levi_write_file_atomic(path, "x", 1, &err), LEVI_ERR_IO);
    assert_non_null(strstr(err.msg, "cannot create"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_arena),
        cmocka_unit_test(test_params),
        cmocka_unit_test(test_rng),
        cmocka_unit_test(test_rng_dropout),
        cmocka_unit_test(test_gemm),
        cmocka_unit_test(test_gemm_repeatable),
        cmocka_unit_test(test_gemm_bf16),
        cmocka_unit_test(test_wpack),
        cmocka_unit_test(test_gemm_rows_independent),
        cmocka_unit_test(test_signals_during_gemm),
        cmocka_unit_test(test_files_and_sha),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
