/* Private to src/methods: the layout of levi_model and the head model's forward/backward,
 * shared by head.c (model, kernels, prediction), train.c (training, selection), bias.c
 * (the additive bias baseline) and checkpoint.c (save/load), and exposed to
 * tests/test_levi.c for gradient checks. Not API: names carry a double underscore.
 */
#ifndef LEVI_METHODS_HEAD_INTERNAL_H
#define LEVI_METHODS_HEAD_INTERNAL_H

#include "levi/levi.h"

/* Activations and gradients of one batch, carved from one arena sized by
 * levi__workspace_bytes for batches of up to cap rows. */
typedef struct levi__workspace {
    levi_arena *arena;
    int64_t cap;
    int32_t *ids;                      /* [B, n_cat] ids after unseen-mapping and masking */
    float *x0;                         /* [B, in0] concatenated embeddings + numeric columns */
    float *act[LEVI_MAX_SMALL_LAYERS]; /* [B, small_hidden[l]] post-ReLU */
    float *dact[2];                    /* ping-pong gradient buffers of the widest small layer */
    float *dx0;                        /* [B, in0] */
    float *g;     /* [B, n_used_layers * feat_dim] gathered (standardised) features */
    float *z;     /* [B, NA * first_out] adapters' first layer (post-ReLU when hidden) */
    float *dz;    /* [B, NA * first_out] */
    float *out;   /* [B, NA * n_out] adapter outputs (logits for classification) */
    float *dout;  /* [B, NA * n_out] */
    float *probs; /* [B, NA * n_out] per-adapter softmax (classification) */
    float *ens;   /* [B, n_out] */
    float *y;     /* [B] regression targets */
    int32_t *yc;  /* [B] class targets */
} levi__workspace;

struct levi_model {
    levi_head_params hp;
    /* Shapes fixed by the data the model was built for. */
    int n_cat;
    int32_t card[LEVI_MAX_CAT];
    int n_num, n_layers, feat_dim, n_classes;
    int n_out; /* 1 or n_classes */
    int in0;   /* n_cat * emb_dim + n_num */
    int n_small;
    int small_dim[LEVI_MAX_SMALL_LAYERS];
    int small_out; /* width of the small model's output (0 when none) */
    /* Heads. */
    int n_adapters;
    int adapter_layer[LEVI_MAX_ADAPTERS]; /* feature layer, -1 none */
    int adapter_slot[LEVI_MAX_ADAPTERS];  /* its position among the gathered layers, -1 none */
    int adapter_in[LEVI_MAX_ADAPTERS];
    int first_out;                   /* adapter_hidden, or n_out for linear heads */
    float weight[LEVI_MAX_ADAPTERS]; /* normalised loss / ensemble weights */
    int n_used_layers;
    int used_layer[LEVI_MAX_ADAPTERS]; /* distinct feature layers read, ascending */
    /* Parameters: one table; indices of its tensors (-1 where absent). */
    levi_params params;
    int p_emb[LEVI_MAX_CAT], p_seen[LEVI_MAX_CAT];
    int p_small_w[LEVI_MAX_SMALL_LAYERS], p_small_b[LEVI_MAX_SMALL_LAYERS];
    int p_a1w[LEVI_MAX_ADAPTERS], p_a1b[LEVI_MAX_ADAPTERS];
    int p_a2w[LEVI_MAX_ADAPTERS], p_a2b[LEVI_MAX_ADAPTERS];
    int p_feat_mean, p_feat_std, p_num_mean, p_num_std;
    int p_bias_global, p_bias_col[LEVI_MAX_CAT];
    /* 1 when all adapters' first-layer weights (and biases) lie back to back with one row
       width, so the small-model part of every adapter is one GEMM. */
    int fused_first;
    /* Derived from feat.std / num.std (1/std), refreshed by levi__model_refresh. */
    float *feat_rstd; /* [n_used_layers * feat_dim] */
    float *feat_mean; /* [n_used_layers * feat_dim] */
    float *num_rstd;  /* [n_num] */
    levi__workspace ws;
    char *config_json;
};

size_t levi__workspace_bytes(const levi_model *m, int64_t cap);
/* Makes the workspace hold batches of up to cap rows (reallocating only when it grows). */
void levi__workspace_ensure(levi_model *m, int64_t cap);
/* Recomputes the derived standardisation buffers after the parameters changed. */
void levi__model_refresh(levi_model *m);

/* Checks that d has the shapes m was built for (LEVI_ERR_SHAPE otherwise). */
levi_status levi__check_shapes(const levi_model *m, const levi_task_data *d, levi_error *err);

/* Fills ws.ids (unseen-id mapping; masking with rng when rng != NULL), ws.x0 and ws.g for
 * rows[0..B), and ws.y / ws.yc when labels != 0. */
void levi__gather_batch(levi_model *m, const levi_task_data *d, const int64_t *rows, int64_t B,
                        levi_rng *mask_rng, int labels);
/* Forward of the gathered batch: ws.out (and ws.probs for classification). bf16: the matrix
 * products through levi_gemm_bf16 (training with LEVI_PRECISION_BF16; predictions pass 0). */
void levi__forward(levi_model *m, int64_t B, int bf16);
/* Weighted loss of ws.out against ws.y/ws.yc; fills ws.dout with its gradient. */
float levi__loss(levi_model *m, int64_t B);
/* Backward from ws.dout, accumulating into m->params.grad; bf16 as in levi__forward. */
void levi__backward(levi_model *m, int64_t B, int bf16);
/* Ensemble prediction of the forwarded batch into ws.ens. */
void levi__ensemble(levi_model *m, int64_t B);
/* Forward with the fused first-layer GEMM disabled (per-adapter GEMMs), for tests. */
void levi__set_fused(levi_model *m, int fused);

/* Weight initialisation (Linear: PyTorch's U(+-1/sqrt(in)); Embedding: N(0, emb_init_std^2)) and
 * the data-derived tensors: standardisation, seen-id maps, output bias = train label mean. */
void levi__init_weights(levi_model *m, levi_rng *rng);
void levi__init_from_data(levi_model *m, const levi_task_data *d, const int64_t *train,
                          int64_t n_train);

/* Bias model (bias.c): fits by alternating least squares, lambda chosen on val. */
levi_status levi__bias_fit(levi_model *m, const levi_task_data *d, const int64_t *train,
                           int64_t n_train, const int64_t *val, int64_t n_val,
                           levi_train_result *res, levi_error *err);

/* Configuration JSON of m (malloc'd) and a model from such JSON (checkpoint.c). */
char *levi__config_to_json(const levi_model *m);
levi_status levi__model_from_json(levi_model **out, const char *json, const char *where,
                                  levi_error *err);

/* Saves with metadata "state" = state ("final" or "in_progress"). */
levi_status levi__model_save_ex(const levi_model *m, const char *path, const char *state,
                                levi_error *err);
/* Loads the weights of a checkpoint written for exactly m's configuration into m; *state_out
 * (may be NULL) gets "final" or "in_progress". */
levi_status levi__model_load_weights(levi_model *m, const char *path, const char **state_out,
                                     levi_error *err);

#endif /* LEVI_METHODS_HEAD_INTERNAL_H */
