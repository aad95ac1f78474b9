"""Finding the input's files: a file, a folder or a glob given as --annotations, the format
they hold (--input-format, else detected from their names), and the input's identity."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path

from hnm.config import Config
from hnm.errors import HnmError
from hnm.readers.base import Shard
from hnm.readers.hf import hf_shards

# each --input-format (hnm.config.INPUT_FORMATS): the file suffixes it reads from a folder
SUFFIXES = {"json": (".json", ".jsonl", ".ndjson"), "jsonl": (".json", ".jsonl", ".ndjson"),
            "csv": (".csv",), "tsv": (".tsv",), "parquet": (".parquet",),
            "webdataset": (".tar",), "hf": (), "avdn": (".pkl",)}
# A folder holding several kinds of file is read as the first kind found in this order:
# img2dataset writes .parquet and .json metadata next to its .tar shards.
FOLDER_ORDER = ("webdataset", "parquet", "json", "csv", "tsv", "avdn")
STATS = "_stats.json"  # img2dataset's statistics of a shard, beside it
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
SHARD_FORMATS = ("parquet", "webdataset", "hf", "avdn")  # identified by name, size and mtime


def find_shards(config: Config) -> tuple[str, list[Shard]]:
    """The input's format (detected from names unless --input-format says) and its files,
    whose names must be UTF-8: they name the input in the run and its images' keys."""
    fmt, shards = _find_shards(config)
    for shard in shards:
        try:
            shard.name.encode("utf-8")
        except UnicodeEncodeError:
            raw = shard.name.encode("utf-8", "surrogateescape")
            raise HnmError(f"--annotations {config.annotations}: file name {raw!r} is not "
                           "valid UTF-8") from None
    return fmt, shards


def _find_shards(config: Config) -> tuple[str, list[Shard]]:
    given = str(config.annotations)
    fmt = config.input_format
    path = Path(given)
    if fmt == "hf" or (fmt is None and path.is_dir() and _is_hf(path)):
        return "hf", hf_shards(path, config.hf_split)
    if glob.has_magic(given):
        files = sorted(Path(p) for p in glob.glob(given) if Path(p).is_file())
        if not files:
            raise HnmError(f"--annotations {given}: no file matches")
        root = Path(os.path.commonpath([p.parent for p in files]))
    elif path.is_dir():
        root = path
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        return fmt or detect(path), [Shard(path, path.name, fmt or detect(path))]
    fmt = fmt or _folder_format(given, files)
    chosen = [p for p in files if p.name.lower().endswith(SUFFIXES[fmt])]
    if not chosen:
        raise HnmError(f"--annotations {given}: no {fmt} file ({', '.join(SUFFIXES[fmt])})")
    if fmt == "avdn":
        chosen.sort(key=chunk_order)
    return fmt, [Shard(p, p.relative_to(root).as_posix(), fmt) for p in chosen]


def chunk_order(path: Path) -> tuple:
    """`chunk_2.pkl` before `chunk_10.pkl`: numbers in names compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", path.name))


def reads_tensors(config: Config) -> bool:
    """Whether the input holds its images as tensors (an AVDN processed dataset)."""
    return (config.input_format or detect_format(str(config.annotations or ""))) == "avdn"


def detect_format(given: str) -> str | None:
    """The format `find_shards` would read --annotations as, where the names tell (None:
    nothing to look at); never fails."""
    path = Path(given)
    if glob.has_magic(given):
        return detect(path)
    if path.is_dir():
        if _is_hf(path):
            return "hf"
        names = [p.name.lower() for p in path.iterdir()]
        return next((f for f in FOLDER_ORDER if any(n.endswith(SUFFIXES[f]) for n in names)),
                    None)
    return detect(path)


def detect(path: Path) -> str:
    """A single file's format from its name; anything else is JSON or JSONL, by content."""
    name = path.name.lower()
    return next((f for f in ("csv", "tsv", "parquet", "webdataset", "avdn") if name.endswith(
        SUFFIXES[f])), "json")


def _folder_format(given: str, files: list[Path]) -> str:
    """The one format of the files, so that every file given is read: two formats are
    refused, except the metadata img2dataset writes beside its shards (.parquet and .json
    beside .tar shards, `*_stats.json` beside .parquet ones)."""
    found: dict[str, Path] = {}  # format -> its first file
    for p in files:
        fmt = next((f for f in FOLDER_ORDER if p.name.lower().endswith(SUFFIXES[f])), None)
        if fmt is not None and not (fmt == "json" and p.name.endswith(STATS)):
            found.setdefault(fmt, p)
    if "webdataset" in found:  # img2dataset's metadata beside its shards is not read
        found = {f: p for f, p in found.items() if f not in ("parquet", "json")}
    if len(found) == 1:
        return next(iter(found))
    if found:
        kinds = ", ".join(f"{fmt} ({p.name})" for fmt, p in found.items())
        raise HnmError(f"--annotations {given}: holds annotations in {len(found)} formats, "
                       f"{kinds}; hnm reads one at a time: name the files of one format "
                       "(a glob) or pass --input-format")
    if any(p.name.endswith(STATS) for p in files):
        return "json"
    raise HnmError(f"{given}: cannot read annotations: a folder holding no .json, .jsonl, "
                   ".csv, .tsv, .parquet, .tar or .pkl file and no Hugging Face dataset")


def _is_hf(path: Path) -> bool:
    return any((path / name).is_file() for name in HF_MARKERS)


def digest(fmt: str, shards: list[Shard]) -> str:
    """Identity of the input. Text annotations: their bytes. Shards holding images: each
    one's name, size and modification time, which any rewrite changes, so that a resumed
    run does not read every image again to know its input is the same."""
    if fmt not in SHARD_FORMATS and len(shards) == 1:
        return _sha256_file(shards[0].path)
    h = hashlib.sha256()
    for shard in shards:
        if fmt in SHARD_FORMATS:
            stat = shard.path.stat()
            h.update(f"{shard.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            h.update(f"{shard.name}\0{_sha256_file(shard.path)}\n".encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
