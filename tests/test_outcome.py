"""Every anchor's outcome — why it got fewer negatives than asked, and what each rule of the
hard scan skipped — equals a plain per-neighbour classification (tests/reference.py), and
the metrics add up."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from builders import read_jsonl
from reference import reference_mine
from synthetic import mine_args
from test_engine import random_case
from test_select import templated_case
from test_sweep import templated

from hnm.cli import main
from hnm.data import anchor_uniforms
from hnm.engine import find_candidates, make_selector, select_negatives
from hnm.kmeans import kmeans
from hnm.miner import Arrays, eligible_phrases
from hnm.outcome import REASON_LABELS, REASONS
from hnm.outputs import read_records
from hnm.storage import RunDir
from hnm.summary import print_summary, suggestion, summary_lines


def both(case, drop: bool):
    """The engine's outcomes (as the reference writes them) and the reference's, and the
    engine's metrics."""
    V, T, text_ids, groups, phrases, blacklist, config, n = case
    config = dataclasses.replace(config, drop_suspect_negatives=drop,
                                 audit_text_similarity=0.6, audit_visual_similarity=0.9)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    eligible = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                                config.blacklist_similarity)
    tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters)
    u = anchor_uniforms([f"r{i}" for i in range(n)], config.seed)
    anchors = np.arange(n)
    cands, _ = find_candidates(config, tab, anchors, diverse_first=u < config.diverse_ratio)
    (done,) = select_negatives(config, make_selector(config, tab, phrases), [(anchors, cands)],
                               u)
    got = []
    for i in range(n):
        record = done.outcomes.record(i, several=True)
        got.append((record["reason"], record["missing"], record["skipped"]))
    want: list = []
    reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u, config,
                   outcomes=want)
    return got, want, done.metrics.summary()


def _cases():
    for seed in [*range(16), 34]:  # 34: two rows of one group, no diverse negative at all
        yield "random", seed, random_case(seed)
    for seed in range(12):
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


def test_outputs_metrics_summary_and_report(tmp_path: Path):
    """Two negatives asked of templated captions: the outcome in negatives.jsonl and
    negatives.parquet alike, metrics that add up per shard, the summary line, the report."""
    paths = templated(tmp_path / "data")
    flags = ("--num-negatives", "2", "--drop-suspect-negatives", "--audit-text-similarity",
             "0.3")
    assert main(mine_args(paths, tmp_path / "j", "--cpu-workers", "2", *flags)) == 0
    assert main(mine_args(paths, tmp_path / "p", *flags, "--output-format", "parquet")) == 0
    rows = read_jsonl(tmp_path / "j/negatives.jsonl")
    assert [r for _, r in read_records(RunDir(tmp_path / "p"))] == rows
    metrics = json.loads((tmp_path / "j/metrics.json").read_text())
    g, shards = metrics["global"], metrics["shards"]
    assert len(shards) == 2
    for key in ("failure_reasons", "fewer_than_asked", "skipped"):
        assert g[key] == {k: sum(s[key][k] for s in shards) for k in g[key]}
    want = Counter(r["outcome"]["reason"] for r in rows if not r["negatives"])
    assert g["failure_reasons"] == {r: want[r] for r in REASONS}
    assert sum(g["failure_reasons"].values()) == g["failures"] > 0
    short = Counter(r["outcome"]["reason"] for r in rows if len(r["negatives"]) == 1)
    assert g["fewer_than_asked"] == {r: short[r] for r in REASONS} and sum(short.values())
    assert all(r["outcome"]["missing"] == 2 - len(r["negatives"]) for r in rows)
    assert sum(g["skipped"].values()) == sum(sum((r["outcome"]["skipped"] or {}).values())
                                             for r in rows)
    line = next(x for x in summary_lines(metrics) if x.startswith("  No negative for"))
    shares = sorted(((n, r) for r, n in want.items()), key=lambda x: -x[0])
    assert line == f"  No negative for {g['failures']:,} anchors: " + ", ".join(
        f"{REASON_LABELS[r]} {n / g['failures']:.0%}" for n, r in shares)
    printed: list[str] = []
    print_summary(metrics, printed.append, width=80)  # a pipe, a log, an 80-column terminal
    assert max(map(len, printed)) <= 80
    lines = summary_lines(metrics)
    assert any(len(x) > 80 for x in lines)  # the timing line at least: it was wrapped
    joined = [x for x in printed if not x.startswith(" " * 6)]  # continuations: indent + 4
    assert len(joined) == len(lines)
    assert " ".join(printed).split() == " ".join(lines).split()  # every word kept, in order
    page = (tmp_path / "j/report.html").read_text()
    assert "<h2>Why anchors got no negative</h2>" in page
    failed = page.split("<h3>Anchors without a negative</h3>")[1].split("<h2>")[0]
    first = [r["outcome"]["reason"] for r in rows if not r["negatives"]][:12]
    assert failed.count("no negative found<br>") == len(first) > 0
    assert [REASON_LABELS[r] for r in first] == \
        re.findall(r"no negative found<br><span class='muted'>([^<]*)</span>", failed)


def _metrics(reasons: dict, successes: int = 10, config_hash: str = "h") -> dict:
    return {"global": {"failure_reasons": {r: reasons.get(r, 0) for r in REASONS},
                       "fewer_than_asked": {}, "successes": successes},
            "provenance": {"config_hash": config_hash}}


def _point(limit: int, window: int, successes: int) -> dict:
    return {"cosine_threshold": 0.3, "min_visual_similarity": 0.3,
            "fallback_phrase_reuse_limit": limit, "sliding_window_size": window,
            "diverse_ratio": 0.3, "global": {"successes": successes}}


def test_suggestion_names_the_knob_and_only_measured_figures():
    assert suggestion(_metrics({"phrase_cap": 5, "no_diverse": 5})) == \
        "phrase caps: 50% of the failures; the knob: --fallback-phrase-reuse-limit or " \
        "--sliding-window-size (hnm sweep OUTPUT_DIR --fallback-phrase-reuse-limits ... " \
        "--sliding-window-sizes ... measures it)"
    assert suggestion(_metrics({"phrase_cap": 4, "no_diverse": 5, "min_visual": 2})) is None
    run = {"cosine_threshold": 0.3, "min_visual_similarity": 0.3,
           "fallback_phrase_reuse_limit": 3, "sliding_window_size": 1000,
           "diverse_ratio": 0.3, "config_hash": "h"}
    sweep = {"run": run, "points": [_point(3, 1000, 10), _point(6, 1000, 40),
                                    _point(6, 500, 40), _point(12, 1000, 25)]}
    metrics = _metrics({"phrase_cap": 8, "no_diverse": 1})
    assert suggestion(metrics, sweep) == "phrase caps: 89% of the failures; " \
        "--fallback-phrase-reuse-limit 6 would find negatives for 40 anchors (sweep; this " \
        "run: 10)"
    worse = {"run": run, "points": [_point(3, 1000, 10), _point(1, 1000, 7)]}
    assert suggestion(metrics, worse).endswith(
        "no value of --fallback-phrase-reuse-limit or --sliding-window-size the sweep tried "
        "finds more negatives (best: --fallback-phrase-reuse-limit 1, 7 anchors; this run: 10)")
    # a sweep of another run (another config) is not quoted
    assert "sweep OUTPUT_DIR" in suggestion(_metrics({"phrase_cap": 8}, config_hash="x"), sweep)
