/* Internals shared by the vision trainers (src/methods/vision.c, vision_ft.c).
 * Not for: callers outside src/methods (they use include/levi/vision.h, vision_ft.h). */
#ifndef LEVI_VISION_INTERNAL_H
#define LEVI_VISION_INTERNAL_H

#include "levi/vision.h"

/* End of epoch `epoch` of a vision training loop: records its mean training loss and ID-val
 * accuracy (acc; has_val 0: no validation rows, every epoch counts as the best) in res,
 * updates the early-stopping count *since_best and reports progress through tp. Returns 1
 * when this epoch is the best so far (the caller keeps its weights), else 0. */
int levi__vision_epoch_end(levi_vision_train_result *res, const levi_vision_train_params *tp,
                           int epoch, int64_t steps, double loss_mean, double acc, int has_val,
                           int *since_best);

/* Reports progress after step `step` (1-based) of `steps` in an epoch, when tp asks for it. */
void levi__vision_step_progress(const levi_vision_train_params *tp, int epoch, int64_t step,
                                int64_t steps, double loss_mean);

/* Checks what every vision trainer needs of its arguments: n_train >= 2 rows (`what`: the
 * trainer, for the message) and the training parameters in range. */
levi_status levi__vision_train_check(const levi_vision_train_params *tp, int64_t n_train,
                                     const char *what, levi_error *err);

#endif
