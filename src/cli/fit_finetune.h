/* `levi fit` for the backbone-training baselines (ft, ht, lp-ft, fs, lora: finetune.h): the
 * learning-rate grid on ID validation with seed 0, then the other seeds, each run written as
 * <out>/runs/<method>/seed<k>/result.json in the run-result format report.h reads, so the
 * report includes them next to the cached-feature methods.
 * Not for: option parsing (fit.c) or the cached-feature methods (fit.c's fit_method). */
#ifndef LEVI_CLI_FIT_FINETUNE_H
#define LEVI_CLI_FIT_FINETUNE_H

#include "fit.h"
#include "levi/finetune.h"

typedef struct fit_finetune_options {
    int max_len;            /* tokens per text (64) */
    int epochs, patience;   /* 0: the fit's --epochs / --patience */
    int batch;              /* 0: the fit's --batch */
    int micro_batch;        /* rows per forward inside a batch (0: the whole batch) */
    double train_fraction;  /* --scale: fraction of the ID-train rows (1) */
    int64_t max_train_rows; /* cap on ID-train rows (0: none) */
    int64_t max_val_rows;   /* cap on the ID-val rows early stopping reads (0: none) */
    int head_hidden;        /* 0: linear head */
    levi_bert_lora_params lora;
    float lp_lr; /* lp-ft's probing phase */
    int lp_epochs;
    int save_backbone; /* 1: each run saves its tuned backbone to <run>/backbone/ */
    /* Runs trained side by side (--jobs): > 1 trains a stage's runs (the learning-rate
     * search, then the other seeds) in up to `jobs` child processes with one thread each,
     * their output in <run>/train.log; the results are those of jobs 1 with one thread. */
    int jobs;
} fit_finetune_options;

fit_finetune_options fit_finetune_default_options(void);

/* 1 when name is one of ft, ht, lp-ft, fs, lora. */
int fit_is_finetune_method(const char *name);

/* Trains method_name over the lr grid (cfg->lrs, or the paper's {1e-4, 1e-3, 1e-2, 1e-1}) on
 * ctx's texts and labels, chooses the lr on ID validation, runs cfg->seeds seeds, evaluates
 * every eval set of ctx, and appends the method's entry to `methods` (as fit.c's fit_method
 * does). Finished runs found under cfg->out are reused, interrupted ones resume. Prints
 * progress. Returns an exit code (cli.h). ctx needs no backbone features. */
int fit_finetune_method(const char *method_name, const fit_config *cfg, fit_context *ctx,
                        const fit_finetune_options *opt, cJSON *methods);

#endif
