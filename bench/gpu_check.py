"""GPU check: mine a generated dataset on the GPU(s) in each precision, print the speed of
each, rerun the default precision's embeddings on CPU and compare the negatives."""

from __future__ import annotations

import argparse
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


def replicate(annotations: Path, times: int) -> Path:
    """The demo's records `times` over (new ids and groups, the same image files): a run
    large enough that start-up no longer dominates its wall time."""
    records = json.loads(annotations.read_text())
    copies = [{**r, "id": f"{r['id']}_{k}", "first_instruction": f"{r['first_instruction']} {k}"}
              for k in range(times) for r in records]
    path = annotations.with_name(f"annotations_x{times}.json")
    path.write_text(json.dumps(copies))
    return path


def mine(args: list[str], **env: str) -> float:
    """Run launch.py; exit with its output if it fails. Returns wall seconds."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    if run.returncode:
        sys.exit(f"run failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return time.perf_counter() - t0


def export_embeddings(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """Per-record image and text embeddings of a finished run, for the CPU rerun."""
    from hnm.config import make_config
    from hnm.data import load_corpus

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg.pop("provenance", None)
    ds = load_corpus(make_config(cfg))
    np.save(out / "image.npy", np.load(run_dir / "tables/visual.npy"))
    np.save(out / "text.npy", np.load(run_dir / "tables/text.npy")[ds.text_ids])
    return out / "image.npy", out / "text.npy"


def row(name: str, seconds: float, run_dir: Path) -> str:
    """Wall time, samples/s end to end, embed phase img/s, data wait and start-up."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n = metrics["global"]["anchors"]
    embed = [json.loads(p.read_text()) for p in run_dir.glob("embeddings/done_*")]
    phase = max(e["embed_images"] for e in embed)
    devices = ",".join(sorted({s["device"] for s in metrics["shards"]}))
    t = metrics["timing"]
    return (f"{name:<26} {devices:<10} {metrics['provenance'].get('precision', '?'):<5} "
            f"wall {seconds:6.1f}s  {n / seconds:7.0f} samples/s  embed {n / phase:7.0f} img/s"
            f"  data wait {t.get('data_wait', 0):5.1f}s  start-up {t.get('startup', 0):5.1f}s"
            f"  search {t['search']:5.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dialogs", type=int, default=int(os.environ.get("DIALOGS", "400")),
                        help="demo dialogs of 5 images (distinct images)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--replicate", type=int, default=10,
                        help="records repeated this often in the timed runs")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    args = parser.parse_args()
    from hnm.demo import make_demo

    tmp = Path(tempfile.mkdtemp(prefix="hnm_gpu_"))
    t0 = time.perf_counter()
    annotations = replicate(make_demo(tmp / "data", num_dialogs=args.dialogs,
                                      image_size=args.image_size), args.replicate)
    clip_b32(tmp / "clip")
    print(f"data and model ready in {time.perf_counter() - t0:.0f}s: "
          f"{args.dialogs * 5 * args.replicate} samples, {args.image_size}px PNG")
    common = ["--config", "configs/demo.yaml", "--annotations", str(annotations),
              "--image-dir", str(tmp / "data"), "--batch-size", "256", "--k-nn", "100",
              "--quiet"]
    rows, done = [], set()
    for precision in ["auto", *args.precisions.split(",")]:
        if precision in done:
            continue
        out = tmp / f"gpu_{precision}"
        seconds = mine([*common, "--visual-encoder", str(tmp / "clip"), "--precision",
                        precision, "--output-dir", str(out)])
        rows.append(row(f"GPU, --precision {precision}", seconds, out))
        done.add(json.loads((out / "plan.json").read_text())["precision"])
    image, text = export_embeddings(tmp / "gpu_auto", tmp)
    cpu_s = mine([*common, "--image-embeddings", str(image), "--text-embeddings", str(text),
                  "--output-dir", str(tmp / "cpu")], CUDA_VISIBLE_DEVICES="")
    same = (tmp / "gpu_auto/negatives.jsonl").read_bytes() == \
        (tmp / "cpu/negatives.jsonl").read_bytes()
    print("\n".join(rows))
    print(row("CPU rerun, same embeddings", cpu_s, tmp / "cpu"))
    print(f"negatives identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
