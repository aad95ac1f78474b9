"""What reading the input hands on, a block of records at a time: `Block` (records
validated, with their ids, images, phrases and groups) and `Facts` (what is known only once
every block was read). The planning pass produces them; the columnar corpus is written from
them; no stage needs every record at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Block:
    """Records [start, start + len(records)) of the input, validated, in input order."""

    start: int  # input position of the first record
    records: list[dict[str, Any]]  # as read: JSON-native values, the input's key order
    ids: list[Any]  # every record's id (str | int): its id field, else its key or position
    images: list[Any]  # every record's image: a Path (joined with --image-dir) or an ImageRef
    keep: np.ndarray  # (len(records),) bool: mined (False: skipped, e.g. a missing image)
    # per mined record of the block (keep.sum() entries, in input order):
    text_ids: np.ndarray  # int64 phrase id (run-wide, phrases numbered by first occurrence)
    groups: np.ndarray  # int64 group code (run-wide, by first occurrence)
    new_phrases: list[str] = field(default_factory=list)  # phrases first met in this block

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class Facts:
    """What the planning pass knows once every block was read."""

    num_records: int
    num_rows: int  # mined rows
    num_phrases: int
    num_anchors: int
    skipped: dict[str, list[int]]  # reason -> record positions left out of mining
    source_sha256: str
    input_format: str
    shard_ends: tuple[int, ...]  # input files [:i + 1] hold records [0, shard_ends[i])
    image_files: str  # data.file_stats of every image file ("" for precomputed embeddings)
    adds_id: bool  # some record holds no id field: the outputs write its id into its row
