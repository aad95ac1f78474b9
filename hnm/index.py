"""Exact inner-product search over every row of a table (FAISS, torch, or chunked numpy),
and what every index shares (the `SearchIndex` protocol, error bounds, threads, placement);
the approximate IVF index is in `hnm.ivf`.

Every index here only *proposes* rows: each proposal's score is within the index's `eps`
of its exact similarity, and the miner rescores exactly (see `miner.exact_prefix`), so
which kernel ran never changes a result.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import numpy as np

# FAISS on a GPU refuses to select more than this many results per query.
GPU_MAX_K = 2048
# Exact-search error floor: FAISS scores in float32, within this of the exact value.
SEARCH_EPS = 1e-4
# Error of a float16 copy of a unit vector's inner products (2^-11 relative per component,
# doubled for safety): proposals from float16 storage are only trusted this far.
FLOAT16_EPS = 2.0**-10
# Building an exact index on a GPU holds the table about twice at its peak: each append
# reallocates the stored vectors (FAISS) or concatenates the blocks copied (torch), and the
# old copy lives until the new one is filled.
BUILD_PEAK = 2.0
# Share of a GPU's free memory an index may take at its peak: the rest is FAISS's and
# torch's scratch space.
GPU_SHARE = 0.8
# Rows copied into an index per step: a memory-mapped table is never copied whole.
ADD_ROWS = 1 << 16
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
    """Threads of NumPy's BLAS, FAISS and torch in this process (CPU workers share the
    machine's cores: each BLAS would start a thread per core). torch is only told where it
    is loaded (a model ran, or the torch search backend runs, see `threaded_torch`):
    importing it takes seconds that a run on precomputed embeddings saves."""
    from threadpoolctl import threadpool_limits

    _threads[:] = [threads]
    threadpool_limits(threads, user_api="blas")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)


def threaded_torch() -> Any:
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


class ExactIndex:
    """What every exact index shares: a search reaches every row, and the farthest rows
    of a diverse list are searched in the index itself."""

    exact = True
    ntotal: int

    def reach(self, xq: np.ndarray) -> np.ndarray:
        return np.full(len(xq), self.ntotal)

    @property
    def far(self) -> SearchIndex:
        return self


class ChunkedFlatIP(ExactIndex):
    """Exact search on the host, a block of rows at a time, over any array (a memory map
    is read block by block and never copied whole)."""

    kind = "chunked-cpu"

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


class MappedFlatIP(ExactIndex):
    """Exact search straight over an array's rows (a part of a memory-mapped table):
    nothing is copied or kept, and ties at the cut go to the lowest row, so that parts
    searched one by one merge into exactly the whole table's order (see `hnm.parts`).

    With FAISS, `faiss.knn` over the rows where they lie, asked for one more result: where
    the last wanted score is above the next one the set is certain and only its order is
    fixed; a query whose cut falls inside a run of equal scores (duplicate rows) is
    searched again a block of rows at a time with NumPy, ties by row."""

    kind = "mapped-cpu"

    def __init__(self, xb: np.ndarray) -> None:
        self.xb = xb
        self.ntotal = xb.shape[0]
        self.eps = search_eps(xb.shape[1])

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        kk = min(k, self.ntotal)
        rows = self.xb
        if kk == 0 or not len(xq) or not faiss_available() or rows.dtype != np.float32 \
                or not rows.flags.c_contiguous:
            return self._blocks(xq, k)
        import faiss

        k1 = min(kk + 1, self.ntotal)
        D, I = faiss.knn(xq, np.asarray(rows), k1, metric=faiss.METRIC_INNER_PRODUCT)
        clear = D[:, kk - 1] > D[:, kk] if k1 > kk else np.ones(len(xq), bool)
        D, I = merge_by_row(D[:, :0], I[:, :0], D[:, :kk], I[:, :kk], kk)
        if not clear.all():
            D[~clear], I[~clear] = self._blocks(xq[~clear], kk)
        return _pad(D, I, k)

    def _blocks(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The search a block of rows at a time (NumPy), ties at every cut by row."""
        kk = min(k, self.ntotal)
        D = np.zeros((len(xq), 0), np.float32)
        I = np.zeros((len(xq), 0), np.int64)
        # a block's scores and the masks of its selection: ~12 bytes per (query, row)
        block = max(kk, SCORE_BYTES // (12 * max(1, len(xq))))
        for s in range(0, self.ntotal, block):
            S = xq @ np.asarray(self.xb[s:s + block], dtype=np.float32).T  # (nq, b)
            cols = top_by_row(S, kk)
            D, I = merge_by_row(D, I, np.take_along_axis(S, cols, 1), s + cols, kk)
        return _pad(D, I, k)


def top_by_row(scores: np.ndarray, k: int) -> np.ndarray:
    """(nq, min(k, b)) columns of the k highest scores of each row of `scores` (nq, b), ties to
    the lowest column, ascending."""
    if scores.shape[1] <= k:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    if k <= 0:
        return np.zeros((len(scores), 0), np.int64)
    cut = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]  # each query's k-th score
    chosen = scores >= cut
    over = np.flatnonzero(chosen.sum(axis=1) > k)  # ties at the cut: the lowest columns
    if len(over):
        tied = scores[over] == cut[over]
        need = k - (scores[over] > cut[over]).sum(axis=1, keepdims=True)
        chosen[over] = (scores[over] > cut[over]) | (tied & (np.cumsum(tied, axis=1) <= need))
    return np.nonzero(chosen)[1].reshape(len(scores), k)


def merge_by_row(D: np.ndarray, I: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (nq, .) sets of scores and rows, best first, ties by row; row -1
    (a missing result, score -inf) after every row."""
    allD, allI = np.concatenate([D, D2], axis=1), np.concatenate([I, I2], axis=1)
    if allD.dtype == np.float32 and (not allI.size or allI.max() < MISSING_ROW):
        keys = order_keys(allD, allI)
        top = np.argpartition(keys, k - 1, axis=1)[:, :k] if keys.shape[1] > k \
            else np.broadcast_to(np.arange(keys.shape[1]), keys.shape)
        order = np.take_along_axis(top, np.argsort(np.take_along_axis(keys, top, 1), axis=1), 1)
    else:  # scores finer than float32, or rows past what a key numbers
        order = np.lexsort((np.where(allI < 0, np.iinfo(np.int64).max, allI), -allD),
                           axis=1)[:, :k]
    return np.take_along_axis(allD, order, 1), np.take_along_axis(allI, order, 1)


# The row a missing result (-1) takes in `order_keys`: after every row a key can number.
MISSING_ROW = (1 << 32) - 1


def order_keys(D: np.ndarray, I: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is the order of (float32 score descending, row
    ascending, -1 last): the score's bits made monotonic (-0.0 counted as 0.0) above the row,
    so that one partition and one sort of the k kept replace a lexsort of everything."""
    bits = (np.asarray(D, np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    rising = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ascends with the score
    falling = ((1 << 31) - 1 - rising).astype(np.uint64)  # 0 .. 2^32 - 1, best first
    rows = np.where(I < 0, MISSING_ROW, I).astype(np.uint64)
    return (falling << np.uint64(32)) | rows


def _best(D: np.ndarray, I: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two (nq, .) sets of scores and rows."""
    allD, allI = np.concatenate([D, D2], axis=1), np.concatenate([I, I2], axis=1)
    top = np.argpartition(-allD, k - 1, axis=1)[:, :k]
    return np.take_along_axis(allD, top, 1), np.take_along_axis(allI, top, 1)


def _sorted(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-D, axis=1, kind="stable")
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


class FaissFlatIP(ExactIndex):
    """faiss.IndexFlatIP on the host, or on a GPU (float16 storage where asked).

    A GPU refuses k > GPU_MAX_K: such searches (anchors among thousands of near-duplicates)
    go to `wide`, an exact search on the host, instead. `max_k` is that limit.
    """

    def __init__(self, xb: np.ndarray, gpu: int | None = None, float16: bool = False,
                 max_k: int | None = None) -> None:
        import faiss

        index = faiss.IndexFlatIP(xb.shape[1])
        if gpu is not None:
            options = faiss.GpuClonerOptions()
            options.useFloat16 = float16
            index = faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, index, options)
        for s in range(0, xb.shape[0], ADD_ROWS):
            index.add(np.ascontiguousarray(xb[s:s + ADD_ROWS], dtype=np.float32))
        self.index = index
        self.ntotal = xb.shape[0]
        self.eps = search_eps(xb.shape[1], float16)
        self.max_k = max_k if max_k is not None else GPU_MAX_K if gpu is not None else None
        self.wide = ChunkedFlatIP(xb)
        self.kind = "faiss-gpu" + ("-fp16" if float16 else "") if gpu is not None \
            else "faiss-cpu"

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # FAISS on a GPU refuses any k above its limit, even past ntotal: it is asked for
        # at most the rows it holds, and the rest is padded
        kk = min(k, self.ntotal)
        if self.max_k is not None and kk > self.max_k:
            return self.wide.search(xq, k)
        D, I = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), kk)  # (nq, kk)
        return _pad(D, I.astype(np.int64), k)


class TorchFlatIP(ExactIndex):
    """Exact k-NN with a matrix product and top-k, for devices without faiss-gpu.

    Queries go through in chunks whose score block stays within SCORE_BYTES whatever N
    is; rows stored in float16 are converted to float32 a block at a time.
    """

    def __init__(self, xb: np.ndarray, device: Any = "cpu", float16: bool = False) -> None:
        torch = threaded_torch()
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


def _torch_best(D: Any, I: Any, D2: Any, I2: Any, k: int) -> tuple[Any, Any]:
    """The k best of two (nq, .) tensors of scores and rows, best first."""
    import torch

    allD, allI = torch.cat([D, D2], 1), torch.cat([I, I2], 1)
    best, at = torch.topk(allD, min(k, allD.shape[1]), dim=1)
    return best, torch.gather(allI, 1, at)


def gpu_free_bytes(device: str) -> int:
    """Free memory of a GPU as the driver counts it, after this process gives back what it
    no longer uses: unreferenced objects collected, torch's cache of freed blocks emptied
    (memory torch keeps cached is free to torch, not to FAISS)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def placement(nbytes: float, device: str, free: int | None = None,
              share: float = GPU_SHARE, peak: float = BUILD_PEAK) -> tuple[str, bool] | None:
    """Where an index of `nbytes` (float32) lives: (device, float16?). On a GPU: float32
    if its build peak (`peak` times the table) fits in `share` of the free memory, else
    float16 if that fits, else None."""
    if not device.startswith("cuda"):
        return device, False
    free = gpu_free_bytes(device) if free is None else free
    if peak * nbytes <= share * free:
        return device, False
    if peak * nbytes / 2 <= share * free:
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
