/* Head-model checkpoints: the configuration as JSON and the weights as safetensors
 * (levi_model_save / levi_model_load), plus loading weights into an existing model for
 * resuming a run.
 *
 * For: files levi and PyTorch's safetensors loader both read. The JSON records the head
 * parameters and the data shapes the model was built for, so a checkpoint rebuilds its model
 * without the data. Checkpoints are untrusted input: every field is type- and range-checked
 * and errors name the file and the field.
 * Not for: the training state (optimizer moments, RNG: train.c writes that second file).
 */
#include "head_internal.h"

#include "levi/safetensors.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#define LEVI__HEAD_FORMAT "levi-head-v1"

/* ---- configuration JSON -------------------------------------------------------------------- */

static cJSON *int_array(const int *v, int n) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

char *levi__config_to_json(const levi_model *m) {
    const levi_head_params *hp = &m->hp;
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    cJSON_AddStringToObject(root, "format", LEVI__HEAD_FORMAT);
    cJSON_AddStringToObject(root, "method", levi_method_name(hp->method));
    cJSON_AddNumberToObject(root, "use_small", hp->use_small);
    cJSON_AddNumberToObject(root, "emb_dim", hp->emb_dim);
    cJSON_AddNumberToObject(root, "emb_init_std", hp->emb_init_std);
    cJSON_AddItemToObject(root, "small_hidden", int_array(hp->small_hidden, hp->n_small_hidden));
    cJSON_AddNumberToObject(root, "feature_adapters", hp->feature_adapters);
    cJSON_AddItemToObject(root, "layer_list", int_array(hp->layer_list, hp->n_layer_list));
    cJSON_AddNumberToObject(root, "n_plain_heads", hp->n_plain_heads);
    cJSON_AddNumberToObject(root, "adapter_hidden", hp->adapter_hidden);
    cJSON *aw = cJSON_CreateArray();
    for (int j = 0; aw && j < m->n_adapters; j++)
        cJSON_AddItemToArray(aw, cJSON_CreateNumber(hp->adapter_weight[j]));
    cJSON_AddItemToObject(root, "adapter_weight", aw);
    cJSON_AddStringToObject(root, "ensemble",
                            hp->ensemble == LEVI_ENSEMBLE_LOGIT ? "logit" : "prob");
    cJSON_AddNumberToObject(root, "standardize", hp->standardize);
    cJSON_AddNumberToObject(root, "unseen_to_unknown", hp->unseen_to_unknown);
    cJSON_AddNumberToObject(root, "feature_dropout", hp->feature_dropout);
    int cols[64], nc = 0;
    for (int c = 0; c < 64; c++)
        if (hp->bias_cols >> c & 1) cols[nc++] = c;
    cJSON_AddItemToObject(root, "bias_cols", int_array(cols, nc));
    cJSON *bl = cJSON_CreateArray();
    for (int i = 0; bl && i < hp->n_bias_lambda; i++)
        cJSON_AddItemToArray(bl, cJSON_CreateNumber(hp->bias_lambda[i]));
    cJSON_AddItemToObject(root, "bias_lambda", bl);
    cJSON_AddNumberToObject(root, "bias_sweeps", hp->bias_sweeps);
    cJSON *data = cJSON_AddObjectToObject(root, "data");
    if (data) {
        cJSON_AddNumberToObject(data, "n_cat", m->n_cat);
        cJSON_AddItemToObject(data, "cat_card", int_array(m->card, m->n_cat));
        cJSON_AddNumberToObject(data, "n_num", m->n_num);
        cJSON_AddNumberToObject(data, "n_layers", m->n_layers);
        cJSON_AddNumberToObject(data, "feat_dim", m->feat_dim);
        cJSON_AddNumberToObject(data, "n_classes", m->n_classes);
    }
    /* Derived, for readers of the file; checked again on load. */
    cJSON_AddItemToObject(root, "adapter_layers", int_array(m->adapter_layer, m->n_adapters));
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

/* Reads an integer field; errors name the file and field and what was found. */
static levi_status get_int(const cJSON *obj, const char *key, int lo, int hi, int *out,
                           const char *where, levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(v))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: config field '%s' is %s, expected an integer",
                           where, key, v ? "not a number" : "missing");
    double x = v->valuedouble;
    if (!(x >= lo && x <= hi) || x != floor(x))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: config field '%s' = %g, expected an integer in [%d, %d]", where,
                           key, x, lo, hi);
    *out = (int)x;
    return LEVI_OK;
}

/* Reads obj[key], an array of at most cap numbers, into out_int (integers in [lo, hi]) or,
   when out_int is NULL, into out_float (finite numbers). */
static levi_status get_num_array(const cJSON *obj, const char *key, int lo, int hi, int cap,
                                 int *out_int, float *out_float, int *n, const char *where,
                                 levi_error *err) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsArray(a))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: config field '%s' is %s, expected an array",
                           where, key, a ? "not an array" : "missing");
    int k = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, a) {
        if (k >= cap)
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: config field '%s' has more than %d entries", where, key, cap);
        if (out_int) {
            if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi) ||
                v->valuedouble != floor(v->valuedouble))
                return levi_errorf(err, LEVI_ERR_FORMAT,
                                   "%s: config field '%s'[%d] is not an integer in [%d, %d]", where,
                                   key, k, lo, hi);
            out_int[k++] = (int)v->valuedouble;
        } else {
            if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
                return levi_errorf(err, LEVI_ERR_FORMAT,
                                   "%s: config field '%s'[%d] is not a number", where, key, k);
            out_float[k++] = (float)v->valuedouble;
        }
    }
    *n = k;
    return LEVI_OK;
}

/* Reads an array of integers in [lo, hi] into out (at most cap). */
static levi_status get_int_array(const cJSON *obj, const char *key, int lo, int hi, int cap,
                                 int *out, int *n, const char *where, levi_error *err) {
    return get_num_array(obj, key, lo, hi, cap, out, NULL, n, where, err);
}

static levi_status get_float(const cJSON *obj, const char *key, float *out, const char *where,
                             levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: config field '%s' is %s, expected a number",
                           where, key, v ? "not a finite number" : "missing");
    *out = (float)v->valuedouble;
    return LEVI_OK;
}

static levi_status get_float_array(const cJSON *obj, const char *key, int cap, float *out, int *n,
                                   const char *where, levi_error *err) {
    return get_num_array(obj, key, 0, 0, cap, NULL, out, n, where, err);
}

levi_status levi__model_from_json(levi_model **out, const char *json, const char *where,
                                  levi_error *err) {
    *out = NULL;
    cJSON *root = cJSON_Parse(json);
    if (!root)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: the 'config' metadata is not JSON", where);
    levi_status st = LEVI_OK;
    levi_head_params hp;
    memset(&hp, 0, sizeof hp);
    int32_t card[LEVI_MAX_CAT];
    int cards[LEVI_MAX_CAT], n_card = 0, n = 0, tmp[64];
    int n_cat = 0, n_num = 0, n_layers = 0, feat_dim = 0, n_classes = 0;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(root, "format");
    const cJSON *meth = cJSON_GetObjectItemCaseSensitive(root, "method");
    const cJSON *ens = cJSON_GetObjectItemCaseSensitive(root, "ensemble");
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, LEVI__HEAD_FORMAT) != 0) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: config 'format' is %s, expected \"%s\"", where,
                         cJSON_IsString(fmt) ? fmt->valuestring : "missing", LEVI__HEAD_FORMAT);
        goto done;
    }
    int method = cJSON_IsString(meth) ? levi_method_parse(meth->valuestring) : -1;
    if (method < 0) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: config 'method' is %s, expected one of "
                         "levi, a3, a4, a5, lp, layer, bias",
                         where, cJSON_IsString(meth) ? meth->valuestring : "missing");
        goto done;
    }
    hp.method = (levi_method)method;
    if (!cJSON_IsObject(data)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: config has no 'data' object", where);
        goto done;
    }
#define TRY(x)                                                                                     \
    if ((st = (x)) != LEVI_OK) goto done
    TRY(get_int(root, "use_small", 0, 1, &hp.use_small, where, err));
    TRY(get_int(root, "emb_dim", 0, 1 << 16, &hp.emb_dim, where, err));
    TRY(get_float(root, "emb_init_std", &hp.emb_init_std, where, err));
    TRY(get_int_array(root, "small_hidden", 1, 1 << 20, LEVI_MAX_SMALL_LAYERS, hp.small_hidden,
                      &hp.n_small_hidden, where, err));
    TRY(get_int(root, "feature_adapters", 0, 1, &hp.feature_adapters, where, err));
    TRY(get_int_array(root, "layer_list", -4096, 4096, LEVI_MAX_ADAPTERS, hp.layer_list,
                      &hp.n_layer_list, where, err));
    TRY(get_int(root, "n_plain_heads", -1, LEVI_MAX_ADAPTERS, &hp.n_plain_heads, where, err));
    TRY(get_int(root, "adapter_hidden", 0, 1 << 20, &hp.adapter_hidden, where, err));
    TRY(get_float_array(root, "adapter_weight", LEVI_MAX_ADAPTERS, hp.adapter_weight, &n, where,
                        err));
    TRY(get_int(root, "standardize", 0, 1, &hp.standardize, where, err));
    TRY(get_int(root, "unseen_to_unknown", 0, 1, &hp.unseen_to_unknown, where, err));
    /* Absent in checkpoints written before the field existed: no dropout. */
    if (cJSON_GetObjectItemCaseSensitive(root, "feature_dropout"))
        TRY(get_float(root, "feature_dropout", &hp.feature_dropout, where, err));
    TRY(get_int_array(root, "bias_cols", 0, 63, 64, tmp, &n, where, err));
    for (int i = 0; i < n; i++) hp.bias_cols |= (uint64_t)1 << tmp[i];
    TRY(get_float_array(root, "bias_lambda", LEVI_MAX_GRID, hp.bias_lambda, &hp.n_bias_lambda,
                        where, err));
    TRY(get_int(root, "bias_sweeps", 0, 1 << 20, &hp.bias_sweeps, where, err));
    if (!cJSON_IsString(ens) ||
        (strcmp(ens->valuestring, "prob") != 0 && strcmp(ens->valuestring, "logit") != 0)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: config 'ensemble' must be \"prob\" or \"logit\"", where);
        goto done;
    }
    hp.ensemble = strcmp(ens->valuestring, "logit") == 0 ? LEVI_ENSEMBLE_LOGIT : LEVI_ENSEMBLE_PROB;
    TRY(get_int(data, "n_cat", 0, LEVI_MAX_CAT, &n_cat, where, err));
    TRY(get_int_array(data, "cat_card", 1, 1 << 30, LEVI_MAX_CAT, cards, &n_card, where, err));
    if (n_card != n_cat) {
        st =
            levi_errorf(err, LEVI_ERR_FORMAT, "%s: config data.cat_card has %d entries, n_cat = %d",
                        where, n_card, n_cat);
        goto done;
    }
    TRY(get_int(data, "n_num", 0, 1 << 20, &n_num, where, err));
    TRY(get_int(data, "n_layers", 0, 4096, &n_layers, where, err));
    TRY(get_int(data, "feat_dim", 0, 1 << 20, &feat_dim, where, err));
    TRY(get_int(data, "n_classes", 0, 1 << 24, &n_classes, where, err));
#undef TRY
    for (int c = 0; c < n_cat; c++) card[c] = cards[c];
    levi_task_data shape;
    memset(&shape, 0, sizeof shape);
    shape.n_cat = n_cat;
    shape.cat_card = card;
    shape.n_num = n_num;
    shape.n_layers = n_layers;
    shape.feat_dim = feat_dim;
    shape.n_classes = n_classes;
    if ((st = levi_model_init(out, &hp, &shape, err)) != LEVI_OK) {
        levi_error_prefix(err, "%s: config describes no valid model: ", where);
        goto done;
    }
    /* The derived head list must come out as the writer recorded it. */
    int layers[LEVI_MAX_ADAPTERS], nl = 0;
    if ((st = get_int_array(root, "adapter_layers", -1, 4096, LEVI_MAX_ADAPTERS, layers, &nl, where,
                            err)) != LEVI_OK)
        goto done;
    int same = nl == (*out)->n_adapters;
    for (int j = 0; same && j < nl; j++) same = layers[j] == (*out)->adapter_layer[j];
    if (!same) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: config 'adapter_layers' does not match the heads its parameters "
                         "give (%d recorded, %d derived)",
                         where, nl, (*out)->n_adapters);
        goto done;
    }
done:
    if (st != LEVI_OK) {
        levi_model_free(*out);
        *out = NULL;
    }
    cJSON_Delete(root);
    return st;
}

/* ---- weights ----------------------------------------------------------------------------- */

levi_status levi__model_save_ex(const levi_model *m, const char *path, const char *state,
                                levi_error *err) {
    int n = m->params.count;
    levi_tensor *t = calloc((size_t)(n ? n : 1), sizeof *t);
    if (!t) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    for (int i = 0; i < n; i++) t[i] = levi_params_tensor(&m->params, i);
    const char *keys[3] = {"format", "config", "state"};
    const char *vals[3] = {LEVI__HEAD_FORMAT, m->config_json, state};
    levi_status st = levi_st_write(path, t, n, keys, vals, 3, err);
    free(t);
    return st;
}

levi_status levi_model_save(const levi_model *m, const char *path, levi_error *err) {
    LEVI_ASSERT(m && path, "levi_model_save needs a model and a path");
    return levi__model_save_ex(m, path, "final", err);
}

/* Copies every parameter of m from an open checkpoint, checking names and shapes. */
static levi_status read_weights(levi_model *m, const levi_st_file *f, const char *path,
                                levi_error *err) {
    for (int i = 0; i < m->params.count; i++) {
        const levi_param *p = &m->params.items[i];
        levi_status st =
            levi_st_read_f32(f, p->name, p->ndim, p->shape, levi_params_data(&m->params, i), err);
        if (st != LEVI_OK) return st;
    }
    /* Non-finite weights would only surface later as NaN predictions; say where now. */
    for (int i = 0; i < m->params.count; i++) {
        const levi_param *p = &m->params.items[i];
        const float *x = levi_params_data(&m->params, i);
        for (size_t k = 0; k < p->numel; k++)
            if (!isfinite(x[k]))
                return levi_errorf(err, LEVI_ERR_NUMERIC, "%s: tensor '%s' element %zu is %g", path,
                                   p->name, k, (double)x[k]);
    }
    levi__model_refresh(m);
    return LEVI_OK;
}

static levi_status check_head_format(const levi_st_file *f, const char *path, levi_error *err) {
    const char *fmt = levi_st_metadata(f, "format");
    if (!fmt || strcmp(fmt, LEVI__HEAD_FORMAT) != 0)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: metadata 'format' is %s%s%s, expected \"%s\" (not a levi head "
                           "checkpoint)",
                           path, fmt ? "\"" : "", fmt ? fmt : "missing", fmt ? "\"" : "",
                           LEVI__HEAD_FORMAT);
    if (!levi_st_metadata(f, "config"))
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: metadata has no 'config'", path);
    return LEVI_OK;
}

levi_status levi_model_load(levi_model **out, const char *path, levi_error *err) {
    LEVI_ASSERT(out && path, "levi_model_load needs out and a path");
    *out = NULL;
    levi_st_file *f = levi_st_open(path, err);
    if (!f) return err ? err->status : LEVI_ERR_IO;
    levi_status st = check_head_format(f, path, err);
    if (st == LEVI_OK) st = levi__model_from_json(out, levi_st_metadata(f, "config"), path, err);
    if (st == LEVI_OK) st = read_weights(*out, f, path, err);
    levi_st_close(f);
    if (st != LEVI_OK) {
        levi_model_free(*out);
        *out = NULL;
    }
    return st;
}

levi_status levi__model_load_weights(levi_model *m, const char *path, const char **state_out,
                                     levi_error *err) {
    levi_st_file *f = levi_st_open(path, err);
    if (!f) return err ? err->status : LEVI_ERR_IO;
    levi_status st = check_head_format(f, path, err);
    if (st == LEVI_OK && strcmp(levi_st_metadata(f, "config"), m->config_json) != 0)
        st = levi_errorf(err, LEVI_ERR_ARG,
                         "%s: written for a different configuration than this run's (delete it "
                         "or use the same method, options and data)",
                         path);
    if (st == LEVI_OK) st = read_weights(m, f, path, err);
    if (st == LEVI_OK && state_out) {
        const char *s = levi_st_metadata(f, "state");
        *state_out = s && strcmp(s, "final") == 0 ? "final" : "in_progress";
    }
    levi_st_close(f);
    return st;
}
