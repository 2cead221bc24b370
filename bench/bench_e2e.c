/* Benchmark: LEVI end to end on N MovieLens rows through the library, phase by phase:
 *   load     the dataset spec, the MovieLens tables, the rendered texts, a seeded subsample of
 *            N rows (levi_dataset_subsample; not compared: PyTorch reads them from --dump's
 *            file);
 *   extract  the frozen encoder over the N texts, every hidden state mean-pooled, written to a
 *            feature cache and loaded back (levi_featcache_build + _load, as `levi fit` does);
 *   fit      the LEVI model (small model + one adapter per hidden state, Adam, batch 200)
 *            trained on all N rows for a fixed number of epochs, no early stopping.
 * The compared figure is N / (extract + fit seconds).
 *
 * For: comparing against bench/pytorch/bench_e2e.py, which does the same work with
 * transformers' BertModel (output_hidden_states) and a torch.nn LEVI model on the rows this
 * program writes with --dump (texts, categorical ids, labels), so both sides see identical
 * inputs; bench/run.sh runs both (case d).
 * Not for: accuracy (the rows are not split; docs/results-movielens.md has the real runs), or
 * the CLI's own overhead (reports, checkpoints, selection).
 *
 * Usage: bench_e2e --spec FILE --model DIR --cache DIR [--data DIR] [--rows 2000]
 *                  [--epochs 3] [--threads 1] [--batch 64] [--dump FILE]
 *   --cache DIR  feature-cache root; must not already hold these features (the benchmark
 *                measures extraction: give it a fresh empty folder)
 *   --dump FILE  write the N rows for the PyTorch script and exit without timing anything
 */
#include "bench_common.h"
#include "levi/bert.h"
#include "levi/data.h"
#include "levi/featcache.h"
#include "levi/levi.h"
#include "levi/tokenizer.h"

#include <string.h>

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s --spec FILE --model DIR --cache DIR [--data DIR] [--rows N] "
            "[--epochs E] [--threads T] [--batch B] [--dump FILE]\n",
            argv0);
}

static int fail(const char *what, const levi_error *err) {
    fprintf(stderr, "bench_e2e: %s: %s\n", what, err->msg);
    return 1;
}

/* Writes the rows PyTorch's side needs, one per line after three header lines:
 *   # cards <card of each categorical column>
 *   # mask_prob <its group leader's mask probability>
 *   # mask_group <index of its group leader>
 *   <label> TAB <id of each categorical column> TAB <text>
 * Tabs and newlines inside texts become spaces (MovieLens titles have none). */
static int write_dump(const char *path, const levi_dataset *ds) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return 1;
    }
    const int n_cat = levi_dataset_num_categorical(ds);
    const int64_t n = levi_dataset_num_rows(ds);
    const char *names[3] = {"cards", "mask_prob", "mask_group"};
    for (int h = 0; h < 3; h++) {
        fprintf(f, "# %s", names[h]);
        for (int c = 0; c < n_cat; c++) {
            const levi_categorical *k = levi_dataset_categorical(ds, c);
            const levi_categorical *lead = levi_dataset_categorical(ds, k->mask_leader);
            if (h == 0) fprintf(f, "\t%d", (int)k->cardinality);
            if (h == 1) fprintf(f, "\t%g", (double)lead->mask_prob);
            if (h == 2) fprintf(f, "\t%d", k->mask_leader);
        }
        fprintf(f, "\n");
    }
    const float *y = levi_dataset_labels(ds);
    for (int64_t i = 0; i < n; i++) {
        fprintf(f, "%g", (double)y[i]);
        for (int c = 0; c < n_cat; c++) fprintf(f, "\t%d", levi_dataset_categorical(ds, c)->ids[i]);
        fputc('\t', f);
        for (const char *p = levi_dataset_text(ds, i); *p; p++)
            fputc(*p == '\t' || *p == '\n' || *p == '\r' ? ' ' : *p, f);
        fputc('\n', f);
    }
    if (fclose(f) != 0) {
        perror(path);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *spec_path = NULL, *model = NULL, *cache = NULL, *data = NULL, *dump = NULL;
    int threads = 1, epochs = 3, batch = 64;
    long rows = 2000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage(argv[0]);
            return 2;
        }
        if (!strcmp(a, "--spec"))
            spec_path = v;
        else if (!strcmp(a, "--model"))
            model = v;
        else if (!strcmp(a, "--cache"))
            cache = v;
        else if (!strcmp(a, "--data"))
            data = v;
        else if (!strcmp(a, "--dump"))
            dump = v;
        else if (!strcmp(a, "--rows"))
            rows = atol(v);
        else if (!strcmp(a, "--epochs"))
            epochs = atoi(v);
        else if (!strcmp(a, "--threads"))
            threads = atoi(v);
        else if (!strcmp(a, "--batch"))
            batch = atoi(v);
        else {
            usage(argv[0]);
            return 2;
        }
        i++;
    }
    if (!spec_path || (!dump && (!model || !cache))) {
        fprintf(stderr, "bench_e2e: --spec is required, and --model and --cache unless --dump\n");
        return 2;
    }
    if (rows < 1 || epochs < 1 || threads < 1 || batch < 1) {
        fprintf(stderr, "bench_e2e: --rows, --epochs, --threads and --batch must be >= 1\n");
        return 2;
    }
    levi_set_num_threads(threads);
    levi_error err = {0};

    /* Load. */
    double t0 = levi_now();
    levi_spec *spec = NULL;
    levi_dataset *full = NULL, *ds = NULL;
    if (levi_spec_load(spec_path, &spec, &err) != LEVI_OK) return fail("spec", &err);
    if (data) levi_spec_set_source_path(spec, data);
    if (levi_dataset_load(spec, &full, &err) != LEVI_OK) return fail("dataset", &err);
    if (levi_dataset_subsample(full, 1.0, rows, 0, &ds, &err) != LEVI_OK)
        return fail("subsample", &err);
    levi_dataset_free(full);
    const double load_s = levi_now() - t0;
    const int64_t n = levi_dataset_num_rows(ds);
    if (dump) {
        int rc = write_dump(dump, ds);
        levi_dataset_free(ds);
        levi_spec_free(spec);
        if (rc == 0) printf("bench_e2e: wrote %lld rows to %s\n", (long long)n, dump);
        return rc;
    }
    const char **texts = malloc((size_t)n * sizeof *texts);
    for (int64_t i = 0; i < n; i++) texts[i] = levi_dataset_text(ds, i);

    /* Token counts for the FLOP formula (outside the timed phases). */
    levi_tokenizer *tok = levi_tokenizer_open(model, &err);
    if (!tok) return fail("tokenizer", &err);
    levi_featcache_params fp = levi_featcache_default_params();
    double tokens = 0, tokens_sq = 0;
    {
        int32_t *ids = malloc((size_t)fp.max_len * sizeof *ids);
        for (int64_t i = 0; i < n; i++) {
            int len = 0;
            if (levi_tokenizer_encode(tok, texts[i], fp.max_len, ids, &len, &err) != LEVI_OK)
                return fail("tokenize", &err);
            tokens += len, tokens_sq += (double)len * len;
        }
        free(ids);
    }
    levi_tokenizer_close(tok);
    char cfg_path[4096];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", model);
    levi_bert_config bcfg;
    if (levi_bert_config_load(cfg_path, &bcfg, &err) != LEVI_OK) return fail("model config", &err);

    /* Extract. */
    fp.threads = threads;
    fp.batch_size = batch;
    levi_featcache_info info;
    levi_features feats = {0};
    double c0 = bench_cpu_seconds();
    t0 = levi_now();
    if (levi_featcache_build(cache, model, texts, n, &fp, &info, &err) != LEVI_OK)
        return fail("feature extraction", &err);
    if (info.chunks_reused > 0 || info.chunks_computed == 0) {
        fprintf(stderr,
                "bench_e2e: %s already holds these features (%d chunks reused): give --cache a "
                "fresh empty folder so extraction is measured\n",
                info.dir, info.chunks_reused);
        return 2;
    }
    if (levi_featcache_load(info.dir, NULL, 0, &feats, &err) != LEVI_OK)
        return fail("feature load", &err);
    const double extract_s = levi_now() - t0;

    /* Fit: task data as the CLI builds it (src/cli/pipeline.c), all rows trained on. */
    t0 = levi_now();
    const int n_cat = levi_dataset_num_categorical(ds);
    int64_t *all = malloc((size_t)n * sizeof *all);
    for (int64_t i = 0; i < n; i++) all[i] = i;
    int32_t *cat = malloc((size_t)(n * n_cat) * sizeof *cat), card[LEVI_MAX_CAT],
            group[LEVI_MAX_CAT];
    float mprob[LEVI_MAX_CAT];
    levi_dataset_gather_categorical(ds, all, n, NULL, cat);
    for (int c = 0; c < n_cat; c++) {
        const levi_categorical *k = levi_dataset_categorical(ds, c);
        card[c] = k->cardinality;
        group[c] = k->mask_leader;
        mprob[c] = levi_dataset_categorical(ds, k->mask_leader)->mask_prob;
    }
    levi_task_data td;
    memset(&td, 0, sizeof td);
    td.n = n;
    td.n_cat = n_cat;
    td.cat = cat;
    td.cat_card = card;
    td.cat_mask_prob = mprob;
    td.cat_mask_group = group;
    td.n_layers = feats.n_layers;
    td.feat_dim = feats.dim;
    td.feats = feats.data;
    td.y = levi_dataset_labels(ds);
    levi_head_params hp = levi_head_default_params(LEVI_METHOD_LEVI);
    levi_model *m = NULL;
    if (levi_model_init(&m, &hp, &td, &err) != LEVI_OK) return fail("model", &err);
    levi_train_params tp = levi_train_default_params();
    tp.lr = 1e-3f;
    tp.max_epochs = epochs;
    tp.patience = epochs;
    levi_train_result *res = calloc(1, sizeof *res);
    if (levi_train(m, &td, all, n, NULL, 0, &tp, res, &err) != LEVI_OK)
        return fail("training", &err);
    const double fit_s = levi_now() - t0;
    const double cpu_wall = (bench_cpu_seconds() - c0) / (extract_s + fit_s);

    /* FLOPs: the encoder's useful work, counted per text from its own token count n_i (no
     * padding): 2 * L * sum_i [n_i (4 H^2 + 2 H I) + 2 n_i^2 H]; plus training, 3 x 2 x the
     * LEVI model's forward multiply-adds per example x examples trained (bench_train's
     * formula): emb*n_cat*h1 + h1*h2 + adapters * ((h2 + H) * a + a). */
    const double H = bcfg.hidden, I = bcfg.intermediate, L = bcfg.layers;
    const double enc_flop = 2.0 * L * (tokens * (4 * H * H + 2 * H * I) + 2 * tokens_sq * H);
    const double h1 = hp.small_hidden[0], h2 = hp.small_hidden[1], ah = hp.adapter_hidden;
    const double fwd_macs =
        hp.emb_dim * n_cat * h1 + h1 * h2 + levi_model_n_adapters(m) * ((h2 + H) * ah + ah);
    const double train_flop = 3.0 * 2.0 * fwd_macs * (double)n * res->epochs_run;
    const double total_s = extract_s + fit_s, gflop = (enc_flop + train_flop) * 1e-9;
    const double final_loss = res->n_history > 0 ? res->loss_history[res->n_history - 1] : 0;
    printf("levi e2e threads=%d rows=%lld tokens=%.0f layers=%d adapters=%d epochs=%d\n", threads,
           (long long)n, tokens, feats.n_layers, levi_model_n_adapters(m), res->epochs_run);
    printf("load %.2f s (not compared) | extract %.2f s (%.0f tok/s) | fit %.2f s | total %.2f s "
           "= %.1f rows/s, %.1f GFLOP/s | final train loss %.4f | cpu/wall=%.2f\n",
           load_s, extract_s, tokens / extract_s, fit_s, total_s, n / total_s, gflop / total_s,
           final_loss, cpu_wall);
    bench_result("d", threads, "rows/s", n / total_s, gflop / total_s, cpu_wall,
                 " rows=%lld extract_s=%.3f fit_s=%.3f load_s=%.3f enc_tok_s=%.0f tokens=%.0f "
                 "epochs=%d gflop=%.2f loss=%.4f",
                 (long long)n, extract_s, fit_s, load_s, tokens / extract_s, tokens,
                 res->epochs_run, gflop, final_loss);
    free(res);
    levi_model_free(m);
    free(cat);
    free(all);
    levi_features_free(&feats);
    free(texts);
    levi_dataset_free(ds);
    levi_spec_free(spec);
    return 0;
}
