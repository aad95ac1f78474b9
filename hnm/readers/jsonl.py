"""JSON annotations: a list of records, a dict of records keyed by id, or JSONL.

JSONL is read a piece of the file at a time (bounded memory, whatever its size); a JSON
list or object is one document, parsed whole: its memory is bounded by that file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from hnm.config import Fields
from hnm.decoding import reading, unique_keys
from hnm.errors import HnmError
from hnm.readers.base import SURROGATE, Part, Shard, text_pieces


def json_parts(shard: Shard, fields: Fields | None, size: int) -> Iterator[Part]:
    """Records of a JSON list, a JSON dict keyed by id, or JSONL, in parts of at most
    `size` records (start: the first one's position in the file)."""
    path = shard.path
    pieces = text_pieces(path, "JSON")
    if path.suffix == ".jsonl":
        yield from _lines(path, pieces, size)
        return
    seen: list[str] = []  # the pieces read to tell the kind of file
    for piece in pieces:
        seen.append(piece)
        kind = _kind(path, "".join(seen))
        if kind is not None:
            break
    else:
        kind = "document"
    if kind == "lines":
        yield from _lines(path, chain(seen, pieces), size)
        return
    part = _document(path, "".join(chain(seen, pieces)))
    for start in range(0, len(part.records), size):
        yield Part(part.records[start:start + size],
                   keys=None if part.keys is None else part.keys[start:start + size],
                   surrogates=part.surrogates, start=start)


def _kind(path: Path, head: str) -> str | None:
    """"lines" (JSONL), "document" (parsed whole, as `_document` does), or None: the text
    read so far does not tell. A file starting with "{" whose name does not say JSON is
    JSONL when its first line is a whole value and another line follows (the document
    would end after the first value: JSONL, as `_document` decides too)."""
    body = head.lstrip()
    if not body:
        return None
    if not body.startswith(("[", "{")):
        return "lines"
    if body.startswith("[") or path.suffix == ".json":
        return "document"
    lines = [line for line in head.split("\n") if line.strip()]
    if len(lines) < 2:
        return None
    try:
        json.loads(lines[0], object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):  # the document's parse says which error it is
        return "document"
    return "lines"


def _document(path: Path, text: str) -> Part:
    """A whole JSON file: a list of records, a dict of records keyed by id, or JSONL that
    did not show itself in its first lines."""
    surrogates = bool(SURROGATE.search(text))
    if not text.lstrip().startswith(("[", "{")) and text.strip():
        return Part(read_jsonl(path, text), surrogates=surrogates)
    with reading(path, "annotations"):  # e.g. nested too deeply
        try:
            data = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as exc:
            if path.suffix != ".json" and text.lstrip().startswith("{"):
                return Part(read_jsonl(path, text), surrogates=surrogates)
            raise HnmError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, list):
        return Part(data, surrogates=surrogates)
    if isinstance(data, dict):
        if path.suffix != ".json" and not all(isinstance(v, dict) for v in data.values()):
            # JSONL holding a single record, not a dict of them
            return Part([data], surrogates=surrogates)
        return Part(list(data.values()), keys=list(data.keys()), surrogates=surrogates)
    raise HnmError(f"{path}: expected a list of records or a dict of records")


def _lines(path: Path, pieces: Iterator[str], size: int) -> Iterator[Part]:
    """JSONL records, a part of at most `size` at a time, line numbers running on."""
    records: list[dict[str, Any]] = []
    start, number, surrogates = 0, 0, False
    # what json.loads does, the decoder made once (json.loads alone refuses a leading BOM)
    parse = json.JSONDecoder(object_pairs_hook=unique_keys).decode
    for piece in pieces:
        lines = piece.split("\n")
        if piece.endswith("\n"):
            lines.pop()  # the piece ends a line: the next line starts the next piece
        surrogates |= bool(SURROGATE.search(piece))
        with reading(path, "annotations") as place:
            for line in lines:
                number += 1
                if not line.strip():
                    continue
                place.where = f"line {number}"
                try:
                    records.append(parse(line) if line[0] != "\ufeff"
                                   else json.loads(line, object_pairs_hook=unique_keys))
                except json.JSONDecodeError as exc:
                    raise HnmError(f"{path}: malformed JSON on line {number}: {exc.msg}") \
                        from None
        cut = len(records) - len(records) % size
        for at in range(0, cut, size):
            yield Part(records[at:at + size], surrogates=surrogates, start=start + at)
        if cut:
            records, start = records[cut:], start + cut
            surrogates = surrogates and bool(records)
    if records:
        yield Part(records, surrogates=surrogates, start=start)


def read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    """One record a line. Lines end at "\\n" only: U+2028 or U+0085 inside a string is text."""
    return [r for part in _lines(path, iter([text]), 1 << 62) for r in part.records]
