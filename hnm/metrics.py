"""Mergeable metrics: sums, counts and histograms that add up across shards."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hnm.outcome import REASONS, RULES, Outcomes
from hnm.select import Pick, strategy_order

HIST_BINS = 40  # similarity histograms over [-1, 1]


@dataclass
class Stat:
    """Count, sum, sum of squares, extremes and a histogram over [lo, hi)."""

    lo: float = -1.0
    hi: float = 1.0
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)

    def add(self, x: float) -> None:
        self.count += 1
        self.total += x
        self.total_sq += x * x
        self.min = min(self.min, x)
        self.max = max(self.max, x)
        b = int((x - self.lo) / (self.hi - self.lo) * HIST_BINS)
        self.hist[min(max(b, 0), HIST_BINS - 1)] += 1

    def __add__(self, other: Stat) -> Stat:
        return Stat(self.lo, self.hi, self.count + other.count, self.total + other.total,
                    self.total_sq + other.total_sq, min(self.min, other.min),
                    max(self.max, other.max), [a + b for a, b in zip(self.hist, other.hist)])

    def summary(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        mean = self.total / self.count
        var = max(0.0, self.total_sq / self.count - mean * mean)
        return {"count": self.count, "mean": round(mean, 6), "std": round(math.sqrt(var), 6),
                "min": round(self.min, 6), "max": round(self.max, 6),
                "histogram": {"lo": self.lo, "hi": self.hi, "counts": self.hist}}


class PhraseUses:
    """How often each phrase was given as a negative: the phrases' ids, sorted, with their
    counts (16 bytes a distinct phrase, where a Counter took about 100), uses noted one at a
    time and folded in FOLD at a time."""

    FOLD = 1 << 16

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.pending: list[int] = []

    def add(self, phrase: int) -> None:
        self.pending.append(phrase)
        if len(self.pending) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        if self.pending:
            self._merge(np.asarray(self.pending, np.int64), np.ones(len(self.pending), np.int64))
            self.pending = []

    def _merge(self, ids: np.ndarray, counts: np.ndarray) -> None:
        held = np.concatenate([self.counts, counts])
        self.ids, at = np.unique(np.concatenate([self.ids, ids]), return_inverse=True)
        self.counts = np.bincount(at, weights=held, minlength=len(self.ids)).astype(np.int64)

    def __add__(self, other: PhraseUses) -> PhraseUses:
        self._fold()
        other._fold()
        out = PhraseUses()
        out.ids, out.counts = self.ids, self.counts
        out._merge(other.ids, other.counts)
        return out

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(phrase ids ascending, their counts)."""
        self._fold()
        return self.ids, self.counts

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PhraseUses):
            return NotImplemented
        (a, b), (c, d) = self.folded(), other.folded()
        return np.array_equal(a, c) and np.array_equal(b, d)


def _length_stat() -> Stat:
    return Stat(lo=0.0, hi=400.0)


@dataclass
class Metrics:
    """One shard's (or the whole run's) mining figures; `a + b` merges two.

    The attempts and widened searches count the selection pass's work; every other figure
    describes the output and is counted by `tally` from the final picks.
    """

    anchors: int = 0
    successes: int = 0
    negatives: int = 0
    hard_attempts: int = 0
    hard_successes: int = 0
    diverse_attempts: int = 0
    diverse_successes: int = 0
    second_strategy_used: int = 0  # SPEC §7's "fallback used": the second strategy won
    hard_below_min_visual: int = 0
    diverse_other_cluster: int = 0
    diverse_widened: int = 0
    hard_steps: Counter = field(default_factory=Counter)
    hard_text: Stat = field(default_factory=Stat)
    hard_visual: Stat = field(default_factory=Stat)
    diverse_visual: Stat = field(default_factory=Stat)
    diverse_text: Stat = field(default_factory=Stat)
    anchor_length: Stat = field(default_factory=_length_stat)
    negative_length: Stat = field(default_factory=_length_stat)
    phrase_uses: PhraseUses = field(default_factory=PhraseUses)
    # hnm.audit: suspected false negatives by kind and by reason, and how many were dropped
    # (the output figures above count what remains after dropping)
    suspects: Counter = field(default_factory=Counter)
    suspects_dropped: int = 0
    # hnm.outcome: why anchors got no negative, or fewer than asked; what the hard scans
    # skipped, by rule
    failure_reasons: Counter = field(default_factory=Counter)
    fewer_reasons: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def __add__(self, other: Metrics) -> Metrics:
        merged = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = a + b
        return Metrics(**merged)

    def summary(self) -> dict[str, Any]:
        """Stable names for metrics.json (SPEC §9)."""
        hard = self.hard_steps.total()
        diverse = self.negatives - hard
        uses = self.phrase_uses.folded()[1]
        distinct = len(uses)
        return {
            "anchors": self.anchors,
            "success_rate": _ratio(self.successes, self.anchors),
            "successes": self.successes,
            "failures": self.anchors - self.successes,
            "negatives": self.negatives,
            "hard_negatives": hard,
            "diverse_negatives": diverse,
            "hard_share": _ratio(hard, self.negatives),
            "hard_attempts": self.hard_attempts,
            "hard_successes": self.hard_successes,
            "diverse_attempts": self.diverse_attempts,
            "diverse_successes": self.diverse_successes,
            "second_strategy_used": self.second_strategy_used,
            "hard_threshold_steps": {str(k): self.hard_steps[k]
                                     for k in (0, 1, 2, "fallback")},
            "hard_text_similarity": self.hard_text.summary(),
            "hard_visual_similarity": self.hard_visual.summary(),
            "hard_below_min_visual_similarity": self.hard_below_min_visual,
            "diverse_visual_similarity": self.diverse_visual.summary(),
            "diverse_text_similarity": self.diverse_text.summary(),
            "cluster_diversity": _ratio(self.diverse_other_cluster, diverse),
            "diverse_widened_searches": self.diverse_widened,
            "distinct_negative_phrases": distinct,
            "phrase_diversity": _ratio(distinct, self.negatives),
            "max_phrase_reuse": int(uses.max()) if distinct else 0,
            "mean_phrase_reuse": _ratio(int(uses.sum()), distinct),
            "anchor_answer_length": self.anchor_length.summary(),
            "negative_answer_length": self.negative_length.summary(),
            "suspect_negatives": self.suspect_summary(),
            **self.outcome_summary(),
        }

    def outcome_summary(self) -> dict[str, Any]:
        """Why anchors got no negative (sums to the failures), why some got fewer than
        asked (--num-negatives > 1), and the rows of N(a) each rule skipped."""
        return {"failure_reasons": {r: self.failure_reasons[r] for r in REASONS},
                "fewer_than_asked": {r: self.fewer_reasons[r] for r in REASONS},
                "skipped": {r: self.skipped[r] for r in RULES}}

    def suspect_summary(self) -> dict[str, int]:
        """Suspected false negatives (hnm.audit); a negative may have both reasons."""
        s = self.suspects
        return {"total": s["hard"] + s["diverse"], "hard": s["hard"], "diverse": s["diverse"],
                "text_similarity": s["text"], "visual_similarity": s["visual"],
                **({"cross_score": s["cross"]} if "cross" in s else {}),
                "dropped": self.suspects_dropped}

    def shard_summary(self) -> dict[str, Any]:
        """The short per-shard block."""
        return {
            "anchors": self.anchors,
            "success_rate": _ratio(self.successes, self.anchors),
            "hard_negatives": self.hard_steps.total(),
            "diverse_negatives": self.negatives - self.hard_steps.total(),
            "mean_hard_text_similarity": self.hard_text.summary()["mean"],
            "mean_hard_visual_similarity": self.hard_visual.summary()["mean"],
            "suspect_negatives": self.suspects["hard"] + self.suspects["diverse"],
            **self.outcome_summary(),
        }


def tally(m: Metrics, u: np.ndarray, picks: Sequence[list[Pick]], anchor_phrases: Sequence[int],
          text_ids: Sequence[int], lengths: Sequence[int], diverse_ratio: float,
          min_visual: float, outcomes: Outcomes) -> None:
    """Count the output figures of `picks` (list i: anchor i's negatives, u[i] its strategy
    draw, anchor_phrases[i] its phrase, outcomes: why each got fewer than asked) into
    `m`; text_ids maps a row to its phrase."""
    count_outcomes(m, outcomes, [bool(row) for row in picks])
    for u_a, phrase, row in zip(u.tolist(), anchor_phrases, picks):
        m.anchors += 1
        m.successes += bool(row)
        m.anchor_length.add(int(lengths[phrase]))
        first = strategy_order(u_a, diverse_ratio)[0]
        for p in row:
            _count(m, p, int(text_ids[p.row]), lengths, min_visual)
            m.second_strategy_used += p.kind != first


def count_outcomes(m: Metrics, outcomes: Outcomes, found: Sequence[bool]) -> None:
    """Reasons of the anchors without a negative and of those with fewer than asked, and
    the skipped rows, from counts (no loop over anchors)."""
    some = np.asarray(found, bool)
    given = outcomes.reason >= 0
    for counter, mask in ((m.failure_reasons, given & ~some), (m.fewer_reasons, given & some)):
        counter.update({REASONS[r]: int(c) for r, c in
                        enumerate(np.bincount(outcomes.reason[mask], minlength=len(REASONS)))
                        if c})
    m.skipped.update({RULES[k]: int(c) for k, c in enumerate(outcomes.skipped.sum(0)) if c})


def _count(m: Metrics, pick: Pick, phrase: int, lengths: Sequence[int], min_visual: float
           ) -> None:
    m.negatives += 1
    m.phrase_uses.add(phrase)
    m.negative_length.add(int(lengths[phrase]))
    if pick.kind == "hard":
        m.hard_successes += 1
        m.hard_steps[pick.step] += 1
        m.hard_text.add(pick.txt)
        m.hard_visual.add(pick.vis)
        m.hard_below_min_visual += pick.vis < min_visual
    else:
        m.diverse_successes += 1
        m.diverse_visual.add(pick.vis)
        m.diverse_text.add(pick.txt)
        m.diverse_other_cluster += pick.negative_cluster != pick.anchor_cluster


def phrase_diversity_vs_data(summary: dict[str, Any], distinct_answers: int) -> float:
    """SPEC §9's phrase diversity against the data: the distinct negative phrases of a
    `Metrics.summary()` per distinct answer in the input (the run's and a sweep's alike)."""
    return round(summary["distinct_negative_phrases"] / distinct_answers, 6)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None
