/* Vision fine-tuning (implements include/levi/vision_ft.h): EfficientNet-Lite0 + a linear head
 * on the pooled head stage, trained end to end (FT), upper half only (HT) or from a linear
 * probe (LP->FT) with SGD; WiSE-FT interpolation; state files.
 * Not for: the cached-feature methods (vision.c), the backbone's kernels (effnet.c), reports.
 */
#include "levi/vision_ft.h"

#include "levi/images.h"
#include "levi/ops.h"
#include "levi/optim.h"
#include "levi/safetensors.h"
#include "vision_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FT_HEAD_STAGE (LEVI_EFFNET_STAGES - 1)

static const char *const ft_mode_names[LEVI_VISION_FT_MODE_COUNT] = {"ft", "ht", "lp-ft"};

const char *levi_vision_ft_mode_name(levi_vision_ft_mode mode) {
    LEVI_ASSERT(mode >= 0 && mode < LEVI_VISION_FT_MODE_COUNT, "unknown vision ft mode");
    return ft_mode_names[mode];
}

int levi_vision_ft_mode_parse(const char *name) {
    for (int i = 0; i < LEVI_VISION_FT_MODE_COUNT; i++)
        if (strcmp(name, ft_mode_names[i]) == 0) return i;
    return -1;
}

levi_vision_ft_model_params levi_vision_ft_default_model_params(void) {
    levi_vision_ft_model_params p;
    memset(&p, 0, sizeof p);
    p.n_classes = 10;
    p.resolution = 32;
    for (int c = 0; c < 3; c++) p.mean[c] = 127.0f / 255.0f, p.std[c] = 128.0f / 255.0f;
    p.eval_batch = 256;
    p.precise_bn_rows = 2048;
    return p;
}

struct levi_vision_ft_model {
    levi_vision_ft_model_params p;
    levi_effnet *net;
    float *pre_params, *pre_buffers; /* the pre-trained backbone */
    levi_params head;
    int hw, hb;
    /* workspace, grown on demand (never inside a step once the largest batch was seen) */
    int64_t cap;
    float *x;      /* [cap, 3, R, R] prepared images */
    float *logits; /* [cap, K] */
    float *probs;  /* [cap, K] */
    float *dlog;   /* [cap, K] */
    float *dpool;  /* [cap, 1280] */
    int32_t *y;    /* [cap] */
};

static levi_status ft_check_params(const levi_vision_ft_model_params *p, levi_error *err) {
    if (p->n_classes < 2)
        return levi_errorf(err, LEVI_ERR_ARG, "vision ft: n_classes %d, expected >= 2",
                           p->n_classes);
    if (p->resolution < LEVI_EFFNET_MIN_SIZE || p->resolution > 1024)
        return levi_errorf(err, LEVI_ERR_ARG, "vision ft: resolution %d, expected %d..1024",
                           p->resolution, LEVI_EFFNET_MIN_SIZE);
    if (p->precise_bn_rows < 0)
        return levi_errorf(err, LEVI_ERR_ARG, "vision ft: precise_bn_rows %d, expected >= 0",
                           p->precise_bn_rows);
    if (p->eval_batch < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "vision ft: eval_batch %d, expected >= 1",
                           p->eval_batch);
    for (int c = 0; c < 3; c++)
        if (!(p->std[c] > 0) || !isfinite(p->mean[c]))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "vision ft: normalisation channel %d: mean %g "
                               "std %g (std must be > 0)",
                               c, (double)p->mean[c], (double)p->std[c]);
    return LEVI_OK;
}

levi_status levi_vision_ft_init(levi_vision_ft_model **out, levi_tensor_source src, void *user,
                                const levi_vision_ft_model_params *p, levi_error *err) {
    LEVI_ASSERT(out && src && p, "vision_ft_init needs out, a source and params");
    *out = NULL;
    levi_status st = ft_check_params(p, err);
    if (st != LEVI_OK) return st;
    levi_effnet *net = levi_effnet_load(src, user, err);
    if (!net) return err ? err->status : LEVI_ERR_FORMAT;
    levi_vision_ft_model *m = levi_xcalloc(1, sizeof *m);
    m->p = *p;
    m->net = net;
    levi_params *bp = levi_effnet_params(net), *bb = levi_effnet_buffers(net);
    m->pre_params = levi_xmalloc(bp->numel * sizeof(float));
    m->pre_buffers = levi_xmalloc(bb->numel * sizeof(float));
    memcpy(m->pre_params, bp->data, bp->numel * sizeof(float));
    memcpy(m->pre_buffers, bb->data, bb->numel * sizeof(float));
    levi_params_init(&m->head);
    const int64_t ws[2] = {p->n_classes, LEVI_VISION_FT_FEATURE}, bs[1] = {p->n_classes};
    m->hw = levi_params_add(&m->head, "head.weight", 2, ws);
    m->hb = levi_params_add(&m->head, "head.bias", 1, bs);
    levi_params_alloc(&m->head);
    m->head.items[m->hb].no_decay = 1;
    *out = m;
    return LEVI_OK;
}

void levi_vision_ft_free(levi_vision_ft_model *m) {
    if (!m) return;
    levi_effnet_free(m->net);
    levi_free(m->pre_params);
    levi_free(m->pre_buffers);
    levi_params_free(&m->head);
    levi_free(m->x);
    levi_free(m->logits);
    levi_free(m->probs);
    levi_free(m->dlog);
    levi_free(m->dpool);
    levi_free(m->y);
    levi_free(m);
}

levi_effnet *levi_vision_ft_backbone(levi_vision_ft_model *m) {
    return m->net;
}

levi_params *levi_vision_ft_head(levi_vision_ft_model *m) {
    return &m->head;
}

static void ft_ws(levi_vision_ft_model *m, int64_t B) {
    if (B <= m->cap) return;
    const size_t R = (size_t)m->p.resolution, K = (size_t)m->p.n_classes, n = (size_t)B;
    levi_free(m->x);
    levi_free(m->logits);
    levi_free(m->probs);
    levi_free(m->dlog);
    levi_free(m->dpool);
    levi_free(m->y);
    m->x = levi_xmalloc(n * 3 * R * R * sizeof(float));
    m->logits = levi_xmalloc(n * K * sizeof(float));
    m->probs = levi_xmalloc(n * K * sizeof(float));
    m->dlog = levi_xmalloc(n * K * sizeof(float));
    m->dpool = levi_xmalloc(n * LEVI_VISION_FT_FEATURE * sizeof(float));
    m->y = levi_xmalloc(n * sizeof(int32_t));
    m->cap = B;
}

void levi_vision_ft_reset(levi_vision_ft_model *m, levi_vision_ft_mode mode, uint64_t seed,
                          const float *probe_w, const float *probe_b) {
    LEVI_ASSERT(m && mode >= 0 && mode < LEVI_VISION_FT_MODE_COUNT, "vision_ft_reset arguments");
    levi_params *bp = levi_effnet_params(m->net), *bb = levi_effnet_buffers(m->net);
    memcpy(bp->data, m->pre_params, bp->numel * sizeof(float));
    memcpy(bb->data, m->pre_buffers, bb->numel * sizeof(float));
    levi_params_set_trainable(bp, "", 1);
    /* The ImageNet classifier is not part of the task's model: never trained or read. */
    levi_params_set_trainable(bp, "_fc.", 0);
    if (mode == LEVI_VISION_HT) levi_effnet_freeze_below(m->net, LEVI_VISION_HT_FIRST_BLOCK);
    levi_effnet_freeze_bn_stats(m->net, mode == LEVI_VISION_HT);
    const size_t K = (size_t)m->p.n_classes, C = LEVI_VISION_FT_FEATURE;
    float *w = levi_params_data(&m->head, m->hw), *b = levi_params_data(&m->head, m->hb);
    if (probe_w && probe_b) {
        memcpy(w, probe_w, K * C * sizeof(float));
        memcpy(b, probe_b, K * sizeof(float));
    } else {
        levi_rng r;
        levi_rng_seed(&r, seed);
        const float bound = 1.0f / sqrtf((float)C);
        for (size_t i = 0; i < K * C; i++) w[i] = (2.0f * levi_rng_uniform(&r) - 1.0f) * bound;
        for (size_t i = 0; i < K; i++) b[i] = (2.0f * levi_rng_uniform(&r) - 1.0f) * bound;
    }
    levi_params_zero_grad(&m->head);
    levi_params_zero_grad(bp);
}

/* Images of rows -> m->x [B,3,R,R], labels -> m->y. */
static void ft_prepare(levi_vision_ft_model *m, const levi_vision_data *d, const int64_t *rows,
                       int64_t B) {
    levi_image_prep prep = levi_image_prep_default_params();
    prep.out_h = prep.out_w = m->p.resolution;
    prep.channels = 3;
    for (int c = 0; c < 3; c++) prep.mean[c] = m->p.mean[c], prep.std[c] = m->p.std[c];
    const size_t px = (size_t)d->img_h * d->img_w;
    const size_t R2 = (size_t)m->p.resolution * m->p.resolution;
    for (int64_t i = 0; i < B; i++) {
        levi_image_prep_apply(&prep, d->images + (size_t)rows[i] * px, d->img_h, d->img_w,
                              m->x + (size_t)i * 3 * R2);
        m->y[i] = d->labels[rows[i]];
    }
}

double levi_vision_ft_loss_backward(levi_vision_ft_model *m, const levi_vision_data *d,
                                    const int64_t *rows, int64_t n) {
    LEVI_ASSERT(m && d && d->images && rows && n >= 2, "vision_ft_loss_backward: n >= 2 images");
    ft_ws(m, n);
    ft_prepare(m, d, rows, n);
    const int R = m->p.resolution, K = m->p.n_classes, C = LEVI_VISION_FT_FEATURE;
    levi_effnet_forward_params fp = levi_effnet_default_forward_params();
    fp.mode = LEVI_EFFNET_TRAIN;
    levi_error e;
    levi_status st = levi_effnet_forward(m->net, m->x, (int)n, R, R, &fp, &e);
    LEVI_ASSERT(st == LEVI_OK, "effnet training forward failed on checked sizes");
    const float *pooled = levi_effnet_pooled(m->net, FT_HEAD_STAGE);
    const float *w = levi_params_data(&m->head, m->hw), *b = levi_params_data(&m->head, m->hb);
    levi_linear_forward(m->logits, pooled, w, b, n, C, K);
    const double loss = levi_crossentropy_forward(m->probs, m->logits, m->y, n, K);
    memset(m->dlog, 0, (size_t)n * K * sizeof(float));
    levi_crossentropy_backward(m->dlog, m->probs, m->y, n, K, 1.0f);
    memset(m->dpool, 0, (size_t)n * C * sizeof(float));
    levi_linear_backward(m->dpool, levi_params_grad(&m->head, m->hw),
                         levi_params_grad(&m->head, m->hb), m->dlog, pooled, w, n, C, K);
    const float *dp[LEVI_EFFNET_STAGES] = {0};
    dp[FT_HEAD_STAGE] = m->dpool;
    levi_effnet_backward(m->net, dp, NULL, NULL);
    return loss;
}

void levi_vision_ft_predict(levi_vision_ft_model *m, const levi_vision_data *d, const int64_t *rows,
                            int64_t n, float *probs) {
    LEVI_ASSERT(m && d && d->images && (n == 0 || (rows && probs)), "vision_ft_predict args");
    const int R = m->p.resolution, K = m->p.n_classes, C = LEVI_VISION_FT_FEATURE;
    const int64_t EB = m->p.eval_batch;
    ft_ws(m, EB < n ? EB : n);
    levi_effnet_forward_params fp = levi_effnet_default_forward_params();
    const float *w = levi_params_data(&m->head, m->hw), *b = levi_params_data(&m->head, m->hb);
    for (int64_t b0 = 0; b0 < n; b0 += EB) {
        const int64_t B = n - b0 < EB ? n - b0 : EB;
        ft_prepare(m, d, rows + b0, B);
        levi_error e;
        levi_status st = levi_effnet_forward(m->net, m->x, (int)B, R, R, &fp, &e);
        LEVI_ASSERT(st == LEVI_OK, "effnet inference forward failed on checked sizes");
        levi_linear_forward(m->logits, levi_effnet_pooled(m->net, FT_HEAD_STAGE), w, b, B, C, K);
        for (int64_t i = 0; i < B; i++) {
            const float *z = m->logits + (size_t)i * K;
            float *p = probs + (size_t)(b0 + i) * K;
            float mx = z[0], s = 0;
            for (int c = 1; c < K; c++) mx = z[c] > mx ? z[c] : mx;
            for (int c = 0; c < K; c++) s += p[c] = expf(z[c] - mx);
            for (int c = 0; c < K; c++) p[c] /= s;
        }
    }
}

double levi_vision_ft_accuracy(levi_vision_ft_model *m, const levi_vision_data *d,
                               const int64_t *rows, int64_t n) {
    if (n <= 0) return 0.0;
    const int K = m->p.n_classes;
    float *probs = levi_xmalloc((size_t)n * K * sizeof(float));
    levi_vision_ft_predict(m, d, rows, n, probs);
    int64_t correct = 0;
    for (int64_t i = 0; i < n; i++) {
        int best = 0;
        for (int c = 1; c < K; c++)
            if (probs[(size_t)i * K + c] > probs[(size_t)i * K + best]) best = c;
        correct += best == d->labels[rows[i]];
    }
    levi_free(probs);
    return (double)correct / (double)n;
}

/* Precise BN over rows[0..n) in batches of B (>= 2 rows each; a last batch of 1 is dropped):
 * running statistics = the mean of the batches' statistics (momentum 1/k for batch k). Frozen
 * units (HT) keep theirs: their forwards do not update them. */
static void ft_precise_bn(levi_vision_ft_model *m, const levi_vision_data *d, const int64_t *rows,
                          int64_t n, int64_t B) {
    const int R = m->p.resolution;
    levi_effnet_forward_params fp = levi_effnet_default_forward_params();
    fp.mode = LEVI_EFFNET_TRAIN;
    ft_ws(m, B);
    int k = 0;
    for (int64_t b0 = 0; b0 + 2 <= n; b0 += B) {
        const int64_t nb = n - b0 < B ? n - b0 : B;
        ft_prepare(m, d, rows + b0, nb);
        levi_effnet_set_bn_momentum(m->net, 1.0f / (float)++k);
        levi_error e;
        levi_status st = levi_effnet_forward(m->net, m->x, (int)nb, R, R, &fp, &e);
        LEVI_ASSERT(st == LEVI_OK, "effnet training forward failed on checked sizes");
    }
    levi_effnet_set_bn_momentum(m->net, 0.01f);
}

void levi_vision_ft_recompute_bn(levi_vision_ft_model *m, const levi_vision_data *d,
                                 const int64_t *rows, int64_t n, int batch_size) {
    LEVI_ASSERT(m && d && d->images && rows && batch_size >= 2, "recompute_bn arguments");
    ft_precise_bn(m, d, rows, n, batch_size);
}

/* ---------------------------------------------------------------------------------------
 * State. */

size_t levi_vision_ft_state_numel(const levi_vision_ft_model *m) {
    levi_effnet *net = m->net;
    return levi_effnet_params(net)->numel + levi_effnet_buffers(net)->numel + m->head.numel;
}

void levi_vision_ft_state_get(levi_vision_ft_model *m, float *dst) {
    const levi_params *bp = levi_effnet_params(m->net), *bb = levi_effnet_buffers(m->net);
    memcpy(dst, bp->data, bp->numel * sizeof(float));
    memcpy(dst + bp->numel, bb->data, bb->numel * sizeof(float));
    memcpy(dst + bp->numel + bb->numel, m->head.data, m->head.numel * sizeof(float));
}

void levi_vision_ft_state_set(levi_vision_ft_model *m, const float *src) {
    levi_params *bp = levi_effnet_params(m->net), *bb = levi_effnet_buffers(m->net);
    memcpy(bp->data, src, bp->numel * sizeof(float));
    memcpy(bb->data, src + bp->numel, bb->numel * sizeof(float));
    memcpy(m->head.data, src + bp->numel + bb->numel, m->head.numel * sizeof(float));
}

void levi_vision_ft_interpolate(levi_vision_ft_model *m, const float *ft_state, float alpha) {
    LEVI_ASSERT(m && ft_state && alpha >= 0 && alpha <= 1, "interpolate: alpha in [0, 1]");
    levi_params *bp = levi_effnet_params(m->net), *bb = levi_effnet_buffers(m->net);
    const float a = alpha, ca = 1.0f - alpha;
    /* (1 - a) pre + a ft is exact at both ends: 1 x + 0 y = x for finite weights. */
    for (size_t i = 0; i < bp->numel; i++) bp->data[i] = ca * m->pre_params[i] + a * ft_state[i];
    const float *fb = ft_state + bp->numel;
    for (size_t i = 0; i < bb->numel; i++) bb->data[i] = ca * m->pre_buffers[i] + a * fb[i];
    memcpy(m->head.data, fb + bb->numel, m->head.numel * sizeof(float));
}

static int ft_tensors(levi_vision_ft_model *m, levi_tensor **out) {
    const levi_params *tabs[3] = {levi_effnet_params(m->net), levi_effnet_buffers(m->net),
                                  &m->head};
    int n = 0;
    for (int t = 0; t < 3; t++) n += tabs[t]->count;
    levi_tensor *ts = levi_xcalloc((size_t)n, sizeof *ts);
    int k = 0;
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < tabs[t]->count; i++) ts[k++] = levi_params_tensor(tabs[t], i);
    *out = ts;
    return n;
}

levi_status levi_vision_ft_save(levi_vision_ft_model *m, const char *path,
                                const char *const *meta_keys, const char *const *meta_vals,
                                int n_meta, levi_error *err) {
    levi_tensor *ts = NULL;
    int n = ft_tensors(m, &ts);
    levi_status st = levi_st_write(path, ts, n, meta_keys, meta_vals, n_meta, err);
    levi_free(ts);
    return st;
}

levi_status levi_vision_ft_load(levi_vision_ft_model *m, const char *path, levi_error *err) {
    levi_st_file *f = levi_st_open(path, err);
    if (!f) return err ? err->status : LEVI_ERR_IO;
    levi_tensor *ts = NULL;
    int n = ft_tensors(m, &ts);
    levi_status st = LEVI_OK;
    for (int i = 0; i < n && st == LEVI_OK; i++)
        st = levi_st_read_f32(f, ts[i].name, ts[i].ndim, ts[i].shape, ts[i].data, err);
    levi_st_close(f);
    levi_free(ts);
    return st;
}

/* ---------------------------------------------------------------------------------------
 * LP -> head. */

levi_status levi_vision_ft_probe_from_lp(levi_vision_model *lp, float *probe_w, float *probe_b,
                                         levi_error *err) {
    levi_params *P = levi_vision_model_params_table(lp);
    const int iw = levi_params_find(P, "adapter.0.fc2.weight");
    const int ib = levi_params_find(P, "adapter.0.fc2.bias");
    const int im = levi_params_find(P, "feat.mean"), is = levi_params_find(P, "feat.std");
    if (iw < 0 || ib < 0 || im < 0 || is < 0 || levi_params_find(P, "adapter.1.fc2.weight") >= 0 ||
        levi_params_find(P, "adapter.0.fc1.weight") >= 0)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "probe: expected a linear-probe model (one linear adapter and "
                           "standardisation statistics)");
    const levi_param *w = &P->items[iw];
    if (w->ndim != 2 || w->shape[1] != LEVI_VISION_FT_FEATURE ||
        (int64_t)P->items[im].numel < LEVI_VISION_FT_FEATURE)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "probe: its linear map reads %lld features, expected the %d of the "
                           "pooled head stage",
                           (long long)(w->ndim == 2 ? w->shape[1] : -1), LEVI_VISION_FT_FEATURE);
    const int K = (int)w->shape[0], C = LEVI_VISION_FT_FEATURE;
    const size_t off = P->items[im].numel - (size_t)C; /* the head stage is the last slot */
    const float *W = levi_params_data(P, iw), *B = levi_params_data(P, ib);
    const float *mu = levi_params_data(P, im) + off, *sd = levi_params_data(P, is) + off;
    for (int k = 0; k < K; k++) {
        double bias = B[k];
        for (int c = 0; c < C; c++) {
            const float wc = W[(size_t)k * C + c] / sd[c];
            probe_w[(size_t)k * C + c] = wc;
            bias -= (double)wc * mu[c];
        }
        probe_b[k] = (float)bias;
    }
    return LEVI_OK;
}

/* ---------------------------------------------------------------------------------------
 * Training. */

levi_status levi_vision_ft_train(levi_vision_ft_model *m, levi_vision_ft_mode mode,
                                 const float *probe_w, const float *probe_b,
                                 const levi_vision_data *d, const int64_t *train, int64_t n_train,
                                 const int64_t *val, int64_t n_val,
                                 const levi_vision_train_params *tp, levi_vision_train_result *res,
                                 levi_error *err) {
    LEVI_ASSERT(m && d && tp && (n_train == 0 || train) && (n_val == 0 || val),
                "vision_ft_train arguments");
    levi_vision_train_result local;
    if (!res) res = &local;
    memset(res, 0, sizeof *res);
    levi_status chk = levi__vision_train_check(tp, n_train, "fine-tuning", err);
    if (chk != LEVI_OK) return chk;
    if (!d->images || d->img_h < 1 || d->img_w < 1 || d->n_classes != m->p.n_classes || !d->labels)
        return levi_errorf(
            err, LEVI_ERR_SHAPE, "fine-tuning data: images %s (%dx%d), %d classes (model %d)",
            d->images ? "present" : "absent", d->img_h, d->img_w, d->n_classes, m->p.n_classes);
    for (int pass = 0; pass < 2; pass++) {
        const int64_t *rows = pass ? val : train, n = pass ? n_val : n_train;
        for (int64_t i = 0; i < n; i++)
            if (rows[i] < 0 || rows[i] >= d->n || d->labels[rows[i]] < 0 ||
                d->labels[rows[i]] >= d->n_classes)
                return levi_errorf(err, LEVI_ERR_ARG, "%s row %lld: index %lld (0..%lld)%s",
                                   pass ? "validation" : "train", (long long)i, (long long)rows[i],
                                   (long long)d->n - 1,
                                   rows[i] >= 0 && rows[i] < d->n ? " has a label out of range"
                                                                  : "");
    }
    const double t0 = levi_now();
    levi_rng root;
    levi_rng_seed(&root, tp->seed);
    levi_rng init_rng = levi_rng_split(&root), shuffle_rng = levi_rng_split(&root);
    levi_vision_ft_reset(m, mode, levi_rng_u64(&init_rng), probe_w, probe_b);
    levi_optim_params op = levi_optim_default_params(LEVI_OPT_SGD);
    op.lr = tp->lr;
    op.momentum = tp->momentum;
    levi_params *bp = levi_effnet_params(m->net);
    levi_optim *opt_b = levi_optim_init(bp, op);
    levi_optim *opt_h = levi_optim_init(&m->head, op);
    const size_t numel = levi_vision_ft_state_numel(m);
    float *best = levi_xmalloc(numel * sizeof(float));
    levi_vision_ft_state_get(m, best);
    int64_t *order = levi_xmalloc((size_t)n_train * sizeof(int64_t));
    memcpy(order, train, (size_t)n_train * sizeof(int64_t));
    res->best_val_acc = -1;
    int since_best = 0;
    levi_status st = LEVI_OK;
    const int64_t steps = n_train / tp->batch_size + (n_train % tp->batch_size >= 2 ? 1 : 0);
    for (int epoch = 1; epoch <= tp->max_epochs && st == LEVI_OK; epoch++) {
        levi_rng_shuffle_i64(&shuffle_rng, order, n_train);
        double loss_sum = 0;
        int64_t seen = 0;
        for (int64_t s = 0; s < steps; s++) {
            if (tp->stop && *tp->stop) {
                st = levi_errorf(err, LEVI_ERR_INTERRUPTED, "fine-tuning interrupted");
                break;
            }
            const int64_t b0 = s * tp->batch_size;
            const int64_t B = n_train - b0 < tp->batch_size ? n_train - b0 : tp->batch_size;
            levi_params_zero_grad(bp);
            levi_params_zero_grad(&m->head);
            const double loss = levi_vision_ft_loss_backward(m, d, order + b0, B);
            if (!isfinite(loss)) {
                res->diverged = 1;
                break;
            }
            levi_optim_step(opt_b);
            levi_optim_step(opt_h);
            loss_sum += loss * (double)B, seen += B;
            levi__vision_step_progress(tp, epoch, s + 1, steps, loss_sum / (double)seen);
        }
        if (st != LEVI_OK || res->diverged) break;
        if (m->p.precise_bn_rows > 0)
            ft_precise_bn(m, d, train,
                          n_train < m->p.precise_bn_rows ? n_train : m->p.precise_bn_rows,
                          tp->batch_size);
        const double acc = n_val > 0 ? levi_vision_ft_accuracy(m, d, val, n_val) : 0.0;
        if (levi__vision_epoch_end(res, tp, epoch, steps, loss_sum / (double)(seen ? seen : 1), acc,
                                   n_val > 0, &since_best))
            levi_vision_ft_state_get(m, best);
        if (tp->patience > 0 && since_best >= tp->patience) break;
    }
    levi_vision_ft_state_set(m, best);
    levi_free(best);
    levi_free(order);
    levi_optim_free(opt_b);
    levi_optim_free(opt_h);
    res->seconds = levi_now() - t0;
    if (st == LEVI_OK && res->diverged && res->best_epoch == 0)
        st = levi_errorf(err, LEVI_ERR_NUMERIC, "fine-tuning diverged (lr %g) before any epoch",
                         (double)tp->lr);
    return st;
}
