"""The tables phase's k-means and IVF build of a finished run, alone, with this process's
own memory (RssAnon + RssShmem) sampled every 50 ms: what a worker holds there, without a
whole run. Works on a hard-linked copy of the run (the index files are written anew by
rename, the originals untouched):

    cp -al RUN /tmp/copy && .venv/bin/python bench/bench_tables_memory.py /tmp/copy
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hnm import tables  # noqa: E402
from hnm.kmeans import kmeans  # noqa: E402
from hnm.lifecycle import load_run_config  # noqa: E402
from hnm.plan import read_plan  # noqa: E402
from hnm.storage import RunDir, read_npy  # noqa: E402


def own_mib() -> int:
    with open("/proc/self/status") as status:
        return sum(int(line.split()[1]) for line in status
                   if line.startswith(("RssAnon", "RssShmem"))) // 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path, help="a copy of a run whose tables phase is done")
    opts = parser.parse_args()
    peaks: dict[str, int] = {}
    stage = ["opened"]

    def sample() -> None:
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), own_mib())
            time.sleep(0.05)

    run = RunDir(opts.run)
    config = dataclasses.replace(load_run_config(run), output_dir=str(run.root))
    plan = read_plan(run)
    V = read_npy(run.table("visual"), mmap=True)
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    stage[0] = "kmeans"
    kmeans(V, config.n_clusters, config.seed)
    info = {}
    if plan.index.ivf:
        stage[0] = "ivf"
        info = tables.build_ivf(run, V, plan.index, config, plan.num_anchors,
                                plan.placement.index_parts)
    stage[0] = "end"
    time.sleep(0.2)
    print(f"{opts.run}: {len(V):,} rows, {plan.placement.index_parts} part(s); "
          f"{time.perf_counter() - t0:.1f} s; own peak MiB per step: {peaks}; "
          f"recall {info.get('recall')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
