"""Why each anchor's scans ended as they did: a reason code, and what each rule skipped.

Computed after the selection pass, per shard, from its picks and candidate lists with
masks (the pass itself records nothing): the picks say where each hard scan stopped, the
lists' texts which threshold skipped a row, and whatever a scan skipped that passed every
fixed rule was at its phrase cap (or, with several negatives, already the anchor's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hnm.miner import FIXED_RULES, Ragged, threshold_steps
from hnm.select import Pick, Rules

# What a hard scan skips, by the first rule that removes a row of N(a): the fixed rules,
# then the two that depend on the phrase state.
RULES = (*FIXED_RULES, "repeated_phrase", "phrase_cap")
# Why an anchor got fewer negatives than asked (README: "Why an anchor got no negative").
REASONS = (*RULES, "no_diverse", "suspect_dropped")
# How the summary, the report and the sweep name each reason.
REASON_LABELS = {"min_visual": "below min visual sim", "same_group": "same group",
                 "ineligible": "answer filter", "text_similar": "text too similar",
                 "cross_score": "scores like own caption",
                 "repeated_phrase": "phrase already used", "phrase_cap": "phrase caps",
                 "no_diverse": "no diverse left", "suspect_dropped": "suspects dropped"}
NONE = -1  # reason of an anchor that got every negative it asked for
FIXED = len(FIXED_RULES)
MIN_VISUAL, TEXT, REPEATED, CAP = 0, 3, FIXED, FIXED + 1
NO_DIVERSE, DROPPED = len(RULES), len(RULES) + 1


@dataclass
class Outcomes:
    """Per anchor of a shard: reason (index into REASONS, NONE), missing (negatives asked
    for and not output), skipped ((A, len(RULES)) rows of N(a) each rule skipped, summed
    over the anchor's hard scans) and scanned (whether a hard scan ran at all)."""

    reason: np.ndarray
    missing: np.ndarray
    skipped: np.ndarray
    scanned: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[Outcomes]) -> Outcomes:
        """Consecutive shards' outcomes as one."""
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) if parts else
                     np.zeros((0, len(RULES)) if k == "skipped" else 0, np.int64)
                     for k in ("reason", "missing", "skipped", "scanned")))

    def record(self, i: int, several: bool) -> dict[str, Any]:
        """Anchor i's `outcome` in negatives.jsonl; `missing` only when several negatives
        are asked for; `skipped` lists the rules that skipped a row (null: no hard scan)."""
        r = int(self.reason[i])
        out: dict[str, Any] = {"reason": REASONS[r] if r != NONE else None}
        if several:
            out["missing"] = int(self.missing[i])
        out["skipped"] = ({RULES[k]: int(n) for k, n in enumerate(self.skipped[i].tolist())
                           if n} if self.scanned[i] else None)
        return out

    def distinct(self, several: bool) -> tuple[list[int], list[dict[str, Any]]]:
        """Every anchor's outcome as an index into a list of the distinct ones: anchors
        share far fewer distinct outcomes than there are anchors, so each is built (and
        encoded) once."""
        key = np.column_stack([self.reason, self.missing if several else 0 * self.missing,
                               self.scanned, self.skipped])
        if not len(key):
            return [], []
        order = np.lexsort(key.T[::-1])  # rows sorted: equal outcomes are neighbours
        new = np.ones(len(key), bool)
        new[1:] = (key[order[1:]] != key[order[:-1]]).any(1)
        inverse = np.empty(len(key), np.int64)
        inverse[order] = np.cumsum(new) - 1
        return inverse.tolist(), [self.record(int(i), several) for i in order[new]]


def other_groups_eligible(groups: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Per group code: whether some eligible row lies outside the group (a diverse
    negative is possible at all, whatever the phrase state)."""
    per_group = np.bincount(groups[eligible], minlength=int(groups.max(initial=-1)) + 1)
    return per_group < per_group.sum()


def outcomes(rules: Rules, pid: np.ndarray, hard: Ragged, before: np.ndarray,
             fixed: np.ndarray, hard_first: np.ndarray, raw: Sequence[list[Pick]],
             kept: Sequence[list[Pick]], diverse_possible: np.ndarray) -> Outcomes:
    """The outcome of every anchor of a shard.

    hard: the anchors' hard lists (before/fixed: `engine.Candidates.hard_before/fixed`);
    raw: the selection's picks, kept: those output after the audit; diverse_possible:
    per anchor, whether an eligible row of another group exists.
    """
    found = np.fromiter(map(len, raw), np.int64, len(raw))
    scans = Scans(rules, pid, hard, before, fixed, hard_first, raw, found)
    for i in range(rules.num_negatives):
        scans.count(i)
    reason = np.where(scans.ended_cap > 0, CAP, np.where(
        scans.ended_repeated > 0, REPEATED, np.where(diverse_possible, NO_DIVERSE,
                                                     _last_fixed(fixed))))
    left = np.fromiter(map(len, kept), np.int64, len(kept))
    asked = rules.num_negatives
    dropped = (left < found) & ((found == asked) | (left == 0))
    reason = np.where(found == asked, NONE, reason)
    reason = np.where(dropped, DROPPED, reason)
    return Outcomes(reason.astype(np.int64), asked - left, scans.skipped, scans.scanned)


def _last_fixed(fixed: np.ndarray) -> np.ndarray:
    """The last fixed rule (in FIXED_RULES order) that removed a row of N(a)."""
    last = np.full(len(fixed), MIN_VISUAL)
    for k in range(1, len(FIXED_RULES)):
        last = np.where(fixed[:, k] > 0, k, last)
    return last


class Scans:
    """The hard scans of a shard's anchors, counted scan by scan (scan i looks for the
    anchor's negative i, with the phrases of its first i negatives taken)."""

    def __init__(self, rules: Rules, pid: np.ndarray, hard: Ragged, before: np.ndarray,
                 fixed: np.ndarray, hard_first: np.ndarray, raw: Sequence[list[Pick]],
                 found: np.ndarray) -> None:
        self.rules, self.raw, self.found, self.fixed = rules, raw, found, fixed
        self.steps = threshold_steps(rules.tau)
        n = len(raw)
        lens = np.diff(hard.offsets)
        self.owner = np.repeat(np.arange(n), lens)  # flat entry -> anchor
        flat = np.arange(hard.offsets[0], hard.offsets[-1])
        self.pos = flat - hard.offsets[:-1][self.owner]  # position in its list
        self.rows, self.txt = hard.rows[flat], hard.txt[flat]
        self.phrase, self.before = pid[self.rows], before[flat]
        self.lens, self.hard_first, self.pid = lens, hard_first, pid
        self.taken = np.full((n, rules.num_negatives), -1, np.int64)
        self.skipped = np.zeros((n, len(RULES)), np.int64)
        self.scanned = np.zeros(n, bool)
        self.ended_cap = np.zeros(n, np.int64)
        self.ended_repeated = np.zeros(n, np.int64)

    def count(self, i: int) -> None:
        """Add what scan i skipped; note how the scan that found nothing ended."""
        n = len(self.raw)
        picks = [r[i] if len(r) > i else None for r in self.raw]
        is_hard = np.fromiter((p is not None and p.kind == "hard" for p in picks), bool, n)
        ran = (self.found >= i) & (self.hard_first | (self.found == i) | is_hard)
        self.scanned |= ran
        cut, thr = self.lens.copy(), np.full(n, self.steps[-1])
        at = np.flatnonzero(is_hard)
        if len(at):
            want = np.full(n, -1)
            want[at] = [picks[a].row for a in at.tolist()]
            hit = np.flatnonzero(self.rows == want[self.owner])  # one entry per hard pick
            cut[self.owner[hit]] = self.pos[hit]
            thr[at] = [self.steps[0] if p.step == "fallback" else self.steps[p.step]
                       for p in (picks[a] for a in at.tolist())]
            self.skipped[self.owner[hit], 1:FIXED] += self.before[hit]
        whole = ran & ~is_hard  # the scan went through all of N(a)
        self.skipped[whole, :FIXED] += self.fixed[whole]
        scanned = ran[self.owner] & (self.pos < cut[self.owner])
        text = scanned & (self.txt >= thr[self.owner])
        repeated = scanned & ~text & (self.phrase[:, None] == self.taken[self.owner, :i]).any(1)
        cap = scanned & ~text & ~repeated
        for rule, mask in ((TEXT, text), (REPEATED, repeated), (CAP, cap)):
            self.skipped[:, rule] += np.bincount(self.owner[mask], minlength=n)
        ended = self.found == i
        self.ended_cap[ended] = np.bincount(self.owner[cap], minlength=n)[ended]
        self.ended_repeated[ended] = np.bincount(self.owner[repeated], minlength=n)[ended]
        got = np.flatnonzero(self.found > i)
        self.taken[got, i] = self.pid[[self.raw[a][i].row for a in got.tolist()]]
