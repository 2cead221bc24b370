/* Parameter counts and forward FLOPs of the head models and the BERT encoder (cost.h), from
 * their shapes alone; nothing is run or timed here.
 * Not for: measured costs (the CLI records seconds and memory), or models outside levi. */
#include "levi/cost.h"

#include "head_internal.h"

int64_t levi_bert_n_params_through(const levi_bert_config *c, int layers) {
    LEVI_ASSERT(c != NULL && layers >= 0 && layers <= c->layers,
                "levi_bert_n_params_through: layers must be in [0, cfg->layers]");
    int64_t H = c->hidden, I = c->intermediate;
    /* word + position + token-type embeddings and their layer norm */
    int64_t emb = ((int64_t)c->vocab + c->max_pos + c->type_vocab) * H + 2 * H;
    /* Q, K, V, O (weights and biases), two layer norms, FFN up and down */
    int64_t layer = 4 * (H * H + H) + 2 * 2 * H + (H * I + I) + (I * H + H);
    return emb + (int64_t)layers * layer;
}

double levi_bert_flops_through(const levi_bert_config *c, int layers, double tokens) {
    LEVI_ASSERT(c != NULL && layers >= 0 && layers <= c->layers && tokens >= 0,
                "levi_bert_flops_through: layers must be in [0, cfg->layers], tokens >= 0");
    double T = tokens, H = c->hidden, I = c->intermediate;
    return layers * (8 * T * H * H + 4 * T * H * I + 4 * T * T * H);
}

double levi_model_flops_per_example(const levi_model *m) {
    LEVI_ASSERT(m != NULL, "levi_model_flops_per_example: m is NULL");
    const levi_head_params *hp = &m->hp;
    if (hp->method == LEVI_METHOD_BIAS) {
        /* global mean plus one bias per chosen column: additions only */
        int n = 1;
        for (int c = 0; c < m->n_cat && c < 64; c++) n += (int)((hp->bias_cols >> c) & 1);
        return n;
    }
    double flops = 0;
    int in = m->in0;
    for (int l = 0; l < m->n_small; l++) {
        flops += 2.0 * in * m->small_dim[l];
        in = m->small_dim[l];
    }
    for (int j = 0; j < m->n_adapters; j++) {
        flops += 2.0 * m->adapter_in[j] * m->first_out;
        if (hp->adapter_hidden > 0) flops += 2.0 * m->first_out * m->n_out;
    }
    return flops;
}

int levi_model_backbone_depth(const levi_model *m) {
    LEVI_ASSERT(m != NULL, "levi_model_backbone_depth: m is NULL");
    int depth = -1;
    for (int j = 0; j < m->n_adapters; j++)
        if (m->adapter_layer[j] > depth) depth = m->adapter_layer[j];
    return depth;
}
