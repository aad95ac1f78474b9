"""Beyond one machine: under torchrun every rank is a worker; rank 0 also plans and reduces."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from hnm.config import Config
from hnm.data import Dataset, Progress, no_progress
from hnm.errors import HnmError
from hnm.plan import Plan
from hnm.summary import print_summary
from hnm.worker import Context, Task, run_task

T = TypeVar("T")
PHASE_TIMEOUT = timedelta(hours=6)  # a barrier waits for the slowest rank's whole phase


def under_torchrun() -> bool:
    """torchrun sets these for every rank it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def _device(local_rank: int) -> str:
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


class RankExecutor:
    """This rank's share of every phase (shard s runs on rank s % world), with a barrier
    (gloo) after each phase; rank 0 plans, builds the tables and reduces."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.leader = self.rank == 0
        self.device = _device(int(os.environ.get("LOCAL_RANK", 0)))
        self.devices = [self.device] * self.world
        self.context: Context | None = None

    def __enter__(self) -> RankExecutor:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=PHASE_TIMEOUT)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()

    def say(self, text: str) -> None:
        if self.leader:
            print(text, flush=True)

    def on_leader(self, fn: Callable[[Progress], T]) -> T:
        import torch.distributed as dist

        outcome: list[Any] = [None]
        if self.leader:
            try:
                outcome = [("ok", fn(no_progress))]
            except HnmError as exc:
                outcome = [("error", str(exc))]
        dist.broadcast_object_list(outcome, src=0)
        status, value = outcome[0]
        if status == "error":
            raise HnmError(value)
        return value

    def start(self, plan: Plan, ds: Dataset | None) -> None:
        self.context = Context(self.config, self.device, ds)
        self.say(f"torchrun: {self.world} rank(s), {len(plan.shards)} shard(s)")

    def run_phase(self, phase: str, tasks: list[Task]) -> None:
        import torch.distributed as dist

        assert self.context is not None
        for task in tasks:
            mine = self.leader if task.shard is None else task.shard % self.world == self.rank
            if mine:
                run_task(self.context, task, no_progress)
        dist.barrier()
        self.say(f"all ranks finished {phase}")

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.leader:
            print_summary(metrics, print)
