"""Multi-worker runs: identical bytes for any worker count, retries, interrupts and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import tiny_bert
from points import SAFETY_S, children, hold_env, wait_exited, wait_point

from hnm import placement
from hnm.config import Config
from hnm.demo import make_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, num_dialogs=10, turns_per_dialog=4, image_size=64)
    return out


def launch(demo: Path, out: Path, *flags: str, env: dict | None = None,
           timeout: float = SAFETY_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", "--config", "configs/demo.yaml",
           "--annotations", str(demo / "annotations.json"), "--image-dir", str(demo),
           "--output-dir", str(out), "--num-workers", "0", "--batch-size", "8", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def marker_times(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in out.glob("*/done*")}


@pytest.fixture(scope="module")
def single(demo, tmp_path_factory) -> Path:
    """One worker with the real encoders: the reference of the one real-encoder
    multi-worker comparison."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = launch(demo, out, "--cpu-workers", "1")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[str, ...]:
    """Encoders that start in a blink (pixels, a tiny random BERT): workers that load
    models and run the embedding loop, for the tests of the loop itself."""
    return ("--visual-encoder", "pixels", "--text-encoder",
            str(tiny_bert(tmp_path_factory.mktemp("tiny_bert"))))


@pytest.fixture(scope="module")
def light(demo, tmp_path_factory) -> tuple[str, ...]:
    """Precomputed embeddings of the demo's records: what the tests of retries,
    interrupts and torchrun need is real processes, every phase and the shards' files,
    not models (a worker that imports none starts in a second, not in several)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("precomputed")
    rows = len(json.loads((demo / "annotations.json").read_text()))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32))  # near-duplicates, so that the rules have work
    image = centres[rng.integers(0, 6, rows)] + 0.3 * rng.normal(size=(rows, 32))
    np.save(folder / "image.npy", image.astype(np.float32))
    np.save(folder / "text.npy", rng.normal(size=(rows, 16)).astype(np.float32))
    return ("--image-embeddings", str(folder / "image.npy"),
            "--text-embeddings", str(folder / "text.npy"))


def one_worker_run(demo: Path, flags: tuple[str, ...], folder: Path) -> Path:
    out = folder / "run"
    result = launch(demo, out, "--cpu-workers", "1", *flags)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def light_single(demo, light, tmp_path_factory) -> Path:
    return one_worker_run(demo, light, tmp_path_factory.mktemp("light_single"))


@pytest.fixture(scope="module")
def encoders_single(demo, encoders, tmp_path_factory) -> Path:
    return one_worker_run(demo, encoders, tmp_path_factory.mktemp("encoders_single"))


@pytest.mark.parametrize("workers,models", [(2, "real"), (3, "encoders"), (3, "light")])
def test_output_is_byte_identical_for_any_worker_count(demo, request, tmp_path, workers,
                                                       models):
    single = request.getfixturevalue({"real": "single", "encoders": "encoders_single",
                                      "light": "light_single"}[models])
    flags = request.getfixturevalue(models) if models != "real" else ()
    t0 = time.monotonic()
    result = launch(demo, tmp_path / "run", "--cpu-workers", str(workers), *flags)
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run/negatives.jsonl").read_bytes() == \
        (single / "negatives.jsonl").read_bytes()
    plan = json.loads((tmp_path / "run/plan.json").read_text())
    assert len(plan["shards"]) == workers
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert len(metrics["shards"]) == workers
    # global figures are merged counts, equal to the one-worker run's
    assert metrics["global"] == json.loads((single / "metrics.json").read_text())["global"]
    assert sum(s["anchors"] for s in metrics["shards"]) == metrics["global"]["anchors"]
    # throughput is over this invocation's wall time, not the workers' summed seconds
    wall = metrics["wall_seconds"]
    assert 0 < wall < elapsed  # measured inside the run, which this test's clock contains
    assert metrics["throughput_anchors_per_s"] == round(metrics["global"]["anchors"] / wall, 2)
    assert f"Running on {workers} CPU worker(s)" in result.stdout.replace("\n", " ")


@pytest.mark.parametrize("point", ["embed", "event"])
def test_a_killed_worker_is_retried_and_the_output_is_unchanged(demo, light, light_single,
                                                                 tmp_path, point):
    """A worker killed as its task starts, or in the middle of sending an event (half of
    its bytes written): the other worker's events still arrive, the task is retried."""
    result = launch(demo, tmp_path / "run", "--cpu-workers", "2", *light,
                    env={"HNM_TEST_CRASH": f"{point}:1"})
    assert result.returncode == 0, result.stderr
    phase = "embed" if point == "embed" else r"\w+"  # an event: the first one shard 1 sends
    assert re.search(f"failed in {phase}: worker exited with code -9 \\(will retry\\)",
                     result.stdout), result.stdout
    assert (tmp_path / f"run/logs/.reached_{point}_1").exists()
    assert (tmp_path / "run/negatives.jsonl").read_bytes() == \
        (light_single / "negatives.jsonl").read_bytes()


def test_a_shard_failing_every_retry_stops_the_run_with_a_resumable_message(demo, light,
                                                                            tmp_path):
    result = launch(demo, tmp_path / "run", "--cpu-workers", "2", "--max-retries", "0", *light,
                    env={"HNM_TEST_CRASH": "candidates:0"})
    assert result.returncode == 1
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "shard 0 failed in candidates on cpu" in err
    assert "logs/shard_00000.log" in err and "Rerunning the same command resumes" in err
    assert not (tmp_path / "run/negatives.jsonl").exists()
    again = launch(demo, tmp_path / "run", "--cpu-workers", "2", *light)
    assert again.returncode == 0, again.stderr
    # shard 1 may or may not have finished its candidates before shard 0's failure stopped
    # the run: either way it is kept or done again, never mixed
    assert re.search(r"Resumed: reused 2 embedded and [01] mined shard\(s\) of 2, and the "
                     "tables", again.stdout), again.stdout


def default_signals() -> None:
    """A run started by a test gets Ctrl-C and SIGTERM as a terminal would send them,
    whatever the test process inherited (an ignored SIGINT is inherited across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_held(demo: Path, out: Path, point: str, shard: int | None, *flags: str,
               **popen: object) -> subprocess.Popen:
    """A two-worker run held at `point` of `shard` (hnm.testpoints): it cannot finish, or
    pass the point, before the test acts."""
    cmd = [sys.executable, "launch.py", "--config", "configs/demo.yaml",
           "--annotations", str(demo / "annotations.json"), "--image-dir", str(demo),
           "--output-dir", str(out), "--num-workers", "0", "--batch-size", "8",
           "--cpu-workers", "2", *flags]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=hold_env(point, shard), **popen)
    wait_point(proc, out, point, shard)
    return proc


def finished_shards(out: Path) -> tuple[int, int, bool]:
    """Embedded and mined shards, and whether the tables are built, by their markers."""
    return (len(list(out.glob("embeddings/done_*"))),
            len(list(out.glob("candidates/done_*"))), (out / "tables/done").exists())


# Every point a run can be stopped at, each with one of the two signals a user sends.
STOPS = [("embed-batch", 1, signal.SIGINT, 130), ("tables", None, signal.SIGTERM, 143),
         ("candidates", 0, signal.SIGTERM, 143), ("search", 1, signal.SIGINT, 130),
         ("reduce", 1, signal.SIGTERM, 143)]


@pytest.mark.parametrize("point,shard,sig,status", STOPS,
                         ids=[f"{p}-{s.name}" for p, _, s, _ in STOPS])
def test_interrupt_stops_workers_and_a_rerun_resumes(demo, request, tmp_path, point, shard,
                                                     sig, status):
    """Held at a named point, the signal stops the run there, whatever the machine's speed:
    the workers exit, nothing half-written stays, and the rerun reuses exactly what was
    finished and gives the one-worker run's bytes. (Inside the embedding loop: workers
    with encoders; elsewhere precomputed embeddings.)"""
    looped = point == "embed-batch"
    light = request.getfixturevalue("encoders" if looped else "light")
    light_single = request.getfixturevalue("encoders_single" if looped else "light_single")
    out = tmp_path / "run"
    proc = start_held(demo, out, point, shard, *light, preexec_fn=default_signals)
    workers = children(proc.pid)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=SAFETY_S)
    except subprocess.TimeoutExpired:
        status_ = Path(f"/proc/{proc.pid}/status").read_text()
        proc.kill()
        raise AssertionError(f"safety net: no stop after {sig!r}: " + " ".join(
            line for line in status_.splitlines() if line.startswith(("State", "Sig")))) \
            from None
    assert proc.returncode == status, err
    assert "rerun the same command to resume" in err
    assert not wait_exited(workers), "workers outlived the interrupted run"
    assert not list(out.rglob("*.tmp")), "half-written files were left behind"
    embedded, mined, tables = finished_shards(out)
    before = marker_times(out)
    again = launch(demo, out, "--cpu-workers", "2", *light)
    assert again.returncode == 0, again.stderr
    said = f"Resumed: reused {embedded} embedded and {mined} mined shard(s) of 2" + (
        ", and the tables" if tables else "")
    if embedded or tables:
        assert said in again.stdout, (said, again.stdout)
    else:  # nothing was finished: a fresh start, said as one
        assert "Resumed" not in again.stdout, again.stdout
    after = marker_times(out)
    assert all(after[k] == v for k, v in before.items()), "finished shards were redone"
    assert (out / "negatives.jsonl").read_bytes() == \
        (light_single / "negatives.jsonl").read_bytes()


def test_finished_run_rerun_does_nothing(demo, light, light_single):
    before = marker_times(light_single)
    result = launch(demo, light_single, "--cpu-workers", "1", *light)
    assert result.returncode == 0
    assert "Nothing to do" in result.stdout
    assert marker_times(light_single) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_more_shards_than_workers_match_the_single_process_run(demo, light, light_single,
                                                               tmp_path):
    """--shard-rows 8 cuts the 40 rows into 5 shards, which 2 workers take in turn."""
    out = tmp_path / "run"
    result = launch(demo, out, "--cpu-workers", "2", "--shard-rows", "8", *light)
    assert result.returncode == 0, result.stderr
    for name in ("negatives.jsonl", "suspects.jsonl"):
        assert (out / name).read_bytes() == (light_single / name).read_bytes()
    plan = json.loads((out / "plan.json").read_text())
    assert [s["rows"] for s in plan["shards"]] == [[i, i + 8] for i in range(0, 40, 8)]
    assert [s["device"] for s in plan["shards"]] == ["cpu"] * 5
    assert sum(s["anchors"][1] - s["anchors"][0] for s in plan["shards"]) == \
        plan["num_anchors"]
    assert len(plan["placement"]["devices"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["shards"]) == 5
    assert metrics["global"] == json.loads((light_single / "metrics.json").read_text())["global"]
    # each array of every shard as the one-shard run wrote it, cut at the shard edges
    for name in ("visual", "text"):
        assert (out / f"tables/{name}.npy").read_bytes() == \
            (light_single / f"tables/{name}.npy").read_bytes()


@pytest.mark.parametrize("flags", [(), ("--shard-rows", "8")], ids=["2-shards", "5-shards"])
def test_torchrun_two_nodes_match_the_single_process_run(demo, light, light_single, tmp_path,
                                                         flags):
    """Two torchrun processes on 127.0.0.1 play two nodes sharing the run directory; with
    --shard-rows 8, five shards: rank s % 2 runs shard s."""
    out = tmp_path / "run"
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", f"--node-rank={node}", "--master-addr=127.0.0.1",
               f"--master-port={port}", "launch.py", "--config", "configs/demo.yaml",
               "--annotations", str(demo / "annotations.json"), "--image-dir", str(demo),
               "--output-dir", str(out), "--num-workers", "0", "--batch-size", "8", *light,
               *flags]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=SAFETY_S) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert (out / "negatives.jsonl").read_bytes() == \
        (light_single / "negatives.jsonl").read_bytes()
    assert (out / "suspects.jsonl").read_bytes() == \
        (light_single / "suspects.jsonl").read_bytes()
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["shards"]) == (5 if flags else 2)
    assert "Hard negative mining completed" in results[0][0]


def test_more_workers_than_batches_leaves_shards_empty_and_still_matches(demo, light, tmp_path):
    """40 rows in batches of 64: one batch, three workers; two shards embed nothing."""
    flags = ("--batch-size", "64", *light)
    one = launch(demo, tmp_path / "one", "--cpu-workers", "1", *flags)
    three = launch(demo, tmp_path / "three", "--cpu-workers", "3", *flags)
    assert one.returncode == 0, one.stderr
    assert three.returncode == 0, three.stderr
    rows = [s["rows"] for s in json.loads((tmp_path / "three/plan.json").read_text())["shards"]]
    assert rows == [[0, 0], [0, 0], [0, 40]]
    assert (tmp_path / "three/negatives.jsonl").read_bytes() == \
        (tmp_path / "one/negatives.jsonl").read_bytes()


def test_overwrite_never_trusts_files_it_did_not_plan(demo, light, tmp_path):
    """A directory with phase markers but no plan.json: --overwrite starts afresh."""
    flags = (*light, "--cpu-workers", "1")
    reference = launch(demo, tmp_path / "reference", *flags)
    assert reference.returncode == 0, reference.stderr
    other = tmp_path / "other"
    assert launch(demo, other, *flags, "--max-samples", "7").returncode == 0
    (other / "plan.json").unlink()
    refused = launch(demo, other, *flags, "--no-overwrite")  # demo.yaml says overwrite
    assert refused.returncode == 2
    assert "holds an unfinished hnm run without its plan.json; pass --overwrite" in \
        refused.stderr
    again = launch(demo, other, *flags, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert (other / "negatives.jsonl").read_bytes() == \
        (tmp_path / "reference/negatives.jsonl").read_bytes()


def test_overwrite_keeping_embeddings_keeps_their_shard_ranges(demo, light, tmp_path):
    """Same inputs, another batch size and threshold: embeddings are reused as cut."""
    out = tmp_path / "run"
    first = launch(demo, out, *light, "--cpu-workers", "2",
                   "--batch-size", "8")
    assert first.returncode == 0, first.stderr
    before = json.loads((out / "plan.json").read_text())["shards"]
    marks = {p.name: p.stat().st_mtime_ns for p in out.glob("embeddings/done_*")}
    again = launch(demo, out, *light, "--cpu-workers", "3",
                   "--batch-size", "16", "--cosine-threshold", "0.25", "--overwrite")
    assert again.returncode == 0, again.stderr
    after = json.loads((out / "plan.json").read_text())["shards"]
    assert [s["rows"] for s in after] == [s["rows"] for s in before]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("embeddings/done_*")} == marks


def test_workers_exit_when_the_parent_is_killed(demo, light, tmp_path):
    out = tmp_path / "run"
    proc = start_held(demo, out, "embed", 1, *light, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    workers = children(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    assert not wait_exited(workers), "workers outlived their parent"


def test_editing_an_input_file_in_place_is_a_new_run(demo, light, tmp_path):
    """The run's identity covers the bytes of the files it names, not only their paths."""
    blacklist = tmp_path / "blacklist.txt"
    blacklist.write_text("yes\n")
    flags = (*light, "--blacklist", str(blacklist), "--no-overwrite")
    assert launch(demo, tmp_path / "run", *flags).returncode == 0
    assert "Nothing to do" in launch(demo, tmp_path / "run", *flags).stdout
    blacklist.write_text("yes\nturn left\n")
    changed = launch(demo, tmp_path / "run", *flags)
    assert changed.returncode == 2 and "holds a run with a different config" in changed.stderr


def test_torchrun_ranks_stop_within_seconds_when_one_dies(demo, light, tmp_path):
    """Rank 1 is killed while embedding: rank 0 stops in seconds, with a line naming it."""
    out = tmp_path / "run"
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", f"--node-rank={node}", "--master-addr=127.0.0.1",
               f"--master-port={port}", "launch.py", "--config", "configs/demo.yaml",
               "--annotations", str(demo / "annotations.json"), "--image-dir", str(demo),
               "--output-dir", str(out), "--num-workers", "0", "--batch-size", "8",
               *light, "--stall-timeout", "10"]
        env = {**os.environ, "HNM_TEST_CRASH": "embed:1"} if node else None
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    results = [p.communicate(timeout=SAFETY_S) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    err = results[0][1]
    assert ("hnm: error: rank 1 stopped responding (no heartbeat for 10 s); the run stops. "
            "Rerunning the same command resumes.") in err, err[-2000:]


def test_by_default_the_work_decides_the_workers_and_the_output_matches_one_worker(
        tmp_path, monkeypatch, capsys):
    """Without --cpu-workers: one process for a small run; a worker per usable core once
    the work is worth their start (pixels made to look slow here), with the bytes of one
    worker, and each shard reporting its start-up and data wait."""
    from hnm import sizing
    from hnm.cli import main

    data = tmp_path / "data"
    make_demo(data, num_dialogs=12, turns_per_dialog=5, image_size=32)  # 60 rows
    args = ["--config", "configs/demo.yaml", "--annotations", str(data / "annotations.json"),
            "--image-dir", str(data), "--num-workers", "0", "--visual-encoder", "pixels",
            "--text-encoder", "minilm", "--no-quiet"]
    monkeypatch.chdir(ROOT)
    assert main([*args, "--output-dir", str(tmp_path / "small")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    cores = placement.cpu_workers(Config())[0]
    assert len(json.loads((tmp_path / "small/plan.json").read_text())["shards"]) == 1
    if cores > 1:
        assert f"1 of {cores} CPU worker(s): about" in said
    monkeypatch.setitem(sizing.IMAGES_PER_CORE_SECOND, "pixels", 1.0)  # 60 s of work
    assert main([*args, "--output-dir", str(tmp_path / "default")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "one"), "--cpu-workers", "1"]) == 0
    batches = 2  # 60 rows in batches of 32 (configs/demo.yaml): no more workers than that
    assert len(json.loads((tmp_path / "default/plan.json").read_text())["shards"]) == \
        min(cores, batches)
    assert (tmp_path / "default/negatives.jsonl").read_bytes() == \
        (tmp_path / "one/negatives.jsonl").read_bytes() == \
        (tmp_path / "small/negatives.jsonl").read_bytes()
    metrics = json.loads((tmp_path / "default/metrics.json").read_text())
    assert {"startup", "data_wait"} <= set(metrics["timing"])
    assert all(s["startup_seconds"] > 0 and s["data_wait_seconds"] > 0
               for s in metrics["shards"])  # each worker loaded its models, read its images
