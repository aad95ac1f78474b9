"""Reading the input: each of its files by its format's reader, the records in order, a
block at a time (`Input`, `read_blocks`) or all at once (`read_input`)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Config, Fields
from hnm.readers.avdn import chunk_parts
from hnm.readers.base import Part, Shard, Source
from hnm.readers.delimited import table_parts
from hnm.readers.files import digest, find_shards
from hnm.readers.hf import hf_parts
from hnm.readers.jsonl import json_parts
from hnm.readers.parquet import parquet_parts
from hnm.readers.webdataset import tar_parts

BLOCK_ROWS = 65536  # records a block holds, unless asked otherwise

# each format: its reader of one file, in parts of at most the size given
READERS: dict[str, Callable[[Shard, Fields, int], Iterator[Part]]] = {
    "json": json_parts, "jsonl": json_parts, "csv": table_parts, "tsv": table_parts,
    "parquet": parquet_parts, "webdataset": tar_parts, "hf": hf_parts, "avdn": chunk_parts}


class Input:
    """--annotations (a file, a folder or a glob; shards sorted by name), read a block at a
    time by `blocks`. What a `Source` knows of the input as a whole is known once the
    blocks are read: `ends`, `digest`, `found`, `sample`, `surrogates` (`label`, `fmt` and
    `shards` from the start). Memory: a block, and the file being read where its format
    is parsed whole (a JSON list or object document; an AVDN chunk, a unit of its own;
    a Hugging Face Arrow file is memory-mapped)."""

    def __init__(self, config: Config, planned: bool = False) -> None:
        """`planned`: read by a worker of a planned run (AVDN chunks: no tensor hashed or
        sampled again)."""
        self.label = str(Path(str(config.annotations)))
        fmt, shards = find_shards(config)
        self.fmt, self.shards, self.fields = fmt, tuple(shards), config.fields
        self.read = partial(chunk_parts, max_pixels=config.max_image_pixels, planned=planned) \
            if fmt == "avdn" else READERS[fmt]
        self.ends: list[int] = []  # shards[:i + 1] hold records [0, ends[i]): those read
        self.surrogates = False
        self.digest = ""
        self.done = False  # every block read
        self._found: set[str] = set()  # the fields the files hold, where a reader says
        self._own = False  # some file's records hold only their own fields
        self._samples: list[np.ndarray] = []

    @property
    def found(self) -> frozenset[str] | None:
        """As `Part.found`, over every shard read (None: the records' own fields)."""
        return None if self._own or not self._found else frozenset(self._found)

    @property
    def sample(self) -> np.ndarray | None:
        """As `Part.sample`, over every shard read."""
        return np.concatenate(self._samples) if self._samples else None

    def blocks(self, size: int = BLOCK_ROWS) -> Iterator[Part]:
        """The input's records in order, in blocks of `size` (the last may hold fewer; a
        block may span files); each block's `start` is its first record's position."""
        if size < 1:
            raise ValueError(f"block size {size}")
        self.ends, self.surrogates, self.digest, self.done = [], False, "", False
        self._found, self._own, self._samples = set(), False, []
        held: list[Part] = []
        count = start = 0
        for piece in self._pieces(size):
            while len(piece):
                take = min(size - count, len(piece))
                head, piece = _split(piece, take)
                held.append(head)
                count += take
                if count == size:
                    block = join(held, start)
                    del head, held[:]  # the block's records are the block's alone
                    yield block
                    del block
                    count, start = 0, start + size
        if held:
            yield join(held, start)
        self.digest = digest(self.fmt, list(self.shards))
        self.done = True

    def _pieces(self, size: int) -> Iterator[Part]:
        total = 0
        for shard in self.shards:
            for piece in self.read(shard, self.fields, size):
                self.surrogates |= piece.surrogates
                if piece.found is None:
                    self._own = True
                else:
                    self._found |= piece.found
                if piece.sample is not None:
                    self._samples.append(piece.sample)
                total += len(piece)
                yield piece
            self.ends.append(total)

    def locate(self, pos: int) -> tuple[Path, int]:
        """The file holding record `pos` (a record read already), and its position there."""
        i = bisect.bisect_right(self.ends, pos)
        return self.shards[i].path, pos - (self.ends[i - 1] if i else 0)


def _split(part: Part, n: int) -> tuple[Part, Part]:
    """The part's first n records, and the rest (the sample goes with the first)."""
    def cut(values: list | None, head: bool) -> list | None:
        return None if values is None else values[:n] if head else values[n:]

    if n == len(part):
        return part, Part([])
    return (Part(part.records[:n], cut(part.refs, True), cut(part.keys, True), part.surrogates,
                 part.found, part.sample),
            Part(part.records[n:], cut(part.refs, False), cut(part.keys, False),
                 part.surrogates, part.found))


def join(parts: list[Part], start: int = 0) -> Part:
    """Consecutive parts as one, starting at input position `start`."""
    if len(parts) == 1 and parts[0].start == start:
        return parts[0]

    def each(name: str) -> list[Any] | None:
        if all(getattr(p, name) is None for p in parts):
            return None
        return [x for p in parts for x in (getattr(p, name) or [None] * len(p))]

    found = None if any(p.found is None for p in parts) \
        else frozenset().union(*(p.found for p in parts))  # type: ignore[arg-type]
    samples = [p.sample for p in parts if p.sample is not None]
    return Part([r for p in parts for r in p.records], each("refs"), each("keys"),
                any(p.surrogates for p in parts), found,
                np.concatenate(samples) if samples else None, start)


def read_blocks(config: Config, planned: bool = False, size: int = BLOCK_ROWS
                ) -> Iterator[Part]:
    """The input's records in order, in blocks of at most `size` (`Input.blocks`)."""
    return Input(config, planned).blocks(size)


def read_input(config: Config, planned: bool = False) -> Source:
    """Every record of --annotations (a file, a folder or a glob), shards sorted by name.
    `planned`: read by a worker of a planned run (AVDN chunks: no tensor hashed or
    sampled again)."""
    source = Input(config, planned)
    whole = join(list(source.blocks()) or [Part([])])
    return Source(source.label, source.fmt, source.shards, tuple(source.ends), whole.records,
                  whole.refs, whole.keys, source.surrogates, source.digest, source.found,
                  source.sample)
