"""OUTPUT_DIR/report.html: one self-contained page with a run's figures, plots and negatives."""

from __future__ import annotations

import base64
import heapq
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Config
from hnm.data import Dataset, image_limit, load_dataset, normalize, too_large
from hnm.errors import HnmError
from hnm.lifecycle import load_run_config
from hnm.outcome import REASON_LABELS
from hnm.outputs import read_records
from hnm.pages import esc, fmt, page, table
from hnm.plan import Plan, check_unchanged, read_plan
from hnm.readers import SHARD_FORMATS, ImageRef, holds_tensor, image_stream, tensor_png
from hnm.storage import RunDir, read_json, verify_marker
from hnm.summary import reason_shares, suggestion

THUMB = 112  # longest side of a gallery thumbnail, in pixels
# Gallery rows per section: bounded so the page stays small (~1 MB) whatever the run's size.
SAMPLE, BORDERLINE, FAILED, SUSPECTS = 24, 12, 12, 40
POSITION_BINS = 20  # stretches of the input order in the failure chart
# a colour per failure reason (README's codes), in the charts of "Why anchors got no negative"
REASON_COLOURS = {"min_visual": "#8e24aa", "same_group": "#6d4c41", "ineligible": "#757575",
                  "text_similar": "#00897b", "repeated_phrase": "#f9a825",
                  "phrase_cap": "#c62828", "no_diverse": "#e08a1e",
                  "suspect_dropped": "#1f6fb4", None: "#bdbdbd"}
HARD, DIVERSE, ALERT = "#1f6fb4", "#e08a1e", "#c62828"


def report_from_dir(output_dir: str | Path, warn: Callable[[str], Any] = print) -> Path:
    """`hnm report OUTPUT_DIR`: (re)write the report of a finished run."""
    run = RunDir(output_dir)
    config = load_run_config(run) if run.config.exists() else Config()
    for path in (run.config, run.plan, run.records(config.output_format), run.metrics):
        if not path.exists():
            raise HnmError(f"{run.root}: no {path.name}; not a finished hnm run "
                           "(rerun the mining command to finish it)")
    plan = read_plan(run)
    ds = load_dataset(config, list(plan.skipped))
    check_unchanged(config, plan, ds, run.root)
    vouched = run.done.exists() and verify_marker(run.done, run.root) is None
    path = write_report(run, config, read_json(run.metrics), plan, ds, warn=warn)
    if vouched:  # the final marker vouches for the new page, as it did for the old one
        files = read_json(run.done)["files"]
        run.write_marker(run.done, {}, [run.root / name for name in files])
    return path


def write_report(run: RunDir, config: Config, metrics: dict[str, Any], plan: Plan,
                 ds: Dataset | None = None, warn: Callable[[str], Any] = lambda _: None
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


# ---- reading the run's outputs ------------------------------------------------------------

def anchor_positions(plan: Plan) -> list[int]:
    """Record positions of the anchors: the first num_anchors records not skipped."""
    skipped = set(plan.skipped)
    mined = (p for p in range(plan.num_records) if p not in skipped)
    return [p for _, p in zip(range(plan.num_anchors), mined)]


@dataclass
class Scan:
    """What the report needs from negatives.jsonl, gathered in bounded memory."""

    sample: list[int]
    high_text: list[int] = field(default_factory=list)
    low_visual: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    reuse: Counter = field(default_factory=Counter)  # uses -> number of phrases
    records: dict[int, dict] = field(default_factory=dict)
    # anchors without a negative, by reason, in POSITION_BINS stretches of the input order
    failed_by_bin: list[Counter] = field(default_factory=list)


def scan_negatives(run: RunDir, config: Config, plan: Plan) -> Scan:
    """Choose the gallery's anchors (deterministically) and count phrase reuse.

    A seeded sample; the hard negatives with the highest text and the lowest visual
    similarity (the borderline ones: ties by input position); the first anchors with no
    negative. Two passes over the file: only the chosen records are held in memory.
    """
    anchors = anchor_positions(plan)
    rng = np.random.default_rng(config.seed)
    picked = rng.choice(len(anchors), size=min(SAMPLE, len(anchors)), replace=False)
    scan = Scan(sample=sorted(anchors[i] for i in picked.tolist()))
    high: list[tuple[float, int]] = []
    low: list[tuple[float, int]] = []
    uses: Counter = Counter()
    bins = min(POSITION_BINS, len(anchors))
    scan.failed_by_bin = [Counter() for _ in range(bins)]
    for k, (pos, record) in enumerate(read_records(run, set(anchors))):
        negatives = record.get("negatives") or []
        if not negatives:
            reason = (record.get("outcome") or {}).get("reason")
            scan.failed_by_bin[k * bins // len(anchors)][reason] += 1
        if not negatives and len(scan.failed) < FAILED:
            scan.failed.append(pos)
        uses.update(normalize(n["text"]) for n in negatives)
        hard = [n for n in negatives if n["type"] == "hard"]
        if hard:
            _push(high, BORDERLINE, (max(n["text_similarity"] for n in hard), -pos))
            _push(low, BORDERLINE, (-min(n["visual_similarity"] for n in hard), -pos))
    scan.high_text = [-p for _, p in sorted(high, reverse=True)]
    scan.low_visual = [-p for _, p in sorted(low, reverse=True)]
    scan.reuse = Counter(uses.values())
    wanted = {*scan.sample, *scan.high_text, *scan.low_visual, *scan.failed}
    scan.records = dict(read_records(run, wanted))
    return scan


def _push(heap: list, size: int, item: tuple) -> None:
    """Keep the `size` largest items."""
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


@dataclass
class Suspects:
    """How many suspects the run found, and those most alike their anchor."""

    total: int = 0
    by_text: list[dict] = field(default_factory=list)
    by_visual: list[dict] = field(default_factory=list)


def top_suspects(path: Path, size: int = SUSPECTS // 2) -> Suspects:
    """The `size` suspects with the highest text similarity among those suspected for
    their text, and likewise for images (ties: file order); one pass, bounded memory."""
    out = Suspects()
    if not path.exists():
        return out
    text: list[tuple] = []
    visual: list[tuple] = []
    with open(path, encoding="utf-8") as handle:
        for k, line in enumerate(handle):
            s = json.loads(line)
            out.total += 1
            if "text" in s["reasons"]:
                _push(text, size, (s["negative"]["text_similarity"], -k, s))
            if "visual" in s["reasons"]:
                _push(visual, size, (s["negative"]["visual_similarity"], -k, s))
    out.by_text = [s for *_, s in sorted(text, reverse=True)]
    out.by_visual = [s for *_, s in sorted(visual, reverse=True)]
    return out


# ---- the page -----------------------------------------------------------------------------

def render(config: Config, metrics: dict[str, Any], scan: Scan, suspects: Suspects,
           thumbs: Thumbs, sweep: dict[str, Any] | None = None) -> str:
    """The whole report page (`sweep`: the run's sweep.json, for the suggestion's figure)."""
    title = f"hnm run report: {config.split} ({Path(config.output_dir).name})"
    body = "".join([
        f"<h1>{esc(title)}</h1>",
        f"<p class='muted'>{esc(config.annotations or '')} · "
        f"{esc(metrics['provenance']['config_hash'])}</p>",
        headline(metrics), plots(config, metrics, scan), failures(metrics, scan, sweep),
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
    if index["kind"] != "ivf" or not recall:
        return ("index", index["kind"], index["reason"])
    return (f"IVF recall@{recall['k']}", fmt(recall["recall_at_k"], ".4f"),
            f"vs exact search, {recall['anchors']} anchors; {index['nlist']} lists, "
            f"{index['nprobe']} probed")


# ---- plots (inline SVG) -------------------------------------------------------------------

# Plot size and margins, in SVG pixels: wide enough for two plots side by side at the
# page's 1200 px, the left margin holding the count labels, the bottom one the ticks.
WIDTH, HEIGHT = 540, 240
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 30, 34


def histogram_svg(title: str, series: list[tuple[str, dict | None, str]],
                  lines: list[tuple[float, str, str]]) -> str:
    """Overlaid histograms over [lo, hi] with labelled vertical lines at given values."""
    hists = [(name, h, colour) for name, h, colour in series if h]
    lo, hi = (hists[0][1]["lo"], hists[0][1]["hi"]) if hists else (-1.0, 1.0)
    top = max((max(h["counts"]) for _, h, _ in hists), default=0) or 1
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    x = lambda v: LEFT + (v - lo) / (hi - lo) * pw  # noqa: E731
    out = [_svg_open(title), _axes(lo, hi, top, x)]
    for name, h, colour in hists:
        n = len(h["counts"])
        for i, c in enumerate(h["counts"]):
            if c:
                bh = c / top * ph
                out.append(f"<rect x='{x(lo + i * (hi - lo) / n):.1f}' y='{TOP + ph - bh:.1f}' "
                           f"width='{pw / n:.1f}' height='{bh:.1f}' fill='{colour}' "
                           f"fill-opacity='0.55'><title>{esc(name)}: {c}</title></rect>")
    for k, (value, label, colour) in enumerate(lines):
        # labels near the right edge go on the line's left, so they are not cut off
        near_edge = x(value) > WIDTH - RIGHT - 60
        at, anchor = (x(value) - 3, "end") if near_edge else (x(value) + 3, "start")
        out.append(f"<line x1='{x(value):.1f}' x2='{x(value):.1f}' y1='{TOP}' y2='{TOP + ph}' "
                   f"stroke='{colour}' stroke-dasharray='4 3'/><text x='{at:.1f}' "
                   f"y='{TOP + 10 + 11 * k}' font-size='10' fill='{colour}' "
                   f"text-anchor='{anchor}'>{esc(label)}</text>")
    out += [_legend([(n, c) for n, _, c in hists]), "</svg>"]
    return "".join(out)


def _svg_open(title: str, height: int = HEIGHT) -> str:
    return (f"<svg class='plot' xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' "
            f"height='{height}' viewBox='0 0 {WIDTH} {height}' role='img'><title>{esc(title)}"
            f"</title><text x='{LEFT}' y='18' font-size='13' font-weight='600'>{esc(title)}</text>")


def _axes(lo: float, hi: float, top: int, x: Any) -> str:
    ph = HEIGHT - TOP - BOTTOM
    ticks = [lo + (hi - lo) * i / 4 for i in range(5)]
    out = [f"<line x1='{LEFT}' x2='{WIDTH - RIGHT}' y1='{TOP + ph}' y2='{TOP + ph}' "
           "stroke='#999'/>"]
    out += [f"<text x='{x(t):.1f}' y='{TOP + ph + 14}' font-size='10' text-anchor='middle'>"
            f"{t:g}</text>" for t in ticks]
    out.append(f"<text x='{LEFT - 4}' y='{TOP + 8}' font-size='10' text-anchor='end'>{top}</text>"
               f"<text x='{LEFT - 4}' y='{TOP + ph}' font-size='10' text-anchor='end'>0</text>")
    return "".join(out)


def _legend(items: list[tuple[str, str]]) -> str:
    out = []
    for k, (name, colour) in enumerate(items):
        lx = WIDTH - RIGHT - 150 + 75 * k
        out.append(f"<rect x='{lx}' y='{HEIGHT - 14}' width='10' height='10' fill='{colour}' "
                   f"fill-opacity='0.7'/><text x='{lx + 14}' y='{HEIGHT - 5}' font-size='11'>"
                   f"{esc(name)}</text>")
    return "".join(out)


def bars_svg(title: str, items: list[tuple[str, float, str]], colour: str = HARD,
             colours: list[str] | None = None) -> str:
    """Horizontal bars: (label, value, value as text) per row; `colours`: one per row
    (else every bar in `colour`)."""
    row = 20
    height = TOP + row * len(items) + 10
    top = max((v for _, v, _ in items), default=0) or 1
    width = WIDTH - 130 - 70
    out = [_svg_open(title, height)]
    for k, (label, value, text) in enumerate(items):
        y = TOP + row * k
        bw = value / top * width
        out.append(f"<text x='124' y='{y + 14}' font-size='11' text-anchor='end'>{esc(label)}"
                   f"</text><rect x='130' y='{y + 3}' width='{bw:.1f}' height='{row - 6}' "
                   f"fill='{colours[k] if colours else colour}'/><text x='{134 + bw:.1f}' "
                   f"y='{y + 14}' font-size='11'>"
                   f"{esc(text)}</text>")
    return "".join(out) + "</svg>"


def plots(config: Config, metrics: dict[str, Any], scan: Scan) -> str:
    g = metrics["global"]
    tau = config.cosine_threshold
    steps = [(tau, "τ", "#555"), (tau + 0.09, "τ+0.09", "#777"), (tau + 0.18, "τ+0.18", "#999"),
             (config.audit_text_similarity, "audit", ALERT)]
    text = histogram_svg("Text similarity to the anchor",
                         [("hard", g["hard_text_similarity"].get("histogram"), HARD),
                          ("diverse", g["diverse_text_similarity"].get("histogram"), DIVERSE)],
                         steps)
    visual = histogram_svg(
        "Visual similarity to the anchor",
        [("hard", g["hard_visual_similarity"].get("histogram"), HARD),
         ("diverse", g["diverse_visual_similarity"].get("histogram"), DIVERSE)],
        [(config.min_visual_similarity, "min visual", "#555"),
         (config.audit_visual_similarity, "audit", ALERT)])
    by_step = g["hard_threshold_steps"]
    hard = max(1, g["hard_negatives"])
    step_bars = bars_svg("Threshold step that accepted each hard negative",
                         [(f"step {k}" if k != "fallback" else k, v,
                           f"{v} ({v / hard:.0%})") for k, v in by_step.items()])
    reuse_bars = bars_svg("Phrase reuse: phrases used n times", reuse_rows(scan.reuse),
                          DIVERSE)
    timing = metrics["timing"]
    time_bars = bars_svg("Time per phase (s)", [(k, v, f"{v:.2f}s") for k, v in timing.items()],
                         "#607d8b")
    return (f"<h2>Distributions</h2><div class='plots'>{text}{visual}{step_bars}{reuse_bars}"
            f"{time_bars}</div>")


def reuse_rows(reuse: Counter, rows: int = 12) -> list[tuple[str, float, str]]:
    """Phrases per use count, 1..rows-1 each, the rest summed in a last "rows+" bar."""
    counts = [(f"{n}×", reuse[n]) for n in range(1, min(max(reuse, default=0), rows - 1) + 1)]
    many = sum(c for n, c in reuse.items() if n >= rows)
    if many:
        counts.append((f"{rows}+×", many))
    return [(label, c, str(c)) for label, c in counts]


# ---- why anchors got no negative ----------------------------------------------------------

def failures(metrics: dict[str, Any], scan: Scan, sweep: dict[str, Any] | None) -> str:
    """The reasons of the anchors without a negative: overall, by shard and along the
    input order (where a sliding-window cap shows), and the suggestion."""
    g = metrics["global"]
    if "failure_reasons" not in g:
        return ""  # a run from before outcomes were recorded
    shares = reason_shares(g["failure_reasons"])
    total = sum(n for _, n in shares)
    out = ["<h2>Why anchors got no negative</h2>"]
    if not total:
        return out[0] + "<p>Every anchor got a negative.</p>"
    out.append(f"<p class='muted'>{total:,} anchors without a negative; each has one reason "
               "(README: the reason codes and the rule that picks one)</p>")
    advice = suggestion(metrics, sweep)
    if advice:
        out.append(f"<p class='advice'><b>Suggestion:</b> {esc(advice)}</p>")
    bars = bars_svg("Anchors without a negative, by reason",
                    [(REASON_LABELS[r], n, f"{n:,} ({n / total:.0%})") for r, n in shares],
                    colours=[REASON_COLOURS[r] for r, _ in shares])
    along = position_svg(scan.failed_by_bin, [r for r, _ in shares])
    out.append(f"<div class='plots'>{bars}{along}</div>")
    reasons = [r for r, _ in shares]
    rows = [[s["shard"], s["anchors"], *(s.get("failure_reasons", {}).get(r, 0)
                                          for r in reasons)] for s in metrics["shards"]]
    out.append(table(["shard", "anchors", *(REASON_LABELS[r] for r in reasons)], rows))
    short = reason_shares(g.get("fewer_than_asked") or {})
    if short:
        out.append(f"<p class='muted'>fewer negatives than asked: {sum(n for _, n in short):,} "
                   "anchors (" + ", ".join(f"{REASON_LABELS[r]} {n:,}" for r, n in short)
                   + ")</p>")
    return "".join(out)


def position_svg(bins: list[Counter], reasons: list[str]) -> str:
    """Stacked columns: anchors without a negative per stretch of the input order, by
    reason (the order the phrase window evolves in)."""
    title = "Anchors without a negative along the input order, by reason"
    top = max((sum(b.values()) for b in bins), default=0) or 1
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    width = pw / max(1, len(bins))
    out = [_svg_open(title)]
    for k, counts in enumerate(bins):
        y = TOP + ph
        for r in [*reasons, None]:
            c = counts.get(r, 0)
            if c:
                h = c / top * ph
                y -= h
                label = REASON_LABELS.get(r, "no reason recorded") if r else "no reason recorded"
                out.append(f"<rect x='{LEFT + k * width + 1:.1f}' y='{y:.1f}' "
                           f"width='{width - 2:.1f}' height='{h:.1f}' "
                           f"fill='{REASON_COLOURS[r]}'><title>{esc(label)}: {c}</title></rect>")
    out.append(f"<line x1='{LEFT}' x2='{WIDTH - RIGHT}' y1='{TOP + ph}' y2='{TOP + ph}' "
               f"stroke='#999'/><text x='{LEFT}' y='{TOP + ph + 14}' font-size='10'>first "
               f"anchors</text><text x='{WIDTH - RIGHT}' y='{TOP + ph + 14}' font-size='10' "
               f"text-anchor='end'>last</text><text x='{LEFT - 4}' y='{TOP + 8}' "
               f"font-size='10' text-anchor='end'>{top}</text>")
    for k, r in enumerate(reasons[:4]):
        lx = LEFT + 130 * k
        out.append(f"<rect x='{lx}' y='{HEIGHT - 14}' width='10' height='10' "
                   f"fill='{REASON_COLOURS[r]}'/><text x='{lx + 14}' y='{HEIGHT - 5}' "
                   f"font-size='11'>{esc(REASON_LABELS[r])}</text>")
    return "".join(out) + "</svg>"


# ---- tables -------------------------------------------------------------------------------

def shard_table(metrics: dict[str, Any]) -> str:
    keys = ["shard", "device", "anchors", "success_rate", "hard_negatives",
            "diverse_negatives", "mean_hard_text_similarity", "mean_hard_visual_similarity",
            "suspect_negatives", "seconds", "peak_rss_mb"]
    rows = [[s.get(k) for k in keys] for s in metrics["shards"]]
    return "<h2>Shards</h2>" + table([k.replace("_", " ") for k in keys], rows)


def config_table(config: Config, metrics: dict[str, Any]) -> str:
    values = config.to_dict()
    values["fields"] = ", ".join(f"{k}={v}" for k, v in values["fields"].items())
    rows = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in values.items()]
    prov = [[k, v] for k, v in metrics["provenance"].items()]
    return ("<h2>Configuration</h2>" + table(["key", "value"], rows)
            + "<h3>Provenance</h3>" + table(["key", "value"], prov))


# ---- gallery ------------------------------------------------------------------------------

class Thumbs:
    """Small inline JPEG thumbnails, each image read once (inside `image_limit`)."""

    def __init__(self, image_dir: Path, max_pixels: int) -> None:
        self.image_dir = image_dir
        self.max_pixels = max_pixels
        self.cache: dict[str, str | None] = {}
        self.missing: set[str] = set()

    def html(self, image: str) -> str:
        if image not in self.cache:
            self.cache[image] = self._data_uri(self.image_dir / image)
        uri = self.cache[image]
        if uri is None:
            self.missing.add(image)
            return f"<div class='noimg'>image not shown<br>{esc(image)}</div>"
        return f"<img class='thumb' src='{uri}' alt='{esc(image)}'>"

    def find_in(self, config: Config, plan: Plan, ds: Dataset | None, keys: set[str]) -> None:
        """Thumbnails of images held in the input's shards, named in the records by their
        keys: read in input order (a Parquet column streams once)."""
        if ds is None:
            try:
                ds = load_dataset(config, list(plan.skipped))
            except HnmError:
                return  # the input moved or changed: its images show as not found
        f = config.fields
        for row, pos in enumerate(ds.positions):
            key = ds.records[pos][f.image]
            if key in keys and key not in self.cache:
                self.cache[key] = self._data_uri(ds.images[row], config.tensor_normalization)

    def _data_uri(self, source: Path | ImageRef, normalization: str = "imagenet") -> str | None:
        from PIL import Image

        try:
            with Image.open(tensor_png(source, normalization) if holds_tensor(source)
                            else image_stream(source)) as img:
                if too_large(img, self.max_pixels):
                    return None
                img.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a fraction of the size
                img = img.convert("RGB")
                img.thumbnail((THUMB, THUMB))
                buffer = io.BytesIO()
                img.save(buffer, "JPEG", quality=72)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None  # a missing, damaged or huge image must not stop the report
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def shown_images(config: Config, scan: Scan, suspects: Suspects) -> set[str]:
    """The image of every anchor and negative the page shows."""
    f = config.fields
    shown = {n["image"] for r in scan.records.values() for n in r.get("negatives") or []}
    shown |= {r[f.image] for r in scan.records.values() if isinstance(r.get(f.image), str)}
    for s in suspects.by_text + suspects.by_visual:
        shown |= {s["anchor_image"], s["negative"]["image"]}
    return shown


def gallery(config: Config, scan: Scan, thumbs: Thumbs) -> str:
    sections = [
        ("Random sample", f"{len(scan.sample)} anchors drawn with seed {config.seed}",
         scan.sample),
        ("Borderline: highest text similarity", "hard negatives closest to saying the same",
         scan.high_text),
        ("Borderline: lowest visual similarity", "hard negatives that look least alike",
         scan.low_visual),
        ("Anchors without a negative", "the first ones in input order", scan.failed),
    ]
    out = ["<h2>Gallery</h2>"]
    for title, note, positions in sections:
        out.append(f"<h3>{esc(title)}</h3><p class='muted'>{esc(note)}</p>")
        cases = "".join(case(config, p, scan.records[p], thumbs) for p in positions)
        out.append(f"<div class='cases'>{cases}</div>" if positions else "<p>None.</p>")
    return "".join(out)


def case(config: Config, position: int, record: dict, thumbs: Thumbs) -> str:
    """One anchor beside its negatives."""
    f = config.fields
    anchor = item(thumbs, record[f.image], record.get(f.id, f"record {position}"),
                  record[f.text], "anchor", "")
    negatives = [negative_item(thumbs, n) for n in record.get("negatives") or []]
    if not negatives:
        reason = (record.get("outcome") or {}).get("reason")
        why = f"<br><span class='muted'>{esc(REASON_LABELS[reason])}</span>" \
            if reason in REASON_LABELS else ""
        negatives = [f"<div class='none'>no negative found{why}</div>"]
    return f"<div class='case'>{anchor}{''.join(negatives)}</div>"


def negative_item(thumbs: Thumbs, n: dict) -> str:
    detail = f"step {n['threshold_step']}" if n["type"] == "hard" else \
        f"cluster {n.get('anchor_cluster')}→{n.get('negative_cluster')}"
    tags = f"<span class='tag {n['type']}'>{n['type']}</span> "
    if n.get("suspect"):
        tags += "<span class='tag suspect'>suspect</span> "
    meta = (f"{tags}{esc(detail)}<br>text {n['text_similarity']:.3f} · "
            f"visual {n['visual_similarity']:.3f}")
    return item(thumbs, n["image"], n["id"], n["text"], "negative", meta)


def item(thumbs: Thumbs, image: str, rid: Any, text: str, kind: str, meta: str) -> str:
    return (f"<div class='item {kind}'>{thumbs.html(image)}<div><div class='meta'>{esc(rid)}"
            f"</div><div class='text'>{esc(text)}</div><div class='meta'>{meta}</div></div>"
            "</div>")


def suspect_table(config: Config, suspects: Suspects, thumbs: Thumbs) -> str:
    """Every suspect counted; those most alike their anchor shown beside it."""
    dropped = "; removed from the output (--drop-suspect-negatives)" \
        if config.drop_suspect_negatives else ""
    out = [f"<h2>Suspected false negatives</h2><p class='muted'>text similarity above "
           f"{config.audit_text_similarity} or visual similarity above "
           f"{config.audit_visual_similarity}; {suspects.total} in all{dropped}; every one "
           f"is listed in suspects.jsonl</p>"]
    for title, shown in (("Texts that say the same as the anchor's", suspects.by_text),
                         ("Images that nearly duplicate the anchor's", suspects.by_visual)):
        out.append(f"<h3>{esc(title)}</h3><p class='muted'>the {len(shown)} most alike</p>")
        cases = "".join(suspect_case(thumbs, s) for s in shown)
        out.append(f"<div class='cases'>{cases}</div>" if shown else "<p>None.</p>")
    return "".join(out)


def suspect_case(thumbs: Thumbs, s: dict) -> str:
    anchor = item(thumbs, s["anchor_image"], s["anchor_id"], s["anchor_text"], "anchor",
                  "suspect for: " + esc(", ".join(s["reasons"])))
    return f"<div class='case'>{anchor}{negative_item(thumbs, s['negative'])}</div>"
