/* levi data: tables of UTF-8 strings read from CSV/TSV/JSONL, the MovieLens readers, the
 * dataset spec (a JSON file that describes a user's own data: source, label, categorical and
 * numeric inputs, the text template, the ID/OOD shift and the split), and the dataset built
 * from a spec and a table (vocabularies, labels, rendered texts, split tags, OOD groups).
 *
 * Everything here treats files as untrusted input: a malformed line, an unknown spec key or a
 * value of the wrong type comes back as a levi_status with a message naming the file, the line
 * (or the spec's JSON path), what was expected and what was found.
 *
 * Not for: models, tokenization, batching for a particular model, training or evaluation.
 * This layer knows nothing of models or methods; they read the dataset through the accessors
 * below (raw arrays, row indices).
 *
 * Ownership: every *_init / *_load / *_read returns an object freed with the matching *_free;
 * *_free(NULL) is a no-op. Pointers returned by accessors are owned by the object they came
 * from and live as long as it does. A levi_dataset does not keep its spec or table: both may
 * be freed as soon as levi_dataset_init returns.
 */
#ifndef LEVI_DATA_H
#define LEVI_DATA_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* =======================================================================================
 * Tables: column-oriented, every cell a NUL-terminated UTF-8 string (possibly empty), every
 * row remembering the file and line it came from so later stages can point at it. */
typedef struct levi_table levi_table;

typedef enum { LEVI_ENCODING_UTF8 = 0, LEVI_ENCODING_LATIN1 = 1 } levi_encoding;

typedef struct levi_table_read_params {
    char delimiter; /* ',' by default; '\t', '|', ';' ... */
    int quoting;    /* 1 (default): RFC 4180 double quotes ("" inside = one quote; fields may
                       span lines). 0: no quoting, '"' is an ordinary character (TSV files
                       such as MovieLens' have unescaped quotes in titles). */
    int header;     /* 1 (default): the first record names the columns */
    /* Column names when header == 0 (required then), num_columns of them. */
    const char *const *column_names;
    int num_columns;
    levi_encoding encoding; /* UTF-8 (validated) or Latin-1 (transcoded to UTF-8) */
    /* 1: header names are cut at the first ':' ("user_id:token" -> "user_id"), as in
     * RecBole atomic files. */
    int strip_header_types;
} levi_table_read_params;

levi_table_read_params levi_table_default_read_params(void);

/* Reads a delimiter-separated file. Blank lines are skipped; "\r\n" line ends are accepted;
 * a leading UTF-8 byte-order mark is ignored. Errors (LEVI_ERR_FORMAT unless noted):
 *   "<file>:<line>: expected N fields, found M"
 *   "<file>:<line>: invalid UTF-8 (byte 0xE9 at column 12); if the file is Latin-1, declare
 *    the encoding latin-1"
 *   "<file>:<line>: unterminated quoted field", duplicate or empty header names,
 *   LEVI_ERR_IO "<file>: cannot open: <reason>". */
levi_status levi_table_read_delimited(const char *path, const levi_table_read_params *params,
                                      levi_table **out, levi_error *err);
/* The same parser over a buffer (copied); `name` stands for the file in messages. */
levi_status levi_table_parse_delimited(const char *name, const char *data, size_t len,
                                       const levi_table_read_params *params, levi_table **out,
                                       levi_error *err);
/* Reads JSON Lines: one object per non-blank line. The first object's keys, in order, are
 * the columns; every later object must have exactly those keys. Values: strings as they are,
 * numbers in their shortest round-trip form (3, 3.5), true/false, null -> "", an array of
 * scalars -> its elements joined with '|'. Objects as values are rejected. */
levi_status levi_table_read_jsonl(const char *path, levi_encoding encoding, levi_table **out,
                                  levi_error *err);

/* An empty table with these column names (copied), for building tables in code. `source`
 * names the origin in messages (may be NULL). */
levi_table *levi_table_init(int num_columns, const char *const *names, const char *source);
void levi_table_free(levi_table *t);
/* Appends one row; the values are copied. `line` is the source line (0 if none). */
levi_status levi_table_append(levi_table *t, const char *const *values, int64_t line,
                              levi_error *err);

int64_t levi_table_num_rows(const levi_table *t);
int levi_table_num_columns(const levi_table *t);
const char *levi_table_column_name(const levi_table *t, int col);
int levi_table_find_column(const levi_table *t, const char *name); /* index or -1 */
/* The column's cells, num_rows pointers. */
const char *const *levi_table_column(const levi_table *t, int col);
const char *levi_table_cell(const levi_table *t, int64_t row, int col);
const char *levi_table_source(const levi_table *t); /* the file name, or "" */
/* The file row came from: levi_table_source unless the table joins several files (the Amazon
 * reader), then that row's file. Pair it with levi_table_line in messages. */
const char *levi_table_row_source(const levi_table *t, int64_t row);
int64_t levi_table_line(const levi_table *t, int64_t row);
/* The column names joined with ", " into buf (truncated with "..." when it does not fit);
 * for error messages that list what is there. Returns buf. */
const char *levi_table_column_list(const levi_table *t, char *buf, size_t cap);

/* =======================================================================================
 * MovieLens-100K: one joined table, one row per rating, with the columns
 *   user_id, age, gender, occupation, zip_code, item_id, title, genres, rating, timestamp
 * where genres is the movie's genre names joined with '|' in u.genre order (Action|Comedy).
 * Ids, ratings and timestamps are validated (integers, a finite number) and every user and
 * item a rating names must exist; errors read "<file>:<line>: <expected>, found <what>". */
#define LEVI_MOVIELENS_NUM_COLUMNS 10

/* The GroupLens folder: u.data (tab-separated), u.item ('|', Latin-1, transcoded), u.user
 * ('|'), u.genre ('|': name|index). */
levi_status levi_movielens_read_grouplens(const char *dir, levi_table **out, levi_error *err);
/* RecBole atomic files ml-100k.inter / .user / .item (tab-separated, typed headers). */
levi_status levi_movielens_read_recbole(const char *dir, levi_table **out, levi_error *err);
/* Either layout, found in dir: dir/u.data, dir/ml-100k.inter, or dir/ml-100k/u.data. */
levi_status levi_movielens_read(const char *dir, levi_table **out, levi_error *err);

/* =======================================================================================
 * Amazon reviews in the Blitzer, Dredze & Pereira (ACL 2007) multi-domain layout:
 * <root>/<domain>/{negative,positive}.review, every sub-folder holding either file being a
 * domain (so a new domain needs no code; folders are read in byte order of their names, the
 * negative file first; names starting with '.' are skipped). One row per review, columns
 *   domain, polarity, unique_id, asin, product_name, product_type, helpful, rating, title,
 *   date, reviewer, reviewer_location, review_text
 * domain is the folder name, polarity "negative" or "positive" from the file name, date the
 * review date as ISO "2006-07-01" (parsed from "July 1, 2006"; "" where the file leaves it
 * empty), rating as written ("5.0"). The files are pseudo-XML (raw '&' and '<' in texts): a
 * tag counts only alone on its line; bytes are repaired into valid UTF-8 deterministically
 * (valid UTF-8 kept, other bytes read as Windows-1252, control characters but tab and line
 * ends turned into spaces) and &quot; &amp; &lt; &gt; &apos; &#N; &#xH; are decoded; unknown
 * fields are skipped. Each row's file is levi_table_row_source. Errors (LEVI_ERR_FORMAT)
 * read "<file>:<line>: ..., expected X, found Y": a record without </review> or a field
 * without its closing tag, text outside a record, a missing asin/rating/date/review_text
 * field, a rating that is not a number from 1 to 5, a date not like "July 1, 2006", a field
 * given twice; LEVI_ERR_NOT_FOUND when no domain folder is found, LEVI_ERR_IO when root is
 * not a folder. unlabeled.review files are not read. */
#define LEVI_AMAZON_NUM_COLUMNS 13
levi_status levi_amazon_read(const char *root, levi_table **out, levi_error *err);

/* =======================================================================================
 * Dataset spec: a JSON file describing a dataset. This comment is its reference; the
 * built-in specs/movielens.json is the worked example. Shape:
 * {
 *   "name": "movielens-100k-genre",                         (optional)
 *   "source": {"reader": "csv"|"tsv"|"jsonl"|"movielens"|"amazon",
 *              "path": "data.csv" or ["${LEVI_DATA_DIR}/ml-100k", "..."]  (first that exists;
 *                      ${VAR} expands from the environment; relative to the spec's folder),
 *              "encoding": "utf-8"|"latin-1", "delimiter": ",", "quoting": true,
 *              "header": true, "columns": [...] (names when header is false)},
 *   "label": {"column": "rating", "task": "regression"}
 *            {"column": "y", "task": "classification", "classes": ["neg","pos"] | "auto"},
 *   "categorical": [{"column": "item_id", "mask_prob": 0.2},
 *                   {"column": "title", "group_with": "item_id"}],
 *   "numeric": [{"column": "age"}],
 *   "text": "When the user id is {user_id}, ... {{ and }} are literal braces",
 *   "text_max_tokens": 256,   (optional: tokens per text, [CLS] and [SEP] included, for the
 *                              backbone; longer texts are cut. Absent: the extractor's default)
 *   "shift": {"id": <condition>, "ood": <condition, default: every non-ID row>,
 *             "ood_groups": [{"by_value": "genres", "multi_sep": "|", "min_count": 200,
 *                             "exclude": [...]},
 *                            {"name": "books-2006", "where": <condition>}]},
 *   "split": {"seed": 0, "train": 0.8, "val": 0.1, "test": 0.1},
 *   "expect": {"id_rows": 91142, "ood_rows": 8858, "ood_groups": {"Children's": 2742, ...}},
 *   "hyperparameters": {"feature_dropout": 0}  (optional: method settings chosen for this task
 *                              on its ID validation data; `levi fit` knows feature_dropout)
 * }
 * A condition is one of
 *   {"column": c, "any_of": [...], "multi_sep": "|"}   (some value of the cell is listed)
 *   {"column": c, "none_of": [...], "multi_sep": "|"}  (no value of the cell is listed)
 *   {"column": c, "date_format": "%B %d, %Y" | "unix", "before": "2006-07-01",
 *    "on_or_after": "2005-01-01"}                      (either bound or both; UTC)
 *   {"all": [...]}, {"any": [...]}, {"not": <condition>}
 * Rows that are neither ID nor OOD are EXCLUDED. OOD groups are computed among OOD rows.
 * Unknown keys and wrong types are errors naming the file and JSON path, e.g.
 *   "spec.json: categorical[2].mask_prob: expected a number in [0,1), found \"x\"".
 * Columns are checked against the table by levi_dataset_init (then the message names the
 * spec file, the JSON path and the table's columns). */
typedef struct levi_spec levi_spec;

typedef enum { LEVI_TASK_REGRESSION = 0, LEVI_TASK_CLASSIFICATION = 1 } levi_task;

levi_status levi_spec_load(const char *path, levi_spec **out, levi_error *err);
/* Parses a spec from memory; `name` stands for the file in messages and relative source
 * paths resolve against base_dir (NULL: the current directory). */
levi_status levi_spec_parse(const char *json, size_t len, const char *name, const char *base_dir,
                            levi_spec **out, levi_error *err);
void levi_spec_free(levi_spec *s);

const char *levi_spec_file(const levi_spec *s); /* as given to load/parse */
const char *levi_spec_name(const levi_spec *s); /* "name", else the file's base name */
levi_task levi_spec_task(const levi_spec *s);
/* "text_max_tokens", or 0 when the spec leaves it to the feature extractor's default. */
int levi_spec_text_max_tokens(const levi_spec *s);
/* "hyperparameters": method settings chosen for this task on its ID validation data, e.g.
 * {"feature_dropout": 0}; name i (0 <= i < count) and its value. The data layer only checks
 * that each value is a finite number; the caller rejects names it does not know. */
int levi_spec_num_hyperparameters(const levi_spec *s);
const char *levi_spec_hyperparameter(const levi_spec *s, int i, double *value);
/* Replaces source.path (a command-line override; relative to the current directory). */
void levi_spec_set_source_path(levi_spec *s, const char *path);
/* The source path that will be read: the first candidate that exists after ${VAR}
 * expansion. LEVI_ERR_NOT_FOUND lists every candidate and why it was rejected. */
levi_status levi_spec_source_path(const levi_spec *s, char *out, size_t cap, levi_error *err);
/* Reads the table the spec's source names. */
levi_status levi_spec_read_table(const levi_spec *s, levi_table **out, levi_error *err);

/* =======================================================================================
 * Dataset: n rows (row i is row i of the table it was built from), each tagged with a split.
 * ID rows are shuffled with the spec's seed (levi_rng) and cut into train/val/test; OOD rows
 * are those meeting shift.ood (default: every non-ID row). Vocabularies and numeric
 * statistics come from ID-TRAIN rows only. */
typedef struct levi_dataset levi_dataset;

typedef enum {
    LEVI_SPLIT_TRAIN = 0,
    LEVI_SPLIT_VAL = 1,
    LEVI_SPLIT_TEST = 2,
    LEVI_SPLIT_OOD = 3,
    LEVI_SPLIT_EXCLUDED = 4, /* neither ID nor OOD: in no split */
    LEVI_SPLIT_COUNT = 5
} levi_split;
const char *levi_split_name(levi_split s); /* "train", "val", "test", "ood", "excluded" */

/* A categorical input. ids[i] in [0, cardinality); 0 is the reserved unknown slot: values
 * never seen in ID-train rows map to it. vocab[0] is "<unk>", vocab[1..] are the ID-train
 * values in byte order. Training should replace ids with 0 for a mask_prob fraction of rows
 * (levi_dataset_gather_categorical does it) so the unknown slot is trained; columns with the
 * same mask_leader are masked together, with the leader's mask_prob. */
typedef struct levi_categorical {
    const char *name;
    const int32_t *ids; /* [n] */
    int32_t cardinality;
    const char *const *vocab; /* [cardinality] */
    float mask_prob;
    int mask_leader; /* index of the categorical column whose draw masks this one */
} levi_categorical;

/* A numeric input, standardised: (x - mean) / std with ID-train mean and (population) std;
 * std is 1 when ID-train values are constant. raw keeps the parsed values. */
typedef struct levi_numeric {
    const char *name;
    const float *values; /* [n] standardised */
    const double *raw;   /* [n] as parsed (NaN for excluded rows) */
    double mean, std;
} levi_numeric;

/* Builds the dataset: checks every column the spec names against the table, evaluates the
 * shift, splits, builds vocabularies, parses labels and numeric values (errors name the
 * table's file and line), renders texts. */
levi_status levi_dataset_init(const levi_spec *spec, const levi_table *table, levi_dataset **out,
                              levi_error *err);
/* Renders the spec's text template for one row of a table with the spec's columns (e.g. new
 * rows to predict for): the same text levi_dataset_init builds. *out is malloc'ed (free it);
 * "" when the spec has no template. LEVI_ERR_FORMAT names the table's file and the missing
 * column when the template uses a column the table lacks. */
levi_status levi_spec_render_text(const levi_spec *s, const levi_table *t, int64_t row, char **out,
                                  levi_error *err);

/* levi_spec_read_table + levi_dataset_init. */
levi_status levi_dataset_load(const levi_spec *spec, levi_dataset **out, levi_error *err);
void levi_dataset_free(levi_dataset *ds);

int64_t levi_dataset_num_rows(const levi_dataset *ds);
const char *levi_dataset_name(const levi_dataset *ds);
levi_task levi_dataset_task(const levi_dataset *ds);
const char *levi_dataset_label_name(const levi_dataset *ds);
/* Labels as floats, [n]: the value for regression, the class id for classification (NaN for
 * excluded rows). */
const float *levi_dataset_labels(const levi_dataset *ds);
/* Class ids [n] (-1 for excluded rows); NULL for regression. */
const int32_t *levi_dataset_classes(const levi_dataset *ds);
int levi_dataset_num_classes(const levi_dataset *ds); /* 0 for regression */
const char *levi_dataset_class_name(const levi_dataset *ds, int k);

int levi_dataset_num_categorical(const levi_dataset *ds);
const levi_categorical *levi_dataset_categorical(const levi_dataset *ds, int c);
int levi_dataset_find_categorical(const levi_dataset *ds, const char *name); /* or -1 */
int levi_dataset_num_numeric(const levi_dataset *ds);
const levi_numeric *levi_dataset_numeric(const levi_dataset *ds, int j);

/* The rendered text of row i (the spec's template; "" when the spec has none). */
const char *levi_dataset_text(const levi_dataset *ds, int64_t row);
int levi_dataset_has_text(const levi_dataset *ds);

const uint8_t *levi_dataset_split_tags(const levi_dataset *ds); /* [n] levi_split values */
/* Rows of split s in ascending order; *count gets their number. */
const int64_t *levi_dataset_split_rows(const levi_dataset *ds, levi_split s, int64_t *count);
/* Rows the dataset was built from: the table row of dataset row i (the identity unless
 * subsampled). */
const int64_t *levi_dataset_source_rows(const levi_dataset *ds);

/* OOD groups, in order (by_value groups by count descending, then name). A row may be in
 * several groups (a movie with two rare genres) or in none. */
int levi_dataset_num_groups(const levi_dataset *ds);
const char *levi_dataset_group_name(const levi_dataset *ds, int g);
const int64_t *levi_dataset_group_rows(const levi_dataset *ds, int g, int64_t *count);

/* out[i * num_categorical + c] = ids of column c for rows[i]. With mask_rng non-NULL, each
 * mask leader draws one uniform per row and, when it falls below the leader's mask_prob, the
 * leader and every column it leads get id 0 (for training batches only). */
void levi_dataset_gather_categorical(const levi_dataset *ds, const int64_t *rows, int64_t n,
                                     levi_rng *mask_rng, int32_t *out);
/* out[i * num_numeric + j] = standardised value of column j for rows[i]. */
void levi_dataset_gather_numeric(const levi_dataset *ds, const int64_t *rows, int64_t n,
                                 float *out);

/* Prints counts (rows, ID train/val/test, OOD, excluded, each OOD group), the label, the
 * categorical cardinalities, the first text, and the result of the spec's "expect" check. */
void levi_dataset_summary(const levi_dataset *ds, FILE *f);
/* Compares the counts with the spec's "expect" block (LEVI_OK when the spec has none);
 * LEVI_ERR_FORMAT lists every mismatch. */
levi_status levi_dataset_check_expected(const levi_dataset *ds, levi_error *err);
/* SHA-256 over, per row in order: the rendered text and a NUL, the label as a little-endian
 * float32, and the split tag byte; for cache keys of anything derived from texts and labels. */
void levi_dataset_checksum(const levi_dataset *ds, char out_hex[65]);

/* A smaller dataset for CI-sized runs: keeps round(fraction * kept rows) rows (fraction in
 * (0, 1]), capped at max_rows when max_rows > 0, sampled within each split in proportion and
 * at least one row from every non-empty split, with a seeded shuffle. Splits, labels and
 * texts are kept; vocabularies and numeric statistics are rebuilt from the kept train rows (a
 * value no longer seen in training maps to 0). OOD groups keep their names; a group may end
 * up with fewer rows, or none. */
levi_status levi_dataset_subsample(const levi_dataset *ds, double fraction, int64_t max_rows,
                                   uint64_t seed, levi_dataset **out, levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_DATA_H */
