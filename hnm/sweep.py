"""`hnm sweep`: what other thresholds would give, from a run's saved embeddings alone."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm import columns
from hnm.config import Config
from hnm.corpus import ColumnarCorpus
from hnm.engine import ANCHOR_BATCH, Candidates, find_candidates, make_selector, select_negatives
from hnm.errors import HnmError
from hnm.lifecycle import load_run_config, run_corpus
from hnm.metrics import Metrics, phrase_diversity_vs_data
from hnm.miner import Arrays, CrossRule, Ragged, cut, neighbours
from hnm.outcome import REASON_LABELS, REASONS
from hnm.pages import CSS, esc, fmt, html_table, page
from hnm.plan import Plan, input_digest, read_plan
from hnm.reduce import read_candidates
from hnm.storage import RunDir, read_json, verify_marker
from hnm.summary import suggestion
from hnm.tables import load_arrays, open_index

STEP = 0.1  # spacing of the default grid around the run's own values
# Wider diverse lists remembered across grid points: the same anchors exhaust their lists
# at many points, and each list is a few kB, so this holds tens of MB at most.
WIDEN_CACHE = 16384
# the figures a sweep reports for each grid point (names of metrics.json's global block)
COLUMNS = ("success_rate", "hard_share", "hard_text_similarity", "hard_visual_similarity",
           "phrase_diversity", "second_strategy_used", "suspect_negatives")
LABELS = ("success rate", "hard share", "mean hard text sim", "mean hard visual sim",
          "phrase diversity", "second strategy used", "suspects")


@dataclass(frozen=True)
class Saved:
    """A finished run's inputs to the selection pass, loaded once."""

    config: Config
    plan: Plan
    ds: ColumnarCorpus
    tab: Arrays
    u: np.ndarray


def load_saved(output_dir: str | Path) -> Saved:
    """The run's config, plan, dataset and tables; nothing is embedded."""
    run = RunDir(output_dir)
    plan = read_plan(run) if run.plan.exists() else None
    if plan is None or not run.is_done("tables"):
        raise HnmError(f"{run.root}: no finished tables phase; sweep needs a run directory "
                       "whose embeddings and tables were written")
    markers = [run.marker("tables")] + [run.marker("candidates", s.shard) for s in plan.shards
                                        if run.is_done("candidates", s.shard)]
    for marker in markers:
        if (why := verify_marker(marker, run.root, checksums=False)):
            raise HnmError(f"{why}; rerun the mining command: it computes it again")
    config = load_run_config(run)
    if plan.source != input_digest(config)[:16]:
        raise HnmError(f"{config.annotations}: changed since the run in {run.root}; its saved "
                       "embeddings no longer match the records")
    ds = run_corpus(run, config, plan)
    u = ds.anchor_uniforms(config.seed, np.arange(ds.num_anchors))
    return Saved(config, plan, ds, load_arrays(run, ds, config), u)


def default_grid(value: float) -> list[float]:
    """The run's value and two steps either side, within [-1, 1]."""
    return sorted({round(min(1.0, max(-1.0, value + k * STEP)), 6) for k in range(-2, 3)})


def parse_grid(text: str, flag: str, kind: type = float, lo: float = -1.0, hi: float = 1.0
               ) -> list:
    """'0.1,0.2,0.3' -> [0.1, 0.2, 0.3] (kind int: whole numbers); a bad value is an error
    naming the flag."""
    noun = "whole numbers" if kind is int else "numbers"
    try:
        values = sorted({kind(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise HnmError(f"{flag}: expected comma-separated {noun}, got {text!r}") from None
    if not values or any(not lo <= v <= hi for v in values):
        within = f"within [{lo:g}, {hi:g}]" if hi != float("inf") else f"of at least {lo:g}"
        raise HnmError(f"{flag}: expected {noun} {within}, got {text!r}")
    return values


# The knobs a sweep varies: config field, name of its values in sweep.json, type.
KNOBS = (("cosine_threshold", "cosine_thresholds", float),
         ("min_visual_similarity", "min_visual_similarities", float),
         ("fallback_phrase_reuse_limit", "fallback_phrase_reuse_limits", int),
         ("sliding_window_size", "sliding_window_sizes", int),
         ("diverse_ratio", "diverse_ratios", float),
         ("max_cross_score_ratio", "max_cross_score_ratios", float))
THRESHOLDS = ("cosine_threshold", "min_visual_similarity")


def grid_values(config: Config, given: dict[str, list | None]) -> dict[str, list]:
    """Each knob's values: as given; a knob not given keeps the run's value, except the two
    thresholds, which get their default grids when no knob is given at all."""
    out = {}
    for name, _, _ in KNOBS:
        values = given.get(name)
        if not values:
            run = getattr(config, name)
            values = default_grid(run) if name in THRESHOLDS and not any(given.values()) \
                else [run]
        out[name] = values
    return out


def sweep(output_dir: str | Path, taus: list[float] | None = None,
          min_visuals: list[float] | None = None, **knobs: list | None) -> dict[str, Any]:
    """Metrics a rerun would give at every combination of the knobs' values
    (cosine_threshold, min_visual_similarity, and as keywords fallback_phrase_reuse_limit,
    sliding_window_size, diverse_ratio, max_cross_score_ratio: None is the rule off).

    Only the selection runs again: the hard lists of every (cosine_threshold,
    min_visual_similarity) pair are cut from one set of neighbour lists (the run's own
    lists when every pair is the run's; else one search of N(a) under the loosest visual
    floor, which also counts what each fixed rule removes); the diverse lists depend on
    no knob. Each point runs the selection and the audit exactly as a run does, shard by
    shard, so its figures are those of a rerun with the same shard layout.
    """
    t0 = time.perf_counter()
    saved = load_saved(output_dir)
    c = saved.config
    grid = grid_values(c, {"cosine_threshold": taus, "min_visual_similarity": min_visuals,
                           **knobs})
    if grid["max_cross_score_ratio"] != [c.max_cross_score_ratio] and saved.tab.C is None:
        raise HnmError(f"--max-cross-score-ratios: the run in {output_dir} has no joint "
                       "image-text space (--joint-model or --joint-space)")
    pairs = [(tau, mvs, ratio) for tau in grid["cosine_threshold"]
             for mvs in grid["min_visual_similarity"] for ratio in grid["max_cross_score_ratio"]]
    lists = point_lists(saved, pairs)
    t1 = time.perf_counter()
    widen = _shared_widen(saved)
    points = []
    for values in itertools.product(*(grid[name] for name, _, _ in KNOBS)):
        point = dict(zip((name for name, _, _ in KNOBS), values))
        cands = lists(point["cosine_threshold"], point["min_visual_similarity"],
                      point["max_cross_score_ratio"])
        points.append({**point, "global": evaluate(saved, dataclasses.replace(c, **point),
                                                   cands, widen)})
    return {"run": {**{name: getattr(c, name) for name, _, _ in KNOBS},
                    "drop_suspect_negatives": c.drop_suspect_negatives,
                    "config_hash": run_hash(output_dir)},
            **{plural: grid[name] for name, plural, _ in KNOBS},
            "seconds": {"candidates": round(t1 - t0, 3),
                        "select": round(time.perf_counter() - t1, 3)},
            "points": points}


def run_hash(output_dir: str | Path) -> str | None:
    """The config hash in the run's metrics.json (None before the run finished): a sweep
    speaks of the run that has it."""
    run = RunDir(output_dir)
    return read_json(run.metrics)["provenance"]["config_hash"] if run.metrics.exists() \
        else None


def advice(output_dir: str | Path, result: dict[str, Any]) -> str | None:
    """The run's suggestion with this sweep's figures (summary.suggestion), if it has one."""
    run = RunDir(output_dir)
    return suggestion(read_json(run.metrics), result) if run.metrics.exists() else None


def point_lists(saved: Saved, pairs: list[tuple[float, float, float | None]]
                ) -> Callable[[float, float, float | None], Candidates]:
    """(cosine_threshold, min_visual_similarity, max_cross_score_ratio) -> the candidate
    lists a rerun with those values would write. A run interrupted before its candidates
    were all written has everything searched."""
    c = saved.config
    run = RunDir(c.output_dir)
    anchors = np.arange(saved.ds.num_anchors)
    index = None
    if all(run.is_done("candidates", p.shard) for p in saved.plan.shards):
        cands = Candidates.concat([read_candidates(run.candidates(p.shard))
                                   for p in saved.plan.shards])
        if all(pair == (c.cosine_threshold, c.min_visual_similarity, c.max_cross_score_ratio)
               for pair in pairs):
            return lambda tau, mvs, ratio: cands
    else:
        index = open_index(run, saved.plan.index, saved.tab.V, "cpu",
                           saved.plan.placement.index_parts)
        cands = find_candidates(c, saved.tab, anchors, index=index)[0]
    index = index or open_index(run, saved.plan.index, saved.tab.V, "cpu",
                                saved.plan.placement.index_parts)  # the run's own
    floor = min(mvs for _, mvs, _ in pairs)
    found = [neighbours(index, saved.tab, anchors[s:s + ANCHOR_BATCH], c.k_nn, floor)
             for s in range(0, len(anchors), ANCHOR_BATCH)]

    @functools.lru_cache(maxsize=1)  # points come knob after knob: a pair's run together
    def lists(tau: float, mvs: float, ratio: float | None) -> Candidates:
        rule = CrossRule(ratio, c.min_cross_score_margin)
        hard = [cut(nb, tau, mvs, rule) for nb in found]
        return dataclasses.replace(
            cands, hard=Ragged.concat([h.lists for h in hard]),
            hard_before=np.concatenate([h.before for h in hard]),
            hard_fixed=np.concatenate([h.fixed for h in hard]))

    return lists


def _shared_widen(saved: Saved) -> Callable:
    """The exact wider diverse search, shared by all points and remembered: it depends on
    neither value, and the same anchors exhaust their lists at many points."""
    return functools.lru_cache(maxsize=WIDEN_CACHE)(
        make_selector(saved.config, saved.tab, saved.ds.phrases).widen)


def evaluate(saved: Saved, config: Config, cands: Candidates, widen: Callable
             ) -> dict[str, Any]:
    """The global metrics of a run with `config`, from its candidate lists, shard by shard
    through one selector exactly as the reducer goes."""
    selector = make_selector(config, saved.tab, saved.ds.phrases)
    selector.widen = widen
    shards = ((np.arange(*s.anchors), cands.window(*s.anchors)) for s in saved.plan.shards)
    parts = [done.metrics
             for done in select_negatives(config, selector, shards, saved.u)]
    summary = sum(parts, start=Metrics()).summary()
    # work done, not a result: it depends on which diverse lists were computed ahead
    summary.pop("diverse_widened_searches")
    summary["phrase_diversity_vs_data"] = phrase_diversity_vs_data(summary,
                                                                   len(saved.ds.phrases))
    return summary


# ---- presenting the grid ------------------------------------------------------------------

KNOB_LABELS = {"cosine_threshold": "cosine threshold", "min_visual_similarity": "min visual sim",
               "fallback_phrase_reuse_limit": "fallback limit",
               "sliding_window_size": "window size", "diverse_ratio": "diverse ratio",
               "max_cross_score_ratio": "max cross score ratio"}
MAX_MAPS = 6  # heat maps per figure; the table below them holds every point


def figures(g: dict[str, Any]) -> dict[str, Any]:
    """The sweep's columns of one point's global metrics (means of the similarities)."""
    out = {k: g[k] for k in COLUMNS}
    out["hard_text_similarity"] = g["hard_text_similarity"]["mean"]
    out["hard_visual_similarity"] = g["hard_visual_similarity"]["mean"]
    out["suspect_negatives"] = g["suspect_negatives"]["total"]
    return out


def shown_knobs(result: dict[str, Any]) -> list[str]:
    """The thresholds, and every other knob the grid varies."""
    return [name for name, plural, _ in KNOBS
            if name in THRESHOLDS or len(result[plural]) > 1]


def shown_reasons(result: dict[str, Any]) -> list[str]:
    """The failure reasons that stop some anchor at some point (README's codes)."""
    return [r for r in REASONS
            if any(p["global"]["failure_reasons"][r] for p in result["points"])]


def is_run_point(result: dict[str, Any], point: dict[str, Any]) -> bool:
    return all(point[name] == result["run"][name] for name, _, _ in KNOBS)


def rows_of(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The table's header and rows: knobs, figures, anchors without a negative by reason."""
    knobs, reasons = shown_knobs(result), shown_reasons(result)
    head = [KNOB_LABELS[k] for k in knobs] + list(LABELS) + \
        [f"no negative: {REASON_LABELS[r]}" for r in reasons]
    rows = [[p[k] for k in knobs] + [figures(p["global"])[k] for k in COLUMNS]
            + [p["global"]["failure_reasons"][r] for r in reasons] for p in result["points"]]
    return head, rows


def print_table(result: dict[str, Any], console: Any = None) -> None:
    """The grid as text that fits the console's width (80 columns in a pipe or a log):
    headers wrapped, no value ever cut. Points are numbered; when the columns do not fit
    side by side, the first table holds the knobs and each further one leads with the
    point's number. The run's own point is marked with "*" (and bold in a terminal)."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    head, rows = rows_of(result)
    names = shown_knobs(result) + list(COLUMNS)
    own = [is_run_point(result, p) for p in result["points"]]
    cells = [[f"{i + 1}{'*' if mine else ''}",
              *(_cell_text(names[k] if k < len(names) else "", v) for k, v in enumerate(row))]
             for i, (mine, row) in enumerate(zip(own, rows))]
    tables = columns.tables(["point", *head], cells, 1 + len(shown_knobs(result)),
                            console.width)
    for number, lines in enumerate(tables):
        more = f" ({number + 1} of {len(tables)})" if len(tables) > 1 else ""
        console.print(Text(f"hnm sweep: what a rerun would give{more}"), soft_wrap=True)
        header = len(lines) - len(cells)
        for i, line in enumerate(lines):
            bold = i >= header and own[i - header]
            console.print(Text(line, style="bold" if bold else ""), soft_wrap=True)
        console.print()
    s = result["seconds"]
    console.print(Text(f"{len(result['points'])} points: candidates {s['candidates']:.2f}s, "
                       f"selection {s['select']:.2f}s (*: the run's own values)"))


def _knob(value: float | None) -> str:
    return "off" if value is None else f"{value:g}"


def _cell_text(name: str, value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    if name in KNOB_LABELS:
        return _knob(value)
    return fmt(value, ".1%" if name in ("success_rate", "hard_share") else ".3f")


def write_outputs(output_dir: str | Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """OUTPUT_DIR/sweep.json (every point's full metrics) and sweep.html (heat maps)."""
    run = RunDir(output_dir)
    run.write_text(run.sweep_json, json.dumps(result, indent=1) + "\n")
    run.write_text(run.sweep_html, render_html(result))
    return run.sweep_json, run.sweep_html


def render_html(result: dict[str, Any]) -> str:
    """Heat maps of success rate and hard share, then every figure of every point."""
    run = result["run"]
    values = ", ".join(f"{KNOB_LABELS[k]} {_knob(run[k])}" for k in shown_knobs(result))
    intro = (f"<h1>hnm sweep</h1><p class='muted'>the run used {esc(values)} (outlined); the "
             "figures are what a rerun with each combination of values gives, computed from "
             "the saved embeddings. Colours run from the grid's lowest value (pale) to its "
             "highest (dark).</p>")
    maps = "".join(heat_map(result, k) for k in ("success_rate", "hard_share"))
    head, rows = rows_of(result)
    css = (".maps{display:flex;gap:24px;flex-wrap:wrap}.heat td{width:64px;text-align:center}"
           ".heat td.run{outline:3px solid #222;outline-offset:-3px;font-weight:700}")
    return page("hnm sweep", intro + f"<div class='maps'>{maps}</div><h2>All figures</h2>"
                + html_table(head, rows), CSS + css)


def heat_map(result: dict[str, Any], name: str) -> str:
    """One figure over the grid: rows and columns are the first two knobs with several
    values (else the thresholds); one map per combination of the others (at most
    MAX_MAPS)."""
    plural = {n: p for n, p, _ in KNOBS}
    knobs = shown_knobs(result)
    several = [k for k in knobs if len(result[plural[k]]) > 1]
    axes = (several + [k for k in THRESHOLDS if k not in several])[:2]
    row_knob, col_knob = axes
    rest = [k for k in knobs if k not in axes]
    values = [p["global"][name] for p in result["points"] if p["global"][name] is not None]
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    combos = list(itertools.product(*(result[plural[k]] for k in rest)))
    out = []
    for combo in combos[:MAX_MAPS]:
        by = {(p[row_knob], p[col_knob]): p for p in result["points"]
              if all(p[k] == v for k, v in zip(rest, combo))}
        head = "".join(f"<th>{_knob(v)}</th>" for v in result[plural[col_knob]])
        rows = []
        for rv in result[plural[row_knob]]:
            cells = []
            for cv in result[plural[col_knob]]:
                p = by[(rv, cv)]
                value = p["global"][name]
                cls = " class='run'" if is_run_point(result, p) else ""
                shade = colour(None if value is None else
                               (value - lo) / (hi - lo) if hi > lo else 0.5)
                cells.append(f"<td{cls} style='{shade}'>{esc(_cell_text(name, value))}</td>")
            rows.append(f"<tr><th>{_knob(rv)}</th>{''.join(cells)}</tr>")
        title = name.replace("_", " ") + "".join(f", {KNOB_LABELS[k]} {_knob(v)}"
                                                 for k, v in zip(rest, combo))
        corner = f"{KNOB_LABELS[row_knob]} \\ {KNOB_LABELS[col_knob]}"
        out.append(f"<div><h2>{esc(title)}</h2><table class='heat'><tr><th>{esc(corner)}</th>"
                   f"{head}</tr>{''.join(rows)}</table></div>")
    return "".join(out)


def colour(value: float | None) -> str:
    """Background from pale (0: the grid's lowest) to deep blue (1: its highest)."""
    if value is None:
        return "background:#eee"
    v = min(1.0, max(0.0, value))
    lo, hi = (239, 246, 255), (8, 69, 148)
    r, g, b = (round(a + (z - a) * v) for a, z in zip(lo, hi))
    return f"background:rgb({r},{g},{b});color:{'#fff' if v > 0.55 else '#111'}"
