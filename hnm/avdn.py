"""The AVDN processed dataset, as the original `add_hard_negatives.py` reads and writes it:
pickled chunks (`chunk_0.pkl`, ... or one `.pkl`), each a dict of integer index -> item,
every item holding its image as a normalised C x H x W tensor.

Reading goes through hnm.pickles' allow-list (no code from a pickle ever runs); records
keep the plain fields of each item, and images stay in their chunks until embedded (each
process keeps the tensors of one chunk at a time). `export` writes a copy of the dataset in
its own layout with each anchor's negative added as the original script adds it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hnm import pickles
from hnm.config import Fields, tensor_normalization
from hnm.decoding import first_line
from hnm.errors import HnmError
from hnm.readers import ImageRef, Part, Shard

MIN_SIDE = 8  # the pixels feature pools to 8 x 8
METHODS = {"hard": "hard_negative_knn", "diverse": "diverse_negative_clustering"}


def load_items(path: Path) -> dict[Any, Any]:
    """A chunk's dict of items, through the allow-list; any failure is one line naming the
    file (and, for a refused global, the class)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(2) == b"PK":
                raise HnmError(f"{path}: a zip archive (torch.save?), not a pickled dict of "
                               "items; hnm reads chunks written with pickle.dump")
            handle.seek(0)
            data = pickles.load(handle)
    except pickles.Refused as exc:
        raise HnmError(f"{path}: refused to unpickle '{exc.qualname}': not a data-only type "
                       "on hnm's allow-list (README: Coming from add_hard_negatives.py)"
                       ) from None
    except OSError as exc:
        raise HnmError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except HnmError:
        raise
    except Exception as exc:  # a damaged pickle fails in many ways, each this file's fault
        raise HnmError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise HnmError(f"{path}: expected a pickled dict of items (index -> item), got "
                       f"{type(data).__name__}")
    return data


def read_chunk(shard: Shard, fields: Fields) -> Part:
    """Records of one chunk: the item's index as its id (its key), every plain field, and
    the image field as the image's key (`chunk_0.pkl/17`); each image tensor checked."""
    items = load_items(shard.path)
    shard = Shard(shard.path, shard.name, "avdn", fields.image)
    records, refs, keys = [], [], []
    for at, (index, item) in enumerate(items.items()):
        if not isinstance(index, int) or isinstance(index, bool):
            raise HnmError(f"{shard.path}: key {index!r} is not an item index (an integer)")
        if not isinstance(item, dict):
            raise HnmError(f"{shard.path}: item {index} is a {type(item).__name__}, not a dict")
        if fields.image not in item:
            raise HnmError(f"{shard.path}: item {index} has no image field '{fields.image}'")
        size = check_tensor(item[fields.image], f"{shard.path}: item {index}", fields.image)
        ref = ImageRef(shard, at, size, str(index))
        record = {k: v for k, v in item.items() if k != fields.image and is_plain(v)}
        record[fields.image] = ref.key
        records.append(record)
        refs.append(ref)
        keys.append(index)
    return Part(records, refs, keys)


def is_plain(value: Any) -> bool:
    """A value JSON holds as it is (text, numbers, lists and dicts of them): such fields go
    into the records and the outputs; tensors and tokenizer outputs stay in the chunks."""
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(is_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def check_tensor(value: Any, where: str, field: str) -> int:
    """An image tensor's size in bytes; one line naming the item when it cannot be one."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise HnmError(f"{where}: '{field}' holds {type(value).__name__}, not an image tensor")
    shape = "x".join(map(str, value.shape))
    if value.dim() != 3:
        raise HnmError(f"{where}: '{field}' has shape {shape}; an image tensor is C x H x W")
    if not value.is_floating_point():
        raise HnmError(f"{where}: '{field}' holds {value.dtype}; an image tensor holds floats "
                       "(a normalised image)")
    if value.shape[0] != 3 or min(value.shape[1:]) < MIN_SIDE:
        raise HnmError(f"{where}: '{field}' has shape {shape}; expected 3 channels of at least "
                       f"{MIN_SIDE}x{MIN_SIDE} pixels")
    if not np.isfinite(_array(value)).all():
        raise HnmError(f"{where}: '{field}' holds NaN or infinite values")
    return value.numel() * value.element_size()


def _array(tensor: Any) -> np.ndarray:
    """A float tensor's values for NumPy (several times faster here than torch's own
    checks on one thread); bfloat16, which NumPy lacks, as float32."""
    import torch

    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


# ---------------------------------------------------------------- images, on demand

# (process, chunk) whose image tensors this process holds: one chunk at a time, read in
# input order (a forked DataLoader worker loads its own)
_held: dict[str, Any] = {"key": None, "tensors": []}


def image_tensor(ref: ImageRef) -> Any:
    """The image tensor of one item (its chunk unpickled once per process, then kept until
    an image of another chunk is asked for)."""
    key = (os.getpid(), ref.shard.path)
    if _held["key"] != key:
        _held.update(key=None, tensors=[])  # let the previous chunk go before the next
        items = load_items(ref.shard.path)
        _held.update(key=key, tensors=[item.get(ref.shard.column) for item in items.values()])
    return _held["tensors"][ref.at]


class ChunkImages:
    """readers.read_image for a chunk: an image's bytes are its tensor's raw bytes (what the
    duplicate-image count compares)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def close(self) -> None:
        """Nothing held open: the tensors are kept by `image_tensor`."""

    def read(self, ref: ImageRef) -> bytes:
        return image_tensor(ref).contiguous().numpy().tobytes()


def to_image(tensor: Any, normalization: str) -> Any:
    """The RGB image a normalised tensor was made from: x * std + mean, clipped to [0, 1]."""
    import torch
    from PIL import Image

    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1)
                 for v in tensor_normalization(normalization))
    pixels = (tensor.float() * std + mean).clamp(0.0, 1.0).mul(255.0).round()
    return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).contiguous().numpy(), "RGB")


def pooled(tensor: Any) -> Any:
    """The original script's visual feature before its L2 norm: the 8 x 8 adaptive average
    pool of the tensor (float32), per channel (flattened by the pixels encoder)."""
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(tensor.float().unsqueeze(0), MIN_SIDE)[0]


# ---------------------------------------------------------------- export in its own layout


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
    from hnm.outputs import read_records
    from hnm.storage import RunDir

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
    from hnm.storage import read_json

    name = run.records(output_format).name
    mtime_ns = read_json(run.done)["files"][name][2]
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).isoformat(timespec="seconds")


def _add(item: dict[str, Any], fields: dict[str, Any], path: Path, index: Any) -> None:
    data = item.setdefault("contrastive_data", {})
    if not isinstance(data, dict):
        raise HnmError(f"{path}: item {index}: 'contrastive_data' is a "
                       f"{type(data).__name__}, not a dict")
    data.update(fields)
