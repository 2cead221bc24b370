#!/usr/bin/env python3
"""Writes tests/ref/tokenizer_cases.jsonl: the ids Hugging Face's fast BERT tokenizer gives
for a few thousand texts, the reference that tests/test_tokenizer.c must match id for id.

For: pinning levi's tokenizer to transformers.AutoTokenizer (BertTokenizerFast) of
all-MiniLM-L6-v2. Not for: benchmarking or anything that needs the model weights.

Usage (paths are arguments, never written into the output):
  HF_HUB_OFFLINE=1 python gen_tokenizer_ref.py --model-dir DIR --data-dir DIR \
      --out tests/ref/tokenizer_cases.jsonl \
      [--codepoints-out tests/ref/tokenizer_codepoints.txt] [--codepoints-dump FILE]

One JSON object per line:
  {"kind": "single", "name", "text", "max_length", "ids", "mask"}
  {"kind": "single", "name", "source", "text_sha256", "max_length", "n_ids", "ids_sha256"}
  {"kind": "batch", "name", "texts", "max_length", "pad_to", "ids", "mask"}
  {"kind": "batch", "name", "texts", "max_length", "pad_to", "seq_len", "ids_sha256", "mask"}
pad_to 0 means padding=True (to the longest), otherwise padding="max_length" with
max_length=pad_to. ids_sha256 is the SHA-256 of the ids written as decimal numbers joined by
"," (e.g. "101,7592,102"); for a batch, of all rows' ids in order joined the same way.

Texts from the data sets are stored by reference ("source"), with hashes of the text and of
the ids: the GroupLens and Amazon terms forbid redistributing the data, and the ids would give
the (lower-cased) text back through vocab.txt. The C test rebuilds each text from
LEVI_DATA_DIR, checks text_sha256, then the ids. Sources:
  {"file", "review", "bytes"}  Amazon: the first `bytes` bytes of review number `review`
                               (from 0) of amazon/blitzer_mds/<file>
  {"ml_item": i}               the title (field 2) of item i in ml-100k/u.item, Latin-1
                               transcoded to UTF-8, kept as it is (trailing spaces too)
  {"ml_rating_line": n}        line n (from 1) "user item rating time" of ml-100k/u.data in
                               TEMPLATE, with the user's occupation and zip code from u.user
                               and the item's title as above
In a batch, a text by reference is an object {<source keys>, "text_sha256"}; such a batch
stores seq_len and ids_sha256 instead of the ids.

--codepoints-out writes, for every Unicode scalar value c except NUL (which a C string
cannot hold), the ids of the text CODEPOINT_TEXT below, as one SHA-256 per block of 4096
code points (ids of each code point written as "<c>:<id>,<id>,...\n", concatenated over the
block). That pins down every character's class (dropped, whitespace, split off, accent,
part of a word) and its case mapping and decomposition, in ~20 KB. --codepoints-dump writes
the same lines uncompressed (~30 MB) for finding the code point behind a failing block.

Inputs: every MovieLens-100k title and 50 rating-prompt sentences built from u.data/u.user/
u.item rows (by reference), ~100 Amazon review texts (by reference), and inline: hand-written
edge cases, synthetic MovieLens-like titles and prompts (made-up users, zip codes and titles
with the quirks of the real ones), truncation cases and batches.
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys

MAX_LENGTH = 256
CODEPOINT_BLOCK = 4096
# "a{c}b" shows whether c is dropped, a separator or part of a word; "{c}X{c}" shows the
# token c becomes at the start of a word and as a "##" continuation.
CODEPOINT_TEXT = "a{c}b {c}X{c}"
# The rating prompt of the MovieLens experiments; tests/test_tokenizer.c builds it the same way.
TEMPLATE = ("When the user id is {user}, the user occupation is {occupation}, the user zipcode is "
            "{zip}, the movie title is {title}, and the movie id is {item}, what can be the user "
            "rating on this movie?:")

EDGE_CASES = [
    ("empty", ""),
    ("spaces", "     "),
    ("whitespace_mix", " \t\n\r \u00a0\u2003\u3000 "),
    ("hello", "Hello, World!"),
    ("caps", "HELLO WoRLD ThIs Is MiXeD"),
    ("tabs_newlines", "col1\tcol2\tcol3\nrow two\r\nrow three"),
    ("controls", "bell\x07tab\there\x1b[0m del\x7f us\x1f"),
    ("vt_ff_nel", "a\x0bb\x0cc\x85d"),
    ("nbsp_em_ideo", "a\u00a0b\u2003c\u3000d\u202fe\u205ff"),
    ("line_para_sep", "line\u2028sep para\u2029sep"),
    ("zero_width", "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060wj"),
    ("soft_hyphen", "co\u00adoperate"),
    ("mongolian_vs", "a\u180eb"),
    ("replacement_char", "bad\ufffdchar \ufffd"),
    ("private_use", "a\ue000b \U000f0000 c"),
    ("unassigned", "\u0378x y\u0379"),
    ("tag_chars", "x\U000e0001y\U000e0041z"),
    ("emoji", "I love it \U0001F600\U0001F44D\U0001F3FD \u2764\ufe0f!"),
    ("emoji_zwj", "family \U0001F468\u200d\U0001F469\u200d\U0001F467 done"),
    ("emoji_new", "\U0001F970 \U0001FAE0 \U0001F980 party\U0001F973"),
    ("cjk", "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8"),
    ("japanese", "\u6771\u4eac\u30bf\u30ef\u30fc\u306f\u3069\u3053\u3067\u3059\u304b\uff1f"),
    ("korean", "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4"),
    ("arabic", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645"),
    ("arabic_harakat", "\u0627\u0644\u0652\u0639\u064e\u0631\u064e\u0628\u0650\u064a\u0651\u064e\u0629"),
    ("hebrew_niqqud", "\u05e9\u05b8\u05c1\u05dc\u05d5\u05b9\u05dd"),
    ("hindi", "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e"),
    ("thai", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a"),
    ("tamil", "\u0ba4\u0bae\u0bbf\u0bb4\u0bcd"),
    ("tibetan", "\u0f56\u0f7c\u0f51\u0f0b\u0f66\u0f90\u0f51"),
    ("greek", "\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5 \u0386\u0388\u0389"),
    ("greek_sigma", "\u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2 \u039f\u0394\u039f\u03a3"),
    ("greek_polytonic", "\u1f82 \u1f0d\u03b8\u1fc6\u03bd\u03b1\u03b9"),
    ("cyrillic", "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u0401\u043b\u043a\u0430 \u0419\u043e\u0434"),
    ("combining", "e\u0301cole cafe\u0301 n\u0303 a\u0308\u0304"),
    ("lone_combining", "\u0301 \u0308x"),
    ("accented_caps", "\u00c9COLE \u00d6STERREICH \u00d1AND\u00da \u00c5NGSTR\u00d6M"),
    ("accented_lower", "cit\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade se\u00f1or"),
    ("cite_title", "Cit\u00e9 des jouets fictifs, La (1995)"),
    ("vietnamese", "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u"),
    ("turkish", "\u011e\u00dc\u015e\u0130\u00d6\u00c7 \u011f\u00fc\u015f\u0131\u00f6\u00e7 \u0130stanbul"),
    ("polish", "Za\u017c\u00f3\u0142\u0107 g\u0119\u015bl\u0105 ja\u017a\u0144"),
    ("titlecase_digraphs", "\u01c5 \u01c8 \u01cb \u01f2"),
    ("ligatures", "\ufb01nance \ufb00 \ufb03 \u00c6sir \u0153uvre \u00df Stra\u00dfe \ufb06"),
    ("fullwidth", "\uff21\uff22\uff23\uff11\uff12\uff13\uff01"),
    ("compat_symbols", "\u216b \u2103 \u2122 \u00a9 \u2460\u2461 x\u00b2 \u00bd"),
    ("canonical_singletons", "\u212b \u2126 \u212a"),
    ("math", "x\u00b2 + y\u00b3 \u2264 \u00bd \u2211 \u221e \u2192 \u21d2 a=b<c>d^e|f~g"),
    ("cjk_compat", "\uf900\uf901 \ufa30"),
    ("cjk_ext_b", "\U00020000\U0002a6d6"),
    ("cjk_range_edges", "\U0002b81f\U0002b820\U0002b91f\U0002b920\U0002ceaf"),
    ("musical_ccc", "\U0001d15e\U0001d165\U0001d16e"),
    ("variation_selectors", "\u2764\ufe0e \u845b\U000e0100"),
    ("long_word_100", "a" * 100),
    ("long_word_101", "a" * 101),
    ("long_word_120", "supercalifragilistic" * 6),
    ("long_word_accents", "\u00e9" * 101),
    ("long_word_then_short", "x" * 150 + " ok"),
    ("numbers_punct", "3.14159 1,000,000 $19.99 50% 10-20 12:30pm +1-800-555-0199 #1 @home"),
    ("url", "https://www.example.com/path/to?q=1&x=%20y#frag"),
    ("email", "someone.else+tag@example.co.uk"),
    ("cls_literal", "[CLS] hello [SEP]"),
    ("special_literals", "[MASK]ed [PAD][UNK] x[CLS]y"),
    ("special_lower", "[cls] [sep] [Mask]"),
    ("special_only", "[SEP]"),
    ("unused_token", "[unused0] [unused1]"),
    ("quotes_dashes", "\u201csmart\u201d \u2018quotes\u2019 \u2013 \u2014 \u2026 \u00ab\u00bb \u00bf\u00a1"),
    ("apostrophes", "don't can't O'Neil rock'n'roll it\u2019s"),
    ("hyphens", "co-operate state-of-the-art re-enter"),
    ("repeated_punct", "!!!???...;;;---***"),
    ("abbreviations", "U.S.A. e.g. i.e. Mr. Dr. etc."),
    ("year_parens", "(1995) [1996] {1997}"),
    ("currency", "\u20ac100 \u00a350 \u00a51000 \u20b9 \u20bf"),
    ("wordpiece_split", "unaffable tokenization embeddings hyperparameters"),
    ("unknown_char_inside", "abc\u2603def"),
    ("mixed_scripts", "hello\u043c\u0438\u0440world\u4e16\u754c"),
    ("khmer", "\u1781\u17d2\u1798\u17c2\u179a"),
    ("many_words", " ".join(["word"] * 300)),
    ("many_pieces", "unbelievably" * 8 + " " + "tokenization " * 60),
]

TRUNCATION_CASES = [
    ("trunc_2", "Hello, World!", 2),
    ("trunc_3", "Hello, World!", 3),
    ("trunc_4", "Hello, World!", 4),
    ("trunc_midword", "unaffable tokenization", 4),
    ("trunc_special", "[CLS] [SEP] [MASK] a b", 5),
    ("trunc_exact", "one two three", 5),
    ("trunc_16", "When the user id is 90001, the user occupation is tester", 16),
]

# Made-up titles with the quirks of real u.item titles (articles moved to the end, Latin-1
# accents, alternative titles in parentheses, "(V)" suffixes, a trailing space, apostrophes,
# colons, digits), so that title-shaped text is checked without the data; none is a real title.
SYNTHETIC_TITLES = [
    "Test Movie A (1995)",
    "Imaginary Picture, The (1977)",
    "Caf\u00e9 des Tests, Le (1962)",
    "Made-Up Story: Part II (1991)",
    "Nobody's Film (Le film de personne) (1998)",
    "Se\u00f1or Placeholder & Se\u00f1ora (1950)",
    "Placeholder 3000 (V) (1996)",
    "\u00dcbungsfilm f\u00fcr Tests (1983)",
    "Dummy Title, A (1946) ",
    "\u00c0 c\u00f4t\u00e9 du n\u00e9ant (2001)",
    "L'Exemple fictif (1968)",
    "Mock-Up, Les (1937)",
    "Sample 9 1/2 Weeks Later (1999)",
    "Fictional Night of the Living Stubs (1971)",
    "Tu\u00f1o Bl\u00e5b\u00e6r \u00d8st (1989)",
    "Fake Movie B: The Return of Fake Movie A (1997)",
    "Stub, Stub, Stub! (1966)",
    "Unreal Story of St. Nobody, The (1940)",
    "X-Files Parody Test (1998)",
    "Kinderfilm \u00c4rger (Children's Trouble) (1993)",
]
SYNTHETIC_OCCUPATIONS = ["tester", "student", "engineer", "writer", "other", "none",
                         "programmer", "librarian", "artist", "retired"]


def synthetic_templates(n, rng, titles, users):
    """Rating prompts from made-up users: ids above MovieLens' 943 users and items above its
    1682, zip codes starting with "Z" (letters and digits mixed, as in the Canadian ones),
    synthetic titles; checked against the real files so that none is a real value."""
    real_zips = {u[3] for u in users.values()}
    real_titles = set(titles.values())
    out = []
    for k in range(n):
        if k % 3 == 0:
            zipc = f"Z{rng.randint(0, 9)}X{rng.randint(0, 9)}Q"
        else:
            zipc = f"ZZ{rng.randint(0, 999):03d}"
        title = SYNTHETIC_TITLES[k % len(SYNTHETIC_TITLES)]
        assert zipc not in real_zips and title not in real_titles, (zipc, title)
        out.append(TEMPLATE.format(user=rng.randint(10000, 99999),
                                   occupation=rng.choice(SYNTHETIC_OCCUPATIONS), zip=zipc,
                                   title=title, item=rng.randint(5000, 9999)))
    return out


def text_hash(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def id_hash(ids):
    return hashlib.sha256(",".join(str(i) for i in ids).encode()).hexdigest()


def load_movielens(data_dir):
    base = os.path.join(data_dir, "ml-100k")
    titles = {}
    with open(os.path.join(base, "u.item"), "rb") as f:
        for line in f.read().decode("latin-1").splitlines():
            if not line:
                continue
            fields = line.split("|")
            titles[int(fields[0])] = fields[1]
    users = {}
    with open(os.path.join(base, "u.user"), encoding="latin-1") as f:
        for line in f:
            uid, age, gender, occ, zipc = line.rstrip("\n").split("|")
            users[int(uid)] = (age, gender, occ, zipc)
    ratings = []  # (line number from 1, user, item)
    with open(os.path.join(base, "u.data")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            u, i, r, _ = line.split("\t")
            ratings.append((lineno, int(u), int(i)))
    return titles, users, ratings


def template_sentences(titles, users, ratings, n, rng):
    """(u.data line number, prompt) for n rating lines drawn with rng."""
    out = []
    # sampling indices draws the same rows as sampling the list itself did
    for k in rng.sample(range(len(ratings)), n):
        lineno, u, i = ratings[k]
        age, gender, occ, zipc = users[u]
        out.append((lineno, TEMPLATE.format(user=u, occupation=occ, zip=zipc, title=titles[i],
                                             item=i)))
    return out


def amazon_reviews(data_dir):
    """(relative file, review index, bytes of the review text) for every review."""
    root = os.path.join(data_dir, "amazon", "blitzer_mds")
    out = []
    for domain in sorted(os.listdir(root)):
        for name in ("negative.review", "positive.review"):
            rel = f"{domain}/{name}"
            path = os.path.join(root, rel)
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            # must match the C test: the bytes between "<review_text>\n" and "\n</review_text>"
            for k, m in enumerate(re.finditer(rb"<review_text>\n(.*?)\n</review_text>", data, re.S)):
                out.append((rel, k, m.group(1)))
    return out


def utf8_prefix(b, max_chars):
    """Byte length of the first max_chars characters of UTF-8 bytes b."""
    s = b.decode("utf-8")
    return len(s[:max_chars].encode("utf-8"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-amazon", type=int, default=100)
    ap.add_argument("--codepoints-out", help="per-block hashes over all code points")
    ap.add_argument("--codepoints-dump", help="the uncompressed per-code-point ids")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    assert tok.is_fast, "the reference must be the fast (Rust) tokenizer"
    rng = random.Random(20240601)
    lines = []

    def single(name, text, max_length=MAX_LENGTH):
        enc = tok(text, max_length=max_length, truncation=True)
        assert all(m == 1 for m in enc["attention_mask"])
        lines.append({"kind": "single", "name": name, "text": text, "max_length": max_length,
                      "ids": enc["input_ids"], "mask": enc["attention_mask"]})

    def single_ref(name, source, text, max_length=MAX_LENGTH):
        enc = tok(text, max_length=max_length, truncation=True)
        lines.append({"kind": "single", "name": name, "source": source,
                      "text_sha256": text_hash(text), "max_length": max_length,
                      "n_ids": len(enc["input_ids"]), "ids_sha256": id_hash(enc["input_ids"])})
        return len(tok(text)["input_ids"]) > max_length

    titles, users, ratings = load_movielens(args.data_dir)
    for i in sorted(titles):
        single_ref(f"movielens_title:{i}", {"ml_item": i}, titles[i])
    templates = template_sentences(titles, users, ratings, 50, rng)
    for k, (lineno, t) in enumerate(templates):
        single_ref(f"movielens_template:{k}", {"ml_rating_line": lineno}, t)
    for name, text in EDGE_CASES:
        single(f"edge:{name}", text)
    for name, text, ml in TRUNCATION_CASES:
        single(f"truncation:{name}", text, ml)
    # a separate generator, so that the Amazon draw below stays what it was
    synth_rng = random.Random(20240602)
    synth_templates = synthetic_templates(40, synth_rng, titles, users)
    for k, text in enumerate(SYNTHETIC_TITLES):
        single(f"synthetic_title:{k}", text)
    for k, text in enumerate(synth_templates):
        single(f"synthetic_template:{k}", text)

    # Amazon: a third of the sample has non-ASCII bytes, the rest is seeded; most are cut to
    # 600 characters, and ten reviews longer than 2000 bytes are kept whole (up to 4000
    # characters) so that truncation at 256 tokens is exercised on real text.
    reviews = amazon_reviews(args.data_dir)
    nonascii = [r for r in reviews if any(c > 127 for c in r[2])]
    rest = [r for r in reviews if not any(c > 127 for c in r[2])]
    n_long = 10
    long_pool = [r for r in rest if len(r[2]) > 2000]
    picked_long = rng.sample(long_pool, n_long)
    rest = [r for r in rest if r not in picked_long]
    picked = nonascii[: args.n_amazon // 3]
    picked += rng.sample(rest, args.n_amazon - n_long - len(picked))
    n_truncated = 0
    for k, (rel, idx, body) in enumerate(picked + picked_long):
        nbytes = utf8_prefix(body, 4000 if k >= len(picked) else 600)
        n_truncated += single_ref(f"amazon:{rel}#{idx}",
                                  {"file": rel, "review": idx, "bytes": nbytes},
                                  body[:nbytes].decode("utf-8"))

    # Batches: padding to the longest and to a fixed length, with truncation in play. A text
    # from the data is a (source, text) pair and goes into the file by reference.
    def title_ref(i):
        return ({"ml_item": i}, titles[i])

    def template_ref(k):
        return ({"ml_rating_line": templates[k][0]}, templates[k][1])

    batch_sets = [
        ("titles_longest", [title_ref(i) for i in (1, 2, 3, 200, 1682)], MAX_LENGTH, 0),
        ("templates_longest", [template_ref(k) for k in range(4)], MAX_LENGTH, 0),
        ("mixed_fixed_64", ["", "Hello, World!", template_ref(0), EDGE_CASES[20][1]], 64, 64),
        ("synthetic_titles_longest", SYNTHETIC_TITLES[:6], MAX_LENGTH, 0),
        ("synthetic_templates_longest", synth_templates[:4], MAX_LENGTH, 0),
        ("synthetic_mixed_fixed_64", ["", "Hello, World!", synth_templates[0], EDGE_CASES[20][1]],
         64, 64),
        ("mixed_fixed_8", ["short", "a much longer sentence that will be cut", "[CLS]"], 8, 8),
        ("single_longest", ["only one text here"], MAX_LENGTH, 0),
        ("all_empty", ["", "   "], MAX_LENGTH, 0),
    ]
    for name, items, ml, pad_to in batch_sets:
        padding = "max_length" if pad_to else True
        texts = [t if isinstance(t, str) else t[1] for t in items]
        enc = tok(texts, max_length=ml, truncation=True, padding=padding)
        obj = {"kind": "batch", "name": f"batch:{name}", "max_length": ml, "pad_to": pad_to}
        if all(isinstance(t, str) for t in items):
            obj.update({"texts": texts, "ids": enc["input_ids"]})
        else:
            obj["texts"] = [t if isinstance(t, str) else dict(t[0], text_sha256=text_hash(t[1]))
                            for t in items]
            obj.update({"seq_len": len(enc["input_ids"][0]),
                        "ids_sha256": id_hash([i for row in enc["input_ids"] for i in row])})
        obj["mask"] = enc["attention_mask"]
        lines.append(obj)

    with open(args.out, "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {len(lines)} cases to {args.out} ({os.path.getsize(args.out)} bytes; "
          f"{len(titles)} titles and {len(templates)} templates by reference, "
          f"{len(picked) + n_long} amazon of which {n_truncated} truncated, "
          f"{len(EDGE_CASES) + len(TRUNCATION_CASES)} edge, {len(SYNTHETIC_TITLES)} synthetic "
          f"titles, {len(synth_templates)} synthetic templates, {len(batch_sets)} batches)",
          file=sys.stderr)

    if args.codepoints_out or args.codepoints_dump:
        write_codepoints(tok, args.codepoints_out, args.codepoints_dump)


def write_codepoints(tok, out_path, dump_path):
    dump = open(dump_path, "w") if dump_path else None
    blocks = []
    for first in range(0, 0x110000, CODEPOINT_BLOCK):
        cps = [c for c in range(first, first + CODEPOINT_BLOCK)
               if c != 0 and not 0xD800 <= c <= 0xDFFF]
        h = hashlib.sha256()
        if cps:
            texts = [CODEPOINT_TEXT.format(c=chr(c)) for c in cps]
            enc = tok(texts, max_length=MAX_LENGTH, truncation=True)["input_ids"]
            for c, ids in zip(cps, enc):
                line = f"{c}:" + ",".join(str(i) for i in ids) + "\n"
                h.update(line.encode())
                if dump:
                    dump.write(line)
        blocks.append((first, first + CODEPOINT_BLOCK - 1, h.hexdigest()))
    if dump:
        dump.close()
    if out_path:
        with open(out_path, "w") as f:
            f.write("# levi tokenizer reference: SHA-256 of the ids of "
                    f"{CODEPOINT_TEXT!r} for every code point c\n")
            f.write("# except NUL and surrogates, per block; see gen_tokenizer_ref.py.\n")
            f.write("# first last sha256\n")
            for first, last, digest in blocks:
                f.write(f"{first} {last} {digest}\n")
        print(f"wrote {len(blocks)} code point blocks to {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
