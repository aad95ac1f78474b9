"""Peak memory of reading and checking a generated JSONL input: `data.scan` (blocks let go
as they are handed on) against `data.load_corpus` (every record held).

`python tools/scan_memory.py ROWS [ROWS ...] [--folder DIR] [--block N]` writes ROWS short
records (`{"id", "image", "text", "group"}`: 5,000 distinct texts, a group per 4 records) to
DIR/scan_ROWS.jsonl, then measures each way in a fresh process twice: once for its peak
resident memory (ru_maxrss), once under tracemalloc for its peak of Python allocations.
Precomputed image embeddings are named, so that no image is looked for.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, rows: int) -> None:
    if path.exists():
        return
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(f'{{"id": "r{i}", "image": "img/{i}.jpg", "text": "caption number '
                         f'{i % 5000}", "group": "g{i // 4}"}}\n')


def measure(path: str, way: str, block: int, traced: bool) -> dict:
    """One measurement, in this process: rows read, seconds, peak bytes."""
    sys.path.insert(0, str(ROOT))
    from hnm.config import Config
    from hnm.data import load_corpus, scan

    config = Config(annotations=path, image_embeddings=path + ".npy")
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    if way == "scan":
        rows = 0
        for part in scan(config, size=block).blocks():
            rows += len(part)
            del part  # as a writer would: each block let go once written
    else:
        rows = len(load_corpus(config).records)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] if traced else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rows": rows, "seconds": round(seconds, 2), "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=int, nargs="+")
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("--block", type=int, default=65536)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, way, traced = args.child
        print(json.dumps(measure(path, way, args.block, traced == "1")))
        return
    print(f"{'rows':>10} {'way':>12} {'RSS peak MiB':>13} {'traced peak MiB':>16} "
          f"{'seconds':>8}")
    for rows in args.rows:
        path = Path(args.folder) / f"scan_{rows}.jsonl"
        generate(path, rows)
        for way in ("scan", "load_corpus"):
            got = []
            for traced in ("0", "1"):
                out = subprocess.run([sys.executable, __file__, str(rows), "--block",
                                      str(args.block), "--child", str(path), way, traced],
                                     check=True, capture_output=True, text=True).stdout
                got.append(json.loads(out))
            print(f"{rows:>10} {way:>12} {got[0]['peak'] / 2**20:>13.0f} "
                  f"{got[1]['peak'] / 2**20:>16.1f} {got[0]['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
