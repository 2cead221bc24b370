/* levi ops: forward/backward kernels of the dense layers (linear, embedding, layer norm,
 * activations, dropout, attention, residual add, mean pooling, concat, losses).
 *
 * For: the contract in include/levi/ops.h, over raw row-major float pointers. Matrix products
 * go through levi_gemm (OpenBLAS), except attention's per-head products (see there);
 * everything else is a plain loop the compiler can vectorise, threaded with OpenMP only where
 * the work is big enough to pay for waking the threads.
 * Not for: shape validation of user input (callers validate; misuse asserts), allocation
 * (callers own every buffer), the image kernels (conv2d, batch norm, max pool live in
 * ops_conv.c).
 *
 * Vectorisation: the build uses -O2, where GCC vectorises a loop of unknown length only when
 * told to, so the hot loops carry `omp simd` (reductions included: without -ffast-math a float
 * sum must otherwise keep its sequential order). Where the compiler's own vectorisation is poor
 * (register tiles of small products, row reductions: GCC finishes an `omp simd reduction`
 * with a scalar loop over the lanes, which costs as much as a whole 64-element softmax row),
 * the code uses 8-float GCC/Clang vector extensions, which the compiler maps to the target's
 * SIMD. GELU and softmax use their own polynomial exp/erf in plain arithmetic, not libm: the
 * scalar libm calls cost ~20x more, and glibc's vector variants (libmvec) measured 1.5-1.8x
 * slower than these on MiniLM's shapes (GELU forward 4.6 vs 3.0 ms, backward 7.1 vs 4.0 ms for
 * 6.3M elements on one core).
 *
 * Determinism: every reduction runs in an order that does not depend on the thread count (row
 * sums per row, column sums per column block, element-wise loops split into fixed blocks,
 * attention per sequence or per head), so results are bit-identical for any number of OpenMP
 * threads; only OpenBLAS's blocking may depend on its thread count.
 */
#include "levi/ops.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define LEVI__PRAGMA(x) _Pragma(#x)
/* Threads only when cond holds: a parallel region costs a few microseconds, more than the
 * whole loop for the small tensors of a test or a tiny head. */
#define LEVI__OMP_FOR_IF(cond) LEVI__PRAGMA(omp parallel for if(cond))
/* The same with at most nt threads, statically scheduled (per-thread scratch slots). */
#define LEVI__OMP_FOR_NT_IF(nt, cond)                                                              \
    LEVI__PRAGMA(omp parallel for num_threads(nt) schedule(static) if(cond))
#define LEVI__OMP_SIMD LEVI__PRAGMA(omp simd)
#define LEVI__OMP_SIMD_SUM(var) LEVI__PRAGMA(omp simd reduction(+ : var))
#define LEVI__OMP_SIMD_SUM2(a, b) LEVI__PRAGMA(omp simd reduction(+ : a, b))
static int levi__max_threads(void) {
    return omp_get_max_threads();
}
static int levi__thread_num(void) {
    return omp_get_thread_num();
}
#else
#define LEVI__OMP_FOR_IF(cond)
#define LEVI__OMP_FOR_NT_IF(nt, cond)
#define LEVI__OMP_SIMD
#define LEVI__OMP_SIMD_SUM(var)
#define LEVI__OMP_SIMD_SUM2(a, b)
static int levi__max_threads(void) {
    return 1;
}
static int levi__thread_num(void) {
    return 0;
}
#endif

/* Element counts above which an element-wise loop is threaded. Memory-bound loops (copies,
 * adds) gain little from a second core and need more work to break even than GELU's math. */
#define LEVI__PAR_MEM (1 << 16)
#define LEVI__PAR_MATH (1 << 13)
/* Element-wise loops run over fixed blocks: threads take whole blocks and the compiler
 * vectorises inside one, so which elements share a vector never depends on the thread count.
 * A multiple of every vector width. */
#define LEVI__BLOCK 4096
#define LEVI__BLOCK_END(b0, n) ((b0) + LEVI__BLOCK < (n) ? (b0) + LEVI__BLOCK : (n))

static int levi__to_int(int64_t n, const char *what) {
    LEVI_ASSERT(n >= 0 && n <= INT_MAX, what);
    return (int)n;
}

/* ----------------------------------------------------------------------------------------
 * Vectors of 8 floats (GCC/Clang vector extensions). */

#if defined(__GNUC__) && !defined(__clang__)
/* Without AVX (a build without -march=native) GCC warns that passing 32-byte vectors changes
 * the ABI; every function taking them here is static, so no ABI is exposed. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float levi__v8 __attribute__((vector_size(32)));
typedef int32_t levi__v8i __attribute__((vector_size(32)));
typedef float levi__v8u __attribute__((vector_size(32), aligned(4)));
/* 16 floats, for element-wise kernels whose loop is instruction-bound (GELU): with AVX-512
 * one instruction per 16 lanes (measured 1.4x faster on the FFN activations on a core that
 * splits 512-bit operations in two), without it GCC lowers each to two 8-lane ones. */
typedef float levi__v16 __attribute__((vector_size(64)));
typedef int32_t levi__v16i __attribute__((vector_size(64)));
typedef float levi__v16u __attribute__((vector_size(64), aligned(4)));
#define LEVI__LD16(p) (*(const levi__v16u *)(p))
#define LEVI__ST16(p, v) (*(levi__v16u *)(p) = (v))
#define LEVI__LD(p) (*(const levi__v8u *)(p))
#define LEVI__ST(p, v) (*(levi__v8u *)(p) = (v))
#if defined(__clang__)
#define LEVI__SHUF(a, b, ...) __builtin_shufflevector((a), (b), __VA_ARGS__)
#else
#define LEVI__SHUF(a, b, ...) __builtin_shuffle((a), (b), (levi__v8i){__VA_ARGS__})
#endif

static inline levi__v8 levi__bc(float x) {
    return (levi__v8){x, x, x, x, x, x, x, x};
}
static inline levi__v8 levi__v8_select(levi__v8i m, levi__v8 a, levi__v8 b) {
    return (levi__v8)((m & (levi__v8i)a) | (~m & (levi__v8i)b));
}
static inline levi__v8 levi__v8_max(levi__v8 a, levi__v8 b) {
    return levi__v8_select(a > b, a, b);
}
static inline float levi__hsum(levi__v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
static inline float levi__hmax(levi__v8 v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}
/* ----------------------------------------------------------------------------------------
 * Linear */

void levi_linear_forward(float *out, const float *inp, const float *w, const float *b, int64_t N,
                         int C, int OC) {
    // out[N,OC] = inp[N,C] @ w[OC,C]^T + b[OC]
    int n = levi__to_int(N, "linear: N must fit in int for levi_gemm");
    if (n == 0 || OC == 0) return;
    float beta = 0.0f;
    if (b) {
        // The bias goes into out first and the GEMM accumulates onto it (beta = 1): one write
        // pass over the output instead of a separate read-modify-write pass after the GEMM.
        LEVI__OMP_FOR_IF(N * OC > LEVI__PAR_MEM)
        for (int64_t i = 0; i < N; i++) memcpy(out + i * OC, b, (size_t)OC * sizeof(float));
        beta = 1.0f;
    }
    if (C == 0) {
        if (!b) memset(out, 0, (size_t)N * (size_t)OC * sizeof(float));
        return;
    }
    levi_gemm(0, 1, n, OC, C, 1.0f, inp, C, w, C, beta, out, OC);
}

void levi_linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                          const float *w, int64_t N, int C, int OC) {
    // dout[N,OC], inp[N,C], w[OC,C]
    int n = levi__to_int(N, "linear: N must fit in int for levi_gemm");
    if (n == 0 || OC == 0) return;
    if (dinp && C > 0) levi_gemm(0, 0, n, C, OC, 1.0f, dout, OC, w, C, 1.0f, dinp, C);
    if (dw && C > 0) levi_gemm(1, 0, OC, C, n, 1.0f, dout, OC, inp, C, 1.0f, dw, C);
    if (db) {
        // Column sums. Threads own disjoint blocks of 64 columns and walk all rows in order,
        // so the sum order (and the result) does not depend on the thread count.
        const int blk = 64;
        int nblk = (OC + blk - 1) / blk;
        LEVI__OMP_FOR_IF(N * OC > LEVI__PAR_MEM && nblk > 1)
        for (int ib = 0; ib < nblk; ib++) {
            int o0 = ib * blk, o1 = o0 + blk < OC ? o0 + blk : OC;
            for (int64_t i = 0; i < N; i++) {
                const float *d = dout + i * OC;
                LEVI__OMP_SIMD
                for (int o = o0; o < o1; o++) db[o] += d[o];
            }
        }
    }
}

/* ----------------------------------------------------------------------------------------
 * Embedding */

void levi_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N, int V,
                            int C) {
    // out[N,C] = table[V,C][ids[N]]
    for (int64_t i = 0; i < N; i++) LEVI_ASSERT(ids[i] >= 0 && ids[i] < V, "embedding id");
    LEVI__OMP_FOR_IF(N * C > LEVI__PAR_MEM)
    for (int64_t i = 0; i < N; i++)
        memcpy(out + i * C, table + (int64_t)ids[i] * C, (size_t)C * sizeof(float));
}

void levi_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N, int V,
                             int C) {
    // dtable[V,C] += scatter of dout[N,C]. Serial: repeated ids would race.
    if (!dtable) return;
    for (int64_t i = 0; i < N; i++) {
        LEVI_ASSERT(ids[i] >= 0 && ids[i] < V, "embedding id out of range in backward");
        float *t = dtable + (int64_t)ids[i] * C;
        const float *d = dout + i * C;
        LEVI__OMP_SIMD
        for (int c = 0; c < C; c++) t[c] += d[c];
    }
}

/* ----------------------------------------------------------------------------------------
 * Layer norm */

void levi_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                            const float *b, int64_t N, int C, float eps) {
    // inp, out [N,C]; w, b [C]; mean, rstd [N] (either may be NULL)
    LEVI_ASSERT(w && b && C > 0, "layernorm needs w, b and C > 0");
    LEVI__OMP_FOR_IF(N * C > LEVI__PAR_MEM)
    for (int64_t i = 0; i < N; i++) {
        const float *x = inp + i * C;
        float *o = out + i * C;
        // Two passes (mean, then squared deviations): the one-pass E[x^2] - E[x]^2 cancels
        // badly when the mean is large against the spread. The sums run in double (SIMD lanes,
        // so no slower than a sequential float sum): with rows offset by up to 60, float sums
        // put outputs ~1e-4 off; in double they stay within 8e-6 of PyTorch.
        double sum = 0.0;
        LEVI__OMP_SIMD_SUM(sum)
        for (int c = 0; c < C; c++) sum += x[c];
        double dm = sum / C, sq = 0.0;
        LEVI__OMP_SIMD_SUM(sq)
        for (int c = 0; c < C; c++) {
            double d = x[c] - dm;
            sq += d * d;
        }
        float m = (float)dm;
        float s = (float)(1.0 / sqrt(sq / C + (double)eps));
        LEVI__OMP_SIMD
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * w[c] + b[c];
        if (mean) mean[i] = m;
        if (rstd) rstd[i] = s;
    }
}

void levi_layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                             const float *w, const float *mean, const float *rstd, int64_t N,
                             int C) {
    // dout, inp [N,C]; w [C]; mean, rstd [N] from the forward
    LEVI_ASSERT(mean && rstd, "layernorm backward needs the mean and rstd saved by forward");
    if (dinp) {
        LEVI__OMP_FOR_IF(N * C > LEVI__PAR_MEM)
        for (int64_t i = 0; i < N; i++) {
            const float *x = inp + i * C, *d = dout + i * C;
            float *dx = dinp + i * C;
            float m = mean[i], s = rstd[i];
            // dx = s * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w
            float gm = 0.0f, gxm = 0.0f;
            LEVI__OMP_SIMD_SUM2(gm, gxm)
            for (int c = 0; c < C; c++) {
                float g = d[c] * w[c];
                gm += g;
                gxm += g * (x[c] - m) * s;
            }
            gm /= (float)C;
            gxm /= (float)C;
            LEVI__OMP_SIMD
            for (int c = 0; c < C; c++) {
                float xhat = (x[c] - m) * s;
                dx[c] += s * (d[c] * w[c] - gm - xhat * gxm);
            }
        }
    }
    if (dw || db) {
        // Column sums over rows, column-blocked for a thread-count-independent order.
        const int blk = 64;
        int nblk = (C + blk - 1) / blk;
        LEVI__OMP_FOR_IF(N * C > LEVI__PAR_MEM && nblk > 1)
        for (int ib = 0; ib < nblk; ib++) {
            int c0 = ib * blk, c1 = c0 + blk < C ? c0 + blk : C;
            for (int64_t i = 0; i < N; i++) {
                const float *x = inp + i * C, *d = dout + i * C;
                float m = mean[i], s = rstd[i];
                if (dw) {
                    LEVI__OMP_SIMD
                    for (int c = c0; c < c1; c++) dw[c] += d[c] * (x[c] - m) * s;
                }
                if (db) {
                    LEVI__OMP_SIMD
                    for (int c = c0; c < c1; c++) db[c] += d[c];
                }
            }
        }
    }
}

/* ----------------------------------------------------------------------------------------
 * Activations
 *
 * GELU, exact (erf) form as BERT was trained with, not the tanh approximation (the two differ
 * by up to ~1e-3, enough to move golden tests). Phi(x) comes from polynomial approximations of
 * the normal tail Phi(-|x|) = erfc(|x| / sqrt 2) / 2, computed directly (not as 1 + erf, which
 * cancels for x << 0 where x * Phi(x) is small) in plain arithmetic that vectorises. */

/* exp(x) for x <= 88: 2^n * e^r with n = round(x / ln 2) and |r| <= ln2 / 2, e^r by its Taylor
 * polynomial of degree 7 (truncation error < 5e-9 relative). Inputs below -87 give ~1e-38
 * instead of a smaller number: every caller adds the result to terms near 1 or multiplies it
 * by a bounded value, where this is far below float resolution. */
static inline float levi__expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f; // ln 2 split in two: the high part is exact in n*
    r = r - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* GELU forward of 16 values: x * Phi(x) with erfc by Abramowitz & Stegun 7.1.28,
 * erfc(z) ~ (1 + a1 z + ... + a6 z^6)^-16 (|erf error| <= 3e-7): one division and no exp, so
 * about half the work of 7.1.26 (below) on the pass that runs on every FFN activation.
 * z is capped at 10 (erfc(10) ~ 2e-45 is 0 in float) so the power cannot overflow. Every
 * operation is element-wise: a value's result does not depend on its neighbours. */
static inline levi__v16 levi__gelu16(levi__v16 x) {
    const levi__v16 zero = {0};
    levi__v16 z = (levi__v16)((levi__v16i)x & 0x7fffffff) * 0.70710678118654752f;
    const levi__v16i small = z < 10.0f;
    z = (levi__v16)((small & (levi__v16i)z) | (~small & (levi__v16i)(zero + 10.0f)));
    levi__v16 p = zero + 0.0000430638f;
    p = p * z + 0.0002765672f;
    p = p * z + 0.0001520143f;
    p = p * z + 0.0092705272f;
    p = p * z + 0.0422820123f;
    p = p * z + 0.0705230784f;
    p = p * z + 1.0f;
    levi__v16 r = 1.0f / p;
    r = r * r, r = r * r, r = r * r, r = r * r;
    const levi__v16 tail = 0.5f * r; // Phi(-|x|)
    const levi__v16i pos = x >= 0.0f;
    return x * (levi__v16)((pos & (levi__v16i)(1.0f - tail)) | (~pos & (levi__v16i)tail));
}

/* d/dx x * Phi(x) = Phi(x) + x * phi(x), with the tail Phi(-|x|) by Abramowitz & Stegun
 * 7.1.26 (|erfc error| <= 1.5e-7), whose exp(-x^2/2) factor is also phi(x) * sqrt(2 pi). */
static inline float levi__gelu_grad(float x) {
    const float ax = fabsf(x), z = ax * 0.70710678118654752f;
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = 1.061405429f;
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    poly = poly * t;
    const float gauss = levi__expf(-z * z);
    const float tail = 0.5f * poly * gauss;
    const float cdf = x >= 0.0f ? 1.0f - tail : tail;
    return cdf + x * 0.39894228040143268f * gauss;
}

/* The last n < 16 values of a GELU pass, through a zero-padded vector: the same formula for
 * every element, so a value's result does not depend on where the pass ends. */
static void levi__gelu_tail(float *out, const float *x, int n) {
    float t[16] = {0};
    memcpy(t, x, (size_t)n * sizeof(float));
    const levi__v16 y = levi__gelu16(LEVI__LD16(t));
    memcpy(out, &y, (size_t)n * sizeof(float));
}

void levi_gelu_forward(float *out, const float *inp, int64_t n) {
    // out[n] = x * Phi(x); in place (out == inp) is fine
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MATH)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        const int64_t b1 = LEVI__BLOCK_END(b0, n);
        int64_t i = b0;
        for (; i + 16 <= b1; i += 16) LEVI__ST16(out + i, levi__gelu16(LEVI__LD16(inp + i)));
        if (i < b1) levi__gelu_tail(out + i, inp + i, (int)(b1 - i));
    }
}

void levi_bias_gelu_forward(float *out, float *pre, const float *bias, int64_t rows, int cols) {
    LEVI__OMP_FOR_IF(rows * cols > LEVI__PAR_MATH)
    for (int64_t r = 0; r < rows; r++) {
        float *p = pre + r * cols, *o = out + r * cols;
        int c = 0;
        for (; c + 16 <= cols; c += 16) {
            const levi__v16 x = LEVI__LD16(p + c) + LEVI__LD16(bias + c);
            if (o != p) LEVI__ST16(p + c, x);
            LEVI__ST16(o + c, levi__gelu16(x));
        }
        if (c < cols) {
            for (int q = c; q < cols; q++) p[q] += bias[q];
            levi__gelu_tail(o + c, p + c, cols - c);
        }
    }
}

void levi_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n) {
    if (!dinp) return;
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MATH)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        const int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) dinp[i] += dout[i] * levi__gelu_grad(inp[i]);
    }
}

void levi_gelu_backward_inplace(float *d, const float *inp, int64_t n) {
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MATH)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        const int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) d[i] *= levi__gelu_grad(inp[i]);
    }
}

void levi_relu_forward(float *out, const float *inp, int64_t n) {
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MEM)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
    }
}

void levi_relu_backward(float *dinp, const float *inp, const float *dout, int64_t n) {
    // Gradient 0 at x == 0, as PyTorch.
    if (!dinp) return;
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MEM)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) dinp[i] += inp[i] > 0.0f ? dout[i] : 0.0f;
    }
}

/* ----------------------------------------------------------------------------------------
 * Dropout */

void levi_dropout_forward(float *out, float *mask, const float *inp, int64_t n, float p,
                          levi_rng *rng) {
    LEVI_ASSERT(p >= 0.0f && p < 1.0f, "dropout p must be in [0, 1)");
    if (p == 0.0f) {
        if (out != inp) memmove(out, inp, (size_t)n * sizeof(float));
        if (mask)
            for (int64_t i = 0; i < n; i++) mask[i] = 1.0f;
        return;
    }
    LEVI_ASSERT(mask && rng, "dropout with p > 0 needs a mask buffer and an rng");
    // The draws stay serial so the mask depends only on the seed, never on the thread count.
    levi_rng_dropout(rng, (size_t)n, p, mask, NULL);
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MEM)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) out[i] = inp[i] * mask[i];
    }
}

void levi_dropout_backward(float *dinp, const float *dout, const float *mask, int64_t n) {
    if (!dinp) return;
    LEVI_ASSERT(mask, "dropout backward needs the mask saved by forward");
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MEM)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) dinp[i] += dout[i] * mask[i];
    }
}

/* ----------------------------------------------------------------------------------------
 * Attention
 *
 * Every product goes through levi__mm, a register-tiled kernel (4 rows x 32 columns of
 * accumulators in 8-float vectors) over small contiguous tiles, rather than levi_gemm: the
 * products are tiny (S x S x HD per head), and the installed OpenBLAS is the pthreads build,
 * which called per head from inside an OpenMP region starts its own threads on top of ours
 * (measured: slower on two threads than on one). A head's Q, K, V rows sit ldq/ldk/ldv floats
 * apart (3H in a packed QKV buffer), which maps them onto a handful of L1 sets, so each head's
 * K (transposed) and V are first copied into padded contiguous tiles that every query block
 * reuses.
 * Measured on one core, MiniLM shapes (B=64, S=64, 12 heads of 32), against the per-key tile
 * loops this replaced: forward 9.4 vs 18.8 ms, backward 15.5 vs 30 ms.
 *
 * Two forward paths. Inference (no probs, no dropout) runs one sequence per thread and copies
 * all its heads' Q, K^T, V into tiles first, reading the big row-major buffers strictly in
 * order; the heads' outputs gather in a contiguous [S, NH*HD] tile copied out at the end.
 * Training runs one (sequence, head) pair per thread, writes the probabilities straight into
 * probs, and touches the sequence's rows once (levi__touch_rows) before its first head.
 *
 * Masking: a padded key gets -inf before the max and a 0 multiplier after the exp, so its
 * probability is exactly 0 (what Hugging Face's additive finfo.min bias gives after the exp
 * underflows). Keys after a sequence's last valid one are skipped by every product: the common
 * right-padded batch costs only its real length. A query row whose keys are all padded
 * (cannot happen with a valid [CLS]) gets uniform probabilities 1/S over all keys, which is
 * what Hugging Face computes there (every score is finfo.min), and never NaN.
 *
 * Dropout decisions are a hash of (seed, element index), recomputed by backward: nothing of
 * size [B, NH, S, S] is saved for them, no serial stream of S*S draws per head is needed, and
 * they do not depend on the thread count. */

#define LEVI__LOG2E 1.44269504088896341f
/* Query rows per block in inference attention (a multiple of levi__mm's 4-row tile): a
 * block's probabilities stay in L1 between the two products even for long sequences. */
#define LEVI__QBLOCK 16

static int levi__round8(int n) {
    return (n + 7) / 8 * 8;
}

/* Keeps four vectors in registers: without it GCC folds each B load into every FMA that uses
 * it (4 rows x 4 loads per k step instead of 4), and the kernel waits on the load ports
 * (measured: the inference attention ~10% faster at MiniLM shapes, one core). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LEVI__IN_REGS(a, b, c, d) __asm__("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d))
#else
#define LEVI__IN_REGS(a, b, c, d) ((void)0)
#endif

/* C[M,N] (row stride ldc) = alpha * A[M,K] (lda) . B[K,N] (ldb), plus C when accumulate.
 * Every row of B must be readable up to round8(N) columns (packed tiles are padded for that);
 * lanes past N are computed and dropped. Tiles of 4 rows x 32 columns keep 16 accumulators in
 * registers. */
static void levi__mm(float *C, int ldc, const float *A, int lda, const float *B, int ldb, int M,
                     int N, int K, float alpha, int accumulate) {
    const levi__v8 al = levi__bc(alpha);
    for (int i0 = 0; i0 < M; i0 += 4) {
        const int mr = M - i0 < 4 ? M - i0 : 4;
        // Rows past M alias row 0: computed, never stored.
        const float *a0 = A + (size_t)i0 * lda;
        const float *a1 = mr > 1 ? a0 + lda : a0, *a2 = mr > 2 ? a0 + 2 * (size_t)lda : a0;
        const float *a3 = mr > 3 ? a0 + 3 * (size_t)lda : a0;
        float *c0 = C + (size_t)i0 * ldc;
        int j0 = 0;
        for (; j0 + 32 <= N; j0 += 32) {
            levi__v8 c[4][4] = {{{0}}};
            const float *b = B + j0;
            for (int k = 0; k < K; k++, b += ldb) {
                levi__v8 b0 = LEVI__LD(b), b1 = LEVI__LD(b + 8);
                levi__v8 b2 = LEVI__LD(b + 16), b3 = LEVI__LD(b + 24);
                LEVI__IN_REGS(b0, b1, b2, b3);
                levi__v8 x = levi__bc(a0[k]);
                c[0][0] += x * b0, c[0][1] += x * b1, c[0][2] += x * b2, c[0][3] += x * b3;
                x = levi__bc(a1[k]);
                c[1][0] += x * b0, c[1][1] += x * b1, c[1][2] += x * b2, c[1][3] += x * b3;
                x = levi__bc(a2[k]);
                c[2][0] += x * b0, c[2][1] += x * b1, c[2][2] += x * b2, c[2][3] += x * b3;
                x = levi__bc(a3[k]);
                c[3][0] += x * b0, c[3][1] += x * b1, c[3][2] += x * b2, c[3][3] += x * b3;
            }
            for (int r = 0; r < mr; r++)
                for (int q = 0; q < 4; q++) {
                    float *cr = c0 + (size_t)r * ldc + j0 + 8 * q;
                    LEVI__ST(cr, accumulate ? LEVI__LD(cr) + al * c[r][q] : al * c[r][q]);
                }
        }
        for (; j0 < N; j0 += 8) {
            levi__v8 c[4] = {{0}};
            const float *b = B + j0;
            for (int k = 0; k < K; k++, b += ldb) {
                const levi__v8 b0 = LEVI__LD(b);
                c[0] += levi__bc(a0[k]) * b0, c[1] += levi__bc(a1[k]) * b0;
                c[2] += levi__bc(a2[k]) * b0, c[3] += levi__bc(a3[k]) * b0;
            }
            const int w = N - j0 < 8 ? N - j0 : 8;
            for (int r = 0; r < mr; r++) {
                float *cr = c0 + (size_t)r * ldc + j0;
                if (w == 8) {
                    LEVI__ST(cr, accumulate ? LEVI__LD(cr) + al * c[r] : al * c[r]);
                } else {
                    float t[8];
                    memcpy(t, &c[r], sizeof t);
                    for (int q = 0; q < w; q++) cr[q] = (accumulate ? cr[q] : 0.0f) + alpha * t[q];
                }
            }
        }
    }
}

/* Packs rows [0, M) x columns [0, D) of X (row stride ldx) into T, row stride ldt >= D, with
 * columns D..ldt zero. */
static void levi__pack(float *T, int ldt, const float *X, int ldx, int M, int D) {
    for (int i = 0; i < M; i++) {
        float *t = T + (size_t)i * ldt;
        const float *x = X + (size_t)i * ldx;
        int d = 0;
        for (; d + 8 <= D; d += 8) LEVI__ST(t + d, LEVI__LD(x + d)); // short rows: no memcpy call
        for (; d < D; d++) t[d] = x[d];
        for (; d < ldt; d++) t[d] = 0.0f;
    }
}

/* levi__pack of one row plus a bias: T[d] = X[d] + bias[d] for d < D, zero up to ldt. */
static inline __attribute__((always_inline)) void
levi__pack_row_bias(float *T, int ldt, const float *X, const float *bias, int D) {
    int d = 0;
    for (; d + 8 <= D; d += 8) LEVI__ST(T + d, LEVI__LD(X + d) + LEVI__LD(bias + d));
    for (; d < D; d++) T[d] = X[d] + bias[d];
    for (; d < ldt; d++) T[d] = 0.0f;
}

/* Row i of head h into its tile: with the head's slice of bias added when there is one. */
static inline __attribute__((always_inline)) void
levi__pack_head_row(float *T, int ldt, const float *X, const float *bias, int h, int HD) {
    if (bias)
        levi__pack_row_bias(T, ldt, X, bias + (size_t)h * HD, HD);
    else
        levi__pack(T, ldt, X, 0, 1, HD);
}

/* T[d, i] = X[i, d] for i < M, d < D (row strides ldx, ldt). 8 x 8 blocks go through vector
 * shuffles: a scalar transpose of K costs as much as the scores product it feeds, because the
 * source rows (3H floats apart) share a few L1 sets and every element is a separate access. */
static void levi__transpose(float *T, int ldt, const float *X, int ldx, int M, int D) {
    int i0 = 0;
    for (; i0 + 8 <= M; i0 += 8) {
        int d0 = 0;
        for (; d0 + 8 <= D; d0 += 8) {
            const float *x = X + (size_t)i0 * ldx + d0;
            levi__v8 r0 = LEVI__LD(x), r1 = LEVI__LD(x + ldx), r2 = LEVI__LD(x + 2 * (size_t)ldx);
            levi__v8 r3 = LEVI__LD(x + 3 * (size_t)ldx), r4 = LEVI__LD(x + 4 * (size_t)ldx);
            levi__v8 r5 = LEVI__LD(x + 5 * (size_t)ldx), r6 = LEVI__LD(x + 6 * (size_t)ldx);
            levi__v8 r7 = LEVI__LD(x + 7 * (size_t)ldx);
            levi__v8 t0 = LEVI__SHUF(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13);
            levi__v8 t1 = LEVI__SHUF(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
            levi__v8 t2 = LEVI__SHUF(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13);
            levi__v8 t3 = LEVI__SHUF(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
            levi__v8 t4 = LEVI__SHUF(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13);
            levi__v8 t5 = LEVI__SHUF(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
            levi__v8 t6 = LEVI__SHUF(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13);
            levi__v8 t7 = LEVI__SHUF(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
            levi__v8 u0 = LEVI__SHUF(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
            levi__v8 u1 = LEVI__SHUF(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
            levi__v8 u2 = LEVI__SHUF(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
            levi__v8 u3 = LEVI__SHUF(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
            levi__v8 u4 = LEVI__SHUF(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
            levi__v8 u5 = LEVI__SHUF(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
            levi__v8 u6 = LEVI__SHUF(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
            levi__v8 u7 = LEVI__SHUF(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
            float *t = T + (size_t)d0 * ldt + i0;
            LEVI__ST(t, LEVI__SHUF(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11));
            LEVI__ST(t + ldt, LEVI__SHUF(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11));
            LEVI__ST(t + 2 * (size_t)ldt, LEVI__SHUF(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11));
            LEVI__ST(t + 3 * (size_t)ldt, LEVI__SHUF(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11));
            LEVI__ST(t + 4 * (size_t)ldt, LEVI__SHUF(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15));
            LEVI__ST(t + 5 * (size_t)ldt, LEVI__SHUF(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15));
            LEVI__ST(t + 6 * (size_t)ldt, LEVI__SHUF(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15));
            LEVI__ST(t + 7 * (size_t)ldt, LEVI__SHUF(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15));
        }
        for (; d0 < D; d0++)
            for (int i = i0; i < i0 + 8; i++) T[(size_t)d0 * ldt + i] = X[(size_t)i * ldx + d0];
    }
    for (; i0 < M; i0++)
        for (int d = 0; d < D; d++) T[(size_t)d * ldt + i0] = X[(size_t)i0 * ldx + d];
}

/* T[D, ldt] = X[0..M, 0..D)^T (row stride ldx), columns M..ldt zero. */
static void levi__pack_t(float *T, int ldt, const float *X, int ldx, int M, int D) {
    levi__transpose(T, ldt, X, ldx, M, D);
    for (int d = 0; d < D; d++)
        for (int i = M; i < ldt; i++) T[(size_t)d * ldt + i] = 0.0f;
}

/* Keys past the last valid one are masked for every query, so the products stop there. 0
 * valid keys: all S keys, which get uniform probabilities. */
static int levi__key_len(const int32_t *m, int S) {
    int kv = 0;
    for (int j = 0; j < S; j++)
        if (m[j]) kv = j + 1;
    return kv ? kv : S;
}

/* Per-sequence key masks as floats: kbias[j] = 0 or -inf (added before the max), kmul[j] = 1
 * or 0 (multiplied after the exp, so a masked key gets exactly 0). Returns the valid count. */
static int levi__key_masks(float *kbias, float *kmul, const int32_t *m, int S) {
    int n = 0;
    for (int j = 0; j < S; j++) {
        kbias[j] = m[j] ? 0.0f : -INFINITY;
        kmul[j] = m[j] ? 1.0f : 0.0f;
        n += m[j] != 0;
    }
    return n;
}

/* 2^x elementwise for x <= 0 (scores in log2 units minus their max); x below -126, -inf
 * included, gives 2^-126 (every caller multiplies it by a 0 mask or adds it to terms near 1).
 * 2^r for r = x - round(x) in [-1/2, 1/2] is e^(r ln 2) by its Taylor polynomial of degree 6
 * (error < 1.3e-7 relative). */
static inline levi__v8 levi__exp2_8(levi__v8 x) {
    x = levi__v8_select(x > -126.0f, x, levi__bc(-126.0f));
    const levi__v8 n = (x + 12582912.0f) - 12582912.0f;
    const levi__v8 t = (x - n) * 0.69314718055994531f;
    levi__v8 p = levi__bc(1.0f / 720.0f);
    p = p * t + 1.0f / 120.0f;
    p = p * t + 1.0f / 24.0f;
    p = p * t + 1.0f / 6.0f;
    p = p * t + 0.5f;
    p = p * t + 1.0f;
    p = p * t + 1.0f;
    const levi__v8i bits = (__builtin_convertvector(n, levi__v8i) + 127) << 23;
    return p * (levi__v8)bits;
}

/* One row of levi__softmax_rows. */
static void levi__softmax_row(float *row, const float *kbias, const float *kmul, int kv, int S) {
    levi__v8 vm = levi__bc(-INFINITY);
    int j = 0;
    for (; j + 8 <= kv; j += 8) vm = levi__v8_max(vm, LEVI__LD(row + j) + LEVI__LD(kbias + j));
    float mx = levi__hmax(vm);
    for (; j < kv; j++) mx = row[j] + kbias[j] > mx ? row[j] + kbias[j] : mx;
    const levi__v8 vmx = levi__bc(mx);
    levi__v8 vs = {0};
    for (j = 0; j + 8 <= kv; j += 8) {
        const levi__v8 e =
            levi__exp2_8(LEVI__LD(row + j) + LEVI__LD(kbias + j) - vmx) * LEVI__LD(kmul + j);
        LEVI__ST(row + j, e);
        vs += e;
    }
    float sum = levi__hsum(vs);
    for (; j < kv; j++) {
        row[j] = levi__expf((row[j] + kbias[j] - mx) * 0.69314718055994531f) * kmul[j];
        sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (j = 0; j < kv; j++) row[j] *= inv;
    for (j = kv; j < S; j++) row[j] = 0.0f;
}

/* Softmax in place over rows [0, rows) x keys [0, kv) of P (row stride ld). The scores are in
 * log2 units (the products fold log2(e) into their scale), masked keys get exactly 0 (kbias
 * -inf before the max, kmul 0 after the exp), keys kv..S get 0; nvalid 0: every key 1/S.
 * Four rows advance in lockstep: one row alone is a chain of dependent reductions (max, then
 * sum) that leaves the core waiting; four independent chains keep it busy (measured: 0.69 ->
 * 0.49 ns per score at S = 64). */
static void levi__softmax_rows(float *P, int ld, int rows, const float *kbias, const float *kmul,
                               int nvalid, int kv, int S) {
    if (!nvalid) {
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < S; j++) P[(size_t)i * ld + j] = 1.0f / (float)S;
        return;
    }
    int i = 0;
    for (; i + 4 <= rows && kv % 8 == 0; i += 4) {
        float *r0 = P + (size_t)i * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        levi__v8 m0 = levi__bc(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
        for (int j = 0; j < kv; j += 8) {
            const levi__v8 kb = LEVI__LD(kbias + j);
            m0 = levi__v8_max(m0, LEVI__LD(r0 + j) + kb);
            m1 = levi__v8_max(m1, LEVI__LD(r1 + j) + kb);
            m2 = levi__v8_max(m2, LEVI__LD(r2 + j) + kb);
            m3 = levi__v8_max(m3, LEVI__LD(r3 + j) + kb);
        }
        const levi__v8 x0 = levi__bc(levi__hmax(m0)), x1 = levi__bc(levi__hmax(m1));
        const levi__v8 x2 = levi__bc(levi__hmax(m2)), x3 = levi__bc(levi__hmax(m3));
        levi__v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int j = 0; j < kv; j += 8) {
            const levi__v8 kb = LEVI__LD(kbias + j), km = LEVI__LD(kmul + j);
            levi__v8 e = levi__exp2_8(LEVI__LD(r0 + j) + kb - x0) * km;
            LEVI__ST(r0 + j, e), s0 += e;
            e = levi__exp2_8(LEVI__LD(r1 + j) + kb - x1) * km;
            LEVI__ST(r1 + j, e), s1 += e;
            e = levi__exp2_8(LEVI__LD(r2 + j) + kb - x2) * km;
            LEVI__ST(r2 + j, e), s2 += e;
            e = levi__exp2_8(LEVI__LD(r3 + j) + kb - x3) * km;
            LEVI__ST(r3 + j, e), s3 += e;
        }
        const levi__v8 i0 = levi__bc(1.0f / levi__hsum(s0)), i1 = levi__bc(1.0f / levi__hsum(s1));
        const levi__v8 i2 = levi__bc(1.0f / levi__hsum(s2)), i3 = levi__bc(1.0f / levi__hsum(s3));
        for (int j = 0; j < kv; j += 8) {
            LEVI__ST(r0 + j, LEVI__LD(r0 + j) * i0), LEVI__ST(r1 + j, LEVI__LD(r1 + j) * i1);
            LEVI__ST(r2 + j, LEVI__LD(r2 + j) * i2), LEVI__ST(r3 + j, LEVI__LD(r3 + j) * i3);
        }
        for (int q = 0; q < 4; q++)
            for (int j = kv; j < S; j++) P[(size_t)(i + q) * ld + j] = 0.0f;
    }
    for (; i < rows; i++) levi__softmax_row(P + (size_t)i * ld, kbias, kmul, kv, S);
}

/* Dropout of one probability row: dst[j] = p[j] * (0 or 1/(1-rate)) for keys j < kv. The
 * decision for element (row, j), row = (b*NH + h)*S + i, is a 32-bit hash of j under a per-row
 * key (splitmix64 of seed and row): drop when it is below thr = rate * 2^32. The per-element
 * hash (Wellons' lowbias32, a bijection with good avalanche) vectorises; the 64-bit mixing
 * runs once per row. */
static uint32_t levi__drop_key(uint64_t seed, uint64_t row) {
    uint64_t z = seed + (row + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

static void levi__drop_row(float *dst, const float *p, int kv, uint32_t key, uint32_t thr,
                           float keep) {
    LEVI__OMP_SIMD
    for (int j = 0; j < kv; j++) {
        uint32_t x = key + (uint32_t)j * 0x9E3779B9u;
        x ^= x >> 16;
        x *= 0x21F0AAADu;
        x ^= x >> 15;
        x *= 0x735A2D97u;
        x ^= x >> 15;
        dst[j] = x < thr ? 0.0f : p[j] * keep;
    }
}

/* Per-thread floats, the larger of: the per-head tiles of training (four S x round8(HD), one
 * HD x round8(S), three S x round8(S), two round8(S)) and the per-sequence tiles of inference
 * (every head's Q, K^T, V, the sequence's output, one query block of scores, two round8(S));
 * plus slack for the 64-byte aligned tiles (generous: it is also what BERT's arena layout was
 * measured with, and shifting the buffers after it moved the encoder benchmark by ~2%). */
static size_t levi__attn_slot_floats(int S, int NH, int HD) {
    const size_t S8 = (size_t)levi__round8(S), HD8 = (size_t)levi__round8(HD), nh = (size_t)NH;
    const size_t train = 4 * (size_t)S * HD8 + (size_t)HD * S8 + 3 * (size_t)S * S8 + 2 * S8;
    const size_t infer = nh * (2 * (size_t)S * HD8 + (size_t)HD * S8) + (size_t)S * nh * HD +
                         (size_t)LEVI__QBLOCK * S8 + 2 * S8;
    return (train > infer ? train : infer) + (3 * nh + 12) * 16;
}

size_t levi_attention_scratch_floats(int S, int NH, int HD, int threads) {
    LEVI_ASSERT(S > 0 && NH > 0 && HD > 0 && threads > 0, "attention scratch: bad sizes");
    return levi__attn_slot_floats(S, NH, HD) * (size_t)threads;
}

levi_attention_params levi_attention_default_params(int B, int S, int NH, int HD) {
    levi_attention_params p = {B,       S,       NH,
                               HD,      NH * HD, NH * HD,
                               NH * HD, NH * HD, HD > 0 ? 1.0f / sqrtf((float)HD) : 1.0f,
                               0.0f,    NULL};
    return p;
}

/* This thread's scratch slot, 64-byte aligned. */
static float *levi__attn_slot(float *scratch, size_t slot) {
    float *at = scratch + slot * (size_t)levi__thread_num();
    return (float *)(((uintptr_t)at + 63) & ~(uintptr_t)63);
}

/* Carves n floats off *at; every tile starts on a 64-byte boundary. */
static float *levi__take(float **at, size_t n) {
    float *p = *at;
    *at += (n + 15) / 16 * 16;
    return p;
}

/* Reads one float per cache line of rows [0, S) x columns [0, width) of X (row stride ld).
 * Before the first head of a sequence, this pulls the sequence's Q, K, V rows (and its output
 * rows) into cache with plain sequential loads, which the hardware prefetcher follows. The
 * heads then read them in 128-byte pieces from rows 3H floats apart, an access pattern no
 * prefetcher follows: measured on MiniLM shapes, touching first cut the attention time per
 * layer from ~14 ms to ~10 ms (software prefetch instructions did not help). */
static void levi__touch_rows(const float *X, int ld, int S, int width) {
    float s = 0.0f;
    for (int r = 0; r < S; r++)
        for (int c = 0; c < width; c += 16) s += X[(size_t)r * ld + c];
    volatile float sink = s; // keeps the loads
    (void)sink;
}

static void levi__attn_check(const levi_attention_params *p, const int32_t *mask,
                             const float *scratch, size_t scratch_floats) {
    const int D = p->NH * p->HD;
    LEVI_ASSERT(p->B >= 0 && p->S > 0 && p->NH > 0 && p->HD > 0, "attention: bad B, S, NH, HD");
    LEVI_ASSERT(p->ldq >= D && p->ldk >= D && p->ldv >= D && p->ldo >= D,
                "attention: row strides must be >= NH * HD");
    LEVI_ASSERT(p->dropout >= 0.0f && p->dropout < 1.0f, "attention: dropout must be in [0, 1)");
    LEVI_ASSERT(mask, "attention needs a key mask (all ones when nothing is padded)");
    LEVI_ASSERT(scratch && scratch_floats >= levi__attn_slot_floats(p->S, p->NH, p->HD),
                "attention: scratch must hold levi_attention_scratch_floats(S, NH, HD, 1) floats "
                "at least");
}

/* Inference attention of one sequence (pointers already at its first row), all heads. The
 * sequence's Q, K, V rows are read once, row by row, into per-head contiguous tiles (K
 * transposed), and the heads' outputs gather in a contiguous [S, H] tile copied out at the
 * end: the big buffers are only ever read and written sequentially. */
static void levi__attn_seq(float *out, const float *q, const float *k, const float *v,
                           const int32_t *m, const levi_attention_params *p, float *at) {
    const int S = p->S, NH = p->NH, HD = p->HD, H = NH * HD;
    const int S8 = levi__round8(S), HD8 = levi__round8(HD);
    const int kv = levi__key_len(m, S), kv8 = levi__round8(kv);
    float *qp = levi__take(&at, (size_t)NH * S * HD8); // head h: [S, HD8]
    float *kt = levi__take(&at, (size_t)NH * HD * S8); // head h: [HD, kv8]
    float *vp = levi__take(&at, (size_t)NH * S * HD8); // head h: [kv, HD8]
    float *cs = levi__take(&at, (size_t)S * H);        // [S, H]
    float *work = levi__take(&at, (size_t)LEVI__QBLOCK * S8);
    float *kbias = levi__take(&at, (size_t)S8), *kmul = levi__take(&at, (size_t)S8);
    const int nvalid = levi__key_masks(kbias, kmul, m, S);
    const size_t qstride = (size_t)S * HD8, kstride = (size_t)HD * kv8;
    const float scale2 = p->scale * LEVI__LOG2E; // scores in log2 units for the softmax
    const float *bq = p->bias, *bk = bq ? bq + H : NULL, *bv = bq ? bq + 2 * H : NULL;
    for (int i = 0; i < S; i++) {
        for (int h = 0; h < NH; h++)
            levi__pack_head_row(qp + h * qstride + (size_t)i * HD8, HD8,
                                q + (size_t)i * p->ldq + (size_t)h * HD, bq, h, HD);
        if (i < kv)
            for (int h = 0; h < NH; h++)
                levi__pack_head_row(vp + h * qstride + (size_t)i * HD8, HD8,
                                    v + (size_t)i * p->ldv + (size_t)h * HD, bv, h, HD);
    }
    for (int i0 = 0; i0 < kv; i0 += 8) {
        const int rows = kv - i0 < 8 ? kv - i0 : 8;
        for (int h = 0; h < NH; h++)
            levi__transpose(kt + h * kstride + i0, kv8, k + (size_t)i0 * p->ldk + (size_t)h * HD,
                            p->ldk, rows, HD);
    }
    if (bk) // row d of a head's K^T gets that feature's bias on every real key
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < HD; d++) {
                float *t = kt + h * kstride + (size_t)d * kv8;
                const float b = bk[h * HD + d];
                const levi__v8 vb = levi__bc(b);
                int j = 0; // by hand: GCC -O2 left this loop scalar (~30% of the packing)
                for (; j + 8 <= kv; j += 8) LEVI__ST(t + j, LEVI__LD(t + j) + vb);
                for (; j < kv; j++) t[j] += b;
            }
    for (int h = 0; h < NH; h++)
        for (int d = 0; d < HD; d++)
            for (int j = kv; j < kv8; j++) kt[h * kstride + (size_t)d * kv8 + j] = 0.0f;
    for (int h = 0; h < NH; h++) {
        const float *qh = qp + h * qstride, *kh = kt + h * kstride, *vh = vp + h * qstride;
        for (int i0 = 0; i0 < S; i0 += LEVI__QBLOCK) {
            const int rows = S - i0 < LEVI__QBLOCK ? S - i0 : LEVI__QBLOCK;
            levi__mm(work, S8, qh + (size_t)i0 * HD8, HD8, kh, kv8, rows, kv, HD, scale2, 0);
            levi__softmax_rows(work, S8, rows, kbias, kmul, nvalid, kv, S);
            levi__mm(cs + (size_t)i0 * H + (size_t)h * HD, H, work, S8, vh, HD8, rows, HD, kv, 1.0f,
                     0);
        }
    }
    for (int i = 0; i < S; i++)
        levi__pack(out + (size_t)i * p->ldo, H, cs + (size_t)i * H, H, 1, H);
}

void levi_attention_forward(float *out, float *probs, uint64_t *dropout_seed, const float *q,
                            const float *k, const float *v, const int32_t *mask,
                            levi_attention_params p, levi_rng *rng, float *scratch,
                            size_t scratch_floats) {
    levi__attn_check(&p, mask, scratch, scratch_floats);
    const int B = p.B, S = p.S, NH = p.NH, HD = p.HD, D = NH * HD;
    const size_t slot = levi__attn_slot_floats(S, NH, HD);
    const size_t slots = scratch_floats / slot;
    const int nt = (size_t)levi__max_threads() < slots ? levi__max_threads() : (int)slots;
    uint64_t seed = 0;
    if (p.dropout > 0.0f) {
        LEVI_ASSERT(rng, "attention with dropout > 0 needs an rng");
        seed = levi_rng_u64(rng);
        if (dropout_seed) *dropout_seed = seed;
    }
    if (!probs && p.dropout == 0.0f) { // inference: a sequence per thread
        LEVI__OMP_FOR_NT_IF(nt, B > 1 && (int64_t)B * NH * S * S * HD > (1 << 16))
        for (int b = 0; b < B; b++) {
            const size_t r0 = (size_t)b * S;
            levi__attn_seq(out + r0 * p.ldo, q + r0 * p.ldq, k + r0 * p.ldk, v + r0 * p.ldv,
                           mask + r0, &p, levi__attn_slot(scratch, slot));
        }
        return;
    }
    LEVI_ASSERT(!p.bias, "attention: a q|k|v bias is for inference only (no probs, no dropout)");
    const uint32_t thr = (uint32_t)fmin((double)p.dropout * 4294967296.0, 4294967295.0);
    const float keep = 1.0f / (1.0f - p.dropout);
    const int BH = B * NH, S8 = levi__round8(S), HD8 = levi__round8(HD);
    LEVI__OMP_FOR_NT_IF(nt, BH > 1 && (int64_t)BH * S * S * HD > (1 << 16))
    for (int bh = 0; bh < BH; bh++) {
        const int b = bh / NH, h = bh % NH;
        float *at = levi__attn_slot(scratch, slot);
        float *kt = levi__take(&at, (size_t)HD * S8), *vp = levi__take(&at, (size_t)S * HD8);
        float *work = levi__take(&at, (size_t)S * S8), *pd = levi__take(&at, (size_t)S * S8);
        float *kbias = levi__take(&at, (size_t)S8), *kmul = levi__take(&at, (size_t)S8);
        const size_t r0 = (size_t)b * S, c0 = (size_t)h * HD;
        const int32_t *m = mask + r0;
        const int kv = levi__key_len(m, S), kv8 = levi__round8(kv);
        const int nvalid = levi__key_masks(kbias, kmul, m, S);
        if (h == 0) {
            levi__touch_rows(q + r0 * p.ldq, p.ldq, S, D);
            levi__touch_rows(k + r0 * p.ldk, p.ldk, S, D);
            levi__touch_rows(v + r0 * p.ldv, p.ldv, S, D);
            levi__touch_rows(out + r0 * p.ldo, p.ldo, S, D);
        }
        // Q is read a 4-row block at a time and needs no packing; K (transposed) and V are
        // reused by every query block.
        levi__pack_t(kt, kv8, k + r0 * p.ldk + c0, p.ldk, kv, HD);
        levi__pack(vp, HD8, v + r0 * p.ldv + c0, p.ldv, kv, HD);
        float *P = probs ? probs + (size_t)bh * S * S : work;
        const int ldp = probs ? S : S8;
        levi__mm(P, ldp, q + r0 * p.ldq + c0, p.ldq, kt, kv8, S, kv, HD, p.scale * LEVI__LOG2E, 0);
        levi__softmax_rows(P, ldp, S, kbias, kmul, nvalid, kv, S);
        const float *A = P;
        int lda = ldp;
        if (p.dropout > 0.0f) {
            for (int i = 0; i < S; i++)
                levi__drop_row(pd + (size_t)i * S8, P + (size_t)i * ldp, kv,
                               levi__drop_key(seed, (uint64_t)bh * S + i), thr, keep);
            A = pd, lda = S8;
        }
        // Probabilities of keys >= kv are 0 (unless no key is valid, and then kv == S).
        levi__mm(out + r0 * p.ldo + c0, p.ldo, A, lda, vp, HD8, S, HD, kv, 1.0f, 0);
    }
}

void levi_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *probs,
                             uint64_t dropout_seed, const float *q, const float *k, const float *v,
                             const int32_t *mask, levi_attention_params p, float *scratch,
                             size_t scratch_floats) {
    // dq, dk, dv have the strides of q, k, v; dout that of out. Each (b, h) pair writes only
    // its own rows and head columns of dq, dk, dv, so the pairs run in parallel without races;
    // within a pair the sums run in a fixed order.
    levi__attn_check(&p, mask, scratch, scratch_floats);
    LEVI_ASSERT(probs, "attention backward needs the probs saved by forward");
    if (!dq && !dk && !dv) return;
    const int B = p.B, S = p.S, NH = p.NH, HD = p.HD, D = NH * HD;
    const size_t slot = levi__attn_slot_floats(S, NH, HD);
    const size_t slots = scratch_floats / slot;
    const int nt = (size_t)levi__max_threads() < slots ? levi__max_threads() : (int)slots;
    LEVI_ASSERT(!p.bias, "attention: a q|k|v bias is for inference only (no probs, no dropout)");
    const uint32_t thr = (uint32_t)fmin((double)p.dropout * 4294967296.0, 4294967295.0);
    const float keep = 1.0f / (1.0f - p.dropout);
    const int BH = B * NH, S8 = levi__round8(S), HD8 = levi__round8(HD);
    LEVI__OMP_FOR_NT_IF(nt, BH > 1 && (int64_t)BH * S * S * HD > (1 << 15))
    for (int bh = 0; bh < BH; bh++) {
        const int b = bh / NH, h = bh % NH;
        float *at = levi__attn_slot(scratch, slot);
        float *qp = levi__take(&at, (size_t)S * HD8), *vt = levi__take(&at, (size_t)HD * S8);
        float *kp = levi__take(&at, (size_t)S * HD8), *dop = levi__take(&at, (size_t)S * HD8);
        float *ds = levi__take(&at, (size_t)S * S8), *pd = levi__take(&at, (size_t)S * S8);
        float *tr = levi__take(&at, (size_t)S * S8);
        const size_t r0 = (size_t)b * S, c0 = (size_t)h * HD;
        const int32_t *m = mask + r0;
        const int kv = levi__key_len(m, S), kv8 = levi__round8(kv);
        if (h == 0) { // see levi__touch_rows
            levi__touch_rows(q + r0 * p.ldq, p.ldq, S, D);
            levi__touch_rows(k + r0 * p.ldk, p.ldk, S, D);
            levi__touch_rows(v + r0 * p.ldv, p.ldv, S, D);
            levi__touch_rows(dout + r0 * p.ldo, p.ldo, S, D);
            if (dq) levi__touch_rows(dq + r0 * p.ldq, p.ldq, S, D);
            if (dk) levi__touch_rows(dk + r0 * p.ldk, p.ldk, S, D);
            if (dv) levi__touch_rows(dv + r0 * p.ldv, p.ldv, S, D);
        }
        levi__pack(dop, HD8, dout + r0 * p.ldo + c0, p.ldo, S, HD);
        const float *P = probs + (size_t)bh * S * S;
        // Pd = the probabilities after dropout, as the forward multiplied them into V.
        const float *Pd = P;
        int ldpd = S;
        if (p.dropout > 0.0f) {
            for (int i = 0; i < S; i++)
                levi__drop_row(pd + (size_t)i * S8, P + (size_t)i * S, kv,
                               levi__drop_key(dropout_seed, (uint64_t)bh * S + i), thr, keep);
            Pd = pd, ldpd = S8;
        }
        if (dv) { // dV[kv, HD] += Pd[:, :kv]^T . dout; padded keys past kv get nothing
            levi__transpose(tr, S8, Pd, ldpd, S, kv);
            levi__mm(dv + r0 * p.ldv + c0, p.ldv, tr, S8, dop, HD8, kv, HD, S, 1.0f, 1);
        }
        if (!dq && !dk) continue;
        // G = dout . V^T (keys < kv): the gradient w.r.t. Pd. With Pd = P * M (M the dropout
        // multipliers), dP = G * M, and the softmax backward dS = P * (dP - rowsum(P * dP)) *
        // scale becomes (Pd * G - P * rowsum(Pd * G)) * scale: M is never needed on its own.
        levi__pack_t(vt, kv8, v + r0 * p.ldv + c0, p.ldv, kv, HD);
        levi__mm(ds, S8, dop, HD8, vt, kv8, S, kv, HD, 1.0f, 0);
        for (int i = 0; i < S; i++) {
            float *g = ds + (size_t)i * S8;
            const float *pi = P + (size_t)i * S, *pdi = Pd + (size_t)i * ldpd;
            levi__v8 acc = {0};
            int j = 0;
            for (; j + 8 <= kv; j += 8) acc += LEVI__LD(pdi + j) * LEVI__LD(g + j);
            float c = levi__hsum(acc);
            for (; j < kv; j++) c += pdi[j] * g[j];
            LEVI__OMP_SIMD
            for (j = 0; j < kv; j++) g[j] = (pdi[j] * g[j] - pi[j] * c) * p.scale;
        }
        if (dq) { // dQ += dS . K
            levi__pack(kp, HD8, k + r0 * p.ldk + c0, p.ldk, kv, HD);
            levi__mm(dq + r0 * p.ldq + c0, p.ldq, ds, S8, kp, HD8, S, HD, kv, 1.0f, 1);
        }
        if (dk) { // dK[kv, HD] += dS^T . Q
            levi__pack(qp, HD8, q + r0 * p.ldq + c0, p.ldq, S, HD);
            levi__transpose(tr, S8, ds, S8, S, kv);
            levi__mm(dk + r0 * p.ldk + c0, p.ldk, tr, S8, qp, HD8, kv, HD, S, 1.0f, 1);
        }
    }
}

/* ----------------------------------------------------------------------------------------
 * Residual add, mean pooling, concat */

void levi_add_forward(float *out, const float *a, const float *b, int64_t n) {
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MEM)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) out[i] = a[i] + b[i];
    }
}

static void levi__accumulate(float *y, const float *x, int64_t n) {
    if (!y) return;
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MEM)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) y[i] += x[i];
    }
}

void levi_add_backward(float *da, float *db, const float *dout, int64_t n) {
    levi__accumulate(da, dout, n);
    levi__accumulate(db, dout, n);
}

static float levi__meanpool_inv_count(const int32_t *m, int S) {
    int cnt = 0;
    for (int s = 0; s < S; s++) cnt += m[s] != 0;
    return 1.0f / (float)(cnt > 1 ? cnt : 1);
}

void levi_meanpool_forward(float *out, const float *inp, const int32_t *mask, int B, int S, int C) {
    // inp [B,S,C], mask [B,S] -> out [B,C]; a row with no valid token pools to zeros.
    LEVI__OMP_FOR_IF(B > 1 && (int64_t)B * S * C > LEVI__PAR_MEM)
    for (int b = 0; b < B; b++) {
        const int32_t *m = mask + (int64_t)b * S;
        float *o = out + (int64_t)b * C;
        for (int c = 0; c < C; c++) o[c] = 0.0f;
        for (int s = 0; s < S; s++)
            if (m[s]) {
                const float *x = inp + ((int64_t)b * S + s) * C;
                LEVI__OMP_SIMD
                for (int c = 0; c < C; c++) o[c] += x[c];
            }
        float inv = levi__meanpool_inv_count(m, S);
        for (int c = 0; c < C; c++) o[c] *= inv;
    }
}

void levi_meanpool_backward(float *dinp, const float *dout, const int32_t *mask, int B, int S,
                            int C) {
    if (!dinp) return;
    LEVI__OMP_FOR_IF(B > 1 && (int64_t)B * S * C > LEVI__PAR_MEM)
    for (int b = 0; b < B; b++) {
        const int32_t *m = mask + (int64_t)b * S;
        const float *d = dout + (int64_t)b * C;
        float inv = levi__meanpool_inv_count(m, S);
        for (int s = 0; s < S; s++)
            if (m[s]) {
                float *dx = dinp + ((int64_t)b * S + s) * C;
                LEVI__OMP_SIMD
                for (int c = 0; c < C; c++) dx[c] += d[c] * inv;
            }
    }
}

void levi_concat_forward(float *out, const float *a, const float *b, int64_t N, int CA, int CB) {
    // out[N,CA+CB] = [a[N,CA], b[N,CB]]
    const int C = CA + CB;
    LEVI__OMP_FOR_IF(N * C > LEVI__PAR_MEM)
    for (int64_t i = 0; i < N; i++) {
        memcpy(out + i * C, a + i * CA, (size_t)CA * sizeof(float));
        memcpy(out + i * C + CA, b + i * CB, (size_t)CB * sizeof(float));
    }
}

void levi_concat_backward(float *da, float *db, const float *dout, int64_t N, int CA, int CB) {
    const int C = CA + CB;
    LEVI__OMP_FOR_IF(N * C > LEVI__PAR_MEM)
    for (int64_t i = 0; i < N; i++) {
        const float *d = dout + i * C;
        if (da) {
            float *a = da + i * CA;
            LEVI__OMP_SIMD
            for (int c = 0; c < CA; c++) a[c] += d[c];
        }
        if (db) {
            float *bb = db + i * CB;
            LEVI__OMP_SIMD
            for (int c = 0; c < CB; c++) bb[c] += d[CA + c];
        }
    }
}

/* ----------------------------------------------------------------------------------------
 * Losses. Sums run serially in double: losses are small (N x classes, or a batch of
 * targets), and a serial sum keeps the value independent of the thread count. */

float levi_mse_forward(const float *pred, const float *target, int64_t n) {
    LEVI_ASSERT(n > 0, "mse over zero elements");
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)pred[i] - (double)target[i];
        s += d * d;
    }
    return (float)(s / (double)n);
}

void levi_mse_backward(float *dpred, const float *pred, const float *target, int64_t n,
                       float scale) {
    if (!dpred) return;
    LEVI_ASSERT(n > 0, "mse over zero elements");
    float f = 2.0f * scale / (float)n;
    for (int64_t i = 0; i < n; i++) dpred[i] += f * (pred[i] - target[i]);
}

float levi_crossentropy_forward(float *probs, const float *logits, const int32_t *targets,
                                int64_t N, int C) {
    // logits, probs [N,C]; targets [N]. loss_n = logsumexp(x_n) - x_n[y_n], with the max
    // subtracted before exp so large logits neither overflow nor lose the small ones.
    LEVI_ASSERT(N > 0 && C > 0, "cross-entropy needs N > 0 and C > 0");
    double total = 0.0;
    for (int64_t i = 0; i < N; i++) {
        const float *x = logits + i * C;
        int32_t y = targets[i];
        LEVI_ASSERT(y >= 0 && y < C, "cross-entropy target out of range [0, C)");
        float mx = x[0];
        for (int c = 1; c < C; c++) mx = x[c] > mx ? x[c] : mx;
        double sum = 0.0;
        for (int c = 0; c < C; c++) sum += exp((double)x[c] - (double)mx);
        double lse = (double)mx + log(sum);
        total += lse - (double)x[y];
        if (probs) {
            float *p = probs + i * C;
            for (int c = 0; c < C; c++) p[c] = (float)exp((double)x[c] - lse);
        }
    }
    return (float)(total / (double)N);
}

void levi_crossentropy_backward(float *dlogits, const float *probs, const int32_t *targets,
                                int64_t N, int C, float scale) {
    if (!dlogits) return;
    LEVI_ASSERT(probs, "cross-entropy backward needs the probs saved by forward");
    float f = scale / (float)N;
    for (int64_t i = 0; i < N; i++) {
        int32_t y = targets[i];
        LEVI_ASSERT(y >= 0 && y < C, "cross-entropy target out of range [0, C)");
        const float *p = probs + i * C;
        float *d = dlogits + i * C;
        for (int c = 0; c < C; c++) d[c] += f * (p[c] - (c == y ? 1.0f : 0.0f));
    }
}
