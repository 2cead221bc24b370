/* levi core: status codes and error messages, always-on asserts, tensor descriptors,
 * arenas, the parameter table, explicit RNG state, threading and GEMM.
 *
 * This header is the contract of the lowest layer. It knows nothing of models, datasets or
 * methods. Kernels (ops.h) take raw pointers; the descriptors here exist at API boundaries.
 *
 * Ownership: every *_init / *_open returns an object the caller frees with the matching
 * *_free / *_close; *_free(NULL) is a no-op. Pointers returned by accessors are owned by the
 * object they came from and live as long as it does.
 */
#ifndef LEVI_CORE_H
#define LEVI_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------
 * Status and errors. Anything input or the environment can cause returns a levi_status and
 * fills a levi_error the caller owns (never a global). Messages name the file, line, byte
 * offset or field, and what was expected versus found. */
typedef enum {
    LEVI_OK = 0,
    LEVI_ERR_IO = 1,          /* open/read/write/rename failed */
    LEVI_ERR_FORMAT = 2,      /* malformed or hostile file contents */
    LEVI_ERR_SHAPE = 3,       /* shapes or sizes that do not fit together */
    LEVI_ERR_NOMEM = 4,       /* allocation failed or a size overflowed */
    LEVI_ERR_ARG = 5,         /* bad option or parameter value from the user */
    LEVI_ERR_NUMERIC = 6,     /* NaN/Inf where a finite number is required */
    LEVI_ERR_INTERRUPTED = 7, /* stopped by a signal; state saved where possible */
    LEVI_ERR_NOT_FOUND = 8,   /* a named tensor, column or file entry is absent */
} levi_status;

#define LEVI_ERROR_MSG_MAX 1024
typedef struct levi_error {
    levi_status status;
    char msg[LEVI_ERROR_MSG_MAX];
} levi_error;

/* Sets err (if non-NULL) and returns st, so callers can write `return levi_errorf(...)`. */
levi_status levi_errorf(levi_error *err, levi_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefixes an existing message with context ("while loading X: "). Returns err->status. */
levi_status levi_error_prefix(levi_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
const char *levi_status_name(levi_status st);

/* Always-on assert for programmer misuse (never for bad input): prints file:line, the
 * condition and a hint, then aborts. */
#define LEVI_ASSERT(cond, hint)                                                                    \
    do {                                                                                           \
        if (!(cond)) levi__assert_fail(__FILE__, __LINE__, #cond, hint);                           \
    } while (0)
void levi__assert_fail(const char *file, int line, const char *cond, const char *hint)
    __attribute__((noreturn));

/* Checked size arithmetic: return 0 and leave *out untouched on overflow. */
int levi_mul_size(size_t a, size_t b, size_t *out);
int levi_add_size(size_t a, size_t b, size_t *out);

/* malloc/calloc that abort with a clear message: for sizes the program computed itself
 * from already-validated shapes. Sizes that come from files go through levi_mul_size first
 * and return LEVI_ERR_NOMEM instead. 64-byte aligned; release with levi_free. */
void *levi_xmalloc(size_t bytes);
void *levi_xcalloc(size_t n, size_t size);
void levi_free(void *p);

/* ---------------------------------------------------------------------------------------
 * Tensor descriptor, used at API boundaries (safetensors, parameter tables, model outputs).
 * Row-major and contiguous unless strides say otherwise (strides in elements). */
typedef enum { LEVI_F32 = 0, LEVI_F16, LEVI_BF16, LEVI_I32, LEVI_I64, LEVI_U8 } levi_dtype;
#define LEVI_MAX_DIMS 4
#define LEVI_NAME_MAX 128
typedef struct levi_tensor {
    char name[LEVI_NAME_MAX];
    levi_dtype dtype;
    int ndim;
    int64_t shape[LEVI_MAX_DIMS];
    int64_t strides[LEVI_MAX_DIMS];
    void *data; /* not owned by the descriptor */
} levi_tensor;

size_t levi_dtype_size(levi_dtype dt);
const char *levi_dtype_name(levi_dtype dt);
int64_t levi_tensor_numel(const levi_tensor *t);
/* Fills shape and contiguous strides. ndim <= LEVI_MAX_DIMS. */
void levi_tensor_set_shape(levi_tensor *t, int ndim, const int64_t *shape);

/* ---------------------------------------------------------------------------------------
 * Arena: one allocation per lifetime class (activations of a batch, scratch of a kernel).
 * Sized up front by a pure function; allocation is a pointer bump, 64-byte aligned. Running
 * out is programmer misuse (the sizing function was wrong) and asserts. */
typedef struct levi_arena levi_arena;
levi_arena *levi_arena_init(size_t capacity_bytes);
void levi_arena_free(levi_arena *a);
void *levi_arena_alloc(levi_arena *a, size_t bytes);
float *levi_arena_floats(levi_arena *a, size_t n); /* zero-filled */
void levi_arena_reset(levi_arena *a);
size_t levi_arena_used(const levi_arena *a);
size_t levi_arena_capacity(const levi_arena *a);

/* ---------------------------------------------------------------------------------------
 * Parameter table: all parameters of a model in ONE float allocation, their gradients in a
 * second of the same layout, each tensor found by its checkpoint key name (the safetensors
 * key), never by position. Built in two phases: levi_params_add() for every tensor (sizing
 * only), then levi_params_alloc() once. Freezing is per tensor. */
typedef struct levi_param {
    char name[LEVI_NAME_MAX];
    int ndim;
    int64_t shape[LEVI_MAX_DIMS];
    size_t offset; /* in floats, into data and grad */
    size_t numel;
    int trainable; /* 1 by default */
    int no_decay;  /* 1: weight decay skips it (biases, norms); set by the model */
} levi_param;

typedef struct levi_params {
    levi_param *items;
    int count, cap;
    size_t numel; /* total floats */
    float *data;  /* numel floats, NULL until alloc */
    float *grad;  /* numel floats, NULL until alloc */
} levi_params;

void levi_params_init(levi_params *p);
void levi_params_free(levi_params *p); /* frees the table and both buffers */
/* Registers a tensor; returns its index. Asserts before alloc and on duplicate names. */
int levi_params_add(levi_params *p, const char *name, int ndim, const int64_t *shape);
void levi_params_alloc(levi_params *p);                       /* data and grad, zero-filled */
int levi_params_find(const levi_params *p, const char *name); /* index or -1 */
float *levi_params_data(const levi_params *p, int index);
float *levi_params_grad(const levi_params *p, int index);
void levi_params_zero_grad(levi_params *p);
/* Sets trainable on every tensor whose name starts with prefix; returns how many matched. */
int levi_params_set_trainable(levi_params *p, const char *prefix, int trainable);
size_t levi_params_count_trainable(const levi_params *p);
/* A descriptor view of parameter `index` (data pointer into p->data). */
levi_tensor levi_params_tensor(const levi_params *p, int index);

/* ---------------------------------------------------------------------------------------
 * Random numbers: explicit state, passed to everything random. xoshiro256** seeded through
 * splitmix64; same seed, same stream on every machine. */
typedef struct levi_rng {
    uint64_t s[4];
} levi_rng;
void levi_rng_seed(levi_rng *r, uint64_t seed);
uint64_t levi_rng_u64(levi_rng *r);
uint32_t levi_rng_below(levi_rng *r, uint32_t n); /* uniform in [0, n), unbiased */
float levi_rng_uniform(levi_rng *r);              /* [0, 1) */
float levi_rng_normal(levi_rng *r);               /* N(0, 1), Box-Muller */
/* n dropout factors from n draws of levi_rng_uniform, the same draws in the same order as n
 * calls make: factor i is 0 when draw i < p, else 1 / (1 - p) (p in [0, 1)). Written to mask
 * and/or multiplied into x (either may be NULL). One call keeps the state in registers: 1.1-1.5
 * ns per element against ~6 ns for a call per element (measured, one core). */
void levi_rng_dropout(levi_rng *r, size_t n, float p, float *mask, float *x);
void levi_rng_shuffle_i64(levi_rng *r, int64_t *a, int64_t n);
/* Independent child stream (for per-thread or per-purpose streams). */
levi_rng levi_rng_split(levi_rng *r);

/* ---------------------------------------------------------------------------------------
 * Threads. One knob for OpenMP, OpenBLAS and oneDNN so they do not oversubscribe the cores.
 * levi's OpenMP threads other than the caller block asynchronous signals (see below). */
void levi_set_num_threads(int n); /* n <= 0: OMP_NUM_THREADS, else all available cores */
int levi_get_num_threads(void);

/* ---------------------------------------------------------------------------------------
 * Signal handlers. oneDNN 2.x's JIT sgemm kernels point the stack register into the heap
 * while they run (oneDNN issue 4845, fixed in 3.11): a handler run on the interrupted stack
 * there writes its frame over heap memory. levi_signal_handler installs fn for sig (no
 * SA_RESTART) to run on an alternate signal stack, allocated once for the calling thread,
 * which must be the one that calls levi_set_num_threads; with levi's other threads blocking
 * asynchronous signals, every handler runs there. A program that links levi and installs
 * handlers itself must use SA_ONSTACK with a sigaltstack in the same way. */
levi_status levi_signal_handler(int sig, void (*fn)(int), levi_error *err);

/* ---------------------------------------------------------------------------------------
 * GEMM, row-major: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
 * op(X) = X^T when trans_x is nonzero. lda/ldb/ldc are row strides of the stored matrices.
 * levi_gemm goes through oneDNN's sgemm for large products and OpenBLAS for small ones (or
 * OpenBLAS only: the build option LEVI_ONEDNN=OFF, the environment variable LEVI_GEMM=openblas
 * read at the first GEMM, or levi_set_gemm_backend); results depend on the shape, the thread
 * count and the back end, nothing else. levi_gemm_ref is the naive loop kept for tests. */
levi_status levi_set_gemm_backend(const char *name, levi_error *err); /* "onednn", "openblas" */
const char *levi_gemm_backend(void);
void levi_gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc);
void levi_gemm_ref(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                   int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* levi_gemm with op(A) and op(B) rounded to bfloat16 (to nearest even) and the products summed
 * in f32 (oneDNN's bfloat16 matmul where the build and the CPU have it: about twice the f32
 * speed on CPUs with AVX512_BF16 or AMX; else, or with the OpenBLAS back end chosen, the
 * rounded operands through levi_gemm).
 * For training's products, where mixed precision is asked for; unlike levi_gemm, a row's
 * result may depend on M. Serialised by a lock: one product at a time per process.
 * levi_bf16_round(x) is x rounded as the operands are. */
void levi_gemm_bf16(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc);
float levi_bf16_round(float x);

/* ---------------------------------------------------------------------------------------
 * Packed weights: C[M,N] = A[M,K] W^T + beta * C (beta 0 or 1; A and C dense, row strides K
 * and N) for one weight matrix W [N,K] applied to many rows. levi_wpack_set takes W: with
 * oneDNN (levi_gemm's rule for the back end and the shape), it reorders W into the blocked
 * layout of oneDNN's matmul kernels, which then skip the per-call packing sgemm does (measured
 * 2-7% faster on the encoder's products, one core); otherwise it only keeps the pointer, which
 * must stay valid while the pack is used, and levi_wpack_gemm is levi_gemm. A row's result
 * depends on N, K, the thread count and the back end only (fewer than 16 rows are padded, as
 * in levi_gemm); it may differ from levi_gemm's in the last bits. Call levi_wpack_set again
 * after W changes: the pack holds a copy. */
typedef struct levi_wpack levi_wpack;
levi_wpack *levi_wpack_new(int N, int K); /* aborts on out-of-memory, like levi_xmalloc */
void levi_wpack_set(levi_wpack *p, const float *W);
void levi_wpack_gemm(const levi_wpack *p, int M, const float *A, float beta, float *C);
void levi_wpack_free(levi_wpack *p);

/* ---------------------------------------------------------------------------------------
 * Files. Atomic write: data goes to "<path>.tmp.<pid>", is fsynced, then renamed over path.
 * levi_read_file reads a whole file (NUL-terminated for convenience; *len excludes the NUL).
 * SHA-256 of a buffer or file, as 64 lowercase hex characters plus NUL. */
levi_status levi_write_file_atomic(const char *path, const void *data, size_t len, levi_error *err);
levi_status levi_read_file(const char *path, char **out, size_t *len, levi_error *err);
void levi_sha256_hex(const void *data, size_t len, char out_hex[65]);
levi_status levi_sha256_file(const char *path, char out_hex[65], levi_error *err);
/* mkdir -p; existing directories are fine. */
levi_status levi_mkdirs(const char *path, levi_error *err);

/* Monotonic wall clock in seconds. */
double levi_now(void);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_CORE_H */
