"""Which index a run uses and why, the memory a plan needs, and one index per worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from builders import cli, needs_faiss
from synthetic import make_dataset, mine_args

from hnm import host, placement, sizing, tables
from hnm.config import Config
from hnm.errors import HnmError
from hnm.reduce import read_candidates
from hnm.run.worker import Context, candidates_shard
from hnm.sizing import choose_index
from hnm.storage import RunDir


@pytest.mark.parametrize("index,rows,devices,kind,why", [
    ("auto", 100_000, ["cpu"], "exact", "auto: 100,000 rows, at most 100,000"),
    ("auto", 100_001, ["cpu", "cpu"], "ivf", "auto: 100,001 rows, above 100,000"),
    ("auto", 1_000_000, ["cuda:0"], "exact", "on cuda"),
    ("exact", 5_000_000, ["cpu"], "exact", "--index exact"),
    ("ivf", 300, ["cpu"], "ivf", "--index ivf"),
])
def test_auto_chooses_by_size_on_the_device_at_hand(monkeypatch, index, rows, devices, kind,
                                                     why):
    monkeypatch.setattr(sizing, "faiss_available", lambda: True)  # the policy, on any machine
    choice = choose_index(Config(index=index), rows, devices)
    assert choice.kind == kind and why in choice.reason
    assert (choice.nlist > 0) == (kind == "ivf")


def test_without_faiss_auto_stays_exact_and_ivf_is_refused(monkeypatch):
    monkeypatch.setattr(sizing, "faiss_available", lambda: False)
    choice = choose_index(Config(index="auto"), 5_000_000, ["cuda:0"])
    assert choice.kind == "exact" and "faiss is not installed" in choice.reason
    assert choose_index(Config(index="auto"), 10, ["cpu"]).kind == "exact"
    with pytest.raises(HnmError, match=r"^--index ivf needs the faiss package"):
        choose_index(Config(index="ivf"), 300, ["cpu"])


@needs_faiss
def test_the_choice_is_printed_and_stored_in_config_yaml(tmp_path: Path, capsys):
    paths = make_dataset(tmp_path / "data", n=60, seed=1)
    out = tmp_path / "run"
    rc, text, _ = cli(capsys, *mine_args(paths, out, "--no-quiet"))
    assert rc == 0
    assert "Index: exact (auto: 60 rows, at most 100,000 for exact search on cpu)" in text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["index"] == "auto" and saved["index_choice"]["kind"] == "exact"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["index"]["kind"] == "exact" and "recall" not in metrics["index"]
    rc, text, _ = cli(capsys, *mine_args(paths, tmp_path / "ivf", "--index", "ivf"))
    assert rc == 0 and "Index: ivf (--index ivf)" in text
    assert "recall@30 of the neighbour lists" in text
    assert "IVF recall@30" in (tmp_path / "ivf/report.html").read_text()


def test_dry_run_prints_memory_per_phase(tmp_path: Path, capsys):
    paths = make_dataset(tmp_path / "data", n=60, seed=1)
    rc, text, _ = cli(capsys, *mine_args(paths, tmp_path / "run", "--dry-run",
                                         "--cpu-workers", "2"))
    assert rc == 0 and not (tmp_path / "run").exists()
    for phase in ("embed", "tables", "candidates", "reduce"):
        assert f"  {phase}: host " in text
    assert "per worker x 2" in text and "Index: exact (auto: " in text
    threads = max(1, placement.usable_cores() // 2)
    assert f"Workers: 2 on cpu, each with {threads} search thread(s) and 0 data-loading " \
        "process(es)\n" in text


def test_available_memory_is_read_from_meminfo_or_else_from_sysconf(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  10 kB\n")
    assert host.available_kib(str(meminfo)) is None  # no MemAvailable line
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    3145728 kB\n")
    assert host.available_kib(str(meminfo)) == 3145728
    monkeypatch.setattr(sizing, "available_kib", lambda: 3145728)
    assert sizing.host_available() == 3145728 * 1024.0
    monkeypatch.setattr(sizing, "available_kib", lambda: None)
    monkeypatch.setattr(sizing.os, "sysconf", {"SC_AVPHYS_PAGES": 5, "SC_PAGE_SIZE": 4096}.get)
    assert sizing.host_available() == 5 * 4096.0


def test_a_plan_that_cannot_fit_is_refused_naming_the_flag(tmp_path: Path, capsys, monkeypatch):
    paths = make_dataset(tmp_path / "data", n=60, seed=1)
    monkeypatch.setattr(sizing, "host_available", lambda: 1e6)
    rc, _, err = cli(capsys, *mine_args(paths, tmp_path / "run", "--dry-run",
                                        "--cpu-workers", "2"))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("hnm: error: --cpu-workers: the ") and "use fewer workers" in err
    rc, _, err = cli(capsys, *mine_args(paths, tmp_path / "run", "--dry-run"))
    assert rc == 2 and err.startswith("hnm: error: --index: ") and "use --index ivf" in err


def test_an_exact_index_too_large_for_a_gpu_is_refused():
    phases = [sizing.PhaseMemory("candidates", 1.0, 0.0, 30 * sizing.GIB, 1)]
    with pytest.raises(Exception) as err:
        sizing.check_fits(phases, 1e12, 16.0, choose_index(Config(index="exact"), 10, ["cuda:0"]),
                          ["cuda:0"])
    assert str(err.value).startswith("--index: an exact index") and "--index ivf" in str(err.value)
    sizing.check_fits(phases, 1e12, 40.0, choose_index(Config(index="exact"), 10, ["cuda:0"]),
                      ["cuda:0"])  # float16 fits


@pytest.mark.parametrize("index", ["exact", pytest.param("ivf", marks=needs_faiss)])
def test_a_worker_builds_its_index_once_for_all_its_shards(tmp_path: Path, monkeypatch, index):
    paths = make_dataset(tmp_path / "data", n=90, seed=4)
    out = tmp_path / "run"
    assert cli_main(mine_args(paths, out, "--cpu-workers", "3", "--batch-size", "16",
                              "--index", index)) == 0
    run = RunDir(out)
    for shard in range(3):
        run.marker("candidates", shard).unlink()
    built = []
    opened = tables.open_index
    monkeypatch.setattr(tables, "open_index", lambda *a: built.append(a) or opened(*a))
    from hnm.lifecycle import load_run_config

    ctx = Context(load_run_config(run), "cpu")
    before = {s: read_candidates(run.candidates(s)).hard.rows for s in range(3)}
    for shard in range(3):
        candidates_shard(ctx, shard, lambda *a: None)
        assert np.array_equal(read_candidates(run.candidates(shard)).hard.rows, before[shard])
    assert len(built) == 1


def cli_main(args: list[str]) -> int:
    from hnm.cli import main

    return main(args)


def test_dry_run_on_gpus_prints_their_memory_and_refuses_an_index_too_large(
        tmp_path: Path, capsys, monkeypatch):
    from hnm import gpus

    paths = make_dataset(tmp_path / "data", n=60, seed=1)
    found = [gpus.Gpu(i, i, "Fake GPU", 16.0, 15.0) for i in range(2)]
    monkeypatch.setattr(gpus, "discover", lambda: (found, None))
    rc, text, _ = cli(capsys, *mine_args(paths, tmp_path / "run", "--dry-run"))
    assert rc == 0 and "Shards: 2 on cuda:0, cuda:1" in text
    assert "  candidates: host " in text and "; GPU 0.00 per worker" in text
    tiny = [gpus.Gpu(0, 0, "Tiny GPU", 1e-6, 1e-6)]
    monkeypatch.setattr(gpus, "discover", lambda: (tiny, None))
    rc, _, err = cli(capsys, *mine_args(paths, tmp_path / "run", "--dry-run"))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("hnm: error: --index: an exact index of this table needs")
