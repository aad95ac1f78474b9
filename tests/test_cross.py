"""The positive-aware cross-score rule (a joint image-text space): the engine's negatives,
outcomes and recorded scores equal the plain reference's (tests/reference.py)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import pytest
from reference import reference_mine
from test_engine import random_case

from hnm.data import anchor_uniforms
from hnm.engine import find_candidates, make_selector, select_negatives
from hnm.grid import finalize
from hnm.kmeans import kmeans
from hnm.miner import Arrays, eligible_phrases

RULES = ((0.95, None), (0.8, None), (None, 0.05), (0.9, 0.2), (0.0, None))


def cross_case(seed):
    """A random case with phrase embeddings C in V's space: each phrase near the mean image
    of its rows (so captions score well with their own and similar images), and a rule."""
    V, T, text_ids, groups, phrases, blacklist, config, n = random_case(seed)
    rng = np.random.default_rng(1000 + seed)
    means = np.zeros((len(phrases), V.shape[1]))
    np.add.at(means, text_ids, V)
    C = finalize(means + rng.normal(scale=float(rng.choice([0.2, 0.8])), size=means.shape))
    ratio, margin = RULES[seed % len(RULES)]
    config = dataclasses.replace(config, max_cross_score_ratio=ratio,
                                 min_cross_score_margin=margin, joint_space=True,
                                 drop_suspect_negatives=seed % 3 == 0)
    return V, T, C, text_ids, groups, phrases, blacklist, config, n


def run_both(seed):
    V, T, C, text_ids, groups, phrases, blacklist, config, n = cross_case(seed)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    eligible = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                                config.blacklist_similarity)
    tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters, C)
    u = anchor_uniforms([f"r{i}" for i in range(n)], config.seed)
    anchors = np.arange(n)
    cands, _ = find_candidates(config, tab, anchors, diverse_first=u < config.diverse_ratio)
    (done,) = select_negatives(config, make_selector(config, tab, phrases), [(anchors, cands)],
                               u)
    outcomes: list = []
    want = reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u, config,
                          outcomes=outcomes, C=C)
    got_outcomes = [(r["reason"], r["missing"], r["skipped"]) for r in
                    (done.outcomes.record(i, several=True) for i in range(n))]
    return done, want, got_outcomes, outcomes, (V, C, text_ids, config)


@pytest.mark.parametrize("seed", range(60))
def test_cross_rule_matches_reference(seed):
    done, want, got_outcomes, want_outcomes, (V, C, text_ids, config) = run_both(seed)
    # the picks before the audit drops any: the reference's are the selection's
    raw = [[(p.row, p.kind, p.step if p.kind == "hard" else
             (p.anchor_cluster, p.negative_cluster)) for p in picks] for picks in done.picks]
    if not config.drop_suspect_negatives:
        assert raw == want
    assert got_outcomes == want_outcomes
    sc = np.asarray(V, np.float64) @ np.asarray(C, np.float64).T
    for a, picks in zip(done.anchors.tolist(), done.picks):
        for p in picks:  # every negative records its cross score and its anchor's own
            assert p.cross == sc[a, text_ids[p.row]] and p.own == sc[a, text_ids[a]]


def test_cross_rule_is_reached_and_changes_picks():
    """Worth something only if the rule skips rows, ends scans, and changes negatives."""
    skipped, reasons, changed = 0, Counter(), 0
    for seed in range(60):
        done, _, got, _, (V, C, text_ids, config) = run_both(seed)
        skipped += sum((s or {}).get("cross_score", 0) for _, _, s in got)
        reasons.update(r for r, _, _ in got)
        off = dataclasses.replace(config, max_cross_score_ratio=None,
                                  min_cross_score_margin=None)
        V, T, C, text_ids, groups, phrases, blacklist, _, n = cross_case(seed)
        clusters, _ = kmeans(V, off.n_clusters, off.seed)
        u = anchor_uniforms([f"r{i}" for i in range(n)], off.seed)
        plain = reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u, off)
        with_rule = reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u,
                                   config, C=C)
        changed += plain != with_rule
    assert skipped > 50 and changed > 5, (skipped, changed)
    assert "suspect_dropped" in reasons


def test_rule_off_or_no_joint_space_changes_nothing():
    """Without the rule (or without C) the picks are those of a run without a joint space;
    the scores are recorded only with one."""
    for seed in range(20):
        V, T, C, text_ids, groups, phrases, blacklist, config, n = cross_case(seed)
        off = dataclasses.replace(config, max_cross_score_ratio=None,
                                  min_cross_score_margin=None, drop_suspect_negatives=False)
        clusters, _ = kmeans(V, off.n_clusters, off.seed)
        eligible = eligible_phrases(T, phrases, blacklist, off.min_answer_length,
                                    off.blacklist_similarity)
        u = anchor_uniforms([f"r{i}" for i in range(n)], off.seed)
        runs = []
        for c in (C, None):
            tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters, c)
            anchors = np.arange(n)
            cands, _ = find_candidates(off, tab, anchors, diverse_first=u < off.diverse_ratio)
            (done,) = select_negatives(off, make_selector(off, tab, phrases),
                                       [(anchors, cands)], u)
            runs.append(done)
        strip = [[dataclasses.replace(p, cross=None, own=None) for p in row]
                 for row in runs[0].picks]
        assert strip == runs[1].picks
        assert all(p.cross is None for row in runs[1].picks for p in row)
        assert all(p.cross is not None for row in runs[0].picks for p in row)


# ---------------------------------------------------------------- paraphrases, end to end

from pathlib import Path  # noqa: E402

from builders import cli, read_jsonl  # noqa: E402
from paraphrase import caught_missed_wrong, mine_case, paraphrase_case, write_case  # noqa: E402
from synthetic import make_dataset, mine_args  # noqa: E402
from test_sweep import DATASET_KEYS, _global  # noqa: E402

from hnm import sweep  # noqa: E402
from hnm.cli import main  # noqa: E402
from hnm.config import Config  # noqa: E402


def test_paraphrases_only_the_cross_rule_catches():
    """Captions that paraphrase another image's caption in the joint space, unseen by the
    text rule and the audit's text and visual thresholds: with the rule off they are mined
    as negatives (the audit flags them for their cross score alone); at 0.95 every one is
    caught, none missed, and the rule removes almost nothing else."""
    case = paraphrase_case()
    base = {"joint_space": True, "min_answer_length": 0, "n_clusters": 8}
    on_config = Config(max_cross_score_ratio=0.95, **base)
    off, on = mine_case(case, Config(**base)), mine_case(case, on_config)
    partner = {**case["pairs"], **{b: a for a, b in case["pairs"].items()}}
    mined = [(a, p) for a, row in zip(off.anchors.tolist(), off.picks) for p in row
             if p.row == partner.get(a)]
    assert mined and {s.reasons for s in off.suspects if s.pick in dict(mined).values()} \
        == {("cross",)}
    got = caught_missed_wrong(case, off, on, on_config)
    assert got["caught"] == got["false_negatives_off"] == len(mined) > 30
    assert got["missed"] == 0 and got["partner_rows_removed"] == 2 * len(case["pairs"])
    assert got["wrongly_removed_rows"] <= got["partner_rows_removed"] // 20
    assert not on.suspects  # nothing left for the audit to flag


def test_joint_space_run_sweep_and_worker_counts(tmp_path: Path, capsys):
    """Precomputed embeddings of one space (--joint-space): 1 and 2 workers write the same
    bytes; `hnm sweep --max-cross-score-ratios` gives what reruns give, without embedding."""
    case = paraphrase_case(n=240, planted=24, seed=1)
    paths = write_case(tmp_path / "data", case)
    # the text rule in the same space: a loose threshold leaves the cross rule rows to skip
    common = ("--joint-space", "--min-answer-length", "0", "--cosine-threshold", "0.8")
    flags = (*common, "--max-cross-score-ratio", "0.95")
    runs = [tmp_path / "one", tmp_path / "two"]
    for run, workers in zip(runs, ("1", "2")):
        assert main(mine_args(paths, run, *flags, "--cpu-workers", workers)) == 0
    assert (runs[0] / "negatives.jsonl").read_bytes() == (runs[1] / "negatives.jsonl").read_bytes()
    assert (runs[0] / "suspects.jsonl").read_bytes() == (runs[1] / "suspects.jsonl").read_bytes()
    rows = read_jsonl(runs[0] / "negatives.jsonl")
    skipped = sum((r["outcome"]["skipped"] or {}).get("cross_score", 0) for r in rows)
    assert _global(runs[0])["skipped"]["cross_score"] == skipped > 0
    result = sweep.sweep(runs[0], max_cross_score_ratio=[None, 0.8, 0.95])
    points = {p["max_cross_score_ratio"]: p["global"] for p in result["points"]}
    assert {k: v for k, v in points[0.95].items() if k not in DATASET_KEYS} == _global(runs[0])
    for ratio in (None, 0.8):
        rerun = tmp_path / f"rerun_{ratio}"
        extra = ("--max-cross-score-ratio", str(ratio)) if ratio else ()
        assert main(mine_args(paths, rerun, *common, *extra)) == 0
        assert points[ratio] == _global(rerun)
    assert points[None]["skipped"]["cross_score"] == 0 and points[None] != points[0.95]
    assert points[0.8]["skipped"]["cross_score"] > points[0.95]["skipped"]["cross_score"]
    rc, out, _ = cli(capsys, "sweep", runs[0], "--max-cross-score-ratios", "off,0.8")
    assert rc == 0 and "max cross" in out and " off " in out
    # the report: every negative plotted by its scores, the rule's line, and the anchors
    # whose nearest candidates the rule removed, most first
    rc, _, err = cli(capsys, "report", runs[0])
    assert rc == 0, err
    html = (runs[0] / "report.html").read_text()
    negatives = [n for r in rows for n in r["negatives"]]
    assert html.count("<circle ") == len(negatives)
    for n in negatives[:20]:
        assert f"own {n['own_score']:.3f}, cross {n['cross_score']:.3f}" in html
    assert "rule: cross = 0.95 × own" in html
    counts = sorted(((r["outcome"]["skipped"] or {}).get("cross_score", 0) for r in rows),
                    reverse=True)
    section = html.split("Anchors whose nearest candidates the cross rule removed")[1]
    shown = [int(c) for c in re.findall(r"<td class='num'>(\d+)</td>", section)]
    top = [c for c in counts[:12] if c]
    assert top and shown[:len(top)] == top


def test_cross_settings_refused_without_one_space(tmp_path: Path, capsys):
    paths = make_dataset(tmp_path / "data", n=40)  # image 24, text 32 dimensions
    rc, _, err = cli(capsys, *mine_args(paths, tmp_path / "a", "--joint-space"))
    assert rc == 2 and err.strip() == ("hnm: error: --joint-space: the image embeddings have "
                                       "24 dimensions, the text embeddings 32; one space has "
                                       "one width")
    assert main(mine_args(paths, tmp_path / "b")) == 0
    rc, _, err = cli(capsys, "sweep", tmp_path / "b", "--max-cross-score-ratios", "0.9")
    assert rc == 2 and err.strip() == (f"hnm: error: --max-cross-score-ratios: the run in "
                                       f"{tmp_path / 'b'} has no joint image-text space "
                                       "(--joint-model or --joint-space)")
