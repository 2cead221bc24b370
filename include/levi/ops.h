/* levi ops: forward/backward kernel pairs over raw float pointers.
 *
 * Conventions (llm.c style):
 *  - shapes are written in the comment of each kernel; all tensors are row-major and, unless a
 *    kernel takes row strides, contiguous;
 *  - forward writes its output (overwrites) and saves what backward needs in buffers the
 *    caller provides;
 *  - backward ACCUMULATES (+=) into every gradient buffer; the training loop zeroes them;
 *    any gradient pointer may be NULL when that gradient is not wanted (frozen weights,
 *    inputs that are data);
 *  - linear weights use PyTorch's layout [out_features, in_features], so safetensors from
 *    Hugging Face load without transposes.
 * Buffers forward saves only for backward may be NULL when no backward follows:
 *  - layer norm: mean and rstd (either or both);
 *  - dropout: mask, when p == 0 (with p > 0 it is required, and so is the rng);
 *  - attention: probs (then no backward), dropout_seed (also without dropout);
 *  - cross-entropy: probs (loss only);
 *  - batch norm: in training mode running_mean and running_var (no running update); in eval
 *    mode mean and rstd (eval mode needs the running statistics). Batch norm of a
 *    channel-major [C,B,HW] tensor is the [B,C,HW] call with B = 1 and HW = B*HW.
 * Every kernel has a finite-difference gradient test in tests/test_ops.c (the grouped
 * convolution, ReLU6 and global average pool in tests/test_ops_conv.c).
 * Not for: shape checking of user input (callers validate; misuse asserts), allocation
 * (callers own every buffer, scratch included).
 */
#ifndef LEVI_OPS_H
#define LEVI_OPS_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Linear: out[N,OC] = inp[N,C] @ w[OC,C]^T + b[OC]. b may be NULL. */
void levi_linear_forward(float *out, const float *inp, const float *w, const float *b, int64_t N,
                         int C, int OC);
/* dinp[N,C] += dout @ w; dw[OC,C] += dout^T @ inp; db[OC] += sum_n dout. */
void levi_linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                          const float *w, int64_t N, int C, int OC);

/* Embedding lookup: out[N,C] = table[ids[n], :]; ids must be in [0, V) (asserted). */
void levi_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N, int V,
                            int C);
/* dtable[ids[n], :] += dout[n, :]. */
void levi_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N, int V,
                             int C);

/* Layer norm over the last dim: out[N,C]; saves mean[N] and rstd[N] (may be NULL in
 * inference). w, b: [C]. */
void levi_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                            const float *b, int64_t N, int C, float eps);
void levi_layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                             const float *w, const float *mean, const float *rstd, int64_t N,
                             int C);

/* GELU, erf form as BERT uses: x * 0.5 * (1 + erf(x / sqrt(2))). n elements. In place
 * (out == inp) is allowed. Phi comes from polynomial approximations of erfc (Abramowitz &
 * Stegun 7.1.28 forward, 7.1.26 backward): within 3e-7 (|x| + 1) of the exact function. */
void levi_gelu_forward(float *out, const float *inp, int64_t n);
/* Bias and GELU in one pass over a [rows, cols] matrix (a GEMM's output, computed without
 * its bias): pre[r, c] += bias[c], then out = gelu(pre). out == pre (inference) is allowed;
 * otherwise pre keeps the GELU input for levi_gelu_backward. Bit-identical to adding the bias
 * and calling levi_gelu_forward. */
void levi_bias_gelu_forward(float *out, float *pre, const float *bias, int64_t rows, int cols);
/* dinp[n] += dout[n] * gelu'(inp[n]). */
void levi_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n);
/* The same gradient in place, for a caller that owns the gradient buffer:
 * d[n] = d[n] * gelu'(inp[n]) turns dLoss/d out into dLoss/d inp without a second, zeroed
 * buffer (OVERWRITES, the one exception to accumulation). */
void levi_gelu_backward_inplace(float *d, const float *inp, int64_t n);

/* ReLU. Backward uses the forward INPUT (out == inp in-place forward is allowed). */
void levi_relu_forward(float *out, const float *inp, int64_t n);
void levi_relu_backward(float *dinp, const float *inp, const float *dout, int64_t n);

/* Inverted dropout with drop probability p: mask[n] holds 0 or 1/(1-p). p == 0 copies and
 * fills the mask with 1 (mask may then be NULL, and so may rng). */
void levi_dropout_forward(float *out, float *mask, const float *inp, int64_t n, float p,
                          levi_rng *rng);
void levi_dropout_backward(float *dinp, const float *dout, const float *mask, int64_t n);

/* Multi-head softmax attention with a key padding mask, in the layout of Hugging Face BERT,
 * with dropout on the probabilities as BertSelfAttention applies it in training:
 *   out = dropout(softmax(q k^T * scale + mask bias)) v, per sequence and head.
 *
 * Geometry (levi_attention_params): B sequences of S tokens, NH heads of HD columns. Token t of
 * sequence b is row b*S + t of q, k, v and out; head h occupies columns h*HD .. h*HD+HD-1 of a
 * row. Rows are ldq, ldk, ldv, ldo floats apart (>= NH*HD), so Q, K, V may sit side by side in
 * one packed [B*S, 3*NH*HD] buffer (k = q + NH*HD, v = q + 2*NH*HD, ldq = ldk = ldv =
 * 3*NH*HD), and out may be a column block of a wider buffer. In backward, dq, dk, dv have the
 * strides of q, k, v and dout that of out.
 * mask: [B, S] int32, 1 for a real token, 0 for padding. Padded keys get probability exactly
 *   0; padded query rows are still computed, as in the reference; a query row with no valid
 *   key at all gets uniform probabilities 1/S (what Hugging Face's finfo.min bias gives),
 *   never NaN. Keys after a sequence's last valid one cost no time.
 * probs: [B, NH, S, S] softmax probabilities (before dropout) saved for backward; NULL when no
 *   backward follows (inference).
 * dropout (p.dropout in [0, 1)): each probability is zeroed with probability p.dropout and
 *   the others scaled by 1/(1 - p.dropout). The decisions are a hash of a 64-bit seed and the
 *   element's index [b, h, i, j], so backward recomputes them rather than reading a saved
 *   [B, NH, S, S] mask: forward draws the seed from rng (one levi_rng_u64; rng is required
 *   when p.dropout > 0) and stores it in *dropout_seed (may be NULL when no backward follows);
 *   pass that value to backward. Same rng state, same decisions, for any thread count.
 * scratch: work space of at least levi_attention_scratch_floats(S, NH, HD, 1) floats; the
 *   kernels run on at most as many OpenMP threads as the scratch has per-thread slots
 *   (levi_attention_scratch_floats(S, NH, HD, threads) serves `threads`). One scratch per
 *   concurrent caller.
 * Results do not depend on the thread count. Backward accumulates into dq, dk, dv (any may be
 * NULL); padded keys and values receive exactly 0. */
typedef struct levi_attention_params {
    int B, S, NH, HD;       /* sequences, tokens per sequence, heads, head width */
    int ldq, ldk, ldv, ldo; /* row strides in floats (>= NH*HD) */
    float scale;            /* score scale, usually 1/sqrt(HD) */
    float dropout;          /* drop probability on the attention probabilities; 0: none */
    /* NULL, or the biases of q | k | v ([3 * NH*HD]), added to the rows as they are read, so
     * the projection GEMM before needs no bias pass. Inference only (no probs, no dropout). */
    const float *bias;
} levi_attention_params;

/* Contiguous rows (every stride NH*HD), scale 1/sqrt(HD), no dropout. */
levi_attention_params levi_attention_default_params(int B, int S, int NH, int HD);
/* Floats of scratch for `threads` threads (asserts S, NH, HD, threads > 0). */
size_t levi_attention_scratch_floats(int S, int NH, int HD, int threads);

void levi_attention_forward(float *out, float *probs, uint64_t *dropout_seed, const float *q,
                            const float *k, const float *v, const int32_t *mask,
                            levi_attention_params p, levi_rng *rng, float *scratch,
                            size_t scratch_floats);
/* probs and dropout_seed as the forward saved them (dropout_seed is ignored without dropout);
 * mask and p as given to the forward. */
void levi_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *probs,
                             uint64_t dropout_seed, const float *q, const float *k, const float *v,
                             const int32_t *mask, levi_attention_params p, float *scratch,
                             size_t scratch_floats);

/* Residual add: out[n] = a[n] + b[n]. Backward: da += dout; db += dout. */
void levi_add_forward(float *out, const float *a, const float *b, int64_t n);
void levi_add_backward(float *da, float *db, const float *dout, int64_t n);

/* Mean over valid tokens: out[B,C] = sum_s mask[b,s] * inp[b,s,:] / max(1, sum_s mask[b,s]). */
void levi_meanpool_forward(float *out, const float *inp, const int32_t *mask, int B, int S, int C);
void levi_meanpool_backward(float *dinp, const float *dout, const int32_t *mask, int B, int S,
                            int C);

/* Concatenate along the last dim: out[N, CA+CB] = [a[N,CA], b[N,CB]]. */
void levi_concat_forward(float *out, const float *a, const float *b, int64_t N, int CA, int CB);
void levi_concat_backward(float *da, float *db, const float *dout, int64_t N, int CA, int CB);

/* Mean squared error: returns mean over n of (pred - target)^2.
 * Backward: dpred += scale * 2 * (pred - target) / n (scale = upstream gradient, 1 for a
 * plain loss, a weight for a weighted sum of losses). */
float levi_mse_forward(const float *pred, const float *target, int64_t n);
void levi_mse_backward(float *dpred, const float *pred, const float *target, int64_t n,
                       float scale);

/* Softmax cross-entropy over C classes: returns the mean over N of -log softmax(logits)[y];
 * saves probs[N,C] (may be NULL: loss only). targets in [0, C) (asserted).
 * Backward: dlogits += scale * (probs - onehot(y)) / N. */
float levi_crossentropy_forward(float *probs, const float *logits, const int32_t *targets,
                                int64_t N, int C);
void levi_crossentropy_backward(float *dlogits, const float *probs, const int32_t *targets,
                                int64_t N, int C, float scale);

/* 2-D convolution, NCHW: inp[B,IC,H,W], w[OC,IC,KH,KW], b[OC] (may be NULL),
 * out[B,OC,OH,OW] with OH = (H + 2*pad - KH)/stride + 1 (same for OW).
 * col: scratch of IC*KH*KW*OH*OW floats (im2col of one image). */
void levi_conv2d_forward(float *out, float *col, const float *inp, const float *w, const float *b,
                         int B, int IC, int H, int W, int OC, int KH, int KW, int stride, int pad);
void levi_conv2d_backward(float *dinp, float *dw, float *db, float *col, const float *dout,
                          const float *inp, const float *w, int B, int IC, int H, int W, int OC,
                          int KH, int KW, int stride, int pad);

/* Grouped 2-D convolution with explicit zero padding, in either of two layouts:
 *   channel_major == 0: inp [B,IC,H,W], out [B,OC,OH,OW] (NCHW, as PyTorch);
 *   channel_major == 1: inp [IC,B,H,W], out [OC,B,OH,OW], where a 1x1 convolution of the
 *   whole batch is one GEMM.
 * w [OC, IC/groups, KH, KW] (PyTorch's layout), b [OC] or NULL. groups divides IC and OC;
 * groups == IC == OC is a depthwise convolution (direct loops, at most LEVI_CONV_MAX_TAPS
 * taps). OH = (H + pad_top + pad_bottom - KH)/stride + 1, OW likewise with left/right. */
#define LEVI_CONV_MAX_TAPS 64
typedef struct levi_conv_geom {
    int KH, KW;
    int stride; /* the same in both directions */
    int pad_top, pad_bottom, pad_left, pad_right;
    int groups;
    int channel_major;
} levi_conv_geom;

/* Output size along one axis (0 when the kernel does not fit). */
int levi_conv_out_size(int n, int k, int stride, int pad_before, int pad_after);
/* TensorFlow's 'SAME' padding for an axis of n pixels: output ceil(n/stride); the total
 * padding max((out-1)*stride + k - n, 0) is split with the odd pixel AFTER (bottom/right). */
void levi_conv_same_pad(int n, int k, int stride, int *pad_before, int *pad_after);
/* A square K x K kernel with 'SAME' padding for an H x W input. */
levi_conv_geom levi_conv_geom_same(int H, int W, int K, int stride, int groups, int channel_major);
/* Floats of the col scratch: IC/groups*KH*KW*OH*OW, or 0 when the geometry needs none
 * (depthwise, or 1x1 stride 1 unpadded). */
size_t levi_gconv2d_col_floats(int IC, int H, int W, int OC, levi_conv_geom g);
void levi_gconv2d_forward(float *out, float *col, const float *inp, const float *w, const float *b,
                          int B, int IC, int H, int W, int OC, levi_conv_geom g);
/* dinp (layout of inp) += ..., dw [OC,IC/groups,KH,KW] += ..., db [OC] += ...; dout in the
 * layout of out. Results do not depend on the OpenMP thread count except through OpenBLAS. */
void levi_gconv2d_backward(float *dinp, float *dw, float *db, float *col, const float *dout,
                           const float *inp, const float *w, int B, int IC, int H, int W, int OC,
                           levi_conv_geom g);
/* The naive definition (accumulates in double), for tests of the fast paths. */
void levi_gconv2d_forward_ref(float *out, const float *inp, const float *w, const float *b, int B,
                              int IC, int H, int W, int OC, levi_conv_geom g);

/* ReLU6: out = min(max(x, 0), 6); n elements, in place allowed. Backward reads the forward
 * OUTPUT (so an in-place forward keeps what it needs): dinp += dout where 0 < out < 6.
 * _inplace: d = d where 0 < out < 6, else 0 (OVERWRITES, like levi_gelu_backward_inplace). */
void levi_relu6_forward(float *out, const float *inp, int64_t n);
void levi_relu6_backward(float *dinp, const float *out, const float *dout, int64_t n);
void levi_relu6_backward_inplace(float *d, const float *out, int64_t n);

/* Global average pool over HW: inp [B,C,HW] (channel_major 0) or [C,B,HW] (1) -> out [B,C].
 * Backward: dinp += dout / HW. */
void levi_avgpool_global_forward(float *out, const float *inp, int B, int C, int64_t HW,
                                 int channel_major);
void levi_avgpool_global_backward(float *dinp, const float *dout, int B, int C, int64_t HW,
                                  int channel_major);

/* Batch norm over NCHW (per channel over B*H*W). Training mode uses batch statistics, saves
 * mean[C] and rstd[C], and updates running_mean/running_var (unbiased var) with momentum
 * (either may be NULL: no update). Eval mode (training == 0) uses the running statistics
 * (required) and fills mean/rstd from them when those are non-NULL. w, b: [C]. */
void levi_batchnorm_forward(float *out, float *mean, float *rstd, float *running_mean,
                            float *running_var, const float *inp, const float *w, const float *b,
                            int B, int C, int HW, float eps, float momentum, int training);
/* Backward of training mode. */
void levi_batchnorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                             const float *w, const float *mean, const float *rstd, int B, int C,
                             int HW);

/* Max pool, NCHW, square window k with stride s, no padding: out[B,C,OH,OW],
 * OH = (H - k)/s + 1; argmax[B*C*OH*OW] saves the flat input index of each max. */
void levi_maxpool_forward(float *out, int32_t *argmax, const float *inp, int B, int C, int H, int W,
                          int k, int s);
void levi_maxpool_backward(float *dinp, const float *dout, const int32_t *argmax, int B, int C,
                           int OH, int OW);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_OPS_H */
