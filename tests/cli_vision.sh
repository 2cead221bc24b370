#!/usr/bin/env bash
# `levi vision` end to end at toy scale: usage errors exit 2 naming the option, a missing data
# folder or checkpoint exits 3 naming the path, and a tiny run (200 train images, 100 test
# images per set, 2 epochs, 2 seeds, 32x32 backbone input) writes results.json, results.csv
# and report.md with every method and set, then reuses its cached features and finished
# methods on a second run. A third, tinier run trains the backbone methods (ft, ht, lp-ft)
# and builds the post-hoc ones (ft+lp, wise-ft, levi-ft) from them, and a rerun reuses all. The run needs LEVI_FASHION_MNIST_DIR and LEVI_EFFNET_PTH (exit 77
# otherwise); it takes well under a minute on one core.
#
#   tests/cli_vision.sh <levi binary>
set -u
levi=${1:?usage: cli_vision.sh <levi binary>}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export LEVI_CACHE=$tmp/cache LEVI_PROGRESS=0
failures=0

if ! "$levi" vision --help >"$tmp/out" 2>&1 || ! grep -q "usage: levi vision" "$tmp/out"; then
    echo "SKIP cli_vision: this levi has no 'vision' command (not registered in main.c)"
    exit 77
fi

expect() { # expect CODE PATTERN -- args...
    local code=$1 pattern=$2
    shift 3
    "$levi" "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$?
    if [ $rc -ne "$code" ]; then
        echo "FAIL: levi $* exited $rc, expected $code; stderr: $(head -3 "$tmp/err")"
        failures=$((failures + 1))
    elif ! grep -Eq -- "$pattern" "$tmp/err"; then
        echo "FAIL: levi $*: stderr does not match /$pattern/: $(cat "$tmp/err")"
        failures=$((failures + 1))
    fi
}

expect 2 "unknown option '--frob'" -- vision --frob 1
expect 2 "--seeds: expected an integer in 1..8, found '0'" -- vision --seeds 0
expect 2 "--methods: unknown method 'vit'" -- vision --methods levi,vit
expect 2 "--resolution: expected an integer in 32..1024, found '16'" -- vision --resolution 16
expect 2 "--lrs: expected positive numbers, found '-1'" -- vision --lrs 0.1,-1
expect 2 "ft\+lp, wise-ft and levi-ft are built from the ft runs: add ft" -- vision --methods lp,wise-ft
expect 2 "ft\+lp ensembles the ft and lp runs: add lp" -- vision --methods ft,ft+lp
expect 2 "--levi-ft-seeds: expected an integer in 1..8, found '0'" -- vision --levi-ft-seeds 0
expect 3 "$tmp/nodata" -- vision --data "$tmp/nodata" --model /dev/null

data=${LEVI_FASHION_MNIST_DIR:-}
pth=${LEVI_EFFNET_PTH:-}
if [ -z "$data" ] || [ -z "$pth" ] || [ ! -d "$data" ] || [ ! -f "$pth" ]; then
    [ $failures -eq 0 ] || exit 1
    echo "SKIP cli_vision run: LEVI_FASHION_MNIST_DIR or LEVI_EFFNET_PTH not set"
    exit 77
fi
expect 3 "$tmp/none.pth" -- vision --data "$data" --model "$tmp/none.pth"

args=(vision --data "$data" --model "$pth" --train-rows 200 --test-rows 100 --epochs 2
      --seeds 2 --resolution 32 --threads 1 --batch 64 --out "$tmp/run" --cache "$tmp/feat")
expect 0 "wrote .*results.json" -- "${args[@]}"
for f in results.json results.csv report.md; do
    [ -s "$tmp/run/$f" ] || { echo "FAIL: $f missing"; failures=$((failures + 1)); }
done
# 4 methods x (6 sets + ood) rows plus the header.
rows=$(wc -l <"$tmp/run/results.csv")
[ "$rows" -eq 29 ] || { echo "FAIL: results.csv has $rows lines, expected 29"; failures=$((failures + 1)); }
for m in levi lp small a3; do
    grep -q "^| $m |" "$tmp/run/report.md" || { echo "FAIL: report.md lacks $m"; failures=$((failures + 1)); }
done
grep -q "ood/noise" "$tmp/run/results.json" || { echo "FAIL: results.json lacks ood/noise"; failures=$((failures + 1)); }
cp "$tmp/run/results.csv" "$tmp/first.csv"
# Second run: every feature set and every method comes from the first one, same numbers.
expect 0 "lp: finished earlier" -- "${args[@]}"
if grep -q "features .* images in" "$tmp/err"; then
    echo "FAIL: second run recomputed features"; failures=$((failures + 1))
fi
cmp -s "$tmp/first.csv" "$tmp/run/results.csv" || { echo "FAIL: results changed on reuse"; failures=$((failures + 1)); }

# Backbone-training and post-hoc methods, one seed, one epoch, 100 train images.
args=(vision --data "$data" --model "$pth" --train-rows 100 --test-rows 40 --epochs 1 --seeds 1
      --lrs 0.1 --resolution 32 --threads 1 --batch 32 --out "$tmp/ft" --cache "$tmp/feat"
      --methods wise-ft,lp,ft,levi,ht,lp-ft,ft+lp,levi-ft)
expect 0 "levi-ft: lr" -- "${args[@]}"
for m in lp ft levi ht lp-ft ft+lp wise-ft levi-ft; do
    grep -q "^| $m |" "$tmp/ft/report.md" || { echo "FAIL: report.md lacks $m"; failures=$((failures + 1)); }
done
# post-hoc methods come after their members whatever the order given
order=$(grep -o '^| [a-z+-]* |' "$tmp/ft/report.md" | tr -d '| ' | tr '\n' ' ')
[ "$order" = "lp ft levi ht lp-ft wise-ft ft+lp levi-ft " ] || { echo "FAIL: method order '$order'"; failures=$((failures + 1)); }
rows=$(wc -l <"$tmp/ft/results.csv")
[ "$rows" -eq 57 ] || { echo "FAIL: results.csv has $rows lines, expected 57"; failures=$((failures + 1)); }
for f in ft/seed0.safetensors ft/seed0-probs.safetensors ht/seed0.safetensors lp-ft/seed0.safetensors; do
    [ -s "$tmp/ft/methods/$f" ] || { echo "FAIL: methods/$f missing"; failures=$((failures + 1)); }
done
grep -q "levi vs FT on OOD" "$tmp/ft/report.md" || { echo "FAIL: report.md lacks the LEVI vs FT sentence"; failures=$((failures + 1)); }
grep -q "chosen 1.0\|chosen 0\.[0-9]" "$tmp/ft/report.md" || { echo "FAIL: wise-ft's alpha not reported"; failures=$((failures + 1)); }
cp "$tmp/ft/results.csv" "$tmp/ft-first.csv"
expect 0 "levi-ft: finished earlier" -- "${args[@]}"
cmp -s "$tmp/ft-first.csv" "$tmp/ft/results.csv" || { echo "FAIL: ft results changed on reuse"; failures=$((failures + 1)); }

[ $failures -eq 0 ] && echo "cli_vision: all checks passed"
[ $failures -eq 0 ]
