/* Results of `levi fit` / `levi eval` as files: per-method aggregation over seeds (mean and
 * sample std), results.json, results.csv, report.md in the paper's table layouts (Table 1,
 * Table 5, Fig. 4, Tables 9/10, Table 15) with the paper's own numbers beside ours, SVG
 * figures (plot.h), and the Table-1-style table on stdout.
 *
 * The data model is a cJSON document, because it is what results.json holds and what
 * `levi eval` rebuilds; its shape is written down below and checked where it is read.
 *
 * Per-run result (runs/<method>/seed<k>/result.json, one finished training run):
 *   {"format": "levi-run-result", "version": 1, "method": "levi", "seed": 0, "lr": 0.001,
 *    "metric": "rmse", "key": "<hash of everything that defines the run>",
 *    "train": {"epochs_run", "best_epoch", "best_val", "diverged", "stopped_early", "steps",
 *              "seconds", "examples_per_s"},
 *    "eval_seconds": s,
 *    "cost": {"trainable_params", "inference_params", "flops_per_example", "backbone_layers",
 *             "mean_tokens", "seconds_per_epoch", "peak_rss_kib"}   (fit.h: fit_add_run_cost;
 *             absent in runs written before it existed: the efficiency table shows "-"),
 *    "adapters": [{"name": "small+layer3", "layer": 3}, ...],
 *    "sets": [{"name": "id_val"|"id_test"|"ood"|"ood/<group>", "n": rows, "value": metric,
 *              "adapters": [metric per adapter]}, ...]}
 * Whole fit (results.json):
 *   {"format": "levi-results", "version": 1, "task", "metric", "lower_is_better",
 *    "config": {...}, "dataset": {"name", "rows", "train", "val", "test", "ood",
 *    "groups": [{"name", "n"}]}, "features": {...}, "wall_s": {...},
 *    "methods": [{"method", "label", "lr_grid": [...], "lr_val": [...], "chosen_lr",
 *                 "runs": [per-run result, ...],
 *                 "summary": {"<set>": {"mean", "std", "n_seeds", "n"}},
 *                 "adapter_summary": [{"name", "layer", "<set>": {"mean", "std"}}],
 *                 "train_seconds"}]}
 * Not for: training or evaluation (fit.c does them), or reading anything but results. */
#ifndef LEVI_CLI_REPORT_H
#define LEVI_CLI_REPORT_H

#include "levi/core.h"

#include <cjson/cJSON.h>
#include <stdio.h>

/* Display name of a method ("levi" -> "LEVI"); the name itself when unknown. */
const char *levi_report_method_label(const char *method);

/* Fills method["summary"] and method["adapter_summary"] from method["runs"] (replacing
 * them): mean and sample standard deviation (n - 1; 0 for one seed) over seeds of every
 * eval set's metric, NaN metrics (diverged runs) included as NaN. Also "train_seconds". */
void levi_report_summarize_method(cJSON *method);

/* Writes results.json, results.csv and report.md into out_dir, each atomically, and the
 * figures report.md links: fig4-layers.svg (ID and OOD per layer, when the per-layer study's
 * layer<k> methods ran) and methods.svg (ID and OOD per method, the other methods). report.md
 * also holds the Fig. 4 table, the efficiency table (Table 15 layout, from each run's "cost")
 * and the paper's claims, each marked yes / no / not run on our numbers. */
levi_status levi_report_write(const char *out_dir, const cJSON *results, levi_error *err);

/* The Table-1-style table (Method | ID | OOD (N groups) | paper ID | paper OOD). */
void levi_report_print_table1(FILE *f, const cJSON *results);

/* The parts of report.md, exposed for tests and for eval's stdout. */
void levi_report_markdown(FILE *f, const cJSON *results);
void levi_report_csv(FILE *f, const cJSON *results);

#endif
