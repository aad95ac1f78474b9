"""Inner-product search over every row of a table — exact (FAISS, torch, or chunked numpy)
or approximate (a FAISS IVF index) — and seeded k-means.

Every index here only *proposes* rows: each proposal's score is within the index's `eps`
of its exact similarity, and the miner rescores exactly (see `miner.exact_prefix`), so
which kernel ran never changes a result.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from hnm.grid import finalize

# FAISS on a GPU refuses to select more than this many results per query.
GPU_MAX_K = 2048
# Exact-search error floor: FAISS scores in float32, within this of the exact value.
SEARCH_EPS = 1e-4
# Error of a float16 copy of a unit vector's inner products (2^-11 relative per component,
# doubled for safety): proposals from float16 storage are only trusted this far.
FLOAT16_EPS = 2.0**-10
# Bytes of scores one step of a chunked search holds (queries x rows): large enough for
# full-speed matrix products, small enough for any host or GPU at a million rows.
SCORE_BYTES = 1 << 27


def search_eps(dim: int, float16: bool = False) -> float:
    """Bound on |proposed score - exact score| of unit vectors of `dim` components: float32
    accumulation (dim * 2^-24, doubled) plus the storage's own rounding."""
    return max(SEARCH_EPS, dim * 2.0**-23) + (FLOAT16_EPS if float16 else 0.0)


class SearchIndex(Protocol):
    """Proposals of an inner-product search over the rows 0..ntotal-1 of a table."""

    kind: str
    ntotal: int
    eps: float
    exact: bool  # every row is searched (else only those the index reaches, see reach)
    far: SearchIndex  # the search for a diverse list's farthest rows (often itself)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) queries -> (nq, k) scores and rows, best first; row -1 where fewer."""

    def reach(self, xq: np.ndarray) -> np.ndarray:
        """(nq,) how many rows a search of each query can return (all of them: ntotal)."""


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpu() -> bool:
    return faiss_available() and hasattr(__import__("faiss"), "StandardGpuResources")


_threads: list[int] = []  # the count set_threads was last given, for torch loaded later


def set_threads(threads: int) -> None:
    """Threads of FAISS and torch in this process (CPU workers share the machine's cores).
    torch is only told where it is loaded (a model ran, or the torch search backend runs,
    see `_torch`): importing it takes seconds that a run on precomputed embeddings saves."""
    _threads[:] = [threads]
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)


def _torch() -> Any:
    """torch, with the thread count set_threads was given."""
    import torch

    if _threads and torch.get_num_threads() != _threads[0]:
        torch.set_num_threads(_threads[0])
    return torch


# One StandardGpuResources per device and process: each holds its own temporary memory
# (a share of the GPU), so a second one per device only wastes it.
_GPU_RESOURCES: dict[int, Any] = {}


def gpu_resources(gpu: int) -> Any:
    """The process's FAISS resources for one GPU, created on first use."""
    if gpu not in _GPU_RESOURCES:
        import faiss

        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[gpu]


def _pad(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen (nq, k') results to k columns with -inf / -1."""
    if I.shape[1] >= k:
        return D, I
    extra = k - I.shape[1]
    return (np.pad(D, ((0, 0), (0, extra)), constant_values=-np.inf),
            np.pad(I, ((0, 0), (0, extra)), constant_values=-1))


class ChunkedFlatIP:
    """Exact search on the host, a block of rows at a time, over any array (a memory map
    is read block by block and never copied whole)."""

    kind = "chunked-cpu"
    exact = True

    def __init__(self, xb: np.ndarray) -> None:
        self.xb = xb
        self.ntotal = xb.shape[0]
        self.eps = search_eps(xb.shape[1])

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        kk = min(k, self.ntotal)
        D = np.full((len(xq), kk), -np.inf, np.float32)
        I = np.full((len(xq), kk), -1, np.int64)
        # a block's scores and argpartition's indices: 12 bytes per (query, row)
        block = max(kk, SCORE_BYTES // (12 * max(1, len(xq))))
        for s in range(0, self.ntotal, block):
            S = xq @ np.asarray(self.xb[s:s + block], dtype=np.float32).T  # (nq, b)
            top = np.argpartition(-S, kk - 1, axis=1)[:, :kk] if S.shape[1] > kk \
                else np.broadcast_to(np.arange(S.shape[1]), S.shape)
            D, I = _best(D, I, np.take_along_axis(S, top, 1), s + top, kk)
        return _pad(*_sorted(D, I), k)

    def reach(self, xq: np.ndarray) -> np.ndarray:
        return np.full(len(xq), self.ntotal)

    @property
    def far(self) -> SearchIndex:
        return self


def _best(D: np.ndarray, I: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (nq, .) sets of scores and rows."""
    allD, allI = np.concatenate([D, D2], axis=1), np.concatenate([I, I2], axis=1)
    top = np.argpartition(-allD, k - 1, axis=1)[:, :k]
    return np.take_along_axis(allD, top, 1), np.take_along_axis(allI, top, 1)


def _sorted(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-D, axis=1, kind="stable")
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


class FaissFlatIP:
    """faiss.IndexFlatIP on the host, or on a GPU (float16 storage where asked).

    A GPU refuses k > GPU_MAX_K: such searches (anchors among thousands of near-duplicates)
    go to `wide`, an exact search on the host, instead. `max_k` is that limit.
    """

    exact = True

    def __init__(self, xb: np.ndarray, gpu: int | None = None, float16: bool = False,
                 max_k: int | None = None) -> None:
        import faiss

        index = faiss.IndexFlatIP(xb.shape[1])
        if gpu is not None:
            options = faiss.GpuClonerOptions()
            options.useFloat16 = float16
            index = faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, index, options)
        for s in range(0, xb.shape[0], 1 << 16):  # a memory map is copied a block at a time
            index.add(np.ascontiguousarray(xb[s:s + (1 << 16)], dtype=np.float32))
        self.index = index
        self.ntotal = xb.shape[0]
        self.eps = search_eps(xb.shape[1], float16)
        self.max_k = max_k if max_k is not None else GPU_MAX_K if gpu is not None else None
        self.wide = ChunkedFlatIP(xb)
        self.kind = "faiss-gpu" + ("-fp16" if float16 else "") if gpu is not None \
            else "faiss-cpu"

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.max_k is not None and min(k, self.ntotal) > self.max_k:
            return self.wide.search(xq, k)
        D, I = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k)  # (nq, k)
        return D, I.astype(np.int64)

    def reach(self, xq: np.ndarray) -> np.ndarray:
        return np.full(len(xq), self.ntotal)

    @property
    def far(self) -> SearchIndex:
        return self


class TorchFlatIP:
    """Exact k-NN with a matrix product and top-k, for devices without faiss-gpu.

    Queries go through in chunks whose score block stays within SCORE_BYTES whatever N
    is; rows stored in float16 are converted to float32 a block at a time.
    """

    exact = True

    def __init__(self, xb: np.ndarray, device: Any = "cpu", float16: bool = False) -> None:
        torch = _torch()
        dtype = torch.float16 if float16 else torch.float32
        # a block at a time; torch wants writable arrays (a memory-mapped table is not)
        self.xb = torch.cat([torch.from_numpy(np.require(xb[s:s + (1 << 16)], np.float32,
                                                         ["C", "W"]))
                             .to(device=device, dtype=dtype)
                             for s in range(0, xb.shape[0], 1 << 16)])
        self.ntotal = xb.shape[0]
        self.device = device
        self.rows = max(1, SCORE_BYTES // (4 * xb.shape[1])) if float16 else max(1, self.ntotal)
        self.chunk = max(1, SCORE_BYTES // (4 * self.rows))
        self.eps = search_eps(xb.shape[1], float16)
        self.kind = f"torch-{torch.device(device).type}" + ("-fp16" if float16 else "")

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        kk = min(k, self.ntotal)
        if len(xq) == 0:
            return np.zeros((0, kk), np.float32), np.zeros((0, kk), np.int64)
        Ds, Is = [], []
        for start in range(0, len(xq), self.chunk):
            q = torch.from_numpy(np.ascontiguousarray(xq[start:start + self.chunk],
                                                      dtype=np.float32)).to(self.device)
            D = I = None
            for s in range(0, self.ntotal, self.rows):
                S = q @ self.xb[s:s + self.rows].to(torch.float32).T  # (nq, rows)
                top, pos = torch.topk(S, min(kk, S.shape[1]), dim=1)
                D, I = (top, pos + s) if D is None else _torch_best(D, I, top, pos + s, kk)
            Ds.append(D.cpu().numpy())
            Is.append(I.cpu().numpy())
        return _pad(np.concatenate(Ds), np.concatenate(Is).astype(np.int64), k)

    def reach(self, xq: np.ndarray) -> np.ndarray:
        return np.full(len(xq), self.ntotal)

    @property
    def far(self) -> SearchIndex:
        return self


def _torch_best(D: Any, I: Any, D2: Any, I2: Any, k: int) -> tuple[Any, Any]:
    """The k best of two (nq, .) tensors of scores and rows, best first."""
    import torch

    allD, allI = torch.cat([D, D2], 1), torch.cat([I, I2], 1)
    best, at = torch.topk(allD, min(k, allD.shape[1]), dim=1)
    return best, torch.gather(allI, 1, at)


def gpu_free_bytes(device: str) -> int:
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def placement(nbytes: float, device: str, free: int | None = None,
              share: float = 0.8) -> tuple[str, bool] | None:
    """Where an index of `nbytes` (float32) lives: (device, float16?). On a GPU: float32
    if it fits in `share` of the free memory, else float16 if that fits, else None."""
    if not device.startswith("cuda"):
        return device, False
    free = gpu_free_bytes(device) if free is None else free
    if nbytes <= share * free:
        return device, False
    if nbytes / 2 <= share * free:
        return device, True
    return None


def build_index(xb: np.ndarray, device: str = "cpu", float16: bool = False,
                max_k: int | None = None) -> SearchIndex:
    """An exact index: FAISS where installed (its GPU build on a cuda device), else torch.

    `max_k`: the most results one search may ask of FAISS (a GPU's limit by default);
    larger searches run as an exact chunked search on the host.
    """
    gpu = int(device.split(":")[1]) if device.startswith("cuda:") else None
    if gpu is None and faiss_available():
        return FaissFlatIP(xb, None, max_k=max_k)
    if gpu is not None and faiss_gpu():
        return FaissFlatIP(xb, gpu, float16, max_k)
    return TorchFlatIP(xb, device, float16)


# ---- approximate: a FAISS IVF index ------------------------------------------------------


def ivf_shape(n: int) -> tuple[int, int]:
    """(nlist, nprobe) for n rows: about sqrt(n) lists, a power of two (lists of ~1,000
    rows at a million); the probes scan 1/80 of the lists, at least 8 (recall@30 0.99 on
    bench_scale's million rows, 0.97 with 8 probes)."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    return nlist, min(nlist, max(8, nlist // 80))


# Queries per IVF search: each list is read once per search and multiplied with all the
# queries probing it, so more queries per search make fewer, larger products.
IVF_BATCH = 8192


def train_ivf(V: np.ndarray, nlist: int, seed: int, sample: int) -> Any:
    """A FAISS IVF index over every row of V (its lists hold the float32 rows).

    Centroids: spherical k-means on a seeded sample of `sample` rows, snapped to the
    embedding grid so that which lists a query probes is computed exactly (see
    `IvfIndex.probes`). Rows are added a block at a time (V may be a memory map).
    """
    import faiss

    centroids = finalize(_faiss_centroids(_sample(V, sample, seed), nlist, seed, 20))
    quantizer = faiss.IndexFlatIP(V.shape[1])
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, V.shape[1], len(centroids),
                               faiss.METRIC_INNER_PRODUCT)
    for s in range(0, V.shape[0], 1 << 16):
        index.add(np.ascontiguousarray(V[s:s + (1 << 16)], dtype=np.float32))
    return index


def _sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of rows in row order (every row when there are no more)."""
    if x.shape[0] <= size:
        return np.asarray(x, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size, replace=False))
    return np.asarray(x[rows], dtype=np.float32)


class IvfIndex:
    """Search through a FAISS IVF index: every row of the `nprobe` lists whose centroids
    score highest against the query, ranked by float32 (or, on a GPU short of memory,
    float16) products.

    Which lists are probed is exact (float64 products of grid values, ties to the lowest
    list), so a query probes the same lists on every device and in every batch; within
    them the proposals are certain up to `eps`, as an exact search's are. The lists are
    scanned one at a time, all the queries probing a list together (one matrix product),
    with torch on the host or on a GPU.
    """

    exact = False

    def __init__(self, index: Any, nprobe: int, device: str = "cpu",
                 float16: bool = False, far_nprobe: int | None = None) -> None:
        import faiss

        torch = _torch()
        self.device = torch.device(device)
        self.nlist, self.ntotal, d = index.nlist, index.ntotal, index.d
        self.nprobe = min(nprobe, self.nlist)
        xb = faiss.downcast_index(index.quantizer).get_xb()
        centroids = faiss.rev_swig_ptr(xb, self.nlist * d).reshape(self.nlist, d)
        self.centroids = torch.from_numpy(centroids.astype(np.float64))
        self.centroids32 = torch.from_numpy(centroids.astype(np.float32))
        lists = faiss.extract_index_ivf(index).invlists
        self.sizes = np.array([lists.list_size(j) for j in range(self.nlist)], np.int64)
        dtype = torch.float16 if float16 else torch.float32
        self.ids, self.vectors = [], []
        for j, n in enumerate(self.sizes.tolist()):
            ids = faiss.rev_swig_ptr(lists.get_ids(j), n) if n else np.zeros(0, np.int64)
            codes = faiss.rev_swig_ptr(lists.get_codes(j), n * lists.code_size) if n \
                else np.zeros(0, np.uint8)
            self.ids.append(torch.from_numpy(np.array(ids, np.int64)).to(self.device))
            vectors = torch.from_numpy(np.frombuffer(codes, np.float32).reshape(n, d))
            self.vectors.append(vectors.to(self.device, dtype))  # on the host: no copy
        self.index = index  # owns the lists' memory (a memory map when loaded so)
        self.eps = search_eps(d, float16)
        self.kind = f"ivf-{self.device.type}" + ("-fp16" if float16 else "")
        self.batch = IVF_BATCH
        self._far: IvfIndex | None = None
        if far_nprobe is not None and far_nprobe != self.nprobe:
            self._far = copy.copy(self)  # the same lists, fewer probes
            self._far.nprobe = min(far_nprobe, self.nlist)

    @property
    def far(self) -> IvfIndex:
        return self._far or self

    def probes(self, xq: np.ndarray) -> np.ndarray:
        """(nq, nprobe) lists each query probes, ascending: those of the nprobe highest
        exact centroid scores, ties to the lowest list.

        float32 scores decide wherever the nprobe-th and the next one are more than twice
        their error apart (then the exact order agrees); other queries are scored exactly.
        """
        import torch

        if self.nprobe >= self.nlist:
            return np.broadcast_to(np.arange(self.nlist), (len(xq), self.nlist)).copy()
        xq = np.asarray(xq, np.float32)
        scores = (torch.from_numpy(xq) @ self.centroids32.T).numpy()
        part = -np.partition(-scores, self.nprobe, axis=1)
        inner, outer = part[:, :self.nprobe].min(axis=1), part[:, self.nprobe]
        out = np.empty((len(xq), self.nprobe), np.int64)
        clear = inner - outer > 2 * self.eps
        out[clear] = np.nonzero(scores[clear] >= inner[clear, None])[1].reshape(-1, self.nprobe)
        if not clear.all():
            exact = (torch.from_numpy(xq[~clear].astype(np.float64)) @ self.centroids.T).numpy()
            out[~clear] = self._exact_probes(exact)
        return out

    def _exact_probes(self, scores: np.ndarray) -> np.ndarray:
        cut = -np.partition(-scores, self.nprobe - 1, axis=1)[:, self.nprobe - 1:self.nprobe]
        tied = scores == cut
        need = self.nprobe - (scores > cut).sum(axis=1, keepdims=True)
        chosen = (scores > cut) | (tied & (np.cumsum(tied, axis=1) <= need))
        return np.nonzero(chosen)[1].reshape(len(scores), self.nprobe)

    def reach(self, xq: np.ndarray) -> np.ndarray:
        return self.sizes[self.probes(xq)].sum(axis=1)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        xq = np.ascontiguousarray(xq, dtype=np.float32)
        probes = self.probes(xq)
        q = torch.from_numpy(xq).to(self.device)
        # each query's best k of each probed list, then its best k of those
        D = torch.full((len(xq), self.nprobe, k), -torch.inf, device=self.device)
        I = torch.full(D.shape, -1, dtype=torch.int64, device=self.device)
        for j, who, slot in _by_list(probes, self.device):
            kk = min(k, int(self.sizes[j]))
            S = q[who] @ self.vectors[j].to(torch.float32).T  # (queries of list j, n_j)
            top, pos = torch.topk(S, kk, dim=1, sorted=False)
            D[who, slot, :kk] = top
            I[who, slot, :kk] = self.ids[j][pos]
        top, pos = torch.topk(D.reshape(len(xq), -1), k, dim=1)
        rows = torch.gather(I.reshape(len(xq), -1), 1, pos)
        return top.cpu().numpy(), rows.cpu().numpy()


def _by_list(probes: np.ndarray, device: Any) -> Iterator[tuple[int, Any, Any]]:
    """(list, the queries probing it, their probe slot) for every probed non-empty list."""
    import torch

    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    lists = flat[order]
    query, slot = np.divmod(order, probes.shape[1])
    edges = np.concatenate([[0], np.flatnonzero(np.diff(lists)) + 1, [len(lists)]])
    for s, e in zip(edges[:-1], edges[1:]):
        yield (int(lists[s]), torch.from_numpy(query[s:e]).to(device),
               torch.from_numpy(slot[s:e]).to(device))


def load_ivf(path: str) -> Any:
    """The saved IVF index, its lists memory-mapped (shared by every worker on a machine)."""
    import faiss

    return faiss.read_index(path, faiss.IO_FLAG_MMAP)


# ---- k-means ------------------------------------------------------------------------------

# k-means trains on every row up to this many, on a seeded sample of this many above:
# clusters only need to be coarse ("elsewhere in the visual space"), and a sample keeps
# training time and memory flat in N.
KMEANS_SAMPLE = 100_000
LABEL_BLOCK = 1 << 16  # rows labelled per step: a (block, k) float64 score array


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means; returns (labels (n,), centroids (k, d)).

    Trained on every point up to KMEANS_SAMPLE, else on a seeded sample; `x` may be a
    memory map. One implementation whatever is installed (`_lloyd`, in float64), so the
    clusters, and the diverse negatives drawn from them, never depend on whether FAISS is
    there. Labels are the float64 argmax over the centroids (ties to the lowest centroid),
    computed a block at a time. The centroids are not on the embedding grid, so these dot
    products are not exact: a point almost equidistant from two centroids could be
    labelled differently by another BLAS, which moves it to the other cluster and nothing
    more. `niter`: clusters only need to be coarse.
    """
    k = min(k, len(x))
    if k == 1:
        centroids = np.asarray(x, dtype=np.float32).mean(axis=0, keepdims=True) \
            if len(x) <= KMEANS_SAMPLE else _block_mean(x)
    else:
        centroids = _lloyd(_sample(x, KMEANS_SAMPLE, seed), k, seed, niter)
    labels = np.concatenate([_nearest(x[s:s + LABEL_BLOCK], centroids.astype(np.float64))
                             for s in range(0, len(x), LABEL_BLOCK)])
    return labels, centroids


def _nearest(block: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) index of the highest-scoring float64 centroid of each row (lowest on ties)."""
    return (np.asarray(block, np.float64) @ centroids.T).argmax(axis=1).astype(np.int64)


def _block_mean(x: np.ndarray) -> np.ndarray:
    total = sum(np.asarray(x[s:s + LABEL_BLOCK], np.float64).sum(axis=0)
                for s in range(0, len(x), LABEL_BLOCK))
    return (total / len(x)).astype(np.float32)[None, :]


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


def _lloyd(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Spherical Lloyd iterations from k seeded distinct rows (float32 products, as FAISS's
    k-means does; the final labels are float64, see `kmeans`); a centroid that loses every
    member keeps its place. Members are summed in float64, a block of rows at a time (grouped
    by label), so memory stays at one block whatever the sample size."""
    rng = np.random.default_rng(seed)
    centroids = np.asarray(x[rng.choice(len(x), size=k, replace=False)], np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    for _ in range(niter):
        sums = np.zeros(centroids.shape, np.float64)
        for s in range(0, len(x), LABEL_BLOCK):
            block = np.asarray(x[s:s + LABEL_BLOCK], np.float32)
            labels = (block @ centroids.T).argmax(axis=1)
            grouped = block[np.argsort(labels, kind="stable")]
            ends = np.cumsum(np.bincount(labels, minlength=k))
            for c, (a, b) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
                sums[c] += grouped[a:b].sum(axis=0, dtype=np.float64)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        moved = norms[:, 0] > 0
        centroids[moved] = sums[moved] / norms[moved]
    return centroids
