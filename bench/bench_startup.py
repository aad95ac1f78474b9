"""Small runs: the whole `launch.py` process on N records with precomputed embeddings
(default flags, and --cpu-workers 1; optionally the same in another checkout, e.g. a
release), against the original algorithm's mining alone at the same N (bench_mining's
per-anchor sklearn loop, extrapolated from a subset of anchors as there)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_mining import baseline_run, make_setup, parse_args  # noqa: E402
from bench_orchestrator import synthetic  # noqa: E402


def whole_run(repo: Path, args: list[str], out: Path, pycache: Path) -> float:
    """Wall seconds of one `python launch.py ...` in `repo` (which must succeed). Compiled
    modules are cached in `pycache` (as an installed package's are), whatever
    PYTHONDONTWRITEBYTECODE says: otherwise every run compiles every module it imports,
    and a larger code base pays for its size in each run."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(repo), PYTHONPYCACHEPREFIX=str(pycache))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "launch.py", "--quiet", *args, "--output-dir", str(out)],
                   cwd=repo, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k-nn", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-repo", type=Path, help="another checkout to time alike")
    parser.add_argument("--baseline-anchors", type=int, default=500)
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hnm_small_"))
    try:
        data = synthetic(opts.n, opts.dim, tmp) + ["--k-nn", str(opts.k_nn),
                                                   "--blacklist", os.devnull]
        settings = {"default": (ROOT, []), "--cpu-workers 1": (ROOT, ["--cpu-workers", "1"])}
        if opts.baseline_repo:
            settings[f"default ({opts.baseline_repo})"] = (opts.baseline_repo, [])
            settings[f"--cpu-workers 1 ({opts.baseline_repo})"] = (opts.baseline_repo,
                                                                   ["--cpu-workers", "1"])
        times: dict[str, list[float]] = {name: [] for name in settings}
        for repo, flags in settings.values():  # untimed: fills the module cache, warms files
            whole_run(repo, data + flags, tmp / "run", tmp / "pycache")
        for _ in range(opts.repeats):  # interleaved, so machine noise hits every setting alike
            for name, (repo, flags) in settings.items():
                times[name].append(whole_run(repo, data + flags, tmp / "run", tmp / "pycache"))
        mining = make_setup(opts.n, parse_args(["--dim", str(opts.dim), "--k-nn",
                                                str(opts.k_nn)]))
        anchors = min(opts.n, opts.baseline_anchors)
        fit, loop, _ = baseline_run(mining, anchors)
        original = fit + loop * opts.n / anchors
        print(f"N={opts.n:,}, precomputed {opts.dim}-d embeddings, --k-nn {opts.k_nn}; "
              f"whole process, medians of {opts.repeats}:")
        print("| setting | wall s (median) | runs | original mining / this |")
        print("|---|---|---|---|")
        for name, runs in times.items():
            med = statistics.median(runs)
            print(f"| {name} | {med:.2f} | {', '.join(f'{t:.2f}' for t in runs)} | "
                  f"{original / med:.1f}x |")
        print(f"original algorithm's mining alone: {original:.1f} s (fit {fit:.1f} s, loop "
              f"timed on {anchors} anchors, extrapolated to {opts.n:,})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
