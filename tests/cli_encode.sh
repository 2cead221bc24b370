#!/usr/bin/env bash
# End-to-end test of `levi encode` (src/cli/encode.c) on 5 real text lines with
# all-MiniLM-L6-v2: output layout (safetensors header: tensor names, dtypes, shapes, metadata),
# determinism (a recompute in a fresh cache gives the same bytes), layer subsets (same bytes as
# the full run's tensor), the cache hit, and the exit codes for bad input and bad usage.
# Not for: numerical checks against PyTorch (tests/test_featcache.c and the BERT golden tests
# do that; CI has no torch).
# Usage: cli_encode.sh path/to/levi   (LEVI_MODEL_DIR must name the model folder; else skip 77)
set -u
LEVI="${1:?usage: cli_encode.sh path/to/levi}"
if [ -z "${LEVI_MODEL_DIR:-}" ] || [ ! -f "${LEVI_MODEL_DIR}/model.safetensors" ]; then
    echo "SKIP cli_encode: LEVI_MODEL_DIR is not set or has no model.safetensors" \
         "(needs the all-MiniLM-L6-v2 folder)"
    exit 77
fi
M="$LEVI_MODEL_DIR"
T="$(mktemp -d "${TMPDIR:-/tmp}/levi-cli-encode-XXXXXX")"
trap 'rm -rf "$T"' EXIT
export LEVI_PROGRESS=0
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
ok() { echo "ok: $*"; }

# expect_rc WANT DESCRIPTION -- command...
expect_rc() {
    local want="$1" what="$2"
    shift 3
    "$@" >"$T/out.log" 2>"$T/err.log"
    local rc=$?
    if [ "$rc" -eq "$want" ]; then ok "$what (exit $rc)"; else
        fail "$what: exit $rc, expected $want"; sed 's/^/    /' "$T/err.log"; fi
}

# header_json FILE: the safetensors JSON header (8-byte little-endian length, then JSON).
header_len() { od -An -t u8 -N 8 "$1" | tr -d ' '; }
header_json() { head -c $((8 + $(header_len "$1"))) "$1" | tail -c +9; }
# tensor_bytes FILE NAME: the raw bytes of one tensor, via its data_offsets.
tensor_bytes() {
    local h off begin end
    h="$(header_json "$1")"
    off="$(printf '%s' "$h" | grep -o "\"$2\":{[^}]*}" | grep -o '"data_offsets":\[[0-9]*,[0-9]*\]' |
        grep -o '[0-9]*,[0-9]*')"
    begin="${off%,*}"
    end="${off#*,}"
    tail -c +$((8 + $(header_len "$1") + begin + 1)) "$1" | head -c $((end - begin))
}

cat >"$T/texts.txt" <<'TXT'
When the user id is 138, the user occupation is doctor, the user zipcode is 53211, the movie title is One Flew Over the Cuckoo's Nest (1975), and the movie id is 357, what can be the user rating on this movie?:
When the user id is 92, the user occupation is librarian, the user zipcode is 95110, the movie title is Toy Story (1995), and the movie id is 1, what can be the user rating on this movie?:
Crème brûlée and café au lait.
A short one.
When the user id is 7, the user occupation is student, the movie title is Shanghai Triad (Yao a yao yao dao waipo qiao) (1995), what can be the user rating on this movie?:
TXT

# 1. Full run, f32, two layers.
expect_rc 0 "encode 5 lines" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/a.safetensors" --layers 0,6 --dtype f32 --cache "$T/cache" --threads 1 --batch 2
h="$(header_json "$T/a.safetensors")"
for name in layer.0 layer.6; do
    if printf '%s' "$h" | grep -q "\"$name\":{\"dtype\":\"F32\",\"shape\":\[5,384\]"; then
        ok "$name is F32 [5, 384]"
    else fail "$name missing or wrong: $h"; fi
done
if printf '%s' "$h" | grep -q '"layer.1"'; then fail "layer.1 written though not asked for"; fi
for kv in '"pooling":"mean"' '"layers":"0,6"' '"n":"5"' '"max_len":"128"' '"format":"levi-features"'; do
    if printf '%s' "$h" | grep -q "$kv"; then ok "metadata $kv"; else fail "metadata lacks $kv: $h"; fi
done
size=$(stat -c %s "$T/a.safetensors")
want=$((8 + $(header_len "$T/a.safetensors") + 2 * 5 * 384 * 4))
if [ "$size" -eq "$want" ]; then ok "file size $size"; else fail "file size $size, expected $want"; fi
if grep -q "1 chunk(s) computed" "$T/err.log"; then ok "computed"; else fail "no compute reported"; fi

# 2. Same request again: a cache hit with identical bytes.
expect_rc 0 "encode again" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/b.safetensors" --layers 0,6 --dtype f32 --cache "$T/cache"
if grep -q "cache hit" "$T/err.log"; then ok "cache hit"; else fail "expected a cache hit"; fi
if cmp -s "$T/a.safetensors" "$T/b.safetensors"; then ok "hit gives identical bytes"; else
    fail "hit output differs"; fi

# 3. A fresh cache, another batch size: recomputed, same numbers (padding changes nothing).
expect_rc 0 "encode in a fresh cache" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/c.safetensors" --layers 0,6 --dtype f32 --cache "$T/cache2" --batch 5
if cmp -s "$T/a.safetensors" "$T/c.safetensors"; then ok "recompute gives identical bytes"; else
    fail "recompute differs"; fi

# 4. One layer, default f16: the layer subset matches, values are half precision.
expect_rc 0 "encode layer 6 only (f32)" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/d.safetensors" --layers 6 --dtype f32 --cache "$T/cache"
if cmp -s <(tensor_bytes "$T/a.safetensors" layer.6) <(tensor_bytes "$T/d.safetensors" layer.6)
then ok "layer subset has the same layer.6"; else fail "layer.6 differs between runs"; fi
if [ "$(tensor_bytes "$T/a.safetensors" layer.6 | wc -c)" -eq $((5 * 384 * 4)) ]; then
    ok "tensor extraction"; else fail "tensor extraction from the header failed"; fi
expect_rc 0 "encode all layers f16" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/e.safetensors" --cache "$T/cache"
h="$(header_json "$T/e.safetensors")"
n_layers=$(printf '%s' "$h" | grep -o '"layer\.[0-9]*":{"dtype":"F16","shape":\[5,384\]' | wc -l)
if [ "$n_layers" -eq 7 ]; then ok "7 F16 layers"; else fail "expected 7 F16 layers: $h"; fi

# 5. Truncation is reported.
expect_rc 0 "encode with --max-len 16" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/f.safetensors" --max-len 16 --layers 6 --cache "$T/cache"
if grep -q "3 truncated at 16" "$T/err.log"; then ok "truncation counted"; else
    fail "expected 3 truncated at 16"; sed 's/^/    /' "$T/err.log"; fi

# 6. Exit codes and messages.
expect_rc 3 "missing input file" -- "$LEVI" encode --model "$M" --input "$T/none.txt" \
    --output "$T/x.safetensors" --cache "$T/cache"
grep -q "none.txt" "$T/err.log" || fail "message does not name the missing file"
expect_rc 2 "unknown option" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/x.safetensors" --frobnicate 3
grep -q "frobnicate" "$T/err.log" || fail "message does not name the unknown option"
printf 'fine\nCaf\xe9 latin-1\n' >"$T/latin1.txt"
expect_rc 3 "invalid UTF-8 line" -- "$LEVI" encode --model "$M" --input "$T/latin1.txt" \
    --output "$T/x.safetensors" --cache "$T/cache"
grep -q "latin1.txt:2:" "$T/err.log" || fail "message does not name file:line"
expect_rc 2 "bad --layers" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/x.safetensors" --layers 0,99 --cache "$T/cache"
expect_rc 2 "bad --pooling" -- "$LEVI" encode --model "$M" --input "$T/texts.txt" \
    --output "$T/x.safetensors" --pooling max
expect_rc 3 "model folder without files" -- "$LEVI" encode --model "$T" --input "$T/texts.txt" \
    --output "$T/x.safetensors"
expect_rc 0 "--help" -- "$LEVI" encode --help
grep -q -- "--max-len" "$T/out.log" || fail "--help does not describe --max-len"
[ -e "$T/x.safetensors" ] && fail "a failed run left an output file"

if [ "$fails" -ne 0 ]; then
    echo "cli_encode: $fails check(s) failed"
    exit 1
fi
echo "cli_encode: all checks passed"
