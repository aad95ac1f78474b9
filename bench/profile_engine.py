"""Where the engine's time goes on bench_mining's synthetic data, and two measured what-ifs."""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_mining import Setup, make_setup, parse_args, plain

import hnm.engine
import hnm.index
import hnm.miner
from hnm.engine import Candidates, find_candidates, make_selector
from hnm.metrics import Metrics
from hnm.miner import farthest

# (owner, function name, label); indented labels are part of the label above them;
# functions the installed hnm lacks (renamed, removed) are skipped
PROBES = (
    (hnm.index.FaissFlatIP, "search", "faiss search (all calls)"),
    (hnm.engine, "hard_candidates", "hard_candidates"),
    (hnm.engine, "farthest", "farthest"),
    (hnm.miner, "exact_dots", "  exact vis rescoring (exact_dots)"),
    (hnm.miner, "_text_sims", "  exact txt of candidates (text_sims)"),
    (hnm.miner, "text_sims", "  exact txt of candidates (text_sims)"),
    (hnm.engine, "farthest", "selection: widening searches"),
)


def instrument(acc: dict[str, float]) -> None:
    """Wrap each probe so that its wall time adds up in `acc`."""
    for owner, name, label in PROBES:
        inner = getattr(owner, name, None)
        if inner is None:
            continue

        def wrapper(*a: Any, _inner: Callable = inner, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t0

        setattr(owner, name, wrapper)


def timed_candidates(s: Setup) -> tuple[float, Candidates]:
    t0 = time.perf_counter()
    cands, _ = find_candidates(s.config, s.tab, np.arange(len(s.u)),
                               diverse_first=s.u < s.config.diverse_ratio)
    return time.perf_counter() - t0, cands


def timed_selection(s: Setup, cands: Candidates, widen: Callable | None = None
                    ) -> tuple[float, Metrics, list]:
    """The selection pass; `widen` replaces the selector's widening search when given."""
    selector = make_selector(s.config, s.tab, s.phrases)
    if widen is not None:
        selector.widen = widen
    metrics = Metrics()
    t0 = time.perf_counter()
    picks = selector.run(np.arange(len(s.u)), s.u, cands.hard, cands.diverse, cands.complete,
                         metrics)
    return time.perf_counter() - t0, metrics, picks


def breakdown(s: Setup, repeats: int) -> None:
    acc: dict[str, float] = defaultdict(float)
    instrument(acc)
    for r in range(repeats):
        acc.clear()
        cand, cands = timed_candidates(s)
        select, metrics, _ = timed_selection(s, cands)
        print(f"N={len(s.u):,} run {r + 1}: candidates {cand:.2f}s, selection {select:.2f}s "
              f"(diverse lists widened {metrics.diverse_widened} times)")
        for label in dict.fromkeys(label for _, _, label in PROBES):
            print(f"    {label:40s} {acc[label]:7.2f}s")


def compare_chunk(s: Setup, repeats: int, chunk: int) -> None:
    """Candidate phase with hnm.miner.CHUNK_BYTES as shipped and as `chunk`."""
    shipped = hnm.miner.CHUNK_BYTES
    results = {}
    for value in (shipped, chunk) * repeats:
        hnm.miner.CHUNK_BYTES = value
        seconds, results[value] = timed_candidates(s)
        print(f"N={len(s.u):,} CHUNK_BYTES={value:>9,}: candidates {seconds:.2f}s")
    hnm.miner.CHUNK_BYTES = shipped
    arrays = {value: cands.to_arrays() for value, cands in results.items()}
    same = all(np.array_equal(arrays[shipped][k], arrays[chunk][k], equal_nan=True)
               for k in arrays[shipped])
    print(f"candidate arrays identical: {'yes' if same else 'no'}")


def per_anchor_widen(s: Setup) -> Callable:
    """The widening search before hnm.engine.Widener: one anchor per search."""
    index = hnm.index.build_index(np.asarray(s.tab.V))

    def widen(anchor: int, size: int) -> tuple[Any, bool]:
        lists, complete = farthest(index, s.tab, np.array([anchor]), size)
        return lists.get(0), bool(complete[0])

    return widen


def compare_widen(s: Setup, repeats: int) -> None:
    """Selection pass with hnm's Widener and with a plain per-anchor widening search."""
    _, cands = timed_candidates(s)
    picks = {}
    for name in ("Widener", "per-anchor") * repeats:
        widen = per_anchor_widen(s) if name == "per-anchor" else None
        seconds, metrics, picks[name] = timed_selection(s, cands, widen)
        print(f"N={len(s.u):,} widening {name:10s}: selection {seconds:.2f}s "
              f"({metrics.diverse_widened} widenings)")
    same = plain(picks["Widener"]) == plain(picks["per-anchor"])
    print(f"picks identical: {'yes' if same else 'no'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="2000,10000")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compare-chunk", type=int, default=1 << 20, metavar="BYTES",
                   help="also time the candidate phase with this hnm.miner.CHUNK_BYTES")
    p.add_argument("--compare-widen", action="store_true",
                   help="also time the selection pass with a per-anchor widening search")
    args = p.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        s = make_setup(n, parse_args([]))
        breakdown(s, args.repeats)
        if args.compare_chunk:
            compare_chunk(s, args.repeats, args.compare_chunk)
        if args.compare_widen:
            compare_widen(s, args.repeats)


if __name__ == "__main__":
    main()
