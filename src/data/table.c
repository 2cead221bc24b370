/* levi tables: column-oriented UTF-8 string tables and their readers (delimiter-separated
 * files with optional RFC 4180 quoting, and JSON Lines), plus the small helpers the data layer
 * shares (string hash map, strict number parsing, UTF-8 validation).
 *
 * Why a hand-written delimited parser and not libcsv: libcsv is not installed on the build
 * machines (it would be a new dependency for ~150 lines), and its callback API does not report
 * line numbers, which every error message here must carry. The parser works in place on the
 * file buffer (unquoting only ever shrinks a field), so a 100k-row file costs one read and one
 * pass, and the cells point into that buffer.
 *
 * Not for: typing or interpreting values (the dataset layer does that), MovieLens specifics
 * (movielens.c), or files that do not fit in memory. */
#include "data_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#define TABLE_BLOCK_MIN (64 * 1024)

struct levi_table {
    int ncols;
    char **names;
    int64_t nrows, cap;
    const char ***cols; /* [ncols][cap] */
    int64_t *lines;     /* [cap] */
    char *source;
    /* The file each row came from when a table joins several (the Amazon reader): [cap],
       NULL entries mean `source`; the strings live in the table's storage. */
    const char **row_sources;
    const char *cur_source; /* given to rows appended from now on */
    void **bufs;            /* owned storage: file buffers and string blocks */
    int nbufs, capbufs;
    char *block; /* current string block (also in bufs) */
    size_t block_used, block_cap;
};

/* ---- shared helpers ---------------------------------------------------------------------- */

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

void levi__strmap_init(levi__strmap *m, size_t expected) {
    size_t cap = 16;
    while (cap < expected * 2 + 1) cap *= 2;
    m->cap = cap;
    m->count = 0;
    m->keys = levi_xcalloc(cap, sizeof *m->keys);
    m->vals = levi_xcalloc(cap, sizeof *m->vals);
}

void levi__strmap_free(levi__strmap *m) {
    if (!m) return;
    levi_free(m->keys);
    levi_free(m->vals);
    memset(m, 0, sizeof *m);
}

int64_t levi__strmap_get(const levi__strmap *m, const char *key) {
    size_t mask = m->cap - 1, i = (size_t)hash_str(key) & mask;
    while (m->keys[i]) {
        if (strcmp(m->keys[i], key) == 0) return m->vals[i];
        i = (i + 1) & mask;
    }
    return -1;
}

static void strmap_grow(levi__strmap *m) {
    levi__strmap bigger;
    levi__strmap_init(&bigger, m->cap);
    for (size_t i = 0; i < m->cap; i++)
        if (m->keys[i]) levi__strmap_put(&bigger, m->keys[i], m->vals[i]);
    levi__strmap_free(m);
    *m = bigger;
}

int64_t levi__strmap_put(levi__strmap *m, const char *key, int64_t val) {
    if ((m->count + 1) * 2 > m->cap) strmap_grow(m);
    size_t mask = m->cap - 1, i = (size_t)hash_str(key) & mask;
    while (m->keys[i]) {
        if (strcmp(m->keys[i], key) == 0) return m->vals[i];
        i = (i + 1) & mask;
    }
    m->keys[i] = key;
    m->vals[i] = val;
    m->count++;
    return val;
}

int levi__parse_double(const char *s, double *out) {
    if (!*s || *s == ' ' || *s == '\t') return 0;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (*end || !isfinite(v)) return 0;
    *out = v;
    return 1;
}

int levi__parse_int64(const char *s, int64_t *out) {
    const char *p = s;
    if (*p == '-' || *p == '+') p++;
    if (*p < '0' || *p > '9') return 0;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (*end || errno == ERANGE) return 0;
    *out = (int64_t)v;
    return 1;
}

const char *levi__quote(const char *s, char *buf, size_t cap) {
    size_t n = strlen(s);
    if (n > 48) {
        /* Cut on a UTF-8 boundary so the message itself stays valid UTF-8. */
        size_t cut = 45;
        while (cut > 0 && ((unsigned char)s[cut] & 0xC0) == 0x80) cut--;
        snprintf(buf, cap, "\"%.*s...\"", (int)cut, s);
    } else {
        snprintf(buf, cap, "\"%s\"", s);
    }
    return buf;
}

int levi__utf8_valid(const char *s, size_t len, size_t *bad_offset) {
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    size_t i = 0;
    while (i < len) {
        if (p[i] >= 0x01 && p[i] < 0x80) {
            i++;
            continue;
        }
        if (p[i] == 0) {
            *bad_offset = i;
            return 0;
        }
        utf8proc_int32_t cp;
        utf8proc_ssize_t n = utf8proc_iterate(p + i, (utf8proc_ssize_t)(len - i), &cp);
        if (n <= 0 || cp < 0) {
            *bad_offset = i;
            return 0;
        }
        i += (size_t)n;
    }
    return 1;
}

/* Line (1-based) and column (1-based, in bytes) of byte offset off. */
static void line_col(const char *buf, size_t off, int64_t *line, int64_t *col) {
    int64_t l = 1;
    size_t last = 0;
    for (size_t i = 0; i < off; i++)
        if (buf[i] == '\n') {
            l++;
            last = i + 1;
        }
    *line = l;
    *col = (int64_t)(off - last) + 1;
}

static levi_status check_utf8(const char *name, const char *buf, size_t len, levi_error *err) {
    size_t bad;
    if (levi__utf8_valid(buf, len, &bad)) return LEVI_OK;
    int64_t line, col;
    line_col(buf, bad, &line, &col);
    if (buf[bad] == 0)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s:%lld: expected text, found a NUL byte at column %lld", name,
                           (long long)line, (long long)col);
    return levi_errorf(err, LEVI_ERR_FORMAT,
                       "%s:%lld: invalid UTF-8 (byte 0x%02X at column %lld); if the file is "
                       "Latin-1, declare the encoding latin-1",
                       name, (long long)line, (unsigned)(unsigned char)buf[bad], (long long)col);
}

/* Latin-1 -> UTF-8: every byte is a code point; bytes >= 0x80 take two bytes. */
static levi_status latin1_to_utf8(const char *name, const char *in, size_t len, char **out,
                                  size_t *out_len, levi_error *err) {
    size_t extra = 0;
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)in[i] >= 0x80) extra++;
        if (in[i] == 0) {
            int64_t line, col;
            line_col(in, i, &line, &col);
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s:%lld: expected text, found a NUL byte at column %lld", name,
                               (long long)line, (long long)col);
        }
    }
    size_t n;
    if (!levi_add_size(len, extra + 1, &n))
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: file too large", name);
    char *o = malloc(n);
    if (!o) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", name);
    size_t w = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c < 0x80)
            o[w++] = (char)c;
        else
            w += (size_t)utf8proc_encode_char(c, (utf8proc_uint8_t *)o + w);
    }
    o[w] = 0;
    *out = o;
    *out_len = w;
    return LEVI_OK;
}

/* ---- table storage ------------------------------------------------------------------------- */

static void table_own(levi_table *t, void *buf) {
    if (t->nbufs == t->capbufs) {
        int cap = t->capbufs ? t->capbufs * 2 : 8;
        void **nb = realloc(t->bufs, (size_t)cap * sizeof *nb);
        LEVI_ASSERT(nb, "out of memory growing a table's buffer list");
        t->bufs = nb;
        t->capbufs = cap;
    }
    t->bufs[t->nbufs++] = buf;
}

char *levi__table_strdup(levi_table *t, const char *s, size_t len) {
    if (!t->block || t->block_cap - t->block_used < len + 1) {
        size_t cap = len + 1 > TABLE_BLOCK_MIN ? len + 1 : TABLE_BLOCK_MIN;
        char *b = malloc(cap);
        LEVI_ASSERT(b, "out of memory in table string storage");
        table_own(t, b);
        t->block = b;
        t->block_cap = cap;
        t->block_used = 0;
    }
    char *d = t->block + t->block_used;
    memcpy(d, s, len);
    d[len] = 0;
    t->block_used += len + 1;
    return d;
}

levi_table *levi_table_init(int num_columns, const char *const *names, const char *source) {
    LEVI_ASSERT(num_columns > 0 && names, "a table needs at least one named column");
    levi_table *t = calloc(1, sizeof *t);
    LEVI_ASSERT(t, "out of memory");
    t->ncols = num_columns;
    t->names = calloc((size_t)num_columns, sizeof *t->names);
    t->cols = calloc((size_t)num_columns, sizeof *t->cols);
    LEVI_ASSERT(t->names && t->cols, "out of memory");
    for (int c = 0; c < num_columns; c++) {
        t->names[c] = strdup(names[c]);
        LEVI_ASSERT(t->names[c], "out of memory");
    }
    t->source = strdup(source ? source : "");
    LEVI_ASSERT(t->source, "out of memory");
    return t;
}

void levi_table_free(levi_table *t) {
    if (!t) return;
    for (int c = 0; c < t->ncols; c++) {
        free(t->names[c]);
        free(t->cols[c]);
    }
    free(t->names);
    free(t->cols);
    free(t->lines);
    free(t->row_sources);
    for (int i = 0; i < t->nbufs; i++) free(t->bufs[i]);
    free(t->bufs);
    free(t->source);
    free(t);
}

void levi__table_adopt(levi_table *dst, levi_table *src) {
    for (int i = 0; i < src->nbufs; i++) table_own(dst, src->bufs[i]);
    src->nbufs = 0;
    levi_table_free(src);
}

static levi_status table_reserve(levi_table *t, int64_t want, levi_error *err) {
    if (want <= t->cap) return LEVI_OK;
    int64_t cap = t->cap ? t->cap : 1024;
    while (cap < want) cap *= 2;
    size_t bytes;
    if (!levi_mul_size((size_t)cap, sizeof(const char *), &bytes))
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: too many rows", t->source);
    for (int c = 0; c < t->ncols; c++) {
        const char **nc = realloc(t->cols[c], bytes);
        if (!nc) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", t->source);
        t->cols[c] = nc;
    }
    int64_t *nl = realloc(t->lines, (size_t)cap * sizeof *nl);
    if (!nl) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", t->source);
    t->lines = nl;
    const char **ns = realloc(t->row_sources, (size_t)cap * sizeof *ns);
    if (!ns) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", t->source);
    t->row_sources = ns;
    t->cap = cap;
    return LEVI_OK;
}

levi_status levi__table_append_owned(levi_table *t, const char **values, int64_t line,
                                     levi_error *err) {
    levi_status st = table_reserve(t, t->nrows + 1, err);
    if (st) return st;
    for (int c = 0; c < t->ncols; c++) t->cols[c][t->nrows] = values[c];
    t->row_sources[t->nrows] = t->cur_source;
    t->lines[t->nrows++] = line;
    return LEVI_OK;
}

levi_status levi_table_append(levi_table *t, const char *const *values, int64_t line,
                              levi_error *err) {
    levi_status st = table_reserve(t, t->nrows + 1, err);
    if (st) return st;
    for (int c = 0; c < t->ncols; c++) {
        const char *v = values[c] ? values[c] : "";
        t->cols[c][t->nrows] = levi__table_strdup(t, v, strlen(v));
    }
    t->row_sources[t->nrows] = t->cur_source;
    t->lines[t->nrows++] = line;
    return LEVI_OK;
}

int64_t levi_table_num_rows(const levi_table *t) {
    return t->nrows;
}
int levi_table_num_columns(const levi_table *t) {
    return t->ncols;
}

const char *levi_table_column_name(const levi_table *t, int col) {
    LEVI_ASSERT(col >= 0 && col < t->ncols, "column index out of range");
    return t->names[col];
}

int levi_table_find_column(const levi_table *t, const char *name) {
    for (int c = 0; c < t->ncols; c++)
        if (strcmp(t->names[c], name) == 0) return c;
    return -1;
}

const char *const *levi_table_column(const levi_table *t, int col) {
    LEVI_ASSERT(col >= 0 && col < t->ncols, "column index out of range");
    return t->cols[col];
}

const char *levi_table_cell(const levi_table *t, int64_t row, int col) {
    LEVI_ASSERT(col >= 0 && col < t->ncols, "column index out of range");
    LEVI_ASSERT(row >= 0 && row < t->nrows, "row index out of range");
    return t->cols[col][row];
}

const char *levi_table_source(const levi_table *t) {
    return t->source;
}

void levi__table_set_row_source(levi_table *t, const char *file) {
    t->cur_source = file;
}

const char *levi_table_row_source(const levi_table *t, int64_t row) {
    LEVI_ASSERT(row >= 0 && row < t->nrows, "row index out of range");
    return t->row_sources[row] ? t->row_sources[row] : t->source;
}

int64_t levi_table_line(const levi_table *t, int64_t row) {
    LEVI_ASSERT(row >= 0 && row < t->nrows, "row index out of range");
    return t->lines[row];
}

const char *levi_table_column_list(const levi_table *t, char *buf, size_t cap) {
    LEVI_ASSERT(cap >= 8, "buffer too small");
    size_t w = 0;
    buf[0] = 0;
    for (int c = 0; c < t->ncols; c++) {
        size_t n = strlen(t->names[c]) + (c ? 2 : 0);
        if (w + n + 4 >= cap) {
            snprintf(buf + w, cap - w, "%s...", c ? ", " : "");
            break;
        }
        w += (size_t)snprintf(buf + w, cap - w, "%s%s", c ? ", " : "", t->names[c]);
    }
    return buf;
}

levi_table_read_params levi_table_default_read_params(void) {
    levi_table_read_params p;
    memset(&p, 0, sizeof p);
    p.delimiter = ',';
    p.quoting = 1;
    p.header = 1;
    p.encoding = LEVI_ENCODING_UTF8;
    return p;
}

/* ---- delimited parser ---------------------------------------------------------------------- */

typedef struct csv_state {
    const char *name;
    char *b;
    size_t n, pos;
    int64_t line;
    char delim;
    int quoting;
} csv_state;

static int is_line_end(const csv_state *s, size_t p) {
    return p >= s->n || s->b[p] == '\n' || (s->b[p] == '\r' && p + 1 < s->n && s->b[p + 1] == '\n');
}

/* Parses the record at s->pos in place (NUL-terminating each field). *got = 0 at end of input.
 * Stores up to maxf field pointers and counts all fields into *nf. */
static levi_status csv_record(csv_state *s, char **fields, int maxf, int *nf, int64_t *rec_line,
                              int *got, levi_error *err) {
    char *b = s->b;
    size_t p = s->pos, n = s->n;
    while (p < n && is_line_end(s, p)) { /* blank lines */
        p += b[p] == '\r' ? 2 : 1;
        s->line++;
    }
    *got = 0;
    *nf = 0;
    if (p >= n) {
        s->pos = p;
        return LEVI_OK;
    }
    *got = 1;
    *rec_line = s->line;
    int count = 0;
    for (;;) {
        char *field;
        if (s->quoting && b[p] == '"') {
            int64_t open_line = s->line;
            size_t w = p;
            field = b + w;
            p++;
            for (;;) {
                if (p >= n)
                    return levi_errorf(err, LEVI_ERR_FORMAT,
                                       "%s:%lld: expected a closing '\"' for the quoted field "
                                       "opened on this line, found the end of the file",
                                       s->name, (long long)open_line);
                char c = b[p];
                if (c == '"') {
                    if (p + 1 < n && b[p + 1] == '"') {
                        b[w++] = '"';
                        p += 2;
                        continue;
                    }
                    p++;
                    break;
                }
                if (c == '\n') s->line++;
                b[w++] = c;
                p++;
            }
            if (!(p >= n || b[p] == s->delim || is_line_end(s, p))) {
                char shown[8];
                unsigned char c = (unsigned char)b[p];
                if (c >= 0x20 && c < 0x7f)
                    snprintf(shown, sizeof shown, "'%c'", c);
                else
                    snprintf(shown, sizeof shown, "0x%02X", c);
                return levi_errorf(err, LEVI_ERR_FORMAT,
                                   "%s:%lld: expected a delimiter or the end of the line after a "
                                   "closing quote, found %s",
                                   s->name, (long long)s->line, shown);
            }
            b[w] = 0; /* w < p: the terminator never overwrites unread input */
        } else {
            field = b + p;
            while (p < n && b[p] != s->delim && b[p] != '\n' &&
                   !(b[p] == '\r' && is_line_end(s, p)))
                p++;
        }
        if (count < maxf) fields[count] = field;
        count++;
        if (p >= n) {
            b[p] = 0; /* the buffer has a NUL after its last byte */
            break;
        }
        char c = b[p];
        b[p] = 0;
        if (c == s->delim) {
            p++;
            continue;
        }
        p += c == '\r' ? 2 : 1; /* "\r\n" or "\n" */
        s->line++;
        break;
    }
    s->pos = p;
    *nf = count;
    return LEVI_OK;
}

/* Takes ownership of buf (malloc'd, NUL-terminated, len bytes, UTF-8 already checked). */
static levi_status parse_delimited_owned(const char *name, char *buf, size_t len,
                                         const levi_table_read_params *p, levi_table **out,
                                         levi_error *err) {
    csv_state s = {name, buf, len, 0, 1, p->delimiter, p->quoting};
    if (len >= 3 && memcmp(buf, "\xEF\xBB\xBF", 3) == 0) s.pos = 3;
    levi_table *t = NULL;
    char **fields = NULL;
    levi_status st = LEVI_OK;
    int ncols = 0, nf = 0, got = 0;
    int64_t line = 0;
    if (p->header) {
        /* The header's width is unknown until it is read: parse it with a generous buffer. */
        int maxf = 4096;
        fields = calloc((size_t)maxf, sizeof *fields);
        LEVI_ASSERT(fields, "out of memory");
        st = csv_record(&s, fields, maxf, &nf, &line, &got, err);
        if (st) goto fail;
        if (!got) {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s:1: expected a header line, found an empty file", name);
            goto fail;
        }
        if (nf > maxf) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: expected at most %d columns, found %d",
                             name, (long long)line, maxf, nf);
            goto fail;
        }
        ncols = nf;
        for (int c = 0; c < ncols; c++) {
            if (p->strip_header_types) {
                char *colon = strchr(fields[c], ':');
                if (colon) *colon = 0;
            }
            if (!fields[c][0]) {
                st = levi_errorf(err, LEVI_ERR_FORMAT,
                                 "%s:%lld: header field %d: expected a column name, found \"\"",
                                 name, (long long)line, c + 1);
                goto fail;
            }
            for (int d = 0; d < c; d++)
                if (strcmp(fields[c], fields[d]) == 0) {
                    st = levi_errorf(err, LEVI_ERR_FORMAT,
                                     "%s:%lld: header fields %d and %d: expected distinct column "
                                     "names, found \"%s\" twice",
                                     name, (long long)line, d + 1, c + 1, fields[c]);
                    goto fail;
                }
        }
        t = levi_table_init(ncols, (const char *const *)fields, name);
    } else {
        LEVI_ASSERT(p->column_names && p->num_columns > 0,
                    "header == 0 needs column_names and num_columns");
        ncols = p->num_columns;
        fields = calloc((size_t)ncols, sizeof *fields);
        LEVI_ASSERT(fields, "out of memory");
        t = levi_table_init(ncols, p->column_names, name);
    }
    table_own(t, buf);
    buf = NULL;
    for (;;) {
        st = csv_record(&s, fields, ncols, &nf, &line, &got, err);
        if (st) goto fail;
        if (!got) break;
        if (nf != ncols) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: expected %d fields, found %d", name,
                             (long long)line, ncols, nf);
            goto fail;
        }
        st = levi__table_append_owned(t, (const char **)fields, line, err);
        if (st) goto fail;
    }
    free(fields);
    *out = t;
    return LEVI_OK;
fail:
    free(fields);
    free(buf);
    levi_table_free(t);
    return st;
}

/* Takes ownership of raw (as read from disk). */
static levi_status parse_delimited_raw(const char *name, char *raw, size_t len,
                                       const levi_table_read_params *p, levi_table **out,
                                       levi_error *err) {
    LEVI_ASSERT(p && p->delimiter && p->delimiter != '\n' && p->delimiter != '\r' &&
                    !(p->quoting && p->delimiter == '"'),
                "the delimiter must not be a line end or (with quoting) a quote");
    *out = NULL;
    levi_status st;
    if (p->encoding == LEVI_ENCODING_LATIN1) {
        char *u;
        size_t ulen;
        st = latin1_to_utf8(name, raw, len, &u, &ulen, err);
        free(raw);
        if (st) return st;
        raw = u;
        len = ulen;
    } else {
        st = check_utf8(name, raw, len, err);
        if (st) {
            free(raw);
            return st;
        }
    }
    return parse_delimited_owned(name, raw, len, p, out, err);
}

levi_status levi_table_read_delimited(const char *path, const levi_table_read_params *params,
                                      levi_table **out, levi_error *err) {
    char *raw;
    size_t len;
    *out = NULL;
    levi_status st = levi_read_file(path, &raw, &len, err);
    if (st) return st;
    return parse_delimited_raw(path, raw, len, params, out, err);
}

levi_status levi_table_parse_delimited(const char *name, const char *data, size_t len,
                                       const levi_table_read_params *params, levi_table **out,
                                       levi_error *err) {
    *out = NULL;
    size_t n;
    if (!levi_add_size(len, 1, &n)) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: too large", name);
    char *raw = malloc(n);
    if (!raw) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", name);
    memcpy(raw, data, len);
    raw[len] = 0;
    return parse_delimited_raw(name, raw, len, params, out, err);
}

/* ---- JSON Lines ---------------------------------------------------------------------------- */

static const char *json_kind(const cJSON *v) {
    if (cJSON_IsObject(v)) return "an object";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsBool(v)) return "a boolean";
    return "null";
}

/* Shortest decimal that reads back to the same double. */
static void format_number(double v, char *buf, size_t cap) {
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(buf, cap, "%.0f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

/* Renders a scalar (or an array of scalars) as a cell; returns 0 for objects. */
static int json_cell(const cJSON *v, char *buf, size_t cap, char **heap) {
    *heap = NULL;
    if (cJSON_IsString(v)) {
        snprintf(buf, cap, "%s", "");
        *heap = strdup(v->valuestring);
        LEVI_ASSERT(*heap, "out of memory");
        return 1;
    }
    if (cJSON_IsNumber(v)) {
        format_number(v->valuedouble, buf, cap);
        return 1;
    }
    if (cJSON_IsBool(v)) {
        snprintf(buf, cap, "%s", cJSON_IsTrue(v) ? "true" : "false");
        return 1;
    }
    if (cJSON_IsNull(v)) {
        buf[0] = 0;
        return 1;
    }
    if (cJSON_IsArray(v)) {
        size_t total = 1;
        const cJSON *e;
        char num[64];
        cJSON_ArrayForEach(e, v) {
            if (cJSON_IsString(e))
                total += strlen(e->valuestring) + 1;
            else if (cJSON_IsNumber(e) || cJSON_IsBool(e) || cJSON_IsNull(e))
                total += 64;
            else
                return 0;
        }
        char *s = malloc(total);
        LEVI_ASSERT(s, "out of memory");
        size_t w = 0;
        s[0] = 0;
        cJSON_ArrayForEach(e, v) {
            const char *piece = num;
            if (cJSON_IsString(e))
                piece = e->valuestring;
            else if (cJSON_IsNumber(e))
                format_number(e->valuedouble, num, sizeof num);
            else if (cJSON_IsBool(e))
                snprintf(num, sizeof num, "%s", cJSON_IsTrue(e) ? "true" : "false");
            else
                num[0] = 0;
            w += (size_t)snprintf(s + w, total - w, "%s%s", w ? "|" : "", piece);
        }
        *heap = s;
        return 1;
    }
    return 0;
}

levi_status levi_table_read_jsonl(const char *path, levi_encoding encoding, levi_table **out,
                                  levi_error *err) {
    char *raw;
    size_t len;
    *out = NULL;
    levi_status st = levi_read_file(path, &raw, &len, err);
    if (st) return st;
    if (encoding == LEVI_ENCODING_LATIN1) {
        char *u;
        size_t ulen;
        st = latin1_to_utf8(path, raw, len, &u, &ulen, err);
        free(raw);
        if (st) return st;
        raw = u;
        len = ulen;
    } else if ((st = check_utf8(path, raw, len, err))) {
        free(raw);
        return st;
    }
    levi_table *t = NULL;
    const char **vals = NULL;
    cJSON *obj = NULL;
    int ncols = 0;
    int64_t line = 0;
    size_t p = (len >= 3 && memcmp(raw, "\xEF\xBB\xBF", 3) == 0) ? 3 : 0;
    char names_buf[512];
    while (p < len) {
        size_t e = p;
        while (e < len && raw[e] != '\n') e++;
        line++;
        size_t lend = e;
        if (lend > p && raw[lend - 1] == '\r') lend--;
        size_t q = p;
        while (q < lend && (raw[q] == ' ' || raw[q] == '\t')) q++;
        size_t next = e + 1;
        if (q == lend) {
            p = next;
            continue;
        }
        obj = cJSON_ParseWithLength(raw + p, lend - p);
        if (!obj) {
            const char *ep = cJSON_GetErrorPtr();
            long col = (ep && ep >= raw + p && ep <= raw + lend) ? (long)(ep - (raw + p)) + 1 : 1;
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s:%lld: expected a JSON object, found invalid JSON near column %ld",
                             path, (long long)line, col);
            goto fail;
        }
        if (!cJSON_IsObject(obj)) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: expected a JSON object, found %s",
                             path, (long long)line, json_kind(obj));
            goto fail;
        }
        if (!t) {
            ncols = cJSON_GetArraySize(obj);
            if (ncols == 0) {
                st = levi_errorf(err, LEVI_ERR_FORMAT,
                                 "%s:%lld: expected an object with at least one key, found {}",
                                 path, (long long)line);
                goto fail;
            }
            const char **names = calloc((size_t)ncols, sizeof *names);
            LEVI_ASSERT(names, "out of memory");
            int c = 0;
            const cJSON *it;
            cJSON_ArrayForEach(it, obj) names[c++] = it->string;
            for (c = 0; c < ncols; c++)
                for (int d = 0; d < c; d++)
                    if (strcmp(names[c], names[d]) == 0) {
                        st = levi_errorf(err, LEVI_ERR_FORMAT,
                                         "%s:%lld: expected distinct keys, found \"%s\" twice",
                                         path, (long long)line, names[c]);
                        free(names);
                        goto fail;
                    }
            t = levi_table_init(ncols, names, path);
            free(names);
            vals = calloc((size_t)ncols, sizeof *vals);
            LEVI_ASSERT(vals, "out of memory");
        }
        int nkeys = cJSON_GetArraySize(obj);
        for (int c = 0; c < ncols; c++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, t->names[c]);
            if (!v) {
                st = levi_errorf(err, LEVI_ERR_FORMAT,
                                 "%s:%lld: expected key \"%s\" (the first record's keys: %s), "
                                 "found it missing",
                                 path, (long long)line, t->names[c],
                                 levi_table_column_list(t, names_buf, sizeof names_buf));
                goto fail;
            }
            char buf[64], *heap;
            if (!json_cell(v, buf, sizeof buf, &heap)) {
                st = levi_errorf(err, LEVI_ERR_FORMAT,
                                 "%s:%lld: key \"%s\": expected a string, number, boolean, null or "
                                 "array of those, found %s",
                                 path, (long long)line, t->names[c], json_kind(v));
                goto fail;
            }
            const char *s = heap ? heap : buf;
            vals[c] = levi__table_strdup(t, s, strlen(s));
            free(heap);
        }
        if (nkeys != ncols) {
            const cJSON *it;
            cJSON_ArrayForEach(it, obj) {
                if (levi_table_find_column(t, it->string) < 0) break;
            }
            char extra[LEVI_NAME_MAX + 16];
            if (it)
                snprintf(extra, sizeof extra, "extra key \"%.*s\"", LEVI_NAME_MAX, it->string);
            else
                snprintf(extra, sizeof extra, "a repeated key");
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s:%lld: expected the first record's keys (%s), found %s", path,
                             (long long)line,
                             levi_table_column_list(t, names_buf, sizeof names_buf), extra);
            goto fail;
        }
        cJSON_Delete(obj);
        obj = NULL;
        st = levi__table_append_owned(t, vals, line, err);
        if (st) goto fail;
        p = next;
    }
    if (!t) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s:1: expected a JSON object, found an empty file",
                         path);
        goto fail;
    }
    free(vals);
    free(raw);
    *out = t;
    return LEVI_OK;
fail:
    cJSON_Delete(obj);
    free(vals);
    free(raw);
    levi_table_free(t);
    return st;
}
