/* levi optim: optimizers and schedules over a levi_params table.
 *
 * The update runs over the ONE parameter buffer (fused), skipping frozen tensors, with
 * optimizer state in one allocation of the same layout. Weight decay: L2 added to the
 * gradient for SGD/Adam ("weight_decay"), decoupled for AdamW; tensors marked no_decay are
 * skipped. Gradient clipping by global L2 norm over trainable tensors.
 * Not for: knowing what the parameters mean (models do).
 */
#ifndef LEVI_OPTIM_H
#define LEVI_OPTIM_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LEVI_OPT_SGD = 0, LEVI_OPT_ADAM, LEVI_OPT_ADAMW } levi_opt_kind;
typedef enum { LEVI_SCHED_CONSTANT = 0, LEVI_SCHED_LINEAR, LEVI_SCHED_COSINE } levi_sched_kind;

typedef struct levi_optim_params {
    levi_opt_kind kind;
    float lr;           /* peak learning rate */
    float momentum;     /* SGD */
    int nesterov;       /* SGD */
    float beta1, beta2; /* Adam/AdamW */
    float eps;
    float weight_decay;
    float clip_norm; /* <= 0: no clipping */
    levi_sched_kind schedule;
    int64_t warmup_steps; /* linear warm-up from 0 to lr (LINEAR and COSINE) */
    int64_t total_steps;  /* decay to 0 at total_steps (LINEAR and COSINE) */
} levi_optim_params;

levi_optim_params levi_optim_default_params(levi_opt_kind kind);

typedef struct levi_optim levi_optim;
/* The optimizer keeps a pointer to params; params must outlive it and must not be
 * re-allocated. State buffers are zero-initialised. */
levi_optim *levi_optim_init(levi_params *params, levi_optim_params op);
void levi_optim_free(levi_optim *o);
/* One update from params->grad. Returns the global gradient norm before clipping (over
 * trainable tensors). Clipping scales the update, not params->grad, which is left unchanged
 * and not zeroed. A NaN or Inf gradient norm skips the step (it is not counted) and is
 * returned so the caller can report it. Invalid settings (negative lr, beta outside [0,1))
 * are programmer misuse and assert: validate user options before. */
float levi_optim_step(levi_optim *o);
float levi_optim_lr(const levi_optim *o); /* learning rate the next step will use */
int64_t levi_optim_steps(const levi_optim *o);
/* State for checkpoints: one float buffer of state_numel() floats (moments), plus the step. */
size_t levi_optim_state_numel(const levi_optim *o);
float *levi_optim_state(levi_optim *o);
void levi_optim_set_steps(levi_optim *o, int64_t steps);
/* Learning rate multiplier of a schedule at a step (pure; exposed for tests). LINEAR and
 * COSINE reach 0 at total_steps and stay there. */
float levi_schedule_factor(levi_sched_kind kind, int64_t step, int64_t warmup, int64_t total);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_OPTIM_H */
