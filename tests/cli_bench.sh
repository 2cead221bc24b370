#!/usr/bin/env bash
# Smoke test of bench/run.sh: runs every case at tiny shapes (--quick --smoke: seconds), the
# PyTorch side too when LEVI_BENCH_PYTHON (default /usr/bin/python3) imports torch, and checks
# that the table and the JSON are well-formed: every selected case has a row or a skip reason,
# every figure is a positive number, ratios are present exactly when both sides ran, cases e/f
# (EfficientNet-Lite0) report that both sides did the same work, a PyTorch side doing different
# work (another learning rate) is caught with exit 1, and bad options give exit code 2 with a
# message.
# Not for: speed. Nothing here compares a figure with a threshold: the machine may be shared.
# Usage: cli_bench.sh path/to/levi   (the bench_* executables are looked up beside it; skip 77
# when they were not built)
set -u
LEVI="${1:?usage: cli_bench.sh path/to/levi}"
BUILD="$(cd "$(dirname "$LEVI")" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
for b in bench_peak bench_train bench_encoder bench_encoder_train bench_e2e bench_effnet; do
    if [ ! -x "$BUILD/$b" ]; then
        echo "SKIP cli_bench: $BUILD/$b not built (cmake --build $BUILD builds every bench_*)"
        exit 77
    fi
done
T="$(mktemp -d "${TMPDIR:-/tmp}/levi-cli-bench-XXXXXX")"
trap 'rm -rf "$T"' EXIT
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
ok() { echo "ok: $*"; }

# Usage errors: exit 2 and a message naming the option.
check_usage() {
    local what="$1"
    shift
    bash "$ROOT/bench/run.sh" --build "$BUILD" "$@" >"$T/u.out" 2>"$T/u.err"
    local rc=$?
    if [ "$rc" -eq 2 ] && grep -q -- "$what" "$T/u.err"; then ok "usage error $* (exit 2)"; else
        fail "usage error $*: exit $rc, stderr: $(head -c 300 "$T/u.err")"; fi
}
check_usage "--only" --only a,x
check_usage "--threads" --threads 0
check_usage "unknown option" --bogus
check_usage "--e-shape" --e-shape 1x32
check_usage "--f-shape" --f-shape 32
bash "$ROOT/bench/run.sh" --build "$T/nowhere" --smoke >"$T/b.out" 2>"$T/b.err"
rc=$?
if [ "$rc" -eq 1 ] && grep -q "not found" "$T/b.err"; then ok "missing build folder (exit 1)"; else
    fail "missing build folder: exit $rc, stderr: $(head -c 300 "$T/b.err")"; fi

start=$(date +%s)
bash "$ROOT/bench/run.sh" --build "$BUILD" --quick --smoke --json "$T/out.json" >"$T/out.txt" \
    2>"$T/err.txt"
rc=$?
echo "bench/run.sh --quick --smoke: exit $rc in $(($(date +%s) - start)) s"
sed 's/^/    /' "$T/out.txt"
if [ "$rc" -ne 0 ]; then
    fail "bench/run.sh exited $rc"
    sed 's/^/    /' "$T/err.txt"
fi

# The table: a header, a levi row per case (or a skip line), GFLOP/s and RSS positive.
grep -q '^case side .*levi/torch$' "$T/out.txt" && ok "table header" || fail "no table header"
grep -q '^peak (measured in this run): SGEMM 512^3' "$T/out.txt" && ok "peak line" ||
    fail "no peak line"
for c in a b c d e f g; do
    if grep -q "^$c    skipped: " "$T/out.txt"; then
        ok "case $c skipped with a reason: $(grep "^$c    skipped" "$T/out.txt" | cut -c1-100)"
        continue
    fi
    row="$(grep "^$c    levi " "$T/out.txt")"
    if [ -z "$row" ]; then
        fail "case $c: no levi row"
        continue
    fi
    # columns: case side throughput unit GFLOP/s %peak RSS cpu/wall ratio
    if echo "$row" | awk '{ exit !($3 > 0 && $5 > 0 && $6 ~ /^[0-9]+%$/ && $7 > 0 && $8 > 0) }'; then
        ok "case $c levi row well-formed"
    else
        fail "case $c levi row malformed: $row"
    fi
done

# The JSON: parsed by Python when there is one (the structure is the contract for tools).
PY="$(command -v python3 || true)"
if [ -z "$PY" ]; then
    grep -q '"schema": "levi-bench-v1"' "$T/out.json" && ok "json written (not parsed: no python3)" ||
        fail "json missing or without schema"
else
    if "$PY" - "$T/out.json" <<'EOF'; then ok "json well-formed"; else fail "json malformed"; fi
import json, sys
d = json.load(open(sys.argv[1]))
errs = []
def pos(x, what):
    if not isinstance(x, (int, float)) or not x > 0:
        errs.append(f"{what}: expected a positive number, found {x!r}")
if d.get("schema") != "levi-bench-v1": errs.append(f"schema {d.get('schema')!r}")
if d.get("mode") != "smoke" or d.get("threads") != 1 or d.get("rounds") != 1:
    errs.append(f"mode/threads/rounds {d.get('mode')}/{d.get('threads')}/{d.get('rounds')}")
pos(d["peak"]["sgemm512_gflops"], "peak.sgemm512_gflops")
pos(d["peak"]["fma_gflops"], "peak.fma_gflops")
if sorted(d["cases"]) != list("abcdefg"): errs.append(f"cases {sorted(d['cases'])}")
for c, v in d["cases"].items():
    if "skipped" in v:
        if c != "d" or not v["skipped"]: errs.append(f"{c}: unexpected skip {v['skipped']!r}")
        continue
    sides = ["levi"] + (["torch"] if v.get("torch") else [])
    for s in sides:
        for k in ("median", "gflops", "pct_peak", "maxrss_mib", "cpu_wall"):
            pos(v[s][k], f"{c}.{s}.{k}")
        if len(v[s]["rounds"]) != 1: errs.append(f"{c}.{s}.rounds {v[s]['rounds']}")
    if v.get("torch"):
        pos(v["ratio"], f"{c}.ratio")
        if abs(v["ratio"] - v["levi"]["median"] / v["torch"]["median"]) > 0.01 * v["ratio"] + 0.01:
            errs.append(f"{c}: ratio {v['ratio']} is not levi/torch")
    elif v["ratio"] is not None or not v.get("torch_skipped"):
        errs.append(f"{c}: no torch side, but ratio {v['ratio']!r} / reason {v.get('torch_skipped')!r}")
    if c in "ef":
        if v.get("weights") not in ("checkpoint", "synthetic") or v.get("batch", 0) < 2 or v.get("size", 0) < 32:
            errs.append(f"{c}: weights/batch/size {v.get('weights')!r}/{v.get('batch')!r}/{v.get('size')!r}")
        sw = v.get("same_work")
        if v.get("torch") and not (sw and sw["ok"] is True and "levi" in sw["detail"]):
            errs.append(f"{c}: both sides ran but same_work is {sw!r}")
        if not v.get("torch") and sw is not None: errs.append(f"{c}: same_work without a torch side")
for e in errs: print("   ", e)
sys.exit(1 if errs else 0)
EOF
fi

# The same-work check of case f must be able to fail: a PyTorch side that trains with another
# learning rate gives the same first loss but a different loss after one update. This run uses
# the synthetic weights (no checkpoint), so case e checks that both sides compute them alike.
PYB="${LEVI_BENCH_PYTHON:-/usr/bin/python3}"
if "$PYB" -c 'import torch' 2>/dev/null; then
    printf '#!/bin/sh\nexec "%s" "$@" --lr 0.03\n' "$PYB" >"$T/py-other-lr"
    chmod +x "$T/py-other-lr"
    LEVI_BENCH_PYTHON="$T/py-other-lr" LEVI_EFFNET_PTH="$T/no-checkpoint.pth" \
        bash "$ROOT/bench/run.sh" --build "$BUILD" --smoke --only e,f >"$T/m.out" 2>"$T/m.err"
    rc=$?
    if grep -q "e/f weights: synthetic" "$T/m.out" && grep -q "same work e: ok" "$T/m.out"; then
        ok "synthetic weights: case e's two sides agree"
    else
        fail "synthetic weights, case e: $(grep 'weights\|same work e' "$T/m.out")"
    fi
    if [ "$rc" -eq 1 ] && grep -q "same work f: MISMATCH" "$T/m.out" &&
        grep -q "did not do the same work in case(s) f" "$T/m.err"; then
        ok "different work on the PyTorch side of f is caught (exit 1)"
    else
        fail "other learning rate in f's PyTorch side: exit $rc, $(grep 'same work f' "$T/m.out")"
    fi
else
    echo "skip: mismatch check of case f ('$PYB' cannot import torch)"
fi

if [ "$fails" -ne 0 ]; then
    echo "cli_bench: $fails check(s) failed"
    exit 1
fi
echo "cli_bench: all checks passed"
