/* A small fully connected network over dense inputs and its minibatch trainer
 * (include/levi/mlpnet.h): forward/backward built from ops.h's linear, ReLU, cross-entropy and
 * MSE kernels, weights in one levi_params table, optimizers from optim.h.
 *
 * For: networks of a few thousand parameters on tabular/synthetic data (E.8's 3-layer
 * network, its fine-tuning and from-scratch baselines). Not for: the cached-feature LEVI heads
 * (levi.h) or anything with embeddings, normalisation or dropout.
 */
#include "levi/mlpnet.h"
#include "levi/ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rows of one forward/backward chunk when evaluating; training uses its batch size. */
#define MLP__EVAL_CHUNK 512

struct levi_mlpnet {
    levi_mlpnet_params p;
    int n_layers;                       /* linear layers = n_hidden + 1 */
    int width[LEVI_MLP_MAX_HIDDEN + 2]; /* width[0] = n_in, width[l+1] = out of layer l */
    levi_params params;
    int p_w[LEVI_MLP_MAX_HIDDEN + 1], p_b[LEVI_MLP_MAX_HIDDEN + 1];
    /* Workspace for `cap` rows, one arena (one lifetime class), rebuilt only when a larger
       batch is asked for (never inside the training loop). */
    int64_t cap;
    levi_arena *arena;
    float *x;                           /* [cap, n_in] gathered inputs */
    float *z[LEVI_MLP_MAX_HIDDEN + 1];  /* [cap, width[l+1]] pre-activations */
    float *a[LEVI_MLP_MAX_HIDDEN + 1];  /* [cap, width[l+1]] post-ReLU (hidden layers) */
    float *dz[LEVI_MLP_MAX_HIDDEN + 1]; /* gradients of z */
    float *da[LEVI_MLP_MAX_HIDDEN + 1]; /* gradients of a */
    float *probs;                       /* [cap, n_out] softmax (CE) */
    float *yf;                          /* [cap, n_out] MSE targets */
    int32_t *yc;                        /* [cap] CE labels */
};

levi_mlpnet_params levi_mlpnet_default_params(void) {
    levi_mlpnet_params p;
    memset(&p, 0, sizeof p);
    p.n_in = 3;
    p.n_hidden = 2;
    p.hidden[0] = 64;
    p.hidden[1] = 64;
    p.n_out = 2;
    p.loss = LEVI_MLP_LOSS_CE;
    return p;
}

levi_mlpnet_train_params levi_mlpnet_train_default_params(void) {
    levi_mlpnet_train_params tp;
    memset(&tp, 0, sizeof tp);
    tp.optimizer = LEVI_OPT_ADAM;
    tp.lr = 1e-3f;
    tp.batch_size = 100;
    tp.max_epochs = 100;
    tp.patience = 10;
    return tp;
}

static levi_status check_params(const levi_mlpnet_params *p, levi_error *err) {
    if (p->n_in < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet params: n_in = %d, expected >= 1", p->n_in);
    if (p->n_hidden < 0 || p->n_hidden > LEVI_MLP_MAX_HIDDEN)
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet params: n_hidden = %d, expected 0..%d",
                           p->n_hidden, LEVI_MLP_MAX_HIDDEN);
    for (int l = 0; l < p->n_hidden; l++)
        if (p->hidden[l] < 1 || p->hidden[l] > (1 << 20))
            return levi_errorf(err, LEVI_ERR_ARG, "mlpnet params: hidden[%d] = %d, expected 1..%d",
                               l, p->hidden[l], 1 << 20);
    if (p->loss != LEVI_MLP_LOSS_CE && p->loss != LEVI_MLP_LOSS_MSE)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "mlpnet params: loss = %d, expected CE (0) or MSE (1)", (int)p->loss);
    int min_out = p->loss == LEVI_MLP_LOSS_CE ? 2 : 1;
    if (p->n_out < min_out || p->n_out > (1 << 20))
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet params: n_out = %d, expected %d..%d for %s",
                           p->n_out, min_out, 1 << 20,
                           p->loss == LEVI_MLP_LOSS_CE ? "cross-entropy" : "MSE");
    return LEVI_OK;
}

static size_t round64(size_t b) {
    return (b + 63) & ~(size_t)63;
}

/* Bytes of a workspace for cap rows: a pure function of the shapes (house style rule 7). */
static size_t workspace_bytes(const levi_mlpnet *net, int64_t cap) {
    size_t c = (size_t)cap, f = sizeof(float), total = round64(c * net->width[0] * f);
    for (int l = 0; l < net->n_layers; l++) total += 4 * round64(c * net->width[l + 1] * f);
    total += 2 * round64(c * net->p.n_out * f) + round64(c * sizeof(int32_t));
    return total;
}

static void ensure_workspace(levi_mlpnet *net, int64_t cap) {
    if (net->arena && net->cap >= cap) return;
    levi_arena_free(net->arena);
    net->arena = levi_arena_init(workspace_bytes(net, cap));
    net->cap = cap;
    size_t c = (size_t)cap;
    net->x = levi_arena_floats(net->arena, c * net->width[0]);
    for (int l = 0; l < net->n_layers; l++) {
        size_t k = c * net->width[l + 1];
        net->z[l] = levi_arena_floats(net->arena, k);
        net->a[l] = levi_arena_floats(net->arena, k);
        net->dz[l] = levi_arena_floats(net->arena, k);
        net->da[l] = levi_arena_floats(net->arena, k);
    }
    net->probs = levi_arena_floats(net->arena, c * net->p.n_out);
    net->yf = levi_arena_floats(net->arena, c * net->p.n_out);
    net->yc = levi_arena_alloc(net->arena, c * sizeof(int32_t));
}

static levi_mlpnet *alloc_net(const levi_mlpnet_params *p) {
    levi_mlpnet *net = levi_xcalloc(1, sizeof *net);
    net->p = *p;
    net->n_layers = p->n_hidden + 1;
    net->width[0] = p->n_in;
    for (int l = 0; l < p->n_hidden; l++) net->width[l + 1] = p->hidden[l];
    net->width[net->n_layers] = p->n_out;
    levi_params_init(&net->params);
    for (int l = 0; l < net->n_layers; l++) {
        char name[LEVI_NAME_MAX];
        int64_t ws[2] = {net->width[l + 1], net->width[l]}, bs[1] = {net->width[l + 1]};
        snprintf(name, sizeof name, "fc.%d.weight", l);
        net->p_w[l] = levi_params_add(&net->params, name, 2, ws);
        snprintf(name, sizeof name, "fc.%d.bias", l);
        net->p_b[l] = levi_params_add(&net->params, name, 1, bs);
        net->params.items[net->p_b[l]].no_decay = 1;
    }
    levi_params_alloc(&net->params);
    return net;
}

levi_status levi_mlpnet_init(levi_mlpnet **out, const levi_mlpnet_params *p, uint64_t seed,
                             levi_error *err) {
    LEVI_ASSERT(out && p, "levi_mlpnet_init: NULL argument");
    *out = NULL;
    levi_status st = check_params(p, err);
    if (st != LEVI_OK) return st;
    levi_mlpnet *net = alloc_net(p);
    levi_rng rng;
    levi_rng_seed(&rng, seed);
    for (int l = 0; l < net->n_layers; l++) {
        float bound = 1.0f / sqrtf((float)net->width[l]);
        float *w = levi_params_data(&net->params, net->p_w[l]);
        float *b = levi_params_data(&net->params, net->p_b[l]);
        size_t nw = (size_t)net->width[l + 1] * net->width[l];
        for (size_t i = 0; i < nw; i++) w[i] = (2.0f * levi_rng_uniform(&rng) - 1.0f) * bound;
        for (int i = 0; i < net->width[l + 1]; i++)
            b[i] = (2.0f * levi_rng_uniform(&rng) - 1.0f) * bound;
    }
    *out = net;
    return LEVI_OK;
}

levi_status levi_mlpnet_clone(levi_mlpnet **out, const levi_mlpnet *src, levi_error *err) {
    LEVI_ASSERT(out && src, "levi_mlpnet_clone: NULL argument");
    (void)err;
    levi_mlpnet *net = alloc_net(&src->p);
    memcpy(net->params.data, src->params.data, src->params.numel * sizeof(float));
    *out = net;
    return LEVI_OK;
}

void levi_mlpnet_free(levi_mlpnet *net) {
    if (!net) return;
    levi_params_free(&net->params);
    levi_arena_free(net->arena);
    levi_free(net);
}

const levi_mlpnet_params *levi_mlpnet_config(const levi_mlpnet *net) {
    return &net->p;
}
levi_params *levi_mlpnet_params_table(levi_mlpnet *net) {
    return &net->params;
}
size_t levi_mlpnet_n_params(const levi_mlpnet *net) {
    return net->params.numel;
}

static levi_status check_data(const levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                              int64_t n, int need_labels, levi_error *err) {
    if (!d || d->n < 0 || (d->n > 0 && !d->X))
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet data: X is missing");
    if (d->n_in != net->p.n_in)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "mlpnet data: %d input columns, the network was built for %d", d->n_in,
                           net->p.n_in);
    if (n < 0) return levi_errorf(err, LEVI_ERR_ARG, "mlpnet: %lld rows", (long long)n);
    if (need_labels && net->p.loss == LEVI_MLP_LOSS_CE && !d->yc)
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet data: cross-entropy needs labels yc");
    if (need_labels && net->p.loss == LEVI_MLP_LOSS_MSE && !d->y)
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet data: MSE needs targets y");
    for (int64_t i = 0; i < n; i++) {
        int64_t r = rows ? rows[i] : i;
        if (r < 0 || r >= d->n)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "mlpnet: row index %lld at position %lld, "
                               "expected 0..%lld",
                               (long long)r, (long long)i, (long long)d->n - 1);
        if (need_labels && net->p.loss == LEVI_MLP_LOSS_CE &&
            (d->yc[r] < 0 || d->yc[r] >= net->p.n_out))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "mlpnet data: label of row %lld is %d, "
                               "expected 0..%d",
                               (long long)r, (int)d->yc[r], net->p.n_out - 1);
    }
    return LEVI_OK;
}

/* Gathers rows[0..n) (rows NULL: base..base+n-1) into the workspace (n <= cap) and runs the forward
 * pass; with labels, also the targets. Output layer pre-activation z[n_layers-1] holds
 * logits/predictions. */
static void forward_rows(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                         int64_t base, int64_t n, int with_labels) {
    int nin = net->width[0], nout = net->p.n_out;
    for (int64_t i = 0; i < n; i++) {
        int64_t r = rows ? rows[i] : base + i;
        memcpy(net->x + i * nin, d->X + r * nin, (size_t)nin * sizeof(float));
        if (with_labels) {
            if (net->p.loss == LEVI_MLP_LOSS_CE)
                net->yc[i] = d->yc[r];
            else
                memcpy(net->yf + i * nout, d->y + r * nout, (size_t)nout * sizeof(float));
        }
    }
    const float *inp = net->x;
    for (int l = 0; l < net->n_layers; l++) {
        levi_linear_forward(net->z[l], inp, levi_params_data(&net->params, net->p_w[l]),
                            levi_params_data(&net->params, net->p_b[l]), n, net->width[l],
                            net->width[l + 1]);
        if (l < net->n_layers - 1) {
            levi_relu_forward(net->a[l], net->z[l], n * net->width[l + 1]);
            inp = net->a[l];
        }
    }
}

/* Loss of the workspace's n rows; with backward, gradients accumulate into params.grad. */
static float loss_backward(levi_mlpnet *net, int64_t n, int backward) {
    int L = net->n_layers, nout = net->p.n_out;
    float *logits = net->z[L - 1], loss;
    if (net->p.loss == LEVI_MLP_LOSS_CE)
        loss = levi_crossentropy_forward(net->probs, logits, net->yc, n, nout);
    else
        loss = levi_mse_forward(logits, net->yf, n * nout);
    if (!backward || !isfinite(loss)) return loss;
    for (int l = 0; l < L; l++) {
        memset(net->dz[l], 0, (size_t)n * net->width[l + 1] * sizeof(float));
        memset(net->da[l], 0, (size_t)n * net->width[l + 1] * sizeof(float));
    }
    if (net->p.loss == LEVI_MLP_LOSS_CE)
        levi_crossentropy_backward(net->dz[L - 1], net->probs, net->yc, n, nout, 1.0f);
    else /* mean over n*nout elements, as the forward */
        levi_mse_backward(net->dz[L - 1], logits, net->yf, n * nout, 1.0f);
    for (int l = L - 1; l >= 0; l--) {
        const float *inp = l == 0 ? net->x : net->a[l - 1];
        levi_linear_backward(
            l == 0 ? NULL : net->da[l - 1], levi_params_grad(&net->params, net->p_w[l]),
            levi_params_grad(&net->params, net->p_b[l]), net->dz[l], inp,
            levi_params_data(&net->params, net->p_w[l]), n, net->width[l], net->width[l + 1]);
        if (l > 0)
            levi_relu_backward(net->dz[l - 1], net->z[l - 1], net->da[l - 1], n * net->width[l]);
    }
    return loss;
}

levi_status levi_mlpnet_forward(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                                int64_t n, float *out, levi_error *err) {
    LEVI_ASSERT(net && out, "levi_mlpnet_forward: NULL argument");
    levi_status st = check_data(net, d, rows, n, 0, err);
    if (st != LEVI_OK) return st;
    ensure_workspace(net, MLP__EVAL_CHUNK);
    int nout = net->p.n_out;
    for (int64_t s = 0; s < n; s += net->cap) {
        int64_t b = n - s < net->cap ? n - s : net->cap;
        forward_rows(net, d, rows ? rows + s : NULL, s, b, 0);
        memcpy(out + s * nout, net->z[net->n_layers - 1], (size_t)(b * nout) * sizeof(float));
    }
    return LEVI_OK;
}

levi_status levi_mlpnet_hidden(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                               int64_t n, int layer, float *out, int64_t ld_out, levi_error *err) {
    LEVI_ASSERT(net && out, "levi_mlpnet_hidden: NULL argument");
    if (layer < 0 || layer >= net->p.n_hidden)
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet: hidden layer %d, expected 0..%d", layer,
                           net->p.n_hidden - 1);
    int w = net->p.hidden[layer];
    if (ld_out < w)
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet: output row stride %lld < layer width %d",
                           (long long)ld_out, w);
    levi_status st = check_data(net, d, rows, n, 0, err);
    if (st != LEVI_OK) return st;
    ensure_workspace(net, MLP__EVAL_CHUNK);
    for (int64_t s = 0; s < n; s += net->cap) {
        int64_t b = n - s < net->cap ? n - s : net->cap;
        forward_rows(net, d, rows ? rows + s : NULL, s, b, 0);
        for (int64_t i = 0; i < b; i++)
            memcpy(out + (s + i) * ld_out, net->a[layer] + i * w, (size_t)w * sizeof(float));
    }
    return LEVI_OK;
}

levi_status levi_mlpnet_evaluate(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                                 int64_t n, double *metric, double *loss, levi_error *err) {
    LEVI_ASSERT(net, "levi_mlpnet_evaluate: NULL network");
    levi_status st = check_data(net, d, rows, n, 1, err);
    if (st != LEVI_OK) return st;
    if (n == 0) return levi_errorf(err, LEVI_ERR_ARG, "mlpnet: evaluating 0 rows");
    ensure_workspace(net, MLP__EVAL_CHUNK);
    int nout = net->p.n_out;
    double loss_sum = 0, hits = 0, sq = 0;
    for (int64_t s = 0; s < n; s += net->cap) {
        int64_t b = n - s < net->cap ? n - s : net->cap;
        forward_rows(net, d, rows ? rows + s : NULL, s, b, 1);
        loss_sum += (double)loss_backward(net, b, 0) * (double)b;
        const float *o = net->z[net->n_layers - 1];
        for (int64_t i = 0; i < b; i++) {
            if (net->p.loss == LEVI_MLP_LOSS_CE) {
                int arg = 0; /* first maximum, as torch.argmax */
                for (int k = 1; k < nout; k++)
                    if (o[i * nout + k] > o[i * nout + arg]) arg = k;
                hits += arg == net->yc[i];
            } else {
                for (int k = 0; k < nout; k++) {
                    double e = (double)o[i * nout + k] - net->yf[i * nout + k];
                    sq += e * e;
                }
            }
        }
    }
    if (loss) *loss = loss_sum / (double)n;
    if (metric)
        *metric =
            net->p.loss == LEVI_MLP_LOSS_CE ? hits / (double)n : sqrt(sq / ((double)n * nout));
    return LEVI_OK;
}

levi_status levi_mlpnet_loss_backward(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                                      int64_t n, double *loss, levi_error *err) {
    LEVI_ASSERT(net, "levi_mlpnet_loss_backward: NULL network");
    levi_status st = check_data(net, d, rows, n, 1, err);
    if (st != LEVI_OK) return st;
    if (n < 1) return levi_errorf(err, LEVI_ERR_ARG, "mlpnet: loss of 0 rows");
    /* One chunk so the mean is over all n rows (the loss kernels average per call). */
    ensure_workspace(net, n > MLP__EVAL_CHUNK ? n : MLP__EVAL_CHUNK);
    forward_rows(net, d, rows, 0, n, 1);
    float l = loss_backward(net, n, 1);
    if (loss) *loss = l;
    if (!isfinite(l))
        return levi_errorf(err, LEVI_ERR_NUMERIC, "mlpnet: non-finite loss %g", (double)l);
    return LEVI_OK;
}

static int metric_better(const levi_mlpnet *net, double a, double b) {
    if (!isfinite(a)) return 0;
    if (!isfinite(b)) return 1;
    return net->p.loss == LEVI_MLP_LOSS_CE ? a > b : a < b;
}

levi_status levi_mlpnet_train(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *train,
                              int64_t n_train, const int64_t *val, int64_t n_val,
                              const levi_mlpnet_train_params *tp, levi_mlpnet_train_result *res,
                              levi_error *err) {
    LEVI_ASSERT(net && tp && (train || n_train == 0), "levi_mlpnet_train: NULL argument");
    levi_mlpnet_train_result local;
    if (!res) res = &local;
    memset(res, 0, sizeof *res);
    res->best_val_metric = NAN;
    res->last_train_loss = NAN;
    if (n_train < 1) return levi_errorf(err, LEVI_ERR_ARG, "mlpnet train: no training rows");
    if (!(tp->lr >= 0) || !isfinite(tp->lr))
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet train: lr = %g, expected >= 0",
                           (double)tp->lr);
    if (tp->batch_size < 1 || tp->max_epochs < 1 || tp->patience < 1)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "mlpnet train: batch_size = %d, max_epochs = %d, patience = %d; "
                           "each must be >= 1",
                           tp->batch_size, tp->max_epochs, tp->patience);
    if (tp->optimizer != LEVI_OPT_SGD && tp->optimizer != LEVI_OPT_ADAM &&
        tp->optimizer != LEVI_OPT_ADAMW)
        return levi_errorf(err, LEVI_ERR_ARG, "mlpnet train: optimizer %d unknown",
                           (int)tp->optimizer);
    if (!(tp->weight_decay >= 0) || !(tp->momentum >= 0 && tp->momentum < 1))
        return levi_errorf(err, LEVI_ERR_ARG,
                           "mlpnet train: weight_decay = %g (expected >= 0), momentum = %g "
                           "(expected in [0, 1))",
                           (double)tp->weight_decay, (double)tp->momentum);
    levi_status st = check_data(net, d, train, n_train, 1, err);
    if (st == LEVI_OK && n_val > 0) st = check_data(net, d, val, n_val, 1, err);
    if (st != LEVI_OK) return st;

    int64_t bs = tp->batch_size < n_train ? tp->batch_size : n_train;
    ensure_workspace(net, bs > MLP__EVAL_CHUNK ? bs : MLP__EVAL_CHUNK);
    levi_optim_params op = levi_optim_default_params(tp->optimizer);
    op.lr = tp->lr;
    op.weight_decay = tp->weight_decay;
    if (tp->optimizer == LEVI_OPT_SGD) op.momentum = tp->momentum;
    levi_optim *opt = levi_optim_init(&net->params, op);
    size_t numel = net->params.numel;
    float *best = levi_xmalloc(numel * sizeof(float));
    memcpy(best, net->params.data, numel * sizeof(float));
    int64_t *order = levi_xmalloc((size_t)n_train * sizeof(int64_t));
    memcpy(order, train, (size_t)n_train * sizeof(int64_t));
    levi_rng rng;
    levi_rng_seed(&rng, tp->seed);
    int bad = 0;
    for (int epoch = 1; epoch <= tp->max_epochs; epoch++) {
        levi_rng_shuffle_i64(&rng, order, n_train);
        double loss_sum = 0;
        int diverged = 0;
        for (int64_t s = 0; s < n_train; s += bs) {
            int64_t b = n_train - s < bs ? n_train - s : bs;
            forward_rows(net, d, order + s, 0, b, 1);
            levi_params_zero_grad(&net->params);
            float loss = loss_backward(net, b, 1);
            if (!isfinite(loss) || !isfinite(levi_optim_step(opt))) {
                diverged = 1;
                break;
            }
            loss_sum += (double)loss * (double)b;
        }
        if (diverged) {
            res->diverged = 1;
            break;
        }
        res->epochs_run = epoch;
        res->last_train_loss = loss_sum / (double)n_train;
        double metric = NAN;
        if (n_val > 0 &&
            (st = levi_mlpnet_evaluate(net, d, val, n_val, &metric, NULL, err)) != LEVI_OK)
            break;
        if (n_val == 0 || res->best_epoch == 0 ||
            metric_better(net, metric, res->best_val_metric)) {
            res->best_epoch = epoch;
            res->best_val_metric = metric;
            memcpy(best, net->params.data, numel * sizeof(float));
            bad = 0;
        } else if (++bad >= tp->patience) {
            res->stopped_early = 1;
            break;
        }
    }
    /* The best epoch's weights (or, when nothing finished, the weights before training). */
    memcpy(net->params.data, best, numel * sizeof(float));
    levi_free(best);
    levi_free(order);
    levi_optim_free(opt);
    if (st != LEVI_OK) return st;
    if (res->diverged && res->best_epoch == 0)
        return levi_errorf(err, LEVI_ERR_NUMERIC,
                           "mlpnet train: loss became non-finite in epoch 1 (lr %g too large?)",
                           (double)tp->lr);
    return LEVI_OK;
}
