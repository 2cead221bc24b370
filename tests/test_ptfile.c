/* Tests for include/levi/ptfile.h against fixtures written by tests/ref/gen_ptfile_ref.py
 * (torch.save in both formats, values from torch.load): every dtype, shared storages with
 * offsets, transposed and strided views, scalars, nested dicts and OrderedDicts with
 * _metadata; hostile pickles naming posix.system, compressed archives, every truncation of
 * every fixture, and thousands of seeded byte mutations (run under ASan as well). With
 * LEVI_EFFNET_PTH set, the real EfficientNet-Lite0 checkpoint: all 296 tensors' names, shapes
 * and SHA-256 of their bytes match torch.load (skipped when the variable is unset).
 * Not for: writing checkpoints (ptfile only reads). */
#include "testutil.h"

#include "levi/ptfile.h"
#include "levi/safetensors.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define REF_DIR "tests/ref/ptfile/"
#define REFUSAL                                                                                    \
    "refusing to load global 'posix.system': ptfile loads tensors only, it never executes code"

static char tmpdir[512];
static cJSON *expected;

static int setup(void **state) {
    levi_test_tmpdir(tmpdir, sizeof tmpdir);
    char *text = NULL;
    size_t len = 0;
    levi_error err = {0};
    if (levi_read_file(levi_test_source_path(REF_DIR "expected.json"), &text, &len, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    expected = cJSON_Parse(text);
    free(text);
    return expected ? 0 : -1;
}

static int teardown(void **state) {
    cJSON_Delete(expected);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *fixture(const char *name) {
    static char buf[4][1024];
    static int next;
    char *b = buf[next++ % 4];
    snprintf(b, sizeof buf[0], "%s", levi_test_source_path(name));
    return b;
}

static void write_bytes(const char *path, const void *data, size_t len) {
    unlink(path); /* a fresh file: rewriting a truncated one makes ext4 flush on close */
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot create %s", path);
    if (len && fwrite(data, 1, len, f) != len) fail_msg("short write to %s", path);
    fclose(f);
}

static unsigned char *slurp(const char *path, size_t *len) {
    char *buf = NULL;
    levi_error err = {0};
    if (levi_read_file(path, &buf, len, &err)) fail_msg("%s", err.msg);
    return (unsigned char *)buf;
}

static levi_pt_file *open_ok(const char *path) {
    levi_error err = {0};
    levi_pt_file *f = levi_pt_open(path, &err);
    if (!f) fail_msg("levi_pt_open(%s): %s", path, err.msg);
    return f;
}

static void expect_open_fails(const char *path, const char *want) {
    levi_error err = {0};
    levi_pt_file *f = levi_pt_open(path, &err);
    if (f) {
        levi_pt_close(f);
        fail_msg("%s opened, expected an error containing '%s'", path, want);
    }
    if (!strstr(err.msg, want)) fail_msg("%s: message '%s' lacks '%s'", path, err.msg, want);
    if (!strstr(err.msg, path)) fail_msg("message '%s' does not name the file", err.msg);
}

static const char *dtype_str(levi_dtype dt) {
    return levi_dtype_name(dt);
}

static float element_f32(const levi_tensor *t, int64_t i) {
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case LEVI_F32: {
        float v;
        memcpy(&v, p + 4 * i, 4);
        return v;
    }
    case LEVI_F16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return levi_f16_to_f32(h);
    }
    case LEVI_BF16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return levi_bf16_to_f32(h);
    }
    default:
        fail_msg("not a float dtype");
        return 0;
    }
}

static int64_t element_i64(const levi_tensor *t, int64_t i) {
    const unsigned char *p = t->data;
    if (t->dtype == LEVI_I64) {
        int64_t v;
        memcpy(&v, p + 8 * i, 8);
        return v;
    }
    if (t->dtype == LEVI_I32) {
        int32_t v;
        memcpy(&v, p + 4 * i, 4);
        return v;
    }
    return p[i];
}

/* Every tensor of f against the reference list (order, name, dtype, shape, SHA-256 of the
 * bytes, and the values when listed: exact, since both sides hold the same F32/F16/BF16). */
static void check_against(const levi_pt_file *f, const cJSON *list, const char *what) {
    int n = cJSON_GetArraySize(list);
    assert_int_equal(levi_pt_count(f), n);
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_GetArrayItem(list, i);
        const levi_tensor *t = levi_pt_tensor(f, i);
        const char *name = cJSON_GetObjectItem(e, "name")->valuestring;
        if (strcmp(t->name, name) != 0)
            fail_msg("%s: tensor %d is '%s', expected '%s'", what, i, t->name, name);
        assert_ptr_equal(levi_pt_find(f, name), t);
        const char *dt = cJSON_GetObjectItem(e, "dtype")->valuestring;
        if (strcmp(dtype_str(t->dtype), dt) != 0)
            fail_msg("%s: '%s' has dtype %s, expected %s", what, name, dtype_str(t->dtype), dt);
        const cJSON *shape = cJSON_GetObjectItem(e, "shape");
        assert_int_equal(t->ndim, cJSON_GetArraySize(shape));
        for (int d = 0; d < t->ndim; d++)
            assert_int_equal(t->shape[d], (int64_t)cJSON_GetArrayItem(shape, d)->valuedouble);
        int64_t numel = levi_tensor_numel(t);
        char hex[65];
        levi_sha256_hex(t->data, (size_t)numel * levi_dtype_size(t->dtype), hex);
        const char *want = cJSON_GetObjectItem(e, "sha256")->valuestring;
        if (strcmp(hex, want) != 0)
            fail_msg("%s: '%s' bytes hash %s, expected %s", what, name, hex, want);
        const cJSON *vals = cJSON_GetObjectItem(e, "values");
        if (!vals) continue;
        assert_int_equal(cJSON_GetArraySize(vals), numel);
        for (int64_t k = 0; k < numel; k++) {
            const cJSON *v = cJSON_GetArrayItem(vals, (int)k);
            if (cJSON_IsString(v)) {
                long long w = strtoll(v->valuestring, NULL, 10);
                if (element_i64(t, k) != w)
                    fail_msg("%s: '%s'[%lld] = %lld, expected %lld", what, name, (long long)k,
                             (long long)element_i64(t, k), w);
            } else {
                float got = element_f32(t, k), w = (float)v->valuedouble;
                if (got != w)
                    fail_msg("%s: '%s'[%lld] = %.9g, expected %.9g", what, name, (long long)k, got,
                             w);
            }
        }
    }
}

static void test_mixed_both_formats(void **state) {
    const char *files[] = {REF_DIR "mixed_zip.torch", REF_DIR "mixed_legacy.torch"};
    for (int k = 0; k < 2; k++) {
        levi_pt_file *f = open_ok(fixture(files[k]));
        check_against(f, cJSON_GetObjectItem(expected, "mixed"), files[k]);

        /* Contiguous views of one storage point into it: b starts 2 floats after a. */
        const levi_tensor *a = levi_pt_find(f, "state_dict.shared.a");
        const levi_tensor *b = levi_pt_find(f, "state_dict.shared.b");
        assert_non_null(a);
        assert_non_null(b);
        assert_ptr_equal((const float *)b->data, (const float *)a->data + 2);
        /* The transposed view is a contiguous copy: strides describe [4, 3] row-major. */
        const levi_tensor *t = levi_pt_find(f, "state_dict.shared.t");
        assert_int_equal(t->strides[0], 3);
        assert_int_equal(t->strides[1], 1);
        const levi_tensor *s = levi_pt_find(f, "state_dict.num_batches_tracked");
        assert_int_equal(s->ndim, 0);
        assert_int_equal(levi_tensor_numel(s), 1);
        assert_int_equal(element_i64(s, 0), 12345);

        /* read_f32 converts F16/BF16 (and F64 was rounded at load) and checks shapes. */
        levi_error err = {0};
        float buf[8];
        int64_t sh4[1] = {4}, sh22[2] = {2, 2}, sh3[1] = {3}, bad[2] = {3, 3};
        assert_int_equal(levi_pt_read_f32(f, "state_dict.f16", 1, sh4, buf, &err), LEVI_OK);
        assert_true(buf[0] == element_f32(levi_pt_find(f, "state_dict.f16"), 0));
        assert_int_equal(levi_pt_read_f32(f, "state_dict.bf16", 2, sh22, buf, &err), LEVI_OK);
        assert_int_equal(levi_pt_read_f32(f, "state_dict.f64", 1, sh3, buf, &err), LEVI_OK);
        const cJSON *f64 = cJSON_GetArrayItem(cJSON_GetObjectItem(expected, "mixed"), 3);
        assert_string_equal(cJSON_GetObjectItem(f64, "name")->valuestring, "state_dict.f64");
        assert_true(buf[2] ==
                    (float)cJSON_GetArrayItem(cJSON_GetObjectItem(f64, "values"), 2)->valuedouble);
        assert_int_equal(levi_pt_read_f32(f, "state_dict.f32", 2, bad, buf, &err), LEVI_ERR_SHAPE);
        assert_non_null(strstr(err.msg, "expected shape [3, 3], found [2, 3]"));
        assert_int_equal(levi_pt_read_f32(f, "state_dict.i64", 1, sh3, buf, &err), LEVI_ERR_FORMAT);
        assert_non_null(strstr(err.msg, "I64"));
        assert_int_equal(levi_pt_read_f32(f, "nope", 1, sh3, buf, &err), LEVI_ERR_NOT_FOUND);
        assert_null(levi_pt_find(f, "history.0"));
        assert_null(levi_pt_find(f, "epoch"));
        levi_pt_close(f);
    }
}

static void test_small_both_formats(void **state) {
    const char *files[] = {REF_DIR "small_zip.torch", REF_DIR "small_legacy.torch"};
    for (int k = 0; k < 2; k++) {
        levi_pt_file *f = open_ok(fixture(files[k]));
        check_against(f, cJSON_GetObjectItem(expected, "small"), files[k]);
        levi_pt_close(f);
    }
    levi_pt_close(NULL);
}

static void test_hostile_pickles_refused(void **state) {
    expect_open_fails(fixture(REF_DIR "evil_legacy.torch"), REFUSAL);
    expect_open_fails(fixture(REF_DIR "evil_magic.torch"), REFUSAL);
    expect_open_fails(fixture(REF_DIR "evil_zip.torch"), REFUSAL);
    expect_open_fails(fixture(REF_DIR "deflated_zip.torch"), "is compressed");
}

/* Hand-written pickles in the legacy layout, one per rule. */
static void test_hostile_handmade(void **state) {
    /* evil_legacy.torch is the legacy header (magic, protocol, system info) + evil_magic.torch. */
    size_t hlen, elen;
    unsigned char *full = slurp(fixture(REF_DIR "evil_legacy.torch"), &hlen);
    free(slurp(fixture(REF_DIR "evil_magic.torch"), &elen));
    assert_true(hlen > elen);
    size_t head = hlen - elen;
    static const struct {
        const char *pickle;
        size_t len;
        const char *want;
    } cases[] = {
#define PK(s) s, sizeof(s) - 1
        {PK("\x80\x02"
            "cbuiltins\neval\n."),
         "refusing to load global 'builtins.eval'"},
        {PK("\x80\x02"
            "ctorch\nShortStorage\n."),
         "'torch.ShortStorage' is not supported"},
        {PK("\x80\x02"
            "ctorch._utils\n_rebuild_qtensor\n."),
         "refusing to load global 'torch._utils._rebuild_qtensor'"},
        {PK("\x80\x02"
            "]q\x00h\x00"
            "a."),
         "the pickled object is a list"},
        {PK("\x80\x02"
            "}q\x00X\x01\x00\x00\x00"
            "ah\x00s."
            "\x80\x02]."),
         "nest deeper"},
        {PK("\x80\x02"
            "}."
            "\x80\x02"
            "]q\x00X\x01\x00\x00\x00"
            "7a."),
         "storage key '7' in the key list is not used by any tensor"},
        {PK("\x80\x02"
            "}h\x05."),
         "memo index 5 was never stored"},
        {PK("\x80\x02"
            "X\xff\xff\xff\x7f"
            "ab"),
         "runs past the end"},
        {PK("\x80\x02"
            "(((."),
         "STOP with an empty stack"},
        {PK("\x80\x02"
            "}(K\x01u."),
         "SETITEMS needs key/value pairs"},
        {PK("\x80\x02"
            "}X\x01\x00\x00\x00"
            "a"
            "Q."),
         "persistent id: expected a tuple"},
        {PK("\x80\x02"
            "}\x80"),
         "PROTO needs 1 more bytes"},
        {PK("\x80\x02"
            "}\xff."),
         "unsupported pickle opcode 0xff"},
        {PK("\x80\x02"
            "}"),
         "without a STOP"},
        {PK("\x80\x02"
            "}."),
         "storage key list"},
#undef PK
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        size_t n = head + cases[c].len;
        unsigned char *buf = malloc(n);
        memcpy(buf, full, head);
        memcpy(buf + head, cases[c].pickle, cases[c].len);
        char path[600];
        snprintf(path, sizeof path, "%s/hand%zu.pt", tmpdir, c);
        write_bytes(path, buf, n);
        expect_open_fails(path, cases[c].want);
        free(buf);
    }

    char path[600];
    snprintf(path, sizeof path, "%s/text.pt", tmpdir);
    write_bytes(path, "hello world\n", 12);
    expect_open_fails(path, "not a PyTorch checkpoint");
    snprintf(path, sizeof path, "%s/empty.pt", tmpdir);
    write_bytes(path, "", 0);
    expect_open_fails(path, "not a PyTorch checkpoint");
    /* The smallest valid legacy file: an empty dict and an empty key list. */
    size_t n = head + 8;
    unsigned char *buf = malloc(n);
    memcpy(buf, full, head);
    memcpy(buf + head, "\x80\x02}.\x80\x02].", 8);
    snprintf(path, sizeof path, "%s/emptydict.pt", tmpdir);
    write_bytes(path, buf, n);
    free(buf);
    free(full);
    levi_pt_file *f = open_ok(path);
    assert_int_equal(levi_pt_count(f), 0);
    assert_null(levi_pt_find(f, "x"));
    levi_pt_close(f);

    levi_error err = {0};
    snprintf(path, sizeof path, "%s/absent.pt", tmpdir);
    assert_null(levi_pt_open(path, &err));
    assert_int_equal(err.status, LEVI_ERR_IO);
}

static const char *const fuzz_fixtures[] = {REF_DIR "small_legacy.torch", REF_DIR "small_zip.torch",
                                            REF_DIR "mixed_legacy.torch",
                                            REF_DIR "mixed_zip.torch"};

static void test_every_truncation(void **state) {
    char path[600];
    snprintf(path, sizeof path, "%s/trunc.pt", tmpdir);
    for (size_t k = 0; k < sizeof fuzz_fixtures / sizeof fuzz_fixtures[0]; k++) {
        size_t len;
        unsigned char *buf = slurp(fixture(fuzz_fixtures[k]), &len);
        for (size_t n = 0; n < len; n++) {
            write_bytes(path, buf, n);
            levi_error err = {0};
            levi_pt_file *f = levi_pt_open(path, &err);
            if (f) {
                levi_pt_close(f);
                fail_msg("%s cut to %zu of %zu bytes opened without an error", fuzz_fixtures[k], n,
                         len);
            }
            if (err.status == LEVI_OK || err.msg[0] == '\0')
                fail_msg("no error message for a cut at %zu", n);
        }
        free(buf);
    }
}

/* Touches every byte of every tensor and reads float ones back, so ASan sees any bad pointer. */
static void exercise(const levi_pt_file *f) {
    unsigned sum = 0;
    for (int i = 0; i < levi_pt_count(f); i++) {
        const levi_tensor *t = levi_pt_tensor(f, i);
        size_t bytes = (size_t)levi_tensor_numel(t) * levi_dtype_size(t->dtype);
        const unsigned char *p = t->data;
        for (size_t b = 0; b < bytes; b++) sum += p[b];
        if (t->dtype == LEVI_F32 || t->dtype == LEVI_F16 || t->dtype == LEVI_BF16) {
            float *dst = malloc(bytes ? 4 * bytes : 4);
            levi_error err = {0};
            assert_int_equal(levi_pt_read_f32(f, t->name, t->ndim, t->shape, dst, &err), LEVI_OK);
            free(dst);
        }
    }
    (void)sum;
}

static void test_seeded_mutations(void **state) {
    char path[600];
    snprintf(path, sizeof path, "%s/mut.pt", tmpdir);
    levi_rng rng;
    levi_rng_seed(&rng, 20240611);
    int opened = 0, rejected = 0;
    const int iters = 4000;
    for (int it = 0; it < iters; it++) {
        /* Legacy files get most of the budget: zip entries carry CRCs, so most mutations of
         * a zip stop at libzip, while every legacy byte reaches the unpickler. */
        size_t k = it % 4 == 3 ? 1 + 2 * levi_rng_below(&rng, 2) : 2 * levi_rng_below(&rng, 2);
        size_t len;
        unsigned char *buf = slurp(fixture(fuzz_fixtures[k]), &len);
        int nmut = 1 + (int)levi_rng_below(&rng, 4);
        for (int m = 0; m < nmut; m++) {
            size_t pos = levi_rng_below(&rng, (uint32_t)len);
            uint32_t kind = levi_rng_below(&rng, 4);
            if (kind == 0)
                buf[pos] ^= (unsigned char)(1u << levi_rng_below(&rng, 8));
            else if (kind == 1)
                buf[pos] = (unsigned char)levi_rng_below(&rng, 256);
            else if (kind == 2)
                buf[pos] =
                    (unsigned char)"\x00\x01\x7f\x80\xff()tqhjRQ.}"[levi_rng_below(&rng, 16)];
            else
                buf[pos] = (unsigned char)(buf[pos] + 1);
        }
        write_bytes(path, buf, len);
        free(buf);
        levi_error err = {0};
        levi_pt_file *f = levi_pt_open(path, &err);
        if (f) {
            exercise(f);
            levi_pt_close(f);
            opened++;
        } else {
            if (err.msg[0] == '\0') fail_msg("mutation %d: rejected without a message", it);
            rejected++;
        }
    }
    printf("mutations: %d opened, %d rejected\n", opened, rejected);
    assert_int_equal(opened + rejected, iters);
    assert_true(rejected > iters / 10); /* the mutations do reach the checks */
}

static void test_effnet(void **state) {
    const char *pth = levi_test_env_path("LEVI_EFFNET_PTH");
    if (!pth) {
        printf("SKIP test_effnet: LEVI_EFFNET_PTH is not set (efficientnet-lite0-*.pth)\n");
        skip();
    }
    size_t len;
    char *text = (char *)slurp(fixture(REF_DIR "effnet_lite0.json"), &len);
    cJSON *ref = cJSON_Parse(text);
    free(text);
    assert_non_null(ref);
    double t0 = levi_now();
    levi_pt_file *f = open_ok(pth);
    printf("opened %s in %.3f s\n", pth, levi_now() - t0);
    assert_int_equal(levi_pt_count(f), 296);
    assert_int_equal(cJSON_GetObjectItem(ref, "count")->valueint, 296);
    check_against(f, cJSON_GetObjectItem(ref, "tensors"), "effnet");
    const cJSON *sums = cJSON_GetObjectItem(ref, "sums");
    const cJSON *e;
    cJSON_ArrayForEach(e, sums) {
        const levi_tensor *t = levi_pt_find(f, e->string);
        assert_non_null(t);
        int64_t n = levi_tensor_numel(t);
        float *v = malloc((size_t)n * sizeof *v);
        levi_error err = {0};
        assert_int_equal(levi_pt_read_f32(f, e->string, t->ndim, t->shape, v, &err), LEVI_OK);
        double s = 0, a = 0;
        for (int64_t i = 0; i < n; i++) s += v[i], a += fabs(v[i]);
        double ws = cJSON_GetObjectItem(e, "sum")->valuedouble;
        double wa = cJSON_GetObjectItem(e, "abs_sum")->valuedouble;
        /* Same F32 values summed in double in another order: 1e-9 of the absolute sum. */
        if (fabs(s - ws) > 1e-9 * wa || fabs(a - wa) > 1e-9 * wa)
            fail_msg("%s: sum %.12g abs %.12g, expected %.12g %.12g", e->string, s, a, ws, wa);
        const cJSON *first = cJSON_GetObjectItem(e, "first");
        for (int i = 0; i < 4; i++)
            assert_true(v[i] == (float)cJSON_GetArrayItem(first, i)->valuedouble);
        free(v);
    }
    int64_t stem[4] = {32, 3, 3, 3};
    float *w = malloc(32 * 27 * sizeof *w);
    levi_error err = {0};
    assert_int_equal(levi_pt_read_f32(f, "_conv_stem.weight", 4, stem, w, &err), LEVI_OK);
    free(w);
    levi_pt_close(f);
    cJSON_Delete(ref);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixed_both_formats),
        cmocka_unit_test(test_small_both_formats),
        cmocka_unit_test(test_hostile_pickles_refused),
        cmocka_unit_test(test_hostile_handmade),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_seeded_mutations),
        cmocka_unit_test(test_effnet),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
