"""What every reader shares: the input's files (`Shard`), an image held inside one
(`ImageRef`), what a reader found in a file (`Part`), every record of the input (`Source`),
and reading a text file as UTF-8."""

from __future__ import annotations

import bisect
import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hnm.decoding import reading
from hnm.errors import HnmError

SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # a JSON escape of a surrogate
PIECE_BYTES = 1 << 20  # a text file is read and decoded this many bytes at a time


@dataclass(frozen=True)
class Shard:
    """One input file."""

    path: Path
    name: str  # path relative to the input's folder: the first part of its image keys
    fmt: str
    column: str | None = None  # Parquet and Hugging Face: the column holding image bytes


@dataclass(frozen=True)
class ImageRef:
    """An image held as bytes inside a shard; the bytes are read only when needed."""

    shard: Shard
    at: int  # tar: offset of the member's data; Parquet / Hugging Face: row in the shard
    size: int  # bytes, where the shard says without reading them (tar); else -1
    member: str  # tar: the member's name; else the row, as text
    # SHA-256 of the image's bytes where the reader had them in hand (an AVDN chunk's
    # tensors, hashed as they were checked): the duplicate-image count reads no image again
    digest: str | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """Stable name of the image in a run's outputs: `<shard>/<member or row>`."""
        return f"{self.shard.name}/{self.member}"

    def __str__(self) -> str:
        where = self.member if self.shard.fmt == "webdataset" else f"row {self.member}"
        return f"{self.shard.path}[{where}]"


@dataclass(frozen=True)
class Part:
    """Records a reader found in one shard, in order (or, from `source.Input.blocks`, a
    block of the input's records, which may span shards)."""

    records: list[dict[str, Any]]
    refs: list[ImageRef | None] | None = None  # None: the image field names a file
    keys: list[Any] | None = None  # a JSON dict's keys, the ids of records without one
    surrogates: bool = False  # the text escapes a surrogate: records must be checked
    # the fields the file itself holds, where the reader fills some in (a tar sample's key
    # as its id); None: the records' own fields
    found: frozenset[str] | None = None
    # image tensors: pixel values of a seeded sample of items (items x 3 x values), what
    # the check of --tensor-normalization reads
    sample: Any = None
    start: int = 0  # position of the first record: in the input (a block), else its shard

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class Source:
    """Every record of the input in order, each with where it came from."""

    label: str  # the input as given, for messages
    fmt: str
    shards: tuple[Shard, ...]
    ends: tuple[int, ...]  # shards[:i + 1] hold records [0, ends[i])
    records: list[dict[str, Any]]
    refs: list[ImageRef | None] | None
    keys: list[Any] | None
    surrogates: bool
    digest: str
    found: frozenset[str] | None = None  # as Part.found, over every shard
    sample: Any = None  # as Part.sample, over every shard

    def has(self, name: str) -> bool:
        """Whether any record holds the field as read from the input."""
        if self.found is not None:
            return name in self.found
        return any(isinstance(r, dict) and name in r for r in self.records)

    def field_names(self) -> list[str]:
        """Every field some record holds, sorted (for messages)."""
        if self.found is not None:
            return sorted(self.found)
        return sorted({k for r in self.records if isinstance(r, dict) for k in r})

    def locate(self, pos: int) -> tuple[Path, int]:
        """The shard holding record `pos`, and the record's position in it."""
        i = bisect.bisect_right(self.ends, pos)
        return self.shards[i].path, pos - (self.ends[i - 1] if i else 0)



def read_bytes(path: Path) -> bytes:
    """A text annotation file's bytes; a failure to read is one line naming it."""
    with reading(path, "annotations"):
        return path.read_bytes()


def decode(path: Path, raw: bytes, kind: str) -> str:
    """The file's text; bytes that are not UTF-8 are one line naming the file and byte."""
    try:  # strict: replacing bad bytes would silently change the records passed through
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HnmError(f"{path}: not valid UTF-8 (byte {exc.start}): {kind} must be UTF-8") \
            from None


def text_pieces(path: Path, kind: str) -> Iterator[str]:
    """The file's text, decoded as `decode` does, in pieces of about PIECE_BYTES that end at
    a line end ("\\n", which UTF-8 never holds inside a character), so that a file of any
    size is read in bounded memory. A byte that is not UTF-8 is named as `decode` names
    it: counted from after the byte order mark."""
    with reading(path, "annotations"):
        handle = open(path, "rb")  # noqa: SIM115  (closed below, across the yields)
    with handle:
        offset, rest, first = 0, b"", True
        while True:
            with reading(path, "annotations"):
                chunk = handle.read(PIECE_BYTES)
            data = rest + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            if not cut:
                if not chunk:
                    return
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
            if first and data.startswith(codecs.BOM_UTF8):
                data = data[len(codecs.BOM_UTF8):]
            first = False
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HnmError(f"{path}: not valid UTF-8 (byte {offset + exc.start}): {kind} "
                               "must be UTF-8") from None
            offset += len(data)
            yield text
            if not chunk:
                return
