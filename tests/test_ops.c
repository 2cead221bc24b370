/* Tests of include/levi/ops.h: every kernel's backward against central finite differences of
 * its forward, and every forward against a naive double-precision reference.
 *
 * Gradient checks use a random projection loss L = sum(out * R) accumulated in double, so the
 * analytic gradients are backward(dout = R). Each check also verifies that backward
 * accumulates (a second call doubles the gradients) and that every gradient pointer may be
 * NULL (each gradient alone equals the same gradient computed with all the others).
 * Inputs of ops with kinks (ReLU, max pool) are built so that no perturbation crosses one.
 * Tolerances (gc_defaults, tests/gradcheck.c): step 1e-2, |analytic - numeric| <= 2e-3 |numeric| +
 * 2e-4 max(1, max|numeric|). The step is large because forwards run in float: at 1e-3 the rounding
 * of the outputs, divided by the step, made up half of a 1e-2 tolerance (batch norm); at 1e-2 the
 * worst case over 40 seeds used 0.47 of this 5x tighter one, and a 0.3% error in GELU's
 * derivative fails it. The last test checks that the non-GEMM kernels give bit-identical
 * results with one and two OpenMP threads (it also catches races).
 * Not for: end-to-end model numbers (those are golden tests against PyTorch elsewhere).
 */
#include "gradcheck.h"
#include "levi/ops.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ----------------------------------------------------------------------------------------
 * Helpers */

/* Seeds of the random inputs; -DTEST_SEED_OFFSET=k rebuilds the suite on other draws, to check
 * that the tolerances are not tuned to one. */
#ifndef TEST_SEED_OFFSET
#define TEST_SEED_OFFSET 0
#endif
#define TEST_SEED(k) ((uint64_t)(k) + 1000u * (uint64_t)(TEST_SEED_OFFSET))

/* Max |a-b| / (|b| + floor) where b is the reference. */
static double rel_err(const float *a, const float *b, int64_t n, double floor) {
    return levi_test_max_rel_diff(a, b, n, floor);
}

/* ----------------------------------------------------------------------------------------
 * GEMM (the wrapper every dense kernel rests on) */

static void test_gemm_vs_ref(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(1));
    const int M = 37, N = 29, K = 23;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = (ta ? M : K) + 5, ldb = (tb ? K : N) + 3, ldc = N + 7;
            float *A = rand_normal(&r, (int64_t)(ta ? K : M) * lda, 1.0f);
            float *B = rand_normal(&r, (int64_t)(tb ? N : K) * ldb, 1.0f);
            float *C = rand_normal(&r, (int64_t)M * ldc, 1.0f);
            float *Cref = copy_f(C, (int64_t)M * ldc);
            levi_gemm(ta, tb, M, N, K, 0.7f, A, lda, B, ldb, -1.3f, C, ldc);
            levi_gemm_ref(ta, tb, M, N, K, 0.7f, A, lda, B, ldb, -1.3f, Cref, ldc);
            EXPECT_LE(rel_err(C, Cref, (int64_t)M * ldc, 1.0), 1e-5, "gemm vs ref");
            // The gap columns between N and ldc are not touched.
            for (int i = 0; i < M; i++)
                for (int j = N; j < ldc; j++) assert_true(C[i * ldc + j] == Cref[i * ldc + j]);
            // beta == 0 must not read C (kernels hand it uninitialised scratch).
            for (int64_t i = 0; i < (int64_t)M * ldc; i++) C[i] = NAN;
            levi_gemm(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc);
            levi_gemm_ref(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, Cref, ldc);
            for (int i = 0; i < M; i++)
                EXPECT_LE(rel_err(C + i * ldc, Cref + i * ldc, N, 1.0), 1e-5, "gemm beta=0");
            levi_free(A);
            levi_free(B);
            levi_free(C);
            levi_free(Cref);
        }
}

/* ----------------------------------------------------------------------------------------
 * Linear */

typedef struct {
    int64_t N;
    int C, OC;
    float *inp, *w, *b, *out, *R;
} linear_ctx;

static double linear_loss(gradcase *gc) {
    linear_ctx *c = gc->ctx;
    levi_linear_forward(c->out, c->inp, c->w, c->b, c->N, c->C, c->OC);
    return dot_d(c->out, c->R, c->N * c->OC);
}

static void linear_bwd(gradcase *gc, float *const *g) {
    linear_ctx *c = gc->ctx;
    levi_linear_backward(g[0], g[1], g[2], c->R, c->inp, c->w, c->N, c->C, c->OC);
}

static void linear_naive(float *out, const float *inp, const float *w, const float *b, int64_t N,
                         int C, int OC) {
    for (int64_t n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = b ? b[o] : 0.0;
            for (int c = 0; c < C; c++) s += (double)inp[n * C + c] * w[(int64_t)o * C + c];
            out[n * OC + o] = (float)s;
        }
}

static void test_linear_forward(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(2));
    // The second shape crosses the threading threshold of the bias pass.
    const int shapes[2][3] = {{13, 17, 11}, {300, 64, 300}};
    for (int s = 0; s < 2; s++) {
        int N = shapes[s][0], C = shapes[s][1], OC = shapes[s][2];
        float *inp = rand_normal(&r, (int64_t)N * C, 1.0f), *w = rand_normal(&r, OC * C, 0.3f);
        float *b = rand_normal(&r, OC, 1.0f);
        float *out = alloc_f((int64_t)N * OC), *ref = alloc_f((int64_t)N * OC);
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            const float *bb = with_bias ? b : NULL;
            for (int64_t i = 0; i < (int64_t)N * OC; i++) out[i] = NAN; // must be overwritten
            levi_linear_forward(out, inp, w, bb, N, C, OC);
            linear_naive(ref, inp, w, bb, N, C, OC);
            EXPECT_LE(rel_err(out, ref, (int64_t)N * OC, 1.0), 1e-5, "linear vs naive");
        }
        levi_free(inp);
        levi_free(w);
        levi_free(b);
        levi_free(out);
        levi_free(ref);
    }
}

static void test_linear_grad(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(3));
    linear_ctx c = {.N = 5, .C = 7, .OC = 6};
    c.inp = rand_normal(&r, c.N * c.C, 1.0f);
    c.w = rand_normal(&r, c.OC * c.C, 0.5f);
    c.b = rand_normal(&r, c.OC, 0.5f);
    c.out = alloc_f(c.N * c.OC);
    c.R = rand_normal(&r, c.N * c.OC, 1.0f);
    gradcase gc = {
        .op = "linear", .count = 3, .loss = linear_loss, .backward = linear_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "inp", gc.x[0] = c.inp, gc.n[0] = c.N * c.C;
    gc.name[1] = "w", gc.x[1] = c.w, gc.n[1] = c.OC * c.C;
    gc.name[2] = "b", gc.x[2] = c.b, gc.n[2] = c.OC;
    run_gradcase(&gc);
    levi_free(c.inp);
    levi_free(c.w);
    levi_free(c.b);
    levi_free(c.out);
    levi_free(c.R);
}

/* ----------------------------------------------------------------------------------------
 * Embedding */

typedef struct {
    int64_t N;
    int V, C;
    int32_t *ids;
    float *table, *out, *R;
} embedding_ctx;

static double embedding_loss(gradcase *gc) {
    embedding_ctx *c = gc->ctx;
    levi_embedding_forward(c->out, c->ids, c->table, c->N, c->V, c->C);
    return dot_d(c->out, c->R, c->N * c->C);
}

static void embedding_bwd(gradcase *gc, float *const *g) {
    embedding_ctx *c = gc->ctx;
    levi_embedding_backward(g[0], c->R, c->ids, c->N, c->V, c->C);
}

static void test_embedding(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(4));
    int32_t ids[9] = {3, 0, 5, 3, 3, 1, 6, 0, 2}; // repeated ids accumulate; id 4 is unused
    embedding_ctx c = {.N = 9, .V = 7, .C = 5, .ids = ids};
    c.table = rand_normal(&r, c.V * c.C, 1.0f);
    c.out = alloc_f(c.N * c.C);
    c.R = rand_normal(&r, c.N * c.C, 1.0f);
    levi_embedding_forward(c.out, c.ids, c.table, c.N, c.V, c.C);
    for (int n = 0; n < c.N; n++)
        assert_memory_equal(c.out + n * c.C, c.table + ids[n] * c.C, c.C * sizeof(float));
    gradcase gc = {.op = "embedding",
                   .count = 1,
                   .loss = embedding_loss,
                   .backward = embedding_bwd,
                   .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "table", gc.x[0] = c.table, gc.n[0] = c.V * c.C;
    run_gradcase(&gc);
    levi_free(c.table);
    levi_free(c.out);
    levi_free(c.R);
}

/* ----------------------------------------------------------------------------------------
 * Layer norm */

typedef struct {
    int64_t N;
    int C;
    float *inp, *w, *b, *out, *mean, *rstd, *R;
} layernorm_ctx;

static double layernorm_loss(gradcase *gc) {
    layernorm_ctx *c = gc->ctx;
    levi_layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C, 1e-5f);
    return dot_d(c->out, c->R, c->N * c->C);
}

static void layernorm_bwd(gradcase *gc, float *const *g) {
    layernorm_ctx *c = gc->ctx;
    levi_layernorm_backward(g[0], g[1], g[2], c->R, c->inp, c->w, c->mean, c->rstd, c->N, c->C);
}

static void test_layernorm_forward(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(5));
    // BERT's width, rows offset far from zero (where a one-pass variance loses digits), and
    // enough rows to cross the threading threshold.
    const int64_t N = 200;
    const int C = 384;
    float *inp = rand_normal(&r, N * C, 2.0f), *w = rand_normal(&r, C, 1.0f);
    float *b = rand_normal(&r, C, 1.0f);
    for (int64_t i = 0; i < N * C; i++) inp[i] += (float)(i / C % 7) * 10.0f;
    float *out = alloc_f(N * C), *ref = alloc_f(N * C), *mean = alloc_f(N), *rstd = alloc_f(N);
    levi_layernorm_forward(out, mean, rstd, inp, w, b, N, C, 1e-5f);
    for (int64_t n = 0; n < N; n++) {
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += inp[n * C + c];
        m /= C;
        for (int c = 0; c < C; c++) v += (inp[n * C + c] - m) * (inp[n * C + c] - m);
        v /= C;
        double s = 1.0 / sqrt(v + 1e-5);
        for (int c = 0; c < C; c++)
            ref[n * C + c] = (float)((inp[n * C + c] - m) * s * w[c] + b[c]);
        EXPECT_LE(fabs(mean[n] - m) / (fabs(m) + 1.0), 1e-6, "layernorm mean");
        EXPECT_LE(fabs(rstd[n] - s) / s, 1e-5, "layernorm rstd");
    }
    EXPECT_LE(levi_test_max_abs_diff(out, ref, N * C), 1e-5, "layernorm vs double ref");
    // mean and rstd may be NULL in inference; the output is the same.
    float *out2 = alloc_f(N * C);
    levi_layernorm_forward(out2, NULL, NULL, inp, w, b, N, C, 1e-5f);
    assert_memory_equal(out, out2, (size_t)(N * C) * sizeof(float));
    levi_free(inp);
    levi_free(w);
    levi_free(b);
    levi_free(out);
    levi_free(out2);
    levi_free(ref);
    levi_free(mean);
    levi_free(rstd);
}

static void test_layernorm_grad(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(6));
    layernorm_ctx c = {.N = 4, .C = 9};
    c.inp = rand_normal(&r, c.N * c.C, 1.0f);
    for (int i = 0; i < c.N * c.C; i++) c.inp[i] += 1.5f;
    c.w = rand_normal(&r, c.C, 1.0f);
    c.b = rand_normal(&r, c.C, 1.0f);
    c.out = alloc_f(c.N * c.C);
    c.mean = alloc_f(c.N);
    c.rstd = alloc_f(c.N);
    c.R = rand_normal(&r, c.N * c.C, 1.0f);
    gradcase gc = {.op = "layernorm",
                   .count = 3,
                   .loss = layernorm_loss,
                   .backward = layernorm_bwd,
                   .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "inp", gc.x[0] = c.inp, gc.n[0] = c.N * c.C;
    gc.name[1] = "w", gc.x[1] = c.w, gc.n[1] = c.C;
    gc.name[2] = "b", gc.x[2] = c.b, gc.n[2] = c.C;
    run_gradcase(&gc);
    levi_free(c.inp);
    levi_free(c.w);
    levi_free(c.b);
    levi_free(c.out);
    levi_free(c.mean);
    levi_free(c.rstd);
    levi_free(c.R);
}

/* ----------------------------------------------------------------------------------------
 * Element-wise: GELU, ReLU, dropout, add */

typedef struct {
    int64_t n;
    float *a, *b, *out, *mask, *R;
    float p;
    uint64_t seed;
} ew_ctx;

static double gelu_loss(gradcase *gc) {
    ew_ctx *c = gc->ctx;
    levi_gelu_forward(c->out, c->a, c->n);
    return dot_d(c->out, c->R, c->n);
}
static void gelu_bwd(gradcase *gc, float *const *g) {
    ew_ctx *c = gc->ctx;
    levi_gelu_backward(g[0], c->a, c->R, c->n);
}

static double relu_loss(gradcase *gc) {
    ew_ctx *c = gc->ctx;
    levi_relu_forward(c->out, c->a, c->n);
    return dot_d(c->out, c->R, c->n);
}
static void relu_bwd(gradcase *gc, float *const *g) {
    ew_ctx *c = gc->ctx;
    levi_relu_backward(g[0], c->a, c->R, c->n);
}

static double dropout_loss(gradcase *gc) {
    ew_ctx *c = gc->ctx;
    levi_rng r;
    levi_rng_seed(&r, c->seed); // the same mask on every call
    levi_dropout_forward(c->out, c->mask, c->a, c->n, c->p, &r);
    return dot_d(c->out, c->R, c->n);
}
static void dropout_bwd(gradcase *gc, float *const *g) {
    ew_ctx *c = gc->ctx;
    levi_dropout_backward(g[0], c->R, c->mask, c->n);
}

static double add_loss(gradcase *gc) {
    ew_ctx *c = gc->ctx;
    levi_add_forward(c->out, c->a, c->b, c->n);
    return dot_d(c->out, c->R, c->n);
}
static void add_bwd(gradcase *gc, float *const *g) {
    ew_ctx *c = gc->ctx;
    levi_add_backward(g[0], g[1], c->R, c->n);
}

static void ew_init(ew_ctx *c, levi_rng *r, int64_t n) {
    memset(c, 0, sizeof *c);
    c->n = n;
    c->a = rand_normal(r, n, 1.5f);
    c->b = rand_normal(r, n, 1.0f);
    c->out = alloc_f(n);
    c->mask = alloc_f(n);
    c->R = rand_normal(r, n, 1.0f);
}

static void ew_free(ew_ctx *c) {
    levi_free(c->a);
    levi_free(c->b);
    levi_free(c->out);
    levi_free(c->mask);
    levi_free(c->R);
}

static void test_gelu(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(7));
    // Forward and derivative against erf in double: random values (enough to cross the
    // threading threshold), a dense sweep over both tails, and special points. n is not a
    // multiple of 8, so the padded-vector tail runs too.
    const int64_t nr = 100000, ns = 40001, n = nr + ns + 6;
    float *x = alloc_f(n), *y = alloc_f(n), *g = alloc_f(n), *ones = alloc_f(n);
    for (int64_t i = 0; i < nr; i++) x[i] = 3.0f * levi_rng_normal(&r);
    for (int64_t i = 0; i < ns; i++) x[nr + i] = -20.0f + 40.0f * (float)i / (float)(ns - 1);
    const float special[6] = {0.0f, -1e-30f, 1e-6f, -200.0f, 200.0f, -7.5f};
    memcpy(x + nr + ns, special, sizeof special);
    for (int64_t i = 0; i < n; i++) ones[i] = 1.0f;
    levi_gelu_forward(y, x, n);
    levi_gelu_backward(g, x, ones, n);
    double worst = 0, worst_d = 0;
    for (int64_t i = 0; i < n; i++) {
        const double xd = x[i], cdf = 0.5 * (1.0 + erf(xd / sqrt(2.0)));
        const double ref = xd * cdf, dref = cdf + xd * exp(-0.5 * xd * xd) / sqrt(2.0 * M_PI);
        // Absolute error scaled by |x|: for x << 0 the output is tiny and its relative error
        // is not meaningful (PyTorch's 1 + erf(x) cancels there).
        worst = fmax(worst, fabs(y[i] - ref) / (fabs(xd) + 1.0));
        worst_d = fmax(worst_d, fabs(g[i] - dref) / (fabs(xd) + 1.0));
    }
    printf("gelu max abs err / (|x|+1) = %.3g forward, %.3g derivative\n", worst, worst_d);
    // The header's bound: A&S 7.1.28 (forward) and 7.1.26 (backward) are within 3e-7 and
    // 1.5e-7 of erf; measured 2.3e-7 and 2.6e-7 with float rounding.
    EXPECT_LE(worst, 3e-7, "gelu vs double erf");
    EXPECT_LE(worst_d, 3e-7, "gelu derivative vs double");
    // In place forward; in place backward equals accumulating into zeros.
    float *y2 = copy_f(x, n);
    levi_gelu_forward(y2, y2, n);
    assert_memory_equal(y2, y, (size_t)n * sizeof(float));
    float *d = rand_normal(&r, n, 1.0f), *acc = alloc_f(n), *inplace = copy_f(d, n);
    levi_gelu_backward(acc, x, d, n);
    levi_gelu_backward_inplace(inplace, x, n);
    EXPECT_LE(max_norm_err(inplace, acc, n), 0.0, "gelu in-place backward vs accumulating");
    // Bias + GELU in one pass: bit-identical to adding the bias, then levi_gelu_forward,
    // both out of place (pre keeps the input) and in place; widths with and without a tail.
    const int widths[3] = {1536, 37, 5};
    for (int wi = 0; wi < 3; wi++) {
        const int rows = 70, cols = widths[wi];
        const int64_t m = (int64_t)rows * cols;
        float *bias = rand_normal(&r, cols, 1.0f), *pre = copy_f(x, m), *want = alloc_f(m);
        float *out = alloc_f(m), *same = copy_f(x, m);
        for (int64_t i = 0; i < m; i++) want[i] = x[i] + bias[i % cols];
        levi_bias_gelu_forward(out, pre, bias, rows, cols);
        levi_bias_gelu_forward(same, same, bias, rows, cols);
        assert_memory_equal(pre, want, (size_t)m * sizeof(float));
        levi_gelu_forward(want, want, m);
        assert_memory_equal(out, want, (size_t)m * sizeof(float));
        assert_memory_equal(same, want, (size_t)m * sizeof(float));
        levi_free(bias), levi_free(pre), levi_free(want), levi_free(out), levi_free(same);
    }
    levi_free(x);
    levi_free(y);
    levi_free(g);
    levi_free(ones);
    levi_free(y2);
    levi_free(d);
    levi_free(acc);
    levi_free(inplace);

    ew_ctx c;
    ew_init(&c, &r, 40);
    gradcase gc = {.op = "gelu", .count = 1, .loss = gelu_loss, .backward = gelu_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "inp", gc.x[0] = c.a, gc.n[0] = c.n;
    run_gradcase(&gc);
    ew_free(&c);
}

static void test_relu(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(8));
    ew_ctx c;
    ew_init(&c, &r, 40);
    // Keep every input at least 0.05 away from the kink at 0 (eps is 1e-3).
    for (int64_t i = 0; i < c.n; i++) c.a[i] = (c.a[i] >= 0 ? 0.05f : -0.05f) + c.a[i];
    gradcase gc = {.op = "relu", .count = 1, .loss = relu_loss, .backward = relu_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "inp", gc.x[0] = c.a, gc.n[0] = c.n;
    run_gradcase(&gc);
    // In-place forward is allowed.
    float *y = copy_f(c.a, c.n);
    levi_relu_forward(y, y, c.n);
    for (int64_t i = 0; i < c.n; i++) assert_true(y[i] == (c.a[i] > 0 ? c.a[i] : 0.0f));
    levi_free(y);
    ew_free(&c);
}

static void test_dropout(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(9));
    const int64_t n = 200000;
    float *x = rand_normal(&r, n, 1.0f), *y = alloc_f(n), *m = alloc_f(n), *m2 = alloc_f(n);

    // p = 0: identity, mask of ones.
    levi_rng dr;
    levi_rng_seed(&dr, 123);
    levi_dropout_forward(y, m, x, n, 0.0f, &dr);
    assert_memory_equal(y, x, (size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) assert_true(m[i] == 1.0f);

    // p = 0.5: mask values 0 or 2, half dropped (6 sigma = 0.0067 on 200k draws), out = x*mask.
    levi_rng_seed(&dr, 123);
    levi_dropout_forward(y, m, x, n, 0.5f, &dr);
    int64_t dropped = 0;
    for (int64_t i = 0; i < n; i++) {
        assert_true(m[i] == 0.0f || m[i] == 2.0f);
        assert_true(y[i] == x[i] * m[i]);
        dropped += m[i] == 0.0f;
    }
    EXPECT_LE(fabs((double)dropped / n - 0.5), 0.0067, "dropout p=0.5 dropped fraction - 0.5");
    // Same seed, same mask; another seed, another mask.
    levi_rng_seed(&dr, 123);
    levi_dropout_forward(y, m2, x, n, 0.5f, &dr);
    assert_memory_equal(m, m2, (size_t)n * sizeof(float));
    levi_rng_seed(&dr, 124);
    levi_dropout_forward(y, m2, x, n, 0.5f, &dr);
    int64_t same = 0;
    for (int64_t i = 0; i < n; i++) same += m[i] == m2[i];
    EXPECT_LE(fabs((double)same / n - 0.5), 0.0067, "masks of two seeds agree like chance");
    levi_free(x);
    levi_free(y);
    levi_free(m);
    levi_free(m2);

    ew_ctx c;
    ew_init(&c, &r, 40);
    c.p = 0.3f;
    c.seed = 77;
    gradcase gc = {
        .op = "dropout", .count = 1, .loss = dropout_loss, .backward = dropout_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "inp", gc.x[0] = c.a, gc.n[0] = c.n;
    run_gradcase(&gc);
    ew_free(&c);
}

static void test_add(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(10));
    ew_ctx c;
    ew_init(&c, &r, 30);
    gradcase gc = {.op = "add", .count = 2, .loss = add_loss, .backward = add_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "a", gc.x[0] = c.a, gc.n[0] = c.n;
    gc.name[1] = "b", gc.x[1] = c.b, gc.n[1] = c.n;
    run_gradcase(&gc);
    ew_free(&c);
}

/* ----------------------------------------------------------------------------------------
 * Attention. Two layouts: "separate" (q, k, v, out contiguous [N, NH*HD]) and "packed" (q, k,
 * v side by side in one [N, 3D + gap] buffer, out in [N, D + gap], as a model with a fused QKV
 * projection uses them). The gap columns hold a sentinel: the kernels must neither read them
 * (results would change) nor write them. */

#define ATTN_GAP 3
#define ATTN_SENTINEL 100.0f
#define ATTN_SLOTS 4 /* scratch for up to 4 threads; more slots than threads is fine */

typedef struct {
    levi_attention_params p;
    int packed;
    float *qkv;       /* packed: [N, ldq] holding q | k | v | gap; NULL otherwise */
    float *q, *k, *v; /* views into qkv, or own [N, D] buffers */
    float *out, *R;   /* [N, ldo]; R is dout (the loss is sum(out * R) over real columns) */
    float *probs;     /* [B, NH, S, S] */
    int32_t *mask;    /* [B, S] */
    float *scratch;
    size_t scratch_floats;
    uint64_t rng_seed;     /* every forward starts its rng here: the same dropout decisions */
    uint64_t dropout_seed; /* saved by the last forward */
} attn_ctx;

static double attn_loss(gradcase *gc) {
    attn_ctx *c = gc->ctx;
    levi_rng r;
    levi_rng_seed(&r, c->rng_seed);
    levi_attention_forward(c->out, c->probs, &c->dropout_seed, c->q, c->k, c->v, c->mask, c->p, &r,
                           c->scratch, c->scratch_floats);
    const int64_t N = (int64_t)c->p.B * c->p.S, D = (int64_t)c->p.NH * c->p.HD;
    double s = 0;
    for (int64_t n = 0; n < N; n++) s += dot_d(c->out + n * c->p.ldo, c->R + n * c->p.ldo, D);
    return s;
}

/* Separate layout: g = {dq, dk, dv}. Packed: g[0] is the gradient of the whole qkv buffer. */
static void attn_bwd(gradcase *gc, float *const *g) {
    attn_ctx *c = gc->ctx;
    const int D = c->p.NH * c->p.HD;
    float *dq = g[0], *dk = g[1], *dv = g[2];
    if (c->packed) dq = g[0], dk = g[0] ? g[0] + D : NULL, dv = g[0] ? g[0] + 2 * D : NULL;
    levi_attention_backward(dq, dk, dv, c->R, c->probs, c->dropout_seed, c->q, c->k, c->v, c->mask,
                            c->p, c->scratch, c->scratch_floats);
}

/* Values drawn in the same order for both layouts, so equal seeds give equal inputs.
 * Sequence b has S - b valid tokens (clamped to 1), then padding. */
static void attn_init(attn_ctx *c, levi_rng *r, int B, int S, int NH, int HD, int packed,
                      float dropout) {
    memset(c, 0, sizeof *c);
    c->p = levi_attention_default_params(B, S, NH, HD);
    c->p.dropout = dropout;
    c->packed = packed;
    c->rng_seed = 4242;
    const int64_t N = (int64_t)B * S, D = (int64_t)NH * HD;
    float *src[4];
    for (int t = 0; t < 4; t++) src[t] = rand_normal(r, N * D, 1.0f);
    if (packed) {
        const int ld = 3 * (int)D + ATTN_GAP;
        c->p.ldq = c->p.ldk = c->p.ldv = ld;
        c->p.ldo = (int)D + ATTN_GAP;
        c->qkv = alloc_f(N * ld);
        for (int64_t i = 0; i < N * ld; i++) c->qkv[i] = ATTN_SENTINEL;
        for (int64_t n = 0; n < N; n++)
            for (int t = 0; t < 3; t++)
                memcpy(c->qkv + n * ld + t * D, src[t] + n * D, (size_t)D * sizeof(float));
        c->q = c->qkv, c->k = c->qkv + D, c->v = c->qkv + 2 * D;
        for (int t = 0; t < 3; t++) levi_free(src[t]);
    } else {
        c->q = src[0], c->k = src[1], c->v = src[2];
    }
    const int ldo = c->p.ldo;
    c->out = alloc_f(N * ldo);
    c->R = alloc_f(N * ldo);
    for (int64_t i = 0; i < N * ldo; i++) c->out[i] = c->R[i] = ATTN_SENTINEL;
    for (int64_t n = 0; n < N; n++)
        memcpy(c->R + n * ldo, src[3] + n * D, (size_t)D * sizeof(float));
    levi_free(src[3]);
    c->probs = alloc_f((int64_t)B * NH * S * S);
    c->mask = calloc((size_t)B * S, sizeof(int32_t));
    for (int b = 0; b < B; b++) {
        int len = S - b > 1 ? S - b : 1;
        for (int s = 0; s < len; s++) c->mask[b * S + s] = 1;
    }
    c->scratch_floats = levi_attention_scratch_floats(S, NH, HD, ATTN_SLOTS);
    c->scratch = alloc_f((int64_t)c->scratch_floats);
}

static void attn_free(attn_ctx *c) {
    if (c->packed)
        levi_free(c->qkv);
    else
        levi_free(c->q), levi_free(c->k), levi_free(c->v);
    levi_free(c->out);
    levi_free(c->R);
    levi_free(c->probs);
    free(c->mask);
    levi_free(c->scratch);
}

#define ATQ(c, b, s, col) (c)->q[((int64_t)(b) * (c)->p.S + (s)) * (c)->p.ldq + (col)]
#define ATK(c, b, s, col) (c)->k[((int64_t)(b) * (c)->p.S + (s)) * (c)->p.ldk + (col)]
#define ATV(c, b, s, col) (c)->v[((int64_t)(b) * (c)->p.S + (s)) * (c)->p.ldv + (col)]

/* Triple loop in double, straight from the definition, into contiguous out [N, D] and probs.
 * mult: dropout multipliers [B, NH, S, S] applied to the probabilities before V, or NULL. A row
 * with no valid key gets uniform probabilities (the documented behaviour). */
static void attn_naive(float *out, float *probs, const attn_ctx *c, const float *mult) {
    const int S = c->p.S, NH = c->p.NH, HD = c->p.HD, D = NH * HD;
    double *p = malloc((size_t)S * sizeof(double));
    for (int b = 0; b < c->p.B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < S; i++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < S; j++) {
                    double s = 0;
                    for (int d = 0; d < HD; d++)
                        s += (double)ATQ(c, b, i, h * HD + d) * ATK(c, b, j, h * HD + d);
                    p[j] = c->mask[b * S + j] ? s * c->p.scale : -INFINITY;
                    if (p[j] > mx) mx = p[j];
                }
                const int64_t prow = (((int64_t)b * NH + h) * S + i) * S;
                for (int j = 0; j < S; j++) sum += p[j] = mx == -INFINITY ? 1.0 : exp(p[j] - mx);
                for (int j = 0; j < S; j++) {
                    p[j] /= sum;
                    if (probs) probs[prow + j] = (float)p[j];
                    if (mult) p[j] *= mult[prow + j];
                }
                for (int d = 0; d < HD; d++) {
                    double o = 0;
                    for (int j = 0; j < S; j++) o += p[j] * ATV(c, b, j, h * HD + d);
                    out[((int64_t)b * S + i) * D + h * HD + d] = (float)o;
                }
            }
    free(p);
}

/* Output and gradients (dout = R) in double, into contiguous [N, D] buffers res[0..3] = out,
 * dq, dk, dv; mult as attn_naive. Rows with no valid key are not supported (not needed). */
static void attn_naive_grads(float *const *res, const attn_ctx *c, const float *mult) {
    const int S = c->p.S, NH = c->p.NH, HD = c->p.HD, D = NH * HD;
    const int64_t n = (int64_t)c->p.B * S * D;
    double *acc[4];
    for (int t = 0; t < 4; t++) acc[t] = calloc((size_t)n, sizeof(double));
    double *P = malloc((size_t)S * S * sizeof(double)), *dP = malloc((size_t)S * sizeof(double));
#define AT(x, s, d) (x)[((int64_t)b * S + (s)) * D + (int64_t)h * HD + (d)]
#define ATR(s, d) c->R[((int64_t)b * S + (s)) * c->p.ldo + (int64_t)h * HD + (d)]
    for (int b = 0; b < c->p.B; b++)
        for (int h = 0; h < NH; h++) {
            const float *M = mult + ((int64_t)b * NH + h) * S * S;
            for (int i = 0; i < S; i++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < S; j++) {
                    double sc = 0;
                    for (int d = 0; d < HD; d++)
                        sc += (double)ATQ(c, b, i, h * HD + d) * ATK(c, b, j, h * HD + d);
                    P[i * S + j] = c->mask[b * S + j] ? sc * c->p.scale : -INFINITY;
                    mx = fmax(mx, P[i * S + j]);
                }
                for (int j = 0; j < S; j++) sum += P[i * S + j] = exp(P[i * S + j] - mx);
                for (int j = 0; j < S; j++) P[i * S + j] /= sum;
                for (int d = 0; d < HD; d++)
                    for (int j = 0; j < S; j++)
                        AT(acc[0], i, d) += P[i * S + j] * M[i * S + j] * ATV(c, b, j, h * HD + d);
            }
            for (int i = 0; i < S; i++) {
                double cs = 0;
                for (int j = 0; j < S; j++) {
                    double gd = 0;
                    for (int d = 0; d < HD; d++) gd += (double)ATR(i, d) * ATV(c, b, j, h * HD + d);
                    dP[j] = gd * M[i * S + j];
                    cs += P[i * S + j] * dP[j];
                    for (int d = 0; d < HD; d++)
                        AT(acc[3], j, d) += P[i * S + j] * M[i * S + j] * ATR(i, d);
                }
                for (int j = 0; j < S; j++) {
                    const double ds = P[i * S + j] * (dP[j] - cs) * c->p.scale;
                    for (int d = 0; d < HD; d++) {
                        AT(acc[1], i, d) += ds * ATK(c, b, j, h * HD + d);
                        AT(acc[2], j, d) += ds * ATQ(c, b, i, h * HD + d);
                    }
                }
            }
        }
#undef AT
#undef ATR
    for (int t = 0; t < 4; t++) {
        for (int64_t i = 0; i < n; i++) res[t][i] = (float)acc[t][i];
        free(acc[t]);
    }
    free(P);
    free(dP);
}

/* Max |a - ref| over the real columns of a [N, lda] against a contiguous ref [N, D]. */
static double attn_out_diff(const float *a, int lda, const float *ref, int64_t N, int D) {
    double m = 0;
    for (int64_t n = 0; n < N; n++)
        m = fmax(m, levi_test_max_abs_diff(a + n * lda, ref + n * D, D));
    return m;
}

/* The gap columns of a [N, ld] buffer whose first `used` columns are real still hold the
 * sentinel (or any columns past D in out). */
static void attn_expect_gaps(const float *x, int ld, int used, int64_t N) {
    for (int64_t n = 0; n < N; n++)
        for (int col = used; col < ld; col++) assert_true(x[n * ld + col] == ATTN_SENTINEL);
}

static void test_attention_forward(void **state) {
    (void)state;
    // A small case, one big enough to run threaded (B*NH*S*S*HD over the threshold), and one
    // with HD = 40 (not a multiple of the 8-float vectors or the 32-column tiles), a padded key
    // inside the valid part and a sequence with no valid key at all.
    const int shapes[3][4] = {{3, 6, 2, 4}, {3, 40, 4, 16}, {3, 21, 3, 40}};
    for (int t = 0; t < 3; t++) {
        attn_ctx c[2];
        for (int packed = 0; packed < 2; packed++) {
            levi_rng r;
            levi_rng_seed(&r, TEST_SEED(11 + t));
            attn_init(&c[packed], &r, shapes[t][0], shapes[t][1], shapes[t][2], shapes[t][3],
                      packed, 0.0f);
            if (t == 2) {
                c[packed].mask[1 * c[packed].p.S + 4] = 0;
                for (int s = 0; s < c[packed].p.S; s++) c[packed].mask[2 * c[packed].p.S + s] = 0;
            }
        }
        const levi_attention_params p = c[0].p;
        const int D = p.NH * p.HD;
        const int64_t N = (int64_t)p.B * p.S, n = N * D, np = (int64_t)p.B * p.NH * p.S * p.S;
        float *ref = alloc_f(n), *pref = alloc_f(np);
        attn_naive(ref, pref, &c[0], NULL);
        for (int packed = 0; packed < 2; packed++) {
            attn_ctx *x = &c[packed];
            float *out2 = alloc_f(N * x->p.ldo);
            memcpy(out2, x->out, (size_t)(N * x->p.ldo) * sizeof(float));
            levi_attention_forward(x->out, x->probs, NULL, x->q, x->k, x->v, x->mask, x->p, NULL,
                                   x->scratch, x->scratch_floats);
            EXPECT_LE(attn_out_diff(x->out, x->p.ldo, ref, N, D), 2e-6, "attention out vs naive");
            EXPECT_LE(levi_test_max_abs_diff(x->probs, pref, np), 1e-6, "attention probs vs naive");
            attn_expect_gaps(x->out, x->p.ldo, D, N);
            // Padded keys get probability exactly 0; each row sums to 1.
            for (int b = 0; b < p.B; b++)
                for (int hi = 0; hi < p.NH * p.S; hi++) {
                    const float *pr = x->probs + ((int64_t)b * p.NH * p.S + hi) * p.S;
                    double sum = 0;
                    int valid = 0;
                    for (int j = 0; j < p.S; j++) valid += x->mask[b * p.S + j];
                    for (int j = 0; j < p.S; j++) {
                        if (valid && !x->mask[b * p.S + j]) assert_true(pr[j] == 0.0f);
                        sum += pr[j];
                    }
                    EXPECT_LE(fabs(sum - 1.0), 1e-5, "attention row sum - 1");
                }
            // Inference path (probs == NULL) gives the same output, bit for bit.
            levi_attention_forward(out2, NULL, NULL, x->q, x->k, x->v, x->mask, x->p, NULL,
                                   x->scratch, x->scratch_floats);
            assert_memory_equal(out2, x->out, (size_t)(N * x->p.ldo) * sizeof(float));
            // Inference with a q|k|v bias read along equals adding it to the rows first.
            levi_rng br;
            levi_rng_seed(&br, TEST_SEED(31 + t));
            float *bias = rand_normal(&br, 3 * D, 1.0f), *qkvb = alloc_f(N * 3 * D);
            const float *src[3] = {x->q, x->k, x->v};
            const int ld[3] = {x->p.ldq, x->p.ldk, x->p.ldv};
            for (int64_t row = 0; row < N; row++)
                for (int q = 0; q < 3; q++)
                    for (int d = 0; d < D; d++)
                        qkvb[row * 3 * D + q * D + d] = src[q][row * ld[q] + d] + bias[q * D + d];
            levi_attention_params pb = x->p, pa = x->p;
            pb.ldq = pb.ldk = pb.ldv = 3 * D;
            pa.bias = bias;
            levi_attention_forward(out2, NULL, NULL, qkvb, qkvb + D, qkvb + 2 * D, x->mask, pb,
                                   NULL, x->scratch, x->scratch_floats);
            float *out3 = copy_f(x->out, N * x->p.ldo);
            levi_attention_forward(out3, NULL, NULL, x->q, x->k, x->v, x->mask, pa, NULL,
                                   x->scratch, x->scratch_floats);
            assert_memory_equal(out3, out2, (size_t)(N * x->p.ldo) * sizeof(float));
            attn_expect_gaps(out3, x->p.ldo, D, N);
            levi_free(bias), levi_free(qkvb), levi_free(out3);
            levi_free(out2);
        }
        // Both layouts compute the same numbers, bit for bit.
        assert_memory_equal(c[0].probs, c[1].probs, (size_t)np * sizeof(float));
        for (int64_t row = 0; row < N; row++)
            assert_memory_equal(c[0].out + row * D, c[1].out + row * c[1].p.ldo,
                                (size_t)D * sizeof(float));
        levi_free(ref);
        levi_free(pref);
        attn_free(&c[0]);
        attn_free(&c[1]);
    }
}

static void test_attention_all_padded_row(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(12));
    attn_ctx c;
    attn_init(&c, &r, 2, 4, 2, 3, 0, 0.0f);
    const levi_attention_params p = c.p;
    for (int s = 0; s < p.S; s++) c.mask[p.S + s] = 0; // second sequence: no valid key at all
    attn_loss(&(gradcase){.ctx = &c});
    // Documented behaviour: uniform probabilities, so the output is the mean of v.
    for (int h = 0; h < p.NH; h++)
        for (int i = 0; i < p.S; i++)
            for (int j = 0; j < p.S; j++)
                assert_true(c.probs[((int64_t)(p.NH + h) * p.S + i) * p.S + j] == 0.25f);
    const int D = p.NH * p.HD;
    for (int i = 0; i < p.S; i++)
        for (int d = 0; d < D; d++) {
            double m = 0;
            for (int j = 0; j < p.S; j++) m += c.v[(p.S + j) * D + d] / 4.0;
            EXPECT_LE(fabs(c.out[(p.S + i) * D + d] - m), 1e-6, "all-padded row out - mean(v)");
        }
    int64_t n = (int64_t)p.B * p.S * D;
    float *dq = alloc_f(n), *dk = alloc_f(n), *dv = alloc_f(n);
    attn_bwd(&(gradcase){.ctx = &c}, (float *const[3]){dq, dk, dv});
    for (int64_t i = 0; i < n; i++)
        assert_true(isfinite(dq[i]) && isfinite(dk[i]) && isfinite(dv[i]));
    levi_free(dq);
    levi_free(dk);
    levi_free(dv);
    attn_free(&c);
}

/* Two geometries: a tiny one (HD = 3: the narrow-tile paths), and one with S = 18 (a partial
 * 8-key vector, partial 4-row tiles) and HD = 16; each in the separate layout without dropout
 * and in the packed layout with dropout 0.3 on the probabilities. */
static const int attn_grad_shapes[2][4] = {{2, 5, 2, 3}, {2, 18, 1, 16}};

static void test_attention_grad(void **state) {
    (void)state;
    for (int t = 0; t < 4; t++) {
        const int *sh = attn_grad_shapes[t / 2];
        const int packed = t % 2;
        levi_rng r;
        levi_rng_seed(&r, TEST_SEED(13 + t));
        attn_ctx c;
        attn_init(&c, &r, sh[0], sh[1], sh[2], sh[3], packed, packed ? 0.3f : 0.0f);
        c.mask[2] = 0; // sequence 0 gets a padded key in the middle, sequence 1 one at its end
        const int D = c.p.NH * c.p.HD;
        const int64_t N = (int64_t)c.p.B * c.p.S, n = N * D;
        printf("attention %d x %d, %d heads of %d, %s\n", sh[0], sh[1], sh[2], sh[3],
               packed ? "packed qkv, strided out, dropout 0.3" : "separate, no dropout");
        gradcase gc = {
            .op = "attention", .count = 3, .loss = attn_loss, .backward = attn_bwd, .ctx = &c};
        gc_defaults(&gc);
        if (packed) {
            gc.count = 1;
            gc.name[0] = "qkv", gc.x[0] = c.qkv, gc.n[0] = N * c.p.ldq;
        } else {
            gc.name[0] = "q", gc.x[0] = c.q, gc.n[0] = n;
            gc.name[1] = "k", gc.x[1] = c.k, gc.n[1] = n;
            gc.name[2] = "v", gc.x[2] = c.v, gc.n[2] = n;
        }
        run_gradcase(&gc);
        // Padded keys and values receive exactly no gradient; nothing lands in the gaps or,
        // in the packed layout, in the q columns (dq not asked for).
        const int ld = c.p.ldk;
        float *base = alloc_f(N * ld), *dv = packed ? NULL : alloc_f(N * ld);
        float *dk = packed ? base + D : base;
        if (packed) dv = base + 2 * D;
        attn_loss(&gc);
        levi_attention_backward(NULL, dk, dv, c.R, c.probs, c.dropout_seed, c.q, c.k, c.v, c.mask,
                                c.p, c.scratch, c.scratch_floats);
        for (int64_t row = 0; row < N; row++) {
            const int padded = !c.mask[row];
            for (int d = 0; d < D; d++)
                if (padded) assert_true(dk[row * ld + d] == 0.0f && dv[row * ld + d] == 0.0f);
            if (packed) {
                for (int col = 0; col < D; col++) assert_true(base[row * ld + col] == 0.0f);
                for (int col = 3 * D; col < ld; col++) assert_true(base[row * ld + col] == 0.0f);
            }
        }
        levi_free(base);
        if (!packed) levi_free(dv);
        attn_free(&c);
    }
}

/* Dropout on the probabilities: with V the identity (S <= HD) the output of head h is the
 * dropped-out probability matrix itself, which must be 0 or probs / (1 - p), drop about a
 * fraction p, repeat for the same rng state and change with it; then the output for a random
 * V and all three gradients against a double-precision reference that uses those decisions. */
static void test_attention_dropout(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(17));
    const float rate = 0.25f, keep = 1.0f / (1.0f - rate);
    attn_ctx c;
    attn_init(&c, &r, 3, 24, 2, 24, 1, rate);
    const levi_attention_params p = c.p;
    const int S = p.S, NH = p.NH, HD = p.HD, D = NH * HD;
    const int64_t N = (int64_t)p.B * S, np = (int64_t)p.B * NH * S * S;
    for (int s = 0; s < S; s++) c.mask[s] = 1, c.mask[S + s] = s < 17, c.mask[2 * S + s] = s != 5;
    float *vkeep = alloc_f(N * D); // the random V, kept for later
    for (int64_t n = 0; n < N; n++) memcpy(vkeep + n * D, &c.v[n * p.ldv], D * sizeof(float));
    for (int64_t n = 0; n < N; n++)
        for (int col = 0; col < D; col++) c.v[n * p.ldv + col] = (float)((col % HD) == n % S);
    levi_rng a, a2;
    levi_rng_seed(&a, 555);
    a2 = a;
    levi_attention_forward(c.out, c.probs, &c.dropout_seed, c.q, c.k, c.v, c.mask, p, &a, c.scratch,
                           c.scratch_floats);
    assert_true(c.dropout_seed == levi_rng_u64(&a2)); // one draw, saved for backward
    float *mult = alloc_f(np), *pd = alloc_f(np);
    int64_t kept = 0, dropped = 0;
    for (int b = 0; b < p.B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < S; i++)
                for (int j = 0; j < S; j++) {
                    const int64_t e = (((int64_t)b * NH + h) * S + i) * S + j;
                    const float pr = c.probs[e];
                    pd[e] = c.out[((int64_t)b * S + i) * p.ldo + h * HD + j];
                    if (!c.mask[b * S + j]) {
                        assert_true(pr == 0.0f && pd[e] == 0.0f);
                        continue;
                    }
                    assert_true(pr > 0.0f);
                    if (pd[e] == 0.0f) {
                        dropped++;
                    } else {
                        EXPECT_LE(fabs(pd[e] - pr * keep), 1e-6 * pr, "kept probability / (1-p)");
                        mult[e] = keep, kept++;
                    }
                }
    const double frac = (double)dropped / (double)(dropped + kept);
    printf("attention dropout: %lld of %lld dropped (%.4f, p = %.2f)\n", (long long)dropped,
           (long long)(dropped + kept), frac, rate);
    // 5 sigma of a binomial over ~3100 decisions.
    EXPECT_LE(fabs(frac - rate), 5 * sqrt(rate * (1 - rate) / (double)(dropped + kept)),
              "dropped fraction - p");
    // The same rng state repeats the decisions; the advanced one makes new ones, agreeing
    // about as often as chance (p^2 + (1-p)^2 = 0.625).
    float *out2 = alloc_f(N * p.ldo);
    levi_rng_seed(&a, 555);
    levi_attention_forward(out2, c.probs, NULL, c.q, c.k, c.v, c.mask, p, &a, c.scratch,
                           c.scratch_floats);
    for (int64_t n = 0; n < N; n++)
        assert_memory_equal(out2 + n * p.ldo, c.out + n * p.ldo, (size_t)D * sizeof(float));
    levi_attention_forward(out2, c.probs, NULL, c.q, c.k, c.v, c.mask, p, &a, c.scratch,
                           c.scratch_floats);
    int64_t same = 0, total = 0;
    for (int64_t n = 0; n < N; n++)
        for (int col = 0; col < D; col++)
            if (c.mask[(n / S) * S + col % HD]) {
                same += (out2[n * p.ldo + col] == 0.0f) == (c.out[n * p.ldo + col] == 0.0f);
                total++;
            }
    EXPECT_LE(fabs((double)same / (double)total - 0.625), 0.05, "agreement of two draws - 0.625");
    levi_free(out2);

    // A random V: out and the gradients against double precision with the decisions above.
    for (int64_t n = 0; n < N; n++) memcpy(&c.v[n * p.ldv], vkeep + n * D, D * sizeof(float));
    levi_rng_seed(&a, 555);
    levi_attention_forward(c.out, c.probs, &c.dropout_seed, c.q, c.k, c.v, c.mask, p, &a, c.scratch,
                           c.scratch_floats);
    float *g = alloc_f(N * p.ldq);
    levi_attention_backward(g, g + D, g + 2 * D, c.R, c.probs, c.dropout_seed, c.q, c.k, c.v,
                            c.mask, p, c.scratch, c.scratch_floats);
    float *mine[4], *refs[4];
    for (int t = 0; t < 4; t++) mine[t] = alloc_f(N * D), refs[t] = alloc_f(N * D);
    for (int64_t n = 0; n < N; n++) {
        memcpy(mine[0] + n * D, c.out + n * p.ldo, D * sizeof(float));
        for (int t = 0; t < 3; t++)
            memcpy(mine[1 + t] + n * D, g + n * p.ldq + t * D, D * sizeof(float));
    }
    attn_naive_grads(refs, &c, mult);
    const char *what[4] = {"out", "dq", "dk", "dv"};
    for (int t = 0; t < 4; t++) {
        const double e = max_norm_err(mine[t], refs[t], N * D);
        printf("attention with dropout vs double reference: %s %.2g\n", what[t], e);
        EXPECT_LE(e, 1e-5, "attention with dropout vs double reference (relative to max)");
        levi_free(mine[t]);
        levi_free(refs[t]);
    }
    levi_free(g);
    levi_free(vkeep);
    levi_free(mult);
    levi_free(pd);
    attn_free(&c);
}

/* ----------------------------------------------------------------------------------------
 * Mean pooling and concat */

typedef struct {
    int B, S, C;
    int32_t *mask;
    float *inp, *out, *R;
} meanpool_ctx;

static double meanpool_loss(gradcase *gc) {
    meanpool_ctx *c = gc->ctx;
    levi_meanpool_forward(c->out, c->inp, c->mask, c->B, c->S, c->C);
    return dot_d(c->out, c->R, (int64_t)c->B * c->C);
}
static void meanpool_bwd(gradcase *gc, float *const *g) {
    meanpool_ctx *c = gc->ctx;
    levi_meanpool_backward(g[0], c->R, c->mask, c->B, c->S, c->C);
}

static void test_meanpool(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(14));
    int32_t mask[3 * 4] = {1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0}; // full, gapped, empty
    meanpool_ctx c = {.B = 3, .S = 4, .C = 5, .mask = mask};
    c.inp = rand_normal(&r, 60, 1.0f);
    c.out = alloc_f(15);
    c.R = rand_normal(&r, 15, 1.0f);
    levi_meanpool_forward(c.out, c.inp, c.mask, c.B, c.S, c.C);
    for (int b = 0; b < c.B; b++)
        for (int ch = 0; ch < c.C; ch++) {
            double s = 0;
            int cnt = 0;
            for (int t = 0; t < c.S; t++)
                if (mask[b * c.S + t]) s += c.inp[(b * c.S + t) * c.C + ch], cnt++;
            double ref = cnt ? s / cnt : 0.0;
            EXPECT_LE(fabs(c.out[b * c.C + ch] - ref), 1e-6, "meanpool vs naive");
        }
    // Gradient check on the first two sequences (the empty one has zero gradient).
    c.B = 2;
    gradcase gc = {
        .op = "meanpool", .count = 1, .loss = meanpool_loss, .backward = meanpool_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "inp", gc.x[0] = c.inp, gc.n[0] = (int64_t)c.B * c.S * c.C;
    run_gradcase(&gc);
    float *d = alloc_f(60);
    levi_meanpool_backward(d, c.R, mask, 3, c.S, c.C);
    for (int i = 0; i < 60; i++)
        if (!mask[i / c.C]) assert_true(d[i] == 0.0f);
    levi_free(d);
    levi_free(c.inp);
    levi_free(c.out);
    levi_free(c.R);
}

typedef struct {
    int64_t N;
    int CA, CB;
    float *a, *b, *out, *R;
} concat_ctx;

static double concat_loss(gradcase *gc) {
    concat_ctx *c = gc->ctx;
    levi_concat_forward(c->out, c->a, c->b, c->N, c->CA, c->CB);
    return dot_d(c->out, c->R, c->N * (c->CA + c->CB));
}
static void concat_bwd(gradcase *gc, float *const *g) {
    concat_ctx *c = gc->ctx;
    levi_concat_backward(g[0], g[1], c->R, c->N, c->CA, c->CB);
}

static void test_concat(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(15));
    concat_ctx c = {.N = 4, .CA = 3, .CB = 5};
    c.a = rand_normal(&r, 12, 1.0f);
    c.b = rand_normal(&r, 20, 1.0f);
    c.out = alloc_f(32);
    c.R = rand_normal(&r, 32, 1.0f);
    levi_concat_forward(c.out, c.a, c.b, c.N, c.CA, c.CB);
    for (int n = 0; n < 4; n++) {
        assert_memory_equal(c.out + n * 8, c.a + n * 3, 3 * sizeof(float));
        assert_memory_equal(c.out + n * 8 + 3, c.b + n * 5, 5 * sizeof(float));
    }
    gradcase gc = {
        .op = "concat", .count = 2, .loss = concat_loss, .backward = concat_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "a", gc.x[0] = c.a, gc.n[0] = 12;
    gc.name[1] = "b", gc.x[1] = c.b, gc.n[1] = 20;
    run_gradcase(&gc);
    levi_free(c.a);
    levi_free(c.b);
    levi_free(c.out);
    levi_free(c.R);
}

/* ----------------------------------------------------------------------------------------
 * Losses. L = weight * loss, so backward runs with scale = weight. */

typedef struct {
    int64_t N;
    int C;
    float *x, *target, *probs;
    int32_t *y;
    float weight;
} loss_ctx;

static double mse_loss(gradcase *gc) {
    loss_ctx *c = gc->ctx;
    return (double)c->weight * levi_mse_forward(c->x, c->target, c->N);
}
static void mse_bwd(gradcase *gc, float *const *g) {
    loss_ctx *c = gc->ctx;
    levi_mse_backward(g[0], c->x, c->target, c->N, c->weight);
}

static double ce_loss(gradcase *gc) {
    loss_ctx *c = gc->ctx;
    return (double)c->weight * levi_crossentropy_forward(c->probs, c->x, c->y, c->N, c->C);
}
static void ce_bwd(gradcase *gc, float *const *g) {
    loss_ctx *c = gc->ctx;
    levi_crossentropy_backward(g[0], c->probs, c->y, c->N, c->C, c->weight);
}

static void test_mse(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(16));
    loss_ctx c = {.N = 12, .weight = 0.7f};
    c.x = rand_normal(&r, c.N, 1.0f);
    c.target = rand_normal(&r, c.N, 1.0f);
    double ref = 0;
    for (int i = 0; i < c.N; i++) ref += (c.x[i] - (double)c.target[i]) * (c.x[i] - c.target[i]);
    ref /= c.N;
    EXPECT_LE(fabs(levi_mse_forward(c.x, c.target, c.N) - ref) / ref, 1e-6, "mse vs naive");
    gradcase gc = {.op = "mse", .count = 1, .loss = mse_loss, .backward = mse_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.eps = 1e-2f; // the loss is a float: a larger step keeps its rounding out of the way
    gc.name[0] = "pred", gc.x[0] = c.x, gc.n[0] = c.N;
    run_gradcase(&gc);
    levi_free(c.x);
    levi_free(c.target);
}

static void test_crossentropy(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(17));
    int32_t y[4] = {2, 0, 4, 4};
    loss_ctx c = {.N = 4, .C = 5, .y = y, .weight = 1.3f};
    c.x = rand_normal(&r, 20, 2.0f);
    c.probs = alloc_f(20);
    double ref = 0;
    for (int n = 0; n < 4; n++) {
        double s = 0;
        for (int k = 0; k < 5; k++) s += exp(c.x[n * 5 + k]);
        ref += log(s) - c.x[n * 5 + y[n]];
    }
    ref /= 4;
    float got = levi_crossentropy_forward(c.probs, c.x, y, c.N, c.C);
    EXPECT_LE(fabs(got - ref) / ref, 1e-6, "cross-entropy vs naive");
    assert_true(levi_crossentropy_forward(NULL, c.x, y, c.N, c.C) == got);
    gradcase gc = {
        .op = "crossentropy", .count = 1, .loss = ce_loss, .backward = ce_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.eps = 1e-2f;
    gc.name[0] = "logits", gc.x[0] = c.x, gc.n[0] = 20;
    run_gradcase(&gc);

    // Stable for logits far beyond exp's range: loss = 2000 for the second row, 0 for the first.
    float big[6] = {1000.0f, -1000.0f, 0.0f, 1000.0f, -1000.0f, 0.0f};
    int32_t yb[2] = {0, 1};
    float pb[6];
    float lb = levi_crossentropy_forward(pb, big, yb, 2, 3);
    EXPECT_LE(fabs(lb - 1000.0), 1e-3, "cross-entropy of extreme logits");
    for (int i = 0; i < 6; i++) assert_true(isfinite(pb[i]));
    levi_free(c.x);
    levi_free(c.probs);
}

/* ----------------------------------------------------------------------------------------
 * Convolution */

typedef struct {
    int B, IC, H, W, OC, KH, KW, stride, pad, OH, OW;
    float *inp, *w, *b, *out, *col, *R;
} conv_ctx;

static double conv_loss(gradcase *gc) {
    conv_ctx *c = gc->ctx;
    levi_conv2d_forward(c->out, c->col, c->inp, c->w, c->b, c->B, c->IC, c->H, c->W, c->OC, c->KH,
                        c->KW, c->stride, c->pad);
    return dot_d(c->out, c->R, (int64_t)c->B * c->OC * c->OH * c->OW);
}
static void conv_bwd(gradcase *gc, float *const *g) {
    conv_ctx *c = gc->ctx;
    levi_conv2d_backward(g[0], g[1], g[2], c->col, c->R, c->inp, c->w, c->B, c->IC, c->H, c->W,
                         c->OC, c->KH, c->KW, c->stride, c->pad);
}

static void conv_init(conv_ctx *c, levi_rng *r, int B, int IC, int H, int W, int OC, int KH, int KW,
                      int stride, int pad) {
    memset(c, 0, sizeof *c);
    c->B = B, c->IC = IC, c->H = H, c->W = W, c->OC = OC, c->KH = KH, c->KW = KW;
    c->stride = stride, c->pad = pad;
    c->OH = (H + 2 * pad - KH) / stride + 1;
    c->OW = (W + 2 * pad - KW) / stride + 1;
    c->inp = rand_normal(r, (int64_t)B * IC * H * W, 1.0f);
    c->w = rand_normal(r, (int64_t)OC * IC * KH * KW, 0.5f);
    c->b = rand_normal(r, OC, 0.5f);
    int64_t no = (int64_t)B * OC * c->OH * c->OW;
    c->out = alloc_f(no);
    c->R = rand_normal(r, no, 1.0f);
    c->col = alloc_f((int64_t)IC * KH * KW * c->OH * c->OW);
}

static void conv_free(conv_ctx *c) {
    levi_free(c->inp);
    levi_free(c->w);
    levi_free(c->b);
    levi_free(c->out);
    levi_free(c->R);
    levi_free(c->col);
}

static void conv_naive(float *out, const conv_ctx *c) {
    for (int n = 0; n < c->B; n++)
        for (int o = 0; o < c->OC; o++)
            for (int oh = 0; oh < c->OH; oh++)
                for (int ow = 0; ow < c->OW; ow++) {
                    double s = c->b ? c->b[o] : 0.0;
                    for (int i = 0; i < c->IC; i++)
                        for (int kh = 0; kh < c->KH; kh++)
                            for (int kw = 0; kw < c->KW; kw++) {
                                int ih = oh * c->stride - c->pad + kh;
                                int iw = ow * c->stride - c->pad + kw;
                                if (ih < 0 || ih >= c->H || iw < 0 || iw >= c->W) continue;
                                s += (double)c->inp[((n * c->IC + i) * c->H + ih) * c->W + iw] *
                                     c->w[((o * c->IC + i) * c->KH + kh) * c->KW + kw];
                            }
                    out[((n * c->OC + o) * c->OH + oh) * c->OW + ow] = (float)s;
                }
}

/* Geometries: 3x3 stride 2 pad 1 on a non-square image; 1x1 pointwise; a non-square kernel
 * with stride 1 and no padding; and a 28x28 case big enough for the threaded im2col. */
static const int conv_shapes[4][9] = {
    {2, 3, 6, 5, 4, 3, 3, 2, 1},
    {2, 3, 4, 3, 5, 1, 1, 1, 0},
    {1, 2, 5, 6, 3, 2, 3, 1, 0},
    {2, 8, 28, 28, 16, 3, 3, 1, 1},
};

static void test_conv2d_forward(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(18));
    for (int t = 0; t < 4; t++) {
        const int *s = conv_shapes[t];
        conv_ctx c;
        conv_init(&c, &r, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]);
        int64_t no = (int64_t)c.B * c.OC * c.OH * c.OW;
        float *ref = alloc_f(no);
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            float *keep = c.b;
            if (!with_bias) c.b = NULL;
            for (int64_t i = 0; i < no; i++) c.out[i] = NAN;
            levi_conv2d_forward(c.out, c.col, c.inp, c.w, c.b, c.B, c.IC, c.H, c.W, c.OC, c.KH,
                                c.KW, c.stride, c.pad);
            conv_naive(ref, &c);
            EXPECT_LE(rel_err(c.out, ref, no, 1.0), 1e-5, "conv2d vs direct convolution");
            c.b = keep;
        }
        levi_free(ref);
        conv_free(&c);
    }
}

static void test_conv2d_grad(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(19));
    for (int t = 0; t < 3; t++) {
        const int *s = conv_shapes[t];
        conv_ctx c;
        conv_init(&c, &r, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]);
        gradcase gc = {
            .op = "conv2d", .count = 3, .loss = conv_loss, .backward = conv_bwd, .ctx = &c};
        gc_defaults(&gc);
        gc.name[0] = "inp", gc.x[0] = c.inp, gc.n[0] = (int64_t)c.B * c.IC * c.H * c.W;
        gc.name[1] = "w", gc.x[1] = c.w, gc.n[1] = (int64_t)c.OC * c.IC * c.KH * c.KW;
        gc.name[2] = "b", gc.x[2] = c.b, gc.n[2] = c.OC;
        run_gradcase(&gc);
        conv_free(&c);
    }
}

/* ----------------------------------------------------------------------------------------
 * Batch norm */

typedef struct {
    int B, C, HW;
    float *inp, *w, *b, *out, *mean, *rstd, *rmean, *rvar, *R;
} bn_ctx;

static double bn_loss(gradcase *gc) {
    bn_ctx *c = gc->ctx;
    levi_batchnorm_forward(c->out, c->mean, c->rstd, c->rmean, c->rvar, c->inp, c->w, c->b, c->B,
                           c->C, c->HW, 1e-5f, 0.1f, 1);
    return dot_d(c->out, c->R, (int64_t)c->B * c->C * c->HW);
}
static void bn_bwd(gradcase *gc, float *const *g) {
    bn_ctx *c = gc->ctx;
    levi_batchnorm_backward(g[0], g[1], g[2], c->R, c->inp, c->w, c->mean, c->rstd, c->B, c->C,
                            c->HW);
}

static void bn_init(bn_ctx *c, levi_rng *r, int B, int C, int HW) {
    memset(c, 0, sizeof *c);
    c->B = B, c->C = C, c->HW = HW;
    int64_t n = (int64_t)B * C * HW;
    c->inp = rand_normal(r, n, 2.0f);
    for (int64_t i = 0; i < n; i++) c->inp[i] += (float)(i / HW % C); // per-channel offsets
    c->w = rand_normal(r, C, 1.0f);
    c->b = rand_normal(r, C, 1.0f);
    c->out = alloc_f(n);
    c->R = rand_normal(r, n, 1.0f);
    c->mean = alloc_f(C);
    c->rstd = alloc_f(C);
    c->rmean = alloc_f(C);
    c->rvar = alloc_f(C);
    for (int i = 0; i < C; i++) c->rvar[i] = 1.0f; // PyTorch's initial running statistics
}

static void bn_free(bn_ctx *c) {
    levi_free(c->inp);
    levi_free(c->w);
    levi_free(c->b);
    levi_free(c->out);
    levi_free(c->R);
    levi_free(c->mean);
    levi_free(c->rstd);
    levi_free(c->rmean);
    levi_free(c->rvar);
}

static void test_batchnorm_forward(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(20));
    bn_ctx c;
    bn_init(&c, &r, 4, 3, 50);
    int64_t n = (int64_t)c.B * c.C * c.HW, cnt = (int64_t)c.B * c.HW;
    float *ref = alloc_f(n);
    // Training: batch statistics; running stats move 10% towards mean and unbiased variance.
    levi_batchnorm_forward(c.out, c.mean, c.rstd, c.rmean, c.rvar, c.inp, c.w, c.b, c.B, c.C, c.HW,
                           1e-5f, 0.1f, 1);
    for (int ch = 0; ch < c.C; ch++) {
        double m = 0, v = 0;
        for (int b = 0; b < c.B; b++)
            for (int i = 0; i < c.HW; i++) m += c.inp[(b * c.C + ch) * c.HW + i];
        m /= cnt;
        for (int b = 0; b < c.B; b++)
            for (int i = 0; i < c.HW; i++) {
                double d = c.inp[(b * c.C + ch) * c.HW + i] - m;
                v += d * d;
            }
        double s = 1.0 / sqrt(v / cnt + 1e-5);
        for (int b = 0; b < c.B; b++)
            for (int i = 0; i < c.HW; i++) {
                int64_t j = (b * c.C + ch) * c.HW + i;
                ref[j] = (float)((c.inp[j] - m) * s * c.w[ch] + c.b[ch]);
            }
        EXPECT_LE(fabs(c.rmean[ch] - 0.1 * m), 1e-6 * (1 + fabs(m)), "running mean");
        EXPECT_LE(fabs(c.rvar[ch] - (0.9 + 0.1 * v / (cnt - 1))), 1e-5, "running var (unbiased)");
        EXPECT_LE(fabs(c.rstd[ch] - s) / s, 1e-6, "batchnorm rstd");
    }
    EXPECT_LE(levi_test_max_abs_diff(c.out, ref, n), 1e-5, "batchnorm train vs double ref");

    // Eval: the running statistics, nothing updated.
    float rm[3] = {0.5f, -1.0f, 2.0f}, rv[3] = {0.25f, 4.0f, 1.0f};
    memcpy(c.rmean, rm, sizeof rm);
    memcpy(c.rvar, rv, sizeof rv);
    levi_batchnorm_forward(c.out, NULL, NULL, c.rmean, c.rvar, c.inp, c.w, c.b, c.B, c.C, c.HW,
                           1e-5f, 0.1f, 0);
    for (int64_t j = 0; j < n; j++) {
        int ch = (int)(j / c.HW % c.C);
        ref[j] = (float)((c.inp[j] - rm[ch]) / sqrt(rv[ch] + 1e-5) * c.w[ch] + c.b[ch]);
    }
    EXPECT_LE(levi_test_max_abs_diff(c.out, ref, n), 1e-5, "batchnorm eval vs formula");
    assert_memory_equal(c.rmean, rm, sizeof rm);
    assert_memory_equal(c.rvar, rv, sizeof rv);
    levi_free(ref);
    bn_free(&c);
}

static void test_batchnorm_grad(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(21));
    bn_ctx c;
    bn_init(&c, &r, 3, 2, 5);
    int64_t n = (int64_t)c.B * c.C * c.HW;
    gradcase gc = {.op = "batchnorm", .count = 3, .loss = bn_loss, .backward = bn_bwd, .ctx = &c};
    gc_defaults(&gc);
    gc.name[0] = "inp", gc.x[0] = c.inp, gc.n[0] = n;
    gc.name[1] = "w", gc.x[1] = c.w, gc.n[1] = c.C;
    gc.name[2] = "b", gc.x[2] = c.b, gc.n[2] = c.C;
    run_gradcase(&gc);
    bn_free(&c);
}

/* ----------------------------------------------------------------------------------------
 * Max pool */

typedef struct {
    int B, C, H, W, k, s, OH, OW;
    float *inp, *out, *R;
    int32_t *argmax;
} pool_ctx;

static double pool_loss(gradcase *gc) {
    pool_ctx *c = gc->ctx;
    levi_maxpool_forward(c->out, c->argmax, c->inp, c->B, c->C, c->H, c->W, c->k, c->s);
    return dot_d(c->out, c->R, (int64_t)c->B * c->C * c->OH * c->OW);
}
static void pool_bwd(gradcase *gc, float *const *g) {
    pool_ctx *c = gc->ctx;
    levi_maxpool_backward(g[0], c->R, c->argmax, c->B, c->C, c->OH, c->OW);
}

static void test_maxpool(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(22));
    const int geo[2][2] = {{2, 2}, {3, 2}}; // k, s: disjoint and overlapping windows
    for (int t = 0; t < 2; t++) {
        pool_ctx c = {.B = 2, .C = 2, .H = 7, .W = 6, .k = geo[t][0], .s = geo[t][1]};
        c.OH = (c.H - c.k) / c.s + 1;
        c.OW = (c.W - c.k) / c.s + 1;
        int n = c.B * c.C * c.H * c.W, no = c.B * c.C * c.OH * c.OW;
        // Distinct values 0.05 apart in random order: no perturbation of 1e-3 changes a max.
        int64_t *perm = malloc((size_t)n * sizeof(int64_t));
        for (int i = 0; i < n; i++) perm[i] = i;
        levi_rng_shuffle_i64(&r, perm, n);
        c.inp = alloc_f(n);
        for (int i = 0; i < n; i++) c.inp[i] = 0.05f * (float)perm[i] - 2.0f;
        free(perm);
        c.out = alloc_f(no);
        c.R = rand_normal(&r, no, 1.0f);
        c.argmax = calloc((size_t)no, sizeof(int32_t));
        levi_maxpool_forward(c.out, c.argmax, c.inp, c.B, c.C, c.H, c.W, c.k, c.s);
        for (int pl = 0; pl < c.B * c.C; pl++)
            for (int oh = 0; oh < c.OH; oh++)
                for (int ow = 0; ow < c.OW; ow++) {
                    float best = -INFINITY;
                    int bi = -1;
                    for (int dh = 0; dh < c.k; dh++)
                        for (int dw = 0; dw < c.k; dw++) {
                            int idx = (pl * c.H + oh * c.s + dh) * c.W + ow * c.s + dw;
                            if (c.inp[idx] > best) best = c.inp[idx], bi = idx;
                        }
                    int o = (pl * c.OH + oh) * c.OW + ow;
                    assert_true(c.out[o] == best);
                    assert_int_equal(c.argmax[o], bi);
                }
        gradcase gc = {
            .op = "maxpool", .count = 1, .loss = pool_loss, .backward = pool_bwd, .ctx = &c};
        gc_defaults(&gc);
        gc.name[0] = "inp", gc.x[0] = c.inp, gc.n[0] = n;
        run_gradcase(&gc);
        levi_free(c.inp);
        levi_free(c.out);
        levi_free(c.R);
        free(c.argmax);
    }
    // Ties: the first maximum in the window wins, as in PyTorch.
    float tie[4] = {1.0f, 3.0f, 3.0f, 0.0f}, o;
    int32_t am;
    levi_maxpool_forward(&o, &am, tie, 1, 1, 2, 2, 2, 2);
    assert_true(o == 3.0f);
    assert_int_equal(am, 1);
}

/* ----------------------------------------------------------------------------------------
 * Thread count. The non-GEMM kernels promise bit-identical results for any number of OpenMP
 * threads (fixed reduction orders, fixed element blocks). Sizes are above every threading
 * threshold, so with two threads the parallel paths really run. */

#define THREAD_OUT_MAX (1 << 21)

/* The next k floats of the result buffer. */
static float *take(float *res, int64_t *at, int64_t k) {
    assert_true(*at + k <= THREAD_OUT_MAX);
    *at += k;
    return res + *at - k;
}

/* Runs every non-GEMM kernel on inputs drawn from a fixed seed; writes their results one after
 * another into res and returns how many floats it wrote. */
static int64_t run_threaded_kernels(float *res) {
    levi_rng r;
    levi_rng_seed(&r, TEST_SEED(99));
    int64_t at = 0;
    const int64_t n = 150000;
    float *x = rand_normal(&r, n, 2.0f), *y = rand_normal(&r, n, 1.0f);
    float *w = rand_normal(&r, 4096, 1.0f), *b = rand_normal(&r, 4096, 1.0f);
#define OUT(k) take(res, &at, (k))
    levi_gelu_forward(OUT(n), x, n);
    levi_gelu_backward(OUT(n), x, y, n);
    levi_relu_backward(OUT(n), x, y, n);
    levi_add_forward(OUT(n), x, y, n);
    // Layer norm: 390 rows of 384.
    const int64_t LN = 390;
    const int LC = 384;
    float *mean = alloc_f(LN), *rstd = alloc_f(LN);
    levi_layernorm_forward(OUT(LN * LC), mean, rstd, x, w, b, LN, LC, 1e-5f);
    float *g = OUT(LN * LC + 2 * LC);
    levi_layernorm_backward(g, g + LN * LC, g + LN * LC + LC, y, x, w, mean, rstd, LN, LC);
    // Linear bias gradient (column sums, not BLAS).
    levi_linear_backward(NULL, NULL, OUT(1000), y, NULL, NULL, 140, 0, 1000);
    // Attention: B=2, S=40, NH=4, HD=16, one padded tail; separate q, k, v without dropout,
    // then packed QKV (row stride 3D) with dropout 0.2, whose decisions must not depend on
    // the thread count either.
    const int B = 2, S = 40, NH = 4, HD = 16, AD = NH * HD;
    const int64_t na = (int64_t)B * S * AD;
    int32_t mask[2 * 40];
    for (int i = 0; i < B * S; i++) mask[i] = i < S || i % S < 30;
    float *probs = alloc_f((int64_t)B * NH * S * S);
    const size_t scratch_floats = levi_attention_scratch_floats(S, NH, HD, 2);
    float *scratch = alloc_f((int64_t)scratch_floats);
    levi_attention_params ap = levi_attention_default_params(B, S, NH, HD);
    ap.scale = 0.25f;
    levi_attention_forward(OUT(na), probs, NULL, x, x + na, x + 2 * na, mask, ap, NULL, scratch,
                           scratch_floats);
    g = OUT(3 * na);
    levi_attention_backward(g, g + na, g + 2 * na, y, probs, 0, x, x + na, x + 2 * na, mask, ap,
                            scratch, scratch_floats);
    ap.ldq = ap.ldk = ap.ldv = 3 * AD;
    ap.dropout = 0.2f;
    levi_rng ar;
    levi_rng_seed(&ar, 31);
    uint64_t seed = 0;
    levi_attention_forward(OUT(na), probs, &seed, x, x + AD, x + 2 * AD, mask, ap, &ar, scratch,
                           scratch_floats);
    g = OUT(3 * na);
    levi_attention_backward(g, g + AD, g + 2 * AD, y, probs, seed, x, x + AD, x + 2 * AD, mask, ap,
                            scratch, scratch_floats);
    levi_meanpool_forward(OUT(B * NH * HD), x, mask, B, S, NH * HD);
    levi_meanpool_backward(OUT(na), y, mask, B, S, NH * HD);
    // Batch norm and max pool over [8, 16, 24*24].
    const int NB = 8, NC = 16, HW = 24 * 24;
    float *bm = alloc_f(NC), *bs = alloc_f(NC), *rm = alloc_f(NC), *rv = alloc_f(NC);
    levi_batchnorm_forward(OUT((int64_t)NB * NC * HW), bm, bs, rm, rv, x, w, b, NB, NC, HW, 1e-5f,
                           0.1f, 1);
    g = OUT((int64_t)NB * NC * HW + 2 * NC);
    levi_batchnorm_backward(g, g + NB * NC * HW, g + NB * NC * HW + NC, y, x, w, bm, bs, NB, NC,
                            HW);
    const int64_t np = (int64_t)NB * NC * 12 * 12;
    int32_t *am = calloc((size_t)np, sizeof(int32_t));
    levi_maxpool_forward(OUT(np), am, x, NB, NC, 24, 24, 2, 2);
    levi_maxpool_backward(OUT((int64_t)NB * NC * HW), y, am, NB, NC, 12, 12);
#undef OUT
    free(am);
    levi_free(x);
    levi_free(y);
    levi_free(w);
    levi_free(b);
    levi_free(mean);
    levi_free(rstd);
    levi_free(probs);
    levi_free(scratch);
    levi_free(bm);
    levi_free(bs);
    levi_free(rm);
    levi_free(rv);
    return at;
}

static void test_thread_count_invariance(void **state) {
    (void)state;
    float *one = alloc_f(THREAD_OUT_MAX), *two = alloc_f(THREAD_OUT_MAX);
    levi_set_num_threads(1);
    int64_t n1 = run_threaded_kernels(one);
    levi_set_num_threads(2);
    int64_t n2 = run_threaded_kernels(two);
    assert_int_equal(n1, n2);
    assert_memory_equal(one, two, (size_t)n1 * sizeof(float));
    levi_free(one);
    levi_free(two);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm_vs_ref),
        cmocka_unit_test(test_linear_forward),
        cmocka_unit_test(test_linear_grad),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_layernorm_forward),
        cmocka_unit_test(test_layernorm_grad),
        cmocka_unit_test(test_gelu),
        cmocka_unit_test(test_relu),
        cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_add),
        cmocka_unit_test(test_attention_forward),
        cmocka_unit_test(test_attention_all_padded_row),
        cmocka_unit_test(test_attention_grad),
        cmocka_unit_test(test_attention_dropout),
        cmocka_unit_test(test_meanpool),
        cmocka_unit_test(test_concat),
        cmocka_unit_test(test_mse),
        cmocka_unit_test(test_crossentropy),
        cmocka_unit_test(test_conv2d_forward),
        cmocka_unit_test(test_conv2d_grad),
        cmocka_unit_test(test_batchnorm_forward),
        cmocka_unit_test(test_batchnorm_grad),
        cmocka_unit_test(test_maxpool),
        cmocka_unit_test(test_thread_count_invariance),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
