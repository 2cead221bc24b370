#!/usr/bin/env bash
# `levi synthetic`: App. B's weights and Table 6 as the paper prints them, E.8's options and
# errors (exit 2 naming the option), and a small E.8 run that writes results.json and
# results.md with every method's accuracy. Needs no model or data.
#
#   tests/cli_synthetic.sh <levi binary>
# Skips (exit 77) while the binary has no `synthetic` command.
set -u
levi=${1:?usage: cli_synthetic.sh <levi binary>}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export LEVI_PROGRESS=0
failures=0
n_checks=0

"$levi" synthetic --help >"$tmp/out" 2>"$tmp/err"
if grep -q "unknown command 'synthetic'" "$tmp/err"; then
    echo "SKIP cli_synthetic: this levi binary has no 'synthetic' command yet"
    exit 77
fi

# expect CODE PATTERN -- levi args...: exit code, and stdout (code 0) or stderr matches the
# extended regex PATTERN.
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

# --- help and usage errors -----------------------------------------------------------------
expect 0 "usage: levi synthetic appb"            -- synthetic --help
expect 0 "--seeds N"                             -- synthetic e8 --help
expect 0 "usage: levi synthetic"                 -- synthetic appb --help
expect 2 "usage: levi synthetic"                 -- synthetic
expect 2 "unknown experiment 'e9'"               -- synthetic e9
expect 2 "appb takes no options, found '--x'"    -- synthetic appb --x
expect 2 "unknown option '--bogus'"              -- synthetic e8 --bogus
expect 2 "--seeds '0': expected an integer"      -- synthetic e8 --seeds 0
expect 2 "--seeds 'abc': expected an integer"    -- synthetic e8 --seeds abc
expect 2 "option --out needs a value"            -- synthetic e8 --out
expect 2 "--lrs '1e-3,x': expected a comma list" -- synthetic e8 --lrs 1e-3,x
expect 2 "--absent 'maybe': expected zero or noise" -- synthetic e8 --absent maybe
expect 2 "--n '5': expected an integer in 10"    -- synthetic e8 --n 5

# --- App. B: the paper's weights and Table 6 (computed, compared here as printed) --------
expect 0 "w_pretrain +\[1, 1, 1, 0, 0\]"           -- synthetic appb
for line in "w_train-from-scratch +\[0, 0, 1, 1, 1\]" "w_finetune +\[1, 1, 1, 1, 1\]" \
    "\| \[1, 1/3, 1/3, 1/3, 1\] \| 1 \| w_pretrain \| 5/3 \| 2/3 \|" \
    "\|  \|  \| w_finetune \| 3 \| 2 \|" \
    "\| \[1, -1/3, -1/3, -1/3, 1\] \| -1 \| w_pretrain \| 1/3 \| 4/3 \|" \
    "\|  \|  \| w_train-from-scratch \| -1/3 \| 4/3 \|" \
    "\| \[-1, -1/3, -1/3, -1/3, -1\] \| -1 \| w_pretrain \| -5/3 \| 2/3 \|" \
    "\|  \|  \| w_finetune \| -3 \| 2 \|" \
    "w_true predicts every test point exactly: yes"; do
    n_checks=$((n_checks + 1))
    if ! grep -Eq -- "$line" "$tmp/out"; then
        echo "FAIL: levi synthetic appb: no line matching /$line/"
        failures=$((failures + 1))
    fi
done

# --- a small E.8 run ------------------------------------------------------------------------
expect 0 "\| LEVI \| [0-9]+\.[0-9] \+- " -- synthetic e8 --seeds 2 --n 300 --max-epochs 5 \
    --lrs 1e-2 --out "$tmp/e8"
n_checks=$((n_checks + 1))
if [ ! -s "$tmp/e8/results.json" ] || [ ! -s "$tmp/e8/results.md" ]; then
    echo "FAIL: e8 --out did not write results.json and results.md"
    failures=$((failures + 1))
else
    for key in '"pt"' '"ft"' '"fs"' '"levi"' '"pt_fs_avg"' '"test_acc_mean"' '"paper_test_acc":	75.5' \
        '"adapter_test_acc"' '"absent":	"zero"'; do
        n_checks=$((n_checks + 1))
        if ! grep -qF -- "$key" "$tmp/e8/results.json"; then
            echo "FAIL: results.json lacks $key"
            failures=$((failures + 1))
        fi
    done
    # Every accuracy is a fraction in (0.3, 1]: training ran and was evaluated.
    n_checks=$((n_checks + 1))
    bad=$(grep -Eo '"test_acc":	[0-9.e+-]+' "$tmp/e8/results.json" |
        awk '{ if ($2 <= 0.3 || $2 > 1) n++ } END { print n + 0 }')
    count=$(grep -c '"test_acc":' "$tmp/e8/results.json")
    if [ "$bad" -ne 0 ] || [ "$count" -ne 10 ]; then
        echo "FAIL: results.json: $count per-seed test accuracies (expected 10), $bad outside (0.3, 1]"
        failures=$((failures + 1))
    fi
fi
# Same seeds, same numbers.
"$levi" synthetic e8 --seeds 2 --n 300 --max-epochs 5 --lrs 1e-2 --out "$tmp/e8b" >/dev/null 2>&1
n_checks=$((n_checks + 1))
if ! cmp -s <(grep -v wall_seconds "$tmp/e8/results.json") \
    <(grep -v wall_seconds "$tmp/e8b/results.json"); then
    echo "FAIL: two runs with the same seeds gave different results.json"
    failures=$((failures + 1))
fi

echo "cli_synthetic: $((n_checks - failures))/$n_checks checks passed"
[ "$failures" -eq 0 ]
