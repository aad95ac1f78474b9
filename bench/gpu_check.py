"""GPU check: mine a generated dataset on the GPU(s), rerun it on CPU, compare, print timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clip_b32(folder: Path) -> None:
    """A randomly initialised vision tower the size of CLIP ViT-B/32 (no hub access)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)


def mine(args: list[str], **env: str) -> float:
    """Run launch.py; exit with its output if it fails. Returns wall seconds."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    print(run.stdout[-4000:])
    if run.returncode:
        sys.exit(f"run failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return time.perf_counter() - t0


def export_embeddings(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """Per-record image and text embeddings of a finished run, for the CPU rerun."""
    from hnm.config import make_config
    from hnm.data import load_dataset

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg.pop("provenance", None)
    ds = load_dataset(make_config(cfg))
    np.save(out / "image.npy", np.load(run_dir / "tables/visual.npy"))
    np.save(out / "text.npy", np.load(run_dir / "tables/text.npy")[ds.text_ids])
    return out / "image.npy", out / "text.npy"


def row(name: str, seconds: float, run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    phases = " ".join(f"{k}={v:.2f}" for k, v in metrics["timing"].items())
    devices = sorted({s["device"] for s in metrics["shards"]})
    return f"{name:<30} {','.join(devices):<14} wall {seconds:7.2f}s  {phases}"


def main() -> int:
    from hnm.demo import make_demo

    tmp = Path(tempfile.mkdtemp(prefix="hnm_gpu_"))
    annotations = make_demo(tmp / "data", num_dialogs=int(os.environ.get("DIALOGS", "400")))
    clip_b32(tmp / "clip")
    common = ["--config", "configs/demo.yaml", "--annotations", str(annotations),
              "--image-dir", str(tmp / "data"), "--batch-size", "128", "--num-workers", "4",
              "--k-nn", "100"]
    gpu_s = mine([*common, "--visual-encoder", str(tmp / "clip"), "--output-dir",
                  str(tmp / "gpu")])
    image, text = export_embeddings(tmp / "gpu", tmp)
    cpu_s = mine([*common, "--image-embeddings", str(image), "--text-embeddings", str(text),
                  "--output-dir", str(tmp / "cpu"), "--cpu-workers", "4"],
                 CUDA_VISIBLE_DEVICES="")
    same = (tmp / "gpu/negatives.jsonl").read_bytes() == \
        (tmp / "cpu/negatives.jsonl").read_bytes()
    print(row("GPU run (random CLIP-B/32)", gpu_s, tmp / "gpu"))
    print(row("CPU rerun, same embeddings", cpu_s, tmp / "cpu"))
    print(f"negatives identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
