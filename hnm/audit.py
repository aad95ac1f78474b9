"""False-negative audit: negatives whose text or image repeats the anchor's are suspect."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Config
from hnm.data import Dataset
from hnm.metrics import Metrics
from hnm.select import Pick
from hnm.storage import RunDir, atomic_open

SUSPECTS_FILE = "suspects.jsonl"


def suspect_reasons(config: Config, pick: Pick) -> tuple[str, ...]:
    """Why `pick` may be a false negative: "text" (says the same as its anchor) and/or
    "visual" (a near-duplicate image). Strictly above the audit thresholds, judged on
    the exact similarities the selection used (not the rounded ones in the output)."""
    reasons: tuple[str, ...] = ()
    if pick.txt > config.audit_text_similarity:
        reasons += ("text",)
    if pick.vis > config.audit_visual_similarity:
        reasons += ("visual",)
    return reasons


def is_suspect(config: Config, pick: Pick) -> bool:
    return bool(suspect_reasons(config, pick))


@dataclass(frozen=True)
class Suspect:
    """One suspected false negative, with the row of its anchor."""

    anchor: int
    pick: Pick
    reasons: tuple[str, ...]
    dropped: bool


@dataclass
class Audited:
    """The selection's output after the audit."""

    picks: list[list[Pick]]
    metrics: Metrics
    suspects: list[Suspect]


def audit_picks(config: Config, anchors: np.ndarray, u: np.ndarray, picks: list[list[Pick]],
                metrics: Metrics, text_ids: np.ndarray, phrases: list[str]) -> Audited:
    """Count the suspects among `picks` (list i belongs to anchors[i]); drop them if asked.

    Dropping (`drop_suspect_negatives`) is a post-filter on the selection's output: the
    selection pass runs unchanged — a dropped negative's phrase still counted towards its
    reuse limit and no other candidate is tried in its place — then suspects are removed.
    An anchor left without a negative counts as a failure. Every figure that describes
    the output (successes, negatives, per-strategy successes, fallback used, similarity
    statistics, phrase reuse) is recounted from what remains; the attempts and widened
    searches describe the selection pass and stay as they were. The suspect counts cover
    every suspect the selection found, dropped or not.
    """
    suspects = [Suspect(int(a), p, why, config.drop_suspect_negatives)
                for a, row in zip(anchors.tolist(), picks) for p in row
                if (why := suspect_reasons(config, p))]
    for s in suspects:
        metrics.suspects[s.pick.kind] += 1
        metrics.suspects.update(s.reasons)
    if not (config.drop_suspect_negatives and suspects):
        return Audited(picks, metrics, suspects)
    kept = [[p for p in row if not is_suspect(config, p)] for row in picks]
    recounted = recount(metrics, u, kept, config, text_ids, [len(p) for p in phrases])
    recounted.suspects_dropped = metrics.suspects_dropped + len(suspects)
    return Audited(kept, recounted, suspects)


def recount(selection: Metrics, u: np.ndarray, picks: list[list[Pick]], config: Config,
            text_ids: np.ndarray, lengths: list[int]) -> Metrics:
    """The selection's metrics with every output figure counted again from `picks`.

    Mirrors `Selector._record` and `Selector.run`, in the same order, so that with nothing
    dropped the result equals the selection's own metrics (tested)."""
    m = Metrics(anchors=selection.anchors, hard_attempts=selection.hard_attempts,
                diverse_attempts=selection.diverse_attempts,
                diverse_widened=selection.diverse_widened,
                anchor_length=selection.anchor_length, suspects=Counter(selection.suspects),
                suspects_dropped=selection.suspects_dropped)
    pid = text_ids.tolist()
    for u_a, row in zip(u.tolist(), picks):
        first = "diverse" if u_a < config.diverse_ratio else "hard"
        m.successes += bool(row)
        for p in row:
            m.fallback_used += p.kind != first
            if p.kind == "hard":
                m.hard_successes += 1
            else:
                m.diverse_successes += 1
            _record(m, p, pid[p.row], lengths, config.min_visual_similarity)
    return m


def _record(m: Metrics, pick: Pick, phrase: int, lengths: list[int], min_vis: float) -> None:
    m.negatives += 1
    m.phrase_uses[phrase] += 1
    m.negative_length.add(lengths[phrase])
    if pick.kind == "hard":
        m.hard_steps[pick.step] += 1
        m.hard_text.add(pick.txt)
        m.hard_visual.add(pick.vis)
        m.hard_below_min_visual += pick.vis < min_vis
    else:
        m.diverse_visual.add(pick.vis)
        m.diverse_text.add(pick.txt)
        m.diverse_other_cluster += pick.negative_cluster != pick.anchor_cluster


def audit_run(config: Config, ds: Dataset, plan: dict[str, Any], picks: list[list[Pick]],
              parts: list[Metrics], u: np.ndarray
              ) -> tuple[list[list[Pick]], list[Metrics], list[Suspect]]:
    """`audit_picks` shard by shard (picks[a] belongs to anchor a, shards in plan order;
    u: every anchor's strategy draw, as the selection used it)."""
    out_picks: list[list[Pick]] = []
    out_parts, suspects = [], []
    for part, metrics in zip(plan["shards"], parts):
        a0, a1 = part["anchors"]
        done = audit_picks(config, np.arange(a0, a1), u[a0:a1], picks[a0:a1], metrics,
                           ds.text_ids, ds.phrases)
        out_picks += done.picks
        out_parts.append(done.metrics)
        suspects += done.suspects
    return out_picks, out_parts, suspects


def write_suspects(config: Config, run: RunDir, ds: Dataset, suspects: list[Suspect]) -> Path:
    """OUTPUT_DIR/suspects.jsonl: every suspect, dropped or not, with its anchor."""
    from hnm.pipeline import negative_record  # pipeline imports this module

    f = config.fields
    path = run.root / SUSPECTS_FILE
    with atomic_open(path, "w") as handle:
        for s in suspects:
            record = ds.records[ds.positions[s.anchor]]
            line = {"anchor_id": ds.ids[s.anchor], "anchor_text": record[f.text],
                    "anchor_image": record[f.image], "reasons": list(s.reasons),
                    "dropped": s.dropped, "negative": negative_record(config, ds, s.pick)}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def duplicate_images(paths: list[Path]) -> dict[str, int]:
    """Rows whose image file holds the same bytes as an earlier row's (by SHA-256).

    Only files whose size another file shares are read: a unique size cannot repeat.
    """
    sizes: dict[Path, int | None] = {p: _size(p) for p in dict.fromkeys(paths)}
    same_size = Counter(s for s in sizes.values() if s is not None)
    keys: dict[Path, Any] = {}
    for p, size in sizes.items():
        if size is None:
            keys[p] = None
        elif same_size[size] == 1:
            keys[p] = ("path", p)  # the only file of its size: equal only to itself
        else:
            keys[p] = _sha256(p)
    rows: dict[Any, int] = defaultdict(int)
    for p in paths:
        if keys[p] is not None:
            rows[keys[p]] += 1
    readable = sum(rows.values())
    return {"rows": len(paths), "unreadable": len(paths) - readable,
            "duplicate_rows": readable - len(rows),
            "groups": sum(c > 1 for c in rows.values())}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
