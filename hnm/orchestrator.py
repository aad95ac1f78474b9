"""Plan the shards, run each phase's shards on the workers, then reduce."""

from __future__ import annotations

import time
from typing import Any

from hnm import pipeline
from hnm.config import Config
from hnm.storage import RunDir, read_json
from hnm.summary import print_summary
from hnm.worker import Job, candidates_shard, embed_shard


def run(config: Config, say: Any = print) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the metrics document."""
    t0 = time.perf_counter()
    devices = ["cpu"]
    num_shards = config.cpu_workers
    ds, plan, state = pipeline.prepare(config, num_shards, devices, config.batch_size)
    run_dir = RunDir(config.output_dir)
    if state == "complete":
        say(f"Nothing to do: {run_dir.root} already holds this run's results.")
        metrics = read_json(run_dir.metrics)
        print_summary(metrics, say)
        return metrics
    timing = {"load": time.perf_counter() - t0}
    shards = [s["shard"] for s in plan["shards"]]
    reused = {phase: sum(run_dir.is_done(phase, s) for s in shards)
              for phase in ("embed", "candidates")}
    for shard in shards:
        if not run_dir.is_done("embed", shard):
            embed_shard(Job(config, shard, plan["shards"][shard]["device"]), ds)
    if not run_dir.is_done("index"):
        pipeline.index_phase(config, run_dir, ds, len(shards))
    for shard in shards:
        if not run_dir.is_done("candidates", shard):
            candidates_shard(Job(config, shard, plan["shards"][shard]["device"]), ds)
    timing.update(_worker_timing(run_dir, shards))
    metrics = pipeline.reduce_phase(config, run_dir, ds, plan, timing)
    if any(reused.values()):
        say(f"Resumed: reused {reused['embed']} embedded and {reused['candidates']} mined "
            f"shard(s) of {len(shards)}.")
    print_summary(metrics, say)
    return metrics


def _worker_timing(run_dir: RunDir, shards: list[int]) -> dict[str, float]:
    """Seconds per phase, summed over shards, from the markers' records."""
    out = {"embed_images": 0.0, "embed_texts": 0.0, "search": 0.0}
    for s in shards:
        embed = read_json(run_dir.marker("embed", s))
        out["embed_images"] += embed.get("embed_images", 0.0)
        out["embed_texts"] += embed.get("embed_texts", 0.0)
        out["search"] += read_json(run_dir.marker("candidates", s)).get("search", 0.0)
    index = read_json(run_dir.marker("index"))
    out["index"] = index.get("index", 0.0)
    out["cluster"] = index.get("cluster", 0.0)
    return out
