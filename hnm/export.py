"""`hnm export`: a finished run's negatives as training-ready rows, in a Parquet or JSONL
file or a folder of WebDataset shards.

- triplets: one row per (anchor, negative): the anchor's id, image and text, the
  negative's id, image and text, its type, similarities and suspect flag.
- pairs: one image–text pair a row, each anchor followed by its negatives (type "anchor",
  then "hard" / "diverse", with `anchor_id` naming the anchor): what a CLIP trainer reads,
  with the hard negatives next to their anchor.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hnm.corpus import ColumnarCorpus
from hnm.errors import HnmError
from hnm.inputs import Inputs, identity
from hnm.outputs import read_records
from hnm.plan import check_unchanged, read_plan
from hnm.readers import ImageRef, find_shards, holds_tensor, payload, read_image, tensor_png
from hnm.safety import Area, cannot_write, link_refused
from hnm.staging import check_earlier, staged
from hnm.storage import RunDir
from hnm.writers import chunks, write_tar_shards

KINDS = ("pairs", "triplets")
# Rows per Parquet row group: a row holds one or two images (tens of kB each), so a group
# stays within tens of MB in memory while it is written.
ROW_GROUP = 1000
PER_SHARD = 10_000  # samples per WebDataset shard, as img2dataset writes them
IMAGE_COLUMNS = {"triplets": ("anchor_image", "negative_image"), "pairs": ("image",)}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif"}  # PIL format -> ext
SHARD_NAME = re.compile(r"\d{5,}\.tar")  # what a folder export holds


def export(output_dir: str | Path, kind: str, to: str | Path, overwrite: bool = False,
           tokenizer: str | None = None, max_answer_length: int | None = None,
           missing_negative: str | None = None,
           say: Callable[[str], None] | None = None) -> Path:
    """Write the run's rows of `kind` to `to` (.parquet, .jsonl, or a folder); returns it.
    Everything is checked before anything is written: the run (its results' checksums,
    its annotations and images unchanged since it ran) and the target (not an input of the
    run, not inside any hnm run directory, not a link, and replaced only with
    `overwrite`). `avdn`: the run's input, an AVDN processed dataset, copied into the
    folder `to` with the negatives added (hnm.avdn; `missing_negative`: what an item
    without one gets, `say`: the summary's lines)."""
    from hnm.lifecycle import load_run, run_corpus

    if kind == "avdn":
        return _export_avdn(output_dir, Path(to), overwrite, tokenizer, max_answer_length,
                            missing_negative or "skip", say or (lambda line: None))
    if tokenizer is not None or max_answer_length is not None or missing_negative is not None:
        raise HnmError("--tokenizer, --max-answer-length and --missing-negative: only with "
                       "--format avdn")
    if kind not in KINDS:
        raise HnmError(f"--format: must be one of {', '.join(KINDS)}, got {kind!r}")
    run = load_run(output_dir)
    to = Path(to)
    target = to.suffix.lower() if to.suffix.lower() in (".parquet", ".jsonl") else "dir"
    plan = read_plan(RunDir(run.dir))
    ds = run_corpus(RunDir(run.dir), run.config, plan)
    check_unchanged(run.config, plan, ds, run.dir)
    area = check_target(to, target, overwrite, Inputs(run.config, ds.images))
    if target == ".jsonl" and any(isinstance(s, ImageRef) for s in ds.images):
        raise HnmError(f"--to {to}: a JSONL file names image files, and this run's images "
                       "are held in its input shards: export to a .parquet file or a folder")
    rows = ROWS[kind](RunDir(run.dir), ds, run.config.fields.text)
    if area is None:  # a folder: built beside it, moved in when complete
        with staged(to, _is_shard, kind) as stage, ImageBytes(
                ds, stage, stage.root, run.config.tensor_normalization) as images:
            write_tar_shards(stage.root, _samples(rows, kind, images), PER_SHARD, stage)
        return to
    _start(area)
    if target == ".jsonl":
        _write_jsonl(area, to, rows, ds, kind)
        return to
    with ImageBytes(ds, area, area.root, run.config.tensor_normalization) as images:
        _write_parquet(area, to, rows, ds, kind, images)
    return to


def _export_avdn(output_dir: str | Path, to: Path, overwrite: bool, tokenizer: str | None,
                 max_answer_length: int | None, missing: str, say: Callable[[str], None]
                 ) -> Path:
    """The run's AVDN chunks again, in the folder `to`, under their own names (checked as
    every export target is; an earlier avdn export there is replaced with `overwrite`)."""
    from hnm import avdn
    from hnm.lifecycle import load_run, run_corpus

    run = load_run(output_dir)
    plan = read_plan(RunDir(run.dir))
    if plan.input_format != "avdn":
        raise HnmError(f"--format avdn: the input of the run in {run.dir} is {plan.input_format}"
                       ", not an AVDN processed dataset (.pkl chunks)")
    ds = run_corpus(RunDir(run.dir), run.config, plan)
    check_unchanged(run.config, plan, ds, run.dir)
    shards = find_shards(run.config)[1]
    names = {s.name for s in shards}
    if missing not in avdn.MISSING:
        raise HnmError(f"--missing-negative: must be one of {', '.join(avdn.MISSING)}, got "
                       f"{missing!r}")
    check_target(to, "dir", overwrite, Inputs(run.config, ds.images))
    encode = avdn.tokenizer(tokenizer, max_answer_length)
    with staged(to, names.__contains__, "avdn") as stage:  # moved in when complete
        _, lines = avdn.export(run, ds, shards, stage, encode, missing)
    for line in lines:
        say(line)
    return to


def check_target(to: Path, target: str, overwrite: bool, inputs: Inputs) -> Area | None:
    """The area an export of a file writes `to` through (None for a folder, which is
    staged), once `to` is known to be safe to write: not inside an hnm run directory, not
    one of the run's inputs (nor, for a folder, holding one) whatever its name, not a link,
    and not an existing file or earlier export (known by its signature) unless
    `overwrite`."""
    real = Path(os.path.realpath(to.parent)) / to.name
    for folder in ((real,) if target == "dir" else ()) + tuple(real.parents):
        if _is_run(folder):
            raise HnmError(f"--to {to}: inside the hnm run directory {folder}; an export "
                           "never writes in a run directory: choose another --to")
    if to.is_symlink():
        raise link_refused(to)
    _not_an_input(to, target, inputs)
    if target == "dir":
        check_earlier(to, overwrite)
        return None
    if to.is_dir():
        raise HnmError(f"--to {to}: is a folder; a {target[1:]} export is a file")
    if to.exists() and not overwrite:
        raise HnmError(f"--to {to}: exists; pass --overwrite to replace it")
    area = Area(to.parent, lambda rel: rel == to.name)
    area.inputs = inputs.files_in([to.parent])  # checked again as the file is replaced
    return area


def _is_run(folder: Path) -> bool:
    """An hnm run directory: signed, or from before signatures (plan.json and config.yaml)."""
    run = RunDir(folder)
    return run.manifest() is not None or (run.plan.is_file() and run.config.is_file())


def _not_an_input(to: Path, target: str, inputs: Inputs) -> None:
    """Refuse a target that is one of the files the run read, or a folder holding one,
    compared as files (device and inode): any name for them is refused."""
    held, how = inputs.files_in([to.parent]).get(identity(to) or (-1, -1)), "is"
    if held is None and target == "dir":
        held, how = inputs.held_by(to), "holds"
    if held is not None:
        raise HnmError(f"--to {to}: {how} an input of the run ({held}); an export never "
                       "replaces one: choose another --to")


def _is_shard(name: str) -> bool:
    return SHARD_NAME.fullmatch(name) is not None


def _start(area: Area) -> None:
    """A file export's first writes, once every check passed: its folder, then away with
    what an export killed mid-write left."""
    try:
        area.ensure_root()
    except OSError as exc:
        raise cannot_write(area.root, exc) from None
    area.remove_temporary(deep=False)


def _anchor(ds: ColumnarCorpus, pos: int) -> int:
    """The mined row of the record at `pos`."""
    return int(np.searchsorted(ds.positions, pos))


def triplets(run: RunDir, ds: ColumnarCorpus, text: str) -> Iterator[dict[str, Any]]:
    """One row per (anchor, negative); image columns hold mined rows, read when written."""
    for pos, record in read_records(run):
        if not record["negatives"]:
            continue
        anchor = _anchor(ds, pos)
        anchor_id = ds.ids[anchor]
        rows = ds.row_of_ids([n["id"] for n in record["negatives"]])
        for n, row in zip(record["negatives"], rows.tolist()):
            yield {"anchor_id": anchor_id, "anchor_image": anchor,
                   "anchor_text": record[text], "negative_id": n["id"],
                   "negative_image": row, "negative_text": n["text"],
                   "type": n["type"], "text_similarity": n["text_similarity"],
                   "visual_similarity": n["visual_similarity"], "suspect": n["suspect"]}


def pairs(run: RunDir, ds: ColumnarCorpus, text: str) -> Iterator[dict[str, Any]]:
    """Each anchor that has negatives, then its negatives, one image–text pair a row."""
    for pos, record in read_records(run):
        if not record["negatives"]:
            continue
        anchor = _anchor(ds, pos)
        anchor_id = ds.ids[anchor]
        yield {"anchor_id": anchor_id, "id": anchor_id, "image": anchor,
               "text": record[text], "type": "anchor", "text_similarity": None,
               "visual_similarity": None}
        rows = ds.row_of_ids([n["id"] for n in record["negatives"]])
        for n, row in zip(record["negatives"], rows.tolist()):
            yield {"anchor_id": anchor_id, "id": n["id"], "image": row,
                   "text": n["text"], "type": n["type"],
                   "text_similarity": n["text_similarity"],
                   "visual_similarity": n["visual_similarity"]}


ROWS = {"pairs": pairs, "triplets": triplets}


class ImageBytes:
    """The bytes of any mined row's image. Files, tar members and Arrow rows are read where
    they lie; a Parquet column cannot be read at random, nor an AVDN chunk without reading
    it whole, so their images are first copied (tensors as PNG images), in input order,
    into a temporary file beside the export (removed afterwards)."""

    def __init__(self, ds: ColumnarCorpus, area: Area, where: Path,
                 normalization: str = "imagenet") -> None:
        self.images = ds.images
        self.area, self.where = area, where
        self.normalization = normalization  # image tensors are spooled as PNG images
        self.offsets = np.full(len(ds.images), -1, dtype=np.int64)  # -1: not in the spool
        self.sizes = np.zeros(len(ds.images), dtype=np.int64)
        self.spool: Any = None

    def __enter__(self) -> ImageBytes:
        for row, s in enumerate(self.images):  # read a block of rows at a time
            if isinstance(s, ImageRef) and s.shard.fmt in ("parquet", "avdn"):
                if self.spool is None:
                    self.spool = self.area.scratch(self.where)
                self.offsets[row] = self.spool.tell()
                self.sizes[row] = self.spool.write(self._read(s))
        return self

    def _read(self, ref: ImageRef) -> bytes:
        if holds_tensor(ref):  # a tensor, mapped back to its image (--tensor-normalization)
            return tensor_png(ref, self.normalization).getvalue()
        return read_image(ref) or b""

    def __exit__(self, *exc: Any) -> None:
        if self.spool is not None:
            self.spool.close()

    def get(self, row: int) -> bytes:
        if self.offsets[row] >= 0:
            self.spool.seek(int(self.offsets[row]))
            return self.spool.read(int(self.sizes[row]))
        data = payload(self.images[row])
        return data.read_bytes() if isinstance(data, Path) else data or b""


def _write_jsonl(area: Area, to: Path, rows: Iterator[dict[str, Any]], ds: ColumnarCorpus,
                 kind: str) -> None:
    """Image columns hold absolute paths of the image files."""
    with area.open(to, "w") as handle:
        for row in rows:
            for column in IMAGE_COLUMNS[kind]:
                row[column] = str(Path(ds.images[row[column]]).absolute())
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_parquet(area: Area, to: Path, rows: Iterator[dict[str, Any]], ds: ColumnarCorpus,
                   kind: str, images: ImageBytes) -> None:
    """Image columns hold the images' bytes; written ROW_GROUP rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(ds, kind)
    with area.open(to) as handle:
        writer = pq.ParquetWriter(handle, schema)
        for chunk in chunks(rows, ROW_GROUP):
            for row in chunk:
                for column in IMAGE_COLUMNS[kind]:
                    row[column] = images.get(row[column])
                _id_text(schema, row)
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
        writer.close()


def _schema(ds: ColumnarCorpus, kind: str) -> Any:
    import pyarrow as pa

    # ids that mix numbers and text are written as text
    ids = ds.column_types()[1] or pa.string()
    sims = [("text_similarity", pa.float64()), ("visual_similarity", pa.float64())]
    if kind == "pairs":
        return pa.schema([("anchor_id", ids), ("id", ids), ("image", pa.binary()),
                          ("text", pa.string()), ("type", pa.string()), *sims])
    return pa.schema([("anchor_id", ids), ("anchor_image", pa.binary()),
                      ("anchor_text", pa.string()), ("negative_id", ids),
                      ("negative_image", pa.binary()), ("negative_text", pa.string()),
                      ("type", pa.string()), *sims, ("suspect", pa.bool_())])


def _id_text(schema: Any, row: dict[str, Any]) -> None:
    import pyarrow as pa

    if schema.field("anchor_id").type == pa.string():
        for column in ("anchor_id", "id", "negative_id"):
            if column in row:
                row[column] = str(row[column])


def _samples(rows: Iterator[dict[str, Any]], kind: str, images: ImageBytes
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset samples: pairs as `{key}.jpg` (or .png, ...), `.txt` and `.json` — what
    open_clip and img2dataset read; triplets as `.anchor.jpg`, `.negative.jpg`, `.json`."""
    for number, row in enumerate(rows):
        members: dict[str, bytes] = {}
        if kind == "pairs":
            data = images.get(row.pop("image"))
            members[_extension(data)] = data
            members["txt"] = row["text"].encode("utf-8")
        else:
            for side in ("anchor", "negative"):
                data = images.get(row.pop(f"{side}_image"))
                members[f"{side}.{_extension(data)}"] = data
        members["json"] = json.dumps(row, ensure_ascii=False).encode("utf-8")
        yield f"{number:09d}", members


def _extension(data: bytes) -> str:
    """The extension WebDataset decoders expect for the image's format."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            name = img.format or ""
    except (OSError, ValueError, SyntaxError):
        name = ""
    return EXTENSIONS.get(name, name.lower() or "bin")
