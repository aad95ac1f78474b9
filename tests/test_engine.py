"""The engine's negatives equal the plain reference's on many randomized datasets."""

from __future__ import annotations

import numpy as np
import pytest
from reference import reference_mine

from hnm.config import Config
from hnm.data import anchor_uniforms
from hnm.engine import mine_arrays
from hnm.grid import finalize
from hnm.kmeans import kmeans
from hnm.miner import Arrays, eligible_phrases

WORDS = ("fly north south east west along road river lake field roof red grey building "
         "bridge turn left right past the next to until you reach land near big small").split()


def random_phrases(rng, count):
    """Phrases of every reuse class: short (< min length), < 60, < 100 and longer."""
    phrases = set()
    while len(phrases) < count:
        length = rng.choice([1, 3, 8, 14, 22])
        phrases.add(" ".join(rng.choice(WORDS, size=length)))
    return sorted(phrases)


def random_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([2, 3, 5, 12, 40, 90, 160]))
    dim = int(rng.choice([3, 6, 16]))
    # few distinct vectors, so exact ties and duplicates are common
    protos = rng.normal(size=(max(1, n // int(rng.choice([1, 2, 4]))), dim))
    V = protos[rng.integers(0, len(protos), n)]
    V = finalize(V + rng.normal(scale=float(rng.choice([0.0, 0.3])), size=V.shape) *
                 (rng.random((n, 1)) < 0.7))
    phrases = random_phrases(rng, max(1, n // int(rng.choice([1, 2, 3]))))
    text_ids = rng.integers(0, len(phrases), n)
    used = sorted(set(text_ids.tolist()))  # keep only used phrases, first-occurrence order
    order = list(dict.fromkeys(text_ids.tolist()))
    remap = {p: i for i, p in enumerate(order)}
    phrases = [phrases[p] for p in order]
    text_ids = np.array([remap[p] for p in text_ids.tolist()])
    assert len(used) == len(phrases)
    T = finalize(rng.normal(size=(len(phrases), 8)) + rng.normal(size=(1, 8)) * 1.5)
    groups = rng.integers(0, max(1, n // int(rng.choice([1, 3, 6]))), n)
    config = Config(
        k_nn=int(rng.choice([1, 3, 10, 50, 400])),
        cosine_threshold=float(rng.choice([-0.2, 0.1, 0.3, 0.6])),
        min_visual_similarity=float(rng.choice([-1.0, 0.0, 0.3, 0.8])),
        diverse_ratio=float(rng.choice([0.0, 0.3, 1.0])),
        min_answer_length=int(rng.choice([0, 20, 60])),
        fallback_phrase_reuse_limit=int(rng.choice([1, 3])),
        sliding_window_size=int(rng.choice([1, 4, 1000])),
        blacklist_similarity=float(rng.choice([0.5, 0.75, 1.0])),
        n_clusters=int(rng.choice([1, 3, 30, 500])),
        num_negatives=int(rng.choice([1, 1, 2])),
        diverse_candidates=int(rng.choice([1, 2, 64])),
        seed=seed,
    )
    blacklist = finalize(rng.normal(size=(3, 8))) if rng.random() < 0.6 else None
    return V, T, text_ids, groups, phrases, blacklist, config, n


def engine_vs_reference(seed):
    V, T, text_ids, groups, phrases, blacklist, config, n = random_case(seed)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    eligible = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                                config.blacklist_similarity)
    tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters)
    ids = [f"r{i}" for i in range(n)]
    anchors = int(np.random.default_rng(seed).integers(1, n + 1))
    u = anchor_uniforms(ids[:anchors], config.seed)
    got = mine_arrays(config, tab, phrases, u, anchors)
    want = reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u, config)
    got_plain = [[(p.row, p.kind, p.step if p.kind == "hard" else
                   (p.anchor_cluster, p.negative_cluster)) for p in picks] for picks in got]
    return got_plain, want, got


@pytest.mark.parametrize("seed", range(150))
def test_engine_matches_reference(seed):
    got, want, _ = engine_vs_reference(seed)
    assert got == want


def test_random_cases_cover_the_interesting_paths():
    """The randomized cases above are only worth something if they reach every branch."""
    kinds, steps, empties = set(), set(), 0
    for seed in range(150):
        _, want, _ = engine_vs_reference(seed)
        for picks in want:
            empties += not picks
            for _row, kind, detail in picks:
                kinds.add(kind)
                if kind == "hard":
                    steps.add(detail)
    assert kinds == {"hard", "diverse"}
    assert steps == {0, 1, 2, "fallback"}
    assert empties > 0


def test_similarities_are_exact_whatever_the_summation_order():
    rng = np.random.default_rng(0)
    X = finalize(rng.normal(size=(50, 384)))
    by_blas = X.astype(np.float64) @ X.astype(np.float64).T
    by_loop = np.array([[sum(float(a) * float(b) for a, b in zip(x, y)) for y in X[:5]]
                        for x in X[:5]])
    assert np.array_equal(by_blas[:5, :5], by_loop)
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)


def test_picks_carry_exact_similarities():
    _, _, got = engine_vs_reference(7)
    V, T, text_ids, *_ = random_case(7)
    for a, picks in enumerate(got):
        for p in picks:
            assert p.vis == float(V[a].astype(np.float64) @ V[p.row].astype(np.float64))
            assert p.txt == float(T[text_ids[a]].astype(np.float64)
                                  @ T[text_ids[p.row]].astype(np.float64))
