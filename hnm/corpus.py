"""The columnar corpus: the input as the phases after planning read it, from the run
directory's `corpus/` folder (written once while planning, `hnm.corpus_write`).

Arrow IPC files (uncompressed, memory-mapped: nothing is copied until a value is asked for)
hold every record as JSON text, its id (JSON text: 7 and "7" stay apart) and its image (a
path, or an image held in a shard); the distinct phrases in another. The numeric columns
of the mined rows — record position, phrase, group, and the anchor uniform of SPEC §7 —
are .npy files, memory-mapped. `meta.json` holds the facts of the planning pass and the
Arrow types of the output columns, computed while the store was written.

`ColumnarCorpus` has the attribute names of `data.Corpus`: numeric columns as arrays,
everything else as read-only sequences that decode only the rows asked for.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, overload

import numpy as np

from hnm import schema
from hnm.arrow_arrays import int_array
from hnm.errors import HnmError
from hnm.readers import ImageRef, Shard
from hnm.scratch import scratch_array
from hnm.storage import RunDir, parse_json, read_npy

FORMAT = "hnm columnar corpus"
VERSION = 1
BATCH_ROWS = 65_536  # rows per Arrow record batch
NUMERIC = ("positions", "text_ids", "groups", "uniforms")  # .npy, one entry per mined row
ARROW = ("records", "phrases")
AGAIN = "rerun the mining command (it writes it again)"
META = {"format": str, "version": int, "seed": int, "batch_rows": int, "id_field": str,
        "files": schema.Map(int),
        "facts": {"num_records": int, "num_rows": int, "num_phrases": int,
                  "num_anchors": int, "skipped": schema.Map([int]), "source_sha256": str,
                  "input_format": str, "shard_ends": [int], "image_files": str,
                  "adds_id": bool},
        "columns": str, "ids_type": str}


def names() -> list[str]:
    """The store's files, relative to its folder."""
    return ["meta.json", *(f"{n}.arrow" for n in ARROW), *(f"{n}.npy" for n in NUMERIC)]


def encode_schema(fields: list[tuple[str, Any]]) -> str:
    """Arrow types by name (None: JSON text, kept as a null-typed field named so), as
    text for meta.json."""
    import pyarrow as pa

    as_json = [n for n, t in fields if t is None]
    sch = pa.schema([(n, t if t is not None else pa.string()) for n, t in fields],
                    metadata={"json": json.dumps(as_json)})
    return base64.b64encode(sch.serialize().to_pybytes()).decode("ascii")


def decode_schema(text: str) -> list[tuple[str, Any]]:
    import pyarrow as pa

    sch = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
    as_json = set(json.loads((sch.metadata or {}).get(b"json", b"[]")))
    return [(f.name, None if f.name in as_json else f.type) for f in sch]


def image_of(path: str | None, ref: str | None, shards: dict[tuple, Shard]) -> Path | ImageRef:
    """An image as stored: a file's path, or an ImageRef (its shard shared by its rows)."""
    if ref is None:
        return Path(path or "")
    spath, name, fmt, column, at, size, member, digest = json.loads(ref)
    key = (spath, name, fmt, column)
    shard = shards.get(key)
    if shard is None:
        shard = shards[key] = Shard(Path(spath), name, fmt, column)
    return ImageRef(shard, at, size, member, digest)


def ref_text(image: Path | ImageRef) -> tuple[str | None, str | None]:
    """(path, ref) columns of an image, what `image_of` rebuilds it from."""
    if isinstance(image, ImageRef):
        s = image.shard
        return None, json.dumps([str(s.path), s.name, s.fmt, s.column, image.at, image.size,
                                 image.member, image.digest], ensure_ascii=False)
    return str(image), None


def _image_name(path: str | None, ref: str | None) -> str:
    """An image's stored name: a path's text or a shard image's reference, told apart."""
    return "r" + ref if ref is not None else "p" + (path or "")


def char_lengths(column: Any) -> np.ndarray:
    """The length in characters of each string of an Arrow string column: its UTF-8 bytes
    that begin a character, counted from the column's buffers (pyarrow.compute's
    utf8_length gives the same, but its first call imports pandas: half a second)."""
    import pyarrow as pa

    _, offsets, data = column.buffers()
    kind = np.int64 if pa.types.is_large_string(column.type) else np.int32
    ends = np.frombuffer(offsets, kind)[column.offset:column.offset + len(column) + 1]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    begins = np.zeros(len(raw) + 1, np.int64 if len(raw) >= 2**31 else np.int32)
    np.cumsum((raw & 0xC0) != 0x80, out=begins[1:])
    return (begins[ends[1:]] - begins[ends[:-1]]).astype(np.int64)


def _gather(column: Any, local: np.ndarray) -> list[Any]:
    """The values of an Arrow column at `local` (ascending) as Python values. Rows close
    together (the common case: records read in order, a block's negatives) are converted
    as the slice they span; far apart, taken first (Arrow's take, whose first call imports
    pyarrow.compute: tens of ms)."""
    lo, hi = int(local[0]), int(local[-1]) + 1
    if hi - lo <= 4 * len(local):
        values = column.slice(lo, hi - lo).to_pylist()
        if hi - lo == len(local) and bool((np.diff(local) == 1).all()):
            return values
        return [values[i] for i in (local - lo).tolist()]
    return column.take(int_array(local)).to_pylist()


class Rows(Sequence):
    """A read-only sequence of one column's values, decoded only where asked (int index,
    slice, iteration a batch at a time). `rows`: the records it maps its items to (mined
    rows), or None (every record)."""

    def __init__(self, store: ColumnarCorpus, file: str, columns: tuple[str, ...],
                 decode: Callable[..., Any], rows: np.ndarray | None, size: int) -> None:
        self.store, self.file, self.columns, self.decode = store, file, columns, decode
        self.rows, self.size = rows, size

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.take(np.arange(self.size)[i])
        if not -self.size <= i < self.size:
            raise IndexError(i)
        return self.take(np.array([i % self.size]))[0]

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, self.size, BATCH_ROWS):
            yield from self.take(np.arange(start, min(self.size, start + BATCH_ROWS)))

    def lengths(self) -> np.ndarray:
        """Every item's length in characters (a text column of every record: the
        phrases), from the column a batch at a time, with no string built."""
        reader = self.store._reader(self.file)
        out = scratch_array(sum(reader.get_batch(b).num_rows
                                for b in range(reader.num_record_batches)), np.int64)
        at = 0
        for b in range(reader.num_record_batches):
            part = char_lengths(reader.get_batch(b).column(self.columns[0]))
            out[at:at + len(part)] = part
            at += len(part)
        return out if self.rows is None else out[self.rows]

    def take(self, items: np.ndarray) -> list[Any]:
        """The values of the given items, in their order."""
        where = np.asarray(items, dtype=np.int64) if self.rows is None \
            else np.asarray(self.rows[items], dtype=np.int64)
        return [self.decode(*v) for v in self.store.values(self.file, self.columns, where)]


class ColumnarCorpus:
    """The run's corpus, read from its `corpus/` folder (see the module's text)."""

    def __init__(self, run: RunDir, workdir: str | None = None) -> None:
        self.run = run
        # image files named relative to the folder the run was started from are found
        # from there (a finished run read from elsewhere, as its config's paths are)
        self.workdir = Path(workdir) if workdir else None
        self.folder = run.corpus_dir
        meta = read_meta(run)
        facts = meta["facts"]
        self.meta = meta
        self.num_records: int = facts["num_records"]
        self.num_anchors: int = facts["num_anchors"]
        self.skipped: dict[str, list[int]] = facts["skipped"]
        self.source_sha256: str = facts["source_sha256"]
        self.input_format: str = facts["input_format"]
        self.shard_ends: tuple[int, ...] = tuple(facts["shard_ends"])
        self.image_files: str = facts["image_files"]
        self.adds_id: bool = facts["adds_id"]
        self.seed: int = meta["seed"]
        self.batch_rows: int = meta["batch_rows"]
        arrays = {n: read_npy(self.folder / f"{n}.npy", mmap=True) for n in NUMERIC}
        self.positions, self.text_ids = arrays["positions"], arrays["text_ids"]
        self.groups, self.uniforms = arrays["groups"], arrays["uniforms"]
        self._files: dict[str, Any] = {}
        self._batch: tuple[str, int, Any] | None = None  # the last batch read
        self._shards: dict[tuple, Shard] = {}
        n = len(self.positions)
        self.records = Rows(self, "records", ("record",), json.loads, None, self.num_records)
        # ... as stored: each one's JSON text (json.dumps' own, ensure_ascii=False)
        self.record_texts = Rows(self, "records", ("record",), str, None, self.num_records)
        self.record_ids = Rows(self, "records", ("id",), json.loads, None, self.num_records)
        self.ids = Rows(self, "records", ("id",), json.loads, self.positions, n)
        self.images = Rows(self, "records", ("image", "ref"), self._image, self.positions, n)
        # the images' names as stored (equal names: one image), with no object built
        self.image_names = Rows(self, "records", ("image", "ref"), _image_name,
                                self.positions, n)
        self.phrases = Rows(self, "phrases", ("phrase",), str, None, facts["num_phrases"])

    def __len__(self) -> int:
        return len(self.positions)

    def _image(self, path: str | None, ref: str | None) -> Path | ImageRef:
        image = image_of(path, ref, self._shards)
        if self.workdir is not None and isinstance(image, Path):
            return self.workdir / image
        return image

    def _reader(self, file: str) -> Any:
        import pyarrow as pa

        if file not in self._files:
            path = self.folder / f"{file}.arrow"
            try:
                self._files[file] = pa.ipc.open_file(pa.memory_map(str(path)))
            except (OSError, pa.ArrowException) as exc:
                raise HnmError(f"{path}: damaged ({str(exc).splitlines()[0]}); {AGAIN}") \
                    from None
        return self._files[file]

    def batch(self, file: str, i: int) -> Any:
        """Record batch `i` of a file (the last one read is kept)."""
        if self._batch is None or self._batch[:2] != (file, i):
            self._batch = (file, i, self._reader(file).get_batch(i))
        return self._batch[2]

    def values(self, file: str, columns: tuple[str, ...], where: np.ndarray
               ) -> list[tuple[Any, ...]]:
        """The columns' values at the given rows of a file, in their order; each batch
        touched is read once."""

        if not len(where):
            return []
        order = np.argsort(where, kind="stable")
        ranked = where[order]
        which = ranked // self.batch_rows
        cuts = np.flatnonzero(np.diff(which)) + 1
        got: list[tuple[Any, ...]] = []
        for part in np.split(np.arange(len(ranked)), cuts):
            first = int(which[part[0]])
            b = self.batch(file, first)
            got += zip(*(_gather(b.column(c), ranked[part] - first * self.batch_rows)
                         for c in columns))
        if not np.array_equal(order, np.arange(len(order))):
            out: list[Any] = [None] * len(got)
            for k, i in enumerate(order.tolist()):
                out[i] = got[k]
            return out
        return got

    def anchor_uniforms(self, seed: int, rows: np.ndarray | range) -> np.ndarray:
        """SPEC §7's u_a of the given rows: the stored column (written for the run's
        seed; a range of rows: a view of its map), or hashed again for another seed."""
        if seed == self.seed:
            if isinstance(rows, range) and rows.step == 1:  # a view of the map: no copy
                return np.asarray(self.uniforms)[rows.start:rows.stop]
            return np.asarray(self.uniforms[rows], dtype=np.float64)
        from hnm.data import anchor_uniforms

        return anchor_uniforms(self.ids.take(np.asarray(rows)), seed)

    def column_types(self) -> tuple[list[tuple[str, Any]], Any]:
        """The records' output columns with their Arrow types (None: JSON text), the id
        column first where `adds_id`, and the mined ids' type (None: JSON text)."""
        ids = decode_schema(self.meta["ids_type"])[0][1]
        return decode_schema(self.meta["columns"]), ids

    @cached_property
    def row_order(self) -> np.ndarray:
        """Rows sorted by their ids' hashes (`row_of_ids`)."""
        return np.argsort(self.id_hashes, kind="stable")

    @cached_property
    def id_hashes(self) -> np.ndarray:
        hashes = np.empty(len(self), dtype=np.uint64)
        for start in range(0, len(self), BATCH_ROWS):
            part = self.ids.take(np.arange(start, min(len(self), start + BATCH_ROWS)))
            hashes[start:start + len(part)] = [id_hash(i) for i in part]
        return hashes

    def row_of_ids(self, ids: list[Any]) -> np.ndarray:
        """The mined row holding each id (ids are unique), found through a sorted column of
        the ids' hashes; an id no row holds raises KeyError."""
        order, hashes = self.row_order, self.id_hashes
        out = np.empty(len(ids), dtype=np.int64)
        for k, rid in enumerate(ids):
            h = id_hash(rid)
            lo = int(np.searchsorted(hashes, h, side="left", sorter=order))
            while lo < len(order) and hashes[order[lo]] == h:
                row = int(order[lo])
                if self.ids[row] == rid and type(self.ids[row]) is type(rid):
                    out[k] = row
                    break
                lo += 1
            else:
                raise KeyError(rid)
        return out

    def row_of_positions(self, positions: np.ndarray) -> np.ndarray:
        """The mined row of each record position (-1: not mined)."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = np.searchsorted(self.positions, positions)
        found = rows < len(self.positions)
        found[found] = self.positions[rows[found]] == positions[found]
        return np.where(found, rows, -1)


def id_hash(rid: Any) -> int:
    import hashlib

    text = json.dumps(rid, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def read_meta(run: RunDir) -> dict[str, Any]:
    """The store's meta.json, checked; damage is one line naming the file."""
    path = run.corpus_dir / "meta.json"
    data, why = parse_json(path, META)
    if why is None and (data["format"] != FORMAT or data["version"] != VERSION):
        why = f"format {data['format']!r} version {data['version']}, this hnm reads " \
              f"{FORMAT!r} version {VERSION}"
    if why == "missing":
        raise HnmError(f"{path}: missing; {AGAIN}")
    if why is not None:
        raise HnmError(f"{path}: damaged ({why}); {AGAIN}")
    return data


def problem(run: RunDir) -> str | None:
    """Why the run's store cannot be used (missing, damaged, of other sizes than its
    meta.json records), or None."""
    try:
        meta = read_meta(run)
    except HnmError as exc:
        return str(exc).split("; ")[0]
    for name in names()[1:]:
        path = run.corpus_dir / name
        size = meta["files"].get(name)
        try:
            st = path.lstat()
        except OSError:
            return f"{path}: missing"
        if size is None or st.st_size != size or not path.is_file():
            return f"{path}: damaged (size {st.st_size}, written {size})"
    return None


def open_corpus(run: RunDir, workdir: str | None = None) -> ColumnarCorpus:
    """The run's corpus store; a missing or damaged one is one line naming its file.
    `workdir`: where relative image paths start (a finished run's `Plan.workdir`)."""
    if (why := problem(run)) is not None:
        raise HnmError(f"{why}; {AGAIN}")
    return ColumnarCorpus(run, workdir)
