/* safetensors reader and writer (implements include/levi/safetensors.h).
 *
 * For: loading checkpoints (Hugging Face model.safetensors, levi's own) through a validated
 * read-only mmap, and writing checkpoints that safetensors.torch.load_file accepts.
 * Not for: dtypes outside F32/F16/BF16/I32/I64/U8, big-endian hosts, files that change while
 * mapped (truncating a mapped file under us raises SIGBUS; nothing portable can catch that).
 *
 * The file is untrusted: every number in the header is range-checked before it is used in
 * arithmetic, and no tensor is exposed until the whole header has been validated.
 */
#include "levi/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* A header longer than this is hostile or broken: real headers are a few hundred bytes per
 * tensor, and the reference implementation caps them at 100 MB as well. */
#define ST_HEADER_CAP ((uint64_t)100 * 1000 * 1000)
/* Integers above 2^53 cannot be told apart after cJSON stores them as doubles. */
#define ST_MAX_JSON_INT 9007199254740992.0
/* Tensor names are quoted in messages up to this many bytes. */
#define ST_NAME_QUOTE 80

struct levi_st_file {
    char *path;
    uint8_t *map;
    size_t map_len;
    const uint8_t *data; /* first byte after the header */
    size_t data_len;
    levi_tensor *tensors; /* header order */
    int count;
    int *by_name; /* indices into tensors sorted by name, for levi_st_find */
    char **meta_keys;
    char **meta_vals;
    int n_meta;
};

static const struct {
    const char *name;
    levi_dtype dtype;
} st_dtypes[] = {{"F32", LEVI_F32}, {"F16", LEVI_F16}, {"BF16", LEVI_BF16},
                 {"I32", LEVI_I32}, {"I64", LEVI_I64}, {"U8", LEVI_U8}};
#define ST_N_DTYPES ((int)(sizeof st_dtypes / sizeof st_dtypes[0]))

static const char *st_dtype_str(levi_dtype dt) {
    for (int i = 0; i < ST_N_DTYPES; i++)
        if (st_dtypes[i].dtype == dt) return st_dtypes[i].name;
    return NULL;
}

/* Only the dtypes in the table are accepted: levi_dtype_name would also name future ones. */
static int st_dtype_parse(const char *s, levi_dtype *out) {
    for (int i = 0; i < ST_N_DTYPES; i++) {
        if (strcmp(st_dtypes[i].name, s) == 0) {
            *out = st_dtypes[i].dtype;
            return 1;
        }
    }
    return 0;
}

static const char *json_kind(const cJSON *j) {
    if (!j) return "nothing";
    if (cJSON_IsObject(j)) return "an object";
    if (cJSON_IsArray(j)) return "an array";
    if (cJSON_IsString(j)) return "a string";
    if (cJSON_IsNumber(j)) return "a number";
    if (cJSON_IsBool(j)) return "a boolean";
    if (cJSON_IsNull(j)) return "null";
    return "an invalid value";
}

/* Reads a JSON number that must be a non-negative integer small enough to be exact. */
static int json_uint(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return 0;
    double d = j->valuedouble;
    if (!(d >= 0.0 && d <= ST_MAX_JSON_INT) || d != floor(d)) return 0;
    *out = (uint64_t)d;
    return 1;
}

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t used = 0;
    buf[0] = '\0';
    used += (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
}

void levi_st_close(levi_st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_vals[i]);
    }
    free(f->meta_keys);
    free(f->meta_vals);
    free(f->tensors);
    free(f->by_name);
    free(f->path);
    free(f);
}

/* qsort contexts cannot carry a pointer in C11, so sort (key, index) pairs instead. */
typedef struct {
    uint64_t begin, end;
    int index;
} st_span;

static int span_cmp(const void *a, const void *b) {
    const st_span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->index - y->index;
}

typedef struct {
    const char *name;
    int index;
} st_named;

static int named_cmp(const void *a, const void *b) {
    const st_named *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : x->index - y->index;
}

static levi_status parse_metadata(levi_st_file *f, const cJSON *meta, levi_error *err) {
    if (!cJSON_IsObject(meta))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: \"__metadata__\" must be an object of strings, found %s", f->path,
                           json_kind(meta));
    int n = cJSON_GetArraySize(meta);
    if (n == 0) return LEVI_OK;
    f->meta_keys = calloc((size_t)n, sizeof *f->meta_keys);
    f->meta_vals = calloc((size_t)n, sizeof *f->meta_vals);
    if (!f->meta_keys || !f->meta_vals)
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %d metadata entries",
                           f->path, n);
    const cJSON *kv;
    cJSON_ArrayForEach(kv, meta) {
        if (!cJSON_IsString(kv))
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: \"__metadata__\" key '%.*s': expected a string value, found %s",
                               f->path, ST_NAME_QUOTE, kv->string, json_kind(kv));
        f->meta_keys[f->n_meta] = strdup(kv->string);
        f->meta_vals[f->n_meta] = strdup(kv->valuestring);
        f->n_meta++;
        if (!f->meta_keys[f->n_meta - 1] || !f->meta_vals[f->n_meta - 1])
            return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for metadata", f->path);
    }
    return LEVI_OK;
}

/* Validates one header entry and fills t (data pointer included); span gets its offsets. */
static levi_status parse_entry(levi_st_file *f, const cJSON *e, levi_tensor *t, st_span *span,
                               levi_error *err) {
    const char *name = e->string;
    const char *p = f->path;
    const int q = ST_NAME_QUOTE;
    size_t name_len = strlen(name);
    if (name_len == 0)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: a tensor has an empty name", p);
    if (name_len >= LEVI_NAME_MAX)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor name '%.*s...' is %zu bytes long, expected at most %d", p, q,
                           name, name_len, LEVI_NAME_MAX - 1);
    if (!cJSON_IsObject(e))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': expected an object with dtype, shape and "
                           "data_offsets, found %s",
                           p, q, name, json_kind(e));

    const cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(jd))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': \"dtype\" must be a string, found %s", p, q, name,
                           json_kind(jd));
    levi_dtype dt;
    if (!st_dtype_parse(jd->valuestring, &dt))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': unsupported dtype \"%.*s\" (expected one of F32, "
                           "F16, BF16, I32, I64, U8)",
                           p, q, name, 16, jd->valuestring);

    if (!cJSON_IsArray(js))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': \"shape\" must be an array of non-negative "
                           "integers, found %s",
                           p, q, name, json_kind(js));
    int ndim = cJSON_GetArraySize(js);
    if (ndim > LEVI_MAX_DIMS)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': shape has %d dimensions, expected at most %d", p, q,
                           name, ndim, LEVI_MAX_DIMS);
    int64_t shape[LEVI_MAX_DIMS] = {0};
    size_t numel = 1;
    int overflow = 0;
    for (int d = 0; d < ndim; d++) {
        const cJSON *jv = cJSON_GetArrayItem(js, d);
        uint64_t v;
        if (!json_uint(jv, &v)) {
            if (cJSON_IsNumber(jv))
                return levi_errorf(err, LEVI_ERR_FORMAT,
                                   "%s: tensor '%.*s': shape[%d] is %g, expected a "
                                   "non-negative integer below 2^53",
                                   p, q, name, d, jv->valuedouble);
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: tensor '%.*s': shape[%d] is %s, expected a non-negative "
                               "integer",
                               p, q, name, d, json_kind(jv));
        }
        shape[d] = (int64_t)v;
        if (!levi_mul_size(numel, (size_t)v, &numel)) overflow = 1;
    }
    size_t esize = levi_dtype_size(dt), nbytes = 0;
    if (overflow || !levi_mul_size(numel, esize, &nbytes) || numel > (size_t)INT64_MAX) {
        char sb[160];
        shape_str(sb, sizeof sb, ndim, shape);
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': shape %s has more elements than fit in memory "
                           "(size overflows)",
                           p, q, name, sb);
    }

    uint64_t begin, end;
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2 ||
        !json_uint(cJSON_GetArrayItem(jo, 0), &begin) ||
        !json_uint(cJSON_GetArrayItem(jo, 1), &end))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': \"data_offsets\" must be [begin, end] with "
                           "non-negative integers below 2^53, found %s",
                           p, q, name,
                           cJSON_IsArray(jo) ? "an array of other contents" : json_kind(jo));
    /* File byte offsets for the messages: header length field + header + data offset. */
    size_t data_pos = (size_t)(f->data - f->map);
    if (begin > end)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': data_offsets [%" PRIu64 ", %" PRIu64
                           "] has begin > end (data starts at file byte %zu)",
                           p, q, name, begin, end, data_pos);
    if (end > f->data_len)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': data_offsets end %" PRIu64
                           " is past the end of the data: expected at most %zu (file is %zu "
                           "bytes, data starts at byte %zu)",
                           p, q, name, end, f->data_len, f->map_len, data_pos);
    if (end - begin != nbytes) {
        char sb[160];
        shape_str(sb, sizeof sb, ndim, shape);
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%.*s': data_offsets [%" PRIu64 ", %" PRIu64
                           "] span %" PRIu64 " bytes, expected %zu (%s %s = %zu elements of %zu "
                           "bytes)",
                           p, q, name, begin, end, end - begin, nbytes, st_dtype_str(dt), sb, numel,
                           esize);
    }

    memset(t, 0, sizeof *t);
    memcpy(t->name, name, name_len + 1);
    t->dtype = dt;
    levi_tensor_set_shape(t, ndim, shape);
    /* The mapping is read-only; the descriptor's pointer is non-const only because the type
     * is shared with writable tensors. */
    t->data = (void *)(f->data + begin);
    span->begin = begin;
    span->end = end;
    return LEVI_OK;
}

static levi_status parse_header(levi_st_file *f, const char *json, size_t len, levi_error *err) {
    const char *p = f->path;
    const char *parse_end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &parse_end, 0);
    if (!root) {
        size_t at = parse_end ? (size_t)(parse_end - json) : 0;
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: header is not valid JSON: parse error at file byte %zu (the header "
                           "spans file bytes [8, %zu))",
                           p, 8 + at, 8 + len);
    }
    levi_status st = LEVI_OK;
    /* Anything after the JSON value except the space padding is a corrupt header. */
    for (const char *c = parse_end; c < json + len; c++) {
        if (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r') {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: header is not valid JSON: unexpected byte 0x%02x after the "
                             "JSON object at file byte %zu (expected space padding)",
                             p, (unsigned)(unsigned char)*c, 8 + (size_t)(c - json));
            goto done;
        }
    }
    if (!cJSON_IsObject(root)) {
        st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: header must be a JSON object, found %s", p,
                         json_kind(root));
        goto done;
    }

    int n_entries = cJSON_GetArraySize(root);
    f->tensors = calloc((size_t)n_entries + 1, sizeof *f->tensors);
    st_span *spans = calloc((size_t)n_entries + 1, sizeof *spans);
    st_named *named = calloc((size_t)n_entries + 1, sizeof *named);
    f->by_name = calloc((size_t)n_entries + 1, sizeof *f->by_name);
    if (!f->tensors || !spans || !named || !f->by_name) {
        st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %d header entries", p,
                         n_entries);
        goto done_spans;
    }

    int have_meta = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (have_meta++) {
                st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: \"__metadata__\" appears twice", p);
                goto done_spans;
            }
            if ((st = parse_metadata(f, e, err)) != LEVI_OK) goto done_spans;
            continue;
        }
        int i = f->count;
        if ((st = parse_entry(f, e, &f->tensors[i], &spans[i], err)) != LEVI_OK) goto done_spans;
        spans[i].index = i;
        named[i].name = f->tensors[i].name;
        named[i].index = i;
        f->count++;
    }

    /* Overlap: after sorting by begin, each tensor must start at or after the previous end.
     * Empty tensors (begin == end) overlap nothing. */
    qsort(spans, (size_t)f->count, sizeof *spans, span_cmp);
    uint64_t prev_end = 0;
    int prev = -1;
    for (int k = 0; k < f->count; k++) {
        if (spans[k].begin == spans[k].end) continue;
        if (prev >= 0 && spans[k].begin < prev_end) {
            const levi_tensor *a = &f->tensors[prev], *b = &f->tensors[spans[k].index];
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: tensors '%.*s' and '%.*s' overlap: '%.*s' starts at data byte "
                             "%" PRIu64 ", expected at or after %" PRIu64 " where '%.*s' ends",
                             p, ST_NAME_QUOTE, a->name, ST_NAME_QUOTE, b->name, ST_NAME_QUOTE,
                             b->name, spans[k].begin, prev_end, ST_NAME_QUOTE, a->name);
            goto done_spans;
        }
        prev = spans[k].index;
        prev_end = spans[k].end;
    }

    /* Duplicate names: cJSON keeps both entries; \u0000 in a key can also make two distinct
     * JSON keys equal as C strings. */
    qsort(named, (size_t)f->count, sizeof *named, named_cmp);
    for (int k = 0; k < f->count; k++) {
        if (k > 0 && strcmp(named[k].name, named[k - 1].name) == 0) {
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: tensor '%.*s' appears more than once in the header", p,
                             ST_NAME_QUOTE, named[k].name);
            goto done_spans;
        }
        f->by_name[k] = named[k].index;
    }

done_spans:
    free(spans);
    free(named);
done:
    cJSON_Delete(root);
    return st;
}

levi_st_file *levi_st_open(const char *path, levi_error *err) {
    LEVI_ASSERT(path != NULL, "levi_st_open needs a path");
    levi_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        levi_errorf(err, LEVI_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        levi_st_close(f);
        return NULL;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        levi_errorf(err, LEVI_ERR_IO, "%s: not a regular file", path);
        close(fd);
        levi_st_close(f);
        return NULL;
    }
    if (sb.st_size < 8) {
        levi_errorf(err, LEVI_ERR_FORMAT,
                    "%s: file is %lld bytes, expected at least 8 (the header length field)", path,
                    (long long)sb.st_size);
        close(fd);
        levi_st_close(f);
        return NULL;
    }
    f->map_len = (size_t)sb.st_size;
    void *m = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file alive */
    if (m == MAP_FAILED) {
        levi_errorf(err, LEVI_ERR_IO, "%s: mmap of %zu bytes failed: %s", path, f->map_len,
                    strerror(errno));
        levi_st_close(f);
        return NULL;
    }
    f->map = m;

    uint64_t hlen = 0;
    for (int b = 7; b >= 0; b--) hlen = (hlen << 8) | f->map[b]; /* little-endian u64 */
    if (hlen > f->map_len - 8) {
        levi_errorf(err, LEVI_ERR_FORMAT,
                    "%s: header length at byte 0 is %" PRIu64
                    ", expected at most %zu (the bytes that follow it in the file)",
                    path, hlen, f->map_len - 8);
        levi_st_close(f);
        return NULL;
    }
    if (hlen > ST_HEADER_CAP) {
        levi_errorf(err, LEVI_ERR_FORMAT,
                    "%s: header length at byte 0 is %" PRIu64 ", expected at most %" PRIu64
                    " (the header size cap)",
                    path, hlen, ST_HEADER_CAP);
        levi_st_close(f);
        return NULL;
    }
    f->data = f->map + 8 + hlen;
    f->data_len = f->map_len - 8 - (size_t)hlen;

    /* cJSON gets its own NUL-terminated copy so no parser path can read past the header. */
    char *json = malloc((size_t)hlen + 1);
    if (!json) {
        levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for a %" PRIu64 "-byte header", path,
                    hlen);
        levi_st_close(f);
        return NULL;
    }
    memcpy(json, f->map + 8, (size_t)hlen);
    json[hlen] = '\0';
    levi_status st = parse_header(f, json, (size_t)hlen, err);
    free(json);
    if (st != LEVI_OK) {
        levi_st_close(f);
        return NULL;
    }
    return f;
}

int levi_st_count(const levi_st_file *f) {
    LEVI_ASSERT(f != NULL, "levi_st_count on a NULL file");
    return f->count;
}

const levi_tensor *levi_st_tensor(const levi_st_file *f, int i) {
    LEVI_ASSERT(f != NULL && i >= 0 && i < f->count, "tensor index out of range [0, count)");
    return &f->tensors[i];
}

const levi_tensor *levi_st_find(const levi_st_file *f, const char *name) {
    LEVI_ASSERT(f != NULL && name != NULL, "levi_st_find needs a file and a name");
    int lo = 0, hi = f->count - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const levi_tensor *t = &f->tensors[f->by_name[mid]];
        int c = strcmp(t->name, name);
        if (c == 0) return t;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

const char *levi_st_metadata(const levi_st_file *f, const char *key) {
    LEVI_ASSERT(f != NULL && key != NULL, "levi_st_metadata needs a file and a key");
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_vals[i];
    return NULL;
}

float levi_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        /* Zero or subnormal: mant * 2^-24 is exact in F32, so let the FPU normalise it. */
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf, or NaN keeping its payload */
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

float levi_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

levi_status levi_tensor_read_f32(const levi_tensor *t, const char *where, int ndim,
                                 const int64_t *shape, float *dst, levi_error *err) {
    LEVI_ASSERT(t != NULL && where != NULL && dst != NULL, "levi_tensor_read_f32 needs t, dst");
    LEVI_ASSERT(ndim >= 0 && ndim <= LEVI_MAX_DIMS && (ndim == 0 || shape != NULL),
                "ndim must be in [0, LEVI_MAX_DIMS] with a shape");
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
    if (!same) {
        char want[160], found[160];
        shape_str(want, sizeof want, ndim, shape);
        shape_str(found, sizeof found, t->ndim, t->shape);
        return levi_errorf(err, LEVI_ERR_SHAPE, "%s: tensor '%s': expected shape %s, found %s",
                           where, t->name, want, found);
    }
    int64_t n = levi_tensor_numel(t);
    const uint8_t *src = t->data;
    /* The data may sit at any byte offset (odd header lengths are legal), so every load goes
     * through memcpy; compilers turn these into plain unaligned loads. */
    switch (t->dtype) {
    case LEVI_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case LEVI_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = levi_f16_to_f32(h);
        }
        break;
    case LEVI_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = levi_bf16_to_f32(h);
        }
        break;
    default:
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: tensor '%s': dtype %s cannot be read as F32 (expected F32, F16 "
                           "or BF16)",
                           where, t->name, levi_dtype_name(t->dtype));
    }
    return LEVI_OK;
}

levi_status levi_st_read_f32(const levi_st_file *f, const char *name, int ndim,
                             const int64_t *shape, float *dst, levi_error *err) {
    LEVI_ASSERT(f != NULL && name != NULL && dst != NULL, "levi_st_read_f32 needs f, name, dst");
    const levi_tensor *t = levi_st_find(f, name);
    if (!t) return levi_errorf(err, LEVI_ERR_NOT_FOUND, "%s: no tensor named '%s'", f->path, name);
    return levi_tensor_read_f32(t, f->path, ndim, shape, dst, err);
}

/* Validates what the caller passed; these come from levi's own code paths, but a model
 * with a bad name or shape is still better reported than asserted. */
static levi_status check_write_tensor(const char *path, const levi_tensor *t, size_t *nbytes,
                                      levi_error *err) {
    size_t name_len = strnlen(t->name, LEVI_NAME_MAX);
    if (name_len == 0 || name_len == LEVI_NAME_MAX)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "%s: tensor name must be 1..%d bytes and NUL-terminated", path,
                           LEVI_NAME_MAX - 1);
    if (strcmp(t->name, "__metadata__") == 0)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: '__metadata__' is reserved, not a tensor name",
                           path);
    if (!st_dtype_str(t->dtype))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: tensor '%s': dtype %d is not supported", path,
                           t->name, (int)t->dtype);
    if (t->ndim < 0 || t->ndim > LEVI_MAX_DIMS)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: tensor '%s': ndim %d, expected 0..%d", path,
                           t->name, t->ndim, LEVI_MAX_DIMS);
    size_t numel = 1;
    int64_t stride = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] < 0 || !levi_mul_size(numel, (size_t)t->shape[d], &numel))
            return levi_errorf(err, LEVI_ERR_ARG,
                               "%s: tensor '%s': shape[%d] = %" PRId64 " is negative or overflows",
                               path, t->name, d, t->shape[d]);
        if (t->shape[d] > 1 && t->strides[d] != stride)
            return levi_errorf(err, LEVI_ERR_ARG,
                               "%s: tensor '%s': strides[%d] = %" PRId64 ", expected %" PRId64
                               " (only contiguous tensors can be written)",
                               path, t->name, d, t->strides[d], stride);
        stride *= t->shape[d] > 0 ? t->shape[d] : 1;
    }
    if (!levi_mul_size(numel, levi_dtype_size(t->dtype), nbytes))
        return levi_errorf(err, LEVI_ERR_ARG, "%s: tensor '%s': byte size overflows", path,
                           t->name);
    if (*nbytes > 0 && !t->data)
        return levi_errorf(err, LEVI_ERR_ARG, "%s: tensor '%s': data is NULL", path, t->name);
    return LEVI_OK;
}

/* Appends an exact integer to a JSON array. Raw text keeps integers exact; cJSON would print
 * 1e+15 for large doubles, which the reference loader rejects for an integer field. */
static int add_u64(cJSON *array, uint64_t v) {
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    cJSON *item = cJSON_CreateRaw(buf);
    if (!item) return 0;
    if (!cJSON_AddItemToArray(array, item)) {
        cJSON_Delete(item);
        return 0;
    }
    return 1;
}

/* Data order: by decreasing element size (stable), so with the 8-aligned header every
 * tensor starts at a multiple of its own element size; the reference loader requires the
 * tensors to tile the data with no gaps, so this is the only alignment available. */
static int write_order_cmp(const void *a, const void *b) {
    const st_span *x = a, *y = b; /* begin holds the element size here */
    if (x->begin != y->begin) return x->begin > y->begin ? -1 : 1;
    return x->index - y->index;
}

levi_status levi_st_write(const char *path, const levi_tensor *tensors, int n,
                          const char *const *meta_keys, const char *const *meta_vals, int n_meta,
                          levi_error *err) {
    LEVI_ASSERT(path != NULL && n >= 0 && (n == 0 || tensors != NULL),
                "levi_st_write needs a path and n tensors");
    LEVI_ASSERT(n_meta >= 0 && (n_meta == 0 || (meta_keys != NULL && meta_vals != NULL)),
                "metadata needs keys and values");
    levi_status st = LEVI_OK;
    size_t *nbytes = calloc((size_t)n + 1, sizeof *nbytes);
    uint64_t *begin = calloc((size_t)n + 1, sizeof *begin);
    st_span *order = calloc((size_t)n + 1, sizeof *order);
    st_named *named = calloc((size_t)n + 1, sizeof *named);
    cJSON *root = cJSON_CreateObject();
    char *header = NULL;
    uint8_t *buf = NULL;
    if (!nbytes || !begin || !order || !named || !root) {
        st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory building the header", path);
        goto done;
    }

    for (int i = 0; i < n; i++) {
        if ((st = check_write_tensor(path, &tensors[i], &nbytes[i], err)) != LEVI_OK) goto done;
        named[i].name = tensors[i].name;
        named[i].index = i;
        order[i].begin = levi_dtype_size(tensors[i].dtype);
        order[i].index = i;
    }
    qsort(named, (size_t)n, sizeof *named, named_cmp);
    for (int k = 1; k < n; k++) {
        if (strcmp(named[k].name, named[k - 1].name) == 0) {
            st = levi_errorf(err, LEVI_ERR_ARG, "%s: tensor name '%s' is given twice", path,
                             named[k].name);
            goto done;
        }
    }
    qsort(order, (size_t)n, sizeof *order, write_order_cmp);
    size_t data_len = 0;
    for (int k = 0; k < n; k++) {
        int i = order[k].index;
        begin[i] = data_len;
        if (!levi_add_size(data_len, nbytes[i], &data_len)) {
            st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: total data size overflows", path);
            goto done;
        }
    }

    /* Every cJSON_Add* below attaches to root before anything else can fail, so deleting
     * root frees all of it on any path. */
    for (int i = 0; i < n; i++) {
        const levi_tensor *t = &tensors[i];
        cJSON *e = cJSON_AddObjectToObject(root, t->name);
        int ok = e && cJSON_AddStringToObject(e, "dtype", st_dtype_str(t->dtype));
        cJSON *shape = ok ? cJSON_AddArrayToObject(e, "shape") : NULL;
        cJSON *offs = shape ? cJSON_AddArrayToObject(e, "data_offsets") : NULL;
        ok = offs != NULL;
        for (int d = 0; ok && d < t->ndim; d++) ok = add_u64(shape, (uint64_t)t->shape[d]);
        if (ok) ok = add_u64(offs, begin[i]);
        if (ok) ok = add_u64(offs, begin[i] + nbytes[i]);
        if (!ok) {
            st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory building the header", path);
            goto done;
        }
    }
    if (n_meta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        int ok = meta != NULL;
        for (int k = 0; ok && k < n_meta; k++) {
            LEVI_ASSERT(meta_keys[k] && meta_vals[k], "metadata keys and values must be non-NULL");
            ok = cJSON_AddStringToObject(meta, meta_keys[k], meta_vals[k]) != NULL;
        }
        if (!ok) {
            st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory building the header", path);
            goto done;
        }
    }

    header = cJSON_PrintUnformatted(root);
    if (!header) {
        st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory printing the header", path);
        goto done;
    }
    size_t hlen = strlen(header);
    size_t padded = (hlen + 7) / 8 * 8; /* data then starts 8-aligned in the file */
    size_t total;
    if (!levi_add_size(8 + padded, data_len, &total) || !(buf = malloc(total))) {
        st = levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %zu data bytes", path,
                         data_len);
        goto done;
    }
    for (int b = 0; b < 8; b++) buf[b] = (uint8_t)((uint64_t)padded >> (8 * b));
    memcpy(buf + 8, header, hlen);
    memset(buf + 8 + hlen, ' ', padded - hlen);
    for (int i = 0; i < n; i++)
        if (nbytes[i]) memcpy(buf + 8 + padded + begin[i], tensors[i].data, nbytes[i]);
    st = levi_write_file_atomic(path, buf, total, err);

done:
    free(buf);
    free(header);
    cJSON_Delete(root);
    free(nbytes);
    free(begin);
    free(order);
    free(named);
    return st;
}
