"""The false-negative audit: suspects, dropping them, the metrics of the output, duplicate
image files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from reference import duplicate_images
from synthetic import make_dataset, mine_args
from test_engine import random_case

from hnm.cli import main
from hnm.data import anchor_uniforms
from hnm.engine import Selected, find_candidates, make_selector, select_negatives
from hnm.grid import finalize
from hnm.kmeans import kmeans
from hnm.miner import Arrays, eligible_phrases


def selection(seed: int, **changes) -> tuple:
    """A randomized case through candidates, the selection pass and the audit."""
    V, T, text_ids, groups, phrases, blacklist, config, n = random_case(seed)
    config = dataclasses.replace(config, **changes)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    eligible = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                                config.blacklist_similarity)
    tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters)
    anchors = np.arange(n)
    u = anchor_uniforms([f"r{i}" for i in range(n)], config.seed)
    cands, _ = find_candidates(config, tab, anchors)
    (done,) = select_negatives(config, make_selector(config, tab, phrases), [(anchors, cands)],
                               u)
    return config, tab, phrases, u, done


def exact_sims(tab: Arrays, a: int, row: int) -> tuple[float, float]:
    """(txt, vis) of a pair, from the embeddings themselves."""
    t = tab.T[tab.text_ids]
    return (float(np.dot(t[a].astype(np.float64), t[row].astype(np.float64))),
            float(np.dot(tab.V[a].astype(np.float64), tab.V[row].astype(np.float64))))


@pytest.mark.parametrize("seed", range(0, 150, 3))
def test_metrics_count_the_output_picks(seed):
    """Every output figure, counted here directly from the picks, equals the metrics'."""
    config, tab, phrases, u, done = selection(seed)
    s, picks = done.metrics.summary(), done.picks
    flat = [(a, p) for a, row in enumerate(picks) for p in row]
    hard = [p for _, p in flat if p.kind == "hard"]
    diverse = [p for _, p in flat if p.kind == "diverse"]
    uses = Counter(int(tab.text_ids[p.row]) for _, p in flat)
    first = ["diverse" if u[a] < config.diverse_ratio else "hard" for a in range(len(picks))]
    assert (s["anchors"], s["successes"], s["negatives"]) == (
        len(picks), sum(map(bool, picks)), len(flat))
    assert (s["hard_negatives"], s["diverse_negatives"]) == (len(hard), len(diverse))
    assert s["hard_threshold_steps"] == {str(k): sum(p.step == k for p in hard)
                                         for k in (0, 1, 2, "fallback")}
    assert s["second_strategy_used"] == sum(p.kind != first[a] for a, p in flat)
    assert s["distinct_negative_phrases"] == len(uses)
    assert s["max_phrase_reuse"] == max(uses.values(), default=0)
    assert s["cluster_diversity"] == (round(np.mean([p.anchor_cluster != p.negative_cluster
                                                     for p in diverse]), 6) if diverse else None)
    assert s["hard_below_min_visual_similarity"] == 0
    for key, values in (("hard_text_similarity", [p.txt for p in hard]),
                        ("hard_visual_similarity", [p.vis for p in hard]),
                        ("diverse_visual_similarity", [p.vis for p in diverse])):
        assert s[key]["count"] == len(values)
        if values:
            assert s[key]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
            assert (s[key]["min"], s[key]["max"]) == (round(min(values), 6),
                                                      round(max(values), 6))
    lengths = [len(phrases[tab.text_ids[a]]) for a in range(len(picks))]
    assert s["anchor_answer_length"]["mean"] == pytest.approx(np.mean(lengths), abs=1e-6)
    if config.num_negatives == 1:  # one attempt per anchor, one more when the first failed
        assert s["hard_attempts"] + s["diverse_attempts"] == (
            s["anchors"] + s["second_strategy_used"] + s["failures"])


def test_dropping_removes_exactly_the_suspects():
    dropped = emptied = 0
    for seed in range(0, 150, 5):
        d, e = check_drop(seed)
        dropped, emptied = dropped + d, emptied + e
    assert dropped > 50 and emptied > 10  # the cases reach what they test


def check_drop(seed: int) -> tuple[int, int]:
    """Audit one case with low thresholds; returns (suspects dropped, anchors emptied)."""
    thresholds = {"audit_text_similarity": 0.2, "audit_visual_similarity": 0.5}
    *_, kept = selection(seed, **thresholds)
    config, tab, _, _, done = selection(seed, **thresholds, drop_suspect_negatives=True)
    picks = kept.picks  # the selection pass does not depend on dropping
    want, kinds, reasons = [], {"hard": 0, "diverse": 0}, {"text": 0, "visual": 0}
    for a, row in enumerate(picks):
        keep = []
        for p in row:
            txt, vis = exact_sims(tab, a, p.row)
            if txt > 0.2 or vis > 0.5:
                kinds[p.kind] += 1
                reasons["text"] += txt > 0.2
                reasons["visual"] += vis > 0.5
            else:
                keep.append(p)
        want.append(keep)
    assert done.picks == want
    s = done.metrics.summary()
    total = sum(kinds.values())
    assert s["suspect_negatives"] == {"total": total, **kinds, "text_similarity":
                                      reasons["text"], "visual_similarity": reasons["visual"],
                                      "dropped": total}
    assert s["successes"] == sum(bool(r) for r in want)
    assert s["negatives"] == sum(map(len, want))
    hard = [p.txt for r in want for p in r if p.kind == "hard"]
    assert s["hard_negatives"] == len(hard) == s["hard_successes"]
    if hard:
        assert s["hard_text_similarity"]["mean"] == pytest.approx(np.mean(hard), abs=1e-6)
    # the selection pass itself is unchanged
    assert s["hard_attempts"] == kept.metrics.hard_attempts
    assert [(x.anchor, x.pick) for x in done.suspects] == [
        (a, p) for a, row in enumerate(picks) for p in row if p not in want[a]]
    return total, sum(bool(r) and not w for r, w in zip(picks, want))


def test_nothing_is_dropped_unless_asked():
    *_, done = selection(7, audit_text_similarity=-1.0, audit_visual_similarity=-1.0)
    assert isinstance(done, Selected)
    negatives = sum(map(len, done.picks))
    assert negatives > 0
    assert len(done.suspects) == negatives
    assert done.metrics.summary()["negatives"] == negatives
    assert done.metrics.summary()["suspect_negatives"]["total"] == negatives
    assert done.metrics.summary()["suspect_negatives"]["dropped"] == 0


def test_duplicate_images_are_found_by_content(tmp_path: Path):
    a, b, c, d = (tmp_path / n for n in ("a.png", "b.png", "c.png", "missing.png"))
    a.write_bytes(b"\x89PNG same bytes")
    shutil.copy(a, b)
    c.write_bytes(b"\x89PNG SAME BYTES")  # same size, other content: not a duplicate
    (tmp_path / "e.png").write_bytes(b"unique")
    got = duplicate_images([a, b, a, c, d, tmp_path / "e.png"])
    # contents: {a, b, a} one group of 3 rows, c alone, e alone; d unreadable
    assert got == {"rows": 6, "unreadable": 1, "duplicate_rows": 2, "groups": 1}


def _negatives(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "negatives.jsonl").read_text().splitlines()]


def test_run_flags_suspects_and_drops_them(tmp_path: Path):
    paths = make_dataset(tmp_path / "data", n=160, seed=3)
    flags = ("--audit-text-similarity", "0.3", "--audit-visual-similarity", "0.95")
    assert main(mine_args(paths, tmp_path / "keep", *flags)) == 0
    assert main(mine_args(paths, tmp_path / "drop", *flags, "--drop-suspect-negatives")) == 0
    # the similarities hnm uses: of the grid-snapped embeddings (exact in float64)
    V = finalize(np.load(paths["image_embeddings"])).astype(np.float64)
    T = finalize(np.load(paths["text_embeddings"])).astype(np.float64)
    records = _negatives(tmp_path / "keep")
    row = {r["id"]: i for i, r in enumerate(records)}
    expected_suspects = []
    for i, r in enumerate(records):
        for n in r["negatives"]:
            txt, vis = T[i] @ T[row[n["id"]]], V[i] @ V[row[n["id"]]]
            assert n["suspect"] == bool(txt > 0.3 or vis > 0.95)
            if n["suspect"]:
                expected_suspects.append((r["id"], n["id"]))
    assert len(expected_suspects) > 5
    listed = [json.loads(line) for line in (tmp_path / "keep/suspects.jsonl").open()]
    assert [(s["anchor_id"], s["negative"]["id"]) for s in listed] == expected_suspects
    assert not any(s["dropped"] for s in listed)
    # dropping: the same output less the suspects; they are listed as dropped
    dropped = _negatives(tmp_path / "drop")
    kept = [[n for n in r["negatives"] if not n["suspect"]] for r in records]
    assert [{**r, "outcome": None} for r in dropped] == \
        [{**r, "negatives": k, "outcome": None} for r, k in zip(records, kept)]
    # an anchor whose every negative was dropped says so; the others keep their outcome
    assert [r["outcome"]["reason"] for r in dropped] == \
        ["suspect_dropped" if r["negatives"] and not k else r["outcome"]["reason"]
         for r, k in zip(records, kept)]
    listed_dropped = [json.loads(line) for line in (tmp_path / "drop/suspects.jsonl").open()]
    assert [s["negative"] for s in listed_dropped] == [s["negative"] for s in listed]
    assert all(s["dropped"] for s in listed_dropped)
    keep_g = json.loads((tmp_path / "keep/metrics.json").read_text())["global"]
    drop_g = json.loads((tmp_path / "drop/metrics.json").read_text())["global"]
    assert keep_g["suspect_negatives"]["total"] == len(expected_suspects)
    assert drop_g["suspect_negatives"]["dropped"] == len(expected_suspects)
    assert drop_g["negatives"] == keep_g["negatives"] - len(expected_suspects)
    assert drop_g["successes"] == sum(bool(r["negatives"]) for r in dropped)
    assert keep_g["duplicate_images"]["duplicate_rows"] == _byte_duplicates(paths, records)


def _byte_duplicates(paths: dict, records: list[dict]) -> int:
    contents = [(Path(paths["image_dir"]) / r["image"]).read_bytes() for r in records]
    return len(contents) - len(set(contents))
