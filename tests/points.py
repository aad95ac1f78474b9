"""Acting on a running run at a named point it reached (hnm.testpoints), never at a moment
chosen by the clock; and waiting for processes to end by their exit, not by polls.

The rule of the suite: every timeout here (and in any test) is a safety net of minutes
that a healthy run on the slowest supported machine never meets; what decides pass or
fail is what the run did, never how long it took.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

SAFETY_S = 600.0  # a run that has not reached its point in ten minutes is broken


def hold_env(point: str, shard: int | None, how: str = "hold") -> dict[str, str]:
    """The environment that makes the run wait at `point` of `shard`."""
    return {**os.environ, "HNM_TEST_CRASH": f"{point}:{shard}:{how}"}


def _run_log(proc: subprocess.Popen, out: Path) -> str:
    """What the run said, for a failure message: its output and its shard logs."""
    stdout, err = proc.communicate()
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted((out / "logs").glob("*.log")))
    return f"exit {proc.returncode}\n--- stdout\n{stdout}\n--- stderr\n{err}{logs}"


def wait_point(proc: subprocess.Popen, out: Path, point: str, shard: int | None) -> dict:
    """The facts the run wrote on reaching `point` of `shard` (it waits there until
    `release`). Fails at once, with the run's own output and logs, if the run ended
    without reaching it."""
    held = out / "logs" / f".held_{point}_{shard}"
    deadline = time.monotonic() + SAFETY_S
    while not held.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {point} of shard {shard}: "
                                 + _run_log(proc, out))
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"safety net: no {point} of shard {shard} in {SAFETY_S:g} "
                                 "s: " + _run_log(proc, out))
        time.sleep(0.05)
    return json.loads(held.read_text())


def release(out: Path, point: str, shard: int | None) -> None:
    """Let a run held at `point` of `shard` go on."""
    (out / "logs" / f".release_{point}_{shard}").touch()


def wait_exited(pids: list[int], timeout: float = SAFETY_S) -> list[int]:
    """Wait until each process has exited (a zombie has: it runs nothing); returns those
    still running when the safety net ran out. Woken by the kernel as each one exits."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        waiting = dict(fds)
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                poller.unregister(fd)
                waiting.pop(fd, None)
        return sorted(waiting.values())
    finally:
        for fd in fds:
            os.close(fd)


def processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session, command line) of every running (not zombie) process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            out[int(entry.name)] = (int(fields[1]), int(fields[3]), cmd)
        except (OSError, ValueError):
            continue
    return out


def session(sid: int) -> list[int]:
    """Every running process of a run started in a session of its own (a DataLoader worker
    leaves the run's process group, not its session)."""
    return [pid for pid, (_, s, _) in processes().items() if s == sid]


def children(pid: int) -> list[int]:
    return [p for p, (parent, _, _) in processes().items() if parent == pid]


def session_ends(sid: int, timeout: float = SAFETY_S) -> list[int]:
    """Wait for every process of the session to exit, those it starts meanwhile too;
    returns what still runs when the safety net ran out (nothing, when all is well)."""
    deadline = time.monotonic() + timeout
    while (alive := session(sid)) and time.monotonic() < deadline:
        wait_exited(alive, deadline - time.monotonic())
    return session(sid)
