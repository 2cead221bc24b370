/* Helpers shared by the CLI's commands: the progress bar for long work (feature extraction,
 * training) with rate and ETA on stderr, the multi-line board that `levi fit --jobs N` draws
 * for runs going on side by side, and the status-to-exit-code mapping.
 * Not for: library code, which reports progress through callbacks and prints nothing; what
 * the lines of the board say (fit.c composes them). */
#include "cli.h"

#include "levi/core.h"

#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

struct levi_progress {
    char label[64], unit[16];
    int64_t total, done;
    double t0, last_draw;
    int tty, quiet, last_decile;
};

void levi_format_duration(char *buf, size_t cap, double s) {
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
    levi_format_duration(eta, sizeof eta, rate > 0 ? (double)(p->total - p->done) / rate : -1);
    levi_format_duration(elapsed, sizeof elapsed, el);
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

/* ---------------------------------------------------------------------------------------
 * The board: a block of lines at the bottom of a terminal, erased and redrawn in place.
 * Lines are cut to the terminal's width so that none wraps; a wrapped line would make the
 * cursor-up count wrong and leave stale copies on the screen. */
#define BOARD_MAX_LINES 64
#define BOARD_LINE_MAX 256

struct levi_board {
    int tty, quiet, width;
    double log_every, last_log, last_draw;
    int n_drawn; /* lines on the screen now */
    int n_lines;
    char lines[BOARD_MAX_LINES][BOARD_LINE_MAX];
};

levi_board *levi_board_start(double log_every_s) {
    levi_board *b = levi_xcalloc(1, sizeof *b);
    b->tty = isatty(2);
    const char *env = getenv("LEVI_PROGRESS");
    b->quiet = env && strcmp(env, "0") == 0;
    b->log_every = log_every_s;
    b->last_log = levi_now();
    b->width = 80;
    struct winsize ws;
    if (b->tty && ioctl(2, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20) b->width = ws.ws_col;
    return b;
}

static void board_erase(levi_board *b) {
    if (b->n_drawn > 0) fprintf(stderr, "\r\033[%dA\033[J", b->n_drawn);
    b->n_drawn = 0;
}

static void board_redraw(levi_board *b) {
    int cut = b->width - 1 < BOARD_LINE_MAX - 1 ? b->width - 1 : BOARD_LINE_MAX - 1;
    for (int i = 0; i < b->n_lines; i++) fprintf(stderr, "%.*s\n", cut, b->lines[i]);
    b->n_drawn = b->n_lines;
    fflush(stderr);
}

void levi_board_draw(levi_board *b, const char *const *lines, int n, const char *log_line,
                     int force) {
    if (!b || b->quiet) return;
    double now = levi_now();
    if (!b->tty) {
        if (log_line && (force || now - b->last_log >= b->log_every)) {
            fprintf(stderr, "%s\n", log_line);
            fflush(stderr);
            b->last_log = now;
        }
        return;
    }
    if (!force && now - b->last_draw < 0.2) return;
    b->last_draw = now;
    if (n > BOARD_MAX_LINES) n = BOARD_MAX_LINES;
    b->n_lines = n;
    for (int i = 0; i < n; i++) snprintf(b->lines[i], BOARD_LINE_MAX, "%s", lines[i]);
    board_erase(b);
    board_redraw(b);
}

void levi_board_print(levi_board *b, FILE *f, const char *text) {
    int live = b && !b->quiet && b->tty && b->n_drawn > 0;
    if (live) {
        board_erase(b);
        fflush(stderr);
    }
    size_t len = strlen(text);
    fputs(text, f);
    if (len == 0 || text[len - 1] != '\n') fputc('\n', f);
    fflush(f);
    if (live) board_redraw(b);
}

void levi_board_clear(levi_board *b) {
    if (!b || b->quiet || !b->tty) return;
    board_erase(b);
    fflush(stderr);
    b->last_draw = 0;
}

void levi_board_finish(levi_board *b) {
    if (!b) return;
    if (!b->quiet && b->tty) {
        board_erase(b);
        fflush(stderr);
    }
    levi_free(b);
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
