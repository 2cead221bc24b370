/* levi tokenizer: BERT WordPiece tokenization that reproduces Hugging Face's
 * BertTokenizerFast (tokenizers' BertNormalizer + BertPreTokenizer + WordPiece + the
 * "[CLS] A [SEP]" template) id for id, for single sequences.
 *
 * Reads <model_dir>/vocab.txt (one token per line, id = line number - 1) and, when present,
 * <model_dir>/tokenizer_config.json (do_lower_case, strip_accents, tokenize_chinese_chars,
 * model_max_length and the special token strings). tokenizer.json is not read.
 *
 * Pipeline of one text (the order matters and is the Rust one, not the Python slow one):
 *   1. the special tokens ([CLS] [SEP] [PAD] [UNK] [MASK], as spelled in the config) are
 *      matched in the raw text, case-sensitively, and map to their ids;
 *   2. the rest is cleaned (NUL, U+FFFD, categories Cc/Cf/Co/Cs other than \t \n \r are
 *      removed; White_Space characters become ' '), CJK ideographs get spaces around them,
 *      accents are stripped (NFD, then Mn removed), then text is lower-cased;
 *   3. split on whitespace and around every punctuation character (ASCII punctuation or
 *      Unicode P*);
 *   4. greedy longest-match WordPiece with "##" continuations; a word longer than 100 code
 *      points, or one that cannot be covered, becomes one [UNK].
 *
 * Agreement is checked on every Unicode scalar value (tests/ref/tokenizer_codepoints.txt)
 * and on ~1900 real and edge-case texts (tests/ref/tokenizer_cases.jsonl).
 *
 * Input must be valid UTF-8. Invalid UTF-8 (for example Latin-1 bytes) is rejected with
 * LEVI_ERR_FORMAT naming the byte offset and byte, never silently dropped: dropping would
 * turn "Cit\xe9" into "cit" and hide a data-layer bug. Transcode before calling.
 *
 * Not for: sentence pairs (token_type_ids are all zero for single sequences, so none are
 * produced), offsets, decoding ids back to text, or tokenizers other than BERT WordPiece.
 *
 * Thread safety: the handle is read-only after levi_tokenizer_open; encode functions may be
 * called concurrently on one handle (they allocate their own scratch).
 */
#ifndef LEVI_TOKENIZER_H
#define LEVI_TOKENIZER_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct levi_tokenizer levi_tokenizer;

/* What was read from the model folder. */
typedef struct levi_tokenizer_info {
    int vocab_size;
    int lowercase;              /* do_lower_case (default 1) */
    int strip_accents;          /* strip_accents, or do_lower_case when null/absent */
    int tokenize_chinese_chars; /* default 1 */
    int model_max_length;       /* default 512; values above 1<<30 are clamped */
    int32_t pad_id, unk_id, cls_id, sep_id;
    int32_t mask_id; /* -1 when the vocabulary has no mask token */
} levi_tokenizer_info;

/* Opens <model_dir>/vocab.txt and, if it exists, <model_dir>/tokenizer_config.json. On
 * failure returns NULL and fills err: LEVI_ERR_IO when vocab.txt cannot be read,
 * LEVI_ERR_FORMAT for an empty vocabulary, an empty or duplicate token (with its line), a
 * line that is not UTF-8, a special token absent from the vocabulary, or a config that is
 * not JSON (with line and column) or has a field of the wrong type (with expected vs
 * found). */
levi_tokenizer *levi_tokenizer_open(const char *model_dir, levi_error *err);
void levi_tokenizer_close(levi_tokenizer *tok); /* NULL is a no-op */

/* Encodes one NUL-terminated UTF-8 text as [CLS] tokens [SEP], keeping the first
 * max_len - 2 word pieces (Hugging Face truncation=True, max_length=max_len).
 * max_len <= 0 means model_max_length; max_len must otherwise be >= 2.
 * ids: room for max_len entries (the effective one). *n_out: number written (2..max_len).
 * Errors: LEVI_ERR_FORMAT for invalid UTF-8 (byte offset in the message), LEVI_ERR_ARG for
 * max_len == 1, LEVI_ERR_NOMEM. On error *n_out is 0. */
levi_status levi_tokenizer_encode(const levi_tokenizer *tok, const char *utf8_text, int max_len,
                                  int32_t *ids, int *n_out, levi_error *err);

/* Encodes n texts into row-major ids[n, seq_len] and mask[n, seq_len] (1 for tokens, 0 for
 * padding; mask may be NULL). Padding uses the pad token's id.
 *   pad_to == 0: seq_len = the longest encoded text (after truncation to max_len). ids and
 *                mask must have room for n * max_len entries, since seq_len is only known
 *                after encoding.
 *   pad_to > 0:  seq_len = pad_to, each text truncated to min(max_len, pad_to); ids and
 *                mask need n * pad_to entries. pad_to must be >= 2.
 * max_len <= 0 means model_max_length. Errors are those of levi_tokenizer_encode, prefixed
 * with the index of the offending text; on error *seq_len_out is 0. */
levi_status levi_tokenizer_encode_batch(const levi_tokenizer *tok, const char *const *texts, int n,
                                        int max_len, int pad_to, int32_t *ids, int32_t *mask,
                                        int *seq_len_out, levi_error *err);

/* Accessors. Returned strings live as long as the handle. */
levi_tokenizer_info levi_tokenizer_get_info(const levi_tokenizer *tok);
int levi_tokenizer_vocab_size(const levi_tokenizer *tok);
int levi_tokenizer_model_max_length(const levi_tokenizer *tok);
/* Id of an exact vocabulary entry (e.g. "##ing"), or -1. */
int32_t levi_tokenizer_token_id(const levi_tokenizer *tok, const char *token);
/* Vocabulary entry of an id, or NULL when id is out of range. */
const char *levi_tokenizer_token(const levi_tokenizer *tok, int32_t id);
int32_t levi_tokenizer_cls_id(const levi_tokenizer *tok);
int32_t levi_tokenizer_sep_id(const levi_tokenizer *tok);
int32_t levi_tokenizer_pad_id(const levi_tokenizer *tok);
int32_t levi_tokenizer_unk_id(const levi_tokenizer *tok);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_TOKENIZER_H */
