/* `levi fit` runs of the backbone-training baselines (implements fit_finetune.h): per run a
 * levi_ft_model trained with resumable state in its run folder, then evaluated on every eval
 * set in one prediction pass, written as the same run-result JSON fit.c writes; the lr grid
 * on ID validation and the seeds as fit.c's fit_method does them.
 * Not for: option parsing, the results document and report (fit.c, report.c), or anything
 * that looks at OOD rows before the choice of learning rate. */
#include "fit_finetune.h"

#include "cli.h"
#include "levi/safetensors.h"
#include "report.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

fit_finetune_options fit_finetune_default_options(void) {
    fit_finetune_options o;
    memset(&o, 0, sizeof o);
    o.max_len = 64;
    o.train_fraction = 1.0;
    o.lora = levi_bert_lora_default_params();
    o.lp_lr = 1e-2f;
    o.lp_epochs = 10;
    o.save_backbone = 1;
    o.jobs = 1;
    return o;
}

int fit_is_finetune_method(const char *name) {
    int m = levi_ft_mode_parse(name);
    return m >= 0 && m != LEVI_FT_PROBE; /* "lp" is the cached-feature linear probe */
}

static int ff_is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int ff_is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

typedef struct ff_state {
    const fit_config *cfg;
    fit_context *ctx;
    const fit_finetune_options *opt;
    levi_ft_mode mode;
    const char *name;
    const char **texts; /* [ctx->n] */
    levi_ft_data data;
    int collecting; /* 1: reading runs a worker just finished (no "finished earlier" line) */
} ff_state;

static levi_ft_params ff_params(const ff_state *fs, float lr, int seed) {
    const fit_finetune_options *o = fs->opt;
    levi_ft_params fp = levi_ft_default_params(fs->mode);
    fp.max_len = o->max_len;
    /* A spec that sets text_max_tokens gets it here too: the baselines then read as much of
       each text as the cached features of the head methods did. */
    if (levi_spec_text_max_tokens(fs->ctx->spec) > 0)
        fp.max_len = levi_spec_text_max_tokens(fs->ctx->spec);
    fp.head_hidden = o->head_hidden;
    fp.lora = o->lora;
    fp.lr = lr;
    fp.seed = (uint64_t)seed;
    fp.batch_size = o->batch > 0 ? o->batch : fs->cfg->batch;
    fp.micro_batch = o->micro_batch;
    fp.max_epochs = o->epochs > 0 ? o->epochs : fs->cfg->epochs;
    fp.patience = o->patience > 0 ? o->patience : fs->cfg->patience;
    fp.lp_lr = o->lp_lr;
    fp.lp_epochs = o->lp_epochs;
    fp.train_fraction = o->train_fraction;
    fp.max_train_rows = o->max_train_rows;
    fp.max_val_rows = o->max_val_rows;
    return fp;
}

/* The run's identity: dataset, model folder, method and every setting that changes it. */
static void ff_key(const ff_state *fs, const levi_ft_params *fp, char key[65]) {
    char buf[FIT_PATH_MAX + 1024];
    snprintf(buf, sizeof buf,
             "levi-ft-run-v1\ndataset %s\nmodel %s\nmethod %s\nlr %.9g\nseed %llu\nepochs %d\n"
             "patience %d\nbatch %d/%d\nmax_len %d\nhead_hidden %d\nlora %d %.9g %u\nlp %.9g %d\n"
             "train_fraction %.17g\nmax_train_rows %lld\nmax_val_rows %lld\n",
             fs->ctx->checksum, fs->cfg->model, fs->name, (double)fp->lr,
             (unsigned long long)fp->seed, fp->max_epochs, fp->patience, fp->batch_size,
             fp->micro_batch, fp->max_len, fp->head_hidden, fp->lora.rank, (double)fp->lora.alpha,
             fp->lora.targets, (double)fp->lp_lr, fp->lp_epochs, fp->train_fraction,
             (long long)fp->max_train_rows, (long long)fp->max_val_rows);
    levi_sha256_hex(buf, strlen(buf), key);
}

static const char *ff_result_key(const cJSON *r) {
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(r, "key");
    return cJSON_IsString(k) ? k->valuestring : "";
}

static double ff_set_value(const cJSON *result, const char *name) {
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

typedef struct ff_progress {
    levi_progress *bar;
    int64_t n_train;
    int batch;
} ff_progress;

static void ff_on_progress(void *user, const levi_train_progress *p) {
    ff_progress *rp = user;
    int64_t done = (int64_t)(p->epoch - 1) * rp->n_train + p->step * rp->batch;
    int64_t cap = (int64_t)p->epoch * rp->n_train;
    if (done > cap) done = cap;
    char extra[128];
    if (p->epoch_done)
        snprintf(extra, sizeof extra, "epoch %d/%d loss %.4f val %.4f%s", p->epoch, p->max_epochs,
                 p->loss, p->val_metric, p->improved ? " *" : "");
    else
        snprintf(extra, sizeof extra, "epoch %d/%d loss %.4f %.1f ex/s", p->epoch, p->max_epochs,
                 p->loss, p->examples_per_s);
    levi_progress_update(rp->bar, done, extra);
}

/* Evaluates every eval set from ONE prediction pass over the union of their rows (the OOD
 * groups are subsets of "ood"), and writes "sets" and "adapters" as fit_evaluate_run does. */
static levi_status ff_evaluate_run(ff_state *fs, levi_ft_model *m, cJSON *result, levi_error *err) {
    fit_context *ctx = fs->ctx;
    const int O = ctx->td.n_classes ? ctx->td.n_classes : 1;
    uint8_t *want = calloc((size_t)(ctx->n > 0 ? ctx->n : 1), 1);
    int64_t *slot = levi_xmalloc((size_t)(ctx->n > 0 ? ctx->n : 1) * sizeof(int64_t));
    int64_t n_rows = 0;
    for (int k = 0; k < ctx->n_sets; k++)
        for (int64_t i = 0; i < ctx->sets[k].n; i++) want[ctx->sets[k].rows[i]] = 1;
    int64_t *rows = levi_xmalloc((size_t)(ctx->n > 0 ? ctx->n : 1) * sizeof(int64_t));
    for (int64_t r = 0; r < ctx->n; r++)
        if (want[r]) slot[r] = n_rows, rows[n_rows++] = r;
    float *pred = levi_xmalloc((size_t)(n_rows > 0 ? n_rows : 1) * O * sizeof(float));
    double t0 = levi_now();
    levi_status st = levi_ft_predict(m, &fs->data, rows, n_rows, pred, err);
    cJSON *sets = cJSON_CreateArray();
    for (int k = 0; st == LEVI_OK && k < ctx->n_sets; k++) {
        const levi_eval_set *s = &ctx->sets[k];
        double sum = 0, loss = 0;
        for (int64_t i = 0; i < s->n; i++) {
            const int64_t r = s->rows[i];
            const float *p = pred + slot[r] * O;
            if (O == 1) {
                double e = (double)p[0] - ctx->td.y[r];
                sum += e * e;
            } else {
                int arg = 0;
                for (int c = 1; c < O; c++) arg = p[c] > p[arg] ? c : arg;
                sum += arg == ctx->td.yc[r];
                loss += -log(fmax((double)p[ctx->td.yc[r]], 1e-30));
            }
        }
        double metric = O == 1 ? sqrt(sum / (double)s->n) : sum / (double)s->n;
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "name", s->name);
        cJSON_AddNumberToObject(j, "n", (double)s->n);
        cJSON_AddNumberToObject(j, "value", metric);
        cJSON_AddNumberToObject(j, "loss", O == 1 ? sum / (double)s->n : loss / (double)s->n);
        cJSON *per = cJSON_AddArrayToObject(j, "adapters");
        cJSON_AddItemToArray(per, cJSON_CreateNumber(metric));
        cJSON_AddItemToArray(sets, j);
    }
    free(want);
    levi_free(slot);
    levi_free(rows);
    levi_free(pred);
    if (st != LEVI_OK) {
        cJSON_Delete(sets);
        return levi_error_prefix(err, "evaluating: ");
    }
    cJSON *adapters = cJSON_CreateArray();
    cJSON *a = cJSON_CreateObject();
    cJSON_AddStringToObject(a, "name", "head");
    cJSON_AddNumberToObject(a, "layer", -1);
    cJSON_AddItemToArray(adapters, a);
    cJSON_DeleteItemFromObjectCaseSensitive(result, "adapters");
    cJSON_DeleteItemFromObjectCaseSensitive(result, "sets");
    cJSON_DeleteItemFromObjectCaseSensitive(result, "eval_seconds");
    cJSON_AddItemToObject(result, "adapters", adapters);
    cJSON_AddItemToObject(result, "sets", sets);
    cJSON_AddNumberToObject(result, "eval_seconds", levi_now() - t0);
    return LEVI_OK;
}

/* A finished run keeps its head as <dir>/head.safetensors (the tensors of levi_ft_head, a few
 * KB) and drops the training state (weights plus Adam moments of the whole encoder, ~360 MB
 * for MiniLM): the run is not resumed again, and the ensembles read the head from here and
 * the encoder from backbone/. */
static levi_status ff_save_head(levi_ft_model *m, const char *dir, const char *state_path,
                                levi_error *err) {
    levi_params *hp = levi_ft_head(m);
    levi_tensor *t = levi_xcalloc((size_t)hp->count, sizeof *t);
    for (int i = 0; i < hp->count; i++) t[i] = levi_params_tensor(hp, i);
    char path[FIT_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/head.safetensors", dir);
    const char *keys[1] = {"format"}, *vals[1] = {"levi-ft-head"};
    levi_status st = levi_st_write(path, t, hp->count, keys, vals, 1, err);
    levi_free(t);
    if (st == LEVI_OK) unlink(state_path);
    return st;
}

/* Trains (or finds finished) the run at lr with seed in dir; *result is its run-result JSON
 * (caller frees). Returns an exit code. */
static int ff_run_one(ff_state *fs, float lr, int seed, const char *dir, const char *label,
                      cJSON **result) {
    *result = NULL;
    fit_context *ctx = fs->ctx;
    levi_error err = {0};
    levi_ft_params fp = ff_params(fs, lr, seed);
    char key[65];
    ff_key(fs, &fp, key);
    char result_path[FIT_PATH_MAX + 32], config_path[FIT_PATH_MAX + 32];
    char state_path[FIT_PATH_MAX + 32], backbone[FIT_PATH_MAX + 32];
    snprintf(result_path, sizeof result_path, "%s/result.json", dir);
    snprintf(config_path, sizeof config_path, "%s/config.json", dir);
    snprintf(state_path, sizeof state_path, "%s/state.safetensors", dir);
    snprintf(backbone, sizeof backbone, "%s/backbone", dir);
    if (ff_is_file(result_path)) {
        levi_error e2;
        cJSON *old = fit_read_json(result_path, &e2);
        if (old && strcmp(ff_result_key(old), key) == 0) {
            if (!fs->collecting)
                printf("%s: finished earlier (id_val %.4f), skipped\n", label,
                       ff_set_value(old, "id_val"));
            *result = old;
            return LEVI_EXIT_OK;
        }
        if (old) printf("%s: settings changed since the saved run; training again\n", label);
        cJSON_Delete(old);
    }
    levi_status st = levi_mkdirs(dir, &err);
    if (st != LEVI_OK) return fit_fail("fit", &err);
    int resume = 0;
    {
        levi_error e2;
        cJSON *oc = ff_is_file(config_path) ? fit_read_json(config_path, &e2) : NULL;
        resume = oc && strcmp(ff_result_key(oc), key) == 0 && ff_is_file(state_path);
        cJSON_Delete(oc);
        if (!resume) unlink(state_path);
    }
    cJSON *conf = cJSON_CreateObject();
    cJSON_AddStringToObject(conf, "format", "levi-run-config");
    cJSON_AddNumberToObject(conf, "version", 1);
    cJSON_AddStringToObject(conf, "key", key);
    cJSON_AddStringToObject(conf, "method", fs->name);
    cJSON_AddNumberToObject(conf, "seed", seed);
    cJSON_AddNumberToObject(conf, "lr", fit_float_json(lr));
    cJSON_AddNumberToObject(conf, "epochs", fp.max_epochs);
    cJSON_AddNumberToObject(conf, "patience", fp.patience);
    cJSON_AddNumberToObject(conf, "batch", fp.batch_size);
    cJSON_AddNumberToObject(conf, "max_len", fp.max_len);
    cJSON_AddNumberToObject(conf, "train_fraction", fp.train_fraction);
    cJSON_AddNumberToObject(conf, "max_train_rows", (double)fp.max_train_rows);
    cJSON_AddNumberToObject(conf, "max_val_rows", (double)fp.max_val_rows);
    cJSON_AddStringToObject(conf, "dataset_checksum", ctx->checksum);
    cJSON_AddStringToObject(conf, "model", fs->cfg->model);
    st = fit_write_json(config_path, conf, &err);
    cJSON_Delete(conf);
    if (st != LEVI_OK) return fit_fail("fit", &err);

    levi_ft_model *m = NULL;
    fp.state_path = state_path;
    fp.resume = resume;
    fp.stop_flag = &levi_cli_interrupted;
    int64_t n_eff = (int64_t)llround((double)ctx->n_train * fp.train_fraction);
    if (n_eff < 1) n_eff = 1;
    if (fp.max_train_rows > 0 && fp.max_train_rows < n_eff) n_eff = fp.max_train_rows;
    const int phases = fs->mode == LEVI_FT_LP_FT ? 2 : 1;
    ff_progress rp = {NULL, n_eff, fp.batch_size};
    fp.progress = ff_on_progress;
    fp.progress_user = &rp;
    fp.progress_every = 1;
    if ((st = levi_ft_init(&m, fs->cfg->model, &fp, ctx->td.n_classes, &err)) != LEVI_OK)
        return fit_fail("fit", &err);
    rp.bar = levi_progress_start(
        label, (int64_t)(fp.max_epochs + (phases > 1 ? fp.lp_epochs : 0)) * n_eff, "ex");
    levi_train_result *tr = levi_xcalloc(1, sizeof *tr);
    st = levi_ft_train(m, &fs->data, ctx->train, ctx->n_train, ctx->val, ctx->n_val, tr, &err);
    levi_progress_finish(rp.bar);
    int diverged = 0;
    if (st == LEVI_ERR_NUMERIC) {
        fprintf(stderr, "levi fit: %s: %s; counted as diverged\n", label, err.msg);
        diverged = 1;
        st = LEVI_OK;
    }
    if (st == LEVI_OK && !tr->finished && !diverged)
        st = levi_errorf(&err, LEVI_ERR_INTERRUPTED, "%s stopped before finishing", label);
    if (st == LEVI_OK && !diverged && fs->opt->save_backbone && fs->mode != LEVI_FT_PROBE)
        st = levi_ft_save_backbone(m, backbone, &err);
    if (st == LEVI_OK && !diverged) st = ff_save_head(m, dir, state_path, &err);
    if (st != LEVI_OK) {
        levi_free(tr);
        levi_ft_free(m);
        if (st == LEVI_ERR_INTERRUPTED) levi_error_prefix(&err, "%s: ", label);
        return fit_fail("fit", &err);
    }
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "format", "levi-run-result");
    cJSON_AddNumberToObject(r, "version", 1);
    cJSON_AddStringToObject(r, "method", fs->name);
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
    cJSON_AddNumberToObject(t, "train_rows", (double)n_eff);
    cJSON_AddNumberToObject(t, "trainable_params", (double)levi_ft_trainable_count(m));
    cJSON *lh = cJSON_AddArrayToObject(t, "loss_history");
    cJSON *vh = cJSON_AddArrayToObject(t, "val_history");
    for (int e = 0; e < tr->n_history; e++) {
        cJSON_AddItemToArray(lh, cJSON_CreateNumber(tr->loss_history[e]));
        cJSON_AddItemToArray(vh, cJSON_CreateNumber(tr->val_history[e]));
    }
    {
        /* Efficiency fields (fit.h, fit_add_run_cost): every encoder layer runs at inference,
           plus the linear head on its mean-pooled output, (hidden + 1) x outputs. */
        levi_bert_config bc;
        levi_error e3;
        char cp[FIT_PATH_MAX + 32];
        fit_path(cp, sizeof cp, "%s/config.json", fs->cfg->model);
        double h = levi_bert_config_load(cp, &bc, &e3) == LEVI_OK ? bc.hidden : NAN;
        double n_out = ctx->td.n_classes > 0 ? ctx->td.n_classes : 1;
        fit_add_run_cost(r, fs->cfg, ctx, (double)levi_ft_trainable_count(m), (h + 1) * n_out,
                         2 * h * n_out, INT_MAX, tr->seconds, tr->epochs_run);
    }
    levi_free(tr);
    if (diverged) {
        fit_result_nan_sets(ctx, r);
    } else if ((st = ff_evaluate_run(fs, m, r, &err)) != LEVI_OK) {
        cJSON_Delete(r);
        levi_ft_free(m);
        return fit_fail("fit", &err);
    }
    levi_ft_free(m);
    printf("%s: ID val %.4f, ID test %.4f, OOD %.4f\n", label, ff_set_value(r, "id_val"),
           ff_set_value(r, "id_test"), ff_set_value(r, "ood"));
    fflush(stdout);
    if ((st = fit_write_json(result_path, r, &err)) != LEVI_OK) {
        cJSON_Delete(r);
        return fit_fail("fit", &err);
    }
    *result = fit_json_roundtrip(r);
    return LEVI_EXIT_OK;
}

static int ff_better(int lower_is_better, double a, double b) {
    if (!isfinite(a)) return 0;
    if (!isfinite(b)) return 1;
    return lower_is_better ? a < b : a > b;
}

/* Removes a run folder's known files, its saved backbone and the folder (nothing else). */
static void ff_remove_run_dir(const char *dir) {
    static const char *const files[] = {"result.json",
                                        "config.json",
                                        "state.safetensors",
                                        "head.safetensors",
                                        "backbone/config.json",
                                        "backbone/model.safetensors",
                                        "backbone/vocab.txt",
                                        "backbone/tokenizer_config.json",
                                        "backbone/special_tokens_map.json",
                                        "backbone/tokenizer.json",
                                        "backbone"};
    char p[FIT_PATH_MAX + 128];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        if (unlink(p) != 0) rmdir(p);
    }
    rmdir(dir);
}

/* The folder of the lr-search run at lr: runs/<method>/lr-search/lr<lr>, or seed0/ when an
 * earlier call chose that lr and moved the run there. */
static void ff_search_dir(const fit_config *cfg, const char *method_name, float lr,
                          const char *seed0_dir, char *dir, size_t size) {
    char search[FIT_PATH_MAX + 64];
    snprintf(search, sizeof search, "%s/runs/%s/lr-search/lr%g", cfg->out, method_name, (double)lr);
    fit_moved_search_dir(search, seed0_dir, lr, dir, size);
}

/* ---------------------------------------------------------------------------------------
 * --jobs N: the runs of one stage train side by side in child processes (fork after the
 * pipeline is loaded, so the texts and labels are shared copy-on-write), each with one thread
 * and its output in <run>/train.log; the caller then reads every result through ff_run_one,
 * which finds it finished. Interrupts: a worker only sets the stop flag (the training loop
 * saves its state and returns); the parent forwards its own SIGINT to the workers and waits
 * for them, so an interrupted stage resumes like a serial one. */
typedef struct ff_job {
    float lr;
    int seed;
    char dir[FIT_PATH_MAX + 64];
    char label[128];
    pid_t pid;
    double t0;
} ff_job;

static int ff_run_finished(ff_state *fs, const ff_job *j) {
    levi_ft_params fp = ff_params(fs, j->lr, j->seed);
    char key[65], path[FIT_PATH_MAX + 96];
    ff_key(fs, &fp, key);
    snprintf(path, sizeof path, "%s/result.json", j->dir);
    if (!ff_is_file(path)) return 0;
    levi_error e;
    cJSON *old = fit_read_json(path, &e);
    int done = old && strcmp(ff_result_key(old), key) == 0;
    cJSON_Delete(old);
    return done;
}

static void ff_worker(ff_state *fs, const ff_job *j, pid_t parent) {
    fit_worker_start(parent);
    levi_error e;
    char log[FIT_PATH_MAX + 96];
    snprintf(log, sizeof log, "%s/train.log", j->dir);
    int fd =
        levi_mkdirs(j->dir, &e) == LEVI_OK ? open(log, O_WRONLY | O_CREAT | O_APPEND, 0644) : -1;
    if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(LEVI_EXIT_FAILURE);
    close(fd);
    cJSON *r = NULL;
    int rc = ff_run_one(fs, j->lr, j->seed, j->dir, j->label, &r);
    cJSON_Delete(r);
    fflush(stdout);
    fflush(stderr);
    _exit(rc); /* the parent's atexit handlers and buffers are not this process's */
}

/* Trains the unfinished runs of job[0..n) with up to `jobs` at a time. Exit code. */
static int ff_run_parallel(ff_state *fs, ff_job *job, int n, int jobs) {
    int next = 0, running = 0, rc = LEVI_EXIT_OK, forwarded = 0;
    const pid_t parent = getpid();
    for (;;) {
        while (running < jobs && next < n && rc == LEVI_EXIT_OK && !levi_cli_interrupted) {
            ff_job *j = &job[next++];
            j->pid = 0;
            if (ff_run_finished(fs, j)) {
                printf("%s: finished earlier, skipped\n", j->label);
                continue;
            }
            fflush(stdout);
            fflush(stderr);
            pid_t pid = fork();
            if (pid < 0) {
                fprintf(stderr, "levi fit: cannot start a process for %s: %s\n", j->label,
                        strerror(errno));
                rc = LEVI_EXIT_FAILURE;
                break;
            }
            if (pid == 0) ff_worker(fs, j, parent);
            j->pid = pid;
            j->t0 = levi_now();
            running++;
            printf("%s: training in a worker process (log: %s/train.log)\n", j->label, j->dir);
            fflush(stdout);
        }
        if (running == 0) break;
        if (levi_cli_interrupted && !forwarded) {
            for (int i = 0; i < n; i++)
                if (job[i].pid > 0) kill(job[i].pid, SIGINT);
            forwarded = 1;
        }
        int status;
        pid_t w = waitpid(-1, &status, 0);
        if (w < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "levi fit: waiting for the workers: %s\n", strerror(errno));
            return LEVI_EXIT_FAILURE;
        }
        for (int i = 0; i < n; i++) {
            ff_job *j = &job[i];
            if (j->pid != w) continue;
            j->pid = 0;
            running--;
            int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
            if (code == LEVI_EXIT_OK) {
                printf("%s: finished in %.0f s\n", j->label, levi_now() - j->t0);
            } else if (code == LEVI_EXIT_INTERRUPTED || levi_cli_interrupted) {
                printf("%s: interrupted; its state is saved (%s/train.log)\n", j->label, j->dir);
                if (rc == LEVI_EXIT_OK) rc = LEVI_EXIT_INTERRUPTED;
            } else {
                if (WIFSIGNALED(status))
                    fprintf(stderr, "levi fit: %s: the worker process was killed by signal %d\n",
                            j->label, WTERMSIG(status));
                fprintf(stderr, "levi fit: %s failed (exit code %d): see %s/train.log\n", j->label,
                        code, j->dir);
                rc = LEVI_EXIT_FAILURE;
            }
            fflush(stdout);
        }
    }
    if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
    return rc;
}

int fit_finetune_method(const char *method_name, const fit_config *cfg, fit_context *ctx,
                        const fit_finetune_options *opt_in, cJSON *methods) {
    LEVI_ASSERT(method_name && cfg && ctx && methods, "fit_finetune_method needs its arguments");
    const fit_finetune_options def = fit_finetune_default_options();
    const fit_finetune_options *opt = opt_in ? opt_in : &def;
    int mode = levi_ft_mode_parse(method_name);
    if (mode < 0) {
        fprintf(stderr,
                "levi fit: unknown fine-tuning method \"%s\" (expected ft, ht, lp-ft, fs "
                "or lora)\n",
                method_name);
        return LEVI_EXIT_USAGE;
    }
    if (!cfg->model[0]) {
        fprintf(stderr, "levi fit: %s needs a model folder (--model)\n", method_name);
        return LEVI_EXIT_USAGE;
    }
    ff_state fs = {cfg, ctx, opt, (levi_ft_mode)mode, method_name, NULL, {0}, 0};
    fs.texts = malloc((size_t)(ctx->n > 0 ? ctx->n : 1) * sizeof *fs.texts);
    if (!fs.texts) return LEVI_EXIT_FAILURE;
    for (int64_t i = 0; i < ctx->n; i++) fs.texts[i] = levi_dataset_text(ctx->ds, i);
    fs.data = (levi_ft_data){ctx->n, fs.texts, ctx->td.n_classes, ctx->td.y, ctx->td.yc};

    float grid[LEVI_MAX_GRID] = {1e-4f, 1e-3f, 1e-2f, 1e-1f}; /* paper D.3 */
    int n_lr = 4;
    if (cfg->n_lrs > 0) {
        n_lr = cfg->n_lrs;
        memcpy(grid, cfg->lrs, (size_t)n_lr * sizeof(float));
    }
    double lr_val[LEVI_MAX_GRID];
    int best = 0, rc = LEVI_EXIT_OK;
    char dir[FIT_PATH_MAX + 64], seed0_dir[FIT_PATH_MAX + 64], label[128];
    snprintf(seed0_dir, sizeof seed0_dir, "%s/runs/%s/seed0", cfg->out, method_name);
    printf("\n== %s: %s ==\n", method_name, levi_report_method_label(method_name));
    cJSON *seed0 = NULL;
    const int jobs = opt->jobs > 1 ? opt->jobs : 1;
    ff_job *job = calloc((size_t)(n_lr > cfg->seeds ? n_lr : cfg->seeds), sizeof *job);
    if (!job) {
        free(fs.texts);
        return LEVI_EXIT_FAILURE;
    }
    if (n_lr == 1) {
        lr_val[0] = NAN;
    } else {
        if (jobs > 1) { /* where each search run lives: the loop below decides it the same way */
            for (int i = 0; i < n_lr; i++) {
                ff_job *j = &job[i];
                j->lr = grid[i], j->seed = 0;
                ff_search_dir(cfg, method_name, grid[i], seed0_dir, j->dir, sizeof j->dir);
                snprintf(j->label, sizeof j->label, "%s lr %g seed 0", method_name,
                         (double)grid[i]);
            }
            if ((rc = ff_run_parallel(&fs, job, n_lr, jobs)) != LEVI_EXIT_OK) goto done;
            fs.collecting = 1;
        }
        for (int i = 0; i < n_lr; i++) {
            ff_search_dir(cfg, method_name, grid[i], seed0_dir, dir, sizeof dir);
            snprintf(label, sizeof label, "%s lr %g seed 0", method_name, (double)grid[i]);
            cJSON *r = NULL;
            if ((rc = ff_run_one(&fs, grid[i], 0, dir, label, &r)) != LEVI_EXIT_OK) goto done;
            lr_val[i] = ff_set_value(r, "id_val");
            cJSON_Delete(r);
            if (levi_cli_interrupted) {
                rc = LEVI_EXIT_INTERRUPTED;
                goto done;
            }
        }
        for (int i = 1; i < n_lr; i++)
            if (ff_better(ctx->lower_is_better, lr_val[i], lr_val[best])) best = i;
        printf("%s: learning rate %g chosen on ID validation (", method_name, (double)grid[best]);
        for (int i = 0; i < n_lr; i++)
            printf("%s%g: %.4f", i ? ", " : "", (double)grid[i], lr_val[i]);
        printf(")\n");
        snprintf(dir, sizeof dir, "%s/runs/%s/lr-search/lr%g", cfg->out, method_name,
                 (double)grid[best]);
        if (ff_is_dir(dir)) {
            ff_remove_run_dir(seed0_dir);
            if (rename(dir, seed0_dir) != 0) {
                fprintf(stderr, "levi fit: cannot move %s to %s: %s\n", dir, seed0_dir,
                        strerror(errno));
                rc = LEVI_EXIT_FAILURE;
                goto done;
            }
        }
    }
    cJSON *entry = cJSON_CreateObject();
    cJSON_AddStringToObject(entry, "method", method_name);
    cJSON_AddStringToObject(entry, "label", levi_report_method_label(method_name));
    cJSON *jg = cJSON_AddArrayToObject(entry, "lr_grid");
    cJSON *jv = cJSON_AddArrayToObject(entry, "lr_val");
    cJSON *runs = cJSON_AddArrayToObject(entry, "runs");
    cJSON_AddItemToArray(methods, entry);
    if (jobs > 1) { /* seed 0 of a searched grid is the chosen search run: found finished */
        int nj = 0;
        for (int seed = 0; seed < cfg->seeds; seed++, nj++) {
            ff_job *j = &job[nj];
            j->lr = grid[best], j->seed = seed;
            snprintf(j->dir, sizeof j->dir, "%s/runs/%s/seed%d", cfg->out, method_name, seed);
            snprintf(j->label, sizeof j->label, "%s seed %d", method_name, seed);
        }
        fs.collecting = 0;
        if ((rc = ff_run_parallel(&fs, job, nj, jobs)) != LEVI_EXIT_OK) goto done;
        fs.collecting = 1;
    }
    for (int seed = 0; seed < cfg->seeds; seed++) {
        snprintf(dir, sizeof dir, "%s/runs/%s/seed%d", cfg->out, method_name, seed);
        snprintf(label, sizeof label, "%s seed %d", method_name, seed);
        cJSON *r = NULL;
        if ((rc = ff_run_one(&fs, grid[best], seed, dir, label, &r)) != LEVI_EXIT_OK) goto done;
        if (seed == 0) seed0 = r;
        cJSON_AddItemToArray(runs, r);
        if (levi_cli_interrupted) {
            rc = LEVI_EXIT_INTERRUPTED;
            goto done;
        }
    }
    if (n_lr == 1) lr_val[0] = ff_set_value(seed0, "id_val");
    for (int i = 0; i < n_lr; i++) {
        cJSON_AddItemToArray(jg, cJSON_CreateNumber(fit_float_json(grid[i])));
        cJSON_AddItemToArray(jv, cJSON_CreateNumber(lr_val[i]));
    }
    cJSON_AddNumberToObject(entry, "chosen_lr", fit_float_json(grid[best]));
    levi_report_summarize_method(entry);
done:
    free(job);
    free(fs.texts);
    return rc;
}
