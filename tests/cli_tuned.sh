#!/usr/bin/env bash
# End-to-end test of LEVI on a tuned backbone (levi-ft, levi-ht, levi-lora: paper Tables 4 and
# 14) and of `levi experiment`, on a tiny slice of real MovieLens-100K (200 rows, --scale 0.5,
# one epoch).
#  1. `levi fit --methods levi,levi-ft` (2 seeds, learning rates 1e-3,1e-2) adds ft by itself,
#     and levi-ft seed k trains on features of runs/ft/seed<k>/backbone: its recorded backbone
#     folder and ft run key are seed k's, its features key differs from frozen LEVI's and
#     between the two seeds (each tuned encoder has its own cache entry, and that entry is on
#     disk), its RMSEs are finite, in (0.5, 3) for ID test and all OOD, and differ from frozen
#     LEVI's by more than 1e-6 on every seed; its learning rate comes from its own grid on ID
#     validation (the lower of its two seed-0 ID-val scores); report.md has the Table 14
#     block and results.csv has levi-ft rows.
#  2. A rerun skips every run, reuses the tuned features, reproduces results.csv byte for
#     byte; with levi-ft seed 1's result removed (a half-finished run), a rerun trains only
#     that run again and reproduces results.csv byte for byte.
#  3. A base run marked diverged makes that seed of levi-ft NaN (JSON null), like any
#     diverged run.
#  4. `levi experiment --help` works and says it is levi fit with --methods all; bad options
#     exit 2 naming `levi experiment`; `levi --help` lists it.
#  5. `levi experiment` (= --methods all: every method, backbone training, tuned LEVI,
#     ensembles, per-layer study) runs at this scale with one seed and writes a finite
#     result for every method, levi-ht, levi-ft and levi-lora included.
#
#   tests/cli_tuned.sh <levi binary>
# Inputs as tests/cli_fit.sh; exits 77 (skipped) when they are absent. About 1.5 minutes on
# two busy cores (most of it part 5) and ~2 GB of temporary disk (fine-tuning state files).
set -u
levi=${1:?usage: cli_tuned.sh <levi binary>}

. "$(dirname "${BASH_SOURCE[0]}")/movielens_inputs.bash"
common=(movielens --data "$data" --model "$model" --subsample 200 --scale 0.5 --epochs 1
        --threads 2)
args=("${common[@]}" --out "$out" --methods levi,levi-ft --seeds 2 --lrs 1e-3,1e-2)

# 1. levi-ft next to levi; ft comes along.
"$levi" fit "${args[@]}" >"$tmp/log1" 2>&1
rc=$?
[ $rc = 0 ] || { fail "fit exited $rc"; tail -20 "$tmp/log1"; }
grep -q "methods: ft added" "$tmp/log1" || fail "levi-ft did not add ft: $(head -3 "$tmp/log1")"

python3 - "$out" "$LEVI_CACHE/features" <<'PY' || fail "results.json check"
import json, math, os, sys
out, cache = sys.argv[1], sys.argv[2]
r = json.load(open(os.path.join(out, "results.json")))
M = {m["method"]: m for m in r["methods"]}
assert set(M) == {"levi", "ft", "levi-ft"}, list(M)
frozen_key = r["features"]["key"]
def sets(run):
    return {s["name"]: s["value"] for s in run["sets"]}
keys = []
for k, run in enumerate(M["levi-ft"]["runs"]):
    assert run["seed"] == k, run["seed"]
    b = run["backbone"]
    assert b["dir"] == os.path.join(out, "runs", "ft", "seed%d" % k, "backbone"), b["dir"]
    assert b["run_key"] == M["ft"]["runs"][k]["key"], (b["run_key"], M["ft"]["runs"][k]["key"])
    assert len(b["features_key"]) == 64 and b["features_key"] != frozen_key, b["features_key"]
    assert os.path.isfile(os.path.join(cache, b["features_key"][:16], "manifest.json")), \
        "no cache entry for " + b["features_key"]
    keys.append(b["features_key"])
    v, f = sets(run), sets(M["levi"]["runs"][k])
    for name, x in v.items():
        assert x is not None and math.isfinite(x), ("levi-ft", k, name, x)
    for name in ("id_test", "ood"):
        assert 0.5 < v[name] < 3.0, ("levi-ft", k, name, v[name])
        assert abs(v[name] - f[name]) > 1e-6, ("levi-ft equals levi", k, name, v[name])
assert keys[0] != keys[1], "seeds 0 and 1 read the same features"
m = M["levi-ft"]
assert m["lr_grid"] == [0.001, 0.01], m["lr_grid"]
best = min(range(2), key=lambda i: m["lr_val"][i])
assert m["chosen_lr"] == m["lr_grid"][best], (m["chosen_lr"], m["lr_val"])
assert m["lr_val"][best] == sets(m["runs"][0])["id_val"], (m["lr_val"], sets(m["runs"][0]))
print("results.json: levi-ft seeds 0/1 on ft's backbones (features %s, %s; frozen %s); "
      "ID test %.4f/%.4f vs levi %.4f/%.4f; lr %g" %
      (keys[0][:8], keys[1][:8], frozen_key[:8], sets(m["runs"][0])["id_test"],
       sets(m["runs"][1])["id_test"], sets(M["levi"]["runs"][0])["id_test"],
       sets(M["levi"]["runs"][1])["id_test"], m["chosen_lr"]))
PY
grep -q "Tables 4 and 14 style: LEVI with a tuned backbone" "$out/report.md" ||
    fail "report.md has no Table 14 block"
grep -q "| LEVI (FT backbone)" "$out/report.md" || fail "report.md has no LEVI (FT backbone) row"
grep -q "| LEVI (frozen backbone)" "$out/report.md" || fail "report.md has no frozen LEVI row"
grep -q "^levi-ft,0," "$out/results.csv" || fail "results.csv has no levi-ft rows"

# 2. Rerun: everything skipped, tuned features reused; a half-finished run restarts cleanly.
cp "$out/results.csv" "$tmp/results1.csv"
"$levi" fit "${args[@]}" >"$tmp/log2" 2>&1 || fail "rerun exited $?"
n_skip=$(grep -c "skipped" "$tmp/log2")
# levi, ft, levi-ft: 2 learning rates + 2 seeds each, seed 0 = the winner, counted twice.
[ "$n_skip" -ge 12 ] || { fail "rerun skipped $n_skip runs, expected >= 12"; cat "$tmp/log2"; }
n_reused=$(grep -c "features (ft seed [01] backbone): reused cache" "$tmp/log2")
[ "$n_reused" = 2 ] || fail "rerun reused tuned features $n_reused times, expected 2"
cmp -s "$tmp/results1.csv" "$out/results.csv" || fail "rerun changed results.csv"
rm "$out/runs/levi-ft/seed1/result.json"
"$levi" fit "${args[@]}" >"$tmp/log3" 2>&1 || fail "resume exited $?"
grep -q "^levi-ft seed 1: ID val" "$tmp/log3" || fail "levi-ft seed 1 was not trained again"
n_trained=$(grep -c ": ID val .*best epoch" "$tmp/log3")
[ "$n_trained" = 1 ] || fail "resume trained $n_trained runs, expected 1"
cmp -s "$tmp/results1.csv" "$out/results.csv" || fail "resumed run changed results.csv"

# 3. A diverged base run: that seed of levi-ft has no metrics.
python3 - "$out/runs/ft/seed1/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["train"]["diverged"] = True
json.dump(r, open(sys.argv[1], "w"), indent=1)
PY
"$levi" fit "${args[@]}" >"$tmp/log4" 2>&1 || fail "fit with a diverged ft seed exited $?"
grep -q "levi-ft seed 1: ft seed 1 diverged" "$tmp/log4" || fail "no diverged-backbone message"
python3 - "$out/results.json" <<'PY' || fail "diverged-backbone check"
import json, math, sys
M = {m["method"]: m for m in json.load(open(sys.argv[1]))["methods"]}
r0, r1 = M["levi-ft"]["runs"]
assert r1["train"]["backbone_diverged"] is True, r1["train"]
assert all(s["value"] is None for s in r1["sets"]) and len(r1["sets"]) >= 3, r1["sets"]
assert all(s["value"] is not None and math.isfinite(s["value"]) for s in r0["sets"])
print("diverged ft seed 1 -> levi-ft seed 1 NaN on %d sets; seed 0 unchanged" % len(r1["sets"]))
PY

# 4. The experiment command's help and errors.
"$levi" experiment --help >"$tmp/help" 2>&1 || fail "levi experiment --help exited $?"
grep -q "usage: levi experiment" "$tmp/help" || fail "experiment --help has no usage line"
grep -q -- "--methods all" "$tmp/help" || fail "experiment --help does not mention --methods all"
grep -q "levi-ft" "$tmp/help" || fail "experiment --help does not list levi-ft"
"$levi" --help | grep -q "experiment" || fail "levi --help does not list experiment"
"$levi" experiment movielens --bogus >/dev/null 2>"$tmp/err"
rc=$?
[ $rc = 2 ] || fail "experiment --bogus exited $rc, expected 2"
grep -q "levi experiment: unknown option '--bogus'" "$tmp/err" ||
    fail "experiment --bogus message: $(cat "$tmp/err")"
"$levi" experiment movielens --methods levi-xx >/dev/null 2>"$tmp/err"
rc=$?
[ $rc = 2 ] || fail "experiment --methods levi-xx exited $rc, expected 2"
"$levi" experiment >/dev/null 2>&1
rc=$?
[ $rc = 2 ] || fail "experiment without a target exited $rc, expected 2"

# 5. Everything at tiny scale: levi experiment's default --methods all.
"$levi" experiment "${common[@]}" --out "$tmp/all" --seeds 1 --lrs 1e-3 >"$tmp/log5" 2>&1
rc=$?
[ $rc = 0 ] || { fail "experiment exited $rc"; tail -20 "$tmp/log5"; }
python3 - "$tmp/all/results.json" <<'PY' || fail "experiment results check"
import json, math, sys
M = {m["method"]: m for m in json.load(open(sys.argv[1]))["methods"]}
want = ["levi", "a3", "a4", "a5", "lp", "layer", "bias"] + ["layer%d" % k for k in range(7)] + \
       ["ft", "ht", "lp-ft", "fs", "lora", "levi-ft", "levi-ht", "levi-lora",
        "ft+lp", "ft+fs", "wise-ft", "a1", "a2"]
assert sorted(M) == sorted(want), sorted(set(want) ^ set(M))
for name in want:
    for s in M[name]["runs"][0]["sets"]:
        assert s["value"] is not None and math.isfinite(s["value"]), (name, s["name"])
print("levi experiment: %d methods, all finite" % len(want))
PY

if [ $failures -gt 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "cli_tuned: all checks passed"
