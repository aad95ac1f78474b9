"""Planning in bounded memory (hnm.plan_scan): the launcher checks and plans the input a
block at a time, holding numbers per row and no record, and writes nothing before every
check of every block passed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from builders import traced_peak

from hnm import cli, plan_scan
from hnm.config import Config
from hnm.data import load_corpus
from hnm.plan import image_fingerprint, validate_inputs
from hnm.readers import BLOCK_ROWS
from hnm.run.driver import dry_run


def _inputs(folder: Path, n: int, duplicate_last: bool = False) -> dict[str, str]:
    """n JSONL records (a tenth of them sharing a phrase) with precomputed embeddings; the
    last record's id one of the first's where `duplicate_last`."""
    folder.mkdir(parents=True, exist_ok=True)
    ann = folder / "annotations.jsonl"
    with open(ann, "w") as handle:
        for i in range(n):
            rid = 0 if duplicate_last and i == n - 1 else i
            handle.write(f'{{"id": "r{rid}", "image": "{i}.jpg", '
                         f'"text": "caption {i % (n // 10)}"}}\n')
    rng = np.random.default_rng(0)
    paths = {"annotations": str(ann)}
    for name in ("image_embeddings", "text_embeddings"):
        path = folder / f"{name}.npy"
        np.save(path, rng.normal(size=(n, 4)).astype(np.float32))
        paths[name] = str(path)
    return paths


def _peaks(folder: Path, n: int) -> tuple[int, int, list[str], dict[str, str], Config]:
    """The peak of a dry run of n records (every check, the placement, the plan's lines)
    and of load_corpus's."""
    paths = _inputs(folder / "data", n)
    config = Config(**paths, output_dir=str(folder / "run"), cpu_workers=1, n_clusters=8)
    lines: list[str] = []
    planned = traced_peak(lambda: dry_run(config, lines.append))
    return planned, traced_peak(lambda: load_corpus(config)), lines, paths, config


def test_planning_holds_a_small_part_of_what_load_corpus_holds(tmp_path, monkeypatch):
    """Records on precomputed embeddings, planned 2,048 at a time: from 20,000 records to
    60,000, validating and planning them grows by a small part of what load_corpus grows
    by (measured a seventh; held records would grow it as much), with the figures
    load_corpus's records give."""
    monkeypatch.setattr(plan_scan, "PLAN_BLOCK", 2048)
    n = 60_000
    small = _peaks(tmp_path / "small", 20_000)
    planned, whole, lines, paths, config = _peaks(tmp_path, n)
    assert planned - small[0] < (whole - small[1]) / 2, (small[:2], (planned, whole))
    assert f"Dry run: {n} records, {n} candidates, {n} anchors, {n // 10} distinct " \
           "answers, 0 skipped" in lines
    assert not (tmp_path / "run").exists()
    summary, ds = validate_inputs(config), load_corpus(config)
    assert (len(summary), summary.num_records, summary.num_phrases, summary.num_anchors) == \
        (len(ds), len(ds.records), len(ds.phrases), ds.num_anchors)
    ends = np.arange(summary.num_records + 1)
    assert np.array_equal(summary.rows_before(ends), np.searchsorted(ds.positions, ends))
    assert summary.fingerprint == image_fingerprint(ds)
    assert (summary.source_sha256, summary.image_files, summary.shard_ends) == \
        (ds.source_sha256, ds.image_files, ds.shard_ends)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def test_a_fault_in_a_later_block_writes_nothing(tmp_path, capsys):
    """A duplicate id in the last block (past the first block of records): refused with
    its one line, and the run directory is not created; a finished run there with
    --overwrite is left exactly as it was."""
    n = BLOCK_ROWS + 10
    bad = _inputs(tmp_path / "bad", n, duplicate_last=True)
    args = ["--annotations", bad["annotations"], "--image-embeddings",
            bad["image_embeddings"], "--text-embeddings", bad["text_embeddings"],
            "--blacklist", "", "--n-clusters", "8", "--quiet", "--cpu-workers", "1"]
    new = tmp_path / "new"
    assert cli.main(["mine", *args, "--output-dir", str(new)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hnm: error: {bad['annotations']}: duplicate id 'r0' in records 0 and " \
        f"{n - 1}", err
    assert not new.exists()

    good = _inputs(tmp_path / "good", 200)
    done = tmp_path / "done"
    assert cli.main(["mine", "--annotations", good["annotations"], "--image-embeddings",
                     good["image_embeddings"], "--text-embeddings", good["text_embeddings"],
                     "--blacklist", "", "--n-clusters", "8", "--quiet", "--cpu-workers", "1",
                     "--output-dir", str(done)]) == 0
    before = _tree(done)
    capsys.readouterr()
    assert cli.main(["mine", *args, "--output-dir", str(done), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == err
    assert _tree(done) == before


def test_absolute_paths_are_pathlibs(tmp_path, monkeypatch):
    """The planning pass writes an image's absolute path from the working folder read once:
    the same text as Path.absolute() (what the input's stats hash), for generated names."""
    from hnm.plan_scan import absolute

    rng = np.random.default_rng(4)
    parts = ["a", "b c", "..", "é", "x.png", ".hidden", "d"]
    names = [".", "/", "//a/b", "/x/./y", "a//b/", "./a"]
    names += ["/" * int(rng.integers(0, 3)) + "/".join(rng.choice(parts, rng.integers(1, 4)))
              for _ in range(200)]
    for cwd in (tmp_path, Path("/")):
        monkeypatch.chdir(cwd)
        for name in names:
            path = Path(name)  # as the scan makes them
            assert absolute(str(path), path.is_absolute(), os.getcwd()) == \
                str(path.absolute()), name
