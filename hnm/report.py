"""OUTPUT_DIR/report.html: one self-contained page with a run's figures, plots and negatives.

This module reads the run and assembles the page; its parts come from `report_scan` (what the
page needs from the outputs), `report_charts` (the SVG plots) and `report_gallery` (thumbnails
of anchors beside their negatives)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hnm import schema
from hnm.config import Config
from hnm.corpus import ColumnarCorpus
from hnm.data import image_limit
from hnm.errors import HnmError
from hnm.lifecycle import load_run_config, run_corpus
from hnm.pages import esc, fmt, html_table, page
from hnm.plan import Plan, check_unchanged, read_plan
from hnm.readers import SHARD_FORMATS
from hnm.report_charts import failures, plots
from hnm.report_cross import cross_section
from hnm.report_gallery import Thumbs, gallery, shown_images, suspect_table
from hnm.report_scan import Scan, Suspects, scan_negatives, top_suspects
from hnm.sizing import IVF_KINDS
from hnm.storage import RunDir, read_json, verify_marker


def report_from_dir(output_dir: str | Path, warn: Callable[[str], Any] = print) -> Path:
    """`hnm report OUTPUT_DIR`: (re)write the report of a finished run."""
    run = RunDir(output_dir)
    config = load_run_config(run) if run.config.exists() else Config()
    for path in (run.config, run.plan, run.records(config.output_format), run.metrics):
        if not path.exists():
            raise HnmError(f"{run.root}: no {path.name}; not a finished hnm run "
                           "(rerun the mining command to finish it)")
    plan = read_plan(run)
    ds = run_corpus(run, config, plan)
    check_unchanged(config, plan, ds, run.root, shown=True)
    vouched = run.done.exists() and verify_marker(run.done, run.root) is None
    path = write_report(run, config, read_json(run.metrics, shape=schema.METRICS), plan, ds,
                        warn=warn)
    if vouched:  # the final marker vouches for the new page, as it did for the old one
        files = read_json(run.done, shape=schema.MARKER)["files"]
        run.write_marker(run.done, {}, [run.root / name for name in files])
    return path


def write_report(run: RunDir, config: Config, metrics: dict[str, Any], plan: Plan,
                 ds: ColumnarCorpus | None = None, warn: Callable[[str], Any] = lambda _: None
                 ) -> Path:
    """Render OUTPUT_DIR/report.html from the metrics document and the run's files.
    `ds`: the run's dataset, where images held in shards are found (read again if None)."""
    scan = scan_negatives(run, config, plan)
    suspects = top_suspects(run.suspects)
    thumbs = Thumbs(Path(config.image_dir), config.max_image_pixels)
    sweep = read_json(run.sweep_json) if run.sweep_json.exists() else None
    with image_limit(config.max_image_pixels):
        if plan.input_format in SHARD_FORMATS:
            thumbs.find_in(config, plan, ds, shown_images(config, scan, suspects))
        run.write_text(run.report, render(config, metrics, scan, suspects, thumbs, sweep))
    if thumbs.missing:
        warn(f"warning: {len(thumbs.missing)} of {len(thumbs.cache)} images of the report "
             f"could not be shown (not found, unreadable or too large) under {config.image_dir}")
    return run.report


# ---- the page -----------------------------------------------------------------------------

def render(config: Config, metrics: dict[str, Any], scan: Scan, suspects: Suspects,
           thumbs: Thumbs, sweep: dict[str, Any] | None = None) -> str:
    """The whole report page (`sweep`: the run's sweep.json, for the suggestion's figure)."""
    title = f"hnm run report: {config.split} ({Path(config.output_dir).name})"
    body = "".join([
        f"<h1>{esc(title)}</h1>",
        f"<p class='muted'>{esc(config.annotations or '')} · "
        f"{esc(metrics['provenance']['config_hash'])}</p>",
        headline(metrics), plots(config, metrics, scan), cross_section(config, scan),
        failures(metrics, scan, sweep),
        shard_table(metrics),
        gallery(config, scan, thumbs), suspect_table(config, suspects, thumbs),
        config_table(config, metrics),
    ])
    return page(title, body)


def headline(metrics: dict[str, Any]) -> str:
    g = metrics["global"]
    total = metrics.get("wall_seconds", sum(metrics["timing"].values()))
    rate = g["success_rate"]
    share = g["hard_share"]
    suspects = g.get("suspect_negatives", {})
    dups = g.get("duplicate_images", {})
    cards = [
        ("success rate", f"{fmt(None if rate is None else rate * 100, '.1f')}%",
         f"{g['successes']} of {g['anchors']} anchors"),
        ("hard / diverse", f"{g['hard_negatives']} / {g['diverse_negatives']}",
         f"hard share {fmt(share, '.2f')}, second strategy used "
         f"{g['second_strategy_used']}"),
        ("avg hard text sim", fmt(g["hard_text_similarity"]["mean"]), "lower is harder"),
        ("avg hard visual sim", fmt(g["hard_visual_similarity"]["mean"]), "higher is harder"),
        ("phrase diversity", fmt(g["phrase_diversity"]),
         f"max reuse {g['max_phrase_reuse']}"),
        ("suspect negatives", str(suspects.get("total", "n/a")),
         f"dropped {suspects.get('dropped', 0)}"),
        ("duplicate images", str(dups.get("duplicate_rows", "n/a")),
         f"in {dups.get('groups', 'n/a')} groups"),
        ("total time", f"{total:.1f}s",
         f"{fmt(metrics['throughput_anchors_per_s'], '.1f')} anchors/s"),
        index_card(metrics.get("index")),
    ]
    items = "".join(f"<div class='card'><span>{esc(k)}</span><b>{esc(v)}</b>"
                    f"<span>{esc(s)}</span></div>" for k, v, s in cards)
    return f"<h2>Summary</h2><div class='cards'>{items}</div>"


def index_card(index: dict[str, Any] | None) -> tuple[str, str, str]:
    """The search index; for IVF, the recall of its neighbour lists against exact search."""
    if not index:
        return ("index", "exact", "")
    recall = index.get("recall")
    if index["kind"] not in IVF_KINDS or not recall:
        return ("index", index["kind"], index["reason"])
    return (f"{index['kind'].upper()} recall@{recall['k']}", fmt(recall["recall_at_k"], ".4f"),
            f"vs exact search, {recall['anchors']} anchors; {index['nlist']} lists, "
            f"{index['nprobe']} probed")


# ---- tables -------------------------------------------------------------------------------

def shard_table(metrics: dict[str, Any]) -> str:
    keys = ["shard", "device", "anchors", "success_rate", "hard_negatives",
            "diverse_negatives", "mean_hard_text_similarity", "mean_hard_visual_similarity",
            "suspect_negatives", "seconds", "peak_rss_mb"]
    rows = [[s.get(k) for k in keys] for s in metrics["shards"]]
    return "<h2>Shards</h2>" + html_table([k.replace("_", " ") for k in keys], rows)


def config_table(config: Config, metrics: dict[str, Any]) -> str:
    values = config.to_dict()
    values["fields"] = ", ".join(f"{k}={v}" for k, v in values["fields"].items())
    rows = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in values.items()]
    prov = [[k, v] for k, v in metrics["provenance"].items()]
    return ("<h2>Configuration</h2>" + html_table(["key", "value"], rows)
            + "<h3>Provenance</h3>" + html_table(["key", "value"], prov))
