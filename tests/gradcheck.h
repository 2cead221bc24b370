/* The finite-difference harness shared by the op tests (tests/test_ops.c, tests/test_ops_conv.c)
 * and the small array helpers they use.
 *
 * An op under test fills a gradcase: its differentiable tensors x[i] (inputs and parameters)
 * with sizes, a loss() that runs the forward on the current values and returns sum(out * R) in
 * double (R a fixed random projection), and a backward() that runs the op's backward with
 * dout = R into the gradient buffers it is given (entries may be NULL). run_gradcase then
 * checks, for every tensor:
 *   - the analytic gradient against central differences: |analytic - numeric| <= rtol |numeric|
 *     + atol max(1, max|numeric|), with the realised step (x+eps) - (x-eps) in float;
 *   - that the gradient is not identically zero (it would pass trivially);
 *   - that backward accumulates (a second call doubles the gradients, to 1e-5 of the largest);
 *   - that every gradient pointer may be NULL (each gradient alone equals the one computed
 *     with all the others, to 1e-6).
 * Defaults (a zero field takes them): step 1e-2, rtol 2e-3, atol 2e-4; tests/test_ops.c says
 * why the step is that large. -DTEST_FD_EPS=e changes the default step.
 * Not for: forward references (each test compares its forwards against its own naive code). */
#ifndef LEVI_TEST_GRADCHECK_H
#define LEVI_TEST_GRADCHECK_H

#include "levi/core.h"
#include "testutil.h"

#include <stdint.h>

#define EXPECT_LE(val, tol, what)                                                                  \
    do {                                                                                           \
        double v_ = (val), t_ = (tol);                                                             \
        if (!(v_ <= t_)) {                                                                         \
            print_error("%s:%d: %s = %.4g exceeds tolerance %.4g\n", __FILE__, __LINE__, what, v_, \
                        t_);                                                                       \
            fail();                                                                                \
        }                                                                                          \
    } while (0)

#define GC_MAX 4
typedef struct gradcase {
    const char *op;
    int count;
    const char *name[GC_MAX];
    float *x[GC_MAX];
    int64_t n[GC_MAX];
    double (*loss)(struct gradcase *);
    void (*backward)(struct gradcase *, float *const *grads);
    void *ctx;
    float eps;   /* perturbation; 0: the default */
    double rtol; /* 0: the default */
    double atol; /* 0: the default */
} gradcase;

void gc_defaults(gradcase *gc); /* sets eps, rtol and atol to the defaults */
void run_gradcase(gradcase *gc);

float *alloc_f(int64_t n); /* zeroed; levi_free it */
float *rand_normal(levi_rng *r, int64_t n, float scale);
float *copy_f(const float *x, int64_t n);
double dot_d(const float *a, const float *b, int64_t n); /* in double */
/* Max |a-b| / max |b|: the error relative to the scale of the whole tensor. */
double max_norm_err(const float *a, const float *b, int64_t n);

#endif
