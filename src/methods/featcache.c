/* Backbone feature cache (include/levi/featcache.h): runs the frozen encoder once over the
 * texts in resumable chunks, stores pooled per-layer hidden states, loads them back in text
 * order with every chunk validated.
 * Not for: training the encoder, rendering texts, or printing (progress is a callback). */
#include "levi/featcache.h"

#include "levi/bert.h"
#include "levi/safetensors.h"
#include "levi/tokenizer.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef LEVI_VERSION_STRING
#define LEVI_VERSION_STRING "0.1.0"
#endif

#define MANIFEST_FORMAT "levi-featcache"
#define CHUNK_FORMAT "levi-featcache-chunk"

/* ---- small helpers ------------------------------------------------------------------- */

const char *levi_pooling_name(levi_pooling p) {
    return p == LEVI_POOL_CLS ? "cls" : "mean";
}

int levi_pooling_parse(const char *name) {
    if (!name) return -1;
    if (strcmp(name, "mean") == 0) return LEVI_POOL_MEAN;
    if (strcmp(name, "cls") == 0) return LEVI_POOL_CLS;
    return -1;
}

levi_featcache_params levi_featcache_default_params(void) {
    levi_featcache_params p;
    memset(&p, 0, sizeof p);
    p.pooling = LEVI_POOL_MEAN;
    p.n_layers = 0;
    p.max_len = 128;
    p.batch_size = 64;
    p.chunk_size = 2048;
    p.threads = 0;
    p.dtype = LEVI_F16;
    return p;
}

void levi_features_free(levi_features *f) {
    if (!f) return;
    free(f->data); /* posix_memalign'd by levi_featcache_load */
    memset(f, 0, sizeof *f);
}

/* Round to nearest even on the bit pattern, so the result does not depend on the FPU or on
 * whether the compiler has F16C: caches written on different machines stay bit-identical. */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {                                   /* below 2^-14: subnormal */
        if (a <= 0x33000000u) return sign;                   /* <= 2^-25 rounds to 0 */
        uint32_t e = a >> 23;
        uint32_t mant = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t m = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t h = ((((a >> 23) - 112) << 10) | ((a >> 13) & 0x3ffu));
    uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* carry into the exponent is right */
    return (uint16_t)(sign | h);
}

void levi_featcache_to_f16(const float *src, uint16_t *dst, int64_t n) {
    LEVI_ASSERT(n >= 0 && (n == 0 || (src && dst)), "levi_featcache_to_f16 needs src and dst");
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

static int path_join(char *out, size_t cap, const char *dir, const char *name) {
    return (size_t)snprintf(out, cap, "%s/%s", dir, name) < cap;
}

static void chunk_name(char *out, size_t cap, int chunk) {
    snprintf(out, cap, "chunk-%05d.safetensors", chunk);
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* ---- key ------------------------------------------------------------------------------ */

/* Everything that determines the stored numbers. dim and chunk size are not in it: dim
 * follows from the model, and chunking changes the layout of the files, not their values. */
typedef struct key_fields {
    char model_sha[65], config_sha[65], vocab_sha[65], tokcfg_sha[65]; /* "absent" allowed */
    char texts_sha[65];
    int64_t n;
    levi_pooling pooling;
    int max_len;
    int n_layers;
    int layers[LEVI_FEATCACHE_MAX_LAYERS];
    levi_dtype dtype;
} key_fields;

/* The canonical text the key hashes. The format version is in it, so a change of format (or
 * of the encoder's numerics, which bumps it) moves caches to new directories. */
static void key_text(const key_fields *k, char *buf, size_t cap) {
    size_t o =
        (size_t)snprintf(buf, cap,
                         "levi-featcache-key v%d\nmodel.safetensors %s\nconfig.json %s\n"
                         "vocab.txt %s\ntokenizer_config.json %s\ntexts %s\nn %lld\n"
                         "pooling %s\nmax_len %d\ndtype %s\nlayers",
                         LEVI_FEATCACHE_FORMAT_VERSION, k->model_sha, k->config_sha, k->vocab_sha,
                         k->tokcfg_sha, k->texts_sha, (long long)k->n,
                         levi_pooling_name(k->pooling), k->max_len, levi_dtype_name(k->dtype));
    for (int i = 0; i < k->n_layers && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%d", i ? "," : " ", k->layers[i]);
    if (o < cap) snprintf(buf + o, cap - o, "\n");
}

static void key_hash(const key_fields *k, char out[65]) {
    char buf[2048];
    key_text(k, buf, sizeof buf);
    levi_sha256_hex(buf, strlen(buf), out);
}

static levi_status hash_model_file(const char *model_dir, const char *name, int optional,
                                   char out[65], levi_error *err) {
    char path[LEVI_FEATCACHE_PATH_MAX];
    if (!path_join(path, sizeof path, model_dir, name))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: model folder path too long", model_dir);
    if (optional && !file_exists(path)) {
        snprintf(out, 65, "absent");
        return LEVI_OK;
    }
    levi_status st = levi_sha256_file(path, out, err);
    if (st != LEVI_OK) levi_error_prefix(err, "model folder: ");
    return st;
}

static levi_status hash_texts(const char *const *texts, int64_t n, char out[65], levi_error *err) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(ctx);
        return levi_errorf(err, LEVI_ERR_NOMEM, "cannot start SHA-256 of the texts");
    }
    for (int64_t i = 0; i < n; i++) {
        if (!texts[i]) {
            EVP_MD_CTX_free(ctx);
            return levi_errorf(err, LEVI_ERR_ARG, "text %lld is NULL", (long long)i);
        }
        /* The NUL after each text keeps ("ab","c") and ("a","bc") apart. */
        EVP_DigestUpdate(ctx, texts[i], strlen(texts[i]) + 1);
    }
    unsigned char md[32];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx, md, &len);
    EVP_MD_CTX_free(ctx);
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = 0;
    return LEVI_OK;
}

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Validates params against the model's config and fills the resolved layer set and dim. */
static levi_status resolve_params(const char *model_dir, const levi_featcache_params *p,
                                  key_fields *k, int *dim, levi_error *err) {
    if (p->pooling != LEVI_POOL_MEAN && p->pooling != LEVI_POOL_CLS)
        return levi_errorf(err, LEVI_ERR_ARG, "pooling: expected mean (0) or cls (1), found %d",
                           (int)p->pooling);
    if (p->dtype != LEVI_F16 && p->dtype != LEVI_F32)
        return levi_errorf(err, LEVI_ERR_ARG, "dtype: expected F16 or F32, found %s",
                           levi_dtype_name(p->dtype));
    if (p->batch_size < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "batch_size: expected >= 1, found %d", p->batch_size);
    if (p->chunk_size < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "chunk_size: expected >= 1, found %d", p->chunk_size);
    if (p->n_layers < 0 || p->n_layers > LEVI_FEATCACHE_MAX_LAYERS)
        return levi_errorf(err, LEVI_ERR_ARG, "n_layers: expected 0..%d, found %d",
                           LEVI_FEATCACHE_MAX_LAYERS, p->n_layers);
    char path[LEVI_FEATCACHE_PATH_MAX];
    if (!path_join(path, sizeof path, model_dir, "config.json"))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: model folder path too long", model_dir);
    levi_bert_config cfg;
    levi_status st = levi_bert_config_load(path, &cfg, err);
    if (st != LEVI_OK) return st;
    if (p->max_len < 2 || p->max_len > cfg.max_pos)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "max_len: expected 2..%d (max_position_embeddings of %s), found %d",
                           cfg.max_pos, path, p->max_len);
    if (p->n_layers == 0) {
        if (cfg.layers + 1 > LEVI_FEATCACHE_MAX_LAYERS)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "%s: %d layers: the cache holds at most %d hidden states; list "
                               "the layers to keep",
                               path, cfg.layers, LEVI_FEATCACHE_MAX_LAYERS);
        k->n_layers = cfg.layers + 1;
        for (int l = 0; l <= cfg.layers; l++) k->layers[l] = l;
    } else {
        k->n_layers = p->n_layers;
        memcpy(k->layers, p->layers, (size_t)p->n_layers * sizeof(int));
        qsort(k->layers, (size_t)k->n_layers, sizeof(int), cmp_int);
        for (int i = 0; i < k->n_layers; i++) {
            if (k->layers[i] < 0 || k->layers[i] > cfg.layers)
                return levi_errorf(err, LEVI_ERR_ARG,
                                   "layers: %d is out of range 0..%d (0 = embedding output, %d = "
                                   "last layer of %s)",
                                   k->layers[i], cfg.layers, cfg.layers, path);
            if (i > 0 && k->layers[i] == k->layers[i - 1])
                return levi_errorf(err, LEVI_ERR_ARG, "layers: %d is listed twice", k->layers[i]);
        }
    }
    k->pooling = p->pooling;
    k->max_len = p->max_len;
    k->dtype = p->dtype;
    *dim = cfg.hidden;
    return LEVI_OK;
}

static levi_status compute_key(const char *root, const char *model_dir, const char *const *texts,
                               int64_t n, const levi_featcache_params *p, key_fields *k,
                               char key[65], int *dim, char *dir, levi_error *err) {
    LEVI_ASSERT(model_dir != NULL && p != NULL, "levi_featcache needs a model folder and params");
    LEVI_ASSERT(n <= 0 || texts != NULL, "levi_featcache needs texts when n > 0");
    memset(k, 0, sizeof *k);
    if (n < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "no texts: expected n >= 1, found %lld",
                           (long long)n);
    levi_status st = resolve_params(model_dir, p, k, dim, err);
    if (st != LEVI_OK) return st;
    if ((st = hash_model_file(model_dir, "model.safetensors", 0, k->model_sha, err)) != LEVI_OK ||
        (st = hash_model_file(model_dir, "config.json", 0, k->config_sha, err)) != LEVI_OK ||
        (st = hash_model_file(model_dir, "vocab.txt", 0, k->vocab_sha, err)) != LEVI_OK ||
        (st = hash_model_file(model_dir, "tokenizer_config.json", 1, k->tokcfg_sha, err)) !=
            LEVI_OK)
        return st;
    if ((st = hash_texts(texts, n, k->texts_sha, err)) != LEVI_OK) return st;
    k->n = n;
    key_hash(k, key);
    if (dir) {
        dir[0] = 0;
        if (root && (size_t)snprintf(dir, LEVI_FEATCACHE_PATH_MAX, "%s/%.16s", root, key) >=
                        LEVI_FEATCACHE_PATH_MAX)
            return levi_errorf(err, LEVI_ERR_ARG, "%s: cache root path too long", root);
    }
    return LEVI_OK;
}

static void fill_info_from_key(levi_featcache_info *info, const key_fields *k, const char *key,
                               const char *dir, int dim) {
    memset(info, 0, sizeof *info);
    memcpy(info->key, key, 65);
    if (dir) snprintf(info->dir, sizeof info->dir, "%s", dir);
    info->n = k->n;
    info->n_layers = k->n_layers;
    memcpy(info->layers, k->layers, sizeof info->layers);
    info->dim = dim;
    info->dtype = k->dtype;
}

levi_status levi_featcache_key(const char *root, const char *model_dir, const char *const *texts,
                               int64_t n, const levi_featcache_params *params, char key_hex[65],
                               levi_featcache_info *info, levi_error *err) {
    key_fields k;
    char key[65] = {0}, dir[LEVI_FEATCACHE_PATH_MAX];
    int dim = 0;
    levi_status st = compute_key(root, model_dir, texts, n, params, &k, key, &dim, dir, err);
    if (st != LEVI_OK) return st;
    if (key_hex) memcpy(key_hex, key, 65);
    if (info) fill_info_from_key(info, &k, key, dir, dim);
    return LEVI_OK;
}

/* ---- manifest ------------------------------------------------------------------------- */

typedef struct manifest {
    key_fields k;
    char key[65];
    int dim, chunk_size, n_chunks, complete;
    int64_t tokens, truncated;
    int max_tokens;
} manifest;

static int n_chunks_of(int64_t n, int chunk_size) {
    return (int)((n + chunk_size - 1) / chunk_size);
}

static levi_status write_manifest(const char *dir, const char *model_dir, const manifest *m,
                                  levi_error *err) {
    char path[LEVI_FEATCACHE_PATH_MAX];
    if (!path_join(path, sizeof path, dir, "manifest.json"))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", dir);
    cJSON *o = cJSON_CreateObject();
    cJSON *layers = cJSON_CreateIntArray(m->k.layers, m->k.n_layers);
    if (!o || !layers) {
        cJSON_Delete(o);
        cJSON_Delete(layers);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    }
    cJSON_AddStringToObject(o, "format", MANIFEST_FORMAT);
    cJSON_AddNumberToObject(o, "format_version", LEVI_FEATCACHE_FORMAT_VERSION);
    cJSON_AddStringToObject(o, "levi_version", LEVI_VERSION_STRING);
    cJSON_AddStringToObject(o, "key", m->key);
    cJSON_AddStringToObject(o, "model_dir", model_dir); /* informational, not in the key */
    cJSON_AddStringToObject(o, "model_sha256", m->k.model_sha);
    cJSON_AddStringToObject(o, "config_sha256", m->k.config_sha);
    cJSON_AddStringToObject(o, "vocab_sha256", m->k.vocab_sha);
    cJSON_AddStringToObject(o, "tokenizer_config_sha256", m->k.tokcfg_sha);
    cJSON_AddStringToObject(o, "texts_sha256", m->k.texts_sha);
    cJSON_AddNumberToObject(o, "n", (double)m->k.n);
    cJSON_AddStringToObject(o, "pooling", levi_pooling_name(m->k.pooling));
    cJSON_AddNumberToObject(o, "max_len", m->k.max_len);
    cJSON_AddItemToObject(o, "layers", layers);
    cJSON_AddStringToObject(o, "dtype", levi_dtype_name(m->k.dtype));
    cJSON_AddNumberToObject(o, "dim", m->dim);
    cJSON_AddNumberToObject(o, "chunk_size", m->chunk_size);
    cJSON_AddNumberToObject(o, "n_chunks", m->n_chunks);
    cJSON_AddStringToObject(o, "chunk_layout",
                            "chunk-%05d.safetensors: features [rows, n_layers, dim] (dtype), rows "
                            "[rows] I64 = original text index of each row");
    cJSON_AddBoolToObject(o, "complete", m->complete);
    if (m->complete) {
        cJSON_AddNumberToObject(o, "tokens", (double)m->tokens);
        cJSON_AddNumberToObject(o, "truncated", (double)m->truncated);
        cJSON_AddNumberToObject(o, "max_tokens", m->max_tokens);
    }
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    if (!text) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    size_t len = strlen(text);
    text[len] = 0;
    char *with_nl = malloc(len + 2);
    if (!with_nl) {
        cJSON_free(text);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    }
    memcpy(with_nl, text, len);
    with_nl[len] = '\n';
    cJSON_free(text);
    levi_status st = levi_write_file_atomic(path, with_nl, len + 1, err);
    free(with_nl);
    return st;
}

static levi_status get_string(const cJSON *o, const char *field, const char *path, char *out,
                              size_t cap, levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, field);
    if (!cJSON_IsString(v) || strlen(v->valuestring) >= cap)
        return levi_errorf(
            err, LEVI_ERR_FORMAT,
            "%s: field \"%s\": expected a string of at most %zu bytes, found %s", path, field,
            cap - 1, v ? (cJSON_IsString(v) ? "a longer string" : "another type") : "nothing");
    snprintf(out, cap, "%s", v->valuestring);
    return LEVI_OK;
}

static levi_status get_int(const cJSON *o, const char *field, const char *path, int64_t lo,
                           int64_t hi, int64_t *out, levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, field);
    if (!cJSON_IsNumber(v))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": expected an integer, found %s",
                           path, field, v ? "another type" : "nothing");
    double d = v->valuedouble;
    if (!(d >= (double)lo && d <= (double)hi) || d != floor(d))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: field \"%s\": expected an integer in %lld..%lld, found %g", path,
                           field, (long long)lo, (long long)hi, d);
    *out = (int64_t)d;
    return LEVI_OK;
}

static int is_hex64(const char *s) {
    if (strlen(s) != 64) return 0;
    for (int i = 0; i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

/* Reads and validates a manifest: every field present and well-typed, and the key it states
 * equal to the hash of the fields it states (a hand-edited field cannot go unnoticed). */
static levi_status read_manifest(const char *dir, manifest *m, levi_error *err) {
    char path[LEVI_FEATCACHE_PATH_MAX];
    if (!path_join(path, sizeof path, dir, "manifest.json"))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", dir);
    memset(m, 0, sizeof *m);
    char *text = NULL;
    size_t len = 0;
    levi_status st = levi_read_file(path, &text, &len, err);
    if (st != LEVI_OK) return st;
    cJSON *o = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: not a JSON object", path);
    }
    char s[128];
    int64_t v = 0;
    if ((st = get_string(o, "format", path, s, sizeof s, err)) != LEVI_OK) goto done;
    if (strcmp(s, MANIFEST_FORMAT) != 0) {
        st =
            levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"format\": expected \"%s\", found \"%s\"",
                        path, MANIFEST_FORMAT, s);
        goto done;
    }
    if ((st = get_int(o, "format_version", path, 0, 1 << 20, &v, err)) != LEVI_OK) goto done;
    if (v != LEVI_FEATCACHE_FORMAT_VERSION) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: field \"format_version\": expected %d, found %lld (written by "
                         "another levi version; delete the directory to rebuild)",
                         path, LEVI_FEATCACHE_FORMAT_VERSION, (long long)v);
        goto done;
    }
    struct {
        const char *field;
        char *out;
    } hashes[] = {{"key", m->key},
                  {"model_sha256", m->k.model_sha},
                  {"config_sha256", m->k.config_sha},
                  {"vocab_sha256", m->k.vocab_sha},
                  {"tokenizer_config_sha256", m->k.tokcfg_sha},
                  {"texts_sha256", m->k.texts_sha}};
    for (size_t i = 0; i < sizeof hashes / sizeof hashes[0]; i++) {
        if ((st = get_string(o, hashes[i].field, path, hashes[i].out, 65, err)) != LEVI_OK)
            goto done;
        int optional_absent = strcmp(hashes[i].field, "tokenizer_config_sha256") == 0 &&
                              strcmp(hashes[i].out, "absent") == 0;
        if (!optional_absent && !is_hex64(hashes[i].out)) {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: field \"%s\": expected 64 lowercase hex digits, found \"%s\"",
                             path, hashes[i].field, hashes[i].out);
            goto done;
        }
    }
    if ((st = get_int(o, "n", path, 1, INT64_C(1) << 52, &v, err)) != LEVI_OK) goto done;
    m->k.n = v;
    if ((st = get_string(o, "pooling", path, s, sizeof s, err)) != LEVI_OK) goto done;
    int pool = levi_pooling_parse(s);
    if (pool < 0) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: field \"pooling\": expected \"mean\" or \"cls\", found \"%s\"", path,
                         s);
        goto done;
    }
    m->k.pooling = (levi_pooling)pool;
    if ((st = get_int(o, "max_len", path, 2, 1 << 30, &v, err)) != LEVI_OK) goto done;
    m->k.max_len = (int)v;
    if ((st = get_string(o, "dtype", path, s, sizeof s, err)) != LEVI_OK) goto done;
    if (strcmp(s, "F16") == 0)
        m->k.dtype = LEVI_F16;
    else if (strcmp(s, "F32") == 0)
        m->k.dtype = LEVI_F32;
    else {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: field \"dtype\": expected \"F16\" or \"F32\", found \"%s\"", path, s);
        goto done;
    }
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(o, "layers");
    int nl = cJSON_IsArray(layers) ? cJSON_GetArraySize(layers) : -1;
    if (nl < 1 || nl > LEVI_FEATCACHE_MAX_LAYERS) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: field \"layers\": expected an array of 1..%d layer indices, found %s",
                         path, LEVI_FEATCACHE_MAX_LAYERS, nl < 0 ? "another type" : "a bad length");
        goto done;
    }
    m->k.n_layers = nl;
    for (int i = 0; i < nl; i++) {
        const cJSON *e = cJSON_GetArrayItem(layers, i);
        double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (!(d >= 0 && d <= 4096) || d != floor(d) || (i > 0 && (int)d <= m->k.layers[i - 1])) {
            st =
                levi_errorf(err, LEVI_ERR_FORMAT,
                            "%s: field \"layers\"[%d]: expected increasing integers >= 0", path, i);
            goto done;
        }
        m->k.layers[i] = (int)d;
    }
    if ((st = get_int(o, "dim", path, 1, 1 << 20, &v, err)) != LEVI_OK) goto done;
    m->dim = (int)v;
    if ((st = get_int(o, "chunk_size", path, 1, 1 << 30, &v, err)) != LEVI_OK) goto done;
    m->chunk_size = (int)v;
    if ((st = get_int(o, "n_chunks", path, 1, 1 << 30, &v, err)) != LEVI_OK) goto done;
    m->n_chunks = (int)v;
    if (m->n_chunks != n_chunks_of(m->k.n, m->chunk_size)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: field \"n_chunks\": expected %d (n %lld / chunk_size %d), found %d",
                         path, n_chunks_of(m->k.n, m->chunk_size), (long long)m->k.n, m->chunk_size,
                         m->n_chunks);
        goto done;
    }
    const cJSON *complete = cJSON_GetObjectItemCaseSensitive(o, "complete");
    if (!cJSON_IsBool(complete)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"complete\": expected true or false",
                         path);
        goto done;
    }
    m->complete = cJSON_IsTrue(complete);
    if (m->complete) {
        if ((st = get_int(o, "tokens", path, 0, INT64_C(1) << 52, &m->tokens, err)) != LEVI_OK ||
            (st = get_int(o, "truncated", path, 0, m->k.n, &m->truncated, err)) != LEVI_OK ||
            (st = get_int(o, "max_tokens", path, 0, m->k.max_len, &v, err)) != LEVI_OK)
            goto done;
        m->max_tokens = (int)v;
    }
    char want[65];
    key_hash(&m->k, want);
    if (strcmp(want, m->key) != 0) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: field \"key\" is %s but the fields it summarises hash to %s (the "
                         "manifest was edited or damaged; delete the directory to rebuild)",
                         path, m->key, want);
        goto done;
    }
done:
    cJSON_Delete(o);
    return st;
}

/* The first key field where an existing manifest and a request differ, for the message. */
static levi_status manifest_mismatch(const char *dir, const manifest *m, const key_fields *k,
                                     const char *key, levi_error *err) {
    const char *field = "key";
    char found[160] = "", want[160] = "";
    const char *pairs[][3] = {{"model_sha256", m->k.model_sha, k->model_sha},
                              {"config_sha256", m->k.config_sha, k->config_sha},
                              {"vocab_sha256", m->k.vocab_sha, k->vocab_sha},
                              {"tokenizer_config_sha256", m->k.tokcfg_sha, k->tokcfg_sha},
                              {"texts_sha256", m->k.texts_sha, k->texts_sha}};
    snprintf(found, sizeof found, "%s", m->key);
    snprintf(want, sizeof want, "%s", key);
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        if (strcmp(pairs[i][1], pairs[i][2]) != 0) {
            field = pairs[i][0];
            snprintf(found, sizeof found, "%s", pairs[i][1]);
            snprintf(want, sizeof want, "%s", pairs[i][2]);
            goto report;
        }
    }
    if (m->k.n != k->n) {
        field = "n";
        snprintf(found, sizeof found, "%lld", (long long)m->k.n);
        snprintf(want, sizeof want, "%lld", (long long)k->n);
    } else if (m->k.pooling != k->pooling) {
        field = "pooling";
        snprintf(found, sizeof found, "%s", levi_pooling_name(m->k.pooling));
        snprintf(want, sizeof want, "%s", levi_pooling_name(k->pooling));
    } else if (m->k.max_len != k->max_len) {
        field = "max_len";
        snprintf(found, sizeof found, "%d", m->k.max_len);
        snprintf(want, sizeof want, "%d", k->max_len);
    } else if (m->k.dtype != k->dtype) {
        field = "dtype";
        snprintf(found, sizeof found, "%s", levi_dtype_name(m->k.dtype));
        snprintf(want, sizeof want, "%s", levi_dtype_name(k->dtype));
    } else if (m->k.n_layers != k->n_layers ||
               memcmp(m->k.layers, k->layers, (size_t)k->n_layers * sizeof(int)) != 0) {
        field = "layers";
        snprintf(found, sizeof found, "%d layers", m->k.n_layers);
        snprintf(want, sizeof want, "%d layers", k->n_layers);
    }
report:
    return levi_errorf(err, LEVI_ERR_FORMAT,
                       "%s/manifest.json disagrees with this request: field \"%s\" is %s, the "
                       "request has %s (a key-prefix collision or a foreign directory; delete it "
                       "or use another cache root)",
                       dir, field, found, want);
}

/* ---- chunks --------------------------------------------------------------------------- */

/* Opens chunk c of a cache and checks everything that does not need the row contents: key
 * metadata, tensor dtypes and shapes. rows_out points at the (possibly unaligned) I64 rows. */
static levi_st_file *open_chunk(const char *dir, const manifest *m, int c, const uint8_t **rows_out,
                                const levi_tensor **feat_out, levi_error *err) {
    char name[64], path[LEVI_FEATCACHE_PATH_MAX];
    chunk_name(name, sizeof name, c);
    if (!path_join(path, sizeof path, dir, name)) {
        levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", dir);
        return NULL;
    }
    int64_t rows = m->k.n - (int64_t)c * m->chunk_size;
    if (rows > m->chunk_size) rows = m->chunk_size;
    levi_st_file *f = levi_st_open(path, err);
    if (!f) {
        levi_error_prefix(err, "feature cache chunk %d of %d: ", c, m->n_chunks);
        return NULL;
    }
    const char *key = levi_st_metadata(f, "key");
    const char *fmt = levi_st_metadata(f, "format");
    const levi_tensor *feat = levi_st_find(f, "features");
    const levi_tensor *rt = levi_st_find(f, "rows");
    if (!fmt || strcmp(fmt, CHUNK_FORMAT) != 0 || !key || strcmp(key, m->key) != 0) {
        levi_errorf(err, LEVI_ERR_FORMAT,
                    "%s: metadata \"format\"/\"key\": expected \"%s\" / %s, found \"%s\" / %s (a "
                    "chunk of another cache?)",
                    path, CHUNK_FORMAT, m->key, fmt ? fmt : "(none)", key ? key : "(none)");
        goto fail;
    }
    if (!feat || !rt) {
        levi_errorf(err, LEVI_ERR_FORMAT, "%s: expected tensors \"features\" and \"rows\", %s",
                    path, feat ? "\"rows\" is missing" : "\"features\" is missing");
        goto fail;
    }
    if (feat->dtype != m->k.dtype || feat->ndim != 3 || feat->shape[0] != rows ||
        feat->shape[1] != m->k.n_layers || feat->shape[2] != m->dim) {
        char found[128] = "";
        size_t o = 0;
        for (int d = 0; d < feat->ndim && o < sizeof found; d++)
            o += (size_t)snprintf(found + o, sizeof found - o, "%s%lld", d ? ", " : "",
                                  (long long)feat->shape[d]);
        levi_errorf(err, LEVI_ERR_FORMAT,
                    "%s: tensor \"features\": expected %s [%lld, %d, %d], found %s [%s]", path,
                    levi_dtype_name(m->k.dtype), (long long)rows, m->k.n_layers, m->dim,
                    levi_dtype_name(feat->dtype), found);
        goto fail;
    }
    if (rt->dtype != LEVI_I64 || rt->ndim != 1 || rt->shape[0] != rows) {
        levi_errorf(err, LEVI_ERR_FORMAT,
                    "%s: tensor \"rows\": expected I64 [%lld], found %s with %d dims, first %lld",
                    path, (long long)rows, levi_dtype_name(rt->dtype), rt->ndim,
                    (long long)(rt->ndim > 0 ? rt->shape[0] : 0));
        goto fail;
    }
    *rows_out = rt->data;
    *feat_out = feat;
    return f;
fail:
    levi_st_close(f);
    return NULL;
}

static int64_t read_i64(const uint8_t *p, int64_t i) {
    int64_t v;
    memcpy(&v, p + 8 * i, sizeof v);
    return v;
}

/* A chunk on disk is reusable when it opens, its header checks out and its rows are exactly
 * the ones this build would put there. */
static int chunk_reusable(const char *dir, const manifest *m, int c, const int64_t *expect_rows) {
    levi_error err = {0};
    const uint8_t *rows = NULL;
    const levi_tensor *feat = NULL;
    levi_st_file *f = open_chunk(dir, m, c, &rows, &feat, &err);
    if (!f) return 0;
    int ok = 1;
    int64_t n_rows = feat->shape[0];
    if (expect_rows)
        for (int64_t i = 0; ok && i < n_rows; i++) ok = read_i64(rows, i) == expect_rows[i];
    levi_st_close(f);
    return ok;
}

/* Removes "<name>.tmp.<pid>" files left by writers that no longer run (killed mid-write). */
static void remove_stale_tmp(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *t = strstr(e->d_name, ".tmp.");
        if (!t) continue;
        char *end = NULL;
        long pid = strtol(t + 5, &end, 10);
        if (pid <= 0 || !end || *end) continue;
        if (pid != (long)getpid() && kill((pid_t)pid, 0) != 0 && errno == ESRCH) {
            char path[LEVI_FEATCACHE_PATH_MAX];
            if (path_join(path, sizeof path, dir, e->d_name)) unlink(path);
        }
    }
    closedir(d);
}

/* ---- build ---------------------------------------------------------------------------- */

/* Token ids of every text, concatenated, with offsets. */
typedef struct tokenized {
    int64_t *offset; /* [n+1] */
    int32_t *ids;
    int64_t total, truncated;
    int max_tokens;
} tokenized;

static void tokenized_free(tokenized *t) {
    free(t->offset);
    free(t->ids);
    memset(t, 0, sizeof *t);
}

static levi_status tokenize_all(const levi_tokenizer *tok, const char *const *texts, int64_t n,
                                int max_len, tokenized *t, levi_error *err) {
    memset(t, 0, sizeof *t);
    size_t cap = (size_t)n * 48 + 16, used = 0;
    t->offset = malloc(((size_t)n + 1) * sizeof(int64_t));
    t->ids = malloc(cap * sizeof(int32_t));
    int32_t *scratch = malloc(((size_t)max_len + 1) * sizeof(int32_t));
    levi_status st = LEVI_OK;
    if (!t->offset || !t->ids || !scratch) {
        st = levi_errorf(err, LEVI_ERR_NOMEM, "out of memory tokenising %lld texts", (long long)n);
        goto done;
    }
    for (int64_t i = 0; i < n; i++) {
        int len = 0;
        /* One more than max_len reveals truncation; cutting the last piece then gives the
         * same ids as truncating at max_len (the first max_len - 2 pieces, then [SEP]). */
        st = levi_tokenizer_encode(tok, texts[i], max_len + 1, scratch, &len, err);
        if (st != LEVI_OK) {
            levi_error_prefix(err, "text %lld: ", (long long)i);
            goto done;
        }
        if (len > max_len) {
            scratch[max_len - 1] = scratch[len - 1];
            len = max_len;
            t->truncated++;
        }
        if (used + (size_t)len > cap) {
            size_t ncap = cap * 2;
            int32_t *nids = realloc(t->ids, ncap * sizeof(int32_t));
            if (!nids) {
                st = levi_errorf(err, LEVI_ERR_NOMEM, "out of memory tokenising text %lld",
                                 (long long)i);
                goto done;
            }
            t->ids = nids;
            cap = ncap;
        }
        t->offset[i] = (int64_t)used;
        memcpy(t->ids + used, scratch, (size_t)len * sizeof(int32_t));
        used += (size_t)len;
        if (len > t->max_tokens) t->max_tokens = len;
    }
    t->offset[n] = (int64_t)used;
    t->total = (int64_t)used;
done:
    free(scratch);
    if (st != LEVI_OK) tokenized_free(t);
    return st;
}

typedef struct len_index {
    int32_t len;
    int64_t index;
} len_index;

/* Longest first: the first batch sizes the encoder's activation arena for the whole run (it
 * regrows whenever a batch needs more), and the ETA errs on the slow side. */
static int cmp_len_index(const void *a, const void *b) {
    const len_index *x = a, *y = b;
    if (x->len != y->len) return (x->len < y->len) - (x->len > y->len);
    return (x->index > y->index) - (x->index < y->index); /* stable: ties keep text order */
}

/* State of one build call. */
typedef struct builder {
    const char *model_dir;
    const levi_featcache_params *p;
    manifest *m;
    const char *dir;
    tokenized tok;
    int64_t *order; /* [n]: text index of sorted position */
    levi_bert *bert;
    int32_t *ids, *mask; /* [batch, max_tokens] */
    float *pooled;       /* [batch, dim] */
    float *chunk_f32;    /* [chunk_size, n_layers, dim] */
    uint16_t *chunk_f16; /* same, when the cache is F16 */
    int64_t done_texts, computed_texts, real_tokens, padded_tokens;
    double compute_seconds;
} builder;

static levi_status compute_chunk(builder *b, int c, levi_error *err) {
    const manifest *m = b->m;
    const levi_featcache_params *p = b->p;
    int64_t first = (int64_t)c * m->chunk_size;
    int64_t rows = m->k.n - first < m->chunk_size ? m->k.n - first : m->chunk_size;
    const int64_t *order = b->order + first;
    int L = m->k.n_layers, H = m->dim;
    levi_bert_forward_params fp = levi_bert_default_forward_params();
    double t0 = levi_now();
    for (int64_t r0 = 0; r0 < rows; r0 += p->batch_size) {
        if (p->stop && *p->stop) {
            b->compute_seconds += levi_now() - t0;
            return levi_errorf(err, LEVI_ERR_INTERRUPTED,
                               "interrupted during chunk %d of %d (finished chunks are kept in "
                               "%s; build again to resume)",
                               c, m->n_chunks, b->dir);
        }
        int B = (int)(rows - r0 < p->batch_size ? rows - r0 : p->batch_size);
        int S = 2;
        for (int i = 0; i < B; i++) {
            int64_t t = order[r0 + i];
            int len = (int)(b->tok.offset[t + 1] - b->tok.offset[t]);
            if (len > S) S = len;
        }
        int32_t pad = 0;
        for (int i = 0; i < B; i++) {
            int64_t t = order[r0 + i];
            int len = (int)(b->tok.offset[t + 1] - b->tok.offset[t]);
            const int32_t *src = b->tok.ids + b->tok.offset[t];
            for (int s = 0; s < S; s++) {
                b->ids[(size_t)i * S + s] = s < len ? src[s] : pad;
                b->mask[(size_t)i * S + s] = s < len;
            }
            b->real_tokens += len;
        }
        b->padded_tokens += (int64_t)B * S;
        levi_status st = levi_bert_forward(b->bert, b->ids, b->mask, NULL, B, S, &fp, err);
        if (st != LEVI_OK) {
            levi_error_prefix(err, "encoding texts %lld..: ", (long long)order[r0]);
            return st;
        }
        for (int j = 0; j < L; j++) {
            int layer = m->k.layers[j];
            if (m->k.pooling == LEVI_POOL_MEAN) {
                levi_bert_meanpool(b->bert, layer, b->pooled);
            } else {
                const float *h = levi_bert_hidden(b->bert, layer);
                for (int i = 0; i < B; i++)
                    memcpy(b->pooled + (size_t)i * H, h + (size_t)i * S * H,
                           (size_t)H * sizeof(float));
            }
            for (int i = 0; i < B; i++)
                memcpy(b->chunk_f32 + ((size_t)(r0 + i) * L + j) * H, b->pooled + (size_t)i * H,
                       (size_t)H * sizeof(float));
        }
        b->done_texts += B;
        b->computed_texts += B;
        if (p->progress) {
            double el = b->compute_seconds + (levi_now() - t0);
            p->progress(p->progress_user, b->done_texts, m->k.n,
                        el > 0 ? (double)b->real_tokens / el : 0);
        }
    }
    b->compute_seconds += levi_now() - t0;

    size_t numel = (size_t)rows * L * H;
    for (size_t i = 0; i < numel; i++) {
        float v = b->chunk_f32[i];
        int bad = !isfinite(v) || (m->k.dtype == LEVI_F16 && fabsf(v) >= 65520.0f);
        if (bad) {
            size_t row = i / ((size_t)L * H), j = (i / H) % L;
            return levi_errorf(err, LEVI_ERR_NUMERIC,
                               "text %lld, hidden state %d, dim %zu: feature %g is %s",
                               (long long)order[row], m->k.layers[j], i % H, (double)v,
                               isfinite(v) ? "beyond the F16 range (use dtype F32)" : "not finite");
        }
    }
    levi_tensor t[2];
    memset(t, 0, sizeof t);
    snprintf(t[0].name, sizeof t[0].name, "features");
    t[0].dtype = m->k.dtype;
    int64_t fshape[3] = {rows, L, H};
    levi_tensor_set_shape(&t[0], 3, fshape);
    if (m->k.dtype == LEVI_F16) {
        levi_featcache_to_f16(b->chunk_f32, b->chunk_f16, (int64_t)numel);
        t[0].data = b->chunk_f16;
    } else {
        t[0].data = b->chunk_f32;
    }
    snprintf(t[1].name, sizeof t[1].name, "rows");
    t[1].dtype = LEVI_I64;
    levi_tensor_set_shape(&t[1], 1, &rows);
    t[1].data = (void *)order;
    char chunk_str[32], name[64], path[LEVI_FEATCACHE_PATH_MAX];
    snprintf(chunk_str, sizeof chunk_str, "%d", c);
    chunk_name(name, sizeof name, c);
    if (!path_join(path, sizeof path, b->dir, name))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", b->dir);
    const char *keys[] = {"format", "key", "chunk"};
    const char *vals[] = {CHUNK_FORMAT, m->key, chunk_str};
    return levi_st_write(path, t, 2, keys, vals, 3, err);
}

static levi_status builder_prepare_encoder(builder *b, levi_error *err) {
    if (b->bert) return LEVI_OK;
    b->bert = levi_bert_open(b->model_dir, err);
    if (!b->bert) return err ? err->status : LEVI_ERR_IO;
    const levi_bert_config *cfg = levi_bert_get_config(b->bert);
    if (cfg->hidden != b->m->dim)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: the encoder's hidden size %d differs from the cache's dim %d",
                           b->model_dir, cfg->hidden, b->m->dim);
    size_t bs = (size_t)b->p->batch_size,
           S = (size_t)(b->tok.max_tokens > 2 ? b->tok.max_tokens : 2);
    size_t cells = (size_t)b->m->chunk_size * (size_t)b->m->k.n_layers * (size_t)b->m->dim;
    b->ids = levi_xmalloc(bs * S * sizeof(int32_t));
    b->mask = levi_xmalloc(bs * S * sizeof(int32_t));
    b->pooled = levi_xmalloc(bs * (size_t)b->m->dim * sizeof(float));
    b->chunk_f32 = levi_xmalloc(cells * sizeof(float));
    if (b->m->k.dtype == LEVI_F16) b->chunk_f16 = levi_xmalloc(cells * sizeof(uint16_t));
    return LEVI_OK;
}

static void builder_free(builder *b) {
    tokenized_free(&b->tok);
    free(b->order);
    levi_bert_free(b->bert);
    levi_free(b->ids);
    levi_free(b->mask);
    levi_free(b->pooled);
    levi_free(b->chunk_f32);
    levi_free(b->chunk_f16);
}

levi_status levi_featcache_build(const char *root, const char *model_dir, const char *const *texts,
                                 int64_t n, const levi_featcache_params *params,
                                 levi_featcache_info *info, levi_error *err) {
    LEVI_ASSERT(root != NULL, "levi_featcache_build needs a cache root directory");
    levi_featcache_info local_info;
    if (!info) info = &local_info;
    memset(info, 0, sizeof *info);
    manifest m;
    memset(&m, 0, sizeof m);
    char dir[LEVI_FEATCACHE_PATH_MAX];
    levi_status st = compute_key(root, model_dir, texts, n, params, &m.k, m.key, &m.dim, dir, err);
    if (st != LEVI_OK) return st;
    fill_info_from_key(info, &m.k, m.key, dir, m.dim);
    if (params->threads > 0) levi_set_num_threads(params->threads);
    if ((st = levi_mkdirs(dir, err)) != LEVI_OK) return st;

    /* An existing manifest must describe exactly this request; it fixes the chunk size. */
    char mpath[LEVI_FEATCACHE_PATH_MAX];
    if (!path_join(mpath, sizeof mpath, dir, "manifest.json"))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", dir);
    int have_manifest = file_exists(mpath);
    if (have_manifest) {
        manifest old;
        if ((st = read_manifest(dir, &old, err)) != LEVI_OK) return st;
        if (strcmp(old.key, m.key) != 0) return manifest_mismatch(dir, &old, &m.k, m.key, err);
        if (old.dim != m.dim)
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: field \"dim\" is %d, the model's hidden size is %d", mpath,
                               old.dim, m.dim);
        m.chunk_size = old.chunk_size;
        m.n_chunks = old.n_chunks;
        if (old.complete) {
            /* A hit: the headers are checked (cheap, no tokenisation); a damaged chunk falls
             * through to the resume path below, which recomputes it. */
            int all_ok = 1;
            for (int c = 0; c < old.n_chunks && all_ok; c++)
                all_ok = chunk_reusable(dir, &old, c, NULL);
            if (all_ok) {
                info->chunk_size = old.chunk_size;
                info->n_chunks = old.n_chunks;
                info->chunks_reused = old.n_chunks;
                info->tokens = old.tokens;
                info->truncated = old.truncated;
                info->max_tokens = old.max_tokens;
                return LEVI_OK;
            }
        }
    } else {
        m.chunk_size = params->chunk_size;
        m.n_chunks = n_chunks_of(n, m.chunk_size);
        m.complete = 0;
        if ((st = write_manifest(dir, model_dir, &m, err)) != LEVI_OK) return st;
    }
    info->chunk_size = m.chunk_size;
    info->n_chunks = m.n_chunks;
    remove_stale_tmp(dir);

    builder b;
    memset(&b, 0, sizeof b);
    b.model_dir = model_dir;
    b.p = params;
    b.m = &m;
    b.dir = dir;
    levi_tokenizer *tok = levi_tokenizer_open(model_dir, err);
    if (!tok) return err ? err->status : LEVI_ERR_IO;
    st = tokenize_all(tok, texts, n, m.k.max_len, &b.tok, err);
    levi_tokenizer_close(tok);
    if (st != LEVI_OK) return st;
    info->tokens = b.tok.total;
    info->truncated = b.tok.truncated;
    info->max_tokens = b.tok.max_tokens;

    len_index *li = malloc((size_t)n * sizeof *li);
    b.order = malloc((size_t)n * sizeof(int64_t));
    if (!li || !b.order) {
        free(li);
        builder_free(&b);
        return levi_errorf(err, LEVI_ERR_NOMEM, "out of memory sorting %lld texts", (long long)n);
    }
    for (int64_t i = 0; i < n; i++) {
        li[i].len = (int32_t)(b.tok.offset[i + 1] - b.tok.offset[i]);
        li[i].index = i;
    }
    qsort(li, (size_t)n, sizeof *li, cmp_len_index);
    for (int64_t i = 0; i < n; i++) b.order[i] = li[i].index;
    free(li);

    int computed_here = 0;
    for (int c = 0; c < m.n_chunks; c++) {
        int64_t first = (int64_t)c * m.chunk_size;
        int64_t rows = n - first < m.chunk_size ? n - first : m.chunk_size;
        char name[64], cpath[LEVI_FEATCACHE_PATH_MAX];
        chunk_name(name, sizeof name, c);
        if (!path_join(cpath, sizeof cpath, dir, name)) {
            st = levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", dir);
            break;
        }
        int exists = file_exists(cpath);
        if (exists && chunk_reusable(dir, &m, c, b.order + first)) {
            info->chunks_reused++;
            b.done_texts += rows;
            continue;
        }
        if (params->max_chunks > 0 && computed_here >= params->max_chunks) {
            st = levi_errorf(err, LEVI_ERR_INTERRUPTED,
                             "stopped after computing %d chunk(s) (max_chunks); %d of %d chunks "
                             "are in %s, build again to resume",
                             computed_here, info->chunks_reused + info->chunks_computed, m.n_chunks,
                             dir);
            break;
        }
        if ((st = builder_prepare_encoder(&b, err)) != LEVI_OK) break;
        if (computed_here == 0 && params->progress) /* the start: done = reused texts so far */
            params->progress(params->progress_user, b.done_texts, n, 0);
        if ((st = compute_chunk(&b, c, err)) != LEVI_OK) break;
        computed_here++;
        if (exists)
            info->chunks_repaired++;
        else
            info->chunks_computed++;
    }
    info->texts_computed = b.computed_texts;
    info->tokens_computed = b.real_tokens;
    info->padded_tokens = b.padded_tokens;
    info->seconds = b.compute_seconds;
    if (st == LEVI_OK) {
        m.complete = 1;
        m.tokens = b.tok.total;
        m.truncated = b.tok.truncated;
        m.max_tokens = b.tok.max_tokens;
        st = write_manifest(dir, model_dir, &m, err);
    }
    builder_free(&b);
    return st;
}

/* ---- load ----------------------------------------------------------------------------- */

levi_status levi_featcache_load(const char *dir, const int *layers, int n_layers,
                                levi_features *out, levi_error *err) {
    LEVI_ASSERT(dir != NULL && out != NULL, "levi_featcache_load needs a directory and an output");
    LEVI_ASSERT(n_layers >= 0 && (n_layers == 0 || layers != NULL), "layers/n_layers mismatch");
    memset(out, 0, sizeof *out);
    manifest m;
    levi_status st = read_manifest(dir, &m, err);
    if (st != LEVI_OK) return st;
    if (!m.complete)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s/manifest.json: the cache is incomplete (\"complete\": false): an "
                           "interrupted build; run the build again to finish it",
                           dir);
    /* slot[k] = index into the stored layers of requested layer k. */
    int want = n_layers ? n_layers : m.k.n_layers;
    if (want > LEVI_FEATCACHE_MAX_LAYERS)
        return levi_errorf(err, LEVI_ERR_ARG, "n_layers: expected at most %d, found %d",
                           LEVI_FEATCACHE_MAX_LAYERS, want);
    int slot[LEVI_FEATCACHE_MAX_LAYERS];
    for (int k = 0; k < want; k++) {
        int l = n_layers ? layers[k] : m.k.layers[k];
        slot[k] = -1;
        for (int j = 0; j < m.k.n_layers; j++)
            if (m.k.layers[j] == l) slot[k] = j;
        if (slot[k] < 0)
            return levi_errorf(err, LEVI_ERR_NOT_FOUND,
                               "%s: hidden state %d is not in this cache (it holds %d of them, "
                               "from %d to %d)",
                               dir, l, m.k.n_layers, m.k.layers[0], m.k.layers[m.k.n_layers - 1]);
        out->layers[k] = l;
    }
    size_t cells, bytes;
    if (!levi_mul_size((size_t)m.k.n, (size_t)want, &cells) ||
        !levi_mul_size(cells, (size_t)m.dim, &cells) ||
        !levi_mul_size(cells, sizeof(float), &bytes))
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: %lld x %d x %d features overflow size_t", dir,
                           (long long)m.k.n, want, m.dim);
    /* Aligned for the vector loads of the training kernels; NOMEM rather than abort, since the
     * size comes from a file. */
    float *data = NULL;
    if (posix_memalign((void **)&data, 64, bytes ? bytes : 64) != 0) data = NULL;
    uint8_t *seen = calloc((size_t)m.k.n, 1);
    if (!data || !seen) {
        free(data);
        free(seen);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %zu bytes of features", dir,
                           bytes);
    }
    const int H = m.dim, SL = m.k.n_layers;
    for (int c = 0; c < m.n_chunks && st == LEVI_OK; c++) {
        const uint8_t *rows = NULL;
        const levi_tensor *feat = NULL;
        levi_st_file *f = open_chunk(dir, &m, c, &rows, &feat, err);
        if (!f) {
            st = err ? err->status : LEVI_ERR_FORMAT;
            break;
        }
        char name[64];
        chunk_name(name, sizeof name, c);
        const uint8_t *src = feat->data;
        int64_t n_rows = feat->shape[0];
        for (int64_t i = 0; i < n_rows && st == LEVI_OK; i++) {
            int64_t r = read_i64(rows, i);
            if (r < 0 || r >= m.k.n || seen[r]) {
                st = levi_errorf(err, LEVI_ERR_FORMAT, "%s/%s: tensor \"rows\"[%lld] = %lld: %s",
                                 dir, name, (long long)i, (long long)r,
                                 (r < 0 || r >= m.k.n) ? "out of range" : "row given twice");
                break;
            }
            seen[r] = 1;
            for (int k = 0; k < want; k++) {
                float *dst = data + ((size_t)r * want + k) * H;
                size_t at = ((size_t)i * SL + slot[k]) * H;
                if (m.k.dtype == LEVI_F32) {
                    memcpy(dst, src + at * 4, (size_t)H * sizeof(float));
                } else {
                    for (int d = 0; d < H; d++) {
                        uint16_t h;
                        memcpy(&h, src + (at + d) * 2, 2);
                        dst[d] = levi_f16_to_f32(h);
                    }
                }
                for (int d = 0; d < H; d++) {
                    if (!isfinite(dst[d])) {
                        st = levi_errorf(err, LEVI_ERR_FORMAT,
                                         "%s/%s: row %lld (text %lld), hidden state %d, dim %d: "
                                         "value is not finite",
                                         dir, name, (long long)i, (long long)r, out->layers[k], d);
                        break;
                    }
                }
                if (st != LEVI_OK) break;
            }
        }
        levi_st_close(f);
    }
    /* Counts per chunk are fixed and no row repeats, so all rows are covered; checked anyway
     * because the reader must not trust that reasoning about a file it did not write. */
    for (int64_t r = 0; r < m.k.n && st == LEVI_OK; r++)
        if (!seen[r])
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: text %lld is in no chunk", dir,
                             (long long)r);
    free(seen);
    if (st != LEVI_OK) {
        free(data);
        memset(out, 0, sizeof *out);
        return st;
    }
    out->data = data;
    out->n = m.k.n;
    out->n_layers = want;
    out->dim = H;
    return LEVI_OK;
}
