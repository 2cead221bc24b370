/* MovieLens-100K readers: the GroupLens folder (u.data, u.item, u.user, u.genre) and RecBole's
 * atomic files (ml-100k.inter, .user, .item), each joined into one table with one row per
 * rating and the columns user_id, age, gender, occupation, zip_code, item_id, title, genres,
 * rating, timestamp. Both layouts give the same rows in the same order (u.data order).
 *
 * Not for: the genre split, vocabularies or texts (the spec and dataset.c do that), or other
 * MovieLens sizes (1M and later use different files). */
#include "data_internal.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define ML_PATH_MAX 4096

static const char *const ML_COLUMNS[LEVI_MOVIELENS_NUM_COLUMNS] = {
    "user_id", "age",   "gender", "occupation", "zip_code",
    "item_id", "title", "genres", "rating",     "timestamp"};

static levi_status join_path(const char *dir, const char *file, char *out, levi_error *err) {
    int n = snprintf(out, ML_PATH_MAX, "%s/%s", dir, file);
    if (n < 0 || n >= ML_PATH_MAX) return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", dir);
    return LEVI_OK;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static levi_status read_headerless(const char *path, char delim, levi_encoding enc, int ncols,
                                   const char *const *names, levi_table **out, levi_error *err) {
    levi_table_read_params p = levi_table_default_read_params();
    p.delimiter = delim;
    p.quoting = 0; /* MovieLens files never quote; titles contain bare '"' */
    p.header = 0;
    p.column_names = names;
    p.num_columns = ncols;
    p.encoding = enc;
    return levi_table_read_delimited(path, &p, out, err);
}

static levi_status read_typed_header(const char *path, levi_table **out, levi_error *err) {
    levi_table_read_params p = levi_table_default_read_params();
    p.delimiter = '\t';
    p.quoting = 0;
    p.header = 1;
    p.strip_header_types = 1;
    return levi_table_read_delimited(path, &p, out, err);
}

static levi_status need_column(const levi_table *t, const char *name, int *col, levi_error *err) {
    *col = levi_table_find_column(t, name);
    if (*col >= 0) return LEVI_OK;
    char list[512];
    return levi_errorf(err, LEVI_ERR_FORMAT, "%s:1: expected a column \"%s\", found only: %s",
                       levi_table_source(t), name, levi_table_column_list(t, list, sizeof list));
}

/* "<file>:<line>: <what>: expected <expected>, found <v quoted>": the error of a bad cell. */
static levi_status cell_error(const levi_table *t, int64_t row, const char *what,
                              const char *expected, const char *v, levi_error *err) {
    char q[64];
    return levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: %s: expected %s, found %s",
                       levi_table_source(t), (long long)levi_table_line(t, row), what, expected,
                       levi__quote(v, q, sizeof q));
}

/* A positive integer id, unique within its file. */
static levi_status check_id(const levi_table *t, int64_t row, int col, const char *what,
                            levi__strmap *seen, levi_error *err) {
    const char *v = levi_table_cell(t, row, col);
    int64_t id;
    char q[64];
    if (!levi__parse_int64(v, &id) || id <= 0)
        return cell_error(t, row, what, "a positive integer", v, err);
    if (seen) {
        int64_t first = levi__strmap_put(seen, v, row);
        if (first != row)
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s:%lld: %s: expected each id once, found %s again (first on line "
                               "%lld)",
                               levi_table_source(t), (long long)levi_table_line(t, row), what,
                               levi__quote(v, q, sizeof q), (long long)levi_table_line(t, first));
    }
    return LEVI_OK;
}

static levi_status check_int(const levi_table *t, int64_t row, int col, const char *what,
                             levi_error *err) {
    const char *v = levi_table_cell(t, row, col);
    int64_t x;
    return levi__parse_int64(v, &x) ? LEVI_OK : cell_error(t, row, what, "an integer", v, err);
}

static levi_status check_number(const levi_table *t, int64_t row, int col, const char *what,
                                levi_error *err) {
    const char *v = levi_table_cell(t, row, col);
    double x;
    return levi__parse_double(v, &x) ? LEVI_OK : cell_error(t, row, what, "a number", v, err);
}

/* Per-item strings the join copies into each rating row. */
typedef struct ml_items {
    levi__strmap index; /* item id -> row of the item table */
    const char **title, **genres;
} ml_items;

/* Room for n items: an empty index and NULL-terminated title and genre arrays. */
static void ml_items_init(ml_items *it, int64_t n) {
    levi__strmap_init(&it->index, (size_t)n);
    it->title = calloc((size_t)n + 1, sizeof *it->title);
    it->genres = calloc((size_t)n + 1, sizeof *it->genres);
    LEVI_ASSERT(it->title && it->genres, "out of memory");
}

/* Frees what ml_items_init allocated (safe on a zeroed ml_items); not the strings. */
static void ml_items_free(ml_items *it) {
    free(it->title);
    free(it->genres);
    levi__strmap_free(&it->index);
}

/* The column indices of the users table and the ratings table used by the join. */
typedef struct ml_cols {
    int u_id, u_age, u_gender, u_occ, u_zip;
    int r_user, r_item, r_rating, r_time;
} ml_cols;

static levi_status check_users(const levi_table *users, const ml_cols *c, levi__strmap *index,
                               levi_error *err) {
    int64_t n = levi_table_num_rows(users);
    levi__strmap_init(index, (size_t)n);
    for (int64_t r = 0; r < n; r++) {
        levi_status st = check_id(users, r, c->u_id, "user_id", index, err);
        if (!st) st = check_int(users, r, c->u_age, "age", err);
        if (st) return st;
    }
    return LEVI_OK;
}

/* Validates the ratings and builds the joined table; on success the joined table adopts the
 * storage of ratings, users and items (so they must not be freed by the caller). */
static levi_status join(levi_table *ratings, levi_table *users, levi_table *items, const ml_cols *c,
                        const levi__strmap *user_index, ml_items *it, levi_table **out,
                        levi_error *err) {
    int64_t n = levi_table_num_rows(ratings);
    levi_table *t =
        levi_table_init(LEVI_MOVIELENS_NUM_COLUMNS, ML_COLUMNS, levi_table_source(ratings));
    levi_status st = LEVI_OK;
    char q[64];
    for (int64_t r = 0; r < n; r++) {
        int64_t line = levi_table_line(ratings, r);
        const char *src = levi_table_source(ratings);
        if ((st = check_id(ratings, r, c->r_user, "user_id", NULL, err)) ||
            (st = check_id(ratings, r, c->r_item, "item_id", NULL, err)) ||
            (st = check_number(ratings, r, c->r_rating, "rating", err)) ||
            (st = check_int(ratings, r, c->r_time, "timestamp", err)))
            goto fail;
        const char *uid = levi_table_cell(ratings, r, c->r_user);
        const char *iid = levi_table_cell(ratings, r, c->r_item);
        int64_t u = levi__strmap_get(user_index, uid);
        if (u < 0) {
            st = levi_errorf(
                err, LEVI_ERR_FORMAT, "%s:%lld: user_id: expected a user listed in %s, found %s",
                src, (long long)line, levi_table_source(users), levi__quote(uid, q, sizeof q));
            goto fail;
        }
        int64_t i = levi__strmap_get(&it->index, iid);
        if (i < 0) {
            st = levi_errorf(
                err, LEVI_ERR_FORMAT, "%s:%lld: item_id: expected an item listed in %s, found %s",
                src, (long long)line, levi_table_source(items), levi__quote(iid, q, sizeof q));
            goto fail;
        }
        const char *row[LEVI_MOVIELENS_NUM_COLUMNS] = {levi_table_cell(users, u, c->u_id),
                                                       levi_table_cell(users, u, c->u_age),
                                                       levi_table_cell(users, u, c->u_gender),
                                                       levi_table_cell(users, u, c->u_occ),
                                                       levi_table_cell(users, u, c->u_zip),
                                                       iid,
                                                       it->title[i],
                                                       it->genres[i],
                                                       levi_table_cell(ratings, r, c->r_rating),
                                                       levi_table_cell(ratings, r, c->r_time)};
        if ((st = levi__table_append_owned(t, row, line, err))) goto fail;
    }
    levi__table_adopt(t, ratings);
    levi__table_adopt(t, users);
    levi__table_adopt(t, items);
    *out = t;
    return LEVI_OK;
fail:
    levi_table_free(t);
    return st;
}

/* Joins genre names with '|'; the result lives in t. */
static const char *join_genres(levi_table *t, const char **names, int count) {
    size_t len = 0;
    for (int g = 0; g < count; g++) len += strlen(names[g]) + 1;
    char *buf = malloc(len + 1);
    LEVI_ASSERT(buf, "out of memory");
    size_t w = 0;
    buf[0] = 0;
    for (int g = 0; g < count; g++) w += (size_t)sprintf(buf + w, "%s%s", g ? "|" : "", names[g]);
    const char *s = levi__table_strdup(t, buf, w);
    free(buf);
    return s;
}

/* ---- GroupLens ---------------------------------------------------------------------------- */

levi_status levi_movielens_read_grouplens(const char *dir, levi_table **out, levi_error *err) {
    *out = NULL;
    char p_genre[ML_PATH_MAX], p_item[ML_PATH_MAX], p_user[ML_PATH_MAX], p_data[ML_PATH_MAX];
    levi_status st;
    if ((st = join_path(dir, "u.genre", p_genre, err)) ||
        (st = join_path(dir, "u.item", p_item, err)) ||
        (st = join_path(dir, "u.user", p_user, err)) ||
        (st = join_path(dir, "u.data", p_data, err)))
        return st;
    levi_table *genres = NULL, *items = NULL, *users = NULL, *ratings = NULL;
    const char **item_cols = NULL, **tmp = NULL;
    ml_items it = {0};
    levi__strmap user_index = {0};
    char q[64];

    static const char *const genre_cols[] = {"genre", "index"};
    if ((st = read_headerless(p_genre, '|', LEVI_ENCODING_UTF8, 2, genre_cols, &genres, err)))
        goto done;
    int64_t ngenres = levi_table_num_rows(genres);
    if (ngenres <= 0 || ngenres > 1000) {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s:1: expected 1 to 1000 genre lines \"name|index\", found %lld", p_genre,
                         (long long)ngenres);
        goto done;
    }
    int ng = (int)ngenres;
    for (int g = 0; g < ng; g++) {
        int64_t idx;
        const char *v = levi_table_cell(genres, g, 1);
        if (!levi__parse_int64(v, &idx) || idx != g) {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s:%lld: index: expected %d, found %s", p_genre,
                             (long long)levi_table_line(genres, g), g, levi__quote(v, q, sizeof q));
            goto done;
        }
        for (int h = 0; h < g; h++)
            if (strcmp(levi_table_cell(genres, g, 0), levi_table_cell(genres, h, 0)) == 0) {
                st = levi_errorf(err, LEVI_ERR_FORMAT,
                                 "%s:%lld: genre: expected distinct names, found %s again", p_genre,
                                 (long long)levi_table_line(genres, g),
                                 levi__quote(levi_table_cell(genres, g, 0), q, sizeof q));
                goto done;
            }
    }

    /* u.item: item_id|title|release date|video release date|IMDb URL|<one flag per genre> */
    int nic = 5 + ng;
    item_cols = calloc((size_t)nic, sizeof *item_cols);
    tmp = calloc((size_t)ng, sizeof *tmp);
    LEVI_ASSERT(item_cols && tmp, "out of memory");
    static const char *const item_fixed[] = {"item_id", "title", "release_date",
                                             "video_release_date", "imdb_url"};
    for (int k = 0; k < 5; k++) item_cols[k] = item_fixed[k];
    for (int g = 0; g < ng; g++) item_cols[5 + g] = levi_table_cell(genres, g, 0);
    if ((st = read_headerless(p_item, '|', LEVI_ENCODING_LATIN1, nic, item_cols, &items, err)))
        goto done;
    int64_t ni = levi_table_num_rows(items);
    ml_items_init(&it, ni);
    for (int64_t r = 0; r < ni; r++) {
        if ((st = check_id(items, r, 0, "item_id", &it.index, err))) goto done;
        /* A few u.item titles end in a space ("Two Friends (1986) "); trimmed so texts do not
         * read "(1986) , and" and so they match RecBole's titles. */
        const char *title = levi_table_cell(items, r, 1);
        size_t tl = strlen(title);
        while (tl > 0 && (title[tl - 1] == ' ' || title[tl - 1] == '\t')) tl--;
        it.title[r] = levi__table_strdup(items, title, tl);
        int count = 0;
        for (int g = 0; g < ng; g++) {
            const char *flag = levi_table_cell(items, r, 5 + g);
            if (strcmp(flag, "1") == 0)
                tmp[count++] = levi_table_cell(genres, g, 0);
            else if (strcmp(flag, "0") != 0) {
                st = levi_errorf(err, LEVI_ERR_FORMAT,
                                 "%s:%lld: genre flag %d (%s): expected 0 or 1, found %s", p_item,
                                 (long long)levi_table_line(items, r), g + 1,
                                 levi_table_cell(genres, g, 0), levi__quote(flag, q, sizeof q));
                goto done;
            }
        }
        it.genres[r] = join_genres(items, tmp, count);
    }

    static const char *const user_cols[] = {"user_id", "age", "gender", "occupation", "zip_code"};
    if ((st = read_headerless(p_user, '|', LEVI_ENCODING_UTF8, 5, user_cols, &users, err)))
        goto done;
    ml_cols c = {0, 1, 2, 3, 4, 0, 1, 2, 3};
    if ((st = check_users(users, &c, &user_index, err))) goto done;

    static const char *const data_cols[] = {"user_id", "item_id", "rating", "timestamp"};
    if ((st = read_headerless(p_data, '\t', LEVI_ENCODING_UTF8, 4, data_cols, &ratings, err)))
        goto done;
    st = join(ratings, users, items, &c, &user_index, &it, out, err);
    if (!st) ratings = users = items = NULL;
done:
    levi_table_free(genres);
    levi_table_free(items);
    levi_table_free(users);
    levi_table_free(ratings);
    free(item_cols);
    free(tmp);
    ml_items_free(&it);
    levi__strmap_free(&user_index);
    return st;
}

/* ---- RecBole ------------------------------------------------------------------------------ */

levi_status levi_movielens_read_recbole(const char *dir, levi_table **out, levi_error *err) {
    *out = NULL;
    char p_inter[ML_PATH_MAX], p_user[ML_PATH_MAX], p_item[ML_PATH_MAX];
    levi_status st;
    if ((st = join_path(dir, "ml-100k.inter", p_inter, err)) ||
        (st = join_path(dir, "ml-100k.user", p_user, err)) ||
        (st = join_path(dir, "ml-100k.item", p_item, err)))
        return st;
    levi_table *items = NULL, *users = NULL, *ratings = NULL;
    ml_items it = {0};
    levi__strmap user_index = {0};
    const char **tokens = NULL;
    char *scratch = NULL;
    ml_cols c;
    int i_id, i_title, i_year, i_class;

    if ((st = read_typed_header(p_item, &items, err)) ||
        (st = need_column(items, "item_id", &i_id, err)) ||
        (st = need_column(items, "movie_title", &i_title, err)) ||
        (st = need_column(items, "release_year", &i_year, err)) ||
        (st = need_column(items, "class", &i_class, err)))
        goto done;
    int64_t ni = levi_table_num_rows(items);
    ml_items_init(&it, ni);
    for (int64_t r = 0; r < ni; r++) {
        if ((st = check_id(items, r, i_id, "item_id", &it.index, err))) goto done;
        /* RecBole splits u.item's "Title (1995)" into movie_title and release_year; it is
         * rebuilt as "<title> (<year>)" when the year is four digits. Titles can differ
         * slightly from u.item: item 267 is "unkonwn" there ("unknown" in u.item) and u.item's
         * "... (1995) (V)" suffixes are gone. The genres are identical. */
        const char *title = levi_table_cell(items, r, i_title);
        const char *year = levi_table_cell(items, r, i_year);
        int has_year = strlen(year) == 4;
        for (int k = 0; has_year && k < 4; k++) has_year = year[k] >= '0' && year[k] <= '9';
        if (has_year) {
            size_t tl = strlen(title);
            scratch = malloc(tl + 8);
            LEVI_ASSERT(scratch, "out of memory");
            int n = snprintf(scratch, tl + 8, "%s (%s)", title, year);
            it.title[r] = levi__table_strdup(items, scratch, (size_t)n);
            free(scratch);
            scratch = NULL;
        } else {
            it.title[r] = title;
        }
        /* class: space-separated genre names ("Children's" has no space in it). */
        const char *cls = levi_table_cell(items, r, i_class);
        size_t cl = strlen(cls);
        scratch = malloc(cl + 1);
        tokens = calloc(cl / 2 + 2, sizeof *tokens);
        LEVI_ASSERT(scratch && tokens, "out of memory");
        memcpy(scratch, cls, cl + 1);
        int count = 0;
        for (char *save = NULL, *tok = strtok_r(scratch, " ", &save); tok;
             tok = strtok_r(NULL, " ", &save))
            tokens[count++] = tok;
        it.genres[r] = join_genres(items, tokens, count);
        free(scratch);
        free(tokens);
        scratch = NULL;
        tokens = NULL;
    }

    if ((st = read_typed_header(p_user, &users, err)) ||
        (st = need_column(users, "user_id", &c.u_id, err)) ||
        (st = need_column(users, "age", &c.u_age, err)) ||
        (st = need_column(users, "gender", &c.u_gender, err)) ||
        (st = need_column(users, "occupation", &c.u_occ, err)) ||
        (st = need_column(users, "zip_code", &c.u_zip, err)) ||
        (st = check_users(users, &c, &user_index, err)))
        goto done;

    if ((st = read_typed_header(p_inter, &ratings, err)) ||
        (st = need_column(ratings, "user_id", &c.r_user, err)) ||
        (st = need_column(ratings, "item_id", &c.r_item, err)) ||
        (st = need_column(ratings, "rating", &c.r_rating, err)) ||
        (st = need_column(ratings, "timestamp", &c.r_time, err)))
        goto done;
    st = join(ratings, users, items, &c, &user_index, &it, out, err);
    if (!st) ratings = users = items = NULL;
done:
    levi_table_free(items);
    levi_table_free(users);
    levi_table_free(ratings);
    ml_items_free(&it);
    free(scratch);
    free(tokens);
    levi__strmap_free(&user_index);
    return st;
}

levi_status levi_movielens_read(const char *dir, levi_table **out, levi_error *err) {
    char p[ML_PATH_MAX], sub[ML_PATH_MAX];
    levi_status st;
    *out = NULL;
    if ((st = join_path(dir, "u.data", p, err))) return st;
    if (file_exists(p)) return levi_movielens_read_grouplens(dir, out, err);
    if ((st = join_path(dir, "ml-100k.inter", p, err))) return st;
    if (file_exists(p)) return levi_movielens_read_recbole(dir, out, err);
    if ((st = join_path(dir, "ml-100k", sub, err)) || (st = join_path(sub, "u.data", p, err)))
        return st;
    if (file_exists(p)) return levi_movielens_read_grouplens(sub, out, err);
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return levi_errorf(err, LEVI_ERR_IO, "%s: expected a MovieLens folder, found nothing there",
                           dir);
    return levi_errorf(err, LEVI_ERR_NOT_FOUND,
                       "%s: expected MovieLens-100K files (GroupLens u.data/u.item/u.user/u.genre, "
                       "or RecBole ml-100k.inter/.user/.item, here or in ml-100k/), found none",
                       dir);
}
