/* levi feature cache: runs a frozen BERT-family encoder ONCE over a list of texts and keeps
 * the pooled hidden states of every requested layer on disk, so later runs (other methods,
 * other seeds, other layer subsets) reuse them instead of re-running the backbone.
 *
 * For: building a cache (resumable, chunked, interruptible), loading it back as one float
 * array [n, n_layers, dim] in the caller's text order, and computing its key.
 * Not for: training the backbone (features are frozen), data loading or text rendering (the
 * caller passes texts), printing (progress goes to a callback).
 *
 * Layout on disk: <root>/<first 16 hex of the key>/
 *   manifest.json              every key field written out in full, n, layers, dim, dtype,
 *                              chunk size, format and levi versions, and after a complete
 *                              build the token statistics ("complete": true);
 *   chunk-00000.safetensors    "features" [rows, n_layers, dim] (F16 or F32) and "rows"
 *   chunk-00001.safetensors    [rows] I64, the original text indices of those rows; metadata
 *   ...                        "key" (full key) and "chunk" (its index). Written atomically.
 * The key is the SHA-256 of a canonical text listing: the SHA-256 of model.safetensors,
 * config.json, vocab.txt and tokenizer_config.json (or "absent"), the SHA-256 over the texts
 * in order (each followed by a NUL byte), n, the pooling, max_len, the layer set and the
 * on-disk dtype. Any change of model, texts, pooling, layers, max_len or dtype gives a
 * different key, so stale features are never reused. A manifest in the key's directory that
 * disagrees with the request (a 16-hex prefix collision, a hand-edited file) is an error.
 *
 * Extraction order: texts are tokenised, stably sorted by token count (longest first), and cut
 * into chunks of chunk_size consecutive sorted texts; each chunk runs in batches of
 * batch_size consecutive texts padded to the longest one in the batch, so padding is small.
 * A chunk already on disk and valid is skipped: an interrupted build resumes where it
 * stopped and produces the same bytes as an uninterrupted one (same batch size and thread
 * count; the chunk contents do not depend on which run computed them).
 *
 * Ownership: levi_features.data is allocated by levi_featcache_load and released with
 * levi_features_free. Texts and params are borrowed for the duration of a call.
 */
#ifndef LEVI_FEATCACHE_H
#define LEVI_FEATCACHE_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LEVI_FEATCACHE_MAX_LAYERS 64 /* hidden states (embedding output + layers) per cache */
#define LEVI_FEATCACHE_FORMAT_VERSION 1
#define LEVI_FEATCACHE_PATH_MAX 4096

typedef enum {
    LEVI_POOL_MEAN = 0, /* mean over the valid tokens, as sentence-transformers does */
    LEVI_POOL_CLS = 1   /* the hidden state of the first token ([CLS]) */
} levi_pooling;
const char *levi_pooling_name(levi_pooling p); /* "mean", "cls" */
/* Parses "mean" or "cls"; returns -1 when unknown. */
int levi_pooling_parse(const char *name);

/* Progress of a build: texts done (reused chunks included) of total, and the encoder's
 * throughput so far in real (unpadded) tokens per second over the computed batches. Called
 * once when encoding starts (done = texts of reused chunks, rate 0) and after every batch;
 * never on a cache hit. */
typedef void (*levi_featcache_progress_fn)(void *user, int64_t done, int64_t total,
                                           double tokens_per_s);

typedef struct levi_featcache_params {
    levi_pooling pooling; /* LEVI_POOL_MEAN */
    /* Hidden states to store: 0 is the embedding output, l in 1..L the output of encoder
     * layer l-1. n_layers == 0 means all of 0..L (the default), so any subset can be trained
     * on later without re-extracting. Listed layers are sorted; duplicates are an error. */
    int n_layers;
    int layers[LEVI_FEATCACHE_MAX_LAYERS];
    int max_len;      /* 128: tokens per text incl. [CLS] and [SEP]; longer texts are truncated
                         (counted in levi_featcache_info.truncated); <= the model's positions */
    int batch_size;   /* 64 texts per forward */
    int chunk_size;   /* 2048 texts per chunk file; an existing cache keeps its own */
    int threads;      /* > 0: levi_set_num_threads(threads) before extracting; <= 0: as is */
    levi_dtype dtype; /* LEVI_F16 (half the disk and page cache) or LEVI_F32 */
    /* Interruption: when *stop becomes nonzero (checked between batches), the chunk being
     * computed is dropped (at most one chunk of work is lost), every finished chunk stays on
     * disk, and the build returns LEVI_ERR_INTERRUPTED. NULL: never. */
    volatile int *stop;
    /* > 0: compute at most this many chunks in this call, then return LEVI_ERR_INTERRUPTED
     * as if stopped (bounds one run's work; used to test resumption). 0: no limit. */
    int max_chunks;
    levi_featcache_progress_fn progress; /* NULL: none; called after every batch */
    void *progress_user;
} levi_featcache_params;

/* {MEAN, all layers, max_len 128, batch 64, chunk 2048, threads 0, F16, no stop, no limit,
 * no progress}. */
levi_featcache_params levi_featcache_default_params(void);

/* What a build did and what the cache holds. */
typedef struct levi_featcache_info {
    char key[65];                      /* full key, 64 lowercase hex */
    char dir[LEVI_FEATCACHE_PATH_MAX]; /* <root>/<key[0..16)> */
    int64_t n;                         /* texts (rows) */
    int n_layers;                      /* stored hidden states */
    int layers[LEVI_FEATCACHE_MAX_LAYERS];
    int dim;          /* hidden size */
    levi_dtype dtype; /* on disk */
    int chunk_size, n_chunks;
    int chunks_computed;     /* by this call (0 on a cache hit) */
    int chunks_reused;       /* found complete and valid on disk */
    int chunks_repaired;     /* found on disk but invalid (damaged), recomputed */
    int64_t tokens;          /* tokens of all texts after truncation, [CLS] and [SEP] included */
    int64_t truncated;       /* texts longer than max_len tokens */
    int max_tokens;          /* longest text after truncation */
    int64_t texts_computed;  /* texts run through the encoder by this call */
    int64_t tokens_computed; /* their real tokens */
    int64_t padded_tokens;   /* token slots run through the encoder by this call (padding incl.) */
    double seconds;          /* wall time of this call's encoder work */
} levi_featcache_info;

/* Computes the key (and the layer set / dim it implies) without running the encoder: hashes
 * the model files and the texts. info may be NULL; when given, key, dir (under root, which
 * may be NULL), n, layers, dim, dtype are filled. Errors: LEVI_ERR_IO for unreadable model
 * files, LEVI_ERR_FORMAT for a bad config.json, LEVI_ERR_ARG for bad params. */
levi_status levi_featcache_key(const char *root, const char *model_dir, const char *const *texts,
                               int64_t n, const levi_featcache_params *params, char key_hex[65],
                               levi_featcache_info *info, levi_error *err);

/* Makes sure the cache for (model_dir, texts, params) under root is complete: creates it,
 * resumes it, or (a hit) only checks that its manifest matches and its chunk files exist.
 * texts: n >= 1 NUL-terminated UTF-8 strings (invalid UTF-8 is LEVI_ERR_FORMAT naming the
 * text index and byte). info (may be NULL) receives what was done; on LEVI_ERR_INTERRUPTED it
 * tells how many chunks are on disk. Other errors: LEVI_ERR_NUMERIC when a feature is not
 * finite or (F16) overflows the half range, plus those of levi_featcache_key, the tokenizer,
 * the encoder and file writing. */
levi_status levi_featcache_build(const char *root, const char *model_dir, const char *const *texts,
                                 int64_t n, const levi_featcache_params *params,
                                 levi_featcache_info *info, levi_error *err);

/* Features loaded from a cache, in the original text order. */
typedef struct levi_features {
    int64_t n;
    int n_layers;
    int layers[LEVI_FEATCACHE_MAX_LAYERS]; /* hidden-state index of each stored slot */
    int dim;
    float *data; /* [n, n_layers, dim]; owned, release with levi_features_free */
} levi_features;

/* Loads the complete cache in directory dir (levi_featcache_info.dir). layers/n_layers
 * select hidden states to load, in the given order (NULL/0: all stored ones); a layer the
 * cache does not hold is LEVI_ERR_NOT_FOUND. Everything is validated: the manifest (fields,
 * versions, that its key matches its fields, "complete"), and every chunk (key metadata,
 * dtype, shape, rows in range, every row covered exactly once, finite values); an error
 * names the file and what was expected vs found. On error *out is left empty. */
levi_status levi_featcache_load(const char *dir, const int *layers, int n_layers,
                                levi_features *out, levi_error *err);

/* Frees f->data and zeroes *f. NULL is a no-op. */
void levi_features_free(levi_features *f);

/* F32 -> F16 (IEEE binary16), round to nearest even, overflow to infinity, NaN kept: the
 * conversion the cache uses, for writers of half-precision outputs. */
void levi_featcache_to_f16(const float *src, uint16_t *dst, int64_t n);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_FEATCACHE_H */
