/* SVG line plots and bar charts for report.md (plot.h): layout, nice ticks, XML escaping.
 * Not for: anything but drawing: the numbers come ready from report.c. */
#include "plot.h"

#include <math.h>
#include <string.h>

/* Canvas and plot area in SVG user units (pixels). */
#define W 640
#define H 400
#define LEFT 72
#define RIGHT 160 /* room for the legend */
#define TOP 44
#define BOTTOM 64

/* Colour-blind-safe palette (Okabe-Ito); the first two follow the paper's Fig. 4: ID blue,
   OOD red. */
static const char *const COLORS[PLOT_MAX_SERIES] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                                    "#E69F00", "#56B4E9", "#000000", "#F0E442"};

int plot_nice_ticks(double lo, double hi, int target, double ticks[PLOT_MAX_TICKS], double *step) {
    if (!isfinite(lo) || !isfinite(hi)) lo = 0, hi = 1;
    if (lo > hi) {
        double t = lo;
        lo = hi;
        hi = t;
    }
    if (hi - lo < 1e-12 * (fabs(lo) + fabs(hi)) || hi == lo) {
        double pad = lo != 0 ? fabs(lo) * 0.05 : 0.5;
        lo -= pad;
        hi += pad;
    }
    if (target < 2) target = 2;
    if (target > PLOT_MAX_TICKS - 1) target = PLOT_MAX_TICKS - 1;
    double raw = (hi - lo) / (target - 1);
    double p = pow(10, floor(log10(raw)));
    double s = 10 * p;
    static const double mult[] = {1, 2, 5, 10};
    for (int i = 0; i < 4; i++)
        if (mult[i] * p >= raw) {
            s = mult[i] * p;
            break;
        }
    /* A step too small for the tick budget (rounding at the edges) moves to the next. */
    double first = floor(lo / s + 1e-9) * s;
    while (first + (PLOT_MAX_TICKS - 1) * s < hi - 1e-9 * s) s *= 2;
    first = floor(lo / s + 1e-9) * s;
    int n = 0;
    for (double t = first; n < PLOT_MAX_TICKS; t = first + n * s) {
        ticks[n++] = fabs(t) < 1e-12 * s ? 0 : t; /* no "-0" */
        if (t >= hi - 1e-9 * s) break;
    }
    *step = s;
    return n;
}

/* Text with &, <, >, " escaped. */
static void put_text(FILE *f, const char *s) {
    for (; s && *s; s++) {
        switch (*s) {
        case '&':
            fputs("&amp;", f);
            break;
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        default:
            fputc(*s, f);
        }
    }
}

/* Digits enough for the tick step (0.02 -> 2 decimals). */
static int tick_decimals(double step) {
    int d = (int)ceil(-log10(step) - 1e-9);
    return d < 0 ? 0 : d > 6 ? 6 : d;
}

typedef struct frame {
    double x0, x1, y0, y1; /* data range of the axes */
    double yt[PLOT_MAX_TICKS], ystep;
    int ny;
} frame;

static double px(const frame *fr, double x) {
    return LEFT + (x - fr->x0) / (fr->x1 - fr->x0) * (W - LEFT - RIGHT);
}
static double py(const frame *fr, double y) {
    return H - BOTTOM - (y - fr->y0) / (fr->y1 - fr->y0) * (H - TOP - BOTTOM);
}

static void header(FILE *f, const plot_chart *c) {
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%d\" "
            "height=\"%d\" viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
            "<rect x=\"0\" y=\"0\" width=\"%d\" height=\"%d\" fill=\"white\"/>\n",
            W, H, W, H, W, H);
    fprintf(f, "<text x=\"%d\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">",
            (LEFT + W - RIGHT) / 2);
    put_text(f, c->title);
    fputs("</text>\n", f);
}

/* The y range over y +- err of every finite point, then its ticks. */
static void y_frame(const plot_chart *c, frame *fr) {
    double lo = INFINITY, hi = -INFINITY;
    for (int s = 0; s < c->n_series; s++)
        for (int i = 0; i < c->series[s].n; i++) {
            double y = c->series[s].y[i];
            double e = c->series[s].err && isfinite(c->series[s].err[i]) ? c->series[s].err[i] : 0;
            if (!isfinite(y)) continue;
            if (y - e < lo) lo = y - e;
            if (y + e > hi) hi = y + e;
        }
    fr->ny = plot_nice_ticks(lo, hi, 6, fr->yt, &fr->ystep);
    fr->y0 = fr->yt[0];
    fr->y1 = fr->yt[fr->ny - 1];
}

/* Axes box, y grid and y tick labels, axis labels. */
static void axes(FILE *f, const plot_chart *c, const frame *fr) {
    int d = tick_decimals(fr->ystep);
    for (int i = 0; i < fr->ny; i++) {
        double y = py(fr, fr->yt[i]);
        fprintf(f,
                "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#dddddd\"/>\n"
                "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.*f</text>\n",
                LEFT, y, W - RIGHT, y, LEFT - 6, y + 4, d, fr->yt[i]);
    }
    fprintf(f,
            "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" "
            "stroke=\"black\"/>\n",
            LEFT, TOP, W - LEFT - RIGHT, H - TOP - BOTTOM);
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">", (LEFT + W - RIGHT) / 2, H - 16);
    put_text(f, c->x_label);
    fprintf(
        f,
        "</text>\n<text x=\"18\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(-90 18 %d)\">",
        (TOP + H - BOTTOM) / 2, (TOP + H - BOTTOM) / 2);
    put_text(f, c->y_label);
    fputs("</text>\n", f);
}

static void legend(FILE *f, const plot_chart *c) {
    for (int s = 0; s < c->n_series; s++) {
        int y = TOP + 10 + 20 * s;
        fprintf(f,
                "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"10\" fill=\"%s\"/>\n"
                "<text x=\"%d\" y=\"%d\">",
                W - RIGHT + 14, y - 9, COLORS[s], W - RIGHT + 34, y);
        put_text(f, c->series[s].name);
        fputs("</text>\n", f);
    }
}

static void error_bar(FILE *f, double x, double ylo, double yhi, const char *color) {
    fprintf(f,
            "<path d=\"M%.1f %.1fV%.1fM%.1f %.1fH%.1fM%.1f %.1fH%.1f\" stroke=\"%s\" "
            "fill=\"none\"/>\n",
            x, ylo, yhi, x - 4, ylo, x + 4, x - 4, yhi, x + 4, color);
}

static int valid(const plot_chart *c) {
    return c && c->n_series >= 1 && c->n_series <= PLOT_MAX_SERIES;
}

int plot_line_svg(FILE *f, const plot_chart *c) {
    if (!valid(c)) return -1;
    frame fr;
    y_frame(c, &fr);
    double lo = INFINITY, hi = -INFINITY;
    for (int s = 0; s < c->n_series; s++)
        for (int i = 0; i < c->series[s].n; i++)
            if (isfinite(c->series[s].x[i])) {
                if (c->series[s].x[i] < lo) lo = c->series[s].x[i];
                if (c->series[s].x[i] > hi) hi = c->series[s].x[i];
            }
    double xt[PLOT_MAX_TICKS], xstep;
    int nx = plot_nice_ticks(lo, hi, 8, xt, &xstep);
    if (c->integer_x && isfinite(lo)) {
        /* Layer indices: whole numbers only, every one when they fit. */
        xstep = xstep < 1 ? 1 : ceil(xstep);
        nx = 0;
        for (double t = ceil(lo); t <= hi + 1e-9 && nx < PLOT_MAX_TICKS; t += xstep) xt[nx++] = t;
        if (nx == 0) xt[nx++] = lo;
    }
    /* Points sit inside the box: half a step of margin on both sides. */
    fr.x0 = (isfinite(lo) ? lo : xt[0]) - 0.5 * xstep;
    fr.x1 = (isfinite(hi) ? hi : xt[nx - 1]) + 0.5 * xstep;
    header(f, c);
    axes(f, c, &fr);
    int d = c->integer_x ? 0 : tick_decimals(xstep);
    for (int i = 0; i < nx; i++) {
        if (xt[i] < fr.x0 || xt[i] > fr.x1) continue;
        double x = px(&fr, xt[i]);
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"black\"/>\n"
                "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%.*f</text>\n",
                x, H - BOTTOM, x, H - BOTTOM + 5, x, H - BOTTOM + 19, d, xt[i]);
    }
    for (int s = 0; s < c->n_series; s++) {
        const plot_series *ps = &c->series[s];
        const char *col = COLORS[s];
        /* The line breaks at NaN points. */
        int open = 0;
        for (int i = 0; i < ps->n; i++) {
            if (!isfinite(ps->x[i]) || !isfinite(ps->y[i])) {
                if (open) fputs("\"/>\n", f);
                open = 0;
                continue;
            }
            if (!open)
                fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"",
                        col);
            fprintf(f, "%s%.1f,%.1f", open ? " " : "", px(&fr, ps->x[i]), py(&fr, ps->y[i]));
            open = 1;
        }
        if (open) fputs("\"/>\n", f);
        for (int i = 0; i < ps->n; i++) {
            if (!isfinite(ps->x[i]) || !isfinite(ps->y[i])) continue;
            double x = px(&fr, ps->x[i]), y = py(&fr, ps->y[i]);
            if (ps->err && isfinite(ps->err[i]) && ps->err[i] > 0)
                error_bar(f, x, py(&fr, ps->y[i] - ps->err[i]), py(&fr, ps->y[i] + ps->err[i]),
                          col);
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n", x, y, col);
        }
    }
    legend(f, c);
    fputs("</svg>\n", f);
    return 0;
}

int plot_bar_svg(FILE *f, const plot_chart *c) {
    if (!valid(c) || c->n_categories < 1 || !c->categories) return -1;
    for (int s = 0; s < c->n_series; s++)
        if (c->series[s].n != c->n_categories) return -1;
    frame fr;
    y_frame(c, &fr);
    /* Bars start at the axis floor: a zero floor for RMSE-like numbers near 1 would make the
       differences invisible, so the floor is the lowest tick, written on the axis. */
    fr.x0 = 0;
    fr.x1 = c->n_categories;
    header(f, c);
    axes(f, c, &fr);
    double group_w = (double)(W - LEFT - RIGHT) / c->n_categories;
    double bar_w = group_w * 0.8 / c->n_series;
    for (int k = 0; k < c->n_categories; k++) {
        double gx = LEFT + k * group_w;
        /* Labels of many categories are rotated so they do not overlap. */
        double lx = gx + group_w / 2;
        if (c->n_categories > 6)
            fprintf(f,
                    "<text x=\"%.1f\" y=\"%d\" text-anchor=\"end\" font-size=\"10\" "
                    "transform=\"rotate(-35 %.1f %d)\">",
                    lx, H - BOTTOM + 14, lx, H - BOTTOM + 14);
        else
            fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">", lx, H - BOTTOM + 18);
        put_text(f, c->categories[k]);
        fputs("</text>\n", f);
        for (int s = 0; s < c->n_series; s++) {
            const plot_series *ps = &c->series[s];
            if (!isfinite(ps->y[k])) continue;
            double x = gx + group_w * 0.1 + s * bar_w;
            double top = py(&fr, ps->y[k]), base = py(&fr, fr.y0);
            fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>\n",
                    x, top, bar_w * 0.92, base - top, COLORS[s]);
            if (ps->err && isfinite(ps->err[k]) && ps->err[k] > 0)
                error_bar(f, x + bar_w * 0.46, py(&fr, ps->y[k] - ps->err[k]),
                          py(&fr, ps->y[k] + ps->err[k]), "black");
        }
    }
    legend(f, c);
    fputs("</svg>\n", f);
    return 0;
}
