#!/usr/bin/env bash
# End-to-end test of `levi fit` on real MovieLens-100K, subsampled to 3000 rows: extracts the
# backbone features into a temporary LEVI_CACHE, trains levi, a4 and bias with 2 seeds in 2
# worker processes (--jobs 2), and checks the exit code, the output files, that every RMSE is
# finite and sane (0.5..2.0), that a second run skips every finished run and reproduces
# results.csv byte for byte, that `levi eval` recomputes the same numbers from the
# checkpoints, that `levi predict` works on new rows (unseen ids included), that SIGINT stops
# a fit with exit 130, resumable, both in one process (--jobs 1) and with worker processes,
# that a failing worker stops the others and passes on its exit code, and that --jobs 2 with
# an LR search gives the same bits as --jobs 1 --threads 1.
#
#   tests/cli_fit.sh <levi binary>
# Inputs: LEVI_RECBOLE_DIR (RecBole atomic files) or LEVI_DATA_DIR/ml-100k (GroupLens), and
# LEVI_MODEL_DIR (all-MiniLM-L6-v2). Exits 77 (skipped) when they are absent.
set -u
levi=${1:?usage: cli_fit.sh <levi binary>}

. "$(dirname "${BASH_SOURCE[0]}")/movielens_inputs.bash"

args=(fit movielens --subsample 3000 --epochs 2 --seeds 2 --lrs 1e-3 --methods levi,a4,bias
      --out "$out" --data "$data" --model "$model" --jobs 2)

# 1. The first run: extraction and training.
t0=$(date +%s)
"$levi" "${args[@]}" >"$tmp/log1" 2>&1
rc=$?
t1=$(date +%s)
echo "first fit: exit $rc in $((t1 - t0)) s"
if [ $rc -ne 0 ]; then
    tail -30 "$tmp/log1"
    echo "FAIL: levi fit exited $rc"
    exit 1
fi
for f in results.json results.csv report.md fit.json spec.json; do
    [ -s "$out/$f" ] || fail "$out/$f missing or empty"
done
for m in levi a4 bias; do
    for s in 0 1; do
        for f in result.json config.json model.safetensors; do
            [ -s "$out/runs/$m/seed$s/$f" ] || fail "runs/$m/seed$s/$f missing"
        done
    done
done
grep -q "self-check: counts match" "$tmp/log1" || fail "the dataset self-check line is missing"
grep -q "in 2 worker processes" "$tmp/log1" || fail "--jobs 2 did not use worker processes"
grep -q "OOD (12 groups, ours)" "$tmp/log1" || fail "the Table-1-style table is not on stdout"
grep -q "^| LEVI " "$tmp/log1" || fail "no LEVI row in the printed table"
for h in "## Table 1 style" "## Tables 9/10 style" "Paper (T5x-small backbone" \
         "## Per-adapter RMSE" "## Paper's numbers for reference"; do
    grep -qF "$h" "$out/report.md" || fail "report.md lacks '$h'"
done

# 2. Every metric in results.csv is a finite RMSE in 0.5..2.0, and every method x seed has
#    ID test, all-OOD and the 12 groups. LEVI has 7 adapters (embeddings + 6 layers).
awk -F, -v out="$tmp/csv_check" '
NR == 1 { if ($0 != "method,seed,lr,adapter,split,group,n,metric,value") bad = bad "header " $0 "\n"; next }
{
    v = $NF
    if (v !~ /^[0-9.eE+-]+$/ || v + 0 < 0.5 || v + 0 > 2.0) bad = bad "line " NR ": " $0 "\n"
    if ($4 == "") { sets[$1 "/" $2 "/" $5]++; if ($5 == "ood_group") groups[$1 "/" $2]++ }
    else adapters[$1 "/" $2 "/" $4] = 1
}
END {
    split("levi a4 bias", ms, " ")
    for (i = 1; i <= 3; i++) for (s = 0; s <= 1; s++) {
        k = ms[i] "/" s
        if (!sets[k "/id_test"] || !sets[k "/ood"] || !sets[k "/id_val"]) bad = bad "missing sets for " k "\n"
        if (groups[k] != 12) bad = bad k ": " groups[k] + 0 " OOD groups, expected 12\n"
    }
    n = 0; for (a in adapters) if (a ~ /^levi\/0\//) n++
    if (n != 7) bad = bad "levi has " n " adapters, expected 7\n"
    printf "%s", bad > out
}' "$out/results.csv"
if [ -s "$tmp/csv_check" ]; then
    fail "results.csv checks:"
    head -20 "$tmp/csv_check"
fi
echo "results.csv: $(($(wc -l <"$out/results.csv") - 1)) rows checked"
grep -Eq '"lower_is_better":[[:space:]]*true' "$out/results.json" || fail "results.json lacks lower_is_better"
grep -Eq '"chosen_lr":[[:space:]]*0.001,' "$out/results.json" || fail "results.json lacks chosen_lr 0.001"

# 3. A second run skips every finished run (6), reuses the features and reproduces the CSV.
cp "$out/results.csv" "$tmp/first.csv"
t0=$(date +%s)
"$levi" "${args[@]}" >"$tmp/log2" 2>&1
rc=$?
t2=$(($(date +%s) - t0))
echo "second fit: exit $rc in $t2 s"
[ $rc -eq 0 ] || { tail -20 "$tmp/log2"; fail "second levi fit exited $rc"; }
n_skipped=$(grep -c "finished earlier" "$tmp/log2")
[ "$n_skipped" -eq 6 ] || fail "second run skipped $n_skipped runs, expected 6"
grep -q "features: reused cache" "$tmp/log2" || fail "second run did not reuse the feature cache"
[ "$t2" -le 30 ] || fail "second run took $t2 s; expected a quick resume (<= 30 s)"
cmp -s "$tmp/first.csv" "$out/results.csv" || fail "results.csv changed on the resumed run"

# 3b. --feature-dropout reaches the adapters: the default run saved 0.5 in its configuration;
#     with 0 the levi run counts as changed, trains again and saves 0.
grep -Eq '"feature_dropout":[[:space:]]*0.5[,}]' "$out/runs/levi/seed0/config.json" ||
    fail "runs/levi/seed0/config.json lacks the default feature_dropout 0.5"
cp -r "$out" "$tmp/fd0"
"$levi" fit movielens --subsample 3000 --epochs 2 --seeds 1 --lrs 1e-3 --methods levi \
    --out "$tmp/fd0" --data "$data" --model "$model" --jobs 1 --feature-dropout 0 >"$tmp/log_fd" 2>&1 ||
    { tail -10 "$tmp/log_fd"; fail "levi fit --feature-dropout 0 failed"; }
grep -q "settings changed since the saved run" "$tmp/log_fd" ||
    fail "--feature-dropout 0 did not invalidate the saved levi run"
grep -Eq '"feature_dropout":[[:space:]]*0[,}]' "$tmp/fd0/runs/levi/seed0/config.json" ||
    fail "--feature-dropout 0 did not reach runs/levi/seed0/config.json"

# 3c. --precision bf16: a saved f32 run counts as changed and trains again; the run's config,
#     fit.json and report.md say bf16; an unknown precision is a usage error (exit 2).
cp -r "$out" "$tmp/bf16"
"$levi" fit movielens --subsample 3000 --epochs 2 --seeds 1 --lrs 1e-3 --methods levi \
    --out "$tmp/bf16" --data "$data" --model "$model" --jobs 1 --precision bf16 >"$tmp/log_bf" 2>&1 ||
    { tail -10 "$tmp/log_bf"; fail "levi fit --precision bf16 failed"; }
grep -q "settings changed since the saved run" "$tmp/log_bf" ||
    fail "--precision bf16 did not invalidate the saved f32 levi run"
grep -Eq '"precision":[[:space:]]*"bf16"' "$tmp/bf16/runs/levi/seed0/config.json" ||
    fail "--precision bf16 did not reach runs/levi/seed0/config.json"
grep -Eq '"precision":[[:space:]]*"bf16"' "$tmp/bf16/fit.json" || fail "fit.json lacks precision bf16"
grep -q "bfloat16" "$tmp/bf16/report.md" || fail "report.md does not say the heads trained in bf16"
"$levi" fit movielens --out "$tmp/bad" --precision fp8 >"$tmp/log_bp" 2>&1
rc=$?
[ $rc -eq 2 ] && grep -q -- "--precision: expected f32 or bf16, found 'fp8'" "$tmp/log_bp" ||
    fail "--precision fp8: exit $rc, $(head -c 200 "$tmp/log_bp")"

# 4. levi eval recomputes the metrics from the checkpoints: the same numbers.
"$levi" eval "$out" >"$tmp/log3" 2>&1
rc=$?
[ $rc -eq 0 ] || { tail -20 "$tmp/log3"; fail "levi eval exited $rc"; }
cmp -s "$tmp/first.csv" "$out/results.csv" || {
    diff "$tmp/first.csv" "$out/results.csv" | head -5
    fail "levi eval gave different metrics"
}

# 5. levi predict on new rows: known ids, an unseen user and an unseen movie.
cat >"$tmp/rows.csv" <<'EOF'
user_id,age,occupation,zip_code,item_id,title
1,24,technician,85711,1,Toy Story (1995)
196,49,writer,55105,242,Kolya (1996)
999999,30,astronaut,00000,99999,"A Movie Nobody Saw, The (2031)"
EOF
for m in levi a4 bias; do
    "$levi" predict "$out" --method $m --input "$tmp/rows.csv" --output "$tmp/pred-$m.csv" \
        >"$tmp/log4" 2>&1
    rc=$?
    [ $rc -eq 0 ] || { tail -10 "$tmp/log4"; fail "levi predict --method $m exited $rc"; continue; }
    lines=$(wc -l <"$tmp/pred-$m.csv")
    [ "$lines" -eq 4 ] || fail "predict $m: $lines lines, expected a header and 3 rows"
    head -1 "$tmp/pred-$m.csv" | grep -q '^row,prediction,seed0,seed1$' ||
        fail "predict $m: header is '$(head -1 "$tmp/pred-$m.csv")'"
    awk -F, 'NR > 1 && !($2 + 0 >= 0.5 && $2 + 0 <= 5.5) { exit 1 }' "$tmp/pred-$m.csv" ||
        fail "predict $m: a prediction outside 0.5..5.5: $(cat "$tmp/pred-$m.csv")"
done
grep -q "unseen in training -> unknown slot" "$tmp/log4" || fail "predict did not report unseen ids"

# 6. SIGINT during training (one process): exit 130, the run left resumable (state, no result).
rm -rf "$tmp/int"
"$levi" fit movielens --subsample 3000 --epochs 1000 --patience 1000 --seeds 1 --lrs 1e-3 \
    --methods a4 --out "$tmp/int" --data "$data" --jobs 1 >"$tmp/log5" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    [ -s "$tmp/int/runs/a4/seed0/state.safetensors" ] && break
    sleep 0.2
done
kill -INT $pid
wait $pid
rc=$?
[ $rc -eq 130 ] || { tail -5 "$tmp/log5"; fail "interrupted fit exited $rc, expected 130"; }
[ -s "$tmp/int/runs/a4/seed0/state.safetensors" ] || fail "no training state after SIGINT"
[ ! -e "$tmp/int/runs/a4/seed0/result.json" ] || fail "an interrupted run wrote result.json"
grep -q "run the same command again to resume" "$tmp/log5" || fail "no resume hint after SIGINT"

# 7. SIGINT with worker processes: the bias runs finish, then both a4 seeds train side by
#    side until the parent gets SIGINT; it stops them at a safe point and exits 130, and the
#    same command again skips the finished runs and resumes the others (interrupted again).
par=(fit movielens --subsample 3000 --epochs 1000 --patience 1000 --seeds 2 --lrs 1e-3
     --methods bias,a4 --out "$tmp/pint" --data "$data" --jobs 2)
wait_workers() { # pid: waits until it has 2 worker processes and both a4 runs have a state
    for _ in $(seq 1 300); do
        if [ "$(pgrep -c -P "$1")" -eq 2 ] && [ -s "$tmp/pint/runs/a4/seed0/state.safetensors" ] &&
            [ -s "$tmp/pint/runs/a4/seed1/state.safetensors" ]; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}
stop_within() { # pid seconds: SIGINT, then SIGKILL (it and its workers) if it hangs
    kill -INT "$1"
    for _ in $(seq 1 $((5 * $2))); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.2
    done
    fail "pid $1 still running $2 s after SIGINT"
    pkill -KILL -P "$1"
    kill -KILL "$1"
}
for round in 1 2; do
    "$levi" "${par[@]}" >"$tmp/log6.$round" 2>&1 &
    pid=$!
    wait_workers $pid || fail "round $round: the two a4 workers did not start"
    stop_within $pid 60
    wait $pid
    rc=$?
    [ $rc -eq 130 ] || { tail -5 "$tmp/log6.$round"; fail "round $round: exit $rc, expected 130"; }
    for s in 0 1; do
        [ -s "$tmp/pint/runs/a4/seed$s/state.safetensors" ] ||
            fail "round $round: no a4 seed $s training state after SIGINT"
        [ ! -e "$tmp/pint/runs/a4/seed$s/result.json" ] ||
            fail "round $round: the interrupted a4 seed $s wrote result.json"
        [ -s "$tmp/pint/runs/bias/seed$s/result.json" ] ||
            fail "round $round: bias seed $s has no result"
    done
    grep -q "run the same command again to resume" "$tmp/log6.$round" ||
        fail "round $round: no resume hint"
done
n_skipped=$(grep -c "finished earlier" "$tmp/log6.2")
[ "$n_skipped" -eq 2 ] || fail "the resumed parallel fit skipped $n_skipped runs, expected 2"
! grep -q "settings changed" "$tmp/log6.2" || fail "the resumed parallel fit started a run again"

# 8. A failing worker (its run folder is a file) stops the other one; the fit exits with the
#    failed run's code and prints its error.
rm -rf "$tmp/bad"
mkdir -p "$tmp/bad/runs/a4"
echo "not a folder" >"$tmp/bad/runs/a4/seed1"
timeout -s KILL 120 "$levi" fit movielens --subsample 3000 --epochs 1000 --patience 1000 \
    --seeds 2 --lrs 1e-3 --methods a4 --out "$tmp/bad" --data "$data" --jobs 2 >"$tmp/log7" 2>&1
rc=$?
[ $rc -eq 1 ] || { tail -5 "$tmp/log7"; fail "a fit with a failing worker exited $rc, expected 1"; }
grep -q "runs/a4/seed1: exists and is not a directory" "$tmp/log7" ||
    fail "the failed worker's error is not printed"
grep -q "a4 seed 1 failed (exit code 1); stopped the other runs" "$tmp/log7" ||
    fail "no line naming the failed run"
[ ! -e "$tmp/bad/runs/a4/seed0/result.json" ] || fail "the other worker was not stopped"

# 9. --jobs 2 with an LR search (seeds wait for their method's choice) gives the same bits as
#    --jobs 1 --threads 1: every run is single-threaded either way.
grid=(fit movielens --subsample 3000 --epochs 2 --seeds 2 --lrs 1e-3,1e-2 --methods levi,a4,bias
      --data "$data" --model "$model")
timeout -s KILL 300 "$levi" "${grid[@]}" --out "$tmp/g2" --jobs 2 >"$tmp/log8" 2>&1 ||
    { tail -10 "$tmp/log8"; fail "grid fit with --jobs 2 failed"; }
timeout -s KILL 300 "$levi" "${grid[@]}" --out "$tmp/g1" --jobs 1 --threads 1 >"$tmp/log9" 2>&1 ||
    { tail -10 "$tmp/log9"; fail "grid fit with --jobs 1 --threads 1 failed"; }
grep -q "in 2 worker processes" "$tmp/log8" || fail "grid fit: no worker processes"
cmp -s "$tmp/g1/results.csv" "$tmp/g2/results.csv" || {
    diff "$tmp/g1/results.csv" "$tmp/g2/results.csv" | head -5
    fail "results.csv differs between --jobs 2 and --jobs 1 --threads 1"
}
n_models=0
for f in $(cd "$tmp/g1" && find runs -name model.safetensors | sort); do
    n_models=$((n_models + 1))
    cmp -s "$tmp/g1/$f" "$tmp/g2/$f" || fail "$f differs between --jobs 2 and --jobs 1 --threads 1"
done
# seed0/ + seed1/ per method, and each searched method keeps its losing LR in lr-search/.
[ "$n_models" -eq 8 ] || fail "grid fit: $n_models checkpoints, expected 8"
echo "--jobs 2 vs --jobs 1 --threads 1: $n_models checkpoints and results.csv compared"

if [ $failures -ne 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "ok: levi fit, resume, eval, predict and interrupt on MovieLens (3000-row subsample)"
exit 0
