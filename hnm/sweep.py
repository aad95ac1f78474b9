"""`hnm sweep`: what other thresholds would give, from a run's saved embeddings alone."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Config
from hnm.data import Dataset, anchor_uniforms, load_dataset
from hnm.engine import ANCHOR_BATCH, Candidates, find_candidates, make_selector, select
from hnm.errors import HnmError
from hnm.metrics import Metrics
from hnm.miner import Ragged, Tables, hard_candidates, threshold_steps
from hnm.pages import CSS, esc, fmt, page, table
from hnm.plan import Plan, read_plan
from hnm.report import load_run_config
from hnm.storage import RunDir, read_npz, verify_marker
from hnm.tables import load_tables, open_index

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
    ds: Dataset
    tab: Tables
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
    ds = load_dataset(config, list(plan.skipped))
    if not plan.run_key.endswith(ds.source_sha256[:16]):
        raise HnmError(f"{config.annotations}: changed since the run in {run.root}; its saved "
                       "embeddings no longer match the records")
    u = anchor_uniforms(ds.ids[:ds.num_anchors], config.seed)
    return Saved(config, plan, ds, load_tables(run, ds), u)


def default_grid(value: float) -> list[float]:
    """The run's value and two steps either side, within [-1, 1]."""
    return sorted({round(min(1.0, max(-1.0, value + k * STEP)), 6) for k in range(-2, 3)})


def parse_grid(text: str, flag: str) -> list[float]:
    """'0.1,0.2,0.3' -> [0.1, 0.2, 0.3]; a bad value is an error naming the flag."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise HnmError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not -1.0 <= v <= 1.0 for v in values):
        raise HnmError(f"{flag}: expected numbers within [-1, 1], got {text!r}")
    return values


def sweep(output_dir: str | Path, taus: list[float] | None = None,
          min_visuals: list[float] | None = None) -> dict[str, Any]:
    """Metrics a rerun would give at every (cosine_threshold, min_visual_similarity).

    Candidates are gathered once, under the loosest values of the grid; each point keeps
    the hard entries its own values admit (the lists are in N(a) order, and filtering
    keeps it) and runs the selection and the audit exactly as a run does, shard by shard,
    so its figures are those of a rerun with the same shard layout.
    """
    t0 = time.perf_counter()
    saved = load_saved(output_dir)
    c = saved.config
    taus = taus or default_grid(c.cosine_threshold)
    min_visuals = min_visuals or default_grid(c.min_visual_similarity)
    cands = loosest_candidates(saved, max(taus), min(min_visuals))
    t1 = time.perf_counter()
    widen = _shared_widen(saved)
    points = [{"cosine_threshold": tau, "min_visual_similarity": mvs,
               "global": evaluate(saved, _point(c, tau, mvs),
                                  dataclasses.replace(cands, hard=filter_hard(cands.hard, tau,
                                                                              mvs)), widen)}
              for tau in taus for mvs in min_visuals]
    return {"run": {"cosine_threshold": c.cosine_threshold,
                    "min_visual_similarity": c.min_visual_similarity,
                    "drop_suspect_negatives": c.drop_suspect_negatives},
            "cosine_thresholds": taus, "min_visual_similarities": min_visuals,
            "seconds": {"candidates": round(t1 - t0, 3),
                        "select": round(time.perf_counter() - t1, 3)},
            "points": points}


def _point(config: Config, tau: float, mvs: float) -> Config:
    return dataclasses.replace(config, cosine_threshold=tau, min_visual_similarity=mvs)


def loosest_candidates(saved: Saved, tau: float, mvs: float) -> Candidates:
    """Every anchor's candidate lists under the loosest values: a superset of each point's.

    The run's own lists serve when no point is looser than the run; otherwise the hard
    lists are searched again (the k-NN search only: the diverse lists depend on neither
    value, so the saved ones are exactly what a rerun would compute). A run interrupted
    before its candidates were all written has everything searched.
    """
    c = saved.config
    run = RunDir(c.output_dir)
    anchors = np.arange(saved.ds.num_anchors)
    if not all(run.is_done("candidates", p.shard) for p in saved.plan.shards):
        index = open_index(run, saved.plan.index, saved.tab.V, "cpu")
        return find_candidates(_point(c, tau, mvs), saved.tab, anchors, index=index)[0]
    cands = Candidates.concat([Candidates.from_arrays(read_npz(run.candidates(p.shard)))
                               for p in saved.plan.shards])
    if tau <= c.cosine_threshold and mvs >= c.min_visual_similarity:
        return cands
    index = open_index(run, saved.plan.index, saved.tab.V, "cpu")  # the run's own index
    batches = [hard_candidates(index, saved.tab, anchors[s:s + ANCHOR_BATCH], c.k_nn, mvs, tau)
               for s in range(0, len(anchors), ANCHOR_BATCH)]
    return dataclasses.replace(cands, hard=Ragged.concat(batches))


def filter_hard(hard: Ragged, tau: float, mvs: float) -> Ragged:
    """The hard lists a run with (tau, mvs) would have written (as `hard_candidates` cuts)."""
    keep = (hard.vis >= mvs) & (hard.txt < threshold_steps(tau)[-1])
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    return Ragged(kept_before[hard.offsets], hard.rows[keep], hard.vis[keep], hard.txt[keep])


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
    parts = [done.metrics for done in select(config, selector, shards, saved.u,
                                             saved.ds.phrases)]
    summary = sum(parts, start=Metrics()).summary()
    # work done, not a result: it depends on which diverse lists were computed ahead
    summary.pop("diverse_widened_searches")
    summary["phrase_diversity_vs_data"] = round(summary["distinct_negative_phrases"]
                                                / len(saved.ds.phrases), 6)
    return summary


# ---- presenting the grid ------------------------------------------------------------------

def figures(g: dict[str, Any]) -> dict[str, Any]:
    """The sweep's columns of one point's global metrics (means of the similarities)."""
    out = {k: g[k] for k in COLUMNS}
    out["hard_text_similarity"] = g["hard_text_similarity"]["mean"]
    out["hard_visual_similarity"] = g["hard_visual_similarity"]["mean"]
    out["suspect_negatives"] = g["suspect_negatives"]["total"]
    return out


def is_run_point(result: dict[str, Any], point: dict[str, Any]) -> bool:
    run = result["run"]
    return (point["cosine_threshold"] == run["cosine_threshold"]
            and point["min_visual_similarity"] == run["min_visual_similarity"])


def print_table(result: dict[str, Any], console: Any = None) -> None:
    """The grid as a rich table in the terminal; the run's own values marked."""
    from rich.console import Console
    from rich.table import Table

    grid = Table(title="hnm sweep: what a rerun would give")
    grid.add_column("cosine threshold", justify="right")
    grid.add_column("min visual sim", justify="right")
    for label in LABELS:
        grid.add_column(label, justify="right")
    for p in result["points"]:
        row = figures(p["global"])
        mark = is_run_point(result, p)
        grid.add_row(f"{p['cosine_threshold']:g}", f"{p['min_visual_similarity']:g}",
                     *(_cell_text(k, row[k]) for k in COLUMNS),
                     style="bold" if mark else None)
    (console or Console()).print(grid)
    s = result["seconds"]
    (console or Console()).print(f"{len(result['points'])} points: candidates "
                                 f"{s['candidates']:.2f}s, selection {s['select']:.2f}s "
                                 "(bold: the run's own values)")


def _cell_text(name: str, value: Any) -> str:
    if isinstance(value, int):
        return str(value)
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
    intro = (f"<h1>hnm sweep</h1><p class='muted'>the run used cosine threshold "
             f"{run['cosine_threshold']:g} and min visual similarity "
             f"{run['min_visual_similarity']:g} (outlined); the figures are what a rerun "
             "with each pair of values gives, computed from the saved embeddings. Colours run "
             "from the grid's lowest value (pale) to its highest (dark).</p>")
    maps = "".join(heat_map(result, k) for k in ("success_rate", "hard_share"))
    rows = [[p["cosine_threshold"], p["min_visual_similarity"],
             *(figures(p["global"])[k] for k in COLUMNS)] for p in result["points"]]
    full = table(["cosine threshold", "min visual sim", *LABELS], rows)
    css = (".maps{display:flex;gap:24px;flex-wrap:wrap}.heat td{width:64px;text-align:center}"
           ".heat td.run{outline:3px solid #222;outline-offset:-3px;font-weight:700}")
    return page("hnm sweep", intro + f"<div class='maps'>{maps}</div><h2>All figures</h2>"
                + full, CSS + css)


def heat_map(result: dict[str, Any], name: str) -> str:
    """One figure over the grid: rows are cosine thresholds, columns min visual similarity."""
    by = {(p["cosine_threshold"], p["min_visual_similarity"]): p for p in result["points"]}
    values = [p["global"][name] for p in result["points"] if p["global"][name] is not None]
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    head = "".join(f"<th>{v:g}</th>" for v in result["min_visual_similarities"])
    rows = []
    for tau in result["cosine_thresholds"]:
        cells = []
        for mvs in result["min_visual_similarities"]:
            p = by[(tau, mvs)]
            value = p["global"][name]
            cls = " class='run'" if is_run_point(result, p) else ""
            shade = colour(None if value is None else (value - lo) / (hi - lo) if hi > lo else 0.5)
            cells.append(f"<td{cls} style='{shade}'>{esc(_cell_text(name, value))}</td>")
        rows.append(f"<tr><th>{tau:g}</th>{''.join(cells)}</tr>")
    title = name.replace("_", " ")
    return (f"<div><h2>{esc(title)}</h2><table class='heat'><tr><th>τ \\ min vis</th>{head}"
            f"</tr>{''.join(rows)}</table></div>")


def colour(value: float | None) -> str:
    """Background from pale (0: the grid's lowest) to deep blue (1: its highest)."""
    if value is None:
        return "background:#eee"
    v = min(1.0, max(0.0, value))
    lo, hi = (239, 246, 255), (8, 69, 148)
    r, g, b = (round(a + (z - a) * v) for a, z in zip(lo, hi))
    return f"background:rgb({r},{g},{b});color:{'#fff' if v > 0.55 else '#111'}"
