"""JSON annotations: a list of records, a dict of records keyed by id, or JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hnm.config import Fields
from hnm.decoding import reading, unique_keys
from hnm.errors import HnmError
from hnm.readers.base import SURROGATE, Part, Shard, decode, read_bytes


def read_json(shard: Shard, fields: Fields | None = None) -> Part:
    """Records of a JSON list, a JSON dict keyed by id, or JSONL."""
    path = shard.path
    text = decode(path, read_bytes(path), "JSON")
    surrogates = bool(SURROGATE.search(text))
    if path.suffix == ".jsonl" or (not text.lstrip().startswith(("[", "{")) and text.strip()):
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


def read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    """One record a line. Lines end at "\\n" only: U+2028 or U+0085 inside a string is text."""
    records = []
    with reading(path, "annotations") as place:
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            place.where = f"line {number}"
            try:
                records.append(json.loads(line, object_pairs_hook=unique_keys))
            except json.JSONDecodeError as exc:
                raise HnmError(f"{path}: malformed JSON on line {number}: {exc.msg}") from None
    return records
