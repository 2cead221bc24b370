#!/usr/bin/env bash
# Builds levi and runs its whole test suite with ctest.
#   scripts/test.sh                 Release build in build/
#   scripts/test.sh --sanitize      ASan + UBSan build in build-asan/
# Tests that need the model or the shared data find them through LEVI_MODEL_DIR, LEVI_DATA_DIR
# and LEVI_RECBOLE_DIR (defaults: the setup cache and ../shared/data); a test whose input is
# absent prints why and is reported as skipped.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir="$here/build"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --sanitize) build_dir="$here/build-asan"; extra=(-DLEVI_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug) ;;
    --build-dir) build_dir=$2; shift ;;
    -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test.sh: unknown option '$1'" >&2; exit 2 ;;
    esac
    shift
done
cmake -S "$here" -B "$build_dir" "${extra[@]}" >/dev/null
cmake --build "$build_dir" -j"$(nproc)" >/dev/null
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cd "$build_dir" && ctest --output-on-failure --timeout 900
