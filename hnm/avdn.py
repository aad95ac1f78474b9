"""`hnm export --format avdn`: a copy of the run's AVDN processed dataset (hnm.readers.avdn
reads it) in its own layout, each anchor's negative added as the original
`add_hard_negatives.py` adds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hnm import pickles
from hnm.decoding import first_line
from hnm.errors import HnmError
from hnm.outputs import read_records
from hnm.readers.avdn import load_items
from hnm.storage import RunDir, read_json

METHODS = {"hard": "hard_negative_knn", "diverse": "diverse_negative_clustering"}
MISSING = ("skip", "lm-negative")  # --missing-negative
LM_NEGATIVE = "lm_negative"  # negative_type_2 of an item given its own LM negative again
LM_METHOD = "lm_negative_repeated"
# what the training code (AnsweringDataset, its default collate) does with the export
UNUSED = ("the training code uses a mined negative only through tokenized_negative_2: "
          "without --tokenizer it uses none of them")
MIXED = ("the training code's default collate fails with KeyError: 'negative_input_2' on a "
         "batch mixing items with and without tokenized_negative_2: pass --missing-negative "
         "lm-negative to give every item one, or leave those items out of training")


def export(run: Any, ds: Any, shards: list[Any], area: Any, encode: Any,
           missing: str = "skip") -> tuple[Path, list[str]]:
    """Write the run's input chunks into the export's folder (`area`, checked by
    hnm.export) under their own names, each anchor that got a negative with
    `contrastive_data.negative_text_2`, `validation_metadata_negative_2` and (with a
    tokenizer, `encode`) `tokenized_negative_2` added; nothing else changes. `missing`
    lm-negative: an item without one gets its own language-model negative (`negative_text`)
    in those fields, its metadata saying so. Each chunk is written atomically (a temporary
    file renamed into place). Returns the folder and the summary's lines."""
    stamp = mining_timestamp(RunDir(run.dir), run.config.output_format)
    added = dict(_additions(run, ds, encode, stamp))
    counts = {"mined": 0, "lm": 0, "none": 0}
    for shard, start, end in zip(shards, (0, *ds.shard_ends), ds.shard_ends):
        items = load_items(shard.path)
        for pos, (index, item) in zip(range(start, end), items.items()):
            fields = added.get(pos)
            if fields is None and missing == "lm-negative":
                fields = _lm_negative(item, encode, stamp)
            if fields is None:
                counts["none"] += 1
                continue
            counts["mined" if pos in added else "lm"] += 1
            _add(item, fields, shard.path, index)
        with area.open(area.root / shard.name) as handle:
            pickles.dump(items, handle)
    return area.root, summary(counts, encode is not None, missing)


def summary(counts: dict[str, int], tokenized: bool, missing: str) -> list[str]:
    """What the export gave the items, and what the training code will do with it."""
    field = "tokenized_negative_2" if tokenized else "negative_text_2 (no tokenized_negative_2)"
    total = sum(counts.values())
    lines = [f"{counts['mined']} of {total} item(s) got a mined negative ({field}), "
             f"{counts['lm']} their language-model negative again (--missing-negative "
             f"lm-negative), {counts['none']} none (--missing-negative {missing})"]
    if not tokenized:
        lines.append(f"note: {UNUSED}")
    elif counts["none"]:
        lines.append(f"note: {MIXED}")
    return lines


def tokenizer(path: str | None, max_length: int | None) -> Any:
    """`text -> {input_ids, attention_mask, ...}` as the training code tokenizes answers
    (a dict of tensors only, what the original's slow tokenizer pickles: no
    `tokenizers.Encoding` objects), or None."""
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
    return lambda text: dict(tok(text, max_length=max_length, padding="max_length",
                                 truncation=True, return_tensors="pt"))


def _additions(run: Any, ds: Any, encode: Any, stamp: str
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(record position, the fields to add) of every anchor with a negative: its first."""
    for pos, record in read_records(RunDir(run.dir)):
        if not record["negatives"]:
            continue
        n = record["negatives"][0]
        negative = ds.records[int(ds.positions[int(ds.row_of_ids([n["id"]])[0])])]
        meta = {"negative_type_2": n["type"],
                "map_name_2": negative.get("map_name", "unknown"),
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


def _lm_negative(item: Any, encode: Any, stamp: str) -> dict[str, Any] | None:
    """The fields of an item given its own language-model negative again, or None where it
    has none."""
    data = item.get("contrastive_data") if isinstance(item, dict) else None
    text = data.get("negative_text") if isinstance(data, dict) else None
    if not isinstance(text, str):
        return None
    fields: dict[str, Any] = {"negative_text_2": text}
    if encode is not None:
        fields["tokenized_negative_2"] = encode(text)
    fields["validation_metadata_negative_2"] = {
        "negative_type_2": LM_NEGATIVE, "map_name_2": item.get("map_name", "unknown"),
        "mining_timestamp": stamp, "mining_method": LM_METHOD}
    return fields


def mining_timestamp(run: Any, output_format: str) -> str:
    """When the run wrote its records, as done.json recorded it, in the original's format
    (`datetime.now().isoformat()`: local time, microseconds): the same for every export of
    the run on this machine."""
    name = run.records(output_format).name
    mtime_ns = read_json(run.done)["files"][name][2]
    exact = datetime.fromtimestamp(mtime_ns // 10**9) + timedelta(
        microseconds=mtime_ns // 1000 % 10**6)
    return exact.isoformat(timespec="microseconds")


def _add(item: dict[str, Any], fields: dict[str, Any], path: Path, index: Any) -> None:
    data = item.setdefault("contrastive_data", {})
    if not isinstance(data, dict):
        raise HnmError(f"{path}: item {index}: 'contrastive_data' is a "
                       f"{type(data).__name__}, not a dict")
    data.update(fields)
