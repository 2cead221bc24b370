/* levi BERT: the BERT-family text encoder (post-LayerNorm transformer, absolute positions,
 * GELU) as Hugging Face's BertModel computes it, with forward and backward.
 *
 * For: loading a Hugging Face folder (config.json + model.safetensors, e.g. all-MiniLM-L6-v2),
 * or building a randomly initialised encoder of any size a config describes; running it on
 * token ids to get the hidden states of the embedding output and of every layer; back-
 * propagating gradients given w.r.t. any of those hidden states into the parameter table;
 * freezing layers; mean pooling.
 * Not for: tokenisation (tokenizer.h), the pooler / MLM heads, relative position embeddings,
 * other activations than GELU, decoders, or checkpoint writing (write levi_bert_params() with
 * safetensors.h: the table is keyed by the checkpoint's own names).
 *
 * Shapes: B sequences of S tokens, N = B*S, H = hidden, L = layers, I = intermediate.
 * Hidden state 0 is the embedding output, hidden state l (1..L) the output of encoder layer
 * l-1 (named "encoder.layer.<l-1>." in the table), exactly like Hugging Face's
 * output_hidden_states.
 *
 * Threads: levi_set_num_threads() (OpenMP loops and OpenBLAS). Results do not depend on the
 * thread count except through OpenBLAS's own blocking. One handle serves one caller at a time
 * (its buffers are reused by every call); use one handle per concurrent user.
 */
#ifndef LEVI_BERT_H
#define LEVI_BERT_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LEVI_BERT_ACT_GELU = 0 /* erf form, Hugging Face "gelu" */ } levi_bert_act;

/* The architecture, as config.json spells it (field names in the comments). */
typedef struct levi_bert_config {
    int hidden;           /* hidden_size H */
    int layers;           /* num_hidden_layers L */
    int heads;            /* num_attention_heads; must divide H */
    int intermediate;     /* intermediate_size I */
    int vocab;            /* vocab_size V */
    int max_pos;          /* max_position_embeddings: the longest sequence S */
    int type_vocab;       /* type_vocab_size */
    int pad_token_id;     /* pad_token_id (optional, default 0): its word-embedding row is zeroed
                           * by random init and never gets a gradient (as nn.Embedding's
                           * padding_idx in Hugging Face) */
    float eps;            /* layer_norm_eps */
    levi_bert_act act;    /* hidden_act: only "gelu" */
    float hidden_dropout; /* hidden_dropout_prob (optional, default 0.1) */
    float attn_dropout;   /* attention_probs_dropout_prob (optional, default 0.1) */
    float init_range;     /* initializer_range (optional, default 0.02): std of random init */
} levi_bert_config;

/* The shapes of all-MiniLM-L6-v2 (H 384, L 6, 12 heads, I 1536, V 30522, 512 positions). */
levi_bert_config levi_bert_minilm_l6_config(void);
/* Checks sizes are positive, heads divide hidden, eps > 0, dropouts in [0, 1). `where` names
 * the source in the message (a file name, or "config"). */
levi_status levi_bert_config_validate(const levi_bert_config *cfg, const char *where,
                                      levi_error *err);
/* Parses config.json text (len bytes). Required: hidden_size, num_hidden_layers,
 * num_attention_heads, intermediate_size, vocab_size, max_position_embeddings,
 * type_vocab_size, layer_norm_eps, hidden_act. A missing or ill-typed field, or an
 * unsupported value (hidden_act other than "gelu", position_embedding_type other than
 * "absolute", model_type other than "bert"), is an error naming `path` and the field. */
levi_status levi_bert_config_parse(const char *json, size_t len, const char *path,
                                   levi_bert_config *cfg, levi_error *err);
levi_status levi_bert_config_load(const char *path, levi_bert_config *cfg, levi_error *err);

typedef struct levi_bert levi_bert;

/* Loads <model_dir>/config.json and <model_dir>/model.safetensors (F32, F16 or BF16). Keys
 * may carry a "bert." prefix or not; the table always uses the unprefixed names
 * ("embeddings.word_embeddings.weight", "encoder.layer.3.attention.self.query.weight", ...).
 * Tensors the encoder does not use (pooler, heads, position_ids) are ignored. A missing or
 * mis-shaped tensor is an error naming it with expected vs found shape. NULL on error. */
levi_bert *levi_bert_open(const char *model_dir, levi_error *err);
/* A fresh encoder for training from scratch, initialised like Hugging Face BERT: weights and
 * embeddings N(0, init_range), biases 0, LayerNorm weight 1 and bias 0, the pad_token_id row
 * of the word embeddings 0. NULL (and err) when the config is invalid. */
levi_bert *levi_bert_init_random(const levi_bert_config *cfg, levi_rng *rng, levi_error *err);
/* Frees the encoder, its parameters and all buffers. NULL is a no-op. */
void levi_bert_free(levi_bert *bert);

const levi_bert_config *levi_bert_get_config(const levi_bert *bert);
/* The parameter table (data and grad), owned by bert, for optimizers and checkpoints.
 * Weights may be changed between calls (optimizer steps, loading); every forward reads them
 * afresh. */
levi_params *levi_bert_params(levi_bert *bert);

/* Freezing (levi_params_set_trainable by name prefix "encoder.layer.<i>." / "embeddings.").
 * Layers are 0-based encoder layers, first..last inclusive (asserted in range). Backward
 * computes no gradient at all for a frozen tensor, and stops early when nothing below needs
 * one. Unfreeze with levi_params_set_trainable(levi_bert_params(bert), "", 1). */
void levi_bert_freeze_layers(levi_bert *bert, int first, int last);
void levi_bert_freeze_embeddings(levi_bert *bert);

/* ---------------------------------------------------------------------------------------
 * LoRA (Hu et al. 2022, as peft's LoraLayer computes it): a target weight W [out, in] of every
 * layer gets a low-rank update, y = x W^T + b + (alpha / r) * (x A^T) B^T, with A [r, in]
 * initialised Kaiming-uniform(a = sqrt(5)) like nn.Linear (U(-1/sqrt(in), 1/sqrt(in))) and B
 * [out, r] zero, so a fresh adapter changes nothing. The tensors join the parameter table as
 * "encoder.layer.<l>.<module>.lora_A.weight" / ".lora_B.weight" (peft's names without its
 * "base_model.model." prefix), where <module> is the target's own name
 * ("attention.self.query", ...). Adding LoRA freezes every base tensor; backward computes the
 * low-rank gradients only (dB += s dY^T (X A^T), dA += s (dY B)^T X), never a dense dW.
 * The forward adds the update to the (already copied) packed QKV weights or to a per-target
 * effective copy, W + s B A, so the big GEMMs stay one GEMM each; this equals the two-path
 * sum up to float rounding (checked against explicit torch code in tests/ref/bert). */
typedef enum {
    LEVI_LORA_QUERY = 1 << 0,        /* attention.self.query */
    LEVI_LORA_KEY = 1 << 1,          /* attention.self.key */
    LEVI_LORA_VALUE = 1 << 2,        /* attention.self.value */
    LEVI_LORA_ATTN_OUTPUT = 1 << 3,  /* attention.output.dense */
    LEVI_LORA_INTERMEDIATE = 1 << 4, /* intermediate.dense */
    LEVI_LORA_OUTPUT = 1 << 5,       /* output.dense */
} levi_lora_target;

typedef struct levi_bert_lora_params {
    int rank;         /* r >= 1 (8) */
    float alpha;      /* lora_alpha (8, peft's default); the update is scaled by alpha / r */
    float dropout;    /* lora_dropout on x before A: only 0 is implemented (the default) */
    unsigned targets; /* OR of levi_lora_target (query | value, peft's default for BERT) */
} levi_bert_lora_params;

levi_bert_lora_params levi_bert_lora_default_params(void);
/* Parses a comma-separated target list of module names ("query,value", "key",
 * "attention.output.dense" or its short form "attn_output", "intermediate", "output", or
 * "all") into *targets; an unknown name is LEVI_ERR_ARG naming it. */
levi_status levi_bert_lora_parse_targets(const char *list, unsigned *targets, levi_error *err);
/* Adds LoRA tensors to every layer (A from rng, B = 0), rebuilds the parameter table (its data
 * and grad buffers move: re-fetch levi_bert_params() pointers' data, and create optimizers
 * after this call) and freezes every base tensor. Once per model (asserted). LEVI_ERR_ARG for
 * rank < 1, rank > min(in, out) of a target, alpha not finite, dropout != 0 or no target. */
levi_status levi_bert_lora_add(levi_bert *bert, const levi_bert_lora_params *lp, levi_rng *rng,
                               levi_error *err);
/* 1 when LoRA tensors exist; *lp (may be NULL) receives their settings. */
int levi_bert_lora_get(const levi_bert *bert, levi_bert_lora_params *lp);
/* Trainable parameters LoRA adds to a config: layers * sum over targets of r * (in + out). */
size_t levi_bert_lora_param_count(const levi_bert_config *cfg, const levi_bert_lora_params *lp);
/* Merge: W += (alpha/r) B A in the base tensors, after which the forward no longer adds the
 * update (inference and saving; do not train while merged). Unmerge subtracts it again (equal
 * to the weights before merging up to float rounding, not bit-exact). Both are no-ops
 * without LoRA or when already in the requested state. */
void levi_bert_lora_merge(levi_bert *bert);
void levi_bert_lora_unmerge(levi_bert *bert);

/* Writes a Hugging Face-style folder that levi_bert_open and transformers' BertModel read:
 * <dir>/config.json (the config with model_type "bert"), <dir>/model.safetensors (the base
 * tensors under their checkpoint names, LoRA merged in, no LoRA tensors; metadata
 * format "pt") and, when copy_from is given, that folder's vocab.txt (required),
 * tokenizer_config.json, special_tokens_map.json and tokenizer.json (when present). The model
 * itself is not changed. Files are written atomically; dir is created. */
levi_status levi_bert_save(const levi_bert *bert, const char *dir, const char *copy_from,
                           levi_error *err);

/* ---------------------------------------------------------------------------------------
 * Forward. */
typedef enum {
    LEVI_BERT_INFER = 0, /* saves nothing but the hidden states; the fast path */
    LEVI_BERT_TRAIN = 1, /* saves activations for levi_bert_backward; dropout active */
} levi_bert_mode;

typedef struct levi_bert_forward_params {
    levi_bert_mode mode;
    float hidden_dropout; /* train mode only; < 0: the config's hidden_dropout_prob */
    float attn_dropout;   /* train mode only; < 0: the config's attention_probs_dropout_prob */
    levi_rng *rng;        /* needed in train mode when a dropout probability is > 0 */
} levi_bert_forward_params;

/* {LEVI_BERT_INFER, -1, -1, NULL}. */
levi_bert_forward_params levi_bert_default_forward_params(void);

/* ids, mask, types: [B,S] int32 (mask may be NULL: all 1; types may be NULL: all 0). mask
 * is 1 for a real token, 0 for padding (padded keys get attention 0; padded positions still
 * get hidden states, as in Hugging Face; keys after the last real one cost nothing). Ids out of [0,
 * V), types out of [0, type_vocab), S > max_pos or B, S < 1 are errors (LEVI_ERR_ARG /
 * LEVI_ERR_SHAPE) naming the batch position. Buffers: the activations live in one arena per mode,
 * sized by the functions below; it is reused when a later batch needs no more and regrown (once)
 * when it needs more, so no allocation happens per call at a steady batch shape. */
levi_status levi_bert_forward(levi_bert *bert, const int32_t *ids, const int32_t *mask,
                              const int32_t *types, int B, int S,
                              const levi_bert_forward_params *params, levi_error *err);
/* Hidden state `layer` (0..L) of the last forward, [B,S,H]. Owned by bert; valid until the
 * next forward (of either mode) or levi_bert_free. */
const float *levi_bert_hidden(const levi_bert *bert, int layer);
/* B and S of the last forward (0 before any). */
void levi_bert_last_shape(const levi_bert *bert, int *B, int *S);

/* Bytes of the activation arenas: pure functions of the shapes, of whether hidden dropout is
 * on (its masks are kept only then; attention dropout keeps none, its decisions are recomputed
 * from a seed) and of the OpenMP thread count (one attention scratch per thread). Train mode
 * keeps per layer ~10 [N,H] + 2 [N,I] + 1 [B,heads,S,S] floats (about 810 MiB for MiniLM at
 * 64 x 64 with dropout) plus backward buffers; inference keeps the L+1
 * hidden states plus the scratch of one chunk of at most 8192 tokens (5 H + I floats per
 * token), about 96 MiB at 64 x 64. */
size_t levi_bert_train_arena_bytes(const levi_bert_config *cfg, int B, int S, int hidden_dropout,
                                   int attn_dropout, int threads);
size_t levi_bert_infer_arena_bytes(const levi_bert_config *cfg, int B, int S, int threads);

/* ---------------------------------------------------------------------------------------
 * Backward, after a LEVI_BERT_TRAIN forward (asserted), for the loss whose gradients w.r.t.
 * the hidden states are given.
 *  d_hidden: NULL, or L+1 pointers, each NULL (no gradient) or [B,S,H] = dLoss/d hidden l.
 *  Parameter gradients ACCUMULATE (+=) into levi_bert_params(bert)->grad, for trainable
 *  tensors only (frozen ones are not computed at all).
 *  d_out: NULL, or [B,S,H] that receives (+=) the total dLoss/d hidden state d_out_layer
 *  (0 = the embedding output; the given d_hidden[d_out_layer] included).
 * Layers above the highest given gradient are skipped; back-propagation stops below the
 * lowest layer that has a trainable tensor (or at d_out_layer if that is lower). */
void levi_bert_backward(levi_bert *bert, const float *const *d_hidden, float *d_out,
                        int d_out_layer);

/* ---------------------------------------------------------------------------------------
 * Mean over the valid tokens (mask of the last forward) of hidden state `layer`:
 * out[B,H] (levi_meanpool_forward). The sentence-transformers embedding of MiniLM is
 * layer L, then L2-normalised. */
void levi_bert_meanpool(const levi_bert *bert, int layer, float *out);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_BERT_H */
