/* Benchmark: levi's EfficientNet-Lite0 (include/levi/effnet.h), (e) inference forward with the
 * ImageNet logits, or (f) one training step: forward in training mode (batch-norm batch
 * statistics), softmax cross-entropy of the 1000 logits against fixed labels, backward into
 * every weight (stem to classifier), SGD with momentum 0.9.
 *
 * For: comparing against bench/pytorch/bench_effnet.py (same architecture, same weights, same
 * inputs and labels, same loss, same FLOP formula, same warmup/median protocol); bench/run.sh
 * runs both (cases e and f).
 * Not for: accuracy (tests/test_effnet.c checks every stage and the gradients against PyTorch),
 * image preprocessing (inputs are synthetic, already "normalised").
 *
 * Weights: with --pth FILE the EfficientNet-Lite0 checkpoint (legacy torch.save, read by
 * levi_pt_open); without, "synthetic" weights that bench_effnet.py computes bit-identically
 * from the same integer hash (bench_hash_uniform below): every convolution and the classifier
 * weight uniform in +-sqrt(6 / fan_in) (He-uniform; the classifier +-sqrt(1 / fan_in)), BN
 * weight 1, bias 0, running mean 0, running variance 1 (PyTorch's BatchNorm defaults),
 * classifier bias 0. The input images (uniform in [-1, 1)) and labels come from the same hash.
 * Either way both sides start from the same numbers, so their first-step outputs must agree:
 * inference prints the mean and mean |.| of the logits, training the loss of the first step
 * (loss0), the gradient norm of that step (gnorm0) and the loss of the second step (loss1,
 * after one update: it checks backward and optimizer too). Training repeats the same batch.
 *
 * FLOPs: the multiply-adds of every convolution (stem, expand, depthwise, project, head) and
 * the classifier at the input size, 2 FLOP each; training counts 3x the forward (each
 * product's backward is two products of its size, as bench_encoder_train.c). Batch norm,
 * ReLU6, pooling, the loss and SGD are left out of the count.
 *
 * Usage: bench_effnet [--mode infer|train] [--threads 1] [--batch 64] [--size 224]
 *                     [--iters 5] [--warmup 1] [--lr 0.01] [--pth FILE]
 *   defaults: infer batch 64 at 224x224; train batch 32 at 64x64.
 */
#include "bench_common.h"
#include "levi/effnet.h"
#include "levi/ops.h"
#include "levi/optim.h"
#include "levi/ptfile.h"

#include <math.h>
#include <string.h>

static int arg_int(int argc, char **argv, int *i, int min) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "bench_effnet: %s needs a value\n", argv[*i]);
        exit(2);
    }
    char *end;
    long v = strtol(argv[++*i], &end, 10);
    if (*end || v < min || v > 1 << 20) {
        fprintf(stderr, "bench_effnet: %s %s: expected an integer >= %d\n", argv[*i - 1], argv[*i],
                min);
        exit(2);
    }
    return (int)v;
}

/* ----------------------------------------------------------------------------------------
 * Synthetic weights and inputs, identical in bench/pytorch/bench_effnet.py: the value at
 * index i of tensor `name` is a 32-bit integer hash of i and FNV-1a(name) mapped to [-1, 1)
 * in double, scaled in double and rounded once to float. Integer arithmetic mod 2^32 and one
 * correctly rounded double expression give the same bits in C and in torch (int64 + float64). */

static uint32_t bench_fnv1a(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

static uint32_t bench_hash(uint64_t i, uint32_t seed) {
    uint32_t x = (uint32_t)i * 0x9E3779B1u + seed;
    x ^= x >> 16;
    x *= 0x45d9f3bu;
    x ^= x >> 16;
    x *= 0x45d9f3bu;
    x ^= x >> 16;
    return x;
}

static void bench_hash_uniform(float *dst, int64_t n, const char *name, double bound) {
    const uint32_t seed = bench_fnv1a(name);
    for (int64_t i = 0; i < n; i++) {
        const double u = ((double)bench_hash((uint64_t)i, seed) + 0.5) / 4294967296.0 * 2.0 - 1.0;
        dst[i] = (float)(bound * u);
    }
}

static int bench_ends_with(const char *s, const char *suffix) {
    const size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* levi_tensor_source of the synthetic weights (user unused). */
static levi_status synthetic_source(void *user, const char *name, int ndim, const int64_t *shape,
                                    float *dst, levi_error *err) {
    (void)user, (void)err;
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= shape[d];
    if (ndim >= 2) { // convolution [oc, ic/groups, k, k] or classifier [1000, 1280]
        const double fan_in = (double)(n / shape[0]);
        const double gain = strcmp(name, "_fc.weight") == 0 ? 1.0 : 6.0;
        bench_hash_uniform(dst, n, name, sqrt(gain / fan_in));
        return LEVI_OK;
    }
    const float v = bench_ends_with(name, ".running_var") || bench_ends_with(name, ".weight");
    for (int64_t i = 0; i < n; i++) dst[i] = v; // BN weight / running var 1; biases, means 0
    return LEVI_OK;
}

static levi_status pt_source(void *user, const char *name, int ndim, const int64_t *shape,
                             float *dst, levi_error *err) {
    return levi_pt_read_f32((const levi_pt_file *)user, name, ndim, shape, dst, err);
}

/* ----------------------------------------------------------------------------------------
 * FLOPs of the architecture at an H x W input, written out from the published block table
 * (kernel, stride, expansion, out channels, repeats) rather than read from levi's model, so a
 * change there cannot silently change the count. 'SAME' padding: each stride-2 step gives
 * ceil(n / 2). Returns the forward multiply-adds per image. */
static double effnet_macs_per_image(int H, int W) {
    static const int groups[7][5] = {
        {3, 1, 1, 16, 1},  {3, 2, 6, 24, 2},  {5, 2, 6, 40, 2},  {3, 2, 6, 80, 3},
        {5, 1, 6, 112, 3}, {5, 2, 6, 192, 4}, {3, 1, 6, 320, 1},
    };
    int h = (H + 1) / 2, w = (W + 1) / 2, cin = 32;
    double macs = 32.0 * 3 * 3 * 3 * h * w; // stem 3x3/2, 3 -> 32
    for (int g = 0; g < 7; g++)
        for (int r = 0; r < groups[g][4]; r++) {
            const int k = groups[g][0], stride = r == 0 ? groups[g][1] : 1;
            const int cm = cin * groups[g][2], cout = groups[g][3];
            if (groups[g][2] != 1) macs += (double)cm * cin * h * w; // 1x1 expand
            h = (h + stride - 1) / stride, w = (w + stride - 1) / stride;
            macs += (double)cm * k * k * h * w; // depthwise k x k
            macs += (double)cout * cm * h * w;  // 1x1 project
            cin = cout;
        }
    macs += 1280.0 * cin * h * w;         // head 1x1
    macs += 1280.0 * LEVI_EFFNET_CLASSES; // classifier
    return macs;
}

int main(int argc, char **argv) {
    int threads = 1, B = -1, S = -1, iters = 5, warmup = 1, train = 0;
    float lr = 0.01f;
    const char *pth = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads"))
            threads = arg_int(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--batch"))
            B = arg_int(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--size"))
            S = arg_int(argc, argv, &i, LEVI_EFFNET_MIN_SIZE);
        else if (!strcmp(argv[i], "--iters"))
            iters = arg_int(argc, argv, &i, 1);
        else if (!strcmp(argv[i], "--warmup"))
            warmup = arg_int(argc, argv, &i, 0);
        else if (!strcmp(argv[i], "--mode") && i + 1 < argc &&
                 (!strcmp(argv[i + 1], "infer") || !strcmp(argv[i + 1], "train")))
            train = !strcmp(argv[++i], "train");
        else if (!strcmp(argv[i], "--lr") && i + 1 < argc)
            lr = (float)atof(argv[++i]);
        else if (!strcmp(argv[i], "--pth") && i + 1 < argc)
            pth = argv[++i];
        else {
            fprintf(stderr,
                    "usage: %s [--mode infer|train] [--threads N] [--batch B] [--size S] "
                    "[--iters N] [--warmup N] [--lr LR] [--pth FILE]\n",
                    argv[0]);
            return 2;
        }
    }
    if (B < 0) B = train ? 32 : 64;
    if (S < 0) S = train ? 64 : 224;
    if (train && B < 2) {
        fprintf(stderr, "bench_effnet: --mode train needs --batch >= 2 (batch statistics)\n");
        return 2;
    }
    if (!(lr > 0.0f && lr < 10.0f)) {
        fprintf(stderr, "bench_effnet: --lr %g: expected a value in (0, 10)\n", (double)lr);
        return 2;
    }
    levi_set_num_threads(threads);
    levi_error err = {0};
    levi_effnet *m;
    if (pth) {
        levi_pt_file *f = levi_pt_open(pth, &err);
        m = f ? levi_effnet_load(pt_source, f, &err) : NULL;
        levi_pt_close(f);
    } else {
        m = levi_effnet_load(synthetic_source, NULL, &err);
    }
    if (!m) {
        fprintf(stderr, "bench_effnet: %s\n", err.msg);
        return 1;
    }
    const int C = LEVI_EFFNET_CLASSES;
    const size_t nx = (size_t)B * 3 * S * S;
    float *x = malloc(nx * sizeof *x), *probs = malloc((size_t)B * C * sizeof *probs),
          *dlogits = malloc((size_t)B * C * sizeof *dlogits);
    int32_t *labels = malloc((size_t)B * sizeof *labels);
    double *ts = malloc((size_t)iters * sizeof *ts);
    if (!x || !probs || !dlogits || !labels || !ts) {
        fprintf(stderr, "bench_effnet: out of memory\n");
        return 1;
    }
    bench_hash_uniform(x, (int64_t)nx, "input", 1.0);
    const uint32_t label_seed = bench_fnv1a("label");
    for (int b = 0; b < B; b++) labels[b] = (int32_t)(bench_hash((uint64_t)b, label_seed) % C);

    levi_optim_params op = levi_optim_default_params(LEVI_OPT_SGD);
    op.lr = lr;
    op.momentum = 0.9f;
    op.weight_decay = 0.0f;
    levi_optim *opt = train ? levi_optim_init(levi_effnet_params(m), op) : NULL;
    levi_effnet_forward_params fp = levi_effnet_default_forward_params();
    fp.mode = train ? LEVI_EFFNET_TRAIN : LEVI_EFFNET_INFER;
    fp.logits = 1;

    double c0 = 0, w0 = 0, logit_mean = 0, logit_absmean = 0;
    float loss = 0, loss0 = NAN, loss1 = NAN, gnorm0 = NAN;
    for (int it = 0; it < warmup + iters; it++) {
        if (it == warmup) c0 = bench_cpu_seconds(), w0 = levi_now();
        double t0 = levi_now();
        if (train) levi_params_zero_grad(levi_effnet_params(m));
        if (levi_effnet_forward(m, x, B, S, S, &fp, &err) != LEVI_OK) {
            fprintf(stderr, "bench_effnet: %s\n", err.msg);
            return 1;
        }
        const float *logits = levi_effnet_logits(m);
        if (train) {
            // loss = mean over the batch of -log softmax(logits)[label]
            loss = levi_crossentropy_forward(probs, logits, labels, B, C);
            memset(dlogits, 0, (size_t)B * C * sizeof *dlogits); // backward accumulates
            levi_crossentropy_backward(dlogits, probs, labels, B, C, 1.0f);
            levi_effnet_backward(m, NULL, NULL, dlogits);
            const float gnorm = levi_optim_step(opt);
            if (it == 0) loss0 = loss, gnorm0 = gnorm;
            if (it == 1) loss1 = loss;
        } else if (it == 0) {
            for (size_t i = 0; i < (size_t)B * C; i++)
                logit_mean += logits[i], logit_absmean += fabs(logits[i]);
            logit_mean /= (double)B * C, logit_absmean /= (double)B * C;
        }
        if (it >= warmup) ts[it - warmup] = levi_now() - t0;
    }
    const double cpu_wall = (bench_cpu_seconds() - c0) / (levi_now() - w0);
    const double med = bench_median(ts, iters), best = ts[0];
    const double gflop = (train ? 3.0 : 1.0) * 2.0 * effnet_macs_per_image(S, S) * B * 1e-9;
    const char *weights = pth ? "checkpoint" : "synthetic";
    printf("levi effnet-lite0 %s threads=%d batch=%d size=%dx%d weights=%s GFLOP/%s=%.2f\n",
           train ? "train step" : "forward", threads, B, S, S, weights, train ? "step" : "batch",
           gflop);
    printf("median %.0f ms: %.1f images/s, %.1f GFLOP/s | best %.0f ms: %.1f images/s, %.1f "
           "GFLOP/s | cpu/wall=%.2f\n",
           med * 1e3, B / med, gflop / med, best * 1e3, B / best, gflop / best, cpu_wall);
    if (train) {
        printf("first step: loss0=%.7g gnorm0=%.7g; after one update: loss1=%.7g; last loss=%.4f\n",
               (double)loss0, (double)gnorm0, (double)loss1, (double)loss);
        bench_result("f", threads, "img/s", B / med, gflop / med, cpu_wall,
                     " best=%.4g gflop_per_step=%.3f batch=%d size=%d weights=%s lr=%g "
                     "loss0=%.7g gnorm0=%.7g loss1=%.7g",
                     B / best, gflop, B, S, weights, (double)lr, (double)loss0, (double)gnorm0,
                     (double)loss1);
    } else {
        printf("first batch: logits mean=%.7g mean|.|=%.7g\n", logit_mean, logit_absmean);
        bench_result("e", threads, "img/s", B / med, gflop / med, cpu_wall,
                     " best=%.4g gflop_per_step=%.3f batch=%d size=%d weights=%s "
                     "logit_mean=%.7g logit_absmean=%.7g",
                     B / best, gflop, B, S, weights, logit_mean, logit_absmean);
    }
    free(x), free(probs), free(dlogits), free(labels), free(ts);
    levi_optim_free(opt);
    levi_effnet_free(m);
    return 0;
}
