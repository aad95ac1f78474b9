"""The AVDN processed dataset, as the original `add_hard_negatives.py` writes it: pickled
chunks (`chunk_0.pkl`, ... or one `.pkl`), each a dict of integer index -> item, every item
holding its image as a normalised C x H x W tensor.

Reading goes through hnm.pickles' allow-list (no code from a pickle ever runs); records
keep the plain fields of each item, and images stay in their chunks until embedded (each
process keeps the tensors of one chunk at a time). hnm.avdn writes the export in this layout.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hnm import pickles
from hnm.config import TENSOR_NORMALIZATIONS, Config, Fields, tensor_normalization
from hnm.errors import HnmError
from hnm.readers.base import ImageRef, Part, Shard

MIN_SIDE = 8  # the pixels feature pools to 8 x 8
MAX_PIXELS = Config.max_image_pixels  # --max-image-pixels' default
# The check of --tensor-normalization: a seeded sample of SAMPLE_ITEMS items a chunk,
# SAMPLE_VALUES pixel values of each channel of each, mapped back to the image range [0, 1].
# AVDN's augmentations (brightness and contrast x 0.8-1.2, noise) take a few values up to
# about 0.3 past it; a wrong normalisation takes many far past it.
SAMPLE_ITEMS, SAMPLE_VALUES = 8, 1024
TOLERANCE = 0.25  # how far outside [0, 1] a recovered value may fall
OUTSIDE_SHARE = 0.01  # the share of sampled values that may fall further out
DARK, FULL = 0.6, 0.9  # a named preset whose values stay below DARK, beside one that
# reaches FULL (99.9th percentiles), maps the images to their dark part only


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


def read_chunk(shard: Shard, fields: Fields, max_pixels: int = MAX_PIXELS,
               planned: bool = False) -> Part:
    """Records of one chunk: the item's index as its id (its key), every plain field, and
    the image field as the image's key (`chunk_0.pkl/17`); each image tensor checked (at
    most `max_pixels` pixels, as --max-image-pixels says of image files), hashed and
    sampled (`planned`, a worker of a planned run: checked only)."""
    items = load_items(shard.path)
    shard = Shard(shard.path, shard.name, "avdn", fields.image)
    records, refs, keys, tensors = [], [], [], []
    for at, (index, item) in enumerate(items.items()):
        if not isinstance(index, int) or isinstance(index, bool):
            raise HnmError(f"{shard.path}: key {index!r} is not an item index (an integer)")
        if not isinstance(item, dict):
            raise HnmError(f"{shard.path}: item {index} is a {type(item).__name__}, not a dict")
        if fields.image not in item:
            raise HnmError(f"{shard.path}: item {index} has no image field '{fields.image}'")
        size = check_tensor(item[fields.image], f"{shard.path}: item {index}", fields.image,
                            max_pixels)
        digest = None if planned else tensor_digest(item[fields.image])
        ref = ImageRef(shard, at, size, str(index), digest)
        record = {k: v for k, v in item.items() if k != fields.image and is_plain(v)}
        record[fields.image] = ref.key
        records.append(record)
        refs.append(ref)
        keys.append(index)
        tensors.append(item[fields.image])
    if planned:
        return Part(records, refs, keys)
    return Part(records, refs, keys, sample=sample(tensors, zlib.crc32(shard.name.encode())))


def chunk_parts(shard: Shard, fields: Fields, size: int, max_pixels: int = MAX_PIXELS,
                planned: bool = False) -> Iterator[Part]:
    """`read_chunk`'s records in parts of at most `size` (a chunk is read as one unit: its
    pickle holds every item; the tensors are let go once checked). The chunk's sample of
    pixel values goes with its first part."""
    part = read_chunk(shard, fields, max_pixels, planned)
    for start in range(0, len(part.records), size):
        end = start + size
        yield Part(part.records[start:end], part.refs[start:end] if part.refs else None,
                   part.keys[start:end] if part.keys else None,
                   sample=part.sample if not start else None, start=start)


def sample(tensors: list[Any], seed: int) -> np.ndarray:
    """Pixel values of a seeded sample of the tensors: items x 3 x SAMPLE_VALUES."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(tensors), min(SAMPLE_ITEMS, len(tensors)), replace=False))
    out = np.empty((len(chosen), 3, SAMPLE_VALUES), np.float32)
    for k, i in enumerate(chosen):
        flat = _array(tensors[i]).reshape(3, -1)
        out[k] = flat[:, rng.choice(flat.shape[1], SAMPLE_VALUES,
                                    replace=flat.shape[1] < SAMPLE_VALUES)]
    return out


def check_normalization(values: np.ndarray | None, normalization: str) -> None:
    """Refuse --tensor-normalization when it maps the sampled tensors outside the image
    range (more than OUTSIDE_SHARE of the values beyond TOLERANCE), or, a named preset,
    into its dark half only where another preset fills it: one line naming the flag, what
    the sample showed and the preset the tensors look normalised with."""
    if values is None or not len(values):
        return
    flag = f"--tensor-normalization {normalization}"
    items = f"{len(values)} item(s) sampled"
    outside, top = _fit(values, normalization)
    fits = {name: _fit(values, name) for name in TENSOR_NORMALIZATIONS}
    good = [n for n, (out, _) in fits.items() if out <= OUTSIDE_SHARE]
    likely = min(good, key=lambda n: abs(1 - fits[n][1])) if good else None
    hint = (f"the tensors look normalised as {likely}: pass --tensor-normalization {likely}"
            if likely else "no preset (" + ", ".join(TENSOR_NORMALIZATIONS) + ") fits them: "
            "give the mean and std they were normalised with (M1,M2,M3,S1,S2,S3, 0-1 units)")
    if outside > OUTSIDE_SHARE:
        raise HnmError(f"{flag}: maps {outside:.0%} of the sampled pixel values outside the "
                       f"image range (beyond [{-TOLERANCE:g}, {1 + TOLERANCE:g}]; {items}); "
                       f"{hint}")
    if normalization in TENSOR_NORMALIZATIONS and top < DARK and likely is not None \
            and likely != normalization and fits[likely][1] >= FULL:
        raise HnmError(f"{flag}: maps the sampled pixel values to [0, {top:.2f}] only, the "
                       f"dark part of the image range ({items}); {hint} (or give these "
                       "values as numbers to keep them)")


def _fit(values: np.ndarray, normalization: str) -> tuple[float, float]:
    """(share of the values mapped beyond the tolerance, their 99.9th percentile)."""
    mean, std = (np.array(v, np.float64).reshape(1, 3, 1)
                 for v in tensor_normalization(normalization))
    pixels = values * std + mean
    outside = float(np.mean((pixels < -TOLERANCE) | (pixels > 1 + TOLERANCE)))
    return outside, float(np.quantile(pixels, 0.999))


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


def tensor_digest(tensor: Any) -> str:
    """SHA-256 of a tensor's values in C order (what `ChunkImages.read` gives)."""
    return hashlib.sha256(_c_order(tensor)).hexdigest()


def _c_order(tensor: Any) -> np.ndarray:
    """A tensor's values as a C-ordered array. AVDN's preprocessing stores its tensors
    with the strides of the H x W x C image they came from (`torch.tensor` of a transposed
    array keeps them): NumPy puts them in order over a hundred times faster than torch's
    `contiguous()` on one thread."""
    return np.ascontiguousarray(_array(tensor))


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
        return _c_order(read_tensor(ref)).tobytes()


def to_image(tensor: Any, normalization: str) -> Any:
    """The RGB image a normalised tensor was made from: x * std + mean, clipped to [0, 1]."""
    from PIL import Image

    mean, std = (np.array(v, np.float32) for v in tensor_normalization(normalization))
    hwc = _array(tensor).transpose(1, 2, 0).astype(np.float32)  # one copy, in H x W x C
    hwc *= std
    hwc += mean
    np.clip(hwc, 0.0, 1.0, out=hwc)
    hwc *= 255.0
    return Image.fromarray(np.rint(hwc, out=hwc).astype(np.uint8), "RGB")


def tensor_png(ref: ImageRef, normalization: str) -> BinaryIO:
    """An image tensor mapped back to an image (--tensor-normalization), as PNG bytes."""
    buffer = io.BytesIO()
    to_image(read_tensor(ref), normalization).save(buffer, "PNG")
    buffer.seek(0)
    return buffer


def pooled(tensor: Any) -> Any:
    """The original script's visual feature before its L2 norm: the 8 x 8 adaptive average
    pool of the tensor (float32), per channel (flattened by the pixels encoder)."""
    import torch
    import torch.nn.functional as F

    # in C order first, as the original's batches are (torch.stack): pooling runs several
    # times faster on it, with the same values
    values = torch.from_numpy(_c_order(tensor).astype(np.float32, copy=False))
    return F.adaptive_avg_pool2d(values.unsqueeze(0), MIN_SIDE)[0]
