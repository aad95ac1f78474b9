"""Hashes of a run's results on fixed cases: the check that a change of layout changed nothing.

`python tools/behaviour_hashes.py OUT` mines the bundled demo and fixed synthetic datasets
(each with the command line shown) and prints one line per case: the SHA-256 of
`negatives.jsonl` (or `.parquet`) and `suspects.jsonl`. Run it before and after a change, on
the same machine, and compare the lines; `--precision fp32` keeps them independent of the
CPU's bf16 support.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import make_dataset, mine_args  # noqa: E402

CASES = {
    "synthetic-default": ("--cpu-workers", "2"),
    "synthetic-3neg-drop": ("--num-negatives", "3", "--drop-suspect-negatives",
                            "--diverse-ratio", "0.5", "--cpu-workers", "1"),
    "synthetic-ivf": ("--index", "ivf", "--ivf-nlist", "16", "--ivf-nprobe", "4"),
    "synthetic-parquet-window": ("--output-format", "parquet", "--sliding-window-size", "50",
                                 "--fallback-phrase-reuse-limit", "1"),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "-"


def _mine(args: list[str]) -> None:
    subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def _line(name: str, run: Path) -> str:
    negatives = run / "negatives.jsonl"
    if not negatives.exists():
        negatives = run / "negatives.parquet"
    suspects = _digest(run / "suspects.jsonl")
    return f"{name:28} {negatives.name} {_digest(negatives)}  suspects {suspects}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    paths = make_dataset(args.out / "synthetic", args.n, seed=3, dims=(24, 32))
    subprocess.run([sys.executable, "-m", "hnm.demo", str(args.out / "demo")], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    demo = args.out / "demo"
    for name, extra in (("demo-fp32", ()), ("demo-pixels-2workers", (
            "--visual-encoder", "pixels", "--cpu-workers", "2", "--num-negatives", "2"))):
        run = args.out / "runs" / name
        _mine(["mine", "--config", "configs/demo.yaml", "--annotations",
               str(demo / "annotations.json"), "--image-dir", str(demo), "--precision", "fp32",
               "--output-dir", str(run), "--quiet", *extra])
        print(_line(name, run), flush=True)
    for name, extra in CASES.items():
        run = args.out / "runs" / name
        _mine([*mine_args(paths, run, *extra), "--overwrite"])
        print(_line(name, run), flush=True)


if __name__ == "__main__":
    main()
