"""A finished multi-shard run, checked against the plain reference on the run's own files:
the concatenation of shard embeddings, the candidate files and the reduce path are compared
with SPEC §3-7 computed from scratch, not with another run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import needs_faiss
from reference import reference_mine
from synthetic import make_dataset, mine_args

from hnm.cli import main
from hnm.data import anchor_uniforms, load_corpus
from hnm.lifecycle import load_run_config
from hnm.reduce import read_candidates
from hnm.storage import RunDir


def picks_of(run: RunDir, ds) -> tuple[list[dict], dict, list[list[tuple]]]:
    """The run's records, row of each id, and each anchor's picks in the reference's form:
    (row, type, threshold step or (anchor cluster, negative cluster))."""
    records = [json.loads(line) for line in run.negatives.read_text().splitlines()]
    row = {rid: i for i, rid in enumerate(ds.ids)}
    got = [[(row[n["id"]], n["type"], n["threshold_step"] if n["type"] == "hard" else
             (n["anchor_cluster"], n["negative_cluster"])) for n in r["negatives"]]
           for r in records[:ds.num_anchors]]
    return records, row, got


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
    ds = load_corpus(config, plan["skipped"])
    V, T = np.load(run.table("visual")), np.load(run.table("text"))
    clusters = np.load(run.table("clusters"))
    u = anchor_uniforms(ds.ids[:ds.num_anchors], config.seed)
    want = reference_mine(V, T, ds.text_ids, ds.groups, ds.phrases, clusters, None, u, config)
    records, row, got = picks_of(run, ds)
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


def ivf_reach(run: RunDir, nprobe: int):
    """Rows each query reaches through the run's saved IVF index: its lists and centroids
    read with FAISS, the probed lists (highest float64 centroid scores, ties to the lowest
    list) computed here by brute force."""
    import faiss

    saved = faiss.read_index(str(run.ivf))
    index = faiss.extract_index_ivf(saved)  # a view into `saved`, which must stay alive
    lists = index.invlists
    list_of = np.empty(index.ntotal, np.int64)
    for j in range(index.nlist):
        list_of[faiss.rev_swig_ptr(lists.get_ids(j), lists.list_size(j))] = j
    C = faiss.rev_swig_ptr(faiss.downcast_index(index.quantizer).get_xb(),
                           index.nlist * index.d).reshape(index.nlist, index.d)

    def reach(q: np.ndarray, _keep=saved) -> np.ndarray:
        scores = C.astype(np.float64) @ q.astype(np.float64)
        probed = np.lexsort((np.arange(index.nlist), -scores))[:nprobe]
        return np.flatnonzero(np.isin(list_of, probed))

    return reach


def saved_diverse_lists(run: RunDir) -> list[list[int]]:
    """Each anchor's diverse list as the candidates phase saved it (empty where it made
    none), in anchor order over the shards."""
    lists = []
    for shard in json.loads(run.plan.read_text())["shards"]:
        c = read_candidates(run.root / "candidates" / f"shard_{shard['shard']:05d}.npz")
        rows, offsets = c.diverse.rows, c.diverse.offsets
        lists += [rows[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    return lists


@pytest.mark.parametrize("flags", [
    ("--diverse-ratio", "0.4", "--sliding-window-size", "30", "--min-answer-length", "40"),
    ("--num-negatives", "2", "--k-nn", "8", "--n-clusters", "3", "--diverse-candidates", "3"),
], ids=["windowed", "two-negatives"])
@needs_faiss
def test_ivf_run_equals_the_reference_over_what_ivf_reaches(tmp_path: Path, flags: tuple):
    """With --index ivf, N(a) is exact over the rows of the lists probed for a, and a
    diverse negative comes first from a's list of the lowest-vis rows IVF reaches (through
    a quarter of the probes, at least one): the
    reference with those two hooks gives the same negatives; 1 or 3 workers, the same
    bytes; the recall in metrics.json is the share of exact N(a) that IVF's N(a) holds."""
    paths = make_dataset(tmp_path / "data", n=210, seed=11)
    ivf = ("--index", "ivf", "--ivf-nlist", "8", "--ivf-nprobe", "2", "--batch-size", "16")
    out = tmp_path / "run"
    assert main(mine_args(paths, out, "--cpu-workers", "3", *ivf, *flags)) == 0
    assert main(mine_args(paths, tmp_path / "one", *ivf, *flags)) == 0
    assert (tmp_path / "one/negatives.jsonl").read_bytes() == (out / "negatives.jsonl").read_bytes()
    run = RunDir(out)
    config = load_run_config(run)
    ds = load_corpus(config, [])
    V, T = np.load(run.table("visual")), np.load(run.table("text"))
    clusters = np.load(run.table("clusters"))
    eligible = np.load(run.table("eligible"))[ds.text_ids]
    reach, reach_far = ivf_reach(run, 2), ivf_reach(run, 1)  # a quarter of the probes
    sv = V.astype(np.float64) @ V.astype(np.float64).T

    saved = saved_diverse_lists(run)

    def first_list(a: int) -> list[int]:
        """The IVF list, for the anchors the candidates phase made one for (those sure to
        try diverse, or without a hard candidate); the others' diverse searches are exact
        from the start (an empty first list)."""
        if not saved[a]:
            return []
        rows = [j for j in reach_far(-V[a]) if eligible[j] and ds.groups[j] != ds.groups[a]]
        want = sorted(rows, key=lambda j: (sv[a, j], j))[:config.diverse_candidates]
        assert saved[a] == want, a
        return want

    u = anchor_uniforms(ds.ids[:ds.num_anchors], config.seed)
    want = reference_mine(V, T, ds.text_ids, ds.groups, ds.phrases, clusters, None, u, config,
                          searched=lambda a: reach(V[a]), first_lists=first_list)
    records, row, got = picks_of(run, ds)
    assert got == want
    exact_want = reference_mine(V, T, ds.text_ids, ds.groups, ds.phrases, clusters, None, u,
                                config)
    assert got != exact_want  # the approximation shows: this case tests something

    def neighbours(a: int, pool) -> set[int]:
        return set(sorted((j for j in pool if j != a), key=lambda j: (-sv[a, j], j))
                   [:config.k_nn])

    found = sum(len(neighbours(a, range(len(V))) & neighbours(a, reach(V[a])))
                for a in range(ds.num_anchors))
    recall = json.loads(run.metrics.read_text())["index"]["recall"]
    assert recall["anchors"] == ds.num_anchors and recall["k"] == config.k_nn
    assert recall["recall_at_k"] == round(found / (ds.num_anchors * config.k_nn), 6)


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
    (out / "index").mkdir()  # a folder the run's manifest does not list
    capsys.readouterr()
    assert main(mine_args(paths, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan version 1" in err and "rerun with --overwrite" in err
    assert main(mine_args(paths, out, "--overwrite")) == 0
    assert (out / "negatives.jsonl").read_bytes() == first
    assert (out / "index").is_dir()  # not the run's, so kept


def test_a_run_planned_by_the_previous_plan_version_resumes(tmp_path: Path, capsys):
    """A plan.json of version 3 (precision, index and the workers' note at its top level)
    is read, placed again and resumed: the results are those of an uninterrupted run."""
    paths = make_dataset(tmp_path / "data", n=40, seed=3)
    out = tmp_path / "run"
    assert main(mine_args(paths, out, "--cpu-workers", "2")) == 0
    first = (out / "negatives.jsonl").read_bytes()
    plan = json.loads((out / "plan.json").read_text())
    placement = plan.pop("placement")
    (out / "plan.json").write_text(json.dumps({
        **plan, "version": 3, "precision": placement["precision"],
        "index": placement["index"], "workers_note": placement["workers_note"]}))
    run = RunDir(out)
    kept = [run.marker(*m).read_bytes() for m in (("embed", 0), ("embed", 1), ("tables",),
                                                   ("candidates", 0))]
    run.marker("candidates", 1).unlink()  # stopped before shard 1's candidates
    run.done.unlink()
    assert main(mine_args(paths, out, "--cpu-workers", "2")) == 0
    assert (out / "negatives.jsonl").read_bytes() == first
    assert kept == [run.marker(*m).read_bytes() for m in (  # reused, not computed again
        ("embed", 0), ("embed", 1), ("tables",), ("candidates", 0))]
    assert run.is_done("candidates", 1)
    assert main(mine_args(paths, out, "--cpu-workers", "1")) == 0  # complete: nothing to do
