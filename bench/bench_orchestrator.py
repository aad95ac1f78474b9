"""Orchestrator figures: demo wall time for 1 vs N CPU workers; reducer share and memory at 50k."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def launch(*args: str) -> float:
    """Wall seconds of one `python launch.py ...` run (which must succeed)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "launch.py", "--quiet", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def demo_workers(workers: list[int], repeats: int, tmp: Path) -> None:
    """The demo end to end (real encoders) with each worker count; medians of `repeats`."""
    from hnm.demo import make_demo

    make_demo(tmp / "demo")
    base = ["--config", "configs/demo.yaml", "--annotations", str(tmp / "demo/annotations.json"),
            "--image-dir", str(tmp / "demo")]
    times: dict[int, list[float]] = {w: [] for w in workers}
    for _ in range(repeats):  # interleaved, so machine noise hits every count alike
        for w in workers:
            out = tmp / f"demo_run_{w}"
            shutil.rmtree(out, ignore_errors=True)
            times[w].append(launch(*base, "--output-dir", str(out), "--cpu-workers", str(w)))
    one = statistics.median(times[workers[0]])
    print(f"demo (300 samples, efficientnet-lite0 + minilm), medians of {repeats} runs:")
    for w in workers:
        med = statistics.median(times[w])
        print(f"  {w} CPU worker(s): {med:6.1f} s  (x{one / med:.2f} vs {workers[0]})  "
              f"runs: {', '.join(f'{t:.1f}' for t in times[w])}")


def synthetic(n: int, dim: int, tmp: Path) -> list[str]:
    """Annotations plus precomputed embeddings for n samples in dialogs of 5."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(1, n // 50), dim))
    image = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, dim))
    words = "fly north south east west along the road river lake field red roof building " \
            "bridge turn left right past next to until you reach land near".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 16))) for _ in range(n // 3)]
    records = [{"id": i, "image": f"img_{i}.png", "text": texts[rng.integers(len(texts))],
                "group": i // 5} for i in range(n)]
    (tmp / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    np.save(tmp / "image.npy", image.astype(np.float32))
    text_vecs = rng.normal(size=(len(texts), 384)).astype(np.float32)
    index = {t: i for i, t in enumerate(texts)}
    np.save(tmp / "text.npy", text_vecs[[index[r["text"]] for r in records]])
    return ["--annotations", str(tmp / "ann.jsonl"), "--image-embeddings",
            str(tmp / "image.npy"), "--text-embeddings", str(tmp / "text.npy")]


def reducer_share(n: int, dim: int, workers: int, tmp: Path) -> None:
    """Time in the reducer (select + write) vs the whole run, and peak memory per worker."""
    args = synthetic(n, dim, tmp)
    out = tmp / "synthetic_run"
    wall = launch(*args, "--output-dir", str(out), "--cpu-workers", str(workers),
                  "--k-nn", "100", "--blacklist", os.devnull)
    metrics = json.loads((out / "metrics.json").read_text())
    t = metrics["timing"]
    reducer = t["select"] + t["write"]
    print(f"synthetic N={n} (dim {dim}, k_nn 100, {workers} CPU workers): wall {wall:.1f} s")
    print("  phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    print(f"  reducer (select + write): {reducer:.2f} s = {100 * reducer / wall:.1f}% of wall")
    for s in metrics["shards"]:
        print(f"  shard {s['shard']}: peak RSS {s['peak_rss_mb']:.0f} MiB, {s['seconds']:.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hnm_bench_"))
    try:
        if not args.skip_demo:
            demo_workers([int(w) for w in args.workers.split(",")], args.repeats, tmp)
        reducer_share(args.n, args.dim, 2, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
