"""CSV and TSV annotations, read a piece of the file at a time."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from hnm.config import Fields
from hnm.decoding import one_line
from hnm.errors import HnmError
from hnm.readers.base import Part, Shard, text_pieces


def table_parts(shard: Shard, fields: Fields, size: int) -> Iterator[Part]:
    """CSV or TSV with a header row naming the columns, or CC3M-style `caption<TAB>image`
    rows without one, in parts of at most `size` records. TSV has no quoting: a quote
    character is text."""
    path = shard.path
    # the lines io.StringIO(text, newline="") gives of the whole text: pieces end at "\n"
    lines = (line for piece in text_pieces(path, shard.fmt.upper())
             for line in io.StringIO(piece, newline=""))
    quoting = csv.QUOTE_NONE if shard.fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter="\t" if shard.fmt == "tsv" else ",", quoting=quoting)
    header: list[str] | None = None
    records: list[dict[str, str]] = []
    start = 0
    while True:
        try:
            row = next(reader, None)
        except csv.Error as exc:
            raise HnmError(f"{path}: malformed {shard.fmt.upper()} at line {reader.line_num}: "
                           f"{exc}") from None
        if row is None:
            break
        if not row:
            continue
        if header is None:
            header, named = _header(shard, fields, row)
            if named:
                continue
        if len(row) != len(header):
            raise HnmError(f"{path}: line {reader.line_num} has {len(row)} fields, the header "
                           f"{len(header)}")
        records.append(dict(zip(header, row)))
        if len(records) == size:
            yield Part(records, start=start)
            records, start = [], start + size
    if records:
        yield Part(records, start=start)


def _header(shard: Shard, fields: Fields, first: list[str]) -> tuple[list[str], bool]:
    """The column names, and whether the first row is the header: it is where it names the
    text and image columns, else the rows are `caption, image` (the first row is one)."""
    if fields.text in first and fields.image in first:
        twice = next((name for i, name in enumerate(first) if name in first[:i]), None)
        if twice is not None:  # a record would keep the last of the two columns silently
            raise HnmError(f"{shard.path}: column {one_line(repr(twice))} is named twice in "
                           "the header")
        return first, True
    if len(first) == 2:
        return [fields.text, fields.image], False
    raise HnmError(f"{shard.path}: the first row must name the columns (it has no "
                   f"'{fields.text}' and '{fields.image}'), or every row must be `caption, "
                   "image`")
