/* Shared declarations of the levi command-line tool: one function per subcommand, the
 * progress bar, and the exit codes every subcommand uses.
 * Not for: library code (nothing in src/core, models, data or methods includes this). */
#ifndef LEVI_CLI_H
#define LEVI_CLI_H

#include <stdint.h>
#include <stdio.h>

#include "levi/core.h"

/* Exit codes: documented in `levi --help`. */
enum {
    LEVI_EXIT_OK = 0,
    LEVI_EXIT_FAILURE = 1,      /* a run failed (I/O, numeric trouble) */
    LEVI_EXIT_USAGE = 2,        /* unknown option, bad option value */
    LEVI_EXIT_INPUT = 3,        /* malformed or missing input file (data, spec, model) */
    LEVI_EXIT_INTERRUPTED = 130 /* SIGINT/SIGTERM: state saved, rerun to resume */
};

/* The exit code for a library status: bad arguments are usage errors, malformed or missing
 * input is bad input, interruption is 130, anything else a failure. */
int levi_cli_exit_code(levi_status st);

int levi_cmd_encode(int argc, char **argv);
int levi_cmd_synthetic(int argc, char **argv); /* synthetic.c */
int levi_cmd_vision(int argc, char **argv);    /* vision.c */
int levi_cmd_fit(int argc, char **argv);
int levi_cmd_experiment(int argc, char **argv); /* fit.c: levi fit, --methods all */
int levi_cmd_eval(int argc, char **argv);
int levi_cmd_predict(int argc, char **argv);

/* Progress bar on stderr: "label [#####.....] 42% 1234/5678 unit 310.2 unit/s ETA 0:17 extra".
 * Redrawn in place at most ~10 times a second when stderr is a terminal; otherwise one plain
 * line every 10% (so logs stay readable). LEVI_PROGRESS=0 in the environment silences it. */
typedef struct levi_progress levi_progress;
levi_progress *levi_progress_start(const char *label, int64_t total, const char *unit);
void levi_progress_update(levi_progress *p, int64_t done, const char *extra);
void levi_progress_finish(levi_progress *p); /* prints the final line and frees; NULL ok */

/* "m:ss" or "h:mm:ss"; "--:--" for a negative, NaN or absurd number of seconds. */
void levi_format_duration(char *buf, size_t cap, double seconds);

/* A block of status lines on stderr for work going on side by side (`levi fit --jobs N`).
 * On a terminal, levi_board_draw replaces the block in place (at most 5 times a second
 * unless force); other output goes through levi_board_print, which prints it above the
 * block. Not on a terminal nothing is redrawn: levi_board_draw prints log_line (when not
 * NULL) at most once every log_every_s seconds (or when force), so logs get a plain status
 * line now and then instead of escape codes. LEVI_PROGRESS=0 silences the block and the
 * status lines (levi_board_print still prints). */
typedef struct levi_board levi_board;
levi_board *levi_board_start(double log_every_s);
void levi_board_draw(levi_board *b, const char *const *lines, int n, const char *log_line,
                     int force);
void levi_board_print(levi_board *b, FILE *f, const char *text); /* adds a missing '\n' */
void levi_board_clear(levi_board *b);  /* erases the block until the next draw; NULL ok */
void levi_board_finish(levi_board *b); /* erases the block and frees; NULL ok */

/* Set by the SIGINT/SIGTERM handler installed by main(); long loops poll it, save, and
 * return LEVI_EXIT_INTERRUPTED. */
extern volatile int levi_cli_interrupted;

#endif
