"""Approximate inner-product search through a FAISS IVF index: which lists a query probes
is exact, and within them the proposals are as certain as an exact search's (`IvfIndex`,
the lists hold float32 rows), or proposed from compressed codes and rescored exactly
(`CodesIndex`, the lists hold PQ or 8-bit scalar codes)."""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hnm.grid import finalize
from hnm.index import search_eps, threaded_torch, top_by_row
from hnm.kmeans import seeded_sample


def ivf_shape(n: int) -> tuple[int, int]:
    """(nlist, nprobe) for n rows: about sqrt(n) lists, a power of two (lists of ~1,000
    rows at a million); the probes scan 1/80 of the lists, at least 8 (recall@30 0.99 on
    bench_scale's million rows, 0.97 with 8 probes)."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    return nlist, min(nlist, max(8, nlist // 80))


# The lists' codecs (IndexChoice.kind -> FAISS): float32 rows, product-quantised codes,
# 8-bit scalar codes.
CODECS = {"ivf": "flat", "ivfpq": "pq", "ivfsq": "sq8"}
# Proposals a compressed index is asked for, per row wanted: code scores only approximate
# the exact ones, so a few times more rows are rescored than are kept.
RERANK = 4
PQ_BITS = 8  # bits of each PQ sub-quantiser's code (256 centroids)


def pq_bytes(d: int, wanted: int | None = None) -> int:
    """Bytes of a row's PQ code (its sub-quantisers): `wanted`, or about d/8 (8 components
    a sub-quantiser), the largest divisor of d not above it (FAISS splits d evenly)."""
    if wanted is not None:
        return wanted
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


def code_bytes(kind: str, d: int, wanted: int | None = None) -> int:
    """Bytes a row takes in the lists of an index of `kind`, its id (int64) included."""
    codec = CODECS[kind]
    return 8 + (4 * d if codec == "flat" else d if codec == "sq8" else pq_bytes(d, wanted))


# Queries per IVF search: each list is read once per search and multiplied with all the
# queries probing it, so more queries per search make fewer, larger products.
IVF_BATCH = 8192
# ... fewer where they probe more lists: a search holds each query's best rows of each
# probed list, so query-list pairs, not queries, set its memory. 8,192 queries probing
# 12 lists each (a million rows' shape, `ivf_shape`); at least MIN_BATCH queries.
PROBED = IVF_BATCH * 12
MIN_BATCH = 1024


def probe_batch(nprobe: int) -> int:
    """Queries per search that probe `nprobe` lists each."""
    return min(IVF_BATCH, max(MIN_BATCH, PROBED // max(1, nprobe)))


def train_ivf(V: np.ndarray, nlist: int, seed: int, sample: int, kind: str = "ivf",
              pq: int | None = None, rows: tuple[int, int] | None = None) -> Any:
    """A FAISS IVF index over every row of V: its lists hold the float32 rows (`kind`
    "ivf"), PQ codes of `pq_bytes(d, pq)` bytes ("ivfpq") or 8-bit scalar codes ("ivfsq")
    of each row's residual from its list's centroid. `rows`: (start, stop) to add only
    those (none: (0, 0), a trained index to copy per part).

    Centroids: spherical k-means on a seeded sample of `sample` rows, snapped to the
    embedding grid so that which lists a query probes is computed exactly (see
    `IvfIndex.probes`); a codec is trained on the same sample. Rows are added a block at a
    time (V may be a memory map).
    """
    import faiss

    x = seeded_sample(V, sample, seed)
    with _one_thread():  # the same centroids and codec whatever the machine's threads
        centroids = finalize(_faiss_centroids(x, nlist, seed, 20))
        quantizer = faiss.IndexFlatIP(V.shape[1])
        quantizer.add(centroids)
        index = _empty_ivf(quantizer, V.shape[1], len(centroids), kind, pq, len(x))
        if not index.is_trained:  # the codec (the quantizer has its centroids already)
            index.train(x)
    add_rows(index, V, *(rows if rows is not None else (0, V.shape[0])))
    return index


# Row-list scores computed at once while rows are assigned (added ADD_ROWS at a time):
# their float32 scores and the selection's copy stay at 16 MiB whatever the lists (2,048
# rows at a time with 1,024 lists; 65,536 rows at once took 0.75 GiB).
ASSIGN_SCORES = 1 << 21
ADD_ROWS = 1 << 16  # rows added at once: the lists grow in few steps


def assign_rows(nlist: int) -> int:
    """Rows assigned to their lists at once, with `nlist` lists (`ASSIGN_SCORES`)."""
    return max(1, ASSIGN_SCORES // max(1, nlist))


def add_rows(index: Any, V: np.ndarray, start: int, stop: int) -> None:
    """Rows start..stop-1 of V into an index (numbered on from its ntotal), a block at a
    time (V may be a memory map), each into the list of its highest exact centroid score
    (ties to the lowest list: `top_lists`), never FAISS's float32 assignment, whose near
    ties can fall either way with the machine's thread count."""
    import faiss

    centroids = _centroids(index)
    exact = centroids.astype(np.float64)
    block = assign_rows(len(centroids))
    for s in range(start, stop, ADD_ROWS):
        x = np.ascontiguousarray(V[s:min(s + ADD_ROWS, stop)], dtype=np.float32)
        lists = np.concatenate([top_lists(x[a:a + block], centroids, exact, 1)[:, 0]
                                for a in range(0, len(x), block)]).astype(np.int64)
        index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists))


def top_lists(xq: np.ndarray, centroids32: np.ndarray, centroids: np.ndarray, n: int
              ) -> np.ndarray:
    """(nq, n) lists of each query's n highest exact centroid scores, ascending, ties to
    the lowest list. float32 scores decide wherever the n-th and the next one are more
    than twice their error apart (then the exact order agrees); the other queries are
    scored exactly (float64 products of grid values)."""
    nlist = len(centroids32)
    if n >= nlist:
        return np.broadcast_to(np.arange(nlist), (len(xq), nlist)).copy()
    xq = np.asarray(xq, np.float32)
    scores = xq @ centroids32.T
    part = np.partition(scores, nlist - n - 1, axis=1)  # the n highest last, one copy
    inner, outer = part[:, nlist - n:].min(axis=1), part[:, nlist - n - 1]
    out = np.empty((len(xq), n), np.int64)
    clear = inner - outer > 2 * search_eps(centroids32.shape[1])  # float32 products
    out[clear] = np.nonzero(scores[clear] >= inner[clear, None])[1].reshape(-1, n)
    if not clear.all():
        out[~clear] = top_by_row(xq[~clear].astype(np.float64) @ centroids.T, n)
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """FAISS's threads and every BLAS's on one: a multi-threaded product can round an
    edge of its tiles differently, and k-means on it can end elsewhere."""
    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def _empty_ivf(quantizer: Any, d: int, nlist: int, kind: str, pq: int | None,
               sample: int) -> Any:
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if CODECS[kind] == "flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
    elif CODECS[kind] == "sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist,
                                              faiss.ScalarQuantizer.QT_8bit, ip)
    else:  # fewer bits where the sample holds fewer rows than 2^8 centroids
        bits = min(PQ_BITS, int(math.log2(max(2, sample))))
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_bytes(d, pq), bits, ip)
        index.pq.cp.min_points_per_centroid = 1  # a small sample is the caller's choice
        index.pq.cp.seed = 1234  # FAISS's default, written down: the codes are seeded
    return index


class IvfIndex:
    """Search through a FAISS IVF index: every row of the `nprobe` lists whose centroids
    score highest against the query, ranked by float32 (or, on a GPU short of memory,
    float16) products.

    Which lists are probed is exact (float64 products of grid values, ties to the lowest
    list), so a query probes the same lists on every device and in every batch; within
    them the proposals are certain up to `eps`, as an exact search's are. The lists are
    scanned one at a time, all the queries probing a list together (one matrix product):
    with NumPy on the host, where the lists stay in the index's memory (a memory map when
    loaded so), or with torch on a GPU, where they are copied.
    """

    exact = False
    eps: float

    def __init__(self, index: Any, nprobe: int, device: str = "cpu",
                 float16: bool = False, far_nprobe: int | None = None,
                 starts: Sequence[int] | None = None) -> None:
        """`index`: a FAISS IVF index, or the parts of one (a list: trained once, so with
        the same centroids, each numbering its rows from 0) whose rows start at `starts`
        in the table. On the host the parts' lists are read where they lie (memory-mapped
        when loaded so) and list j is scanned across every part at once."""
        import faiss

        parts = list(index) if isinstance(index, (list, tuple)) else [index]
        starts = [0] * len(parts) if starts is None else [int(s) for s in starts]
        self._coarse(parts[0], nprobe, sizes=False)  # the sizes: every part's, below
        d = parts[0].d
        self.index = parts  # owns the lists' memory
        self.ids: list[Any] = [[] for _ in range(self.nlist)]  # (ids, start) per part
        self.vectors: list[Any] = [[] for _ in range(self.nlist)]
        self.sizes = np.zeros(self.nlist, np.int64)
        for part, start in zip(parts, starts):
            if part.nlist != self.nlist or not np.array_equal(_centroids(part), self.centroids32):
                raise ValueError("IVF parts of different centroids: not one index")
            lists = faiss.extract_index_ivf(part).invlists
            for j in range(self.nlist):
                n = lists.list_size(j)
                if n:  # views of the lists (no copy)
                    ids = faiss.rev_swig_ptr(lists.get_ids(j), n)
                    codes = faiss.rev_swig_ptr(lists.get_codes(j), n * lists.code_size)
                    self.ids[j].append((ids, start))
                    self.vectors[j].append(np.frombuffer(codes, np.float32).reshape(n, d))
                    self.sizes[j] += n
        self.ntotal = sum(int(part.ntotal) for part in parts)
        self.device = device
        self.eps = search_eps(d, float16)
        self.kind = f"ivf-{device.split(':')[0]}" + ("-fp16" if float16 else "") + \
            (f"/{len(parts)} parts" if len(parts) > 1 else "")
        if device != "cpu":  # each list copied to the device, its parts joined
            torch = threaded_torch()
            dtype = torch.float16 if float16 else torch.float32
            self.ids = [torch.from_numpy(self.list_rows(j)).to(device) for j in range(self.nlist)]
            self.vectors = [torch.from_numpy(np.concatenate(v) if v else
                                             np.zeros((0, d), np.float32)).to(device, dtype)
                            for v in self.vectors]
        self._with_far(far_nprobe)

    def list_rows(self, j: int) -> np.ndarray:
        """The table rows list j holds, in its order (its parts in turn)."""
        segments = self.ids[j]
        if len(segments) == 1 and segments[0][1] == 0:
            return np.asarray(segments[0][0], np.int64)
        return np.concatenate([np.asarray(ids, np.int64) + start for ids, start in segments]) \
            if segments else np.zeros(0, np.int64)

    def _coarse(self, index: Any, nprobe: int, sizes: bool = True) -> None:
        """The index's centroids (float64 and float32), probe counts and (with `sizes`) its
        list sizes."""
        import faiss

        self.nlist, self.ntotal = index.nlist, index.ntotal
        self.nprobe = min(nprobe, self.nlist)
        centroids = _centroids(index)
        self.centroids = centroids.astype(np.float64)
        self.centroids32 = centroids.astype(np.float32)
        if sizes:
            lists = faiss.extract_index_ivf(index).invlists
            self.sizes = np.array([lists.list_size(j) for j in range(self.nlist)], np.int64)
        self.index = index  # owns the lists' memory (a memory map when loaded so)
        self.batch = IVF_BATCH
        self._probed: tuple[Any, np.ndarray] | None = None  # (query array, its probes)

    def _with_far(self, far_nprobe: int | None) -> None:
        """`far`: the same lists probed `far_nprobe` at a time (where that differs); the
        queries per search set by the larger probe count (`probe_batch`)."""
        self._far: IvfIndex | None = None
        if far_nprobe is not None and far_nprobe != self.nprobe:
            self._far = copy.copy(self)
            self._far.nprobe = min(far_nprobe, self.nlist)
            self._far._probed = None
        self.batch = probe_batch(max(self.nprobe, self.far.nprobe))
        self.far.batch = self.batch

    @property
    def far(self) -> IvfIndex:
        return self._far or self

    def probes(self, xq: np.ndarray) -> np.ndarray:
        """(nq, nprobe) lists each query probes, ascending: those of the nprobe highest
        exact centroid scores, ties to the lowest list (`top_lists`). Kept for the last
        query array asked about (the same array object, while it lives: a search asks
        for the reach of its queries first, then searches them)."""
        held = self._probed
        if held is not None and held[0]() is xq:
            return held[1]
        probes = top_lists(xq, self.centroids32, self.centroids, self.nprobe)
        self._probed = (weakref.ref(xq), probes)
        return probes

    def _exact_probes(self, scores: np.ndarray) -> np.ndarray:
        return top_by_row(scores, self.nprobe)

    def coarse(self) -> IvfIndex:
        """This index's probing alone (its centroids, not its lists): what the parts of an
        index share (`parts.PartedIndex` chooses a query's lists once for all of them)."""
        light = copy.copy(self)
        light._probed = None
        light.ids = light.vectors = []
        light.index = light._far = None
        return light

    def same_probes(self, other: IvfIndex) -> bool:
        """Whether a query probes the same lists here and in `other`."""
        return self.nprobe == other.nprobe and np.array_equal(self.centroids32,
                                                              other.centroids32)

    def reach(self, xq: np.ndarray, probes: np.ndarray | None = None) -> np.ndarray:
        return self.sizes[self.probes(xq) if probes is None else probes].sum(axis=1)

    def search(self, xq: np.ndarray, k: int, probes: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k) scores and rows, best first (row -1 past the probed rows); `probes`:
        the lists each query probes, where already chosen."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        probes = self.probes(xq) if probes is None else probes
        if self.device != "cpu":
            return self._search_device(xq, probes, k)
        # each query's best k of each probed list, then its best k of those
        D = np.full((len(xq), self.nprobe, k), -np.inf, np.float32)
        I = np.full(D.shape, -1, np.int64)
        for j, who, slot in _by_list(probes):
            kk = min(k, int(self.sizes[j]))
            if not kk:
                continue
            q = xq[who]
            segments = self.vectors[j]  # its parts' rows joined: one product, not several
            S = q @ (segments[0] if len(segments) == 1 else np.concatenate(segments)).T
            # the kk highest (the last kk of a partition: no negated copy of S)
            pos = np.argpartition(S, S.shape[1] - kk, axis=1)[:, S.shape[1] - kk:] \
                if S.shape[1] > kk else np.broadcast_to(np.arange(kk), (len(who), kk))
            D[who, slot, :kk] = np.take_along_axis(S, pos, 1)
            I[who, slot, :kk] = self.list_rows(j)[pos]
        D, I = D.reshape(len(xq), -1), I.reshape(len(xq), -1)
        top = np.argpartition(-D, k - 1, axis=1)[:, :k] if D.shape[1] > k \
            else np.broadcast_to(np.arange(D.shape[1]), D.shape)
        D, I = np.take_along_axis(D, top, 1), np.take_along_axis(I, top, 1)
        order = np.argsort(-D, axis=1, kind="stable")
        return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)

    def _search_device(self, xq: np.ndarray, probes: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The search with torch, the lists on a GPU."""
        import torch

        q = torch.from_numpy(xq).to(self.device)
        D = torch.full((len(xq), self.nprobe, k), -torch.inf, device=self.device)
        I = torch.full(D.shape, -1, dtype=torch.int64, device=self.device)
        for j, who, slot in _by_list(probes):
            who, slot = (torch.from_numpy(x).to(self.device) for x in (who, slot))
            kk = min(k, int(self.sizes[j]))
            S = q[who] @ self.vectors[j].to(torch.float32).T  # (queries of list j, n_j)
            top, pos = torch.topk(S, kk, dim=1, sorted=False)
            D[who, slot, :kk] = top
            I[who, slot, :kk] = self.ids[j][pos]
        top, pos = torch.topk(D.reshape(len(xq), -1), k, dim=1)
        rows = torch.gather(I.reshape(len(xq), -1), 1, pos)
        return top.cpu().numpy(), rows.cpu().numpy()


class CodesIndex(IvfIndex):
    """Proposals from an IVF index of compressed codes (PQ, or 8-bit scalar), searched by
    FAISS on the host with its lists memory-mapped.

    A query probes the lists `IvfIndex.probes` chooses (exactly); within them the rows are
    ranked by their codes' scores, which only approximate the exact ones: nothing is certain
    from them (`eps` is infinite). The miner asks for `rerank` times the rows it wants,
    rescores every proposal exactly and keeps the exact order among them
    (`miner.exact_prefix`).
    """

    eps = math.inf
    rerank = RERANK

    def __init__(self, index: Any, nprobe: int, far_nprobe: int | None = None) -> None:
        import faiss

        self._coarse(index, nprobe)
        self.device = "cpu"
        pq = isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ)
        self.kind = ("ivfpq" if pq else "ivfsq") + "-cpu"
        self._with_far(far_nprobe)

    def search(self, xq: np.ndarray, k: int, probes: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        probes = self.probes(xq) if probes is None else probes
        # the codes are residuals from their list's centroid: FAISS adds the query's score
        # with the centroid, given here for the lists chosen
        coarse = np.take_along_axis(xq @ self.centroids32.T, probes, 1)
        self.index.nprobe = self.nprobe  # the FAISS index is shared with `far`
        return self.index.search_preassigned(xq, k, probes, coarse)


def search_index(index: Any, nprobe: int, device: str = "cpu", float16: bool = False,
                 far_nprobe: int | None = None) -> IvfIndex:
    """The search through a saved IVF index: its float32 lists scanned on `device`
    (`IvfIndex`), or its codes by FAISS on the host (`CodesIndex`)."""
    import faiss

    if isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat):
        return IvfIndex(index, nprobe, device, float16, far_nprobe)
    return CodesIndex(index, nprobe, far_nprobe)


def _centroids(index: Any) -> np.ndarray:
    """(nlist, d) float32 centroids of a FAISS IVF index's flat quantizer (a view)."""
    import faiss

    xb = faiss.downcast_index(index.quantizer).get_xb()
    return faiss.rev_swig_ptr(xb, index.nlist * index.d).reshape(index.nlist, index.d)


def _by_list(probes: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(list, the queries probing it, their probe slot) for every probed list."""
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    lists = flat[order]
    query, slot = np.divmod(order, probes.shape[1])
    edges = np.concatenate([[0], np.flatnonzero(np.diff(lists)) + 1, [len(lists)]])
    for s, e in zip(edges[:-1], edges[1:]):
        yield int(lists[s]), query[s:e], slot[s:e]


def load_ivf(path: str) -> Any:
    """The saved IVF index memory-mapped (shared by every worker on a machine): its lists
    and, where FAISS maps its flat codes too (IO_FLAG_MMAP_IFC, FAISS 1.10 on), its coarse
    quantizer's centroids, so that the parts of an index opened together do not each hold
    a copy of the centroids in the process's own memory (2,048 x 512 float32: 4 MiB a
    part); before that, the lists only."""
    import faiss

    return faiss.read_index(path, getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP))


def _faiss_centroids(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """FAISS's spherical k-means, for the IVF lists only (an IVF index needs FAISS anyway,
    and its lists change which rows are proposed, never how they are scored)."""
    import faiss

    # max_points_per_centroid: train on every point given, never a subsample
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True,
                      max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1,
                      verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)
