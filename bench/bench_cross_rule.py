"""The cross-score rule on the synthetic paraphrase set (tests/paraphrase.py): false
negatives mined with the rule off, caught and missed with it on, rows it removes wrongly,
and anchors whose negatives changed otherwise (through the phrase state)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from paraphrase import caught_missed_wrong, mine_case, paraphrase_case  # noqa: E402

from hnm.config import Config  # noqa: E402

COLUMNS = ("false_negatives_off", "caught", "missed", "partner_rows_removed",
           "wrongly_removed_rows", "cross_skips_counted", "other_anchors_changed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--planted", type=int, default=60)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ratios", default="0.9,0.95")
    parser.add_argument("--windows", default="1000,1")
    args = parser.parse_args()
    print(f"{args.n} records, {args.planted} planted paraphrase pairs (both directions are "
          "false negatives)\n")
    print("| seed | ratio | window | " + " | ".join(COLUMNS) + " |")
    print("|---" * (3 + len(COLUMNS)) + "|")
    for seed in map(int, args.seeds.split(",")):
        case = paraphrase_case(args.n, args.planted, seed)
        for window in map(int, args.windows.split(",")):
            base = {"joint_space": True, "min_answer_length": 0, "n_clusters": 8,
                    "seed": seed, "sliding_window_size": window}
            off = mine_case(case, Config(**base))
            for ratio in map(float, args.ratios.split(",")):
                config = Config(max_cross_score_ratio=ratio, **base)
                got = caught_missed_wrong(case, off, mine_case(case, config), config)
                print(f"| {seed} | {ratio:g} | {window} | "
                      + " | ".join(str(got[c]) for c in COLUMNS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
