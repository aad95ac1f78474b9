"""One phase driver for every way of running: plan, each phase's unfinished tasks, reduce.

Where the tasks run is the executor's business: `LocalExecutor` (the parent and its
spawned workers, one per device) or `distributed.RankExecutor` (torchrun ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from hnm import placement, schema
from hnm.callbacks import Progress
from hnm.config import Config
from hnm.data import Corpus
from hnm.errors import Terminated
from hnm.lifecycle import Lease
from hnm.placement import Offer
from hnm.plan import Plan, dry_run_lines, read_plan, validate_inputs
from hnm.process import stopping
from hnm.progress import ProgressView, choose_mode
from hnm.reduce import reduce_phase
from hnm.run import distributed
from hnm.run.pool import InProcess, WorkerPool
from hnm.run.worker import Task
from hnm.storage import RunDir, read_json
from hnm.summary import print_summary, shard_lines

log = logging.getLogger("hnm.run.driver")

T = TypeVar("T")
PHASES = ("embed", "tables", "candidates")


class Executor(Protocol):
    """Where tasks run. The leader plans and reduces; every process runs phase tasks."""

    leader: bool
    offered: Offer  # the devices this machine offers the run (placement.offer)

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: Any) -> None: ...

    def say(self, text: str) -> None: ...

    def on_leader(self, fn: Callable[[Progress], T]) -> T:
        """Run fn on the leader only; every process gets its result (or its HnmError)."""

    def start(self, plan: Plan, ds: Corpus | None) -> None:
        """Get ready to run the plan's tasks (views, worker processes)."""

    def run_phase(self, phase: str, tasks: list[Task]) -> None:
        """Run this process's share of `tasks`; return once every process has finished."""

    def finish(self, metrics: dict[str, Any]) -> None:
        """After the run: what is left to say."""


def run(config: Config, say: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the metrics document."""
    if config.dry_run:
        return dry_run(config, say or print)
    executor: Executor
    if distributed.under_torchrun():
        # the ranks are the workers, every one started already: a shard for each
        config = dataclasses.replace(config, cpu_workers=int(os.environ["WORLD_SIZE"]))
        executor = distributed.RankExecutor(config)
    else:
        executor = LocalExecutor(config, say)
    with sigterm_raises(), executor:
        return drive(config, executor)


def drive(config: Config, ex: Executor) -> dict[str, Any]:
    """Plan, then every phase's unfinished tasks, then the reduce: the one pipeline."""
    t0 = time.perf_counter()
    run = RunDir(config.output_dir)
    with Lease(config, ex.say) as lease:  # the leader holds the run directory's lock
        if ex.on_leader(lambda progress: _plan(config, lease, ex.offered, progress)) \
                == "complete":
            ex.say(f"Nothing to do: {run.root} already holds this run's results.")
            metrics = read_json(run.metrics, shape=schema.METRICS)
            ex.finish(metrics)
            return metrics
        plan = read_plan(run)
        _announce(ex, plan)
        resumed = _reused(run, plan)
        load = time.perf_counter() - t0
        ex.start(plan, lease.corpus)  # other ranks load the corpus when a task needs it
        for phase in PHASES:
            ex.run_phase(phase, [t for t in _tasks(phase, [s.shard for s in plan.shards])
                                 if not run.is_done(t.phase, t.shard)])
        metrics = ex.on_leader(lambda progress: reduce_phase(
            config, run, lease.corpus, plan, {"load": load}, progress, t0))
    if resumed:
        ex.say(resumed)
    ex.finish(metrics)
    return metrics


def _plan(config: Config, lease: Lease, offered: Offer, progress: Progress) -> str:
    """The leader's planning: the run created, resumed or found complete; its state."""
    plan, state = lease.prepare(offered, progress)
    if state != "complete":
        # before any embedding: an exact index too large for a GPU fails here, not after
        placement.check_memory(config, lease.summary, plan.placement, offered)
    return state


def _announce(ex: Executor, plan: Plan) -> None:
    """The input, the shards and the placement, as the run starts its phases."""
    ex.say(f"Input: {plan.input_format}, {plan.input_files} file(s)")
    ex.say(f"Sharding {plan.num_anchors} anchors ({plan.num_rows} candidates) into "
           f"{len(plan.shards)} shard(s) on {len(plan.placement.devices)} worker(s)")
    ex.say(f"Index: {plan.index.describe()}")
    if ex.leader:
        ex.say(plan.placement.precision_line())
        ex.say(plan.placement.workers_line())


def _reused(run: RunDir, plan: Plan) -> str:
    """What a resumed run found done ("" when nothing was), said once it finished."""
    shards = [s.shard for s in plan.shards]
    done = {p: sum(run.is_done(p, s) for s in shards) for p in ("embed", "candidates")}
    tables = run.is_done("tables")
    if not any(done.values()) and not tables:
        return ""
    return (f"Resumed: reused {done['embed']} embedded and {done['candidates']} mined "
            f"shard(s) of {len(shards)}" + (", and the tables" if tables else ""))


def _tasks(phase: str, shards: list[int]) -> list[Task]:
    return [Task("tables", None)] if phase == "tables" else [Task(phase, s) for s in shards]


def dry_run(config: Config, say: Callable[[str], Any]) -> dict[str, Any]:
    """Validate every input and print the plan; write nothing."""
    offered = placement.offer(config)
    ds = validate_inputs(config)
    placed = placement.place(config, offered, ds)
    for line in offered.lines + dry_run_lines(config, ds, placed):
        say(line)
    placement.check_memory(config, ds, placed, offered)
    return {}


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C does (exit 143), through the same clean-up."""
    owner = os.getpid()
    stopping.clear()  # a new run in this process (the Python API) starts unstopped

    def handler(*_: Any) -> None:
        if os.getpid() != owner:  # a forked DataLoader worker that has not set itself up yet
            return
        stopping.set()
        raise Terminated()

    def unraisable(info: Any) -> None:
        # Terminated raised where Python cannot propagate it (an at-fork hook): the next
        # progress report raises it again, because `stopping` is set. Once the run is
        # stopping, the clean-up of what the stop cut short (a DataLoader iterator stopped
        # while it started its workers) may fail: logged, not printed.
        if isinstance(info.exc_value, Terminated):
            return
        if stopping.is_set():
            log.debug("while stopping: %s", info.err_msg or "", exc_info=(
                info.exc_type, info.exc_value, info.exc_traceback))
            return
        hook(info)

    previous, hook = signal.signal(signal.SIGTERM, handler), sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield
    except KeyboardInterrupt:
        stopping.set()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not stopping.is_set():  # else kept: what the stop cut short is collected later
            sys.unraisablehook = hook


class LocalExecutor:
    """This machine: tasks run in the parent (one CPU worker) or in one spawned worker
    process per device; a live view of every shard is the only writer to the terminal."""

    leader = True

    def __init__(self, config: Config, say: Callable[[str], Any] | None = None) -> None:
        self.config = config
        self.offered = placement.offer(config)
        self.mode = choose_mode(config.quiet)
        self.view: ProgressView | None = None
        self.loading: ProgressView | None = None
        self.pool: Any = None
        self._say = say
        self.stack = contextlib.ExitStack()
        self.pending = self.offered.lines

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.__exit__(*exc)

    def say(self, text: str) -> None:
        view = self.view or self.loading
        if self._say:
            self._say(text)
        elif view:
            view.say(text)
        elif self.mode != "quiet":
            print(text, flush=True)

    def on_leader(self, fn: Callable[[Progress], T]) -> T:
        if self.view is not None:
            return fn(self.view.stage)
        # checking every image can take a while: a transient view while planning
        with ProgressView([], self.mode, transient=True) as self.loading:
            try:
                result = fn(self.loading.stage)
            finally:
                self.loading = None
        for line in self.pending:  # the device lines, once the loading view is gone
            self.say(line)
        self.pending = []
        return result

    def start(self, plan: Plan, ds: Corpus | None) -> None:
        self.view = self.stack.enter_context(ProgressView(
            [{"shard": s.shard, "device": s.device} for s in plan.shards], self.mode,
            self.offered.nvml))
        devices = list(plan.placement.devices)
        if len(devices) < len(self.offered.devices) and plan.placement.workers_note:
            self.say(f"{len(devices)} of {len(self.offered.devices)} CPU worker(s): "
                     f"{plan.placement.workers_note}")
        self.pool = self.stack.enter_context(
            InProcess(self.config, self.view, ds) if devices == ["cpu"]
            else WorkerPool(self.config, devices, self.view))

    def run_phase(self, phase: str, tasks: list[Task]) -> None:
        self.pool.run_phase(tasks)

    def finish(self, metrics: dict[str, Any]) -> None:
        self.stack.close()  # the live view ends before the summary is printed
        self.view = None
        if self.mode == "plain" and metrics.get("shards") and self.pool is not None:
            for line in shard_lines(metrics):
                self.say(line)
        print_summary(metrics, print)
