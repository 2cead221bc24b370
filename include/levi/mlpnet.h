/* levi mlpnet: a small fully connected network on dense float inputs, with its own trainer.
 *
 * Network: n_in -> hidden[0] -> ReLU -> ... -> hidden[n_hidden-1] -> ReLU -> n_out, every
 * layer a linear map with bias in PyTorch's layout and PyTorch's default initialisation
 * (nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))). Loss: softmax
 * cross-entropy over n_out classes, or mean squared error on n_out targets. Weights live in
 * one levi_params table with the keys "fc.<l>.weight" [out, in] and "fc.<l>.bias" [out],
 * l = 0..n_hidden (the output layer is the last).
 *
 * Training: minibatch SGD/Adam/AdamW (optim.h), shuffles drawn from the seed, early stopping
 * on a validation index set (accuracy for cross-entropy, RMSE for MSE; strictly better is an
 * improvement) keeping the best epoch's weights. Fine-tuning is training a clone of a
 * trained network (levi_mlpnet_clone) instead of a fresh one.
 *
 * Not for: large models (no threading beyond levi_gemm's, one workspace per network: use a
 * network from one thread at a time), embeddings, dropout, or anything that reads files.
 * Ownership: levi_mlpnet_free releases a network (NULL is fine); data arrays are borrowed for
 * the duration of a call. Determinism: same seed and thread count, same weights.
 */
#ifndef LEVI_MLPNET_H
#define LEVI_MLPNET_H

#include "levi/core.h"
#include "levi/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LEVI_MLP_MAX_HIDDEN 8

typedef enum { LEVI_MLP_LOSS_CE = 0, LEVI_MLP_LOSS_MSE } levi_mlp_loss;

typedef struct levi_mlpnet_params {
    int n_in;
    int n_hidden;                    /* hidden layers, 0..LEVI_MLP_MAX_HIDDEN */
    int hidden[LEVI_MLP_MAX_HIDDEN]; /* widths */
    int n_out;                       /* classes (CE, >= 2) or targets (MSE, >= 1) */
    levi_mlp_loss loss;
} levi_mlpnet_params;
/* 3 inputs, hidden {64, 64}, 2 classes, cross-entropy: the 3-layer network of E.8. */
levi_mlpnet_params levi_mlpnet_default_params(void);

/* Dense data: X [n, n_in]; labels yc [n] in [0, n_out) (CE) or targets y [n, n_out] (MSE). */
typedef struct levi_mlp_data {
    int64_t n;
    int n_in;
    const float *X;
    const int32_t *yc;
    const float *y;
} levi_mlp_data;

typedef struct levi_mlpnet levi_mlpnet;
/* Builds the network and initialises its weights from seed. LEVI_ERR_ARG names the bad
 * field of p. */
levi_status levi_mlpnet_init(levi_mlpnet **out, const levi_mlpnet_params *p, uint64_t seed,
                             levi_error *err);
/* An independent copy (weights included) of src. */
levi_status levi_mlpnet_clone(levi_mlpnet **out, const levi_mlpnet *src, levi_error *err);
void levi_mlpnet_free(levi_mlpnet *net);
const levi_mlpnet_params *levi_mlpnet_config(const levi_mlpnet *net);
levi_params *levi_mlpnet_params_table(levi_mlpnet *net); /* owned by the network */
size_t levi_mlpnet_n_params(const levi_mlpnet *net);

/* Outputs of rows[0..n) of d (rows NULL: rows 0..n-1): out [n, n_out] (logits for CE,
 * predictions for MSE). */
levi_status levi_mlpnet_forward(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                                int64_t n, float *out, levi_error *err);
/* Output of hidden layer `layer` (after its ReLU) for rows[0..n): row i goes to
 * out + i * ld_out (ld_out >= hidden[layer]), so several layers can be written side by side
 * in one [n, n_layers, width] array (the `feats` layout of levi.h). */
levi_status levi_mlpnet_hidden(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                               int64_t n, int layer, float *out, int64_t ld_out, levi_error *err);

/* Mean loss over rows[0..n) (n >= 1), and its gradient ADDED into the parameter table's
 * grad buffer (levi_params_zero_grad first for a fresh gradient): the step of a custom loop,
 * and what the gradient check tests. */
levi_status levi_mlpnet_loss_backward(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                                      int64_t n, double *loss, levi_error *err);

typedef struct levi_mlpnet_train_params {
    levi_opt_kind optimizer; /* Adam */
    float lr;                /* 1e-3 */
    float momentum;          /* SGD only: 0 */
    float weight_decay;      /* 0 */
    int batch_size;          /* 100 */
    int max_epochs;          /* 100 */
    int patience;            /* 10 epochs without a better validation metric stop training */
    uint64_t seed;           /* shuffles */
} levi_mlpnet_train_params;
levi_mlpnet_train_params levi_mlpnet_train_default_params(void);

typedef struct levi_mlpnet_train_result {
    int epochs_run;
    int best_epoch; /* 1-based; with no validation set the last epoch */
    double best_val_metric;
    double last_train_loss; /* mean loss of the last epoch */
    int stopped_early;
    int diverged; /* a non-finite loss stopped training; the best epoch is kept */
} levi_mlpnet_train_result;

/* Trains on rows train[0..n_train), early-stopping on val[0..n_val) (n_val == 0: keeps the
 * last epoch). LEVI_ERR_NUMERIC when the loss is non-finite before any epoch finished (the
 * weights are then those before training). res may be NULL. */
levi_status levi_mlpnet_train(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *train,
                              int64_t n_train, const int64_t *val, int64_t n_val,
                              const levi_mlpnet_train_params *tp, levi_mlpnet_train_result *res,
                              levi_error *err);

/* metric: accuracy (CE) or RMSE (MSE) over rows[0..n); loss: mean CE or MSE. Either output
 * may be NULL. */
levi_status levi_mlpnet_evaluate(levi_mlpnet *net, const levi_mlp_data *d, const int64_t *rows,
                                 int64_t n, double *metric, double *loss, levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_MLPNET_H */
