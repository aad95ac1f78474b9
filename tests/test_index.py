"""Search indexes: exact results whatever the kernel, the GPU's k limit (tested on the host
with a small cap), one set of GPU resources per device, bounded score blocks, and IVF
searches that do not depend on the batch."""

from __future__ import annotations

import os

import numpy as np
import pytest
from builders import mapping_of, needs_faiss
from fake_gpu import GPU_MAX_SELECTION_K, MIB, FakeCuda, FakeFaiss

from hnm import index as hindex
from hnm import ivf as hivf
from hnm import kmeans as hkmeans
from hnm.grid import finalize
from hnm.index import ChunkedFlatIP, FaissFlatIP, TorchFlatIP, merge_by_row, placement
from hnm.ivf import IvfIndex, ivf_shape, train_ivf
from hnm.kmeans import kmeans
from hnm.miner import nearest


def near_duplicates(n: int = 400, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Rows in a few tight bunches: an anchor has hundreds of near-ties, so a search must
    widen far past k_nn before the order at the cut is certain."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    return finalize(centres[rng.integers(0, 3, n)] + 1e-3 * rng.normal(size=(n, dim)))


def brute_nearest(V: np.ndarray, k: int, pool=None) -> list[list[int]]:
    """N(a) by the SPEC: the k highest exact vis among `pool(a)` (all rows), self out, ties
    by row."""
    sv = V.astype(np.float64) @ V.astype(np.float64).T
    out = []
    for a in range(len(V)):
        rows = range(len(V)) if pool is None else pool(a)
        out.append(sorted((j for j in rows if j != a), key=lambda j: (-sv[a, j], j))[:k])
    return out


def lists(rows: np.ndarray) -> list[list[int]]:
    return [[int(r) for r in row if r >= 0] for row in rows]


def test_chunked_search_is_exact_over_a_memory_map(tmp_path, monkeypatch):
    V = near_duplicates()
    np.save(tmp_path / "v.npy", V)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    monkeypatch.setattr(hindex, "SCORE_BYTES", 4 * 400 * 37)  # blocks of 37 rows
    got, _ = nearest(ChunkedFlatIP(mapped), mapped, np.arange(len(V)), 30, -np.inf)
    assert lists(got) == brute_nearest(V, 30)


@needs_faiss
def test_a_capped_index_widens_with_the_exact_chunked_search(monkeypatch):
    """GPUs refuse k > 2048: with the cap at 64, searches past it go to the host's chunked
    search, and N(a) is still the exact one."""
    V = near_duplicates()
    index = FaissFlatIP(V, max_k=64)
    asked = {"capped": [], "chunked": []}
    inner, wide = index.index.search, index.wide.search
    monkeypatch.setattr(index.index, "search",
                        lambda xq, k: asked["capped"].append(k) or inner(xq, k), raising=False)
    monkeypatch.setattr(index.wide, "search",
                        lambda xq, k: asked["chunked"].append(k) or wide(xq, k))
    got, _ = nearest(index, V, np.arange(len(V)), 30, -np.inf)
    assert lists(got) == brute_nearest(V, 30)
    assert max(asked["capped"]) <= 64 and asked["chunked"]
    assert min(asked["chunked"]) > 64


def test_one_gpu_resources_per_device(monkeypatch):
    cuda = FakeCuda([64 * MIB, 64 * MIB]).install(monkeypatch)
    fake = FakeFaiss(cuda).install(monkeypatch)
    monkeypatch.setattr(hindex, "_GPU_RESOURCES", {})
    V = near_duplicates(60)
    indexes = [FaissFlatIP(V, gpu) for gpu in (0, 0, 1, 0, 1)]
    assert len(fake.resources) == 2
    assert indexes[0].max_k == hindex.GPU_MAX_K == GPU_MAX_SELECTION_K
    assert indexes[0].kind == "faiss-gpu"
    got, _ = nearest(indexes[0], V, np.arange(len(V)), 5, -np.inf)
    assert lists(got) == brute_nearest(V, 5)


def test_torch_score_blocks_stay_bounded_at_a_million_rows():
    index = TorchFlatIP(np.zeros((1_000_000, 4), np.float32))
    assert index.chunk * index.ntotal * 4 <= hindex.SCORE_BYTES
    small = near_duplicates(100)
    index = TorchFlatIP(small)
    index.chunk = 7
    got, _ = nearest(index, small, np.arange(100), 10, -np.inf)
    assert lists(got) == brute_nearest(small, 10)


def test_float16_proposals_are_rescored_to_the_exact_lists(monkeypatch):
    V = near_duplicates()
    monkeypatch.setattr(hindex, "SCORE_BYTES", 4 * 8 * 50)  # float16 rows in blocks of 50
    index = TorchFlatIP(V, float16=True)
    assert index.rows == 50
    got, _ = nearest(index, V, np.arange(len(V)), 30, -np.inf)
    assert lists(got) == brute_nearest(V, 30)


@pytest.mark.parametrize("nbytes,free,want", [(0.8e9, 2e9, ("cuda:0", False)),
                                              (0.81e9, 2e9, ("cuda:0", True)),
                                              (1.6e9, 2e9, ("cuda:0", True)),
                                              (1.61e9, 2e9, None)])
def test_placement_falls_back_to_float16_then_refuses(nbytes, free, want):
    """Up to 0.8 of the free memory at the build's peak: twice the table in float32, once
    in float16."""
    assert placement(nbytes, "cuda:0", free=int(free)) == want
    assert placement(nbytes, "cpu") == ("cpu", False)


def ivf_case(n: int = 600, nlist: int = 16):
    rng = np.random.default_rng(3)
    V = finalize(rng.normal(size=(20, 12))[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, 12)))
    return V, train_ivf(V, nlist, seed=0, sample=10 * nlist)


@needs_faiss
def test_ivf_lists_are_exact_over_the_probed_rows():
    V, saved = ivf_case()
    index = IvfIndex(saved, nprobe=3)
    member = np.empty(len(V), np.int64)
    for j in range(index.nlist):
        member[index.list_rows(j)] = j
    centroids = index.centroids

    def probed(a: int) -> np.ndarray:
        scores = centroids @ V[a].astype(np.float64)
        chosen = np.lexsort((np.arange(len(scores)), -scores))[:3]
        return np.flatnonzero(np.isin(member, chosen))

    got, _ = nearest(index, V, np.arange(len(V)), 25, -np.inf)
    assert lists(got) == brute_nearest(V, 25, probed)
    assert lists(got) != brute_nearest(V, 25)  # approximate: it misses some


@needs_faiss
def test_ivf_results_do_not_depend_on_the_batch():
    V, saved = ivf_case()
    index = IvfIndex(saved, nprobe=2)
    anchors = np.arange(len(V))
    whole, _ = nearest(index, V, anchors, 20, -np.inf)
    order = np.random.default_rng(0).permutation(len(V))
    parts = np.empty_like(whole)
    for chunk in np.array_split(order, 13):
        parts[chunk], _ = nearest(index, V, chunk, 20, -np.inf)
    assert np.array_equal(whole, parts)


@needs_faiss
def test_ivf_probes_are_chosen_once_for_a_query_array_and_never_for_another(monkeypatch):
    """A search's reach and its search of one query array choose its lists once; an
    array of other queries (the next search's, the far index's, another array of the
    same values) chooses its own, and every search proposes what a fresh index does."""
    from hnm import ivf

    V, saved = ivf_case()
    calls = []
    real = ivf.top_lists
    monkeypatch.setattr(ivf, "top_lists", lambda xq, *a: calls.append(1) or real(xq, *a))
    index = IvfIndex(saved, nprobe=2, far_nprobe=5)
    rng = np.random.default_rng(1)
    for _ in range(6):
        q = V[rng.integers(0, len(V), rng.integers(1, 40))].copy()
        before = len(calls)
        reach = index.reach(q)
        D, I = index.search(q, 7)
        assert len(calls) == before + 1
        fresh = IvfIndex(saved, nprobe=2)
        assert np.array_equal(reach, fresh.reach(q.copy()))
        assert [np.array_equal(a, b) for a, b in zip((D, I), fresh.search(q.copy(), 7))] \
            == [True, True]
        far = index.far.search(q, 7)  # the far lists: chosen anew for the same array
        fresh_far = IvfIndex(saved, nprobe=5).search(q.copy(), 7)
        assert all(np.array_equal(a, b) for a, b in zip(far, fresh_far))
        other = -q  # the next array: its own lists
        assert np.array_equal(index.search(other, 7)[1], fresh.search(other.copy(), 7)[1])


@needs_faiss
def test_ivf_on_the_host_and_through_torch_propose_the_same_rows():
    """The host's NumPy scan and the device scan (torch, here on the host's "cpu:0") agree:
    the same scores up to float32 error, the same rows wherever scores are not tied."""
    V, saved = ivf_case(700, 16)
    host, device = IvfIndex(saved, nprobe=3), IvfIndex(saved, nprobe=3, device="cpu:0")
    assert (host.kind, device.kind) == ("ivf-cpu", "ivf-cpu")
    D1, I1 = host.search(V[:200], 40)
    D2, I2 = device.search(V[:200], 40)
    assert np.allclose(D1, D2, atol=host.eps) and np.all(np.diff(D1, axis=1) <= 0)
    assert [set(r) for r in I1] == [set(r) for r in I2]
    assert np.array_equal(nearest(host, V, np.arange(200), 25, -np.inf)[0],
                          nearest(device, V, np.arange(200), 25, -np.inf)[0])
    D, I = host.search(V[:3], 10_000)  # more than the probed lists hold: padded
    assert (I[:, -1] == -1).all() and np.isneginf(D[:, -1]).all()
    assert all(len(set(r[r >= 0])) == (r >= 0).sum() == n for r, n in zip(I, host.reach(V[:3])))


@needs_faiss
def test_ivf_probes_break_ties_to_the_lowest_list():
    V, saved = ivf_case(200, 8)
    index = IvfIndex(saved, nprobe=3)
    index.centroids[:] = 0.0  # every centroid scores 0: all tied
    index.centroids32[:] = 0.0
    assert np.array_equal(index.probes(V[:5]), np.tile([0, 1, 2], (5, 1)))
    index.centroids32[0, 0] = 1e-9  # float32 scores that differ by less than their error
    assert np.array_equal(index.probes(V[:5]), np.tile([0, 1, 2], (5, 1)))


@needs_faiss
def test_ivf_probes_from_float32_scores_are_the_exact_ones():
    V, saved = ivf_case(800, 64)
    index = IvfIndex(saved, nprobe=5)
    exact = V.astype(np.float64) @ index.centroids.T
    assert np.array_equal(index.probes(V), index._exact_probes(exact))


def test_ivf_shape_grows_with_the_table():
    assert ivf_shape(1_000_000) == (1024, 12)
    assert ivf_shape(100_000) == (256, 8)
    assert ivf_shape(50)[0] <= 8


def test_kmeans_on_a_sample_labels_every_row(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 6))[rng.integers(0, 5, 3000)]
    x = finalize(centres + 0.1 * rng.normal(size=(3000, 6)))
    monkeypatch.setattr(hkmeans, "KMEANS_SAMPLE", 500)
    monkeypatch.setattr(hkmeans, "LABEL_BLOCK", 128)
    labels, centroids = kmeans(x, 5, seed=0)
    assert len(labels) == 3000
    want = (x.astype(np.float64) @ centroids.astype(np.float64).T).argmax(axis=1)
    assert np.array_equal(labels, want)
    again, _ = kmeans(x, 5, seed=0)
    assert np.array_equal(labels, again)


def reference_lloyd(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Spherical Lloyd iterations written plainly: the same seeded start, each centroid the
    normalised float64 sum of its members, an empty cluster keeping its centroid."""
    c = x[np.random.default_rng(seed).choice(len(x), size=k, replace=False)].astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    for _ in range(niter):
        labels = (x.astype(np.float32) @ c.T).argmax(axis=1)
        for j in range(k):
            members = x[labels == j].astype(np.float64)
            if len(members):
                total = members.sum(axis=0)
                c[j] = total / np.linalg.norm(total)
    return c


@pytest.mark.parametrize("block", [64, 1 << 16])
def test_kmeans_is_plain_lloyd_whatever_is_installed(monkeypatch, block):
    """One implementation: the clusters never depend on whether FAISS can be imported."""
    rng = np.random.default_rng(3)
    x = finalize(rng.normal(size=(8, 12))[rng.integers(0, 8, 700)]
                 + 0.3 * rng.normal(size=(700, 12)))
    monkeypatch.setattr(hkmeans, "LABEL_BLOCK", block)
    labels, centroids = kmeans(x, 6, seed=1)
    np.testing.assert_allclose(centroids, reference_lloyd(x, 6, 1, 20), atol=1e-6)
    assert len(set(labels.tolist())) == 6
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss fails
    assert not hindex.faiss_available()
    without, again = kmeans(x, 6, seed=1)
    assert np.array_equal(labels, without) and np.array_equal(centroids, again)


@pytest.mark.parametrize("seed", range(6))
def test_merge_by_row_is_the_lexsort_order(seed: int):
    """Keys of (score, row) order the merge exactly as a lexsort of (-score, row, -1 last)
    does: ties, -0.0 and 0.0, missing rows, negative and infinite scores."""
    rng = np.random.default_rng(seed)
    nq, a, b = 40, int(rng.integers(0, 30)), int(rng.integers(1, 30))
    grid = np.array([-np.inf, -3.5, -1.0, -0.0, 0.0, 1e-30, 0.25, 0.25000003, 2.0, np.inf],
                    np.float32)
    D, D2 = (grid[rng.integers(0, len(grid), (nq, w))] for w in (a, b))
    I, I2 = (rng.permutation(200)[:a + b].reshape(1, -1).repeat(nq, 0)[:, s]
             for s in (slice(0, a), slice(a, a + b)))
    I2 = np.where(rng.random(I2.shape) < 0.2, -1, I2)
    D2 = np.where(I2 < 0, -np.inf, D2).astype(np.float32)
    allD, allI = np.concatenate([D, D2], 1), np.concatenate([I, I2], 1)
    for k in (1, 5, a + b, a + b + 3):
        want = np.lexsort((np.where(allI < 0, np.iinfo(np.int64).max, allI), -allD),
                          axis=1)[:, :k]
        gotD, gotI = merge_by_row(D, I, D2, I2, k)
        assert np.array_equal(gotI, np.take_along_axis(allI, want, 1))
        assert np.array_equal(gotD, np.take_along_axis(allD, want, 1))
        slow = merge_by_row(D.astype(np.float64), I, D2.astype(np.float64), I2, k)
        assert np.array_equal(slow[1], gotI)


@needs_faiss
@pytest.mark.parametrize("kind", ["ivf", "ivfsq", "ivfpq"])
def test_ivf_rows_join_their_exact_nearest_list_whatever_the_threads(kind: str):
    """Each row is added to the list of its highest exact centroid score, ties to the
    lowest list (brute force in float64 on the grid), and the index built on one thread
    is, byte for byte, the one built on two: FAISS's own float32 assignment is never used."""
    import faiss

    rng = np.random.default_rng(8)
    V = finalize(rng.normal(size=(30, 16))[rng.integers(0, 30, 900)]
                 + 0.3 * rng.normal(size=(900, 16)))
    V[::7] = V[0]  # duplicates of one row: the same list
    built, before = {}, faiss.omp_get_max_threads()
    try:
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            built[threads] = train_ivf(V, 24, seed=1, sample=600, kind=kind)
    finally:
        faiss.omp_set_num_threads(before)
    assert np.array_equal(faiss.serialize_index(built[1]), faiss.serialize_index(built[2]))
    with pytest.MonkeyPatch.context() as patch:  # rows assigned 50 at a time: the same
        patch.setattr(hivf, "ASSIGN_SCORES", 50 * 24)
        small = train_ivf(V, 24, seed=1, sample=600, kind=kind)
    assert np.array_equal(faiss.serialize_index(small), faiss.serialize_index(built[1]))
    index = IvfIndex(built[1], nprobe=1) if kind == "ivf" else None
    lists = faiss.extract_index_ivf(built[1]).invlists
    member = np.full(len(V), -1)
    for j in range(built[1].nlist):
        n = lists.list_size(j)
        member[faiss.rev_swig_ptr(lists.get_ids(j), n)] = j
    centroids = faiss.downcast_index(built[1].quantizer).reconstruct_n(0, built[1].nlist)
    scores = V.astype(np.float64) @ centroids.astype(np.float64).T
    best = np.array([np.flatnonzero(s == s.max())[0] for s in scores])
    assert np.array_equal(member, best)
    if index is not None:
        assert np.array_equal(index.probes(V)[:, 0], best)


def test_ivf_queries_per_search_shrink_as_probes_grow() -> None:
    """A search's (queries, probes, k) arrays stay within a million rows' shape: queries
    times probes at most PROBED, but never fewer than MIN_BATCH queries or more than
    IVF_BATCH."""
    from hnm.ivf import IVF_BATCH, MIN_BATCH, PROBED, ivf_shape, probe_batch

    for nprobe in range(1, 400):
        b = probe_batch(nprobe)
        assert MIN_BATCH <= b <= IVF_BATCH
        assert b * nprobe <= PROBED or b == MIN_BATCH
    assert probe_batch(ivf_shape(1_000_000)[1]) == IVF_BATCH
    assert probe_batch(ivf_shape(3_000_000)[1]) < IVF_BATCH


@needs_faiss
@pytest.mark.parametrize("kind", ["ivf", "ivfsq"])
def test_a_loaded_ivf_index_is_mapped_from_its_file_centroids_and_lists(tmp_path, kind):
    """Opened as the workers open it, an IVF index's lists and its coarse centroids lie in
    a mapping of its file, not in the process's own memory: the parts of an index opened
    together hold no copy of the centroids each (with FAISS's mapped flat codes)."""
    import faiss

    if not hasattr(faiss, "IO_FLAG_MMAP_IFC") or not os.path.exists("/proc/self/maps"):
        pytest.skip("FAISS maps only the lists before 1.10 (or no /proc here)")
    rng = np.random.default_rng(3)
    V = finalize(rng.normal(size=(3000, 16)))
    path = tmp_path / "part.faiss"
    faiss.write_index(train_ivf(V, 32, seed=0, sample=32 * 40, kind=kind), str(path))
    index = hivf.load_ivf(str(path))
    centroids = hivf._centroids(index)
    assert np.array_equal(centroids, faiss.downcast_index(
        faiss.read_index(str(path)).quantizer).reconstruct_n(0, 32))
    assert mapping_of(centroids.__array_interface__["data"][0]) == str(path.resolve())
    lists = faiss.extract_index_ivf(index).invlists
    j = next(j for j in range(32) if lists.list_size(j))
    for pointer in (lists.get_codes(j), lists.get_ids(j)):
        view = faiss.rev_swig_ptr(pointer, 1)
        assert mapping_of(view.__array_interface__["data"][0]) == str(path.resolve())
