"""Pure, vectorised candidate generation: arrays in, arrays out, no I/O.

Similarities are exact float64 dot products of grid-snapped embeddings (see
`encoders.finalize`); FAISS only proposes rows, and a row list is widened until the
exact order is certain, so the results never depend on the search kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hnm.index import FlatIndex

# FAISS computes in float32: its scores are within this of the exact ones.
SEARCH_EPS = 1e-4
# Extra rows asked of each search beyond the k that is needed. The exact order at the cut is
# certain only when the k-th exact score clears the last proposal by SEARCH_EPS; a few
# spare rows make that the common case (a second, wider search is then rare) while adding
# little to a k_nn of 30-100.
MARGIN = 16
# Each wider search asks this many times more rows: the searches' total cost stays within
# GROWTH / (GROWTH - 1) of the last one, and an anchor needs only a few rounds.
GROWTH = 4
# Bytes of float32 rows gathered per chunk when rescoring.
CHUNK_BYTES = 1 << 20  # cache-sized: larger temporaries were measured slower


def threshold_steps(tau: float) -> tuple[float, float, float]:
    """SPEC §5: the three text-similarity thresholds tried in order."""
    return (tau, tau + 0.09, tau + 0.18)


def exact_dots(xa: np.ndarray, ra: np.ndarray, xb: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Exact dots of xa[ra[i]] with xb[rb[i, j]]: ra (B,), rb (B, k) -> (B, k) float64."""
    out = np.empty(rb.shape, dtype=np.float64)
    step = max(1, CHUNK_BYTES // max(1, rb.shape[1] * xb.shape[1] * 4))
    for s in range(0, len(ra), step):
        q = np.asarray(xa[ra[s:s + step]])  # (b, d)
        g = np.asarray(xb[rb[s:s + step]])  # (b, k, d)
        # float32 operands, float64 accumulation: exact on the grid, half the memory traffic
        out[s:s + step] = np.einsum("bkd,bd->bk", g, q, dtype=np.float64)
    return out


class Cands(NamedTuple):
    """One anchor's candidate rows with their exact similarities."""

    rows: np.ndarray
    vis: np.ndarray
    txt: np.ndarray


@dataclass
class Ragged:
    """Per-anchor lists in one flat array: list i is rows[offsets[i]:offsets[i+1]]."""

    offsets: np.ndarray
    rows: np.ndarray
    vis: np.ndarray
    txt: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int) -> Cands:
        s, e = self.offsets[i], self.offsets[i + 1]
        return Cands(self.rows[s:e], self.vis[s:e], self.txt[s:e])

    def window(self, a0: int, a1: int) -> Ragged:
        """Lists a0..a1-1 as lists 0..; the flat arrays are shared, not copied."""
        return Ragged(self.offsets[a0:a1 + 1], self.rows, self.vis, self.txt)

    @classmethod
    def empty(cls, n: int) -> Ragged:
        """n empty lists."""
        z = np.zeros(0)
        return cls(np.zeros(n + 1, np.int64), z.astype(np.int64), z, z)

    @classmethod
    def concat(cls, parts: list[Ragged]) -> Ragged:
        """Consecutive anchors' lists as one (each part's offsets may start anywhere)."""
        counts = [np.diff(p.offsets) for p in parts]
        offsets = np.zeros(sum(map(len, counts)) + 1, np.int64)
        if counts:
            np.cumsum(np.concatenate(counts), out=offsets[1:])
        flat = [[getattr(p, k)[p.offsets[0]:p.offsets[-1]] for p in parts]
                for k in ("rows", "vis", "txt")]
        rows, vis, txt = (np.concatenate(f) if f else np.zeros(0) for f in flat)
        return cls(offsets, rows.astype(np.int64), vis, txt)


def _ragged(keep: np.ndarray, rows: np.ndarray, vis: np.ndarray, txt: np.ndarray) -> Ragged:
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=offsets[1:])
    return Ragged(offsets, rows[keep], vis[keep], txt[keep])


def scatter(sub: Ragged, where: np.ndarray) -> Ragged:
    """The lists of `sub` at the True positions of `where`, empty lists elsewhere."""
    counts = np.zeros(len(where), dtype=np.int64)
    counts[where] = np.diff(sub.offsets)
    offsets = np.zeros(len(where) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Ragged(offsets, sub.rows, sub.vis, sub.txt)


def _sorted_exact(V: np.ndarray, anchors: np.ndarray, I: np.ndarray, sign: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Rescore (B, k) proposals exactly; sort by (sign * vis desc, row asc)."""
    vis = exact_dots(V, anchors, V, I)
    order = np.lexsort((I, -sign * vis), axis=1)
    return np.take_along_axis(I, order, 1), np.take_along_axis(vis, order, 1)


def nearest(index: FlatIndex, V: np.ndarray, anchors: np.ndarray, k_nn: int, floor: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §5 N(a): the k_nn nearest rows by exact vis, self excluded, ties by row.

    Returns (B, k) rows and vis, padded with -1 / -inf; entries below `floor` are
    dropped (the hard scan stops there anyway). Rows whose exact order at the cut is
    not certain from the proposals are searched again, wider.
    """
    n = index.ntotal
    k_nn = min(k_nn, n - 1)
    out_rows = np.full((len(anchors), max(k_nn, 1)), -1, dtype=np.int64)
    out_vis = np.full(out_rows.shape, -np.inf)
    todo = np.arange(len(anchors))
    k = min(n, k_nn + 1 + MARGIN)
    while len(todo):
        _, I = index.search(V[anchors[todo]], k)
        I, vis = _sorted_exact(V, anchors[todo], I.astype(np.int64), 1.0)
        notself = anchors[todo, None] != I
        rank = np.cumsum(notself, axis=1) - 1
        take = notself & (rank < k_nn) & (vis >= floor)
        # unseen rows score at most the last proposal (+ search error)
        bound = vis[:, -1] + SEARCH_EPS
        kth = np.where(notself.sum(1) >= k_nn, _kth(vis, notself, k_nn), -np.inf)
        certain = (k == n) | (bound < floor) | (kth > bound)
        r, c = np.nonzero(take & certain[:, None])
        slot = (np.cumsum(take, axis=1) - 1)[r, c]
        out_rows[todo[r], slot] = I[r, c]
        out_vis[todo[r], slot] = vis[r, c]
        todo = todo[~certain]
        k = min(n, k * GROWTH)
    return out_rows, out_vis


def _kth(vis: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Value of the k-th masked entry of each row (rows have at least k)."""
    rank = np.cumsum(mask, axis=1)
    pos = np.argmax(mask & (rank == k), axis=1)
    return vis[np.arange(len(vis)), pos]


@dataclass(frozen=True)
class Tables:
    """Per-row facts every anchor's search needs (all arrays indexed by row)."""

    V: np.ndarray  # (N, dv) visual embeddings, grid-snapped float32
    T: np.ndarray  # (U, dt) text embeddings per distinct phrase
    text_ids: np.ndarray  # (N,)
    groups: np.ndarray  # (N,)
    eligible: np.ndarray  # (N,) bool, SPEC §3
    clusters: np.ndarray  # (N,)


def hard_candidates(index: FlatIndex, tab: Tables, anchors: np.ndarray, k_nn: int,
                    min_vis: float, tau: float) -> Ragged:
    """Per anchor, in N(a) order: rows that can ever pass SPEC §5, with vis and txt."""
    rows, vis = nearest(index, tab.V, anchors, k_nn, min_vis)
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    keep = valid & tab.eligible[safe] & (tab.groups[safe] != tab.groups[anchors, None])
    txt = np.full(rows.shape, np.inf)
    a_sub, k_sub = np.nonzero(keep)
    if len(a_sub):
        txt[a_sub, k_sub] = text_sims(tab, anchors[a_sub], rows[a_sub, k_sub])
    keep &= txt < threshold_steps(tau)[-1]
    return _ragged(keep, rows, vis, txt)


def text_sims(tab: Tables, a: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact txt(a, j) for pairs of rows (P,) -> (P,) float64."""
    out = np.empty(len(a), dtype=np.float64)
    step = max(1, CHUNK_BYTES // (tab.T.shape[1] * 4))
    for s in range(0, len(a), step):
        ta = np.asarray(tab.T[tab.text_ids[a[s:s + step]]])  # (p, d)
        tj = np.asarray(tab.T[tab.text_ids[j[s:s + step]]])  # (p, d)
        out[s:s + step] = np.einsum("pd,pd->p", ta, tj, dtype=np.float64)
    return out


def farthest(index: FlatIndex, eligible_rows: np.ndarray, tab: Tables, anchors: np.ndarray,
             size: int) -> tuple[Ragged, np.ndarray]:
    """SPEC §6 candidates: lowest-vis rows of other groups, ascending (vis, row).

    `index` holds V[eligible_rows]; `size` rows are wanted per anchor. Returns each
    anchor's certain prefix and whether that prefix covers every eligible row.
    """
    n = index.ntotal
    k = min(n, size + MARGIN)
    _, I = index.search(-np.asarray(tab.V[anchors]), k)
    I, vis = _sorted_exact(tab.V, anchors, eligible_rows[I.astype(np.int64)], -1.0)
    complete = np.full(len(anchors), k == n)
    # unseen rows score at least the highest proposal (- search error)
    certain = complete[:, None] | (vis < vis[:, -1:] - SEARCH_EPS)
    keep = certain & (tab.groups[I] != tab.groups[anchors, None]) & (anchors[:, None] != I)
    # no text condition here (SPEC §6): txt is computed for the chosen row only
    return _ragged(keep, I, vis, np.full(I.shape, np.nan)), complete


def eligible_phrases(T: np.ndarray, phrases: list[str], blacklist: np.ndarray | None,
                     min_length: int, max_similarity: float) -> np.ndarray:
    """SPEC §3 per distinct phrase: long enough and not close to any blacklist phrase."""
    long_enough = np.array([len(p) >= min_length for p in phrases], dtype=bool)
    if blacklist is None or len(blacklist) == 0:
        return long_enough
    sims = np.asarray(T, dtype=np.float64) @ np.asarray(blacklist, dtype=np.float64).T
    return long_enough & (sims.max(axis=1) <= max_similarity)
