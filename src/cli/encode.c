/* `levi encode`: text lines in, per-layer pooled backbone features out (one safetensors
 * file), through the feature cache so a later `levi fit` on the same texts reuses them.
 * Not for: training or evaluation; the library work is levi_featcache_* (featcache.h), this
 * file only parses options, reads and checks the text file, reports progress, and writes. */
#include "cli.h"

#include "levi/featcache.h"
#include "levi/safetensors.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <utf8proc.h>

#ifndef LEVI_VERSION_STRING
#define LEVI_VERSION_STRING "0.1.0"
#endif

static void print_help(FILE *f) {
    fprintf(f,
            "usage: levi encode --model DIR --input TEXTS --output FEATS.safetensors [options]\n"
            "\n"
            "Runs a BERT-family encoder (a Hugging Face folder) once over every line of TEXTS and\n"
            "writes the pooled hidden states of the chosen layers. Features are kept in a cache\n"
            "keyed by the model files, the texts, the pooling, max length, layers and dtype, so\n"
            "running again (or `levi fit` on the same texts) reuses them; an interrupted run\n"
            "resumes from the last finished chunk.\n"
            "\n"
            "Required:\n"
            "  --model DIR       model folder with config.json, model.safetensors and vocab.txt\n"
            "                    (e.g. all-MiniLM-L6-v2)\n"
            "  --input TEXTS     UTF-8 text file, one text per line ('-' reads stdin); empty\n"
            "                    lines and invalid UTF-8 are errors naming the line\n"
            "  --output FILE     safetensors file to write (atomically): one tensor\n"
            "                    \"layer.<l>\" [n, hidden] per hidden state, in input line order,\n"
            "                    with metadata (model, pooling, layers, max_len, cache key)\n"
            "Options:\n"
            "  --layers SPEC     hidden states to write: 'all' (default: 0..L) or a comma list\n"
            "                    such as 0,3,6; 0 is the embedding output, l the output of\n"
            "                    encoder layer l (1..L)\n"
            "  --pooling MODE    'mean' over the real tokens, as sentence-transformers (default),\n"
            "                    or 'cls' (the first token's hidden state)\n"
            "  --max-len N       tokens per text including [CLS] and [SEP] (default 128);\n"
            "                    longer texts are truncated and counted in the summary\n"
            "  --batch N         texts per encoder forward (default 64); texts are sorted by\n"
            "                    length first, so a batch holds texts of similar length\n"
            "  --threads N       threads for the encoder (kernels and matrix products);\n"
            "                    default: OMP_NUM_THREADS, else all cores\n"
            "  --dtype T         'f16' (default: half the size, ~3 significant digits) or\n"
            "                    'f32', for both the cache and the output\n"
            "  --cache DIR       cache root (default $LEVI_CACHE/features, else\n"
            "                    ${XDG_CACHE_HOME:-$HOME/.cache}/levi/features)\n"
            "  -h, --help        this text\n"
            "\n"
            "Exit codes: %d ok, %d run failed (I/O, non-finite features), %d usage error,\n"
            "%d bad input (texts, model folder), %d interrupted (finished chunks are kept: run\n"
            "the same command again to resume).\n",
            LEVI_EXIT_OK, LEVI_EXIT_FAILURE, LEVI_EXIT_USAGE, LEVI_EXIT_INPUT,
            LEVI_EXIT_INTERRUPTED);
}

static int usage_error(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "levi encode: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, " (see levi encode --help)\n");
    return LEVI_EXIT_USAGE;
}

static int parse_int(const char *s, int lo, int hi, int *out) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || end == s || *end || v < lo || v > hi) return 0;
    *out = (int)v;
    return 1;
}

/* "all" or a comma list of layer indices (range checked later against the model). */
static int parse_layers(const char *s, levi_featcache_params *p) {
    if (strcmp(s, "all") == 0) {
        p->n_layers = 0;
        return 1;
    }
    p->n_layers = 0;
    const char *c = s;
    while (*c) {
        char *end = NULL;
        errno = 0;
        long v = strtol(c, &end, 10);
        if (errno || end == c || v < 0 || v > 4096 || (*end != ',' && *end != 0)) return 0;
        if (p->n_layers >= LEVI_FEATCACHE_MAX_LAYERS) return 0;
        p->layers[p->n_layers++] = (int)v;
        c = *end == ',' ? end + 1 : end;
        if (*end == ',' && *c == 0) return 0;
    }
    return p->n_layers > 0;
}

/* Reads the whole text file (or stdin) and splits it into NUL-terminated lines in place.
 * Every line must be non-empty, NUL-free, valid UTF-8; errors name path:line. */
static int read_lines(const char *path, char **buf_out, char ***lines_out, int64_t *n_out) {
    char *buf = NULL;
    size_t len = 0;
    if (strcmp(path, "-") == 0) {
        size_t cap = 1 << 16;
        buf = malloc(cap);
        for (;;) {
            if (!buf) break;
            if (len + 1 >= cap) {
                char *nb = realloc(buf, cap * 2);
                if (!nb) {
                    free(buf);
                    buf = NULL;
                    break;
                }
                buf = nb;
                cap *= 2;
            }
            size_t r = fread(buf + len, 1, cap - len - 1, stdin);
            if (r == 0) break;
            len += r;
        }
        if (!buf) {
            fprintf(stderr, "levi encode: out of memory reading stdin\n");
            return LEVI_EXIT_FAILURE;
        }
        buf[len] = 0;
        path = "<stdin>";
    } else {
        levi_error err = {0};
        if (levi_read_file(path, &buf, &len, &err) != LEVI_OK) {
            fprintf(stderr, "levi encode: --input: %s\n", err.msg);
            return LEVI_EXIT_INPUT;
        }
    }
    int64_t n = 0;
    for (size_t i = 0; i < len; i++) n += buf[i] == '\n';
    if (len > 0 && buf[len - 1] != '\n') n++; /* a last line without its newline */
    if (n == 0) {
        fprintf(stderr, "levi encode: %s: no lines (expected one text per line)\n", path);
        free(buf);
        return LEVI_EXIT_INPUT;
    }
    char **lines = malloc((size_t)n * sizeof *lines);
    if (!lines) {
        free(buf);
        fprintf(stderr, "levi encode: out of memory for %lld lines\n", (long long)n);
        return LEVI_EXIT_FAILURE;
    }
    size_t pos = 0;
    for (int64_t k = 0; k < n; k++) {
        char *start = buf + pos;
        char *nl = memchr(start, '\n', len - pos);
        size_t l = nl ? (size_t)(nl - start) : len - pos;
        pos += l + (nl ? 1 : 0);
        if (l > 0 && start[l - 1] == '\r') l--; /* CRLF files */
        start[l] = 0;
        const char *why = NULL;
        char detail[96] = "";
        if (l == 0) why = "empty line (every line is one text; remove it or give it text)";
        const char *nul = memchr(start, 0, l);
        if (!why && nul) {
            snprintf(detail, sizeof detail, "NUL byte at column %zu (a binary file?)",
                     (size_t)(nul - start) + 1);
            why = detail;
        }
        for (size_t b = 0; !why && b < l;) {
            utf8proc_int32_t cp;
            utf8proc_ssize_t r = utf8proc_iterate((const utf8proc_uint8_t *)start + b,
                                                  (utf8proc_ssize_t)(l - b), &cp);
            if (r < 0) {
                snprintf(detail, sizeof detail,
                         "invalid UTF-8 at byte column %zu (byte 0x%02X); transcode the file "
                         "to UTF-8",
                         b + 1, (unsigned)(unsigned char)start[b]);
                why = detail;
            } else {
                b += (size_t)r;
            }
        }
        if (why) {
            fprintf(stderr, "levi encode: %s:%lld: %s\n", path, (long long)(k + 1), why);
            free(lines);
            free(buf);
            return LEVI_EXIT_INPUT;
        }
        lines[k] = start;
    }
    *buf_out = buf;
    *lines_out = lines;
    *n_out = n;
    return LEVI_EXIT_OK;
}

/* The bar covers the texts this run encodes: on a resumed build the first callback reports
 * the reused texts as done, and counting them would inflate the rate and shorten the ETA. */
typedef struct progress_state {
    levi_progress *bar;
    int64_t first_done;
} progress_state;

static void on_progress(void *user, int64_t done, int64_t total, double tokens_per_s) {
    progress_state *ps = user;
    if (!ps->bar) {
        ps->first_done = done;
        ps->bar = levi_progress_start("encode", total - done, "texts");
    }
    char extra[64];
    snprintf(extra, sizeof extra, "%.0f tok/s", tokens_per_s);
    levi_progress_update(ps->bar, done - ps->first_done, extra);
}

static void default_cache_root(char *out, size_t cap) {
    const char *c = getenv("LEVI_CACHE");
    const char *x = getenv("XDG_CACHE_HOME");
    const char *h = getenv("HOME");
    if (c && *c)
        snprintf(out, cap, "%s/features", c);
    else if (x && *x)
        snprintf(out, cap, "%s/levi/features", x);
    else
        snprintf(out, cap, "%s/.cache/levi/features", h && *h ? h : ".");
}

/* Writes the features as one tensor per hidden state. Each layer is loaded on its own, as
 * [n, 1, dim] = [n, dim] contiguous, so no transpose copy of the whole array is needed. */
static levi_status write_output(const char *out_path, const levi_featcache_info *info,
                                const char *model_dir, const levi_featcache_params *p,
                                levi_error *err) {
    int L = info->n_layers;
    levi_tensor *t = calloc((size_t)L, sizeof *t);
    void **bufs = calloc((size_t)L, sizeof *bufs);
    levi_status st = LEVI_OK;
    if (!t || !bufs) {
        st = levi_errorf(err, LEVI_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int j = 0; j < L; j++) {
        levi_features f;
        st = levi_featcache_load(info->dir, &info->layers[j], 1, &f, err);
        if (st != LEVI_OK) goto done;
        snprintf(t[j].name, sizeof t[j].name, "layer.%d", info->layers[j]);
        int64_t shape[2] = {f.n, f.dim};
        levi_tensor_set_shape(&t[j], 2, shape);
        if (p->dtype == LEVI_F16) {
            uint16_t *h = malloc((size_t)f.n * (size_t)f.dim * sizeof(uint16_t));
            if (!h) {
                levi_features_free(&f);
                st = levi_errorf(err, LEVI_ERR_NOMEM, "out of memory converting layer %d",
                                 info->layers[j]);
                goto done;
            }
            levi_featcache_to_f16(f.data, h, f.n * f.dim);
            levi_features_free(&f);
            bufs[j] = h;
            t[j].dtype = LEVI_F16;
        } else {
            bufs[j] = f.data; /* ownership moves to bufs; freed below with free() */
            f.data = NULL;
            t[j].dtype = LEVI_F32;
        }
        t[j].data = bufs[j];
    }
    char layers[LEVI_FEATCACHE_MAX_LAYERS * 6] = "";
    size_t o = 0;
    for (int j = 0; j < L && o < sizeof layers; j++)
        o += (size_t)snprintf(layers + o, sizeof layers - o, "%s%d", j ? "," : "", info->layers[j]);
    char n_str[32], max_len[32], dim[32], truncated[32];
    snprintf(n_str, sizeof n_str, "%lld", (long long)info->n);
    snprintf(max_len, sizeof max_len, "%d", p->max_len);
    snprintf(dim, sizeof dim, "%d", info->dim);
    snprintf(truncated, sizeof truncated, "%lld", (long long)info->truncated);
    const char *keys[] = {"format", "model", "pooling",   "layers",    "max_len",
                          "n",      "dim",   "truncated", "cache_key", "levi_version"};
    const char *vals[] = {"levi-features",
                          model_dir,
                          levi_pooling_name(p->pooling),
                          layers,
                          max_len,
                          n_str,
                          dim,
                          truncated,
                          info->key,
                          LEVI_VERSION_STRING};
    st = levi_st_write(out_path, t, L, keys, vals, (int)(sizeof keys / sizeof keys[0]), err);
done:
    if (bufs)
        for (int j = 0; j < L; j++) free(bufs[j]);
    free(bufs);
    free(t);
    return st;
}

int levi_cmd_encode(int argc, char **argv) {
    const char *model = NULL, *input = NULL, *output = NULL, *cache = NULL;
    levi_featcache_params p = levi_featcache_default_params();
    p.threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            print_help(stdout);
            return LEVI_EXIT_OK;
        }
        if (strncmp(a, "--", 2) != 0) return usage_error("unexpected argument '%s'%s", a, "");
        /* --opt=value or --opt value */
        char name[64];
        const char *val = NULL;
        const char *eq = strchr(a, '=');
        size_t nl = eq ? (size_t)(eq - a) : strlen(a);
        if (nl >= sizeof name) return usage_error("unknown option '%s'%s", a, "");
        memcpy(name, a, nl);
        name[nl] = 0;
        static const char *const known[] = {"--model",   "--input",   "--output", "--layers",
                                            "--pooling", "--max-len", "--batch",  "--threads",
                                            "--dtype",   "--cache"};
        int is_known = 0;
        for (size_t k = 0; k < sizeof known / sizeof known[0]; k++)
            is_known |= strcmp(name, known[k]) == 0;
        if (!is_known) return usage_error("unknown option '%s'%s", name, "");
        if (eq)
            val = eq + 1;
        else if (i + 1 < argc)
            val = argv[++i];
        else
            return usage_error("option %s needs a value%s", name, "");
        if (strcmp(name, "--model") == 0)
            model = val;
        else if (strcmp(name, "--input") == 0)
            input = val;
        else if (strcmp(name, "--output") == 0)
            output = val;
        else if (strcmp(name, "--cache") == 0)
            cache = val;
        else if (strcmp(name, "--layers") == 0) {
            if (!parse_layers(val, &p))
                return usage_error("--layers: expected 'all' or a comma list of layer indices "
                                   "such as 0,3,6, found '%s'%s",
                                   val, "");
        } else if (strcmp(name, "--pooling") == 0) {
            int pool = levi_pooling_parse(val);
            if (pool < 0)
                return usage_error("--pooling: expected 'mean' or 'cls', found '%s'%s", val, "");
            p.pooling = (levi_pooling)pool;
        } else if (strcmp(name, "--max-len") == 0) {
            if (!parse_int(val, 2, 1 << 20, &p.max_len))
                return usage_error("--max-len: expected an integer >= 2, found '%s'%s", val, "");
        } else if (strcmp(name, "--batch") == 0) {
            if (!parse_int(val, 1, 1 << 16, &p.batch_size))
                return usage_error("--batch: expected an integer in 1..65536, found '%s'%s", val,
                                   "");
        } else if (strcmp(name, "--threads") == 0) {
            if (!parse_int(val, 1, 4096, &p.threads))
                return usage_error("--threads: expected an integer >= 1, found '%s'%s", val, "");
        } else if (strcmp(name, "--dtype") == 0) {
            if (strcmp(val, "f16") == 0 || strcmp(val, "F16") == 0)
                p.dtype = LEVI_F16;
            else if (strcmp(val, "f32") == 0 || strcmp(val, "F32") == 0)
                p.dtype = LEVI_F32;
            else
                return usage_error("--dtype: expected 'f16' or 'f32', found '%s'%s", val, "");
        }
    }
    if (!model || !input || !output)
        return usage_error("missing %s%s",
                           !model   ? "--model DIR"
                           : !input ? "--input TEXTS"
                                    : "--output FILE",
                           "");

    /* The model folder is input: name the missing file rather than fail deep inside. */
    static const char *const needed[] = {"config.json", "model.safetensors", "vocab.txt"};
    for (size_t k = 0; k < sizeof needed / sizeof needed[0]; k++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", model, needed[k]);
        if (access(path, R_OK) != 0) {
            fprintf(stderr,
                    "levi encode: --model: %s: %s (expected a Hugging Face folder with "
                    "config.json, model.safetensors and vocab.txt)\n",
                    path, strerror(errno));
            return LEVI_EXIT_INPUT;
        }
    }
    /* Fail before hours of encoding, not after (the cache would keep the work, but still). */
    char out_dir[PATH_MAX];
    snprintf(out_dir, sizeof out_dir, "%s", output);
    char *slash = strrchr(out_dir, '/');
    if (!slash)
        snprintf(out_dir, sizeof out_dir, ".");
    else if (slash == out_dir)
        out_dir[1] = 0;
    else
        *slash = 0;
    if (access(out_dir, W_OK) != 0) {
        fprintf(stderr, "levi encode: --output: directory %s: %s\n", out_dir, strerror(errno));
        return LEVI_EXIT_USAGE;
    }
    char cache_root[PATH_MAX];
    if (cache)
        snprintf(cache_root, sizeof cache_root, "%s", cache);
    else
        default_cache_root(cache_root, sizeof cache_root);

    char *buf = NULL;
    char **lines = NULL;
    int64_t n = 0;
    int rc = read_lines(input, &buf, &lines, &n);
    if (rc != LEVI_EXIT_OK) return rc;

    progress_state ps = {NULL, 0};
    p.progress = on_progress;
    p.progress_user = &ps;
    p.stop = &levi_cli_interrupted;
    levi_featcache_info info;
    levi_error err = {0};
    levi_status st =
        levi_featcache_build(cache_root, model, (const char *const *)lines, n, &p, &info, &err);
    if (ps.bar) levi_progress_finish(ps.bar);
    free(lines);
    free(buf);
    if (st != LEVI_OK) {
        fprintf(stderr, "levi encode: %s\n", err.msg);
        return levi_cli_exit_code(st);
    }
    fprintf(stderr,
            "levi encode: %lld texts, %d hidden states x %d, %lld tokens (longest %d; %lld "
            "truncated at %d)\n",
            (long long)info.n, info.n_layers, info.dim, (long long)info.tokens, info.max_tokens,
            (long long)info.truncated, p.max_len);
    if (info.chunks_computed + info.chunks_repaired > 0)
        fprintf(stderr,
                "levi encode: cache %s: %d chunk(s) computed, %d reused, %d repaired; encoder "
                "%.1f s, %.1f texts/s, %.0f tokens/s, padding %.1f%%\n",
                info.dir, info.chunks_computed, info.chunks_reused, info.chunks_repaired,
                info.seconds, info.seconds > 0 ? (double)info.texts_computed / info.seconds : 0,
                info.seconds > 0 ? (double)info.tokens_computed / info.seconds : 0,
                info.padded_tokens > 0
                    ? 100.0 * (double)(info.padded_tokens - info.tokens_computed) /
                          (double)info.padded_tokens
                    : 0);
    else
        fprintf(stderr, "levi encode: cache hit %s (%d chunks)\n", info.dir, info.n_chunks);

    st = write_output(output, &info, model, &p, &err);
    if (st != LEVI_OK) {
        fprintf(stderr, "levi encode: %s\n", err.msg);
        return levi_cli_exit_code(st) == LEVI_EXIT_USAGE ? LEVI_EXIT_FAILURE
                                                         : levi_cli_exit_code(st);
    }
    fprintf(stderr, "levi encode: wrote %s\n", output);
    return LEVI_EXIT_OK;
}
