/* Shared helpers for levi's cmocka tests: finding inputs through the environment, skipping
 * clearly when an input is absent, and comparing arrays with written-down tolerances. */
#ifndef LEVI_TESTUTIL_H
#define LEVI_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#define LEVI_TEST_SKIP_CODE 77

/* The value of an environment variable if it is set, non-empty and names an existing path;
 * otherwise NULL. */
const char *levi_test_env_path(const char *var);
/* Like levi_test_env_path, but when absent prints "SKIP <test>: <why>" and exits with 77, which
 * ctest reports as skipped. Use at the top of main() for whole-binary inputs. */
const char *levi_test_require_path(const char *var, const char *test, const char *why);
/* "<LEVI_SOURCE_DIR>/<rel>" (or rel itself when the variable is unset) in a static buffer. */
const char *levi_test_source_path(const char *rel);
/* Writes a temporary directory path (created) into buf. */
void levi_test_tmpdir(char *buf, size_t cap);
/* Max |a-b| and max |a-b| / (|b| + floor). */
double levi_test_max_abs_diff(const float *a, const float *b, int64_t n);
double levi_test_max_rel_diff(const float *a, const float *b, int64_t n, double floor);

#endif
