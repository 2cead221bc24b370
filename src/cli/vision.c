/* `levi vision`: the vision quality-shift task (paper App. D.2/D.3, TASKS.md section 3).
 * ID = Fashion-MNIST train (a seeded subset, split 90/10 into train and validation) and the
 * clean test set; OOD = the test set under each corruption (downsample, blur, jpeg, noise),
 * each its own group. Extracts (or reuses) the frozen EfficientNet-Lite0 stage features of
 * every set, then for each method chooses the learning rate on ID validation with the first
 * seed, trains the other seeds, evaluates every set, and writes results.json, results.csv and
 * report.md. A finished method's results are kept in <out>/methods/<name>.json under a key
 * of everything that defines the run, and reused when the command is run again.
 * The backbone-training methods (ft, ht, lp-ft: vision_ft.h) run the images through
 * EfficientNet-Lite0 every step and leave each seed's weights and probabilities under
 * <out>/methods/<name>/; the post-hoc methods (ft+lp, wise-ft, levi-ft) are built from those
 * after every other method.
 * Not for: the methods themselves (src/methods/vision.c, vision_ft.c), image corruption
 * (src/data). */
#include "cli.h"

#include "levi/images.h"
#include "levi/ptfile.h"
#include "levi/safetensors.h"
#include "levi/vision.h"
#include "levi/vision_ft.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VISION_GROUPS 4 /* corruptions */
#define VISION_SETS (2 + VISION_GROUPS)

/* Methods of the command: the cached-feature methods of vision.h (ids 0..3), the backbone
 * training methods of vision_ft.h, and the post-hoc ones built from finished runs. */
enum {
    VM_FT = LEVI_VISION_METHOD_COUNT, /* "ft" */
    VM_HT,                            /* "ht" */
    VM_LP_FT,                         /* "lp-ft" */
    VM_FT_LP,                         /* "ft+lp": FT+RobustModel */
    VM_WISE,                          /* "wise-ft": FT+ZeroShot */
    VM_LEVI_FT,                       /* "levi-ft": LEVI on each FT seed's backbone */
    VM_COUNT
};
static const char *const vm_names[VM_COUNT - LEVI_VISION_METHOD_COUNT] = {
    "ft", "ht", "lp-ft", "ft+lp", "wise-ft", "levi-ft"};

static const char *vm_name(int m) {
    return m < LEVI_VISION_METHOD_COUNT ? levi_vision_method_name(m)
                                        : vm_names[m - LEVI_VISION_METHOD_COUNT];
}

static int vm_parse(const char *name) {
    int m = levi_vision_method_parse(name);
    if (m >= 0) return m;
    for (int i = LEVI_VISION_METHOD_COUNT; i < VM_COUNT; i++)
        if (strcmp(name, vm_name(i)) == 0) return i;
    return -1;
}

static int vm_is_posthoc(int m) {
    return m >= VM_FT_LP;
}

static int vm_ft_mode(int m) {
    return m == VM_FT ? LEVI_VISION_FT : m == VM_HT ? LEVI_VISION_HT : LEVI_VISION_LP_FT;
}

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
            "  --methods LIST     comma-separated (default levi,lp,small,a3; all = every one):\n"
            "                     levi, lp, small, a3 on cached frozen features; ft, ht,\n"
            "                     lp-ft train EfficientNet-Lite0 + a linear head on the\n"
            "                     images; ft+lp (FT+RobustModel), wise-ft (FT+ZeroShot) and\n"
            "                     levi-ft (LEVI on each FT seed's backbone) are built from\n"
            "                     the finished ft (and lp) runs, which must be listed too\n"
            "  --seeds N          seeds per method, 0..N-1 (default 3)\n"
            "  --lrs LIST         learning-rate grid (default 1e-4,1e-3,1e-2,1e-1; linear\n"
            "                     probing 1e-3,1e-2,1e-1,1,10)\n"
            "  --epochs N         at most N epochs per run (default 20)\n"
            "  --patience N       stop after N epochs without a better ID-val accuracy\n"
            "                     (default 4)\n"
            "  --batch N          batch size (default 512, paper D.3)\n"
            "  --levi-ft-seeds N  levi-ft on the first N ft seeds only (default: all of them;\n"
            "                     each costs a feature extraction and a LEVI run)\n"
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
    int levi_ft_seeds; /* 0: every ft seed */
    int n_methods;
    int methods[VM_COUNT];
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

static int has_method(const vision_cfg *c, int m) {
    for (int i = 0; i < c->n_methods; i++)
        if (c->methods[i] == m) return 1;
    return 0;
}

static int parse_methods(const char *s, vision_cfg *c) {
    c->n_methods = 0;
    if (strcmp(s, "all") == 0) {
        for (int i = 0; i < VM_COUNT; i++) c->methods[c->n_methods++] = i;
        return 0;
    }
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        int m = vm_parse(tok);
        if (m < 0)
            return vusage("--methods: unknown method '%s' (expected levi, lp, small, a3, ft, ht, "
                          "lp-ft, ft+lp, wise-ft, levi-ft or all)",
                          tok);
        if (has_method(c, m)) return vusage("--methods: '%s' listed twice", tok);
        c->methods[c->n_methods++] = m;
    }
    if (c->n_methods == 0) return vusage("--methods: empty list");
    if ((has_method(c, VM_FT_LP) || has_method(c, VM_WISE) || has_method(c, VM_LEVI_FT)) &&
        !has_method(c, VM_FT))
        return vusage("--methods: ft+lp, wise-ft and levi-ft are built from the ft runs: add ft");
    if (has_method(c, VM_FT_LP) && !has_method(c, LEVI_VISION_LP))
        return vusage("--methods: ft+lp ensembles the ft and lp runs: add lp");
    /* Post-hoc methods after everything they read (stable). */
    int order[VM_COUNT], n = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < c->n_methods; i++)
            if (vm_is_posthoc(c->methods[i]) == pass) order[n++] = c->methods[i];
    memcpy(c->methods, order, sizeof(int) * (size_t)n);
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
        else if (strcmp(a, "--levi-ft-seeds") == 0)
            rc = parse_int(a, v, 1, LEVI_VISION_MAX_SEEDS, &c->levi_ft_seeds);
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

static levi_status pt_source_cli(void *user, const char *name, int ndim, const int64_t *shape,
                                 float *dst, levi_error *err) {
    return levi_pt_read_f32((const levi_pt_file *)user, name, ndim, shape, dst, err);
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
    char detail[1024]; /* post-hoc choices (temperatures, alphas), shown in report.md */
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
    cJSON_AddStringToObject(o, "method", vm_name(r->method));
    cJSON_AddStringToObject(o, "key", r->key);
    if (r->detail[0]) cJSON_AddStringToObject(o, "detail", r->detail);
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
        const cJSON *det = cJSON_GetObjectItem(o, "detail");
        if (cJSON_IsString(det)) snprintf(r->detail, sizeof r->detail, "%s", det->valuestring);
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

static const method_result *find_result(const method_result *res, int n, int method) {
    for (int i = 0; i < n; i++)
        if (res[i].method == method) return &res[i];
    return NULL;
}

/* The target, "LEVI beats FT on OOD (mean of the seeds)", stated with numbers for
 * frozen LEVI and LEVI on the fine-tuned backbone, overall and per group. */
static void report_levi_vs_ft(const method_result *res, int n, char **md, size_t *len,
                              size_t *cap) {
    const method_result *ft = find_result(res, n, VM_FT);
    const int ls[2] = {LEVI_VISION_LEVI, VM_LEVI_FT};
    if (!ft) return;
    for (int k = 0; k < 2; k++) {
        const method_result *lv = find_result(res, n, ls[k]);
        if (!lv) continue;
        const int wins = lv->ood_mean > ft->ood_mean;
        appendf(md, len, cap,
                "\n**%s vs FT on OOD (mean of %d vs %d seed(s)): %s.** Mean OOD %.2f ± %.2f vs "
                "%.2f ± %.2f (%+.2f points); ID test %.2f vs %.2f.",
                vm_name(ls[k]), lv->sel.n_seeds, ft->sel.n_seeds,
                wins ? "LEVI is better" : "LEVI is NOT better", 100 * lv->ood_mean,
                100 * lv->ood_std, 100 * ft->ood_mean, 100 * ft->ood_std,
                100 * (lv->ood_mean - ft->ood_mean), 100 * lv->sel.mean[1], 100 * ft->sel.mean[1]);
        if (lv->sel.n_seeds < ft->sel.n_seeds) {
            double f = 0, l = 0;
            for (int j = 0; j < lv->sel.n_seeds; j++) f += ft->ood_acc[j], l += lv->ood_acc[j];
            appendf(md, len, cap, " On the same %d seed(s): %.2f vs FT %.2f.", lv->sel.n_seeds,
                    100 * l / lv->sel.n_seeds, 100 * f / lv->sel.n_seeds);
        }
        appendf(md, len, cap, " Per group:");
        for (int g = 0; g < VISION_GROUPS; g++)
            appendf(md, len, cap, " %s %.2f vs %.2f (%s)%s", set_names[2 + g] + 4,
                    100 * lv->sel.mean[2 + g], 100 * ft->sel.mean[2 + g],
                    lv->sel.mean[2 + g] > ft->sel.mean[2 + g] ? "LEVI" : "FT",
                    g + 1 < VISION_GROUPS ? "," : ".\n");
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
            appendf(&csv, &len, &cap, "%s,%s,%.6f,%.6f,%g", vm_name(res[i].method), nm, mean, std,
                    (double)s->lr[s->best_lr_index]);
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
            "EfficientNet-Lite0 at %dx%d (frozen except in ft, ht, lp-ft); %lld train / %lld "
            "ID-val images from "
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
                vm_name(res[i].method), (double)s->lr[s->best_lr_index], 100 * s->mean[0],
                100 * s->std[0], 100 * s->mean[1], 100 * s->std[1], 100 * res[i].ood_mean,
                100 * res[i].ood_std);
        for (int g = 0; g < VISION_GROUPS; g++)
            appendf(&md, &len, &cap, " | %.2f ± %.2f", 100 * s->mean[2 + g], 100 * s->std[2 + g]);
        appendf(&md, &len, &cap, " |\n");
    }
    appendf(&md, &len, &cap, "\nLearning-rate grid (first seed's best ID-val accuracy, %%):\n\n");
    for (int i = 0; i < n; i++) {
        const levi_vision_select_result *s = &res[i].sel;
        appendf(&md, &len, &cap, "- %s:", vm_name(res[i].method));
        if (res[i].method == VM_FT_LP || res[i].method == VM_WISE) {
            appendf(&md, &len, &cap, " no lr of its own, built from the ft run (%.0f s)\n",
                    res[i].seconds);
            continue;
        }
        for (int l = 0; l < s->n_lr; l++)
            appendf(&md, &len, &cap, " %g -> %.2f%s", (double)s->lr[l], 100 * s->lr_val_acc[l],
                    l + 1 < s->n_lr ? "," : "");
        appendf(&md, &len, &cap, " (%.0f s)\n", res[i].seconds);
    }
    for (int i = 0; i < n; i++)
        if (res[i].detail[0])
            appendf(&md, &len, &cap, "\n%s: %s\n", vm_name(res[i].method), res[i].detail);
    report_levi_vs_ft(res, n, &md, &len, &cap);
    st = write_text(c->out, "report.md", md, err);
    free(md);
    return st;
}

/* ---------------------------------------------------------------------------------------
 * Backbone-training methods (ft, ht, lp-ft) and the post-hoc ones (ft+lp, wise-ft, levi-ft).
 * Each FT-type seed leaves <out>/methods/<name>/seed<k>.safetensors (the best weights, BN
 * statistics and head; metadata "key" = the method's key) and seed<k>-probs.safetensors (its
 * probabilities on every set), which the post-hoc methods read. */
typedef struct vision_ctx {
    const vision_cfg *c;
    const char *model_path, *cache, *mdir;
    vision_set *sets;
    const levi_vision_eval_set *evs;
    const int64_t *train_rows, *val_rows;
    int64_t n_train, n_val;
    const char *const *feat_keys;
    levi_vision_train_params tp;
    const method_result *done;
    int n_done;
} vision_ctx;

static levi_status ft_open(const vision_ctx *x, levi_vision_ft_model **m, levi_error *err) {
    levi_pt_file *f = levi_pt_open(x->model_path, err);
    if (!f) return err->status ? err->status : LEVI_ERR_FORMAT;
    levi_vision_ft_model_params mp = levi_vision_ft_default_model_params();
    mp.resolution = x->c->resolution;
    levi_status st = levi_vision_ft_init(m, pt_source_cli, f, &mp, err);
    levi_pt_close(f);
    return st;
}

static void seed_path(char *out, size_t cap, const vision_ctx *x, int method, int seed,
                      const char *suffix) {
    snprintf(out, cap, "%s/%s/seed%d%s.safetensors", x->mdir, vm_name(method), seed, suffix);
}

/* Probabilities of every set (its eval rows) as one safetensors file, and the accuracies. */
static levi_status save_probs(const vision_ctx *x, float *const *probs, const char *path,
                              const char *key, levi_error *err) {
    levi_tensor t[VISION_SETS];
    memset(t, 0, sizeof t);
    for (int j = 0; j < VISION_SETS; j++) {
        snprintf(t[j].name, sizeof t[j].name, "probs/%s", set_names[j]);
        t[j].dtype = LEVI_F32;
        const int64_t shape[2] = {x->evs[j].n, 10};
        levi_tensor_set_shape(&t[j], 2, shape);
        t[j].data = probs[j];
    }
    const char *keys[1] = {"key"}, *vals[1] = {key};
    return levi_st_write(path, t, VISION_SETS, keys, vals, 1, err);
}

static levi_status load_probs(const vision_ctx *x, float **probs, const char *path, const char *key,
                              levi_error *err) {
    levi_st_file *f = levi_st_open(path, err);
    if (!f) return err->status ? err->status : LEVI_ERR_IO;
    const char *k = levi_st_metadata(f, "key");
    levi_status st = LEVI_OK;
    if (!k || strcmp(k, key) != 0)
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: key %s, expected %s (rerun its method)", path,
                         k ? k : "(absent)", key);
    for (int j = 0; j < VISION_SETS && st == LEVI_OK; j++) {
        char name[64];
        snprintf(name, sizeof name, "probs/%s", set_names[j]);
        const int64_t shape[2] = {x->evs[j].n, 10};
        probs[j] = levi_xmalloc((size_t)x->evs[j].n * 10 * sizeof(float));
        st = levi_st_read_f32(f, name, 2, shape, probs[j], err);
    }
    levi_st_close(f);
    return st;
}

static double probs_accuracy(const float *p, const levi_vision_eval_set *e) {
    int64_t correct = 0;
    for (int64_t i = 0; i < e->n; i++) {
        int best = 0;
        for (int c = 1; c < 10; c++)
            if (p[i * 10 + c] > p[i * 10 + best]) best = c;
        correct += best == e->data->labels[e->rows[i]];
    }
    return e->n ? (double)correct / (double)e->n : 0.0;
}

static void free_probs(float **probs) {
    for (int j = 0; j < VISION_SETS; j++) levi_free(probs[j]), probs[j] = NULL;
}

/* The linear probe of seed `seed` at lr on the frozen features (LP of vision.h). */
static levi_status train_lp(const vision_ctx *x, float lr, uint64_t seed, int standardize,
                            levi_vision_model **out, levi_error *err) {
    levi_vision_model_params mp = levi_vision_model_default_params(LEVI_VISION_LP);
    mp.standardize = standardize;
    levi_status st = levi_vision_model_init(out, &mp, &x->sets[0].data, err);
    if (st != LEVI_OK) return st;
    levi_vision_train_params tp = x->tp;
    tp.lr = lr, tp.seed = seed, tp.progress = NULL;
    return levi_vision_train(*out, &x->sets[0].data, x->train_rows, x->n_train, x->val_rows,
                             x->n_val, &tp, NULL, err);
}

static levi_status lp_probe(const vision_ctx *x, float lp_lr, uint64_t seed, float *pw, float *pb,
                            levi_error *err) {
    levi_vision_model *lp = NULL;
    /* The probe reads the raw pooled features: folded into a head, a standardised probe has
       weights up to 1/std ~ 1e3 on near-constant channels, and FT from it diverged. */
    levi_status st = train_lp(x, lp_lr, seed, 0, &lp, err);
    if (st == LEVI_OK) st = levi_vision_ft_probe_from_lp(lp, pw, pb, err);
    levi_vision_model_free(lp);
    return st;
}

/* ft, ht, lp-ft: lr from the grid on ID validation with seed 0, the other seeds at it, every
 * seed evaluated on every set and saved for the post-hoc methods. */
static levi_status run_ft_method(const vision_ctx *x, method_result *r, const float *grid, int n_lr,
                                 float lp_lr, levi_error *err) {
    const vision_cfg *c = x->c;
    const int mode = vm_ft_mode(r->method);
    levi_vision_ft_model *m = NULL;
    levi_status st = ft_open(x, &m, err);
    if (st != LEVI_OK) return st;
    char dir[PATH_MAX + 32];
    snprintf(dir, sizeof dir, "%s/%s", x->mdir, vm_name(r->method));
    st = levi_mkdirs(dir, err);
    levi_vision_select_result *s = &r->sel;
    memset(s, 0, sizeof *s);
    s->n_lr = n_lr, s->n_seeds = c->seeds, s->n_sets = VISION_SETS;
    const size_t numel = levi_vision_ft_state_numel(m);
    float *best_state = levi_xmalloc(numel * sizeof(float));
    float *pw = levi_xmalloc((size_t)10 * LEVI_VISION_FT_FEATURE * sizeof(float));
    float pb[10];
    int has_probe = 0;
    train_progress prog = {vm_name(r->method), NULL, 0, 0, NAN};
    levi_vision_train_params tp = x->tp;
    tp.progress = on_train_progress, tp.progress_user = &prog;
    double best = -2;
    if (st == LEVI_OK && mode == LEVI_VISION_LP_FT)
        st = lp_probe(x, lp_lr, 0, pw, pb, err), has_probe = 1;
    for (int i = 0; i < n_lr && st == LEVI_OK; i++) {
        s->lr[i] = grid[i];
        tp.lr = grid[i], tp.seed = 0;
        levi_vision_train_result tr;
        st = levi_vision_ft_train(m, mode, has_probe ? pw : NULL, has_probe ? pb : NULL,
                                  &x->sets[0].data, x->train_rows, x->n_train, x->val_rows,
                                  x->n_val, &tp, &tr, err);
        if (st == LEVI_ERR_NUMERIC) st = LEVI_OK, tr.best_val_acc = -1; /* diverged: worst */
        if (st != LEVI_OK) break;
        s->lr_val_acc[i] = tr.best_val_acc;
        if (tr.best_val_acc > best) {
            best = tr.best_val_acc, s->best_lr_index = i, s->train[0] = tr;
            levi_vision_ft_state_get(m, best_state);
        }
    }
    float *probs[VISION_SETS] = {0};
    for (int k = 0; k < c->seeds && st == LEVI_OK; k++) {
        if (k == 0) {
            levi_vision_ft_state_set(m, best_state);
        } else {
            if (mode == LEVI_VISION_LP_FT) st = lp_probe(x, lp_lr, (uint64_t)k, pw, pb, err);
            tp.lr = s->lr[s->best_lr_index], tp.seed = (uint64_t)k;
            if (st == LEVI_OK)
                st = levi_vision_ft_train(m, mode, has_probe ? pw : NULL, has_probe ? pb : NULL,
                                          &x->sets[0].data, x->train_rows, x->n_train, x->val_rows,
                                          x->n_val, &tp, &s->train[k], err);
            if (st != LEVI_OK) break;
        }
        levi_progress_finish(prog.bar);
        prog.bar = NULL;
        int64_t total = 0;
        for (int j = 0; j < VISION_SETS; j++) total += x->evs[j].n;
        char label[96];
        snprintf(label, sizeof label, "%s seed %d evaluation", vm_name(r->method), k);
        levi_progress *bar = levi_progress_start(label, total, "img");
        int64_t done = 0;
        for (int j = 0; j < VISION_SETS; j++) {
            probs[j] = levi_xmalloc((size_t)x->evs[j].n * 10 * sizeof(float));
            levi_vision_ft_predict(m, x->evs[j].data, x->evs[j].rows, x->evs[j].n, probs[j]);
            s->acc[k][j] = probs_accuracy(probs[j], &x->evs[j]);
            done += x->evs[j].n;
            levi_progress_update(bar, done, NULL);
        }
        levi_progress_finish(bar);
        char path[PATH_MAX + 64];
        seed_path(path, sizeof path, x, r->method, k, "");
        const char *keys[2] = {"key", "method"}, *vals[2] = {r->key, vm_name(r->method)};
        st = levi_vision_ft_save(m, path, keys, vals, 2, err);
        seed_path(path, sizeof path, x, r->method, k, "-probs");
        if (st == LEVI_OK) st = save_probs(x, probs, path, r->key, err);
        free_probs(probs);
    }
    levi_progress_finish(prog.bar);
    if (st == LEVI_OK && mode == LEVI_VISION_LP_FT)
        snprintf(r->detail, sizeof r->detail,
                 "probe = LP on the raw pooled head features (no standardisation) at lr %g (LP "
                 "grid, seed 0 on ID validation); seed k's probe trained with seed k",
                 (double)lp_lr);
    levi_free(best_state);
    levi_free(pw);
    levi_vision_ft_free(m);
    return st;
}

/* Probabilities tempered by T: softmax(log p / T), in place. */
static void temper(float *p, int64_t n, double T) {
    for (int64_t i = 0; i < n; i++) {
        double z[10], mx = -INFINITY, sum = 0;
        for (int c = 0; c < 10; c++) {
            z[c] = log(fmax(p[i * 10 + c], 1e-30)) / T;
            mx = fmax(mx, z[c]);
        }
        for (int c = 0; c < 10; c++) sum += z[c] = exp(z[c] - mx);
        for (int c = 0; c < 10; c++) p[i * 10 + c] = (float)(z[c] / sum);
    }
}

static double nll(const float *p, const levi_vision_eval_set *e) {
    double s = 0;
    for (int64_t i = 0; i < e->n; i++)
        s -= log(fmax(p[i * 10 + e->data->labels[e->rows[i]]], 1e-30));
    return e->n ? s / (double)e->n : 0.0;
}

/* Temperature from {2^(i/4), i = -8..8} with the lowest ID-val NLL (ties: the smaller T). */
static double calibrate(const float *val_probs, const levi_vision_eval_set *val) {
    float *tmp = levi_xmalloc((size_t)val->n * 10 * sizeof(float));
    double best_T = 1, best = INFINITY;
    for (int i = -8; i <= 8; i++) {
        const double T = pow(2.0, i / 4.0);
        memcpy(tmp, val_probs, (size_t)val->n * 10 * sizeof(float));
        temper(tmp, val->n, T);
        const double v = nll(tmp, val);
        if (v < best) best = v, best_T = T;
    }
    levi_free(tmp);
    return best_T;
}

static levi_status member_key_check(const vision_ctx *x, const method_result *ft, levi_error *err) {
    if (!ft) return levi_errorf(err, LEVI_ERR_ARG, "the ft run is missing (list ft in --methods)");
    (void)x;
    return LEVI_OK;
}

/* FT+RobustModel: seed k = FT seed k and LP seed k, each calibrated by temperature on ID
 * validation, probabilities averaged with equal weights (Kumar et al. 2022a). */
static levi_status run_ft_lp(const vision_ctx *x, method_result *r, levi_error *err) {
    const method_result *ft = find_result(x->done, x->n_done, VM_FT);
    const method_result *lp = find_result(x->done, x->n_done, LEVI_VISION_LP);
    levi_status st = member_key_check(x, ft, err);
    if (st == LEVI_OK && !lp)
        st = levi_errorf(err, LEVI_ERR_ARG, "the lp run is missing (list lp in --methods)");
    if (st != LEVI_OK) return st;
    levi_vision_select_result *s = &r->sel;
    memset(s, 0, sizeof *s);
    s->n_lr = 1, s->lr[0] = ft->sel.lr[ft->sel.best_lr_index], s->lr_val_acc[0] = NAN;
    s->n_seeds = ft->sel.n_seeds, s->n_sets = VISION_SETS;
    const float lp_lr = lp->sel.lr[lp->sel.best_lr_index];
    size_t dl = 0;
    dl += (size_t)snprintf(r->detail, sizeof r->detail,
                           "temperatures (FT, LP) chosen by ID-val NLL, LP lr %g:", (double)lp_lr);
    for (int k = 0; k < s->n_seeds && st == LEVI_OK; k++) {
        float *pf[VISION_SETS] = {0}, *pl[VISION_SETS] = {0};
        char path[PATH_MAX + 64];
        seed_path(path, sizeof path, x, VM_FT, k, "-probs");
        st = load_probs(x, pf, path, ft->key, err);
        levi_vision_model *m = NULL;
        if (st == LEVI_OK) st = train_lp(x, lp_lr, (uint64_t)k, 1, &m, err);
        for (int j = 0; j < VISION_SETS && st == LEVI_OK; j++) {
            pl[j] = levi_xmalloc((size_t)x->evs[j].n * 10 * sizeof(float));
            levi_vision_predict(m, x->evs[j].data, x->evs[j].rows, x->evs[j].n, pl[j]);
        }
        levi_vision_model_free(m);
        if (st == LEVI_OK) {
            const double tf = calibrate(pf[0], &x->evs[0]), tl = calibrate(pl[0], &x->evs[0]);
            for (int j = 0; j < VISION_SETS; j++) {
                temper(pf[j], x->evs[j].n, tf);
                temper(pl[j], x->evs[j].n, tl);
                for (int64_t i = 0; i < x->evs[j].n * 10; i++)
                    pf[j][i] = 0.5f * (pf[j][i] + pl[j][i]);
                s->acc[k][j] = probs_accuracy(pf[j], &x->evs[j]);
            }
            if (dl < sizeof r->detail)
                dl += (size_t)snprintf(r->detail + dl, sizeof r->detail - dl,
                                       " seed %d (%.3g, %.3g)", k, tf, tl);
        }
        free_probs(pf);
        free_probs(pl);
    }
    return st;
}

/* FT+ZeroShot (WiSE-FT): per seed, alpha in {0, 0.1, ..., 1} by ID-val accuracy of the
 * interpolated backbone under the FT head (ties: the larger alpha, toward FT). */
static levi_status run_wise(const vision_ctx *x, method_result *r, levi_error *err) {
    const method_result *ft = find_result(x->done, x->n_done, VM_FT);
    levi_status st = member_key_check(x, ft, err);
    if (st != LEVI_OK) return st;
    levi_vision_ft_model *m = NULL;
    st = ft_open(x, &m, err);
    if (st != LEVI_OK) return st;
    levi_vision_select_result *s = &r->sel;
    memset(s, 0, sizeof *s);
    s->n_lr = 1, s->lr[0] = ft->sel.lr[ft->sel.best_lr_index], s->lr_val_acc[0] = NAN;
    s->n_seeds = ft->sel.n_seeds, s->n_sets = VISION_SETS;
    float *ft_state = levi_xmalloc(levi_vision_ft_state_numel(m) * sizeof(float));
    size_t dl = (size_t)snprintf(r->detail, sizeof r->detail,
                                 "alpha (weight of the fine-tuned backbone; head = FT head; BN "
                                 "statistics recomputed on 2048 train rows for 0 < alpha < 1) "
                                 "by ID-val accuracy, per seed: alpha -> val %%");
    for (int k = 0; k < s->n_seeds && st == LEVI_OK; k++) {
        char path[PATH_MAX + 64];
        seed_path(path, sizeof path, x, VM_FT, k, "");
        st = levi_vision_ft_load(m, path, err);
        if (st != LEVI_OK) break;
        levi_vision_ft_state_get(m, ft_state);
        double best = -1, best_a = 1;
        if (dl < sizeof r->detail)
            dl += (size_t)snprintf(r->detail + dl, sizeof r->detail - dl, "; seed %d:", k);
        for (int a = 0; a <= 10; a++) {
            levi_vision_ft_interpolate(m, ft_state, (float)(a / 10.0));
            if (a > 0 && a < 10) /* the ends stay exactly the two models */
                levi_vision_ft_recompute_bn(m, &x->sets[0].data, x->train_rows,
                                            x->n_train < 2048 ? x->n_train : 2048, x->c->batch);
            const double v =
                levi_vision_ft_accuracy(m, x->evs[0].data, x->evs[0].rows, x->evs[0].n);
            if (v >= best) best = v, best_a = a / 10.0;
            if (dl < sizeof r->detail)
                dl += (size_t)snprintf(r->detail + dl, sizeof r->detail - dl, " %.1f->%.1f",
                                       a / 10.0, 100 * v);
        }
        if (dl < sizeof r->detail)
            dl += (size_t)snprintf(r->detail + dl, sizeof r->detail - dl, " (chosen %.1f)", best_a);
        levi_vision_ft_interpolate(m, ft_state, (float)best_a);
        if (best_a > 0 && best_a < 1)
            levi_vision_ft_recompute_bn(m, &x->sets[0].data, x->train_rows,
                                        x->n_train < 2048 ? x->n_train : 2048, x->c->batch);
        for (int j = 0; j < VISION_SETS; j++)
            s->acc[k][j] = levi_vision_ft_accuracy(m, x->evs[j].data, x->evs[j].rows, x->evs[j].n);
    }
    levi_free(ft_state);
    levi_vision_ft_free(m);
    return st;
}

/* LEVI on the fine-tuned backbone: seed k's features come from FT seed k's backbone (cached
 * under that state file's SHA-256); lr from the grid on seed 0's ID validation. */
static levi_status run_levi_ft(const vision_ctx *x, method_result *r, const float *grid, int n_lr,
                               levi_error *err) {
    const method_result *ft = find_result(x->done, x->n_done, VM_FT);
    levi_status st = member_key_check(x, ft, err);
    if (st != LEVI_OK) return st;
    levi_vision_ft_model *m = NULL;
    st = ft_open(x, &m, err);
    if (st != LEVI_OK) return st;
    levi_vision_select_result *s = &r->sel;
    memset(s, 0, sizeof *s);
    s->n_seeds = ft->sel.n_seeds, s->n_sets = VISION_SETS, s->n_lr = n_lr;
    if (x->c->levi_ft_seeds > 0 && x->c->levi_ft_seeds < s->n_seeds)
        s->n_seeds = x->c->levi_ft_seeds;
    levi_vision_feat_params fp = levi_vision_feat_default_params();
    fp.resolution = x->c->resolution;
    fp.stop = &levi_cli_interrupted;
    levi_vision_model_params mp = levi_vision_model_default_params(LEVI_VISION_LEVI);
    /* Frozen LEVI's lr (chosen on ID validation) when it ran: the grid again would cost as
       much as LEVI itself for a choice made on the same task. */
    const method_result *lv = find_result(x->done, x->n_done, LEVI_VISION_LEVI);
    float lv_lr;
    if (lv) lv_lr = lv->sel.lr[lv->sel.best_lr_index], grid = &lv_lr, n_lr = 1;
    s->n_lr = n_lr;
    for (int k = 0; k < s->n_seeds && st == LEVI_OK; k++) {
        char path[PATH_MAX + 64], sha[65];
        seed_path(path, sizeof path, x, VM_FT, k, "");
        st = levi_vision_ft_load(m, path, err);
        if (st == LEVI_OK) st = levi_sha256_file(path, sha, err);
        levi_vision_extractor *ex = NULL;
        if (st == LEVI_OK)
            st = levi_vision_extractor_open_model(&ex, levi_vision_ft_backbone(m), sha, err);
        vision_set fs[VISION_SETS];
        memset(fs, 0, sizeof fs);
        levi_vision_eval_set evs[VISION_SETS];
        for (int j = 0; j < VISION_SETS && st == LEVI_OK; j++) {
            char name[64];
            snprintf(name, sizeof name, "ft seed %d %s", k, j == 0 ? "id-train" : set_names[j]);
            feat_progress prog = {name, NULL, 0};
            fp.progress = on_feat_progress, fp.progress_user = &prog;
            st = levi_vision_extract(ex, x->cache, &x->sets[j].images, &fp, &fs[j].feats, err);
            levi_progress_finish(prog.bar);
            fs[j].data = x->sets[j].data;
            fs[j].data.feats = fs[j].feats.data;
            evs[j] = x->evs[j];
            evs[j].data = &fs[j].data;
        }
        levi_vision_extractor_close(ex);
        if (st == LEVI_OK) {
            train_progress prog = {"levi-ft", NULL, 0, 0, NAN};
            levi_vision_train_params tp = x->tp;
            tp.progress = on_train_progress, tp.progress_user = &prog;
            levi_vision_select_result one;
            const float *g = k == 0 ? grid : &s->lr[s->best_lr_index];
            st = levi_vision_select(&mp, &tp, g, k == 0 ? n_lr : 1, 1, (uint64_t)k, &fs[0].data,
                                    x->train_rows, x->n_train, x->val_rows, x->n_val, evs,
                                    VISION_SETS, &one, err);
            levi_progress_finish(prog.bar);
            if (st == LEVI_OK && k == 0) {
                for (int i = 0; i < n_lr; i++)
                    s->lr[i] = one.lr[i], s->lr_val_acc[i] = one.lr_val_acc[i];
                s->best_lr_index = one.best_lr_index;
            }
            if (st == LEVI_OK) {
                s->train[k] = one.train[0];
                for (int j = 0; j < VISION_SETS; j++) s->acc[k][j] = one.acc[0][j];
            }
        }
        for (int j = 0; j < VISION_SETS; j++) levi_vision_feats_free(&fs[j].feats);
    }
    if (st == LEVI_OK)
        snprintf(r->detail, sizeof r->detail,
                 "features of seed k from FT seed k's fine-tuned backbone (best epoch, BN running "
                 "statistics), LEVI seed k on them; lr %s",
                 lv ? "= frozen LEVI's (chosen on ID validation)" : "chosen with seed 0");
    levi_vision_ft_free(m);
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
    char model_sha[65] = "";
    if (st == LEVI_OK) memcpy(model_sha, levi_vision_extractor_checkpoint_sha(x), 65);
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
        const char *mname = vm_name(r->method);
        float grid[LEVI_VISION_MAX_GRID];
        int n_lr = 0;
        if (c.n_lrs) {
            n_lr = c.n_lrs;
            memcpy(grid, c.lrs, sizeof(float) * (size_t)c.n_lrs);
        } else if (r->method < LEVI_VISION_METHOD_COUNT) {
            n_lr = levi_vision_default_lr_grid(r->method, grid);
        } else {
            n_lr = levi_vision_default_lr_grid(LEVI_VISION_LEVI, grid); /* paper D.3's grid */
        }
        float lp_grid[LEVI_VISION_MAX_GRID];
        const int n_lp = levi_vision_default_lr_grid(LEVI_VISION_LP, lp_grid);
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
        if (r->method == VM_LP_FT)
            for (int l = 0; l < n_lp; l++)
                n += snprintf(listing + n, sizeof listing - (size_t)n, " raw-probe %g",
                              (double)lp_grid[l]);
        if (r->method == VM_LEVI_FT)
            n += snprintf(listing + n, sizeof listing - (size_t)n, " levi-ft-seeds %d",
                          c.levi_ft_seeds);
        if (r->method >= VM_FT) /* the backbone checkpoint, and the members of post-hoc ones */
            n += snprintf(listing + n, sizeof listing - (size_t)n, " resolution %d model %s",
                          c.resolution, model_sha);
        for (int j = 0; j < i && vm_is_posthoc(r->method); j++)
            if (res[j].method == VM_FT ||
                (r->method == VM_FT_LP && res[j].method == LEVI_VISION_LP) ||
                (r->method == VM_LEVI_FT && res[j].method == LEVI_VISION_LEVI))
                n += snprintf(listing + n, sizeof listing - (size_t)n, " member %s %s",
                              vm_name(res[j].method), res[j].key);
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
        double t0 = levi_now();
        vision_ctx ctx = {&c,       model,   cache, mdir,      sets, evs, train_rows,
                          val_rows, n_train, n_val, feat_keys, tp,   res, i};
        if (r->method < LEVI_VISION_METHOD_COUNT) {
            levi_vision_model_params mp = levi_vision_model_default_params(r->method);
            st = levi_vision_select(&mp, &tp, grid, n_lr, c.seeds, 0, &sets[0].data, train_rows,
                                    n_train, val_rows, n_val, evs, VISION_SETS, &r->sel, &err);
        } else if (r->method <= VM_LP_FT) {
            float lp_lr = 0;
            if (r->method == VM_LP_FT) {
                levi_vision_model_params mp = levi_vision_model_default_params(LEVI_VISION_LP);
                mp.standardize = 0; /* as lp_probe trains it */
                levi_vision_train_params lt = tp;
                lt.progress = NULL;
                levi_vision_select_result *lsel = levi_xmalloc(sizeof *lsel);
                st = levi_vision_select(&mp, &lt, lp_grid, n_lp, 1, 0, &sets[0].data, train_rows,
                                        n_train, val_rows, n_val, evs, 0, lsel, &err);
                lp_lr = lsel->lr[lsel->best_lr_index];
                levi_free(lsel);
            }
            if (st == LEVI_OK) st = run_ft_method(&ctx, r, grid, n_lr, lp_lr, &err);
        } else if (r->method == VM_FT_LP) {
            st = run_ft_lp(&ctx, r, &err);
        } else if (r->method == VM_WISE) {
            st = run_wise(&ctx, r, &err);
        } else {
            st = run_levi_ft(&ctx, r, grid, n_lr, &err);
        }
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
