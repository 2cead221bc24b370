/* levi ops: forward/backward kernels of the image layers (2-D convolution, batch norm, max
 * pool), NCHW, as declared in include/levi/ops.h.
 *
 * For: the small CNN of the vision task. Convolution is im2col of one image followed by one
 * levi_gemm (OpenBLAS threads the GEMM); the other loops are plain and threaded over channels
 * or planes with OpenMP when big enough.
 * Not for: grouped or depthwise convolution, dilation, padding modes other than zeros, or
 * padded/ceil-mode pooling. Not for shape validation of user input either (callers validate).
 *
 * Beyond the header: in eval mode batch norm fills mean/rstd from the running statistics when
 * they are non-NULL; in training mode running_mean/running_var may be NULL (no update).
 */
#include "levi/ops.h"

#include <math.h>
#include <string.h>

#ifdef _OPENMP
#define LEVI__PRAGMA(x) _Pragma(#x)
/* Threads only when cond holds: small tensors would pay more for the parallel region than
 * for the loop. */
#define LEVI__OMP_FOR_IF(cond) LEVI__PRAGMA(omp parallel for if(cond))
/* -O2 vectorises a loop of unknown length only when told to; reductions need the clause
 * because we do not build with -ffast-math. */
#define LEVI__OMP_SIMD LEVI__PRAGMA(omp simd)
#define LEVI__OMP_SIMD_SUM(var) LEVI__PRAGMA(omp simd reduction(+ : var))
#define LEVI__OMP_SIMD_SUM2(a, b) LEVI__PRAGMA(omp simd reduction(+ : a, b))
#else
#define LEVI__OMP_FOR_IF(cond)
#define LEVI__OMP_SIMD
#define LEVI__OMP_SIMD_SUM(var)
#define LEVI__OMP_SIMD_SUM2(a, b)
#endif

#define LEVI__PAR_WORK (1 << 15)

/* ----------------------------------------------------------------------------------------
 * Convolution */

static int levi__conv_out(int n, int k, int stride, int pad) {
    return (n + 2 * pad - k) / stride + 1;
}

/* col[IC*KH*KW, OH*OW] from one image x[IC,H,W]; taps that fall in the padding are zeros. */
static void levi__im2col(float *col, const float *x, int IC, int H, int W, int KH, int KW,
                         int stride, int pad, int OH, int OW) {
    const int K = IC * KH * KW;
    const int64_t P = (int64_t)OH * OW;
    LEVI__OMP_FOR_IF((int64_t)K * P > LEVI__PAR_WORK)
    for (int r = 0; r < K; r++) {
        int c = r / (KH * KW), kh = (r / KW) % KH, kw = r % KW;
        const float *xc = x + (int64_t)c * H * W;
        float *dst = col + (int64_t)r * P;
        for (int oh = 0; oh < OH; oh++) {
            int ih = oh * stride - pad + kh;
            float *d = dst + (int64_t)oh * OW;
            if (ih < 0 || ih >= H) {
                for (int ow = 0; ow < OW; ow++) d[ow] = 0.0f;
                continue;
            }
            const float *xr = xc + (int64_t)ih * W;
            LEVI__OMP_SIMD
            for (int ow = 0; ow < OW; ow++) {
                int iw = ow * stride - pad + kw;
                d[ow] = (iw >= 0 && iw < W) ? xr[iw] : 0.0f;
            }
        }
    }
}

/* dx[IC,H,W] += the col2im scatter of dcol[IC*KH*KW, OH*OW]. Threads own input channels, so
 * the overlapping taps of one channel are summed by one thread, in a fixed order. */
static void levi__col2im_add(float *dx, const float *dcol, int IC, int H, int W, int KH, int KW,
                             int stride, int pad, int OH, int OW) {
    const int64_t P = (int64_t)OH * OW;
    LEVI__OMP_FOR_IF(IC > 1 && (int64_t)IC * KH * KW * P > LEVI__PAR_WORK)
    for (int c = 0; c < IC; c++) {
        float *xc = dx + (int64_t)c * H * W;
        for (int kh = 0; kh < KH; kh++)
            for (int kw = 0; kw < KW; kw++) {
                const float *src = dcol + ((int64_t)(c * KH + kh) * KW + kw) * P;
                for (int oh = 0; oh < OH; oh++) {
                    int ih = oh * stride - pad + kh;
                    if (ih < 0 || ih >= H) continue;
                    float *xr = xc + (int64_t)ih * W;
                    const float *s = src + (int64_t)oh * OW;
                    for (int ow = 0; ow < OW; ow++) {
                        int iw = ow * stride - pad + kw;
                        if (iw >= 0 && iw < W) xr[iw] += s[ow];
                    }
                }
            }
    }
}

/* A 1x1 convolution with stride 1 and no padding is a GEMM on the image itself. */
static int levi__conv_is_pointwise(int KH, int KW, int stride, int pad) {
    return KH == 1 && KW == 1 && stride == 1 && pad == 0;
}

void levi_conv2d_forward(float *out, float *col, const float *inp, const float *w, const float *b,
                         int B, int IC, int H, int W, int OC, int KH, int KW, int stride, int pad) {
    // inp[B,IC,H,W], w[OC,IC,KH,KW], b[OC] -> out[B,OC,OH,OW]; col [IC*KH*KW, OH*OW]
    LEVI_ASSERT(stride > 0 && pad >= 0 && KH > 0 && KW > 0, "conv2d geometry");
    const int OH = levi__conv_out(H, KH, stride, pad), OW = levi__conv_out(W, KW, stride, pad);
    LEVI_ASSERT(OH > 0 && OW > 0, "conv2d kernel larger than the padded input");
    const int K = IC * KH * KW, P = OH * OW;
    const int pointwise = levi__conv_is_pointwise(KH, KW, stride, pad);
    for (int n = 0; n < B; n++) {
        const float *x = inp + (int64_t)n * IC * H * W;
        float *o = out + (int64_t)n * OC * P;
        const float *cm = x;
        if (!pointwise) {
            levi__im2col(col, x, IC, H, W, KH, KW, stride, pad, OH, OW);
            cm = col;
        }
        if (b) // bias first, GEMM accumulates onto it (beta = 1)
            for (int oc = 0; oc < OC; oc++)
                for (int p = 0; p < P; p++) o[(int64_t)oc * P + p] = b[oc];
        levi_gemm(0, 0, OC, P, K, 1.0f, w, K, cm, P, b ? 1.0f : 0.0f, o, P);
    }
}

void levi_conv2d_backward(float *dinp, float *dw, float *db, float *col, const float *dout,
                          const float *inp, const float *w, int B, int IC, int H, int W, int OC,
                          int KH, int KW, int stride, int pad) {
    // dout[B,OC,OH,OW]; col is reused: first the im2col of the input (for dw), then the
    // column gradient (for dinp), so one image-sized scratch serves both.
    LEVI_ASSERT(stride > 0 && pad >= 0 && KH > 0 && KW > 0, "conv2d geometry");
    const int OH = levi__conv_out(H, KH, stride, pad), OW = levi__conv_out(W, KW, stride, pad);
    LEVI_ASSERT(OH > 0 && OW > 0, "conv2d kernel larger than the padded input");
    const int K = IC * KH * KW, P = OH * OW;
    const int pointwise = levi__conv_is_pointwise(KH, KW, stride, pad);
    for (int n = 0; n < B; n++) {
        const float *x = inp + (int64_t)n * IC * H * W;
        const float *d = dout + (int64_t)n * OC * P;
        if (db)
            for (int oc = 0; oc < OC; oc++) {
                const float *dr = d + (int64_t)oc * P;
                float s = 0.0f;
                LEVI__OMP_SIMD_SUM(s)
                for (int p = 0; p < P; p++) s += dr[p];
                db[oc] += s;
            }
        if (dw) { // dw[OC,K] += dout_n[OC,P] @ col[K,P]^T
            const float *cm = x;
            if (!pointwise) {
                levi__im2col(col, x, IC, H, W, KH, KW, stride, pad, OH, OW);
                cm = col;
            }
            levi_gemm(0, 1, OC, K, P, 1.0f, d, P, cm, P, 1.0f, dw, K);
        }
        if (dinp) { // dcol[K,P] = w[OC,K]^T @ dout_n[OC,P], then scattered back
            float *dx = dinp + (int64_t)n * IC * H * W;
            if (pointwise) {
                levi_gemm(1, 0, K, P, OC, 1.0f, w, K, d, P, 1.0f, dx, P);
            } else {
                levi_gemm(1, 0, K, P, OC, 1.0f, w, K, d, P, 0.0f, col, P);
                levi__col2im_add(dx, col, IC, H, W, KH, KW, stride, pad, OH, OW);
            }
        }
    }
}

/* ----------------------------------------------------------------------------------------
 * Batch norm. Statistics per channel over B*HW values, summed in double: a channel can hold
 * hundreds of thousands of values, where a float sum loses digits. */

void levi_batchnorm_forward(float *out, float *mean, float *rstd, float *running_mean,
                            float *running_var, const float *inp, const float *w, const float *b,
                            int B, int C, int HW, float eps, float momentum, int training) {
    // inp, out [B,C,HW]; w, b, mean, rstd, running_* [C]
    LEVI_ASSERT(w && b, "batchnorm needs w and b");
    const int64_t n = (int64_t)B * HW;
    if (training) {
        LEVI_ASSERT(mean && rstd, "batchnorm training needs mean and rstd buffers for backward");
        // PyTorch refuses this too: the unbiased variance of one value is undefined.
        LEVI_ASSERT(n > 1, "batchnorm training needs more than one value per channel");
    } else {
        LEVI_ASSERT(running_mean && running_var, "batchnorm eval needs the running statistics");
    }
    LEVI__OMP_FOR_IF(C > 1 && n * C > LEVI__PAR_WORK)
    for (int c = 0; c < C; c++) {
        float m, s;
        if (training) {
            double sum = 0.0;
            for (int bi = 0; bi < B; bi++) {
                const float *x = inp + ((int64_t)bi * C + c) * HW;
                LEVI__OMP_SIMD_SUM(sum)
                for (int i = 0; i < HW; i++) sum += x[i];
            }
            double dm = sum / (double)n, sq = 0.0;
            for (int bi = 0; bi < B; bi++) {
                const float *x = inp + ((int64_t)bi * C + c) * HW;
                LEVI__OMP_SIMD_SUM(sq)
                for (int i = 0; i < HW; i++) {
                    double dd = x[i] - dm;
                    sq += dd * dd;
                }
            }
            double var = sq / (double)n; // biased: what normalises the batch
            m = (float)dm;
            s = (float)(1.0 / sqrt(var + (double)eps));
            if (running_mean) running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * m;
            if (running_var) // unbiased, as PyTorch stores it
                running_var[c] =
                    (1.0f - momentum) * running_var[c] + momentum * (float)(sq / (double)(n - 1));
        } else {
            m = running_mean[c];
            s = 1.0f / sqrtf(running_var[c] + eps);
        }
        if (mean) mean[c] = m;
        if (rstd) rstd[c] = s;
        float scale = s * w[c], shift = b[c] - m * s * w[c];
        for (int bi = 0; bi < B; bi++) {
            const float *x = inp + ((int64_t)bi * C + c) * HW;
            float *o = out + ((int64_t)bi * C + c) * HW;
            LEVI__OMP_SIMD
            for (int i = 0; i < HW; i++) o[i] = x[i] * scale + shift;
        }
    }
}

void levi_batchnorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                             const float *w, const float *mean, const float *rstd, int B, int C,
                             int HW) {
    // Training-mode gradient: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w,
    // means over the B*HW values of the channel.
    LEVI_ASSERT(mean && rstd, "batchnorm backward needs the mean and rstd saved by forward");
    const int64_t n = (int64_t)B * HW;
    LEVI__OMP_FOR_IF(C > 1 && n * C > LEVI__PAR_WORK)
    for (int c = 0; c < C; c++) {
        float m = mean[c], s = rstd[c];
        double sd = 0.0, sdx = 0.0; // sum dout, sum dout * xhat
        for (int bi = 0; bi < B; bi++) {
            const float *x = inp + ((int64_t)bi * C + c) * HW;
            const float *d = dout + ((int64_t)bi * C + c) * HW;
            LEVI__OMP_SIMD_SUM2(sd, sdx)
            for (int i = 0; i < HW; i++) {
                sd += d[i];
                sdx += (double)d[i] * ((x[i] - m) * s);
            }
        }
        if (dw) dw[c] += (float)sdx;
        if (db) db[c] += (float)sd;
        if (!dinp) continue;
        float wc = w ? w[c] : 1.0f;
        float gm = (float)(sd / (double)n) * wc, gxm = (float)(sdx / (double)n) * wc;
        for (int bi = 0; bi < B; bi++) {
            const float *x = inp + ((int64_t)bi * C + c) * HW;
            const float *d = dout + ((int64_t)bi * C + c) * HW;
            float *dx = dinp + ((int64_t)bi * C + c) * HW;
            LEVI__OMP_SIMD
            for (int i = 0; i < HW; i++) {
                float xhat = (x[i] - m) * s;
                dx[i] += s * (d[i] * wc - gm - xhat * gxm);
            }
        }
    }
}

/* ----------------------------------------------------------------------------------------
 * Max pool */

void levi_maxpool_forward(float *out, int32_t *argmax, const float *inp, int B, int C, int H, int W,
                          int k, int s) {
    // inp[B,C,H,W] -> out, argmax [B,C,OH,OW]; argmax holds flat indices into inp
    LEVI_ASSERT(k > 0 && s > 0 && k <= H && k <= W, "maxpool geometry");
    LEVI_ASSERT((int64_t)B * C * H * W <= INT32_MAX, "maxpool input too large for int32 argmax");
    const int OH = (H - k) / s + 1, OW = (W - k) / s + 1;
    const int planes = B * C;
    LEVI__OMP_FOR_IF(planes > 1 && (int64_t)planes * H * W > LEVI__PAR_WORK)
    for (int pl = 0; pl < planes; pl++) {
        const float *x = inp + (int64_t)pl * H * W;
        float *o = out + (int64_t)pl * OH * OW;
        int32_t *am = argmax + (int64_t)pl * OH * OW;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int bi = oh * s * W + ow * s;
                float best = x[bi];
                for (int dh = 0; dh < k; dh++)
                    for (int dw = 0; dw < k; dw++) {
                        int idx = (oh * s + dh) * W + ow * s + dw;
                        // PyTorch's rule: the first maximum wins ties and a NaN always takes
                        // over. Written as selects: the comparison is data-dependent and a
                        // branch on it mispredicts about half the time.
                        float v = x[idx];
                        int take = (v > best) | (v != v);
                        best = take ? v : best;
                        bi = take ? idx : bi;
                    }
                o[oh * OW + ow] = best;
                am[oh * OW + ow] = (int32_t)((int64_t)pl * H * W + bi);
            }
    }
}

void levi_maxpool_backward(float *dinp, const float *dout, const int32_t *argmax, int B, int C,
                           int OH, int OW) {
    // dinp[argmax[i]] += dout[i]. Windows may overlap (s < k), so two outputs can route to one
    // input; threads own whole planes, and an argmax never leaves its plane.
    if (!dinp) return;
    const int planes = B * C;
    const int64_t P = (int64_t)OH * OW;
    LEVI__OMP_FOR_IF(planes > 1 && planes * P > LEVI__PAR_WORK)
    for (int pl = 0; pl < planes; pl++)
        for (int64_t i = pl * P; i < (pl + 1) * P; i++) dinp[argmax[i]] += dout[i];
}
