#!/usr/bin/env bash
# End-to-end test of the report's per-layer study, figures, efficiency table and claims:
# `levi fit movielens --methods layers,levi,a4` on a 300-row slice (1 seed, 1 epoch, one LR)
# must give methods layer0..layer6 in results.json (run folders runs/layer<k>/seed0), a
# "cost" block in every run result with the numbers the model definitions give, two SVG
# figures that parse as XML with the expected ticks, series and bars, and report.md with the
# Fig. 4, efficiency and claims sections linking the figures.
#
#   tests/cli_report.sh <levi binary>
# Inputs: LEVI_RECBOLE_DIR or LEVI_DATA_DIR/ml-100k, and LEVI_MODEL_DIR (all-MiniLM-L6-v2).
# Exits 77 (skipped) when they are absent.
set -u
levi=${1:?usage: cli_report.sh <levi binary>}

. "$(dirname "${BASH_SOURCE[0]}")/movielens_inputs.bash"
py=$(command -v python3 || true)
if [ -z "$py" ]; then
    echo "skip: python3 (for the XML and JSON checks) not found"
    exit 77
fi

"$levi" fit movielens --subsample 300 --epochs 1 --seeds 1 --lrs 1e-3 --methods layers,levi,a4 \
    --out "$out" --data "$data" --model "$model" --jobs 2 >"$tmp/log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    tail -30 "$tmp/log"
    echo "FAIL: levi fit exited $rc"
    exit 1
fi

# An unknown layer is a usage error naming the valid range.
"$levi" fit movielens --subsample 300 --epochs 1 --seeds 1 --methods layer9 \
    --out "$tmp/bad" --data "$data" --model "$model" >"$tmp/log_bad" 2>&1
rc_bad=$?

"$py" - "$out" "$model" "$rc_bad" "$tmp/log_bad" <<'PY'
import json, math, os, sys
import xml.etree.ElementTree as ET

out, model, rc_bad, log_bad = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
failures = []
def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)

r = json.load(open(os.path.join(out, "results.json")))
names = [m["method"] for m in r["methods"]]
layers = ["layer%d" % k for k in range(7)]
check(names == layers + ["levi", "a4"], "results.json methods: %s" % names)
check(r["config"]["methods"] == names, "config.methods names every method")
fit = json.load(open(os.path.join(out, "fit.json")))
check(fit["methods"] == names, "fit.json names every method")
for k in range(7):
    res = os.path.join(out, "runs", "layer%d" % k, "seed0", "result.json")
    check(os.path.isfile(res), "run folder runs/layer%d/seed0 has result.json" % k)

# Cost block against the definitions: MiniLM (H 384, I 1536, V 30522, P 512, types 2, L 6).
cfg = json.load(open(os.path.join(model, "config.json")))
H, I = cfg["hidden_size"], cfg["intermediate_size"]
emb = (cfg["vocab_size"] + cfg["max_position_embeddings"] + cfg["type_vocab_size"]) * H + 2 * H
per_layer = 4 * (H * H + H) + 4 * H + (H * I + I) + (I * H + H)
by = {m["method"]: m for m in r["methods"]}
for k in (0, 3, 6):
    c = by["layer%d" % k]["runs"][0]["cost"]
    T = c["mean_tokens"]
    bb_flops = k * (8 * T * H * H + 4 * T * H * I + 4 * T * T * H)
    check(c["backbone_layers"] == k, "layer%d reads the backbone through layer %d" % (k, k))
    check(c["inference_params"] == c["trainable_params"] + emb + k * per_layer,
          "layer%d inference params = head + embeddings + %d layers" % (k, k))
    check(abs(c["flops_per_example"] - bb_flops) < 0.01 * bb_flops + 2e6,
          "layer%d FLOPs %.4g ~ backbone %.4g + head" % (k, c["flops_per_example"], bb_flops))
    check(c["seconds_per_epoch"] > 0 and c["peak_rss_kib"] > 0, "layer%d timing and RSS" % k)
a4 = by["a4"]["runs"][0]["cost"]
check(a4["backbone_layers"] == -1 and a4["inference_params"] == a4["trainable_params"],
      "a4 needs no backbone")
check(10 < by["levi"]["runs"][0]["cost"]["mean_tokens"] < 128, "mean tokens per text plausible")
for m in r["methods"]:
    for s in ("id_test", "ood"):
        v = m["summary"][s]["mean"]
        check(v is not None and 0.5 < v < 2.0, "%s %s RMSE %s in (0.5, 2)" % (m["method"], s, v))

# Figures: well-formed XML, axes ticks, one polyline per series, one bar per method x set.
ns = "{http://www.w3.org/2000/svg}"
fig = ET.parse(os.path.join(out, "fig4-layers.svg")).getroot()
texts = [t.text for t in fig.iter(ns + "text")]
check(all(str(k) in texts for k in range(7)), "fig4 x ticks 0..6")
check(len(list(fig.iter(ns + "polyline"))) == 2, "fig4 has ID and OOD lines")
check(len(list(fig.iter(ns + "circle"))) == 14, "fig4 has 14 points")
check("ID test" in texts and "OOD" in texts, "fig4 legend")
# y ticks (right-aligned labels): evenly spaced at 1, 2 or 5 times a power of ten, covering
# every mean +- std of the plot.
yt = [float(t.text) for t in fig.iter(ns + "text") if t.get("text-anchor") == "end"]
steps = [b - a for a, b in zip(yt, yt[1:])]
check(len(yt) >= 3 and max(steps) - min(steps) < 1e-9, "fig4 y ticks evenly spaced: %s" % yt)
if steps:
    mant = steps[0] / 10 ** math.floor(math.log10(steps[0]) + 1e-9)
    check(any(abs(mant - m) < 1e-6 for m in (1, 2, 5)), "fig4 y step %g is 1/2/5 x 10^k" % steps[0])
    lo = min(by[l]["summary"][s]["mean"] - by[l]["summary"][s]["std"] for l in layers for s in ("id_test", "ood"))
    hi = max(by[l]["summary"][s]["mean"] + by[l]["summary"][s]["std"] for l in layers for s in ("id_test", "ood"))
    check(yt[0] <= lo + 1e-9 and yt[-1] >= hi - 1e-9, "fig4 y ticks [%g, %g] cover [%g, %g]" % (yt[0], yt[-1], lo, hi))
met = ET.parse(os.path.join(out, "methods.svg")).getroot()
rects = [e for e in met.iter(ns + "rect") if e.get("fill") not in ("white", "none")]
# 2 methods x 2 sets bars + 2 legend swatches
check(len(rects) == 6, "methods.svg has 4 bars and 2 legend swatches (found %d)" % len(rects))
mtexts = [t.text for t in met.iter(ns + "text")]
check("levi" in mtexts and "a4" in mtexts, "methods.svg labels the methods")

md = open(os.path.join(out, "report.md")).read()
for sec in ("## Fig. 4 style", "](fig4-layers.svg)", "](methods.svg)", "## Table 15 style",
            "## The paper's claims", "LEVI best OOD", "Early layers better OOD",
            "Table 5:", "FT worse OOD than LP or FS: **not run**"):
    check(sec in md, "report.md has %r" % sec)

check(rc_bad == 2, "--methods layer9 is a usage error (exit %d)" % rc_bad)
check("expected a feature layer in [0, 6]" in open(log_bad).read(), "layer9 error names the range")
sys.exit(1 if failures else 0)
PY
rc=$?
[ $rc -eq 0 ] && echo "cli_report: all checks passed"
exit $rc
