/* Image data layer (implements include/levi/images.h): idx readers for Fashion-MNIST, the
 * quality corruptions that define the vision task's OOD groups, and backbone preprocessing.
 *
 * For: small grey images (28 x 28) turned into model inputs, deterministically.
 * Not for: colour images, training-time augmentation, or decoding image files (JPEG is used
 * only as a lossy round trip in memory).
 *
 * idx files are untrusted: the header is checked before any size is trusted, and data is read
 * into a buffer that grows as bytes really arrive, so a tiny file claiming huge dimensions
 * costs nothing before it is rejected.
 */
#include "levi/images.h"

#include <inttypes.h>
#include <jpeglib.h>
#include <math.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Largest image side accepted anywhere (prep output, idx rows/cols): far above any backbone
 * resolution, small enough that h * w * 4 cannot overflow. */
#define IMG_MAX_SIDE 4096

/* ---- idx ---------------------------------------------------------------------------- */

void levi_idx_free(levi_idx *idx) {
    if (!idx) return;
    free(idx->data);
    memset(idx, 0, sizeof *idx);
}

/* Reads exactly n bytes (fewer only at the end of the stream); -1 on a zlib error. */
static int64_t gz_read_n(gzFile g, uint8_t *dst, size_t n) {
    size_t got = 0;
    while (got < n) {
        size_t chunk = n - got > (1u << 30) ? (1u << 30) : n - got;
        int r = gzread(g, dst + got, (unsigned)chunk);
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (int64_t)got;
}

static const char *gz_msg(gzFile g) {
    int code = 0;
    const char *m = gzerror(g, &code);
    return (code != Z_OK && m && *m) ? m : "unexpected end of data";
}

levi_status levi_idx_read(const char *path, levi_idx *out, levi_error *err) {
    LEVI_ASSERT(path != NULL && out != NULL, "levi_idx_read needs a path and an output");
    memset(out, 0, sizeof *out);
    /* gzopen reads gzip'd and plain files alike. */
    gzFile g = gzopen(path, "rb");
    if (!g) return levi_errorf(err, LEVI_ERR_IO, "%s: cannot open", path);
    levi_status st = LEVI_OK;
    uint8_t head[4 + 4 * LEVI_MAX_DIMS];
    int64_t got = gz_read_n(g, head, 4);
    if (got != 4) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: idx header: expected 4 magic bytes, found %" PRId64 " (%s)", path,
                         got < 0 ? 0 : got, got < 0 ? gz_msg(g) : "file too short");
        goto done;
    }
    if (head[0] != 0 || head[1] != 0) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: byte 0: idx magic must start with two zero bytes, found %02x %02x "
                         "(not an idx file)",
                         path, head[0], head[1]);
        goto done;
    }
    if (head[2] != 0x08) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: byte 2: idx type 0x%02x, expected 0x08 (unsigned bytes)", path,
                         head[2]);
        goto done;
    }
    int ndim = head[3];
    if (ndim < 1 || ndim > LEVI_MAX_DIMS) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: byte 3: idx has %d dimensions, expected 1..%d",
                         path, ndim, LEVI_MAX_DIMS);
        goto done;
    }
    got = gz_read_n(g, head + 4, 4 * (size_t)ndim);
    if (got != 4 * ndim) {
        st =
            levi_errorf(err, LEVI_ERR_FORMAT,
                        "%s: idx header: expected %d dimension sizes (%d bytes), the file ends "
                        "after %" PRId64 " (%s)",
                        path, ndim, 4 * ndim, got < 0 ? 0 : got, got < 0 ? gz_msg(g) : "truncated");
        goto done;
    }
    size_t total = 1;
    for (int d = 0; d < ndim; d++) {
        const uint8_t *p = head + 4 + 4 * d;
        uint32_t v = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
        if (v == 0) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: byte %d: dimension %d is 0", path,
                             4 + 4 * d, d);
            goto done;
        }
        out->dims[d] = v;
        if (!levi_mul_size(total, v, &total)) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: idx dimensions overflow size_t", path);
            goto done;
        }
    }
    out->ndim = ndim;
    /* Grow towards `total` only as data arrives. */
    size_t cap = total < ((size_t)1 << 20) ? total : ((size_t)1 << 20), have = 0;
    out->data = malloc(cap);
    if (!out->data) {
        st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    for (;;) {
        got = gz_read_n(g, out->data + have, cap - have);
        if (got < 0) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: byte %zu of the data: %s", path,
                             (size_t)(4 + 4 * ndim) + have, gz_msg(g));
            goto done;
        }
        have += (size_t)got;
        if (have < cap || have == total) break;
        size_t ncap = cap > total / 2 ? total : cap * 2;
        uint8_t *nd = realloc(out->data, ncap);
        if (!nd) {
            st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %zu bytes", path, ncap);
            goto done;
        }
        out->data = nd;
        cap = ncap;
    }
    if (have < total) {
        int code = 0;
        gzerror(g, &code);
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: data has %zu bytes, the dimensions need %zu (%s)", path, have, total,
                         code != Z_OK ? gz_msg(g) : "file truncated");
        goto done;
    }
    uint8_t extra;
    got = gz_read_n(g, &extra, 1);
    if (got != 0) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: %s after the %zu data bytes the dimensions describe", path,
                         got < 0 ? gz_msg(g) : "unexpected bytes", total);
        goto done;
    }
done:
    gzclose(g);
    if (st) levi_idx_free(out);
    return st;
}

/* ---- labelled image sets ------------------------------------------------------------ */

void levi_images_free(levi_images *im) {
    if (!im) return;
    free(im->pixels);
    free(im->labels);
    memset(im, 0, sizeof *im);
}

levi_status levi_images_load(const char *images_path, const char *labels_path, levi_images *out,
                             levi_error *err) {
    LEVI_ASSERT(images_path && labels_path && out, "levi_images_load needs paths and an output");
    memset(out, 0, sizeof *out);
    levi_idx im = {0}, lb = {0};
    levi_status st = levi_idx_read(images_path, &im, err);
    if (st) return st;
    if (im.ndim != 3 || im.dims[1] > IMG_MAX_SIDE || im.dims[2] > IMG_MAX_SIDE) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: expected 3 dimensions (images, rows, cols) with sides <= %d, found "
                         "%d dimensions [%" PRId64 ", %" PRId64 ", %" PRId64 "]",
                         images_path, IMG_MAX_SIDE, im.ndim, im.dims[0],
                         im.ndim > 1 ? im.dims[1] : 0, im.ndim > 2 ? im.dims[2] : 0);
        levi_idx_free(&im);
        return st;
    }
    if ((st = levi_idx_read(labels_path, &lb, err))) {
        levi_idx_free(&im);
        return st;
    }
    if (lb.ndim != 1 || lb.dims[0] != im.dims[0]) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: expected 1 dimension of %" PRId64 " labels (one per image of %s), "
                         "found %d dimensions, the first %" PRId64,
                         labels_path, im.dims[0], images_path, lb.ndim, lb.dims[0]);
        levi_idx_free(&im);
        levi_idx_free(&lb);
        return st;
    }
    out->n = im.dims[0];
    out->rows = (int)im.dims[1];
    out->cols = (int)im.dims[2];
    out->pixels = im.data;
    out->labels = lb.data;
    int maxl = 0;
    for (int64_t i = 0; i < out->n; i++)
        if (out->labels[i] > maxl) maxl = out->labels[i];
    out->num_classes = maxl + 1;
    return LEVI_OK;
}

static const char *pick_file(char *buf, size_t cap, const char *dir, const char *split,
                             const char *kind) {
    snprintf(buf, cap, "%s/%s-%s-ubyte.gz", dir, split, kind);
    if (access(buf, R_OK) == 0) return buf;
    snprintf(buf, cap, "%s/%s-%s-ubyte", dir, split, kind);
    return buf;
}

levi_status levi_fashion_mnist_load(const char *dir, const char *split, levi_images *out,
                                    levi_error *err) {
    LEVI_ASSERT(dir && split && out, "levi_fashion_mnist_load needs dir, split, out");
    memset(out, 0, sizeof *out);
    const char *s = strcmp(split, "test") == 0 ? "t10k" : split;
    if (strcmp(s, "train") != 0 && strcmp(s, "t10k") != 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "Fashion-MNIST split '%s': expected \"train\" or \"t10k\" (or \"test\")",
                           split);
    char ip[4096], lp[4096];
    pick_file(ip, sizeof ip, dir, s, "images-idx3");
    pick_file(lp, sizeof lp, dir, s, "labels-idx1");
    levi_status st = levi_images_load(ip, lp, out, err);
    if (st) return st;
    for (int64_t i = 0; i < out->n; i++) {
        if (out->labels[i] > 9) {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: label %" PRId64 " is %d, expected 0..9 (Fashion-MNIST classes)",
                             lp, i, out->labels[i]);
            levi_images_free(out);
            return st;
        }
    }
    out->num_classes = 10;
    return LEVI_OK;
}

void levi_images_get_f32(const levi_images *im, int64_t i, float *dst) {
    LEVI_ASSERT(im && dst && i >= 0 && i < im->n, "image index out of range");
    size_t n = (size_t)im->rows * (size_t)im->cols;
    const uint8_t *p = im->pixels + (size_t)i * n;
    for (size_t k = 0; k < n; k++) dst[k] = (float)p[k] * (1.0f / 255.0f);
}

/* ---- resizing ----------------------------------------------------------------------- */

/* Source coordinate of destination index i (half-pixel centres, negative clamped to 0) and
 * the two taps with their weights, as torch's upsample_bilinear2d computes them. */
static void bilinear_taps(int i, float scale, int in, int *i0, int *i1, float *l0, float *l1) {
    float src = scale * ((float)i + 0.5f) - 0.5f;
    if (src < 0) src = 0;
    int x0 = (int)src;
    if (x0 > in - 1) x0 = in - 1;
    *i0 = x0;
    *i1 = x0 < in - 1 ? x0 + 1 : x0;
    *l1 = src - (float)x0;
    *l0 = 1.0f - *l1;
}

/* src [h, w] -> dst [oh, ow] */
void levi_image_resize_bilinear(const float *src, int h, int w, float *dst, int oh, int ow) {
    LEVI_ASSERT(src && dst && h >= 1 && w >= 1 && oh >= 1 && ow >= 1, "resize needs sizes >= 1");
    float sy = (float)h / (float)oh, sx = (float)w / (float)ow;
    for (int y = 0; y < oh; y++) {
        int y0, y1;
        float a0, a1;
        bilinear_taps(y, sy, h, &y0, &y1, &a0, &a1);
        const float *r0 = src + (size_t)y0 * w, *r1 = src + (size_t)y1 * w;
        float *out = dst + (size_t)y * ow;
        for (int x = 0; x < ow; x++) {
            int x0, x1;
            float b0, b1;
            bilinear_taps(x, sx, w, &x0, &x1, &b0, &b1);
            out[x] = a0 * (b0 * r0[x0] + b1 * r0[x1]) + a1 * (b0 * r1[x0] + b1 * r1[x1]);
        }
    }
}

/* src [h, w] -> dst [oh, ow]: each output pixel is the coverage-weighted mean of the source
 * pixels under it. */
void levi_image_resize_area(const float *src, int h, int w, float *dst, int oh, int ow) {
    LEVI_ASSERT(src && dst && h >= 1 && w >= 1 && oh >= 1 && ow >= 1, "resize needs sizes >= 1");
    double fy = (double)h / oh, fx = (double)w / ow;
    for (int y = 0; y < oh; y++) {
        double ys = y * fy, ye = (y + 1) * fy;
        int sy0 = (int)floor(ys), sy1 = (int)ceil(ye);
        if (sy1 > h) sy1 = h;
        for (int x = 0; x < ow; x++) {
            double xs = x * fx, xe = (x + 1) * fx;
            int sx0 = (int)floor(xs), sx1 = (int)ceil(xe);
            if (sx1 > w) sx1 = w;
            double acc = 0;
            for (int sy = sy0; sy < sy1; sy++) {
                double wy = fmin(ye, sy + 1.0) - fmax(ys, (double)sy);
                double row = 0;
                for (int sx = sx0; sx < sx1; sx++) {
                    double wx = fmin(xe, sx + 1.0) - fmax(xs, (double)sx);
                    row += wx * src[(size_t)sy * w + sx];
                }
                acc += wy * row;
            }
            dst[(size_t)y * ow + x] = (float)(acc / (fy * fx));
        }
    }
}

/* ---- corruptions -------------------------------------------------------------------- */

static float clamp01(float v) {
    return v < 0 ? 0 : v > 1 ? 1 : v;
}

void levi_image_down_up(const float *src, int h, int w, int factor, float *dst) {
    LEVI_ASSERT(factor >= 1, "downsample factor must be >= 1");
    int sh = h / factor > 0 ? h / factor : 1, sw = w / factor > 0 ? w / factor : 1;
    float *small = levi_xmalloc((size_t)sh * (size_t)sw * sizeof *small);
    levi_image_resize_area(src, h, w, small, sh, sw);
    levi_image_resize_bilinear(small, sh, sw, dst, h, w);
    levi_free(small);
    for (size_t i = 0; i < (size_t)h * (size_t)w; i++) dst[i] = clamp01(dst[i]);
}

/* Mirror an out-of-range index back inside [0, n) without repeating the edge ("reflect"). */
static int reflect(int i, int n) {
    if (i < 0) return -i;
    if (i >= n) return 2 * (n - 1) - i;
    return i;
}

void levi_image_gaussian_blur(const float *src, int h, int w, float sigma, float *dst) {
    LEVI_ASSERT(src && dst && h >= 1 && w >= 1 && sigma > 0, "blur needs sizes >= 1, sigma > 0");
    int r = (int)ceil(3.0 * sigma);
    int ry = r < h - 1 ? r : h - 1, rx = r < w - 1 ? r : w - 1;
    int rmax = ry > rx ? ry : rx;
    float *k = levi_xmalloc((size_t)(2 * rmax + 1) * sizeof *k);
    float *col = levi_xmalloc((size_t)h * sizeof *col);
    /* Horizontal pass src -> dst, then vertical in place through one column buffer. The two
     * radii may differ (capped by the sides), so each pass normalises its own kernel, as
     * torchvision does for each axis. */
    for (int pass = 0; pass < 2; pass++) {
        int rr = pass == 0 ? rx : ry;
        double sum = 0;
        for (int i = -rr; i <= rr; i++)
            sum += exp(-0.5 * (i / (double)sigma) * (i / (double)sigma));
        for (int i = -rr; i <= rr; i++)
            k[i + rr] = (float)(exp(-0.5 * (i / (double)sigma) * (i / (double)sigma)) / sum);
        if (pass == 0) {
            for (int y = 0; y < h; y++) {
                const float *row = src + (size_t)y * w;
                for (int x = 0; x < w; x++) {
                    float acc = 0;
                    for (int i = -rr; i <= rr; i++) acc += k[i + rr] * row[reflect(x + i, w)];
                    dst[(size_t)y * w + x] = acc;
                }
            }
        } else {
            for (int x = 0; x < w; x++) {
                for (int y = 0; y < h; y++) col[y] = dst[(size_t)y * w + x];
                for (int y = 0; y < h; y++) {
                    float acc = 0;
                    for (int i = -rr; i <= rr; i++) acc += k[i + rr] * col[reflect(y + i, h)];
                    dst[(size_t)y * w + x] = clamp01(acc);
                }
            }
        }
    }
    levi_free(k);
    levi_free(col);
}

/* libjpeg reports errors through a callback that must not return: jump back instead of the
 * default exit(), and keep its message. */
typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char msg[JMSG_LENGTH_MAX];
} jpeg_err;

static void jpeg_error_exit(j_common_ptr cinfo) {
    jpeg_err *e = (jpeg_err *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->msg);
    longjmp(e->jump, 1);
}

static void jpeg_quiet(j_common_ptr cinfo) {
    (void)cinfo; /* warnings are not printed */
}

levi_status levi_image_jpeg(const float *src, int h, int w, int quality, float *dst,
                            levi_error *err) {
    LEVI_ASSERT(src && dst && h >= 1 && w >= 1, "jpeg needs an image");
    if (quality < 1 || quality > 100)
        return levi_errorf(err, LEVI_ERR_ARG, "jpeg quality %d, expected 1..100", quality);
    uint8_t *pix = malloc((size_t)h * (size_t)w);
    if (!pix) return levi_errorf(err, LEVI_ERR_NOMEM, "jpeg: out of memory");
    for (size_t i = 0; i < (size_t)h * (size_t)w; i++)
        pix[i] = (uint8_t)(clamp01(src[i]) * 255.0f + 0.5f);

    struct jpeg_compress_struct c;
    struct jpeg_decompress_struct d;
    jpeg_err je;
    /* Its address goes to libjpeg, so it lives in memory and survives the longjmp. */
    unsigned char *mem = NULL;
    unsigned long mem_len = 0;
    volatile int stage = 0; /* 1: compressor alive, 2: decompressor alive */
    memset(&c, 0, sizeof c);
    memset(&d, 0, sizeof d);
    c.err = jpeg_std_error(&je.pub);
    je.pub.error_exit = jpeg_error_exit;
    je.pub.output_message = jpeg_quiet;
    if (setjmp(je.jump)) {
        if (stage == 1) jpeg_destroy_compress(&c);
        if (stage == 2) jpeg_destroy_decompress(&d);
        free(mem);
        free(pix);
        return levi_errorf(err, LEVI_ERR_FORMAT, "jpeg round trip (%dx%d, quality %d): %s", w, h,
                           quality, je.msg);
    }
    jpeg_create_compress(&c);
    stage = 1;
    jpeg_mem_dest(&c, &mem, &mem_len);
    c.image_width = (JDIMENSION)w;
    c.image_height = (JDIMENSION)h;
    c.input_components = 1;
    c.in_color_space = JCS_GRAYSCALE;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, quality, TRUE);
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = pix + (size_t)c.next_scanline * w;
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    stage = 0;

    d.err = jpeg_std_error(&je.pub);
    je.pub.error_exit = jpeg_error_exit;
    je.pub.output_message = jpeg_quiet;
    jpeg_create_decompress(&d);
    stage = 2;
    jpeg_mem_src(&d, mem, mem_len);
    jpeg_read_header(&d, TRUE);
    d.out_color_space = JCS_GRAYSCALE;
    jpeg_start_decompress(&d);
    int same = (int)d.output_width == w && (int)d.output_height == h && d.output_components == 1;
    while (same && d.output_scanline < d.output_height) {
        JSAMPROW row = pix + (size_t)d.output_scanline * w;
        jpeg_read_scanlines(&d, &row, 1);
    }
    if (same) jpeg_finish_decompress(&d);
    jpeg_destroy_decompress(&d);
    free(mem);
    if (!same) {
        free(pix);
        return levi_errorf(err, LEVI_ERR_FORMAT, "jpeg round trip: decoded %ux%u, expected %dx%d",
                           (unsigned)d.output_width, (unsigned)d.output_height, w, h);
    }
    for (size_t i = 0; i < (size_t)h * (size_t)w; i++) dst[i] = (float)pix[i] * (1.0f / 255.0f);
    free(pix);
    return LEVI_OK;
}

/* splitmix64's finaliser: spreads (seed, index) over the RNG's seed space. */
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void levi_image_gaussian_noise(const float *src, int h, int w, float sigma, uint64_t seed,
                               uint64_t index, float *dst) {
    LEVI_ASSERT(src && dst && h >= 1 && w >= 1 && sigma >= 0, "noise needs an image, sigma >= 0");
    levi_rng r;
    levi_rng_seed(&r, seed ^ mix64(index + 0x9e3779b97f4a7c15ull));
    for (size_t i = 0; i < (size_t)h * (size_t)w; i++)
        dst[i] = clamp01(src[i] + sigma * levi_rng_normal(&r));
}

levi_corruption levi_corruption_default_params(levi_corruption_kind kind) {
    levi_corruption c = {.kind = kind, .factor = 4, .sigma = 1.5f, .quality = 10, .seed = 0};
    if (kind == LEVI_CORRUPT_NOISE) c.sigma = 0.2f;
    return c;
}

static const char *const corruption_names[] = {"none", "downsample", "blur", "jpeg", "noise"};
#define N_CORRUPTIONS ((int)(sizeof corruption_names / sizeof corruption_names[0]))

const char *levi_corruption_name(levi_corruption_kind kind) {
    return (int)kind >= 0 && (int)kind < N_CORRUPTIONS ? corruption_names[kind] : "unknown";
}

levi_status levi_corruption_parse(const char *name, levi_corruption_kind *out, levi_error *err) {
    for (int i = 0; i < N_CORRUPTIONS; i++) {
        if (strcmp(name, corruption_names[i]) == 0) {
            *out = (levi_corruption_kind)i;
            return LEVI_OK;
        }
    }
    return levi_errorf(err, LEVI_ERR_ARG,
                       "corruption '%s': expected none, downsample, blur, jpeg or noise", name);
}

static levi_status corruption_check(const levi_corruption *c, levi_error *err) {
    switch (c->kind) {
    case LEVI_CORRUPT_NONE:
        return LEVI_OK;
    case LEVI_CORRUPT_DOWNSAMPLE:
        if (c->factor < 1 || c->factor > IMG_MAX_SIDE)
            return levi_errorf(err, LEVI_ERR_ARG, "downsample factor %d, expected 1..%d", c->factor,
                               IMG_MAX_SIDE);
        return LEVI_OK;
    case LEVI_CORRUPT_BLUR:
        if (!(c->sigma > 0 && c->sigma <= 1000))
            return levi_errorf(err, LEVI_ERR_ARG, "blur sigma %g, expected in (0, 1000]",
                               (double)c->sigma);
        return LEVI_OK;
    case LEVI_CORRUPT_JPEG:
        if (c->quality < 1 || c->quality > 100)
            return levi_errorf(err, LEVI_ERR_ARG, "jpeg quality %d, expected 1..100", c->quality);
        return LEVI_OK;
    case LEVI_CORRUPT_NOISE:
        if (!(c->sigma >= 0 && c->sigma <= 100))
            return levi_errorf(err, LEVI_ERR_ARG, "noise sigma %g, expected in [0, 100]",
                               (double)c->sigma);
        return LEVI_OK;
    }
    return levi_errorf(err, LEVI_ERR_ARG, "corruption kind %d is not one of levi_corruption_kind",
                       (int)c->kind);
}

levi_status levi_image_corrupt(const levi_corruption *c, const float *src, int h, int w,
                               uint64_t index, float *dst, levi_error *err) {
    LEVI_ASSERT(c && src && dst && h >= 1 && w >= 1, "corrupt needs c, src, dst, sizes >= 1");
    levi_status st = corruption_check(c, err);
    if (st) return st;
    switch (c->kind) {
    case LEVI_CORRUPT_NONE:
        memcpy(dst, src, (size_t)h * (size_t)w * sizeof *dst);
        break;
    case LEVI_CORRUPT_DOWNSAMPLE:
        levi_image_down_up(src, h, w, c->factor, dst);
        break;
    case LEVI_CORRUPT_BLUR:
        levi_image_gaussian_blur(src, h, w, c->sigma, dst);
        break;
    case LEVI_CORRUPT_JPEG:
        return levi_image_jpeg(src, h, w, c->quality, dst, err);
    case LEVI_CORRUPT_NOISE:
        levi_image_gaussian_noise(src, h, w, c->sigma, c->seed, index, dst);
        break;
    }
    return LEVI_OK;
}

/* ---- backbone input ----------------------------------------------------------------- */

levi_image_prep levi_image_prep_default_params(void) {
    levi_image_prep p = {.out_h = 224,
                         .out_w = 224,
                         .channels = 3,
                         .mean = {0.485f, 0.456f, 0.406f},
                         .std = {0.229f, 0.224f, 0.225f}};
    return p;
}

levi_status levi_image_prep_check(const levi_image_prep *p, levi_error *err) {
    if (p->out_h < 1 || p->out_h > IMG_MAX_SIDE || p->out_w < 1 || p->out_w > IMG_MAX_SIDE)
        return levi_errorf(err, LEVI_ERR_ARG, "image prep: output size %dx%d, expected 1..%d",
                           p->out_w, p->out_h, IMG_MAX_SIDE);
    if (p->channels != 1 && p->channels != 3)
        return levi_errorf(err, LEVI_ERR_ARG, "image prep: channels %d, expected 1 or 3",
                           p->channels);
    for (int c = 0; c < p->channels; c++)
        if (!(p->std[c] > 0) || !isfinite(p->mean[c]))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "image prep: channel %d has mean %g, std %g; expected a finite "
                               "mean and std > 0",
                               c, (double)p->mean[c], (double)p->std[c]);
    return LEVI_OK;
}

/* src [h, w] -> dst [channels, out_h, out_w] */
void levi_image_prep_apply(const levi_image_prep *p, const float *src, int h, int w, float *dst) {
    size_t plane = (size_t)p->out_h * (size_t)p->out_w;
    levi_image_resize_bilinear(src, h, w, dst, p->out_h, p->out_w);
    /* Channel 0 holds the resized grey values until it is normalised last. */
    for (int c = p->channels - 1; c >= 0; c--) {
        float m = p->mean[c], inv = 1.0f / p->std[c];
        float *o = dst + (size_t)c * plane;
        for (size_t i = 0; i < plane; i++) o[i] = (dst[i] - m) * inv;
    }
}

levi_status levi_images_batch(const levi_images *im, const int64_t *idx, int64_t n,
                              const levi_corruption *c, const levi_image_prep *p, float *dst,
                              levi_error *err) {
    LEVI_ASSERT(im && p && dst && (n == 0 || idx), "levi_images_batch needs im, idx, p, dst");
    levi_status st = levi_image_prep_check(p, err);
    if (st) return st;
    if (c && (st = corruption_check(c, err))) return st;
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= im->n)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "batch item %" PRId64 ": image index %" PRId64
                               " is outside 0..%" PRId64,
                               i, idx[i], im->n - 1);
    size_t pix = (size_t)im->rows * (size_t)im->cols;
    size_t out = (size_t)p->channels * (size_t)p->out_h * (size_t)p->out_w;
    atomic_int failed = 0; /* 1: out of memory, 2: a corruption failed (message in err) */
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        float *a = malloc(pix * sizeof *a), *b = malloc(pix * sizeof *b);
        levi_error local = {0};
        if (!a || !b) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
        for (int64_t i = 0; i < n; i++) {
            if (failed) continue;
            levi_images_get_f32(im, idx[i], a);
            const float *x = a;
            if (c && c->kind != LEVI_CORRUPT_NONE) {
                if (levi_image_corrupt(c, a, im->rows, im->cols, (uint64_t)idx[i], b, &local)) {
#ifdef _OPENMP
#pragma omp critical(levi_images_batch_err)
#endif
                    {
                        if (!failed && err) *err = local;
                        failed = 2;
                    }
                    continue;
                }
                x = b;
            }
            levi_image_prep_apply(p, x, im->rows, im->cols, dst + (size_t)i * out);
        }
        free(a);
        free(b);
    }
    if (failed == 1) return levi_errorf(err, LEVI_ERR_NOMEM, "images batch: out of memory");
    if (failed == 2) return err ? err->status : LEVI_ERR_FORMAT;
    return LEVI_OK;
}
