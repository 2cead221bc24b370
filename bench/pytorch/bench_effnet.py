#!/usr/bin/env python3
"""EfficientNet-Lite0 in PyTorch: (e) inference forward with the ImageNet logits, or (f) one
training step: forward in training mode (batch statistics), cross-entropy of the logits against
fixed labels, backward into every weight, SGD momentum 0.9. The reference of levi's
bench/bench_effnet.c (bench/run.sh cases e and f): same architecture, weights, inputs, labels,
loss, FLOP formula and warmup/median protocol.

The model is the independent PyTorch definition of tests/ref/gen_effnet_ref.py (Lite0: functional
F.conv2d with TensorFlow 'SAME' padding, F.batch_norm eps 1e-3 momentum 0.01, ReLU6), imported,
not copied. Weights: --pth FILE loads the checkpoint; otherwise the synthetic weights of
bench_effnet.c, computed here from the same integer hash (int64 and float64 arithmetic that gives
levi's float32 values bit for bit): convolutions +-sqrt(6 / fan_in), classifier +-sqrt(1 /
fan_in), BN weight 1, bias 0, running mean 0, running var 1, classifier bias 0. Inputs and labels
come from the same hash. Both sides print the first step's outputs (inference: the logits' mean
and mean |.|; training: loss0, gnorm0 and loss1, the loss after one update) so run.sh can check
that the work is the same.

Usage: python3 bench_effnet.py [--mode infer|train] [--threads 1] [--batch 64] [--size 224]
                               [--iters 5] [--warmup 1] [--lr 0.01] [--pth FILE]
Not for: accuracy (tests/test_effnet.c), or benchmarking torchvision's EfficientNet (a different
network: swish, squeeze-excitation).
"""
import argparse, math, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["infer", "train"], default="infer")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--batch", type=int)
ap.add_argument("--size", type=int)
ap.add_argument("--iters", type=int, default=5)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--pth")
args = ap.parse_args()
train = args.mode == "train"
B = args.batch or (32 if train else 64)
S = args.size or (64 if train else 224)
common.setup_threads(args.threads)
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "ref"))
import gen_effnet_ref as ref

torch.set_num_threads(args.threads)
M32 = 0xFFFFFFFF


def fnv1a(s):
    h = 2166136261
    for ch in s.encode():
        h = ((h ^ ch) * 16777619) & M32
    return h


def hash_u32(i, seed):
    """bench_hash of bench_effnet.c on an int64 tensor of indices."""
    x = ((i & M32) * 0x9E3779B1 + seed) & M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & M32
    return x ^ (x >> 16)


def hash_uniform(shape, name, bound):
    n = math.prod(shape)
    x = hash_u32(torch.arange(n, dtype=torch.int64), fnv1a(name))
    u = (x.double() + 0.5) / 4294967296.0 * 2.0 - 1.0
    return (bound * u).float().reshape(shape)


def synthetic_weights():
    """Every float tensor of the checkpoint, by its key, with bench_effnet.c's values."""
    sd = {}

    def conv(name, oc, icg, k):
        sd[name] = hash_uniform((oc, icg, k, k), name, math.sqrt(6.0 / (icg * k * k)))

    def bn(prefix, c):
        sd[prefix + ".weight"] = torch.ones(c); sd[prefix + ".bias"] = torch.zeros(c)
        sd[prefix + ".running_mean"] = torch.zeros(c); sd[prefix + ".running_var"] = torch.ones(c)

    conv("_conv_stem.weight", 32, 3, 3); bn("_bn0", 32)
    b = 0
    for (k, stride, e, cin, cout, reps) in ref.GROUPS:
        for r in range(reps):
            ci = cin if r == 0 else cout
            p = "_blocks.%d." % b
            if e != 1:
                conv(p + "_expand_conv.weight", ci * e, ci, 1); bn(p + "_bn0", ci * e)
            conv(p + "_depthwise_conv.weight", ci * e, 1, k); bn(p + "_bn1", ci * e)
            conv(p + "_project_conv.weight", cout, ci * e, 1); bn(p + "_bn2", cout)
            b += 1
    conv("_conv_head.weight", 1280, ref.GROUPS[-1][4], 1); bn("_bn1", 1280)
    sd["_fc.weight"] = hash_uniform((1000, 1280), "_fc.weight", math.sqrt(1.0 / 1280))
    sd["_fc.bias"] = torch.zeros(1000)
    return sd


def macs_per_image(H, W):
    """Forward multiply-adds of every convolution and the classifier, from ref.GROUPS (the
    count of bench_effnet.c, written out independently)."""
    h, w = (H + 1) // 2, (W + 1) // 2
    macs = 32 * 3 * 9 * h * w
    for (k, stride, e, cin, cout, reps) in ref.GROUPS:
        for r in range(reps):
            ci, st = (cin, stride) if r == 0 else (cout, 1)
            if e != 1:
                macs += ci * e * ci * h * w
            h, w = -(-h // st), -(-w // st)
            macs += ci * e * k * k * h * w + cout * ci * e * h * w
    return macs + 1280 * ref.GROUPS[-1][4] * h * w + 1280 * 1000


sd = ref.load(args.pth) if args.pth else synthetic_weights()
weights = "checkpoint" if args.pth else "synthetic"
x = hash_uniform((B, 3, S, S), "input", 1.0)
labels = hash_u32(torch.arange(B, dtype=torch.int64), fnv1a("label")) % 1000
model = ref.Lite0(sd, train)
params = []
if train:
    for k, v in sd.items():
        if not (k.endswith(".running_mean") or k.endswith(".running_var")):
            v.requires_grad_(True)
            params.append(v)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)

first = {}


def step(it):
    if not train:
        with torch.no_grad():
            logits = model.forward(x)[2]
        if it == 0:
            first["logit_mean"] = logits.double().mean().item()
            first["logit_absmean"] = logits.double().abs().mean().item()
        return None
    opt.zero_grad(set_to_none=True)
    logits = model.forward(x)[2]
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    if it == 0:  # levi's optimizer returns this norm anyway; here it is extra work, once
        first["gnorm0"] = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    opt.step()
    if it < 2:
        first["loss%d" % it] = loss.item()
    return loss.item()


for it in range(args.warmup):
    step(it)
ts = []
c0 = time.process_time(); w0 = time.perf_counter()
for it in range(args.warmup, args.warmup + args.iters):
    t = time.perf_counter(); loss = step(it); ts.append(time.perf_counter() - t)
cpu_wall = (time.process_time() - c0) / (time.perf_counter() - w0)
gflop = (3 if train else 1) * 2 * macs_per_image(S, S) * B * 1e-9
best, med = min(ts), sorted(ts)[len(ts) // 2]
print(f"torch {torch.__version__} effnet-lite0 {'train step' if train else 'forward'} "
      f"threads={torch.get_num_threads()} batch={B} size={S}x{S} weights={weights} "
      f"GFLOP/{'step' if train else 'batch'}={gflop:.2f}")
print(f"median {med * 1e3:.0f} ms: {B / med:.1f} images/s, {gflop / med:.1f} GFLOP/s | "
      f"best {best * 1e3:.0f} ms: {B / best:.1f} images/s, {gflop / best:.1f} GFLOP/s | "
      f"cpu/wall={cpu_wall:.2f}")
g7 = {k: f"{v:.7g}" for k, v in first.items()}  # strings: common.result rounds floats to 4 digits
extra = dict(best=B / best, gflop_per_step=f"{gflop:.3f}", batch=B, size=S, weights=weights)
if train:
    nan = "nan"
    print(f"first step: loss0={g7.get('loss0', nan)} gnorm0={g7.get('gnorm0', nan)}; after one "
          f"update: loss1={g7.get('loss1', nan)}; last loss={loss:.4f}")
    extra.update(lr=f"{args.lr:g}", loss0=g7.get("loss0", nan), gnorm0=g7.get("gnorm0", nan),
                 loss1=g7.get("loss1", nan))
else:
    print(f"first batch: logits mean={g7['logit_mean']} mean|.|={g7['logit_absmean']}")
    extra.update(logit_mean=g7["logit_mean"], logit_absmean=g7["logit_absmean"])
common.result("f" if train else "e", args.threads, "img/s", B / med, gflop / med, cpu_wall, **extra)
