/* `levi synthetic appb|e8`: the paper's synthetic spurious-feature illustrations.
 *
 *  appb  App. B's five-feature linear example: the three weight vectors and Table 6
 *        (predictions and L1 losses), computed exactly (levi_appb_solve).
 *  e8    App. E.8: a 3-layer network pre-trained where s1 and x predict y, then on data where
 *        s2 and x do: fine-tuned (FT), the same architecture from scratch (FS), and LEVI (the
 *        pre-trained network frozen, adapters on its two hidden layers plus a small model
 *        from scratch); test accuracy where only x predicts y, mean +- std over seeds.
 *        Two reference rows come with them: PT (the pre-trained network as it is) and the
 *        average of PT's and FS's probabilities (no joint training).
 *
 * Selection: each method's learning rate comes from the paper's grid {1e-4, 1e-3, 1e-2, 1e-1}
 * (D.3) and its epoch from early stopping, both on a held-out 20% of the fine-tuning set
 * (the pre-trained network's on 20% of the pre-training set); the test set is evaluated only
 * after the choice. Every seed draws its own three data sets and initialisations.
 *
 * Not for: library work (synthetic.h generates, mlpnet.h and levi.h train); this file
 * composes them, prints and writes results.json + results.md.
 */
#include "cli.h"

#include "levi/levi.h"
#include "levi/mlpnet.h"
#include "levi/synthetic.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static void print_help(FILE *f) {
    fprintf(f,
            "usage: levi synthetic appb\n"
            "       levi synthetic e8 [--seeds N] [--first-seed S] [--out DIR] [options]\n"
            "\n"
            "The paper's synthetic spurious-feature examples (Roh et al., ICML 2024).\n"
            "\n"
            "  appb   App. B: pre-trained weights [1,1,1,0,0] (given), fine-tuned and\n"
            "         trained-from-scratch weights computed exactly as gradient descent on the\n"
            "         squared loss converges from [1,1,1,0,0] and from 0 on the three\n"
            "         fine-tuning points, then Table 6's predictions and L1 losses (fractions).\n"
            "  e8     App. E.8: features (s1, s2, x), binary y, 2,000 points per set.\n"
            "         Pre-training: s1 and x predict y (s2 = 0); fine-tuning: s2 and x predict\n"
            "         y (s1 = 0); test: only x does. A 3-layer network (3-64-64-2, ReLU) is\n"
            "         pre-trained, then FT (fine-tune it), FS (from scratch) and LEVI (it\n"
            "         frozen, adapters on its 2 hidden layers, small 64-64 model from scratch)\n"
            "         are trained on the fine-tuning set; learning rate and epoch chosen on a\n"
            "         20%% validation split of the fine-tuning set, never on test.\n"
            "         References: PT (the pre-trained network unchanged) and the average of\n"
            "         PT's and FS's predicted probabilities. Prints a Markdown table with the\n"
            "         paper's numbers (FT 68.9, FS 69.5, LEVI 75.5) beside.\n"
            "\n"
            "Options of e8:\n"
            "  --seeds N        seeds (default 5); seed s draws its own data and inits\n"
            "  --first-seed S   first seed (default 1)\n"
            "  --out DIR        write DIR/results.json and DIR/results.md (default: print only)\n"
            "  --n N            points per set, 10..100000 (default 2000, the paper's)\n"
            "  --max-epochs E   epoch cap for every training run (default 100; early stopping\n"
            "                   with patience 10 on validation accuracy)\n"
            "  --lrs LIST       comma list of learning rates (default 1e-4,1e-3,1e-2,1e-1)\n"
            "  --threads N      threads (default 1: the networks are tiny)\n"
            "  --absent MODE    how a training set holds the other set's spurious feature:\n"
            "                   'zero' (default: absent, as in the paper's Lemma 2 / App. B)\n"
            "                   or 'noise' (present but independent of y, as at test)\n"
            "  -h, --help       this text\n"
            "\n"
            "Exit codes: %d ok, %d run failed, %d usage error.\n",
            LEVI_EXIT_OK, LEVI_EXIT_FAILURE, LEVI_EXIT_USAGE);
}

static int usage_error(const char *fmt, const char *a) {
    fprintf(stderr, "levi synthetic: ");
    fprintf(stderr, fmt, a);
    fprintf(stderr, " (see levi synthetic --help)\n");
    return LEVI_EXIT_USAGE;
}

static int parse_long(const char *s, long lo, long hi, long *out) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || end == s || *end || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

/* ---- appb ------------------------------------------------------------------------------ */

static void print_vec(const char *name, const levi_frac *w) {
    char b[32];
    printf("  %-22s [", name);
    for (int k = 0; k < LEVI_APPB_DIM; k++) {
        levi_frac_format(w[k], b, sizeof b);
        printf("%s%s", k ? ", " : "", b);
    }
    printf("]\n");
}

static int cmd_appb(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            print_help(stdout);
            return LEVI_EXIT_OK;
        }
        return usage_error("appb takes no options, found '%s'", argv[i]);
    }
    levi_appb_data d;
    levi_appb_data_paper(&d);
    levi_appb_result r;
    levi_error err = {0};
    levi_status st = levi_appb_solve(&d, &r, &err);
    if (st != LEVI_OK) {
        fprintf(stderr, "levi synthetic appb: %s\n", err.msg);
        return LEVI_EXIT_FAILURE;
    }
    char b[32];
    printf("App. B: linear model y = w x^T, features [x1..x5], x1 and x5 spurious\n\n");
    printf("Weights:\n");
    print_vec("w_true", d.w_true);
    for (int m = 0; m < LEVI_APPB_N_MODELS; m++) {
        char name[40];
        snprintf(name, sizeof name, "w_%s", levi_appb_model_name((levi_appb_model)m));
        print_vec(name, r.w[m]);
    }
    levi_frac_format(r.train_residual_max, b, sizeof b);
    printf("  (max |X w - y| on the fine-tuning points for fine-tuned and scratch: %s)\n\n", b);
    printf("Table 6:\n");
    printf("| x_test | y_test | model | y_hat | L1 loss |\n|---|---|---|---|---|\n");
    for (int t = 0; t < LEVI_APPB_N_TEST; t++)
        for (int m = 0; m < LEVI_APPB_N_MODELS; m++) {
            char xs[128] = "", ys[32], ps[32], ls[32];
            if (m == 0) {
                size_t off = 0;
                off += (size_t)snprintf(xs + off, sizeof xs - off, "[");
                for (int k = 0; k < LEVI_APPB_DIM; k++) {
                    levi_frac_format(d.x_test[t][k], b, sizeof b);
                    off += (size_t)snprintf(xs + off, sizeof xs - off, "%s%s", k ? ", " : "", b);
                }
                snprintf(xs + off, sizeof xs - off, "]");
                levi_frac_format(d.y_test[t], ys, sizeof ys);
            } else {
                ys[0] = 0;
            }
            levi_frac_format(r.pred[t][m], ps, sizeof ps);
            levi_frac_format(r.l1[t][m], ls, sizeof ls);
            printf("| %s | %s | w_%s | %s | %s |\n", xs, ys,
                   levi_appb_model_name((levi_appb_model)m), ps, ls);
        }
    printf("\nw_true predicts every test point exactly:");
    int exact = 1;
    for (int t = 0; t < LEVI_APPB_N_TEST; t++) exact &= levi_frac_eq(r.pred_true[t], d.y_test[t]);
    printf(" %s\n", exact ? "yes" : "NO");
    return LEVI_EXIT_OK;
}

/* ---- e8 -------------------------------------------------------------------------------- */

/* PT and PT+FS are references, not methods of the paper's E.8: the pre-trained network as
 * it is, and the plain average of PT's and FS's predicted probabilities (separately trained
 * members, no adapters), which shows what averaging two models with independent spurious
 * features gives when nothing is trained jointly. */
enum { M_PT = 0, M_FT, M_FS, M_LEVI, M_AVG, N_METHODS };
static const char *const method_label[N_METHODS] = {"PT (pre-trained, not adapted)",
                                                    "FT (fine-tuned)", "FS (from scratch)", "LEVI",
                                                    "PT+FS probability average (reference)"};
static const char *const method_key[N_METHODS] = {"pt", "ft", "fs", "levi", "pt_fs_avg"};
/* Paper E.8's test accuracies (FT, FS, LEVI); the paper gives none for the references. */
static const double paper_acc[N_METHODS] = {NAN, 68.9, 69.5, 75.5, NAN};

#define E8_MAX_LR 16
#define E8_MAX_SEEDS 1000

typedef struct {
    int n_seeds;
    uint64_t first_seed;
    const char *out_dir;
    int64_t n;
    int max_epochs;
    int n_lr;
    float lr[E8_MAX_LR];
    int threads;
    int absent_as_noise;
} e8_options;

typedef struct {
    float lr;
    double val_acc, test_acc;
    int best_epoch;
    double adapter_test_acc[LEVI_MAX_ADAPTERS]; /* LEVI only */
    int n_adapters;
} e8_run;

/* Seed s's random streams: one per purpose, so adding a method never shifts another's. */
typedef struct {
    levi_rng data[LEVI_E8_N_SPLITS];
    uint64_t init_pt, init_fs, shuffle_pt, shuffle_ft, shuffle_fs, levi;
} e8_streams;

static e8_streams make_streams(uint64_t seed) {
    levi_rng root;
    levi_rng_seed(&root, 0xE8E8E8E8ull ^ (seed * 0x9E3779B97F4A7C15ull));
    e8_streams s;
    for (int k = 0; k < LEVI_E8_N_SPLITS; k++) s.data[k] = levi_rng_split(&root);
    s.init_pt = levi_rng_u64(&root);
    s.init_fs = levi_rng_u64(&root);
    s.shuffle_pt = levi_rng_u64(&root);
    s.shuffle_ft = levi_rng_u64(&root);
    s.shuffle_fs = levi_rng_u64(&root);
    s.levi = levi_rng_u64(&root);
    return s;
}

/* Trains one network per learning rate (from `start` when given, else fresh from init_seed)
 * and keeps the one with the best validation accuracy (ties: the smaller lr, listed first
 * after sorting). *best_out is the caller's. */
static levi_status select_mlp(const e8_options *o, const levi_mlpnet *start, uint64_t init_seed,
                              uint64_t shuffle_seed, const levi_mlp_data *d, const int64_t *tr,
                              int64_t ntr, const int64_t *va, int64_t nva, levi_mlpnet **best_out,
                              e8_run *run, levi_error *err) {
    levi_mlpnet_params np = levi_mlpnet_default_params();
    levi_mlpnet *best = NULL;
    levi_status st = LEVI_OK;
    for (int i = 0; i < o->n_lr && st == LEVI_OK; i++) {
        levi_mlpnet *net = NULL;
        st = start ? levi_mlpnet_clone(&net, start, err)
                   : levi_mlpnet_init(&net, &np, init_seed, err);
        if (st != LEVI_OK) break;
        levi_mlpnet_train_params tp = levi_mlpnet_train_default_params();
        tp.lr = o->lr[i];
        tp.max_epochs = o->max_epochs;
        tp.seed = shuffle_seed;
        levi_mlpnet_train_result res;
        levi_error e2 = {0};
        levi_status ts = levi_mlpnet_train(net, d, tr, ntr, va, nva, &tp, &res, &e2);
        if (ts == LEVI_ERR_NUMERIC) { /* a diverged lr is the worst candidate, not an error */
            levi_mlpnet_free(net);
            continue;
        }
        if (ts != LEVI_OK) {
            *err = e2;
            st = ts;
            levi_mlpnet_free(net);
            break;
        }
        if (!best || res.best_val_metric > run->val_acc) {
            levi_mlpnet_free(best);
            best = net;
            run->lr = o->lr[i];
            run->val_acc = res.best_val_metric;
            run->best_epoch = res.best_epoch;
        } else {
            levi_mlpnet_free(net);
        }
    }
    if (st == LEVI_OK && !best)
        st = levi_errorf(err, LEVI_ERR_NUMERIC, "every learning rate diverged");
    if (st != LEVI_OK) {
        levi_mlpnet_free(best);
        return st;
    }
    *best_out = best;
    return LEVI_OK;
}

/* Accuracy of the mean of two networks' softmax probabilities over rows (NULL: 0..n-1). */
static levi_status average_accuracy(levi_mlpnet *a, levi_mlpnet *b, const levi_mlp_data *d,
                                    const int64_t *rows, int64_t n, double *acc, levi_error *err) {
    int C = levi_mlpnet_config(a)->n_out;
    float *la = levi_xmalloc((size_t)n * C * sizeof(float));
    float *lb = levi_xmalloc((size_t)n * C * sizeof(float));
    levi_status st = levi_mlpnet_forward(a, d, rows, n, la, err);
    if (st == LEVI_OK) st = levi_mlpnet_forward(b, d, rows, n, lb, err);
    int64_t hits = 0;
    for (int64_t i = 0; st == LEVI_OK && i < n; i++) {
        float *p[2] = {la + i * C, lb + i * C};
        for (int k = 0; k < 2; k++) { /* softmax in place */
            float mx = p[k][0], sum = 0;
            for (int c = 1; c < C; c++) mx = p[k][c] > mx ? p[k][c] : mx;
            for (int c = 0; c < C; c++) sum += p[k][c] = expf(p[k][c] - mx);
            for (int c = 0; c < C; c++) p[k][c] /= sum;
        }
        int arg = 0;
        for (int c = 1; c < C; c++)
            if (p[0][c] + p[1][c] > p[0][arg] + p[1][arg]) arg = c;
        hits += arg == d->yc[rows ? rows[i] : i];
    }
    if (st == LEVI_OK) *acc = (double)hits / (double)n;
    levi_free(la);
    levi_free(lb);
    return st;
}

static levi_status run_seed(const e8_options *o, uint64_t seed, e8_run runs[N_METHODS],
                            levi_error *err) {
    const int F = LEVI_E8_N_FEATURES;
    int64_t n = o->n;
    e8_streams s = make_streams(seed);
    levi_e8_params gp = levi_e8_default_params();
    gp.n = n;
    gp.absent_as_noise = o->absent_as_noise;
    float *X[LEVI_E8_N_SPLITS];
    int32_t *Y[LEVI_E8_N_SPLITS];
    levi_status st = LEVI_OK;
    for (int k = 0; k < LEVI_E8_N_SPLITS; k++) {
        X[k] = levi_xmalloc((size_t)n * F * sizeof(float));
        Y[k] = levi_xmalloc((size_t)n * sizeof(int32_t));
        if (st == LEVI_OK)
            st = levi_e8_generate((levi_e8_split)k, &gp, &s.data[k], X[k], Y[k], err);
    }
    /* 80/20 train/validation split of each training set (rows are i.i.d., so the first 80%
       is a random split); test rows all evaluated. */
    int64_t ntr = n - n / 5, nva = n / 5;
    int64_t *idx = levi_xmalloc((size_t)n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) idx[i] = i;
    const int64_t *tr = idx, *va = idx + ntr;
    levi_mlpnet *pt = NULL, *ft = NULL, *fs = NULL;
    levi_model *lm = NULL, *lbest = NULL;
    float *feats = NULL, *num = NULL;
    int32_t *yc = NULL;
    memset(runs, 0, sizeof(e8_run) * N_METHODS);
    levi_mlp_data dpre = {n, F, X[LEVI_E8_PRETRAIN], Y[LEVI_E8_PRETRAIN], NULL};
    levi_mlp_data dft = {n, F, X[LEVI_E8_FINETUNE], Y[LEVI_E8_FINETUNE], NULL};
    levi_mlp_data dte = {n, F, X[LEVI_E8_TEST], Y[LEVI_E8_TEST], NULL};
    if (st != LEVI_OK) goto done;

    /* Pre-training, selected on the pre-training distribution's own validation split. */
    if ((st = select_mlp(o, NULL, s.init_pt, s.shuffle_pt, &dpre, tr, ntr, va, nva, &pt,
                         &runs[M_PT], err)) != LEVI_OK)
        goto done;
    /* PT's validation number is on the fine-tuning distribution, like the others'. */
    if ((st = levi_mlpnet_evaluate(pt, &dft, va, nva, &runs[M_PT].val_acc, NULL, err)) != LEVI_OK ||
        (st = levi_mlpnet_evaluate(pt, &dte, NULL, n, &runs[M_PT].test_acc, NULL, err)) != LEVI_OK)
        goto done;
    if ((st = select_mlp(o, pt, 0, s.shuffle_ft, &dft, tr, ntr, va, nva, &ft, &runs[M_FT], err)) !=
            LEVI_OK ||
        (st = levi_mlpnet_evaluate(ft, &dte, NULL, n, &runs[M_FT].test_acc, NULL, err)) != LEVI_OK)
        goto done;
    if ((st = select_mlp(o, NULL, s.init_fs, s.shuffle_fs, &dft, tr, ntr, va, nva, &fs, &runs[M_FS],
                         err)) != LEVI_OK ||
        (st = levi_mlpnet_evaluate(fs, &dte, NULL, n, &runs[M_FS].test_acc, NULL, err)) != LEVI_OK)
        goto done;

    if ((st = average_accuracy(pt, fs, &dft, va, nva, &runs[M_AVG].val_acc, err)) != LEVI_OK ||
        (st = average_accuracy(pt, fs, &dte, NULL, n, &runs[M_AVG].test_acc, err)) != LEVI_OK)
        goto done;

    /* LEVI: rows 0..n-1 are the fine-tuning set, n..2n-1 the test set. The frozen
       pre-trained network's hidden layers are the cached features; the small model reads
       the raw (s1, s2, x) as numeric columns. */
    {
        const levi_mlpnet_params *np = levi_mlpnet_config(pt);
        int L = np->n_hidden, H = np->hidden[0];
        feats = levi_xmalloc((size_t)2 * n * L * H * sizeof(float));
        num = levi_xmalloc((size_t)2 * n * F * sizeof(float));
        yc = levi_xmalloc((size_t)2 * n * sizeof(int32_t));
        const levi_mlp_data *src[2] = {&dft, &dte};
        for (int part = 0; part < 2; part++) {
            for (int l = 0; l < L && st == LEVI_OK; l++)
                st = levi_mlpnet_hidden(pt, src[part], NULL, n, l,
                                        feats + (size_t)part * n * L * H + (size_t)l * H,
                                        (int64_t)L * H, err);
            memcpy(num + (size_t)part * n * F, src[part]->X, (size_t)n * F * sizeof(float));
            memcpy(yc + (size_t)part * n, src[part]->yc, (size_t)n * sizeof(int32_t));
        }
        if (st != LEVI_OK) goto done;
        levi_task_data td;
        memset(&td, 0, sizeof td);
        td.n = 2 * n;
        td.n_num = F;
        td.num = num;
        td.n_layers = L;
        td.feat_dim = H;
        td.feats = feats;
        td.n_classes = 2;
        td.yc = yc;
        levi_head_params hp = levi_head_default_params(LEVI_METHOD_LEVI);
        hp.n_small_hidden = 2; /* the FS network's hidden layers; the adapters are its head */
        hp.small_hidden[0] = 64;
        hp.small_hidden[1] = 64;
        hp.adapter_hidden = 64;
        int64_t *test_rows = levi_xmalloc((size_t)n * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) test_rows[i] = n + i;
        for (int i = 0; i < o->n_lr && st == LEVI_OK; i++) {
            if ((st = levi_model_init(&lm, &hp, &td, err)) != LEVI_OK) break;
            levi_train_params tp = levi_train_default_params();
            tp.lr = o->lr[i];
            tp.batch_size = 100;
            tp.max_epochs = o->max_epochs;
            tp.patience = 10;
            tp.seed = s.levi;
            levi_train_result *res = levi_xcalloc(1, sizeof *res);
            levi_error e2 = {0};
            levi_status ts = levi_train(lm, &td, tr, ntr, va, nva, &tp, res, &e2);
            if (ts == LEVI_OK && (!lbest || res->best_val_metric > runs[M_LEVI].val_acc)) {
                levi_model_free(lbest);
                lbest = lm;
                lm = NULL;
                runs[M_LEVI].lr = o->lr[i];
                runs[M_LEVI].val_acc = res->best_val_metric;
                runs[M_LEVI].best_epoch = res->best_epoch;
            } else if (ts != LEVI_OK && ts != LEVI_ERR_NUMERIC) {
                *err = e2;
                st = ts;
            }
            levi_free(res);
            levi_model_free(lm);
            lm = NULL;
        }
        if (st == LEVI_OK && !lbest)
            st = levi_errorf(err, LEVI_ERR_NUMERIC, "LEVI: every learning rate diverged");
        if (st == LEVI_OK) {
            levi_metrics mt;
            st = levi_evaluate(lbest, &td, test_rows, n, &mt, err);
            if (st == LEVI_OK) {
                runs[M_LEVI].test_acc = mt.metric;
                runs[M_LEVI].n_adapters = mt.n_adapters;
                for (int j = 0; j < mt.n_adapters; j++)
                    runs[M_LEVI].adapter_test_acc[j] = mt.adapter_metric[j];
            }
        }
        levi_free(test_rows);
    }
done:
    for (int k = 0; k < LEVI_E8_N_SPLITS; k++) {
        levi_free(X[k]);
        levi_free(Y[k]);
    }
    levi_free(idx);
    levi_free(feats);
    levi_free(num);
    levi_free(yc);
    levi_mlpnet_free(pt);
    levi_mlpnet_free(ft);
    levi_mlpnet_free(fs);
    levi_model_free(lm);
    levi_model_free(lbest);
    return st;
}

static void mean_std(const double *v, int n, double *mean, double *std) {
    double m = 0, q = 0;
    for (int i = 0; i < n; i++) m += v[i];
    m /= n;
    for (int i = 0; i < n; i++) q += (v[i] - m) * (v[i] - m);
    *mean = m;
    *std = n > 1 ? sqrt(q / (n - 1)) : 0.0;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static int parse_lrs(const char *s, e8_options *o) {
    char buf[512];
    if (strlen(s) >= sizeof buf) return 0;
    strcpy(buf, s);
    o->n_lr = 0;
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        char *end = NULL;
        errno = 0;
        float v = strtof(tok, &end);
        if (errno || end == tok || *end || !(v > 0) || !isfinite(v) || o->n_lr >= E8_MAX_LR)
            return 0;
        o->lr[o->n_lr++] = v;
    }
    if (o->n_lr == 0) return 0;
    qsort(o->lr, (size_t)o->n_lr, sizeof(float), cmp_float); /* ties go to the smaller lr */
    return 1;
}

static char *render_markdown(const e8_options *o, double mean[N_METHODS][2],
                             double std[N_METHODS][2], double seconds) {
    size_t cap = 8192, off = 0;
    char *md = malloc(cap);
    if (!md) return NULL;
#define MD(...) off += (size_t)snprintf(md + off, off < cap ? cap - off : 0, __VA_ARGS__)
    MD("# E.8: spurious features (synthetic), %d seeds (first %llu), %lld points per set, "
       "absent spurious feature = %s\n\n",
       o->n_seeds, (unsigned long long)o->first_seed, (long long)o->n,
       o->absent_as_noise ? "noise" : "zero");
    MD("Test accuracy (%%) where only x predicts y; ID val: the fine-tuning distribution's "
       "held-out 20%%, on which learning rate and epoch were chosen. Mean +- sample std over "
       "seeds.\n\n");
    MD("| method | test acc | paper (E.8) | ID val acc |\n|---|---|---|---|\n");
    for (int m = 0; m < N_METHODS; m++) {
        char paper[32];
        if (isnan(paper_acc[m]))
            snprintf(paper, sizeof paper, "-");
        else
            snprintf(paper, sizeof paper, "%.1f", paper_acc[m]);
        MD("| %s | %.1f +- %.1f | %s | %.1f +- %.1f |\n", method_label[m], 100 * mean[m][0],
           100 * std[m][0], paper, 100 * mean[m][1], 100 * std[m][1]);
    }
    MD("\nWall time: %.1f s.\n", seconds);
#undef MD
    if (off >= cap) md[cap - 1] = 0;
    return md;
}

/* A float learning rate as the decimal the user wrote (1e-4, not 9.99999974737875e-05). */
static double lr_json(float lr) {
    char b[32];
    snprintf(b, sizeof b, "%g", (double)lr);
    return strtod(b, NULL);
}

static int cmd_e8(int argc, char **argv) {
    e8_options o;
    memset(&o, 0, sizeof o);
    o.n_seeds = 5;
    o.first_seed = 1;
    o.n = 2000;
    o.max_epochs = 100;
    o.threads = 1;
    parse_lrs("1e-4,1e-3,1e-2,1e-1", &o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        long v;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            print_help(stdout);
            return LEVI_EXIT_OK;
        }
        int takes_value = !strcmp(a, "--seeds") || !strcmp(a, "--first-seed") ||
                          !strcmp(a, "--out") || !strcmp(a, "--n") || !strcmp(a, "--max-epochs") ||
                          !strcmp(a, "--lrs") || !strcmp(a, "--threads") || !strcmp(a, "--absent");
        if (!takes_value) return usage_error("e8: unknown option '%s'", a);
        if (i + 1 >= argc) return usage_error("e8: option %s needs a value", a);
        const char *val = argv[++i];
        if (!strcmp(a, "--seeds")) {
            if (!parse_long(val, 1, E8_MAX_SEEDS, &v))
                return usage_error("e8: --seeds '%s': expected an integer in 1..1000", val);
            o.n_seeds = (int)v;
        } else if (!strcmp(a, "--first-seed")) {
            if (!parse_long(val, 0, 1000000000L, &v))
                return usage_error("e8: --first-seed '%s': expected an integer in 0..1e9", val);
            o.first_seed = (uint64_t)v;
        } else if (!strcmp(a, "--out")) {
            if (!*val) return usage_error("e8: --out needs a directory%s", "");
            o.out_dir = val;
        } else if (!strcmp(a, "--n")) {
            if (!parse_long(val, 10, 100000L, &v))
                return usage_error("e8: --n '%s': expected an integer in 10..100000", val);
            o.n = v;
        } else if (!strcmp(a, "--max-epochs")) {
            if (!parse_long(val, 1, LEVI_MAX_EPOCHS, &v))
                return usage_error("e8: --max-epochs '%s': expected an integer in 1..1000", val);
            o.max_epochs = (int)v;
        } else if (!strcmp(a, "--lrs")) {
            if (!parse_lrs(val, &o))
                return usage_error("e8: --lrs '%s': expected a comma list of up to 16 positive "
                                   "numbers, e.g. 1e-3,1e-2",
                                   val);
        } else if (!strcmp(a, "--absent")) {
            if (strcmp(val, "zero") && strcmp(val, "noise"))
                return usage_error("e8: --absent '%s': expected zero or noise", val);
            o.absent_as_noise = !strcmp(val, "noise");
        } else {
            if (!parse_long(val, 1, 256, &v))
                return usage_error("e8: --threads '%s': expected an integer in 1..256", val);
            o.threads = (int)v;
        }
    }
    levi_set_num_threads(o.threads);
    levi_error err = {0};
    if (o.out_dir && levi_mkdirs(o.out_dir, &err) != LEVI_OK) {
        fprintf(stderr, "levi synthetic e8: %s\n", err.msg);
        return LEVI_EXIT_FAILURE;
    }
    double t0 = levi_now();
    e8_run *runs = levi_xcalloc((size_t)o.n_seeds * N_METHODS, sizeof(e8_run));
    printf("E.8: %d seeds, %lld points per set, lr grid", o.n_seeds, (long long)o.n);
    for (int i = 0; i < o.n_lr; i++) printf(" %g", (double)o.lr[i]);
    printf("\n%-6s", "seed");
    for (int m = 0; m < N_METHODS; m++) printf(" | %-31s", method_key[m]);
    printf("\n");
    int rc = LEVI_EXIT_OK;
    for (int k = 0; k < o.n_seeds; k++) {
        if (levi_cli_interrupted) { /* Ctrl-C: a seed takes ~2 s, so checking here is enough */
            fprintf(stderr,
                    "levi synthetic e8: interrupted after %d of %d seeds; nothing "
                    "written\n",
                    k, o.n_seeds);
            rc = LEVI_EXIT_INTERRUPTED;
            break;
        }
        uint64_t seed = o.first_seed + (uint64_t)k;
        e8_run *r = runs + (size_t)k * N_METHODS;
        levi_status st = run_seed(&o, seed, r, &err);
        if (st != LEVI_OK) {
            fprintf(stderr, "levi synthetic e8: seed %llu: %s\n", (unsigned long long)seed,
                    err.msg);
            rc = levi_cli_exit_code(st) == LEVI_EXIT_USAGE ? LEVI_EXIT_FAILURE
                                                           : levi_cli_exit_code(st);
            break;
        }
        printf("%-6llu", (unsigned long long)seed);
        for (int m = 0; m < N_METHODS; m++)
            if (r[m].lr > 0)
                printf(" | test %5.1f val %5.1f lr %-6g", 100 * r[m].test_acc, 100 * r[m].val_acc,
                       (double)r[m].lr);
            else /* the average trains nothing */
                printf(" | test %5.1f val %5.1f %-9s", 100 * r[m].test_acc, 100 * r[m].val_acc, "");
        printf("\n");
        fflush(stdout);
    }
    double seconds = levi_now() - t0;
    if (rc != LEVI_EXIT_OK) {
        levi_free(runs);
        return rc;
    }
    double mean[N_METHODS][2], std[N_METHODS][2], *buf = levi_xmalloc(o.n_seeds * sizeof(double));
    for (int m = 0; m < N_METHODS; m++)
        for (int w = 0; w < 2; w++) {
            for (int k = 0; k < o.n_seeds; k++) {
                const e8_run *r = &runs[(size_t)k * N_METHODS + m];
                buf[k] = w == 0 ? r->test_acc : r->val_acc;
            }
            mean_std(buf, o.n_seeds, &mean[m][w], &std[m][w]);
        }
    levi_free(buf);
    char *md = render_markdown(&o, mean, std, seconds);
    printf("\n%s", md ? md : "");

    if (o.out_dir) {
        cJSON *doc = cJSON_CreateObject();
        cJSON_AddStringToObject(doc, "experiment", "levi-icml2024 App. E.8");
        cJSON *cfg = cJSON_AddObjectToObject(doc, "config");
        levi_e8_params gp = levi_e8_default_params();
        cJSON_AddNumberToObject(cfg, "n_per_set", (double)o.n);
        cJSON_AddNumberToObject(cfg, "mu_x", gp.mu_x);
        cJSON_AddNumberToObject(cfg, "mu_s", gp.mu_s);
        cJSON_AddNumberToObject(cfg, "noise_std", gp.noise_std);
        cJSON_AddStringToObject(cfg, "absent", o.absent_as_noise ? "noise" : "zero");
        cJSON_AddNumberToObject(cfg, "first_seed", (double)o.first_seed);
        cJSON_AddNumberToObject(cfg, "n_seeds", o.n_seeds);
        cJSON_AddNumberToObject(cfg, "max_epochs", o.max_epochs);
        cJSON_AddNumberToObject(cfg, "patience", 10);
        cJSON_AddNumberToObject(cfg, "batch_size", 100);
        cJSON_AddStringToObject(cfg, "network", "3-64-64-2 ReLU, softmax cross-entropy, Adam");
        cJSON_AddStringToObject(cfg, "levi",
                                "frozen pre-trained net, adapters (hidden 64) on "
                                "its 2 hidden layers, small model 3-64-64");
        cJSON *lrs = cJSON_AddArrayToObject(cfg, "lr_grid");
        for (int i = 0; i < o.n_lr; i++)
            cJSON_AddItemToArray(lrs, cJSON_CreateNumber(lr_json(o.lr[i])));
        cJSON *methods = cJSON_AddObjectToObject(doc, "methods");
        for (int m = 0; m < N_METHODS; m++) {
            cJSON *jm = cJSON_AddObjectToObject(methods, method_key[m]);
            cJSON_AddStringToObject(jm, "label", method_label[m]);
            cJSON_AddNumberToObject(jm, "test_acc_mean", mean[m][0]);
            cJSON_AddNumberToObject(jm, "test_acc_std", std[m][0]);
            cJSON_AddNumberToObject(jm, "id_val_acc_mean", mean[m][1]);
            cJSON_AddNumberToObject(jm, "id_val_acc_std", std[m][1]);
            if (!isnan(paper_acc[m])) cJSON_AddNumberToObject(jm, "paper_test_acc", paper_acc[m]);
            cJSON *seeds = cJSON_AddArrayToObject(jm, "seeds");
            for (int k = 0; k < o.n_seeds; k++) {
                const e8_run *r = &runs[(size_t)k * N_METHODS + m];
                cJSON *js = cJSON_CreateObject();
                cJSON_AddNumberToObject(js, "seed", (double)(o.first_seed + (uint64_t)k));
                if (r->lr > 0) cJSON_AddNumberToObject(js, "lr", lr_json(r->lr));
                cJSON_AddNumberToObject(js, "best_epoch", r->best_epoch);
                cJSON_AddNumberToObject(js, "id_val_acc", r->val_acc);
                cJSON_AddNumberToObject(js, "test_acc", r->test_acc);
                if (r->n_adapters) {
                    cJSON *aa = cJSON_AddArrayToObject(js, "adapter_test_acc");
                    for (int j = 0; j < r->n_adapters; j++)
                        cJSON_AddItemToArray(aa, cJSON_CreateNumber(r->adapter_test_acc[j]));
                }
                cJSON_AddItemToArray(seeds, js);
            }
        }
        cJSON_AddNumberToObject(doc, "wall_seconds", seconds);
        char *json = cJSON_Print(doc);
        cJSON_Delete(doc);
        char path[4096];
        levi_status st = LEVI_OK;
        if (!json) {
            st = levi_errorf(&err, LEVI_ERR_NOMEM, "out of memory rendering results.json");
        } else {
            snprintf(path, sizeof path, "%s/results.json", o.out_dir);
            st = levi_write_file_atomic(path, json, strlen(json), &err);
        }
        if (st == LEVI_OK && md) {
            snprintf(path, sizeof path, "%s/results.md", o.out_dir);
            st = levi_write_file_atomic(path, md, strlen(md), &err);
        }
        free(json);
        if (st != LEVI_OK) {
            fprintf(stderr, "levi synthetic e8: %s\n", err.msg);
            rc = LEVI_EXIT_FAILURE;
        } else {
            printf("wrote %s/results.json and %s/results.md\n", o.out_dir, o.out_dir);
        }
    }
    free(md);
    levi_free(runs);
    return rc;
}

int levi_cmd_synthetic(int argc, char **argv) {
    if (argc < 2) {
        print_help(stderr);
        return LEVI_EXIT_USAGE;
    }
    const char *sub = argv[1];
    if (!strcmp(sub, "-h") || !strcmp(sub, "--help")) {
        print_help(stdout);
        return LEVI_EXIT_OK;
    }
    if (!strcmp(sub, "appb")) return cmd_appb(argc - 1, argv + 1);
    if (!strcmp(sub, "e8")) return cmd_e8(argc - 1, argv + 1);
    return usage_error("unknown experiment '%s' (expected appb or e8)", sub);
}
