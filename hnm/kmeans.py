"""Seeded spherical k-means, one implementation whatever is installed: the clusters a
diverse negative is drawn from."""

from __future__ import annotations

import numpy as np

from hnm.scratch import scratch_array

# k-means trains on every row up to this many, on a seeded sample of this many above:
# clusters only need to be coarse ("elsewhere in the visual space"), and a sample keeps
# training time and memory flat in N.
KMEANS_SAMPLE = 100_000
LABEL_BLOCK = 1 << 13  # rows labelled per step: the block in float64 (32 MiB at d=512)


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
        centroids = _lloyd(x, sample_rows(len(x), KMEANS_SAMPLE, seed), k, seed, niter)
    labels = scratch_array(len(x), np.int64)  # a label a row: not the process's own pages
    exact = centroids.astype(np.float64)
    for s in range(0, len(x), LABEL_BLOCK):
        labels[s:s + LABEL_BLOCK] = _nearest(x[s:s + LABEL_BLOCK], exact)
    return labels, centroids


def _nearest(block: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) index of the highest-scoring float64 centroid of each row (lowest on ties)."""
    return (np.asarray(block, np.float64) @ centroids.T).argmax(axis=1).astype(np.int64)


def _block_mean(x: np.ndarray) -> np.ndarray:
    total = sum(np.asarray(x[s:s + LABEL_BLOCK], np.float64).sum(axis=0)
                for s in range(0, len(x), LABEL_BLOCK))
    return (total / len(x)).astype(np.float32)[None, :]


def _lloyd(x: np.ndarray, rows: np.ndarray | None, k: int, seed: int, niter: int
           ) -> np.ndarray:
    """Spherical Lloyd iterations over x's `rows` (None: every row; `seeded_sample`'s
    rows) from k seeded distinct ones (float32 products, as FAISS's k-means does; the
    final labels are float64, see `kmeans`); a centroid that loses every member keeps its
    place. Members are summed in float64, a block of rows at a time (grouped by label).
    The sample is never held whole: each block is read from x (a memory map) when it is
    used, so memory stays at one block whatever the sample size."""
    n = len(x) if rows is None else len(rows)

    def sample(s: int, e: int) -> np.ndarray:
        return np.asarray(x[s:e] if rows is None else x[rows[s:e]], np.float32)

    rng = np.random.default_rng(seed)
    first = rng.choice(n, size=k, replace=False)
    centroids = np.asarray(x[first] if rows is None else x[rows[first]], np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    for _ in range(niter):
        sums = np.zeros(centroids.shape, np.float64)
        for s in range(0, n, LABEL_BLOCK):
            block = sample(s, s + LABEL_BLOCK)
            labels = (block @ centroids.T).argmax(axis=1)
            order = np.argsort(labels, kind="stable")
            ends = np.cumsum(np.bincount(labels, minlength=k))
            for c, (a, b) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
                if b > a:  # the cluster's rows in block order, summed as one array
                    sums[c] += block[order[a:b]].sum(axis=0, dtype=np.float64)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        moved = norms[:, 0] > 0
        centroids[moved] = sums[moved] / norms[moved]
    return centroids


def sample_rows(n: int, size: int, seed: int) -> np.ndarray | None:
    """The rows of a seeded sample of `size` of n, ascending (None: every row, when there
    are no more)."""
    if n <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def seeded_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of rows in row order (every row when there are no more), float32,
    in a scratch array (`hnm.scratch`: IVF's training sample grows with its lists)."""
    rows = sample_rows(x.shape[0], size, seed)
    n = x.shape[0] if rows is None else len(rows)
    out = scratch_array(n * x.shape[1], np.float32).reshape(n, x.shape[1])
    for s in range(0, n, LABEL_BLOCK):
        out[s:s + LABEL_BLOCK] = x[s:s + LABEL_BLOCK] if rows is None else \
            x[rows[s:s + LABEL_BLOCK]]
    return out
