/* The additive bias baseline (method BIAS): y ~ mu + sum_c b_c[id_c] over chosen categorical
 * columns, each b_c shrunk by an L2 penalty lambda, fitted by alternating least squares
 * (each sweep solves every column exactly given the others: b_c[v] = sum of partial
 * residuals / (count + lambda)). lambda is chosen on ID validation from a grid.
 *
 * For: a sanity floor every learned method must beat (TASKS.md: a regularised user+item
 * bias model gives ~0.956 / 1.081 RMSE on MovieLens ID / OOD).
 * Not for: classification, or anything beyond first-order effects.
 */
#include "head_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

levi_status levi__bias_fit(levi_model *m, const levi_task_data *d, const int64_t *train,
                           int64_t n_train, const int64_t *val, int64_t n_val,
                           levi_train_result *res, levi_error *err) {
    const levi_head_params *hp = &m->hp;
    levi__init_weights(m, NULL);
    levi__init_from_data(m, d, train, n_train); /* seen maps and mu */
    int nc = m->n_cat;
    int cols[LEVI_MAX_CAT], ncols = 0;
    for (int c = 0; c < nc; c++)
        if (m->p_bias_col[c] >= 0) cols[ncols++] = c;
    double *resid = levi_xmalloc((size_t)n_train * sizeof(double));
    int32_t maxcard = 1;
    for (int k = 0; k < ncols; k++)
        maxcard = m->card[cols[k]] > maxcard ? m->card[cols[k]] : maxcard;
    double *sum = levi_xmalloc((size_t)maxcard * sizeof(double));
    double *cnt = levi_xmalloc((size_t)maxcard * sizeof(double));
    float *best = levi_xmalloc(m->params.numel * sizeof(float));
    double best_metric = NAN;
    int best_i = -1;
    levi_status st = LEVI_OK;
    if (res) memset(res, 0, sizeof *res);

    for (int li = 0; li < hp->n_bias_lambda; li++) {
        double lambda = hp->bias_lambda[li];
        float *mu = levi_params_data(&m->params, m->p_bias_global);
        double s = 0;
        for (int64_t i = 0; i < n_train; i++) s += d->y[train[i]];
        mu[0] = (float)(s / (double)n_train);
        for (int k = 0; k < ncols; k++)
            memset(levi_params_data(&m->params, m->p_bias_col[cols[k]]), 0,
                   (size_t)m->card[cols[k]] * sizeof(float));
        for (int64_t i = 0; i < n_train; i++) resid[i] = d->y[train[i]] - mu[0];
        for (int sweep = 0; sweep < hp->bias_sweeps; sweep++) {
            for (int k = 0; k < ncols; k++) {
                int c = cols[k];
                float *b = levi_params_data(&m->params, m->p_bias_col[c]);
                memset(sum, 0, (size_t)m->card[c] * sizeof(double));
                memset(cnt, 0, (size_t)m->card[c] * sizeof(double));
                for (int64_t i = 0; i < n_train; i++) {
                    int32_t v = d->cat[train[i] * nc + c];
                    resid[i] += b[v]; /* take column c's own term out */
                    sum[v] += resid[i];
                    cnt[v] += 1.0;
                }
                for (int32_t v = 0; v < m->card[c]; v++)
                    b[v] = cnt[v] > 0 ? (float)(sum[v] / (cnt[v] + lambda)) : 0.0f;
                for (int64_t i = 0; i < n_train; i++) resid[i] -= b[d->cat[train[i] * nc + c]];
            }
            double shift = 0;
            for (int64_t i = 0; i < n_train; i++) shift += resid[i];
            shift /= (double)n_train;
            mu[0] += (float)shift;
            for (int64_t i = 0; i < n_train; i++) resid[i] -= shift;
        }
        double metric = NAN;
        if (n_val > 0) {
            levi_metrics vm;
            if ((st = levi_evaluate(m, d, val, n_val, &vm, err)) != LEVI_OK) goto done;
            metric = vm.metric;
        }
        if (res && li < LEVI_MAX_EPOCHS) {
            res->val_history[li] = metric;
            res->loss_history[li] = NAN;
            res->n_history = li + 1;
        }
        /* Without validation rows the first lambda of the grid is kept. */
        if (best_i < 0 || (n_val > 0 && levi_metric_better(m, metric, best_metric))) {
            best_i = li;
            best_metric = metric;
            memcpy(best, m->params.data, m->params.numel * sizeof(float));
        }
    }
    memcpy(m->params.data, best, m->params.numel * sizeof(float));
    levi__model_refresh(m);
    if (res) {
        res->epochs_run = hp->bias_sweeps;
        res->best_epoch = 1;
        res->best_val_metric = best_metric;
        res->finished = 1;
        res->bias_lambda = hp->bias_lambda[best_i];
    }
done:
    levi_free(best);
    levi_free(cnt);
    levi_free(sum);
    levi_free(resid);
    return st;
}
