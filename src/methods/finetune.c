/* Fine-tuning baselines (implements include/levi/finetune.h): encoder -> masked mean pooling
 * of the last layer -> head, trained end to end with Adam; FT, HT, LP, LP->FT, FS and LoRA
 * as trainability settings of the one model; early stopping on ID validation; resumable
 * per-epoch state.
 *
 * For: training a backbone and its head on tokenised texts selected by row indices.
 * Not for: the cached-feature heads (head.c/train.c), tokenisation rules (tokenizer.c), the
 * encoder's own arithmetic (bert.c), or files other than the state file and a saved backbone.
 *
 * Shapes: B rows of a batch, S = the longest tokenised text of the batch (<= max_len), H the
 * encoder width, K = head_hidden, O = 1 (regression) or n_classes.
 */
#include "levi/finetune.h"

#include "levi/ops.h"
#include "levi/optim.h"
#include "levi/safetensors.h"
#include "levi/tokenizer.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FT_STATE_FORMAT "levi-ft-state-v1"

static const char *const ft_names[LEVI_FT_MODE_COUNT] = {"ft", "ht", "lp", "lp-ft", "fs", "lora"};

const char *levi_ft_mode_name(levi_ft_mode mode) {
    return (unsigned)mode < LEVI_FT_MODE_COUNT ? ft_names[mode] : "?";
}

int levi_ft_mode_parse(const char *name) {
    for (int i = 0; name && i < LEVI_FT_MODE_COUNT; i++)
        if (strcmp(name, ft_names[i]) == 0) return i;
    return -1;
}

levi_ft_params levi_ft_default_params(levi_ft_mode mode) {
    levi_ft_params fp;
    memset(&fp, 0, sizeof fp);
    fp.mode = mode;
    fp.max_len = 64;
    fp.hidden_dropout = fp.attn_dropout = -1.0f;
    fp.lora = levi_bert_lora_default_params();
    fp.lr = 1e-4f;
    fp.batch_size = 200;
    fp.max_epochs = 10;
    fp.patience = 3;
    fp.optimizer = LEVI_OPT_ADAM;
    fp.lp_lr = 1e-2f;
    fp.lp_epochs = 10;
    fp.eval_batch = 64;
    fp.train_fraction = 1.0;
    return fp;
}

struct levi_ft_model {
    levi_ft_params fp;
    char model_dir[4096];
    levi_bert *bert;
    levi_tokenizer *tok;
    int H, K, O, n_classes;
    levi_params head;
    int p_w1, p_b1, p_w2, p_b2; /* linear head: w1/b1 only (p_w2 = -1) */
    /* The trainability of the current phase (LP_FT: PROBE, then FULL). */
    levi_ft_mode phase_mode;
    /* Batch buffers for up to cap rows of max_len tokens (one allocation each, reused). */
    int64_t cap;
    int32_t *ids, *mask;
    const char **texts;
    float *pooled, *z, *out, *probs, *dout, *dz, *dpooled, *dh, *yb;
    int32_t *ycb;
    const float **dhid; /* [L+1]: only the last layer's gradient is given */
};

/* ---------------------------------------------------------------------------------------
 * Construction */

static levi_status ft_check_params(const levi_ft_params *fp, levi_error *err) {
    if ((unsigned)fp->mode >= LEVI_FT_MODE_COUNT)
        return levi_errorf(err, LEVI_ERR_ARG, "fine-tune params: mode = %d is unknown",
                           (int)fp->mode);
    if (fp->max_len < 3)
        return levi_errorf(err, LEVI_ERR_ARG, "fine-tune params: max_len = %d, expected >= 3",
                           fp->max_len);
    if (fp->head_hidden < 0)
        return levi_errorf(err, LEVI_ERR_ARG, "fine-tune params: head_hidden = %d < 0",
                           fp->head_hidden);
    if (!(fp->lr >= 0.0f) || !isfinite(fp->lr) || !(fp->lp_lr >= 0.0f) || !isfinite(fp->lp_lr))
        return levi_errorf(err, LEVI_ERR_ARG,
                           "fine-tune params: lr = %g, lp_lr = %g: expected >= 0", (double)fp->lr,
                           (double)fp->lp_lr);
    if (fp->batch_size < 1 || fp->eval_batch < 1 || fp->micro_batch < 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "fine-tune params: batch_size = %d, eval_batch = %d, micro_batch = "
                           "%d: expected >= 1, >= 1, >= 0",
                           fp->batch_size, fp->eval_batch, fp->micro_batch);
    if (fp->max_epochs < 1 || fp->max_epochs > LEVI_MAX_EPOCHS / 2 || fp->lp_epochs < 1 ||
        fp->lp_epochs > LEVI_MAX_EPOCHS / 2)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "fine-tune params: max_epochs = %d, lp_epochs = %d: expected 1..%d",
                           fp->max_epochs, fp->lp_epochs, LEVI_MAX_EPOCHS / 2);
    if (fp->patience < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "fine-tune params: patience = %d < 1", fp->patience);
    if (fp->optimizer != LEVI_OPT_ADAM && fp->optimizer != LEVI_OPT_ADAMW)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "fine-tune params: optimizer %d: only Adam and AdamW are supported",
                           (int)fp->optimizer);
    if (!(fp->train_fraction > 0.0 && fp->train_fraction <= 1.0) || fp->max_train_rows < 0 ||
        fp->max_val_rows < 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "fine-tune params: train_fraction = %g (expected (0, 1]), "
                           "max_train_rows = %lld, max_val_rows = %lld (expected >= 0)",
                           fp->train_fraction, (long long)fp->max_train_rows,
                           (long long)fp->max_val_rows);
    if (fp->epoch_limit < 0 || fp->max_steps_per_epoch < 0 || fp->progress_every < 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "fine-tune params: epoch_limit, max_steps_per_epoch and "
                           "progress_every must be >= 0");
    if (fp->hidden_dropout >= 1.0f || fp->attn_dropout >= 1.0f)
        return levi_errorf(err, LEVI_ERR_ARG, "fine-tune params: dropout %g / %g: expected < 1",
                           (double)fp->hidden_dropout, (double)fp->attn_dropout);
    return LEVI_OK;
}

/* U(-1/sqrt(in), 1/sqrt(in)) for weight and bias: nn.Linear's default initialisation. */
static void ft_init_linear(float *w, float *b, int out, int in, levi_rng *rng) {
    const float bound = 1.0f / sqrtf((float)in);
    for (size_t i = 0; i < (size_t)out * in; i++) w[i] = (2.0f * levi_rng_uniform(rng) - 1) * bound;
    for (int i = 0; i < out; i++) b[i] = (2.0f * levi_rng_uniform(rng) - 1) * bound;
}

/* Sets which tensors train for `mode` (the head always does). */
static void ft_set_phase(levi_ft_model *m, levi_ft_mode mode) {
    levi_params *p = levi_bert_params(m->bert);
    const int L = levi_bert_get_config(m->bert)->layers;
    levi_params_set_trainable(p, "", 0);
    switch (mode) {
    case LEVI_FT_FULL:
    case LEVI_FT_SCRATCH:
        levi_params_set_trainable(p, "", 1);
        break;
    case LEVI_FT_HALF: {
        char prefix[64];
        for (int l = L / 2; l < L; l++) {
            snprintf(prefix, sizeof prefix, "encoder.layer.%d.", l);
            levi_params_set_trainable(p, prefix, 1);
        }
        break;
    }
    case LEVI_FT_LORA:
        for (int i = 0; i < p->count; i++)
            p->items[i].trainable = strstr(p->items[i].name, ".lora_") != NULL;
        break;
    default: /* PROBE: the backbone stays frozen */
        break;
    }
    m->phase_mode = mode;
}

static int ft_backbone_trains(const levi_ft_model *m) {
    return levi_params_count_trainable(levi_bert_params(m->bert)) > 0;
}

/* Batch buffers for up to cap rows (grown once to the largest of training and eval). */
static void ft_buffers(levi_ft_model *m, int64_t cap) {
    if (cap <= m->cap) return;
    const size_t B = (size_t)cap, S = (size_t)m->fp.max_len, H = (size_t)m->H;
    const size_t K = (size_t)(m->K ? m->K : 1), O = (size_t)m->O;
    levi_free(m->ids), levi_free(m->mask), free(m->texts);
    levi_free(m->pooled), levi_free(m->z), levi_free(m->out), levi_free(m->probs);
    levi_free(m->dout), levi_free(m->dz), levi_free(m->dpooled), levi_free(m->dh);
    levi_free(m->yb), levi_free(m->ycb);
    m->ids = levi_xmalloc(B * S * sizeof(int32_t));
    m->mask = levi_xmalloc(B * S * sizeof(int32_t));
    m->texts = calloc(B, sizeof *m->texts);
    LEVI_ASSERT(m->texts != NULL, "out of memory");
    m->pooled = levi_xmalloc(B * H * sizeof(float));
    m->z = levi_xmalloc(B * K * sizeof(float));
    m->dz = levi_xmalloc(B * K * sizeof(float));
    m->out = levi_xmalloc(B * O * sizeof(float));
    m->probs = levi_xmalloc(B * O * sizeof(float));
    m->dout = levi_xmalloc(B * O * sizeof(float));
    m->dpooled = levi_xmalloc(B * H * sizeof(float));
    m->dh = levi_xmalloc(B * S * H * sizeof(float));
    m->yb = levi_xmalloc(B * sizeof(float));
    m->ycb = levi_xmalloc(B * sizeof(int32_t));
    m->cap = cap;
}

levi_status levi_ft_init(levi_ft_model **out, const char *model_dir, const levi_ft_params *fp_in,
                         int n_classes, levi_error *err) {
    LEVI_ASSERT(out && model_dir && fp_in, "levi_ft_init needs out, a model folder and params");
    *out = NULL;
    levi_status st = ft_check_params(fp_in, err);
    if (st != LEVI_OK) return st;
    if (n_classes < 0 || n_classes == 1)
        return levi_errorf(err, LEVI_ERR_ARG, "n_classes = %d: expected 0 (regression) or >= 2",
                           n_classes);
    levi_ft_model *m = calloc(1, sizeof *m);
    LEVI_ASSERT(m != NULL, "out of memory");
    m->fp = *fp_in;
    if (m->fp.mode == LEVI_FT_PROBE || m->fp.mode == LEVI_FT_LP_FT) m->fp.head_hidden = 0;
    snprintf(m->model_dir, sizeof m->model_dir, "%s", model_dir);
    m->p_w1 = m->p_b1 = m->p_w2 = m->p_b2 = -1;
    levi_rng root, init;
    levi_rng_seed(&root, m->fp.seed);
    init = levi_rng_split(&root);
    m->tok = levi_tokenizer_open(model_dir, err);
    if (!m->tok) goto fail;
    if (m->fp.mode == LEVI_FT_SCRATCH) {
        char path[4200];
        snprintf(path, sizeof path, "%s/config.json", model_dir);
        levi_bert_config cfg;
        if (levi_bert_config_load(path, &cfg, err) != LEVI_OK) goto fail;
        m->bert = levi_bert_init_random(&cfg, &init, err);
    } else {
        m->bert = levi_bert_open(model_dir, err);
    }
    if (!m->bert) goto fail;
    const levi_bert_config *c = levi_bert_get_config(m->bert);
    if (levi_tokenizer_vocab_size(m->tok) > c->vocab) {
        levi_errorf(err, LEVI_ERR_SHAPE, "%s: vocab.txt has %d tokens, config.json vocab_size %d",
                    model_dir, levi_tokenizer_vocab_size(m->tok), c->vocab);
        goto fail;
    }
    if (m->fp.max_len > c->max_pos) {
        levi_errorf(err, LEVI_ERR_ARG, "max_len = %d exceeds max_position_embeddings %d of %s",
                    m->fp.max_len, c->max_pos, model_dir);
        goto fail;
    }
    if (m->fp.mode == LEVI_FT_LORA &&
        (st = levi_bert_lora_add(m->bert, &m->fp.lora, &init, err)) != LEVI_OK)
        goto fail;
    m->dhid = calloc((size_t)c->layers + 1, sizeof *m->dhid);
    LEVI_ASSERT(m->dhid != NULL, "out of memory");
    m->H = c->hidden;
    m->K = m->fp.head_hidden;
    m->n_classes = n_classes;
    m->O = n_classes ? n_classes : 1;
    levi_params_init(&m->head);
    int64_t shp[2];
    if (m->K > 0) {
        shp[0] = m->K, shp[1] = m->H;
        m->p_w1 = levi_params_add(&m->head, "head.fc1.weight", 2, shp);
        m->p_b1 = levi_params_add(&m->head, "head.fc1.bias", 1, shp);
        shp[0] = m->O, shp[1] = m->K;
        m->p_w2 = levi_params_add(&m->head, "head.fc2.weight", 2, shp);
        m->p_b2 = levi_params_add(&m->head, "head.fc2.bias", 1, shp);
    } else {
        shp[0] = m->O, shp[1] = m->H;
        m->p_w1 = levi_params_add(&m->head, "head.fc.weight", 2, shp);
        m->p_b1 = levi_params_add(&m->head, "head.fc.bias", 1, shp);
    }
    levi_params_alloc(&m->head);
    for (int i = 0; i < m->head.count; i++) {
        size_t len = strlen(m->head.items[i].name);
        m->head.items[i].no_decay =
            len > 5 && strcmp(m->head.items[i].name + len - 5, ".bias") == 0;
    }
    ft_init_linear(levi_params_data(&m->head, m->p_w1), levi_params_data(&m->head, m->p_b1),
                   m->K ? m->K : m->O, m->H, &init);
    if (m->K)
        ft_init_linear(levi_params_data(&m->head, m->p_w2), levi_params_data(&m->head, m->p_b2),
                       m->O, m->K, &init);
    ft_set_phase(m, m->fp.mode == LEVI_FT_LP_FT ? LEVI_FT_PROBE : m->fp.mode);
    *out = m;
    return LEVI_OK;
fail:
    levi_ft_free(m);
    return err ? err->status : LEVI_ERR_ARG;
}

void levi_ft_free(levi_ft_model *m) {
    if (!m) return;
    levi_bert_free(m->bert);
    levi_tokenizer_close(m->tok);
    levi_params_free(&m->head);
    levi_free(m->ids), levi_free(m->mask), free(m->texts);
    levi_free(m->pooled), levi_free(m->z), levi_free(m->out), levi_free(m->probs);
    levi_free(m->dout), levi_free(m->dz), levi_free(m->dpooled), levi_free(m->dh);
    levi_free(m->yb), levi_free(m->ycb);
    free(m->dhid);
    free(m);
}

levi_bert *levi_ft_bert(levi_ft_model *m) {
    LEVI_ASSERT(m != NULL, "NULL fine-tune model");
    return m->bert;
}

levi_params *levi_ft_head(levi_ft_model *m) {
    LEVI_ASSERT(m != NULL, "NULL fine-tune model");
    return &m->head;
}

const levi_ft_params *levi_ft_get_params(const levi_ft_model *m) {
    LEVI_ASSERT(m != NULL, "NULL fine-tune model");
    return &m->fp;
}

size_t levi_ft_trainable_count(const levi_ft_model *m) {
    LEVI_ASSERT(m != NULL, "NULL fine-tune model");
    return levi_params_count_trainable(levi_bert_params(m->bert)) +
           levi_params_count_trainable(&m->head);
}

int levi_ft_metric_better(const levi_ft_model *m, double a, double b) {
    if (isnan(a)) return 0;
    if (isnan(b)) return 1;
    return m->n_classes == 0 ? a < b : a > b;
}

levi_status levi_ft_save_backbone(const levi_ft_model *m, const char *dir, levi_error *err) {
    LEVI_ASSERT(m != NULL && dir != NULL, "levi_ft_save_backbone needs a model and a folder");
    return levi_bert_save(m->bert, dir, m->model_dir, err);
}

/* ---------------------------------------------------------------------------------------
 * Forward and backward of one batch */

static levi_status ft_check_data(const levi_ft_model *m, const levi_ft_data *d, const int64_t *rows,
                                 int64_t n, int labels, levi_error *err) {
    if (n > 0 && (!rows || !d->texts))
        return levi_errorf(err, LEVI_ERR_ARG, "fine-tune data: rows and texts are required");
    if (d->n_classes != m->n_classes)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "fine-tune data has %d classes, the model was built for %d",
                           d->n_classes, m->n_classes);
    if (labels && ((m->n_classes == 0 && !d->y) || (m->n_classes > 0 && !d->yc)))
        return levi_errorf(err, LEVI_ERR_ARG, "fine-tune data: labels (%s) are required",
                           m->n_classes ? "yc" : "y");
    for (int64_t i = 0; i < n; i++) {
        int64_t r = rows[i];
        if (r < 0 || r >= d->n)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "row index %lld at position %lld is outside [0, %lld)", (long long)r,
                               (long long)i, (long long)d->n);
        if (!d->texts[r])
            return levi_errorf(err, LEVI_ERR_ARG, "row %lld has no text (NULL)", (long long)r);
        if (!labels) continue;
        if (m->n_classes == 0 && !isfinite(d->y[r]))
            return levi_errorf(err, LEVI_ERR_NUMERIC, "row %lld: label %g is not finite",
                               (long long)r, (double)d->y[r]);
        if (m->n_classes > 0 && (d->yc[r] < 0 || d->yc[r] >= m->n_classes))
            return levi_errorf(err, LEVI_ERR_ARG, "row %lld: class %d outside [0, %d)",
                               (long long)r, d->yc[r], m->n_classes);
    }
    return LEVI_OK;
}

/* Tokenises rows[0..n), runs the encoder (train mode when the backbone trains and `train`),
 * pools and applies the head: m->out [n, O]. Returns the batch's S via *S_out. */
static levi_status ft_forward(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows,
                              int64_t n, int train, levi_rng *rng, int *S_out, levi_error *err) {
    for (int64_t i = 0; i < n; i++) m->texts[i] = d->texts[rows[i]];
    int S = 0;
    levi_status st = levi_tokenizer_encode_batch(m->tok, m->texts, (int)n, m->fp.max_len, 0, m->ids,
                                                 m->mask, &S, err);
    if (st != LEVI_OK)
        return levi_error_prefix(err, "tokenising row %lld's batch: ", (long long)rows[0]);
    levi_bert_forward_params bp = levi_bert_default_forward_params();
    if (train && ft_backbone_trains(m)) {
        bp.mode = LEVI_BERT_TRAIN;
        bp.hidden_dropout = m->fp.hidden_dropout;
        bp.attn_dropout = m->fp.attn_dropout;
        bp.rng = rng;
    }
    if ((st = levi_bert_forward(m->bert, m->ids, m->mask, NULL, (int)n, S, &bp, err)) != LEVI_OK)
        return st;
    const int L = levi_bert_get_config(m->bert)->layers;
    levi_bert_meanpool(m->bert, L, m->pooled);
    const levi_params *h = &m->head;
    if (m->K) {
        levi_linear_forward(m->z, m->pooled, levi_params_data(h, m->p_w1),
                            levi_params_data(h, m->p_b1), n, m->H, m->K);
        levi_relu_forward(m->z, m->z, n * m->K);
        levi_linear_forward(m->out, m->z, levi_params_data(h, m->p_w2),
                            levi_params_data(h, m->p_b2), n, m->K, m->O);
    } else {
        levi_linear_forward(m->out, m->pooled, levi_params_data(h, m->p_w1),
                            levi_params_data(h, m->p_b1), n, m->H, m->O);
    }
    *S_out = S;
    return LEVI_OK;
}

/* Loss of the last forward (MSE or cross-entropy, mean over the batch); fills m->probs for
 * classification and the gathered targets. */
static float ft_loss(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows, int64_t n) {
    if (m->n_classes == 0) {
        for (int64_t i = 0; i < n; i++) m->yb[i] = d->y[rows[i]];
        return levi_mse_forward(m->out, m->yb, n);
    }
    for (int64_t i = 0; i < n; i++) m->ycb[i] = d->yc[rows[i]];
    return levi_crossentropy_forward(m->probs, m->out, m->ycb, n, m->O);
}

/* Gradients of scale * (the last forward's mean loss) added into both tables. */
static void ft_backward(levi_ft_model *m, int64_t n, int S, float scale) {
    levi_params *h = &m->head;
    memset(m->dout, 0, (size_t)n * m->O * sizeof(float));
    if (m->n_classes == 0)
        levi_mse_backward(m->dout, m->out, m->yb, n, scale);
    else
        levi_crossentropy_backward(m->dout, m->probs, m->ycb, n, m->O, scale);
    const int bb = ft_backbone_trains(m);
    memset(m->dpooled, 0, (size_t)n * m->H * sizeof(float));
    if (m->K) {
        memset(m->dz, 0, (size_t)n * m->K * sizeof(float));
        levi_linear_backward(m->dz, levi_params_grad(h, m->p_w2), levi_params_grad(h, m->p_b2),
                             m->dout, m->z, levi_params_data(h, m->p_w2), n, m->K, m->O);
        // ReLU in place: z is the post-ReLU value, positive exactly where the input was.
        for (int64_t i = 0; i < n * m->K; i++)
            if (!(m->z[i] > 0.0f)) m->dz[i] = 0.0f;
        levi_linear_backward(bb ? m->dpooled : NULL, levi_params_grad(h, m->p_w1),
                             levi_params_grad(h, m->p_b1), m->dz, m->pooled,
                             levi_params_data(h, m->p_w1), n, m->H, m->K);
    } else {
        levi_linear_backward(bb ? m->dpooled : NULL, levi_params_grad(h, m->p_w1),
                             levi_params_grad(h, m->p_b1), m->dout, m->pooled,
                             levi_params_data(h, m->p_w1), n, m->H, m->O);
    }
    if (!bb) return;
    const int L = levi_bert_get_config(m->bert)->layers;
    memset(m->dh, 0, (size_t)n * S * m->H * sizeof(float));
    levi_meanpool_backward(m->dh, m->dpooled, m->mask, (int)n, S, m->H);
    for (int l = 0; l <= L; l++) m->dhid[l] = l == L ? m->dh : NULL;
    levi_bert_backward(m->bert, m->dhid, NULL, 0);
}

levi_status levi_ft_loss_and_grad(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows,
                                  int64_t n, levi_rng *rng, float *loss, levi_error *err) {
    LEVI_ASSERT(m && d && loss, "levi_ft_loss_and_grad needs a model, data and loss");
    levi_status st = ft_check_data(m, d, rows, n, 1, err);
    if (st == LEVI_OK && n < 1) st = levi_errorf(err, LEVI_ERR_ARG, "an empty batch");
    if (st != LEVI_OK) return st;
    ft_buffers(m, n);
    levi_ft_params keep = m->fp;
    if (!rng) m->fp.hidden_dropout = m->fp.attn_dropout = 0.0f;
    levi_params_zero_grad(levi_bert_params(m->bert));
    levi_params_zero_grad(&m->head);
    int S;
    st = ft_forward(m, d, rows, n, 1, rng, &S, err);
    m->fp = keep;
    if (st != LEVI_OK) return st;
    *loss = ft_loss(m, d, rows, n);
    ft_backward(m, n, S, 1.0f);
    return LEVI_OK;
}

/* ---------------------------------------------------------------------------------------
 * Prediction and evaluation */

/* Softmax of each row of logits [n, O] into probs. */
static void ft_softmax(float *probs, const float *logits, int64_t n, int O) {
    for (int64_t i = 0; i < n; i++) {
        const float *l = logits + i * O;
        float *p = probs + i * O, mx = l[0];
        for (int k = 1; k < O; k++) mx = l[k] > mx ? l[k] : mx;
        double s = 0;
        for (int k = 0; k < O; k++) s += (p[k] = expf(l[k] - mx));
        for (int k = 0; k < O; k++) p[k] = (float)(p[k] / s);
    }
}

levi_status levi_ft_predict(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows, int64_t n,
                            float *out, levi_error *err) {
    LEVI_ASSERT(m && d && (n == 0 || out), "levi_ft_predict needs a model, data and out");
    levi_status st = ft_check_data(m, d, rows, n, 0, err);
    if (st != LEVI_OK) return st;
    ft_buffers(m, m->fp.eval_batch > m->fp.batch_size ? m->fp.eval_batch : m->fp.batch_size);
    for (int64_t s = 0; s < n; s += m->fp.eval_batch) {
        int64_t B = n - s < m->fp.eval_batch ? n - s : m->fp.eval_batch;
        int S;
        if ((st = ft_forward(m, d, rows + s, B, 0, NULL, &S, err)) != LEVI_OK) return st;
        if (m->n_classes)
            ft_softmax(out + s * m->O, m->out, B, m->O);
        else
            memcpy(out + s, m->out, (size_t)B * sizeof(float));
    }
    return LEVI_OK;
}

levi_status levi_ft_evaluate(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows,
                             int64_t n, levi_metrics *out, levi_error *err) {
    LEVI_ASSERT(m && d && out, "levi_ft_evaluate needs a model, data and out");
    memset(out, 0, sizeof *out);
    levi_status st = ft_check_data(m, d, rows, n, 1, err);
    if (st != LEVI_OK) return st;
    ft_buffers(m, m->fp.eval_batch > m->fp.batch_size ? m->fp.eval_batch : m->fp.batch_size);
    double sum = 0, loss = 0;
    for (int64_t s = 0; s < n; s += m->fp.eval_batch) {
        int64_t B = n - s < m->fp.eval_batch ? n - s : m->fp.eval_batch;
        int S;
        if ((st = ft_forward(m, d, rows + s, B, 0, NULL, &S, err)) != LEVI_OK) return st;
        for (int64_t b = 0; b < B; b++) {
            int64_t r = rows[s + b];
            if (m->n_classes == 0) {
                double e = (double)m->out[b] - d->y[r];
                sum += e * e;
            } else {
                ft_softmax(m->probs + b * m->O, m->out + b * m->O, 1, m->O);
                const float *p = m->probs + b * m->O;
                int arg = 0;
                for (int k = 1; k < m->O; k++) arg = p[k] > p[arg] ? k : arg;
                sum += arg == d->yc[r];
                loss += -log(fmax((double)p[d->yc[r]], 1e-30));
            }
        }
    }
    out->n = n;
    if (m->n_classes == 0) {
        out->loss = n ? sum / (double)n : NAN;
        out->metric = n ? sqrt(sum / (double)n) : NAN;
    } else {
        out->loss = n ? loss / (double)n : NAN;
        out->metric = n ? sum / (double)n : NAN;
    }
    out->n_adapters = 1;
    out->adapter_metric[0] = out->metric;
    return LEVI_OK;
}

/* ---------------------------------------------------------------------------------------
 * Training state */

typedef struct ft_run {
    int phase;        /* index into the run's phases (LP_FT: 0 probe, 1 full) */
    int epoch;        /* completed epochs of this phase */
    int total;        /* completed epochs of all phases */
    int phase_offset; /* epochs of earlier phases */
    int best_epoch;   /* of this phase, 1-based; 0: none */
    double best_metric;
    int bad_epochs, finished, diverged, stopped_early;
    int n_history;
    double val_history[LEVI_MAX_EPOCHS], loss_history[LEVI_MAX_EPOCHS];
} ft_run;

typedef struct ft_trainer {
    levi_ft_model *m;
    levi_optim *opt_bert, *opt_head;
    float *best_bert, *best_head;
    levi_rng rng; /* shuffles and dropout */
} ft_trainer;

/* The settings a state file must have been written with to be resumed. */
static void ft_config_string(const levi_ft_model *m, int64_t n_train, char *out, size_t cap) {
    const levi_ft_params *f = &m->fp;
    const levi_bert_config *c = levi_bert_get_config(m->bert);
    snprintf(out, cap,
             "levi-ft-v1 mode=%s max_len=%d head_hidden=%d n_classes=%d lora=%d/%.9g/%u "
             "lr=%.9g lp_lr=%.9g batch=%d/%d seed=%" PRIu64 " optimizer=%d wd=%.9g clip=%.9g "
             "dropout=%.9g/%.9g n_train=%lld hidden=%d layers=%d vocab=%d",
             levi_ft_mode_name(f->mode), f->max_len, m->K, m->n_classes, f->lora.rank,
             (double)f->lora.alpha, f->lora.targets, (double)f->lr, (double)f->lp_lr, f->batch_size,
             f->micro_batch, f->seed, (int)f->optimizer, (double)f->weight_decay,
             (double)f->clip_norm, (double)f->hidden_dropout, (double)f->attn_dropout,
             (long long)n_train, c->hidden, c->layers, c->vocab);
}

/* Doubles travel as "%.17g" strings so a resumed best metric compares exactly as before. */
static cJSON *ft_exact(double v) {
    char buf[40];
    snprintf(buf, sizeof buf, "%.17g", v);
    return cJSON_CreateString(buf);
}

static int ft_parse_exact(const cJSON *v, double *out) {
    if (!cJSON_IsString(v)) return 0;
    char *end = NULL;
    *out = strtod(v->valuestring, &end);
    return end != v->valuestring && *end == '\0';
}

typedef struct ft_tensor_list {
    levi_tensor *t;
    int n, cap;
} ft_tensor_list;

static void ft_list_add(ft_tensor_list *l, const char *prefix, const char *name, float *data,
                        int ndim, const int64_t *shape) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = realloc(l->t, (size_t)l->cap * sizeof *l->t);
        LEVI_ASSERT(l->t != NULL, "out of memory");
    }
    levi_tensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    int len = snprintf(t->name, sizeof t->name, "%s%s", prefix, name);
    LEVI_ASSERT(len > 0 && (size_t)len < sizeof t->name, "state tensor name too long");
    t->dtype = LEVI_F32;
    levi_tensor_set_shape(t, ndim, shape);
    t->data = data;
}

/* Every tensor of the state file, for writing (data pointers into the live buffers) or for
 * reading (the same pointers are the destinations). Only trainable backbone tensors travel:
 * frozen ones are rebuilt by levi_ft_init from the folder and the seed. */
static ft_tensor_list ft_state_tensors(ft_trainer *t) {
    ft_tensor_list l = {0};
    levi_ft_model *m = t->m;
    levi_params *bp = levi_bert_params(m->bert), *hp = &m->head;
    float *sb = t->opt_bert ? levi_optim_state(t->opt_bert) : NULL,
          *sh = levi_optim_state(t->opt_head);
    for (int i = 0; i < bp->count; i++) {
        const levi_param *it = &bp->items[i];
        if (!it->trainable) continue;
        ft_list_add(&l, "bert/", it->name, bp->data + it->offset, it->ndim, it->shape);
        ft_list_add(&l, "best/bert/", it->name, t->best_bert + it->offset, it->ndim, it->shape);
        ft_list_add(&l, "adam.m/bert/", it->name, sb + it->offset, it->ndim, it->shape);
        ft_list_add(&l, "adam.v/bert/", it->name, sb + bp->numel + it->offset, it->ndim, it->shape);
    }
    for (int i = 0; i < hp->count; i++) {
        const levi_param *it = &hp->items[i];
        ft_list_add(&l, "", it->name, hp->data + it->offset, it->ndim, it->shape);
        ft_list_add(&l, "best/", it->name, t->best_head + it->offset, it->ndim, it->shape);
        ft_list_add(&l, "adam.m/", it->name, sh + it->offset, it->ndim, it->shape);
        ft_list_add(&l, "adam.v/", it->name, sh + hp->numel + it->offset, it->ndim, it->shape);
    }
    return l;
}

static levi_status ft_save_state(ft_trainer *t, const ft_run *rs, int64_t n_train, const char *path,
                                 levi_error *err) {
    levi_ft_model *m = t->m;
    cJSON *j = cJSON_CreateObject();
    if (!j) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    cJSON_AddNumberToObject(j, "phase", rs->phase);
    cJSON_AddNumberToObject(j, "epoch", rs->epoch);
    cJSON_AddNumberToObject(j, "total", rs->total);
    cJSON_AddNumberToObject(j, "phase_offset", rs->phase_offset);
    cJSON_AddNumberToObject(j, "best_epoch", rs->best_epoch);
    cJSON_AddItemToObject(j, "best_metric", ft_exact(rs->best_metric));
    cJSON_AddNumberToObject(j, "bad_epochs", rs->bad_epochs);
    cJSON_AddNumberToObject(j, "finished", rs->finished);
    cJSON_AddNumberToObject(j, "diverged", rs->diverged);
    cJSON_AddNumberToObject(j, "stopped_early", rs->stopped_early);
    cJSON_AddNumberToObject(j, "steps_bert",
                            t->opt_bert ? (double)levi_optim_steps(t->opt_bert) : 0.0);
    cJSON_AddNumberToObject(j, "steps_head", (double)levi_optim_steps(t->opt_head));
    cJSON *vh = cJSON_AddArrayToObject(j, "val_history");
    cJSON *lh = cJSON_AddArrayToObject(j, "loss_history");
    for (int i = 0; i < rs->n_history; i++) {
        cJSON_AddItemToArray(vh, ft_exact(rs->val_history[i]));
        cJSON_AddItemToArray(lh, ft_exact(rs->loss_history[i]));
    }
    char *progress = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!progress) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    ft_tensor_list l = ft_state_tensors(t);
    int64_t rng_bits[4], four = 4;
    memcpy(rng_bits, t->rng.s, sizeof rng_bits);
    ft_list_add(&l, "", "rng", NULL, 1, &four);
    l.t[l.n - 1].dtype = LEVI_I64;
    l.t[l.n - 1].data = rng_bits;
    char config[1024];
    ft_config_string(m, n_train, config, sizeof config);
    const char *keys[3] = {"format", "config", "progress"};
    const char *vals[3] = {FT_STATE_FORMAT, config, progress};
    levi_status st = levi_st_write(path, l.t, l.n, keys, vals, 3, err);
    free(l.t);
    free(progress);
    return st;
}

static levi_status ft_json_int(const cJSON *o, const char *key, int *out, const char *path,
                               levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 1e15)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: progress field '%s' is %s, expected a non-negative number", path,
                           key, v ? "out of range or not a number" : "missing");
    *out = (int)v->valuedouble;
    return LEVI_OK;
}

/* Reads the run counters of a state file (phase first: the caller sets the phase's
 * trainability and optimizers before ft_load_tensors). */
static levi_status ft_load_progress(levi_ft_model *m, ft_run *rs, int64_t *steps, int64_t n_train,
                                    const char *path, levi_error *err) {
    levi_st_file *f = levi_st_open(path, err);
    if (!f) return err ? err->status : LEVI_ERR_IO;
    levi_status st = LEVI_OK;
    cJSON *j = NULL;
    const char *fmt = levi_st_metadata(f, "format"), *cfg = levi_st_metadata(f, "config");
    const char *prog = levi_st_metadata(f, "progress");
    char want[1024];
    ft_config_string(m, n_train, want, sizeof want);
    if (!fmt || strcmp(fmt, FT_STATE_FORMAT) != 0 || !cfg || !prog) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: not a levi fine-tuning state (metadata 'format' must be \"%s\" "
                         "with 'config' and 'progress')",
                         path, FT_STATE_FORMAT);
        goto done;
    }
    if (strcmp(cfg, want) != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: written by a run with settings \"%s\"; this run "
                         "has \"%s\"",
                         path, cfg, want);
        goto done;
    }
    if (!(j = cJSON_Parse(prog))) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: metadata 'progress' is not JSON", path);
        goto done;
    }
    int sb = 0, sh = 0;
    if ((st = ft_json_int(j, "phase", &rs->phase, path, err)) ||
        (st = ft_json_int(j, "epoch", &rs->epoch, path, err)) ||
        (st = ft_json_int(j, "total", &rs->total, path, err)) ||
        (st = ft_json_int(j, "phase_offset", &rs->phase_offset, path, err)) ||
        (st = ft_json_int(j, "best_epoch", &rs->best_epoch, path, err)) ||
        (st = ft_json_int(j, "bad_epochs", &rs->bad_epochs, path, err)) ||
        (st = ft_json_int(j, "finished", &rs->finished, path, err)) ||
        (st = ft_json_int(j, "diverged", &rs->diverged, path, err)) ||
        (st = ft_json_int(j, "stopped_early", &rs->stopped_early, path, err)) ||
        (st = ft_json_int(j, "steps_bert", &sb, path, err)) ||
        (st = ft_json_int(j, "steps_head", &sh, path, err)))
        goto done;
    const int n_phases = m->fp.mode == LEVI_FT_LP_FT ? 2 : 1;
    if (rs->phase >= n_phases || rs->total > LEVI_MAX_EPOCHS || rs->epoch > rs->total ||
        rs->best_epoch > rs->epoch || rs->phase_offset + rs->epoch != rs->total) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: progress counters inconsistent (phase %d, epoch %d, total %d)", path,
                         rs->phase, rs->epoch, rs->total);
        goto done;
    }
    if (!ft_parse_exact(cJSON_GetObjectItemCaseSensitive(j, "best_metric"), &rs->best_metric)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: progress field 'best_metric' must be a "
                         "number written as a string",
                         path);
        goto done;
    }
    rs->n_history = rs->total;
    const char *hk[2] = {"val_history", "loss_history"};
    double *hv[2] = {rs->val_history, rs->loss_history};
    for (int k = 0; k < 2; k++) {
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(j, hk[k]), *v;
        if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != rs->n_history) {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: progress field '%s' must be an array of "
                             "%d",
                             path, hk[k], rs->n_history);
            goto done;
        }
        int i = 0;
        cJSON_ArrayForEach(v, a) {
            if (!ft_parse_exact(v, &hv[k][i++])) {
                st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: %s[%d] is not a number string", path,
                                 hk[k], i - 1);
                goto done;
            }
        }
    }
    steps[0] = sb, steps[1] = sh;
done:
    cJSON_Delete(j);
    levi_st_close(f);
    return st;
}

static levi_status ft_load_tensors(ft_trainer *t, const int64_t *steps, const char *path,
                                   levi_error *err) {
    levi_st_file *f = levi_st_open(path, err);
    if (!f) return err ? err->status : LEVI_ERR_IO;
    ft_tensor_list l = ft_state_tensors(t);
    levi_status st = LEVI_OK;
    for (int i = 0; i < l.n && st == LEVI_OK; i++)
        st = levi_st_read_f32(f, l.t[i].name, l.t[i].ndim, l.t[i].shape, l.t[i].data, err);
    free(l.t);
    const levi_tensor *r = st == LEVI_OK ? levi_st_find(f, "rng") : NULL;
    if (st == LEVI_OK && (!r || r->dtype != LEVI_I64 || r->ndim != 1 || r->shape[0] != 4))
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: tensor 'rng' must be I64 [4]", path);
    if (st == LEVI_OK) {
        memcpy(t->rng.s, r->data, sizeof t->rng.s);
        if (t->opt_bert) levi_optim_set_steps(t->opt_bert, steps[0]);
        levi_optim_set_steps(t->opt_head, steps[1]);
    }
    levi_st_close(f);
    return st;
}

/* ---------------------------------------------------------------------------------------
 * Training */

/* The first k of a permutation of rows seeded by `seed` (all rows when k <= 0 or k >= n);
 * the caller sorts them (the subset, not its order, is what the seed picks). *out is
 * levi_xmalloc'ed. */
static int64_t ft_subsample(const int64_t *rows, int64_t n, int64_t k, uint64_t seed,
                            int64_t **out) {
    *out = levi_xmalloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (n > 0) memcpy(*out, rows, (size_t)n * sizeof(int64_t));
    if (k <= 0 || k >= n) return n;
    levi_rng r;
    levi_rng_seed(&r, seed ^ 0x5eed5a3b1e5ull);
    levi_rng_shuffle_i64(&r, *out, n);
    return k;
}

static int ft_cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Starts phase p: its trainability, fresh optimizers, best = current, counters reset. */
static void ft_phase_start(ft_trainer *t, ft_run *rs, levi_ft_mode mode, float lr) {
    levi_ft_model *m = t->m;
    ft_set_phase(m, mode);
    levi_optim_free(t->opt_bert), levi_optim_free(t->opt_head);
    t->opt_bert = NULL;
    levi_optim_params op = levi_optim_default_params(m->fp.optimizer);
    op.lr = lr;
    op.weight_decay = m->fp.weight_decay;
    op.clip_norm = m->fp.clip_norm;
    if (ft_backbone_trains(m)) t->opt_bert = levi_optim_init(levi_bert_params(m->bert), op);
    t->opt_head = levi_optim_init(&m->head, op);
    levi_params *bp = levi_bert_params(m->bert);
    if (!t->best_bert) t->best_bert = levi_xmalloc(bp->numel * sizeof(float));
    memcpy(t->best_bert, bp->data, bp->numel * sizeof(float));
    memcpy(t->best_head, m->head.data, m->head.numel * sizeof(float));
    rs->epoch = 0;
    rs->best_epoch = 0;
    rs->best_metric = NAN;
    rs->bad_epochs = 0;
    rs->stopped_early = 0;
}

static void ft_keep_best(ft_trainer *t) {
    levi_params *bp = levi_bert_params(t->m->bert);
    if (t->opt_bert) memcpy(t->best_bert, bp->data, bp->numel * sizeof(float));
    memcpy(t->best_head, t->m->head.data, t->m->head.numel * sizeof(float));
}

static void ft_restore_best(ft_trainer *t) {
    levi_params *bp = levi_bert_params(t->m->bert);
    if (t->opt_bert) memcpy(bp->data, t->best_bert, bp->numel * sizeof(float));
    memcpy(t->m->head.data, t->best_head, t->m->head.numel * sizeof(float));
}

static int ft_file_exists(const char *path) {
    struct stat sb;
    return path && stat(path, &sb) == 0;
}

levi_status levi_ft_train(levi_ft_model *m, const levi_ft_data *d, const int64_t *train_in,
                          int64_t n_train_in, const int64_t *val_in, int64_t n_val_in,
                          levi_train_result *res, levi_error *err) {
    LEVI_ASSERT(m && d, "levi_ft_train needs a model and data");
    const double t0 = levi_now();
    const levi_ft_params *fp = &m->fp;
    if (res) memset(res, 0, sizeof *res);
    levi_status st = LEVI_OK;
    if (n_train_in < 1) return levi_errorf(err, LEVI_ERR_ARG, "training needs at least one row");
    if ((st = ft_check_data(m, d, train_in, n_train_in, 1, err)) != LEVI_OK ||
        (st = ft_check_data(m, d, val_in, n_val_in, 1, err)) != LEVI_OK)
        return st;
    int64_t k = (int64_t)llround((double)n_train_in * fp->train_fraction);
    if (k < 1) k = 1;
    if (fp->max_train_rows > 0 && fp->max_train_rows < k) k = fp->max_train_rows;
    int64_t *train = NULL, *val = NULL, *perm = NULL;
    const int64_t n_train = ft_subsample(train_in, n_train_in, k, fp->subsample_seed, &train);
    const int64_t n_val =
        ft_subsample(val_in, n_val_in, fp->max_val_rows, fp->subsample_seed + 1, &val);
    qsort(train, (size_t)n_train, sizeof *train, ft_cmp_i64);
    qsort(val, (size_t)(n_val > 0 ? n_val : 0), sizeof *val, ft_cmp_i64);
    perm = levi_xmalloc((size_t)n_train * sizeof(int64_t));
    ft_buffers(m, fp->eval_batch > fp->batch_size ? fp->eval_batch : fp->batch_size);

    ft_trainer t = {m, NULL, NULL, NULL, NULL, {{0}}};
    t.best_head = levi_xmalloc(m->head.numel * sizeof(float));
    ft_run *rs = calloc(1, sizeof *rs);
    LEVI_ASSERT(rs != NULL, "out of memory");
    rs->best_metric = NAN;
    {
        levi_rng root;
        levi_rng_seed(&root, fp->seed);
        (void)levi_rng_split(&root); // the init stream, used by levi_ft_init
        t.rng = levi_rng_split(&root);
    }
    const int n_phases = fp->mode == LEVI_FT_LP_FT ? 2 : 1;
    const levi_ft_mode phase_mode[2] = {fp->mode == LEVI_FT_LP_FT ? LEVI_FT_PROBE : fp->mode,
                                        LEVI_FT_FULL};
    const float phase_lr[2] = {fp->mode == LEVI_FT_LP_FT ? fp->lp_lr : fp->lr, fp->lr};
    const int phase_epochs[2] = {fp->mode == LEVI_FT_LP_FT ? fp->lp_epochs : fp->max_epochs,
                                 fp->max_epochs};
    double examples = 0, train_seconds = 0;

    if (fp->resume && ft_file_exists(fp->state_path)) {
        int64_t steps[2] = {0, 0};
        if ((st = ft_load_progress(m, rs, steps, n_train, fp->state_path, err)) != LEVI_OK) {
            levi_error_prefix(err, "cannot resume: ");
            goto done;
        }
        ft_run keep = *rs;
        ft_phase_start(&t, rs, phase_mode[keep.phase], phase_lr[keep.phase]);
        *rs = keep;
        if ((st = ft_load_tensors(&t, steps, fp->state_path, err)) != LEVI_OK) {
            levi_error_prefix(err, "cannot resume: ");
            goto done;
        }
        if (rs->finished) goto done; /* the state holds the final (best) weights */
    } else {
        ft_phase_start(&t, rs, phase_mode[0], phase_lr[0]);
        if (m->n_classes == 0) {
            // The output bias starts at the mean label (as the cached-feature heads do), so
            // the first steps are not spent learning the offset.
            double mean = 0;
            for (int64_t i = 0; i < n_train; i++) mean += d->y[train[i]];
            float *b = levi_params_data(&m->head, m->K ? m->p_b2 : m->p_b1);
            b[0] = (float)(mean / (double)n_train);
            memcpy(t.best_head, m->head.data, m->head.numel * sizeof(float));
        }
    }

    const int B = fp->batch_size;
    const int64_t MB = fp->micro_batch > 0 && fp->micro_batch < B ? fp->micro_batch : B;
    int64_t steps_per_epoch = (n_train + B - 1) / B;
    if (fp->max_steps_per_epoch > 0 && fp->max_steps_per_epoch < steps_per_epoch)
        steps_per_epoch = fp->max_steps_per_epoch;
    for (;;) {
        const int p = rs->phase;
        while (rs->epoch < phase_epochs[p]) {
            if (fp->epoch_limit > 0 && rs->total >= fp->epoch_limit) goto done; /* resumable */
            const int epoch = rs->total + 1;
            memcpy(perm, train, (size_t)n_train * sizeof(int64_t));
            levi_rng_shuffle_i64(&t.rng, perm, n_train);
            double loss_sum = 0, te = levi_now();
            int64_t seen = 0;
            int diverged = 0;
            levi_train_progress pr;
            memset(&pr, 0, sizeof pr);
            pr.epoch = epoch;
            pr.max_epochs = rs->phase_offset + phase_epochs[p];
            pr.lr = phase_lr[p];
            pr.seed = fp->seed;
            pr.steps_per_epoch = steps_per_epoch;
            for (int64_t s = 0; s < steps_per_epoch; s++) {
                int64_t off = s * B, nb = n_train - off < B ? n_train - off : B;
                levi_params_zero_grad(levi_bert_params(m->bert));
                levi_params_zero_grad(&m->head);
                float loss = 0.0f;
                for (int64_t c0 = 0; c0 < nb; c0 += MB) {
                    const int64_t nc = nb - c0 < MB ? nb - c0 : MB;
                    int S;
                    if ((st = ft_forward(m, d, perm + off + c0, nc, 1, &t.rng, &S, err)) != LEVI_OK)
                        goto done;
                    const float w = (float)nc / (float)nb;
                    loss += w * ft_loss(m, d, perm + off + c0, nc);
                    ft_backward(m, nc, S, w);
                }
                float gn = t.opt_bert ? levi_optim_step(t.opt_bert) : 0.0f;
                float gh = levi_optim_step(t.opt_head);
                if (!isfinite(loss) || !isfinite(gn) || !isfinite(gh)) {
                    diverged = 1;
                    break;
                }
                loss_sum += (double)loss * (double)nb;
                seen += nb;
                if (fp->progress && fp->progress_every > 0 && (s + 1) % fp->progress_every == 0) {
                    pr.step = s + 1;
                    pr.global_step = levi_optim_steps(t.opt_head);
                    pr.loss = loss_sum / (double)seen;
                    double el = levi_now() - te;
                    pr.examples_per_s = el > 0 ? (double)seen / el : 0;
                    fp->progress(fp->progress_user, &pr);
                }
                if (fp->stop_flag && *fp->stop_flag) {
                    st = levi_errorf(err, LEVI_ERR_INTERRUPTED,
                                     "interrupted in epoch %d at step %lld; %s", epoch,
                                     (long long)s + 1,
                                     fp->state_path ? "the run resumes from the last finished "
                                                      "epoch"
                                                    : "no state_path, so nothing to resume from");
                    train_seconds += levi_now() - te;
                    examples += (double)seen;
                    goto done;
                }
            }
            double el = levi_now() - te;
            train_seconds += el;
            examples += (double)seen;
            if (diverged) {
                rs->diverged = 1;
                if (rs->best_epoch == 0) {
                    st = levi_errorf(err, LEVI_ERR_NUMERIC,
                                     "fine-tuning loss became non-finite in epoch %d (lr %g too "
                                     "large?)",
                                     epoch, (double)phase_lr[p]);
                    goto done;
                }
                break; /* keep the best epoch so far */
            }
            double metric = NAN;
            int improved = 1; /* no validation: the last epoch is the result */
            if (n_val > 0) {
                levi_metrics vm;
                if ((st = levi_ft_evaluate(m, d, val, n_val, &vm, err)) != LEVI_OK) goto done;
                metric = vm.metric;
                improved = rs->best_epoch == 0 ? isfinite(metric)
                                               : levi_ft_metric_better(m, metric, rs->best_metric);
            }
            rs->epoch++;
            rs->total++;
            rs->val_history[rs->n_history] = metric;
            rs->loss_history[rs->n_history] = seen ? loss_sum / (double)seen : NAN;
            rs->n_history++;
            if (improved) {
                rs->best_epoch = rs->epoch;
                rs->best_metric = metric;
                rs->bad_epochs = 0;
                ft_keep_best(&t);
            } else {
                rs->bad_epochs++;
            }
            if (n_val > 0 && rs->bad_epochs >= fp->patience) rs->stopped_early = 1;
            if (fp->state_path &&
                (st = ft_save_state(&t, rs, n_train, fp->state_path, err)) != LEVI_OK)
                goto done;
            if (fp->progress) {
                pr.step = steps_per_epoch;
                pr.global_step = levi_optim_steps(t.opt_head);
                pr.loss = rs->loss_history[rs->n_history - 1];
                pr.examples_per_s = el > 0 ? (double)seen / el : 0;
                pr.epoch_done = 1;
                pr.val_metric = metric;
                pr.improved = improved;
                fp->progress(fp->progress_user, &pr);
            }
            if (rs->stopped_early) break;
        }
        ft_restore_best(&t);
        if (p + 1 >= n_phases) break;
        // LP -> FT: the best probe is the head the full fine-tuning starts from.
        int offset = rs->total;
        ft_phase_start(&t, rs, phase_mode[p + 1], phase_lr[p + 1]);
        rs->phase = p + 1;
        rs->phase_offset = offset;
        if (fp->state_path && (st = ft_save_state(&t, rs, n_train, fp->state_path, err)) != LEVI_OK)
            goto done;
    }
    rs->finished = 1;
    if (fp->state_path) st = ft_save_state(&t, rs, n_train, fp->state_path, err);
done:
    if (res) {
        res->epochs_run = rs->total;
        res->best_epoch = rs->best_epoch ? rs->phase_offset + rs->best_epoch : 0;
        res->best_val_metric = rs->best_metric;
        res->finished = rs->finished;
        res->diverged = rs->diverged;
        res->stopped_early = rs->stopped_early;
        res->steps = t.opt_head ? levi_optim_steps(t.opt_head) : 0;
        res->seconds = levi_now() - t0;
        res->examples_per_s = train_seconds > 0 ? examples / train_seconds : 0;
        res->lr = fp->lr;
        res->n_history = rs->n_history;
        memcpy(res->val_history, rs->val_history, sizeof rs->val_history);
        memcpy(res->loss_history, rs->loss_history, sizeof rs->loss_history);
    }
    levi_optim_free(t.opt_bert);
    levi_optim_free(t.opt_head);
    levi_free(t.best_bert);
    levi_free(t.best_head);
    levi_free(train);
    levi_free(val);
    levi_free(perm);
    free(rs);
    return st;
}

/* ---------------------------------------------------------------------------------------
 * WiSE-FT weight interpolation (Wortsman et al. 2022b), for the post-hoc ensembles of
 * `levi fit` (src/cli/ensemble.c). Kept apart from training: it only writes m's encoder
 * weights, tensor by tensor matched by key name. */

levi_status levi_ft_interpolate_backbone(levi_ft_model *m, levi_bert *pre, levi_bert *tuned,
                                         float alpha, levi_error *err) {
    LEVI_ASSERT(m != NULL && pre != NULL && tuned != NULL,
                "levi_ft_interpolate_backbone needs a model and two encoders");
    if (!(alpha >= 0.0f && alpha <= 1.0f))
        return levi_errorf(err, LEVI_ERR_ARG, "WiSE-FT mixing weight: expected [0, 1], found %g",
                           (double)alpha);
    levi_params *dst = levi_bert_params(m->bert), *pa = levi_bert_params(pre),
                *pb = levi_bert_params(tuned);
    for (int i = 0; i < dst->count; i++) {
        const levi_param *it = &dst->items[i];
        const int ia = levi_params_find(pa, it->name), ib = levi_params_find(pb, it->name);
        if (ia < 0 || ib < 0)
            return levi_errorf(err, LEVI_ERR_SHAPE,
                               "WiSE-FT: tensor '%s' is missing from the %s encoder", it->name,
                               ia < 0 ? "pre-trained" : "fine-tuned");
        if (pa->items[ia].numel != it->numel || pb->items[ib].numel != it->numel)
            return levi_errorf(err, LEVI_ERR_SHAPE,
                               "WiSE-FT: tensor '%s' has %zu values in the model, %zu in the "
                               "pre-trained and %zu in the fine-tuned encoder",
                               it->name, it->numel, pa->items[ia].numel, pb->items[ib].numel);
    }
    const float wa = 1.0f - alpha;
    for (int i = 0; i < dst->count; i++) {
        const levi_param *it = &dst->items[i];
        float *d = dst->data + it->offset;
        const float *a = pa->data + pa->items[levi_params_find(pa, it->name)].offset;
        const float *b = pb->data + pb->items[levi_params_find(pb, it->name)].offset;
        // (1-alpha)*pre + alpha*tuned rather than pre + alpha*(tuned-pre): the end points
        // alpha = 0 and 1 then give back each encoder bit for bit.
        for (size_t j = 0; j < it->numel; j++) d[j] = wa * a[j] + alpha * b[j];
    }
    return LEVI_OK;
}
