"""The duplicate-image count of the metrics (`data.duplicate_images`' figures) over a
corpus store, in bounded memory: NumPy arrays of each distinct image's size and content
hash, filled a block of rows at a time; only images whose size another image shares are
read."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from hnm.corpus import BATCH_ROWS
from hnm.readers import ImageRef, payload

UNREADABLE = -2  # a size: the image cannot be read
UNKNOWN = -1  # a size: known only once read (images in Parquet shards)


def _identity(image: Path | ImageRef) -> bytes:
    """16 bytes naming the image as `data.duplicate_images` tells images apart (a path,
    or a shard's image: its shard, place, size and member)."""
    if isinstance(image, ImageRef):
        s = image.shard
        text = repr(("ref", str(s.path), s.name, s.fmt, s.column, image.at, image.size,
                     image.member))
    else:
        text = repr(("path", str(image)))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _size(image: Path | ImageRef) -> int:
    if isinstance(image, ImageRef):
        return image.size
    try:
        return image.stat().st_size if image.is_file() else UNREADABLE
    except (OSError, ValueError):
        return UNREADABLE


def _sha256(image: Path | ImageRef) -> bytes | None:
    if isinstance(image, ImageRef) and image.digest is not None:
        return bytes.fromhex(image.digest)  # hashed when the reader had its bytes in hand
    try:
        data = payload(image)
        if isinstance(data, Path):
            data = data.read_bytes()
    except (OSError, ValueError):  # pyarrow's read errors derive from these too
        return None
    return None if data is None else hashlib.sha256(data).digest()


def _blocks(images: Any, rows: np.ndarray) -> Any:
    """(where in `rows`, the images of those rows), a block at a time."""
    for start in range(0, len(rows), BATCH_ROWS):
        part = rows[start:start + BATCH_ROWS]
        yield np.arange(start, start + len(part)), images.take(part) \
            if hasattr(images, "take") else [images[int(i)] for i in part]


def duplicate_images(ds: Any) -> dict[str, int]:
    """Rows whose image holds the same bytes as an earlier row's (by SHA-256), as
    `data.duplicate_images(ds.images)` counts them."""
    n = len(ds)
    names = np.empty(n, dtype="V16")
    for at, images in _blocks(ds.images, np.arange(n)):
        names[at] = [_identity(im) for im in images]
    distinct, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    del names
    sizes = np.empty(len(distinct), dtype=np.int64)
    for at, images in _blocks(ds.images, first):
        sizes[at] = [_size(im) for im in images]
    known = sizes >= 0
    values, counts = np.unique(sizes[known], return_counts=True)
    shared = np.zeros(len(distinct), dtype=bool)
    shared[known] = counts[np.searchsorted(values, sizes[known])] > 1
    hashed = shared | (sizes == UNKNOWN)
    # each distinct image's key: its own (a unique size), its content's hash, or none
    digests = np.zeros(len(distinct), dtype="V32")
    readable = known & ~hashed
    which = np.flatnonzero(hashed)
    for where, images in _blocks(ds.images, first[which]):
        got = [_sha256(im) for im in images]
        at = which[where]
        readable[at] = [g is not None for g in got]
        digests[at] = [g or bytes(32) for g in got]
    labels = np.full(len(distinct), -1, dtype=np.int64)
    own = np.flatnonzero(known & ~hashed)
    labels[own] = np.arange(len(own))
    content = np.flatnonzero(hashed & readable)
    _, groups = np.unique(digests[content], return_inverse=True)
    labels[content] = len(own) + groups.ravel()
    per_row = labels[inverse.ravel()]
    per_row = per_row[per_row >= 0]
    rows = np.bincount(per_row) if len(per_row) else np.zeros(0, dtype=np.int64)
    rows = rows[rows > 0]
    return {"rows": n, "unreadable": n - len(per_row),
            "duplicate_rows": len(per_row) - len(rows), "groups": int((rows > 1).sum())}

