/* Entry point of the levi command-line tool: `levi --help`, `levi --version`, the
 * SIGINT/SIGTERM handlers that long loops poll, and dispatch to one function per subcommand.
 * Not for: option parsing of subcommands (each levi_cmd_* parses its own arguments) or any
 * work of its own; this is the only place in levi that returns an exit status to the shell. */
#include "cli.h"

#include "levi/core.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef LEVI_VERSION_STRING
#define LEVI_VERSION_STRING "0.1.0"
#endif

volatile int levi_cli_interrupted = 0;

/* First signal: ask the running loop to save and stop (it returns 130). A second one means
 * the user does not want to wait for the save: leave at once with the same code. */
static void on_signal(int sig) {
    (void)sig;
    if (levi_cli_interrupted) _exit(LEVI_EXIT_INTERRUPTED);
    levi_cli_interrupted = 1;
    static const char msg[] = "\nlevi: interrupted; saving state (press Ctrl-C again to quit "
                              "now)\n";
    ssize_t w = write(2, msg, sizeof msg - 1);
    (void)w;
}

static void install_signal_handlers(void) {
    /* No SA_RESTART: a blocking read should return so the loop notices the flag. On an
     * alternate stack: see levi_signal_handler. */
    levi_error err;
    if (levi_signal_handler(SIGINT, on_signal, &err) != LEVI_OK ||
        levi_signal_handler(SIGTERM, on_signal, &err) != LEVI_OK)
        fprintf(stderr, "levi: warning: %s; Ctrl-C will not save state\n", err.msg);
}

static void print_usage(FILE *f) {
    fprintf(f,
            "usage: levi <command> [options]\n"
            "       levi --help | --version\n"
            "\n"
            "LEVI (Roh et al., ICML 2024): a frozen pre-trained model and a small model trained\n"
            "from scratch, joined by per-layer adapters, for better out-of-distribution results.\n"
            "\n"
            "Commands:\n"
            "  fit <spec.json|movielens>  train LEVI and baselines, write results.json/.csv and\n"
            "                             report.md (`levi fit movielens` runs the main task)\n"
            "  experiment <spec.json|movielens>\n"
            "                             the whole experiment: `levi fit` with --methods all\n"
            "                             (every baseline, backbone training, LEVI on tuned\n"
            "                             backbones, ensembles, per-layer study); resumable\n"
            "  eval <out-dir>             reload the checkpoints of a fit and recompute the\n"
            "                             metrics and reports without training\n"
            "  predict <out-dir>          predict ratings for new rows with a fitted method\n"
            "  encode                     extract and cache the backbone's per-layer features\n"
            "  synthetic appb|e8          the paper's synthetic studies: App. B's linear\n"
            "                             example (Table 6) and E.8's spurious features\n"
            "  vision                     LEVI and baselines on Fashion-MNIST with quality-shift\n"
            "                             OOD groups (frozen EfficientNet-Lite0)\n"
            "\n"
            "`levi <command> --help` describes each command's options.\n"
            "\n"
            "Exit codes:\n"
            "  %3d  success\n"
            "  %3d  a run failed (I/O error, numeric trouble)\n"
            "  %3d  usage error: unknown command or option, bad option value\n"
            "  %3d  bad input: missing or malformed data, spec or model file\n"
            "  %3d  interrupted by SIGINT/SIGTERM: finished runs are kept, rerun to resume\n"
            "\n"
            "Environment:\n"
            "  LEVI_CACHE            cache of models, data and backbone features\n"
            "                        (default ${XDG_CACHE_HOME:-$HOME/.cache}/levi)\n"
            "  LEVI_PROGRESS=0       no progress bars on stderr\n"
            "  OMP_NUM_THREADS       threads for kernels and matrix products (default: all\n"
            "                        cores; --threads overrides)\n"
            "  LEVI_GEMM=openblas    every matrix product through OpenBLAS (default: oneDNN\n"
            "                        for the large ones; results differ in the last bits)\n",
            LEVI_EXIT_OK, LEVI_EXIT_FAILURE, LEVI_EXIT_USAGE, LEVI_EXIT_INPUT,
            LEVI_EXIT_INTERRUPTED);
}

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
} command;

static const command commands[] = {
    {"fit", levi_cmd_fit},       {"experiment", levi_cmd_experiment},
    {"eval", levi_cmd_eval},     {"predict", levi_cmd_predict},
    {"encode", levi_cmd_encode}, {"synthetic", levi_cmd_synthetic},
    {"vision", levi_cmd_vision},
};
#define N_COMMANDS (sizeof commands / sizeof commands[0])

/* "fit, eval, ..." from the table, so error messages cannot go stale. */
static void print_command_names(FILE *f) {
    for (size_t i = 0; i < N_COMMANDS; i++) fprintf(f, "%s%s", i ? ", " : "", commands[i].name);
}

/* OpenMP's worker threads spin after each parallel loop by default, stealing the cores that
 * OpenBLAS's own threads need for the GEMM that follows (measured at 2 threads: the encoder
 * ran ~20% and the LEVI step ~2x slower than with PASSIVE). libgomp reads the policy once,
 * before main, so the only way to set it for users who did not is to set it and re-execute
 * this program once. An explicit OMP_WAIT_POLICY is respected; if the re-exec fails we go on
 * with the default policy. */
static void ensure_passive_openmp(char **argv) {
#ifdef _OPENMP
    if (getenv("OMP_WAIT_POLICY")) return;
    if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return;
    execv("/proc/self/exe", argv);
#else
    (void)argv;
#endif
}

int main(int argc, char **argv) {
    ensure_passive_openmp(argv);
    if (argc < 2) {
        print_usage(stderr);
        return LEVI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "help") == 0) {
        /* `levi help fit` is `levi fit --help`. */
        if (strcmp(cmd, "help") == 0 && argc > 2) {
            for (size_t i = 0; i < N_COMMANDS; i++) {
                if (strcmp(argv[2], commands[i].name) == 0) {
                    char *sub_argv[] = {argv[2], "--help", NULL};
                    return commands[i].run(2, sub_argv);
                }
            }
            fprintf(stderr, "levi: unknown command '%s' (commands: ", argv[2]);
            print_command_names(stderr);
            fputs(")\n", stderr);
            return LEVI_EXIT_USAGE;
        }
        print_usage(stdout);
        return LEVI_EXIT_OK;
    }
    if (strcmp(cmd, "-V") == 0 || strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        printf("levi %s\n", LEVI_VERSION_STRING);
        return LEVI_EXIT_OK;
    }
    for (size_t i = 0; i < N_COMMANDS; i++) {
        if (strcmp(cmd, commands[i].name) == 0) {
            install_signal_handlers();
            levi_set_num_threads(0); /* the default team, its threads blocking signals */
            /* Subcommands see argv[0] = their own name, like getopt-style tools expect. */
            return commands[i].run(argc - 1, argv + 1);
        }
    }
    if (cmd[0] == '-')
        fprintf(stderr, "levi: unknown option '%s' (expected a command; see levi --help)\n", cmd);
    else {
        fprintf(stderr, "levi: unknown command '%s' (expected one of: ", cmd);
        print_command_names(stderr);
        fputs("; see levi --help)\n", stderr);
    }
    return LEVI_EXIT_USAGE;
}
