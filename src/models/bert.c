/* levi BERT encoder (implements include/levi/bert.h): config parsing, loading, random init,
 * forward in two modes, backward, freezing, mean pooling.
 *
 * For: Hugging Face BertModel's computation, post-LN:
 *   h0 = dropout(LN(word[id] + pos[s] + type[t]))
 *   per layer: qkv = x Wqkv^T + b; ctx = attention(q, k, v, mask);
 *              a = LN(x + dropout(ctx Wo^T + bo)); y = LN(a + dropout(gelu(a W1^T + b1) W2^T + b2))
 * Not for: tokenisation, the pooler, relative positions, other activations.
 *
 * Speed: the four big products per layer go through levi_gemm (training) or levi_wpack_gemm
 * (inference: the weights reordered once per forward for oneDNN's matmul kernels) with Q, K
 * and V as ONE [3H, H] product over a packed copy of the three weight matrices (the table
 * stays keyed by the checkpoint's names; the packed copies are derived buffers refreshed on
 * every forward, which costs ~0.5% of a 64 x 64 inference batch and means they can never go
 * stale after an optimizer step). Bias, residual add and GELU are fused into the passes
 * around the GEMMs: in training each output is pre-filled with bias (+ residual) and the GEMM
 * accumulates onto it; in inference the GEMMs write their outputs and the bias and residual
 * join in the LayerNorm pass that follows, and the attention adds the QKV bias.
 * Attention and GELU are the ops.h kernels (levi_attention_*, levi_gelu_*): attention reads
 * Q, K, V straight from the packed [N, 3H] buffer through its row strides, and its dropout
 * decisions are recomputed from a per-layer seed rather than saved. Measured split of an
 * inference forward (MiniLM shapes, B=64, S=64, one core): GEMMs ~92% (attention's own
 * products ~3% of that), the rest of attention ~2.5%, bias + GELU ~1.6%, residual + LN ~0.7%.
 */
#include "levi/bert.h"

#include "levi/ops.h"
#include "levi/safetensors.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef _OPENMP
#include <omp.h>
#define BERT_PRAGMA(x) _Pragma(#x)
#define BERT_OMP_FOR_IF(cond) BERT_PRAGMA(omp parallel for schedule(static) if(cond))
#define BERT_OMP_SIMD BERT_PRAGMA(omp simd)
static int bert_max_threads(void) {
    return omp_get_max_threads();
}
#else
#define BERT_OMP_FOR_IF(cond)
#define BERT_OMP_SIMD
static int bert_max_threads(void) {
    return 1;
}
#endif

/* Element counts above which a loop is threaded: a parallel region costs microseconds. */
#define BERT_PAR_MIN (1 << 15)

/* ----------------------------------------------------------------------------------------
 * Row sums in vectors of 8 floats (GCC/Clang vector extensions; the compiler maps them to the
 * target's SIMD): GCC finishes an `omp simd reduction` with a scalar loop over the lanes,
 * which costs as much as a whole 384-element LayerNorm row's sum. */

#if defined(__GNUC__) && !defined(__clang__)
/* Without AVX (a build without -march=native) GCC warns that passing 32-byte vectors changes
 * the ABI; every function taking them here is static, so no ABI is exposed. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float bert_v8 __attribute__((vector_size(32)));
typedef float bert_v8u __attribute__((vector_size(32), aligned(4)));
#define BERT_LD(p) (*(const bert_v8u *)(p))
static inline bert_v8 bert_bc(float x) {
    return (bert_v8){x, x, x, x, x, x, x, x};
}
static inline float bert_hsum(bert_v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* sum_i x[i] */
static float bert_sum(const float *x, int n) {
    bert_v8 a = {0}, b = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) a += BERT_LD(x + i), b += BERT_LD(x + i + 8);
    for (; i + 8 <= n; i += 8) a += BERT_LD(x + i);
    float s = bert_hsum(a + b);
    for (; i < n; i++) s += x[i];
    return s;
}

/* sum_i (x[i] - m)^2 */
static float bert_sqdev(const float *x, float m, int n) {
    const bert_v8 vm = bert_bc(m);
    bert_v8 a = {0}, b = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        bert_v8 d0 = BERT_LD(x + i) - vm, d1 = BERT_LD(x + i + 8) - vm;
        a += d0 * d0, b += d1 * d1;
    }
    for (; i + 8 <= n; i += 8) {
        bert_v8 d0 = BERT_LD(x + i) - vm;
        a += d0 * d0;
    }
    float s = bert_hsum(a + b);
    for (; i < n; i++) s += (x[i] - m) * (x[i] - m);
    return s;
}

/* ----------------------------------------------------------------------------------------
 * Row helpers around the GEMMs. */

/* out[n,:] = (x ? x[n,:] : 0) + bias[:] */
static void bert_fill_rows(float *out, const float *x, const float *bias, int64_t N, int C) {
    BERT_OMP_FOR_IF(N * C > BERT_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * C;
        if (x) {
            const float *xr = x + n * C;
            BERT_OMP_SIMD
            for (int c = 0; c < C; c++) o[c] = xr[c] + bias[c];
        } else {
            memcpy(o, bias, (size_t)C * sizeof(float));
        }
    }
}

/* o = LayerNorm(x) of one row of C (o may alias x); returns the row's rstd, *mean its mean. */
static inline float bert_ln_row(float *o, const float *x, const float *w, const float *bias, int C,
                                float eps, float *mean) {
    const float m = bert_sum(x, C) / (float)C;
    const float var = bert_sqdev(x, m, C) / (float)C;
    const float s = 1.0f / sqrtf(var + eps);
    BERT_OMP_SIMD
    for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * w[c] + bias[c];
    *mean = m;
    return s;
}

/* out = LayerNorm(a + b) over rows of C (b may be NULL; out may alias a or b). When sum is
 * given it receives a + b; mean and rstd (may be NULL) as levi_layernorm_forward saves them,
 * so levi_layernorm_backward applies. */
static void bert_add_layernorm(float *out, float *sum, float *mean, float *rstd, const float *a,
                               const float *b, const float *w, const float *bias, int64_t N, int C,
                               float eps) {
    BERT_OMP_FOR_IF(N * C > BERT_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        const float *ar = a + n * C, *br = b ? b + n * C : NULL;
        float *o = out + n * C;
        float *x = sum ? sum + n * C : o;
        if (br) {
            BERT_OMP_SIMD
            for (int c = 0; c < C; c++) x[c] = ar[c] + br[c];
        } else if (x != ar) {
            memcpy(x, ar, (size_t)C * sizeof(float));
        }
        float m;
        const float s = bert_ln_row(o, x, w, bias, C, eps, &m);
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = s;
    }
}

/* x = LayerNorm(x + (res + bias)) over rows of C, in place: the inference forward's GEMMs
 * write x with beta 0 and the residual and bias join here, which saves a pass that pre-filled
 * the output for an accumulating GEMM (that rounded the same sum in another order). */
static void bert_res_layernorm(float *x, const float *res, const float *bias, const float *w,
                               const float *b, int64_t N, int C, float eps) {
    BERT_OMP_FOR_IF(N * C > BERT_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        float *xr = x + n * C;
        const float *rr = res + n * C;
        BERT_OMP_SIMD
        for (int c = 0; c < C; c++) xr[c] = xr[c] + (rr[c] + bias[c]);
        float m;
        bert_ln_row(xr, xr, w, b, C, eps, &m);
    }
}

/* db[c] += sum_n d[n,c] (row stride ld), in column blocks so the order of the sum is the same
 * for any thread count. */
static void bert_colsum_add(float *db, const float *d, int ld, int64_t N, int C) {
    const int blk = 64, nblk = (C + blk - 1) / blk;
    BERT_OMP_FOR_IF(N * C > BERT_PAR_MIN && nblk > 1)
    for (int ib = 0; ib < nblk; ib++) {
        const int c0 = ib * blk, c1 = c0 + blk < C ? c0 + blk : C;
        float acc[64] = {0};
        for (int64_t n = 0; n < N; n++) {
            const float *r = d + n * ld;
            for (int c = c0; c < c1; c++) acc[c - c0] += r[c];
        }
        for (int c = c0; c < c1; c++) db[c] += acc[c - c0];
    }
}

/* ----------------------------------------------------------------------------------------
 * Config */

levi_bert_config levi_bert_minilm_l6_config(void) {
    levi_bert_config c = {
        .hidden = 384,
        .layers = 6,
        .heads = 12,
        .intermediate = 1536,
        .vocab = 30522,
        .max_pos = 512,
        .type_vocab = 2,
        .pad_token_id = 0,
        .eps = 1e-12f,
        .act = LEVI_BERT_ACT_GELU,
        .hidden_dropout = 0.1f,
        .attn_dropout = 0.1f,
        .init_range = 0.02f,
    };
    return c;
}

/* Limits that keep every size levi computes inside int (GEMM dimensions) and the parameter
 * table inside what a machine can hold; far beyond any BERT-family checkpoint. */
#define BERT_MAX_DIM (1 << 16)
#define BERT_MAX_VOCAB (1 << 24)
#define BERT_MAX_PARAMS ((size_t)1 << 33)

static size_t bert_param_count(const levi_bert_config *c) {
    size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    size_t emb = ((size_t)c->vocab + (size_t)c->max_pos + (size_t)c->type_vocab + 2) * H;
    size_t layer = 4 * H * H + 2 * H * I + I + 9 * H;
    return emb + (size_t)c->layers * layer;
}

levi_status levi_bert_config_validate(const levi_bert_config *c, const char *where,
                                      levi_error *err) {
    LEVI_ASSERT(c != NULL, "levi_bert_config_validate needs a config");
    if (!where) where = "config";
    struct {
        const char *field;
        int value, max;
    } sizes[] = {
        {"hidden_size", c->hidden, BERT_MAX_DIM},
        {"num_hidden_layers", c->layers, 1024},
        {"num_attention_heads", c->heads, BERT_MAX_DIM},
        {"intermediate_size", c->intermediate, 4 * BERT_MAX_DIM},
        {"vocab_size", c->vocab, BERT_MAX_VOCAB},
        {"max_position_embeddings", c->max_pos, BERT_MAX_DIM},
        {"type_vocab_size", c->type_vocab, BERT_MAX_DIM},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i].value < 1 || sizes[i].value > sizes[i].max)
            return levi_errorf(err, LEVI_ERR_ARG, "%s: %s = %d: expected an integer in [1, %d]",
                               where, sizes[i].field, sizes[i].value, sizes[i].max);
    if (c->hidden % c->heads != 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "%s: hidden_size = %d is not a multiple of num_attention_heads = %d",
                           where, c->hidden, c->heads);
    if (!(c->eps > 0.0f) || !isfinite(c->eps))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: layer_norm_eps = %g: expected > 0", where,
                           (double)c->eps);
    if (!(c->hidden_dropout >= 0.0f && c->hidden_dropout < 1.0f))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: hidden_dropout_prob = %g: expected [0, 1)",
                           where, (double)c->hidden_dropout);
    if (!(c->attn_dropout >= 0.0f && c->attn_dropout < 1.0f))
        return levi_errorf(err, LEVI_ERR_ARG,
                           "%s: attention_probs_dropout_prob = %g: expected [0, 1)", where,
                           (double)c->attn_dropout);
    if (!(c->init_range >= 0.0f) || !isfinite(c->init_range))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: initializer_range = %g: expected >= 0", where,
                           (double)c->init_range);
    if (c->act != LEVI_BERT_ACT_GELU)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: hidden_act: only \"gelu\" is supported", where);
    size_t n = bert_param_count(c);
    if (n > BERT_MAX_PARAMS)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "%s: the config describes %zu parameters, more than the %zu levi "
                           "supports",
                           where, n, BERT_MAX_PARAMS);
    return LEVI_OK;
}

/* Looks field up in root: *it is the item, NULL when absent; absent and required is an
   error. The shared first step of the typed readers below, which set *out to the default
   (or NULL) before it: on an error the only caller throws the whole config away. */
static levi_status bert_json_field(const cJSON *root, const char *path, const char *field,
                                   int required, const cJSON **it, levi_error *err) {
    *it = cJSON_GetObjectItemCaseSensitive(root, field);
    if (!*it && required)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: missing required field \"%s\"", path, field);
    return LEVI_OK;
}

/* Integer field: required or defaulted; must be a JSON number with an integral value. */
static levi_status bert_json_int(const cJSON *root, const char *path, const char *field,
                                 int required, int def, int *out, levi_error *err) {
    const cJSON *it;
    *out = def;
    levi_status st = bert_json_field(root, path, field, required, &it, err);
    if (st != LEVI_OK || !it) return st;
    if (!cJSON_IsNumber(it))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected an integer, found %s",
                           path, field,
                           cJSON_IsString(it) ? "a string"
                           : cJSON_IsBool(it) ? "a boolean"
                           : cJSON_IsNull(it) ? "null"
                                              : "an array or object");
    double v = cJSON_GetNumberValue(it);
    if (!(v == floor(v)) || v < (double)INT_MIN || v > (double)INT_MAX)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected an integer, found %g",
                           path, field, v);
    *out = (int)v;
    return LEVI_OK;
}

static levi_status bert_json_float(const cJSON *root, const char *path, const char *field,
                                   int required, float def, float *out, levi_error *err) {
    const cJSON *it;
    *out = def;
    levi_status st = bert_json_field(root, path, field, required, &it, err);
    if (st != LEVI_OK || !it) return st;
    if (!cJSON_IsNumber(it))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected a number", path,
                           field);
    *out = (float)cJSON_GetNumberValue(it);
    return LEVI_OK;
}

/* String field; *out points into the cJSON tree (NULL when absent and optional). */
static levi_status bert_json_str(const cJSON *root, const char *path, const char *field,
                                 int required, const char **out, levi_error *err) {
    const cJSON *it;
    *out = NULL;
    levi_status st = bert_json_field(root, path, field, required, &it, err);
    if (st != LEVI_OK || !it) return st;
    if (!cJSON_IsString(it))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected a string", path,
                           field);
    *out = cJSON_GetStringValue(it);
    return LEVI_OK;
}

levi_status levi_bert_config_parse(const char *json, size_t len, const char *path,
                                   levi_bert_config *cfg, levi_error *err) {
    LEVI_ASSERT(json != NULL && cfg != NULL, "levi_bert_config_parse needs json and cfg");
    if (!path) path = "config.json";
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= json && at <= json + len ? (size_t)(at - json) : 0;
        int line = 1, col = 1;
        for (size_t i = 0; i < off; i++) {
            if (json[i] == '\n')
                line++, col = 1;
            else
                col++;
        }
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s:%d:%d: invalid JSON", path, line, col);
    }
    levi_status st = LEVI_OK;
    levi_bert_config c = levi_bert_minilm_l6_config();
    const char *act = NULL, *pos_type = NULL, *model_type = NULL;
    if (!cJSON_IsObject(root)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: expected a JSON object at the top level", path);
        goto done;
    }
#define BERT_TRY(call)                                                                             \
    do {                                                                                           \
        if ((st = (call)) != LEVI_OK) goto done;                                                   \
    } while (0)
    BERT_TRY(bert_json_int(root, path, "hidden_size", 1, 0, &c.hidden, err));
    BERT_TRY(bert_json_int(root, path, "num_hidden_layers", 1, 0, &c.layers, err));
    BERT_TRY(bert_json_int(root, path, "num_attention_heads", 1, 0, &c.heads, err));
    BERT_TRY(bert_json_int(root, path, "intermediate_size", 1, 0, &c.intermediate, err));
    BERT_TRY(bert_json_int(root, path, "vocab_size", 1, 0, &c.vocab, err));
    BERT_TRY(bert_json_int(root, path, "max_position_embeddings", 1, 0, &c.max_pos, err));
    BERT_TRY(bert_json_int(root, path, "type_vocab_size", 1, 0, &c.type_vocab, err));
    BERT_TRY(bert_json_int(root, path, "pad_token_id", 0, 0, &c.pad_token_id, err));
    BERT_TRY(bert_json_float(root, path, "layer_norm_eps", 1, 0.0f, &c.eps, err));
    BERT_TRY(bert_json_float(root, path, "hidden_dropout_prob", 0, 0.1f, &c.hidden_dropout, err));
    BERT_TRY(
        bert_json_float(root, path, "attention_probs_dropout_prob", 0, 0.1f, &c.attn_dropout, err));
    BERT_TRY(bert_json_float(root, path, "initializer_range", 0, 0.02f, &c.init_range, err));
    BERT_TRY(bert_json_str(root, path, "hidden_act", 1, &act, err));
    BERT_TRY(bert_json_str(root, path, "position_embedding_type", 0, &pos_type, err));
    BERT_TRY(bert_json_str(root, path, "model_type", 0, &model_type, err));
#undef BERT_TRY
    if (strcmp(act, "gelu") != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: hidden_act = \"%s\" is not supported (expected \"gelu\", the erf "
                         "form)",
                         path, act);
        goto done;
    }
    if (pos_type && strcmp(pos_type, "absolute") != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: position_embedding_type = \"%s\" is not supported (expected "
                         "\"absolute\")",
                         path, pos_type);
        goto done;
    }
    if (model_type && strcmp(model_type, "bert") != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: model_type = \"%s\" is not supported (expected \"bert\"; other "
                         "families number positions or name tensors differently)",
                         path, model_type);
        goto done;
    }
    c.act = LEVI_BERT_ACT_GELU;
    st = levi_bert_config_validate(&c, path, err);
    if (st == LEVI_OK) *cfg = c;
done:
    cJSON_Delete(root);
    return st;
}

levi_status levi_bert_config_load(const char *path, levi_bert_config *cfg, levi_error *err) {
    char *text = NULL;
    size_t len = 0;
    levi_status st = levi_read_file(path, &text, &len, err);
    if (st != LEVI_OK) return st;
    st = levi_bert_config_parse(text, len, path, cfg, err);
    free(text);
    return st;
}

/* ----------------------------------------------------------------------------------------
 * The model object */

#define BERT_LORA_TARGETS 6
enum { BERT_T_Q = 0, BERT_T_K, BERT_T_V, BERT_T_O, BERT_T_I, BERT_T_F };
static const char *const bert_lora_module[BERT_LORA_TARGETS] = {
    "attention.self.query",   "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense"};

typedef struct {
    int q_w, q_b, k_w, k_b, v_w, v_b; /* attention.self.{query,key,value} */
    int o_w, o_b, ln1_w, ln1_b;       /* attention.output.{dense,LayerNorm} */
    int i_w, i_b;                     /* intermediate.dense */
    int f_w, f_b, ln2_w, ln2_b;       /* output.{dense,LayerNorm} */
    /* LoRA A and B per target (bert_lora_* order: query, key, value, attention.output.dense,
       intermediate.dense, output.dense); -1 when the target has none. */
    int lora_a[BERT_LORA_TARGETS], lora_b[BERT_LORA_TARGETS];
} bert_layer_idx;

/* Activations of one layer saved in train mode (pointers into the train arena). */
typedef struct {
    float *qkv;         /* [N,3H] */
    float *probs;       /* [B,NH,S,S] softmax before attention dropout */
    uint64_t attn_seed; /* attention dropout seed (levi_attention_forward) */
    float *ctx;         /* [N,H] */
    float *dmask1;      /* [N,H] hidden dropout after attention.output.dense, or NULL */
    float *res1;        /* [N,H] input of attention.output.LayerNorm */
    float *mean1, *rstd1;
    float *a;      /* [N,H] attention block output */
    float *pre;    /* [N,I] GELU input */
    float *act;    /* [N,I] GELU output */
    float *dmask2; /* [N,H] or NULL */
    float *res2;   /* [N,H] input of output.LayerNorm */
    float *mean2, *rstd2;
} bert_layer_acts;

/* The inference forward's packed weights per layer (levi_wpack). */
enum { BERT_WP_QKV, BERT_WP_O, BERT_WP_I, BERT_WP_F, BERT_WPACKS };

struct levi_bert {
    levi_bert_config cfg;
    levi_params params;
    int word, pos, type, eln_w, eln_b;
    bert_layer_idx *li; /* [L] */
    float *qkv_w;       /* [L][3H,H] packed copy of query|key|value weights */
    float *qkv_b;       /* [L][3H] */
    /* [BERT_WPACKS] one layer's weights packed for levi_wpack_gemm by the inference forward
     * (made at its first call, refreshed for each layer of each call: never stale) */
    levi_wpack **wpack;

    levi_arena *arena[2]; /* per mode */
    /* last forward */
    int B, S, mode, can_backward;
    float p_hidden, p_attn;
    float **hs; /* [L+1] */
    int32_t *ids, *mask, *types;
    float *scratch; /* attention scratch (levi_attention_scratch_floats) */
    size_t scratch_floats;
    int chunk_seqs; /* inference: sequences per chunk, as the scratch was sized */
    /* train mode only */
    bert_layer_acts *acts; /* [L] */
    float *emb_sum, *emb_mean, *emb_rstd, *emb_dmask;
    float *tmp;                              /* [N,H] forward temporary */
    float *g, *t1, *t2, *dctx, *dqkv, *dint; /* backward buffers */
    /* LoRA */
    levi_bert_lora_params lora;
    int has_lora, lora_merged;
    float lora_scale;                   /* alpha / r */
    float *lora_eff[BERT_LORA_TARGETS]; /* [L][out,in] W + s B A for attention.output,
                                           intermediate and output targets (Q, K, V live in
                                           the packed copy); NULL when not a target */
    float *lora_tmp;                    /* backward scratch: 2 [N, r] */
    size_t lora_tmp_floats;
};

static void bert_name(char *buf, size_t cap, int layer, const char *suffix) {
    int n = snprintf(buf, cap, "encoder.layer.%d.%s", layer, suffix);
    LEVI_ASSERT(n > 0 && (size_t)n < cap, "parameter name too long");
}

/* Registers every tensor (in checkpoint order: embeddings, then layer by layer) without
 * allocating their storage (bert_alloc does). The config is already validated. */
static levi_bert *bert_register(const levi_bert_config *cfg) {
    levi_bert *m = levi_xcalloc(1, sizeof *m);
    m->cfg = *cfg;
    const int64_t H = cfg->hidden, I = cfg->intermediate, L = cfg->layers;
    levi_params *p = &m->params;
    levi_params_init(p);
    int64_t shp[2];
#define BERT_ADD2(name, r, c) (shp[0] = (r), shp[1] = (c), levi_params_add(p, name, 2, shp))
#define BERT_ADD1(name, r) (shp[0] = (r), levi_params_add(p, name, 1, shp))
    m->word = BERT_ADD2("embeddings.word_embeddings.weight", cfg->vocab, H);
    m->pos = BERT_ADD2("embeddings.position_embeddings.weight", cfg->max_pos, H);
    m->type = BERT_ADD2("embeddings.token_type_embeddings.weight", cfg->type_vocab, H);
    m->eln_w = BERT_ADD1("embeddings.LayerNorm.weight", H);
    m->eln_b = BERT_ADD1("embeddings.LayerNorm.bias", H);
    m->li = levi_xcalloc((size_t)L, sizeof *m->li);
    char nm[LEVI_NAME_MAX];
    for (int l = 0; l < L; l++) {
        bert_layer_idx *x = &m->li[l];
        for (int t = 0; t < BERT_LORA_TARGETS; t++) x->lora_a[t] = x->lora_b[t] = -1;
#define BERT_L2(field, suffix, r, c)                                                               \
    (bert_name(nm, sizeof nm, l, suffix), x->field = BERT_ADD2(nm, r, c))
#define BERT_L1(field, suffix, r) (bert_name(nm, sizeof nm, l, suffix), x->field = BERT_ADD1(nm, r))
        BERT_L2(q_w, "attention.self.query.weight", H, H);
        BERT_L1(q_b, "attention.self.query.bias", H);
        BERT_L2(k_w, "attention.self.key.weight", H, H);
        BERT_L1(k_b, "attention.self.key.bias", H);
        BERT_L2(v_w, "attention.self.value.weight", H, H);
        BERT_L1(v_b, "attention.self.value.bias", H);
        BERT_L2(o_w, "attention.output.dense.weight", H, H);
        BERT_L1(o_b, "attention.output.dense.bias", H);
        BERT_L1(ln1_w, "attention.output.LayerNorm.weight", H);
        BERT_L1(ln1_b, "attention.output.LayerNorm.bias", H);
        BERT_L2(i_w, "intermediate.dense.weight", I, H);
        BERT_L1(i_b, "intermediate.dense.bias", I);
        BERT_L2(f_w, "output.dense.weight", H, I);
        BERT_L1(f_b, "output.dense.bias", H);
        BERT_L1(ln2_w, "output.LayerNorm.weight", H);
        BERT_L1(ln2_b, "output.LayerNorm.bias", H);
#undef BERT_L1
#undef BERT_L2
    }
#undef BERT_ADD1
#undef BERT_ADD2
    m->hs = levi_xcalloc((size_t)L + 1, sizeof *m->hs);
    m->acts = levi_xcalloc((size_t)L, sizeof *m->acts);
    return m;
}

/* Parameter storage and the packed QKV copy. */
static void bert_alloc(levi_bert *m) {
    const size_t H = (size_t)m->cfg.hidden, L = (size_t)m->cfg.layers;
    levi_params *p = &m->params;
    levi_params_alloc(p);
    // Weight decay skips biases and norms (and, as usual for BERT, nothing else).
    for (int i = 0; i < p->count; i++) {
        const char *n = p->items[i].name;
        size_t len = strlen(n);
        p->items[i].no_decay =
            (len >= 5 && strcmp(n + len - 5, ".bias") == 0) || strstr(n, "LayerNorm.") != NULL;
    }
    m->qkv_w = levi_xmalloc(L * 3 * H * H * sizeof(float));
    m->qkv_b = levi_xmalloc(L * 3 * H * sizeof(float));
}

void levi_bert_free(levi_bert *m) {
    if (!m) return;
    levi_params_free(&m->params);
    levi_arena_free(m->arena[0]);
    levi_arena_free(m->arena[1]);
    levi_free(m->qkv_w);
    levi_free(m->qkv_b);
    if (m->wpack)
        for (int i = 0; i < BERT_WPACKS; i++) levi_wpack_free(m->wpack[i]);
    levi_free(m->wpack);
    for (int t = 0; t < BERT_LORA_TARGETS; t++) levi_free(m->lora_eff[t]);
    levi_free(m->lora_tmp);
    free(m->li);
    free(m->hs);
    free(m->acts);
    free(m);
}

const levi_bert_config *levi_bert_get_config(const levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    return &m->cfg;
}

levi_params *levi_bert_params(levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    return &m->params;
}

levi_bert *levi_bert_init_random(const levi_bert_config *cfg, levi_rng *rng, levi_error *err) {
    LEVI_ASSERT(cfg != NULL && rng != NULL, "levi_bert_init_random needs a config and an rng");
    if (levi_bert_config_validate(cfg, "config", err) != LEVI_OK) return NULL;
    levi_bert *m = bert_register(cfg);
    bert_alloc(m);
    levi_params *p = &m->params;
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        float *d = p->data + it->offset;
        const char *n = it->name;
        size_t len = strlen(n);
        if (strstr(n, "LayerNorm.weight")) {
            for (size_t j = 0; j < it->numel; j++) d[j] = 1.0f;
        } else if (len >= 5 && strcmp(n + len - 5, ".bias") == 0) {
            memset(d, 0, it->numel * sizeof(float));
        } else {
            for (size_t j = 0; j < it->numel; j++) d[j] = cfg->init_range * levi_rng_normal(rng);
        }
    }
    if (cfg->pad_token_id >= 0 && cfg->pad_token_id < cfg->vocab)
        memset(levi_params_data(p, m->word) + (size_t)cfg->pad_token_id * cfg->hidden, 0,
               (size_t)cfg->hidden * sizeof(float));
    return m;
}

static void bert_shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t at = 0;
    at += (size_t)snprintf(buf + at, cap - at, "[");
    for (int d = 0; d < ndim && at < cap; d++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (at < cap) snprintf(buf + at, cap - at, "]");
}

levi_bert *levi_bert_open(const char *model_dir, levi_error *err) {
    LEVI_ASSERT(model_dir != NULL, "levi_bert_open needs a folder");
    char cfg_path[4096], st_path[4096];
    if ((size_t)snprintf(cfg_path, sizeof cfg_path, "%s/config.json", model_dir) >=
            sizeof cfg_path ||
        (size_t)snprintf(st_path, sizeof st_path, "%s/model.safetensors", model_dir) >=
            sizeof st_path) {
        levi_errorf(err, LEVI_ERR_ARG, "model folder path too long: %.200s...", model_dir);
        return NULL;
    }
    levi_bert_config cfg;
    if (levi_bert_config_load(cfg_path, &cfg, err) != LEVI_OK) return NULL;
    struct stat sb;
    if (stat(st_path, &sb) != 0) {
        levi_errorf(err, LEVI_ERR_IO,
                    "%s: not found (levi reads only the safetensors form of a checkpoint; "
                    "convert pytorch_model.bin with safetensors.torch.save_file)",
                    st_path);
        return NULL;
    }
    levi_st_file *f = levi_st_open(st_path, err);
    if (!f) return NULL;
    // Names and shapes are checked against the file before anything is allocated: a config
    // that asks for a huge table fails here, not in the allocator.
    levi_bert *m = bert_register(&cfg);
    levi_params *p = &m->params;
    char alt[LEVI_NAME_MAX + 8];
    const char **found = levi_xcalloc((size_t)p->count, sizeof *found);
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        const char *name = it->name;
        const levi_tensor *t = levi_st_find(f, name);
        if (!t) {
            snprintf(alt, sizeof alt, "bert.%s", it->name);
            t = levi_st_find(f, alt);
            name = alt;
        }
        if (!t) {
            levi_errorf(err, LEVI_ERR_NOT_FOUND,
                        "%s: tensor '%s' (or 'bert.%s') not found; config.json describes a "
                        "BERT with %d layers",
                        st_path, it->name, it->name, cfg.layers);
            goto fail;
        }
        int same = t->ndim == it->ndim;
        for (int d = 0; same && d < it->ndim; d++) same = t->shape[d] == it->shape[d];
        if (!same) {
            char want[96], found[96];
            bert_shape_str(want, sizeof want, it->ndim, it->shape);
            bert_shape_str(found, sizeof found, t->ndim, t->shape);
            levi_errorf(err, LEVI_ERR_SHAPE,
                        "%s: tensor '%s': expected shape %s (from config.json), found %s", st_path,
                        name, want, found);
            goto fail;
        }
        found[i] = t->name;
    }
    bert_alloc(m);
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        if (levi_st_read_f32(f, found[i], it->ndim, it->shape, p->data + it->offset, err) !=
            LEVI_OK)
            goto fail;
    }
    free(found);
    levi_st_close(f);
    return m;
fail:
    free(found);
    levi_st_close(f);
    levi_bert_free(m);
    return NULL;
}

void levi_bert_freeze_layers(levi_bert *m, int first, int last) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    LEVI_ASSERT(first >= 0 && first <= last && last < m->cfg.layers,
                "freeze_layers: need 0 <= first <= last < layers");
    char prefix[64];
    for (int l = first; l <= last; l++) {
        // The trailing dot keeps layer 1 from matching layers 10..19.
        snprintf(prefix, sizeof prefix, "encoder.layer.%d.", l);
        levi_params_set_trainable(&m->params, prefix, 0);
    }
}

void levi_bert_freeze_embeddings(levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    levi_params_set_trainable(&m->params, "embeddings.", 0);
}

/* ----------------------------------------------------------------------------------------
 * Arenas. One layout function serves both the sizing (base NULL) and the carving, so the two
 * cannot disagree. */

typedef struct {
    char *base;
    size_t off;
    int overflow;
} bert_carver;

static void *bert_carve(bert_carver *c, size_t count, size_t elem) {
    size_t bytes;
    size_t start = (c->off + 63) & ~(size_t)63;
    if (!levi_mul_size(count, elem, &bytes) || !levi_add_size(start, bytes, &c->off)) {
        c->overflow = 1;
        c->off = SIZE_MAX / 2;
        return NULL;
    }
    return c->base ? c->base + start : NULL;
}
#define BERT_FLOATS(c, n) ((float *)bert_carve((c), (n), sizeof(float)))

typedef struct {
    int B, S, threads, train, hidden_dropout;
} bert_layout_key;

/* Inference runs each layer over chunks of whole sequences, so its scratch (QKV, attention
 * output, FFN activations) stays bounded whatever the batch. With the weights packed once per
 * layer (levi_wpack on oneDNN), chunks of 256 tokens per thread keep a chunk's activations in
 * L2 between the products: measured 1-2% faster than 8,192 tokens at 1 and at 2 threads
 * (MiniLM, 64 x 64; 256 tokens at 2 threads was ~1% slower than 512). With sgemm, which
 * re-packs the weights for every product, 512-token chunks raised that packing from 0.6% to
 * 5% of a forward, so the OpenBLAS back end keeps large chunks. */
#define BERT_CHUNK_TOKENS_PACKED 256 /* per thread */
#define BERT_CHUNK_TOKENS_SGEMM 8192

static int bert_chunk_seqs(int B, int S, int threads) {
    const int packed = !strcmp(levi_gemm_backend(), "onednn");
    int n = (packed ? BERT_CHUNK_TOKENS_PACKED * threads : BERT_CHUNK_TOKENS_SGEMM) / S;
    n = n < 1 ? 1 : n;
    return n < B ? n : B;
}

/* Carves the buffers of one mode; with m == NULL only sizes. Returns bytes (SIZE_MAX on
 * overflow). */
static size_t bert_layout(levi_bert *m, const levi_bert_config *cfg, bert_layout_key k,
                          char *base) {
    bert_carver c = {base, 0, 0};
    const size_t N = (size_t)k.B * (size_t)k.S, H = (size_t)cfg->hidden;
    const size_t I = (size_t)cfg->intermediate, L = (size_t)cfg->layers;
    const size_t HD = H / (size_t)cfg->heads;
    const size_t PS = (size_t)k.B * (size_t)cfg->heads * (size_t)k.S * (size_t)k.S;
    int32_t *ids = bert_carve(&c, N, sizeof(int32_t));
    int32_t *mask = bert_carve(&c, N, sizeof(int32_t));
    int32_t *types = bert_carve(&c, N, sizeof(int32_t));
    const size_t scratch_floats =
        levi_attention_scratch_floats(k.S, cfg->heads, (int)HD, k.threads);
    float *scratch = BERT_FLOATS(&c, scratch_floats);
    for (size_t l = 0; l <= L; l++) {
        float *h = BERT_FLOATS(&c, N * H);
        if (m) m->hs[l] = h;
    }
    if (m) {
        m->ids = ids, m->mask = mask, m->types = types, m->scratch = scratch;
        m->scratch_floats = scratch_floats;
    }
    if (!k.train) {
        // Inference: scratch for one chunk of sequences of one layer, reused by all.
        const int cb = bert_chunk_seqs(k.B, k.S, k.threads);
        const size_t R = (size_t)cb * (size_t)k.S;
        float *qkv = BERT_FLOATS(&c, R * 3 * H);
        float *ctx = BERT_FLOATS(&c, R * H);
        float *a = BERT_FLOATS(&c, R * H);
        float *inter = BERT_FLOATS(&c, R * I);
        if (m) {
            bert_layer_acts *x = &m->acts[0];
            memset(x, 0, sizeof *x);
            x->qkv = qkv, x->ctx = ctx, x->a = a, x->pre = inter;
            m->chunk_seqs = cb; // what the scratch was sized for
        }
    } else {
        float *emb_sum = BERT_FLOATS(&c, N * H);
        float *emb_mean = BERT_FLOATS(&c, N), *emb_rstd = BERT_FLOATS(&c, N);
        float *emb_dmask = k.hidden_dropout ? BERT_FLOATS(&c, N * H) : NULL;
        if (m) {
            m->emb_sum = emb_sum, m->emb_mean = emb_mean, m->emb_rstd = emb_rstd;
            m->emb_dmask = emb_dmask;
        }
        for (size_t l = 0; l < L; l++) {
            bert_layer_acts x;
            x.qkv = BERT_FLOATS(&c, N * 3 * H);
            x.probs = BERT_FLOATS(&c, PS);
            x.attn_seed = 0;
            x.ctx = BERT_FLOATS(&c, N * H);
            x.dmask1 = k.hidden_dropout ? BERT_FLOATS(&c, N * H) : NULL;
            x.res1 = BERT_FLOATS(&c, N * H);
            x.mean1 = BERT_FLOATS(&c, N), x.rstd1 = BERT_FLOATS(&c, N);
            x.a = BERT_FLOATS(&c, N * H);
            x.pre = BERT_FLOATS(&c, N * I);
            x.act = BERT_FLOATS(&c, N * I);
            x.dmask2 = k.hidden_dropout ? BERT_FLOATS(&c, N * H) : NULL;
            x.res2 = BERT_FLOATS(&c, N * H);
            x.mean2 = BERT_FLOATS(&c, N), x.rstd2 = BERT_FLOATS(&c, N);
            if (m) m->acts[l] = x;
        }
        float *tmp = BERT_FLOATS(&c, N * H);
        float *g = BERT_FLOATS(&c, N * H), *t1 = BERT_FLOATS(&c, N * H);
        float *t2 = BERT_FLOATS(&c, N * H), *dctx = BERT_FLOATS(&c, N * H);
        float *dqkv = BERT_FLOATS(&c, N * 3 * H), *dint = BERT_FLOATS(&c, N * I);
        if (m) {
            m->tmp = tmp, m->g = g, m->t1 = t1, m->t2 = t2;
            m->dctx = dctx, m->dqkv = dqkv, m->dint = dint;
        }
    }
    return c.overflow ? SIZE_MAX : c.off + 64;
}

size_t levi_bert_train_arena_bytes(const levi_bert_config *cfg, int B, int S, int hidden_dropout,
                                   int attn_dropout, int threads) {
    LEVI_ASSERT(cfg && B > 0 && S > 0 && threads > 0, "train_arena_bytes: bad arguments");
    (void)attn_dropout; // its decisions are recomputed in backward, never stored
    bert_layout_key k = {B, S, threads, 1, hidden_dropout != 0};
    return bert_layout(NULL, cfg, k, NULL);
}

size_t levi_bert_infer_arena_bytes(const levi_bert_config *cfg, int B, int S, int threads) {
    LEVI_ASSERT(cfg && B > 0 && S > 0 && threads > 0, "infer_arena_bytes: bad arguments");
    bert_layout_key k = {B, S, threads, 0, 0};
    return bert_layout(NULL, cfg, k, NULL);
}

/* ----------------------------------------------------------------------------------------
 * Forward */

levi_bert_forward_params levi_bert_default_forward_params(void) {
    levi_bert_forward_params p = {LEVI_BERT_INFER, -1.0f, -1.0f, NULL};
    return p;
}

/* Base weight index of LoRA target t in layer l, and its [out, in] shape. */
static int bert_target_weight(const bert_layer_idx *x, int t) {
    const int w[BERT_LORA_TARGETS] = {x->q_w, x->k_w, x->v_w, x->o_w, x->i_w, x->f_w};
    return w[t];
}

static void bert_target_shape(const levi_bert_config *c, int t, int *out, int *in) {
    *out = t == BERT_T_I ? c->intermediate : c->hidden;
    *in = t == BERT_T_F ? c->intermediate : c->hidden;
}

/* 1 when the forward adds target t's LoRA update (present and not merged into W). */
static int bert_lora_live(const levi_bert *m, int t) {
    return m->has_lora && !m->lora_merged && (m->lora.targets & (1u << t));
}

/* W[out,in] += scale * B[out,r] A[r,in] */
static void bert_lora_delta(const levi_bert *m, int l, int t, float scale, float *W) {
    const bert_layer_idx *x = &m->li[l];
    int out, in;
    bert_target_shape(&m->cfg, t, &out, &in);
    levi_gemm(0, 0, out, in, m->lora.rank, scale, levi_params_data(&m->params, x->lora_b[t]),
              m->lora.rank, levi_params_data(&m->params, x->lora_a[t]), in, 1.0f, W, in);
}

/* The weight the forward multiplies by for the attention-output, intermediate and output
 * targets: the effective copy W + s B A when LoRA is live there, else the parameter. */
static const float *bert_w(const levi_bert *m, int l, int t) {
    if (bert_lora_live(m, t)) {
        int out, in;
        bert_target_shape(&m->cfg, t, &out, &in);
        return m->lora_eff[t] + (size_t)l * out * in;
    }
    return levi_params_data(&m->params, bert_target_weight(&m->li[l], t));
}

/* Refreshes the packed [3H, H] query|key|value weights and [3H] biases of every layer, and
 * the effective LoRA copies, from the parameter table (every forward: never stale). */
static void bert_pack_qkv(levi_bert *m) {
    const size_t H = (size_t)m->cfg.hidden;
    const levi_params *p = &m->params;
    for (int l = 0; l < m->cfg.layers; l++) {
        const bert_layer_idx *x = &m->li[l];
        float *w = m->qkv_w + (size_t)l * 3 * H * H, *b = m->qkv_b + (size_t)l * 3 * H;
        const int wi[3] = {x->q_w, x->k_w, x->v_w}, bi[3] = {x->q_b, x->k_b, x->v_b};
        for (int j = 0; j < 3; j++) {
            memcpy(w + j * H * H, levi_params_data(p, wi[j]), H * H * sizeof(float));
            memcpy(b + j * H, levi_params_data(p, bi[j]), H * sizeof(float));
            if (bert_lora_live(m, j)) bert_lora_delta(m, l, j, m->lora_scale, w + j * H * H);
        }
        for (int t = BERT_T_O; t < BERT_LORA_TARGETS; t++) {
            if (!bert_lora_live(m, t)) continue;
            int out, in;
            bert_target_shape(&m->cfg, t, &out, &in);
            float *e = m->lora_eff[t] + (size_t)l * out * in;
            memcpy(e, levi_params_data(p, bert_target_weight(x, t)),
                   (size_t)out * in * sizeof(float));
            bert_lora_delta(m, l, t, m->lora_scale, e);
        }
    }
}

/* Attention over nb sequences whose Q, K, V sit side by side in the packed [N, 3H] qkv
 * buffer (row stride 3H), into ctx [N, H]; dropout p on the probabilities. */
static levi_attention_params bert_attn_params(const levi_bert *m, int nb, float p) {
    const int H = m->cfg.hidden;
    levi_attention_params a =
        levi_attention_default_params(nb, m->S, m->cfg.heads, H / m->cfg.heads);
    a.ldq = a.ldk = a.ldv = 3 * H;
    a.dropout = p;
    return a;
}

/* The part of a layer both modes share up to the attention output: qkv, then ctx.
 * Sequences [b0, b0 + nb) of the batch; x, qkv, ctx point at those rows. probs, rng and seed
 * as levi_attention_forward takes them (train mode), or NULL (inference). */
static void bert_attention_block(levi_bert *m, int l, int b0, int nb, const float *x, float *qkv,
                                 float *ctx, float *probs, float p_attn, levi_rng *rng,
                                 uint64_t *seed) {
    const levi_bert_config *c = &m->cfg;
    const int N = nb * m->S, H = c->hidden;
    const float *bias = m->qkv_b + (size_t)l * 3 * H;
    levi_attention_params ap = bert_attn_params(m, nb, p_attn);
    const int train = probs || p_attn > 0.0f;
    if (train) { // training keeps q, k, v with their biases for the backward pass
        bert_fill_rows(qkv, NULL, bias, N, 3 * H);
        levi_gemm(0, 1, N, 3 * H, H, 1.0f, x, H, m->qkv_w + (size_t)l * 3 * H * H, H, 1.0f, qkv,
                  3 * H);
    } else { // inference: the attention adds the biases as it reads the rows
        ap.bias = bias;
        levi_wpack_gemm(m->wpack[BERT_WP_QKV], N, x, 0.0f, qkv); // packed for layer l
    }
    levi_attention_forward(ctx, probs, seed, qkv, qkv + H, qkv + 2 * H, m->mask + (size_t)b0 * m->S,
                           ap, rng, m->scratch, m->scratch_floats);
}

/* Packs layer l's four products for the inference forward (levi_wpack) from the weights as
 * they are now: qkv, attention output, intermediate, output. One set serves every layer, and
 * repacking just before the layer's products leaves the packed copy in cache for them:
 * measured ~0.5% of a 64 x 64 batch, and a weight update can never be missed. */
static void bert_wpack_layer(levi_bert *m, int l) {
    const levi_bert_config *c = &m->cfg;
    const int H = c->hidden, I = c->intermediate;
    if (!m->wpack) {
        m->wpack = levi_xmalloc(BERT_WPACKS * sizeof *m->wpack);
        m->wpack[BERT_WP_QKV] = levi_wpack_new(3 * H, H);
        m->wpack[BERT_WP_O] = levi_wpack_new(H, H);
        m->wpack[BERT_WP_I] = levi_wpack_new(I, H);
        m->wpack[BERT_WP_F] = levi_wpack_new(H, I);
    }
    levi_wpack_set(m->wpack[BERT_WP_QKV], m->qkv_w + (size_t)l * 3 * H * H);
    levi_wpack_set(m->wpack[BERT_WP_O], bert_w(m, l, BERT_T_O));
    levi_wpack_set(m->wpack[BERT_WP_I], bert_w(m, l, BERT_T_I));
    levi_wpack_set(m->wpack[BERT_WP_F], bert_w(m, l, BERT_T_F));
}

static void bert_forward_infer(levi_bert *m) {
    const levi_bert_config *c = &m->cfg;
    const levi_params *p = &m->params;
    const int H = c->hidden, S = m->S;
    const int cb = m->chunk_seqs;
    bert_layer_acts *w = &m->acts[0];
    // Layer-major: one layer's weights stay in cache while its chunks stream through.
    for (int l = 0; l < c->layers; l++) {
        bert_wpack_layer(m, l);
        for (int b0 = 0; b0 < m->B; b0 += cb) {
            const int nb = m->B - b0 < cb ? m->B - b0 : cb, N = nb * S;
            const bert_layer_idx *x = &m->li[l];
            const float *in = m->hs[l] + (size_t)b0 * S * H;
            float *out = m->hs[l + 1] + (size_t)b0 * S * H;
            levi_wpack **wp = m->wpack;
            bert_attention_block(m, l, b0, nb, in, w->qkv, w->ctx, NULL, 0.0f, NULL, NULL);
            // a = LN(ctx Wo^T + (in + bo)), out = LN(gelu(a Wi^T + bi) Wf^T + (a + bf))
            levi_wpack_gemm(wp[BERT_WP_O], N, w->ctx, 0.0f, w->a);
            bert_res_layernorm(w->a, in, levi_params_data(p, x->o_b), levi_params_data(p, x->ln1_w),
                               levi_params_data(p, x->ln1_b), N, H, c->eps);
            levi_wpack_gemm(wp[BERT_WP_I], N, w->a, 0.0f, w->pre);
            levi_bias_gelu_forward(w->pre, w->pre, levi_params_data(p, x->i_b), N, c->intermediate);
            levi_wpack_gemm(wp[BERT_WP_F], N, w->pre, 0.0f, out);
            bert_res_layernorm(out, w->a, levi_params_data(p, x->f_b),
                               levi_params_data(p, x->ln2_w), levi_params_data(p, x->ln2_b), N, H,
                               c->eps);
        }
    }
}

static void bert_forward_train(levi_bert *m, levi_rng *rng) {
    const levi_bert_config *c = &m->cfg;
    const levi_params *p = &m->params;
    const int N = m->B * m->S, H = c->hidden, I = c->intermediate;
    const float ph = m->p_hidden;
    for (int l = 0; l < c->layers; l++) {
        const bert_layer_idx *x = &m->li[l];
        bert_layer_acts *s = &m->acts[l];
        const float *in = m->hs[l];
        float *out = m->hs[l + 1];
        bert_attention_block(m, l, 0, m->B, in, s->qkv, s->ctx, s->probs, m->p_attn, rng,
                             &s->attn_seed);
        if (s->dmask1) {
            bert_fill_rows(m->tmp, NULL, levi_params_data(p, x->o_b), N, H);
            levi_gemm(0, 1, N, H, H, 1.0f, s->ctx, H, bert_w(m, l, BERT_T_O), H, 1.0f, m->tmp, H);
            levi_dropout_forward(m->tmp, s->dmask1, m->tmp, (int64_t)N * H, ph, rng);
            bert_add_layernorm(s->a, s->res1, s->mean1, s->rstd1, in, m->tmp,
                               levi_params_data(p, x->ln1_w), levi_params_data(p, x->ln1_b), N, H,
                               c->eps);
        } else {
            bert_fill_rows(s->res1, in, levi_params_data(p, x->o_b), N, H);
            levi_gemm(0, 1, N, H, H, 1.0f, s->ctx, H, bert_w(m, l, BERT_T_O), H, 1.0f, s->res1, H);
            bert_add_layernorm(s->a, NULL, s->mean1, s->rstd1, s->res1, NULL,
                               levi_params_data(p, x->ln1_w), levi_params_data(p, x->ln1_b), N, H,
                               c->eps);
        }
        levi_gemm(0, 1, N, I, H, 1.0f, s->a, H, bert_w(m, l, BERT_T_I), H, 0.0f, s->pre, I);
        levi_bias_gelu_forward(s->act, s->pre, levi_params_data(p, x->i_b), N, I);
        if (s->dmask2) {
            bert_fill_rows(m->tmp, NULL, levi_params_data(p, x->f_b), N, H);
            levi_gemm(0, 1, N, H, I, 1.0f, s->act, I, bert_w(m, l, BERT_T_F), I, 1.0f, m->tmp, H);
            levi_dropout_forward(m->tmp, s->dmask2, m->tmp, (int64_t)N * H, ph, rng);
            bert_add_layernorm(out, s->res2, s->mean2, s->rstd2, s->a, m->tmp,
                               levi_params_data(p, x->ln2_w), levi_params_data(p, x->ln2_b), N, H,
                               c->eps);
        } else {
            bert_fill_rows(s->res2, s->a, levi_params_data(p, x->f_b), N, H);
            levi_gemm(0, 1, N, H, I, 1.0f, s->act, I, bert_w(m, l, BERT_T_F), I, 1.0f, s->res2, H);
            bert_add_layernorm(out, NULL, s->mean2, s->rstd2, s->res2, NULL,
                               levi_params_data(p, x->ln2_w), levi_params_data(p, x->ln2_b), N, H,
                               c->eps);
        }
    }
}

levi_status levi_bert_forward(levi_bert *m, const int32_t *ids, const int32_t *mask,
                              const int32_t *types, int B, int S,
                              const levi_bert_forward_params *params, levi_error *err) {
    LEVI_ASSERT(m != NULL && ids != NULL, "levi_bert_forward needs a model and ids");
    const levi_bert_config *c = &m->cfg;
    levi_bert_forward_params fp = params ? *params : levi_bert_default_forward_params();
    const int train = fp.mode == LEVI_BERT_TRAIN;
    m->can_backward = 0;
    if (B < 1 || S < 1)
        return levi_errorf(err, LEVI_ERR_SHAPE, "bert forward: batch %d x %d: expected >= 1 x 1", B,
                           S);
    if (S > c->max_pos)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "bert forward: sequence length %d exceeds max_position_embeddings %d", S,
                           c->max_pos);
    if ((int64_t)B * S *
            (3 * (int64_t)c->hidden > c->intermediate ? 3 * (int64_t)c->hidden : c->intermediate) >
        INT_MAX)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "bert forward: batch %d x %d is too large for one call; split it", B, S);
    for (int64_t n = 0; n < (int64_t)B * S; n++) {
        if (ids[n] < 0 || ids[n] >= c->vocab)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: token id %d at [%lld][%lld] is outside the "
                               "vocabulary [0, %d)",
                               ids[n], (long long)(n / S), (long long)(n % S), c->vocab);
        if (types && (types[n] < 0 || types[n] >= c->type_vocab))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: token type %d at [%lld][%lld] is outside [0, %d)",
                               types[n], (long long)(n / S), (long long)(n % S), c->type_vocab);
        if (mask && mask[n] != 0 && mask[n] != 1)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: attention mask %d at [%lld][%lld]: expected 0 or 1",
                               mask[n], (long long)(n / S), (long long)(n % S));
    }
    float ph = 0.0f, pa = 0.0f;
    if (train) {
        ph = fp.hidden_dropout < 0.0f ? c->hidden_dropout : fp.hidden_dropout;
        pa = fp.attn_dropout < 0.0f ? c->attn_dropout : fp.attn_dropout;
        if (!(ph < 1.0f) || !(pa < 1.0f))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: dropout probabilities %g, %g: expected [0, 1)",
                               (double)ph, (double)pa);
        LEVI_ASSERT(fp.rng != NULL || (ph == 0.0f && pa == 0.0f),
                    "train-mode forward with dropout needs params->rng");
    }
    bert_layout_key key = {B, S, bert_max_threads(), train, ph > 0.0f};
    size_t bytes = bert_layout(NULL, c, key, NULL);
    if (bytes == SIZE_MAX)
        return levi_errorf(err, LEVI_ERR_NOMEM, "bert forward: batch %d x %d overflows memory", B,
                           S);
    levi_arena **ar = &m->arena[train];
    if (!*ar || levi_arena_capacity(*ar) < bytes) {
        levi_arena_free(*ar);
        *ar = levi_arena_init(bytes);
    }
    levi_arena_reset(*ar);
    char *base = levi_arena_alloc(*ar, bytes - 64);
    bert_layout(m, c, key, base);
    m->B = B, m->S = S, m->mode = train, m->p_hidden = ph, m->p_attn = pa;

    const size_t N = (size_t)B * S;
    const int H = c->hidden;
    memcpy(m->ids, ids, N * sizeof(int32_t));
    if (mask)
        memcpy(m->mask, mask, N * sizeof(int32_t));
    else
        for (size_t n = 0; n < N; n++) m->mask[n] = 1;
    if (types)
        memcpy(m->types, types, N * sizeof(int32_t));
    else
        memset(m->types, 0, N * sizeof(int32_t));
    bert_pack_qkv(m);

    // Embeddings: word + position + type, then LayerNorm (and dropout in train mode).
    const levi_params *p = &m->params;
    const float *word = levi_params_data(p, m->word), *pos = levi_params_data(p, m->pos);
    const float *typ = levi_params_data(p, m->type);
    float *sum = train ? m->emb_sum : m->hs[0];
    BERT_OMP_FOR_IF((int64_t)N * H > BERT_PAR_MIN)
    for (size_t n = 0; n < N; n++) {
        const float *wr = word + (size_t)m->ids[n] * H, *pr = pos + (n % (size_t)S) * H;
        const float *tr = typ + (size_t)m->types[n] * H;
        float *o = sum + n * H;
        BERT_OMP_SIMD
        for (int i = 0; i < H; i++) o[i] = wr[i] + pr[i] + tr[i];
    }
    bert_add_layernorm(m->hs[0], NULL, train ? m->emb_mean : NULL, train ? m->emb_rstd : NULL, sum,
                       NULL, levi_params_data(p, m->eln_w), levi_params_data(p, m->eln_b),
                       (int64_t)N, H, c->eps);
    if (train) {
        if (m->emb_dmask)
            levi_dropout_forward(m->hs[0], m->emb_dmask, m->hs[0], (int64_t)N * H, ph, fp.rng);
        bert_forward_train(m, fp.rng);
        m->can_backward = 1;
    } else {
        bert_forward_infer(m);
    }
    return LEVI_OK;
}

const float *levi_bert_hidden(const levi_bert *m, int layer) {
    LEVI_ASSERT(m != NULL && m->B > 0, "levi_bert_hidden before any forward");
    LEVI_ASSERT(layer >= 0 && layer <= m->cfg.layers, "hidden state index out of [0, layers]");
    return m->hs[layer];
}

void levi_bert_last_shape(const levi_bert *m, int *B, int *S) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    if (B) *B = m->B;
    if (S) *S = m->S;
}

void levi_bert_meanpool(const levi_bert *m, int layer, float *out) {
    const float *h = levi_bert_hidden(m, layer);
    levi_meanpool_forward(out, h, m->mask, m->B, m->S, m->cfg.hidden);
}

/* ----------------------------------------------------------------------------------------
 * Backward */

static int bert_tr(const levi_bert *m, int idx) {
    return m->params.items[idx].trainable;
}

static float *bert_grad_if(levi_bert *m, int idx) {
    return bert_tr(m, idx) ? levi_params_grad(&m->params, idx) : NULL;
}

/* 1 when layer l's LoRA tensors of target t exist and one of them is trainable. */
static int bert_lora_tr(const levi_bert *m, int l, int t) {
    const bert_layer_idx *x = &m->li[l];
    return x->lora_a[t] >= 0 && (bert_tr(m, x->lora_a[t]) || bert_tr(m, x->lora_b[t]));
}

static int bert_layer_trainable(const levi_bert *m, int l) {
    const bert_layer_idx *x = &m->li[l];
    for (int t = 0; t < BERT_LORA_TARGETS; t++)
        if (bert_lora_tr(m, l, t)) return 1;
    const int idx[] = {x->q_w,   x->q_b,   x->k_w, x->k_b, x->v_w, x->v_b, x->o_w,   x->o_b,
                       x->ln1_w, x->ln1_b, x->i_w, x->i_b, x->f_w, x->f_b, x->ln2_w, x->ln2_b};
    for (size_t i = 0; i < sizeof idx / sizeof idx[0]; i++)
        if (bert_tr(m, idx[i])) return 1;
    return 0;
}

/* dW[OC,C] += dY[N,OC]^T X[N,C] (when dW is given) and db[OC] += colsum(dY) (when given). */
static void bert_linear_wgrad(float *dW, float *db, const float *dY, int ldy, const float *X,
                              int ldx, int N, int OC, int C) {
    if (dW) levi_gemm(1, 0, OC, C, N, 1.0f, dY, ldy, X, ldx, 1.0f, dW, C);
    if (db) bert_colsum_add(db, dY, ldy, N, OC);
}

/* LoRA gradients of target t in layer l from its output gradient dY [N,out] (row stride ldy)
 * and input X [N,in] (row stride ldx): with T = X A^T [N,r] and U = dY B [N,r],
 * dB += s dY^T T and dA += s U^T X. Costs 2 N r (in + out), against N in out for a dense
 * dW; A and B are read from the table, so no merged copy is involved. */
static void bert_lora_wgrad(levi_bert *m, int l, int t, const float *dY, int ldy, const float *X,
                            int ldx, int N) {
    if (!bert_lora_tr(m, l, t)) return;
    const bert_layer_idx *x = &m->li[l];
    const int r = m->lora.rank;
    const float s = m->lora_scale;
    int out, in;
    bert_target_shape(&m->cfg, t, &out, &in);
    const size_t need = 2 * (size_t)N * (size_t)r;
    if (m->lora_tmp_floats < need) { // grows to the largest batch once, then is reused
        levi_free(m->lora_tmp);
        m->lora_tmp = levi_xmalloc(need * sizeof(float));
        m->lora_tmp_floats = need;
    }
    float *T = m->lora_tmp, *U = m->lora_tmp + (size_t)N * r;
    const float *A = levi_params_data(&m->params, x->lora_a[t]);
    const float *B = levi_params_data(&m->params, x->lora_b[t]);
    float *dA = bert_grad_if(m, x->lora_a[t]), *dB = bert_grad_if(m, x->lora_b[t]);
    if (dB) {
        levi_gemm(0, 1, N, r, in, 1.0f, X, ldx, A, in, 0.0f, T, r);
        levi_gemm(1, 0, out, r, N, s, dY, ldy, T, r, 1.0f, dB, r);
    }
    if (dA) {
        levi_gemm(0, 0, N, r, out, 1.0f, dY, ldy, B, r, 0.0f, U, r);
        levi_gemm(1, 0, r, in, N, s, U, r, X, ldx, 1.0f, dA, in);
    }
}

/* One encoder layer. g: dLoss/d output [N,H] (clobbered). When need_in, g receives dLoss/d
 * input (the layer's own contribution; the caller adds the given d_hidden). */
static void bert_layer_backward(levi_bert *m, int l, float *g, int need_in) {
    const levi_bert_config *c = &m->cfg;
    const levi_params *p = &m->params;
    const bert_layer_idx *x = &m->li[l];
    const bert_layer_acts *s = &m->acts[l];
    const int N = m->B * m->S, H = c->hidden, I = c->intermediate;
    const int64_t NH_ = (int64_t)N * H;
    const float *in = m->hs[l];
    float *t1 = m->t1, *t2 = m->t2;

    const int t_ln2 = bert_tr(m, x->ln2_w) || bert_tr(m, x->ln2_b);
    const int t_f = bert_tr(m, x->f_w) || bert_tr(m, x->f_b) || bert_lora_tr(m, l, BERT_T_F);
    const int t_i = bert_tr(m, x->i_w) || bert_tr(m, x->i_b) || bert_lora_tr(m, l, BERT_T_I);
    const int t_ln1 = bert_tr(m, x->ln1_w) || bert_tr(m, x->ln1_b);
    const int t_o = bert_tr(m, x->o_w) || bert_tr(m, x->o_b) || bert_lora_tr(m, l, BERT_T_O);
    const int t_qkv = bert_tr(m, x->q_w) || bert_tr(m, x->q_b) || bert_tr(m, x->k_w) ||
                      bert_tr(m, x->k_b) || bert_tr(m, x->v_w) || bert_tr(m, x->v_b) ||
                      bert_lora_tr(m, l, BERT_T_Q) || bert_lora_tr(m, l, BERT_T_K) ||
                      bert_lora_tr(m, l, BERT_T_V);
    // Which gradients are needed, from the bottom of the layer up.
    const int need_qkv = need_in || t_qkv;
    const int need_o_out = t_o || need_qkv;
    const int need_res1 = need_o_out || need_in;
    const int need_a = need_res1 || t_ln1;
    const int need_pre = t_i || need_a;
    const int need_f = t_f || need_pre;
    if (!(need_f || need_a || t_ln2)) return;

    // output.LayerNorm: t1 = d res2 (= d a residual part = d dropout2 output)
    memset(t1, 0, (size_t)NH_ * sizeof(float));
    levi_layernorm_backward(t1, bert_grad_if(m, x->ln2_w), bert_grad_if(m, x->ln2_b), g, s->res2,
                            levi_params_data(p, x->ln2_w), s->mean2, s->rstd2, N, H);
    if (!need_f && !need_a) return;
    // t2 = d a, starting with the residual path
    memcpy(t2, t1, (size_t)NH_ * sizeof(float));
    float *df = t1;
    if (s->dmask2) {
        BERT_OMP_FOR_IF(NH_ > BERT_PAR_MIN)
        for (int64_t i = 0; i < NH_; i++) t1[i] *= s->dmask2[i];
    }
    // output.dense: d act = df W2; dW2 += df^T act
    bert_linear_wgrad(bert_grad_if(m, x->f_w), bert_grad_if(m, x->f_b), df, H, s->act, I, N, H, I);
    bert_lora_wgrad(m, l, BERT_T_F, df, H, s->act, I, N);
    if (need_pre) {
        levi_gemm(0, 0, N, I, H, 1.0f, df, H, bert_w(m, l, BERT_T_F), I, 0.0f, m->dint, I);
        levi_gelu_backward_inplace(m->dint, s->pre, (int64_t)N * I);
        bert_linear_wgrad(bert_grad_if(m, x->i_w), bert_grad_if(m, x->i_b), m->dint, I, s->a, H, N,
                          I, H);
        bert_lora_wgrad(m, l, BERT_T_I, m->dint, I, s->a, H, N);
        if (need_a)
            levi_gemm(0, 0, N, H, I, 1.0f, m->dint, I, bert_w(m, l, BERT_T_I), H, 1.0f, t2, H);
    }
    if (!need_a) return;
    // attention.output.LayerNorm: t1 = d res1
    memset(t1, 0, (size_t)NH_ * sizeof(float));
    levi_layernorm_backward(t1, bert_grad_if(m, x->ln1_w), bert_grad_if(m, x->ln1_b), t2, s->res1,
                            levi_params_data(p, x->ln1_w), s->mean1, s->rstd1, N, H);
    if (!need_res1) return;
    if (need_in) memcpy(g, t1, (size_t)NH_ * sizeof(float)); // residual path to the input
    if (!need_o_out) return;
    float *dout = t1;
    if (s->dmask1) {
        BERT_OMP_FOR_IF(NH_ > BERT_PAR_MIN)
        for (int64_t i = 0; i < NH_; i++) t1[i] *= s->dmask1[i];
    }
    bert_linear_wgrad(bert_grad_if(m, x->o_w), bert_grad_if(m, x->o_b), dout, H, s->ctx, H, N, H,
                      H);
    bert_lora_wgrad(m, l, BERT_T_O, dout, H, s->ctx, H, N);
    if (!need_qkv) return;
    levi_gemm(0, 0, N, H, H, 1.0f, dout, H, bert_w(m, l, BERT_T_O), H, 0.0f, m->dctx, H);
    float *dqkv = m->dqkv;
    memset(dqkv, 0, (size_t)NH_ * 3 * sizeof(float)); // the kernel accumulates
    levi_attention_backward(dqkv, dqkv + H, dqkv + 2 * H, m->dctx, s->probs, s->attn_seed, s->qkv,
                            s->qkv + H, s->qkv + 2 * H, m->mask,
                            bert_attn_params(m, m->B, m->p_attn), m->scratch, m->scratch_floats);
    const int wi[3] = {x->q_w, x->k_w, x->v_w}, bi[3] = {x->q_b, x->k_b, x->v_b};
    for (int j = 0; j < 3; j++) {
        bert_linear_wgrad(bert_grad_if(m, wi[j]), bert_grad_if(m, bi[j]), dqkv + (size_t)j * H,
                          3 * H, in, H, N, H, H);
        bert_lora_wgrad(m, l, j, dqkv + (size_t)j * H, 3 * H, in, H, N);
    }
    if (need_in)
        levi_gemm(0, 0, N, H, 3 * H, 1.0f, dqkv, 3 * H, m->qkv_w + (size_t)l * 3 * H * H, H, 1.0f,
                  g, H);
}

void levi_bert_backward(levi_bert *m, const float *const *d_hidden, float *d_out, int d_out_layer) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    LEVI_ASSERT(m->can_backward, "levi_bert_backward needs a LEVI_BERT_TRAIN forward first");
    const levi_bert_config *c = &m->cfg;
    const int L = c->layers, H = c->hidden;
    LEVI_ASSERT(!d_out || (d_out_layer >= 0 && d_out_layer <= L), "d_out_layer out of [0, L]");
    const size_t NH_ = (size_t)m->B * m->S * H;
    int top = -1;
    for (int l = L; d_hidden && l >= 0; l--)
        if (d_hidden[l]) {
            top = l;
            break;
        }
    if (top < 0) return;
    // lowR: the lowest hidden state whose gradient anything needs.
    const int emb_tr = bert_tr(m, m->word) || bert_tr(m, m->pos) || bert_tr(m, m->type) ||
                       bert_tr(m, m->eln_w) || bert_tr(m, m->eln_b);
    int lowR = INT_MAX;
    if (emb_tr) lowR = 0;
    if (d_out && d_out_layer < lowR) lowR = d_out_layer;
    for (int l = 0; l < L && lowR > l + 1; l++)
        if (bert_layer_trainable(m, l)) lowR = l + 1;

    float *g = m->g;
    memcpy(g, d_hidden[top], NH_ * sizeof(float));
    int at = top; // g holds dLoss/d hidden[at]
    if (d_out && d_out_layer == top) {
        BERT_OMP_FOR_IF((int64_t)NH_ > BERT_PAR_MIN)
        for (size_t i = 0; i < NH_; i++) d_out[i] += g[i];
        d_out = NULL;
    }
    for (int l = top - 1; l >= 0; l--) { // layer l maps hidden[l] -> hidden[l+1]
        const int need_in = l >= lowR;
        if (!need_in && !bert_layer_trainable(m, l)) break;
        bert_layer_backward(m, l, g, need_in);
        if (!need_in) break;
        at = l;
        if (d_hidden[l]) {
            const float *dh = d_hidden[l];
            BERT_OMP_FOR_IF((int64_t)NH_ > BERT_PAR_MIN)
            for (size_t i = 0; i < NH_; i++) g[i] += dh[i];
        }
        if (d_out && d_out_layer == l) {
            BERT_OMP_FOR_IF((int64_t)NH_ > BERT_PAR_MIN)
            for (size_t i = 0; i < NH_; i++) d_out[i] += g[i];
            d_out = NULL;
        }
    }
    if (at != 0 || !emb_tr) return;
    // Embeddings: dropout, LayerNorm, then the three tables.
    const levi_params *p = &m->params;
    const size_t N = (size_t)m->B * m->S;
    if (m->emb_dmask)
        for (size_t i = 0; i < NH_; i++) g[i] *= m->emb_dmask[i];
    float *dsum = m->t1;
    memset(dsum, 0, NH_ * sizeof(float));
    levi_layernorm_backward(dsum, bert_grad_if(m, m->eln_w), bert_grad_if(m, m->eln_b), g,
                            m->emb_sum, levi_params_data(p, m->eln_w), m->emb_mean, m->emb_rstd,
                            (int64_t)N, H);
    float *dw = bert_grad_if(m, m->word), *dp = bert_grad_if(m, m->pos);
    float *dt = bert_grad_if(m, m->type);
    if (dw) // the pad_token_id row gets no gradient, as nn.Embedding(padding_idx=...) does
        for (size_t n = 0; n < N; n++) {
            if (m->ids[n] == c->pad_token_id) continue;
            float *r = dw + (size_t)m->ids[n] * H;
            const float *d = dsum + n * H;
            for (int i = 0; i < H; i++) r[i] += d[i];
        }
    if (dt) levi_embedding_backward(dt, dsum, m->types, (int64_t)N, c->type_vocab, H);
    if (dp)
        for (size_t n = 0; n < N; n++) {
            float *r = dp + (n % (size_t)m->S) * H;
            const float *d = dsum + n * H;
            for (int i = 0; i < H; i++) r[i] += d[i];
        }
}

/* ----------------------------------------------------------------------------------------
 * LoRA */

levi_bert_lora_params levi_bert_lora_default_params(void) {
    levi_bert_lora_params lp = {8, 8.0f, 0.0f, LEVI_LORA_QUERY | LEVI_LORA_VALUE};
    return lp;
}

levi_status levi_bert_lora_parse_targets(const char *list, unsigned *targets, levi_error *err) {
    LEVI_ASSERT(list != NULL && targets != NULL, "lora_parse_targets needs a list and an output");
    static const struct {
        const char *name;
        unsigned bits;
    } names[] = {
        {"query", LEVI_LORA_QUERY},
        {"attention.self.query", LEVI_LORA_QUERY},
        {"key", LEVI_LORA_KEY},
        {"attention.self.key", LEVI_LORA_KEY},
        {"value", LEVI_LORA_VALUE},
        {"attention.self.value", LEVI_LORA_VALUE},
        {"attn_output", LEVI_LORA_ATTN_OUTPUT},
        {"attention.output.dense", LEVI_LORA_ATTN_OUTPUT},
        {"intermediate", LEVI_LORA_INTERMEDIATE},
        {"intermediate.dense", LEVI_LORA_INTERMEDIATE},
        {"output", LEVI_LORA_OUTPUT},
        {"output.dense", LEVI_LORA_OUTPUT},
        {"all", 0x3f},
    };
    unsigned bits = 0;
    const char *at = list;
    while (*at) {
        const char *end = strchr(at, ',');
        size_t len = end ? (size_t)(end - at) : strlen(at);
        int found = 0;
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            if (strlen(names[i].name) == len && strncmp(names[i].name, at, len) == 0) {
                bits |= names[i].bits;
                found = 1;
            }
        if (!found)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "LoRA target \"%.*s\" is unknown (expected query, key, value, "
                               "attn_output, intermediate, output or all, comma-separated)",
                               (int)len, at);
        at += len;
        if (*at == ',') at++;
    }
    if (!bits)
        return levi_errorf(err, LEVI_ERR_ARG, "LoRA target list \"%s\" names no target", list);
    *targets = bits;
    return LEVI_OK;
}

size_t levi_bert_lora_param_count(const levi_bert_config *c, const levi_bert_lora_params *lp) {
    LEVI_ASSERT(c != NULL && lp != NULL, "lora_param_count needs a config and params");
    size_t per_layer = 0;
    for (int t = 0; t < BERT_LORA_TARGETS; t++) {
        if (!(lp->targets & (1u << t))) continue;
        int out, in;
        bert_target_shape(c, t, &out, &in);
        per_layer += (size_t)lp->rank * ((size_t)in + (size_t)out);
    }
    return per_layer * (size_t)c->layers;
}

levi_status levi_bert_lora_add(levi_bert *m, const levi_bert_lora_params *lp, levi_rng *rng,
                               levi_error *err) {
    LEVI_ASSERT(m != NULL && lp != NULL && rng != NULL, "lora_add needs a model, params and rng");
    LEVI_ASSERT(!m->has_lora, "levi_bert_lora_add: this model already has LoRA");
    const levi_bert_config *c = &m->cfg;
    if (!(lp->targets & 0x3fu) || (lp->targets & ~0x3fu))
        return levi_errorf(err, LEVI_ERR_ARG,
                           "LoRA targets 0x%x: expected a non-empty OR of "
                           "levi_lora_target bits",
                           lp->targets);
    if (!(lp->alpha == lp->alpha) || !isfinite(lp->alpha))
        return levi_errorf(err, LEVI_ERR_ARG, "LoRA alpha = %g: expected a finite number",
                           (double)lp->alpha);
    if (lp->dropout != 0.0f)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "LoRA dropout = %g: only 0 is implemented (the forward folds the "
                           "update into the weights, which a dropout on x alone cannot use)",
                           (double)lp->dropout);
    for (int t = 0; t < BERT_LORA_TARGETS; t++) {
        if (!(lp->targets & (1u << t))) continue;
        int out, in;
        bert_target_shape(c, t, &out, &in);
        const int lim = out < in ? out : in;
        if (lp->rank < 1 || lp->rank > lim)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "LoRA rank = %d: expected 1..%d (the smaller side of %s [%d, %d])",
                               lp->rank, lim, bert_lora_module[t], out, in);
    }
    // A new table: the same tensors in the same order (so the base data is one block at the
    // same offsets), then A and B per layer and target.
    levi_params np;
    levi_params_init(&np);
    const levi_params *op = &m->params;
    for (int i = 0; i < op->count; i++) {
        int j = levi_params_add(&np, op->items[i].name, op->items[i].ndim, op->items[i].shape);
        LEVI_ASSERT(j == i, "rebuilt table must keep the base order");
    }
    char nm[LEVI_NAME_MAX];
    for (int l = 0; l < c->layers; l++)
        for (int t = 0; t < BERT_LORA_TARGETS; t++) {
            if (!(lp->targets & (1u << t))) continue;
            int out, in;
            bert_target_shape(c, t, &out, &in);
            int64_t sa[2] = {lp->rank, in}, sb[2] = {out, lp->rank};
            snprintf(nm, sizeof nm, "encoder.layer.%d.%s.lora_A.weight", l, bert_lora_module[t]);
            m->li[l].lora_a[t] = levi_params_add(&np, nm, 2, sa);
            snprintf(nm, sizeof nm, "encoder.layer.%d.%s.lora_B.weight", l, bert_lora_module[t]);
            m->li[l].lora_b[t] = levi_params_add(&np, nm, 2, sb);
        }
    levi_params_alloc(&np);
    memcpy(np.data, op->data, op->numel * sizeof(float));
    for (int i = 0; i < op->count; i++) {
        np.items[i].no_decay = op->items[i].no_decay;
        np.items[i].trainable = 0; // LoRA trains the adapters only
    }
    for (int i = op->count; i < np.count; i++) {
        levi_param *it = &np.items[i];
        float *d = np.data + it->offset;
        if (strstr(it->name, ".lora_A.")) {
            // kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = gain * sqrt(3 / fan_in) with
            // gain = sqrt(2 / (1 + 5)), i.e. 1 / sqrt(in), as nn.Linear and peft initialise A.
            const float bound = 1.0f / sqrtf((float)it->shape[1]);
            for (size_t e = 0; e < it->numel; e++)
                d[e] = (2.0f * levi_rng_uniform(rng) - 1.0f) * bound;
        } // B stays zero: the adapter starts as the identity update
    }
    levi_params_free(&m->params);
    m->params = np;
    for (int t = 0; t < BERT_LORA_TARGETS; t++) {
        if (t < BERT_T_O || !(lp->targets & (1u << t))) continue;
        int out, in;
        bert_target_shape(c, t, &out, &in);
        m->lora_eff[t] = levi_xmalloc((size_t)c->layers * out * in * sizeof(float));
    }
    m->lora = *lp;
    m->lora_scale = lp->alpha / (float)lp->rank;
    m->has_lora = 1;
    m->lora_merged = 0;
    m->can_backward = 0; // the saved activations belong to the old table's weights
    return LEVI_OK;
}

int levi_bert_lora_get(const levi_bert *m, levi_bert_lora_params *lp) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    if (lp && m->has_lora) *lp = m->lora;
    return m->has_lora;
}

static void bert_lora_apply(levi_bert *m, float sign) {
    for (int l = 0; l < m->cfg.layers; l++)
        for (int t = 0; t < BERT_LORA_TARGETS; t++) {
            if (!(m->lora.targets & (1u << t))) continue;
            bert_lora_delta(m, l, t, sign * m->lora_scale,
                            levi_params_data(&m->params, bert_target_weight(&m->li[l], t)));
        }
    m->can_backward = 0;
}

void levi_bert_lora_merge(levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    if (!m->has_lora || m->lora_merged) return;
    bert_lora_apply(m, 1.0f);
    m->lora_merged = 1;
}

void levi_bert_lora_unmerge(levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    if (!m->has_lora || !m->lora_merged) return;
    bert_lora_apply(m, -1.0f);
    m->lora_merged = 0;
}

/* ----------------------------------------------------------------------------------------
 * Saving a Hugging Face folder */

static levi_status bert_copy_file(const char *from_dir, const char *to_dir, const char *name,
                                  int required, levi_error *err) {
    char src[4096], dst[4096];
    if ((size_t)snprintf(src, sizeof src, "%s/%s", from_dir, name) >= sizeof src ||
        (size_t)snprintf(dst, sizeof dst, "%s/%s", to_dir, name) >= sizeof dst)
        return levi_errorf(err, LEVI_ERR_ARG, "path too long: %.200s/%s", from_dir, name);
    struct stat sb;
    if (stat(src, &sb) != 0) {
        if (!required) return LEVI_OK;
        return levi_errorf(err, LEVI_ERR_IO, "%s: not found (needed next to the saved model)", src);
    }
    char *text = NULL;
    size_t len = 0;
    levi_status st = levi_read_file(src, &text, &len, err);
    if (st != LEVI_OK) return st;
    st = levi_write_file_atomic(dst, text, len, err);
    levi_free(text);
    return st;
}

levi_status levi_bert_save(const levi_bert *m, const char *dir, const char *copy_from,
                           levi_error *err) {
    LEVI_ASSERT(m != NULL && dir != NULL, "levi_bert_save needs a model and a folder");
    const levi_bert_config *c = &m->cfg;
    levi_status st = levi_mkdirs(dir, err);
    if (st != LEVI_OK) return st;
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path)
        return levi_errorf(err, LEVI_ERR_ARG, "model folder path too long: %.200s...", dir);
    // %.9g round-trips every float; the fields are those levi_bert_config_parse reads, plus
    // what transformers needs to pick BertModel.
    char json[2048];
    int len = snprintf(
        json, sizeof json,
        "{\n  \"architectures\": [\"BertModel\"],\n  \"model_type\": \"bert\",\n"
        "  \"hidden_size\": %d,\n  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n"
        "  \"intermediate_size\": %d,\n  \"vocab_size\": %d,\n  \"max_position_embeddings\": %d,\n"
        "  \"type_vocab_size\": %d,\n  \"pad_token_id\": %d,\n  \"layer_norm_eps\": %.9g,\n"
        "  \"hidden_act\": \"gelu\",\n  \"hidden_dropout_prob\": %.9g,\n"
        "  \"attention_probs_dropout_prob\": %.9g,\n  \"initializer_range\": %.9g,\n"
        "  \"position_embedding_type\": \"absolute\"\n}\n",
        c->hidden, c->layers, c->heads, c->intermediate, c->vocab, c->max_pos, c->type_vocab,
        c->pad_token_id, (double)c->eps, (double)c->hidden_dropout, (double)c->attn_dropout,
        (double)c->init_range);
    if ((st = levi_write_file_atomic(path, json, (size_t)len, err)) != LEVI_OK) return st;

    // Base tensors only; LoRA targets written as W + s B A (a merged copy, so the model is
    // left as it was).
    const levi_params *p = &m->params;
    int nbase = p->count; // LoRA tensors come after every base tensor (levi_bert_lora_add)
    for (int i = 0; i < p->count; i++)
        if (strstr(p->items[i].name, ".lora_")) {
            nbase = i;
            break;
        }
    levi_tensor *ts = levi_xcalloc((size_t)nbase, sizeof *ts);
    float **merged = levi_xcalloc((size_t)nbase, sizeof *merged);
    for (int i = 0; i < nbase; i++) ts[i] = levi_params_tensor(p, i);
    if (m->has_lora && !m->lora_merged)
        for (int l = 0; l < c->layers; l++)
            for (int t = 0; t < BERT_LORA_TARGETS; t++) {
                if (!(m->lora.targets & (1u << t))) continue;
                int wi = bert_target_weight(&m->li[l], t);
                size_t n = p->items[wi].numel;
                merged[wi] = levi_xmalloc(n * sizeof(float));
                memcpy(merged[wi], levi_params_data(p, wi), n * sizeof(float));
                bert_lora_delta(m, l, t, m->lora_scale, merged[wi]);
                ts[wi].data = merged[wi];
            }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    const char *keys[1] = {"format"}, *vals[1] = {"pt"};
    st = levi_st_write(path, ts, nbase, keys, vals, 1, err);
    for (int i = 0; i < nbase; i++) levi_free(merged[i]);
    free(merged);
    free(ts);
    if (st != LEVI_OK || !copy_from) return st;
    static const char *const files[] = {"vocab.txt", "tokenizer_config.json",
                                        "special_tokens_map.json", "tokenizer.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0] && st == LEVI_OK; i++)
        st = bert_copy_file(copy_from, dir, files[i], i == 0, err);
    return st;
}
