"""No process outlives its run: workers die with their parent, DataLoader workers with
their worker, and a killed one means a retried shard, whatever is killed and how.

Each test holds the run inside its embedding loop (the `embed-batch` point: the DataLoader
workers are alive, have delivered a batch and hold more), acts, then lets it go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from builders import REPO
from points import SAFETY_S, hold_env, release, session, session_ends, wait_point

from hnm.demo import make_demo

# real images through a real model, so that DataLoader workers are alive long enough
FLAGS = ("--config", "configs/demo.yaml", "--batch-size", "4", "--num-workers", "2",
         "--no-quiet")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, num_dialogs=8, turns_per_dialog=4, image_size=64)
    return out


def start(demo: Path, out: Path, *flags: str, env: dict | None = None) -> subprocess.Popen:
    """launch.py in a session of its own: its process group holds everything it starts."""
    cmd = [sys.executable, "launch.py", *FLAGS, "--annotations", str(demo / "annotations.json"),
           "--image-dir", str(demo), "--output-dir", str(out), *flags]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)


def held(demo: Path, out: Path, shard: int, *flags: str) -> tuple[subprocess.Popen, dict]:
    """A run held in `shard`'s embedding loop, and what it wrote there: the process
    (`pid`) and its live DataLoader workers (`loaders`)."""
    proc = start(demo, out, *flags, env=hold_env("embed-batch", shard))
    facts = wait_point(proc, out, "embed-batch", shard)
    assert facts["loaders"], facts  # --num-workers 2: the loop reads through two loaders
    return proc, facts


@pytest.fixture(scope="module")
def clean(demo, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("clean") / "run"
    proc = start(demo, out, "--cpu-workers", "1")
    _, err = proc.communicate(timeout=SAFETY_S)
    assert proc.returncode == 0, err
    return (out / "negatives.jsonl").read_bytes()


def test_killing_a_worker_with_loaders_running_leaves_nothing_behind(demo, clean, tmp_path):
    out = tmp_path / "run"
    proc, facts = held(demo, out, 1, "--cpu-workers", "2")
    assert facts["pid"] != proc.pid  # a worker process, not the launcher
    os.kill(facts["pid"], signal.SIGKILL)
    stdout, err = proc.communicate(timeout=SAFETY_S)  # once no process holds its pipes
    assert proc.returncode == 0, err
    assert "worker exited with code -9 (will retry)" in stdout
    assert not session_ends(proc.pid), f"left behind: {session(proc.pid)}"
    assert (out / "negatives.jsonl").read_bytes() == clean


def test_killing_the_parent_takes_every_process_with_it(demo, tmp_path):
    out = tmp_path / "run"
    proc, facts = held(demo, out, 0, "--cpu-workers", "2")
    done_before = {p: p.stat().st_mtime_ns for p in out.rglob("done*")}
    proc.kill()
    proc.wait()
    assert not session_ends(proc.pid), f"left behind: {session(proc.pid)}"
    # every process of the run has exited: whatever it wrote, it wrote before now
    after = {p: p.stat().st_mtime_ns for p in out.rglob("done*")}
    assert after == done_before, "a phase was marked done after the parent died"


def test_sigterm_to_the_group_is_one_line_and_exit_143(demo, tmp_path):
    out = tmp_path / "run"
    proc, _ = held(demo, out, 0, "--cpu-workers", "1")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=SAFETY_S)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "hnm: interrupted; finished shards are kept: rerun the same command to resume"], err
    assert not session_ends(proc.pid), f"left behind: {session(proc.pid)}"


def test_a_killed_loader_worker_means_the_shard_again(demo, clean, tmp_path):
    """The loaders die while the loop holds batches still to come from them: the next
    batch cannot arrive, the loop fails, and the shard is embedded again."""
    out = tmp_path / "run"
    proc, facts = held(demo, out, 0, "--cpu-workers", "1")
    for loader in facts["loaders"]:
        os.kill(loader, signal.SIGKILL)
    release(out, "embed-batch", 0)
    stdout, err = proc.communicate(timeout=SAFETY_S)
    assert proc.returncode == 0, err
    assert "(will retry)" in stdout and "Traceback" not in err + stdout
    assert not session_ends(proc.pid), f"left behind: {session(proc.pid)}"
    assert (out / "negatives.jsonl").read_bytes() == clean
