"""Every anchor's outcome — why it got fewer negatives than asked, and what each rule of the
hard scan skipped — equals a plain per-neighbour classification (tests/reference.py), and
the metrics add up."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
from reference import reference_mine
from test_engine import random_case
from test_select import templated_case

from hnm.data import anchor_uniforms
from hnm.engine import find_candidates, make_selector, select
from hnm.index import kmeans
from hnm.miner import Tables, eligible_phrases
from hnm.outcome import REASONS


def both(case, drop: bool):
    """The engine's outcomes (as the reference writes them) and the reference's, and the
    engine's metrics."""
    V, T, text_ids, groups, phrases, blacklist, config, n = case
    config = dataclasses.replace(config, drop_suspect_negatives=drop,
                                 audit_text_similarity=0.6, audit_visual_similarity=0.9)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    eligible = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                                config.blacklist_similarity)
    tab = Tables(V, T, text_ids, groups, eligible[text_ids], clusters)
    u = anchor_uniforms([f"r{i}" for i in range(n)], config.seed)
    anchors = np.arange(n)
    cands, _ = find_candidates(config, tab, anchors, diverse_first=u < config.diverse_ratio)
    (done,) = select(config, make_selector(config, tab, phrases), [(anchors, cands)], u,
                     phrases)
    got = []
    for i in range(n):
        record = done.outcomes.record(i, several=True)
        got.append((record["reason"], record["missing"], record["skipped"]))
    want: list = []
    reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u, config,
                   outcomes=want)
    return got, want, done.metrics.summary()


def _cases():
    for seed in [*range(24), 34]:  # 34: two rows of one group, no diverse negative at all
        yield "random", seed, random_case(seed)
    for seed in range(16):
        V, T, text_ids, groups, phrases, config, n = templated_case(seed)
        yield "templated", seed, (V, T, text_ids, groups, phrases, None, config, n)


CASES = list(_cases())


def test_outcomes_match_the_reference():
    reasons: Counter = Counter()
    rules: Counter = Counter()
    for kind, seed, case in CASES:
        got, want, summary = both(case, drop=seed % 2 == 1)
        assert got == want, (kind, seed)
        failures = [r for r, missing, _ in got if missing == case[6].num_negatives]
        assert summary["failure_reasons"] == {r: failures.count(r) for r in REASONS}
        assert sum(summary["failure_reasons"].values()) == summary["failures"]
        short = [r for r, missing, _ in got if 0 < missing < case[6].num_negatives]
        assert summary["fewer_than_asked"] == {r: short.count(r) for r in REASONS}
        skipped = sum((Counter(s) for _, _, s in got if s), Counter())
        assert summary["skipped"] == {r: skipped[r] for r in summary["skipped"]}
        reasons.update(r for r, _, _ in got)
        rules += skipped
    # worth something only if the cases reach the reasons and rules (text_similar ends a
    # scan only where no diverse negative can exist: it is not reached here)
    assert {"min_visual", "same_group", "ineligible", "repeated_phrase", "phrase_cap",
            "no_diverse", "suspect_dropped", None} <= set(reasons), reasons
    assert set(rules) == {"min_visual", "same_group", "ineligible", "text_similar",
                          "repeated_phrase", "phrase_cap"}, rules
