"""What a run writes for its users — every record with its negatives (JSONL or Parquet), and
the suspects — and reading the records back."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Container, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hnm.arrow_arrays import plain_type
from hnm.audit import Suspect, is_suspect
from hnm.callbacks import Progress, no_progress
from hnm.config import Config, has_joint_space
from hnm.outcome import RULES, Outcomes
from hnm.select import Pick
from hnm.storage import RunDir

PRECISION = 6  # decimals of the similarities written (the choices use the exact values)
PROGRESS_EVERY = 5000  # records written between progress reports (a report costs a refresh)
# Records per Parquet row group: a few MB of metadata and negatives, so that writing holds
# little, and readers can still skip through a large file by row group.
ROW_GROUP = 10_000
JSON_COLUMNS = "hnm.json_columns"  # schema metadata: the columns written as JSON text
NEGATIVE_ID = "negatives.id"  # named there when ids mix numbers and text
WRITE_BLOCK = 4096  # records read from the corpus store at a time
_to_json = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(v, ensure_ascii=False)


def similarity(value: float) -> float:
    """As written: rounded, and within [-1, 1] (a unit vector's grid snap can round its
    square norm just past 1)."""
    return min(1.0, max(-1.0, round(value, PRECISION)))


def negative_record(config: Config, pick: Pick, record: dict[str, Any], rid: Any
                    ) -> dict[str, Any]:
    """SPEC §8: what one negative carries (`record`, `rid`: its row's record and id)."""
    out = {"id": rid, "text": record[config.fields.text],
           "image": record[config.fields.image], "type": pick.kind,
           "text_similarity": similarity(pick.txt),
           "visual_similarity": similarity(pick.vis),
           "suspect": is_suspect(config, pick)}
    if pick.cross is not None:  # a joint space: the scores the cross rule and audit judge
        out["cross_score"] = similarity(pick.cross)
        out["own_score"] = similarity(pick.own)
    if pick.kind == "hard":
        out["threshold_step"] = pick.step
    else:
        out["anchor_cluster"] = pick.anchor_cluster
        out["negative_cluster"] = pick.negative_cluster
    return out


def take(values: Any, items: Any) -> list[Any]:
    """values[i] for each item: a corpus store's column reads them in one go."""
    if hasattr(values, "take"):
        return values.take(np.asarray(items, dtype=np.int64))
    return [values[int(i)] for i in items]


def rows_of_positions(ds: Any, positions: np.ndarray) -> np.ndarray:
    """The mined row of each record position (-1: not mined)."""
    rows = np.searchsorted(ds.positions, positions)
    found = rows < len(ds.positions)
    found[found] = np.asarray(ds.positions)[rows[found]] == positions[found]
    return np.where(found, rows, -1)


class Picked:
    """The records and ids of the mined rows a block of picks names, read at once."""

    def __init__(self, ds: Any, rows: Iterable[int],
                 read: tuple[int, list[dict[str, Any]]] = (0, [])) -> None:
        """`read`: records already read (the first one's position, and they), used as
        they are."""
        wanted = np.unique(np.fromiter(rows, dtype=np.int64))
        positions = np.asarray(ds.positions)[wanted]
        start, known = read
        inside = (positions >= start) & (positions < start + len(known))
        records: list[Any] = [None] * len(wanted)
        for k, p in zip(np.flatnonzero(inside).tolist(), positions[inside].tolist()):
            records[k] = known[p - start]
        outside = np.flatnonzero(~inside)
        for k, r in zip(outside.tolist(), take(ds.records, positions[outside])):
            records[k] = r
        self.by_row = dict(zip(wanted.tolist(), zip(records, take(ds.ids, wanted))))

    def negative(self, config: Config, pick: Pick) -> dict[str, Any]:
        return negative_record(config, pick, *self.by_row[pick.row])


def adds_id(ds: Any, id_field: str) -> bool:
    """Whether some record has no id field (its id is its key or position): every row
    then carries its id under that name, first, so that any row can be joined back. (A
    corpus store knows it from planning.)"""
    if hasattr(ds, "adds_id"):
        return bool(ds.adds_id)
    return bool(ds.record_ids) and any(id_field not in r for r in ds.records)


class RecordWriter:
    """OUTPUT_DIR/negatives.jsonl (or negatives.parquet with --output-format parquet) and
    suspects.jsonl, written as each shard's picks come: every input record, unchanged and
    in input order, plus its `negatives` and, for an anchor, its `outcome`; a record
    without an id field gets its id first (`adds_id`). Parquet rows are written ROW_GROUP
    records at a time."""

    def __init__(self, config: Config, run: RunDir, ds: Any,
                 progress: Progress = no_progress) -> None:
        self.config, self.run, self.ds, self.progress = config, run, ds, progress
        self.total = len(ds.records)
        self.add = adds_id(ds, config.fields.id)
        self.several = config.num_negatives > 1
        self.next = 0  # the next record position to write
        self.held = contextlib.ExitStack()
        self.chunk: list[dict[str, Any]] = []

    def __enter__(self) -> RecordWriter:
        c, run = self.config, self.run
        self.suspects = self.held.enter_context(run.open(run.suspects, "w"))
        if c.output_format == "parquet":
            import pyarrow.parquet as pq

            self.schema, self.as_json = parquet_schema(self.ds, self.several, c.fields.id,
                                                       has_joint_space(c))
            handle = self.held.enter_context(run.open(run.negatives_parquet))
            self.parquet = pq.ParquetWriter(handle, self.schema)
        else:
            self.handle = self.held.enter_context(run.open(run.negatives, "w"))
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        try:
            if kind is None:
                self._write(self.total, 0, [], [], [])
                if self.config.output_format == "parquet":
                    self.parquet.close()
                else:
                    self.progress("write", self.total, self.total)
        finally:
            self.held.__exit__(kind, *exc)

    def shard(self, anchors: np.ndarray, picks: list[list[Pick]], why: Outcomes,
              suspects: Iterable[Suspect] = ()) -> None:
        """One shard's anchors (contiguous rows, in order), their picks and outcomes:
        every record up to its last anchor is written."""
        self._suspects(list(suspects))
        if not len(anchors):
            return
        which, outcomes = why.distinct(self.several)
        if self.config.output_format != "parquet":
            # anchors share a few distinct outcomes: each is encoded once, and written as
            # json.dumps would write it, the key last
            outcomes = [', "outcome": ' + json.dumps(o, ensure_ascii=False) + "}\n"
                        for o in outcomes]
        end = int(self.ds.positions[int(anchors[-1])]) + 1
        self._write(end, int(anchors[0]), picks, which, outcomes)

    def _write(self, end: int, first: int, picks: list[list[Pick]], which: list[int],
               outcomes: list[Any]) -> None:
        id_field = self.config.fields.id
        # JSON lines of records that gain no field but `negatives` are the stored text
        # with the negatives spliced in (what json.dumps writes for the record with them)
        splice = self.config.output_format != "parquet" and not self.add and \
            hasattr(self.ds, "record_texts")
        for s in range(self.next, end, WRITE_BLOCK):
            positions = np.arange(s, min(end, s + WRITE_BLOCK))
            if splice:
                self._spliced(s, positions, first, picks, which, outcomes)
                continue
            records = take(self.ds.records, positions)
            ids = take(self.ds.record_ids, positions) if self.add else None
            rows = rows_of_positions(self.ds, positions) - first
            mine = (rows >= 0) & (rows < len(picks))
            lookup = Picked(self.ds, (p.row for a in rows[mine] for p in picks[a]),
                            (s, records))
            for k, record in enumerate(records):
                if ids is not None and id_field not in record:
                    record = {id_field: ids[k], **record}
                a = int(rows[k])
                if mine[k]:
                    negs = [lookup.negative(self.config, p) for p in picks[a]]
                    self._line({**record, "negatives": negs}, s + k, outcomes[which[a]])
                else:  # not an anchor (past --max-samples): no scan, no outcome
                    self._line({**record, "negatives": []}, s + k, None)
        self.next = max(self.next, end)

    def _spliced(self, s: int, positions: np.ndarray, first: int, picks: list[list[Pick]],
                 which: list[int], outcomes: list[Any]) -> None:
        """JSON lines of records at `positions`, from their stored text: a record's
        members, then its negatives and outcome (a record holding a `negatives` member of
        its own is read and written whole, as `_write` does)."""
        texts = take(self.ds.record_texts, positions)
        rows = rows_of_positions(self.ds, positions) - first
        mine = (rows >= 0) & (rows < len(picks))
        lookup = Picked(self.ds, (p.row for a in rows[mine] for p in picks[a]))
        write, dumps = self.handle.write, _to_json
        for k, text in enumerate(texts):
            a = int(rows[k])
            negs = [lookup.negative(self.config, p) for p in picks[a]] if mine[k] else []
            outcome = outcomes[which[a]] if mine[k] else None
            if '"negatives"' in text:
                self._line({**json.loads(text), "negatives": negs}, s + k, outcome)
                continue
            body = text[:-1] + (', "negatives": ' if len(text) > 2 else '"negatives": ') + \
                dumps(negs)
            write(body + outcome if outcome is not None else body + "}\n")
            if (s + k) % PROGRESS_EVERY == 0:
                self.progress("write", s + k, self.total)

    def _line(self, record: dict[str, Any], pos: int, outcome: Any) -> None:
        if self.config.output_format == "parquet":
            if outcome is not None:
                record["outcome"] = outcome
            self.chunk.append(_parquet_row(record, self.as_json))
            if len(self.chunk) == ROW_GROUP or pos + 1 == self.total:
                import pyarrow as pa

                self.parquet.write_table(pa.Table.from_pylist(self.chunk, schema=self.schema))
                self.chunk = []
                self.progress("write", pos + 1, self.total)
            return
        line = json.dumps(record, ensure_ascii=False)
        self.handle.write(line[:-1] + outcome if outcome is not None else line + "\n")
        if pos % PROGRESS_EVERY == 0:
            self.progress("write", pos, self.total)

    def _suspects(self, suspects: list[Suspect]) -> None:
        """Every suspect, dropped or not, with its anchor."""
        if not suspects:
            return
        f = self.config.fields
        lookup = Picked(self.ds, [r for s in suspects for r in (s.anchor, s.pick.row)])
        for s in suspects:
            record, rid = lookup.by_row[s.anchor]
            line = {"anchor_id": rid, "anchor_text": record[f.text],
                    "anchor_image": record[f.image], "reasons": list(s.reasons),
                    "dropped": s.dropped, "negative": lookup.negative(self.config, s.pick)}
            self.suspects.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_negatives(config: Config, run: RunDir, ds: Any, picks: list[list[Pick]],
                    why: Outcomes, progress: Progress = no_progress,
                    suspects: Iterable[Suspect] = ()) -> None:
    """The outputs of one pass over anchors 0 .. len(picks) - 1 (`RecordWriter`)."""
    with RecordWriter(config, run, ds, progress) as out:
        out.shard(np.arange(len(picks)), picks, why, suspects)


def parquet_schema(ds: Any, several: bool = False, id_field: str = "id",
                   cross: bool = False
                   ) -> tuple[Any, set[str]]:
    """The records' columns, each with the Arrow type of all its values (a column whose
    values have none, e.g. numbers in some records and text in others, is JSON text), then
    `negatives` and `outcome` (with `missing` when several negatives are asked for). The
    JSON columns are named in the schema's metadata. Records without an id field get the
    id column first (`adds_id`). `cross`: a run with a joint space, whose negatives carry
    their cross and own scores and whose scans the cross rule skips rows of. A corpus
    store knows the types from planning; an in-memory corpus is read whole."""
    import pyarrow as pa

    from hnm.corpus_write import ColumnTypes

    if hasattr(ds, "column_types"):
        columns, ids_type = ds.column_types()
    else:
        types = ColumnTypes()
        types.add(ds.records, list(ds.record_ids), list(ds.ids))
        columns, ids_type = types.columns(adds_id(ds, id_field), id_field), \
            types.merged("\0ids")
    fields, as_json = [], set()
    for name, kind in columns:
        if kind is None:
            as_json.add(name)
        fields.append(pa.field(name, kind or pa.string()))
    if ids_type is None:
        as_json.add(NEGATIVE_ID)
    negative = pa.struct([("id", ids_type or pa.string()), ("text", pa.string()),
                          ("image", pa.string()), ("type", pa.string()),
                          ("text_similarity", pa.float64()),
                          ("visual_similarity", pa.float64()), ("suspect", pa.bool_()),
                          *([("cross_score", pa.float64()), ("own_score", pa.float64())]
                            if cross else []),
                          ("threshold_step", pa.string()), ("anchor_cluster", pa.int64()),
                          ("negative_cluster", pa.int64())])
    rules = [r for r in RULES if cross or r != "cross_score"]
    fields.append(pa.field("negatives", pa.list_(negative)))
    outcome = [("reason", pa.string())] + ([("missing", pa.int64())] if several else []) \
        + [("skipped", pa.struct([(rule, pa.int64()) for rule in rules]))]
    fields.append(pa.field("outcome", pa.struct(outcome)))
    meta = {JSON_COLUMNS: json.dumps(sorted(as_json))}
    return pa.schema(fields, metadata=meta), as_json


def _arrow_type(values: list[Any]) -> Any:
    """The one Arrow type of the values that Parquet can write, or None (JSON text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # converting checks every value (inferring a type looks at the first ones only)
        kind = plain_type(values) or pa.array(values).type
        # some types have no Parquet form (a struct without fields: `{}`): the writer says
        pq.ParquetWriter(io.BytesIO(), pa.schema([("value", kind)])).close()
    except (pa.ArrowException, TypeError, OverflowError):
        return None
    return kind


def _parquet_row(record: dict[str, Any], as_json: set[str]) -> dict[str, Any]:
    row = {k: json.dumps(v, ensure_ascii=False) if k in as_json and v is not None else v
           for k, v in record.items()}
    row["negatives"] = [_negative_row(n, as_json) for n in record["negatives"]]
    return row


def _negative_row(n: dict[str, Any], as_json: set[str]) -> dict[str, Any]:
    out = dict(n)
    if "threshold_step" in n:
        # a hard negative's step is 0, 1, 2 or "fallback": text, so that one type holds all
        out["threshold_step"] = str(n["threshold_step"])
    if NEGATIVE_ID in as_json:
        out["id"] = json.dumps(n["id"], ensure_ascii=False)
    return out


def read_records(run: RunDir, positions: Container[int] | None = None
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, record with its negatives) from whichever output the run wrote, in input
    order; only the wanted positions (all when None) are parsed."""
    if run.negatives_parquet.exists() and not run.negatives.exists():
        yield from _read_parquet(run.negatives_parquet, positions)
        return
    with open(run.negatives, "rb") as handle:  # lines end at "\n" only, as written
        for pos, line in enumerate(handle):
            if positions is None or pos in positions:
                yield pos, json.loads(line)


def _read_parquet(path: Path, positions: Container[int] | None
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(path)
    meta = handle.schema_arrow.metadata or {}
    as_json = set(json.loads(meta.get(JSON_COLUMNS.encode(), b"[]")))
    pos = 0
    for batch in handle.iter_batches():
        for row in batch.to_pylist():
            if positions is None or pos in positions:
                yield pos, _from_parquet(row, as_json)
            pos += 1


def _from_parquet(row: dict[str, Any], as_json: set[str]) -> dict[str, Any]:
    """A row as negatives.jsonl holds it: JSON columns parsed, each negative with its own
    keys only (a hard one's step, a diverse one's clusters)."""
    out = {k: json.loads(v) if k in as_json and v is not None else v for k, v in row.items()}
    out["negatives"] = [_negative_from_parquet(n, as_json) for n in row["negatives"]]
    outcome = out.pop("outcome")
    if outcome is not None:  # an anchor's: the rules that skipped nothing are left out
        skipped = outcome["skipped"]
        outcome["skipped"] = None if skipped is None else \
            {k: v for k, v in skipped.items() if v is not None}
        out["outcome"] = outcome
    return out


def _negative_from_parquet(n: dict[str, Any], as_json: set[str]) -> dict[str, Any]:
    drop = ("anchor_cluster", "negative_cluster") if n["type"] == "hard" else ("threshold_step",)
    out = {k: v for k, v in n.items() if k not in drop}
    step = out.get("threshold_step")
    if isinstance(step, str) and step.isdigit():
        out["threshold_step"] = int(step)
    if NEGATIVE_ID in as_json:
        out["id"] = json.loads(out["id"])
    return out
