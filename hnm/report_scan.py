"""What the report page needs from a run's negatives.jsonl and suspects.jsonl, read in
bounded memory: the gallery's anchors, phrase reuse, the failures along the input order."""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hnm.config import Config
from hnm.data import normalize
from hnm.outputs import read_records
from hnm.plan import Plan
from hnm.storage import RunDir

# Gallery rows per section: bounded so the page stays small (~1 MB) whatever the run's size.
SAMPLE, BORDERLINE, FAILED, SUSPECTS = 24, 12, 12, 40
CROSS_POINTS = 3000  # negatives plotted by their cross and own scores (the first ones)
POSITION_BINS = 20  # stretches of the input order in the failure chart


def anchor_positions(plan: Plan) -> list[int]:
    """Record positions of the anchors: the first num_anchors records not skipped."""
    skipped = set(plan.skipped)
    mined = (p for p in range(plan.num_records) if p not in skipped)
    return [p for _, p in zip(range(plan.num_anchors), mined)]


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
    scan = Scan(sample=sorted(anchors[i] for i in picked.tolist()))
    high: list[tuple[float, int]] = []
    low: list[tuple[float, int]] = []
    uses: Counter = Counter()
    removed: list[tuple[int, int]] = []
    bins = min(POSITION_BINS, len(anchors))
    scan.failed_by_bin = [Counter() for _ in range(bins)]
    for k, (pos, record) in enumerate(read_records(run, set(anchors))):
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
    scan.reuse = Counter(uses.values())
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
