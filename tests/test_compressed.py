"""Compressed proposals (--index ivfpq / ivfsq): IVF lists of PQ or 8-bit codes propose
rows, every proposal is rescored exactly, and a list is the exact order among them; its
recall against exact search, `--index auto` taking codes where the float32 lists do not
fit, and the flag refused without FAISS."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import REPO, cli, mapping_of, needs_faiss
from reference import reference_mine
from synthetic import make_dataset, mine_args
from test_run_reference import picks_of, saved_diverse_lists

from hnm import sizing
from hnm.config import Config
from hnm.data import anchor_uniforms, load_corpus
from hnm.engine import recall_at_k
from hnm.errors import HnmError
from hnm.grid import finalize
from hnm.index import ChunkedFlatIP
from hnm.ivf import (
    RERANK,
    CodesIndex,
    add_rows,
    code_bytes,
    load_ivf,
    pq_bytes,
    search_index,
    train_ivf,
)
from hnm.lifecycle import load_run_config
from hnm.miner import MARGIN, Arrays, farthest, nearest
from hnm.parts import PartedIndex, part_edges
from hnm.sizing import Sizes, choose_index, index_room, size_text
from hnm.storage import RunDir

CODES = ("ivfpq", "ivfsq")


def table(n: int = 3000, d: int = 64, seed: int = 5) -> np.ndarray:
    """Rows around 60 centres, spread wide enough that neighbours cross the IVF lists."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, d))
    return finalize(centres[rng.integers(0, 60, n)] + 1.5 * rng.normal(size=(n, d)))


def saved_index(tmp_path: Path, V: np.ndarray, kind: str, nlist: int = 64):
    """The index trained as the tables phase trains it, saved and loaded memory-mapped."""
    import faiss

    path = tmp_path / f"{kind}.faiss"
    faiss.write_index(train_ivf(V, nlist, seed=0, sample=64 * nlist, kind=kind), str(path))
    return load_ivf(str(path))


class Recorded:
    """An index whose searches are recorded: (queries, k, proposed rows)."""

    def __init__(self, index: CodesIndex) -> None:
        self.inner, self.calls = index, []
        for name in ("kind", "ntotal", "eps", "exact", "rerank", "reach"):
            setattr(self, name, getattr(index, name))
        self.far = self

    def search(self, xq: np.ndarray, k: int):
        D, I = self.inner.search(xq, k)
        self.calls.append((xq.copy(), k, I.copy(), D.copy()))
        return D, I


@needs_faiss
@pytest.mark.parametrize("kind", CODES)
def test_lists_are_the_exact_order_among_the_proposals(tmp_path: Path, kind: str):
    import faiss

    V = table()
    saved = saved_index(tmp_path, V, kind)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(saved).invlists)
    j = next(j for j in range(lists.nlist) if lists.list_size(j))
    codes = faiss.rev_swig_ptr(lists.get_codes(j), 1).__array_interface__["data"][0]
    assert mapping_of(codes) == str((tmp_path / f"{kind}.faiss").resolve())  # mapped, not read
    index = search_index(saved, nprobe=8)
    assert isinstance(index, CodesIndex) and index.kind == f"{kind}-cpu"
    assert math.isinf(index.eps) and not index.exact
    recorded = Recorded(index)
    anchors = np.arange(0, 3000, 7)
    got, vis = nearest(recorded, V, anchors, 30, -np.inf)
    (xq, k, proposed, code_scores), = recorded.calls  # one search, nothing widened
    assert k == (31 + MARGIN) * RERANK and np.array_equal(xq, V[anchors])
    sv = V.astype(np.float64) @ V.astype(np.float64).T
    reordered = 0
    for i, a in enumerate(anchors):
        rows = [int(j) for j in proposed[i] if j >= 0 and j != a]
        want = sorted(rows, key=lambda j: (-sv[a, j], j))[:30]
        assert got[i].tolist() == want
        assert vis[i].tolist() == [sv[a, j] for j in want]
        codes = [int(j) for j in proposed[i][np.argsort(-code_scores[i], kind="stable")]
                 if j >= 0 and j != a][:30]
        reordered += codes != want
    assert reordered > len(anchors) // 2  # the codes' own order differs: rescoring matters


@needs_faiss
@pytest.mark.parametrize("kind", CODES)
def test_codes_in_parts_are_the_exact_order_among_the_merged_proposals(tmp_path: Path,
                                                                        kind: str):
    """Codes in 3 parts (one trained quantizer and codec, each part's own lists, as the
    tables phase writes them): one search asks every part for RERANK times the rows, the
    merge keeps the best by code score, and the lists are the exact order among those
    proposals, each of them a row of the table (the parts' rows offset)."""
    import faiss

    V = table()
    trained = train_ivf(V, 64, seed=0, sample=64 * 64, kind=kind, rows=(0, 0))
    edges = part_edges(len(V), 3)
    for p in range(3):
        part = faiss.clone_index(trained)
        add_rows(part, V, int(edges[p]), int(edges[p + 1]))
        faiss.write_index(part, str(tmp_path / f"part_{p}.faiss"))
    index = PartedIndex(edges, lambda p: search_index(
        load_ivf(str(tmp_path / f"part_{p}.faiss")), nprobe=8))
    assert math.isinf(index.eps) and not index.exact and index.rerank == RERANK
    recorded = Recorded(index)
    anchors = np.arange(0, 3000, 11)
    got, vis = nearest(recorded, V, anchors, 30, -np.inf)
    (xq, k, proposed, _), = recorded.calls  # one search, nothing widened
    assert k == (31 + MARGIN) * RERANK
    assert proposed.max() < len(V) and (proposed[:, :30] >= edges[1]).any()
    sv = V.astype(np.float64) @ V.astype(np.float64).T
    for i, a in enumerate(anchors):
        rows = [int(j) for j in proposed[i] if j >= 0 and j != a]
        assert len(set(rows)) == len(rows)  # no row proposed by two parts
        want = sorted(rows, key=lambda j: (-sv[a, j], j))[:30]
        assert got[i].tolist() == want
        assert vis[i].tolist() == [sv[a, j] for j in want]


@needs_faiss
@pytest.mark.parametrize("kind", CODES)
def test_recall_against_exact_search_and_no_list_is_ever_complete(tmp_path: Path, kind: str):
    """recall@30 on 1,000 anchors. The ceiling is the float32 IVF index over the same lists
    (the same centroids, trained on the same sample): exact within its 8 probed lists of
    64, it finds every neighbour those lists hold (0.869 here), and a code index, whose
    proposals lie in the same lists, can find no more. With four times the rows proposed,
    8-byte PQ codes (8 components a byte) and 8-bit codes lose almost none of them (0.8689
    and 0.8695 measured; proposing only the 47 rows wanted, PQ finds 0.77, twice as many
    0.85): a floor of the ceiling less 0.01 (300 of the 30,000 neighbours) fails where the
    rescoring or the count of proposals goes wrong, not on noise. A diverse list is the
    exact order of the proposals too, and never complete."""
    V = table()
    anchors = np.arange(1000)
    flat = recall_at_k(search_index(saved_index(tmp_path, V, "ivf"), 8), V, anchors, 30)
    codes = recall_at_k(search_index(saved_index(tmp_path, V, kind), 8), V, anchors, 30)
    assert flat["recall_at_k"] >= 0.85  # the case itself: most neighbours in the probes
    assert flat["recall_at_k"] - 0.01 <= codes["recall_at_k"] <= flat["recall_at_k"]
    index = search_index(saved_index(tmp_path, V, kind), 8, far_nprobe=2)
    rng = np.random.default_rng(0)
    tab = Arrays(V, V, np.arange(len(V)), rng.integers(0, 300, len(V)),
                 rng.random(len(V)) < 0.8, np.zeros(len(V), np.int64))
    far = Recorded(index.far)
    lists, complete = farthest(far, tab, anchors[:200], 64)
    assert not complete.any()  # what the codes proposed is never all there is
    (_, _, proposed, _), = far.calls
    sv = V.astype(np.float64) @ V.astype(np.float64).T
    for i, a in enumerate(anchors[:200]):  # the lowest-vis kept rows among the proposals
        rows = [int(j) for j in proposed[i]
                if j >= 0 and tab.eligible[j] and tab.groups[j] != tab.groups[a]]
        assert lists.get(i).rows.tolist() == sorted(rows, key=lambda j: (sv[a, j], j))[:64]
    exact, exact_complete = farthest(ChunkedFlatIP(V), tab, anchors[:200], 64)
    assert not exact_complete.any() and not np.array_equal(lists.rows, exact.rows)


def test_pq_code_sizes():
    assert [pq_bytes(d) for d in (64, 512, 1280, 192, 12, 7)] == [8, 64, 160, 24, 1, 1]
    assert pq_bytes(512, 32) == 32
    assert [code_bytes(k, 64) for k in ("ivf", "ivfsq", "ivfpq")] == [264, 72, 16]


def sizes(rows: int = 200_000, dv: int = 64) -> Sizes:
    return Sizes(rows=rows, phrases=rows // 4, anchors=rows, dv=dv, dt=32,
                 annotation_bytes=0, workers=1, device="cpu")


def test_auto_takes_codes_where_the_lists_do_not_fit(monkeypatch):
    """200,000 rows of 64 components: IVF lists 200,000 x 264 bytes (50.4 MiB), 8-bit
    codes x 72 (13.7 MiB), PQ codes x 16 (3.1 MiB); the room is what the memory the plan
    sees leaves beside the rest of the plan."""
    monkeypatch.setattr(sizing, "faiss_available", lambda: True)
    config = Config(index="auto")
    need = -index_room(config, sizes(), 0.0)
    assert need > 0
    auto = "auto: 200,000 rows, above 100,000 for exact search on cpu"

    def choose(room_mib: float):
        monkeypatch.setattr(sizing, "host_available", lambda: need + room_mib * 2**20)
        return choose_index(config, 200_000, ["cpu"], sizes)

    roomy = choose(51.0)
    assert (roomy.kind, roomy.reason) == ("ivf", auto)
    assert roomy == choose_index(config, 200_000, ["cpu"])  # as without a budget
    assert (choose(20.0).kind, choose(20.0).reason) == (
        "ivfsq", f"{auto}; IVF lists of 50.4 MiB would not fit the 20.0 MiB the plan has "
                 "for the index, 8-bit codes of 13.7 MiB do")
    tight = choose(10.0)
    assert (tight.kind, tight.reason) == (
        "ivfpq", f"{auto}; IVF lists of 50.4 MiB and 8-bit codes of 13.7 MiB would not fit "
                 "the 10.0 MiB the plan has for the index: PQ codes of 3.1 MiB")
    assert tight.nlist == roomy.nlist and tight.nprobe == roomy.nprobe
    assert tight.describe().startswith("ivfpq, 512 lists, 8 probed per query, 2 for the ")
    small = choose_index(config, 100_000, ["cpu"], sizes)  # exact: no budget asked
    assert small.kind == "exact"
    # the estimate counts the codes, not the float32 lists: one part's (2 parts of 100,000)
    phases = {p.phase: p for p in sizing.estimate(config, sizes(), tight)}
    assert phases["candidates"].shared == 200_000 * (64 * 4 + 32 * 4 / 4) + 100_000 * 16


def test_pq_bytes_must_divide_the_dimension(monkeypatch):
    monkeypatch.setattr(sizing, "faiss_available", lambda: True)
    with pytest.raises(HnmError, match=r"^--pq-bytes: must divide the image embedding "
                                       r"dimension 64, got 12$"):
        choose_index(Config(index="ivfpq", pq_bytes=12), 300, ["cpu"], sizes)
    assert choose_index(Config(index="ivfpq", pq_bytes=16), 300, ["cpu"], sizes).kind == "ivfpq"


@pytest.mark.parametrize("kind", CODES)
def test_codes_need_faiss(monkeypatch, kind: str):
    monkeypatch.setattr(sizing, "faiss_available", lambda: False)
    with pytest.raises(HnmError) as err:
        choose_index(Config(index=kind), 300, ["cpu"])
    assert str(err.value) == (f"--index {kind} needs the faiss package (pip install "
                              "faiss-cpu, or a faiss GPU build); use --index exact without it")
    assert choose_index(Config(index="auto"), 10**7, ["cpu"], sizes).kind == "exact"


def test_without_faiss_the_command_line_refuses_ivfpq(tmp_path: Path):
    """tests/no_faiss hides an installed FAISS, as on a machine without it."""
    paths = make_dataset(tmp_path / "data", n=40, seed=1)
    hidden = os.pathsep.join([str(REPO / "tests" / "no_faiss"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "launch.py", *mine_args(paths, tmp_path / "run",
                                                                   "--index", "ivfpq")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": hidden,
                                         "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr == ("hnm: error: --index ivfpq needs the faiss package (pip install "
                           "faiss-cpu, or a faiss GPU build); use --index exact without it\n")


@needs_faiss
@pytest.mark.parametrize("kind", CODES)
def test_a_run_equals_the_reference_over_what_the_codes_propose(tmp_path: Path, kind: str):
    """A whole run (3 workers, and 1: the same bytes): N(a) is the exact order of the rows
    the codes propose for a, a diverse list the exact order of those proposed for -v_a
    (eligible, of another group), and the picks are the reference's (SPEC §3-7) over
    them; the recall in metrics.json is the share of exact N(a) found."""
    paths = make_dataset(tmp_path / "data", n=400, seed=11)
    flags = ("--index", kind, "--ivf-nlist", "8", "--ivf-nprobe", "4", "--batch-size", "16",
             "--diverse-ratio", "0.4", "--k-nn", "10", "--diverse-candidates", "6")
    out = tmp_path / "run"
    assert cli_main(mine_args(paths, out, "--cpu-workers", "3", *flags)) == 0
    assert cli_main(mine_args(paths, tmp_path / "one", *flags)) == 0
    assert (tmp_path / "one/negatives.jsonl").read_bytes() == (out / "negatives.jsonl").read_bytes()
    run = RunDir(out)
    config = load_run_config(run)
    ds = load_corpus(config, [])
    V, T = np.load(run.table("visual")), np.load(run.table("text"))
    clusters = np.load(run.table("clusters"))
    eligible = np.load(run.table("eligible"))[ds.text_ids]
    index = search_index(load_ivf(str(run.ivf)), 4, far_nprobe=1)
    sv = V.astype(np.float64) @ V.astype(np.float64).T
    n = len(V)

    def proposed(search, q: np.ndarray, want: int, share: float = 1.0) -> list[int]:
        k = min(n, (math.ceil((want + 1) / share) + MARGIN) * RERANK)
        return [int(j) for j in search.search(q[None].astype(np.float32), k)[1][0] if j >= 0]

    share = float(np.mean(eligible))
    saved = saved_diverse_lists(run)

    def first_list(a: int) -> list[int]:
        if not saved[a]:
            return []
        rows = [j for j in proposed(index.far, -V[a], config.diverse_candidates, share)
                if eligible[j] and ds.groups[j] != ds.groups[a]]
        want = sorted(rows, key=lambda j: (sv[a, j], j))[:config.diverse_candidates]
        assert saved[a] == want, a
        return want

    u = anchor_uniforms(ds.ids[:ds.num_anchors], config.seed)
    want = reference_mine(V, T, ds.text_ids, ds.groups, ds.phrases, clusters, None, u, config,
                          searched=lambda a: proposed(index, V[a], config.k_nn),
                          first_lists=first_list)
    _, _, got = picks_of(run, ds)
    assert got == want and any(saved)
    short = [len(proposed(index, V[a], config.k_nn)) < index.reach(V[a:a + 1])[0]
             for a in range(ds.num_anchors)]
    assert sum(short) > ds.num_anchors // 2  # the codes chose which rows were proposed

    def neighbours(a: int, pool) -> set[int]:
        return set(sorted((j for j in pool if j != a), key=lambda j: (-sv[a, j], j))
                   [:config.k_nn])

    found = sum(len(neighbours(a, range(n)) & neighbours(a, proposed(index, V[a], config.k_nn)))
                for a in range(ds.num_anchors))
    metrics = json.loads(run.metrics.read_text())
    assert metrics["index"]["kind"] == kind
    recall = metrics["index"]["recall"]
    assert recall["anchors"] == ds.num_anchors and recall["k"] == config.k_nn
    assert recall["recall_at_k"] == round(found / (ds.num_anchors * config.k_nn), 6)


@needs_faiss
def test_auto_run_takes_8_bit_codes_when_the_memory_is_short(tmp_path: Path, capsys,
                                                             monkeypatch):
    """Through the command line: with auto's exact limit lowered, the memory the plan sees
    decides between the float32 lists and 8-bit codes, and the run says why."""
    paths = make_dataset(tmp_path / "data", n=300, seed=2)
    monkeypatch.setattr(sizing, "AUTO_EXACT_ROWS", {"cpu": 100, "cuda": 100})
    rooms = []
    room = sizing.index_room
    monkeypatch.setattr(sizing, "index_room", lambda *a: rooms.append(room(*a)) or rooms[-1])
    monkeypatch.setattr(sizing, "host_available", lambda: 2.0**40)
    rc, text, _ = cli(capsys, *mine_args(paths, tmp_path / "run", "--dry-run", "--no-quiet"))
    assert rc == 0 and "Index: ivf, " in text
    need = 2.0**40 - rooms[-1]
    lists, sq = (300 * code_bytes(k, 24) for k in ("ivf", "ivfsq"))
    monkeypatch.setattr(sizing, "host_available", lambda: need + (lists + sq) / 2)
    out = tmp_path / "run"
    rc, text, _ = cli(capsys, *mine_args(paths, out, "--no-quiet"))
    assert rc == 0
    assert (f"Index: ivfsq, 16 lists, 8 probed per query, 2 for the farthest rows (auto: 300 "
            f"rows, above 100 for exact search on cpu; IVF lists of {size_text(lists)} would "
            f"not fit the {size_text((lists + sq) / 2)} the plan has for the index, 8-bit "
            f"codes of {size_text(sq)} do)") in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["index"]["kind"] == "ivfsq" and metrics["index"]["recall"]["k"] == 30
    assert "IVFSQ recall@30" in (out / "report.html").read_text()


def cli_main(args: list[str]) -> int:
    from hnm.cli import main

    return main(args)
