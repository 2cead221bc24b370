/* levi BERT encoder (implements include/levi/bert.h): config parsing, loading, random init,
 * forward in two modes, backward, freezing, mean pooling.
 *
 * For: Hugging Face BertModel's computation, post-LN:
 *   h0 = dropout(LN(word[id] + pos[s] + type[t]))
 *   per layer: qkv = x Wqkv^T + b; ctx = attention(q, k, v, mask);
 *              a = LN(x + dropout(ctx Wo^T + bo)); y = LN(a + dropout(gelu(a W1^T + b1) W2^T + b2))
 * Not for: tokenisation, the pooler, relative positions, other activations.
 *
 * Speed: the four big products per layer go through levi_gemm (OpenBLAS) with Q, K and V as
 * ONE [3H, H] product over a packed copy of the three weight matrices (the table stays keyed
 * by the checkpoint's names; the packed copy is a derived buffer refreshed on every forward,
 * which costs a copy of 3*H*H floats per layer and means it can never go stale after an
 * optimizer step). Bias, residual add and GELU are fused into the passes around the GEMMs:
 * each output is pre-filled with bias (+ residual) and the GEMM accumulates onto it (OpenBLAS
 * makes a pass over C for beta anyway, so the bias costs nothing).
 * Two kernels are private to this file rather than the ops.h ones, for measured reasons
 * (MiniLM shapes, B=64, S=64, one Zen 4 core): levi_attention_forward took ~140 ms per layer
 * (a dot product per key) where the register-tiled per-head kernel below takes ~10 ms, and
 * OpenBLAS called per head from OpenMP threads ran slower on two threads than on one;
 * levi_gelu_forward (scalar erff) took ~37 ms per layer where the vectorised one below takes
 * ~3.5 ms. The ops kernels remain the references these are tested against (tests/test_bert.c,
 * through the levi__bert_* hooks); attention here also supports dropout on the
 * probabilities, which the ops contract does not. Measured split of an inference forward
 * after this (same setup): GEMMs ~87%, attention ~7%, bias fills ~2.5%, GELU ~2%, LN ~0.5%.
 */
#include "levi/bert.h"

#include "levi/ops.h"
#include "levi/safetensors.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef _OPENMP
#include <omp.h>
#define BERT_PRAGMA(x) _Pragma(#x)
#define BERT_OMP_FOR_IF(cond) BERT_PRAGMA(omp parallel for schedule(static) if(cond))
#define BERT_OMP_SIMD BERT_PRAGMA(omp simd)
static int bert_max_threads(void) {
    return omp_get_max_threads();
}
static int bert_thread_num(void) {
    return omp_get_thread_num();
}
#else
#define BERT_OMP_FOR_IF(cond)
#define BERT_OMP_SIMD
static int bert_max_threads(void) {
    return 1;
}
static int bert_thread_num(void) {
    return 0;
}
#endif

/* Element counts above which a loop is threaded: a parallel region costs microseconds. */
#define BERT_PAR_MIN (1 << 15)

/* ----------------------------------------------------------------------------------------
 * Vectors of 8 floats (GCC/Clang vector extensions; the compiler maps them to the target's
 * SIMD). Used where the compiler's own vectorisation is poor: register tiles of small
 * products, and row reductions (GCC finishes an `omp simd reduction` with a scalar loop
 * over the lanes, which costs as much as a whole 64-element softmax row). */

#if defined(__GNUC__) && !defined(__clang__)
/* Without AVX (a build without -march=native) GCC warns that passing 32-byte vectors changes
 * the ABI; every function taking them here is static, so no ABI is exposed. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float bert_v8 __attribute__((vector_size(32)));
typedef int32_t bert_v8i __attribute__((vector_size(32)));
typedef float bert_v8u __attribute__((vector_size(32), aligned(4)));
#define BERT_LD(p) (*(const bert_v8u *)(p))
#define BERT_ST(p, v) (*(bert_v8u *)(p) = (v))
static inline bert_v8 bert_bc(float x) {
    return (bert_v8){x, x, x, x, x, x, x, x};
}

static inline bert_v8 bert_v8_max(bert_v8 a, bert_v8 b) {
    bert_v8i gt = a > b;
    return (bert_v8)((gt & (bert_v8i)a) | (~gt & (bert_v8i)b));
}
static inline float bert_hsum(bert_v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
static inline float bert_hmax(bert_v8 v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* sum_i x[i] */
static float bert_sum(const float *x, int n) {
    bert_v8 a = {0}, b = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) a += BERT_LD(x + i), b += BERT_LD(x + i + 8);
    for (; i + 8 <= n; i += 8) a += BERT_LD(x + i);
    float s = bert_hsum(a + b);
    for (; i < n; i++) s += x[i];
    return s;
}

/* sum_i (x[i] - m)^2 */
static float bert_sqdev(const float *x, float m, int n) {
    const bert_v8 vm = bert_bc(m);
    bert_v8 a = {0}, b = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        bert_v8 d0 = BERT_LD(x + i) - vm, d1 = BERT_LD(x + i + 8) - vm;
        a += d0 * d0, b += d1 * d1;
    }
    for (; i + 8 <= n; i += 8) {
        bert_v8 d0 = BERT_LD(x + i) - vm;
        a += d0 * d0;
    }
    float s = bert_hsum(a + b);
    for (; i < n; i++) s += (x[i] - m) * (x[i] - m);
    return s;
}

/* sum_i x[i] * y[i] */
static float bert_dot(const float *x, const float *y, int n) {
    bert_v8 a = {0}, b = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        a += BERT_LD(x + i) * BERT_LD(y + i), b += BERT_LD(x + i + 8) * BERT_LD(y + i + 8);
    for (; i + 8 <= n; i += 8) a += BERT_LD(x + i) * BERT_LD(y + i);
    float s = bert_hsum(a + b);
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

/* ----------------------------------------------------------------------------------------
 * Vectorisable math. glibc's expf/erff are scalar calls here (no -ffast-math, so no libmvec);
 * these are plain arithmetic the compiler turns into SIMD code inside `omp simd` loops. */

/* exp(x) for x <= 88: 2^n * e^r with n = round(x / ln 2) and |r| <= ln2 / 2, e^r by its Taylor
 * polynomial of degree 7 (truncation error < 5e-9 relative). Inputs below -87 give ~1e-38
 * instead of a smaller number: every caller adds the result to terms near 1 or multiplies it
 * by a bounded value, where this is far below float resolution. */
static inline float bert_expf(float x) {
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

/* The standard normal tail Phi(-|x|) = erfc(|x| / sqrt 2) / 2 with Abramowitz & Stegun 7.1.26
 * (|erfc error| <= 1.5e-7), returning exp(-x^2/2) too for the derivative. Computing the tail
 * directly keeps GELU accurate for negative x, where x * Phi(x) is small. */
static inline float bert_phi_tail(float x, float *gauss) {
    float ax = fabsf(x);
    float z = ax * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = 1.061405429f;
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    poly = poly * t;
    float e = bert_expf(-z * z);
    *gauss = e;
    return 0.5f * poly * e;
}

static inline bert_v8 bert_v8_select(bert_v8i m, bert_v8 a, bert_v8 b) {
    return (bert_v8)((m & (bert_v8i)a) | (~m & (bert_v8i)b));
}

/* GELU forward: x * Phi(x) with Phi from erfc by Abramowitz & Stegun 7.1.28,
 * erfc(z) ~ (1 + a1 z + ... + a6 z^6)^-16 (|erf error| <= 3e-7): one division and no exp, so
 * about half the work of 7.1.26 in the forward pass, which runs on every FFN activation.
 * z is capped at 10 (erfc(10) ~ 2e-45 is 0 in float) so the power cannot overflow. */
static inline bert_v8 bert_gelu8(bert_v8 x) {
    bert_v8 z = (bert_v8)((bert_v8i)x & 0x7fffffff) * 0.70710678118654752f;
    z = bert_v8_select(z < 10.0f, z, bert_bc(10.0f));
    bert_v8 p = bert_bc(0.0000430638f);
    p = p * z + 0.0002765672f;
    p = p * z + 0.0001520143f;
    p = p * z + 0.0092705272f;
    p = p * z + 0.0422820123f;
    p = p * z + 0.0705230784f;
    p = p * z + 1.0f;
    bert_v8 r = 1.0f / p;
    r = r * r, r = r * r, r = r * r, r = r * r;
    const bert_v8 tail = 0.5f * r; // Phi(-|x|)
    return x * bert_v8_select(x >= 0.0f, 1.0f - tail, tail);
}

void levi__bert_gelu_forward(float *out, const float *inp, int64_t n) {
    // out[n] = x * Phi(x); in place (out == inp) is fine
    BERT_OMP_FOR_IF(n > BERT_PAR_MIN)
    for (int64_t i0 = 0; i0 < n; i0 += 4096) {
        const int64_t i1 = i0 + 4096 < n ? i0 + 4096 : n;
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8) BERT_ST(out + i, bert_gelu8(BERT_LD(inp + i)));
        if (i < i1) { // tail through a padded vector: the same formula for every element
            float t[8] = {0};
            memcpy(t, inp + i, (size_t)(i1 - i) * sizeof(float));
            const bert_v8 y = bert_gelu8(BERT_LD(t));
            memcpy(out + i, &y, (size_t)(i1 - i) * sizeof(float));
        }
    }
}

/* d[n] = d[n] * gelu'(pre[n]) in place: the gradient w.r.t. the GELU input, given the one
 * w.r.t. its output (this file never needs the accumulating form of ops.h). */
static void bert_gelu_backward_inplace(float *d, const float *pre, int64_t n) {
    BERT_OMP_FOR_IF(n > BERT_PAR_MIN)
    for (int64_t i0 = 0; i0 < n; i0 += 4096) {
        int64_t i1 = i0 + 4096 < n ? i0 + 4096 : n;
        BERT_OMP_SIMD
        for (int64_t i = i0; i < i1; i++) {
            float x = pre[i], g;
            float tail = bert_phi_tail(x, &g);
            float cdf = x >= 0.0f ? 1.0f - tail : tail;
            d[i] *= cdf + x * 0.39894228040143268f * g;
        }
    }
}

void levi__bert_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n) {
    // ops.h form (accumulating), for the tests.
    for (int64_t i = 0; i < n; i++) {
        float d = dout[i];
        bert_gelu_backward_inplace(&d, inp + i, 1);
        dinp[i] += d;
    }
}

/* ----------------------------------------------------------------------------------------
 * Attention kernels. One (sequence, head) pair at a time, each pair on one thread. The
 * head's Q, K, V rows sit 3H floats apart in the packed [N, 3H] buffer, which maps them onto
 * a handful of L1 sets; they are first copied into small contiguous (or transposed) tiles,
 * then every product goes through bert_mm, register-tiled with GCC/Clang vector extensions
 * (8 floats, mapped to whatever SIMD the target has). */

static int bert_round8(int n) {
    return (n + 7) / 8 * 8;
}

#define BERT_LOG2E 1.44269504088896341f

/* Query rows per block in inference attention (a multiple of bert_mm's 4-row tile): a block's
 * probabilities stay in L1 between the two products even for long sequences. */
#define BERT_QBLOCK 16

/* C[M,N] (row stride ldc) = alpha * A[M,K] (lda) . B[K,N] (ldb), overwriting C. Every row of B
 * must be readable up to round8(N) columns (packed tiles are padded for that); lanes past N
 * are computed and dropped. Tiles of 4 rows x 32 columns keep 16 accumulators in registers. */
static void bert_mm(float *C, int ldc, const float *A, int lda, const float *B, int ldb, int M,
                    int N, int K, float alpha) {
    const bert_v8 al = bert_bc(alpha);
    for (int i0 = 0; i0 < M; i0 += 4) {
        const int mr = M - i0 < 4 ? M - i0 : 4;
        // Rows past M alias row 0: computed, never stored.
        const float *a0 = A + (size_t)i0 * lda;
        const float *a1 = mr > 1 ? a0 + lda : a0, *a2 = mr > 2 ? a0 + 2 * (size_t)lda : a0;
        const float *a3 = mr > 3 ? a0 + 3 * (size_t)lda : a0;
        float *c0 = C + (size_t)i0 * ldc;
        int j0 = 0;
        for (; j0 + 32 <= N; j0 += 32) {
            bert_v8 c[4][4] = {{{0}}};
            const float *b = B + j0;
            for (int k = 0; k < K; k++, b += ldb) {
                const bert_v8 b0 = BERT_LD(b), b1 = BERT_LD(b + 8);
                const bert_v8 b2 = BERT_LD(b + 16), b3 = BERT_LD(b + 24);
                bert_v8 x = bert_bc(a0[k]);
                c[0][0] += x * b0, c[0][1] += x * b1, c[0][2] += x * b2, c[0][3] += x * b3;
                x = bert_bc(a1[k]);
                c[1][0] += x * b0, c[1][1] += x * b1, c[1][2] += x * b2, c[1][3] += x * b3;
                x = bert_bc(a2[k]);
                c[2][0] += x * b0, c[2][1] += x * b1, c[2][2] += x * b2, c[2][3] += x * b3;
                x = bert_bc(a3[k]);
                c[3][0] += x * b0, c[3][1] += x * b1, c[3][2] += x * b2, c[3][3] += x * b3;
            }
            for (int r = 0; r < mr; r++)
                for (int q = 0; q < 4; q++)
                    BERT_ST(c0 + (size_t)r * ldc + j0 + 8 * q, al * c[r][q]);
        }
        for (; j0 < N; j0 += 8) {
            bert_v8 c[4] = {{0}};
            const float *b = B + j0;
            for (int k = 0; k < K; k++, b += ldb) {
                const bert_v8 b0 = BERT_LD(b);
                c[0] += bert_bc(a0[k]) * b0, c[1] += bert_bc(a1[k]) * b0;
                c[2] += bert_bc(a2[k]) * b0, c[3] += bert_bc(a3[k]) * b0;
            }
            const int w = N - j0 < 8 ? N - j0 : 8;
            for (int r = 0; r < mr; r++) {
                float *cr = c0 + (size_t)r * ldc + j0;
                if (w == 8) {
                    BERT_ST(cr, al * c[r]);
                } else {
                    float t[8];
                    memcpy(t, &c[r], sizeof t);
                    for (int q = 0; q < w; q++) cr[q] = alpha * t[q];
                }
            }
        }
    }
}

/* Packs rows [0, M) x columns [0, D) of X (row stride ldx) into T, row stride ldt >= D, with
 * columns D..ldt zero. */
static void bert_pack(float *T, int ldt, const float *X, int ldx, int M, int D) {
    for (int i = 0; i < M; i++) {
        float *t = T + (size_t)i * ldt;
        const float *x = X + (size_t)i * ldx;
        int d = 0;
        for (; d + 8 <= D; d += 8) BERT_ST(t + d, BERT_LD(x + d)); // rows are short: no memcpy call
        for (; d < D; d++) t[d] = x[d];
        for (; d < ldt; d++) t[d] = 0.0f;
    }
}

#if defined(__clang__)
#define BERT_SHUF(a, b, ...) __builtin_shufflevector((a), (b), __VA_ARGS__)
#else
#define BERT_SHUF(a, b, ...) __builtin_shuffle((a), (b), (bert_v8i){__VA_ARGS__})
#endif

/* T[d, i] = X[i, d] for i < M, d < D (row strides ldx, ldt). 8 x 8 blocks go through vector
 * shuffles: a scalar transpose of K costs as much as the scores product it feeds, because the
 * source rows (3H floats apart) share a few L1 sets and every element is a separate access. */
static void bert_transpose(float *T, int ldt, const float *X, int ldx, int M, int D) {
    int i0 = 0;
    for (; i0 + 8 <= M; i0 += 8) {
        int d0 = 0;
        for (; d0 + 8 <= D; d0 += 8) {
            const float *x = X + (size_t)i0 * ldx + d0;
            bert_v8 r0 = BERT_LD(x), r1 = BERT_LD(x + ldx), r2 = BERT_LD(x + 2 * (size_t)ldx);
            bert_v8 r3 = BERT_LD(x + 3 * (size_t)ldx), r4 = BERT_LD(x + 4 * (size_t)ldx);
            bert_v8 r5 = BERT_LD(x + 5 * (size_t)ldx), r6 = BERT_LD(x + 6 * (size_t)ldx);
            bert_v8 r7 = BERT_LD(x + 7 * (size_t)ldx);
            bert_v8 t0 = BERT_SHUF(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13);
            bert_v8 t1 = BERT_SHUF(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
            bert_v8 t2 = BERT_SHUF(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13);
            bert_v8 t3 = BERT_SHUF(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
            bert_v8 t4 = BERT_SHUF(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13);
            bert_v8 t5 = BERT_SHUF(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
            bert_v8 t6 = BERT_SHUF(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13);
            bert_v8 t7 = BERT_SHUF(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
            bert_v8 u0 = BERT_SHUF(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
            bert_v8 u1 = BERT_SHUF(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
            bert_v8 u2 = BERT_SHUF(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
            bert_v8 u3 = BERT_SHUF(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
            bert_v8 u4 = BERT_SHUF(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
            bert_v8 u5 = BERT_SHUF(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
            bert_v8 u6 = BERT_SHUF(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
            bert_v8 u7 = BERT_SHUF(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
            float *t = T + (size_t)d0 * ldt + i0;
            BERT_ST(t, BERT_SHUF(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11));
            BERT_ST(t + ldt, BERT_SHUF(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11));
            BERT_ST(t + 2 * (size_t)ldt, BERT_SHUF(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11));
            BERT_ST(t + 3 * (size_t)ldt, BERT_SHUF(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11));
            BERT_ST(t + 4 * (size_t)ldt, BERT_SHUF(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15));
            BERT_ST(t + 5 * (size_t)ldt, BERT_SHUF(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15));
            BERT_ST(t + 6 * (size_t)ldt, BERT_SHUF(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15));
            BERT_ST(t + 7 * (size_t)ldt, BERT_SHUF(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15));
        }
        for (; d0 < D; d0++)
            for (int i = i0; i < i0 + 8; i++) T[(size_t)d0 * ldt + i] = X[(size_t)i * ldx + d0];
    }
    for (; i0 < M; i0++)
        for (int d = 0; d < D; d++) T[(size_t)d * ldt + i0] = X[(size_t)i0 * ldx + d];
}

/* T[D, ldt] = X[0..M, 0..D)^T (row stride ldx), columns M..ldt zero. */
static void bert_pack_t(float *T, int ldt, const float *X, int ldx, int M, int D) {
    bert_transpose(T, ldt, X, ldx, M, D);
    for (int d = 0; d < D; d++)
        for (int i = M; i < ldt; i++) T[(size_t)d * ldt + i] = 0.0f;
}

/* Keys past the last valid one are masked for every query, so the products stop there; the
 * common right-padded batch then costs only its real length. 0 valid keys: all S keys, which
 * get uniform probabilities (what Hugging Face's finfo.min bias yields). */
static int bert_key_len(const int32_t *m, int S) {
    int kv = 0;
    for (int j = 0; j < S; j++)
        if (m[j]) kv = j + 1;
    return kv ? kv : S;
}

/* Per-sequence key masks as floats: kbias[j] = 0 or -inf (added before the max), kmul[j] = 1
 * or 0 (multiplied after the exp, so a masked key gets exactly 0). Returns the valid count. */
static int bert_key_masks(float *kbias, float *kmul, const int32_t *m, int S) {
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
static inline bert_v8 bert_exp2_8(bert_v8 x) {
    x = bert_v8_select(x > -126.0f, x, bert_bc(-126.0f));
    const bert_v8 n = (x + 12582912.0f) - 12582912.0f;
    const bert_v8 t = (x - n) * 0.69314718055994531f;
    bert_v8 p = bert_bc(1.0f / 720.0f);
    p = p * t + 1.0f / 120.0f;
    p = p * t + 1.0f / 24.0f;
    p = p * t + 1.0f / 6.0f;
    p = p * t + 0.5f;
    p = p * t + 1.0f;
    p = p * t + 1.0f;
    const bert_v8i bits = (__builtin_convertvector(n, bert_v8i) + 127) << 23;
    return p * (bert_v8)bits;
}

/* One row of bert_softmax_rows. */
static void bert_softmax_row(float *row, const float *kbias, const float *kmul, int kv, int S) {
    bert_v8 vm = bert_bc(-INFINITY);
    int j = 0;
    for (; j + 8 <= kv; j += 8) vm = bert_v8_max(vm, BERT_LD(row + j) + BERT_LD(kbias + j));
    float mx = bert_hmax(vm);
    for (; j < kv; j++) mx = row[j] + kbias[j] > mx ? row[j] + kbias[j] : mx;
    const bert_v8 vmx = bert_bc(mx);
    bert_v8 vs = {0};
    for (j = 0; j + 8 <= kv; j += 8) {
        const bert_v8 e =
            bert_exp2_8(BERT_LD(row + j) + BERT_LD(kbias + j) - vmx) * BERT_LD(kmul + j);
        BERT_ST(row + j, e);
        vs += e;
    }
    float sum = bert_hsum(vs);
    for (; j < kv; j++) {
        row[j] = bert_expf((row[j] + kbias[j] - mx) * 0.69314718055994531f) * kmul[j];
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
static void bert_softmax_rows(float *P, int ld, int rows, const float *kbias, const float *kmul,
                              int nvalid, int kv, int S) {
    if (!nvalid) {
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < S; j++) P[(size_t)i * ld + j] = 1.0f / (float)S;
        return;
    }
    int i = 0;
    for (; i + 4 <= rows && kv % 8 == 0; i += 4) {
        float *r0 = P + (size_t)i * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        bert_v8 m0 = bert_bc(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
        for (int j = 0; j < kv; j += 8) {
            const bert_v8 kb = BERT_LD(kbias + j);
            m0 = bert_v8_max(m0, BERT_LD(r0 + j) + kb), m1 = bert_v8_max(m1, BERT_LD(r1 + j) + kb);
            m2 = bert_v8_max(m2, BERT_LD(r2 + j) + kb), m3 = bert_v8_max(m3, BERT_LD(r3 + j) + kb);
        }
        const bert_v8 x0 = bert_bc(bert_hmax(m0)), x1 = bert_bc(bert_hmax(m1));
        const bert_v8 x2 = bert_bc(bert_hmax(m2)), x3 = bert_bc(bert_hmax(m3));
        bert_v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int j = 0; j < kv; j += 8) {
            const bert_v8 kb = BERT_LD(kbias + j), km = BERT_LD(kmul + j);
            bert_v8 e = bert_exp2_8(BERT_LD(r0 + j) + kb - x0) * km;
            BERT_ST(r0 + j, e), s0 += e;
            e = bert_exp2_8(BERT_LD(r1 + j) + kb - x1) * km;
            BERT_ST(r1 + j, e), s1 += e;
            e = bert_exp2_8(BERT_LD(r2 + j) + kb - x2) * km;
            BERT_ST(r2 + j, e), s2 += e;
            e = bert_exp2_8(BERT_LD(r3 + j) + kb - x3) * km;
            BERT_ST(r3 + j, e), s3 += e;
        }
        const bert_v8 i0 = bert_bc(1.0f / bert_hsum(s0)), i1 = bert_bc(1.0f / bert_hsum(s1));
        const bert_v8 i2 = bert_bc(1.0f / bert_hsum(s2)), i3 = bert_bc(1.0f / bert_hsum(s3));
        for (int j = 0; j < kv; j += 8) {
            BERT_ST(r0 + j, BERT_LD(r0 + j) * i0), BERT_ST(r1 + j, BERT_LD(r1 + j) * i1);
            BERT_ST(r2 + j, BERT_LD(r2 + j) * i2), BERT_ST(r3 + j, BERT_LD(r3 + j) * i3);
        }
        for (int q = 0; q < 4; q++)
            for (int j = kv; j < S; j++) P[(size_t)(i + q) * ld + j] = 0.0f;
    }
    for (; i < rows; i++) bert_softmax_row(P + (size_t)i * ld, kbias, kmul, kv, S);
}

size_t levi__bert_attention_scratch_floats(int S, int NH, int HD) {
    // per thread, the larger of: the per-head tiles of training (four S x round8(HD), one
    // HD x round8(S), three S x round8(S), two round8(S)) and the per-sequence tiles of
    // inference (every head's Q, K^T, V, the sequence's output, one query block of scores,
    // two round8(S)); plus alignment slack
    const size_t S8 = (size_t)bert_round8(S), HD8 = (size_t)bert_round8(HD), nh = (size_t)NH;
    const size_t train = 4 * (size_t)S * HD8 + (size_t)HD * S8 + 3 * (size_t)S * S8 + 2 * S8;
    const size_t infer = nh * (2 * (size_t)S * HD8 + (size_t)HD * S8) + (size_t)S * nh * HD +
                         (size_t)BERT_QBLOCK * S8 + 2 * S8;
    return (train > infer ? train : infer) + (3 * nh + 12) * 16;
}

/* Carves the per-thread scratch; every tile starts on a 64-byte boundary. */
static float *bert_take(float **at, size_t n) {
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
static void bert_touch_rows(const float *X, int ld, int S, int width) {
    float s = 0.0f;
    for (int r = 0; r < S; r++)
        for (int c = 0; c < width; c += 16) s += X[(size_t)r * ld + c];
    volatile float sink = s; // keeps the loads
    (void)sink;
}

/* Inference attention of sequence rows [0, S) (pointers already at the sequence), all heads.
 * The sequence's Q, K, V rows are read once, row by row, into per-head contiguous tiles
 * (K transposed), and the heads' outputs gather in a contiguous [S, H] tile copied out at the
 * end: the big [N, 3H] buffer is only ever read and written sequentially. */
static void bert_attention_seq(float *out, int ldo, const float *q, const float *k, const float *v,
                               int ldin, const int32_t *m, int S, int NH, int HD, float scale,
                               float *ws) {
    const int S8 = bert_round8(S), HD8 = bert_round8(HD), H = NH * HD;
    const int kv = bert_key_len(m, S), kv8 = bert_round8(kv);
    float *at = (float *)(((uintptr_t)ws + 63) & ~(uintptr_t)63);
    float *qp = bert_take(&at, (size_t)NH * S * HD8); // head h: [S, HD8]
    float *kt = bert_take(&at, (size_t)NH * HD * S8); // head h: [HD, kv8]
    float *vp = bert_take(&at, (size_t)NH * S * HD8); // head h: [kv, HD8]
    float *cs = bert_take(&at, (size_t)S * H);        // [S, H]
    float *work = bert_take(&at, (size_t)BERT_QBLOCK * S8);
    float *kbias = bert_take(&at, (size_t)S8), *kmul = bert_take(&at, (size_t)S8);
    const int nvalid = bert_key_masks(kbias, kmul, m, S);
    const size_t qstride = (size_t)S * HD8, kstride = (size_t)HD * kv8;
    const float scale2 = scale * BERT_LOG2E; // scores in log2 units for bert_softmax_rows
    for (int i = 0; i < S; i++) {
        for (int h = 0; h < NH; h++)
            bert_pack(qp + h * qstride + (size_t)i * HD8, HD8,
                      q + (size_t)i * ldin + (size_t)h * HD, ldin, 1, HD);
        if (i < kv)
            for (int h = 0; h < NH; h++)
                bert_pack(vp + h * qstride + (size_t)i * HD8, HD8,
                          v + (size_t)i * ldin + (size_t)h * HD, ldin, 1, HD);
    }
    for (int i0 = 0; i0 < kv; i0 += 8) {
        const int rows = kv - i0 < 8 ? kv - i0 : 8;
        for (int h = 0; h < NH; h++)
            bert_transpose(kt + h * kstride + i0, kv8, k + (size_t)i0 * ldin + (size_t)h * HD, ldin,
                           rows, HD);
    }
    for (int h = 0; h < NH; h++)
        for (int d = 0; d < HD; d++)
            for (int j = kv; j < kv8; j++) kt[h * kstride + (size_t)d * kv8 + j] = 0.0f;
    for (int h = 0; h < NH; h++) {
        const float *qh = qp + h * qstride, *kh = kt + h * kstride, *vh = vp + h * qstride;
        for (int i0 = 0; i0 < S; i0 += BERT_QBLOCK) {
            const int rows = S - i0 < BERT_QBLOCK ? S - i0 : BERT_QBLOCK;
            bert_mm(work, S8, qh + (size_t)i0 * HD8, HD8, kh, kv8, rows, kv, HD, scale2);
            bert_softmax_rows(work, S8, rows, kbias, kmul, nvalid, kv, S);
            bert_mm(cs + (size_t)i0 * H + (size_t)h * HD, H, work, S8, vh, HD8, rows, HD, kv, 1.0f);
        }
    }
    for (int i = 0; i < S; i++) bert_pack(out + (size_t)i * ldo, H, cs + (size_t)i * H, H, 1, H);
}

void levi__bert_attention_forward(float *out, int ldo, float *probs, const float *pmask,
                                  const float *q, const float *k, const float *v, int ldin,
                                  const int32_t *mask, int B, int S, int NH, int HD, float scale,
                                  float *scratch) {
    // q, k, v: rows of [B,S,*] with row stride ldin, head h at columns h*HD..; out likewise
    // with stride ldo. probs: [B,NH,S,S] or NULL (inference). pmask: [B,NH,S,S] dropout
    // multipliers (0 or 1/(1-p)) or NULL. scratch: threads * scratch_floats(S, NH, HD).
    const size_t per = levi__bert_attention_scratch_floats(S, NH, HD);
    const int S8 = bert_round8(S), HD8 = bert_round8(HD);
    if (!probs && !pmask) { // inference: a sequence per thread
        BERT_OMP_FOR_IF(B > 1 && (int64_t)B * NH * S * S * HD > (1 << 16))
        for (int b = 0; b < B; b++) {
            const size_t r0 = (size_t)b * S;
            bert_attention_seq(out + r0 * ldo, ldo, q + r0 * ldin, k + r0 * ldin, v + r0 * ldin,
                               ldin, mask + r0, S, NH, HD, scale,
                               scratch + per * (size_t)bert_thread_num());
        }
        return;
    }
    const int BH = B * NH;
    BERT_OMP_FOR_IF(BH > 1 && (int64_t)BH * S * S * HD > (1 << 16))
    for (int bh = 0; bh < BH; bh++) {
        const int b = bh / NH, h = bh % NH;
        float *at = scratch + per * (size_t)bert_thread_num();
        at = (float *)(((uintptr_t)at + 63) & ~(uintptr_t)63);
        float *kt = bert_take(&at, (size_t)HD * S8), *vp = bert_take(&at, (size_t)S * HD8);
        float *work = bert_take(&at, (size_t)S * S8);
        float *pd = bert_take(&at, (size_t)S * S8);
        float *kbias = bert_take(&at, (size_t)S8), *kmul = bert_take(&at, (size_t)S8);
        const size_t in0 = (size_t)b * S * ldin + (size_t)h * HD;
        const int32_t *m = mask + (size_t)b * S;
        const int kv = bert_key_len(m, S), kv8 = bert_round8(kv);
        const int nvalid = bert_key_masks(kbias, kmul, m, S);
        if (h == 0) {
            const size_t r0 = (size_t)b * S;
            bert_touch_rows(q + r0 * ldin, ldin, S, NH * HD);
            bert_touch_rows(k + r0 * ldin, ldin, S, NH * HD);
            bert_touch_rows(v + r0 * ldin, ldin, S, NH * HD);
            bert_touch_rows(out + r0 * ldo, ldo, S, NH * HD);
        }
        // Q is read a 4-row block at a time and needs no packing; K (transposed) and V are
        // reused by every query block.
        bert_pack_t(kt, kv8, k + in0, ldin, kv, HD);
        bert_pack(vp, HD8, v + in0, ldin, kv, HD);
        float *outb = out + (size_t)b * S * ldo + (size_t)h * HD;
        float *P = probs ? probs + (size_t)bh * S * S : work;
        const int ldp = probs ? S : S8;
        bert_mm(P, ldp, q + in0, ldin, kt, kv8, S, kv, HD, scale * BERT_LOG2E);
        bert_softmax_rows(P, ldp, S, kbias, kmul, nvalid, kv, S);
        const float *A = P;
        int lda = ldp;
        if (pmask) {
            const float *pm = pmask + (size_t)bh * S * S;
            for (int i = 0; i < S; i++) {
                BERT_OMP_SIMD
                for (int j = 0; j < kv; j++)
                    pd[(size_t)i * S8 + j] = P[(size_t)i * ldp + j] * pm[(size_t)i * S + j];
            }
            A = pd;
            lda = S8;
        }
        // Probabilities of keys >= kv are 0 (unless no key is valid, and then kv == S).
        bert_mm(outb, ldo, A, lda, vp, HD8, S, HD, kv, 1.0f);
    }
}

void levi__bert_attention_backward(float *dq, float *dk, float *dv, int ldd, const float *dout,
                                   int ldo, const float *probs, const float *pmask, const float *q,
                                   const float *k, const float *v, int ldin, const int32_t *mask,
                                   int B, int S, int NH, int HD, float scale, float *scratch) {
    // Overwrites dq, dk, dv (row stride ldd; all three must be given). probs and pmask as
    // saved by the forward.
    LEVI_ASSERT(probs && dq && dk && dv, "attention backward needs probs and dq, dk, dv");
    const size_t per = levi__bert_attention_scratch_floats(S, NH, HD);
    const int S8 = bert_round8(S), HD8 = bert_round8(HD);
    const int BH = B * NH;
    BERT_OMP_FOR_IF(BH > 1 && (int64_t)BH * S * S * HD > (1 << 15))
    for (int bh = 0; bh < BH; bh++) {
        const int b = bh / NH, h = bh % NH;
        float *at = scratch + per * (size_t)bert_thread_num();
        at = (float *)(((uintptr_t)at + 63) & ~(uintptr_t)63);
        float *qp = bert_take(&at, (size_t)S * HD8), *vt = bert_take(&at, (size_t)HD * S8);
        float *kp = bert_take(&at, (size_t)S * HD8), *dop = bert_take(&at, (size_t)S * HD8);
        float *ds = bert_take(&at, (size_t)S * S8), *pd = bert_take(&at, (size_t)S * S8);
        float *tr = bert_take(&at, (size_t)S * S8);
        const size_t in0 = (size_t)b * S * ldin + (size_t)h * HD;
        const size_t d0 = (size_t)b * S * ldd + (size_t)h * HD;
        const int32_t *m = mask + (size_t)b * S;
        const int kv = bert_key_len(m, S), kv8 = bert_round8(kv);
        if (h == 0) { // see bert_touch_rows
            const size_t r0 = (size_t)b * S;
            bert_touch_rows(q + r0 * ldin, ldin, S, NH * HD);
            bert_touch_rows(k + r0 * ldin, ldin, S, NH * HD);
            bert_touch_rows(v + r0 * ldin, ldin, S, NH * HD);
            bert_touch_rows(dout + r0 * ldo, ldo, S, NH * HD);
            bert_touch_rows(dq + r0 * ldd, ldd, S, NH * HD);
            bert_touch_rows(dk + r0 * ldd, ldd, S, NH * HD);
            bert_touch_rows(dv + r0 * ldd, ldd, S, NH * HD);
        }
        bert_pack(qp, HD8, q + in0, ldin, S, HD);
        bert_pack(kp, HD8, k + in0, ldin, kv, HD);
        bert_pack_t(vt, kv8, v + in0, ldin, kv, HD);
        bert_pack(dop, HD8, dout + (size_t)b * S * ldo + (size_t)h * HD, ldo, S, HD);
        const float *P = probs + (size_t)bh * S * S;
        const float *pm = pmask ? pmask + (size_t)bh * S * S : NULL;
        const float *Pd = P;
        int ldpd = S;
        if (pm) {
            for (int i = 0; i < S; i++)
                for (int j = 0; j < kv; j++)
                    pd[(size_t)i * S8 + j] = P[(size_t)i * S + j] * pm[(size_t)i * S + j];
            Pd = pd, ldpd = S8;
        }
        // dV[kv, HD] = Pd[:, :kv]^T . dout; rows >= kv get 0
        bert_transpose(tr, S8, Pd, ldpd, S, kv);
        bert_mm(dv + d0, ldd, tr, S8, dop, HD8, kv, HD, S, 1.0f);
        for (int j = kv; j < S; j++)
            memset(dv + d0 + (size_t)j * ldd, 0, (size_t)HD * sizeof(float));
        // dPd = dout . V^T (keys < kv), dP = dPd * pmask, dS = P * (dP - rowsum(P * dP)) * scale
        bert_mm(ds, S8, dop, HD8, vt, kv8, S, kv, HD, 1.0f);
        for (int i = 0; i < S; i++) {
            float *r = ds + (size_t)i * S8;
            const float *p = P + (size_t)i * S;
            if (pm) {
                const float *pmi = pm + (size_t)i * S;
                BERT_OMP_SIMD
                for (int j = 0; j < kv; j++) r[j] *= pmi[j];
            }
            const float c = bert_dot(p, r, kv);
            BERT_OMP_SIMD
            for (int j = 0; j < kv; j++) r[j] = p[j] * (r[j] - c) * scale;
        }
        // dQ = dS . K;  dK[kv, HD] = dS^T . Q, rows >= kv get 0
        bert_mm(dq + d0, ldd, ds, S8, kp, HD8, S, HD, kv, 1.0f);
        bert_transpose(tr, S8, ds, S8, S, kv);
        bert_mm(dk + d0, ldd, tr, S8, qp, HD8, kv, HD, S, 1.0f);
        for (int j = kv; j < S; j++)
            memset(dk + d0 + (size_t)j * ldd, 0, (size_t)HD * sizeof(float));
    }
}

/* ----------------------------------------------------------------------------------------
 * Row helpers around the GEMMs. */

/* out[n,:] = (x ? x[n,:] : 0) + bias[:] */
static void bert_fill_rows(float *out, const float *x, const float *bias, int64_t N, int C) {
    BERT_OMP_FOR_IF(N * C > BERT_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * C;
        if (x) {
            const float *xr = x + n * C;
            BERT_OMP_SIMD
            for (int c = 0; c < C; c++) o[c] = xr[c] + bias[c];
        } else {
            memcpy(o, bias, (size_t)C * sizeof(float));
        }
    }
}

/* out = LayerNorm(a + b) over rows of C (b may be NULL; out may alias a or b). When sum is
 * given it receives a + b; mean and rstd (may be NULL) as levi_layernorm_forward saves them,
 * so levi_layernorm_backward applies. */
static void bert_add_layernorm(float *out, float *sum, float *mean, float *rstd, const float *a,
                               const float *b, const float *w, const float *bias, int64_t N, int C,
                               float eps) {
    BERT_OMP_FOR_IF(N * C > BERT_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        const float *ar = a + n * C, *br = b ? b + n * C : NULL;
        float *o = out + n * C;
        float *x = sum ? sum + n * C : o;
        if (br) {
            BERT_OMP_SIMD
            for (int c = 0; c < C; c++) x[c] = ar[c] + br[c];
        } else if (x != ar) {
            memcpy(x, ar, (size_t)C * sizeof(float));
        }
        const float m = bert_sum(x, C) / (float)C;
        const float var = bert_sqdev(x, m, C) / (float)C;
        const float s = 1.0f / sqrtf(var + eps);
        BERT_OMP_SIMD
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * w[c] + bias[c];
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = s;
    }
}

/* db[c] += sum_n d[n,c] (row stride ld), in column blocks so the order of the sum is the same
 * for any thread count. */
static void bert_colsum_add(float *db, const float *d, int ld, int64_t N, int C) {
    const int blk = 64, nblk = (C + blk - 1) / blk;
    BERT_OMP_FOR_IF(N * C > BERT_PAR_MIN && nblk > 1)
    for (int ib = 0; ib < nblk; ib++) {
        const int c0 = ib * blk, c1 = c0 + blk < C ? c0 + blk : C;
        float acc[64] = {0};
        for (int64_t n = 0; n < N; n++) {
            const float *r = d + n * ld;
            for (int c = c0; c < c1; c++) acc[c - c0] += r[c];
        }
        for (int c = c0; c < c1; c++) db[c] += acc[c - c0];
    }
}

/* ----------------------------------------------------------------------------------------
 * Config */

levi_bert_config levi_bert_minilm_l6_config(void) {
    levi_bert_config c = {
        .hidden = 384,
        .layers = 6,
        .heads = 12,
        .intermediate = 1536,
        .vocab = 30522,
        .max_pos = 512,
        .type_vocab = 2,
        .pad_token_id = 0,
        .eps = 1e-12f,
        .act = LEVI_BERT_ACT_GELU,
        .hidden_dropout = 0.1f,
        .attn_dropout = 0.1f,
        .init_range = 0.02f,
    };
    return c;
}

/* Limits that keep every size levi computes inside int (GEMM dimensions) and the parameter
 * table inside what a machine can hold; far beyond any BERT-family checkpoint. */
#define BERT_MAX_DIM (1 << 16)
#define BERT_MAX_VOCAB (1 << 24)
#define BERT_MAX_PARAMS ((size_t)1 << 33)

static size_t bert_param_count(const levi_bert_config *c) {
    size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    size_t emb = ((size_t)c->vocab + (size_t)c->max_pos + (size_t)c->type_vocab + 2) * H;
    size_t layer = 4 * H * H + 2 * H * I + I + 9 * H;
    return emb + (size_t)c->layers * layer;
}

levi_status levi_bert_config_validate(const levi_bert_config *c, const char *where,
                                      levi_error *err) {
    LEVI_ASSERT(c != NULL, "levi_bert_config_validate needs a config");
    if (!where) where = "config";
    struct {
        const char *field;
        int value, max;
    } sizes[] = {
        {"hidden_size", c->hidden, BERT_MAX_DIM},
        {"num_hidden_layers", c->layers, 1024},
        {"num_attention_heads", c->heads, BERT_MAX_DIM},
        {"intermediate_size", c->intermediate, 4 * BERT_MAX_DIM},
        {"vocab_size", c->vocab, BERT_MAX_VOCAB},
        {"max_position_embeddings", c->max_pos, BERT_MAX_DIM},
        {"type_vocab_size", c->type_vocab, BERT_MAX_DIM},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i].value < 1 || sizes[i].value > sizes[i].max)
            return levi_errorf(err, LEVI_ERR_ARG, "%s: %s = %d: expected an integer in [1, %d]",
                               where, sizes[i].field, sizes[i].value, sizes[i].max);
    if (c->hidden % c->heads != 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "%s: hidden_size = %d is not a multiple of num_attention_heads = %d",
                           where, c->hidden, c->heads);
    if (!(c->eps > 0.0f) || !isfinite(c->eps))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: layer_norm_eps = %g: expected > 0", where,
                           (double)c->eps);
    if (!(c->hidden_dropout >= 0.0f && c->hidden_dropout < 1.0f))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: hidden_dropout_prob = %g: expected [0, 1)",
                           where, (double)c->hidden_dropout);
    if (!(c->attn_dropout >= 0.0f && c->attn_dropout < 1.0f))
        return levi_errorf(err, LEVI_ERR_ARG,
                           "%s: attention_probs_dropout_prob = %g: expected [0, 1)", where,
                           (double)c->attn_dropout);
    if (!(c->init_range >= 0.0f) || !isfinite(c->init_range))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: initializer_range = %g: expected >= 0", where,
                           (double)c->init_range);
    if (c->act != LEVI_BERT_ACT_GELU)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: hidden_act: only \"gelu\" is supported", where);
    size_t n = bert_param_count(c);
    if (n > BERT_MAX_PARAMS)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "%s: the config describes %zu parameters, more than the %zu levi "
                           "supports",
                           where, n, BERT_MAX_PARAMS);
    return LEVI_OK;
}

/* Integer field: required or defaulted; must be a JSON number with an integral value. */
static levi_status bert_json_int(const cJSON *root, const char *path, const char *field,
                                 int required, int def, int *out, levi_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, field);
    if (!it) {
        if (required)
            return levi_errorf(err, LEVI_ERR_FORMAT, "%s: missing required field \"%s\"", path,
                               field);
        *out = def;
        return LEVI_OK;
    }
    if (!cJSON_IsNumber(it))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected an integer, found %s",
                           path, field,
                           cJSON_IsString(it) ? "a string"
                           : cJSON_IsBool(it) ? "a boolean"
                           : cJSON_IsNull(it) ? "null"
                                              : "an array or object");
    double v = cJSON_GetNumberValue(it);
    if (!(v == floor(v)) || v < (double)INT_MIN || v > (double)INT_MAX)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected an integer, found %g",
                           path, field, v);
    *out = (int)v;
    return LEVI_OK;
}

static levi_status bert_json_float(const cJSON *root, const char *path, const char *field,
                                   int required, float def, float *out, levi_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, field);
    if (!it) {
        if (required)
            return levi_errorf(err, LEVI_ERR_FORMAT, "%s: missing required field \"%s\"", path,
                               field);
        *out = def;
        return LEVI_OK;
    }
    if (!cJSON_IsNumber(it))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected a number", path,
                           field);
    *out = (float)cJSON_GetNumberValue(it);
    return LEVI_OK;
}

/* String field; *out points into the cJSON tree (NULL when absent and optional). */
static levi_status bert_json_str(const cJSON *root, const char *path, const char *field,
                                 int required, const char **out, levi_error *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, field);
    *out = NULL;
    if (!it) {
        if (required)
            return levi_errorf(err, LEVI_ERR_FORMAT, "%s: missing required field \"%s\"", path,
                               field);
        return LEVI_OK;
    }
    if (!cJSON_IsString(it))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected a string", path,
                           field);
    *out = cJSON_GetStringValue(it);
    return LEVI_OK;
}

levi_status levi_bert_config_parse(const char *json, size_t len, const char *path,
                                   levi_bert_config *cfg, levi_error *err) {
    LEVI_ASSERT(json != NULL && cfg != NULL, "levi_bert_config_parse needs json and cfg");
    if (!path) path = "config.json";
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= json && at <= json + len ? (size_t)(at - json) : 0;
        int line = 1, col = 1;
        for (size_t i = 0; i < off; i++) {
            if (json[i] == '\n')
                line++, col = 1;
            else
                col++;
        }
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s:%d:%d: invalid JSON", path, line, col);
    }
    levi_status st = LEVI_OK;
    levi_bert_config c = levi_bert_minilm_l6_config();
    const char *act = NULL, *pos_type = NULL, *model_type = NULL;
    if (!cJSON_IsObject(root)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: expected a JSON object at the top level", path);
        goto done;
    }
#define BERT_TRY(call)                                                                             \
    do {                                                                                           \
        if ((st = (call)) != LEVI_OK) goto done;                                                   \
    } while (0)
    BERT_TRY(bert_json_int(root, path, "hidden_size", 1, 0, &c.hidden, err));
    BERT_TRY(bert_json_int(root, path, "num_hidden_layers", 1, 0, &c.layers, err));
    BERT_TRY(bert_json_int(root, path, "num_attention_heads", 1, 0, &c.heads, err));
    BERT_TRY(bert_json_int(root, path, "intermediate_size", 1, 0, &c.intermediate, err));
    BERT_TRY(bert_json_int(root, path, "vocab_size", 1, 0, &c.vocab, err));
    BERT_TRY(bert_json_int(root, path, "max_position_embeddings", 1, 0, &c.max_pos, err));
    BERT_TRY(bert_json_int(root, path, "type_vocab_size", 1, 0, &c.type_vocab, err));
    BERT_TRY(bert_json_int(root, path, "pad_token_id", 0, 0, &c.pad_token_id, err));
    BERT_TRY(bert_json_float(root, path, "layer_norm_eps", 1, 0.0f, &c.eps, err));
    BERT_TRY(bert_json_float(root, path, "hidden_dropout_prob", 0, 0.1f, &c.hidden_dropout, err));
    BERT_TRY(
        bert_json_float(root, path, "attention_probs_dropout_prob", 0, 0.1f, &c.attn_dropout, err));
    BERT_TRY(bert_json_float(root, path, "initializer_range", 0, 0.02f, &c.init_range, err));
    BERT_TRY(bert_json_str(root, path, "hidden_act", 1, &act, err));
    BERT_TRY(bert_json_str(root, path, "position_embedding_type", 0, &pos_type, err));
    BERT_TRY(bert_json_str(root, path, "model_type", 0, &model_type, err));
#undef BERT_TRY
    if (strcmp(act, "gelu") != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: hidden_act = \"%s\" is not supported (expected \"gelu\", the erf "
                         "form)",
                         path, act);
        goto done;
    }
    if (pos_type && strcmp(pos_type, "absolute") != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: position_embedding_type = \"%s\" is not supported (expected "
                         "\"absolute\")",
                         path, pos_type);
        goto done;
    }
    if (model_type && strcmp(model_type, "bert") != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: model_type = \"%s\" is not supported (expected \"bert\"; other "
                         "families number positions or name tensors differently)",
                         path, model_type);
        goto done;
    }
    c.act = LEVI_BERT_ACT_GELU;
    st = levi_bert_config_validate(&c, path, err);
    if (st == LEVI_OK) *cfg = c;
done:
    cJSON_Delete(root);
    return st;
}

levi_status levi_bert_config_load(const char *path, levi_bert_config *cfg, levi_error *err) {
    char *text = NULL;
    size_t len = 0;
    levi_status st = levi_read_file(path, &text, &len, err);
    if (st != LEVI_OK) return st;
    st = levi_bert_config_parse(text, len, path, cfg, err);
    free(text);
    return st;
}

/* ----------------------------------------------------------------------------------------
 * The model object */

typedef struct {
    int q_w, q_b, k_w, k_b, v_w, v_b; /* attention.self.{query,key,value} */
    int o_w, o_b, ln1_w, ln1_b;       /* attention.output.{dense,LayerNorm} */
    int i_w, i_b;                     /* intermediate.dense */
    int f_w, f_b, ln2_w, ln2_b;       /* output.{dense,LayerNorm} */
} bert_layer_idx;

/* Activations of one layer saved in train mode (pointers into the train arena). */
typedef struct {
    float *qkv;    /* [N,3H] */
    float *probs;  /* [B,NH,S,S] softmax before attention dropout */
    float *pmask;  /* [B,NH,S,S] attention dropout multipliers, or NULL */
    float *ctx;    /* [N,H] */
    float *dmask1; /* [N,H] hidden dropout after attention.output.dense, or NULL */
    float *res1;   /* [N,H] input of attention.output.LayerNorm */
    float *mean1, *rstd1;
    float *a;      /* [N,H] attention block output */
    float *pre;    /* [N,I] GELU input */
    float *act;    /* [N,I] GELU output */
    float *dmask2; /* [N,H] or NULL */
    float *res2;   /* [N,H] input of output.LayerNorm */
    float *mean2, *rstd2;
} bert_layer_acts;

struct levi_bert {
    levi_bert_config cfg;
    levi_params params;
    int word, pos, type, eln_w, eln_b;
    bert_layer_idx *li; /* [L] */
    float *qkv_w;       /* [L][3H,H] packed copy of query|key|value weights */
    float *qkv_b;       /* [L][3H] */

    levi_arena *arena[2]; /* per mode */
    /* last forward */
    int B, S, mode, can_backward;
    float p_hidden, p_attn;
    float **hs; /* [L+1] */
    int32_t *ids, *mask, *types;
    float *scratch; /* attention scratch, threads * per-thread floats */
    int scratch_threads;
    /* train mode only */
    bert_layer_acts *acts; /* [L] */
    float *emb_sum, *emb_mean, *emb_rstd, *emb_dmask;
    float *tmp;                              /* [N,H] forward temporary */
    float *g, *t1, *t2, *dctx, *dqkv, *dint; /* backward buffers */
};

static void bert_name(char *buf, size_t cap, int layer, const char *suffix) {
    int n = snprintf(buf, cap, "encoder.layer.%d.%s", layer, suffix);
    LEVI_ASSERT(n > 0 && (size_t)n < cap, "parameter name too long");
}

/* Registers every tensor (in checkpoint order: embeddings, then layer by layer) without
 * allocating their storage (bert_alloc does). The config is already validated. */
static levi_bert *bert_register(const levi_bert_config *cfg) {
    levi_bert *m = levi_xcalloc(1, sizeof *m);
    m->cfg = *cfg;
    const int64_t H = cfg->hidden, I = cfg->intermediate, L = cfg->layers;
    levi_params *p = &m->params;
    levi_params_init(p);
    int64_t shp[2];
#define BERT_ADD2(name, r, c) (shp[0] = (r), shp[1] = (c), levi_params_add(p, name, 2, shp))
#define BERT_ADD1(name, r) (shp[0] = (r), levi_params_add(p, name, 1, shp))
    m->word = BERT_ADD2("embeddings.word_embeddings.weight", cfg->vocab, H);
    m->pos = BERT_ADD2("embeddings.position_embeddings.weight", cfg->max_pos, H);
    m->type = BERT_ADD2("embeddings.token_type_embeddings.weight", cfg->type_vocab, H);
    m->eln_w = BERT_ADD1("embeddings.LayerNorm.weight", H);
    m->eln_b = BERT_ADD1("embeddings.LayerNorm.bias", H);
    m->li = levi_xcalloc((size_t)L, sizeof *m->li);
    char nm[LEVI_NAME_MAX];
    for (int l = 0; l < L; l++) {
        bert_layer_idx *x = &m->li[l];
#define BERT_L2(field, suffix, r, c)                                                               \
    (bert_name(nm, sizeof nm, l, suffix), x->field = BERT_ADD2(nm, r, c))
#define BERT_L1(field, suffix, r) (bert_name(nm, sizeof nm, l, suffix), x->field = BERT_ADD1(nm, r))
        BERT_L2(q_w, "attention.self.query.weight", H, H);
        BERT_L1(q_b, "attention.self.query.bias", H);
        BERT_L2(k_w, "attention.self.key.weight", H, H);
        BERT_L1(k_b, "attention.self.key.bias", H);
        BERT_L2(v_w, "attention.self.value.weight", H, H);
        BERT_L1(v_b, "attention.self.value.bias", H);
        BERT_L2(o_w, "attention.output.dense.weight", H, H);
        BERT_L1(o_b, "attention.output.dense.bias", H);
        BERT_L1(ln1_w, "attention.output.LayerNorm.weight", H);
        BERT_L1(ln1_b, "attention.output.LayerNorm.bias", H);
        BERT_L2(i_w, "intermediate.dense.weight", I, H);
        BERT_L1(i_b, "intermediate.dense.bias", I);
        BERT_L2(f_w, "output.dense.weight", H, I);
        BERT_L1(f_b, "output.dense.bias", H);
        BERT_L1(ln2_w, "output.LayerNorm.weight", H);
        BERT_L1(ln2_b, "output.LayerNorm.bias", H);
#undef BERT_L1
#undef BERT_L2
    }
#undef BERT_ADD1
#undef BERT_ADD2
    m->hs = levi_xcalloc((size_t)L + 1, sizeof *m->hs);
    m->acts = levi_xcalloc((size_t)L, sizeof *m->acts);
    return m;
}

/* Parameter storage and the packed QKV copy. */
static void bert_alloc(levi_bert *m) {
    const size_t H = (size_t)m->cfg.hidden, L = (size_t)m->cfg.layers;
    levi_params *p = &m->params;
    levi_params_alloc(p);
    // Weight decay skips biases and norms (and, as usual for BERT, nothing else).
    for (int i = 0; i < p->count; i++) {
        const char *n = p->items[i].name;
        size_t len = strlen(n);
        p->items[i].no_decay =
            (len >= 5 && strcmp(n + len - 5, ".bias") == 0) || strstr(n, "LayerNorm.") != NULL;
    }
    m->qkv_w = levi_xmalloc(L * 3 * H * H * sizeof(float));
    m->qkv_b = levi_xmalloc(L * 3 * H * sizeof(float));
}

void levi_bert_free(levi_bert *m) {
    if (!m) return;
    levi_params_free(&m->params);
    levi_arena_free(m->arena[0]);
    levi_arena_free(m->arena[1]);
    levi_free(m->qkv_w);
    levi_free(m->qkv_b);
    free(m->li);
    free(m->hs);
    free(m->acts);
    free(m);
}

const levi_bert_config *levi_bert_get_config(const levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    return &m->cfg;
}

levi_params *levi_bert_params(levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    return &m->params;
}

levi_bert *levi_bert_init_random(const levi_bert_config *cfg, levi_rng *rng, levi_error *err) {
    LEVI_ASSERT(cfg != NULL && rng != NULL, "levi_bert_init_random needs a config and an rng");
    if (levi_bert_config_validate(cfg, "config", err) != LEVI_OK) return NULL;
    levi_bert *m = bert_register(cfg);
    bert_alloc(m);
    levi_params *p = &m->params;
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        float *d = p->data + it->offset;
        const char *n = it->name;
        size_t len = strlen(n);
        if (strstr(n, "LayerNorm.weight")) {
            for (size_t j = 0; j < it->numel; j++) d[j] = 1.0f;
        } else if (len >= 5 && strcmp(n + len - 5, ".bias") == 0) {
            memset(d, 0, it->numel * sizeof(float));
        } else {
            for (size_t j = 0; j < it->numel; j++) d[j] = cfg->init_range * levi_rng_normal(rng);
        }
    }
    if (cfg->pad_token_id >= 0 && cfg->pad_token_id < cfg->vocab)
        memset(levi_params_data(p, m->word) + (size_t)cfg->pad_token_id * cfg->hidden, 0,
               (size_t)cfg->hidden * sizeof(float));
    return m;
}

static void bert_shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t at = 0;
    at += (size_t)snprintf(buf + at, cap - at, "[");
    for (int d = 0; d < ndim && at < cap; d++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (at < cap) snprintf(buf + at, cap - at, "]");
}

levi_bert *levi_bert_open(const char *model_dir, levi_error *err) {
    LEVI_ASSERT(model_dir != NULL, "levi_bert_open needs a folder");
    char cfg_path[4096], st_path[4096];
    if ((size_t)snprintf(cfg_path, sizeof cfg_path, "%s/config.json", model_dir) >=
            sizeof cfg_path ||
        (size_t)snprintf(st_path, sizeof st_path, "%s/model.safetensors", model_dir) >=
            sizeof st_path) {
        levi_errorf(err, LEVI_ERR_ARG, "model folder path too long: %.200s...", model_dir);
        return NULL;
    }
    levi_bert_config cfg;
    if (levi_bert_config_load(cfg_path, &cfg, err) != LEVI_OK) return NULL;
    struct stat sb;
    if (stat(st_path, &sb) != 0) {
        levi_errorf(err, LEVI_ERR_IO,
                    "%s: not found (levi reads only the safetensors form of a checkpoint; "
                    "convert pytorch_model.bin with safetensors.torch.save_file)",
                    st_path);
        return NULL;
    }
    levi_st_file *f = levi_st_open(st_path, err);
    if (!f) return NULL;
    // Names and shapes are checked against the file before anything is allocated: a config
    // that asks for a huge table fails here, not in the allocator.
    levi_bert *m = bert_register(&cfg);
    levi_params *p = &m->params;
    char alt[LEVI_NAME_MAX + 8];
    const char **found = levi_xcalloc((size_t)p->count, sizeof *found);
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        const char *name = it->name;
        const levi_tensor *t = levi_st_find(f, name);
        if (!t) {
            snprintf(alt, sizeof alt, "bert.%s", it->name);
            t = levi_st_find(f, alt);
            name = alt;
        }
        if (!t) {
            levi_errorf(err, LEVI_ERR_NOT_FOUND,
                        "%s: tensor '%s' (or 'bert.%s') not found; config.json describes a "
                        "BERT with %d layers",
                        st_path, it->name, it->name, cfg.layers);
            goto fail;
        }
        int same = t->ndim == it->ndim;
        for (int d = 0; same && d < it->ndim; d++) same = t->shape[d] == it->shape[d];
        if (!same) {
            char want[96], found[96];
            bert_shape_str(want, sizeof want, it->ndim, it->shape);
            bert_shape_str(found, sizeof found, t->ndim, t->shape);
            levi_errorf(err, LEVI_ERR_SHAPE,
                        "%s: tensor '%s': expected shape %s (from config.json), found %s", st_path,
                        name, want, found);
            goto fail;
        }
        found[i] = t->name;
    }
    bert_alloc(m);
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        if (levi_st_read_f32(f, found[i], it->ndim, it->shape, p->data + it->offset, err) !=
            LEVI_OK)
            goto fail;
    }
    free(found);
    levi_st_close(f);
    return m;
fail:
    free(found);
    levi_st_close(f);
    levi_bert_free(m);
    return NULL;
}

void levi_bert_freeze_layers(levi_bert *m, int first, int last) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    LEVI_ASSERT(first >= 0 && first <= last && last < m->cfg.layers,
                "freeze_layers: need 0 <= first <= last < layers");
    char prefix[64];
    for (int l = first; l <= last; l++) {
        // The trailing dot keeps layer 1 from matching layers 10..19.
        snprintf(prefix, sizeof prefix, "encoder.layer.%d.", l);
        levi_params_set_trainable(&m->params, prefix, 0);
    }
}

void levi_bert_freeze_embeddings(levi_bert *m) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    levi_params_set_trainable(&m->params, "embeddings.", 0);
}

/* ----------------------------------------------------------------------------------------
 * Arenas. One layout function serves both the sizing (base NULL) and the carving, so the two
 * cannot disagree. */

typedef struct {
    char *base;
    size_t off;
    int overflow;
} bert_carver;

static void *bert_carve(bert_carver *c, size_t count, size_t elem) {
    size_t bytes;
    size_t start = (c->off + 63) & ~(size_t)63;
    if (!levi_mul_size(count, elem, &bytes) || !levi_add_size(start, bytes, &c->off)) {
        c->overflow = 1;
        c->off = SIZE_MAX / 2;
        return NULL;
    }
    return c->base ? c->base + start : NULL;
}
#define BERT_FLOATS(c, n) ((float *)bert_carve((c), (n), sizeof(float)))

typedef struct {
    int B, S, threads, train, hidden_dropout, attn_dropout;
} bert_layout_key;

/* Inference runs each layer over chunks of at most this many tokens (whole sequences), so its
 * scratch (QKV, attention output, FFN activations) stays bounded whatever the batch. Not
 * smaller: OpenBLAS re-packs the weights for every product, and 512-token chunks raised that
 * packing from 0.6% to 5% of a MiniLM forward while the element-wise passes gained nothing
 * measurable from being cache-resident. */
#define BERT_CHUNK_TOKENS 8192

static int bert_chunk_seqs(int B, int S) {
    int n = BERT_CHUNK_TOKENS / S;
    n = n < 1 ? 1 : n;
    return n < B ? n : B;
}

/* Carves the buffers of one mode; with m == NULL only sizes. Returns bytes (SIZE_MAX on
 * overflow). */
static size_t bert_layout(levi_bert *m, const levi_bert_config *cfg, bert_layout_key k,
                          char *base) {
    bert_carver c = {base, 0, 0};
    const size_t N = (size_t)k.B * (size_t)k.S, H = (size_t)cfg->hidden;
    const size_t I = (size_t)cfg->intermediate, L = (size_t)cfg->layers;
    const size_t HD = H / (size_t)cfg->heads;
    const size_t PS = (size_t)k.B * (size_t)cfg->heads * (size_t)k.S * (size_t)k.S;
    int32_t *ids = bert_carve(&c, N, sizeof(int32_t));
    int32_t *mask = bert_carve(&c, N, sizeof(int32_t));
    int32_t *types = bert_carve(&c, N, sizeof(int32_t));
    float *scratch = BERT_FLOATS(
        &c, (size_t)k.threads * levi__bert_attention_scratch_floats(k.S, cfg->heads, (int)HD));
    for (size_t l = 0; l <= L; l++) {
        float *h = BERT_FLOATS(&c, N * H);
        if (m) m->hs[l] = h;
    }
    if (m) {
        m->ids = ids, m->mask = mask, m->types = types, m->scratch = scratch;
        m->scratch_threads = k.threads;
    }
    if (!k.train) {
        // Inference: scratch for one chunk of sequences of one layer, reused by all.
        const size_t R = (size_t)bert_chunk_seqs(k.B, k.S) * (size_t)k.S;
        float *qkv = BERT_FLOATS(&c, R * 3 * H);
        float *ctx = BERT_FLOATS(&c, R * H);
        float *a = BERT_FLOATS(&c, R * H);
        float *inter = BERT_FLOATS(&c, R * I);
        if (m) {
            bert_layer_acts *x = &m->acts[0];
            memset(x, 0, sizeof *x);
            x->qkv = qkv, x->ctx = ctx, x->a = a, x->pre = inter;
        }
    } else {
        float *emb_sum = BERT_FLOATS(&c, N * H);
        float *emb_mean = BERT_FLOATS(&c, N), *emb_rstd = BERT_FLOATS(&c, N);
        float *emb_dmask = k.hidden_dropout ? BERT_FLOATS(&c, N * H) : NULL;
        if (m) {
            m->emb_sum = emb_sum, m->emb_mean = emb_mean, m->emb_rstd = emb_rstd;
            m->emb_dmask = emb_dmask;
        }
        for (size_t l = 0; l < L; l++) {
            bert_layer_acts x;
            x.qkv = BERT_FLOATS(&c, N * 3 * H);
            x.probs = BERT_FLOATS(&c, PS);
            x.pmask = k.attn_dropout ? BERT_FLOATS(&c, PS) : NULL;
            x.ctx = BERT_FLOATS(&c, N * H);
            x.dmask1 = k.hidden_dropout ? BERT_FLOATS(&c, N * H) : NULL;
            x.res1 = BERT_FLOATS(&c, N * H);
            x.mean1 = BERT_FLOATS(&c, N), x.rstd1 = BERT_FLOATS(&c, N);
            x.a = BERT_FLOATS(&c, N * H);
            x.pre = BERT_FLOATS(&c, N * I);
            x.act = BERT_FLOATS(&c, N * I);
            x.dmask2 = k.hidden_dropout ? BERT_FLOATS(&c, N * H) : NULL;
            x.res2 = BERT_FLOATS(&c, N * H);
            x.mean2 = BERT_FLOATS(&c, N), x.rstd2 = BERT_FLOATS(&c, N);
            if (m) m->acts[l] = x;
        }
        float *tmp = BERT_FLOATS(&c, N * H);
        float *g = BERT_FLOATS(&c, N * H), *t1 = BERT_FLOATS(&c, N * H);
        float *t2 = BERT_FLOATS(&c, N * H), *dctx = BERT_FLOATS(&c, N * H);
        float *dqkv = BERT_FLOATS(&c, N * 3 * H), *dint = BERT_FLOATS(&c, N * I);
        if (m) {
            m->tmp = tmp, m->g = g, m->t1 = t1, m->t2 = t2;
            m->dctx = dctx, m->dqkv = dqkv, m->dint = dint;
        }
    }
    return c.overflow ? SIZE_MAX : c.off + 64;
}

size_t levi_bert_train_arena_bytes(const levi_bert_config *cfg, int B, int S, int hidden_dropout,
                                   int attn_dropout, int threads) {
    LEVI_ASSERT(cfg && B > 0 && S > 0 && threads > 0, "train_arena_bytes: bad arguments");
    bert_layout_key k = {B, S, threads, 1, hidden_dropout != 0, attn_dropout != 0};
    return bert_layout(NULL, cfg, k, NULL);
}

size_t levi_bert_infer_arena_bytes(const levi_bert_config *cfg, int B, int S, int threads) {
    LEVI_ASSERT(cfg && B > 0 && S > 0 && threads > 0, "infer_arena_bytes: bad arguments");
    bert_layout_key k = {B, S, threads, 0, 0, 0};
    return bert_layout(NULL, cfg, k, NULL);
}

/* ----------------------------------------------------------------------------------------
 * Forward */

levi_bert_forward_params levi_bert_default_forward_params(void) {
    levi_bert_forward_params p = {LEVI_BERT_INFER, -1.0f, -1.0f, NULL};
    return p;
}

/* Refreshes the packed [3H, H] query|key|value weights and [3H] biases of every layer. */
static void bert_pack_qkv(levi_bert *m) {
    const size_t H = (size_t)m->cfg.hidden;
    const levi_params *p = &m->params;
    for (int l = 0; l < m->cfg.layers; l++) {
        const bert_layer_idx *x = &m->li[l];
        float *w = m->qkv_w + (size_t)l * 3 * H * H, *b = m->qkv_b + (size_t)l * 3 * H;
        const int wi[3] = {x->q_w, x->k_w, x->v_w}, bi[3] = {x->q_b, x->k_b, x->v_b};
        for (int j = 0; j < 3; j++) {
            memcpy(w + j * H * H, levi_params_data(p, wi[j]), H * H * sizeof(float));
            memcpy(b + j * H, levi_params_data(p, bi[j]), H * sizeof(float));
        }
    }
}

/* The part of a layer both modes share up to the attention output: qkv, then ctx. */
/* Sequences [b0, b0 + nb) of the batch; x, qkv, ctx point at those rows. */
static void bert_attention_block(levi_bert *m, int l, int b0, int nb, const float *x, float *qkv,
                                 float *ctx, float *probs, const float *pmask) {
    const levi_bert_config *c = &m->cfg;
    const int N = nb * m->S, H = c->hidden, HD = H / c->heads;
    bert_fill_rows(qkv, NULL, m->qkv_b + (size_t)l * 3 * H, N, 3 * H);
    levi_gemm(0, 1, N, 3 * H, H, 1.0f, x, H, m->qkv_w + (size_t)l * 3 * H * H, H, 1.0f, qkv, 3 * H);
    levi__bert_attention_forward(ctx, H, probs, pmask, qkv, qkv + H, qkv + 2 * H, 3 * H,
                                 m->mask + (size_t)b0 * m->S, nb, m->S, c->heads, HD,
                                 1.0f / sqrtf((float)HD), m->scratch);
}

static void bert_forward_infer(levi_bert *m) {
    const levi_bert_config *c = &m->cfg;
    const levi_params *p = &m->params;
    const int H = c->hidden, I = c->intermediate, S = m->S;
    const int cb = bert_chunk_seqs(m->B, S);
    bert_layer_acts *w = &m->acts[0];
    // Layer-major: one layer's weights stay in cache while its chunks stream through.
    for (int l = 0; l < c->layers; l++)
        for (int b0 = 0; b0 < m->B; b0 += cb) {
            const int nb = m->B - b0 < cb ? m->B - b0 : cb, N = nb * S;
            const bert_layer_idx *x = &m->li[l];
            const float *in = m->hs[l] + (size_t)b0 * S * H;
            float *out = m->hs[l + 1] + (size_t)b0 * S * H;
            bert_attention_block(m, l, b0, nb, in, w->qkv, w->ctx, NULL, NULL);
            // a = LN(in + ctx Wo^T + bo): bias and residual pre-filled, GEMM accumulates
            bert_fill_rows(w->a, in, levi_params_data(p, x->o_b), N, H);
            levi_gemm(0, 1, N, H, H, 1.0f, w->ctx, H, levi_params_data(p, x->o_w), H, 1.0f, w->a,
                      H);
            bert_add_layernorm(w->a, NULL, NULL, NULL, w->a, NULL, levi_params_data(p, x->ln1_w),
                               levi_params_data(p, x->ln1_b), N, H, c->eps);
            bert_fill_rows(w->pre, NULL, levi_params_data(p, x->i_b), N, I);
            levi_gemm(0, 1, N, I, H, 1.0f, w->a, H, levi_params_data(p, x->i_w), H, 1.0f, w->pre,
                      I);
            levi__bert_gelu_forward(w->pre, w->pre, (int64_t)N * I);
            bert_fill_rows(out, w->a, levi_params_data(p, x->f_b), N, H);
            levi_gemm(0, 1, N, H, I, 1.0f, w->pre, I, levi_params_data(p, x->f_w), I, 1.0f, out, H);
            bert_add_layernorm(out, NULL, NULL, NULL, out, NULL, levi_params_data(p, x->ln2_w),
                               levi_params_data(p, x->ln2_b), N, H, c->eps);
        }
}

/* Dropout multipliers for attention probabilities, drawn serially (same seed, same mask
 * for any thread count), with levi_dropout_forward's convention: 0 or 1/(1-p). */
static void bert_attn_dropout_mask(float *pm, size_t n, float p, levi_rng *rng) {
    const float keep = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++) pm[i] = levi_rng_uniform(rng) < p ? 0.0f : keep;
}

static void bert_forward_train(levi_bert *m, levi_rng *rng) {
    const levi_bert_config *c = &m->cfg;
    const levi_params *p = &m->params;
    const int N = m->B * m->S, H = c->hidden, I = c->intermediate;
    const size_t PS = (size_t)m->B * (size_t)c->heads * (size_t)m->S * (size_t)m->S;
    const float ph = m->p_hidden;
    for (int l = 0; l < c->layers; l++) {
        const bert_layer_idx *x = &m->li[l];
        bert_layer_acts *s = &m->acts[l];
        const float *in = m->hs[l];
        float *out = m->hs[l + 1];
        if (s->pmask) bert_attn_dropout_mask(s->pmask, PS, m->p_attn, rng);
        bert_attention_block(m, l, 0, m->B, in, s->qkv, s->ctx, s->probs, s->pmask);
        if (s->dmask1) {
            bert_fill_rows(m->tmp, NULL, levi_params_data(p, x->o_b), N, H);
            levi_gemm(0, 1, N, H, H, 1.0f, s->ctx, H, levi_params_data(p, x->o_w), H, 1.0f, m->tmp,
                      H);
            levi_dropout_forward(m->tmp, s->dmask1, m->tmp, (int64_t)N * H, ph, rng);
            bert_add_layernorm(s->a, s->res1, s->mean1, s->rstd1, in, m->tmp,
                               levi_params_data(p, x->ln1_w), levi_params_data(p, x->ln1_b), N, H,
                               c->eps);
        } else {
            bert_fill_rows(s->res1, in, levi_params_data(p, x->o_b), N, H);
            levi_gemm(0, 1, N, H, H, 1.0f, s->ctx, H, levi_params_data(p, x->o_w), H, 1.0f, s->res1,
                      H);
            bert_add_layernorm(s->a, NULL, s->mean1, s->rstd1, s->res1, NULL,
                               levi_params_data(p, x->ln1_w), levi_params_data(p, x->ln1_b), N, H,
                               c->eps);
        }
        bert_fill_rows(s->pre, NULL, levi_params_data(p, x->i_b), N, I);
        levi_gemm(0, 1, N, I, H, 1.0f, s->a, H, levi_params_data(p, x->i_w), H, 1.0f, s->pre, I);
        levi__bert_gelu_forward(s->act, s->pre, (int64_t)N * I);
        if (s->dmask2) {
            bert_fill_rows(m->tmp, NULL, levi_params_data(p, x->f_b), N, H);
            levi_gemm(0, 1, N, H, I, 1.0f, s->act, I, levi_params_data(p, x->f_w), I, 1.0f, m->tmp,
                      H);
            levi_dropout_forward(m->tmp, s->dmask2, m->tmp, (int64_t)N * H, ph, rng);
            bert_add_layernorm(out, s->res2, s->mean2, s->rstd2, s->a, m->tmp,
                               levi_params_data(p, x->ln2_w), levi_params_data(p, x->ln2_b), N, H,
                               c->eps);
        } else {
            bert_fill_rows(s->res2, s->a, levi_params_data(p, x->f_b), N, H);
            levi_gemm(0, 1, N, H, I, 1.0f, s->act, I, levi_params_data(p, x->f_w), I, 1.0f, s->res2,
                      H);
            bert_add_layernorm(out, NULL, s->mean2, s->rstd2, s->res2, NULL,
                               levi_params_data(p, x->ln2_w), levi_params_data(p, x->ln2_b), N, H,
                               c->eps);
        }
    }
}

levi_status levi_bert_forward(levi_bert *m, const int32_t *ids, const int32_t *mask,
                              const int32_t *types, int B, int S,
                              const levi_bert_forward_params *params, levi_error *err) {
    LEVI_ASSERT(m != NULL && ids != NULL, "levi_bert_forward needs a model and ids");
    const levi_bert_config *c = &m->cfg;
    levi_bert_forward_params fp = params ? *params : levi_bert_default_forward_params();
    const int train = fp.mode == LEVI_BERT_TRAIN;
    m->can_backward = 0;
    if (B < 1 || S < 1)
        return levi_errorf(err, LEVI_ERR_SHAPE, "bert forward: batch %d x %d: expected >= 1 x 1", B,
                           S);
    if (S > c->max_pos)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "bert forward: sequence length %d exceeds max_position_embeddings %d", S,
                           c->max_pos);
    if ((int64_t)B * S *
            (3 * (int64_t)c->hidden > c->intermediate ? 3 * (int64_t)c->hidden : c->intermediate) >
        INT_MAX)
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "bert forward: batch %d x %d is too large for one call; split it", B, S);
    for (int64_t n = 0; n < (int64_t)B * S; n++) {
        if (ids[n] < 0 || ids[n] >= c->vocab)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: token id %d at [%lld][%lld] is outside the "
                               "vocabulary [0, %d)",
                               ids[n], (long long)(n / S), (long long)(n % S), c->vocab);
        if (types && (types[n] < 0 || types[n] >= c->type_vocab))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: token type %d at [%lld][%lld] is outside [0, %d)",
                               types[n], (long long)(n / S), (long long)(n % S), c->type_vocab);
        if (mask && mask[n] != 0 && mask[n] != 1)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: attention mask %d at [%lld][%lld]: expected 0 or 1",
                               mask[n], (long long)(n / S), (long long)(n % S));
    }
    float ph = 0.0f, pa = 0.0f;
    if (train) {
        ph = fp.hidden_dropout < 0.0f ? c->hidden_dropout : fp.hidden_dropout;
        pa = fp.attn_dropout < 0.0f ? c->attn_dropout : fp.attn_dropout;
        if (!(ph < 1.0f) || !(pa < 1.0f))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "bert forward: dropout probabilities %g, %g: expected [0, 1)",
                               (double)ph, (double)pa);
        LEVI_ASSERT(fp.rng != NULL || (ph == 0.0f && pa == 0.0f),
                    "train-mode forward with dropout needs params->rng");
    }
    bert_layout_key key = {B, S, bert_max_threads(), train, ph > 0.0f, pa > 0.0f};
    size_t bytes = bert_layout(NULL, c, key, NULL);
    if (bytes == SIZE_MAX)
        return levi_errorf(err, LEVI_ERR_NOMEM, "bert forward: batch %d x %d overflows memory", B,
                           S);
    levi_arena **ar = &m->arena[train];
    if (!*ar || levi_arena_capacity(*ar) < bytes) {
        levi_arena_free(*ar);
        *ar = levi_arena_init(bytes);
    }
    levi_arena_reset(*ar);
    char *base = levi_arena_alloc(*ar, bytes - 64);
    bert_layout(m, c, key, base);
    m->B = B, m->S = S, m->mode = train, m->p_hidden = ph, m->p_attn = pa;

    const size_t N = (size_t)B * S;
    const int H = c->hidden;
    memcpy(m->ids, ids, N * sizeof(int32_t));
    if (mask)
        memcpy(m->mask, mask, N * sizeof(int32_t));
    else
        for (size_t n = 0; n < N; n++) m->mask[n] = 1;
    if (types)
        memcpy(m->types, types, N * sizeof(int32_t));
    else
        memset(m->types, 0, N * sizeof(int32_t));
    bert_pack_qkv(m);

    // Embeddings: word + position + type, then LayerNorm (and dropout in train mode).
    const levi_params *p = &m->params;
    const float *word = levi_params_data(p, m->word), *pos = levi_params_data(p, m->pos);
    const float *typ = levi_params_data(p, m->type);
    float *sum = train ? m->emb_sum : m->hs[0];
    BERT_OMP_FOR_IF((int64_t)N * H > BERT_PAR_MIN)
    for (size_t n = 0; n < N; n++) {
        const float *wr = word + (size_t)m->ids[n] * H, *pr = pos + (n % (size_t)S) * H;
        const float *tr = typ + (size_t)m->types[n] * H;
        float *o = sum + n * H;
        BERT_OMP_SIMD
        for (int i = 0; i < H; i++) o[i] = wr[i] + pr[i] + tr[i];
    }
    bert_add_layernorm(m->hs[0], NULL, train ? m->emb_mean : NULL, train ? m->emb_rstd : NULL, sum,
                       NULL, levi_params_data(p, m->eln_w), levi_params_data(p, m->eln_b),
                       (int64_t)N, H, c->eps);
    if (train) {
        if (m->emb_dmask)
            levi_dropout_forward(m->hs[0], m->emb_dmask, m->hs[0], (int64_t)N * H, ph, fp.rng);
        bert_forward_train(m, fp.rng);
        m->can_backward = 1;
    } else {
        bert_forward_infer(m);
    }
    return LEVI_OK;
}

const float *levi_bert_hidden(const levi_bert *m, int layer) {
    LEVI_ASSERT(m != NULL && m->B > 0, "levi_bert_hidden before any forward");
    LEVI_ASSERT(layer >= 0 && layer <= m->cfg.layers, "hidden state index out of [0, layers]");
    return m->hs[layer];
}

void levi_bert_last_shape(const levi_bert *m, int *B, int *S) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    if (B) *B = m->B;
    if (S) *S = m->S;
}

void levi_bert_meanpool(const levi_bert *m, int layer, float *out) {
    const float *h = levi_bert_hidden(m, layer);
    levi_meanpool_forward(out, h, m->mask, m->B, m->S, m->cfg.hidden);
}

/* ----------------------------------------------------------------------------------------
 * Backward */

static int bert_tr(const levi_bert *m, int idx) {
    return m->params.items[idx].trainable;
}

static float *bert_grad_if(levi_bert *m, int idx) {
    return bert_tr(m, idx) ? levi_params_grad(&m->params, idx) : NULL;
}

static int bert_layer_trainable(const levi_bert *m, int l) {
    const bert_layer_idx *x = &m->li[l];
    const int idx[] = {x->q_w,   x->q_b,   x->k_w, x->k_b, x->v_w, x->v_b, x->o_w,   x->o_b,
                       x->ln1_w, x->ln1_b, x->i_w, x->i_b, x->f_w, x->f_b, x->ln2_w, x->ln2_b};
    for (size_t i = 0; i < sizeof idx / sizeof idx[0]; i++)
        if (bert_tr(m, idx[i])) return 1;
    return 0;
}

/* dW[OC,C] += dY[N,OC]^T X[N,C] (when dW is given) and db[OC] += colsum(dY) (when given). */
static void bert_linear_wgrad(float *dW, float *db, const float *dY, int ldy, const float *X,
                              int ldx, int N, int OC, int C) {
    if (dW) levi_gemm(1, 0, OC, C, N, 1.0f, dY, ldy, X, ldx, 1.0f, dW, C);
    if (db) bert_colsum_add(db, dY, ldy, N, OC);
}

/* One encoder layer. g: dLoss/d output [N,H] (clobbered). When need_in, g receives dLoss/d
 * input (the layer's own contribution; the caller adds the given d_hidden). */
static void bert_layer_backward(levi_bert *m, int l, float *g, int need_in) {
    const levi_bert_config *c = &m->cfg;
    const levi_params *p = &m->params;
    const bert_layer_idx *x = &m->li[l];
    const bert_layer_acts *s = &m->acts[l];
    const int N = m->B * m->S, H = c->hidden, I = c->intermediate, HD = H / c->heads;
    const int64_t NH_ = (int64_t)N * H;
    const float *in = m->hs[l];
    float *t1 = m->t1, *t2 = m->t2;

    const int t_ln2 = bert_tr(m, x->ln2_w) || bert_tr(m, x->ln2_b);
    const int t_f = bert_tr(m, x->f_w) || bert_tr(m, x->f_b);
    const int t_i = bert_tr(m, x->i_w) || bert_tr(m, x->i_b);
    const int t_ln1 = bert_tr(m, x->ln1_w) || bert_tr(m, x->ln1_b);
    const int t_o = bert_tr(m, x->o_w) || bert_tr(m, x->o_b);
    const int t_qkv = bert_tr(m, x->q_w) || bert_tr(m, x->q_b) || bert_tr(m, x->k_w) ||
                      bert_tr(m, x->k_b) || bert_tr(m, x->v_w) || bert_tr(m, x->v_b);
    // Which gradients are needed, from the bottom of the layer up.
    const int need_qkv = need_in || t_qkv;
    const int need_o_out = t_o || need_qkv;
    const int need_res1 = need_o_out || need_in;
    const int need_a = need_res1 || t_ln1;
    const int need_pre = t_i || need_a;
    const int need_f = t_f || need_pre;
    if (!(need_f || need_a || t_ln2)) return;

    // output.LayerNorm: t1 = d res2 (= d a residual part = d dropout2 output)
    memset(t1, 0, (size_t)NH_ * sizeof(float));
    levi_layernorm_backward(t1, bert_grad_if(m, x->ln2_w), bert_grad_if(m, x->ln2_b), g, s->res2,
                            levi_params_data(p, x->ln2_w), s->mean2, s->rstd2, N, H);
    if (!need_f && !need_a) return;
    // t2 = d a, starting with the residual path
    memcpy(t2, t1, (size_t)NH_ * sizeof(float));
    float *df = t1;
    if (s->dmask2) {
        BERT_OMP_FOR_IF(NH_ > BERT_PAR_MIN)
        for (int64_t i = 0; i < NH_; i++) t1[i] *= s->dmask2[i];
    }
    // output.dense: d act = df W2; dW2 += df^T act
    bert_linear_wgrad(bert_grad_if(m, x->f_w), bert_grad_if(m, x->f_b), df, H, s->act, I, N, H, I);
    if (need_pre) {
        levi_gemm(0, 0, N, I, H, 1.0f, df, H, levi_params_data(p, x->f_w), I, 0.0f, m->dint, I);
        bert_gelu_backward_inplace(m->dint, s->pre, (int64_t)N * I);
        bert_linear_wgrad(bert_grad_if(m, x->i_w), bert_grad_if(m, x->i_b), m->dint, I, s->a, H, N,
                          I, H);
        if (need_a)
            levi_gemm(0, 0, N, H, I, 1.0f, m->dint, I, levi_params_data(p, x->i_w), H, 1.0f, t2, H);
    }
    if (!need_a) return;
    // attention.output.LayerNorm: t1 = d res1
    memset(t1, 0, (size_t)NH_ * sizeof(float));
    levi_layernorm_backward(t1, bert_grad_if(m, x->ln1_w), bert_grad_if(m, x->ln1_b), t2, s->res1,
                            levi_params_data(p, x->ln1_w), s->mean1, s->rstd1, N, H);
    if (!need_res1) return;
    if (need_in) memcpy(g, t1, (size_t)NH_ * sizeof(float)); // residual path to the input
    if (!need_o_out) return;
    float *dout = t1;
    if (s->dmask1) {
        BERT_OMP_FOR_IF(NH_ > BERT_PAR_MIN)
        for (int64_t i = 0; i < NH_; i++) t1[i] *= s->dmask1[i];
    }
    bert_linear_wgrad(bert_grad_if(m, x->o_w), bert_grad_if(m, x->o_b), dout, H, s->ctx, H, N, H,
                      H);
    if (!need_qkv) return;
    levi_gemm(0, 0, N, H, H, 1.0f, dout, H, levi_params_data(p, x->o_w), H, 0.0f, m->dctx, H);
    float *dqkv = m->dqkv;
    levi__bert_attention_backward(dqkv, dqkv + H, dqkv + 2 * H, 3 * H, m->dctx, H, s->probs,
                                  s->pmask, s->qkv, s->qkv + H, s->qkv + 2 * H, 3 * H, m->mask,
                                  m->B, m->S, c->heads, HD, 1.0f / sqrtf((float)HD), m->scratch);
    const int wi[3] = {x->q_w, x->k_w, x->v_w}, bi[3] = {x->q_b, x->k_b, x->v_b};
    for (int j = 0; j < 3; j++)
        bert_linear_wgrad(bert_grad_if(m, wi[j]), bert_grad_if(m, bi[j]), dqkv + (size_t)j * H,
                          3 * H, in, H, N, H, H);
    if (need_in)
        levi_gemm(0, 0, N, H, 3 * H, 1.0f, dqkv, 3 * H, m->qkv_w + (size_t)l * 3 * H * H, H, 1.0f,
                  g, H);
}

void levi_bert_backward(levi_bert *m, const float *const *d_hidden, float *d_out, int d_out_layer) {
    LEVI_ASSERT(m != NULL, "NULL bert");
    LEVI_ASSERT(m->can_backward, "levi_bert_backward needs a LEVI_BERT_TRAIN forward first");
    const levi_bert_config *c = &m->cfg;
    const int L = c->layers, H = c->hidden;
    LEVI_ASSERT(!d_out || (d_out_layer >= 0 && d_out_layer <= L), "d_out_layer out of [0, L]");
    const size_t NH_ = (size_t)m->B * m->S * H;
    int top = -1;
    for (int l = L; d_hidden && l >= 0; l--)
        if (d_hidden[l]) {
            top = l;
            break;
        }
    if (top < 0) return;
    // lowR: the lowest hidden state whose gradient anything needs.
    const int emb_tr = bert_tr(m, m->word) || bert_tr(m, m->pos) || bert_tr(m, m->type) ||
                       bert_tr(m, m->eln_w) || bert_tr(m, m->eln_b);
    int lowR = INT_MAX;
    if (emb_tr) lowR = 0;
    if (d_out && d_out_layer < lowR) lowR = d_out_layer;
    for (int l = 0; l < L && lowR > l + 1; l++)
        if (bert_layer_trainable(m, l)) lowR = l + 1;

    float *g = m->g;
    memcpy(g, d_hidden[top], NH_ * sizeof(float));
    int at = top; // g holds dLoss/d hidden[at]
    if (d_out && d_out_layer == top) {
        BERT_OMP_FOR_IF((int64_t)NH_ > BERT_PAR_MIN)
        for (size_t i = 0; i < NH_; i++) d_out[i] += g[i];
        d_out = NULL;
    }
    for (int l = top - 1; l >= 0; l--) { // layer l maps hidden[l] -> hidden[l+1]
        const int need_in = l >= lowR;
        if (!need_in && !bert_layer_trainable(m, l)) break;
        bert_layer_backward(m, l, g, need_in);
        if (!need_in) break;
        at = l;
        if (d_hidden[l]) {
            const float *dh = d_hidden[l];
            BERT_OMP_FOR_IF((int64_t)NH_ > BERT_PAR_MIN)
            for (size_t i = 0; i < NH_; i++) g[i] += dh[i];
        }
        if (d_out && d_out_layer == l) {
            BERT_OMP_FOR_IF((int64_t)NH_ > BERT_PAR_MIN)
            for (size_t i = 0; i < NH_; i++) d_out[i] += g[i];
            d_out = NULL;
        }
    }
    if (at != 0 || !emb_tr) return;
    // Embeddings: dropout, LayerNorm, then the three tables.
    const levi_params *p = &m->params;
    const size_t N = (size_t)m->B * m->S;
    if (m->emb_dmask)
        for (size_t i = 0; i < NH_; i++) g[i] *= m->emb_dmask[i];
    float *dsum = m->t1;
    memset(dsum, 0, NH_ * sizeof(float));
    levi_layernorm_backward(dsum, bert_grad_if(m, m->eln_w), bert_grad_if(m, m->eln_b), g,
                            m->emb_sum, levi_params_data(p, m->eln_w), m->emb_mean, m->emb_rstd,
                            (int64_t)N, H);
    float *dw = bert_grad_if(m, m->word), *dp = bert_grad_if(m, m->pos);
    float *dt = bert_grad_if(m, m->type);
    if (dw) // the pad_token_id row gets no gradient, as nn.Embedding(padding_idx=...) does
        for (size_t n = 0; n < N; n++) {
            if (m->ids[n] == c->pad_token_id) continue;
            float *r = dw + (size_t)m->ids[n] * H;
            const float *d = dsum + n * H;
            for (int i = 0; i < H; i++) r[i] += d[i];
        }
    if (dt) levi_embedding_backward(dt, dsum, m->types, (int64_t)N, c->type_vocab, H);
    if (dp)
        for (size_t n = 0; n < N; n++) {
            float *r = dp + (n % (size_t)m->S) * H;
            const float *d = dsum + n * H;
            for (int i = 0; i < H; i++) r[i] += d[i];
        }
}
