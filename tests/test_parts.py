"""The search index in parts (`--index-parts`, hnm.parts): searched one part at a time,
merged exactly (ties by row), the same outputs for any number of parts and workers,
IVF lists per part, and a process holding one part's index at a time."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
from builders import tiny_bert
from fake_gpu import MIB, FakeCuda, FakeFaiss
from points import SAFETY_S
from synthetic import make_dataset, mine_args

from hnm import cli, engine
from hnm import index as hindex
from hnm.errors import HnmError
from hnm.grid import finalize
from hnm.index import MappedFlatIP
from hnm.ivf import IvfIndex, add_rows, train_ivf
from hnm.parts import PART_ROWS, PartedIndex, index_parts, part_edges
from hnm.sizing import IndexChoice
from hnm.storage import RunDir
from hnm.tables import open_index

ROOT = Path(__file__).resolve().parents[1]


def grid_rows(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Rows of quarters: float32 products are exact and equal scores abound (ties at
    every cut)."""
    return (np.random.default_rng(seed).integers(-2, 3, size=(n, dim)) / 4).astype(np.float32)


def brute(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows of every query by exact score, ties by row (NumPy, float64)."""
    S = xq.astype(np.float64) @ xb.astype(np.float64).T
    order = np.stack([np.lexsort((np.arange(len(xb)), -s))[:k] for s in S])
    return np.take_along_axis(S, order, 1), order


def exact_parts(xb: np.ndarray, parts: int) -> PartedIndex:
    edges = part_edges(len(xb), parts)
    return PartedIndex(edges, lambda p: MappedFlatIP(xb[edges[p]:edges[p + 1]]))


def test_parts_split_the_rows_evenly_and_never_empty():
    assert part_edges(10, 4).tolist() == [0, 2, 5, 7, 10]
    assert part_edges(3, 5).tolist() == [0, 1, 2, 3]  # at most one part a row
    assert part_edges(7, 1).tolist() == [0, 7]
    sizes = np.diff(part_edges(1_000_003, 7))
    assert sizes.sum() == 1_000_003 and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_a_parted_search_is_the_brute_force_order_ties_at_the_cut_by_row(parts):
    xb, xq = grid_rows(3000, seed=1), grid_rows(40, seed=2)
    index = exact_parts(xb, parts)
    scores = xq.astype(np.float64) @ xb.astype(np.float64).T
    assert index.ntotal == 3000 and index.exact and index.far is index
    for k in (1, 37, 700, 3000, 3100):
        D, I = index.search(xq, k)
        kk = min(k, len(xb))
        want_D, want_I = brute(xq, xb, kk)
        assert np.array_equal(I[:, :kk], want_I), (parts, k)
        assert np.array_equal(D[:, :kk], want_D.astype(np.float32)), (parts, k)
        assert (I[:, kk:] == -1).all() and np.isneginf(D[:, kk:]).all()
        # for some query the cut falls inside a run of equal scores
        last = want_D[:, -1:]
        straddles = (scores == last).sum(axis=1) > (want_D == last).sum(axis=1)
        assert straddles.any() or kk == len(xb)
    assert np.array_equal(index.reach(xq), np.full(len(xq), 3000))


def _ivf_parts(xb: np.ndarray, parts: int, nlist: int = 16) -> tuple[list, object]:
    """One trained coarse quantizer; the rows of each part added to a copy of it."""
    import faiss

    trained = train_ivf(xb, nlist, seed=0, sample=64 * nlist, rows=(0, 0))
    edges = part_edges(len(xb), parts)
    held = []
    for start, stop in zip(edges[:-1], edges[1:]):
        part = faiss.clone_index(trained)
        add_rows(part, xb, int(start), int(stop))
        held.append(part)
    whole = faiss.clone_index(trained)
    add_rows(whole, xb, 0, len(xb))
    return held, whole


def test_ivf_in_parts_reaches_the_same_lists_and_proposes_the_same_rows():
    """The parts share the coarse quantizer: a query probes the same lists in each, the
    reaches add up to the one index's, and the merged proposals are its proposals."""
    rng = np.random.default_rng(3)
    xb = rng.normal(size=(2000, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[:50]
    held, whole = _ivf_parts(xb, 3)
    one = IvfIndex(whole, nprobe=4, far_nprobe=1)
    parted = PartedIndex(part_edges(len(xb), 3), lambda p: IvfIndex(held[p], 4, far_nprobe=1))
    joined = IvfIndex(held, 4, far_nprobe=1, starts=part_edges(len(xb), 3)[:-1])
    assert not parted.exact and parted.kind == "ivf-cpu/3 parts" == joined.kind
    for index in (parted, joined):
        assert index.ntotal == one.ntotal
        assert np.array_equal(index.reach(xq), one.reach(xq))
        assert np.array_equal(index.far.reach(xq), one.far.reach(xq))
        for k in (10, 400):
            D1, I1 = one.search(xq, k)
            D2, I2 = index.search(xq, k)
            for a, b in zip(I1, I2):
                assert set(a[a >= 0]) == set(b[b >= 0])
            assert np.allclose(np.sort(D1, axis=1), np.sort(D2, axis=1), atol=1e-6)
    assert all(np.array_equal(np.sort(joined.list_rows(j)), np.sort(one.list_rows(j)))
               for j in range(one.nlist))
    with pytest.raises(ValueError, match="different centroids"):
        IvfIndex([held[0], train_ivf(finalize(xb[:500]), 16, seed=9, sample=200)], 4,
                 starts=[0, 700])


def test_ivf_parts_with_their_own_centroids_probe_their_own_lists():
    """Parts trained apart share no probes: each part's proposals are its own search's
    (the lists chosen once are only used where the parts' centroids are the same)."""
    rng = np.random.default_rng(5)
    xb = rng.normal(size=(1500, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    edges = part_edges(len(xb), 2)
    own = [IvfIndex(train_ivf(finalize(xb[s:e]), 16, seed=p, sample=400), 3)
           for p, (s, e) in enumerate(zip(edges[:-1], edges[1:]))]
    assert not own[0].same_probes(own[1]) and own[0].same_probes(own[0].coarse())
    parted = PartedIndex(edges, lambda p: own[p])
    xq = xb[:60]
    assert np.array_equal(parted.reach(xq), own[0].reach(xq) + own[1].reach(xq))
    D, I = parted.search(xq, 25)
    each = [part.search(xq, 25) for part in own]
    best = -np.sort(-np.concatenate([Dp for Dp, _ in each], axis=1), axis=1)[:, :25]
    assert np.array_equal(D, best)
    for q in range(len(xq)):
        union = {int(r) + int(edges[p]) for p, (_, Ip) in enumerate(each) for r in Ip[q] if r >= 0}
        assert set(I[q][I[q] >= 0]) <= union


def test_only_one_part_is_held_at_a_time():
    """Every part an opener builds is gone before the next one is opened, in searches
    and in reaches (counted with finalizers)."""
    rng = np.random.default_rng(4)
    xb = rng.normal(size=(1200, 8)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    held, _ = _ivf_parts(xb, 4, nlist=8)
    live, most, opened = [0], [0], []

    def gone() -> None:
        live[0] -= 1

    def opener(p: int) -> IvfIndex:
        assert live[0] == 0, "a part is still held while the next one is opened"
        part = IvfIndex(held[p], 2, far_nprobe=1)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(part, gone)
        opened.append(p)
        return part

    index = PartedIndex(part_edges(len(xb), 4), opener)
    index.reach(xb[:20])
    index.search(xb[:20], 30)
    index.far.search(xb[:20], 30)
    assert most[0] == 1 and live[0] == 0
    assert opened.count(3) == 3  # reach, search and the far search each opened every part


def test_an_exact_part_is_searched_where_it_lies(tmp_path):
    """Over a memory-mapped table a part's search copies no rows: what Python allocates
    meanwhile stays below one part's bytes (a FAISS flat index would copy them all)."""
    path = tmp_path / "visual.npy"
    np.save(path, np.random.default_rng(5).normal(size=(40_000, 64)).astype(np.float32))
    V = np.load(path, mmap_mode="r")
    edges, views = part_edges(len(V), 4), []

    def opener(p: int) -> MappedFlatIP:
        part = MappedFlatIP(V[edges[p]:edges[p + 1]])
        views.append(np.shares_memory(np.asarray(part.xb), V))
        return part

    index = PartedIndex(edges, opener)
    part_bytes = V.nbytes // 4
    tracemalloc.start()
    D, I = index.search(np.asarray(V[:4]), 30)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < part_bytes / 4, (peak, part_bytes)
    assert views and all(views)  # each part's rows are the mapped file's pages
    assert np.array_equal(I, brute(np.asarray(V[:4]), np.asarray(V), 30)[1])


def test_on_a_gpu_one_part_at_a_time_fits_where_the_whole_does_not(monkeypatch, tmp_path):
    """A fake GPU with 24 MiB free: the whole exact index (16 MiB, built at twice that)
    only fits in float16; in 4 parts each part is built in float32, searched, and freed
    before the next, and the proposals are the brute-force ones."""
    cuda = FakeCuda([64 * MIB]).install(monkeypatch)
    FakeFaiss(cuda).install(monkeypatch)
    monkeypatch.setattr(hindex, "_GPU_RESOURCES", {})
    cuda.faiss[0] = 40 * MIB  # someone else's
    V = grid_rows(4096, dim=1024, seed=6)
    run = RunDir(tmp_path)
    whole = open_index(run, IndexChoice(), V, "cuda:0")
    assert whole.kind == "faiss-gpu-fp16"
    del whole
    cuda.peak[0] = 0
    parted = open_index(run, IndexChoice(), V, "cuda:0", parts=4)
    assert parted.kind == "faiss-gpu/4 parts"
    D, I = parted.search(V[:8], 50)
    assert np.array_equal(I, brute(V[:8], V, 50)[1])
    assert cuda.faiss[0] == 40 * MIB  # every part released
    assert cuda.peak[0] <= 40 * MIB + 2 * V.nbytes // 4  # one part at its build peak
    cuda.faiss[0] = 64 * MIB - 2 * MIB  # not even a part fits: one line naming the flag
    with pytest.raises(HnmError, match=r"^--index: an exact index of 1024 rows needs"):
        open_index(run, IndexChoice(), V, "cuda:0", parts=4)


# --- whole runs: the same bytes for any number of parts and workers


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metrics(run: Path) -> dict:
    """metrics.json without its timings (and the per-shard memory readings)."""
    data = json.loads((run / "metrics.json").read_text())
    for key in ("timing", "wall_seconds", "throughput_anchors_per_s"):
        data.pop(key)
    (data["index"].get("recall") or {}).pop("seconds", None)
    for shard in data["shards"]:
        for key in ("seconds", "peak_rss_mb", "startup_seconds", "data_wait_seconds"):
            shard.pop(key)
    return data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("parts") / "data", n=400, seed=7,
                        dims=(48, 32))


def _mine(data: dict, out: Path, *flags: str) -> Path:
    assert cli.main(mine_args(data, out, "--diverse-ratio", "0.5", *flags)) == 0
    return out


@pytest.fixture(scope="module")
def one_part(data, tmp_path_factory) -> Path:
    return _mine(data, tmp_path_factory.mktemp("one") / "run", "--index", "exact",
                 "--cpu-workers", "1")


@pytest.mark.parametrize("workers", [
    1, pytest.param(2, marks=[pytest.mark.slow, pytest.mark.processes])])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_exact_outputs_are_byte_identical_for_any_parts_and_workers(data, one_part, tmp_path,
                                                                    parts, workers):
    if parts == workers == 1:
        pytest.skip("the reference itself")
    out = _mine(data, tmp_path / "run", "--index", "exact", "--cpu-workers", str(workers),
                "--index-parts", str(parts))
    for name in ("negatives.jsonl", "suspects.jsonl"):
        assert _digest(out / name) == _digest(one_part / name), name
    got, want = _metrics(out), _metrics(one_part)
    if workers > 1:  # the shards are others: every figure but theirs is the same
        got.pop("shards"), want.pop("shards")
    assert got == want
    plan = json.loads((out / "plan.json").read_text())
    assert plan["placement"]["index_parts"] == parts
    assert len(plan["shards"]) == workers
    kinds = {json.loads(p.read_text())["index"] for p in (out / "candidates").glob("done_*")}
    assert kinds == ({"faiss-cpu"} if parts == 1 else {f"mapped-cpu/{parts} parts"})


@pytest.mark.parametrize("window", [1, 40])
def test_outputs_do_not_depend_on_the_blocks_and_windows_of_the_lists(data, one_part,
                                                                       tmp_path, monkeypatch,
                                                                       window):
    """Candidate lists written 16 anchors at a time and judged by the reduce one block
    (or 3 blocks) at a time: the same negatives, suspects and metrics, shard figures
    included, as lists found and judged a shard at a time."""
    monkeypatch.setattr(engine, "ANCHOR_BATCH", 16)
    monkeypatch.setattr(engine, "REDUCE_WINDOW", window)
    out = _mine(data, tmp_path / "run", "--index", "exact", "--cpu-workers", "1")
    for name in ("negatives.jsonl", "suspects.jsonl"):
        assert _digest(out / name) == _digest(one_part / name), name
    assert _metrics(out) == _metrics(one_part)
    with np.load(out / "candidates" / "shard_00000.npz") as z:
        assert len(z.files) == 25 * len(engine.MEMBERS)  # 400 anchors, 16 at a time


def test_ivf_in_parts_writes_a_file_per_part_and_measures_the_same_recall(data, tmp_path):
    """The quantizer is trained once: the parts hold the one index's lists between them,
    so the recall measured over the parted index is the one index's, and the outputs are
    the same. The floor: 8 of 16 lists probed on 400 rows of 24 scenes reach nearly every
    neighbour (0.9 leaves room for another BLAS)."""
    flags = ("--index", "ivf", "--ivf-nlist", "16", "--ivf-nprobe", "8", "--cpu-workers", "1")
    one = _mine(data, tmp_path / "one", *flags)
    three = _mine(data, tmp_path / "three", *flags, "--index-parts", "3")
    recall = json.loads((three / "tables" / "done").read_text())["recall"]
    assert recall["recall_at_k"] >= 0.9
    assert recall == {**json.loads((one / "tables" / "done").read_text())["recall"],
                      "seconds": recall["seconds"]}
    names = sorted(p.name for p in (three / "tables").glob("ivf*"))
    assert names == ["ivf_00000.faiss", "ivf_00001.faiss", "ivf_00002.faiss"]
    manifest = json.loads((three / ".hnm-run.json").read_text())["files"]
    assert {f"tables/{n}" for n in names} <= set(manifest)
    for name in ("negatives.jsonl", "suspects.jsonl"):
        assert _digest(three / name) == _digest(one / name), name
    assert _metrics(three) == _metrics(one)
    # `hnm sweep` searches the run's own index again: its parts, the same points
    for run in (one, three):
        assert cli.main(["sweep", str(run), "--cosine-thresholds", "0.2,0.4",
                         "--min-visual-similarities", "0.3,0.6"]) == 0
    points = [json.loads((r / "sweep.json").read_text())["points"] for r in (one, three)]
    assert points[0] == points[1]


def test_dry_run_says_each_parts_index_memory(data, tmp_path, capsys):
    assert cli.main(mine_args(data, tmp_path / "run", "--index", "ivf", "--index-parts",
                              "4", "--dry-run")) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "candidates:" in x)
    # 100 rows a part: 48 float32 components and an id each
    assert line.endswith("; index in 4 parts of 100 rows, 19.5 KiB each")


def test_the_flag_is_checked_in_one_line(data, tmp_path, capsys):
    assert cli.main(mine_args(data, tmp_path / "run", "--index-parts", "0")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--index-parts: must be at least 1, got 0")


# --- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.processes
def test_torchrun_two_ranks_in_two_parts_match_the_single_process_run(tmp_path):
    """Two torchrun processes on 127.0.0.1 play two nodes sharing the run directory, each
    searching its shard through the index in two parts."""
    from hnm.demo import make_demo

    demo = tmp_path / "demo"
    make_demo(demo, num_dialogs=10, turns_per_dialog=4, image_size=64)
    common = ["launch.py", "--config", "configs/demo.yaml", "--annotations",
              str(demo / "annotations.json"), "--image-dir", str(demo), "--num-workers", "0",
              "--batch-size", "8", "--visual-encoder", "pixels", "--text-encoder",
              str(tiny_bert(tmp_path / "tiny_bert")), "--index", "exact"]
    single = tmp_path / "single"
    result = subprocess.run([sys.executable, *common, "--output-dir", str(single),
                             "--cpu-workers", "1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=SAFETY_S)
    assert result.returncode == 0, result.stderr[-3000:]
    out, port = tmp_path / "run", str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", *common,
         "--output-dir", str(out), "--index-parts", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [p.communicate(timeout=SAFETY_S) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert _digest(out / "negatives.jsonl") == _digest(single / "negatives.jsonl")
    assert _digest(out / "suspects.jsonl") == _digest(single / "suspects.jsonl")
    kinds = {json.loads(p.read_text())["index"] for p in (out / "candidates").glob("done_*")}
    assert kinds == {"mapped-cpu/2 parts"} and len(list((out / "candidates").glob("done_*"))) == 2


@pytest.mark.parametrize(("requested", "rows", "parts"), [
    (None, 1, 1), (None, PART_ROWS, 1), (None, PART_ROWS + 1, 2), (None, 4 * PART_ROWS, 4),
    (None, 3_000_000, 23), (3, 2, 2), (5, 1000, 5), (1, 10 * PART_ROWS, 1)])
def test_left_to_the_run_the_parts_follow_the_rows(requested, rows, parts):
    """--index-parts left out: one part per PART_ROWS rows (a part's index about a
    quarter of a GB), so a process's index memory stays a part's as N grows; asked for:
    as asked, never more parts than rows."""
    assert index_parts(requested, rows) == parts
