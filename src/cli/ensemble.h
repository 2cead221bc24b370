/* `levi fit` post-hoc ensembles of the paper (Sec. 5 baselines and App. D.4 ablations),
 * computed from FINISHED runs of other methods in the same output folder, never retraining
 * them:
 *   ft+lp    FT+RobustModel (Kumar et al. 2022a): calibrated output ensemble of FT and LP;
 *   ft+fs    FT+FS: FT and FS outputs averaged;
 *   wise-ft  FT+ZeroShot (WiSE-FT, Wortsman et al. 2022b): encoder weights
 *            (1-a) theta_pre + a theta_ft, a chosen on ID validation;
 *   a1       A1: two FT models (seeds k and k+1 mod --seeds) outputs averaged;
 *   a2       A2: FT and the small model (a4) outputs averaged.
 * Seed k of an ensemble combines seed k of each member; every ensemble run is written as
 * <out>/runs/<name>/seed<k>/result.json in the run-result format (report.h), so the report
 * shows them next to the trained methods. docs/ensembles.md says what each computes.
 * Not for: training (fit.c, fit_finetune.c), option parsing (fit.c), or OOD rows in any
 * choice (weights, temperatures, a are chosen on ID validation only). */
#ifndef LEVI_CLI_ENSEMBLE_H
#define LEVI_CLI_ENSEMBLE_H

#include "fit.h"

#include <cjson/cJSON.h>

/* Method ids of the ensembles in fit_config.methods: FIT_ENS_BASE + fit_ensemble_kind
   (above the head methods and FIT_FT_BASE + levi_ft_mode). */
#define FIT_ENS_BASE 200
typedef enum {
    FIT_ENS_FT_LP = 0, /* "ft+lp" */
    FIT_ENS_FT_FS,     /* "ft+fs" */
    FIT_ENS_WISE_FT,   /* "wise-ft" */
    FIT_ENS_A1,        /* "a1" */
    FIT_ENS_A2,        /* "a2" */
    FIT_ENS_COUNT
} fit_ensemble_kind;

/* FIT_ENS_BASE + kind for "ft+lp", "ft+fs", "wise-ft", "a1", "a2"; -1 otherwise. */
int fit_ensemble_parse(const char *name);
/* The name of an ensemble method id, or NULL when id is not one. */
const char *fit_ensemble_name(int id);
/* 1 when id is an ensemble method id. */
int fit_is_ensemble(int id);

/* Checks, before any training, that every member of every ensemble in cfg->methods is in
 * cfg->methods too (e.g. "ft+lp needs ft and lp in --methods"; every ensemble has ft,
 * which needs --model, so the encoder is there for WiSE-FT). Prints the problem; returns
 * LEVI_EXIT_OK or LEVI_EXIT_USAGE. */
int fit_ensembles_check(const fit_config *cfg);

/* Computes every ensemble in cfg->methods, in the order given, from the finished member runs
 * under cfg->out (call it after all other methods have run), appending one method entry per
 * ensemble to `methods` as fit_finetune_method does. Finished ensemble runs whose members
 * are unchanged are reused. Prints progress. Returns an exit code (cli.h). */
int fit_ensembles(const fit_config *cfg, fit_context *ctx, cJSON *methods);

#endif
