#!/usr/bin/env python3
"""LEVI end to end in PyTorch on the rows levi's `bench_e2e --dump` wrote (the same texts,
categorical ids and labels): the reference of bench/bench_e2e.c (bench/run.sh case d).
  extract  transformers' BertModel from the model folder, output_hidden_states=True, fp32,
           no_grad, texts tokenised (max 128 tokens), sorted by length (longest first, as levi's
           feature cache does) and run in batches of 64 padded to their longest text; every
           hidden state mean-pooled over the real tokens -> feats [N, L+1, H], kept in memory
           (levi also writes its cache to disk and reads it back);
  fit      the LEVI model levi's defaults build: one 32-d embedding per categorical column ->
           MLP 512-256 (ReLU) -> one adapter (H+256 -> 256 -> 1, ReLU) per hidden state on the
           standardised features, loss = mean of the adapters' MSE, item/title ids masked to 0
           for 20% of training rows, Adam lr 1e-3, batch 200, shuffled, fixed epochs.
The compared figure is rows / (extract + fit seconds); the FLOP formula is bench_e2e.c's.
Usage: python3 bench_e2e.py --rows-file ROWS.tsv --model DIR [--epochs 3] [--threads 1] [--batch 64]
Needs torch and transformers (Debian's python3 has no transformers: use the interpreter
scripts/setup-reference.sh prints, which shares Debian's torch). Exit 3 when one is missing.
Not for: accuracy.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ap = argparse.ArgumentParser()
ap.add_argument("--rows-file", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--max-len", type=int, default=128)
ap.add_argument("--train-batch", type=int, default=200)
args = ap.parse_args()
common.setup_threads(args.threads)
try:
    import torch, torch.nn as nn, torch.nn.functional as F
    from transformers import BertModel, BertTokenizerFast
except ImportError as e:
    print(f"bench_e2e.py: {sys.executable} lacks a module ({e}); use an interpreter with torch "
          "and transformers (LEVI_BENCH_PYTHON_E2E)", file=sys.stderr)
    sys.exit(3)
torch.set_num_threads(args.threads)
torch.manual_seed(0)

# Rows: three header lines (cards, mask_prob, mask_group), then label, ids..., text.
head, labels, cats, texts = {}, [], [], []
with open(args.rows_file, encoding="utf-8") as f:
    for line in f:
        parts = line.rstrip("\n").split("\t")
        if parts[0].startswith("# "):
            head[parts[0][2:]] = parts[1:]
            continue
        labels.append(float(parts[0])); cats.append([int(x) for x in parts[1:-1]]); texts.append(parts[-1])
cards = [int(x) for x in head["cards"]]
mask_prob = [float(x) for x in head["mask_prob"]]
mask_group = [int(x) for x in head["mask_group"]]
N, NC = len(texts), len(cards)
y = torch.tensor(labels)
ids_all = torch.tensor(cats, dtype=torch.long)

cfg = json.load(open(os.path.join(args.model, "config.json")))
H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
tok = BertTokenizerFast.from_pretrained(args.model)
bert = BertModel.from_pretrained(args.model, add_pooling_layer=False).eval()

# ---- extract
c0 = time.process_time(); t0 = time.perf_counter()
enc = tok(texts, truncation=True, max_length=args.max_len)["input_ids"]
lens = [len(e) for e in enc]
order = sorted(range(N), key=lambda i: -lens[i])              # stable: longest first
feats = torch.empty(N, L + 1, H)
with torch.no_grad():
    for s in range(0, N, args.batch):
        rows = order[s:s + args.batch]
        S = lens[rows[0]]
        ids = torch.zeros(len(rows), S, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :lens[r]] = torch.tensor(enc[r]); mask[j, :lens[r]] = 1
        hs = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.unsqueeze(-1).float()
        pooled = torch.stack([(h * m).sum(1) / m.sum(1).clamp(min=1) for h in hs], dim=1)
        feats[torch.tensor(rows)] = pooled
extract_s = time.perf_counter() - t0

# ---- fit
t0 = time.perf_counter()
EMB, H1, H2, AH, NA = 32, 512, 256, 256, L + 1
mean, std = feats.mean(0, keepdim=True), feats.std(0, unbiased=False, keepdim=True)
std = torch.where(std > 0, std, torch.ones_like(std))
xf = (feats - mean) / std                                       # standardised, as levi's default


class Levi(nn.Module):
    def __init__(self):
        super().__init__()
        self.embs = nn.ModuleList(nn.Embedding(c, EMB) for c in cards)
        for e in self.embs:
            nn.init.normal_(e.weight, std=0.03)
        self.mlp = nn.Sequential(nn.Linear(EMB * NC, H1), nn.ReLU(), nn.Linear(H1, H2), nn.ReLU())
        self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(H2 + H, AH), nn.ReLU(), nn.Linear(AH, 1))
                                      for _ in range(NA))
        for a in self.adapters:
            nn.init.constant_(a[2].bias, float(y.mean()))

    def forward(self, ids, f):                                  # ids [B,NC], f [B,NA,H]
        h = self.mlp(torch.cat([e(ids[:, c]) for c, e in enumerate(self.embs)], dim=1))
        return torch.cat([a(torch.cat([h, f[:, l]], dim=1)) for l, a in enumerate(self.adapters)], dim=1)


model = Levi()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
leaders = sorted({g for c, g in enumerate(mask_group) if mask_prob[c] > 0})
for ep in range(args.epochs):
    perm = torch.randperm(N); tot = 0.0
    for s in range(0, N, args.train_batch):
        idx = perm[s:s + args.train_batch]
        ids = ids_all[idx].clone()
        for g in leaders:                                       # mask a group's ids together
            drop = torch.rand(len(idx)) < mask_prob[g]
            for c in range(NC):
                if mask_group[c] == g:
                    ids[drop, c] = 0
        pred = model(ids, xf[idx])
        loss = F.mse_loss(pred, y[idx].unsqueeze(1).expand_as(pred))  # mean of the adapters' MSE
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        tot += loss.item() * len(idx)
    final_loss = tot / N
fit_s = time.perf_counter() - t0
total_s = extract_s + fit_s
cpu_wall = (time.process_time() - c0) / total_s

tokens = float(sum(lens)); tokens_sq = float(sum(n * n for n in lens))
enc_flop = 2.0 * L * (tokens * (4 * H * H + 2 * H * I) + 2 * tokens_sq * H)
fwd_macs = EMB * NC * H1 + H1 * H2 + NA * ((H2 + H) * AH + AH)
train_flop = 3.0 * 2.0 * fwd_macs * N * args.epochs
gflop = (enc_flop + train_flop) * 1e-9
print(f"torch {torch.__version__} e2e threads={torch.get_num_threads()} rows={N} tokens={tokens:.0f} "
      f"layers={L + 1} adapters={NA} epochs={args.epochs}")
print(f"extract {extract_s:.2f} s ({tokens / extract_s:.0f} tok/s) | fit {fit_s:.2f} s | total {total_s:.2f} s "
      f"= {N / total_s:.1f} rows/s, {gflop / total_s:.1f} GFLOP/s | final train loss {final_loss:.4f} | cpu/wall={cpu_wall:.2f}")
common.result("d", args.threads, "rows/s", N / total_s, gflop / total_s, cpu_wall, rows=N,
              extract_s=round(extract_s, 3), fit_s=round(fit_s, 3), enc_tok_s=round(tokens / extract_s),
              tokens=int(tokens), epochs=args.epochs, gflop=round(gflop, 2), loss=final_loss)
