/* Results writers of the levi CLI: aggregation over seeds, results.json, results.csv and
 * report.md (the paper's Table 1, Table 5, Fig. 4, Tables 9/10 and Table 15 layouts with the
 * paper's numbers beside ours, and its claims checked on ours), the SVG figures report.md links
 * (drawn by plot.c), and the Table-1-style table printed at the end of `levi fit`.
 * Not for: computing metrics (levi.h does) or deciding what runs (fit.c does). The shapes of
 * the JSON documents handled here are written down in report.h. */
#include "report.h"

#include "plot.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------
 * The paper's numbers (RMSE on MovieLens-100K genre shift, T5x-small backbone), from
 * docs/TASKS.md and the paper's Tables 1, 5, 9 and 10. Shown beside ours, never mixed into
 * them: our backbone (all-MiniLM-L6-v2, frozen) and splits differ from the paper's. */
typedef struct {
    float mean, std;
} paper_cell;

typedef struct {
    const char *method; /* our method name, or NULL for paper-only rows */
    const char *row;    /* the paper's row label */
    paper_cell id, ood;
    int has_groups;
    paper_cell groups[12]; /* in PAPER_GROUPS order */
} paper_row;

/* Tables 9 then 10, in the paper's column order, spelled as in MovieLens' u.genre. */
static const char *const PAPER_GROUPS[12] = {"Adventure",  "Sci-Fi",  "War",       "Crime",
                                             "Children's", "Horror",  "Mystery",   "Musical",
                                             "Animation",  "Western", "Film-Noir", "Documentary"};

static const paper_row PAPER_ROWS[] = {
    {"ft",
     "T5x Fine-tuning (FT)",
     {1.175f, 0.021f},
     {1.268f, 0.036f},
     1,
     {{1.251f, .036f},
      {1.314f, .046f},
      {1.153f, .033f},
      {1.341f, .005f},
      {1.262f, .045f},
      {1.355f, .050f},
      {1.268f, .023f},
      {1.265f, .060f},
      {1.262f, .049f},
      {1.216f, .068f},
      {1.125f, .082f},
      {1.404f, .045f}}},
    {"ht",
     "T5x Light-tuning: half of transformers (HT)",
     {1.230f, 0.006f},
     {1.297f, 0.005f},
     1,
     {{1.283f, .018f},
      {1.352f, .022f},
      {1.276f, .019f},
      {1.405f, .089f},
      {1.298f, .028f},
      {1.403f, .008f},
      {1.245f, .038f},
      {1.315f, .024f},
      {1.327f, .023f},
      {1.194f, .013f},
      {1.122f, .014f},
      {1.467f, .031f}}},
    {"lp",
     "T5x Light-tuning: linear probing (LP)",
     {1.226f, 0.014f},
     {1.218f, 0.054f},
     1,
     {{1.233f, .005f},
      {1.231f, .099f},
      {1.166f, .224f},
      {1.402f, .118f},
      {1.195f, .032f},
      {1.398f, .123f},
      {1.213f, .122f},
      {1.158f, .025f},
      {1.166f, .015f},
      {1.100f, .101f},
      {1.062f, .273f},
      {1.288f, .062f}}},
    {"fs",
     "T5x From scratch (FS)",
     {1.175f, 0.021f},
     {1.291f, 0.019f},
     1,
     {{1.350f, .022f},
      {1.296f, .018f},
      {1.246f, .032f},
      {1.367f, .060f},
      {1.279f, .031f},
      {1.399f, .046f},
      {1.303f, .043f},
      {1.259f, .031f},
      {1.262f, .031f},
      {1.187f, .038f},
      {1.160f, .025f},
      {1.388f, .044f}}},
    {"lpft",
     "LP->FT",
     {1.163f, 0.014f},
     {1.357f, 0.009f},
     1,
     {{1.335f, .008f},
      {1.352f, .013f},
      {1.294f, .071f},
      {1.340f, .002f},
      {1.368f, .030f},
      {1.378f, .004f},
      {1.428f, .083f},
      {1.356f, .049f},
      {1.396f, .034f},
      {1.327f, .039f},
      {1.260f, .004f},
      {1.455f, .029f}}},
    {"ft+lp",
     "FT+RobustModel",
     {1.072f, 0.002f},
     {1.127f, 0.038f},
     1,
     {{1.122f, .013f},
      {1.175f, .045f},
      {1.066f, .068f},
      {1.203f, .026f},
      {1.103f, .013f},
      {1.257f, .063f},
      {1.125f, .084f},
      {1.097f, .028f},
      {1.092f, .020f},
      {1.048f, .088f},
      {1.017f, .127f},
      {1.221f, .073f}}},
    {"ft+fs",
     "FT+FS",
     {1.058f, 0.011f},
     {1.159f, 0.018f},
     1,
     {{1.156f, .018f},
      {1.196f, .024f},
      {1.076f, .002f},
      {1.235f, .010f},
      {1.142f, .032f},
      {1.259f, .042f},
      {1.167f, .033f},
      {1.143f, .028f},
      {1.139f, .026f},
      {1.091f, .044f},
      {1.033f, .018f},
      {1.277f, .024f}}},
    {"wise-ft",
     "FT+ZeroShot",
     {1.177f, 0.010f},
     {1.253f, 0.038f},
     1,
     {{1.227f, .032f},
      {1.338f, .036f},
      {1.134f, .020f},
      {1.343f, .003f},
      {1.239f, .038f},
      {1.363f, .029f},
      {1.254f, .016f},
      {1.235f, .049f},
      {1.246f, .033f},
      {1.124f, .096f},
      {1.143f, .076f},
      {1.396f, .026f}}},
    /* Table 5 (ablations): overall ID / OOD only. */
    {"a1", "A1) T5x+T5x", {1.103f, 0.011f}, {1.178f, 0.021f}, 0, {{0, 0}}},
    {"a2", "A2) T5x+MLP", {1.035f, 0.009f}, {1.163f, 0.015f}, 0, {{0, 0}}},
    {"a3", "A3) T5x intermediates", {1.125f, 0.003f}, {1.142f, 0.012f}, 0, {{0, 0}}},
    {"a4", "A4) single-head MLP", {1.003f, 0.013f}, {1.158f, 0.101f}, 0, {{0, 0}}},
    {"a5", "A5) multi-head MLP", {1.001f, 0.020f}, {1.121f, 0.034f}, 0, {{0, 0}}},
    {"levi",
     "LEVI",
     {0.932f, 0.005f},
     {1.065f, 0.018f},
     1,
     {{1.036f, .006f},
      {1.138f, .010f},
      {1.059f, .069f},
      {1.178f, .051f},
      {1.047f, .017f},
      {1.105f, .019f},
      {0.973f, .013f},
      {1.077f, .031f},
      {1.074f, .015f},
      {0.949f, .029f},
      {0.878f, .052f},
      {1.267f, .031f}}},
};
#define N_PAPER_ROWS ((int)(sizeof PAPER_ROWS / sizeof PAPER_ROWS[0]))

static const paper_row *paper_row_of(const char *method) {
    for (int i = 0; i < N_PAPER_ROWS; i++)
        if (PAPER_ROWS[i].method && strcmp(PAPER_ROWS[i].method, method) == 0)
            return &PAPER_ROWS[i];
    return NULL;
}

/* The paper's Amazon Review numbers (T5x-small; Ni et al. data, not the Blitzer files our
 * amazon-* specs read), keyed by our spec names: Table 1's time and product columns (the
 * product OOD is the paper's 7 categories, ours dvd/electronics/kitchen), Table 5's
 * ablations on the time shift, and Table 13 (sentiment from review text, RMSE of the predicted
 * rating, no std given). Paper-only rows (method NULL) appear in the reference section. */
typedef struct {
    const char *task;
    paper_row row;
} paper_task_row;

#define PT(task, method, label, id, id_std, ood, ood_std)                                          \
    {                                                                                              \
        task, {                                                                                    \
            method, label, {id, id_std}, {ood, ood_std}, 0, {                                      \
                { 0, 0 }                                                                           \
            }                                                                                      \
        }                                                                                          \
    }
static const paper_task_row PAPER_TASK_ROWS[] = {
    PT("amazon-rating-time", NULL, "T5x Fine-tuning (FT)", 1.386f, .024f, 1.543f, .014f),
    PT("amazon-rating-time", NULL, "T5x From scratch (FS)", 1.410f, .064f, 1.532f, .014f),
    PT("amazon-rating-time", "lp", "T5x Light-tuning: Linear probing (LP)", 1.453f, .065f, 1.529f,
       .045f),
    PT("amazon-rating-time", "a3", "A3) T5x Intermediates", 1.137f, .001f, 1.285f, .007f),
    PT("amazon-rating-time", "a4", "A4) Single-head MLP", 1.104f, .005f, 1.326f, .002f),
    PT("amazon-rating-time", "a5", "A5) Multi-head MLP", 1.102f, .004f, 1.319f, .036f),
    PT("amazon-rating-time", "levi", "LEVI", 1.095f, .003f, 1.310f, .006f),
    PT("amazon-rating-product", NULL, "T5x Fine-tuning (FT)", 1.386f, .024f, 2.029f, .154f),
    PT("amazon-rating-product", NULL, "T5x From scratch (FS)", 1.410f, .064f, 1.494f, .010f),
    PT("amazon-rating-product", "lp", "T5x Light-tuning: Linear probing (LP)", 1.453f, .065f,
       1.759f, .130f),
    PT("amazon-rating-product", "levi", "LEVI", 1.095f, .003f, 1.298f, .006f),
    PT("amazon-sentiment-rating", NULL, "T5x Fine-tuning (FT)", .686f, NAN, .802f, NAN),
    PT("amazon-sentiment-rating", NULL, "T5x Light-tuning: Half of transformers (HT)", .743f, NAN,
       .868f, NAN),
    PT("amazon-sentiment-rating", "lp", "T5x Light-tuning: Linear probing (LP)", 1.343f, NAN,
       1.487f, NAN),
    PT("amazon-sentiment-rating", NULL, "T5x From scratch (FS)", .900f, NAN, 1.089f, NAN),
    PT("amazon-sentiment-rating", NULL, "FT+RobustModel", .624f, NAN, .727f, NAN),
    PT("amazon-sentiment-rating", "levi", "LEVI", .587f, NAN, .691f, NAN),
};
#undef PT
#define N_PAPER_TASK_ROWS ((int)(sizeof PAPER_TASK_ROWS / sizeof PAPER_TASK_ROWS[0]))

static int paper_group_index(const char *name) {
    for (int i = 0; i < 12; i++)
        if (strcmp(PAPER_GROUPS[i], name) == 0) return i;
    return -1;
}

static int is_ablation(const char *method) {
    return method[0] == 'a' && method[1] >= '1' && method[1] <= '5' && method[2] == 0;
}

/* k of a per-layer-study method "layer<k>", else -1. */
static int layer_of(const char *method) {
    if (strncmp(method, "layer", 5) != 0 || !method[5]) return -1;
    const char *d = method + 5;
    if (strspn(d, "0123456789") != strlen(d) || strlen(d) > 2) return -1;
    return atoi(d);
}

const char *levi_report_method_label(const char *method) {
    static const struct {
        const char *name, *label;
    } labels[] = {
        {"levi", "LEVI"},
        {"a3", "A3) adapters on all layers, no small model"},
        {"a4", "A4) single-head MLP (small model alone)"},
        {"a5", "A5) multi-head MLP (small model, several heads)"},
        {"lp", "LP (linear probe, last layer)"},
        {"layer", "LEVI, one adapter on the last layer"},
        {"bias", "Bias model (user+item, regularised)"},
        {"ft", "FT (full fine-tuning)"},
        {"ht", "HT (upper half of the layers tuned)"},
        {"lp-ft", "LP->FT (linear probe, then full fine-tuning)"},
        {"fs", "FS (the backbone's architecture from scratch)"},
        {"lora", "LoRA (query and value, rank 8)"},
        {"ft+lp", "FT+RobustModel (FT and LP averaged)"},
        {"ft+fs", "FT+FS (outputs averaged)"},
        {"wise-ft", "FT+ZeroShot (WiSE-FT weight interpolation)"},
        {"a1", "A1) FT+FT (two FT seeds averaged)"},
        {"a2", "A2) FT+MLP (FT and the small model averaged)"},
        {"levi-ht", "LEVI (HT backbone)"},
        {"levi-ft", "LEVI (FT backbone)"},
        {"levi-lora", "LEVI (LoRA backbone)"},
    };
    for (size_t i = 0; i < sizeof labels / sizeof labels[0]; i++)
        if (strcmp(labels[i].name, method) == 0) return labels[i].label;
    /* The per-layer study's layer<k> (fit.c). */
    static char layer_labels[32][48];
    int k = layer_of(method);
    if (k >= 0 && k < 32) {
        snprintf(layer_labels[k], sizeof layer_labels[k], "LEVI, one adapter on layer %d%s", k,
                 k == 0 ? " (embeddings)" : "");
        return layer_labels[k];
    }
    return method;
}

/* ---------------------------------------------------------------------------------------
 * Reading the documents. Missing numbers and JSON null (how cJSON writes NaN) read as NaN. */
static double num(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

static const char *str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static const cJSON *find_set(const cJSON *run, const char *name) {
    const cJSON *set;
    cJSON_ArrayForEach(set, cJSON_GetObjectItemCaseSensitive(run, "sets")) {
        if (strcmp(str(set, "name"), name) == 0) return set;
    }
    return NULL;
}

static void mean_std(const double *v, int n, double *mean, double *std) {
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = n > 0 ? s / n : NAN;
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (v[i] - *mean) * (v[i] - *mean);
    *std = n > 1 ? sqrt(ss / (n - 1)) : (n == 1 ? 0 : NAN);
}

static cJSON *stat_object(const double *v, int n) {
    double mean, std;
    mean_std(v, n, &mean, &std);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "mean", mean);
    cJSON_AddNumberToObject(o, "std", std);
    cJSON_AddNumberToObject(o, "n_seeds", n);
    return o;
}

#define MAX_RUNS 64

void levi_report_summarize_method(cJSON *method) {
    const cJSON *runs = cJSON_GetObjectItemCaseSensitive(method, "runs");
    int n_runs = cJSON_GetArraySize(runs);
    if (n_runs > MAX_RUNS) n_runs = MAX_RUNS;
    const cJSON *first = cJSON_GetArrayItem(runs, 0);
    cJSON *summary = cJSON_CreateObject();
    cJSON *adapter_summary = cJSON_CreateArray();
    double seconds = 0;
    for (int r = 0; r < n_runs; r++) {
        const cJSON *train = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(runs, r), "train");
        double s = num(train, "seconds");
        if (isfinite(s)) seconds += s;
    }
    if (first) {
        /* Sets and adapters come from the first seed; every seed of a method evaluates the
           same sets with the same model structure. */
        const cJSON *set;
        cJSON_ArrayForEach(set, cJSON_GetObjectItemCaseSensitive(first, "sets")) {
            const char *name = str(set, "name");
            double v[MAX_RUNS];
            int n = 0;
            for (int r = 0; r < n_runs; r++) {
                const cJSON *s = find_set(cJSON_GetArrayItem(runs, r), name);
                if (s) v[n++] = num(s, "value");
            }
            cJSON *o = stat_object(v, n);
            cJSON_AddNumberToObject(o, "n", num(set, "n"));
            cJSON_AddItemToObject(summary, name, o);
        }
        const cJSON *adapters = cJSON_GetObjectItemCaseSensitive(first, "adapters");
        int n_adapters = cJSON_GetArraySize(adapters);
        for (int j = 0; j < n_adapters; j++) {
            const cJSON *a = cJSON_GetArrayItem(adapters, j);
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "name", str(a, "name"));
            cJSON_AddNumberToObject(o, "layer", num(a, "layer"));
            cJSON_ArrayForEach(set, cJSON_GetObjectItemCaseSensitive(first, "sets")) {
                const char *name = str(set, "name");
                double v[MAX_RUNS];
                int n = 0;
                for (int r = 0; r < n_runs; r++) {
                    const cJSON *s = find_set(cJSON_GetArrayItem(runs, r), name);
                    const cJSON *per = s ? cJSON_GetObjectItemCaseSensitive(s, "adapters") : NULL;
                    const cJSON *x = cJSON_GetArrayItem(per, j);
                    if (x) v[n++] = cJSON_IsNumber(x) ? x->valuedouble : NAN;
                }
                cJSON_AddItemToObject(o, name, stat_object(v, n));
            }
            cJSON_AddItemToArray(adapter_summary, o);
        }
    }
    cJSON_DeleteItemFromObjectCaseSensitive(method, "summary");
    cJSON_DeleteItemFromObjectCaseSensitive(method, "adapter_summary");
    cJSON_DeleteItemFromObjectCaseSensitive(method, "train_seconds");
    cJSON_AddItemToObject(method, "summary", summary);
    cJSON_AddItemToObject(method, "adapter_summary", adapter_summary);
    cJSON_AddNumberToObject(method, "train_seconds", seconds);
}

/* ---------------------------------------------------------------------------------------
 * Formatting helpers. */
static void fmt_ms(char *buf, size_t cap, double mean, double std) {
    if (!isfinite(mean))
        snprintf(buf, cap, "n/a");
    else if (isfinite(std))
        snprintf(buf, cap, "%.3f ± %.3f", mean, std);
    else
        snprintf(buf, cap, "%.3f", mean);
}

/* stats[set] as "mean ± std", or "-" when the set is absent. stats is a method's "summary"
   or one entry of its "adapter_summary": both hold {"mean", "std"} per set name. */
static void fmt_stat(char *buf, size_t cap, const cJSON *stats, const char *set) {
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(stats, set);
    if (!s) {
        snprintf(buf, cap, "-");
        return;
    }
    fmt_ms(buf, cap, num(s, "mean"), num(s, "std"));
}

static void fmt_paper(char *buf, size_t cap, const paper_cell *c) {
    if (isnan(c->std)) /* Table 13 gives means only */
        snprintf(buf, cap, "%.3f", c->mean);
    else
        snprintf(buf, cap, "%.3f ± %.3f", c->mean, c->std);
}

static int is_movielens(const cJSON *results) {
    return strcmp(str(results, "task"), "movielens") == 0 &&
           strcmp(str(results, "metric"), "rmse") == 0;
}

static int has_task_rows(const cJSON *results) {
    for (int i = 0; i < N_PAPER_TASK_ROWS; i++)
        if (strcmp(PAPER_TASK_ROWS[i].task, str(results, "task")) == 0 &&
            strcmp(str(results, "metric"), "rmse") == 0)
            return 1;
    return 0;
}

/* 1 when the paper has numbers for this task (MovieLens, or a PAPER_TASK_ROWS task). */
static int has_paper(const cJSON *results) {
    return is_movielens(results) || has_task_rows(results);
}

static const paper_row *paper_row_for(const cJSON *results, const char *method) {
    if (is_movielens(results)) return paper_row_of(method);
    for (int i = 0; i < N_PAPER_TASK_ROWS; i++) {
        const paper_task_row *t = &PAPER_TASK_ROWS[i];
        if (t->row.method && strcmp(t->task, str(results, "task")) == 0 &&
            strcmp(t->row.method, method) == 0)
            return &t->row;
    }
    return NULL;
}

static int n_groups(const cJSON *results) {
    return cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(results, "dataset"), "groups"));
}

static const char *metric_label(const cJSON *results) {
    const char *m = str(results, "metric");
    return strcmp(m, "rmse") == 0 ? "RMSE" : strcmp(m, "accuracy") == 0 ? "accuracy" : m;
}

/* Column widths for a plain-text table that also reads as Markdown. */
#define MAX_COLS 16
typedef struct {
    int n_cols;
    int width[MAX_COLS];
} table_layout;

static int utf8_width(const char *s) {
    int w = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80) w++;
    return w;
}

static void print_cell(FILE *f, const char *s, int width) {
    fprintf(f, "| %s", s);
    for (int i = utf8_width(s); i < width + 1; i++) fputc(' ', f);
}

static void print_rule(FILE *f, const table_layout *t) {
    for (int c = 0; c < t->n_cols; c++) {
        fputc('|', f);
        for (int i = 0; i < t->width[c] + 2; i++) fputc('-', f);
    }
    fputs("|\n", f);
}

/* A table held as rows of cells, printed with aligned columns. */
#define TT_CELL 96 /* bytes of one cell, terminator included */
typedef struct {
    int n_rows, n_cols;
    char cells[64][MAX_COLS][TT_CELL];
} text_table;

static void tt_print(FILE *f, const text_table *tt) {
    table_layout t = {.n_cols = tt->n_cols};
    for (int r = 0; r < tt->n_rows; r++)
        for (int c = 0; c < tt->n_cols; c++) {
            int w = utf8_width(tt->cells[r][c]);
            if (w > t.width[c]) t.width[c] = w;
        }
    for (int r = 0; r < tt->n_rows; r++) {
        for (int c = 0; c < tt->n_cols; c++) print_cell(f, tt->cells[r][c], t.width[c]);
        fputs("|\n", f);
        if (r == 0) print_rule(f, &t);
    }
}

static char *tt_cell(text_table *tt, int r, int c) {
    if (r >= tt->n_rows) tt->n_rows = r + 1;
    return tt->cells[r][c];
}

/* printf into cell (r, c), truncated to the cell's size. */
static void tt_set(text_table *tt, int r, int c, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void tt_set(text_table *tt, int r, int c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tt_cell(tt, r, c), TT_CELL, fmt, ap);
    va_end(ap);
}

/* n literal strings into cells (r, c0) .. (r, c0 + n - 1): header rows. */
static void tt_texts(text_table *tt, int r, int c0, int n, const char *const *texts) {
    for (int c = 0; c < n; c++) tt_set(tt, r, c0 + c, "%s", texts[c]);
}

/* stats[sets[k]] (see fmt_stat) into cells (r, c0 + k). */
static void tt_stats(text_table *tt, int r, int c0, const cJSON *stats, int n,
                     const char *const *sets) {
    for (int k = 0; k < n; k++) fmt_stat(tt_cell(tt, r, c0 + k), TT_CELL, stats, sets[k]);
}

/* Our ID test and OOD of method m into cells (r, c0) and (r, c0 + 1). */
static void tt_ours(text_table *tt, int r, int c0, const cJSON *m) {
    static const char *const sets[] = {"id_test", "ood"};
    tt_stats(tt, r, c0, cJSON_GetObjectItemCaseSensitive(m, "summary"), 2, sets);
}

static const char *const PAPER_HEADER[2] = {"ID (paper, T5x)", "OOD (paper, T5x)"};

/* The paper's ID and OOD of row p (NULL: the paper has no such row, "-") into cells (r, c0)
   and (r, c0 + 1). */
static void tt_paper(text_table *tt, int r, int c0, const paper_row *p) {
    if (p) {
        fmt_paper(tt_cell(tt, r, c0), TT_CELL, &p->id);
        fmt_paper(tt_cell(tt, r, c0 + 1), TT_CELL, &p->ood);
    } else {
        tt_set(tt, r, c0, "-");
        tt_set(tt, r, c0 + 1, "-");
    }
}

/* ---------------------------------------------------------------------------------------
 * Table 1 style: Method | ID | OOD (N groups) [| paper ID | paper OOD]. */
static void table1(FILE *f, const cJSON *results) {
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    int paper = has_paper(results);
    int ng = n_groups(results);
    tt->n_cols = paper ? 6 : 4;
    tt_set(tt, 0, 0, "Method");
    tt_set(tt, 0, 1, "ID %s (ours)", metric_label(results));
    if (ng > 0)
        tt_set(tt, 0, 2, "OOD (%d group%s, ours)", ng, ng == 1 ? "" : "s");
    else
        tt_set(tt, 0, 2, "OOD (ours)");
    tt_set(tt, 0, 3, "LR");
    if (paper) tt_texts(tt, 0, 4, 2, PAPER_HEADER);
    int r = 1;
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        if (r >= 64) break;
        const char *name = str(m, "method");
        tt_set(tt, r, 0, "%s", levi_report_method_label(name));
        tt_ours(tt, r, 1, m);
        double lr = num(m, "chosen_lr");
        if (strcmp(name, "bias") == 0 || !isfinite(lr))
            tt_set(tt, r, 3, "-");
        else
            tt_set(tt, r, 3, "%g", lr);
        if (paper) tt_paper(tt, r, 4, paper_row_for(results, name));
        r++;
    }
    tt_print(f, tt);
    free(tt);
}

void levi_report_print_table1(FILE *f, const cJSON *results) {
    fprintf(f, "%s on %s: ID test and OOD, mean ± std over seeds (%s)\n", metric_label(results),
            str(results, "task"),
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(results, "lower_is_better"))
                ? "lower is better"
                : "higher is better");
    table1(f, results);
}

/* ---------------------------------------------------------------------------------------
 * report.md */
static void md_header(FILE *f, const cJSON *results) {
    const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(results, "config");
    const cJSON *ds = cJSON_GetObjectItemCaseSensitive(results, "dataset");
    fprintf(f, "# levi results: %s\n\n", str(results, "task"));
    const char *gemm = str(results, "gemm"); /* absent in results written before it was kept */
    fprintf(f, "Generated by `levi %s` (levi %s%s%s) on %s.\n\n", str(results, "generated_by"),
            str(results, "levi_version"), gemm[0] ? ", GEMM " : "", gemm, str(results, "created"));
    fprintf(f, "## Setup\n\n");
    fprintf(f, "- Dataset: %s (%s)\n", str(ds, "name"), str(cfg, "data"));
    fprintf(f, "- Backbone: %s, frozen; per-layer features cached (%s)\n", str(cfg, "model"),
            str(cfg, "features_dir"));
    int tuned = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) tuned |=
        strncmp(str(m, "method"), "levi-", 5) == 0;
    if (tuned)
        fprintf(f, "- levi-ht, levi-ft, levi-lora: LEVI on the encoders that the ht, ft and lora "
                   "runs tuned (features cached per encoder)\n");
    fprintf(f,
            "- Rows: %.0f (ID train %.0f, ID val %.0f, ID test %.0f; OOD %.0f in %d "
            "group%s)\n",
            num(ds, "rows"), num(ds, "train"), num(ds, "val"), num(ds, "test"), num(ds, "ood"),
            n_groups(results), n_groups(results) == 1 ? "" : "s");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "subsample");
    if (v && !cJSON_IsNull(v)) fprintf(f, "- Subsample: %s\n", str(cfg, "subsample"));
    fprintf(f, "- Seeds: %.0f; epochs at most %.0f, patience %.0f, batch %.0f\n", num(cfg, "seeds"),
            num(cfg, "epochs"), num(cfg, "patience"), num(cfg, "batch"));
    if (!strcmp(str(cfg, "precision"), "bf16"))
        fprintf(f, "- Precision: the heads' training products with bfloat16 operands, f32 sums "
                   "(`--precision bf16`); evaluation in f32\n");
    fprintf(f, "- Learning rate: chosen per method on ID validation with seed %.0f",
            num(cfg, "first_seed"));
    const cJSON *lrs = cJSON_GetObjectItemCaseSensitive(cfg, "lrs");
    if (cJSON_IsArray(lrs)) {
        fputs(" from {", f);
        const cJSON *x;
        int i = 0;
        cJSON_ArrayForEach(x, lrs) fprintf(f, "%s%g", i++ ? ", " : "", x->valuedouble);
        fputs("}", f);
    } else {
        fputs(" from each method's default grid", f);
    }
    fputs("; OOD rows never influence any choice.\n", f);
    fprintf(f, "- Metric: %s; mean ± sample std (n-1) over seeds.\n\n", metric_label(results));
}

static void md_table5(FILE *f, const cJSON *results) {
    const cJSON *methods = cJSON_GetObjectItemCaseSensitive(results, "methods");
    int any = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, methods) any |= is_ablation(str(m, "method"));
    if (!any) return;
    int paper = has_paper(results);
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    fprintf(f, "## Table 5 style: ablations\n\n");
    tt->n_cols = paper ? 5 : 3;
    tt_texts(tt, 0, 0, 3, (const char *const[]){"Method", "ID (ours)", "OOD (ours)"});
    if (paper) tt_texts(tt, 0, 3, 2, PAPER_HEADER);
    int r = 1;
    /* The paper's order: ablations A1..A5, then LEVI. */
    static const char *const order[] = {"a1", "a2", "a3", "a4", "a5", "levi"};
    for (size_t k = 0; k < sizeof order / sizeof order[0]; k++) {
        cJSON_ArrayForEach(m, methods) {
            if (strcmp(str(m, "method"), order[k]) != 0) continue;
            tt_set(tt, r, 0, "%s", levi_report_method_label(order[k]));
            tt_ours(tt, r, 1, m);
            if (paper) tt_paper(tt, r, 3, paper_row_for(results, order[k]));
            r++;
        }
    }
    tt_print(f, tt);
    fputs("\nOur A3/A4/A5 are the paper's ablations built on a frozen all-MiniLM-L6-v2 instead "
          "of a fine-tuned T5x (Sec. D.4).\n\n",
          f);
    free(tt);
}

/* The per-group tables of md_groups: groups order[0..ng) in chunks of six columns like the
   paper, one table per chunk. Rows: our methods (group sizes in the header), or with methods
   NULL the paper's rows that have per-group numbers. */
static void group_tables(FILE *f, text_table *tt, const cJSON *groups, const int *order, int ng,
                         const cJSON *methods) {
    const int per_table = 6;
    for (int g0 = 0; g0 < ng; g0 += per_table) {
        int g1 = g0 + per_table < ng ? g0 + per_table : ng;
        memset(tt, 0, sizeof *tt);
        tt->n_cols = 1 + g1 - g0;
        tt_set(tt, 0, 0, "%s", methods ? "Method" : "Method (paper)");
        for (int g = g0; g < g1; g++) {
            const cJSON *gr = cJSON_GetArrayItem(groups, order[g]);
            if (methods)
                tt_set(tt, 0, 1 + g - g0, "%s (%.0f)", str(gr, "name"), num(gr, "n"));
            else
                tt_set(tt, 0, 1 + g - g0, "%s", str(gr, "name"));
        }
        int r = 1;
        const cJSON *m;
        cJSON_ArrayForEach(m, methods) {
            if (r >= 64) break;
            tt_set(tt, r, 0, "%s", levi_report_method_label(str(m, "method")));
            const cJSON *summary = cJSON_GetObjectItemCaseSensitive(m, "summary");
            for (int g = g0; g < g1; g++) {
                char set[128];
                snprintf(set, sizeof set, "ood/%s",
                         str(cJSON_GetArrayItem(groups, order[g]), "name"));
                fmt_stat(tt_cell(tt, r, 1 + g - g0), TT_CELL, summary, set);
            }
            r++;
        }
        for (int i = 0; !methods && i < N_PAPER_ROWS && r < 64; i++) {
            const paper_row *p = &PAPER_ROWS[i];
            if (!p->has_groups) continue;
            tt_set(tt, r, 0, "%s", p->row);
            for (int g = g0; g < g1; g++) {
                int k = paper_group_index(str(cJSON_GetArrayItem(groups, order[g]), "name"));
                if (k >= 0)
                    fmt_paper(tt_cell(tt, r, 1 + g - g0), TT_CELL, &p->groups[k]);
                else
                    tt_set(tt, r, 1 + g - g0, "-");
            }
            r++;
        }
        tt_print(f, tt);
        fputc('\n', f);
    }
}

/* Tables 9/10 style: one column per OOD group, in chunks of six like the paper. */
static void md_groups(FILE *f, const cJSON *results) {
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(results, "dataset"), "groups");
    int ng = cJSON_GetArraySize(groups);
    if (ng == 0) return;
    const cJSON *methods = cJSON_GetObjectItemCaseSensitive(results, "methods");
    int paper = is_movielens(results);
    fprintf(f, "## Tables 9/10 style: OOD %s per group\n\n", metric_label(results));
    fprintf(f, "Ours, mean ± std over seeds. Group sizes (rows) in the header.\n\n");
    /* Column order: the paper's (Table 9 then Table 10) when every group is one of its
       genres, so the two can be read side by side; otherwise the dataset's. */
    int order[64];
    if (ng > 64) ng = 64;
    int all_paper = paper;
    for (int g = 0; g < ng; g++) {
        order[g] = g;
        all_paper &= paper_group_index(str(cJSON_GetArrayItem(groups, g), "name")) >= 0;
    }
    if (all_paper) {
        int k = 0;
        for (int p = 0; p < 12; p++)
            for (int g = 0; g < ng; g++)
                if (paper_group_index(str(cJSON_GetArrayItem(groups, g), "name")) == p)
                    order[k++] = g;
    }
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    group_tables(f, tt, groups, order, ng, methods);
    if (paper) {
        /* The paper's numbers for the same groups, for the methods we ran that the paper
           also has, then LEVI's and the other paper rows for context. */
        fprintf(f, "Paper (T5x-small backbone; Tables 9 and 10), same groups, for reference:\n\n");
        group_tables(f, tt, groups, order, ng, NULL);
    }
    free(tt);
}

/* Per-adapter metrics of every method with more than one head. */
static void md_adapters(FILE *f, const cJSON *results) {
    static const char *const sets[] = {"id_val", "id_test", "ood"};
    const cJSON *m;
    int header = 0;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        const cJSON *as = cJSON_GetObjectItemCaseSensitive(m, "adapter_summary");
        if (cJSON_GetArraySize(as) < 2) continue;
        if (!header) {
            fprintf(f, "## Per-adapter %s (each head alone; the method predicts their mean)\n\n",
                    metric_label(results));
            header = 1;
        }
        fprintf(f, "%s:\n\n", levi_report_method_label(str(m, "method")));
        text_table *tt = calloc(1, sizeof *tt);
        if (!tt) return;
        tt->n_cols = 4;
        tt_texts(tt, 0, 0, 4, (const char *const[]){"Adapter", "ID val", "ID test", "OOD"});
        int r = 1;
        const cJSON *a;
        cJSON_ArrayForEach(a, as) {
            if (r >= 64) break;
            tt_set(tt, r, 0, "%s", str(a, "name"));
            tt_stats(tt, r, 1, a, 3, sets);
            r++;
        }
        tt_set(tt, r, 0, "mean of adapters (the prediction)");
        tt_stats(tt, r, 1, cJSON_GetObjectItemCaseSensitive(m, "summary"), 3, sets);
        tt_print(f, tt);
        fputc('\n', f);
        free(tt);
    }
}

static void md_selection_and_times(FILE *f, const cJSON *results) {
    fprintf(f, "## Learning-rate selection (ID validation, first seed) and wall times\n\n");
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    tt->n_cols = 5;
    tt_texts(tt, 0, 0, 5,
             (const char *const[]){"Method", "ID val by LR", "chosen LR", "epochs (per seed)",
                                   "train s (all runs)"});
    int r = 1;
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        if (r >= 64) break;
        const char *name = str(m, "method");
        tt_set(tt, r, 0, "%s", name);
        char *c = tt_cell(tt, r, 1);
        size_t used = 0;
        const cJSON *lrs = cJSON_GetObjectItemCaseSensitive(m, "lr_grid");
        const cJSON *vals = cJSON_GetObjectItemCaseSensitive(m, "lr_val");
        int n = cJSON_GetArraySize(lrs);
        if (strcmp(name, "bias") == 0) n = 0; /* no learning rate */
        for (int i = 0; i < n && used < 80; i++) {
            const cJSON *v = cJSON_GetArrayItem(vals, i);
            used += (size_t)snprintf(c + used, TT_CELL - used, "%s%g: %s", i ? ", " : "",
                                     cJSON_GetArrayItem(lrs, i)->valuedouble,
                                     cJSON_IsNumber(v) ? "" : "n/a");
            if (cJSON_IsNumber(v) && used < 90)
                used += (size_t)snprintf(c + used, TT_CELL - used, "%.3f", v->valuedouble);
        }
        if (n == 0) snprintf(c, TT_CELL, "-");
        if (strcmp(name, "bias") == 0)
            tt_set(tt, r, 2, "- (lambda chosen on ID val)");
        else
            tt_set(tt, r, 2, "%g", num(m, "chosen_lr"));
        char *e = tt_cell(tt, r, 3);
        used = 0;
        const cJSON *run;
        int k = 0;
        cJSON_ArrayForEach(run, cJSON_GetObjectItemCaseSensitive(m, "runs")) {
            if (used >= 80) break;
            const cJSON *tr = cJSON_GetObjectItemCaseSensitive(run, "train");
            used += (size_t)snprintf(e + used, TT_CELL - used, "%s%.0f", k++ ? ", " : "",
                                     num(tr, "epochs_run"));
        }
        if (k == 0) snprintf(e, TT_CELL, "-");
        tt_set(tt, r, 4, "%.1f", num(m, "train_seconds"));
        r++;
    }
    tt_print(f, tt);
    free(tt);
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(results, "wall_s");
    if (w) {
        fputs("\nWall time of this invocation (s; runs finished earlier are not retimed):", f);
        const cJSON *x;
        int i = 0;
        cJSON_ArrayForEach(x, w) {
            if (cJSON_IsNumber(x))
                fprintf(f, "%s %s %.1f", i++ ? "," : "", x->string, x->valuedouble);
        }
        fputs(".\n", f);
    }
    fputc('\n', f);
}

static void md_paper_reference_task(FILE *f, const cJSON *results) {
    fprintf(f, "## Paper's numbers for reference (not ours)\n\n");
    fprintf(f, "Roh et al., ICML 2024, Amazon Review (Ni et al. data; ours is the Blitzer et al. "
               "multi-domain proxy with other products and sizes), RMSE, T5x-small:\n\n");
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    tt->n_cols = 3;
    tt_texts(tt, 0, 0, 3, (const char *const[]){"Method (paper)", "ID", "OOD"});
    int r = 1;
    for (int i = 0; i < N_PAPER_TASK_ROWS && r < 64; i++) {
        if (strcmp(PAPER_TASK_ROWS[i].task, str(results, "task")) != 0) continue;
        tt_set(tt, r, 0, "%s", PAPER_TASK_ROWS[i].row.row);
        tt_paper(tt, r++, 1, &PAPER_TASK_ROWS[i].row);
    }
    tt_print(f, tt);
    free(tt);
    fputc('\n', f);
}

static void md_paper_reference(FILE *f, const cJSON *results) {
    if (has_task_rows(results)) {
        md_paper_reference_task(f, results);
        return;
    }
    if (!is_movielens(results)) return;
    fprintf(f, "## Paper's numbers for reference (not ours)\n\n");
    fprintf(f, "Roh et al., ICML 2024, Table 1 and Table 5, MovieLens-100K genre shift, RMSE, "
               "T5x-small backbone (fine-tuned unless noted), mean ± std over 3 seeds:\n\n");
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    tt->n_cols = 3;
    tt_texts(tt, 0, 0, 3, (const char *const[]){"Method (paper)", "ID", "OOD (12 genres)"});
    for (int i = 0; i < N_PAPER_ROWS; i++) {
        tt_set(tt, i + 1, 0, "%s", PAPER_ROWS[i].row);
        tt_paper(tt, i + 1, 1, &PAPER_ROWS[i]);
    }
    tt_print(f, tt);
    free(tt);
    fprintf(f, "\nSimple references on this split (docs/TASKS.md, 80/20 ID shuffle, not from the "
               "paper): global mean 1.128 / 1.156; regularised user+item bias 0.956 / 1.081 "
               "(ID / OOD). A method that does not beat the bias model on both is not "
               "working.\n\n");
}

/* ---------------------------------------------------------------------------------------
 * Fig. 4 (per-layer study), the methods figure, the efficiency table (Table 15 layout) and
 * the paper's claims checked against our numbers. */

/* summary[set].mean and .std of a method entry (NaN when absent). */
static double stat_of(const cJSON *m, const char *set, const char *what) {
    return num(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(m, "summary"), set),
        what);
}

static const cJSON *find_method(const cJSON *results, const char *name) {
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        if (strcmp(str(m, "method"), name) == 0) return m;
    }
    return NULL;
}

/* The layer<k> methods in layer order: by_layer[k] (NULL where absent); returns 1 + the
   highest layer present (0: no per-layer study). */
static int layer_methods(const cJSON *results, const cJSON *by_layer[32]) {
    int n = 0;
    for (int k = 0; k < 32; k++) by_layer[k] = NULL;
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        int k = layer_of(str(m, "method"));
        if (k < 0 || k >= 32) continue;
        by_layer[k] = m;
        if (k + 1 > n) n = k + 1;
    }
    return n;
}

static void fig4_svg(FILE *f, const cJSON *results) {
    const cJSON *by_layer[32];
    int n = layer_methods(results, by_layer);
    double x[32], y[2][32], e[2][32];
    static const char *const sets[2] = {"id_test", "ood"};
    for (int k = 0; k < n; k++) {
        x[k] = k;
        for (int s = 0; s < 2; s++) {
            y[s][k] = by_layer[k] ? stat_of(by_layer[k], sets[s], "mean") : NAN;
            e[s][k] = by_layer[k] ? stat_of(by_layer[k], sets[s], "std") : NAN;
        }
    }
    char title[128], ylab[64];
    snprintf(title, sizeof title, "Per-layer study (Fig. 4): %s", str(results, "task"));
    snprintf(ylab, sizeof ylab, "%s (mean ± std over seeds)", metric_label(results));
    plot_chart c = {.title = title,
                    .x_label = "feature layer (0 = embeddings)",
                    .y_label = ylab,
                    .n_series = 2,
                    .integer_x = 1};
    c.series[0] = (plot_series){"ID test", n, x, y[0], e[0]};
    c.series[1] = (plot_series){"OOD", n, x, y[1], e[1]};
    plot_line_svg(f, &c);
}

/* Methods other than the per-layer study's, for the methods figure (at most 32). */
static int main_methods(const cJSON *results, const cJSON *out[32]) {
    int n = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        if (layer_of(str(m, "method")) < 0 && n < 32) out[n++] = m;
    }
    return n;
}

static void methods_svg(FILE *f, const cJSON *results) {
    const cJSON *ms[32];
    int n = main_methods(results, ms);
    const char *names[32];
    double y[2][32], e[2][32];
    static const char *const sets[2] = {"id_test", "ood"};
    for (int i = 0; i < n; i++) {
        names[i] = str(ms[i], "method");
        for (int s = 0; s < 2; s++) {
            y[s][i] = stat_of(ms[i], sets[s], "mean");
            e[s][i] = stat_of(ms[i], sets[s], "std");
        }
    }
    char title[128], ylab[64];
    snprintf(title, sizeof title, "ID and OOD %s per method: %s", metric_label(results),
             str(results, "task"));
    snprintf(ylab, sizeof ylab, "%s (mean ± std over seeds)", metric_label(results));
    plot_chart c = {.title = title,
                    .x_label = "method",
                    .y_label = ylab,
                    .n_series = 2,
                    .n_categories = n,
                    .categories = names};
    c.series[0] = (plot_series){"ID test", n, NULL, y[0], e[0]};
    c.series[1] = (plot_series){"OOD", n, NULL, y[1], e[1]};
    plot_bar_svg(f, &c);
}

/* ---------------------------------------------------------------------------------------
 * Tables 4 and 14 style: LEVI on a tuned backbone (levi-ht, levi-ft, levi-lora, fit.c) next to
 * the tuned model alone and LEVI on the frozen backbone. The paper's Table 14 (T5x-small) for
 * the tasks it covers: LEVI with the pre-trained, light-tuned and fully fine-tuned model;
 * Table 4's LoRA rows are vision/medical tasks we do not run. */
static const char *verdict(int known, int holds);

typedef struct {
    const char *task, *method, *row;
    paper_cell id, ood;
} paper_tuned_row;

static const paper_tuned_row PAPER_TUNED_ROWS[] = {
    {"movielens", "levi", "LEVI with pre-trained T5x", {0.944f, 0.004f}, {1.104f, 0.003f}},
    {"movielens", "levi-ht", "LEVI with light-tuned T5x", {0.932f, 0.005f}, {1.065f, 0.018f}},
    {"movielens", "levi-ft", "LEVI with fully fine-tuned T5x", {0.927f, 0.004f}, {1.085f, 0.014f}},
    {"amazon-rating-time", "levi", "LEVI with pre-trained T5x", {1.109f, .003f}, {1.296f, .011f}},
    {"amazon-rating-time",
     "levi-ht",
     "LEVI with light-tuned T5x",
     {1.095f, .003f},
     {1.310f, .006f}},
    {"amazon-rating-time",
     "levi-ft",
     "LEVI with fully fine-tuned T5x",
     {1.093f, .001f},
     {1.318f, .004f}},
    {"amazon-rating-product",
     "levi",
     "LEVI with pre-trained T5x",
     {1.109f, .003f},
     {1.275f, .006f}},
    {"amazon-rating-product",
     "levi-ht",
     "LEVI with light-tuned T5x",
     {1.095f, .003f},
     {1.298f, .006f}},
    {"amazon-rating-product",
     "levi-ft",
     "LEVI with fully fine-tuned T5x",
     {1.093f, .001f},
     {1.524f, .110f}},
};

/* The paper's number for a row of the tuned-backbone table: Table 14 for LEVI rows, Table 1
   for the tuned models alone (MovieLens); NULL when the paper has none. */
static void tuned_paper(const cJSON *results, const char *method, paper_cell *id, paper_cell *ood,
                        const char **row) {
    *row = NULL;
    if (strcmp(str(results, "metric"), "rmse") != 0) return;
    for (size_t i = 0; i < sizeof PAPER_TUNED_ROWS / sizeof PAPER_TUNED_ROWS[0]; i++) {
        const paper_tuned_row *p = &PAPER_TUNED_ROWS[i];
        if (strcmp(p->task, str(results, "task")) == 0 && strcmp(p->method, method) == 0) {
            *id = p->id, *ood = p->ood, *row = p->row;
            return;
        }
    }
    if (strncmp(method, "levi", 4) == 0) return;
    const paper_row *p = paper_row_for(results, method);
    if (p) *id = p->id, *ood = p->ood, *row = p->row;
}

static void md_tuned(FILE *f, const cJSON *results) {
    static const char *const bases[3][2] = {
        {"ht", "levi-ht"}, {"ft", "levi-ft"}, {"lora", "levi-lora"}};
    int any = 0;
    for (int b = 0; b < 3; b++) any |= find_method(results, bases[b][1]) != NULL;
    if (!any) return;
    const int lower = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(results, "lower_is_better"));
#define TBETTER(a, b) (lower ? (a) < (b) : (a) > (b))
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    fprintf(f, "## Tables 4 and 14 style: LEVI with a tuned backbone\n\n");
    tt->n_cols = 6;
    tt_texts(tt, 0, 0, 6,
             (const char *const[]){"Method", "ID (ours)", "OOD (ours)", "LR", "ID (paper)",
                                   "OOD (paper)"});
    const char *rows[7] = {"levi"};
    int n = 1;
    for (int b = 0; b < 3; b++)
        if (find_method(results, bases[b][1])) rows[n++] = bases[b][0], rows[n++] = bases[b][1];
    for (int i = 0; i < n; i++) {
        const cJSON *m = find_method(results, rows[i]);
        tt_set(tt, i + 1, 0, "%s",
               i == 0 ? "LEVI (frozen backbone)" : levi_report_method_label(rows[i]));
        if (m) {
            tt_ours(tt, i + 1, 1, m);
            tt_set(tt, i + 1, 3, "%g", num(m, "chosen_lr"));
        } else {
            tt_set(tt, i + 1, 1, "not run");
            tt_set(tt, i + 1, 2, "not run");
            tt_set(tt, i + 1, 3, "-");
        }
        paper_cell pid, pood;
        const char *prow;
        tuned_paper(results, rows[i], &pid, &pood, &prow);
        if (prow) {
            fmt_paper(tt_cell(tt, i + 1, 4), TT_CELL, &pid);
            fmt_paper(tt_cell(tt, i + 1, 5), TT_CELL, &pood);
        } else {
            tt_set(tt, i + 1, 4, "-");
            tt_set(tt, i + 1, 5, "-");
        }
    }
    tt_print(f, tt);
    free(tt);
    fprintf(f,
            "\nLEVI (X backbone): seed k's LEVI head (levi's settings) trains on features of the "
            "encoder that method X's seed k tuned and saved (runs/<x>/seed<k>/backbone; LoRA "
            "merged), extracted into the feature cache under that encoder's own key; its learning "
            "rate is chosen from LEVI's grid on ID validation with seed 0, like every method's. "
            "The head trains on all ID-train rows, as frozen LEVI's does (--scale limits only "
            "the backbone training). Paper columns: Table 14 for the LEVI rows (T5x-small; "
            "\"light-tuned\" is shown beside our HT), Table 1 for the tuned models alone; the "
            "paper's LoRA results (Table 4) are on vision and medical tasks. Our backbone is "
            "all-MiniLM-L6-v2, so compare orderings, not digits. The efficiency table counts a "
            "tuned LEVI's head only; tuning its encoder is the base method's row.\n\n");
    /* The claims: LEVI improves its tuned model (Table 4), and the ID/OOD trade-off of
       Table 14 (a fully fine-tuned backbone: better ID, worse OOD than the frozen one). */
    for (int b = 0; b < 3; b++) {
        const cJSON *base = find_method(results, bases[b][0]);
        const cJSON *tuned = find_method(results, bases[b][1]);
        if (!tuned) continue;
        double bi = base ? stat_of(base, "id_test", "mean") : NAN;
        double bo = base ? stat_of(base, "ood", "mean") : NAN;
        double ti = stat_of(tuned, "id_test", "mean"), to = stat_of(tuned, "ood", "mean");
        int known = isfinite(bi) && isfinite(bo) && isfinite(ti) && isfinite(to);
        fprintf(f,
                "- LEVI improves the %s-tuned model on ID and OOD (Table 4): %s %.3f / %.3f, "
                "LEVI on its backbone %.3f / %.3f: **%s**\n",
                bases[b][0], bases[b][0], bi, bo, ti, to,
                verdict(known, known && TBETTER(ti, bi) && TBETTER(to, bo)));
    }
    const cJSON *frozen = find_method(results, "levi"), *lft = find_method(results, "levi-ft");
    if (frozen && lft) {
        double fi = stat_of(frozen, "id_test", "mean"), fo = stat_of(frozen, "ood", "mean");
        double ti = stat_of(lft, "id_test", "mean"), to = stat_of(lft, "ood", "mean");
        int known = isfinite(fi) && isfinite(fo) && isfinite(ti) && isfinite(to);
        fprintf(f,
                "- Table 14: with the fully fine-tuned backbone LEVI is better ID and worse OOD "
                "than with the frozen one: frozen %.3f / %.3f, FT backbone %.3f / %.3f: "
                "**%s**\n",
                fi, fo, ti, to, verdict(known, known && TBETTER(ti, fi) && TBETTER(fo, to)));
    }
    fputc('\n', f);
#undef TBETTER
}

static void md_fig4(FILE *f, const cJSON *results) {
    const cJSON *by_layer[32];
    int n = layer_methods(results, by_layer);
    if (n == 0) return;
    fprintf(f, "## Fig. 4 style: one adapter on one layer (per-layer study)\n\n");
    fprintf(f, "![ID and OOD %s per layer](fig4-layers.svg)\n\n", metric_label(results));
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    tt->n_cols = 4;
    tt_texts(tt, 0, 0, 4, (const char *const[]){"Layer", "ID test (ours)", "OOD (ours)", "LR"});
    int r = 1;
    for (int k = 0; k < n && r < 64; k++) {
        if (!by_layer[k]) continue;
        tt_set(tt, r, 0, "%d%s", k, k == 0 ? " (embeddings)" : "");
        tt_ours(tt, r, 1, by_layer[k]);
        tt_set(tt, r, 3, "%g", num(by_layer[k], "chosen_lr"));
        r++;
    }
    tt_print(f, tt);
    free(tt);
    fputs("\nEach row is LEVI's small model plus one adapter on the output of that layer "
          "(0: the embeddings, k: transformer layer k), with its own learning rate chosen on ID "
          "validation. The paper (Fig. 4, T5x) finds early layers better OOD and later layers "
          "better ID.\n\n",
          f);
}

static void md_methods_fig(FILE *f, const cJSON *results) {
    const cJSON *ms[32];
    if (main_methods(results, ms) == 0) return;
    fprintf(f, "![ID and OOD %s per method](methods.svg)\n\n", metric_label(results));
}

/* Mean over a method's runs of cost[key] (NaN when no run has it). */
static double cost_mean(const cJSON *m, const char *key) {
    double s = 0;
    int n = 0;
    const cJSON *run;
    cJSON_ArrayForEach(run, cJSON_GetObjectItemCaseSensitive(m, "runs")) {
        double v = num(cJSON_GetObjectItemCaseSensitive(run, "cost"), key);
        if (isfinite(v)) s += v, n++;
    }
    return n ? s / n : NAN;
}

/* 12345678 -> "12.3M" (K, M, G, T), "-" for NaN. */
static void fmt_si(char *buf, size_t cap, double v) {
    static const char *const suffix[] = {"", "K", "M", "G", "T"};
    if (!isfinite(v)) {
        snprintf(buf, cap, "-");
        return;
    }
    int i = 0;
    while (fabs(v) >= 1000 && i < 4) v /= 1000, i++;
    snprintf(buf, cap, i == 0 ? "%.0f%s" : "%.3g%s", v, suffix[i]);
}

static void md_efficiency(FILE *f, const cJSON *results) {
    int any = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        any |= isfinite(cost_mean(m, "trainable_params"));
    }
    if (!any) return;
    fprintf(f, "## Table 15 style: efficiency\n\n");
    text_table *tt = calloc(1, sizeof *tt);
    if (!tt) return;
    tt->n_cols = 6;
    tt_texts(tt, 0, 0, 6,
             (const char *const[]){"Method", "Params (train.)", "Params (infer.)",
                                   "FLOPs / example", "train s / epoch", "peak RSS (MiB)"});
    int r = 1;
    double tokens = NAN;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        if (r >= 64) break;
        tt_set(tt, r, 0, "%s", str(m, "method"));
        fmt_si(tt_cell(tt, r, 1), TT_CELL, cost_mean(m, "trainable_params"));
        fmt_si(tt_cell(tt, r, 2), TT_CELL, cost_mean(m, "inference_params"));
        fmt_si(tt_cell(tt, r, 3), TT_CELL, cost_mean(m, "flops_per_example"));
        double spe = cost_mean(m, "seconds_per_epoch"), rss = cost_mean(m, "peak_rss_kib");
        if (isfinite(spe))
            tt_set(tt, r, 4, "%.3g", spe);
        else
            tt_set(tt, r, 4, "-");
        if (isfinite(rss))
            tt_set(tt, r, 5, "%.0f", rss / 1024);
        else
            tt_set(tt, r, 5, "-");
        if (!isfinite(tokens)) tokens = cost_mean(m, "mean_tokens");
        r++;
    }
    tt_print(f, tt);
    free(tt);
    fprintf(f,
            "\nParams (infer.) add the backbone through the deepest layer a method reads when it "
            "needs the backbone at inference; FLOPs are forward multiply-adds x 2 of the head "
            "plus that backbone at the task's mean of %.1f tokens per text (include/levi/"
            "cost.h). Seconds per epoch and peak RSS are measured on the run's process (mean "
            "over seeds; a machine shared with other work distorts them); RSS includes the "
            "loaded features.\n\n",
            tokens);
}

/* "yes"/"no" for a condition that could be evaluated, "not run" otherwise. */
static const char *verdict(int known, int holds) {
    return !known ? "not run" : holds ? "yes" : "no";
}

static void md_claims(FILE *f, const cJSON *results) {
    int lower = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(results, "lower_is_better"));
    /* a better than b */
#define BETTER(a, b) (lower ? (a) < (b) : (a) > (b))
    fprintf(f, "## The paper's claims on our numbers\n\n");
    fprintf(f, "OOD and ID are mean %s over seeds (%s is better).\n\n", metric_label(results),
            lower ? "lower" : "higher");
    const cJSON *ft = find_method(results, "ft"), *lp = find_method(results, "lp");
    const cJSON *fs = find_method(results, "fs"), *levi = find_method(results, "levi");
    /* 1. FT worse OOD than LP or FS */
    if (ft && (lp || fs)) {
        double o_ft = stat_of(ft, "ood", "mean");
        double o_lp = lp ? stat_of(lp, "ood", "mean") : NAN;
        double o_fs = fs ? stat_of(fs, "ood", "mean") : NAN;
        int holds = (lp && BETTER(o_lp, o_ft)) || (fs && BETTER(o_fs, o_ft));
        fprintf(f, "- FT worse OOD than LP or FS: FT %.3f, LP %.3f, FS %.3f: **%s**\n", o_ft, o_lp,
                o_fs, verdict(isfinite(o_ft), holds));
    } else {
        fprintf(f, "- FT worse OOD than LP or FS: **not run** (needs ft and lp or fs)\n");
    }
    /* 2. LEVI best OOD */
    if (levi) {
        double o = stat_of(levi, "ood", "mean");
        const char *best = "levi";
        double bv = o;
        const cJSON *m;
        cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
            double v = stat_of(m, "ood", "mean");
            if (layer_of(str(m, "method")) >= 0) continue; /* the study, not a baseline */
            if (strncmp(str(m, "method"), "levi-", 5) == 0) continue; /* LEVI itself, tuned */
            if (isfinite(v) && (!isfinite(bv) || BETTER(v, bv))) bv = v, best = str(m, "method");
        }
        fprintf(f,
                "- LEVI best OOD of the methods run (per-layer study aside): LEVI %.3f, best "
                "%s %.3f: **%s**\n",
                o, best, bv, verdict(isfinite(o), strcmp(best, "levi") == 0));
    } else {
        fprintf(f, "- LEVI best OOD: **not run**\n");
    }
    /* 3. Table 5: LEVI better OOD than every ablation; the paper's ablation order by OOD is
       A5 (1.121) < A3 (1.142) < A4 (1.158). */
    {
        static const char *const abl[3] = {"a5", "a3", "a4"};
        double v[3];
        int present = 0, all = 1;
        fprintf(f, "- Table 5: LEVI better OOD than each ablation (A3, A4, A5), ablations in the "
                   "paper's OOD order A5 < A3 < A4:");
        for (int i = 0; i < 3; i++) {
            const cJSON *a = find_method(results, abl[i]);
            v[i] = a ? stat_of(a, "ood", "mean") : NAN;
            if (a) present++;
            if (a) fprintf(f, " %s %.3f,", abl[i], v[i]);
        }
        double o = levi ? stat_of(levi, "ood", "mean") : NAN;
        if (levi) fprintf(f, " levi %.3f", o);
        int beats = levi != NULL;
        for (int i = 0; i < 3; i++)
            if (isfinite(v[i])) beats &= BETTER(o, v[i]);
        all = present == 3 && BETTER(v[0], v[1]) && BETTER(v[1], v[2]);
        if (!levi || present == 0)
            fprintf(f, ": **not run**\n");
        else
            fprintf(f, ": LEVI better than each: **%s**; paper's order: **%s**\n",
                    verdict(1, beats), verdict(present == 3, all));
    }
    /* 4. Per-layer study: early layers better OOD, later layers better ID. Early = the first
       half of the layers present, late = the rest; compared by their mean metrics. */
    {
        const cJSON *by_layer[32];
        int n = layer_methods(results, by_layer), k_idx[32], c = 0;
        for (int k = 0; k < n; k++)
            if (by_layer[k]) k_idx[c++] = k;
        if (c >= 2) {
            double e_id = 0, l_id = 0, e_ood = 0, l_ood = 0;
            int ne = c / 2, nl = c - c / 2, best_id = -1, best_ood = -1;
            double bid = NAN, bood = NAN;
            for (int i = 0; i < c; i++) {
                const cJSON *m = by_layer[k_idx[i]];
                double id = stat_of(m, "id_test", "mean"), ood = stat_of(m, "ood", "mean");
                if (i < ne)
                    e_id += id / ne, e_ood += ood / ne;
                else
                    l_id += id / nl, l_ood += ood / nl;
                if (isfinite(id) && (best_id < 0 || BETTER(id, bid))) bid = id, best_id = k_idx[i];
                if (isfinite(ood) && (best_ood < 0 || BETTER(ood, bood)))
                    bood = ood, best_ood = k_idx[i];
            }
            int ood_early = BETTER(e_ood, l_ood), id_late = BETTER(l_id, e_id);
            fprintf(f,
                    "- Early layers better OOD, later layers better ID (Fig. 4): early half "
                    "(layers %d-%d) ID %.3f / OOD %.3f, late half (layers %d-%d) ID %.3f / OOD "
                    "%.3f; best ID at layer %d, best OOD at layer %d: early better OOD **%s**, "
                    "later better ID **%s**\n",
                    k_idx[0], k_idx[ne - 1], e_id, e_ood, k_idx[ne], k_idx[c - 1], l_id, l_ood,
                    best_id, best_ood, verdict(1, ood_early), verdict(1, id_late));
        } else {
            fprintf(f, "- Early layers better OOD, later layers better ID: **not run** (needs "
                       "--methods layers)\n");
        }
    }
    /* 5. Efficiency: LEVI trains far fewer parameters than FT at about FT's FLOPs (Table 15:
       ~2M vs 60M trainable, 33G + ~4M vs 33G FLOPs). */
    if (levi && ft) {
        double lt = cost_mean(levi, "trainable_params"), ftt = cost_mean(ft, "trainable_params");
        double lf = cost_mean(levi, "flops_per_example"), ff = cost_mean(ft, "flops_per_example");
        char a[32], b[32], c2[32], d[32];
        fmt_si(a, sizeof a, lt);
        fmt_si(b, sizeof b, ftt);
        fmt_si(c2, sizeof c2, lf);
        fmt_si(d, sizeof d, ff);
        int known = isfinite(lt) && isfinite(ftt) && isfinite(lf) && isfinite(ff);
        fprintf(f,
                "- LEVI trains far fewer parameters than FT at about FT's FLOPs (within 5%%): "
                "trainable %s vs %s, FLOPs/example %s vs %s: **%s**\n",
                a, b, c2, d, verdict(known, known && lt < 0.2 * ftt && lf <= 1.05 * ff));
    } else if (levi) {
        double lt = cost_mean(levi, "trainable_params");
        double bb = cost_mean(levi, "inference_params") - lt;
        char a[32], b[32];
        fmt_si(a, sizeof a, lt);
        fmt_si(b, sizeof b, bb);
        fprintf(f,
                "- LEVI's trainable parameters and FLOPs vs FT's: LEVI trains %s; FT would train "
                "the backbone's %s plus a head: **not run** (needs ft)\n",
                a, b);
    } else {
        fprintf(f, "- LEVI's trainable parameters and FLOPs vs FT's: **not run**\n");
    }
#undef BETTER
    fputc('\n', f);
}

void levi_report_markdown(FILE *f, const cJSON *results) {
    md_header(f, results);
    fprintf(f, "## Table 1 style: ID and OOD %s\n\n", metric_label(results));
    table1(f, results);
    if (has_paper(results))
        fputs("\nPaper columns: Table 1 (LEVI, LP) and Table 5 (A3-A5) with a fine-tuned T5x; "
              "ours use a frozen all-MiniLM-L6-v2, so compare orderings, not digits.\n",
              f);
    fputc('\n', f);
    md_methods_fig(f, results);
    md_table5(f, results);
    md_tuned(f, results);
    md_fig4(f, results);
    md_groups(f, results);
    md_adapters(f, results);
    md_efficiency(f, results);
    md_claims(f, results);
    md_selection_and_times(f, results);
    md_paper_reference(f, results);
}

/* ---------------------------------------------------------------------------------------
 * results.csv: one row per method x seed x eval set (and per adapter). */
static void csv_field(FILE *f, const char *s) {
    if (strpbrk(s, ",\"\n\r")) {
        fputc('"', f);
        for (; *s; s++) {
            if (*s == '"') fputc('"', f);
            fputc(*s, f);
        }
        fputc('"', f);
    } else {
        fputs(s, f);
    }
}

static void csv_number(FILE *f, double v) {
    if (isfinite(v))
        fprintf(f, "%.17g", v);
    else
        fputs("nan", f);
}

void levi_report_csv(FILE *f, const cJSON *results) {
    fputs("method,seed,lr,adapter,split,group,n,metric,value\n", f);
    const char *metric = str(results, "metric");
    const cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(results, "methods")) {
        const char *method = str(m, "method");
        const cJSON *run;
        cJSON_ArrayForEach(run, cJSON_GetObjectItemCaseSensitive(m, "runs")) {
            const cJSON *adapters = cJSON_GetObjectItemCaseSensitive(run, "adapters");
            int n_adapters = cJSON_GetArraySize(adapters);
            const cJSON *set;
            cJSON_ArrayForEach(set, cJSON_GetObjectItemCaseSensitive(run, "sets")) {
                const char *name = str(set, "name");
                const char *group = "";
                char split[64];
                if (strncmp(name, "ood/", 4) == 0) {
                    snprintf(split, sizeof split, "ood_group");
                    group = name + 4;
                } else {
                    snprintf(split, sizeof split, "%s", name);
                }
                const cJSON *per = cJSON_GetObjectItemCaseSensitive(set, "adapters");
                for (int j = -1; j < n_adapters; j++) {
                    csv_field(f, method);
                    fprintf(f, ",%.0f,%g,", num(run, "seed"), num(run, "lr"));
                    csv_field(f, j < 0 ? "" : str(cJSON_GetArrayItem(adapters, j), "name"));
                    fputc(',', f);
                    csv_field(f, split);
                    fputc(',', f);
                    csv_field(f, group);
                    fprintf(f, ",%.0f,%s,", num(set, "n"), metric);
                    const cJSON *x = j < 0 ? NULL : cJSON_GetArrayItem(per, j);
                    csv_number(f, j < 0 ? num(set, "value")
                                        : (cJSON_IsNumber(x) ? x->valuedouble : NAN));
                    fputc('\n', f);
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------
 * Writing the files. Each is built in memory and written atomically, so an interrupted
 * run never leaves half a report. */
static levi_status write_stream(const char *out_dir, const char *file,
                                void (*fill)(FILE *, const cJSON *), const cJSON *results,
                                levi_error *err) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s", out_dir, file) >= (int)sizeof path)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", out_dir);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: cannot build the file in memory", path);
    fill(f, results);
    fclose(f);
    levi_status st = levi_write_file_atomic(path, buf, len, err);
    free(buf);
    return st;
}

levi_status levi_report_write(const char *out_dir, const cJSON *results, levi_error *err) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s/results.json", out_dir) >= (int)sizeof path)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: path too long", out_dir);
    char *json = cJSON_Print(results);
    if (!json) return levi_errorf(err, LEVI_ERR_NOMEM, "%s: cannot serialise the results", path);
    size_t len = strlen(json);
    /* A trailing newline keeps the file friendly to line tools. */
    char *with_nl = realloc(json, len + 2);
    if (!with_nl) {
        free(json);
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
    }
    with_nl[len] = '\n';
    with_nl[len + 1] = 0;
    levi_status st = levi_write_file_atomic(path, with_nl, len + 1, err);
    free(with_nl);
    if (st != LEVI_OK) return st;
    st = write_stream(out_dir, "results.csv", levi_report_csv, results, err);
    if (st != LEVI_OK) return st;
    /* The figures report.md links (md_fig4, md_methods_fig decide the same way). */
    const cJSON *by_layer[32], *ms[32];
    if (layer_methods(results, by_layer) > 0)
        st = write_stream(out_dir, "fig4-layers.svg", fig4_svg, results, err);
    if (st == LEVI_OK && main_methods(results, ms) > 0)
        st = write_stream(out_dir, "methods.svg", methods_svg, results, err);
    if (st != LEVI_OK) return st;
    return write_stream(out_dir, "report.md", levi_report_markdown, results, err);
}
