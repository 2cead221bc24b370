/* Benchmark: forward throughput of levi's BERT encoder in inference mode, all hidden states,
 * at MiniLM-L6 shapes with random weights (no model file needed).
 *
 * For: comparing against bench/pytorch/bench_encoder.py (same shapes, same FLOP formula,
 * same warmup/median protocol); bench/run.sh runs both, interleaved (case b).
 * Not for: accuracy (tests/test_bert.c), or training-mode speed.
 *
 * Usage: bench_encoder [--threads 1] [--batch 64] [--seq 64] [--iters 10] [--warmup 2]
 *                      [--pad F]   (F: fraction of each sequence that is padding, default 0)
 */
#include "bench_common.h"
#include "levi/bert.h"

#include <string.h>

static int arg_int(int argc, char **argv, int *i, int min) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "bench_encoder: %s needs a value\n", argv[*i]);
        exit(2);
    }
    char *end;
    long v = strtol(argv[++*i], &end, 10);
    if (*end || v < min || v > 1 << 20) {
        fprintf(stderr, "bench_encoder: %s %s: expected an integer >= %d\n", argv[*i - 1], argv[*i],
                min);
        exit(2);
    }
    return (int)v;
}

int main(int argc, char **argv) {
    int threads = 1, B = 64, S = 64, iters = 10, warmup = 2;
    double pad = 0.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads"))
            threads = arg_int(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--batch"))
            B = arg_int(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--seq"))
            S = arg_int(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--iters"))
            iters = arg_int(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--warmup"))
            warmup = arg_int(argc, argv, &i, 0);
        else if (!strcmp(argv[i], "--pad") && i + 1 < argc)
            pad = atof(argv[++i]);
        else {
            fprintf(stderr,
                    "usage: %s [--threads N] [--batch B] [--seq S] [--iters N] "
                    "[--warmup N] [--pad F]\n",
                    argv[0]);
            return 2;
        }
    }
    levi_set_num_threads(threads);
    levi_bert_config cfg = levi_bert_minilm_l6_config();
    if (S > cfg.max_pos) {
        fprintf(stderr, "bench_encoder: --seq %d exceeds %d positions\n", S, cfg.max_pos);
        return 2;
    }
    levi_rng rng;
    levi_rng_seed(&rng, 0);
    levi_error err = {0};
    levi_bert *m = levi_bert_init_random(&cfg, &rng, &err);
    if (!m) {
        fprintf(stderr, "bench_encoder: %s\n", err.msg);
        return 1;
    }
    int32_t *ids = malloc((size_t)B * S * sizeof *ids),
            *mask = malloc((size_t)B * S * sizeof *mask);
    int valid = S - (int)(pad * S);
    if (valid < 1) valid = 1;
    for (int i = 0; i < B * S; i++) {
        ids[i] = (int32_t)levi_rng_below(&rng, (uint32_t)cfg.vocab);
        mask[i] = i % S < valid;
    }
    levi_bert_forward_params fp = levi_bert_default_forward_params(); // inference
    double *ts = malloc((size_t)iters * sizeof *ts);
    double c0 = 0, w0 = 0;
    for (int i = 0; i < warmup + iters; i++) {
        if (i == warmup) c0 = bench_cpu_seconds(), w0 = levi_now();
        double t0 = levi_now();
        if (levi_bert_forward(m, ids, mask, NULL, B, S, &fp, &err) != LEVI_OK) {
            fprintf(stderr, "bench_encoder: %s\n", err.msg);
            return 1;
        }
        if (i >= warmup) ts[i - warmup] = levi_now() - t0;
    }
    const double cpu_wall = (bench_cpu_seconds() - c0) / (levi_now() - w0);
    // Keep the result observable so nothing can be optimised away.
    volatile float sink = levi_bert_hidden(m, cfg.layers)[0];
    (void)sink;
    qsort(ts, (size_t)iters, sizeof *ts, bench_cmp_double);
    const double med = ts[iters / 2], best = ts[0];
    const double D = cfg.hidden, FF = cfg.intermediate, L = cfg.layers;
    // Same formula as bench_encoder.py: projections + FFN + QK^T and AV, 2 FLOP per MAC.
    const double macs_tok = L * (4 * D * D + 2 * D * FF + 2 * (double)S * D);
    const double gflop = 2 * macs_tok * B * S * 1e-9;
    printf("levi threads=%d batch=%d seq=%d pad=%.2f GFLOP/batch=%.1f arena=%.1f MiB\n", threads, B,
           S, pad, gflop, levi_bert_infer_arena_bytes(&cfg, B, S, threads) / 1048576.0);
    printf("median %.0f ms/batch: %.1f seq/s, %.0f tok/s, %.1f GFLOP/s | best %.0f ms: %.1f "
           "seq/s, %.0f tok/s, %.1f GFLOP/s | cpu/wall=%.2f\n",
           med * 1e3, B / med, B * S / med, gflop / med, best * 1e3, B / best, B * S / best,
           gflop / best, cpu_wall);
    bench_result("b", threads, "tok/s", B * S / med, gflop / med, cpu_wall,
                 " best=%.4g gflop_per_batch=%.2f batch=%d seq=%d", B * S / best, gflop, B, S);
    free(ts), free(ids), free(mask);
    levi_bert_free(m);
    return 0;
}
