#!/usr/bin/env python3
"""Generates the reference vectors that tests/test_bert.c compares levi's BERT encoder against.

For: Hugging Face transformers BertModel (float32, eval mode, output_hidden_states=True) and
sentence-transformers run on a small fixed batch of real sentences; the outputs are written
with safetensors.torch.save_file into --out (small files, committed as test vectors).
The files are in the safetensors format but named *.st: they hold activations and gradients of
a short batch (test vectors), not model weights, and must not be mistaken for weights.
Not for: benchmarking, or any model other than a BERT-family checkpoint in HF format.

Usage (reference environment, offline):
  HF_HUB_OFFLINE=1 python tests/ref/gen_bert_ref.py --model-dir MODEL_DIR --out tests/ref/bert

Files written (all tensors float32 unless noted; B = 4 sentences, S = 32 tokens):
  hidden_a.st  input_ids, attention_mask, token_type_ids [B,S] int32; hidden.0..3 [B,S,H]
  hidden_b.st  hidden.4..6 [B,S,H]
  sentence.st  st_embedding [B,H]: SentenceTransformer(model_dir).encode() with
                        max_seq_length = S, so it truncates exactly as the batch above does
  long.st      one untruncated sentence: input_ids, attention_mask [1,S2] int32,
                        hidden.6 [1,S2,H], st_embedding [1,H]
  grad.st      gradients of L = sum_l sum(hidden_l * R_l) (R_l from rfield below):
                        grad/<param> (rows rows/<param> int32 when only some rows are kept),
                        d_hidden.0 [B,S,H] (gradient w.r.t. the embedding output),
                        rcheck [16] (first values of R_0, to prove the generator matches)
  layer_grad.st  for each layer l = 1..L, with the loss sum(hidden_l * R_l) alone:
                        d_input.<l> = gradient w.r.t. hidden_{l-1} (the layer's input), for
                        batch items 0..1 only ([2,S,H]) to keep the file small
  lora.st      LoRA (Hu et al. 2022) as explicit torch code on BertModel (peft is not needed):
                        targets query, value, attention.output.dense, output.dense of every
                        layer, rank LORA_RANK, alpha LORA_ALPHA, y = base(x) + (x A^T B^T) *
                        alpha / r, with A = 0.1 * rfield(1000 + 16 l + t) [r, in] and
                        B = 0.1 * rfield(2000 + 16 l + t) [out, r] (t: 0 query, 2 value,
                        3 attention.output.dense, 5 output.dense; B non-zero so the update
                        shows): hidden.3, hidden.6 [B,S,H] of the batch above.
                        `--only lora` writes this file alone (the others stay as they are).

Check of a folder levi saved (levi_bert_save), not a generator: `--check-saved DIR` loads DIR
with transformers' AutoTokenizer and BertModel (strict: every tensor present, none unexpected)
and compares its hidden states on the batch above with lora.st. Make DIR with
  LEVI_LORA_SAVE_DIR=DIR LEVI_MODEL_DIR=... LEVI_SOURCE_DIR=. build/test_bert
(test_lora_parity saves MiniLM with the rfield LoRA merged in).
Every file's metadata holds the sha256 of model.safetensors, so the test can tell whether
LEVI_MODEL_DIR holds the model the references came from.
"""
import argparse
import hashlib
import os

import numpy as np
import torch
from safetensors.torch import save_file

SENTENCES = [
    # The MovieLens prompt template of the main task (truncated to S tokens in the batch).
    "When the user id is 138, the user occupation is doctor, the user zipcode is 53211, the movie "
    "title is One Flew Over the Cuckoo's Nest (1975), and the movie id is 357, what can be the "
    "user rating on this movie?:",
    "The quick brown fox jumps over the lazy dog.",
    "I loved this movie!",
    "Café prices rose 3.5% in São Paulo, didn't they?",
]
MAX_LEN = 32
N_LAYER_GRAD_ITEMS = 2
LORA_RANK = 4
LORA_ALPHA = 8.0
# (index t as in tests/test_bert.c, module path inside a BertLayer)
LORA_TARGETS = [(0, "attention.self.query"), (2, "attention.self.value"),
                (3, "attention.output.dense"), (5, "output.dense")]


def rfield(layer, n):
    """Deterministic pseudo-random values in [-1, 1), float32, identical to rfield() in
    tests/test_bert.c: a 32-bit integer hash of (flat index, layer)."""
    m = 0xFFFFFFFF
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(0x9E3779B1) + np.uint64(((layer + 1) * 0x85EBCA77) & m)) & np.uint64(m)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & np.uint64(m)
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & np.uint64(m)
    h ^= h >> np.uint64(15)
    return ((h >> np.uint64(8)).astype(np.float64) / float(1 << 24) * 2.0 - 1.0).astype(np.float32)


class LoRALinear(torch.nn.Module):
    """peft's LoraLayer forward with dropout 0: base(x) + lora_B(lora_A(x)) * alpha / r."""

    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.A, self.B, self.scale = base, A, B, scale

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def add_lora(model):
    """Wraps the LORA_TARGETS of every layer; A and B come from rfield so the C test rebuilds
    them without storing them."""
    r, scale = LORA_RANK, LORA_ALPHA / LORA_RANK
    for l, layer in enumerate(model.encoder.layer):
        for t, path in LORA_TARGETS:
            parent_path, name = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, name)
            out_f, in_f = base.weight.shape
            A = 0.1 * torch.from_numpy(rfield(1000 + 16 * l + t, r * in_f)).view(r, in_f)
            B = 0.1 * torch.from_numpy(rfield(2000 + 16 * l + t, out_f * r)).view(out_f, r)
            setattr(parent, name, LoRALinear(base, A, B, scale))
    return model


def lora_reference(args, meta):
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = BertModel.from_pretrained(args.model_dir, add_pooling_layer=False).float().eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    add_lora(model)
    with torch.no_grad():
        hs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   token_type_ids=enc.get("token_type_ids"), output_hidden_states=True).hidden_states
    L = model.config.num_hidden_layers
    save({"hidden.3": hs[3], f"hidden.{L}": hs[L]}, os.path.join(args.out, "lora.st"), meta)


def check_saved(args):
    from safetensors import safe_open
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(args.check_saved)
    model, info = BertModel.from_pretrained(args.check_saved, add_pooling_layer=False,
                                            output_loading_info=True)
    with safe_open(os.path.join(args.check_saved, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("lora" in k for k in keys), "LoRA tensors must be merged, not saved"
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        hs = model.float().eval()(**enc, output_hidden_states=True).hidden_states
    ref = {}
    with safe_open(os.path.join(args.out, "lora.st"), "pt") as f:
        for k in f.keys():
            ref[k] = f.get_tensor(k)
    worst = max((hs[int(k.split(".")[1])] - v).abs().max().item() for k, v in ref.items())
    print(f"{args.check_saved}: loads in transformers ({len(keys)} tensors, none missing or "
          f"unexpected); hidden states vs lora.st max-abs {worst:.2e}")
    assert worst < 1e-4, worst


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(tensors, path, meta):
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, path, metadata=meta)
    os.chmod(path, 0o644)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="Hugging Face folder of the BERT model")
    ap.add_argument("--out", required=True, help="output folder (tests/ref/bert)")
    ap.add_argument("--only", choices=["lora"], help="write only this reference file")
    ap.add_argument("--check-saved", metavar="DIR", help="check a levi-saved LoRA folder")
    args = ap.parse_args()
    if args.check_saved:
        check_saved(args)
        return

    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "model_sha256": sha256_file(os.path.join(args.model_dir, "model.safetensors")),
        "generator": "tests/ref/gen_bert_ref.py",
        "torch": torch.__version__,
    }
    lora_reference(args, meta)
    if args.only == "lora":
        return
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = BertModel.from_pretrained(args.model_dir, add_pooling_layer=False).float().eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    types = enc.get("token_type_ids", torch.zeros_like(ids))
    B, S = ids.shape
    H = model.config.hidden_size
    L = model.config.num_hidden_layers
    assert S == MAX_LEN, f"the batch should be padded to {MAX_LEN}, got {S}"

    # 1. Hidden states.
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                   output_hidden_states=True).hidden_states
    assert len(hs) == L + 1
    i32 = lambda t: t.to(torch.int32)
    part_a = {"input_ids": i32(ids), "attention_mask": i32(mask), "token_type_ids": i32(types)}
    split = (L + 1 + 1) // 2
    for l in range(split):
        part_a[f"hidden.{l}"] = hs[l]
    save(part_a, os.path.join(args.out, "hidden_a.st"), meta)
    save({f"hidden.{l}": hs[l] for l in range(split, L + 1)},
         os.path.join(args.out, "hidden_b.st"), meta)

    # 2. Sentence-transformers embedding, truncated the same way.
    st = SentenceTransformer(args.model_dir, device="cpu")
    st.max_seq_length = MAX_LEN
    feats = st.tokenize(SENTENCES)
    assert torch.equal(feats["input_ids"], ids), "sentence-transformers tokenized differently"
    emb = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False, batch_size=B)
    save({"st_embedding": emb.float()}, os.path.join(args.out, "sentence.st"), meta)

    # One untruncated long sentence, batch of one: positions beyond S and B = 1.
    enc1 = tok(SENTENCES[:1], return_tensors="pt")
    st.max_seq_length = 256
    with torch.no_grad():
        hs1 = model(input_ids=enc1["input_ids"], attention_mask=enc1["attention_mask"],
                    output_hidden_states=True).hidden_states
    emb1 = st.encode(SENTENCES[:1], convert_to_tensor=True, normalize_embeddings=False)
    save({"input_ids": i32(enc1["input_ids"]), "attention_mask": i32(enc1["attention_mask"]),
          "hidden.6": hs1[L], "st_embedding": emb1.float()},
         os.path.join(args.out, "long.st"), meta)

    # 3. Gradients of L = sum_l sum(hidden_l * R_l), dropout off (eval mode).
    n = B * S * H
    R = [torch.from_numpy(rfield(l, n)).view(B, S, H) for l in range(L + 1)]
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    hs = out.hidden_states
    hs[0].retain_grad()
    loss = sum((hs[l] * R[l]).sum() for l in range(L + 1))
    loss.backward()
    params = dict(model.named_parameters())
    g = {"d_hidden.0": hs[0].grad, "rcheck": R[0].flatten()[:16]}
    used = torch.unique(ids).to(torch.int64)
    g["grad/embeddings.word_embeddings.weight"] = params["embeddings.word_embeddings.weight"].grad[used]
    g["rows/embeddings.word_embeddings.weight"] = i32(used)
    pos_rows = torch.arange(S)
    g["grad/embeddings.position_embeddings.weight"] = params["embeddings.position_embeddings.weight"].grad[pos_rows]
    g["rows/embeddings.position_embeddings.weight"] = i32(pos_rows)
    whole = [
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.1.attention.self.value.bias",
        "encoder.layer.2.attention.output.LayerNorm.weight",
        "encoder.layer.4.output.dense.bias",
        f"encoder.layer.{L - 1}.output.LayerNorm.weight",
        f"encoder.layer.{L - 1}.output.LayerNorm.bias",
    ]
    for name in whole:
        g[f"grad/{name}"] = params[name].grad
    strided = {  # big matrices: every k-th output row (covers every head / feature block)
        "encoder.layer.0.attention.self.query.weight": 8,
        "encoder.layer.0.attention.self.value.weight": 8,
        "encoder.layer.3.attention.output.dense.weight": 8,
        f"encoder.layer.{L - 1}.intermediate.dense.weight": 32,
        "encoder.layer.2.output.dense.weight": 32,
    }
    for name, step in strided.items():
        rows = torch.arange(0, params[name].shape[0], step)
        g[f"grad/{name}"] = params[name].grad[rows]
        g[f"rows/{name}"] = i32(rows)
    save(g, os.path.join(args.out, "grad.st"), meta)

    # Per-layer input gradients: loss on layer l only, gradient w.r.t. hidden_{l-1}.
    lg = {}
    for l in range(1, L + 1):
        model.zero_grad()
        hs = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                   output_hidden_states=True).hidden_states
        hs[l - 1].retain_grad()
        (hs[l] * R[l]).sum().backward()
        lg[f"d_input.{l}"] = hs[l - 1].grad[:N_LAYER_GRAD_ITEMS]
    save(lg, os.path.join(args.out, "layer_grad.st"), meta)

    # How far HF is from itself in float64: a floor for the tolerances the C test uses.
    with torch.no_grad():
        m64 = BertModel.from_pretrained(args.model_dir, add_pooling_layer=False).double().eval()
        hs64 = m64(input_ids=ids, attention_mask=mask, token_type_ids=types,
                   output_hidden_states=True).hidden_states
        hs32 = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                     output_hidden_states=True).hidden_states
        print("float32 vs float64 max-abs per hidden state:",
              " ".join(f"{(a.double() - b).abs().max().item():.2e}" for a, b in zip(hs32, hs64)))


if __name__ == "__main__":
    main()
