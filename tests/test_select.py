"""The selection pass on the data that used to make it quadratic — few distinct phrases,
one cluster, phrases used up — equals the plain reference, whichever way it looks past a
saved diverse list (the free rows themselves, or a wider search first)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import reference_mine

from hnm import select
from hnm.config import Config
from hnm.data import anchor_uniforms
from hnm.engine import mine_arrays
from hnm.grid import finalize
from hnm.kmeans import kmeans
from hnm.metrics import Metrics
from hnm.miner import Arrays, eligible_phrases
from hnm.select import FreeRows, PhraseWindow


def templated_case(seed: int):
    """Templated captions: a handful of phrases shared by many rows, visual scene types."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([20, 60, 150]))
    kinds = int(rng.choice([1, 2, 4]))
    scene = rng.integers(0, kinds, n)
    V = finalize(rng.normal(size=(kinds, 8))[scene] + 0.4 * rng.normal(size=(n, 8)))
    num_phrases = int(rng.choice([1, 2, 5, 9]))
    phrases = [f"there is a piece of scene {i} " + "x" * int(rng.choice([0, 45, 90]))
               for i in range(num_phrases)]
    raw = rng.integers(0, num_phrases, n)
    order = list(dict.fromkeys(raw.tolist()))  # phrase ids in first-occurrence order
    phrases = [phrases[p] for p in order]
    text_ids = np.array([order.index(p) for p in raw.tolist()])
    T = finalize(rng.normal(size=(len(phrases), 6)) + 2.0)
    groups = np.arange(n) // int(rng.choice([1, 3, 10]))
    config = Config(
        k_nn=int(rng.choice([2, 8, 40])),
        cosine_threshold=float(rng.choice([0.1, 0.9])),
        min_visual_similarity=float(rng.choice([-1.0, 0.2])),
        diverse_ratio=float(rng.choice([0.5, 1.0])),
        min_answer_length=int(rng.choice([0, 0, 40])),
        fallback_phrase_reuse_limit=int(rng.choice([1, 3])),
        sliding_window_size=int(rng.choice([1, 3, 1000])),
        n_clusters=int(rng.choice([1, 1, 2, 5])),
        num_negatives=int(rng.choice([1, 2])),
        diverse_candidates=int(rng.choice([1, 2, 4])),
        seed=seed,
    )
    return V, T, text_ids, groups, phrases, config, n


def mine_both(seed: int):
    V, T, text_ids, groups, phrases, config, n = templated_case(seed)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    eligible = eligible_phrases(T, phrases, None, config.min_answer_length, 1.0)
    tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters)
    u = anchor_uniforms([f"r{i}" for i in range(n)], config.seed)
    got = mine_arrays(config, tab, phrases, u, n)
    want = reference_mine(V, T, text_ids, groups, phrases, clusters, None, u, config)
    plain = [[(p.row, p.kind, p.step if p.kind == "hard" else
               (p.anchor_cluster, p.negative_cluster)) for p in picks] for picks in got]
    return plain, want


@pytest.mark.parametrize("past_the_list", ["free rows", "wider search"])
@pytest.mark.parametrize("seed", range(60))
def test_templated_data_matches_the_reference(seed, past_the_list, monkeypatch):
    if past_the_list == "wider search":  # as with many free rows: a wider list first
        monkeypatch.setattr(select, "BRUTE_MIN", 0)
        monkeypatch.setattr(select, "BRUTE_SHARE", 10**9)
    got, want = mine_both(seed)
    assert got == want


def test_templated_cases_reach_exhaustion_and_every_outcome():
    """The cases above are worth something only if phrases run out and both strategies,
    failures and second negatives occur."""
    kinds, empties, pairs = set(), 0, 0
    for seed in range(60):
        _, want = mine_both(seed)
        empties += sum(not picks for picks in want)
        pairs += sum(len(picks) == 2 for picks in want)
        kinds |= {kind for picks in want for _, kind, _ in picks}
    assert kinds == {"hard", "diverse"} and empties > 100 and pairs > 10


def test_free_rows_follow_the_window():
    """The per-cluster counts of free eligible rows equal a recount after every use."""
    rng = np.random.default_rng(0)
    n, num_phrases = 300, 12
    pid = rng.integers(0, num_phrases, n)
    eligible = rng.random(n) < 0.8
    clusters = rng.integers(0, 4, n)
    limits = [int(x) for x in rng.integers(1, 4, num_phrases)]
    window = PhraseWindow(5, limits)
    free = FreeRows(pid, eligible, clusters, num_phrases)
    for phrase in rng.integers(0, num_phrases, 400).tolist():
        for changed, now in window.use(phrase):
            free.set_free(changed, now)
        is_free = window.count < np.array(limits)
        assert np.array_equal(free.phrase_free, is_free)
        rows = np.flatnonzero(eligible & is_free[pid])
        assert np.array_equal(free.listed(), rows)
        for c in range(4):
            assert free.count(c, other=False) == int((clusters[rows] == c).sum())
            assert free.count(c, other=True) == int((clusters[rows] != c).sum())


def test_no_free_row_is_answered_without_searching():
    """Once every phrase is used up, a diverse attempt neither widens nor scans."""
    rng = np.random.default_rng(1)
    n = 400
    V = finalize(rng.normal(size=(n, 8)))
    T = finalize(rng.normal(size=(3, 6)))
    phrases = ["short caption one", "short caption two", "short caption three"]
    text_ids = np.arange(n) % 3
    tab = Arrays(V, T, text_ids, np.arange(n), np.ones(n, bool), np.zeros(n, np.int64))
    config = Config(diverse_ratio=1.0, n_clusters=1, diverse_candidates=4)
    calls = []
    selector = select.Selector(tab, phrases, select.Rules(0.3, 0.3, 1.0, 3, 1), 1000,
                               lambda a, size: calls.append(a), config.diverse_candidates)
    from hnm.engine import find_candidates

    cands, _ = find_candidates(config, tab, np.arange(n))
    m = Metrics()
    picks = selector.run(np.arange(n), np.zeros(n), cands.hard, cands.diverse, cands.complete, m)
    # each phrase is used once by a diverse negative, after which none is free: the
    # remaining anchors' diverse attempts stop at the counts (hard fallbacks go on)
    assert sum(p.kind == "diverse" for ps in picks for p in ps) == 3
    assert m.diverse_widened <= 3 and not calls


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_free_rows_built_in_chunks_as_whole(seed: int, chunk: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """FreeRows built `chunk` rows at a time holds what the whole arrays give: eligible
    rows ascending and by phrase, each phrase's (cluster, count) pairs, the cluster counts."""
    monkeypatch.setattr(select, "CHUNK", chunk)
    rng = np.random.default_rng(seed)
    n = int(rng.choice([0, 1, 7, 200]))
    num_phrases = int(rng.choice([1, 5, 300]))
    pid = rng.integers(0, num_phrases, n)
    if seed % 3 == 0 and n:
        pid[: n // 2] = 0  # one phrase of many rows
    eligible = rng.random(n) < 0.7
    clusters = rng.integers(0, int(rng.choice([1, 4, 50])), n)
    free = FreeRows(pid, eligible, clusters, num_phrases)
    rows = np.flatnonzero(eligible)
    assert free.rows.tolist() == rows.tolist()
    assert free.rows_pid.tolist() == pid[rows].tolist()
    by_phrase = rows[np.argsort(pid[rows], kind="stable")]
    assert free.phrase_rows.tolist() == by_phrase.tolist()
    assert free.phrase_start.tolist() == np.searchsorted(
        np.sort(pid[rows]), np.arange(num_phrases + 1)).tolist()
    for p in range(num_phrases):
        mine = rows[pid[rows] == p]
        got = dict(zip(free.hist_cluster[free.hist_start[p]:free.hist_start[p + 1]].tolist(),
                       free.hist_count[free.hist_start[p]:free.hist_start[p + 1]].tolist()))
        want = dict(zip(*np.unique(clusters[mine], return_counts=True)))
        assert got == {int(k): int(v) for k, v in want.items()}
        assert list(got) == sorted(got)
    assert free.per_cluster.sum() == free.total == len(rows)
    assert free.per_cluster.tolist()[:int(clusters.max(initial=0)) + 1] == \
        np.bincount(clusters[rows], minlength=int(clusters.max(initial=0)) + 1).tolist()
    assert free.rows.itemsize == 4
