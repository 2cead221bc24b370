#!/usr/bin/env bash
# End-to-end test of the backbone-training baselines through `levi fit` on a tiny slice of
# real MovieLens-100K (200 rows, --scale 0.5, one epoch, one seed, two learning rates): lora and lp-ft next to a4 must
# exit 0, write finite RMSEs for every eval set (0.5..3.0 for ID test and all OOD; the
# per-genre groups hold a handful of rows here), record the chosen learning
# rate, save a tuned backbone folder, and a rerun must skip every finished run and reproduce
# results.csv byte for byte. The backbone runs train in two worker processes (--jobs 2, logs in
# <run>/train.log) with the results of --jobs 1 --threads 1, byte for byte. A bad --scale is a
# usage error (exit 2).
#
#   tests/cli_finetune.sh <levi binary>
# Inputs as tests/cli_fit.sh; exits 77 (skipped) when they are absent.
set -u
levi=${1:?usage: cli_finetune.sh <levi binary>}

. "$(dirname "${BASH_SOURCE[0]}")/movielens_inputs.bash"
args=(movielens --data "$data" --model "$model" --out "$out" --methods lora,lp-ft,a4
      --subsample 200 --scale 0.5 --seeds 1 --lrs 1e-3,1e-2 --epochs 1 --jobs 2)

"$levi" fit "${args[@]}" >"$tmp/log1" 2>&1
rc=$?
[ $rc = 0 ] || { fail "fit exited $rc"; tail -20 "$tmp/log1"; }

python3 - "$out/results.json" <<'PY' || fail "results.json check"
import json, math, sys
r = json.load(open(sys.argv[1]))
names = [m["method"] for m in r["methods"]]
assert names == ["a4", "lora", "lp-ft"], names
for m in r["methods"]:
    assert m.get("chosen_lr") in (0.001, 0.01), (m["method"], m.get("chosen_lr"))
    runs = m["runs"]
    assert len(runs) == 1, (m["method"], len(runs))
    for run in runs:
        for s in run["sets"]:
            v = s["value"]
            assert math.isfinite(v), (m["method"], s["name"], v)
            if s["name"] in ("id_test", "ood"):
                assert 0.5 < v < 3.0, (m["method"], s["name"], v)
print("results.json: 3 methods, every RMSE finite, ID test and OOD in (0.5, 3)")
PY
ls "$out"/runs/lora/seed0/backbone/model.safetensors >/dev/null 2>&1 ||
    fail "no tuned backbone saved under runs/lora/seed0/backbone"
# A finished run keeps its head (small) and drops the training state.
for d in "$out"/runs/lora/seed0 "$out"/runs/lp-ft/seed0; do
    [ -s "$d/head.safetensors" ] || fail "$d: no head.safetensors"
    [ ! -e "$d/state.safetensors" ] || fail "$d: the training state was kept after the run finished"
done

cp "$out/results.csv" "$tmp/results1.csv"
"$levi" fit "${args[@]}" >"$tmp/log2" 2>&1 || fail "rerun exited $?"
n_skip=$(grep -c "skipped" "$tmp/log2")
[ "$n_skip" -ge 3 ] || { fail "rerun skipped $n_skip runs, expected >= 3"; cat "$tmp/log2"; }
cmp -s "$tmp/results1.csv" "$out/results.csv" || fail "rerun changed results.csv"

grep -q "training in a worker process" "$tmp/log1" || fail "no backbone run went to a worker"
[ -s "$out/runs/lora/seed0/train.log" ] || fail "no train.log in the worker's run folder"
serial=("${args[@]}")
serial[6]="$tmp/serial" # --out
"$levi" fit "${serial[@]}" --jobs 1 --threads 1 >"$tmp/log3" 2>&1 || fail "--jobs 1 fit exited $?"
if cmp -s "$out/results.csv" "$tmp/serial/results.csv"; then
    echo "ok: --jobs 2 and --jobs 1 --threads 1 give the same results.csv"
else
    fail "--jobs 2 and --jobs 1 --threads 1 differ"
    diff "$out/results.csv" "$tmp/serial/results.csv" | head -5
fi

"$levi" fit movielens --methods lora --scale 1.5 >/dev/null 2>"$tmp/err"
rc=$?
[ $rc = 2 ] || fail "--scale 1.5 exited $rc, expected 2"
grep -q -- "--scale" "$tmp/err" || fail "--scale error does not name the option: $(cat "$tmp/err")"

if [ $failures -gt 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "cli_finetune: all checks passed"
