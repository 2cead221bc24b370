/* `levi predict <out-dir> --method M --input rows.(csv|tsv|jsonl) --output preds.csv`:
 * predictions of a fitted method for new rows of the same schema. The training dataset is
 * rebuilt from <out-dir>/fit.json (for its vocabularies and numeric statistics), the new
 * rows' categorical values are mapped through those vocabularies (values never seen in
 * training go to the unknown slot 0), their texts are rendered by the data layer with the
 * fit's spec, as the training texts were, and encoded by the backbone (through the feature
 * cache), and every
 * seed's checkpoint predicts; the output holds the mean over seeds and each seed's value.
 * Not for: training or evaluation (fit.c, eval.c); input rows need no label column. */
#include "cli.h"
#include "fit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void predict_usage(FILE *f) {
    fprintf(f,
            "usage: levi predict <out-dir> --method NAME --input ROWS --output PREDS.csv\n"
            "                    [--seed K] [--threads N] [--no-progress]\n"
            "\n"
            "Predicts with the checkpoints a `levi fit` left in <out-dir> for new rows with the\n"
            "same columns as the training data (the label column is not needed). ROWS is a\n"
            ".csv (comma, RFC 4180 quotes), .tsv (tab, no quoting) or .jsonl file with a header\n"
            "(keys). Values never seen in training map to the unknown slot. The output has one\n"
            "line per input row: row (0-based), prediction (mean over seeds), then each seed's\n"
            "prediction; for classification the predicted class and the mean probabilities.\n"
            "  --seed K     use only seed K's checkpoint\n");
}

/* ---------------------------------------------------------------------------------------
 * Vocabulary lookup: the dataset's vocabulary sorted once, then binary search. */
typedef struct vocab_index {
    const char *const *vocab;
    int32_t *order; /* ids 1..card-1 sorted by string */
    int32_t n;
} vocab_index;

static const char *const *g_sort_vocab; /* qsort has no user pointer in C11 */
static int cmp_vocab_ids(const void *a, const void *b) {
    return strcmp(g_sort_vocab[*(const int32_t *)a], g_sort_vocab[*(const int32_t *)b]);
}

static void vocab_index_init(vocab_index *vi, const levi_categorical *c) {
    vi->vocab = c->vocab;
    vi->n = c->cardinality - 1;
    vi->order = levi_xmalloc((size_t)(vi->n + 1) * sizeof(int32_t));
    for (int32_t j = 0; j < vi->n; j++) vi->order[j] = j + 1;
    g_sort_vocab = c->vocab;
    qsort(vi->order, (size_t)vi->n, sizeof(int32_t), cmp_vocab_ids);
}

static int32_t vocab_lookup(const vocab_index *vi, const char *s) {
    int32_t lo = 0, hi = vi->n - 1;
    while (lo <= hi) {
        int32_t mid = lo + (hi - lo) / 2;
        int c = strcmp(vi->vocab[vi->order[mid]], s);
        if (c == 0) return vi->order[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return 0; /* unknown slot */
}

static const char *ext_of(const char *path) {
    const char *slash = strrchr(path, '/');
    const char *dot = strrchr(slash ? slash : path, '.');
    return dot ? dot + 1 : "";
}

static levi_status read_rows(const char *path, levi_table **out, levi_error *err) {
    const char *ext = ext_of(path);
    if (strcmp(ext, "jsonl") == 0 || strcmp(ext, "ndjson") == 0)
        return levi_table_read_jsonl(path, LEVI_ENCODING_UTF8, out, err);
    levi_table_read_params p = levi_table_default_read_params();
    if (strcmp(ext, "tsv") == 0 || strcmp(ext, "tab") == 0) {
        p.delimiter = '\t';
        p.quoting = 0;
    } else if (strcmp(ext, "csv") != 0) {
        return levi_errorf(err, LEVI_ERR_ARG,
                           "--input %s: expected a .csv, .tsv or .jsonl file, found '.%s'", path,
                           ext);
    }
    return levi_table_read_delimited(path, &p, out, err);
}

typedef struct predict_args {
    const char *out_dir, *method, *input, *output;
    int seed, threads;
} predict_args;

static int parse_predict_args(int argc, char **argv, predict_args *a, int *help) {
    memset(a, 0, sizeof *a);
    a->seed = -1;
    *help = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            *help = 1;
            return LEVI_EXIT_OK;
        }
        if (strcmp(arg, "--no-progress") == 0) {
            setenv("LEVI_PROGRESS", "0", 1);
            continue;
        }
        if (arg[0] != '-') {
            if (a->out_dir) {
                fprintf(stderr, "levi predict: unexpected argument '%s'\n", arg);
                return LEVI_EXIT_USAGE;
            }
            a->out_dir = arg;
            continue;
        }
        char name[64];
        const char *eq = strchr(arg, '=');
        size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
        if (len >= sizeof name) len = sizeof name - 1;
        memcpy(name, arg, len);
        name[len] = 0;
        const char *v = eq ? eq + 1 : NULL;
        int known = strcmp(name, "--method") == 0 || strcmp(name, "--input") == 0 ||
                    strcmp(name, "--output") == 0 || strcmp(name, "--seed") == 0 ||
                    strcmp(name, "--threads") == 0;
        if (!known) {
            fprintf(stderr, "levi predict: unknown option '%s' (see levi predict --help)\n", name);
            return LEVI_EXIT_USAGE;
        }
        if (!v) {
            if (i + 1 >= argc) {
                fprintf(stderr, "levi predict: %s expects a value\n", name);
                return LEVI_EXIT_USAGE;
            }
            v = argv[++i];
        }
        if (strcmp(name, "--method") == 0)
            a->method = v;
        else if (strcmp(name, "--input") == 0)
            a->input = v;
        else if (strcmp(name, "--output") == 0)
            a->output = v;
        else {
            char *end;
            long x = strtol(v, &end, 10);
            int is_seed = strcmp(name, "--seed") == 0;
            if (!*v || *end || x < (is_seed ? 0 : 1) || x > (is_seed ? FIT_MAX_SEEDS - 1 : 4096)) {
                fprintf(stderr, "levi predict: %s: expected an integer in [%d, %d], found '%s'\n",
                        name, is_seed ? 0 : 1, is_seed ? FIT_MAX_SEEDS - 1 : 4096, v);
                return LEVI_EXIT_USAGE;
            }
            if (is_seed)
                a->seed = (int)x;
            else
                a->threads = (int)x;
        }
    }
    if (!a->out_dir || !a->method || !a->input || !a->output) {
        fprintf(stderr, "levi predict: expected <out-dir> --method NAME --input ROWS --output "
                        "PREDS.csv (see levi predict --help)\n");
        return LEVI_EXIT_USAGE;
    }
    return LEVI_EXIT_OK;
}

/* The new rows as model input. */
typedef struct new_rows {
    int64_t n;
    int32_t *cat;
    float *num, *y;
    int32_t *yc;
    levi_features feats;
    levi_task_data td;
} new_rows;

static void new_rows_free(new_rows *r) {
    levi_free(r->cat);
    levi_free(r->num);
    levi_free(r->y);
    levi_free(r->yc);
    levi_features_free(&r->feats);
}

/* Categorical ids, numeric values and (when needed) features of the new rows. */
static int build_rows(const fit_config *cfg, fit_context *ctx, const levi_table *in, int need_feats,
                      new_rows *r) {
    levi_error err = {0};
    levi_dataset *ds = ctx->ds;
    int64_t n = r->n = levi_table_num_rows(in);
    int n_cat = levi_dataset_num_categorical(ds), n_num = levi_dataset_num_numeric(ds);
    r->cat = levi_xcalloc((size_t)(n * n_cat + 1), sizeof(int32_t));
    r->num = levi_xcalloc((size_t)(n * n_num + 1), sizeof(float));
    r->y = levi_xcalloc((size_t)(n + 1), sizeof(float));
    r->yc = levi_xcalloc((size_t)(n + 1), sizeof(int32_t));
    char list[512];
    int64_t unknown_total = 0;
    for (int c = 0; c < n_cat; c++) {
        const levi_categorical *k = levi_dataset_categorical(ds, c);
        int col = levi_table_find_column(in, k->name);
        if (col < 0) {
            levi_errorf(&err, LEVI_ERR_FORMAT,
                        "%s:1: expected a column \"%s\" (a categorical input of the fit), found "
                        "only: %s",
                        levi_table_source(in), k->name,
                        levi_table_column_list(in, list, sizeof list));
            return fit_fail("predict", &err);
        }
        vocab_index vi;
        vocab_index_init(&vi, k);
        int64_t unknown = 0;
        for (int64_t i = 0; i < n; i++) {
            int32_t id = vocab_lookup(&vi, levi_table_cell(in, i, col));
            r->cat[i * n_cat + c] = id;
            unknown += id == 0;
        }
        levi_free(vi.order);
        if (unknown)
            printf("  %s: %lld of %lld values unseen in training -> unknown slot\n", k->name,
                   (long long)unknown, (long long)n);
        unknown_total += unknown;
    }
    for (int j = 0; j < n_num; j++) {
        const levi_numeric *k = levi_dataset_numeric(ds, j);
        int col = levi_table_find_column(in, k->name);
        if (col < 0) {
            levi_errorf(&err, LEVI_ERR_FORMAT,
                        "%s:1: expected a column \"%s\" (a numeric input of the fit), found only: "
                        "%s",
                        levi_table_source(in), k->name,
                        levi_table_column_list(in, list, sizeof list));
            return fit_fail("predict", &err);
        }
        for (int64_t i = 0; i < n; i++) {
            const char *s = levi_table_cell(in, i, col);
            char *end;
            double v = strtod(s, &end);
            if (!*s || *end || !isfinite(v)) {
                levi_errorf(&err, LEVI_ERR_FORMAT, "%s:%lld: %s: expected a number, found \"%s\"",
                            levi_table_source(in), (long long)levi_table_line(in, i), k->name, s);
                return fit_fail("predict", &err);
            }
            r->num[i * n_num + j] = (float)((v - k->mean) / k->std);
        }
    }
    if (need_feats) {
        char **texts = levi_xcalloc((size_t)n, sizeof *texts);
        levi_status st = LEVI_OK;
        for (int64_t i = 0; i < n && st == LEVI_OK; i++)
            st = levi_spec_render_text(ctx->spec, in, i, &texts[i], &err);
        if (st == LEVI_OK) {
            printf("  text[0]: %s\n", texts[0]);
            levi_featcache_info info;
            st = fit_extract_features(cfg, levi_spec_text_max_tokens(ctx->spec),
                                      (const char *const *)texts, n, &info, &r->feats, &err);
        }
        for (int64_t i = 0; i < n; i++) free(texts[i]);
        levi_free(texts);
        if (st != LEVI_OK) return fit_fail("predict", &err);
    }
    levi_task_data *td = &r->td;
    *td = ctx->td; /* shapes, cardinalities and mask settings of the fit */
    td->n = n;
    td->cat = r->cat;
    td->num = r->num;
    td->feats = need_feats ? r->feats.data : NULL;
    td->n_layers = need_feats ? r->feats.n_layers : 0;
    td->feat_dim = need_feats ? r->feats.dim : 0;
    if (td->n_classes) {
        td->yc = r->yc;
        td->y = NULL;
    } else {
        td->y = r->y;
        td->yc = NULL;
    }
    (void)unknown_total;
    return LEVI_EXIT_OK;
}

int levi_cmd_predict(int argc, char **argv) {
    predict_args a;
    int help;
    int rc = parse_predict_args(argc, argv, &a, &help);
    if (rc != LEVI_EXIT_OK) return rc;
    if (help) {
        predict_usage(stdout);
        return LEVI_EXIT_OK;
    }
    int method = levi_method_parse(a.method);
    if (method < 0) {
        fprintf(stderr, "levi predict: --method: unknown method '%s'\n", a.method);
        return LEVI_EXIT_USAGE;
    }
    char fit_json[FIT_PATH_MAX + 32];
    fit_path(fit_json, sizeof fit_json, "%s/fit.json", a.out_dir);
    fit_config cfg;
    levi_error err = {0};
    if (fit_config_from_json(fit_json, &cfg, &err) != LEVI_OK) {
        fprintf(stderr, "levi predict: %s (expected the output folder of `levi fit`)\n", err.msg);
        return LEVI_EXIT_INPUT;
    }
    if (!realpath(a.out_dir, cfg.out)) fit_path(cfg.out, sizeof cfg.out, "%s", a.out_dir);
    if (a.threads) cfg.threads = a.threads;
    int fitted = 0;
    for (int i = 0; i < cfg.n_methods; i++) fitted |= cfg.methods[i] == method;
    if (!fitted) {
        fprintf(stderr, "levi predict: --method %s: this fit did not train it (see %s)\n", a.method,
                fit_json);
        return LEVI_EXIT_USAGE;
    }
    if (a.seed >= cfg.seeds) {
        fprintf(stderr, "levi predict: --seed %d: the fit trained seeds 0..%d\n", a.seed,
                cfg.seeds - 1);
        return LEVI_EXIT_USAGE;
    }
    levi_table *in = NULL;
    if (read_rows(a.input, &in, &err) != LEVI_OK) {
        fprintf(stderr, "levi predict: %s\n", err.msg);
        return err.status == LEVI_ERR_ARG ? LEVI_EXIT_USAGE : LEVI_EXIT_INPUT;
    }
    if (levi_table_num_rows(in) == 0) {
        fprintf(stderr, "levi predict: %s: expected at least one row, found none\n", a.input);
        levi_table_free(in);
        return LEVI_EXIT_INPUT;
    }
    fit_context ctx;
    if ((rc = fit_context_open(&cfg, "predict", FIT_OPEN_NO_FEATURES, &ctx)) != LEVI_EXIT_OK) {
        levi_table_free(in);
        return rc;
    }
    int need_feats = fit_method_needs_features(method);
    new_rows rows;
    memset(&rows, 0, sizeof rows);
    printf("predict: %lld rows from %s with %s\n", (long long)levi_table_num_rows(in), a.input,
           a.method);
    if (rc == LEVI_EXIT_OK) rc = build_rows(&cfg, &ctx, in, need_feats, &rows);

    int s0 = a.seed >= 0 ? a.seed : 0, s1 = a.seed >= 0 ? a.seed + 1 : cfg.seeds;
    int n_seeds = s1 - s0;
    int64_t n = rows.n;
    int n_out = 0;
    float *preds = NULL; /* [n_seeds, n, n_out] */
    int64_t *idx = NULL;
    if (rc == LEVI_EXIT_OK) {
        idx = levi_xmalloc((size_t)n * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) idx[i] = i;
    }
    for (int s = s0; s < s1 && rc == LEVI_EXIT_OK; s++) {
        char dir[FIT_PATH_MAX], ckpt[FIT_PATH_MAX + 32];
        fit_run_dir(&cfg, method, s, dir, sizeof dir);
        fit_path(ckpt, sizeof ckpt, "%s/model.safetensors", dir);
        levi_model *m = NULL;
        levi_status st = levi_model_load(&m, ckpt, &err);
        if (st == LEVI_OK && !preds) {
            n_out = levi_model_n_outputs(m);
            preds = levi_xcalloc((size_t)(n_seeds * n * n_out), sizeof(float));
        }
        if (st == LEVI_OK)
            st =
                levi_predict(m, &rows.td, idx, n, preds + (size_t)(s - s0) * n * n_out, NULL, &err);
        levi_model_free(m);
        if (st != LEVI_OK) {
            if (st == LEVI_ERR_IO) err.status = LEVI_ERR_NOT_FOUND;
            rc = fit_fail("predict", &err);
        }
    }
    if (rc == LEVI_EXIT_OK) {
        /* The output: row, the mean over seeds, then each seed (classification: the class of
           the highest mean probability, then the mean probabilities). */
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        int cls = n_out > 1;
        fputs("row,prediction", f);
        if (cls)
            for (int k = 0; k < n_out; k++) fprintf(f, ",p_%s", levi_dataset_class_name(ctx.ds, k));
        else
            for (int s = s0; s < s1; s++) fprintf(f, ",seed%d", s);
        fputc('\n', f);
        for (int64_t i = 0; i < n; i++) {
            fprintf(f, "%lld", (long long)i);
            double mean[256];
            int no = n_out < 256 ? n_out : 256;
            for (int k = 0; k < no; k++) {
                double acc = 0;
                for (int s = 0; s < n_seeds; s++) acc += preds[((size_t)s * n + i) * n_out + k];
                mean[k] = acc / n_seeds;
            }
            if (cls) {
                int best = 0;
                for (int k = 1; k < no; k++)
                    if (mean[k] > mean[best]) best = k;
                fprintf(f, ",%s", levi_dataset_class_name(ctx.ds, best));
                for (int k = 0; k < no; k++) fprintf(f, ",%.6f", mean[k]);
            } else {
                fprintf(f, ",%.6f", mean[0]);
                for (int s = 0; s < n_seeds; s++) fprintf(f, ",%.6f", preds[(size_t)s * n + i]);
            }
            fputc('\n', f);
        }
        fclose(f);
        if (levi_write_file_atomic(a.output, buf, len, &err) != LEVI_OK)
            rc = fit_fail("predict", &err);
        else
            printf("wrote %lld predictions to %s\n", (long long)n, a.output);
        free(buf);
    }
    levi_free(preds);
    levi_free(idx);
    new_rows_free(&rows);
    fit_context_close(&ctx);
    levi_table_free(in);
    return rc;
}
