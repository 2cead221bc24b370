/* `levi fit`: the main job. Loads a dataset (the built-in MovieLens genre-shift spec or a
 * user's spec file), extracts or reuses backbone features, then for each method chooses the
 * learning rate on ID validation with the first seed, trains the remaining seeds, evaluates
 * every run on ID test, all OOD and each OOD group, and writes results.json, results.csv and
 * report.md. Every run is checkpointed under <out>/runs/<method>/seed<k>/ and a finished run
 * (its result.json matches the run's key) is skipped, so an interrupted fit resumes. Order:
 * the cached-feature methods (worker processes, --jobs), the backbone-training baselines
 * (fit_finetune.c), LEVI on their tuned backbones (levi-ht/-ft/-lora, here), the post-hoc
 * ensembles (ensemble.c). `levi experiment` is this command with --methods all by default.
 * Not for: the pipeline itself (pipeline.c), report formatting (report.c), re-evaluation
 * (eval.c) or prediction (predict.c). */
#include "cli.h"
#include "ensemble.h"
#include "fit.h"
#include "fit_finetune.h"
#include "report.h"

#include "levi/cost.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* The subcommand being parsed: "fit", or "experiment" (the same command with --methods all
   by default), for its messages. */
static const char *fit_cmd = "fit";

static void fit_usage(FILE *f, int experiment) {
    if (experiment)
        fprintf(f,
                "usage: levi experiment <spec.json | built-in target> [options]\n"
                "\n"
                "The paper's whole experiment in one command: `levi fit` with --methods all by\n"
                "default, i.e. every method: the cached-feature methods (levi, a3, a4, a5, lp,\n"
                "layer, bias), the per-layer study (layers), the backbone-training baselines\n"
                "(ft, ht, lp-ft, fs, lora), LEVI on their tuned backbones (levi-ht, levi-ft,\n"
                "levi-lora) and the post-hoc ensembles (ft+lp, ft+fs, wise-ft, a1, a2). Each\n"
                "method's learning rate is chosen on ID validation (first seed) from its grid.\n"
                "Every option is `levi fit`'s, below. Finished runs are skipped when the command\n"
                "is run again and a half-finished one resumes from its saved state, so an\n"
                "interrupted experiment resumes. Writes results.json, results.csv and report.md.\n"
                "Backbone training on all of MovieLens takes hours per run on a CPU: use --scale\n"
                "(and --seeds, --lrs, --epochs) for a smaller experiment.\n"
                "\n"
                "`levi fit`'s description follows.\n\n");
    fprintf(f,
            "usage: levi fit <spec.json | built-in target> [options]\n"
            "\n"
            "Trains LEVI and baselines on cached backbone features, chooses each method's\n"
            "learning rate on ID validation (first seed), trains the other seeds, evaluates on\n"
            "ID test, all OOD rows and each OOD group, and writes results.json, results.csv and\n"
            "report.md. Finished runs are kept under <out>/runs/ and skipped when the command\n"
            "is run again, so an interrupted fit resumes.\n"
            "\n"
            "Built-in targets (specs/<name>.json, embedded; --print-spec shows one):\n");
    fit_print_builtins(f);
    fprintf(
        f,
        "  spec.json                  a dataset spec file (see include/levi/data.h)\n"
        "\n"
        "Options:\n"
        "  --data PATH          data folder/file (overrides the spec's source; default for\n"
        "                       movielens: $LEVI_CACHE/data/ml-100k-recbole)\n"
        "  --model DIR          Hugging Face model folder (default\n"
        "                       $LEVI_CACHE/models/all-MiniLM-L6-v2)\n"
        "  --out DIR            output folder (default runs/<task>/, created)\n"
        "  --methods LIST       comma-separated: levi,a3,a4,a5,lp,layer,bias (heads: all\n"
        "                       of these), and the backbone-training baselines\n"
        "                       ft,ht,lp-ft,fs,lora;\n"
        "                       layers: the per-layer study (paper Fig. 4), one method\n"
        "                       layer<k> per feature layer k (0: embeddings), each one\n"
        "                       adapter on that layer; layer<k> alone picks one;\n"
        "                       levi-ht,levi-ft,levi-lora: LEVI (levi's settings and LR\n"
        "                       grid) on the encoder tuned by ht/ft/lora, seed k on\n"
        "                       runs/<ht|ft|lora>/seed<k>/backbone (paper Tables 4, 14;\n"
        "                       adds its base method when not named);\n"
        "                       ft+lp,ft+fs,wise-ft,a1,a2: post-hoc ensembles of the\n"
        "                       finished runs of their members (docs/ensembles.md);\n"
        "                       all: every method above (slow: it trains backbones)\n"
        "                       (default levi,a4,bias; levi,a4 for classification;\n"
        "                       levi experiment: all)\n"
        "  --scale FRAC         fraction of ID-train rows ft,ht,lp-ft,fs,lora train on\n"
        "                       (default 1; a full MiniLM fine-tuning epoch on MovieLens\n"
        "                       is about an hour on one core); levi-* heads train on all\n"
        "                       ID-train rows, as levi does\n"
        "  --seeds N            seeds per method, 0..N-1 (default 3)\n"
        "  --lrs LIST           learning-rate grid (default: each method's grid from the\n"
        "                       paper, 1e-4,1e-3,1e-2,1e-1; linear probing 1e-3..10)\n"
        "  --epochs N           at most N epochs per run (default 30)\n"
        "  --patience N         early stopping after N epochs without a better ID-val\n"
        "                       metric (default 6)\n"
        "  --feature-dropout P  dropout on the backbone features of the adapter methods\n"
        "                       levi, a3, layer<k> (default: the spec's\n"
        "                       hyperparameters.feature_dropout, else 0.5)\n"
        "  --batch N            batch size (default 200)\n"
        "  --precision P        f32 (default) or bf16: the cached-feature heads' training\n"
        "                       products with bfloat16 operands and f32 sums (mixed\n"
        "                       precision: about 1.5x faster steps where the CPU has\n"
        "                       bfloat16 dot products, AVX512_BF16 or AMX; no gain\n"
        "                       without them); weights, optimizer, evaluation and\n"
        "                       backbone training stay f32\n"
        "  --threads N          threads for kernels and BLAS (default: all cores, or\n"
        "                       OMP_NUM_THREADS); with --jobs > 1 only feature\n"
        "                       extraction uses them, every run has one\n"
        "  --jobs N             runs trained side by side, each in its own process with one\n"
        "                       thread (default: the number of online CPUs, at most the\n"
        "                       number of runs left to train); 1: one run after another in\n"
        "                       this process with --threads threads. Same results either\n"
        "                       way as --jobs 1 --threads 1. Backbone-training runs\n"
        "                       (ft, ht, lp-ft, fs, lora) too, a stage at a time, their\n"
        "                       output in <run>/train.log\n"
        "  --subsample N|FRAC   keep N rows (integer) or a fraction in (0, 1) of them,\n"
        "                       proportionally per split (for quick runs)\n"
        "  --cache DIR          feature cache folder, shared with `levi encode` (default\n"
        "                       $LEVI_CACHE/features)\n"
        "  --no-progress        no progress bars (same as LEVI_PROGRESS=0)\n"
        "  --print-spec         print the spec (a built-in target's embedded one) and exit\n"
        "  -h, --help           this help\n"
        "\n"
        "Exit codes: 0 ok, 1 failure, 2 usage, 3 bad input, 130 interrupted (rerun to resume).\n");
}

/* ---------------------------------------------------------------------------------------
 * Option values. Every message names the option, what was expected and what was found. */
/* fmt: the message after "levi <cmd>: ", with three %s (option, expected, found). */
static int usage_error(const char *fmt, const char *opt, const char *expected, const char *found) {
    fprintf(stderr, "levi %s: ", fit_cmd);
    fprintf(stderr, fmt, opt, expected, found);
    fprintf(stderr, " (see levi %s --help)\n", fit_cmd);
    return LEVI_EXIT_USAGE;
}

static int parse_int_opt(const char *opt, const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) {
        char expected[96];
        snprintf(expected, sizeof expected, "an integer in [%ld, %ld]", lo, hi);
        return usage_error("%s: expected %s, found '%s'", opt, expected, s);
    }
    *out = (int)v;
    return LEVI_EXIT_OK;
}

static int parse_lrs(const char *s, fit_config *cfg) {
    char buf[1024];
    if (strlen(s) >= sizeof buf || !*s)
        return usage_error("%s: expected %s, found '%s'", "--lrs",
                           "a comma-separated list of positive numbers", s);
    snprintf(buf, sizeof buf, "%s", s);
    cfg->n_lrs = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        errno = 0;
        double v = strtod(tok, &end);
        if (end == tok || *end || errno || !(v > 0) || !isfinite(v) || v > 1e6)
            return usage_error("%s: expected %s, found '%s'", "--lrs",
                               "positive learning rates such as 1e-4,1e-3", tok);
        if (cfg->n_lrs >= LEVI_MAX_GRID) {
            char expected[64];
            snprintf(expected, sizeof expected, "at most %d learning rates", LEVI_MAX_GRID);
            return usage_error("%s: expected %s, found '%s'", "--lrs", expected, s);
        }
        cfg->lrs[cfg->n_lrs++] = (float)v;
    }
    if (cfg->n_lrs == 0)
        return usage_error("%s: expected %s, found '%s'", "--lrs",
                           "a comma-separated list of positive numbers", s);
    return LEVI_EXIT_OK;
}

/* ---------------------------------------------------------------------------------------
 * Per-layer-study method ids (fit.h: FIT_LAYER_BASE). */
int fit_method_layer(int method) {
    return method >= FIT_LAYER_BASE && method < FIT_LAYER_BASE + FIT_LAYER_MAX
               ? method - FIT_LAYER_BASE
               : -1;
}

const char *fit_layer_method_name(int method) {
    static const char *const names[FIT_LAYER_MAX] = {
        "layer0",  "layer1",  "layer2",  "layer3",  "layer4",  "layer5",  "layer6",  "layer7",
        "layer8",  "layer9",  "layer10", "layer11", "layer12", "layer13", "layer14", "layer15",
        "layer16", "layer17", "layer18", "layer19", "layer20", "layer21", "layer22", "layer23",
        "layer24", "layer25", "layer26", "layer27", "layer28", "layer29", "layer30", "layer31"};
    if (method == FIT_LAYERS_ALL) return "layers";
    int k = fit_method_layer(method);
    return k < 0 ? NULL : names[k];
}

int fit_layer_method_parse(const char *name) {
    if (strcmp(name, "layers") == 0) return FIT_LAYERS_ALL;
    if (strncmp(name, "layer", 5) != 0 || !name[5]) return -1;
    const char *d = name + 5;
    if (strspn(d, "0123456789") != strlen(d) || strlen(d) > 2 || (d[0] == '0' && d[1])) return -1;
    int k = atoi(d);
    return k < FIT_LAYER_MAX ? FIT_LAYER_BASE + k : -1;
}

/* Name of any method id: the per-layer ids here, the rest through pipeline.c. */
static const char *method_name(int method) {
    const char *n = fit_layer_method_name(method);
    return n ? n : fit_method_name(method);
}

/* Run folders and LR grid of any method id: layer<k> runs live under runs/layer<k>/ and use
   LEVI_METHOD_LAYER's grid; the others as pipeline.c says (eval and predict use those). */
static void run_dir(const fit_config *cfg, int method, int seed, char *out, size_t cap) {
    if (fit_method_layer(method) < 0) {
        fit_run_dir(cfg, method, seed, out, cap);
        return;
    }
    fit_path(out, cap, "%s/runs/%s/seed%d", cfg->out, method_name(method), seed);
}

static void search_dir(const fit_config *cfg, int method, float lr, char *out, size_t cap) {
    if (fit_method_layer(method) < 0) {
        fit_search_dir(cfg, method, lr, out, cap);
        return;
    }
    fit_path(out, cap, "%s/runs/%s/lr-search/lr%g", cfg->out, method_name(method), (double)lr);
}

static int lr_grid(const fit_config *cfg, int method, float out[LEVI_MAX_GRID]) {
    return fit_lr_grid(cfg, fit_method_layer(method) >= 0 ? LEVI_METHOD_LAYER : method, out);
}

/* The "methods" array of a fit.json-style object with every id's name (pipeline.c's
   fit_config_to_json names only the ids it knows). */
static void name_methods(cJSON *config, const fit_config *cfg) {
    if (!config) return;
    cJSON *m = cJSON_CreateArray();
    for (int i = 0; i < cfg->n_methods; i++)
        cJSON_AddItemToArray(m, cJSON_CreateString(method_name(cfg->methods[i])));
    cJSON_ReplaceItemInObjectCaseSensitive(config, "methods", m);
}

/* Replaces FIT_LAYERS_ALL by layer0 .. layer<n_layers-1> in place (no duplicates) and checks
   explicit layer<k> against the data's layers. Exit code. */
static int expand_layer_methods(fit_config *cfg, int n_layers) {
    int out[FIT_MAX_METHODS], n = 0;
    for (int i = 0; i < cfg->n_methods; i++) {
        int ids[FIT_LAYER_MAX], c = 0;
        if (cfg->methods[i] == FIT_LAYERS_ALL) {
            for (int k = 0; k < n_layers && k < FIT_LAYER_MAX; k++) ids[c++] = FIT_LAYER_BASE + k;
        } else {
            int k = fit_method_layer(cfg->methods[i]);
            if (k >= n_layers) {
                fprintf(stderr,
                        "levi %s: --methods: layer%d: expected a feature layer in [0, %d] "
                        "(the backbone's features have %d layers)\n",
                        fit_cmd, k, n_layers - 1, n_layers);
                return LEVI_EXIT_USAGE;
            }
            ids[c++] = cfg->methods[i];
        }
        for (int q = 0; q < c; q++) {
            int dup = 0;
            for (int j = 0; j < n; j++) dup |= out[j] == ids[q];
            if (dup) continue;
            if (n >= FIT_MAX_METHODS) {
                fprintf(stderr, "levi %s: --methods: expected at most %d methods\n", fit_cmd,
                        FIT_MAX_METHODS);
                return LEVI_EXIT_USAGE;
            }
            out[n++] = ids[q];
        }
    }
    memcpy(cfg->methods, out, (size_t)n * sizeof out[0]);
    cfg->n_methods = n;
    return LEVI_EXIT_OK;
}

/* The ids "all" stands for: every method levi fit knows, in report order (cached-feature
   methods, the per-layer study, backbone training, tuned LEVI, ensembles). */
static int all_methods(int ids[FIT_MAX_METHODS]) {
    int n = 0;
    for (int m = 0; m < LEVI_METHOD_COUNT; m++) ids[n++] = m;
    ids[n++] = FIT_LAYERS_ALL;
    for (int m = 0; m < LEVI_FT_MODE_COUNT; m++)
        if (m != LEVI_FT_PROBE) ids[n++] = FIT_FT_BASE + m;
    for (int m = 0; m < LEVI_FT_MODE_COUNT; m++)
        if (fit_tuned_base(FIT_TUNED_BASE + m) >= 0) ids[n++] = FIT_TUNED_BASE + m;
    for (int k = 0; k < FIT_ENS_COUNT; k++) ids[n++] = FIT_ENS_BASE + k;
    return n;
}

static int parse_methods(const char *s, fit_config *cfg, int *named_bias) {
    char buf[1024];
    char expected[512] = "a comma-separated list of methods (";
    for (int m = 0; m < LEVI_METHOD_COUNT; m++) {
        strcat(expected, levi_method_name((levi_method)m));
        strcat(expected, ", ");
    }
    strcat(expected, "heads, layers, layer<k>, ft, ht, lp-ft, fs, lora, levi-ht, levi-ft, "
                     "levi-lora, ft+lp, ft+fs, wise-ft, a1, a2 or all)");
    if (strlen(s) >= sizeof buf || !*s)
        return usage_error("%s: expected %s, found '%s'", "--methods", expected, s);
    snprintf(buf, sizeof buf, "%s", s);
    cfg->n_methods = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int ids[FIT_MAX_METHODS], n = 0;
        if (strcmp(tok, "all") == 0) {
            n = all_methods(ids);
        } else if (strcmp(tok, "heads") == 0) {
            for (int m = 0; m < LEVI_METHOD_COUNT; m++) ids[n++] = m;
        } else {
            int m = fit_layer_method_parse(tok);
            if (m < 0) m = fit_method_parse(tok);
            if (m < 0)
                return usage_error("%s: unknown method '%s'; expected %s", "--methods", tok,
                                   expected);
            if (m == LEVI_METHOD_BIAS) *named_bias = 1;
            ids[n++] = m;
        }
        for (int i = 0; i < n; i++) {
            int dup = 0;
            for (int j = 0; j < cfg->n_methods; j++) dup |= cfg->methods[j] == ids[i];
            if (dup) continue;
            if (cfg->n_methods >= FIT_MAX_METHODS) {
                char e2[64];
                snprintf(e2, sizeof e2, "at most %d methods", FIT_MAX_METHODS);
                return usage_error("%s: expected %s, found '%s'", "--methods", e2, s);
            }
            cfg->methods[cfg->n_methods++] = ids[i];
        }
    }
    if (cfg->n_methods == 0)
        return usage_error("%s: expected %s, found '%s'", "--methods", expected, s);
    return LEVI_EXIT_OK;
}

static int parse_subsample(const char *s, fit_config *cfg) {
    char *end;
    errno = 0;
    int integer = strspn(s, "0123456789") == strlen(s) && *s;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || !(v > 0) || (!integer && v > 1) ||
        (integer && v > 9e15))
        return usage_error("%s: expected %s, found '%s'", "--subsample",
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
    int named_bias; /* --methods named bias itself (not through 'all') */
    int jobs;       /* 0: one per online CPU */
    int experiment; /* `levi experiment`: --methods all by default */
} fit_args;

static int parse_fit_args(int argc, char **argv, fit_args *a) {
    fit_config *cfg = &a->cfg;
    levi_train_params tp = levi_train_default_params();
    const int experiment = a->experiment;
    memset(a, 0, sizeof *a);
    a->experiment = experiment;
    cfg->seeds = 3;
    cfg->epochs = tp.max_epochs;
    cfg->patience = tp.patience;
    cfg->batch = tp.batch_size;
    cfg->subsample_frac = 1;
    cfg->ft_scale = 1; /* --scale's documented default: all ID-train rows */
    cfg->feature_dropout = NAN;
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
                        "levi %s: unexpected argument '%s' (the dataset is already '%s'; see "
                        "levi %s --help)\n",
                        fit_cmd, arg, target, fit_cmd);
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
            "--data",      "--model",  "--out",      "--methods", "--seeds",
            "--lrs",       "--epochs", "--patience", "--batch",   "--threads",
            "--subsample", "--cache",  "--jobs",     "--scale",   "--feature-dropout",
            "--precision"};
        int is_flag = 0, takes_value = 0;
        for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++)
            is_flag |= strcmp(name, flags[k]) == 0;
        for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++)
            takes_value |= strcmp(name, with_value[k]) == 0;
        if (!is_flag && !takes_value) {
            fprintf(stderr, "levi %s: unknown option '%s' (see levi %s --help)\n", fit_cmd, name,
                    fit_cmd);
            return LEVI_EXIT_USAGE;
        }
        if (is_flag) {
            if (value) {
                fprintf(stderr, "levi %s: %s takes no value, found '%s'\n", fit_cmd, name, value);
                return LEVI_EXIT_USAGE;
            }
            if (strcmp(name, "--no-progress") == 0) setenv("LEVI_PROGRESS", "0", 1);
            if (strcmp(name, "--print-spec") == 0) a->print_spec = 1;
            continue;
        }
        if (!value) {
            if (i + 1 >= argc) {
                fprintf(stderr, "levi %s: %s expects a value (see levi %s --help)\n", fit_cmd, name,
                        fit_cmd);
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
            rc = parse_methods(value, cfg, &a->named_bias);
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
        else if (strcmp(name, "--jobs") == 0)
            rc = parse_int_opt(name, value, 1, 4096, &a->jobs);
        else if (strcmp(name, "--scale") == 0) {
            char *end;
            double v = strtod(value, &end);
            if (end == value || *end || !(v > 0 && v <= 1))
                rc = usage_error("%s: expected %s, found '%s'", "--scale", "a fraction in (0, 1]",
                                 value);
            cfg->ft_scale = v;
        } else if (strcmp(name, "--feature-dropout") == 0) {
            char *end;
            double v = strtod(value, &end);
            if (end == value || *end || !(v >= 0 && v < 1))
                rc = usage_error("levi fit: %s: expected %s, found '%s'", "--feature-dropout",
                                 "a probability in [0, 1)", value);
            cfg->feature_dropout = (float)v;
        } else if (strcmp(name, "--precision") == 0) {
            cfg->precision = levi_precision_parse(value);
            if (cfg->precision < 0)
                rc = usage_error("levi fit: %s: expected %s, found '%s'", "--precision",
                                 "f32 or bf16", value);
        }
        if (rc != LEVI_EXIT_OK) return rc;
        if (!*value &&
            (a->data == value || a->model == value || a->out == value || a->cache == value)) {
            fprintf(stderr, "levi %s: %s: expected a path, found an empty string\n", fit_cmd, name);
            return LEVI_EXIT_USAGE;
        }
    }
    if (!target) {
        fprintf(stderr,
                "levi %s: missing the dataset: expected a built-in target such as "
                "'movielens' or a spec file (see levi %s --help)\n",
                fit_cmd, fit_cmd);
        return LEVI_EXIT_USAGE;
    }
    snprintf(cfg->target, sizeof cfg->target, "%s", target);
    if (!methods_given && a->experiment) {
        cfg->n_methods = all_methods(cfg->methods);
    } else if (!methods_given) {
        static const int defaults[] = {LEVI_METHOD_LEVI, LEVI_METHOD_A4, LEVI_METHOD_BIAS};
        cfg->n_methods = 3;
        memcpy(cfg->methods, defaults, sizeof defaults);
    }
    /* LEVI on a tuned backbone reads the backbones its base method saves: naming levi-ft
       without ft adds ft (its runs are results in their own right, Table 14 puts them side by
       side). */
    for (int i = 0, n = cfg->n_methods; i < n; i++) {
        const int base = fit_tuned_base(cfg->methods[i]);
        int have = base < 0;
        for (int j = 0; j < cfg->n_methods; j++) have |= cfg->methods[j] == base;
        if (have) continue;
        if (cfg->n_methods >= FIT_MAX_METHODS) {
            fprintf(stderr, "levi %s: --methods: expected at most %d methods\n", fit_cmd,
                    FIT_MAX_METHODS);
            return LEVI_EXIT_USAGE;
        }
        cfg->methods[cfg->n_methods++] = base;
        printf("methods: %s added (%s trains on the backbones its runs save)\n",
               fit_method_name(base), fit_method_name(cfg->methods[i]));
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
    int builtin = fit_builtin_spec(cfg->target) != NULL;
    if (!builtin) {
        if (!is_file(cfg->target)) {
            fprintf(stderr,
                    "levi %s: %s: cannot open the spec file: %s (expected a built-in "
                    "target listed by levi fit --help, or a spec JSON file)\n",
                    fit_cmd, cfg->target, is_dir(cfg->target) ? "is a directory" : strerror(errno));
            return LEVI_EXIT_INPUT;
        }
        if (!realpath(cfg->target, cfg->spec_path)) {
            fprintf(stderr, "levi %s: %s: %s\n", fit_cmd, cfg->target, strerror(errno));
            return LEVI_EXIT_INPUT;
        }
    }
    if (a->data) {
        if (access(a->data, R_OK) != 0) {
            fprintf(stderr, "levi %s: --data %s: %s (expected a readable data folder or file)\n",
                    fit_cmd, a->data, strerror(errno));
            return LEVI_EXIT_INPUT;
        }
        if (!realpath(a->data, cfg->data)) snprintf(cfg->data, sizeof cfg->data, "%s", a->data);
    }
    int need_model = 0;
    for (int i = 0; i < cfg->n_methods; i++)
        need_model |= fit_method_needs_features(cfg->methods[i]) || cfg->methods[i] >= FIT_FT_BASE;
    {
        /* Ensemble members must be fitted in the same call: fail before any training. */
        int rc = fit_ensembles_check(cfg);
        if (rc != LEVI_EXIT_OK) return rc;
    }
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
                    "levi %s: %s: no model.safetensors in the model folder (expected a Hugging "
                    "Face folder of all-MiniLM-L6-v2; run scripts/setup.sh or pass --model DIR)\n",
                    fit_cmd, m);
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
/* What a worker process (--jobs N) sends its parent about its run's training, one write()
 * each: a record is far below PIPE_BUF, so it arrives whole and never interleaved. */
typedef struct run_msg {
    int32_t epoch, max_epochs, epoch_done, improved;
    int64_t step, steps_per_epoch;
    double loss, val_metric, examples_per_s;
} run_msg;

typedef struct run_progress {
    levi_progress *bar; /* the CLI's progress bar (cli.h), when training in this process */
    int fd;             /* >= 0 in a worker process: the pipe to the parent, instead of bar */
    int64_t n_train;
    int batch;
} run_progress;

static void on_train_progress(void *user, const levi_train_progress *p) {
    run_progress *rp = user;
    if (rp->fd >= 0) {
        run_msg msg = {p->epoch,           p->max_epochs, p->epoch_done, p->improved,      p->step,
                       p->steps_per_epoch, p->loss,       p->val_metric, p->examples_per_s};
        /* A parent gone away is noticed by the stop flag (SIGTERM on its death), not here. */
        ssize_t w = write(rp->fd, &msg, sizeof msg);
        (void)w;
        return;
    }
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
    int progress_fd; /* -1, or in a worker process the pipe for run_msg records */
    /* Tuned LEVI (levi-ht, ...): the encoder folder ctx's features come from and the key of
       the run that tuned it, recorded in the run's config and result; NULL otherwise. */
    const char *backbone, *backbone_run_key;
} fit_state;

static void run_key(fit_state *fs, const levi_model *m, float lr, int seed, char key[65]) {
    const fit_config *cfg = fs->cfg;
    char head[1024];
    snprintf(head, sizeof head,
             "levi-run-v1\ndataset %s\nfeatures %s\nlr %.9g\nseed %d\nepochs %d\npatience %d\n"
             "batch %d\n%sconfig ",
             fs->ctx->checksum, fs->ctx->has_features ? fs->ctx->feat_info.key : "none", (double)lr,
             seed, cfg->epochs, cfg->patience, cfg->batch,
             cfg->precision == LEVI_PRECISION_BF16 ? "precision bf16\n" : "");
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
    int layer = fit_method_layer(method);
    levi_method base = layer >= 0                    ? LEVI_METHOD_LAYER
                       : fit_tuned_base(method) >= 0 ? LEVI_METHOD_LEVI /* levi's settings */
                                                     : (levi_method)method;
    levi_head_params hp = levi_head_default_params(base);
    if (layer >= 0) hp.layer_list[0] = layer;
    /* The task's feature dropout replaces the default of the methods that have one. */
    if (hp.feature_dropout > 0.0f && !isnan(fs->ctx->feature_dropout))
        hp.feature_dropout = fs->ctx->feature_dropout;
    if (method == LEVI_METHOD_BIAS) {
        /* The bias floor is user + item biases; find those columns by name when the dataset
           has them, since the spec's column order need not put them first. */
        int u = levi_dataset_find_categorical(fs->ctx->ds, "user_id");
        int it = levi_dataset_find_categorical(fs->ctx->ds, "item_id");
        if (u >= 0 && it >= 0 && u < 64 && it < 64) hp.bias_cols = (1ull << u) | (1ull << it);
    }
    return hp;
}

/* 1 when the run of `method` at lr with seed has a finished result in dir whose key matches
 * today's settings; then *result is that result (caller frees). announce: print the
 * "finished earlier" or "settings changed" line. m, when not NULL, is the run's model (its
 * configuration is part of the key); else one is made for the key. */
static int run_finished(fit_state *fs, levi_model *m, int method, float lr, int seed,
                        const char *dir, const char *label, int announce, cJSON **result) {
    *result = NULL;
    levi_model *own = NULL;
    if (!m) {
        levi_error err;
        levi_head_params hp = head_params_for(fs, method);
        if (levi_model_init(&own, &hp, &fs->ctx->td, &err) != LEVI_OK) return 0;
        m = own;
    }
    char key[65];
    run_key(fs, m, lr, seed, key);
    levi_model_free(own);
    char result_path[FIT_PATH_MAX + 32];
    snprintf(result_path, sizeof result_path, "%s/result.json", dir);
    if (!is_file(result_path)) return 0;
    levi_error e2;
    cJSON *old = fit_read_json(result_path, &e2);
    if (old && strcmp(result_key(old), key) == 0) {
        if (announce) {
            const cJSON *sets = cJSON_GetObjectItemCaseSensitive(old, "sets");
            const cJSON *s0 = cJSON_GetArrayItem(sets, 0);
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(s0, "value");
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(s0, "name");
            printf("%s: finished earlier (%s %.4f), skipped\n", label,
                   cJSON_IsString(nm) ? nm->valuestring : "?",
                   cJSON_IsNumber(v) ? v->valuedouble : NAN);
        }
        *result = old;
        return 1;
    }
    if (old && announce)
        printf("%s: settings changed since the saved run; training again\n", label);
    cJSON_Delete(old);
    return 0;
}

void fit_add_run_cost(cJSON *result, const fit_config *cfg, const fit_context *ctx,
                      double trainable_params, double head_params, double head_flops,
                      int backbone_layers, double train_seconds, int epochs_run) {
    double bb_params = 0, bb_flops = 0, tokens = NAN;
    if (ctx->has_features && ctx->n > 0 && ctx->feat_info.tokens > 0)
        tokens = (double)ctx->feat_info.tokens / (double)ctx->n;
    if (backbone_layers >= 0) {
        levi_bert_config bc;
        levi_error err;
        char path[FIT_PATH_MAX + 32];
        fit_path(path, sizeof path, "%s/config.json", cfg->model);
        if (cfg->model[0] && levi_bert_config_load(path, &bc, &err) == LEVI_OK) {
            if (backbone_layers > bc.layers) backbone_layers = bc.layers; /* INT_MAX: all */
            bb_params = (double)levi_bert_n_params_through(&bc, backbone_layers);
            bb_flops =
                isfinite(tokens) ? levi_bert_flops_through(&bc, backbone_layers, tokens) : NAN;
        } else {
            bb_params = bb_flops = NAN;
        }
    }
    struct rusage ru;
    double rss = getrusage(RUSAGE_SELF, &ru) == 0 ? (double)ru.ru_maxrss : NAN; /* KiB on Linux */
    cJSON *c = cJSON_AddObjectToObject(result, "cost");
    cJSON_AddNumberToObject(c, "trainable_params", trainable_params);
    cJSON_AddNumberToObject(c, "inference_params", head_params + bb_params);
    cJSON_AddNumberToObject(c, "flops_per_example", head_flops + bb_flops);
    cJSON_AddNumberToObject(c, "backbone_layers", backbone_layers);
    cJSON_AddNumberToObject(c, "mean_tokens", tokens);
    cJSON_AddNumberToObject(c, "seconds_per_epoch",
                            epochs_run > 0 ? train_seconds / epochs_run : NAN);
    cJSON_AddNumberToObject(c, "peak_rss_kib", rss);
}

/* "backbone": {"dir", "run_key", "features_key"} of a tuned-LEVI run (fit_state.backbone). */
static void add_backbone_record(const fit_state *fs, cJSON *o) {
    if (!fs->backbone) return;
    cJSON *b = cJSON_AddObjectToObject(o, "backbone");
    cJSON_AddStringToObject(b, "dir", fs->backbone);
    cJSON_AddStringToObject(b, "run_key", fs->backbone_run_key ? fs->backbone_run_key : "");
    cJSON_AddStringToObject(b, "features_key", fs->ctx->has_features ? fs->ctx->feat_info.key : "");
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

    if (run_finished(fs, m, method, lr, seed, dir, label, 1, result)) {
        levi_model_free(m);
        return LEVI_EXIT_OK;
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
    cJSON_AddStringToObject(conf, "method", method_name(method));
    cJSON_AddNumberToObject(conf, "seed", seed);
    cJSON_AddNumberToObject(conf, "lr", fit_float_json(lr));
    cJSON_AddNumberToObject(conf, "epochs", fs->cfg->epochs);
    cJSON_AddNumberToObject(conf, "patience", fs->cfg->patience);
    cJSON_AddNumberToObject(conf, "batch", fs->cfg->batch);
    cJSON_AddStringToObject(conf, "precision", levi_precision_name(fs->cfg->precision));
    cJSON_AddStringToObject(conf, "dataset_checksum", ctx->checksum);
    cJSON_AddStringToObject(conf, "features_key", ctx->has_features ? ctx->feat_info.key : "");
    cJSON *mc = cJSON_Parse(levi_model_config_json(m));
    cJSON_AddItemToObject(conf, "model", mc ? mc : cJSON_CreateNull());
    add_backbone_record(fs, conf);
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
    tp.precision = (levi_precision)fs->cfg->precision;
    tp.seed = (uint64_t)seed;
    tp.ckpt_path = ckpt_path;
    tp.state_path = state_path;
    tp.resume = resume;
    tp.stop_flag = &levi_cli_interrupted;
    run_progress rp = {NULL, fs->progress_fd, ctx->n_train, fs->cfg->batch};
    /* The bias model is a closed-form fit without steps to show. */
    if (method != LEVI_METHOD_BIAS) {
        if (rp.fd < 0)
            rp.bar = levi_progress_start(label, (int64_t)fs->cfg->epochs * ctx->n_train, "ex");
        tp.progress = on_train_progress;
        tp.progress_user = &rp;
        tp.progress_every = 10;
    }
    levi_train_result *tr = levi_xcalloc(1, sizeof *tr);
    st = levi_train(m, &ctx->td, ctx->train, ctx->n_train, ctx->val, ctx->n_val, &tp, tr, &err);
    levi_progress_finish(rp.bar);
    if (method == LEVI_METHOD_BIAS && st == LEVI_OK) {
        printf("%s: fitted in %.2f s (ID val %.4f)\n", label, tr->seconds, tr->best_val_metric);
        fflush(stdout);
    }
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
    cJSON_AddStringToObject(r, "method", method_name(method));
    cJSON_AddNumberToObject(r, "seed", seed);
    cJSON_AddNumberToObject(r, "lr", fit_float_json(lr));
    cJSON_AddStringToObject(r, "metric", ctx->lower_is_better ? "rmse" : "accuracy");
    cJSON_AddStringToObject(r, "key", key);
    add_backbone_record(fs, r);
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
    double n_params = (double)levi_model_n_params(m);
    fit_add_run_cost(r, fs->cfg, ctx, n_params, n_params, levi_model_flops_per_example(m),
                     levi_model_backbone_depth(m), tr->seconds, tr->epochs_run);
    levi_free(tr);
    if (diverged) {
        fit_result_nan_sets(ctx, r);
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

/* The folder of method's LR-search run at lr: lr-search/lr<value>/, or seed0/ when an
 * earlier fit already moved that run there as the winner (it keeps its key there). */
static void grid_run_dir(const fit_config *cfg, int method, float lr, char *dir, size_t cap) {
    char seed0_dir[FIT_PATH_MAX], search[FIT_PATH_MAX];
    search_dir(cfg, method, lr, search, sizeof search);
    run_dir(cfg, method, 0, seed0_dir, sizeof seed0_dir);
    fit_moved_search_dir(search, seed0_dir, lr, dir, cap);
}

/* Picks the best learning rate of the grid on ID validation (the first of equals), prints
 * the choice and moves the winner's folder to seed0/ so it is not trained twice. Returns an
 * exit code; *best is the grid index. */
static int choose_lr(fit_state *fs, int method, const float *grid, int n_lr, const double *lr_val,
                     int *best) {
    const fit_config *cfg = fs->cfg;
    const char *name = method_name(method);
    *best = 0;
    for (int i = 1; i < n_lr; i++)
        if (better(fs->ctx->lower_is_better, lr_val[i], lr_val[*best])) *best = i;
    printf("%s: learning rate %g chosen on ID validation (", name, (double)grid[*best]);
    for (int i = 0; i < n_lr; i++) printf("%s%g: %.4f", i ? ", " : "", (double)grid[i], lr_val[i]);
    printf(")\n");
    fflush(stdout);
    char dir[FIT_PATH_MAX], seed0_dir[FIT_PATH_MAX];
    search_dir(cfg, method, grid[*best], dir, sizeof dir);
    run_dir(cfg, method, 0, seed0_dir, sizeof seed0_dir);
    if (is_dir(dir)) {
        /* Ties between stale seed0/ files and the winner go to the winner. */
        remove_run_dir(seed0_dir);
        if (rename(dir, seed0_dir) != 0) {
            fprintf(stderr, "levi fit: cannot move %s to %s: %s\n", dir, seed0_dir,
                    strerror(errno));
            return LEVI_EXIT_FAILURE;
        }
    }
    return LEVI_EXIT_OK;
}

/* Appends method's entry (grid, ID-val metric per learning rate, the runs of every seed) to
 * `methods`; takes the results. With a one-entry grid the seed-0 run gives lr_val. */
static void add_method_entry(int method, const float *grid, int n_lr, int best, double *lr_val,
                             int seeds, cJSON **results, cJSON *methods) {
    const char *name = method_name(method);
    cJSON *entry = cJSON_CreateObject();
    cJSON_AddStringToObject(entry, "method", name);
    cJSON_AddStringToObject(entry, "label", levi_report_method_label(name));
    cJSON *jg = cJSON_AddArrayToObject(entry, "lr_grid");
    cJSON *jv = cJSON_AddArrayToObject(entry, "lr_val");
    cJSON *runs = cJSON_AddArrayToObject(entry, "runs");
    cJSON_AddItemToArray(methods, entry);
    for (int seed = 0; seed < seeds; seed++) {
        cJSON_AddItemToArray(runs, results[seed]);
        results[seed] = NULL;
    }
    if (n_lr == 1) lr_val[0] = set_value(cJSON_GetArrayItem(runs, 0), "id_val");
    for (int i = 0; i < n_lr; i++) {
        cJSON_AddItemToArray(jg, cJSON_CreateNumber(fit_float_json(grid[i])));
        cJSON_AddItemToArray(jv, cJSON_CreateNumber(lr_val[i]));
    }
    cJSON_AddNumberToObject(entry, "chosen_lr", fit_float_json(grid[best]));
    levi_report_summarize_method(entry);
}

/* One method in this process (--jobs 1): learning-rate choice on ID val with seed 0, then
 * the other seeds. Adds the method's entry to `methods`. */
static int fit_method(fit_state *fs, int method, cJSON *methods) {
    const fit_config *cfg = fs->cfg;
    const char *name = method_name(method);
    float grid[LEVI_MAX_GRID];
    int n_lr = lr_grid(cfg, method, grid);
    double lr_val[LEVI_MAX_GRID];
    int best = 0, rc = LEVI_EXIT_OK;
    char dir[FIT_PATH_MAX], label[128];
    cJSON *results[FIT_MAX_SEEDS] = {0};
    printf("\n== %s: %s ==\n", name, levi_report_method_label(name));
    lr_val[0] = NAN;
    if (n_lr > 1) {
        /* Every candidate is a full seed-0 run in lr-search/. */
        for (int i = 0; i < n_lr; i++) {
            grid_run_dir(cfg, method, grid[i], dir, sizeof dir);
            snprintf(label, sizeof label, "%s lr %g seed 0", name, (double)grid[i]);
            cJSON *r = NULL;
            if ((rc = run_one(fs, method, grid[i], 0, dir, label, &r)) != LEVI_EXIT_OK) return rc;
            lr_val[i] = set_value(r, "id_val");
            cJSON_Delete(r);
            if (levi_cli_interrupted) return LEVI_EXIT_INTERRUPTED;
        }
        if ((rc = choose_lr(fs, method, grid, n_lr, lr_val, &best)) != LEVI_EXIT_OK) return rc;
    }
    for (int seed = 0; seed < cfg->seeds && rc == LEVI_EXIT_OK; seed++) {
        run_dir(cfg, method, seed, dir, sizeof dir);
        snprintf(label, sizeof label, "%s seed %d", name, seed);
        rc = run_one(fs, method, grid[best], seed, dir, label, &results[seed]);
        if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
    }
    if (rc == LEVI_EXIT_OK)
        add_method_entry(method, grid, n_lr, best, lr_val, cfg->seeds, results, methods);
    for (int seed = 0; seed < cfg->seeds; seed++) cJSON_Delete(results[seed]);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * LEVI on a tuned backbone (levi-ht, levi-ft, levi-lora; paper Tables 4 and 14). Seed k's
 * features come from the encoder the base method's seed k saved (runs/<base>/seed<k>/
 * backbone), extracted into the feature cache under that folder's own key; the LEVI head is
 * trained on them exactly as frozen LEVI's (run_one, levi's defaults). The learning rate is
 * chosen like every method's: the LEVI grid with seed 0 (on seed 0's backbone), on ID
 * validation. Runs in this process with --threads threads, after the base method. */

/* The result of a seed whose base run diverged (it saved no backbone): NaN metrics, like a
   diverged run of any method. */
static cJSON *tuned_diverged_result(const fit_context *ctx, const char *name, int seed, float lr,
                                    const char *base_dir, const char *base_key) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "format", "levi-run-result");
    cJSON_AddNumberToObject(r, "version", 1);
    cJSON_AddStringToObject(r, "method", name);
    cJSON_AddNumberToObject(r, "seed", seed);
    cJSON_AddNumberToObject(r, "lr", fit_float_json(lr));
    cJSON_AddStringToObject(r, "metric", ctx->lower_is_better ? "rmse" : "accuracy");
    char key[65], buf[256];
    snprintf(buf, sizeof buf, "levi-tuned-diverged-v1\n%s\n%s\n%d\n", name, base_key, seed);
    levi_sha256_hex(buf, strlen(buf), key);
    cJSON_AddStringToObject(r, "key", key);
    cJSON *b = cJSON_AddObjectToObject(r, "backbone");
    cJSON_AddStringToObject(b, "dir", base_dir);
    cJSON_AddStringToObject(b, "run_key", base_key);
    cJSON_AddStringToObject(b, "features_key", "");
    cJSON *t = cJSON_AddObjectToObject(r, "train");
    cJSON_AddBoolToObject(t, "diverged", 1);
    cJSON_AddBoolToObject(t, "backbone_diverged", 1);
    fit_result_nan_sets(ctx, r);
    return fit_json_roundtrip(r);
}

static int fit_tuned_method(fit_state *fs, int method, cJSON *methods) {
    const fit_config *cfg = fs->cfg;
    const int base = fit_tuned_base(method);
    const char *name = method_name(method), *base_name = fit_method_name(base);
    float grid[LEVI_MAX_GRID];
    const int n_lr = lr_grid(cfg, method, grid);
    double lr_val[LEVI_MAX_GRID];
    int best = 0, rc = LEVI_EXIT_OK;
    cJSON *results[FIT_MAX_SEEDS] = {0};
    printf("\n== %s: %s ==\n", name, levi_report_method_label(name));
    for (int i = 0; i < n_lr; i++) lr_val[i] = NAN;
    for (int seed = 0; seed < cfg->seeds && rc == LEVI_EXIT_OK; seed++) {
        char base_dir[FIT_PATH_MAX], path[FIT_PATH_MAX + 32], dir[FIT_PATH_MAX], label[128];
        fit_run_dir(cfg, base, seed, base_dir, sizeof base_dir);
        snprintf(path, sizeof path, "%s/result.json", base_dir);
        levi_error err = {0};
        cJSON *br = fit_read_json(path, &err);
        if (!br) {
            fprintf(stderr, "levi fit: %s seed %d: %s (the %s run must finish first)\n", name, seed,
                    err.msg, base_name);
            rc = LEVI_EXIT_FAILURE;
            break;
        }
        char base_key[65];
        snprintf(base_key, sizeof base_key, "%s", result_key(br));
        const cJSON *bt = cJSON_GetObjectItemCaseSensitive(br, "train");
        const int diverged = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(bt, "diverged"));
        cJSON_Delete(br);
        if (diverged) {
            printf("%s seed %d: %s seed %d diverged and saved no backbone; counted as "
                   "diverged\n",
                   name, seed, base_name, seed);
            results[seed] =
                tuned_diverged_result(fs->ctx, name, seed, grid[best], base_dir, base_key);
            continue;
        }
        char backbone[FIT_PATH_MAX + 16], what[160];
        fit_path(backbone, sizeof backbone, "%s/backbone", base_dir);
        snprintf(what, sizeof what, "features (%s seed %d backbone)", base_name, seed);
        fit_context view;
        rc = fit_context_backbone_view(cfg, fs->ctx, backbone, "fit", what, &view);
        if (rc != LEVI_EXIT_OK) break;
        fit_state tfs = {fs->cfg, &view, -1, backbone, base_key};
        if (seed == 0 && n_lr > 1) {
            for (int i = 0; i < n_lr && rc == LEVI_EXIT_OK; i++) {
                grid_run_dir(cfg, method, grid[i], dir, sizeof dir);
                snprintf(label, sizeof label, "%s lr %g seed 0", name, (double)grid[i]);
                cJSON *r = NULL;
                rc = run_one(&tfs, method, grid[i], 0, dir, label, &r);
                lr_val[i] = set_value(r, "id_val");
                cJSON_Delete(r);
                if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
            }
            if (rc == LEVI_EXIT_OK) rc = choose_lr(&tfs, method, grid, n_lr, lr_val, &best);
        }
        if (rc == LEVI_EXIT_OK) {
            run_dir(cfg, method, seed, dir, sizeof dir);
            snprintf(label, sizeof label, "%s seed %d", name, seed);
            rc = run_one(&tfs, method, grid[best], seed, dir, label, &results[seed]);
            if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
        }
        fit_context_view_close(&view);
    }
    if (rc == LEVI_EXIT_OK)
        add_method_entry(method, grid, n_lr, best, lr_val, cfg->seeds, results, methods);
    for (int seed = 0; seed < cfg->seeds; seed++) cJSON_Delete(results[seed]);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * --jobs N: runs in worker processes. After the pipeline is loaded the parent fork()s one
 * process per run (the features are shared copy-on-write, not reloaded); each trains its run
 * with one thread through run_one, exactly as --jobs 1 --threads 1 would, so the results are
 * the same to the bit. Workers never write to the terminal: their stdout and stderr come to
 * the parent through pipes, their training progress through a third one (run_msg records),
 * and the parent prints the lines and draws the board. Order: every method's LR-search runs
 * first (independent), then the seeds of each method as soon as its learning rate is known;
 * methods without a search (the bias model, a one-entry --lrs) can go at any time.
 * Two processes with one thread each beat one process with two: a training step is a chain
 * of small GEMMs where two threads mostly wait for each other. */
typedef enum {
    JOB_BLOCKED, /* a seed run waiting for its method's learning rate */
    JOB_READY,
    JOB_RUNNING,
    JOB_DONE,   /* finished: its result is in the plan */
    JOB_STOPPED /* failed or interrupted */
} job_state;

typedef struct fit_job {
    int mi;     /* index into cfg->methods and the plans */
    int grid_i; /* index into the method's grid for an LR-search run; -1 for a seed run */
    int seed;
    float lr;
    job_state state;
    char dir[FIT_PATH_MAX], label[128];
    pid_t pid;
    int fd[3]; /* read ends: child's stdout, stderr, run_msg records; -1 when closed */
    int reaped, wstatus;
    char line[2][1024]; /* partial output lines */
    size_t line_len[2];
    unsigned char rec[sizeof(run_msg)];
    size_t rec_len;
    run_msg last; /* latest record */
    int have_msg;
    double val, best_val;  /* latest and best ID-val metric seen (NaN before the first epoch) */
    double rate;           /* latest training examples/s (records after validation have none) */
    double t_start, frac0; /* when it started; epochs already done then (resumed ones) */
} fit_job;

typedef struct method_plan {
    int method;
    float grid[LEVI_MAX_GRID];
    int n_lr, best, grid_left;
    double lr_val[LEVI_MAX_GRID];
    cJSON *results[FIT_MAX_SEEDS];
    double work_s, work_epochs; /* training seconds and epochs measured this session */
    int finished_runs, finished_epochs;
} method_plan;

typedef struct fit_sched {
    fit_state *fs;
    int jobs;
    int n_jobs;
    fit_job *job;
    method_plan plan[FIT_MAX_METHODS];
    levi_board *board;
    double t0;
    int stopping; /* 1 after SIGINT or a failure: start nothing, wait for the running ones */
    int fail_rc;  /* exit code of the first failed run */
    pid_t parent;
    char fail_label[128];
} fit_sched;

/* Epochs of a run done so far, by its latest record. */
static double job_epochs(const fit_job *j) {
    if (!j->have_msg) return 0;
    if (j->last.epoch_done || j->last.steps_per_epoch <= 0) return j->last.epoch;
    return (j->last.epoch - 1) + (double)j->last.step / (double)j->last.steps_per_epoch;
}

/* Seconds of training left: each run is expected to take as many epochs as its method's
 * finished runs took on average (the cap when none has finished yet), at the seconds per
 * epoch its method's runs showed in this session; the sum is shared among the worker
 * processes, but the fit cannot end before its longest remaining run. Negative while no run
 * has shown a rate. */
static double sched_eta(const fit_sched *s) {
    double all_s = 0, all_e = 0;
    for (int k = 0; k < s->fs->cfg->n_methods; k++) {
        all_s += s->plan[k].work_s;
        all_e += s->plan[k].work_epochs;
    }
    double per_epoch[FIT_MAX_METHODS], now = levi_now();
    for (int i = 0; i < s->n_jobs; i++) {
        const fit_job *j = &s->job[i];
        if (j->state != JOB_RUNNING || !j->have_msg) continue;
        all_s += now - j->t_start;
        all_e += job_epochs(j) - j->frac0;
    }
    for (int k = 0; k < s->fs->cfg->n_methods; k++) {
        const method_plan *p = &s->plan[k];
        double ws = p->work_s, we = p->work_epochs;
        for (int i = 0; i < s->n_jobs; i++) {
            const fit_job *j = &s->job[i];
            if (j->mi != k || j->state != JOB_RUNNING || !j->have_msg) continue;
            ws += now - j->t_start;
            we += job_epochs(j) - j->frac0;
        }
        per_epoch[k] = we > 0.2 ? ws / we : all_e > 0.2 ? all_s / all_e : -1;
    }
    double left = 0, longest = 0;
    for (int i = 0; i < s->n_jobs; i++) {
        const fit_job *j = &s->job[i];
        const method_plan *p = &s->plan[j->mi];
        if (j->state == JOB_DONE || j->state == JOB_STOPPED || p->method == LEVI_METHOD_BIAS)
            continue;
        if (per_epoch[j->mi] < 0) return -1;
        double expect = p->finished_runs ? (double)p->finished_epochs / p->finished_runs
                                         : (double)s->fs->cfg->epochs;
        double e = expect - (j->state == JOB_RUNNING ? job_epochs(j) : 0);
        double sec = (e > 0.5 ? e : 0.5) * per_epoch[j->mi];
        left += sec;
        if (sec > longest) longest = sec;
    }
    return left / s->jobs > longest ? left / s->jobs : longest;
}

static void sched_draw(fit_sched *s, int force) {
    if (!s->board) return;
    char lines[FIT_MAX_METHODS * (LEVI_MAX_GRID + FIT_MAX_SEEDS) + 1][320];
    const char *ptr[sizeof lines / sizeof lines[0]];
    char log_line[1024], eta[32], el[32];
    int n = 0, done = 0, running = 0;
    size_t ll = (size_t)snprintf(log_line, sizeof log_line, "progress:");
    for (int i = 0; i < s->n_jobs; i++) {
        const fit_job *j = &s->job[i];
        done += j->state == JOB_DONE;
        if (j->state != JOB_RUNNING) continue;
        running++;
        char val[48] = "val -     ", rate[32] = "";
        if (isfinite(j->val))
            snprintf(val, sizeof val, "val %.4f%s", j->val, j->val == j->best_val ? "*" : " ");
        if (j->rate > 0) snprintf(rate, sizeof rate, "%6.0f ex/s", j->rate);
        levi_format_duration(el, sizeof el, levi_now() - j->t_start);
        int pct = j->have_msg && j->last.steps_per_epoch > 0
                      ? (int)(100 * j->last.step / j->last.steps_per_epoch)
                      : 0;
        if (j->have_msg)
            snprintf(lines[n], sizeof lines[n], "  %-28s epoch %2d/%d %3d%%  %s  %s  %s", j->label,
                     j->last.epoch, s->fs->cfg->epochs, pct > 100 ? 100 : pct, val, rate, el);
        else /* before the first step, or the bias model's closed-form fit */
            snprintf(lines[n], sizeof lines[n], "  %-28s starting  %s", j->label, el);
        ptr[n] = lines[n];
        n++;
        if (ll < sizeof log_line)
            ll += (size_t)snprintf(log_line + ll, sizeof log_line - ll, " [%s epoch %d %s]",
                                   j->label, j->have_msg ? j->last.epoch : 0, val);
    }
    levi_format_duration(eta, sizeof eta, sched_eta(s));
    levi_format_duration(el, sizeof el, levi_now() - s->t0);
    snprintf(lines[n], sizeof lines[n],
             "runs: %d of %d done, %d running (%d processes)  elapsed %s  ETA ~%s", done, s->n_jobs,
             running, s->jobs, el, eta);
    ptr[n] = lines[n];
    n++;
    if (ll < sizeof log_line)
        snprintf(log_line + ll, sizeof log_line - ll, " %d of %d runs done, elapsed %s, ETA ~%s",
                 done, s->n_jobs, el, eta);
    levi_board_draw(s->board, ptr, n, log_line, force);
}

/* A finished run (trained now or earlier): records its result where the plan needs it and,
 * when it was the last LR-search run of its method, chooses the learning rate and lets the
 * method's seeds go. Returns an exit code. */
static int sched_job_done(fit_sched *s, fit_job *j, cJSON *result) {
    method_plan *p = &s->plan[j->mi];
    j->state = JOB_DONE;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(result, "train");
    const cJSON *er = cJSON_GetObjectItemCaseSensitive(t, "epochs_run");
    if (cJSON_IsNumber(er)) {
        p->finished_runs++;
        p->finished_epochs += er->valueint;
    }
    if (j->grid_i >= 0) {
        p->lr_val[j->grid_i] = set_value(result, "id_val");
        cJSON_Delete(result);
        if (--p->grid_left > 0) return LEVI_EXIT_OK;
        levi_board_clear(s->board);
        int rc = choose_lr(s->fs, p->method, p->grid, p->n_lr, p->lr_val, &p->best);
        if (rc != LEVI_EXIT_OK) return rc;
        for (int i = 0; i < s->n_jobs; i++) {
            fit_job *o = &s->job[i];
            if (o->mi != j->mi || o->grid_i >= 0) continue;
            o->lr = p->grid[p->best];
            o->state = JOB_READY;
        }
        return LEVI_EXIT_OK;
    }
    p->results[j->seed] = result;
    return LEVI_EXIT_OK;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void worker_main(fit_sched *s, fit_job *j, const int out[3]) {
    fit_worker_start(s->parent);
    for (int i = 0; i < s->n_jobs; i++)
        if (&s->job[i] != j)
            for (int k = 0; k < 3; k++) close_fd(&s->job[i].fd[k]);
    for (int k = 0; k < 3; k++) close_fd(&j->fd[k]);
    if (dup2(out[0], 1) < 0 || dup2(out[1], 2) < 0) _exit(LEVI_EXIT_FAILURE);
    close(out[0]);
    close(out[1]);
    s->fs->progress_fd = out[2];
    cJSON *r = NULL;
    int rc = run_one(s->fs, s->plan[j->mi].method, j->lr, j->seed, j->dir, j->label, &r);
    cJSON_Delete(r);
    fflush(stdout);
    fflush(stderr);
    /* _exit: the parent's atexit handlers and stdio buffers are not this process's to run. */
    _exit(rc);
}

/* Starts job j: finished earlier -> done at once; else a worker process. Exit code. */
static int sched_start(fit_sched *s, fit_job *j) {
    cJSON *r = NULL;
    levi_board_clear(s->board);
    if (run_finished(s->fs, NULL, s->plan[j->mi].method, j->lr, j->seed, j->dir, j->label, 1, &r)) {
        fflush(stdout);
        return sched_job_done(s, j, fit_json_roundtrip(r));
    }
    fflush(stdout);
    int rd[3], wr[3];
    for (int k = 0; k < 3; k++) {
        int p[2];
        if (pipe(p) != 0) {
            fprintf(stderr, "levi fit: cannot create a pipe for %s: %s\n", j->label,
                    strerror(errno));
            for (int q = 0; q < k; q++) {
                close(rd[q]);
                close(wr[q]);
            }
            return LEVI_EXIT_FAILURE;
        }
        rd[k] = p[0];
        wr[k] = p[1];
    }
    fflush(stdout);
    fflush(stderr);
    s->parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "levi fit: cannot start a process for %s: %s\n", j->label, strerror(errno));
        for (int k = 0; k < 3; k++) {
            close(rd[k]);
            close(wr[k]);
        }
        return LEVI_EXIT_FAILURE;
    }
    if (pid == 0) {
        for (int k = 0; k < 3; k++) close(rd[k]);
        worker_main(s, j, wr);
    }
    for (int k = 0; k < 3; k++) {
        close(wr[k]);
        j->fd[k] = rd[k];
    }
    j->pid = pid;
    j->reaped = 0;
    j->state = JOB_RUNNING;
    j->t_start = levi_now();
    j->val = j->best_val = NAN;
    return LEVI_EXIT_OK;
}

/* Reads what fd k of a running job has: output lines go out above the board, records
 * update its state. */
static void sched_read(fit_sched *s, fit_job *j, int k) {
    char buf[4096];
    ssize_t n = read(j->fd[k], buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n <= 0) {
        if (k < 2 && j->line_len[k] > 0) {
            j->line[k][j->line_len[k]] = 0;
            levi_board_print(s->board, k == 0 ? stdout : stderr, j->line[k]);
            j->line_len[k] = 0;
        }
        close_fd(&j->fd[k]);
        return;
    }
    for (ssize_t i = 0; i < n; i++) {
        if (k == 2) {
            j->rec[j->rec_len++] = (unsigned char)buf[i];
            if (j->rec_len < sizeof j->rec) continue;
            j->rec_len = 0;
            run_msg m;
            memcpy(&m, j->rec, sizeof m);
            if (!j->have_msg) j->frac0 = m.epoch - 1;
            j->last = m;
            j->have_msg = 1;
            if (!m.epoch_done) j->rate = m.examples_per_s;
            if (m.epoch_done) {
                j->val = m.val_metric;
                if (m.improved || !isfinite(j->best_val)) j->best_val = m.val_metric;
            }
            continue;
        }
        char c = buf[i];
        /* Lines longer than the buffer go out in pieces. */
        if (c != '\n' && j->line_len[k] < sizeof j->line[k] - 1) {
            j->line[k][j->line_len[k]++] = c;
            continue;
        }
        if (c != '\n') j->line[k][j->line_len[k]++] = c;
        j->line[k][j->line_len[k]] = 0;
        levi_board_print(s->board, k == 0 ? stdout : stderr, j->line[k]);
        j->line_len[k] = 0;
    }
}

/* A worker has exited and its pipes are drained: collect its run. */
static int sched_finish(fit_sched *s, fit_job *j) {
    int code = WIFEXITED(j->wstatus) ? WEXITSTATUS(j->wstatus) : LEVI_EXIT_FAILURE;
    j->state = JOB_STOPPED;
    if (code == LEVI_EXIT_OK) {
        method_plan *p = &s->plan[j->mi];
        if (j->have_msg) {
            p->work_s += levi_now() - j->t_start;
            p->work_epochs += job_epochs(j) - j->frac0;
        }
        cJSON *r = NULL;
        if (run_finished(s->fs, NULL, p->method, j->lr, j->seed, j->dir, j->label, 0, &r))
            return sched_job_done(s, j, fit_json_roundtrip(r));
        fprintf(stderr, "levi fit: %s: the worker process ended without writing %s/result.json\n",
                j->label, j->dir);
        code = LEVI_EXIT_FAILURE;
    } else if (WIFSIGNALED(j->wstatus)) {
        fprintf(stderr, "levi fit: %s: the worker process was killed by signal %d\n", j->label,
                WTERMSIG(j->wstatus));
    }
    return code;
}

static void sched_stop(fit_sched *s) {
    if (s->stopping) return;
    s->stopping = 1;
    for (int i = 0; i < s->n_jobs; i++)
        if (s->job[i].state == JOB_RUNNING && !s->job[i].reaped) kill(s->job[i].pid, SIGINT);
}

/* Runs every job with at most s->jobs workers at a time. Returns an exit code: the first
 * failed run's, 130 when interrupted. */
static int sched_run(fit_sched *s) {
    for (;;) {
        if (levi_cli_interrupted) sched_stop(s);
        int running = 0, waiting = 0;
        for (int i = 0; i < s->n_jobs; i++) running += s->job[i].state == JOB_RUNNING;
        /* Start ready jobs in order (the array is in priority order). */
        for (int i = 0; i < s->n_jobs && !s->stopping && !levi_cli_interrupted && running < s->jobs;
             i++) {
            fit_job *j = &s->job[i];
            if (j->state != JOB_READY) continue;
            int rc = sched_start(s, j);
            if (rc != LEVI_EXIT_OK) {
                s->fail_rc = rc;
                snprintf(s->fail_label, sizeof s->fail_label, "%s", j->label);
                sched_stop(s);
                break;
            }
            if (j->state == JOB_RUNNING) running++;
            /* A finished grid may have made earlier jobs ready: look again from the top. */
            i = -1;
        }
        for (int i = 0; i < s->n_jobs; i++)
            waiting += s->job[i].state == JOB_READY || s->job[i].state == JOB_BLOCKED;
        if (running == 0) {
            if (waiting == 0 || s->stopping) break;
            /* Nothing runs and nothing can start: a plan that cannot finish (a bug). */
            LEVI_ASSERT(0, "levi fit: run scheduler stalled");
        }
        struct pollfd pfd[FIT_MAX_METHODS * (LEVI_MAX_GRID + FIT_MAX_SEEDS) * 3];
        int owner[sizeof pfd / sizeof pfd[0]], which[sizeof pfd / sizeof pfd[0]], np = 0;
        for (int i = 0; i < s->n_jobs; i++)
            for (int k = 0; k < 3; k++)
                if (s->job[i].state == JOB_RUNNING && s->job[i].fd[k] >= 0) {
                    pfd[np].fd = s->job[i].fd[k];
                    pfd[np].events = POLLIN;
                    owner[np] = i;
                    which[np++] = k;
                }
        int pr = poll(pfd, (nfds_t)np, 200);
        if (pr > 0)
            for (int q = 0; q < np; q++)
                if (pfd[q].revents & (POLLIN | POLLHUP | POLLERR))
                    sched_read(s, &s->job[owner[q]], which[q]);
        for (int i = 0; i < s->n_jobs; i++) {
            fit_job *j = &s->job[i];
            if (j->state != JOB_RUNNING) continue;
            if (!j->reaped && waitpid(j->pid, &j->wstatus, WNOHANG) == j->pid) j->reaped = 1;
            if (!j->reaped || j->fd[0] >= 0 || j->fd[1] >= 0 || j->fd[2] >= 0) continue;
            int rc = sched_finish(s, j);
            if (rc != LEVI_EXIT_OK && !s->fail_rc &&
                !(s->stopping && rc == LEVI_EXIT_INTERRUPTED)) {
                s->fail_rc = rc;
                snprintf(s->fail_label, sizeof s->fail_label, "%s", j->label);
                sched_stop(s);
            }
        }
        sched_draw(s, 0);
    }
    if (s->fail_rc) {
        fprintf(stderr, "levi fit: %s failed (exit code %d); stopped the other runs\n",
                s->fail_label, s->fail_rc);
        return s->fail_rc;
    }
    return s->stopping || levi_cli_interrupted ? LEVI_EXIT_INTERRUPTED : LEVI_EXIT_OK;
}

/* The jobs of every method, in priority order: LR-search runs, then seed runs. *to_train
 * counts the runs that have no finished result: seeds waiting for a search count too, but
 * not seed 0, which will be the search's winner. */
static void sched_plan(fit_sched *s, int *to_train) {
    const fit_config *cfg = s->fs->cfg;
    int cap = 0;
    for (int k = 0; k < cfg->n_methods; k++) {
        method_plan *p = &s->plan[k];
        p->method = cfg->methods[k];
        p->n_lr = lr_grid(cfg, p->method, p->grid);
        p->grid_left = p->n_lr > 1 ? p->n_lr : 0;
        p->lr_val[0] = NAN;
        cap += p->grid_left + cfg->seeds;
    }
    s->job = levi_xcalloc((size_t)cap, sizeof *s->job);
    *to_train = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int k = 0; k < cfg->n_methods; k++) {
            method_plan *p = &s->plan[k];
            const char *name = method_name(p->method);
            int n = pass == 0 ? p->grid_left : cfg->seeds;
            for (int i = 0; i < n; i++) {
                fit_job *j = &s->job[s->n_jobs++];
                j->mi = k;
                j->grid_i = pass == 0 ? i : -1;
                j->seed = pass == 0 ? 0 : i;
                j->lr = pass == 0 ? p->grid[i] : p->grid[0];
                j->state = pass == 0 || p->n_lr == 1 ? JOB_READY : JOB_BLOCKED;
                for (int q = 0; q < 3; q++) j->fd[q] = -1;
                j->val = j->best_val = NAN;
                if (pass == 0) {
                    grid_run_dir(cfg, p->method, j->lr, j->dir, sizeof j->dir);
                    snprintf(j->label, sizeof j->label, "%s lr %g seed 0", name, (double)j->lr);
                } else {
                    run_dir(cfg, p->method, j->seed, j->dir, sizeof j->dir);
                    snprintf(j->label, sizeof j->label, "%s seed %d", name, j->seed);
                }
                cJSON *r = NULL;
                if (j->state == JOB_BLOCKED)
                    *to_train += j->seed > 0;
                else if (!run_finished(s->fs, NULL, p->method, j->lr, j->seed, j->dir, j->label, 0,
                                       &r))
                    ++*to_train;
                cJSON_Delete(r);
            }
        }
}

/* All methods with worker processes; adds their entries to `methods`. Exit code. */
static int fit_parallel(fit_sched *s, int to_train, cJSON *methods) {
    const fit_config *cfg = s->fs->cfg;
    printf("\ntraining %d runs in %d worker processes, one thread each\n", to_train, s->jobs);
    fflush(stdout);
    s->t0 = levi_now();
    s->board = levi_board_start(60);
    int rc = sched_run(s);
    sched_draw(s, 1);
    levi_board_finish(s->board);
    s->board = NULL;
    for (int k = 0; k < cfg->n_methods && rc == LEVI_EXIT_OK; k++) {
        method_plan *p = &s->plan[k];
        add_method_entry(p->method, p->grid, p->n_lr, p->best, p->lr_val, cfg->seeds, p->results,
                         methods);
    }
    for (int k = 0; k < cfg->n_methods; k++)
        for (int seed = 0; seed < cfg->seeds; seed++) cJSON_Delete(s->plan[k].results[seed]);
    levi_free(s->job);
    return rc;
}

/* levi fit and levi experiment (experiment: --methods all by default). */
static int fit_main(int argc, char **argv, int experiment) {
    double t_start = levi_now();
    fit_cmd = experiment ? "experiment" : "fit";
    fit_args a;
    a.experiment = experiment;
    int rc = parse_fit_args(argc, argv, &a);
    if (rc != LEVI_EXIT_OK) return rc;
    if (a.help) {
        fit_usage(stdout, experiment);
        return LEVI_EXIT_OK;
    }
    fit_config *cfg = &a.cfg;
    if (a.print_spec) {
        const char *builtin = fit_builtin_spec(cfg->target);
        if (builtin) {
            fputs(builtin, stdout);
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
    rc = expand_layer_methods(cfg, ctx.has_features ? ctx.td.n_layers : 0);
    if (rc != LEVI_EXIT_OK) {
        fit_context_close(&ctx);
        return rc;
    }
    /* The bias model is regression-only. For a classification task it is left out of the
       default methods and of 'all'; naming it is a usage error, reported before any training. */
    if (levi_dataset_task(ctx.ds) == LEVI_TASK_CLASSIFICATION) {
        int k = 0, dropped = 0;
        for (int i = 0; i < cfg->n_methods; i++) {
            if (cfg->methods[i] != LEVI_METHOD_BIAS) {
                cfg->methods[k++] = cfg->methods[i];
                continue;
            }
            if (a.named_bias) {
                fprintf(stderr,
                        "levi fit: --methods: the bias model is for regression; this task is "
                        "classification (expected any of levi, a3, a4, a5, lp, layer)\n");
                fit_context_close(&ctx);
                return LEVI_EXIT_USAGE;
            }
            dropped = 1;
        }
        cfg->n_methods = k;
        if (dropped)
            printf("methods: bias left out (it is for regression; this task is "
                   "classification)\n");
    }
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
        name_methods(fj, cfg);
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

    fit_state fs = {cfg, &ctx, -1, NULL, NULL};
    cJSON *results = fit_results_header(cfg, &ctx, "fit");
    name_methods(cJSON_GetObjectItemCaseSensitive(results, "config"), cfg);
    cJSON *methods = cJSON_AddArrayToObject(results, "methods");
    double t_train = levi_now();
    /* Worker processes only pay off with two runs or more to train; a rerun that finds
       everything finished, or one run left, goes the --jobs 1 way. */
    /* Backbone-training methods (ids >= FIT_FT_BASE) train after the head methods: with
       --jobs > 1 each stage's runs (lr search, then seeds) in worker processes of one thread
       (fit_finetune.h), else one after another in this process with --threads threads. */
    /* LEVI on tuned backbones (ids FIT_TUNED_BASE + mode) after the backbone-training methods
       whose saved encoders they read, in this process too; the ensembles last. */
    int n_all = cfg->n_methods, n_head = 0, ft_methods[FIT_MAX_METHODS], n_ft = 0;
    int ens_methods[FIT_MAX_METHODS], n_ens = 0, tuned_methods[FIT_MAX_METHODS], n_tuned = 0;
    for (int i = 0; i < n_all; i++) {
        if (fit_is_ensemble(cfg->methods[i]))
            ens_methods[n_ens++] = cfg->methods[i];
        else if (fit_tuned_base(cfg->methods[i]) >= 0)
            tuned_methods[n_tuned++] = cfg->methods[i];
        else if (cfg->methods[i] >= FIT_FT_BASE)
            ft_methods[n_ft++] = cfg->methods[i];
        else
            cfg->methods[n_head++] = cfg->methods[i];
    }
    for (int i = 0; i < n_ft; i++) cfg->methods[n_head + i] = ft_methods[i];
    for (int i = 0; i < n_tuned; i++) cfg->methods[n_head + n_ft + i] = tuned_methods[i];
    for (int i = 0; i < n_ens; i++) cfg->methods[n_head + n_ft + n_tuned + i] = ens_methods[i];
    cfg->n_methods = n_head;
    long jobs = a.jobs;
    if (jobs == 0) jobs = sysconf(_SC_NPROCESSORS_ONLN);
    fit_sched sched;
    memset(&sched, 0, sizeof sched);
    sched.fs = &fs;
    int to_train = 0;
    if (jobs > 1) {
        sched_plan(&sched, &to_train);
        if (to_train < jobs) jobs = to_train;
    }
    if (jobs > 1) {
        sched.jobs = (int)jobs;
        rc = fit_parallel(&sched, to_train, methods);
    } else {
        levi_free(sched.job);
        for (int i = 0; i < cfg->n_methods && rc == LEVI_EXIT_OK; i++)
            rc = fit_method(&fs, cfg->methods[i], methods);
    }
    cfg->n_methods = n_all;
    if (n_ft > 0 && rc == LEVI_EXIT_OK && !levi_cli_interrupted) {
        fit_finetune_options ft_opts = fit_finetune_default_options();
        ft_opts.train_fraction = cfg->ft_scale;
        ft_opts.jobs = a.jobs > 0 ? a.jobs : (int)sysconf(_SC_NPROCESSORS_ONLN);
        for (int i = 0; i < n_ft && rc == LEVI_EXIT_OK; i++)
            rc = fit_finetune_method(fit_method_name(ft_methods[i]), cfg, &ctx, &ft_opts, methods);
    }
    for (int i = 0; i < n_tuned && rc == LEVI_EXIT_OK && !levi_cli_interrupted; i++)
        rc = fit_tuned_method(&fs, tuned_methods[i], methods);
    if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
    /* Post-hoc ensembles of the finished runs (src/cli/ensemble.c): after every method above
       has its entry in `methods`, before the report is written. */
    if (n_ens > 0 && rc == LEVI_EXIT_OK) rc = fit_ensembles(cfg, &ctx, methods);
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

int levi_cmd_fit(int argc, char **argv) {
    return fit_main(argc, argv, 0);
}

int levi_cmd_experiment(int argc, char **argv) {
    return fit_main(argc, argv, 1);
}
