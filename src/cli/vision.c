/* `levi vision`: the vision quality-shift task (paper App. D.2/D.3, TASKS.md section 3).
 * ID = Fashion-MNIST train (a seeded subset, split 90/10 into train and validation) and the
 * clean test set; OOD = the test set under each corruption (downsample, blur, jpeg, noise),
 * each its own group. Extracts (or reuses) the frozen EfficientNet-Lite0 stage features of
 * every set, then for each method chooses the learning rate on ID validation with the first
 * seed, trains the other seeds, evaluates every set, and writes results.json, results.csv and
 * report.md. A finished method's results are kept in <out>/methods/<name>.json under a key
 * of everything that defines the run, and reused when the command is run again.
 * Not for: the methods themselves (src/methods/vision.c), image corruption (src/data). */
#include "cli.h"

#include "levi/images.h"
#include "levi/vision.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VISION_GROUPS 4 /* corruptions */
#define VISION_SETS (2 + VISION_GROUPS)

static void vision_usage(FILE *f) {
    fprintf(f,
            "usage: levi vision [options]\n"
            "\n"
            "LEVI and baselines on Fashion-MNIST with quality-shift OOD groups: the test set\n"
            "downsampled-then-upsampled, blurred, JPEG-compressed and noisy. A frozen\n"
            "EfficientNet-Lite0 gives per-stage features (cached, reused by later runs); each\n"
            "method's learning rate is chosen on ID validation with the first seed, the other\n"
            "seeds are trained at it, and every seed is evaluated on ID test and each OOD\n"
            "group. Writes results.json, results.csv and report.md. Finished methods are\n"
            "kept under <out>/methods/ and reused when the command is run again.\n"
            "\n"
            "Options:\n"
            "  --data DIR         Fashion-MNIST idx files (default $LEVI_FASHION_MNIST_DIR,\n"
            "                     else /usr/share/datasets/fashion-mnist)\n"
            "  --model PTH        EfficientNet-Lite0 checkpoint efficientnet-lite0-57934424.pth\n"
            "                     (default $LEVI_EFFNET_PTH, else $LEVI_CACHE/models/\n"
            "                     efficientnet-lite0/efficientnet-lite0-57934424.pth)\n"
            "  --resolution R     backbone input size R x R (default 32; >= 32)\n"
            "  --train-rows N     Fashion-MNIST train images used, split 90/10 into train and\n"
            "                     ID validation (default 6000; 60000 = all)\n"
            "  --test-rows N      test images per set (default 10000 = all)\n"
            "  --methods LIST     comma-separated: levi,lp,small,a3 or all (default all)\n"
            "  --seeds N          seeds per method, 0..N-1 (default 3)\n"
            "  --lrs LIST         learning-rate grid (default 1e-4,1e-3,1e-2,1e-1; linear\n"
            "                     probing 1e-3,1e-2,1e-1,1,10)\n"
            "  --epochs N         at most N epochs per run (default 20)\n"
            "  --patience N       stop after N epochs without a better ID-val accuracy\n"
            "                     (default 4)\n"
            "  --batch N          batch size (default 512, paper D.3)\n"
            "  --out DIR          output folder (default runs/vision)\n"
            "  --cache DIR        feature cache (default $LEVI_CACHE/vision-features)\n"
            "  --threads N        threads for kernels and BLAS (default: all cores)\n"
            "  -h, --help         this text\n"
            "\n"
            "Exit codes: 0 ok, 1 run failed, 2 usage, 3 bad input, 130 interrupted (rerun to\n"
            "resume: cached feature chunks and finished methods are kept).\n");
}

typedef struct vision_cfg {
    const char *data, *model, *out, *cache;
    int resolution, train_rows, test_rows, seeds, epochs, patience, batch, threads;
    int n_methods;
    int methods[LEVI_VISION_METHOD_COUNT];
    int n_lrs;
    float lrs[LEVI_VISION_MAX_GRID];
} vision_cfg;

static int vusage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int vusage(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "levi vision: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(see `levi vision --help`)\n");
    va_end(ap);
    return LEVI_EXIT_USAGE;
}

static int parse_int(const char *opt, const char *s, long lo, long hi, int *out) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi)
        return vusage("%s: expected an integer in %ld..%ld, found '%s'", opt, lo, hi, s);
    *out = (int)v;
    return 0;
}

static int parse_methods(const char *s, vision_cfg *c) {
    c->n_methods = 0;
    if (strcmp(s, "all") == 0) {
        for (int i = 0; i < LEVI_VISION_METHOD_COUNT; i++) c->methods[c->n_methods++] = i;
        return 0;
    }
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        int m = levi_vision_method_parse(tok);
        if (m < 0)
            return vusage("--methods: unknown method '%s' (expected levi, lp, small, a3)", tok);
        for (int i = 0; i < c->n_methods; i++)
            if (c->methods[i] == m) return vusage("--methods: '%s' listed twice", tok);
        c->methods[c->n_methods++] = m;
    }
    if (c->n_methods == 0) return vusage("--methods: empty list");
    return 0;
}

static int parse_lrs(const char *s, vision_cfg *c) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    c->n_lrs = 0;
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        char *end = NULL;
        double v = strtod(tok, &end);
        if (*end || !(v > 0) || !isfinite(v))
            return vusage("--lrs: expected positive numbers, found '%s'", tok);
        if (c->n_lrs == LEVI_VISION_MAX_GRID)
            return vusage("--lrs: at most %d values", LEVI_VISION_MAX_GRID);
        c->lrs[c->n_lrs++] = (float)v;
    }
    if (c->n_lrs == 0) return vusage("--lrs: empty list");
    return 0;
}

static int parse_args(int argc, char **argv, vision_cfg *c, int *help) {
    memset(c, 0, sizeof *c);
    c->resolution = 32, c->train_rows = 6000, c->test_rows = 10000, c->seeds = 3;
    c->epochs = 20, c->patience = 4, c->batch = 512, c->threads = 0;
    c->out = "runs/vision";
    for (int i = 0; i < LEVI_VISION_METHOD_COUNT; i++) c->methods[c->n_methods++] = i;
    *help = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            *help = 1;
            return 0;
        }
        if (strncmp(a, "--", 2) != 0) return vusage("unexpected argument '%s'", a);
        if (i + 1 >= argc) return vusage("%s needs a value", a);
        const char *v = argv[++i];
        int rc = 0;
        if (strcmp(a, "--data") == 0)
            c->data = v;
        else if (strcmp(a, "--model") == 0)
            c->model = v;
        else if (strcmp(a, "--out") == 0)
            c->out = v;
        else if (strcmp(a, "--cache") == 0)
            c->cache = v;
        else if (strcmp(a, "--resolution") == 0)
            rc = parse_int(a, v, 32, 1024, &c->resolution);
        else if (strcmp(a, "--train-rows") == 0)
            rc = parse_int(a, v, 20, 60000, &c->train_rows);
        else if (strcmp(a, "--test-rows") == 0)
            rc = parse_int(a, v, 1, 10000, &c->test_rows);
        else if (strcmp(a, "--seeds") == 0)
            rc = parse_int(a, v, 1, LEVI_VISION_MAX_SEEDS, &c->seeds);
        else if (strcmp(a, "--epochs") == 0)
            rc = parse_int(a, v, 1, LEVI_VISION_MAX_EPOCHS, &c->epochs);
        else if (strcmp(a, "--patience") == 0)
            rc = parse_int(a, v, 0, LEVI_VISION_MAX_EPOCHS, &c->patience);
        else if (strcmp(a, "--batch") == 0)
            rc = parse_int(a, v, 2, 65536, &c->batch);
        else if (strcmp(a, "--threads") == 0)
            rc = parse_int(a, v, 1, 1024, &c->threads);
        else if (strcmp(a, "--methods") == 0)
            rc = parse_methods(v, c);
        else if (strcmp(a, "--lrs") == 0)
            rc = parse_lrs(v, c);
        else
            return vusage("unknown option '%s'", a);
        if (rc) return rc;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Progress. */
typedef struct feat_progress {
    const char *name;
    levi_progress *bar;
    int64_t first;
} feat_progress;

static void on_feat_progress(void *user, int64_t done, int64_t total, double rate) {
    feat_progress *fp = user;
    if (!fp->bar) {
        char label[96];
        snprintf(label, sizeof label, "features %s", fp->name);
        fp->first = done;
        fp->bar = levi_progress_start(label, total - done, "img");
    }
    (void)rate; /* the bar shows its own rate */
    levi_progress_update(fp->bar, done - fp->first, NULL);
}

typedef struct train_progress {
    const char *method;
    levi_progress *bar;
    float lr;
    uint64_t seed;
    double last_val;
} train_progress;

static void on_train_progress(void *user, const levi_vision_progress *p) {
    train_progress *tp = user;
    if (!tp->bar || p->lr != tp->lr || p->seed != tp->seed) {
        levi_progress_finish(tp->bar);
        char label[96];
        snprintf(label, sizeof label, "%s lr %g seed %llu", tp->method, (double)p->lr,
                 (unsigned long long)p->seed);
        tp->bar = levi_progress_start(label, (int64_t)p->max_epochs * p->steps_per_epoch, "steps");
        tp->lr = p->lr, tp->seed = p->seed, tp->last_val = NAN;
    }
    if (p->epoch_done) tp->last_val = p->val_acc;
    char extra[96];
    snprintf(extra, sizeof extra, "epoch %d loss %.4f val %.4f", p->epoch, p->loss, tp->last_val);
    levi_progress_update(tp->bar, (int64_t)(p->epoch - 1) * p->steps_per_epoch + p->step, extra);
}

/* ---------------------------------------------------------------------------------------
 * Data. */
static const char *const set_names[VISION_SETS] = {"id_val",   "id_test",  "ood/downsample",
                                                   "ood/blur", "ood/jpeg", "ood/noise"};
static const levi_corruption_kind group_kind[VISION_GROUPS] = {
    LEVI_CORRUPT_DOWNSAMPLE, LEVI_CORRUPT_BLUR, LEVI_CORRUPT_JPEG, LEVI_CORRUPT_NOISE};

typedef struct vision_set {
    levi_vision_image_set images;
    levi_vision_feats feats;
    float *pixels; /* [n, 28, 28], corrupted as the set says */
    int32_t *labels;
    levi_vision_data data;
} vision_set;

static levi_status set_prepare(vision_set *s, const levi_images *im, const int64_t *idx, int64_t n,
                               levi_corruption c, levi_error *err) {
    s->images.images = im, s->images.idx = idx, s->images.n = n, s->images.corruption = c;
    const size_t px = (size_t)im->rows * im->cols;
    s->pixels = levi_xmalloc((size_t)n * px * sizeof(float));
    s->labels = levi_xmalloc((size_t)n * sizeof(int32_t));
    float *clean = levi_xmalloc(px * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        levi_images_get_f32(im, idx[i], clean);
        levi_status st = levi_image_corrupt(&c, clean, im->rows, im->cols, (uint64_t)idx[i],
                                            s->pixels + i * px, err);
        if (st != LEVI_OK) {
            levi_free(clean);
            return st;
        }
        s->labels[i] = im->labels[idx[i]];
    }
    levi_free(clean);
    return LEVI_OK;
}

static void set_data(vision_set *s, int n_classes, int rows, int cols) {
    levi_vision_data *d = &s->data;
    memset(d, 0, sizeof *d);
    d->n = s->images.n, d->img_h = rows, d->img_w = cols, d->images = s->pixels;
    d->n_slots = s->feats.n_slots, d->slot_dim = s->feats.dim, d->feat_dim = s->feats.total_dim;
    d->feats = s->feats.data, d->n_classes = n_classes, d->labels = s->labels;
}

static void set_free(vision_set *s) {
    levi_vision_feats_free(&s->feats);
    levi_free(s->pixels);
    levi_free(s->labels);
}

/* ---------------------------------------------------------------------------------------
 * Results. */
typedef struct method_result {
    int method;
    char key[65];
    levi_vision_select_result sel;
    double ood_acc[LEVI_VISION_MAX_SEEDS]; /* mean over the OOD groups, per seed */
    double ood_mean, ood_std;
    double seconds;
    int from_cache;
} method_result;

static void mean_std(const double *x, int n, double *mean, double *std) {
    double m = 0, v = 0;
    for (int i = 0; i < n; i++) m += x[i];
    m /= n;
    for (int i = 0; i < n; i++) v += (x[i] - m) * (x[i] - m);
    *mean = m;
    *std = n > 1 ? sqrt(v / (n - 1)) : 0.0;
}

static cJSON *result_json(const method_result *r, int n_sets) {
    const levi_vision_select_result *s = &r->sel;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "method", levi_vision_method_name(r->method));
    cJSON_AddStringToObject(o, "key", r->key);
    cJSON_AddNumberToObject(o, "lr", s->lr[s->best_lr_index]);
    cJSON *grid = cJSON_AddArrayToObject(o, "lr_grid");
    for (int i = 0; i < s->n_lr; i++) {
        cJSON *g = cJSON_CreateObject();
        cJSON_AddNumberToObject(g, "lr", s->lr[i]);
        cJSON_AddNumberToObject(g, "id_val_acc", s->lr_val_acc[i]);
        cJSON_AddItemToArray(grid, g);
    }
    cJSON_AddNumberToObject(o, "seconds", r->seconds);
    cJSON *seeds = cJSON_AddArrayToObject(o, "seeds");
    for (int k = 0; k < s->n_seeds; k++) {
        cJSON *sd = cJSON_CreateObject();
        cJSON_AddNumberToObject(sd, "seed", k);
        cJSON_AddNumberToObject(sd, "epochs", s->train[k].epochs_run);
        cJSON_AddNumberToObject(sd, "best_epoch", s->train[k].best_epoch);
        cJSON_AddNumberToObject(sd, "train_seconds", s->train[k].seconds);
        cJSON *acc = cJSON_AddObjectToObject(sd, "accuracy");
        for (int j = 0; j < n_sets; j++) cJSON_AddNumberToObject(acc, set_names[j], s->acc[k][j]);
        cJSON_AddNumberToObject(acc, "ood", r->ood_acc[k]);
        cJSON_AddItemToArray(seeds, sd);
    }
    cJSON *mean = cJSON_AddObjectToObject(o, "mean"), *std = cJSON_AddObjectToObject(o, "std");
    for (int j = 0; j < n_sets; j++) {
        cJSON_AddNumberToObject(mean, set_names[j], s->mean[j]);
        cJSON_AddNumberToObject(std, set_names[j], s->std[j]);
    }
    cJSON_AddNumberToObject(mean, "ood", r->ood_mean);
    cJSON_AddNumberToObject(std, "ood", r->ood_std);
    return o;
}

/* Reads back a method's results written by result_json; 0 when absent or of another key. */
static int result_load(const char *path, const char *key, method_result *r, int n_sets) {
    char *text = NULL;
    size_t len = 0;
    levi_error e;
    if (levi_read_file(path, &text, &len, &e) != LEVI_OK) return 0;
    cJSON *o = cJSON_Parse(text);
    free(text);
    int ok = 0;
    const cJSON *k = cJSON_GetObjectItem(o, "key"), *seeds = cJSON_GetObjectItem(o, "seeds");
    const cJSON *grid = cJSON_GetObjectItem(o, "lr_grid");
    if (o && cJSON_IsString(k) && strcmp(k->valuestring, key) == 0 && cJSON_IsArray(seeds) &&
        cJSON_IsArray(grid)) {
        levi_vision_select_result *s = &r->sel;
        s->n_lr = cJSON_GetArraySize(grid);
        s->n_seeds = cJSON_GetArraySize(seeds);
        s->n_sets = n_sets;
        ok = s->n_lr >= 1 && s->n_lr <= LEVI_VISION_MAX_GRID && s->n_seeds >= 1 &&
             s->n_seeds <= LEVI_VISION_MAX_SEEDS;
        double lr = cJSON_GetNumberValue(cJSON_GetObjectItem(o, "lr"));
        for (int i = 0; ok && i < s->n_lr; i++) {
            const cJSON *g = cJSON_GetArrayItem(grid, i);
            s->lr[i] = (float)cJSON_GetNumberValue(cJSON_GetObjectItem(g, "lr"));
            s->lr_val_acc[i] = cJSON_GetNumberValue(cJSON_GetObjectItem(g, "id_val_acc"));
            if (s->lr[i] == (float)lr) s->best_lr_index = i;
        }
        for (int sd = 0; ok && sd < s->n_seeds; sd++) {
            const cJSON *it = cJSON_GetArrayItem(seeds, sd);
            const cJSON *acc = cJSON_GetObjectItem(it, "accuracy");
            s->train[sd].epochs_run = (int)cJSON_GetNumberValue(cJSON_GetObjectItem(it, "epochs"));
            s->train[sd].best_epoch =
                (int)cJSON_GetNumberValue(cJSON_GetObjectItem(it, "best_epoch"));
            s->train[sd].seconds = cJSON_GetNumberValue(cJSON_GetObjectItem(it, "train_seconds"));
            for (int j = 0; j < n_sets; j++) {
                const cJSON *v = cJSON_GetObjectItem(acc, set_names[j]);
                if (!cJSON_IsNumber(v))
                    ok = 0;
                else
                    s->acc[sd][j] = v->valuedouble;
            }
        }
        r->seconds = cJSON_GetNumberValue(cJSON_GetObjectItem(o, "seconds"));
    }
    cJSON_Delete(o);
    return ok;
}

static void result_summarise(method_result *r, int n_sets) {
    levi_vision_select_result *s = &r->sel;
    for (int j = 0; j < n_sets; j++) {
        double x[LEVI_VISION_MAX_SEEDS];
        for (int k = 0; k < s->n_seeds; k++) x[k] = s->acc[k][j];
        mean_std(x, s->n_seeds, &s->mean[j], &s->std[j]);
    }
    for (int k = 0; k < s->n_seeds; k++) {
        double m = 0;
        for (int g = 0; g < VISION_GROUPS; g++) m += s->acc[k][2 + g];
        r->ood_acc[k] = m / VISION_GROUPS;
    }
    mean_std(r->ood_acc, s->n_seeds, &r->ood_mean, &r->ood_std);
}

static levi_status write_text(const char *dir, const char *name, const char *text,
                              levi_error *err) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return levi_write_file_atomic(path, text, strlen(text), err);
}

static void appendf(char **buf, size_t *len, size_t *cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void appendf(char **buf, size_t *len, size_t *cap, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(*buf + *len, *cap - *len, fmt, ap);
        va_end(ap);
        if (n >= 0 && *len + (size_t)n < *cap) {
            *len += (size_t)n;
            return;
        }
        *cap = *cap * 2 + (size_t)(n > 0 ? n : 0) + 64;
        *buf = realloc(*buf, *cap);
        LEVI_ASSERT(*buf != NULL, "out of memory building a report");
    }
}

static levi_status write_reports(const vision_cfg *c, const method_result *res, int n,
                                 const char *const *feat_keys, double feat_seconds, int64_t n_train,
                                 int64_t n_val, int64_t n_test, levi_error *err) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "task", "fashion-mnist-quality-shift");
    cJSON *cfg = cJSON_AddObjectToObject(root, "config");
    cJSON_AddNumberToObject(cfg, "resolution", c->resolution);
    cJSON_AddNumberToObject(cfg, "train_rows", (double)n_train);
    cJSON_AddNumberToObject(cfg, "val_rows", (double)n_val);
    cJSON_AddNumberToObject(cfg, "test_rows", (double)n_test);
    cJSON_AddNumberToObject(cfg, "seeds", c->seeds);
    cJSON_AddNumberToObject(cfg, "epochs", c->epochs);
    cJSON_AddNumberToObject(cfg, "patience", c->patience);
    cJSON_AddNumberToObject(cfg, "batch", c->batch);
    cJSON_AddStringToObject(cfg, "optimizer", "sgd momentum 0.9");
    cJSON_AddNumberToObject(root, "feature_seconds", feat_seconds);
    cJSON *fk = cJSON_AddObjectToObject(root, "feature_keys");
    for (int j = 0; j < VISION_SETS; j++)
        cJSON_AddStringToObject(fk, j == 0 ? "id_train_val" : set_names[j], feat_keys[j]);
    cJSON *ms = cJSON_AddArrayToObject(root, "methods");
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(ms, result_json(&res[i], VISION_SETS));
    char *js = cJSON_Print(root);
    cJSON_Delete(root);
    levi_status st = write_text(c->out, "results.json", js, err);
    free(js);
    if (st != LEVI_OK) return st;

    size_t len = 0, cap = 4096;
    char *csv = malloc(cap);
    csv[0] = 0;
    appendf(&csv, &len, &cap, "method,set,mean,std,lr");
    for (int k = 0; k < c->seeds; k++) appendf(&csv, &len, &cap, ",seed%d", k);
    appendf(&csv, &len, &cap, "\n");
    for (int i = 0; i < n; i++) {
        const levi_vision_select_result *s = &res[i].sel;
        for (int j = 0; j <= VISION_SETS; j++) {
            const char *nm = j < VISION_SETS ? set_names[j] : "ood";
            double mean = j < VISION_SETS ? s->mean[j] : res[i].ood_mean;
            double std = j < VISION_SETS ? s->std[j] : res[i].ood_std;
            appendf(&csv, &len, &cap, "%s,%s,%.6f,%.6f,%g", levi_vision_method_name(res[i].method),
                    nm, mean, std, (double)s->lr[s->best_lr_index]);
            for (int k = 0; k < s->n_seeds; k++)
                appendf(&csv, &len, &cap, ",%.6f",
                        j < VISION_SETS ? s->acc[k][j] : res[i].ood_acc[k]);
            appendf(&csv, &len, &cap, "\n");
        }
    }
    st = write_text(c->out, "results.csv", csv, err);
    free(csv);
    if (st != LEVI_OK) return st;

    len = 0, cap = 4096;
    char *md = malloc(cap);
    md[0] = 0;
    appendf(&md, &len, &cap,
            "# Fashion-MNIST quality shift: accuracy (%%), mean +- std over %d seed(s)\n\n"
            "Frozen EfficientNet-Lite0 at %dx%d; %lld train / %lld ID-val images from "
            "Fashion-MNIST train, %lld test images per set. Learning rate chosen on ID "
            "validation (first seed); SGD momentum 0.9, batch %d, at most %d epochs, "
            "patience %d. OOD = mean of the four corruption groups.\n\n",
            c->seeds, c->resolution, c->resolution, (long long)n_train, (long long)n_val,
            (long long)n_test, c->batch, c->epochs, c->patience);
    appendf(&md, &len, &cap,
            "| Method | lr | ID val | ID test | OOD | downsample | blur | jpeg | noise |\n"
            "|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < n; i++) {
        const levi_vision_select_result *s = &res[i].sel;
        appendf(&md, &len, &cap, "| %s | %g | %.2f ± %.2f | %.2f ± %.2f | %.2f ± %.2f",
                levi_vision_method_name(res[i].method), (double)s->lr[s->best_lr_index],
                100 * s->mean[0], 100 * s->std[0], 100 * s->mean[1], 100 * s->std[1],
                100 * res[i].ood_mean, 100 * res[i].ood_std);
        for (int g = 0; g < VISION_GROUPS; g++)
            appendf(&md, &len, &cap, " | %.2f ± %.2f", 100 * s->mean[2 + g], 100 * s->std[2 + g]);
        appendf(&md, &len, &cap, " |\n");
    }
    appendf(&md, &len, &cap, "\nLearning-rate grid (first seed's best ID-val accuracy, %%):\n\n");
    for (int i = 0; i < n; i++) {
        const levi_vision_select_result *s = &res[i].sel;
        appendf(&md, &len, &cap, "- %s:", levi_vision_method_name(res[i].method));
        for (int l = 0; l < s->n_lr; l++)
            appendf(&md, &len, &cap, " %g -> %.2f%s", (double)s->lr[l], 100 * s->lr_val_acc[l],
                    l + 1 < s->n_lr ? "," : "");
        appendf(&md, &len, &cap, " (%.0f s)\n", res[i].seconds);
    }
    st = write_text(c->out, "report.md", md, err);
    free(md);
    return st;
}

/* ---------------------------------------------------------------------------------------
 * The command. */
static void default_path(char *out, size_t cap, const char *env, const char *cache_rel,
                         const char *fallback) {
    const char *e = getenv(env);
    if (e && *e) {
        snprintf(out, cap, "%s", e);
        return;
    }
    if (!cache_rel) {
        snprintf(out, cap, "%s", fallback);
        return;
    }
    const char *c = getenv("LEVI_CACHE"), *x = getenv("XDG_CACHE_HOME"), *h = getenv("HOME");
    if (c && *c)
        snprintf(out, cap, "%s/%s", c, cache_rel);
    else if (x && *x)
        snprintf(out, cap, "%s/levi/%s", x, cache_rel);
    else
        snprintf(out, cap, "%s/.cache/levi/%s", h && *h ? h : ".", cache_rel);
}

static int fail(levi_status st, const levi_error *err) {
    fprintf(stderr, "levi vision: %s\n", err->msg);
    return levi_cli_exit_code(st);
}

int levi_cmd_vision(int argc, char **argv) {
    vision_cfg c;
    int help = 0;
    int rc = parse_args(argc, argv, &c, &help);
    if (rc) return rc;
    if (help) {
        vision_usage(stdout);
        return LEVI_EXIT_OK;
    }
    char data_dir[PATH_MAX], model[PATH_MAX], cache[PATH_MAX];
    if (c.data)
        snprintf(data_dir, sizeof data_dir, "%s", c.data);
    else
        default_path(data_dir, sizeof data_dir, "LEVI_FASHION_MNIST_DIR", NULL,
                     "/usr/share/datasets/fashion-mnist");
    if (c.model)
        snprintf(model, sizeof model, "%s", c.model);
    else
        default_path(model, sizeof model, "LEVI_EFFNET_PTH",
                     "models/efficientnet-lite0/efficientnet-lite0-57934424.pth", NULL);
    if (c.cache)
        snprintf(cache, sizeof cache, "%s", c.cache);
    else
        default_path(cache, sizeof cache, "LEVI_VISION_CACHE", "vision-features", NULL);
    if (c.threads > 0) levi_set_num_threads(c.threads);

    levi_error err = {0};
    levi_status st = LEVI_OK;
    levi_images train_im = {0}, test_im = {0};
    st = levi_fashion_mnist_load(data_dir, "train", &train_im, &err);
    if (st == LEVI_OK) st = levi_fashion_mnist_load(data_dir, "t10k", &test_im, &err);
    if (st != LEVI_OK) {
        levi_images_free(&train_im);
        return fail(st == LEVI_ERR_IO ? LEVI_ERR_NOT_FOUND : st, &err);
    }
    if (c.train_rows > train_im.n || c.test_rows > test_im.n) {
        levi_images_free(&train_im);
        levi_images_free(&test_im);
        return vusage("--train-rows %d / --test-rows %d: the data has %lld / %lld images",
                      c.train_rows, c.test_rows, (long long)train_im.n, (long long)test_im.n);
    }
    levi_vision_extractor *x = NULL;
    st = levi_vision_extractor_open(&x, model, &err);
    if (st != LEVI_OK) {
        levi_images_free(&train_im);
        levi_images_free(&test_im);
        levi_error_prefix(&err, "--model: ");
        return fail(st == LEVI_ERR_IO ? LEVI_ERR_NOT_FOUND : st, &err);
    }
    /* The ID rows: the first --train-rows images of a fixed-seed shuffle of the train set
       (the same subset in every run, so its cached features are reused); the first 90% of
       them train, the last 10% are ID validation. */
    int64_t *perm = levi_xmalloc((size_t)train_im.n * sizeof(int64_t));
    for (int64_t i = 0; i < train_im.n; i++) perm[i] = i;
    levi_rng rng;
    levi_rng_seed(&rng, 20240101);
    levi_rng_shuffle_i64(&rng, perm, train_im.n);
    const int64_t n_id = c.train_rows, n_val = n_id / 10, n_train = n_id - n_val;
    int64_t *test_idx = levi_xmalloc((size_t)c.test_rows * sizeof(int64_t));
    for (int64_t i = 0; i < c.test_rows; i++) test_idx[i] = i;

    vision_set sets[VISION_SETS]; /* ID (train+val), test clean, 4 groups */
    memset(sets, 0, sizeof sets);
    levi_vision_feat_params fp = levi_vision_feat_default_params();
    fp.resolution = c.resolution;
    fp.stop = &levi_cli_interrupted;
    fprintf(stderr,
            "levi vision: %lld train + %lld val images, %d test images x 5 sets, "
            "EfficientNet-Lite0 at %dx%d, cache %s\n",
            (long long)n_train, (long long)n_val, c.test_rows, c.resolution, c.resolution, cache);
    const char *feat_keys[VISION_SETS];
    double feat_seconds = 0;
    for (int j = 0; j < VISION_SETS && st == LEVI_OK; j++) {
        const levi_images *im = j == 0 ? &train_im : &test_im;
        const int64_t *idx = j == 0 ? perm : test_idx;
        int64_t n = j == 0 ? n_id : c.test_rows;
        levi_corruption cor =
            levi_corruption_default_params(j < 2 ? LEVI_CORRUPT_NONE : group_kind[j - 2]);
        st = set_prepare(&sets[j], im, idx, n, cor, &err);
        if (st != LEVI_OK) break;
        feat_progress prog = {j == 0 ? "id-train" : set_names[j], NULL, 0};
        fp.progress = on_feat_progress, fp.progress_user = &prog;
        st = levi_vision_extract(x, cache, &sets[j].images, &fp, &sets[j].feats, &err);
        levi_progress_finish(prog.bar);
        if (st != LEVI_OK) break;
        feat_keys[j] = sets[j].feats.key;
        feat_seconds += sets[j].feats.seconds;
        if (sets[j].feats.images_computed > 0)
            fprintf(stderr, "levi vision: features %s: %lld images in %.1f s (%.1f img/s)\n",
                    prog.name, (long long)sets[j].feats.images_computed, sets[j].feats.seconds,
                    (double)sets[j].feats.images_computed / fmax(sets[j].feats.seconds, 1e-9));
        set_data(&sets[j], 10, train_im.rows, train_im.cols);
    }
    levi_vision_extractor_close(x);
    if (st != LEVI_OK) {
        rc = fail(st, &err);
        goto done;
    }
    st = levi_mkdirs(c.out, &err);
    char mdir[PATH_MAX];
    snprintf(mdir, sizeof mdir, "%s/methods", c.out);
    if (st == LEVI_OK) st = levi_mkdirs(mdir, &err);
    if (st != LEVI_OK) {
        rc = fail(st, &err);
        goto done;
    }
    int64_t *train_rows = levi_xmalloc((size_t)n_train * sizeof(int64_t));
    int64_t *val_rows = levi_xmalloc((size_t)n_val * sizeof(int64_t));
    int64_t *test_rows = levi_xmalloc((size_t)c.test_rows * sizeof(int64_t));
    for (int64_t i = 0; i < n_train; i++) train_rows[i] = i;
    for (int64_t i = 0; i < n_val; i++) val_rows[i] = n_train + i;
    for (int64_t i = 0; i < c.test_rows; i++) test_rows[i] = i;
    levi_vision_eval_set evs[VISION_SETS];
    evs[0] = (levi_vision_eval_set){set_names[0], &sets[0].data, val_rows, n_val};
    for (int j = 1; j < VISION_SETS; j++)
        evs[j] = (levi_vision_eval_set){set_names[j], &sets[j].data, test_rows, c.test_rows};

    method_result *res = calloc((size_t)c.n_methods, sizeof *res);
    LEVI_ASSERT(res != NULL, "out of memory");
    levi_vision_train_params tp = levi_vision_train_default_params();
    tp.batch_size = c.batch, tp.max_epochs = c.epochs, tp.patience = c.patience;
    tp.stop = &levi_cli_interrupted;
    int done_methods = 0;
    for (int i = 0; i < c.n_methods && st == LEVI_OK; i++) {
        method_result *r = &res[i];
        r->method = c.methods[i];
        const char *mname = levi_vision_method_name(r->method);
        float grid[LEVI_VISION_MAX_GRID];
        int n_lr = c.n_lrs ? c.n_lrs : levi_vision_default_lr_grid(r->method, grid);
        if (c.n_lrs) memcpy(grid, c.lrs, sizeof(float) * (size_t)c.n_lrs);
        /* Everything that defines the run, so stale results are never reused. */
        char listing[4096];
        int n = snprintf(listing, sizeof listing,
                         "levi-vision-method v%d %s seeds %d epochs %d patience %d batch %d "
                         "threads %d train %lld val %lld test %d lrs",
                         LEVI_VISION_FORMAT_VERSION, mname, c.seeds, c.epochs, c.patience, c.batch,
                         levi_get_num_threads(), (long long)n_train, (long long)n_val, c.test_rows);
        for (int l = 0; l < n_lr; l++)
            n += snprintf(listing + n, sizeof listing - (size_t)n, " %g", (double)grid[l]);
        for (int j = 0; j < VISION_SETS; j++)
            n += snprintf(listing + n, sizeof listing - (size_t)n, " %s", feat_keys[j]);
        levi_sha256_hex(listing, strlen(listing), r->key);
        char path[PATH_MAX + 64];
        snprintf(path, sizeof path, "%s/%s.json", mdir, mname);
        if (result_load(path, r->key, r, VISION_SETS)) {
            r->from_cache = 1;
            result_summarise(r, VISION_SETS);
            fprintf(stderr, "levi vision: %s: finished earlier, results reused from %s\n", mname,
                    path);
            done_methods++;
            continue;
        }
        train_progress prog = {mname, NULL, 0, 0, NAN};
        tp.progress = on_train_progress, tp.progress_user = &prog;
        levi_vision_model_params mp = levi_vision_model_default_params(r->method);
        double t0 = levi_now();
        st = levi_vision_select(&mp, &tp, grid, n_lr, c.seeds, 0, &sets[0].data, train_rows,
                                n_train, val_rows, n_val, evs, VISION_SETS, &r->sel, &err);
        levi_progress_finish(prog.bar);
        r->seconds = levi_now() - t0;
        if (st != LEVI_OK) break;
        result_summarise(r, VISION_SETS);
        cJSON *o = result_json(r, VISION_SETS);
        char *js = cJSON_Print(o);
        cJSON_Delete(o);
        st = levi_write_file_atomic(path, js, strlen(js), &err);
        free(js);
        if (st != LEVI_OK) break;
        fprintf(stderr,
                "levi vision: %s: lr %g, ID test %.2f%% +- %.2f, OOD %.2f%% +- %.2f (%.0f s)\n",
                mname, (double)r->sel.lr[r->sel.best_lr_index], 100 * r->sel.mean[1],
                100 * r->sel.std[1], 100 * r->ood_mean, 100 * r->ood_std, r->seconds);
        done_methods++;
    }
    /* Reports cover the methods finished so far, also after an interruption. */
    if (done_methods > 0) {
        levi_error werr = {0};
        levi_status wst = write_reports(&c, res, done_methods, feat_keys, feat_seconds, n_train,
                                        n_val, c.test_rows, &werr);
        if (wst != LEVI_OK && st == LEVI_OK) st = wst, err = werr;
        if (wst == LEVI_OK)
            fprintf(stderr, "levi vision: wrote %s/results.json, results.csv, report.md\n", c.out);
    }
    if (st != LEVI_OK) rc = fail(st, &err);
    free(res);
    levi_free(train_rows);
    levi_free(val_rows);
    levi_free(test_rows);
done:
    for (int j = 0; j < VISION_SETS; j++) set_free(&sets[j]);
    levi_free(perm);
    levi_free(test_idx);
    levi_images_free(&train_im);
    levi_images_free(&test_im);
    return rc;
}
