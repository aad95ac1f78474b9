"""The one deterministic, order-dependent pass: phrase reuse decides among candidates."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hnm.metrics import Metrics
from hnm.miner import Cands, Ragged, Tables, text_sims, threshold_steps


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


Widen = Callable[[int, int], tuple[Cands, bool]]  # (anchor row, pool) -> (list, complete)


class Selector:
    """Walks anchors in input order, keeping the phrase window between calls."""

    def __init__(self, tab: Tables, phrases: list[str], rules: Rules, window: int,
                 widen: Widen, pool: int) -> None:
        self.tab = tab
        self.rules = rules
        self.pid = tab.text_ids.tolist()
        self.cluster = tab.clusters.tolist()
        self.lengths = [len(p) for p in phrases]
        self.limit = standard_limits(phrases)
        self.window = PhraseWindow(window, len(phrases))
        self.widen = widen
        self.pool = pool

    def run(self, anchors: np.ndarray, u: np.ndarray, hard: Ragged, diverse: Ragged,
            complete: np.ndarray, metrics: Metrics) -> list[list[Pick]]:
        """Choose negatives for `anchors` (in order); list i belongs to anchors[i]."""
        out = []
        for i, a in enumerate(anchors.tolist()):
            lists = {"hard": hard.get(i), "diverse": (diverse.get(i), bool(complete[i]))}
            picks = self._anchor(a, float(u[i]), lists, metrics)
            metrics.anchors += 1
            metrics.successes += bool(picks)
            metrics.anchor_length.add(self.lengths[self.pid[a]])
            out.append(picks)
        return out

    def _anchor(self, a: int, u: float, lists: dict, m: Metrics) -> list[Pick]:
        order = ("diverse", "hard") if u < self.rules.diverse_ratio else ("hard", "diverse")
        picks: list[Pick] = []
        taken: set[int] = set()
        for _ in range(self.rules.num_negatives):
            pick = None
            for rank, kind in enumerate(order):
                setattr(m, f"{kind}_attempts", getattr(m, f"{kind}_attempts") + 1)
                pick = self._hard(lists, taken) if kind == "hard" else \
                    self._diverse(a, lists, taken, m)
                if pick is not None:
                    setattr(m, f"{kind}_successes", getattr(m, f"{kind}_successes") + 1)
                    m.fallback_used += rank
                    break
            if pick is None:
                break
            self._record(pick, m)
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

    def _diverse(self, a: int, lists: dict, taken: set[int], m: Metrics) -> Pick | None:
        (cands, complete), pool = lists["diverse"], self.pool
        own = self.cluster[a]
        while True:
            k = self._first_free(cands.rows, taken, lambda c: c != own)
            if k is not None or complete:
                break
            pool *= 4  # list exhausted before the pool was: search wider, exactly
            cands, complete = self.widen(a, pool)
            lists["diverse"] = (cands, complete)
            m.diverse_widened += 1
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

    def _record(self, pick: Pick, m: Metrics) -> None:
        p = self.pid[pick.row]
        self.window.use(p)
        m.negatives += 1
        m.phrase_uses[p] += 1
        m.negative_length.add(self.lengths[p])
        if pick.kind == "hard":
            m.hard_steps[pick.step] += 1
            m.hard_text.add(pick.txt)
            m.hard_visual.add(pick.vis)
            m.hard_below_min_visual += pick.vis < self.rules.min_vis
        else:
            m.diverse_visual.add(pick.vis)
            m.diverse_text.add(pick.txt)
            m.diverse_other_cluster += pick.negative_cluster != pick.anchor_cluster
