/* `levi eval <out-dir>`: reloads the checkpoints a `levi fit` left in <out-dir>/runs and
 * recomputes every metric and the reports (results.json, results.csv, report.md) without
 * training. It rebuilds the same dataset and features from <out-dir>/fit.json and refuses
 * checkpoints that were trained on different data.
 * Not for: training or choosing learning rates (the choice recorded by fit is kept). */
#include "cli.h"
#include "fit.h"
#include "report.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void eval_usage(FILE *f) {
    fprintf(f, "usage: levi eval <out-dir> [--threads N] [--no-progress]\n"
               "\n"
               "Reloads the checkpoints of a finished `levi fit` in <out-dir> and recomputes the\n"
               "metrics and reports (results.json, results.csv, report.md) without training.\n"
               "The learning rates chosen by the fit are kept.\n");
}

static int is_file(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static double id_val_of(const cJSON *r) {
    const cJSON *s;
    cJSON_ArrayForEach(s, cJSON_GetObjectItemCaseSensitive(r, "sets")) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(s, "name");
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, "value");
        if (cJSON_IsString(n) && strcmp(n->valuestring, "id_val") == 0)
            return cJSON_IsNumber(v) ? v->valuedouble : NAN;
    }
    return NAN;
}

/* Re-evaluates one run folder; *out gets the updated run result. Exit code. */
static int eval_run(fit_context *ctx, const char *dir, cJSON **out) {
    *out = NULL;
    char result_path[FIT_PATH_MAX + 32], ckpt[FIT_PATH_MAX + 32], conf_path[FIT_PATH_MAX + 32];
    fit_path(result_path, sizeof result_path, "%s/result.json", dir);
    fit_path(ckpt, sizeof ckpt, "%s/model.safetensors", dir);
    fit_path(conf_path, sizeof conf_path, "%s/config.json", dir);
    levi_error err = {0};
    cJSON *r = fit_read_json(result_path, &err);
    if (!r) {
        fprintf(stderr,
                "levi eval: %s (the run did not finish; run `levi fit` again to finish "
                "it)\n",
                err.msg);
        return LEVI_EXIT_INPUT;
    }
    cJSON *conf = fit_read_json(conf_path, &err);
    const cJSON *cs = cJSON_GetObjectItemCaseSensitive(conf, "dataset_checksum");
    if (!cJSON_IsString(cs) || strcmp(cs->valuestring, ctx->checksum) != 0) {
        fprintf(stderr,
                "levi eval: %s: dataset_checksum: expected %s (the data rebuilt from fit.json), "
                "found %s; the data changed since the fit\n",
                conf_path, ctx->checksum, cJSON_IsString(cs) ? cs->valuestring : "nothing");
        cJSON_Delete(conf);
        cJSON_Delete(r);
        return LEVI_EXIT_INPUT;
    }
    cJSON_Delete(conf);
    const cJSON *train = cJSON_GetObjectItemCaseSensitive(r, "train");
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(train, "diverged")) && !is_file(ckpt)) {
        *out = r; /* nothing to evaluate: metrics stay NaN */
        return LEVI_EXIT_OK;
    }
    levi_model *m = NULL;
    levi_status st = levi_model_load(&m, ckpt, &err);
    if (st == LEVI_OK) st = fit_evaluate_run(ctx, m, r, &err);
    levi_model_free(m);
    if (st != LEVI_OK) {
        cJSON_Delete(r);
        if (st == LEVI_ERR_IO) err.status = LEVI_ERR_NOT_FOUND;
        return fit_fail("eval", &err);
    }
    *out = fit_json_roundtrip(r);
    return LEVI_EXIT_OK;
}

int levi_cmd_eval(int argc, char **argv) {
    const char *out_dir = NULL;
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            eval_usage(stdout);
            return LEVI_EXIT_OK;
        } else if (strcmp(a, "--no-progress") == 0) {
            setenv("LEVI_PROGRESS", "0", 1);
        } else if (strcmp(a, "--threads") == 0 || strncmp(a, "--threads=", 10) == 0) {
            const char *v = a[9] == '=' ? a + 10 : (i + 1 < argc ? argv[++i] : NULL);
            char *end;
            long t = v ? strtol(v, &end, 10) : 0;
            if (!v || !*v || *end || t < 1 || t > 4096) {
                fprintf(stderr,
                        "levi eval: --threads: expected an integer in [1, 4096], found "
                        "'%s'\n",
                        v ? v : "nothing");
                return LEVI_EXIT_USAGE;
            }
            threads = (int)t;
        } else if (a[0] == '-') {
            fprintf(stderr, "levi eval: unknown option '%s' (see levi eval --help)\n", a);
            return LEVI_EXIT_USAGE;
        } else if (out_dir) {
            fprintf(stderr, "levi eval: unexpected argument '%s' (one output folder only)\n", a);
            return LEVI_EXIT_USAGE;
        } else {
            out_dir = a;
        }
    }
    if (!out_dir) {
        fprintf(stderr, "levi eval: missing the output folder of a fit (see levi eval --help)\n");
        return LEVI_EXIT_USAGE;
    }
    double t0 = levi_now();
    char fit_json[FIT_PATH_MAX + 32];
    fit_path(fit_json, sizeof fit_json, "%s/fit.json", out_dir);
    fit_config cfg;
    levi_error err = {0};
    if (fit_config_from_json(fit_json, &cfg, &err) != LEVI_OK) {
        fprintf(stderr, "levi eval: %s (expected the output folder of `levi fit`)\n", err.msg);
        return LEVI_EXIT_INPUT;
    }
    /* The folder may have moved since the fit: runs are found where it is now. */
    if (!realpath(out_dir, cfg.out)) fit_path(cfg.out, sizeof cfg.out, "%s", out_dir);
    if (threads) cfg.threads = threads;

    fit_context ctx;
    int rc = fit_context_open(&cfg, "eval", 0, &ctx);
    if (rc != LEVI_EXIT_OK) return rc;
    cJSON *results = fit_results_header(&cfg, &ctx, "eval");
    cJSON *methods = cJSON_AddArrayToObject(results, "methods");
    for (int i = 0; i < cfg.n_methods && rc == LEVI_EXIT_OK; i++) {
        int method = cfg.methods[i];
        if (method >= FIT_FT_BASE) {
            /* Their runs hold an encoder, not a head checkpoint: levi fit reuses finished runs
               instead. */
            printf("%s: re-evaluation of fine-tuning runs is not implemented; skipped\n",
                   fit_method_name(method));
            continue;
        }
        const char *name = fit_method_name(method);
        cJSON *entry = cJSON_CreateObject();
        cJSON_AddStringToObject(entry, "method", name);
        cJSON_AddStringToObject(entry, "label", levi_report_method_label(name));
        cJSON_AddItemToArray(methods, entry);
        cJSON *runs = cJSON_AddArrayToObject(entry, "runs");
        double chosen = NAN, seed0_val = NAN;
        for (int seed = 0; seed < cfg.seeds && rc == LEVI_EXIT_OK; seed++) {
            char dir[FIT_PATH_MAX];
            fit_run_dir(&cfg, method, seed, dir, sizeof dir);
            cJSON *r = NULL;
            rc = eval_run(&ctx, dir, &r);
            if (!r) break;
            if (seed == 0) {
                const cJSON *lr = cJSON_GetObjectItemCaseSensitive(r, "lr");
                chosen = cJSON_IsNumber(lr) ? lr->valuedouble : NAN;
                seed0_val = id_val_of(r);
            }
            cJSON_AddItemToArray(runs, r);
            printf("%s seed %d: re-evaluated\n", name, seed);
        }
        /* The selection history: other candidates' ID-val metrics as recorded by fit. */
        float grid[LEVI_MAX_GRID];
        int n_lr = fit_lr_grid(&cfg, method, grid);
        cJSON *jg = cJSON_AddArrayToObject(entry, "lr_grid");
        cJSON *jv = cJSON_AddArrayToObject(entry, "lr_val");
        for (int k = 0; k < n_lr; k++) {
            double v = NAN;
            if (fit_float_json(grid[k]) == chosen) {
                v = seed0_val;
            } else {
                char dir[FIT_PATH_MAX], p[FIT_PATH_MAX + 32];
                fit_search_dir(&cfg, method, grid[k], dir, sizeof dir);
                fit_path(p, sizeof p, "%s/result.json", dir);
                levi_error e2;
                cJSON *c = is_file(p) ? fit_read_json(p, &e2) : NULL;
                if (c) v = id_val_of(c);
                cJSON_Delete(c);
            }
            cJSON_AddItemToArray(jg, cJSON_CreateNumber(fit_float_json(grid[k])));
            cJSON_AddItemToArray(jv, cJSON_CreateNumber(v));
        }
        cJSON_AddNumberToObject(entry, "chosen_lr", chosen);
        levi_report_summarize_method(entry);
    }
    if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
    if (rc == LEVI_EXIT_OK) {
        cJSON *w = cJSON_AddObjectToObject(results, "wall_s");
        cJSON_AddNumberToObject(w, "load", ctx.load_seconds);
        cJSON_AddNumberToObject(w, "features", ctx.feature_seconds);
        cJSON_AddNumberToObject(w, "total", levi_now() - t0);
        if (levi_report_write(cfg.out, results, &err) != LEVI_OK) {
            rc = fit_fail("eval", &err);
        } else {
            printf("\n");
            levi_report_print_table1(stdout, results);
            printf("\nwrote %s/results.json, results.csv, report.md (%.1f s)\n", cfg.out,
                   levi_now() - t0);
        }
    }
    cJSON_Delete(results);
    fit_context_close(&ctx);
    return rc;
}
