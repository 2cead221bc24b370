/* levi vision fine-tuning: the backbone-training vision baselines of the paper (Sec. 5, App.
 * D.3): EfficientNet-Lite0 plus a linear head on the global-average-pooled head stage (1280),
 * trained end to end with SGD on the task's images, and the post-hoc FT+ZeroShot (WiSE-FT)
 * weight interpolation.
 *
 * Modes (what trains; the head always does):
 *   FT     every backbone tensor except the unused ImageNet classifier (_fc.*);
 *   HT     blocks LEVI_VISION_HT_FIRST_BLOCK..15 and the head conv (stages 4..7); the stem and
 *          lower blocks are frozen, their batch norms use the running statistics and leave
 *          them unchanged (levi_effnet_freeze_bn_stats), so that part stays the pre-trained
 *          function bit for bit;
 *   LP_FT  Kumar et al. 2022b: a linear probe on the frozen features first (the caller trains
 *          it, e.g. levi_vision LP; levi_vision_ft_probe_from_lp folds its standardisation into
 *          the weights), then FT starting from that head.
 * Images: borrowed levi_vision_data rows (grey [img_h, img_w] in [0, 1]); every step resizes
 * them bilinearly to resolution x resolution, replicates the grey channel and normalises as
 * the feature cache does (vision.h), then runs them through the backbone: no feature cache.
 * Batch norm in training steps uses batch statistics (PyTorch model.train()); evaluation uses
 * the running statistics, recomputed before each evaluation of a training run (precise BN,
 * see levi_vision_ft_model_params).
 * Randomness: the head's initialisation and the shuffles come from the run's seed (first and
 * second split of one levi_rng); same seed + same threads => identical weights.
 *
 * Not for: data loading or corruption (images.h), the cached-feature methods (vision.h),
 * printing (progress goes to the levi_vision_train_params callback), file formats of results.
 * Ownership: a handle owns its backbone, head and a copy of the pre-trained weights; free with
 * levi_vision_ft_free (NULL is harmless). One thread at a time per handle.
 */
#ifndef LEVI_VISION_FT_H
#define LEVI_VISION_FT_H

#include "levi/core.h"
#include "levi/effnet.h"
#include "levi/vision.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LEVI_VISION_HT_FIRST_BLOCK 8 /* blocks 8..15 = stages 4, 5, 6 (upper half of 16) */
#define LEVI_VISION_FT_FEATURE 1280  /* width of the pooled head stage the linear head reads */

typedef enum {
    LEVI_VISION_FT = 0, /* "ft" */
    LEVI_VISION_HT,     /* "ht" */
    LEVI_VISION_LP_FT,  /* "lp-ft" */
    LEVI_VISION_FT_MODE_COUNT
} levi_vision_ft_mode;
const char *levi_vision_ft_mode_name(levi_vision_ft_mode mode);
int levi_vision_ft_mode_parse(const char *name); /* -1 when unknown */

typedef struct levi_vision_ft_model_params {
    int n_classes;         /* 10 */
    int resolution;        /* backbone input, >= LEVI_EFFNET_MIN_SIZE (32, as the feature cache) */
    float mean[3], std[3]; /* normalisation; default the TF Lite convention of vision.h */
    int eval_batch;        /* images per inference forward (256) */
    /* Precise BN (Wu & Johnson 2021): before each ID-validation evaluation, the running
       statistics of the trained BN layers are recomputed as the average batch statistics of
       the first precise_bn_rows training rows (train-mode forwards of batch_size rows, no
       update of weights). Why: the checkpoint's BN momentum is 0.01, so after the ~100 steps
       of a small task the running statistics are still mostly ImageNet's while the weights
       moved, and inference-mode accuracy is then far below the model's (measured: 42% ID-val
       after 24 steps). 0: keep the momentum-updated statistics. Default 2048. */
    int precise_bn_rows;
} levi_vision_ft_model_params;
levi_vision_ft_model_params levi_vision_ft_default_model_params(void);

typedef struct levi_vision_ft_model levi_vision_ft_model;

/* Loads the pre-trained backbone through src (effnet.h) and keeps a copy of it; the head is
 * zero until levi_vision_ft_reset. Errors: bad params (LEVI_ERR_ARG naming the field), the
 * checkpoint's (tensor named). */
levi_status levi_vision_ft_init(levi_vision_ft_model **out, levi_tensor_source src, void *user,
                                const levi_vision_ft_model_params *p, levi_error *err);
void levi_vision_ft_free(levi_vision_ft_model *m);

levi_effnet *levi_vision_ft_backbone(levi_vision_ft_model *m); /* owned by m */
levi_params *levi_vision_ft_head(levi_vision_ft_model *m); /* "head.weight" [K,1280], "head.bias" */

/* Backbone back to the pre-trained weights and statistics, trainable tensors and BN freezing
 * as `mode` says, head = probe_w [K,1280] / probe_b [K] when given (LP_FT), else PyTorch's
 * nn.Linear default U(+-1/sqrt(1280)) from seed. */
void levi_vision_ft_reset(levi_vision_ft_model *m, levi_vision_ft_mode mode, uint64_t seed,
                          const float *probe_w, const float *probe_b);

/* Mean cross-entropy of rows[0..n) (n >= 2) in training mode; gradients ADDED into the
 * backbone's trainable tensors and the head. Images must be data of img_h x img_w. */
double levi_vision_ft_loss_backward(levi_vision_ft_model *m, const levi_vision_data *d,
                                    const int64_t *rows, int64_t n);
/* Softmax probabilities [n, K] in inference mode (running statistics). */
void levi_vision_ft_predict(levi_vision_ft_model *m, const levi_vision_data *d, const int64_t *rows,
                            int64_t n, float *probs);
double levi_vision_ft_accuracy(levi_vision_ft_model *m, const levi_vision_data *d,
                               const int64_t *rows, int64_t n);

/* Resets m for mode from tp->seed (head from the probe when given) and trains it with SGD
 * (tp->lr, tp->momentum, tp->batch_size), early stopping on ID-val accuracy (tp->patience);
 * keeps the best epoch's weights AND BN statistics. Errors as levi_vision_train. */
levi_status levi_vision_ft_train(levi_vision_ft_model *m, levi_vision_ft_mode mode,
                                 const float *probe_w, const float *probe_b,
                                 const levi_vision_data *d, const int64_t *train, int64_t n_train,
                                 const int64_t *val, int64_t n_val,
                                 const levi_vision_train_params *tp, levi_vision_train_result *res,
                                 levi_error *err);

/* State = backbone parameters, backbone BN statistics and head, one float array of
 * levi_vision_ft_state_numel() floats in that order (table order). */
size_t levi_vision_ft_state_numel(const levi_vision_ft_model *m);
void levi_vision_ft_state_get(levi_vision_ft_model *m, float *dst);
void levi_vision_ft_state_set(levi_vision_ft_model *m, const float *src);
/* The current state as safetensors (checkpoint key names, "head.weight", "head.bias"; metadata
 * pairs optional), written atomically; and read back (every tensor by name and shape). */
levi_status levi_vision_ft_save(levi_vision_ft_model *m, const char *path,
                                const char *const *meta_keys, const char *const *meta_vals,
                                int n_meta, levi_error *err);
levi_status levi_vision_ft_load(levi_vision_ft_model *m, const char *path, levi_error *err);

/* FT+ZeroShot (WiSE-FT, Wortsman et al. 2022b): every backbone parameter and BN statistic
 * becomes (1 - alpha) pre-trained + alpha fine-tuned (ft_state from levi_vision_ft_state_get);
 * the head is the fine-tuned head (the ImageNet model has no head for the task's classes).
 * alpha = 1 is exactly the fine-tuned model, alpha = 0 the pre-trained backbone under the
 * fine-tuned head. */
void levi_vision_ft_interpolate(levi_vision_ft_model *m, const float *ft_state, float alpha);
/* Precise BN on the current weights: the running statistics of every BN layer that the
 * current mode trains become the mean of the batch statistics of rows[0..n) in training-mode
 * forwards of batch_size rows (weights untouched). For interpolated weights (WiSE-FT), whose
 * interpolated statistics need not match them. */
void levi_vision_ft_recompute_bn(levi_vision_ft_model *m, const levi_vision_data *d,
                                 const int64_t *rows, int64_t n, int batch_size);

/* The linear probe of a trained LEVI_VISION_LP model (vision.h) as a head on raw pooled
 * features: w' = w / std, b' = b - w' mean (its standardisation folded in), so that
 * head(feature) equals the probe's logits. The LP model's last slot must be the 1280-wide
 * head stage. probe_w [K,1280], probe_b [K]. LEVI_ERR_SHAPE otherwise. */
levi_status levi_vision_ft_probe_from_lp(levi_vision_model *lp, float *probe_w, float *probe_b,
                                         levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_VISION_FT_H */
