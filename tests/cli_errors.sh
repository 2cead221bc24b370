#!/usr/bin/env bash
# Error handling of the levi CLI: every bad invocation or bad input exits with the documented
# code (2 usage, 3 bad input) and a message that names what was wrong (the option, the file,
# the field). Uses only small files it writes itself, so it needs no model or data.
#
#   tests/cli_errors.sh <levi binary>
# With LEVI_SOURCE_DIR set, also checks that the built-in movielens spec equals
# specs/movielens.json.
set -u
levi=${1:?usage: cli_errors.sh <levi binary>}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export LEVI_CACHE=$tmp/cache LEVI_PROGRESS=0
failures=0
n_checks=0

# expect CODE PATTERN -- levi args...: runs levi, checks the exit code and that stderr (or
# stdout for code 0) matches the extended regex PATTERN.
expect() {
    local code=$1 pattern=$2
    shift 3
    n_checks=$((n_checks + 1))
    "$levi" "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    local text
    if [ "$code" -eq 0 ]; then text=$(cat "$tmp/out"); else text=$(cat "$tmp/err"); fi
    if [ $rc -ne "$code" ]; then
        echo "FAIL: levi $* exited $rc, expected $code; stderr: $(head -3 "$tmp/err")"
        failures=$((failures + 1))
    elif ! grep -Eq -- "$pattern" <<<"$text"; then
        echo "FAIL: levi $*: output does not match /$pattern/: $text"
        failures=$((failures + 1))
    fi
}

# --- usage errors: exit 2, naming the command or option ---------------------------------
expect 2 "usage: levi"                -- 
expect 2 "unknown command 'frobnicate'" -- frobnicate
expect 2 "unknown option '--frob'"    -- --frob
expect 2 "missing the dataset"        -- fit
expect 2 "unknown option '--bogus'"   -- fit movielens --bogus
expect 2 "unknown option '--bogus'"   -- fit movielens --bogus=1
expect 2 "\-\-seeds: expected an integer in \[1, 32\], found '0'" -- fit movielens --seeds 0
expect 2 "\-\-seeds: expected an integer.*found 'x'" -- fit movielens --seeds x
expect 2 "\-\-lrs: expected .*found 'x'" -- fit movielens --lrs x
expect 2 "\-\-lrs: expected .*found '-1'" -- fit movielens --lrs=1e-3,-1
expect 2 "\-\-methods: unknown method 'nope'" -- fit movielens --methods levi,nope
expect 2 "\-\-subsample: expected .*found '0'" -- fit movielens --subsample 0
expect 2 "\-\-subsample: expected .*found '1.5'" -- fit movielens --subsample 1.5
expect 2 "\-\-epochs expects a value" -- fit movielens --epochs
expect 2 "\-\-batch: expected an integer" -- fit movielens --batch 0
expect 2 "\-\-feature-dropout: expected a probability in \[0, 1\), found '1'" -- fit movielens --feature-dropout 1
expect 2 "unexpected argument 'extra'" -- fit movielens extra
expect 2 "\-\-no-progress takes no value" -- fit movielens --no-progress=1
expect 2 "missing the output folder" -- eval
expect 2 "unknown option '--x'" -- eval "$tmp" --x
expect 2 "expected <out-dir> --method" -- predict "$tmp"
expect 2 "\-\-method: unknown method 'zz'" -- predict "$tmp" --method zz --input a.csv --output b.csv

# --- help and version: exit 0 ----------------------------------------------------------------
for c in fit eval predict encode; do expect 0 "^  $c " -- --help; done
expect 0 "130 +interrupted" -- --help
expect 0 "LEVI_CACHE" -- --help
expect 0 "LEVI_PROGRESS" -- --help
expect 0 "OMP_NUM_THREADS" -- --help
expect 0 "^levi [0-9]+\.[0-9]+" -- --version
expect 0 "\-\-subsample N\|FRAC" -- fit --help
expect 0 "usage: levi eval" -- eval --help
expect 0 "usage: levi predict" -- predict --help

# --- bad input: exit 3, naming the file and the field or line ------------------------------
cat >"$tmp/data.csv" <<'EOF'
u,i,g,y
u1,i1,a,4
u2,i2,a,3
u1,i2,b,5
u2,i1,a,2
u3,i1,a,4
u3,i2,b,1
EOF
good='{"name": "tiny", "source": {"reader": "csv", "path": "data.csv"},
 "label": {"column": "y", "task": "regression"}, "categorical": ["u", "i"],
 "shift": {"id": {"column": "g", "any_of": ["a"]}},
 "split": {"seed": 0, "train": 0.6, "val": 0.2, "test": 0.2}}'
echo "$good" >"$tmp/good.json"
echo "$good" | sed 's/"regression"/"regresion"/' >"$tmp/badfield.json"
echo "$good" | sed 's/"categorical"/"categoricals"/' >"$tmp/badkey.json"
echo "$good" | sed 's/data.csv/missing.csv/' >"$tmp/missing.json"
echo "$good" | sed 's/data.csv/short.csv/' >"$tmp/short.json"
echo "$good" | sed 's/"column": "y"/"column": "rating"/' >"$tmp/nocol.json"
{ cat "$tmp/data.csv"; echo "u1,i2,a"; } >"$tmp/short.csv"
echo '{"name": "broken",' >"$tmp/broken.json"
echo "$good" | sed 's/^{/{"hyperparameters": {"dropout": 0.1},/' >"$tmp/badhyper.json"
echo "$good" | sed 's/^{/{"hyperparameters": {"feature_dropout": 1.5},/' >"$tmp/badhyper2.json"
small=(--methods a4,bias --seeds 1 --epochs 1)

expect 3 "nope.json.*cannot open" -- fit "$tmp/nope.json" "${small[@]}"
expect 3 "badfield.json: label.task: expected .*found \"regresion\"" -- fit "$tmp/badfield.json" "${small[@]}"
expect 3 "badkey.json.*categoricals" -- fit "$tmp/badkey.json" "${small[@]}"
expect 3 "broken.json" -- fit "$tmp/broken.json" "${small[@]}"
expect 3 "missing.json: source.path.*missing.csv" -- fit "$tmp/missing.json" "${small[@]}"
expect 3 "short.csv:8: expected 4 fields, found 3" -- fit "$tmp/short.json" "${small[@]}"
expect 3 "nocol.json.*rating" -- fit "$tmp/nocol.json" "${small[@]}"
expect 3 "badhyper.json: hyperparameters.dropout: unknown hyperparameter \(known: feature_dropout\)" -- fit "$tmp/badhyper.json" "${small[@]}"
expect 3 "badhyper2.json: hyperparameters.feature_dropout: expected a probability in \[0, 1\), found 1.5" -- fit "$tmp/badhyper2.json" "${small[@]}"
expect 3 "\-\-data $tmp/nowhere" -- fit movielens --data "$tmp/nowhere" "${small[@]}"
expect 3 "nomodel.*model.safetensors" -- fit movielens --model "$tmp/nomodel" --methods levi
expect 3 "fit.json" -- eval "$tmp"
echo "user_id,item_id" >"$tmp/rows.csv"
expect 3 "fit.json" -- predict "$tmp" --method levi --input "$tmp/rows.csv" --output "$tmp/p.csv"

# A good spec works (the tiny data is enough for the cheap methods), and predict then names
# a missing input column with the file.
expect 0 "wrote .*results.json" -- fit "$tmp/good.json" "${small[@]}" --out "$tmp/tiny"
printf 'u\nu1\n' >"$tmp/rows1.csv"
expect 3 "rows1.csv:1: expected a column \"i\"" -- predict "$tmp/tiny" --method a4 --input "$tmp/rows1.csv" --output "$tmp/p.csv"
printf 'u,i\nu1,i9\n' >"$tmp/rows2.csv"
expect 0 "wrote 1 predictions" -- predict "$tmp/tiny" --method a4 --input "$tmp/rows2.csv" --output "$tmp/p.csv"
expect 2 "did not train it" -- predict "$tmp/tiny" --method levi --input "$tmp/rows2.csv" --output "$tmp/p.csv"

# --- the built-in spec is specs/movielens.json -------------------------------------------
if [ -n "${LEVI_SOURCE_DIR:-}" ] && [ -f "$LEVI_SOURCE_DIR/specs/movielens.json" ]; then
    n_checks=$((n_checks + 1))
    "$levi" fit movielens --print-spec >"$tmp/builtin.json"
    if ! cmp -s "$tmp/builtin.json" "$LEVI_SOURCE_DIR/specs/movielens.json"; then
        echo "FAIL: the built-in movielens spec differs from specs/movielens.json:"
        diff "$tmp/builtin.json" "$LEVI_SOURCE_DIR/specs/movielens.json" | head -10
        failures=$((failures + 1))
    fi
fi

if [ $failures -ne 0 ]; then
    echo "$failures of $n_checks checks failed"
    exit 1
fi
echo "ok: $n_checks checks"
