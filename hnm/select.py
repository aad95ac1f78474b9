"""The one deterministic, order-dependent pass: phrase reuse decides among candidates."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hnm.miner import GROWTH, Cands, Ragged, Tables, text_sims, threshold_steps


class PhraseWindow:
    """SPEC §4: usage counts of the `size` phrases that most recently entered the window."""

    def __init__(self, size: int, num_phrases: int) -> None:
        self.size = size
        self.count = [0] * num_phrases  # a phrase is in the window iff its count > 0
        self.order: deque[int] = deque()

    def use(self, phrase: int) -> None:
        if self.count[phrase] == 0:
            if len(self.order) == self.size:
                self.count[self.order.popleft()] = 0
            self.order.append(phrase)
        self.count[phrase] += 1


def standard_limits(phrases: list[str]) -> list[int]:
    """SPEC §4: 1 use for phrases under 60 characters, 2 under 100, else 3."""
    return [1 if len(p) < 60 else 2 if len(p) < 100 else 3 for p in phrases]


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
    """Walks anchors in input order, keeping the phrase window between calls."""

    def __init__(self, tab: Tables, phrases: list[str], rules: Rules, window: int,
                 widen: Widen, list_size: int) -> None:
        self.tab = tab
        self.rules = rules
        self.pid = tab.text_ids.tolist()
        self.cluster = tab.clusters.tolist()
        self.limit = standard_limits(phrases)
        self.window = PhraseWindow(window, len(phrases))
        self.widen = widen
        self.list_size = list_size  # length of the saved diverse lists

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
        taken: set[int] = set()
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
            self.window.use(self.pid[pick.row])
            taken.add(self.pid[pick.row])
            picks.append(pick)
        return picks

    def _free(self, row: int, limit: int | None, taken: set[int]) -> bool:
        p = self.pid[row]
        return self.window.count[p] < (self.limit[p] if limit is None else limit) \
            and p not in taken

    def _hard(self, lists: dict, taken: set[int]) -> Pick | None:
        rows, vis, txt = lists["hard"]
        steps = threshold_steps(self.rules.tau)
        best = None
        for k, (r, s) in enumerate(zip(rows.tolist(), txt.tolist())):
            if not self._free(r, None, taken):
                continue
            # the first step whose threshold admits it; the lowest step wins, then N(a) order
            step = 0 if s < steps[0] else 1 if s < steps[1] else 2
            if best is None or step < best[1]:
                best = (k, step)
                if step == 0:
                    break
        if best is None:
            limit = self.rules.fallback_limit
            best = next(((k, "fallback") for k, (r, s) in enumerate(zip(rows.tolist(),
                         txt.tolist())) if s < steps[0] and self._free(r, limit, taken)), None)
        if best is None:
            return None
        k, step = best
        return Pick(int(rows[k]), "hard", float(vis[k]), float(txt[k]), step)

    def _diverse(self, a: int, lists: dict, taken: set[int], effort: Effort) -> Pick | None:
        (cands, complete), size = lists["diverse"], self.list_size
        own = self.cluster[a]
        while True:
            k = self._first_free(cands.rows, taken, lambda c: c != own)
            if k is not None or complete:
                break
            size *= GROWTH  # the list ran out before the eligible rows did: search wider
            cands, complete = self.widen(a, size)
            lists["diverse"] = (cands, complete)
            effort.diverse_widened += 1
        if k is None:
            k = self._first_free(cands.rows, taken, lambda c: c == own)
        if k is None:
            return None
        r = int(cands.rows[k])
        txt = float(text_sims(self.tab, np.array([a]), np.array([r]))[0])
        return Pick(r, "diverse", float(cands.vis[k]), txt, None, own, self.cluster[r])

    def _first_free(self, rows: np.ndarray, taken: set[int], cluster_ok: Callable) -> int | None:
        for k, r in enumerate(rows.tolist()):
            if cluster_ok(self.cluster[r]) and self._free(r, None, taken):
                return k
        return None
