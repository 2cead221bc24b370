/* Cost of levi's models from their definitions: parameter counts and forward FLOPs per
 * example, for the efficiency table (paper Table 15 layout) that `levi fit` reports.
 *
 * FLOPs count one multiply-add as 2 (the convention of the papers Table 15 cites) and only
 * the matrix products: biases, activations, layer norms, softmax and embedding look-ups are
 * O(width) per token against O(width^2) for the products and are left out (for MiniLM on
 * MovieLens texts they add well under 2%).
 *
 * Not for: measuring anything (timings and memory are the CLI's), or the backbone-training
 * models' own heads (finetune.h knows those; a mean-pooled linear head is hidden x outputs).
 */
#ifndef LEVI_COST_H
#define LEVI_COST_H

#include "levi/bert.h"
#include "levi/levi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Parameters of a BERT encoder through `layers` transformer layers (0: the embeddings only;
 * cfg->layers: all), without the pooler, which levi never uses (mean pooling). */
int64_t levi_bert_n_params_through(const levi_bert_config *cfg, int layers);

/* Forward FLOPs of one text of `tokens` tokens through `layers` transformer layers:
 *   layers * (8*T*H^2      QKV and output projections, 4 GEMMs of [T,H]x[H,H]
 *             + 4*T*H*I    feed-forward up and down, [T,H]x[H,I] and [T,I]x[I,H]
 *             + 4*T^2*H)   attention scores QK^T and the weighted sum of V (all heads)
 * with T = tokens, H = hidden, I = intermediate. T may be a mean over texts (fractional):
 * the T^2 term then slightly underestimates a spread of lengths. */
double levi_bert_flops_through(const levi_bert_config *cfg, int layers, double tokens);

/* Forward FLOPs of one example through the head model m (small MLP and adapters; the bias
 * model's additions), excluding the backbone that made its features. */
double levi_model_flops_per_example(const levi_model *m);

/* Number of transformer layers the backbone must run for m's features: the deepest feature
 * layer any adapter reads (feature layer k is the output of transformer layer k; 0 is the
 * embeddings), or -1 when m reads no backbone features. */
int levi_model_backbone_depth(const levi_model *m);

#ifdef __cplusplus
}
#endif

#endif
