"""The readable end-of-run summary (the guide's figures)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
        *index_lines(metrics),
        "  Timing (embed and search summed over workers): "
        + ", ".join(f"{k} {v:.2f}s" for k, v in metrics["timing"].items()),
    ] + ([f"  Warning: {g['zero_embeddings']} embedding(s) are all zeros (similarity 0 to "
          "everything); see the shard logs"] if g.get("zero_embeddings") else [])


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


def print_summary(metrics: dict[str, Any], say: Callable[[str], Any] = print) -> None:
    for line in summary_lines(metrics):
        say(line)


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
