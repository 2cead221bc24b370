#!/usr/bin/env bash
# End-to-end test of `levi fit` with the Amazon reader ("reader": "amazon") on a tiny synthetic
# tree in the Blitzer multi-domain layout that this script writes to a temporary folder (raw
# '&' and '<' in texts, entities, a folder name with '&'): a rating task with a date cut and
# the bias model (no backbone needed), a malformed file (exit 3 with file:line), and, when
# LEVI_MODEL_DIR names all-MiniLM-L6-v2, the classification path (polarity from the review
# text, accuracy) and the text-to-rating regression through LEVI and a4.
#
#   tests/cli_amazon.sh <levi binary>
# The real Amazon files are never needed; the model-backed part is skipped without a model.
set -u
levi=${1:?usage: cli_amazon.sh <levi binary>}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export LEVI_CACHE=$tmp/cache LEVI_PROGRESS=0
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

months=(January February March April May June July August September October November December)
# gen_domain <root> <domain> <reviews per file>: positive texts praise, negative ones complain;
# even reviews are from 2005, odd ones from 2006.
gen_domain() {
    local root=$1 dom=$2 n=$3 pol i r words
    mkdir -p "$root/$dom"
    for pol in negative positive; do
        : >"$root/$dom/$pol.review"
        for ((i = 0; i < n; i++)); do
            if [ $pol = positive ]; then
                r=$((4 + i % 2))
                words="great & <wonderful> read, loved it"
            else
                r=$((1 + i % 2))
                words="awful & <terrible>, a waste of money"
            fi
            printf '<review>\n<unique_id>\n%s\n</unique_id>\n<asin>\n%s%03d\n</asin>\n' \
                "$dom$pol$i" "${dom:0:1}" $((i % 7)) >>"$root/$dom/$pol.review"
            printf '<product_name>\nThing &quot;%d&quot;: %s\n</product_name>\n' \
                $((i % 7)) "$dom" >>"$root/$dom/$pol.review"
            printf '<helpful>\n%d of 3\n</helpful>\n<rating>\n%d.0\n</rating>\n' \
                $((i % 3)) $r >>"$root/$dom/$pol.review"
            printf '<title>\nt%d\n</title>\n<date>\n%s %d, %d\n</date>\n' \
                $i "${months[$((i % 12))]}" $((i % 27 + 1)) $((2005 + i % 2)) \
                >>"$root/$dom/$pol.review"
            printf '<reviewer>\nR%d\n</reviewer>\n<review_text>\nReview %d: %s.\n\nEnd.\n' \
                $((i % 9)) $i "$words" >>"$root/$dom/$pol.review"
            printf '</review_text>\n</review>\n' >>"$root/$dom/$pol.review"
        done
    done
}
root=$tmp/amazon
gen_domain "$root" books 20
gen_domain "$root" dvd 10
gen_domain "$root" "kitchen_&_housewares" 10

# 1. Rating with a time cut, bias model only (no backbone): 20 ID (2005) / 20 OOD (2006).
cat >"$tmp/rt.json" <<EOF
{"source": {"reader": "amazon", "path": "$root"},
 "label": {"column": "rating", "task": "regression"},
 "categorical": ["reviewer", {"column": "asin", "mask_prob": 0.2},
                 {"column": "product_name", "group_with": "asin"}],
 "text": "When the reviewer is {reviewer}, the product name is {product_name}, and the id is {asin}",
 "shift": {"id": {"all": [{"column": "domain", "any_of": ["books"]},
                          {"column": "date", "before": "2006-01-01"}]},
           "ood": {"all": [{"column": "domain", "any_of": ["books"]},
                           {"column": "date", "on_or_after": "2006-01-01"}]}},
 "expect": {"id_rows": 20, "ood_rows": 20}}
EOF
"$levi" fit "$tmp/rt.json" --methods bias --seeds 1 --out "$tmp/out-rt" >"$tmp/log-rt" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    tail -20 "$tmp/log-rt"
    fail "rating fit exited $rc"
else
    grep -q "self-check: counts match" "$tmp/log-rt" || fail "rating: no self-check line"
    grep -q "ID 20 (train 16, val 2, test 2) / OOD 20 / excluded 40" "$tmp/log-rt" ||
        fail "rating: wrong split counts: $(grep 'rows ' "$tmp/log-rt")"
    grep -q 'the product name is Thing "0": books,' "$tmp/log-rt" ||
        fail "rating: entities not decoded in the rendered text"
    awk -F, 'NR > 1 && $8 == "rmse" && !($9 + 0 > 0.1 && $9 + 0 < 3) { bad = 1 }
             END { exit bad }' "$tmp/out-rt/results.csv" ||
        fail "rating: an RMSE outside (0.1, 3) in results.csv"
fi

# 2. A malformed file: bad input, exit 3, the message names the file and line.
cp -r "$root" "$tmp/broken"
printf '<review>\n<asin>\nX\n</asin>\n<rating>\nfive\n</rating>\n' \
    >>"$tmp/broken/dvd/positive.review"
"$levi" fit "$tmp/rt.json" --data "$tmp/broken" --methods bias --seeds 1 \
    --out "$tmp/out-broken" >"$tmp/log-broken" 2>&1
rc=$?
[ $rc -eq 3 ] || fail "malformed file: exit $rc, expected 3"
line=$(($(wc -l <"$root/dvd/positive.review") + 7)) # the 7 lines appended: <review> .. </rating>
grep -qF "dvd/positive.review:$line: expected </review> closing the review at line $((line - 6))" \
    "$tmp/log-broken" || fail "malformed file: message lacks file:line: $(tail -1 "$tmp/log-broken")"

# 3. The classification path and text-to-rating regression need the backbone.
model=${LEVI_MODEL_DIR:-}
if [ -z "$model" ] || [ ! -f "$model/model.safetensors" ]; then
    echo "skip (part 3): LEVI_MODEL_DIR does not name a folder with model.safetensors"
else
    for task in sentiment rating; do
        if [ $task = sentiment ]; then
            label='{"column": "polarity", "task": "classification", "classes": ["negative", "positive"]}'
        else
            label='{"column": "rating", "task": "regression"}'
        fi
        cat >"$tmp/$task.json" <<EOF
{"source": {"reader": "amazon", "path": "$root"},
 "label": $label,
 "categorical": ["reviewer", {"column": "asin", "mask_prob": 0.2}],
 "text": "{review_text}", "text_max_tokens": 32,
 "shift": {"id": {"column": "domain", "any_of": ["books"]},
           "ood_groups": [{"by_value": "domain"}]},
 "expect": {"id_rows": 40, "ood_rows": 40,
            "ood_groups": {"dvd": 20, "kitchen_&_housewares": 20}}}
EOF
        "$levi" fit "$tmp/$task.json" --methods levi,a4 --seeds 1 --epochs 4 --lrs 1e-2 \
            --model "$model" --out "$tmp/out-$task" >"$tmp/log-$task" 2>&1
        rc=$?
        if [ $rc -ne 0 ]; then
            tail -20 "$tmp/log-$task"
            fail "$task fit exited $rc"
            continue
        fi
        # LEVI's ensemble rows (no adapter) on ID test and each OOD set.
        if [ $task = sentiment ]; then
            # The texts say their polarity outright: the frozen features separate them.
            awk -F, '$1 == "levi" && $4 == "" && $5 != "id_val" {
                         n++; if ($8 != "accuracy" || !($9 + 0 >= 0.75 && $9 + 0 <= 1)) bad = 1 }
                     END { exit bad || n < 3 }' "$tmp/out-$task/results.csv" ||
                fail "sentiment: LEVI accuracy below 0.75 (or missing): $(grep '^levi,0,[^,]*,,' \
                    "$tmp/out-$task/results.csv" | tr '\n' ' ')"
            grep -Eq '"metric":[[:space:]]*"accuracy"' "$tmp/out-$task/results.json" ||
                fail "sentiment: results.json metric is not accuracy"
            grep -q "OOD groups: 2" "$tmp/log-$task" || fail "sentiment: expected 2 OOD groups"
        else
            # Ratings 1,2 vs 4,5: knowing the polarity alone gives RMSE 0.5; the mean 3.
            awk -F, '$1 == "levi" && $4 == "" && $5 != "id_val" {
                         n++; if ($8 != "rmse" || !($9 + 0 > 0 && $9 + 0 < 1.4)) bad = 1 }
                     END { exit bad || n < 3 }' "$tmp/out-$task/results.csv" ||
                fail "rating from text: LEVI RMSE not below 1.4: $(grep '^levi,0,[^,]*,,' \
                    "$tmp/out-$task/results.csv" | tr '\n' ' ')"
        fi
    done
    # A fine-tuning baseline reads as many tokens as the spec's text_max_tokens (32 here).
    "$levi" fit "$tmp/rating.json" --methods ft --seeds 1 --epochs 1 --lrs 1e-4 \
        --model "$model" --out "$tmp/out-rating" >"$tmp/log-ft" 2>&1 ||
        { tail -5 "$tmp/log-ft"; fail "ft on the rating-from-text spec failed"; }
    grep -Eq '"max_len":[[:space:]]*32[,}]' "$tmp/out-rating/runs/ft/seed0/config.json" ||
        fail "ft did not take text_max_tokens 32 as its max_len: $(grep -o '"max_len":[^,]*' \
            "$tmp/out-rating/runs/ft/seed0/config.json")"
fi

if [ $failures -ne 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "cli_amazon: all checks passed"
