"""What the report page needs from a run's negatives.jsonl and suspects.jsonl, read in
bounded memory: the gallery's anchors, phrase reuse, the failures along the input order."""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hnm.config import Config
from hnm.data import normalize
from hnm.distinct import DistinctCodes
from hnm.outputs import read_records
from hnm.plan import Plan
from hnm.storage import RunDir

# Gallery rows per section: bounded so the page stays small (~1 MB) whatever the run's size.
SAMPLE, BORDERLINE, FAILED, SUSPECTS = 24, 12, 12, 40
CROSS_POINTS = 3000  # negatives plotted by their cross and own scores (the first ones)
POSITION_BINS = 20  # stretches of the input order in the failure chart


class AnchorPositions:
    """Record positions of the anchors, the first num_anchors records not skipped, found
    from the skipped ones (memory set by them, not by the anchors' count)."""

    def __init__(self, num_records: int, skipped: Iterable[int], num_anchors: int) -> None:
        held = np.unique(np.fromiter(skipped, np.int64))
        self.skipped = held[(held >= 0) & (held < num_records)]
        # anchors before each skipped record
        self.before = self.skipped - np.arange(len(self.skipped))
        self.count = max(0, min(num_anchors, num_records - len(self.skipped)))

    def __len__(self) -> int:
        return self.count

    def at(self, k: np.ndarray) -> np.ndarray:
        """The record positions of anchors k (numbered from 0)."""
        k = np.asarray(k, np.int64)
        return k + np.searchsorted(self.before, k, "right")

    def __contains__(self, pos: object) -> bool:
        if not isinstance(pos, (int, np.integer)) or pos < 0:
            return False
        j = int(np.searchsorted(self.skipped, pos, "left"))
        if j < len(self.skipped) and self.skipped[j] == pos:
            return False
        return int(pos) - j < self.count


def anchor_positions(plan: Plan) -> AnchorPositions:
    """Record positions of the anchors: the first num_anchors records not skipped."""
    return AnchorPositions(plan.num_records, plan.skipped, plan.num_anchors)


class TextUses:
    """How many times each distinct text (normalised) was met: codes of its digest
    (`distinct.DistinctCodes`) and a count each, texts taken a block at a time."""

    BLOCK = 1 << 14

    def __init__(self) -> None:
        self.codes = DistinctCodes()
        self.counts = np.zeros(0, np.int64)
        self.pending: list[str] = []

    def update(self, texts: Iterable[str]) -> None:
        self.pending.extend(texts)
        if len(self.pending) >= self.BLOCK:
            self._fold()

    def _fold(self) -> None:
        codes, _ = self.codes.code(self.pending)
        self.pending = []
        self.counts = np.concatenate([self.counts, np.zeros(self.codes.count - len(self.counts),
                                                            np.int64)])
        np.add.at(self.counts, codes, 1)

    def histogram(self) -> Counter:
        """uses -> the number of texts used that many times."""
        self._fold()
        values, counts = np.unique(self.counts, return_counts=True)
        return Counter(dict(zip(values.tolist(), counts.tolist())))


@dataclass
class Scan:
    """What the report needs from negatives.jsonl, gathered in bounded memory."""

    sample: list[int]
    high_text: list[int] = field(default_factory=list)
    low_visual: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    reuse: Counter = field(default_factory=Counter)  # uses -> number of phrases
    records: dict[int, dict] = field(default_factory=dict)
    # anchors without a negative, by reason, in POSITION_BINS stretches of the input order
    failed_by_bin: list[Counter] = field(default_factory=list)
    # a joint space: (own score, cross score, type) of the first CROSS_POINTS negatives, and
    # the anchors whose nearest candidates the cross rule removed most (most first)
    cross: list[tuple[float, float, str]] = field(default_factory=list)
    cross_removed: list[int] = field(default_factory=list)


def scan_negatives(run: RunDir, config: Config, plan: Plan) -> Scan:
    """Choose the gallery's anchors (deterministically) and count phrase reuse.

    A seeded sample; the hard negatives with the highest text and the lowest visual
    similarity (the borderline ones: ties by input position); the first anchors with no
    negative. Two passes over the file: only the chosen records are held in memory.
    """
    anchors = anchor_positions(plan)
    rng = np.random.default_rng(config.seed)
    picked = rng.choice(len(anchors), size=min(SAMPLE, len(anchors)), replace=False)
    scan = Scan(sample=sorted(anchors.at(picked).tolist()))
    high: list[tuple[float, int]] = []
    low: list[tuple[float, int]] = []
    uses = TextUses()
    removed: list[tuple[int, int]] = []
    bins = min(POSITION_BINS, len(anchors))
    scan.failed_by_bin = [Counter() for _ in range(bins)]
    for k, (pos, record) in enumerate(read_records(run, anchors)):
        negatives = record.get("negatives") or []
        if not negatives:
            reason = (record.get("outcome") or {}).get("reason")
            scan.failed_by_bin[k * bins // len(anchors)][reason] += 1
        if not negatives and len(scan.failed) < FAILED:
            scan.failed.append(pos)
        uses.update(normalize(n["text"]) for n in negatives)
        scan.cross += [(n["own_score"], n["cross_score"], n["type"]) for n in negatives
                       if "cross_score" in n][:CROSS_POINTS - len(scan.cross)]
        count = ((record.get("outcome") or {}).get("skipped") or {}).get("cross_score", 0)
        if count:
            _push(removed, BORDERLINE, (count, -pos))
        hard = [n for n in negatives if n["type"] == "hard"]
        if hard:
            _push(high, BORDERLINE, (max(n["text_similarity"] for n in hard), -pos))
            _push(low, BORDERLINE, (-min(n["visual_similarity"] for n in hard), -pos))
    scan.high_text = [-p for _, p in sorted(high, reverse=True)]
    scan.low_visual = [-p for _, p in sorted(low, reverse=True)]
    scan.reuse = uses.histogram()
    scan.cross_removed = [-p for _, p in sorted(removed, reverse=True)]
    wanted = {*scan.sample, *scan.high_text, *scan.low_visual, *scan.failed,
              *scan.cross_removed}
    scan.records = dict(read_records(run, wanted))
    return scan


def _push(heap: list, size: int, item: tuple) -> None:
    """Keep the `size` largest items."""
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


@dataclass
class Suspects:
    """How many suspects the run found, and those most alike their anchor."""

    total: int = 0
    by_text: list[dict] = field(default_factory=list)
    by_visual: list[dict] = field(default_factory=list)


def top_suspects(path: Path, size: int = SUSPECTS // 2) -> Suspects:
    """The `size` suspects with the highest text similarity among those suspected for
    their text, and likewise for images (ties: file order); one pass, bounded memory."""
    out = Suspects()
    if not path.exists():
        return out
    text: list[tuple] = []
    visual: list[tuple] = []
    with open(path, encoding="utf-8") as handle:
        for k, line in enumerate(handle):
            s = json.loads(line)
            out.total += 1
            if "text" in s["reasons"]:
                _push(text, size, (s["negative"]["text_similarity"], -k, s))
            if "visual" in s["reasons"]:
                _push(visual, size, (s["negative"]["visual_similarity"], -k, s))
    out.by_text = [s for *_, s in sorted(text, reverse=True)]
    out.by_visual = [s for *_, s in sorted(visual, reverse=True)]
    return out
