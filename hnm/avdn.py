"""`hnm export --format avdn`: a copy of the run's AVDN processed dataset (hnm.readers.avdn
reads it) in its own layout, each anchor's negative added as the original
`add_hard_negatives.py` adds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hnm import pickles
from hnm.decoding import first_line
from hnm.errors import HnmError
from hnm.outputs import read_records
from hnm.readers.avdn import load_items
from hnm.storage import RunDir, read_json

METHODS = {"hard": "hard_negative_knn", "diverse": "diverse_negative_clustering"}


def export(run: Any, ds: Any, shards: list[Any], area: Any, encode: Any) -> Path:
    """Write the run's input chunks into the export's folder (`area`, checked by
    hnm.export) under their own names, each anchor that got a negative with
    `contrastive_data.negative_text_2`, `validation_metadata_negative_2` and (with a
    tokenizer, `encode`) `tokenized_negative_2` added; nothing else changes. Each chunk is
    written atomically (a temporary file renamed into place)."""
    added = dict(_additions(run, ds, encode))
    for shard, start, end in zip(shards, (0, *ds.shard_ends), ds.shard_ends):
        items = load_items(shard.path)
        for pos, (index, item) in zip(range(start, end), items.items()):
            if pos in added:
                _add(item, added[pos], shard.path, index)
        with area.open(area.root / shard.name) as handle:
            pickles.dump(items, handle)
    return area.root


def tokenizer(path: str | None, max_length: int | None) -> Any:
    """`text -> BatchEncoding` as the training code tokenizes answers, or None."""
    if path is None:
        if max_length is not None:
            raise HnmError("--max-answer-length: only with --tokenizer")
        return None
    if max_length is None or max_length < 1:
        raise HnmError("--tokenizer: needs --max-answer-length N (at least 1), the answer "
                       "length limit of the training code")
    if not Path(path).is_dir():
        raise HnmError(f"--tokenizer {path}: not a folder (a local Hugging Face tokenizer)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise HnmError(f"--tokenizer {path}: not a readable tokenizer folder "
                       f"({first_line(str(exc))[:120]})") from None
    return lambda text: tok(text, max_length=max_length, padding="max_length",
                            truncation=True, return_tensors="pt")


def _additions(run: Any, ds: Any, encode: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(record position, the fields to add) of every anchor with a negative: its first."""
    stamp = mining_timestamp(RunDir(run.dir), run.config.output_format)
    position = {rid: int(ds.positions[row]) for row, rid in enumerate(ds.ids)}
    for pos, record in read_records(RunDir(run.dir)):
        if not record["negatives"]:
            continue
        n = record["negatives"][0]
        negative = ds.records[position[n["id"]]]
        meta = {"negative_type_2": n["type"], "map_name_2": negative.get("map_name"),
                "mining_timestamp": stamp, "mining_method": METHODS[n["type"]]}
        if n["type"] == "hard":
            meta["text_similarity"] = n["text_similarity"]
        else:
            meta["anchor_cluster"] = n["anchor_cluster"]
            meta["negative_cluster"] = n["negative_cluster"]
        meta["visual_similarity"] = n["visual_similarity"]
        fields = {"negative_text_2": n["text"]}
        if encode is not None:
            fields["tokenized_negative_2"] = encode(n["text"])
        fields["validation_metadata_negative_2"] = meta
        yield pos, fields


def mining_timestamp(run: Any, output_format: str) -> str:
    """When the run wrote its records, as done.json recorded it (ISO 8601, UTC): the same
    for every export of the run."""
    name = run.records(output_format).name
    mtime_ns = read_json(run.done)["files"][name][2]
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).isoformat(timespec="seconds")


def _add(item: dict[str, Any], fields: dict[str, Any], path: Path, index: Any) -> None:
    data = item.setdefault("contrastive_data", {})
    if not isinstance(data, dict):
        raise HnmError(f"{path}: item {index}: 'contrastive_data' is a "
                       f"{type(data).__name__}, not a dict")
    data.update(fields)
