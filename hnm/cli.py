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
from typing import TYPE_CHECKING, Any

from hnm.decoding import first_line, one_line
from hnm.errors import HnmError, InternalError, Terminated
from hnm.options import INPUTS, OPTIONS, Option
from hnm.parts import index_parts
from hnm.safety import details_file
from hnm.storage import RunDir, run_lock

if TYPE_CHECKING:
    from hnm.capacity import Shape

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
                               "embeddings), hnm export OUTPUT_DIR (training rows), hnm plan "
                               "--rows N (memory and disk before a run); see hnm report -h, "
                               "hnm sweep -h, hnm export -h, hnm plan -h"))
    _tool_flags(sub)
    _plan_flags(sub)
    return parser


def _plan_flags(sub: Any) -> None:
    """`hnm plan`: what a run of a given size needs, before any machine is bought. Values
    are read as text and checked by `_plan` (one line naming the flag)."""
    p = sub.add_parser("plan", help="memory per process, GPU memory and disk of a run of N "
                       "rows, with and without compressed codes, and what does not fit",
                       description="A rank is a machine (torchrun --nnodes), running a worker "
                       "per GPU (--nproc-per-node) or --cpu-workers without GPUs. Sizes: "
                       "bytes, or K, M, G, T (powers of 1024): 256G.")
    for flag, (metavar, what) in PLAN_FLAGS.items():
        p.add_argument(flag, metavar=metavar, help=what)
    p.add_argument("--config", metavar="FILE.yaml", help="the mining settings the figures "
                   "depend on (k_nn, diverse candidates, batch size, clusters, negatives, IVF "
                   "lists, index parts) from a run's config; the defaults without it")
    p.add_argument("--precomputed", action="store_true",
                   help="embeddings given (--image-embeddings, --text-embeddings): no encoders")
    p.add_argument("--json", action="store_true", help="the figures as JSON (bytes)")


PLAN_FLAGS = {  # flag: (metavar, help)
    "--rows": ("N", "rows to mine (required): 1000000, or with K, M, B (thousands, "
                    "millions, billions): 100M"),
    "--image-dim": ("D", "image embedding width (default 512)"),
    "--text-dim": ("D", "text embedding width (default 384)"),
    "--ranks": ("R", "machines (default 1)"),
    "--gpus-per-rank": ("G", "GPUs of each machine, a worker each (default 0: CPU workers)"),
    "--cpu-workers": ("W", "CPU workers of each machine without GPUs (default 1)"),
    "--num-workers": ("N", "data-loading processes per GPU worker (default 8)"),
    "--host-memory": ("SIZE", "memory of each machine, to check what fits: 256G"),
    "--gpu-memory": ("SIZE", "memory of each GPU, to check what fits: 80G"),
    "--parts": ("P", "index parts, each held by one worker at a time: N or auto (the "
                     "fewest that fit; default: the config's --index-parts, 1)"),
    "--index": ("KIND", "auto, exact, ivf, ivfpq or ivfsq (default auto)"),
    "--distinct-texts": ("X", "distinct texts per row, in (0, 1] (default 0.5)"),
    "--record-bytes": ("B", "bytes of one input record (default 300)"),
}


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


def _plan(ns: argparse.Namespace) -> None:
    import json
    import shutil

    from hnm import capacity, capacity_text

    shape = plan_shape(ns)
    estimates = capacity.plan(shape)
    if ns.json:
        print(json.dumps(capacity_text.to_json(shape, estimates), indent=1))
        return
    width = shutil.get_terminal_size((100, 24)).columns
    for line in capacity_text.lines(shape, estimates, width):
        print(line)


def plan_shape(ns: argparse.Namespace) -> Shape:
    """`hnm plan`'s flags, checked, as a `capacity.Shape`."""
    from hnm.capacity import INDEXES, Shape

    if ns.rows is None:
        raise HnmError("--rows: required (the rows to mine, such as 1000000 or 100M)")
    whole = {"rows": _count(ns.rows, "--rows", 1, {"K": 10**3, "M": 10**6, "B": 10**9})}
    for key, default, least in (("image_dim", 512, 1), ("text_dim", 384, 1), ("ranks", 1, 1),
                                ("gpus_per_rank", 0, 0), ("cpu_workers", 1, 1),
                                ("record_bytes", 300, 1)):
        value = getattr(ns, key)
        flag = "--" + key.replace("_", "-")
        whole[key] = default if value is None else _count(value, flag, least)
    if ns.cpu_workers is not None and whole["gpus_per_rank"]:
        raise HnmError("--cpu-workers: only for machines without GPUs (--gpus-per-rank 0)")
    loaders = None if ns.num_workers is None else _count(ns.num_workers, "--num-workers", 0)
    parts = None if ns.parts in (None, "auto") else _count(ns.parts, "--parts", 1)
    index = ns.index or "auto"
    if index not in INDEXES:
        raise HnmError(f"--index: one of {', '.join(INDEXES)}, got {index!r}")
    distinct = 0.5 if ns.distinct_texts is None else _fraction(ns.distinct_texts)
    host, gpu = (None if v is None else _bytes(v, f) for v, f in (
        (ns.host_memory, "--host-memory"), (ns.gpu_memory, "--gpu-memory")))
    if gpu is not None and not whole["gpus_per_rank"]:
        raise HnmError("--gpu-memory: only with GPUs (--gpus-per-rank N)")
    from hnm.api import make

    config = make(ns.config, {})
    if ns.parts is None:  # the config's --index-parts, where it has them
        parts = index_parts(config.index_parts, whole["rows"])
    return Shape(**whole, loaders=loaders, parts=parts, index=index, distinct_texts=distinct,
                 encoders=not ns.precomputed, host_memory=host, gpu_memory=gpu, config=config)


def _count(text: str, flag: str, least: int, units: dict[str, int] | None = None) -> int:
    """A whole number of at least `least` (with a unit suffix of `units`), or one line."""
    scale, digits = 1, text.strip().replace("_", "")
    if units and digits[-1:].upper() in units:
        scale, digits = units[digits[-1].upper()], digits[:-1]
    if not digits.isdigit() or int(digits) * scale < least:
        kind = "a positive integer" if least == 1 else f"an integer of at least {least}"
        raise HnmError(f"{flag}: must be {kind}, got {text!r}")
    return int(digits) * scale


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise HnmError(f"--distinct-texts: must be a number in (0, 1], got {text!r}")
    return value


def _bytes(text: str, flag: str) -> float:
    """A size: bytes, or a number with K, M, G or T (powers of 1024)."""
    digits = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1024 ** ("KMGT".index(digits[-1]) + 1) if digits[-1:] in ("K", "M", "G", "T") \
        else 1
    try:
        value = float(digits[:-1] if scale > 1 else digits) * scale
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise HnmError(f"{flag}: must be a size such as 256G, got {text!r}")
    return value


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
    if ns.command == "plan":
        return guarded(lambda: _plan(ns), {"output_dir": None})
    if ns.command in TOOLS:
        return guarded(lambda: TOOLS[ns.command](ns), {"output_dir": ns.output_dir})
    place: dict[str, str | None] = {"output_dir": None}
    return guarded(lambda: _mine(ns, place), place)


def _mine(ns: argparse.Namespace, place: dict[str, str | None]) -> None:
    from hnm import api
    from hnm.process import settle_imports

    settle_imports()
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
