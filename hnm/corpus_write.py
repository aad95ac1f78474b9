"""Writing the columnar corpus (`hnm.corpus`) while planning: blocks of validated records
(`hnm.blocks.Block`) in input order, then the facts of the whole pass (`Facts`).

The store is built in a staging folder (`corpus.new/`) and moved in as `corpus/` in one
rename once every file and `meta.json` are written: a store is there whole or not at all.
The output columns' Arrow types are gathered block by block (`ColumnTypes`), so that no
later phase needs every record to know them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np

from hnm.arrow_arrays import plain_type, string_array
from hnm.blocks import Block, Facts
from hnm.config import Config
from hnm.corpus import (
    ARROW,
    BATCH_ROWS,
    FORMAT,
    NUMERIC,
    VERSION,
    encode_schema,
    names,
    ref_text,
)
from hnm.data import Corpus, anchor_uniforms
from hnm.safety import scratch_file
from hnm.storage import RunDir

# json.dumps(value, ensure_ascii=False), its encoder made once (json.dumps makes one a call
# where any option is given)
_to_json = json.JSONEncoder(ensure_ascii=False).encode

HEADER = 128  # bytes of a .npy header written once the length is known
DTYPES = {"positions": "<i8", "text_ids": "<i8", "groups": "<i8", "uniforms": "<f8"}
FAILED = object()  # a block whose values have no one Arrow type
SKIP = ("negatives", "outcome")  # replaced by the run's in the outputs


def _block_type(values: list[Any]) -> Any:
    import pyarrow as pa

    kind = plain_type(values)
    if kind is not None:
        return kind
    try:
        return pa.array(values).type
    except (pa.ArrowException, TypeError, OverflowError, ValueError):
        return FAILED


class ColumnTypes:
    """The Arrow type of each output column over every record, as `pa.array` over all of
    its values would give it, gathered a block at a time: the blocks' types are the same,
    or unified as pyarrow unifies them (numbers widened, struct fields gathered); values
    of no one type, or of a type Parquet cannot write, make the column JSON text."""

    def __init__(self) -> None:
        self.order: dict[str, None] = {}
        self.seen: dict[str, dict[Any, Any]] = {}  # column -> block type -> a value of it

    def add(self, records: list[dict[str, Any]], record_ids: list[Any], ids: list[Any]) -> None:
        for r in records:
            self.order.update(dict.fromkeys(r))
        for name in self.order:
            if name not in SKIP:
                self._note(name, [r.get(name) for r in records])
        self._note("\0record_ids", record_ids)
        self._note("\0ids", ids)

    def _note(self, key: str, values: list[Any]) -> None:
        seen = self.seen.setdefault(key, {})
        if FAILED in seen or all(v is None for v in values):
            return
        kind = _block_type(values)
        if kind is FAILED:
            seen[FAILED] = None
        elif str(kind) != "null":
            seen.setdefault(kind, next(v for v in values if v is not None))

    def merged(self, key: str) -> Any:
        """The column's type, or None (JSON text)."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        seen = self.seen.get(key, {})
        if FAILED in seen:
            return None
        kinds = list(seen)
        if not kinds:
            kind = pa.null()
        elif len(kinds) == 1:
            kind = kinds[0]
        else:
            try:
                kind = pa.unify_schemas([pa.schema([("v", k)]) for k in kinds],
                                        promote_options="permissive").field("v").type
            except (pa.ArrowException, TypeError, ValueError):
                kind = _block_type(list(seen.values()))  # e.g. true and 1.5: double
                if kind is FAILED:
                    return None
        try:  # some types have no Parquet form (a struct without fields: `{}`)
            pq.ParquetWriter(io.BytesIO(), pa.schema([("value", kind)])).close()
        except (pa.ArrowException, TypeError, OverflowError):
            return None
        return kind

    def columns(self, adds_id: bool, id_field: str) -> list[tuple[str, Any]]:
        """Every output column of the records (the run's `negatives` and `outcome` aside)
        with its type; the id column first where the outputs add it."""
        out = []
        for name in dict.fromkeys(([id_field] if adds_id else []) + list(self.order)):
            if name not in SKIP:
                key = "\0record_ids" if adds_id and name == id_field else name
                out.append((name, self.merged(key)))
        return out


def _npy_header(dtype: str, n: int) -> bytes:
    """A .npy (version 1.0) header of exactly HEADER bytes."""
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': ({n},), }}"
    body = text.ljust(HEADER - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class CorpusWriter:
    """The store, written block by block into the run's staging folder (`finish` moves
    it in), or, with no run yet, into unnamed scratch files (`safety.scratch_file`) that
    `finish_into` copies into a run's staging folder and moves in: the first planning
    pass stages the store before the run directory is locked, so the input is read once."""

    RECORDS = (("record", "string"), ("id", "string"), ("image", "string"), ("ref", "string"))

    def __init__(self, run: RunDir | None, config: Config) -> None:
        import pyarrow as pa

        self.run, self.config = run, config
        if run is not None:
            run.discard_corpus(run.corpus_stage)  # what an interrupted write left
        self.held = ExitStack()
        self.files: dict[str, Any] = {}  # file name -> its handle
        self.types = ColumnTypes()
        self.sink: dict[str, Any] = {}
        self.arrow: dict[str, Any] = {}
        self.pending: dict[str, list[list[Any]]] = {}
        self.schemas = {"records": pa.schema([(n, pa.string()) for n, _ in self.RECORDS]),
                        "phrases": pa.schema([("phrase", pa.string())])}
        for name in ARROW:
            self.arrow[name] = pa.ipc.new_file(self._file(f"{name}.arrow"), self.schemas[name])
            self.pending[name] = [[] for _ in self.schemas[name]]
        for name in NUMERIC:
            handle = self.sink[name] = self._file(f"{name}.npy")
            handle.write(b"\0" * HEADER)
        self.rows = 0
        self.records = 0

    def _file(self, name: str) -> Any:
        handle = self.held.enter_context(
            scratch_file() if self.run is None else self.run.open(self.run.corpus_stage / name))
        self.files[name] = handle
        return handle

    def add(self, block: Block) -> None:
        mined = np.flatnonzero(np.asarray(block.keep, dtype=bool))
        ids = [block.ids[i] for i in mined]
        self.types.add(block.records, block.ids, ids)
        images = [ref_text(im) if im is not None else (None, None) for im in block.images]
        self._append("records", [
            [_to_json(r) for r in block.records], [_to_json(i) for i in block.ids],
            [p for p, _ in images], [r for _, r in images]])
        self._append("phrases", [list(block.new_phrases)])
        arrays = {"positions": block.start + mined, "text_ids": block.text_ids,
                  "groups": block.groups, "uniforms": anchor_uniforms(ids, self.config.seed)}
        for name, values in arrays.items():
            self.sink[name].write(np.ascontiguousarray(values, DTYPES[name]).tobytes())
        self.rows += len(mined)
        self.records += len(block.records)

    def _append(self, name: str, columns: list[list[Any]], final: bool = False) -> None:
        """Buffer the rows, writing every full batch of BATCH_ROWS (all of them if
        `final`): batch i holds rows [i * BATCH_ROWS, (i + 1) * BATCH_ROWS)."""
        import pyarrow as pa

        pending = self.pending[name]
        for held, more in zip(pending, columns):
            held.extend(more)
        while len(pending[0]) >= BATCH_ROWS or (final and pending[0]):
            cut = [p[:BATCH_ROWS] for p in pending]
            self.arrow[name].write_batch(pa.record_batch(
                [string_array(c) for c in cut], schema=self.schemas[name]))
            for p in pending:
                del p[:BATCH_ROWS]

    def _close(self) -> None:
        """Every file complete: the last batches, the arrays' headers."""
        for name in ARROW:
            self._append(name, [[] for _ in self.schemas[name]], final=True)
            self.arrow[name].close()
        for name in NUMERIC:
            self.sink[name].seek(0)
            self.sink[name].write(_npy_header(DTYPES[name], self.rows))

    def finish(self, facts: Facts) -> None:
        """Close every file, write meta.json, move the store in."""
        assert self.run is not None
        self._close()
        self.held.close()
        self._move_in(self.run, facts)

    def finish_into(self, run: RunDir, facts: Facts) -> None:
        """The staged store copied into the run's staging folder, meta.json written, the
        store moved in; the scratch files let go."""
        import shutil

        self._close()
        run.discard_corpus(run.corpus_stage)
        try:
            for name, staged in self.files.items():
                staged.flush()
                staged.seek(0)
                with run.open(run.corpus_stage / name) as handle:
                    shutil.copyfileobj(staged, handle, 1 << 20)
            self._move_in(run, facts)
        except BaseException:
            run.discard_corpus(run.corpus_stage)
            raise
        finally:
            self.held.close()

    def _move_in(self, run: RunDir, facts: Facts) -> None:
        stage = run.corpus_stage
        sizes = {n: (stage / n).stat().st_size for n in names()[1:]}
        meta = {"format": FORMAT, "version": VERSION, "seed": self.config.seed,
                "batch_rows": BATCH_ROWS, "id_field": self.config.fields.id, "files": sizes,
                "facts": {**facts.__dict__, "shard_ends": list(facts.shard_ends),
                          "skipped": {k: list(v) for k, v in facts.skipped.items()}},
                "columns": encode_schema(self.types.columns(facts.adds_id,
                                                            self.config.fields.id)),
                "ids_type": encode_schema([("id", self.types.merged("\0ids"))])}
        run.write_json(stage / "meta.json", meta)
        run.move_corpus_in()

    def abort(self) -> None:
        self.held.close()
        if self.run is not None:
            self.run.discard_corpus(self.run.corpus_stage)


def write_corpus(run: RunDir, config: Config, blocks: Iterable[Block],
                 facts: Callable[[], Facts]) -> None:
    """The run's store from the planning pass's blocks, then its facts (asked for once
    every block was written)."""
    writer = CorpusWriter(run, config)
    try:
        for block in blocks:
            writer.add(block)
        writer.finish(facts())
    except BaseException:
        writer.abort()
        raise


def blocks_of(ds: Corpus, size: int = BATCH_ROWS) -> Iterator[Block]:
    """An in-memory corpus as the blocks a planning pass hands on (a skipped record's
    image is not kept by `data.Corpus`: it is stored as none)."""
    rows = np.searchsorted(ds.positions, np.arange(0, len(ds.records) + size, size))
    known = 0
    for b, start in enumerate(range(0, len(ds.records), size)):
        end = min(len(ds.records), start + size)
        r0, r1 = int(rows[b]), int(rows[b + 1])
        keep = np.zeros(end - start, dtype=bool)
        keep[ds.positions[r0:r1] - start] = True
        images: list[Any] = [None] * (end - start)
        for row in range(r0, r1):
            images[int(ds.positions[row]) - start] = ds.images[row]
        text_ids = ds.text_ids[r0:r1]
        top = int(text_ids.max()) + 1 if len(text_ids) else known
        yield Block(start, ds.records[start:end], list(ds.record_ids[start:end]), images,
                    keep, text_ids, ds.groups[r0:r1], list(ds.phrases[known:max(top, known)]))
        known = max(top, known)


def facts_of(ds: Corpus, id_field: str) -> Facts:
    """The facts of an in-memory corpus."""
    return Facts(num_records=len(ds.records), num_rows=len(ds), num_phrases=len(ds.phrases),
                 num_anchors=ds.num_anchors, skipped=ds.skipped,
                 source_sha256=ds.source_sha256, input_format=ds.input_format,
                 shard_ends=ds.shard_ends, image_files=ds.image_files,
                 adds_id=bool(ds.record_ids) and any(id_field not in r for r in ds.records))


def store_corpus(run: RunDir, config: Config, ds: Corpus) -> None:
    """Write the store of an in-memory corpus."""
    write_corpus(run, config, blocks_of(ds), lambda: facts_of(ds, config.fields.id))
