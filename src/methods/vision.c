/* Vision methods: the frozen EfficientNet-Lite0 feature cache, the paper's small CNN, LEVI
 * adapters and the LP / SMALL / A3 baselines over them, SGD training with early stopping and
 * learning-rate selection on ID validation (include/levi/vision.h is the contract).
 * Not for: loading or corrupting images (data layer), the backbone itself (models layer),
 * reports or printing (CLI).
 */
#include "levi/vision.h"

#include "vision_internal.h"

#include "levi/featcache.h"
#include "levi/ops.h"
#include "levi/optim.h"
#include "levi/ptfile.h"
#include "levi/safetensors.h"

#include <errno.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---------------------------------------------------------------------------------------
 * Feature extraction and cache. */

levi_vision_feat_params levi_vision_feat_default_params(void) {
    levi_vision_feat_params p;
    memset(&p, 0, sizeof p);
    p.resolution = 32;
    for (int c = 0; c < 3; c++) p.mean[c] = 127.0f / 255.0f, p.std[c] = 128.0f / 255.0f;
    p.batch_size = 32;
    p.chunk_size = 2048;
    return p;
}

void levi_vision_feats_free(levi_vision_feats *f) {
    if (!f) return;
    levi_free(f->data);
    memset(f, 0, sizeof *f);
}

struct levi_vision_extractor {
    char path[4096];
    char sha[65];
    levi_effnet *model; /* loaded on first need */
    int borrowed;       /* model belongs to the caller (levi_vision_extractor_open_model) */
};

levi_status levi_vision_extractor_open(levi_vision_extractor **out, const char *pth_path,
                                       levi_error *err) {
    LEVI_ASSERT(out && pth_path, "extractor_open needs out and a path");
    *out = NULL;
    levi_vision_extractor *x = levi_xcalloc(1, sizeof *x);
    if (snprintf(x->path, sizeof x->path, "%s", pth_path) >= (int)sizeof x->path) {
        levi_free(x);
        return levi_errorf(err, LEVI_ERR_ARG, "checkpoint path too long: %s", pth_path);
    }
    levi_status st = levi_sha256_file(pth_path, x->sha, err);
    if (st != LEVI_OK) {
        levi_free(x);
        return st;
    }
    *out = x;
    return LEVI_OK;
}

levi_status levi_vision_extractor_open_model(levi_vision_extractor **out, levi_effnet *model,
                                             const char *id_sha, levi_error *err) {
    LEVI_ASSERT(out && model && id_sha, "extractor_open_model needs out, a model and an id");
    *out = NULL;
    size_t n = strlen(id_sha);
    if (n != 64 || strspn(id_sha, "0123456789abcdef") != 64)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "backbone id '%s': expected 64 lowercase hex digits (a SHA-256)",
                           id_sha);
    levi_vision_extractor *x = levi_xcalloc(1, sizeof *x);
    snprintf(x->path, sizeof x->path, "(in-memory backbone %.16s)", id_sha);
    memcpy(x->sha, id_sha, 65);
    x->model = model;
    x->borrowed = 1;
    *out = x;
    return LEVI_OK;
}

void levi_vision_extractor_close(levi_vision_extractor *x) {
    if (!x) return;
    if (!x->borrowed) levi_effnet_free(x->model);
    levi_free(x);
}

const char *levi_vision_extractor_checkpoint_sha(const levi_vision_extractor *x) {
    return x->sha;
}

static levi_status pt_source(void *user, const char *name, int ndim, const int64_t *shape,
                             float *dst, levi_error *err) {
    return levi_pt_read_f32((const levi_pt_file *)user, name, ndim, shape, dst, err);
}

static levi_status extractor_load_model(levi_vision_extractor *x, levi_error *err) {
    if (x->model) return LEVI_OK;
    levi_pt_file *f = levi_pt_open(x->path, err);
    if (!f) return err ? err->status : LEVI_ERR_FORMAT;
    x->model = levi_effnet_load(pt_source, f, err);
    levi_pt_close(f);
    if (!x->model) return levi_error_prefix(err, "loading EfficientNet-Lite0 from %s: ", x->path);
    return LEVI_OK;
}

/* Resolves the stage list (0 = all) into slots; LEVI_ERR_ARG for bad entries. */
static levi_status feat_slots(const levi_vision_feat_params *p, levi_vision_feats *f,
                              levi_error *err) {
    int n = p->n_stages == 0 ? LEVI_EFFNET_STAGES : p->n_stages;
    if (n < 0 || n > LEVI_VISION_MAX_SLOTS)
        return levi_errorf(err, LEVI_ERR_ARG, "feature stages: %d listed, expected 0..%d",
                           p->n_stages, LEVI_VISION_MAX_SLOTS);
    f->n_slots = n;
    f->total_dim = 0;
    for (int i = 0; i < n; i++) {
        int s = p->n_stages == 0 ? i : p->stages[i];
        if (s < 0 || s >= LEVI_EFFNET_STAGES || (i > 0 && s <= f->stages[i - 1]))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "feature stages: entry %d is %d; expected strictly increasing "
                               "stages in 0..%d",
                               i, s, LEVI_EFFNET_STAGES - 1);
        f->stages[i] = s;
        f->dim[i] = levi_effnet_stage_channels(s);
        f->offset[i] = f->total_dim;
        f->total_dim += f->dim[i];
    }
    return LEVI_OK;
}

static levi_status feat_check(const levi_vision_image_set *set, const levi_vision_feat_params *p,
                              levi_error *err) {
    if (!set || !set->images || (set->n > 0 && !set->idx) || set->n < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "image set: expected at least one image index");
    for (int64_t i = 0; i < set->n; i++)
        if (set->idx[i] < 0 || set->idx[i] >= set->images->n)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "image set: index %lld (entry %lld) outside 0..%lld",
                               (long long)set->idx[i], (long long)i, (long long)set->images->n - 1);
    if (p->resolution < LEVI_EFFNET_MIN_SIZE || p->resolution > 1024)
        return levi_errorf(err, LEVI_ERR_ARG, "resolution %d: expected %d..1024", p->resolution,
                           LEVI_EFFNET_MIN_SIZE);
    if (p->batch_size < 1 || p->chunk_size < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "batch size %d / chunk size %d: expected >= 1",
                           p->batch_size, p->chunk_size);
    for (int c = 0; c < 3; c++)
        if (!(p->std[c] > 0) || !isfinite(p->mean[c]))
            return levi_errorf(err, LEVI_ERR_ARG, "normalisation channel %d: mean %g std %g", c,
                               (double)p->mean[c], (double)p->std[c]);
    return LEVI_OK;
}

/* SHA-256 over the indices (int64) and the selected images' pixels, in order: noise depends
 * on the dataset index, so the indices are part of what the features are a function of. */
static void set_sha(const levi_vision_image_set *set, char out[65]) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    LEVI_ASSERT(ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1, "OpenSSL init failed");
    const levi_images *im = set->images;
    const size_t px = (size_t)im->rows * im->cols;
    for (int64_t i = 0; i < set->n; i++) {
        int64_t k = set->idx[i];
        EVP_DigestUpdate(ctx, &k, sizeof k);
        EVP_DigestUpdate(ctx, im->pixels + (size_t)k * px, px);
    }
    unsigned char md[32];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx, md, &len);
    EVP_MD_CTX_free(ctx);
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* The canonical listing the key hashes; every field written out in full. */
static void key_listing(const levi_vision_extractor *x, const levi_vision_image_set *set,
                        const levi_vision_feat_params *p, const levi_vision_feats *f, char *buf,
                        size_t cap) {
    char ssha[65];
    set_sha(set, ssha);
    const levi_corruption *c = &set->corruption;
    int n = snprintf(
        buf, cap,
        "levi-vision-features v%d\ncheckpoint_sha256 %s\nimages %lld x %d x %d "
        "sha256 %s\ncorruption %s factor %d sigma %.9g quality %d seed %llu\n"
        "resolution %d\nmean %.9g %.9g %.9g\nstd %.9g %.9g %.9g\ndtype F16\nstages",
        LEVI_VISION_FORMAT_VERSION, x->sha, (long long)set->n, set->images->rows, set->images->cols,
        ssha, levi_corruption_name(c->kind), c->kind == LEVI_CORRUPT_DOWNSAMPLE ? c->factor : 0,
        c->kind == LEVI_CORRUPT_BLUR || c->kind == LEVI_CORRUPT_NOISE ? (double)c->sigma : 0.0,
        c->kind == LEVI_CORRUPT_JPEG ? c->quality : 0,
        c->kind == LEVI_CORRUPT_NOISE ? (unsigned long long)c->seed : 0ULL, p->resolution,
        (double)p->mean[0], (double)p->mean[1], (double)p->mean[2], (double)p->std[0],
        (double)p->std[1], (double)p->std[2]);
    for (int i = 0; i < f->n_slots && n > 0 && (size_t)n < cap; i++)
        n += snprintf(buf + n, cap - (size_t)n, " %d", f->stages[i]);
    if (n > 0 && (size_t)n < cap) snprintf(buf + n, cap - (size_t)n, "\n");
}

levi_status levi_vision_feat_key(const levi_vision_extractor *x, const levi_vision_image_set *set,
                                 const levi_vision_feat_params *p, char key_hex[65],
                                 levi_error *err) {
    levi_vision_feats f;
    memset(&f, 0, sizeof f);
    levi_status st = feat_check(set, p, err);
    if (st == LEVI_OK) st = feat_slots(p, &f, err);
    if (st != LEVI_OK) return st;
    char buf[2048];
    key_listing(x, set, p, &f, buf, sizeof buf);
    levi_sha256_hex(buf, strlen(buf), key_hex);
    return LEVI_OK;
}

/* A chunk on disk is valid when it opens, carries our key and has the expected shape. */
static int chunk_valid(const char *path, const char *key, int64_t rows, int dim) {
    struct stat sb;
    if (stat(path, &sb) != 0) return 0;
    levi_error e;
    levi_st_file *f = levi_st_open(path, &e);
    if (!f) return 0;
    const char *k = levi_st_metadata(f, "key");
    const levi_tensor *t = levi_st_find(f, "features");
    int ok =
        k && strcmp(k, key) == 0 && t && t->ndim == 2 && t->shape[0] == rows && t->shape[1] == dim;
    levi_st_close(f);
    return ok;
}

static levi_status compute_chunk(levi_vision_extractor *x, const levi_vision_image_set *set,
                                 const levi_vision_feat_params *p, const levi_vision_feats *f,
                                 int64_t start, int64_t rows, const char *path, int chunk,
                                 int64_t *done, int64_t total, double t_start, int64_t *computed,
                                 levi_error *err) {
    levi_image_prep prep = levi_image_prep_default_params();
    prep.out_h = prep.out_w = p->resolution;
    prep.channels = 3;
    for (int c = 0; c < 3; c++) prep.mean[c] = p->mean[c], prep.std[c] = p->std[c];
    const int R = p->resolution, D = f->total_dim;
    float *batch = levi_xmalloc((size_t)p->batch_size * 3 * R * R * sizeof(float));
    float *feat = levi_xmalloc((size_t)rows * D * sizeof(float));
    uint16_t *half = levi_xmalloc((size_t)rows * D * sizeof(uint16_t));
    levi_status st = LEVI_OK;
    levi_effnet_forward_params fp = levi_effnet_default_forward_params();
    for (int64_t b0 = 0; b0 < rows && st == LEVI_OK; b0 += p->batch_size) {
        if (p->stop && *p->stop) {
            st = levi_errorf(err, LEVI_ERR_INTERRUPTED, "feature extraction interrupted");
            break;
        }
        int B = (int)(rows - b0 < p->batch_size ? rows - b0 : p->batch_size);
        st = levi_images_batch(set->images, set->idx + start + b0, B, &set->corruption, &prep,
                               batch, err);
        if (st != LEVI_OK) break;
        st = levi_effnet_forward(x->model, batch, B, R, R, &fp, err);
        if (st != LEVI_OK) break;
        for (int s = 0; s < f->n_slots; s++) {
            const float *pooled = levi_effnet_pooled(x->model, f->stages[s]);
            for (int i = 0; i < B; i++)
                memcpy(feat + (size_t)(b0 + i) * D + f->offset[s], pooled + (size_t)i * f->dim[s],
                       (size_t)f->dim[s] * sizeof(float));
        }
        *done += B;
        *computed += B;
        if (p->progress)
            p->progress(p->progress_user, *done, total,
                        (double)*computed / fmax(levi_now() - t_start, 1e-9));
    }
    if (st == LEVI_OK) {
        for (int64_t i = 0; i < rows * D; i++)
            if (!isfinite(feat[i]) || fabsf(feat[i]) > 65504.0f) {
                st = levi_errorf(err, LEVI_ERR_NUMERIC,
                                 "feature row %lld column %lld is %g: not finite in half "
                                 "precision",
                                 (long long)(start + i / D), (long long)(i % D), (double)feat[i]);
                break;
            }
    }
    if (st == LEVI_OK) {
        /* F16 halves disk and page cache; pooled features are within +-65504 (checked). */
        levi_featcache_to_f16(feat, half, rows * D);
        levi_tensor t;
        memset(&t, 0, sizeof t);
        snprintf(t.name, sizeof t.name, "features");
        t.dtype = LEVI_F16;
        int64_t shape[2] = {rows, D};
        levi_tensor_set_shape(&t, 2, shape);
        t.data = half;
        char chunk_s[32];
        snprintf(chunk_s, sizeof chunk_s, "%d", chunk);
        const char *keys[2] = {"key", "chunk"}, *vals[2] = {f->key, chunk_s};
        st = levi_st_write(path, &t, 1, keys, vals, 2, err);
    }
    levi_free(batch);
    levi_free(feat);
    levi_free(half);
    return st;
}

levi_status levi_vision_extract(levi_vision_extractor *x, const char *root,
                                const levi_vision_image_set *set, const levi_vision_feat_params *p,
                                levi_vision_feats *out, levi_error *err) {
    LEVI_ASSERT(x && root && out, "levi_vision_extract needs an extractor, a root and out");
    memset(out, 0, sizeof *out);
    levi_status st = feat_check(set, p, err);
    if (st == LEVI_OK) st = feat_slots(p, out, err);
    if (st != LEVI_OK) return st;
    char listing[2048];
    key_listing(x, set, p, out, listing, sizeof listing);
    levi_sha256_hex(listing, strlen(listing), out->key);
    if (snprintf(out->dir, sizeof out->dir, "%s/%.16s", root, out->key) >= (int)sizeof out->dir)
        return levi_errorf(err, LEVI_ERR_ARG, "cache root too long: %s", root);
    st = levi_mkdirs(out->dir, err);
    if (st != LEVI_OK) return st;
    if (p->threads > 0) levi_set_num_threads(p->threads);
    out->n = set->n;
    const int D = out->total_dim;
    const int64_t n_chunks = (set->n + p->chunk_size - 1) / p->chunk_size;
    char path[4200];
    /* First pass: which chunks are there already. */
    int64_t done = 0;
    uint8_t *have = levi_xcalloc((size_t)n_chunks, 1);
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t start = c * p->chunk_size;
        int64_t rows = set->n - start < p->chunk_size ? set->n - start : p->chunk_size;
        snprintf(path, sizeof path, "%s/chunk-%05lld.safetensors", out->dir, (long long)c);
        have[c] = (uint8_t)chunk_valid(path, out->key, rows, D);
        if (have[c]) done += rows, out->chunks_reused++;
    }
    double t0 = levi_now();
    int started = 0;
    for (int64_t c = 0; c < n_chunks && st == LEVI_OK; c++) {
        if (have[c]) continue;
        if (p->max_chunks > 0 && out->chunks_computed >= p->max_chunks) {
            st = levi_errorf(err, LEVI_ERR_INTERRUPTED,
                             "feature extraction stopped after %d chunk(s) (max_chunks)",
                             out->chunks_computed);
            break;
        }
        if (!started) {
            st = extractor_load_model(x, err);
            if (st != LEVI_OK) break;
            if (p->progress) p->progress(p->progress_user, done, set->n, 0.0);
            started = 1;
        }
        int64_t start = c * p->chunk_size;
        int64_t rows = set->n - start < p->chunk_size ? set->n - start : p->chunk_size;
        snprintf(path, sizeof path, "%s/chunk-%05lld.safetensors", out->dir, (long long)c);
        st = compute_chunk(x, set, p, out, start, rows, path, (int)c, &done, set->n, t0,
                           &out->images_computed, err);
        if (st == LEVI_OK) out->chunks_computed++;
    }
    out->seconds = levi_now() - t0;
    levi_free(have);
    if (st != LEVI_OK) return st;
    /* Manifest: the listing the key hashes, so a human can see what a directory holds. */
    snprintf(path, sizeof path, "%s/manifest.json", out->dir);
    struct stat sb;
    if (stat(path, &sb) != 0) {
        char js[4096];
        int n = snprintf(js, sizeof js,
                         "{\"format\": \"levi-vision-features\", \"version\": %d, \"key\": \"%s\", "
                         "\"n\": %lld, \"total_dim\": %d, \"chunk_size\": %d, \"chunks\": %lld, "
                         "\"complete\": true, \"listing\": \"",
                         LEVI_VISION_FORMAT_VERSION, out->key, (long long)set->n, D, p->chunk_size,
                         (long long)n_chunks);
        for (const char *q = listing; *q && n < (int)sizeof js - 8; q++) {
            if (*q == '\n')
                js[n++] = '\\', js[n++] = 'n';
            else
                js[n++] = *q;
        }
        n += snprintf(js + n, sizeof js - (size_t)n, "\"}\n");
        st = levi_write_file_atomic(path, js, (size_t)n, err);
        if (st != LEVI_OK) return st;
    }
    /* Load every chunk in order. */
    size_t bytes;
    if (!levi_mul_size((size_t)set->n, (size_t)D * sizeof(float), &bytes))
        return levi_errorf(err, LEVI_ERR_NOMEM, "features %lld x %d overflow", (long long)set->n,
                           D);
    out->data = levi_xmalloc(bytes);
    for (int64_t c = 0; c < n_chunks && st == LEVI_OK; c++) {
        int64_t start = c * p->chunk_size;
        int64_t rows = set->n - start < p->chunk_size ? set->n - start : p->chunk_size;
        snprintf(path, sizeof path, "%s/chunk-%05lld.safetensors", out->dir, (long long)c);
        levi_st_file *f = levi_st_open(path, err);
        if (!f) {
            st = err ? err->status : LEVI_ERR_IO;
            break;
        }
        const char *k = levi_st_metadata(f, "key");
        int64_t shape[2] = {rows, D};
        if (!k || strcmp(k, out->key) != 0)
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: metadata key %s, expected %s", path,
                             k ? k : "(absent)", out->key);
        else
            st = levi_st_read_f32(f, "features", 2, shape, out->data + (size_t)start * D, err);
        levi_st_close(f);
    }
    if (st != LEVI_OK) levi_vision_feats_free(out);
    return st;
}

/* ---------------------------------------------------------------------------------------
 * Models. */

static const char *const method_names[LEVI_VISION_METHOD_COUNT] = {"levi", "lp", "small", "a3"};

const char *levi_vision_method_name(levi_vision_method m) {
    return (unsigned)m < LEVI_VISION_METHOD_COUNT ? method_names[m] : "?";
}

int levi_vision_method_parse(const char *name) {
    for (int i = 0; i < LEVI_VISION_METHOD_COUNT; i++)
        if (name && strcmp(name, method_names[i]) == 0) return i;
    return -1;
}

levi_vision_model_params levi_vision_model_default_params(levi_vision_method m) {
    levi_vision_model_params p;
    memset(&p, 0, sizeof p);
    p.method = m;
    p.cnn_channels[0] = 32, p.cnn_channels[1] = 64, p.cnn_channels[2] = 64, p.cnn_channels[3] = 64;
    p.adapter_hidden = 1024;
    p.standardize = 1;
    switch (m) {
    case LEVI_VISION_LEVI:
        p.use_cnn = 1, p.feature_adapters = 1;
        break;
    case LEVI_VISION_LP:
        p.feature_adapters = 1, p.n_adapter_slots = 1, p.adapter_slots[0] = -1;
        p.adapter_hidden = 0;
        break;
    case LEVI_VISION_SMALL:
        p.use_cnn = 1;
        break;
    case LEVI_VISION_A3:
        p.feature_adapters = 1;
        break;
    default:
        LEVI_ASSERT(0, "unknown vision method");
    }
    return p;
}

#define CNN_LAYERS 4
#define BN_EPS 1e-5f
#define BN_MOMENTUM 0.1f /* PyTorch's BatchNorm2d defaults */

typedef struct adapter {
    int slot; /* feature slot or -1 */
    int in, hidden;
    int fc1_w, fc1_b, fc2_w, fc2_b; /* param indices; fc1 absent (-1) for a linear head */
} adapter;

struct levi_vision_model {
    levi_vision_model_params p;
    levi_params params;
    int n_classes, n_slots, feat_dim;
    int slot_dim[LEVI_VISION_MAX_SLOTS], slot_off[LEVI_VISION_MAX_SLOTS];
    /* CNN geometry: layer k reads [C_in, H[k], W[k]] and pools to H[k+1], W[k+1]. */
    int img_h, img_w;
    int cin[CNN_LAYERS], cout[CNN_LAYERS], H[CNN_LAYERS + 1], W[CNN_LAYERS + 1];
    int cnn_dim;
    int conv_w[CNN_LAYERS], conv_b[CNN_LAYERS], bn_w[CNN_LAYERS], bn_b[CNN_LAYERS];
    int bn_rm[CNN_LAYERS], bn_rv[CNN_LAYERS];
    int feat_mean, feat_std;
    int n_adapters;
    adapter ad[LEVI_VISION_MAX_SLOTS];
    int max_in, max_hidden;
    /* Workspace for batches of up to cap rows (grown when a call needs more). */
    int64_t cap;
    float *ws;
    float *x0;                                    /* [B,1,H0,W0] */
    float *conv[CNN_LAYERS], *bn[CNN_LAYERS];     /* [B,C,H,W] */
    float *relu[CNN_LAYERS], *pool[CNN_LAYERS];   /* relu [B,C,H,W], pool [B,C,H',W'] */
    float *bmean[CNN_LAYERS], *brstd[CNN_LAYERS]; /* [C] */
    int32_t *argmax[CNN_LAYERS];
    float *col;                                                          /* im2col of one image */
    float *inp[LEVI_VISION_MAX_SLOTS];                                   /* adapter inputs [B,in] */
    float *hpre[LEVI_VISION_MAX_SLOTS], *hact[LEVI_VISION_MAX_SLOTS];    /* [B,hidden] */
    float *logits[LEVI_VISION_MAX_SLOTS], *probs[LEVI_VISION_MAX_SLOTS]; /* [B,K] */
    /* gradient scratch */
    float *g_logits, *g_h, *g_inp, *g_cnn; /* [B,K] [B,hidden] [B,max_in] [B,cnn_dim] */
    float *g_a, *g_b;                      /* [B, max CNN activation] ping-pong */
    int32_t *ytmp;
};

levi_params *levi_vision_model_params_table(levi_vision_model *m) {
    return &m->params;
}
int levi_vision_model_n_adapters(const levi_vision_model *m) {
    return m->n_adapters;
}

static int add1(levi_params *p, const char *name, int64_t a) {
    return levi_params_add(p, name, 1, &a);
}
static int add2(levi_params *p, const char *name, int64_t a, int64_t b) {
    int64_t s[2] = {a, b};
    return levi_params_add(p, name, 2, s);
}

levi_status levi_vision_model_init(levi_vision_model **out, const levi_vision_model_params *p,
                                   const levi_vision_data *d, levi_error *err) {
    LEVI_ASSERT(out && p && d, "model_init needs out, params and data");
    *out = NULL;
    if (d->n_classes < 2)
        return levi_errorf(err, LEVI_ERR_ARG, "vision data: %d classes, expected >= 2",
                           d->n_classes);
    if (p->use_cnn && (d->img_h < 16 || d->img_w < 16))
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "small CNN: images %d x %d, expected at least 16 x 16 (four 2x2 "
                           "pools)",
                           d->img_h, d->img_w);
    if (p->feature_adapters && (d->n_slots < 1 || d->n_slots > LEVI_VISION_MAX_SLOTS))
        return levi_errorf(err, LEVI_ERR_SHAPE,
                           "feature adapters: data has %d slots, expected 1..%d", d->n_slots,
                           LEVI_VISION_MAX_SLOTS);
    if (!p->use_cnn && !p->feature_adapters)
        return levi_errorf(err, LEVI_ERR_ARG, "model reads neither the CNN nor features");
    if (p->adapter_hidden < 0)
        return levi_errorf(err, LEVI_ERR_ARG, "adapter_hidden %d: expected >= 0",
                           p->adapter_hidden);
    for (int k = 0; k < CNN_LAYERS; k++)
        if (p->use_cnn && p->cnn_channels[k] < 1)
            return levi_errorf(err, LEVI_ERR_ARG, "cnn_channels[%d] = %d: expected >= 1", k,
                               p->cnn_channels[k]);
    levi_vision_model *m = levi_xcalloc(1, sizeof *m);
    m->p = *p;
    m->n_classes = d->n_classes;
    levi_params_init(&m->params);
    levi_params *P = &m->params;
    char name[LEVI_NAME_MAX];
    if (p->feature_adapters) {
        m->n_slots = d->n_slots;
        int off = 0;
        for (int s = 0; s < d->n_slots; s++) {
            if (d->slot_dim[s] < 1) {
                levi_free(m);
                return levi_errorf(err, LEVI_ERR_SHAPE, "feature slot %d has dim %d", s,
                                   d->slot_dim[s]);
            }
            m->slot_dim[s] = d->slot_dim[s], m->slot_off[s] = off, off += d->slot_dim[s];
        }
        if (off != d->feat_dim) {
            levi_free(m);
            return levi_errorf(err, LEVI_ERR_SHAPE, "feature slots sum to %d, feat_dim is %d", off,
                               d->feat_dim);
        }
        m->feat_dim = off;
    }
    if (p->use_cnn) {
        m->img_h = d->img_h, m->img_w = d->img_w;
        m->H[0] = d->img_h, m->W[0] = d->img_w;
        for (int k = 0; k < CNN_LAYERS; k++) {
            m->cin[k] = k == 0 ? 1 : p->cnn_channels[k - 1];
            m->cout[k] = p->cnn_channels[k];
            m->H[k + 1] = m->H[k] / 2, m->W[k + 1] = m->W[k] / 2;
            snprintf(name, sizeof name, "cnn.conv%d.weight", k);
            int64_t ws[4] = {m->cout[k], m->cin[k], 3, 3};
            m->conv_w[k] = levi_params_add(P, name, 4, ws);
            snprintf(name, sizeof name, "cnn.conv%d.bias", k);
            m->conv_b[k] = add1(P, name, m->cout[k]);
            snprintf(name, sizeof name, "cnn.bn%d.weight", k);
            m->bn_w[k] = add1(P, name, m->cout[k]);
            snprintf(name, sizeof name, "cnn.bn%d.bias", k);
            m->bn_b[k] = add1(P, name, m->cout[k]);
            snprintf(name, sizeof name, "cnn.bn%d.running_mean", k);
            m->bn_rm[k] = add1(P, name, m->cout[k]);
            snprintf(name, sizeof name, "cnn.bn%d.running_var", k);
            m->bn_rv[k] = add1(P, name, m->cout[k]);
        }
        m->cnn_dim = m->cout[CNN_LAYERS - 1] * m->H[CNN_LAYERS] * m->W[CNN_LAYERS];
    }
    m->feat_mean = m->feat_std = -1;
    if (p->feature_adapters) {
        m->feat_mean = add1(P, "feat.mean", m->feat_dim);
        m->feat_std = add1(P, "feat.std", m->feat_dim);
        int n = p->n_adapter_slots == 0 ? m->n_slots : p->n_adapter_slots;
        for (int j = 0; j < n; j++) {
            int s = p->n_adapter_slots == 0 ? j : p->adapter_slots[j];
            if (s < 0) s += m->n_slots;
            if (s < 0 || s >= m->n_slots) {
                levi_params_free(P);
                levi_free(m);
                return levi_errorf(err, LEVI_ERR_ARG, "adapter %d: slot %d outside 0..%d", j,
                                   p->adapter_slots[j], m->n_slots - 1);
            }
            m->ad[j].slot = s;
            m->ad[j].in = m->slot_dim[s] + m->cnn_dim;
        }
        m->n_adapters = n;
    } else {
        m->n_adapters = 1;
        m->ad[0].slot = -1;
        m->ad[0].in = m->cnn_dim;
    }
    for (int j = 0; j < m->n_adapters; j++) {
        adapter *a = &m->ad[j];
        a->hidden = p->adapter_hidden;
        int last_in = a->in;
        a->fc1_w = a->fc1_b = -1;
        if (a->hidden > 0) {
            snprintf(name, sizeof name, "adapter.%d.fc1.weight", j);
            a->fc1_w = add2(P, name, a->hidden, a->in);
            snprintf(name, sizeof name, "adapter.%d.fc1.bias", j);
            a->fc1_b = add1(P, name, a->hidden);
            last_in = a->hidden;
        }
        snprintf(name, sizeof name, "adapter.%d.fc2.weight", j);
        a->fc2_w = add2(P, name, m->n_classes, last_in);
        snprintf(name, sizeof name, "adapter.%d.fc2.bias", j);
        a->fc2_b = add1(P, name, m->n_classes);
        if (a->in > m->max_in) m->max_in = a->in;
        if (a->hidden > m->max_hidden) m->max_hidden = a->hidden;
    }
    levi_params_alloc(P);
    for (int i = 0; i < P->count; i++) {
        const char *nm = P->items[i].name;
        if (strstr(nm, "running_") || strncmp(nm, "feat.", 5) == 0) P->items[i].trainable = 0;
        if (strstr(nm, ".bias") || strstr(nm, ".bn")) P->items[i].no_decay = 1;
    }
    *out = m;
    return LEVI_OK;
}

static void ws_release(levi_vision_model *m) {
    levi_free(m->ws);
    m->ws = NULL;
    m->cap = 0;
}

void levi_vision_model_free(levi_vision_model *m) {
    if (!m) return;
    ws_release(m);
    levi_params_free(&m->params);
    levi_free(m);
}

/* One allocation for every activation and gradient scratch of a batch of B rows. */
static void ws_ensure(levi_vision_model *m, int64_t B) {
    if (B <= m->cap) return;
    ws_release(m);
    size_t total = 0;
    size_t act_max = 1;
#define WS_ADD(n) (total += (((size_t)(n) + 15) & ~(size_t)15))
    if (m->p.use_cnn) {
        WS_ADD(B * m->H[0] * m->W[0]);
        for (int k = 0; k < CNN_LAYERS; k++) {
            size_t a = (size_t)B * m->cout[k] * m->H[k] * m->W[k];
            size_t pl = (size_t)B * m->cout[k] * m->H[k + 1] * m->W[k + 1];
            WS_ADD(a), WS_ADD(a), WS_ADD(a), WS_ADD(pl), WS_ADD(m->cout[k]), WS_ADD(m->cout[k]);
            WS_ADD(pl); /* argmax (int32, same size as a float) */
            if (a > act_max) act_max = a;
        }
        size_t col = 0;
        for (int k = 0; k < CNN_LAYERS; k++) {
            size_t c = (size_t)m->cin[k] * 9 * m->H[k] * m->W[k];
            if (c > col) col = c;
        }
        WS_ADD(col);
    }
    for (int j = 0; j < m->n_adapters; j++) {
        WS_ADD(B * m->ad[j].in);
        WS_ADD(B * m->ad[j].hidden), WS_ADD(B * m->ad[j].hidden);
        WS_ADD(B * m->n_classes), WS_ADD(B * m->n_classes);
    }
    WS_ADD(B * m->n_classes), WS_ADD(B * m->max_hidden), WS_ADD(B * m->max_in);
    WS_ADD(B * m->cnn_dim), WS_ADD(act_max), WS_ADD(act_max), WS_ADD(B);
#undef WS_ADD
    m->ws = levi_xcalloc(total, sizeof(float));
    m->cap = B;
    float *q = m->ws;
#define WS_TAKE(n) (q += (((size_t)(n) + 15) & ~(size_t)15), q - (((size_t)(n) + 15) & ~(size_t)15))
    if (m->p.use_cnn) {
        m->x0 = WS_TAKE(B * m->H[0] * m->W[0]);
        for (int k = 0; k < CNN_LAYERS; k++) {
            size_t a = (size_t)B * m->cout[k] * m->H[k] * m->W[k];
            size_t pl = (size_t)B * m->cout[k] * m->H[k + 1] * m->W[k + 1];
            m->conv[k] = WS_TAKE(a), m->bn[k] = WS_TAKE(a), m->relu[k] = WS_TAKE(a);
            m->pool[k] = WS_TAKE(pl), m->bmean[k] = WS_TAKE(m->cout[k]);
            m->brstd[k] = WS_TAKE(m->cout[k]);
            m->argmax[k] = (int32_t *)WS_TAKE(pl);
        }
        size_t col = 0;
        for (int k = 0; k < CNN_LAYERS; k++) {
            size_t c = (size_t)m->cin[k] * 9 * m->H[k] * m->W[k];
            if (c > col) col = c;
        }
        m->col = WS_TAKE(col);
    }
    for (int j = 0; j < m->n_adapters; j++) {
        m->inp[j] = WS_TAKE(B * m->ad[j].in);
        m->hpre[j] = WS_TAKE(B * m->ad[j].hidden), m->hact[j] = WS_TAKE(B * m->ad[j].hidden);
        m->logits[j] = WS_TAKE(B * m->n_classes), m->probs[j] = WS_TAKE(B * m->n_classes);
    }
    m->g_logits = WS_TAKE(B * m->n_classes), m->g_h = WS_TAKE(B * m->max_hidden);
    m->g_inp = WS_TAKE(B * m->max_in), m->g_cnn = WS_TAKE(B * m->cnn_dim);
    m->g_a = WS_TAKE(act_max), m->g_b = WS_TAKE(act_max);
    m->ytmp = (int32_t *)WS_TAKE(B);
#undef WS_TAKE
}

static float *pw(levi_vision_model *m, int idx) {
    return levi_params_data(&m->params, idx);
}
static float *pg(levi_vision_model *m, int idx) {
    return m->params.items[idx].trainable ? levi_params_grad(&m->params, idx) : NULL;
}

static float uniform_pm(levi_rng *r, float bound) {
    return (2.0f * levi_rng_uniform(r) - 1.0f) * bound;
}

void levi_vision_model_reset(levi_vision_model *m, const levi_vision_data *d, const int64_t *train,
                             int64_t n_train, uint64_t seed) {
    levi_rng rng;
    levi_rng_seed(&rng, seed);
    levi_params *P = &m->params;
    memset(P->data, 0, P->numel * sizeof(float));
    levi_params_zero_grad(P);
    for (int k = 0; m->p.use_cnn && k < CNN_LAYERS; k++) {
        float bound = 1.0f / sqrtf((float)(m->cin[k] * 9));
        float *w = pw(m, m->conv_w[k]), *b = pw(m, m->conv_b[k]);
        for (int i = 0; i < m->cout[k] * m->cin[k] * 9; i++) w[i] = uniform_pm(&rng, bound);
        for (int i = 0; i < m->cout[k]; i++) b[i] = uniform_pm(&rng, bound);
        for (int i = 0; i < m->cout[k]; i++)
            pw(m, m->bn_w[k])[i] = 1.0f, pw(m, m->bn_rv[k])[i] = 1.0f;
    }
    for (int j = 0; j < m->n_adapters; j++) {
        adapter *a = &m->ad[j];
        int last_in = a->in;
        if (a->hidden > 0) {
            float bound = 1.0f / sqrtf((float)a->in);
            float *w = pw(m, a->fc1_w), *b = pw(m, a->fc1_b);
            for (int64_t i = 0; i < (int64_t)a->hidden * a->in; i++) w[i] = uniform_pm(&rng, bound);
            for (int i = 0; i < a->hidden; i++) b[i] = uniform_pm(&rng, bound);
            last_in = a->hidden;
        }
        float bound = 1.0f / sqrtf((float)last_in);
        float *w = pw(m, a->fc2_w), *b = pw(m, a->fc2_b);
        for (int64_t i = 0; i < (int64_t)m->n_classes * last_in; i++)
            w[i] = uniform_pm(&rng, bound);
        for (int i = 0; i < m->n_classes; i++) b[i] = uniform_pm(&rng, bound);
    }
    if (m->feat_mean >= 0) {
        float *mu = pw(m, m->feat_mean), *sd = pw(m, m->feat_std);
        const int D = m->feat_dim;
        double *s1 = levi_xcalloc((size_t)D, sizeof(double)), *s2 = levi_xcalloc((size_t)D, 8);
        for (int64_t i = 0; i < n_train; i++) {
            const float *f = d->feats + (size_t)train[i] * D;
            for (int c = 0; c < D; c++) s1[c] += f[c], s2[c] += (double)f[c] * f[c];
        }
        for (int c = 0; c < D; c++) {
            double mean = n_train > 0 ? s1[c] / (double)n_train : 0.0;
            double var = n_train > 0 ? s2[c] / (double)n_train - mean * mean : 1.0;
            double sdv = var > 0 ? sqrt(var) : 0.0;
            mu[c] = (float)(m->p.standardize ? mean : 0.0);
            /* A constant feature carries nothing; dividing by ~0 would only blow up noise. */
            sd[c] = (float)(m->p.standardize && sdv > 1e-6 ? sdv : 1.0);
        }
        levi_free(s1);
        levi_free(s2);
    }
}

/* Forward of rows[0..B): fills every activation; train selects BN batch statistics. */
static void model_forward(levi_vision_model *m, const levi_vision_data *d, const int64_t *rows,
                          int B, int train) {
    ws_ensure(m, B);
    if (m->p.use_cnn) {
        const size_t px = (size_t)m->H[0] * m->W[0];
        for (int i = 0; i < B; i++)
            memcpy(m->x0 + (size_t)i * px, d->images + (size_t)rows[i] * px, px * sizeof(float));
        const float *in = m->x0;
        for (int k = 0; k < CNN_LAYERS; k++) {
            const int C = m->cout[k], H = m->H[k], Wd = m->W[k];
            levi_conv2d_forward(m->conv[k], m->col, in, pw(m, m->conv_w[k]), pw(m, m->conv_b[k]), B,
                                m->cin[k], H, Wd, C, 3, 3, 1, 1);
            levi_batchnorm_forward(m->bn[k], m->bmean[k], m->brstd[k], pw(m, m->bn_rm[k]),
                                   pw(m, m->bn_rv[k]), m->conv[k], pw(m, m->bn_w[k]),
                                   pw(m, m->bn_b[k]), B, C, H * Wd, BN_EPS, BN_MOMENTUM, train);
            levi_relu_forward(m->relu[k], m->bn[k], (int64_t)B * C * H * Wd);
            levi_maxpool_forward(m->pool[k], m->argmax[k], m->relu[k], B, C, H, Wd, 2, 2);
            in = m->pool[k];
        }
    }
    const float *cnn_out = m->p.use_cnn ? m->pool[CNN_LAYERS - 1] : NULL;
    for (int j = 0; j < m->n_adapters; j++) {
        const adapter *a = &m->ad[j];
        float *x = m->inp[j];
        int fd = 0;
        if (a->slot >= 0) {
            fd = m->slot_dim[a->slot];
            const int off = m->slot_off[a->slot];
            const float *mu = pw(m, m->feat_mean) + off, *sd = pw(m, m->feat_std) + off;
            for (int i = 0; i < B; i++) {
                const float *f = d->feats + (size_t)rows[i] * m->feat_dim + off;
                float *xi = x + (size_t)i * a->in;
                for (int c = 0; c < fd; c++) xi[c] = (f[c] - mu[c]) / sd[c];
            }
        }
        if (cnn_out)
            for (int i = 0; i < B; i++)
                memcpy(x + (size_t)i * a->in + fd, cnn_out + (size_t)i * m->cnn_dim,
                       (size_t)m->cnn_dim * sizeof(float));
        const float *last = x;
        int last_in = a->in;
        if (a->hidden > 0) {
            levi_linear_forward(m->hpre[j], x, pw(m, a->fc1_w), pw(m, a->fc1_b), B, a->in,
                                a->hidden);
            levi_relu_forward(m->hact[j], m->hpre[j], (int64_t)B * a->hidden);
            last = m->hact[j], last_in = a->hidden;
        }
        levi_linear_forward(m->logits[j], last, pw(m, a->fc2_w), pw(m, a->fc2_b), B, last_in,
                            m->n_classes);
    }
}

double levi_vision_loss_backward(levi_vision_model *m, const levi_vision_data *d,
                                 const int64_t *rows, int64_t n) {
    LEVI_ASSERT(n >= 2, "training batches need >= 2 rows (batch-norm statistics)");
    const int B = (int)n, K = m->n_classes;
    model_forward(m, d, rows, B, 1);
    for (int i = 0; i < B; i++) m->ytmp[i] = d->labels[rows[i]];
    const float scale = 1.0f / (float)m->n_adapters;
    double loss = 0;
    if (m->p.use_cnn) memset(m->g_cnn, 0, (size_t)B * m->cnn_dim * sizeof(float));
    for (int j = 0; j < m->n_adapters; j++) {
        const adapter *a = &m->ad[j];
        loss += levi_crossentropy_forward(m->probs[j], m->logits[j], m->ytmp, B, K);
        memset(m->g_logits, 0, (size_t)B * K * sizeof(float));
        levi_crossentropy_backward(m->g_logits, m->probs[j], m->ytmp, B, K, scale);
        float *g_inp = m->p.use_cnn ? m->g_inp : NULL; /* features are data: no gradient */
        if (g_inp) memset(g_inp, 0, (size_t)B * a->in * sizeof(float));
        if (a->hidden > 0) {
            memset(m->g_h, 0, (size_t)B * a->hidden * sizeof(float));
            levi_linear_backward(m->g_h, pg(m, a->fc2_w), pg(m, a->fc2_b), m->g_logits, m->hact[j],
                                 pw(m, a->fc2_w), B, a->hidden, K);
            /* ReLU backward in place: g_h *= (hpre > 0). */
            for (int64_t i = 0; i < (int64_t)B * a->hidden; i++)
                if (!(m->hpre[j][i] > 0)) m->g_h[i] = 0;
            levi_linear_backward(g_inp, pg(m, a->fc1_w), pg(m, a->fc1_b), m->g_h, m->inp[j],
                                 pw(m, a->fc1_w), B, a->in, a->hidden);
        } else {
            levi_linear_backward(g_inp, pg(m, a->fc2_w), pg(m, a->fc2_b), m->g_logits, m->inp[j],
                                 pw(m, a->fc2_w), B, a->in, K);
        }
        if (g_inp) {
            const int fd = a->slot >= 0 ? m->slot_dim[a->slot] : 0;
            for (int i = 0; i < B; i++) {
                const float *src = g_inp + (size_t)i * a->in + fd;
                float *dst = m->g_cnn + (size_t)i * m->cnn_dim;
                for (int c = 0; c < m->cnn_dim; c++) dst[c] += src[c];
            }
        }
    }
    if (m->p.use_cnn) {
        /* g_cnn is dLoss/d pool[3]; walk the four blocks down. */
        const float *g_pool = m->g_cnn;
        for (int k = CNN_LAYERS - 1; k >= 0; k--) {
            const int C = m->cout[k], H = m->H[k], Wd = m->W[k];
            const size_t a = (size_t)B * C * H * Wd;
            float *g1 = m->g_a, *g2 = m->g_b;
            memset(g1, 0, a * sizeof(float));
            levi_maxpool_backward(g1, g_pool, m->argmax[k], B, C, m->H[k + 1], m->W[k + 1]);
            memset(g2, 0, a * sizeof(float));
            levi_relu_backward(g2, m->bn[k], g1, (int64_t)a);
            memset(g1, 0, a * sizeof(float));
            levi_batchnorm_backward(g1, pg(m, m->bn_w[k]), pg(m, m->bn_b[k]), g2, m->conv[k],
                                    pw(m, m->bn_w[k]), m->bmean[k], m->brstd[k], B, C, H * Wd);
            /* dLoss/d(input of conv k) = dLoss/d pool[k-1]; written into g2, which the next
               (lower) iteration reads as g_pool before it reuses g1. */
            float *g_in = NULL;
            if (k > 0) {
                g_in = g2;
                memset(g_in, 0, (size_t)B * m->cin[k] * H * Wd * sizeof(float));
            }
            levi_conv2d_backward(g_in, pg(m, m->conv_w[k]), pg(m, m->conv_b[k]), m->col, g1,
                                 k == 0 ? m->x0 : m->pool[k - 1], pw(m, m->conv_w[k]), B, m->cin[k],
                                 H, Wd, C, 3, 3, 1, 1);
            g_pool = g_in;
        }
    }
    return loss / m->n_adapters;
}

/* The ensemble: mean of the adapters' softmax probabilities (paper Sec. 4). */
static void ensemble_probs(levi_vision_model *m, int B, float *probs) {
    const int K = m->n_classes;
    memset(probs, 0, (size_t)B * K * sizeof(float));
    for (int j = 0; j < m->n_adapters; j++)
        for (int i = 0; i < B; i++) {
            const float *z = m->logits[j] + (size_t)i * K;
            float mx = z[0];
            for (int c = 1; c < K; c++) mx = z[c] > mx ? z[c] : mx;
            double s = 0;
            for (int c = 0; c < K; c++) s += exp((double)(z[c] - mx));
            for (int c = 0; c < K; c++)
                probs[(size_t)i * K + c] +=
                    (float)(exp((double)(z[c] - mx)) / s / (double)m->n_adapters);
        }
}

#define EVAL_BATCH 512

void levi_vision_predict(levi_vision_model *m, const levi_vision_data *d, const int64_t *rows,
                         int64_t n, float *probs) {
    for (int64_t b0 = 0; b0 < n; b0 += EVAL_BATCH) {
        int B = (int)(n - b0 < EVAL_BATCH ? n - b0 : EVAL_BATCH);
        model_forward(m, d, rows + b0, B, 0);
        ensemble_probs(m, B, probs + (size_t)b0 * m->n_classes);
    }
}

double levi_vision_accuracy(levi_vision_model *m, const levi_vision_data *d, const int64_t *rows,
                            int64_t n) {
    if (n <= 0) return 0.0;
    const int K = m->n_classes;
    float *probs = levi_xmalloc((size_t)EVAL_BATCH * K * sizeof(float));
    int64_t correct = 0;
    for (int64_t b0 = 0; b0 < n; b0 += EVAL_BATCH) {
        int B = (int)(n - b0 < EVAL_BATCH ? n - b0 : EVAL_BATCH);
        model_forward(m, d, rows + b0, B, 0);
        ensemble_probs(m, B, probs);
        for (int i = 0; i < B; i++) {
            int best = 0;
            for (int c = 1; c < K; c++)
                if (probs[(size_t)i * K + c] > probs[(size_t)i * K + best]) best = c;
            correct += best == d->labels[rows[b0 + i]];
        }
    }
    levi_free(probs);
    return (double)correct / (double)n;
}

/* ---------------------------------------------------------------------------------------
 * Training and selection. */

levi_vision_train_params levi_vision_train_default_params(void) {
    levi_vision_train_params t;
    memset(&t, 0, sizeof t);
    t.lr = 1e-2f;
    t.momentum = 0.9f;
    t.batch_size = 512;
    t.max_epochs = 20;
    t.patience = 4;
    return t;
}

int levi_vision_default_lr_grid(levi_vision_method m, float out[LEVI_VISION_MAX_GRID]) {
    static const float grid[] = {1e-4f, 1e-3f, 1e-2f, 1e-1f};
    static const float lp[] = {1e-3f, 1e-2f, 1e-1f, 1.0f, 10.0f};
    if (m == LEVI_VISION_LP) {
        memcpy(out, lp, sizeof lp);
        return 5;
    }
    memcpy(out, grid, sizeof grid);
    return 4;
}

static levi_status data_check(const levi_vision_model *m, const levi_vision_data *d,
                              const int64_t *rows, int64_t n, const char *what, levi_error *err) {
    if (m->p.use_cnn && (!d->images || d->img_h != m->img_h || d->img_w != m->img_w))
        return levi_errorf(err, LEVI_ERR_SHAPE, "%s: images %dx%d (%s), model expects %dx%d", what,
                           d->img_h, d->img_w, d->images ? "present" : "absent", m->img_h,
                           m->img_w);
    if (m->p.feature_adapters && (!d->feats || d->feat_dim != m->feat_dim))
        return levi_errorf(err, LEVI_ERR_SHAPE, "%s: features of width %d (%s), model expects %d",
                           what, d->feat_dim, d->feats ? "present" : "absent", m->feat_dim);
    if (d->n_classes != m->n_classes || !d->labels)
        return levi_errorf(err, LEVI_ERR_SHAPE, "%s: %d classes, model expects %d", what,
                           d->n_classes, m->n_classes);
    for (int64_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= d->n)
            return levi_errorf(err, LEVI_ERR_ARG, "%s: row %lld outside 0..%lld", what,
                               (long long)rows[i], (long long)d->n - 1);
        if (d->labels[rows[i]] < 0 || d->labels[rows[i]] >= d->n_classes)
            return levi_errorf(err, LEVI_ERR_FORMAT, "%s: row %lld has label %d, expected 0..%d",
                               what, (long long)rows[i], d->labels[rows[i]], d->n_classes - 1);
    }
    return LEVI_OK;
}

levi_status levi__vision_train_check(const levi_vision_train_params *tp, int64_t n_train,
                                     const char *what, levi_error *err) {
    if (n_train < 2)
        return levi_errorf(err, LEVI_ERR_ARG, "%s needs >= 2 rows, got %lld", what,
                           (long long)n_train);
    if (tp->batch_size < 2 || !(tp->lr > 0) || tp->max_epochs < 1 ||
        tp->max_epochs > LEVI_VISION_MAX_EPOCHS || !(tp->momentum >= 0 && tp->momentum < 1))
        return levi_errorf(err, LEVI_ERR_ARG,
                           "train params: batch %d (>= 2), lr %g (> 0), epochs %d (1..%d), "
                           "momentum %g ([0, 1))",
                           tp->batch_size, (double)tp->lr, tp->max_epochs, LEVI_VISION_MAX_EPOCHS,
                           (double)tp->momentum);
    return LEVI_OK;
}

void levi__vision_step_progress(const levi_vision_train_params *tp, int epoch, int64_t step,
                                int64_t steps, double loss_mean) {
    if (!tp->progress) return;
    levi_vision_progress pr = {tp->lr,    tp->seed, epoch, tp->max_epochs, step, steps,
                               loss_mean, 0,        0};
    tp->progress(tp->progress_user, &pr);
}

int levi__vision_epoch_end(levi_vision_train_result *res, const levi_vision_train_params *tp,
                           int epoch, int64_t steps, double loss_mean, double acc, int has_val,
                           int *since_best) {
    int is_best = !has_val || acc > res->best_val_acc;
    res->epochs_run = epoch;
    res->loss_history[res->n_history] = loss_mean;
    res->val_history[res->n_history++] = acc;
    if (is_best) {
        res->best_val_acc = acc, res->best_epoch = epoch, *since_best = 0;
    } else {
        (*since_best)++;
    }
    if (tp->progress) {
        levi_vision_progress pr = {tp->lr,    tp->seed, epoch, tp->max_epochs, steps, steps,
                                   loss_mean, 1,        acc};
        tp->progress(tp->progress_user, &pr);
    }
    return is_best;
}

levi_status levi_vision_train(levi_vision_model *m, const levi_vision_data *d, const int64_t *train,
                              int64_t n_train, const int64_t *val, int64_t n_val,
                              const levi_vision_train_params *tp, levi_vision_train_result *res,
                              levi_error *err) {
    levi_vision_train_result local;
    if (!res) res = &local;
    memset(res, 0, sizeof *res);
    levi_status st = levi__vision_train_check(tp, n_train, "training", err);
    if (st != LEVI_OK) return st;
    st = data_check(m, d, train, n_train, "train rows", err);
    if (st == LEVI_OK) st = data_check(m, d, val, n_val, "validation rows", err);
    if (st != LEVI_OK) return st;
    double t0 = levi_now();
    levi_rng root;
    levi_rng_seed(&root, tp->seed);
    levi_rng init_rng = levi_rng_split(&root), shuffle_rng = levi_rng_split(&root);
    levi_vision_model_reset(m, d, train, n_train, levi_rng_u64(&init_rng));
    levi_optim_params op = levi_optim_default_params(LEVI_OPT_SGD);
    op.lr = tp->lr;
    op.momentum = tp->momentum;
    levi_optim *opt = levi_optim_init(&m->params, op);
    const size_t numel = m->params.numel;
    float *best = levi_xmalloc(numel * sizeof(float));
    memcpy(best, m->params.data, numel * sizeof(float));
    int64_t *order = levi_xmalloc((size_t)n_train * sizeof(int64_t));
    memcpy(order, train, (size_t)n_train * sizeof(int64_t));
    res->best_val_acc = -1;
    int since_best = 0;
    const int64_t steps = n_train / tp->batch_size + (n_train % tp->batch_size >= 2 ? 1 : 0);
    for (int epoch = 1; epoch <= tp->max_epochs && st == LEVI_OK; epoch++) {
        levi_rng_shuffle_i64(&shuffle_rng, order, n_train);
        double loss_sum = 0;
        int64_t seen = 0;
        for (int64_t s = 0; s < steps; s++) {
            if (tp->stop && *tp->stop) {
                st = levi_errorf(err, LEVI_ERR_INTERRUPTED, "training interrupted");
                break;
            }
            int64_t b0 = s * tp->batch_size;
            int64_t B = n_train - b0 < tp->batch_size ? n_train - b0 : tp->batch_size;
            levi_params_zero_grad(&m->params);
            double loss = levi_vision_loss_backward(m, d, order + b0, B);
            if (!isfinite(loss)) {
                res->diverged = 1;
                break;
            }
            levi_optim_step(opt);
            loss_sum += loss * (double)B, seen += B;
            levi__vision_step_progress(tp, epoch, s + 1, steps, loss_sum / (double)seen);
        }
        if (st != LEVI_OK || res->diverged) break;
        double acc = n_val > 0 ? levi_vision_accuracy(m, d, val, n_val) : 0.0;
        if (levi__vision_epoch_end(res, tp, epoch, steps, loss_sum / (double)(seen ? seen : 1), acc,
                                   n_val > 0, &since_best))
            memcpy(best, m->params.data, numel * sizeof(float));
        if (tp->patience > 0 && since_best >= tp->patience) break;
    }
    memcpy(m->params.data, best, numel * sizeof(float));
    levi_free(best);
    levi_free(order);
    levi_optim_free(opt);
    res->seconds = levi_now() - t0;
    if (st == LEVI_OK && res->diverged && res->best_epoch == 0)
        st = levi_errorf(err, LEVI_ERR_NUMERIC, "training diverged (lr %g) before any epoch",
                         (double)tp->lr);
    return st;
}

levi_status levi_vision_select(const levi_vision_model_params *mp,
                               const levi_vision_train_params *tp, const float *lr_grid, int n_lr,
                               int n_seeds, uint64_t first_seed, const levi_vision_data *d,
                               const int64_t *train, int64_t n_train, const int64_t *val,
                               int64_t n_val, const levi_vision_eval_set *sets, int n_sets,
                               levi_vision_select_result *res, levi_error *err) {
    memset(res, 0, sizeof *res);
    if (n_lr < 1 || n_lr > LEVI_VISION_MAX_GRID || n_seeds < 1 || n_seeds > LEVI_VISION_MAX_SEEDS ||
        n_sets < 0 || n_sets > LEVI_VISION_MAX_SETS)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "selection: %d learning rates (1..%d), %d seeds (1..%d), %d sets "
                           "(0..%d)",
                           n_lr, LEVI_VISION_MAX_GRID, n_seeds, LEVI_VISION_MAX_SEEDS, n_sets,
                           LEVI_VISION_MAX_SETS);
    levi_vision_model *m = NULL;
    levi_status st = levi_vision_model_init(&m, mp, d, err);
    if (st != LEVI_OK) return st;
    res->n_lr = n_lr, res->n_seeds = n_seeds, res->n_sets = n_sets;
    levi_vision_train_params t = *tp;
    float *best_w = levi_xmalloc(m->params.numel * sizeof(float));
    double best = -1;
    for (int i = 0; i < n_lr && st == LEVI_OK; i++) {
        res->lr[i] = lr_grid[i];
        t.lr = lr_grid[i], t.seed = first_seed;
        levi_vision_train_result r;
        st = levi_vision_train(m, d, train, n_train, val, n_val, &t, &r, err);
        if (st == LEVI_ERR_NUMERIC) st = LEVI_OK, r.best_val_acc = -1; /* diverged: worst */
        if (st != LEVI_OK) break;
        res->lr_val_acc[i] = r.best_val_acc;
        if (r.best_val_acc > best) {
            best = r.best_val_acc, res->best_lr_index = i, res->train[0] = r;
            memcpy(best_w, m->params.data, m->params.numel * sizeof(float));
        }
    }
    for (int s = 0; s < n_seeds && st == LEVI_OK; s++) {
        if (s == 0) {
            memcpy(m->params.data, best_w, m->params.numel * sizeof(float));
        } else {
            t.lr = res->lr[res->best_lr_index], t.seed = first_seed + (uint64_t)s;
            st = levi_vision_train(m, d, train, n_train, val, n_val, &t, &res->train[s], err);
            if (st != LEVI_OK) break;
        }
        for (int k = 0; k < n_sets && st == LEVI_OK; k++) {
            st = data_check(m, sets[k].data, sets[k].rows, sets[k].n, sets[k].name, err);
            if (st == LEVI_OK)
                res->acc[s][k] = levi_vision_accuracy(m, sets[k].data, sets[k].rows, sets[k].n);
        }
    }
    for (int k = 0; k < n_sets && st == LEVI_OK; k++) {
        double mean = 0, var = 0;
        for (int s = 0; s < n_seeds; s++) mean += res->acc[s][k];
        mean /= n_seeds;
        for (int s = 0; s < n_seeds; s++) var += (res->acc[s][k] - mean) * (res->acc[s][k] - mean);
        res->mean[k] = mean;
        res->std[k] = n_seeds > 1 ? sqrt(var / (n_seeds - 1)) : 0.0;
    }
    levi_free(best_w);
    levi_vision_model_free(m);
    return st;
}
