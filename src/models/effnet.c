/* levi EfficientNet-Lite0 (implements include/levi/effnet.h): loading through a tensor
 * source, forward in inference and training mode, backward, freezing.
 *
 * For: the computation the header describes, over channel-major [C,B,H,W] activations: every
 * 1x1 convolution is one levi_gemm over the whole batch, every depthwise convolution the
 * direct kernel of ops_conv.c, every batch norm the [B=1, C, HW=B*H*W] call of
 * levi_batchnorm_forward on a contiguous channel run.
 * Not for: other EfficientNet variants (the block table below is Lite0's), squeeze-excitation,
 * swish, dropout, drop-connect.
 *
 * Memory: one arena per mode, carved by one layout function that also sizes it. Training keeps
 * per block the expand, depthwise and project convolution outputs before and after BN (the
 * BN backward needs its input, the ReLU6 backward its output) plus two gradient buffers of the
 * largest expanded tensor and two of the largest block input/output. Inference keeps every
 * block output (the stage maps are among them) and computes the expanded tensors in two
 * scratch buffers shared by all blocks, BN and ReLU6 in place.
 */
#include "levi/effnet.h"

#include "levi/ops.h"
#include "levi/safetensors.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* BN constants of the TF EfficientNet-Lite training recipe (batch_norm_epsilon 1e-3,
 * batch_norm_momentum 0.99, which is PyTorch momentum 1 - 0.99). */
#define EFFNET_BN_EPS 1e-3f
#define EFFNET_BN_MOMENTUM 0.01f
#define EFFNET_STEM 32
#define EFFNET_HEAD 1280
#define EFFNET_MAX_SIZE 8192

/* The 7 block groups of Lite0: kernel, stride of the first block, expansion, out channels,
 * repeats. The stem gives 32 channels. */
static const int effnet_groups[7][5] = {
    {3, 1, 1, 16, 1},  {3, 2, 6, 24, 2},  {5, 2, 6, 40, 2},  {3, 2, 6, 80, 3},
    {5, 1, 6, 112, 3}, {5, 2, 6, 192, 4}, {3, 1, 6, 320, 1},
};

typedef struct {
    int k, stride, cin, cout, cm; /* cm: expanded channels (cin * expansion) */
    int expand, skip, stage, stage_last;
} effnet_spec;

/* A convolution followed by a batch norm: parameter indices (conv weight, BN weight and
 * bias) and buffer indices (running mean and variance). conv == -1: absent. */
typedef struct {
    int conv, w, b, rm, rv;
} effnet_cbn;

/* Saved activations of a block (train mode; in inference e_pre == e, d_pre == d and
 * p_pre == y, and e, d are shared scratch). */
typedef struct {
    float *e_pre, *e, *d_pre, *d, *p_pre, *y;
    float *mean[3], *rstd[3]; /* expand, depthwise, project BN */
} effnet_acts;

/* Spatial sizes of one forward. */
typedef struct {
    int sh, sw;                                         /* stem output */
    int ih[LEVI_EFFNET_BLOCKS], iw[LEVI_EFFNET_BLOCKS]; /* block input */
    int oh[LEVI_EFFNET_BLOCKS], ow[LEVI_EFFNET_BLOCKS]; /* block output */
} effnet_dims;

struct levi_effnet {
    levi_params params, buffers;
    effnet_spec spec[LEVI_EFFNET_BLOCKS];
    effnet_cbn stem, head, exp[LEVI_EFFNET_BLOCKS], dw[LEVI_EFFNET_BLOCKS],
        proj[LEVI_EFFNET_BLOCKS];
    int fc_w, fc_b;
    int *unit;           /* [params.count]: 0 stem, 1 + b block b, 17 head, 18 classifier */
    int frozen_bn_stats; /* levi_effnet_freeze_bn_stats */
    float bn_momentum;   /* levi_effnet_set_bn_momentum; EFFNET_BN_MOMENTUM */

    levi_arena *arena[2];
    /* last forward */
    int B, H, W, mode, has_logits;
    effnet_dims dims;
    float *x;   /* [3,B,H,W] the input, channel-major */
    float *col; /* stem im2col scratch */
    float *s_pre, *s, *s_mean, *s_rstd;
    effnet_acts acts[LEVI_EFFNET_BLOCKS];
    float *h_pre, *h, *h_mean, *h_rstd;
    float *pooled[LEVI_EFFNET_STAGES];
    float *logits;
    /* backward (train mode) */
    float *gio[2], *gbig[2], *gpool;
};

#define EFFNET_UNIT_HEAD (LEVI_EFFNET_BLOCKS + 1)
#define EFFNET_UNIT_FC (LEVI_EFFNET_BLOCKS + 2)

/* ----------------------------------------------------------------------------------------
 * Architecture tables */

static void effnet_specs(effnet_spec *sp) {
    int b = 0, cin = EFFNET_STEM;
    for (int g = 0; g < 7; g++)
        for (int r = 0; r < effnet_groups[g][4]; r++, b++) {
            effnet_spec *s = &sp[b];
            s->k = effnet_groups[g][0];
            s->stride = r == 0 ? effnet_groups[g][1] : 1;
            s->cin = cin;
            s->cout = effnet_groups[g][3];
            s->expand = effnet_groups[g][2] != 1;
            s->cm = cin * effnet_groups[g][2];
            s->skip = s->stride == 1 && s->cin == s->cout;
            s->stage = g;
            s->stage_last = r == effnet_groups[g][4] - 1;
            cin = s->cout;
        }
    LEVI_ASSERT(b == LEVI_EFFNET_BLOCKS, "EfficientNet-Lite0 has 16 blocks");
}

int levi_effnet_stage_channels(int s) {
    LEVI_ASSERT(s >= 0 && s < LEVI_EFFNET_STAGES, "stage out of range");
    return s == LEVI_EFFNET_STAGES - 1 ? EFFNET_HEAD : effnet_groups[s][3];
}

int levi_effnet_stage_first_block(int s) {
    LEVI_ASSERT(s >= 0 && s < LEVI_EFFNET_STAGES, "stage out of range");
    int b = 0;
    for (int g = 0; g < s && g < 7; g++) b += effnet_groups[g][4];
    return b;
}

static int effnet_down(int n, int stride) {
    return (n + stride - 1) / stride; // 'SAME' padding: ceil(n / stride)
}

void levi_effnet_stage_size(int s, int H, int W, int *OH, int *OW) {
    LEVI_ASSERT(s >= 0 && s < LEVI_EFFNET_STAGES && H > 0 && W > 0, "stage size arguments");
    int h = effnet_down(H, 2), w = effnet_down(W, 2);
    for (int g = 0; g <= s && g < 7; g++)
        h = effnet_down(h, effnet_groups[g][1]), w = effnet_down(w, effnet_groups[g][1]);
    if (OH) *OH = h;
    if (OW) *OW = w;
}

static effnet_dims effnet_dims_of(const effnet_spec *sp, int H, int W) {
    effnet_dims d;
    d.sh = effnet_down(H, 2), d.sw = effnet_down(W, 2);
    int h = d.sh, w = d.sw;
    for (int b = 0; b < LEVI_EFFNET_BLOCKS; b++) {
        d.ih[b] = h, d.iw[b] = w;
        h = effnet_down(h, sp[b].stride), w = effnet_down(w, sp[b].stride);
        d.oh[b] = h, d.ow[b] = w;
    }
    return d;
}

static levi_conv_geom effnet_pointwise(void) {
    levi_conv_geom g = {0};
    g.KH = g.KW = g.stride = g.groups = 1;
    g.channel_major = 1;
    return g;
}

/* ----------------------------------------------------------------------------------------
 * The model object */

static int effnet_add(levi_params *p, const char *name, int ndim, int64_t a, int64_t b, int64_t c,
                      int64_t d) {
    const int64_t shape[4] = {a, b, c, d};
    return levi_params_add(p, name, ndim, shape);
}

/* Registers conv (when conv_name is non-NULL, shape [oc, icg, k, k]) and BN `bn` of c
 * channels. */
static effnet_cbn effnet_register_cbn(levi_effnet *m, const char *conv_name, int oc, int icg, int k,
                                      const char *bn) {
    effnet_cbn u;
    char nm[LEVI_NAME_MAX];
    u.conv = conv_name ? effnet_add(&m->params, conv_name, 4, oc, icg, k, k) : -1;
    snprintf(nm, sizeof nm, "%s.weight", bn);
    u.w = effnet_add(&m->params, nm, 1, oc, 0, 0, 0);
    snprintf(nm, sizeof nm, "%s.bias", bn);
    u.b = effnet_add(&m->params, nm, 1, oc, 0, 0, 0);
    snprintf(nm, sizeof nm, "%s.running_mean", bn);
    u.rm = effnet_add(&m->buffers, nm, 1, oc, 0, 0, 0);
    snprintf(nm, sizeof nm, "%s.running_var", bn);
    u.rv = effnet_add(&m->buffers, nm, 1, oc, 0, 0, 0);
    return u;
}

static int effnet_unit_of(const char *name) {
    if (strncmp(name, "_blocks.", 8) == 0) return 1 + atoi(name + 8);
    if (strncmp(name, "_conv_head.", 11) == 0 || strncmp(name, "_bn1.", 5) == 0)
        return EFFNET_UNIT_HEAD;
    if (strncmp(name, "_fc.", 4) == 0) return EFFNET_UNIT_FC;
    return 0; // _conv_stem., _bn0.
}

static levi_effnet *effnet_register(void) {
    levi_effnet *m = levi_xcalloc(1, sizeof *m);
    levi_params_init(&m->params);
    levi_params_init(&m->buffers);
    m->bn_momentum = EFFNET_BN_MOMENTUM;
    effnet_specs(m->spec);
    m->stem = effnet_register_cbn(m, "_conv_stem.weight", EFFNET_STEM, 3, 3, "_bn0");
    char conv[LEVI_NAME_MAX], bn[LEVI_NAME_MAX];
    for (int b = 0; b < LEVI_EFFNET_BLOCKS; b++) {
        const effnet_spec *s = &m->spec[b];
        m->exp[b].conv = -1;
        if (s->expand) {
            snprintf(conv, sizeof conv, "_blocks.%d._expand_conv.weight", b);
            snprintf(bn, sizeof bn, "_blocks.%d._bn0", b);
            m->exp[b] = effnet_register_cbn(m, conv, s->cm, s->cin, 1, bn);
        }
        snprintf(conv, sizeof conv, "_blocks.%d._depthwise_conv.weight", b);
        snprintf(bn, sizeof bn, "_blocks.%d._bn1", b);
        m->dw[b] = effnet_register_cbn(m, conv, s->cm, 1, s->k, bn);
        snprintf(conv, sizeof conv, "_blocks.%d._project_conv.weight", b);
        snprintf(bn, sizeof bn, "_blocks.%d._bn2", b);
        m->proj[b] = effnet_register_cbn(m, conv, s->cout, s->cm, 1, bn);
    }
    m->head = effnet_register_cbn(m, "_conv_head.weight", EFFNET_HEAD, 320, 1, "_bn1");
    m->fc_w = effnet_add(&m->params, "_fc.weight", 2, LEVI_EFFNET_CLASSES, EFFNET_HEAD, 0, 0);
    m->fc_b = effnet_add(&m->params, "_fc.bias", 1, LEVI_EFFNET_CLASSES, 0, 0, 0);
    levi_params_alloc(&m->params);
    levi_params_alloc(&m->buffers);
    m->unit = levi_xcalloc((size_t)m->params.count, sizeof *m->unit);
    for (int i = 0; i < m->params.count; i++) {
        levi_param *it = &m->params.items[i];
        m->unit[i] = effnet_unit_of(it->name);
        // Weight decay skips BN affine parameters and biases, as usual for CNNs.
        it->no_decay = it->ndim == 1;
    }
    for (int i = 0; i < m->buffers.count; i++) m->buffers.items[i].trainable = 0;
    return m;
}

void levi_effnet_free(levi_effnet *m) {
    if (!m) return;
    levi_params_free(&m->params);
    levi_params_free(&m->buffers);
    levi_arena_free(m->arena[0]);
    levi_arena_free(m->arena[1]);
    free(m->unit);
    free(m);
}

static levi_status effnet_read_all(levi_params *p, levi_tensor_source src, void *user,
                                   levi_error *err) {
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        levi_status st = src(user, it->name, it->ndim, it->shape, p->data + it->offset, err);
        if (st != LEVI_OK)
            return levi_error_prefix(err, "EfficientNet-Lite0 tensor '%s': ", it->name);
    }
    return LEVI_OK;
}

levi_effnet *levi_effnet_load(levi_tensor_source src, void *user, levi_error *err) {
    LEVI_ASSERT(src != NULL, "levi_effnet_load needs a tensor source");
    levi_effnet *m = effnet_register();
    if (effnet_read_all(&m->params, src, user, err) != LEVI_OK ||
        effnet_read_all(&m->buffers, src, user, err) != LEVI_OK) {
        levi_effnet_free(m);
        return NULL;
    }
    return m;
}

levi_status levi_effnet_st_source(void *user, const char *name, int ndim, const int64_t *shape,
                                  float *dst, levi_error *err) {
    return levi_st_read_f32((const levi_st_file *)user, name, ndim, shape, dst, err);
}

levi_params *levi_effnet_params(levi_effnet *m) {
    LEVI_ASSERT(m != NULL, "NULL effnet");
    return &m->params;
}

levi_params *levi_effnet_buffers(levi_effnet *m) {
    LEVI_ASSERT(m != NULL, "NULL effnet");
    return &m->buffers;
}

void levi_effnet_freeze_below(levi_effnet *m, int first) {
    LEVI_ASSERT(m != NULL && first >= 0 && first <= LEVI_EFFNET_BLOCKS,
                "freeze_below: block in [0, 16]");
    levi_params_set_trainable(&m->params, "_conv_stem.", 0);
    levi_params_set_trainable(&m->params, "_bn0.", 0);
    char prefix[32];
    for (int b = 0; b < first; b++) {
        snprintf(prefix, sizeof prefix, "_blocks.%d.", b); // the dot: block 1 is not 10..15
        levi_params_set_trainable(&m->params, prefix, 0);
    }
}

void levi_effnet_freeze_bn_stats(levi_effnet *m, int on) {
    LEVI_ASSERT(m != NULL, "NULL effnet");
    m->frozen_bn_stats = on != 0;
}

void levi_effnet_set_bn_momentum(levi_effnet *m, float momentum) {
    LEVI_ASSERT(m != NULL && momentum >= 0 && momentum <= 1, "BN momentum in [0, 1]");
    m->bn_momentum = momentum;
}

/* The lowest unit (0 stem .. 18 classifier) holding a trainable tensor; 19 when none. */
static int effnet_lowest_trainable(const levi_effnet *m) {
    int lowest = EFFNET_UNIT_FC + 1;
    for (int i = 0; i < m->params.count; i++)
        if (m->params.items[i].trainable && m->unit[i] < lowest) lowest = m->unit[i];
    return lowest;
}

/* ----------------------------------------------------------------------------------------
 * Arena layout: one function sizes (base NULL) and carves, so the two cannot disagree. */

typedef struct {
    char *base;
    size_t off;
    int overflow;
} effnet_carver;

static float *effnet_carve(effnet_carver *c, size_t n) {
    size_t bytes, start = (c->off + 63) & ~(size_t)63;
    if (!levi_mul_size(n, sizeof(float), &bytes) || !levi_add_size(start, bytes, &c->off)) {
        c->overflow = 1;
        c->off = SIZE_MAX / 2;
        return NULL;
    }
    return c->base ? (float *)(c->base + start) : NULL;
}

static size_t effnet_max(size_t a, size_t b) {
    return a > b ? a : b;
}

static size_t effnet_layout(levi_effnet *m, const effnet_spec *sp, int B, int H, int W, int train,
                            char *base) {
    effnet_carver c = {base, 0, 0};
    const effnet_dims d = effnet_dims_of(sp, H, W);
    const size_t Bz = (size_t)B;
    const size_t Ns = Bz * (size_t)d.sh * (size_t)d.sw;
    const size_t Nh =
        Bz * (size_t)d.oh[LEVI_EFFNET_BLOCKS - 1] * (size_t)d.ow[LEVI_EFFNET_BLOCKS - 1];
    float *x = effnet_carve(&c, 3 * Bz * (size_t)H * (size_t)W);
    levi_conv_geom gs = levi_conv_geom_same(H, W, 3, 2, 1, 1);
    float *col = effnet_carve(&c, levi_gconv2d_col_floats(3, H, W, EFFNET_STEM, gs));
    float *s = effnet_carve(&c, EFFNET_STEM * Ns);
    float *s_pre = train ? effnet_carve(&c, EFFNET_STEM * Ns) : s;
    float *s_mean = train ? effnet_carve(&c, EFFNET_STEM) : NULL;
    float *s_rstd = train ? effnet_carve(&c, EFFNET_STEM) : NULL;
    size_t big_in = 0, big_out = 0, io = EFFNET_STEM * Ns;
    for (int b = 0; b < LEVI_EFFNET_BLOCKS; b++) {
        const size_t Ni = Bz * (size_t)d.ih[b] * (size_t)d.iw[b];
        const size_t No = Bz * (size_t)d.oh[b] * (size_t)d.ow[b];
        big_in = effnet_max(big_in, (size_t)sp[b].cm * Ni);
        big_out = effnet_max(big_out, (size_t)sp[b].cm * No);
        io = effnet_max(io, (size_t)sp[b].cout * No);
    }
    float *scratch_e = train ? NULL : effnet_carve(&c, big_in);
    float *scratch_d = train ? NULL : effnet_carve(&c, big_out);
    for (int b = 0; b < LEVI_EFFNET_BLOCKS; b++) {
        const effnet_spec *s_ = &sp[b];
        const size_t Ni = Bz * (size_t)d.ih[b] * (size_t)d.iw[b];
        const size_t No = Bz * (size_t)d.oh[b] * (size_t)d.ow[b];
        effnet_acts a;
        memset(&a, 0, sizeof a);
        a.y = effnet_carve(&c, (size_t)s_->cout * No);
        if (train) {
            if (s_->expand) {
                a.e_pre = effnet_carve(&c, (size_t)s_->cm * Ni);
                a.e = effnet_carve(&c, (size_t)s_->cm * Ni);
            }
            a.d_pre = effnet_carve(&c, (size_t)s_->cm * No);
            a.d = effnet_carve(&c, (size_t)s_->cm * No);
            a.p_pre = effnet_carve(&c, (size_t)s_->cout * No);
            for (int j = 0; j < 3; j++) {
                const size_t ch = j == 2 ? (size_t)s_->cout : (size_t)s_->cm;
                a.mean[j] = effnet_carve(&c, ch);
                a.rstd[j] = effnet_carve(&c, ch);
            }
        } else {
            a.e_pre = a.e = s_->expand ? scratch_e : NULL;
            a.d_pre = a.d = scratch_d;
            a.p_pre = a.y;
        }
        if (m) m->acts[b] = a;
    }
    float *h = effnet_carve(&c, EFFNET_HEAD * Nh);
    float *h_pre = train ? effnet_carve(&c, EFFNET_HEAD * Nh) : h;
    float *h_mean = train ? effnet_carve(&c, EFFNET_HEAD) : NULL;
    float *h_rstd = train ? effnet_carve(&c, EFFNET_HEAD) : NULL;
    float *pooled[LEVI_EFFNET_STAGES];
    for (int st = 0; st < LEVI_EFFNET_STAGES; st++)
        pooled[st] = effnet_carve(&c, Bz * (size_t)levi_effnet_stage_channels(st));
    float *logits = effnet_carve(&c, Bz * LEVI_EFFNET_CLASSES);
    float *gio[2] = {NULL, NULL}, *gbig[2] = {NULL, NULL}, *gpool = NULL;
    if (train) {
        big_in = effnet_max(big_in, EFFNET_HEAD * Nh);
        for (int j = 0; j < 2; j++) {
            gio[j] = effnet_carve(&c, io);
            gbig[j] = effnet_carve(&c, big_in);
        }
        gpool = effnet_carve(&c, Bz * EFFNET_HEAD);
    }
    if (m) {
        m->dims = d;
        m->x = x, m->col = col;
        m->s = s, m->s_pre = s_pre, m->s_mean = s_mean, m->s_rstd = s_rstd;
        m->h = h, m->h_pre = h_pre, m->h_mean = h_mean, m->h_rstd = h_rstd;
        memcpy(m->pooled, pooled, sizeof pooled);
        m->logits = logits;
        m->gio[0] = gio[0], m->gio[1] = gio[1], m->gbig[0] = gbig[0], m->gbig[1] = gbig[1];
        m->gpool = gpool;
    }
    return c.overflow ? SIZE_MAX : c.off + 64;
}

size_t levi_effnet_arena_bytes(int B, int H, int W, levi_effnet_mode mode) {
    LEVI_ASSERT(B > 0 && H > 0 && W > 0, "arena_bytes: positive sizes");
    effnet_spec sp[LEVI_EFFNET_BLOCKS];
    effnet_specs(sp);
    return effnet_layout(NULL, sp, B, H, W, mode == LEVI_EFFNET_TRAIN, NULL);
}

/* ----------------------------------------------------------------------------------------
 * Forward */

levi_effnet_forward_params levi_effnet_default_forward_params(void) {
    levi_effnet_forward_params p = {LEVI_EFFNET_INFER, 0};
    return p;
}

static const float *effnet_w(const levi_effnet *m, int idx) {
    return levi_params_data(&m->params, idx);
}

/* out = [ReLU6](BN(pre)) over C channels of N values each (pre == out allowed in inference). */
static void effnet_bn(levi_effnet *m, const effnet_cbn *u, float *out, float *mean, float *rstd,
                      const float *pre, int C, int64_t N, int train, int relu) {
    LEVI_ASSERT(N <= INT_MAX, "batch-norm channel too long");
    levi_batchnorm_forward(out, mean, rstd, levi_params_data(&m->buffers, u->rm),
                           levi_params_data(&m->buffers, u->rv), pre, effnet_w(m, u->w),
                           effnet_w(m, u->b), 1, C, (int)N, EFFNET_BN_EPS, m->bn_momentum, train);
    if (relu) levi_relu6_forward(out, out, (int64_t)C * N);
}

static void effnet_block_forward(levi_effnet *m, int b, const float *in, int train) {
    const effnet_spec *s = &m->spec[b];
    const effnet_dims *d = &m->dims;
    effnet_acts *a = &m->acts[b];
    const int B = m->B;
    const int64_t Ni = (int64_t)B * d->ih[b] * d->iw[b], No = (int64_t)B * d->oh[b] * d->ow[b];
    const levi_conv_geom g1 = effnet_pointwise();
    const float *e = in;
    if (s->expand) {
        levi_gconv2d_forward(a->e_pre, NULL, in, effnet_w(m, m->exp[b].conv), NULL, B, s->cin,
                             d->ih[b], d->iw[b], s->cm, g1);
        effnet_bn(m, &m->exp[b], a->e, a->mean[0], a->rstd[0], a->e_pre, s->cm, Ni, train, 1);
        e = a->e;
    }
    const levi_conv_geom gd = levi_conv_geom_same(d->ih[b], d->iw[b], s->k, s->stride, s->cm, 1);
    levi_gconv2d_forward(a->d_pre, NULL, e, effnet_w(m, m->dw[b].conv), NULL, B, s->cm, d->ih[b],
                         d->iw[b], s->cm, gd);
    effnet_bn(m, &m->dw[b], a->d, a->mean[1], a->rstd[1], a->d_pre, s->cm, No, train, 1);
    levi_gconv2d_forward(a->p_pre, NULL, a->d, effnet_w(m, m->proj[b].conv), NULL, B, s->cm,
                         d->oh[b], d->ow[b], s->cout, g1);
    effnet_bn(m, &m->proj[b], a->y, a->mean[2], a->rstd[2], a->p_pre, s->cout, No, train, 0);
    if (s->skip) levi_add_forward(a->y, a->y, in, (int64_t)s->cout * No);
}

levi_status levi_effnet_forward(levi_effnet *m, const float *x, int B, int H, int W,
                                const levi_effnet_forward_params *p, levi_error *err) {
    LEVI_ASSERT(m != NULL && x != NULL, "effnet forward needs a model and an input");
    levi_effnet_forward_params fp = p ? *p : levi_effnet_default_forward_params();
    const int train = fp.mode == LEVI_EFFNET_TRAIN;
    if (B < 1 || H < LEVI_EFFNET_MIN_SIZE || W < LEVI_EFFNET_MIN_SIZE || H > EFFNET_MAX_SIZE ||
        W > EFFNET_MAX_SIZE)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "effnet forward: input [%d, 3, %d, %d]: expected B >= 1 and H, W in "
                           "[%d, %d]",
                           B, H, W, LEVI_EFFNET_MIN_SIZE, EFFNET_MAX_SIZE);
    if (train && B < 2)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "effnet forward: training mode with batch %d: batch-norm statistics "
                           "need B >= 2",
                           B);
    if ((int64_t)B * H * W > INT_MAX / 4)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "effnet forward: batch %d x %d x %d is too large for one pass; split it",
                           B, H, W);
    size_t bytes = effnet_layout(NULL, m->spec, B, H, W, train, NULL);
    if (bytes == SIZE_MAX)
        return levi_errorf(err, LEVI_ERR_NOMEM, "effnet forward: batch %d x %d x %d overflows", B,
                           H, W);
    levi_arena **ar = &m->arena[train];
    if (!*ar || levi_arena_capacity(*ar) < bytes) {
        levi_arena_free(*ar);
        *ar = levi_arena_init(bytes);
    }
    levi_arena_reset(*ar);
    effnet_layout(m, m->spec, B, H, W, train, levi_arena_alloc(*ar, bytes - 64));
    m->B = B, m->H = H, m->W = W, m->mode = train, m->has_logits = fp.logits != 0;

    // [B,3,H,W] -> [3,B,H,W]
    const size_t HW = (size_t)H * W;
    for (int n = 0; n < B; n++)
        for (int c = 0; c < 3; c++)
            memcpy(m->x + ((size_t)c * B + n) * HW, x + ((size_t)n * 3 + c) * HW,
                   HW * sizeof(float));
    const effnet_dims *d = &m->dims;
    /* Units below the lowest trainable one normalise with their running statistics and keep
       them when frozen_bn_stats is set; backward never reaches them, so nothing else changes. */
    const int bn_from = train && m->frozen_bn_stats ? effnet_lowest_trainable(m) : 0;
    const levi_conv_geom gs = levi_conv_geom_same(H, W, 3, 2, 1, 1);
    levi_gconv2d_forward(m->s_pre, m->col, m->x, effnet_w(m, m->stem.conv), NULL, B, 3, H, W,
                         EFFNET_STEM, gs);
    const int64_t Ns = (int64_t)B * d->sh * d->sw;
    effnet_bn(m, &m->stem, m->s, m->s_mean, m->s_rstd, m->s_pre, EFFNET_STEM, Ns,
              train && bn_from <= 0, 1);
    const float *in = m->s;
    for (int b = 0; b < LEVI_EFFNET_BLOCKS; b++) {
        effnet_block_forward(m, b, in, train && bn_from <= 1 + b);
        in = m->acts[b].y;
        const effnet_spec *s = &m->spec[b];
        if (s->stage_last)
            levi_avgpool_global_forward(m->pooled[s->stage], in, B, s->cout,
                                        (int64_t)d->oh[b] * d->ow[b], 1);
    }
    const int L = LEVI_EFFNET_BLOCKS - 1;
    const int64_t Ph = (int64_t)d->oh[L] * d->ow[L];
    levi_gconv2d_forward(m->h_pre, NULL, in, effnet_w(m, m->head.conv), NULL, B, 320, d->oh[L],
                         d->ow[L], EFFNET_HEAD, effnet_pointwise());
    effnet_bn(m, &m->head, m->h, m->h_mean, m->h_rstd, m->h_pre, EFFNET_HEAD, B * Ph,
              train && bn_from <= EFFNET_UNIT_HEAD, 1);
    levi_avgpool_global_forward(m->pooled[LEVI_EFFNET_STAGES - 1], m->h, B, EFFNET_HEAD, Ph, 1);
    if (m->has_logits)
        levi_linear_forward(m->logits, m->pooled[LEVI_EFFNET_STAGES - 1], effnet_w(m, m->fc_w),
                            effnet_w(m, m->fc_b), B, EFFNET_HEAD, LEVI_EFFNET_CLASSES);
    return LEVI_OK;
}

const float *levi_effnet_stage(const levi_effnet *m, int s, int *C, int *OH, int *OW) {
    LEVI_ASSERT(m != NULL && m->B > 0, "effnet_stage before any forward");
    LEVI_ASSERT(s >= 0 && s < LEVI_EFFNET_STAGES, "stage out of range");
    if (C) *C = levi_effnet_stage_channels(s);
    levi_effnet_stage_size(s, m->H, m->W, OH, OW);
    if (s == LEVI_EFFNET_STAGES - 1) return m->h;
    int last = levi_effnet_stage_first_block(s) + effnet_groups[s][4] - 1;
    return m->acts[last].y;
}

const float *levi_effnet_pooled(const levi_effnet *m, int s) {
    LEVI_ASSERT(m != NULL && m->B > 0, "effnet_pooled before any forward");
    LEVI_ASSERT(s >= 0 && s < LEVI_EFFNET_STAGES, "stage out of range");
    return m->pooled[s];
}

const float *levi_effnet_logits(const levi_effnet *m) {
    LEVI_ASSERT(m != NULL && m->B > 0, "effnet_logits before any forward");
    return m->has_logits ? m->logits : NULL;
}

void levi_effnet_stage_nchw(const levi_effnet *m, int s, float *dst) {
    int C, OH, OW;
    const float *src = levi_effnet_stage(m, s, &C, &OH, &OW);
    const size_t P = (size_t)OH * OW;
    for (int n = 0; n < m->B; n++)
        for (int c = 0; c < C; c++)
            memcpy(dst + ((size_t)n * C + c) * P, src + ((size_t)c * m->B + n) * P,
                   P * sizeof(float));
}

/* ----------------------------------------------------------------------------------------
 * Backward */

static float *effnet_grad_if(levi_effnet *m, int idx) {
    return m->params.items[idx].trainable ? levi_params_grad(&m->params, idx) : NULL;
}

/* g (dL/d out, [C,N]) through [ReLU6 and] BN into gpre (overwritten: dL/d pre), with the BN
 * parameter gradients. g is modified in place by the ReLU6 mask. */
static void effnet_bn_backward(levi_effnet *m, const effnet_cbn *u, float *gpre, float *g,
                               const float *out, const float *pre, const float *mean,
                               const float *rstd, int C, int64_t N, int relu) {
    if (relu) levi_relu6_backward_inplace(g, out, (int64_t)C * N);
    memset(gpre, 0, (size_t)C * (size_t)N * sizeof(float));
    levi_batchnorm_backward(gpre, effnet_grad_if(m, u->w), effnet_grad_if(m, u->b), g, pre,
                            effnet_w(m, u->w), mean, rstd, 1, C, (int)N);
}

/* gy: dL/d block output (consumed); gx: receives dL/d block input (overwritten) when non-NULL. */
static void effnet_block_backward(levi_effnet *m, int b, float *gy, float *gx, const float *in) {
    const effnet_spec *s = &m->spec[b];
    const effnet_dims *d = &m->dims;
    const effnet_acts *a = &m->acts[b];
    const int B = m->B;
    const int64_t Ni = (int64_t)B * d->ih[b] * d->iw[b], No = (int64_t)B * d->oh[b] * d->ow[b];
    const levi_conv_geom g1 = effnet_pointwise();
    float *ga = m->gbig[0], *gb = m->gbig[1];
    if (gx) {
        if (s->skip)
            memcpy(gx, gy, (size_t)s->cin * (size_t)Ni * sizeof(float));
        else
            memset(gx, 0, (size_t)s->cin * (size_t)Ni * sizeof(float));
    }
    effnet_bn_backward(m, &m->proj[b], ga, gy, a->y, a->p_pre, a->mean[2], a->rstd[2], s->cout, No,
                       0);
    memset(gb, 0, (size_t)s->cm * (size_t)No * sizeof(float));
    levi_gconv2d_backward(gb, effnet_grad_if(m, m->proj[b].conv), NULL, NULL, ga, a->d,
                          effnet_w(m, m->proj[b].conv), B, s->cm, d->oh[b], d->ow[b], s->cout, g1);
    effnet_bn_backward(m, &m->dw[b], ga, gb, a->d, a->d_pre, a->mean[1], a->rstd[1], s->cm, No, 1);
    const levi_conv_geom gd = levi_conv_geom_same(d->ih[b], d->iw[b], s->k, s->stride, s->cm, 1);
    const float *e = s->expand ? a->e : in;
    float *ge = s->expand ? gb : gx; // without expansion the depthwise input is the block input
    if (ge && s->expand) memset(ge, 0, (size_t)s->cm * (size_t)Ni * sizeof(float));
    levi_gconv2d_backward(ge, effnet_grad_if(m, m->dw[b].conv), NULL, NULL, ga, e,
                          effnet_w(m, m->dw[b].conv), B, s->cm, d->ih[b], d->iw[b], s->cm, gd);
    if (!s->expand) return;
    effnet_bn_backward(m, &m->exp[b], ga, gb, a->e, a->e_pre, a->mean[0], a->rstd[0], s->cm, Ni, 1);
    levi_gconv2d_backward(gx, effnet_grad_if(m, m->exp[b].conv), NULL, NULL, ga, in,
                          effnet_w(m, m->exp[b].conv), B, s->cin, d->ih[b], d->iw[b], s->cm, g1);
}

/* Adds the given gradients of stage st (map and pooled feature) into g [C,B,OH,OW]. */
static void effnet_inject(const levi_effnet *m, int st, float *g, const float *const *d_pooled,
                          const float *const *d_maps) {
    int C, OH, OW;
    levi_effnet_stage(m, st, &C, &OH, &OW);
    const int64_t n = (int64_t)C * m->B * OH * OW;
    if (d_maps && d_maps[st]) levi_add_forward(g, g, d_maps[st], n);
    if (d_pooled && d_pooled[st])
        levi_avgpool_global_backward(g, d_pooled[st], m->B, C, (int64_t)OH * OW, 1);
}

void levi_effnet_backward(levi_effnet *m, const float *const *d_pooled, const float *const *d_maps,
                          const float *d_logits) {
    LEVI_ASSERT(m != NULL && m->B > 0 && m->mode == 1,
                "effnet backward needs a LEVI_EFFNET_TRAIN forward first");
    LEVI_ASSERT(!d_logits || m->has_logits, "d_logits given but the forward computed no logits");
    // The highest stage that receives a gradient, and the lowest unit that trains.
    int top = d_logits ? LEVI_EFFNET_STAGES - 1 : -1;
    for (int st = 0; st < LEVI_EFFNET_STAGES; st++)
        if ((d_pooled && d_pooled[st]) || (d_maps && d_maps[st])) top = st > top ? st : top;
    const int lowest = effnet_lowest_trainable(m);
    if (top < 0 || lowest > EFFNET_UNIT_FC) return;
    const effnet_dims *d = &m->dims;
    const int B = m->B, L = LEVI_EFFNET_BLOCKS - 1;
    float *gy = m->gio[0], *gx = m->gio[1];
    int b0; // the block whose output gradient gy holds
    if (top == LEVI_EFFNET_STAGES - 1) {
        const int64_t Ph = (int64_t)d->oh[L] * d->ow[L];
        float *gh = m->gbig[1], *gp = m->gpool;
        if (d_pooled && d_pooled[top])
            memcpy(gp, d_pooled[top], (size_t)B * EFFNET_HEAD * sizeof(float));
        else
            memset(gp, 0, (size_t)B * EFFNET_HEAD * sizeof(float));
        if (d_logits)
            levi_linear_backward(lowest < EFFNET_UNIT_FC ? gp : NULL, effnet_grad_if(m, m->fc_w),
                                 effnet_grad_if(m, m->fc_b), d_logits, m->pooled[top],
                                 effnet_w(m, m->fc_w), B, EFFNET_HEAD, LEVI_EFFNET_CLASSES);
        if (lowest > EFFNET_UNIT_HEAD) return;
        memset(gh, 0, (size_t)EFFNET_HEAD * (size_t)B * (size_t)Ph * sizeof(float));
        if (d_maps && d_maps[top])
            levi_add_forward(gh, gh, d_maps[top], (int64_t)EFFNET_HEAD * B * Ph);
        levi_avgpool_global_backward(gh, gp, B, EFFNET_HEAD, Ph, 1);
        float *ghp = m->gbig[0];
        effnet_bn_backward(m, &m->head, ghp, gh, m->h, m->h_pre, m->h_mean, m->h_rstd, EFFNET_HEAD,
                           B * Ph, 1);
        float *gin = NULL;
        if (lowest < EFFNET_UNIT_HEAD) {
            gin = gy;
            memset(gin, 0, (size_t)320 * (size_t)B * (size_t)Ph * sizeof(float));
        }
        levi_gconv2d_backward(gin, effnet_grad_if(m, m->head.conv), NULL, NULL, ghp, m->acts[L].y,
                              effnet_w(m, m->head.conv), B, 320, d->oh[L], d->ow[L], EFFNET_HEAD,
                              effnet_pointwise());
        if (!gin) return;
        b0 = L;
    } else {
        b0 = levi_effnet_stage_first_block(top) + effnet_groups[top][4] - 1;
        const int64_t n = (int64_t)m->spec[b0].cout * B * d->oh[b0] * d->ow[b0];
        memset(gy, 0, (size_t)n * sizeof(float));
    }
    for (int b = b0; b >= 0 && 1 + b >= lowest; b--) {
        const effnet_spec *s = &m->spec[b];
        if (s->stage_last) effnet_inject(m, s->stage, gy, d_pooled, d_maps);
        const float *in = b > 0 ? m->acts[b - 1].y : m->s;
        effnet_block_backward(m, b, gy, lowest < 1 + b ? gx : NULL, in);
        float *t = gy;
        gy = gx, gx = t;
    }
    if (lowest > 0) return;
    // Stem: gy holds dL/d stem output.
    const int64_t Ns = (int64_t)B * d->sh * d->sw;
    effnet_bn_backward(m, &m->stem, m->gbig[0], gy, m->s, m->s_pre, m->s_mean, m->s_rstd,
                       EFFNET_STEM, Ns, 1);
    levi_gconv2d_backward(NULL, effnet_grad_if(m, m->stem.conv), NULL, m->col, m->gbig[0], m->x,
                          effnet_w(m, m->stem.conv), B, 3, m->H, m->W, EFFNET_STEM,
                          levi_conv_geom_same(m->H, m->W, 3, 2, 1, 1));
}
