/* A small SVG writer for the report's figures: line plots with error bars and grouped bar
 * charts with error bars, each with axes, "nice" ticks, axis labels, a legend and a title.
 * Output is plain SVG 1.1 text (no scripts, no external fonts or files) that browsers,
 * rsvg-convert and Markdown viewers show as is.
 * Not for: general plotting (one fixed look, no log axes, at most PLOT_MAX_SERIES series),
 * or deciding what to plot (report.c does). NaN values are skipped (a gap in a line, no bar). */
#ifndef LEVI_CLI_PLOT_H
#define LEVI_CLI_PLOT_H

#include <stdio.h>

#define PLOT_MAX_SERIES 8
#define PLOT_MAX_TICKS 16

typedef struct plot_series {
    const char *name;  /* legend entry */
    int n;             /* points (line) or categories (bar; must equal the chart's) */
    const double *x;   /* [n] line plots only */
    const double *y;   /* [n] */
    const double *err; /* [n] half-height of the error bar (e.g. one std), or NULL */
} plot_series;

typedef struct plot_chart {
    const char *title, *x_label, *y_label;
    int n_series;
    plot_series series[PLOT_MAX_SERIES];
    /* Bar charts: category names along x, one group of bars (one per series) each. */
    int n_categories;
    const char *const *categories;
    int integer_x; /* line plots: ticks only at integers (layer indices) */
} plot_chart;

/* Ticks covering [lo, hi] at a step of 1, 2 or 5 times a power of ten, about `target` of
 * them (2..PLOT_MAX_TICKS): the first tick <= lo, the last >= hi. lo == hi is widened.
 * Returns the number of ticks written to ticks[] (at most PLOT_MAX_TICKS); *step gets the
 * step. Non-finite lo or hi give the ticks of [0, 1]. */
int plot_nice_ticks(double lo, double hi, int target, double ticks[PLOT_MAX_TICKS], double *step);

/* Writes the chart as a standalone SVG document to f. Return 0, or -1 when the chart is
 * malformed (no series, too many, a bar series whose n differs from n_categories). */
int plot_line_svg(FILE *f, const plot_chart *c);
int plot_bar_svg(FILE *f, const plot_chart *c);

#endif
