"""Beyond one machine: each torchrun rank is a worker; rank 0 also plans and reduces."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from hnm import pipeline
from hnm.config import Config
from hnm.errors import HnmError
from hnm.pool import Task, run_task
from hnm.storage import RunDir, read_json
from hnm.summary import print_summary

PHASE_TIMEOUT = timedelta(hours=6)  # a barrier waits for the slowest rank's whole phase


def under_torchrun() -> bool:
    """torchrun sets these for every rank it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def _device(local_rank: int) -> str:
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def run_rank(config: Config) -> dict[str, Any]:
    """This rank's share of every phase, with barriers between phases (gloo)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo", timeout=PHASE_TIMEOUT)
    try:
        return _phases(config, rank, world, device, dist)
    finally:
        dist.destroy_process_group()


def _plan_on_rank0(config: Config, rank: int, world: int, device: str, dist: Any) -> str:
    """Rank 0 validates and plans; every rank learns the outcome (or the error)."""
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            _, _, state = pipeline.prepare(config, world, [device] * world, config.batch_size)
            outcome = [("ok", state)]
        except HnmError as exc:
            outcome = [("error", str(exc))]
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise HnmError(value)
    return value


def _phases(config: Config, rank: int, world: int, device: str, dist: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    state = _plan_on_rank0(config, rank, world, device, dist)
    run = RunDir(config.output_dir)
    if state == "complete":
        _say(rank, f"Nothing to do: {run.root} already holds this run's results.")
        return read_json(run.metrics)
    plan = read_json(run.plan)
    mine = [s["shard"] for s in plan["shards"] if s["shard"] % world == rank]
    _say(rank, f"torchrun: {world} rank(s), {len(plan['shards'])} shard(s)")
    for phase in ("embed", "index", "candidates"):
        tasks = [Task("index", None)] if phase == "index" else [Task(phase, s) for s in mine]
        if phase == "index" and rank != 0:
            tasks = []
        for task in tasks:
            if not run.is_done(task.phase, task.shard):
                run_task(config, task, device, lambda *_: None)
        dist.barrier()
        _say(rank, f"all ranks finished {phase}")
    metrics: dict[str, Any] = {}
    if rank == 0:
        ds = pipeline.load_dataset(config, plan["skipped"])
        timing = {"load": time.perf_counter() - t0}
        timing.update(pipeline.phase_timing(run, plan))
        metrics = pipeline.reduce_phase(config, run, ds, plan, timing, started=t0)
        print_summary(metrics, print)
    dist.barrier()
    return metrics
