/* PyTorch checkpoint reader (implements include/levi/ptfile.h).
 *
 * For: state dicts written by torch.save, in the zip format (read through libzip) and the
 * legacy stream format, loaded by a restricted unpickler that builds tensors and nothing else.
 * Not for: arbitrary pickles. Python's pickle calls whatever global the file names; this one
 * knows a fixed list of torch globals and refuses every other before building anything.
 *
 * How it works: the unpickler runs over the pickle bytes and builds a small value graph
 * (ints, strings, tuples, lists, dicts, storages, tensor views). Storages are only references
 * (key, type, element count) while unpickling, because the legacy format stores their bytes
 * after the pickle. Then storage bytes are read and checked against the counts, the top dict
 * is flattened into names, and each named view is checked against its storage and exposed
 * (in place when contiguous, copied otherwise).
 *
 * Everything is untrusted: lengths are checked before reads, counts before allocations, and
 * all values live in one list freed at the end, so cyclic or shared graphs cannot leak or
 * loop (flattening has a depth limit).
 */
#include "levi/ptfile.h"

#include "levi/safetensors.h" /* levi_tensor_read_f32, levi_f16_to_f32 */

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zip.h>

/* A state dict needs a handful of values per tensor; more than this is hostile. */
#define PT_MAX_VALUES ((size_t)1 << 22)
/* Nested dicts deeper than this are not a checkpoint (and may be a cycle). */
#define PT_MAX_DEPTH 16
/* Strings are quoted in messages up to this many bytes. */
#define PT_QUOTE 80
/* Sizes of a view whose storage is empty are bounded by this instead of by the storage. */
#define PT_MAX_EMPTY_DIM ((int64_t)1 << 32)
/* Copies of non-contiguous views may take at most this much beyond the storages' own size:
 * a state dict has few of them; thousands of views of one storage are an amplification
 * attack. */
#define PT_COPY_SLACK ((size_t)1 << 20)

/* ---- values ------------------------------------------------------------------------- */

typedef enum {
    PV_NONE,
    PV_BOOL,
    PV_INT,
    PV_BIGINT, /* LONG1/LONG4 wider than 64 bits: only compared, never computed with */
    PV_FLOAT,
    PV_STR,
    PV_BYTES,
    PV_TUPLE,
    PV_LIST,
    PV_DICT, /* items holds key, value, key, value, ... */
    PV_GLOBAL,
    PV_STORAGE,
    PV_TENSOR,
} pv_kind;

typedef enum {
    PG_ORDERED_DICT,
    PG_REBUILD_TENSOR_V2,
    PG_REBUILD_PARAMETER,
    PG_REBUILD_PARAMETER_WITH_STATE,
    PG_STORAGE_TYPE,
} pg_kind;

typedef struct pv pv;
struct pv {
    pv_kind kind;
    pv *next; /* every value is on the loader's list, freed at the end */
    union {
        int64_t i;
        double f;
        struct {
            const uint8_t *p; /* into the pickle buffer, not NUL-terminated */
            size_t n;
        } s;
        struct {
            pv **items;
            size_t n, cap;
        } seq;
        struct {
            pg_kind kind;
            levi_dtype dtype;  /* storage types: dtype as exposed */
            size_t file_esize; /* storage types: element size in the file */
            const char *name;
        } g;
        int ref; /* PV_STORAGE: index into srefs; PV_TENSOR: index into trefs */
    } u;
};

/* One storage as a persistent id names it; several refs may name the same key. */
typedef struct {
    const uint8_t *key;
    size_t key_len;
    levi_dtype dtype;
    size_t file_esize;
    int64_t numel;
    size_t where; /* byte offset of the BINPERSID, for messages */
    int canon;    /* index into the unique storages */
} pt_sref;

/* One _rebuild_tensor_v2 call: a view of a storage. */
typedef struct {
    int sref;
    int64_t offset;
    int ndim;
    int64_t size[LEVI_MAX_DIMS], stride[LEVI_MAX_DIMS];
    int64_t numel; /* <= the storage's element count */
    size_t where;
    void *data; /* exposed data once materialized (into a storage or into copy) */
    void *copy; /* owned when the view was not contiguous */
} pt_tref;

typedef struct {
    char key[64];
    levi_dtype dtype;
    size_t file_esize;
    int64_t numel;
    void *data; /* owned, numel * levi_dtype_size(dtype) bytes (after F64 -> F32) */
    int loaded;
} pt_storage;

struct levi_pt_file {
    char *path;
    levi_tensor *tensors;
    int count, cap;
    int *by_name;
    pt_storage *storages;
    int n_storages;
    pt_tref *trefs; /* kept for their copies */
    int n_trefs;
};

/* State of one open call, shared by the pickles of a file. */
typedef struct {
    const char *path;
    size_t file_size;
    pv *values;
    size_t n_values;
    pt_sref *srefs;
    int n_srefs, cap_srefs;
    pt_tref *trefs;
    int n_trefs, cap_trefs;
    size_t copy_bytes, copy_cap;
    levi_error *err;
} pt_loader;

static const char *pv_kind_name(const pv *v) {
    switch (v->kind) {
    case PV_NONE:
        return "None";
    case PV_BOOL:
        return "a bool";
    case PV_INT:
        return "an int";
    case PV_BIGINT:
        return "a big int";
    case PV_FLOAT:
        return "a float";
    case PV_STR:
        return "a string";
    case PV_BYTES:
        return "bytes";
    case PV_TUPLE:
        return "a tuple";
    case PV_LIST:
        return "a list";
    case PV_DICT:
        return "a dict";
    case PV_GLOBAL:
        return "a global";
    case PV_STORAGE:
        return "a storage";
    case PV_TENSOR:
        return "a tensor";
    }
    return "an unknown value";
}

/* Copies at most cap-1 bytes of s into buf for a message, replacing unprintable bytes. */
static const char *quote(char *buf, size_t cap, const uint8_t *s, size_t n) {
    size_t m = n < cap - 1 ? n : cap - 1;
    for (size_t i = 0; i < m; i++) buf[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? (char)s[i] : '?';
    buf[m] = '\0';
    return buf;
}

static pv *pv_new(pt_loader *L, pv_kind kind) {
    if (L->n_values >= PT_MAX_VALUES) return NULL;
    pv *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    v->kind = kind;
    v->next = L->values;
    L->values = v;
    L->n_values++;
    return v;
}

static void loader_free(pt_loader *L) {
    pv *v = L->values;
    while (v) {
        pv *next = v->next;
        if (v->kind == PV_TUPLE || v->kind == PV_LIST || v->kind == PV_DICT) free(v->u.seq.items);
        free(v);
        v = next;
    }
    L->values = NULL;
    free(L->srefs);
    /* trefs are handed to the file (or freed by the caller on failure). */
}

static int seq_push(pv *c, pv *item) {
    if (c->u.seq.n == c->u.seq.cap) {
        size_t cap = c->u.seq.cap ? c->u.seq.cap * 2 : 4;
        pv **items = realloc(c->u.seq.items, cap * sizeof *items);
        if (!items) return 0;
        c->u.seq.items = items;
        c->u.seq.cap = cap;
    }
    c->u.seq.items[c->u.seq.n++] = item;
    return 1;
}

/* ---- the unpickler ------------------------------------------------------------------ */

typedef struct {
    pt_loader *L;
    const char *what; /* "data.pkl", "the legacy header", ... for messages */
    const uint8_t *buf;
    size_t len, pos;
    size_t base; /* file offset of buf[0] in messages (0 for zip entries) */
    pv **stack;
    size_t sp, scap;
    size_t *marks;
    size_t nmarks, mcap;
    pv **memo;
    size_t memo_cap, memo_count; /* count of set entries: MEMOIZE stores at memo_count */
} pt_unpickler;

#define UERR(u, st, ...) up_error(u, st, __VA_ARGS__)

static levi_status up_error(pt_unpickler *u, levi_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static levi_status up_error(pt_unpickler *u, levi_status st, const char *fmt, ...) {
    char msg[LEVI_ERROR_MSG_MAX / 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return levi_errorf(u->L->err, st, "%s: %s, byte %zu: %s", u->L->path, u->what, u->base + u->pos,
                       msg);
}

static levi_status up_nomem(pt_unpickler *u) {
    if (u->L->n_values >= PT_MAX_VALUES)
        return UERR(u, LEVI_ERR_FORMAT,
                    "the pickle creates more than %zu objects; a state dict needs a few per "
                    "tensor",
                    PT_MAX_VALUES);
    return UERR(u, LEVI_ERR_NOMEM, "out of memory");
}

static int up_push(pt_unpickler *u, pv *v) {
    if (!v) return 0;
    if (u->sp == u->scap) {
        size_t cap = u->scap ? u->scap * 2 : 64;
        pv **s = realloc(u->stack, cap * sizeof *s);
        if (!s) return 0;
        u->stack = s;
        u->scap = cap;
    }
    u->stack[u->sp++] = v;
    return 1;
}

/* The stack floor is the last mark: opcodes may not pop below it. */
static size_t up_floor(const pt_unpickler *u) {
    return u->nmarks ? u->marks[u->nmarks - 1] : 0;
}

static levi_status up_pop(pt_unpickler *u, pv **out, const char *op) {
    if (u->sp <= up_floor(u))
        return UERR(u, LEVI_ERR_FORMAT, "%s needs a value on the stack, found none", op);
    *out = u->stack[--u->sp];
    return LEVI_OK;
}

static levi_status up_pop_mark(pt_unpickler *u, size_t *mark, const char *op) {
    if (u->nmarks == 0)
        return UERR(u, LEVI_ERR_FORMAT, "%s needs a MARK on the stack, found none", op);
    *mark = u->marks[--u->nmarks];
    return LEVI_OK;
}

static levi_status up_need(pt_unpickler *u, size_t n, const char *op) {
    if (u->len - u->pos < n)
        return UERR(u, LEVI_ERR_FORMAT, "%s needs %zu more bytes, the pickle ends after %zu", op, n,
                    u->len - u->pos);
    return LEVI_OK;
}

static uint64_t rd_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static levi_status up_memo_put(pt_unpickler *u, uint64_t idx) {
    if (u->sp <= up_floor(u)) return UERR(u, LEVI_ERR_FORMAT, "memo put with an empty stack");
    /* Writers number memo entries 0, 1, 2, ... and every put costs at least two bytes, so an
     * index beyond the pickle's length is not from a writer. */
    if (idx >= u->len)
        return UERR(u, LEVI_ERR_FORMAT, "memo index %" PRIu64 " is out of range", idx);
    if (idx >= u->memo_cap) {
        size_t cap = u->memo_cap ? u->memo_cap : 64;
        while (cap <= idx) cap *= 2;
        pv **m = realloc(u->memo, cap * sizeof *m);
        if (!m) return up_nomem(u);
        memset(m + u->memo_cap, 0, (cap - u->memo_cap) * sizeof *m);
        u->memo = m;
        u->memo_cap = cap;
    }
    if (!u->memo[idx]) u->memo_count++;
    u->memo[idx] = u->stack[u->sp - 1];
    return LEVI_OK;
}

static levi_status up_memo_get(pt_unpickler *u, uint64_t idx) {
    if (idx >= u->memo_cap || !u->memo[idx])
        return UERR(u, LEVI_ERR_FORMAT, "memo index %" PRIu64 " was never stored", idx);
    return up_push(u, u->memo[idx]) ? LEVI_OK : up_nomem(u);
}

static const struct {
    const char *name;
    levi_dtype dtype;
    size_t file_esize;
} pt_storage_types[] = {
    {"FloatStorage", LEVI_F32, 4},  {"HalfStorage", LEVI_F16, 2}, {"BFloat16Storage", LEVI_BF16, 2},
    {"DoubleStorage", LEVI_F32, 8}, {"LongStorage", LEVI_I64, 8}, {"IntStorage", LEVI_I32, 4},
    {"ByteStorage", LEVI_U8, 1},    {"BoolStorage", LEVI_U8, 1},
};
#define PT_N_STORAGE_TYPES ((int)(sizeof pt_storage_types / sizeof pt_storage_types[0]))

static int bytes_eq(const uint8_t *p, size_t n, const char *s) {
    return strlen(s) == n && memcmp(p, s, n) == 0;
}

/* Resolves module.name against the allow-list; anything else is refused by name. */
static levi_status up_global(pt_unpickler *u, const uint8_t *mod, size_t mod_n, const uint8_t *name,
                             size_t name_n) {
    pv *g = pv_new(u->L, PV_GLOBAL);
    if (!g) return up_nomem(u);
    if (bytes_eq(mod, mod_n, "collections") && bytes_eq(name, name_n, "OrderedDict")) {
        g->u.g.kind = PG_ORDERED_DICT;
        g->u.g.name = "collections.OrderedDict";
    } else if (bytes_eq(mod, mod_n, "torch._utils") &&
               bytes_eq(name, name_n, "_rebuild_tensor_v2")) {
        g->u.g.kind = PG_REBUILD_TENSOR_V2;
        g->u.g.name = "torch._utils._rebuild_tensor_v2";
    } else if (bytes_eq(mod, mod_n, "torch._utils") &&
               bytes_eq(name, name_n, "_rebuild_parameter")) {
        g->u.g.kind = PG_REBUILD_PARAMETER;
        g->u.g.name = "torch._utils._rebuild_parameter";
    } else if (bytes_eq(mod, mod_n, "torch._utils") &&
               bytes_eq(name, name_n, "_rebuild_parameter_with_state")) {
        g->u.g.kind = PG_REBUILD_PARAMETER_WITH_STATE;
        g->u.g.name = "torch._utils._rebuild_parameter_with_state";
    } else {
        int found = 0;
        if (bytes_eq(mod, mod_n, "torch")) {
            for (int i = 0; i < PT_N_STORAGE_TYPES && !found; i++) {
                if (bytes_eq(name, name_n, pt_storage_types[i].name)) {
                    g->u.g.kind = PG_STORAGE_TYPE;
                    g->u.g.dtype = pt_storage_types[i].dtype;
                    g->u.g.file_esize = pt_storage_types[i].file_esize;
                    g->u.g.name = pt_storage_types[i].name;
                    found = 1;
                }
            }
            if (!found && name_n > 7 && memcmp(name + name_n - 7, "Storage", 7) == 0) {
                char q[PT_QUOTE];
                return UERR(u, LEVI_ERR_FORMAT,
                            "storage type 'torch.%s' is not supported (expected Float, Half, "
                            "BFloat16, Double, Long, Int, Byte or Bool storages)",
                            quote(q, sizeof q, name, name_n));
            }
        }
        if (!found) {
            char qm[PT_QUOTE], qn[PT_QUOTE];
            return UERR(u, LEVI_ERR_FORMAT,
                        "refusing to load global '%s.%s': ptfile loads tensors only, it never "
                        "executes code",
                        quote(qm, sizeof qm, mod, mod_n), quote(qn, sizeof qn, name, name_n));
        }
    }
    return up_push(u, g) ? LEVI_OK : up_nomem(u);
}

/* Reads a newline-terminated line for GLOBAL. */
static levi_status up_line(pt_unpickler *u, const uint8_t **s, size_t *n) {
    const uint8_t *start = u->buf + u->pos;
    const uint8_t *nl = memchr(start, '\n', u->len - u->pos);
    if (!nl) return UERR(u, LEVI_ERR_FORMAT, "GLOBAL: a name line has no newline before the end");
    *s = start;
    *n = (size_t)(nl - start);
    u->pos += *n + 1;
    return LEVI_OK;
}

static int int_arg(const pv *v, int64_t *out) {
    if (v->kind != PV_INT && v->kind != PV_BOOL) return 0;
    *out = v->u.i;
    return 1;
}

/* BINPERSID: ('storage', <storage type>, key, location, numel[, view_metadata]). */
static levi_status up_persistent(pt_unpickler *u, pv *pid) {
    pt_loader *L = u->L;
    if (pid->kind != PV_TUPLE || pid->u.seq.n < 5 || pid->u.seq.n > 6)
        return UERR(u, LEVI_ERR_FORMAT,
                    "persistent id: expected a tuple ('storage', type, key, location, numel), "
                    "found %s of %zu items",
                    pv_kind_name(pid), pid->kind == PV_TUPLE ? pid->u.seq.n : (size_t)0);
    pv **it = pid->u.seq.items;
    if (it[0]->kind != PV_STR || !bytes_eq(it[0]->u.s.p, it[0]->u.s.n, "storage"))
        return UERR(u, LEVI_ERR_FORMAT, "persistent id: first item must be 'storage'");
    if (it[1]->kind != PV_GLOBAL || it[1]->u.g.kind != PG_STORAGE_TYPE)
        return UERR(u, LEVI_ERR_FORMAT,
                    "persistent id: second item must be a torch storage type, found %s",
                    pv_kind_name(it[1]));
    if (it[2]->kind != PV_STR || it[2]->u.s.n == 0 ||
        it[2]->u.s.n >= sizeof(((pt_storage *)0)->key))
        return UERR(u, LEVI_ERR_FORMAT,
                    "persistent id: storage key must be a string of 1..%zu bytes",
                    sizeof(((pt_storage *)0)->key) - 1);
    for (size_t i = 0; i < it[2]->u.s.n; i++) {
        uint8_t c = it[2]->u.s.p[i];
        if (c == '/' || c == '\\' || c < 0x20 || c >= 0x7f)
            return UERR(u, LEVI_ERR_FORMAT,
                        "persistent id: storage key has a byte 0x%02x that a key cannot hold", c);
    }
    int64_t numel;
    if (!int_arg(it[4], &numel) || numel < 0)
        return UERR(u, LEVI_ERR_FORMAT,
                    "persistent id: element count must be a non-negative int, found %s",
                    pv_kind_name(it[4]));
    size_t esize = it[1]->u.g.file_esize;
    if ((uint64_t)numel > L->file_size / esize) {
        char q[PT_QUOTE];
        return UERR(u, LEVI_ERR_FORMAT,
                    "storage '%s' claims %" PRId64 " elements of %zu bytes, more than the file's "
                    "%zu bytes",
                    quote(q, sizeof q, it[2]->u.s.p, it[2]->u.s.n), numel, esize, L->file_size);
    }
    if (pid->u.seq.n == 6 && it[5]->kind != PV_NONE)
        return UERR(u, LEVI_ERR_FORMAT,
                    "persistent id: storage views (view_metadata) of torch < 0.4 are not "
                    "supported");
    if (L->n_srefs == L->cap_srefs) {
        int cap = L->cap_srefs ? L->cap_srefs * 2 : 64;
        pt_sref *s = realloc(L->srefs, (size_t)cap * sizeof *s);
        if (!s) return up_nomem(u);
        L->srefs = s;
        L->cap_srefs = cap;
    }
    pt_sref *r = &L->srefs[L->n_srefs];
    r->key = it[2]->u.s.p;
    r->key_len = it[2]->u.s.n;
    r->dtype = it[1]->u.g.dtype;
    r->file_esize = esize;
    r->numel = numel;
    r->where = u->base + u->pos - 1;
    r->canon = -1;
    pv *v = pv_new(L, PV_STORAGE);
    if (!v) return up_nomem(u);
    v->u.ref = L->n_srefs++;
    return up_push(u, v) ? LEVI_OK : up_nomem(u);
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks
 * [, metadata]): checks the view against the storage's element count right away. */
static levi_status up_rebuild_tensor(pt_unpickler *u, pv *args) {
    pt_loader *L = u->L;
    if (args->u.seq.n < 6 || args->u.seq.n > 7)
        return UERR(u, LEVI_ERR_FORMAT, "_rebuild_tensor_v2 takes 6 or 7 arguments, found %zu",
                    args->u.seq.n);
    pv **a = args->u.seq.items;
    if (a[0]->kind != PV_STORAGE)
        return UERR(u, LEVI_ERR_FORMAT,
                    "_rebuild_tensor_v2: argument 1 must be a storage, found %s",
                    pv_kind_name(a[0]));
    int64_t offset;
    if (!int_arg(a[1], &offset) || offset < 0)
        return UERR(u, LEVI_ERR_FORMAT,
                    "_rebuild_tensor_v2: storage offset must be a non-negative int, found %s",
                    pv_kind_name(a[1]));
    if (a[2]->kind != PV_TUPLE || a[3]->kind != PV_TUPLE || a[2]->u.seq.n != a[3]->u.seq.n)
        return UERR(u, LEVI_ERR_FORMAT,
                    "_rebuild_tensor_v2: size and stride must be tuples of equal length");
    size_t ndim = a[2]->u.seq.n;
    if (ndim > LEVI_MAX_DIMS)
        return UERR(u, LEVI_ERR_FORMAT, "tensor has %zu dimensions, expected at most %d", ndim,
                    LEVI_MAX_DIMS);
    const pt_sref *s = &L->srefs[a[0]->u.ref];
    int64_t snumel = s->numel;
    int64_t size[LEVI_MAX_DIMS], stride[LEVI_MAX_DIMS];
    int64_t numel = 1;
    for (size_t d = 0; d < ndim; d++) {
        if (!int_arg(a[2]->u.seq.items[d], &size[d]) || size[d] < 0 ||
            !int_arg(a[3]->u.seq.items[d], &stride[d]) || stride[d] < 0)
            return UERR(u, LEVI_ERR_FORMAT,
                        "_rebuild_tensor_v2: size[%zu] and stride[%zu] must be non-negative ints",
                        d, d);
        if (size[d] > (snumel > PT_MAX_EMPTY_DIM ? snumel : PT_MAX_EMPTY_DIM))
            return UERR(u, LEVI_ERR_FORMAT,
                        "_rebuild_tensor_v2: size[%zu] = %" PRId64 " exceeds its storage's %" PRId64
                        " elements",
                        d, size[d], snumel);
        if (size[d] == 0) numel = 0;
    }
    for (size_t d = 0; d < ndim && numel > 0; d++) {
        if (numel > snumel / size[d])
            return UERR(u, LEVI_ERR_FORMAT,
                        "_rebuild_tensor_v2: the view has more elements than its storage's %" PRId64
                        " (expanded or overlapping views are not supported)",
                        snumel);
        numel *= size[d];
    }
    if (numel > snumel)
        return UERR(u, LEVI_ERR_FORMAT,
                    "_rebuild_tensor_v2: a scalar view needs one element, its storage has none");
    if (numel > 0) {
        /* Last element reached: offset + sum (size-1)*stride must lie inside the storage. */
        int64_t last = offset, room = snumel - 1;
        int inside = offset <= room;
        for (size_t d = 0; d < ndim && inside; d++) {
            if (size[d] <= 1 || stride[d] == 0) continue;
            if (stride[d] > room || size[d] - 1 > (room - last) / stride[d])
                inside = 0;
            else
                last += (size[d] - 1) * stride[d];
        }
        if (!inside)
            return UERR(u, LEVI_ERR_FORMAT,
                        "_rebuild_tensor_v2: view (offset %" PRId64 ") reaches beyond its "
                        "storage's %" PRId64 " elements",
                        offset, snumel);
    }
    if (L->n_trefs == L->cap_trefs) {
        int cap = L->cap_trefs ? L->cap_trefs * 2 : 64;
        pt_tref *t = realloc(L->trefs, (size_t)cap * sizeof *t);
        if (!t) return up_nomem(u);
        L->trefs = t;
        L->cap_trefs = cap;
    }
    pt_tref *t = &L->trefs[L->n_trefs];
    memset(t, 0, sizeof *t);
    t->sref = a[0]->u.ref;
    t->offset = offset;
    t->ndim = (int)ndim;
    t->numel = numel;
    for (size_t d = 0; d < ndim; d++) t->size[d] = size[d], t->stride[d] = stride[d];
    t->where = u->base + u->pos - 1;
    pv *v = pv_new(L, PV_TENSOR);
    if (!v) return up_nomem(u);
    v->u.ref = L->n_trefs++;
    return up_push(u, v) ? LEVI_OK : up_nomem(u);
}

static levi_status up_reduce(pt_unpickler *u) {
    pv *args = NULL, *fn = NULL;
    levi_status st;
    if ((st = up_pop(u, &args, "REDUCE")) || (st = up_pop(u, &fn, "REDUCE"))) return st;
    if (fn->kind != PV_GLOBAL)
        return UERR(u, LEVI_ERR_FORMAT, "REDUCE: expected a global to call, found %s",
                    pv_kind_name(fn));
    if (args->kind != PV_TUPLE)
        return UERR(u, LEVI_ERR_FORMAT, "REDUCE: arguments of %s must be a tuple, found %s",
                    fn->u.g.name, pv_kind_name(args));
    switch (fn->u.g.kind) {
    case PG_ORDERED_DICT: {
        if (args->u.seq.n != 0)
            return UERR(u, LEVI_ERR_FORMAT,
                        "collections.OrderedDict takes no arguments here, found %zu",
                        args->u.seq.n);
        return up_push(u, pv_new(u->L, PV_DICT)) ? LEVI_OK : up_nomem(u);
    }
    case PG_REBUILD_TENSOR_V2:
        return up_rebuild_tensor(u, args);
    case PG_REBUILD_PARAMETER:
    case PG_REBUILD_PARAMETER_WITH_STATE: {
        size_t want = fn->u.g.kind == PG_REBUILD_PARAMETER ? 3 : 4;
        if (args->u.seq.n != want || args->u.seq.items[0]->kind != PV_TENSOR)
            return UERR(u, LEVI_ERR_FORMAT, "%s takes (tensor, ...) with %zu arguments",
                        fn->u.g.name, want);
        return up_push(u, args->u.seq.items[0]) ? LEVI_OK : up_nomem(u);
    }
    case PG_STORAGE_TYPE:
        break;
    }
    return UERR(u, LEVI_ERR_FORMAT, "REDUCE: torch.%s cannot be called", fn->u.g.name);
}

/* Builds a tuple or list from the items above the last mark. */
static levi_status up_collect(pt_unpickler *u, pv_kind kind, const char *op) {
    size_t mark = 0;
    levi_status st = up_pop_mark(u, &mark, op);
    if (st) return st;
    pv *c = pv_new(u->L, kind);
    if (!c) return up_nomem(u);
    size_t n = u->sp - mark;
    if (n) {
        c->u.seq.items = malloc(n * sizeof *c->u.seq.items);
        if (!c->u.seq.items) return up_nomem(u);
        memcpy(c->u.seq.items, u->stack + mark, n * sizeof *c->u.seq.items);
        c->u.seq.n = c->u.seq.cap = n;
    }
    u->sp = mark;
    return up_push(u, c) ? LEVI_OK : up_nomem(u);
}

static levi_status up_small_tuple(pt_unpickler *u, size_t n, const char *op) {
    if (u->sp - up_floor(u) < n)
        return UERR(u, LEVI_ERR_FORMAT, "%s needs %zu values on the stack, found %zu", op, n,
                    u->sp - up_floor(u));
    pv *c = pv_new(u->L, PV_TUPLE);
    if (!c) return up_nomem(u);
    if (n) {
        c->u.seq.items = malloc(n * sizeof *c->u.seq.items);
        if (!c->u.seq.items) return up_nomem(u);
        memcpy(c->u.seq.items, u->stack + u->sp - n, n * sizeof *c->u.seq.items);
        c->u.seq.n = c->u.seq.cap = n;
    }
    u->sp -= n;
    return up_push(u, c) ? LEVI_OK : up_nomem(u);
}

/* APPENDS / SETITEMS / DICT: moves the items above the mark into the container below it. */
static levi_status up_fill(pt_unpickler *u, pv_kind kind, const char *op, int new_container) {
    size_t mark = 0;
    levi_status st = up_pop_mark(u, &mark, op);
    if (st) return st;
    size_t n = u->sp - mark;
    if (kind == PV_DICT && n % 2)
        return UERR(u, LEVI_ERR_FORMAT, "%s needs key/value pairs, found %zu items", op, n);
    pv *c;
    if (new_container) {
        c = pv_new(u->L, kind);
        if (!c) return up_nomem(u);
    } else {
        if (mark <= up_floor(u) || mark == 0)
            return UERR(u, LEVI_ERR_FORMAT, "%s has no container below its mark", op);
        c = u->stack[mark - 1];
        if (c->kind != kind)
            return UERR(u, LEVI_ERR_FORMAT, "%s expects %s below its mark, found %s", op,
                        kind == PV_DICT ? "a dict" : "a list", pv_kind_name(c));
    }
    for (size_t i = 0; i < n; i++)
        if (!seq_push(c, u->stack[mark + i])) return up_nomem(u);
    u->sp = mark;
    if (new_container && !up_push(u, c)) return up_nomem(u);
    return LEVI_OK;
}

static levi_status up_string(pt_unpickler *u, pv_kind kind, size_t len_bytes, const char *op) {
    levi_status st = up_need(u, len_bytes, op);
    if (st) return st;
    uint64_t n = rd_le(u->buf + u->pos, (int)len_bytes);
    u->pos += len_bytes;
    if (n > u->len - u->pos)
        return UERR(u, LEVI_ERR_FORMAT, "%s: length %" PRIu64 " runs past the end (%zu bytes left)",
                    op, n, u->len - u->pos);
    pv *v = pv_new(u->L, kind);
    if (!v) return up_nomem(u);
    v->u.s.p = u->buf + u->pos;
    v->u.s.n = (size_t)n;
    u->pos += (size_t)n;
    return up_push(u, v) ? LEVI_OK : up_nomem(u);
}

static levi_status up_int(pt_unpickler *u, int64_t i, pv_kind kind) {
    pv *v = pv_new(u->L, kind);
    if (!v) return up_nomem(u);
    v->u.i = i;
    return up_push(u, v) ? LEVI_OK : up_nomem(u);
}

/* LONG1 / LONG4: little-endian two's complement of n bytes. */
static levi_status up_long(pt_unpickler *u, size_t len_bytes, const char *op) {
    levi_status st = up_need(u, len_bytes, op);
    if (st) return st;
    uint64_t n = rd_le(u->buf + u->pos, (int)len_bytes);
    u->pos += len_bytes;
    if (n > u->len - u->pos)
        return UERR(u, LEVI_ERR_FORMAT, "%s: length %" PRIu64 " runs past the end", op, n);
    const uint8_t *p = u->buf + u->pos;
    u->pos += (size_t)n;
    if (n > 8) {
        pv *v = pv_new(u->L, PV_BIGINT);
        if (!v) return up_nomem(u);
        v->u.s.p = p;
        v->u.s.n = (size_t)n;
        return up_push(u, v) ? LEVI_OK : up_nomem(u);
    }
    uint64_t x = n ? rd_le(p, (int)n) : 0;
    if (n > 0 && n < 8 && (p[n - 1] & 0x80)) x |= ~(uint64_t)0 << (8 * n); /* sign-extend */
    int64_t i;
    memcpy(&i, &x, sizeof i);
    return up_int(u, i, PV_INT);
}

/* Runs one pickle from buf[0] to its STOP; *out is the result, *used the bytes consumed. */
static levi_status unpickle(pt_loader *L, const char *what, const uint8_t *buf, size_t len,
                            size_t base, pv **out, size_t *used) {
    pt_unpickler U = {.L = L, .what = what, .buf = buf, .len = len, .base = base};
    pt_unpickler *u = &U;
    levi_status st = LEVI_OK;
    *out = NULL;
    for (;;) {
        if (u->pos >= u->len) {
            st = UERR(u, LEVI_ERR_FORMAT, "the pickle ends without a STOP opcode");
            break;
        }
        uint8_t op = u->buf[u->pos++];
        pv *a = NULL, *b = NULL;
        size_t mark = 0;
        switch (op) {
        case 0x80: /* PROTO */
            if (!(st = up_need(u, 1, "PROTO"))) {
                if (u->buf[u->pos] > 5)
                    st = UERR(u, LEVI_ERR_FORMAT, "pickle protocol %d, expected 2..5",
                              u->buf[u->pos]);
                u->pos++;
            }
            break;
        case 0x95: /* FRAME: only groups opcodes; the length needs no trust */
            if (!(st = up_need(u, 8, "FRAME"))) u->pos += 8;
            break;
        case '.': /* STOP */
            if (u->sp == 0) {
                st = UERR(u, LEVI_ERR_FORMAT, "STOP with an empty stack");
                break;
            }
            *out = u->stack[u->sp - 1];
            *used = u->pos;
            goto done;
        case '(': /* MARK */
            if (u->nmarks == u->mcap) {
                size_t cap = u->mcap ? u->mcap * 2 : 32;
                size_t *m = realloc(u->marks, cap * sizeof *m);
                if (!m) {
                    st = up_nomem(u);
                    break;
                }
                u->marks = m;
                u->mcap = cap;
            }
            u->marks[u->nmarks++] = u->sp;
            break;
        case '0':
            st = up_pop(u, &a, "POP");
            break;
        case '1':
            if (!(st = up_pop_mark(u, &mark, "POP_MARK"))) u->sp = mark;
            break;
        case '2': /* DUP */
            if (!(st = up_pop(u, &a, "DUP"))) {
                u->sp++;
                if (!up_push(u, a)) st = up_nomem(u);
            }
            break;
        case 'N':
            st = up_push(u, pv_new(L, PV_NONE)) ? LEVI_OK : up_nomem(u);
            break;
        case 0x88:
            st = up_int(u, 1, PV_BOOL);
            break;
        case 0x89:
            st = up_int(u, 0, PV_BOOL);
            break;
        case 'J':
            if (!(st = up_need(u, 4, "BININT"))) {
                int32_t i;
                uint32_t x = (uint32_t)rd_le(u->buf + u->pos, 4);
                memcpy(&i, &x, 4);
                u->pos += 4;
                st = up_int(u, i, PV_INT);
            }
            break;
        case 'K':
            if (!(st = up_need(u, 1, "BININT1"))) st = up_int(u, u->buf[u->pos++], PV_INT);
            break;
        case 'M':
            if (!(st = up_need(u, 2, "BININT2"))) {
                int64_t i = (int64_t)rd_le(u->buf + u->pos, 2);
                u->pos += 2;
                st = up_int(u, i, PV_INT);
            }
            break;
        case 0x8a:
            st = up_long(u, 1, "LONG1");
            break;
        case 0x8b:
            st = up_long(u, 4, "LONG4");
            break;
        case 'G': /* BINFLOAT, big-endian */
            if (!(st = up_need(u, 8, "BINFLOAT"))) {
                uint64_t x = 0;
                for (int i = 0; i < 8; i++) x = (x << 8) | u->buf[u->pos + i];
                u->pos += 8;
                pv *v = pv_new(L, PV_FLOAT);
                if (v) memcpy(&v->u.f, &x, 8);
                st = up_push(u, v) ? LEVI_OK : up_nomem(u);
            }
            break;
        case 'X':
            st = up_string(u, PV_STR, 4, "BINUNICODE");
            break;
        case 0x8c:
            st = up_string(u, PV_STR, 1, "SHORT_BINUNICODE");
            break;
        case 0x8d:
            st = up_string(u, PV_STR, 8, "BINUNICODE8");
            break;
        case 'T':
            st = up_string(u, PV_STR, 4, "BINSTRING");
            break;
        case 'U':
            st = up_string(u, PV_STR, 1, "SHORT_BINSTRING");
            break;
        case 'B':
            st = up_string(u, PV_BYTES, 4, "BINBYTES");
            break;
        case 'C':
            st = up_string(u, PV_BYTES, 1, "SHORT_BINBYTES");
            break;
        case 0x8e:
            st = up_string(u, PV_BYTES, 8, "BINBYTES8");
            break;
        case ')':
            st = up_push(u, pv_new(L, PV_TUPLE)) ? LEVI_OK : up_nomem(u);
            break;
        case ']':
            st = up_push(u, pv_new(L, PV_LIST)) ? LEVI_OK : up_nomem(u);
            break;
        case '}':
            st = up_push(u, pv_new(L, PV_DICT)) ? LEVI_OK : up_nomem(u);
            break;
        case 't':
            st = up_collect(u, PV_TUPLE, "TUPLE");
            break;
        case 'l':
            st = up_collect(u, PV_LIST, "LIST");
            break;
        case 0x85:
            st = up_small_tuple(u, 1, "TUPLE1");
            break;
        case 0x86:
            st = up_small_tuple(u, 2, "TUPLE2");
            break;
        case 0x87:
            st = up_small_tuple(u, 3, "TUPLE3");
            break;
        case 'd':
            st = up_fill(u, PV_DICT, "DICT", 1);
            break;
        case 'e':
            st = up_fill(u, PV_LIST, "APPENDS", 0);
            break;
        case 'u':
            st = up_fill(u, PV_DICT, "SETITEMS", 0);
            break;
        case 'a': /* APPEND */
            if ((st = up_pop(u, &a, "APPEND"))) break;
            if (u->sp <= up_floor(u) || u->stack[u->sp - 1]->kind != PV_LIST) {
                st = UERR(u, LEVI_ERR_FORMAT, "APPEND expects a list below the value");
                break;
            }
            if (!seq_push(u->stack[u->sp - 1], a)) st = up_nomem(u);
            break;
        case 's': /* SETITEM */
            if ((st = up_pop(u, &b, "SETITEM")) || (st = up_pop(u, &a, "SETITEM"))) break;
            if (u->sp <= up_floor(u) || u->stack[u->sp - 1]->kind != PV_DICT) {
                st = UERR(u, LEVI_ERR_FORMAT, "SETITEM expects a dict below the key and value");
                break;
            }
            if (!seq_push(u->stack[u->sp - 1], a) || !seq_push(u->stack[u->sp - 1], b))
                st = up_nomem(u);
            break;
        case 'q':
            if (!(st = up_need(u, 1, "BINPUT"))) st = up_memo_put(u, u->buf[u->pos++]);
            break;
        case 'r':
            if (!(st = up_need(u, 4, "LONG_BINPUT"))) {
                uint64_t i = rd_le(u->buf + u->pos, 4);
                u->pos += 4;
                st = up_memo_put(u, i);
            }
            break;
        case 0x94:
            st = up_memo_put(u, u->memo_count);
            break; /* MEMOIZE */
        case 'h':
            if (!(st = up_need(u, 1, "BINGET"))) st = up_memo_get(u, u->buf[u->pos++]);
            break;
        case 'j':
            if (!(st = up_need(u, 4, "LONG_BINGET"))) {
                uint64_t i = rd_le(u->buf + u->pos, 4);
                u->pos += 4;
                st = up_memo_get(u, i);
            }
            break;
        case 'c': { /* GLOBAL module\nname\n */
            const uint8_t *m, *n;
            size_t mn, nn;
            if (!(st = up_line(u, &m, &mn)) && !(st = up_line(u, &n, &nn)))
                st = up_global(u, m, mn, n, nn);
            break;
        }
        case 0x93: /* STACK_GLOBAL */
            if ((st = up_pop(u, &b, "STACK_GLOBAL")) || (st = up_pop(u, &a, "STACK_GLOBAL"))) break;
            if (a->kind != PV_STR || b->kind != PV_STR) {
                st = UERR(u, LEVI_ERR_FORMAT, "STACK_GLOBAL needs two strings");
                break;
            }
            st = up_global(u, a->u.s.p, a->u.s.n, b->u.s.p, b->u.s.n);
            break;
        case 'R':
            st = up_reduce(u);
            break;
        case 'Q': /* BINPERSID */
            if (!(st = up_pop(u, &a, "BINPERSID"))) st = up_persistent(u, a);
            break;
        case 'b': /* BUILD: OrderedDict state (_metadata) only; it carries no tensors */
            if ((st = up_pop(u, &a, "BUILD"))) break;
            if (u->sp <= up_floor(u) || u->stack[u->sp - 1]->kind != PV_DICT)
                st = UERR(u, LEVI_ERR_FORMAT, "BUILD is only accepted on a dict, found %s",
                          u->sp > up_floor(u) ? pv_kind_name(u->stack[u->sp - 1]) : "nothing");
            break;
        default:
            u->pos--;
            st = UERR(u, LEVI_ERR_FORMAT,
                      "unsupported pickle opcode 0x%02x; state dicts use protocol 2 opcodes only",
                      op);
            break;
        }
        if (st) break;
    }
done:
    free(U.stack);
    free(U.marks);
    free(U.memo);
    return st;
}

/* ---- storages ----------------------------------------------------------------------- */

typedef struct {
    const uint8_t *key;
    size_t n;
    int index;
} pt_keyref;

static int key_cmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn) {
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c) return c;
    return an < bn ? -1 : an > bn ? 1 : 0;
}

static int keyref_cmp(const void *x, const void *y) {
    const pt_keyref *a = x, *b = y;
    int c = key_cmp(a->key, a->n, b->key, b->n);
    return c ? c : a->index - b->index;
}

/* Merges the persistent ids that name the same key into one storage each, sorted by key. */
static levi_status unique_storages(levi_pt_file *f, pt_loader *L) {
    if (L->n_srefs == 0) return LEVI_OK;
    pt_keyref *kr = malloc((size_t)L->n_srefs * sizeof *kr);
    f->storages = calloc((size_t)L->n_srefs, sizeof *f->storages);
    if (!kr || !f->storages) {
        free(kr);
        return levi_errorf(L->err, LEVI_ERR_NOMEM, "%s: out of memory for %d storages", L->path,
                           L->n_srefs);
    }
    for (int i = 0; i < L->n_srefs; i++)
        kr[i] = (pt_keyref){L->srefs[i].key, L->srefs[i].key_len, i};
    qsort(kr, (size_t)L->n_srefs, sizeof *kr, keyref_cmp);
    levi_status st = LEVI_OK;
    for (int i = 0; i < L->n_srefs && !st; i++) {
        pt_sref *r = &L->srefs[kr[i].index];
        if (i > 0 && key_cmp(kr[i - 1].key, kr[i - 1].n, r->key, r->key_len) == 0) {
            pt_storage *s = &f->storages[f->n_storages - 1];
            if (s->dtype != r->dtype || s->file_esize != r->file_esize || s->numel != r->numel)
                st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                                 "%s: pickle byte %zu: storage '%s' appears again with another "
                                 "type or element count (%" PRId64 " vs %" PRId64 ")",
                                 L->path, r->where, s->key, r->numel, s->numel);
        } else {
            pt_storage *s = &f->storages[f->n_storages++];
            memcpy(s->key, r->key, r->key_len); /* key_len < sizeof key, checked at BINPERSID */
            s->key[r->key_len] = '\0';
            s->dtype = r->dtype;
            s->file_esize = r->file_esize;
            s->numel = r->numel;
        }
        r->canon = f->n_storages - 1;
    }
    free(kr);
    return st;
}

static pt_storage *find_storage(levi_pt_file *f, const uint8_t *key, size_t n) {
    int lo = 0, hi = f->n_storages - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        pt_storage *s = &f->storages[mid];
        int c = key_cmp(key, n, (const uint8_t *)s->key, strlen(s->key));
        if (c == 0) return s;
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* Takes the raw little-endian bytes of a storage (numel * file_esize of them, checked by the
 * caller), into a buffer of its own so that every element is aligned; Double becomes F32. */
static levi_status store_bytes(pt_storage *s, const uint8_t *src, pt_loader *L) {
    size_t esize = levi_dtype_size(s->dtype);
    size_t bytes = (size_t)s->numel * esize; /* numel <= file_size / file_esize */
    s->data = malloc(bytes ? bytes : 1);
    if (!s->data)
        return levi_errorf(L->err, LEVI_ERR_NOMEM, "%s: out of memory for storage '%s' (%zu bytes)",
                           L->path, s->key, bytes);
    if (s->file_esize == 8 && s->dtype == LEVI_F32) {
        float *dst = s->data;
        for (int64_t i = 0; i < s->numel; i++) {
            double d;
            memcpy(&d, src + 8 * i, 8);
            dst[i] = (float)d;
        }
    } else if (bytes) {
        memcpy(s->data, src, bytes);
    }
    s->loaded = 1;
    if (!levi_add_size(L->copy_cap, bytes, &L->copy_cap))
        return levi_errorf(L->err, LEVI_ERR_NOMEM, "%s: storages overflow size_t", L->path);
    return LEVI_OK;
}

/* ---- tensors ------------------------------------------------------------------------ */

/* Points the view at its storage when contiguous, else copies it contiguous. */
static levi_status materialize(levi_pt_file *f, pt_loader *L, pt_tref *t) {
    if (t->data) return LEVI_OK;
    pt_storage *s = &f->storages[L->srefs[t->sref].canon];
    size_t esize = levi_dtype_size(s->dtype);
    int64_t numel = t->numel, expect = 1;
    uint8_t *base = s->data;
    if (numel == 0) {
        t->data = base; /* never read; a valid pointer keeps memcpy(dst, data, 0) defined */
        return LEVI_OK;
    }
    int contiguous = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->size[d] != 1 && t->stride[d] != expect) contiguous = 0;
        expect *= t->size[d]; /* partial products of numel: no overflow */
    }
    if (contiguous) {
        t->data = base + (size_t)t->offset * esize;
        return LEVI_OK;
    }
    size_t bytes = (size_t)numel * esize;
    if (L->copy_bytes + bytes > L->copy_cap + PT_COPY_SLACK)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: pickle byte %zu: copying non-contiguous views would take more than "
                           "%zu bytes, more than the storages themselves",
                           L->path, t->where, L->copy_cap + PT_COPY_SLACK);
    L->copy_bytes += bytes;
    uint8_t *dst = malloc(bytes);
    if (!dst)
        return levi_errorf(L->err, LEVI_ERR_NOMEM, "%s: out of memory copying a view (%zu bytes)",
                           L->path, bytes);
    int64_t idx[LEVI_MAX_DIMS] = {0};
    for (int64_t i = 0; i < numel; i++) {
        int64_t src = t->offset;
        for (int d = 0; d < t->ndim; d++) src += idx[d] * t->stride[d];
        memcpy(dst + (size_t)i * esize, base + (size_t)src * esize, esize);
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++idx[d] < t->size[d]) break;
            idx[d] = 0;
        }
    }
    t->copy = dst;
    t->data = dst;
    return LEVI_OK;
}

static levi_status add_tensor(levi_pt_file *f, pt_loader *L, const char *name, pt_tref *t) {
    levi_status st = materialize(f, L, t);
    if (st) return st;
    if (f->count == f->cap) {
        int cap = f->cap ? f->cap * 2 : 64;
        levi_tensor *n = realloc(f->tensors, (size_t)cap * sizeof *n);
        if (!n) return levi_errorf(L->err, LEVI_ERR_NOMEM, "%s: out of memory", L->path);
        f->tensors = n;
        f->cap = cap;
    }
    levi_tensor *d = &f->tensors[f->count++];
    memset(d, 0, sizeof *d);
    snprintf(d->name, sizeof d->name, "%s", name);
    d->dtype = f->storages[L->srefs[t->sref].canon].dtype;
    levi_tensor_set_shape(d, t->ndim, t->size);
    d->data = t->data;
    return LEVI_OK;
}

/* Walks a dict in order; tensors become entries named prefix + key, dicts are descended into
 * with prefix + key + '.', anything else is skipped. */
static levi_status flatten(levi_pt_file *f, pt_loader *L, const pv *d, char *name, size_t len,
                           int depth) {
    if (depth > PT_MAX_DEPTH)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: dicts nest deeper than %d levels at '%s' (a cycle?)", L->path,
                           PT_MAX_DEPTH, name);
    for (size_t i = 0; i + 1 < d->u.seq.n; i += 2) {
        const pv *k = d->u.seq.items[i], *v = d->u.seq.items[i + 1];
        if (v->kind != PV_TENSOR && v->kind != PV_DICT) continue;
        char key[32];
        const char *kp;
        size_t kn;
        if (k->kind == PV_STR) {
            kp = (const char *)k->u.s.p;
            kn = k->u.s.n;
            if (memchr(kp, '\0', kn))
                return levi_errorf(L->err, LEVI_ERR_FORMAT,
                                   "%s: a key under '%s' contains a NUL byte", L->path, name);
        } else if (k->kind == PV_INT) {
            kn = (size_t)snprintf(key, sizeof key, "%" PRId64, k->u.i);
            kp = key;
        } else {
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: a key under '%s' is %s, expected a string or an int", L->path,
                               name, pv_kind_name(k));
        }
        size_t need = len + kn + (v->kind == PV_DICT ? 1 : 0);
        if (need >= LEVI_NAME_MAX) {
            char q[PT_QUOTE];
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: tensor name '%s%s...' is longer than %d bytes", L->path, name,
                               quote(q, sizeof q, (const uint8_t *)kp, kn), LEVI_NAME_MAX - 1);
        }
        memcpy(name + len, kp, kn);
        name[len + kn] = '\0';
        levi_status st;
        if (v->kind == PV_TENSOR) {
            if (len + kn == 0)
                return levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: a tensor has an empty name",
                                   L->path);
            st = add_tensor(f, L, name, &L->trefs[v->u.ref]);
        } else {
            name[len + kn] = '.';
            name[len + kn + 1] = '\0';
            st = flatten(f, L, v, name, len + kn + 1, depth + 1);
        }
        name[len] = '\0';
        if (st) return st;
    }
    return LEVI_OK;
}

typedef struct {
    const char *name;
    int index;
} pt_named;

static int named_cmp(const void *a, const void *b) {
    const pt_named *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : x->index - y->index;
}

static levi_status index_names(levi_pt_file *f, pt_loader *L) {
    if (f->count == 0) return LEVI_OK;
    pt_named *nm = malloc((size_t)f->count * sizeof *nm);
    f->by_name = malloc((size_t)f->count * sizeof *f->by_name);
    if (!nm || !f->by_name) {
        free(nm);
        return levi_errorf(L->err, LEVI_ERR_NOMEM, "%s: out of memory", L->path);
    }
    for (int i = 0; i < f->count; i++) nm[i] = (pt_named){f->tensors[i].name, i};
    qsort(nm, (size_t)f->count, sizeof *nm, named_cmp);
    for (int i = 0; i < f->count; i++) {
        if (i > 0 && strcmp(nm[i - 1].name, nm[i].name) == 0) {
            levi_status st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                                         "%s: two tensors are named '%s' after flattening nested "
                                         "dicts",
                                         L->path, nm[i].name);
            free(nm);
            return st;
        }
        f->by_name[i] = nm[i].index;
    }
    free(nm);
    return LEVI_OK;
}

/* The pickled object must be a dict; everything reachable becomes named tensors. */
static levi_status check_root(pt_loader *L, const pv *root) {
    if (root->kind != PV_DICT)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: the pickled object is %s, expected a dict of tensors (a state "
                           "dict)",
                           L->path, pv_kind_name(root));
    return LEVI_OK;
}

static levi_status finish(levi_pt_file *f, pt_loader *L, const pv *root) {
    for (int i = 0; i < f->n_storages; i++)
        if (!f->storages[i].loaded)
            return levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: storage '%s' has no data", L->path,
                               f->storages[i].key);
    char name[LEVI_NAME_MAX + 2] = "";
    levi_status st = flatten(f, L, root, name, 0, 0);
    return st ? st : index_names(f, L);
}

/* ---- zip format --------------------------------------------------------------------- */

static levi_status zip_read(zip_t *z, pt_loader *L, const char *entry, uint8_t **out, size_t *len) {
    *out = NULL;
    zip_int64_t idx = zip_name_locate(z, entry, 0);
    if (idx < 0)
        return levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: zip archive has no entry '%s'", L->path,
                           entry);
    zip_stat_t zs;
    zip_stat_init(&zs);
    if (zip_stat_index(z, (zip_uint64_t)idx, 0, &zs) != 0 || !(zs.valid & ZIP_STAT_SIZE) ||
        !(zs.valid & ZIP_STAT_COMP_METHOD))
        return levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: zip entry '%s': cannot read its size",
                           L->path, entry);
    if (zs.comp_method != ZIP_CM_STORE)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: zip entry '%s' is compressed (method %u); torch.save stores "
                           "entries uncompressed",
                           L->path, entry, (unsigned)zs.comp_method);
    if ((zs.valid & ZIP_STAT_ENCRYPTION_METHOD) && zs.encryption_method != ZIP_EM_NONE)
        return levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: zip entry '%s' is encrypted", L->path,
                           entry);
    if (zs.size > L->file_size)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: zip entry '%s' claims %" PRIu64 " bytes, more than the file's %zu",
                           L->path, entry, (uint64_t)zs.size, L->file_size);
    size_t n = (size_t)zs.size;
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        return levi_errorf(L->err, LEVI_ERR_NOMEM, "%s: out of memory for zip entry '%s'", L->path,
                           entry);
    zip_file_t *zf = zip_fopen_index(z, (zip_uint64_t)idx, 0);
    if (!zf) {
        free(buf);
        return levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: zip entry '%s': %s", L->path, entry,
                           zip_strerror(z));
    }
    size_t got = 0;
    int bad = 0;
    while (got < n) {
        zip_int64_t r = zip_fread(zf, buf + got, n - got);
        if (r <= 0) {
            bad = 1;
            break;
        }
        got += (size_t)r;
    }
    /* One more read reaches the end of the entry, where libzip checks its CRC. */
    uint8_t extra;
    if (!bad && zip_fread(zf, &extra, 1) != 0) bad = 1;
    levi_status st = LEVI_OK;
    if (bad)
        st = levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: zip entry '%s': read %zu of %zu bytes: %s",
                         L->path, entry, got, n, zip_file_strerror(zf));
    zip_fclose(zf);
    if (st) {
        free(buf);
        return st;
    }
    *out = buf;
    *len = n;
    return LEVI_OK;
}

static levi_status open_zip(levi_pt_file *f, pt_loader *L, uint8_t **pickle) {
    int zerr = 0;
    zip_t *z = zip_open(L->path, ZIP_RDONLY | ZIP_CHECKCONS, &zerr);
    if (!z) {
        zip_error_t ze;
        zip_error_init_with_code(&ze, zerr);
        levi_status st = levi_errorf(L->err, LEVI_ERR_FORMAT, "%s: not a readable zip archive: %s",
                                     L->path, zip_error_strerror(&ze));
        zip_error_fini(&ze);
        return st;
    }
    /* The archive's entries all sit in one folder whose name varies ("archive", or the file
     * name torch.save was given); data.pkl names it. */
    char prefix[256] = "";
    int found = 0;
    levi_status st = LEVI_OK;
    zip_int64_t n = zip_get_num_entries(z, 0);
    for (zip_int64_t i = 0; i < n && !st; i++) {
        const char *name = zip_get_name(z, (zip_uint64_t)i, ZIP_FL_ENC_RAW);
        if (!name) continue;
        const char *slash = strchr(name, '/');
        if (!slash || strcmp(slash, "/data.pkl") != 0) continue;
        size_t plen = (size_t)(slash - name);
        if (found)
            st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                             "%s: zip archive holds more than one data.pkl ('%s/' and '%s')",
                             L->path, prefix, name);
        else if (plen == 0 || plen >= sizeof prefix)
            st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                             "%s: zip entry '%.*s': folder name must be 1..%zu bytes", L->path,
                             PT_QUOTE, name, sizeof prefix - 1);
        else {
            memcpy(prefix, name, plen);
            prefix[plen] = '\0';
            found = 1;
        }
    }
    if (!st && !found)
        st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                         "%s: zip archive has no '<folder>/data.pkl': not a torch.save file",
                         L->path);
    char entry[512];
    uint8_t *buf = NULL;
    size_t len = 0;
    if (!st) {
        snprintf(entry, sizeof entry, "%s/byteorder", prefix);
        if (zip_name_locate(z, entry, 0) >= 0 && !(st = zip_read(z, L, entry, &buf, &len))) {
            if (!(len == 6 && memcmp(buf, "little", 6) == 0))
                st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                                 "%s: '%s' says '%.*s', expected 'little' (big-endian files are "
                                 "not supported)",
                                 L->path, entry, len < 16 ? (int)len : 16, (const char *)buf);
            free(buf);
            buf = NULL;
        }
    }
    pv *root = NULL;
    if (!st) {
        snprintf(entry, sizeof entry, "%s/data.pkl", prefix);
        st = zip_read(z, L, entry, pickle, &len);
    }
    if (!st) {
        size_t used;
        st = unpickle(L, "data.pkl", *pickle, len, 0, &root, &used);
        if (!st) st = check_root(L, root);
    }
    if (!st) st = unique_storages(f, L);
    for (int i = 0; i < f->n_storages && !st; i++) {
        pt_storage *s = &f->storages[i];
        snprintf(entry, sizeof entry, "%s/data/%s", prefix, s->key);
        if ((st = zip_read(z, L, entry, &buf, &len))) break;
        size_t want = (size_t)s->numel * s->file_esize;
        if (len != want)
            st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                             "%s: zip entry '%s' has %zu bytes, expected %" PRId64
                             " elements of %zu bytes = %zu",
                             L->path, entry, len, s->numel, s->file_esize, want);
        else if (L->copy_cap + len > L->file_size)
            st = levi_errorf(L->err, LEVI_ERR_FORMAT,
                             "%s: storages claim more bytes than the file's %zu", L->path,
                             L->file_size);
        else
            st = store_bytes(s, buf, L);
        free(buf);
        buf = NULL;
    }
    zip_discard(z);
    if (!st) st = finish(f, L, root);
    return st;
}

/* ---- legacy format ------------------------------------------------------------------ */

static const uint8_t pt_magic[10] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};

static const pv *dict_get(const pv *d, const char *key) {
    for (size_t i = 0; i + 1 < d->u.seq.n; i += 2) {
        const pv *k = d->u.seq.items[i];
        if (k->kind == PV_STR && bytes_eq(k->u.s.p, k->u.s.n, key)) return d->u.seq.items[i + 1];
    }
    return NULL;
}

static levi_status open_legacy(levi_pt_file *f, pt_loader *L, uint8_t *buf, size_t len) {
    size_t pos = 0, used = 0;
    pv *v = NULL, *root = NULL;
    levi_status st = unpickle(L, "magic number", buf, len, 0, &v, &used);
    if (st) return st;
    if (v->kind != PV_BIGINT || v->u.s.n != sizeof pt_magic ||
        memcmp(v->u.s.p, pt_magic, sizeof pt_magic) != 0)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: first pickle is %s, expected torch.save's magic number "
                           "0x1950a86a20f9469cfc6c (not a legacy PyTorch file)",
                           L->path, pv_kind_name(v));
    pos += used;
    if ((st = unpickle(L, "protocol version", buf + pos, len - pos, pos, &v, &used))) return st;
    if (v->kind != PV_INT || v->u.i != 1001)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: byte %zu: protocol version is %s %" PRId64 ", expected 1001",
                           L->path, pos, pv_kind_name(v), v->kind == PV_INT ? v->u.i : 0);
    pos += used;
    if ((st = unpickle(L, "system info", buf + pos, len - pos, pos, &v, &used))) return st;
    if (v->kind != PV_DICT)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: byte %zu: system info is %s, expected a dict", L->path, pos,
                           pv_kind_name(v));
    const pv *le = dict_get(v, "little_endian");
    if (le && !(le->kind == PV_BOOL && le->u.i == 1))
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: system info says little_endian is not True; big-endian files are "
                           "not supported",
                           L->path);
    pos += used;
    if ((st = unpickle(L, "the pickled object", buf + pos, len - pos, pos, &root, &used)) ||
        (st = check_root(L, root)))
        return st;
    pos += used;
    size_t keys_pos = pos;
    if ((st = unpickle(L, "storage key list", buf + pos, len - pos, pos, &v, &used))) return st;
    pos += used;
    if (v->kind != PV_LIST)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: byte %zu: storage key list is %s, expected a list", L->path,
                           keys_pos, pv_kind_name(v));
    if ((st = unique_storages(f, L))) return st;
    for (size_t i = 0; i < v->u.seq.n; i++) {
        const pv *k = v->u.seq.items[i];
        char q[PT_QUOTE];
        if (k->kind != PV_STR)
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: byte %zu: storage key %zu is %s, expected a string", L->path,
                               keys_pos, i, pv_kind_name(k));
        pt_storage *s = find_storage(f, k->u.s.p, k->u.s.n);
        if (!s)
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: storage key '%s' in the key list is not used by any tensor",
                               L->path, quote(q, sizeof q, k->u.s.p, k->u.s.n));
        if (s->loaded)
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: storage key '%s' appears twice in the key list", L->path,
                               s->key);
        if (len - pos < 8)
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: byte %zu: file ends before the element count of storage "
                               "'%s'",
                               L->path, pos, s->key);
        uint64_t numel = rd_le(buf + pos, 8);
        if (numel != (uint64_t)s->numel)
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: byte %zu: storage '%s' has %" PRIu64
                               " elements, but the pickle says %" PRId64,
                               L->path, pos, s->key, numel, s->numel);
        pos += 8;
        size_t bytes = (size_t)s->numel * s->file_esize; /* <= file size, checked at BINPERSID */
        if (len - pos < bytes)
            return levi_errorf(L->err, LEVI_ERR_FORMAT,
                               "%s: byte %zu: storage '%s' needs %zu bytes, the file has %zu left",
                               L->path, pos, s->key, bytes, len - pos);
        if ((st = store_bytes(s, buf + pos, L))) return st;
        pos += bytes;
    }
    if (pos != len)
        return levi_errorf(L->err, LEVI_ERR_FORMAT,
                           "%s: byte %zu: %zu unexpected bytes after the last storage", L->path,
                           pos, len - pos);
    return finish(f, L, root);
}

/* ---- public API ----------------------------------------------------------------------- */

void levi_pt_close(levi_pt_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n_storages; i++) free(f->storages[i].data);
    for (int i = 0; i < f->n_trefs; i++) free(f->trefs[i].copy);
    free(f->storages);
    free(f->trefs);
    free(f->tensors);
    free(f->by_name);
    free(f->path);
    free(f);
}

levi_pt_file *levi_pt_open(const char *path, levi_error *err) {
    LEVI_ASSERT(path != NULL, "levi_pt_open needs a path");
    struct stat sb;
    if (stat(path, &sb) != 0) {
        levi_errorf(err, LEVI_ERR_IO, "%s: cannot open: no such file or not readable", path);
        return NULL;
    }
    uint8_t head[4] = {0};
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        levi_errorf(err, LEVI_ERR_IO, "%s: cannot open for reading", path);
        return NULL;
    }
    size_t nhead = fread(head, 1, sizeof head, fp);
    fclose(fp);

    levi_pt_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory", path);
        return NULL;
    }
    pt_loader L = {.path = f->path, .file_size = (size_t)sb.st_size, .err = err};
    levi_status st;
    uint8_t *buf = NULL;
    if (nhead == 4 && memcmp(head, "PK\x03\x04", 4) == 0) {
        st = open_zip(f, &L, &buf);
    } else if (nhead >= 2 && head[0] == 0x80) {
        size_t len = 0;
        st = levi_read_file(path, (char **)&buf, &len, err);
        if (!st) {
            L.file_size = len;
            st = open_legacy(f, &L, buf, len);
        }
    } else {
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: not a PyTorch checkpoint: expected a zip archive ('PK\\3\\4') or a "
                         "legacy torch.save pickle (0x80), found %zu bytes starting %02x %02x %02x "
                         "%02x",
                         path, nhead, head[0], head[1], head[2], head[3]);
    }
    free(buf);
    f->trefs = L.trefs;
    f->n_trefs = L.n_trefs;
    loader_free(&L);
    if (st) {
        levi_pt_close(f);
        return NULL;
    }
    return f;
}

int levi_pt_count(const levi_pt_file *f) {
    return f ? f->count : 0;
}

const levi_tensor *levi_pt_tensor(const levi_pt_file *f, int i) {
    LEVI_ASSERT(f != NULL && i >= 0 && i < f->count, "tensor index out of range");
    return &f->tensors[i];
}

const levi_tensor *levi_pt_find(const levi_pt_file *f, const char *name) {
    LEVI_ASSERT(f != NULL && name != NULL, "levi_pt_find needs a file and a name");
    int lo = 0, hi = f->count - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const levi_tensor *t = &f->tensors[f->by_name[mid]];
        int c = strcmp(name, t->name);
        if (c == 0) return t;
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

levi_status levi_pt_read_f32(const levi_pt_file *f, const char *name, int ndim,
                             const int64_t *shape, float *dst, levi_error *err) {
    LEVI_ASSERT(f != NULL && name != NULL && dst != NULL, "levi_pt_read_f32 needs f, name, dst");
    const levi_tensor *t = levi_pt_find(f, name);
    if (!t) return levi_errorf(err, LEVI_ERR_NOT_FOUND, "%s: no tensor named '%s'", f->path, name);
    /* F64 storages were converted to F32 when the file was opened. */
    return levi_tensor_read_f32(t, f->path, ndim, shape, dst, err);
}
