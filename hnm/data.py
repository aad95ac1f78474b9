"""Reading annotations and images: the input read and checked a block at a time (`scan`:
`Block`s, then `Facts`), or whole (`load_corpus`: the `Corpus`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm.blocks import Block, Facts
from hnm.callbacks import Progress, no_progress
from hnm.checks import (
    MAX_DEPTH,
    IdSet,
    ImageCheck,
    check_fields,
    check_nesting,
    check_unicode,
    duplicate,
    field,
    id_text,
    image_file,
    image_limit,
    image_problem,
    mapped,
    normalize,
    record_id,
    stat_line,
    too_large,
)
from hnm.config import Config, Fields
from hnm.distinct import DistinctCodes
from hnm.errors import HnmError
from hnm.readers import BLOCK_ROWS, ImageRef, Input, Part, Source, check_normalization

__all__ = ["MAX_DEPTH", "Corpus", "Scan", "anchor_uniforms", "check_mapping",
           "file_stats", "image_limit", "image_problem", "load_corpus",
           "normalize", "scan", "too_large"]

# json.dumps(value, sort_keys=True): a group's value as text, its encoder made once
_sorted_json = json.JSONEncoder(sort_keys=True).encode


@dataclass(frozen=True)
class Corpus:
    """The input as hnm mines it: every record, and the mined rows (rows with skipped
    images excluded) with their ids, images, phrases and groups. (Not a Hugging Face
    `Dataset`, which is one of the input formats.)"""

    records: list[dict[str, Any]]  # every input record in input order (image bytes as keys)
    positions: np.ndarray  # (n,) position in `records` of each mined row
    ids: list[Any]
    images: list[Path | ImageRef]  # an image file, or an image held in a shard
    phrases: list[str]  # distinct normalized texts, in order of first occurrence
    text_ids: np.ndarray  # (n,) row -> index into `phrases`
    groups: np.ndarray  # (n,) row -> group code; rows of one group never pair
    num_anchors: int
    skipped: dict[str, list[int]]  # reason -> record positions left out of mining
    source_sha256: str
    input_format: str = "json"
    shard_ends: tuple[int, ...] = ()  # input shards [:i + 1] hold records [0, shard_ends[i])
    image_files: str = ""  # hash of every image file's path, size and mtime (file_stats)
    # the id of every record, by position: its id field, else its key or position (the
    # outputs then write it into the record's row)
    record_ids: tuple[Any, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def rows_before(self, positions: np.ndarray) -> np.ndarray:
        """The count of rows before each record position."""
        return np.searchsorted(self.positions, np.asarray(positions, np.int64))


def check_mapping(src: Source, fields: Fields) -> None:
    """Every field the mapping names must be held by some record of the source
    (`checks.check_fields`)."""
    check_fields(src.label, src.field_names(), fields)


class Scan:
    """The input named by the config, read and checked a block at a time: `blocks()` gives
    each block once its records passed every check of `load_corpus` that one block can
    tell (ids against every earlier id, nesting, Unicode, text and image fields, the
    images themselves), and `facts` once the last was given and the checks of the whole
    passed (the field mapping, the images' count, the tensors' normalisation). An error
    found after some blocks were given is raised from `blocks()`: what was written from
    them is not a run's. Between blocks it holds numbers per record (8 bytes an id), per
    distinct phrase and group value (24 bytes each: `distinct.DistinctCodes`), and the
    skipped positions.

    A fault found before the field mapping is known to hold (a record without the text
    field, say) waits for it: a mapping that names no record's field is the error then."""

    def __init__(self, config: Config, skip: list[int] | None = None,
                 progress: Progress = no_progress, planned: bool = False,
                 size: int = BLOCK_ROWS) -> None:
        """`skip`: record positions already known to be left out (workers pass the
        plan's), which also spares re-checking every image. `planned`: a worker of a
        planned run reads the input (image tensors are not hashed or sampled again)."""
        if not config.annotations:
            raise HnmError("--annotations: no annotation file given")
        self.config, self.skip, self.progress = config, skip, progress
        self.planned, self.size = planned, size
        self.input = Input(config, planned)
        self.facts: Facts | None = None

    def blocks(self) -> Iterator[Block]:
        """Every block of the input, checked, in order; then `facts` is set."""
        config, src = self.config, self.input
        self.facts = None
        self.ids, self.names = IdSet(), set[str]()
        wanted = {name for _, name in mapped(config.fields)}
        self.phrases, self.groups = DistinctCodes(), DistinctCodes()
        self.records = self.rows = 0
        self.adds_id = False
        self.bad: list[int] = []
        self.check = ImageCheck(config.max_image_pixels) \
            if self.skip is None and not config.image_embeddings and src.fmt != "avdn" else None
        self.stats = hashlib.sha256()
        self.skipped = np.unique(np.asarray(self.skip or [], np.int64))
        pending: HnmError | None = None
        for part in src.blocks(self.size):
            self.records += len(part)
            ids = self._ids(part)
            if part.found is None:
                self.names.update(*part.records)
            else:
                self.names |= part.found
            if pending is None:
                try:
                    block = self._block(part, ids)
                except HnmError as exc:
                    if wanted <= self.names:
                        raise
                    pending = exc
                else:
                    yield block
                    del block  # let the block go while the next one is read
            elif wanted <= self.names:
                raise pending
            del part, ids
        self.facts = self._facts(pending)

    def _ids(self, part: Part) -> list[Any]:
        """Every record's id, each refused if it is one with an earlier record's (exactly:
        a hash met again is resolved by the ids' texts, read again if need be)."""
        locate, id_field, start = self.input.locate, self.config.fields.id, part.start
        ids: list[Any] = []
        fault = None
        for k, record in enumerate(part.records):
            try:
                ids.append(record_id(record, start + k, part.keys[k] if part.keys else None,
                                     id_field, locate))
            except HnmError as exc:  # raised once the ids before it are known to be new
                fault = exc
                break
        texts = [id_text(rid) for rid in ids]
        hashes = IdSet.hashes(texts)
        within, earlier = self.ids.repeats(hashes)
        before = self._ids_hashed(set(hashes[earlier].tolist()), start)
        for i in sorted({*within, *np.flatnonzero(earlier).tolist()}):
            found = before.get(int(hashes[i]), []) + [(start + j, ids[j])
                                                      for j in within.get(i, [])]
            for p, prev in found:  # in input order
                if id_text(prev) == texts[i]:
                    raise duplicate(locate, p, prev, start + i, ids[i])
        if fault is not None:
            raise fault
        self.ids.add(hashes)
        self.adds_id |= any(id_field not in r for r in part.records)
        return ids

    def _ids_hashed(self, wanted: set[int], start: int) -> dict[int, list[tuple[int, Any]]]:
        """The ids of the records before `start` whose hash is wanted, (position, id) in
        input order by hash: read again from the input (only where an id's hash is an
        earlier one's: a duplicate, or rarely two ids of one hash)."""
        found: dict[int, list[tuple[int, Any]]] = {}
        if not wanted:
            return found
        id_field = self.config.fields.id
        for part in Input(self.config, planned=True).blocks(self.size):
            if part.start >= start:
                break
            keys = part.keys or [None] * len(part.records)
            rids = [record.get(id_field, part.start + k if key is None else key)
                    for k, (record, key) in enumerate(zip(part.records[:start - part.start],
                                                          keys))]
            hashes = IdSet.hashes([id_text(rid) for rid in rids]).tolist()
            for k in [k for k, h in enumerate(hashes) if h in wanted]:
                found.setdefault(hashes[k], []).append((part.start + k, rids[k]))
        return found

    def _block(self, part: Part, ids: list[Any]) -> Block:
        """The block's records checked (each check over the block in turn, in the order
        they run over a whole input), their images, phrases and groups."""
        config, locate, start = self.config, self.input.locate, part.start
        f, records = config.fields, part.records
        check_nesting(records, ids, start, locate)
        texts = [field(r, start + k, ids[k], f.text, "text", locate)
                 for k, r in enumerate(records)]
        if part.surrogates:
            check_unicode(records, ids, start, locate)
        image_dir = Path(config.image_dir)
        images = [part.refs[k] if part.refs is not None and part.refs[k] is not None
                  else image_dir / image_file(r, start + k, ids[k], f.image, locate)
                  for k, r in enumerate(records)]
        keep = np.ones(len(records), bool)
        skipped = self.skipped[(self.skipped >= start) & (self.skipped < start + len(records))]
        keep[skipped - start] = False
        if self.check is not None:
            done = self.records - len(records)
            problems = self.check.problems(images, lambda n: self.progress(
                "check images", done + n, self.records))
            bad = [k for k, why in enumerate(problems) if why]
            keep[bad] = False
            self.bad += [start + k for k in bad]
        if not config.image_embeddings:
            for image in images:
                if isinstance(image, Path):
                    self.stats.update(stat_line(image))
        mined = np.flatnonzero(keep).tolist()
        self.rows += len(mined)
        phrases = [normalize(texts[k]) for k in mined]
        text_ids, first = self.phrases.code(phrases)
        new = [phrases[i] for i in first.tolist()]
        # a sample without a group is its own group (a code of its own)
        values = [records[k].get(f.group) for k in mined]
        groups, _ = self.groups.code([None if v is None else _sorted_json(v) for v in values])
        return Block(start, records, ids, images, keep, text_ids, groups, new)

    def _facts(self, pending: HnmError | None) -> Facts:
        """The checks of the whole input, in `load_corpus`'s order, then what it knows."""
        config, src = self.config, self.input
        if not self.records:
            raise HnmError(f"{src.label}: no records")
        check_normalization(src.sample, config.tensor_normalization)
        check_fields(src.label, self.names, config.fields)
        if pending is not None:
            raise pending
        if self.check is not None and self.check.count and config.on_missing_image != "skip":
            raise self.check.error(src.label)
        if not self.rows:
            raise HnmError(f"{src.label}: no record has a usable image")
        skipped = self.skipped.tolist() if self.skip is not None else self.bad
        anchors = self.rows if config.max_samples is None else min(config.max_samples,
                                                                    self.rows)
        return Facts(
            num_records=self.records, num_rows=self.rows, num_phrases=self.phrases.count,
            num_anchors=anchors, skipped={"missing_image": skipped} if skipped else {},
            source_sha256=src.digest, input_format=src.fmt, shard_ends=tuple(src.ends),
            image_files="" if config.image_embeddings else self.stats.hexdigest()[:16],
            adds_id=self.adds_id)


def scan(config: Config, skip: list[int] | None = None, progress: Progress = no_progress,
         planned: bool = False, size: int = BLOCK_ROWS) -> Scan:
    """The input named by the config, to be read and checked a block at a time (`Scan`)."""
    return Scan(config, skip, progress, planned, size)


def load_corpus(config: Config, skip: list[int] | None = None,
                progress: Progress = no_progress, planned: bool = False) -> Corpus:
    """Read, validate and index the input named by the config (hnm.readers: any format),
    every block of `scan` held in one `Corpus`.

    `skip`: record positions already known to be left out (workers pass the plan's),
    which also spares re-checking every image. `planned`: a worker of a planned run reads
    the input (image tensors are not hashed or sampled again).
    """
    reading = scan(config, skip, progress, planned)
    blocks = list(reading.blocks())
    return corpus(blocks, reading.facts)  # type: ignore[arg-type]


def corpus(blocks: list[Block], facts: Facts) -> Corpus:
    """The blocks of a scan, and its facts, as one `Corpus`."""
    mined = [np.flatnonzero(b.keep) for b in blocks]
    return Corpus(
        records=[r for b in blocks for r in b.records],
        positions=np.concatenate([b.start + m for b, m in zip(blocks, mined)]),
        ids=[b.ids[k] for b, m in zip(blocks, mined) for k in m],
        images=[b.images[k] for b, m in zip(blocks, mined) for k in m],
        phrases=[p for b in blocks for p in b.new_phrases],
        text_ids=np.concatenate([b.text_ids for b in blocks]),
        groups=np.concatenate([b.groups for b in blocks]),
        num_anchors=facts.num_anchors, skipped=facts.skipped,
        source_sha256=facts.source_sha256, input_format=facts.input_format,
        shard_ends=facts.shard_ends, image_files=facts.image_files,
        record_ids=tuple(i for b in blocks for i in b.ids))


def file_stats(images: list[Path | ImageRef]) -> str:
    """Short hash of the path, size and modification time of every image file (images in
    shards are covered by the shards' own identity): an edited, added or restored image
    changes it, and no image is read."""
    h = hashlib.sha256()
    for path in images:
        if isinstance(path, Path):
            h.update(stat_line(path))
    return h.hexdigest()[:16]


# json.dumps of an id of these exact types, without its dispatch (the same text)
_ID_JSON: dict[type, Callable[[Any], str]] = {
    str: json.encoder.encode_basestring_ascii,  # type: ignore[attr-defined]
    int: int.__repr__}


def anchor_uniforms(ids: Sequence[Any], seed: int) -> np.ndarray:
    """SPEC §7: u_a in [0, 1) from a hash of (seed, id) — independent of any shared stream:
    the first 8 bytes of BLAKE2b("{seed}\0{json.dumps(id)}"), big-endian, over 2^64."""
    digests = b"".join(
        hashlib.blake2b(f"{seed}\0{_ID_JSON.get(type(rid), json.dumps)(rid)}".encode(),
                        digest_size=8).digest() for rid in ids)
    return np.frombuffer(digests, ">u8").astype(np.float64) / 2.0**64


