"""Reading every input format into records and image references: JSON/JSONL, CSV/TSV,
Parquet, WebDataset tar shards and Hugging Face datasets saved with `save_to_disk`."""

from __future__ import annotations

import bisect
import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hnm.config import Config, Fields
from hnm.decoding import reading, reason
from hnm.errors import HnmError

# each --input-format (hnm.config.INPUT_FORMATS): the file suffixes it reads from a folder
SUFFIXES = {"json": (".json", ".jsonl", ".ndjson"), "jsonl": (".json", ".jsonl", ".ndjson"),
            "csv": (".csv",), "tsv": (".tsv",), "parquet": (".parquet",),
            "webdataset": (".tar",), "hf": (), "avdn": (".pkl",)}
# A folder holding several kinds of file is read as the first kind found in this order:
# img2dataset writes .parquet and .json metadata next to its .tar shards.
FOLDER_ORDER = ("webdataset", "parquet", "json", "csv", "tsv", "avdn")
STATS = "_stats.json"  # img2dataset's statistics of a shard, beside it
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif")  # a tar sample's image: the first present
SHARD_FORMATS = ("parquet", "webdataset", "hf", "avdn")  # identified by name, size and mtime
TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset: key up to the first dot
SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # a JSON escape of a surrogate
READ_ROWS = 64  # Parquet rows decoded at a time when streaming an image column
# Parquet reads go through a buffer of this size, so that memory holds one page, not a
# whole column chunk (a row group of images can be gigabytes)
READ_BUFFER = 1 << 20


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

    @property
    def key(self) -> str:
        """Stable name of the image in a run's outputs: `<shard>/<member or row>`."""
        return f"{self.shard.name}/{self.member}"

    def __str__(self) -> str:
        where = self.member if self.shard.fmt == "webdataset" else f"row {self.member}"
        return f"{self.shard.path}[{where}]"


@dataclass(frozen=True)
class Part:
    """What a reader found in one shard."""

    records: list[dict[str, Any]]
    refs: list[ImageRef | None] | None = None  # None: the image field names a file
    keys: list[Any] | None = None  # a JSON dict's keys, the ids of records without one
    surrogates: bool = False  # the text escapes a surrogate: records must be checked
    # the fields the file itself holds, where the reader fills some in (a tar sample's key
    # as its id); None: the records' own fields
    found: frozenset[str] | None = None


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


def read_input(config: Config) -> Source:
    """Every record of --annotations (a file, a folder or a glob), shards sorted by name."""
    label = str(Path(str(config.annotations)))
    fmt, shards = find_shards(config)
    parts = [READERS[fmt](shard, config.fields) for shard in shards]
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
    return Source(label, fmt, tuple(shards), tuple(ends), records, refs, keys,
                  any(part.surrogates for part in parts), digest(fmt, shards), found)


# ---------------------------------------------------------------- finding the shards


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


# ---------------------------------------------------------------- JSON, JSONL, CSV, TSV


def _read_bytes(path: Path) -> bytes:
    with reading(path, "annotations"):
        return path.read_bytes()


def _decode(path: Path, raw: bytes, kind: str) -> str:
    try:  # strict: replacing bad bytes would silently change the records passed through
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HnmError(f"{path}: not valid UTF-8 (byte {exc.start}): {kind} must be UTF-8") \
            from None


def read_json(shard: Shard, fields: Fields | None = None) -> Part:
    """Records of a JSON list, a JSON dict keyed by id, or JSONL."""
    path = shard.path
    text = _decode(path, _read_bytes(path), "JSON")
    surrogates = bool(SURROGATE.search(text))
    if path.suffix == ".jsonl" or (not text.lstrip().startswith(("[", "{")) and text.strip()):
        return Part(read_jsonl(path, text), surrogates=surrogates)
    with reading(path, "annotations"):  # e.g. nested too deeply
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if path.suffix != ".json" and text.lstrip().startswith("{"):
                return Part(read_jsonl(path, text), surrogates=surrogates)
            raise HnmError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, list):
        return Part(data, surrogates=surrogates)
    if isinstance(data, dict):
        if path.suffix != ".json" and not all(isinstance(v, dict) for v in data.values()):
            # JSONL holding a single record, not a dict of them
            return Part([data], surrogates=surrogates)
        return Part(list(data.values()), keys=list(data.keys()), surrogates=surrogates)
    raise HnmError(f"{path}: expected a list of records or a dict of records")


def read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    """One record a line. Lines end at "\\n" only: U+2028 or U+0085 inside a string is text."""
    records = []
    with reading(path, "annotations") as place:
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            place.where = f"line {number}"
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HnmError(f"{path}: malformed JSON on line {number}: {exc.msg}") from None
    return records


def read_table(shard: Shard, fields: Fields) -> Part:
    """CSV or TSV with a header row naming the columns, or CC3M-style `caption<TAB>image`
    rows without one. TSV has no quoting: a quote character is text."""
    path = shard.path
    text = _decode(path, _read_bytes(path), shard.fmt.upper())
    quoting = csv.QUOTE_NONE if shard.fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""),
                        delimiter="\t" if shard.fmt == "tsv" else ",", quoting=quoting)
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise HnmError(f"{path}: malformed {shard.fmt.upper()} at line {reader.line_num}: "
                       f"{exc}") from None
    if not rows:
        return Part([])
    header = rows[0][1]
    if fields.text in header and fields.image in header:
        rows = rows[1:]
    elif len(header) == 2:
        header = [fields.text, fields.image]
    else:
        raise HnmError(f"{path}: the first row must name the columns (it has no '{fields.text}'"
                       f" and '{fields.image}'), or every row must be `caption, image`")
    for line, row in rows:
        if len(row) != len(header):
            raise HnmError(f"{path}: line {line} has {len(row)} fields, the header "
                           f"{len(header)}")
    return Part([dict(zip(header, row)) for _, row in rows])


# ---------------------------------------------------------------- Parquet and Arrow


def _pa() -> Any:
    import pyarrow
    import pyarrow.parquet  # noqa: F401  (a submodule: imported for pyarrow.parquet)

    return pyarrow


def image_kind(t: Any) -> str | None:
    """How a column holds images: "path" (text), "bytes", "struct" ({bytes, path}), or None."""
    pa = _pa()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    if _is_binary(t):
        return "bytes"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 \
            and _is_binary(t.field("bytes").type):
        return "struct"
    return None


def _is_binary(t: Any) -> bool:
    pa = _pa()
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) \
        or pa.types.is_fixed_size_binary(t)


def _holds(t: Any, test: Callable[[Any], bool]) -> bool:
    """Whether the type or any type nested in it passes `test`."""
    return test(t) or any(_holds(t.field(i).type, test) for i in range(t.num_fields))


def record_columns(path: Path, schema: Any, image: str) -> tuple[list[str], dict[str, Any]]:
    """Columns that go into records, and those read as text: byte columns stay out of the
    records (they have no JSON form; the image column becomes a key), dates, times and
    decimals become text."""
    pa = _pa()
    keep, as_text = [], {}
    for field in schema:
        if field.name == image and image_kind(field.type) != "path":
            continue
        if _holds(field.type, _is_binary):
            continue
        if pa.types.is_temporal(field.type) or pa.types.is_decimal(field.type):
            as_text[field.name] = pa.string()
        elif _holds(field.type, lambda t: pa.types.is_temporal(t) or pa.types.is_decimal(t)):
            raise HnmError(f"{path}: column '{field.name}' ({field.type}) holds dates or "
                           "decimals inside a nested value, which records cannot hold")
        keep.append(field.name)
    return keep, as_text


def _require_columns(path: Path, names: list[str], fields: Fields) -> None:
    for kind, name in (("text", fields.text), ("image", fields.image)):
        if name not in names:
            raise HnmError(f"{path}: no {kind} column '{name}' (columns: {', '.join(names)})")


def _rows(batches: Any, as_text: dict[str, Any]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for batch in batches:
        for name, kind in as_text.items():
            i = batch.schema.get_field_index(name)
            batch = batch.set_column(i, name, batch.column(i).cast(kind))
        records += batch.to_pylist()
    return records


def read_parquet(shard: Shard, fields: Fields) -> Part:
    """Records from every column but the image bytes; the image as a path or a reference."""
    pa = _pa()
    path = shard.path
    with reading(path, "Parquet file"):
        try:
            handle = pa.parquet.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise HnmError(f"{path}: not a readable Parquet file: {reason(exc)}") from None
        schema = handle.schema_arrow
    _require_columns(path, schema.names, fields)
    kind = image_kind(schema.field(fields.image).type)
    if kind is None:
        raise HnmError(f"{path}: image column '{fields.image}' ({schema.field(fields.image).type}"
                       ") holds neither paths nor bytes")
    keep, as_text = record_columns(path, schema, fields.image)
    with reading(path, "Parquet file"):  # e.g. text that is not UTF-8
        try:
            records = _rows(handle.iter_batches(columns=keep, use_threads=False), as_text)
        except (OSError, pa.ArrowException) as exc:
            raise HnmError(f"{path}: cannot read: {reason(exc)}") from None
    if kind == "path":
        return Part(records)
    shard = Shard(shard.path, shard.name, shard.fmt, fields.image)
    return Part(records, _keyed(records, shard, fields.image))


def _keyed(records: list[dict[str, Any]], shard: Shard, field: str) -> list[ImageRef | None]:
    """References to the rows' image bytes; each record's image field becomes its key."""
    refs: list[ImageRef | None] = []
    for row, record in enumerate(records):
        ref = ImageRef(shard, row, -1, str(row))
        record[field] = ref.key
        refs.append(ref)
    return refs


def hf_shards(path: Path, split: str | None) -> list[Shard]:
    """The Arrow files of a dataset saved with `save_to_disk` (one split of a DatasetDict)."""
    try:
        import datasets
    except ImportError:
        raise HnmError(f"--annotations {path}: a Hugging Face dataset; reading it needs the "
                       "'datasets' package: pip install 'hnm[hf]'") from None
    # `datasets` trusts its JSON files' shapes (AttributeError, KeyError on a damaged one):
    # only the loading is inside, so every error of it is the folder's
    with reading(f"--annotations {path}", "a Hugging Face dataset", also=(Exception,)):
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise HnmError(f"--annotations {path}: not a Hugging Face dataset saved with "
                           f"save_to_disk: {first}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            raise HnmError(f"--hf-split: {path} holds the splits {', '.join(names)}; "
                           + ("choose one" if split is None else f"not {split!r}"))
        loaded = loaded[split]
        path = path / split
    elif split is not None:
        raise HnmError(f"--hf-split {split}: {path} holds a single dataset, not splits")
    files = [Path(f["filename"]) for f in loaded.cache_files]
    return [Shard(f, f.relative_to(path).as_posix() if f.is_relative_to(path) else f.name, "hf")
            for f in files]


def _arrow_table(path: Path) -> Any:
    """A `save_to_disk` Arrow file, memory-mapped: reading a row touches only that row."""
    pa = _pa()
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def read_hf(shard: Shard, fields: Fields) -> Part:
    """Like Parquet; an `Image` value holding no bytes but a path is an image file."""
    pa = _pa()
    with reading(shard.path, "Arrow file"):
        table = _arrow_table(shard.path)
        # offsets and lengths checked against the buffers (no image is read): a damaged
        # file read unchecked could make Arrow read outside it (a crash, not an error)
        table.validate(full=True)
    _require_columns(shard.path, table.schema.names, fields)
    column = table.column(fields.image)
    kind = image_kind(column.type)
    if kind is None:
        raise HnmError(f"{shard.path}: image column '{fields.image}' ({column.type}) holds "
                       "neither paths nor bytes")
    keep, as_text = record_columns(shard.path, table.schema, fields.image)
    with reading(shard.path, "Arrow file"):
        records = _rows(table.select(keep).to_batches(), as_text)
    if kind == "path":
        return Part(records)
    shard = Shard(shard.path, shard.name, "hf", fields.image)
    data = column if kind == "bytes" else pa.compute.struct_field(column, "bytes")
    sizes = pa.compute.binary_length(data).to_pylist()  # from the offsets: no image is read
    files = pa.compute.struct_field(column, "path").to_pylist() if kind == "struct" \
        else [None] * len(records)
    refs: list[ImageRef | None] = []
    for row, record in enumerate(records):
        if sizes[row] is None and files[row]:
            record[fields.image] = files[row]  # an image file, named like any other
            refs.append(None)
            continue
        ref = ImageRef(shard, row, -1 if sizes[row] is None else sizes[row], str(row))
        record[fields.image] = ref.key
        refs.append(ref)
    return Part(records, refs)


# ---------------------------------------------------------------- WebDataset tar shards


def read_tar(shard: Shard, fields: Fields) -> Part:
    """Samples grouped by key (the member name up to its first dot, as WebDataset does).
    The image is the first of .jpg .jpeg .png .webp .tif; the text the .json field named by
    --text-field, else the .txt member; other fields (group, id) come from the .json. Only
    headers and the small text members are read: images stay in the file until needed."""
    path = shard.path
    samples = _tar_samples(path)
    records, refs, surrogates, held = [], [], False, {fields.image}
    with open(path, "rb") as handle:
        for key, members in samples:
            meta, escaped = _sample_meta(path, handle, key, members)
            surrogates |= escaped
            held.update(meta)
            record = {} if fields.id in meta else {fields.id: key}
            record.update(meta)
            if fields.text not in meta and "txt" in members:
                record[fields.text] = _member_text(path, handle, members["txt"], key)
                if fields.text == Fields.text:  # a text field the user names is a .json one
                    held.add(fields.text)
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                raise HnmError(f"{path}: sample '{key}' has no image (none of "
                               f"{', '.join('.' + e for e in IMAGE_EXTS)})")
            info = members[ext]
            ref = ImageRef(shard, info.offset_data, info.size, info.name)
            record[fields.image] = ref.key
            records.append(record)
            refs.append(ref)
    return Part(records, refs, surrogates=surrogates, found=frozenset(held))


def _tar_samples(path: Path) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Members grouped into samples in archive order; a damaged archive is one line."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    with reading(path, "tar shard") as place:
        try:
            size = path.stat().st_size
            with tarfile.open(path, "r:") as archive:
                for info in archive:
                    place.where = f"member {_member_name(path, info)!r}"
                    if not info.isfile():
                        continue
                    if info.offset_data + info.size > size:
                        raise HnmError(f"{path}: truncated tar archive: member '{info.name}' "
                                       "ends past the end of the file")
                    match = TAR_KEY.match(info.name)
                    if match is None:
                        continue  # no extension: not part of a sample
                    key, ext = match.group(1), match.group(2).lower()
                    if not samples or samples[-1][0] != key:
                        samples.append((key, {}))
                    samples[-1][1][ext] = info
                end = archive.offset
            with open(path, "rb") as handle:
                handle.seek(end)
                marker = handle.read(tarfile.BLOCKSIZE)
        except tarfile.ReadError as exc:
            if not samples and _compressed(path):
                raise HnmError(f"{path}: a compressed tar archive; hnm reads images at their "
                               "offsets in uncompressed .tar shards: decompress it first "
                               "(e.g. gunzip)") from None
            raise HnmError(f"{path}: not a readable tar archive{_after(samples)}: {exc}") from None
        except OSError as exc:
            raise HnmError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if marker != bytes(tarfile.BLOCKSIZE):  # a tar ends with zero blocks: was it cut short?
            raise HnmError(f"{path}: truncated tar archive: no end-of-archive marker"
                           f"{_after(samples)}")
    return samples


def _member_name(path: Path, info: tarfile.TarInfo) -> str:
    """The member's name, which must be UTF-8: it becomes the image's key in every output
    (tarfile keeps other bytes as lone surrogates, which no output can hold)."""
    try:
        info.name.encode("utf-8")
    except UnicodeEncodeError:
        raw = info.name.encode("utf-8", "surrogateescape")
        raise HnmError(f"{path}: member name {raw!r} is not valid UTF-8") from None
    return info.name


# gzip, bzip2, xz and zstd files start with these bytes
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


def _compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(6).startswith(COMPRESSED_MAGIC)


def _after(samples: list) -> str:
    return f" after sample '{samples[-1][0]}'" if samples else ""


def _member(path: Path, handle: BinaryIO, info: tarfile.TarInfo) -> bytes:
    handle.seek(info.offset_data)
    data = handle.read(info.size)
    if len(data) != info.size:
        raise HnmError(f"{path}: truncated tar archive: member '{info.name}' is cut short")
    return data


def _member_text(path: Path, handle: BinaryIO, info: tarfile.TarInfo, key: str) -> str:
    try:
        return _member(path, handle, info).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HnmError(f"{path}: sample '{key}': {info.name} is not valid UTF-8 "
                       f"(byte {exc.start})") from None


def _sample_meta(path: Path, handle: BinaryIO, key: str, members: dict[str, tarfile.TarInfo]
                 ) -> tuple[dict[str, Any], bool]:
    """The sample's .json object (empty without one), and whether it escapes a surrogate."""
    if "json" not in members:
        return {}, False
    text = _member_text(path, handle, members["json"], key)
    with reading(path, "tar shard", f"sample '{key}'"):  # e.g. nested too deeply
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HnmError(f"{path}: sample '{key}': malformed JSON in {members['json'].name}: "
                           f"{exc.msg}") from None
    if not isinstance(meta, dict):
        raise HnmError(f"{path}: sample '{key}': {members['json'].name} is not an object")
    return meta, bool(SURROGATE.search(text))


def _read_avdn(shard: Shard, fields: Fields) -> Part:
    from hnm.avdn import read_chunk

    return read_chunk(shard, fields)


READERS: dict[str, Callable[[Shard, Fields], Part]] = {
    "json": read_json, "jsonl": read_json, "csv": read_table, "tsv": read_table,
    "parquet": read_parquet, "webdataset": read_tar, "hf": read_hf, "avdn": _read_avdn}


# ---------------------------------------------------------------- image bytes, on demand


# Shards kept open by one process: enough for a batch that spans shards, few enough to
# stay far below the open-file limit however many shards the input has.
OPEN_SHARDS = 16
# (process, shard path) -> reader, least recently used first; keyed by process because a
# forked DataLoader worker must open its own handles.
_open: OrderedDict[tuple[int, Path], Any] = OrderedDict()


def _opened(shard: Shard) -> Any:
    key = (os.getpid(), shard.path)
    if key in _open:
        _open.move_to_end(key)
    else:
        while len(_open) >= OPEN_SHARDS:
            (pid, _), reader = _open.popitem(last=False)
            if pid == os.getpid():
                reader.close()
        _open[key] = OPENERS[shard.fmt](shard)
    return _open[key]


class _TarImages:
    def __init__(self, shard: Shard) -> None:
        self.fd = os.open(shard.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def read(self, ref: ImageRef) -> bytes:
        data = os.pread(self.fd, ref.size, ref.at)  # no shared file position: thread-safe
        if len(data) != ref.size:
            raise OSError(f"{ref.shard.path}: truncated tar archive: member '{ref.member}' "
                          "is cut short")
        return data


class _ParquetImages:
    """A cursor over one file's image column: reading rows in order streams the column a
    page at a time; a row before the cursor starts the stream again."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.file = _pa().parquet.ParquetFile(shard.path, buffer_size=READ_BUFFER,
                                              pre_buffer=False)
        self._restart()

    def close(self) -> None:
        self.file.close()

    def _restart(self) -> None:
        self.batches = self.file.iter_batches(batch_size=READ_ROWS, use_threads=False,
                                              columns=[self.shard.column])
        self.start, self.batch = 0, None

    def read(self, ref: ImageRef) -> bytes | None:
        if ref.at < self.start:
            self._restart()
        try:
            while self.batch is None or ref.at >= self.start + len(self.batch):
                if self.batch is not None:
                    self.start += len(self.batch)
                self.batch = next(self.batches).column(0)
        except Exception:
            self._restart()  # a damaged page ends the stream: the next read starts again
            raise
        return _value_bytes(self.batch[ref.at - self.start].as_py())


class _ArrowImages:
    def __init__(self, shard: Shard) -> None:
        self.column = _arrow_table(shard.path).column(shard.column)

    def close(self) -> None:
        self.column = None  # the memory map closes with its last reference

    def read(self, ref: ImageRef) -> bytes | None:
        return _value_bytes(self.column[ref.at].as_py())


def _value_bytes(value: Any) -> bytes | None:
    return value.get("bytes") if isinstance(value, dict) else value


def _avdn_images(shard: Shard) -> Any:
    from hnm.avdn import ChunkImages

    return ChunkImages(shard)


OPENERS: dict[str, Callable[[Shard], Any]] = {
    "webdataset": _TarImages, "parquet": _ParquetImages, "hf": _ArrowImages,
    "avdn": _avdn_images}


def read_image(ref: ImageRef) -> bytes | None:
    """An image's bytes (None: the row holds no image). Fast read in input order; random
    order is fast too, except in Parquet, where it restarts the column's stream."""
    return _opened(ref.shard).read(ref)


def holds_tensor(source: Path | ImageRef) -> bool:
    """Whether the image is a tensor (an AVDN processed dataset's item), not encoded bytes."""
    return isinstance(source, ImageRef) and source.shard.fmt == "avdn"


def read_tensor(ref: ImageRef) -> Any:
    """An image tensor, C x H x W (hnm.avdn: its chunk is kept per process)."""
    from hnm.avdn import image_tensor

    return image_tensor(ref)


def tensor_png(ref: ImageRef, normalization: str) -> BinaryIO:
    """An image tensor mapped back to an image (--tensor-normalization), as PNG bytes."""
    from hnm.avdn import to_image

    buffer = io.BytesIO()
    to_image(read_tensor(ref), normalization).save(buffer, "PNG")
    buffer.seek(0)
    return buffer


def payload(source: Path | ImageRef) -> Path | bytes | None:
    """What PIL decodes: the file's path, or the image's bytes read from its shard."""
    return source if isinstance(source, Path) else read_image(source)


def image_stream(source: Path | ImageRef) -> Path | BinaryIO:
    """An image file's path, or its bytes in memory: what `PIL.Image.open` takes."""
    data = payload(source)
    if data is None:
        raise OSError("the row holds no image")
    return data if isinstance(data, Path) else io.BytesIO(data)
