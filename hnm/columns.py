"""Plain-text tables that fit a width: what a terminal, a pipe or a log shows alike.

Headers wrap onto several lines; a value is never cut. When the columns do not fit side
by side, they are split into several tables, each led by the key column (a row number)
so that a row can be followed from one table to the next.
"""

from __future__ import annotations

import textwrap

GAP = 2  # spaces between columns


def wrap_label(label: str, width: int = 12) -> list[str]:
    """A header's lines: words kept whole, at most `width` characters a line where the
    words allow."""
    return textwrap.wrap(label, width, break_long_words=False) or [""]


def blocks(widths: list[int], first: int, total: int) -> list[list[int]]:
    """The columns of each table, so that each fits `total` characters where it can.
    Column 0 (the key) leads every table; columns 1..first-1 (what the rows are) go only
    into the first; the others follow in order, as many per table as fit (at least
    one)."""
    def cost(columns: list[int]) -> int:
        return sum(widths[c] for c in columns) + GAP * (len(columns) - 1)

    out, current = [], list(range(first))
    for c in range(first, len(widths)):
        if len(current) > 1 and cost(current + [c]) > total:
            out.append(current)
            current = [0]
        current.append(c)
    return out + [current]


def render(labels: list[list[str]], rows: list[list[str]], columns: list[int]) -> list[str]:
    """The lines of one table of `columns`: the headers bottom-aligned, a rule, then the
    rows, every cell right-aligned to its column's width."""
    widths = {c: max([len(line) for line in labels[c]] + [len(row[c]) for row in rows])
              for c in columns}
    height = max(len(labels[c]) for c in columns)

    def line(cells: list[str]) -> str:
        return (" " * GAP).join(cell.rjust(widths[c]) for c, cell in zip(columns, cells))

    head = [line([(([""] * (height - len(labels[c]))) + labels[c])[i] for c in columns])
            for i in range(height)]
    rule = (" " * GAP).join("-" * widths[c] for c in columns)
    return [text.rstrip() for text in head] + [rule] + \
        [line([row[c] for c in columns]).rstrip() for row in rows]


def tables(labels: list[str], rows: list[list[str]], first: int, total: int
           ) -> list[list[str]]:
    """Each table's lines (see `blocks`, `render`): column 0 is the key, columns
    1..first-1 what the rows are."""
    wrapped = [wrap_label(label) for label in labels]
    widths = [max([len(line) for line in wrapped[c]] + [len(row[c]) for row in rows])
              for c in range(len(labels))]
    return [render(wrapped, rows, columns) for columns in blocks(widths, first, total)]
