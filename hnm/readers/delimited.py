"""CSV and TSV annotations."""

from __future__ import annotations

import csv
import io

from hnm.config import Fields
from hnm.decoding import one_line
from hnm.errors import HnmError
from hnm.readers.base import Part, Shard, decode, read_bytes


def read_table(shard: Shard, fields: Fields) -> Part:
    """CSV or TSV with a header row naming the columns, or CC3M-style `caption<TAB>image`
    rows without one. TSV has no quoting: a quote character is text."""
    path = shard.path
    text = decode(path, read_bytes(path), shard.fmt.upper())
    quoting = csv.QUOTE_NONE if shard.fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""),
                        delimiter="\t" if shard.fmt == "tsv" else ",", quoting=quoting)
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise HnmError(f"{path}: malformed {shard.fmt.upper()} at line {reader.line_num}: "
                       f"{exc}") from None
    if not rows:
        return Part([])
    header = rows[0][1]
    if fields.text in header and fields.image in header:
        rows = rows[1:]
        twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
        if twice is not None:  # a record would keep the last of the two columns silently
            raise HnmError(f"{path}: column {one_line(repr(twice))} is named twice in the "
                           "header")
    elif len(header) == 2:
        header = [fields.text, fields.image]
    else:
        raise HnmError(f"{path}: the first row must name the columns (it has no '{fields.text}'"
                       f" and '{fields.image}'), or every row must be `caption, image`")
    for line, row in rows:
        if len(row) != len(header):
            raise HnmError(f"{path}: line {line} has {len(row)} fields, the header "
                           f"{len(header)}")
    return Part([dict(zip(header, row)) for _, row in rows])
