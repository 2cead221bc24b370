/* Tests of include/levi/featcache.h: F32 -> F16 conversion (always); with LEVI_MODEL_DIR
 * (all-MiniLM-L6-v2): cached features against a direct encoder forward + pooling, F16
 * rounding, cache hits, key changes, resumption after interruption (byte-identical files),
 * damaged chunks and foreign manifests. Without the model only the conversion test runs and
 * the binary exits 77 (skipped). */
#include "levi/bert.h"
#include "levi/featcache.h"
#include "levi/safetensors.h"
#include "levi/tokenizer.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_TEXTS 40
static const char *g_model;
static char *g_texts[N_TEXTS];
static char g_root[512];

/* Varied lengths (about 8 to 45 tokens) so batches pad differently and sorting matters. */
static void make_texts(void) {
    static const char *titles[] = {
        "Toy Story (1995)",      "GoldenEye (1995)",
        "Four Rooms (1995)",     "Get Shorty (1995)",
        "Copycat (1995)",        "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",
        "Twelve Monkeys (1995)", "Babe (1995)"};
    static const char *jobs[] = {"doctor", "writer", "student", "engineer", "artist"};
    for (int i = 0; i < N_TEXTS; i++) {
        char buf[512];
        if (i % 3 == 0)
            snprintf(buf, sizeof buf, "Movie %d: %s.", i, titles[i % 8]);
        else if (i % 3 == 1)
            snprintf(buf, sizeof buf,
                     "When the user id is %d, the user occupation is %s, the movie title is %s, "
                     "what can be the user rating on this movie?:",
                     100 + i, jobs[i % 5], titles[(i * 3) % 8]);
        else
            snprintf(buf, sizeof buf,
                     "When the user id is %d, the user age is %d, the user occupation is %s, the "
                     "user zipcode is %05d, the movie title is %s, and the movie id is %d, what "
                     "can be the user rating on this movie?:",
                     7 * i, 18 + i, jobs[(i + 2) % 5], 10000 + 37 * i, titles[(i * 5) % 8],
                     300 + i);
        g_texts[i] = strdup(buf);
    }
}

static levi_featcache_params small_params(void) {
    levi_featcache_params p = levi_featcache_default_params();
    p.n_layers = 2;
    p.layers[0] = 6; /* given unsorted on purpose: the cache sorts */
    p.layers[1] = 3;
    p.batch_size = 8;
    p.chunk_size = 16; /* 40 texts -> 3 chunks (16, 16, 8) */
    p.max_len = 32;    /* some texts are longer: truncation is exercised */
    p.dtype = LEVI_F32;
    return p;
}

static void subroot(char *out, size_t cap, const char *name) {
    snprintf(out, cap, "%s/%s", g_root, name);
}

static int files_equal(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    levi_error err = {0};
    if (levi_read_file(a, &x, &nx, &err) != LEVI_OK) return 0;
    if (levi_read_file(b, &y, &ny, &err) != LEVI_OK) {
        free(x);
        return 0;
    }
    int eq = nx == ny && memcmp(x, y, nx) == 0;
    free(x);
    free(y);
    return eq;
}

/* ---- F16 conversion (no model needed) ------------------------------------------------ */

static uint16_t to_f16(float f) {
    uint16_t h;
    levi_featcache_to_f16(&f, &h, 1);
    return h;
}

static void test_f16_conversion(void **state) {
    (void)state;
    assert_int_equal(to_f16(0.0f), 0x0000);
    assert_int_equal(to_f16(-0.0f), 0x8000);
    assert_int_equal(to_f16(1.0f), 0x3c00);
    assert_int_equal(to_f16(-2.0f), 0xc000);
    assert_int_equal(to_f16(65504.0f), 0x7bff);
    assert_int_equal(to_f16(65519.0f), 0x7bff);
    assert_int_equal(to_f16(65520.0f), 0x7c00); /* halfway above the max rounds to inf */
    assert_int_equal(to_f16(INFINITY), 0x7c00);
    assert_int_equal(to_f16(-INFINITY), 0xfc00);
    assert_true((to_f16(NAN) & 0x7c00) == 0x7c00 && (to_f16(NAN) & 0x3ff) != 0);
    assert_int_equal(to_f16(0x1p-14f), 0x0400);          /* smallest normal */
    assert_int_equal(to_f16(0x1p-24f), 0x0001);          /* smallest subnormal */
    assert_int_equal(to_f16(0x1p-25f), 0x0000);          /* tie -> even (0) */
    assert_int_equal(to_f16(0x1.8p-25f), 0x0001);        /* above the tie */
    assert_int_equal(to_f16(0x1.8p-24f), 0x0002);        /* 1.5 ulp tie -> even (2) */
    assert_int_equal(to_f16(1.0f + 0x1p-11f), 0x3c00);   /* tie -> even */
    assert_int_equal(to_f16(1.0f + 0x1.8p-10f), 0x3c02); /* 1.5 ulp tie -> even */
    assert_int_equal(to_f16(0x1.ff8p-15f), 0x03ff);      /* largest subnormal */
    assert_int_equal(to_f16(0x1.ffap-15f), 0x03ff);      /* below the tie */
    assert_int_equal(to_f16(0x1.ffcp-15f), 0x0400);      /* tie -> even: into the normals */
    /* Every finite half survives a round trip. */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00) continue;
        float f = levi_f16_to_f32((uint16_t)h);
        if (to_f16(f) != h) fail_msg("half 0x%04x -> %g -> 0x%04x", h, (double)f, to_f16(f));
    }
#if defined(__FLT16_MAX__)
    /* The compiler's own conversion (round to nearest even) on random bit patterns. */
    levi_rng rng;
    levi_rng_seed(&rng, 7);
    for (int i = 0; i < 1000000; i++) {
        uint32_t bits = (uint32_t)levi_rng_u64(&rng);
        float f;
        memcpy(&f, &bits, 4);
        if (isnan(f)) continue;
        _Float16 ref = (_Float16)f;
        uint16_t rb;
        memcpy(&rb, &ref, 2);
        if (to_f16(f) != rb) fail_msg("%a -> 0x%04x, compiler 0x%04x", (double)f, to_f16(f), rb);
    }
#endif
}

/* ---- with the model --------------------------------------------------------------------- */

/* The direct computation the cache must reproduce: each text alone (B = 1, no padding),
 * tokenised with truncation at max_len, mean-pooled hidden states. */
static void direct_features(const levi_featcache_params *p, const int *layers, int n_layers,
                            float *out /* [N_TEXTS, n_layers, 384] */) {
    levi_error err = {0};
    levi_tokenizer *tok = levi_tokenizer_open(g_model, &err);
    assert_non_null(tok);
    levi_bert *bert = levi_bert_open(g_model, &err);
    if (!bert) fail_msg("%s", err.msg);
    int H = levi_bert_get_config(bert)->hidden;
    assert_int_equal(H, 384);
    levi_bert_forward_params fp = levi_bert_default_forward_params();
    int32_t ids[512], mask[512];
    for (int i = 0; i < N_TEXTS; i++) {
        int len = 0;
        assert_int_equal(levi_tokenizer_encode(tok, g_texts[i], p->max_len, ids, &len, &err),
                         LEVI_OK);
        for (int s = 0; s < len; s++) mask[s] = 1;
        assert_int_equal(levi_bert_forward(bert, ids, mask, NULL, 1, len, &fp, &err), LEVI_OK);
        for (int j = 0; j < n_layers; j++) {
            float *dst = out + ((size_t)i * n_layers + j) * H;
            if (p->pooling == LEVI_POOL_MEAN) {
                levi_bert_meanpool(bert, layers[j], dst);
            } else {
                memcpy(dst, levi_bert_hidden(bert, layers[j]), (size_t)H * sizeof(float));
            }
        }
    }
    levi_bert_free(bert);
    levi_tokenizer_close(tok);
}

static void test_matches_direct_forward(void **state) {
    (void)state;
    char root[600];
    subroot(root, sizeof root, "direct");
    for (int pooling = 0; pooling < 2; pooling++) {
        levi_featcache_params p = small_params();
        p.pooling = (levi_pooling)pooling;
        levi_featcache_info info;
        levi_error err = {0};
        levi_status st = levi_featcache_build(root, g_model, (const char *const *)g_texts, N_TEXTS,
                                              &p, &info, &err);
        if (st != LEVI_OK) fail_msg("%s", err.msg);
        assert_int_equal(info.n_chunks, 3);
        assert_int_equal(info.chunks_computed, 3);
        assert_int_equal(info.n_layers, 2);
        assert_int_equal(info.layers[0], 3);
        assert_int_equal(info.layers[1], 6);
        assert_true(info.truncated > 0 && info.truncated < N_TEXTS);
        assert_int_equal(info.max_tokens, 32);
        assert_int_equal(info.texts_computed, N_TEXTS);
        assert_true(info.padded_tokens >= info.tokens_computed);

        levi_features f;
        if (levi_featcache_load(info.dir, NULL, 0, &f, &err) != LEVI_OK) fail_msg("%s", err.msg);
        assert_int_equal(f.n, N_TEXTS);
        assert_int_equal(f.n_layers, 2);
        assert_int_equal(f.dim, 384);
        float *ref = malloc((size_t)N_TEXTS * 2 * 384 * sizeof(float));
        direct_features(&p, f.layers, 2, ref);
        /* Batching with padding must not change the numbers beyond summation order (the
         * encoder gives padded keys exactly zero weight); measured: 0 (bit-identical). */
        double d = levi_test_max_abs_diff(f.data, ref, (int64_t)N_TEXTS * 2 * 384);
        printf("  %s pooling: max |cache - direct| = %.3g\n", pooling ? "cls" : "mean", d);
        assert_true(d <= 1e-6);

        /* A layer subset, in the caller's order. */
        int six = 6;
        levi_features g;
        if (levi_featcache_load(info.dir, &six, 1, &g, &err) != LEVI_OK) fail_msg("%s", err.msg);
        assert_int_equal(g.n_layers, 1);
        for (int i = 0; i < N_TEXTS; i++)
            assert_memory_equal(g.data + (size_t)i * 384, f.data + ((size_t)i * 2 + 1) * 384,
                                384 * sizeof(float));
        levi_features_free(&g);
        int absent = 2;
        assert_int_equal(levi_featcache_load(info.dir, &absent, 1, &g, &err), LEVI_ERR_NOT_FOUND);
        assert_null(g.data);
        free(ref);
        levi_features_free(&f);
        levi_features_free(NULL);
    }
}

static void test_f16_cache_and_hit(void **state) {
    (void)state;
    char root[600];
    subroot(root, sizeof root, "f16");
    levi_featcache_params p = small_params();
    levi_featcache_info i32, i16, hit;
    levi_error err = {0};
    assert_int_equal(
        levi_featcache_build(root, g_model, (const char *const *)g_texts, N_TEXTS, &p, &i32, &err),
        LEVI_OK);
    p.dtype = LEVI_F16;
    assert_int_equal(
        levi_featcache_build(root, g_model, (const char *const *)g_texts, N_TEXTS, &p, &i16, &err),
        LEVI_OK);
    assert_string_not_equal(i32.key, i16.key);
    assert_int_equal(i16.chunks_computed, 3);
    levi_features a, b;
    assert_int_equal(levi_featcache_load(i32.dir, NULL, 0, &a, &err), LEVI_OK);
    assert_int_equal(levi_featcache_load(i16.dir, NULL, 0, &b, &err), LEVI_OK);
    /* Same batches, same numbers: each F16 value is the nearest half of the F32 one, so
     * within half an ulp: |h - x| <= 2^-11 |x| (normals) or 2^-25 (subnormals). */
    int64_t cells = a.n * a.n_layers * a.dim;
    double worst = 0;
    for (int64_t k = 0; k < cells; k++) {
        double x = a.data[k], h = b.data[k];
        double bound = fmax(fabs(x) * 0x1p-11, 0x1p-25);
        if (fabs(h - x) > bound) fail_msg("cell %lld: f32 %.9g f16 %.9g", (long long)k, x, h);
        if (fabs(x) >= 0x1p-14 && fabs(h - x) / fabs(x) > worst) worst = fabs(h - x) / fabs(x);
    }
    printf("  f16 cache: max relative rounding error %.3g (bound 4.9e-4)\n", worst);
    assert_true(worst > 1e-5 && worst <= 0x1p-11); /* it really is half precision */

    /* Second call: a hit, nothing recomputed, even with another batch size and threads. */
    p.batch_size = 5;
    p.threads = 1;
    assert_int_equal(
        levi_featcache_build(root, g_model, (const char *const *)g_texts, N_TEXTS, &p, &hit, &err),
        LEVI_OK);
    assert_int_equal(hit.chunks_computed, 0);
    assert_int_equal(hit.chunks_repaired, 0);
    assert_int_equal(hit.chunks_reused, 3);
    assert_int_equal(hit.texts_computed, 0);
    assert_string_equal(hit.key, i16.key);
    assert_int_equal(hit.tokens, i16.tokens);
    assert_int_equal(hit.truncated, i16.truncated);
    levi_features_free(&a);
    levi_features_free(&b);
}

/* A copy of the model folder's small files with a stand-in weights file: the key only hashes
 * files and reads config.json, and hashing the real 90 MB weights 20 times would dominate the
 * test's run time. */
static void make_fake_model(char *dir, size_t cap) {
    snprintf(dir, cap, "%s/fake-model", g_root);
    levi_error err = {0};
    assert_int_equal(levi_mkdirs(dir, &err), LEVI_OK);
    const char *copy[] = {"config.json", "vocab.txt", "tokenizer_config.json"};
    for (int i = 0; i < 3; i++) {
        char src[2048], dst[2048], *text = NULL;
        size_t len = 0;
        snprintf(src, sizeof src, "%s/%s", g_model, copy[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, copy[i]);
        assert_int_equal(levi_read_file(src, &text, &len, &err), LEVI_OK);
        assert_int_equal(levi_write_file_atomic(dst, text, len, &err), LEVI_OK);
        free(text);
    }
    char dst[2048];
    snprintf(dst, sizeof dst, "%s/model.safetensors", dir);
    assert_int_equal(levi_write_file_atomic(dst, "weights v1", 10, &err), LEVI_OK);
}

static void test_key_changes(void **state) {
    (void)state;
    levi_featcache_params p = small_params();
    char base[65], other[65];
    levi_error err = {0};
    const char *const *texts = (const char *const *)g_texts;
    char model[1024];
    make_fake_model(model, sizeof model);
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &p, base, NULL, &err),
                     LEVI_OK);
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &p, other, NULL, &err),
                     LEVI_OK);
    assert_string_equal(base, other);
    /* Layer order as given does not matter (the set does). */
    levi_featcache_params q = p;
    q.layers[0] = 3;
    q.layers[1] = 6;
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &q, other, NULL, &err),
                     LEVI_OK);
    assert_string_equal(base, other);
    /* Batch, chunk size and threads do not change the numbers' identity. */
    q.batch_size = 3;
    q.chunk_size = 7;
    q.threads = 2;
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &q, other, NULL, &err),
                     LEVI_OK);
    assert_string_equal(base, other);

    /* One character of one text. */
    char *saved = g_texts[17];
    char *edited = strdup(saved);
    edited[strlen(edited) - 2] ^= 1;
    g_texts[17] = edited;
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &p, other, NULL, &err),
                     LEVI_OK);
    g_texts[17] = saved;
    free(edited);
    assert_string_not_equal(base, other);
    /* Text boundaries: the same bytes split differently. */
    const char *ab[] = {"ab", "c"}, *a_bc[] = {"a", "bc"};
    char k1[65], k2[65];
    assert_int_equal(levi_featcache_key(NULL, model, ab, 2, &p, k1, NULL, &err), LEVI_OK);
    assert_int_equal(levi_featcache_key(NULL, model, a_bc, 2, &p, k2, NULL, &err), LEVI_OK);
    assert_string_not_equal(k1, k2);
    /* Fewer texts. */
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS - 1, &p, other, NULL, &err),
                     LEVI_OK);
    assert_string_not_equal(base, other);

    struct {
        const char *what;
        levi_featcache_params p;
    } changes[6];
    for (int i = 0; i < 6; i++) changes[i].p = p;
    changes[0].what = "layer set";
    changes[0].p.layers[1] = 2;
    changes[1].what = "all layers";
    changes[1].p.n_layers = 0;
    changes[2].what = "pooling";
    changes[2].p.pooling = LEVI_POOL_CLS;
    changes[3].what = "max_len";
    changes[3].p.max_len = 33;
    changes[4].what = "dtype";
    changes[4].p.dtype = LEVI_F16;
    changes[5].what = "one layer";
    changes[5].p.n_layers = 1;
    for (int i = 0; i < 6; i++) {
        assert_int_equal(
            levi_featcache_key(NULL, model, texts, N_TEXTS, &changes[i].p, other, NULL, &err),
            LEVI_OK);
        if (strcmp(base, other) == 0) fail_msg("key unchanged by %s", changes[i].what);
    }

    /* Bad params name the field. */
    q = p;
    q.layers[0] = 7;
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &q, other, NULL, &err),
                     LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "layers: 7 is out of range 0..6"));
    q = p;
    q.layers[0] = 3;
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &q, other, NULL, &err),
                     LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "listed twice"));
    q = p;
    q.max_len = 513;
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &q, other, NULL, &err),
                     LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "max_len"));
    assert_int_equal(levi_featcache_key(NULL, model, texts, 0, &p, other, NULL, &err),
                     LEVI_ERR_ARG);

    /* Every model file is in the key. */
    const char *files[] = {"model.safetensors", "config.json", "vocab.txt",
                           "tokenizer_config.json"};
    for (int i = 0; i < 4; i++) {
        char path[1100], *text = NULL;
        size_t len = 0;
        snprintf(path, sizeof path, "%s/%s", model, files[i]);
        assert_int_equal(levi_read_file(path, &text, &len, &err), LEVI_OK);
        char *grown = malloc(len + 2);
        memcpy(grown, text, len);
        memcpy(grown + len, " ", 1); /* JSON and vocab stay valid: trailing whitespace */
        assert_int_equal(levi_write_file_atomic(path, grown, len + 1, &err), LEVI_OK);
        assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &p, other, NULL, &err),
                         LEVI_OK);
        if (strcmp(base, other) == 0) fail_msg("key unchanged by a change of %s", files[i]);
        assert_int_equal(levi_write_file_atomic(path, text, len, &err), LEVI_OK);
        free(text);
        free(grown);
    }
    /* tokenizer_config.json is optional, but its absence is part of the key too. */
    char path[1100];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &p, other, NULL, &err),
                     LEVI_OK);
    assert_string_not_equal(base, other);
    /* A missing required file names it. */
    snprintf(path, sizeof path, "%s/vocab.txt", model);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(levi_featcache_key(NULL, model, texts, N_TEXTS, &p, other, NULL, &err),
                     LEVI_ERR_IO);
    assert_non_null(strstr(err.msg, "vocab.txt"));
}

static void list_cache_files(const char *dir, char names[8][64], int *count) {
    *count = 0;
    snprintf(names[(*count)++], 64, "manifest.json");
    for (int c = 0; c < 3; c++) snprintf(names[(*count)++], 64, "chunk-%05d.safetensors", c);
}

typedef struct {
    volatile int *stop;
    int calls, stop_after;
} stopper;

static void stop_progress(void *user, int64_t done, int64_t total, double tps) {
    (void)done;
    (void)total;
    (void)tps;
    stopper *s = user;
    if (++s->calls == s->stop_after) *s->stop = 1;
}

static void test_resume_identical(void **state) {
    (void)state;
    char full[600], resumed[600];
    subroot(full, sizeof full, "full");
    subroot(resumed, sizeof resumed, "resumed");
    levi_featcache_params p = small_params();
    p.dtype = LEVI_F16;
    const char *const *texts = (const char *const *)g_texts;
    levi_featcache_info a, b;
    levi_error err = {0};
    assert_int_equal(levi_featcache_build(full, g_model, texts, N_TEXTS, &p, &a, &err), LEVI_OK);

    /* Run 1: one chunk, then a simulated kill. */
    p.max_chunks = 1;
    assert_int_equal(levi_featcache_build(resumed, g_model, texts, N_TEXTS, &p, &b, &err),
                     LEVI_ERR_INTERRUPTED);
    assert_int_equal(b.chunks_computed, 1);
    assert_non_null(strstr(err.msg, "build again to resume"));
    /* An incomplete cache is not loadable. */
    levi_features f;
    assert_int_equal(levi_featcache_load(b.dir, NULL, 0, &f, &err), LEVI_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "incomplete"));

    /* Run 2: the stop flag, raised after the first batch of the next chunk: that chunk is
     * dropped, the one before stays. */
    volatile int stop = 0;
    stopper s = {&stop, 0, 1};
    p.max_chunks = 0;
    p.stop = &stop;
    p.progress = stop_progress;
    p.progress_user = &s;
    assert_int_equal(levi_featcache_build(resumed, g_model, texts, N_TEXTS, &p, &b, &err),
                     LEVI_ERR_INTERRUPTED);
    assert_int_equal(b.chunks_reused, 1);
    assert_int_equal(b.chunks_computed, 0);
    assert_non_null(strstr(err.msg, "interrupted"));

    /* Run 3: finishes. */
    p.stop = NULL;
    p.progress = NULL;
    assert_int_equal(levi_featcache_build(resumed, g_model, texts, N_TEXTS, &p, &b, &err), LEVI_OK);
    assert_int_equal(b.chunks_reused, 1);
    assert_int_equal(b.chunks_computed, 2);
    assert_string_equal(a.key, b.key);

    char names[8][64];
    int count = 0;
    list_cache_files(a.dir, names, &count);
    for (int i = 0; i < count; i++) {
        char pa[2 * LEVI_FEATCACHE_PATH_MAX], pb[2 * LEVI_FEATCACHE_PATH_MAX];
        snprintf(pa, sizeof pa, "%s/%s", a.dir, names[i]);
        snprintf(pb, sizeof pb, "%s/%s", b.dir, names[i]);
        if (!files_equal(pa, pb)) fail_msg("%s differs between resumed and full runs", names[i]);
    }
}

static void test_damage(void **state) {
    (void)state;
    char root[600];
    subroot(root, sizeof root, "damage");
    levi_featcache_params p = small_params();
    const char *const *texts = (const char *const *)g_texts;
    levi_featcache_info info, again;
    levi_error err = {0};
    assert_int_equal(levi_featcache_build(root, g_model, texts, N_TEXTS, &p, &info, &err), LEVI_OK);
    levi_features good, f;
    assert_int_equal(levi_featcache_load(info.dir, NULL, 0, &good, &err), LEVI_OK);

    /* Truncated chunk: the load names the file; a build repairs it. */
    char path[LEVI_FEATCACHE_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/chunk-00001.safetensors", info.dir);
    long size = 0;
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    size = ftell(fp);
    fclose(fp);
    assert_int_equal(truncate(path, size / 2), 0);
    levi_status st = levi_featcache_load(info.dir, NULL, 0, &f, &err);
    assert_int_not_equal(st, LEVI_OK);
    printf("  truncated chunk: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "chunk-00001.safetensors"));
    assert_null(f.data);
    assert_int_equal(levi_featcache_build(root, g_model, texts, N_TEXTS, &p, &again, &err),
                     LEVI_OK);
    assert_int_equal(again.chunks_repaired, 1);
    assert_int_equal(again.chunks_reused, 2);
    assert_int_equal(levi_featcache_load(info.dir, NULL, 0, &f, &err), LEVI_OK);
    assert_memory_equal(f.data, good.data, (size_t)N_TEXTS * 2 * 384 * sizeof(float));
    levi_features_free(&f);

    /* A chunk of another cache in this one's place: the key metadata gives it away. */
    levi_featcache_params q = p;
    q.pooling = LEVI_POOL_CLS;
    levi_featcache_info other;
    assert_int_equal(levi_featcache_build(root, g_model, texts, N_TEXTS, &q, &other, &err),
                     LEVI_OK);
    char src[LEVI_FEATCACHE_PATH_MAX + 64], cmd[3 * LEVI_FEATCACHE_PATH_MAX];
    snprintf(src, sizeof src, "%s/chunk-00002.safetensors", other.dir);
    snprintf(path, sizeof path, "%s/chunk-00002.safetensors", info.dir);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", src, path);
    assert_int_equal(system(cmd), 0);
    assert_int_not_equal(levi_featcache_load(info.dir, NULL, 0, &f, &err), LEVI_OK);
    printf("  foreign chunk: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "chunk-00002.safetensors"));
    assert_non_null(strstr(err.msg, "another cache"));

    /* A manifest of another request in this key's directory (what a prefix collision
     * would look like): an error, never silent reuse. */
    snprintf(src, sizeof src, "%s/manifest.json", other.dir);
    snprintf(path, sizeof path, "%s/manifest.json", info.dir);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", src, path);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(levi_featcache_build(root, g_model, texts, N_TEXTS, &p, &again, &err),
                     LEVI_ERR_FORMAT);
    printf("  foreign manifest: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "disagrees with this request"));
    assert_non_null(strstr(err.msg, "\"pooling\""));

    /* A hand-edited manifest field: its key no longer matches its fields. */
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(levi_read_file(path, &text, &len, &err), LEVI_OK);
    char *at = strstr(text, "\"max_len\":");
    assert_non_null(at);
    at = strchr(at, '3');
    assert_non_null(at);
    *at = '4'; /* 32 -> 42 */
    assert_int_equal(levi_write_file_atomic(path, text, len, &err), LEVI_OK);
    free(text);
    assert_int_equal(levi_featcache_load(info.dir, NULL, 0, &f, &err), LEVI_ERR_FORMAT);
    printf("  edited manifest: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "hash to"));
    levi_features_free(&good);
}

int main(void) {
    const struct CMUnitTest always[] = {cmocka_unit_test(test_f16_conversion)};
    int failed = cmocka_run_group_tests_name("featcache_f16", always, NULL, NULL);
    if (failed) return failed;
    g_model = levi_test_require_path("LEVI_MODEL_DIR", "test_featcache",
                                     "the encoder tests need all-MiniLM-L6-v2");
    make_texts();
    levi_test_tmpdir(g_root, sizeof g_root);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_direct_forward), cmocka_unit_test(test_f16_cache_and_hit),
        cmocka_unit_test(test_key_changes), cmocka_unit_test(test_resume_identical),
        cmocka_unit_test(test_damage)};
    failed = cmocka_run_group_tests_name("featcache", tests, NULL, NULL);
    if (!failed) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_root);
    } else {
        fprintf(stderr, "kept %s for inspection\n", g_root);
    }
    for (int i = 0; i < N_TEXTS; i++) free(g_texts[i]);
    return failed;
}
