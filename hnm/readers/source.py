"""Reading the whole input: each of its files by its format's reader, the records in order."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from hnm.config import Config, Fields
from hnm.readers.avdn import read_chunk
from hnm.readers.base import Part, Shard, Source
from hnm.readers.delimited import read_table
from hnm.readers.files import digest, find_shards
from hnm.readers.hf import read_hf
from hnm.readers.jsonl import read_json
from hnm.readers.parquet import read_parquet
from hnm.readers.webdataset import read_tar

READERS: dict[str, Callable[[Shard, Fields], Part]] = {
    "json": read_json, "jsonl": read_json, "csv": read_table, "tsv": read_table,
    "parquet": read_parquet, "webdataset": read_tar, "hf": read_hf, "avdn": read_chunk}


def read_input(config: Config, planned: bool = False) -> Source:
    """Every record of --annotations (a file, a folder or a glob), shards sorted by name.
    `planned`: read by a worker of a planned run (AVDN chunks: no tensor hashed or
    sampled again)."""
    label = str(Path(str(config.annotations)))
    fmt, shards = find_shards(config)
    read = partial(read_chunk, max_pixels=config.max_image_pixels, planned=planned) \
        if fmt == "avdn" else READERS[fmt]
    parts = [read(shard, config.fields) for shard in shards]
    ends, total = [], 0
    for part in parts:
        total += len(part.records)
        ends.append(total)
    records = [r for part in parts for r in part.records]
    has_refs = any(part.refs is not None for part in parts)
    refs = [x for part in parts for x in (part.refs or [None] * len(part.records))] \
        if has_refs else None
    has_keys = any(part.keys is not None for part in parts)
    keys = [k for part in parts for k in (part.keys or [None] * len(part.records))] \
        if has_keys else None
    found = None if any(part.found is None for part in parts) \
        else frozenset().union(*(part.found for part in parts))
    samples = [part.sample for part in parts if part.sample is not None]
    return Source(label, fmt, tuple(shards), tuple(ends), records, refs, keys,
                  any(part.surrogates for part in parts), digest(fmt, shards), found,
                  np.concatenate(samples) if samples else None)
