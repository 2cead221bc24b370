/* levi ops: forward/backward kernel pairs over raw float pointers.
 *
 * Conventions (llm.c style):
 *  - shapes are written in the comment of each kernel; all tensors are row-major, contiguous;
 *  - forward writes its output (overwrites) and saves what backward needs in buffers the
 *    caller provides;
 *  - backward ACCUMULATES (+=) into every gradient buffer; the training loop zeroes them;
 *    any gradient pointer may be NULL when that gradient is not wanted (frozen weights,
 *    inputs that are data);
 *  - linear weights use PyTorch's layout [out_features, in_features], so safetensors from
 *    Hugging Face load without transposes.
 * Every kernel has a finite-difference gradient test in tests/test_ops.c.
 * Not for: shape checking of user input (callers validate), allocation (callers own buffers).
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
void levi_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N,
                             int V, int C);

/* Layer norm over the last dim: out[N,C]; saves mean[N] and rstd[N]. w, b: [C]. */
void levi_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                            const float *b, int64_t N, int C, float eps);
void levi_layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                             const float *inp, const float *w, const float *mean,
                             const float *rstd, int64_t N, int C);

/* GELU, erf form as BERT uses: x * 0.5 * (1 + erf(x / sqrt(2))). n elements. */
void levi_gelu_forward(float *out, const float *inp, int64_t n);
void levi_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n);

/* ReLU. Backward uses the forward INPUT (out == inp in-place forward is allowed). */
void levi_relu_forward(float *out, const float *inp, int64_t n);
void levi_relu_backward(float *dinp, const float *inp, const float *dout, int64_t n);

/* Inverted dropout with drop probability p: mask[n] holds 0 or 1/(1-p). p == 0 copies and
 * fills the mask with 1. */
void levi_dropout_forward(float *out, float *mask, const float *inp, int64_t n, float p,
                          levi_rng *rng);
void levi_dropout_backward(float *dinp, const float *dout, const float *mask, int64_t n);

/* Multi-head softmax attention with a key padding mask, in the layout of Hugging Face BERT:
 * q, k, v, out: [B, S, NH*HD] (head h occupies columns h*HD .. h*HD+HD-1).
 * mask: [B, S], 1 for a real token, 0 for padding (padded keys get probability 0; padded
 *   query rows are still computed, as in the reference).
 * probs: [B, NH, S, S] softmax probabilities saved for backward; may be NULL in inference.
 * scale: usually 1/sqrt(HD). */
void levi_attention_forward(float *out, float *probs, const float *q, const float *k,
                            const float *v, const int32_t *mask, int B, int S, int NH, int HD,
                            float scale);
void levi_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                             const float *probs, const float *q, const float *k, const float *v,
                             int B, int S, int NH, int HD, float scale);

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
 * saves probs[N,C]. targets in [0, C) (asserted).
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

/* Batch norm over NCHW (per channel over B*H*W). Training mode uses batch statistics, saves
 * mean[C] and rstd[C], and updates running_mean/running_var (unbiased var) with momentum.
 * Eval mode (training == 0) uses the running statistics. w, b: [C]. */
void levi_batchnorm_forward(float *out, float *mean, float *rstd, float *running_mean,
                            float *running_var, const float *inp, const float *w, const float *b,
                            int B, int C, int HW, float eps, float momentum, int training);
/* Backward of training mode. */
void levi_batchnorm_backward(float *dinp, float *dw, float *db, const float *dout,
                             const float *inp, const float *w, const float *mean,
                             const float *rstd, int B, int C, int HW);

/* Max pool, NCHW, square window k with stride s, no padding: out[B,C,OH,OW],
 * OH = (H - k)/s + 1; argmax[B*C*OH*OW] saves the flat input index of each max. */
void levi_maxpool_forward(float *out, int32_t *argmax, const float *inp, int B, int C, int H,
                          int W, int k, int s);
void levi_maxpool_backward(float *dinp, const float *dout, const int32_t *argmax, int B, int C,
                           int OH, int OW);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_OPS_H */
