/* The head model of every cached-feature method (include/levi/levi.h): configuration,
 * parameter table, forward/backward of small model + adapters, loss, ensemble, prediction
 * and evaluation.
 *
 * For: the hot path of cached-feature training. All activations of a batch live in one
 * arena sized once per batch capacity; all weights in one levi_params buffer. The adapters'
 * first layer is never given a materialised [small-output, feature] concatenation: its weight
 * W1 = [W1s | W1f] is applied as h @ W1s^T (ONE GEMM over all adapters when their weights
 * lie back to back: [B,S] x [S, NA*H]) plus g_l @ W1f^T (one GEMM per adapter, reading the
 * gathered features in place through the row stride).
 * Not for: the training loop, selection (train.c), the bias baseline's fitting (bias.c),
 * checkpoints (checkpoint.c), or reading files.
 */
#include "head_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

/* GCC 12 at -O2 vectorises only loops that need no runtime alias check and no epilogue
 * ("very cheap" cost model), which excludes every loop here; `omp simd` asserts independence
 * and lifts that. Without OpenMP the pragmas vanish and the loops stay scalar but correct. */
#ifdef _OPENMP
#define LEVI__PRAGMA(x) _Pragma(#x)
#define LEVI__OMP_FOR_IF(cond) LEVI__PRAGMA(omp parallel for if(cond))
#define LEVI__OMP_FOR_SIMD_IF(cond) LEVI__PRAGMA(omp parallel for simd if(cond))
#define LEVI__OMP_SIMD LEVI__PRAGMA(omp simd)
#define LEVI__OMP_SIMD_SUM(var) LEVI__PRAGMA(omp simd reduction(+ : var))
#else
#define LEVI__OMP_SIMD_SUM(var)
#define LEVI__OMP_FOR_IF(cond)
#define LEVI__OMP_FOR_SIMD_IF(cond)
#define LEVI__OMP_SIMD
#endif
/* Element counts above which a memory-bound loop is worth a parallel region. */
#define LEVI__PAR_MEM (1 << 17)

/* ---- methods and defaults -------------------------------------------------------------- */

static const char *const method_names[LEVI_METHOD_COUNT] = {"levi", "a3",    "a4",  "a5",
                                                            "lp",   "layer", "bias"};

const char *levi_method_name(levi_method m) {
    return (m >= 0 && m < LEVI_METHOD_COUNT) ? method_names[m] : "unknown";
}

int levi_method_parse(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < LEVI_METHOD_COUNT; i++)
        if (strcmp(name, method_names[i]) == 0) return i;
    return -1;
}

levi_head_params levi_head_default_params(levi_method method) {
    levi_head_params hp;
    memset(&hp, 0, sizeof hp);
    hp.method = method;
    hp.use_small = 1;
    hp.emb_dim = 32;
    hp.emb_init_std = 0.03f;
    hp.n_small_hidden = 2;
    hp.small_hidden[0] = 512;
    hp.small_hidden[1] = 256;
    hp.feature_adapters = 1;
    hp.n_layer_list = 0;
    hp.n_plain_heads = 0;
    hp.adapter_hidden = 256;
    hp.ensemble = LEVI_ENSEMBLE_PROB;
    hp.standardize = 1;
    hp.unseen_to_unknown = 1;
    hp.bias_cols = 0x3;
    static const float lambdas[] = {0.3f, 1, 3, 10, 30, 100};
    hp.n_bias_lambda = (int)(sizeof lambdas / sizeof lambdas[0]);
    memcpy(hp.bias_lambda, lambdas, sizeof lambdas);
    hp.bias_sweeps = 20;
    switch (method) {
    case LEVI_METHOD_LEVI:
        hp.feature_dropout = 0.5f;
        break;
    case LEVI_METHOD_A3:
        hp.use_small = 0;
        hp.feature_dropout = 0.5f;
        break;
    case LEVI_METHOD_A4:
        hp.feature_adapters = 0;
        hp.n_plain_heads = 1;
        break;
    case LEVI_METHOD_A5:
        hp.feature_adapters = 0;
        hp.n_plain_heads = -1;
        break;
    case LEVI_METHOD_LP:
        hp.use_small = 0;
        hp.n_layer_list = 1;
        hp.layer_list[0] = -1;
        hp.adapter_hidden = 0;
        break;
    case LEVI_METHOD_LAYER:
        hp.n_layer_list = 1;
        hp.layer_list[0] = -1;
        hp.feature_dropout = 0.5f;
        break;
    case LEVI_METHOD_BIAS:
        hp.use_small = 0;
        hp.feature_adapters = 0;
        break;
    default:
        break;
    }
    return hp;
}

int levi_default_lr_grid(levi_method method, float out[LEVI_MAX_GRID]) {
    static const float common[] = {1e-4f, 1e-3f, 1e-2f, 1e-1f};
    static const float probe[] = {1e-3f, 1e-2f, 1e-1f, 1.0f, 10.0f};
    if (method == LEVI_METHOD_BIAS) {
        out[0] = 0.0f; /* the bias model has no learning rate; lambda is chosen inside */
        return 1;
    }
    if (method == LEVI_METHOD_LP) {
        memcpy(out, probe, sizeof probe);
        return 5;
    }
    memcpy(out, common, sizeof common);
    return 4;
}

/* ---- data validation ------------------------------------------------------------------- */

levi_status levi_task_data_check(const levi_task_data *d, const int64_t *rows, int64_t n_rows,
                                 int check_labels, levi_error *err) {
    LEVI_ASSERT(d != NULL && (rows != NULL || n_rows == 0),
                "levi_task_data_check needs data, and rows when n_rows > 0");
    if (d->n < 0) return levi_errorf(err, LEVI_ERR_ARG, "task data: n = %lld < 0", (long long)d->n);
    if (d->n_cat < 0 || d->n_cat > LEVI_MAX_CAT)
        return levi_errorf(err, LEVI_ERR_ARG, "task data: n_cat = %d, expected 0..%d", d->n_cat,
                           LEVI_MAX_CAT);
    /* Arrays are needed only when rows are read; shapes alone describe a model. */
    if (d->n_cat > 0 && (!d->cat_card || (n_rows > 0 && !d->cat)))
        return levi_errorf(err, LEVI_ERR_ARG, "task data: n_cat = %d but %s is NULL", d->n_cat,
                           d->cat_card ? "cat" : "cat_card");
    for (int c = 0; c < d->n_cat; c++) {
        if (d->cat_card[c] < 1)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "task data: cat_card[%d] = %d, expected >= 1 (slot 0 is unknown)", c,
                               d->cat_card[c]);
        if (d->cat_mask_prob && !(d->cat_mask_prob[c] >= 0.0f && d->cat_mask_prob[c] <= 1.0f))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "task data: cat_mask_prob[%d] = %g, expected in [0, 1]", c,
                               (double)d->cat_mask_prob[c]);
    }
    if (d->n_num < 0 || (n_rows > 0 && d->n_num > 0 && !d->num))
        return levi_errorf(err, LEVI_ERR_ARG, "task data: n_num = %d but num is %s", d->n_num,
                           d->num ? "set" : "NULL");
    if (d->n_layers < 0 || (d->n_layers > 0 && (d->feat_dim <= 0)))
        return levi_errorf(err, LEVI_ERR_ARG, "task data: n_layers = %d with feat_dim = %d",
                           d->n_layers, d->feat_dim);
    if (d->n_classes < 0 || d->n_classes == 1)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "task data: n_classes = %d, expected 0 (regression) or >= 2",
                           d->n_classes);
    for (int64_t i = 0; i < n_rows; i++) {
        int64_t r = rows[i];
        if (r < 0 || r >= d->n)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "row index %lld at position %lld is outside [0, %lld)", (long long)r,
                               (long long)i, (long long)d->n);
        for (int c = 0; c < d->n_cat; c++) {
            int32_t v = d->cat[r * d->n_cat + c];
            if (v < 0 || v >= d->cat_card[c])
                return levi_errorf(err, LEVI_ERR_ARG,
                                   "row %lld, categorical column %d: id %d outside [0, %d)",
                                   (long long)r, c, v, d->cat_card[c]);
        }
        if (!check_labels) continue;
        if (d->n_classes == 0) {
            if (!d->y) return levi_errorf(err, LEVI_ERR_ARG, "task data: regression without y");
            if (!isfinite(d->y[r]))
                return levi_errorf(err, LEVI_ERR_NUMERIC, "row %lld: label y = %g is not finite",
                                   (long long)r, (double)d->y[r]);
        } else {
            if (!d->yc)
                return levi_errorf(err, LEVI_ERR_ARG, "task data: classification without yc");
            if (d->yc[r] < 0 || d->yc[r] >= d->n_classes)
                return levi_errorf(err, LEVI_ERR_ARG, "row %lld: class %d outside [0, %d)",
                                   (long long)r, d->yc[r], d->n_classes);
        }
    }
    return LEVI_OK;
}

/* ---- model construction ---------------------------------------------------------------- */

static int add_param(levi_model *m, const char *name, int ndim, int64_t d0, int64_t d1) {
    int64_t shape[2] = {d0, d1};
    return levi_params_add(&m->params, name, ndim, shape);
}

static levi_status validate_head_params(const levi_head_params *hp, const levi_task_data *d,
                                        levi_error *err) {
    if (hp->method < 0 || hp->method >= LEVI_METHOD_COUNT)
        return levi_errorf(err, LEVI_ERR_ARG, "head params: method = %d is unknown",
                           (int)hp->method);
    if (hp->method == LEVI_METHOD_BIAS) {
        if (hp->n_bias_lambda < 1 || hp->n_bias_lambda > LEVI_MAX_GRID)
            return levi_errorf(err, LEVI_ERR_ARG, "head params: n_bias_lambda = %d, expected 1..%d",
                               hp->n_bias_lambda, LEVI_MAX_GRID);
        for (int i = 0; i < hp->n_bias_lambda; i++)
            if (!(hp->bias_lambda[i] >= 0.0f))
                return levi_errorf(err, LEVI_ERR_ARG, "head params: bias_lambda[%d] = %g < 0", i,
                                   (double)hp->bias_lambda[i]);
        if (hp->bias_sweeps < 1)
            return levi_errorf(err, LEVI_ERR_ARG, "head params: bias_sweeps = %d < 1",
                               hp->bias_sweeps);
        if (d->n_classes != 0)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "the bias model is for regression; data has %d classes",
                               d->n_classes);
        for (int c = 0; c < 64; c++)
            if ((hp->bias_cols >> c & 1) && c >= d->n_cat)
                return levi_errorf(err, LEVI_ERR_ARG,
                                   "head params: bias_cols selects column %d but data has %d "
                                   "categorical columns",
                                   c, d->n_cat);
        return LEVI_OK;
    }
    if (!(hp->feature_dropout >= 0.0f && hp->feature_dropout < 1.0f))
        return levi_errorf(err, LEVI_ERR_ARG,
                           "head params: feature_dropout = %g, expected 0 <= p < 1",
                           (double)hp->feature_dropout);
    if (hp->use_small) {
        if (hp->emb_dim < 1 && d->n_cat > 0)
            return levi_errorf(err, LEVI_ERR_ARG, "head params: emb_dim = %d < 1", hp->emb_dim);
        if (!(hp->emb_init_std >= 0.0f) || !isfinite(hp->emb_init_std))
            return levi_errorf(err, LEVI_ERR_ARG, "head params: emb_init_std = %g < 0",
                               (double)hp->emb_init_std);
        if (hp->n_small_hidden < 1 || hp->n_small_hidden > LEVI_MAX_SMALL_LAYERS)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "head params: n_small_hidden = %d, expected 1..%d",
                               hp->n_small_hidden, LEVI_MAX_SMALL_LAYERS);
        for (int l = 0; l < hp->n_small_hidden; l++)
            if (hp->small_hidden[l] < 1)
                return levi_errorf(err, LEVI_ERR_ARG, "head params: small_hidden[%d] = %d < 1", l,
                                   hp->small_hidden[l]);
        if (d->n_cat * (int64_t)hp->emb_dim + d->n_num < 1)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "the small model needs input columns; data has none");
    }
    if (hp->adapter_hidden < 0)
        return levi_errorf(err, LEVI_ERR_ARG, "head params: adapter_hidden = %d < 0",
                           hp->adapter_hidden);
    if (hp->ensemble != LEVI_ENSEMBLE_PROB && hp->ensemble != LEVI_ENSEMBLE_LOGIT)
        return levi_errorf(err, LEVI_ERR_ARG, "head params: ensemble = %d is unknown",
                           (int)hp->ensemble);
    if (hp->n_layer_list < 0 || hp->n_layer_list > LEVI_MAX_ADAPTERS)
        return levi_errorf(err, LEVI_ERR_ARG, "head params: n_layer_list = %d, expected 0..%d",
                           hp->n_layer_list, LEVI_MAX_ADAPTERS);
    if (hp->feature_adapters) {
        if (d->n_layers < 1)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "method '%s' needs backbone features; data has n_layers = 0",
                               levi_method_name(hp->method));
        for (int i = 0; i < hp->n_layer_list; i++) {
            int l = hp->layer_list[i];
            if (l < -d->n_layers || l >= d->n_layers)
                return levi_errorf(err, LEVI_ERR_ARG,
                                   "head params: layer_list[%d] = %d, data has %d layers (valid "
                                   "%d..%d)",
                                   i, l, d->n_layers, -d->n_layers, d->n_layers - 1);
        }
    }
    return LEVI_OK;
}

static void set_no_decay(levi_model *m, int idx) {
    if (idx >= 0) m->params.items[idx].no_decay = 1;
}

static void set_frozen(levi_model *m, int idx) {
    if (idx >= 0) {
        m->params.items[idx].trainable = 0;
        m->params.items[idx].no_decay = 1;
    }
}

levi_status levi_model_init(levi_model **out, const levi_head_params *hp_in,
                            const levi_task_data *d, levi_error *err) {
    LEVI_ASSERT(out && hp_in && d, "levi_model_init needs out, params and a data shape");
    *out = NULL;
    levi_status st = levi_task_data_check(d, NULL, 0, 0, err);
    if (st != LEVI_OK) return st;
    if ((st = validate_head_params(hp_in, d, err)) != LEVI_OK) return st;

    levi_model *m = calloc(1, sizeof *m);
    if (!m) return levi_errorf(err, LEVI_ERR_NOMEM, "out of memory allocating a model");
    m->hp = *hp_in;
    const levi_head_params *hp = &m->hp;
    levi_params_init(&m->params);
    m->n_cat = d->n_cat;
    for (int c = 0; c < d->n_cat; c++) m->card[c] = d->cat_card[c];
    m->n_num = d->n_num;
    m->n_layers = d->n_layers;
    m->feat_dim = d->n_layers > 0 ? d->feat_dim : 0;
    m->n_classes = d->n_classes;
    m->n_out = d->n_classes > 0 ? d->n_classes : 1;
    m->p_feat_mean = m->p_feat_std = m->p_num_mean = m->p_num_std = m->p_bias_global = -1;
    for (int c = 0; c < LEVI_MAX_CAT; c++) m->p_emb[c] = m->p_seen[c] = m->p_bias_col[c] = -1;
    for (int l = 0; l < LEVI_MAX_SMALL_LAYERS; l++) m->p_small_w[l] = m->p_small_b[l] = -1;
    for (int j = 0; j < LEVI_MAX_ADAPTERS; j++)
        m->p_a1w[j] = m->p_a1b[j] = m->p_a2w[j] = m->p_a2b[j] = -1;
    char name[LEVI_NAME_MAX];

    if (hp->method == LEVI_METHOD_BIAS) {
        m->n_adapters = 1;
        m->adapter_layer[0] = m->adapter_slot[0] = -1;
        m->weight[0] = 1.0f;
        m->p_bias_global = add_param(m, "bias.global", 1, 1, 0);
        for (int c = 0; c < m->n_cat; c++) {
            if (!(hp->bias_cols >> c & 1)) continue;
            snprintf(name, sizeof name, "bias.col.%d", c);
            m->p_bias_col[c] = add_param(m, name, 1, m->card[c], 0);
            snprintf(name, sizeof name, "cat.%d.seen", c);
            m->p_seen[c] = add_param(m, name, 1, m->card[c], 0);
        }
    } else {
        /* Resolve the heads: feature adapters in the order listed, then plain heads. */
        int na = 0;
        if (hp->feature_adapters) {
            int nl = hp->n_layer_list > 0 ? hp->n_layer_list : d->n_layers;
            for (int i = 0; i < nl; i++) {
                int l = hp->n_layer_list > 0 ? hp->layer_list[i] : i;
                if (l < 0) l += d->n_layers;
                if (na >= LEVI_MAX_ADAPTERS) {
                    free(m);
                    return levi_errorf(err, LEVI_ERR_ARG, "more than %d adapters requested",
                                       LEVI_MAX_ADAPTERS);
                }
                m->adapter_layer[na++] = l;
            }
        }
        int plain = hp->n_plain_heads;
        if (plain < 0) plain = d->n_layers > 0 ? d->n_layers : 6;
        if (plain > 0 && !hp->use_small) {
            free(m);
            return levi_errorf(err, LEVI_ERR_ARG,
                               "head params: %d plain heads need the small model (use_small = 0)",
                               plain);
        }
        if (na + plain > LEVI_MAX_ADAPTERS) {
            free(m);
            return levi_errorf(err, LEVI_ERR_ARG, "%d heads requested; at most %d", na + plain,
                               LEVI_MAX_ADAPTERS);
        }
        for (int i = 0; i < plain; i++) m->adapter_layer[na++] = -1;
        if (na == 0) {
            free(m);
            return levi_errorf(err, LEVI_ERR_ARG,
                               "head params give no heads (feature_adapters = 0 and no plain "
                               "heads)");
        }
        m->n_adapters = na;
        /* Distinct layers read, ascending; each adapter's slot among them. */
        for (int l = 0; l < d->n_layers; l++) {
            int used = 0;
            for (int j = 0; j < na; j++) used |= m->adapter_layer[j] == l;
            if (used) m->used_layer[m->n_used_layers++] = l;
        }
        for (int j = 0; j < na; j++) {
            m->adapter_slot[j] = -1;
            for (int u = 0; u < m->n_used_layers; u++)
                if (m->used_layer[u] == m->adapter_layer[j]) m->adapter_slot[j] = u;
        }
        /* Weights: normalised to sum 1. */
        double wsum = 0;
        int any = 0;
        for (int j = 0; j < na; j++) {
            float w = hp->adapter_weight[j];
            if (!(w >= 0.0f) || !isfinite(w)) {
                free(m);
                return levi_errorf(err, LEVI_ERR_ARG, "head params: adapter_weight[%d] = %g < 0", j,
                                   (double)w);
            }
            any |= w != 0.0f;
            wsum += w;
        }
        for (int j = 0; j < na; j++)
            m->weight[j] = any ? (float)(hp->adapter_weight[j] / wsum) : 1.0f / (float)na;

        if (hp->use_small) {
            m->in0 = m->n_cat * hp->emb_dim + m->n_num;
            m->n_small = hp->n_small_hidden;
            for (int l = 0; l < m->n_small; l++) m->small_dim[l] = hp->small_hidden[l];
            m->small_out = m->small_dim[m->n_small - 1];
        }
        m->first_out = hp->adapter_hidden > 0 ? hp->adapter_hidden : m->n_out;
        for (int j = 0; j < na; j++)
            m->adapter_in[j] = m->small_out + (m->adapter_layer[j] >= 0 ? m->feat_dim : 0);

        /* Registration order matters: all adapters' fc1 weights back to back make the fused
           small-part GEMM possible (see the file comment). */
        if (hp->use_small) {
            for (int c = 0; c < m->n_cat; c++) {
                snprintf(name, sizeof name, "small.emb.%d.weight", c);
                m->p_emb[c] = add_param(m, name, 2, m->card[c], hp->emb_dim);
            }
            int in = m->in0;
            for (int l = 0; l < m->n_small; l++) {
                snprintf(name, sizeof name, "small.mlp.%d.weight", l);
                m->p_small_w[l] = add_param(m, name, 2, m->small_dim[l], in);
                snprintf(name, sizeof name, "small.mlp.%d.bias", l);
                m->p_small_b[l] = add_param(m, name, 1, m->small_dim[l], 0);
                in = m->small_dim[l];
            }
        }
        const char *fc1 = hp->adapter_hidden > 0 ? "fc1" : "fc";
        for (int j = 0; j < na; j++) {
            snprintf(name, sizeof name, "adapter.%d.%s.weight", j, fc1);
            m->p_a1w[j] = add_param(m, name, 2, m->first_out, m->adapter_in[j]);
        }
        for (int j = 0; j < na; j++) {
            snprintf(name, sizeof name, "adapter.%d.%s.bias", j, fc1);
            m->p_a1b[j] = add_param(m, name, 1, m->first_out, 0);
        }
        if (hp->adapter_hidden > 0) {
            for (int j = 0; j < na; j++) {
                snprintf(name, sizeof name, "adapter.%d.fc2.weight", j);
                m->p_a2w[j] = add_param(m, name, 2, m->n_out, hp->adapter_hidden);
            }
            for (int j = 0; j < na; j++) {
                snprintf(name, sizeof name, "adapter.%d.fc2.bias", j);
                m->p_a2b[j] = add_param(m, name, 1, m->n_out, 0);
            }
        }
        if (m->n_used_layers > 0) {
            m->p_feat_mean = add_param(m, "feat.mean", 2, m->n_layers, m->feat_dim);
            m->p_feat_std = add_param(m, "feat.std", 2, m->n_layers, m->feat_dim);
        }
        if (hp->use_small && m->n_num > 0) {
            m->p_num_mean = add_param(m, "num.mean", 1, m->n_num, 0);
            m->p_num_std = add_param(m, "num.std", 1, m->n_num, 0);
        }
        if (hp->use_small)
            for (int c = 0; c < m->n_cat; c++) {
                snprintf(name, sizeof name, "cat.%d.seen", c);
                m->p_seen[c] = add_param(m, name, 1, m->card[c], 0);
            }
    }
    /* Sizes come from user data (cardinalities) and options: refuse absurd ones with a
       message instead of letting the allocation abort. 2^32 floats = 16 GiB. */
    if (m->params.numel > ((size_t)1 << 32)) {
        size_t numel = m->params.numel;
        levi_params_free(&m->params);
        free(m);
        return levi_errorf(err, LEVI_ERR_NOMEM,
                           "the model would need %zu parameters (over 2^32); check the "
                           "categorical cardinalities and layer sizes",
                           numel);
    }
    levi_params_alloc(&m->params);

    for (int l = 0; l < LEVI_MAX_SMALL_LAYERS; l++) set_no_decay(m, m->p_small_b[l]);
    for (int j = 0; j < LEVI_MAX_ADAPTERS; j++) {
        set_no_decay(m, m->p_a1b[j]);
        set_no_decay(m, m->p_a2b[j]);
    }
    set_frozen(m, m->p_feat_mean);
    set_frozen(m, m->p_feat_std);
    set_frozen(m, m->p_num_mean);
    set_frozen(m, m->p_num_std);
    for (int c = 0; c < LEVI_MAX_CAT; c++) set_frozen(m, m->p_seen[c]);
    set_no_decay(m, m->p_bias_global);

    /* Fused first layer: same row width and consecutive storage for every adapter. */
    m->fused_first = hp->method != LEVI_METHOD_BIAS && m->small_out > 0;
    for (int j = 1; j < m->n_adapters && m->fused_first; j++) {
        const levi_param *a = &m->params.items[m->p_a1w[j - 1]];
        const levi_param *b = &m->params.items[m->p_a1w[j]];
        if (m->adapter_in[j] != m->adapter_in[0] || b->offset != a->offset + a->numel)
            m->fused_first = 0;
    }

    /* Neutral standardisation until data sets it. */
    if (m->p_feat_std >= 0) {
        float *s = levi_params_data(&m->params, m->p_feat_std);
        for (size_t i = 0; i < m->params.items[m->p_feat_std].numel; i++) s[i] = 1.0f;
    }
    if (m->p_num_std >= 0) {
        float *s = levi_params_data(&m->params, m->p_num_std);
        for (int i = 0; i < m->n_num; i++) s[i] = 1.0f;
    }
    for (int c = 0; c < m->n_cat; c++)
        if (m->p_seen[c] >= 0) {
            float *s = levi_params_data(&m->params, m->p_seen[c]);
            for (int i = 0; i < m->card[c]; i++) s[i] = 1.0f;
        }
    size_t nf = (size_t)m->n_used_layers * (size_t)m->feat_dim;
    m->feat_rstd = levi_xcalloc(nf ? nf : 1, sizeof(float));
    m->feat_mean = levi_xcalloc(nf ? nf : 1, sizeof(float));
    m->num_rstd = levi_xcalloc(m->n_num ? (size_t)m->n_num : 1, sizeof(float));
    levi__model_refresh(m);
    m->config_json = levi__config_to_json(m);
    if (!m->config_json) {
        levi_model_free(m);
        return levi_errorf(err, LEVI_ERR_NOMEM, "out of memory writing the model configuration");
    }
    *out = m;
    return LEVI_OK;
}

void levi_model_free(levi_model *m) {
    if (!m) return;
    levi_params_free(&m->params);
    levi_arena_free(m->ws.arena);
    levi_free(m->feat_rstd);
    levi_free(m->feat_mean);
    levi_free(m->num_rstd);
    free(m->config_json);
    free(m);
}

const levi_head_params *levi_model_head_params(const levi_model *m) {
    return &m->hp;
}
int levi_model_n_adapters(const levi_model *m) {
    return m->n_adapters;
}
int levi_model_adapter_layer(const levi_model *m, int j) {
    LEVI_ASSERT(j >= 0 && j < m->n_adapters, "adapter index out of range");
    return m->adapter_layer[j];
}
int levi_model_n_outputs(const levi_model *m) {
    return m->n_out;
}
size_t levi_model_n_params(const levi_model *m) {
    return levi_params_count_trainable(&m->params);
}
levi_params *levi_model_params(levi_model *m) {
    return &m->params;
}
const char *levi_model_config_json(const levi_model *m) {
    return m->config_json;
}

void levi__model_refresh(levi_model *m) {
    int fd = m->feat_dim;
    for (int u = 0; u < m->n_used_layers; u++) {
        const float *mean =
            levi_params_data(&m->params, m->p_feat_mean) + (size_t)m->used_layer[u] * (size_t)fd;
        const float *sd =
            levi_params_data(&m->params, m->p_feat_std) + (size_t)m->used_layer[u] * (size_t)fd;
        for (int k = 0; k < fd; k++) {
            m->feat_mean[(size_t)u * fd + k] = mean[k];
            m->feat_rstd[(size_t)u * fd + k] = sd[k] > 0.0f ? 1.0f / sd[k] : 1.0f;
        }
    }
    if (m->p_num_std >= 0) {
        const float *sd = levi_params_data(&m->params, m->p_num_std);
        for (int i = 0; i < m->n_num; i++) m->num_rstd[i] = sd[i] > 0.0f ? 1.0f / sd[i] : 1.0f;
    }
}

levi_status levi__check_shapes(const levi_model *m, const levi_task_data *d, levi_error *err) {
    if (d->n_cat != m->n_cat)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "data has %d categorical columns, the model was built for %d", d->n_cat,
                           m->n_cat);
    for (int c = 0; c < m->n_cat; c++)
        if (d->cat_card[c] != m->card[c])
            return levi_errorf(err, LEVI_ERR_SHAPE,
                               "categorical column %d has %d values in the data, %d in the model",
                               c, d->cat_card[c], m->card[c]);
    if (d->n_num != m->n_num)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "data has %d numeric columns, the model was built for %d", d->n_num,
                           m->n_num);
    if (d->n_classes != m->n_classes)
        return levi_errorf(err, LEVI_ERR_SHAPE, "data has n_classes = %d, the model %d",
                           d->n_classes, m->n_classes);
    if (m->n_used_layers > 0) {
        if (d->n_layers != m->n_layers || d->feat_dim != m->feat_dim)
            return levi_errorf(err, LEVI_ERR_SHAPE,
                               "data has features [%d layers, %d dims], the model was built "
                               "for [%d, %d]",
                               d->n_layers, d->feat_dim, m->n_layers, m->feat_dim);
        if (!d->feats)
            return levi_errorf(err, LEVI_ERR_ARG, "the model reads features; data has none");
    }
    return LEVI_OK;
}

void levi__set_fused(levi_model *m, int fused) {
    if (!fused) {
        m->fused_first = 0;
        return;
    }
    m->fused_first = m->hp.method != LEVI_METHOD_BIAS && m->small_out > 0;
    for (int j = 1; j < m->n_adapters && m->fused_first; j++) {
        const levi_param *a = &m->params.items[m->p_a1w[j - 1]];
        const levi_param *b = &m->params.items[m->p_a1w[j]];
        if (m->adapter_in[j] != m->adapter_in[0] || b->offset != a->offset + a->numel)
            m->fused_first = 0;
    }
}

/* ---- workspace ------------------------------------------------------------------------- */

static size_t round64(size_t b) {
    return (b + 63) & ~(size_t)63;
}

/* The one place that knows what a batch needs; levi__workspace_ensure carves exactly this. */
size_t levi__workspace_bytes(const levi_model *m, int64_t cap) {
    size_t B = (size_t)cap, f = sizeof(float), total = 0;
    size_t na = (size_t)m->n_adapters, no = (size_t)m->n_out;
    int widest = 0;
    for (int l = 0; l < m->n_small; l++)
        widest = m->small_dim[l] > widest ? m->small_dim[l] : widest;
    total += round64(B * (size_t)(m->n_cat ? m->n_cat : 1) * sizeof(int32_t)); /* ids */
    total += 2 * round64(B * (size_t)(m->in0 ? m->in0 : 1) * f);               /* x0, dx0 */
    for (int l = 0; l < m->n_small; l++) total += round64(B * (size_t)m->small_dim[l] * f);
    total += 2 * round64(B * (size_t)(widest ? widest : 1) * f); /* dact */
    total += round64(B * (size_t)(m->n_used_layers ? m->n_used_layers : 1) *
                     (size_t)(m->feat_dim ? m->feat_dim : 1) * f); /* g */
    size_t zf = B * na * (size_t)(m->first_out ? m->first_out : 1);
    total += 2 * round64(zf * f);          /* z, dz */
    total += 3 * round64(B * na * no * f); /* out, dout, probs */
    total += round64(B * no * f);          /* ens */
    total += round64(B * f) + round64(B * sizeof(int32_t));
    return total;
}

void levi__workspace_ensure(levi_model *m, int64_t cap) {
    levi__workspace *w = &m->ws;
    if (w->arena && w->cap >= cap) return;
    levi_arena_free(w->arena);
    size_t B = (size_t)cap, f = sizeof(float);
    size_t na = (size_t)m->n_adapters, no = (size_t)m->n_out;
    int widest = 0;
    for (int l = 0; l < m->n_small; l++)
        widest = m->small_dim[l] > widest ? m->small_dim[l] : widest;
    w->arena = levi_arena_init(levi__workspace_bytes(m, cap));
    w->cap = cap;
    w->ids = levi_arena_alloc(w->arena, B * (size_t)(m->n_cat ? m->n_cat : 1) * sizeof(int32_t));
    w->x0 = levi_arena_floats(w->arena, B * (size_t)(m->in0 ? m->in0 : 1));
    w->dx0 = levi_arena_floats(w->arena, B * (size_t)(m->in0 ? m->in0 : 1));
    for (int l = 0; l < m->n_small; l++)
        w->act[l] = levi_arena_floats(w->arena, B * (size_t)m->small_dim[l]);
    for (int k = 0; k < 2; k++)
        w->dact[k] = levi_arena_floats(w->arena, B * (size_t)(widest ? widest : 1));
    w->g = levi_arena_floats(w->arena, B * (size_t)(m->n_used_layers ? m->n_used_layers : 1) *
                                           (size_t)(m->feat_dim ? m->feat_dim : 1));
    size_t zf = B * na * (size_t)(m->first_out ? m->first_out : 1);
    w->z = levi_arena_floats(w->arena, zf);
    w->dz = levi_arena_floats(w->arena, zf);
    w->out = levi_arena_floats(w->arena, B * na * no);
    w->dout = levi_arena_floats(w->arena, B * na * no);
    w->probs = levi_arena_floats(w->arena, B * na * no);
    w->ens = levi_arena_floats(w->arena, B * no);
    w->y = levi_arena_floats(w->arena, B);
    w->yc = levi_arena_alloc(w->arena, B * sizeof(int32_t));
    (void)f;
}

/* ---- small kernels ----------------------------------------------------------------------- */

/* out[b, 0..N) = bias[0..N) for each of B rows with row stride ld. */
static void fill_rows(float *out, const float *bias, int64_t B, int N, int ld) {
    for (int64_t b = 0; b < B; b++) memcpy(out + b * ld, bias, (size_t)N * sizeof(float));
}

/* x[b, 0..N) = max(x, 0). */
static void relu_rows(float *x, int64_t n) {
    LEVI__OMP_FOR_SIMD_IF(n > LEVI__PAR_MEM)
    for (int64_t i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

/* d *= (y > 0), y the post-ReLU activation (PyTorch's gradient 0 at 0). */
static void relu_mask(float *d, const float *y, int64_t n) {
    LEVI__OMP_FOR_SIMD_IF(n > LEVI__PAR_MEM)
    for (int64_t i = 0; i < n; i++) d[i] = y[i] > 0.0f ? d[i] : 0.0f;
}

/* db[0..N) += sum_b d[b, 0..N) (row stride ld), summed in row order: deterministic. */
static void colsum_add(float *db, const float *d, int64_t B, int N, int ld) {
    for (int64_t b = 0; b < B; b++) {
        const float *r = d + b * ld;
        LEVI__OMP_SIMD
        for (int k = 0; k < N; k++) db[k] += r[k];
    }
}

/* d[B,N] *= (y > 0) and db[N] += sum_b d, in one pass (rows in order: deterministic). */
static void relu_mask_colsum(float *d, float *db, const float *y, int64_t B, int N) {
    for (int64_t b = 0; b < B; b++) {
        float *dr = d + b * N;
        const float *yr = y + b * N;
        LEVI__OMP_SIMD
        for (int k = 0; k < N; k++) {
            float v = yr[k] > 0.0f ? dr[k] : 0.0f;
            dr[k] = v;
            db[k] += v;
        }
    }
}

static float *P(levi_model *m, int idx) {
    return levi_params_data(&m->params, idx);
}
static float *G(levi_model *m, int idx) {
    return levi_params_grad(&m->params, idx);
}

/* ---- gather ------------------------------------------------------------------------------ */

/* The only reader of d->feats: the feature of one row and layer, copied to dst[feat_dim]. A
 * half-precision feature cache changes this function only. */
static void read_feature(const levi_task_data *d, int64_t row, int layer, float *dst) {
    size_t fd = (size_t)d->feat_dim;
    memcpy(dst, d->feats + ((size_t)row * (size_t)d->n_layers + (size_t)layer) * fd,
           fd * sizeof(float));
}

/* g[B, NLU*FD]: the used layers of rows[0..B), standardised. */
static void gather_features(levi_model *m, const levi_task_data *d, const int64_t *rows, int64_t B,
                            float *g) {
    int nlu = m->n_used_layers, fd = m->feat_dim;
    size_t ldg = (size_t)nlu * (size_t)fd;
    int standardize = m->hp.standardize;
    LEVI__OMP_FOR_IF(B * (int64_t)ldg > LEVI__PAR_MEM)
    for (int64_t b = 0; b < B; b++) {
        float *dst = g + (size_t)b * ldg;
        for (int u = 0; u < nlu; u++) {
            float *o = dst + (size_t)u * fd;
            read_feature(d, rows[b], m->used_layer[u], o);
            if (standardize) {
                const float *mu = m->feat_mean + (size_t)u * fd,
                            *rs = m->feat_rstd + (size_t)u * fd;
                LEVI__OMP_SIMD
                for (int k = 0; k < fd; k++) o[k] = (o[k] - mu[k]) * rs[k];
            }
        }
    }
}

void levi__gather_batch(levi_model *m, const levi_task_data *d, const int64_t *rows, int64_t B,
                        levi_rng *mask_rng, int labels) {
    levi__workspace *w = &m->ws;
    LEVI_ASSERT(B <= w->cap, "batch larger than the workspace; call levi__workspace_ensure");
    int nc = m->n_cat;
    int uses_ids = m->hp.use_small || m->hp.method == LEVI_METHOD_BIAS;
    if (uses_ids && nc > 0) {
        for (int64_t b = 0; b < B; b++) {
            const int32_t *src = d->cat + rows[b] * nc;
            int32_t *dst = w->ids + b * nc;
            for (int c = 0; c < nc; c++) {
                int32_t v = src[c];
                if (m->hp.unseen_to_unknown && m->p_seen[c] >= 0 && P(m, m->p_seen[c])[v] == 0.0f)
                    v = 0;
                dst[c] = v;
            }
        }
        if (mask_rng && d->cat_mask_prob) {
            /* A group's leader is its first column; the group uses its largest probability
               and one draw per row, so a title is hidden exactly when its movie id is. */
            int leader[LEVI_MAX_CAT];
            float prob[LEVI_MAX_CAT];
            for (int c = 0; c < nc; c++) {
                leader[c] = c;
                if (d->cat_mask_group && d->cat_mask_group[c] >= 0)
                    for (int k = 0; k < c; k++)
                        if (d->cat_mask_group[k] == d->cat_mask_group[c]) {
                            leader[c] = k;
                            break;
                        }
                prob[c] = 0.0f;
            }
            for (int c = 0; c < nc; c++)
                if (d->cat_mask_prob[c] > prob[leader[c]]) prob[leader[c]] = d->cat_mask_prob[c];
            for (int64_t b = 0; b < B; b++) {
                int hide[LEVI_MAX_CAT];
                for (int c = 0; c < nc; c++) {
                    if (leader[c] == c)
                        hide[c] = prob[c] > 0.0f && levi_rng_uniform(mask_rng) < prob[c];
                    else
                        hide[c] = hide[leader[c]];
                    if (hide[c]) w->ids[b * nc + c] = 0;
                }
            }
        }
    }
    if (m->hp.use_small) {
        int e = m->hp.emb_dim, in0 = m->in0;
        for (int64_t b = 0; b < B; b++) {
            float *x = w->x0 + b * in0;
            for (int c = 0; c < nc; c++)
                memcpy(x + c * e, P(m, m->p_emb[c]) + (size_t)w->ids[b * nc + c] * e,
                       (size_t)e * sizeof(float));
            if (m->n_num > 0) {
                const float *src = d->num + rows[b] * m->n_num;
                float *dst = x + nc * e;
                if (m->hp.standardize) {
                    const float *mu = P(m, m->p_num_mean);
                    for (int k = 0; k < m->n_num; k++) dst[k] = (src[k] - mu[k]) * m->num_rstd[k];
                } else {
                    memcpy(dst, src, (size_t)m->n_num * sizeof(float));
                }
            }
        }
    }
    if (m->n_used_layers > 0) {
        gather_features(m, d, rows, B, w->g);
        float p = m->hp.feature_dropout;
        if (mask_rng && p > 0.0f) {
            /* Inverted dropout: the expected input of an adapter is the same at training and
               at prediction time (where nothing is dropped). */
            size_t n = (size_t)B * (size_t)m->n_used_layers * (size_t)m->feat_dim;
            levi_rng_dropout(mask_rng, n, p, NULL, w->g);
        }
    }
    if (labels) {
        for (int64_t b = 0; b < B; b++) {
            if (m->n_classes == 0)
                w->y[b] = d->y[rows[b]];
            else
                w->yc[b] = d->yc[rows[b]];
        }
    }
}

/* The heads' matrix products: f32, or with bfloat16 operands for mixed-precision training
 * (products too narrow for a kernel to gain from it stay f32). */
static void mm(int bf16, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc) {
    if (bf16 && N >= 16 && K >= 16)
        levi_gemm_bf16(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else
        levi_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- forward / loss / backward ----------------------------------------------------------- */

static void softmax_rows(float *p, const float *x, int64_t rows, int C, int ldx, int ldp) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float *pr = p + r * ldp;
        float mx = xr[0];
        for (int k = 1; k < C; k++) mx = xr[k] > mx ? xr[k] : mx;
        double s = 0;
        for (int k = 0; k < C; k++) {
            pr[k] = expf(xr[k] - mx);
            s += pr[k];
        }
        float inv = (float)(1.0 / s);
        for (int k = 0; k < C; k++) pr[k] *= inv;
    }
}

static void bias_forward(levi_model *m, int64_t B) {
    levi__workspace *w = &m->ws;
    float g0 = P(m, m->p_bias_global)[0];
    for (int64_t b = 0; b < B; b++) {
        float s = g0;
        for (int c = 0; c < m->n_cat; c++)
            if (m->p_bias_col[c] >= 0) s += P(m, m->p_bias_col[c])[w->ids[b * m->n_cat + c]];
        w->out[b] = s;
    }
}

void levi__forward(levi_model *m, int64_t B, int bf16) {
    levi__workspace *w = &m->ws;
    if (m->hp.method == LEVI_METHOD_BIAS) {
        bias_forward(m, B);
        return;
    }
    int bi = (int)B;
    const float *h = NULL;
    int S = m->small_out;
    if (m->hp.use_small) {
        const float *x = w->x0;
        int K = m->in0;
        for (int l = 0; l < m->n_small; l++) {
            int N = m->small_dim[l];
            float *o = w->act[l];
            // o[B,N] = relu(x[B,K] @ W[N,K]^T + b[N])
            fill_rows(o, P(m, m->p_small_b[l]), B, N, N);
            mm(bf16, 0, 1, bi, N, K, 1.0f, x, K, P(m, m->p_small_w[l]), K, 1.0f, o, N);
            relu_rows(o, B * N);
            x = o;
            K = N;
        }
        h = x;
    }
    int na = m->n_adapters, F = m->first_out, ldz = na * F, fd = m->feat_dim;
    int ldg = m->n_used_layers * fd;
    // z[B, NA*F]: adapter j's first layer in columns j*F .. j*F+F-1
    for (int j = 0; j < na; j++) fill_rows(w->z + j * F, P(m, m->p_a1b[j]), B, F, ldz);
    if (h) {
        if (m->fused_first) {
            // z[B, NA*F] += h[B,S] @ W1s_all[NA*F, S]^T, W1s_all rows strided by adapter_in
            mm(bf16, 0, 1, bi, na * F, S, 1.0f, h, S, P(m, m->p_a1w[0]), m->adapter_in[0], 1.0f,
               w->z, ldz);
        } else {
            for (int j = 0; j < na; j++)
                mm(bf16, 0, 1, bi, F, S, 1.0f, h, S, P(m, m->p_a1w[j]), m->adapter_in[j], 1.0f,
                   w->z + j * F, ldz);
        }
    }
    for (int j = 0; j < na; j++) {
        int u = m->adapter_slot[j];
        if (u < 0) continue;
        // z_j[B,F] += g_u[B,FD] @ W1f_j[F,FD]^T (g_u and W1f_j read in place via strides)
        mm(bf16, 0, 1, bi, F, fd, 1.0f, w->g + (size_t)u * fd, ldg, P(m, m->p_a1w[j]) + S,
           m->adapter_in[j], 1.0f, w->z + j * F, ldz);
    }
    int no = m->n_out, ldo = na * no;
    if (m->hp.adapter_hidden > 0 && no == 1) {
        /* Scalar heads: ReLU and the F -> 1 layer in one pass over z instead of a ReLU pass
           plus NA matrix-vector GEMMs (the same sums, in the same order for any batch). */
        for (int j = 0; j < na; j++) {
            const float *w2 = P(m, m->p_a2w[j]);
            float b2 = P(m, m->p_a2b[j])[0];
            for (int64_t b = 0; b < B; b++) {
                float *zr = w->z + b * ldz + j * F;
                float acc = 0.0f;
                LEVI__OMP_SIMD_SUM(acc)
                for (int q = 0; q < F; q++) {
                    float v = zr[q] > 0.0f ? zr[q] : 0.0f;
                    zr[q] = v;
                    acc += v * w2[q];
                }
                w->out[b * ldo + j] = b2 + acc;
            }
        }
    } else if (m->hp.adapter_hidden > 0) {
        relu_rows(w->z, B * ldz);
        for (int j = 0; j < na; j++) {
            // out_j[B,O] = z_j[B,F] @ W2_j[O,F]^T + b2_j
            fill_rows(w->out + j * no, P(m, m->p_a2b[j]), B, no, ldo);
            mm(bf16, 0, 1, bi, no, F, 1.0f, w->z + j * F, ldz, P(m, m->p_a2w[j]), F, 1.0f,
               w->out + j * no, ldo);
        }
    } else {
        memcpy(w->out, w->z, (size_t)B * (size_t)ldo * sizeof(float));
    }
    if (m->n_classes > 0) softmax_rows(w->probs, w->out, B * na, no, no, no);
}

float levi__loss(levi_model *m, int64_t B) {
    levi__workspace *w = &m->ws;
    int na = m->n_adapters, no = m->n_out;
    double loss = 0;
    float invB = 1.0f / (float)B;
    if (m->n_classes == 0) {
        for (int64_t b = 0; b < B; b++)
            for (int j = 0; j < na; j++) {
                float e = w->out[b * na + j] - w->y[b];
                loss += (double)m->weight[j] * e * e;
                w->dout[b * na + j] = m->weight[j] * 2.0f * e * invB;
            }
    } else {
        for (int64_t b = 0; b < B; b++)
            for (int j = 0; j < na; j++) {
                const float *p = w->probs + (b * na + j) * no;
                float *dl = w->dout + (b * na + j) * no;
                int y = w->yc[b];
                float py = p[y] > 1e-30f ? p[y] : 1e-30f;
                loss -= (double)m->weight[j] * logf(py);
                for (int k = 0; k < no; k++)
                    dl[k] = m->weight[j] * (p[k] - (k == y ? 1.0f : 0.0f)) * invB;
            }
    }
    return (float)(loss / (double)B);
}

static void bias_backward(levi_model *m, int64_t B) {
    levi__workspace *w = &m->ws;
    float *gg = G(m, m->p_bias_global);
    for (int64_t b = 0; b < B; b++) {
        gg[0] += w->dout[b];
        for (int c = 0; c < m->n_cat; c++)
            if (m->p_bias_col[c] >= 0)
                G(m, m->p_bias_col[c])[w->ids[b * m->n_cat + c]] += w->dout[b];
    }
}

void levi__backward(levi_model *m, int64_t B, int bf16) {
    levi__workspace *w = &m->ws;
    if (m->hp.method == LEVI_METHOD_BIAS) {
        bias_backward(m, B);
        return;
    }
    int bi = (int)B;
    int na = m->n_adapters, F = m->first_out, ldz = na * F, fd = m->feat_dim;
    int no = m->n_out, ldo = na * no, ldg = m->n_used_layers * fd, S = m->small_out;
    float *dz;
    int db1_done = 0;
    if (m->hp.adapter_hidden > 0 && no == 1) {
        /* Scalar heads: dW2, db2, dz = dout * W2 masked by the ReLU, and db1 in one pass over
           z: the F -> 1 layer's GEMMs are outer products with no arithmetic to block. */
        dz = w->dz;
        for (int j = 0; j < na; j++) {
            const float *w2 = P(m, m->p_a2w[j]);
            float *dw2 = G(m, m->p_a2w[j]), *db2 = G(m, m->p_a2b[j]), *db1 = G(m, m->p_a1b[j]);
            for (int64_t b = 0; b < B; b++) {
                const float *zr = w->z + b * ldz + j * F;
                float *dzr = dz + b * ldz + j * F;
                float g = w->dout[b * ldo + j];
                db2[0] += g;
                LEVI__OMP_SIMD
                for (int q = 0; q < F; q++) {
                    float d = zr[q] > 0.0f ? g * w2[q] : 0.0f;
                    dw2[q] += g * zr[q];
                    dzr[q] = d;
                    db1[q] += d;
                }
            }
        }
        db1_done = 1;
    } else if (m->hp.adapter_hidden > 0) {
        dz = w->dz;
        for (int j = 0; j < na; j++) {
            // dW2_j[O,F] += dout_j^T @ z_j; db2_j += sum_b dout_j; dz_j = dout_j @ W2_j
            mm(bf16, 1, 0, no, F, bi, 1.0f, w->dout + j * no, ldo, w->z + j * F, ldz, 1.0f,
               G(m, m->p_a2w[j]), F);
            colsum_add(G(m, m->p_a2b[j]), w->dout + j * no, B, no, ldo);
            mm(bf16, 0, 0, bi, F, no, 1.0f, w->dout + j * no, ldo, P(m, m->p_a2w[j]), F, 0.0f,
               dz + j * F, ldz);
        }
        relu_mask(dz, w->z, B * ldz);
    } else {
        dz = w->dout; /* linear heads: the first layer is the output layer (ldz == ldo) */
    }
    for (int j = 0; j < na; j++) {
        if (!db1_done) colsum_add(G(m, m->p_a1b[j]), dz + j * F, B, F, ldz);
        int u = m->adapter_slot[j];
        if (u < 0) continue;
        // dW1f_j[F,FD] += dz_j^T @ g_u
        mm(bf16, 1, 0, F, fd, bi, 1.0f, dz + j * F, ldz, w->g + (size_t)u * fd, ldg, 1.0f,
           G(m, m->p_a1w[j]) + S, m->adapter_in[j]);
    }
    if (!m->hp.use_small) return;
    const float *h = w->act[m->n_small - 1];
    float *dh = w->dact[0];
    if (m->fused_first) {
        // dW1s_all[NA*F, S] += dz^T @ h; dh[B,S] = dz @ W1s_all
        mm(bf16, 1, 0, na * F, S, bi, 1.0f, dz, ldz, h, S, 1.0f, G(m, m->p_a1w[0]),
           m->adapter_in[0]);
        mm(bf16, 0, 0, bi, S, na * F, 1.0f, dz, ldz, P(m, m->p_a1w[0]), m->adapter_in[0], 0.0f, dh,
           S);
    } else {
        for (int j = 0; j < na; j++) {
            mm(bf16, 1, 0, F, S, bi, 1.0f, dz + j * F, ldz, h, S, 1.0f, G(m, m->p_a1w[j]),
               m->adapter_in[j]);
            mm(bf16, 0, 0, bi, S, F, 1.0f, dz + j * F, ldz, P(m, m->p_a1w[j]), m->adapter_in[j],
               j == 0 ? 0.0f : 1.0f, dh, S);
        }
    }
    float *d = dh;
    int ping = 0;
    for (int l = m->n_small - 1; l >= 0; l--) {
        int N = m->small_dim[l];
        int K = l > 0 ? m->small_dim[l - 1] : m->in0;
        const float *x = l > 0 ? w->act[l - 1] : w->x0;
        relu_mask_colsum(d, G(m, m->p_small_b[l]), w->act[l], B, N);
        // dW_l[N,K] += d^T @ x; db_l += sum_b d (above); dx[B,K] = d @ W_l
        mm(bf16, 1, 0, N, K, bi, 1.0f, d, N, x, K, 1.0f, G(m, m->p_small_w[l]), K);
        if (l == 0 && m->n_cat == 0) break; /* numeric inputs need no gradient */
        float *dx = l > 0 ? w->dact[1 - ping] : w->dx0;
        mm(bf16, 0, 0, bi, K, N, 1.0f, d, N, P(m, m->p_small_w[l]), K, 0.0f, dx, K);
        d = dx;
        ping = 1 - ping;
    }
    if (m->n_cat > 0) {
        int e = m->hp.emb_dim, nc = m->n_cat, in0 = m->in0;
        // dtable_c[ids[b,c], :] += dx0[b, c*E : (c+1)*E]
        for (int64_t b = 0; b < B; b++)
            for (int c = 0; c < nc; c++) {
                float *gt = G(m, m->p_emb[c]) + (size_t)w->ids[b * nc + c] * e;
                const float *src = w->dx0 + b * in0 + c * e;
                LEVI__OMP_SIMD
                for (int k = 0; k < e; k++) gt[k] += src[k];
            }
    }
}

void levi__ensemble(levi_model *m, int64_t B) {
    levi__workspace *w = &m->ws;
    int na = m->n_adapters, no = m->n_out;
    if (m->n_classes == 0 || m->hp.method == LEVI_METHOD_BIAS) {
        for (int64_t b = 0; b < B; b++) {
            float s = 0.0f;
            for (int j = 0; j < na; j++) s += m->weight[j] * w->out[b * na + j];
            w->ens[b] = s;
        }
        return;
    }
    const float *src = m->hp.ensemble == LEVI_ENSEMBLE_PROB ? w->probs : w->out;
    for (int64_t b = 0; b < B; b++) {
        float *e = w->ens + b * no;
        for (int k = 0; k < no; k++) e[k] = 0.0f;
        for (int j = 0; j < na; j++) {
            const float *p = src + (b * na + j) * no;
            for (int k = 0; k < no; k++) e[k] += m->weight[j] * p[k];
        }
    }
    if (m->hp.ensemble == LEVI_ENSEMBLE_LOGIT) softmax_rows(w->ens, w->ens, B, no, no, no);
}

/* ---- initialisation ---------------------------------------------------------------------- */

static void init_linear(levi_model *m, int w_idx, int b_idx, levi_rng *rng) {
    if (w_idx < 0) return;
    const levi_param *p = &m->params.items[w_idx];
    float k = 1.0f / sqrtf((float)p->shape[1]);
    float *w = P(m, w_idx);
    for (size_t i = 0; i < p->numel; i++) w[i] = (2.0f * levi_rng_uniform(rng) - 1.0f) * k;
    if (b_idx >= 0) {
        float *b = P(m, b_idx);
        for (size_t i = 0; i < m->params.items[b_idx].numel; i++)
            b[i] = (2.0f * levi_rng_uniform(rng) - 1.0f) * k;
    }
}

void levi__init_weights(levi_model *m, levi_rng *rng) {
    for (int c = 0; c < m->n_cat; c++) {
        if (m->p_emb[c] < 0) continue;
        float *t = P(m, m->p_emb[c]);
        float sd = m->hp.emb_init_std;
        for (size_t i = 0; i < m->params.items[m->p_emb[c]].numel; i++)
            t[i] = sd * levi_rng_normal(rng);
    }
    for (int l = 0; l < m->n_small; l++) init_linear(m, m->p_small_w[l], m->p_small_b[l], rng);
    for (int j = 0; j < m->n_adapters; j++) {
        init_linear(m, m->p_a1w[j], m->p_a1b[j], rng);
        init_linear(m, m->p_a2w[j], m->p_a2b[j], rng);
    }
    if (m->p_bias_global >= 0) {
        P(m, m->p_bias_global)[0] = 0.0f;
        for (int c = 0; c < m->n_cat; c++)
            if (m->p_bias_col[c] >= 0)
                memset(P(m, m->p_bias_col[c]), 0, (size_t)m->card[c] * sizeof(float));
    }
}

void levi__init_from_data(levi_model *m, const levi_task_data *d, const int64_t *train,
                          int64_t n_train) {
    /* Standardisation from the train rows only. */
    if (m->n_used_layers > 0) {
        int fd = m->feat_dim;
        double *s = levi_xcalloc((size_t)fd * 2, sizeof(double));
        float *x = levi_xmalloc((size_t)fd * sizeof(float));
        for (int u = 0; u < m->n_used_layers; u++) {
            int l = m->used_layer[u];
            memset(s, 0, (size_t)fd * 2 * sizeof(double));
            for (int64_t i = 0; i < n_train; i++) {
                read_feature(d, train[i], l, x);
                for (int k = 0; k < fd; k++) {
                    s[k] += x[k];
                    s[fd + k] += (double)x[k] * x[k];
                }
            }
            float *mean = P(m, m->p_feat_mean) + (size_t)l * fd;
            float *sd = P(m, m->p_feat_std) + (size_t)l * fd;
            for (int k = 0; k < fd; k++) {
                double mu = n_train ? s[k] / n_train : 0.0;
                double var = n_train ? s[fd + k] / n_train - mu * mu : 1.0;
                double sdv = var > 0 ? sqrt(var) : 0.0;
                /* A (near-)constant dimension keeps scale 1: dividing by a tiny std would
                   turn an OOD shift in it into a huge input. */
                mean[k] = (float)mu;
                sd[k] = sdv > 1e-6 * (1.0 + fabs(mu)) ? (float)sdv : 1.0f;
            }
        }
        levi_free(x);
        levi_free(s);
    }
    if (m->p_num_mean >= 0) {
        float *mean = P(m, m->p_num_mean), *sd = P(m, m->p_num_std);
        for (int k = 0; k < m->n_num; k++) {
            double s1 = 0, s2 = 0;
            for (int64_t i = 0; i < n_train; i++) {
                double x = d->num[train[i] * m->n_num + k];
                s1 += x;
                s2 += x * x;
            }
            double mu = n_train ? s1 / n_train : 0.0, var = n_train ? s2 / n_train - mu * mu : 1;
            double sdv = var > 0 ? sqrt(var) : 0.0;
            mean[k] = (float)mu;
            sd[k] = sdv > 1e-6 * (1.0 + fabs(mu)) ? (float)sdv : 1.0f;
        }
    }
    /* Seen-id maps: slot 0 always counts as seen (it is what unseen ids map to). */
    for (int c = 0; c < m->n_cat; c++) {
        if (m->p_seen[c] < 0) continue;
        float *seen = P(m, m->p_seen[c]);
        memset(seen, 0, (size_t)m->card[c] * sizeof(float));
        seen[0] = 1.0f;
        for (int64_t i = 0; i < n_train; i++) seen[d->cat[train[i] * m->n_cat + c]] = 1.0f;
    }
    /* Regression heads start at the train mean, so the first epoch does not spend itself
       moving every output bias from 0 to ~3.5 stars. */
    if (m->n_classes == 0 && n_train > 0) {
        double s = 0;
        for (int64_t i = 0; i < n_train; i++) s += d->y[train[i]];
        float mu = (float)(s / n_train);
        for (int j = 0; j < m->n_adapters; j++) {
            int bidx = m->hp.adapter_hidden > 0 ? m->p_a2b[j] : m->p_a1b[j];
            if (bidx >= 0) P(m, bidx)[0] = mu;
        }
        if (m->p_bias_global >= 0) P(m, m->p_bias_global)[0] = mu;
    }
    levi__model_refresh(m);
}

/* ---- prediction and evaluation ----------------------------------------------------------- */

#define LEVI__EVAL_BATCH 1024

levi_status levi_predict(levi_model *m, const levi_task_data *d, const int64_t *rows, int64_t n,
                         float *ens, float *per_adapter, levi_error *err) {
    levi_status st = levi_task_data_check(d, rows, n, 0, err);
    if (st == LEVI_OK) st = levi__check_shapes(m, d, err);
    if (st != LEVI_OK) return st;
    levi__workspace_ensure(m, LEVI__EVAL_BATCH);
    int na = m->n_adapters, no = m->n_out;
    for (int64_t s = 0; s < n; s += LEVI__EVAL_BATCH) {
        int64_t B = n - s < LEVI__EVAL_BATCH ? n - s : LEVI__EVAL_BATCH;
        levi__gather_batch(m, d, rows + s, B, NULL, 0);
        levi__forward(m, B, 0);
        levi__ensemble(m, B);
        memcpy(ens + s * no, m->ws.ens, (size_t)(B * no) * sizeof(float));
        if (per_adapter) {
            const float *src = m->n_classes > 0 ? m->ws.probs : m->ws.out;
            memcpy(per_adapter + s * na * no, src, (size_t)(B * na * no) * sizeof(float));
        }
    }
    return LEVI_OK;
}

static int argmax(const float *p, int n) {
    int best = 0;
    for (int k = 1; k < n; k++)
        if (p[k] > p[best]) best = k;
    return best;
}

levi_status levi_evaluate(levi_model *m, const levi_task_data *d, const int64_t *rows, int64_t n,
                          levi_metrics *out, levi_error *err) {
    memset(out, 0, sizeof *out);
    levi_status st = levi_task_data_check(d, rows, n, 0, err);
    if (st == LEVI_OK) st = levi__check_shapes(m, d, err);
    if (st != LEVI_OK) return st;
    if (m->n_classes == 0 && !d->y) return levi_errorf(err, LEVI_ERR_ARG, "evaluation needs y");
    if (m->n_classes > 0 && !d->yc) return levi_errorf(err, LEVI_ERR_ARG, "evaluation needs yc");
    levi__workspace_ensure(m, LEVI__EVAL_BATCH);
    int na = m->n_adapters, no = m->n_out;
    double sum = 0, loss = 0, per[LEVI_MAX_ADAPTERS] = {0};
    for (int64_t s = 0; s < n; s += LEVI__EVAL_BATCH) {
        int64_t B = n - s < LEVI__EVAL_BATCH ? n - s : LEVI__EVAL_BATCH;
        levi__gather_batch(m, d, rows + s, B, NULL, 0);
        levi__forward(m, B, 0);
        levi__ensemble(m, B);
        levi__workspace *w = &m->ws;
        for (int64_t b = 0; b < B; b++) {
            int64_t r = rows[s + b];
            if (m->n_classes == 0) {
                double e = (double)w->ens[b] - d->y[r];
                sum += e * e;
                for (int j = 0; j < na; j++) {
                    double ej = (double)w->out[b * na + j] - d->y[r];
                    per[j] += ej * ej;
                }
            } else {
                int y = d->yc[r];
                if (y < 0 || y >= no)
                    return levi_errorf(err, LEVI_ERR_ARG, "row %lld: class %d outside [0, %d)",
                                       (long long)r, y, no);
                const float *e = w->ens + b * no;
                sum += argmax(e, no) == y;
                loss -= log(e[y] > 1e-30f ? e[y] : 1e-30f);
                for (int j = 0; j < na; j++)
                    per[j] += argmax(w->probs + (b * na + j) * no, no) == y;
            }
        }
    }
    out->n = n;
    out->n_adapters = na;
    double inv = n > 0 ? 1.0 / (double)n : NAN;
    if (m->n_classes == 0) {
        out->loss = sum * inv;
        out->metric = sqrt(sum * inv);
        for (int j = 0; j < na; j++) out->adapter_metric[j] = sqrt(per[j] * inv);
    } else {
        out->loss = loss * inv;
        out->metric = sum * inv;
        for (int j = 0; j < na; j++) out->adapter_metric[j] = per[j] * inv;
    }
    return LEVI_OK;
}

int levi_metric_better(const levi_model *m, double a, double b) {
    if (isnan(a)) return 0;
    if (isnan(b)) return 1;
    return m->n_classes == 0 ? a < b : a > b;
}
