/* Private declarations shared by the files of levi's data layer (src/data): the string
 * hash map, table internals the MovieLens join needs, number parsing, and the parsed spec that
 * dataset.c reads. Not for: anything outside src/data (the public contract is levi/data.h). */
#ifndef LEVI_DATA_INTERNAL_H
#define LEVI_DATA_INTERNAL_H

#include "levi/data.h"

/* ---- string -> int64 hash map (open addressing; keys are not copied) ------------------ */
typedef struct levi__strmap {
    const char **keys;
    int64_t *vals;
    size_t cap, count; /* cap is a power of two */
} levi__strmap;

void levi__strmap_init(levi__strmap *m, size_t expected);
void levi__strmap_free(levi__strmap *m);
/* Returns the value stored for key, or -1. */
int64_t levi__strmap_get(const levi__strmap *m, const char *key);
/* Inserts key -> val unless present; returns the value now stored (the old one if present). */
int64_t levi__strmap_put(levi__strmap *m, const char *key, int64_t val);

/* ---- tables ---------------------------------------------------------------------------- */
/* Copies s (len bytes) into the table's string storage; the copy lives as long as t. */
char *levi__table_strdup(levi_table *t, const char *s, size_t len);
/* Moves every buffer src owns into dst, so pointers to src's strings stay valid for dst's
 * lifetime, then frees src. */
void levi__table_adopt(levi_table *dst, levi_table *src);
/* Appends a row whose values are already owned by t (no copy). */
levi_status levi__table_append_owned(levi_table *t, const char **values, int64_t line,
                                     levi_error *err);

/* Rows appended from now on came from `file` (a string owned by t, or living as long as t);
 * levi_table_row_source reports it. NULL: the table's own source. */
void levi__table_set_row_source(levi_table *t, const char *file);

/* ---- text helpers ---------------------------------------------------------------------- */
/* Parses a whole string as a finite double / a decimal int64 (no surrounding spaces). */
int levi__parse_double(const char *s, double *out);
int levi__parse_int64(const char *s, int64_t *out);
/* Writes s quoted and truncated to ~48 bytes ("abc", "very long...") into buf. */
const char *levi__quote(const char *s, char *buf, size_t cap);
/* Validates UTF-8; on failure returns 0 and sets *bad_offset. Embedded NULs are invalid. */
int levi__utf8_valid(const char *s, size_t len, size_t *bad_offset);

/* ---- parsed spec ----------------------------------------------------------------------- */
typedef enum {
    LEVI__COND_ANY_OF,
    LEVI__COND_NONE_OF,
    LEVI__COND_DATE,
    LEVI__COND_ALL,
    LEVI__COND_ANY,
    LEVI__COND_NOT
} levi__cond_kind;

typedef struct levi__cond {
    levi__cond_kind kind;
    char *jpath; /* JSON path for messages: "shift.id" */
    char *column;
    char *multi_sep; /* NULL: the cell is one value */
    char **values;
    int num_values;
    char *date_format; /* strptime format, or "unix" */
    int has_before, has_on_or_after;
    int64_t before, on_or_after; /* seconds since the epoch, UTC */
    struct levi__cond *kids;
    int num_kids;
} levi__cond;

typedef struct levi__tpl_piece {
    char *literal; /* literal text, or NULL for a column */
    char *column;
    size_t offset; /* in the template, for messages */
} levi__tpl_piece;

typedef struct levi__spec_cat {
    char *column;
    double mask_prob;
    char *group_with;
} levi__spec_cat;

typedef struct levi__spec_group {
    char *name;        /* explicit group, or NULL for by_value */
    levi__cond *where; /* explicit group's condition */
    char *by_value;    /* column */
    char *multi_sep;
    int64_t min_count;
    char **exclude;
    int num_exclude;
    char *jpath;
} levi__spec_group;

struct levi_spec {
    char *file, *base_dir, *name;
    /* source */
    char *reader; /* "csv", "tsv", "jsonl", "movielens", "amazon" */
    char **paths; /* candidates as written */
    int num_paths;
    int path_overridden;
    levi_encoding encoding;
    char delimiter;
    int quoting, header;
    char **columns;
    int num_columns;
    /* label */
    char *label_column;
    levi_task task;
    char **classes; /* NULL with classes_auto */
    int num_classes, classes_auto;
    /* inputs */
    levi__spec_cat *cats;
    int num_cats;
    char **numerics;
    int num_numerics;
    char *text;          /* template as written, or NULL */
    int text_max_tokens; /* 0: the feature extractor's default */
    /* "hyperparameters": name -> number, for the methods (this layer does not interpret them) */
    char **hyper_names;
    double *hyper_values;
    int num_hyper;
    levi__tpl_piece *tpl;
    int num_tpl;
    /* shift */
    levi__cond *id_cond;  /* NULL: every row is ID */
    levi__cond *ood_cond; /* NULL: every non-ID row is OOD */
    levi__spec_group *groups;
    int num_groups;
    /* split */
    uint64_t seed;
    double train, val, test;
    /* expect */
    int has_expect;
    int64_t expect_id, expect_ood; /* -1: not given */
    char **expect_group_names;
    int64_t *expect_group_counts;
    int num_expect_groups; /* -1: not given */
};

/* Parses a date cell with the condition's format into seconds since the epoch (UTC). */
int levi__parse_date(const char *s, const char *format, int64_t *out);

#endif
