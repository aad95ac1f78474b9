"""The mining engine on in-memory arrays: candidate lists, then the selection pass.

One implementation for every caller: the candidates phase, the reducer, `hnm sweep`, the
tests and the benchmarks. Nothing here reads or writes files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hnm.audit import Suspect, audit_picks, count_suspects
from hnm.callbacks import Progress, no_progress
from hnm.config import Config
from hnm.errors import HnmError
from hnm.index import ChunkedFlatIP, MappedFlatIP, SearchIndex, build_index
from hnm.metrics import Metrics, tally
from hnm.miner import (
    FIXED_RULES,
    Arrays,
    Cands,
    CrossRule,
    Ragged,
    cross_sims,
    farthest,
    hard_candidates,
    nearest,
    own_scores,
    scatter,
)
from hnm.outcome import Outcomes, other_groups_eligible, outcomes
from hnm.parts import PartedIndex, index_parts, part_edges
from hnm.select import Pick, Rules, Selector

# Anchors per search call: its (B, k) candidate arrays stay a few MB and a search of
# thousands of queries at once runs at FAISS's full speed (an index may ask for more, see
# index.IVF_BATCH); results do not depend on it.
ANCHOR_BATCH = 2048
# Anchors whose wider diverse lists are computed together: one (64, d) x (d, N) product
# costs little more than a single anchor's memory-bound (d, N) pass.
WIDEN_BLOCK = 64
# Anchors whose candidate lists the reduce reads and judges at once: it holds a window's
# lists, masks and outcomes (a few MB per 1,000 anchors), not a shard's.
REDUCE_WINDOW = 1 << 14
# The arrays of a block of candidate lists (`Candidates.to_arrays`).
MEMBERS = ("diverse_complete", "hard_before", "hard_fixed",
           *(f"{name}_{k}" for name in ("hard", "diverse")
             for k in ("offsets", "rows", "vis", "txt")))


@dataclass
class Candidates:
    """Consecutive anchors' candidate lists: hard (N(a) order) and diverse (farthest first).

    complete[i]: anchor i's diverse list holds every eligible row of another group, so
    running out of it means there is no diverse negative at all. hard_before and
    hard_fixed: what SPEC §5's fixed rules removed before each hard row and in all of N(a)
    (`miner.HardLists`), for the outcome of each anchor.
    """

    hard: Ragged
    diverse: Ragged
    complete: np.ndarray
    hard_before: np.ndarray
    hard_fixed: np.ndarray

    def __len__(self) -> int:
        return len(self.complete)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for an .npz file."""
        out = {"diverse_complete": self.complete, "hard_before": self.hard_before,
               "hard_fixed": self.hard_fixed}
        for name, lists in (("hard", self.hard), ("diverse", self.diverse)):
            out.update({f"{name}_offsets": lists.offsets, f"{name}_rows": lists.rows,
                        f"{name}_vis": lists.vis, f"{name}_txt": lists.txt})
        return out

    @classmethod
    def from_arrays(cls, z: dict[str, np.ndarray]) -> Candidates:
        if "hard_fixed" not in z or z["hard_fixed"].shape[1] != len(FIXED_RULES):
            raise HnmError("candidate lists written by an older hnm (without the counts of "
                           "the outcomes); rerun the mining command with --overwrite")
        hard, diverse = (Ragged(z[f"{k}_offsets"], z[f"{k}_rows"], z[f"{k}_vis"],
                                z[f"{k}_txt"]) for k in ("hard", "diverse"))
        return cls(hard, diverse, z["diverse_complete"], z["hard_before"], z["hard_fixed"])

    def blocks_to_file(self, block: int) -> dict[str, np.ndarray]:
        """This block's arrays as members of a candidate file: `to_arrays`'s names with
        the block number (a file holds a shard's blocks, written as they are found)."""
        return {f"{name}.{block:05d}": array for name, array in self.to_arrays().items()}

    @classmethod
    def from_file(cls, members: Mapping[str, np.ndarray]) -> Iterator[Candidates]:
        """A candidate file's blocks in order (`blocks_to_file`; a file of one unnumbered
        block, as earlier releases wrote, is read as that block). `members`: the file's
        member names and arrays, read when asked for (`storage.NpzMembers`)."""
        names = list(members)
        if "diverse_complete" in names:
            yield cls.from_arrays({k: members[k] for k in names})
            return
        blocks = sorted({n.rsplit(".", 1)[1] for n in names if "." in n}, key=int)
        for b in blocks:
            yield cls.from_arrays({k: members[f"{k}.{b}"] for k in MEMBERS})

    @classmethod
    def concat(cls, parts: list[Candidates]) -> Candidates:
        before = [p.hard_before[p.hard.offsets[0]:p.hard.offsets[-1]] for p in parts]
        return cls(Ragged.concat([p.hard for p in parts]),
                   Ragged.concat([p.diverse for p in parts]),
                   np.concatenate([p.complete for p in parts]) if parts else np.zeros(0, bool),
                   np.concatenate(before) if parts
                   else np.zeros((0, len(FIXED_RULES) - 1), np.int32),
                   np.concatenate([p.hard_fixed for p in parts]) if parts
                   else np.zeros((0, len(FIXED_RULES)), np.int32))

    def window(self, a0: int, a1: int) -> Candidates:
        """Lists of anchors a0..a1-1 (positions in this object), sharing the arrays."""
        return Candidates(self.hard.window(a0, a1), self.diverse.window(a0, a1),
                          self.complete[a0:a1], self.hard_before, self.hard_fixed[a0:a1])


def find_candidates(c: Config, tab: Arrays, anchors: np.ndarray, device: str = "cpu",
                    progress: Progress = no_progress,
                    diverse_first: np.ndarray | None = None,
                    index: SearchIndex | None = None) -> tuple[Candidates, str]:
    """Candidate lists of `anchors` against every row, and the kind of index that ran
    (`candidate_blocks`, concatenated)."""
    index = index if index is not None else default_index(c, tab, device)
    blocks = list(candidate_blocks(c, tab, anchors, device, progress, diverse_first, index))
    return Candidates.concat(blocks), index.kind


def candidate_blocks(c: Config, tab: Arrays, anchors: np.ndarray, device: str = "cpu",
                    progress: Progress = no_progress,
                    diverse_first: np.ndarray | None = None,
                    index: SearchIndex | None = None) -> Iterator[Candidates]:
    """Candidate lists of `anchors` against every row, a block of anchors at a time, as
    each block is found.

    `index`: the search over every row (a worker builds it once for all its shards);
    None: an exact one, built here. Diverse lists cost a second search, so they are
    computed only for anchors that will surely try diverse: `diverse_first`
    (u_a < diverse_ratio; None: all) and those without a single hard candidate. Any other
    anchor whose hard strategy fails gets its list from the selection pass's exact search
    past the list, so the picks are the same.
    """
    index = index if index is not None else default_index(c, tab, device)
    wanted = np.ones(len(anchors), bool) if diverse_first is None else diverse_first
    batch = getattr(index, "batch", ANCHOR_BATCH)
    for s in range(0, len(anchors), batch):
        a = anchors[s:s + batch]
        hard = hard_candidates(index, tab, a, c.k_nn, c.min_visual_similarity,
                               c.cosine_threshold, cross_rule(c))
        need = wanted[s:s + batch] | (np.diff(hard.lists.offsets) == 0)
        sub, sub_complete = farthest(index.far, tab, a[need], c.diverse_candidates)
        complete = np.zeros(len(a), bool)
        complete[need] = sub_complete
        yield Candidates(hard.lists, scatter(sub, need), complete, hard.before, hard.fixed)
        progress("search", s + len(a), len(anchors))


def default_index(c: Config, tab: Arrays, device: str = "cpu") -> SearchIndex:
    """An exact search over every row of the table, in the config's index parts."""
    parts = index_parts(c.index_parts, len(tab.V))
    return exact_parts(tab.V, parts) if parts > 1 and device == "cpu" \
        else build_index(tab.V, device)


class Widener:
    """Exact wider diverse lists, past the saved ones, from a search over every row.

    A list does not depend on the phrase state, so within a run of anchors that exhaust
    their lists (the same far-away phrases get used up) it is computed for a block of
    upcoming anchors at once (WIDEN_BLOCK); an isolated widening searches for its anchor
    alone (a block costs several single searches). The search reads the (memory-mapped)
    table a block of rows at a time: it is never copied whole. `parts` > 1: the search
    runs over the run's index parts one at a time (`exact_parts`).
    """

    def __init__(self, tab: Arrays, parts: int = 1) -> None:
        self.tab = tab
        self.index = ChunkedFlatIP(tab.V) if parts <= 1 else exact_parts(tab.V, parts)
        self.cache: dict[int, tuple[int, Any, bool]] = {}  # anchor -> (size, list, complete)
        self.last = -WIDEN_BLOCK  # the anchor last widened

    def __call__(self, anchor: int, size: int) -> tuple[Cands, bool]:
        hit = self.cache.get(anchor)
        if hit is None or hit[0] < size:
            self._compute(anchor, size)
            hit = self.cache[anchor]
        return hit[1], hit[2]

    def _compute(self, anchor: int, size: int) -> None:
        # anchors are selected in row order: earlier entries are never asked for again
        self.cache = {a: v for a, v in self.cache.items() if a >= anchor}
        ahead = WIDEN_BLOCK if anchor - self.last < WIDEN_BLOCK else 1
        self.last = anchor
        block = np.arange(anchor, min(anchor + ahead, len(self.tab.V)))
        block = block[[self.cache.get(a, (0,))[0] < size for a in block.tolist()]]
        lists, complete = farthest(self.index, self.tab, block, size)
        for i, a in enumerate(block.tolist()):
            self.cache[a] = (size, lists.get(i), bool(complete[i]))


def exact_parts(V: np.ndarray, parts: int) -> SearchIndex:
    """An exact search over every row of V in `parts` parts, each searched straight over
    its slice of the (memory-mapped) table and merged exactly (`parts.PartedIndex`)."""
    edges = part_edges(len(V), parts)
    return PartedIndex(edges, lambda p: MappedFlatIP(V[edges[p]:edges[p + 1]]))


def cross_rule(config: Config) -> CrossRule:
    """The config's positive-aware rule (off unless a ratio or a margin is given)."""
    return CrossRule(config.max_cross_score_ratio, config.min_cross_score_margin)


def with_cross(tab: Arrays, anchors: np.ndarray, picks: list[list[Pick]]
               ) -> list[list[Pick]]:
    """The picks with their cross score and their anchor's own score (a joint space only)."""
    flat = [(i, p) for i, row in enumerate(picks) for p in row]
    if tab.C is None or not flat:
        return picks
    a = anchors[[i for i, _ in flat]]
    cross = cross_sims(tab, a, np.array([p.row for _, p in flat], np.int64)).tolist()
    own = own_scores(tab, a).tolist()
    out: list[list[Pick]] = [[] for _ in picks]
    for (i, p), x, o in zip(flat, cross, own):
        out[i].append(dataclasses.replace(p, cross=x, own=o))
    return out


def make_selector(config: Config, tab: Arrays, phrases: list[str]) -> Selector:
    """The selection pass, with an exact wider search past exhausted diverse lists."""
    rules = Rules(config.cosine_threshold, config.min_visual_similarity, config.diverse_ratio,
                  config.fallback_phrase_reuse_limit, config.num_negatives)
    return Selector(tab, phrases, rules, config.sliding_window_size,
                    Widener(tab, index_parts(config.index_parts, len(tab.V))),
                    config.diverse_candidates)


@dataclass
class Selected:
    """One window of a shard's anchors: their negatives (after the audit), why each
    anchor got fewer than asked, suspects; the shard's metrics, counted so far (complete
    at its `last` window)."""

    anchors: np.ndarray
    picks: list[list[Pick]]
    metrics: Metrics
    suspects: list[Suspect]
    outcomes: Outcomes
    last: bool = True


def select_negatives(config: Config, selector: Selector,
                     shards: Iterable[tuple[np.ndarray, Candidates | Iterable[Candidates]]],
                     u: np.ndarray) -> Iterator[Selected]:
    """The selection pass over shards in input order, one selector (one phrase window) for
    all, then the audit and each anchor's outcome; each shard's metrics are counted from
    its final picks.

    `shards`: (anchor rows, their candidates) in order, the candidates whole or in
    windows of consecutive anchors (a window is judged and handed on before the next is
    read; the picks do not depend on the cut); u: every anchor's strategy draw.
    """
    tab = selector.tab
    text_ids = np.asarray(tab.text_ids)
    diverse_possible = other_groups_eligible(np.asarray(tab.groups), np.asarray(tab.eligible))
    for anchors, lists in shards:
        m = Metrics()
        windows = iter([lists] if isinstance(lists, Candidates) else lists)
        start, cands = 0, next(windows, None) or Candidates.concat([])
        while cands is not None:
            a = anchors[start:start + len(cands)]
            start += len(cands)
            raw = with_cross(tab, a, selector.run(a, u[a], cands.hard, cands.diverse,
                                                  cands.complete, m))
            picks, suspects = audit_picks(config, a, raw)
            count_suspects(m, suspects)
            why = outcomes(selector.rules, selector.pid, cands.hard, cands.hard_before,
                           cands.hard_fixed, u[a] >= config.diverse_ratio, raw, picks,
                           diverse_possible[selector.groups[a]])
            tally(m, u[a], picks, text_ids[a].tolist(), text_ids, selector.lengths,
                  config.diverse_ratio, config.min_visual_similarity, why)
            cands = next(windows, None)
            yield Selected(a, picks, m, suspects, why, last=cands is None)
        if start != len(anchors):
            raise ValueError(f"candidate lists for {start} of {len(anchors)} anchors")


def recall_sample(num_anchors: int, seed: int, size: int) -> np.ndarray:
    """A seeded sample of anchor rows, ascending (every anchor when there are no more)."""
    if num_anchors <= size:
        return np.arange(num_anchors)
    return np.sort(np.random.default_rng(seed).choice(num_anchors, size, replace=False))


def recall_at_k(index: SearchIndex, V: np.ndarray, anchors: np.ndarray, k_nn: int
                ) -> dict[str, Any]:
    """recall@k_nn of `index`'s neighbour lists N(a) (the lists hard negatives are drawn
    from) against an exact search, over `anchors`: shared rows / rows of the exact lists."""
    exact, _ = nearest(ChunkedFlatIP(V), V, anchors, k_nn, -np.inf)
    approx, _ = nearest(index, V, anchors, k_nn, -np.inf)
    found = sum(len(np.intersect1d(e[e >= 0], a[a >= 0])) for e, a in zip(exact, approx))
    total = int((exact >= 0).sum())
    return {"recall_at_k": round(found / total, 6) if total else None, "k": k_nn,
            "anchors": len(anchors), "neighbours": total, "found": found}


def mine_arrays(config: Config, tab: Arrays, phrases: list[str], u: np.ndarray,
                num_anchors: int) -> list[list[Pick]]:
    """The whole engine on in-memory arrays: the first `num_anchors` rows' negatives."""
    anchors = np.arange(num_anchors)
    cands, _ = find_candidates(config, tab, anchors,
                               diverse_first=u[:num_anchors] < config.diverse_ratio)
    selector = make_selector(config, tab, phrases)
    (done,) = select_negatives(config, selector, [(anchors, cands)], u)
    return done.picks
