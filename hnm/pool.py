"""Running phase tasks: in the parent (one CPU worker) or in spawned worker processes."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import time
from collections import Counter, deque
from typing import Any

from hnm.config import Config
from hnm.data import Dataset
from hnm.errors import HnmError
from hnm.progress import ProgressView
from hnm.storage import RunDir
from hnm.worker import Context, Task, run_task

# How long the parent waits for a worker event before checking for dead workers: short
# enough that a crash is noticed at once, long enough to cost nothing while idle.
POLL_S = 0.2
# Workers send at most one progress event per this many seconds: the view refreshes 4 times
# a second, and a queue message per image would cost more than the images.
PROGRESS_EVERY_S = 0.3


class RunFailed(HnmError):
    """A shard failed every retry; the run stops (exit 1) and can be resumed."""

    exit_status = 1


class InProcess:
    """One CPU worker: tasks run in the parent, one after the other."""

    def __init__(self, config: Config, view: ProgressView, ds: Dataset | None = None) -> None:
        self.context = Context(config, "cpu", ds)
        self.view = view

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def run_phase(self, tasks: list[Task]) -> dict[Task, dict]:
        results = {}
        for task in tasks:
            self.view.started(task.shard, task.phase, "cpu")

            def progress(phase: str, done: int, total: int, _t: Task = task) -> None:
                self.view.progress(_t.shard, phase, done, total)

            results[task] = run_task(self.context, task, progress)
            self.view.finished(task.shard, task.phase)
        return results


def _worker_main(wid: int, config: Config, device: str, tasks: Any, events: Any) -> None:
    """A worker process: run tasks until told to stop; report every outcome as a value."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up temporary files
    context = Context(config, device)
    while (item := _next_task(tasks)) is not None:
        task = Task(*item)
        _redirect_output(context.run.log(task.shard))
        try:
            info = run_task(context, task, _progress_sender(wid, task, events))
            events.put(("done", wid, task.phase, task.shard, info))
        except HnmError as exc:
            events.put(("input_error", wid, task.phase, task.shard, str(exc)))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]  # the full trace is in the log
            events.put(("failed", wid, task.phase, task.shard, f"{type(exc).__name__}: {first}"))


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


def _progress_sender(wid: int, task: Task, events: Any) -> Any:
    """A progress callback that sends at most one event per PROGRESS_EVERY_S."""
    last = [0.0]

    def progress(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done >= total:
            last[0] = now
            events.put(("progress", wid, task.phase, task.shard, done, total))

    return progress


def _redirect_output(path: Any) -> None:
    """Workers never write to the terminal: stdout and stderr (C level too) go to the log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class WorkerPool:
    """One spawned process per device; failed shards are retried on whichever is free."""

    def __init__(self, config: Config, devices: list[str], view: ProgressView) -> None:
        import torch.multiprocessing as mp

        # A worker killed mid-write (kill -9, OOM) can leave a queue semaphore behind; the
        # tracker that reclaims it would print a warning, which is noise once it is reclaimed.
        os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
        self.config = config
        self.devices = devices
        self.view = view
        self.ctx = mp.get_context("spawn")
        self.events = self.ctx.Queue()
        self.workers: dict[int, tuple[Any, Any]] = {}
        self.attempts: Counter = Counter()

    def __enter__(self) -> WorkerPool:
        for wid in range(len(self.devices)):
            self._spawn(wid)
        return self

    def _spawn(self, wid: int) -> None:
        tasks = self.ctx.Queue()
        proc = self.ctx.Process(target=_worker_main, name=f"hnm-worker-{wid}",
                                args=(wid, self.config, self.devices[wid], tasks, self.events))
        proc.start()
        self.workers[wid] = (proc, tasks)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(grace_s=0.0 if exc_type else 5.0)

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every worker: ask, then terminate, then kill; leave no orphans."""
        for proc, tasks in self.workers.values():
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    tasks.put(None)
        deadline = time.monotonic() + grace_s
        for proc, _ in self.workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc, _ in self.workers.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for _, tasks in self.workers.values():
            tasks.close()
            tasks.cancel_join_thread()
        self.workers.clear()

    def run_phase(self, tasks: list[Task]) -> dict[Task, dict]:
        pending, running, results = deque(tasks), {}, {}
        while pending or running:
            for wid, (_, queue_) in self.workers.items():
                if pending and wid not in running:
                    task = pending.popleft()
                    running[wid] = task
                    queue_.put((task.phase, task.shard))
                    self.view.started(task.shard, task.phase, self.devices[wid])
            self._poll(pending, running, results)
            self._reap(pending, running)
        return results

    def _poll(self, pending: deque, running: dict, results: dict) -> None:
        try:
            event = self.events.get(timeout=POLL_S)
        except queue.Empty:
            return
        kind, wid, phase, shard, *rest = event
        task = Task(phase, shard)
        if kind == "progress":
            self.view.progress(shard, phase, *rest)
        elif kind == "done":
            running.pop(wid, None)
            results[task] = rest[0]
            self.view.finished(shard, phase)
        elif kind == "input_error":
            raise HnmError(rest[0])
        else:
            running.pop(wid, None)
            self._retry(task, wid, rest[0], pending)

    def _reap(self, pending: deque, running: dict) -> None:
        """A worker that died (crash, OOM, kill -9) loses its task: retry it, respawn it."""
        for wid, (proc, _) in list(self.workers.items()):
            if proc.is_alive():
                continue
            task = running.pop(wid, None)
            self._spawn(wid)
            if task is not None:
                self._retry(task, wid, f"worker exited with code {proc.exitcode}", pending)

    def _retry(self, task: Task, wid: int, error: str, pending: deque) -> None:
        self.attempts[task] += 1
        retrying = self.attempts[task] <= self.config.max_retries
        self.view.failed(task.shard, task.phase, error, retrying)
        if retrying:
            pending.append(task)
            return
        log = RunDir(self.config.output_dir).log(task.shard)
        what = "the tables phase" if task.shard is None else f"shard {task.shard}"
        where = "" if task.shard is None else f" in {task.phase}"
        raise RunFailed(
            f"{what} failed{where} on {self.devices[wid]} after {self.attempts[task]} "
            f"attempt(s): {error}; see {log}. Rerunning the same command resumes.")
