"""HTML helpers shared by the report and the sweep page: one document shell, escaping,
number formats and tables. Everything is inline: a page fetches nothing."""

from __future__ import annotations

import html
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
 background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid
 #ddd;padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.muted{color:#666}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #e2e4e8;border-radius:6px;padding:8px 12px;min-width:130px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #e2e4e8;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef0f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots svg{background:#fff;border:1px solid #e2e4e8;border-radius:6px}
.cases{display:flex;flex-wrap:wrap;gap:8px}
.case{display:flex;gap:10px;background:#fff;border:1px solid #e2e4e8;border-radius:6px;
 padding:8px}
.item{width:270px;display:flex;gap:8px}.item.anchor{border-right:2px solid #ddd;padding-right:10px}
.thumb{width:112px;height:112px;object-fit:contain;background:#eee;flex:none}
.noimg{width:112px;height:112px;background:#eee;color:#888;font-size:11px;display:flex;
 align-items:center;justify-content:center;text-align:center;flex:none}
.text{font-size:12.5px;overflow-wrap:anywhere}.meta{font-size:11.5px;color:#555}
.tag{display:inline-block;border-radius:3px;padding:0 5px;color:#fff;font-size:11px}
.hard{background:#1f6fb4}.diverse{background:#e08a1e}.suspect{background:#c62828}
.none{color:#c62828;align-self:center}
"""


def page(title: str, body: str, css: str = CSS) -> str:
    """A complete HTML document: inline style only, nothing fetched."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{css}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def esc(value: Any) -> str:
    """Text made safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def html_table(head: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table; numbers right-aligned."""
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + body
            + "</table>")


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"<td>{esc('n/a' if value is None else value)}</td>"
    return f"<td class='num'>{esc(format(value, 'g') if isinstance(value, float) else value)}</td>"
