"""What a run writes for its users — every record with its negatives (JSONL or Parquet), and
the suspects — and reading the records back."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hnm.audit import Suspect, is_suspect
from hnm.callbacks import Progress, no_progress
from hnm.config import Config, has_joint_space
from hnm.data import Corpus
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


def similarity(value: float) -> float:
    """As written: rounded, and within [-1, 1] (a unit vector's grid snap can round its
    square norm just past 1)."""
    return min(1.0, max(-1.0, round(value, PRECISION)))


def negative_record(config: Config, ds: Corpus, pick: Pick) -> dict[str, Any]:
    """SPEC §8: what one negative carries."""
    record = ds.records[ds.positions[pick.row]]
    out = {"id": ds.ids[pick.row], "text": record[config.fields.text],
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


def output_records(config: Config, ds: Corpus, picks: list[list[Pick]], why: Outcomes
                   ) -> Iterator[dict[str, Any]]:
    """Every input record, unchanged and in input order, plus its `negatives` (picks[a]:
    anchor row a's) and, for an anchor, its `outcome` (why: every anchor's, by row)."""
    which, outcomes = why.distinct(config.num_negatives > 1)
    for record, k in _with_outcomes(config, ds, picks, which):
        if k >= 0:
            record["outcome"] = outcomes[k]
        yield record


def adds_id(ds: Corpus, id_field: str) -> bool:
    """Whether some record has no id field (its id is its key or position): every row
    then carries its id under that name, first, so that any row can be joined back."""
    return bool(ds.record_ids) and any(id_field not in r for r in ds.records)


def _with_outcomes(config: Config, ds: Corpus, picks: list[list[Pick]], which: list[int]
                   ) -> Iterator[tuple[dict[str, Any], int]]:
    """(record with its negatives, which[a] for anchor a's record or -1), in input order;
    a record without an id field gets its id first (`adds_id`)."""
    by_position = {int(ds.positions[a]): a for a in range(len(picks))}
    id_field = config.fields.id
    add = adds_id(ds, id_field)
    for pos, record in enumerate(ds.records):
        if add and id_field not in record:
            record = {id_field: ds.record_ids[pos], **record}
        a = by_position.get(pos)
        if a is None:  # not an anchor (past --max-samples): no scan, no outcome
            yield {**record, "negatives": []}, -1
        else:
            negs = [negative_record(config, ds, p) for p in picks[a]]
            yield {**record, "negatives": negs}, which[a]


def write_negatives(config: Config, run: RunDir, ds: Corpus, picks: list[list[Pick]],
                    why: Outcomes, progress: Progress = no_progress) -> None:
    """OUTPUT_DIR/negatives.jsonl, or negatives.parquet with --output-format parquet."""
    if config.output_format == "parquet":
        write_parquet(run, run.negatives_parquet, ds, output_records(config, ds, picks, why),
                      progress, config.num_negatives > 1, config.fields.id,
                      has_joint_space(config))
        return
    which, outcomes = why.distinct(config.num_negatives > 1)
    # anchors share a few distinct outcomes: each is encoded once, and written as
    # json.dumps would write it, the key last
    texts = [', "outcome": ' + json.dumps(o, ensure_ascii=False) + "}\n" for o in outcomes]
    with run.open(run.negatives, "w") as handle:
        for pos, (record, k) in enumerate(_with_outcomes(config, ds, picks, which)):
            line = json.dumps(record, ensure_ascii=False)
            handle.write(line[:-1] + texts[k] if k >= 0 else line + "\n")
            if pos % PROGRESS_EVERY == 0:
                progress("write", pos, len(ds.records))
    progress("write", len(ds.records), len(ds.records))


def write_parquet(run: RunDir, path: Path, ds: Corpus, records: Iterable[dict[str, Any]],
                  progress: Progress = no_progress, several: bool = False,
                  id_field: str = "id", cross: bool = False) -> None:
    """One row per record, its negatives a list of structs, its outcome a struct; written
    ROW_GROUP rows at a time, so that only one row group is ever held as a table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, as_json = parquet_schema(ds, several, id_field, cross)
    with run.open(path) as handle:
        writer = pq.ParquetWriter(handle, schema)
        chunk: list[dict[str, Any]] = []
        for pos, record in enumerate(records, start=1):
            chunk.append(_parquet_row(record, as_json))
            if len(chunk) == ROW_GROUP or pos == len(ds.records):
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                chunk = []
                progress("write", pos, len(ds.records))
        writer.close()


def parquet_schema(ds: Corpus, several: bool = False, id_field: str = "id",
                   cross: bool = False
                   ) -> tuple[Any, set[str]]:
    """The records' columns, each with the Arrow type of all its values (a column whose
    values have none, e.g. numbers in some records and text in others, is JSON text), then
    `negatives` and `outcome` (with `missing` when several negatives are asked for). The
    JSON columns are named in the schema's metadata. Records without an id field get the
    id column first (`adds_id`). `cross`: a run with a joint space, whose negatives carry
    their cross and own scores and whose scans the cross rule skips rows of."""
    import pyarrow as pa

    fields, as_json = [], set()
    add = adds_id(ds, id_field)
    names = dict.fromkeys(([id_field] if add else []) + [k for r in ds.records for k in r])
    for name in names:
        if name in ("negatives", "outcome"):
            continue  # replaced by the run's, as in negatives.jsonl
        values = list(ds.record_ids) if add and name == id_field else \
            [r.get(name) for r in ds.records]
        kind = _arrow_type(values)
        if kind is None:
            as_json.add(name)
        fields.append(pa.field(name, kind or pa.string()))
    if _arrow_type(ds.ids) is None:
        as_json.add(NEGATIVE_ID)
    negative = pa.struct([("id", _arrow_type(ds.ids) or pa.string()), ("text", pa.string()),
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
        kind = pa.array(values).type
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


def read_records(run: RunDir, positions: set[int] | None = None
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


def _read_parquet(path: Path, positions: set[int] | None
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


def write_suspects(config: Config, run: RunDir, ds: Corpus, suspects: Iterable[Suspect]
                   ) -> None:
    """OUTPUT_DIR/suspects.jsonl: every suspect, dropped or not, with its anchor."""
    f = config.fields
    with run.open(run.suspects, "w") as handle:
        for s in suspects:
            record = ds.records[ds.positions[s.anchor]]
            line = {"anchor_id": ds.ids[s.anchor], "anchor_text": record[f.text],
                    "anchor_image": record[f.image], "reasons": list(s.reasons),
                    "dropped": s.dropped, "negative": negative_record(config, ds, s.pick)}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
