/* Benchmark: one fine-tuning step of levi's BERT encoder at MiniLM-L6 shapes with random
 * weights (no model file needed): forward in train mode, loss = MSE of a linear map of the
 * mean-pooled last hidden state against random targets, backward into every weight
 * (embeddings included), one Adam step over the encoder and the head.
 *
 * For: comparing against bench/pytorch/bench_encoder_train.py (same shapes, same loss, same
 * FLOP formula, same warmup/median protocol); bench/run.sh runs both (case c).
 * Not for: accuracy (tests/test_bert.c checks the gradients against PyTorch), inference speed
 * (bench_encoder.c).
 *
 * Dropout is off by default on both sides (--dropout P turns on hidden and attention
 * dropout in both), so the figures measure the arithmetic, not the random-number generator.
 *
 * Usage: bench_encoder_train [--threads 1] [--batch 32] [--seq 64] [--iters 5] [--warmup 1]
 *                            [--dropout 0]
 */
#include "bench_common.h"
#include "levi/bert.h"
#include "levi/ops.h"
#include "levi/optim.h"

#include <string.h>

static int arg_int(int argc, char **argv, int *i, int min) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "bench_encoder_train: %s needs a value\n", argv[*i]);
        exit(2);
    }
    char *end;
    long v = strtol(argv[++*i], &end, 10);
    if (*end || v < min || v > 1 << 20) {
        fprintf(stderr, "bench_encoder_train: %s %s: expected an integer >= %d\n", argv[*i - 1],
                argv[*i], min);
        exit(2);
    }
    return (int)v;
}

int main(int argc, char **argv) {
    int threads = 1, B = 32, S = 64, iters = 5, warmup = 1;
    float dropout = 0.0f;
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
        else if (!strcmp(argv[i], "--dropout") && i + 1 < argc)
            dropout = (float)atof(argv[++i]);
        else {
            fprintf(stderr,
                    "usage: %s [--threads N] [--batch B] [--seq S] [--iters N] [--warmup N] "
                    "[--dropout P]\n",
                    argv[0]);
            return 2;
        }
    }
    if (dropout < 0.0f || dropout >= 1.0f) {
        fprintf(stderr, "bench_encoder_train: --dropout %g: expected a value in [0, 1)\n",
                (double)dropout);
        return 2;
    }
    levi_set_num_threads(threads);
    levi_bert_config cfg = levi_bert_minilm_l6_config();
    if (S > cfg.max_pos) {
        fprintf(stderr, "bench_encoder_train: --seq %d exceeds %d positions\n", S, cfg.max_pos);
        return 2;
    }
    const int H = cfg.hidden, L = cfg.layers;
    levi_rng rng;
    levi_rng_seed(&rng, 0);
    levi_error err = {0};
    levi_bert *m = levi_bert_init_random(&cfg, &rng, &err);
    if (!m) {
        fprintf(stderr, "bench_encoder_train: %s\n", err.msg);
        return 1;
    }
    /* The regression head lives in its own table: the encoder's table is keyed by the
     * checkpoint's names and must not grow foreign tensors. */
    levi_params head;
    levi_params_init(&head);
    const int64_t wshape[2] = {1, H}, bshape[1] = {1};
    const int iw = levi_params_add(&head, "head.weight", 2, wshape);
    const int ib = levi_params_add(&head, "head.bias", 1, bshape);
    levi_params_alloc(&head);
    float *hw = levi_params_data(&head, iw), *hb = levi_params_data(&head, ib);
    for (int k = 0; k < H; k++) hw[k] = 0.05f * levi_rng_normal(&rng);
    hb[0] = 0.0f;

    const size_t N = (size_t)B * S;
    int32_t *ids = malloc(N * sizeof *ids), *mask = malloc(N * sizeof *mask);
    float *target = malloc((size_t)B * sizeof *target),
          *pooled = malloc((size_t)B * H * sizeof(float)),
          *dpooled = malloc((size_t)B * H * sizeof(float)),
          *pred = malloc((size_t)B * sizeof(float)), *dpred = malloc((size_t)B * sizeof(float)),
          *dlast = malloc(N * H * sizeof(float));
    if (!ids || !mask || !target || !pooled || !dpooled || !pred || !dpred || !dlast) {
        fprintf(stderr, "bench_encoder_train: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < N; i++) {
        ids[i] = (int32_t)levi_rng_below(&rng, (uint32_t)cfg.vocab);
        mask[i] = 1;
    }
    for (int b = 0; b < B; b++) target[b] = levi_rng_normal(&rng);

    levi_optim_params op = levi_optim_default_params(LEVI_OPT_ADAM);
    op.lr = 1e-4f;
    levi_optim *opt_bert = levi_optim_init(levi_bert_params(m), op);
    levi_optim *opt_head = levi_optim_init(&head, op);
    levi_bert_forward_params fp = levi_bert_default_forward_params();
    fp.mode = LEVI_BERT_TRAIN;
    fp.hidden_dropout = dropout;
    fp.attn_dropout = dropout;
    fp.rng = &rng;
    const float *d_hidden[64] = {0}; /* L + 1 <= 64 for any encoder we benchmark */
    if (L + 1 > 64) {
        fprintf(stderr, "bench_encoder_train: more than 63 layers\n");
        return 2;
    }
    d_hidden[L] = dlast;

    double *ts = malloc((size_t)iters * sizeof *ts), c0 = 0, w0 = 0;
    float loss = 0;
    for (int it = 0; it < warmup + iters; it++) {
        if (it == warmup) c0 = bench_cpu_seconds(), w0 = levi_now();
        double t0 = levi_now();
        levi_params_zero_grad(levi_bert_params(m));
        levi_params_zero_grad(&head);
        if (levi_bert_forward(m, ids, mask, NULL, B, S, &fp, &err) != LEVI_OK) {
            fprintf(stderr, "bench_encoder_train: %s\n", err.msg);
            return 1;
        }
        // pooled[B,H] = mean over valid tokens of hidden L; pred[B] = pooled @ w^T + b
        levi_bert_meanpool(m, L, pooled);
        levi_linear_forward(pred, pooled, hw, hb, B, H, 1);
        loss = levi_mse_forward(pred, target, B);
        // Backward accumulates: clear the buffers that receive +=.
        memset(dpred, 0, (size_t)B * sizeof *dpred);
        memset(dpooled, 0, (size_t)B * H * sizeof *dpooled);
        memset(dlast, 0, N * H * sizeof *dlast);
        levi_mse_backward(dpred, pred, target, B, 1.0f);
        levi_linear_backward(dpooled, levi_params_grad(&head, iw), levi_params_grad(&head, ib),
                             dpred, pooled, hw, B, H, 1);
        levi_meanpool_backward(dlast, dpooled, mask, B, S, H);
        levi_bert_backward(m, d_hidden, NULL, 0);
        levi_optim_step(opt_bert);
        levi_optim_step(opt_head);
        if (it >= warmup) ts[it - warmup] = levi_now() - t0;
    }
    const double cpu_wall = (bench_cpu_seconds() - c0) / (levi_now() - w0);
    const double med = bench_median(ts, iters), best = ts[0];
    const double D = H, FF = cfg.intermediate;
    /* FLOPs per step: the forward's matrix products (same formula as bench_encoder: four
     * projections, two FFN matrices, QK^T and AV; 2 FLOP per MAC), times 3 for forward +
     * backward (each product's backward is two products of the same size). The head,
     * embeddings, LayerNorm, GELU, softmax and Adam are left out of the count. */
    const double macs_tok = L * (4 * D * D + 2 * D * FF + 2 * (double)S * D);
    const double gflop = 3.0 * 2.0 * macs_tok * B * S * 1e-9;
    printf("levi encoder train step threads=%d batch=%d seq=%d dropout=%.2f GFLOP/step=%.1f "
           "params=%zu\n",
           threads, B, S, (double)dropout, gflop, levi_bert_params(m)->numel);
    printf("median %.0f ms/step: %.0f tok/s, %.1f GFLOP/s | best %.0f ms: %.0f tok/s, %.1f "
           "GFLOP/s | cpu/wall=%.2f final loss=%.4f\n",
           med * 1e3, N / med, gflop / med, best * 1e3, N / best, gflop / best, cpu_wall,
           (double)loss);
    bench_result("c", threads, "tok/s", N / med, gflop / med, cpu_wall,
                 " best=%.4g steps_per_s=%.3f gflop_per_step=%.2f batch=%d seq=%d loss=%.4f",
                 N / best, 1.0 / med, gflop, B, S, (double)loss);
    free(ts), free(ids), free(mask), free(target), free(pooled), free(dpooled), free(pred);
    free(dpred), free(dlast);
    levi_optim_free(opt_bert);
    levi_optim_free(opt_head);
    levi_params_free(&head);
    levi_bert_free(m);
    return 0;
}
