/* levi synthetic: the paper's two synthetic spurious-feature illustrations as data.
 *
 *  - App. B: a five-feature linear example. Its data (three fine-tuning points, the assumed
 *    pre-trained weights, the true weights, Table 6's four test points) are kept as exact
 *    fractions, and levi_appb_solve computes the fine-tuned and trained-from-scratch weights
 *    the way gradient descent on the squared loss ends up (the start plus the minimum-norm
 *    correction that fits the data) in exact rational arithmetic, then Table 6's predictions
 *    and L1 losses. levi_appb_gradient_descent runs that optimisation in doubles so a test
 *    can check the closed form is where the optimisation goes.
 *  - E.8: generators of the pre-training, fine-tuning and test sets (two spurious features
 *    s1, s2, one transferable feature x, a binary label). The paper states only which
 *    features correlate with the label in which set; the choices made here are written at
 *    levi_e8_params and in docs/results-synthetic.md.
 *
 * Not for: training (mlpnet.h trains the networks, levi.h LEVI; the CLI composes them) or
 * printing. Fractions use int64 numerators and denominators; an overflow is reported, never
 * wrapped.
 */
#ifndef LEVI_SYNTHETIC_H
#define LEVI_SYNTHETIC_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------
 * Exact fractions. Normalised: den > 0, gcd(|num|, den) == 1, zero is 0/1. */
typedef struct levi_frac {
    int64_t num, den;
} levi_frac;

/* num/den reduced; den must be nonzero (asserted: the values here are program constants). */
levi_frac levi_frac_make(int64_t num, int64_t den);
int levi_frac_eq(levi_frac a, levi_frac b);
double levi_frac_to_double(levi_frac a);
/* "5/3", "-1", "0". Returns what snprintf returns. */
int levi_frac_format(levi_frac a, char *buf, size_t cap);

/* ---------------------------------------------------------------------------------------
 * App. B. */
#define LEVI_APPB_DIM 5     /* features x1..x5; x1 and x5 are spurious */
#define LEVI_APPB_N_TRAIN 3 /* fine-tuning points */
#define LEVI_APPB_N_TEST 4  /* Table 6 rows */

typedef enum {
    LEVI_APPB_PRETRAIN = 0, /* given by the paper (an assumption, not computed) */
    LEVI_APPB_SCRATCH,      /* trained from zero on the fine-tuning points */
    LEVI_APPB_FINETUNE,     /* trained from the pre-trained weights on the same points */
    LEVI_APPB_N_MODELS
} levi_appb_model;
const char *levi_appb_model_name(levi_appb_model m); /* "pretrain", "train-from-scratch", ... */

typedef struct levi_appb_data {
    levi_frac w_true[LEVI_APPB_DIM];
    levi_frac w_pretrain[LEVI_APPB_DIM];
    levi_frac x_train[LEVI_APPB_N_TRAIN][LEVI_APPB_DIM];
    levi_frac y_train[LEVI_APPB_N_TRAIN];
    levi_frac x_test[LEVI_APPB_N_TEST][LEVI_APPB_DIM];
    levi_frac y_test[LEVI_APPB_N_TEST];
} levi_appb_data;

/* The paper's App. B inputs. Two misprints are resolved (see synthetic.c): the text says
 * "the above two data points" where three are listed (all three are used), and Table 6's
 * first test point is printed with six entries [1, 1/3, 1/3, 1/3, 1/3, 1] (the five-feature
 * point [1, 1/3, 1/3, 1/3, 1] is used, the sign pattern of the other three rows). */
void levi_appb_data_paper(levi_appb_data *d);

typedef struct levi_appb_result {
    levi_frac w[LEVI_APPB_N_MODELS][LEVI_APPB_DIM];
    levi_frac pred[LEVI_APPB_N_TEST][LEVI_APPB_N_MODELS]; /* y_hat = w . x */
    levi_frac l1[LEVI_APPB_N_TEST][LEVI_APPB_N_MODELS];   /* |y - y_hat| */
    levi_frac pred_true[LEVI_APPB_N_TEST];                /* w_true . x (should equal y) */
    levi_frac train_residual_max;                         /* max |X w - y| of FT and scratch */
} levi_appb_result;

/* w_scratch = 0 + X^T (X X^T)^-1 y and w_finetune = w_pre + X^T (X X^T)^-1 (y - X w_pre):
 * gradient descent on the squared loss from w0 only moves inside the row space of X, so it
 * converges to the point of {w : X w = y} nearest w0. Exact. LEVI_ERR_NUMERIC when X X^T is
 * singular (the limit then needs a pseudo-inverse this example does not need) or a fraction
 * overflows int64. */
levi_status levi_appb_solve(const levi_appb_data *d, levi_appb_result *out, levi_error *err);

/* Full-batch gradient descent on (1/m) sum_i (w . x_i - y_i)^2 from w0 for `steps` steps of
 * size lr, in doubles. w_out[LEVI_APPB_DIM]. */
void levi_appb_gradient_descent(const levi_appb_data *d, const double *w0, double lr, int64_t steps,
                                double *w_out);

/* ---------------------------------------------------------------------------------------
 * E.8 generators. Every set has the same three columns so one network reads all of them. */
#define LEVI_E8_N_FEATURES 3 /* columns, in this order: */
#define LEVI_E8_COL_S1 0     /* spurious in pre-training */
#define LEVI_E8_COL_S2 1     /* spurious in fine-tuning */
#define LEVI_E8_COL_X 2      /* transferable everywhere */

typedef enum {
    LEVI_E8_PRETRAIN = 0, /* s1 and x correlate with y; s2 absent (0) */
    LEVI_E8_FINETUNE,     /* s2 and x correlate with y; s1 absent (0) */
    LEVI_E8_TEST,         /* only x correlates with y; s1, s2 present, independent of y */
    LEVI_E8_N_SPLITS
} levi_e8_split;
const char *levi_e8_split_name(levi_e8_split s); /* "pretrain", "finetune", "test" */

/* Generating process (t = 2y - 1 with y ~ Bernoulli(1/2), e ~ N(0, 1) fresh per entry):
 *   x = mu_x t + noise e                                          (every set)
 *   s = mu_s t + noise e        in the set where s is spurious    (s1: pretrain, s2: finetune)
 *   s = mu_s c + noise e        at test, c = +-1 uniform and independent of y: the same
 *                               marginal as in training, the correlation broken
 *   s = 0                       in the other training set: the feature is absent there, the
 *                               setting of the paper's Lemma 2 and App. B (x = [0, x2]), which
 *                               is what lets a fine-tuned model keep the pre-training
 *                               spurious weight;
 *   s = mu_s c + noise e        instead, when absent_as_noise: present but uncorrelated, as
 *                               at test (a variant, for comparison).
 * Defaults mu_x = mu_s = noise = 1: spurious and transferable features are equally
 * predictive in training (each alone gives Phi(1) = 84.1% accuracy), so nothing favours x. */
typedef struct levi_e8_params {
    int64_t n;           /* points per set: 2000 (paper E.8) */
    float mu_x;          /* 1 */
    float mu_s;          /* 1 */
    float noise_std;     /* 1 */
    int absent_as_noise; /* 0 */
} levi_e8_params;
levi_e8_params levi_e8_default_params(void);

/* Fills X[n, LEVI_E8_N_FEATURES] and y[n] (0 or 1) from rng. LEVI_ERR_ARG for n < 1 or a
 * non-finite or negative scale. */
levi_status levi_e8_generate(levi_e8_split split, const levi_e8_params *p, levi_rng *rng, float *X,
                             int32_t *y, levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_SYNTHETIC_H */
