/* Post-hoc ensembles of `levi fit` (implements ensemble.h): members' predictions come from
 * reloading their saved runs (a4/lp: model.safetensors through levi_model_load; ft/fs: the
 * tuned backbone/ folder plus head.safetensors), one prediction pass over
 * the union of the eval sets' rows, combined per seed and scored as fit_finetune.c scores a
 * run. Weights, temperatures and WiSE-FT's a are chosen on the ID-validation rows only.
 * Not for: training anything, option parsing (fit.c), or the report (report.c). */
#include "ensemble.h"

#include "cli.h"
#include "levi/finetune.h"
#include "levi/safetensors.h"
#include "report.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

/* WiSE-FT's mixing weights: the grid of the original paper's sweeps, a in {0, 0.1, ..., 1}
   (Wortsman et al. 2022b), chosen on ID validation (paper D.3). */
static const float ens_wise_alphas[] = {0.0f, 0.1f, 0.2f, 0.3f, 0.4f, 0.5f,
                                        0.6f, 0.7f, 0.8f, 0.9f, 1.0f};
#define ENS_N_ALPHA ((int)(sizeof ens_wise_alphas / sizeof ens_wise_alphas[0]))
/* Temperature scaling of the calibrated ensemble (classification only): T = 2^(i/4),
   i = -8..8, each member's T chosen by ID-validation NLL (Kumar et al. 2022a calibrate each
   model on ID data, then average the calibrated probabilities with equal weights). */
#define ENS_N_TEMP 17

static const struct {
    const char *name, *label;
    const char *member[2]; /* member[1] NULL: one member method (wise-ft, a1 uses ft twice) */
} ens_table[FIT_ENS_COUNT] = {
    {"ft+lp", "FT+RobustModel (Kumar et al. 2022a): calibrated FT and LP outputs", {"ft", "lp"}},
    {"ft+fs", "FT+FS: FT and FS outputs averaged", {"ft", "fs"}},
    {"wise-ft",
     "FT+ZeroShot (WiSE-FT, Wortsman et al. 2022b): pre-trained/FT weights",
     {"ft", NULL}},
    {"a1", "A1) two fine-tuned models, outputs averaged", {"ft", NULL}},
    {"a2", "A2) fine-tuned model and small model (a4), outputs averaged", {"ft", "a4"}},
};

int fit_ensemble_parse(const char *name) {
    for (int k = 0; k < FIT_ENS_COUNT; k++)
        if (strcmp(name, ens_table[k].name) == 0) return FIT_ENS_BASE + k;
    return -1;
}

int fit_is_ensemble(int id) {
    return id >= FIT_ENS_BASE && id < FIT_ENS_BASE + FIT_ENS_COUNT;
}

const char *fit_ensemble_name(int id) {
    return fit_is_ensemble(id) ? ens_table[id - FIT_ENS_BASE].name : NULL;
}

static int ens_has_method(const fit_config *cfg, const char *name) {
    const int id = fit_method_parse(name);
    for (int i = 0; i < cfg->n_methods; i++)
        if (cfg->methods[i] == id) return 1;
    return 0;
}

int fit_ensembles_check(const fit_config *cfg) {
    for (int i = 0; i < cfg->n_methods; i++) {
        if (!fit_is_ensemble(cfg->methods[i])) continue;
        const int k = cfg->methods[i] - FIT_ENS_BASE;
        const char *a = ens_table[k].member[0], *b = ens_table[k].member[1];
        if (!ens_has_method(cfg, a) || (b && !ens_has_method(cfg, b))) {
            if (b)
                fprintf(stderr,
                        "levi fit: %s needs %s and %s in --methods (it combines their "
                        "finished runs)\n",
                        ens_table[k].name, a, b);
            else
                fprintf(stderr,
                        "levi fit: %s needs %s in --methods (it combines its finished "
                        "runs)\n",
                        ens_table[k].name, a);
            return LEVI_EXIT_USAGE;
        }
    }
    return LEVI_EXIT_OK;
}

static int ens_is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Everything one ensemble computation shares: the rows predicted (union of the eval sets
   and ID validation) and the fine-tuning view of the data. */
typedef struct ens_state {
    const fit_config *cfg;
    fit_context *ctx;
    int O;          /* outputs per row: 1 (regression) or n_classes (probabilities) */
    int64_t n_rows; /* rows predicted */
    int64_t *rows;  /* [n_rows] ascending dataset rows */
    int64_t *slot;  /* [ctx->n] position in rows, or -1 */
    int64_t *val;   /* [n_val] slots of the ID-validation rows */
    int64_t n_val;
    const char **texts; /* [ctx->n] */
    levi_ft_data data;
    /* Members' outputs already computed in this call: ft seed k serves ft+lp, ft+fs, a1 and
       a2, and a fine-tuned encoder's prediction pass is the expensive part. */
    int n_cached;
    struct {
        char method[16];
        int seed;
        float *pred; /* [n_rows, O] */
    } cache[2 * FIT_MAX_SEEDS + 8];
} ens_state;

/* A member run: its result (for the key and the diverged flag) and its folder. */
typedef struct ens_member {
    char method[16];
    int seed;
    char dir[FIT_PATH_MAX + 64];
    cJSON *result;
    int diverged;
} ens_member;

static int ens_member_open(const ens_state *es, const char *method, int seed, ens_member *mb) {
    memset(mb, 0, sizeof *mb);
    snprintf(mb->method, sizeof mb->method, "%s", method);
    mb->seed = seed;
    snprintf(mb->dir, sizeof mb->dir, "%s/runs/%s/seed%d", es->cfg->out, method, seed);
    char path[FIT_PATH_MAX + 96];
    snprintf(path, sizeof path, "%s/result.json", mb->dir);
    levi_error err = {0};
    mb->result = fit_read_json(path, &err);
    if (!mb->result) {
        fprintf(stderr,
                "levi fit: ensemble member %s seed %d: %s (the member run must finish "
                "first)\n",
                method, seed, err.msg);
        return LEVI_EXIT_INPUT;
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(mb->result, "train");
    mb->diverged = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(t, "diverged"));
    return LEVI_EXIT_OK;
}

static const char *ens_member_key(const ens_member *mb) {
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(mb->result, "key");
    return cJSON_IsString(k) ? k->valuestring : "";
}

/* The fine-tuned model of an ft/fs run: its saved encoder folder and its head.safetensors
   (run folders written before that file existed: the head tensors of state.safetensors, which
   hold the best weights once the run finished). */
static levi_status ens_ft_open(const ens_state *es, const ens_member *mb, levi_ft_model **out,
                               levi_error *err) {
    *out = NULL;
    char backbone[FIT_PATH_MAX + 96], state[FIT_PATH_MAX + 96], conf[FIT_PATH_MAX + 96];
    snprintf(backbone, sizeof backbone, "%s/backbone", mb->dir);
    snprintf(state, sizeof state, "%s/head.safetensors", mb->dir);
    if (access(state, F_OK) != 0) snprintf(state, sizeof state, "%s/state.safetensors", mb->dir);
    snprintf(conf, sizeof conf, "%s/config.json", mb->dir);
    levi_ft_params fp = levi_ft_default_params(LEVI_FT_FULL);
    fp.max_len = 64;
    cJSON *c = fit_read_json(conf, err);
    const cJSON *ml = cJSON_GetObjectItemCaseSensitive(c, "max_len");
    if (cJSON_IsNumber(ml) && ml->valuedouble >= 2 && ml->valuedouble <= 1 << 16)
        fp.max_len = (int)ml->valuedouble;
    cJSON_Delete(c);
    levi_ft_model *m = NULL;
    levi_status st = levi_ft_init(&m, backbone, &fp, es->ctx->td.n_classes, err);
    if (st != LEVI_OK)
        return levi_error_prefix(err, "ensemble member %s seed %d: ", mb->method, mb->seed);
    levi_st_file *f = levi_st_open(state, err);
    if (!f) {
        levi_ft_free(m);
        return levi_error_prefix(err, "ensemble member %s seed %d: ", mb->method, mb->seed);
    }
    levi_params *hp = levi_ft_head(m);
    for (int i = 0; st == LEVI_OK && i < hp->count; i++)
        st = levi_st_read_f32(f, hp->items[i].name, hp->items[i].ndim, hp->items[i].shape,
                              hp->data + hp->items[i].offset, err);
    levi_st_close(f);
    if (st != LEVI_OK) {
        levi_ft_free(m);
        return levi_error_prefix(err, "ensemble member %s seed %d: head: ", mb->method, mb->seed);
    }
    *out = m;
    return LEVI_OK;
}

/* pred: [n_rows, O], the member's outputs on es->rows. */
static levi_status ens_member_predict_uncached(const ens_state *es, const ens_member *mb,
                                               float *pred, levi_error *err) {
    if (fit_method_parse(mb->method) >= FIT_FT_BASE) {
        levi_ft_model *m = NULL;
        levi_status st = ens_ft_open(es, mb, &m, err);
        if (st == LEVI_OK) st = levi_ft_predict(m, &es->data, es->rows, es->n_rows, pred, err);
        levi_ft_free(m);
        return st;
    }
    char ckpt[FIT_PATH_MAX + 96];
    snprintf(ckpt, sizeof ckpt, "%s/model.safetensors", mb->dir);
    levi_model *m = NULL;
    levi_status st = levi_model_load(&m, ckpt, err);
    if (st == LEVI_OK) st = levi_predict(m, &es->ctx->td, es->rows, es->n_rows, pred, NULL, err);
    levi_model_free(m);
    if (st != LEVI_OK) levi_error_prefix(err, "ensemble member %s seed %d: ", mb->method, mb->seed);
    return st;
}

static levi_status ens_member_predict(ens_state *es, const ens_member *mb, float *pred,
                                      levi_error *err) {
    const size_t bytes = (size_t)(es->n_rows > 0 ? es->n_rows : 1) * es->O * sizeof(float);
    for (int i = 0; i < es->n_cached; i++)
        if (es->cache[i].seed == mb->seed && strcmp(es->cache[i].method, mb->method) == 0) {
            memcpy(pred, es->cache[i].pred, bytes);
            return LEVI_OK;
        }
    levi_status st = ens_member_predict_uncached(es, mb, pred, err);
    const int cap = (int)(sizeof es->cache / sizeof es->cache[0]);
    if (st == LEVI_OK && es->n_cached < cap) {
        snprintf(es->cache[es->n_cached].method, sizeof es->cache[0].method, "%s", mb->method);
        es->cache[es->n_cached].seed = mb->seed;
        es->cache[es->n_cached].pred = levi_xmalloc(bytes);
        memcpy(es->cache[es->n_cached++].pred, pred, bytes);
    }
    return st;
}

/* The metric of pred on the slots sl[0..n) (RMSE or accuracy), and its loss (MSE or NLL). */
static double ens_metric(const ens_state *es, const float *pred, const int64_t *sl, int64_t n,
                         double *loss_out) {
    double sum = 0, loss = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = es->rows[sl[i]];
        const float *p = pred + sl[i] * es->O;
        if (es->O == 1) {
            double e = (double)p[0] - es->ctx->td.y[r];
            sum += e * e;
        } else {
            int arg = 0;
            for (int c = 1; c < es->O; c++) arg = p[c] > p[arg] ? c : arg;
            sum += arg == es->ctx->td.yc[r];
            loss += -log(fmax((double)p[es->ctx->td.yc[r]], 1e-30));
        }
    }
    if (loss_out) *loss_out = n ? (es->O == 1 ? sum : loss) / (double)n : NAN;
    if (n == 0) return NAN;
    return es->O == 1 ? sqrt(sum / (double)n) : sum / (double)n;
}

static int ens_better(int lower_is_better, double a, double b) {
    if (!isfinite(a)) return 0;
    if (!isfinite(b)) return 1;
    return lower_is_better ? a < b : a > b;
}

/* Temperature scaling on probabilities: softmax(logits / T) = p^(1/T) renormalised. */
static void ens_temper(const ens_state *es, const float *p, double T, float *q) {
    for (int64_t i = 0; i < es->n_rows; i++) {
        double z = 0, lmax = -INFINITY;
        const float *pi = p + i * es->O;
        for (int c = 0; c < es->O; c++) lmax = fmax(lmax, log(fmax((double)pi[c], 1e-30)) / T);
        for (int c = 0; c < es->O; c++) z += exp(log(fmax((double)pi[c], 1e-30)) / T - lmax);
        for (int c = 0; c < es->O; c++)
            q[i * es->O + c] = (float)(exp(log(fmax((double)pi[c], 1e-30)) / T - lmax) / z);
    }
}

/* Calibrates p in place with the temperature of least ID-validation NLL; returns it. */
static double ens_calibrate(const ens_state *es, float *p, float *scratch) {
    double best_T = 1, best_nll = INFINITY;
    for (int i = 0; i < ENS_N_TEMP; i++) {
        const double T = pow(2.0, (i - (ENS_N_TEMP - 1) / 2) / 4.0);
        double nll;
        ens_temper(es, p, T, scratch);
        ens_metric(es, scratch, es->val, es->n_val, &nll);
        if (nll < best_nll) best_nll = nll, best_T = T;
    }
    ens_temper(es, p, best_T, scratch);
    memcpy(p, scratch, (size_t)es->n_rows * es->O * sizeof(float));
    return best_T;
}

/* Writes "sets" and "adapters" of a run result from pred (NULL: diverged, values null). */
static void ens_write_sets(const ens_state *es, const float *pred, cJSON *r) {
    fit_context *ctx = es->ctx;
    cJSON *sets = cJSON_AddArrayToObject(r, "sets");
    int64_t *sl = levi_xmalloc((size_t)(es->n_rows > 0 ? es->n_rows : 1) * sizeof(int64_t));
    for (int k = 0; k < ctx->n_sets; k++) {
        const levi_eval_set *s = &ctx->sets[k];
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "name", s->name);
        cJSON_AddNumberToObject(j, "n", (double)s->n);
        cJSON *per = NULL;
        if (pred) {
            for (int64_t i = 0; i < s->n; i++) sl[i] = es->slot[s->rows[i]];
            double loss, metric = ens_metric(es, pred, sl, s->n, &loss);
            cJSON_AddNumberToObject(j, "value", metric);
            cJSON_AddNumberToObject(j, "loss", loss);
            per = cJSON_AddArrayToObject(j, "adapters");
            cJSON_AddItemToArray(per, cJSON_CreateNumber(metric));
        } else {
            cJSON_AddNullToObject(j, "value");
            cJSON_AddArrayToObject(j, "adapters");
        }
        cJSON_AddItemToArray(sets, j);
    }
    levi_free(sl);
    cJSON *adapters = cJSON_AddArrayToObject(r, "adapters");
    if (pred) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "name", "ensemble");
        cJSON_AddNumberToObject(a, "layer", -1);
        cJSON_AddItemToArray(adapters, a);
    }
}

static double ens_set_value(const cJSON *result, const char *name) {
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

/* WiSE-FT of one FT run: picks a on ID validation, leaves the chosen model's outputs in
   pred and the per-a ID-validation metrics in alpha_val. */
static levi_status ens_wise_ft(const ens_state *es, const ens_member *mb, float *pred,
                               float *alpha_out, double alpha_val[ENS_N_ALPHA], levi_error *err) {
    levi_ft_model *m = NULL;
    levi_bert *pre = NULL, *tuned = NULL;
    char backbone[FIT_PATH_MAX + 96];
    snprintf(backbone, sizeof backbone, "%s/backbone", mb->dir);
    int64_t *vrows = levi_xmalloc((size_t)(es->n_val > 0 ? es->n_val : 1) * sizeof(int64_t));
    int64_t *vslot = levi_xmalloc((size_t)(es->n_val > 0 ? es->n_val : 1) * sizeof(int64_t));
    float *vpred = levi_xmalloc((size_t)(es->n_val > 0 ? es->n_val : 1) * es->O * sizeof(float));
    for (int64_t i = 0; i < es->n_val; i++) vrows[i] = es->rows[es->val[i]], vslot[i] = i;
    levi_status st = ens_ft_open(es, mb, &m, err);
    if (st == LEVI_OK && !(pre = levi_bert_open(es->cfg->model, err)))
        st = levi_error_prefix(err, "WiSE-FT pre-trained encoder: ");
    if (st == LEVI_OK && !(tuned = levi_bert_open(backbone, err)))
        st = levi_error_prefix(err, "WiSE-FT fine-tuned encoder: ");
    for (int i = 0; st == LEVI_OK && i < ENS_N_ALPHA; i++) {
        st = levi_ft_interpolate_backbone(m, pre, tuned, ens_wise_alphas[i], err);
        if (st == LEVI_OK) st = levi_ft_predict(m, &es->data, vrows, es->n_val, vpred, err);
        if (st != LEVI_OK) break;
        /* vpred is laid out in vrows' order: score it through a view whose rows are vrows. */
        ens_state v = *es;
        v.rows = vrows;
        alpha_val[i] = ens_metric(&v, vpred, vslot, es->n_val, NULL);
    }
    /* Scanning down from a = 1 (plain FT) with "strictly better" makes ties go to the larger
       a, so WiSE-FT moves away from the fine-tuned weights only when ID validation says so. */
    int best = ENS_N_ALPHA - 1;
    for (int i = ENS_N_ALPHA - 2; st == LEVI_OK && i >= 0; i--)
        if (ens_better(es->ctx->lower_is_better, alpha_val[i], alpha_val[best])) best = i;
    if (st == LEVI_OK) {
        *alpha_out = ens_wise_alphas[best];
        st = levi_ft_interpolate_backbone(m, pre, tuned, ens_wise_alphas[best], err);
    }
    if (st == LEVI_OK) st = levi_ft_predict(m, &es->data, es->rows, es->n_rows, pred, err);
    levi_bert_free(pre);
    levi_bert_free(tuned);
    levi_ft_free(m);
    levi_free(vrows);
    levi_free(vslot);
    levi_free(vpred);
    return st;
}

/* One seed of one ensemble; *result is its run result (caller frees). Exit code. */
static int ens_run_one(ens_state *es, int kind, int seed, cJSON **result) {
    *result = NULL;
    const fit_config *cfg = es->cfg;
    const char *name = ens_table[kind].name;
    ens_member mb[2];
    int n_mb = 0, rc;
    const int seed2 = kind == FIT_ENS_A1 ? (seed + 1) % cfg->seeds : seed;
    if ((rc = ens_member_open(es, ens_table[kind].member[0], seed, &mb[0])) != LEVI_EXIT_OK)
        return rc;
    n_mb = 1;
    const char *second = kind == FIT_ENS_A1 ? "ft" : ens_table[kind].member[1];
    if (second) {
        if ((rc = ens_member_open(es, second, seed2, &mb[1])) != LEVI_EXIT_OK) {
            cJSON_Delete(mb[0].result);
            return rc;
        }
        n_mb = 2;
    }
    char dir[FIT_PATH_MAX + 64], path[FIT_PATH_MAX + 96], label[96], key[65];
    snprintf(dir, sizeof dir, "%s/runs/%s/seed%d", cfg->out, name, seed);
    snprintf(path, sizeof path, "%s/result.json", dir);
    snprintf(label, sizeof label, "%s seed %d", name, seed);
    {
        char buf[1024];
        /* The candidate grids are part of the identity: changing them recomputes. */
        int len = snprintf(buf, sizeof buf,
                           "levi-ensemble-v1\n%s\nseed %d\nmodel %s\ngrids %d/%d\n", name, seed,
                           kind == FIT_ENS_WISE_FT ? cfg->model : "", ENS_N_ALPHA, ENS_N_TEMP);
        for (int i = 0; i < n_mb && len < (int)sizeof buf; i++)
            len += snprintf(buf + len, sizeof buf - (size_t)len, "%s %d %s\n", mb[i].method,
                            mb[i].seed, ens_member_key(&mb[i]));
        levi_sha256_hex(buf, strlen(buf), key);
    }
    levi_error err = {0};
    if (ens_is_file(path)) {
        cJSON *old = fit_read_json(path, &err);
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(old, "key");
        if (cJSON_IsString(k) && strcmp(k->valuestring, key) == 0) {
            printf("%s: finished earlier (id_val %.4f), skipped\n", label,
                   ens_set_value(old, "id_val"));
            for (int i = 0; i < n_mb; i++) cJSON_Delete(mb[i].result);
            *result = old;
            return LEVI_EXIT_OK;
        }
        cJSON_Delete(old);
    }
    if (kind == FIT_ENS_A1 && cfg->seeds < 2 && seed == 0)
        fprintf(stderr, "levi fit: a1 with --seeds 1 averages ft seed 0 with itself (it equals "
                        "ft); use --seeds 2 or more for two fine-tuned models\n");

    const double t0 = levi_now();
    const size_t np = (size_t)(es->n_rows > 0 ? es->n_rows : 1) * es->O;
    float *pred = levi_xmalloc(np * sizeof(float)), *other = levi_xmalloc(np * sizeof(float));
    int diverged = 0;
    for (int i = 0; i < n_mb; i++) diverged |= mb[i].diverged;
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "format", "levi-run-result");
    cJSON_AddNumberToObject(r, "version", 1);
    cJSON_AddStringToObject(r, "method", name);
    cJSON_AddNumberToObject(r, "seed", seed);
    cJSON_AddStringToObject(r, "metric", es->ctx->lower_is_better ? "rmse" : "accuracy");
    cJSON_AddStringToObject(r, "key", key);
    cJSON *jm = cJSON_AddArrayToObject(r, "members");
    for (int i = 0; i < n_mb; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "method", mb[i].method);
        cJSON_AddNumberToObject(o, "seed", mb[i].seed);
        cJSON_AddStringToObject(o, "key", ens_member_key(&mb[i]));
        cJSON_AddItemToArray(jm, o);
    }
    levi_status st = LEVI_OK;
    if (!diverged && kind == FIT_ENS_WISE_FT) {
        float alpha = 1;
        double aval[ENS_N_ALPHA];
        for (int i = 0; i < ENS_N_ALPHA; i++) aval[i] = NAN;
        st = ens_wise_ft(es, &mb[0], pred, &alpha, aval, &err);
        if (st == LEVI_OK) {
            cJSON *g = cJSON_AddArrayToObject(r, "alpha_grid");
            cJSON *v = cJSON_AddArrayToObject(r, "alpha_val");
            for (int i = 0; i < ENS_N_ALPHA; i++) {
                cJSON_AddItemToArray(g, cJSON_CreateNumber(fit_float_json(ens_wise_alphas[i])));
                cJSON_AddItemToArray(v, cJSON_CreateNumber(aval[i]));
            }
            cJSON_AddNumberToObject(r, "alpha", fit_float_json(alpha));
            cJSON_AddStringToObject(r, "head", "ft");
            printf("%s: a = %g chosen on ID validation\n", label, (double)alpha);
        }
    } else if (!diverged) {
        st = ens_member_predict(es, &mb[0], pred, &err);
        if (st == LEVI_OK) st = ens_member_predict(es, &mb[1], other, &err);
        if (st == LEVI_OK && kind == FIT_ENS_FT_LP && es->O > 1) {
            float *scratch = levi_xmalloc(np * sizeof(float));
            const double t_a = ens_calibrate(es, pred, scratch);
            const double t_b = ens_calibrate(es, other, scratch);
            levi_free(scratch);
            cJSON *t = cJSON_AddArrayToObject(r, "temperatures");
            cJSON_AddItemToArray(t, cJSON_CreateNumber(t_a));
            cJSON_AddItemToArray(t, cJSON_CreateNumber(t_b));
        }
        /* Equal weights (Kumar et al. 2022a; paper D.4 for A1/A2): 0.5f * (a + b) gives back a
           member bit for bit when both members agree. */
        if (st == LEVI_OK)
            for (size_t j = 0; j < (size_t)es->n_rows * es->O; j++)
                pred[j] = 0.5f * (pred[j] + other[j]);
        cJSON *w = cJSON_AddArrayToObject(r, "weights");
        cJSON_AddItemToArray(w, cJSON_CreateNumber(0.5));
        cJSON_AddItemToArray(w, cJSON_CreateNumber(0.5));
    }
    for (int i = 0; i < n_mb; i++) cJSON_Delete(mb[i].result);
    levi_free(other);
    if (st != LEVI_OK) {
        levi_free(pred);
        cJSON_Delete(r);
        return fit_fail("fit", &err);
    }
    cJSON *t = cJSON_AddObjectToObject(r, "train");
    cJSON_AddNumberToObject(t, "epochs_run", 0);
    cJSON_AddBoolToObject(t, "diverged", diverged);
    cJSON_AddNumberToObject(t, "seconds", levi_now() - t0);
    ens_write_sets(es, diverged ? NULL : pred, r);
    levi_free(pred);
    if (diverged)
        printf("%s: a member diverged; metrics left empty\n", label);
    else
        printf("%s: ID val %.4f, ID test %.4f, OOD %.4f\n", label, ens_set_value(r, "id_val"),
               ens_set_value(r, "id_test"), ens_set_value(r, "ood"));
    fflush(stdout);
    if ((st = levi_mkdirs(dir, &err)) != LEVI_OK ||
        (st = fit_write_json(path, r, &err)) != LEVI_OK) {
        cJSON_Delete(r);
        return fit_fail("fit", &err);
    }
    *result = fit_json_roundtrip(r);
    return LEVI_EXIT_OK;
}

int fit_ensembles(const fit_config *cfg, fit_context *ctx, cJSON *methods) {
    LEVI_ASSERT(cfg && ctx && methods, "fit_ensembles needs its arguments");
    int any = 0, rc = fit_ensembles_check(cfg);
    for (int i = 0; i < cfg->n_methods; i++) any |= fit_is_ensemble(cfg->methods[i]);
    if (!any || rc != LEVI_EXIT_OK) return rc;
    ens_state es;
    memset(&es, 0, sizeof es);
    es.cfg = cfg;
    es.ctx = ctx;
    es.O = ctx->td.n_classes ? ctx->td.n_classes : 1;
    const size_t n1 = (size_t)(ctx->n > 0 ? ctx->n : 1);
    uint8_t *want = levi_xcalloc(n1, 1);
    es.slot = levi_xmalloc(n1 * sizeof(int64_t));
    es.rows = levi_xmalloc(n1 * sizeof(int64_t));
    es.val = levi_xmalloc((size_t)(ctx->n_val > 0 ? ctx->n_val : 1) * sizeof(int64_t));
    es.texts = levi_xmalloc(n1 * sizeof *es.texts);
    for (int k = 0; k < ctx->n_sets; k++)
        for (int64_t i = 0; i < ctx->sets[k].n; i++) want[ctx->sets[k].rows[i]] = 1;
    for (int64_t i = 0; i < ctx->n_val; i++) want[ctx->val[i]] = 1;
    for (int64_t r = 0; r < ctx->n; r++) {
        es.slot[r] = want[r] ? es.n_rows : -1;
        if (want[r]) es.rows[es.n_rows++] = r;
        es.texts[r] = levi_dataset_text(ctx->ds, r);
    }
    for (int64_t i = 0; i < ctx->n_val; i++) es.val[es.n_val++] = es.slot[ctx->val[i]];
    levi_free(want);
    es.data = (levi_ft_data){ctx->n, es.texts, ctx->td.n_classes, ctx->td.y, ctx->td.yc};

    for (int i = 0; i < cfg->n_methods && rc == LEVI_EXIT_OK; i++) {
        if (!fit_is_ensemble(cfg->methods[i])) continue;
        const int kind = cfg->methods[i] - FIT_ENS_BASE;
        const char *name = ens_table[kind].name;
        printf("\n== %s: %s ==\n", name, ens_table[kind].label);
        cJSON *entry = cJSON_CreateObject();
        cJSON_AddStringToObject(entry, "method", name);
        cJSON_AddStringToObject(entry, "label", ens_table[kind].label);
        cJSON *runs = cJSON_AddArrayToObject(entry, "runs");
        cJSON_AddItemToArray(methods, entry);
        for (int seed = 0; seed < cfg->seeds && rc == LEVI_EXIT_OK; seed++) {
            cJSON *r = NULL;
            if ((rc = ens_run_one(&es, kind, seed, &r)) == LEVI_EXIT_OK)
                cJSON_AddItemToArray(runs, r);
            if (rc == LEVI_EXIT_OK && levi_cli_interrupted) rc = LEVI_EXIT_INTERRUPTED;
        }
        if (rc == LEVI_EXIT_OK) levi_report_summarize_method(entry);
    }
    for (int i = 0; i < es.n_cached; i++) levi_free(es.cache[i].pred);
    levi_free(es.slot);
    levi_free(es.rows);
    levi_free(es.val);
    levi_free(es.texts);
    return rc;
}
