/* Tests of WiSE-FT's weight interpolation (levi_ft_interpolate_backbone in finetune.h), the
 * one piece of the post-hoc ensembles (src/cli/ensemble.c) that lives in the library, on two
 * tiny random-config BERTs written to temporary folders ("pre-trained" and "fine-tuned", same
 * config, different random weights) and a handful of short texts: a = 1 gives back the
 * fine-tuned encoder and its predictions bit for bit, a = 0 the pre-trained encoder and the
 * predictions of a model built from the pre-trained folder with the same head; a = 0.5 is the
 * element-wise midpoint; the head is never touched; a outside [0, 1] and encoders of another
 * config are errors naming what is wrong. The output-averaging ensembles are tested end to
 * end by tests/cli_ensemble.sh. No external input needed. */
#include "levi/finetune.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_ROWS 6
static char pre_dir[4096], tuned_dir[4096], other_dir[4096];
static const char *texts[N_ROWS] = {
    "the user likes the movie", "a very old film",    "a new comedy",
    "the horror movie is old",  "user 3 likes drama", "action film , 5"};
static float labels[N_ROWS] = {1, 2, 3, 4, 5, 3};
static const int64_t rows[N_ROWS] = {0, 1, 2, 3, 4, 5};

static const char *const vocab[] = {
    "[PAD]", "[UNK]",  "[CLS]",  "[SEP]", "[MASK]", "user", "likes", "the", "movie", "comedy",
    "drama", "horror", "action", "is",    ",",      "0",    "1",     "2",   "3",     "4",
    "5",     "6",      "7",      "8",     "9",      "a",    "very",  "old", "new",   "film"};

static levi_bert_config tiny_config(int layers) {
    levi_bert_config c = levi_bert_minilm_l6_config();
    c.hidden = 32, c.layers = layers, c.heads = 4, c.intermediate = 48;
    c.vocab = (int)(sizeof vocab / sizeof vocab[0]), c.max_pos = 32, c.type_vocab = 2;
    c.init_range = 0.1f;
    return c;
}

/* Outside a cmocka test an assert has nowhere to jump: fail the binary plainly. */
#define FIXTURE_CHECK(cond)                                                                        \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fixture: %s failed: %s\n", #cond, err.msg);                           \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static void write_model(char *dir, size_t cap, uint64_t seed, int layers) {
    levi_test_tmpdir(dir, cap);
    levi_bert_config c = tiny_config(layers);
    levi_rng r;
    levi_rng_seed(&r, seed);
    levi_error err = {0};
    levi_bert *m = levi_bert_init_random(&c, &r, &err);
    FIXTURE_CHECK(m != NULL);
    FIXTURE_CHECK(levi_bert_save(m, dir, NULL, &err) == LEVI_OK);
    levi_bert_free(m);
    char path[4200], buf[1024];
    size_t at = 0;
    for (size_t i = 0; i < sizeof vocab / sizeof vocab[0]; i++)
        at += (size_t)snprintf(buf + at, sizeof buf - at, "%s\n", vocab[i]);
    snprintf(path, sizeof path, "%s/vocab.txt", dir);
    FIXTURE_CHECK(levi_write_file_atomic(path, buf, at, &err) == LEVI_OK);
}

static void remove_dir(const char *dir) {
    static const char *const files[] = {
        "config.json",           "model.safetensors",       "vocab.txt",
        "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"};
    char p[4200];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
}

static const levi_ft_data data = {N_ROWS, texts, 0, labels, NULL};

/* A regression model on dir's encoder; the head comes from the seed, so two folders of the
   same config get the same head. */
static levi_ft_model *open_model(const char *dir) {
    levi_error err = {0};
    levi_ft_params fp = levi_ft_default_params(LEVI_FT_FULL);
    fp.max_len = 16;
    fp.seed = 7;
    levi_ft_model *m = NULL;
    assert_int_equal(levi_ft_init(&m, dir, &fp, 0, &err), LEVI_OK);
    return m;
}

static levi_bert *open_bert(const char *dir) {
    levi_error err = {0};
    levi_bert *b = levi_bert_open(dir, &err);
    assert_non_null(b);
    return b;
}

/* 1 when every tensor of a's table equals b's (by name) bit for bit. */
static int same_weights(levi_bert *a, levi_bert *b) {
    levi_params *pa = levi_bert_params(a), *pb = levi_bert_params(b);
    if (pa->count != pb->count) return 0;
    for (int i = 0; i < pa->count; i++) {
        int j = levi_params_find(pb, pa->items[i].name);
        if (j < 0 || pb->items[j].numel != pa->items[i].numel) return 0;
        if (memcmp(pa->data + pa->items[i].offset, pb->data + pb->items[j].offset,
                   pa->items[i].numel * sizeof(float)) != 0)
            return 0;
    }
    return 1;
}

static void test_endpoints_and_midpoint(void **state) {
    (void)state;
    levi_error err = {0};
    levi_ft_model *m = open_model(tuned_dir), *m_pre = open_model(pre_dir);
    levi_bert *pre = open_bert(pre_dir), *tuned = open_bert(tuned_dir);
    assert_false(same_weights(pre, tuned)); /* the fixture must be able to tell them apart */
    levi_params *head = levi_ft_head(m);
    float *head0 = malloc(head->numel * sizeof(float));
    memcpy(head0, head->data, head->numel * sizeof(float));
    float p_tuned[N_ROWS], p_pre[N_ROWS], p[N_ROWS];
    assert_int_equal(levi_ft_predict(m, &data, rows, N_ROWS, p_tuned, &err), LEVI_OK);
    assert_int_equal(levi_ft_predict(m_pre, &data, rows, N_ROWS, p_pre, &err), LEVI_OK);
    assert_true(levi_test_max_abs_diff(p_tuned, p_pre, N_ROWS) > 1e-4);

    /* a = 1: the fine-tuned model, bit for bit (after a detour through a = 0.3). */
    assert_int_equal(levi_ft_interpolate_backbone(m, pre, tuned, 0.3f, &err), LEVI_OK);
    assert_int_equal(levi_ft_interpolate_backbone(m, pre, tuned, 1.0f, &err), LEVI_OK);
    assert_true(same_weights(levi_ft_bert(m), tuned));
    assert_int_equal(levi_ft_predict(m, &data, rows, N_ROWS, p, &err), LEVI_OK);
    assert_memory_equal(p, p_tuned, sizeof p);

    /* a = 0: the pre-trained encoder with the (same) head, bit for bit. */
    assert_int_equal(levi_ft_interpolate_backbone(m, pre, tuned, 0.0f, &err), LEVI_OK);
    assert_true(same_weights(levi_ft_bert(m), pre));
    assert_int_equal(levi_ft_predict(m, &data, rows, N_ROWS, p, &err), LEVI_OK);
    assert_memory_equal(p, p_pre, sizeof p);
    printf("a=0 %.6f == pre %.6f, a=1 == tuned %.6f\n", (double)p[0], (double)p_pre[0],
           (double)p_tuned[0]);

    /* a = 0.5: the midpoint of every value (0.5 * x is exact, so one rounding of the sum). */
    assert_int_equal(levi_ft_interpolate_backbone(m, pre, tuned, 0.5f, &err), LEVI_OK);
    levi_params *pm = levi_bert_params(levi_ft_bert(m)), *pp = levi_bert_params(pre),
                *pt = levi_bert_params(tuned);
    size_t checked = 0;
    for (int i = 0; i < pm->count; i++) {
        const float *d = pm->data + pm->items[i].offset;
        const float *a = pp->data + pp->items[levi_params_find(pp, pm->items[i].name)].offset;
        const float *b = pt->data + pt->items[levi_params_find(pt, pm->items[i].name)].offset;
        for (size_t j = 0; j < pm->items[i].numel; j++, checked++)
            assert_true(d[j] == 0.5f * a[j] + 0.5f * b[j]);
    }
    assert_true(checked == pm->numel);
    /* The head stays the fine-tuned model's. */
    assert_memory_equal(head->data, head0, head->numel * sizeof(float));
    free(head0);
    levi_bert_free(pre);
    levi_bert_free(tuned);
    levi_ft_free(m);
    levi_ft_free(m_pre);
}

static void test_errors(void **state) {
    (void)state;
    levi_error err = {0};
    levi_ft_model *m = open_model(tuned_dir);
    levi_bert *pre = open_bert(pre_dir), *tuned = open_bert(tuned_dir),
              *other = open_bert(other_dir);
    assert_int_equal(levi_ft_interpolate_backbone(m, pre, tuned, 1.5f, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "[0, 1]"));
    assert_int_equal(levi_ft_interpolate_backbone(m, pre, tuned, NAN, &err), LEVI_ERR_ARG);
    /* An encoder with fewer layers lacks the upper layers' tensors. */
    assert_int_equal(levi_ft_interpolate_backbone(m, other, tuned, 0.5f, &err), LEVI_ERR_SHAPE);
    assert_non_null(strstr(err.msg, "pre-trained"));
    printf("error: %s\n", err.msg);
    levi_bert_free(pre);
    levi_bert_free(tuned);
    levi_bert_free(other);
    levi_ft_free(m);
}

int main(void) {
    levi_set_num_threads(2);
    write_model(pre_dir, sizeof pre_dir, 11, 2);
    write_model(tuned_dir, sizeof tuned_dir, 22, 2);
    write_model(other_dir, sizeof other_dir, 33, 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_endpoints_and_midpoint),
        cmocka_unit_test(test_errors),
    };
    int failed = cmocka_run_group_tests_name("ensemble", tests, NULL, NULL);
    remove_dir(pre_dir);
    remove_dir(tuned_dir);
    remove_dir(other_dir);
    return failed ? 1 : 0;
}
