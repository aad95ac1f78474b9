"""No process outlives its run: workers die with their parent, DataLoader workers with
their worker, and a killed one means a retried shard, whatever is killed and how."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import REPO

from hnm.demo import make_demo

# real images through a real model, so that DataLoader workers are alive long enough
FLAGS = ("--config", "configs/demo.yaml", "--batch-size", "4", "--num-workers", "2",
         "--no-quiet")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, num_dialogs=8, turns_per_dialog=4, image_size=64)
    return out


def start(demo: Path, out: Path, *flags: str) -> subprocess.Popen:
    """launch.py in a session of its own: its process group holds everything it starts."""
    cmd = [sys.executable, "launch.py", *FLAGS, "--annotations", str(demo / "annotations.json"),
           "--image-dir", str(demo), "--output-dir", str(out), *flags]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.fixture(scope="module")
def clean(demo, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("clean") / "run"
    proc = start(demo, out, "--cpu-workers", "1")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return (out / "negatives.jsonl").read_bytes()


def tree() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session, command line) of every live process."""
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
    """Every process of the run: started in a session of its own, it holds them all (a
    DataLoader worker leaves the run's process group, not its session)."""
    return [pid for pid, (_, s, _) in tree().items() if s == sid]


def loader_of(parent: int, timeout: float = 300, settle: float = 0.3) -> tuple[int, int]:
    """(process, one of its DataLoader workers), once a DataLoader worker runs under a
    child of `parent` (or under `parent` itself). A CPU worker's DataLoader workers are
    started like it (spawned); the parent's are forked copies of it. A process being
    spawned is a forked copy too, until it execs: a copy counts once it has stayed one
    for `settle` seconds."""
    deadline = time.monotonic() + timeout
    seen: dict[tuple[int, int], float] = {}
    while time.monotonic() < deadline:
        procs, now = tree(), time.monotonic()
        holders = [parent] + [p for p, (pp, _, _) in procs.items() if pp == parent]
        for holder in holders:
            forked = holder == parent  # the parent's loaders: forked copies of it
            loaders = [p for p, (pp, _, cmd) in procs.items()
                       if pp == holder and "resource_tracker import" not in cmd
                       and (cmd == procs[holder][2] if forked else "spawn_main" in cmd)]
            for loader in loaders:
                if not forked or now - seen.setdefault((holder, loader), now) >= settle:
                    return holder, loader
        seen = {key: t for key, t in seen.items() if key[1] in procs
                and procs[key[1]][2] == procs.get(key[0], (0, 0, None))[2]}
        time.sleep(0.05)
    raise AssertionError("no DataLoader worker appeared")


def gone(sid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while session(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not session(sid)


def test_killing_a_worker_with_loaders_running_leaves_nothing_behind(demo, clean, tmp_path):
    out = tmp_path / "run"
    proc = start(demo, out, "--cpu-workers", "2")
    worker, loader = loader_of(proc.pid)
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    stdout, err = proc.communicate(timeout=600)  # returns once no process holds its pipes
    assert proc.returncode == 0, err
    assert "worker exited with code -9 (will retry)" in stdout
    assert gone(proc.pid), f"left behind: {session(proc.pid)}"
    assert (out / "negatives.jsonl").read_bytes() == clean


def test_killing_the_parent_takes_every_process_with_it(demo, tmp_path):
    out = tmp_path / "run"
    proc = start(demo, out, "--cpu-workers", "2")
    loader_of(proc.pid)
    proc.kill()
    proc.wait()
    killed = time.time()
    assert gone(proc.pid, timeout=10), f"left behind: {session(proc.pid)}"
    time.sleep(1)
    late = [p for p in out.rglob("done*") if p.stat().st_mtime > killed]
    assert not late, f"written after the parent died: {late}"


def test_sigterm_to_the_group_is_one_line_and_exit_143(demo, tmp_path):
    out = tmp_path / "run"
    proc = start(demo, out, "--cpu-workers", "1")
    loader_of(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "hnm: interrupted; finished shards are kept: rerun the same command to resume"], err
    assert gone(proc.pid)


def test_a_killed_loader_worker_means_the_shard_again(demo, clean, tmp_path):
    out = tmp_path / "run"
    proc = start(demo, out, "--cpu-workers", "1")
    _, loader = loader_of(proc.pid)
    os.kill(loader, signal.SIGKILL)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "(will retry)" in stdout and "Traceback" not in err + stdout
    assert gone(proc.pid)
    assert (out / "negatives.jsonl").read_bytes() == clean
