/* Tests of the BERT WordPiece tokenizer (include/levi/tokenizer.h).
 *
 * For: exact agreement with Hugging Face's BertTokenizerFast on every case in
 * tests/ref/tokenizer_cases.jsonl (written by tests/ref/gen_tokenizer_ref.py), batch padding
 * and masks, truncation, invalid UTF-8, bad model folders, concurrent use of one handle, and
 * a throughput figure. Not for: the model or the data layer.
 *
 * Needs LEVI_MODEL_DIR (skipped with 77 without it). LEVI_DATA_DIR is optional: the cases
 * made from MovieLens (every u.item title, 50 rating prompts from u.data/u.user/u.item rows)
 * and from Amazon reviews are stored by reference (source, sha256 of the text and of the ids),
 * since neither data set may be redistributed; the test rebuilds their texts from
 * LEVI_DATA_DIR. Without it those cases and the raw Latin-1 title check are skipped and said
 * so, and the inline cases (edge cases, synthetic titles and prompts) still run.
 */
#include "testutil.h"

#include "levi/data.h"
#include "levi/tokenizer.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <utf8proc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *g_model_dir;
static const char *g_data_dir; /* may be NULL */
static levi_tokenizer *g_tok;

#define MAX_IDS 4096

/* ---- helpers -------------------------------------------------------------------------- */

static void print_ids(const char *label, const int32_t *ids, int n) {
    printf("  %s (%d):", label, n);
    for (int i = 0; i < n; i++) {
        const char *t = levi_tokenizer_token(g_tok, ids[i]);
        printf(" %d(%s)", ids[i], t ? t : "?");
    }
    printf("\n");
}

static void ids_hash(const int32_t *ids, int n, char hex[65]) {
    char *buf = malloc((size_t)n * 12 + 1);
    size_t len = 0;
    for (int i = 0; i < n; i++) len += (size_t)sprintf(buf + len, i ? ",%d" : "%d", ids[i]);
    levi_sha256_hex(buf, len, hex);
    free(buf);
}

static int json_ids(const cJSON *arr, int32_t *out, int cap) {
    int n = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, arr) {
        assert_true(n < cap);
        out[n++] = (int32_t)v->valuedouble;
    }
    return n;
}

/* ---- texts by reference ---------------------------------------------------------------- */

/* A required member of a reference record, or a failure naming the record and the key. */
static const cJSON *jget(const cJSON *obj, const char *key, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) fail_msg("%s: reference record has no \"%s\"", name, key);
    return v;
}

static const char *jstr(const cJSON *obj, const char *key, const char *name) {
    const cJSON *v = jget(obj, key, name);
    if (!cJSON_IsString(v)) fail_msg("%s: \"%s\": expected a string", name, key);
    return v->valuestring;
}

static int jint(const cJSON *obj, const char *key, const char *name) {
    const cJSON *v = jget(obj, key, name);
    if (!cJSON_IsNumber(v)) fail_msg("%s: \"%s\": expected a number", name, key);
    return (int)v->valuedouble;
}

/* Amazon review files read once; the review text is the bytes between "<review_text>\n"
 * and the next "\n</review_text>", exactly as the generator's regular expression. */
typedef struct review_file {
    char rel[128];
    char *data;
} review_file;
static review_file g_files[16];
static int g_n_files;

static const char *review_file_data(const char *rel) {
    for (int i = 0; i < g_n_files; i++)
        if (strcmp(g_files[i].rel, rel) == 0) return g_files[i].data;
    char path[4096];
    snprintf(path, sizeof path, "%s/amazon/blitzer_mds/%s", g_data_dir, rel);
    levi_error err = {0};
    char *data = NULL;
    if (levi_read_file(path, &data, NULL, &err) != LEVI_OK) {
        printf("cannot read %s: %s\n", path, err.msg);
        return NULL;
    }
    assert_true(g_n_files < 16);
    snprintf(g_files[g_n_files].rel, sizeof g_files[0].rel, "%s", rel);
    g_files[g_n_files].data = data;
    return g_files[g_n_files++].data;
}

/* A malloc'ed copy of the first nbytes of review `idx` in rel, or NULL. */
static char *review_text(const char *rel, int idx, size_t nbytes) {
    const char *p = review_file_data(rel);
    if (!p) return NULL;
    static const char open[] = "<review_text>\n", close[] = "\n</review_text>";
    for (int k = 0;; k++) {
        p = strstr(p, open);
        if (!p) return NULL;
        const char *body = p + strlen(open);
        const char *end = strstr(body, close);
        if (!end) return NULL;
        if (k == idx) {
            if ((size_t)(end - body) < nbytes) return NULL;
            char *s = malloc(nbytes + 1);
            memcpy(s, body, nbytes);
            s[nbytes] = 0;
            return s;
        }
        p = end + strlen(close);
    }
}

/* The GroupLens MovieLens-100K files, read once through the data layer's table reader
 * (no quoting, no header; u.item Latin-1 transcoded to UTF-8, cells kept untrimmed as the
 * generator keeps them), with item and user ids mapped to their rows. */
typedef struct ml_files {
    levi_table *items, *users, *ratings;
    int64_t *item_row, *user_row; /* by id; -1: no such id */
    long max_item, max_user;
} ml_files;
static ml_files g_ml;

/* id -> row of the table's column 0, the last row winning as in the generator's dict. */
static int64_t *ml_index(const levi_table *t, const char *what, long *max_id) {
    int64_t n = levi_table_num_rows(t);
    long max = 0;
    for (int64_t r = 0; r < n; r++) {
        char *end;
        long id = strtol(levi_table_cell(t, r, 0), &end, 10);
        if (*end || id <= 0 || id > 10000000)
            fail_msg("%s line %lld: id: expected a positive integer, found \"%s\"", what,
                     (long long)levi_table_line(t, r), levi_table_cell(t, r, 0));
        if (id > max) max = id;
    }
    int64_t *row = malloc(sizeof(int64_t) * (size_t)(max + 1));
    for (long i = 0; i <= max; i++) row[i] = -1;
    for (int64_t r = 0; r < n; r++) row[strtol(levi_table_cell(t, r, 0), NULL, 10)] = r;
    *max_id = max;
    return row;
}

static void ml_load(void) {
    if (g_ml.items) return;
    static const char *const user_cols[] = {"user_id", "age", "gender", "occupation", "zip_code"};
    static const char *const data_cols[] = {"user_id", "item_id", "rating", "timestamp"};
    /* u.item: id, title, release date, video release date, URL, 19 genre flags */
    static char item_names[24][16];
    const char *item_cols[24];
    for (int i = 0; i < 24; i++) {
        snprintf(item_names[i], sizeof item_names[i], "field%d", i + 1);
        item_cols[i] = item_names[i];
    }
    struct {
        const char *file;
        char delimiter;
        levi_encoding encoding;
        const char *const *cols;
        int n_cols;
        levi_table **out;
    } files[] = {
        {"u.item", '|', LEVI_ENCODING_LATIN1, item_cols, 24, &g_ml.items},
        {"u.user", '|', LEVI_ENCODING_LATIN1, user_cols, 5, &g_ml.users},
        {"u.data", '\t', LEVI_ENCODING_UTF8, data_cols, 4, &g_ml.ratings},
    };
    for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/ml-100k/%s", g_data_dir, files[f].file);
        levi_table_read_params p = levi_table_default_read_params();
        p.delimiter = files[f].delimiter;
        p.quoting = 0;
        p.header = 0;
        p.column_names = files[f].cols;
        p.num_columns = files[f].n_cols;
        p.encoding = files[f].encoding;
        levi_error err = {0};
        if (levi_table_read_delimited(path, &p, files[f].out, &err) != LEVI_OK)
            fail_msg("MovieLens cases need the GroupLens folder LEVI_DATA_DIR/ml-100k: %s",
                     err.msg);
    }
    g_ml.item_row = ml_index(g_ml.items, "u.item", &g_ml.max_item);
    g_ml.user_row = ml_index(g_ml.users, "u.user", &g_ml.max_user);
}

static void ml_free(void) {
    levi_table_free(g_ml.items);
    levi_table_free(g_ml.users);
    levi_table_free(g_ml.ratings);
    free(g_ml.item_row);
    free(g_ml.user_row);
    memset(&g_ml, 0, sizeof g_ml);
}

static const char *ml_title(long item, const char *name) {
    if (item <= 0 || item > g_ml.max_item || g_ml.item_row[item] < 0)
        fail_msg("%s: item %ld is not in u.item", name, item);
    return levi_table_cell(g_ml.items, g_ml.item_row[item], 1);
}

/* The rating prompt for line `lineno` (from 1) of u.data, built as gen_tokenizer_ref.py's
 * TEMPLATE: user and item ids as integers, occupation and zip code from u.user, the title
 * from u.item. Malloc'ed. */
static char *ml_prompt(int lineno, const char *name) {
    const levi_table *t = g_ml.ratings;
    int64_t n = levi_table_num_rows(t), row = lineno - 1;
    if (row < 0 || row >= n || levi_table_line(t, row) != lineno)
        for (row = 0; row < n && levi_table_line(t, row) != lineno; row++) continue;
    if (row >= n) fail_msg("%s: u.data has no rating on line %d", name, lineno);
    long user = strtol(levi_table_cell(t, row, 0), NULL, 10);
    long item = strtol(levi_table_cell(t, row, 1), NULL, 10);
    if (user <= 0 || user > g_ml.max_user || g_ml.user_row[user] < 0)
        fail_msg("%s: user %ld (u.data line %d) is not in u.user", name, user, lineno);
    const char *occupation = levi_table_cell(g_ml.users, g_ml.user_row[user], 3);
    const char *zip = levi_table_cell(g_ml.users, g_ml.user_row[user], 4);
    const char *title = ml_title(item, name);
    static const char fmt[] =
        "When the user id is %ld, the user occupation is %s, the user zipcode is %s, the movie "
        "title is %s, and the movie id is %ld, what can be the user rating on this movie?:";
    size_t cap = sizeof fmt + strlen(occupation) + strlen(zip) + strlen(title) + 64;
    char *s = malloc(cap);
    snprintf(s, cap, fmt, user, occupation, zip, title, item);
    return s;
}

typedef enum ref_family { REF_AMAZON, REF_MOVIELENS } ref_family;

static ref_family ref_kind(const cJSON *src, const char *name) {
    if (cJSON_GetObjectItemCaseSensitive(src, "file")) return REF_AMAZON;
    if (cJSON_GetObjectItemCaseSensitive(src, "ml_item") ||
        cJSON_GetObjectItemCaseSensitive(src, "ml_rating_line"))
        return REF_MOVIELENS;
    fail_msg("%s: source: expected \"file\", \"ml_item\" or \"ml_rating_line\"", name);
    return REF_AMAZON;
}

/* The text a source names, rebuilt from LEVI_DATA_DIR (which must be set) and checked
 * against the hash it had when the reference was made. Malloc'ed. */
static char *ref_text(const cJSON *src, const char *want_sha256, const char *name) {
    char *s;
    if (ref_kind(src, name) == REF_AMAZON) {
        s = review_text(jstr(src, "file", name), jint(src, "review", name),
                        (size_t)jint(src, "bytes", name));
        if (!s) fail_msg("%s: review text not found under LEVI_DATA_DIR", name);
    } else {
        ml_load();
        if (cJSON_GetObjectItemCaseSensitive(src, "ml_item"))
            s = strdup(ml_title(jint(src, "ml_item", name), name));
        else
            s = ml_prompt(jint(src, "ml_rating_line", name), name);
    }
    char hex[65];
    levi_sha256_hex(s, strlen(s), hex);
    if (strcmp(hex, want_sha256) != 0)
        fail_msg("%s: the text rebuilt from LEVI_DATA_DIR differs from the one the reference "
                 "was made from (sha256 %s, expected %s): \"%s\"; regenerate the reference or "
                 "check the data files",
                 name, hex, want_sha256, s);
    return s;
}

/* ---- reference cases ------------------------------------------------------------------ */

typedef struct ref_counts {
    int single, batch, amazon, movielens, ml_titles, ml_prompts, bad;
    int amazon_skipped, movielens_skipped, batch_skipped;
} ref_counts;

static void check_single(const cJSON *c, const char *name, ref_counts *k, int32_t *got,
                         int32_t *want) {
    int max_length = jint(c, "max_length", name);
    const cJSON *src = cJSON_GetObjectItemCaseSensitive(c, "source");
    if (src) {
        ref_family fam = ref_kind(src, name);
        if (fam == REF_MOVIELENS) {
            k->ml_titles += cJSON_GetObjectItemCaseSensitive(src, "ml_item") != NULL;
            k->ml_prompts += cJSON_GetObjectItemCaseSensitive(src, "ml_rating_line") != NULL;
        }
        if (!g_data_dir) {
            if (fam == REF_AMAZON)
                k->amazon_skipped++;
            else
                k->movielens_skipped++;
            return;
        }
    }
    char *owned = src ? ref_text(src, jstr(c, "text_sha256", name), name) : NULL;
    const char *input = src ? owned : jstr(c, "text", name);
    int n = 0;
    levi_error err = {0};
    if (levi_tokenizer_encode(g_tok, input, max_length, got, &n, &err) != LEVI_OK)
        fail_msg("%s: %s", name, err.msg);
    int ok;
    if (cJSON_GetObjectItemCaseSensitive(c, "ids_sha256")) {
        char hex[65];
        ids_hash(got, n, hex);
        int n_want = jint(c, "n_ids", name);
        ok = n == n_want && strcmp(hex, jstr(c, "ids_sha256", name)) == 0;
        if (!ok && k->bad++ == 0) {
            printf("first mismatch: %s, text \"%s\" (expected %d ids with sha256 %s; rerun "
                   "gen_tokenizer_ref.py to see them)\n",
                   name, input, n_want, jstr(c, "ids_sha256", name));
            print_ids("got", got, n);
        }
    } else {
        int nw = json_ids(jget(c, "ids", name), want, MAX_IDS);
        ok = nw == n && memcmp(got, want, sizeof(int32_t) * (size_t)n) == 0;
        if (!ok && k->bad++ == 0) {
            printf("first mismatch: %s, text \"%s\"\n", name, input);
            print_ids("expected", want, nw);
            print_ids("got     ", got, n);
        }
    }
    if (src && ref_kind(src, name) == REF_AMAZON) k->amazon++;
    if (src && ref_kind(src, name) == REF_MOVIELENS) k->movielens++;
    k->single++;
    free(owned);
}

static void check_batch(const cJSON *c, const char *name, ref_counts *k, int32_t *got,
                        int32_t *want) {
    int max_length = jint(c, "max_length", name);
    const cJSON *texts = jget(c, "texts", name);
    int nt = cJSON_GetArraySize(texts);
    const char *tv[16];
    char *owned[16] = {0};
    assert_true(nt <= 16);
    for (int i = 0; i < nt; i++) {
        const cJSON *t = cJSON_GetArrayItem(texts, i);
        if (cJSON_IsString(t)) {
            tv[i] = t->valuestring;
            continue;
        }
        if (!g_data_dir) { /* a text by reference and no data: the whole batch waits */
            for (int j = 0; j < i; j++) free(owned[j]);
            k->batch_skipped++;
            return;
        }
        tv[i] = owned[i] = ref_text(t, jstr(t, "text_sha256", name), name);
    }
    int pad_to = jint(c, "pad_to", name);
    int seq_len = 0;
    int32_t *got_mask = malloc(sizeof(int32_t) * MAX_IDS);
    int32_t *want_mask = malloc(sizeof(int32_t) * MAX_IDS);
    levi_error err = {0};
    if (levi_tokenizer_encode_batch(g_tok, tv, nt, max_length, pad_to, got, got_mask, &seq_len,
                                    &err) != LEVI_OK)
        fail_msg("%s: %s", name, err.msg);
    int nw = 0, nm = 0, ok;
    const cJSON *row;
    cJSON_ArrayForEach(row, jget(c, "mask", name)) {
        nm += json_ids(row, want_mask + nm, MAX_IDS - nm);
    }
    if (cJSON_GetObjectItemCaseSensitive(c, "ids_sha256")) {
        char hex[65];
        ids_hash(got, nt * seq_len, hex);
        ok = seq_len == jint(c, "seq_len", name) && strcmp(hex, jstr(c, "ids_sha256", name)) == 0;
        nw = nt * jint(c, "seq_len", name);
    } else {
        cJSON_ArrayForEach(row, jget(c, "ids", name)) {
            nw += json_ids(row, want + nw, MAX_IDS - nw);
        }
        ok = nw == nt * seq_len && memcmp(got, want, sizeof(int32_t) * (size_t)nw) == 0;
    }
    ok = ok && nm == nw && nm == nt * seq_len &&
         memcmp(got_mask, want_mask, sizeof(int32_t) * (size_t)nm) == 0;
    if (!ok && k->bad++ == 0) {
        printf("first mismatch: %s (seq_len %d, expected %d values)\n", name, seq_len, nw);
        if (!cJSON_GetObjectItemCaseSensitive(c, "ids_sha256"))
            print_ids("expected ids ", want, nw);
        else
            printf("  expected ids: sha256 %s (rerun gen_tokenizer_ref.py to see them)\n",
                   jstr(c, "ids_sha256", name));
        print_ids("got ids      ", got, nt * seq_len);
        print_ids("expected mask", want_mask, nm);
        print_ids("got mask     ", got_mask, nt * seq_len);
    }
    for (int i = 0; i < nt; i++) free(owned[i]);
    free(got_mask);
    free(want_mask);
    k->batch++;
}

static void test_reference_cases(void **state) {
    (void)state;
    const char *path = levi_test_source_path("tests/ref/tokenizer_cases.jsonl");
    char *text = NULL;
    levi_error err = {0};
    if (levi_read_file(path, &text, NULL, &err) != LEVI_OK) fail_msg("%s", err.msg);

    ref_counts k = {0};
    int32_t *got = malloc(sizeof(int32_t) * MAX_IDS), *want = malloc(sizeof(int32_t) * MAX_IDS);
    int lineno = 0;
    for (char *line = text, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        lineno++;
        cJSON *c = cJSON_Parse(line);
        if (!c) fail_msg("%s:%d: not JSON", path, lineno);
        char where[64];
        snprintf(where, sizeof where, "line %d", lineno);
        const char *name = jstr(c, "name", where), *kind = jstr(c, "kind", name);
        if (strcmp(kind, "single") == 0)
            check_single(c, name, &k, got, want);
        else if (strcmp(kind, "batch") == 0)
            check_batch(c, name, &k, got, want);
        else
            fail_msg("%s:%d: kind: expected \"single\" or \"batch\", found \"%s\"", path, lineno,
                     kind);
        cJSON_Delete(c);
    }
    if (!g_data_dir)
        printf("SKIPPED (LEVI_DATA_DIR unset): %d MovieLens and %d Amazon cases and %d batches "
               "stored by reference (their texts are not redistributable and are rebuilt from "
               "the data); the %d inline cases still ran\n",
               k.movielens_skipped, k.amazon_skipped, k.batch_skipped, k.single + k.batch);
    printf("reference: %d single cases checked (%d MovieLens and %d Amazon by reference), %d "
           "batches, %d mismatches\n",
           k.single, k.movielens, k.amazon, k.batch, k.bad);
    free(got);
    free(want);
    free(text);
    ml_free();
    assert_int_equal(k.bad, 0);
    /* coverage of the file itself, whether or not the data is here: every title, the prompts */
    assert_int_equal(k.ml_titles, 1682);
    assert_true(k.ml_prompts >= 50);
    assert_true(k.single + k.amazon_skipped + k.movielens_skipped >= 300);
    assert_true(k.batch >= 1);
    if (g_data_dir) assert_int_equal(k.amazon_skipped + k.movielens_skipped + k.batch_skipped, 0);
}

/* Every Unicode scalar value c (but NUL) in the text "a{c}b {c}X{c}", compared per block of
 * code points with the hashes in tests/ref/tokenizer_codepoints.txt (format and rationale in
 * gen_tokenizer_ref.py): dropping, whitespace, splitting, accent stripping, case mapping. */
static void test_all_codepoints(void **state) {
    (void)state;
    const char *path = levi_test_source_path("tests/ref/tokenizer_codepoints.txt");
    char *ref = NULL;
    levi_error err = {0};
    if (levi_read_file(path, &ref, NULL, &err) != LEVI_OK) fail_msg("%s", err.msg);
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    int n_blocks = 0, n_bad = 0;
    long n_cps = 0;
    for (char *line = ref, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        if (line[0] == '#') continue;
        long first, last;
        char want[65];
        if (sscanf(line, "%ld %ld %64s", &first, &last, want) != 3)
            fail_msg("%s: bad line \"%s\"", path, line);
        len = 0;
        for (long c = first; c <= last; c++) {
            if (c == 0 || (c >= 0xD800 && c <= 0xDFFF)) continue;
            char ch[5], text[32];
            ch[utf8proc_encode_char((int32_t)c, (uint8_t *)ch)] = 0;
            snprintf(text, sizeof text, "a%sb %sX%s", ch, ch, ch);
            int32_t ids[64];
            int n = 0;
            if (levi_tokenizer_encode(g_tok, text, 256, ids, &n, &err) != LEVI_OK)
                fail_msg("U+%04lX: %s", c, err.msg);
            if (cap - len < 1024) buf = realloc(buf, cap *= 2);
            len += (size_t)sprintf(buf + len, "%ld:", c);
            for (int i = 0; i < n; i++) len += (size_t)sprintf(buf + len, i ? ",%d" : "%d", ids[i]);
            buf[len++] = '\n';
            n_cps++;
        }
        char got[65];
        levi_sha256_hex(buf, len, got);
        if (strcmp(got, want) != 0 && n_bad++ == 0)
            printf("first mismatching block: U+%04lX..U+%04lX; run gen_tokenizer_ref.py with "
                   "--codepoints-dump FILE and compare the lines of that range\n",
                   first, last);
        n_blocks++;
    }
    printf("code points: %ld in %d blocks, %d blocks differ\n", n_cps, n_blocks, n_bad);
    free(buf);
    free(ref);
    assert_int_equal(n_blocks, 0x110000 / 4096);
    assert_int_equal(n_cps, 0x110000 - 2048 - 1);
    assert_int_equal(n_bad, 0);
}

/* ---- accessors, truncation, batches --------------------------------------------------- */

static void test_accessors(void **state) {
    (void)state;
    levi_tokenizer_info info = levi_tokenizer_get_info(g_tok);
    assert_int_equal(levi_tokenizer_vocab_size(g_tok), 30522);
    assert_int_equal(info.vocab_size, 30522);
    assert_int_equal(levi_tokenizer_model_max_length(g_tok), 512);
    assert_true(info.lowercase && info.strip_accents && info.tokenize_chinese_chars);
    assert_int_equal(levi_tokenizer_pad_id(g_tok), 0);
    assert_int_equal(levi_tokenizer_unk_id(g_tok), 100);
    assert_int_equal(levi_tokenizer_cls_id(g_tok), 101);
    assert_int_equal(levi_tokenizer_sep_id(g_tok), 102);
    assert_int_equal(info.mask_id, 103);
    assert_int_equal(levi_tokenizer_token_id(g_tok, "[CLS]"), 101);
    assert_int_equal(levi_tokenizer_token_id(g_tok, "hello"), 7592);
    assert_int_equal(levi_tokenizer_token_id(g_tok, "not-a-token"), -1);
    assert_string_equal(levi_tokenizer_token(g_tok, 7592), "hello");
    assert_string_equal(levi_tokenizer_token(g_tok, 30521), "##～");
    assert_null(levi_tokenizer_token(g_tok, -1));
    assert_null(levi_tokenizer_token(g_tok, 30522));
}

static void test_truncation(void **state) {
    (void)state;
    const char *text = "the quick brown fox jumps over the unaffable lazy dog , again and again";
    int32_t full[64], part[64];
    int n_full = 0, n = 0;
    levi_error err = {0};
    assert_int_equal(levi_tokenizer_encode(g_tok, text, 64, full, &n_full, &err), LEVI_OK);
    assert_true(n_full > 10);
    for (int max_len = 2; max_len <= n_full + 2; max_len++) {
        assert_int_equal(levi_tokenizer_encode(g_tok, text, max_len, part, &n, &err), LEVI_OK);
        int expect = max_len < n_full ? max_len : n_full;
        assert_int_equal(n, expect);
        /* a prefix of the word pieces, then [SEP] */
        assert_memory_equal(part, full, sizeof(int32_t) * (size_t)(n - 1));
        assert_int_equal(part[n - 1], 102);
    }
    /* max_len <= 0: model_max_length (512) */
    char *big = malloc(700 * 5 + 1);
    for (int i = 0; i < 700; i++) memcpy(big + 5 * i, "word ", 5);
    big[700 * 5] = 0;
    int32_t *ids = malloc(sizeof(int32_t) * 512);
    assert_int_equal(levi_tokenizer_encode(g_tok, big, 0, ids, &n, &err), LEVI_OK);
    assert_int_equal(n, 512);
    assert_int_equal(ids[511], 102);
    free(ids);
    free(big);
    /* max_len 1 has no room for [CLS] [SEP] */
    n = 7;
    assert_int_equal(levi_tokenizer_encode(g_tok, text, 1, part, &n, &err), LEVI_ERR_ARG);
    assert_int_equal(n, 0);
    assert_non_null(strstr(err.msg, "max_len 1"));
}

static void test_batch_padding(void **state) {
    (void)state;
    const char *texts[] = {"hello", "", "a much longer sentence, with punctuation!",
                           "[CLS] literally"};
    enum { N = 4, MAXL = 32 };
    int32_t ids[N * MAXL], mask[N * MAXL], single[N][MAXL];
    int lens[N], seq_len = 0, longest = 0;
    levi_error err = {0};
    for (int i = 0; i < N; i++) {
        assert_int_equal(levi_tokenizer_encode(g_tok, texts[i], MAXL, single[i], &lens[i], &err),
                         LEVI_OK);
        if (lens[i] > longest) longest = lens[i];
    }
    assert_int_equal(lens[1], 2); /* "" -> [CLS] [SEP] */

    /* pad to the longest */
    memset(ids, 0x7f, sizeof ids);
    assert_int_equal(
        levi_tokenizer_encode_batch(g_tok, texts, N, MAXL, 0, ids, mask, &seq_len, &err), LEVI_OK);
    assert_int_equal(seq_len, longest);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < seq_len; j++) {
            int in = j < lens[i];
            assert_int_equal(ids[i * seq_len + j], in ? single[i][j] : 0);
            assert_int_equal(mask[i * seq_len + j], in);
        }

    /* fixed length: shorter than the longest, so row 2 is truncated to 6 with [SEP] last */
    assert_int_equal(
        levi_tokenizer_encode_batch(g_tok, texts, N, MAXL, 6, ids, mask, &seq_len, &err), LEVI_OK);
    assert_int_equal(seq_len, 6);
    assert_memory_equal(ids + 2 * 6, single[2], sizeof(int32_t) * 5);
    assert_int_equal(ids[2 * 6 + 5], 102);
    assert_int_equal(mask[1 * 6 + 2], 0);
    assert_int_equal(ids[1 * 6 + 2], 0);

    /* fixed length longer than max_len: truncated at max_len, padded to pad_to */
    int32_t wide[N * 40], wmask[N * 40];
    assert_int_equal(
        levi_tokenizer_encode_batch(g_tok, texts, N, 5, 40, wide, wmask, &seq_len, &err), LEVI_OK);
    assert_int_equal(seq_len, 40);
    assert_int_equal(wide[2 * 40 + 4], 102);
    assert_int_equal(wmask[2 * 40 + 4], 1);
    assert_int_equal(wmask[2 * 40 + 5], 0);

    /* mask is optional; n == 0 is fine */
    assert_int_equal(
        levi_tokenizer_encode_batch(g_tok, texts, N, MAXL, 0, ids, NULL, &seq_len, &err), LEVI_OK);
    assert_int_equal(seq_len, longest);
    assert_int_equal(
        levi_tokenizer_encode_batch(g_tok, texts, 0, MAXL, 0, ids, mask, &seq_len, &err), LEVI_OK);
    assert_int_equal(seq_len, 0);

    /* bad pad_to */
    assert_int_equal(
        levi_tokenizer_encode_batch(g_tok, texts, N, MAXL, 1, ids, mask, &seq_len, &err),
        LEVI_ERR_ARG);
    assert_non_null(strstr(err.msg, "pad_to 1"));
}

/* ---- invalid UTF-8 -------------------------------------------------------------------- */

static void test_invalid_utf8(void **state) {
    (void)state;
    struct {
        const char *text;
        const char *where;
    } bad[] = {
        {"Cit\xe9 des jouets", "byte offset 3 (byte 0xE9)"}, /* Latin-1 */
        {"abc\xe2\x82", "byte offset 3 (byte 0xE2)"},        /* truncated sequence */
        {"\xc0\xaf", "byte offset 0 (byte 0xC0)"},           /* overlong '/' */
        {"x\xed\xa0\x80", "byte offset 1 (byte 0xED)"},      /* UTF-16 surrogate */
        {"ok \xf8\x88\x80\x80\x80", "byte offset 3 (byte 0xF8)"},
        {"\x80", "byte offset 0 (byte 0x80)"}, /* lone continuation byte */
    };
    int32_t ids[64];
    levi_error err = {0};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int n = 5;
        assert_int_equal(levi_tokenizer_encode(g_tok, bad[i].text, 64, ids, &n, &err),
                         LEVI_ERR_FORMAT);
        assert_int_equal(n, 0);
        if (!strstr(err.msg, bad[i].where)) fail_msg("case %zu: message \"%s\"", i, err.msg);
    }
    const char *batch[] = {"fine", "Se\xf1or", "also fine"};
    int seq_len = 9;
    int32_t mask[3 * 64];
    assert_int_equal(levi_tokenizer_encode_batch(g_tok, batch, 3, 64, 0, ids, mask, &seq_len, &err),
                     LEVI_ERR_FORMAT);
    assert_int_equal(seq_len, 0);
    assert_non_null(strstr(err.msg, "text 1 of 3"));
    assert_non_null(strstr(err.msg, "byte offset 2"));

    /* The raw MovieLens titles are Latin-1: none may crash, each is either valid (ASCII) or
     * rejected with LEVI_ERR_FORMAT. */
    if (!g_data_dir) {
        printf("raw u.item check skipped: LEVI_DATA_DIR unset\n");
        return;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/ml-100k/u.item", g_data_dir);
    char *data = NULL;
    if (levi_read_file(path, &data, NULL, &err) != LEVI_OK) fail_msg("%s", err.msg);
    int n_ok = 0, n_rejected = 0;
    for (char *line = data, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        char *title = strchr(line, '|');
        if (!title) continue;
        title++;
        char *bar = strchr(title, '|');
        if (bar) *bar = 0;
        int n = 0;
        levi_status st = levi_tokenizer_encode(g_tok, title, 64, ids, &n, &err);
        assert_true(st == LEVI_OK || st == LEVI_ERR_FORMAT);
        if (st == LEVI_OK)
            n_ok++;
        else
            n_rejected++;
    }
    free(data);
    printf("raw Latin-1 u.item titles: %d encoded, %d rejected as invalid UTF-8\n", n_ok,
           n_rejected);
    assert_int_equal(n_ok + n_rejected, 1682);
    assert_true(n_rejected > 0);
}

/* ---- bad model folders and small hand-made vocabularies -------------------------------- */

static void write_text(const char *dir, const char *name, const char *content) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
}

static void remove_file(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    remove(path);
}

#define BASE_VOCAB "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"

/* Opens dir expecting failure with status st and every needle in the message. */
static void expect_open_error(const char *dir, levi_status st, const char *needle1,
                              const char *needle2) {
    levi_error err = {0};
    levi_tokenizer *t = levi_tokenizer_open(dir, &err);
    if (t) {
        levi_tokenizer_close(t);
        fail_msg("open succeeded, expected %s with \"%s\"", levi_status_name(st), needle1);
    }
    if (err.status != st || !strstr(err.msg, needle1) || (needle2 && !strstr(err.msg, needle2)))
        fail_msg("expected %s with \"%s\"/\"%s\", got %s: %s", levi_status_name(st), needle1,
                 needle2 ? needle2 : "", levi_status_name(err.status), err.msg);
}

static void test_bad_files(void **state) {
    (void)state;
    char dir[1024];
    levi_test_tmpdir(dir, sizeof dir);

    expect_open_error(dir, LEVI_ERR_IO, "vocab.txt", "cannot open");
    write_text(dir, "vocab.txt", "");
    expect_open_error(dir, LEVI_ERR_FORMAT, "vocab.txt", "empty vocabulary");
    write_text(dir, "vocab.txt", BASE_VOCAB "hello\n\nworld\n");
    expect_open_error(dir, LEVI_ERR_FORMAT, "line 7 is empty", NULL);
    write_text(dir, "vocab.txt", BASE_VOCAB "hello\nworld\nhello\n");
    expect_open_error(dir, LEVI_ERR_FORMAT, "line 8: duplicate token \"hello\"", "line 6");
    write_text(dir, "vocab.txt", "[PAD]\n[CLS]\n[SEP]\nhello\n");
    expect_open_error(dir, LEVI_ERR_FORMAT, "unk_token \"[UNK]\"", NULL);
    write_text(dir, "vocab.txt", BASE_VOCAB "caf\xe9\n");
    expect_open_error(dir, LEVI_ERR_FORMAT, "line 6: token is not valid UTF-8", NULL);

    write_text(dir, "vocab.txt", BASE_VOCAB "hello\n");
    write_text(dir, "tokenizer_config.json", "{\n  \"do_lower_case\": true,\n  \"x\": [1,\n}\n");
    expect_open_error(dir, LEVI_ERR_FORMAT, "tokenizer_config.json: line 4, column 1",
                      "not valid JSON near \"}\"");
    write_text(dir, "tokenizer_config.json", "{\"do_lower_case\": \"yes\"}");
    expect_open_error(dir, LEVI_ERR_FORMAT, "\"do_lower_case\": expected true or false",
                      "found a string");
    write_text(dir, "tokenizer_config.json", "{\"strip_accents\": 1}");
    expect_open_error(dir, LEVI_ERR_FORMAT, "\"strip_accents\"", "found a number");
    write_text(dir, "tokenizer_config.json", "{\"model_max_length\": 1}");
    expect_open_error(dir, LEVI_ERR_FORMAT, "\"model_max_length\"", NULL);
    write_text(dir, "tokenizer_config.json", "[1, 2]");
    expect_open_error(dir, LEVI_ERR_FORMAT, "expected a JSON object", NULL);
    write_text(dir, "tokenizer_config.json", "{\"unk_token\": 5}");
    expect_open_error(dir, LEVI_ERR_FORMAT, "\"unk_token\"", "found a number");

    /* the 1e30 "no limit" sentinel is clamped; AddedToken objects name special tokens */
    write_text(dir, "tokenizer_config.json",
               "{\"model_max_length\": 1000000000000000019884624838656,"
               " \"unk_token\": {\"content\": \"<unk>\", \"lstrip\": false}}");
    write_text(dir, "vocab.txt", "[PAD]\n<unk>\n[CLS]\n[SEP]\nhello\n");
    levi_error err = {0};
    levi_tokenizer *t = levi_tokenizer_open(dir, &err);
    if (!t) fail_msg("%s", err.msg);
    levi_tokenizer_info info = levi_tokenizer_get_info(t);
    assert_int_equal(info.model_max_length, 1 << 30);
    assert_int_equal(info.unk_id, 1);
    assert_int_equal(info.mask_id, -1); /* no [MASK]: fine, just not special */
    int32_t ids[16];
    int n = 0;
    assert_int_equal(levi_tokenizer_encode(t, "Hello [MASK] <unk>", 16, ids, &n, &err), LEVI_OK);
    /* hello, then '[' 'mask' ']' are unknown pieces; "<unk>" literal is the unk token */
    int32_t expect1[] = {2, 4, 1, 1, 1, 1, 3};
    assert_int_equal(n, 7);
    assert_memory_equal(ids, expect1, sizeof expect1);
    levi_tokenizer_close(t);

    /* WordPiece on a tiny vocabulary, CRLF lines, no trailing newline, case kept */
    write_text(dir, "tokenizer_config.json", "{\"do_lower_case\": false, \"strip_accents\": null}");
    write_text(dir, "vocab.txt",
               "[PAD]\r\n[UNK]\r\n[CLS]\r\n[SEP]\r\n[MASK]\r\nun\r\n##aff\r\n##able\r\nHello\r\n"
               "hello\r\n!\r\n##a\r\ncaf\xc3\xa9");
    t = levi_tokenizer_open(dir, &err);
    if (!t) fail_msg("%s", err.msg);
    info = levi_tokenizer_get_info(t);
    assert_int_equal(info.vocab_size, 13);
    assert_false(info.lowercase);
    assert_false(info.strip_accents); /* null follows do_lower_case */
    assert_int_equal(levi_tokenizer_encode(t, "unaffable Hello hello! HELLO unaffablea caf\xc3\xa9",
                                           16, ids, &n, &err),
                     LEVI_OK);
    int32_t expect2[] = {2, 5, 6, 7, 8, 9, 10, 1, 5, 6, 7, 11, 12, 3};
    assert_int_equal(n, 14);
    assert_memory_equal(ids, expect2, sizeof expect2);
    assert_int_equal(levi_tokenizer_token_id(t, "caf\xc3\xa9"), 12);
    levi_tokenizer_close(t);

    /* lower-casing without accent stripping: U+0130 becomes "i" + U+0307 (Rust's full
     * mapping) and precomposed letters stay whole; ids checked with BertTokenizerFast(vocab,
     * do_lower_case=True, strip_accents=False) on the same vocabulary */
    write_text(dir, "tokenizer_config.json", "{\"do_lower_case\": true, \"strip_accents\": false}");
    write_text(dir, "vocab.txt",
               "[PAD]\n[UNK]\n[CLS]\n[SEP]\ni\n##\xcc\x87\n##i\n##a\ncaf\xc3\xa9\n");
    t = levi_tokenizer_open(dir, &err);
    if (!t) fail_msg("%s", err.msg);
    assert_int_equal(levi_tokenizer_encode(t,
                                           "\xc4\xb0\xc4\xb0"
                                           "a caf\xc3\xa9 CAF\xc3\x89",
                                           16, ids, &n, &err),
                     LEVI_OK);
    int32_t expect3[] = {2, 4, 5, 6, 5, 7, 8, 8, 3};
    assert_int_equal(n, 9);
    assert_memory_equal(ids, expect3, sizeof expect3);
    levi_tokenizer_close(t);
    levi_tokenizer_close(NULL);

    remove_file(dir, "vocab.txt");
    remove_file(dir, "tokenizer_config.json");
    remove(dir);
}

/* ---- concurrency and throughput -------------------------------------------------------- */

/* Made-up prompts (no real MovieLens user, zip code or title) and one review-like text. */
static const char *const k_templates[] = {
    "When the user id is 90138, the user occupation is tester, the user zipcode is ZZ211, the "
    "movie title is Nobody's Film Over the Test Nest (1975), and the movie id is 7357, what can "
    "be the user rating on this movie?:",
    "When the user id is 90092, the user occupation is librarian, the user zipcode is Z5X2Q, the "
    "movie title is Cit\xc3\xa9 des jouets fictifs, La (1995), and the movie id is 8010, what "
    "can be the user rating on this movie?:",
    "When the user id is 90005, the user occupation is other, the user zipcode is ZZ013, the "
    "movie title is Test Movie A (1977), and the movie id is 5050, what can be the user rating "
    "on this movie?:",
    "This blender is great!!! I use it every day \xe2\x80\x94 smoothies, soups & sauces.",
};
#define N_TEMPLATES ((int)(sizeof k_templates / sizeof k_templates[0]))

typedef struct thread_job {
    const int32_t (*expect)[128];
    const int *expect_n;
    int mismatches;
} thread_job;

static void *thread_main(void *arg) {
    thread_job *job = arg;
    levi_error err = {0};
    int32_t ids[128];
    for (int rep = 0; rep < 2000; rep++) {
        int k = rep % N_TEMPLATES, n = 0;
        if (levi_tokenizer_encode(g_tok, k_templates[k], 128, ids, &n, &err) != LEVI_OK ||
            n != job->expect_n[k] || memcmp(ids, job->expect[k], sizeof(int32_t) * (size_t)n))
            job->mismatches++;
    }
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    int32_t expect[N_TEMPLATES][128];
    int expect_n[N_TEMPLATES];
    levi_error err = {0};
    for (int k = 0; k < N_TEMPLATES; k++)
        assert_int_equal(
            levi_tokenizer_encode(g_tok, k_templates[k], 128, expect[k], &expect_n[k], &err),
            LEVI_OK);
    enum { T = 4 };
    pthread_t th[T];
    thread_job jobs[T];
    for (int i = 0; i < T; i++) {
        jobs[i] = (thread_job){(const int32_t(*)[128])expect, expect_n, 0};
        assert_int_equal(pthread_create(&th[i], NULL, thread_main, &jobs[i]), 0);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(jobs[i].mismatches, 0);
    }
}

static void test_throughput(void **state) {
    (void)state;
    /* the 40 synthetic rating prompts of the reference file (inline, so no data needed) when
     * it is there, else the built-ins */
    const char *texts[64];
    int n_texts = 0;
    char *ref = NULL;
    levi_error err = {0};
    const char *path = levi_test_source_path("tests/ref/tokenizer_cases.jsonl");
    cJSON *parsed[64];
    int n_parsed = 0;
    if (levi_read_file(path, &ref, NULL, &err) == LEVI_OK) {
        for (char *line = ref, *next; line && *line && n_texts < 64; line = next) {
            next = strchr(line, '\n');
            if (next) *next++ = 0;
            if (!strstr(line, "\"synthetic_template:")) continue;
            cJSON *c = cJSON_Parse(line);
            parsed[n_parsed++] = c;
            texts[n_texts++] = cJSON_GetObjectItem(c, "text")->valuestring;
        }
    }
    if (n_texts == 0)
        for (int k = 0; k < N_TEMPLATES; k++) texts[n_texts++] = k_templates[k];
    int32_t ids[256];
    long total_tokens = 0, sentences = 0;
    /* CPU time as well as wall time: the wall figure is meaningless on a shared machine */
    clock_t c0 = clock();
    double t0 = levi_now(), t1 = t0;
    while (t1 - t0 < 0.5) {
        for (int k = 0; k < n_texts; k++) {
            int n = 0;
            assert_int_equal(levi_tokenizer_encode(g_tok, texts[k], 256, ids, &n, &err), LEVI_OK);
            total_tokens += n;
        }
        sentences += n_texts;
        t1 = levi_now();
    }
    double cpu = (double)(clock() - c0) / CLOCKS_PER_SEC;
    printf("throughput: %.0f sentences/s per CPU second (%.0f per wall second), %.0f tokens/s "
           "per CPU second; one thread, %d template sentences of %.1f tokens on average\n",
           sentences / cpu, sentences / (t1 - t0), total_tokens / cpu, n_texts,
           (double)total_tokens / (double)sentences);
    for (int i = 0; i < n_parsed; i++) cJSON_Delete(parsed[i]);
    free(ref);
}

int main(void) {
    g_model_dir = levi_test_require_path("LEVI_MODEL_DIR", "test_tokenizer",
                                         "the Hugging Face folder of all-MiniLM-L6-v2");
    g_data_dir = levi_test_env_path("LEVI_DATA_DIR");
    levi_error err = {0};
    g_tok = levi_tokenizer_open(g_model_dir, &err);
    if (!g_tok) {
        printf("cannot open the tokenizer: %s\n", err.msg);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accessors),      cmocka_unit_test(test_reference_cases),
        cmocka_unit_test(test_all_codepoints), cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_batch_padding),  cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_bad_files),      cmocka_unit_test(test_threads),
        cmocka_unit_test(test_throughput),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    for (int i = 0; i < g_n_files; i++) free(g_files[i].data);
    levi_tokenizer_close(g_tok);
    return rc;
}
