/* Optimizers and learning-rate schedules (implements include/levi/optim.h).
 *
 * For: SGD (momentum, Nesterov), Adam and AdamW with PyTorch's update rules, global-norm
 * gradient clipping as torch.nn.utils.clip_grad_norm_, and the constant / linear / cosine
 * warm-up schedules of Hugging Face transformers, all over one levi_params buffer.
 * Not for: knowing what the parameters are (models set trainable / no_decay), zeroing
 * gradients (the training loop does), per-tensor learning rates.
 *
 * The update is the hot path of small-model training, so it runs as one branch-free loop
 * per contiguous range of trainable tensors; which tensors are trainable is re-read from
 * the table at every step (a few hundred entries at most), so freezing after init works.
 */
#include "levi/optim.h"

#include <math.h>
#include <string.h>

/* torch.nn.utils.clip_grad_norm_ scales by clip_norm / (norm + 1e-6); the same epsilon keeps
 * clipped steps in line with PyTorch's. */
#define CLIP_EPS 1e-6

/* A maximal run of trainable tensors that sit back to back in the buffer and share the
 * weight-decay flag. Padding between tensors (the table aligns offsets) ends a run: the
 * padding is never updated. */
typedef struct {
    size_t begin, n;
    int decay;
} opt_range;

struct levi_optim {
    levi_params *params;
    levi_optim_params op;
    int64_t steps;
    float *state; /* SGD: momentum[numel]; Adam/AdamW: m[numel] then v[numel]; or NULL */
    size_t state_numel;
    opt_range *ranges; /* capacity params->count, refilled every step */
};

levi_optim_params levi_optim_default_params(levi_opt_kind kind) {
    levi_optim_params op;
    memset(&op, 0, sizeof op);
    op.kind = kind;
    op.beta1 = 0.9f;
    op.beta2 = 0.999f;
    op.eps = 1e-8f;
    op.clip_norm = 0.0f;
    op.schedule = LEVI_SCHED_CONSTANT;
    switch (kind) {
    case LEVI_OPT_SGD:
        op.lr = 0.01f;
        op.momentum = 0.9f;
        break;
    case LEVI_OPT_ADAM:
        op.lr = 1e-3f;
        break;
    case LEVI_OPT_ADAMW:
        op.lr = 1e-3f;
        op.weight_decay = 0.01f; /* torch.optim.AdamW's default */
        break;
    }
    return op;
}

float levi_schedule_factor(levi_sched_kind kind, int64_t step, int64_t warmup, int64_t total) {
    if (kind == LEVI_SCHED_CONSTANT) return 1.0f;
    if (step < 0) step = 0;
    if (step < warmup) return (float)((double)step / (double)warmup);
    /* At and after total_steps the rate is 0: transformers' cosine would rise again there. */
    if (step >= total) return 0.0f;
    double span = (double)(total - warmup > 1 ? total - warmup : 1);
    double progress = (double)(step - warmup) / span;
    if (kind == LEVI_SCHED_LINEAR) return (float)(1.0 - progress);
    LEVI_ASSERT(kind == LEVI_SCHED_COSINE, "unknown schedule kind");
    return (float)(0.5 * (1.0 + cos(M_PI * progress)));
}

levi_optim *levi_optim_init(levi_params *params, levi_optim_params op) {
    LEVI_ASSERT(params != NULL && params->data != NULL && params->grad != NULL,
                "levi_optim_init needs an allocated parameter table (levi_params_alloc)");
    LEVI_ASSERT(op.kind == LEVI_OPT_SGD || op.kind == LEVI_OPT_ADAM || op.kind == LEVI_OPT_ADAMW,
                "unknown optimizer kind");
    LEVI_ASSERT(isfinite(op.lr) && op.lr >= 0.0f, "lr must be finite and >= 0");
    LEVI_ASSERT(isfinite(op.weight_decay) && op.weight_decay >= 0.0f,
                "weight_decay must be finite and >= 0");
    LEVI_ASSERT(isfinite(op.momentum) && op.momentum >= 0.0f, "momentum must be >= 0");
    LEVI_ASSERT(!op.nesterov || op.momentum > 0.0f, "Nesterov needs momentum > 0 (as PyTorch)");
    LEVI_ASSERT(op.beta1 >= 0.0f && op.beta1 < 1.0f && op.beta2 >= 0.0f && op.beta2 < 1.0f,
                "Adam betas must be in [0, 1)");
    LEVI_ASSERT(isfinite(op.eps) && op.eps >= 0.0f, "eps must be finite and >= 0");
    LEVI_ASSERT(op.schedule == LEVI_SCHED_CONSTANT || op.schedule == LEVI_SCHED_LINEAR ||
                    op.schedule == LEVI_SCHED_COSINE,
                "unknown schedule kind");
    LEVI_ASSERT(op.schedule == LEVI_SCHED_CONSTANT || (op.warmup_steps >= 0 && op.total_steps > 0 &&
                                                       op.warmup_steps <= op.total_steps),
                "LINEAR/COSINE schedules need 0 <= warmup_steps <= total_steps, total_steps > 0 "
                "(the caller validates user options)");

    levi_optim *o = levi_xcalloc(1, sizeof *o);
    o->params = params;
    o->op = op;
    if (op.kind == LEVI_OPT_SGD)
        o->state_numel = op.momentum > 0.0f ? params->numel : 0;
    else
        LEVI_ASSERT(levi_mul_size(2, params->numel, &o->state_numel), "state size overflows");
    o->state = o->state_numel ? levi_xcalloc(o->state_numel, sizeof(float)) : NULL;
    o->ranges = levi_xcalloc(params->count > 0 ? (size_t)params->count : 1, sizeof *o->ranges);
    return o;
}

void levi_optim_free(levi_optim *o) {
    if (!o) return;
    levi_free(o->state);
    levi_free(o->ranges);
    levi_free(o);
}

float levi_optim_lr(const levi_optim *o) {
    LEVI_ASSERT(o != NULL, "levi_optim_lr on NULL");
    return o->op.lr *
           levi_schedule_factor(o->op.schedule, o->steps, o->op.warmup_steps, o->op.total_steps);
}

int64_t levi_optim_steps(const levi_optim *o) {
    LEVI_ASSERT(o != NULL, "levi_optim_steps on NULL");
    return o->steps;
}

void levi_optim_set_steps(levi_optim *o, int64_t steps) {
    LEVI_ASSERT(o != NULL && steps >= 0, "steps must be >= 0");
    o->steps = steps;
}

size_t levi_optim_state_numel(const levi_optim *o) {
    LEVI_ASSERT(o != NULL, "levi_optim_state_numel on NULL");
    return o->state_numel;
}

float *levi_optim_state(levi_optim *o) {
    LEVI_ASSERT(o != NULL, "levi_optim_state on NULL");
    return o->state;
}

/* Fills o->ranges from the table's current trainable / no_decay flags. */
static int build_ranges(levi_optim *o) {
    const levi_params *p = o->params;
    int nr = 0;
    for (int i = 0; i < p->count; i++) {
        const levi_param *it = &p->items[i];
        if (!it->trainable || it->numel == 0) continue;
        int decay = !it->no_decay;
        opt_range *last = nr > 0 ? &o->ranges[nr - 1] : NULL;
        if (last && last->decay == decay && last->begin + last->n == it->offset) {
            last->n += it->numel;
        } else {
            o->ranges[nr].begin = it->offset;
            o->ranges[nr].n = it->numel;
            o->ranges[nr].decay = decay;
            nr++;
        }
    }
    return nr;
}

/* ---- kernels: one contiguous range each, no branches inside the loops ------------------
 *
 * Each kernel runs over whole blocks of OPT_BLOCK floats with a fixed-count inner loop: GCC's
 * -O2 cost model vectorises only loops whose trip count is a known multiple of the vector
 * width (an int counter from 0: GCC cannot prove `i < b + 16` runs 16 times). The last partial
 * block goes through a zero-padded copy (run_sgd / run_adam), so the update is written once. Adam's
 * sqrtf vectorises only under -fno-math-errno. */
#define OPT_BLOCK 16

/* Sum of squares in double with independent partial sums: vectorises without reassociation
 * (strict FP forbids it) and keeps the rounding error small on millions of floats. */
static double sum_squares(const float *restrict g, size_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)g[i + j] * (double)g[i + j];
    double s = 0.0;
    for (; i < n; i++) s += (double)g[i] * (double)g[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

typedef struct {
    float lr, wd, clip, mu;
} sgd_scalars;

typedef void sgd_kernel(float *restrict p, const float *restrict g, float *restrict buf,
                        size_t nblocks, sgd_scalars k);

/* torch.optim.SGD without momentum: p -= lr * (clip*g + wd*p). buf is unused. */
static void sgd_plain(float *restrict p, const float *restrict g, float *restrict buf,
                      size_t nblocks, sgd_scalars k) {
    (void)buf;
    for (size_t b = 0; b < nblocks * OPT_BLOCK; b += OPT_BLOCK)
        for (int j = 0; j < OPT_BLOCK; j++) {
            size_t i = b + (size_t)j;
            float d = g[i] * k.clip + k.wd * p[i];
            p[i] = p[i] - k.lr * d;
        }
}

/* With momentum (dampening 0): buf = mu*buf + d; the zero-initialised buffer makes the first
 * step buf = d, as PyTorch's clone does. */
static void sgd_momentum(float *restrict p, const float *restrict g, float *restrict buf,
                         size_t nblocks, sgd_scalars k) {
    for (size_t b = 0; b < nblocks * OPT_BLOCK; b += OPT_BLOCK)
        for (int j = 0; j < OPT_BLOCK; j++) {
            size_t i = b + (size_t)j;
            float d = g[i] * k.clip + k.wd * p[i];
            float m = k.mu * buf[i] + d;
            buf[i] = m;
            p[i] = p[i] - k.lr * m;
        }
}

/* Nesterov steps along d + mu*buf instead of buf. */
static void sgd_nesterov(float *restrict p, const float *restrict g, float *restrict buf,
                         size_t nblocks, sgd_scalars k) {
    for (size_t b = 0; b < nblocks * OPT_BLOCK; b += OPT_BLOCK)
        for (int j = 0; j < OPT_BLOCK; j++) {
            size_t i = b + (size_t)j;
            float d = g[i] * k.clip + k.wd * p[i];
            float m = k.mu * buf[i] + d;
            buf[i] = m;
            p[i] = p[i] - k.lr * (d + k.mu * m);
        }
}

static void run_sgd(sgd_kernel *kern, float *p, const float *g, float *buf, size_t n,
                    sgd_scalars k) {
    size_t nb = n / OPT_BLOCK, done = nb * OPT_BLOCK, r = n - done;
    kern(p, g, buf, nb, k);
    if (r == 0) return;
    float tp[OPT_BLOCK] = {0}, tg[OPT_BLOCK] = {0}, tb[OPT_BLOCK] = {0};
    memcpy(tp, p + done, r * sizeof(float));
    memcpy(tg, g + done, r * sizeof(float));
    if (buf) memcpy(tb, buf + done, r * sizeof(float));
    kern(tp, tg, tb, 1, k);
    memcpy(p + done, tp, r * sizeof(float));
    if (buf) memcpy(buf + done, tb, r * sizeof(float));
}

/* Adam / AdamW as PyTorch's single-tensor path (torch.optim.adam._single_tensor_adam):
 *   g' = clip*g + l2*p                      (Adam's weight_decay; l2 = 0 for AdamW)
 *   p  = p * keep                           (AdamW's decoupled decay, keep = 1 - lr*wd)
 *   m  = m + (1-b1)*(g' - m)  (PyTorch's lerp_);  v = b2*v + (1-b2)*g'^2
 *   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps),  step_size = lr / (1 - b1^t)
 * Dividing by bc2_sqrt (not multiplying by its inverse) follows PyTorch's rounding. */
typedef struct {
    float clip, l2, keep, one_minus_b1, b2, one_minus_b2, step_size, bc2_sqrt, eps;
} adam_scalars;

static void adam_blocks(float *restrict p, const float *restrict g, float *restrict m,
                        float *restrict v, size_t nblocks, adam_scalars k) {
    for (size_t b = 0; b < nblocks * OPT_BLOCK; b += OPT_BLOCK)
        for (int j = 0; j < OPT_BLOCK; j++) {
            size_t i = b + (size_t)j;
            float gi = g[i] * k.clip + k.l2 * p[i];
            float mi = m[i] + k.one_minus_b1 * (gi - m[i]);
            float vi = k.b2 * v[i] + k.one_minus_b2 * (gi * gi);
            m[i] = mi;
            v[i] = vi;
            float denom = sqrtf(vi) / k.bc2_sqrt + k.eps;
            p[i] = p[i] * k.keep - k.step_size * (mi / denom);
        }
}

static void run_adam(float *p, const float *g, float *m, float *v, size_t n, adam_scalars k) {
    size_t nb = n / OPT_BLOCK, done = nb * OPT_BLOCK, r = n - done;
    adam_blocks(p, g, m, v, nb, k);
    if (r == 0) return;
    float tp[OPT_BLOCK] = {0}, tg[OPT_BLOCK] = {0}, tm[OPT_BLOCK] = {0}, tv[OPT_BLOCK] = {0};
    memcpy(tp, p + done, r * sizeof(float));
    memcpy(tg, g + done, r * sizeof(float));
    memcpy(tm, m + done, r * sizeof(float));
    memcpy(tv, v + done, r * sizeof(float));
    adam_blocks(tp, tg, tm, tv, 1, k);
    memcpy(p + done, tp, r * sizeof(float));
    memcpy(m + done, tm, r * sizeof(float));
    memcpy(v + done, tv, r * sizeof(float));
}

float levi_optim_step(levi_optim *o) {
    LEVI_ASSERT(o != NULL, "levi_optim_step on NULL");
    levi_params *P = o->params;
    const levi_optim_params *op = &o->op;
    int nr = build_ranges(o);

    double ss = 0.0;
    for (int r = 0; r < nr; r++) ss += sum_squares(P->grad + o->ranges[r].begin, o->ranges[r].n);
    double norm = sqrt(ss);
    /* A NaN/Inf gradient would poison every weight and moment it touches; the step is skipped
     * (not counted) so the caller, who sees the non-finite norm, can stop with intact
     * weights. PyTorch would apply it. */
    if (!isfinite(norm)) return (float)norm;

    float clip = 1.0f;
    if (op->clip_norm > 0.0f) {
        double coef = (double)op->clip_norm / (norm + CLIP_EPS);
        if (coef < 1.0) clip = (float)coef;
    }
    float lr = levi_optim_lr(o);

    for (int r = 0; r < nr; r++) {
        const opt_range *rg = &o->ranges[r];
        float *p = P->data + rg->begin;
        const float *g = P->grad + rg->begin;
        float wd = rg->decay ? op->weight_decay : 0.0f;
        if (op->kind == LEVI_OPT_SGD) {
            sgd_kernel *kern = op->momentum == 0.0f ? sgd_plain
                               : op->nesterov       ? sgd_nesterov
                                                    : sgd_momentum;
            sgd_scalars k = {.lr = lr, .wd = wd, .clip = clip, .mu = op->momentum};
            run_sgd(kern, p, g, o->state ? o->state + rg->begin : NULL, rg->n, k);
        } else {
            /* Scalars in double as PyTorch computes them in Python, then rounded once. */
            double t = (double)(o->steps + 1);
            double bc1 = 1.0 - pow((double)op->beta1, t);
            double bc2 = 1.0 - pow((double)op->beta2, t);
            adam_scalars k = {
                .clip = clip,
                .l2 = op->kind == LEVI_OPT_ADAM ? wd : 0.0f,
                .keep = op->kind == LEVI_OPT_ADAMW ? (float)(1.0 - (double)lr * wd) : 1.0f,
                .one_minus_b1 = (float)(1.0 - (double)op->beta1),
                .b2 = op->beta2,
                .one_minus_b2 = (float)(1.0 - (double)op->beta2),
                .step_size = (float)((double)lr / bc1),
                .bc2_sqrt = (float)sqrt(bc2),
                .eps = op->eps,
            };
            run_adam(p, g, o->state + rg->begin, o->state + P->numel + rg->begin, rg->n, k);
        }
    }
    o->steps++;
    return (float)norm;
}
