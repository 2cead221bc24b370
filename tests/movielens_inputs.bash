# Sourced by the CLI tests that run levi on real MovieLens-100K: sets `data` (RecBole atomic
# files from LEVI_RECBOLE_DIR, or the GroupLens folder LEVI_DATA_DIR/ml-100k) and `model`
# (LEVI_MODEL_DIR, all-MiniLM-L6-v2), or prints why and exits 77 (ctest: skipped). Then the
# common scaffolding: `tmp` (a fresh folder, removed on exit), LEVI_CACHE inside it, no
# progress bars, `out=$tmp/out`, and `fail MSG`, which prints MSG and counts it in `failures`.
data=""
if [ -n "${LEVI_RECBOLE_DIR:-}" ] && [ -f "$LEVI_RECBOLE_DIR/ml-100k.inter" ]; then
    data=$LEVI_RECBOLE_DIR
elif [ -n "${LEVI_DATA_DIR:-}" ] && [ -f "$LEVI_DATA_DIR/ml-100k/u.data" ]; then
    data=$LEVI_DATA_DIR/ml-100k
else
    echo "skip: no MovieLens-100K (set LEVI_RECBOLE_DIR to RecBole's ml-100k atomic files or" \
         "LEVI_DATA_DIR to a folder holding ml-100k/)"
    exit 77
fi
model=${LEVI_MODEL_DIR:-}
if [ -z "$model" ] || [ ! -f "$model/model.safetensors" ]; then
    echo "skip: LEVI_MODEL_DIR does not name a folder with all-MiniLM-L6-v2's model.safetensors"
    exit 77
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export LEVI_CACHE=$tmp/cache LEVI_PROGRESS=0
out=$tmp/out
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
