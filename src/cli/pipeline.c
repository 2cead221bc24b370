/* The pipeline shared by `levi fit`, `levi eval` and `levi predict` (fit.h): the saved fit
 * configuration, spec + data -> dataset (summary and self-check) -> backbone features
 * (feature cache, progress bar) -> levi_task_data and eval sets, and per-run evaluation into
 * the run-result JSON.
 * Not for: deciding which runs to train (fit.c) or formatting reports (report.c). */
#include "fit.h"

#include "ensemble.h"
#include "levi/finetune.h"

#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

/* The built-in specs (`levi fit movielens`, ...): specs/<name>.json, embedded at build time
 * (CMake generates levi_builtin_specs.h) so the CLI works from any folder. */
#include "levi_builtin_specs.h"

const char *fit_builtin_spec(const char *name) {
    for (int i = 0; levi_builtin_specs[i].name; i++)
        if (strcmp(levi_builtin_specs[i].name, name) == 0) return levi_builtin_specs[i].text;
    return NULL;
}

void fit_print_builtins(FILE *f) {
    for (int i = 0; levi_builtin_specs[i].name; i++) {
        /* The first sentence of the spec's own description, so --help cannot go stale. */
        cJSON *doc = cJSON_Parse(levi_builtin_specs[i].text);
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(doc, "description");
        const char *desc = cJSON_IsString(d) ? d->valuestring : "";
        /* The first sentence: specs start with a short one for this list. */
        const char *stop = strstr(desc, ". ");
        int len = stop ? (int)(stop - desc) : (int)strlen(desc);
        fprintf(f, "  %-26s %.*s\n", levi_builtin_specs[i].name, len, desc);
        cJSON_Delete(doc);
    }
}

int fit_fail(const char *cmd, const levi_error *err) {
    fprintf(stderr, "levi %s: %s\n", cmd, err->msg);
    if (err->status == LEVI_ERR_INTERRUPTED)
        fprintf(stderr, "levi %s: finished work is saved; run the same command again to resume\n",
                cmd);
    return levi_cli_exit_code(err->status);
}

int fit_path(char *out, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    return n >= 0 && (size_t)n < cap;
}

void fit_default_cache(char *out, size_t cap) {
    const char *c = getenv("LEVI_CACHE");
    if (c && *c) {
        snprintf(out, cap, "%s", c);
        return;
    }
    const char *x = getenv("XDG_CACHE_HOME");
    if (x && *x) {
        snprintf(out, cap, "%s/levi", x);
        return;
    }
    const char *h = getenv("HOME");
    snprintf(out, cap, "%s/.cache/levi", h && *h ? h : ".");
}

int fit_tuned_base(int method) {
    const int mode = method - FIT_TUNED_BASE;
    return mode == LEVI_FT_HALF || mode == LEVI_FT_FULL || mode == LEVI_FT_LORA ? FIT_FT_BASE + mode
                                                                                : -1;
}

int fit_method_needs_features(int method) {
    /* Backbone-training methods read texts; tuned LEVI extracts its own features. */
    if (method >= FIT_FT_BASE) return 0;
    if (fit_method_layer(method) >= 0 || method == FIT_LAYERS_ALL) return 1;
    levi_head_params hp = levi_head_default_params((levi_method)method);
    return hp.feature_adapters != 0;
}

const char *fit_method_name(int method) {
    if (fit_is_ensemble(method)) return fit_ensemble_name(method);
    switch (fit_tuned_base(method) - FIT_FT_BASE) {
    case LEVI_FT_HALF:
        return "levi-ht";
    case LEVI_FT_FULL:
        return "levi-ft";
    case LEVI_FT_LORA:
        return "levi-lora";
    default:
        break;
    }
    const char *layer = fit_layer_method_name(method);
    if (layer) return layer;
    return method >= FIT_FT_BASE ? levi_ft_mode_name((levi_ft_mode)(method - FIT_FT_BASE))
                                 : levi_method_name((levi_method)method);
}

int fit_method_parse(const char *name) {
    int m = fit_layer_method_parse(name);
    if (m >= 0) return m;
    m = levi_method_parse(name);
    if (m >= 0) return m;
    m = levi_ft_mode_parse(name);
    if (m >= 0 && m != LEVI_FT_PROBE) return FIT_FT_BASE + m;
    if (strncmp(name, "levi-", 5) == 0) {
        m = levi_ft_mode_parse(name + 5);
        if (m >= 0 && fit_tuned_base(FIT_TUNED_BASE + m) >= 0) return FIT_TUNED_BASE + m;
    }
    return fit_ensemble_parse(name); /* ft+lp, ft+fs, wise-ft, a1, a2 (ensemble.h) */
}

double fit_float_json(float x) {
    char buf[32];
    snprintf(buf, sizeof buf, "%.7g", (double)x);
    return strtod(buf, NULL);
}

void fit_run_dir(const fit_config *cfg, int method, int seed, char *out, size_t cap) {
    snprintf(out, cap, "%s/runs/%s/seed%d", cfg->out, fit_method_name(method), seed);
}

void fit_search_dir(const fit_config *cfg, int method, float lr, char *out, size_t cap) {
    snprintf(out, cap, "%s/runs/%s/lr-search/lr%g", cfg->out, fit_method_name(method), (double)lr);
}

int fit_lr_grid(const fit_config *cfg, int method, float out[LEVI_MAX_GRID]) {
    if (fit_method_layer(method) >= 0) method = LEVI_METHOD_LAYER;
    if (fit_tuned_base(method) >= 0) method = LEVI_METHOD_LEVI; /* the frozen LEVI's grid */
    /* The bias model has no learning rate (its lambda is chosen on ID val inside training). */
    if (method == LEVI_METHOD_BIAS || cfg->n_lrs == 0)
        return levi_default_lr_grid((levi_method)method, out);
    memcpy(out, cfg->lrs, (size_t)cfg->n_lrs * sizeof(float));
    return cfg->n_lrs;
}

static void on_worker_signal(int sig) {
    (void)sig;
    levi_cli_interrupted = 1;
}

/* The signals only ask the run to stop at its next step: a second one must not kill it before
 * it saves, as main()'s handler would (the parent forwards the user's SIGINT and the terminal
 * may deliver it too). */
void fit_worker_start(pid_t parent) {
    levi_error e;
    levi_signal_handler(SIGINT, on_worker_signal, &e); /* the parent's stack: cannot fail */
    levi_signal_handler(SIGTERM, on_worker_signal, &e);
    signal(SIGPIPE, SIG_IGN);
#ifdef __linux__
    /* A parent killed outright (SIGKILL) takes its workers along, each at a safe point. */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
#endif
    if (getppid() != parent) levi_cli_interrupted = 1; /* it died before prctl */
    levi_set_num_threads(1);
}

void fit_moved_search_dir(const char *search_dir, const char *seed0_dir, float lr, char *dir,
                          size_t cap) {
    char s0r[FIT_PATH_MAX + 160];
    snprintf(s0r, sizeof s0r, "%s/result.json", seed0_dir);
    struct stat sb;
    levi_error e2;
    cJSON *moved = stat(s0r, &sb) == 0 && S_ISREG(sb.st_mode) ? fit_read_json(s0r, &e2) : NULL;
    const cJSON *mlr = cJSON_GetObjectItemCaseSensitive(moved, "lr");
    int gone = !(stat(search_dir, &sb) == 0 && S_ISDIR(sb.st_mode));
    snprintf(dir, cap, "%s",
             moved && gone && cJSON_IsNumber(mlr) && mlr->valuedouble == fit_float_json(lr)
                 ? seed0_dir
                 : search_dir);
    cJSON_Delete(moved);
}

/* ---------------------------------------------------------------------------------------
 * JSON files. */
cJSON *fit_read_json(const char *path, levi_error *err) {
    char *text = NULL;
    size_t len = 0;
    if (levi_read_file(path, &text, &len, err) != LEVI_OK) return NULL;
    const char *end = NULL;
    cJSON *doc = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!doc) {
        long off = end ? (long)(end - text) : 0;
        levi_errorf(err, LEVI_ERR_FORMAT, "%s: byte %ld: malformed JSON", path, off);
    }
    levi_free(text);
    return doc;
}

levi_status fit_write_json(const char *path, const cJSON *doc, levi_error *err) {
    char *s = cJSON_Print(doc);
    if (!s) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: cannot serialise JSON", path);
    size_t len = strlen(s);
    char *t = realloc(s, len + 2);
    if (!t) {
        free(s);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    }
    t[len] = '\n';
    levi_status st = levi_write_file_atomic(path, t, len + 1, err);
    free(t);
    return st;
}

cJSON *fit_json_roundtrip(cJSON *doc) {
    char *s = cJSON_Print(doc);
    if (!s) return doc;
    cJSON *back = cJSON_Parse(s);
    free(s);
    if (!back) return doc;
    cJSON_Delete(doc);
    return back;
}

/* ---------------------------------------------------------------------------------------
 * fit.json */
cJSON *fit_config_to_json(const fit_config *cfg) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "format", "levi-fit");
    cJSON_AddNumberToObject(o, "version", 1);
    cJSON_AddStringToObject(o, "target", cfg->target);
    cJSON_AddStringToObject(o, "spec", cfg->spec_path);
    cJSON_AddStringToObject(o, "data", cfg->data);
    cJSON_AddStringToObject(o, "model", cfg->model);
    cJSON_AddStringToObject(o, "cache", cfg->cache);
    cJSON_AddStringToObject(o, "features", cfg->features);
    cJSON_AddStringToObject(o, "out", cfg->out);
    cJSON *m = cJSON_AddArrayToObject(o, "methods");
    for (int i = 0; i < cfg->n_methods; i++)
        cJSON_AddItemToArray(m, cJSON_CreateString(fit_method_name(cfg->methods[i])));
    cJSON_AddNumberToObject(o, "seeds", cfg->seeds);
    if (cfg->n_lrs > 0) {
        cJSON *l = cJSON_AddArrayToObject(o, "lrs");
        for (int i = 0; i < cfg->n_lrs; i++)
            cJSON_AddItemToArray(l, cJSON_CreateNumber(fit_float_json(cfg->lrs[i])));
    } else {
        cJSON_AddNullToObject(o, "lrs");
    }
    cJSON_AddNumberToObject(o, "epochs", cfg->epochs);
    cJSON_AddNumberToObject(o, "patience", cfg->patience);
    cJSON_AddNumberToObject(o, "batch", cfg->batch);
    cJSON_AddNumberToObject(o, "threads", cfg->threads);
    cJSON_AddNumberToObject(o, "subsample_fraction", cfg->subsample_frac);
    cJSON_AddNumberToObject(o, "subsample_rows", (double)cfg->subsample_rows);
    if (isnan(cfg->feature_dropout))
        cJSON_AddNullToObject(o, "feature_dropout"); /* the spec's, else the methods' default */
    else
        cJSON_AddNumberToObject(o, "feature_dropout", cfg->feature_dropout);
    cJSON_AddStringToObject(o, "precision", levi_precision_name(cfg->precision));
    return o;
}

static levi_status get_string(const cJSON *o, const char *path, const char *key, char *out,
                              size_t cap, levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsString(v))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: %s: expected a string", path, key);
    if (strlen(v->valuestring) >= cap)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: %s: longer than %zu bytes", path, key,
                           cap - 1);
    snprintf(out, cap, "%s", v->valuestring);
    return LEVI_OK;
}

static levi_status get_number(const cJSON *o, const char *path, const char *key, double lo,
                              double hi, double *out, levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: %s: expected a number in [%g, %g]", path, key,
                           lo, hi);
    *out = v->valuedouble;
    return LEVI_OK;
}

levi_status fit_config_from_json(const char *path, fit_config *cfg, levi_error *err) {
    memset(cfg, 0, sizeof *cfg);
    cJSON *o = fit_read_json(path, err);
    if (!o) return err->status;
    levi_status st = LEVI_OK;
    double v;
    if (strcmp(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(o, "format"))
                   ? cJSON_GetObjectItemCaseSensitive(o, "format")->valuestring
                   : "",
               "levi-fit") != 0) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: format: expected \"levi-fit\"", path);
        goto done;
    }
    if ((st = get_string(o, path, "target", cfg->target, sizeof cfg->target, err)) ||
        (st = get_string(o, path, "spec", cfg->spec_path, sizeof cfg->spec_path, err)) ||
        (st = get_string(o, path, "data", cfg->data, sizeof cfg->data, err)) ||
        (st = get_string(o, path, "model", cfg->model, sizeof cfg->model, err)) ||
        (st = get_string(o, path, "cache", cfg->cache, sizeof cfg->cache, err)) ||
        (st = get_string(o, path, "features", cfg->features, sizeof cfg->features, err)) ||
        (st = get_string(o, path, "out", cfg->out, sizeof cfg->out, err)))
        goto done;
    const cJSON *methods = cJSON_GetObjectItemCaseSensitive(o, "methods");
    const cJSON *m;
    cJSON_ArrayForEach(m, methods) {
        int id = cJSON_IsString(m) ? fit_method_parse(m->valuestring) : -1;
        if (id < 0 || cfg->n_methods >= FIT_MAX_METHODS) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: methods[%d]: expected a method name", path,
                             cfg->n_methods);
            goto done;
        }
        cfg->methods[cfg->n_methods++] = id;
    }
    if ((st = get_number(o, path, "seeds", 1, FIT_MAX_SEEDS, &v, err))) goto done;
    cfg->seeds = (int)v;
    const cJSON *lrs = cJSON_GetObjectItemCaseSensitive(o, "lrs");
    cJSON_ArrayForEach(m, lrs) {
        if (!cJSON_IsNumber(m) || cfg->n_lrs >= LEVI_MAX_GRID) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: lrs[%d]: expected a number", path,
                             cfg->n_lrs);
            goto done;
        }
        cfg->lrs[cfg->n_lrs++] = (float)m->valuedouble;
    }
    if ((st = get_number(o, path, "epochs", 1, LEVI_MAX_EPOCHS, &v, err))) goto done;
    cfg->epochs = (int)v;
    if ((st = get_number(o, path, "patience", 1, 1e9, &v, err))) goto done;
    cfg->patience = (int)v;
    if ((st = get_number(o, path, "batch", 1, 1e9, &v, err))) goto done;
    cfg->batch = (int)v;
    if ((st = get_number(o, path, "threads", 0, 4096, &v, err))) goto done;
    cfg->threads = (int)v;
    if ((st = get_number(o, path, "subsample_fraction", 1e-12, 1, &cfg->subsample_frac, err)))
        goto done;
    if ((st = get_number(o, path, "subsample_rows", 0, 9e15, &v, err))) goto done;
    cfg->subsample_rows = (int64_t)v;
    cfg->feature_dropout = NAN; /* absent (older files) or null: not set on the command line */
    const cJSON *fd = cJSON_GetObjectItemCaseSensitive(o, "feature_dropout");
    if (fd && !cJSON_IsNull(fd)) {
        if ((st = get_number(o, path, "feature_dropout", 0, 0.999999, &v, err))) goto done;
        cfg->feature_dropout = (float)v;
    }
    cfg->precision = LEVI_PRECISION_F32; /* absent in older files */
    const cJSON *pr = cJSON_GetObjectItemCaseSensitive(o, "precision");
    if (pr &&
        (!cJSON_IsString(pr) || (cfg->precision = levi_precision_parse(pr->valuestring)) < 0)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: precision: expected \"f32\" or \"bf16\"", path);
        goto done;
    }
done:
    cJSON_Delete(o);
    return st;
}

/* ---------------------------------------------------------------------------------------
 * Pipeline. */
static void feature_progress(void *user, int64_t done, int64_t total, double tokens_per_s) {
    levi_progress *bar = user;
    (void)total;
    char extra[64];
    snprintf(extra, sizeof extra, "%.0f tok/s", tokens_per_s);
    levi_progress_update(bar, done, extra);
}

/* fit_extract_features with the encoder folder model_dir and a progress-bar label. */
static levi_status extract_features(const fit_config *cfg, const char *model_dir, int max_len,
                                    const char *const *texts, int64_t n, const char *label,
                                    levi_featcache_info *info, levi_features *out,
                                    levi_error *err) {
    levi_featcache_params fp = levi_featcache_default_params();
    if (max_len > 0) fp.max_len = max_len;
    fp.threads = cfg->threads;
    fp.stop = &levi_cli_interrupted;
    levi_progress *bar = levi_progress_start(label, n, "texts");
    fp.progress = feature_progress;
    fp.progress_user = bar;
    levi_status st = levi_featcache_build(cfg->features, model_dir, texts, n, &fp, info, err);
    levi_progress_finish(bar);
    if (st == LEVI_OK) st = levi_featcache_load(info->dir, NULL, 0, out, err);
    return st;
}

levi_status fit_extract_features(const fit_config *cfg, int max_len, const char *const *texts,
                                 int64_t n, levi_featcache_info *info, levi_features *out,
                                 levi_error *err) {
    return extract_features(cfg, cfg->model, max_len, texts, n, "features", info, out, err);
}

/* The line saying whether features were extracted or found in the cache. */
static void print_feature_source(const char *what, const levi_featcache_info *fi) {
    if (fi->chunks_computed == 0)
        printf("%s: reused cache %s (%lld texts, %d layers x %d)\n", what, fi->dir,
               (long long)fi->n, fi->n_layers, fi->dim);
    else
        printf("%s: extracted %d chunk%s (%d reused) into %s in %.1f s; %lld texts "
               "truncated to the max length\n",
               what, fi->chunks_computed, fi->chunks_computed == 1 ? "" : "s", fi->chunks_reused,
               fi->dir, fi->seconds, (long long)fi->truncated);
}

static int need_features(const fit_config *cfg) {
    for (int i = 0; i < cfg->n_methods; i++)
        if (fit_method_needs_features(cfg->methods[i])) return 1;
    return 0;
}

static int load_spec(const fit_config *cfg, const char *cmd, fit_context *ctx) {
    levi_error err = {0};
    levi_status st;
    if (cfg->spec_path[0]) {
        char *text = NULL;
        size_t len = 0;
        if ((st = levi_read_file(cfg->spec_path, &text, &len, &err)) != LEVI_OK) {
            /* A spec that is not there is bad input, whatever errno said. */
            err.status = LEVI_ERR_NOT_FOUND;
            return fit_fail(cmd, &err);
        }
        ctx->spec_text = strdup(text);
        levi_free(text);
        st = levi_spec_load(cfg->spec_path, &ctx->spec, &err);
        snprintf(ctx->spec_json_path, sizeof ctx->spec_json_path, "%s", cfg->spec_path);
    } else {
        const char *text = fit_builtin_spec(cfg->target);
        if (!text) {
            levi_errorf(&err, LEVI_ERR_NOT_FOUND,
                        "%s: no such built-in dataset (expected a spec file or one of the "
                        "names listed by levi fit --help)",
                        cfg->target);
            return fit_fail(cmd, &err);
        }
        ctx->spec_text = strdup(text);
        snprintf(ctx->spec_json_path, sizeof ctx->spec_json_path, "<built-in %.64s spec>",
                 cfg->target);
        st = levi_spec_parse(text, strlen(text), ctx->spec_json_path, NULL, &ctx->spec, &err);
    }
    if (st != LEVI_OK) {
        if (st == LEVI_ERR_IO) err.status = LEVI_ERR_NOT_FOUND;
        return fit_fail(cmd, &err);
    }
    if (cfg->data[0]) levi_spec_set_source_path(ctx->spec, cfg->data);
    /* The spec's method hyperparameters: names this trainer knows, values in range. */
    ctx->feature_dropout = NAN;
    for (int i = 0; i < levi_spec_num_hyperparameters(ctx->spec); i++) {
        double v;
        const char *name = levi_spec_hyperparameter(ctx->spec, i, &v);
        if (strcmp(name, "feature_dropout") != 0) {
            levi_errorf(&err, LEVI_ERR_FORMAT,
                        "%s: hyperparameters.%s: unknown hyperparameter (known: "
                        "feature_dropout)",
                        ctx->spec_json_path, name);
            return fit_fail(cmd, &err);
        }
        if (!(v >= 0 && v < 1)) {
            levi_errorf(&err, LEVI_ERR_FORMAT,
                        "%s: hyperparameters.feature_dropout: expected a probability in [0, 1), "
                        "found %g",
                        ctx->spec_json_path, v);
            return fit_fail(cmd, &err);
        }
        ctx->feature_dropout = (float)v;
    }
    if (!isnan(cfg->feature_dropout)) ctx->feature_dropout = cfg->feature_dropout;
    return LEVI_EXIT_OK;
}

static int build_features(const fit_config *cfg, const char *cmd, fit_context *ctx) {
    levi_error err = {0};
    int64_t n = levi_dataset_num_rows(ctx->ds);
    const char **texts = malloc((size_t)(n > 0 ? n : 1) * sizeof *texts);
    if (!texts) {
        levi_errorf(&err, LEVI_ERR_NOMEM, "out of memory for %lld texts", (long long)n);
        return fit_fail(cmd, &err);
    }
    for (int64_t i = 0; i < n; i++) texts[i] = levi_dataset_text(ctx->ds, i);
    double t0 = levi_now();
    levi_status st = fit_extract_features(cfg, levi_spec_text_max_tokens(ctx->spec), texts, n,
                                          &ctx->feat_info, &ctx->feats, &err);
    free(texts);
    if (st != LEVI_OK) {
        levi_error_prefix(&err, "backbone features (model %s): ", cfg->model);
        return fit_fail(cmd, &err);
    }
    print_feature_source("features", &ctx->feat_info);
    ctx->has_features = 1;
    ctx->feature_seconds = levi_now() - t0;
    return LEVI_EXIT_OK;
}

static int build_task_data(fit_context *ctx) {
    levi_dataset *ds = ctx->ds;
    int64_t n = ctx->n = levi_dataset_num_rows(ds);
    int n_cat = levi_dataset_num_categorical(ds), n_num = levi_dataset_num_numeric(ds);
    int64_t *all = levi_xmalloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) all[i] = i;
    ctx->cat = levi_xmalloc((size_t)(n * n_cat + 1) * sizeof(int32_t));
    ctx->num = levi_xmalloc((size_t)(n * n_num + 1) * sizeof(float));
    levi_dataset_gather_categorical(ds, all, n, NULL, ctx->cat);
    levi_dataset_gather_numeric(ds, all, n, ctx->num);
    levi_free(all);
    ctx->cat_card = levi_xmalloc((size_t)(n_cat + 1) * sizeof(int32_t));
    ctx->cat_mask_group = levi_xmalloc((size_t)(n_cat + 1) * sizeof(int32_t));
    ctx->cat_mask_prob = levi_xmalloc((size_t)(n_cat + 1) * sizeof(float));
    for (int c = 0; c < n_cat; c++) {
        const levi_categorical *k = levi_dataset_categorical(ds, c);
        ctx->cat_card[c] = k->cardinality;
        /* Columns masked together share their leader's index as the group id; the leader's
           mask_prob is the group's. */
        ctx->cat_mask_group[c] = k->mask_leader;
        const levi_categorical *lead = levi_dataset_categorical(ds, k->mask_leader);
        ctx->cat_mask_prob[c] = lead->mask_prob;
    }
    levi_task_data *td = &ctx->td;
    memset(td, 0, sizeof *td);
    td->n = n;
    td->n_cat = n_cat;
    td->cat = ctx->cat;
    td->cat_card = ctx->cat_card;
    td->cat_mask_prob = ctx->cat_mask_prob;
    td->cat_mask_group = ctx->cat_mask_group;
    td->n_num = n_num;
    td->num = ctx->num;
    if (ctx->has_features) {
        td->n_layers = ctx->feats.n_layers;
        td->feat_dim = ctx->feats.dim;
        td->feats = ctx->feats.data;
    }
    if (levi_dataset_task(ds) == LEVI_TASK_CLASSIFICATION) {
        td->n_classes = levi_dataset_num_classes(ds);
        td->yc = levi_dataset_classes(ds);
        ctx->lower_is_better = 0;
    } else {
        td->y = levi_dataset_labels(ds);
        ctx->lower_is_better = 1;
    }
    ctx->train = levi_dataset_split_rows(ds, LEVI_SPLIT_TRAIN, &ctx->n_train);
    ctx->val = levi_dataset_split_rows(ds, LEVI_SPLIT_VAL, &ctx->n_val);
    /* Eval sets: ID val (for the record: the choice was made on it), ID test, all OOD, each
       OOD group. Empty sets (a subsample can empty a small group) are left out. */
    static const struct {
        levi_split split;
        const char *name;
    } fixed[] = {{LEVI_SPLIT_VAL, "id_val"}, {LEVI_SPLIT_TEST, "id_test"}, {LEVI_SPLIT_OOD, "ood"}};
    ctx->n_sets = 0;
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        int64_t cnt;
        const int64_t *rows = levi_dataset_split_rows(ds, fixed[i].split, &cnt);
        if (cnt == 0) continue;
        int k = ctx->n_sets++;
        snprintf(ctx->set_names[k], sizeof ctx->set_names[k], "%s", fixed[i].name);
        ctx->sets[k] = (levi_eval_set){ctx->set_names[k], rows, cnt};
    }
    for (int g = 0; g < levi_dataset_num_groups(ds) && ctx->n_sets < LEVI_MAX_EVAL_SETS; g++) {
        int64_t cnt;
        const int64_t *rows = levi_dataset_group_rows(ds, g, &cnt);
        if (cnt == 0) continue;
        int k = ctx->n_sets++;
        snprintf(ctx->set_names[k], sizeof ctx->set_names[k], "ood/%s",
                 levi_dataset_group_name(ds, g));
        ctx->sets[k] = (levi_eval_set){ctx->set_names[k], rows, cnt};
    }
    return LEVI_EXIT_OK;
}

int fit_context_open(const fit_config *cfg, const char *cmd, int flags, fit_context *ctx) {
    int print_summary = flags & FIT_OPEN_SUMMARY;
    memset(ctx, 0, sizeof *ctx);
    double t0 = levi_now();
    if (cfg->threads > 0) levi_set_num_threads(cfg->threads);
    /* ${LEVI_CACHE} in specs (the built-in one names the RecBole copy there) expands to the
       cache this run uses, even when the variable is unset. */
    setenv("LEVI_CACHE", cfg->cache, 1);
    int rc = load_spec(cfg, cmd, ctx);
    if (rc != LEVI_EXIT_OK) goto fail;
    levi_error err = {0};
    levi_status st = levi_dataset_load(ctx->spec, &ctx->ds, &err);
    if (st != LEVI_OK) {
        /* Missing or unreadable data is the user's input, not a failure of levi. */
        if (st == LEVI_ERR_IO) err.status = LEVI_ERR_NOT_FOUND;
        if (!cfg->data[0] && !cfg->spec_path[0] && strcmp(cfg->target, "movielens") == 0)
            levi_error_prefix(&err, "no usable MovieLens data (run scripts/setup.sh, or pass "
                                    "--data DIR: a GroupLens ml-100k folder or RecBole atomic "
                                    "files): ");
        else if (!cfg->data[0])
            levi_error_prefix(&err,
                              "no usable data for %s (set LEVI_DATA_DIR to the folder the "
                              "spec's source.path names, or pass --data PATH): ",
                              cfg->target);
        rc = fit_fail(cmd, &err);
        goto fail;
    }
    if (print_summary) levi_dataset_summary(ctx->ds, stdout);
    if ((st = levi_dataset_check_expected(ctx->ds, &err)) != LEVI_OK) {
        levi_error_prefix(&err, "dataset self-check against the spec's expect block failed: ");
        rc = fit_fail(cmd, &err);
        goto fail;
    }
    if (cfg->subsample_frac < 1 || cfg->subsample_rows > 0) {
        levi_dataset *sub = NULL;
        st = levi_dataset_subsample(ctx->ds, cfg->subsample_frac, cfg->subsample_rows, 0, &sub,
                                    &err);
        if (st != LEVI_OK) {
            rc = fit_fail(cmd, &err);
            goto fail;
        }
        levi_dataset_free(ctx->ds);
        ctx->ds = sub;
        if (print_summary) {
            printf("subsample (--subsample):\n");
            levi_dataset_summary(ctx->ds, stdout);
        }
    }
    levi_dataset_checksum(ctx->ds, ctx->checksum);
    if (levi_dataset_split_rows(ctx->ds, LEVI_SPLIT_TRAIN, &ctx->n_train) && ctx->n_train == 0) {
        levi_errorf(&err, LEVI_ERR_FORMAT, "%s: the dataset has no ID-train rows",
                    ctx->spec_json_path);
        rc = fit_fail(cmd, &err);
        goto fail;
    }
    ctx->load_seconds = levi_now() - t0;
    fflush(stdout);
    if (need_features(cfg) && !(flags & FIT_OPEN_NO_FEATURES)) {
        if (!levi_dataset_has_text(ctx->ds)) {
            levi_errorf(&err, LEVI_ERR_ARG,
                        "%s: the spec has no \"text\" template, but a chosen method needs "
                        "backbone features (choose methods among a4, a5, bias)",
                        ctx->spec_json_path);
            rc = fit_fail(cmd, &err);
            goto fail;
        }
        if ((rc = build_features(cfg, cmd, ctx)) != LEVI_EXIT_OK) goto fail;
    }
    if ((rc = build_task_data(ctx)) != LEVI_EXIT_OK) goto fail;
    return LEVI_EXIT_OK;
fail:
    fit_context_close(ctx);
    return rc;
}

int fit_context_backbone_view(const fit_config *cfg, const fit_context *ctx, const char *model_dir,
                              const char *cmd, const char *label, fit_context *view) {
    memset(view, 0, sizeof *view);
    levi_error err = {0};
    if (!levi_dataset_has_text(ctx->ds)) {
        levi_errorf(&err, LEVI_ERR_ARG,
                    "%s: the spec has no \"text\" template, but LEVI on a tuned backbone needs "
                    "backbone features",
                    ctx->spec_json_path);
        return fit_fail(cmd, &err);
    }
    const int64_t n = ctx->n;
    const char **texts = malloc((size_t)(n > 0 ? n : 1) * sizeof *texts);
    if (!texts) {
        levi_errorf(&err, LEVI_ERR_NOMEM, "out of memory for %lld texts", (long long)n);
        return fit_fail(cmd, &err);
    }
    for (int64_t i = 0; i < n; i++) texts[i] = levi_dataset_text(ctx->ds, i);
    levi_featcache_info info;
    levi_features feats;
    memset(&feats, 0, sizeof feats);
    double t0 = levi_now();
    levi_status st = extract_features(cfg, model_dir, levi_spec_text_max_tokens(ctx->spec), texts,
                                      n, label, &info, &feats, &err);
    free(texts);
    if (st != LEVI_OK) {
        levi_error_prefix(&err, "features of the tuned backbone %s: ", model_dir);
        return fit_fail(cmd, &err);
    }
    print_feature_source(label, &info);
    /* Everything but the features is ctx's: the rows, labels, splits and eval sets are the
       same, so the runs differ from frozen LEVI's by the backbone alone. */
    *view = *ctx;
    view->feats = feats;
    view->feat_info = info;
    view->has_features = 1;
    view->feature_seconds = levi_now() - t0;
    view->td.n_layers = feats.n_layers;
    view->td.feat_dim = feats.dim;
    view->td.feats = feats.data;
    return LEVI_EXIT_OK;
}

void fit_context_view_close(fit_context *view) {
    levi_features_free(&view->feats);
    memset(view, 0, sizeof *view);
}

void fit_context_close(fit_context *ctx) {
    levi_dataset_free(ctx->ds);
    levi_spec_free(ctx->spec);
    levi_features_free(&ctx->feats);
    free(ctx->spec_text);
    levi_free(ctx->cat);
    levi_free(ctx->num);
    levi_free(ctx->cat_card);
    levi_free(ctx->cat_mask_group);
    levi_free(ctx->cat_mask_prob);
    memset(ctx, 0, sizeof *ctx);
}

/* ---------------------------------------------------------------------------------------
 * Evaluation of one model into a run result. */
static void adapter_name(const levi_model *m, int j, char *out, size_t cap) {
    int layer = levi_model_adapter_layer(m, j);
    int small = levi_model_head_params(m)->use_small;
    if (layer < 0)
        snprintf(out, cap, "head%d (small model)", j);
    else if (small)
        snprintf(out, cap, "small+layer%d", layer);
    else
        snprintf(out, cap, "layer%d", layer);
}

void fit_result_nan_sets(const fit_context *ctx, cJSON *r) {
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
}

levi_status fit_evaluate_run(fit_context *ctx, levi_model *m, cJSON *result, levi_error *err) {
    int n_adapters = levi_model_n_adapters(m);
    cJSON *adapters = cJSON_CreateArray();
    for (int j = 0; j < n_adapters; j++) {
        char name[64];
        adapter_name(m, j, name, sizeof name);
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "name", name);
        cJSON_AddNumberToObject(a, "layer", levi_model_adapter_layer(m, j));
        cJSON_AddItemToArray(adapters, a);
    }
    cJSON *sets = cJSON_CreateArray();
    double t0 = levi_now();
    for (int k = 0; k < ctx->n_sets; k++) {
        levi_metrics mt;
        levi_status st = levi_evaluate(m, &ctx->td, ctx->sets[k].rows, ctx->sets[k].n, &mt, err);
        if (st != LEVI_OK) {
            cJSON_Delete(adapters);
            cJSON_Delete(sets);
            return levi_error_prefix(err, "evaluating on %s: ", ctx->sets[k].name);
        }
        cJSON *s = cJSON_CreateObject();
        cJSON_AddStringToObject(s, "name", ctx->sets[k].name);
        cJSON_AddNumberToObject(s, "n", (double)ctx->sets[k].n);
        cJSON_AddNumberToObject(s, "value", mt.metric);
        cJSON_AddNumberToObject(s, "loss", mt.loss);
        cJSON *per = cJSON_AddArrayToObject(s, "adapters");
        for (int j = 0; j < mt.n_adapters; j++)
            cJSON_AddItemToArray(per, cJSON_CreateNumber(mt.adapter_metric[j]));
        cJSON_AddItemToArray(sets, s);
    }
    cJSON_DeleteItemFromObjectCaseSensitive(result, "adapters");
    cJSON_DeleteItemFromObjectCaseSensitive(result, "sets");
    cJSON_DeleteItemFromObjectCaseSensitive(result, "eval_seconds");
    cJSON_AddItemToObject(result, "adapters", adapters);
    cJSON_AddItemToObject(result, "sets", sets);
    cJSON_AddNumberToObject(result, "eval_seconds", levi_now() - t0);
    return LEVI_OK;
}

/* ---------------------------------------------------------------------------------------
 * Results header. */
cJSON *fit_results_header(const fit_config *cfg, const fit_context *ctx, const char *generated_by) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "format", "levi-results");
    cJSON_AddNumberToObject(r, "version", 1);
    cJSON_AddStringToObject(r, "task", cfg->spec_path[0] ? levi_spec_name(ctx->spec) : cfg->target);
    int cls = levi_dataset_task(ctx->ds) == LEVI_TASK_CLASSIFICATION;
    cJSON_AddStringToObject(r, "metric", cls ? "accuracy" : "rmse");
    cJSON_AddBoolToObject(r, "lower_is_better", !cls);
    cJSON_AddStringToObject(r, "generated_by", generated_by);
#ifdef LEVI_VERSION_STRING
    cJSON_AddStringToObject(r, "levi_version", LEVI_VERSION_STRING);
#else
    cJSON_AddStringToObject(r, "levi_version", "0.1.0");
#endif
    /* Results are deterministic for a seed, a thread count and this back end; another back end
     * rounds differently (a saved run is still reused: its config does not name it). */
    cJSON_AddStringToObject(r, "gemm", levi_gemm_backend());
    char when[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    cJSON_AddStringToObject(r, "created", when);

    cJSON *c = fit_config_to_json(cfg);
    cJSON_DeleteItemFromObjectCaseSensitive(c, "format");
    cJSON_DeleteItemFromObjectCaseSensitive(c, "version");
    cJSON_AddStringToObject(c, "spec_loaded", ctx->spec_json_path);
    char src[FIT_PATH_MAX];
    levi_error err;
    if (levi_spec_source_path(ctx->spec, src, sizeof src, &err) != LEVI_OK) src[0] = 0;
    cJSON_DeleteItemFromObjectCaseSensitive(c, "data");
    cJSON_AddStringToObject(c, "data", src[0] ? src : cfg->data);
    char feat[FIT_PATH_MAX];
    snprintf(feat, sizeof feat, "%s", ctx->has_features ? ctx->feat_info.dir : "none");
    cJSON_AddStringToObject(c, "features_dir", feat);
    cJSON_AddNumberToObject(c, "first_seed", 0);
    if (cfg->subsample_frac < 1 || cfg->subsample_rows > 0) {
        char sub[64];
        if (cfg->subsample_rows > 0)
            snprintf(sub, sizeof sub, "%lld rows", (long long)cfg->subsample_rows);
        else
            snprintf(sub, sizeof sub, "%g of the rows", cfg->subsample_frac);
        cJSON_AddStringToObject(c, "subsample", sub);
    } else {
        cJSON_AddNullToObject(c, "subsample");
    }
    cJSON_AddItemToObject(r, "config", c);

    levi_dataset *ds = ctx->ds;
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "name", levi_dataset_name(ds));
    cJSON_AddStringToObject(d, "checksum", ctx->checksum);
    cJSON_AddNumberToObject(d, "rows", (double)levi_dataset_num_rows(ds));
    static const struct {
        levi_split s;
        const char *name;
    } splits[] = {{LEVI_SPLIT_TRAIN, "train"},
                  {LEVI_SPLIT_VAL, "val"},
                  {LEVI_SPLIT_TEST, "test"},
                  {LEVI_SPLIT_OOD, "ood"},
                  {LEVI_SPLIT_EXCLUDED, "excluded"}};
    for (size_t i = 0; i < sizeof splits / sizeof splits[0]; i++) {
        int64_t cnt;
        levi_dataset_split_rows(ds, splits[i].s, &cnt);
        cJSON_AddNumberToObject(d, splits[i].name, (double)cnt);
    }
    cJSON *groups = cJSON_AddArrayToObject(d, "groups");
    for (int g = 0; g < levi_dataset_num_groups(ds); g++) {
        int64_t cnt;
        levi_dataset_group_rows(ds, g, &cnt);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", levi_dataset_group_name(ds, g));
        cJSON_AddNumberToObject(o, "n", (double)cnt);
        cJSON_AddItemToArray(groups, o);
    }
    cJSON_AddItemToObject(r, "dataset", d);

    cJSON *f = cJSON_CreateObject();
    if (ctx->has_features) {
        cJSON_AddStringToObject(f, "key", ctx->feat_info.key);
        cJSON_AddStringToObject(f, "dir", ctx->feat_info.dir);
        cJSON_AddNumberToObject(f, "n_layers", ctx->feats.n_layers);
        cJSON *l = cJSON_AddArrayToObject(f, "layers");
        for (int i = 0; i < ctx->feats.n_layers; i++)
            cJSON_AddItemToArray(l, cJSON_CreateNumber(ctx->feats.layers[i]));
        cJSON_AddNumberToObject(f, "dim", ctx->feats.dim);
        cJSON_AddStringToObject(f, "dtype", levi_dtype_name(ctx->feat_info.dtype));
        cJSON_AddNumberToObject(f, "chunks_computed", ctx->feat_info.chunks_computed);
        cJSON_AddNumberToObject(f, "encoder_seconds", ctx->feat_info.seconds);
        cJSON_AddNumberToObject(f, "truncated", (double)ctx->feat_info.truncated);
    }
    cJSON_AddItemToObject(r, "features", f);
    return r;
}
