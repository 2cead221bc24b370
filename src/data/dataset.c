/* The dataset built from a spec and a table: ID/OOD tagging from the spec's shift, the seeded
 * train/val/test split of ID rows, categorical vocabularies from ID-train rows only (0 is the
 * reserved unknown id), standardised numeric inputs, labels, rendered texts, OOD groups, the
 * summary/self-check, the checksum used in cache keys, and subsampling for CI-sized runs.
 *
 * The dataset copies what it needs, so the spec and table can be freed after init.
 * Not for: batching for a particular model, tokenization, or anything that trains. */
#include "data_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- string pool: many small strings freed together ------------------------------------- */
typedef struct pool {
    char **blocks;
    int n, cap;
    size_t used, size;
} pool;

static char *pool_strndup(pool *p, const char *s, size_t len) {
    if (p->n == 0 || p->size - p->used < len + 1) {
        size_t size = len + 1 > 65536 ? len + 1 : 65536;
        if (p->n == p->cap) {
            p->cap = p->cap ? p->cap * 2 : 8;
            p->blocks = realloc(p->blocks, (size_t)p->cap * sizeof *p->blocks);
            LEVI_ASSERT(p->blocks, "out of memory");
        }
        p->blocks[p->n] = malloc(size);
        LEVI_ASSERT(p->blocks[p->n], "out of memory");
        p->n++;
        p->size = size;
        p->used = 0;
    }
    char *d = p->blocks[p->n - 1] + p->used;
    memcpy(d, s, len);
    d[len] = 0;
    p->used += len + 1;
    return d;
}

static char *pool_strdup(pool *p, const char *s) {
    return pool_strndup(p, s, strlen(s));
}

static void pool_free(pool *p) {
    for (int i = 0; i < p->n; i++) free(p->blocks[i]);
    free(p->blocks);
    memset(p, 0, sizeof *p);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    LEVI_ASSERT(p, "out of memory");
    return p;
}

/* ---- the dataset ---------------------------------------------------------------------------- */

struct levi_dataset {
    pool strings;
    const char *name, *spec_file, *source, *label_name;
    int64_t n;
    levi_task task;
    float *labels;
    int32_t *classes;
    int nclasses;
    const char **class_names;
    int ncat;
    levi_categorical *cats;
    int32_t **cat_ids;
    const char ***cat_vocab;
    int nnum;
    levi_numeric *nums;
    float **num_vals;
    double **num_raw;
    int has_text;
    char *text_buf;
    int64_t *text_off; /* [n + 1] */
    uint8_t *tags;
    int64_t *split_rows[LEVI_SPLIT_COUNT];
    int64_t split_count[LEVI_SPLIT_COUNT];
    int64_t *source_rows;
    int ngroups;
    const char **group_names;
    int64_t **group_rows;
    int64_t *group_count;
    int has_expect;
    int64_t expect_id, expect_ood;
    int nexpect; /* -1: groups not given */
    const char **expect_names;
    int64_t *expect_counts;
    int64_t subsampled_from; /* rows of the dataset this was subsampled from; 0 if not */
};

static levi_dataset *dataset_alloc(int64_t n, int ncat, int nnum) {
    levi_dataset *ds = xcalloc(1, sizeof *ds);
    ds->n = n;
    ds->ncat = ncat;
    ds->nnum = nnum;
    ds->labels = xcalloc((size_t)n, sizeof *ds->labels);
    ds->tags = xcalloc((size_t)n, 1);
    ds->source_rows = xcalloc((size_t)n, sizeof *ds->source_rows);
    ds->cats = xcalloc((size_t)ncat, sizeof *ds->cats);
    ds->cat_ids = xcalloc((size_t)ncat, sizeof *ds->cat_ids);
    ds->cat_vocab = xcalloc((size_t)ncat, sizeof *ds->cat_vocab);
    ds->nums = xcalloc((size_t)nnum, sizeof *ds->nums);
    ds->num_vals = xcalloc((size_t)nnum, sizeof *ds->num_vals);
    ds->num_raw = xcalloc((size_t)nnum, sizeof *ds->num_raw);
    ds->text_off = xcalloc((size_t)n + 1, sizeof *ds->text_off);
    ds->nexpect = -1;
    return ds;
}

void levi_dataset_free(levi_dataset *ds) {
    if (!ds) return;
    free(ds->labels);
    free(ds->classes);
    free(ds->class_names);
    for (int c = 0; c < ds->ncat; c++) {
        free(ds->cat_ids[c]);
        free(ds->cat_vocab[c]);
    }
    free(ds->cats);
    free(ds->cat_ids);
    free(ds->cat_vocab);
    for (int j = 0; j < ds->nnum; j++) {
        free(ds->num_vals[j]);
        free(ds->num_raw[j]);
    }
    free(ds->nums);
    free(ds->num_vals);
    free(ds->num_raw);
    free(ds->text_buf);
    free(ds->text_off);
    free(ds->tags);
    for (int s = 0; s < LEVI_SPLIT_COUNT; s++) free(ds->split_rows[s]);
    free(ds->source_rows);
    for (int g = 0; g < ds->ngroups; g++) free(ds->group_rows[g]);
    free(ds->group_rows);
    free(ds->group_names);
    free(ds->group_count);
    free(ds->expect_names);
    free(ds->expect_counts);
    pool_free(&ds->strings);
    free(ds);
}

static void build_split_rows(levi_dataset *ds) {
    for (int s = 0; s < LEVI_SPLIT_COUNT; s++) {
        free(ds->split_rows[s]);
        ds->split_count[s] = 0;
    }
    for (int64_t i = 0; i < ds->n; i++) ds->split_count[ds->tags[i]]++;
    for (int s = 0; s < LEVI_SPLIT_COUNT; s++) {
        ds->split_rows[s] = xcalloc((size_t)ds->split_count[s], sizeof(int64_t));
        ds->split_count[s] = 0;
    }
    for (int64_t i = 0; i < ds->n; i++) {
        int s = ds->tags[i];
        ds->split_rows[s][ds->split_count[s]++] = i;
    }
}

/* Mean and population std over train rows; std 1 when constant (or no train rows). */
static void standardise(levi_dataset *ds, int j) {
    const double *raw = ds->num_raw[j];
    double sum = 0, sq = 0;
    int64_t m = ds->split_count[LEVI_SPLIT_TRAIN];
    const int64_t *tr = ds->split_rows[LEVI_SPLIT_TRAIN];
    for (int64_t k = 0; k < m; k++) sum += raw[tr[k]];
    double mean = m ? sum / (double)m : 0;
    for (int64_t k = 0; k < m; k++) sq += (raw[tr[k]] - mean) * (raw[tr[k]] - mean);
    double sd = m ? sqrt(sq / (double)m) : 0;
    if (!(sd > 1e-12)) sd = 1;
    ds->nums[j].mean = mean;
    ds->nums[j].std = sd;
    for (int64_t i = 0; i < ds->n; i++)
        ds->num_vals[j][i] =
            ds->tags[i] == LEVI_SPLIT_EXCLUDED ? NAN : (float)((raw[i] - mean) / sd);
    ds->nums[j].values = ds->num_vals[j];
    ds->nums[j].raw = ds->num_raw[j];
}

/* ---- resolving the spec against the table ------------------------------------------------- */

static levi_status need_col(const levi_spec *s, const levi_table *t, const char *jpath,
                            const char *name, int *col, levi_error *err) {
    *col = levi_table_find_column(t, name);
    if (*col >= 0) return LEVI_OK;
    char list[512], q[64];
    return levi_errorf(err, LEVI_ERR_NOT_FOUND, "%s: %s: expected a column of %s (%s), found %s",
                       s->file, jpath, levi_table_source(t),
                       levi_table_column_list(t, list, sizeof list),
                       levi__quote(name, q, sizeof q));
}

typedef struct rcond {
    const levi__cond *c;
    int col;
    struct rcond *kids;
} rcond;

static void rcond_free_kids(rcond *r) {
    if (!r || !r->kids) return;
    for (int i = 0; i < r->c->num_kids; i++) rcond_free_kids(&r->kids[i]);
    free(r->kids);
}

static levi_status compile_cond(const levi_spec *s, const levi_table *t, const levi__cond *c,
                                rcond *out, levi_error *err) {
    out->c = c;
    out->col = -1;
    out->kids = NULL;
    if (c->num_kids) {
        out->kids = xcalloc((size_t)c->num_kids, sizeof *out->kids);
        for (int i = 0; i < c->num_kids; i++) {
            levi_status st = compile_cond(s, t, &c->kids[i], &out->kids[i], err);
            if (st) return st;
        }
        return LEVI_OK;
    }
    char jp[300];
    snprintf(jp, sizeof jp, "%s.column", c->jpath);
    return need_col(s, t, jp, c->column, &out->col, err);
}

static int token_listed(const char *tok, size_t len, char *const *values, int nvalues) {
    for (int k = 0; k < nvalues; k++)
        if (strlen(values[k]) == len && memcmp(values[k], tok, len) == 0) return 1;
    return 0;
}

/* Whether some value of the cell (split by sep when non-NULL) is listed. */
static int cell_any_of(const char *cell, const char *sep, char *const *values, int nvalues) {
    if (!sep) return token_listed(cell, strlen(cell), values, nvalues);
    size_t sl = strlen(sep);
    for (const char *p = cell;;) {
        const char *e = strstr(p, sep);
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (token_listed(p, len, values, nvalues)) return 1;
        if (!e) return 0;
        p = e + sl;
    }
}

static levi_status eval_cond(const levi_table *t, const rcond *r, int64_t row, int *res,
                             levi_error *err) {
    const levi__cond *c = r->c;
    levi_status st;
    switch (c->kind) {
    case LEVI__COND_ALL:
    case LEVI__COND_ANY: {
        int want = c->kind == LEVI__COND_ANY;
        for (int i = 0; i < c->num_kids; i++) {
            int v;
            if ((st = eval_cond(t, &r->kids[i], row, &v, err))) return st;
            if (v == want) {
                *res = want;
                return LEVI_OK;
            }
        }
        *res = !want;
        return LEVI_OK;
    }
    case LEVI__COND_NOT:
        if ((st = eval_cond(t, &r->kids[0], row, res, err))) return st;
        *res = !*res;
        return LEVI_OK;
    case LEVI__COND_ANY_OF:
    case LEVI__COND_NONE_OF: {
        int any =
            cell_any_of(levi_table_cell(t, row, r->col), c->multi_sep, c->values, c->num_values);
        *res = c->kind == LEVI__COND_ANY_OF ? any : !any;
        return LEVI_OK;
    }
    case LEVI__COND_DATE: {
        const char *cell = levi_table_cell(t, row, r->col);
        int64_t when;
        if (!levi__parse_date(cell, c->date_format, &when)) {
            char q[64];
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s:%lld: %s: expected a date in the format \"%s\" (%s), found %s",
                               levi_table_row_source(t, row), (long long)levi_table_line(t, row),
                               c->column, c->date_format, c->jpath, levi__quote(cell, q, sizeof q));
        }
        *res =
            (!c->has_before || when < c->before) && (!c->has_on_or_after || when >= c->on_or_after);
        return LEVI_OK;
    }
    }
    LEVI_ASSERT(0, "unknown condition kind");
    return LEVI_OK;
}

/* ---- building ----------------------------------------------------------------------------- */

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int cmp_num_str(const void *a, const void *b) {
    double x, y;
    levi__parse_double(*(const char *const *)a, &x);
    levi__parse_double(*(const char *const *)b, &y);
    if (x != y) return (x > y) - (x < y);
    return cmp_str(a, b); /* "1" and "1.0": a total order keeps the class ids deterministic */
}

static levi_status build_labels(levi_dataset *ds, const levi_spec *s, const levi_table *t, int col,
                                levi_error *err) {
    char q[64];
    if (s->task == LEVI_TASK_REGRESSION) {
        for (int64_t i = 0; i < ds->n; i++) {
            if (ds->tags[i] == LEVI_SPLIT_EXCLUDED) {
                ds->labels[i] = NAN;
                continue;
            }
            const char *v = levi_table_cell(t, i, col);
            double x;
            if (!levi__parse_double(v, &x))
                return levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: %s: expected a number, found %s",
                                   levi_table_row_source(t, i), (long long)levi_table_line(t, i),
                                   s->label_column, levi__quote(v, q, sizeof q));
            ds->labels[i] = (float)x;
        }
        return LEVI_OK;
    }
    levi__strmap m;
    const char **names;
    int nc = 0;
    if (s->classes_auto) {
        levi__strmap seen;
        levi__strmap_init(&seen, 64);
        names = NULL;
        int cap = 0, all_numeric = 1;
        for (int64_t i = 0; i < ds->n; i++) {
            if (ds->tags[i] == LEVI_SPLIT_EXCLUDED) continue;
            const char *v = levi_table_cell(t, i, col);
            if (levi__strmap_get(&seen, v) >= 0) continue;
            levi__strmap_put(&seen, v, nc);
            if (nc == cap) {
                cap = cap ? cap * 2 : 16;
                names = realloc(names, (size_t)cap * sizeof *names);
                LEVI_ASSERT(names, "out of memory");
            }
            double x;
            if (!levi__parse_double(v, &x)) all_numeric = 0;
            names[nc++] = v;
        }
        levi__strmap_free(&seen);
        /* "1" < "2" < "10" for numeric labels; byte order otherwise: deterministic either way. */
        if (nc) qsort(names, (size_t)nc, sizeof *names, all_numeric ? cmp_num_str : cmp_str);
        if (nc < 2) {
            free(names);
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: label.classes: expected at least two distinct values of \"%s\" "
                               "in %s for \"auto\", found %d",
                               s->file, s->label_column, levi_table_source(t), nc);
        }
    } else {
        nc = s->num_classes;
        names = xcalloc((size_t)nc, sizeof *names);
        for (int k = 0; k < nc; k++) names[k] = s->classes[k];
    }
    ds->nclasses = nc;
    ds->class_names = xcalloc((size_t)nc, sizeof *ds->class_names);
    levi__strmap_init(&m, (size_t)nc);
    for (int k = 0; k < nc; k++) {
        ds->class_names[k] = pool_strdup(&ds->strings, names[k]);
        levi__strmap_put(&m, ds->class_names[k], k);
    }
    free(names);
    ds->classes = xcalloc((size_t)ds->n, sizeof *ds->classes);
    for (int64_t i = 0; i < ds->n; i++) {
        if (ds->tags[i] == LEVI_SPLIT_EXCLUDED) {
            ds->classes[i] = -1;
            ds->labels[i] = NAN;
            continue;
        }
        const char *v = levi_table_cell(t, i, col);
        int64_t k = levi__strmap_get(&m, v);
        if (k < 0) {
            char list[256];
            size_t w = 0;
            for (int j = 0; j < nc && w < sizeof list; j++)
                w += (size_t)snprintf(list + w, sizeof list - w, "%s\"%s\"", j ? ", " : "",
                                      ds->class_names[j]);
            levi__strmap_free(&m);
            return levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: %s: expected one of %s, found %s",
                               levi_table_row_source(t, i), (long long)levi_table_line(t, i),
                               s->label_column, list, levi__quote(v, q, sizeof q));
        }
        ds->classes[i] = (int32_t)k;
        ds->labels[i] = (float)k;
    }
    levi__strmap_free(&m);
    return LEVI_OK;
}

static void build_vocab(levi_dataset *ds, int c, const char *name, const char *const *cells) {
    levi__strmap seen;
    int64_t ntr = ds->split_count[LEVI_SPLIT_TRAIN];
    const int64_t *tr = ds->split_rows[LEVI_SPLIT_TRAIN];
    levi__strmap_init(&seen, 1024);
    const char **uniq = xcalloc((size_t)ntr + 1, sizeof *uniq);
    int64_t nu = 0;
    for (int64_t k = 0; k < ntr; k++) {
        const char *v = cells[tr[k]];
        if (levi__strmap_get(&seen, v) < 0) {
            levi__strmap_put(&seen, v, nu);
            uniq[nu++] = v;
        }
    }
    levi__strmap_free(&seen);
    qsort(uniq, (size_t)nu, sizeof *uniq, cmp_str);
    LEVI_ASSERT(nu < INT32_MAX, "vocabulary larger than int32");
    const char **vocab = xcalloc((size_t)nu + 1, sizeof *vocab);
    levi__strmap ids;
    levi__strmap_init(&ids, (size_t)nu);
    vocab[0] = "<unk>";
    for (int64_t j = 0; j < nu; j++) {
        vocab[j + 1] = pool_strdup(&ds->strings, uniq[j]);
        levi__strmap_put(&ids, vocab[j + 1], j + 1);
    }
    free(uniq);
    int32_t *out = xcalloc((size_t)ds->n, sizeof *out);
    for (int64_t i = 0; i < ds->n; i++) {
        int64_t id = levi__strmap_get(&ids, cells[i]);
        out[i] = id > 0 ? (int32_t)id : 0;
    }
    levi__strmap_free(&ids);
    ds->cat_ids[c] = out;
    ds->cat_vocab[c] = vocab;
    ds->cats[c].name = pool_strdup(&ds->strings, name);
    ds->cats[c].ids = out;
    ds->cats[c].cardinality = (int32_t)(nu + 1);
    ds->cats[c].vocab = vocab;
}

levi_status levi_spec_render_text(const levi_spec *s, const levi_table *t, int64_t row, char **out,
                                  levi_error *err) {
    *out = NULL;
    size_t len = 1;
    for (int k = 0; k < s->num_tpl; k++) {
        if (s->tpl[k].literal) {
            len += strlen(s->tpl[k].literal);
            continue;
        }
        if (levi_table_find_column(t, s->tpl[k].column) < 0) {
            char list[512];
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s:1: expected a column \"%s\" (the spec's text template uses it), "
                               "found only: %s",
                               levi_table_source(t), s->tpl[k].column,
                               levi_table_column_list(t, list, sizeof list));
        }
        len += strlen(levi_table_cell(t, row, levi_table_find_column(t, s->tpl[k].column)));
    }
    char *buf = malloc(len);
    if (!buf) return levi_errorf(err, LEVI_ERR_NOMEM, "out of memory rendering a text");
    size_t w = 0;
    for (int k = 0; k < s->num_tpl; k++) {
        const char *piece =
            s->tpl[k].literal
                ? s->tpl[k].literal
                : levi_table_cell(t, row, levi_table_find_column(t, s->tpl[k].column));
        size_t n = strlen(piece);
        memcpy(buf + w, piece, n);
        w += n;
    }
    buf[w] = 0;
    *out = buf;
    return LEVI_OK;
}

static levi_status build_text(levi_dataset *ds, const levi_spec *s, const levi_table *t,
                              const int *cols, levi_error *err) {
    if (!s->num_tpl) {
        ds->text_buf = xcalloc(1, 1);
        return LEVI_OK; /* every offset is 0: all texts are "" */
    }
    ds->has_text = 1;
    size_t total = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        size_t len = 1;
        for (int k = 0; k < s->num_tpl; k++)
            len += strlen(cols[k] < 0 ? s->tpl[k].literal : levi_table_cell(t, i, cols[k]));
        if (!levi_add_size(total, len, &total))
            return levi_errorf(err, LEVI_ERR_NOMEM, "%s: rendered texts too large", s->file);
    }
    ds->text_buf = malloc(total ? total : 1);
    if (!ds->text_buf)
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %zu bytes of texts", s->file,
                           total);
    size_t w = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        ds->text_off[i] = (int64_t)w;
        for (int k = 0; k < s->num_tpl; k++) {
            const char *piece = cols[k] < 0 ? s->tpl[k].literal : levi_table_cell(t, i, cols[k]);
            size_t len = strlen(piece);
            memcpy(ds->text_buf + w, piece, len);
            w += len;
        }
        ds->text_buf[w++] = 0;
    }
    ds->text_off[ds->n] = (int64_t)w;
    return LEVI_OK;
}

typedef struct group_cand {
    const char *value;
    size_t len;
    int64_t count, last_row;
    int group; /* index in ds->groups, or -1 */
} group_cand;

static int cmp_cand(const void *a, const void *b) {
    const group_cand *x = *(const group_cand *const *)a, *y = *(const group_cand *const *)b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return strcmp(x->value, y->value);
}

static void add_group(levi_dataset *ds, const char *name, int64_t *rows, int64_t count) {
    int g = ds->ngroups++;
    ds->group_names = realloc(ds->group_names, (size_t)ds->ngroups * sizeof *ds->group_names);
    ds->group_rows = realloc(ds->group_rows, (size_t)ds->ngroups * sizeof *ds->group_rows);
    ds->group_count = realloc(ds->group_count, (size_t)ds->ngroups * sizeof *ds->group_count);
    LEVI_ASSERT(ds->group_names && ds->group_rows && ds->group_count, "out of memory");
    ds->group_names[g] = pool_strdup(&ds->strings, name);
    ds->group_rows[g] = rows;
    ds->group_count[g] = count;
}

/* Groups over OOD rows: each value of the column (split by sep) among OOD rows with at least
 * min_count rows becomes a group; a row counts once per value however often it repeats it. */
static void build_value_groups(levi_dataset *ds, const levi__spec_group *g, const levi_table *t,
                               int col) {
    const int64_t *ood = ds->split_rows[LEVI_SPLIT_OOD];
    int64_t nood = ds->split_count[LEVI_SPLIT_OOD];
    const char *sep = g->multi_sep;
    size_t sl = sep ? strlen(sep) : 0;
    levi__strmap index;
    levi__strmap_init(&index, 256);
    pool scratch = {0};
    group_cand *cands = NULL;
    int64_t ncand = 0, cap = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t k = 0; k < nood; k++) {
            int64_t row = ood[k];
            const char *cell = levi_table_cell(t, row, col);
            for (const char *p = cell;;) {
                const char *e = sep ? strstr(p, sep) : NULL;
                size_t len = e ? (size_t)(e - p) : strlen(p);
                if (len > 0) {
                    char *tok = pool_strndup(&scratch, p, len); /* NUL-terminated for the map */
                    int64_t ci = levi__strmap_get(&index, tok);
                    if (pass == 0 && ci < 0) {
                        if (ncand == cap) {
                            cap = cap ? cap * 2 : 64;
                            cands = realloc(cands, (size_t)cap * sizeof *cands);
                            LEVI_ASSERT(cands, "out of memory");
                        }
                        cands[ncand] = (group_cand){tok, len, 0, -1, -1};
                        ci = levi__strmap_put(&index, tok, ncand++);
                    }
                    group_cand *cd = &cands[ci];
                    if (cd->last_row != row) {
                        cd->last_row = row;
                        if (pass == 0)
                            cd->count++;
                        else if (cd->group >= 0)
                            ds->group_rows[cd->group][ds->group_count[cd->group]++] = row;
                    }
                }
                if (!e) break;
                p = e + sl;
            }
        }
        if (pass == 1) break;
        /* Select and order the groups, then reset for the pass that fills their rows. */
        group_cand **order = xcalloc((size_t)ncand, sizeof *order);
        int64_t nsel = 0;
        for (int64_t i = 0; i < ncand; i++) {
            cands[i].last_row = -1;
            if (cands[i].count < g->min_count) continue;
            if (token_listed(cands[i].value, cands[i].len, g->exclude, g->num_exclude)) continue;
            order[nsel++] = &cands[i];
        }
        qsort(order, (size_t)nsel, sizeof *order, cmp_cand);
        for (int64_t i = 0; i < nsel; i++) {
            order[i]->group = ds->ngroups;
            add_group(ds, order[i]->value, xcalloc((size_t)order[i]->count, sizeof(int64_t)), 0);
        }
        free(order);
    }
    free(cands);
    levi__strmap_free(&index);
    pool_free(&scratch);
}

levi_status levi_dataset_init(const levi_spec *s, const levi_table *t, levi_dataset **out,
                              levi_error *err) {
    *out = NULL;
    int64_t n = levi_table_num_rows(t);
    levi_status st = LEVI_OK;
    int label_col, *cat_cols = xcalloc((size_t)s->num_cats, sizeof(int));
    int *num_cols = xcalloc((size_t)s->num_numerics, sizeof(int));
    int *tpl_cols = xcalloc((size_t)s->num_tpl, sizeof(int));
    int *group_cols = xcalloc((size_t)s->num_groups, sizeof(int));
    rcond id_rc = {0}, ood_rc = {0};
    rcond *group_rc = xcalloc((size_t)s->num_groups, sizeof *group_rc);
    levi_dataset *ds = NULL;
    char jp[128];

    /* 1. Every column the spec names must be in the table. */
    if ((st = need_col(s, t, "label.column", s->label_column, &label_col, err))) goto fail;
    for (int c = 0; c < s->num_cats; c++) {
        snprintf(jp, sizeof jp, "categorical[%d].column", c);
        if ((st = need_col(s, t, jp, s->cats[c].column, &cat_cols[c], err))) goto fail;
    }
    for (int j = 0; j < s->num_numerics; j++) {
        snprintf(jp, sizeof jp, "numeric[%d].column", j);
        if ((st = need_col(s, t, jp, s->numerics[j], &num_cols[j], err))) goto fail;
    }
    for (int k = 0; k < s->num_tpl; k++) {
        tpl_cols[k] = -1;
        if (!s->tpl[k].column) continue;
        tpl_cols[k] = levi_table_find_column(t, s->tpl[k].column);
        if (tpl_cols[k] < 0) {
            char list[512];
            st = levi_errorf(err, LEVI_ERR_NOT_FOUND,
                             "%s: text: expected {column} names of %s (%s), found {%.64s} at "
                             "offset %zu",
                             s->file, levi_table_source(t),
                             levi_table_column_list(t, list, sizeof list), s->tpl[k].column,
                             s->tpl[k].offset);
            goto fail;
        }
    }
    if (s->id_cond && (st = compile_cond(s, t, s->id_cond, &id_rc, err))) goto fail;
    if (s->ood_cond && (st = compile_cond(s, t, s->ood_cond, &ood_rc, err))) goto fail;
    for (int g = 0; g < s->num_groups; g++) {
        group_cols[g] = -1;
        if (s->groups[g].by_value) {
            snprintf(jp, sizeof jp, "%s.by_value", s->groups[g].jpath);
            if ((st = need_col(s, t, jp, s->groups[g].by_value, &group_cols[g], err))) goto fail;
        } else if ((st = compile_cond(s, t, s->groups[g].where, &group_rc[g], err))) {
            goto fail;
        }
    }

    ds = dataset_alloc(n, s->num_cats, s->num_numerics);
    ds->name = pool_strdup(&ds->strings, s->name);
    ds->spec_file = pool_strdup(&ds->strings, s->file);
    ds->source = pool_strdup(&ds->strings, levi_table_source(t));
    ds->label_name = pool_strdup(&ds->strings, s->label_column);
    ds->task = s->task;
    for (int64_t i = 0; i < n; i++) ds->source_rows[i] = i;

    /* 2. ID / OOD / excluded. */
    int64_t nid = 0;
    for (int64_t i = 0; i < n; i++) {
        int is_id = 1, is_ood = 0;
        if (s->id_cond && (st = eval_cond(t, &id_rc, i, &is_id, err))) goto fail;
        if (!is_id) {
            is_ood = 1;
            if (s->ood_cond && (st = eval_cond(t, &ood_rc, i, &is_ood, err))) goto fail;
        }
        ds->tags[i] = is_id ? LEVI_SPLIT_TRAIN : is_ood ? LEVI_SPLIT_OOD : LEVI_SPLIT_EXCLUDED;
        nid += is_id;
    }

    /* 3. Seeded shuffle of the ID rows, cut into train / val / test. */
    {
        int64_t *idr = xcalloc((size_t)nid, sizeof *idr), k = 0;
        for (int64_t i = 0; i < n; i++)
            if (ds->tags[i] == LEVI_SPLIT_TRAIN) idr[k++] = i;
        levi_rng rng;
        levi_rng_seed(&rng, s->seed);
        levi_rng_shuffle_i64(&rng, idr, nid);
        int64_t ntrain = (int64_t)floor(s->train * (double)nid + 0.5);
        int64_t nval = (int64_t)floor(s->val * (double)nid + 0.5);
        if (ntrain > nid) ntrain = nid;
        if (nval > nid - ntrain) nval = nid - ntrain;
        if (s->test == 0) nval = nid - ntrain; /* rounding never leaves a stray test row */
        for (k = 0; k < nid; k++)
            ds->tags[idr[k]] = k < ntrain          ? LEVI_SPLIT_TRAIN
                               : k < ntrain + nval ? LEVI_SPLIT_VAL
                                                   : LEVI_SPLIT_TEST;
        free(idr);
    }
    build_split_rows(ds);

    /* 4. Labels, vocabularies (ID-train only), numeric inputs, texts. */
    if ((st = build_labels(ds, s, t, label_col, err))) goto fail;
    for (int c = 0; c < s->num_cats; c++) {
        build_vocab(ds, c, s->cats[c].column, levi_table_column(t, cat_cols[c]));
        ds->cats[c].mask_prob = (float)s->cats[c].mask_prob;
        ds->cats[c].mask_leader = c;
    }
    for (int c = 0; c < s->num_cats; c++) {
        if (!s->cats[c].group_with) continue;
        for (int l = 0; l < s->num_cats; l++)
            if (strcmp(s->cats[l].column, s->cats[c].group_with) == 0) {
                ds->cats[c].mask_leader = l;
                ds->cats[c].mask_prob = ds->cats[l].mask_prob;
            }
    }
    for (int j = 0; j < s->num_numerics; j++) {
        ds->nums[j].name = pool_strdup(&ds->strings, s->numerics[j]);
        ds->num_raw[j] = xcalloc((size_t)n, sizeof(double));
        ds->num_vals[j] = xcalloc((size_t)n, sizeof(float));
        for (int64_t i = 0; i < n; i++) {
            if (ds->tags[i] == LEVI_SPLIT_EXCLUDED) {
                ds->num_raw[j][i] = NAN;
                continue;
            }
            const char *v = levi_table_cell(t, i, num_cols[j]);
            if (!levi__parse_double(v, &ds->num_raw[j][i])) {
                char q[64];
                st = levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: %s: expected a number, found %s",
                                 levi_table_row_source(t, i), (long long)levi_table_line(t, i),
                                 s->numerics[j], levi__quote(v, q, sizeof q));
                goto fail;
            }
        }
        standardise(ds, j);
    }
    if ((st = build_text(ds, s, t, tpl_cols, err))) goto fail;

    /* 5. OOD groups. */
    for (int g = 0; g < s->num_groups; g++) {
        const levi__spec_group *sg = &s->groups[g];
        int first_new = ds->ngroups;
        if (sg->by_value) {
            build_value_groups(ds, sg, t, group_cols[g]);
        } else {
            int64_t nood = ds->split_count[LEVI_SPLIT_OOD], m = 0;
            int64_t *rows = xcalloc((size_t)nood, sizeof *rows);
            for (int64_t k = 0; k < nood; k++) {
                int64_t row = ds->split_rows[LEVI_SPLIT_OOD][k];
                int in;
                if ((st = eval_cond(t, &group_rc[g], row, &in, err))) {
                    free(rows);
                    goto fail;
                }
                if (in) rows[m++] = row;
            }
            add_group(ds, sg->name, rows, m);
        }
        for (int a = first_new; a < ds->ngroups; a++)
            for (int b = 0; b < a; b++)
                if (strcmp(ds->group_names[a], ds->group_names[b]) == 0) {
                    char q[64];
                    st = levi_errorf(err, LEVI_ERR_FORMAT,
                                     "%s: %s: expected distinct OOD group names, found %s twice",
                                     s->file, sg->jpath,
                                     levi__quote(ds->group_names[a], q, sizeof q));
                    goto fail;
                }
    }

    /* 6. The spec's expected counts travel with the dataset for the summary. */
    if (s->has_expect) {
        ds->has_expect = 1;
        ds->expect_id = s->expect_id;
        ds->expect_ood = s->expect_ood;
        ds->nexpect = s->num_expect_groups;
        if (ds->nexpect > 0) {
            ds->expect_names = xcalloc((size_t)ds->nexpect, sizeof *ds->expect_names);
            ds->expect_counts = xcalloc((size_t)ds->nexpect, sizeof *ds->expect_counts);
            for (int k = 0; k < ds->nexpect; k++) {
                ds->expect_names[k] = pool_strdup(&ds->strings, s->expect_group_names[k]);
                ds->expect_counts[k] = s->expect_group_counts[k];
            }
        }
    }
    *out = ds;
    ds = NULL;
fail:
    levi_dataset_free(ds);
    free(cat_cols);
    free(num_cols);
    free(tpl_cols);
    free(group_cols);
    if (s->id_cond) rcond_free_kids(&id_rc);
    if (s->ood_cond) rcond_free_kids(&ood_rc);
    for (int g = 0; g < s->num_groups; g++)
        if (group_rc[g].c) rcond_free_kids(&group_rc[g]);
    free(group_rc);
    return st;
}

levi_status levi_dataset_load(const levi_spec *spec, levi_dataset **out, levi_error *err) {
    levi_table *t = NULL;
    *out = NULL;
    levi_status st = levi_spec_read_table(spec, &t, err);
    if (st) return st;
    st = levi_dataset_init(spec, t, out, err);
    levi_table_free(t);
    return st;
}

/* ---- accessors --------------------------------------------------------------------------------
 */

const char *levi_split_name(levi_split s) {
    static const char *const names[] = {"train", "val", "test", "ood", "excluded"};
    LEVI_ASSERT((int)s >= 0 && s < LEVI_SPLIT_COUNT, "split out of range");
    return names[s];
}

int64_t levi_dataset_num_rows(const levi_dataset *ds) {
    return ds->n;
}
const char *levi_dataset_name(const levi_dataset *ds) {
    return ds->name;
}
levi_task levi_dataset_task(const levi_dataset *ds) {
    return ds->task;
}
const char *levi_dataset_label_name(const levi_dataset *ds) {
    return ds->label_name;
}
const float *levi_dataset_labels(const levi_dataset *ds) {
    return ds->labels;
}
const int32_t *levi_dataset_classes(const levi_dataset *ds) {
    return ds->classes;
}
int levi_dataset_num_classes(const levi_dataset *ds) {
    return ds->nclasses;
}

const char *levi_dataset_class_name(const levi_dataset *ds, int k) {
    LEVI_ASSERT(k >= 0 && k < ds->nclasses, "class index out of range");
    return ds->class_names[k];
}

int levi_dataset_num_categorical(const levi_dataset *ds) {
    return ds->ncat;
}

const levi_categorical *levi_dataset_categorical(const levi_dataset *ds, int c) {
    LEVI_ASSERT(c >= 0 && c < ds->ncat, "categorical index out of range");
    return &ds->cats[c];
}

int levi_dataset_find_categorical(const levi_dataset *ds, const char *name) {
    for (int c = 0; c < ds->ncat; c++)
        if (strcmp(ds->cats[c].name, name) == 0) return c;
    return -1;
}

int levi_dataset_num_numeric(const levi_dataset *ds) {
    return ds->nnum;
}

const levi_numeric *levi_dataset_numeric(const levi_dataset *ds, int j) {
    LEVI_ASSERT(j >= 0 && j < ds->nnum, "numeric index out of range");
    return &ds->nums[j];
}

const char *levi_dataset_text(const levi_dataset *ds, int64_t row) {
    LEVI_ASSERT(row >= 0 && row < ds->n, "row out of range");
    return ds->text_buf + ds->text_off[row];
}

int levi_dataset_has_text(const levi_dataset *ds) {
    return ds->has_text;
}
const uint8_t *levi_dataset_split_tags(const levi_dataset *ds) {
    return ds->tags;
}

const int64_t *levi_dataset_split_rows(const levi_dataset *ds, levi_split s, int64_t *count) {
    LEVI_ASSERT((int)s >= 0 && s < LEVI_SPLIT_COUNT, "split out of range");
    if (count) *count = ds->split_count[s];
    return ds->split_rows[s];
}

const int64_t *levi_dataset_source_rows(const levi_dataset *ds) {
    return ds->source_rows;
}
int levi_dataset_num_groups(const levi_dataset *ds) {
    return ds->ngroups;
}

const char *levi_dataset_group_name(const levi_dataset *ds, int g) {
    LEVI_ASSERT(g >= 0 && g < ds->ngroups, "group index out of range");
    return ds->group_names[g];
}

const int64_t *levi_dataset_group_rows(const levi_dataset *ds, int g, int64_t *count) {
    LEVI_ASSERT(g >= 0 && g < ds->ngroups, "group index out of range");
    if (count) *count = ds->group_count[g];
    return ds->group_rows[g];
}

void levi_dataset_gather_categorical(const levi_dataset *ds, const int64_t *rows, int64_t n,
                                     levi_rng *mask_rng, int32_t *out) {
    int nc = ds->ncat;
    for (int64_t i = 0; i < n; i++) {
        int64_t r = rows[i];
        LEVI_ASSERT(r >= 0 && r < ds->n, "row out of range");
        int32_t *o = out + i * nc;
        for (int c = 0; c < nc; c++) o[c] = ds->cat_ids[c][r];
        if (!mask_rng) continue;
        for (int l = 0; l < nc; l++) {
            if (ds->cats[l].mask_leader != l || !(ds->cats[l].mask_prob > 0)) continue;
            if (levi_rng_uniform(mask_rng) >= ds->cats[l].mask_prob) continue;
            for (int c = 0; c < nc; c++)
                if (ds->cats[c].mask_leader == l) o[c] = 0;
        }
    }
}

void levi_dataset_gather_numeric(const levi_dataset *ds, const int64_t *rows, int64_t n,
                                 float *out) {
    int nn = ds->nnum;
    for (int64_t i = 0; i < n; i++) {
        int64_t r = rows[i];
        LEVI_ASSERT(r >= 0 && r < ds->n, "row out of range");
        for (int j = 0; j < nn; j++) out[i * nn + j] = ds->num_vals[j][r];
    }
}

/* ---- summary, self-check, checksum ------------------------------------------------------------
 */

levi_status levi_dataset_check_expected(const levi_dataset *ds, levi_error *err) {
    if (!ds->has_expect) return LEVI_OK;
    char msg[LEVI_ERROR_MSG_MAX];
    size_t w = 0;
    int bad = 0;
#define MISMATCH(...)                                                                              \
    do {                                                                                           \
        bad++;                                                                                     \
        if (w < sizeof msg) w += (size_t)snprintf(msg + w, sizeof msg - w, __VA_ARGS__);           \
    } while (0)
    int64_t nid = ds->split_count[LEVI_SPLIT_TRAIN] + ds->split_count[LEVI_SPLIT_VAL] +
                  ds->split_count[LEVI_SPLIT_TEST];
    if (ds->expect_id >= 0 && ds->expect_id != nid)
        MISMATCH("; ID rows: expected %lld, found %lld", (long long)ds->expect_id, (long long)nid);
    if (ds->expect_ood >= 0 && ds->expect_ood != ds->split_count[LEVI_SPLIT_OOD])
        MISMATCH("; OOD rows: expected %lld, found %lld", (long long)ds->expect_ood,
                 (long long)ds->split_count[LEVI_SPLIT_OOD]);
    if (ds->nexpect >= 0) {
        for (int k = 0; k < ds->nexpect; k++) {
            int found = -1;
            for (int g = 0; g < ds->ngroups; g++)
                if (strcmp(ds->group_names[g], ds->expect_names[k]) == 0) found = g;
            if (found < 0)
                MISMATCH("; group \"%s\": expected %lld rows, found no such group",
                         ds->expect_names[k], (long long)ds->expect_counts[k]);
            else if (ds->group_count[found] != ds->expect_counts[k])
                MISMATCH("; group \"%s\": expected %lld rows, found %lld", ds->expect_names[k],
                         (long long)ds->expect_counts[k], (long long)ds->group_count[found]);
        }
        for (int g = 0; g < ds->ngroups; g++) {
            int listed = 0;
            for (int k = 0; k < ds->nexpect; k++)
                if (strcmp(ds->group_names[g], ds->expect_names[k]) == 0) listed = 1;
            if (!listed)
                MISMATCH("; group \"%s\" (%lld rows): expected no such group", ds->group_names[g],
                         (long long)ds->group_count[g]);
        }
    }
#undef MISMATCH
    if (!bad) return LEVI_OK;
    return levi_errorf(err, LEVI_ERR_FORMAT, "%s: expect: %d mismatch%s with the data%s",
                       ds->spec_file, bad, bad > 1 ? "es" : "", msg);
}

void levi_dataset_summary(const levi_dataset *ds, FILE *f) {
    const int64_t *cnt = ds->split_count;
    int64_t nid = cnt[LEVI_SPLIT_TRAIN] + cnt[LEVI_SPLIT_VAL] + cnt[LEVI_SPLIT_TEST];
    fprintf(f, "dataset %s: %s (spec %s)\n", ds->name, ds->source, ds->spec_file);
    if (ds->subsampled_from)
        fprintf(f, "  subsample of %lld rows\n", (long long)ds->subsampled_from);
    fprintf(f,
            "  rows %lld: ID %lld (train %lld, val %lld, test %lld) / OOD %lld / excluded %lld\n",
            (long long)ds->n, (long long)nid, (long long)cnt[LEVI_SPLIT_TRAIN],
            (long long)cnt[LEVI_SPLIT_VAL], (long long)cnt[LEVI_SPLIT_TEST],
            (long long)cnt[LEVI_SPLIT_OOD], (long long)cnt[LEVI_SPLIT_EXCLUDED]);
    const int64_t *tr = ds->split_rows[LEVI_SPLIT_TRAIN];
    if (ds->task == LEVI_TASK_REGRESSION) {
        double sum = 0, sq = 0;
        for (int64_t k = 0; k < cnt[LEVI_SPLIT_TRAIN]; k++) sum += ds->labels[tr[k]];
        double mean = cnt[LEVI_SPLIT_TRAIN] ? sum / (double)cnt[LEVI_SPLIT_TRAIN] : 0;
        for (int64_t k = 0; k < cnt[LEVI_SPLIT_TRAIN]; k++)
            sq += (ds->labels[tr[k]] - mean) * (ds->labels[tr[k]] - mean);
        double sd = cnt[LEVI_SPLIT_TRAIN] ? sqrt(sq / (double)cnt[LEVI_SPLIT_TRAIN]) : 0;
        fprintf(f, "  label %s: regression, ID-train mean %.4f std %.4f\n", ds->label_name, mean,
                sd);
    } else {
        fprintf(f, "  label %s: classification, %d classes (ID-train counts:", ds->label_name,
                ds->nclasses);
        for (int k = 0; k < ds->nclasses; k++) {
            int64_t m = 0;
            for (int64_t j = 0; j < cnt[LEVI_SPLIT_TRAIN]; j++) m += ds->classes[tr[j]] == k;
            fprintf(f, " %s %lld", ds->class_names[k], (long long)m);
        }
        fprintf(f, ")\n");
    }
    if (ds->ncat) {
        fprintf(f, "  categorical (cardinality incl. unknown id 0):");
        for (int c = 0; c < ds->ncat; c++) {
            const levi_categorical *k = &ds->cats[c];
            fprintf(f, " %s %d", k->name, (int)k->cardinality);
            if (k->mask_leader != c)
                fprintf(f, " [masked with %s]", ds->cats[k->mask_leader].name);
            else if (k->mask_prob > 0)
                fprintf(f, " [mask %.2f]", (double)k->mask_prob);
        }
        fprintf(f, "\n");
    }
    for (int j = 0; j < ds->nnum; j++)
        fprintf(f, "  numeric %s: ID-train mean %.4g std %.4g\n", ds->nums[j].name,
                ds->nums[j].mean, ds->nums[j].std);
    if (ds->has_text && ds->n) fprintf(f, "  text[0]: %s\n", levi_dataset_text(ds, 0));
    fprintf(f, "  OOD groups: %d\n", ds->ngroups);
    for (int g = 0; g < ds->ngroups; g++)
        fprintf(f, "    %-20s %lld\n", ds->group_names[g], (long long)ds->group_count[g]);
    if (ds->has_expect) {
        levi_error e;
        if (levi_dataset_check_expected(ds, &e) == LEVI_OK)
            fprintf(f, "  self-check: counts match the spec's expect block\n");
        else
            fprintf(f, "  self-check FAILED: %s\n", e.msg);
    }
}

void levi_dataset_checksum(const levi_dataset *ds, char out_hex[65]) {
    static const char magic[] = "levi-dataset-checksum-v1";
    size_t text_bytes = (size_t)ds->text_off[ds->n];
    size_t total = sizeof magic + 8 + text_bytes + (size_t)ds->n * (ds->has_text ? 5 : 6);
    unsigned char *buf = levi_xmalloc(total);
    size_t w = 0;
    memcpy(buf, magic, sizeof magic);
    w += sizeof magic;
    uint64_t n = (uint64_t)ds->n;
    for (int b = 0; b < 8; b++) buf[w++] = (unsigned char)(n >> (8 * b));
    for (int64_t i = 0; i < ds->n; i++) {
        const char *t = levi_dataset_text(ds, i);
        size_t len = strlen(t) + 1; /* with its NUL, so "ab"+"c" != "a"+"bc" */
        memcpy(buf + w, t, len);
        w += len;
        uint32_t bits;
        float label = ds->labels[i];
        memcpy(&bits, &label, 4);
        for (int b = 0; b < 4; b++) buf[w++] = (unsigned char)(bits >> (8 * b));
        buf[w++] = ds->tags[i];
    }
    LEVI_ASSERT(w <= total, "checksum buffer sized wrongly");
    levi_sha256_hex(buf, w, out_hex);
    levi_free(buf);
}

/* ---- subsampling ---------------------------------------------------------------------------- */

levi_status levi_dataset_subsample(const levi_dataset *ds, double fraction, int64_t max_rows,
                                   uint64_t seed, levi_dataset **out, levi_error *err) {
    *out = NULL;
    if (!(fraction > 0 && fraction <= 1))
        return levi_errorf(err, LEVI_ERR_ARG, "subsample: expected a fraction in (0,1], found %g",
                           fraction);
    if (max_rows < 0)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "subsample: expected max_rows >= 0 (0: no cap), found %lld",
                           (long long)max_rows);
    const int64_t *cnt = ds->split_count;
    int64_t kept = ds->n - cnt[LEVI_SPLIT_EXCLUDED];
    int64_t target = (int64_t)floor(fraction * (double)kept + 0.5);
    if (max_rows > 0 && target > max_rows) target = max_rows;
    if (target < 1) target = 1;
    uint8_t *sel = xcalloc((size_t)ds->n, 1);
    levi_rng rng;
    levi_rng_seed(&rng, seed);
    for (int s = 0; s < LEVI_SPLIT_EXCLUDED; s++) {
        if (!cnt[s]) continue;
        int64_t take = (int64_t)floor((double)cnt[s] * (double)target / (double)kept + 0.5);
        if (take < 1) take = 1;
        if (take > cnt[s]) take = cnt[s];
        int64_t *rows = xcalloc((size_t)cnt[s], sizeof *rows);
        memcpy(rows, ds->split_rows[s], (size_t)cnt[s] * sizeof *rows);
        levi_rng_shuffle_i64(&rng, rows, cnt[s]);
        for (int64_t k = 0; k < take; k++) sel[rows[k]] = 1;
        free(rows);
    }
    int64_t m = 0;
    int64_t *new_of = xcalloc((size_t)ds->n, sizeof *new_of);
    for (int64_t i = 0; i < ds->n; i++) new_of[i] = sel[i] ? m++ : -1;

    levi_dataset *d = dataset_alloc(m, ds->ncat, ds->nnum);
    d->name = pool_strdup(&d->strings, ds->name);
    d->spec_file = pool_strdup(&d->strings, ds->spec_file);
    d->source = pool_strdup(&d->strings, ds->source);
    d->label_name = pool_strdup(&d->strings, ds->label_name);
    d->task = ds->task;
    d->subsampled_from = ds->subsampled_from ? ds->subsampled_from : ds->n;
    d->has_text = ds->has_text;
    size_t text_bytes = 0;
    for (int64_t i = 0; i < ds->n; i++)
        if (sel[i]) text_bytes += strlen(levi_dataset_text(ds, i)) + 1;
    d->text_buf = levi_xmalloc(text_bytes ? text_bytes : 1);
    size_t w = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        if (!sel[i]) continue;
        int64_t j = new_of[i];
        d->labels[j] = ds->labels[i];
        d->tags[j] = ds->tags[i];
        d->source_rows[j] = ds->source_rows[i];
        const char *t = levi_dataset_text(ds, i);
        size_t len = strlen(t) + 1;
        d->text_off[j] = (int64_t)w;
        memcpy(d->text_buf + w, t, len);
        w += len;
    }
    d->text_off[m] = (int64_t)w;
    if (ds->classes) {
        d->nclasses = ds->nclasses;
        d->class_names = xcalloc((size_t)ds->nclasses, sizeof *d->class_names);
        for (int k = 0; k < ds->nclasses; k++)
            d->class_names[k] = pool_strdup(&d->strings, ds->class_names[k]);
        d->classes = xcalloc((size_t)m, sizeof *d->classes);
        for (int64_t i = 0; i < ds->n; i++)
            if (sel[i]) d->classes[new_of[i]] = ds->classes[i];
    }
    build_split_rows(d);

    /* Vocabularies shrink to the values the kept train rows still see; the old vocabulary is
     * sorted, so keeping its order keeps the new one sorted too. */
    for (int c = 0; c < ds->ncat; c++) {
        const levi_categorical *oc = &ds->cats[c];
        int32_t *remap = xcalloc((size_t)oc->cardinality, sizeof *remap);
        for (int64_t i = 0; i < ds->n; i++)
            if (sel[i] && ds->tags[i] == LEVI_SPLIT_TRAIN && ds->cat_ids[c][i] > 0)
                remap[ds->cat_ids[c][i]] = 1;
        int32_t nv = 1;
        for (int32_t v = 1; v < oc->cardinality; v++) remap[v] = remap[v] ? nv++ : 0;
        const char **vocab = xcalloc((size_t)nv, sizeof *vocab);
        vocab[0] = "<unk>";
        for (int32_t v = 1; v < oc->cardinality; v++)
            if (remap[v]) vocab[remap[v]] = pool_strdup(&d->strings, oc->vocab[v]);
        int32_t *ids = xcalloc((size_t)m, sizeof *ids);
        for (int64_t i = 0; i < ds->n; i++)
            if (sel[i]) ids[new_of[i]] = remap[ds->cat_ids[c][i]];
        free(remap);
        d->cat_ids[c] = ids;
        d->cat_vocab[c] = vocab;
        d->cats[c] = *oc;
        d->cats[c].name = pool_strdup(&d->strings, oc->name);
        d->cats[c].ids = ids;
        d->cats[c].vocab = vocab;
        d->cats[c].cardinality = nv;
    }
    for (int j = 0; j < ds->nnum; j++) {
        d->nums[j].name = pool_strdup(&d->strings, ds->nums[j].name);
        d->num_raw[j] = xcalloc((size_t)m, sizeof(double));
        d->num_vals[j] = xcalloc((size_t)m, sizeof(float));
        for (int64_t i = 0; i < ds->n; i++)
            if (sel[i]) d->num_raw[j][new_of[i]] = ds->num_raw[j][i];
        standardise(d, j);
    }
    for (int g = 0; g < ds->ngroups; g++) {
        int64_t *rows = xcalloc((size_t)ds->group_count[g], sizeof *rows), k = 0;
        for (int64_t r = 0; r < ds->group_count[g]; r++)
            if (sel[ds->group_rows[g][r]]) rows[k++] = new_of[ds->group_rows[g][r]];
        add_group(d, ds->group_names[g], rows, k);
    }
    free(sel);
    free(new_of);
    *out = d;
    return LEVI_OK;
}
