/* Helpers shared by the CLI's commands: the progress bar for long work (feature extraction,
 * training) with rate and ETA on stderr, and the status-to-exit-code mapping.
 * Not for: library code, which reports progress through callbacks and prints nothing. */
#include "cli.h"

#include "levi/core.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct levi_progress {
    char label[64], unit[16];
    int64_t total, done;
    double t0, last_draw;
    int tty, quiet, last_decile;
};

static void fmt_time(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 1e7) {
        snprintf(buf, cap, "--:--");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else
        snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

static void draw(levi_progress *p, const char *extra, int final) {
    double el = levi_now() - p->t0;
    double rate = el > 0 ? (double)p->done / el : 0;
    double frac = p->total > 0 ? (double)p->done / (double)p->total : 0;
    if (frac > 1) frac = 1;
    char eta[32], elapsed[32];
    fmt_time(eta, sizeof eta, rate > 0 ? (double)(p->total - p->done) / rate : -1);
    fmt_time(elapsed, sizeof elapsed, el);
    char bar[31];
    int fill = (int)(frac * 30);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    fprintf(stderr, "%s%s [%s] %3.0f%% %lld/%lld %s %.1f %s/s %s %s%s%s%s", p->tty ? "\r" : "",
            p->label, bar, 100 * frac, (long long)p->done, (long long)p->total, p->unit, rate,
            p->unit, final ? "in" : "ETA", final ? elapsed : eta, extra ? " " : "",
            extra ? extra : "", p->tty ? "\033[K" : "\n");
    if (final && p->tty) fputc('\n', stderr);
    fflush(stderr);
}

levi_progress *levi_progress_start(const char *label, int64_t total, const char *unit) {
    levi_progress *p = levi_xcalloc(1, sizeof *p);
    snprintf(p->label, sizeof p->label, "%s", label);
    snprintf(p->unit, sizeof p->unit, "%s", unit);
    p->total = total;
    p->t0 = levi_now();
    p->tty = isatty(2);
    const char *env = getenv("LEVI_PROGRESS");
    p->quiet = env && strcmp(env, "0") == 0;
    p->last_decile = -1;
    return p;
}

void levi_progress_update(levi_progress *p, int64_t done, const char *extra) {
    if (!p) return;
    p->done = done;
    if (p->quiet) return;
    if (p->tty) {
        double now = levi_now();
        if (now - p->last_draw < 0.1) return;
        p->last_draw = now;
        draw(p, extra, 0);
    } else {
        int decile = p->total > 0 ? (int)(10 * done / p->total) : 0;
        if (decile <= p->last_decile) return;
        p->last_decile = decile;
        draw(p, extra, 0);
    }
}

void levi_progress_finish(levi_progress *p) {
    if (!p) return;
    if (!p->quiet) draw(p, NULL, 1);
    levi_free(p);
}

int levi_cli_exit_code(levi_status st) {
    switch (st) {
    case LEVI_OK:
        return LEVI_EXIT_OK;
    case LEVI_ERR_ARG:
        return LEVI_EXIT_USAGE;
    case LEVI_ERR_FORMAT:
    case LEVI_ERR_SHAPE:
    case LEVI_ERR_NOT_FOUND:
        return LEVI_EXIT_INPUT;
    case LEVI_ERR_INTERRUPTED:
        return LEVI_EXIT_INTERRUPTED;
    default:
        return LEVI_EXIT_FAILURE;
    }
}
