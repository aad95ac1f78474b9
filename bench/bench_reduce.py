"""The reduce phase alone, timed on a finished run: select + write + report + metrics.

Runs `reduce.reduce_phase` on RUN_DIR again (it rewrites the same outputs) --repeat times
and prints each run's wall and CPU seconds (this process: user + system) and their
medians. With PYTHONPATH pointing at another checkout, it times that checkout's reducer on
the same run (its candidate files must be readable by it), e.g. the release before:

    PYTHONPATH=/path/to/previous .venv/bin/python bench/bench_reduce.py RUN_DIR --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import hnm
from hnm.lifecycle import load_run_config, run_corpus
from hnm.plan import read_plan
from hnm.reduce import reduce_phase
from hnm.storage import RunDir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    run = RunDir(args.run_dir)
    config = load_run_config(run)
    plan = read_plan(run)
    ds = run_corpus(run, config, plan)
    print(f"hnm from {hnm.__file__}; {ds.num_anchors} anchors")
    walls, cpus, selects, writes = [], [], [], []
    for k in range(args.repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        metrics = reduce_phase(config, run, ds, plan, {})
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        selects.append(metrics["timing"]["select"])
        writes.append(metrics["timing"]["write"])
        print(f"run {k}: wall {walls[-1]:.3f} s, cpu {cpus[-1]:.3f} s, select "
              f"{selects[-1]:.3f} s, write {writes[-1]:.3f} s")
    print(f"median: wall {statistics.median(walls):.3f} s, cpu {statistics.median(cpus):.3f} s, "
          f"select {statistics.median(selects):.3f} s, write {statistics.median(writes):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
