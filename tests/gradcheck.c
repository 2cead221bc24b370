/* The finite-difference harness of the op tests (tests/gradcheck.h says what it checks). */
#include "gradcheck.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef TEST_FD_EPS
#define TEST_FD_EPS 1e-2f
#endif

float *alloc_f(int64_t n) {
    return levi_xcalloc((size_t)(n > 0 ? n : 1), sizeof(float));
}

float *rand_normal(levi_rng *r, int64_t n, float scale) {
    float *x = alloc_f(n);
    for (int64_t i = 0; i < n; i++) x[i] = scale * levi_rng_normal(r);
    return x;
}

float *copy_f(const float *x, int64_t n) {
    float *y = alloc_f(n);
    memcpy(y, x, (size_t)n * sizeof(float));
    return y;
}

double dot_d(const float *a, const float *b, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

double max_norm_err(const float *a, const float *b, int64_t n) {
    double m = 0.0;
    for (int64_t i = 0; i < n; i++) m = fabs(b[i]) > m ? fabs(b[i]) : m;
    return levi_test_max_abs_diff(a, b, n) / (m > 0.0 ? m : 1.0);
}

void gc_defaults(gradcase *gc) {
    gc->eps = TEST_FD_EPS;
    gc->rtol = 2e-3;
    gc->atol = 2e-4;
}

void run_gradcase(gradcase *gc) {
    gradcase def;
    gc_defaults(&def);
    if (gc->eps == 0.0f) gc->eps = def.eps;
    if (gc->rtol == 0.0) gc->rtol = def.rtol;
    if (gc->atol == 0.0) gc->atol = def.atol;
    float *g[GC_MAX] = {0}, *g1[GC_MAX] = {0};
    for (int i = 0; i < gc->count; i++) g[i] = alloc_f(gc->n[i]);

    // Analytic gradients.
    gc->loss(gc);
    gc->backward(gc, g);
    for (int i = 0; i < gc->count; i++) g1[i] = copy_f(g[i], gc->n[i]);

    // Central differences, element by element.
    for (int t = 0; t < gc->count; t++) {
        float *x = gc->x[t];
        int64_t n = gc->n[t];
        double *num = malloc((size_t)n * sizeof(double));
        double nmax = 0.0;
        for (int64_t i = 0; i < n; i++) {
            float x0 = x[i], xp = x0 + gc->eps, xm = x0 - gc->eps;
            x[i] = xp;
            double lp = gc->loss(gc);
            x[i] = xm;
            double lm = gc->loss(gc);
            x[i] = x0;
            num[i] = (lp - lm) / ((double)xp - (double)xm);
            if (fabs(num[i]) > nmax) nmax = fabs(num[i]);
        }
        double worst = 0.0;
        int64_t wi = 0;
        for (int64_t i = 0; i < n; i++) {
            double tol = gc->rtol * fabs(num[i]) + gc->atol * (nmax > 1.0 ? nmax : 1.0);
            double r = fabs((double)g1[t][i] - num[i]) / tol;
            if (!(r <= worst)) {
                worst = r;
                wi = i;
            }
        }
        printf("  %s d%s: max |analytic - numeric| / tolerance = %.3f\n", gc->op, gc->name[t],
               worst);
        if (!(worst <= 1.0)) {
            print_error("%s: d%s[%lld]: analytic %.6g vs numeric %.6g (%.2fx the tolerance)\n",
                        gc->op, gc->name[t], (long long)wi, g1[t][wi], num[wi], worst);
        }
        EXPECT_LE(worst, 1.0, "finite-difference error / tolerance");
        // A gradient that is identically zero would pass trivially; none of ours should be.
        assert_true(nmax > 1e-6);
        free(num);
    }
    gc->loss(gc); // restore the forward state of the unperturbed inputs

    // Backward accumulates: a second call adds the same gradients again.
    // The sums round differently on top of a non-zero buffer, hence a tolerance relative to
    // the largest gradient.
    gc->backward(gc, g);
    for (int i = 0; i < gc->count; i++) {
        for (int64_t j = 0; j < gc->n[i]; j++) g1[i][j] *= 2.0f;
        EXPECT_LE(max_norm_err(g[i], g1[i], gc->n[i]), 1e-5, "second backward != 2 x first");
        for (int64_t j = 0; j < gc->n[i]; j++) g1[i][j] *= 0.5f;
    }

    // NULL gradients: all NULL is accepted; each gradient alone matches.
    float *none[GC_MAX] = {0};
    gc->backward(gc, none);
    for (int i = 0; i < gc->count; i++) {
        float *only[GC_MAX] = {0};
        memset(g[i], 0, (size_t)gc->n[i] * sizeof(float));
        only[i] = g[i];
        gc->backward(gc, only);
        EXPECT_LE(max_norm_err(g[i], g1[i], gc->n[i]), 1e-6, "gradient alone != with others");
    }
    for (int i = 0; i < gc->count; i++) {
        levi_free(g[i]);
        levi_free(g1[i]);
    }
}
