/* levi ops: forward/backward kernels of the dense layers (linear, embedding, layer norm,
 * activations, dropout, attention, residual add, mean pooling, concat, losses).
 *
 * For: the contract in include/levi/ops.h, over raw row-major float pointers. Matrix products
 * go through levi_gemm (OpenBLAS); everything else is a plain loop the compiler can vectorise,
 * threaded with OpenMP only where the work is big enough to pay for waking the threads.
 * Not for: shape validation of user input (callers validate; misuse asserts), allocation
 * (callers own every buffer), the image kernels (conv2d, batch norm, max pool live in
 * ops_conv.c).
 *
 * Vectorisation: the build uses -O2, where GCC vectorises a loop of unknown length only when
 * told to, so the hot loops carry `omp simd` (reductions included: without -ffast-math a float
 * sum must otherwise keep its sequential order). GELU and softmax call glibc's vector erff/expf
 * (libmvec) through the declarations below; the scalar calls cost ~20x more.
 *
 * Determinism: every reduction runs in an order that does not depend on the thread count (row
 * sums per row, column sums per column block, element-wise loops split into fixed blocks), so
 * results are bit-identical for any number of OpenMP threads; only OpenBLAS's blocking may
 * depend on its thread count.
 *
 * Beyond the header: mean/rstd of layer norm may be NULL (inference), the mask of dropout may
 * be NULL when p == 0, and probs of cross-entropy may be NULL (loss only).
 */
#include "levi/ops.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#ifdef _OPENMP
#define LEVI__PRAGMA(x) _Pragma(#x)
/* Threads only when cond holds: a parallel region costs a few microseconds, more than the
 * whole loop for the small tensors of a test or a tiny head. */
#define LEVI__OMP_FOR_IF(cond) LEVI__PRAGMA(omp parallel for if(cond))
#define LEVI__OMP_SIMD LEVI__PRAGMA(omp simd)
#define LEVI__OMP_SIMD_SUM(var) LEVI__PRAGMA(omp simd reduction(+ : var))
#define LEVI__OMP_SIMD_SUM2(a, b) LEVI__PRAGMA(omp simd reduction(+ : a, b))
#else
#define LEVI__OMP_FOR_IF(cond)
#define LEVI__OMP_SIMD
#define LEVI__OMP_SIMD_SUM(var)
#define LEVI__OMP_SIMD_SUM2(a, b)
#endif

/* glibc >= 2.35 ships x86-64 vector variants of erff and expf in libmvec (linked through
 * libm's linker script) but declares them only under -ffast-math. Declaring them here lets
 * `omp simd` loops call them; their error is within a few ulp of the scalar functions (the
 * tests bound GELU against erf in double). */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(_OPENMP) && !defined(__clang__)
#if __GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35)
extern float erff(float) __attribute__((simd("notinbranch")));
extern float expf(float) __attribute__((simd("notinbranch")));
#endif
#endif

/* Element counts above which an element-wise loop is threaded. Memory-bound loops (copies,
 * adds) gain little from a second core and need more work to break even than GELU's erff. */
#define LEVI__PAR_MEM (1 << 16)
#define LEVI__PAR_MATH (1 << 13)
/* Element-wise loops run over fixed blocks: threads take whole blocks and the compiler
 * vectorises inside one, so which elements share a vector (and, with libmvec, which variant
 * computes them) never depends on the thread count. A multiple of every vector width. */
#define LEVI__BLOCK 4096
#define LEVI__BLOCK_END(b0, n) ((b0) + LEVI__BLOCK < (n) ? (b0) + LEVI__BLOCK : (n))

static int levi__to_int(int64_t n, const char *what) {
    LEVI_ASSERT(n >= 0 && n <= INT_MAX, what);
    return (int)n;
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
 * Activations */

#define LEVI__SQRT1_2 0.70710678118654752440f
#define LEVI__INV_SQRT_2PI 0.39894228040143267794f

void levi_gelu_forward(float *out, const float *inp, int64_t n) {
    // out[n] = x * Phi(x), the exact (erf) form BERT was trained with, not the tanh
    // approximation: the two differ by up to ~1e-3, enough to move golden tests.
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MATH)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) {
            float x = inp[i];
            out[i] = 0.5f * x * (1.0f + erff(x * LEVI__SQRT1_2));
        }
    }
}

void levi_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n) {
    // d/dx x*Phi(x) = Phi(x) + x * phi(x)
    if (!dinp) return;
    LEVI__OMP_FOR_IF(n > LEVI__PAR_MATH)
    for (int64_t b0 = 0; b0 < n; b0 += LEVI__BLOCK) {
        int64_t b1 = LEVI__BLOCK_END(b0, n);
        LEVI__OMP_SIMD
        for (int64_t i = b0; i < b1; i++) {
            float x = inp[i];
            float cdf = 0.5f * (1.0f + erff(x * LEVI__SQRT1_2));
            float pdf = LEVI__INV_SQRT_2PI * expf(-0.5f * x * x);
            dinp[i] += dout[i] * (cdf + x * pdf);
        }
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
    float keep = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < n; i++) mask[i] = levi_rng_uniform(rng) < p ? 0.0f : keep;
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
 * Threading choice: parallel over the B*NH (batch, head) pairs with OpenMP, and inside each
 * pair plain loops rather than levi_gemm. The installed OpenBLAS is the pthreads build: called
 * from inside an OpenMP region it would start its own threads on top of ours, and its thread
 * count is a process-wide setting we cannot change per call without racing the other threads.
 * (Measured on one core, B=64 S=64 NH=12 HD=32: sgemm per head plus a scalar softmax ran at
 * 16 GFLOP/s, these loops at ~25-30.)
 *
 * Every product here is one shape: a tile of up to 16 consecutive floats that accumulates
 * coef[t] * x[t, tile] over t (levi__tile). A 16-wide tile stays in vector registers for the
 * whole sum: one load and one FMA per step, no horizontal sums (dot products over HD = 32 are
 * too short for those) and no store/load round trip per step (short axpy loops spent most of
 * their time in loop overhead and in such round trips). Scores need keys along the tile, so
 * each pair first copies its K (forward) or V (backward) head into a per-thread transposed
 * scratch [HD, S]. Query rows go in blocks of LEVI__ATTN_ROWS so that probabilities (or
 * their gradients) for a block are at hand without an S x S buffer.
 *
 * Masking: a padded key (mask == 0) scores -inf, so its probability is exactly 0, as Hugging
 * Face's additive finfo.min bias gives after the exp underflows. A query row whose keys are all
 * padded (cannot happen with a valid [CLS]) gets uniform probabilities 1/S over all keys, which
 * is what Hugging Face computes there (every score is finfo.min, softmax of equal values), and
 * never NaN. */

#define LEVI__ATTN_ROWS 16
/* Per-thread stack scratch, in floats: a transposed head [HD, S] plus a block of rows
 * [LEVI__ATTN_ROWS, S]. 256 KiB covers BERT's longest input (S = 512, HD = 64). */
#define LEVI__ATTN_MAX_SCRATCH (1 << 16)
#define LEVI__ATTN_SCRATCH(S, HD) ((int64_t)(S) * ((HD) + LEVI__ATTN_ROWS))
#define LEVI__TILE 16

/* dst[0..w) (+)= sum_{t < n} coef[t * cs] * x[t * xs + 0..w), w <= LEVI__TILE. The w == 16
 * branch has constant bounds so the compiler keeps the tile in registers, in four partial
 * sums over t mod 4: one running sum would wait on the FMA latency at every step. */
static void levi__tile(float *dst, int accumulate, const float *coef, int64_t cs, const float *x,
                       int64_t xs, int n, int w) {
    float acc[LEVI__TILE];
    if (w == LEVI__TILE) {
        float a1[LEVI__TILE], a2[LEVI__TILE], a3[LEVI__TILE];
        for (int c = 0; c < LEVI__TILE; c++) {
            acc[c] = accumulate ? dst[c] : 0.0f;
            a1[c] = a2[c] = a3[c] = 0.0f;
        }
        int t = 0;
        for (; t + 4 <= n; t += 4) {
            const float c0 = coef[t * cs], c1 = coef[(t + 1) * cs];
            const float c2 = coef[(t + 2) * cs], c3 = coef[(t + 3) * cs];
            const float *x0 = x + t * xs, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
            for (int c = 0; c < LEVI__TILE; c++) {
                acc[c] += c0 * x0[c];
                a1[c] += c1 * x1[c];
                a2[c] += c2 * x2[c];
                a3[c] += c3 * x3[c];
            }
        }
        for (; t < n; t++) {
            const float a = coef[t * cs], *xr = x + t * xs;
            for (int c = 0; c < LEVI__TILE; c++) acc[c] += a * xr[c];
        }
        for (int c = 0; c < LEVI__TILE; c++) dst[c] = (acc[c] + a1[c]) + (a2[c] + a3[c]);
        return;
    }
    for (int c = 0; c < w; c++) acc[c] = accumulate ? dst[c] : 0.0f;
    for (int t = 0; t < n; t++) {
        const float a = coef[t * cs], *xr = x + t * xs;
        for (int c = 0; c < w; c++) acc[c] += a * xr[c];
    }
    for (int c = 0; c < w; c++) dst[c] = acc[c];
}

/* dst[0..len) (+)= sum_t coef[t * cs] * x[t * xs + 0..len), tile by tile. */
static void levi__tiles(float *dst, int accumulate, const float *coef, int64_t cs, const float *x,
                        int64_t xs, int n, int len) {
    for (int c0 = 0; c0 < len; c0 += LEVI__TILE)
        levi__tile(dst + c0, accumulate, coef, cs, x + c0, xs, n,
                   len - c0 < LEVI__TILE ? len - c0 : LEVI__TILE);
}

/* xt[HD, S] = the head columns of x[S, D] (row stride D), transposed. */
static void levi__head_transpose(float *xt, const float *x, int S, int D, int HD) {
    for (int d = 0; d < HD; d++)
        for (int j = 0; j < S; j++) xt[(int64_t)d * S + j] = x[(int64_t)j * D + d];
}

/* One query row: row[S] = softmax over valid keys of scale * q_i . k_j (kt = K^T [HD, S]). */
static void levi__attn_probs_row(float *row, const float *qi, const float *kt, const int32_t *m,
                                 int S, int HD, float scale) {
    levi__tiles(row, 0, qi, 1, kt, S, HD, S);
    float mx = -INFINITY;
    for (int j = 0; j < S; j++) {
        float s = m[j] ? row[j] * scale : -INFINITY;
        row[j] = s;
        mx = s > mx ? s : mx;
    }
    if (mx == -INFINITY) { // every key padded
        for (int j = 0; j < S; j++) row[j] = 1.0f / (float)S;
        return;
    }
    float sum = 0.0f;
    LEVI__OMP_SIMD_SUM(sum)
    for (int j = 0; j < S; j++) {
        float e = expf(row[j] - mx); // exp(-inf) == 0 for padded keys
        row[j] = e;
        sum += e;
    }
    float inv = 1.0f / sum; // sum >= 1: the max term contributes exp(0)
    LEVI__OMP_SIMD
    for (int j = 0; j < S; j++) row[j] *= inv;
}

void levi_attention_forward(float *out, float *probs, const float *q, const float *k,
                            const float *v, const int32_t *mask, int B, int S, int NH, int HD,
                            float scale) {
    // q, k, v, out [B,S,NH*HD]; mask [B,S]; probs [B,NH,S,S] or NULL
    LEVI_ASSERT(S > 0 && HD > 0 && LEVI__ATTN_SCRATCH(S, HD) <= LEVI__ATTN_MAX_SCRATCH,
                "attention: S * (HD + 16) floats must fit the per-thread scratch (S <= 512 at "
                "HD = 64)");
    LEVI_ASSERT(mask, "attention needs a key mask (all ones when nothing is padded)");
    const int D = NH * HD;
    const int BH = B * NH;
    LEVI__OMP_FOR_IF(BH > 1 && (int64_t)BH * S * S * HD > (1 << 16))
    for (int bh = 0; bh < BH; bh++) {
        int b = bh / NH, h = bh % NH;
        int64_t base = (int64_t)b * S * D + (int64_t)h * HD;
        const float *qb = q + base, *vb = v + base;
        float *ob = out + base;
        const int32_t *m = mask + (int64_t)b * S;
        float scratch[LEVI__ATTN_SCRATCH(S, HD)];
        float *kt = scratch, *own_rows = scratch + (int64_t)S * HD;
        levi__head_transpose(kt, k + base, S, D, HD);
        for (int i0 = 0; i0 < S; i0 += LEVI__ATTN_ROWS) {
            int nr = S - i0 < LEVI__ATTN_ROWS ? S - i0 : LEVI__ATTN_ROWS;
            float *rows = probs ? probs + ((int64_t)bh * S + i0) * S : own_rows;
            for (int r = 0; r < nr; r++) {
                float *row = rows + (int64_t)r * S;
                levi__attn_probs_row(row, qb + (int64_t)(i0 + r) * D, kt, m, S, HD, scale);
                // out_i = sum_j p_ij v_j
                levi__tiles(ob + (int64_t)(i0 + r) * D, 0, row, 1, vb, D, S, HD);
            }
        }
    }
}

void levi_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *probs,
                             const float *q, const float *k, const float *v, int B, int S, int NH,
                             int HD, float scale) {
    // dout, q, k, v and the gradients [B,S,NH*HD]; probs [B,NH,S,S] from the forward.
    // Each (b, h) pair writes only its own rows and head columns of dq, dk, dv, so the pairs
    // run in parallel without races; within a pair the sums run in a fixed order.
    LEVI_ASSERT(probs, "attention backward needs the probs saved by forward");
    LEVI_ASSERT(S > 0 && HD > 0 && LEVI__ATTN_SCRATCH(S, HD) <= LEVI__ATTN_MAX_SCRATCH,
                "attention: S * (HD + 16) floats must fit the per-thread scratch (S <= 512 at "
                "HD = 64)");
    if (!dq && !dk && !dv) return;
    const int D = NH * HD;
    const int BH = B * NH;
    LEVI__OMP_FOR_IF(BH > 1 && (int64_t)BH * S * S * HD > (1 << 15))
    for (int bh = 0; bh < BH; bh++) {
        int b = bh / NH, h = bh % NH;
        int64_t base = (int64_t)b * S * D + (int64_t)h * HD;
        const float *qb = q + base, *kb = k + base, *dob = dout + base;
        const float *pb = probs + (int64_t)bh * S * S;
        if (dv) // dv_j += sum_i p_ij dout_i (column j of P as coefficients)
            for (int j = 0; j < S; j++)
                levi__tiles(dv + base + (int64_t)j * D, 1, pb + j, S, dob, D, S, HD);
        if (!dq && !dk) continue;
        float scratch[LEVI__ATTN_SCRATCH(S, HD)];
        float *vt = scratch, *ds = scratch + (int64_t)S * HD;
        levi__head_transpose(vt, v + base, S, D, HD);
        for (int i0 = 0; i0 < S; i0 += LEVI__ATTN_ROWS) {
            int nr = S - i0 < LEVI__ATTN_ROWS ? S - i0 : LEVI__ATTN_ROWS;
            for (int r = 0; r < nr; r++) {
                // Softmax backward: ds_ij = p_ij * (dp_ij - sum_j' p_ij' dp_ij') * scale with
                // dp_ij = dout_i . v_j; padded keys (p == 0) get ds == 0.
                const int i = i0 + r;
                const float *p = pb + (int64_t)i * S;
                float *dsr = ds + (int64_t)r * S;
                levi__tiles(dsr, 0, dob + (int64_t)i * D, 1, vt, S, HD, S);
                float c = 0.0f;
                LEVI__OMP_SIMD_SUM(c)
                for (int j = 0; j < S; j++) c += p[j] * dsr[j];
                LEVI__OMP_SIMD
                for (int j = 0; j < S; j++) dsr[j] = p[j] * (dsr[j] - c) * scale;
                if (dq) // dq_i += sum_j ds_ij k_j
                    levi__tiles(dq + base + (int64_t)i * D, 1, dsr, 1, kb, D, S, HD);
            }
            if (dk) // dk_j += sum_{i in block} ds_ij q_i
                for (int j = 0; j < S; j++)
                    levi__tiles(dk + base + (int64_t)j * D, 1, ds + j, S, qb + (int64_t)i0 * D, D,
                                nr, HD);
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
