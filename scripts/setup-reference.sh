#!/usr/bin/env bash
# Creates the Python environment that regenerates levi's reference files (tests/ref/gen_*.py)
# and runs the PyTorch side of the benchmarks. Not needed to build, test or use levi: the
# reference files are committed. Debian's python3-torch (1.13) is the torch; transformers and
# sentence-transformers come from PyPI, pinned.
#   scripts/setup-reference.sh      -> prints the python to use: $LEVI_CACHE/pyref/bin/python
set -euo pipefail
cache=${LEVI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/levi}
venv="$cache/pyref"
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
    sudo_cmd=()
    [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq python3-torch python3-numpy python3-venv >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check 'transformers==4.36.2' 'safetensors' 'huggingface_hub<0.26'
# sentence-transformers' declared dependencies would pull a second torch: install it alone.
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps 'sentence-transformers==2.7.0'
echo "$venv/bin/python"
