#!/usr/bin/env python3
"""Forward-only throughput of a randomly initialised BERT-style encoder of MiniLM-L6 size
(6 layers, hidden 384, 12 heads, FFN 1536, GELU, post-LN, vocab 30522), fp32, torch.no_grad,
all hidden states: the reference of levi's bench/bench_encoder.c (bench/run.sh case b).
The repo's copy of ../shared/bench/pytorch/bench_encoder.py (same model, shapes, FLOP formula
and protocol) with the result line run.sh parses and the process's peak memory.
Usage: python3 bench_encoder.py [--threads 1] [--batch 64] [--seq 64] [--iters 10] [--impl manual|nn]
  manual = HF-BertModel-style module written out by hand; nn = torch.nn.TransformerEncoder
Not for: accuracy.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--seq", type=int, default=64)
ap.add_argument("--iters", type=int, default=10)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--impl", choices=["manual", "nn"], default="manual")
args = ap.parse_args()
common.setup_threads(args.threads)
import torch
import minilm

torch.set_num_threads(args.threads)
torch.manual_seed(0)
model = (minilm.Encoder() if args.impl == "manual" else minilm.NNEncoder()).eval()
ids = torch.randint(0, minilm.V, (args.batch, args.seq))
mask = torch.ones(args.batch, args.seq, dtype=torch.long)
ts = []
with torch.no_grad():
    for _ in range(args.warmup):
        model(ids, mask)
    c0 = time.process_time(); w0 = time.perf_counter()
    for _ in range(args.iters):
        t = time.perf_counter(); model(ids, mask); ts.append(time.perf_counter() - t)
cpu_wall = (time.process_time() - c0) / (time.perf_counter() - w0)
S, B = args.seq, args.batch
gflop = 2 * minilm.macs_per_token(S) * B * S * 1e-9
best, med = min(ts), sorted(ts)[len(ts) // 2]
print(f"torch {torch.__version__} impl={args.impl} threads={torch.get_num_threads()} "
      f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} batch={B} seq={S} GFLOP/batch={gflop:.1f}")
print(f"median {med * 1e3:.0f} ms/batch: {B / med:.1f} seq/s, {B * S / med:.0f} tok/s, {gflop / med:.1f} GFLOP/s | "
      f"best {best * 1e3:.0f} ms: {B / best:.1f} seq/s, {B * S / best:.0f} tok/s, {gflop / best:.1f} GFLOP/s | cpu/wall={cpu_wall:.2f}")
common.result("b", args.threads, "tok/s", B * S / med, gflop / med, cpu_wall,
              best=B * S / best, gflop_per_batch=round(gflop, 2), batch=B, seq=S, impl=args.impl)
