"""Command line: argparse only, into the Python API (`hnm.api`) and the run tools."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hnm.config import INPUT_FORMATS, OUTPUT_FORMATS
from hnm.decoding import one_line
from hnm.errors import HnmError, InternalError, Terminated
from hnm.safety import details_file
from hnm.storage import RunDir, run_lock

# A flag left out of the command line must not override the YAML or the defaults.
UNSET = argparse.SUPPRESS


def _mine_flags(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--config", help="YAML config (defaults < YAML < flags)")
    io.add_argument("--annotations", default=UNSET, help="a file, a folder or a glob of shards: "
                    "JSON/JSONL, CSV/TSV, Parquet, WebDataset .tar, Hugging Face save_to_disk, "
                    "AVDN .pkl chunks")
    io.add_argument("--input-format", choices=INPUT_FORMATS, default=UNSET,
                    help="read --annotations as this format (default: from the names)")
    io.add_argument("--tensor-normalization", default=UNSET,
                    help="image tensors (avdn): imagenet (default), none, MEAN,STD or "
                    "M1,M2,M3,S1,S2,S3; maps them back to images for the model encoders")
    io.add_argument("--hf-split", default=UNSET, help="split of a Hugging Face DatasetDict")
    io.add_argument("--image-dir", default=UNSET, help="folder image paths are relative to")
    io.add_argument("--output-dir", default=UNSET, help="run directory (resumable)")
    io.add_argument("--split", default=UNSET, help="dataset split name (train, val_seen, ...)")
    io.add_argument("--max-samples", type=int, default=UNSET, help="mine only the first N anchors")
    io.add_argument("--on-missing-image", choices=("error", "skip"), default=UNSET)
    io.add_argument("--max-image-pixels", type=int, default=UNSET,
                    help="larger images count as unreadable (200000000)")
    io.add_argument("--output-format", choices=OUTPUT_FORMATS, default=UNSET,
                    help="negatives.jsonl (default) or negatives.parquet")
    for name in ("id", "image", "text", "group"):
        io.add_argument(f"--{name}-field", default=UNSET, help=f"record field holding the {name}")
    enc = p.add_argument_group("encoders")
    enc.add_argument("--visual-encoder", default=UNSET,
                     help="efficientnet-lite0 | pixels | HF model folder or id")
    enc.add_argument("--text-encoder", default=UNSET, help="minilm | HF model folder or id")
    enc.add_argument("--image-embeddings", default=UNSET, help="precomputed .npy, one row/record")
    enc.add_argument("--text-embeddings", default=UNSET, help="precomputed .npy, one row/record")
    enc.add_argument("--batch-size", type=int, default=UNSET, help="batch size (default 64)")
    enc.add_argument("--num-workers", type=int, default=UNSET,
                     help="data-loading processes per GPU (default: sized from the cores)")
    enc.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=UNSET,
                     help="what the encoders compute in (auto: bf16 where the hardware runs "
                     "it natively, else fp32)")
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
            ("--diverse-candidates", int, "diverse candidates kept per anchor (64)"),
            ("--seed", int, "seed of strategy draws and k-means (0)")):
        mine.add_argument(flag, type=kind, default=UNSET, help=text)
    mine.add_argument("--index", choices=("exact", "ivf", "auto"), default=UNSET,
                      help="search index: exact, ivf (FAISS IVF proposals, rescored exactly; "
                      "recall measured), or auto (exact up to a size, default)")
    mine.add_argument("--ivf-nlist", type=int, default=UNSET, help="IVF lists (~sqrt(rows))")
    mine.add_argument("--ivf-nprobe", type=int, default=UNSET,
                      help="IVF lists probed per query (more: higher recall, slower)")
    mine.add_argument("--diverse-pool", type=int, dest="diverse_candidates", default=UNSET,
                      help=argparse.SUPPRESS)  # the former name of --diverse-candidates
    mine.add_argument("--blacklist", default=UNSET, help="file, one phrase per line ('' disables)")
    audit = p.add_argument_group("false-negative audit")
    audit.add_argument("--audit-text-similarity", type=float, default=UNSET,
                       help="a negative whose text similarity to its anchor is above this is "
                       "suspect (0.8)")
    audit.add_argument("--audit-visual-similarity", type=float, default=UNSET,
                       help="a negative whose visual similarity to its anchor is above this "
                       "is suspect (0.98)")
    audit.add_argument("--drop-suspect-negatives", action="store_true", default=UNSET,
                       help="remove suspect negatives from the output; their anchors may be "
                       "left without one")
    dev = p.add_argument_group("devices and processes")
    dev.add_argument("--gpu-id", type=int, default=UNSET, help="single-GPU mode on this GPU")
    dev.add_argument("--gpu-ids", default=UNSET, help="comma-separated GPU indices")
    dev.add_argument("--num-gpus", type=int, default=UNSET, help="GPUs to use (default: all)")
    dev.add_argument("--cpu-workers", type=int, default=UNSET,
                     help="CPU worker processes (default: one per usable core)")
    dev.add_argument("--max-retries", type=int, default=UNSET, help="retries of a failed shard")
    dev.add_argument("--stall-timeout", type=float, default=UNSET,
                     help="seconds without progress before a worker is stopped and its shard "
                     "retried (1800; 0: never)")
    dev.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=UNSET,
                     help="only the final summary")
    dev.add_argument("--dry-run", action="store_true", default=UNSET,
                     help="validate every input and print the plan; embed nothing")
    dev.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=UNSET,
                     help="replace a run with another config in --output-dir")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag, like every other hnm error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"hnm: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hnm", description="Hard and diverse negative mining "
                     "for image-text datasets.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _mine_flags(sub.add_parser("mine", help="mine negatives (the default command)",
                               epilog="other commands: hnm report OUTPUT_DIR (the HTML run "
                               "report), hnm sweep OUTPUT_DIR (other thresholds from the saved "
                               "embeddings), hnm export OUTPUT_DIR (training rows); see "
                               "hnm report -h, hnm sweep -h, hnm export -h"))
    _tool_flags(sub)
    return parser


def _tool_flags(sub: Any) -> None:
    """The commands that read a finished run directory (paths in its config.yaml are
    relative to the folder the run was started from)."""
    report = sub.add_parser("report", help="(re)write OUTPUT_DIR/report.html")
    report.add_argument("output_dir", help="a finished run directory")
    sweep = sub.add_parser("sweep", help="metrics that other thresholds, fallback limits, "
                           "window sizes and diverse ratios would give, from the saved work "
                           "(writes OUTPUT_DIR/sweep.html and sweep.json)")
    sweep.add_argument("output_dir", help="a run directory whose index phase finished")
    sweep.add_argument("--cosine-thresholds", help="comma-separated values "
                       "(default: the run's and two steps of 0.1 either side)")
    sweep.add_argument("--min-visual-similarities", help="comma-separated values "
                       "(default: the run's and two steps of 0.1 either side)")
    for flag, what in (("--fallback-phrase-reuse-limits", "whole numbers >= 1"),
                       ("--sliding-window-sizes", "whole numbers >= 1"),
                       ("--diverse-ratios", "values within [0, 1]")):
        sweep.add_argument(flag, help=f"comma-separated {what} (default: the run's value; "
                           "with no knob given, the two thresholds get their default grids)")
    export = sub.add_parser("export", help="training-ready rows of a finished run: triplets "
                            "(anchor and negative a row) or pairs (each anchor, then its "
                            "negatives)")
    export.add_argument("output_dir", help="a finished run directory")
    export.add_argument("--format", choices=("pairs", "triplets", "avdn"), default="triplets")
    export.add_argument("--to", required=True, help="FILE.parquet (images as bytes), "
                        "FILE.jsonl (image paths) or a folder (WebDataset shards; avdn: the "
                        "processed dataset's chunks)")
    export.add_argument("--tokenizer", help="avdn: a local Hugging Face tokenizer folder, to "
                        "add tokenized_negative_2")
    export.add_argument("--max-answer-length", type=int, help="avdn, with --tokenizer: the "
                        "tokenizer's max_length (the training code's answer length limit)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing file, or an earlier export in the folder")


def _report(ns: argparse.Namespace) -> None:
    from hnm.report import report_from_dir

    with _locked(ns.output_dir):
        path = report_from_dir(ns.output_dir, lambda line: print(line, file=sys.stderr))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _locked(output_dir: str) -> Any:
    """The run directory's lock while a tool reads and writes it (no mining run may change
    it meanwhile); nothing is created where there is no run directory."""
    if not Path(output_dir).is_dir() or RunDir(output_dir).manifest() is None:
        return contextlib.nullcontext()  # not a run: nothing is written there
    return run_lock(RunDir(output_dir), print, "OUTPUT_DIR")


def _sweep(ns: argparse.Namespace) -> None:
    from hnm import sweep

    taus = ns.cosine_thresholds and sweep.parse_grid(ns.cosine_thresholds,
                                                     "--cosine-thresholds")
    mvss = ns.min_visual_similarities and sweep.parse_grid(ns.min_visual_similarities,
                                                           "--min-visual-similarities")
    knobs = {name: getattr(ns, dest) and sweep.parse_grid(getattr(ns, dest), flag, *limits)
             for name, dest, flag, limits in (
                 ("fallback_phrase_reuse_limit", "fallback_phrase_reuse_limits",
                  "--fallback-phrase-reuse-limits", (int, 1, float("inf"))),
                 ("sliding_window_size", "sliding_window_sizes", "--sliding-window-sizes",
                  (int, 1, float("inf"))),
                 ("diverse_ratio", "diverse_ratios", "--diverse-ratios", (float, 0.0, 1.0)))}
    with _locked(ns.output_dir):
        result = sweep.sweep(ns.output_dir, taus or None, mvss or None,
                             **{k: v or None for k, v in knobs.items()})
        sweep.print_table(result)
        for path in sweep.write_outputs(ns.output_dir, result):
            print(f"wrote {path}")
        advice = sweep.advice(ns.output_dir, result)
        if advice:
            print(f"Suggestion: {advice} (hnm report {ns.output_dir} shows it too)")


def _export(ns: argparse.Namespace) -> None:
    from hnm.export import export

    with _locked(ns.output_dir):
        path = export(ns.output_dir, ns.format, ns.to, ns.overwrite, ns.tokenizer,
                      ns.max_answer_length)
        print(f"wrote {path}")


TOOLS = {"report": _report, "sweep": _sweep, "export": _export}


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
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, status 2) and -h (status 0)
        return int(exc.code or 0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ns.command in TOOLS:
        return guarded(lambda: TOOLS[ns.command](ns), {"output_dir": ns.output_dir})
    place: dict[str, str | None] = {"output_dir": None}
    return guarded(lambda: _mine(ns, place), place)


def _mine(ns: argparse.Namespace, place: dict[str, str | None]) -> None:
    from hnm import api

    config = api.make(ns.config, _overrides(ns))
    place["output_dir"] = config.output_dir
    api.mine(config)


def guarded(command: Callable[[], Any], place: dict[str, str | None]) -> int:
    """Run a command; whatever goes wrong is one line on stderr and an exit status.
    `place["output_dir"]`: where a bug's traceback is logged, once known."""
    try:
        command()
    except InternalError as exc:  # a bug behind the Python API, which raises only HnmError
        return _internal(exc.__cause__ or exc, place)
    except HnmError as exc:
        print(f"hnm: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except (KeyboardInterrupt, Terminated) as exc:
        print("hnm: interrupted; finished shards are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    except BrokenPipeError:  # `hnm ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug: the details go to a log, not to the terminal
        return _internal(exc, place)
    return 0


def _internal(exc: BaseException, place: dict[str, str | None]) -> int:
    """A bug: one line naming where its traceback went; exit status 1."""
    where = _log_traceback(place["output_dir"])
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    print(f"hnm: internal error: {type(exc).__name__}: {first} — details in {where}",
          file=sys.stderr)
    return 1


def _log_traceback(output_dir: str | None) -> Path:
    """Append the current exception's traceback to OUTPUT_DIR/logs/hnm.log where
    OUTPUT_DIR is an hnm run (else, or where that cannot be written, to a new file in the
    temporary folder); returns where it went."""
    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{traceback.format_exc()}\n"
    run = RunDir(output_dir) if output_dir else None
    if run is not None and run.root.is_dir() and run.manifest() is not None:
        path = run.root / "logs" / "hnm.log"
        try:
            with os.fdopen(run.append(path), "a", encoding="utf-8") as handle:
                handle.write(text)
            return path
        except (OSError, HnmError):
            pass
    return details_file(text)
