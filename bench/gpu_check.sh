#!/usr/bin/env bash
# GPU check (issue 25): preprocess images/s, re-caption captions/s and frozen-GPT-2 training samples/s on
# one CUDA GPU, in about 8 minutes, without network. The logic is bench/gpu_check.py; this wrapper sets the
# environment, installs carried wheels and runs it with the machine's own Python.
#
#   bench/gpu_check.sh [OUT_DIR] [--dry-run]   results: OUT_DIR (default $OUT, else bench/results/)
#   bench/gpu_check.sh --fetch-wheels          on a machine with network: fill .gpu_wheels/ with the pure-Python
#                                              packages a bare GPU image lacks (webdataset, braceexpand)
#   GPU_CHECK_DRY_RUN=1 bench/gpu_check.sh     same as --dry-run: every phase on the CPU, tiny models
#   PYTHON=/path/to/python bench/gpu_check.sh  another interpreter (default python3)
#
# On the GPU machine, from the repo root with .gpu_wheels carried: bench/gpu_check.sh "$OUT"
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
WHEELS=.gpu_wheels
# What prefixcap needs that the GPU image lacks; pure Python, so one wheel serves every platform.
CARRIED=(webdataset==1.0.2 braceexpand==0.1.7)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${CARRIED[@]}"
    ls -l "$WHEELS"
    exit 0
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/prefixcap_gpu_check_site"
    echo "gpu_check: installing the carried wheels of $WHEELS/ into $site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# prefixcap runs from the working tree (src/), the bench package from the repo root; nothing is downloaded.
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check "$@"
