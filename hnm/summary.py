"""The readable end-of-run summary (the guide's figures)."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable
from typing import Any

from hnm.outcome import REASON_LABELS

# A reason "dominates" when it stops at least this share of the anchors without a negative:
# then the summary and the report name the knob that addresses it.
DOMINANT = 0.5
# The knobs (config fields) that address each reason, and the flags that set them; only
# those `hnm sweep` varies get a measured figure.
KNOBS = {"phrase_cap": ("fallback_phrase_reuse_limit", "sliding_window_size"),
         "no_diverse": ("sliding_window_size",),
         "min_visual": ("min_visual_similarity",),
         "text_similar": ("cosine_threshold",),
         "ineligible": ("min_answer_length", "blacklist_similarity"),
         "repeated_phrase": ("num_negatives",),
         "suspect_dropped": ("audit_text_similarity", "audit_visual_similarity"),
         "same_group": (),
         "cross_score": ("max_cross_score_ratio", "min_cross_score_margin")}
SWEPT = {"cosine_threshold": "--cosine-thresholds",
         "min_visual_similarity": "--min-visual-similarities",
         "fallback_phrase_reuse_limit": "--fallback-phrase-reuse-limits",
         "sliding_window_size": "--sliding-window-sizes", "diverse_ratio": "--diverse-ratios",
         "max_cross_score_ratio": "--max-cross-score-ratios"}


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The guide's closing figures, from a metrics document."""
    g = metrics["global"]
    total = metrics.get("wall_seconds", sum(metrics["timing"].values()))
    rate = g["success_rate"]
    return [
        "Hard negative mining completed",
        f"  Total time: {total:.2f}s ({_fmt(metrics['throughput_anchors_per_s'], '.1f')} "
        "anchors/s)",
        f"  Total samples processed: {g['anchors']}",
        f"  Total hard negatives: {g['hard_negatives']}",
        f"  Total diverse negatives: {g['diverse_negatives']}",
        f"  Success rate: {_fmt(None if rate is None else rate * 100, '.1f')}%",
        f"  Second strategy used: {g['second_strategy_used']}",
        f"  Average hard text similarity: {_fmt(g['hard_text_similarity']['mean'])}",
        f"  Average hard visual similarity: {_fmt(g['hard_visual_similarity']['mean'])}",
        f"  Phrase diversity: {_fmt(g['phrase_diversity'])} "
        f"(max reuse {g['max_phrase_reuse']})",
        *failure_lines(metrics),
        *index_lines(metrics),
        "  Timing (embed and search summed over workers): "
        + ", ".join(f"{k} {v:.2f}s" for k, v in metrics["timing"].items()),
    ] + ([f"  Warning: {g['zero_embeddings']} embedding(s) are all zeros (similarity 0 to "
          "everything); see the shard logs"] if g.get("zero_embeddings") else [])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def reason_shares(reasons: dict[str, int]) -> list[tuple[str, int]]:
    """(reason, anchors) with anchors > 0, most first (ties: README order)."""
    return sorted(((r, n) for r, n in reasons.items() if n), key=lambda x: -x[1])


def failure_lines(metrics: dict[str, Any], sweep: dict[str, Any] | None = None) -> list[str]:
    """Why anchors got no negative (and, with several asked, fewer), in one line each,
    and the suggestion when one reason dominates."""
    g = metrics["global"]
    lines = []
    for key, what in (("failure_reasons", "No negative"),
                      ("fewer_than_asked", "Fewer negatives than asked")):
        shares = reason_shares(g.get(key) or {})
        total = sum(n for _, n in shares)
        if total:
            lines.append(f"  {what} for {total:,} anchors: " + ", ".join(
                f"{REASON_LABELS[r]} {n / total:.0%}" for r, n in shares))
    advice = suggestion(metrics, sweep)
    return lines + ([f"  Suggestion: {advice}"] if advice else [])


def suggestion(metrics: dict[str, Any], sweep: dict[str, Any] | None = None) -> str | None:
    """When one reason stops at least DOMINANT of the failures: the knob that addresses it
    and, from a sweep of this run (`sweep`: its sweep.json), the best figure the sweep
    measured for it. Nothing is said that a sweep did not measure."""
    g = metrics["global"]
    shares = reason_shares(g.get("failure_reasons") or {})
    total = sum(n for _, n in shares)
    if not total or shares[0][1] < DOMINANT * total:
        return None
    reason, count = shares[0]
    knobs = KNOBS[reason]
    head = f"{REASON_LABELS[reason]}: {count / total:.0%} of the failures"
    if not knobs:
        return f"{head}; rows of one group are never negatives of each other (--group-field)"
    names = " or ".join(flag(k) for k in knobs)
    swept = [k for k in knobs if k in SWEPT]
    if sweep is not None and swept and _same_run(metrics, sweep):
        return f"{head}; {measured(g, sweep, swept)}"
    if swept:
        return (f"{head}; the knob: {names} (hnm sweep OUTPUT_DIR "
                + " ".join(f"{SWEPT[k]} ..." for k in swept) + " measures it)")
    return f"{head}; the knob: {names}"


def _same_run(metrics: dict[str, Any], sweep: dict[str, Any]) -> bool:
    """Whether a sweep was made of this run (its config hash)."""
    return sweep.get("run", {}).get("config_hash") == metrics["provenance"]["config_hash"]


def measured(g: dict[str, Any], sweep: dict[str, Any], knobs: list[str]) -> str:
    """The sweep's point with the most successes among those that change only `knobs`."""
    run = sweep["run"]
    others = [k for k in SWEPT if k not in knobs]
    points = [p for p in sweep["points"] if all(p.get(k) == run.get(k) for k in others)]
    changed = [p for p in points if any(p[k] != run[k] for k in knobs)]
    if not changed:
        return "the sweep did not vary " + " or ".join(flag(k) for k in knobs)
    # the most successes; of equals, the point that changes fewest knobs, then the first
    best = max(changed, key=lambda p: (p["global"]["successes"],
                                       -sum(p[k] != run[k] for k in knobs)))
    values = " ".join(f"{flag(k)} {'off' if best[k] is None else format(best[k], 'g')}"
                      for k in knobs if best[k] != run[k])
    found = best["global"]["successes"]
    if found <= g["successes"]:
        return (f"no value of {' or '.join(flag(k) for k in knobs)} the sweep tried finds "
                f"more negatives (best: {values}, {found:,} anchors; this run: "
                f"{g['successes']:,})")
    return (f"{values} would find negatives for {found:,} anchors (sweep; this run: "
            f"{g['successes']:,})")


def index_lines(metrics: dict[str, Any]) -> list[str]:
    """The search index and, for an approximate one, its measured recall."""
    index = metrics.get("index")
    if not index:
        return []
    line = f"  Index: {index['kind']} ({index['reason']})"
    recall = index.get("recall")
    if recall:
        line += (f"; recall@{recall['k']} of the neighbour lists vs exact search: "
                 f"{_fmt(recall['recall_at_k'], '.4f')} ({recall['anchors']} anchors)")
    return [line]


def print_summary(metrics: dict[str, Any], say: Callable[[str], Any] = print,
                  width: int | None = None) -> None:
    """The summary, each line wrapped to `width` (the terminal's; 80 columns in a pipe or
    a log) with its continuation indented under it: no figure is cut or lost."""
    width = width or shutil.get_terminal_size().columns
    for line in summary_lines(metrics):
        for part in wrapped(line, width):
            say(part)


def wrapped(line: str, width: int) -> list[str]:
    """`line` in lines of at most `width` characters where its words allow, the
    continuations indented 4 more than the line."""
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False) or [line]


def shard_lines(metrics: dict[str, Any]) -> list[str]:
    """Per-shard results, as the guide printed them after each GPU finished."""
    lines = []
    for s in metrics["shards"]:
        rate = s["success_rate"]
        lines += [
            f"{device_name(s['device'])} (shard {s['shard']}) completed successfully",
            f"   Shard {s['shard']} results:",
            f"      Success rate: {_fmt(None if rate is None else rate * 100, '.1f')}%",
            f"      Hard negatives: {s['hard_negatives']}",
            f"      Diverse negatives: {s['diverse_negatives']}",
            f"      Avg hard text sim: {_fmt(s['mean_hard_text_similarity'])}",
            f"      Avg hard visual sim: {_fmt(s['mean_hard_visual_similarity'])}",
        ]
    return lines


def device_name(device: str) -> str:
    """'GPU 3' for cuda:3, else 'CPU worker' (the guide's wording)."""
    return f"GPU {device.split(':')[1]}" if device.startswith("cuda:") else "CPU worker"
