/* Training-throughput benchmark of the cached-feature LEVI step, in the shapes of
 * bench/pytorch/bench_train.py (a copy of ../shared/bench/pytorch/bench_train.py) so the two can be
 * compared as a ratio: 6 categorical columns (vocabularies 943, 1682, 21, 61, 800, 1682) embedded
 * in 32 dims -> MLP 192-512-256
 * -> 6 adapters (640-256-1) on 6 frozen 384-d layer features, MSE averaged over adapters,
 * Adam, batch 200, random data of 100,000 examples, batches sliced from one permutation
 * exactly as the PyTorch script does.
 *
 * Usage: bench_train [--threads N] [--steps 2000] [--warmup 50] [--batch 200]
 *                    [--n-examples 100000] [--profile]
 * --profile adds a per-phase time breakdown (gather, forward, loss, backward, optimizer) from
 * the library's internal step functions.
 * Not for: correctness (tests/test_levi.c) or real data.
 */
#include "bench_common.h"
#include "levi/levi.h"

#include "../src/methods/head_internal.h"

#include <math.h>
#include <string.h>

enum { NCAT = 6, EMB = 32, H1 = 512, H2 = 256, NL = 6, FD = 384, AH = 256 };
static const int32_t VOCABS[NCAT] = {943, 1682, 21, 61, 800, 1682};

/* An approximately normal number from one 64-bit draw (sum of four 16-bit uniforms):
 * generating 230 M Box-Muller normals would take longer than the benchmark. */
static float quick_normal(levi_rng *r) {
    uint64_t u = levi_rng_u64(r);
    float s = 0.0f;
    for (int k = 0; k < 4; k++) s += (float)((u >> (16 * k)) & 0xffff) * (1.0f / 65536.0f);
    return (s - 2.0f) * 1.7320508f; /* variance 4/12 -> 1 */
}

int main(int argc, char **argv) {
    int threads = 1, steps = 2000, warmup = 50, batch = 200, profile = 0, bf16 = 0;
    int64_t n = 100000;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc)
            warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
            batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--n-examples") && i + 1 < argc)
            n = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--profile"))
            profile = 1;
        else if (!strcmp(argv[i], "--precision") && i + 1 < argc &&
                 levi_precision_parse(argv[i + 1]) >= 0)
            bf16 = levi_precision_parse(argv[++i]) == LEVI_PRECISION_BF16;
        else {
            fprintf(stderr,
                    "usage: %s [--threads N] [--steps S] [--warmup W] [--batch B] "
                    "[--n-examples N] [--profile] [--precision f32|bf16]\n",
                    argv[0]);
            return 2;
        }
    }
    if (threads < 1 || steps < 1 || warmup < 0 || batch < 1 || n <= batch) {
        fprintf(stderr, "bad arguments: threads >= 1, steps >= 1, n-examples > batch\n");
        return 2;
    }
    levi_set_num_threads(threads);

    /* Data, generated like the PyTorch script's (values differ; shapes and sizes match). */
    levi_rng r;
    levi_rng_seed(&r, 0);
    int32_t *cat = malloc(sizeof(int32_t) * (size_t)n * NCAT);
    float *feats = malloc(sizeof(float) * (size_t)n * NL * FD);
    float *y = malloc(sizeof(float) * (size_t)n);
    int64_t *perm = malloc(sizeof(int64_t) * (size_t)n);
    if (!cat || !feats || !y || !perm) {
        fprintf(stderr, "out of memory for %lld examples\n", (long long)n);
        return 1;
    }
    for (int64_t i = 0; i < n; i++) {
        for (int c = 0; c < NCAT; c++) cat[i * NCAT + c] = (int32_t)levi_rng_below(&r, VOCABS[c]);
        y[i] = (float)(1 + levi_rng_below(&r, 5));
        perm[i] = i;
    }
    for (size_t i = 0; i < (size_t)n * NL * FD; i++) feats[i] = quick_normal(&r);
    levi_rng_shuffle_i64(&r, perm, n);
    levi_task_data d;
    memset(&d, 0, sizeof d);
    d.n = n;
    d.n_cat = NCAT;
    d.cat = cat;
    d.cat_card = VOCABS;
    d.n_layers = NL;
    d.feat_dim = FD;
    d.feats = feats;
    d.y = y;

    levi_head_params hp = levi_head_default_params(LEVI_METHOD_LEVI);
    /* The PyTorch reference (bench/pytorch/bench_train.py) has no dropout: compare the same
       work. LEVI_BENCH_FEATURE_DROPOUT=P measures what levi's default (0.5) costs per step. */
    const char *fdrop = getenv("LEVI_BENCH_FEATURE_DROPOUT");
    hp.feature_dropout = fdrop ? (float)atof(fdrop) : 0.0f;
    levi_model *m = NULL;
    levi_error err = {0};
    if (levi_model_init(&m, &hp, &d, &err) != LEVI_OK) {
        fprintf(stderr, "model: %s\n", err.msg);
        return 1;
    }
    levi_train_params tp = levi_train_default_params();
    tp.batch_size = batch;
    tp.lr = 1e-3f;
    tp.precision = bf16 ? LEVI_PRECISION_BF16 : LEVI_PRECISION_F32;
    levi_trainer *t = NULL;
    if (levi_trainer_init(&t, m, &d, perm, n, &tp, &err) != LEVI_OK) {
        fprintf(stderr, "trainer: %s\n", err.msg);
        return 1;
    }

    int64_t B = batch;
    float loss = 0;
    for (int s = 0; s < warmup; s++) loss = levi_trainer_step(t, perm + (s * B) % (n - B), B);
    /* Laps of 200 steps as the PyTorch script (fewer steps, as in smoke tests: one lap). */
    const int lap_len = steps >= 200 ? 200 : steps;
    int nlaps = steps / lap_len;
    double *laps = malloc(sizeof(double) * (size_t)nlaps);
    double t0 = levi_now(), lap = t0, c0 = bench_cpu_seconds();
    for (int s = 0; s < steps; s++) {
        loss = levi_trainer_step(t, perm + (s * B) % (n - B), B);
        if ((s + 1) % lap_len == 0 && (s + 1) / lap_len <= nlaps) {
            double now = levi_now();
            laps[(s + 1) / lap_len - 1] = lap_len / (now - lap);
            lap = now;
        }
    }
    double dt = levi_now() - t0, cpu_wall = (bench_cpu_seconds() - c0) / dt;
    double fwd_macs = (double)(EMB * NCAT * H1 + H1 * H2) + NL * ((double)(H2 + FD) * AH + AH);
    double flop_step = 3.0 * 2.0 * fwd_macs * (double)B;
    qsort(laps, (size_t)nlaps, sizeof(double), bench_cmp_double);
    printf("levi threads=%d adapters=%s params=%zu batch=%d steps=%d precision=%s\n", threads,
           m->fused_first ? "fused" : "per-adapter", levi_model_n_params(m), batch, steps,
           bf16 ? "bf16" : "f32");
    printf("steps/s=%.1f  examples/s=%.0f  ms/step=%.2f  ~GFLOP/s=%.1f  per-200-step-lap steps/s "
           "min/median/max=%.1f/%.1f/%.1f  cpu/wall=%.2f  final loss=%.3f\n",
           steps / dt, steps * (double)B / dt, dt / steps * 1e3, flop_step * steps / dt * 1e-9,
           laps[0], laps[nlaps / 2], laps[nlaps - 1], cpu_wall, (double)loss);
    /* FLOPs per step: 3 x the forward's multiply-adds x 2 (forward + ~2x for backward), the
     * formula of bench_train.py; gathers, ReLU, the loss and Adam are not counted. */
    bench_result(
        bf16 ? "g" : "a", threads, "steps/s", steps / dt, flop_step * steps / dt * 1e-9, cpu_wall,
        " examples_per_s=%.0f lap_median=%.2f gflop_per_step=%.3f batch=%d steps=%d "
        "loss=%.4f",
        steps * (double)B / dt, laps[nlaps / 2], flop_step * 1e-9, batch, steps, (double)loss);

    if (profile) {
        /* The same step, phase by phase (mirrors levi_trainer_step), in process CPU time. */
        levi_optim_params op = levi_optim_default_params(LEVI_OPT_ADAM);
        op.lr = 1e-3f;
        levi_optim *o = levi_optim_init(levi_model_params(m), op);
        double ph[6] = {0};
        const char *names[6] = {"zero_grad", "gather", "forward", "loss", "backward", "adam"};
        levi_rng mr;
        levi_rng_seed(&mr, 1);
        int ps = steps < 1000 ? steps : 1000;
        for (int s = 0; s < ps; s++) {
            const int64_t *rows = perm + (s * B) % (n - B);
            double a = bench_cpu_seconds();
            levi_params_zero_grad(levi_model_params(m));
            double b = bench_cpu_seconds();
            levi__gather_batch(m, &d, rows, B, &mr, 1);
            double c = bench_cpu_seconds();
            levi__forward(m, B, bf16);
            double e = bench_cpu_seconds();
            levi__loss(m, B);
            double f = bench_cpu_seconds();
            levi__backward(m, B, bf16);
            double g = bench_cpu_seconds();
            levi_optim_step(o);
            double h = bench_cpu_seconds();
            ph[0] += b - a, ph[1] += c - b, ph[2] += e - c, ph[3] += f - e, ph[4] += g - f,
                ph[5] += h - g;
        }
        double tot = 0;
        for (int k = 0; k < 6; k++) tot += ph[k];
        printf("profile over %d steps (%.2f CPU ms/step):", ps, tot / ps * 1e3);
        for (int k = 0; k < 6; k++)
            printf("  %s %.2f ms (%.0f%%)", names[k], ph[k] / ps * 1e3, 100 * ph[k] / tot);
        printf("\n");
        levi_optim_free(o);
    }
    free(laps);
    levi_trainer_free(t);
    levi_model_free(m);
    free(cat);
    free(feats);
    free(y);
    free(perm);
    return 0;
}
