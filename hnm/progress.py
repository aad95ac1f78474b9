"""The live terminal view of a run (parent process only): rich when a terminal, plain lines else."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hnm.gpus import MemoryReader
from hnm.summary import device_name

# More shards than this (--shard-rows cuts a large run into many): the live table shows the
# shards at work, and counts the others.
LIVE_SHARDS = 16


@dataclass
class ShardRow:
    """What the view knows of one shard."""

    shard: int | str
    device: str
    phase: str = "wait"
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 and self.done else 0.0

    def eta(self) -> str:
        rate = self.rate()
        if not rate or self.total <= self.done:
            return "-"
        return f"{(self.total - self.done) / rate:.0f}s"


def choose_mode(quiet: bool, stream: Any = None) -> str:
    """'live' on a terminal, 'plain' (a line per event) elsewhere, 'quiet' on request."""
    if quiet:
        return "quiet"
    stream = stream or sys.stdout
    return "live" if stream.isatty() else "plain"


class ProgressView:
    """Renders worker events; the only writer to the terminal during a run."""

    def __init__(self, shards: list[dict[str, Any]], mode: str,
                 nvml: dict[str, tuple[int, int | None]] | None = None,
                 transient: bool = False) -> None:
        self.transient = transient
        self.rows: dict[int | str, ShardRow] = {
            s["shard"]: ShardRow(s["shard"], s["device"]) for s in shards}
        self.mode = mode
        self.nvml = nvml or {}  # device -> NVML index and MIG slot, for memory readings
        self.memory = MemoryReader()  # NVML, opened once for the whole view
        self.console = Console(highlight=False)
        self.live: Live | None = None
        self._memory: dict[str, float | None] = {}
        self._memory_at = 0.0

    def __enter__(self) -> ProgressView:
        if self.mode == "live":
            self.live = Live(self._table(), console=self.console, refresh_per_second=4,
                             transient=self.transient)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.update(self._table())
            self.live.__exit__(*exc)
            self.live = None
        self.memory.close()

    def say(self, text: str) -> None:
        """A line above the live table (or a plain line); nothing when quiet."""
        if self.mode != "quiet":
            self.console.print(text, markup=False, soft_wrap=True)

    def started(self, shard: int | None, phase: str, device: str) -> None:
        row = self._row(shard, phase, device)
        row.done, row.total, row.started = 0, 0, time.monotonic()
        if self.mode == "plain":
            self.say(f"{_who(device, shard)} started {phase}")
        self.refresh()

    def progress(self, shard: int | None, phase: str, done: int, total: int) -> None:
        row = self._row(shard, phase, None)
        row.done, row.total = done, total
        self.refresh()

    def finished(self, shard: int | None, phase: str) -> None:
        row = self._row(shard, "done" if phase in ("candidates", "tables") else phase, None)
        row.total = max(row.total, 1)
        row.done = row.total
        seconds = time.monotonic() - row.started
        if self.mode == "plain":
            self.say(f"{_who(row.device, shard)} finished {phase} in {seconds:.1f}s")
        self.refresh()

    def failed(self, shard: int | None, phase: str, error: str, retrying: bool) -> None:
        row = self._row(shard, "retry" if retrying else "failed", None)
        what = "will retry" if retrying else "giving up"
        self.say(f"{_who(row.device, shard)} failed in {phase}: {error} ({what})")
        self.refresh()

    def stage(self, name: str, done: int, total: int) -> None:
        """Progress of a parent-side stage (loading, selecting, writing)."""
        row = self._row(name, name, "parent")
        if done == 0:
            row.started = time.monotonic()
        row.done, row.total = done, total
        self.refresh()

    def _row(self, shard: int | str | None, phase: str, device: str | None) -> ShardRow:
        key = -1 if shard is None else shard
        row = self.rows.setdefault(key, ShardRow(key, device or "cpu"))
        row.phase = phase
        if device:
            row.device = device
        return row

    def refresh(self) -> None:
        if self.live:
            self.live.update(self._table())

    def _gpu_memory(self, device: str) -> str:
        if device not in self.nvml:
            return "-"
        now = time.monotonic()
        if now - self._memory_at > 1.0:  # NVML queries are cheap, but not free
            self._memory = {d: self.memory.used_gb(*where) for d, where in self.nvml.items()}
            self._memory_at = now
        used = self._memory.get(device)
        return "-" if used is None else f"{used:.1f} GB"

    def _table(self) -> Table:
        table = Table(title="hnm", expand=False)
        for column in ("shard", "device", "phase", "done", "rate/s", "ETA", "GPU mem"):
            table.add_column(column, justify="right" if column != "phase" else "left")
        total_done = total_all = 0
        shards = sum(isinstance(k, int) and k >= 0 for k in self.rows)
        idle = {"wait": 0, "done": 0}  # shards left out of a long table, by phase
        for key in sorted(self.rows, key=_order):
            r = self.rows[key]
            if isinstance(key, int) and key >= 0:  # the total counts shards' items only
                total_done += r.done
                total_all += r.total
                if shards > LIVE_SHARDS and r.phase in idle:
                    idle[r.phase] += 1
                    continue
            table.add_row(_label(key), r.device, r.phase,
                          f"{r.done}/{r.total}", f"{r.rate():.1f}", r.eta(),
                          self._gpu_memory(r.device))
        if any(idle.values()):
            table.add_row("others", "", f"{idle['wait']} waiting, {idle['done']} done", "",
                          "", "", "")
        table.add_row("total", "", "", f"{total_done}/{total_all}", "", "", "")
        return table


def _order(key: int | str) -> tuple[int, int]:
    """Shards in order, then the tables phase, then parent-side stages."""
    if isinstance(key, str):
        return (2, 0)
    return (1, 0) if key < 0 else (0, key)


def _label(shard: int | str | None) -> str:
    return "tables" if shard is None or shard == -1 else str(shard)


def _who(device: str, shard: int | None) -> str:
    what = "tables" if shard is None else f"shard {shard}"
    return f"{device_name(device)} ({what})"
