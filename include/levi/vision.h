/* levi vision: LEVI and baselines for image classification with a frozen EfficientNet-Lite0
 * (paper App. D.2/D.3, vision rows of Tables 2 and 12).
 *
 * For: (1) extracting the frozen backbone's global-average-pooled stage features of a set of
 * (optionally corrupted) images ONCE, cached on disk and reused by later runs; (2) the paper's
 * small CNN trained from scratch (four 3x3 convolutions, each followed by batch norm, ReLU and
 * 2x2 max pooling, flattened); (3) heads over [stage feature; small-CNN output]: LEVI (one
 * adapter MLP per stage plus the CNN; loss = mean of the adapters' cross-entropies,
 * prediction = mean of their softmax probabilities), LP (linear probe on the head's pooled
 * feature), SMALL (the CNN with one MLP head, A4-like) and A3 (stage adapters without the
 * CNN); (4) SGD training with early stopping and learning-rate selection on ID validation.
 * Not for: fine-tuning the backbone (vision_ft.h), data loading or corruption (images.h does both),
 * file formats of results, printing (progress goes to callbacks).
 *
 * Feature cache layout: <root>/<first 16 hex of key>/chunk-NNNNN.safetensors, each holding
 * "features" [rows, total_dim] F16 (the chosen stages' pooled features side by side, stage
 * order) with metadata "key" and "chunk"; manifest.json is written once every chunk exists.
 * The key is the SHA-256 of a text listing every input: the checkpoint file's SHA-256, the
 * SHA-256 of the selected images' indices and pixels, the corruption and its parameters, the
 * preprocessing (resolution, normalisation), the stages, the dtype and the format version. A
 * chunk already on disk with the right key and shape is reused, so an interrupted build
 * resumes; chunks do not depend on which run computed them (same batch size and threads).
 *
 * Ownership: handles are freed with their _free/_close (NULL is harmless); data arrays are
 * borrowed for the duration of a call. A model holds its own workspace: one thread at a time.
 * Determinism: same seed + same thread count => identical weights and predictions.
 */
#ifndef LEVI_VISION_H
#define LEVI_VISION_H

#include "levi/core.h"
#include "levi/effnet.h"
#include "levi/images.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LEVI_VISION_FORMAT_VERSION 1
#define LEVI_VISION_MAX_SLOTS LEVI_EFFNET_STAGES /* feature slots (stages) per cache */
#define LEVI_VISION_MAX_GRID 8
#define LEVI_VISION_MAX_SEEDS 8
#define LEVI_VISION_MAX_SETS 16
#define LEVI_VISION_MAX_EPOCHS 200

/* ---------------------------------------------------------------------------------------
 * (1) Backbone features. */

/* Called once when extraction starts (done = images of reused chunks, rate 0) and after
 * every batch; never on a cache hit. */
typedef void (*levi_vision_progress_fn)(void *user, int64_t done, int64_t total,
                                        double images_per_s);

typedef struct levi_vision_feat_params {
    int resolution; /* backbone input H = W (>= LEVI_EFFNET_MIN_SIZE); default 32: Fashion-MNIST is
                       28x28, and 224 costs ~30x more per image (8 vs 250 images/s, 1 thread) */
    /* Stages whose pooled features are stored (0..6 block groups, 7 head), strictly
       increasing. n_stages == 0: all 8 (the default). */
    int n_stages;
    int stages[LEVI_VISION_MAX_SLOTS];
    /* Normalisation after grey -> 3 channels. Default: the TF Lite convention of this
       checkpoint, (255 p - 127) / 128, i.e. mean 127/255, std 128/255 on every channel
       (effnet.h); ImageNet's mean/std are a choice the caller may make instead. */
    float mean[3], std[3];
    int batch_size;     /* images per forward, default 32 */
    int chunk_size;     /* images per chunk file, default 2048 */
    int threads;        /* > 0: levi_set_num_threads before extracting */
    volatile int *stop; /* nonzero: drop the chunk in progress, return LEVI_ERR_INTERRUPTED */
    int max_chunks;     /* > 0: compute at most this many chunks, then as if stopped */
    levi_vision_progress_fn progress;
    void *progress_user;
} levi_vision_feat_params;
levi_vision_feat_params levi_vision_feat_default_params(void);

/* An image set: rows idx[0..n) of images, each corrupted by `corruption` (kind NONE: clean). */
typedef struct levi_vision_image_set {
    const levi_images *images;
    const int64_t *idx;
    int64_t n;
    levi_corruption corruption;
} levi_vision_image_set;

/* Features of an image set, row i = image idx[i]. */
typedef struct levi_vision_feats {
    int64_t n;
    int n_slots;
    int stages[LEVI_VISION_MAX_SLOTS]; /* stage of each slot */
    int dim[LEVI_VISION_MAX_SLOTS];    /* its channels */
    int offset[LEVI_VISION_MAX_SLOTS]; /* its first column */
    int total_dim;
    float *data; /* [n, total_dim], owned: levi_vision_feats_free */
    char key[65];
    char dir[4096];
    int chunks_computed, chunks_reused;
    double seconds;          /* backbone time of this call */
    int64_t images_computed; /* images run through the backbone by this call */
} levi_vision_feats;
void levi_vision_feats_free(levi_vision_feats *f); /* frees data, zeroes *f; NULL ok */

/* Hashes the checkpoint once; the backbone itself is loaded only when a chunk must be
 * computed. Errors: unreadable checkpoint (LEVI_ERR_IO). */
typedef struct levi_vision_extractor levi_vision_extractor;
levi_status levi_vision_extractor_open(levi_vision_extractor **out, const char *pth_path,
                                       levi_error *err);
/* An extractor over a backbone already in memory (e.g. a fine-tuned one), borrowed: it must
 * outlive the extractor and is not freed by close. id_sha (64 hex) stands for the checkpoint's
 * SHA-256 in cache keys: give the SHA-256 of a file holding exactly these weights, so that
 * different weights never share a cache entry. LEVI_ERR_ARG for a malformed id. */
levi_status levi_vision_extractor_open_model(levi_vision_extractor **out, levi_effnet *model,
                                             const char *id_sha, levi_error *err);
void levi_vision_extractor_close(levi_vision_extractor *x);
/* SHA-256 of the checkpoint file (64 hex). */
const char *levi_vision_extractor_checkpoint_sha(const levi_vision_extractor *x);

/* Cache key of (checkpoint, set, params) without running anything. */
levi_status levi_vision_feat_key(const levi_vision_extractor *x, const levi_vision_image_set *set,
                                 const levi_vision_feat_params *p, char key_hex[65],
                                 levi_error *err);
/* Makes sure the cache for the set exists under root (computing or resuming chunks), then
 * loads it into *out. Errors: bad params (LEVI_ERR_ARG), checkpoint (LEVI_ERR_FORMAT /
 * NOT_FOUND / SHAPE naming the tensor), corruption, I/O, a non-finite feature
 * (LEVI_ERR_NUMERIC), interruption (LEVI_ERR_INTERRUPTED: finished chunks stay). */
levi_status levi_vision_extract(levi_vision_extractor *x, const char *root,
                                const levi_vision_image_set *set, const levi_vision_feat_params *p,
                                levi_vision_feats *out, levi_error *err);

/* ---------------------------------------------------------------------------------------
 * (2, 3) Models. */
typedef enum {
    LEVI_VISION_LEVI = 0, /* CNN + one adapter per feature slot */
    LEVI_VISION_LP,       /* linear map of the last slot (the head's feature) */
    LEVI_VISION_SMALL,    /* CNN + one MLP head (A4-like) */
    LEVI_VISION_A3,       /* one adapter per feature slot, no CNN */
    LEVI_VISION_METHOD_COUNT
} levi_vision_method;
const char *levi_vision_method_name(levi_vision_method m); /* "levi", "lp", "small", "a3" */
int levi_vision_method_parse(const char *name);            /* -1 when unknown */

typedef struct levi_vision_model_params {
    levi_vision_method method;
    int use_cnn;
    int cnn_channels[4]; /* {32, 64, 64, 64} (paper D.2) */
    /* Adapters: one per listed feature slot (-1 = the last slot). n_adapter_slots == 0 with
       feature_adapters: every slot. Without feature_adapters there is one head on the CNN. */
    int feature_adapters;
    int n_adapter_slots;
    int adapter_slots[LEVI_VISION_MAX_SLOTS];
    int adapter_hidden; /* 1024 (paper D.2); 0: linear */
    /* Standardise each feature dimension with the ID-train mean/std (stored in the model):
       the stages' pooled features differ in scale by orders of magnitude, and one LR grid
       should fit every slot. Default on. */
    int standardize;
} levi_vision_model_params;
levi_vision_model_params levi_vision_model_default_params(levi_vision_method m);

/* Task data: borrowed; row r has image r, feature row r and label r. Either images (for a
 * CNN) or feats (for adapters) may be absent when the model does not read them. */
typedef struct levi_vision_data {
    int64_t n;
    int img_h, img_w;    /* >= 16: four 2x2 pools leave at least one pixel */
    const float *images; /* [n, img_h, img_w] grey in [0, 1] */
    int n_slots;
    const int *slot_dim; /* [n_slots] */
    int feat_dim;        /* sum of slot_dim */
    const float *feats;  /* [n, feat_dim] */
    int n_classes;
    const int32_t *labels; /* [n] in [0, n_classes) */
} levi_vision_data;

typedef struct levi_vision_model levi_vision_model;
/* Builds the model for data of shape_of's shapes (weights zero until initialised). */
levi_status levi_vision_model_init(levi_vision_model **out, const levi_vision_model_params *p,
                                   const levi_vision_data *shape_of, levi_error *err);
void levi_vision_model_free(levi_vision_model *m);
/* All weights, BN running statistics and standardisation statistics by name ("cnn.conv0.weight",
 * "cnn.bn0.running_mean", "adapter.3.fc1.weight", "feat.mean", ...); statistics are not
 * trainable. Owned by the model. */
levi_params *levi_vision_model_params_table(levi_vision_model *m);
int levi_vision_model_n_adapters(const levi_vision_model *m);
/* PyTorch default init from seed (conv/linear U(+-1/sqrt(fan_in)), BN 1/0) and the
 * standardisation statistics from the train rows. */
void levi_vision_model_reset(levi_vision_model *m, const levi_vision_data *d, const int64_t *train,
                             int64_t n_train, uint64_t seed);
/* Mean over adapters of the mean cross-entropy of rows[0..n), training mode (BN batch
 * statistics; running statistics updated), gradients ADDED into the table's grad. n >= 2. */
double levi_vision_loss_backward(levi_vision_model *m, const levi_vision_data *d,
                                 const int64_t *rows, int64_t n);
/* Ensemble probabilities probs [n, n_classes] of rows (eval mode). */
void levi_vision_predict(levi_vision_model *m, const levi_vision_data *d, const int64_t *rows,
                         int64_t n, float *probs);
/* Accuracy of the ensemble on rows (0 when n == 0). */
double levi_vision_accuracy(levi_vision_model *m, const levi_vision_data *d, const int64_t *rows,
                            int64_t n);

/* ---------------------------------------------------------------------------------------
 * (4) Training and selection. */
typedef struct levi_vision_progress {
    float lr;
    uint64_t seed;
    int epoch, max_epochs;
    int64_t step, steps_per_epoch;
    double loss; /* mean training loss of the epoch so far */
    int epoch_done;
    double val_acc; /* valid when epoch_done */
} levi_vision_progress;
typedef void (*levi_vision_train_progress_fn)(void *user, const levi_vision_progress *p);

typedef struct levi_vision_train_params {
    float lr;       /* 1e-2 */
    float momentum; /* 0.9 */
    int batch_size; /* 512 (paper D.3) */
    int max_epochs; /* 20 */
    int patience;   /* 4 epochs without a better ID-val accuracy */
    uint64_t seed;
    const volatile int *stop; /* nonzero: LEVI_ERR_INTERRUPTED between steps */
    levi_vision_train_progress_fn progress;
    void *progress_user;
} levi_vision_train_params;
levi_vision_train_params levi_vision_train_default_params(void);

typedef struct levi_vision_train_result {
    int epochs_run, best_epoch;
    double best_val_acc;
    int diverged; /* a non-finite loss stopped the run (best weights kept) */
    double seconds;
    int n_history;
    double loss_history[LEVI_VISION_MAX_EPOCHS];
    double val_history[LEVI_VISION_MAX_EPOCHS];
} levi_vision_train_result;

/* Resets m from tp->seed and trains it; keeps the weights of the best ID-val epoch. */
levi_status levi_vision_train(levi_vision_model *m, const levi_vision_data *d, const int64_t *train,
                              int64_t n_train, const int64_t *val, int64_t n_val,
                              const levi_vision_train_params *tp, levi_vision_train_result *res,
                              levi_error *err);

/* Default grid (paper D.3): {1e-4, 1e-3, 1e-2, 1e-1}; LP {1e-3, 1e-2, 1e-1, 1, 10}. */
int levi_vision_default_lr_grid(levi_vision_method m, float out[LEVI_VISION_MAX_GRID]);

/* An evaluation set: rows of its own data (each OOD group has its own features). */
typedef struct levi_vision_eval_set {
    const char *name;
    const levi_vision_data *data;
    const int64_t *rows;
    int64_t n;
} levi_vision_eval_set;

typedef struct levi_vision_select_result {
    int n_lr;
    float lr[LEVI_VISION_MAX_GRID];
    double lr_val_acc[LEVI_VISION_MAX_GRID]; /* first seed's best ID-val accuracy per lr */
    int best_lr_index;
    int n_seeds;
    levi_vision_train_result train[LEVI_VISION_MAX_SEEDS]; /* at the chosen lr */
    int n_sets;
    double acc[LEVI_VISION_MAX_SEEDS][LEVI_VISION_MAX_SETS];
    double mean[LEVI_VISION_MAX_SETS], std[LEVI_VISION_MAX_SETS]; /* sample std (n-1) */
} levi_vision_select_result;

/* Trains every lr of the grid with seed first_seed, picks the best ID-val accuracy (ties: the
 * smaller lr), trains seeds first_seed+1.. at it, evaluates each seed's best model on every
 * set (the choice never sees them). tp's lr and seed are overridden. */
levi_status levi_vision_select(const levi_vision_model_params *mp,
                               const levi_vision_train_params *tp, const float *lr_grid, int n_lr,
                               int n_seeds, uint64_t first_seed, const levi_vision_data *d,
                               const int64_t *train, int64_t n_train, const int64_t *val,
                               int64_t n_val, const levi_vision_eval_set *sets, int n_sets,
                               levi_vision_select_result *res, levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_VISION_H */
