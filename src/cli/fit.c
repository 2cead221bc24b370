/* `levi fit`: the main job. Loads a dataset (the built-in MovieLens genre-shift spec or a
 * user's spec file), extracts or reuses backbone features, then for each method chooses the
 * learning rate on ID validation with the first seed, trains the remaining seeds, evaluates
 * every run on ID test, all OOD and each OOD group, and writes results.json, results.csv and
 * report.md. Every run is checkpointed under <out>/runs/<method>/seed<k>/ and a finished run
 * (its result.json matches the run's key) is skipped, so an interrupted fit resumes.
 * Not for: the pipeline itself (pipeline.c), report formatting (report.c), re-evaluation
 * (eval.c) or prediction (predict.c). */
#include "cli.h"
#include "fit.h"
#include "report.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void fit_usage(FILE *f) {
    fprintf(
        f,
        "usage: levi fit <spec.json | movielens> [options]\n"
        "\n"
        "Trains LEVI and baselines on cached backbone features, chooses each method's\n"
        "learning rate on ID validation (first seed), trains the other seeds, evaluates on\n"
        "ID test, all OOD rows and each OOD group, and writes results.json, results.csv and\n"
        "report.md. Finished runs are kept under <out>/runs/ and skipped when the command\n"
        "is run again, so an interrupted fit resumes.\n"
        "\n"
        "  movielens            the paper's MovieLens-100K genre shift (built-in spec)\n"
        "  spec.json            a dataset spec (see include/levi/data.h)\n"
        "\n"
        "Options:\n"
        "  --data PATH          data folder/file (overrides the spec's source; default for\n"
        "                       movielens: $LEVI_CACHE/data/ml-100k-recbole)\n"
        "  --model DIR          Hugging Face model folder (default\n"
        "                       $LEVI_CACHE/models/all-MiniLM-L6-v2)\n"
        "  --out DIR            output folder (default runs/<task>/, created)\n"
        "  --methods LIST       comma-separated: levi,a3,a4,a5,lp,layer,bias or all\n"
        "                       (default levi,a4,bias)\n"
        "  --seeds N            seeds per method, 0..N-1 (default 3)\n"
        "  --lrs LIST           learning-rate grid (default: each method's grid from the\n"
        "                       paper, 1e-4,1e-3,1e-2,1e-1; linear probing 1e-3..10)\n"
        "  --epochs N           at most N epochs per run (default 30)\n"
        "  --patience N         early stopping after N epochs without a better ID-val\n"
        "                       metric (default 6)\n"
        "  --batch N            batch size (default 200)\n"
        "  --threads N          threads for kernels and BLAS (default: all cores, or\n"
        "                       OMP_NUM_THREADS)\n"
        "  --subsample N|FRAC   keep N rows (integer) or a fraction in (0, 1) of them,\n"
        "                       proportionally per split (for quick runs)\n"
        "  --cache DIR          feature cache folder, shared with `levi encode` (default\n"
        "                       $LEVI_CACHE/features)\n"
        "  --no-progress        no progress bars (same as LEVI_PROGRESS=0)\n"
        "  --print-spec         print the spec (the built-in one for movielens) and exit\n"
        "  -h, --help           this help\n"
        "\n"
        "Exit codes: 0 ok, 1 failure, 2 usage, 3 bad input, 130 interrupted (rerun to resume).\n");
}

/* ---------------------------------------------------------------------------------------
 * Option values. Every message names the option, what was expected and what was found. */
static int usage_error(const char *fmt, const char *opt, const char *expected, const char *found) {
    fprintf(stderr, fmt, opt, expected, found);
    fputs(" (see levi fit --help)\n", stderr);
    return LEVI_EXIT_USAGE;
}

static int parse_int_opt(const char *opt, const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) {
        char expected[96];
        snprintf(expected, sizeof expected, "an integer in [%ld, %ld]", lo, hi);
        return usage_error("levi fit: %s: expected %s, found '%s'", opt, expected, s);
    }
    *out = (int)v;
    return LEVI_EXIT_OK;
}

static int parse_lrs(const char *s, fit_config *cfg) {
    char buf[1024];
    if (strlen(s) >= sizeof buf || !*s)
        return usage_error("levi fit: %s: expected %s, found '%s'", "--lrs",
                           "a comma-separated list of positive numbers", s);
    snprintf(buf, sizeof buf, "%s", s);
    cfg->n_lrs = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        errno = 0;
        double v = strtod(tok, &end);
        if (end == tok || *end || errno || !(v > 0) || !isfinite(v) || v > 1e6)
            return usage_error("levi fit: %s: expected %s, found '%s'", "--lrs",
                               "positive learning rates such as 1e-4,1e-3", tok);
        if (cfg->n_lrs >= LEVI_MAX_GRID) {
            char expected[64];
            snprintf(expected, sizeof expected, "at most %d learning rates", LEVI_MAX_GRID);
            return usage_error("levi fit: %s: expected %s, found '%s'", "--lrs", expected, s);
        }
        cfg->lrs[cfg->n_lrs++] = (float)v;
    }
    if (cfg->n_lrs == 0)
        return usage_error("levi fit: %s: expected %s, found '%s'", "--lrs",
                           "a comma-separated list of positive numbers", s);
    return LEVI_EXIT_OK;
}

static int parse_methods(const char *s, fit_config *cfg) {
    char buf[1024];
    char expected[256] = "a comma-separated list of methods (";
    for (int m = 0; m < LEVI_METHOD_COUNT; m++) {
        strcat(expected, levi_method_name((levi_method)m));
        strcat(expected, ", ");
    }
    strcat(expected, "or all)");
    if (strlen(s) >= sizeof buf || !*s)
        return usage_error("levi fit: %s: expected %s, found '%s'", "--methods", expected, s);
    snprintf(buf, sizeof buf, "%s", s);
    cfg->n_methods = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int ids[LEVI_METHOD_COUNT], n = 0;
        if (strcmp(tok, "all") == 0) {
            for (int m = 0; m < LEVI_METHOD_COUNT; m++) ids[n++] = m;
        } else {
            int m = levi_method_parse(tok);
            if (m < 0)
                return usage_error("levi fit: %s: unknown method '%s'; expected %s", "--methods",
                                   tok, expected);
            ids[n++] = m;
        }
        for (int i = 0; i < n; i++) {
            int dup = 0;
            for (int j = 0; j < cfg->n_methods; j++) dup |= cfg->methods[j] == ids[i];
            if (!dup) cfg->methods[cfg->n_methods++] = ids[i];
        }
    }
    if (cfg->n_methods == 0)
        return usage_error("levi fit: %s: expected %s, found '%s'", "--methods", expected, s);
    return LEVI_EXIT_OK;
}

static int parse_subsample(const char *s, fit_config *cfg) {
    char *end;
    errno = 0;
    int integer = strspn(s, "0123456789") == strlen(s) && *s;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || !(v > 0) || (!integer && v > 1) ||
        (integer && v > 9e15))
        return usage_error("levi fit: %s: expected %s, found '%s'", "--subsample",
                           "a row count (integer >= 1) or a fraction in (0, 1]", s);
    if (integer) {
        cfg->subsample_frac = 1;
        cfg->subsample_rows = (int64_t)v;
    } else {
        cfg->subsample_frac = v;
        cfg->subsample_rows = 0;
    }
    return LEVI_EXIT_OK;
}

/* Absolute form of a path that may not exist yet (relative to the current folder). */
static void absolute_path(const char *in, char *out, size_t cap) {
    if (in[0] == '/') {
        snprintf(out, cap, "%s", in);
        return;
    }
    char cwd[FIT_PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) {
        snprintf(out, cap, "%s", in);
        return;
    }
    fit_path(out, cap, "%s/%s", cwd, in);
}

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

typedef struct fit_args {
    fit_config cfg;
    const char *data, *model, *out, *cache;
    int print_spec, help;
} fit_args;

static int parse_fit_args(int argc, char **argv, fit_args *a) {
    fit_config *cfg = &a->cfg;
    levi_train_params tp = levi_train_default_params();
    memset(a, 0, sizeof *a);
    cfg->seeds = 3;
    cfg->epochs = tp.max_epochs;
    cfg->patience = tp.patience;
    cfg->batch = tp.batch_size;
    cfg->subsample_frac = 1;
    const char *target = NULL;
    int methods_given = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            a->help = 1;
            return LEVI_EXIT_OK;
        }
        if (arg[0] != '-' || arg[1] == 0) {
            if (target) {
                fprintf(stderr,
                        "levi fit: unexpected argument '%s' (the dataset is already '%s'; see "
                        "levi fit --help)\n",
                        arg, target);
                return LEVI_EXIT_USAGE;
            }
            target = arg;
            continue;
        }
        /* --name VALUE or --name=VALUE */
        char name[64];
        const char *value = NULL;
        const char *eq = strchr(arg, '=');
        size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
        if (len >= sizeof name) len = sizeof name - 1;
        memcpy(name, arg, len);
        name[len] = 0;
        if (eq) value = eq + 1;
        static const char *const flags[] = {"--no-progress", "--print-spec"};
        static const char *const with_value[] = {
            "--data",   "--model",    "--out",   "--methods", "--seeds",     "--lrs",
            "--epochs", "--patience", "--batch", "--threads", "--subsample", "--cache"};
        int is_flag = 0, takes_value = 0;
        for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++)
            is_flag |= strcmp(name, flags[k]) == 0;
        for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++)
            takes_value |= strcmp(name, with_value[k]) == 0;
        if (!is_flag && !takes_value) {
            fprintf(stderr, "levi fit: unknown option '%s' (see levi fit --help)\n", name);
            return LEVI_EXIT_USAGE;
        }
        if (is_flag) {
            if (value) {
                fprintf(stderr, "levi fit: %s takes no value, found '%s'\n", name, value);
                return LEVI_EXIT_USAGE;
            }
            if (strcmp(name, "--no-progress") == 0) setenv("LEVI_PROGRESS", "0", 1);
            if (strcmp(name, "--print-spec") == 0) a->print_spec = 1;
            continue;
        }
        if (!value) {
            if (i + 1 >= argc) {
                fprintf(stderr, "levi fit: %s expects a value (see levi fit --help)\n", name);
                return LEVI_EXIT_USAGE;
            }
            value = argv[++i];
        }
        int rc = LEVI_EXIT_OK;
        if (strcmp(name, "--data") == 0)
            a->data = value;
        else if (strcmp(name, "--model") == 0)
            a->model = value;
        else if (strcmp(name, "--out") == 0)
            a->out = value;
        else if (strcmp(name, "--cache") == 0)
            a->cache = value;
        else if (strcmp(name, "--methods") == 0) {
            rc = parse_methods(value, cfg);
            methods_given = 1;
        } else if (strcmp(name, "--seeds") == 0)
            rc = parse_int_opt(name, value, 1, FIT_MAX_SEEDS, &cfg->seeds);
        else if (strcmp(name, "--lrs") == 0)
            rc = parse_lrs(value, cfg);
        else if (strcmp(name, "--epochs") == 0)
            rc = parse_int_opt(name, value, 1, LEVI_MAX_EPOCHS, &cfg->epochs);
        else if (strcmp(name, "--patience") == 0)
            rc = parse_int_opt(name, value, 1, LEVI_MAX_EPOCHS, &cfg->patience);
        else if (strcmp(name, "--batch") == 0)
            rc = parse_int_opt(name, value, 1, 1 << 20, &cfg->batch);
        else if (strcmp(name, "--threads") == 0)
            rc = parse_int_opt(name, value, 1, 4096, &cfg->threads);
        else if (strcmp(name, "--subsample") == 0)
            rc = parse_subsample(value, cfg);
        if (rc != LEVI_EXIT_OK) return rc;
        if (!*value &&
            (a->data == value || a->model == value || a->out == value || a->cache == value)) {
            fprintf(stderr, "levi fit: %s: expected a path, found an empty string\n", name);
            return LEVI_EXIT_USAGE;
        }
    }
    if (!target) {
        fprintf(stderr, "levi fit: missing the dataset: expected 'movielens' or a spec file "
                        "(see levi fit --help)\n");
        return LEVI_EXIT_USAGE;
    }
    snprintf(cfg->target, sizeof cfg->target, "%s", target);
    if (!methods_given) {
        static const int defaults[] = {LEVI_METHOD_LEVI, LEVI_METHOD_A4, LEVI_METHOD_BIAS};
        cfg->n_methods = 3;
        memcpy(cfg->methods, defaults, sizeof defaults);
    }
    return LEVI_EXIT_OK;
}

/* Resolves paths: spec, data, model, cache, out. Missing files are bad input (exit 3). */
static int resolve_paths(fit_args *a) {
    fit_config *cfg = &a->cfg;
    char c[FIT_PATH_MAX];
    fit_default_cache(c, sizeof c);
    absolute_path(c, cfg->cache, sizeof cfg->cache);
    if (a->cache)
        absolute_path(a->cache, cfg->features, sizeof cfg->features);
    else
        fit_path(cfg->features, sizeof cfg->features, "%s/features", cfg->cache);
    int builtin = strcmp(cfg->target, "movielens") == 0;
    if (!builtin) {
        if (!is_file(cfg->target)) {
            fprintf(stderr,
                    "levi fit: %s: cannot open the spec file: %s (expected 'movielens' or "
                    "a spec JSON file)\n",
                    cfg->target, is_dir(cfg->target) ? "is a directory" : strerror(errno));
            return LEVI_EXIT_INPUT;
        }
        if (!realpath(cfg->target, cfg->spec_path)) {
            fprintf(stderr, "levi fit: %s: %s\n", cfg->target, strerror(errno));
            return LEVI_EXIT_INPUT;
        }
    }
    if (a->data) {
        if (access(a->data, R_OK) != 0) {
            fprintf(stderr, "levi fit: --data %s: %s (expected a readable data folder or file)\n",
                    a->data, strerror(errno));
            return LEVI_EXIT_INPUT;
        }
        if (!realpath(a->data, cfg->data)) snprintf(cfg->data, sizeof cfg->data, "%s", a->data);
    }
    int need_model = 0;
    for (int i = 0; i < cfg->n_methods; i++)
        need_model |= fit_method_needs_features(cfg->methods[i]);
    if (need_model) {
        char m[FIT_PATH_MAX];
        if (a->model)
            snprintf(m, sizeof m, "%s", a->model);
        else
            fit_path(m, sizeof m, "%s/models/all-MiniLM-L6-v2", cfg->cache);
        char probe[FIT_PATH_MAX + 32];
        fit_path(probe, sizeof probe, "%s/model.safetensors", m);
        if (!is_file(probe)) {
            fprintf(stderr,
                    "levi fit: %s: no model.safetensors in the model folder (expected a Hugging "
                    "Face folder of all-MiniLM-L6-v2; run scripts/setup.sh or pass --model DIR)\n",
                    m);
            return LEVI_EXIT_INPUT;
        }
        if (!realpath(m, cfg->model)) snprintf(cfg->model, sizeof cfg->model, "%s", m);
    }
    char out[FIT_PATH_MAX];
    if (a->out)
        snprintf(out, sizeof out, "%s", a->out);
    else {
        /* runs/<spec base name without .json>/ */
        const char *base = strrchr(cfg->target, '/');
        base = base ? base + 1 : cfg->target;
        char name[256];
        fit_path(name, sizeof name, "%s", base);
        char *dot = strrchr(name, '.');
        if (dot && dot != name) *dot = 0;
        fit_path(out, sizeof out, "runs/%s", name);
    }
    absolute_path(out, cfg->out, sizeof cfg->out);
    return LEVI_EXIT_OK;
}

/* ---------------------------------------------------------------------------------------
 * One training run. */
static double set_value(const cJSON *result, const char *name);
typedef struct run_progress {
    levi_progress *bar; /* the CLI's progress bar (cli.h) */
    int64_t n_train;
    int batch;
} run_progress;

static void on_train_progress(void *user, const levi_train_progress *p) {
    run_progress *rp = user;
    int64_t done = (int64_t)(p->epoch - 1) * rp->n_train + p->step * rp->batch;
    int64_t cap = (int64_t)p->epoch * rp->n_train;
    if (done > cap) done = cap;
    char extra[128];
    if (p->epoch_done)
        snprintf(extra, sizeof extra, "epoch %d/%d loss %.4f val %.4f%s", p->epoch, p->max_epochs,
                 p->loss, p->val_metric, p->improved ? " *" : "");
    else
        snprintf(extra, sizeof extra, "epoch %d/%d loss %.4f %.0f ex/s", p->epoch, p->max_epochs,
                 p->loss, p->examples_per_s);
    levi_progress_update(rp->bar, done, extra);
}

typedef struct fit_state {
    fit_config *cfg;
    fit_context *ctx;
} fit_state;

static void run_key(fit_state *fs, const levi_model *m, float lr, int seed, char key[65]) {
    const fit_config *cfg = fs->cfg;
    char head[1024];
    snprintf(head, sizeof head,
             "levi-run-v1\ndataset %s\nfeatures %s\nlr %.9g\nseed %d\nepochs %d\npatience %d\n"
             "batch %d\nconfig ",
             fs->ctx->checksum, fs->ctx->has_features ? fs->ctx->feat_info.key : "none", (double)lr,
             seed, cfg->epochs, cfg->patience, cfg->batch);
    const char *mc = levi_model_config_json(m);
    size_t a = strlen(head), b = strlen(mc);
    char *buf = levi_xmalloc(a + b + 1);
    memcpy(buf, head, a);
    memcpy(buf + a, mc, b + 1);
    levi_sha256_hex(buf, a + b, key);
    levi_free(buf);
}

static const char *result_key(const cJSON *r) {
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(r, "key");
    return cJSON_IsString(k) ? k->valuestring : "";
}

static levi_head_params head_params_for(fit_state *fs, int method) {
    levi_head_params hp = levi_head_default_params((levi_method)method);
    if (method == LEVI_METHOD_BIAS) {
        /* The bias floor is user + item biases; find those columns by name when the dataset
           has them, since the spec's column order need not put them first. */
        int u = levi_dataset_find_categorical(fs->ctx->ds, "user_id");
        int it = levi_dataset_find_categorical(fs->ctx->ds, "item_id");
        if (u >= 0 && it >= 0 && u < 64 && it < 64) hp.bias_cols = (1ull << u) | (1ull << it);
    }
    return hp;
}

/* Trains (or finds finished) the run of `method` at lr with seed in dir. On success *result
 * is the run-result JSON (caller frees). Returns an exit code. */
static int run_one(fit_state *fs, int method, float lr, int seed, const char *dir,
                   const char *label, cJSON **result) {
    *result = NULL;
    fit_context *ctx = fs->ctx;
    levi_error err = {0};
    levi_head_params hp = head_params_for(fs, method);
    levi_model *m = NULL;
    levi_status st = levi_model_init(&m, &hp, &ctx->td, &err);
    if (st != LEVI_OK) return fit_fail("fit", &err);
    char key[65];
    run_key(fs, m, lr, seed, key);

    char result_path[FIT_PATH_MAX + 32], config_path[FIT_PATH_MAX + 32];
    char ckpt_path[FIT_PATH_MAX + 32], state_path[FIT_PATH_MAX + 32];
    snprintf(result_path, sizeof result_path, "%s/result.json", dir);
    snprintf(config_path, sizeof config_path, "%s/config.json", dir);
    snprintf(ckpt_path, sizeof ckpt_path, "%s/model.safetensors", dir);
    snprintf(state_path, sizeof state_path, "%s/state.safetensors", dir);

    if (is_file(result_path)) {
        levi_error e2;
        cJSON *old = fit_read_json(result_path, &e2);
        if (old && strcmp(result_key(old), key) == 0) {
            const cJSON *sets = cJSON_GetObjectItemCaseSensitive(old, "sets");
            const cJSON *s0 = cJSON_GetArrayItem(sets, 0);
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(s0, "value");
            printf("%s: finished earlier (%s %.4f), skipped\n", label,
                   cJSON_IsString(cJSON_GetObjectItemCaseSensitive(s0, "name"))
                       ? cJSON_GetObjectItemCaseSensitive(s0, "name")->valuestring
                       : "?",
                   cJSON_IsNumber(v) ? v->valuedouble : NAN);
            levi_model_free(m);
            *result = old;
            return LEVI_EXIT_OK;
        }
        if (old) printf("%s: settings changed since the saved run; training again\n", label);
        cJSON_Delete(old);
    }
    if ((st = levi_mkdirs(dir, &err)) != LEVI_OK) {
        levi_model_free(m);
        return fit_fail("fit", &err);
    }
    /* Resume mid-run only when the saved state belongs to this very run. */
    int resume = 0;
    {
        levi_error e2;
        cJSON *oc = is_file(config_path) ? fit_read_json(config_path, &e2) : NULL;
        resume = oc && strcmp(result_key(oc), key) == 0 && is_file(state_path);
        cJSON_Delete(oc);
        if (!resume) {
            unlink(state_path);
            unlink(ckpt_path);
        }
    }
    cJSON *conf = cJSON_CreateObject();
    cJSON_AddStringToObject(conf, "format", "levi-run-config");
    cJSON_AddNumberToObject(conf, "version", 1);
    cJSON_AddStringToObject(conf, "key", key);
    cJSON_AddStringToObject(conf, "method", levi_method_name((levi_method)method));
    cJSON_AddNumberToObject(conf, "seed", seed);
    cJSON_AddNumberToObject(conf, "lr", fit_float_json(lr));
    cJSON_AddNumberToObject(conf, "epochs", fs->cfg->epochs);
    cJSON_AddNumberToObject(conf, "patience", fs->cfg->patience);
    cJSON_AddNumberToObject(conf, "batch", fs->cfg->batch);
    cJSON_AddStringToObject(conf, "dataset_checksum", ctx->checksum);
    cJSON_AddStringToObject(conf, "features_key", ctx->has_features ? ctx->feat_info.key : "");
    cJSON *mc = cJSON_Parse(levi_model_config_json(m));
    cJSON_AddItemToObject(conf, "model", mc ? mc : cJSON_CreateNull());
    st = fit_write_json(config_path, conf, &err);
    cJSON_Delete(conf);
    if (st != LEVI_OK) {
        levi_model_free(m);
        return fit_fail("fit", &err);
    }

    levi_train_params tp = levi_train_default_params();
    tp.lr = lr;
    tp.batch_size = fs->cfg->batch;
    tp.max_epochs = fs->cfg->epochs;
    tp.patience = fs->cfg->patience;
    tp.seed = (uint64_t)seed;
    tp.ckpt_path = ckpt_path;
    tp.state_path = state_path;
    tp.resume = resume;
    tp.stop_flag = &levi_cli_interrupted;
    run_progress rp = {NULL, ctx->n_train, fs->cfg->batch};
    /* The bias model is a closed-form fit without steps to show. */
    if (method != LEVI_METHOD_BIAS) {
        rp.bar = levi_progress_start(label, (int64_t)fs->cfg->epochs * ctx->n_train, "ex");
        tp.progress = on_train_progress;
        tp.progress_user = &rp;
        tp.progress_every = 10;
    }
    levi_train_result *tr = levi_xcalloc(1, sizeof *tr);
    st = levi_train(m, &ctx->td, ctx->train, ctx->n_train, ctx->val, ctx->n_val, &tp, tr, &err);
    levi_progress_finish(rp.bar);
    if (method == LEVI_METHOD_BIAS && st == LEVI_OK)
        printf("%s: fitted in %.2f s (ID val %.4f)\n", label, tr->seconds, tr->best_val_metric);
    int diverged = 0;
    if (st == LEVI_ERR_NUMERIC) {
        /* A learning rate too large for the method: the run counts as the worst, the
           others go on. */
        fprintf(stderr, "levi fit: %s: %s; counted as diverged\n", label, err.msg);
        diverged = 1;
        st = LEVI_OK;
    }
    if (st == LEVI_OK && !tr->finished && !diverged)
        st = levi_errorf(&err, LEVI_ERR_INTERRUPTED, "%s stopped before finishing", label);
    if (st != LEVI_OK) {
        levi_free(tr);
        levi_model_free(m);
        if (st == LEVI_ERR_INTERRUPTED) levi_error_prefix(&err, "%s: ", label);
        return fit_fail("fit", &err);
    }

    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "format", "levi-run-result");
    cJSON_AddNumberToObject(r, "version", 1);
    cJSON_AddStringToObject(r, "method", levi_method_name((levi_method)method));
    cJSON_AddNumberToObject(r, "seed", seed);
    cJSON_AddNumberToObject(r, "lr", fit_float_json(lr));
    cJSON_AddStringToObject(r, "metric", ctx->lower_is_better ? "rmse" : "accuracy");
    cJSON_AddStringToObject(r, "key", key);
    cJSON *t = cJSON_AddObjectToObject(r, "train");
    cJSON_AddNumberToObject(t, "epochs_run", tr->epochs_run);
    cJSON_AddNumberToObject(t, "best_epoch", tr->best_epoch);
    cJSON_AddNumberToObject(t, "best_val", tr->best_val_metric);
    cJSON_AddBoolToObject(t, "diverged", diverged || tr->diverged);
    cJSON_AddBoolToObject(t, "stopped_early", tr->stopped_early);
    cJSON_AddNumberToObject(t, "steps", (double)tr->steps);
    cJSON_AddNumberToObject(t, "seconds", tr->seconds);
    cJSON_AddNumberToObject(t, "examples_per_s", tr->examples_per_s);
    cJSON *lh = cJSON_AddArrayToObject(t, "loss_history");
    cJSON *vh = cJSON_AddArrayToObject(t, "val_history");
    for (int e = 0; e < tr->n_history; e++) {
        cJSON_AddItemToArray(lh, cJSON_CreateNumber(tr->loss_history[e]));
        cJSON_AddItemToArray(vh, cJSON_CreateNumber(tr->val_history[e]));
    }
    levi_free(tr);
    if (diverged) {
        /* No usable weights: every set's metric is NaN (JSON null). */
        cJSON *sets = cJSON_AddArrayToObject(r, "sets");
        cJSON_AddArrayToObject(r, "adapters");
        for (int k = 0; k < ctx->n_sets; k++) {
            cJSON *s = cJSON_CreateObject();
            cJSON_AddStringToObject(s, "name", ctx->sets[k].name);
            cJSON_AddNumberToObject(s, "n", (double)ctx->sets[k].n);
            cJSON_AddNullToObject(s, "value");
            cJSON_AddArrayToObject(s, "adapters");
            cJSON_AddItemToArray(sets, s);
        }
    } else if ((st = fit_evaluate_run(ctx, m, r, &err)) != LEVI_OK) {
        cJSON_Delete(r);
        levi_model_free(m);
        return fit_fail("fit", &err);
    }
    levi_model_free(m);
    if (method != LEVI_METHOD_BIAS) {
        const cJSON *t2 = cJSON_GetObjectItemCaseSensitive(r, "train");
        printf("%s: ID val %.4f, ID test %.4f, OOD %.4f (best epoch %.0f of %.0f, %.1f s)\n", label,
               set_value(r, "id_val"), set_value(r, "id_test"), set_value(r, "ood"),
               cJSON_GetObjectItemCaseSensitive(t2, "best_epoch")->valuedouble,
               cJSON_GetObjectItemCaseSensitive(t2, "epochs_run")->valuedouble,
               cJSON_GetObjectItemCaseSensitive(t2, "seconds")->valuedouble);
        fflush(stdout);
    }
    /* The result goes last: its presence marks the run finished. */
    if ((st = fit_write_json(result_path, r, &err)) != LEVI_OK) {
        cJSON_Delete(r);
        return fit_fail("fit", &err);
    }
    *result = fit_json_roundtrip(r);
    return LEVI_EXIT_OK;
}

static double set_value(const cJSON *result, const char *name) {
    const cJSON *s;
    cJSON_ArrayForEach(s, cJSON_GetObjectItemCaseSensitive(result, "sets")) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(s, "name");
        if (cJSON_IsString(n) && strcmp(n->valuestring, name) == 0) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, "value");
            return cJSON_IsNumber(v) ? v->valuedouble : NAN;
        }
    }
    return NAN;
}

static int better(int lower_is_better, double a, double b) {
    if (!isfinite(a)) return 0;
    if (!isfinite(b)) return 1;
    return lower_is_better ? a < b : a > b;
}

/* Removes a run folder's known files and the folder (never anything else). */
static void remove_run_dir(const char *dir) {
    static const char *const files[] = {"result.json", "config.json", "model.safetensors",
                                        "state.safetensors"};
    char p[FIT_PATH_MAX + 32];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
}

/* One method: learning-rate choice on ID val with seed 0, then the other seeds. Adds the
 * method's entry to `methods`. */
static int fit_method(fit_state *fs, int method, cJSON *methods) {
    const fit_config *cfg = fs->cfg;
    const char *name = levi_method_name((levi_method)method);
    float grid[LEVI_MAX_GRID];
    int n_lr = fit_lr_grid(cfg, method, grid);
    double lr_val[LEVI_MAX_GRID];
    int best = 0;
    char dir[FIT_PATH_MAX], label[128];
    char seed0_dir[FIT_PATH_MAX];
    fit_run_dir(cfg, method, 0, seed0_dir, sizeof seed0_dir);
    int rc;
    cJSON *seed0 = NULL;
    printf("\n== %s: %s ==\n", name, levi_report_method_label(name));
    if (n_lr == 1) {
        lr_val[0] = NAN;
    } else {
        /* Every candidate is a full seed-0 run in lr-search/; the winner's folder becomes
           seed0/ so it is not trained twice. */
        for (int i = 0; i < n_lr; i++) {
            fit_search_dir(cfg, method, grid[i], dir, sizeof dir);
            char s0r[FIT_PATH_MAX + 32];
            snprintf(s0r, sizeof s0r, "%s/result.json", seed0_dir);
            cJSON *r = NULL;
            /* A winner already moved to seed0/ keeps its key there. */
            levi_error e2;
            cJSON *moved = is_file(s0r) ? fit_read_json(s0r, &e2) : NULL;
            const cJSON *mlr = cJSON_GetObjectItemCaseSensitive(moved, "lr");
            if (moved && !is_dir(dir) && cJSON_IsNumber(mlr) &&
                mlr->valuedouble == fit_float_json(grid[i])) {
                snprintf(dir, sizeof dir, "%s", seed0_dir);
            }
            cJSON_Delete(moved);
            snprintf(label, sizeof label, "%s lr %g seed 0", name, (double)grid[i]);
            if ((rc = run_one(fs, method, grid[i], 0, dir, label, &r)) != LEVI_EXIT_OK) return rc;
            lr_val[i] = set_value(r, "id_val");
            cJSON_Delete(r);
            if (levi_cli_interrupted) return LEVI_EXIT_INTERRUPTED;
        }
        for (int i = 1; i < n_lr; i++)
            if (better(fs->ctx->lower_is_better, lr_val[i], lr_val[best])) best = i;
        printf("%s: learning rate %g chosen on ID validation (", name, (double)grid[best]);
        for (int i = 0; i < n_lr; i++)
            printf("%s%g: %.4f", i ? ", " : "", (double)grid[i], lr_val[i]);
        printf(")\n");
        fit_search_dir(cfg, method, grid[best], dir, sizeof dir);
        if (is_dir(dir)) {
            /* Ties between stale seed0/ files and the winner go to the winner. */
            remove_run_dir(seed0_dir);
            if (rename(dir, seed0_dir) != 0) {
                fprintf(stderr, "levi fit: cannot move %s to %s: %s\n", dir, seed0_dir,
                        strerror(errno));
                return LEVI_EXIT_FAILURE;
            }
        }
    }
    cJSON *entry = cJSON_CreateObject();
    cJSON_AddStringToObject(entry, "method", name);
    cJSON_AddStringToObject(entry, "label", levi_report_method_label(name));
    cJSON *jg = cJSON_AddArrayToObject(entry, "lr_grid");
    cJSON *jv = cJSON_AddArrayToObject(entry, "lr_val");
    cJSON *runs = cJSON_AddArrayToObject(entry, "runs");
    cJSON_AddItemToArray(methods, entry);
    for (int seed = 0; seed < cfg->seeds; seed++) {
        fit_run_dir(cfg, method, seed, dir, sizeof dir);
        snprintf(label, sizeof label, "%s seed %d", name, seed);
        cJSON *r = NULL;
        if ((rc = run_one(fs, method, grid[best], seed, dir, label, &r)) != LEVI_EXIT_OK) return rc;
        if (seed == 0) seed0 = r;
        cJSON_AddItemToArray(runs, r);
        if (levi_cli_interrupted) return LEVI_EXIT_INTERRUPTED;
    }
    if (n_lr == 1) lr_val[0] = set_value(seed0, "id_val");
    for (int i = 0; i < n_lr; i++) {
        cJSON_AddItemToArray(jg, cJSON_CreateNumber(fit_float_json(grid[i])));
        cJSON_AddItemToArray(jv, cJSON_CreateNumber(lr_val[i]));
    }
    cJSON_AddNumberToObject(entry, "chosen_lr", fit_float_json(grid[best]));
    levi_report_summarize_method(entry);
    return LEVI_EXIT_OK;
}

int levi_cmd_fit(int argc, char **argv) {
    double t_start = levi_now();
    fit_args a;
    int rc = parse_fit_args(argc, argv, &a);
    if (rc != LEVI_EXIT_OK) return rc;
    if (a.help) {
        fit_usage(stdout);
        return LEVI_EXIT_OK;
    }
    fit_config *cfg = &a.cfg;
    if (a.print_spec) {
        if (strcmp(cfg->target, "movielens") == 0) {
            fputs(fit_movielens_spec, stdout);
            return LEVI_EXIT_OK;
        }
        levi_error err;
        char *text = NULL;
        size_t len;
        if (levi_read_file(cfg->target, &text, &len, &err) != LEVI_OK) {
            fprintf(stderr, "levi fit: %s\n", err.msg);
            return LEVI_EXIT_INPUT;
        }
        fwrite(text, 1, len, stdout);
        levi_free(text);
        return LEVI_EXIT_OK;
    }
    if ((rc = resolve_paths(&a)) != LEVI_EXIT_OK) return rc;

    fit_context ctx;
    if ((rc = fit_context_open(cfg, "fit", FIT_OPEN_SUMMARY, &ctx)) != LEVI_EXIT_OK) return rc;
    levi_error err = {0};
    /* fit.json records the source actually read, so eval and predict rebuild the same data
       whatever LEVI_DATA_DIR says later. */
    if (!cfg->data[0]) {
        char src[FIT_PATH_MAX];
        levi_error e2;
        if (levi_spec_source_path(ctx.spec, src, sizeof src, &e2) == LEVI_OK)
            fit_path(cfg->data, sizeof cfg->data, "%s", src);
    }
    levi_status st = levi_mkdirs(cfg->out, &err);
    if (st == LEVI_OK) {
        char p[FIT_PATH_MAX + 32];
        cJSON *fj = fit_config_to_json(cfg);
        snprintf(p, sizeof p, "%s/fit.json", cfg->out);
        st = fit_write_json(p, fj, &err);
        cJSON_Delete(fj);
        snprintf(p, sizeof p, "%s/spec.json", cfg->out);
        if (st == LEVI_OK)
            st = levi_write_file_atomic(p, ctx.spec_text, strlen(ctx.spec_text), &err);
    }
    if (st != LEVI_OK) {
        fit_context_close(&ctx);
        return fit_fail("fit", &err);
    }
    printf("output: %s\n", cfg->out);

    fit_state fs = {cfg, &ctx};
    cJSON *results = fit_results_header(cfg, &ctx, "fit");
    cJSON *methods = cJSON_AddArrayToObject(results, "methods");
    double t_train = levi_now();
    for (int i = 0; i < cfg->n_methods && rc == LEVI_EXIT_OK; i++)
        rc = fit_method(&fs, cfg->methods[i], methods);
    if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
    if (rc != LEVI_EXIT_OK) {
        if (rc == LEVI_EXIT_INTERRUPTED)
            fprintf(stderr,
                    "levi fit: interrupted; finished runs are saved under %s/runs; run "
                    "the same command again to resume\n",
                    cfg->out);
        cJSON_Delete(results);
        fit_context_close(&ctx);
        return rc;
    }
    cJSON *w = cJSON_AddObjectToObject(results, "wall_s");
    cJSON_AddNumberToObject(w, "load", ctx.load_seconds);
    cJSON_AddNumberToObject(w, "features", ctx.feature_seconds);
    cJSON_AddNumberToObject(w, "train_and_eval", levi_now() - t_train);
    cJSON_AddNumberToObject(w, "total", levi_now() - t_start);
    st = levi_report_write(cfg->out, results, &err);
    if (st != LEVI_OK) {
        cJSON_Delete(results);
        fit_context_close(&ctx);
        return fit_fail("fit", &err);
    }
    printf("\n");
    levi_report_print_table1(stdout, results);
    printf("\nwrote %s/results.json, results.csv, report.md (%.1f s)\n", cfg->out,
           levi_now() - t_start);
    cJSON_Delete(results);
    fit_context_close(&ctx);
    return LEVI_EXIT_OK;
}
