/* Implementation of tests/testutil.h. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *levi_test_env_path(const char *var) {
    const char *v = getenv(var);
    struct stat st;
    if (!v || !*v || stat(v, &st) != 0) return NULL;
    return v;
}

const char *levi_test_require_path(const char *var, const char *test, const char *why) {
    const char *v = levi_test_env_path(var);
    if (!v) {
        printf("SKIP %s: %s is not set or does not exist (%s)\n", test, var, why);
        fflush(stdout);
        exit(LEVI_TEST_SKIP_CODE);
    }
    return v;
}

const char *levi_test_source_path(const char *rel) {
    static char buf[4096];
    const char *root = getenv("LEVI_SOURCE_DIR");
    if (!root || !*root) return rel;
    snprintf(buf, sizeof buf, "%s/%s", root, rel);
    return buf;
}

void levi_test_tmpdir(char *buf, size_t cap) {
    const char *base = getenv("TMPDIR");
    snprintf(buf, cap, "%s/levi-test-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(buf)) {
        perror("mkdtemp");
        exit(1);
    }
}

double levi_test_max_abs_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) m = d; /* NaN propagates as a failure */
    }
    return m;
}

double levi_test_max_rel_diff(const float *a, const float *b, int64_t n, double floor) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]) / (fabs((double)b[i]) + floor);
        if (!(d <= m)) m = d;
    }
    return m;
}
