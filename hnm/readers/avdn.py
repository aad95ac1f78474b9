"""The AVDN processed dataset, as the original `add_hard_negatives.py` writes it: pickled
chunks (`chunk_0.pkl`, ... or one `.pkl`), each a dict of integer index -> item, every item
holding its image as a normalised C x H x W tensor.

Reading goes through hnm.pickles' allow-list (no code from a pickle ever runs); records
keep the plain fields of each item, and images stay in their chunks until embedded (each
process keeps the tensors of one chunk at a time). hnm.avdn writes the export in this layout.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hnm import pickles
from hnm.config import Config, Fields, tensor_normalization
from hnm.errors import HnmError
from hnm.readers.base import ImageRef, Part, Shard

MIN_SIDE = 8  # the pixels feature pools to 8 x 8
MAX_PIXELS = Config.max_image_pixels  # --max-image-pixels' default


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
    except pickles.Rejected as exc:
        raise HnmError(f"{path}: refused to unpickle: {exc}") from None
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


def read_chunk(shard: Shard, fields: Fields, max_pixels: int = MAX_PIXELS) -> Part:
    """Records of one chunk: the item's index as its id (its key), every plain field, and
    the image field as the image's key (`chunk_0.pkl/17`); each image tensor checked (at
    most `max_pixels` pixels, as --max-image-pixels says of image files)."""
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
        size = check_tensor(item[fields.image], f"{shard.path}: item {index}", fields.image,
                            max_pixels)
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


def check_tensor(value: Any, where: str, field: str, max_pixels: int = MAX_PIXELS) -> int:
    """An image tensor's size in bytes; one line naming the item when it cannot be one."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise HnmError(f"{where}: '{field}' holds {type(value).__name__}, not an image tensor")
    shape = "x".join(map(str, value.shape))
    if value.dim() != 3:
        raise HnmError(f"{where}: '{field}' has shape {shape}; an image tensor is C x H x W")
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise HnmError(f"{where}: '{field}' holds {value.dtype}; an image tensor holds floats "
                       "(a normalised image)")
    if value.shape[0] != 3 or min(value.shape[1:]) < MIN_SIDE:
        raise HnmError(f"{where}: '{field}' has shape {shape}; expected 3 channels of at least "
                       f"{MIN_SIDE}x{MIN_SIDE} pixels")
    if value.shape[1] * value.shape[2] > max_pixels:
        raise HnmError(f"{where}: '{field}' has shape {shape}, more than --max-image-pixels "
                       f"({max_pixels:,}) pixels")
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


def read_tensor(ref: ImageRef) -> Any:
    """The image tensor of one item (its chunk unpickled once per process, then kept until
    an image of another chunk is asked for)."""
    key = (os.getpid(), ref.shard.path)
    if _held["key"] != key:
        _held.update(key=None, tensors=[])  # let the previous chunk go before the next
        items = load_items(ref.shard.path)
        _held.update(key=key, tensors=[item.get(ref.shard.column) for item in items.values()])
    return _held["tensors"][ref.at]


class ChunkImages:
    """`read_image` (hnm.readers.images) for a chunk: an image's bytes are its tensor's raw
    bytes (what the duplicate-image count compares)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def close(self) -> None:
        """Nothing held open: the tensors are kept by `read_tensor`."""

    def read(self, ref: ImageRef) -> bytes:
        return read_tensor(ref).contiguous().numpy().tobytes()


def to_image(tensor: Any, normalization: str) -> Any:
    """The RGB image a normalised tensor was made from: x * std + mean, clipped to [0, 1]."""
    import torch
    from PIL import Image

    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1)
                 for v in tensor_normalization(normalization))
    pixels = (tensor.float() * std + mean).clamp(0.0, 1.0).mul(255.0).round()
    return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).contiguous().numpy(), "RGB")


def tensor_png(ref: ImageRef, normalization: str) -> BinaryIO:
    """An image tensor mapped back to an image (--tensor-normalization), as PNG bytes."""
    buffer = io.BytesIO()
    to_image(read_tensor(ref), normalization).save(buffer, "PNG")
    buffer.seek(0)
    return buffer


def pooled(tensor: Any) -> Any:
    """The original script's visual feature before its L2 norm: the 8 x 8 adaptive average
    pool of the tensor (float32), per channel (flattened by the pixels encoder)."""
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(tensor.float().unsqueeze(0), MIN_SIDE)[0]
