/* Training of the head model (include/levi/levi.h): the step-level trainer, the epoch loop
 * with early stopping on ID validation and best-weight restore, resumable training state,
 * and learning-rate selection followed by seeds.
 *
 * For: cached-feature methods whose only trainable part is the head model. Randomness comes
 * from one levi_rng seeded with tp->seed: the first split initialises the weights, the second
 * drives shuffles and unknown-slot masking, so a resumed run continues the same stream.
 * Not for: the forward/backward (head.c), the bias baseline's fit (bias.c), checkpoint
 * serialisation of the model (checkpoint.c), or anything that looks at OOD rows before the
 * choice of learning rate is made.
 */
#include "head_internal.h"

#include "levi/safetensors.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#define LEVI__STATE_FORMAT "levi-train-state-v1"

levi_train_params levi_train_default_params(void) {
    levi_train_params tp;
    memset(&tp, 0, sizeof tp);
    tp.lr = 1e-3f;
    tp.batch_size = 200;
    tp.max_epochs = 30;
    tp.patience = 6;
    tp.seed = 0;
    tp.optimizer = LEVI_OPT_ADAM;
    return tp;
}

const char *levi_precision_name(levi_precision p) {
    return p == LEVI_PRECISION_BF16 ? "bf16" : "f32";
}

int levi_precision_parse(const char *name) {
    if (!strcmp(name, "f32")) return LEVI_PRECISION_F32;
    if (!strcmp(name, "bf16")) return LEVI_PRECISION_BF16;
    return -1;
}

levi_select_params levi_select_default_params(void) {
    levi_select_params sp;
    memset(&sp, 0, sizeof sp);
    sp.n_seeds = 3;
    return sp;
}

static levi_status check_train_params(const levi_train_params *tp, levi_error *err) {
    if (!(tp->lr >= 0.0f) || !isfinite(tp->lr))
        return levi_errorf(err, LEVI_ERR_ARG, "train params: lr = %g, expected >= 0",
                           (double)tp->lr);
    if (tp->batch_size < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "train params: batch_size = %d < 1", tp->batch_size);
    if (tp->max_epochs < 1 || tp->max_epochs > LEVI_MAX_EPOCHS)
        return levi_errorf(err, LEVI_ERR_ARG, "train params: max_epochs = %d, expected 1..%d",
                           tp->max_epochs, LEVI_MAX_EPOCHS);
    if (tp->patience < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "train params: patience = %d < 1", tp->patience);
    if (tp->epoch_limit < 0 || tp->max_steps_per_epoch < 0 || tp->progress_every < 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "train params: epoch_limit, max_steps_per_epoch and progress_every "
                           "must be >= 0");
    if (tp->optimizer != LEVI_OPT_SGD && tp->optimizer != LEVI_OPT_ADAM &&
        tp->optimizer != LEVI_OPT_ADAMW)
        return levi_errorf(err, LEVI_ERR_ARG, "train params: optimizer = %d is unknown",
                           (int)tp->optimizer);
    if (tp->precision != LEVI_PRECISION_F32 && tp->precision != LEVI_PRECISION_BF16)
        return levi_errorf(err, LEVI_ERR_ARG, "train params: precision = %d is unknown",
                           (int)tp->precision);
    return LEVI_OK;
}

/* ---- step-level trainer -------------------------------------------------------------------- */

struct levi_trainer {
    levi_model *m;
    const levi_task_data *d;
    levi_train_params tp;
    levi_optim *opt;
    levi_rng rng; /* shuffles and masking */
};

static levi_trainer *trainer_new(levi_model *m, const levi_task_data *d,
                                 const levi_train_params *tp) {
    levi_trainer *t = levi_xcalloc(1, sizeof *t);
    t->m = m;
    t->d = d;
    t->tp = *tp;
    levi_optim_params op = levi_optim_default_params(tp->optimizer);
    op.lr = tp->lr;
    op.weight_decay = tp->weight_decay;
    op.clip_norm = tp->clip_norm;
    t->opt = levi_optim_init(&m->params, op);
    /* One workspace for training batches and evaluation's 1024-row batches. */
    levi__workspace_ensure(m, tp->batch_size > 1024 ? tp->batch_size : 1024);
    return t;
}

/* Fresh start: weights from the seed's first stream, statistics from the train rows. */
static void trainer_fresh(levi_trainer *t, const int64_t *train, int64_t n_train) {
    levi_rng root;
    levi_rng_seed(&root, t->tp.seed);
    levi_rng init = levi_rng_split(&root);
    t->rng = levi_rng_split(&root);
    levi__init_weights(t->m, &init);
    levi__init_from_data(t->m, t->d, train, n_train);
}

levi_status levi_trainer_init(levi_trainer **out, levi_model *m, const levi_task_data *d,
                              const int64_t *train, int64_t n_train, const levi_train_params *tp,
                              levi_error *err) {
    LEVI_ASSERT(out && m && d && tp, "levi_trainer_init needs out, model, data and params");
    *out = NULL;
    levi_status st = check_train_params(tp, err);
    if (st == LEVI_OK) st = levi_task_data_check(d, train, n_train, 1, err);
    if (st == LEVI_OK) st = levi__check_shapes(m, d, err);
    if (st != LEVI_OK) return st;
    levi_trainer *t = trainer_new(m, d, tp);
    trainer_fresh(t, train, n_train);
    *out = t;
    return LEVI_OK;
}

float levi_trainer_step(levi_trainer *t, const int64_t *rows, int64_t n) {
    LEVI_ASSERT(n >= 1 && n <= t->tp.batch_size, "levi_trainer_step: 1 <= n <= batch_size");
    levi_model *m = t->m;
    levi_params_zero_grad(&m->params);
    levi__gather_batch(m, t->d, rows, n, &t->rng, 1);
    int bf16 = t->tp.precision == LEVI_PRECISION_BF16;
    levi__forward(m, n, bf16);
    float loss = levi__loss(m, n);
    levi__backward(m, n, bf16);
    /* The optimizer skips a step whose gradient is not finite; report it as a non-finite
       loss so the epoch loop stops with intact weights. */
    float norm = levi_optim_step(t->opt);
    return isfinite(norm) ? loss : NAN;
}

void levi_trainer_free(levi_trainer *t) {
    if (!t) return;
    levi_optim_free(t->opt);
    free(t);
}

/* ---- training state file ------------------------------------------------------------------- */

typedef struct run_state {
    int epoch; /* completed */
    int best_epoch;
    double best_metric;
    int bad_epochs;
    int finished, diverged, stopped_early;
    int n_history;
    double val_history[LEVI_MAX_EPOCHS];
    double loss_history[LEVI_MAX_EPOCHS];
} run_state;

/* Doubles travel as "%.17g" strings: cJSON prints numbers with 15 digits when they compare
 * equal within an epsilon, which would change the best metric by an ulp on resume and could
 * flip a later early-stopping comparison. strtod reads back "nan" and "inf" too. */
static cJSON *exact(double v) {
    char buf[40];
    snprintf(buf, sizeof buf, "%.17g", v);
    return cJSON_CreateString(buf);
}

static int parse_exact(const cJSON *v, double *out) {
    if (!cJSON_IsString(v)) return 0;
    char *end = NULL;
    *out = strtod(v->valuestring, &end);
    return end != v->valuestring && *end == '\0';
}

static cJSON *double_array(const double *v, int n) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < n; i++) cJSON_AddItemToArray(a, exact(v[i]));
    return a;
}

static levi_status save_state(const levi_trainer *t, const run_state *rs, const float *best,
                              const char *path, levi_error *err) {
    levi_model *m = t->m;
    cJSON *j = cJSON_CreateObject();
    if (!j) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    char seed[32];
    snprintf(seed, sizeof seed, "%" PRIu64, t->tp.seed);
    cJSON_AddNumberToObject(j, "epoch", rs->epoch);
    cJSON_AddNumberToObject(j, "best_epoch", rs->best_epoch);
    cJSON_AddItemToObject(j, "best_metric", exact(rs->best_metric));
    cJSON_AddNumberToObject(j, "bad_epochs", rs->bad_epochs);
    cJSON_AddNumberToObject(j, "finished", rs->finished);
    cJSON_AddNumberToObject(j, "diverged", rs->diverged);
    cJSON_AddNumberToObject(j, "stopped_early", rs->stopped_early);
    cJSON_AddNumberToObject(j, "steps", (double)levi_optim_steps(t->opt));
    cJSON_AddNumberToObject(j, "lr", t->tp.lr);
    cJSON_AddStringToObject(j, "seed", seed);
    cJSON_AddNumberToObject(j, "batch_size", t->tp.batch_size);
    cJSON_AddItemToObject(j, "val_history", double_array(rs->val_history, rs->n_history));
    cJSON_AddItemToObject(j, "loss_history", double_array(rs->loss_history, rs->n_history));
    char *progress = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!progress) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);

    levi_tensor ts[3];
    int n = 0;
    memset(ts, 0, sizeof ts);
    int64_t shape[1];
    size_t sn = levi_optim_state_numel(t->opt);
    if (sn > 0) {
        snprintf(ts[n].name, LEVI_NAME_MAX, "optim.state");
        ts[n].dtype = LEVI_F32;
        shape[0] = (int64_t)sn;
        levi_tensor_set_shape(&ts[n], 1, shape);
        ts[n].data = levi_optim_state(t->opt);
        n++;
    }
    snprintf(ts[n].name, LEVI_NAME_MAX, "best.params");
    ts[n].dtype = LEVI_F32;
    shape[0] = (int64_t)m->params.numel;
    levi_tensor_set_shape(&ts[n], 1, shape);
    ts[n].data = (void *)best;
    n++;
    int64_t rng_bits[4];
    memcpy(rng_bits, t->rng.s, sizeof rng_bits);
    snprintf(ts[n].name, LEVI_NAME_MAX, "rng");
    ts[n].dtype = LEVI_I64;
    shape[0] = 4;
    levi_tensor_set_shape(&ts[n], 1, shape);
    ts[n].data = rng_bits;
    n++;
    const char *keys[3] = {"format", "config", "progress"};
    const char *vals[3] = {LEVI__STATE_FORMAT, m->config_json, progress};
    levi_status st = levi_st_write(path, ts, n, keys, vals, 3, err);
    free(progress);
    return st;
}

static levi_status json_num(const cJSON *o, const char *key, double *out, int exact_string,
                            const char *path, levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (exact_string) {
        if (!parse_exact(v, out))
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: progress field '%s' must be a number written as a string", path,
                               key);
        return LEVI_OK;
    }
    if (!cJSON_IsNumber(v))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: progress field '%s' is %s, expected a number",
                           path, key, v ? "not a number" : "missing");
    *out = v->valuedouble;
    return LEVI_OK;
}

static levi_status load_history(const cJSON *o, const char *key, double *out, int n,
                                const char *path, levi_error *err) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != n)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: progress field '%s' must be an array of %d",
                           path, key, n);
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, a) {
        if (!parse_exact(v, &out[i]))
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: progress field '%s'[%d] must be a number written as a string",
                               path, key, i);
        i++;
    }
    return LEVI_OK;
}

/* Restores the trainer (optimizer, RNG) and the run counters from a state file written for
 * the same configuration, lr, seed and batch size; best receives the best weights. */
static levi_status load_state(levi_trainer *t, run_state *rs, float *best, const char *path,
                              levi_error *err) {
    levi_model *m = t->m;
    levi_st_file *f = levi_st_open(path, err);
    if (!f) return err ? err->status : LEVI_ERR_IO;
    levi_status st = LEVI_OK;
    cJSON *j = NULL;
    const char *fmt = levi_st_metadata(f, "format");
    const char *cfg = levi_st_metadata(f, "config");
    const char *prog = levi_st_metadata(f, "progress");
    if (!fmt || strcmp(fmt, LEVI__STATE_FORMAT) != 0 || !cfg || !prog) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: not a levi training state (metadata 'format' must be \"%s\" with "
                         "'config' and 'progress')",
                         path, LEVI__STATE_FORMAT);
        goto done;
    }
    if (strcmp(cfg, m->config_json) != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: written for a different model configuration than this run's", path);
        goto done;
    }
    if (!(j = cJSON_Parse(prog))) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: metadata 'progress' is not JSON", path);
        goto done;
    }
    double epoch = 0, best_epoch = 0, bad = 0, fin = 0, div = 0, early = 0, steps = 0, lr = 0,
           bs = 0;
    if ((st = json_num(j, "epoch", &epoch, 0, path, err)) ||
        (st = json_num(j, "best_epoch", &best_epoch, 0, path, err)) ||
        (st = json_num(j, "best_metric", &rs->best_metric, 1, path, err)) ||
        (st = json_num(j, "bad_epochs", &bad, 0, path, err)) ||
        (st = json_num(j, "finished", &fin, 0, path, err)) ||
        (st = json_num(j, "diverged", &div, 0, path, err)) ||
        (st = json_num(j, "stopped_early", &early, 0, path, err)) ||
        (st = json_num(j, "steps", &steps, 0, path, err)) ||
        (st = json_num(j, "lr", &lr, 0, path, err)) ||
        (st = json_num(j, "batch_size", &bs, 0, path, err)))
        goto done;
    if (!(epoch >= 0 && epoch <= LEVI_MAX_EPOCHS && best_epoch >= 0 && best_epoch <= epoch &&
          bad >= 0 && steps >= 0)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: progress counters out of range (epoch %g, best_epoch %g)", path,
                         epoch, best_epoch);
        goto done;
    }
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(j, "seed");
    char want_seed[32];
    snprintf(want_seed, sizeof want_seed, "%" PRIu64, t->tp.seed);
    if ((float)lr != t->tp.lr || (int)bs != t->tp.batch_size || !cJSON_IsString(seed) ||
        strcmp(seed->valuestring, want_seed) != 0) {
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: state of a run with lr %g, batch %d, seed %s; this run has lr %g, "
                         "batch %d, seed %s",
                         path, lr, (int)bs, cJSON_IsString(seed) ? seed->valuestring : "?",
                         (double)t->tp.lr, t->tp.batch_size, want_seed);
        goto done;
    }
    rs->epoch = (int)epoch;
    rs->best_epoch = (int)best_epoch;
    rs->bad_epochs = (int)bad;
    rs->finished = fin != 0;
    rs->diverged = div != 0;
    rs->stopped_early = early != 0;
    rs->n_history = rs->epoch;
    if ((st = load_history(j, "val_history", rs->val_history, rs->n_history, path, err)) ||
        (st = load_history(j, "loss_history", rs->loss_history, rs->n_history, path, err)))
        goto done;
    size_t sn = levi_optim_state_numel(t->opt);
    if (sn > 0) {
        int64_t shape[1] = {(int64_t)sn};
        if ((st = levi_st_read_f32(f, "optim.state", 1, shape, levi_optim_state(t->opt), err)))
            goto done;
    }
    levi_optim_set_steps(t->opt, (int64_t)steps);
    int64_t bshape[1] = {(int64_t)m->params.numel};
    if ((st = levi_st_read_f32(f, "best.params", 1, bshape, best, err))) goto done;
    const levi_tensor *r = levi_st_find(f, "rng");
    if (!r || r->dtype != LEVI_I64 || r->ndim != 1 || r->shape[0] != 4) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: tensor 'rng' must be I64 [4]", path);
        goto done;
    }
    memcpy(t->rng.s, r->data, sizeof t->rng.s);
done:
    cJSON_Delete(j);
    levi_st_close(f);
    return st;
}

static int file_exists(const char *path) {
    struct stat sb;
    return path && stat(path, &sb) == 0;
}

/* ---- the epoch loop ------------------------------------------------------------------------ */

static void fill_result(levi_train_result *res, const run_state *rs, const levi_trainer *t,
                        double seconds, double examples) {
    if (!res) return;
    memset(res, 0, sizeof *res);
    res->epochs_run = rs->epoch;
    res->best_epoch = rs->best_epoch;
    res->best_val_metric = rs->best_metric;
    res->finished = rs->finished;
    res->diverged = rs->diverged;
    res->stopped_early = rs->stopped_early;
    res->steps = levi_optim_steps(t->opt);
    res->seconds = seconds;
    res->examples_per_s = seconds > 0 ? examples / seconds : 0;
    res->lr = t->tp.lr;
    res->n_history = rs->n_history;
    memcpy(res->val_history, rs->val_history, sizeof rs->val_history);
    memcpy(res->loss_history, rs->loss_history, sizeof rs->loss_history);
}

levi_status levi_train(levi_model *m, const levi_task_data *d, const int64_t *train,
                       int64_t n_train, const int64_t *val, int64_t n_val,
                       const levi_train_params *tp, levi_train_result *res, levi_error *err) {
    LEVI_ASSERT(m && d && tp, "levi_train needs a model, data and params");
    double t0 = levi_now();
    levi_status st = check_train_params(tp, err);
    if (st == LEVI_OK) st = levi__check_shapes(m, d, err);
    if (st == LEVI_OK && n_train < 1)
        st = levi_errorf(err, LEVI_ERR_ARG, "training needs at least one train row");
    if (st == LEVI_OK) st = levi_task_data_check(d, train, n_train, 1, err);
    if (st == LEVI_OK) st = levi_task_data_check(d, val, n_val, 1, err);
    if (st != LEVI_OK) return st;

    if (m->hp.method == LEVI_METHOD_BIAS) {
        st = levi__bias_fit(m, d, train, n_train, val, n_val, res, err);
        if (st == LEVI_OK && tp->ckpt_path) st = levi_model_save(m, tp->ckpt_path, err);
        if (res) res->seconds = levi_now() - t0;
        return st;
    }

    levi_trainer *t = trainer_new(m, d, tp);
    run_state *rs = levi_xcalloc(1, sizeof *rs);
    float *best = levi_xmalloc(m->params.numel * sizeof(float));
    int64_t *perm = levi_xmalloc((size_t)n_train * sizeof(int64_t));
    rs->best_metric = NAN;
    double examples = 0, train_seconds = 0;

    if (tp->resume && file_exists(tp->state_path)) {
        const char *ck_state = NULL;
        if (!tp->ckpt_path) {
            st = levi_errorf(err, LEVI_ERR_ARG, "resuming needs ckpt_path next to state_path");
            goto done;
        }
        if ((st = levi__model_load_weights(m, tp->ckpt_path, &ck_state, err)) != LEVI_OK ||
            (st = load_state(t, rs, best, tp->state_path, err)) != LEVI_OK) {
            levi_error_prefix(err, "cannot resume: ");
            goto done;
        }
        if (rs->finished) goto done; /* ckpt_path holds the final (best) weights */
    } else {
        trainer_fresh(t, train, n_train);
        memcpy(best, m->params.data, m->params.numel * sizeof(float));
    }

    int B = tp->batch_size;
    int64_t steps_per_epoch = (n_train + B - 1) / B;
    if (tp->max_steps_per_epoch > 0 && tp->max_steps_per_epoch < steps_per_epoch)
        steps_per_epoch = tp->max_steps_per_epoch;
    while (rs->epoch < tp->max_epochs) {
        if (tp->epoch_limit > 0 && rs->epoch >= tp->epoch_limit) goto done; /* resumable */
        int epoch = rs->epoch + 1;
        memcpy(perm, train, (size_t)n_train * sizeof(int64_t));
        levi_rng_shuffle_i64(&t->rng, perm, n_train);
        double loss_sum = 0, te = levi_now();
        int64_t seen = 0;
        int diverged = 0;
        levi_train_progress pr;
        memset(&pr, 0, sizeof pr);
        pr.epoch = epoch;
        pr.max_epochs = tp->max_epochs;
        pr.lr = tp->lr;
        pr.seed = tp->seed;
        pr.steps_per_epoch = steps_per_epoch;
        for (int64_t s = 0; s < steps_per_epoch; s++) {
            int64_t off = s * B, nb = n_train - off < B ? n_train - off : B;
            float loss = levi_trainer_step(t, perm + off, nb);
            if (!isfinite(loss)) {
                diverged = 1;
                break;
            }
            loss_sum += (double)loss * (double)nb;
            seen += nb;
            if (tp->stop_flag && *tp->stop_flag) {
                st =
                    levi_errorf(err, LEVI_ERR_INTERRUPTED,
                                "interrupted in epoch %d at step %lld; %s", epoch, (long long)s + 1,
                                tp->state_path ? "the run resumes from the last finished epoch"
                                               : "no state_path, so nothing to resume from");
                train_seconds += levi_now() - te;
                examples += (double)seen;
                goto done;
            }
            if (tp->progress && tp->progress_every > 0 && (s + 1) % tp->progress_every == 0) {
                pr.step = s + 1;
                pr.global_step = levi_optim_steps(t->opt);
                pr.loss = loss_sum / (double)seen;
                double el = levi_now() - te;
                pr.examples_per_s = el > 0 ? (double)seen / el : 0;
                tp->progress(tp->progress_user, &pr);
            }
        }
        double el = levi_now() - te;
        train_seconds += el;
        examples += (double)seen;
        if (diverged) {
            rs->diverged = 1;
            if (rs->best_epoch == 0) {
                st = levi_errorf(err, LEVI_ERR_NUMERIC,
                                 "training loss became non-finite in epoch %d (lr %g too large?)",
                                 epoch, (double)tp->lr);
                goto done;
            }
            break; /* keep the best epoch so far */
        }
        double metric = NAN;
        int improved;
        if (n_val > 0) {
            levi_metrics vm;
            if ((st = levi_evaluate(m, d, val, n_val, &vm, err)) != LEVI_OK) goto done;
            metric = vm.metric;
            improved = rs->best_epoch == 0 ? isfinite(metric)
                                           : levi_metric_better(m, metric, rs->best_metric);
        } else {
            improved = 1; /* no validation: the last epoch is the result */
        }
        rs->epoch = epoch;
        rs->val_history[rs->n_history] = metric;
        rs->loss_history[rs->n_history] = seen ? loss_sum / (double)seen : NAN;
        rs->n_history++;
        if (improved) {
            rs->best_epoch = epoch;
            rs->best_metric = metric;
            rs->bad_epochs = 0;
            memcpy(best, m->params.data, m->params.numel * sizeof(float));
        } else {
            rs->bad_epochs++;
        }
        if (n_val > 0 && rs->bad_epochs >= tp->patience) rs->stopped_early = 1;
        if (tp->ckpt_path &&
            (st = levi__model_save_ex(m, tp->ckpt_path, "in_progress", err)) != LEVI_OK)
            goto done;
        if (tp->state_path && (st = save_state(t, rs, best, tp->state_path, err)) != LEVI_OK)
            goto done;
        if (tp->progress) {
            pr.step = steps_per_epoch;
            pr.global_step = levi_optim_steps(t->opt);
            pr.loss = rs->loss_history[rs->n_history - 1];
            pr.examples_per_s = el > 0 ? (double)seen / el : 0;
            pr.epoch_done = 1;
            pr.val_metric = metric;
            pr.improved = improved;
            tp->progress(tp->progress_user, &pr);
        }
        if (rs->stopped_early) break;
    }
    /* Finished: the best weights become the model, in memory and on disk. */
    rs->finished = 1;
    memcpy(m->params.data, best, m->params.numel * sizeof(float));
    levi__model_refresh(m);
    if (tp->ckpt_path && (st = levi_model_save(m, tp->ckpt_path, err)) != LEVI_OK) goto done;
    if (tp->state_path && (st = save_state(t, rs, best, tp->state_path, err)) != LEVI_OK) goto done;
done:
    fill_result(res, rs, t, train_seconds, examples);
    if (res) res->seconds = levi_now() - t0;
    levi_free(perm);
    levi_free(best);
    free(rs);
    levi_trainer_free(t);
    return st;
}

/* ---- selection ----------------------------------------------------------------------------- */

/* One run (model built, trained at lr with seed), checkpointed under ckpt_dir when set. A
 * diverged run yields *model == NULL and a NaN metric, not an error. */
static levi_status run_one(const levi_head_params *hp, const levi_train_params *tp_in,
                           const levi_select_params *sp, float lr, uint64_t seed,
                           const levi_task_data *d, const int64_t *train, int64_t n_train,
                           const int64_t *val, int64_t n_val, levi_model **model,
                           levi_train_result *res, levi_error *err) {
    *model = NULL;
    levi_train_params tp = *tp_in;
    tp.lr = lr;
    tp.seed = seed;
    char ck[4096], stp[4096];
    if (sp->ckpt_dir) {
        levi_status st = levi_mkdirs(sp->ckpt_dir, err);
        if (st != LEVI_OK) return st;
        /* Named by the lr's value, so a changed grid never resumes the wrong run. */
        snprintf(ck, sizeof ck, "%s/lr%g-seed%" PRIu64 ".safetensors", sp->ckpt_dir, (double)lr,
                 seed);
        snprintf(stp, sizeof stp, "%s/lr%g-seed%" PRIu64 ".state.safetensors", sp->ckpt_dir,
                 (double)lr, seed);
        tp.ckpt_path = ck;
        tp.state_path = stp;
        tp.resume = 1;
    }
    levi_status st = levi_model_init(model, hp, d, err);
    if (st != LEVI_OK) return st;
    st = levi_train(*model, d, train, n_train, val, n_val, &tp, res, err);
    if (st == LEVI_ERR_NUMERIC) {
        levi_model_free(*model);
        *model = NULL;
        res->best_val_metric = NAN;
        res->diverged = 1;
        return LEVI_OK;
    }
    if (st == LEVI_OK && !res->finished)
        st = levi_errorf(err, LEVI_ERR_INTERRUPTED,
                         "run lr %g seed %" PRIu64 " stopped by epoch_limit before finishing",
                         (double)lr, seed);
    if (st != LEVI_OK) {
        levi_model_free(*model);
        *model = NULL;
    }
    return st;
}

levi_status levi_select_and_train(const levi_head_params *hp, const levi_train_params *tp,
                                  const levi_select_params *sp, const levi_task_data *d,
                                  const int64_t *train, int64_t n_train, const int64_t *val,
                                  int64_t n_val, const levi_eval_set *sets, int n_sets,
                                  levi_select_result *res, levi_model **models_out,
                                  levi_error *err) {
    LEVI_ASSERT(hp && tp && sp && d && res, "levi_select_and_train needs its arguments");
    memset(res, 0, sizeof *res);
    if (n_val < 1)
        return levi_errorf(err, LEVI_ERR_ARG, "selection needs ID validation rows (n_val = %lld)",
                           (long long)n_val);
    if (sp->n_seeds < 1 || sp->n_seeds > LEVI_MAX_SEEDS)
        return levi_errorf(err, LEVI_ERR_ARG, "select params: n_seeds = %d, expected 1..%d",
                           sp->n_seeds, LEVI_MAX_SEEDS);
    if (sp->n_lr < 0 || sp->n_lr > LEVI_MAX_GRID)
        return levi_errorf(err, LEVI_ERR_ARG, "select params: n_lr = %d, expected 0..%d", sp->n_lr,
                           LEVI_MAX_GRID);
    if (n_sets < 0 || n_sets > LEVI_MAX_EVAL_SETS)
        return levi_errorf(err, LEVI_ERR_ARG, "%d eval sets; at most %d", n_sets,
                           LEVI_MAX_EVAL_SETS);
    if (hp->method == LEVI_METHOD_BIAS) {
        res->n_lr = levi_default_lr_grid(hp->method, res->lr);
    } else if (sp->n_lr > 0) {
        res->n_lr = sp->n_lr;
        memcpy(res->lr, sp->lr_grid, (size_t)sp->n_lr * sizeof(float));
    } else {
        res->n_lr = levi_default_lr_grid(hp->method, res->lr);
    }
    levi_model *models[LEVI_MAX_SEEDS] = {0};
    levi_model *best_model = NULL;
    levi_status st = LEVI_OK;
    int best = -1;
    levi_train_result *tr = levi_xcalloc(1, sizeof *tr);
    levi_train_result best_tr;
    /* 1. The grid, first seed only; decisions read ID validation and nothing else. */
    for (int i = 0; i < res->n_lr; i++) {
        levi_model *mi = NULL;
        st = run_one(hp, tp, sp, res->lr[i], sp->first_seed, d, train, n_train, val, n_val, &mi, tr,
                     err);
        if (st != LEVI_OK) goto done;
        res->lr_val_metric[i] = mi ? tr->best_val_metric : NAN;
        int take = 0;
        if (mi) {
            if (best < 0 || levi_metric_better(mi, tr->best_val_metric, res->lr_val_metric[best]))
                take = 1;
            else if (tr->best_val_metric == res->lr_val_metric[best] && res->lr[i] < res->lr[best])
                take = 1; /* tie: the smaller learning rate */
        }
        if (take) {
            levi_model_free(best_model);
            best_model = mi;
            best = i;
            best_tr = *tr;
        } else {
            levi_model_free(mi);
        }
    }
    if (best < 0) {
        st = levi_errorf(err, LEVI_ERR_NUMERIC,
                         "every learning rate of the grid diverged (non-finite training loss)");
        goto done;
    }
    res->best_lr_index = best;
    res->best_lr = res->lr[best];
    /* 2. The other seeds at the chosen lr. */
    res->n_seeds = sp->n_seeds;
    for (int k = 0; k < sp->n_seeds; k++) {
        res->seeds[k] = sp->first_seed + (uint64_t)k;
        if (k == 0) {
            models[0] = best_model;
            best_model = NULL;
            res->train[0] = best_tr;
            continue;
        }
        st = run_one(hp, tp, sp, res->best_lr, res->seeds[k], d, train, n_train, val, n_val,
                     &models[k], &res->train[k], err);
        if (st != LEVI_OK) goto done;
        if (!models[k]) {
            st = levi_errorf(err, LEVI_ERR_NUMERIC, "seed %" PRIu64 " diverged at the chosen lr %g",
                             res->seeds[k], (double)res->best_lr);
            goto done;
        }
    }
    /* 3. Evaluation on the held-out sets, after every choice has been made. */
    res->n_sets = n_sets;
    for (int s = 0; s < n_sets; s++) {
        snprintf(res->set_names[s], sizeof res->set_names[s], "%s",
                 sets[s].name ? sets[s].name : "");
        double sum = 0, sum2 = 0;
        for (int k = 0; k < sp->n_seeds; k++) {
            st = levi_evaluate(models[k], d, sets[s].rows, sets[s].n, &res->metrics[k][s], err);
            if (st != LEVI_OK) {
                levi_error_prefix(err, "evaluating '%s': ", res->set_names[s]);
                goto done;
            }
            sum += res->metrics[k][s].metric;
        }
        double mean = sum / sp->n_seeds;
        for (int k = 0; k < sp->n_seeds; k++) {
            double e = res->metrics[k][s].metric - mean;
            sum2 += e * e;
        }
        res->mean[s] = mean;
        res->std[s] = sp->n_seeds > 1 ? sqrt(sum2 / (sp->n_seeds - 1)) : 0.0;
    }
done:
    free(tr);
    levi_model_free(best_model);
    for (int k = 0; k < LEVI_MAX_SEEDS; k++) {
        if (st == LEVI_OK && models_out && k < sp->n_seeds)
            models_out[k] = models[k];
        else
            levi_model_free(models[k]);
    }
    return st;
}
