"""A finished multi-shard run, checked against the plain reference on the run's own files:
the concatenation of shard embeddings, the candidate files and the reduce path are compared
with SPEC §3-7 computed from scratch, not with another run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reference import reference_mine
from synthetic import make_dataset, mine_args

from hnm.cli import main
from hnm.data import anchor_uniforms, load_dataset
from hnm.report import load_run_config
from hnm.storage import RunDir


@pytest.mark.parametrize("flags", [
    ("--diverse-ratio", "0.4", "--sliding-window-size", "30", "--min-answer-length", "40"),
    ("--num-negatives", "2", "--k-nn", "8", "--n-clusters", "3", "--max-samples", "150"),
], ids=["windowed", "two-negatives"])
def test_three_shard_run_equals_the_reference_on_its_files(tmp_path: Path, flags: tuple):
    paths = make_dataset(tmp_path / "data", n=210, seed=11)
    out = tmp_path / "run"
    assert main(mine_args(paths, out, "--cpu-workers", "3", "--batch-size", "16", *flags)) == 0
    run = RunDir(out)
    plan = json.loads(run.plan.read_text())
    assert len(plan["shards"]) == 3 and all(s["rows"][1] > s["rows"][0] for s in plan["shards"])
    config = load_run_config(run)
    ds = load_dataset(config, plan["skipped"])
    V, T = np.load(run.table("visual")), np.load(run.table("text"))
    clusters = np.load(run.table("clusters"))
    u = anchor_uniforms(ds.ids[:ds.num_anchors], config.seed)
    want = reference_mine(V, T, ds.text_ids, ds.groups, ds.phrases, clusters, None, u, config)
    records = [json.loads(line) for line in run.negatives.read_text().splitlines()]
    row = {rid: i for i, rid in enumerate(ds.ids)}
    got = [[(row[n["id"]], n["type"], n["threshold_step"] if n["type"] == "hard" else
             (n["anchor_cluster"], n["negative_cluster"])) for n in r["negatives"]]
           for r in records[:ds.num_anchors]]
    assert got == want
    assert all(not r["negatives"] for r in records[ds.num_anchors:])
    kinds = {kind for picks in want for _, kind, _ in picks}
    assert kinds == {"hard", "diverse"}  # the case reaches both strategies
    for a, r in enumerate(records[:ds.num_anchors]):
        for n in r["negatives"]:
            j = row[n["id"]]
            vis = float(V[a].astype(np.float64) @ V[j].astype(np.float64))
            txt = float(T[ds.text_ids[a]].astype(np.float64) @ T[ds.text_ids[j]].astype(np.float64))
            assert (n["visual_similarity"], n["text_similarity"]) == (round(vis, 6),
                                                                      round(txt, 6))


def test_shard_logs_receive_the_workers_records(tmp_path: Path):
    paths = make_dataset(tmp_path / "data", n=60, seed=2)
    out = tmp_path / "run"
    assert main(mine_args(paths, out, "--cpu-workers", "2", "--batch-size", "16")) == 0
    for shard in (0, 1):
        text = RunDir(out).log(shard).read_text()
        assert f"embed shard {shard} on cpu" in text and f"candidates shard {shard}" in text
        assert text.count("done: {") == 2  # both of the shard's phases, with their timings
    assert "tables tables on cpu" in RunDir(out).log(None).read_text()


def test_a_run_directory_of_another_layout_needs_overwrite(tmp_path: Path, capsys):
    paths = make_dataset(tmp_path / "data", n=40, seed=3)
    out = tmp_path / "run"
    assert main(mine_args(paths, out)) == 0
    first = (out / "negatives.jsonl").read_bytes()
    plan = json.loads((out / "plan.json").read_text())
    (out / "plan.json").write_text(json.dumps({**plan, "version": 1}))
    (out / "index").mkdir()  # a folder of the older layout
    capsys.readouterr()
    assert main(mine_args(paths, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan version 1" in err and "rerun with --overwrite" in err
    assert main(mine_args(paths, out, "--overwrite")) == 0
    assert (out / "negatives.jsonl").read_bytes() == first
    assert not (out / "index").exists()
