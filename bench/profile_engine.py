"""Where the engine's candidate phase spends its time, and what a faster exact_dots would save."""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_mining import engine_split, make_setup, parse_args

import hnm.index
import hnm.miner
import hnm.worker
from hnm.worker import mine_candidates

# (module, function name, label); nested labels overlap their parents by design
PROBES = (
    (hnm.index.FaissFlatIP, "search", "faiss search"),
    (hnm.miner, "_sorted_exact", "  exact vis rescoring (_sorted_exact)"),
    (hnm.miner, "_text_sims", "  exact txt of candidates (_text_sims)"),
    (hnm.miner, "exact_dots", "  exact_dots, all calls"),
    (hnm.worker, "hard_candidates", "hard_candidates"),
    (hnm.worker, "farthest", "farthest"),
)


def fast_exact_dots(xa: np.ndarray, ra: np.ndarray, xb: np.ndarray, rb: np.ndarray
                    ) -> np.ndarray:
    """Proposed hnm.miner.exact_dots: cache-sized chunks and a batched matmul.

    Same values bit for bit: grid-snapped inputs make every float64 summation order exact.
    """
    out = np.empty(rb.shape, dtype=np.float64)
    step = max(1, (1 << 21) // max(1, rb.shape[1] * xb.shape[1] * 8))
    for s in range(0, len(ra), step):
        q = np.asarray(xa[ra[s:s + step]], dtype=np.float64)  # (b, d)
        g = np.asarray(xb[rb[s:s + step]], dtype=np.float64)  # (b, k, d)
        out[s:s + step] = (g @ q[:, :, None])[:, :, 0]
    return out


def instrument(acc: dict[str, float]) -> None:
    """Wrap each probe so that its wall time adds up in `acc`."""
    for owner, name, label in PROBES:
        inner = getattr(owner, name)

        def wrapper(*a: Any, _inner: Callable = inner, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t0

        setattr(owner, name, wrapper)


def run(n: int, repeats: int) -> None:
    s = make_setup(n, parse_args([]))
    acc: dict[str, float] = defaultdict(float)
    instrument(acc)
    for r in range(repeats):
        acc.clear()
        cand, select, metrics = engine_split(s)
        print(f"N={n:,} run {r + 1}: candidates {cand:.2f}s, selection {select:.2f}s "
              f"(diverse lists widened: {metrics.diverse_widened})")
        for label, seconds in acc.items():
            print(f"    {label:40s} {seconds:7.2f}s")


def compare_dots(n: int, repeats: int) -> None:
    """Candidate phase with the current and the proposed exact_dots: time and equality."""
    s = make_setup(n, parse_args([]))
    anchors = np.arange(n)
    current = hnm.miner.exact_dots
    results = {}
    for name, fn in (("current", current), ("proposed", fast_exact_dots)) * repeats:
        hnm.miner.exact_dots = fn
        t0 = time.perf_counter()
        arrays, _ = mine_candidates(s.config, s.tab, anchors)
        print(f"N={n:,} exact_dots {name:8s}: candidates {time.perf_counter() - t0:.2f}s")
        results[name] = arrays
    hnm.miner.exact_dots = current
    same = all(np.array_equal(results["current"][k], results["proposed"][k], equal_nan=True)
               for k in results["current"])
    print(f"candidate arrays identical: {'yes' if same else 'no'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="10000")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compare-dots", action="store_true",
                   help="also time the candidate phase with the proposed exact_dots")
    args = p.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        run(n, args.repeats)
        if args.compare_dots:
            compare_dots(n, args.repeats)


if __name__ == "__main__":
    main()
