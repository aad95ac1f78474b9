"""Pure, vectorised candidate generation: arrays in, arrays out, no I/O.

Similarities are exact float64 dot products of grid-snapped embeddings (see
`grid.finalize`); an index (exact, or IVF over the lists it probes) only proposes
rows, and a row list is widened until the exact order is certain, so the results never
depend on the search kernel, the device or the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hnm.index import SearchIndex

# Which proposals count (anchors (B,), rows (B, k) -> (B, k) bool): not self; eligible...
Keep = Callable[[np.ndarray, np.ndarray], np.ndarray]
# Extra rows asked of each search beyond the k that is needed. The exact order at the cut is
# certain only when the k-th exact score clears the last proposal by the index's eps; a few
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


def dots_with(V: np.ndarray, a: int, rows: np.ndarray) -> np.ndarray:
    """Exact vis(a, j) of one row with many: (F,) float64, a chunk of rows at a time."""
    q = np.asarray(V[a])
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, CHUNK_BYTES // (4 * V.shape[1]))
    for s in range(0, len(rows), step):
        out[s:s + step] = np.einsum("kd,d->k", np.asarray(V[rows[s:s + step]]), q,
                                    dtype=np.float64)
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


def exact_prefix(index: SearchIndex, V: np.ndarray, anchors: np.ndarray, want: int,
                 sign: float, keep: Keep, floor: float = -np.inf, kept_share: float = 1.0,
                 fill: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per anchor, the first `want` kept rows in exact order, among the rows `index` can
    return for it: by descending vis (sign +1) or ascending vis (sign -1), ties by row.

    The index proposes rows for the query sign * v_a; they are rescored exactly, and an
    anchor is searched again, wider, until its order at the cut is certain: a row the
    index did not propose scores at most the last proposal (+ the index's eps). Rows whose
    signed vis is below `floor` are dropped, and none below it is waited for. `kept_share`:
    about which share of the rows `keep` admits (the first search asks for more when few).
    fill=False: one search, and whatever prefix of the order it makes certain (up to
    `want` rows) — enough where the caller can search past a short list exactly.
    An index whose scores carry no bound (infinite eps: compressed codes) is searched once
    for `index.rerank` times the rows: the result is the exact order among its proposals.
    Returns (B, want) rows and vis (row -1 where fewer), and whether each anchor's rows
    are every kept row of the table.
    """
    out_rows = np.full((len(anchors), max(want, 1)), -1, dtype=np.int64)
    out_vis = np.full(out_rows.shape, -np.inf * sign)
    complete = np.zeros(len(anchors), bool)
    todo = np.arange(len(anchors))
    k = min(index.ntotal, int(np.ceil((want + 1) / max(kept_share, 0.01))) + MARGIN)
    approximate = not np.isfinite(index.eps)  # proposals only: the rescored ones are final
    if approximate:
        k = min(index.ntotal, k * getattr(index, "rerank", 1))
    while len(todo):
        q = sign * np.asarray(V[anchors[todo]], dtype=np.float32)
        reach = index.reach(q)
        D, I = index.search(q, k)
        valid = I >= 0
        I = np.where(valid, I, 0)
        w = np.where(valid, sign * exact_dots(V, anchors[todo], V, I), -np.inf)  # signed vis
        order = np.lexsort((I, -w), axis=1)
        I, w, valid = (np.take_along_axis(x, order, 1) for x in (I, w, valid))
        seen_all = k >= reach
        # unseen rows score at most the lowest proposal's score, + the index's error
        last = np.take_along_axis(D, np.maximum(valid.sum(1) - 1, 0)[:, None], 1)[:, 0]
        bound = np.full(len(todo), -np.inf) if approximate else \
            np.where(seen_all, -np.inf, last + index.eps)
        kept = valid & keep(anchors[todo], I) & (w >= floor)
        certain = kept & (w > bound[:, None])
        done = seen_all | (bound < floor) | (certain.sum(1) >= want) | (not fill) | approximate
        r, c = np.nonzero(certain & done[:, None] & (np.cumsum(certain, axis=1) <= want))
        slot = (np.cumsum(certain, axis=1) - 1)[r, c]
        out_rows[todo[r], slot] = I[r, c]
        out_vis[todo[r], slot] = sign * w[r, c]
        whole = seen_all & (reach == index.ntotal) & (kept.sum(1) <= want)  # every kept row
        complete[todo[done]] = whole[done]
        todo = todo[~done]
        k = min(index.ntotal, k * GROWTH)
    return out_rows, out_vis, complete


def nearest(index: SearchIndex, V: np.ndarray, anchors: np.ndarray, k_nn: int, floor: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §5 N(a): the k_nn nearest rows by exact vis, self excluded, ties by row, among
    the rows `index` can return (all of them for an exact index).

    Returns (B, k) rows and vis, padded with -1 / -inf; entries below `floor` are
    dropped (the hard scan stops there anyway).
    """
    k_nn = min(k_nn, index.ntotal - 1)
    rows, vis, _ = exact_prefix(index, V, anchors, k_nn, 1.0,
                                lambda a, I: a[:, None] != I, floor)
    return rows, vis


@dataclass(frozen=True)
class Arrays:
    """Per-row facts every anchor's search needs (all arrays indexed by row)."""

    V: np.ndarray  # (N, dv) visual embeddings, grid-snapped float32
    T: np.ndarray  # (U, dt) text embeddings per distinct phrase
    text_ids: np.ndarray  # (N,)
    groups: np.ndarray  # (N,)
    eligible: np.ndarray  # (N,) bool, SPEC §3
    clusters: np.ndarray  # (N,)
    # (U, dv) per distinct phrase, in V's space (a joint image-text model's texts), or None
    # without a joint space: cross(a, j) = V[a] . C[text_ids[j]]
    C: np.ndarray | None = None


@dataclass(frozen=True)
class CrossRule:
    """The positive-aware rule: candidate j is no negative of anchor a when its text scores
    with a's image above `ratio` times a's own image-caption score, or within `margin` of
    it. Off (both None) without a joint space."""

    ratio: float | None = None
    margin: float | None = None

    @property
    def on(self) -> bool:
        return self.ratio is not None or self.margin is not None

    def rejects(self, cross: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Which (cross, own) pairs the rule removes (broadcast)."""
        out = np.zeros(np.broadcast(cross, own).shape, bool)
        if self.ratio is not None:
            out |= cross > self.ratio * own
        if self.margin is not None:
            out |= cross > own - self.margin
        return out


def cross_sims(tab: Arrays, a: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact cross(a, j) = V[a] . C[text_ids[j]] for pairs of rows (P,) -> (P,) float64."""
    out = np.empty(len(a), dtype=np.float64)
    step = max(1, CHUNK_BYTES // (tab.V.shape[1] * 4))
    for s in range(0, len(a), step):
        va = np.asarray(tab.V[a[s:s + step]])
        cj = np.asarray(tab.C[tab.text_ids[j[s:s + step]]])
        out[s:s + step] = np.einsum("pd,pd->p", va, cj, dtype=np.float64)
    return out


def own_scores(tab: Arrays, a: np.ndarray) -> np.ndarray:
    """Each anchor's own image-caption score cross(a, a) (P,) float64."""
    return cross_sims(tab, a, a)


# SPEC §5's rules that do not depend on the phrase state, in the order they apply: a
# neighbour of N(a) below min_visual_similarity, of a's group, not eligible, whose text
# is too similar at every threshold step, or whose text scores with a's image about as well
# as a's own caption (CrossRule) can never be a's hard negative.
FIXED_RULES = ("min_visual", "same_group", "ineligible", "text_similar", "cross_score")
SAME_GROUP, INELIGIBLE, OPEN = 1, 2, 0  # Neighbours.code


@dataclass
class Neighbours:
    """N(a) above a visual floor, per anchor (B, k), with each row's fixed-rule code
    (OPEN, SAME_GROUP or INELIGIBLE) and txt for the OPEN ones (inf elsewhere); `size`:
    how many rows N(a) holds, those below the floor included. With a joint space, cross
    for the OPEN rows (nan elsewhere) and each anchor's own score; else None."""

    rows: np.ndarray
    vis: np.ndarray
    txt: np.ndarray
    code: np.ndarray
    size: np.ndarray
    cross: np.ndarray | None = None
    own: np.ndarray | None = None


def neighbours(index: SearchIndex, tab: Arrays, anchors: np.ndarray, k_nn: int,
               floor: float) -> Neighbours:
    """SPEC §5 N(a) down to `floor`, with what the fixed rules say of each row."""
    rows, vis = nearest(index, tab.V, anchors, k_nn, floor)
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    same = tab.groups[safe] == tab.groups[anchors, None]
    code = np.where(same, SAME_GROUP, np.where(tab.eligible[safe], OPEN, INELIGIBLE))
    code = np.where(valid, code, -1).astype(np.int8)
    txt = np.full(rows.shape, np.inf)
    a_sub, k_sub = np.nonzero(code == OPEN)
    if len(a_sub):
        txt[a_sub, k_sub] = text_sims(tab, anchors[a_sub], rows[a_sub, k_sub])
    size = np.full(len(anchors), min(k_nn, max(index.ntotal - 1, 0)), np.int64)
    if tab.C is None:
        return Neighbours(rows, vis, txt, code, size)
    cross = np.full(rows.shape, np.nan)
    if len(a_sub):
        cross[a_sub, k_sub] = cross_sims(tab, anchors[a_sub], rows[a_sub, k_sub])
    return Neighbours(rows, vis, txt, code, size, cross, own_scores(tab, anchors))


@dataclass
class HardLists:
    """What the hard scan can use of N(a): the rows that pass every fixed rule (`lists`,
    in N(a) order), for each of them how many rows before it each fixed rule removed
    (`before`, (E, 4): same_group, ineligible, text_similar, cross_score), and per anchor how many
    rows of N(a) each fixed rule removed (`fixed`, (B, 5): FIXED_RULES)."""

    lists: Ragged
    before: np.ndarray
    fixed: np.ndarray


def cut(nb: Neighbours, tau: float, min_vis: float, rule: CrossRule = CrossRule()
        ) -> HardLists:
    """The hard lists a run with (tau, min_vis, rule) uses, from neighbours found down to
    a floor at most min_vis; the fixed rules are counted from masks."""
    valid = (nb.code >= 0) & (nb.vis >= min_vis)
    masks = [valid & (nb.code == SAME_GROUP), valid & (nb.code == INELIGIBLE),
             valid & (nb.code == OPEN) & (nb.txt >= threshold_steps(tau)[-1])]
    keep = valid & (nb.code == OPEN) & ~masks[2]
    cross = np.zeros_like(keep)
    if rule.on and nb.cross is not None:
        cross = keep & rule.rejects(np.nan_to_num(nb.cross, nan=-np.inf), nb.own[:, None])
    masks.append(cross)
    keep &= ~cross
    fixed = np.stack([nb.size - valid.sum(1), *(m.sum(1) for m in masks)], axis=1)
    before = np.stack([(np.cumsum(m, 1) - m)[keep] for m in masks], axis=1)
    return HardLists(_ragged(keep, nb.rows, nb.vis, nb.txt), before.astype(np.int32),
                     fixed.astype(np.int32))


def hard_candidates(index: SearchIndex, tab: Arrays, anchors: np.ndarray, k_nn: int,
                    min_vis: float, tau: float, rule: CrossRule = CrossRule()) -> HardLists:
    """Per anchor, in N(a) order: rows that can ever pass SPEC §5, with vis and txt, and
    what the fixed rules removed."""
    return cut(neighbours(index, tab, anchors, k_nn, min_vis), tau, min_vis, rule)


def text_sims(tab: Arrays, a: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact txt(a, j) for pairs of rows (P,) -> (P,) float64."""
    out = np.empty(len(a), dtype=np.float64)
    step = max(1, CHUNK_BYTES // (tab.T.shape[1] * 4))
    for s in range(0, len(a), step):
        ta = np.asarray(tab.T[tab.text_ids[a[s:s + step]]])  # (p, d)
        tj = np.asarray(tab.T[tab.text_ids[j[s:s + step]]])  # (p, d)
        out[s:s + step] = np.einsum("pd,pd->p", ta, tj, dtype=np.float64)
    return out


def farthest(index: SearchIndex, tab: Arrays, anchors: np.ndarray, size: int
             ) -> tuple[Ragged, np.ndarray]:
    """SPEC §6 candidates: the `size` lowest-vis eligible rows of other groups, ascending
    (vis, row), among the rows `index` can return for the query -v_a.

    From an exact index a list may stop short, where one search did not make the order
    certain (the selection pass searches past it exactly); from an approximate one it holds
    `size` rows (or all it can reach), since what follows it is an exact search over every
    row, not the rest of the index's order. Returns the lists and whether each holds every
    eligible row of another group.
    """
    def keep(a: np.ndarray, I: np.ndarray) -> np.ndarray:
        return tab.eligible[I] & (tab.groups[I] != tab.groups[a][:, None])

    share = float(np.mean(tab.eligible)) if len(tab.eligible) else 1.0
    rows, vis, complete = exact_prefix(index, tab.V, anchors, size, -1.0, keep,
                                       kept_share=share, fill=not index.exact)
    # no text condition here (SPEC §6): txt is computed for the chosen row only
    return _ragged(rows >= 0, rows, vis, np.full(rows.shape, np.nan)), complete


def text_lengths(texts: Sequence[str]) -> np.ndarray:
    """Each text's length in characters: counted by the corpus column itself where the
    sequence is one (`corpus.Rows.lengths`: from its UTF-8 bytes, no string built), else
    by `len`."""
    lengths = getattr(texts, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths(), dtype=np.int64)
    return np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))


def eligible_phrases(T: np.ndarray, phrases: Sequence[str], blacklist: np.ndarray | None,
                     min_length: int, max_similarity: float) -> np.ndarray:
    """SPEC §3 per distinct phrase: long enough and not close to any blacklist phrase."""
    long_enough = text_lengths(phrases) >= min_length
    if blacklist is None or len(blacklist) == 0:
        return long_enough
    banned = np.asarray(blacklist, dtype=np.float64).T
    step = max(1, CHUNK_BYTES // (8 * T.shape[1]))  # T may be a memory map: a block at a time
    near = np.concatenate([(np.asarray(T[s:s + step], np.float64) @ banned).max(axis=1)
                           for s in range(0, len(T), step)]) if len(T) else np.zeros(0)
    return long_enough & (near <= max_similarity)
