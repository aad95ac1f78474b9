"""The GPU check cannot rot: its rehearsal (bench/gpu_check.sh --rehearse --short) runs
every step as on the device machine, here, on CPU, and must come out as the device's
would: the tree staged as it travels, the packages the device image lacks hidden, the
encoders built on the spot, the CPU rerun's negatives byte-identical, the table printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_rehearsed_gpu_check_passes():
    env = {**os.environ, "PYTHON": sys.executable, "HNM_CHECK_SECONDS": "600"}
    env.pop("OUT", None)
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--rehearse", "--short"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert re.search(r"^staged tree: \d+ MiB \(the device takes 64 MiB at most\)$", out, re.M)
    assert ("Index: FAISS is not installed (not on the device image, and faiss-gpu-cu12's "
            "CUDA libraries are too large to carry): the runs measure hnm's torch index "
            "(TorchFlatIP) on the CPU standing in for the GPU") in out
    rows = [line for line in out.splitlines()
            if line.startswith(("CPU as GPU, --precision auto", "CPU rerun, same embeddings"))]
    assert len(rows) == 3  # the auto run as it finished, then the table's two rows
    assert all(" torch-cpu " in r and "samples/s" in r for r in rows)
    assert out.rstrip().endswith(
        "negatives identical (CPU as GPU auto vs CPU rerun, byte for byte): yes")
