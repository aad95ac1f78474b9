"""The tables phase of a finished run, alone, with this process's own memory (RssAnon +
RssShmem) sampled every 50 ms: what a worker holds there, without a whole run. By default
its k-means and IVF build only; with --whole, the phase as a worker runs it
(`worker.tables_once`: the shards' tables merged, eligibility, k-means, the IVF index, the
files written), each step's peak apart. Works on a hard-linked copy of the run (every file
is written anew by rename, the originals untouched):

    cp -al RUN /tmp/copy && .venv/bin/python bench/bench_tables_memory.py /tmp/copy [--whole]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Any

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
    parser.add_argument("--whole", action="store_true",
                        help="the whole phase as a worker runs it, not k-means and IVF only")
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
    if opts.whole:
        return whole(run, config, stage, peaks, t0)
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


def whole(run: RunDir, config: Any, stage: list[str], peaks: dict[str, int], t0: float
          ) -> int:
    """`worker.tables_once` in this process, its steps told apart by wrapping the
    functions `tables.compute` calls."""
    from hnm.run import worker

    def step(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            entered[name] = own_mib()
            stage[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                stage[0] = "after " + name
        return wrapped

    entered: dict[str, int] = {}
    for name in ("merge", "eligibility", "kmeans", "build_ivf"):
        setattr(tables, name, step(name, getattr(tables, name)))
    ctx = worker.Context(config, "cpu")
    stage[0] = "phrase order"
    ctx.phrase_order  # noqa: B018 (computed once, as the worker does)
    info = worker.tables_once(ctx, None, lambda *_: None)
    stage[0] = "end"
    time.sleep(0.2)
    print(f"{run.root}: {ctx.plan.num_rows:,} rows, {ctx.plan.placement.index_parts} "
          f"part(s); {time.perf_counter() - t0:.1f} s; own peak MiB per step: {peaks}; "
          f"own MiB entering each step: {entered}; recall {info.get('recall')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
