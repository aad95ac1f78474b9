"""The report's charts, as inline SVG: similarity histograms, bars, and why anchors got no
negative (by reason, by shard and along the input order)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hnm.config import Config
from hnm.outcome import REASON_LABELS
from hnm.pages import esc, html_table
from hnm.report_scan import Scan
from hnm.summary import reason_shares, suggestion

# a colour per failure reason (README's codes), in the charts of "Why anchors got no negative"
REASON_COLOURS = {"min_visual": "#8e24aa", "same_group": "#6d4c41", "ineligible": "#757575",
                  "text_similar": "#00897b", "cross_score": "#d81b60",
                  "repeated_phrase": "#f9a825",
                  "phrase_cap": "#c62828", "no_diverse": "#e08a1e",
                  "suspect_dropped": "#1f6fb4", None: "#bdbdbd"}
HARD, DIVERSE, ALERT = "#1f6fb4", "#e08a1e", "#c62828"


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
    out.append(html_table(["shard", "anchors", *(REASON_LABELS[r] for r in reasons)], rows))
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
