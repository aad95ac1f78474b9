"""False-negative audit: negatives whose text or image repeats the anchor's are suspect."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnm.config import Config
from hnm.metrics import Metrics
from hnm.miner import CrossRule
from hnm.select import Pick

# With a joint space and the cross rule off, a negative whose text scores with the anchor's
# image above this share of the anchor's own score is suspect (the rule's starting point).
AUDIT_CROSS_RATIO = 0.95


def cross_audit_rule(config: Config) -> CrossRule:
    """What makes a negative's cross score suspect: the run's cross rule where it is on,
    else AUDIT_CROSS_RATIO."""
    rule = CrossRule(config.max_cross_score_ratio, config.min_cross_score_margin)
    return rule if rule.on else CrossRule(AUDIT_CROSS_RATIO)


def suspect_reasons(config: Config, pick: Pick) -> tuple[str, ...]:
    """Why `pick` may be a false negative: "text" (says the same as its anchor), "visual"
    (a near-duplicate image) and/or "cross" (with a joint space: its text describes the
    anchor's image about as well as the anchor's own caption, `cross_audit_rule`; only a
    diverse negative can be, where the cross rule is on). Strictly above the audit
    thresholds, judged on the exact similarities the selection used (not the rounded ones
    in the output)."""
    reasons: tuple[str, ...] = ()
    if pick.txt > config.audit_text_similarity:
        reasons += ("text",)
    if pick.vis > config.audit_visual_similarity:
        reasons += ("visual",)
    if pick.cross is not None and pick.own is not None \
            and cross_audit_rule(config).rejects(np.float64(pick.cross), np.float64(pick.own)):
        reasons += ("cross",)
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


def audit_picks(config: Config, anchors: np.ndarray, picks: list[list[Pick]]
                ) -> tuple[list[list[Pick]], list[Suspect]]:
    """The suspects among `picks` (list i belongs to anchors[i]), and the picks to output.

    Dropping (`drop_suspect_negatives`) is a post-filter on the selection's output: the
    selection pass runs unchanged — a dropped negative's phrase still counted towards its
    reuse limit and no other candidate is tried in its place — then suspects are removed,
    and an anchor left without a negative counts as a failure.
    """
    drop = config.drop_suspect_negatives
    suspects = [Suspect(int(a), p, why, drop)
                for a, row in zip(anchors.tolist(), picks) for p in row
                if (why := suspect_reasons(config, p))]
    if not (drop and suspects):
        return picks, suspects
    return [[p for p in row if not is_suspect(config, p)] for row in picks], suspects


def count_suspects(m: Metrics, suspects: list[Suspect]) -> None:
    """Every suspect the selection found, dropped or not, by kind and by reason."""
    for s in suspects:
        m.suspects[s.pick.kind] += 1
        m.suspects.update(s.reasons)
        m.suspects_dropped += s.dropped
