"""Nothing lost, nothing mixed, nothing left behind: the run directory's lock, what
--overwrite may delete, damaged run files, file modes, validation before writing, and
one line for whatever goes wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from builders import REPO, cli
from points import SAFETY_S, hold_env, wait_point
from synthetic import make_dataset, mine_args

from hnm.cli import main
from hnm.errors import Terminated
from hnm.outputs import similarity


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("data"), n=120, seed=4)


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory) -> Path:
    """A finished two-shard run: what every recovery must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(mine_args(data, out, "--cpu-workers", "2", "--batch-size", "16")) == 0
    return out


def launch(data: dict, out: Path, *flags: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """`python launch.py` on the synthetic data, the way a user starts it."""
    args = [sys.executable, "launch.py", *mine_args(data, out, "--no-quiet", *flags)[1:]]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, **kw)


def finish(proc: subprocess.Popen, timeout: float = SAFETY_S) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hnm: "), err
    assert "Traceback" not in err
    return lines[0]


def rerun(data: dict, out: Path, *flags: str) -> tuple[int, str, str]:
    return finish(launch(data, out, "--cpu-workers", "2", "--batch-size", "16", *flags))


def same_results(out: Path, clean: Path) -> bool:
    return all((out / name).read_bytes() == (clean / name).read_bytes()
               for name in ("negatives.jsonl", "suspects.jsonl"))


# ---------------------------------------------------------------- one run per directory

@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_is_refused_naming_the_first(data, clean, tmp_path):
    out = tmp_path / "run"
    first = launch(data, out, env=hold_env("embed", 0))  # holds the lock, and waits
    wait_point(first, out, "embed", 0)
    rc, stdout, err = finish(launch(data, out, "--k-nn", "5", "--overwrite"))
    line = one_line_error(err)
    assert rc == 2
    assert f"in use by another hnm run (pid {first.pid} on {socket.gethostname()}" in line
    assert json.loads((out / "plan.json").read_text())["run_key"]  # the first run's plan
    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == 143
    assert not (out / ".hnm.lock").exists()
    rc, _, err = finish(launch(data, out))
    assert rc == 0, err
    assert same_results(out, clean)  # one worker or two: the same bytes


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over(data, clean, tmp_path):
    out = tmp_path / "run"
    first = launch(data, out, env=hold_env("embed", 0))
    wait_point(first, out, "embed", 0)
    first.kill()
    first.wait()
    assert str(first.pid) in (out / ".hnm.lock").read_text()
    rc, stdout, err = finish(launch(data, out))
    assert rc == 0, err
    assert f"Taking over the lock of an hnm run that is gone (pid {first.pid}" in stdout
    assert same_results(out, clean)


# ---------------------------------------------------------------- --overwrite

def test_overwrite_never_touches_a_foreign_directory(data, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "embeddings").mkdir(parents=True)
    (out / "embeddings" / "vectors.npy").write_bytes(b"user data")
    (out / "metrics.json").write_text("{}")
    for flags in ((), ("--overwrite",)):
        rc, _, err = cli(capsys, *mine_args(data, out, *flags))
        assert rc == 2
        assert one_line_error(err) == (
            f"hnm: error: --output-dir {out}: exists and is not an hnm run directory (it "
            "holds embeddings, metrics.json); choose another directory")
    assert (out / "embeddings" / "vectors.npy").read_bytes() == b"user data"
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "metrics.json"]


def test_overwrite_deletes_only_what_hnm_wrote(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(mine_args(data, out)) == 0
    (out / "notes.txt").write_text("mine")
    assert main(mine_args(data, out, "--k-nn", "7", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- damaged run files

DAMAGE = {
    "plan garbage": ("plan.json", lambda p: p.write_text("{not json")),
    "plan truncated": ("plan.json", lambda p: p.write_bytes(p.read_bytes()[:40])),
    "empty marker": ("embeddings/done_00001", lambda p: p.write_text("")),
    "garbage marker": ("candidates/done_00000", lambda p: p.write_text("garbage")),
    "truncated npy": ("embeddings/image_00000.npy", lambda p: p.write_bytes(p.read_bytes()[:99])),
    "altered npy": ("tables/visual.npy", lambda p: p.write_bytes(p.read_bytes()[:-4] + b"abcd")),
    "truncated npz": ("candidates/shard_00001.npz",
                      lambda p: p.write_bytes(p.read_bytes()[:200])),
    "corrupt metrics": ("metrics.json", lambda p: p.write_text('{"global": ')),
    "negatives halved": ("negatives.jsonl",
                         lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])),
    "final marker garbage": ("done.json", lambda p: p.write_text("[")),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_run_file_is_named_and_recovered(data, clean, tmp_path, capsys, case):
    """In this process, one worker running the two planned shards: recovery reads the same
    files whatever runs the tasks (the kills and signals are tested with processes)."""
    name, damage = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(clean, out)
    damage(out / name)
    (out / "embeddings" / ".image_00000.npy.x1y2.tmp").write_bytes(b"left by a kill -9")

    def rerun_here(*flags: str) -> tuple[int, str, str]:
        rc, stdout, err = cli(capsys, *mine_args(data, out, "--no-quiet", "--cpu-workers", "1",
                                                 "--batch-size", "16", *flags))
        return rc, " ".join(stdout.split()), err

    rc, stdout, err = rerun_here()
    if name == "plan.json":  # the plan says what the rest is: only --overwrite recovers
        assert rc == 2
        line = one_line_error(err)
        assert str(out / "plan.json") in line and "rerun with --overwrite" in line
        rc, stdout, err = rerun_here("--overwrite")
    assert rc == 0, err
    assert "Nothing to do" not in stdout
    if name != "plan.json":
        assert f"{out / name}" in stdout and ("again" in stdout)
    assert same_results(out, clean)
    assert not list(out.rglob("*.tmp"))


def test_report_and_sweep_on_damaged_files_say_which(clean, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(clean, out)
    (out / "metrics.json").write_text("{")
    rc, _, err = cli(capsys, "report", out)
    assert rc == 2 and str(out / "metrics.json") in one_line_error(err)
    (out / "tables" / "visual.npy").write_bytes(b"\x93NUMPY")
    rc, _, err = cli(capsys, "sweep", out)
    assert rc == 2 and str(out / "tables" / "visual.npy") in one_line_error(err)
    (out / "plan.json").write_text("")
    for command in ("report", "sweep"):
        rc, _, err = cli(capsys, command, out)
        assert rc == 2 and str(out / "plan.json") in one_line_error(err)


# ---------------------------------------------------------------- modes, places, limits

@pytest.fixture
def umask():
    """Set the process's umask for one test, then put the old one back."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_output_files_follow_the_umask(data, tmp_path, umask, mask):
    out = tmp_path / "run"
    umask(mask)
    assert main(mine_args(data, out, "--cpu-workers", "1")) == 0
    for path in (out / "negatives.jsonl", out / "metrics.json", out / "plan.json",
                 out / "embeddings" / "image_00000.npy", out / "tables" / "done"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_an_unwritable_output_directory_is_one_line(data, tmp_path, capsys, monkeypatch):
    def read_only(*_a, **_k):
        raise OSError(30, "Read-only file system")

    out = tmp_path / "run"
    assert main(mine_args(data, out)) == 0
    monkeypatch.setattr("hnm.safety.create", read_only)
    for args in (["report", out], ["sweep", out], mine_args(data, tmp_path / "other")):
        rc, _, err = cli(capsys, *args)
        assert rc == 2 and "cannot write: Read-only file system" in one_line_error(err)


def test_a_bug_is_one_line_with_the_traceback_in_the_log(data, tmp_path, capsys, monkeypatch):
    def broken(*_a, **_k):
        raise KeyError("boom")

    monkeypatch.setattr("hnm.outputs.RecordWriter.shard", broken)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *mine_args(data, out))
    assert rc == 1
    line = one_line_error(err)
    assert line == (f"hnm: internal error: KeyError: 'boom' — details in "
                    f"{out / 'logs' / 'hnm.log'}")
    assert "Traceback" in (out / "logs" / "hnm.log").read_text()


@pytest.mark.parametrize("seed", ["-1", str(2**31)])
def test_seed_out_of_range_is_refused_before_anything_is_written(data, tmp_path, capsys, seed):
    rc, _, err = cli(capsys, *mine_args(data, tmp_path / "run", "--seed", seed))
    assert rc == 2 and one_line_error(err).startswith("hnm: error: --seed: must be within [0,")
    assert not (tmp_path / "run").exists()


def huge_png(path: Path, width: int, height: int) -> None:
    """A PNG header announcing a huge image (the pixel data is never reached)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_refused_and_never_decoded(tmp_path, capsys):
    from builders import dataset

    annotations = dataset(tmp_path / "in", n=6)
    huge_png(tmp_path / "in" / "img" / "2.png", 20001, 20001)  # over twice the default
    rc, _, err = cli(capsys, "--annotations", annotations, "--image-dir", tmp_path / "in",
                     "--visual-encoder", "pixels", "--output-dir", tmp_path / "run")
    line = one_line_error(err)
    assert rc == 2 and "2.png (too large: over twice --max-image-pixels 200000000)" in line
    rc, _, err = cli(capsys, "--annotations", annotations, "--image-dir", tmp_path / "in",
                     "--visual-encoder", "pixels", "--output-dir", tmp_path / "run",
                     "--max-image-pixels", "500")  # the 24x24 images are 576 pixels
    line = one_line_error(err)
    assert "0.png (too large: 24x24 pixels, over --max-image-pixels 500)" in line
    assert not (tmp_path / "run").exists()


def test_the_report_shows_no_image_over_the_limit(data, tmp_path):
    out = tmp_path / "run"
    assert main(mine_args(data, out, "--max-image-pixels", "100")) == 0  # embeddings given
    page = (out / "report.html").read_text()
    assert "<img " not in page and "image not shown" in page


def test_changed_or_restored_images_are_noticed(tmp_path, capsys):
    from builders import dataset

    annotations = dataset(tmp_path / "in", n=6)
    args = ["--annotations", annotations, "--image-dir", tmp_path / "in", "--visual-encoder",
            "pixels", "--num-workers", "0", "--output-dir", tmp_path / "run",
            "--on-missing-image", "skip"]
    missing = tmp_path / "in" / "img" / "3.png"
    kept = missing.read_bytes()
    missing.unlink()
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, *args)[1].count("Nothing to do") == 1
    missing.write_bytes(kept)  # restored: the skip no longer holds
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "holds a run with a different config or input" in err
    assert cli(capsys, *args, "--overwrite")[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "run/negatives.jsonl").open()]
    assert json.loads((tmp_path / "run/metrics.json").read_text())[
        "global"]["skipped_missing_image"] == 0 and len(rows) == 6


def test_report_from_another_folder_finds_the_images_the_run_used(tmp_path, capsys,
                                                                   monkeypatch):
    from builders import dataset

    dataset(tmp_path / "in", n=6)
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "--annotations", "in/annotations.json", "--image-dir", "in",
               "--visual-encoder", "pixels", "--num-workers", "0",
               "--output-dir", "run")[0] == 0
    shutil.move(tmp_path / "run", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    rc, _, err = cli(capsys, "report", ".")
    assert rc == 0 and err == ""
    assert "image not shown" not in (tmp_path / "moved/report.html").read_text()
    shutil.rmtree(tmp_path / "in" / "img")  # the run's images are gone: nothing to show
    rc, _, err = cli(capsys, "report", ".")
    assert rc == 2 and err.startswith("hnm: error: --image-dir ") and \
        f"{tmp_path / 'in' / 'img' / '0.png'} is gone" in err


def test_all_zero_precomputed_rows_are_named(data, tmp_path, capsys):
    vectors = np.load(data["image_embeddings"])
    vectors[[3, 17]] = 0
    np.save(tmp_path / "image.npy", vectors)
    args = mine_args({**data, "image_embeddings": str(tmp_path / "image.npy")},
                     tmp_path / "run")
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and one_line_error(err) == (
        f"hnm: error: --image-embeddings {tmp_path / 'image.npy'}: 2 row(s) are all zeros "
        "(rows 3, 17); an embedding needs a direction: give those records real embeddings "
        "or leave them out")


def test_an_all_black_image_is_counted_and_warned_about(tmp_path, capsys):
    from builders import dataset

    annotations = dataset(tmp_path / "in", n=6)
    from PIL import Image

    Image.new("RGB", (24, 24)).save(tmp_path / "in" / "img" / "4.png")
    rc, out, _ = cli(capsys, "--annotations", annotations, "--image-dir", tmp_path / "in",
                     "--visual-encoder", "pixels", "--num-workers", "0",
                     "--output-dir", tmp_path / "run")
    assert rc == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["global"]["zero_embeddings"] == 1
    assert "Warning: 1 embedding(s) are all zeros" in out


# ---------------------------------------------------------------- read in the code

def test_sigterm_is_not_swallowed_by_image_decoding(tmp_path):
    from builders import write_image

    from hnm.embed import ImageFiles

    write_image(tmp_path / "a.png", 0)

    def stopped(_image):
        raise Terminated()

    with pytest.raises(Terminated):
        ImageFiles([tmp_path / "a.png"], stopped, 10**6)[0]


def test_written_similarities_are_clamped():
    assert similarity(1.0000004) == 1.0 and similarity(-1.0000004) == -1.0
    assert similarity(0.12345678) == 0.123457


def test_the_torch_index_runs_the_shipped_configs(data, clean, tmp_path, monkeypatch):
    """No faiss: the torch index on an AVDN config (diverse_ratio 0: no diverse query)."""
    from hnm.index import TorchFlatIP

    assert TorchFlatIP(np.eye(3, dtype=np.float32)).search(np.zeros((0, 3)), 2)[1].shape \
        == (0, 2)
    monkeypatch.setattr("hnm.index.faiss_available", lambda: False)
    fields = ["--text-field", "text", "--group-field", "group"]
    for split in ("train", "val_seen"):
        config = REPO / "configs" / f"{split}.yaml"
        torch_run, faiss_run = tmp_path / f"torch_{split}", tmp_path / f"faiss_{split}"
        assert main([*mine_args(data, torch_run), "--config", str(config), *fields]) == 0
        assert json.loads((torch_run / "candidates/done_00000").read_text())["index"] \
            == "torch-cpu"
        monkeypatch.undo()
        assert main([*mine_args(data, faiss_run), "--config", str(config), *fields]) == 0
        monkeypatch.setattr("hnm.index.faiss_available", lambda: False)
        assert (torch_run / "negatives.jsonl").read_bytes() == \
            (faiss_run / "negatives.jsonl").read_bytes()


def test_a_late_event_of_a_stopped_attempt_is_ignored():
    from collections import deque

    from hnm.config import Config
    from hnm.run.pool import Running, WorkerPool
    from hnm.run.worker import Task

    class View:
        def __getattr__(self, name):
            return lambda *a: None

    pool = WorkerPool.__new__(WorkerPool)
    pool.view, pool.devices = View(), ["cpu"]
    pool.config = Config()
    task = Task("embed", 1)
    running, results = {0: Running(task, attempt=7)}, {}
    pool.handle(("done", 3, {"from": "the attempt that was stopped"}), deque(), running,
                results)
    assert results == {} and running[0].attempt == 7
    pool.handle(("done", 7, {"from": "the running attempt"}), deque(), running, results)
    assert results == {task: {"from": "the running attempt"}} and running == {}


@pytest.mark.slow
def test_a_stalled_worker_is_stopped_and_its_shard_retried(data, clean, tmp_path):
    out = tmp_path / "run"
    # the retry loads torch and the tables before its first progress: on a busy machine
    # that takes many seconds, so the limit leaves room for it
    proc = launch(data, out, "--cpu-workers", "2", "--batch-size", "16", "--stall-timeout",
                  "30", env={"HNM_TEST_CRASH": "candidates:1:stall"})
    rc, stdout, err = finish(proc)
    assert rc == 0, err
    assert "no progress for 30 s (--stall-timeout): worker stopped (will retry)" in stdout
    assert same_results(out, clean)


@pytest.mark.slow
def test_a_resume_with_another_batch_size_keeps_the_planned_grid(data, clean, tmp_path):
    out = tmp_path / "run"
    rc, _, _ = finish(launch(data, out, "--cpu-workers", "2", "--batch-size", "16",
                             "--max-retries", "0", env={"HNM_TEST_CRASH": "embed:1"}))
    assert rc == 1
    rc, _, err = finish(launch(data, out, "--cpu-workers", "2", "--batch-size", "32"))
    assert rc == 0, err
    assert json.loads((out / "plan.json").read_text())["batch_size"] == 16
    assert same_results(out, clean)


@pytest.fixture
def immutable():
    """Make folders immutable (chattr +i: not even root may write there), undone after."""
    if not shutil.which("chattr"):
        pytest.skip("chattr (e2fsprogs) is not installed")
    made: list[Path] = []

    def make(path: Path) -> None:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("this file system has no immutable flag")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)])


def test_an_immutable_output_directory_is_one_line(data, tmp_path, capsys, immutable):
    empty, finished = tmp_path / "empty", tmp_path / "finished"
    empty.mkdir()
    assert main(mine_args(data, finished)) == 0
    immutable(empty)
    immutable(finished)
    rc, _, err = cli(capsys, *mine_args(data, empty))
    assert rc == 2 and one_line_error(err) == (
        f"hnm: error: --output-dir {empty}: cannot write: Operation not permitted")
    for command in ("report", "sweep"):
        rc, _, err = cli(capsys, command, finished)
        assert rc == 2 and "cannot write: Operation not permitted" in one_line_error(err)


class FailsWhenCollected:
    """Like a DataLoader iterator stopped halfway through its set-up: its __del__ fails."""

    def __del__(self) -> None:
        raise AttributeError("'FailsWhenCollected' object has no attribute '_workers_status'")


@pytest.mark.parametrize("stop", [Terminated, KeyboardInterrupt])
def test_what_a_stop_cut_short_fails_quietly_when_collected(monkeypatch, stop):
    from hnm.process import stopping
    from hnm.run.driver import sigterm_raises

    reported = []  # what reaches the terminal: Python's hook, outside hnm's
    monkeypatch.setattr(sys, "unraisablehook", lambda info: reported.append(info.exc_value))
    with sigterm_raises():  # running: a failing __del__ is reported as usual
        FailsWhenCollected()
    assert len(reported) == 1
    half_built = []
    with pytest.raises(stop), sigterm_raises():
        half_built.append(FailsWhenCollected())
        if stop is Terminated:
            os.kill(os.getpid(), signal.SIGTERM)
        raise stop()
    half_built.clear()  # collected after the run stopped: nothing on the terminal
    assert len(reported) == 1
    with sigterm_raises():  # the next run starts unstopped, and reports again
        assert not stopping.is_set()
        FailsWhenCollected()
    assert len(reported) == 2
    stopping.clear()
