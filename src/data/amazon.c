/* Amazon review reader for the Blitzer, Dredze & Pereira (ACL 2007) multi-domain sentiment
 * files: <root>/<domain>/{negative,positive}.review, read into one table with one row per
 * review (columns in levi/data.h, LEVI_AMAZON_COLUMNS). Every sub-folder of root holding
 * either file is a domain, so a new domain needs only a new folder.
 *
 * The files look like XML but are not: review texts contain raw '&' and '<', and there is no
 * root element. So this is a line-oriented parser: a tag counts only when it stands alone on
 * its line ("<rating>", "</rating>"), and everything between a field's opening and closing
 * lines is its value. Bytes are repaired into valid UTF-8 before parsing (see clean_utf8) and
 * the few entities the files use (&quot; &amp; &lt; &gt; &apos; &#N; &#xH;) are decoded in
 * values; any other '&' stays as it is.
 *
 * Not for: choosing ID/OOD rows, labels or texts (the spec and dataset.c do that), the
 * unlabeled.review files (no polarity; not read), or real XML (use an XML parser). */
#include "data_internal.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#define AMZ_PATH_MAX 4096

static const char *const AMZ_COLUMNS[LEVI_AMAZON_NUM_COLUMNS] = {
    "domain", "polarity", "unique_id", "asin",     "product_name",      "product_type", "helpful",
    "rating", "title",    "date",      "reviewer", "reviewer_location", "review_text"};
enum { COL_DOMAIN = 0, COL_POLARITY = 1, COL_FIRST_FIELD = 2, COL_RATING = 7, COL_DATE = 9 };

/* Fields a record must have (an empty value is fine except for rating). */
static const int AMZ_REQUIRED[] = {3 /* asin */, COL_RATING, COL_DATE, 12 /* review_text */};

/* Windows-1252 code points of bytes 0x80..0x9F: reviews pasted from Windows editors are the
 * likeliest source of non-UTF-8 bytes (curly quotes, dashes). 0 marks the five unassigned
 * bytes, which become U+FFFD. */
static const uint16_t CP1252_HIGH[32] = {
    0x20AC, 0,      0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
    0x2039, 0x0152, 0,      0x017D, 0,      0,      0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0,      0x017E, 0x0178};

static size_t put_cp(char *out, int32_t cp) {
    return (size_t)utf8proc_encode_char(cp, (utf8proc_uint8_t *)out);
}

/* Repairs a buffer into valid UTF-8, deterministically and without changing line numbers:
 * valid UTF-8 sequences are kept; a byte that starts no valid sequence is read as Windows-1252
 * (Latin-1 above 0x9F); C0/C1 control characters other than tab, newline and carriage return
 * (the files hold stray 0x1A bytes) become spaces; a leading byte-order mark is dropped.
 * out must hold 3 * len + 1 bytes. Returns the length written (NUL-terminated). */
static size_t clean_utf8(const char *in, size_t len, char *out) {
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)in;
    size_t i = 0, w = 0;
    if (len >= 3 && p[0] == 0xEF && p[1] == 0xBB && p[2] == 0xBF) i = 3;
    while (i < len) {
        if (p[i] < 0x80) {
            char ch = (char)p[i++];
            if ((ch < 0x20 && ch != '\t' && ch != '\n' && ch != '\r') || ch == 0x7F) ch = ' ';
            out[w++] = ch;
            continue;
        }
        utf8proc_int32_t cp;
        utf8proc_ssize_t n = utf8proc_iterate(p + i, (utf8proc_ssize_t)(len - i), &cp);
        if (n > 0) {
            if (cp >= 0x80 && cp <= 0x9F) {
                out[w++] = ' ';
            } else {
                memcpy(out + w, p + i, (size_t)n);
                w += (size_t)n;
            }
            i += (size_t)n;
            continue;
        }
        int32_t b = p[i++];
        int32_t cp1252 = b < 0xA0 ? CP1252_HIGH[b - 0x80] : b;
        w += put_cp(out + w, cp1252 ? cp1252 : 0xFFFD);
    }
    out[w] = 0;
    return w;
}

/* Decodes the entities named in the file comment in place (decoding only shrinks). A numeric
 * entity naming a control character, a surrogate or no code point is left as written. */
static void decode_entities(char *s) {
    static const struct {
        const char *name;
        char ch;
    } named[] = {{"quot;", '"'}, {"amp;", '&'}, {"lt;", '<'}, {"gt;", '>'}, {"apos;", '\''}};
    char *r = s, *w = s;
    while (*r) {
        if (*r != '&') {
            *w++ = *r++;
            continue;
        }
        int done = 0;
        for (size_t k = 0; k < sizeof named / sizeof named[0] && !done; k++) {
            size_t n = strlen(named[k].name);
            if (strncmp(r + 1, named[k].name, n) == 0) {
                *w++ = named[k].ch;
                r += 1 + n;
                done = 1;
            }
        }
        if (!done && r[1] == '#') {
            const char *q = r + 2;
            int hex = *q == 'x' || *q == 'X';
            if (hex) q++;
            int32_t cp = 0;
            int digits = 0, max_digits = hex ? 6 : 7; /* both stay below 2^31 */
            for (; digits < max_digits; q++, digits++) {
                int d = *q >= '0' && *q <= '9'          ? *q - '0'
                        : hex && *q >= 'a' && *q <= 'f' ? *q - 'a' + 10
                        : hex && *q >= 'A' && *q <= 'F' ? *q - 'A' + 10
                                                        : -1;
                if (d < 0) break;
                cp = cp * (hex ? 16 : 10) + d;
            }
            int ok = digits > 0 && *q == ';' && utf8proc_codepoint_valid(cp) && cp >= 0x20 &&
                     !(cp >= 0x7F && cp <= 0x9F);
            /* An entity's UTF-8 is at most 4 bytes and "&#N;" at least 4, so w never passes r. */
            if (ok && (size_t)(q + 1 - r) >= 4) {
                w += put_cp(w, cp);
                r = (char *)q + 1;
                done = 1;
            }
        }
        if (!done) *w++ = *r++;
    }
    *w = 0;
}

/* "July 1, 2006" (English month names, whatever the locale) -> "2006-07-01". */
static int parse_review_date(const char *s, char iso[32]) {
    static const char *const months[12] = {"January",   "February", "March",    "April",
                                           "May",       "June",     "July",     "August",
                                           "September", "October",  "November", "December"};
    int m = -1;
    size_t ml = 0;
    for (int k = 0; k < 12; k++) {
        ml = strlen(months[k]);
        if (strncmp(s, months[k], ml) == 0 && s[ml] == ' ') {
            m = k;
            break;
        }
    }
    if (m < 0) return 0;
    const char *p = s + ml + 1;
    int day = 0, nd = 0;
    while (*p >= '0' && *p <= '9' && nd < 3) day = day * 10 + (*p++ - '0'), nd++;
    if (nd == 0 || nd > 2 || p[0] != ',' || p[1] != ' ') return 0;
    p += 2;
    int year = 0, ny = 0;
    while (*p >= '0' && *p <= '9' && ny < 5) year = year * 10 + (*p++ - '0'), ny++;
    if (ny != 4 || *p) return 0;
    static const int mdays[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    int maxd = m == 1 && !leap ? 28 : mdays[m];
    if (day < 1 || day > maxd) return 0;
    snprintf(iso, 32, "%04d-%02d-%02d", year, m + 1, day);
    return 1;
}

/* A line that is exactly "<name>" or "</name>" (surrounding blanks allowed): its name into
 * name (cap bytes) and 1 for an opening tag, 2 for a closing one; 0 when it is text. */
static int tag_of(const char *line, size_t len, char *name, size_t cap) {
    while (len && (line[0] == ' ' || line[0] == '\t')) line++, len--;
    while (len && (line[len - 1] == ' ' || line[len - 1] == '\t' || line[len - 1] == '\r')) len--;
    if (len < 3 || line[0] != '<' || line[len - 1] != '>') return 0;
    int closing = line[1] == '/';
    const char *n = line + 1 + closing;
    size_t nl = len - 2 - (size_t)closing;
    if (nl == 0 || nl >= cap) return 0;
    for (size_t i = 0; i < nl; i++) {
        char ch = n[i];
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' ||
                 (i > 0 && ch >= '0' && ch <= '9');
        if (!ok) return 0;
    }
    memcpy(name, n, nl);
    name[nl] = 0;
    return closing ? 2 : 1;
}

static int column_of(const char *name) {
    for (int c = COL_FIRST_FIELD; c < LEVI_AMAZON_NUM_COLUMNS; c++)
        if (strcmp(AMZ_COLUMNS[c], name) == 0) return c;
    return -1;
}

static int blank(const char *line, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return 0;
    return 1;
}

/* The first ~48 bytes of a line, quoted, for "found ..." in messages. */
static const char *quote_line(const char *line, size_t len, char *buf, size_t cap) {
    char tmp[64];
    size_t n = len < sizeof tmp - 1 ? len : sizeof tmp - 1;
    memcpy(tmp, line, n);
    tmp[n] = 0;
    while (n && tmp[n - 1] == '\r') tmp[--n] = 0;
    if (len > n && n > 0) { /* keep the cut on a UTF-8 boundary */
        while (n > 0 && ((unsigned char)tmp[n - 1] & 0xC0) == 0x80) n--;
        if (n > 0 && (unsigned char)tmp[n - 1] >= 0xC0) n--;
        tmp[n] = 0;
    }
    return levi__quote(tmp, buf, cap);
}

/* A field's value: the lines between its tags, '\r' before '\n' dropped, surrounding blanks
 * trimmed, entities decoded; owned by t. */
static char *field_value(levi_table *t, const char *from, const char *to) {
    while (from < to && (*from == ' ' || *from == '\t' || *from == '\r' || *from == '\n')) from++;
    while (to > from && (to[-1] == ' ' || to[-1] == '\t' || to[-1] == '\r' || to[-1] == '\n')) to--;
    char *v = levi__table_strdup(t, from, (size_t)(to - from));
    char *w = v;
    for (const char *r = v; *r; r++)
        if (!(r[0] == '\r' && r[1] == '\n')) *w++ = *r;
    *w = 0;
    decode_entities(v);
    return v;
}

typedef struct record {
    const char *values[LEVI_AMAZON_NUM_COLUMNS];
    int64_t value_line[LEVI_AMAZON_NUM_COLUMNS]; /* line of each field's opening tag */
    int64_t line;                                /* line of <review> */
} record;

/* Checks a complete record and appends it. */
static levi_status finish_record(levi_table *t, const char *file, record *r, levi_error *err) {
    char q[64];
    for (size_t k = 0; k < sizeof AMZ_REQUIRED / sizeof AMZ_REQUIRED[0]; k++) {
        int c = AMZ_REQUIRED[k];
        if (!r->values[c])
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s:%lld: review: expected a <%s> field in the record, found none "
                               "before its </review>",
                               file, (long long)r->line, AMZ_COLUMNS[c]);
    }
    double rating;
    if (!levi__parse_double(r->values[COL_RATING], &rating) || rating < 1 || rating > 5)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s:%lld: rating: expected a number from 1 to 5, found %s", file,
                           (long long)r->value_line[COL_RATING] + 1,
                           levi__quote(r->values[COL_RATING], q, sizeof q));
    /* One review of the real files has an empty date: kept as "" (a date condition on such a
     * row then reports it), while a date that is there must parse. */
    if (r->values[COL_DATE][0]) {
        char iso[32];
        if (!parse_review_date(r->values[COL_DATE], iso))
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s:%lld: date: expected a date like \"July 1, 2006\", found %s",
                               file, (long long)r->value_line[COL_DATE] + 1,
                               levi__quote(r->values[COL_DATE], q, sizeof q));
        r->values[COL_DATE] = levi__table_strdup(t, iso, strlen(iso));
    }
    for (int c = 0; c < LEVI_AMAZON_NUM_COLUMNS; c++)
        if (!r->values[c]) r->values[c] = "";
    return levi__table_append_owned(t, r->values, r->line, err);
}

/* Parses one cleaned .review buffer into rows of t. */
static levi_status parse_reviews(levi_table *t, const char *file, const char *buf, size_t len,
                                 const char *domain, const char *polarity, levi_error *err) {
    enum { OUTSIDE, IN_RECORD, IN_FIELD } state = OUTSIDE;
    record r;
    int field = -1; /* column of the open field, or -1 for a field levi does not keep */
    char field_name[64] = "", name[64], q[64];
    int64_t line = 0, field_line = 0;
    const char *field_start = NULL;
    const char *p = buf, *end = buf + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *eol = nl ? nl : end;
        size_t ll = (size_t)(eol - p);
        line++;
        int tag = tag_of(p, ll, name, sizeof name);
        if (state == OUTSIDE) {
            if (tag == 1 && strcmp(name, "review") == 0) {
                memset(&r, 0, sizeof r);
                r.values[COL_DOMAIN] = domain;
                r.values[COL_POLARITY] = polarity;
                r.line = line;
                state = IN_RECORD;
            } else if (!blank(p, ll)) {
                return levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: expected <review>, found %s",
                                   file, (long long)line, quote_line(p, ll, q, sizeof q));
            }
        } else if (state == IN_RECORD) {
            if (tag == 2 && strcmp(name, "review") == 0) {
                levi_status st = finish_record(t, file, &r, err);
                if (st) return st;
                state = OUTSIDE;
            } else if (tag == 1 && strcmp(name, "review") != 0) {
                field = column_of(name);
                if (field >= 0 && r.values[field])
                    return levi_errorf(err, LEVI_ERR_FORMAT,
                                       "%s:%lld: expected each field once per review, found a "
                                       "second <%s> (the first at line %lld)",
                                       file, (long long)line, name, (long long)r.value_line[field]);
                snprintf(field_name, sizeof field_name, "%s", name);
                field_line = line;
                field_start = nl ? nl + 1 : end;
                state = IN_FIELD;
            } else if (!blank(p, ll)) {
                return levi_errorf(
                    err, LEVI_ERR_FORMAT,
                    "%s:%lld: expected a field tag such as <rating> or the </review> "
                    "closing the review at line %lld, found %s",
                    file, (long long)line, (long long)r.line, quote_line(p, ll, q, sizeof q));
            }
        } else { /* IN_FIELD */
            if (tag == 2 && strcmp(name, field_name) == 0) {
                if (field >= 0) {
                    r.values[field] = field_value(t, field_start, p);
                    r.value_line[field] = field_line;
                }
                state = IN_RECORD;
            } else if (strcmp(name, "review") == 0 && tag) {
                return levi_errorf(err, LEVI_ERR_FORMAT,
                                   "%s:%lld: expected </%s> closing the <%s> at line %lld, found "
                                   "%s",
                                   file, (long long)line, field_name, field_name,
                                   (long long)field_line, quote_line(p, ll, q, sizeof q));
            }
        }
        p = nl ? nl + 1 : end;
    }
    if (state == IN_FIELD)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s:%lld: expected </%s> closing the <%s> at line %lld, found the end "
                           "of the file",
                           file, (long long)line, field_name, field_name, (long long)field_line);
    if (state == IN_RECORD)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s:%lld: expected </review> closing the review at line %lld, found the "
                           "end of the file",
                           file, (long long)line, (long long)r.line);
    return LEVI_OK;
}

static levi_status read_review_file(levi_table *t, const char *path, const char *domain,
                                    const char *polarity, levi_error *err) {
    char *raw = NULL;
    size_t len = 0;
    levi_status st = levi_read_file(path, &raw, &len, err);
    if (st) return st;
    size_t cap;
    if (!levi_mul_size(len, 3, &cap) || cap == SIZE_MAX) {
        levi_free(raw);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: file too large (%zu bytes)", path, len);
    }
    char *clean = malloc(cap + 1);
    if (!clean) {
        levi_free(raw);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %zu bytes", path, cap + 1);
    }
    size_t n = clean_utf8(raw, len, clean);
    levi_free(raw);
    const char *file = levi__table_strdup(t, path, strlen(path));
    levi__table_set_row_source(t, file);
    st = parse_reviews(t, file, clean, n, domain, polarity, err);
    free(clean);
    return st;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

levi_status levi_amazon_read(const char *root, levi_table **out, levi_error *err) {
    *out = NULL;
    struct stat sb;
    if (stat(root, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return levi_errorf(err, LEVI_ERR_IO,
                           "%s: expected a folder of Amazon review domains "
                           "(<domain>/positive.review, <domain>/negative.review), found %s",
                           root, stat(root, &sb) != 0 ? "nothing there" : "a file");
    DIR *d = opendir(root);
    if (!d) return levi_errorf(err, LEVI_ERR_IO, "%s: cannot open the folder", root);
    char **names = NULL;
    size_t nnames = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (nnames == cap) {
            cap = cap ? cap * 2 : 16;
            char **nn = realloc(names, cap * sizeof *nn);
            LEVI_ASSERT(nn, "out of memory");
            names = nn;
        }
        names[nnames] = strdup(e->d_name);
        LEVI_ASSERT(names[nnames], "out of memory");
        nnames++;
    }
    closedir(d);
    /* Folder order is whatever the file system gives; sorting makes the row order (and so the
     * split, which shuffles row indices) the same on every machine. */
    if (nnames) qsort(names, nnames, sizeof *names, cmp_names);
    levi_table *t = levi_table_init(LEVI_AMAZON_NUM_COLUMNS, AMZ_COLUMNS, root);
    levi_status st = LEVI_OK;
    int domains = 0;
    static const char *const polarities[2] = {"negative", "positive"};
    for (size_t i = 0; i < nnames && !st; i++) {
        char dir[AMZ_PATH_MAX];
        int n = snprintf(dir, sizeof dir, "%s/%s", root, names[i]);
        if (n < 0 || (size_t)n >= sizeof dir || stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
            continue;
        size_t bad_at;
        if (!levi__utf8_valid(names[i], strlen(names[i]), &bad_at)) {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: expected domain folder names in UTF-8, found byte 0x%02X at "
                             "offset %zu of a folder name",
                             root, (unsigned char)names[i][bad_at], bad_at);
            break;
        }
        const char *domain = levi__table_strdup(t, names[i], strlen(names[i]));
        int found = 0;
        for (int k = 0; k < 2 && !st; k++) {
            char path[AMZ_PATH_MAX + 32];
            snprintf(path, sizeof path, "%s/%s.review", dir, polarities[k]);
            if (!is_file(path)) continue;
            found = 1;
            st = read_review_file(t, path, domain, polarities[k], err);
        }
        domains += found;
    }
    for (size_t i = 0; i < nnames; i++) free(names[i]);
    free(names);
    if (!st && domains == 0)
        st = levi_errorf(err, LEVI_ERR_NOT_FOUND,
                         "%s: expected domain folders holding positive.review or "
                         "negative.review, found none",
                         root);
    if (st) {
        levi_table_free(t);
        return st;
    }
    *out = t;
    return LEVI_OK;
}
