/* The paper's synthetic examples as data (include/levi/synthetic.h): App. B's five-feature
 * linear example in exact fractions with its closed-form least-squares limits, and the E.8
 * generators of the pre-training, fine-tuning and test sets.
 *
 * Not for: training networks or printing; the numbers the paper prints as results (Table 6)
 * are NOT stored here, they are computed (tests compare them with the paper).
 */
#include "levi/synthetic.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---- fractions ------------------------------------------------------------------------- */

static int64_t gcd64(int64_t a, int64_t b) {
    if (a < 0) a = -a;
    if (b < 0) b = -b;
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

levi_frac levi_frac_make(int64_t num, int64_t den) {
    LEVI_ASSERT(den != 0, "a fraction needs a nonzero denominator");
    LEVI_ASSERT(num != INT64_MIN && den != INT64_MIN, "fraction out of int64 range");
    if (den < 0) {
        num = -num;
        den = -den;
    }
    int64_t g = gcd64(num, den);
    if (g > 1) {
        num /= g;
        den /= g;
    }
    if (num == 0) den = 1;
    return (levi_frac){num, den};
}

int levi_frac_eq(levi_frac a, levi_frac b) {
    return a.num == b.num && a.den == b.den;
}

double levi_frac_to_double(levi_frac a) {
    return (double)a.num / (double)a.den;
}

int levi_frac_format(levi_frac a, char *buf, size_t cap) {
    if (a.den == 1) return snprintf(buf, cap, "%lld", (long long)a.num);
    return snprintf(buf, cap, "%lld/%lld", (long long)a.num, (long long)a.den);
}

/* Arithmetic that records overflow in *ovf instead of wrapping; the caller checks once. */
static levi_frac fr_mul(levi_frac a, levi_frac b, int *ovf) {
    int64_t g1 = gcd64(a.num, b.den), g2 = gcd64(b.num, a.den);
    if (g1 == 0) g1 = 1;
    if (g2 == 0) g2 = 1;
    int64_t n, d;
    if (__builtin_mul_overflow(a.num / g1, b.num / g2, &n) ||
        __builtin_mul_overflow(a.den / g2, b.den / g1, &d) || n == INT64_MIN) {
        *ovf = 1;
        return levi_frac_make(0, 1);
    }
    return levi_frac_make(n, d);
}

static levi_frac fr_add(levi_frac a, levi_frac b, int *ovf) {
    int64_t g = gcd64(a.den, b.den), l1, l2, n, d;
    if (__builtin_mul_overflow(a.num, b.den / g, &l1) ||
        __builtin_mul_overflow(b.num, a.den / g, &l2) || __builtin_add_overflow(l1, l2, &n) ||
        __builtin_mul_overflow(a.den / g, b.den, &d) || n == INT64_MIN) {
        *ovf = 1;
        return levi_frac_make(0, 1);
    }
    return levi_frac_make(n, d);
}

static levi_frac fr_neg(levi_frac a) {
    return (levi_frac){-a.num, a.den};
}
static levi_frac fr_sub(levi_frac a, levi_frac b, int *ovf) {
    return fr_add(a, fr_neg(b), ovf);
}
static levi_frac fr_abs(levi_frac a) {
    return a.num < 0 ? fr_neg(a) : a;
}
static int fr_less(levi_frac a, levi_frac b) {
    /* Only used on small App. B values, so the cross products cannot overflow there; compare
       in long double to stay safe regardless. */
    return (long double)a.num * b.den < (long double)b.num * a.den;
}
static levi_frac fr_div(levi_frac a, levi_frac b, int *ovf) {
    LEVI_ASSERT(b.num != 0, "division by a zero fraction (pivot check missing)");
    return fr_mul(a, levi_frac_make(b.den, b.num), ovf);
}

static levi_frac fr_dot(const levi_frac *a, const levi_frac *b, int n, int *ovf) {
    levi_frac s = levi_frac_make(0, 1);
    for (int i = 0; i < n; i++) s = fr_add(s, fr_mul(a[i], b[i], ovf), ovf);
    return s;
}

/* ---- App. B ---------------------------------------------------------------------------- */

const char *levi_appb_model_name(levi_appb_model m) {
    switch (m) {
    case LEVI_APPB_PRETRAIN:
        return "pretrain";
    case LEVI_APPB_SCRATCH:
        return "train-from-scratch";
    case LEVI_APPB_FINETUNE:
        return "finetune";
    default:
        return "unknown";
    }
}

#define F(n, d) levi_frac_make(n, d)

void levi_appb_data_paper(levi_appb_data *d) {
    LEVI_ASSERT(d, "levi_appb_data_paper: d is NULL");
    memset(d, 0, sizeof *d);
    /* "the optimal model weights w_true are [0, 1, 1, 1, 0]" */
    const levi_frac w_true[LEVI_APPB_DIM] = {F(0, 1), F(1, 1), F(1, 1), F(1, 1), F(0, 1)};
    /* "a pre-trained model with weights w_pretrain = [1, 1, 1, 0, 0]" (assumed, not trained) */
    const levi_frac w_pre[LEVI_APPB_DIM] = {F(1, 1), F(1, 1), F(1, 1), F(0, 1), F(0, 1)};
    /* "three fine-tuning data points ([0,0,1/3,1/3,1/3], 1), ([0,0,-1/2,-1/2,0], -1),
        ([0,0,1/2,1/4,1/4], 1)"; the text later says "the above two data points", a misprint:
       with any two of them the fine-tuned weights are not [1,1,1,1,1]. */
    const levi_frac xtr[LEVI_APPB_N_TRAIN][LEVI_APPB_DIM] = {
        {F(0, 1), F(0, 1), F(1, 3), F(1, 3), F(1, 3)},
        {F(0, 1), F(0, 1), F(-1, 2), F(-1, 2), F(0, 1)},
        {F(0, 1), F(0, 1), F(1, 2), F(1, 4), F(1, 4)}};
    const levi_frac ytr[LEVI_APPB_N_TRAIN] = {F(1, 1), F(-1, 1), F(1, 1)};
    /* Table 6's test points: x1 = x5 = +-1 carry no information about y (all four sign
       combinations of (x1, y) occur), x2..x4 = y/3. The first row is printed with six
       entries; its five-feature form follows the other rows. */
    const levi_frac xte[LEVI_APPB_N_TEST][LEVI_APPB_DIM] = {
        {F(1, 1), F(1, 3), F(1, 3), F(1, 3), F(1, 1)},
        {F(1, 1), F(-1, 3), F(-1, 3), F(-1, 3), F(1, 1)},
        {F(-1, 1), F(1, 3), F(1, 3), F(1, 3), F(-1, 1)},
        {F(-1, 1), F(-1, 3), F(-1, 3), F(-1, 3), F(-1, 1)}};
    const levi_frac yte[LEVI_APPB_N_TEST] = {F(1, 1), F(-1, 1), F(1, 1), F(-1, 1)};
    memcpy(d->w_true, w_true, sizeof w_true);
    memcpy(d->w_pretrain, w_pre, sizeof w_pre);
    memcpy(d->x_train, xtr, sizeof xtr);
    memcpy(d->y_train, ytr, sizeof ytr);
    memcpy(d->x_test, xte, sizeof xte);
    memcpy(d->y_test, yte, sizeof yte);
}

/* w = w0 + X^T (X X^T)^-1 (y - X w0). */
static levi_status min_norm_fit(const levi_appb_data *d, const levi_frac *w0, levi_frac *w,
                                int *ovf, levi_error *err) {
    enum { M = LEVI_APPB_N_TRAIN, D = LEVI_APPB_DIM };
    levi_frac A[M][M + 1]; /* [X X^T | r], eliminated in place */
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < M; j++) A[i][j] = fr_dot(d->x_train[i], d->x_train[j], D, ovf);
        A[i][M] = fr_sub(d->y_train[i], fr_dot(d->x_train[i], w0, D, ovf), ovf);
    }
    for (int c = 0; c < M; c++) {
        int p = c;
        while (p < M && A[p][c].num == 0) p++;
        if (p == M)
            return levi_errorf(err, LEVI_ERR_NUMERIC,
                               "App. B: the fine-tuning points are linearly dependent (X X^T "
                               "is singular at column %d): the minimum-norm limit needs a "
                               "pseudo-inverse",
                               c);
        if (p != c)
            for (int j = 0; j <= M; j++) {
                levi_frac t = A[c][j];
                A[c][j] = A[p][j];
                A[p][j] = t;
            }
        for (int i = 0; i < M; i++) {
            if (i == c || A[i][c].num == 0) continue;
            levi_frac f = fr_div(A[i][c], A[c][c], ovf);
            for (int j = c; j <= M; j++) A[i][j] = fr_sub(A[i][j], fr_mul(f, A[c][j], ovf), ovf);
        }
    }
    levi_frac a[M];
    for (int i = 0; i < M; i++) a[i] = fr_div(A[i][M], A[i][i], ovf);
    for (int k = 0; k < D; k++) {
        w[k] = w0[k];
        for (int i = 0; i < M; i++) w[k] = fr_add(w[k], fr_mul(d->x_train[i][k], a[i], ovf), ovf);
    }
    return LEVI_OK;
}

levi_status levi_appb_solve(const levi_appb_data *d, levi_appb_result *out, levi_error *err) {
    LEVI_ASSERT(d && out, "levi_appb_solve: NULL argument");
    memset(out, 0, sizeof *out);
    int ovf = 0;
    levi_frac zero[LEVI_APPB_DIM];
    for (int k = 0; k < LEVI_APPB_DIM; k++) zero[k] = F(0, 1);
    memcpy(out->w[LEVI_APPB_PRETRAIN], d->w_pretrain, sizeof d->w_pretrain);
    levi_status st = min_norm_fit(d, zero, out->w[LEVI_APPB_SCRATCH], &ovf, err);
    if (st == LEVI_OK) st = min_norm_fit(d, d->w_pretrain, out->w[LEVI_APPB_FINETUNE], &ovf, err);
    if (st != LEVI_OK) return st;
    out->train_residual_max = F(0, 1);
    for (int m = LEVI_APPB_SCRATCH; m <= LEVI_APPB_FINETUNE; m++)
        for (int i = 0; i < LEVI_APPB_N_TRAIN; i++) {
            levi_frac r = fr_abs(
                fr_sub(fr_dot(out->w[m], d->x_train[i], LEVI_APPB_DIM, &ovf), d->y_train[i], &ovf));
            if (fr_less(out->train_residual_max, r)) out->train_residual_max = r;
        }
    for (int t = 0; t < LEVI_APPB_N_TEST; t++) {
        for (int m = 0; m < LEVI_APPB_N_MODELS; m++) {
            out->pred[t][m] = fr_dot(out->w[m], d->x_test[t], LEVI_APPB_DIM, &ovf);
            out->l1[t][m] = fr_abs(fr_sub(d->y_test[t], out->pred[t][m], &ovf));
        }
        out->pred_true[t] = fr_dot(d->w_true, d->x_test[t], LEVI_APPB_DIM, &ovf);
    }
    if (ovf)
        return levi_errorf(err, LEVI_ERR_NUMERIC,
                           "App. B: a fraction overflowed int64 while solving");
    return LEVI_OK;
}

void levi_appb_gradient_descent(const levi_appb_data *d, const double *w0, double lr, int64_t steps,
                                double *w_out) {
    LEVI_ASSERT(d && w0 && w_out && steps >= 0, "levi_appb_gradient_descent: bad argument");
    double X[LEVI_APPB_N_TRAIN][LEVI_APPB_DIM], y[LEVI_APPB_N_TRAIN];
    for (int i = 0; i < LEVI_APPB_N_TRAIN; i++) {
        y[i] = levi_frac_to_double(d->y_train[i]);
        for (int k = 0; k < LEVI_APPB_DIM; k++) X[i][k] = levi_frac_to_double(d->x_train[i][k]);
    }
    double w[LEVI_APPB_DIM];
    memcpy(w, w0, sizeof w);
    for (int64_t s = 0; s < steps; s++) {
        double g[LEVI_APPB_DIM] = {0};
        for (int i = 0; i < LEVI_APPB_N_TRAIN; i++) {
            double r = -y[i];
            for (int k = 0; k < LEVI_APPB_DIM; k++) r += w[k] * X[i][k];
            for (int k = 0; k < LEVI_APPB_DIM; k++) g[k] += 2.0 * r * X[i][k] / LEVI_APPB_N_TRAIN;
        }
        for (int k = 0; k < LEVI_APPB_DIM; k++) w[k] -= lr * g[k];
    }
    memcpy(w_out, w, sizeof w);
}

#undef F

/* ---- E.8 ------------------------------------------------------------------------------- */

const char *levi_e8_split_name(levi_e8_split s) {
    switch (s) {
    case LEVI_E8_PRETRAIN:
        return "pretrain";
    case LEVI_E8_FINETUNE:
        return "finetune";
    case LEVI_E8_TEST:
        return "test";
    default:
        return "unknown";
    }
}

levi_e8_params levi_e8_default_params(void) {
    levi_e8_params p;
    p.n = 2000;
    p.mu_x = 1.0f;
    p.mu_s = 1.0f;
    p.noise_std = 1.0f;
    p.absent_as_noise = 0;
    return p;
}

levi_status levi_e8_generate(levi_e8_split split, const levi_e8_params *p, levi_rng *rng, float *X,
                             int32_t *y, levi_error *err) {
    LEVI_ASSERT(p && rng && X && y, "levi_e8_generate: NULL argument");
    if (split < 0 || split >= LEVI_E8_N_SPLITS)
        return levi_errorf(err, LEVI_ERR_ARG, "E.8: split %d, expected 0..%d", (int)split,
                           LEVI_E8_N_SPLITS - 1);
    if (p->n < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "E.8: n = %lld, expected >= 1", (long long)p->n);
    const struct {
        const char *name;
        float v;
    } scales[] = {{"mu_x", p->mu_x}, {"mu_s", p->mu_s}, {"noise_std", p->noise_std}};
    for (size_t i = 0; i < sizeof scales / sizeof scales[0]; i++)
        if (!isfinite(scales[i].v) || scales[i].v < 0)
            return levi_errorf(err, LEVI_ERR_ARG, "E.8: %s = %g, expected a finite value >= 0",
                               scales[i].name, (double)scales[i].v);
    for (int64_t i = 0; i < p->n; i++) {
        int32_t label = (int32_t)levi_rng_below(rng, 2);
        float t = label ? 1.0f : -1.0f;
        float *row = X + i * LEVI_E8_N_FEATURES;
        /* Draw order is fixed (s1, s2, x) whatever the split, so the same seed gives the same
           noise pattern in every set; absent features consume no draws. */
        for (int c = 0; c < 2; c++) {
            int spurious_here = (c == LEVI_E8_COL_S1 && split == LEVI_E8_PRETRAIN) ||
                                (c == LEVI_E8_COL_S2 && split == LEVI_E8_FINETUNE);
            if (split == LEVI_E8_TEST || (!spurious_here && p->absent_as_noise)) {
                float sign = levi_rng_below(rng, 2) ? 1.0f : -1.0f;
                row[c] = p->mu_s * sign + p->noise_std * levi_rng_normal(rng);
            } else if (spurious_here) {
                row[c] = p->mu_s * t + p->noise_std * levi_rng_normal(rng);
            } else {
                row[c] = 0.0f;
            }
        }
        row[LEVI_E8_COL_X] = p->mu_x * t + p->noise_std * levi_rng_normal(rng);
        y[i] = label;
    }
    return LEVI_OK;
}
