"""The duplicate-image count of the metrics (`data.duplicate_images`' figures) over a
corpus store, in memory set by its buckets, not by the rows: records spread over unnamed
temporary files by hash (image names), by size (distinct images) and by content (their
SHA-256), each bucket read whole; only images whose size another image shares are
read."""

from __future__ import annotations

import hashlib
import os
import stat
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from hnm.corpus import BATCH_ROWS
from hnm.readers import ImageRef, payload
from hnm.safety import scratch_file

# Rows' image names in one bucket (about; a bucket is read whole: ~100 bytes a row at
# once), in at most BUCKETS buckets (temporary files open at once)
PASS_ROWS = 1 << 17
BUCKETS = 512
NAME = np.dtype([("high", "<u8"), ("low", "<u8")])  # an image's 16-byte name, as numbers
NAMED = np.dtype([("high", "<u8"), ("low", "<u8"), ("row", "<i8")])
SIZED = np.dtype([("size", "<i8"), ("first", "<i8"), ("rows", "<i8")])
# a SHA-256 as numbers: its first 16 bytes sort and bucket it, all 32 tell it apart
DIGEST = np.dtype([("high", "<u8"), ("low", "<u8"), ("rest", "V16")])
CONTENT = np.dtype([("digest", DIGEST), ("rows", "<i8")])
UNREADABLE = -2  # a size: the image cannot be read
UNKNOWN = -1  # a size: known only once read (images in Parquet shards)


def _identity(image: str | Path | ImageRef) -> bytes:
    """16 bytes naming the image as `data.duplicate_images` tells images apart (a path,
    or a shard's image: its shard, place, size and member; or a name as a corpus store
    keeps it)."""
    if isinstance(image, str):
        text = image
    elif isinstance(image, ImageRef):
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
        found = os.stat(image)
    except (OSError, ValueError):
        return UNREADABLE
    return found.st_size if stat.S_ISREG(found.st_mode) else UNREADABLE


def _sizes(ds: Any, rows: np.ndarray) -> list[int]:
    """The sizes of the rows' images (`_size`): a corpus store's image files stat'ed by
    their stored names (no path object made; a name pathlib would write otherwise, such
    as one ending in "/", goes the long way), other images through `ds.images`."""
    named = getattr(ds, "image_names", None)
    if named is None:
        return [_size(im) for im in _images_at(ds.images, rows)]
    workdir = str(ds.workdir) if getattr(ds, "workdir", None) is not None else ""
    out: list[int] = []
    other: list[int] = []
    for k, name in enumerate(named.take(rows)):
        path = name[1:]
        if name[0] == "p" and path not in ("", ".") and not path.endswith(("/", "/.")):
            try:
                found = os.stat(os.path.join(workdir, path) if workdir else path)
                out.append(found.st_size if stat.S_ISREG(found.st_mode) else UNREADABLE)
            except (OSError, ValueError):
                out.append(UNREADABLE)
        else:
            out.append(UNREADABLE)
            other.append(k)
    if other:
        for k, image in zip(other, ds.images.take(rows[other])):
            out[k] = _size(image)
    return out


def _images_at(images: Any, rows: np.ndarray) -> list[Any]:
    return images.take(rows) if hasattr(images, "take") else [images[int(i)] for i in rows]


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


def _blocks(images: Any, rows: np.ndarray | range) -> Any:
    """(where in `rows`, the images of those rows), a block at a time."""
    for start in range(0, len(rows), BATCH_ROWS):
        part = np.asarray(rows[start:start + BATCH_ROWS])
        yield np.arange(start, start + len(part)), images.take(part) \
            if hasattr(images, "take") else [images[int(i)] for i in part]


def duplicate_images(ds: Any) -> dict[str, int]:
    """Rows whose image holds the same bytes as an earlier row's (by SHA-256), as
    `data.duplicate_images(ds.images)` counts them, in memory set by PASS_ROWS and not by
    the rows' count: the rows' image names go to buckets by their hash, each bucket's
    distinct images (with their row counts and sizes) to buckets by their size, in
    unnamed temporary files; images of one size meet in one bucket, and only images whose
    size another image shares are read."""
    n = len(ds)
    count = min(BUCKETS, max(1, -(-n // PASS_ROWS)))
    with ExitStack() as held:
        names = [held.enter_context(scratch_file()) for _ in range(count)]
        # a corpus store's names as stored (one name, one image: other spellings of a
        # path meet again by their bytes), else the images' own
        named = getattr(ds, "image_names", None)
        for at, images in _blocks(named if named is not None else ds.images, range(n)):
            keys = np.frombuffer(b"".join(map(_identity, images)), NAME)
            _spread(names, np.rec.fromarrays([keys["high"], keys["low"], at], dtype=NAMED),
                    keys["low"] % count)
        sized = [held.enter_context(scratch_file()) for _ in range(count)]
        for handle in names:  # each image once: its first row, rows and size
            named = _take(handle, NAMED)
            _, first, rows = np.unique(named[["high", "low"]], return_index=True,
                                       return_counts=True)
            first = named["row"][first]
            del named
            sizes = np.empty(len(first), np.int64)
            order = np.argsort(first, kind="stable")
            for start in range(0, len(order), BATCH_ROWS):
                where = order[start:start + BATCH_ROWS]
                sizes[where] = _sizes(ds, first[where])
            _spread(sized, np.rec.fromarrays([sizes, first, rows], dtype=SIZED),
                    np.where(sizes >= 0, sizes, 0) % count)
        counts = Counts()
        content = [held.enter_context(scratch_file()) for _ in range(count)]
        for handle in sized:  # an image of its own size counted, the others hashed
            part = _take(handle, SIZED)
            own, digests, readable = _by_size(ds, part)
            counts.add(part["rows"][own])
            found = np.zeros(int(readable.sum()), CONTENT)
            found["digest"], found["rows"] = digests[readable], part["rows"][readable]
            _spread(content, found, found["digest"]["low"] % count)
        for handle in content:  # images of one content: one label
            part = _take(handle, CONTENT)
            _, label = np.unique(part["digest"], return_inverse=True)
            counts.add(np.bincount(label.ravel(), weights=part["rows"],
                                   minlength=1).astype(np.int64))
    return {"rows": n, "unreadable": n - counts.readable, "duplicate_rows": counts.duplicates,
            "groups": counts.groups}


class Counts:
    """Rows per label, summed up: readable rows, rows after a label's first, labels of
    more than one row."""

    def __init__(self) -> None:
        self.readable = self.duplicates = self.groups = 0

    def add(self, rows: np.ndarray) -> None:
        rows = rows[rows > 0]
        self.readable += int(rows.sum())
        self.duplicates += int(rows.sum()) - len(rows)
        self.groups += int((rows > 1).sum())


def _by_size(ds: Any, part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of a bucket's distinct images (every image of a known size lies in its size's
    bucket): those of a size no other image has (equal only to themselves), and the
    SHA-256 of the others (of a shared or unknown size) with whether each was read."""
    sizes = part["size"]
    known = sizes >= 0
    values, counts = np.unique(sizes[known], return_counts=True)
    shared = np.zeros(len(part), dtype=bool)
    shared[known] = counts[np.searchsorted(values, sizes[known])] > 1
    hashed = shared | (sizes == UNKNOWN)
    digests = np.zeros(len(part), dtype=DIGEST)
    readable = np.zeros(len(part), dtype=bool)
    which = np.flatnonzero(hashed)
    order = which[np.argsort(part["first"][which], kind="stable")]
    for where, images in _blocks(ds.images, part["first"][order]):
        got = [_sha256(im) for im in images]
        at = order[where]
        readable[at] = [g is not None for g in got]
        digests[at] = np.frombuffer(b"".join(g or bytes(32) for g in got), DIGEST)
    return known & ~hashed, digests, readable


def _spread(files: list[Any], records: np.ndarray, bucket: np.ndarray) -> None:
    """Each record appended to its bucket's file (one sort, one write a bucket)."""
    order = np.argsort(bucket, kind="stable")
    ends = np.searchsorted(bucket[order], np.arange(len(files) + 1))
    for b in np.flatnonzero(ends[1:] > ends[:-1]).tolist():
        files[b].write(records[order[ends[b]:ends[b + 1]]].tobytes())


def _take(handle: Any, dtype: np.dtype) -> np.ndarray:
    """A bucket's records, read whole (the file is let go with its holder)."""
    handle.seek(0)
    return np.frombuffer(handle.read(), dtype)
