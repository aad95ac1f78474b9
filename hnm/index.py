"""Exact inner-product search (FAISS, or torch where FAISS is absent) and seeded k-means."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class FlatIndex(Protocol):
    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) queries -> (nq, k) inner products and row numbers, best first."""


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaissFlatIP:
    """faiss.IndexFlatIP, moved to a GPU when faiss has GPU support and a device is given."""

    def __init__(self, xb: np.ndarray, gpu: int | None = None) -> None:
        import faiss

        index = faiss.IndexFlatIP(xb.shape[1])
        if gpu is not None and hasattr(faiss, "StandardGpuResources"):
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, gpu, index)
        index.add(np.ascontiguousarray(xb, dtype=np.float32))
        self.index = index
        self.ntotal = xb.shape[0]
        self.kind = "faiss-gpu" if gpu is not None and hasattr(faiss, "StandardGpuResources") \
            else "faiss-cpu"

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k)  # (nq, k)
        return D, I


class TorchFlatIP:
    """Exact k-NN with a matrix product and top-k, for devices without faiss-gpu."""

    # queries per matrix product: a (chunk, N) float32 score block, 16 kB per indexed row
    def __init__(self, xb: np.ndarray, device: Any = "cpu", chunk: int = 4096) -> None:
        import torch

        # torch wants a writable array: a memory-mapped table is copied once
        self.xb = torch.from_numpy(np.require(xb, np.float32, ["C", "W"])).to(device)
        self.ntotal = xb.shape[0]
        self.device = device
        self.chunk = chunk
        self.kind = f"torch-{torch.device(device).type}"

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if len(xq) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        Ds, Is = [], []
        for start in range(0, len(xq), self.chunk):
            q = torch.from_numpy(np.ascontiguousarray(xq[start:start + self.chunk],
                                                      dtype=np.float32)).to(self.device)
            D, I = torch.topk(q @ self.xb.T, k, dim=1)  # (nq, k)
            Ds.append(D.cpu().numpy())
            Is.append(I.cpu().numpy())
        return np.concatenate(Ds), np.concatenate(Is).astype(np.int64)


def build_index(xb: np.ndarray, device: str = "cpu") -> FlatIndex:
    """FAISS where installed (GPU build on a cuda device), else an exact torch index."""
    gpu = int(device.split(":")[1]) if device.startswith("cuda:") else None
    if faiss_available():
        import faiss

        if gpu is None or hasattr(faiss, "StandardGpuResources"):
            return FaissFlatIP(xb, gpu)
    return TorchFlatIP(xb, device)


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on all points; returns (labels (n,), centroids (k, d)).

    Labels are the float64 argmax over the centroids (ties to the lowest centroid), not
    FAISS's float32 assignment. The centroids are not on the embedding grid, so these
    dot products are not exact: a point almost equidistant from two centroids could be
    labelled differently by another BLAS, which moves it to the other cluster and nothing
    more. `niter`: clusters only need to be coarse ("elsewhere in the visual space").
    """
    k = min(k, len(x))
    if k == 1:
        centroids = x.mean(axis=0, keepdims=True).astype(np.float32)
    else:
        centroids = _train_centroids(x, k, seed, niter)
    scores = x.astype(np.float64) @ centroids.astype(np.float64).T  # (n, k)
    return scores.argmax(axis=1).astype(np.int64), centroids


def _train_centroids(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    if faiss_available():
        import faiss

        # max_points_per_centroid: train on every point, never a subsample
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True,
                          max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1,
                          verbose=False)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        return np.asarray(km.centroids, dtype=np.float32)
    return _numpy_kmeans(x, k, seed, niter)


def _numpy_kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=k, replace=False)].astype(np.float64)
    x64 = x.astype(np.float64)
    for _ in range(niter):
        labels = (x64 @ centroids.T).argmax(axis=1)
        for c in range(k):
            members = x64[labels == c]
            if len(members):
                centroids[c] = members.sum(axis=0)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float32)
