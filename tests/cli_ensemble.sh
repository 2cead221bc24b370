#!/usr/bin/env bash
# End-to-end test of the post-hoc ensembles (src/cli/ensemble.c, docs/ensembles.md) through
# `levi fit` on a tiny slice of real MovieLens-100K (200 rows, --scale 0.5, one epoch, one
# seed, one learning rate): the members ft, lp, fs, a4 and the ensembles ft+lp, ft+fs,
# wise-ft, a1, a2 must exit 0 and write finite metrics for every eval set;
#  - a1 with one seed averages ft seed 0 with itself, so it must equal ft on every set
#    exactly: an ensemble of two identical members is the member, and reloading the saved
#    ft run (backbone/ + head) reproduces the run's own predictions;
#  - an equal-weight output average can be no worse than the mean of its members' RMSEs
#    (the triangle inequality), checked for ft+lp, ft+fs and a2 on every set (relative
#    1e-6: the averaged outputs are float32; a one-row group sits right at equality);
#  - wise-ft's a lies in WiSE-FT's grid {0, 0.1, ..., 1}, is the best of its ID-validation
#    scores, and its a = 1 score equals ft's ID-validation RMSE exactly;
#  - a rerun reuses every run ("skipped") and reproduces results.csv byte for byte;
#  - an ensemble without its members in --methods is a usage error (exit 2) before any
#    training, naming what is missing.
#
#   tests/cli_ensemble.sh <levi binary>
# Inputs as tests/cli_fit.sh; exits 77 (skipped) when they are absent.
set -u
levi=${1:?usage: cli_ensemble.sh <levi binary>}

. "$(dirname "${BASH_SOURCE[0]}")/movielens_inputs.bash"
common=(movielens --data "$data" --model "$model" --subsample 200 --scale 0.5 --seeds 1
        --lrs 1e-3 --epochs 1 --threads 2)

# Missing members: exit 2 before anything is trained or written.
"$levi" fit "${common[@]}" --out "$tmp/bad" --methods ft,ft+lp >"$tmp/log0" 2>&1
rc=$?
[ $rc = 2 ] || fail "ft+lp without lp exited $rc, expected 2"
grep -q "ft+lp needs ft and lp in --methods" "$tmp/log0" ||
    fail "missing-member error is unclear: $(tail -3 "$tmp/log0")"
[ ! -e "$tmp/bad/runs" ] || fail "runs were written before the missing-member error"
"$levi" fit "${common[@]}" --out "$tmp/bad" --methods lp,wise-ft >"$tmp/log0" 2>&1
rc=$?
[ $rc = 2 ] || fail "wise-ft without ft exited $rc, expected 2"
grep -q "wise-ft needs ft in --methods" "$tmp/log0" ||
    fail "missing-member error is unclear: $(tail -3 "$tmp/log0")"

args=("${common[@]}" --out "$out" --methods ft,lp,fs,a4,ft+lp,ft+fs,wise-ft,a1,a2)
"$levi" fit "${args[@]}" >"$tmp/log1" 2>&1
rc=$?
[ $rc = 0 ] || { fail "fit exited $rc"; tail -20 "$tmp/log1"; }

python3 - "$out/results.json" <<'PY' || fail "results.json check"
import json, math, sys
r = json.load(open(sys.argv[1]))
M = {m["method"]: m for m in r["methods"]}
ens = ["ft+lp", "ft+fs", "wise-ft", "a1", "a2"]
for name in ["ft", "lp", "fs", "a4"] + ens:
    assert name in M, (name, list(M))
    assert len(M[name]["runs"]) == 1, name
def sets(name):
    return {s["name"]: s["value"] for s in M[name]["runs"][0]["sets"]}
for name in ens:
    v = sets(name)
    assert len(v) == len(sets("ft")) and len(v) >= 3, (name, list(v))
    for k, x in v.items():
        assert x is not None and math.isfinite(x), (name, k, x)
# Two identical members: the member itself, bit for bit.
assert sets("a1") == sets("ft"), (sets("a1"), sets("ft"))
# RMSE(avg) <= (RMSE(a) + RMSE(b)) / 2 on every set.
for name, (a, b) in {"ft+lp": ("ft", "lp"), "ft+fs": ("ft", "fs"), "a2": ("ft", "a4")}.items():
    e, va, vb = sets(name), sets(a), sets(b)
    for k in e:
        assert e[k] <= (va[k] + vb[k]) / 2 * (1 + 1e-6), (name, k, e[k], va[k], vb[k])
    assert M[name]["runs"][0]["weights"] == [0.5, 0.5], name
w = M["wise-ft"]["runs"][0]
grid = [round(0.1 * i, 1) for i in range(11)]
assert w["alpha_grid"] == grid, w["alpha_grid"]
assert w["alpha"] in grid, w["alpha"]
best = min(w["alpha_val"])
assert w["alpha_val"][grid.index(w["alpha"])] == best, (w["alpha"], w["alpha_val"])
assert w["alpha_val"][-1] == sets("ft")["id_val"], (w["alpha_val"][-1], sets("ft")["id_val"])
assert abs(sets("wise-ft")["id_val"] - best) <= 1e-12, (sets("wise-ft")["id_val"], best)
print("results.json: 5 ensembles finite on %d sets; a1 == ft; averages within the members' "
      "mean; wise-ft a = %g (ID val %.4f, a=1 %.4f = ft)" %
      (len(sets("ft")), w["alpha"], best, w["alpha_val"][-1]))
PY

cp "$out/results.csv" "$tmp/results1.csv"
"$levi" fit "${args[@]}" >"$tmp/log2" 2>&1 || fail "rerun exited $?"
n_skip=$(grep -c "skipped" "$tmp/log2")
[ "$n_skip" -ge 9 ] || { fail "rerun skipped $n_skip runs, expected >= 9"; cat "$tmp/log2"; }
cmp -s "$tmp/results1.csv" "$out/results.csv" || fail "rerun changed results.csv"

if [ $failures -gt 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "cli_ensemble: all checks passed"
