"""Running phase tasks: in the parent (one CPU worker) or in spawned worker processes."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import struct
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from hnm import gpus, testpoints
from hnm.config import Config
from hnm.data import Corpus
from hnm.decoding import first_line
from hnm.errors import HnmError, Terminated
from hnm.process import die_with_parent, settle_imports, stopping
from hnm.progress import ProgressView
from hnm.run.worker import Context, Task, run_task
from hnm.storage import RunDir

# How long the parent waits for a worker event before checking for dead workers: short
# enough that a crash is noticed at once, long enough to cost nothing while idle.
POLL_S = 0.2
# Workers send at most one progress event per this many seconds: the view refreshes 4 times
# a second, and a queue message per image would cost more than the images.
PROGRESS_EVERY_S = 0.3
# A task waits in a worker's queue while the worker starts (a respawned one imports torch
# and FAISS first, which on a busy machine takes many seconds): --stall-timeout counts from
# when the worker takes the task, and a worker that has not taken it this much later than
# that is stalled too.
START_GRACE_S = 120.0


class RunFailed(HnmError):
    """A shard failed every retry; the run stops (exit 1) and can be resumed."""

    exit_status = 1


class Retries:
    """Attempts per task; raises RunFailed once a task has used up --max-retries."""

    def __init__(self, config: Config, view: ProgressView) -> None:
        self.config = config
        self.view = view
        self.attempts: Counter = Counter()

    def record(self, task: Task, device: str, error: str) -> None:
        """Count a failure of `task`: it is to run again, unless it used up --max-retries
        (then RunFailed is raised)."""
        self.attempts[task] += 1
        retrying = self.attempts[task] <= self.config.max_retries
        self.view.failed(task.shard, task.phase, error, retrying)
        if retrying:
            return
        log = RunDir(self.config.output_dir).log(task.shard)
        what = "the tables phase" if task.shard is None else f"shard {task.shard}"
        where = "" if task.shard is None else f" in {task.phase}"
        raise RunFailed(
            f"{what} failed{where} on {device} after {self.attempts[task]} "
            f"attempt(s): {error}; see {log}. Rerunning the same command resumes.")


class InProcess:
    """One CPU worker: tasks run in the parent, one after the other, retried on failure."""

    def __init__(self, config: Config, view: ProgressView, ds: Corpus | None = None) -> None:
        self.context = Context(config, "cpu", ds)
        self.view = view
        self.retries = Retries(config, view)

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def run_phase(self, tasks: list[Task]) -> dict[Task, dict]:
        results = {}
        pending = deque(tasks)
        while pending:
            task = pending.popleft()
            self.view.started(task.shard, task.phase, "cpu")

            def progress(phase: str, done: int, total: int, _t: Task = task) -> None:
                if stopping.is_set():  # a SIGTERM whose exception was swallowed on the way
                    raise Terminated()
                self.view.progress(_t.shard, phase, done, total)

            try:
                results[task] = run_task(self.context, task, progress)
            except HnmError:
                raise
            except Exception as exc:  # e.g. a killed DataLoader worker: the shard again
                if stopping.is_set():  # the loaders died of the SIGTERM that stops the run
                    raise Terminated() from None
                self.retries.record(task, "cpu", _one_line(exc))
                pending.append(task)
                continue
            self.view.finished(task.shard, task.phase)
        return results


def _one_line(exc: BaseException) -> str:
    first = first_line(str(exc))  # the full trace is in the shard log
    return f"{type(exc).__name__}: {first}"


class Events:
    """A worker's own channel of events to the parent: one pipe per worker, written by
    its process alone (a thread at a time), each event sent whole before `put` returns.
    No lock is shared with another process: a worker killed at any moment (kill -9, the
    OOM killer), even in the middle of an event, takes only its own channel with it; the
    parent reads the end of it and respawns the worker (a queue shared by the workers
    would keep its write lock held by the dead one, and every other worker would wait on
    it for ever)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def put(self, event: tuple) -> None:
        with self.lock:
            testpoints.reach("event", lambda: self._torn(event))
            self.conn.send(event)

    def _torn(self, event: tuple) -> None:
        """The first half of an event's bytes, as a process killed while sending leaves
        them (the `event` test point)."""
        from multiprocessing.reduction import ForkingPickler

        data = bytes(ForkingPickler.dumps(event))
        os.write(self.conn.fileno(), struct.pack("!i", len(data)) + data[:len(data) // 2])


def _worker_main(wid: int, config: Config, device: str, tasks: Any, conn: Any) -> None:
    """A worker process: run tasks until told to stop; report every outcome as a value,
    tagged with the attempt it belongs to, on its own channel (`Events`)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up temporary files
    settle_imports()
    events = Events(conn)
    context = Context(config, device)
    while (item := _next_task(tasks)) is not None:
        attempt, phase, shard = item
        events.put(("taken", attempt))
        task = Task(phase, shard)
        _redirect_output(context.run, context.run.log(task.shard))
        try:
            info = run_task(context, task, _progress_sender(attempt, events))
            events.put(("done", attempt, info))
        except HnmError as exc:
            events.put(("input_error", attempt, str(exc)))
        except Exception as exc:
            events.put(("failed", attempt, _one_line(exc)))


def _let_go(tasks: Any) -> None:
    """A task queue closed without waiting for what it still holds to be taken."""
    tasks.close()
    tasks.cancel_join_thread()


def _next_task(tasks: Any) -> Any:
    """The next task, or None once told to stop or once the parent is gone (kill -9)."""
    import multiprocessing as mp

    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            parent = mp.parent_process()
            if parent is not None and not parent.is_alive():
                return None


def _progress_sender(attempt: int, events: Any) -> Any:
    """A progress callback that sends at most one event per PROGRESS_EVERY_S."""
    last = [0.0]

    def progress(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done >= total:
            last[0] = now
            events.put(("progress", attempt, phase, done, total))

    return progress


def _redirect_output(run: RunDir, path: Any) -> None:
    """Workers never write to the terminal: stdout and stderr (C level too) go to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = run.append(path)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@dataclass
class Running:
    """A task handed to a worker: which attempt, when it last showed progress, and whether
    the worker has taken it from its queue yet."""

    task: Task
    attempt: int
    seen: float = field(default_factory=time.monotonic)
    taken: bool = False

    def stalled(self, stall: float) -> bool:
        limit = stall if self.taken else stall + START_GRACE_S
        return bool(stall) and time.monotonic() - self.seen > limit


class WorkerPool:
    """One spawned process per device; failed shards are retried on whichever is free."""

    def __init__(self, config: Config, devices: list[str], view: ProgressView) -> None:
        if any(d.startswith("cuda") for d in devices):
            import torch.multiprocessing as mp  # GPU workers: torch's own spawning
        else:  # CPU workers share nothing but files: the launcher need not import torch
            import multiprocessing as mp

        # A worker killed mid-write (kill -9, OOM) can leave a queue semaphore behind; the
        # tracker that reclaims it would print a warning, which is noise once it is reclaimed.
        os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
        if any(d.startswith("cuda") for d in devices):  # inherited by the spawned workers
            os.environ.update(gpus.worker_environment())
        self.config = config
        self.devices = devices
        self.view = view
        self.ctx = mp.get_context("spawn")
        # per worker: its process, its task queue, and the end of its event channel
        self.workers: dict[int, tuple[Any, Any, Any]] = {}
        self.ended: set[int] = set()  # workers whose channel was read to its end
        self.retries = Retries(config, view)
        self.attempts = itertools.count()

    def __enter__(self) -> WorkerPool:
        for wid in range(len(self.devices)):
            self._spawn(wid)
        return self

    def _spawn(self, wid: int) -> None:
        """Start worker `wid` with a new task queue and event channel (a worker it
        replaces was stopped: its queue and channel are let go)."""
        if wid in self.workers:
            _, old_tasks, old_events = self.workers.pop(wid)
            _let_go(old_tasks)
            old_events.close()
        self.ended.discard(wid)
        tasks = self.ctx.Queue()
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker_main, name=f"hnm-worker-{wid}",
                                args=(wid, self.config, self.devices[wid], tasks, writer))
        proc.start()
        writer.close()  # the worker's alone: its death reads as the channel's end
        self.workers[wid] = (proc, tasks, reader)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(grace_s=0.0 if exc_type else 5.0)

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every worker: ask, then terminate, then kill; leave no orphans."""
        for proc, tasks, _ in self.workers.values():
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    tasks.put(None)
        deadline = time.monotonic() + grace_s
        for proc, _, _ in self.workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc, _, _ in self.workers.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for _, tasks, events in self.workers.values():
            _let_go(tasks)
            events.close()
        self.workers.clear()

    def run_phase(self, tasks: list[Task]) -> dict[Task, dict]:
        pending: deque[Task] = deque(tasks)
        running: dict[int, Running] = {}
        results: dict[Task, dict] = {}
        while pending or running:
            for wid, (_, queue_, _) in self.workers.items():
                if pending and wid not in running:
                    task = pending.popleft()
                    running[wid] = Running(task, next(self.attempts))
                    queue_.put((running[wid].attempt, task.phase, task.shard))
                    self.view.started(task.shard, task.phase, self.devices[wid])
            for event in self._events(POLL_S):
                self.handle(event, pending, running, results)
            self._watch(pending, running)
        return results

    def _events(self, timeout: float) -> list[tuple]:
        """The events the workers sent, waiting up to `timeout` for the first; a channel
        read to its end (its worker died, maybe in the middle of an event) is left until
        the worker is respawned."""
        from multiprocessing.connection import wait

        open_ = {events: wid for wid, (_, _, events) in self.workers.items()
                 if wid not in self.ended}
        got = []
        for events in wait(list(open_), timeout):
            try:
                while events.poll():
                    got.append(events.recv())
            except (EOFError, OSError):
                self.ended.add(open_[events])
        return got

    def handle(self, event: tuple, pending: deque, running: dict[int, Running],
               results: dict) -> None:
        """One worker event. Events of an attempt that is no longer running (its worker
        was stopped, and the task handed out again) are ignored."""
        kind, attempt, *rest = event
        wid = next((w for w, r in running.items() if r.attempt == attempt), None)
        if wid is None:
            return
        task = running[wid].task
        running[wid].seen = time.monotonic()
        if kind == "taken":
            running[wid].taken = True
        elif kind == "progress":
            self.view.progress(task.shard, *rest)
        elif kind == "done":
            del running[wid]
            results[task] = rest[0]
            self.view.finished(task.shard, task.phase)
        elif kind == "input_error":
            raise HnmError(rest[0])
        else:
            del running[wid]
            self.retries.record(task, self.devices[wid], rest[0])
            pending.append(task)

    def _watch(self, pending: deque, running: dict[int, Running]) -> None:
        """A worker that died (crash, OOM, kill -9) loses its task, and so does one that
        showed no progress for --stall-timeout seconds (it is killed): the task is
        retried, the worker respawned."""
        stall = self.config.stall_timeout
        for wid, (proc, _, _) in list(self.workers.items()):
            job = running.get(wid)
            stalled = job is not None and job.stalled(stall)
            if proc.is_alive() and not stalled:
                continue
            if stalled:
                proc.kill()
                proc.join()
                why = f"no progress for {stall:g} s (--stall-timeout): worker stopped"
            else:
                why = f"worker exited with code {proc.exitcode}"
            running.pop(wid, None)
            self._spawn(wid)
            if job is not None:
                self.retries.record(job.task, self.devices[wid], why)
                pending.append(job.task)
