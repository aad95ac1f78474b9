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

from hnm.decoding import first_line, one_line
from hnm.errors import HnmError, InternalError, Terminated
from hnm.options import INPUTS, OPTIONS, Option
from hnm.safety import details_file
from hnm.storage import RunDir, run_lock

# A flag left out of the command line must not override the YAML or the defaults.
UNSET = argparse.SUPPRESS


def _mine_flags(p: argparse.ArgumentParser) -> None:
    """Every option of hnm.options as a flag, in its group; --config first."""
    groups = {INPUTS: p.add_argument_group(INPUTS)}
    groups[INPUTS].add_argument("--config", help="YAML config (defaults < YAML < flags)")
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = p.add_argument_group(option.group)
        group = groups[option.group]
        group.add_argument(option.flag, default=UNSET, help=option.help_text(),
                           **_kind(option))
        if option.former:  # a hidden flag, read until option.former.removed_in
            group.add_argument("--" + option.former.key.replace("_", "-"), dest=option.dest,
                               default=UNSET, help=argparse.SUPPRESS, **_kind(option))


def _kind(option: Option) -> dict[str, Any]:
    """How argparse reads the option's value."""
    if option.kind is bool:
        return {"action": argparse.BooleanOptionalAction if option.negatable else "store_true"}
    choices = option.rule.choices if option.rule else ()
    return {"type": option.kind if option.kind in (int, float) else None,
            **({"choices": choices} if choices else {})}


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
                       ("--diverse-ratios", "values within [0, 1]"),
                       ("--max-cross-score-ratios", "values within [0, 1], `off` for the "
                        "rule off (a run with a joint space)")):
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
    export.add_argument("--missing-negative", choices=("skip", "lm-negative"),
                        help="avdn: an item that got no mined negative is left without the "
                        "_2 fields (skip, the default) or given its own language-model "
                        "negative in them (lm-negative, its metadata saying so)")
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
    if ns.max_cross_score_ratios:  # `off`: the rule off, first
        given = [v for v in ns.max_cross_score_ratios.split(",") if v.strip()]
        ratios = [v for v in given if v.strip() != "off"]
        knobs["max_cross_score_ratio"] = [None] * (len(ratios) < len(given)) + (sweep.parse_grid(
            ",".join(ratios), "--max-cross-score-ratios", float, 0.0, 1.0) if ratios else [])
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
                      ns.max_answer_length, ns.missing_negative, print)
        print(f"wrote {path}")


TOOLS = {"report": _report, "sweep": _sweep, "export": _export}


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, by key (`fields.X` as X of `fields`)."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.dest in vars(ns):
            name, _, part = option.key.partition(".")
            value = getattr(ns, option.dest)
            if part:
                values.setdefault(name, {})[part] = value
            else:
                values[name] = value
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
    first = first_line(str(exc))[:200]
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
