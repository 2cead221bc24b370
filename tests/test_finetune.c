/* Tests of include/levi/finetune.h on a tiny random-config BERT written to a temporary folder
 * (config.json, model.safetensors, a 30-token vocab.txt) and 48 short MovieLens-like texts
 * whose label depends on their words: the loss goes down; every mode trains exactly the
 * parameters it should (counted from the config); HT leaves the embeddings and lower layers
 * bit-identical; LP->FT's second phase starts from the probe an LP run of the same seed
 * gives; a run interrupted mid-epoch and resumed gives bit-identical weights; the saved
 * tuned backbone loads with levi_bert_open and gives the in-memory model's hidden states;
 * evaluation agrees with prediction; classification trains too. No external input needed. */
#include "levi/finetune.h"
#include "levi/ops.h"
#include "levi/tokenizer.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_ROWS 48
static char model_dir[4096];
static char *texts[N_ROWS];
static float labels[N_ROWS];
static int32_t classes[N_ROWS];
static int64_t train_rows[32], val_rows[8], test_rows[8];

static const char *const vocab[] = {
    "[PAD]", "[UNK]",  "[CLS]",  "[SEP]", "[MASK]", "user", "likes", "the", "movie", "comedy",
    "drama", "horror", "action", "is",    ",",      "0",    "1",     "2",   "3",     "4",
    "5",     "6",      "7",      "8",     "9",      "a",    "very",  "old", "new",   "film"};

static levi_bert_config tiny_config(void) {
    levi_bert_config c = levi_bert_minilm_l6_config();
    c.hidden = 32, c.layers = 4, c.heads = 4, c.intermediate = 48;
    c.vocab = (int)(sizeof vocab / sizeof vocab[0]), c.max_pos = 32, c.type_vocab = 2;
    c.init_range = 0.1f;
    return c;
}

static size_t bert_total(const levi_bert_config *c) {
    size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    return ((size_t)c->vocab + (size_t)c->max_pos + (size_t)c->type_vocab + 2) * H +
           (size_t)c->layers * (4 * H * H + 2 * H * I + I + 9 * H);
}

static size_t layer_total(const levi_bert_config *c) {
    size_t H = (size_t)c->hidden, I = (size_t)c->intermediate;
    return 4 * H * H + 2 * H * I + I + 9 * H;
}

/* Outside a cmocka test an assert has nowhere to jump: fail the binary plainly. */
#define FIXTURE_CHECK(cond)                                                                        \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fixture: %s failed: %s\n", #cond, err.msg);                           \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static void write_fixture(void) {
    levi_test_tmpdir(model_dir, sizeof model_dir);
    levi_bert_config c = tiny_config();
    levi_rng r;
    levi_rng_seed(&r, 42);
    levi_error err = {0};
    levi_bert *m = levi_bert_init_random(&c, &r, &err);
    FIXTURE_CHECK(m != NULL);
    FIXTURE_CHECK(levi_bert_save(m, model_dir, NULL, &err) == LEVI_OK);
    levi_bert_free(m);
    char path[4200], buf[1024];
    size_t at = 0;
    for (size_t i = 0; i < sizeof vocab / sizeof vocab[0]; i++)
        at += (size_t)snprintf(buf + at, sizeof buf - at, "%s\n", vocab[i]);
    snprintf(path, sizeof path, "%s/vocab.txt", model_dir);
    FIXTURE_CHECK(levi_write_file_atomic(path, buf, at, &err) == LEVI_OK);
    static const char *const genres[4] = {"comedy", "drama", "horror", "action"};
    static const char *const ages[2] = {"very old", "new"};
    for (int i = 0; i < N_ROWS; i++) {
        int g = i % 4, u = (i * 7) % 10, a = (i / 4) % 2;
        char t[160];
        snprintf(t, sizeof t, "the user %d likes the movie , a %s %s film", u, ages[a], genres[g]);
        texts[i] = strdup(t);
        labels[i] = 3.0f + (g == 0) - (g == 2) + 0.1f * (float)u + 0.5f * (float)a;
        classes[i] = g == 0 || g == 3;
    }
    for (int i = 0; i < 32; i++) train_rows[i] = i;
    for (int i = 0; i < 8; i++) val_rows[i] = 32 + i, test_rows[i] = 40 + i;
}

static void remove_dir(const char *dir) {
    static const char *const files[] = {
        "config.json",           "model.safetensors",       "vocab.txt",
        "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
        "state.safetensors"};
    char p[4200];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
}

static levi_ft_data reg_data(void) {
    levi_ft_data d = {N_ROWS, (const char *const *)texts, 0, labels, NULL};
    return d;
}

static levi_ft_params small_params(levi_ft_mode mode) {
    levi_ft_params fp = levi_ft_default_params(mode);
    fp.max_len = 16;
    fp.batch_size = 8;
    fp.eval_batch = 5; // not a divisor of 8: partial eval batches
    fp.max_epochs = 3;
    fp.patience = 10;
    fp.lr = 1e-3f;
    fp.seed = 7;
    fp.lora.rank = 4;
    return fp;
}

static levi_ft_model *make(const levi_ft_params *fp, int n_classes) {
    levi_ft_model *m = NULL;
    levi_error err = {0};
    levi_status st = levi_ft_init(&m, model_dir, fp, n_classes, &err);
    if (st != LEVI_OK) printf("levi_ft_init: %s\n", err.msg);
    assert_int_equal(st, LEVI_OK);
    return m;
}

static void train(levi_ft_model *m, levi_train_result *res) {
    levi_ft_data d = reg_data();
    levi_error err = {0};
    levi_status st = levi_ft_train(m, &d, train_rows, 32, val_rows, 8, res, &err);
    if (st != LEVI_OK) printf("levi_ft_train: %s\n", err.msg);
    assert_int_equal(st, LEVI_OK);
}

/* ---------------------------------------------------------------------------------------- */

/* The whole model's gradient (head, pooling, encoder; LoRA) by central differences. */
static void test_gradcheck(void **state) {
    (void)state;
    const levi_ft_mode modes[3] = {LEVI_FT_FULL, LEVI_FT_LORA, LEVI_FT_FULL};
    for (int k = 0; k < 3; k++) {
        levi_ft_params fp = small_params(modes[k]);
        fp.head_hidden = k == 2 ? 6 : 0;
        levi_ft_model *m = make(&fp, k == 2 ? 3 : 0);
        levi_ft_data d = reg_data();
        int32_t cls[N_ROWS];
        for (int i = 0; i < N_ROWS; i++) cls[i] = i % 3;
        if (k == 2) d.n_classes = 3, d.y = NULL, d.yc = cls;
        levi_error err = {0};
        levi_params *tabs[2] = {levi_bert_params(levi_ft_bert(m)), levi_ft_head(m)};
        if (modes[k] == LEVI_FT_LORA) // B = 0 would hide A's gradient
            for (int i = 0; i < tabs[0]->count; i++)
                if (strstr(tabs[0]->items[i].name, "lora_B"))
                    for (size_t e = 0; e < tabs[0]->items[i].numel; e++)
                        levi_params_data(tabs[0], i)[e] = 0.05f * (float)((e * 7) % 11) - 0.25f;
        const int64_t rows[5] = {0, 3, 9, 14, 22};
        float loss;
        assert_int_equal(levi_ft_loss_and_grad(m, &d, rows, 5, NULL, &loss, &err), LEVI_OK);
        size_t total = tabs[0]->numel + tabs[1]->numel;
        float *g = malloc(total * sizeof(float));
        memcpy(g, tabs[0]->grad, tabs[0]->numel * sizeof(float));
        memcpy(g + tabs[0]->numel, tabs[1]->grad, tabs[1]->numel * sizeof(float));
        levi_rng pick;
        levi_rng_seed(&pick, 11);
        double worst = 0;
        int checked = 0;
        for (int tb = 0; tb < 2; tb++)
            for (int i = 0; i < tabs[tb]->count; i++) {
                const levi_param *it = &tabs[tb]->items[i];
                if (!it->trainable || (i % 3 && tb == 0)) continue;
                float *w = levi_params_data(tabs[tb], i);
                const float *gi = g + (tb ? tabs[0]->numel : 0) + it->offset;
                for (int trial = 0; trial < 2; trial++) {
                    size_t e = levi_rng_below(&pick, (uint32_t)it->numel);
                    if (strstr(it->name, "word_embeddings")) e = 9 * 32 + e % 32; // "comedy"
                    const float w0 = w[e], h = 1e-2f;
                    float lp, lm;
                    w[e] = w0 + h;
                    assert_int_equal(levi_ft_loss_and_grad(m, &d, rows, 5, NULL, &lp, &err), 0);
                    w[e] = w0 - h;
                    assert_int_equal(levi_ft_loss_and_grad(m, &d, rows, 5, NULL, &lm, &err), 0);
                    w[e] = w0;
                    double fd = ((double)lp - lm) / (2.0 * h);
                    double rel = fabs(fd - gi[e]) / fmax(0.05, fabs(fd));
                    if (rel > 5e-2)
                        printf("  %s[%zu]: analytic %.6g, numeric %.6g\n", it->name, e, gi[e], fd);
                    worst = fmax(worst, rel);
                    checked++;
                }
            }
        printf("%s%s gradcheck over %d elements: worst |analytic - numeric| / max(0.05, "
               "|numeric|) = %.2e\n",
               levi_ft_mode_name(modes[k]), k == 2 ? " (MLP head, 3 classes)" : "", checked, worst);
        assert_true(worst < 5e-2);
        free(g);
        levi_ft_free(m);
    }
}

static void test_loss_goes_down(void **state) {
    (void)state;
    const levi_ft_mode modes[] = {LEVI_FT_FULL, LEVI_FT_LORA, LEVI_FT_SCRATCH};
    for (size_t k = 0; k < 3; k++) {
        levi_ft_params fp = small_params(modes[k]);
        fp.max_epochs = 15;
        fp.lr = modes[k] == LEVI_FT_LORA ? 3e-2f : modes[k] == LEVI_FT_FULL ? 3e-3f : 1e-2f;
        fp.hidden_dropout = fp.attn_dropout = 0.0f; // 32 rows: dropout noise would hide the trend
        levi_ft_model *m = make(&fp, 0);
        levi_train_result res;
        train(m, &res);
        printf("%s: training loss per epoch", levi_ft_mode_name(modes[k]));
        for (int e = 0; e < res.n_history; e++) printf(" %.4f", res.loss_history[e]);
        printf("; ID val RMSE %.4f (best epoch %d)\n", res.best_val_metric, res.best_epoch);
        assert_int_equal(res.finished, 1);
        assert_int_equal(res.epochs_run, 15);
        assert_true(res.loss_history[14] < 0.5 * res.loss_history[0]);
        assert_true(res.best_val_metric < 0.45); // the labels' std is about 0.8
        levi_ft_free(m);
    }
}

static void test_trainable_counts(void **state) {
    (void)state;
    const levi_bert_config c = tiny_config();
    const size_t H = (size_t)c.hidden, head = H + 1;
    for (int mode = 0; mode < LEVI_FT_MODE_COUNT; mode++) {
        levi_ft_params fp = small_params((levi_ft_mode)mode);
        levi_ft_model *m = make(&fp, 0);
        size_t want = head;
        switch (mode) {
        case LEVI_FT_FULL:
        case LEVI_FT_SCRATCH:
            want += bert_total(&c);
            break;
        case LEVI_FT_HALF:
            want += (size_t)(c.layers - c.layers / 2) * layer_total(&c);
            break;
        case LEVI_FT_LORA: // query and value: r * (H + H) each, per layer
            want += (size_t)c.layers * 2 * (size_t)fp.lora.rank * 2 * H;
            break;
        default: // LP, and LP->FT before its full phase
            break;
        }
        printf("%-5s trains %zu parameters (expected %zu)\n", levi_ft_mode_name(mode),
               levi_ft_trainable_count(m), want);
        assert_int_equal(levi_ft_trainable_count(m), want);
        levi_ft_free(m);
    }
    // An MLP head: H*K + K + K*O + O.
    levi_ft_params fp = small_params(LEVI_FT_PROBE);
    fp.mode = LEVI_FT_HALF;
    fp.head_hidden = 16;
    levi_ft_model *m = make(&fp, 3);
    assert_int_equal(levi_ft_trainable_count(m),
                     (size_t)(c.layers - c.layers / 2) * layer_total(&c) + H * 16 + 16 + 16 * 3 +
                         3);
    levi_ft_free(m);
}

static void test_ht_freezes_lower_half(void **state) {
    (void)state;
    levi_ft_params fp = small_params(LEVI_FT_HALF);
    fp.max_epochs = 1;
    levi_ft_model *m = make(&fp, 0);
    levi_error err = {0};
    levi_bert *ref = levi_bert_open(model_dir, &err);
    assert_non_null(ref);
    train(m, NULL);
    const levi_params *p = levi_bert_params(levi_ft_bert(m)), *q = levi_bert_params(ref);
    assert_int_equal(p->count, q->count);
    int same = 0, moved = 0;
    for (int i = 0; i < p->count; i++) {
        const char *n = p->items[i].name;
        int upper =
            strncmp(n, "encoder.layer.2.", 16) == 0 || strncmp(n, "encoder.layer.3.", 16) == 0;
        int eq = memcmp(levi_params_data(p, i), levi_params_data(q, i),
                        p->items[i].numel * sizeof(float)) == 0;
        if (!upper) {
            if (!eq) printf("HT changed the frozen tensor %s\n", n);
            assert_true(eq);
            same++;
        } else if (!eq) {
            moved++;
        }
    }
    printf("HT: %d frozen tensors bit-identical, %d upper-layer tensors moved\n", same, moved);
    assert_true(moved >= 10);
    levi_bert_free(ref);
    levi_ft_free(m);
}

static void test_lp_ft_starts_from_probe(void **state) {
    (void)state;
    levi_ft_params lp = small_params(LEVI_FT_PROBE);
    lp.lr = 3e-2f;
    lp.max_epochs = 2;
    levi_ft_model *probe = make(&lp, 0);
    train(probe, NULL);
    levi_ft_params fp = small_params(LEVI_FT_LP_FT);
    fp.lp_lr = 3e-2f;
    fp.lp_epochs = 2;
    fp.epoch_limit = 2; // stops right after the probing phase
    levi_ft_model *m = make(&fp, 0);
    levi_train_result res;
    train(m, &res);
    assert_int_equal(res.finished, 0);
    const levi_params *a = levi_ft_head(probe), *b = levi_ft_head(m);
    assert_int_equal(a->numel, b->numel);
    assert_true(memcmp(a->data, b->data, a->numel * sizeof(float)) == 0);
    // The probing phase left the backbone alone, and the full phase now trains everything.
    levi_error err = {0};
    levi_bert *ref = levi_bert_open(model_dir, &err);
    const levi_params *p = levi_bert_params(levi_ft_bert(m)), *q = levi_bert_params(ref);
    assert_true(memcmp(p->data, q->data, p->numel * sizeof(float)) == 0);
    assert_int_equal(levi_ft_trainable_count(m), bert_total(levi_bert_get_config(ref)) + a->numel);
    printf("LP->FT: after the probing phase the head equals the LP run's (bit for bit), the "
           "backbone is untouched and the next phase trains %zu parameters\n",
           levi_ft_trainable_count(m));
    // Finishing it (a fresh call continues: no state file, so in memory) trains the backbone.
    fp.epoch_limit = 0;
    fp.max_epochs = 1;
    levi_ft_free(m);
    m = make(&fp, 0);
    train(m, &res);
    assert_int_equal(res.finished, 1);
    assert_int_equal(res.epochs_run, 3);
    p = levi_bert_params(levi_ft_bert(m));
    assert_false(memcmp(p->data, q->data, p->numel * sizeof(float)) == 0);
    levi_bert_free(ref);
    levi_ft_free(probe);
    levi_ft_free(m);
}

typedef struct {
    volatile int *flag;
    int at_epoch, at_step;
} stopper;

static void stop_at(void *user, const levi_train_progress *p) {
    stopper *s = user;
    if (!p->epoch_done && p->epoch == s->at_epoch && p->step == s->at_step) *s->flag = 1;
}

static void test_resume_bit_identical(void **state) {
    (void)state;
    const levi_ft_mode modes[2] = {LEVI_FT_FULL, LEVI_FT_LP_FT};
    for (int k = 0; k < 2; k++) {
        levi_ft_params fp = small_params(modes[k]);
        fp.max_epochs = 2;
        fp.lp_epochs = 1;
        levi_ft_model *a = make(&fp, 0);
        levi_train_result ra;
        train(a, &ra);

        char dir[4096], path[4200];
        levi_test_tmpdir(dir, sizeof dir);
        snprintf(path, sizeof path, "%s/state.safetensors", dir);
        volatile int flag = 0;
        stopper s = {&flag, modes[k] == LEVI_FT_FULL ? 2 : 3, 2};
        fp.state_path = path;
        fp.resume = 1;
        fp.stop_flag = &flag;
        fp.progress = stop_at;
        fp.progress_user = &s;
        fp.progress_every = 1;
        levi_ft_model *b = make(&fp, 0);
        levi_ft_data d = reg_data();
        levi_error err = {0};
        assert_int_equal(levi_ft_train(b, &d, train_rows, 32, val_rows, 8, NULL, &err),
                         LEVI_ERR_INTERRUPTED);
        printf("%s interrupted: %s\n", levi_ft_mode_name(modes[k]), err.msg);
        levi_ft_free(b);
        flag = 0;
        s.at_epoch = -1;
        levi_ft_model *c = make(&fp, 0); // a fresh process: weights from the seed, then state
        levi_train_result rc;
        assert_int_equal(levi_ft_train(c, &d, train_rows, 32, val_rows, 8, &rc, &err), LEVI_OK);
        const levi_params *pa = levi_bert_params(levi_ft_bert(a));
        const levi_params *pc = levi_bert_params(levi_ft_bert(c));
        assert_true(memcmp(pa->data, pc->data, pa->numel * sizeof(float)) == 0);
        assert_true(memcmp(levi_ft_head(a)->data, levi_ft_head(c)->data,
                           levi_ft_head(a)->numel * sizeof(float)) == 0);
        assert_true(ra.best_val_metric == rc.best_val_metric);
        assert_int_equal(ra.epochs_run, rc.epochs_run);
        for (int e = 0; e < ra.n_history; e++)
            assert_true(ra.loss_history[e] == rc.loss_history[e]);
        printf("%s: interrupted in epoch %d and resumed: weights, history and ID val %.6f "
               "bit-identical\n",
               levi_ft_mode_name(modes[k]), modes[k] == LEVI_FT_FULL ? 2 : 3, rc.best_val_metric);
        // A finished state just loads.
        levi_ft_model *e = make(&fp, 0);
        assert_int_equal(levi_ft_train(e, &d, train_rows, 32, val_rows, 8, &rc, &err), LEVI_OK);
        assert_int_equal(rc.finished, 1);
        assert_true(memcmp(levi_ft_head(a)->data, levi_ft_head(e)->data,
                           levi_ft_head(a)->numel * sizeof(float)) == 0);
        // A different lr refuses the state, naming both settings.
        fp.lr = 5e-4f;
        levi_ft_model *f = make(&fp, 0);
        assert_int_equal(levi_ft_train(f, &d, train_rows, 32, val_rows, 8, NULL, &err),
                         LEVI_ERR_ARG);
        assert_non_null(strstr(err.msg, "lr=0.000500000024"));
        levi_ft_free(f);
        levi_ft_free(e);
        levi_ft_free(c);
        levi_ft_free(a);
        remove_dir(dir);
    }
}

static void test_saved_backbone(void **state) {
    (void)state;
    const levi_ft_mode modes[2] = {LEVI_FT_LORA, LEVI_FT_FULL};
    for (int k = 0; k < 2; k++) {
        levi_ft_params fp = small_params(modes[k]);
        fp.max_epochs = 1;
        fp.lr = 1e-2f;
        levi_ft_model *m = make(&fp, 0);
        train(m, NULL);
        char dir[4096];
        levi_test_tmpdir(dir, sizeof dir);
        levi_error err = {0};
        assert_int_equal(levi_ft_save_backbone(m, dir, &err), LEVI_OK);
        levi_bert *b = levi_bert_open(dir, &err);
        if (!b) printf("open: %s\n", err.msg);
        assert_non_null(b);
        levi_tokenizer *tok = levi_tokenizer_open(dir, &err);
        assert_non_null(tok);
        const char *batch[3] = {texts[1], texts[2], texts[5]};
        int32_t ids[3 * 16], mask[3 * 16];
        int S = 0;
        assert_int_equal(levi_tokenizer_encode_batch(tok, batch, 3, 16, 0, ids, mask, &S, &err),
                         LEVI_OK);
        levi_bert *live = levi_ft_bert(m);
        const int L = levi_bert_get_config(b)->layers, H = levi_bert_get_config(b)->hidden;
        assert_int_equal(levi_bert_forward(live, ids, mask, NULL, 3, S, NULL, &err), LEVI_OK);
        float *want = malloc((size_t)3 * S * H * (L + 1) * sizeof(float));
        for (int l = 0; l <= L; l++)
            memcpy(want + (size_t)l * 3 * S * H, levi_bert_hidden(live, l),
                   (size_t)3 * S * H * sizeof(float));
        assert_int_equal(levi_bert_forward(b, ids, mask, NULL, 3, S, NULL, &err), LEVI_OK);
        double worst = 0;
        for (int l = 0; l <= L; l++)
            worst = fmax(worst, levi_test_max_abs_diff(levi_bert_hidden(b, l),
                                                       want + (size_t)l * 3 * S * H, 3 * S * H));
        printf("%s: saved backbone vs in-memory model, all hidden states: max-abs %.2e\n",
               levi_ft_mode_name(modes[k]), worst);
        assert_true(worst < 1e-5);
        if (modes[k] == LEVI_FT_FULL) assert_true(worst == 0.0); // no merge: the same weights
        free(want);
        levi_tokenizer_close(tok);
        levi_bert_free(b);
        levi_ft_free(m);
        remove_dir(dir);
    }
}

static void test_evaluate_matches_predict(void **state) {
    (void)state;
    levi_ft_params fp = small_params(LEVI_FT_FULL);
    fp.max_epochs = 1;
    levi_ft_model *m = make(&fp, 0);
    train(m, NULL);
    levi_ft_data d = reg_data();
    levi_error err = {0};
    float pred[8];
    assert_int_equal(levi_ft_predict(m, &d, test_rows, 8, pred, &err), LEVI_OK);
    double se = 0;
    for (int i = 0; i < 8; i++) se += pow((double)pred[i] - labels[test_rows[i]], 2);
    levi_metrics mt;
    assert_int_equal(levi_ft_evaluate(m, &d, test_rows, 8, &mt, &err), LEVI_OK);
    printf("ID test RMSE %.5f (from predictions %.5f)\n", mt.metric, sqrt(se / 8));
    assert_true(fabs(mt.metric - sqrt(se / 8)) < 1e-9);
    assert_int_equal(mt.n, 8);
    assert_int_equal(mt.n_adapters, 1);
    // Errors: a row out of range, a missing label, a class count mismatch.
    int64_t bad = N_ROWS;
    assert_int_equal(levi_ft_evaluate(m, &d, &bad, 1, &mt, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "outside"));
    d.n_classes = 2;
    assert_int_equal(levi_ft_evaluate(m, &d, test_rows, 8, &mt, &err), LEVI_ERR_SHAPE);
    levi_ft_free(m);
    levi_ft_params badp = fp;
    badp.max_len = 100; // beyond max_position_embeddings 32
    levi_ft_model *x = NULL;
    assert_int_equal(levi_ft_init(&x, model_dir, &badp, 0, &err), LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "max_position_embeddings"));
    badp = fp;
    badp.lora.rank = 0;
    badp.mode = LEVI_FT_LORA;
    assert_int_equal(levi_ft_init(&x, model_dir, &badp, 0, &err), LEVI_ERR_ARG);
    assert_null(x);
}

/* Micro-batches add up to the batch's gradient: the same training up to float rounding. */
static void test_micro_batch(void **state) {
    (void)state;
    levi_ft_params fp = small_params(LEVI_FT_FULL);
    fp.max_epochs = 1;
    fp.hidden_dropout = fp.attn_dropout = 0.0f; // chunks draw dropout masks in another order
    levi_ft_model *a = make(&fp, 0);
    levi_train_result ra, rb;
    train(a, &ra);
    fp.micro_batch = 3;
    levi_ft_model *b = make(&fp, 0);
    train(b, &rb);
    // Adam normalises each update, so weights whose gradient is ~0 may move by ~lr either way
    // on rounding noise: compare what the run computes instead.
    const double dl = fabs(ra.loss_history[0] - rb.loss_history[0]) / ra.loss_history[0];
    const double dv = fabs(ra.best_val_metric - rb.best_val_metric);
    printf("batch 8 vs micro-batches of 3, one epoch: training loss %.6f vs %.6f (rel %.1e), "
           "ID val RMSE %.6f vs %.6f\n",
           ra.loss_history[0], rb.loss_history[0], dl, ra.best_val_metric, rb.best_val_metric);
    assert_true(dl < 1e-5);
    assert_true(dv < 1e-4);
    levi_ft_free(a);
    levi_ft_free(b);
}

static void test_classification(void **state) {
    (void)state;
    levi_ft_params fp = small_params(LEVI_FT_FULL);
    fp.max_epochs = 6;
    fp.head_hidden = 8;
    levi_ft_model *m = make(&fp, 2);
    levi_ft_data d = {N_ROWS, (const char *const *)texts, 2, NULL, classes};
    levi_train_result res;
    levi_error err = {0};
    assert_int_equal(levi_ft_train(m, &d, train_rows, 32, val_rows, 8, &res, &err), LEVI_OK);
    levi_metrics mt;
    assert_int_equal(levi_ft_evaluate(m, &d, train_rows, 32, &mt, &err), LEVI_OK);
    printf("classification: loss %.4f -> %.4f, train accuracy %.3f, ID val accuracy %.3f\n",
           res.loss_history[0], res.loss_history[res.n_history - 1], mt.metric,
           res.best_val_metric);
    assert_true(res.loss_history[res.n_history - 1] < res.loss_history[0]);
    float probs[2 * 8];
    assert_int_equal(levi_ft_predict(m, &d, test_rows, 8, probs, &err), LEVI_OK);
    for (int i = 0; i < 8; i++) assert_true(fabs(probs[2 * i] + probs[2 * i + 1] - 1.0) < 1e-5);
    levi_ft_free(m);
}

int main(void) {
    levi_set_num_threads(2);
    write_fixture();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_trainable_counts),
        cmocka_unit_test(test_gradcheck),
        cmocka_unit_test(test_loss_goes_down),
        cmocka_unit_test(test_ht_freezes_lower_half),
        cmocka_unit_test(test_lp_ft_starts_from_probe),
        cmocka_unit_test(test_resume_bit_identical),
        cmocka_unit_test(test_saved_backbone),
        cmocka_unit_test(test_evaluate_matches_predict),
        cmocka_unit_test(test_micro_batch),
        cmocka_unit_test(test_classification),
    };
    int failed = cmocka_run_group_tests_name("finetune", tests, NULL, NULL);
    remove_dir(model_dir);
    for (int i = 0; i < N_ROWS; i++) free(texts[i]);
    return failed ? 1 : 0;
}
