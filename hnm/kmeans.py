"""Seeded spherical k-means, one implementation whatever is installed: the clusters a
diverse negative is drawn from."""

from __future__ import annotations

import numpy as np

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
        centroids = _lloyd(seeded_sample(x, KMEANS_SAMPLE, seed), k, seed, niter)
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


def seeded_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of rows in row order (every row when there are no more)."""
    if x.shape[0] <= size:
        return np.asarray(x, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size, replace=False))
    return np.asarray(x[rows], dtype=np.float32)
