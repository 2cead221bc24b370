"""A BERT encoder of MiniLM-L6 size written out by hand, computing what Hugging Face's
BertModel computes (post-LN, GELU, additive attention mask), randomly initialised: the model
of the encoder benchmarks (bench_encoder.py: forward; bench_encoder_train.py: fine-tuning),
taken unchanged from ../shared/bench/pytorch/bench_encoder.py.

For: speed comparisons at the shapes levi's bench_encoder*.c use.
Not for: accuracy (levi's tests compare against transformers' BertModel itself).
Import it only after common.setup_threads (it imports torch).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

V, P, L, D, NH, FF = 30522, 512, 6, 384, 12, 1536
HD = D // NH


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(D, eps=1e-12), nn.LayerNorm(D, eps=1e-12)
        self.f1, self.f2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x, bias):  # x [B,S,D], bias [B,1,1,S] additive mask
        B, S, _ = x.shape
        sh = lambda t: t.view(B, S, NH, HD).transpose(1, 2)  # [B,NH,S,HD]
        q, k, v = sh(self.q(x)), sh(self.k(x)), sh(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / HD ** 0.5 + bias, dim=-1) @ v
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(B, S, D)))
        return self.ln2(x + self.f2(F.gelu(self.f1(x))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.typ = nn.Embedding(V, D), nn.Embedding(P, D), nn.Embedding(2, D)
        self.ln = nn.LayerNorm(D, eps=1e-12)
        self.layers = nn.ModuleList(Layer() for _ in range(L))

    def forward(self, ids, mask):  # all hidden states (embeddings + 6 layers), like output_hidden_states
        S = ids.shape[1]
        x = self.ln(self.tok(ids) + self.pos(torch.arange(S)) + self.typ(torch.zeros_like(ids)))
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4
        hs = [x]
        for layer in self.layers:
            x = layer(x, bias)
            hs.append(x)
        return hs


class NNEncoder(nn.Module):
    """torch.nn.TransformerEncoder (its eval fast path), for --impl nn."""
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(P, D)
        self.ln = nn.LayerNorm(D, eps=1e-12)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(D, NH, FF, dropout=0.0, activation="gelu",
                                       layer_norm_eps=1e-12, batch_first=True),
            L, enable_nested_tensor=False)

    def forward(self, ids, mask):
        x = self.ln(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))
        return [self.enc(x, src_key_padding_mask=~mask.bool())]


def macs_per_token(S):
    """Projections + FFN + QK^T and AV (levi's bench_encoder.c uses the same formula)."""
    return L * (4 * D * D + 2 * D * FF + 2 * S * D)
