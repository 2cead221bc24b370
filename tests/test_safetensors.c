/* Tests for include/levi/safetensors.h: write/read round trips of every dtype, F16/BF16
 * conversion (exhaustive over all 65536 patterns), unaligned F32 data, the real
 * all-MiniLM-L6-v2 checkpoint (skipped when LEVI_MODEL_DIR is absent), and hostile files:
 * every truncation of a valid file, byte mutations of its header, and one file per
 * validation rule, each of which must fail with a message naming the file and the problem.
 * Not for: interoperability with Python (checked by hand, see the report of this module). */
#include "testutil.h"

#include "levi/safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[512];

/* "<tmpdir>/<name>" in one of four rotating buffers, so a few can be alive at once. */
static const char *tmp_path(const char *name) {
    static char buf[4][1024];
    static int next;
    char *b = buf[next++ % 4];
    snprintf(b, sizeof buf[0], "%s/%s", tmpdir, name);
    return b;
}

static void write_bytes(const char *path, const void *data, size_t len) {
    /* A fresh file each time: rewriting a truncated one makes ext4 flush it on close, which
     * turns thousands of small writes into tens of seconds. */
    unlink(path);
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot create %s", path);
    if (len && fwrite(data, 1, len, f) != len) fail_msg("short write to %s", path);
    fclose(f);
}

/* A safetensors file by hand: the 8-byte length field (hlen, which may lie), the header text
 * and dlen data bytes (a counting pattern). */
static void write_raw(const char *path, uint64_t hlen, const char *header, size_t dlen) {
    size_t htext = strlen(header);
    size_t len = 8 + htext + dlen;
    unsigned char *buf = malloc(len);
    assert_non_null(buf);
    for (int b = 0; b < 8; b++) buf[b] = (unsigned char)(hlen >> (8 * b));
    memcpy(buf + 8, header, htext);
    for (size_t i = 0; i < dlen; i++) buf[8 + htext + i] = (unsigned char)i;
    write_bytes(path, buf, len);
    free(buf);
}

/* Opening path must fail with every one of the substrings in the message. */
static void expect_open_fails(const char *path, const char *want1, const char *want2) {
    levi_error err = {0};
    levi_st_file *f = levi_st_open(path, &err);
    if (f) {
        levi_st_close(f);
        fail_msg("%s opened, expected an error containing '%s'", path, want1);
    }
    assert_int_not_equal(err.status, LEVI_OK);
    if (!strstr(err.msg, path)) fail_msg("message does not name the file: %s", err.msg);
    if (want1 && !strstr(err.msg, want1)) fail_msg("message lacks '%s': %s", want1, err.msg);
    if (want2 && !strstr(err.msg, want2)) fail_msg("message lacks '%s': %s", want2, err.msg);
}

/* Header written as text, its length field correct. */
static void expect_header_fails(const char *header, size_t dlen, const char *want1,
                                const char *want2) {
    const char *path = tmp_path("hostile.safetensors");
    write_raw(path, strlen(header), header, dlen);
    expect_open_fails(path, want1, want2);
}

/* ---- conversions ------------------------------------------------------------------------ */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void test_f16_exhaustive(void **state) {
    (void)state;
    /* Every pattern against the IEEE binary16 definition evaluated in double. */
    for (uint32_t h = 0; h < 65536; h++) {
        int sign = (h >> 15) & 1, exp = (h >> 10) & 31, mant = h & 1023;
        float got = levi_f16_to_f32((uint16_t)h);
        if (exp == 31) {
            if (mant == 0) {
                assert_true(isinf(got));
                assert_int_equal(signbit(got) != 0, sign);
            } else {
                assert_true(isnan(got));
                /* The payload survives: top mantissa bits move up by 13. */
                assert_int_equal(f32_bits(got) & 0x7fffffu, (uint32_t)mant << 13);
            }
            continue;
        }
        double want = exp == 0 ? ldexp(mant, -24) : ldexp(1024 + mant, exp - 25);
        if (sign) want = -want;
        if ((double)got != want || (signbit(got) != 0) != sign)
            fail_msg("f16 0x%04x: got %.9g, expected %.9g", h, got, want);
    }
    /* Landmarks, written out. */
    assert_true(levi_f16_to_f32(0x3c00) == 1.0f);
    assert_true(levi_f16_to_f32(0xc000) == -2.0f);
    assert_true(levi_f16_to_f32(0x7bff) == 65504.0f);
    assert_true(levi_f16_to_f32(0x3555) == 0.333251953125f);
    assert_true(levi_f16_to_f32(0x0400) == 6.103515625e-05f);        /* smallest normal */
    assert_true(levi_f16_to_f32(0x03ff) == 6.0975551605224609e-05f); /* largest subnormal */
    assert_true(levi_f16_to_f32(0x0001) == 5.9604644775390625e-08f); /* smallest subnormal */
    assert_true(levi_f16_to_f32(0x8001) == -5.9604644775390625e-08f);
    assert_true(signbit(levi_f16_to_f32(0x8000)) && levi_f16_to_f32(0x8000) == 0.0f);
    assert_true(isinf(levi_f16_to_f32(0x7c00)) && levi_f16_to_f32(0x7c00) > 0);
    assert_true(isinf(levi_f16_to_f32(0xfc00)) && levi_f16_to_f32(0xfc00) < 0);
    assert_true(isnan(levi_f16_to_f32(0x7e00)) && isnan(levi_f16_to_f32(0x7c01)));
}

static void test_bf16(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float got = levi_bf16_to_f32((uint16_t)h);
        assert_int_equal(f32_bits(got), h << 16); /* bfloat16 is the top half of an F32 */
    }
    assert_true(levi_bf16_to_f32(0x3f80) == 1.0f);
    assert_true(levi_bf16_to_f32(0xc000) == -2.0f);
    assert_true(levi_bf16_to_f32(0x3eab) == 0.333984375f);
    assert_true(levi_bf16_to_f32(0x0001) == 9.18354961579912115600575419705e-41f); /* 2^-133 */
    assert_true(levi_bf16_to_f32(0x0080) == 1.17549435082228750796873653722e-38f); /* 2^-126 */
    assert_true(signbit(levi_bf16_to_f32(0x8000)) && levi_bf16_to_f32(0x8000) == 0.0f);
    assert_true(isinf(levi_bf16_to_f32(0x7f80)) && levi_bf16_to_f32(0xff80) < 0);
    assert_true(isnan(levi_bf16_to_f32(0x7fc0)) && isnan(levi_bf16_to_f32(0xffc1)));
}

/* ---- round trip ------------------------------------------------------------------------- */

typedef struct {
    float f32[6];
    uint16_t f16[5], bf16[4];
    int32_t i32[3];
    int64_t i64[2];
    uint8_t u8[7];
    float scalar;
} sample_data;

static sample_data sample = {
    .f32 = {1.5f, -2.25f, 3.0e-39f, 1e30f, -0.0f, 7.0f},
    .f16 = {0x3c00, 0x0001, 0x7c00, 0xfc00, 0x3555},
    .bf16 = {0x3f80, 0x0001, 0xc000, 0x7f80},
    .i32 = {-1, 2147483647, 42},
    .i64 = {-9000000000000000000LL, 9000000000000000001LL},
    .u8 = {0, 1, 2, 254, 255, 7, 9},
    .scalar = 3.25f,
};

static int sample_tensors(levi_tensor *t) {
    memset(t, 0, 8 * sizeof *t);
    int64_t s_f32[2] = {2, 3}, s_f16[1] = {5}, s_bf16[2] = {2, 2}, s_i32[1] = {3},
            s_i64[2] = {2, 1}, s_u8[1] = {7}, s_empty[2] = {0, 4};
    struct {
        const char *name;
        levi_dtype dt;
        int nd;
        const int64_t *shape;
        void *data;
    } spec[8] = {
        {"u8.odd", LEVI_U8, 1, s_u8, sample.u8}, /* first, so alignment has to be arranged */
        {"a.f32", LEVI_F32, 2, s_f32, sample.f32},
        {"b.f16", LEVI_F16, 1, s_f16, sample.f16},
        {"c.bf16", LEVI_BF16, 2, s_bf16, sample.bf16},
        {"d.i32", LEVI_I32, 1, s_i32, sample.i32},
        {"e.i64", LEVI_I64, 2, s_i64, sample.i64},
        {"f.scalar", LEVI_F32, 0, NULL, &sample.scalar},
        {"g.empty", LEVI_F32, 2, s_empty, NULL},
    };
    for (int i = 0; i < 8; i++) {
        snprintf(t[i].name, sizeof t[i].name, "%s", spec[i].name);
        t[i].dtype = spec[i].dt;
        levi_tensor_set_shape(&t[i], spec[i].nd, spec[i].shape);
        t[i].data = spec[i].data;
    }
    return 8;
}

static void write_sample(const char *path) {
    levi_tensor t[8];
    int n = sample_tensors(t);
    const char *keys[2] = {"format", "note"}, *vals[2] = {"pt", "levi \"test\" \xc3\xa9"};
    levi_error err = {0};
    if (levi_st_write(path, t, n, keys, vals, 2, &err) != LEVI_OK) fail_msg("%s", err.msg);
}

static void test_round_trip(void **state) {
    (void)state;
    const char *path = tmp_path("sample.safetensors");
    write_sample(path);
    levi_tensor want[8];
    int n = sample_tensors(want);

    levi_error err = {0};
    levi_st_file *f = levi_st_open(path, &err);
    if (!f) fail_msg("%s", err.msg);
    assert_int_equal(levi_st_count(f), n);
    for (int i = 0; i < n; i++) {
        const levi_tensor *t = levi_st_tensor(f, i); /* header order = order given */
        assert_string_equal(t->name, want[i].name);
        assert_int_equal(t->dtype, want[i].dtype);
        assert_int_equal(t->ndim, want[i].ndim);
        for (int d = 0; d < t->ndim; d++) assert_int_equal(t->shape[d], want[i].shape[d]);
        size_t bytes = (size_t)levi_tensor_numel(t) * levi_dtype_size(t->dtype);
        if (bytes) assert_memory_equal(t->data, want[i].data, bytes);
        /* The writer orders data by element size, so each tensor is aligned to its own. */
        assert_int_equal((uintptr_t)t->data % levi_dtype_size(t->dtype), 0);
        assert_ptr_equal(levi_st_find(f, want[i].name), t);
    }
    assert_null(levi_st_find(f, "nope"));
    assert_string_equal(levi_st_metadata(f, "format"), "pt");
    assert_string_equal(levi_st_metadata(f, "note"), "levi \"test\" \xc3\xa9");
    assert_null(levi_st_metadata(f, "absent"));

    /* Reading as F32, converting the half types. */
    float out[6];
    int64_t s23[2] = {2, 3}, s5[1] = {5}, s22[2] = {2, 2};
    assert_int_equal(levi_st_read_f32(f, "a.f32", 2, s23, out, &err), LEVI_OK);
    assert_memory_equal(out, sample.f32, sizeof sample.f32);
    assert_int_equal(levi_st_read_f32(f, "b.f16", 1, s5, out, &err), LEVI_OK);
    for (int i = 0; i < 5; i++)
        assert_int_equal(f32_bits(out[i]), f32_bits(levi_f16_to_f32(sample.f16[i])));
    assert_true(out[0] == 1.0f && out[1] == 5.9604644775390625e-08f && isinf(out[2]));
    assert_int_equal(levi_st_read_f32(f, "c.bf16", 2, s22, out, &err), LEVI_OK);
    assert_true(out[0] == 1.0f && out[2] == -2.0f && isinf(out[3]));
    assert_int_equal(levi_st_read_f32(f, "f.scalar", 0, NULL, out, &err), LEVI_OK);
    assert_true(out[0] == 3.25f);

    /* Errors: wrong shape, wrong dtype, absent name; each names file and tensor. */
    int64_t s24[2] = {2, 4};
    assert_int_equal(levi_st_read_f32(f, "a.f32", 2, s24, out, &err), LEVI_ERR_SHAPE);
    assert_non_null(strstr(err.msg, "a.f32"));
    assert_non_null(strstr(err.msg, "expected shape [2, 4], found [2, 3]"));
    assert_non_null(strstr(err.msg, path));
    int64_t s3[1] = {3};
    assert_int_equal(levi_st_read_f32(f, "d.i32", 1, s3, out, &err), LEVI_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "dtype I32 cannot be read as F32"));
    assert_int_equal(levi_st_read_f32(f, "zzz", 1, s3, out, &err), LEVI_ERR_NOT_FOUND);
    assert_non_null(strstr(err.msg, "no tensor named 'zzz'"));
    levi_st_close(f);
    levi_st_close(NULL);

    /* The file layout: header length a multiple of 8, padded with spaces. */
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    unsigned char len8[8];
    assert_int_equal(fread(len8, 1, 8, fp), 8);
    uint64_t hlen = 0;
    for (int b = 7; b >= 0; b--) hlen = (hlen << 8) | len8[b];
    assert_int_equal(hlen % 8, 0);
    fclose(fp);
}

static void test_write_errors(void **state) {
    (void)state;
    levi_tensor t[8];
    int n = sample_tensors(t);
    levi_error err = {0};
    snprintf(t[1].name, sizeof t[1].name, "%s", t[0].name);
    assert_int_equal(levi_st_write(tmp_path("dup.safetensors"), t, n, NULL, NULL, 0, &err),
                     LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "given twice"));
    n = sample_tensors(t);
    t[1].strides[0] = 7; /* a transposed view cannot be written as is */
    assert_int_equal(levi_st_write(tmp_path("strided.safetensors"), t, n, NULL, NULL, 0, &err),
                     LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "contiguous"));
    n = sample_tensors(t);
    assert_int_equal(
        levi_st_write(tmp_path("no/such/dir/x.safetensors"), t, n, NULL, NULL, 0, &err),
        LEVI_ERR_IO);
    /* Nothing was left behind by the failed writes. */
    assert_int_not_equal(access(tmp_path("dup.safetensors"), F_OK), 0);
    /* Zero tensors is a valid (empty) file. */
    assert_int_equal(levi_st_write(tmp_path("empty.safetensors"), NULL, 0, NULL, NULL, 0, &err),
                     LEVI_OK);
    levi_st_file *f = levi_st_open(tmp_path("empty.safetensors"), &err);
    assert_non_null(f);
    assert_int_equal(levi_st_count(f), 0);
    levi_st_close(f);
}

/* An odd header length puts F32 data at an odd address; reads must still be right (UBSan
 * catches a misaligned float load). */
static void test_unaligned_f32(void **state) {
    (void)state;
    const char *header = "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}";
    size_t hlen = strlen(header);
    assert_int_equal(hlen % 2, 1);
    float vals[3] = {1.25f, -7.5f, 3.0e-40f};
    size_t len = 8 + hlen + sizeof vals;
    unsigned char *buf = malloc(len);
    assert_non_null(buf);
    for (int b = 0; b < 8; b++) buf[b] = (unsigned char)((uint64_t)hlen >> (8 * b));
    memcpy(buf + 8, header, hlen);
    memcpy(buf + 8 + hlen, vals, sizeof vals);
    const char *path = tmp_path("unaligned.safetensors");
    write_bytes(path, buf, len);
    free(buf);
    levi_error err = {0};
    levi_st_file *f = levi_st_open(path, &err);
    if (!f) fail_msg("%s", err.msg);
    float out[3];
    int64_t s[1] = {3};
    assert_int_equal(levi_st_read_f32(f, "x", 1, s, out, &err), LEVI_OK);
    assert_memory_equal(out, vals, sizeof vals);
    levi_st_close(f);
}

/* ---- hostile input ---------------------------------------------------------------------- */

static void test_every_truncation(void **state) {
    (void)state;
    const char *src = tmp_path("sample.safetensors");
    write_sample(src);
    char *buf = NULL;
    size_t len = 0;
    levi_error err = {0};
    if (levi_read_file(src, &buf, &len, &err) != LEVI_OK) fail_msg("%s", err.msg);
    assert_true(len > 100);
    const char *path = tmp_path("truncated.safetensors");
    for (size_t cut = 0; cut < len; cut++) {
        write_bytes(path, buf, cut);
        levi_st_file *f = levi_st_open(path, &err);
        if (f) fail_msg("prefix of %zu of %zu bytes opened", cut, len);
        if (!strstr(err.msg, path)) fail_msg("cut %zu: message lacks the file: %s", cut, err.msg);
        if (cut < 8) {
            assert_non_null(strstr(err.msg, "expected at least 8"));
        } else if (!strstr(err.msg, "header length at byte 0") &&
                   !strstr(err.msg, "past the end of the data")) {
            fail_msg("cut %zu: unexpected message: %s", cut, err.msg);
        }
    }
    free(buf);
}

/* Every header byte replaced by characters that matter to JSON: whatever opens must be
 * consistent (tensors inside the file); nothing may crash (this runs under ASan in CI). */
static void test_header_mutations(void **state) {
    (void)state;
    const char *src = tmp_path("sample.safetensors");
    write_sample(src);
    char *orig = NULL;
    size_t len = 0;
    levi_error err = {0};
    if (levi_read_file(src, &orig, &len, &err) != LEVI_OK) fail_msg("%s", err.msg);
    uint64_t hlen = 0;
    for (int b = 7; b >= 0; b--) hlen = (hlen << 8) | (unsigned char)orig[b];
    const char repl[] = {'"', '}', ']', '-', '9', ',', ':', '\\', '\0', (char)0xff};
    char *buf = malloc(len);
    assert_non_null(buf);
    const char *path = tmp_path("mutated.safetensors");
    int opened = 0, failed = 0;
    for (size_t i = 0; i < 8 + hlen; i++) {
        for (size_t r = 0; r < sizeof repl; r++) {
            if (i < 8 && r > 1) break; /* length bytes: two variants are plenty */
            memcpy(buf, orig, len);
            buf[i] = i < 8 ? (char)(0x80 >> r) : repl[r];
            write_bytes(path, buf, len);
            levi_st_file *f = levi_st_open(path, &err);
            if (!f) {
                assert_non_null(strstr(err.msg, path));
                failed++;
                continue;
            }
            opened++;
            /* mmap'd bytes are invisible to ASan, so check the extent by hand: all tensors
             * together fit in what the (possibly mutated) header length leaves for data. */
            uint64_t mlen = 0;
            for (int b = 7; b >= 0; b--) mlen = (mlen << 8) | (unsigned char)buf[b];
            const unsigned char *lo = NULL, *hi = NULL;
            for (int k = 0; k < levi_st_count(f); k++) {
                const levi_tensor *t = levi_st_tensor(f, k);
                size_t bytes = (size_t)levi_tensor_numel(t) * levi_dtype_size(t->dtype);
                const unsigned char *p = t->data;
                if (!lo || p < lo) lo = p;
                if (!hi || p + bytes > hi) hi = p + bytes;
            }
            if (lo) assert_true((uint64_t)(hi - lo) <= len - 8 - mlen);
            levi_st_close(f);
        }
    }
    /* Most mutations break the header; some (inside names and values) leave it valid. */
    printf("  header mutations: %d rejected, %d opened\n", failed, opened);
    assert_true(failed > 3 * opened);
    free(buf);
    free(orig);
}

static void test_hostile_headers(void **state) {
    (void)state;
    const char *path = tmp_path("hostile.safetensors");
    levi_error err = {0};

    /* The file itself. */
    assert_null(levi_st_open(tmp_path("does-not-exist.safetensors"), &err));
    assert_int_equal(err.status, LEVI_ERR_IO);
    assert_non_null(strstr(err.msg, "cannot open"));
    assert_null(levi_st_open(tmpdir, &err));
    assert_non_null(strstr(err.msg, "not a regular file"));
    write_bytes(path, "", 0);
    expect_open_fails(path, "file is 0 bytes, expected at least 8", NULL);
    write_bytes(path, "\x10\0\0", 3);
    expect_open_fails(path, "file is 3 bytes, expected at least 8", NULL);

    /* The length field. */
    write_raw(path, (uint64_t)1 << 62, "{}", 0);
    expect_open_fails(path, "header length at byte 0 is 4611686018427387904", "expected at most 2");
    write_raw(path, 1, "{}", 0); /* claims a 1-byte header: "{" */
    expect_open_fails(path, "header is not valid JSON", NULL);
    {
        /* A sparse file big enough to pass the first check but over the 100 MB cap. */
        uint64_t big = 150000000;
        write_raw(path, big, "{}", 0);
        assert_int_equal(truncate(path, (off_t)(big + 8)), 0);
        expect_open_fails(path, "is 150000000, expected at most 100000000", "cap");
    }

    /* The JSON. */
    expect_header_fails("{not json", 0, "header is not valid JSON", "file byte");
    expect_header_fails("", 0, "header is not valid JSON", NULL);
    expect_header_fails("{}  xyz ", 0, "unexpected byte 0x78", "expected space padding");
    expect_header_fails("[1, 2]", 0, "header must be a JSON object, found an array", NULL);
    {
        char deep[5000];
        memset(deep, '[', sizeof deep - 1);
        deep[sizeof deep - 1] = '\0';
        expect_header_fails(deep, 0, "header is not valid JSON", NULL); /* nesting limit */
    }

    /* Entries. */
    expect_header_fails("{\"t\": 5}", 0, "tensor 't': expected an object", "found a number");
    expect_header_fails("{\"t\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
                        "tensor 't': \"dtype\" must be a string", "found nothing");
    expect_header_fails("{\"t\": {\"dtype\": \"F64\", \"shape\": [1], \"data_offsets\": [0, 8]}}",
                        8, "tensor 't': unsupported dtype \"F64\"",
                        "expected one of F32, F16, BF16, I32, I64, U8");
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": \"2\", \"data_offsets\": [0, 8]}}",
                        8, "tensor 't': \"shape\" must be an array", "found a string");
    expect_header_fails(
        "{\"t\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4,
        "shape has 5 dimensions, expected at most 4", NULL);
    expect_header_fails(
        "{\"t\": {\"dtype\": \"F32\", \"shape\": [-1, 2], \"data_offsets\": [0, 8]}}", 8,
        "tensor 't': shape[0] is -1, expected a non-negative integer", NULL);
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [2.5], \"data_offsets\": [0, 8]}}",
                        8, "shape[0] is 2.5", NULL);
    expect_header_fails(
        "{\"t\": {\"dtype\": \"F32\", \"shape\": [1e300], \"data_offsets\": [0, 8]}}", 8,
        "shape[0] is 1e+300", "below 2^53");
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, "
                        "4294967296], \"data_offsets\": [0, 8]}}",
                        8, "tensor 't': shape [4294967296, 4294967296, 4294967296]",
                        "size overflows");
    expect_header_fails("{\"t\": {\"dtype\": \"I64\", \"shape\": [2147483648, 2147483648], "
                        "\"data_offsets\": [0, 8]}}",
                        8, "size overflows", NULL); /* 2^62 elements fit, 2^65 bytes do not */
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0]}}", 8,
                        "tensor 't': \"data_offsets\" must be [begin, end]", NULL);
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, -8]}}",
                        8, "\"data_offsets\" must be [begin, end]", NULL);
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [2]}}", 8,
                        "\"data_offsets\" must be [begin, end]", "found nothing");
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [8, 0]}}",
                        8, "tensor 't': data_offsets [8, 0] has begin > end", NULL);
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [250], \"data_offsets\": [0, "
                        "1000]}}",
                        16, "tensor 't': data_offsets end 1000 is past the end of the data",
                        "expected at most 16");
    expect_header_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, "
                        "20]}}",
                        24, "tensor 't': data_offsets [0, 20] span 20 bytes, expected 24",
                        "F32 [2, 3] = 6 elements of 4 bytes");
    expect_header_fails("{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
                        " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}",
                        24, "tensors 'a' and 'b' overlap",
                        "'b' starts at data byte 8, expected at or after 16");
    expect_header_fails("{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
                        " \"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [4, 8]}}",
                        8, "tensor 'a' appears more than once", NULL);
    {
        char header[512], name[201];
        memset(name, 'n', 200);
        name[200] = '\0';
        snprintf(header, sizeof header,
                 "{\"%s\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", name);
        expect_header_fails(header, 1, "is 200 bytes long, expected at most 127", NULL);
    }

    /* Metadata. */
    expect_header_fails("{\"__metadata__\": [1]}", 0,
                        "\"__metadata__\" must be an object of strings, found an array", NULL);
    expect_header_fails("{\"__metadata__\": {\"format\": 1}}", 0,
                        "\"__metadata__\" key 'format': expected a string value, found a number",
                        NULL);

    /* Empty tensors and holes between tensors are legal. */
    const char *ok = "{\"z\": {\"dtype\": \"F32\", \"shape\": [0, 3], \"data_offsets\": [4, 4]},"
                     " \"y\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [6, 8]},"
                     " \"__metadata__\": {\"k\": \"v\"}}  ";
    write_raw(path, strlen(ok), ok, 8);
    levi_st_file *f = levi_st_open(path, &err);
    if (!f) fail_msg("%s", err.msg);
    assert_int_equal(levi_st_count(f), 2);
    assert_string_equal(levi_st_metadata(f, "k"), "v");
    assert_int_equal(((const unsigned char *)levi_st_find(f, "y")->data)[1], 7);
    levi_st_close(f);
}

/* ---- the real checkpoint ---------------------------------------------------------------- */

static void test_real_model(void **state) {
    (void)state;
    const char *dir = levi_test_env_path("LEVI_MODEL_DIR");
    char path[4096];
    if (dir) snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (!dir || access(path, R_OK) != 0) {
        printf("SKIP test_real_model: LEVI_MODEL_DIR/model.safetensors is absent\n");
        skip();
    }
    levi_error err = {0};
    double t0 = levi_now();
    levi_st_file *f = levi_st_open(path, &err);
    double t_open = levi_now() - t0;
    if (!f) fail_msg("%s", err.msg);
    assert_int_equal(levi_st_count(f), 104);
    assert_string_equal(levi_st_metadata(f, "format"), "pt");
    const levi_tensor *w = levi_st_find(f, "embeddings.word_embeddings.weight");
    assert_non_null(w);
    assert_int_equal(w->dtype, LEVI_F32);
    assert_int_equal(w->ndim, 2);
    assert_int_equal(w->shape[0], 30522);
    assert_int_equal(w->shape[1], 384);
    const levi_tensor *pos = levi_st_find(f, "embeddings.position_ids");
    assert_non_null(pos);
    assert_int_equal(pos->dtype, LEVI_I64);
    int64_t p4[4];
    memcpy(p4, pos->data, sizeof p4);
    assert_true(p4[0] == 0 && p4[1] == 1 && p4[3] == 3);

    size_t n = 30522 * 384;
    float *buf = malloc(n * sizeof(float));
    assert_non_null(buf);
    int64_t shape[2] = {30522, 384};
    t0 = levi_now();
    assert_int_equal(levi_st_read_f32(f, "embeddings.word_embeddings.weight", 2, shape, buf, &err),
                     LEVI_OK);
    double t_read = levi_now() - t0;
    /* Values printed (shortest round-trip text of each float32) by safetensors + numpy. */
    assert_true(buf[0] == -0.019989014f && buf[1] == -0.00340271f && buf[2] == -0.014678955f);
    assert_true(buf[n - 1] == 0.0045700637f);
    int64_t bshape[1] = {384};
    assert_int_equal(
        levi_st_read_f32(f, "encoder.layer.5.output.LayerNorm.bias", 1, bshape, buf, &err),
        LEVI_OK);
    assert_true(buf[0] == -0.0363074f && buf[1] == 0.06616555f);
    int64_t total = 0;
    for (int i = 0; i < levi_st_count(f); i++) total += levi_tensor_numel(levi_st_tensor(f, i));
    assert_int_equal(total, 22713728);
    printf("  model.safetensors: 104 tensors, open %.2f ms, read word embeddings (45 MB) %.1f ms\n",
           t_open * 1e3, t_read * 1e3);
    free(buf);
    levi_st_close(f);
}

static int setup(void **state) {
    (void)state;
    levi_test_tmpdir(tmpdir, sizeof tmpdir);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    const char *names[] = {"sample.safetensors",  "hostile.safetensors",   "truncated.safetensors",
                           "mutated.safetensors", "unaligned.safetensors", "empty.safetensors",
                           "dup.safetensors",     "strided.safetensors"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) unlink(tmp_path(names[i]));
    rmdir(tmpdir);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_exhaustive),   cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_round_trip),       cmocka_unit_test(test_write_errors),
        cmocka_unit_test(test_unaligned_f32),    cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_header_mutations), cmocka_unit_test(test_hostile_headers),
        cmocka_unit_test(test_real_model),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
