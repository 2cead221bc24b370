/* Shared machinery of `levi fit`, `levi eval` and `levi predict`: the saved fit
 * configuration (fit.json in the output folder), the pipeline that turns it into a dataset,
 * backbone features and levi_task_data, per-run evaluation into the run-result JSON that
 * report.h describes, and small helpers for options and exit codes.
 * Not for: the subcommands' own option parsing and flow (fit.c, eval.c, predict.c), or
 * writing reports (report.c). */
#ifndef LEVI_CLI_FIT_H
#define LEVI_CLI_FIT_H

#include "levi/data.h"
#include "levi/featcache.h"
#include "levi/levi.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <sys/types.h>

#define FIT_PATH_MAX 4096
/* Method ids: levi_method values, and FIT_FT_BASE + levi_ft_mode for the backbone-training
   baselines (finetune.h: ft, ht, lp-ft, fs, lora). */
#define FIT_FT_BASE 100
/* The per-layer study (paper Fig. 4): FIT_LAYER_BASE + k is "layer<k>", LEVI_METHOD_LAYER with
   its one adapter on feature layer k (0: the embeddings output). The ids lie below
   FIT_FT_BASE, so everything that tells head methods from backbone-training ones by
   `>= FIT_FT_BASE` treats them as head methods; FIT_LAYERS_ALL is what --methods "layers"
   parses to, expanded to one id per feature layer once the features are known. fit.c owns
   these ids (fit_method_layer, fit_layer_method_name). */
#define FIT_LAYER_BASE 32
#define FIT_LAYER_MAX 32
#define FIT_LAYERS_ALL (FIT_LAYER_BASE + FIT_LAYER_MAX)
/* LEVI on a tuned backbone (paper Tables 4 and 14): FIT_TUNED_BASE + levi_ft_mode for
   "levi-ht", "levi-ft", "levi-lora". Seed k trains the LEVI head (levi's defaults and LR grid)
   on features extracted from the tuned encoder that the base method's seed k saved in
   runs/<ht|ft|lora>/seed<k>/backbone, so the base method runs first (naming levi-ft adds
   ft). The ids lie above the ensembles; `>= FIT_FT_BASE` treats them as needing --model and
   not the frozen features. */
#define FIT_TUNED_BASE 300
/* + 5: the post-hoc ensembles, ids FIT_ENS_BASE + k (ensemble.h); + 3: tuned LEVI. */
#define FIT_MAX_METHODS (LEVI_METHOD_COUNT + 6 + FIT_LAYER_MAX + 5 + 3)
#define FIT_MAX_SEEDS 32

/* Everything that defines a fit; saved as <out>/fit.json so eval and predict can rebuild it. */
typedef struct fit_config {
    char target[FIT_PATH_MAX];    /* "movielens" or the spec file as given */
    char spec_path[FIT_PATH_MAX]; /* absolute spec file; "" for the built-in movielens */
    char data[FIT_PATH_MAX];      /* absolute source path (overrides the spec's) or "" */
    char model[FIT_PATH_MAX];     /* absolute model folder, "" when no method needs it */
    char cache[FIT_PATH_MAX];     /* LEVI_CACHE root (${LEVI_CACHE} in specs) */
    char features[FIT_PATH_MAX];  /* feature cache root (--cache; <cache>/features) */
    char out[FIT_PATH_MAX];       /* absolute output folder */
    int n_methods;
    int methods[FIT_MAX_METHODS]; /* levi_method values, in the order given */
    int seeds;                    /* seeds 0 .. seeds-1 */
    int n_lrs;                    /* 0: each method's default grid */
    float lrs[LEVI_MAX_GRID];
    int epochs, patience, batch;
    int threads;            /* 0: library default */
    double ft_scale;        /* --scale: fraction of ID-train rows the fine-tuning baselines
                               train on (1: all) */
    double subsample_frac;  /* 1 and subsample_rows 0: no subsampling */
    int64_t subsample_rows; /* 0: no cap */
    float feature_dropout;  /* --feature-dropout; NaN: the spec's, else each method's default */
    int precision;          /* --precision: levi_precision of the cached-feature heads' steps */
} fit_config;

/* The loaded pipeline: spec, dataset, features, task data, eval sets. */
typedef struct fit_context {
    levi_spec *spec;
    levi_dataset *ds;
    char spec_json_path[FIT_PATH_MAX]; /* what was loaded ("<built-in movielens>" or file) */
    char *spec_text;                   /* the spec's JSON, saved to <out>/spec.json */
    levi_features feats;               /* n_layers == 0 when no method needs them */
    levi_featcache_info feat_info;
    int has_features;
    /* Feature dropout of the adapter methods (levi, a3, layer<k>): --feature-dropout, else the
       spec's hyperparameters.feature_dropout; NaN: the methods' defaults. */
    float feature_dropout;
    int64_t n;
    int32_t *cat, *cat_card, *cat_mask_group;
    float *cat_mask_prob, *num, *y;
    int32_t *yc;
    levi_task_data td;
    const int64_t *train, *val;
    int64_t n_train, n_val;
    int n_sets;
    levi_eval_set sets[LEVI_MAX_EVAL_SETS];
    char set_names[LEVI_MAX_EVAL_SETS][96];
    char checksum[65];
    int lower_is_better;
    double load_seconds, feature_seconds;
} fit_context;

/* Extracts (or reuses from the cache cfg->features) the backbone features of texts with
 * cfg->model, drawing a progress bar, and loads them into *out. Shared by fit and predict.
 * max_len: tokens per text (the spec's text_max_tokens); 0 keeps the extractor's default. */
levi_status fit_extract_features(const fit_config *cfg, int max_len, const char *const *texts,
                                 int64_t n, levi_featcache_info *info, levi_features *out,
                                 levi_error *err);

/* Prints "levi <cmd>: <message>" to stderr and returns the exit code of err->status. */
int fit_fail(const char *cmd, const levi_error *err);

/* The LEVI_CACHE root: $LEVI_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/levi. */
void fit_default_cache(char *out, size_t cap);

/* The feature layer k of a per-layer-study id (FIT_LAYER_BASE + k), else -1. */
int fit_method_layer(int method);
/* "layer<k>" for a per-layer-study id, "layers" for FIT_LAYERS_ALL, NULL for any other id
 * (static storage). */
const char *fit_layer_method_name(int method);
/* The id of "layer<k>" (k in [0, FIT_LAYER_MAX)) or "layers", else -1. */
int fit_layer_method_parse(const char *name);

/* Adds "cost" to a run result: what the efficiency table (paper Table 15) needs.
 *   {"trainable_params", "inference_params" (head, plus the backbone through the deepest
 *    layer used when the method needs it at inference), "flops_per_example" (forward, head +
 *    that backbone at the task's mean token count; cost.h), "backbone_layers", "mean_tokens",
 *    "seconds_per_epoch", "peak_rss_kib" (ru_maxrss of the process that trained the run, the
 *    loaded features included)}
 * head_params/head_flops: of the method's head; backbone_layers: transformer layers the
 * backbone runs at inference (-1: none; INT_MAX: all of them). Unknown numbers are written as null.
 * Existing readers ignore the field; `levi eval` copies it from the run it re-evaluates. */
void fit_add_run_cost(cJSON *result, const fit_config *cfg, const fit_context *ctx,
                      double trainable_params, double head_params, double head_flops,
                      int backbone_layers, double train_seconds, int epochs_run);

/* The base (backbone-training) method id of a tuned-LEVI id (FIT_FT_BASE + LEVI_FT_HALF for
 * levi-ht, ...), else -1. */
int fit_tuned_base(int method);

/* A view of ctx whose backbone features come from the encoder folder model_dir (a tuned
 * backbone) instead of cfg->model: extracts them for every row of ctx's dataset (so
 * --subsample holds) with the spec's max tokens, or reuses the feature cache (keyed by the
 * folder's file hashes, so each tuned backbone has its own entry), drawing a progress bar
 * labelled `label`. *view shares everything else with ctx, which must outlive it; release it
 * with fit_context_view_close (never fit_context_close). Returns an exit code; on failure the
 * message is printed and *view is empty. */
int fit_context_backbone_view(const fit_config *cfg, const fit_context *ctx, const char *model_dir,
                              const char *cmd, const char *label, fit_context *view);
void fit_context_view_close(fit_context *view);

/* 1 when the method trains on backbone features. */
int fit_method_needs_features(int method);
/* Name of a method id ("levi", ..., "ft", "lora") and back (-1 when unknown). */
const char *fit_method_name(int method);
int fit_method_parse(const char *name);

/* Builds the pipeline of cfg (loads the spec and data, prints the summary and checks the
 * spec's expected counts, subsamples, extracts or reuses features). Returns an exit code;
 * on failure the message is printed and ctx is closed. */
enum {
    FIT_OPEN_SUMMARY = 1,    /* print the dataset summary */
    FIT_OPEN_NO_FEATURES = 2 /* skip the backbone features (predict encodes its own rows) */
};
int fit_context_open(const fit_config *cfg, const char *cmd, int flags, fit_context *ctx);
/* The embedded spec text of a built-in target (specs/<name>.json at build time), or NULL. */
const char *fit_builtin_spec(const char *name);
/* "  name  description" lines of the built-in targets, for --help. */
void fit_print_builtins(FILE *f);
/* Kept for callers that predate the table. */
#define fit_movielens_spec fit_builtin_spec("movielens")
void fit_context_close(fit_context *ctx);

/* fit.json <-> fit_config. */
cJSON *fit_config_to_json(const fit_config *cfg);
levi_status fit_config_from_json(const char *path, fit_config *cfg, levi_error *err);

/* "sets" and "adapters" of a run that left no usable weights (diverged): every set's metric is
 * NaN (JSON null). */
void fit_result_nan_sets(const fit_context *ctx, cJSON *result);

/* Runs every eval set through m and writes "sets" and "adapters" of a run result. */
levi_status fit_evaluate_run(fit_context *ctx, levi_model *m, cJSON *result, levi_error *err);

/* The results document without "methods" (task, metric, config, dataset, features). */
cJSON *fit_results_header(const fit_config *cfg, const fit_context *ctx, const char *generated_by);

/* snprintf for paths: 1 when it fit, 0 when truncated (the caller's buffer is FIT_PATH_MAX,
 * so that takes a path longer than any file system allows). */
int fit_path(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Reads and parses a JSON file (NULL when absent or unreadable; *err tells which). */
cJSON *fit_read_json(const char *path, levi_error *err);
levi_status fit_write_json(const char *path, const cJSON *doc, levi_error *err);
/* The document as it reads back from its file. cJSON prints numbers with 15 digits when they
 * compare equal within an epsilon, so a value can lose its last bit on the way through a
 * file; aggregating the read-back values makes a fresh fit, a resumed fit and an eval agree
 * to the bit. Frees doc. */
cJSON *fit_json_roundtrip(cJSON *doc);

/* Run folders: <out>/runs/<method>/seed<k>, <out>/runs/<method>/lr-search/lr<value>. */
void fit_run_dir(const fit_config *cfg, int method, int seed, char *out, size_t cap);
void fit_search_dir(const fit_config *cfg, int method, float lr, char *out, size_t cap);
/* First steps of a worker process forked by `levi fit --jobs` (fit.c's head runs, the
 * backbone-training runs of fit_finetune.c): SIGINT/SIGTERM only set levi_cli_interrupted
 * (the run saves its state at its next step), SIGPIPE is ignored, a parent that dies takes
 * the worker along (SIGTERM), and the worker computes with one thread. */
void fit_worker_start(pid_t parent);
/* Where the lr-search run at lr lives: search_dir, or seed0_dir when an earlier fit chose that
 * lr and moved the run there as seed 0 (its result.json has that lr and search_dir is gone).
 * Writes the choice to dir. */
void fit_moved_search_dir(const char *search_dir, const char *seed0_dir, float lr, char *dir,
                          size_t cap);
/* The method's learning-rate grid under cfg (the bias model has one dummy entry). */
int fit_lr_grid(const fit_config *cfg, int method, float out[LEVI_MAX_GRID]);
/* A float as the shortest decimal that reads back to it (JSON would print 0.0010000000475). */
double fit_float_json(float x);

#endif
