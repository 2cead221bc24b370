/* levi EfficientNet: the EfficientNet-Lite0 image backbone (TensorFlow's EfficientNet-Lite
 * release as converted to PyTorch with lukemelas' efficientnet_pytorch key names), forward in
 * inference and training mode, backward for fine-tuning, freezing.
 *
 * For: reading the outputs of the 8 stages a LEVI adapter reads (the 7 block groups and the
 * head) and their global-average-pooled features from [B,3,H,W] images of any H, W >= 32; the
 * ImageNet logits as a sanity check; fine-tuning all weights (FT) or the upper part only (HT)
 * with batch-norm batch statistics. Weights come through a levi_tensor_source, so the model
 * does not depend on the checkpoint's file format.
 * Not for: image decoding, resizing or normalisation (the caller feeds normalised float
 * images; the TF Lite models were trained on (pixel - 127) / 128 for pixels in 0..255), other
 * EfficientNet sizes, dropout or drop-connect (never applied). Training mode normalises with
 * batch statistics, as PyTorch's model.train(), except below the trainable part when
 * levi_effnet_freeze_bn_stats is on.
 *
 * The architecture (EfficientNet-B0 without squeeze-excitation, ReLU6 instead of swish, stem
 * and head not scaled): stem 3x3/2 conv 32 + BN + ReLU6; 16 MBConv blocks in 7 groups
 * (kernel, stride, expansion, out channels, repeats) = (3,1,1,16,1) (3,2,6,24,2) (5,2,6,40,2)
 * (3,2,6,80,3) (5,1,6,112,3) (5,2,6,192,4) (3,1,6,320,1), each block = [1x1 expand + BN +
 * ReLU6] + depthwise kxk + BN + ReLU6 + 1x1 project + BN [+ input when stride 1 and in == out];
 * head 1x1 conv 1280 + BN + ReLU6; classifier = global average pool + linear 1280 -> 1000.
 * Conventions of this checkpoint, as its converter (ml-illustrated/EfficientNet-Lite-PyTorch)
 * defines them: BN eps 1e-3, momentum 0.01 (TF's 0.99); every convolution uses TensorFlow
 * 'SAME' padding computed from the actual input size (levi_conv_same_pad: for even sizes and
 * stride 2 the padding is after-only, e.g. 0 top / 1 bottom for 3x3), because the weights were
 * trained in TensorFlow; symmetric PyTorch padding would shift every stride-2 map by a pixel.
 *
 * Layout: activations are kept channel-major, [C,B,H,W] ("CBHW"), so each 1x1 convolution of
 * a batch is one GEMM and each batch norm channel is one contiguous run. Stage maps are
 * returned in that layout (levi_effnet_stage_nchw copies one to [B,C,H,W]); pooled features
 * and logits are [B,C] rows.
 *
 * Threads: levi_set_num_threads(). One handle serves one caller at a time.
 */
#ifndef LEVI_EFFNET_H
#define LEVI_EFFNET_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fills dst with the float32 tensor `name` of exactly shape[0..ndim), or returns an error
 * (LEVI_ERR_NOT_FOUND when absent, LEVI_ERR_SHAPE when the shape differs) naming the file and
 * tensor. levi_st_read_f32 and levi_pt_read_f32 fit with a one-line wrapper. */
typedef levi_status (*levi_tensor_source)(void *user, const char *name, int ndim,
                                          const int64_t *shape, float *dst, levi_error *err);

#define LEVI_EFFNET_STAGES 8 /* stages 0..6: the block groups; 7: the head */
#define LEVI_EFFNET_BLOCKS 16
#define LEVI_EFFNET_CLASSES 1000
#define LEVI_EFFNET_MIN_SIZE 32

typedef struct levi_effnet levi_effnet;

/* Reads every tensor (247 float tensors; the 49 int64 num_batches_tracked entries are not read)
 * through src. On error returns NULL with err naming the tensor. */
levi_effnet *levi_effnet_load(levi_tensor_source src, void *user, levi_error *err);
/* A levi_tensor_source over a safetensors file: user is a levi_st_file *. */
levi_status levi_effnet_st_source(void *user, const char *name, int ndim, const int64_t *shape,
                                  float *dst, levi_error *err);
void levi_effnet_free(levi_effnet *m); /* NULL is a no-op */

/* The weights (convolutions, BN weight/bias, classifier) by their checkpoint names, with
 * gradients; BN weights and biases and the classifier bias are marked no_decay. Owned by m. */
levi_params *levi_effnet_params(levi_effnet *m);
/* The BN running statistics ("<bn>.running_mean" / ".running_var"): updated by training-mode
 * forwards, never by an optimizer (their grad buffer stays zero). Owned by m. */
levi_params *levi_effnet_buffers(levi_effnet *m);

/* Channels of stage s (16 24 40 80 112 192 320 1280) and its map size for an H x W input
 * (each stride-2 step gives ceil(n/2)). */
int levi_effnet_stage_channels(int s);
void levi_effnet_stage_size(int s, int H, int W, int *OH, int *OW);
/* The first block of stage s (0 1 3 5 8 11 15; the head is block 16). */
int levi_effnet_stage_first_block(int s);

/* Freezes the stem and blocks 0..first_trainable_block-1 (levi_params_set_trainable on their
 * prefixes); blocks from there on, the head and the classifier stay as they were.
 * HT ("upper half trainable") is levi_effnet_freeze_below(m, 8): blocks 8..15 (stages 4..6),
 * head and classifier train. 0 freezes the stem only. Unfreeze everything with
 * levi_params_set_trainable(levi_effnet_params(m), "", 1). */
void levi_effnet_freeze_below(levi_effnet *m, int first_trainable_block);

/* on = 1: in training-mode forwards, the batch norms of the units below the lowest trainable
 * tensor (the stem and the blocks levi_effnet_freeze_below froze) normalise with their running
 * statistics and do not update them, so a half-tuned (HT) backbone's frozen part stays exactly
 * the pre-trained function. Units from the lowest trainable one up use batch statistics.
 * Default 0 (every BN uses batch statistics in training mode, as PyTorch's model.train()). */
void levi_effnet_freeze_bn_stats(levi_effnet *m, int on);

/* The weight of a training-mode batch in the running statistics: running = (1 - momentum)
 * running + momentum batch (PyTorch's convention; default 0.01, the checkpoint's TF 0.99).
 * Setting 1/k before the k-th of a series of training-mode forwards makes the running
 * statistics the plain average of the series' batch statistics ("precise BN"). */
void levi_effnet_set_bn_momentum(levi_effnet *m, float momentum);

typedef enum {
    LEVI_EFFNET_INFER = 0, /* BN running statistics; saves nothing for backward */
    LEVI_EFFNET_TRAIN = 1, /* BN batch statistics, running statistics updated; saves for backward */
} levi_effnet_mode;

typedef struct levi_effnet_forward_params {
    levi_effnet_mode mode;
    int logits; /* 1: also compute the ImageNet logits (1.3 M multiply-adds per image) */
} levi_effnet_forward_params;
levi_effnet_forward_params levi_effnet_default_forward_params(void); /* {INFER, 0} */

/* x: [B,3,H,W] (NCHW, normalised). B >= 1 (>= 2 in training mode: batch statistics of one
 * value are undefined when the last maps are 1x1), H, W >= LEVI_EFFNET_MIN_SIZE; otherwise
 * LEVI_ERR_ARG. Activations live in one arena per mode, sized by levi_effnet_arena_bytes,
 * reused while later batches need no more and regrown once when one needs more. */
levi_status levi_effnet_forward(levi_effnet *m, const float *x, int B, int H, int W,
                                const levi_effnet_forward_params *p, levi_error *err);
size_t levi_effnet_arena_bytes(int B, int H, int W, levi_effnet_mode mode);

/* Results of the last forward, owned by m, valid until the next forward or free:
 * stage s map [C,B,OH,OW] (channel-major; C, OH, OW written when non-NULL), its pooled
 * feature [B,C], and the logits [B,1000] (NULL unless asked for). */
const float *levi_effnet_stage(const levi_effnet *m, int s, int *C, int *OH, int *OW);
const float *levi_effnet_pooled(const levi_effnet *m, int s);
const float *levi_effnet_logits(const levi_effnet *m);
/* Copies stage s of the last forward to dst [B,C,OH,OW]. */
void levi_effnet_stage_nchw(const levi_effnet *m, int s, float *dst);

/* Backward after a LEVI_EFFNET_TRAIN forward (asserted), for a loss whose gradients are given
 * w.r.t. any of: the pooled features (d_pooled[s] [B,C], or NULL), the stage maps (d_maps[s],
 * channel-major [C,B,OH,OW], or NULL) and the logits (d_logits [B,1000], needs a forward with
 * logits). Either array may be NULL. Parameter gradients ACCUMULATE into
 * levi_effnet_params(m)->grad for trainable tensors only; back-propagation stops below the
 * lowest trainable tensor. */
void levi_effnet_backward(levi_effnet *m, const float *const *d_pooled, const float *const *d_maps,
                          const float *d_logits);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_EFFNET_H */
