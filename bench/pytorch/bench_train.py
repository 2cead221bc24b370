#!/usr/bin/env python3
"""Training-throughput reference: 6 categorical embeddings -> MLP -> 6 adapter heads on frozen
layer features, MSE averaged over adapters, Adam, batch 200: the reference of levi's
bench/bench_train.c (bench/run.sh case a). The repo's copy of
../shared/bench/pytorch/bench_train.py (same model, data sizes, batch slicing and FLOP
formula) with the result line run.sh parses, the process's peak memory, and laps shorter than
200 steps allowed (smoke tests).
--precision bf16 runs the forward and the loss under torch.autocast("cpu", bfloat16), PyTorch's
mixed precision (the Linear layers' products in bfloat16, weights and Adam in f32): the reference
of `bench_train --precision bf16` (run.sh case g).
Usage: python3 bench_train.py [--threads N] [--steps 2000] [--batch 200] [--n-examples 100000] [--batched-adapters] [--precision f32|bf16]
Not for: accuracy.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--steps", type=int, default=2000)
ap.add_argument("--warmup", type=int, default=50)
ap.add_argument("--batch", type=int, default=200)
ap.add_argument("--n-examples", type=int, default=100000)
ap.add_argument("--batched-adapters", action="store_true",
                help="run the 6 adapters as one bmm instead of 6 Linear stacks")
ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
args = ap.parse_args()
common.setup_threads(args.threads)
import torch, torch.nn as nn, torch.nn.functional as F

torch.set_num_threads(args.threads)
torch.manual_seed(0)

VOCABS = [943, 1682, 21, 61, 800, 1682]   # users, items, occupations, ages, zip prefixes, titles
EMB, H1, H2, NL, FD, AH = 32, 512, 256, 6, 384, 256


class Model(nn.Module):
    def __init__(self, batched):
        super().__init__()
        self.batched = batched
        self.embs = nn.ModuleList(nn.Embedding(v, EMB) for v in VOCABS)
        self.mlp = nn.Sequential(nn.Linear(EMB * len(VOCABS), H1), nn.ReLU(), nn.Linear(H1, H2), nn.ReLU())
        if batched:
            k1, k2 = 1 / (H2 + FD) ** 0.5, 1 / AH ** 0.5
            self.W1 = nn.Parameter(torch.empty(NL, H2 + FD, AH).uniform_(-k1, k1)); self.b1 = nn.Parameter(torch.zeros(NL, 1, AH))
            self.W2 = nn.Parameter(torch.empty(NL, AH, 1).uniform_(-k2, k2)); self.b2 = nn.Parameter(torch.zeros(NL, 1, 1))
        else:
            self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(H2 + FD, AH), nn.ReLU(), nn.Linear(AH, 1)) for _ in range(NL))

    def forward(self, ids, feats):            # ids [B,6] int64, feats [B,6,384] (frozen)
        h = self.mlp(torch.cat([e(ids[:, i]) for i, e in enumerate(self.embs)], dim=1))   # [B,256]
        if self.batched:
            x = torch.cat([h.unsqueeze(0).expand(NL, -1, -1), feats.transpose(0, 1)], dim=2)  # [6,B,640]
            return torch.baddbmm(self.b2, F.relu(torch.baddbmm(self.b1, x, self.W1)), self.W2).squeeze(2).t()
        return torch.cat([a(torch.cat([h, feats[:, l]], dim=1)) for l, a in enumerate(self.adapters)], dim=1)


N = args.n_examples
ids = torch.stack([torch.randint(0, v, (N,)) for v in VOCABS], dim=1)
feats = torch.randn(N, NL, FD)                 # fixed random "layer features", one set per example
target = torch.randint(1, 6, (N,)).float()
model = Model(args.batched_adapters)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
nparams = sum(p.numel() for p in model.parameters())


def step(idx):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        pred = model(ids[idx], feats[idx])
        loss = F.mse_loss(pred.float(), target[idx].unsqueeze(1).expand_as(pred))  # = mean over the 6 adapters' MSE
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return loss


B = args.batch
perm = torch.randperm(N)


def batch_idx(s):
    o = (s * B) % (N - B); return perm[o:o + B]


for s in range(args.warmup):
    step(batch_idx(s))
lap_len = min(200, args.steps)
t0 = time.perf_counter(); c0 = time.process_time(); lap = t0; laps = []
for s in range(args.steps):
    loss = step(batch_idx(s))
    if (s + 1) % lap_len == 0:
        t = time.perf_counter(); laps.append(lap_len / (t - lap)); lap = t
dt = time.perf_counter() - t0; cpu_wall = (time.process_time() - c0) / dt
fwd_macs = (EMB * 6 * H1 + H1 * H2) + NL * ((H2 + FD) * AH + AH)
flop_step = 3 * 2 * fwd_macs * B          # fwd + ~2x for backward
print(f"torch {torch.__version__} threads={torch.get_num_threads()} OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} "
      f"adapters={'bmm' if args.batched_adapters else '6xLinear'} params={nparams} batch={B} steps={args.steps} precision={args.precision}")
print(f"steps/s={args.steps / dt:.1f}  examples/s={args.steps * B / dt:.0f}  ms/step={dt / args.steps * 1e3:.2f}  "
      f"~GFLOP/s={flop_step * args.steps / dt * 1e-9:.1f}  per-200-step-lap steps/s min/median/max="
      f"{min(laps):.1f}/{sorted(laps)[len(laps) // 2]:.1f}/{max(laps):.1f}  cpu/wall={cpu_wall:.2f}  final loss={loss.item():.3f}")
common.result("g" if args.precision == "bf16" else "a", args.threads, "steps/s", args.steps / dt, flop_step * args.steps / dt * 1e-9, cpu_wall,
              examples_per_s=round(args.steps * B / dt), lap_median=sorted(laps)[len(laps) // 2],
              gflop_per_step=round(flop_step * 1e-9, 3), batch=B, steps=args.steps, loss=loss.item())
