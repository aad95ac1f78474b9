"""The search index in parts: the rows split into consecutive parts, each with its own index
(an exact search over its slice of the table, or its own IVF lists), opened one at a time
for every search and merged exactly.

A process holds at most one part's index at a time (plus the merged lists), so its memory
for the index is one part's, whatever N is. The merged proposals are each part's best,
offset to the table's rows, ranked by score with ties to the lowest row: for exact parts
they are exactly the whole table's (`index.MappedFlatIP` breaks ties by row within a part).
What `miner.exact_prefix` needs of an index holds over the parts: a row no part proposed
scores at most the lowest proposal + `eps` (every part's bound, and each part was asked
for as many rows as the merge keeps), and `reach` is the sum of the parts' reaches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hnm.index import SearchIndex, merge_by_row

# Rows of a part when --index-parts is left to the run: a part's IVF lists (d=512) are then
# about 0.25 GB, built, held and searched one at a time (the tables phase builds one part's
# lists in memory); below it the index is one part.
PART_ROWS = 1 << 17


def index_parts(requested: int | None, rows: int) -> int:
    """The parts a run's index is cut into: `requested` (--index-parts), else one per
    PART_ROWS rows; never more parts than rows."""
    wanted = requested if requested is not None else -(-rows // PART_ROWS)
    return max(1, min(wanted, rows))


# Opens part p (0-based) as an index over its rows 0..size-1 (its own numbering).
Opener = Callable[[int], SearchIndex]


def part_edges(rows: int, parts: int) -> np.ndarray:
    """(P + 1,) edges of an even split of `rows` rows into `parts` parts (at most one a
    row): part p holds rows edges[p]..edges[p+1]-1, the sizes differ by one at most."""
    parts = max(1, min(parts, rows))
    return np.arange(parts + 1, dtype=np.int64) * rows // parts


class PartedIndex:
    """A `SearchIndex` over every row, made of the indexes of consecutive parts.

    `open_part(p)` builds (or memory-maps) part p's index; it is asked again for every
    search and released before the next part is opened. The first part is opened once
    here to learn the kind, the error bound and whether the parts are exact.
    """

    def __init__(self, edges: np.ndarray, open_part: Opener, far: Opener | None = None
                 ) -> None:
        self.edges = np.asarray(edges, np.int64)
        self.open_part = open_part
        self.ntotal = int(self.edges[-1])
        first = open_part(0)
        self.exact = bool(first.exact)
        self.eps = float(first.eps)
        self.kind = f"{first.kind}/{self.parts} parts"
        if hasattr(first, "batch"):  # queries per search the parts' kind asks for
            self.batch = int(first.batch)
        if hasattr(first, "rerank"):  # compressed codes: proposals per row wanted
            self.rerank = int(first.rerank)
        # IVF parts trained once share their centroids: a query's lists are chosen once
        self._coarse = first.coarse() if hasattr(first, "coarse") else None
        far_is_self = first.far is first
        del first
        self._far: PartedIndex | None = None
        if not far_is_self:
            self._far = PartedIndex(self.edges, far or (lambda p: open_part(p).far))

    @property
    def parts(self) -> int:
        return len(self.edges) - 1

    @property
    def far(self) -> SearchIndex:
        return self._far or self

    def sizes(self) -> np.ndarray:
        return np.diff(self.edges)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best proposals of all parts, best first, ties by row (-1 / -inf past the
        rows there are)."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        D = np.full((len(xq), k), -np.inf, np.float32)
        I = np.full((len(xq), k), -1, np.int64)
        probes = self._coarse.probes(xq) if self._coarse is not None else None
        for p, (start, stop) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            kk = min(k, int(stop - start))
            part = self.open_part(p)
            Dp, Ip = part.search(xq, kk, probes=probes) if self._shares(part) \
                else part.search(xq, kk)
            self.eps = max(self.eps, float(part.eps))
            del part  # released before the next part is opened
            Dp, Ip = Dp[:, :kk].astype(np.float32), Ip[:, :kk]
            D, I = merge_by_row(D, I, Dp, np.where(Ip >= 0, Ip + start, -1), k)
        return D, I

    def reach(self, xq: np.ndarray) -> np.ndarray:
        """How many rows a search of each query can return: the sum over the parts."""
        if self.exact:
            return np.full(len(xq), self.ntotal)
        total = np.zeros(len(xq), np.int64)
        probes = self._coarse.probes(xq) if self._coarse is not None else None
        for p in range(self.parts):
            part = self.open_part(p)
            reach = part.reach(xq, probes) if self._shares(part) else part.reach(xq)
            total += np.asarray(reach, np.int64)
            del part
        return total

    def _shares(self, part: SearchIndex) -> bool:
        """Whether `part` probes the lists the first part's centroids choose."""
        return self._coarse is not None and self._coarse.same_probes(part)
