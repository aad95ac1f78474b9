"""Beyond one machine: under torchrun every rank is a worker; rank 0 also plans and reduces.

Ranks coordinate through the process group's key-value store rather than collectives:
each rank beats a heartbeat and counts its progress there, so a rank that dies or hangs
is noticed by the others within a minute and named, instead of leaving them waiting at a
barrier for hours.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from hnm import gpus
from hnm.callbacks import Progress
from hnm.config import Config
from hnm.data import Corpus
from hnm.decoding import first_line
from hnm.errors import HnmError
from hnm.placement import ranks_offer
from hnm.plan import Plan
from hnm.run.worker import Context, Task, run_task
from hnm.summary import print_summary

T = TypeVar("T")
HEARTBEAT_S = 2.0  # how often a rank says it is alive
GONE_AFTER_S = 60.0  # a heartbeat still for this long: the rank is gone (--stall-timeout caps it)
POLL_S = 0.5  # how often a waiting rank looks at the others
INIT_TIMEOUT = timedelta(minutes=10)  # every rank must join within this


class RankFailed(HnmError):
    """Another rank failed, died or stalled: this one stops too (exit 1); rerun resumes."""

    exit_status = 1


def under_torchrun() -> bool:
    """torchrun sets these for every rank it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def _device(local_rank: int) -> str:
    os.environ.update(gpus.worker_environment())  # before this rank initialises CUDA
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


class Ranks:
    """The ranks of one torchrun job, seen from one of them, through a shared store."""

    def __init__(self, store: Any, rank: int, world: int, stall_s: float) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.gone_s = min(GONE_AFTER_S, stall_s) if stall_s else GONE_AFTER_S
        self.stall_s = stall_s
        job = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.prefix = f"hnm/{job}"  # a restarted job does not see its predecessor's keys
        self.rounds = 0
        self.progress = 0
        self.stop = threading.Event()
        self.seen: dict[str, tuple[str, float]] = {}
        # the heartbeat thread talks to the store through its own connection
        self.beat = threading.Thread(target=self._beat, args=(store.clone(),),
                                     name="hnm-heartbeat", daemon=True)
        self.beat.start()

    def key(self, *parts: Any) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _beat(self, store: Any) -> None:
        count = 0
        while not self.stop.is_set():
            count += 1
            store.set(self.key("beat", self.rank), str(count))
            store.set(self.key("progress", self.rank), str(self.progress))
            self.stop.wait(HEARTBEAT_S)

    def moved(self) -> None:
        """This rank made progress (read by the others' stall check)."""
        self.progress += 1

    def fail(self, message: str) -> None:
        """Tell every rank that this one failed (the first failure is kept)."""
        if self.store.add(self.key("failures"), 1) == 1:
            self.store.set(self.key("failed"), f"{self.rank}\0{message}")

    def wait_for(self, keys: list[str]) -> None:
        """Until every key exists; raises RankFailed when a rank failed, died or stalled."""
        while not self.store.check(keys):
            self._check_others()
            time.sleep(POLL_S)

    def barrier(self, name: str) -> None:
        self.rounds += 1
        self.store.set(self.key("at", self.rounds, name, self.rank), "1")
        self.wait_for([self.key("at", self.rounds, name, r) for r in range(self.world)])

    def share(self, value: Any = None) -> Any:
        """The leader's `value`, on every rank."""
        self.rounds += 1
        key = self.key("shared", self.rounds)
        if self.rank == 0:
            self.store.set(key, pickle.dumps(value))
            return value
        self.wait_for([key])
        return pickle.loads(self.store.get(key))

    def _check_others(self) -> None:
        if self.store.check([self.key("failed")]):
            who, _, message = self.store.get(self.key("failed")).decode().partition("\0")
            if int(who) != self.rank:
                raise RankFailed(f"rank {who} failed: {message}. Rerunning the same command "
                                 "resumes.")
        now = time.monotonic()
        for r in range(self.world):
            if r == self.rank:
                continue
            for what, limit in (("beat", self.gone_s), ("progress", self.stall_s)):
                key = self.key(what, r)
                value = self.store.get(key).decode() if self.store.check([key]) else ""
                last, since = self.seen.get(key, ("", now))
                if value != last:
                    self.seen[key] = (value, now)
                elif limit and now - since > limit:
                    why = "stopped responding (no heartbeat" if what == "beat" else \
                        "made no progress (--stall-timeout"
                    raise RankFailed(f"rank {r} {why} for {limit:g} s); the run stops. "
                                     "Rerunning the same command resumes.")

    def close(self) -> None:
        self.stop.set()


class RankExecutor:
    """This rank's share of every phase (shard s runs on rank s % world), waiting for all
    ranks after each phase; rank 0 plans, builds the tables and reduces."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.leader = self.rank == 0
        self.device = _device(int(os.environ.get("LOCAL_RANK", 0)))
        self.offered = ranks_offer(self.device, self.world, self.leader)
        self.context: Context | None = None
        self.ranks: Ranks | None = None

    def __enter__(self) -> RankExecutor:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=INIT_TIMEOUT)
        store = dist.distributed_c10d._get_default_store()
        self.ranks = Ranks(store, self.rank, self.world, self.config.stall_timeout)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        import torch.distributed as dist

        assert self.ranks is not None
        if exc is not None and not isinstance(exc, RankFailed):
            first = first_line(str(exc))
            self.ranks.fail(first if isinstance(exc, HnmError)
                            else f"{type(exc).__name__}: {first}")
        self.ranks.close()
        dist.destroy_process_group()

    def say(self, text: str) -> None:
        if self.leader:
            print(text, flush=True)

    def on_leader(self, fn: Callable[[Progress], T]) -> T:
        assert self.ranks is not None
        outcome: tuple[str, Any] = ("ok", None)
        if self.leader:
            ranks = self.ranks
            try:
                outcome = ("ok", fn(lambda *_: ranks.moved()))
            except HnmError as exc:
                outcome = ("error", str(exc))
        status, value = self.ranks.share(outcome)
        if status == "error":
            raise HnmError(value)
        return value

    def start(self, plan: Plan, ds: Corpus | None) -> None:
        self.context = Context(self.config, self.device, ds)
        self.say(f"torchrun: {self.world} rank(s), {len(plan.shards)} shard(s)")

    def run_phase(self, phase: str, tasks: list[Task]) -> None:
        assert self.context is not None and self.ranks is not None
        ranks = self.ranks
        for task in tasks:
            mine = self.leader if task.shard is None else task.shard % self.world == self.rank
            if mine:
                run_task(self.context, task, lambda *_: ranks.moved())
        ranks.barrier(phase)
        self.say(f"all ranks finished {phase}")

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.leader:
            print_summary(metrics, print)
