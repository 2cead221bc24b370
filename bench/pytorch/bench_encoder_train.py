#!/usr/bin/env python3
"""One fine-tuning step of a randomly initialised MiniLM-L6-sized BERT encoder (minilm.py):
forward with autograd, loss = MSE of Linear(384 -> 1) of the mean-pooled last hidden state
against random targets, backward into every weight (embeddings included), one Adam step over
encoder and head. The reference of levi's bench/bench_encoder_train.c (bench/run.sh case c):
same shapes, loss, FLOP formula (3 x the forward's matrix products) and protocol. No dropout
(minilm.Encoder has none; levi's side runs with dropout 0 by default).
Usage: python3 bench_encoder_train.py [--threads 1] [--batch 32] [--seq 64] [--iters 5] [--warmup 1]
Not for: accuracy.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--seq", type=int, default=64)
ap.add_argument("--iters", type=int, default=5)
ap.add_argument("--warmup", type=int, default=1)
args = ap.parse_args()
common.setup_threads(args.threads)
import torch
import torch.nn as nn
import torch.nn.functional as F
import minilm

torch.set_num_threads(args.threads)
torch.manual_seed(0)
B, S = args.batch, args.seq
enc = minilm.Encoder().train()
head = nn.Linear(minilm.D, 1)
params = list(enc.parameters()) + list(head.parameters())
opt = torch.optim.Adam(params, lr=1e-4)
ids = torch.randint(0, minilm.V, (B, S))
mask = torch.ones(B, S, dtype=torch.long)
target = torch.randn(B)


def step():
    opt.zero_grad(set_to_none=True)
    h = enc(ids, mask)[-1]                                   # [B,S,D]
    m = mask.unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)          # [B,D] mean over valid tokens
    loss = F.mse_loss(head(pooled).squeeze(1), target)
    loss.backward()
    opt.step()
    return loss.item()


for _ in range(args.warmup):
    step()
ts = []
c0 = time.process_time(); w0 = time.perf_counter()
for _ in range(args.iters):
    t = time.perf_counter(); loss = step(); ts.append(time.perf_counter() - t)
cpu_wall = (time.process_time() - c0) / (time.perf_counter() - w0)
gflop = 3 * 2 * minilm.macs_per_token(S) * B * S * 1e-9     # forward products x 3 (fwd + bwd)
best, med = min(ts), sorted(ts)[len(ts) // 2]
print(f"torch {torch.__version__} encoder train step threads={torch.get_num_threads()} batch={B} seq={S} "
      f"GFLOP/step={gflop:.1f} params={sum(p.numel() for p in params)}")
print(f"median {med * 1e3:.0f} ms/step: {B * S / med:.0f} tok/s, {gflop / med:.1f} GFLOP/s | "
      f"best {best * 1e3:.0f} ms: {B * S / best:.0f} tok/s, {gflop / best:.1f} GFLOP/s | "
      f"cpu/wall={cpu_wall:.2f} final loss={loss:.4f}")
common.result("c", args.threads, "tok/s", B * S / med, gflop / med, cpu_wall,
              best=B * S / best, steps_per_s=1 / med, gflop_per_step=round(gflop, 2),
              batch=B, seq=S, loss=loss)
