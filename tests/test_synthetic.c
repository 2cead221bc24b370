/* Tests of the synthetic examples (include/levi/synthetic.h) and the small network trainer
 * (include/levi/mlpnet.h):
 *  - App. B: the computed weight vectors and every prediction and L1 loss of Table 6 equal
 *    the paper's printed fractions exactly; gradient descent ends where the closed form says;
 *  - E.8 generators: label balance, which feature correlates with the label in which set,
 *    absent features exactly 0, determinism, argument errors;
 *  - mlpnet: finite-difference gradients (CE and MSE), argument errors, and a fast E.8 run
 *    (small sets, one learning rate) that checks pre-training, FT, FS and LEVI all learn and
 *    that fine-tuning leaves the weights of the absent s1 untouched (the paper's Lemma 2).
 *    It does NOT check that LEVI wins: that is a result, reported in
 *    docs/results-synthetic.md. */
#include "levi/levi.h"
#include "levi/mlpnet.h"
#include "levi/synthetic.h"
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FR(n, d) levi_frac_make(n, d)

static void assert_frac(levi_frac got, levi_frac want, const char *what) {
    if (!levi_frac_eq(got, want)) {
        char g[32], w[32];
        levi_frac_format(got, g, sizeof g);
        levi_frac_format(want, w, sizeof w);
        fail_msg("%s: got %s, the paper says %s", what, g, w);
    }
}

static void test_frac(void **state) {
    (void)state;
    char b[32];
    levi_frac f = FR(4, -6);
    assert_int_equal(f.num, -2);
    assert_int_equal(f.den, 3);
    levi_frac_format(f, b, sizeof b);
    assert_string_equal(b, "-2/3");
    levi_frac_format(FR(0, -5), b, sizeof b);
    assert_string_equal(b, "0");
    levi_frac_format(FR(9, 3), b, sizeof b);
    assert_string_equal(b, "3");
    assert_true(levi_frac_eq(FR(2, 4), FR(1, 2)));
    assert_true(fabs(levi_frac_to_double(FR(5, 3)) - 5.0 / 3.0) < 1e-15);
}

static void test_appb_weights(void **state) {
    (void)state;
    levi_appb_data d;
    levi_appb_data_paper(&d);
    levi_appb_result r;
    levi_error err = {0};
    assert_int_equal(levi_appb_solve(&d, &r, &err), LEVI_OK);
    /* Paper App. B: "w_pretrain = [1, 1, 1, 0, 0]", "w_train-from-scratch = [0, 0, 1, 1, 1]",
       "w_finetune = [1, 1, 1, 1, 1]". The last two are computed. */
    const int want[LEVI_APPB_N_MODELS][LEVI_APPB_DIM] = {
        {1, 1, 1, 0, 0}, {0, 0, 1, 1, 1}, {1, 1, 1, 1, 1}};
    for (int m = 0; m < LEVI_APPB_N_MODELS; m++)
        for (int k = 0; k < LEVI_APPB_DIM; k++) {
            char what[64];
            snprintf(what, sizeof what, "App. B w_%s[%d]", levi_appb_model_name(m), k + 1);
            assert_frac(r.w[m][k], FR(want[m][k], 1), what);
        }
    /* Both trained models fit the three fine-tuning points exactly. */
    assert_frac(r.train_residual_max, FR(0, 1), "max training residual");
    /* "the optimal model with w_true = [0, 1, 1, 1, 0] can predict all test samples correctly
       with zero errors" */
    for (int t = 0; t < LEVI_APPB_N_TEST; t++) assert_frac(r.pred_true[t], d.y_test[t], "w_true");
}

static void test_appb_table6(void **state) {
    (void)state;
    levi_appb_data d;
    levi_appb_data_paper(&d);
    levi_appb_result r;
    levi_error err = {0};
    assert_int_equal(levi_appb_solve(&d, &r, &err), LEVI_OK);
    /* Table 6, column "y_hat", rows in the table's order (per test point: pretrain,
       train-from-scratch, finetune). */
    const levi_frac pred[LEVI_APPB_N_TEST][LEVI_APPB_N_MODELS] = {
        {FR(5, 3), FR(5, 3), FR(3, 1)},
        {FR(1, 3), FR(1, 3), FR(1, 1)},
        {FR(-1, 3), FR(-1, 3), FR(-1, 1)},
        {FR(-5, 3), FR(-5, 3), FR(-3, 1)}};
    /* Table 6, column "L1 loss (i.e., |y_test - y_hat|)". */
    const levi_frac l1[LEVI_APPB_N_TEST][LEVI_APPB_N_MODELS] = {{FR(2, 3), FR(2, 3), FR(2, 1)},
                                                                {FR(4, 3), FR(4, 3), FR(2, 1)},
                                                                {FR(4, 3), FR(4, 3), FR(2, 1)},
                                                                {FR(2, 3), FR(2, 3), FR(2, 1)}};
    for (int t = 0; t < LEVI_APPB_N_TEST; t++)
        for (int m = 0; m < LEVI_APPB_N_MODELS; m++) {
            char what[80];
            snprintf(what, sizeof what, "Table 6 row %d, w_%s, y_hat", t + 1,
                     levi_appb_model_name(m));
            assert_frac(r.pred[t][m], pred[t][m], what);
            snprintf(what, sizeof what, "Table 6 row %d, w_%s, L1 loss", t + 1,
                     levi_appb_model_name(m));
            assert_frac(r.l1[t][m], l1[t][m], what);
        }
}

/* The closed form is the limit of the optimisation the paper describes. */
static void test_appb_gradient_descent(void **state) {
    (void)state;
    levi_appb_data d;
    levi_appb_data_paper(&d);
    levi_appb_result r;
    levi_error err = {0};
    assert_int_equal(levi_appb_solve(&d, &r, &err), LEVI_OK);
    double zero[LEVI_APPB_DIM] = {0}, pre[LEVI_APPB_DIM], w[LEVI_APPB_DIM];
    for (int k = 0; k < LEVI_APPB_DIM; k++) pre[k] = levi_frac_to_double(d.w_pretrain[k]);
    const double *starts[2] = {zero, pre};
    const levi_appb_model models[2] = {LEVI_APPB_SCRATCH, LEVI_APPB_FINETUNE};
    for (int s = 0; s < 2; s++) {
        levi_appb_gradient_descent(&d, starts[s], 1.0, 200000, w);
        for (int k = 0; k < LEVI_APPB_DIM; k++)
            assert_true(fabs(w[k] - levi_frac_to_double(r.w[models[s]][k])) < 1e-9);
    }
    /* After only a few steps it is not there yet: the check above can fail. */
    levi_appb_gradient_descent(&d, zero, 1.0, 3, w);
    assert_true(fabs(w[3] - 1.0) > 1e-3);
}

static void test_appb_singular(void **state) {
    (void)state;
    levi_appb_data d;
    levi_appb_data_paper(&d);
    memcpy(d.x_train[2], d.x_train[0], sizeof d.x_train[0]); /* dependent rows */
    levi_appb_result r;
    levi_error err = {0};
    assert_int_equal(levi_appb_solve(&d, &r, &err), LEVI_ERR_NUMERIC);
    assert_non_null(strstr(err.msg, "linearly dependent"));
}

/* ---- E.8 generators -------------------------------------------------------------------- */

static void test_e8_generator(void **state) {
    (void)state;
    levi_e8_params p = levi_e8_default_params();
    assert_int_equal(p.n, 2000); /* paper E.8: "All datasets have 2,000 data points." */
    p.n = 40000;                 /* larger for tight statistics */
    float *X = malloc((size_t)p.n * LEVI_E8_N_FEATURES * sizeof(float));
    int32_t *y = malloc((size_t)p.n * sizeof(int32_t));
    levi_error err = {0};
    for (int sp = 0; sp < LEVI_E8_N_SPLITS; sp++) {
        levi_rng rng;
        levi_rng_seed(&rng, 100 + (uint64_t)sp);
        assert_int_equal(levi_e8_generate(sp, &p, &rng, X, y, &err), LEVI_OK);
        /* E[t * feature] = mu for a label-correlated feature, 0 otherwise; with n = 40000 and
           unit-ish variance the standard error is ~0.007: tolerance 0.04 (> 5 sigma). */
        double pos = 0, tf[LEVI_E8_N_FEATURES] = {0}, sq[LEVI_E8_N_FEATURES] = {0};
        int zeros[LEVI_E8_N_FEATURES] = {0};
        for (int64_t i = 0; i < p.n; i++) {
            double t = y[i] ? 1.0 : -1.0;
            pos += y[i];
            for (int c = 0; c < LEVI_E8_N_FEATURES; c++) {
                double v = X[i * LEVI_E8_N_FEATURES + c];
                tf[c] += t * v;
                sq[c] += v * v;
                zeros[c] += v == 0.0;
            }
        }
        assert_true(fabs(pos / p.n - 0.5) < 0.02);
        for (int c = 0; c < LEVI_E8_N_FEATURES; c++) {
            tf[c] /= p.n;
            sq[c] /= p.n;
        }
        /* x predicts y everywhere. */
        assert_true(fabs(tf[LEVI_E8_COL_X] - 1.0) < 0.04);
        assert_true(fabs(sq[LEVI_E8_COL_X] - 2.0) < 0.08); /* mu^2 + noise^2 */
        if (sp == LEVI_E8_PRETRAIN) {
            assert_true(fabs(tf[LEVI_E8_COL_S1] - 1.0) < 0.04);
            assert_int_equal(zeros[LEVI_E8_COL_S2], p.n); /* absent */
        } else if (sp == LEVI_E8_FINETUNE) {
            assert_true(fabs(tf[LEVI_E8_COL_S2] - 1.0) < 0.04);
            assert_int_equal(zeros[LEVI_E8_COL_S1], p.n); /* absent */
        } else {
            /* Present with the training marginal (second moment 2) but no correlation. */
            for (int c = LEVI_E8_COL_S1; c <= LEVI_E8_COL_S2; c++) {
                assert_true(fabs(tf[c]) < 0.04);
                assert_true(fabs(sq[c] - 2.0) < 0.08);
            }
        }
    }
    /* Same seed, same data. */
    float *X2 = malloc((size_t)p.n * LEVI_E8_N_FEATURES * sizeof(float));
    int32_t *y2 = malloc((size_t)p.n * sizeof(int32_t));
    levi_rng a, b;
    levi_rng_seed(&a, 7);
    levi_rng_seed(&b, 7);
    assert_int_equal(levi_e8_generate(LEVI_E8_TEST, &p, &a, X, y, &err), LEVI_OK);
    assert_int_equal(levi_e8_generate(LEVI_E8_TEST, &p, &b, X2, y2, &err), LEVI_OK);
    assert_memory_equal(X, X2, (size_t)p.n * LEVI_E8_N_FEATURES * sizeof(float));
    assert_memory_equal(y, y2, (size_t)p.n * sizeof(int32_t));
    /* Bad parameters name the field. */
    levi_e8_params bad = levi_e8_default_params();
    bad.mu_s = -1;
    assert_int_equal(levi_e8_generate(LEVI_E8_TEST, &bad, &a, X, y, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "mu_s"));
    bad = levi_e8_default_params();
    bad.n = 0;
    assert_int_equal(levi_e8_generate(LEVI_E8_TEST, &bad, &a, X, y, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "n = 0"));
    free(X);
    free(X2);
    free(y);
    free(y2);
}

/* ---- mlpnet ---------------------------------------------------------------------------- */

/* Central differences of the mean loss against the analytic gradient, every parameter.
 * The network is float, so eps = 1e-3 and the tolerance is 1e-3 absolute + 1e-2 relative
 * (float rounding of a loss ~1 gives ~1e-4 in the difference quotient). A pre-activation
 * within eps of ReLU's kink makes the difference quotient wrong while backward is right
 * (init seed 11 put one at 7e-5 and failed here): init seed 184 is chosen so that every
 * positive hidden output exceeds 20 eps (41 of 56 are positive), and the test asserts it. */
static void gradcheck(levi_mlp_loss loss) {
    levi_mlpnet_params p = levi_mlpnet_default_params();
    p.n_in = 4;
    p.n_hidden = 2;
    p.hidden[0] = 5;
    p.hidden[1] = 3;
    p.n_out = 3;
    p.loss = loss;
    levi_mlpnet *net = NULL;
    levi_error err = {0};
    assert_int_equal(levi_mlpnet_init(&net, &p, 184, &err), LEVI_OK);
    enum { N = 7 };
    float X[N * 4], Y[N * 3];
    int32_t yc[N];
    levi_rng rng;
    levi_rng_seed(&rng, 5);
    for (int i = 0; i < N * 4; i++) X[i] = levi_rng_normal(&rng);
    for (int i = 0; i < N * 3; i++) Y[i] = levi_rng_normal(&rng);
    for (int i = 0; i < N; i++) yc[i] = (int32_t)levi_rng_below(&rng, 3);
    levi_mlp_data d = {N, 4, X, yc, Y};
    for (int l = 0; l < p.n_hidden; l++) {
        float h[N * 5];
        assert_int_equal(levi_mlpnet_hidden(net, &d, NULL, N, l, h, p.hidden[l], &err), LEVI_OK);
        for (int i = 0; i < N * p.hidden[l]; i++) assert_true(h[i] == 0.0f || h[i] > 20 * 1e-3f);
    }
    levi_params *pt = levi_mlpnet_params_table(net);
    levi_params_zero_grad(pt);
    double l0;
    assert_int_equal(levi_mlpnet_loss_backward(net, &d, NULL, N, &l0, &err), LEVI_OK);
    float *grad = malloc(pt->numel * sizeof(float));
    memcpy(grad, pt->grad, pt->numel * sizeof(float));
    const float eps = 1e-3f;
    int bad = 0;
    for (size_t i = 0; i < pt->numel; i++) {
        float keep = pt->data[i];
        double lp, lm;
        pt->data[i] = keep + eps;
        assert_int_equal(levi_mlpnet_evaluate(net, &d, NULL, N, NULL, &lp, &err), LEVI_OK);
        pt->data[i] = keep - eps;
        assert_int_equal(levi_mlpnet_evaluate(net, &d, NULL, N, NULL, &lm, &err), LEVI_OK);
        pt->data[i] = keep;
        double fd = (lp - lm) / (2 * eps), an = grad[i];
        if (fabs(fd - an) > 1e-3 + 1e-2 * fabs(fd)) {
            print_error("param %zu: finite difference %g, backward %g\n", i, fd, an);
            bad++;
        }
    }
    assert_int_equal(bad, 0);
    /* Backward accumulates: a second call doubles the gradient. */
    assert_int_equal(levi_mlpnet_loss_backward(net, &d, NULL, N, NULL, &err), LEVI_OK);
    for (size_t i = 0; i < pt->numel; i++) assert_true(fabsf(pt->grad[i] - 2 * grad[i]) < 1e-5f);
    free(grad);
    levi_mlpnet_free(net);
}

static void test_mlpnet_gradcheck_ce(void **state) {
    (void)state;
    gradcheck(LEVI_MLP_LOSS_CE);
}

static void test_mlpnet_gradcheck_mse(void **state) {
    (void)state;
    gradcheck(LEVI_MLP_LOSS_MSE);
}

static void test_mlpnet_errors(void **state) {
    (void)state;
    levi_error err = {0};
    levi_mlpnet *net = NULL;
    levi_mlpnet_params p = levi_mlpnet_default_params();
    p.hidden[1] = 0;
    assert_int_equal(levi_mlpnet_init(&net, &p, 1, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "hidden[1] = 0"));
    assert_null(net);
    p = levi_mlpnet_default_params();
    p.n_out = 1; /* cross-entropy needs two classes */
    assert_int_equal(levi_mlpnet_init(&net, &p, 1, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "n_out = 1"));
    p = levi_mlpnet_default_params();
    assert_int_equal(levi_mlpnet_init(&net, &p, 1, &err), LEVI_OK);
    float X[8] = {0};
    int32_t y[4] = {0, 1, 2, 0};
    levi_mlp_data d = {4, 2, X, y, NULL};
    double m;
    assert_int_equal(levi_mlpnet_evaluate(net, &d, NULL, 4, &m, NULL, &err), LEVI_ERR_SHAPE);
    assert_non_null(strstr(err.msg, "2 input columns"));
    float X3[12] = {0};
    levi_mlp_data d3 = {4, 3, X3, y, NULL};
    assert_int_equal(levi_mlpnet_evaluate(net, &d3, NULL, 4, &m, NULL, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "label of row 2 is 2"));
    int64_t rows[1] = {9};
    assert_int_equal(levi_mlpnet_evaluate(net, &d3, rows, 1, &m, NULL, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "row index 9"));
    levi_mlpnet_train_params tp = levi_mlpnet_train_default_params();
    tp.batch_size = 0;
    int64_t tr[2] = {0, 1};
    assert_int_equal(levi_mlpnet_train(net, &d3, tr, 2, NULL, 0, &tp, NULL, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "batch_size = 0"));
    levi_mlpnet_free(net);
    levi_mlpnet_free(NULL);
}

/* ---- a fast E.8 run -------------------------------------------------------------------- */

static void test_e8_fast_run(void **state) {
    (void)state;
    const int F = LEVI_E8_N_FEATURES;
    levi_e8_params gp = levi_e8_default_params();
    gp.n = 600;
    int64_t n = gp.n, ntr = 480, nva = 120;
    float *X[3];
    int32_t *Y[3];
    levi_error err = {0};
    for (int s = 0; s < 3; s++) {
        X[s] = malloc((size_t)n * F * sizeof(float));
        Y[s] = malloc((size_t)n * sizeof(int32_t));
        levi_rng rng;
        levi_rng_seed(&rng, 1000 + (uint64_t)s);
        assert_int_equal(levi_e8_generate(s, &gp, &rng, X[s], Y[s], &err), LEVI_OK);
    }
    int64_t *idx = malloc((size_t)n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) idx[i] = i;
    levi_mlp_data dpre = {n, F, X[0], Y[0], NULL}, dft = {n, F, X[1], Y[1], NULL},
                  dte = {n, F, X[2], Y[2], NULL};
    levi_mlpnet_params np = levi_mlpnet_default_params();
    levi_mlpnet_train_params tp = levi_mlpnet_train_default_params();
    tp.lr = 1e-2f;
    tp.max_epochs = 30;
    tp.seed = 3;
    levi_mlpnet *pt = NULL, *ft = NULL, *fs = NULL;
    levi_mlpnet_train_result res;
    double acc;
    /* Pre-training: s1 and x together give Phi(sqrt 2) = 92% (Bayes); a chance-level or
       broken trainer stays near 50%. */
    assert_int_equal(levi_mlpnet_init(&pt, &np, 1, &err), LEVI_OK);
    assert_int_equal(levi_mlpnet_train(pt, &dpre, idx, ntr, idx + ntr, nva, &tp, &res, &err),
                     LEVI_OK);
    assert_true(res.best_epoch >= 1 && res.epochs_run <= 30);
    assert_int_equal(levi_mlpnet_evaluate(pt, &dpre, idx + ntr, nva, &acc, NULL, &err), LEVI_OK);
    assert_true(acc > 0.85);
    assert_true(fabs(acc - res.best_val_metric) < 1e-12); /* best epoch's weights kept */

    /* FT: s1 is 0 in every fine-tuning row, so the first layer's s1 column gets exactly zero
       gradient and Adam leaves it as pre-trained (Lemma 2's mechanism). */
    assert_int_equal(levi_mlpnet_clone(&ft, pt, &err), LEVI_OK);
    assert_int_equal(levi_mlpnet_train(ft, &dft, idx, ntr, idx + ntr, nva, &tp, &res, &err),
                     LEVI_OK);
    levi_params *pp = levi_mlpnet_params_table(pt), *pf = levi_mlpnet_params_table(ft);
    int iw = levi_params_find(pp, "fc.0.weight");
    assert_true(iw >= 0);
    const float *w_pt = levi_params_data(pp, iw), *w_ft = levi_params_data(pf, iw);
    int changed_x = 0;
    for (int h = 0; h < np.hidden[0]; h++) {
        assert_true(w_ft[h * F + LEVI_E8_COL_S1] == w_pt[h * F + LEVI_E8_COL_S1]);
        changed_x += w_ft[h * F + LEVI_E8_COL_X] != w_pt[h * F + LEVI_E8_COL_X];
    }
    assert_true(changed_x > 0); /* while the x column did train */
    assert_int_equal(levi_mlpnet_evaluate(ft, &dft, idx + ntr, nva, &acc, NULL, &err), LEVI_OK);
    assert_true(acc > 0.8);
    assert_int_equal(levi_mlpnet_evaluate(ft, &dte, NULL, n, &acc, NULL, &err), LEVI_OK);
    assert_true(acc > 0.55 && acc < 0.9); /* spurious features cost accuracy, x still helps */

    /* FS. */
    assert_int_equal(levi_mlpnet_init(&fs, &np, 2, &err), LEVI_OK);
    assert_int_equal(levi_mlpnet_train(fs, &dft, idx, ntr, idx + ntr, nva, &tp, &res, &err),
                     LEVI_OK);
    assert_int_equal(levi_mlpnet_evaluate(fs, &dft, idx + ntr, nva, &acc, NULL, &err), LEVI_OK);
    assert_true(acc > 0.8);

    /* LEVI on the frozen pre-trained network's hidden layers (rows 0..n-1 fine-tuning,
       n..2n-1 test). */
    int L = np.n_hidden, H = np.hidden[0];
    float *feats = malloc((size_t)2 * n * L * H * sizeof(float));
    float *num = malloc((size_t)2 * n * F * sizeof(float));
    int32_t *yc = malloc((size_t)2 * n * sizeof(int32_t));
    const levi_mlp_data *src[2] = {&dft, &dte};
    for (int part = 0; part < 2; part++) {
        for (int l = 0; l < L; l++)
            assert_int_equal(levi_mlpnet_hidden(pt, src[part], NULL, n, l,
                                                feats + (size_t)part * n * L * H + l * H, L * H,
                                                &err),
                             LEVI_OK);
        memcpy(num + (size_t)part * n * F, src[part]->X, (size_t)n * F * sizeof(float));
        memcpy(yc + (size_t)part * n, src[part]->yc, (size_t)n * sizeof(int32_t));
    }
    /* The hidden features are post-ReLU: non-negative and not all zero. */
    double fsum = 0;
    for (int64_t i = 0; i < 2 * n * L * H; i++) {
        assert_true(feats[i] >= 0);
        fsum += feats[i];
    }
    assert_true(fsum > 0);
    levi_task_data td;
    memset(&td, 0, sizeof td);
    td.n = 2 * n;
    td.n_num = F;
    td.num = num;
    td.n_layers = L;
    td.feat_dim = H;
    td.feats = feats;
    td.n_classes = 2;
    td.yc = yc;
    levi_head_params hp = levi_head_default_params(LEVI_METHOD_LEVI);
    hp.small_hidden[0] = 64;
    hp.small_hidden[1] = 64;
    hp.adapter_hidden = 64;
    levi_model *lm = NULL;
    assert_int_equal(levi_model_init(&lm, &hp, &td, &err), LEVI_OK);
    assert_int_equal(levi_model_n_adapters(lm), L);
    levi_train_params ltp = levi_train_default_params();
    ltp.lr = 1e-2f;
    ltp.batch_size = 100;
    ltp.max_epochs = 15;
    ltp.seed = 4;
    levi_train_result *lres = calloc(1, sizeof *lres);
    assert_int_equal(levi_train(lm, &td, idx, ntr, idx + ntr, nva, &ltp, lres, &err), LEVI_OK);
    assert_true(lres->best_val_metric > 0.8);
    int64_t *test_rows = malloc((size_t)n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) test_rows[i] = n + i;
    levi_metrics mt;
    assert_int_equal(levi_evaluate(lm, &td, test_rows, n, &mt, &err), LEVI_OK);
    assert_true(mt.metric > 0.55);

    free(lres);
    free(test_rows);
    levi_model_free(lm);
    free(feats);
    free(num);
    free(yc);
    levi_mlpnet_free(pt);
    levi_mlpnet_free(ft);
    levi_mlpnet_free(fs);
    free(idx);
    for (int s = 0; s < 3; s++) {
        free(X[s]);
        free(Y[s]);
    }
}

int main(void) {
    levi_set_num_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frac),
        cmocka_unit_test(test_appb_weights),
        cmocka_unit_test(test_appb_table6),
        cmocka_unit_test(test_appb_gradient_descent),
        cmocka_unit_test(test_appb_singular),
        cmocka_unit_test(test_e8_generator),
        cmocka_unit_test(test_mlpnet_gradcheck_ce),
        cmocka_unit_test(test_mlpnet_gradcheck_mse),
        cmocka_unit_test(test_mlpnet_errors),
        cmocka_unit_test(test_e8_fast_run),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
