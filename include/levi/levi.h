/* levi methods: LEVI and the baselines that train on cached (frozen) backbone features.
 *
 * One model family covers every method here. A model is
 *   - an optional small model trained from scratch: one embedding table per categorical
 *     column (plus the numeric columns), concatenated, then an MLP (512-256, ReLU: paper D.2);
 *   - a list of heads ("adapters"). Adapter j sees [small-model output, feature of layer l_j]
 *     (either part may be absent) and is an MLP in -> hidden -> ReLU -> out, or a plain linear
 *     map when hidden == 0 (linear probing);
 *   - loss = sum_j w_j * loss_j with w_j = 1/n by default (paper Sec. 4, weighted: App. C);
 *     prediction = the same weighted mean of adapter outputs. For classification the mean is
 *     over softmax PROBABILITIES (an ensemble of predictive distributions; averaging logits
 *     would be a geometric mean that lets one over-confident adapter dominate), selectable.
 * Methods are configurations of it (levi_head_default_params): LEVI (small + adapters on all
 * layers), A3 (adapters on all layers, no small model), A4 (small model + one head), A5
 * (small model shared bottom + several heads, averaged), LP (linear head on the last layer),
 * LAYER (LEVI with one adapter on one layer: the paper's Fig. 4 study), and BIAS (global mean
 * + regularised per-value biases of chosen categorical columns: a sanity floor).
 *
 * Inputs are raw arrays (levi_task_data) selected by int64 row-index arrays; this layer knows
 * nothing of files or datasets. Model selection looks at ID validation only: OOD index sets
 * are evaluated after the choice is made and never influence it.
 *
 * Not for: training the backbone (features are frozen inputs), data loading, printing (the
 * library prints nothing; progress goes to a callback).
 *
 * Ownership: levi_model_* handles are freed with levi_model_free (NULL is harmless). Data
 * arrays are borrowed for the duration of a call and never kept. A model holds its own
 * activation workspace: use one model from one thread at a time (different models are
 * independent).
 * Determinism: same seed + same thread count => bit-identical weights and predictions.
 */
#ifndef LEVI_LEVI_H
#define LEVI_LEVI_H

#include "levi/core.h"
#include "levi/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LEVI_MAX_CAT 32         /* categorical columns */
#define LEVI_MAX_ADAPTERS 32    /* heads of one model */
#define LEVI_MAX_SMALL_LAYERS 4 /* hidden layers of the small MLP */
#define LEVI_MAX_GRID 16        /* learning rates (or lambdas) in one grid */
#define LEVI_MAX_SEEDS 8        /* seeds of one selection run */
#define LEVI_MAX_EVAL_SETS 32   /* index sets evaluated after selection */
#define LEVI_MAX_EPOCHS 1000    /* history kept per run */

/* ---------------------------------------------------------------------------------------
 * Task data: borrowed arrays, one row per example. */
typedef struct levi_task_data {
    int64_t n; /* rows */
    /* Categorical columns: ids in [0, cat_card[c]); 0 is the reserved "unknown" slot. */
    int n_cat;
    const int32_t *cat;            /* [n, n_cat] */
    const int32_t *cat_card;       /* [n_cat], each >= 1 (slot 0 included) */
    const float *cat_mask_prob;    /* [n_cat] or NULL: fraction of training rows whose id is
                                      replaced by 0 in each batch (never at evaluation) */
    const int32_t *cat_mask_group; /* [n_cat] or NULL: columns with the same id >= 0 are
                                      masked together (e.g. movie title with movie id) with the
                                      largest mask_prob of the group; -1: on its own */
    /* Numeric columns, fed to the small model next to the embeddings. */
    int n_num;
    const float *num; /* [n, n_num] */
    /* Frozen backbone features, one vector per layer. n_layers == 0: none. All access goes
       through one gather function (head.c) so a half-precision cache changes one place. */
    int n_layers, feat_dim;
    const float *feats; /* [n, n_layers, feat_dim] */
    /* Labels: n_classes == 0 means regression on y; otherwise yc in [0, n_classes). */
    int n_classes;
    const float *y;    /* [n] (regression) */
    const int32_t *yc; /* [n] (classification) */
} levi_task_data;

/* Checks the arrays a model needs are present and the ids and labels of the given rows are
 * valid (ids in range; labels finite / in range when check_labels). Errors name the row,
 * column and expected vs found value. */
levi_status levi_task_data_check(const levi_task_data *d, const int64_t *rows, int64_t n_rows,
                                 int check_labels, levi_error *err);

/* ---------------------------------------------------------------------------------------
 * Model configuration. */
typedef enum {
    LEVI_METHOD_LEVI = 0, /* small model + adapters on all layers */
    LEVI_METHOD_A3,       /* adapters on all layers, no small model */
    LEVI_METHOD_A4,       /* small model + one head */
    LEVI_METHOD_A5,       /* small model + several heads, averaged */
    LEVI_METHOD_LP,       /* linear head on the last layer's feature */
    LEVI_METHOD_LAYER,    /* small model + one adapter on one layer (default: last) */
    LEVI_METHOD_BIAS,     /* global mean + regularised per-value biases */
    LEVI_METHOD_COUNT
} levi_method;
const char *levi_method_name(levi_method m); /* "levi", "a3", ..., "bias" */
/* Parses a name as printed by levi_method_name; returns -1 when unknown. */
int levi_method_parse(const char *name);

typedef enum {
    LEVI_ENSEMBLE_PROB = 0, /* classification: weighted mean of softmax probabilities */
    LEVI_ENSEMBLE_LOGIT     /* classification: softmax of the weighted mean of logits */
} levi_ensemble_kind;

typedef struct levi_head_params {
    levi_method method; /* recorded in checkpoints; the fields below define the structure */
    /* Small model. */
    int use_small;
    int emb_dim; /* 32 */
    /* Embeddings start N(0, std^2). Default 0.03 (about Keras' uniform +-0.05), not
       PyTorch's 1: on MovieLens ID validation (A4, lr 1e-3, 20% item masking) std 1 / 0.1 /
       0.03 / 0.01 gave RMSE 0.955 / 0.924 / 0.918 / 0.925; large random ids are noise the
       MLP must first learn to ignore. */
    float emb_init_std;
    int n_small_hidden;                      /* 2 */
    int small_hidden[LEVI_MAX_SMALL_LAYERS]; /* {512, 256} */
    /* Feature adapters: one per listed layer; negative entries count from the end (-1 is
       the last layer). n_layer_list == 0 means every layer the data has. */
    int feature_adapters;
    int n_layer_list;
    int layer_list[LEVI_MAX_ADAPTERS];
    /* Heads that see only the small model (A4: 1; A5: several). -1: as many as the data has
       feature layers (6 when it has none), so A5 matches LEVI's head count. */
    int n_plain_heads;
    int adapter_hidden; /* 256; 0 = linear head */
    /* Loss and ensemble weights per adapter; all zero means 1/n each. Must be >= 0 with a
       positive sum; they are normalised to sum to 1 (App. C). */
    float adapter_weight[LEVI_MAX_ADAPTERS];
    levi_ensemble_kind ensemble;
    /* Standardise each feature dimension (and numeric column) with the ID-train mean and
       std, stored in the model. The map is affine so it changes no model's capacity, only
       conditioning: transformer hidden states have a few outlier dimensions tens of times
       larger than the rest and scales that differ by layer; standardising makes PyTorch's
       default init (which assumes unit-scale inputs) and one LR grid fit every layer and the
       small model's ReLU outputs alike. Default on. */
    int standardize;
    /* Ids never seen in the training rows are mapped to the unknown slot 0 at prediction
       time (their embeddings got no training signal). Default on. */
    int unseen_to_unknown;
    /* Dropout on the (standardised) backbone features an adapter reads, during training only:
       each feature value is zeroed with this probability and the rest scaled by 1/(1-p), drawn
       per row, layer and dimension from the training seed. 0: off. Default 0.5 for methods
       with feature adapters except the linear probe: 384 frozen features per layer let an
       adapter memorise training rows. MovieLens ID validation, LEVI seed 0, best over the LR
       grid {1e-2, 1e-3}: p = 0 / 0.2 / 0.5 / 0.7 gave RMSE 0.9213 / 0.9212 / 0.9182 / 0.9184
       (the small model alone, A4: 0.9206). */
    float feature_dropout;
    /* BIAS method: which categorical columns get a bias (bit c = column c), the lambda grid
       chosen on ID validation, and the number of alternating least-squares sweeps. */
    uint64_t bias_cols; /* default 0x3: the first two columns (user, item) */
    int n_bias_lambda;
    float bias_lambda[LEVI_MAX_GRID];
    int bias_sweeps;
} levi_head_params;

levi_head_params levi_head_default_params(levi_method method);
/* Default learning-rate grid of a method (paper D.3): {1e-4, 1e-3, 1e-2, 1e-1}, linear
 * probing {1e-3, 1e-2, 1e-1, 1, 10}, the bias model a single dummy entry. Returns the count. */
int levi_default_lr_grid(levi_method method, float out[LEVI_MAX_GRID]);

/* ---------------------------------------------------------------------------------------
 * Model handle. Shapes (columns, cardinalities, layers, classes) come from the data; the
 * weights are zero until levi_train initialises them from its seed (or a checkpoint loads).
 * Every call that takes data checks it has the shapes the model was built for. */
typedef struct levi_model levi_model;
levi_status levi_model_init(levi_model **out, const levi_head_params *hp,
                            const levi_task_data *shape_of, levi_error *err);
void levi_model_free(levi_model *m);
const levi_head_params *levi_model_head_params(const levi_model *m);
int levi_model_n_adapters(const levi_model *m);
/* Feature layer of adapter j, or -1 for a head without a feature input. */
int levi_model_adapter_layer(const levi_model *m, int j);
int levi_model_n_outputs(const levi_model *m); /* 1 (regression) or n_classes */
size_t levi_model_n_params(const levi_model *m);
levi_params *levi_model_params(levi_model *m); /* owned by the model */
/* The full configuration (head params + data shapes) as JSON; owned by the model. */
const char *levi_model_config_json(const levi_model *m);

/* ---------------------------------------------------------------------------------------
 * Training. */
typedef struct levi_train_progress {
    float lr; /* of the run (selection trains several) */
    uint64_t seed;
    int epoch; /* 1-based */
    int max_epochs;
    int64_t step; /* step within the epoch, 1-based */
    int64_t steps_per_epoch;
    int64_t global_step;
    double loss;           /* mean training loss of the epoch so far */
    double examples_per_s; /* over the epoch so far */
    int epoch_done;        /* 1 on the call made after the epoch's validation */
    double val_metric;     /* valid when epoch_done */
    int improved;          /* valid when epoch_done */
} levi_train_progress;
typedef void (*levi_progress_fn)(void *user, const levi_train_progress *p);

typedef enum { LEVI_PRECISION_F32 = 0, LEVI_PRECISION_BF16 } levi_precision;
const char *levi_precision_name(levi_precision p); /* "f32", "bf16" */
int levi_precision_parse(const char *name);        /* -1 when unknown */

typedef struct levi_train_params {
    float lr;                /* 1e-3 */
    int batch_size;          /* 200 */
    int max_epochs;          /* 30 */
    int patience;            /* 6: stop after this many epochs without a better ID-val metric
                                (3 stopped LEVI seeds at epoch 2-4 on noisy MovieLens
                                validation curves; 6 gave a better ID-val RMSE) */
    uint64_t seed;           /* init, shuffles and masking all come from it */
    levi_opt_kind optimizer; /* Adam */
    /* Precision of the training step's matrix products: LEVI_PRECISION_F32 (default), or
       LEVI_PRECISION_BF16: operands rounded to bfloat16, sums in f32 (levi_gemm_bf16), as in
       mixed-precision training; weights, gradients, the optimizer and every prediction and
       evaluation stay f32. About twice the products' speed on CPUs with bfloat16 dot products
       (AVX512_BF16, AMX). Results differ from f32 training's by about as much as another
       seed's (docs/results-movielens.md). */
    levi_precision precision;
    float weight_decay;          /* 0 */
    float clip_norm;             /* 0: none */
    int64_t max_steps_per_epoch; /* 0: whole epochs (for tests and benchmarks) */
    /* Stop this call after this many epochs of the run (counting resumed ones), leaving the
       run resumable, as if interrupted. 0: no limit. */
    int epoch_limit;
    /* Checkpoints: after every epoch the current weights go to ckpt_path and the training
       state (optimizer moments, best weights, epoch, RNG, early-stopping counters) to
       state_path; at the end ckpt_path holds the best weights. Either may be NULL. */
    const char *ckpt_path;
    const char *state_path;
    int resume; /* 1: continue from state_path + ckpt_path when state_path exists */
    /* Checked between steps; when it becomes nonzero training stops with
       LEVI_ERR_INTERRUPTED (the last epoch boundary stays resumable). */
    const volatile int *stop_flag;
    levi_progress_fn progress;
    void *progress_user;
    int progress_every; /* steps between progress calls; 0: only at epoch ends */
} levi_train_params;

levi_train_params levi_train_default_params(void);

typedef struct levi_train_result {
    int epochs_run; /* epochs completed, resumed ones included */
    int best_epoch; /* 1-based; 0 when none */
    double best_val_metric;
    int finished;          /* 0 when stopped by epoch_limit or stop_flag */
    int diverged;          /* 1 when a non-finite loss stopped training (best weights kept) */
    int stopped_early;     /* 1 when patience ran out */
    int64_t steps;         /* optimizer steps, resumed ones included */
    double seconds;        /* wall time of this call */
    double examples_per_s; /* training throughput of this call */
    float lr;
    float bias_lambda; /* BIAS: the lambda chosen on ID validation */
    int n_history;
    double val_history[LEVI_MAX_EPOCHS];  /* ID-val metric after each epoch (BIAS: per lambda) */
    double loss_history[LEVI_MAX_EPOCHS]; /* mean training loss of each epoch */
} levi_train_result;

/* Trains m on the `train` rows, early-stopping on the `val` rows (n_val == 0: no early
 * stopping, the last epoch is kept). Initialises weights, standardisation statistics, the
 * seen-id maps and the output bias from the train rows and tp->seed, unless it resumes.
 * Returns LEVI_OK with res->finished == 0 when epoch_limit stopped it; LEVI_ERR_NUMERIC when
 * the loss became non-finite before any epoch completed. res may be NULL. */
levi_status levi_train(levi_model *m, const levi_task_data *d, const int64_t *train,
                       int64_t n_train, const int64_t *val, int64_t n_val,
                       const levi_train_params *tp, levi_train_result *res, levi_error *err);

/* Step-level trainer, for benchmarks and custom loops: levi_train is built on it.
 * levi_trainer_init initialises the model exactly as a fresh levi_train does. */
typedef struct levi_trainer levi_trainer;
levi_status levi_trainer_init(levi_trainer **out, levi_model *m, const levi_task_data *d,
                              const int64_t *train, int64_t n_train, const levi_train_params *tp,
                              levi_error *err);
/* One optimizer step on rows[0..n) (n <= tp->batch_size). Returns the training loss, or NaN
 * when the gradient was not finite (the optimizer then skips the step). */
float levi_trainer_step(levi_trainer *t, const int64_t *rows, int64_t n);
void levi_trainer_free(levi_trainer *t);

/* ---------------------------------------------------------------------------------------
 * Prediction and evaluation (no masking, unseen ids mapped to slot 0). */

/* ens: [n, n_outputs] (regression: the prediction; classification: probabilities).
 * per_adapter: [n, n_adapters, n_outputs] or NULL (classification: each adapter's
 * probabilities). */
levi_status levi_predict(levi_model *m, const levi_task_data *d, const int64_t *rows, int64_t n,
                         float *ens, float *per_adapter, levi_error *err);

typedef struct levi_metrics {
    int64_t n;
    double metric; /* RMSE (regression, lower is better) or accuracy (higher is better) */
    double loss;   /* MSE or negative log-likelihood of the ensemble */
    int n_adapters;
    double adapter_metric[LEVI_MAX_ADAPTERS];
} levi_metrics;

levi_status levi_evaluate(levi_model *m, const levi_task_data *d, const int64_t *rows, int64_t n,
                          levi_metrics *out, levi_error *err);
/* 1 when metric a is better than b for this kind of task (NaN is never better). */
int levi_metric_better(const levi_model *m, double a, double b);

/* ---------------------------------------------------------------------------------------
 * Learning-rate selection on ID validation, then seeds. */
typedef struct levi_eval_set {
    const char *name; /* "id_test", "ood", "ood/Horror", ... (borrowed) */
    const int64_t *rows;
    int64_t n;
} levi_eval_set;

typedef struct levi_select_params {
    int n_lr; /* 0: levi_default_lr_grid of the method */
    float lr_grid[LEVI_MAX_GRID];
    int n_seeds;         /* 3 */
    uint64_t first_seed; /* 0: seeds are first_seed, first_seed+1, ... */
    /* When set, every run checkpoints to "<dir>/lr<i>-seed<s>.{safetensors,state.safetensors}"
       and finished runs found there are loaded instead of retrained (resume). */
    const char *ckpt_dir;
} levi_select_params;
levi_select_params levi_select_default_params(void);

typedef struct levi_select_result {
    int n_lr;
    float lr[LEVI_MAX_GRID];
    double lr_val_metric[LEVI_MAX_GRID]; /* seed first_seed's best ID-val metric per lr */
    int best_lr_index;
    float best_lr;
    int n_seeds;
    uint64_t seeds[LEVI_MAX_SEEDS];
    levi_train_result train[LEVI_MAX_SEEDS]; /* at the best lr */
    int n_sets;
    char set_names[LEVI_MAX_EVAL_SETS][64];
    levi_metrics metrics[LEVI_MAX_SEEDS][LEVI_MAX_EVAL_SETS];
    double mean[LEVI_MAX_EVAL_SETS], std[LEVI_MAX_EVAL_SETS]; /* ensemble metric over seeds
                                                                  (sample std, n-1) */
} levi_select_result; /* large (~200 KB): allocate it on the heap */

/* Trains the lr grid with the first seed, picks the lr with the best ID-val metric (ties:
 * the smaller lr), trains the other seeds at it, then evaluates every seed's model on each
 * eval set (which the choice never saw). models_out (may be NULL) receives n_seeds models
 * the caller frees. A run whose loss diverges counts as the worst metric, not an error. */
levi_status levi_select_and_train(const levi_head_params *hp, const levi_train_params *tp,
                                  const levi_select_params *sp, const levi_task_data *d,
                                  const int64_t *train, int64_t n_train, const int64_t *val,
                                  int64_t n_val, const levi_eval_set *sets, int n_sets,
                                  levi_select_result *res, levi_model **models_out,
                                  levi_error *err);

/* ---------------------------------------------------------------------------------------
 * Checkpoints: safetensors, keys "small.emb.<c>.weight", "small.mlp.<l>.weight|bias",
 * "adapter.<j>.fc1.weight|bias", "adapter.<j>.fc2.weight|bias" (hidden == 0:
 * "adapter.<j>.fc.weight|bias"), "feat.mean|std" [n_layers, feat_dim], "num.mean|std",
 * "cat.<c>.seen" (1 for ids seen in training), "bias.global", "bias.col.<c>".
 * Metadata: "format" = "levi-head-v1", "config" = levi_model_config_json, "state" =
 * "final" or "in_progress". Readable by PyTorch's safetensors.torch.load_file. */
levi_status levi_model_save(const levi_model *m, const char *path, levi_error *err);
/* Builds a model from a checkpoint's config and weights (untrusted input: every field and
 * shape is validated; errors name the file and field). */
levi_status levi_model_load(levi_model **out, const char *path, levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_LEVI_H */
