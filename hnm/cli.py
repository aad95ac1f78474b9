"""Command line: argparse only, into a Config, then the orchestrator."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hnm.config import load_config
from hnm.errors import HnmError

S = argparse.SUPPRESS  # flags left out do not override the YAML or the defaults


def _mine_flags(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--config", help="YAML config (defaults < YAML < flags)")
    io.add_argument("--annotations", default=S, help="JSON list/dict of records, or JSONL")
    io.add_argument("--image-dir", default=S, help="folder image paths are relative to")
    io.add_argument("--output-dir", default=S, help="run directory (resumable)")
    io.add_argument("--split", default=S, help="dataset split name (train, val_seen, ...)")
    io.add_argument("--max-samples", type=int, default=S, help="mine only the first N anchors")
    io.add_argument("--on-missing-image", choices=("error", "skip"), default=S)
    for name in ("id", "image", "text", "group"):
        io.add_argument(f"--{name}-field", default=S, help=f"record field holding the {name}")
    enc = p.add_argument_group("encoders")
    enc.add_argument("--visual-encoder", default=S,
                     help="efficientnet-lite0 | pixels | HF model folder or id")
    enc.add_argument("--text-encoder", default=S, help="minilm | HF model folder or id")
    enc.add_argument("--image-embeddings", default=S, help="precomputed .npy, one row/record")
    enc.add_argument("--text-embeddings", default=S, help="precomputed .npy, one row/record")
    enc.add_argument("--batch-size", type=int, default=S, help="batch size (default 64)")
    enc.add_argument("--num-workers", type=int, default=S, help="data-loading workers (4)")
    mine = p.add_argument_group("mining")
    for flag, kind, text in (
            ("--k-nn", int, "number of k-NN neighbours (30)"),
            ("--cosine-threshold", float, "text similarity threshold (0.3)"),
            ("--min-visual-similarity", float, "minimum visual similarity of hard negatives"),
            ("--diverse-ratio", float, "share of anchors trying diverse first (0.3)"),
            ("--min-answer-length", int, "minimum answer length of a negative (20)"),
            ("--fallback-phrase-reuse-limit", int, "phrase reuse limit in fallback (3)"),
            ("--sliding-window-size", int, "phrases remembered for reuse limits (1000)"),
            ("--blacklist-similarity", float, "max similarity to a blacklist phrase (0.75)"),
            ("--n-clusters", int, "k-means clusters for diverse negatives (30)"),
            ("--num-negatives", int, "negatives per anchor (1)"),
            ("--diverse-pool", int, "diverse candidates kept per anchor (64)"),
            ("--seed", int, "seed of strategy draws and k-means (0)")):
        mine.add_argument(flag, type=kind, default=S, help=text)
    mine.add_argument("--blacklist", default=S, help="file, one phrase per line ('' disables)")
    dev = p.add_argument_group("devices and processes")
    dev.add_argument("--gpu-id", type=int, default=S, help="single-GPU mode on this GPU")
    dev.add_argument("--gpu-ids", default=S, help="comma-separated GPU indices")
    dev.add_argument("--num-gpus", type=int, default=S, help="GPUs to use (default: all)")
    dev.add_argument("--cpu-workers", type=int, default=S, help="CPU worker processes (1)")
    dev.add_argument("--max-retries", type=int, default=S, help="retries of a failed shard")
    dev.add_argument("--quiet", action="store_true", default=S, help="only the final summary")
    dev.add_argument("--overwrite", action="store_true", default=S,
                     help="replace a run with another config in --output-dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnm", description="Hard and diverse negative mining "
                                     "for image-text datasets.")
    sub = parser.add_subparsers(dest="command")
    _mine_flags(sub.add_parser("mine", help="mine negatives (the default command)"))
    return parser


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    values = {k: v for k, v in vars(ns).items() if k not in ("command", "config")}
    fields = {name: values.pop(f"{name}_field") for name in ("id", "image", "text", "group")
              if f"{name}_field" in values}
    if fields:
        values["fields"] = fields
    return values


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hnm` and `launch.py`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["mine", *argv]  # launch.py takes the mining flags directly
    parser = build_parser()
    ns = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config = load_config(ns.config, _overrides(ns))
        from hnm import orchestrator

        orchestrator.run(config)
    except HnmError as exc:
        print(f"hnm: error: {exc}", file=sys.stderr)
        return 2
    return 0
