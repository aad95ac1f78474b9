"""Plan the shards, run each phase's shards on the workers, then reduce."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from hnm import distributed, gpus, pipeline
from hnm.config import Config
from hnm.pool import InProcess, Task, WorkerPool
from hnm.progress import ProgressView, choose_mode
from hnm.storage import RunDir, read_json
from hnm.summary import print_summary, shard_lines


class Terminated(Exception):
    """SIGTERM arrived: stop like Ctrl-C, exit 143."""


def _on_sigterm(*_: Any) -> None:
    raise Terminated()


def run(config: Config, say: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the metrics document."""
    if distributed.under_torchrun() and not config.dry_run:
        return distributed.run_rank(config)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(config, say)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(config: Config, say: Callable[[str], Any] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    found, reason = gpus.discover()
    devices = gpus.choose_devices(config, found)
    if config.dry_run:
        say = say or print
        for line in gpus.describe(found, reason, devices) + pipeline.dry_run_lines(
                config, pipeline.validate_inputs(config), devices):
            say(line)
        return {}
    mode = choose_mode(config.quiet)
    with ProgressView([], mode, transient=True) as loading:  # checking every image can take a while
        ds, plan, state = pipeline.prepare(config, len(devices), devices, config.batch_size,
                                           loading.stage)
    view = ProgressView(plan["shards"], mode, {f"cuda:{g.index}": g.nvml_index for g in found})
    say = say or view.say
    for line in gpus.describe(found, reason, devices):
        say(line)
    run_dir = RunDir(config.output_dir)
    if state == "complete":
        say(f"Nothing to do: {run_dir.root} already holds this run's results.")
        metrics = read_json(run_dir.metrics)
        print_summary(metrics, print)
        return metrics
    say(f"Sharding {plan['num_anchors']} anchors ({plan['num_rows']} candidates) into "
        f"{len(plan['shards'])} shard(s) on {len(devices)} worker(s)")
    timing = {"load": time.perf_counter() - t0}
    with view:
        reused = _run_phases(config, devices, plan, run_dir, view)
        timing.update(pipeline.phase_timing(run_dir, plan))
        metrics = pipeline.reduce_phase(config, run_dir, ds, plan, timing, view.stage, t0)
    if any(reused.values()):
        say(f"Resumed: reused {reused['embed']} embedded and {reused['candidates']} mined "
            f"shard(s) of {len(plan['shards'])}" + (", and the index" if reused["index"] else ""))
    if mode == "plain":
        for line in shard_lines(metrics):
            say(line)
    print_summary(metrics, print)
    return metrics


def _run_phases(config: Config, devices: list[str], plan: dict, run_dir: RunDir,
                view: ProgressView) -> dict[str, int]:
    """Embed, index, candidates: each phase's unfinished shards, on the workers."""
    shards = [s["shard"] for s in plan["shards"]]
    reused = {"embed": sum(run_dir.is_done("embed", s) for s in shards),
              "candidates": sum(run_dir.is_done("candidates", s) for s in shards),
              "index": int(run_dir.is_done("index"))}
    executor = InProcess(config, view) if devices == ["cpu"] else \
        WorkerPool(config, devices, view)
    with executor:
        executor.run_phase([Task("embed", s) for s in shards
                            if not run_dir.is_done("embed", s)])
        if not run_dir.is_done("index"):
            executor.run_phase([Task("index", None)])
        executor.run_phase([Task("candidates", s) for s in shards
                            if not run_dir.is_done("candidates", s)])
    return reused
