#!/usr/bin/env bash
# The GPU check, one prepared command for a lent GPU machine (no network, the image's
# python3 with torch and transformers, no faiss): install the carried wheels (if any), then
# mine a generated dataset with random CLIP-B/32- and MiniLM-sized encoders built on the
# spot, in the default precision and in each other one; rerun the default's embeddings on
# CPU, compare the negatives byte for byte, and print a throughput table (samples/s, embed
# img/s, data wait, start-up, search, the index each run used). Estimated at about 4
# minutes, not yet timed on a GPU (the python part stops after HNM_CHECK_SECONDS, 420 by
# default; what it printed is kept).
#
#   bench/gpu_check.sh [--dialogs 400] [--replicate 10] [--precisions fp32,bf16,fp16]
#   bench/gpu_check.sh --rehearse [--short] [...]
#
# Carried: only what travels with the working tree (tracked and untracked-not-ignored
# files), and optionally .carry/wheels/*.whl (named in the call's carry), installed with
# --target into a folder on PYTHONPATH. Without FAISS (the image has none; the CUDA
# libraries of faiss-gpu-cu12 are too large to carry) hnm's exact torch index runs on the
# GPU, and the check says so.
#
# --rehearse runs the same steps on this machine, without a GPU: the tree is copied as it
# would travel, the packages the device image lacks (faiss, the weight packages of the
# built-in encoders) are hidden (bench/device_image), the wheels are installed the same
# way, and the check runs with small encoders and data. --short: the default precision
# only (tests/test_gpu_check.py runs it). PYTHON names the interpreter (default python3, the device image's).
# If OUT is set (the device tool's folder), the output is also saved there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REHEARSE=0
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --rehearse) REHEARSE=1 ;;
        --short) ARGS+=(--precisions "") ;;
        *) ARGS+=("$arg") ;;
    esac
done
LIMIT_MIB=64  # what travels to the device machine at most

if [ "$REHEARSE" = 1 ]; then
    echo "== rehearsal on $(hostname): no GPU; every step as on the device, on CPU"
    STAGE=$(mktemp -d /tmp/hnm_gpu_stage.XXXXXX)
    trap 'rm -rf "$STAGE"' EXIT
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # what the device tool sends: tracked and untracked-not-ignored files, and .carry
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
            tar --null -T - -cf - | tar -xf - -C "$STAGE"
    else
        echo "not a git checkout: the whole folder is staged"
        tar --exclude=.venv --exclude=.git -cf - . | tar -xf - -C "$STAGE"
    fi
    if [ -d .carry ]; then cp -r .carry "$STAGE/"; fi
    SIZE=$(du -sm "$STAGE" | cut -f1)
    echo "staged tree: ${SIZE} MiB (the device takes ${LIMIT_MIB} MiB at most)"
    if [ "$SIZE" -gt "$LIMIT_MIB" ]; then echo "the tree is too large to travel"; exit 1; fi
    cd "$STAGE"
    export PYTHONPATH="$STAGE/bench/device_image${PYTHONPATH:+:$PYTHONPATH}"
    ARGS=(--rehearse "${ARGS[@]}")
else
    nvidia-smi --query-gpu=name,memory.total,memory.used,compute_cap,driver_version \
        --format=csv || { echo "no GPU visible"; exit 1; }
fi

if compgen -G ".carry/wheels/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/hnm_site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        .carry/wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed carried wheels: $(ls .carry/wheels | tr '\n' ' ')"
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
    set -o pipefail
    timeout "${HNM_CHECK_SECONDS:-420}" "$PY" bench/gpu_check.py "${ARGS[@]}" 2>&1 |
        tee "$OUT/gpu_check.txt"
else
    timeout "${HNM_CHECK_SECONDS:-420}" "$PY" bench/gpu_check.py "${ARGS[@]}"
fi
