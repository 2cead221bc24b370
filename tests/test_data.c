/* Tests of levi's data layer: table readers (CSV quoting, CRLF, Latin-1, JSONL), the MovieLens
 * readers and the paper's genre split on the real data (LEVI_DATA_DIR; RecBole files through
 * LEVI_RECBOLE_DIR or LEVI_CACHE), spec validation with the exact error messages, vocabularies
 * from ID-train rows only, split sizes and determinism, masking, checksums and subsampling.
 * Fixtures are tiny hand-made files in tests/data; real data is never copied into the repo. */
#include "testutil.h"

#include "levi/data.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utf8proc.h>

/* ---- helpers ---------------------------------------------------------------------------- */

static char *fixture(const char *rel) {
    char *p = strdup(levi_test_source_path(rel));
    assert_non_null(p);
    return p;
}

static void write_file(const char *dir, const char *name, const char *data, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
}

static void write_str(const char *dir, const char *name, const char *data) {
    write_file(dir, name, data, strlen(data));
}

static void copy_file(const char *from_dir, const char *to_dir, const char *name) {
    char path[4096], *buf;
    size_t len;
    levi_error e;
    snprintf(path, sizeof path, "%s/%s", from_dir, name);
    assert_int_equal(levi_read_file(path, &buf, &len, &e), LEVI_OK);
    write_file(to_dir, name, buf, len);
    free(buf);
}

/* A fresh temporary copy of the hand-made GroupLens folder. */
static void mini_grouplens_copy(char *dir, size_t cap) {
    levi_test_tmpdir(dir, cap);
    char *src = fixture("tests/data/ml-mini");
    const char *names[] = {"u.data", "u.item", "u.user", "u.genre"};
    for (int i = 0; i < 4; i++) copy_file(src, dir, names[i]);
    free(src);
}

static void remove_dir(const char *dir) {
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static void expect_msg(levi_status st, const levi_error *e, levi_status want, const char *msg) {
    if (st != want || strcmp(e->msg, msg) != 0)
        print_error("status %d (want %d)\n  got:  %s\n  want: %s\n", (int)st, (int)want,
                    st ? e->msg : "", msg);
    assert_int_equal(st, want);
    assert_string_equal(e->msg, msg);
}

static levi_status parse_spec(const char *json, const char *base, levi_spec **s, levi_error *e) {
    return levi_spec_parse(json, strlen(json), "spec.json", base, s, e);
}

/* ---- tables ------------------------------------------------------------------------------- */

static void test_csv_quoting_and_lines(void **state) {
    (void)state;
    char *path = fixture("tests/data/shop.csv");
    levi_table *t;
    levi_error e;
    levi_table_read_params p = levi_table_default_read_params();
    assert_int_equal(levi_table_read_delimited(path, &p, &t, &e), LEVI_OK);
    assert_int_equal(levi_table_num_columns(t), 7);
    assert_int_equal(levi_table_num_rows(t), 20);
    int review = levi_table_find_column(t, "review"), date = levi_table_find_column(t, "date");
    assert_int_equal(review, 5);
    assert_string_equal(levi_table_cell(t, 0, review), "Great, really \"great\" book");
    assert_string_equal(levi_table_cell(t, 0, date), "March 3, 2005");
    assert_string_equal(levi_table_cell(t, 2, review), "Two\nlines");
    /* The quoted newline makes row 3 start on line 6, and every later row one line later. */
    assert_int_equal(levi_table_line(t, 0), 2);
    assert_int_equal(levi_table_line(t, 2), 4);
    assert_int_equal(levi_table_line(t, 3), 6);
    assert_int_equal(levi_table_line(t, 19), 22);
    assert_int_equal(levi_table_find_column(t, "nope"), -1);
    levi_table_free(t);
    free(path);

    path = fixture("tests/data/crlf.csv");
    assert_int_equal(levi_table_read_delimited(path, &p, &t, &e), LEVI_OK);
    assert_int_equal(levi_table_num_rows(t), 2);
    assert_string_equal(levi_table_cell(t, 0, 2), "books");
    assert_string_equal(levi_table_cell(t, 1, 1), "i\"2");
    assert_int_equal(levi_table_line(t, 1), 4); /* the blank line is skipped but counted */
    levi_table_free(t);
    free(path);

    /* Without quoting, quotes are ordinary characters. */
    p.quoting = 0;
    const char data[] = "a\tb\n\"x\ty\"\n";
    p.delimiter = '\t';
    assert_int_equal(levi_table_parse_delimited("mem.tsv", data, sizeof data - 1, &p, &t, &e),
                     LEVI_OK);
    assert_string_equal(levi_table_cell(t, 0, 0), "\"x");
    assert_string_equal(levi_table_cell(t, 0, 1), "y\"");
    levi_table_free(t);
}

static void test_csv_errors(void **state) {
    (void)state;
    levi_table *t = NULL;
    levi_error e;
    char want[4200];
    levi_table_read_params p = levi_table_default_read_params();

    char *path = fixture("tests/data/bad_fields.csv");
    snprintf(want, sizeof want, "%s:3: expected 3 fields, found 2", path);
    expect_msg(levi_table_read_delimited(path, &p, &t, &e), &e, LEVI_ERR_FORMAT, want);
    assert_null(t);
    free(path);

    path = fixture("tests/data/latin1.csv");
    snprintf(want, sizeof want,
             "%s:3: invalid UTF-8 (byte 0xE9 at column 9); if the file is Latin-1, declare the "
             "encoding latin-1",
             path);
    expect_msg(levi_table_read_delimited(path, &p, &t, &e), &e, LEVI_ERR_FORMAT, want);
    p.encoding = LEVI_ENCODING_LATIN1;
    assert_int_equal(levi_table_read_delimited(path, &p, &t, &e), LEVI_OK);
    assert_string_equal(levi_table_cell(t, 1, 1), "Mont\xc3\xa9limar");
    levi_table_free(t);
    p.encoding = LEVI_ENCODING_UTF8;
    free(path);

    path = fixture("tests/data/unterminated.csv");
    snprintf(want, sizeof want,
             "%s:2: expected a closing '\"' for the quoted field opened on this line, found the "
             "end of the file",
             path);
    expect_msg(levi_table_read_delimited(path, &p, &t, &e), &e, LEVI_ERR_FORMAT, want);
    free(path);

    const char junk[] = "a,b\n\"x\"y,2\n";
    expect_msg(levi_table_parse_delimited("mem.csv", junk, sizeof junk - 1, &p, &t, &e), &e,
               LEVI_ERR_FORMAT,
               "mem.csv:2: expected a delimiter or the end of the line after a closing quote, "
               "found 'y'");
    const char dup[] = "a,b,a\n1,2,3\n";
    expect_msg(levi_table_parse_delimited("mem.csv", dup, sizeof dup - 1, &p, &t, &e), &e,
               LEVI_ERR_FORMAT,
               "mem.csv:1: header fields 1 and 3: expected distinct column names, found \"a\" "
               "twice");
    const char nul[] = "a,b\n1,\0\n";
    expect_msg(levi_table_parse_delimited("mem.csv", nul, sizeof nul - 1, &p, &t, &e), &e,
               LEVI_ERR_FORMAT, "mem.csv:2: expected text, found a NUL byte at column 3");
    p.encoding = LEVI_ENCODING_LATIN1; /* Latin-1 has no invalid byte but NUL */
    expect_msg(levi_table_parse_delimited("mem.csv", nul, sizeof nul - 1, &p, &t, &e), &e,
               LEVI_ERR_FORMAT, "mem.csv:2: expected text, found a NUL byte at column 3");
    p.encoding = LEVI_ENCODING_UTF8;
    expect_msg(levi_table_read_delimited("/nonexistent/levi.csv", &p, &t, &e), &e, LEVI_ERR_IO,
               "/nonexistent/levi.csv: cannot open: No such file or directory");
}

static void test_jsonl(void **state) {
    (void)state;
    char *path = fixture("tests/data/shop.jsonl");
    levi_table *t;
    levi_error e;
    char want[4200];
    assert_int_equal(levi_table_read_jsonl(path, LEVI_ENCODING_UTF8, &t, &e), LEVI_OK);
    assert_int_equal(levi_table_num_rows(t), 2);
    assert_int_equal(levi_table_num_columns(t), 6);
    assert_string_equal(levi_table_column_name(t, 3), "tags");
    const char *row0[] = {"u1", "5", "12.5", "a|b", "", "true"};
    const char *row1[] = {"u2", "3", "0.1", "", "x", "false"};
    for (int c = 0; c < 6; c++) {
        assert_string_equal(levi_table_cell(t, 0, c), row0[c]);
        assert_string_equal(levi_table_cell(t, 1, c), row1[c]);
    }
    assert_int_equal(levi_table_line(t, 1), 3);
    levi_table_free(t);
    free(path);

    path = fixture("tests/data/bad_missing_key.jsonl");
    snprintf(
        want, sizeof want,
        "%s:2: expected key \"stars\" (the first record's keys: user, stars), found it missing",
        path);
    expect_msg(levi_table_read_jsonl(path, LEVI_ENCODING_UTF8, &t, &e), &e, LEVI_ERR_FORMAT, want);
    free(path);
}

/* ---- MovieLens fixtures ------------------------------------------------------------------- */

static void check_mini_table(const levi_table *t) {
    static const char *const cols[] = {"user_id", "age",   "gender", "occupation", "zip_code",
                                       "item_id", "title", "genres", "rating",     "timestamp"};
    assert_int_equal(levi_table_num_columns(t), LEVI_MOVIELENS_NUM_COLUMNS);
    for (int c = 0; c < LEVI_MOVIELENS_NUM_COLUMNS; c++)
        assert_string_equal(levi_table_column_name(t, c), cols[c]);
    assert_int_equal(levi_table_num_rows(t), 6);
    const char *row1[] = {"1",
                          "31",
                          "M",
                          "technician",
                          "ZZ001",
                          "2",
                          "Test Caf\xc3\xa9 Movie B, Les (1995)",
                          "Drama|Musical",
                          "3",
                          "900000002"};
    for (int c = 0; c < LEVI_MOVIELENS_NUM_COLUMNS; c++)
        assert_string_equal(levi_table_cell(t, 1, c), row1[c]);
    assert_string_equal(levi_table_cell(t, 2, 6), "Test Movie C (1986)"); /* trailing space gone */
    assert_string_equal(levi_table_cell(t, 0, 7), "Animation|Children's|Comedy");
    assert_string_equal(levi_table_cell(t, 3, 7), "Children's");
}

static void test_movielens_mini(void **state) {
    (void)state;
    levi_table *a, *b;
    levi_error e;
    char *dir = fixture("tests/data/ml-mini");
    assert_int_equal(levi_movielens_read(dir, &a, &e), LEVI_OK);
    check_mini_table(a);
    assert_int_equal(levi_table_line(a, 5), 6);
    free(dir);
    dir = fixture("tests/data/ml-mini-recbole");
    assert_int_equal(levi_movielens_read(dir, &b, &e), LEVI_OK);
    check_mini_table(b);
    assert_int_equal(levi_table_line(b, 5), 7); /* the typed header is line 1 */
    levi_table_free(a);
    levi_table_free(b);
    free(dir);
    /* A parent folder holding ml-100k/ is found too. */
    char tmp[512], sub[600];
    levi_test_tmpdir(tmp, sizeof tmp);
    snprintf(sub, sizeof sub, "%s/ml-100k", tmp);
    assert_int_equal(mkdir(sub, 0700), 0);
    char *src = fixture("tests/data/ml-mini");
    const char *names[] = {"u.data", "u.item", "u.user", "u.genre"};
    for (int i = 0; i < 4; i++) copy_file(src, sub, names[i]);
    assert_int_equal(levi_movielens_read(tmp, &a, &e), LEVI_OK);
    check_mini_table(a);
    levi_table_free(a);
    free(src);
    remove_dir(tmp);
}

static void test_movielens_errors(void **state) {
    (void)state;
    char dir[512], want[1200];
    levi_table *t = NULL;
    levi_error e;
    const char *good_data = "1\t1\t5\t900000001\n1\t2\t3\t900000002\n2\t3\t4\t900000003\n";

    mini_grouplens_copy(dir, sizeof dir);
    write_str(dir, "u.data", "1\t1\t5\t900000001\n1\t2\t3\t900000002\n2\t3\t4\n");
    snprintf(want, sizeof want, "%s/u.data:3: expected 4 fields, found 3", dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);
    assert_null(t);

    write_str(dir, "u.data", "1\t1\t5\t900000001\n1\t2\tabc\t900000002\n");
    snprintf(want, sizeof want, "%s/u.data:2: rating: expected a number, found \"abc\"", dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);

    write_str(dir, "u.data", "1\t1\t5\t900000001\nx1\t2\t3\t900000002\n");
    snprintf(want, sizeof want, "%s/u.data:2: user_id: expected a positive integer, found \"x1\"",
             dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);

    write_str(dir, "u.data", "1\t1\t5\t900000001\n1\t99\t3\t900000002\n");
    snprintf(want, sizeof want,
             "%s/u.data:2: item_id: expected an item listed in %s/u.item, found \"99\"", dir, dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);

    write_str(dir, "u.data", "1\t1\t5\t8749.5\n");
    snprintf(want, sizeof want, "%s/u.data:1: timestamp: expected an integer, found \"8749.5\"",
             dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);
    write_str(dir, "u.data", good_data);

    /* u.user is UTF-8 (ASCII in practice): a Latin-1 byte there is an error with its place. */
    write_str(dir, "u.user", "1|31|M|technician|ZZ001\n2|42|F|oth\xe9r|ZZ002\n");
    snprintf(want, sizeof want,
             "%s/u.user:2: invalid UTF-8 (byte 0xE9 at column 11); if the file is Latin-1, "
             "declare the encoding latin-1",
             dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);
    write_str(dir, "u.user", "1|31|M|technician|ZZ001\n1|42|F|other|ZZ002\n");
    snprintf(want, sizeof want,
             "%s/u.user:2: user_id: expected each id once, found \"1\" again (first on line 1)",
             dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);
    copy_file(levi_test_source_path("tests/data/ml-mini"), dir, "u.user");

    /* u.item is Latin-1: every byte decodes, but a NUL byte or a bad genre flag does not. */
    const char nul_item[] =
        "1|Tst\0Movie A (1995)|01-Jan-1995||u|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n";
    write_file(dir, "u.item", nul_item, sizeof nul_item - 1);
    snprintf(want, sizeof want, "%s/u.item:1: expected text, found a NUL byte at column 6", dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);
    write_str(dir, "u.item",
              "1|Test Movie A (1995)|01-Jan-1995||u|0|0|0|1|2|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n");
    snprintf(want, sizeof want,
             "%s/u.item:1: genre flag 5 (Children's): expected 0 or 1, found \"2\"", dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);
    write_str(dir, "u.item", "1|Test Movie A (1995)|01-Jan-1995||u|0|0|0|1\n");
    snprintf(want, sizeof want, "%s/u.item:1: expected 24 fields, found 9", dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);

    char path[600];
    snprintf(path, sizeof path, "%s/u.genre", dir);
    assert_int_equal(unlink(path), 0);
    snprintf(want, sizeof want, "%s/u.genre: cannot open: No such file or directory", dir);
    expect_msg(levi_movielens_read_grouplens(dir, &t, &e), &e, LEVI_ERR_IO, want);
    remove_dir(dir);

    expect_msg(levi_movielens_read("/nonexistent/ml", &t, &e), &e, LEVI_ERR_IO,
               "/nonexistent/ml: expected a MovieLens folder, found nothing there");

    /* RecBole: a missing typed column is named. */
    levi_test_tmpdir(dir, sizeof dir);
    char *rb = fixture("tests/data/ml-mini-recbole");
    copy_file(rb, dir, "ml-100k.user");
    copy_file(rb, dir, "ml-100k.inter");
    write_str(dir, "ml-100k.item", "item_id:token\tmovie_title:token_seq\tclass:token_seq\n");
    snprintf(want, sizeof want,
             "%s/ml-100k.item:1: expected a column \"release_year\", found only: item_id, "
             "movie_title, class",
             dir);
    expect_msg(levi_movielens_read_recbole(dir, &t, &e), &e, LEVI_ERR_FORMAT, want);
    free(rb);
    remove_dir(dir);
}

/* ---- spec and dataset on the fixture ------------------------------------------------------ */

static levi_dataset *load_shop(levi_spec **spec_out) {
    char *path = fixture("tests/data/shop.spec.json");
    levi_spec *s;
    levi_dataset *ds;
    levi_error e;
    if (levi_spec_load(path, &s, &e)) fail_msg("%s", e.msg);
    if (levi_dataset_load(s, &ds, &e)) fail_msg("%s", e.msg);
    free(path);
    if (spec_out)
        *spec_out = s;
    else
        levi_spec_free(s);
    return ds;
}

static void test_shop_dataset(void **state) {
    (void)state;
    levi_dataset *ds = load_shop(NULL);
    levi_error e;
    int64_t n;
    assert_int_equal(levi_dataset_num_rows(ds), 20);
    assert_string_equal(levi_dataset_name(ds), "shop-fixture");
    assert_int_equal(levi_dataset_task(ds), LEVI_TASK_CLASSIFICATION);
    levi_dataset_split_rows(ds, LEVI_SPLIT_TRAIN, &n);
    assert_int_equal(n, 4);
    levi_dataset_split_rows(ds, LEVI_SPLIT_VAL, &n);
    assert_int_equal(n, 2);
    levi_dataset_split_rows(ds, LEVI_SPLIT_TEST, &n);
    assert_int_equal(n, 2);
    levi_dataset_split_rows(ds, LEVI_SPLIT_OOD, &n);
    assert_int_equal(n, 11);
    const int64_t *ex = levi_dataset_split_rows(ds, LEVI_SPLIT_EXCLUDED, &n);
    assert_int_equal(n, 1);
    assert_int_equal(ex[0], 19); /* the electronics row */
    assert_int_equal(levi_dataset_check_expected(ds, &e), LEVI_OK);
    /* Groups: by_value (count descending), then the named one. */
    assert_int_equal(levi_dataset_num_groups(ds), 3);
    const char *gname[] = {"dvd", "kitchen", "books-late"};
    const int64_t gcount[] = {4, 3, 4};
    for (int g = 0; g < 3; g++) {
        assert_string_equal(levi_dataset_group_name(ds, g), gname[g]);
        levi_dataset_group_rows(ds, g, &n);
        assert_int_equal(n, gcount[g]);
    }
    const int64_t *late = levi_dataset_group_rows(ds, 2, &n);
    const int64_t want_late[] = {8, 9, 10, 11};
    for (int k = 0; k < 4; k++) assert_int_equal(late[k], want_late[k]);
    /* Classes "auto": sorted distinct labels. */
    assert_int_equal(levi_dataset_num_classes(ds), 2);
    assert_string_equal(levi_dataset_class_name(ds, 0), "neg");
    assert_string_equal(levi_dataset_class_name(ds, 1), "pos");
    assert_int_equal(levi_dataset_classes(ds)[1], 0);
    assert_int_equal(levi_dataset_classes(ds)[19], -1);
    assert_true(isnan(levi_dataset_labels(ds)[19]));
    /* Template with literal braces. */
    assert_string_equal(levi_dataset_text(ds, 0),
                        "u1 bought i1 (books) for 12.5: {review} Great, really \"great\" book");
    /* Numeric: standardised with ID-train statistics: train mean 0, population std 1. */
    const levi_numeric *price = levi_dataset_numeric(ds, 0);
    const int64_t *tr = levi_dataset_split_rows(ds, LEVI_SPLIT_TRAIN, &n);
    double m = 0, v = 0;
    for (int64_t k = 0; k < n; k++) m += price->values[tr[k]];
    m /= (double)n;
    for (int64_t k = 0; k < n; k++) v += (price->values[tr[k]] - m) * (price->values[tr[k]] - m);
    assert_true(fabs(m) < 1e-6);
    assert_true(fabs(sqrt(v / (double)n) - 1) < 1e-5);
    assert_true(fabs(price->raw[18] - 40) < 1e-12); /* kitchen row 18: "40" */
    /* Vocabularies hold ID-train values only; everything else is 0. */
    const levi_categorical *user = levi_dataset_categorical(ds, 0);
    int train_mask[20] = {0};
    for (int64_t k = 0; k < n; k++) train_mask[tr[k]] = 1;
    for (int64_t i = 0; i < 20; i++) {
        int32_t id = user->ids[i];
        assert_true(id >= 0 && id < user->cardinality);
        if (train_mask[i]) assert_true(id > 0);
    }
    for (int32_t k = 2; k < user->cardinality; k++)
        assert_true(strcmp(user->vocab[k - 1], user->vocab[k]) < 0);
    /* category (grouped with item) sees only "books" in training. */
    const levi_categorical *cat = levi_dataset_categorical(ds, 2);
    assert_int_equal(cat->cardinality, 2);
    assert_string_equal(cat->vocab[1], "books");
    assert_int_equal(cat->ids[12], 0); /* dvd */
    assert_int_equal(cat->mask_leader, 1);
    assert_true(fabs(cat->mask_prob - 0.5f) < 1e-7);
    levi_dataset_free(ds);
}

/* levi_spec_render_text (new rows at prediction time) gives the dataset's own texts, and a
 * table without a template column is an error naming the file and the column. */
static void test_render_text(void **state) {
    (void)state;
    levi_spec *s;
    levi_dataset *ds = load_shop(&s);
    levi_table *t;
    levi_error e;
    assert_int_equal(levi_spec_read_table(s, &t, &e), LEVI_OK);
    const int64_t *src = levi_dataset_source_rows(ds);
    for (int64_t i = 0; i < levi_dataset_num_rows(ds); i++) {
        char *txt = NULL;
        assert_int_equal(levi_spec_render_text(s, t, src[i], &txt, &e), LEVI_OK);
        assert_string_equal(txt, levi_dataset_text(ds, i));
        free(txt);
    }
    levi_table_free(t);
    static const char rows[] = "user,item,category\nu9,i9,books\n";
    levi_table_read_params p = levi_table_default_read_params();
    assert_int_equal(levi_table_parse_delimited("new.csv", rows, sizeof rows - 1, &p, &t, &e),
                     LEVI_OK);
    char *txt = (char *)1;
    assert_int_equal(levi_spec_render_text(s, t, 0, &txt, &e), LEVI_ERR_FORMAT);
    assert_non_null(strstr(e.msg, "new.csv:1: expected a column \"price\""));
    assert_null(txt);
    levi_table_free(t);
    levi_dataset_free(ds);
    levi_spec_free(s);
}

static void test_masking(void **state) {
    (void)state;
    levi_dataset *ds = load_shop(NULL);
    int64_t ntr;
    const int64_t *tr = levi_dataset_split_rows(ds, LEVI_SPLIT_TRAIN, &ntr);
    enum { REPS = 2000 };
    int64_t *rows = malloc(sizeof(int64_t) * REPS * (size_t)ntr);
    int32_t *ids = malloc(sizeof(int32_t) * 3 * REPS * (size_t)ntr);
    for (int r = 0; r < REPS; r++)
        for (int64_t k = 0; k < ntr; k++) rows[r * ntr + k] = tr[k];
    int64_t nrows = REPS * ntr, masked = 0;
    levi_dataset_gather_categorical(ds, rows, nrows, NULL, ids);
    for (int64_t i = 0; i < nrows; i++)
        for (int c = 0; c < 3; c++) assert_true(ids[i * 3 + c] > 0);
    levi_rng rng;
    levi_rng_seed(&rng, 1);
    levi_dataset_gather_categorical(ds, rows, nrows, &rng, ids);
    for (int64_t i = 0; i < nrows; i++) {
        assert_true(ids[i * 3 + 0] > 0);                            /* user: mask_prob 0 */
        assert_int_equal(ids[i * 3 + 1] == 0, ids[i * 3 + 2] == 0); /* masked together */
        masked += ids[i * 3 + 1] == 0;
    }
    /* 8000 Bernoulli(0.5) draws: std 0.0056, so +-0.03 is over 5 sigma. */
    double frac = (double)masked / (double)nrows;
    assert_true(fabs(frac - 0.5) < 0.03);
    free(rows);
    free(ids);
    levi_dataset_free(ds);
}

static void test_spec_errors(void **state) {
    (void)state;
    levi_spec *s = NULL;
    levi_error e;
    const char *src = "\"source\": {\"reader\": \"csv\", \"path\": \"shop.csv\"}";
    char json[2048];
#define SPEC(...) (snprintf(json, sizeof json, __VA_ARGS__), json)

    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"sentiment\", \"task\": "
                               "\"regression\"}, \"labels\": 1}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: labels: unknown key (expected one of: name, description, source, "
               "label, categorical, numeric, text, text_max_tokens, shift, split, expect, "
               "hyperparameters)");
    assert_null(s);
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"categorical\": [\"a\", \"b\", {\"column\": \"c\", "
                               "\"mask_prob\": \"x\"}]}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: categorical[2].mask_prob: expected a number in [0,1), found \"x\"");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"categorical\": [{\"column\": \"c\", \"mask_prob\": 1}]}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: categorical[0].mask_prob: expected a number in [0,1), found 1");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"categorical\": [{\"column\": \"c\", \"mask\": 0.2}]}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: categorical[0].mask: unknown key (expected one of: column, "
               "mask_prob, group_with)");
    expect_msg(
        parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": 3}}", src), NULL, &s, &e),
        &e, LEVI_ERR_FORMAT, "spec.json: label.task: expected a string, found 3");
    expect_msg(parse_spec(SPEC("{%s}", src), NULL, &s, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: label: expected an object {\"column\", \"task\"}, found nothing");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"ranking\"}}", src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: label.task: expected \"regression\" or \"classification\", found "
               "\"ranking\"");
    expect_msg(parse_spec(SPEC("{\"source\": {\"reader\": \"xml\", \"path\": \"a\"}, \"label\": "
                               "{\"column\": \"y\", \"task\": \"regression\"}}"),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: source.reader: expected \"csv\", \"tsv\", \"jsonl\", \"movielens\" or "
               "\"amazon\", "
               "found \"xml\"");
    expect_msg(parse_spec(SPEC("{\"source\": {\"reader\": \"csv\", \"path\": \"a\", \"encoding\": "
                               "\"cp1252\"}, \"label\": {\"column\": \"y\", \"task\": "
                               "\"regression\"}}"),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: source.encoding: expected \"utf-8\" or \"latin-1\", found \"cp1252\"");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"split\": {\"train\": 0.8, \"val\": 0.1, \"test\": 0.2}}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: split: expected train + val + test = 1, found 0.8 + 0.1 + 0.2 = 1.1");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"text\": \"user {user\"}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: text: expected '}' closing the '{' at offset 5, found the end of the "
               "template");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"categorical\": [\"a\", {\"column\": \"b\", \"group_with\": "
                               "\"zz\"}]}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: categorical[1].group_with: expected another categorical column that "
               "is not itself grouped, found \"zz\"");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"shift\": {\"id\": {\"column\": \"g\", \"any_of\": \"Drama\"}}}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: shift.id.any_of: expected a non-empty array of strings, found "
               "\"Drama\"");
    expect_msg(parse_spec(SPEC("{%s, \"label\": {\"column\": \"y\", \"task\": \"regression\"}, "
                               "\"shift\": {\"id\": {\"all\": [{\"column\": \"d\", \"before\": "
                               "\"July 2006\"}]}}}",
                               src),
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: shift.id.all[0].before: expected a date \"YYYY-MM-DD\" (or "
               "\"YYYY-MM-DDTHH:MM:SS\"), found \"July 2006\"");
    expect_msg(parse_spec(SPEC("{%s,\n \"label\": {\"column\": \"y\",, }}", src), NULL, &s, &e), &e,
               LEVI_ERR_FORMAT,
               "spec.json:2: expected valid JSON, found a syntax error near column 27");
    expect_msg(parse_spec("[1, 2]", NULL, &s, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: expected a JSON object at the top, found an array");
#undef SPEC
    expect_msg(levi_spec_load("/nonexistent/spec.json", &s, &e), &e, LEVI_ERR_IO,
               "/nonexistent/spec.json: cannot open: No such file or directory");
}

/* Spec errors that need the table: columns the spec names must exist. */
static void test_spec_against_table(void **state) {
    (void)state;
    char *base = fixture("tests/data"), *csv = fixture("tests/data/shop.csv"), want[4200];
    levi_spec *s;
    levi_dataset *ds = NULL;
    levi_error e;
    const char *cols = "user, item, category, date, price, review, sentiment";
    const char *head = "{\"source\": {\"reader\": \"csv\", \"path\": \"shop.csv\"}, ";
    char json[2048];

    snprintf(json, sizeof json, "%s\"label\": {\"column\": \"stars\", \"task\": \"regression\"}}",
             head);
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    snprintf(want, sizeof want,
             "spec.json: label.column: expected a column of %s/shop.csv (%s), "
             "found \"stars\"",
             base, cols);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_NOT_FOUND, want);
    assert_null(ds);
    levi_spec_free(s);

    snprintf(json, sizeof json,
             "%s\"label\": {\"column\": \"price\", \"task\": \"regression\"}, \"text\": \"item "
             "{item} by {nope}\"}",
             head);
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    snprintf(want, sizeof want,
             "spec.json: text: expected {column} names of %s/shop.csv (%s), found {nope} at "
             "offset 15",
             base, cols);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_NOT_FOUND, want);
    levi_spec_free(s);

    snprintf(json, sizeof json,
             "%s\"label\": {\"column\": \"price\", \"task\": \"regression\"}, \"shift\": {\"id\": "
             "{\"column\": \"categ\", \"any_of\": [\"books\"]}}}",
             head);
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    snprintf(want, sizeof want,
             "spec.json: shift.id.column: expected a column of %s/shop.csv (%s), found \"categ\"",
             base, cols);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_NOT_FOUND, want);
    levi_spec_free(s);

    /* A regression label that is not a number, and a date that does not parse. */
    snprintf(json, sizeof json,
             "%s\"label\": {\"column\": \"sentiment\", \"task\": "
             "\"regression\"}}",
             head);
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    snprintf(want, sizeof want, "%s:2: sentiment: expected a number, found \"pos\"", csv);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_FORMAT, want);
    levi_spec_free(s);
    snprintf(json, sizeof json,
             "%s\"label\": {\"column\": \"price\", \"task\": \"regression\"}, \"shift\": {\"id\": "
             "{\"column\": \"review\", \"date_format\": \"%%Y-%%m-%%d\", \"before\": "
             "\"2006-07-01\"}}}",
             head);
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    snprintf(want, sizeof want,
             "%s:2: review: expected a date in the format \"%%Y-%%m-%%d\" (shift.id), found "
             "\"Great, really \"great\" book\"",
             csv);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_FORMAT, want);
    levi_spec_free(s);

    /* Classification with an explicit class list that misses a label. */
    snprintf(json, sizeof json,
             "%s\"label\": {\"column\": \"sentiment\", \"task\": "
             "\"classification\", \"classes\": [\"pos\", \"mixed\"]}}",
             head);
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    snprintf(want, sizeof want,
             "%s:3: sentiment: expected one of \"pos\", \"mixed\", found \"neg\"", csv);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_FORMAT, want);
    levi_spec_free(s);

    /* A source path that does not exist names what was tried. */
    snprintf(json, sizeof json,
             "{\"source\": {\"reader\": \"csv\", \"path\": \"nope.csv\"}, "
             "\"label\": {\"column\": \"price\", \"task\": \"regression\"}}");
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    snprintf(want, sizeof want,
             "spec.json: source.path: expected an existing path, found none: \"nope.csv\" "
             "(nothing at %s/nope.csv)",
             base);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_NOT_FOUND, want);
    levi_spec_set_source_path(s, csv); /* the command-line override */
    assert_int_equal(levi_dataset_load(s, &ds, &e), LEVI_OK);
    assert_int_equal(levi_dataset_num_rows(ds), 20);
    levi_dataset_free(ds);
    levi_spec_free(s);

    /* An expect block that does not match is reported, not silently printed. */
    snprintf(json, sizeof json,
             "%s\"label\": {\"column\": \"price\", \"task\": \"regression\"}, "
             "\"expect\": {\"id_rows\": 21}}",
             head);
    assert_int_equal(parse_spec(json, base, &s, &e), LEVI_OK);
    assert_int_equal(levi_dataset_load(s, &ds, &e), LEVI_OK);
    expect_msg(levi_dataset_check_expected(ds, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: expect: 1 mismatch with the data; ID rows: expected 21, found 20");
    levi_dataset_free(ds);
    levi_spec_free(s);
    free(base);
    free(csv);
}

static void test_subsample(void **state) {
    (void)state;
    levi_dataset *ds = load_shop(NULL), *a, *b;
    levi_error e;
    assert_int_equal(levi_dataset_subsample(ds, 0.5, 0, 3, &a, &e), LEVI_OK);
    assert_int_equal(levi_dataset_subsample(ds, 0.5, 0, 3, &b, &e), LEVI_OK);
    int64_t n, want_n[] = {2, 1, 1, 6};
    for (int s = 0; s < LEVI_SPLIT_EXCLUDED; s++) {
        levi_dataset_split_rows(a, (levi_split)s, &n);
        assert_int_equal(n, want_n[s]);
    }
    assert_int_equal(levi_dataset_num_rows(a), 10);
    char ha[65], hb[65];
    levi_dataset_checksum(a, ha);
    levi_dataset_checksum(b, hb);
    assert_string_equal(ha, hb);
    for (int c = 0; c < levi_dataset_num_categorical(a); c++) {
        const levi_categorical *k = levi_dataset_categorical(a, c);
        const levi_categorical *full = levi_dataset_categorical(ds, c);
        for (int64_t i = 0; i < 10; i++) {
            assert_true(k->ids[i] >= 0 && k->ids[i] < k->cardinality);
            /* same string as the full dataset's id, or unknown */
            int64_t src = levi_dataset_source_rows(a)[i];
            if (k->ids[i] > 0)
                assert_string_equal(k->vocab[k->ids[i]], full->vocab[full->ids[src]]);
        }
        const int64_t *tr = levi_dataset_split_rows(a, LEVI_SPLIT_TRAIN, &n);
        for (int64_t j = 0; j < n; j++) assert_true(k->ids[tr[j]] > 0);
    }
    for (int64_t i = 0; i < 10; i++) {
        int64_t src = levi_dataset_source_rows(a)[i];
        assert_string_equal(levi_dataset_text(a, i), levi_dataset_text(ds, src));
        assert_int_equal(levi_dataset_split_tags(a)[i], levi_dataset_split_tags(ds)[src]);
    }
    levi_dataset_free(b);
    assert_int_equal(levi_dataset_subsample(ds, 1.0, 3, 3, &b, &e), LEVI_OK);
    assert_true(levi_dataset_num_rows(b) >= 3 && levi_dataset_num_rows(b) <= 5);
    for (int s = 0; s < LEVI_SPLIT_EXCLUDED; s++) {
        levi_dataset_split_rows(b, (levi_split)s, &n);
        assert_true(n >= 1);
    }
    levi_dataset_free(b);
    expect_msg(levi_dataset_subsample(ds, 0, 0, 3, &b, &e), &e, LEVI_ERR_ARG,
               "subsample: expected a fraction in (0,1], found 0");
    levi_dataset_free(a);
    levi_dataset_free(ds);
}

/* ---- the real MovieLens-100K ------------------------------------------------------------- */

static const char *const OOD_GENRES[12] = {"Children's", "Animation", "Musical",     "Horror",
                                           "Adventure",  "Sci-Fi",    "Documentary", "Film-Noir",
                                           "War",        "Western",   "Mystery",     "Crime"};
static const int64_t OOD_COUNTS[12] = {2742, 2059, 1908, 1686, 1556, 1438,
                                       700,  597,  588,  581,  463,  368};
static const char EXAMPLE_TEXT[] =
    "When the user id is 138, the user occupation is doctor, the user zipcode is 53211, the movie "
    "title is One Flew Over the Cuckoo's Nest (1975), and the movie id is 357, what can be the "
    "user rating on this movie?:";

/* The built-in spec with its seed replaced, reading from dir. */
static levi_spec *movielens_spec(const char *dir, int seed) {
    char *path = fixture("specs/movielens.json"), *json;
    size_t len;
    levi_error e;
    assert_int_equal(levi_read_file(path, &json, &len, &e), LEVI_OK);
    char *at = strstr(json, "\"seed\": 0");
    assert_non_null(at);
    at[8] = (char)('0' + seed);
    levi_spec *s;
    if (levi_spec_parse(json, len, path, NULL, &s, &e)) fail_msg("%s", e.msg);
    levi_spec_set_source_path(s, dir);
    free(json);
    free(path);
    return s;
}

static levi_dataset *movielens_dataset(const char *dir, int seed, double *seconds) {
    levi_spec *s = movielens_spec(dir, seed);
    levi_dataset *ds;
    levi_error e;
    double t0 = levi_now();
    if (levi_dataset_load(s, &ds, &e)) fail_msg("%s", e.msg);
    if (seconds) *seconds = levi_now() - t0;
    levi_spec_free(s);
    return ds;
}

static void check_genre_split(const levi_dataset *ds) {
    int64_t ntr, nva, nte, nood;
    levi_dataset_split_rows(ds, LEVI_SPLIT_TRAIN, &ntr);
    levi_dataset_split_rows(ds, LEVI_SPLIT_VAL, &nva);
    levi_dataset_split_rows(ds, LEVI_SPLIT_TEST, &nte);
    levi_dataset_split_rows(ds, LEVI_SPLIT_OOD, &nood);
    assert_int_equal(levi_dataset_num_rows(ds), 100000);
    assert_int_equal(ntr + nva + nte, 91142);
    assert_int_equal(nood, 8858);
    assert_int_equal(ntr, 72914); /* round(0.8 * 91142) */
    assert_int_equal(nva, 9114);
    assert_int_equal(nte, 9114);
    assert_int_equal(levi_dataset_num_groups(ds), 12);
    for (int g = 0; g < 12; g++) {
        int64_t n;
        levi_dataset_group_rows(ds, g, &n);
        assert_string_equal(levi_dataset_group_name(ds, g), OOD_GENRES[g]);
        assert_int_equal(n, OOD_COUNTS[g]);
    }
    levi_error e;
    assert_int_equal(levi_dataset_check_expected(ds, &e), LEVI_OK);
}

static const char *movielens_dir(char *buf, size_t cap) {
    const char *root = levi_test_env_path("LEVI_DATA_DIR");
    if (!root) return NULL;
    snprintf(buf, cap, "%s/ml-100k", root);
    struct stat st;
    return stat(buf, &st) == 0 ? buf : NULL;
}

static void test_movielens_real(void **state) {
    (void)state;
    char dir[4096];
    if (!movielens_dir(dir, sizeof dir)) {
        printf("SKIP test_movielens_real: LEVI_DATA_DIR is unset or has no ml-100k/ (the "
               "GroupLens MovieLens-100K folder)\n");
        skip();
    }
    double secs;
    levi_dataset *ds = movielens_dataset(dir, 0, &secs);
    printf("MovieLens-100K read + build: %.3f s\n", secs);
    assert_true(secs < 3.0); /* ~0.15 s in Release; generous for sanitizer builds */
    check_genre_split(ds);
    levi_dataset_summary(ds, stdout);

    /* The paper's example row (user 138, movie 357). */
    const levi_categorical *user = levi_dataset_categorical(ds, 0);
    const levi_categorical *item =
        levi_dataset_categorical(ds, levi_dataset_find_categorical(ds, "item_id"));
    int found = 0;
    for (int64_t i = 0; i < levi_dataset_num_rows(ds); i++)
        if (user->ids[i] > 0 && item->ids[i] > 0 && strcmp(user->vocab[user->ids[i]], "138") == 0 &&
            strcmp(item->vocab[item->ids[i]], "357") == 0) {
            assert_string_equal(levi_dataset_text(ds, i), EXAMPLE_TEXT);
            found++;
        }
    assert_int_equal(found, 1);

    /* Vocabularies: sorted, built from ID-train only; every OOD movie is unseen (id 0). */
    levi_table *t;
    levi_error e;
    assert_int_equal(levi_movielens_read(dir, &t, &e), LEVI_OK);
    const uint8_t *tags = levi_dataset_split_tags(ds);
    for (int c = 0; c < levi_dataset_num_categorical(ds); c++) {
        const levi_categorical *k = levi_dataset_categorical(ds, c);
        const char *const *cells = levi_table_column(t, levi_table_find_column(t, k->name));
        char *seen = calloc((size_t)k->cardinality, 1);
        for (int32_t v = 2; v < k->cardinality; v++)
            assert_true(strcmp(k->vocab[v - 1], k->vocab[v]) < 0);
        for (int64_t i = 0; i < levi_dataset_num_rows(ds); i++) {
            int32_t id = k->ids[i];
            if (tags[i] == LEVI_SPLIT_TRAIN) {
                assert_true(id > 0);
                seen[id] = 1;
            }
            if (id > 0) {
                assert_string_equal(k->vocab[id], cells[i]);
            } else {
                /* not in the vocabulary at all */
                const char *key = cells[i];
                int lo = 1, hi = k->cardinality - 1, hit = 0;
                while (lo <= hi) {
                    int mid = (lo + hi) / 2, cmp = strcmp(k->vocab[mid], key);
                    if (!cmp) {
                        hit = 1;
                        break;
                    }
                    if (cmp < 0)
                        lo = mid + 1;
                    else
                        hi = mid - 1;
                }
                assert_false(hit);
            }
        }
        for (int32_t v = 1; v < k->cardinality; v++) assert_true(seen[v]); /* only train values */
        free(seen);
    }
    int64_t nood;
    const int64_t *ood = levi_dataset_split_rows(ds, LEVI_SPLIT_OOD, &nood);
    for (int64_t k = 0; k < nood; k++) assert_int_equal(item->ids[ood[k]], 0);
    levi_table_free(t);

    /* Determinism by seed: same seed, same split and checksum; another seed, another split of
     * the same sizes. */
    levi_dataset *again = movielens_dataset(dir, 0, NULL), *other = movielens_dataset(dir, 1, NULL);
    char h0[65], h1[65], h2[65];
    levi_dataset_checksum(ds, h0);
    levi_dataset_checksum(again, h1);
    levi_dataset_checksum(other, h2);
    assert_string_equal(h0, h1);
    assert_string_not_equal(h0, h2);
    assert_memory_equal(levi_dataset_split_tags(ds), levi_dataset_split_tags(again), 100000);
    check_genre_split(other);
    int64_t moved = 0;
    for (int64_t i = 0; i < 100000; i++) moved += tags[i] != levi_dataset_split_tags(other)[i];
    assert_true(moved > 10000); /* ~32% of ID rows change split between two random cuts */
    printf("checksum seed 0: %s\n", h0);
    levi_dataset_free(again);
    levi_dataset_free(other);
    levi_dataset_free(ds);
}

/* RecBole's copy of the same data: same rows, counts and genres; titles rebuilt from
 * movie_title + release_year differ from u.item for exactly two movies. */
static void test_movielens_recbole(void **state) {
    (void)state;
    char rb[4096], dir[4096];
    const char *env = levi_test_env_path("LEVI_RECBOLE_DIR");
    const char *cache = getenv("LEVI_CACHE");
    if (!env && cache && *cache) {
        snprintf(rb, sizeof rb, "%s/data/ml-100k-recbole", cache);
        struct stat st;
        if (stat(rb, &st) == 0) env = rb;
    }
    if (!env) {
        printf("SKIP test_movielens_recbole: neither LEVI_RECBOLE_DIR nor "
               "$LEVI_CACHE/data/ml-100k-recbole exists\n");
        skip();
    }
    levi_dataset *ds = movielens_dataset(env, 0, NULL);
    check_genre_split(ds);
    levi_dataset_free(ds);
    if (!movielens_dir(dir, sizeof dir)) return;
    levi_table *a, *b;
    levi_error e;
    assert_int_equal(levi_movielens_read_grouplens(dir, &a, &e), LEVI_OK);
    assert_int_equal(levi_movielens_read_recbole(env, &b, &e), LEVI_OK);
    assert_int_equal(levi_table_num_rows(a), levi_table_num_rows(b));
    int title = 6, item = 5, diff_rows = 0;
    char diff_items[64] = "";
    for (int64_t i = 0; i < levi_table_num_rows(a); i++)
        for (int c = 0; c < LEVI_MOVIELENS_NUM_COLUMNS; c++) {
            if (strcmp(levi_table_cell(a, i, c), levi_table_cell(b, i, c)) == 0) continue;
            assert_int_equal(c, title);
            diff_rows++;
            const char *id = levi_table_cell(a, i, item);
            if (!strstr(diff_items, id)) {
                strcat(diff_items, id);
                strcat(diff_items, " ");
            }
        }
    printf("RecBole vs u.item: %d ratings differ in title, items %s\n", diff_rows, diff_items);
    /* Item 267: "unknown" in u.item, "unkonwn" in RecBole; item 1412: u.item's "(V)" suffix is
     * gone. */
    assert_true(strstr(diff_items, "267 ") && strstr(diff_items, "1412 "));
    assert_int_equal(strlen(diff_items), strlen("267 1412 "));
    levi_table_free(a);
    levi_table_free(b);
}

/* ---- Amazon reviews ------------------------------------------------------------------------ */

/* Whole-string UTF-8 validity (utf8proc rejects overlongs, surrogates and stray bytes). */
static int utf8_ok(const char *s) {
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    utf8proc_ssize_t len = (utf8proc_ssize_t)strlen(s), i = 0;
    while (i < len) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t n = utf8proc_iterate(p + i, len - i, &cp);
        if (n <= 0) return 0;
        i += n;
    }
    return 1;
}

/* One review in the Blitzer layout; NULL fields are left out. */
static void review(char *out, size_t cap, const char *asin, const char *rating, const char *date,
                   const char *text) {
    size_t w = (size_t)snprintf(out, cap, "<review>\n<unique_id>\n%s:x\n</unique_id>\n", asin);
    if (asin) w += (size_t)snprintf(out + w, cap - w, "<asin>\n%s\n</asin>\n", asin);
    w += (size_t)snprintf(out + w, cap - w, "<product_name>\nName of %s\n</product_name>\n", asin);
    if (rating) w += (size_t)snprintf(out + w, cap - w, "<rating>\n%s\n</rating>\n", rating);
    if (date) w += (size_t)snprintf(out + w, cap - w, "<date>\n%s\n</date>\n", date);
    w += (size_t)snprintf(out + w, cap - w, "<reviewer>\nR %s\n</reviewer>\n", asin);
    if (text) w += (size_t)snprintf(out + w, cap - w, "<review_text>\n%s\n</review_text>\n", text);
    snprintf(out + w, cap - w, "</review>\n");
}

static void make_domain(const char *root, const char *domain, char *dir, size_t cap) {
    int n = snprintf(dir, cap, "%s/%s", root, domain);
    assert_true(n > 0 && (size_t)n < cap);
    assert_int_equal(mkdir(dir, 0755), 0);
}

/* The synthetic tree: alpha/{negative,positive}.review, beta/negative.review, an empty folder
 * and a stray file (both skipped). */
static void amazon_fixture(char *root, size_t cap) {
    levi_test_tmpdir(root, cap);
    char dir[4096], a[1024], b[1024];
    make_domain(root, "beta", dir, sizeof dir);
    review(a, sizeof a, "B1", "1.0", "", "empty date");
    write_str(dir, "negative.review", a);
    make_domain(root, "alpha", dir, sizeof dir);
    /* A byte-order mark, a full record with an unknown field, entities, raw '&' and '<',
     * Windows-1252 and Latin-1 bytes, a 0x1A control byte and CRLF line ends. */
    const char pos[] =
        "\xEF\xBB\xBF\r\n<review>\r\n<unique_id>\r\nP1:t:r\r\n</unique_id>\r\n<asin>\r\n P1 \r\n"
        "</asin>\r\n<product_name>\r\nThe &quot;Best&quot; &amp; Co &#8217;s &#x41;&#1; & <b>\r\n"
        "</product_name>\r\n<product_type>\r\nbooks\r\n</product_type>\r\n<helpful>\r\n1 of 2\r\n"
        "</helpful>\r\n<rating>\r\n5.0\r\n</rating>\r\n<title>\r\nCaf\xE9 \x92yes\x92\x1A!\r\n"
        "</title>\r\n<date>\r\nFebruary 29, 2004\r\n</date>\r\n<reviewer>\r\nJo\r\n</reviewer>\r\n"
        "<reviewer_location>\r\nParis\r\n</reviewer_location>\r\n<extra>\r\nignored\r\n</extra>\r\n"
        "<review_text>\r\nFirst line <3 & more\r\n\r\n<title>\r\nlast line\r\n</review_text>\r\n"
        "</review>\r\n";
    write_file(dir, "positive.review", pos, sizeof pos - 1);
    review(a, sizeof a, "N1", "2.0", "December 31, 1999", "bad");
    review(b, sizeof b, "N2", "1", "March 5, 2006", "worse");
    char both[2048];
    snprintf(both, sizeof both, "%s\n%s", a, b);
    write_str(dir, "negative.review", both);
    make_domain(root, "empty", dir, sizeof dir);
    write_str(root, "README", "not a domain\n");
}

static void test_amazon_reader(void **state) {
    (void)state;
    char root[4096], path[4200];
    amazon_fixture(root, sizeof root);
    levi_table *t;
    levi_error e;
    assert_int_equal(levi_amazon_read(root, &t, &e), LEVI_OK);
    assert_int_equal(levi_table_num_columns(t), LEVI_AMAZON_NUM_COLUMNS);
    const char *cols[] = {"domain",       "polarity",     "unique_id", "asin",
                          "product_name", "product_type", "helpful",   "rating",
                          "title",        "date",         "reviewer",  "reviewer_location",
                          "review_text"};
    for (int c = 0; c < LEVI_AMAZON_NUM_COLUMNS; c++)
        assert_string_equal(levi_table_column_name(t, c), cols[c]);
    /* Folders in byte order, negative before positive. */
    assert_int_equal(levi_table_num_rows(t), 4);
    const char *want[4][13] = {{"alpha", "negative", "N1:x", "N1", "Name of N1", "", "", "2.0", "",
                                "1999-12-31", "R N1", "", "bad"},
                               {"alpha", "negative", "N2:x", "N2", "Name of N2", "", "", "1", "",
                                "2006-03-05", "R N2", "", "worse"},
                               {"alpha", "positive", "P1:t:r", "P1",
                                "The \"Best\" & Co \xE2\x80\x99s A&#1; & <b>", "books", "1 of 2",
                                "5.0", "Caf\xC3\xA9 \xE2\x80\x99yes\xE2\x80\x99 !", "2004-02-29",
                                "Jo", "Paris", "First line <3 & more\n\n<title>\nlast line"},
                               {"beta", "negative", "B1:x", "B1", "Name of B1", "", "", "1.0", "",
                                "", "R B1", "", "empty date"}};
    for (int64_t i = 0; i < 4; i++)
        for (int c = 0; c < LEVI_AMAZON_NUM_COLUMNS; c++) {
            if (strcmp(levi_table_cell(t, i, c), want[i][c]) != 0)
                print_error("row %lld column %s: got \"%s\"\n", (long long)i, cols[c],
                            levi_table_cell(t, i, c));
            assert_string_equal(levi_table_cell(t, i, c), want[i][c]);
        }
    /* Each row names its own file and the line of its <review>. */
    snprintf(path, sizeof path, "%s/alpha/negative.review", root);
    assert_string_equal(levi_table_row_source(t, 1), path);
    assert_int_equal(levi_table_line(t, 0), 1);
    assert_int_equal(levi_table_line(t, 1), 25); /* 23 lines per record, one blank between */
    snprintf(path, sizeof path, "%s/alpha/positive.review", root);
    assert_string_equal(levi_table_row_source(t, 2), path);
    assert_int_equal(levi_table_line(t, 2), 2);
    snprintf(path, sizeof path, "%s/beta/negative.review", root);
    assert_string_equal(levi_table_row_source(t, 3), path);
    assert_string_equal(levi_table_source(t), root);
    for (int64_t i = 0; i < 4; i++)
        for (int c = 0; c < LEVI_AMAZON_NUM_COLUMNS; c++)
            assert_true(utf8_ok(levi_table_cell(t, i, c)));
    levi_table_free(t);
    remove_dir(root);
}

/* One domain folder with one negative.review holding `body`; returns the reader's status. */
static levi_status amazon_one(const char *body, char *root, size_t cap, levi_error *e) {
    levi_test_tmpdir(root, cap);
    char dir[4096];
    make_domain(root, "d", dir, sizeof dir);
    write_str(dir, "negative.review", body);
    levi_table *t = NULL;
    levi_status st = levi_amazon_read(root, &t, e);
    assert_true(st != LEVI_OK || t != NULL);
    levi_table_free(t);
    return st;
}

static void expect_amazon_error(const char *body, int line, const char *msg) {
    char root[4096], want[4096 + 512];
    levi_error e;
    levi_status st = amazon_one(body, root, sizeof root, &e);
    snprintf(want, sizeof want, "%s/d/negative.review:%d: %s", root, line, msg);
    expect_msg(st, &e, LEVI_ERR_FORMAT, want);
    remove_dir(root);
}

static void test_amazon_errors(void **state) {
    (void)state;
    char rec[1024], body[2048];
    /* A record cut short: no </review> at the end of the file (23 lines per record). */
    review(rec, sizeof rec, "A", "4.0", "July 1, 2006", "ok");
    snprintf(body, sizeof body, "%.*s", (int)(strlen(rec) - strlen("</review>\n")), rec);
    expect_amazon_error(body, 22,
                        "expected </review> closing the review at line 1, found the end of the "
                        "file");
    /* A field without its closing tag runs into the record's end. */
    expect_amazon_error("<review>\n<asin>\nA\n</asin>\n<review_text>\nsome text\n</review>\n", 7,
                        "expected </review_text> closing the <review_text> at line 5, found "
                        "\"</review>\"");
    expect_amazon_error("<review>\n<review_text>\nsome text", 3,
                        "expected </review_text> closing the <review_text> at line 2, found the "
                        "end of the file");
    /* Missing fields. */
    review(rec, sizeof rec, "A", NULL, "July 1, 2006", "ok");
    expect_amazon_error(rec, 1,
                        "review: expected a <rating> field in the record, found none before its "
                        "</review>");
    review(rec, sizeof rec, "A", "4.0", NULL, "ok");
    expect_amazon_error(rec, 1,
                        "review: expected a <date> field in the record, found none before its "
                        "</review>");
    /* Bad values: the line is the value's own line. */
    review(rec, sizeof rec, "A", "five", "July 1, 2006", "ok");
    expect_amazon_error(rec, 12, "rating: expected a number from 1 to 5, found \"five\"");
    review(rec, sizeof rec, "A", "6.0", "July 1, 2006", "ok");
    expect_amazon_error(rec, 12, "rating: expected a number from 1 to 5, found \"6.0\"");
    review(rec, sizeof rec, "A", "", "July 1, 2006", "ok");
    expect_amazon_error(rec, 12, "rating: expected a number from 1 to 5, found \"\"");
    review(rec, sizeof rec, "A", "4.0", "Julyy 1, 2006", "ok");
    expect_amazon_error(rec, 15,
                        "date: expected a date like \"July 1, 2006\", found \"Julyy 1, 2006\"");
    review(rec, sizeof rec, "A", "4.0", "February 29, 2006", "ok");
    expect_amazon_error(rec, 15,
                        "date: expected a date like \"July 1, 2006\", found \"February 29, "
                        "2006\"");
    review(rec, sizeof rec, "A", "4.0", "2006-07-01", "ok");
    expect_amazon_error(rec, 15,
                        "date: expected a date like \"July 1, 2006\", found \"2006-07-01\"");
    /* Structure. */
    expect_amazon_error("\nstray text\n", 2, "expected <review>, found \"stray text\"");
    expect_amazon_error("<review>\nloose\n</review>\n", 2,
                        "expected a field tag such as <rating> or the </review> closing the "
                        "review at line 1, found \"loose\"");
    expect_amazon_error("<review>\n<asin>\nA\n</asin>\n<asin>\nB\n</asin>\n</review>\n", 5,
                        "expected each field once per review, found a second <asin> (the first "
                        "at line 2)");
    expect_amazon_error("<review>\n<asin>\nA\n</asin>\n<review>\n", 5,
                        "expected a field tag such as <rating> or the </review> closing the "
                        "review at line 1, found \"<review>\"");

    /* Folders: nothing there, a file, no domain. */
    levi_table *t;
    levi_error e;
    char root[4096], want[4400];
    levi_test_tmpdir(root, sizeof root);
    snprintf(want, sizeof want,
             "%s: expected domain folders holding positive.review or negative.review, found "
             "none",
             root);
    expect_msg(levi_amazon_read(root, &t, &e), &e, LEVI_ERR_NOT_FOUND, want);
    write_str(root, "f", "x");
    char file[4200];
    snprintf(file, sizeof file, "%s/f", root);
    snprintf(want, sizeof want,
             "%s: expected a folder of Amazon review domains (<domain>/positive.review, "
             "<domain>/negative.review), found a file",
             file);
    expect_msg(levi_amazon_read(file, &t, &e), &e, LEVI_ERR_IO, want);
    snprintf(file, sizeof file, "%s/nowhere", root);
    assert_int_equal(levi_amazon_read(file, &t, &e), LEVI_ERR_IO);
    assert_non_null(strstr(e.msg, "found nothing there"));
    char dir[4200];
    make_domain(root, "bad\xFF", dir, sizeof dir);
    write_str(dir, "negative.review", "");
    snprintf(want, sizeof want,
             "%s: expected domain folder names in UTF-8, found byte 0xFF at offset 3 of a folder "
             "name",
             root);
    expect_msg(levi_amazon_read(root, &t, &e), &e, LEVI_ERR_FORMAT, want);
    remove_dir(root);
}

/* The reader through a spec: date cut on the ISO column, classification of polarity,
 * OOD groups by domain, text_max_tokens, and errors that point into the right file. */
static void test_amazon_spec(void **state) {
    (void)state;
    char root[4096], json[4096];
    amazon_fixture(root, sizeof root);
    levi_spec *s;
    levi_error e;
    int n = snprintf(
        json, sizeof json,
        "{\"source\": {\"reader\": \"amazon\", \"path\": \"%s\"},"
        " \"label\": {\"column\": \"polarity\", \"task\": \"classification\","
        " \"classes\": [\"negative\", \"positive\"]},"
        " \"categorical\": [\"asin\"], \"text\": \"{review_text}\", \"text_max_tokens\": 64,"
        " \"shift\": {\"id\": {\"all\": [{\"column\": \"domain\", \"any_of\": [\"alpha\"]},"
        " {\"column\": \"date\", \"before\": \"2006-01-01\"}]},"
        " \"ood\": {\"column\": \"domain\", \"none_of\": [\"alpha\"]},"
        " \"ood_groups\": [{\"by_value\": \"domain\"}]},"
        " \"split\": {\"seed\": 0, \"train\": 1, \"val\": 0, \"test\": 0},"
        " \"expect\": {\"id_rows\": 2, \"ood_rows\": 1, \"ood_groups\": {\"beta\": 1}}}",
        root);
    assert_true(n > 0 && (size_t)n < sizeof json);
    assert_int_equal(parse_spec(json, NULL, &s, &e), LEVI_OK);
    assert_int_equal(levi_spec_text_max_tokens(s), 64);
    levi_dataset *ds;
    if (levi_dataset_load(s, &ds, &e) != LEVI_OK) print_error("%s\n", e.msg);
    assert_non_null(ds);
    assert_int_equal(levi_dataset_check_expected(ds, &e), LEVI_OK);
    const uint8_t *tags = levi_dataset_split_tags(ds);
    /* alpha 1999 and 2004 reviews are ID, alpha 2006 is excluded, beta is OOD. */
    assert_int_equal(tags[0], LEVI_SPLIT_TRAIN);
    assert_int_equal(tags[1], LEVI_SPLIT_EXCLUDED);
    assert_int_equal(tags[2], LEVI_SPLIT_TRAIN);
    assert_int_equal(tags[3], LEVI_SPLIT_OOD);
    assert_int_equal(levi_dataset_num_classes(ds), 2);
    assert_int_equal(levi_dataset_classes(ds)[0], 0);
    assert_int_equal(levi_dataset_classes(ds)[2], 1);
    assert_int_equal(levi_dataset_classes(ds)[3], 0);
    assert_string_equal(levi_dataset_text(ds, 3), "empty date");
    assert_string_equal(levi_dataset_group_name(ds, 0), "beta");
    levi_dataset_free(ds);
    levi_spec_free(s);

    /* A date test that reaches the review with an empty date names its file and line. */
    n = snprintf(json, sizeof json,
                 "{\"source\": {\"reader\": \"amazon\", \"path\": \"%s\"},"
                 " \"label\": {\"column\": \"rating\", \"task\": \"regression\"},"
                 " \"shift\": {\"id\": {\"column\": \"date\", \"before\": \"2006-01-01\"}}}",
                 root);
    assert_true(n > 0 && (size_t)n < sizeof json);
    assert_int_equal(parse_spec(json, NULL, &s, &e), LEVI_OK);
    char want[4400];
    snprintf(want, sizeof want,
             "%s/beta/negative.review:1: date: expected a date in the format \"%%Y-%%m-%%d\" "
             "(shift.id), found \"\"",
             root);
    expect_msg(levi_dataset_load(s, &ds, &e), &e, LEVI_ERR_FORMAT, want);
    levi_spec_free(s);

    /* Spec errors of the new keys. */
    const char *src = "\"source\": {\"reader\": \"amazon\", \"path\": \"x\"}, \"label\": "
                      "{\"column\": \"rating\", \"task\": \"regression\"}";
    snprintf(json, sizeof json, "{%s, \"text\": \"{title}\", \"text_max_tokens\": 1}", src);
    expect_msg(parse_spec(json, NULL, &s, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: text_max_tokens: expected an integer from 2 to 1048576, found 1");
    snprintf(json, sizeof json, "{%s, \"text\": \"{title}\", \"text_max_tokens\": 64.5}", src);
    expect_msg(parse_spec(json, NULL, &s, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: text_max_tokens: expected an integer from 2 to 1048576, found 64.5");
    snprintf(json, sizeof json, "{%s, \"text_max_tokens\": 64}", src);
    expect_msg(parse_spec(json, NULL, &s, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: text_max_tokens: expected it only with a \"text\" template, found no "
               "template");
    snprintf(json, sizeof json, "{%s, \"text\": \"{title}\"}", src);
    assert_int_equal(parse_spec(json, NULL, &s, &e), LEVI_OK);
    assert_int_equal(levi_spec_text_max_tokens(s), 0);
    assert_int_equal(levi_spec_num_hyperparameters(s), 0);
    levi_spec_free(s);

    /* Method hyperparameters: read back in order; only finite numbers pass. */
    snprintf(json, sizeof json,
             "{%s, \"hyperparameters\": {\"feature_dropout\": 0, \"other\": 2.5}}", src);
    assert_int_equal(parse_spec(json, NULL, &s, &e), LEVI_OK);
    assert_int_equal(levi_spec_num_hyperparameters(s), 2);
    double hv = -1;
    assert_string_equal(levi_spec_hyperparameter(s, 0, &hv), "feature_dropout");
    assert_true(hv == 0.0);
    assert_string_equal(levi_spec_hyperparameter(s, 1, &hv), "other");
    assert_true(hv == 2.5);
    levi_spec_free(s);
    snprintf(json, sizeof json, "{%s, \"hyperparameters\": {\"feature_dropout\": \"0\"}}", src);
    expect_msg(parse_spec(json, NULL, &s, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: hyperparameters.feature_dropout: expected a finite number, found "
               "\"0\"");
    snprintf(json, sizeof json, "{%s, \"hyperparameters\": [0.5]}", src);
    expect_msg(parse_spec(json, NULL, &s, &e), &e, LEVI_ERR_FORMAT,
               "spec.json: hyperparameters: expected an object, found an array");
    expect_msg(parse_spec("{\"source\": {\"reader\": \"amazon\", \"path\": \"x\", \"encoding\": "
                          "\"latin-1\"}, \"label\": {\"column\": \"y\", \"task\": "
                          "\"regression\"}}",
                          NULL, &s, &e),
               &e, LEVI_ERR_FORMAT,
               "spec.json: source.encoding: expected no encoding with reader \"amazon\" (the "
               "reader handles its files' encodings), found one");
    remove_dir(root);
}

/* Every prefix of a fixture file, and every single-byte change to '<', '\n' or 0xFF, reads
 * cleanly: LEVI_OK or LEVI_ERR_FORMAT with a message naming the file, never a crash (the
 * sanitizer build checks the reads). */
static void test_amazon_mutations(void **state) {
    (void)state;
    char root[4096], dir[4200], path[4300];
    amazon_fixture(root, sizeof root);
    snprintf(dir, sizeof dir, "%s/alpha", root);
    snprintf(path, sizeof path, "%s/positive.review", dir);
    char *orig;
    size_t len;
    levi_error e;
    assert_int_equal(levi_read_file(path, &orig, &len, &e), LEVI_OK);
    char *buf = malloc(len + 1);
    assert_non_null(buf);
    int ok = 0, bad = 0;
    const char subst[3] = {'<', '\n', (char)0xFF};
    for (size_t k = 0; k < len + 3 * len; k++) {
        size_t n = len;
        memcpy(buf, orig, len);
        if (k <= len)
            n = k; /* prefix */
        else
            buf[(k - len) % len] = subst[(k - len) / len % 3];
        write_file(dir, "positive.review", buf, n);
        levi_table *t = NULL;
        levi_status st = levi_amazon_read(root, &t, &e);
        if (st == LEVI_OK) {
            assert_non_null(t);
            ok++;
        } else {
            assert_int_equal(st, LEVI_ERR_FORMAT);
            assert_non_null(strstr(e.msg, "positive.review:"));
            bad++;
        }
        levi_table_free(t);
    }
    printf("Amazon mutations: %d read, %d rejected with file:line\n", ok, bad);
    assert_true(ok > 0 && bad > 0);
    free(buf);
    free(orig);
    remove_dir(root);
}

/* The real files (LEVI_DATA_DIR/amazon/blitzer_mds) and the shipped specs' counts. */
static void test_amazon_real(void **state) {
    (void)state;
    const char *data = levi_test_env_path("LEVI_DATA_DIR");
    char root[4096];
    struct stat sb;
    if (data) snprintf(root, sizeof root, "%s/amazon/blitzer_mds", data);
    if (!data || stat(root, &sb) != 0) {
        printf("SKIP test_amazon_real: LEVI_DATA_DIR is unset or has no amazon/blitzer_mds/\n");
        skip();
    }
    levi_table *t;
    levi_error e;
    double t0 = levi_now();
    assert_int_equal(levi_amazon_read(root, &t, &e), LEVI_OK);
    double secs = levi_now() - t0;
    printf("Amazon read: %lld reviews in %.3f s\n", (long long)levi_table_num_rows(t), secs);
    assert_true(secs < 5.0);
    assert_int_equal(levi_table_num_rows(t), 8000);
    int cdom = levi_table_find_column(t, "domain"), cpol = levi_table_find_column(t, "polarity");
    int crat = levi_table_find_column(t, "rating"), cdate = levi_table_find_column(t, "date");
    int64_t pos = 0, books = 0, empty_dates = 0, by_rating[6] = {0};
    for (int64_t i = 0; i < 8000; i++) {
        double r;
        r = strtod(levi_table_cell(t, i, crat), NULL);
        assert_true(r == 1 || r == 2 || r == 4 || r == 5); /* no 3s in these files */
        by_rating[(int)r]++;
        int is_pos = strcmp(levi_table_cell(t, i, cpol), "positive") == 0;
        pos += is_pos;
        assert_int_equal(is_pos, r >= 4);
        books += strcmp(levi_table_cell(t, i, cdom), "books") == 0;
        const char *d = levi_table_cell(t, i, cdate);
        if (!d[0])
            empty_dates++;
        else
            assert_true(strlen(d) == 10 && d[4] == '-' && d[7] == '-');
        for (int c = 0; c < LEVI_AMAZON_NUM_COLUMNS; c++)
            assert_true(utf8_ok(levi_table_cell(t, i, c)));
    }
    assert_int_equal(pos, 4000);
    assert_int_equal(books, 2000);
    assert_int_equal(empty_dates, 1); /* one review in electronics/negative.review */
    printf("ratings 1/2/4/5: %lld %lld %lld %lld\n", (long long)by_rating[1],
           (long long)by_rating[2], (long long)by_rating[4], (long long)by_rating[5]);
    levi_table_free(t);
    /* Each shipped spec builds and matches its expect block. */
    const char *specs[] = {"specs/amazon-rating-time.json", "specs/amazon-rating-product.json",
                           "specs/amazon-sentiment.json", "specs/amazon-sentiment-rating.json"};
    for (int k = 0; k < 4; k++) {
        levi_spec *s;
        levi_dataset *ds;
        assert_int_equal(levi_spec_load(levi_test_source_path(specs[k]), &s, &e), LEVI_OK);
        if (levi_dataset_load(s, &ds, &e) != LEVI_OK) print_error("%s\n", e.msg);
        assert_non_null(ds);
        if (levi_dataset_check_expected(ds, &e) != LEVI_OK) print_error("%s\n", e.msg);
        assert_int_equal(levi_dataset_check_expected(ds, &e), LEVI_OK);
        levi_dataset_free(ds);
        levi_spec_free(s);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_csv_quoting_and_lines),
        cmocka_unit_test(test_csv_errors),
        cmocka_unit_test(test_jsonl),
        cmocka_unit_test(test_movielens_mini),
        cmocka_unit_test(test_movielens_errors),
        cmocka_unit_test(test_shop_dataset),
        cmocka_unit_test(test_render_text),
        cmocka_unit_test(test_masking),
        cmocka_unit_test(test_spec_errors),
        cmocka_unit_test(test_spec_against_table),
        cmocka_unit_test(test_subsample),
        cmocka_unit_test(test_movielens_real),
        cmocka_unit_test(test_movielens_recbole),
        cmocka_unit_test(test_amazon_reader),
        cmocka_unit_test(test_amazon_errors),
        cmocka_unit_test(test_amazon_spec),
        cmocka_unit_test(test_amazon_mutations),
        cmocka_unit_test(test_amazon_real),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
