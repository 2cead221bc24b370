/* Implementation of include/levi/core.h: errors, checked allocation, tensor descriptors,
 * arenas, the parameter table, RNG, threads, GEMM, files and hashing.
 * Not for: kernels (ops.c), file formats (safetensors.c), anything model-specific. */
#include "levi/core.h"
#include "levi/safetensors.h" /* levi_bf16_to_f32 */

#include <cblas.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- errors ------------------------------------------------------------------------- */

levi_status levi_errorf(levi_error *err, levi_status st, const char *fmt, ...) {
    if (err) {
        err->status = st;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return st;
}

levi_status levi_error_prefix(levi_error *err, const char *fmt, ...) {
    if (!err) return LEVI_OK;
    char prefix[LEVI_ERROR_MSG_MAX], old[LEVI_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    old[sizeof old - 1] = 0;
    size_t np = strnlen(prefix, sizeof err->msg - 1);
    memcpy(err->msg, prefix, np);
    size_t room = sizeof err->msg - 1 - np, no = strnlen(old, room);
    memcpy(err->msg + np, old, no);
    err->msg[np + no] = 0;
    return err->status;
}

const char *levi_status_name(levi_status st) {
    switch (st) {
    case LEVI_OK:
        return "ok";
    case LEVI_ERR_IO:
        return "I/O error";
    case LEVI_ERR_FORMAT:
        return "format error";
    case LEVI_ERR_SHAPE:
        return "shape error";
    case LEVI_ERR_NOMEM:
        return "out of memory";
    case LEVI_ERR_ARG:
        return "bad argument";
    case LEVI_ERR_NUMERIC:
        return "numeric error";
    case LEVI_ERR_INTERRUPTED:
        return "interrupted";
    case LEVI_ERR_NOT_FOUND:
        return "not found";
    }
    return "unknown status";
}

void levi__assert_fail(const char *file, int line, const char *cond, const char *hint) {
    fprintf(stderr, "levi: internal error at %s:%d: assertion `%s` failed: %s\n", file, line, cond,
            hint ? hint : "");
    fflush(stderr);
    abort();
}

/* ---- sizes and allocation ------------------------------------------------------------ */

int levi_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

int levi_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

void *levi_xmalloc(size_t bytes) {
    void *p = NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes || posix_memalign(&p, 64, rounded ? rounded : 64) != 0) {
        fprintf(stderr, "levi: out of memory allocating %zu bytes\n", bytes);
        abort();
    }
    return p;
}

void *levi_xcalloc(size_t n, size_t size) {
    size_t bytes;
    LEVI_ASSERT(levi_mul_size(n, size, &bytes), "allocation size overflows");
    void *p = levi_xmalloc(bytes);
    memset(p, 0, bytes);
    return p;
}

void levi_free(void *p) {
    free(p);
}

/* ---- tensor descriptors -------------------------------------------------------------- */

size_t levi_dtype_size(levi_dtype dt) {
    switch (dt) {
    case LEVI_F32:
        return 4;
    case LEVI_F16:
        return 2;
    case LEVI_BF16:
        return 2;
    case LEVI_I32:
        return 4;
    case LEVI_I64:
        return 8;
    case LEVI_U8:
        return 1;
    }
    return 0;
}

const char *levi_dtype_name(levi_dtype dt) {
    switch (dt) {
    case LEVI_F32:
        return "F32";
    case LEVI_F16:
        return "F16";
    case LEVI_BF16:
        return "BF16";
    case LEVI_I32:
        return "I32";
    case LEVI_I64:
        return "I64";
    case LEVI_U8:
        return "U8";
    }
    return "?";
}

int64_t levi_tensor_numel(const levi_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

void levi_tensor_set_shape(levi_tensor *t, int ndim, const int64_t *shape) {
    LEVI_ASSERT(ndim >= 0 && ndim <= LEVI_MAX_DIMS, "tensor rank must be in [0, LEVI_MAX_DIMS]");
    t->ndim = ndim;
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        t->shape[i] = shape[i];
        t->strides[i] = stride;
        stride *= shape[i];
    }
    for (int i = ndim; i < LEVI_MAX_DIMS; i++) t->shape[i] = 1, t->strides[i] = 1;
}

/* ---- arena --------------------------------------------------------------------------- */

struct levi_arena {
    char *base;
    size_t used, cap;
};

levi_arena *levi_arena_init(size_t capacity_bytes) {
    levi_arena *a = levi_xmalloc(sizeof *a);
    a->base = levi_xmalloc(capacity_bytes ? capacity_bytes : 64);
    a->used = 0;
    a->cap = capacity_bytes;
    return a;
}

void levi_arena_free(levi_arena *a) {
    if (!a) return;
    free(a->base);
    free(a);
}

void *levi_arena_alloc(levi_arena *a, size_t bytes) {
    size_t start = (a->used + 63) & ~(size_t)63;
    LEVI_ASSERT(start >= a->used && bytes <= a->cap && start <= a->cap - bytes,
                "arena exhausted: its sizing function under-counted");
    a->used = start + bytes;
    return a->base + start;
}

float *levi_arena_floats(levi_arena *a, size_t n) {
    size_t bytes;
    LEVI_ASSERT(levi_mul_size(n, sizeof(float), &bytes), "arena request overflows");
    float *p = levi_arena_alloc(a, bytes);
    memset(p, 0, bytes);
    return p;
}

void levi_arena_reset(levi_arena *a) {
    a->used = 0;
}
size_t levi_arena_used(const levi_arena *a) {
    return a->used;
}
size_t levi_arena_capacity(const levi_arena *a) {
    return a->cap;
}

/* ---- parameter table ----------------------------------------------------------------- */

void levi_params_init(levi_params *p) {
    memset(p, 0, sizeof *p);
}

void levi_params_free(levi_params *p) {
    if (!p) return;
    free(p->items);
    free(p->data);
    free(p->grad);
    memset(p, 0, sizeof *p);
}

int levi_params_add(levi_params *p, const char *name, int ndim, const int64_t *shape) {
    LEVI_ASSERT(p->data == NULL, "levi_params_add after levi_params_alloc");
    LEVI_ASSERT(ndim >= 1 && ndim <= LEVI_MAX_DIMS, "parameter rank must be 1..LEVI_MAX_DIMS");
    LEVI_ASSERT(strlen(name) < LEVI_NAME_MAX, "parameter name too long");
    LEVI_ASSERT(levi_params_find(p, name) < 0, "duplicate parameter name");
    if (p->count == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 32;
        levi_param *items = realloc(p->items, (size_t)p->cap * sizeof *items);
        LEVI_ASSERT(items != NULL, "out of memory growing the parameter table");
        p->items = items;
    }
    levi_param *it = &p->items[p->count];
    memset(it, 0, sizeof *it);
    snprintf(it->name, sizeof it->name, "%s", name);
    it->ndim = ndim;
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        LEVI_ASSERT(shape[i] > 0, "parameter dimensions must be positive");
        it->shape[i] = shape[i];
        LEVI_ASSERT(levi_mul_size(numel, (size_t)shape[i], &numel), "parameter size overflows");
    }
    /* Each tensor starts on a 16-float (64-byte) boundary so kernels see aligned rows. */
    it->offset = (p->numel + 15) & ~(size_t)15;
    it->numel = numel;
    it->trainable = 1;
    p->numel = it->offset + numel;
    return p->count++;
}

void levi_params_alloc(levi_params *p) {
    LEVI_ASSERT(p->data == NULL, "levi_params_alloc called twice");
    p->data = levi_xcalloc(p->numel ? p->numel : 1, sizeof(float));
    p->grad = levi_xcalloc(p->numel ? p->numel : 1, sizeof(float));
}

int levi_params_find(const levi_params *p, const char *name) {
    for (int i = 0; i < p->count; i++)
        if (strcmp(p->items[i].name, name) == 0) return i;
    return -1;
}

float *levi_params_data(const levi_params *p, int index) {
    LEVI_ASSERT(index >= 0 && index < p->count && p->data, "bad parameter index or not allocated");
    return p->data + p->items[index].offset;
}

float *levi_params_grad(const levi_params *p, int index) {
    LEVI_ASSERT(index >= 0 && index < p->count && p->grad, "bad parameter index or not allocated");
    return p->grad + p->items[index].offset;
}

void levi_params_zero_grad(levi_params *p) {
    if (p->grad) memset(p->grad, 0, p->numel * sizeof(float));
}

int levi_params_set_trainable(levi_params *p, const char *prefix, int trainable) {
    size_t n = strlen(prefix);
    int matched = 0;
    for (int i = 0; i < p->count; i++)
        if (strncmp(p->items[i].name, prefix, n) == 0) {
            p->items[i].trainable = trainable;
            matched++;
        }
    return matched;
}

size_t levi_params_count_trainable(const levi_params *p) {
    size_t n = 0;
    for (int i = 0; i < p->count; i++)
        if (p->items[i].trainable) n += p->items[i].numel;
    return n;
}

levi_tensor levi_params_tensor(const levi_params *p, int index) {
    LEVI_ASSERT(index >= 0 && index < p->count, "bad parameter index");
    levi_tensor t;
    memset(&t, 0, sizeof t);
    snprintf(t.name, sizeof t.name, "%s", p->items[index].name);
    t.dtype = LEVI_F32;
    levi_tensor_set_shape(&t, p->items[index].ndim, p->items[index].shape);
    t.data = p->data ? p->data + p->items[index].offset : NULL;
    return t;
}

/* ---- RNG: xoshiro256** seeded by splitmix64 ------------------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void levi_rng_seed(levi_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

/* One xoshiro256** step on a state; inlined into loops that keep a local copy of it. */
static inline uint64_t rng_next(uint64_t s[4]) {
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* [0, 1) from the top 24 bits of a draw: exact in a float. */
static inline float rng_u01(uint64_t x) {
    return (float)(x >> 40) * (1.0f / 16777216.0f);
}

uint64_t levi_rng_u64(levi_rng *r) {
    return rng_next(r->s);
}

uint32_t levi_rng_below(levi_rng *r, uint32_t n) {
    LEVI_ASSERT(n > 0, "levi_rng_below(0)");
    /* Lemire's multiply-shift with rejection: unbiased. */
    uint64_t m = (uint64_t)(uint32_t)(levi_rng_u64(r) >> 32) * n;
    uint32_t lo = (uint32_t)m;
    if (lo < n) {
        uint32_t threshold = (uint32_t)(-n) % n;
        while (lo < threshold) {
            m = (uint64_t)(uint32_t)(levi_rng_u64(r) >> 32) * n;
            lo = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

float levi_rng_uniform(levi_rng *r) {
    return rng_u01(rng_next(r->s));
}

/* levi_rng_dropout's loop for one choice of outputs (the flags are constants where it is
 * inlined, so each variant is a plain loop); the state lives in a local copy, in registers. */
static inline void rng_dropout_loop(levi_rng *r, size_t n, float p, float *mask, float *x,
                                    int has_mask, int has_x) {
    uint64_t s[4] = {r->s[0], r->s[1], r->s[2], r->s[3]};
    const float keep = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++) {
        const float f = rng_u01(rng_next(s)) < p ? 0.0f : keep;
        if (has_mask) mask[i] = f;
        if (has_x) x[i] *= f;
    }
    memcpy(r->s, s, sizeof s);
}

void levi_rng_dropout(levi_rng *r, size_t n, float p, float *mask, float *x) {
    LEVI_ASSERT(p >= 0.0f && p < 1.0f, "levi_rng_dropout: p must be in [0, 1)");
    if (mask && x)
        rng_dropout_loop(r, n, p, mask, x, 1, 1);
    else if (mask)
        rng_dropout_loop(r, n, p, mask, NULL, 1, 0);
    else if (x)
        rng_dropout_loop(r, n, p, NULL, x, 0, 1);
    else
        rng_dropout_loop(r, n, p, NULL, NULL, 0, 0); // the draws only: the stream moves on
}

float levi_rng_normal(levi_rng *r) {
    double u1 = ((double)(levi_rng_u64(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double u2 = (double)(levi_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void levi_rng_shuffle_i64(levi_rng *r, int64_t *a, int64_t n) {
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(levi_rng_u64(r) % (uint64_t)(i + 1));
        int64_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

levi_rng levi_rng_split(levi_rng *r) {
    levi_rng child;
    levi_rng_seed(&child, levi_rng_u64(r));
    return child;
}

/* ---- threads ------------------------------------------------------------------------- */

static int g_threads = 1;

void levi_set_num_threads(int n) {
    if (n <= 0) {
        const char *env = getenv("OMP_NUM_THREADS");
        long c = env ? strtol(env, NULL, 10) : 0;
        if (c <= 0) c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    g_threads = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
    /* The team's other threads (created now or kept from before) never take asynchronous
     * signals: those go to the calling thread and its alternate stack (levi_signal_handler).
     * Faults (SIGSEGV and the like) stay with the thread that caused them. */
#pragma omp parallel num_threads(n)
    if (omp_get_thread_num() != 0) {
        sigset_t set;
        sigfillset(&set);
        sigdelset(&set, SIGSEGV), sigdelset(&set, SIGBUS), sigdelset(&set, SIGFPE);
        sigdelset(&set, SIGILL), sigdelset(&set, SIGTRAP), sigdelset(&set, SIGABRT);
        pthread_sigmask(SIG_BLOCK, &set, NULL);
    }
#endif
    openblas_set_num_threads(n);
}

levi_status levi_signal_handler(int sig, void (*fn)(int), levi_error *err) {
    static _Thread_local void *alt; /* one per thread, kept for the process's life */
    if (!alt) {
        size_t size = SIGSTKSZ > 65536 ? (size_t)SIGSTKSZ : 65536;
        stack_t ss = {.ss_sp = malloc(size), .ss_size = size, .ss_flags = 0};
        if (!ss.ss_sp) return levi_errorf(err, LEVI_ERR_NOMEM, "signal stack: out of memory");
        if (sigaltstack(&ss, NULL) != 0) {
            free(ss.ss_sp);
            return levi_errorf(err, LEVI_ERR_IO, "sigaltstack: %s", strerror(errno));
        }
        alt = ss.ss_sp;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0)
        return levi_errorf(err, LEVI_ERR_ARG, "signal %d: %s", sig, strerror(errno));
    return LEVI_OK;
}

int levi_get_num_threads(void) {
    return g_threads;
}

/* ---- GEMM ----------------------------------------------------------------------------
 * Two BLAS back ends. On this project's CPUs (AVX-512) oneDNN's JIT sgemm runs the model's
 * GEMMs 10-15% faster than OpenBLAS on one core and more on two; OpenBLAS keeps the products
 * with a narrow output or a short inner dimension (per-head attention, 64 x 64 x 32; output
 * layers with N < 16), where its call overhead is lower and oneDNN's matrix-vector path
 * rounds differently with two threads.
 * A row of C must not depend on how many other rows were computed with it (a text's features
 * are the same in any batch, a prediction is the same at any evaluation batch size): the back
 * end is chosen from N and K only, and oneDNN, which uses a different kernel below 16 rows,
 * gets at least 16 (the rest zero). Measured with oneDNN 2.6 on 11 shapes x 4 transposes x
 * 1-4096 rows x 1-2 threads: every row bit-identical (tests/test_core.c checks it). OpenBLAS
 * is not: below some M*N*K it switches to other kernels (a regression head's output, N = 1,
 * K = 256, rounded differently at 26 of 40 batch sizes), so the small products with op(A) =
 * A (forward passes) go through gemm_rows, one fixed loop per row; OpenBLAS keeps the
 * op(A) = A^T ones (weight gradients, whose rows are not examples). */

/* Products with N < GEMM_SMALL_N or N*K < GEMM_SMALL_NK are small: never oneDNN's. */
enum { GEMM_SMALL_N = 16, GEMM_SMALL_NK = 1 << 14 };

#ifdef LEVI_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.h>
enum { GEMM_UNSET = -1, GEMM_OPENBLAS = 0, GEMM_ONEDNN = 1 };
static int g_gemm = GEMM_UNSET;
enum { ONEDNN_MIN_N = GEMM_SMALL_N, ONEDNN_MIN_NK = GEMM_SMALL_NK, ONEDNN_MIN_M = 16 };

/* C = alpha op(A) op(B) + beta C through oneDNN with M < ONEDNN_MIN_M rows padded. */
static int onednn_small_m(char ta, char tb, int M, int N, int K, float alpha, const float *A,
                          int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    enum { P = ONEDNN_MIN_M };
    float *a = calloc((size_t)P * K, sizeof(float)), *c = calloc((size_t)P * N, sizeof(float));
    int ok = a && c;
    if (ok) {
        if (ta == 'N')
            for (int i = 0; i < M; i++) memcpy(a + (size_t)i * K, A + (size_t)i * lda, K * 4u);
        else
            for (int k = 0; k < K; k++) memcpy(a + (size_t)k * P, A + (size_t)k * lda, M * 4u);
        if (beta != 0.0f)
            for (int i = 0; i < M; i++) memcpy(c + (size_t)i * N, C + (size_t)i * ldc, N * 4u);
        ok = dnnl_sgemm(ta, tb, P, N, K, alpha, a, ta == 'N' ? K : P, B, ldb, beta, c, N) ==
             dnnl_success;
    }
    if (ok)
        for (int i = 0; i < M; i++) memcpy(C + (size_t)i * ldc, c + (size_t)i * N, N * 4u);
    free(a), free(c);
    return ok;
}
#else
enum { GEMM_UNSET = -1, GEMM_OPENBLAS = 0 };
static int g_gemm = GEMM_OPENBLAS;
#endif

/* C = alpha A op(B) + beta C row by row, each row by the same loop whatever M and the thread
 * count: a dot product per output with 8 partial sums over k (op(B) = B^T), or an axpy over
 * k into a block of 64 outputs (op(B) = B). For products small enough that OpenBLAS would
 * have taken its small-matrix kernels; speed is not the point here. */
static void gemm_rows(int tb, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc) {
#pragma omp parallel for schedule(static) if ((int64_t)M * N * K > (1 << 18))
    for (int i = 0; i < M; i++) {
        const float *a = A + (size_t)i * lda;
        float *c = C + (size_t)i * ldc;
        if (tb) {
            for (int j = 0; j < N; j++) {
                const float *b = B + (size_t)j * ldb;
                float s[8] = {0};
                int k = 0;
                for (; k + 8 <= K; k += 8)
                    for (int q = 0; q < 8; q++) s[q] += a[k + q] * b[k + q];
                for (; k < K; k++) s[k % 8] += a[k] * b[k];
                const float dot = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
                c[j] = alpha * dot + (beta == 0.0f ? 0.0f : beta * c[j]);
            }
        } else {
            for (int j0 = 0; j0 < N; j0 += 64) {
                const int nj = N - j0 < 64 ? N - j0 : 64;
                float acc[64] = {0};
                for (int k = 0; k < K; k++) {
                    const float ak = a[k], *b = B + (size_t)k * ldb + j0;
                    for (int j = 0; j < nj; j++) acc[j] += ak * b[j];
                }
                for (int j = 0; j < nj; j++)
                    c[j0 + j] = alpha * acc[j] + (beta == 0.0f ? 0.0f : beta * c[j0 + j]);
            }
        }
    }
}

levi_status levi_set_gemm_backend(const char *name, levi_error *err) {
    if (!name || !strcmp(name, "openblas")) {
        g_gemm = GEMM_OPENBLAS;
        return LEVI_OK;
    }
    if (!strcmp(name, "onednn")) {
#ifdef LEVI_HAVE_ONEDNN
        g_gemm = GEMM_ONEDNN;
        return LEVI_OK;
#else
        return levi_errorf(err, LEVI_ERR_ARG, "GEMM back end 'onednn': this build has no oneDNN");
#endif
    }
    return levi_errorf(err, LEVI_ERR_ARG, "GEMM back end '%s': expected onednn or openblas", name);
}

static void gemm_pick_default(void) {
#ifdef LEVI_HAVE_ONEDNN
    const char *env = getenv("LEVI_GEMM");
    g_gemm = (env && !strcmp(env, "openblas")) ? GEMM_OPENBLAS : GEMM_ONEDNN;
#endif
}

const char *levi_gemm_backend(void) {
    if (g_gemm == GEMM_UNSET) gemm_pick_default();
    return g_gemm == GEMM_OPENBLAS ? "openblas" : "onednn";
}

void levi_gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc) {
    if (M == 0 || N == 0) return;
#ifdef LEVI_HAVE_ONEDNN
    if (g_gemm == GEMM_UNSET) gemm_pick_default();
    if (g_gemm == GEMM_ONEDNN && N >= ONEDNN_MIN_N && (int64_t)N * K >= ONEDNN_MIN_NK) {
        char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
        if (M >= ONEDNN_MIN_M
                ? dnnl_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) == dnnl_success
                : onednn_small_m(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
            return;
    }
#endif
    if (!trans_a && (N < GEMM_SMALL_N || (int64_t)N * K < GEMM_SMALL_NK)) {
        gemm_rows(trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- packed weights (levi_wpack) ------------------------------------------------------
 * oneDNN's matmul primitive with the weights in the layout it asks for (format "any"),
 * reordered once per levi_wpack_set, and the row count M a runtime value, so one primitive
 * serves every batch. Two primitives per shape: beta = 0, and beta = 1 as a "sum" post-op.
 * Checked like levi_gemm (tests/test_core.c): every row bit-identical whatever the number of
 * rows computed with it (from 16 up; fewer are padded: one row alone takes another kernel)
 * and at 1 and 2 threads. */
struct levi_wpack {
    int N, K;
    const float *w; /* the caller's W, for the levi_gemm path */
#ifdef LEVI_HAVE_ONEDNN
    dnnl_primitive_t mm[2]; /* beta 0, beta 1; NULL: levi_gemm only */
    dnnl_primitive_t reorder;
    dnnl_memory_t packed;
    dnnl_memory_desc_t w_md; /* W as given: [K, N] with strides (1, K) */
#endif
};

#ifdef LEVI_HAVE_ONEDNN
static dnnl_engine_t g_dnnl_engine;
static dnnl_stream_t g_dnnl_stream;
static pthread_once_t g_dnnl_once = PTHREAD_ONCE_INIT;
static void dnnl_make_engine(void) {
    if (dnnl_engine_create(&g_dnnl_engine, dnnl_cpu, 0) != dnnl_success ||
        dnnl_stream_create(&g_dnnl_stream, g_dnnl_engine, dnnl_stream_default_flags) !=
            dnnl_success)
        g_dnnl_engine = NULL, g_dnnl_stream = NULL;
}

/* The two matmul primitives and the weight reorder of p; on any failure p stays on the
 * levi_gemm path (a CPU oneDNN has no kernel for is not an error). */
static void wpack_build(levi_wpack *p) {
    pthread_once(&g_dnnl_once, dnnl_make_engine);
    if (!g_dnnl_engine) return;
    dnnl_memory_desc_t a_md, w_any, c_md;
    dnnl_dims_t ad = {DNNL_RUNTIME_DIM_VAL, p->K}, wd = {p->K, p->N},
                cd = {DNNL_RUNTIME_DIM_VAL, p->N};
    if (dnnl_memory_desc_init_by_tag(&a_md, 2, ad, dnnl_f32, dnnl_ab) != dnnl_success ||
        dnnl_memory_desc_init_by_tag(&p->w_md, 2, wd, dnnl_f32, dnnl_ba) != dnnl_success ||
        dnnl_memory_desc_init_by_tag(&w_any, 2, wd, dnnl_f32, dnnl_format_tag_any) !=
            dnnl_success ||
        dnnl_memory_desc_init_by_tag(&c_md, 2, cd, dnnl_f32, dnnl_ab) != dnnl_success)
        return;
    dnnl_matmul_desc_t md;
    if (dnnl_matmul_desc_init(&md, &a_md, &w_any, NULL, &c_md) != dnnl_success) return;
    dnnl_primitive_desc_t pd[2] = {NULL, NULL}, rpd = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t sum = NULL;
    int ok = dnnl_primitive_desc_create(&pd[0], &md, NULL, g_dnnl_engine, NULL) == dnnl_success &&
             dnnl_primitive_attr_create(&attr) == dnnl_success &&
             dnnl_post_ops_create(&sum) == dnnl_success &&
             dnnl_post_ops_append_sum(sum, 1.0f) == dnnl_success &&
             dnnl_primitive_attr_set_post_ops(attr, sum) == dnnl_success &&
             dnnl_primitive_desc_create(&pd[1], &md, attr, g_dnnl_engine, NULL) == dnnl_success;
    const dnnl_memory_desc_t *w0 =
        ok ? dnnl_primitive_desc_query_md(pd[0], dnnl_query_weights_md, 0) : NULL;
    const dnnl_memory_desc_t *w1 =
        ok ? dnnl_primitive_desc_query_md(pd[1], dnnl_query_weights_md, 0) : NULL;
    // Both primitives read the one packed copy: their layouts must agree.
    ok = ok && w0 && w1 && dnnl_memory_desc_equal(w0, w1) &&
         dnnl_memory_create(&p->packed, w0, g_dnnl_engine, DNNL_MEMORY_ALLOCATE) == dnnl_success &&
         dnnl_reorder_primitive_desc_create(&rpd, &p->w_md, g_dnnl_engine, w0, g_dnnl_engine,
                                            NULL) == dnnl_success &&
         dnnl_primitive_create(&p->reorder, rpd) == dnnl_success &&
         dnnl_primitive_create(&p->mm[0], pd[0]) == dnnl_success &&
         dnnl_primitive_create(&p->mm[1], pd[1]) == dnnl_success;
    if (!ok) {
        for (int i = 0; i < 2; i++)
            if (p->mm[i]) dnnl_primitive_destroy(p->mm[i]), p->mm[i] = NULL;
        if (p->reorder) dnnl_primitive_destroy(p->reorder), p->reorder = NULL;
        if (p->packed) dnnl_memory_destroy(p->packed), p->packed = NULL;
    }
    for (int i = 0; i < 2; i++)
        if (pd[i]) dnnl_primitive_desc_destroy(pd[i]);
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    if (sum) dnnl_post_ops_destroy(sum);
    if (attr) dnnl_primitive_attr_destroy(attr);
}

/* C[M,N] (+)= A W^T through primitive mm; M >= 1. */
static int wpack_run(const levi_wpack *p, dnnl_primitive_t mm, int M, const float *A, float *C) {
    dnnl_memory_desc_t a_md, c_md;
    dnnl_dims_t ad = {M, p->K}, cd = {M, p->N};
    dnnl_memory_t a = NULL, c = NULL;
    int ok = dnnl_memory_desc_init_by_tag(&a_md, 2, ad, dnnl_f32, dnnl_ab) == dnnl_success &&
             dnnl_memory_desc_init_by_tag(&c_md, 2, cd, dnnl_f32, dnnl_ab) == dnnl_success &&
             dnnl_memory_create(&a, &a_md, g_dnnl_engine, (void *)A) == dnnl_success &&
             dnnl_memory_create(&c, &c_md, g_dnnl_engine, C) == dnnl_success;
    if (ok) {
        dnnl_exec_arg_t args[3] = {
            {DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, p->packed}, {DNNL_ARG_DST, c}};
        ok = dnnl_primitive_execute(mm, g_dnnl_stream, 3, args) == dnnl_success &&
             dnnl_stream_wait(g_dnnl_stream) == dnnl_success;
    }
    if (a) dnnl_memory_destroy(a);
    if (c) dnnl_memory_destroy(c);
    return ok;
}
#endif

levi_wpack *levi_wpack_new(int N, int K) {
    LEVI_ASSERT(N > 0 && K > 0, "levi_wpack_new: N and K must be positive");
    levi_wpack *p = levi_xmalloc(sizeof *p);
    memset(p, 0, sizeof *p);
    p->N = N, p->K = K;
#ifdef LEVI_HAVE_ONEDNN
    if (g_gemm == GEMM_UNSET) gemm_pick_default();
    if (g_gemm == GEMM_ONEDNN && N >= ONEDNN_MIN_N && (int64_t)N * K >= ONEDNN_MIN_NK)
        wpack_build(p);
#endif
    return p;
}

void levi_wpack_set(levi_wpack *p, const float *W) {
    LEVI_ASSERT(p && W, "levi_wpack_set needs a pack and weights");
    p->w = W;
#ifdef LEVI_HAVE_ONEDNN
    if (!p->mm[0]) return;
    dnnl_memory_t w = NULL;
    int ok = dnnl_memory_create(&w, &p->w_md, g_dnnl_engine, (void *)W) == dnnl_success;
    if (ok) {
        dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, w}, {DNNL_ARG_TO, p->packed}};
        ok = dnnl_primitive_execute(p->reorder, g_dnnl_stream, 2, args) == dnnl_success &&
             dnnl_stream_wait(g_dnnl_stream) == dnnl_success;
    }
    if (w) dnnl_memory_destroy(w);
    LEVI_ASSERT(ok, "levi_wpack_set: oneDNN's weight reorder failed");
#endif
}

void levi_wpack_gemm(const levi_wpack *p, int M, const float *A, float beta, float *C) {
    LEVI_ASSERT(p && p->w, "levi_wpack_gemm: levi_wpack_set first");
    LEVI_ASSERT(beta == 0.0f || beta == 1.0f, "levi_wpack_gemm: beta must be 0 or 1");
    if (M <= 0) return;
#ifdef LEVI_HAVE_ONEDNN
    if (p->mm[0] && g_gemm == GEMM_ONEDNN) {
        dnnl_primitive_t mm = p->mm[beta != 0.0f];
        int ok;
        if (M >= ONEDNN_MIN_M) {
            ok = wpack_run(p, mm, M, A, C);
        } else { // padded to ONEDNN_MIN_M rows, as levi_gemm does
            const size_t K = (size_t)p->K, N = (size_t)p->N;
            float *a = levi_xmalloc(ONEDNN_MIN_M * K * sizeof(float));
            float *c = levi_xmalloc(ONEDNN_MIN_M * N * sizeof(float));
            memset(a, 0, ONEDNN_MIN_M * K * sizeof(float));
            memset(c, 0, ONEDNN_MIN_M * N * sizeof(float));
            memcpy(a, A, (size_t)M * K * sizeof(float));
            if (beta != 0.0f) memcpy(c, C, (size_t)M * N * sizeof(float));
            ok = wpack_run(p, mm, ONEDNN_MIN_M, a, c);
            if (ok) memcpy(C, c, (size_t)M * N * sizeof(float));
            levi_free(a), levi_free(c);
        }
        LEVI_ASSERT(ok, "levi_wpack_gemm: oneDNN's matmul failed");
        return;
    }
#endif
    levi_gemm(0, 1, M, p->N, p->K, 1.0f, A, p->K, p->w, p->K, beta, C, p->N);
}

void levi_wpack_free(levi_wpack *p) {
    if (!p) return;
#ifdef LEVI_HAVE_ONEDNN
    for (int i = 0; i < 2; i++)
        if (p->mm[i]) dnnl_primitive_destroy(p->mm[i]);
    if (p->reorder) dnnl_primitive_destroy(p->reorder);
    if (p->packed) dnnl_memory_destroy(p->packed);
#endif
    levi_free(p);
}

/* ---- bfloat16 products (levi_gemm_bf16) ----------------------------------------------
 * op(A) and op(B) rounded to bfloat16 (to nearest, ties to even), products summed in f32:
 * what mixed-precision training does with its matrix products. oneDNN's matmul primitive runs
 * them with the CPU's bfloat16 dot-product instructions (AVX512_BF16, AMX) where it has them:
 * measured on this project's Zen 4, one core, at the LEVI heads' shapes (200 x 256 x 384 and
 * the like, all four transposes): 209-225 GFLOP/s against 105-115 for f32. The operands are
 * converted on each call (stored as given; transposes are strides of the primitive), and a
 * primitive is created once per shape and kept (a small table, round-robin replacement).
 * Without oneDNN, or where it has no primitive, the rounded operands go through levi_gemm: the
 * same products, summed in another order. With the OpenBLAS back end chosen (levi_gemm's
 * LEVI_GEMM=openblas, levi_set_gemm_backend) the rounded operands go that way too. */
static inline uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r); /* NaN stays */
}

float levi_bf16_round(float x) {
    return levi_bf16_to_f32(bf16_bits(x));
}

/* dst[r * cols + c] = bf16(src[r * ld + c]): a stored rows x cols matrix made dense. */
static void bf16_pack(uint16_t *dst, const float *src, int rows, int cols, int ld) {
    for (int r = 0; r < rows; r++) {
        const float *s = src + (size_t)r * ld;
        uint16_t *d = dst + (size_t)r * cols;
#pragma omp simd
        for (int c = 0; c < cols; c++) d[c] = bf16_bits(s[c]);
    }
}

static uint16_t *g_bf16_buf[2];
static size_t g_bf16_cap[2];
static pthread_mutex_t g_bf16_lock = PTHREAD_MUTEX_INITIALIZER;

static uint16_t *bf16_scratch(int i, size_t n) {
    if (g_bf16_cap[i] < n) {
        levi_free(g_bf16_buf[i]);
        g_bf16_buf[i] = levi_xmalloc(n * sizeof(uint16_t));
        g_bf16_cap[i] = n;
    }
    return g_bf16_buf[i];
}

#ifdef LEVI_HAVE_ONEDNN
enum { BF16_PRIMS = 32 };
typedef struct {
    int M, N, K, ta, tb, ldc;
    float alpha, beta;
    dnnl_primitive_t p;
} bf16_prim;
static bf16_prim g_bf16_prims[BF16_PRIMS];
static int g_bf16_next;

/* The dense bf16 copies as oneDNN sees them: op(A) [M,K] and op(B) [K,N] by strides, C
 * [M,N] with row stride ldc. */
static int bf16_mds(int M, int N, int K, int ta, int tb, int ldc, dnnl_memory_desc_t *a,
                    dnnl_memory_desc_t *b, dnnl_memory_desc_t *c) {
    dnnl_dims_t ad = {M, K}, bd = {K, N}, cd = {M, N};
    dnnl_dims_t as = {ta ? 1 : K, ta ? M : 1}, bs = {tb ? 1 : N, tb ? K : 1}, cs = {ldc, 1};
    return dnnl_memory_desc_init_by_strides(a, 2, ad, dnnl_bf16, as) == dnnl_success &&
           dnnl_memory_desc_init_by_strides(b, 2, bd, dnnl_bf16, bs) == dnnl_success &&
           dnnl_memory_desc_init_by_strides(c, 2, cd, dnnl_f32, cs) == dnnl_success;
}

static dnnl_primitive_t bf16_prim_get(int M, int N, int K, int ta, int tb, int ldc, float alpha,
                                      float beta) {
    for (int i = 0; i < BF16_PRIMS; i++) {
        const bf16_prim *e = &g_bf16_prims[i];
        if (e->p && e->M == M && e->N == N && e->K == K && e->ta == ta && e->tb == tb &&
            e->ldc == ldc && e->alpha == alpha && e->beta == beta)
            return e->p;
    }
    pthread_once(&g_dnnl_once, dnnl_make_engine);
    if (!g_dnnl_engine) return NULL;
    dnnl_memory_desc_t a, b, c;
    dnnl_matmul_desc_t md;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t ops = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t p = NULL;
    int ok = bf16_mds(M, N, K, ta, tb, ldc, &a, &b, &c) &&
             dnnl_matmul_desc_init(&md, &a, &b, NULL, &c) == dnnl_success &&
             dnnl_primitive_attr_create(&attr) == dnnl_success &&
             (alpha == 1.0f ||
              dnnl_primitive_attr_set_output_scales(attr, 1, 0, &alpha) == dnnl_success) &&
             (beta == 0.0f || (dnnl_post_ops_create(&ops) == dnnl_success &&
                               dnnl_post_ops_append_sum(ops, beta) == dnnl_success &&
                               dnnl_primitive_attr_set_post_ops(attr, ops) == dnnl_success)) &&
             dnnl_primitive_desc_create(&pd, &md, attr, g_dnnl_engine, NULL) == dnnl_success &&
             dnnl_primitive_create(&p, pd) == dnnl_success;
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (ops) dnnl_post_ops_destroy(ops);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (!ok) return NULL;
    bf16_prim *e = &g_bf16_prims[g_bf16_next];
    g_bf16_next = (g_bf16_next + 1) % BF16_PRIMS;
    if (e->p) dnnl_primitive_destroy(e->p);
    *e = (bf16_prim){M, N, K, ta, tb, ldc, alpha, beta, p};
    return p;
}

static int bf16_run(dnnl_primitive_t p, int M, int N, int K, int ta, int tb, const uint16_t *a,
                    const uint16_t *b, float *C, int ldc) {
    dnnl_memory_desc_t amd, bmd, cmd;
    dnnl_memory_t am = NULL, bm = NULL, cm = NULL;
    int ok = bf16_mds(M, N, K, ta, tb, ldc, &amd, &bmd, &cmd) &&
             dnnl_memory_create(&am, &amd, g_dnnl_engine, (void *)a) == dnnl_success &&
             dnnl_memory_create(&bm, &bmd, g_dnnl_engine, (void *)b) == dnnl_success &&
             dnnl_memory_create(&cm, &cmd, g_dnnl_engine, C) == dnnl_success;
    if (ok) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
        ok = dnnl_primitive_execute(p, g_dnnl_stream, 3, args) == dnnl_success &&
             dnnl_stream_wait(g_dnnl_stream) == dnnl_success;
    }
    if (am) dnnl_memory_destroy(am);
    if (bm) dnnl_memory_destroy(bm);
    if (cm) dnnl_memory_destroy(cm);
    return ok;
}
#endif

void levi_gemm_bf16(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    int ta = trans_a != 0, tb = trans_b != 0;
    int ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N; /* as stored */
    pthread_mutex_lock(&g_bf16_lock);
    uint16_t *a = bf16_scratch(0, (size_t)ar * ac), *b = bf16_scratch(1, (size_t)br * bc);
    bf16_pack(a, A, ar, ac, lda);
    bf16_pack(b, B, br, bc, ldb);
    int done = 0;
#ifdef LEVI_HAVE_ONEDNN
    if (g_gemm == GEMM_UNSET) gemm_pick_default();
    if (K > 0 && g_gemm == GEMM_ONEDNN) {
        dnnl_primitive_t p = bf16_prim_get(M, N, K, ta, tb, ldc, alpha, beta);
        done = p && bf16_run(p, M, N, K, ta, tb, a, b, C, ldc);
    }
#endif
    if (!done) {
        float *fa = levi_xmalloc(((size_t)ar * ac + (size_t)br * bc + 1) * sizeof(float));
        float *fb = fa + (size_t)ar * ac;
        for (size_t i = 0; i < (size_t)ar * ac; i++) fa[i] = levi_bf16_to_f32(a[i]);
        for (size_t i = 0; i < (size_t)br * bc; i++) fb[i] = levi_bf16_to_f32(b[i]);
        levi_gemm(ta, tb, M, N, K, alpha, fa, ac, fb, bc, beta, C, ldc);
        levi_free(fa);
    }
    pthread_mutex_unlock(&g_bf16_lock);
}

void levi_gemm_ref(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                   int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0;
            for (int k = 0; k < K; k++) {
                float a = trans_a ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = trans_b ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += (double)a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = (float)(alpha * acc + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
}

/* ---- files --------------------------------------------------------------------------- */

levi_status levi_write_file_atomic(const char *path, const void *data, size_t len,
                                   levi_error *err) {
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= sizeof tmp)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return levi_errorf(err, LEVI_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return levi_errorf(err, LEVI_ERR_IO, "%s: write failed: %s", tmp, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        int e = errno;
        unlink(tmp);
        return levi_errorf(err, LEVI_ERR_IO, "%s: fsync/close failed: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return levi_errorf(err, LEVI_ERR_IO, "%s: rename from %s failed: %s", path, tmp,
                           strerror(e));
    }
    return LEVI_OK;
}

levi_status levi_read_file(const char *path, char **out, size_t *len, levi_error *err) {
    *out = NULL;
    if (len) *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return levi_errorf(err, LEVI_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    }
    for (;;) {
        if (n + 1 >= cap) {
            char *nb = (cap > SIZE_MAX / 2) ? NULL : realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fclose(f);
                return levi_errorf(err, LEVI_ERR_NOMEM, "%s: file too large to read", path);
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return levi_errorf(err, LEVI_ERR_IO, "%s: read failed", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return LEVI_OK;
}

static void hex_digest(const unsigned char *md, char out_hex[65]) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out_hex[2 * i] = hex[md[i] >> 4];
        out_hex[2 * i + 1] = hex[md[i] & 15];
    }
    out_hex[64] = 0;
}

void levi_sha256_hex(const void *data, size_t len, char out_hex[65]) {
    unsigned char md[32];
    unsigned int mdlen = 0;
    LEVI_ASSERT(EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) == 1 && mdlen == 32,
                "OpenSSL SHA-256 failed");
    hex_digest(md, out_hex);
}

levi_status levi_sha256_file(const char *path, char out_hex[65], levi_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return levi_errorf(err, LEVI_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    LEVI_ASSERT(ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1, "OpenSSL init failed");
    static __thread unsigned char buf[1 << 16];
    size_t r;
    while ((r = fread(buf, 1, sizeof buf, f)) > 0) EVP_DigestUpdate(ctx, buf, r);
    int bad = ferror(f);
    fclose(f);
    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    EVP_MD_CTX_free(ctx);
    if (bad) return levi_errorf(err, LEVI_ERR_IO, "%s: read failed", path);
    hex_digest(md, out_hex);
    return LEVI_OK;
}

levi_status levi_mkdirs(const char *path, levi_error *err) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return levi_errorf(err, LEVI_ERR_ARG, "bad directory path");
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return levi_errorf(err, LEVI_ERR_IO, "%s: cannot create directory: %s", buf,
                                   strerror(errno));
            buf[i] = c;
        }
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return levi_errorf(err, LEVI_ERR_IO, "%s: exists and is not a directory", path);
    return LEVI_OK;
}

double levi_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
