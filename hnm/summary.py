"""The readable end-of-run summary (the guide's figures)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The guide's closing figures, from a metrics document."""
    g = metrics["global"]
    total = sum(metrics["timing"].values())
    rate = g["success_rate"]
    return [
        "Hard negative mining completed",
        f"  Total time: {total:.2f}s ({_fmt(metrics['throughput_anchors_per_s'], '.1f')} "
        "anchors/s)",
        f"  Total samples processed: {g['anchors']}",
        f"  Total hard negatives: {g['hard_negatives']}",
        f"  Total diverse negatives: {g['diverse_negatives']}",
        f"  Success rate: {_fmt(None if rate is None else rate * 100, '.1f')}%",
        f"  Fallback used: {g['fallback_used']}",
        f"  Average hard text similarity: {_fmt(g['hard_text_similarity']['mean'])}",
        f"  Average hard visual similarity: {_fmt(g['hard_visual_similarity']['mean'])}",
        f"  Phrase diversity: {_fmt(g['phrase_diversity'])} "
        f"(max reuse {g['max_phrase_reuse']})",
        "  Timing: " + ", ".join(f"{k} {v:.2f}s" for k, v in metrics["timing"].items()),
    ]


def print_summary(metrics: dict[str, Any], say: Callable[[str], Any] = print) -> None:
    for line in summary_lines(metrics):
        say(line)
