"""Hugging Face datasets saved with `save_to_disk`: Arrow files read like Parquet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hnm.config import Fields
from hnm.decoding import first_line, reading
from hnm.errors import HnmError
from hnm.readers.base import ImageRef, Part, Shard
from hnm.readers.parquet import (
    batch_records,
    image_kind,
    load_pyarrow,
    record_columns,
    require_columns,
    value_bytes,
)


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
            first = first_line(str(exc))
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
    pa = load_pyarrow()
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def hf_parts(shard: Shard, fields: Fields, size: int) -> Iterator[Part]:
    """Like Parquet, `size` rows at a time from the memory-mapped file; an `Image` value
    holding no bytes but a path is an image file."""
    with reading(shard.path, "Arrow file"):
        table = _arrow_table(shard.path)
        # offsets and lengths checked against the buffers (no image is read): a damaged
        # file read unchecked could make Arrow read outside it (a crash, not an error)
        table.validate(full=True)
    require_columns(shard.path, table.schema.names, fields)
    column = table.column(fields.image)
    kind = image_kind(column.type)
    if kind is None:
        raise HnmError(f"{shard.path}: image column '{fields.image}' ({column.type}) holds "
                       "neither paths nor bytes")
    keep, as_text = record_columns(shard.path, table.schema, fields.image)
    held = Shard(shard.path, shard.name, "hf", fields.image)
    selected = table.select(keep)
    for start in range(0, table.num_rows, size):
        with reading(shard.path, "Arrow file"):
            records = batch_records(selected.slice(start, size).to_batches(), as_text)
        if kind == "path":
            yield Part(records, start=start)
            continue
        yield Part(records, _refs(records, column.slice(start, size), kind, held, fields,
                                  start), start=start)


def _refs(records: list[dict[str, Any]], column: Any, kind: str, shard: Shard,
          fields: Fields, start: int) -> list[ImageRef | None]:
    """References to the rows' image bytes (row `start` of the file first), or their
    image files; each record's image field becomes the image's key or file."""
    pa = load_pyarrow()
    data = column if kind == "bytes" else pa.compute.struct_field(column, "bytes")
    sizes = pa.compute.binary_length(data).to_pylist()  # from the offsets: no image is read
    files = pa.compute.struct_field(column, "path").to_pylist() if kind == "struct" \
        else [None] * len(records)
    refs: list[ImageRef | None] = []
    for k, record in enumerate(records):
        if sizes[k] is None and files[k]:
            record[fields.image] = files[k]  # an image file, named like any other
            refs.append(None)
            continue
        row = start + k
        ref = ImageRef(shard, row, -1 if sizes[k] is None else sizes[k], str(row))
        record[fields.image] = ref.key
        refs.append(ref)
    return refs


class ArrowImages:
    """`read_image` for an Arrow file: a row's image bytes from the memory-mapped column."""

    def __init__(self, shard: Shard) -> None:
        self.column = _arrow_table(shard.path).column(shard.column)

    def close(self) -> None:
        self.column = None  # the memory map closes with its last reference

    def read(self, ref: ImageRef) -> bytes | None:
        return value_bytes(self.column[ref.at].as_py())
