"""Whole runs on an AVDN processed dataset (pickled chunks of items holding image tensors)
against the same data as JSON + PNG files: wall time and the time of each phase, for the
pixels encoder and the default one, and whether both inputs gave the same negatives.

    python bench/bench_avdn.py --n 10000 --encoders pixels,default

The data are the demo's aerial views (hnm.demo) at --size pixels: PNG files for the JSON
input, and the same pixels as float32 tensors normalised as AVDN's preprocessing does
((pixels 0-255 - mean) / std, AVDN's values), 1,000 items a chunk, with tokenizer-output
fields and a language-model negative like the original's items. The chunk runs name the
normalisation as numbers (what `--tensor-normalization avdn` stands for), so that the
script measures any version of hnm the same way; `--label` names the results file.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hnm.demo import generate  # noqa: E402

PER_CHUNK = 1000
# AVDN's normalisation (data/Normalizer.py), in 0-255 units
AVDN_MEAN, AVDN_STD = (60.134, 49.697, 40.746), (29.99, 24.498, 22.046)
MEAN = np.array(AVDN_MEAN, np.float32).reshape(3, 1, 1)
STD = np.array(AVDN_STD, np.float32).reshape(3, 1, 1)
NORMALIZATION = ",".join(repr(v / 255) for v in AVDN_MEAN + AVDN_STD)
ENCODERS = {"pixels": ["--visual-encoder", "pixels"], "default": []}
JSON_FIELDS = ["--text-field", "answer", "--group-field", "first_instruction"]


def write_data(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """root/json (annotations.json + images/) and root/avdn (chunk_*.pkl), once."""
    json_file, chunks = root / "json" / "annotations.json", root / "avdn"
    if json_file.is_file() and (chunks / "done").is_file():
        return json_file, chunks
    import torch
    from transformers import BatchEncoding

    records, pngs = generate(num_dialogs=-(-n // 5), image_size=size)
    records = records[:n]
    (root / "json" / "images").mkdir(parents=True, exist_ok=True)
    chunks.mkdir(parents=True, exist_ok=True)
    items = {}
    for index, record in enumerate(records):
        data = pngs[record["image"]]
        (root / "json" / record["image"]).write_bytes(data)
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
        tensor = (pixels.transpose(2, 0, 1) - MEAN) / STD
        tokens = BatchEncoding({"input_ids": torch.zeros(1, 64, dtype=torch.long),
                                "attention_mask": torch.ones(1, 64, dtype=torch.long)})
        # torch.tensor copies into C order, as the preprocessing's torch.tensor(view) does
        items[index] = {"current_view_image": torch.tensor(tensor),
                        "answer": record["answer"], "first_instruction":
                        record["first_instruction"], "map_name": record["map_name"],
                        "question": "where next?", "tokenized_answer": tokens,
                        "contrastive_data": {"negative_text": "go back",
                                             "tokenized_negative": tokens}}
        if len(items) == PER_CHUNK or index == len(records) - 1:
            with open(chunks / f"chunk_{index // PER_CHUNK}.pkl", "wb") as handle:
                pickle.dump(items, handle)
            items = {}
    json_file.write_text(json.dumps(records), encoding="utf-8")
    (chunks / "done").write_text("")
    return json_file, chunks


def mine(runs: Path, fmt: str, source: Path, encoder: str) -> dict[str, Any]:
    """One fresh run in `runs`, timed; its phase times from metrics.json."""
    out = runs / f"{fmt}-{encoder}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["--annotations", source, "--output-dir", out, "--config",
            ROOT / "configs" / "train.yaml", "--quiet", *ENCODERS[encoder]]
    args += ["--image-dir", source.parent, *JSON_FIELDS] if fmt == "json" \
        else ["--input-format", "avdn", "--tensor-normalization", NORMALIZATION]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), *map(str, args)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{fmt}/{encoder} failed: {done.stderr.strip()}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"format": fmt, "encoder": encoder, "wall_s": round(wall, 1),
            "run_wall_s": round(metrics["wall_seconds"], 1),
            "phases_s": {k: round(v, 1) for k, v in metrics["timing"].items()},
            "precision": metrics["provenance"]["precision"], "run": str(out)}


def negatives_by_position(run: Path) -> list[list[tuple[int, str]]]:
    """Each record's negatives as (position of the negative's record, type)."""
    records = [json.loads(line) for line in (run / "negatives.jsonl").open()]
    position = {(r.get("id", i)): i for i, r in enumerate(records)}
    return [[(position[n["id"]], n["type"]) for n in r["negatives"]] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--root", type=Path, default=Path("/tmp/hnm-bench-avdn"))
    parser.add_argument("--encoders", default="pixels,default")
    parser.add_argument("--label", default="results", help="results file: LABEL.json")
    args = parser.parse_args()
    root = args.root / f"n{args.n}-s{args.size}"
    t0 = time.perf_counter()
    json_file, chunks = write_data(root, args.n, args.size)
    sizes = {"png_mb": sum(p.stat().st_size for p in (root / "json" / "images").iterdir()),
             "pkl_mb": sum(p.stat().st_size for p in chunks.glob("*.pkl"))}
    print(f"data: {args.n} items of {args.size}x{args.size} in {time.perf_counter() - t0:.0f}s;"
          f" PNG {sizes['png_mb'] / 1e6:.0f} MB, chunks {sizes['pkl_mb'] / 1e6:.0f} MB")
    results = []
    for encoder in args.encoders.split(","):
        for fmt, source in (("json", json_file), ("avdn", chunks)):
            results.append(mine(root / "runs" / args.label, fmt, source, encoder))
            r = results[-1]
            print(f"{encoder:8s} {fmt:5s} wall {r['wall_s']:7.1f}s  phases {r['phases_s']}",
                  flush=True)
        same = negatives_by_position(Path(results[-2]["run"])) == \
            negatives_by_position(Path(results[-1]["run"]))
        print(f"{encoder}: same negatives from JSON + PNG and from the chunks: {same}")
        results[-1]["same_negatives_as_json"] = same
    report = {"n": args.n, "size": args.size, "machine": platform.processor() or
              platform.machine(), "cores": len(__import__("os").sched_getaffinity(0)),
              **sizes, "runs": results}
    (root / f"{args.label}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {root / args.label}.json")


if __name__ == "__main__":
    main()
