/* levi ops: forward/backward kernels of the image layers (2-D convolution, grouped and
 * depthwise convolution with explicit padding, batch norm, ReLU6, max pool, global average
 * pool), as declared in include/levi/ops.h.
 *
 * For: the small CNN of the vision task and the EfficientNet-Lite backbone. A dense
 * convolution is im2col of one image (and one group) followed by one levi_gemm (OpenBLAS
 * threads the GEMM); a 1x1 stride-1 unpadded convolution is a GEMM on the image itself, and in
 * the channel-major layout [C,B,H,W] a GEMM over the whole batch at once (one weight packing
 * instead of B, which matters when the late stages have 2x2 maps). A depthwise convolution
 * (groups == IC == OC) is direct and vectorised: for square 3x3 / 5x5 kernels with stride 1
 * or 2 (all of EfficientNet's) kernels with the taps unrolled at compile time run over rows of
 * 16+ outputs in place, or over a zero-padded flattened copy of the plane; maps too small for
 * either (up to 8 wide, 8+ images) run 16 images of a channel side by side (see "Fast paths"
 * below); other shapes take a generic loop over the taps that fall inside the image. The other
 * loops are plain and threaded over channels or planes with OpenMP when big enough.
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

/* Fast paths for the kernels EfficientNet uses (square 3x3 or 5x5, stride 1 or 2, any
 * paddings). Every kernel has the taps unrolled at compile time (K and S are macro
 * arguments) and runs vectorised over adjacent outputs. Two schemes (and image lanes for
 * the smallest maps, below):
 * - Wide rows (OW >= LEVI__DW_WIDE): the forward reads the input plane in place. Per output
 *   row, the columns whose taps all fall inside the image are one vectorised loop; the few
 *   border columns (at most K/S + 1 per side) take a checked scalar sum. No padded copy.
 * - Narrow rows (maps up to 15 wide, unless image lanes take them), and every backward that
 *   image lanes do not take: the plane is copied once into a zero-padded buffer xp [Hp, Wpe]
 *   (Wpe = padded width rounded up to a multiple of S), and the kernel runs over the
 *   flattened buffer: output q = oh*Wq + ow (Wq = Wpe/S) reads xp[S*q + row(kh) + kw] (for
 *   stride 2 the rows are stored even rows first, see levi__dw_flat_geom), so a whole 7x7
 *   plane is one loop of 77 (k5) instead of seven loops of 7. Columns ow >= OW of each
 *   flattened row are computed and dropped (forward) or fed zeros (backward).
 * The per-tap inner loops must be fully unrolled before the vectoriser sees them: the
 * Release build compiles at -O2, where GCC does not unroll a loop that grows the code and
 * then refuses to vectorise the outer loop ("multiple nested loops"), leaving one scalar
 * multiply-add chain per output. LEVI__UNROLL asks for the unrolling explicitly. */
#if defined(__clang__)
#define LEVI__UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LEVI__UNROLL _Pragma("GCC unroll 8")
#else
#define LEVI__UNROLL
#endif
/* Float offset of tap row kh (a compile-time constant once K and S are). */
#define LEVI__DW_ROW(S, kh, Wpe, odd)                                                              \
    ((S) == 1 ? (kh) * (Wpe) : ((kh)&1) * (odd) + ((kh) >> 1) * (Wpe))

#define LEVI__DW_WIDE 16
#define LEVI__DW_MAX_PADDED (1 << 15) /* floats of one padded/flattened plane, on the stack */

/* Wide-row forward: o [OH,OW] = bias + taps * x [H,W], the input read in place. */
#define LEVI__DW_ROWS_KERNEL(K, S)                                                                 \
    static void levi__dw_rows_k##K##s##S(float *restrict o, const float *restrict x,               \
                                         const float *restrict wk, float bias, int H, int W,       \
                                         int OH, int OW, int pt, int pl) {                         \
        float wv[K * K];                                                                           \
        for (int t = 0; t < K * K; t++) wv[t] = wk[t];                                             \
        /* interior columns: 0 <= ow*S - pl and ow*S - pl + K - 1 <= W - 1 */                      \
        int lo = pl <= 0 ? 0 : (pl + S - 1) / S;                                                   \
        int hi = W - K + pl < 0 ? 0 : (W - K + pl) / S + 1;                                        \
        if (hi > OW) hi = OW;                                                                      \
        if (lo > hi) lo = hi;                                                                      \
        for (int oh = 0; oh < OH; oh++) {                                                          \
            const int ih0 = oh * S - pt;                                                           \
            float *restrict orow = o + (int64_t)oh * OW;                                           \
            const int kh0 = ih0 < 0 ? -ih0 : 0, kh1 = H - ih0 < K ? H - ih0 : K;                   \
            if (kh0 == 0 && kh1 == K) {                                                            \
                const float *restrict r = x + (int64_t)ih0 * W;                                    \
                LEVI__OMP_SIMD                                                                     \
                for (int ow = lo; ow < hi; ow++) {                                                 \
                    const int c0 = ow * S - pl;                                                    \
                    float acc = bias;                                                              \
                    LEVI__UNROLL                                                                   \
                    for (int kh = 0; kh < K; kh++) LEVI__UNROLL                                    \
                    for (int kw = 0; kw < K; kw++)                                                 \
                        acc += wv[kh * K + kw] * r[(int64_t)kh * W + c0 + kw];                     \
                    orow[ow] = acc;                                                                \
                }                                                                                  \
            } else {                                                                               \
                for (int ow = lo; ow < hi; ow++) orow[ow] = bias;                                  \
                for (int kh = kh0; kh < kh1; kh++) {                                               \
                    const float *restrict r = x + (int64_t)(ih0 + kh) * W;                         \
                    const float *restrict wr = wv + kh * K;                                        \
                    LEVI__OMP_SIMD                                                                 \
                    for (int ow = lo; ow < hi; ow++) {                                             \
                        const int c0 = ow * S - pl;                                                \
                        float acc = orow[ow];                                                      \
                        LEVI__UNROLL                                                               \
                        for (int kw = 0; kw < K; kw++) acc += wr[kw] * r[c0 + kw];                 \
                        orow[ow] = acc;                                                            \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int ow = 0; ow < OW; ow++) {                                                      \
                if (ow == lo) ow = hi;                                                             \
                if (ow >= OW) break;                                                               \
                const int c0 = ow * S - pl;                                                        \
                float acc = bias;                                                                  \
                for (int kh = kh0; kh < kh1; kh++)                                                 \
                    for (int kw = 0; kw < K; kw++)                                                 \
                        if (c0 + kw >= 0 && c0 + kw < W)                                           \
                            acc += wv[kh * K + kw] * x[(int64_t)(ih0 + kh) * W + c0 + kw];         \
                orow[ow] = acc;                                                                    \
            }                                                                                      \
        }                                                                                          \
    }

/* Flattened forward over a padded plane: tmp [n] = bias + taps * xp, n = OH*Wq outputs. */
#define LEVI__DW_FLAT_KERNEL(K, S)                                                                 \
    static void levi__dw_flat_k##K##s##S(float *restrict tmp, const float *restrict xp, int Wpe,   \
                                         int odd, const float *restrict wk, float bias, int n) {   \
        float wv[K * K];                                                                           \
        for (int t = 0; t < K * K; t++) wv[t] = wk[t];                                             \
        LEVI__OMP_SIMD                                                                             \
        for (int q = 0; q < n; q++) {                                                              \
            float acc = bias;                                                                      \
            LEVI__UNROLL                                                                           \
            for (int kh = 0; kh < K; kh++) LEVI__UNROLL                                            \
            for (int kw = 0; kw < K; kw++)                                                         \
                acc += wv[kh * K + kw] * xp[S * q + LEVI__DW_ROW(S, kh, Wpe, odd) + kw];           \
            tmp[q] = acc;                                                                          \
        }                                                                                          \
    }
LEVI__DW_ROWS_KERNEL(3, 1)
LEVI__DW_ROWS_KERNEL(3, 2)
LEVI__DW_ROWS_KERNEL(5, 1)
LEVI__DW_ROWS_KERNEL(5, 2)
LEVI__DW_FLAT_KERNEL(3, 1)
LEVI__DW_FLAT_KERNEL(3, 2)
LEVI__DW_FLAT_KERNEL(5, 1)
LEVI__DW_FLAT_KERNEL(5, 2)

typedef void (*levi__dw_rows_fn)(float *, const float *, const float *, float, int, int, int, int,
                                 int, int);
typedef void (*levi__dw_flat_fn)(float *, const float *, int, int, const float *, float, int);

/* The padded, flattened geometry of one plane: Hp rows of Wpe floats plus K floats of zero
 * tail (the last flattened row reads up to K-1 floats past its padded row), and the n = OH*Wq
 * flattened outputs. For stride 2 the padded rows are stored even rows first, then odd rows
 * from float offset odd: output row oh reads padded rows 2*oh + kh, which are then rows
 * oh + kh/2 of one half, and q = oh*Wq + ow with Wq = Wpe/2 steps through them as 2*q.
 * fits == 0 when the plane does not fit the stack buffers. */
typedef struct {
    int Hp, Wpe, Wq, n, odd, fits;
} levi__dw_flat_geom;

static levi__dw_flat_geom levi__dw_flat(levi_conv_geom g, int H, int W, int OH) {
    levi__dw_flat_geom f;
    const int S = g.stride;
    f.Hp = H + g.pad_top + g.pad_bottom;
    f.Wpe = W + g.pad_left + g.pad_right;
    f.Wpe += (S - f.Wpe % S) % S;
    f.Wq = f.Wpe / S;
    f.n = OH * f.Wq;
    f.odd = S == 2 ? (f.Hp + 1) / 2 * f.Wpe : 0;
    f.fits = (int64_t)f.Hp * f.Wpe + g.KW <= LEVI__DW_MAX_PADDED;
    return f;
}

/* Float offset of padded row r in the buffer. */
static int64_t levi__dw_row_at(levi__dw_flat_geom f, int r) {
    return f.odd ? (r & 1) * (int64_t)f.odd + (int64_t)(r >> 1) * f.Wpe : (int64_t)r * f.Wpe;
}

/* xp [Hp,Wpe] (+ KW tail) = x [H,W] with a zero border of the geometry's padding, rows placed
 * by levi__dw_row_at. Only the border is zeroed: the interior is overwritten. */
static void levi__pad_plane(float *restrict xp, const float *restrict x, int H, int W,
                            levi_conv_geom g, levi__dw_flat_geom f) {
    const int Wpe = f.Wpe, right = Wpe - g.pad_left - W;
    for (int r = 0; r < f.Hp; r++) {
        float *row = xp + levi__dw_row_at(f, r);
        const int ih = r - g.pad_top;
        if (ih < 0 || ih >= H) {
            memset(row, 0, (size_t)Wpe * sizeof(float));
            continue;
        }
        for (int j = 0; j < g.pad_left; j++) row[j] = 0.0f;
        memcpy(row + g.pad_left, x + (int64_t)ih * W, (size_t)W * sizeof(float));
        for (int j = 0; j < right; j++) row[g.pad_left + W + j] = 0.0f;
    }
    memset(xp + (int64_t)f.Hp * Wpe, 0, (size_t)g.KW * sizeof(float));
}

static int levi__dw_square(levi_conv_geom g) {
    return g.KH == g.KW && (g.KH == 3 || g.KH == 5) && (g.stride == 1 || g.stride == 2);
}

static levi__dw_rows_fn levi__dw_rows_pick(levi_conv_geom g) {
    if (!levi__dw_square(g)) return NULL;
    if (g.KH == 3) return g.stride == 1 ? levi__dw_rows_k3s1 : levi__dw_rows_k3s2;
    return g.stride == 1 ? levi__dw_rows_k5s1 : levi__dw_rows_k5s2;
}

static levi__dw_flat_fn levi__dw_flat_pick(levi_conv_geom g) {
    if (!levi__dw_square(g)) return NULL;
    if (g.KH == 3) return g.stride == 1 ? levi__dw_flat_k3s1 : levi__dw_flat_k3s2;
    return g.stride == 1 ? levi__dw_flat_k5s1 : levi__dw_flat_k5s2;
}

/* Small maps of a batch (backward: OW < LEVI__DW_WIDE; forward: OW <= LEVI__DW_LANES_FWD_OW;
 * at least LEVI__DW_LANES/2 images, any kernel, stride and padding): 16 images of
 * one channel side by side. Their planes are transposed into xt [H*W, 16] (lanes past the
 * batch are zeros), so every tap of every output is one 16-wide multiply-add over images with
 * no padding computed: a 2x2 to 8x8 map is too narrow to vectorise along its rows, but the images
 * of a channel share its weights. Generic in kernel size, stride and padding; the per-tap checks
 * run once per 16 images. */
#define LEVI__DW_LANES 16
#define LEVI__DW_LANE_POS 1024 /* H*W and OH*OW of one plane, for the stack buffers */
/* The forward takes image lanes only up to rows of 8 (7x7 and smaller maps): from 9 to 15
 * the flattened plane wastes little and measured as fast or faster (EfficientNet-Lite0 at
 * 224 px, 1 thread, within the noise of a shared machine). */
#define LEVI__DW_LANES_FWD_OW 8

static int levi__dw_use_lanes(int B, int H, int W, levi__conv_shape sh) {
    return sh.OW < LEVI__DW_WIDE && B >= LEVI__DW_LANES / 2 &&
           (int64_t)H * W <= LEVI__DW_LANE_POS && sh.P <= LEVI__DW_LANE_POS;
}

/* t [HW, 16] = the planes of images n0 .. n0+nb-1 (one channel, first at src, img floats
 * apart), zeros in the other lanes. */
static void levi__dw_lanes_in(float *restrict t, const float *src, int64_t img, int nb,
                              int64_t HW) {
    for (int l = 0; l < LEVI__DW_LANES; l++) {
        const float *x = l < nb ? src + l * img : NULL;
        for (int64_t p = 0; p < HW; p++) t[p * LEVI__DW_LANES + l] = x ? x[p] : 0.0f;
    }
}

/* Forward of images n0 .. n0+nb-1 of channel c. */
static void levi__dw_lanes_forward(float *out, const float *inp, const float *wk, float bias,
                                   levi__strides si, levi__strides so, int c, int n0, int nb, int H,
                                   int W, levi__conv_shape sh, levi_conv_geom g) {
    enum { L = LEVI__DW_LANES };
    float xt[LEVI__DW_LANE_POS * L];
    levi__dw_lanes_in(xt, inp + n0 * si.img + c * si.ch, si.img, nb, (int64_t)H * W);
    float *o = out + n0 * so.img + c * so.ch;
    // A whole output row at a time, taps outer: the OW sums are independent chains, where one
    // output at a time would wait on the latency of each multiply-add.
    for (int oh = 0; oh < sh.OH; oh++) {
        float acc[LEVI__DW_WIDE * L];
        for (int i = 0; i < sh.OW * L; i++) acc[i] = bias;
        for (int kh = 0; kh < g.KH; kh++) {
            const int ih = oh * g.stride - g.pad_top + kh;
            if (ih < 0 || ih >= H) continue;
            for (int kw = 0; kw < g.KW; kw++) {
                int lo, hi;
                levi__tap_range(W, sh.OW, g.stride, g.pad_left, kw, &lo, &hi);
                const float wv = wk[kh * g.KW + kw];
                for (int ow = lo; ow < hi; ow++) {
                    const float *xr = xt + ((int64_t)ih * W + ow * g.stride - g.pad_left + kw) * L;
                    float *a = acc + ow * L;
                    LEVI__OMP_SIMD
                    for (int l = 0; l < L; l++) a[l] += wv * xr[l];
                }
            }
        }
        for (int ow = 0; ow < sh.OW; ow++) {
            const int64_t p = (int64_t)oh * sh.OW + ow;
            for (int l = 0; l < nb; l++) o[l * so.img + p] = acc[ow * L + l];
        }
    }
}

/* Backward of images n0 .. n0+nb-1 of channel c: dws [KK, 16] += the weight gradient per
 * lane (summed over lanes by the caller, in a fixed order), dx += the input gradient. */
static void levi__dw_lanes_backward(float *dinp, float *dws, const float *dout, const float *inp,
                                    const float *wk, levi__strides si, levi__strides so, int c,
                                    int n0, int nb, int H, int W, levi__conv_shape sh,
                                    levi_conv_geom g) {
    enum { L = LEVI__DW_LANES };
    float xt[LEVI__DW_LANE_POS * L], dt[LEVI__DW_LANE_POS * L], dxt[LEVI__DW_LANE_POS * L];
    const int64_t HW = (int64_t)H * W;
    if (dws) levi__dw_lanes_in(xt, inp + n0 * si.img + c * si.ch, si.img, nb, HW);
    if (dinp) memset(dxt, 0, (size_t)HW * L * sizeof(float));
    levi__dw_lanes_in(dt, dout + n0 * so.img + c * so.ch, so.img, nb, sh.P);
    for (int oh = 0; oh < sh.OH; oh++)
        for (int ow = 0; ow < sh.OW; ow++) {
            const float *dr = dt + ((int64_t)oh * sh.OW + ow) * L;
            for (int kh = 0; kh < g.KH; kh++) {
                const int ih = oh * g.stride - g.pad_top + kh;
                if (ih < 0 || ih >= H) continue;
                for (int kw = 0; kw < g.KW; kw++) {
                    const int iw = ow * g.stride - g.pad_left + kw;
                    if (iw < 0 || iw >= W) continue;
                    const int64_t at = ((int64_t)ih * W + iw) * L;
                    if (dws) {
                        float *a = dws + (kh * g.KW + kw) * L;
                        const float *xr = xt + at;
                        LEVI__OMP_SIMD
                        for (int l = 0; l < L; l++) a[l] += dr[l] * xr[l];
                    }
                    if (dinp) {
                        const float wv = wk[kh * g.KW + kw];
                        float *xr = dxt + at;
                        LEVI__OMP_SIMD
                        for (int l = 0; l < L; l++) xr[l] += wv * dr[l];
                    }
                }
            }
        }
    if (dinp)
        for (int l = 0; l < nb; l++) {
            float *dx = dinp + (n0 + l) * si.img + c * si.ch;
            for (int64_t p = 0; p < HW; p++) dx[p] += dxt[p * L + l];
        }
}

static void levi__dw_forward(float *out, const float *inp, const float *w, const float *b, int B,
                             int C, int H, int W, levi_conv_geom g, levi__conv_shape sh) {
    const levi__strides si = levi__layout(B, C, (int64_t)H * W, g.channel_major);
    const levi__strides so = levi__layout(B, C, sh.P, g.channel_major);
    const int planes = B * C, KK = g.KH * g.KW, OH = sh.OH, OW = sh.OW;
    const levi__dw_flat_geom f = levi__dw_flat(g, H, W, OH);
    const levi__dw_rows_fn rows = OW >= LEVI__DW_WIDE ? levi__dw_rows_pick(g) : NULL;
    const levi__dw_flat_fn flat = !rows && f.fits ? levi__dw_flat_pick(g) : NULL;
    if (!rows && levi__dw_use_lanes(B, H, W, sh) && sh.OW <= LEVI__DW_LANES_FWD_OW) {
        const int chunks = (B + LEVI__DW_LANES - 1) / LEVI__DW_LANES, units = C * chunks;
        LEVI__OMP_FOR_IF(units > 1 && (int64_t)planes * sh.P * KK > LEVI__PAR_WORK)
        for (int u = 0; u < units; u++) {
            const int c = u / chunks, n0 = u % chunks * LEVI__DW_LANES;
            const int nb = B - n0 < LEVI__DW_LANES ? B - n0 : LEVI__DW_LANES;
            levi__dw_lanes_forward(out, inp, w + (int64_t)c * KK, b ? b[c] : 0.0f, si, so, c, n0,
                                   nb, H, W, sh, g);
        }
        return;
    }
    LEVI__OMP_FOR_IF(planes > 1 && (int64_t)planes * sh.P * KK > LEVI__PAR_WORK)
    for (int pl = 0; pl < planes; pl++) {
        const int n = pl / C, c = pl % C;
        const float *x = inp + n * si.img + c * si.ch;
        float *o = out + n * so.img + c * so.ch;
        const float *wk = w + (int64_t)c * KK;
        const float bias = b ? b[c] : 0.0f;
        if (rows) {
            rows(o, x, wk, bias, H, W, OH, OW, g.pad_top, g.pad_left);
        } else if (flat) {
            float xp[LEVI__DW_MAX_PADDED], tmp[LEVI__DW_MAX_PADDED];
            levi__pad_plane(xp, x, H, W, g, f);
            flat(tmp, xp, f.Wpe, f.odd, wk, bias, f.n);
            for (int oh = 0; oh < OH; oh++)
                memcpy(o + (int64_t)oh * OW, tmp + (int64_t)oh * f.Wq, (size_t)OW * sizeof(float));
        } else {
            levi__dw_plane_forward(o, x, wk, bias, H, W, OH, OW, g);
        }
    }
}

/* Backward fast path over the flattened padded plane xp and the output gradient dq [OH,Wq]
 * laid out like the flattened outputs (zeros in the dropped columns ow >= OW, so they add
 * nothing). Per tap t = (kh,kw), off = kh*Wpe + kw:
 *   acc[t] += sum_q dq[q] * xp[S*q + off]   (weight gradient: one vectorised dot product)
 *   dxp[S*q + off] += w[t] * dq[q]          (input gradient, into a zeroed padded plane)
 * One loop per tap: within a tap no two q write the same dxp element, so each loop
 * vectorises (strided for S = 2); the sum order is fixed, so results do not depend on the
 * thread count. */
#define LEVI__DW_BWD_KERNEL(K, S)                                                                  \
    static void levi__dw_bwd_flat_k##K##s##S(float *restrict dxp, float *restrict acc,             \
                                             const float *restrict xp, const float *restrict dq,   \
                                             const float *restrict wk, int Wpe, int odd, int n) {  \
        for (int kh = 0; kh < K; kh++)                                                             \
            for (int kw = 0; kw < K; kw++) {                                                       \
                const int off = LEVI__DW_ROW(S, kh, Wpe, odd) + kw;                                \
                if (acc) {                                                                         \
                    const float *restrict xr = xp + off;                                           \
                    float t = 0.0f;                                                                \
                    LEVI__OMP_SIMD_SUM(t)                                                          \
                    for (int q = 0; q < n; q++) t += dq[q] * xr[S * q];                            \
                    acc[kh * K + kw] += t;                                                         \
                }                                                                                  \
                if (dxp) {                                                                         \
                    float *restrict xr = dxp + off;                                                \
                    const float wv = wk[kh * K + kw];                                              \
                    LEVI__OMP_SIMD                                                                 \
                    for (int q = 0; q < n; q++) xr[S * q] += wv * dq[q];                           \
                }                                                                                  \
            }                                                                                      \
    }
LEVI__DW_BWD_KERNEL(3, 1)
LEVI__DW_BWD_KERNEL(3, 2)
LEVI__DW_BWD_KERNEL(5, 1)
LEVI__DW_BWD_KERNEL(5, 2)

typedef void (*levi__dw_bwd_fn)(float *, float *, const float *, const float *, const float *, int,
                                int, int);

static levi__dw_bwd_fn levi__dw_bwd_pick(levi_conv_geom g) {
    if (!levi__dw_square(g)) return NULL;
    if (g.KH == 3) return g.stride == 1 ? levi__dw_bwd_flat_k3s1 : levi__dw_bwd_flat_k3s2;
    return g.stride == 1 ? levi__dw_bwd_flat_k5s1 : levi__dw_bwd_flat_k5s2;
}

/* Threads own channels: the weight gradient of a channel sums over the batch in one thread, in
 * a fixed order, and the input planes of a channel are written by that thread only. */
static void levi__dw_backward(float *dinp, float *dw, float *db, const float *dout,
                              const float *inp, const float *w, int B, int C, int H, int W,
                              levi_conv_geom g, levi__conv_shape sh) {
    const levi__strides si = levi__layout(B, C, (int64_t)H * W, g.channel_major);
    const levi__strides so = levi__layout(B, C, sh.P, g.channel_major);
    const int KK = g.KH * g.KW, s = g.stride, OH = sh.OH, OW = sh.OW;
    const levi__dw_flat_geom f = levi__dw_flat(g, H, W, OH);
    const levi__dw_bwd_fn fast = f.fits ? levi__dw_bwd_pick(g) : NULL;
    const int lanes = levi__dw_use_lanes(B, H, W, sh);
    LEVI__OMP_FOR_IF(C > 1 && (int64_t)B * C * sh.P * KK > LEVI__PAR_WORK)
    for (int c = 0; c < C; c++) {
        const float *wk = w + (int64_t)c * KK;
        float dws[LEVI_CONV_MAX_TAPS] = {0};
        float dbs = 0.0f;
        if (lanes) {
            float dwl[LEVI_CONV_MAX_TAPS * LEVI__DW_LANES] = {0};
            for (int n0 = 0; n0 < B; n0 += LEVI__DW_LANES) {
                const int nb = B - n0 < LEVI__DW_LANES ? B - n0 : LEVI__DW_LANES;
                if (db)
                    for (int l = 0; l < nb; l++) {
                        const float *d = dout + (n0 + l) * so.img + c * so.ch;
                        float t = 0.0f;
                        LEVI__OMP_SIMD_SUM(t)
                        for (int64_t p = 0; p < sh.P; p++) t += d[p];
                        dbs += t;
                    }
                if (dw || dinp)
                    levi__dw_lanes_backward(dinp, dw ? dwl : NULL, dout, inp, wk, si, so, c, n0, nb,
                                            H, W, sh, g);
            }
            for (int k = 0; k < KK; k++)
                for (int l = 0; l < LEVI__DW_LANES; l++) dws[k] += dwl[k * LEVI__DW_LANES + l];
        }
        for (int n = 0; n < B && !lanes; n++) {
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
                float xp[LEVI__DW_MAX_PADDED], dxp[LEVI__DW_MAX_PADDED], dq[LEVI__DW_MAX_PADDED];
                if (dw) levi__pad_plane(xp, x, H, W, g, f);
                if (dx) memset(dxp, 0, ((size_t)f.Hp * f.Wpe + (size_t)g.KW) * sizeof(float));
                for (int oh = 0; oh < OH; oh++) {
                    float *row = dq + (int64_t)oh * f.Wq;
                    memcpy(row, d + (int64_t)oh * OW, (size_t)OW * sizeof(float));
                    for (int j = OW; j < f.Wq; j++) row[j] = 0.0f;
                }
                fast(dx ? dxp : NULL, dw ? dws : NULL, xp, dq, wk, f.Wpe, f.odd, f.n);
                if (dx)
                    for (int ih = 0; ih < H; ih++) {
                        const float *src = dxp + levi__dw_row_at(f, ih + g.pad_top) + g.pad_left;
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
