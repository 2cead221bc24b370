/* levi fine-tuning: the backbone-training baselines of the paper (Sec. 5, "standard training"
 * and LP->FT) on text tasks: a BERT-family encoder, mean pooling of its last layer over the
 * real tokens (as sentence-transformers pools), and a head (linear, or an MLP with one ReLU
 * hidden layer), trained end to end with Adam on tokenised texts.
 *
 * Modes (what is trained; the head always is):
 *   FT     every backbone tensor;
 *   HT     the upper half of the transformer layers (layers L/2 .. L-1; embeddings and the
 *          lower layers frozen, bit-identical after training);
 *   LP     nothing of the backbone (linear head; the backbone runs in its inference path);
 *   LP_FT  Kumar et al. 2022b: LP first (lp_lr, lp_epochs, early stopping on ID validation,
 *          best probe kept), then FT from that probe with a fresh optimizer;
 *   FS     every tensor of a randomly initialised encoder of the same config (from scratch);
 *   LORA   LoRA adapters in the encoder (bert.h), base weights frozen.
 * Randomness: one levi_rng seeded with the run's seed; its first split initialises (head,
 * LoRA A, the FS encoder), its second drives shuffles and dropout, so a resumed run continues
 * the same streams. Same seed + same thread count => bit-identical weights.
 *
 * Inputs are borrowed arrays selected by int64 row indices (levi_ft_data); this layer knows
 * nothing of files, specs or datasets. Texts are tokenised per batch (tokenizer.h of the model
 * folder), truncated to max_len and padded to the longest text of the batch.
 * Model selection looks at ID validation only.
 *
 * Not for: the cached-feature heads (levi.h), LEVI itself, printing (progress goes to a
 * callback), or LoRA dropout (bert.h implements rank/alpha/targets only).
 *
 * Ownership: levi_ft_model handles are freed with levi_ft_free (NULL is harmless); one handle
 * serves one thread at a time.
 */
#ifndef LEVI_FINETUNE_H
#define LEVI_FINETUNE_H

#include "levi/bert.h"
#include "levi/core.h"
#include "levi/levi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    LEVI_FT_FULL = 0, /* "ft" */
    LEVI_FT_HALF,     /* "ht" */
    LEVI_FT_PROBE,    /* "lp" */
    LEVI_FT_LP_FT,    /* "lp-ft" */
    LEVI_FT_SCRATCH,  /* "fs" */
    LEVI_FT_LORA,     /* "lora" */
    LEVI_FT_MODE_COUNT
} levi_ft_mode;
const char *levi_ft_mode_name(levi_ft_mode mode);
int levi_ft_mode_parse(const char *name); /* -1 when unknown */

/* Borrowed task data: one row per example. */
typedef struct levi_ft_data {
    int64_t n;
    const char *const *texts; /* [n] NUL-terminated UTF-8 */
    int n_classes;            /* 0: regression on y; else yc in [0, n_classes) */
    const float *y;           /* [n] */
    const int32_t *yc;        /* [n] */
} levi_ft_data;

typedef struct levi_ft_params {
    levi_ft_mode mode;
    int max_len;     /* tokens per text, [CLS] and [SEP] included (64) */
    int head_hidden; /* 0: linear head (always for LP and LP_FT); > 0: MLP H -> hidden -> out */
    float hidden_dropout, attn_dropout; /* training dropout; < 0: the config's (-1) */
    levi_bert_lora_params lora;         /* LORA mode (levi_bert_lora_default_params) */
    /* Optimisation (paper D.3: Adam, batch 200 on MovieLens, lr chosen on ID validation). */
    float lr;                    /* 1e-4 */
    int batch_size;              /* 200 */
    int micro_batch;             /* > 0: each batch runs as chunks of at most this many rows
                                    whose gradients add up to the batch's (the activation
                                    memory of a MiniLM train forward is ~0.2 MiB per token,
                                    ~2.5 GiB for 200 rows of 64); 0: whole batches */
    int max_epochs;              /* 10 */
    int patience;                /* 3: epochs without a better ID-val metric before stopping */
    uint64_t seed;               /* 0 */
    levi_opt_kind optimizer;     /* Adam (AdamW also accepted) */
    float weight_decay;          /* 0 */
    float clip_norm;             /* 0: none (per optimizer: backbone and head separately) */
    int64_t max_steps_per_epoch; /* 0: whole epochs */
    float lp_lr;                 /* LP_FT's probing phase: 1e-2 */
    int lp_epochs;               /* LP_FT's probing phase: 10 */
    int eval_batch;              /* rows per inference batch (64) */
    /* Scaled runs: train on a subset of the train rows, the first k of a permutation seeded
       by subsample_seed (the same subset for every lr and seed): k = min(round(n *
       train_fraction), max_train_rows) (fraction 1 / rows 0: all). max_val_rows caps the
       ID-validation rows used for early stopping the same way (0: all). */
    double train_fraction;
    int64_t max_train_rows, max_val_rows;
    uint64_t subsample_seed;
    /* Checkpoints: after every epoch the trainable tensors, their best copies, the optimizer
       moments, the RNG and the counters go to state_path (safetensors, atomic); at the end
       it holds the best weights with "finished". NULL: none. */
    const char *state_path;
    int resume;      /* 1: continue from state_path when it exists (finished: just load) */
    int epoch_limit; /* stop this call after this many epochs in all (resumable); 0: none */
    const volatile int *stop_flag; /* nonzero: stop between steps with LEVI_ERR_INTERRUPTED */
    levi_progress_fn progress;
    void *progress_user;
    int progress_every; /* steps between progress calls; 0: only at epoch ends */
} levi_ft_params;

levi_ft_params levi_ft_default_params(levi_ft_mode mode);

typedef struct levi_ft_model levi_ft_model;

/* Opens the encoder and tokenizer of model_dir (config.json, model.safetensors, vocab.txt),
 * builds the head for n_classes (0: regression, one output) and initialises everything the
 * mode trains from fp->seed (FS: a random encoder of model_dir's config; LORA: adapters).
 * Errors of the folder or of fp (named field, expected vs found). */
levi_status levi_ft_init(levi_ft_model **out, const char *model_dir, const levi_ft_params *fp,
                         int n_classes, levi_error *err);
void levi_ft_free(levi_ft_model *m);

levi_bert *levi_ft_bert(levi_ft_model *m);   /* owned by m */
levi_params *levi_ft_head(levi_ft_model *m); /* "head.fc.*" or "head.fc1/fc2.*" */
const levi_ft_params *levi_ft_get_params(const levi_ft_model *m);
/* Parameters the mode trains (backbone + head), as the current phase sets them (LP_FT before
 * training: its probing phase). */
size_t levi_ft_trainable_count(const levi_ft_model *m);

/* Trains on the `train` rows with early stopping on the `val` rows (n_val == 0: the last
 * epoch is kept); at the end the model holds the best weights. LEVI_OK with
 * res->finished == 0 when epoch_limit stopped it; LEVI_ERR_NUMERIC when the loss became
 * non-finite before any epoch completed; LEVI_ERR_INTERRUPTED from stop_flag. res may be
 * NULL; its lr is fp->lr, its history covers every epoch of every phase. */
levi_status levi_ft_train(levi_ft_model *m, const levi_ft_data *d, const int64_t *train,
                          int64_t n_train, const int64_t *val, int64_t n_val,
                          levi_train_result *res, levi_error *err);

/* One batch's mean training loss with the gradients of every trainable tensor (backbone and
 * head tables' grad, zeroed first) and no optimizer step, for gradient checks and custom
 * loops. Dropout as in training, drawn from rng (NULL: dropout off). */
levi_status levi_ft_loss_and_grad(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows,
                                  int64_t n, levi_rng *rng, float *loss, levi_error *err);

/* out: [n, n_outputs] (regression: the prediction; classification: probabilities). */
levi_status levi_ft_predict(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows, int64_t n,
                            float *out, levi_error *err);
/* RMSE (regression) or accuracy, as levi_evaluate reports them (one "adapter": the head). */
levi_status levi_ft_evaluate(levi_ft_model *m, const levi_ft_data *d, const int64_t *rows,
                             int64_t n, levi_metrics *out, levi_error *err);
/* 1 when metric a is better than b for this model's task (NaN is never better). */
int levi_ft_metric_better(const levi_ft_model *m, double a, double b);

/* The tuned backbone as a Hugging Face folder (levi_bert_save: LoRA merged, original key
 * names, the model folder's vocab.txt and tokenizer files copied), so LEVI can extract
 * features from it through the usual pipeline. */
levi_status levi_ft_save_backbone(const levi_ft_model *m, const char *dir, levi_error *err);

/* WiSE-FT (Wortsman et al. 2022b): sets every encoder tensor of m to
 * (1 - alpha) * pre + alpha * tuned, matched by key name (alpha = 0 and 1 reproduce pre and
 * tuned bit for bit); the head is left as it is. pre and tuned are read only (not const
 * because bert.h hands out its table through a non-const accessor). LEVI_ERR_ARG for alpha
 * outside [0, 1], LEVI_ERR_SHAPE naming the tensor when the encoders do not match m's. */
levi_status levi_ft_interpolate_backbone(levi_ft_model *m, levi_bert *pre, levi_bert *tuned,
                                         float alpha, levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_FINETUNE_H */
