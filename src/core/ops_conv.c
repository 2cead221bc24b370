/* levi ops: forward/backward kernels of the image layers (2-D convolution, grouped and
 * depthwise convolution with explicit padding, batch norm, ReLU6, max pool, global average
 * pool), as declared in include/levi/ops.h.
 *
 * For: the small CNN of the vision task and the EfficientNet-Lite backbone. A dense
 * convolution is im2col of one image (and one group) followed by one levi_gemm (OpenBLAS
 * threads the GEMM); a 1x1 stride-1 unpadded convolution is a GEMM on the image itself, and in
 * the channel-major layout [C,B,H,W] a GEMM over the whole batch at once (one weight packing
 * instead of B, which matters when the late stages have 2x2 maps). A depthwise convolution
 * (groups == IC == OC) is direct: for square 3x3 / 5x5 kernels with stride 1 or 2 (all of
 * EfficientNet's) each plane is copied into a zero-padded stack buffer and a kernel with the
 * taps unrolled at compile time runs vectorised along the output row (the backward, on narrow
 * rows, per output with the weight-gradient sums in registers); other shapes take a generic
 * loop over the taps that fall inside the image. The other loops are plain and threaded over
 * channels or planes with OpenMP when big enough.
 * Not for: dilation, padding modes other than zeros, different strides per direction, or
 * padded/ceil-mode pooling. Not for shape validation of user input either (callers validate).
 *
 * Beyond the header: in eval mode batch norm fills mean/rstd from the running statistics when
 * they are non-NULL; in training mode running_mean/running_var may be NULL (no update).
 */
#include "levi/ops.h"

#include <math.h>
#include <stdint.h>
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
 * Convolution. One implementation serves levi_conv2d_* (dense, symmetric padding, NCHW) and
 * levi_gconv2d_* (groups, four paddings, either layout). */

int levi_conv_out_size(int n, int k, int stride, int pad_before, int pad_after) {
    LEVI_ASSERT(stride > 0 && k > 0 && pad_before >= 0 && pad_after >= 0, "conv geometry");
    const int span = n + pad_before + pad_after - k;
    return span < 0 ? 0 : span / stride + 1;
}

void levi_conv_same_pad(int n, int k, int stride, int *pad_before, int *pad_after) {
    LEVI_ASSERT(n > 0 && k > 0 && stride > 0 && pad_before && pad_after, "same-pad geometry");
    const int out = (n + stride - 1) / stride; // ceil(n / stride)
    int total = (out - 1) * stride + k - n;
    total = total > 0 ? total : 0;
    *pad_before = total / 2; // TensorFlow puts the odd pixel after (bottom/right)
    *pad_after = total - total / 2;
}

levi_conv_geom levi_conv_geom_same(int H, int W, int K, int stride, int groups, int channel_major) {
    levi_conv_geom g = {0};
    g.KH = g.KW = K;
    g.stride = stride;
    g.groups = groups;
    g.channel_major = channel_major;
    levi_conv_same_pad(H, K, stride, &g.pad_top, &g.pad_bottom);
    levi_conv_same_pad(W, K, stride, &g.pad_left, &g.pad_right);
    return g;
}

/* Strides (in floats) of one image and of one channel, for a [B,C,HW] or [C,B,HW] tensor. */
typedef struct {
    int64_t img, ch;
} levi__strides;

static levi__strides levi__layout(int B, int C, int64_t HW, int channel_major) {
    levi__strides s;
    s.img = channel_major ? HW : (int64_t)C * HW;
    s.ch = channel_major ? (int64_t)B * HW : HW;
    return s;
}

typedef struct {
    int OH, OW, G, ICg, OCg, K; /* K = ICg*KH*KW: the GEMM depth */
    int64_t P;                  /* OH*OW */
    int pointwise, depthwise;
} levi__conv_shape;

static levi__conv_shape levi__conv_check(int IC, int H, int W, int OC, levi_conv_geom g) {
    LEVI_ASSERT(g.stride > 0 && g.KH > 0 && g.KW > 0 && g.pad_top >= 0 && g.pad_bottom >= 0 &&
                    g.pad_left >= 0 && g.pad_right >= 0,
                "conv geometry: kernel and stride > 0, paddings >= 0");
    LEVI_ASSERT(g.groups > 0 && IC % g.groups == 0 && OC % g.groups == 0,
                "conv groups must divide IC and OC");
    levi__conv_shape s;
    s.OH = levi_conv_out_size(H, g.KH, g.stride, g.pad_top, g.pad_bottom);
    s.OW = levi_conv_out_size(W, g.KW, g.stride, g.pad_left, g.pad_right);
    LEVI_ASSERT(s.OH > 0 && s.OW > 0, "conv kernel larger than the padded input");
    s.G = g.groups, s.ICg = IC / g.groups, s.OCg = OC / g.groups;
    s.K = s.ICg * g.KH * g.KW;
    s.P = (int64_t)s.OH * s.OW;
    s.pointwise = g.KH == 1 && g.KW == 1 && g.stride == 1 && g.pad_top == 0 && g.pad_bottom == 0 &&
                  g.pad_left == 0 && g.pad_right == 0;
    s.depthwise = g.groups == IC && g.groups == OC;
    return s;
}

/* The output columns [lo, hi) whose tap kw falls inside a row of W pixels:
 * 0 <= ow*stride - pad_left + kw < W. Outside it the tap reads padding (zero). */
static void levi__tap_range(int W, int OW, int stride, int pad_left, int kw, int *lo, int *hi) {
    const int a = pad_left - kw;         // ow*stride >= a
    const int b = W - 1 + pad_left - kw; // ow*stride <= b
    *lo = a <= 0 ? 0 : (a + stride - 1) / stride;
    *hi = b < 0 ? 0 : b / stride + 1;
    if (*hi > OW) *hi = OW;
    if (*lo > *hi) *lo = *hi;
}

size_t levi_gconv2d_col_floats(int IC, int H, int W, int OC, levi_conv_geom g) {
    levi__conv_shape s = levi__conv_check(IC, H, W, OC, g);
    if (s.depthwise || s.pointwise) return 0;
    return (size_t)s.K * (size_t)s.P;
}

/* col[ICg*KH*KW, OH*OW] from ICg channels of one image; channel i starts at x + i*ch_stride;
 * taps that fall in the padding are zeros. */
static void levi__im2col(float *col, const float *x, int64_t ch_stride, int ICg, int H, int W,
                         levi_conv_geom g, int OH, int OW) {
    const int KH = g.KH, KW = g.KW, s = g.stride;
    const int K = ICg * KH * KW;
    const int64_t P = (int64_t)OH * OW;
    LEVI__OMP_FOR_IF((int64_t)K * P > LEVI__PAR_WORK)
    for (int r = 0; r < K; r++) {
        const int c = r / (KH * KW), kh = (r / KW) % KH, kw = r % KW;
        const float *xc = x + (int64_t)c * ch_stride;
        float *dst = col + (int64_t)r * P;
        int lo, hi;
        levi__tap_range(W, OW, s, g.pad_left, kw, &lo, &hi);
        for (int oh = 0; oh < OH; oh++) {
            const int ih = oh * s - g.pad_top + kh;
            float *d = dst + (int64_t)oh * OW;
            if (ih < 0 || ih >= H) {
                memset(d, 0, (size_t)OW * sizeof(float));
                continue;
            }
            const float *xr = xc + (int64_t)ih * W - g.pad_left + kw;
            for (int ow = 0; ow < lo; ow++) d[ow] = 0.0f;
            LEVI__OMP_SIMD
            for (int ow = lo; ow < hi; ow++) d[ow] = xr[ow * s];
            for (int ow = hi; ow < OW; ow++) d[ow] = 0.0f;
        }
    }
}

/* dx += the col2im scatter of dcol[ICg*KH*KW, OH*OW] (channel i of dx at dx + i*ch_stride).
 * Threads own input channels, so the overlapping taps of one channel are summed by one
 * thread, in a fixed order. */
static void levi__col2im_add(float *dx, const float *dcol, int64_t ch_stride, int ICg, int H, int W,
                             levi_conv_geom g, int OH, int OW) {
    const int KH = g.KH, KW = g.KW, s = g.stride;
    const int64_t P = (int64_t)OH * OW;
    LEVI__OMP_FOR_IF(ICg > 1 && (int64_t)ICg * KH * KW * P > LEVI__PAR_WORK)
    for (int c = 0; c < ICg; c++) {
        float *xc = dx + (int64_t)c * ch_stride;
        for (int kh = 0; kh < KH; kh++)
            for (int kw = 0; kw < KW; kw++) {
                const float *src = dcol + ((int64_t)(c * KH + kh) * KW + kw) * P;
                int lo, hi;
                levi__tap_range(W, OW, s, g.pad_left, kw, &lo, &hi);
                for (int oh = 0; oh < OH; oh++) {
                    const int ih = oh * s - g.pad_top + kh;
                    if (ih < 0 || ih >= H) continue;
                    float *xr = xc + (int64_t)ih * W - g.pad_left + kw;
                    const float *sr = src + (int64_t)oh * OW;
                    LEVI__OMP_SIMD
                    for (int ow = lo; ow < hi; ow++) xr[ow * s] += sr[ow];
                }
            }
    }
}

/* One depthwise plane: o[OH,OW] = (bias) + sum over taps of w * x[H,W]. */
static void levi__dw_plane_forward(float *o, const float *x, const float *wk, float bias, int H,
                                   int W, int OH, int OW, levi_conv_geom g) {
    const int s = g.stride;
    for (int oh = 0; oh < OH; oh++) {
        float *orow = o + (int64_t)oh * OW;
        for (int ow = 0; ow < OW; ow++) orow[ow] = bias;
        for (int kh = 0; kh < g.KH; kh++) {
            const int ih = oh * s - g.pad_top + kh;
            if (ih < 0 || ih >= H) continue;
            for (int kw = 0; kw < g.KW; kw++) {
                int lo, hi;
                levi__tap_range(W, OW, s, g.pad_left, kw, &lo, &hi);
                const float wv = wk[kh * g.KW + kw];
                const float *xr = x + (int64_t)ih * W - g.pad_left + kw;
                LEVI__OMP_SIMD
                for (int ow = lo; ow < hi; ow++) orow[ow] += wv * xr[ow * s];
            }
        }
    }
}

/* xp [Hp,Wp] = x [H,W] with a zero border of the geometry's padding. */
static void levi__pad_plane(float *xp, const float *x, int H, int W, levi_conv_geom g) {
    const int Wp = W + g.pad_left + g.pad_right;
    memset(xp, 0, (size_t)g.pad_top * Wp * sizeof(float));
    for (int ih = 0; ih < H; ih++) {
        float *row = xp + (int64_t)(ih + g.pad_top) * Wp;
        for (int j = 0; j < g.pad_left; j++) row[j] = 0.0f;
        memcpy(row + g.pad_left, x + (int64_t)ih * W, (size_t)W * sizeof(float));
        for (int j = g.pad_left + W; j < Wp; j++) row[j] = 0.0f;
    }
    memset(xp + (int64_t)(H + g.pad_top) * Wp, 0, (size_t)g.pad_bottom * Wp * sizeof(float));
}

/* Threads own channels: the weight gradient of a channel sums over the batch in one thread, in
 * a fixed order, and the input planes of a channel are written by that thread only. */
/* Fast path for the kernels EfficientNet uses (square 3x3 or 5x5, stride 1 or 2): the plane
 * is copied once into a zero-padded buffer, then every output is one unrolled sum over the
 * taps, vectorised over the output row. The generic loop above pays a loop set-up per
 * (row, tap), which on the 2x2 to 48x48 maps of a 64-96 pixel input cost 70% of a forward. */
#define LEVI__DW_MAX_PADDED (1 << 15) /* floats of the padded plane, on the stack */
#define LEVI__DW_KERNEL(K, S)                                                                      \
    static void levi__dw_plane_k##K##s##S(float *o, const float *xp, int Wp, const float *wk,      \
                                          float bias, int OH, int OW) {                            \
        float wv[K * K];                                                                           \
        for (int t = 0; t < K * K; t++) wv[t] = wk[t];                                             \
        for (int oh = 0; oh < OH; oh++) {                                                          \
            const float *r = xp + (int64_t)oh * S * Wp;                                            \
            float *orow = o + (int64_t)oh * OW;                                                    \
            LEVI__OMP_SIMD                                                                         \
            for (int ow = 0; ow < OW; ow++) {                                                      \
                float acc = bias;                                                                  \
                for (int kh = 0; kh < K; kh++)                                                     \
                    for (int kw = 0; kw < K; kw++)                                                 \
                        acc += wv[kh * K + kw] * r[(int64_t)kh * Wp + ow * S + kw];                \
                orow[ow] = acc;                                                                    \
            }                                                                                      \
        }                                                                                          \
    }
LEVI__DW_KERNEL(3, 1)
LEVI__DW_KERNEL(3, 2)
LEVI__DW_KERNEL(5, 1)
LEVI__DW_KERNEL(5, 2)

typedef void (*levi__dw_plane_fn)(float *, const float *, int, const float *, float, int, int);

static levi__dw_plane_fn levi__dw_fast(levi_conv_geom g, int H, int W) {
    const int64_t padded = (int64_t)(H + g.pad_top + g.pad_bottom) * (W + g.pad_left + g.pad_right);
    if (g.KH != g.KW || padded > LEVI__DW_MAX_PADDED) return NULL;
    if (g.KH == 3)
        return g.stride == 1 ? levi__dw_plane_k3s1 : g.stride == 2 ? levi__dw_plane_k3s2 : NULL;
    if (g.KH == 5)
        return g.stride == 1 ? levi__dw_plane_k5s1 : g.stride == 2 ? levi__dw_plane_k5s2 : NULL;
    return NULL;
}

static void levi__dw_forward(float *out, const float *inp, const float *w, const float *b, int B,
                             int C, int H, int W, levi_conv_geom g, levi__conv_shape sh) {
    const levi__strides si = levi__layout(B, C, (int64_t)H * W, g.channel_major);
    const levi__strides so = levi__layout(B, C, sh.P, g.channel_major);
    const int planes = B * C, KK = g.KH * g.KW;
    const levi__dw_plane_fn fast = levi__dw_fast(g, H, W);
    const int Wp = W + g.pad_left + g.pad_right;
    LEVI__OMP_FOR_IF(planes > 1 && (int64_t)planes * sh.P * KK > LEVI__PAR_WORK)
    for (int pl = 0; pl < planes; pl++) {
        const int n = pl / C, c = pl % C;
        const float *x = inp + n * si.img + c * si.ch;
        float *o = out + n * so.img + c * so.ch;
        const float *wk = w + (int64_t)c * KK;
        const float bias = b ? b[c] : 0.0f;
        if (!fast) {
            levi__dw_plane_forward(o, x, wk, bias, H, W, sh.OH, sh.OW, g);
            continue;
        }
        float xp[LEVI__DW_MAX_PADDED];
        levi__pad_plane(xp, x, H, W, g);
        fast(o, xp, Wp, wk, bias, sh.OH, sh.OW);
    }
}

/* Backward fast path, same kernels: over zero-padded copies of the input plane (for dw) and of
 * its gradient (dx, added back without the border afterwards). */
/* Rows of at least LEVI__DW_WIDE outputs run per tap, vectorised along the row; narrower ones
 * (the 2x2 to 8x8 maps of the late stages) per output with the taps unrolled and their
 * weight-gradient sums in registers, where a loop per tap would cost more to set up than to
 * run. */
#define LEVI__DW_WIDE 16
#define LEVI__DW_BWD_KERNEL(K, S)                                                                  \
    static void levi__dw_plane_bwd_k##K##s##S(float *dxp, float *acc, const float *xp,             \
                                              const float *d, const float *wk, int Wp, int OH,     \
                                              int OW) {                                            \
        if (OW < LEVI__DW_WIDE) {                                                                  \
            float a[K * K] = {0}, wv[K * K];                                                       \
            for (int t = 0; t < K * K; t++) wv[t] = wk[t];                                         \
            for (int oh = 0; oh < OH; oh++)                                                        \
                for (int ow = 0; ow < OW; ow++) {                                                  \
                    const float dv = d[(int64_t)oh * OW + ow];                                     \
                    const int64_t base = (int64_t)oh * S * Wp + ow * S;                            \
                    for (int kh = 0; kh < K; kh++)                                                 \
                        for (int kw = 0; kw < K; kw++) {                                           \
                            if (acc) a[kh * K + kw] += dv * xp[base + kh * Wp + kw];               \
                            if (dxp) dxp[base + kh * Wp + kw] += wv[kh * K + kw] * dv;             \
                        }                                                                          \
                }                                                                                  \
            if (acc)                                                                               \
                for (int t = 0; t < K * K; t++) acc[t] += a[t];                                    \
            return;                                                                                \
        }                                                                                          \
        for (int oh = 0; oh < OH; oh++) {                                                          \
            const float *drow = d + (int64_t)oh * OW;                                              \
            for (int kh = 0; kh < K; kh++)                                                         \
                for (int kw = 0; kw < K; kw++) {                                                   \
                    const int64_t off = (int64_t)(oh * S + kh) * Wp + kw;                          \
                    if (acc) {                                                                     \
                        const float *xr = xp + off;                                                \
                        float t = 0.0f;                                                            \
                        LEVI__OMP_SIMD_SUM(t)                                                      \
                        for (int ow = 0; ow < OW; ow++) t += drow[ow] * xr[ow * S];                \
                        acc[kh * K + kw] += t;                                                     \
                    }                                                                              \
                    if (dxp) {                                                                     \
                        float *xr = dxp + off;                                                     \
                        const float wv = wk[kh * K + kw];                                          \
                        LEVI__OMP_SIMD                                                             \
                        for (int ow = 0; ow < OW; ow++) xr[ow * S] += wv * drow[ow];               \
                    }                                                                              \
                }                                                                                  \
        }                                                                                          \
    }
LEVI__DW_BWD_KERNEL(3, 1)
LEVI__DW_BWD_KERNEL(3, 2)
LEVI__DW_BWD_KERNEL(5, 1)
LEVI__DW_BWD_KERNEL(5, 2)

typedef void (*levi__dw_bwd_fn)(float *, float *, const float *, const float *, const float *, int,
                                int, int);

static levi__dw_bwd_fn levi__dw_bwd_fast(levi_conv_geom g, int H, int W) {
    const int64_t padded = (int64_t)(H + g.pad_top + g.pad_bottom) * (W + g.pad_left + g.pad_right);
    if (g.KH != g.KW || padded > LEVI__DW_MAX_PADDED) return NULL;
    if (g.KH == 3)
        return g.stride == 1   ? levi__dw_plane_bwd_k3s1
               : g.stride == 2 ? levi__dw_plane_bwd_k3s2
                               : NULL;
    if (g.KH == 5)
        return g.stride == 1   ? levi__dw_plane_bwd_k5s1
               : g.stride == 2 ? levi__dw_plane_bwd_k5s2
                               : NULL;
    return NULL;
}

static void levi__dw_backward(float *dinp, float *dw, float *db, const float *dout,
                              const float *inp, const float *w, int B, int C, int H, int W,
                              levi_conv_geom g, levi__conv_shape sh) {
    const levi__strides si = levi__layout(B, C, (int64_t)H * W, g.channel_major);
    const levi__strides so = levi__layout(B, C, sh.P, g.channel_major);
    const int KK = g.KH * g.KW, s = g.stride, OH = sh.OH, OW = sh.OW;
    const levi__dw_bwd_fn fast = levi__dw_bwd_fast(g, H, W);
    const int Wp = W + g.pad_left + g.pad_right;
    LEVI__OMP_FOR_IF(C > 1 && (int64_t)B * C * sh.P * KK > LEVI__PAR_WORK)
    for (int c = 0; c < C; c++) {
        const float *wk = w + (int64_t)c * KK;
        float dws[LEVI_CONV_MAX_TAPS] = {0};
        float dbs = 0.0f;
        for (int n = 0; n < B; n++) {
            const float *d = dout + n * so.img + c * so.ch;
            const float *x = inp + n * si.img + c * si.ch;
            float *dx = dinp ? dinp + n * si.img + c * si.ch : NULL;
            if (db) {
                float t = 0.0f;
                LEVI__OMP_SIMD_SUM(t)
                for (int64_t p = 0; p < sh.P; p++) t += d[p];
                dbs += t;
            }
            if (!dw && !dx) continue;
            if (fast) {
                float xp[LEVI__DW_MAX_PADDED], dxp[LEVI__DW_MAX_PADDED];
                const int Hp = H + g.pad_top + g.pad_bottom;
                if (dw) levi__pad_plane(xp, x, H, W, g);
                if (dx) memset(dxp, 0, (size_t)Hp * Wp * sizeof(float));
                fast(dx ? dxp : NULL, dw ? dws : NULL, xp, d, wk, Wp, OH, OW);
                if (dx)
                    for (int ih = 0; ih < H; ih++) {
                        const float *src = dxp + (int64_t)(ih + g.pad_top) * Wp + g.pad_left;
                        float *dst = dx + (int64_t)ih * W;
                        LEVI__OMP_SIMD
                        for (int iw = 0; iw < W; iw++) dst[iw] += src[iw];
                    }
                continue;
            }
            for (int oh = 0; oh < OH; oh++) {
                const float *drow = d + (int64_t)oh * OW;
                for (int kh = 0; kh < g.KH; kh++) {
                    const int ih = oh * s - g.pad_top + kh;
                    if (ih < 0 || ih >= H) continue;
                    for (int kw = 0; kw < g.KW; kw++) {
                        int lo, hi;
                        levi__tap_range(W, OW, s, g.pad_left, kw, &lo, &hi);
                        const int64_t off = (int64_t)ih * W - g.pad_left + kw;
                        if (dw) {
                            const float *xr = x + off;
                            float t = 0.0f;
                            LEVI__OMP_SIMD_SUM(t)
                            for (int ow = lo; ow < hi; ow++) t += drow[ow] * xr[ow * s];
                            dws[kh * g.KW + kw] += t;
                        }
                        if (dx) {
                            float *xr = dx + off;
                            const float wv = wk[kh * g.KW + kw];
                            LEVI__OMP_SIMD
                            for (int ow = lo; ow < hi; ow++) xr[ow * s] += wv * drow[ow];
                        }
                    }
                }
            }
        }
        if (dw)
            for (int k = 0; k < KK; k++) dw[(int64_t)c * KK + k] += dws[k];
        if (db) db[c] += dbs;
    }
}

/* o rows (OCg rows of P floats, ld apart) = bias of their channel, or nothing without bias. */
static void levi__fill_bias(float *o, const float *b, int rows, int64_t P, int64_t ld) {
    for (int r = 0; r < rows; r++)
        for (int64_t p = 0; p < P; p++) o[r * ld + p] = b[r];
}

void levi_gconv2d_forward(float *out, float *col, const float *inp, const float *w, const float *b,
                          int B, int IC, int H, int W, int OC, levi_conv_geom g) {
    // inp [B,IC,H,W] or [IC,B,H,W]; w [OC, IC/groups, KH, KW]; b [OC] or NULL;
    // out [B,OC,OH,OW] or [OC,B,OH,OW]; col [IC/groups*KH*KW, OH*OW] (levi_gconv2d_col_floats)
    const levi__conv_shape sh = levi__conv_check(IC, H, W, OC, g);
    if (sh.depthwise) {
        LEVI_ASSERT(g.KH * g.KW <= LEVI_CONV_MAX_TAPS, "depthwise kernel too large");
        levi__dw_forward(out, inp, w, b, B, IC, H, W, g, sh);
        return;
    }
    const levi__strides si = levi__layout(B, IC, (int64_t)H * W, g.channel_major);
    const levi__strides so = levi__layout(B, OC, sh.P, g.channel_major);
    if (sh.pointwise && g.channel_major && sh.G == 1) { // the whole batch in one GEMM
        const int64_t N = (int64_t)B * sh.P;
        LEVI_ASSERT(N <= INT32_MAX, "conv batch too large for one GEMM");
        if (b) levi__fill_bias(out, b, OC, N, N);
        levi_gemm(0, 0, OC, (int)N, IC, 1.0f, w, IC, inp, (int)N, b ? 1.0f : 0.0f, out, (int)N);
        return;
    }
    LEVI_ASSERT(si.ch <= INT32_MAX && so.ch <= INT32_MAX, "conv planes too large for a GEMM");
    for (int n = 0; n < B; n++)
        for (int gi = 0; gi < sh.G; gi++) {
            const float *x = inp + n * si.img + (int64_t)gi * sh.ICg * si.ch;
            float *o = out + n * so.img + (int64_t)gi * sh.OCg * so.ch;
            const float *cm = x;
            int64_t ldc = si.ch;
            if (!sh.pointwise) {
                levi__im2col(col, x, si.ch, sh.ICg, H, W, g, sh.OH, sh.OW);
                cm = col, ldc = sh.P;
            }
            if (b) levi__fill_bias(o, b + (int64_t)gi * sh.OCg, sh.OCg, sh.P, so.ch);
            levi_gemm(0, 0, sh.OCg, (int)sh.P, sh.K, 1.0f, w + (int64_t)gi * sh.OCg * sh.K, sh.K,
                      cm, (int)ldc, b ? 1.0f : 0.0f, o, (int)so.ch);
        }
}

void levi_gconv2d_backward(float *dinp, float *dw, float *db, float *col, const float *dout,
                           const float *inp, const float *w, int B, int IC, int H, int W, int OC,
                           levi_conv_geom g) {
    // dout in the layout of out. col is reused: first the im2col of the input (for dw), then
    // the column gradient (for dinp), so one image-sized scratch serves both.
    const levi__conv_shape sh = levi__conv_check(IC, H, W, OC, g);
    if (sh.depthwise) {
        LEVI_ASSERT(g.KH * g.KW <= LEVI_CONV_MAX_TAPS, "depthwise kernel too large");
        levi__dw_backward(dinp, dw, db, dout, inp, w, B, IC, H, W, g, sh);
        return;
    }
    const levi__strides si = levi__layout(B, IC, (int64_t)H * W, g.channel_major);
    const levi__strides so = levi__layout(B, OC, sh.P, g.channel_major);
    if (sh.pointwise && g.channel_major && sh.G == 1) {
        const int64_t N = (int64_t)B * sh.P;
        LEVI_ASSERT(N <= INT32_MAX, "conv batch too large for one GEMM");
        if (db)
            for (int oc = 0; oc < OC; oc++) {
                const float *dr = dout + (int64_t)oc * N;
                float s = 0.0f;
                LEVI__OMP_SIMD_SUM(s)
                for (int64_t p = 0; p < N; p++) s += dr[p];
                db[oc] += s;
            }
        if (dw) levi_gemm(0, 1, OC, IC, (int)N, 1.0f, dout, (int)N, inp, (int)N, 1.0f, dw, IC);
        if (dinp) levi_gemm(1, 0, IC, (int)N, OC, 1.0f, w, IC, dout, (int)N, 1.0f, dinp, (int)N);
        return;
    }
    LEVI_ASSERT(si.ch <= INT32_MAX && so.ch <= INT32_MAX, "conv planes too large for a GEMM");
    for (int n = 0; n < B; n++)
        for (int gi = 0; gi < sh.G; gi++) {
            const float *x = inp + n * si.img + (int64_t)gi * sh.ICg * si.ch;
            const float *d = dout + n * so.img + (int64_t)gi * sh.OCg * so.ch;
            const float *wg = w + (int64_t)gi * sh.OCg * sh.K;
            if (db)
                for (int oc = 0; oc < sh.OCg; oc++) {
                    const float *dr = d + oc * so.ch;
                    float s = 0.0f;
                    LEVI__OMP_SIMD_SUM(s)
                    for (int64_t p = 0; p < sh.P; p++) s += dr[p];
                    db[(int64_t)gi * sh.OCg + oc] += s;
                }
            if (dw) { // dw[OCg,K] += dout_n[OCg,P] @ col[K,P]^T
                const float *cm = x;
                int64_t ld = si.ch;
                if (!sh.pointwise) {
                    levi__im2col(col, x, si.ch, sh.ICg, H, W, g, sh.OH, sh.OW);
                    cm = col, ld = sh.P;
                }
                levi_gemm(0, 1, sh.OCg, sh.K, (int)sh.P, 1.0f, d, (int)so.ch, cm, (int)ld, 1.0f,
                          dw + (int64_t)gi * sh.OCg * sh.K, sh.K);
            }
            if (dinp) { // dcol[K,P] = w[OCg,K]^T @ dout_n[OCg,P], then scattered back
                float *dx = dinp + n * si.img + (int64_t)gi * sh.ICg * si.ch;
                if (sh.pointwise) {
                    levi_gemm(1, 0, sh.K, (int)sh.P, sh.OCg, 1.0f, wg, sh.K, d, (int)so.ch, 1.0f,
                              dx, (int)si.ch);
                } else {
                    levi_gemm(1, 0, sh.K, (int)sh.P, sh.OCg, 1.0f, wg, sh.K, d, (int)so.ch, 0.0f,
                              col, (int)sh.P);
                    levi__col2im_add(dx, col, si.ch, sh.ICg, H, W, g, sh.OH, sh.OW);
                }
            }
        }
}

void levi_gconv2d_forward_ref(float *out, const float *inp, const float *w, const float *b, int B,
                              int IC, int H, int W, int OC, levi_conv_geom g) {
    // The definition, in double, one output at a time: what the fast paths are tested against.
    const levi__conv_shape sh = levi__conv_check(IC, H, W, OC, g);
    const levi__strides si = levi__layout(B, IC, (int64_t)H * W, g.channel_major);
    const levi__strides so = levi__layout(B, OC, sh.P, g.channel_major);
    for (int n = 0; n < B; n++)
        for (int oc = 0; oc < OC; oc++) {
            const int gi = oc / sh.OCg;
            for (int oh = 0; oh < sh.OH; oh++)
                for (int ow = 0; ow < sh.OW; ow++) {
                    double s = b ? b[oc] : 0.0;
                    for (int i = 0; i < sh.ICg; i++)
                        for (int kh = 0; kh < g.KH; kh++)
                            for (int kw = 0; kw < g.KW; kw++) {
                                const int ih = oh * g.stride - g.pad_top + kh;
                                const int iw = ow * g.stride - g.pad_left + kw;
                                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                                const int ic = gi * sh.ICg + i;
                                s += (double)inp[n * si.img + ic * si.ch + (int64_t)ih * W + iw] *
                                     w[(((int64_t)oc * sh.ICg + i) * g.KH + kh) * g.KW + kw];
                            }
                    out[n * so.img + oc * so.ch + (int64_t)oh * sh.OW + ow] = (float)s;
                }
        }
}

static levi_conv_geom levi__dense_geom(int KH, int KW, int stride, int pad) {
    levi_conv_geom g = {0};
    g.KH = KH, g.KW = KW, g.stride = stride, g.groups = 1;
    g.pad_top = g.pad_bottom = g.pad_left = g.pad_right = pad;
    return g;
}

void levi_conv2d_forward(float *out, float *col, const float *inp, const float *w, const float *b,
                         int B, int IC, int H, int W, int OC, int KH, int KW, int stride, int pad) {
    // inp[B,IC,H,W], w[OC,IC,KH,KW], b[OC] -> out[B,OC,OH,OW]; col [IC*KH*KW, OH*OW]
    levi_gconv2d_forward(out, col, inp, w, b, B, IC, H, W, OC,
                         levi__dense_geom(KH, KW, stride, pad));
}

void levi_conv2d_backward(float *dinp, float *dw, float *db, float *col, const float *dout,
                          const float *inp, const float *w, int B, int IC, int H, int W, int OC,
                          int KH, int KW, int stride, int pad) {
    levi_gconv2d_backward(dinp, dw, db, col, dout, inp, w, B, IC, H, W, OC,
                          levi__dense_geom(KH, KW, stride, pad));
}

/* ----------------------------------------------------------------------------------------
 * ReLU6 and global average pooling */

void levi_relu6_forward(float *out, const float *inp, int64_t n) {
    LEVI__OMP_SIMD
    for (int64_t i = 0; i < n; i++) {
        const float v = inp[i] > 0.0f ? inp[i] : 0.0f;
        out[i] = v < 6.0f ? v : 6.0f;
    }
}

/* The gradient passes where 0 < x < 6, which is where 0 < out < 6 (PyTorch's hardtanh rule:
 * zero at the kinks). NaN outputs compare false and pass no gradient. */
void levi_relu6_backward(float *dinp, const float *out, const float *dout, int64_t n) {
    LEVI__OMP_SIMD
    for (int64_t i = 0; i < n; i++) dinp[i] += (out[i] > 0.0f && out[i] < 6.0f) ? dout[i] : 0.0f;
}

void levi_relu6_backward_inplace(float *d, const float *out, int64_t n) {
    LEVI__OMP_SIMD
    for (int64_t i = 0; i < n; i++) d[i] = (out[i] > 0.0f && out[i] < 6.0f) ? d[i] : 0.0f;
}

void levi_avgpool_global_forward(float *out, const float *inp, int B, int C, int64_t HW,
                                 int channel_major) {
    // inp [B,C,HW] or [C,B,HW] -> out [B,C]
    LEVI_ASSERT(HW > 0, "global average pool of an empty map");
    const levi__strides s = levi__layout(B, C, HW, channel_major);
    const int planes = B * C;
    LEVI__OMP_FOR_IF(planes > 1 && (int64_t)planes * HW > LEVI__PAR_WORK)
    for (int pl = 0; pl < planes; pl++) {
        const int n = pl / C, c = pl % C;
        const float *x = inp + n * s.img + c * s.ch;
        float t = 0.0f;
        LEVI__OMP_SIMD_SUM(t)
        for (int64_t i = 0; i < HW; i++) t += x[i];
        out[pl] = t / (float)HW;
    }
}

void levi_avgpool_global_backward(float *dinp, const float *dout, int B, int C, int64_t HW,
                                  int channel_major) {
    LEVI_ASSERT(HW > 0, "global average pool of an empty map");
    const levi__strides s = levi__layout(B, C, HW, channel_major);
    const int planes = B * C;
    LEVI__OMP_FOR_IF(planes > 1 && (int64_t)planes * HW > LEVI__PAR_WORK)
    for (int pl = 0; pl < planes; pl++) {
        const int n = pl / C, c = pl % C;
        float *dx = dinp + n * s.img + c * s.ch;
        const float v = dout[pl] / (float)HW;
        LEVI__OMP_SIMD
        for (int64_t i = 0; i < HW; i++) dx[i] += v;
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
        // (x - m) first, as PyTorch does: folding m into a shift (x * scale + (b - m * scale))
        // cancels when |m| >> std, which small batch-statistics channels often have; that lost
        // ~1e-4 of scale at the top of EfficientNet in training mode, enough to move values
        // across ReLU6 kinks. The extra subtraction costs nothing measurable.
        const float scale = s * w[c], shift = b[c];
        for (int bi = 0; bi < B; bi++) {
            const float *x = inp + ((int64_t)bi * C + c) * HW;
            float *o = out + ((int64_t)bi * C + c) * HW;
            LEVI__OMP_SIMD
            for (int i = 0; i < HW; i++) o[i] = (x[i] - m) * scale + shift;
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
