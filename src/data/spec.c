/* The dataset spec: parses and validates the JSON file that describes a dataset (its source,
 * label, inputs, text template, shift and split; see levi/data.h for the format), resolves the
 * source path and reads the table it names.
 *
 * Validation here is everything that can be checked without the data: unknown keys, types,
 * ranges, references between entries (group_with), the template's syntax. Whether the named
 * columns exist is checked by levi_dataset_init, which has the table. Every message names the
 * spec file and the JSON path of the offending value.
 *
 * Not for: reading rows or computing anything over them (dataset.c). */
#define _XOPEN_SOURCE 700 /* strptime */
#include "data_internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define SPEC_PATH_MAX 4096

typedef struct ctx {
    const char *file;
    levi_error *err;
} ctx;

static char *xstrdup(const char *s) {
    char *d = strdup(s);
    LEVI_ASSERT(d, "out of memory");
    return d;
}

/* A short description of a JSON value for "found ..." in messages. */
static const char *describe(const cJSON *v, char *buf, size_t cap) {
    if (!v) return "nothing";
    if (cJSON_IsObject(v)) return "an object";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsBool(v)) return cJSON_IsTrue(v) ? "true" : "false";
    if (cJSON_IsNull(v)) return "null";
    char *s = cJSON_PrintUnformatted(v);
    if (!s) return "a value";
    if (strlen(s) > 60)
        snprintf(buf, cap, "%.56s...", s);
    else
        snprintf(buf, cap, "%s", s);
    cJSON_free(s);
    return buf;
}

static levi_status bad(ctx *c, const char *jpath, const char *expected, const cJSON *found) {
    char buf[96];
    return levi_errorf(c->err, LEVI_ERR_FORMAT, "%s: %s: expected %s, found %s", c->file, jpath,
                       expected, describe(found, buf, sizeof buf));
}

/* snprintf through a va_list: JSON paths and reasons may be cut to their buffers, which is
 * fine for messages (and keeps -Wformat-truncation quiet without sizing every buffer for the
 * worst case). */
static void fmt(char *out, size_t cap, const char *f, ...) __attribute__((format(printf, 3, 4)));
static void fmt(char *out, size_t cap, const char *f, ...) {
    va_list ap;
    va_start(ap, f);
    vsnprintf(out, cap, f, ap);
    va_end(ap);
}

static void sub_path(char *out, size_t cap, const char *jpath, const char *key) {
    if (jpath[0])
        fmt(out, cap, "%s.%s", jpath, key);
    else
        fmt(out, cap, "%s", key);
}

static void index_path(char *out, size_t cap, const char *jpath, int i) {
    fmt(out, cap, "%s[%d]", jpath, i);
}

static levi_status check_keys(ctx *c, const cJSON *obj, const char *jpath,
                              const char *const *allowed) {
    const cJSON *it;
    cJSON_ArrayForEach(it, obj) {
        int ok = 0;
        for (const char *const *a = allowed; *a; a++)
            if (strcmp(it->string, *a) == 0) ok = 1;
        if (!ok) {
            char list[256] = "", p[256];
            size_t w = 0;
            for (const char *const *a = allowed; *a && w < sizeof list; a++)
                w += (size_t)snprintf(list + w, sizeof list - w, "%s%s", w ? ", " : "", *a);
            sub_path(p, sizeof p, jpath, it->string);
            return levi_errorf(c->err, LEVI_ERR_FORMAT, "%s: %s: unknown key (expected one of: %s)",
                               c->file, p, list);
        }
    }
    return LEVI_OK;
}

static levi_status need_object(ctx *c, const cJSON *v, const char *jpath) {
    return cJSON_IsObject(v) ? LEVI_OK : bad(c, jpath, "an object", v);
}

/* Optional or required string member; *out is a copy or left NULL. */
static levi_status get_string(ctx *c, const cJSON *obj, const char *key, const char *jpath,
                              int required, char **out) {
    char p[256];
    sub_path(p, sizeof p, jpath, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) return required ? bad(c, p, "a string", NULL) : LEVI_OK;
    if (!cJSON_IsString(v)) return bad(c, p, "a string", v);
    if (required && !v->valuestring[0]) return bad(c, p, "a non-empty string", v);
    *out = xstrdup(v->valuestring);
    return LEVI_OK;
}

static levi_status get_bool(ctx *c, const cJSON *obj, const char *key, const char *jpath,
                            int *out) {
    char p[256];
    sub_path(p, sizeof p, jpath, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) return LEVI_OK;
    if (!cJSON_IsBool(v)) return bad(c, p, "true or false", v);
    *out = cJSON_IsTrue(v) ? 1 : 0;
    return LEVI_OK;
}

/* A number in [lo, hi] (hi_open: [lo, hi)). */
static levi_status get_number(ctx *c, const cJSON *obj, const char *key, const char *jpath,
                              double lo, double hi, int hi_open, int *present, double *out) {
    char p[256], expected[96];
    sub_path(p, sizeof p, jpath, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (present) *present = v != NULL;
    if (!v) return LEVI_OK;
    snprintf(expected, sizeof expected, "a number in [%g,%g%s", lo, hi, hi_open ? ")" : "]");
    if (!cJSON_IsNumber(v)) return bad(c, p, expected, v);
    double x = v->valuedouble;
    if (!(x >= lo && (hi_open ? x < hi : x <= hi))) return bad(c, p, expected, v);
    *out = x;
    return LEVI_OK;
}

static levi_status get_count(ctx *c, const cJSON *obj, const char *key, const char *jpath,
                             int *present, int64_t *out) {
    char p[256];
    sub_path(p, sizeof p, jpath, key);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (present) *present = v != NULL;
    if (!v) return LEVI_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9007199254740992.0 ||
        v->valuedouble != floor(v->valuedouble))
        return bad(c, p, "a non-negative integer", v);
    *out = (int64_t)v->valuedouble;
    return LEVI_OK;
}

/* A non-empty array of non-empty strings. */
static levi_status get_string_list(ctx *c, const cJSON *v, const char *jpath, char ***out,
                                   int *count) {
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0)
        return bad(c, jpath, "a non-empty array of strings", v);
    int n = cJSON_GetArraySize(v);
    char **list = calloc((size_t)n, sizeof *list);
    LEVI_ASSERT(list, "out of memory");
    *out = list;
    *count = 0;
    const cJSON *e;
    int i = 0;
    cJSON_ArrayForEach(e, v) {
        char p[256];
        index_path(p, sizeof p, jpath, i);
        if (!cJSON_IsString(e)) return bad(c, p, "a string", e);
        list[i++] = xstrdup(e->valuestring);
        *count = i;
    }
    return LEVI_OK;
}

static void free_list(char **list, int n) {
    if (!list) return;
    for (int i = 0; i < n; i++) free(list[i]);
    free(list);
}

/* ---- dates ------------------------------------------------------------------------------- */

/* Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar. */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

int levi__parse_date(const char *s, const char *format, int64_t *out) {
    if (strcmp(format, "unix") == 0) {
        double v;
        if (!levi__parse_double(s, &v) || fabs(v) > 1e17) return 0;
        *out = (int64_t)floor(v);
        return 1;
    }
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    tm.tm_mday = 1;
    const char *end = strptime(s, format, &tm);
    if (!end || *end) return 0;
    *out = days_from_civil(tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday) * 86400 +
           tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec;
    return 1;
}

/* Cut points are written in ISO form whatever the data's format is. */
static int parse_iso_cut(const char *s, int64_t *out) {
    return levi__parse_date(s, "%Y-%m-%d", out) || levi__parse_date(s, "%Y-%m-%dT%H:%M:%S", out) ||
           levi__parse_date(s, "%Y-%m-%d %H:%M:%S", out);
}

/* ---- conditions -------------------------------------------------------------------------- */

static void cond_free_fields(levi__cond *k) {
    if (!k) return;
    free(k->jpath);
    free(k->column);
    free(k->multi_sep);
    free_list(k->values, k->num_values);
    free(k->date_format);
    for (int i = 0; i < k->num_kids; i++) cond_free_fields(&k->kids[i]);
    free(k->kids);
}

static void cond_free(levi__cond *k) {
    cond_free_fields(k);
    free(k);
}

static levi_status parse_cond(ctx *c, const cJSON *v, const char *jpath, levi__cond *out) {
    memset(out, 0, sizeof *out);
    out->jpath = xstrdup(jpath);
    levi_status st = need_object(c, v, jpath);
    if (st) return st;
    const char *combinators[] = {"all", "any", "not"};
    for (int k = 0; k < 3; k++) {
        const cJSON *arg = cJSON_GetObjectItemCaseSensitive(v, combinators[k]);
        if (!arg) continue;
        if (cJSON_GetArraySize(v) != 1) {
            char p[256];
            sub_path(p, sizeof p, jpath, combinators[k]);
            return levi_errorf(c->err, LEVI_ERR_FORMAT,
                               "%s: %s: expected \"%s\" alone in its object, found other keys "
                               "beside it",
                               c->file, jpath, combinators[k]);
        }
        char p[256];
        sub_path(p, sizeof p, jpath, combinators[k]);
        if (k == 2) {
            out->kind = LEVI__COND_NOT;
            out->kids = calloc(1, sizeof *out->kids);
            LEVI_ASSERT(out->kids, "out of memory");
            out->num_kids = 1;
            return parse_cond(c, arg, p, &out->kids[0]);
        }
        out->kind = k == 0 ? LEVI__COND_ALL : LEVI__COND_ANY;
        if (!cJSON_IsArray(arg) || cJSON_GetArraySize(arg) == 0)
            return bad(c, p, "a non-empty array of conditions", arg);
        int n = cJSON_GetArraySize(arg);
        out->kids = calloc((size_t)n, sizeof *out->kids);
        LEVI_ASSERT(out->kids, "out of memory");
        const cJSON *e;
        int i = 0;
        cJSON_ArrayForEach(e, arg) {
            char q[256];
            index_path(q, sizeof q, p, i);
            out->num_kids = i + 1;
            if ((st = parse_cond(c, e, q, &out->kids[i]))) return st;
            i++;
        }
        return LEVI_OK;
    }
    static const char *const keys[] = {"column",      "multi_sep", "any_of",      "none_of",
                                       "date_format", "before",    "on_or_after", NULL};
    if ((st = check_keys(c, v, jpath, keys))) return st;
    if ((st = get_string(c, v, "column", jpath, 1, &out->column))) return st;
    if ((st = get_string(c, v, "multi_sep", jpath, 0, &out->multi_sep))) return st;
    if (out->multi_sep && !out->multi_sep[0]) {
        char p[256];
        sub_path(p, sizeof p, jpath, "multi_sep");
        return bad(c, p, "a non-empty separator", cJSON_GetObjectItemCaseSensitive(v, "multi_sep"));
    }
    const cJSON *any = cJSON_GetObjectItemCaseSensitive(v, "any_of");
    const cJSON *none = cJSON_GetObjectItemCaseSensitive(v, "none_of");
    const cJSON *before = cJSON_GetObjectItemCaseSensitive(v, "before");
    const cJSON *after = cJSON_GetObjectItemCaseSensitive(v, "on_or_after");
    int kinds = (any != NULL) + (none != NULL) + (before || after);
    if (kinds != 1)
        return levi_errorf(c->err, LEVI_ERR_FORMAT,
                           "%s: %s: expected exactly one test (\"any_of\", \"none_of\", or "
                           "\"before\"/\"on_or_after\" with \"date_format\"), found %d",
                           c->file, jpath, kinds);
    char p[256];
    if (any || none) {
        out->kind = any ? LEVI__COND_ANY_OF : LEVI__COND_NONE_OF;
        sub_path(p, sizeof p, jpath, any ? "any_of" : "none_of");
        if (cJSON_HasObjectItem(v, "date_format")) {
            sub_path(p, sizeof p, jpath, "date_format");
            return levi_errorf(c->err, LEVI_ERR_FORMAT,
                               "%s: %s: unknown key here (date_format goes with before / "
                               "on_or_after)",
                               c->file, p);
        }
        return get_string_list(c, any ? any : none, p, &out->values, &out->num_values);
    }
    out->kind = LEVI__COND_DATE;
    if ((st = get_string(c, v, "date_format", jpath, 0, &out->date_format))) return st;
    if (!out->date_format) out->date_format = xstrdup("%Y-%m-%d");
    if (out->multi_sep) {
        sub_path(p, sizeof p, jpath, "multi_sep");
        return levi_errorf(c->err, LEVI_ERR_FORMAT,
                           "%s: %s: unknown key here (a date test reads one value per cell)",
                           c->file, p);
    }
    const cJSON *bounds[2] = {before, after};
    const char *names[2] = {"before", "on_or_after"};
    for (int b = 0; b < 2; b++) {
        if (!bounds[b]) continue;
        sub_path(p, sizeof p, jpath, names[b]);
        int64_t t;
        if (!cJSON_IsString(bounds[b]) || !parse_iso_cut(bounds[b]->valuestring, &t))
            return bad(c, p, "a date \"YYYY-MM-DD\" (or \"YYYY-MM-DDTHH:MM:SS\")", bounds[b]);
        if (b == 0) {
            out->has_before = 1;
            out->before = t;
        } else {
            out->has_on_or_after = 1;
            out->on_or_after = t;
        }
    }
    return LEVI_OK;
}

/* ---- template ------------------------------------------------------------------------------ */

static levi_status parse_template(ctx *c, levi_spec *s) {
    const char *t = s->text;
    size_t n = strlen(t);
    s->tpl = calloc(n + 1, sizeof *s->tpl); /* at most one piece per byte */
    LEVI_ASSERT(s->tpl, "out of memory");
    char *lit = malloc(n + 1);
    LEVI_ASSERT(lit, "out of memory");
    size_t w = 0, i = 0, lit_start = 0;
    levi_status st = LEVI_OK;
    while (i < n) {
        if (t[i] == '{' && i + 1 < n && t[i + 1] == '{') {
            lit[w++] = '{';
            i += 2;
        } else if (t[i] == '}' && i + 1 < n && t[i + 1] == '}') {
            lit[w++] = '}';
            i += 2;
        } else if (t[i] == '}') {
            st = levi_errorf(c->err, LEVI_ERR_FORMAT,
                             "%s: text: expected \"}}\" for a literal brace at offset %zu, found "
                             "a lone '}'",
                             c->file, i);
            break;
        } else if (t[i] == '{') {
            const char *close = strchr(t + i + 1, '}');
            const char *open = strchr(t + i + 1, '{');
            if (!close || (open && open < close)) {
                st = levi_errorf(c->err, LEVI_ERR_FORMAT,
                                 "%s: text: expected '}' closing the '{' at offset %zu, found %s",
                                 c->file, i, close ? "another '{'" : "the end of the template");
                break;
            }
            if (close == t + i + 1) {
                st = levi_errorf(c->err, LEVI_ERR_FORMAT,
                                 "%s: text: expected a column name inside the braces at offset "
                                 "%zu, found {}",
                                 c->file, i);
                break;
            }
            if (w) {
                levi__tpl_piece *pc = &s->tpl[s->num_tpl++];
                pc->literal = strndup(lit, w);
                LEVI_ASSERT(pc->literal, "out of memory");
                pc->offset = lit_start;
                w = 0;
            }
            levi__tpl_piece *pc = &s->tpl[s->num_tpl++];
            pc->column = strndup(t + i + 1, (size_t)(close - (t + i + 1)));
            LEVI_ASSERT(pc->column, "out of memory");
            pc->offset = i;
            i = (size_t)(close - t) + 1;
            lit_start = i;
        } else {
            lit[w++] = t[i++];
        }
    }
    if (!st && w) {
        levi__tpl_piece *pc = &s->tpl[s->num_tpl++];
        pc->literal = strndup(lit, w);
        LEVI_ASSERT(pc->literal, "out of memory");
        pc->offset = lit_start;
    }
    free(lit);
    return st;
}

/* ---- sections ------------------------------------------------------------------------------ */

static levi_status parse_source(ctx *c, const cJSON *v, levi_spec *s) {
    levi_status st = need_object(c, v, "source");
    if (st) return st;
    static const char *const keys[] = {"reader",  "path",   "encoding", "delimiter",
                                       "quoting", "header", "columns",  NULL};
    if ((st = check_keys(c, v, "source", keys))) return st;
    if ((st = get_string(c, v, "reader", "source", 1, &s->reader))) return st;
    const char *r = s->reader;
    int delimited = strcmp(r, "csv") == 0 || strcmp(r, "tsv") == 0;
    int fixed_encoding = strcmp(r, "movielens") == 0 || strcmp(r, "amazon") == 0;
    if (!delimited && strcmp(r, "jsonl") != 0 && !fixed_encoding)
        return bad(c, "source.reader", "\"csv\", \"tsv\", \"jsonl\", \"movielens\" or \"amazon\"",
                   cJSON_GetObjectItemCaseSensitive(v, "reader"));
    const cJSON *path = cJSON_GetObjectItemCaseSensitive(v, "path");
    if (cJSON_IsString(path) && path->valuestring[0]) {
        s->paths = calloc(1, sizeof *s->paths);
        LEVI_ASSERT(s->paths, "out of memory");
        s->paths[0] = xstrdup(path->valuestring);
        s->num_paths = 1;
    } else if (cJSON_IsArray(path)) {
        if ((st = get_string_list(c, path, "source.path", &s->paths, &s->num_paths))) return st;
    } else {
        return bad(c, "source.path", "a path string or an array of candidate paths", path);
    }
    /* Options that only make sense for some readers are rejected elsewhere, so a typo'd
     * expectation ("this TSV is Latin-1") is never silently ignored. */
    const char *only_delimited[] = {"delimiter", "quoting", "header", "columns"};
    for (int k = 0; k < 4; k++)
        if (!delimited && cJSON_HasObjectItem(v, only_delimited[k])) {
            char p[64];
            sub_path(p, sizeof p, "source", only_delimited[k]);
            return levi_errorf(c->err, LEVI_ERR_FORMAT,
                               "%s: %s: expected this only with reader \"csv\" or \"tsv\", found "
                               "it with reader \"%s\"",
                               c->file, p, r);
        }
    if (fixed_encoding && cJSON_HasObjectItem(v, "encoding"))
        return levi_errorf(c->err, LEVI_ERR_FORMAT,
                           "%s: source.encoding: expected no encoding with reader \"%s\" "
                           "(the reader handles its files' encodings), found one",
                           c->file, r);
    char *enc = NULL;
    if ((st = get_string(c, v, "encoding", "source", 0, &enc))) return st;
    s->encoding = LEVI_ENCODING_UTF8;
    if (enc) {
        if (strcmp(enc, "latin-1") == 0 || strcmp(enc, "latin1") == 0 ||
            strcmp(enc, "iso-8859-1") == 0)
            s->encoding = LEVI_ENCODING_LATIN1;
        else if (strcmp(enc, "utf-8") != 0 && strcmp(enc, "utf8") != 0) {
            free(enc);
            return bad(c, "source.encoding", "\"utf-8\" or \"latin-1\"",
                       cJSON_GetObjectItemCaseSensitive(v, "encoding"));
        }
        free(enc);
    }
    int is_tsv = strcmp(r, "tsv") == 0;
    s->delimiter = is_tsv ? '\t' : ',';
    s->quoting = is_tsv ? 0 : 1;
    s->header = 1;
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(v, "delimiter");
    if (d) {
        if (!cJSON_IsString(d) || strlen(d->valuestring) != 1 || d->valuestring[0] == '\n' ||
            d->valuestring[0] == '\r' || d->valuestring[0] == '"')
            return bad(c, "source.delimiter",
                       "a one-character string other than a quote or line end", d);
        s->delimiter = d->valuestring[0];
    }
    if ((st = get_bool(c, v, "quoting", "source", &s->quoting))) return st;
    if ((st = get_bool(c, v, "header", "source", &s->header))) return st;
    const cJSON *cols = cJSON_GetObjectItemCaseSensitive(v, "columns");
    if (cols && s->header)
        return levi_errorf(c->err, LEVI_ERR_FORMAT,
                           "%s: source.columns: expected only with \"header\": false (the header "
                           "names the columns), found it with a header",
                           c->file);
    if (!s->header) {
        if (!cols)
            return bad(c, "source.columns", "the column names (the file has no header)", NULL);
        if ((st = get_string_list(c, cols, "source.columns", &s->columns, &s->num_columns)))
            return st;
    }
    return LEVI_OK;
}

static levi_status parse_label(ctx *c, const cJSON *v, levi_spec *s) {
    levi_status st = need_object(c, v, "label");
    if (st) return st;
    static const char *const keys[] = {"column", "task", "classes", NULL};
    if ((st = check_keys(c, v, "label", keys))) return st;
    if ((st = get_string(c, v, "column", "label", 1, &s->label_column))) return st;
    char *task = NULL;
    if ((st = get_string(c, v, "task", "label", 1, &task))) return st;
    int is_reg = strcmp(task, "regression") == 0, is_cls = strcmp(task, "classification") == 0;
    free(task);
    if (!is_reg && !is_cls)
        return bad(c, "label.task", "\"regression\" or \"classification\"",
                   cJSON_GetObjectItemCaseSensitive(v, "task"));
    s->task = is_reg ? LEVI_TASK_REGRESSION : LEVI_TASK_CLASSIFICATION;
    const cJSON *cl = cJSON_GetObjectItemCaseSensitive(v, "classes");
    if (is_reg) {
        if (cl)
            return levi_errorf(c->err, LEVI_ERR_FORMAT,
                               "%s: label.classes: expected no classes for a regression task, "
                               "found some",
                               c->file);
        return LEVI_OK;
    }
    if (!cl || (cJSON_IsString(cl) && strcmp(cl->valuestring, "auto") == 0)) {
        s->classes_auto = 1;
        return LEVI_OK;
    }
    if (!cJSON_IsArray(cl) || cJSON_GetArraySize(cl) < 2)
        return bad(c, "label.classes", "\"auto\" or an array of at least two class names", cl);
    if ((st = get_string_list(c, cl, "label.classes", &s->classes, &s->num_classes))) return st;
    for (int i = 0; i < s->num_classes; i++)
        for (int j = 0; j < i; j++)
            if (strcmp(s->classes[i], s->classes[j]) == 0) {
                char p[64];
                index_path(p, sizeof p, "label.classes", i);
                return levi_errorf(c->err, LEVI_ERR_FORMAT,
                                   "%s: %s: expected distinct class names, found \"%s\" again",
                                   c->file, p, s->classes[i]);
            }
    return LEVI_OK;
}

static levi_status parse_categorical(ctx *c, const cJSON *v, levi_spec *s) {
    if (!cJSON_IsArray(v)) return bad(c, "categorical", "an array of columns", v);
    int n = cJSON_GetArraySize(v);
    s->cats = calloc((size_t)n + 1, sizeof *s->cats);
    LEVI_ASSERT(s->cats, "out of memory");
    const cJSON *e;
    int i = 0;
    levi_status st;
    static const char *const keys[] = {"column", "mask_prob", "group_with", NULL};
    cJSON_ArrayForEach(e, v) {
        char p[64];
        index_path(p, sizeof p, "categorical", i);
        levi__spec_cat *k = &s->cats[i];
        s->num_cats = ++i;
        if (cJSON_IsString(e) && e->valuestring[0]) { /* shorthand: "user_id" */
            k->column = xstrdup(e->valuestring);
            continue;
        }
        if (!cJSON_IsObject(e)) return bad(c, p, "a column name or an object with \"column\"", e);
        if ((st = check_keys(c, e, p, keys))) return st;
        if ((st = get_string(c, e, "column", p, 1, &k->column))) return st;
        int has_mask = 0;
        if ((st = get_number(c, e, "mask_prob", p, 0, 1, 1, &has_mask, &k->mask_prob))) return st;
        if ((st = get_string(c, e, "group_with", p, 0, &k->group_with))) return st;
        if (k->group_with && has_mask) {
            char q[96], buf[64];
            sub_path(q, sizeof q, p, "mask_prob");
            return levi_errorf(
                c->err, LEVI_ERR_FORMAT,
                "%s: %s: expected no mask_prob on a column masked together with "
                "\"%s\" (it uses that column's), found %s",
                c->file, q, k->group_with,
                describe(cJSON_GetObjectItemCaseSensitive(e, "mask_prob"), buf, sizeof buf));
        }
    }
    for (i = 0; i < s->num_cats; i++) {
        char p[96];
        index_path(p, sizeof p, "categorical", i);
        for (int j = 0; j < i; j++)
            if (strcmp(s->cats[i].column, s->cats[j].column) == 0)
                return levi_errorf(c->err, LEVI_ERR_FORMAT,
                                   "%s: %s.column: expected each column once, found \"%s\" again "
                                   "(categorical[%d])",
                                   c->file, p, s->cats[i].column, j);
        if (!s->cats[i].group_with) continue;
        int target = -1;
        for (int j = 0; j < s->num_cats; j++)
            if (strcmp(s->cats[j].column, s->cats[i].group_with) == 0) target = j;
        if (target < 0 || target == i || s->cats[target].group_with)
            return levi_errorf(c->err, LEVI_ERR_FORMAT,
                               "%s: %s.group_with: expected another categorical column that is "
                               "not itself grouped, found \"%s\"",
                               c->file, p, s->cats[i].group_with);
    }
    return LEVI_OK;
}

static levi_status parse_numeric(ctx *c, const cJSON *v, levi_spec *s) {
    if (!cJSON_IsArray(v)) return bad(c, "numeric", "an array of columns", v);
    int n = cJSON_GetArraySize(v);
    s->numerics = calloc((size_t)n + 1, sizeof *s->numerics);
    LEVI_ASSERT(s->numerics, "out of memory");
    const cJSON *e;
    int i = 0;
    levi_status st;
    static const char *const keys[] = {"column", NULL};
    cJSON_ArrayForEach(e, v) {
        char p[64];
        index_path(p, sizeof p, "numeric", i);
        s->num_numerics = i + 1;
        if (cJSON_IsString(e) && e->valuestring[0]) {
            s->numerics[i++] = xstrdup(e->valuestring);
            continue;
        }
        if (!cJSON_IsObject(e)) return bad(c, p, "a column name or an object with \"column\"", e);
        if ((st = check_keys(c, e, p, keys))) return st;
        if ((st = get_string(c, e, "column", p, 1, &s->numerics[i]))) return st;
        i++;
    }
    return LEVI_OK;
}

static levi_status parse_shift(ctx *c, const cJSON *v, levi_spec *s) {
    levi_status st = need_object(c, v, "shift");
    if (st) return st;
    static const char *const keys[] = {"id", "ood", "ood_groups", NULL};
    if ((st = check_keys(c, v, "shift", keys))) return st;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(v, "id");
    const cJSON *ood = cJSON_GetObjectItemCaseSensitive(v, "ood");
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(v, "ood_groups");
    if (!id) return bad(c, "shift.id", "a condition selecting the in-distribution rows", NULL);
    s->id_cond = calloc(1, sizeof *s->id_cond);
    LEVI_ASSERT(s->id_cond, "out of memory");
    if ((st = parse_cond(c, id, "shift.id", s->id_cond))) return st;
    if (ood) {
        s->ood_cond = calloc(1, sizeof *s->ood_cond);
        LEVI_ASSERT(s->ood_cond, "out of memory");
        if ((st = parse_cond(c, ood, "shift.ood", s->ood_cond))) return st;
    }
    if (!groups) return LEVI_OK;
    if (!cJSON_IsArray(groups))
        return bad(c, "shift.ood_groups", "an array of group definitions", groups);
    int n = cJSON_GetArraySize(groups);
    s->groups = calloc((size_t)n + 1, sizeof *s->groups);
    LEVI_ASSERT(s->groups, "out of memory");
    const cJSON *e;
    int i = 0;
    static const char *const by_keys[] = {"by_value", "multi_sep", "min_count", "exclude", NULL};
    static const char *const named_keys[] = {"name", "where", NULL};
    cJSON_ArrayForEach(e, groups) {
        char p[64];
        index_path(p, sizeof p, "shift.ood_groups", i);
        levi__spec_group *g = &s->groups[i];
        s->num_groups = ++i;
        g->jpath = xstrdup(p);
        g->min_count = 1;
        if ((st = need_object(c, e, p))) return st;
        if (cJSON_HasObjectItem(e, "by_value")) {
            if ((st = check_keys(c, e, p, by_keys))) return st;
            if ((st = get_string(c, e, "by_value", p, 1, &g->by_value))) return st;
            if ((st = get_string(c, e, "multi_sep", p, 0, &g->multi_sep))) return st;
            if (g->multi_sep && !g->multi_sep[0]) {
                char q[96];
                sub_path(q, sizeof q, p, "multi_sep");
                return bad(c, q, "a non-empty separator",
                           cJSON_GetObjectItemCaseSensitive(e, "multi_sep"));
            }
            if ((st = get_count(c, e, "min_count", p, NULL, &g->min_count))) return st;
            const cJSON *ex = cJSON_GetObjectItemCaseSensitive(e, "exclude");
            if (ex) {
                char q[96];
                sub_path(q, sizeof q, p, "exclude");
                if ((st = get_string_list(c, ex, q, &g->exclude, &g->num_exclude))) return st;
            }
        } else if (cJSON_HasObjectItem(e, "name")) {
            if ((st = check_keys(c, e, p, named_keys))) return st;
            if ((st = get_string(c, e, "name", p, 1, &g->name))) return st;
            char q[96];
            sub_path(q, sizeof q, p, "where");
            const cJSON *w = cJSON_GetObjectItemCaseSensitive(e, "where");
            if (!w) return bad(c, q, "a condition", NULL);
            g->where = calloc(1, sizeof *g->where);
            LEVI_ASSERT(g->where, "out of memory");
            if ((st = parse_cond(c, w, q, g->where))) return st;
        } else {
            return bad(c, p, "{\"by_value\": column, ...} or {\"name\": ..., \"where\": condition}",
                       e);
        }
    }
    return LEVI_OK;
}

static levi_status parse_split(ctx *c, const cJSON *v, levi_spec *s) {
    levi_status st = need_object(c, v, "split");
    if (st) return st;
    static const char *const keys[] = {"seed", "train", "val", "test", NULL};
    if ((st = check_keys(c, v, "split", keys))) return st;
    int64_t seed = 0;
    if ((st = get_count(c, v, "seed", "split", NULL, &seed))) return st;
    s->seed = (uint64_t)seed;
    if ((st = get_number(c, v, "train", "split", 0, 1, 0, NULL, &s->train)) ||
        (st = get_number(c, v, "val", "split", 0, 1, 0, NULL, &s->val)) ||
        (st = get_number(c, v, "test", "split", 0, 1, 0, NULL, &s->test)))
        return st;
    if (!(s->train > 0))
        return bad(c, "split.train", "a fraction above 0",
                   cJSON_GetObjectItemCaseSensitive(v, "train"));
    double sum = s->train + s->val + s->test;
    if (fabs(sum - 1.0) > 1e-6)
        return levi_errorf(c->err, LEVI_ERR_FORMAT,
                           "%s: split: expected train + val + test = 1, found %g + %g + %g = %g",
                           c->file, s->train, s->val, s->test, sum);
    return LEVI_OK;
}

static levi_status parse_expect(ctx *c, const cJSON *v, levi_spec *s) {
    levi_status st = need_object(c, v, "expect");
    if (st) return st;
    static const char *const keys[] = {"id_rows", "ood_rows", "ood_groups", NULL};
    if ((st = check_keys(c, v, "expect", keys))) return st;
    s->has_expect = 1;
    s->expect_id = s->expect_ood = -1;
    s->num_expect_groups = -1;
    if ((st = get_count(c, v, "id_rows", "expect", NULL, &s->expect_id)) ||
        (st = get_count(c, v, "ood_rows", "expect", NULL, &s->expect_ood)))
        return st;
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(v, "ood_groups");
    if (!g) return LEVI_OK;
    if (!cJSON_IsObject(g)) return bad(c, "expect.ood_groups", "an object {group: count}", g);
    int n = cJSON_GetArraySize(g);
    s->expect_group_names = calloc((size_t)n + 1, sizeof *s->expect_group_names);
    s->expect_group_counts = calloc((size_t)n + 1, sizeof *s->expect_group_counts);
    LEVI_ASSERT(s->expect_group_names && s->expect_group_counts, "out of memory");
    s->num_expect_groups = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, g) {
        int k = s->num_expect_groups++;
        s->expect_group_names[k] = xstrdup(e->string);
        if ((st =
                 get_count(c, g, e->string, "expect.ood_groups", NULL, &s->expect_group_counts[k])))
            return st;
    }
    return LEVI_OK;
}

/* ---- load / free --------------------------------------------------------------------------- */

/* "hyperparameters": {"name": number, ...}: settings of the methods that suit this task
 * (chosen on its ID validation data). Only numbers are checked here; which names exist is
 * the business of the layer that trains. */
static levi_status parse_hyperparameters(ctx *c, const cJSON *v, levi_spec *s) {
    levi_status st = need_object(c, v, "hyperparameters");
    if (st) return st;
    int n = cJSON_GetArraySize(v);
    s->hyper_names = calloc((size_t)n + 1, sizeof *s->hyper_names);
    s->hyper_values = calloc((size_t)n + 1, sizeof *s->hyper_values);
    LEVI_ASSERT(s->hyper_names && s->hyper_values, "out of memory");
    for (const cJSON *e = v->child; e; e = e->next) {
        char field[160];
        snprintf(field, sizeof field, "hyperparameters.%s", e->string);
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble))
            return bad(c, field, "a finite number", e);
        s->hyper_names[s->num_hyper] = xstrdup(e->string);
        s->hyper_values[s->num_hyper++] = e->valuedouble;
    }
    return LEVI_OK;
}

void levi_spec_free(levi_spec *s) {
    if (!s) return;
    free(s->file);
    free(s->base_dir);
    free(s->name);
    free(s->reader);
    free_list(s->paths, s->num_paths);
    free_list(s->columns, s->num_columns);
    free(s->label_column);
    free_list(s->classes, s->num_classes);
    for (int i = 0; i < s->num_cats; i++) {
        free(s->cats[i].column);
        free(s->cats[i].group_with);
    }
    free(s->cats);
    free_list(s->numerics, s->num_numerics);
    free(s->text);
    free_list(s->hyper_names, s->num_hyper);
    free(s->hyper_values);
    for (int i = 0; i < s->num_tpl; i++) {
        free(s->tpl[i].literal);
        free(s->tpl[i].column);
    }
    free(s->tpl);
    cond_free(s->id_cond);
    cond_free(s->ood_cond);
    for (int i = 0; i < s->num_groups; i++) {
        levi__spec_group *g = &s->groups[i];
        free(g->name);
        cond_free(g->where);
        free(g->by_value);
        free(g->multi_sep);
        free_list(g->exclude, g->num_exclude);
        free(g->jpath);
    }
    free(s->groups);
    free_list(s->expect_group_names, s->num_expect_groups > 0 ? s->num_expect_groups : 0);
    free(s->expect_group_counts);
    free(s);
}

static char *default_name(const char *file) {
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    size_t n = strlen(base);
    if (n > 5 && strcmp(base + n - 5, ".json") == 0) n -= 5;
    char *s = strndup(base, n);
    LEVI_ASSERT(s, "out of memory");
    return s;
}

levi_status levi_spec_parse(const char *json, size_t len, const char *name, const char *base_dir,
                            levi_spec **out, levi_error *err) {
    *out = NULL;
    ctx c = {name, err};
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *ep = cJSON_GetErrorPtr();
        int64_t line = 1, col = 1;
        if (ep && ep >= json && ep <= json + len) {
            for (const char *q = json; q < ep; q++) {
                col++;
                if (*q == '\n') {
                    line++;
                    col = 1;
                }
            }
        }
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s:%lld: expected valid JSON, found a syntax error near column %lld",
                           name, (long long)line, (long long)col);
    }
    levi_spec *s = calloc(1, sizeof *s);
    LEVI_ASSERT(s, "out of memory");
    s->file = xstrdup(name);
    s->base_dir = xstrdup(base_dir && base_dir[0] ? base_dir : ".");
    s->seed = 0;
    s->train = 0.8;
    s->val = 0.1;
    s->test = 0.1;
    levi_status st;
    static const char *const keys[] = {"name",        "description", "source", "label",
                                       "categorical", "numeric",     "text",   "text_max_tokens",
                                       "shift",       "split",       "expect", "hyperparameters",
                                       NULL};
    if (!cJSON_IsObject(root)) {
        char buf[96];
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: expected a JSON object at the top, found %s",
                         name, describe(root, buf, sizeof buf));
        goto done;
    }
    if ((st = check_keys(&c, root, "", keys))) goto done;
    if ((st = get_string(&c, root, "name", "", 0, &s->name))) goto done;
    char *desc = NULL;
    if ((st = get_string(&c, root, "description", "", 0, &desc))) goto done;
    free(desc);
    if (!s->name) s->name = default_name(name);
    const cJSON *v;
    if (!(v = cJSON_GetObjectItemCaseSensitive(root, "source"))) {
        st = bad(&c, "source", "an object {\"reader\", \"path\"}", NULL);
        goto done;
    }
    if ((st = parse_source(&c, v, s))) goto done;
    if (!(v = cJSON_GetObjectItemCaseSensitive(root, "label"))) {
        st = bad(&c, "label", "an object {\"column\", \"task\"}", NULL);
        goto done;
    }
    if ((st = parse_label(&c, v, s))) goto done;
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "categorical")) &&
        (st = parse_categorical(&c, v, s)))
        goto done;
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "numeric")) && (st = parse_numeric(&c, v, s)))
        goto done;
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "text"))) {
        if (!cJSON_IsString(v) || !v->valuestring[0]) {
            st = bad(&c, "text", "a template string such as \"the user is {user_id}\"", v);
            goto done;
        }
        s->text = xstrdup(v->valuestring);
        if ((st = parse_template(&c, s))) goto done;
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "text_max_tokens"))) {
        /* 2 is [CLS] + [SEP]; the extractor checks the model's own position limit. */
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 2 ||
            v->valuedouble > 1 << 20) {
            st = bad(&c, "text_max_tokens", "an integer from 2 to 1048576", v);
            goto done;
        }
        if (!s->text) {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: text_max_tokens: expected it only with a \"text\" template, "
                             "found no template",
                             name);
            goto done;
        }
        s->text_max_tokens = (int)v->valuedouble;
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "shift")) && (st = parse_shift(&c, v, s)))
        goto done;
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "split")) && (st = parse_split(&c, v, s)))
        goto done;
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "expect")) && (st = parse_expect(&c, v, s)))
        goto done;
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "hyperparameters")) &&
        (st = parse_hyperparameters(&c, v, s)))
        goto done;
    st = LEVI_OK;
done:
    cJSON_Delete(root);
    if (st) {
        levi_spec_free(s);
        return st;
    }
    *out = s;
    return LEVI_OK;
}

levi_status levi_spec_load(const char *path, levi_spec **out, levi_error *err) {
    *out = NULL;
    char *json;
    size_t len;
    levi_status st = levi_read_file(path, &json, &len, err);
    if (st) return st;
    char *dir = xstrdup(path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = 0;
    else if (slash)
        *slash = 0;
    else
        strcpy(dir, ".");
    st = levi_spec_parse(json, len, path, dir, out, err);
    free(dir);
    free(json);
    return st;
}

const char *levi_spec_file(const levi_spec *s) {
    return s->file;
}
const char *levi_spec_name(const levi_spec *s) {
    return s->name;
}
levi_task levi_spec_task(const levi_spec *s) {
    return s->task;
}
int levi_spec_text_max_tokens(const levi_spec *s) {
    return s->text_max_tokens;
}

int levi_spec_num_hyperparameters(const levi_spec *s) {
    return s->num_hyper;
}

const char *levi_spec_hyperparameter(const levi_spec *s, int i, double *value) {
    LEVI_ASSERT(i >= 0 && i < s->num_hyper, "hyperparameter index out of range");
    if (value) *value = s->hyper_values[i];
    return s->hyper_names[i];
}

void levi_spec_set_source_path(levi_spec *s, const char *path) {
    LEVI_ASSERT(path && path[0], "an override path must be non-empty");
    free_list(s->paths, s->num_paths);
    s->paths = calloc(1, sizeof *s->paths);
    LEVI_ASSERT(s->paths, "out of memory");
    s->paths[0] = xstrdup(path);
    s->num_paths = 1;
    s->path_overridden = 1;
}

/* Expands ${VAR}; returns 0 with the variable's name in why when it is unset. */
static int expand_path(const levi_spec *s, const char *in, char *out, size_t cap, char *why,
                       size_t why_cap) {
    char tmp[SPEC_PATH_MAX];
    size_t w = 0;
    for (const char *p = in; *p;) {
        if (p[0] == '$' && p[1] == '{') {
            const char *close = strchr(p + 2, '}');
            if (!close) {
                snprintf(why, why_cap, "'${' without a closing '}'");
                return 0;
            }
            char var[256];
            snprintf(var, sizeof var, "%.*s", (int)(close - p - 2), p + 2);
            const char *val = getenv(var);
            if (!val || !val[0]) {
                fmt(why, why_cap, "%s is not set", var);
                return 0;
            }
            size_t n = strlen(val);
            if (w + n >= sizeof tmp) goto too_long;
            memcpy(tmp + w, val, n);
            w += n;
            p = close + 1;
        } else {
            if (w + 1 >= sizeof tmp) goto too_long;
            tmp[w++] = *p++;
        }
    }
    tmp[w] = 0;
    int n;
    if (tmp[0] == '/' || s->path_overridden)
        n = snprintf(out, cap, "%s", tmp);
    else
        n = snprintf(out, cap, "%s/%s", s->base_dir, tmp);
    if (n < 0 || (size_t)n >= cap) goto too_long;
    return 1;
too_long:
    snprintf(why, why_cap, "path too long");
    return 0;
}

levi_status levi_spec_source_path(const levi_spec *s, char *out, size_t cap, levi_error *err) {
    char reasons[LEVI_ERROR_MSG_MAX] = "";
    size_t w = 0;
    for (int i = 0; i < s->num_paths; i++) {
        char why[256] = "";
        if (expand_path(s, s->paths[i], out, cap, why, sizeof why)) {
            struct stat sb;
            if (stat(out, &sb) == 0) return LEVI_OK;
            snprintf(why, sizeof why, "nothing at %s", out);
        }
        if (w < sizeof reasons)
            w += (size_t)snprintf(reasons + w, sizeof reasons - w, "%s\"%s\" (%s)", i ? ", " : "",
                                  s->paths[i], why);
    }
    return levi_errorf(err, LEVI_ERR_NOT_FOUND,
                       "%s: source.path%s: expected an existing %s, found none: %s", s->file,
                       s->path_overridden ? " (overridden)" : "",
                       s->num_paths > 1 ? "path among the candidates" : "path", reasons);
}

levi_status levi_spec_read_table(const levi_spec *s, levi_table **out, levi_error *err) {
    char path[SPEC_PATH_MAX];
    *out = NULL;
    levi_status st = levi_spec_source_path(s, path, sizeof path, err);
    if (st) return st;
    if (strcmp(s->reader, "movielens") == 0) return levi_movielens_read(path, out, err);
    if (strcmp(s->reader, "amazon") == 0) return levi_amazon_read(path, out, err);
    if (strcmp(s->reader, "jsonl") == 0) return levi_table_read_jsonl(path, s->encoding, out, err);
    levi_table_read_params p = levi_table_default_read_params();
    p.delimiter = s->delimiter;
    p.quoting = s->quoting;
    p.header = s->header;
    p.column_names = (const char *const *)s->columns;
    p.num_columns = s->num_columns;
    p.encoding = s->encoding;
    return levi_table_read_delimited(path, &p, out, err);
}
