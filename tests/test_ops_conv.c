/* Tests of the image kernels added for EfficientNet (include/levi/ops.h): grouped and depthwise
 * 2-D convolution with explicit four-sided padding in both layouts, TensorFlow 'SAME' padding,
 * ReLU6 and global average pooling.
 *
 * The depthwise cases cover every path of src/core/ops_conv.c: the generic loops (non-square
 * kernel, planes too big for the stack buffers), the in-place wide-row forward (rows of at least
 * 16 outputs: 16-37 wide, odd widths, more than one vector and a remainder), the flattened
 * padded-plane kernels (narrow rows, fewer than 8 images; every backward), and the image-lane
 * kernels (narrow rows of 8 or more images: part-full and several lane chunks), each for 3x3
 * and 5x5, stride 1 and 2, with TF-SAME and lopsided padding.
 * Forwards are checked against levi_gconv2d_forward_ref (the definition, in double):
 * max |fast - ref| / max |ref| <= 1e-5 (float accumulation over at most 5*5*8 taps).
 * Backwards are checked against central finite differences of the forward with the harness of
 * tests/gradcheck.h, at the tolerances of tests/test_ops.c and for the same reasons (step 1e-2,
 * |analytic - numeric| <= 2e-3 |numeric| + 2e-4 max(1, max|numeric|)), plus: a second
 * backward doubles the gradients, and every gradient pointer may be NULL. Inputs of ReLU6 are
 * kept 0.05 away from its kinks.
 * test_dw_vs_definition sweeps more shapes than finite differences can afford (up to 183x183
 * planes and 33 images): forward against levi_gconv2d_forward_ref and all three gradients
 * against the definition summed in double, max |fast - ref| / max |ref| <= 1e-5.
 * The last test checks that the depthwise and pooling kernels give bit-identical results with
 * one and two OpenMP threads (threads own channels there).
 * Not for: batch norm and the dense symmetric convolution (tests/test_ops.c), whole models.
 */
#include "gradcheck.h"
#include "levi/ops.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ----------------------------------------------------------------------------------------
 * Grouped convolution */

typedef struct {
    int B, IC, H, W, OC, OH, OW;
    levi_conv_geom g;
    float *inp, *w, *b, *out, *col, *R;
    int64_t ni, nw, no;
} gconv_ctx;

static double gconv_loss(gradcase *gc) {
    gconv_ctx *c = gc->ctx;
    levi_gconv2d_forward(c->out, c->col, c->inp, c->w, c->b, c->B, c->IC, c->H, c->W, c->OC, c->g);
    return dot_d(c->out, c->R, c->no);
}

static void gconv_bwd(gradcase *gc, float *const *g) {
    gconv_ctx *c = gc->ctx;
    levi_gconv2d_backward(g[0], g[1], g[2], c->col, c->R, c->inp, c->w, c->B, c->IC, c->H, c->W,
                          c->OC, c->g);
}

/* {B, IC, H, W, OC, KH, KW, stride, top, bottom, left, right, groups, channel_major} */
#define GCONV_CASES 21
static const int gconv_cases[GCONV_CASES][14] = {
    {2, 3, 8, 7, 4, 3, 3, 2, 0, 1, 0, 1, 1, 0},   // the stem: stride 2, 'SAME' pad after only
    {2, 3, 8, 7, 4, 3, 3, 2, 0, 1, 0, 1, 1, 1},   // the same, channel-major
    {2, 4, 7, 9, 4, 3, 3, 1, 1, 1, 1, 1, 4, 0},   // depthwise 3x3, stride 1
    {2, 4, 9, 8, 4, 5, 5, 2, 1, 2, 2, 1, 4, 1},   // depthwise 5x5, stride 2, asymmetric pad
    {1, 3, 6, 5, 3, 3, 2, 2, 2, 0, 0, 3, 3, 0},   // depthwise, non-square kernel, lopsided pad
    {2, 4, 6, 5, 6, 3, 3, 2, 1, 0, 0, 1, 2, 1},   // 2 groups
    {2, 2, 5, 6, 4, 3, 3, 1, 1, 1, 1, 1, 2, 0},   // channel multiplier 2 (groups == IC)
    {2, 5, 4, 3, 6, 1, 1, 1, 0, 0, 0, 0, 1, 1},   // 1x1: one GEMM over the batch
    {2, 5, 4, 3, 6, 1, 1, 1, 0, 0, 0, 0, 1, 0},   // 1x1, NCHW: one GEMM per image
    {2, 3, 8, 6, 3, 3, 3, 2, 0, 1, 0, 1, 3, 1},   // depthwise 3x3, stride 2, 'SAME' after-only
    {1, 2, 6, 7, 2, 5, 5, 1, 2, 2, 2, 2, 2, 0},   // depthwise 5x5, stride 1
    {1, 2, 3, 33, 2, 3, 3, 2, 0, 1, 0, 1, 2, 1},  // depthwise, rows of 17 outputs (wide path)
    {1, 1, 2, 18, 1, 5, 5, 1, 2, 2, 2, 2, 1, 0},  // depthwise 5x5, rows of 18 outputs
    {1, 2, 5, 37, 2, 3, 3, 1, 1, 1, 1, 1, 2, 1},  // 3x3 s1, rows of 37: two vectors and 5
    {1, 2, 4, 35, 2, 5, 5, 2, 1, 2, 2, 1, 2, 0},  // 5x5 s2, rows of 18, odd width
    {9, 2, 7, 7, 2, 5, 5, 1, 2, 2, 2, 2, 2, 1},   // 9 images of 7x7: image lanes, part-full
    {17, 2, 4, 5, 2, 3, 3, 2, 0, 1, 0, 1, 2, 0},  // 17 images: two lane chunks, one of 1
    {8, 2, 2, 2, 2, 5, 5, 1, 2, 2, 2, 2, 2, 1},   // 2x2 maps under 5x5 (late stages at 64 px)
    {9, 2, 5, 4, 2, 3, 2, 2, 1, 0, 0, 1, 2, 0},   // image lanes, non-square kernel
    {8, 2, 9, 8, 2, 5, 5, 2, 1, 2, 2, 1, 2, 1},   // image lanes, 5x5 s2, asymmetric pad
    {2, 8, 24, 24, 8, 5, 5, 1, 2, 2, 2, 2, 8, 1}, // depthwise big enough to thread
};

static void gconv_init(gconv_ctx *c, levi_rng *r, const int *k) {
    memset(c, 0, sizeof *c);
    c->B = k[0], c->IC = k[1], c->H = k[2], c->W = k[3], c->OC = k[4];
    c->g.KH = k[5], c->g.KW = k[6], c->g.stride = k[7];
    c->g.pad_top = k[8], c->g.pad_bottom = k[9], c->g.pad_left = k[10], c->g.pad_right = k[11];
    c->g.groups = k[12], c->g.channel_major = k[13];
    c->OH = levi_conv_out_size(c->H, c->g.KH, c->g.stride, c->g.pad_top, c->g.pad_bottom);
    c->OW = levi_conv_out_size(c->W, c->g.KW, c->g.stride, c->g.pad_left, c->g.pad_right);
    c->ni = (int64_t)c->B * c->IC * c->H * c->W;
    c->nw = (int64_t)c->OC * (c->IC / c->g.groups) * c->g.KH * c->g.KW;
    c->no = (int64_t)c->B * c->OC * c->OH * c->OW;
    c->inp = rand_normal(r, c->ni, 1.0f);
    c->w = rand_normal(r, c->nw, 0.5f);
    c->b = rand_normal(r, c->OC, 0.5f);
    c->out = alloc_f(c->no);
    c->R = rand_normal(r, c->no, 1.0f);
    c->col = alloc_f((int64_t)levi_gconv2d_col_floats(c->IC, c->H, c->W, c->OC, c->g));
}

static void gconv_free(gconv_ctx *c) {
    levi_free(c->inp);
    levi_free(c->w);
    levi_free(c->b);
    levi_free(c->out);
    levi_free(c->R);
    levi_free(c->col);
}

static void test_same_padding(void **state) {
    (void)state;
    // {n, k, stride, before, after}: TensorFlow's rule, odd pixel after.
    static const int cases[][5] = {
        {64, 3, 2, 0, 1}, {57, 3, 2, 1, 1}, {32, 5, 2, 1, 2}, {33, 5, 2, 2, 2},
        {7, 3, 1, 1, 1},  {7, 5, 1, 2, 2},  {2, 5, 2, 1, 2},  {1, 3, 2, 1, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int a = -1, b = -1;
        levi_conv_same_pad(cases[i][0], cases[i][1], cases[i][2], &a, &b);
        assert_int_equal(a, cases[i][3]);
        assert_int_equal(b, cases[i][4]);
        // 'SAME' means ceil(n / stride) outputs.
        assert_int_equal(levi_conv_out_size(cases[i][0], cases[i][1], cases[i][2], a, b),
                         (cases[i][0] + cases[i][2] - 1) / cases[i][2]);
    }
    levi_conv_geom g = levi_conv_geom_same(57, 64, 3, 2, 1, 1);
    assert_int_equal(g.pad_top, 1);
    assert_int_equal(g.pad_bottom, 1);
    assert_int_equal(g.pad_left, 0);
    assert_int_equal(g.pad_right, 1);
    assert_int_equal(g.channel_major, 1);
}

static void test_gconv_forward(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 51);
    for (int k = 0; k < GCONV_CASES; k++) {
        gconv_ctx c;
        gconv_init(&c, &r, gconv_cases[k]);
        float *ref = alloc_f(c.no);
        levi_gconv2d_forward_ref(ref, c.inp, c.w, c.b, c.B, c.IC, c.H, c.W, c.OC, c.g);
        // Output poisoned first: every element must be written.
        for (int64_t i = 0; i < c.no; i++) c.out[i] = NAN;
        levi_gconv2d_forward(c.out, c.col, c.inp, c.w, c.b, c.B, c.IC, c.H, c.W, c.OC, c.g);
        EXPECT_LE(max_norm_err(c.out, ref, c.no), 1e-5, "gconv2d vs the definition");
        // Without bias as well.
        levi_gconv2d_forward_ref(ref, c.inp, c.w, NULL, c.B, c.IC, c.H, c.W, c.OC, c.g);
        levi_gconv2d_forward(c.out, c.col, c.inp, c.w, NULL, c.B, c.IC, c.H, c.W, c.OC, c.g);
        EXPECT_LE(max_norm_err(c.out, ref, c.no), 1e-5, "gconv2d (no bias) vs the definition");
        levi_free(ref);
        gconv_free(&c);
    }
}

/* The two layouts hold the same numbers, transposed: a forward in one equals the other's. */
static void test_gconv_layouts_agree(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 52);
    const int k[14] = {3, 4, 9, 8, 4, 5, 5, 2, 1, 2, 2, 1, 4, 0};
    gconv_ctx c;
    gconv_init(&c, &r, k);
    const int64_t HW = (int64_t)c.H * c.W, P = (int64_t)c.OH * c.OW;
    float *xcm = alloc_f(c.ni), *ocm = alloc_f(c.no);
    for (int n = 0; n < c.B; n++)
        for (int ch = 0; ch < c.IC; ch++)
            memcpy(xcm + ((int64_t)ch * c.B + n) * HW, c.inp + ((int64_t)n * c.IC + ch) * HW,
                   (size_t)HW * sizeof(float));
    levi_gconv2d_forward(c.out, c.col, c.inp, c.w, c.b, c.B, c.IC, c.H, c.W, c.OC, c.g);
    levi_conv_geom g = c.g;
    g.channel_major = 1;
    levi_gconv2d_forward(ocm, c.col, xcm, c.w, c.b, c.B, c.IC, c.H, c.W, c.OC, g);
    for (int n = 0; n < c.B; n++)
        for (int ch = 0; ch < c.OC; ch++)
            assert_memory_equal(ocm + ((int64_t)ch * c.B + n) * P,
                                c.out + ((int64_t)n * c.OC + ch) * P, (size_t)P * sizeof(float));
    levi_free(xcm);
    levi_free(ocm);
    gconv_free(&c);
}

static void test_gconv_grad(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 53);
    for (int k = 0; k < GCONV_CASES - 1; k++) { // the big case is for threading, not for FD
        gconv_ctx c;
        gconv_init(&c, &r, gconv_cases[k]);
        char op[64];
        snprintf(op, sizeof op, "gconv2d case %d", k);
        gradcase gc = {.op = op, .count = 3, .loss = gconv_loss, .backward = gconv_bwd, .ctx = &c};
        gc.name[0] = "inp", gc.x[0] = c.inp, gc.n[0] = c.ni;
        gc.name[1] = "w", gc.x[1] = c.w, gc.n[1] = c.nw;
        gc.name[2] = "b", gc.x[2] = c.b, gc.n[2] = c.OC;
        run_gradcase(&gc);
        gconv_free(&c);
    }
}

/* The dense symmetric wrapper is the grouped kernel with groups 1: same numbers. */
static void test_conv2d_is_gconv(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 54);
    const int k[14] = {2, 3, 7, 6, 5, 3, 3, 2, 1, 1, 1, 1, 1, 0};
    gconv_ctx c;
    gconv_init(&c, &r, k);
    float *o2 = alloc_f(c.no);
    levi_gconv2d_forward(c.out, c.col, c.inp, c.w, c.b, c.B, c.IC, c.H, c.W, c.OC, c.g);
    levi_conv2d_forward(o2, c.col, c.inp, c.w, c.b, c.B, c.IC, c.H, c.W, c.OC, 3, 3, 2, 1);
    assert_memory_equal(o2, c.out, (size_t)c.no * sizeof(float));
    levi_free(o2);
    gconv_free(&c);
}

/* ----------------------------------------------------------------------------------------
 * ReLU6 and global average pool */

typedef struct {
    int64_t n;
    float *x, *out, *R;
    int B, C, HW, cm;
} ew_ctx;

static double relu6_loss(gradcase *gc) {
    ew_ctx *c = gc->ctx;
    levi_relu6_forward(c->out, c->x, c->n);
    return dot_d(c->out, c->R, c->n);
}
static void relu6_bwd(gradcase *gc, float *const *g) {
    ew_ctx *c = gc->ctx;
    if (g[0]) levi_relu6_backward(g[0], c->out, c->R, c->n);
}

static void test_relu6(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 55);
    ew_ctx c = {.n = 60};
    c.x = rand_normal(&r, c.n, 4.0f);
    // At least 0.05 away from the kinks at 0 and 6 (the step is 1e-2), both sides of each.
    for (int64_t i = 0; i < c.n; i++) {
        float v = c.x[i];
        if (fabsf(v) < 0.05f) v = v < 0 ? -0.05f : 0.05f;
        if (fabsf(v - 6.0f) < 0.05f) v = v < 6.0f ? 5.95f : 6.05f;
        c.x[i] = v;
    }
    c.x[0] = 7.0f, c.x[1] = -1.0f, c.x[2] = 3.0f;
    c.out = alloc_f(c.n);
    c.R = rand_normal(&r, c.n, 1.0f);
    gradcase gc = {.op = "relu6", .count = 1, .loss = relu6_loss, .backward = relu6_bwd, .ctx = &c};
    gc.name[0] = "inp", gc.x[0] = c.x, gc.n[0] = c.n;
    run_gradcase(&gc);
    float *y = copy_f(c.x, c.n);
    levi_relu6_forward(y, y, c.n); // in place is allowed
    for (int64_t i = 0; i < c.n; i++)
        assert_true(y[i] == (c.x[i] < 0 ? 0.0f : c.x[i] > 6 ? 6.0f : c.x[i]));
    // The in-place backward equals the accumulating one on a zeroed buffer.
    float *d1 = alloc_f(c.n), *d2 = copy_f(c.R, c.n);
    levi_relu6_backward(d1, y, c.R, c.n);
    levi_relu6_backward_inplace(d2, y, c.n);
    assert_memory_equal(d1, d2, (size_t)c.n * sizeof(float));
    // At the kinks no gradient passes (PyTorch's hardtanh rule).
    const float kinks[2] = {0.0f, 6.0f}, ones[2] = {1.0f, 1.0f};
    float dk[2] = {0};
    levi_relu6_backward(dk, kinks, ones, 2);
    assert_true(dk[0] == 0.0f && dk[1] == 0.0f);
    levi_free(y);
    levi_free(d1);
    levi_free(d2);
    levi_free(c.x);
    levi_free(c.out);
    levi_free(c.R);
}

static double gap_loss(gradcase *gc) {
    ew_ctx *c = gc->ctx;
    levi_avgpool_global_forward(c->out, c->x, c->B, c->C, c->HW, c->cm);
    return dot_d(c->out, c->R, (int64_t)c->B * c->C);
}
static void gap_bwd(gradcase *gc, float *const *g) {
    ew_ctx *c = gc->ctx;
    if (g[0]) levi_avgpool_global_backward(g[0], c->R, c->B, c->C, c->HW, c->cm);
}

static void test_avgpool_global(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 56);
    for (int cm = 0; cm < 2; cm++) {
        ew_ctx c = {.B = 3, .C = 4, .HW = 5, .cm = cm};
        c.n = (int64_t)c.B * c.C * c.HW;
        c.x = rand_normal(&r, c.n, 1.0f);
        c.out = alloc_f((int64_t)c.B * c.C);
        c.R = rand_normal(&r, (int64_t)c.B * c.C, 1.0f);
        // Forward against the definition.
        levi_avgpool_global_forward(c.out, c.x, c.B, c.C, c.HW, cm);
        for (int n = 0; n < c.B; n++)
            for (int ch = 0; ch < c.C; ch++) {
                const float *p =
                    c.x + (cm ? ((int64_t)ch * c.B + n) : ((int64_t)n * c.C + ch)) * c.HW;
                double s = 0;
                for (int i = 0; i < c.HW; i++) s += p[i];
                assert_true(fabs(c.out[n * c.C + ch] - s / c.HW) <= 1e-6 * (1 + fabs(s)));
            }
        gradcase gc = {.op = cm ? "avgpool [C,B,HW]" : "avgpool [B,C,HW]",
                       .count = 1,
                       .loss = gap_loss,
                       .backward = gap_bwd,
                       .ctx = &c};
        gc.name[0] = "inp", gc.x[0] = c.x, gc.n[0] = c.n;
        run_gradcase(&gc);
        levi_free(c.x);
        levi_free(c.out);
        levi_free(c.R);
    }
}

/* ----------------------------------------------------------------------------------------
 * Depthwise kernels over many shapes against the definition (forward and all gradients). */

/* dx, dw, db (double, zeroed by the caller) += the depthwise backward by its definition. */
static void dw_backward_def(double *dx, double *dw, double *db, const float *d, const float *x,
                            const float *w, int B, int C, int H, int W, int OH, int OW,
                            levi_conv_geom g) {
    for (int n = 0; n < B; n++)
        for (int c = 0; c < C; c++) {
            const int64_t xi = (g.channel_major ? (int64_t)c * B + n : (int64_t)n * C + c) * H * W;
            const int64_t oi =
                (g.channel_major ? (int64_t)c * B + n : (int64_t)n * C + c) * OH * OW;
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    const double dv = d[oi + (int64_t)oh * OW + ow];
                    db[c] += dv;
                    for (int kh = 0; kh < g.KH; kh++)
                        for (int kw = 0; kw < g.KW; kw++) {
                            const int ih = oh * g.stride - g.pad_top + kh;
                            const int iw = ow * g.stride - g.pad_left + kw;
                            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                            const int64_t t = ((int64_t)c * g.KH + kh) * g.KW + kw;
                            dw[t] += dv * x[xi + (int64_t)ih * W + iw];
                            dx[xi + (int64_t)ih * W + iw] += dv * w[t];
                        }
                }
        }
}

static double max_norm_err_d(const float *a, const double *b, int64_t n) {
    double e = 0.0, m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        e = fmax(e, fabs(a[i] - b[i]));
        m = fmax(m, fabs(b[i]));
    }
    return m > 0.0 ? e / m : e;
}

static void test_dw_vs_definition(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 58);
    /* {B, H, W}: 183x183 pads past the stack buffers (generic backward, in-place forward). */
    static const int sizes[][3] = {{1, 1, 1},   {2, 3, 16},  {3, 9, 15},   {1, 6, 33},
                                   {8, 1, 5},   {9, 2, 3},   {16, 7, 7},   {33, 4, 4},
                                   {8, 14, 14}, {2, 17, 40}, {1, 183, 183}};
    static const int pads[][4] = {{0, 0, 0, 0}, {1, 1, 1, 1}, {2, 2, 2, 2},
                                  {0, 1, 0, 1}, {1, 2, 1, 2}, {3, 0, 0, 3}};
    const int C = 2, ns = sizeof sizes / sizeof sizes[0], np = sizeof pads / sizeof pads[0];
    int checked = 0;
    for (int K = 3; K <= 5; K += 2)
        for (int S = 1; S <= 2; S++)
            for (int si = 0; si < ns; si++)
                for (int pi = 0; pi < np; pi++) {
                    const int B = sizes[si][0], H = sizes[si][1], W = sizes[si][2];
                    if (H * W > 1000 && (pi != 1 || S != 1)) continue; // one big-plane case each K
                    levi_conv_geom g = {.KH = K, .KW = K, .stride = S, .groups = C};
                    g.pad_top = pads[pi][0], g.pad_bottom = pads[pi][1];
                    g.pad_left = pads[pi][2], g.pad_right = pads[pi][3];
                    g.channel_major = (si + pi) % 2;
                    if (H + g.pad_top + g.pad_bottom < K || W + g.pad_left + g.pad_right < K)
                        continue;
                    const int OH = levi_conv_out_size(H, K, S, g.pad_top, g.pad_bottom);
                    const int OW = levi_conv_out_size(W, K, S, g.pad_left, g.pad_right);
                    const int64_t ni = (int64_t)B * C * H * W, no = (int64_t)B * C * OH * OW;
                    const int64_t nw = (int64_t)C * K * K;
                    float *x = rand_normal(&r, ni, 1.0f), *w = rand_normal(&r, nw, 0.5f);
                    float *b = rand_normal(&r, C, 0.5f), *d = rand_normal(&r, no, 1.0f);
                    float *o = alloc_f(no), *ref = alloc_f(no);
                    float *dx = alloc_f(ni), *dw = alloc_f(nw), *db = alloc_f(C);
                    double *rdx = calloc((size_t)ni, sizeof(double));
                    double *rdw = calloc((size_t)nw, sizeof(double));
                    double *rdb = calloc((size_t)C, sizeof(double));
                    assert_non_null(rdx);
                    assert_non_null(rdw);
                    assert_non_null(rdb);
                    for (int64_t i = 0; i < no; i++) o[i] = NAN;
                    levi_gconv2d_forward(o, NULL, x, w, b, B, C, H, W, C, g);
                    levi_gconv2d_forward_ref(ref, x, w, b, B, C, H, W, C, g);
                    levi_gconv2d_backward(dx, dw, db, NULL, d, x, w, B, C, H, W, C, g);
                    dw_backward_def(rdx, rdw, rdb, d, x, w, B, C, H, W, OH, OW, g);
                    char what[160];
                    snprintf(what, sizeof what, "K%d S%d B%d %dx%d pads %d,%d,%d,%d: ", K, S, B, H,
                             W, g.pad_top, g.pad_bottom, g.pad_left, g.pad_right);
                    const size_t at = strlen(what);
                    snprintf(what + at, sizeof what - at, "forward");
                    EXPECT_LE(max_norm_err(o, ref, no), 1e-5, what);
                    snprintf(what + at, sizeof what - at, "dinp");
                    EXPECT_LE(max_norm_err_d(dx, rdx, ni), 1e-5, what);
                    snprintf(what + at, sizeof what - at, "dw");
                    EXPECT_LE(max_norm_err_d(dw, rdw, nw), 1e-5, what);
                    snprintf(what + at, sizeof what - at, "db");
                    EXPECT_LE(max_norm_err_d(db, rdb, C), 1e-5, what);
                    checked++;
                    levi_free(x), levi_free(w), levi_free(b), levi_free(d);
                    levi_free(o), levi_free(ref), levi_free(dx), levi_free(dw), levi_free(db);
                    free(rdx), free(rdw), free(rdb);
                }
    printf("  depthwise vs definition: %d shapes\n", checked);
    assert_true(checked >= 200); // the sweep must not skip itself away
}

/* ----------------------------------------------------------------------------------------
 * Thread-count invariance of the direct kernels (threads own planes or channels). */

static void run_dw(gconv_ctx *c, float *o, float *gi, float *gw, float *gb) {
    levi_gconv2d_forward(o, c->col, c->inp, c->w, c->b, c->B, c->IC, c->H, c->W, c->OC, c->g);
    levi_gconv2d_backward(gi, gw, gb, c->col, c->R, c->inp, c->w, c->B, c->IC, c->H, c->W, c->OC,
                          c->g);
}

static void test_thread_count_invariance(void **state) {
    (void)state;
    levi_rng r;
    levi_rng_seed(&r, 57);
    /* One case per scheme, each big enough to thread: in-place wide rows forward with the
     * flattened backward; flattened narrow planes both ways (fewer than 8 images); image lanes
     * both ways (two chunks of 16, the second part-full). */
    static const int cases[3][14] = {
        {4, 32, 24, 24, 32, 5, 5, 1, 2, 2, 2, 2, 32, 1},
        {4, 32, 12, 12, 32, 3, 3, 2, 0, 1, 0, 1, 32, 1},
        {20, 16, 7, 7, 16, 5, 5, 1, 2, 2, 2, 2, 16, 0},
    };
    for (int k = 0; k < 3; k++) {
        gconv_ctx c;
        gconv_init(&c, &r, cases[k]);
        float *o[2], *gi[2], *gw[2], *gb[2];
        for (int t = 0; t < 2; t++) {
            levi_set_num_threads(t + 1);
            o[t] = alloc_f(c.no), gi[t] = alloc_f(c.ni), gw[t] = alloc_f(c.nw);
            gb[t] = alloc_f(c.OC);
            run_dw(&c, o[t], gi[t], gw[t], gb[t]);
        }
        assert_memory_equal(o[0], o[1], (size_t)c.no * sizeof(float));
        assert_memory_equal(gi[0], gi[1], (size_t)c.ni * sizeof(float));
        assert_memory_equal(gw[0], gw[1], (size_t)c.nw * sizeof(float));
        assert_memory_equal(gb[0], gb[1], (size_t)c.OC * sizeof(float));
        for (int t = 0; t < 2; t++) {
            levi_free(o[t]);
            levi_free(gi[t]);
            levi_free(gw[t]);
            levi_free(gb[t]);
        }
        gconv_free(&c);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_padding),        cmocka_unit_test(test_gconv_forward),
        cmocka_unit_test(test_gconv_layouts_agree), cmocka_unit_test(test_gconv_grad),
        cmocka_unit_test(test_conv2d_is_gconv),     cmocka_unit_test(test_relu6),
        cmocka_unit_test(test_avgpool_global),      cmocka_unit_test(test_thread_count_invariance),
        cmocka_unit_test(test_dw_vs_definition),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
