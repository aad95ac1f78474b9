"""The one place vectors are normalised, onto a grid where float64 dot products are exact."""

from __future__ import annotations

import math

import numpy as np


def finalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows, then snap them to a grid of 2^-b.

    On that grid every product of two components is exact in float64 and so is every
    sum of `dim` of them, so a float64 dot product has one exact value whatever the
    summation order: BLAS, einsum and the reference agree bit for bit, and ties are real
    ties. (FAISS scores in float32: its results are only proposals, rescored exactly.)
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    scale = grid_scale(x.shape[1])
    return (np.round(x * scale) / scale).astype(np.float32)


def grid_scale(dim: int) -> float:
    """2^b, the grid's inverse step for vectors of `dim` components."""
    bits = min(24, (53 - math.ceil(math.log2(max(2, dim)))) // 2)
    return float(2**bits)
