"""The checks of the input's records, a block of them at a time: ids (and `IdSet`, the ids
seen so far as numbers), field mapping, nesting, Unicode, text and image fields, images."""

from __future__ import annotations

import difflib
import io
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Fields
from hnm.decoding import DECODING
from hnm.errors import HnmError
from hnm.readers import ImageRef, payload
from hnm.scratch import scratch_array

Locate = Callable[[int], tuple[Path, int]]  # input position -> (file, position in it)

_SPACES = re.compile(r"\s+")
MAX_DEPTH = 100  # levels of lists and objects a record field may hold
CONTAINERS = (dict, list)
SHOWN_FIELDS = 12  # field names listed when a mapping names none of them
# Images checked per round: a progress report each, and bounded memory for the bytes read
# from shards ahead of the decoding threads.
CHECK_CHUNK = 256


def normalize(text: str) -> str:
    """SPEC §1: lower-case, trim, collapse inner whitespace."""
    return _SPACES.sub(" ", text.strip().lower())


def mapped(fields: Fields) -> list[tuple[str, str]]:
    """(kind, name) of every field the mapping requires some record to hold. Left at its
    default, the id and group fields may be absent (ids are then positions, keys or sample
    keys, and every record is its own group)."""
    default = Fields()
    return [(kind, getattr(fields, kind)) for kind in ("id", "text", "image", "group")
            if kind in ("text", "image") or getattr(fields, kind) != getattr(default, kind)]


def check_fields(label: str, names: Collection[str], fields: Fields) -> None:
    """Every field the mapping names must be held by some record (`names`: every field some
    record holds), or the run stops: a name that matches nothing would otherwise quietly
    mean row numbers as ids, or no groups."""
    for kind, name in mapped(fields):
        if name not in names:
            raise HnmError(f"--{kind}-field {name}: no record of {label} has a field "
                           f"'{name}' ({_known_fields(name, sorted(names))})")


def _known_fields(name: str, names: list[str]) -> str:
    """The input's field names, the likeliest meant first."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    close += [n for n in names if n.lower() == name.lower() and n not in close]
    shown = ", ".join(names[:SHOWN_FIELDS]) + (", ..." if len(names) > SHOWN_FIELDS else "")
    guess = f"did you mean {' or '.join(repr(n) for n in close)}? " if close else ""
    return f"{guess}fields: {shown or 'none'}"


def record_id(record: Any, pos: int, key: Any, id_field: str, locate: Locate) -> Any:
    """The record's id: its id field, else its key (a JSON dict's, an AVDN item's index),
    else its position; the record must be an object, the id a string or an integer."""
    if not isinstance(record, dict):
        path, at = locate(pos)
        raise HnmError(f"{path}: record {at} is not an object")
    rid = record.get(id_field, pos if key is None else key)
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        path, at = locate(pos)
        raise HnmError(f"{path}: record {at}: id must be a string or integer, got {rid!r}")
    return rid


def id_text(rid: Any) -> str:
    """What makes two ids one: 7 and "7" are one id in the outputs (Parquet writes both as
    text); "café" in NFC and in NFD, or "r1" and "r1 ", are one id to whoever reads or
    types it."""
    return unicodedata.normalize("NFC", str(rid).strip())


def duplicate(locate: Locate, first: int, prev: Any, pos: int, rid: Any) -> HnmError:
    """The error of record `pos` whose id is one with record `first`'s."""
    path, at = locate(pos)
    first_path, first_at = locate(first)
    where = f"records {first_at} and {at}" if first_path == path \
        else f"record {at} and {first_path} record {first_at}"
    what = f"duplicate id {rid!r}" if prev == rid else \
        f"ids {prev!r} and {rid!r}, one id once written as text," \
        if str(prev) == str(rid) else \
        f"ids {ascii(prev)} and {ascii(rid)}, which differ only in Unicode " \
        "normalisation or surrounding blank space,"
    return HnmError(f"{path}: {what} in {where}")


class IdSet:
    """The ids seen so far, as numbers: the 8-byte hash of each one's `id_text`, in sorted
    runs (a new block's run merged with the runs no larger than it: about log2 of the
    blocks' count of runs; 8 bytes an id, merged runs in scratch arrays: `scratch`). A
    hash met again is only a candidate: the caller finds the earlier ids of that hash and
    compares their texts."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []  # hashes, sorted

    @staticmethod
    def hashes(texts: list[str]) -> np.ndarray:
        """One 8-byte hash of each text (Python's string hash: candidates only)."""
        return np.fromiter(map(hash, texts), np.int64, len(texts))

    def repeats(self, hashes: np.ndarray) -> tuple[dict[int, list[int]], np.ndarray]:
        """For a block's ids (their `hashes`): each one whose hash an earlier id of the
        block has, with those ids' indexes (ascending); and whether each hash is an
        earlier block's."""
        within: dict[int, list[int]] = {}
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        for k in (np.flatnonzero(ordered[1:] == ordered[:-1]) + 1).tolist():
            run = k
            while run > 0 and ordered[run - 1] == ordered[k]:
                run -= 1
            within[int(order[k])] = sorted(int(j) for j in order[run:k])
        earlier = np.zeros(len(hashes), bool)
        for run_hashes in self.runs:
            at = np.minimum(np.searchsorted(run_hashes, hashes), len(run_hashes) - 1)
            earlier |= run_hashes[at] == hashes
        return within, earlier

    def add(self, hashes: np.ndarray) -> None:
        """The block's ids."""
        if not len(hashes):
            return
        self.runs.append(np.sort(hashes))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last, before = self.runs.pop(), self.runs.pop()
            merged = scratch_array(len(before) + len(last), np.int64)
            merged[:len(before)], merged[len(before):] = before, last
            del before, last
            merged.sort()  # in place
            self.runs.append(merged)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.runs)


def check_nesting(records: list[dict[str, Any]], ids: list[Any], start: int,
                  locate: Locate) -> None:
    """Fields nested deeper than MAX_DEPTH are refused while planning: the outputs write
    every record again (JSON, Arrow), which a deep enough value would make fail at the end.
    One level of every record's lists and objects at a time (flat fields cost one check);
    the record at fault is looked for only when there is one."""
    level = [v for r in records for v in r.values() if isinstance(v, CONTAINERS)]
    for _ in range(MAX_DEPTH):
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x)
                 if isinstance(v, CONTAINERS)]
        if not level:
            return
    for k, record in enumerate(records):
        for name, value in record.items():
            if isinstance(value, CONTAINERS) and _depth(value) > MAX_DEPTH:
                path, at = locate(start + k)
                raise HnmError(f"{path}: record {at} (id {ids[k]!r}): field '{name}' is "
                               f"nested more than {MAX_DEPTH} levels deep")


def _depth(value: Any) -> int:
    """Levels of lists and objects in a value (counting stops past MAX_DEPTH)."""
    depth, level = 0, [value]
    while level and depth <= MAX_DEPTH:
        depth += 1
        level = [v for x in level
                 for v in (x.values() if isinstance(x, dict) else x)
                 if isinstance(v, CONTAINERS)]
    return depth


def field(record: dict[str, Any], pos: int, rid: Any, name: str, kind: str,
          locate: Locate) -> str:
    """The record's text or image field: a non-empty string."""
    if name not in record:
        path, at = locate(pos)
        raise HnmError(f"{path}: record {at} (id {rid!r}) has no {kind} field '{name}'")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        path, at = locate(pos)
        raise HnmError(f"{path}: record {at} (id {rid!r}): {kind} field '{name}' "
                       f"must be a non-empty string, got {value!r}")
    return value


def image_file(record: dict[str, Any], pos: int, rid: Any, name: str, locate: Locate) -> str:
    """The record's image file, as named (a URL is refused)."""
    value = field(record, pos, rid, name, "image", locate)
    if value.startswith(("http://", "https://")):
        path, at = locate(pos)
        raise HnmError(f"{path}: record {at} (id {rid!r}): image '{value}' is a URL; hnm "
                       "reads local files: download the images first (e.g. with img2dataset)")
    return value


def check_unicode(records: list[dict[str, Any]], ids: list[Any], start: int,
                  locate: Locate) -> None:
    """Text that JSON escapes can hold but UTF-8 cannot (a lone surrogate) is refused here,
    not found while writing the outputs."""
    for k, record in enumerate(records):
        for name, value in record.items():
            try:
                json.dumps({name: value}, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                path, at = locate(start + k)
                raise HnmError(f"{path}: record {at} (id {ids[k]!r}): field '{name}' holds "
                               f"a lone surrogate ({exc.object[exc.start]!r}), which is not "
                               "valid Unicode") from None


@contextmanager
def image_limit(max_pixels: int) -> Iterator[None]:
    """hnm's own pixel limit instead of PIL's: PIL warns above its MAX_IMAGE_PIXELS and
    refuses twice that at open(); hnm refuses above `max_pixels` itself (too_large)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def too_large(image: Any, max_pixels: int) -> str | None:
    """Why an opened PIL image is over the limit, or None (only its header was read)."""
    w, h = image.size
    if w * h <= max_pixels:
        return None
    return f"too large: {w}x{h} pixels, over --max-image-pixels {max_pixels}"


def image_problem(source: Path | bytes | None, max_pixels: int) -> str | None:
    """Why an image (a file, or bytes read from a shard) cannot be used, or None (call
    inside `image_limit`).

    Decodes the whole image: a file whose header parses but whose data is truncated would
    otherwise fail only while embedding, after the run directory was written.
    """
    from PIL import Image

    if source is None or (isinstance(source, Path) and not is_file(source)):
        return "missing"
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            if (why := too_large(img, max_pixels)):
                return why
            img.load()
    except Image.DecompressionBombError:
        return f"too large: over twice --max-image-pixels {max_pixels}"
    except DECODING:
        return "unreadable"  # PIL raises any of these for some kind of damaged file
    return None


def is_file(path: Path) -> bool:
    """Whether the path names a file; a name too long for the file system, or holding a
    NUL byte, names none."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _payload(source: Path | ImageRef) -> Path | bytes | None:
    """What `image_problem` decodes; a shard that cannot give the bytes gives none."""
    try:
        return payload(source)
    except (OSError, ValueError):  # pyarrow's read errors derive from these too
        return b""


class ImageCheck:
    """Images decoded on a few threads, a chunk at a time, and what was wrong with them:
    the first three named, every one counted."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.bad: list[tuple[Path | ImageRef, str]] = []  # the first three
        self.count = 0
        self.files_only = True  # every bad image is an image file

    def problems(self, images: list[Path | ImageRef], progress: Callable[[int], None]
                 ) -> list[str | None]:
        """Each image's problem, or None; `progress(done)` after each chunk."""
        from concurrent.futures import ThreadPoolExecutor

        problems: list[str | None] = []
        # decoding releases the GIL, and files may sit on a network file system: a few
        # threads per core keep both the cores and the reads busy
        threads = min(32, 4 * len(os.sched_getaffinity(0)))
        check = partial(image_problem, max_pixels=self.max_pixels)
        with image_limit(self.max_pixels), ThreadPoolExecutor(max_workers=threads) as pool:
            for start in range(0, len(images), CHECK_CHUNK):
                # shard bytes are read here, in input order (a Parquet column streams);
                # files are read by the threads
                chunk = [_payload(s) for s in images[start:start + CHECK_CHUNK]]
                problems += pool.map(check, chunk)
                progress(len(problems))
        for image, why in zip(images, problems):
            if why:
                self.count += 1
                self.files_only &= isinstance(image, Path)
                if len(self.bad) < 3:
                    self.bad.append((image, why))
        return problems

    def error(self, label: str) -> HnmError:
        names = ", ".join(f"{p} ({why})" for p, why in self.bad)
        more = f" and {self.count - 3} more" if self.count > 3 else ""
        kind = "image file(s)" if self.files_only else "image(s)"
        return HnmError(f"{label}: {self.count} {kind} missing or unreadable: {names}{more}"
                        " (--on-missing-image skip drops them)")


def stat_line(path: str | Path) -> bytes:
    """What `data.file_stats` hashes of one image file: its path, size and mtime."""
    try:
        st = os.stat(path)
        return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return f"{path}\0missing\n".encode()
