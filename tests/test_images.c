/* Tests for include/levi/images.h: the idx reader on tiny files written here (plain and
 * gzip'd, good and malformed: each malformed one must fail with a message naming the file and
 * the problem), the transforms against torch / torchvision / Pillow outputs from
 * tests/ref/gen_images_ref.py (bilinear and area resizing, down-up sampling, Gaussian blur,
 * JPEG round trips bit for bit, ImageNet preprocessing), determinism and purity of the
 * corruptions, batches, and the real Fashion-MNIST files when LEVI_FASHION_MNIST_DIR is set
 * (that test alone is skipped otherwise).
 * Not for: model accuracy under the corruptions (the vision task's end-to-end run). */
#include "testutil.h"

#include "levi/images.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

static char tmpdir[512];
static cJSON *ref;
static float src28[28 * 28];

static int setup(void **state) {
    levi_test_tmpdir(tmpdir, sizeof tmpdir);
    char *text = NULL;
    size_t len = 0;
    levi_error err = {0};
    if (levi_read_file(levi_test_source_path("tests/ref/images/transforms.json"), &text, &len,
                       &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    ref = cJSON_Parse(text);
    free(text);
    if (!ref) return -1;
    const cJSON *img = cJSON_GetObjectItem(ref, "image_u8");
    if (cJSON_GetArraySize(img) != 28 * 28) return -1;
    for (int i = 0; i < 28 * 28; i++)
        src28[i] = (float)cJSON_GetArrayItem(img, i)->valueint / 255.0f;
    return 0;
}

static int teardown(void **state) {
    cJSON_Delete(ref);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *tmp_path(const char *name) {
    static char buf[4][1024];
    static int next;
    char *b = buf[next++ % 4];
    snprintf(b, sizeof buf[0], "%s/%s", tmpdir, name);
    return b;
}

/* Writes bytes to path, through gzip when the name ends in ".gz". */
static void write_file(const char *path, const void *data, size_t len) {
    unlink(path);
    size_t n = strlen(path);
    if (n > 3 && strcmp(path + n - 3, ".gz") == 0) {
        gzFile g = gzopen(path, "wb");
        assert_non_null(g);
        if (len) assert_int_equal(gzwrite(g, data, (unsigned)len), (int)len);
        assert_int_equal(gzclose(g), Z_OK);
        return;
    }
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (len) assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
}

/* An idx file: magic (0, 0, type, ndim), big-endian dims, then `extra` data bytes beyond (or
 * short of, when negative) what the dims describe, filled with a counting pattern. */
static size_t make_idx(unsigned char *buf, int type, int ndim, const uint32_t *dims, long extra) {
    size_t n = 0, total = 1;
    buf[n++] = 0, buf[n++] = 0, buf[n++] = (unsigned char)type, buf[n++] = (unsigned char)ndim;
    for (int d = 0; d < ndim; d++) {
        for (int b = 3; b >= 0; b--) buf[n++] = (unsigned char)(dims[d] >> (8 * b));
        total *= dims[d];
    }
    long data = (long)total + extra;
    for (long i = 0; i < data; i++) buf[n++] = (unsigned char)(i * 7 % 10);
    return n;
}

static void expect_idx_fails(const char *path, const char *want) {
    levi_idx idx;
    levi_error err = {0};
    if (levi_idx_read(path, &idx, &err) == LEVI_OK) {
        levi_idx_free(&idx);
        fail_msg("%s read, expected an error containing '%s'", path, want);
    }
    assert_null(idx.data);
    if (!strstr(err.msg, want)) fail_msg("%s: message '%s' lacks '%s'", path, err.msg, want);
    if (!strstr(err.msg, path)) fail_msg("message '%s' does not name the file", err.msg);
}

static void test_idx_good_plain_and_gz(void **state) {
    unsigned char buf[512];
    uint32_t idims[3] = {5, 4, 3}, ldims[1] = {5};
    const char *names[2][2] = {{"a-images", "a-labels"}, {"b-images.gz", "b-labels.gz"}};
    for (int k = 0; k < 2; k++) {
        size_t n = make_idx(buf, 0x08, 3, idims, 0);
        write_file(tmp_path(names[k][0]), buf, n);
        n = make_idx(buf, 0x08, 1, ldims, 0);
        write_file(tmp_path(names[k][1]), buf, n);
        levi_images im;
        levi_error err = {0};
        if (levi_images_load(tmp_path(names[k][0]), tmp_path(names[k][1]), &im, &err))
            fail_msg("%s", err.msg);
        assert_int_equal(im.n, 5);
        assert_int_equal(im.rows, 4);
        assert_int_equal(im.cols, 3);
        for (int i = 0; i < 60; i++) assert_int_equal(im.pixels[i], i * 7 % 10);
        for (int i = 0; i < 5; i++) assert_int_equal(im.labels[i], i * 7 % 10);
        assert_int_equal(im.num_classes, 9); /* labels 0 7 4 1 8 */
        float px[12];
        levi_images_get_f32(&im, 1, px);
        assert_true(px[0] == (float)(12 * 7 % 10) / 255.0f);
        levi_images_free(&im);
        levi_images_free(&im); /* a freed (zeroed) struct may be freed again */
    }
}

static void test_idx_malformed(void **state) {
    unsigned char buf[512];
    uint32_t d3[3] = {2, 3, 3}, d1[1] = {4}, dz[2] = {3, 0};
    uint32_t huge[3] = {0xffffffffu, 0xffffffffu, 0xffffffffu};
    size_t n;

    n = make_idx(buf, 0x08, 3, d3, 0);
    buf[0] = 'P';
    write_file(tmp_path("badmagic"), buf, n);
    expect_idx_fails(tmp_path("badmagic"), "not an idx file");

    n = make_idx(buf, 0x0D, 3, d3, 0);
    write_file(tmp_path("float"), buf, n);
    expect_idx_fails(tmp_path("float"), "idx type 0x0d, expected 0x08");

    n = make_idx(buf, 0x08, 0, d3, 0);
    write_file(tmp_path("ndim0"), buf, n);
    expect_idx_fails(tmp_path("ndim0"), "has 0 dimensions, expected 1..4");

    n = make_idx(buf, 0x08, 2, dz, 0);
    write_file(tmp_path("zero"), buf, n);
    expect_idx_fails(tmp_path("zero"), "dimension 1 is 0");

    n = make_idx(buf, 0x08, 3, d3, -5);
    write_file(tmp_path("short"), buf, n);
    expect_idx_fails(tmp_path("short"), "data has 13 bytes, the dimensions need 18");
    write_file(tmp_path("short.gz"), buf, n);
    expect_idx_fails(tmp_path("short.gz"), "data has 13 bytes, the dimensions need 18");

    n = make_idx(buf, 0x08, 3, d3, 3);
    write_file(tmp_path("long"), buf, n);
    expect_idx_fails(tmp_path("long"), "unexpected bytes after the 18 data bytes");

    n = make_idx(buf, 0x08, 1, d1, 0);
    write_file(tmp_path("headonly"), buf, 6);
    expect_idx_fails(tmp_path("headonly"), "expected 1 dimension sizes (4 bytes)");
    write_file(tmp_path("tiny"), buf, 2);
    expect_idx_fails(tmp_path("tiny"), "expected 4 magic bytes, found 2");

    /* A tiny file claiming 2^96 bytes overflows; one claiming 12 GiB just runs short. */
    n = make_idx(buf, 0x08, 0, huge, 0); /* the magic alone; the dims by hand */
    buf[3] = 3;
    memset(buf + 4, 0xff, 12);
    write_file(tmp_path("huge"), buf, 16);
    expect_idx_fails(tmp_path("huge"), "overflow");
    uint32_t big[2] = {0x10000u, 0x30000u};
    n = make_idx(buf, 0x08, 2, big, -(long)0x10000 * 0x30000 + 10);
    write_file(tmp_path("big"), buf, n);
    expect_idx_fails(tmp_path("big"), "data has 10 bytes");

    /* A gzip stream cut in the middle: zlib's complaint comes through. */
    n = make_idx(buf, 0x08, 3, d3, 0);
    write_file(tmp_path("whole.gz"), buf, n);
    FILE *f = fopen(tmp_path("whole.gz"), "rb");
    unsigned char gz[512];
    size_t gzlen = fread(gz, 1, sizeof gz, f);
    fclose(f);
    write_file(tmp_path("cut.gz.bin"), gz, gzlen - 12);
    rename(tmp_path("cut.gz.bin"), tmp_path("cut.gz"));
    expect_idx_fails(tmp_path("cut.gz"), "cut.gz");

    levi_idx idx;
    levi_error err = {0};
    assert_int_equal(levi_idx_read(tmp_path("absent"), &idx, &err), LEVI_ERR_IO);

    /* Image and label files that do not fit together. */
    n = make_idx(buf, 0x08, 3, d3, 0);
    write_file(tmp_path("im3"), buf, n);
    n = make_idx(buf, 0x08, 1, d1, 0);
    write_file(tmp_path("lb4"), buf, n);
    levi_images im;
    assert_int_equal(levi_images_load(tmp_path("im3"), tmp_path("lb4"), &im, &err),
                     LEVI_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "expected 1 dimension of 2 labels"));
    assert_null(im.pixels);
    assert_int_equal(levi_images_load(tmp_path("lb4"), tmp_path("lb4"), &im, &err),
                     LEVI_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "expected 3 dimensions (images, rows, cols)"));
    assert_int_equal(levi_fashion_mnist_load(tmpdir, "valid", &im, &err), LEVI_ERR_ARG);
}

static void expect_close(const float *got, const char *key, int64_t n, double tol) {
    const cJSON *want = cJSON_GetObjectItem(ref, key);
    if (!want) fail_msg("reference has no '%s'", key);
    assert_int_equal(cJSON_GetArraySize(want), n);
    float *w = malloc((size_t)n * sizeof *w);
    for (int64_t i = 0; i < n; i++) w[i] = (float)cJSON_GetArrayItem(want, (int)i)->valuedouble;
    double d = levi_test_max_abs_diff(got, w, n);
    free(w);
    printf("%s: max |diff| %.3g (tolerance %.3g)\n", key, d, tol);
    if (!(d <= tol)) fail_msg("%s: max |diff| %.3g > %.3g", key, d, tol);
}

/* Tolerances: torch computes in float with another operation order, so resizes and
 * normalisation agree to a few ulps; blur sums an 11 x 11 kernel in one pass where levi does
 * two 1-D passes. JPEG is the same libjpeg-turbo on both sides: exact. */
static void test_transforms_match_reference(void **state) {
    static float out[61 * 45 * 3 + 3 * 32 * 32];
    levi_image_resize_bilinear(src28, 28, 28, out, 61, 45);
    expect_close(out, "bilinear_61x45", 61 * 45, 2e-6);
    levi_image_resize_bilinear(src28, 28, 28, out, 13, 9);
    expect_close(out, "bilinear_13x9", 13 * 9, 2e-6);
    levi_image_resize_area(src28, 28, 28, out, 7, 7);
    expect_close(out, "area_7x7", 49, 2e-6);
    levi_image_resize_area(src28, 28, 28, out, 14, 4);
    expect_close(out, "area_14x4", 56, 2e-6);
    levi_image_down_up(src28, 28, 28, 4, out);
    expect_close(out, "down_up_4", 784, 2e-6);
    levi_image_down_up(src28, 28, 28, 2, out);
    expect_close(out, "down_up_2", 784, 2e-6);
    levi_image_gaussian_blur(src28, 28, 28, 0.8f, out);
    expect_close(out, "blur_0.8", 784, 1e-5);
    levi_image_gaussian_blur(src28, 28, 28, 1.5f, out);
    expect_close(out, "blur_1.5", 784, 1e-5);
    const int qs[3] = {10, 50, 95};
    for (int k = 0; k < 3; k++) {
        levi_error err = {0};
        assert_int_equal(levi_image_jpeg(src28, 28, 28, qs[k], out, &err), LEVI_OK);
        char key[16];
        snprintf(key, sizeof key, "jpeg_%d", qs[k]);
        const cJSON *want = cJSON_GetObjectItem(ref, key);
        int mism = 0;
        for (int i = 0; i < 784; i++)
            mism += (int)lrintf(out[i] * 255.0f) != cJSON_GetArrayItem(want, i)->valueint;
        if (mism) fail_msg("%s: %d of 784 pixels differ from Pillow's", key, mism);
    }
    levi_image_prep p = levi_image_prep_default_params();
    p.out_h = p.out_w = 32;
    levi_error err = {0};
    assert_int_equal(levi_image_prep_check(&p, &err), LEVI_OK);
    levi_image_prep_apply(&p, src28, 28, 28, out);
    expect_close(out, "prep_32_imagenet", 3 * 32 * 32, 2e-5);
}

static double mean_abs_diff(const float *a, const float *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += fabs((double)a[i] - b[i]);
    return s / n;
}

static void test_corruptions_pure_and_seeded(void **state) {
    float copy[784], a[784], b[784];
    memcpy(copy, src28, sizeof copy);
    levi_error err = {0};
    for (int k = LEVI_CORRUPT_NONE; k <= LEVI_CORRUPT_NOISE; k++) {
        levi_corruption c = levi_corruption_default_params((levi_corruption_kind)k);
        levi_corruption_kind parsed;
        assert_int_equal(levi_corruption_parse(levi_corruption_name(c.kind), &parsed, &err),
                         LEVI_OK);
        assert_int_equal(parsed, c.kind);
        assert_int_equal(levi_image_corrupt(&c, src28, 28, 28, 17, a, &err), LEVI_OK);
        assert_int_equal(levi_image_corrupt(&c, src28, 28, 28, 17, b, &err), LEVI_OK);
        assert_memory_equal(a, b, sizeof a);           /* same input, same output */
        assert_memory_equal(copy, src28, sizeof copy); /* the input is untouched */
        for (int i = 0; i < 784; i++) assert_true(a[i] >= 0.0f && a[i] <= 1.0f);
        double d = mean_abs_diff(a, src28, 784);
        /* Every default corruption changes the image visibly, NONE not at all. */
        if (k == LEVI_CORRUPT_NONE)
            assert_true(d == 0);
        else if (!(d > 0.01))
            fail_msg("%s: mean |change| %.4f, expected > 0.01", levi_corruption_name(c.kind), d);
    }
    /* Noise depends on (seed, index) only. */
    levi_image_gaussian_noise(src28, 28, 28, 0.1f, 5, 3, a);
    levi_image_gaussian_noise(src28, 28, 28, 0.1f, 5, 4, b);
    assert_true(mean_abs_diff(a, b, 784) > 0.01);
    levi_image_gaussian_noise(src28, 28, 28, 0.1f, 6, 3, b);
    assert_true(mean_abs_diff(a, b, 784) > 0.01);
    /* On mid-grey (no clipping) the added noise has the asked-for spread: 784 samples give
     * the std to within about 5% (2.5 standard errors). */
    float grey[784];
    for (int i = 0; i < 784; i++) grey[i] = 0.5f;
    levi_image_gaussian_noise(grey, 28, 28, 0.1f, 1, 0, a);
    double m = 0, v = 0;
    for (int i = 0; i < 784; i++) m += a[i] - 0.5;
    m /= 784;
    for (int i = 0; i < 784; i++) v += (a[i] - 0.5 - m) * (a[i] - 0.5 - m);
    double sd = sqrt(v / 783);
    if (fabs(m) > 0.01 || fabs(sd - 0.1) > 0.0065) fail_msg("noise mean %.4f std %.4f", m, sd);
    /* JPEG: quality 95 stays close, quality 10 does not. */
    assert_int_equal(levi_image_jpeg(src28, 28, 28, 95, a, &err), LEVI_OK);
    assert_int_equal(levi_image_jpeg(src28, 28, 28, 10, b, &err), LEVI_OK);
    assert_true(mean_abs_diff(a, src28, 784) < 0.01);
    assert_true(mean_abs_diff(b, src28, 784) > 2 * mean_abs_diff(a, src28, 784));
    /* down_up with factor 1 is the identity. */
    levi_image_down_up(src28, 28, 28, 1, a);
    assert_true(levi_test_max_abs_diff(a, src28, 784) < 1e-6);
}

static void test_bad_parameters(void **state) {
    float out[784];
    levi_error err = {0};
    levi_corruption c = levi_corruption_default_params(LEVI_CORRUPT_JPEG);
    c.quality = 0;
    assert_int_equal(levi_image_corrupt(&c, src28, 28, 28, 0, out, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "jpeg quality 0, expected 1..100"));
    c = levi_corruption_default_params(LEVI_CORRUPT_DOWNSAMPLE);
    c.factor = 0;
    assert_int_equal(levi_image_corrupt(&c, src28, 28, 28, 0, out, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "downsample factor 0"));
    c = levi_corruption_default_params(LEVI_CORRUPT_BLUR);
    c.sigma = -1;
    assert_int_equal(levi_image_corrupt(&c, src28, 28, 28, 0, out, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "blur sigma -1"));
    levi_corruption_kind k;
    assert_int_equal(levi_corruption_parse("fog", &k, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "'fog': expected none, downsample, blur, jpeg or noise"));
    levi_image_prep p = levi_image_prep_default_params();
    p.channels = 2;
    assert_int_equal(levi_image_prep_check(&p, &err), LEVI_ERR_ARG);
    p = levi_image_prep_default_params();
    p.std[1] = 0;
    assert_int_equal(levi_image_prep_check(&p, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "channel 1"));
}

/* A tiny in-memory image set for batches. */
static void fill_images(levi_images *im, uint8_t *pixels, uint8_t *labels, int n) {
    memset(im, 0, sizeof *im);
    im->n = n;
    im->rows = im->cols = 28;
    im->pixels = pixels;
    im->labels = labels;
    im->num_classes = 10;
    for (int i = 0; i < n; i++) {
        labels[i] = (uint8_t)i;
        for (int k = 0; k < 784; k++)
            pixels[i * 784 + k] = (uint8_t)(lrintf(src28[(k + 29 * i) % 784] * 255.0f));
    }
}

static void test_batches(void **state) {
    uint8_t pixels[4 * 784], labels[4];
    levi_images im;
    fill_images(&im, pixels, labels, 4);
    levi_image_prep p = levi_image_prep_default_params();
    p.out_h = p.out_w = 40;
    size_t one = 3 * 40 * 40;
    float *b1 = malloc(3 * one * sizeof *b1), *b2 = malloc(3 * one * sizeof *b2);
    levi_error err = {0};
    int64_t i1[3] = {2, 0, 3}, i2[3] = {3, 2, 1};
    for (int k = LEVI_CORRUPT_NONE; k <= LEVI_CORRUPT_NOISE; k++) {
        levi_corruption c = levi_corruption_default_params((levi_corruption_kind)k);
        c.seed = 11;
        assert_int_equal(levi_images_batch(&im, i1, 3, &c, &p, b1, &err), LEVI_OK);
        assert_int_equal(levi_images_batch(&im, i2, 3, &c, &p, b2, &err), LEVI_OK);
        /* Image 2 and image 3 come out the same in either batch, at either position. */
        assert_memory_equal(b1, b2 + one, one * sizeof *b1);
        assert_memory_equal(b1 + 2 * one, b2, one * sizeof *b1);
        /* And equal to doing it by hand. */
        float a[784], cor[784], *ref1 = malloc(one * sizeof *ref1);
        levi_images_get_f32(&im, 2, a);
        assert_int_equal(levi_image_corrupt(&c, a, 28, 28, 2, cor, &err), LEVI_OK);
        levi_image_prep_apply(&p, cor, 28, 28, ref1);
        assert_memory_equal(b1, ref1, one * sizeof *ref1);
        free(ref1);
    }
    /* The three channels hold the same grey value under per-channel normalisation. */
    assert_int_equal(levi_images_batch(&im, i1, 1, NULL, &p, b1, &err), LEVI_OK);
    for (size_t k = 0; k < 40 * 40; k++) {
        float g0 = b1[k] * p.std[0] + p.mean[0], g2 = b1[2 * 1600 + k] * p.std[2] + p.mean[2];
        assert_true(fabsf(g0 - g2) < 1e-5f);
    }
    int64_t bad[1] = {4};
    assert_int_equal(levi_images_batch(&im, bad, 1, NULL, &p, b1, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "image index 4 is outside 0..3"));
    free(b1);
    free(b2);
}

static void test_fashion_mnist(void **state) {
    const char *dir = levi_test_env_path("LEVI_FASHION_MNIST_DIR");
    if (!dir) {
        printf("SKIP test_fashion_mnist: LEVI_FASHION_MNIST_DIR is not set (the folder of "
               "Debian's dataset-fashion-mnist)\n");
        skip();
    }
    const cJSON *fm = cJSON_GetObjectItem(ref, "fashion_mnist");
    assert_non_null(fm);
    const char *splits[2] = {"train", "test"};
    const char *keys[2] = {"train", "t10k"};
    for (int s = 0; s < 2; s++) {
        const cJSON *want = cJSON_GetObjectItem(fm, keys[s]);
        levi_images im;
        levi_error err = {0};
        double t0 = levi_now();
        if (levi_fashion_mnist_load(dir, splits[s], &im, &err)) fail_msg("%s", err.msg);
        printf("%s: %lld images read in %.2f s\n", keys[s], (long long)im.n, levi_now() - t0);
        assert_int_equal(im.n, cJSON_GetObjectItem(want, "n")->valueint);
        assert_int_equal(im.rows, 28);
        assert_int_equal(im.cols, 28);
        assert_int_equal(im.num_classes, 10);
        char hex[65];
        levi_sha256_hex(im.pixels, (size_t)im.n * 784, hex);
        assert_string_equal(hex, cJSON_GetObjectItem(want, "pixels_sha256")->valuestring);
        levi_sha256_hex(im.labels, (size_t)im.n, hex);
        assert_string_equal(hex, cJSON_GetObjectItem(want, "labels_sha256")->valuestring);
        int counts[10] = {0};
        for (int64_t i = 0; i < im.n; i++) counts[im.labels[i]]++;
        const cJSON *wc = cJSON_GetObjectItem(want, "class_counts");
        for (int c = 0; c < 10; c++)
            assert_int_equal(counts[c], cJSON_GetArrayItem(wc, c)->valueint);
        levi_images_free(&im);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idx_good_plain_and_gz),
        cmocka_unit_test(test_idx_malformed),
        cmocka_unit_test(test_transforms_match_reference),
        cmocka_unit_test(test_corruptions_pure_and_seeded),
        cmocka_unit_test(test_bad_parameters),
        cmocka_unit_test(test_batches),
        cmocka_unit_test(test_fashion_mnist),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
