"""The report's joint-space section: each mined negative's cross score (its text with the
anchor's image) against the anchor's own image–caption score, with the cross rule's line,
and the anchors whose nearest candidates the rule removed."""

from __future__ import annotations

from typing import Any

from hnm.config import Config, has_joint_space
from hnm.pages import esc, fmt, html_table
from hnm.report_scan import Scan

WIDTH, HEIGHT, PAD = 540, 300, 40
HARD, DIVERSE, LINE = "#1f6fb4", "#e08a1e", "#c62828"
AUDIT_RATIO = 0.95  # hnm.audit.AUDIT_CROSS_RATIO: the line drawn when the rule is off


def rule_lines(config: Config) -> list[tuple[str, Any]]:
    """(label, own -> cross) of the lines above which a candidate is no negative."""
    lines = []
    if config.max_cross_score_ratio is not None:
        r = config.max_cross_score_ratio
        lines.append((f"rule: cross = {r:g} × own", lambda own: r * own))
    if config.min_cross_score_margin is not None:
        m = config.min_cross_score_margin
        lines.append((f"rule: cross = own − {m:g}", lambda own: own - m))
    return lines or [(f"audit: cross = {AUDIT_RATIO:g} × own (rule off)",
                      lambda own: AUDIT_RATIO * own)]


def scatter_svg(config: Config, points: list[tuple[float, float, str]]) -> str:
    """Cross score (y) against own score (x) per negative, the rule's line(s) over it."""
    values = [v for own, cross, _ in points for v in (own, cross)]
    lo, hi = min(values + [0.0]), max(values + [1.0])
    span = (hi - lo) or 1.0
    pw, ph = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def x(v: float) -> float:
        return PAD + (v - lo) / span * pw

    def y(v: float) -> float:
        return PAD + ph - (v - lo) / span * ph

    title = "Mined negatives: cross score against the anchor's own score"
    out = [f"<svg class='plot' xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' "
           f"height='{HEIGHT}' viewBox='0 0 {WIDTH} {HEIGHT}' role='img'><title>{esc(title)}"
           f"</title><text x='{PAD}' y='18' font-size='13' font-weight='600'>{esc(title)}</text>",
           f"<rect x='{PAD}' y='{PAD}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>"]
    for t in (lo, (lo + hi) / 2, hi):
        out.append(f"<text x='{x(t):.1f}' y='{PAD + ph + 14}' font-size='10' "
                   f"text-anchor='middle'>{t:.2f}</text><text x='{PAD - 4}' "
                   f"y='{y(t) + 3:.1f}' font-size='10' text-anchor='end'>{t:.2f}</text>")
    out.append(f"<text x='{PAD + pw / 2:.1f}' y='{HEIGHT - 6}' font-size='11' "
               "text-anchor='middle'>own score (anchor's image with its caption)</text>")
    for own, cross, kind in points:
        colour = HARD if kind == "hard" else DIVERSE
        out.append(f"<circle cx='{x(own):.1f}' cy='{y(cross):.1f}' r='2' fill='{colour}' "
                   f"fill-opacity='0.6'><title>{kind}: own {own:.3f}, cross {cross:.3f}"
                   "</title></circle>")
    for k, (label, line) in enumerate(rule_lines(config)):
        out.append(f"<line x1='{x(lo):.1f}' y1='{y(line(lo)):.1f}' x2='{x(hi):.1f}' "
                   f"y2='{y(line(hi)):.1f}' stroke='{LINE}' stroke-dasharray='4 3'/>"
                   f"<text x='{PAD + 6}' y='{PAD + 12 + 12 * k}' font-size='10' "
                   f"fill='{LINE}'>{esc(label)}</text>")
    out.append(f"<text x='{PAD + pw - 4}' y='{PAD + 12}' font-size='10' text-anchor='end'>"
               f"<tspan fill='{HARD}'>● hard</tspan> <tspan fill='{DIVERSE}'>● diverse"
               "</tspan></text></svg>")
    return "".join(out)


def cross_section(config: Config, scan: Scan) -> str:
    """The section, on runs with a joint space only."""
    if not has_joint_space(config):
        return ""
    f = config.fields
    intro = ("<p class='muted'>A negative above the line scores with the anchor's image about "
             "as well as the anchor's own caption does: a likely false negative. "
             f"{len(scan.cross):,} negatives plotted.</p>")
    rows = []
    for pos in scan.cross_removed:
        record = scan.records[pos]
        skipped = (record.get("outcome") or {}).get("skipped") or {}
        negs = record.get("negatives") or []
        rows.append([record.get(f.id, pos), record.get(f.text, ""), skipped["cross_score"],
                     "; ".join(f"{n['text']} ({n['type']}, cross {fmt(n['cross_score'], '.3f')})"
                               for n in negs) or "none"])
    table = ("<h3>Anchors whose nearest candidates the cross rule removed</h3>"
             + html_table(["anchor", "caption", "candidates removed ahead of the pick",
                           "negatives mined instead"], rows)) if rows else \
        "<p class='muted'>The cross rule removed no candidate ahead of a pick.</p>"
    return ("<h2>Joint space: cross scores</h2>" + intro
            + scatter_svg(config, scan.cross) + table)
