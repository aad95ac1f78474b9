"""Reading speed of every input format (load + decode, one process), tarfile against the
webdataset package, and whole-run samples/s from JSONL + files, Parquet, WebDataset and a
Hugging Face dataset, on the same generated records with JPEG bytes."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hnm import writers  # noqa: E402
from hnm.config import Config, Fields  # noqa: E402
from hnm.data import load_corpus  # noqa: E402
from hnm.readers import image_stream, payload  # noqa: E402

FORMATS = ("jsonl", "csv", "parquet", "webdataset", "hf")
RUN_FORMATS = ("jsonl", "parquet", "webdataset", "hf")
FIELDS = Fields(image="jpg", text="text", group="group")
TEXT_DIM = 64  # precomputed text embeddings of the whole runs (random: any will do)
WORDS = ("red roof", "grey building", "small lake", "yellow field", "river bridge",
         "road crossing", "green field", "parking lot", "tall tower", "white tent")


# ---------------------------------------------------------------- data


def jpeg(rng: np.random.Generator, size: int, quality: int) -> bytes:
    """A smooth random picture with a few shapes: compresses like a photo, not like noise."""
    low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(size // 16, size // 3, 2)
        draw.rectangle((int(x), int(y), int(x + w), int(y + h)),
                       fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def record(i: int) -> dict:
    a, b = WORDS[i % len(WORDS)], WORDS[(i // len(WORDS)) % len(WORDS)]
    return {"id": f"{i:07d}", "text": f"fly past the {a} and land next to the {b}, waypoint {i}",
            "group": f"g{i // 5}"}


def generate(folder: Path, n: int, size: int, quality: int, per_shard: int) -> None:
    """The same records and JPEG bytes in every format; kept for later runs."""
    stamp = folder / "params.json"
    params = {"records": n, "image_size": size, "quality": quality, "per_shard": per_shard}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "jsonl/images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        data = jpeg(rng, size, quality)
        (folder / f"jsonl/images/{i:07d}.jpg").write_bytes(data)
        rows.append({**record(i), "jpg": data})
    with open(folder / "jsonl/annotations.jsonl", "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({**record(i), "jpg": f"images/{i:07d}.jpg"}) + "\n")
    with open(folder / "jsonl/annotations.csv", "w", encoding="utf-8") as handle:
        handle.write("id,text,group,jpg\n")
        for i in range(n):
            r = record(i)
            handle.write(f'{r["id"]},"{r["text"]}",{r["group"]},images/{i:07d}.jpg\n')
    writers.write_parquet_files(folder / "parquet", rows, per_shard, per_shard)
    samples = ((r["id"], {"jpg": r["jpg"], "txt": r["text"].encode(),
                          "json": json.dumps({"group": r["group"]}).encode()}) for r in rows)
    writers.write_tar_shards(folder / "webdataset", samples, per_shard)
    writers.write_hf(folder / "hf", rows, "jpg", -(-n // per_shard))
    vectors = rng.normal(size=(n, TEXT_DIM)).astype(np.float32)
    np.save(folder / "text_embeddings.npy", vectors / np.linalg.norm(vectors, axis=1,
                                                                      keepdims=True))
    stamp.write_text(json.dumps(params))


def annotations(folder: Path, fmt: str) -> tuple[str, str]:
    """--annotations and --image-dir of a format."""
    return {"jsonl": (folder / "jsonl/annotations.jsonl", folder / "jsonl"),
            "csv": (folder / "jsonl/annotations.csv", folder / "jsonl"),
            "parquet": (folder / "parquet", folder), "webdataset": (folder / "webdataset", folder),
            "hf": (folder / "hf", folder)}[fmt]


# ---------------------------------------------------------------- reading


def config(folder: Path, fmt: str) -> Config:
    given, images = annotations(folder, fmt)
    return Config(annotations=str(given), image_dir=str(images), fields=FIELDS)


def load(folder: Path, fmt: str) -> float:
    """Seconds to read and validate every record (no image read)."""
    t0 = time.perf_counter()
    load_corpus(config(folder, fmt), skip=[])
    return time.perf_counter() - t0


def load_read(folder: Path, fmt: str, decode: bool) -> float:
    """Seconds to load, then read (and decode to RGB) every image in input order, in one
    thread: what an embedding DataLoader does per image, without the model."""
    t0 = time.perf_counter()
    ds = load_corpus(config(folder, fmt), skip=[])
    for source in ds.images:
        if decode:
            with Image.open(image_stream(source)) as img:
                img.convert("RGB")
        else:
            data = payload(source)
            if isinstance(data, Path):
                data.read_bytes()
    return time.perf_counter() - t0


def validate(folder: Path, fmt: str) -> float:
    """Seconds of the plan's check: load, then decode every image (a thread pool)."""
    t0 = time.perf_counter()
    load_corpus(config(folder, fmt))
    return time.perf_counter() - t0


def wds_package(folder: Path, decode: bool) -> float:
    """The same tar shards through the webdataset package: every sample's bytes (and the
    JPEG decoded), in one process."""
    import webdataset as wds

    urls = [str(p) for p in sorted((folder / "webdataset").glob("*.tar"))]
    t0 = time.perf_counter()
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample["txt"].decode("utf-8")
        json.loads(sample["json"])
        if decode:
            with Image.open(io.BytesIO(sample["jpg"])) as img:
                img.convert("RGB")
    return time.perf_counter() - t0


def reading(folder: Path, n: int, repeats: int) -> list[tuple[str, list[float]]]:
    """records/s per measurement, medians of `repeats` interleaved rounds."""
    tasks = {}
    for fmt in FORMATS:
        tasks[f"{fmt}: load"] = lambda f=fmt: load(folder, f)
        tasks[f"{fmt}: load + read bytes"] = lambda f=fmt: load_read(folder, f, False)
        tasks[f"{fmt}: load + decode"] = lambda f=fmt: load_read(folder, f, True)
        tasks[f"{fmt}: plan check (threads)"] = lambda f=fmt: validate(folder, f)
    tasks["webdataset package: read bytes"] = lambda: wds_package(folder, False)
    tasks["webdataset package: decode"] = lambda: wds_package(folder, True)
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(repeats):  # interleaved: machine noise hits every measurement alike
        for name, task in tasks.items():
            times[name].append(task())
    return [(name, [n / t for t in ts]) for name, ts in times.items()]


# ---------------------------------------------------------------- whole runs


def whole_run(folder: Path, fmt: str, out: Path, extra: list[str]) -> tuple[float, dict]:
    """Wall seconds of `python launch.py` on the format, and the run's metrics."""
    given, images = annotations(folder, fmt)
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "launch.py", "--annotations", str(given), "--image-dir",
            str(images), "--image-field", "jpg", "--group-field", "group", "--output-dir",
            str(out), "--quiet", *extra]
    args = [a.replace("{data}", str(folder)) for a in args]
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{fmt}: launch.py failed:\n{done.stderr}")
    return wall, json.loads((out / "metrics.json").read_text())


def runs(folder: Path, n: int, repeats: int, extra: list[str], tmp: Path) -> None:
    walls: dict[str, list[float]] = {f: [] for f in RUN_FORMATS}
    picks: dict[str, list] = {}
    for _ in range(repeats):
        for fmt in RUN_FORMATS:
            wall, metrics = whole_run(folder, fmt, tmp / fmt, extra)
            walls[fmt].append(wall)
            picks[fmt] = [[(x["id"], x["type"], x["text_similarity"], x["visual_similarity"])
                           for x in json.loads(line)["negatives"]]
                          for line in (tmp / fmt / "negatives.jsonl").read_bytes().split(b"\n")
                          if line]
            timing = metrics["timing"]
    same = all(picks[f] == picks["jsonl"] for f in RUN_FORMATS)
    base = statistics.median(walls["jsonl"])
    print(f"\nwhole run: `launch.py {shlex.join(extra)}` on {n:,} records, "
          f"{repeats} run(s) each (median wall time of the process)\n")
    print("| input | wall s | samples/s | vs JSONL + files |\n|---|---|---|---|")
    for fmt in RUN_FORMATS:
        wall = statistics.median(walls[fmt])
        print(f"| {fmt} | {wall:.1f} | {n / wall:,.0f} | {base / wall:.2f}x |")
    print(f"\nsame negatives (ids, types, similarities) from every format: "
          f"{'yes' if same else 'NO'}; last run's phases: {timing}")


def machine() -> str:
    import pyarrow

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
            f"pyarrow {pyarrow.__version__}, Pillow {Image.__version__}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--image-size", type=int, default=256, help="side of the JPEGs")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--per-shard", type=int, default=2000, help="records per shard file")
    p.add_argument("--repeats", type=int, default=3, help="reading rounds (medians)")
    p.add_argument("--run-repeats", type=int, default=1, help="whole runs per format")
    p.add_argument("--no-runs", action="store_true", help="reading speed only")
    p.add_argument("--run-args", default="--visual-encoder pixels --text-embeddings "
                   "{data}/text_embeddings.npy --blacklist ''",
                   help="flags of every whole run; {data} is the generated data's folder "
                   "(default: the pixels image encoder and precomputed text embeddings, so "
                   "that the run's time is the input's, not a text model's)")
    p.add_argument("--data", type=Path, default=Path("/tmp/hnm_bench_formats"),
                   help="folder of the generated data (reused when the sizes match)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    generate(args.data / "data", args.records, args.image_size, args.quality, args.per_shard)
    sizes = sum(p.stat().st_size for p in (args.data / "data/jsonl/images").iterdir())
    print(f"machine: {machine()}")
    print(f"data: {args.records:,} records, {args.image_size}x{args.image_size} JPEG "
          f"(quality {args.quality}, mean {sizes / args.records / 1024:.1f} KiB), "
          f"{args.per_shard:,} records a shard; ready in {time.perf_counter() - t0:.0f}s")
    print(f"\nreading, one process, warm page cache: records/s, median of {args.repeats} "
          "interleaved rounds\n")
    print("| format: path | records/s | min | max |\n|---|---|---|---|")
    for name, rates in reading(args.data / "data", args.records, args.repeats):
        print(f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f} | "
              f"{max(rates):,.0f} |")
    if not args.no_runs:
        runs(args.data / "data", args.records, args.run_repeats,
             shlex.split(args.run_args), args.data / "runs")


if __name__ == "__main__":
    main()
