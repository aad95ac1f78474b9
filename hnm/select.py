"""The one deterministic, order-dependent pass: phrase reuse decides among candidates."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hnm.miner import GROWTH, Arrays, Cands, Ragged, dots_with, text_sims, threshold_steps
from hnm.scratch import scratch_array, scratch_copy

# Above this many free phrases their rows are found with one vectorised mask over the
# eligible rows instead of phrase by phrase: both cost about the same there.
FEW_PHRASES = 4096
CHUNK = 1 << 17  # rows at a time while FreeRows is built (its temporaries: ~8 MiB)
# The exact lowest-vis free row is found by scanning the free rows themselves when they
# are at most 1/BRUTE_SHARE of all rows (or BRUTE_MIN); with more, a wider search over
# every row first: gathering scattered rows costs several times more per row than the
# wider search's blocked matrix product, which is shared by a block of anchors.
BRUTE_SHARE = 32
BRUTE_MIN = 2048


def phrase_lengths(phrases: Sequence[str]) -> np.ndarray:
    """Each phrase's length in characters; a corpus store's phrases give theirs from
    their column (`lengths()`) without building a string each."""
    lengths = getattr(phrases, "lengths", None)
    if lengths is not None:
        return lengths()
    return np.fromiter(map(len, phrases), np.int64, len(phrases))


def standard_limits(lengths: np.ndarray) -> np.ndarray:
    """SPEC §4: 1 use for phrases under 60 characters, 2 under 100, else 3 (`lengths`:
    each phrase's, `phrase_lengths`)."""
    return scratch_copy(np.where(lengths < 60, 1, np.where(lengths < 100, 2, 3)).astype(np.int8))


class PhraseWindow:
    """SPEC §4: usage counts of the `size` phrases that most recently entered the window.

    A phrase is *free* while its count is below its standard limit; `use` returns the
    phrases whose free state it changed, so what is free can be kept indexed.
    """

    def __init__(self, size: int, limits: np.ndarray) -> None:
        self.size = size
        self.limit = limits
        self.count = scratch_array(len(limits), np.int32)  # in the window iff count > 0
        self.order: deque[int] = deque()

    def use(self, phrase: int) -> list[tuple[int, bool]]:
        """Count one use of `phrase`; returns (phrase, now free) for every change."""
        changed = []
        if self.count[phrase] == 0:
            if len(self.order) == self.size:
                old = self.order.popleft()
                if self.count[old] >= self.limit[old]:
                    changed.append((old, True))
                self.count[old] = 0
            self.order.append(phrase)
        self.count[phrase] += 1
        if self.count[phrase] == self.limit[phrase]:
            changed.append((phrase, False))
        return changed


class FreeRows:
    """Eligible rows whose phrase is free, counted per cluster, updated phrase by phrase.

    Whether a cluster (or every other cluster) still holds a free row is answered at
    once from the counts; the free rows themselves are listed only when a diverse search
    must look past its candidate list.
    """

    def __init__(self, pid: np.ndarray, eligible: np.ndarray, clusters: np.ndarray,
                 num_phrases: int) -> None:
        """Built CHUNK rows at a time (pid, eligible, clusters may be memory maps), in
        scratch arrays (`scratch`: memory-mapped, not the process's own) of 4-byte numbers
        below 2**31 rows: 20 bytes an eligible row; no larger temporary than a chunk's."""
        small = max(len(pid), num_phrases, int(clusters.max(initial=0)) + 1) < 2**31
        kind = np.int32 if small else np.int64
        num_clusters = int(clusters.max()) + 1 if len(clusters) else 1
        chunks = range(0, len(pid), CHUNK)
        per_phrase = scratch_array(num_phrases, np.int64)
        self.per_cluster = np.zeros(num_clusters, np.int64)
        total = 0
        for s in chunks:
            rows = np.flatnonzero(eligible[s:s + CHUNK]) + s
            per_phrase += np.bincount(pid[rows], minlength=num_phrases)
            self.per_cluster += np.bincount(clusters[rows], minlength=num_clusters)
            total += len(rows)
        self.phrase_start = scratch_array(num_phrases + 1, np.int64)
        np.cumsum(per_phrase, out=self.phrase_start[1:])
        del per_phrase
        # eligible rows ascending (with their phrases), and by phrase (rows ascending)
        self.rows, self.rows_pid = scratch_array(total, kind), scratch_array(total, kind)
        self.phrase_rows = scratch_array(total, kind)
        cursor, at = scratch_copy(self.phrase_start[:-1]), 0
        for s in chunks:
            rows = np.flatnonzero(eligible[s:s + CHUNK]) + s
            p = np.asarray(pid[rows], np.int64)
            self.rows[at:at + len(rows)], self.rows_pid[at:at + len(rows)] = rows, p
            at += len(rows)
            order = np.argsort(p, kind="stable")
            ordered = p[order]
            first = np.searchsorted(ordered, ordered, "left")  # each one's run start
            self.phrase_rows[cursor[ordered] + np.arange(len(order)) - first] = rows[order]
            np.add.at(cursor, ordered, 1)
        # each phrase's eligible rows per cluster: (cluster, count) pairs, phrase by phrase,
        # counted in a first pass over whole phrases, then filled
        pieces = self._phrase_chunks()
        pairs = scratch_array(num_phrases, np.int64)
        for a, b in pieces:
            phrase_of, _, _ = self._pairs(a, b, clusters, num_clusters)
            pairs += np.bincount(phrase_of, minlength=num_phrases)
        self.hist_start = scratch_array(num_phrases + 1, np.int64)
        np.cumsum(pairs, out=self.hist_start[1:])
        del pairs
        self.hist_cluster = scratch_array(int(self.hist_start[-1]), kind)
        self.hist_count = scratch_array(int(self.hist_start[-1]), kind)
        at = 0
        for a, b in pieces:
            _, cluster, count = self._pairs(a, b, clusters, num_clusters)
            self.hist_cluster[at:at + len(cluster)], self.hist_count[at:at + len(count)] = \
                cluster, count
            at += len(cluster)
        self.total = total
        self.phrase_free = np.ones(num_phrases, bool)  # below the standard limit
        self.has_rows = self.phrase_start[1:] > self.phrase_start[:-1]  # eligible ones
        self.free_phrases = int(self.has_rows.sum())  # free phrases with eligible rows

    def _phrase_chunks(self) -> list[tuple[int, int]]:
        """Stretches [a, b) of `phrase_rows` of whole phrases, about CHUNK rows each (a
        phrase with more rows: one of its own)."""
        start, out, a = self.phrase_start, [], 0
        while a < start[-1]:
            b = int(start[np.searchsorted(start, a + CHUNK, "right") - 1])
            if b <= a:  # a phrase of more than CHUNK rows: up to its end
                b = int(start[np.searchsorted(start, a, "right")])
            out.append((a, b))
            a = b
        return out

    def _pairs(self, a: int, b: int, clusters: np.ndarray, num_clusters: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (phrase, cluster) pairs of phrase_rows[a:b] (whole phrases), sorted, with
        their counts."""
        phrase = np.searchsorted(self.phrase_start, np.arange(a, b), "right") - 1
        keys = phrase * num_clusters + np.asarray(clusters[self.phrase_rows[a:b]], np.int64)
        keys, counts = np.unique(keys, return_counts=True)
        return keys // num_clusters, keys % num_clusters, counts

    def set_free(self, phrase: int, free: bool) -> None:
        if bool(self.phrase_free[phrase]) == free:
            return
        self.phrase_free[phrase] = free
        h0, h1 = self.hist_start[phrase:phrase + 2].tolist()
        if h0 == h1:
            return  # no eligible row
        sign = 1 if free else -1
        if h1 - h0 == 1:  # the phrase's rows in one cluster (most phrases): no gather
            self.per_cluster[int(self.hist_cluster[h0])] += sign * int(self.hist_count[h0])
        else:
            self.per_cluster[self.hist_cluster[h0:h1]] += sign * self.hist_count[h0:h1]
        r0, r1 = self.phrase_start[phrase:phrase + 2].tolist()
        self.total += sign * (r1 - r0)
        self.free_phrases += sign

    def count(self, own: int, other: bool) -> int:
        """Free rows in clusters other than `own` (other=True), or in `own`."""
        in_own = int(self.per_cluster[own])
        return self.total - in_own if other else in_own

    def listed(self) -> np.ndarray:
        """Every free row, ascending."""
        if self.free_phrases > FEW_PHRASES:
            return self.rows[self.phrase_free[self.rows_pid]]
        start = self.phrase_start
        parts = [self.phrase_rows[start[p]:start[p + 1]]
                 for p in np.flatnonzero(self.phrase_free & self.has_rows).tolist()]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Pick:
    """One chosen negative of one anchor."""

    row: int
    kind: str  # "hard" | "diverse"
    vis: float
    txt: float
    step: int | str | None = None  # hard: 0, 1, 2 or "fallback"
    anchor_cluster: int | None = None
    negative_cluster: int | None = None
    cross: float | None = None  # a joint space: the negative's text with the anchor's image
    own: float | None = None  # ... and the anchor's own image-caption score


@dataclass(frozen=True)
class Rules:
    """The selection parameters of the config."""

    tau: float
    min_vis: float
    diverse_ratio: float
    fallback_limit: int
    num_negatives: int


# (anchor row, list size) -> (the anchor's exact diverse list of that size, complete)
Widen = Callable[[int, int], tuple[Cands, bool]]


class Effort(Protocol):
    """Counters of the work the selection pass did (a Metrics has them)."""

    hard_attempts: int
    diverse_attempts: int
    diverse_widened: int


def strategy_order(u: float, diverse_ratio: float) -> tuple[str, str]:
    """SPEC §7: diverse first when u_a < diverse_ratio, else hard first."""
    return ("diverse", "hard") if u < diverse_ratio else ("hard", "diverse")


class Selector:
    """Walks anchors in input order, keeping the phrase window between calls.

    Its cost per anchor is bounded whatever the phrase state: the candidate lists are
    scanned with vectorised masks, a cluster without a free row is skipped from its count,
    and a diverse search that runs past its list looks only at the free rows (or, while
    many rows are free, first at one wider list).
    """

    def __init__(self, tab: Arrays, phrases: list[str], rules: Rules, window: int,
                 widen: Widen, list_size: int) -> None:
        self.tab = tab
        self.rules = rules
        self.pid = np.asarray(tab.text_ids)
        self.cluster = np.asarray(tab.clusters)
        self.groups = np.asarray(tab.groups)
        self.lengths = phrase_lengths(phrases)  # read once: a store's column pass
        self.window = PhraseWindow(window, standard_limits(self.lengths))
        self.free = FreeRows(self.pid, np.asarray(tab.eligible), self.cluster, len(phrases))
        self.widen = widen
        self.list_size = list_size  # length of the saved diverse lists
        self.steps = threshold_steps(rules.tau)
        self.brute_rows = max(BRUTE_MIN, len(self.pid) // BRUTE_SHARE)

    def run(self, anchors: np.ndarray, u: np.ndarray, hard: Ragged, diverse: Ragged,
            complete: np.ndarray, effort: Effort) -> list[list[Pick]]:
        """Choose negatives for `anchors` (in order); list i belongs to anchors[i]."""
        out = []
        for i, a in enumerate(anchors.tolist()):
            lists = {"hard": hard.get(i), "diverse": (diverse.get(i), bool(complete[i]))}
            out.append(self._anchor(a, float(u[i]), lists, effort))
        return out

    def _anchor(self, a: int, u: float, lists: dict, effort: Effort) -> list[Pick]:
        picks: list[Pick] = []
        taken: list[int] = []
        for _ in range(self.rules.num_negatives):
            pick = None
            for kind in strategy_order(u, self.rules.diverse_ratio):
                setattr(effort, f"{kind}_attempts", getattr(effort, f"{kind}_attempts") + 1)
                pick = self._hard(lists, taken) if kind == "hard" else \
                    self._diverse(a, lists, taken, effort)
                if pick is not None:
                    break
            if pick is None:
                break
            phrase = int(self.pid[pick.row])
            for changed, free in self.window.use(phrase):
                self.free.set_free(changed, free)
            taken.append(phrase)
            picks.append(pick)
        return picks

    def _allowed(self, phrases: np.ndarray, taken: list[int]) -> np.ndarray:
        """Rows' phrases below their standard limit and not yet taken by this anchor."""
        ok = self.free.phrase_free[phrases]
        return ok & ~np.isin(phrases, taken) if taken else ok

    def _hard(self, lists: dict, taken: list[int]) -> Pick | None:
        rows, vis, txt = lists["hard"]
        if not len(rows):
            return None
        phrases = self.pid[rows]
        # the first step whose threshold admits a row (lists hold txt < the last step);
        # the lowest step wins, then N(a) order: argmin takes the first of equal keys
        step = (txt >= self.steps[0]).astype(np.int64) + (txt >= self.steps[1])
        key = np.where(self._allowed(phrases, taken), step, 3)
        k = int(np.argmin(key))
        if key[k] < 3:
            return Pick(int(rows[k]), "hard", float(vis[k]), float(txt[k]), int(key[k]))
        fallback = (self.window.count[phrases] < self.rules.fallback_limit) \
            & (txt < self.steps[0])
        if taken:
            fallback &= ~np.isin(phrases, taken)
        k = int(np.argmax(fallback))
        if not fallback[k]:
            return None
        return Pick(int(rows[k]), "hard", float(vis[k]), float(txt[k]), "fallback")

    def _diverse(self, a: int, lists: dict, taken: list[int], effort: Effort) -> Pick | None:
        """SPEC §6: the lowest-vis free row of another cluster, else of a's own; the saved
        list first, then (when it runs out) an exact search past it."""
        cands, complete = lists["diverse"]
        own = int(self.cluster[a])
        for other in (True, False):
            if self.free.count(own, other) == 0:
                continue  # not a single free row there, whatever the group
            k = self._first_free(cands.rows, own, other, taken)
            if k is not None:
                return self._diverse_pick(a, own, int(cands.rows[k]), float(cands.vis[k]))
            if complete:
                continue  # the list holds every eligible row of another group
            effort.diverse_widened += 1
            found = self._past_the_list(a, own, other, taken, lists)
            if found is not None:
                return self._diverse_pick(a, own, *found)
        return None

    def _diverse_pick(self, a: int, own: int, row: int, vis: float) -> Pick:
        txt = float(text_sims(self.tab, np.array([a]), np.array([row]))[0])
        return Pick(row, "diverse", vis, txt, None, own, int(self.cluster[row]))

    def _first_free(self, rows: np.ndarray, own: int, other: bool, taken: list[int]
                    ) -> int | None:
        if not len(rows):
            return None
        clusters = self.cluster[rows]
        ok = ((clusters != own) if other else (clusters == own)) \
            & self._allowed(self.pid[rows], taken)
        k = int(np.argmax(ok))
        return k if ok[k] else None

    def _past_the_list(self, a: int, own: int, other: bool, taken: list[int], lists: dict
                       ) -> tuple[int, float] | None:
        """The exact answer once the saved list has no free row in the wanted clusters:
        from one wider exact list while many rows are free, else from the free rows."""
        if self.free.count(own, other) > self.brute_rows:
            if "wider" not in lists:
                lists["wider"] = self.widen(a, GROWTH * self.list_size)
            wider, complete = lists["wider"]
            k = self._first_free(wider.rows, own, other, taken)
            if k is not None:
                return int(wider.rows[k]), float(wider.vis[k])
            if complete:
                return None
        return self._lowest_free(a, own, other, taken)

    def _lowest_free(self, a: int, own: int, other: bool, taken: list[int]
                     ) -> tuple[int, float] | None:
        """SPEC §6 over the free rows themselves: lowest vis, ties to the lowest row."""
        rows = self.free.listed()
        clusters = self.cluster[rows]
        ok = ((clusters != own) if other else (clusters == own)) \
            & (self.groups[rows] != self.groups[a])
        if taken:
            ok &= ~np.isin(self.pid[rows], taken)
        rows = rows[ok]
        if not len(rows):
            return None
        vis = dots_with(self.tab.V, a, rows)
        k = int(np.argmin(vis))  # rows ascend: the first of equal values is the lowest row
        return int(rows[k]), float(vis[k])
