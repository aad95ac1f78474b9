"""Reading annotations and images: field mapping, validation, text normalisation."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Config
from hnm.errors import HnmError

_SPACES = re.compile(r"\s+")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def normalize(text: str) -> str:
    """SPEC §1: lower-case, trim, collapse inner whitespace."""
    return _SPACES.sub(" ", text.strip().lower())


@dataclass(frozen=True)
class Dataset:
    """The mined rows of an annotation file (rows with skipped images excluded)."""

    records: list[dict[str, Any]]  # every input record, unchanged, in input order
    positions: np.ndarray  # (n,) position in `records` of each mined row
    ids: list[Any]
    images: list[Path]
    phrases: list[str]  # distinct normalized texts, in order of first occurrence
    text_ids: np.ndarray  # (n,) row -> index into `phrases`
    groups: np.ndarray  # (n,) row -> group code; rows of one group never pair
    num_anchors: int
    skipped: dict[str, list[int]]  # reason -> record positions left out of mining
    source_sha256: str

    def __len__(self) -> int:
        return len(self.ids)


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[Any] | None, str]:
    """Records of a JSON list, a JSON dict keyed by id, or JSONL; plus dict keys and sha256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HnmError(f"{path}: cannot read annotations: {exc.strerror}") from None
    digest = hashlib.sha256(raw).hexdigest()
    try:  # strict: replacing bad bytes would silently change the records passed through
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HnmError(f"{path}: not valid UTF-8 (byte {exc.start}): JSON must be UTF-8") \
            from None
    if path.suffix == ".jsonl" or (not text.lstrip().startswith(("[", "{")) and text.strip()):
        return _read_jsonl(path, text), None, digest
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if path.suffix != ".json" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text), None, digest
        raise HnmError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, list):
        return data, None, digest
    if isinstance(data, dict):
        if path.suffix != ".json" and not all(isinstance(v, dict) for v in data.values()):
            return [data], None, digest  # JSONL holding a single record, not a dict of them
        return list(data.values()), list(data.keys()), digest
    raise HnmError(f"{path}: expected a list of records or a dict of records")


def _read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise HnmError(f"{path}: malformed JSON on line {number}: {exc.msg}") from None
    return records


def _record_ids(path: Path, records: list[Any], keys: list[Any] | None, id_field: str) -> list:
    ids: list[Any] = []
    seen: dict[Any, int] = {}
    for pos, record in enumerate(records):
        if not isinstance(record, dict):
            raise HnmError(f"{path}: record {pos} is not an object")
        rid = record.get(id_field, keys[pos] if keys is not None else pos)
        if not isinstance(rid, str | int) or isinstance(rid, bool):
            raise HnmError(f"{path}: record {pos}: id must be a string or integer, got {rid!r}")
        if rid in seen:
            raise HnmError(f"{path}: duplicate id {rid!r} in records {seen[rid]} and {pos}")
        seen[rid] = pos
        ids.append(rid)
    return ids


def _field(path: Path, record: dict, pos: int, rid: Any, name: str, kind: str) -> str:
    if name not in record:
        raise HnmError(f"{path}: record {pos} (id {rid!r}) has no {kind} field '{name}'")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise HnmError(f"{path}: record {pos} (id {rid!r}): {kind} field '{name}' "
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


def image_problem(path: Path, max_pixels: int) -> str | None:
    """Why an image file cannot be used, or None (call inside `image_limit`).

    Decodes the whole image: a file whose header parses but whose data is truncated would
    otherwise fail only while embedding, after the run directory was written.
    """
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as img:
            if (why := too_large(img, max_pixels)):
                return why
            img.load()
    except Image.DecompressionBombError:
        return f"too large: over twice --max-image-pixels {max_pixels}"
    except (OSError, ValueError, SyntaxError):
        return "unreadable"  # PIL raises each of these for some kind of damaged file
    return None


def _check_images(path: Path, images: list[Path], policy: str, max_pixels: int,
                  progress: Progress) -> list[int]:
    from concurrent.futures import ThreadPoolExecutor

    problems = []
    # decoding releases the GIL, and files may sit on a network file system: a few threads
    # per core keep both the cores and the reads busy
    threads = min(32, 4 * len(os.sched_getaffinity(0)))
    check = partial(image_problem, max_pixels=max_pixels)
    with image_limit(max_pixels), ThreadPoolExecutor(max_workers=threads) as pool:
        for done, problem in enumerate(pool.map(check, images), start=1):
            problems.append(problem)
            if done % 256 == 0 or done == len(images):
                progress("check images", done, len(images))
    bad = [(i, p, why) for i, (p, why) in enumerate(zip(images, problems)) if why]
    if bad and policy != "skip":
        names = ", ".join(f"{p} ({why})" for _, p, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise HnmError(f"{path}: {len(bad)} image file(s) missing or unreadable: {names}{more}"
                       " (--on-missing-image skip drops them)")
    return [i for i, _, _ in bad]


def no_progress(stage: str, done: int, total: int) -> None:
    """The progress callback of callers that show none."""


def load_dataset(config: Config, skip: list[int] | None = None,
                 progress: Progress = no_progress) -> Dataset:
    """Read, validate and index the annotations named by the config.

    `skip`: record positions already known to be left out (workers pass the plan's),
    which also spares re-checking every image file.
    """
    if not config.annotations:
        raise HnmError("--annotations: no annotation file given")
    path = Path(config.annotations)
    records, keys, digest = read_records(path)
    if not records:
        raise HnmError(f"{path}: no records")
    f = config.fields
    ids = _record_ids(path, records, keys, f.id)
    texts = [_field(path, r, i, ids[i], f.text, "text") for i, r in enumerate(records)]
    image_dir = Path(config.image_dir)
    images = [image_dir / _field(path, r, i, ids[i], f.image, "image")
              for i, r in enumerate(records)]
    if skip is not None:
        skipped = set(skip)
    elif config.image_embeddings:
        skipped = set()
    else:
        skipped = set(_check_images(path, images, config.on_missing_image,
                                    config.max_image_pixels, progress))
    keep = np.array([i for i in range(len(records)) if i not in skipped], dtype=np.int64)
    if keep.size == 0:
        raise HnmError(f"{path}: no record has a usable image")
    return _index_rows(config, path, records, ids, texts, images, keep, skipped, digest)


def _index_rows(config: Config, path: Path, records: list, ids: list, texts: list,
                images: list, keep: np.ndarray, skipped: set, digest: str) -> Dataset:
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
    return Dataset(
        records=records, positions=keep, ids=[ids[i] for i in keep],
        images=[images[i] for i in keep], phrases=list(phrase_ids), text_ids=text_ids,
        groups=groups, num_anchors=anchors,
        skipped={"missing_image": sorted(skipped)} if skipped else {}, source_sha256=digest,
    )


def anchor_uniforms(ids: list[Any], seed: int) -> np.ndarray:
    """SPEC §7: u_a in [0, 1) from a hash of (seed, id) — independent of any shared stream."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, rid in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}\0{json.dumps(rid)}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def duplicate_images(paths: list[Path]) -> dict[str, int]:
    """Rows whose image file holds the same bytes as an earlier row's (by SHA-256).

    Only files whose size another file shares are read: a unique size cannot repeat.
    """
    sizes: dict[Path, int | None] = {p: _size(p) for p in dict.fromkeys(paths)}
    same_size = Counter(s for s in sizes.values() if s is not None)
    keys: dict[Path, Any] = {}
    for p, size in sizes.items():
        if size is None:
            keys[p] = None
        elif same_size[size] == 1:
            keys[p] = ("path", p)  # the only file of its size: equal only to itself
        else:
            keys[p] = _sha256(p)
    rows: dict[Any, int] = defaultdict(int)
    for p in paths:
        if keys[p] is not None:
            rows[keys[p]] += 1
    readable = sum(rows.values())
    return {"rows": len(paths), "unreadable": len(paths) - readable,
            "duplicate_rows": readable - len(rows),
            "groups": sum(c > 1 for c in rows.values())}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
