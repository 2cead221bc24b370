/* BERT WordPiece tokenizer (see include/levi/tokenizer.h for the contract and the pipeline).
 *
 * For: turning UTF-8 text into the exact ids Hugging Face's BertTokenizerFast produces for
 * all-MiniLM-L6-v2 and other uncased/cased BERT vocabularies. Every Unicode question
 * (categories, canonical decomposition, case mapping) goes to utf8proc, except for 117
 * ranges where Hugging Face answers from older (Unicode 8) category tables: see
 * legacy_categories below.
 * Not for: sentence pairs, offsets, decoding, BPE/unigram models.
 *
 * Where Hugging Face's Rust code and its Python "slow" tokenizer disagree, this follows the
 * Rust one (the one transformers uses by default): accents are stripped before
 * lower-casing, the CJK range list has 0x2B920 where Python has 0x2B820, and unassigned
 * code points (Cn) are kept rather than removed. tests/test_tokenizer.c checks all of it
 * against ids dumped by tests/ref/gen_tokenizer_ref.py.
 */
#include "levi/tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* Hugging Face WordPiece's max_input_chars_per_word. */
#define WORD_MAX_CHARS 100
/* Room for the "##" continuation prefix in front of a candidate piece. */
#define CONT_PREFIX "##"
#define CONT_PREFIX_LEN 2
/* A model_max_length above this is a "no limit" sentinel (HF writes 1e30); clamp it. */
#define MODEL_MAX_LENGTH_CAP (1 << 30)

enum { SPECIAL_UNK, SPECIAL_SEP, SPECIAL_PAD, SPECIAL_CLS, SPECIAL_MASK, SPECIAL_COUNT };
static const char *const special_keys[SPECIAL_COUNT] = {"unk_token", "sep_token", "pad_token",
                                                        "cls_token", "mask_token"};
static const char *const special_defaults[SPECIAL_COUNT] = {"[UNK]", "[SEP]", "[PAD]", "[CLS]",
                                                            "[MASK]"};

struct levi_tokenizer {
    char *blob;        /* vocab.txt contents, every line NUL-terminated in place */
    uint32_t *tok_off; /* [vocab_size] offset of token id in blob */
    uint32_t *tok_len; /* [vocab_size] its length in bytes */
    int32_t *table;    /* open-addressing hash of token -> id, -1 = empty */
    uint32_t table_mask;
    int max_token_bytes; /* longest vocabulary entry: caps the longest-match search */
    levi_tokenizer_info info;
    /* Special tokens matched verbatim in the raw text before normalization, as the
     * added-vocabulary pass of tokenizers does for tokens with normalized=false. */
    int n_special;
    const char *special_str[SPECIAL_COUNT];
    size_t special_len[SPECIAL_COUNT];
    int32_t special_id[SPECIAL_COUNT];
    uint8_t special_first[256]; /* 1 for bytes that start a special token: skip the rest fast */
    /* ASCII answers computed once from utf8proc at open: most text is ASCII, and asking
     * utf8proc three times per character dominated the profile. */
    uint8_t ascii_flags[128];
    int32_t ascii_lower[128];
};

/* ---- vocabulary hash table ---------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a: short keys, good spread, no tuning needed */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static int32_t vocab_lookup(const levi_tokenizer *tok, const char *s, size_t n) {
    uint32_t i = hash_bytes(s, n) & tok->table_mask;
    for (;;) {
        int32_t id = tok->table[i];
        if (id < 0) return -1;
        if (tok->tok_len[id] == n && memcmp(tok->blob + tok->tok_off[id], s, n) == 0) return id;
        i = (i + 1) & tok->table_mask;
    }
}

/* ---- character classes (utf8proc for every property) --------------------------------- */

/* Hugging Face's Rust tokenizers take the categories it splits, strips and drops on from
 * the unicode_categories crate, whose tables are Unicode 8.0, while utf8proc is Unicode 15.
 * These are the code points where that difference changes the tokens: characters added
 * since Unicode 8 that are Mn, P* or Cf today (the crate sees them as unassigned, so they
 * are kept and not split), and three that changed category (U+166D Po -> So, U+1734
 * Mn -> Mc, U+111C9 Po -> Mn). Found by tokenizing every code point with both and kept
 * honest by the all-code-point check in tests/test_tokenizer.c; regenerate with
 * tests/ref/gen_tokenizer_ref.py --codepoints-out if the reference tokenizer changes. */
enum { L_CN = UTF8PROC_CATEGORY_CN, L_PO = UTF8PROC_CATEGORY_PO, L_MN = UTF8PROC_CATEGORY_MN };
static const struct {
    int32_t first, last;
    int category;
} legacy_categories[] = {
    {0x061D, 0x061D, L_CN},   {0x07FD, 0x07FD, L_CN},   {0x0890, 0x0891, L_CN},
    {0x0898, 0x089F, L_CN},   {0x08CA, 0x08E2, L_CN},   {0x09FD, 0x09FE, L_CN},
    {0x0A76, 0x0A76, L_CN},   {0x0AFA, 0x0AFF, L_CN},   {0x0B55, 0x0B55, L_CN},
    {0x0C04, 0x0C04, L_CN},   {0x0C3C, 0x0C3C, L_CN},   {0x0C77, 0x0C77, L_CN},
    {0x0C84, 0x0C84, L_CN},   {0x0D00, 0x0D00, L_CN},   {0x0D3B, 0x0D3C, L_CN},
    {0x0D81, 0x0D81, L_CN},   {0x0EBA, 0x0EBA, L_CN},   {0x0ECE, 0x0ECE, L_CN},
    {0x166D, 0x166D, L_PO},   {0x1734, 0x1734, L_MN},   {0x180F, 0x180F, L_CN},
    {0x1885, 0x1886, L_CN},   {0x1ABF, 0x1ACE, L_CN},   {0x1B7D, 0x1B7E, L_CN},
    {0x1DF6, 0x1DFB, L_CN},   {0x2E43, 0x2E4F, L_CN},   {0x2E52, 0x2E5D, L_CN},
    {0xA82C, 0xA82C, L_CN},   {0xA8C5, 0xA8C5, L_CN},   {0xA8FF, 0xA8FF, L_CN},
    {0xA9BD, 0xA9BD, L_CN},   {0x10D24, 0x10D27, L_CN}, {0x10EAB, 0x10EAD, L_CN},
    {0x10EFD, 0x10EFF, L_CN}, {0x10F46, 0x10F50, L_CN}, {0x10F55, 0x10F59, L_CN},
    {0x10F82, 0x10F89, L_CN}, {0x11070, 0x11070, L_CN}, {0x11073, 0x11074, L_CN},
    {0x110C2, 0x110C2, L_CN}, {0x110CD, 0x110CD, L_CN}, {0x111C9, 0x111C9, L_PO},
    {0x111CF, 0x111CF, L_CN}, {0x1123E, 0x1123E, L_CN}, {0x11241, 0x11241, L_CN},
    {0x1133B, 0x1133B, L_CN}, {0x11438, 0x1143F, L_CN}, {0x11442, 0x11444, L_CN},
    {0x11446, 0x11446, L_CN}, {0x1144B, 0x1144F, L_CN}, {0x1145A, 0x1145B, L_CN},
    {0x1145D, 0x1145E, L_CN}, {0x11660, 0x1166C, L_CN}, {0x116B9, 0x116B9, L_CN},
    {0x1182F, 0x11837, L_CN}, {0x11839, 0x1183B, L_CN}, {0x1193B, 0x1193C, L_CN},
    {0x1193E, 0x1193E, L_CN}, {0x11943, 0x11946, L_CN}, {0x119D4, 0x119D7, L_CN},
    {0x119DA, 0x119DB, L_CN}, {0x119E0, 0x119E0, L_CN}, {0x119E2, 0x119E2, L_CN},
    {0x11A01, 0x11A0A, L_CN}, {0x11A33, 0x11A38, L_CN}, {0x11A3B, 0x11A47, L_CN},
    {0x11A51, 0x11A56, L_CN}, {0x11A59, 0x11A5B, L_CN}, {0x11A8A, 0x11A96, L_CN},
    {0x11A98, 0x11A9C, L_CN}, {0x11A9E, 0x11AA2, L_CN}, {0x11B00, 0x11B09, L_CN},
    {0x11C30, 0x11C36, L_CN}, {0x11C38, 0x11C3D, L_CN}, {0x11C3F, 0x11C3F, L_CN},
    {0x11C41, 0x11C45, L_CN}, {0x11C70, 0x11C71, L_CN}, {0x11C92, 0x11CA7, L_CN},
    {0x11CAA, 0x11CB0, L_CN}, {0x11CB2, 0x11CB3, L_CN}, {0x11CB5, 0x11CB6, L_CN},
    {0x11D31, 0x11D36, L_CN}, {0x11D3A, 0x11D3A, L_CN}, {0x11D3C, 0x11D3D, L_CN},
    {0x11D3F, 0x11D45, L_CN}, {0x11D47, 0x11D47, L_CN}, {0x11D90, 0x11D91, L_CN},
    {0x11D95, 0x11D95, L_CN}, {0x11D97, 0x11D97, L_CN}, {0x11EF3, 0x11EF4, L_CN},
    {0x11EF7, 0x11EF8, L_CN}, {0x11F00, 0x11F01, L_CN}, {0x11F36, 0x11F3A, L_CN},
    {0x11F40, 0x11F40, L_CN}, {0x11F42, 0x11F4F, L_CN}, {0x11FFF, 0x11FFF, L_CN},
    {0x12FF1, 0x12FF2, L_CN}, {0x13430, 0x13440, L_CN}, {0x13447, 0x13455, L_CN},
    {0x16E97, 0x16E9A, L_CN}, {0x16F4F, 0x16F4F, L_CN}, {0x16FE2, 0x16FE2, L_CN},
    {0x16FE4, 0x16FE4, L_CN}, {0x1CF00, 0x1CF2D, L_CN}, {0x1CF30, 0x1CF46, L_CN},
    {0x1E000, 0x1E006, L_CN}, {0x1E008, 0x1E018, L_CN}, {0x1E01B, 0x1E021, L_CN},
    {0x1E023, 0x1E024, L_CN}, {0x1E026, 0x1E02A, L_CN}, {0x1E08F, 0x1E08F, L_CN},
    {0x1E130, 0x1E136, L_CN}, {0x1E2AE, 0x1E2AE, L_CN}, {0x1E2EC, 0x1E2EF, L_CN},
    {0x1E4EC, 0x1E4EF, L_CN}, {0x1E944, 0x1E94A, L_CN}, {0x1E95E, 0x1E95F, L_CN},
};

static int cat_of(int32_t cp) {
    if (cp >= legacy_categories[0].first) {
        int lo = 0, hi = (int)(sizeof legacy_categories / sizeof legacy_categories[0]) - 1;
        while (lo <= hi) {
            int mid = (lo + hi) / 2;
            if (cp < legacy_categories[mid].first)
                hi = mid - 1;
            else if (cp > legacy_categories[mid].last)
                lo = mid + 1;
            else
                return legacy_categories[mid].category;
        }
    }
    return (int)utf8proc_category(cp);
}

/* tokenizers' is_control: "other" categories except \t \n \r. Its table (the
 * unicode_categories crate) does not count unassigned code points (Cn) as other, and the
 * reference confirms they survive, so Cn is not listed here. */
static int is_control(int32_t cp) {
    if (cp == '\t' || cp == '\n' || cp == '\r') return 0;
    int c = cat_of(cp);
    return c == UTF8PROC_CATEGORY_CC || c == UTF8PROC_CATEGORY_CF || c == UTF8PROC_CATEGORY_CO ||
           c == UTF8PROC_CATEGORY_CS;
}

/* Rust's char::is_whitespace (the White_Space property): the Z* separators plus the
 * ASCII/Latin-1 controls \t..\r and U+0085, which utf8proc files under Cc. */
static int is_whitespace(int32_t cp) {
    if ((cp >= 0x09 && cp <= 0x0D) || cp == 0x85) return 1;
    int c = cat_of(cp);
    return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}

/* BERT splits on ASCII punctuation (including symbols such as $ + < = > ^ ` | ~) and on
 * every Unicode P* category. */
static int is_punctuation(int32_t cp) {
    if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
        (cp >= 123 && cp <= 126))
        return 1;
    int c = cat_of(cp);
    return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}

/* The CJK Unified Ideograph blocks BERT isolates. 0x2B920 (not 0x2B820) is what the Rust
 * implementation uses; the reference shows U+2B820 is not split off. */
static int is_cjk(int32_t cp) {
    return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
           (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
           (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B920 && cp <= 0x2CEAF) ||
           (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

enum { CF_DROP = 1, CF_SPACE = 2, CF_PUNCT = 4 };

/* What the normalizer and pre-tokenizer need to know about one character. */
static int char_flags_slow(int32_t cp) {
    int f = 0;
    if (cp == 0 || cp == 0xFFFD || is_control(cp)) f |= CF_DROP;
    if (is_whitespace(cp)) f |= CF_SPACE;
    if (is_punctuation(cp)) f |= CF_PUNCT;
    return f;
}

static inline int char_flags(const levi_tokenizer *tok, int32_t cp) {
    return cp < 128 ? tok->ascii_flags[cp] : char_flags_slow(cp);
}

/* ---- growable code point buffers (per call, so the handle stays read-only) ------------ */

/* Texts of a few hundred characters (the common case) stay in the inline storage, so
 * encoding them does not touch the heap. */
#define CPBUF_INLINE 512

typedef struct cpbuf {
    int32_t *v;
    size_t n, cap;
    int heap; /* v was malloc'ed (else it points at the inline array) */
    int32_t inline_v[CPBUF_INLINE];
} cpbuf;

static void cpbuf_init(cpbuf *b) {
    b->v = b->inline_v;
    b->n = 0;
    b->cap = CPBUF_INLINE;
    b->heap = 0;
}

static int cpbuf_reserve(cpbuf *b, size_t extra) {
    if (b->n + extra <= b->cap) return 1;
    size_t cap = b->cap;
    while (cap < b->n + extra) {
        if (cap > SIZE_MAX / 2 / sizeof(int32_t)) return 0;
        cap *= 2;
    }
    int32_t *nv = b->heap ? realloc(b->v, cap * sizeof(int32_t)) : malloc(cap * sizeof(int32_t));
    if (!nv) return 0;
    if (!b->heap) memcpy(nv, b->v, b->n * sizeof(int32_t));
    b->v = nv;
    b->cap = cap;
    b->heap = 1;
    return 1;
}

typedef struct scratch {
    cpbuf a, b;
} scratch;

static void scratch_init(scratch *s) {
    cpbuf_init(&s->a);
    cpbuf_init(&s->b);
}

static void scratch_free(scratch *s) {
    if (s->a.heap) free(s->a.v);
    if (s->b.heap) free(s->b.v);
}

/* ---- normalization -------------------------------------------------------------------- */

/* Clean-up and CJK spacing of bytes [s, s+n) (valid UTF-8) into out. */
static int normalize_clean(const levi_tokenizer *tok, const char *s, size_t n, cpbuf *out) {
    out->n = 0;
    size_t i = 0;
    while (i < n) {
        int32_t cp;
        utf8proc_ssize_t k =
            utf8proc_iterate((const uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        i += (size_t)k; /* validated by the caller */
        int f = char_flags(tok, cp);
        if (f & CF_DROP) continue;
        if (!cpbuf_reserve(out, 3)) return 0;
        if (f & CF_SPACE) {
            out->v[out->n++] = ' ';
        } else if (tok->info.tokenize_chinese_chars && is_cjk(cp)) {
            out->v[out->n++] = ' ';
            out->v[out->n++] = cp;
            out->v[out->n++] = ' ';
        } else {
            out->v[out->n++] = cp;
        }
    }
    return 1;
}

/* NFD (canonical decomposition + canonical ordering), then drop nonspacing marks (Mn). */
static int normalize_strip_accents(const cpbuf *in, cpbuf *out) {
    out->n = 0;
    for (size_t i = 0; i < in->n; i++) {
        if (!cpbuf_reserve(out, 4)) return 0; /* canonical decompositions are <= 4 long */
        if (in->v[i] < 128) { /* ASCII: no decomposition, no combining class, no marks */
            out->v[out->n++] = in->v[i];
            continue;
        }
        for (;;) {
            size_t room = out->cap - out->n;
            utf8proc_ssize_t k = utf8proc_decompose_char(
                in->v[i], out->v + out->n, (utf8proc_ssize_t)room, UTF8PROC_DECOMPOSE, NULL);
            if (k < 0) return 0; /* cannot happen for a valid scalar value */
            if ((size_t)k <= room) {
                out->n += (size_t)k;
                break;
            }
            if (!cpbuf_reserve(out, (size_t)k)) return 0;
        }
    }
    /* Canonical ordering: stable sort of each run of nonzero combining classes. Mn marks go
     * away below, but other classed marks (some Mc) stay, so their order must be NFD's. */
    for (size_t i = 1; i < out->n; i++) {
        size_t j = i;
        if (out->v[j] < 128) continue;
        while (j > 0) {
            int c1 = utf8proc_get_property(out->v[j - 1])->combining_class;
            int c2 = utf8proc_get_property(out->v[j])->combining_class;
            if (c2 == 0 || c1 <= c2) break;
            int32_t t = out->v[j - 1];
            out->v[j - 1] = out->v[j];
            out->v[j] = t;
            j--;
        }
    }
    size_t w = 0;
    for (size_t i = 0; i < out->n; i++)
        if (out->v[i] < 128 || cat_of(out->v[i]) != UTF8PROC_CATEGORY_MN) out->v[w++] = out->v[i];
    out->n = w;
    return 1;
}

/* Full lower-case mapping as Rust's char::to_lowercase: the simple mapping, except U+0130
 * whose unconditional special casing is "i" + U+0307 (it only matters without accent
 * stripping, since NFD already splits U+0130 into I + U+0307). */
static int normalize_lower(const levi_tokenizer *tok, const cpbuf *in, cpbuf *out) {
    out->n = 0;
    for (size_t i = 0; i < in->n; i++) {
        if (!cpbuf_reserve(out, 2)) return 0;
        int32_t cp = in->v[i];
        if (cp < 128) {
            out->v[out->n++] = tok->ascii_lower[cp];
        } else if (cp == 0x130) {
            out->v[out->n++] = 'i';
            out->v[out->n++] = 0x307;
        } else {
            out->v[out->n++] = utf8proc_tolower(cp);
        }
    }
    return 1;
}

/* ---- WordPiece ------------------------------------------------------------------------ */

typedef struct emitter {
    int32_t *ids;
    int n, limit; /* limit: word pieces kept (max_len - 2) */
} emitter;

static int emit(emitter *e, int32_t id) {
    if (e->n >= e->limit) return 0;
    e->ids[e->n++] = id;
    return e->n < e->limit;
}

/* Greedy longest-match of one word (cps[0..n), n >= 1). Returns 0 once the emitter is
 * full, so the caller stops: truncation keeps a prefix, so nothing later can matter. */
static int wordpiece(const levi_tokenizer *tok, const int32_t *cps, size_t n, emitter *e) {
    if (n > WORD_MAX_CHARS) return emit(e, tok->info.unk_id);
    /* word bytes after a "##" slot, with char-start flags: a piece never splits a char */
    char buf[CONT_PREFIX_LEN + 4 * WORD_MAX_CHARS];
    uint8_t starts[4 * WORD_MAX_CHARS + 1];
    char *word = buf + CONT_PREFIX_LEN;
    size_t nb = 0;
    for (size_t i = 0; i < n; i++) {
        starts[nb] = 1;
        utf8proc_ssize_t k = utf8proc_encode_char(cps[i], (uint8_t *)word + nb);
        for (utf8proc_ssize_t j = 1; j < k; j++) starts[nb + (size_t)j] = 0;
        nb += (size_t)k;
    }
    starts[nb] = 1;

    int32_t pieces[WORD_MAX_CHARS];
    int n_pieces = 0;
    size_t start = 0;
    while (start < nb) {
        size_t prefix = start > 0 ? CONT_PREFIX_LEN : 0;
        /* no vocabulary entry is longer than max_token_bytes: skip hopeless candidates */
        int room = tok->max_token_bytes - (int)prefix;
        size_t end = room <= 0 ? start : nb;
        if (room > 0 && end - start > (size_t)room) end = start + (size_t)room;
        int32_t id = -1;
        for (; end > start; end--) {
            if (!starts[end]) continue;
            if (prefix) {
                /* the bytes before start are already consumed, so the slot in front of the
                 * piece can be overwritten with "##" and restored afterwards */
                char saved[CONT_PREFIX_LEN];
                memcpy(saved, word + start - CONT_PREFIX_LEN, CONT_PREFIX_LEN);
                memcpy(word + start - CONT_PREFIX_LEN, CONT_PREFIX, CONT_PREFIX_LEN);
                id = vocab_lookup(tok, word + start - CONT_PREFIX_LEN, end - start + prefix);
                memcpy(word + start - CONT_PREFIX_LEN, saved, CONT_PREFIX_LEN);
            } else {
                id = vocab_lookup(tok, word, end - start);
            }
            if (id >= 0) break;
        }
        if (id < 0) return emit(e, tok->info.unk_id);
        pieces[n_pieces++] = id;
        start = end;
    }
    for (int i = 0; i < n_pieces; i++)
        if (!emit(e, pieces[i])) return 0;
    return 1;
}

/* Normalizes, pre-tokenizes and WordPiece-encodes bytes [s, s+n). Returns -1 on out of
 * memory, 0 when the emitter filled up, 1 otherwise. */
static int encode_segment(const levi_tokenizer *tok, const char *s, size_t n, scratch *sc,
                          emitter *e) {
    if (n == 0) return 1;
    cpbuf *cur = &sc->a, *other = &sc->b;
    if (!normalize_clean(tok, s, n, cur)) return -1;
    if (tok->info.strip_accents) {
        if (!normalize_strip_accents(cur, other)) return -1;
        cpbuf *t = cur;
        cur = other;
        other = t;
    }
    if (tok->info.lowercase) {
        if (!normalize_lower(tok, cur, other)) return -1;
        cpbuf *t = cur;
        cur = other;
        other = t;
    }
    size_t word_start = 0;
    for (size_t i = 0; i <= cur->n; i++) {
        int32_t cp = i < cur->n ? cur->v[i] : ' ';
        int f = char_flags(tok, cp);
        int ws = (f & CF_SPACE) != 0, punct = !ws && (f & CF_PUNCT);
        if (!ws && !punct) continue;
        if (i > word_start && !wordpiece(tok, cur->v + word_start, i - word_start, e)) return 0;
        if (punct && !wordpiece(tok, cur->v + i, 1, e)) return 0;
        word_start = i + 1;
    }
    return 1;
}

static levi_status check_utf8(const char *text, size_t *len_out, levi_error *err) {
    const uint8_t *p = (const uint8_t *)text;
    size_t i = 0;
    while (p[i]) {
        int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(p + i, -1, &cp);
        if (k < 0)
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "text is not valid UTF-8 at byte offset %zu (byte 0x%02X); "
                               "transcode it (e.g. from Latin-1) before tokenizing",
                               i, p[i]);
        i += (size_t)k;
    }
    *len_out = i;
    return LEVI_OK;
}

/* Encodes one text into ids[0..limit+2) with scratch reused across a batch. */
static levi_status encode_one(const levi_tokenizer *tok, const char *text, int max_len,
                              int32_t *ids, int *n_out, scratch *sc, levi_error *err) {
    *n_out = 0;
    LEVI_ASSERT(tok != NULL && text != NULL && ids != NULL, "tokenizer, text and ids are required");
    size_t len = 0;
    levi_status st = check_utf8(text, &len, err);
    if (st != LEVI_OK) return st;
    emitter e = {ids + 1, 0, max_len - 2};
    size_t seg = 0, i = 0;
    int go = e.limit > 0;
    while (go && i < len) {
        int best = -1;
        if (tok->special_first[(uint8_t)text[i]])
            for (int k = 0; k < tok->n_special; k++)
                if (tok->special_len[k] <= len - i &&
                    memcmp(text + i, tok->special_str[k], tok->special_len[k]) == 0 &&
                    (best < 0 || tok->special_len[k] > tok->special_len[best]))
                    best = k;
        if (best < 0) {
            i++;
            continue;
        }
        int r = encode_segment(tok, text + seg, i - seg, sc, &e);
        if (r < 0)
            return levi_errorf(err, LEVI_ERR_NOMEM, "out of memory tokenizing %zu bytes", len);
        go = r > 0 && emit(&e, tok->special_id[best]);
        i += tok->special_len[best];
        seg = i;
    }
    if (go) {
        int r = encode_segment(tok, text + seg, len - seg, sc, &e);
        if (r < 0)
            return levi_errorf(err, LEVI_ERR_NOMEM, "out of memory tokenizing %zu bytes", len);
    }
    ids[0] = tok->info.cls_id;
    ids[e.n + 1] = tok->info.sep_id;
    *n_out = e.n + 2;
    return LEVI_OK;
}

static levi_status resolve_max_len(const levi_tokenizer *tok, int max_len, int *out,
                                   levi_error *err) {
    if (max_len <= 0) max_len = tok->info.model_max_length;
    if (max_len < 2)
        return levi_errorf(err, LEVI_ERR_ARG,
                           "max_len %d leaves no room for [CLS] and [SEP]: expected >= 2 (or <= 0 "
                           "for model_max_length %d)",
                           max_len, tok->info.model_max_length);
    *out = max_len;
    return LEVI_OK;
}

levi_status levi_tokenizer_encode(const levi_tokenizer *tok, const char *utf8_text, int max_len,
                                  int32_t *ids, int *n_out, levi_error *err) {
    LEVI_ASSERT(n_out != NULL, "n_out is required");
    *n_out = 0;
    LEVI_ASSERT(tok != NULL, "open the tokenizer first");
    levi_status st = resolve_max_len(tok, max_len, &max_len, err);
    if (st != LEVI_OK) return st;
    scratch sc;
    scratch_init(&sc);
    st = encode_one(tok, utf8_text, max_len, ids, n_out, &sc, err);
    scratch_free(&sc);
    return st;
}

levi_status levi_tokenizer_encode_batch(const levi_tokenizer *tok, const char *const *texts, int n,
                                        int max_len, int pad_to, int32_t *ids, int32_t *mask,
                                        int *seq_len_out, levi_error *err) {
    LEVI_ASSERT(seq_len_out != NULL, "seq_len_out is required");
    *seq_len_out = 0;
    LEVI_ASSERT(tok != NULL && n >= 0 && (n == 0 || (texts != NULL && ids != NULL)),
                "tokenizer, texts and ids are required; n >= 0");
    levi_status st = resolve_max_len(tok, max_len, &max_len, err);
    if (st != LEVI_OK) return st;
    if (pad_to < 0 || pad_to == 1)
        return levi_errorf(err, LEVI_ERR_ARG, "pad_to %d: expected 0 (pad to the longest) or >= 2",
                           pad_to);
    int limit = pad_to > 0 && pad_to < max_len ? pad_to : max_len;
    /* Rows are written at stride `stride` first; with pad_to == 0 they are compacted to the
     * longest length afterwards, moving each row to a lower address, in order. */
    size_t stride = pad_to > 0 ? (size_t)pad_to : (size_t)max_len;
    int *lens = malloc((size_t)(n > 0 ? n : 1) * sizeof(int));
    if (!lens) return levi_errorf(err, LEVI_ERR_NOMEM, "out of memory for a batch of %d texts", n);
    scratch sc;
    scratch_init(&sc);
    int seq_len = pad_to;
    for (int i = 0; i < n; i++) {
        st = encode_one(tok, texts[i], limit, ids + (size_t)i * stride, &lens[i], &sc, err);
        if (st != LEVI_OK) {
            levi_error_prefix(err, "text %d of %d: ", i, n);
            break;
        }
        if (pad_to == 0 && lens[i] > seq_len) seq_len = lens[i];
    }
    scratch_free(&sc);
    if (st == LEVI_OK) {
        int32_t pad = tok->info.pad_id;
        for (int i = 0; i < n; i++) {
            int32_t *row = ids + (size_t)i * (size_t)seq_len;
            if (row != ids + (size_t)i * stride)
                memmove(row, ids + (size_t)i * stride, (size_t)lens[i] * sizeof(int32_t));
            for (int j = lens[i]; j < seq_len; j++) row[j] = pad;
            if (mask) {
                int32_t *m = mask + (size_t)i * (size_t)seq_len;
                for (int j = 0; j < seq_len; j++) m[j] = j < lens[i];
            }
        }
        *seq_len_out = seq_len;
    }
    free(lens);
    return st;
}

/* ---- loading -------------------------------------------------------------------------- */

static void tokenizer_free_parts(levi_tokenizer *tok) {
    free(tok->blob);
    free(tok->tok_off);
    free(tok->tok_len);
    free(tok->table);
    free(tok);
}

void levi_tokenizer_close(levi_tokenizer *tok) {
    if (tok) tokenizer_free_parts(tok);
}

static int line_of(const char *base, size_t off) {
    int line = 1;
    for (size_t i = 0; i < off; i++) line += base[i] == '\n';
    return line;
}

/* Splits vocab.txt in place into NUL-terminated tokens and builds the hash table. */
static levi_status load_vocab(levi_tokenizer *tok, const char *path, levi_error *err) {
    size_t len;
    levi_status st = levi_read_file(path, &tok->blob, &len, err);
    if (st != LEVI_OK) return st;
    char *s = tok->blob;
    if (len >= UINT32_MAX)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: %zu bytes, expected < 4 GiB", path, len);
    size_t lines = 0;
    for (size_t i = 0; i < len; i++) lines += s[i] == '\n';
    if (len > 0 && s[len - 1] != '\n') lines++; /* last line without a newline */
    if (lines == 0)
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: empty vocabulary, expected one token per line", path);
    if (lines > (size_t)INT32_MAX / 4)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: %zu lines, too many tokens", path, lines);
    uint32_t cap = 1;
    while (cap < 2 * lines) cap <<= 1;
    tok->tok_off = malloc(lines * sizeof(uint32_t));
    tok->tok_len = malloc(lines * sizeof(uint32_t));
    tok->table = malloc((size_t)cap * sizeof(int32_t));
    if (!tok->tok_off || !tok->tok_len || !tok->table)
        return levi_errorf(err, LEVI_ERR_NOMEM, "%s: out of memory for %zu tokens", path, lines);
    memset(tok->table, 0xff, (size_t)cap * sizeof(int32_t));
    tok->table_mask = cap - 1;

    size_t pos = 0;
    for (size_t id = 0; id < lines; id++) {
        size_t start = pos;
        while (pos < len && s[pos] != '\n') pos++;
        size_t end = pos;
        if (end > start && s[end - 1] == '\r') end--; /* CRLF files */
        s[end] = 0;
        pos++;
        size_t n = end - start;
        int line = (int)id + 1;
        if (n == 0)
            return levi_errorf(err, LEVI_ERR_FORMAT,
                               "%s: line %d is empty, expected one token per line (an empty "
                               "line would shift every later id)",
                               path, line);
        for (size_t i = start; i < end;) {
            int32_t cp;
            utf8proc_ssize_t k =
                utf8proc_iterate((const uint8_t *)s + i, (utf8proc_ssize_t)(end - i), &cp);
            if (k < 0)
                return levi_errorf(err, LEVI_ERR_FORMAT,
                                   "%s: line %d: token is not valid UTF-8 at byte %zu of the line",
                                   path, line, i - start);
            i += (size_t)k;
        }
        tok->tok_off[id] = (uint32_t)start;
        tok->tok_len[id] = (uint32_t)n;
        uint32_t h = hash_bytes(s + start, n) & tok->table_mask;
        while (tok->table[h] >= 0) {
            int32_t other = tok->table[h];
            if (tok->tok_len[other] == n && memcmp(s + tok->tok_off[other], s + start, n) == 0)
                return levi_errorf(err, LEVI_ERR_FORMAT,
                                   "%s: line %d: duplicate token \"%s\" (first at line %d)", path,
                                   line, s + start, (int)other + 1);
            h = (h + 1) & tok->table_mask;
        }
        tok->table[h] = (int32_t)id;
        if ((int)n > tok->max_token_bytes) tok->max_token_bytes = (int)n;
    }
    tok->info.vocab_size = (int)lines;
    return LEVI_OK;
}

static const char *json_type_name(const cJSON *v) {
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "an invalid value";
}

/* A boolean field; absent leaves *out unchanged. */
static levi_status config_bool(const cJSON *root, const char *key, int *out, const char *path,
                               levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v) return LEVI_OK;
    if (!cJSON_IsBool(v))
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: field \"%s\": expected true or false, found %s", path, key,
                           json_type_name(v));
    *out = cJSON_IsTrue(v);
    return LEVI_OK;
}

/* Special token spelling: a string, or an AddedToken object {"content": "..."}. */
static levi_status config_token(const cJSON *root, const char *key, char *out, size_t cap,
                                const char *path, levi_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) return LEVI_OK;
    const cJSON *s = cJSON_IsObject(v) ? cJSON_GetObjectItemCaseSensitive(v, "content") : v;
    if (!cJSON_IsString(s) || !s->valuestring[0])
        return levi_errorf(err, LEVI_ERR_FORMAT,
                           "%s: field \"%s\": expected a non-empty string or an object with a "
                           "string \"content\", found %s",
                           path, key, json_type_name(s ? s : v));
    if (strlen(s->valuestring) >= cap)
        return levi_errorf(err, LEVI_ERR_FORMAT, "%s: field \"%s\": token longer than %zu bytes",
                           path, key, cap - 1);
    strcpy(out, s->valuestring);
    return LEVI_OK;
}

#define SPECIAL_MAX 64

static levi_status load_config(levi_tokenizer *tok, const char *path,
                               char special[SPECIAL_COUNT][SPECIAL_MAX], levi_error *err) {
    char *text = NULL;
    size_t len;
    FILE *probe = fopen(path, "rb");
    if (!probe) {
        if (errno == ENOENT) return LEVI_OK; /* optional: BERT defaults */
        return levi_errorf(err, LEVI_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    fclose(probe);
    levi_status st = levi_read_file(path, &text, &len, err);
    if (st != LEVI_OK) return st;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    if (!root || !cJSON_IsObject(root)) {
        if (!root) {
            size_t off = end && end >= text ? (size_t)(end - text) : 0;
            if (off > len) off = len;
            size_t col = 1;
            for (size_t i = off; i > 0 && text[i - 1] != '\n'; i--) col++;
            int near = 0; /* excerpt up to 20 bytes, not past the end of the line */
            while (near < 20 && text[off + (size_t)near] && text[off + (size_t)near] != '\n')
                near++;
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: line %d, column %zu (byte %zu): not valid JSON near \"%.*s\"",
                             path, line_of(text, off), col, off, near, text + off);
        } else {
            st = levi_errorf(err, LEVI_ERR_FORMAT, "%s: expected a JSON object, found %s", path,
                             json_type_name(root));
        }
        cJSON_Delete(root);
        free(text);
        return st;
    }
    st = config_bool(root, "do_lower_case", &tok->info.lowercase, path, err);
    if (st == LEVI_OK)
        st = config_bool(root, "tokenize_chinese_chars", &tok->info.tokenize_chinese_chars, path,
                         err);
    /* strip_accents null or absent means "same as lowercase", as in BertNormalizer */
    const cJSON *sa = cJSON_GetObjectItemCaseSensitive(root, "strip_accents");
    if (st == LEVI_OK && sa && !cJSON_IsNull(sa) && !cJSON_IsBool(sa))
        st = levi_errorf(err, LEVI_ERR_FORMAT,
                         "%s: field \"strip_accents\": expected true, false or null, found %s",
                         path, json_type_name(sa));
    tok->info.strip_accents = sa && cJSON_IsBool(sa) ? cJSON_IsTrue(sa) : tok->info.lowercase;
    const cJSON *mml = cJSON_GetObjectItemCaseSensitive(root, "model_max_length");
    if (st == LEVI_OK && mml) {
        double d = cJSON_IsNumber(mml) ? mml->valuedouble : 0;
        if (!cJSON_IsNumber(mml) || !(d >= 2) || (d <= MODEL_MAX_LENGTH_CAP && d != (double)(int)d))
            st = levi_errorf(
                err, LEVI_ERR_FORMAT,
                "%s: field \"model_max_length\": expected an integer >= 2, found %s", path,
                cJSON_IsNumber(mml) ? "a smaller or fractional number" : json_type_name(mml));
        else
            tok->info.model_max_length = d > MODEL_MAX_LENGTH_CAP ? MODEL_MAX_LENGTH_CAP : (int)d;
    }
    for (int k = 0; k < SPECIAL_COUNT && st == LEVI_OK; k++)
        st = config_token(root, special_keys[k], special[k], SPECIAL_MAX, path, err);
    cJSON_Delete(root);
    free(text);
    return st;
}

levi_tokenizer *levi_tokenizer_open(const char *model_dir, levi_error *err) {
    LEVI_ASSERT(model_dir != NULL, "model_dir is required");
    levi_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) {
        levi_errorf(err, LEVI_ERR_NOMEM, "out of memory opening a tokenizer");
        return NULL;
    }
    tok->info.lowercase = 1;
    tok->info.strip_accents = 1;
    tok->info.tokenize_chinese_chars = 1;
    tok->info.model_max_length = 512;
    char special[SPECIAL_COUNT][SPECIAL_MAX];
    for (int k = 0; k < SPECIAL_COUNT; k++) strcpy(special[k], special_defaults[k]);

    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model_dir);
    levi_status st = load_config(tok, path, special, err);
    if (st == LEVI_OK) {
        snprintf(path, sizeof path, "%s/vocab.txt", model_dir);
        st = load_vocab(tok, path, err);
    }
    int32_t ids[SPECIAL_COUNT];
    for (int k = 0; k < SPECIAL_COUNT && st == LEVI_OK; k++) {
        ids[k] = vocab_lookup(tok, special[k], strlen(special[k]));
        if (ids[k] < 0 && k != SPECIAL_MASK)
            st = levi_errorf(err, LEVI_ERR_FORMAT,
                             "%s: no line holds the %s \"%s\" (expected it in the vocabulary)",
                             path, special_keys[k], special[k]);
    }
    if (st != LEVI_OK) {
        tokenizer_free_parts(tok);
        return NULL;
    }
    tok->info.unk_id = ids[SPECIAL_UNK];
    tok->info.sep_id = ids[SPECIAL_SEP];
    tok->info.pad_id = ids[SPECIAL_PAD];
    tok->info.cls_id = ids[SPECIAL_CLS];
    tok->info.mask_id = ids[SPECIAL_MASK];
    for (int k = 0; k < SPECIAL_COUNT; k++) {
        if (ids[k] < 0) continue;
        /* point into the blob so the strings live as long as the handle */
        tok->special_str[tok->n_special] = tok->blob + tok->tok_off[ids[k]];
        tok->special_len[tok->n_special] = tok->tok_len[ids[k]];
        tok->special_id[tok->n_special] = ids[k];
        tok->special_first[(uint8_t)tok->special_str[tok->n_special][0]] = 1;
        tok->n_special++;
    }
    for (int32_t c = 0; c < 128; c++) {
        tok->ascii_flags[c] = (uint8_t)char_flags_slow(c);
        tok->ascii_lower[c] = utf8proc_tolower(c);
    }
    return tok;
}

/* ---- accessors ------------------------------------------------------------------------ */

levi_tokenizer_info levi_tokenizer_get_info(const levi_tokenizer *tok) {
    LEVI_ASSERT(tok != NULL, "open the tokenizer first");
    return tok->info;
}
int levi_tokenizer_vocab_size(const levi_tokenizer *tok) {
    return levi_tokenizer_get_info(tok).vocab_size;
}
int levi_tokenizer_model_max_length(const levi_tokenizer *tok) {
    return levi_tokenizer_get_info(tok).model_max_length;
}
int32_t levi_tokenizer_token_id(const levi_tokenizer *tok, const char *token) {
    LEVI_ASSERT(tok != NULL && token != NULL, "tokenizer and token are required");
    return vocab_lookup(tok, token, strlen(token));
}
const char *levi_tokenizer_token(const levi_tokenizer *tok, int32_t id) {
    LEVI_ASSERT(tok != NULL, "open the tokenizer first");
    if (id < 0 || id >= tok->info.vocab_size) return NULL;
    return tok->blob + tok->tok_off[id];
}
int32_t levi_tokenizer_cls_id(const levi_tokenizer *tok) {
    return levi_tokenizer_get_info(tok).cls_id;
}
int32_t levi_tokenizer_sep_id(const levi_tokenizer *tok) {
    return levi_tokenizer_get_info(tok).sep_id;
}
int32_t levi_tokenizer_pad_id(const levi_tokenizer *tok) {
    return levi_tokenizer_get_info(tok).pad_id;
}
int32_t levi_tokenizer_unk_id(const levi_tokenizer *tok) {
    return levi_tokenizer_get_info(tok).unk_id;
}
