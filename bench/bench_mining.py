"""Benchmark: hnm's mining engine vs the original per-anchor sklearn loop, on synthetic data."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sklearn.neighbors import NearestNeighbors

from hnm.blacklist import DEFAULT_BLACKLIST
from hnm.config import Config
from hnm.data import anchor_uniforms, normalize
from hnm.engine import find_candidates, make_selector, mine_arrays, select_negatives
from hnm.grid import finalize
from hnm.kmeans import kmeans
from hnm.metrics import Metrics
from hnm.miner import Arrays, eligible_phrases, threshold_steps
from hnm.select import Pick

Plain = tuple[int, str, Any]  # (row, kind, step | (anchor_cluster, negative_cluster))


# ---------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class Setup:
    """One synthetic dataset, ready for both miners."""

    config: Config
    tab: Arrays
    phrases: list[str]
    u: np.ndarray  # (N,) per-anchor strategy draws, SPEC §7


def make_words(rng: np.random.Generator, count: int) -> list[str]:
    """Pseudo-words of 2-3 syllables (about 6 characters, like real answer words)."""
    syllables = "ba ro ne ti ku la mo si de vu ga pe lo ri na to".split()
    return sorted({"".join(rng.choice(syllables, size=int(rng.integers(2, 4))))
                   for _ in range(count)})


def make_phrases(rng: np.random.Generator, words: list[str], count: int) -> list[str]:
    """Distinct phrases of every length class: < 20 chars (too short), < 60, < 100, longer."""
    phrases: set[str] = set()
    while len(phrases) < count:
        length = int(rng.choice([1, 2, 4, 6, 9, 12, 16, 22]))
        phrases.add(" ".join(rng.choice(words, size=length)))
    return sorted(phrases)


def embed_phrases(phrases: list[str], vectors: dict[str, np.ndarray], common: np.ndarray
                  ) -> np.ndarray:
    """Bag-of-words text embeddings: phrases sharing words are similar, as with real encoders."""
    out = [np.mean([vectors[w] for w in p.split()], axis=0) + common for p in phrases]
    return finalize(np.stack(out))


def word_vectors(rng: np.random.Generator, words: set[str], dim: int) -> dict[str, np.ndarray]:
    return {w: rng.normal(size=dim) for w in sorted(words)}


def sample_texts(rng: np.random.Generator, n: int, num_phrases: int, num_banned: int
                 ) -> np.ndarray:
    """Phrase index per sample: Zipf-like reuse (about half the samples' phrases are distinct),
    and ~3% blacklisted phrases."""
    weights = 1.0 / (np.arange(num_phrases) + 0.05 * num_phrases)
    ids = rng.choice(num_phrases, size=n, p=weights / weights.sum())
    banned = rng.random(n) < 0.03
    ids[banned] = num_phrases + rng.integers(0, num_banned, int(banned.sum()))
    return ids


def sample_groups(rng: np.random.Generator, n: int) -> np.ndarray:
    """Dialog-like groups: runs of 3-7 consecutive samples."""
    sizes = rng.integers(3, 8, size=n // 3 + 1)
    return np.repeat(np.arange(len(sizes)), sizes)[:n]


def sample_visual(rng: np.random.Generator, groups: np.ndarray, dim: int, centres: int,
                  noise: float) -> np.ndarray:
    """Clustered image embeddings: each dialog sits at one of `centres` places, plus noise."""
    where = rng.normal(size=(centres, dim))[rng.integers(0, centres, groups.max() + 1)]
    return finalize(where[groups] + noise * rng.normal(size=(len(groups), dim)))


def make_setup(n: int, args: argparse.Namespace) -> Setup:
    """A realistic synthetic dataset of n samples, and the arrays the engine reads."""
    rng = np.random.default_rng(args.seed)
    words = make_words(rng, 400)
    banned = [normalize(p) for p in DEFAULT_BLACKLIST]
    vocab = make_phrases(rng, words, n)
    vectors = word_vectors(rng, set(words) | {w for p in banned for w in p.split()},
                           args.text_dim)
    common = rng.normal(size=args.text_dim) * args.text_common
    raw_ids = sample_texts(rng, n, len(vocab), len(banned))
    used, text_ids = np.unique(raw_ids, return_inverse=True)  # keep used phrases only
    phrases = [(vocab + banned)[i] for i in used]
    T = embed_phrases(phrases, vectors, common)
    groups = sample_groups(rng, n)
    V = sample_visual(rng, groups, args.dim, args.centres, args.noise)
    config = Config(k_nn=args.k_nn, seed=args.seed)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    blacklist = embed_phrases(banned, vectors, common)
    ok = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                          config.blacklist_similarity)
    tab = Arrays(V, T, text_ids.astype(np.int64), groups, ok[text_ids], clusters)
    return Setup(config, tab, phrases, anchor_uniforms([f"s{i}" for i in range(n)], args.seed))


# ---------------------------------------------------------------- baseline


class Window:
    """SPEC §4 sliding window, mirrored into an array so a scan over all samples can read it."""

    def __init__(self, size: int, num_phrases: int) -> None:
        self.size = size
        self.order: OrderedDict[int, None] = OrderedDict()
        self.count = np.zeros(num_phrases, dtype=np.int64)

    def use(self, p: int) -> None:
        if p not in self.order:
            if len(self.order) >= self.size:
                self.count[self.order.popitem(last=False)[0]] = 0
            self.order[p] = None
        self.count[p] += 1


class Baseline:
    """The original single-GPU script's way: one sklearn k-NN query and one O(N) scan per anchor.

    Similarities are rescored exactly (float64 dots of the grid-snapped embeddings, ties by
    position) so that the selections can be compared with the engine's bit for bit.
    """

    def __init__(self, s: Setup) -> None:
        self.c, tab = s.config, s.tab
        self.nn = NearestNeighbors(n_neighbors=self.c.k_nn + 1, metric="cosine").fit(tab.V)
        self.V, self.V64, self.T64 = tab.V, tab.V.astype(np.float64), tab.T.astype(np.float64)
        self.pid, self.groups, self.ok = tab.text_ids, tab.groups, tab.eligible
        self.clusters = tab.clusters
        self.limit = np.array([1 if len(p) < 60 else 2 if len(p) < 100 else 3
                               for p in s.phrases])
        self.window = Window(self.c.sliding_window_size, len(s.phrases))
        self.u = s.u

    def run(self, num_anchors: int) -> list[list[Plain]]:
        return [self.anchor(a) for a in range(num_anchors)]

    def anchor(self, a: int) -> list[Plain]:
        kinds = ("diverse", "hard") if self.u[a] < self.c.diverse_ratio else ("hard", "diverse")
        picks: list[Plain] = []
        taken: set[int] = set()
        for _ in range(self.c.num_negatives):
            found = next((f for f in (self.hard(a, taken) if k == "hard" else
                                      self.diverse(a, taken) for k in kinds) if f), None)
            if found is None:
                break
            p = int(self.pid[found[0]])
            self.window.use(p)
            taken.add(p)
            picks.append(found)
        return picks

    def neighbours(self, a: int) -> tuple[list[int], np.ndarray]:
        """N(a): this anchor's k-NN query, self dropped, exact order."""
        _, idx = self.nn.kneighbors(self.V[a:a + 1])
        rows = [j for j in idx[0].tolist() if j != a][:self.c.k_nn]
        vis = self.V64[rows] @ self.V64[a]
        order = sorted(range(len(rows)), key=lambda i: (-vis[i], rows[i]))
        return [rows[i] for i in order], vis[order]

    def hard(self, a: int, taken: set[int]) -> Plain | None:
        rows, vis = self.neighbours(a)
        txt = (self.T64[self.pid[rows]] @ self.T64[self.pid[a]]).tolist()
        steps = threshold_steps(self.c.cosine_threshold)
        for step, t in enumerate(steps):
            found = self.scan(a, rows, vis, txt, t, None, taken)
            if found is not None:
                return found, "hard", step
        found = self.scan(a, rows, vis, txt, steps[0], self.c.fallback_phrase_reuse_limit, taken)
        return None if found is None else (found, "hard", "fallback")

    def scan(self, a: int, rows: list[int], vis: np.ndarray, txt: list[float], t: float,
             limit: int | None, taken: set[int]) -> int | None:
        """One pass over N(a) with the phrase-reuse checks, SPEC §5."""
        for j, v, s in zip(rows, vis.tolist(), txt):
            if v < self.c.min_visual_similarity:
                return None
            p = int(self.pid[j])
            if self.groups[j] == self.groups[a] or not self.ok[j] or p in taken:
                continue
            if self.window.count[p] >= (self.limit[p] if limit is None else limit) or s >= t:
                continue
            return j
        return None

    def diverse(self, a: int, taken: set[int]) -> Plain | None:
        """SPEC §6 by brute force: this anchor's similarity to every sample, argmin."""
        vis = self.V64 @ self.V64[a]
        free = self.window.count[self.pid] < self.limit[self.pid]
        if taken:
            free &= ~np.isin(self.pid, list(taken))
        ok = free & self.ok & (self.groups != self.groups[a])
        ok[a] = False
        other = ok & (self.clusters != self.clusters[a])
        pool = np.flatnonzero(other if other.any() else ok)
        if not len(pool):
            return None
        j = int(pool[np.argmin(vis[pool])])  # argmin: first of ties, the lowest position
        return j, "diverse", (int(self.clusters[a]), int(self.clusters[j]))


# ---------------------------------------------------------------- timing


def plain(picks: list[list[Pick]]) -> list[list[Plain]]:
    return [[(p.row, p.kind, p.step if p.kind == "hard" else
              (p.anchor_cluster, p.negative_cluster)) for p in ps] for ps in picks]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def engine_split(s: Setup) -> tuple[float, float, Metrics]:
    """mine_arrays' two phases timed apart: (candidates s, selection s, metrics)."""
    n = len(s.u)
    anchors = np.arange(n)
    ahead = s.u < s.config.diverse_ratio  # as mine_arrays does
    t_cand, (cands, _) = timed(lambda: find_candidates(s.config, s.tab, anchors,
                                                       diverse_first=ahead))

    def selection() -> Metrics:
        selector = make_selector(s.config, s.tab, s.phrases)
        (done,) = select_negatives(s.config, selector, [(anchors, cands)], s.u, s.phrases)
        return done.metrics

    t_sel, metrics = timed(selection)
    return t_cand, t_sel, metrics


def knn_search(s: Setup) -> float:
    """Bare FAISS exact k-NN of every anchor (k_nn + 1, self included); index build excluded."""
    V = np.ascontiguousarray(s.tab.V, dtype=np.float32)
    index = faiss.IndexFlatIP(V.shape[1])
    index.add(V)
    return timed(lambda: index.search(V, s.config.k_nn + 1))[0]


def baseline_run(s: Setup, num_anchors: int) -> tuple[float, float, list[list[Plain]]]:
    """(fit s, per-anchor loop s, picks): the fit happens once, the loop scales with anchors."""
    fit, baseline = timed(lambda: Baseline(s))
    loop, picks = timed(lambda: baseline.run(num_anchors))
    return fit, loop, picks


@dataclass
class Row:
    """Medians for one N."""

    n: int
    engine: float
    cand: float
    select: float
    search: float
    base_fit: float
    base_loop: float
    base_anchors: int
    identical: bool
    metrics: Metrics

    @property
    def baseline(self) -> float:
        """Per-anchor cost is constant in the anchor count: scale the loop to all anchors."""
        return self.base_fit + self.base_loop * self.n / self.base_anchors


def bench_size(n: int, args: argparse.Namespace) -> Row:
    """Medians over repeats: engine (all anchors), its split, bare search, baseline (subset)."""
    s = make_setup(n, args)
    m = n if n <= args.baseline_full_max else min(n, args.baseline_anchors)
    keys = ("engine", "cand", "select", "search", "base fit", "base loop")
    t: dict[str, list[float]] = {k: [] for k in keys}
    identical, metrics = True, Metrics()
    for r in range(args.repeats):
        engine, picks = timed(lambda: mine_arrays(s.config, s.tab, s.phrases, s.u, n))
        t["engine"].append(engine)
        if not args.no_split:
            cand, select, metrics = engine_split(s)
            t["cand"].append(cand)
            t["select"].append(select)
        t["search"].append(knn_search(s))
        if r < args.baseline_repeats:
            fit, loop, want = baseline_run(s, m)
            t["base fit"].append(fit)
            t["base loop"].append(loop)
            identical &= plain(picks[:m]) == want
        print(f"  N={n:,} repeat {r + 1}: " + ", ".join(
            f"{k} {v[-1]:.2f}s" for k, v in t.items() if v) + f" (baseline: {m:,} anchors)",
            flush=True)
    med = {k: statistics.median(v) if v else float("nan") for k, v in t.items()}
    return Row(n, med["engine"], med["cand"], med["select"], med["search"], med["base fit"],
               med["base loop"], m, identical, metrics)


# ---------------------------------------------------------------- report


HEADER = ("| N | engine s | engine anchors/s | candidates s | selection s | k-NN search s "
          "| engine/search | baseline s (extrap.) | baseline anchors/s | speed-up "
          "| baseline timed on | outputs identical |")


def table_line(r: Row) -> str:
    how = "all anchors (measured)" if r.base_anchors == r.n else \
        f"first {r.base_anchors} anchors, extrapolated x{r.n / r.base_anchors:g}"
    return (f"| {r.n:,} | {r.engine:.2f} | {r.n / r.engine:,.0f} | {r.cand:.2f} | "
            f"{r.select:.2f} | {r.search:.2f} | {r.engine / r.search:.2f} | {r.baseline:,.1f} | "
            f"{r.n / r.baseline:,.1f} | {ratio(r.baseline / r.engine)} | {how} | "
            f"{'yes' if r.identical else 'no'} |")


def ratio(x: float) -> str:
    return f"{x:.2g}x" if x < 10 else f"{x:,.0f}x"


def workload_line(r: Row) -> str:
    """What the selection pass did: shows the synthetic data exercises every path."""
    m = r.metrics
    steps = ", ".join(f"{k}: {v}" for k, v in sorted(m.hard_steps.items(), key=str))
    return (f"| {r.n:,} | {m.successes}/{m.anchors} | {m.hard_successes} ({steps}) | "
            f"{m.diverse_successes} | {m.second_strategy_used} | {m.diverse_widened} |")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
            f"numpy {np.__version__}, faiss {faiss.__version__}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}")


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\nmachine: {machine()}")
    print(f"k_nn={args.k_nn}, dim={args.dim}, text dim={args.text_dim}, "
          f"repeats={args.repeats} (medians), baseline repeats={args.baseline_repeats}")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for r in rows:
        print(table_line(r))
    print("\nbaseline s is extrapolated linearly (fit + loop x N / anchors timed) wherever "
          "'baseline timed on' names a subset; the engine always mines all anchors.")
    first = min(rows, key=lambda r: r.n)
    print(f"outputs identical (N={first.n:,}, all {first.base_anchors:,} baseline anchors): "
          f"{'yes' if first.identical else 'no'}")
    print("ceiling = baseline / bare k-NN search, the most any engine that runs that search "
          "could gain: " + ", ".join(f"N={r.n:,}: {ratio(r.baseline / r.search)}" for r in rows))
    if not args.no_split:
        print("\n| N | anchors with a negative | hard (threshold steps) | diverse "
              "| second strategy used | diverse lists widened |\n|---|---|---|---|---|---|")
        for r in rows:
            print(workload_line(r))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="2000,10000,50000", help="comma-separated N values")
    p.add_argument("--repeats", type=int, default=3, help="engine/search runs per N (median)")
    p.add_argument("--baseline-repeats", type=int, default=3, help="baseline runs per N")
    p.add_argument("--baseline-anchors", type=int, default=500,
                   help="anchors the baseline mines above --baseline-full-max (extrapolated)")
    p.add_argument("--baseline-full-max", type=int, default=2000,
                   help="largest N at which the baseline mines every anchor")
    p.add_argument("--k-nn", type=int, default=100)
    p.add_argument("--dim", type=int, default=384, help="visual embedding size")
    p.add_argument("--text-dim", type=int, default=384, help="text embedding size")
    p.add_argument("--centres", type=int, default=200, help="visual cluster centres")
    p.add_argument("--noise", type=float, default=0.8, help="visual noise around a centre")
    p.add_argument("--text-common", type=float, default=0.15,
                   help="shared text direction (raises typical text similarity)")
    p.add_argument("--no-split", action="store_true",
                   help="skip the candidates/selection split (halves the engine runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.repeats = max(1, args.repeats)
    args.baseline_repeats = min(max(1, args.baseline_repeats), args.repeats)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report([bench_size(n, args) for n in args.sizes], args)


if __name__ == "__main__":
    main()
