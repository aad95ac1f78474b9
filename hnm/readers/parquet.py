"""Parquet annotations, whose image column holds paths or the images' bytes, and the Arrow
helpers Hugging Face datasets share with them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hnm.config import Fields
from hnm.decoding import one_line, reading, reason
from hnm.errors import HnmError
from hnm.readers.base import ImageRef, Part, Shard

READ_ROWS = 64  # Parquet rows decoded at a time when streaming an image column
# Parquet reads go through a buffer of this size, so that memory holds one page, not a
# whole column chunk (a row group of images can be gigabytes)
READ_BUFFER = 1 << 20


def load_pyarrow() -> Any:
    """pyarrow with its parquet submodule, imported when a Parquet or Arrow file is read."""
    import pyarrow
    import pyarrow.parquet  # noqa: F401  (a submodule: imported for pyarrow.parquet)

    return pyarrow


def image_kind(t: Any) -> str | None:
    """How a column holds images: "path" (text), "bytes", "struct" ({bytes, path}), or None."""
    pa = load_pyarrow()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    if _is_binary(t):
        return "bytes"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 \
            and _is_binary(t.field("bytes").type):
        return "struct"
    return None


def _is_binary(t: Any) -> bool:
    pa = load_pyarrow()
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) \
        or pa.types.is_fixed_size_binary(t)


def _holds(t: Any, test: Callable[[Any], bool]) -> bool:
    """Whether the type or any type nested in it passes `test`."""
    return test(t) or any(_holds(t.field(i).type, test) for i in range(t.num_fields))


def record_columns(path: Path, schema: Any, image: str) -> tuple[list[str], dict[str, Any]]:
    """Columns that go into records, and those read as text: byte columns stay out of the
    records (they have no JSON form; the image column becomes a key), dates, times and
    decimals become text."""
    pa = load_pyarrow()
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


def require_columns(path: Path, names: list[str], fields: Fields) -> None:
    """The text and image columns --text-field and --image-field name must be there, and
    no column name twice (a record would keep one of the two silently)."""
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise HnmError(f"{path}: column {one_line(repr(twice))} is named twice")
    for kind, name in (("text", fields.text), ("image", fields.image)):
        if name not in names:
            raise HnmError(f"{path}: no {kind} column '{name}' (columns: {', '.join(names)})")


def batch_records(batches: Any, as_text: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of Arrow record batches as dicts, the `as_text` columns cast to text."""
    records: list[dict[str, Any]] = []
    for batch in batches:
        for name, kind in as_text.items():
            i = batch.schema.get_field_index(name)
            batch = batch.set_column(i, name, batch.column(i).cast(kind))
        records += batch.to_pylist()
    return records


def parquet_parts(shard: Shard, fields: Fields, size: int) -> Iterator[Part]:
    """Records from every column but the image bytes, a record batch of at most `size`
    rows at a time; the image as a path or a reference."""
    pa = load_pyarrow()
    path = shard.path
    with reading(path, "Parquet file"):
        try:
            handle = pa.parquet.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise HnmError(f"{path}: not a readable Parquet file: {reason(exc)}") from None
        schema = handle.schema_arrow
    require_columns(path, schema.names, fields)
    kind = image_kind(schema.field(fields.image).type)
    if kind is None:
        raise HnmError(f"{path}: image column '{fields.image}' ({schema.field(fields.image).type}"
                       ") holds neither paths nor bytes")
    keep, as_text = record_columns(path, schema, fields.image)
    held = Shard(shard.path, shard.name, shard.fmt, fields.image)
    batches = handle.iter_batches(batch_size=size, columns=keep, use_threads=False)
    start = 0
    while True:
        with reading(path, "Parquet file"):  # e.g. text that is not UTF-8
            try:
                batch = next(batches, None)
                records = None if batch is None else batch_records([batch], as_text)
            except (OSError, pa.ArrowException) as exc:
                raise HnmError(f"{path}: cannot read: {reason(exc)}") from None
        if records is None:
            return
        refs = None if kind == "path" else _keyed(records, held, fields.image, start)
        yield Part(records, refs, start=start)
        start += len(records)


def _keyed(records: list[dict[str, Any]], shard: Shard, field: str, start: int
           ) -> list[ImageRef | None]:
    """References to the rows' image bytes (the first record being row `start` of the
    file); each record's image field becomes its key."""
    refs: list[ImageRef | None] = []
    for row, record in enumerate(records, start):
        ref = ImageRef(shard, row, -1, str(row))
        record[field] = ref.key
        refs.append(ref)
    return refs



# ---------------------------------------------------------------- image bytes, on demand


class ParquetImages:
    """A cursor over one file's image column: reading rows in order streams the column a
    page at a time; a row before the cursor starts the stream again."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.file = load_pyarrow().parquet.ParquetFile(
            shard.path, buffer_size=READ_BUFFER, pre_buffer=False)
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
        return value_bytes(self.batch[ref.at - self.start].as_py())



def value_bytes(value: Any) -> bytes | None:
    """An image cell's bytes: the cell itself, or the `bytes` of an {bytes, path} struct."""
    return value.get("bytes") if isinstance(value, dict) else value
