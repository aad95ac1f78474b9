"""Reading annotations and images: field mapping, validation, text normalisation."""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import re
import unicodedata
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hnm.callbacks import Progress, no_progress
from hnm.config import Config, Fields
from hnm.decoding import DECODING
from hnm.errors import HnmError
from hnm.readers import ImageRef, Source, check_normalization, payload, read_input

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


@dataclass(frozen=True)
class Corpus:
    """The input as hnm mines it: every record, and the mined rows (rows with skipped
    images excluded) with their ids, images, phrases and groups. (Not a Hugging Face
    `Dataset`, which is one of the input formats.)"""

    records: list[dict[str, Any]]  # every input record in input order (image bytes as keys)
    positions: np.ndarray  # (n,) position in `records` of each mined row
    ids: list[Any]
    images: list[Path | ImageRef]  # an image file, or an image held in a shard
    phrases: list[str]  # distinct normalized texts, in order of first occurrence
    text_ids: np.ndarray  # (n,) row -> index into `phrases`
    groups: np.ndarray  # (n,) row -> group code; rows of one group never pair
    num_anchors: int
    skipped: dict[str, list[int]]  # reason -> record positions left out of mining
    source_sha256: str
    input_format: str = "json"
    shard_ends: tuple[int, ...] = ()  # input shards [:i + 1] hold records [0, shard_ends[i])
    image_files: str = ""  # hash of every image file's path, size and mtime (file_stats)
    # the id of every record, by position: its id field, else its key or position (the
    # outputs then write it into the record's row)
    record_ids: tuple[Any, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def check_mapping(src: Source, fields: Fields) -> None:
    """Every field the mapping names must be held by some record, or the run stops: a name
    that matches nothing would otherwise quietly mean row numbers as ids, or no groups.
    Left at its default, the id and group fields may be absent (ids are then positions,
    keys or sample keys, and every record is its own group)."""
    default = Fields()
    for kind in ("id", "text", "image", "group"):
        name = getattr(fields, kind)
        if kind in ("id", "group") and name == getattr(default, kind):
            continue
        if not src.has(name):
            raise HnmError(f"--{kind}-field {name}: no record of {src.label} has a field "
                           f"'{name}' ({_known_fields(name, src.field_names())})")


def _known_fields(name: str, names: list[str]) -> str:
    """The input's field names, the likeliest meant first."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    close += [n for n in names if n.lower() == name.lower() and n not in close]
    shown = ", ".join(names[:SHOWN_FIELDS]) + (", ..." if len(names) > SHOWN_FIELDS else "")
    guess = f"did you mean {' or '.join(repr(n) for n in close)}? " if close else ""
    return f"{guess}fields: {shown or 'none'}"


def _record_ids(src: Source, id_field: str) -> list:
    ids: list[Any] = []
    seen: dict[Any, int] = {}
    for pos, record in enumerate(src.records):
        path, at = src.locate(pos)
        if not isinstance(record, dict):
            raise HnmError(f"{path}: record {at} is not an object")
        key = src.keys[pos] if src.keys is not None else None
        rid = record.get(id_field, pos if key is None else key)
        if not isinstance(rid, str | int) or isinstance(rid, bool):
            raise HnmError(f"{path}: record {at}: id must be a string or integer, got {rid!r}")
        # 7 and "7" are one id in the outputs (Parquet writes both as text); "café" in NFC
        # and in NFD, or "r1" and "r1 ", are one id to whoever reads or types it
        text = unicodedata.normalize("NFC", str(rid).strip())
        if text in seen:
            first, first_at = src.locate(seen[text])
            where = f"records {first_at} and {at}" if first == path \
                else f"record {at} and {first} record {first_at}"
            prev = ids[seen[text]]
            what = f"duplicate id {rid!r}" if prev == rid else \
                f"ids {prev!r} and {rid!r}, one id once written as text," \
                if str(prev) == str(rid) else \
                f"ids {ascii(prev)} and {ascii(rid)}, which differ only in Unicode " \
                "normalisation or surrounding blank space,"
            raise HnmError(f"{path}: {what} in {where}")
        seen[text] = pos
        ids.append(rid)
    return ids


def _check_nesting(src: Source, ids: list[Any]) -> None:
    """Fields nested deeper than MAX_DEPTH are refused while planning: the outputs write
    every record again (JSON, Arrow), which a deep enough value would make fail at the end.
    One level of every record's lists and objects at a time (flat fields cost one check);
    the record at fault is looked for only when there is one."""
    level = [v for r in src.records for v in r.values() if isinstance(v, CONTAINERS)]
    for _ in range(MAX_DEPTH):
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x)
                 if isinstance(v, CONTAINERS)]
        if not level:
            return
    for pos, record in enumerate(src.records):
        for name, value in record.items():
            if isinstance(value, CONTAINERS) and _depth(value) > MAX_DEPTH:
                path, at = src.locate(pos)
                raise HnmError(f"{path}: record {at} (id {ids[pos]!r}): field '{name}' is "
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


def _field(src: Source, pos: int, rid: Any, name: str, kind: str) -> str:
    path, at = src.locate(pos)
    record = src.records[pos]
    if name not in record:
        raise HnmError(f"{path}: record {at} (id {rid!r}) has no {kind} field '{name}'")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise HnmError(f"{path}: record {at} (id {rid!r}): {kind} field '{name}' "
                       f"must be a non-empty string, got {value!r}")
    return value


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


def _image_file(src: Source, pos: int, rid: Any, name: str) -> str:
    value = _field(src, pos, rid, name, "image")
    if value.startswith(("http://", "https://")):
        path, at = src.locate(pos)
        raise HnmError(f"{path}: record {at} (id {rid!r}): image '{value}' is a URL; hnm "
                       "reads local files: download the images first (e.g. with img2dataset)")
    return value


def _check_unicode(src: Source, ids: list[Any]) -> None:
    """Text that JSON escapes can hold but UTF-8 cannot (a lone surrogate) is refused here,
    not found while writing the outputs."""
    for pos, record in enumerate(src.records):
        for name, value in record.items():
            try:
                json.dumps({name: value}, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                path, at = src.locate(pos)
                raise HnmError(f"{path}: record {at} (id {ids[pos]!r}): field '{name}' holds "
                               f"a lone surrogate ({exc.object[exc.start]!r}), which is not "
                               "valid Unicode") from None


def image_problem(source: Path | bytes | None, max_pixels: int) -> str | None:
    """Why an image (a file, or bytes read from a shard) cannot be used, or None (call
    inside `image_limit`).

    Decodes the whole image: a file whose header parses but whose data is truncated would
    otherwise fail only while embedding, after the run directory was written.
    """
    from PIL import Image

    if source is None or (isinstance(source, Path) and not _is_file(source)):
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


def _is_file(path: Path) -> bool:
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


def _check_images(label: str, images: list[Path | ImageRef], policy: str, max_pixels: int,
                  progress: Progress) -> list[int]:
    from concurrent.futures import ThreadPoolExecutor

    problems: list[str | None] = []
    # decoding releases the GIL, and files may sit on a network file system: a few threads
    # per core keep both the cores and the reads busy
    threads = min(32, 4 * len(os.sched_getaffinity(0)))
    check = partial(image_problem, max_pixels=max_pixels)
    with image_limit(max_pixels), ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(images), CHECK_CHUNK):
            # shard bytes are read here, in input order (a Parquet column streams); files
            # are read by the threads
            chunk = [_payload(s) for s in images[start:start + CHECK_CHUNK]]
            problems += pool.map(check, chunk)
            progress("check images", len(problems), len(images))
    bad = [(i, p, why) for i, (p, why) in enumerate(zip(images, problems)) if why]
    if bad and policy != "skip":
        names = ", ".join(f"{p} ({why})" for _, p, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        kind = "image file(s)" if all(isinstance(p, Path) for _, p, _ in bad) else "image(s)"
        raise HnmError(f"{label}: {len(bad)} {kind} missing or unreadable: {names}{more}"
                       " (--on-missing-image skip drops them)")
    return [i for i, _, _ in bad]


def load_corpus(config: Config, skip: list[int] | None = None,
                 progress: Progress = no_progress, planned: bool = False) -> Corpus:
    """Read, validate and index the input named by the config (hnm.readers: any format).

    `skip`: record positions already known to be left out (workers pass the plan's),
    which also spares re-checking every image. `planned`: a worker of a planned run reads
    the input (image tensors are not hashed or sampled again).
    """
    if not config.annotations:
        raise HnmError("--annotations: no annotation file given")
    src = read_input(config, planned)
    records = src.records
    if not records:
        raise HnmError(f"{src.label}: no records")
    check_normalization(src.sample, config.tensor_normalization)
    f = config.fields
    ids = _record_ids(src, f.id)  # every record an object
    check_mapping(src, f)
    _check_nesting(src, ids)
    texts = [_field(src, i, ids[i], f.text, "text") for i in range(len(records))]
    if src.surrogates:
        _check_unicode(src, ids)
    image_dir = Path(config.image_dir)
    images = [src.refs[i] if src.refs is not None and src.refs[i] is not None
              else image_dir / _image_file(src, i, ids[i], f.image) for i in range(len(records))]
    if skip is not None:
        skipped = set(skip)
    elif config.image_embeddings or src.fmt == "avdn":  # tensors: checked as they were read
        skipped = set()
    else:
        skipped = set(_check_images(src.label, images, config.on_missing_image,
                                    config.max_image_pixels, progress))
    keep = np.array([i for i in range(len(records)) if i not in skipped], dtype=np.int64)
    if keep.size == 0:
        raise HnmError(f"{src.label}: no record has a usable image")
    ds = _index_rows(config, src, ids, texts, images, keep, skipped)
    return ds if config.image_embeddings else replace(ds, image_files=file_stats(images))


def file_stats(images: list[Path | ImageRef]) -> str:
    """Short hash of the path, size and modification time of every image file (images in
    shards are covered by the shards' own identity): an edited, added or restored image
    changes it, and no image is read."""
    h = hashlib.sha256()
    for path in images:
        if not isinstance(path, Path):
            continue
        try:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:16]


def _index_rows(config: Config, src: Source, ids: list, texts: list, images: list,
                keep: np.ndarray, skipped: set) -> Corpus:
    records = src.records
    phrase_ids: dict[str, int] = {}
    text_ids = np.array([phrase_ids.setdefault(normalize(texts[i]), len(phrase_ids))
                         for i in keep], dtype=np.int64)
    group_codes: dict[str, int] = {}
    groups = np.empty(len(keep), dtype=np.int64)
    for row, pos in enumerate(keep):
        value = records[pos].get(config.fields.group)
        # a sample without a group is its own group
        key = json.dumps(value, sort_keys=True) if value is not None else f"\0row{pos}"
        groups[row] = group_codes.setdefault(key, len(group_codes))
    anchors = len(keep) if config.max_samples is None else min(config.max_samples, len(keep))
    return Corpus(
        records=records, positions=keep, ids=[ids[i] for i in keep],
        images=[images[i] for i in keep], phrases=list(phrase_ids), text_ids=text_ids,
        groups=groups, num_anchors=anchors,
        skipped={"missing_image": sorted(skipped)} if skipped else {},
        source_sha256=src.digest, input_format=src.fmt, shard_ends=src.ends,
        record_ids=tuple(ids),
    )


def anchor_uniforms(ids: list[Any], seed: int) -> np.ndarray:
    """SPEC §7: u_a in [0, 1) from a hash of (seed, id) — independent of any shared stream."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, rid in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}\0{json.dumps(rid)}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def duplicate_images(images: list[Path | ImageRef]) -> dict[str, int]:
    """Rows whose image holds the same bytes as an earlier row's (by SHA-256).

    Only images whose size another image shares are read: a unique size cannot repeat.
    Images in Parquet shards have no size until read: those are all read.
    """
    sizes: dict[Any, int | None] = {p: _size(p) for p in dict.fromkeys(images)}
    same_size = Counter(s for s in sizes.values() if s is not None and s >= 0)
    keys: dict[Any, Any] = {}
    for p, size in sizes.items():
        if size is None:
            keys[p] = None
        elif size >= 0 and same_size[size] == 1:
            keys[p] = ("image", p)  # the only image of its size: equal only to itself
        else:
            keys[p] = _sha256(p)
    rows: dict[Any, int] = defaultdict(int)
    for p in images:
        if keys[p] is not None:
            rows[keys[p]] += 1
    readable = sum(rows.values())
    return {"rows": len(images), "unreadable": len(images) - readable,
            "duplicate_rows": readable - len(rows),
            "groups": sum(c > 1 for c in rows.values())}


def _size(image: Path | ImageRef) -> int | None:
    """Bytes of the image; -1: unknown until read; None: unreadable."""
    if isinstance(image, ImageRef):
        return image.size
    try:
        return image.stat().st_size if _is_file(image) else None
    except OSError:
        return None


def _sha256(image: Path | ImageRef) -> str | None:
    if isinstance(image, ImageRef) and image.digest is not None:
        return image.digest  # hashed when the reader had its bytes in hand
    try:
        data = payload(image)
        if isinstance(data, Path):
            data = data.read_bytes()
    except (OSError, ValueError):  # pyarrow's read errors derive from these too
        return None
    return None if data is None else hashlib.sha256(data).hexdigest()
