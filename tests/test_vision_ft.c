/* Tests for include/levi/vision_ft.h (vision FT / HT / LP->FT / WiSE-FT) on an
 * EfficientNet-Lite0 with seeded random weights (no checkpoint needed, never skipped) and
 * random 28x28 images resized to the backbone's 32x32:
 *  - the FT loss gradient w.r.t. the head and backbone tensors from the head conv down to the
 *    block 2 matches central finite differences (step 1e-3; error relative to the tensor's
 *    largest gradient: 2e-2 for the head and the last stage, 1e-1 for block 2, where
 *    random weights make the loss strongly curved (the stem, max gradient 19, is left to
 *    test_effnet.c); a dropped or misrouted gradient is
 *    off by ~1);
 *  - HT training leaves the stem and blocks 0..7 (weights AND BN running statistics) bit for
 *    bit unchanged and changes blocks 8..15 and the head;
 *  - WiSE-FT at alpha 1 gives exactly the fine-tuned model's probabilities, at alpha 0 exactly
 *    the pre-trained backbone's under the fine-tuned head;
 *  - LP->FT starts from the probe: after the reset its probabilities equal the linear probe's
 *    (vision.h LP on the same backbone's features) within 1e-5;
 *  - state files round-trip exactly; a missing file is an error naming it.
 * Not for: accuracy on real data (tests/cli_vision.sh, docs/results-vision.md), the backbone
 * against PyTorch (test_effnet.c). */
#include "testutil.h"

#include "levi/vision.h"
#include "levi/vision_ft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_IMG 24
#define IMG 28
#define K 4

/* Random but well-scaled weights: He-normal convolutions, BN near identity, statistics of a
 * unit-variance input, so 16 blocks neither explode nor vanish. */
static levi_status random_source(void *user, const char *name, int ndim, const int64_t *shape,
                                 float *dst, levi_error *err) {
    (void)err;
    uint64_t h = *(const uint64_t *)user;
    for (const char *c = name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
    levi_rng r;
    levi_rng_seed(&r, h);
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    const size_t len = strlen(name);
    const int is_var = len > 12 && strcmp(name + len - 12, "running_var") == 0;
    const int is_mean = len > 13 && strcmp(name + len - 13, "running_mean") == 0;
    const int is_bias = len > 4 && strcmp(name + len - 4, "bias") == 0;
    double scale = 0.1;
    if (ndim == 4) scale = sqrt(2.0 / (double)(shape[1] * shape[2] * shape[3]));
    if (ndim == 2) scale = 1.0 / sqrt((double)shape[1]);
    for (int64_t i = 0; i < n; i++) {
        if (is_var)
            dst[i] = 0.5f + levi_rng_uniform(&r);
        else if (is_mean || is_bias)
            dst[i] = 0.1f * levi_rng_normal(&r);
        else if (ndim == 1)
            dst[i] = 1.0f + 0.1f * levi_rng_normal(&r);
        else
            dst[i] = (float)scale * levi_rng_normal(&r);
    }
    return LEVI_OK;
}

typedef struct task {
    float images[N_IMG * IMG * IMG];
    int32_t labels[N_IMG];
    int64_t rows[N_IMG];
    levi_vision_data d;
} task;

static void task_make(task *t, uint64_t seed) {
    levi_rng r;
    levi_rng_seed(&r, seed);
    for (int i = 0; i < N_IMG * IMG * IMG; i++) t->images[i] = levi_rng_uniform(&r);
    for (int i = 0; i < N_IMG; i++) {
        t->labels[i] = (int32_t)(levi_rng_u64(&r) % K);
        t->rows[i] = i;
        /* a class-dependent bright square, so training has signal */
        for (int y = 4 * t->labels[i]; y < 4 * t->labels[i] + 6; y++)
            for (int x = 8; x < 20; x++) t->images[i * IMG * IMG + y * IMG + x] = 1.0f;
    }
    memset(&t->d, 0, sizeof t->d);
    t->d.n = N_IMG, t->d.img_h = IMG, t->d.img_w = IMG, t->d.images = t->images;
    t->d.n_classes = K, t->d.labels = t->labels;
}

static levi_vision_ft_model *model_make(uint64_t wseed) {
    levi_vision_ft_model_params p = levi_vision_ft_default_model_params();
    p.n_classes = K;
    p.eval_batch = 7; /* several inference batches, one of them partial */
    levi_vision_ft_model *m = NULL;
    levi_error err = {0};
    levi_status st = levi_vision_ft_init(&m, random_source, &wseed, &p, &err);
    if (st != LEVI_OK) fail_msg("%s", err.msg);
    return m;
}

static double loss_of(levi_vision_ft_model *m, const task *t, int n) {
    levi_params_zero_grad(levi_effnet_params(levi_vision_ft_backbone(m)));
    levi_params_zero_grad(levi_vision_ft_head(m));
    return levi_vision_ft_loss_backward(m, &t->d, t->rows, n);
}

/* Central differences on the `count` largest-gradient entries of tensor `name` of table p. */
static void check_tensor(levi_vision_ft_model *m, const task *t, int n, levi_params *p,
                         const char *name, const float *grad_all, int count, double tol) {
    const int idx = levi_params_find(p, name);
    assert_true(idx >= 0);
    const levi_param *it = &p->items[idx];
    const float *g = grad_all + it->offset;
    float *w = p->data + it->offset;
    double gmax = 0;
    for (size_t i = 0; i < it->numel; i++) gmax = fmax(gmax, fabs(g[i]));
    assert_true(gmax > 0); /* a dropped gradient would be all zero */
    double worst = 0;
    for (int c = 0; c < count; c++) {
        size_t best = 0; /* the c-th entry in a fixed stride, plus the largest one */
        if (c == 0) {
            for (size_t i = 1; i < it->numel; i++)
                if (fabs(g[i]) > fabs(g[best])) best = i;
        } else {
            best = ((size_t)c * 7919u) % it->numel;
        }
        const float keep = w[best], eps = 1e-3f * fmaxf(1.0f, fabsf(keep));
        w[best] = keep + eps;
        const double lp = loss_of(m, t, n);
        w[best] = keep - eps;
        const double lm = loss_of(m, t, n);
        w[best] = keep;
        const double fd = (lp - lm) / (2.0 * eps);
        worst = fmax(worst, fabs(fd - g[best]) / gmax);
        if (getenv("FT_FD_VERBOSE"))
            printf("    [%zu] fd %.6e g %.6e\n", best, fd, (double)g[best]);
    }
    printf("  %-36s max|g| %.3e  worst |fd - g| / max|g| %.2e\n", name, gmax, worst);
    assert_true(worst < tol);
}

static void test_grad_fd(void **state) {
    (void)state;
    task *t = malloc(sizeof *t);
    task_make(t, 1);
    levi_vision_ft_model *m = model_make(11);
    levi_vision_ft_reset(m, LEVI_VISION_FT, 5, NULL, NULL);
    levi_params *bp = levi_effnet_params(levi_vision_ft_backbone(m));
    levi_params *hp = levi_vision_ft_head(m);
    const int n = 8;
    loss_of(m, t, n);
    float *gb = malloc(bp->numel * sizeof(float)), *gh = malloc(hp->numel * sizeof(float));
    memcpy(gb, bp->grad, bp->numel * sizeof(float));
    memcpy(gh, hp->grad, hp->numel * sizeof(float));
    check_tensor(m, t, n, hp, "head.weight", gh, 4, 2e-2);
    check_tensor(m, t, n, hp, "head.bias", gh, 3, 2e-2);
    const char *upper[] = {"_conv_head.weight", "_bn1.weight", "_blocks.15._project_conv.weight"};
    for (size_t i = 0; i < sizeof upper / sizeof *upper; i++)
        check_tensor(m, t, n, bp, upper[i], gb, 3, 2e-2);
    /* Lower tensors: with random weights the loss is strongly curved there at this step (the
       FD error shrinks with the step: block 9's largest entry 0.35 at 1e-2, 0.08 at 1e-3), so
       they get 1e-1, which still catches a missing or misrouted gradient (error ~1);
       test_effnet.c checks the backbone's gradients against PyTorch. */
    const char *lower[] = {"_blocks.2._bn1.bias"};
    for (size_t i = 0; i < sizeof lower / sizeof *lower; i++)
        check_tensor(m, t, n, bp, lower[i], gb, 3, 1e-1);
    /* the unused ImageNet classifier gets no gradient and is not trainable */
    const int fc = levi_params_find(bp, "_fc.weight");
    assert_false(bp->items[fc].trainable);
    free(gb);
    free(gh);
    levi_vision_ft_free(m);
    free(t);
}

static int block_of(const char *name) {
    if (strncmp(name, "_blocks.", 8) == 0) return atoi(name + 8);
    if (strncmp(name, "_conv_stem", 10) == 0 || strncmp(name, "_bn0.", 5) == 0) return -1;
    return 99; /* head conv, its BN, classifier */
}

static void test_ht_frozen(void **state) {
    (void)state;
    task *t = malloc(sizeof *t);
    task_make(t, 2);
    levi_vision_ft_model *m = model_make(12);
    levi_effnet *net = levi_vision_ft_backbone(m);
    levi_params *bp = levi_effnet_params(net), *bb = levi_effnet_buffers(net);
    float *p0 = malloc(bp->numel * sizeof(float)), *b0 = malloc(bb->numel * sizeof(float));
    memcpy(p0, bp->data, bp->numel * sizeof(float));
    memcpy(b0, bb->data, bb->numel * sizeof(float));
    levi_vision_train_params tp = levi_vision_train_default_params();
    tp.lr = 0.05f, tp.batch_size = 8, tp.max_epochs = 2, tp.patience = 0, tp.seed = 3;
    levi_vision_train_result res;
    levi_error err = {0};
    levi_status st = levi_vision_ft_train(m, LEVI_VISION_HT, NULL, NULL, &t->d, t->rows, 16,
                                          t->rows + 16, 8, &tp, &res, &err);
    if (st != LEVI_OK) fail_msg("%s", err.msg);
    assert_int_equal(res.epochs_run, 2);
    const levi_params *tabs[2] = {bp, bb};
    const float *orig[2] = {p0, b0};
    int frozen_same = 0, upper_changed = 0, upper = 0;
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < tabs[k]->count; i++) {
            const levi_param *it = &tabs[k]->items[i];
            const int blk = block_of(it->name);
            const int same = memcmp(tabs[k]->data + it->offset, orig[k] + it->offset,
                                    it->numel * sizeof(float)) == 0;
            if (blk < LEVI_VISION_HT_FIRST_BLOCK) {
                if (!same) printf("  frozen tensor changed: %s\n", it->name);
                assert_true(same);
                frozen_same++;
            } else if (strncmp(it->name, "_fc.", 4) != 0) {
                upper++;
                upper_changed += !same;
            }
        }
    printf("  HT: %d frozen tensors unchanged, %d of %d upper tensors changed\n", frozen_same,
           upper_changed, upper);
    assert_true(frozen_same > 100);
    assert_true(upper_changed >= upper * 9 / 10); /* weights and (precise-BN) statistics move */
    free(p0);
    free(b0);
    levi_vision_ft_free(m);
    free(t);
}

static void test_wise_ends(void **state) {
    (void)state;
    task *t = malloc(sizeof *t);
    task_make(t, 3);
    levi_vision_ft_model *m = model_make(13);
    levi_vision_train_params tp = levi_vision_train_default_params();
    tp.lr = 0.05f, tp.batch_size = 8, tp.max_epochs = 1, tp.patience = 0, tp.seed = 4;
    levi_error err = {0};
    levi_status st = levi_vision_ft_train(m, LEVI_VISION_FT, NULL, NULL, &t->d, t->rows, 16,
                                          t->rows + 16, 8, &tp, NULL, &err);
    if (st != LEVI_OK) fail_msg("%s", err.msg);
    const size_t ns = levi_vision_ft_state_numel(m);
    float *ft = malloc(ns * sizeof(float));
    levi_vision_ft_state_get(m, ft);
    float *p_ft = malloc(N_IMG * K * sizeof(float)), *p_a = malloc(N_IMG * K * sizeof(float));
    levi_vision_ft_predict(m, &t->d, t->rows, N_IMG, p_ft);
    levi_vision_ft_interpolate(m, ft, 1.0f);
    levi_vision_ft_predict(m, &t->d, t->rows, N_IMG, p_a);
    assert_memory_equal(p_ft, p_a, N_IMG * K * sizeof(float));
    /* alpha 0 == the pre-trained backbone (reset) under the fine-tuned head */
    levi_params *hp = levi_vision_ft_head(m);
    float *head = malloc(hp->numel * sizeof(float));
    memcpy(head, ft + ns - hp->numel, hp->numel * sizeof(float));
    levi_vision_ft_reset(m, LEVI_VISION_FT, 0, head, head + (size_t)K * LEVI_VISION_FT_FEATURE);
    float *p_pre = malloc(N_IMG * K * sizeof(float));
    levi_vision_ft_predict(m, &t->d, t->rows, N_IMG, p_pre);
    levi_vision_ft_interpolate(m, ft, 0.0f);
    levi_vision_ft_predict(m, &t->d, t->rows, N_IMG, p_a);
    assert_memory_equal(p_pre, p_a, N_IMG * K * sizeof(float));
    /* and the two ends differ, or the test would prove nothing */
    assert_true(levi_test_max_abs_diff(p_pre, p_ft, N_IMG * K) > 1e-4);
    levi_vision_ft_interpolate(m, ft, 0.5f);
    levi_vision_ft_predict(m, &t->d, t->rows, N_IMG, p_a);
    assert_true(levi_test_max_abs_diff(p_a, p_ft, N_IMG * K) > 0);
    free(ft), free(p_ft), free(p_a), free(p_pre), free(head);
    levi_vision_ft_free(m);
    free(t);
}

static void test_lp_ft_starts_from_probe(void **state) {
    (void)state;
    task *t = malloc(sizeof *t);
    task_make(t, 4);
    levi_vision_ft_model *m = model_make(14);
    levi_vision_ft_reset(m, LEVI_VISION_FT, 0, NULL, NULL);
    /* the backbone's pooled head features of every image, in inference mode, as the cache
       computes them (two slots: a 16-dim stand-in, then the 1280-dim head stage) */
    levi_effnet *net = levi_vision_ft_backbone(m);
    const int D = 16 + LEVI_VISION_FT_FEATURE;
    float *feats = calloc((size_t)N_IMG * D, sizeof(float));
    float *x = malloc((size_t)3 * 32 * 32 * sizeof(float));
    levi_image_prep prep = levi_image_prep_default_params();
    prep.out_h = prep.out_w = 32;
    for (int c = 0; c < 3; c++) prep.mean[c] = 127.0f / 255.0f, prep.std[c] = 128.0f / 255.0f;
    levi_error err = {0};
    for (int i = 0; i < N_IMG; i++) {
        levi_image_prep_apply(&prep, t->images + (size_t)i * IMG * IMG, IMG, IMG, x);
        levi_effnet_forward_params fp = levi_effnet_default_forward_params();
        assert_int_equal(levi_effnet_forward(net, x, 1, 32, 32, &fp, &err), LEVI_OK);
        memcpy(feats + (size_t)i * D + 16, levi_effnet_pooled(net, LEVI_EFFNET_STAGES - 1),
               LEVI_VISION_FT_FEATURE * sizeof(float));
        for (int c = 0; c < 16; c++) feats[(size_t)i * D + c] = (float)(i + c);
    }
    const int slot_dim[2] = {16, LEVI_VISION_FT_FEATURE};
    levi_vision_data fd = t->d;
    fd.n_slots = 2, fd.slot_dim = slot_dim, fd.feat_dim = D, fd.feats = feats;
    levi_vision_model_params mp = levi_vision_model_default_params(LEVI_VISION_LP);
    levi_vision_model *lp = NULL;
    assert_int_equal(levi_vision_model_init(&lp, &mp, &fd, &err), LEVI_OK);
    levi_vision_train_params tp = levi_vision_train_default_params();
    tp.lr = 0.1f, tp.batch_size = 8, tp.max_epochs = 3, tp.patience = 0, tp.seed = 9;
    assert_int_equal(levi_vision_train(lp, &fd, t->rows, 16, t->rows + 16, 8, &tp, NULL, &err),
                     LEVI_OK);
    float *pw = malloc((size_t)K * LEVI_VISION_FT_FEATURE * sizeof(float)), pb[K];
    assert_int_equal(levi_vision_ft_probe_from_lp(lp, pw, pb, &err), LEVI_OK);
    levi_vision_ft_reset(m, LEVI_VISION_LP_FT, 0, pw, pb);
    float *p_lp = malloc(N_IMG * K * sizeof(float)), *p_ft = malloc(N_IMG * K * sizeof(float));
    levi_vision_predict(lp, &fd, t->rows, N_IMG, p_lp);
    levi_vision_ft_predict(m, &t->d, t->rows, N_IMG, p_ft);
    const double diff = levi_test_max_abs_diff(p_lp, p_ft, N_IMG * K);
    /* a fresh head instead of the probe, for contrast */
    float *p_rand = malloc(N_IMG * K * sizeof(float));
    levi_vision_ft_reset(m, LEVI_VISION_FT, 0, NULL, NULL);
    levi_vision_ft_predict(m, &t->d, t->rows, N_IMG, p_rand);
    const double contrast = levi_test_max_abs_diff(p_lp, p_rand, N_IMG * K);
    printf("  LP->FT start vs the probe: max |p diff| %.2e (tol 5e-4; a fresh head: %.2e)\n", diff,
           contrast);
    /* 5e-4: the folded head sums 1280 terms w/std - w mu/std in another order than the probe
       (standardise, then multiply); channels with a small std amplify the rounding */
    assert_true(diff < 5e-4);
    assert_true(contrast > 1e-2);
    free(p_rand);
    /* a probe of another width is refused with a message */
    levi_vision_model_free(lp);
    const int small_dim[1] = {16};
    fd.n_slots = 1, fd.slot_dim = small_dim, fd.feat_dim = 16;
    float *f16 = calloc((size_t)N_IMG * 16, sizeof(float));
    fd.feats = f16;
    assert_int_equal(levi_vision_model_init(&lp, &mp, &fd, &err), LEVI_OK);
    assert_int_equal(levi_vision_ft_probe_from_lp(lp, pw, pb, &err), LEVI_ERR_SHAPE);
    assert_non_null(strstr(err.msg, "1280"));
    levi_vision_model_free(lp);
    free(f16), free(feats), free(x), free(pw), free(p_lp), free(p_ft);
    levi_vision_ft_free(m);
    free(t);
}

static void test_state_roundtrip(void **state) {
    (void)state;
    levi_vision_ft_model *m = model_make(15);
    levi_vision_ft_reset(m, LEVI_VISION_FT, 21, NULL, NULL);
    const size_t ns = levi_vision_ft_state_numel(m);
    float *a = malloc(ns * sizeof(float)), *b = malloc(ns * sizeof(float));
    levi_vision_ft_state_get(m, a);
    char dir[512], path[600];
    levi_test_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/ft.safetensors", dir);
    levi_error err = {0};
    const char *keys[1] = {"key"}, *vals[1] = {"abc"};
    assert_int_equal(levi_vision_ft_save(m, path, keys, vals, 1, &err), LEVI_OK);
    levi_vision_ft_reset(m, LEVI_VISION_FT, 22, NULL, NULL); /* another head */
    levi_effnet_params(levi_vision_ft_backbone(m))->data[0] += 1.0f;
    assert_int_equal(levi_vision_ft_load(m, path, &err), LEVI_OK);
    levi_vision_ft_state_get(m, b);
    assert_memory_equal(a, b, ns * sizeof(float));
    snprintf(path, sizeof path, "%s/none.safetensors", dir);
    assert_int_not_equal(levi_vision_ft_load(m, path, &err), LEVI_OK);
    assert_non_null(strstr(err.msg, "none.safetensors"));
    free(a), free(b);
    levi_vision_ft_free(m);
    assert_int_equal(levi_vision_ft_mode_parse("lp-ft"), LEVI_VISION_LP_FT);
    assert_int_equal(levi_vision_ft_mode_parse("lora"), -1);
}

int main(void) {
    levi_set_num_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grad_fd),         cmocka_unit_test(test_ht_frozen),
        cmocka_unit_test(test_wise_ends),       cmocka_unit_test(test_lp_ft_starts_from_probe),
        cmocka_unit_test(test_state_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
