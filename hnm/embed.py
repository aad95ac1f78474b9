"""Images and texts into grid-snapped embeddings (encoders from `hnm.encoders`), or
precomputed embeddings read and checked."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hnm.callbacks import Progress, no_progress
from hnm.data import image_limit, too_large
from hnm.decoding import reading
from hnm.encoders import ImageEncoder, TextEncoder
from hnm.errors import HnmError
from hnm.grid import finalize, grid_scale
from hnm.miner import text_lengths
from hnm.process import loader_worker_init
from hnm.readers import ImageRef, holds_tensor, image_stream, read_tensor
from hnm.testpoints import reach

# On CPU a batch goes through the model this many images at a time: the feature maps of a
# few images stay in the caches, and EfficientNet-Lite0 then runs about twice as fast on
# one core as with 64 at a time (bench/bench_embed.py). The passes sit on the global batch
# grid, so an embedding still never depends on the shard that computed it.
CPU_ROWS_PER_PASS = 4
LOADER_ADVICE = "This DataLoader will create"  # torch's warning about the worker count


def torch_setup(device: str) -> Any:
    """Settings that make an embedding independent of the process that computed it."""
    import torch

    torch.manual_seed(0)
    if device == "cpu":
        # CPU kernels split reductions by thread count: one thread per worker process
        # keeps embeddings bitwise identical for any --cpu-workers
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(device)


class ImageFiles:
    """Map-style dataset of preprocessed images for a torch DataLoader: image files, or
    images held as bytes in shards (each loader process reads its own).

    `draft_size`: a JPEG at least twice this size in both directions is decoded at a
    half, quarter or eighth of its size (libjpeg's DCT scaling, PIL's draft mode): far less
    work, and the same pixels wherever the file is decoded with the same encoder.
    """

    def __init__(self, paths: list[Path | ImageRef], preprocess: Any, max_pixels: int,
                 draft_size: int | None = None, from_tensor: Any = None) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.from_tensor = from_tensor  # image tensor -> encoder input (tensor_input)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        if holds_tensor(self.paths[i]):
            return self.from_tensor(read_tensor(self.paths[i]))
        try:
            with image_limit(self.max_pixels), Image.open(image_stream(self.paths[i])) as img:
                if (why := too_large(img, self.max_pixels)):
                    raise ValueError(why)
                if self.draft_size:
                    img.draft("RGB", (self.draft_size, self.draft_size))
                return self.preprocess(img.convert("RGB"))
        except Exception as exc:  # any decoder failure is this file's fault, not a crash
            raise HnmError(f"{self.paths[i]}: cannot decode image: {exc}") from None


def tensor_input(encoder: ImageEncoder, normalization: str) -> Any:
    """How an image tensor becomes the encoder's input: its own way (pixels: pooled as the
    original script pools it), else mapped back to an image and preprocessed as usual."""
    own = getattr(encoder, "preprocess_tensor", None)
    return own or partial(_tensor_image, encoder.preprocess, normalization)


def _tensor_image(preprocess: Any, normalization: str, tensor: Any) -> Any:
    from hnm.readers.avdn import to_image

    return preprocess(to_image(tensor, normalization))


def embed_images(encoder: ImageEncoder, paths: list[Path], batch_size: int, num_workers: int,
                 max_pixels: int, progress: Progress = no_progress,
                 normalization: str = "imagenet") -> tuple[np.ndarray, float]:
    """Grid-snapped embeddings of the image files (or image tensors), batch by batch in
    order, and the seconds the model waited for decoded batches."""
    waited = [0.0]
    parts = list(image_batches(encoder, paths, batch_size, num_workers, max_pixels, progress,
                               normalization, waited))
    return (np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)), waited[0]


def image_batches(encoder: ImageEncoder, paths: list[Path], batch_size: int,
                  num_workers: int, max_pixels: int, progress: Progress = no_progress,
                  normalization: str = "imagenet", waited: list[float] | None = None
                  ) -> Iterator[np.ndarray]:
    """`embed_images` a batch at a time: each batch's grid-snapped embeddings as soon as
    they are made (a caller writes them, holding one batch); the seconds the model waited
    for decoded batches are added to `waited[0]`."""
    import torch
    from torch.utils.data import DataLoader

    if not paths:
        return
    waited = [0.0] if waited is None else waited
    quiet_loader_deaths()
    images = ImageFiles(paths, encoder.preprocess, max_pixels, encoder.draft_size,
                        tensor_input(encoder, normalization))
    rows = CPU_ROWS_PER_PASS if torch.device(encoder.device).type == "cpu" else batch_size
    done = 0
    with warnings.catch_warnings():
        # the loader processes are hnm's choice (--num-workers, or sized from the cores):
        # torch's advice about them, printed on a machine of few cores, is noise there
        warnings.filterwarnings("ignore", LOADER_ADVICE, UserWarning)
        # pinned host memory lets the copy to the GPU run without blocking (non_blocking)
        loader = DataLoader(images,
                            batch_size=batch_size, num_workers=num_workers, shuffle=False,
                            pin_memory=torch.device(encoder.device).type == "cuda",
                            worker_init_fn=loader_worker_init if num_workers else None)
        asked = time.perf_counter()
        batches = iter(loader)
        for batch in batches:
            waited[0] += time.perf_counter() - asked
            # snapped pass by pass: no float64 copy of the batch
            with torch.inference_mode():
                block = np.concatenate([finalize(encoder.encode(part))
                                        for part in batch.split(rows)])
            done += len(batch)
            progress("embed", done, len(paths))
            reach("embed-batch", partial(progress, "embed", done, len(paths)),
                  facts=lambda: {"loaders": [w.pid for w in getattr(batches, "_workers", ())]})
            yield block
            asked = time.perf_counter()


def phrase_order(phrases: Sequence[str]) -> np.ndarray:
    """The order phrases are embedded in: by length (stable), so that a batch holds few
    distinct token counts, and the encoder (which never pads: texts of one count go through
    it together) makes few, large passes. The order is global, like the batch grid: which
    phrases share a batch never depends on the shards."""
    return np.argsort(text_lengths(phrases), kind="stable")


def quiet_loader_deaths() -> None:
    """Keep torch from installing its SIGCHLD handler, which raises "DataLoader worker is
    killed" inside whatever code runs when one dies — even the clean-up of a run being
    stopped by SIGTERM. A dead loader worker is still reported, by the DataLoader's own
    liveness check, as an ordinary error of the task (which is then retried)."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True


def embed_texts(encoder: TextEncoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Grid-snapped embeddings of `texts`, in order."""
    parts = list(text_batches(encoder, texts, batch_size))
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def text_batches(encoder: TextEncoder, texts: list[str], batch_size: int
                 ) -> Iterator[np.ndarray]:
    """`embed_texts` a batch at a time, each batch's embeddings as soon as they are made."""
    import torch

    for s in range(0, len(texts), batch_size):
        with torch.inference_mode():
            block = finalize(encoder.encode(texts[s:s + batch_size]))
        yield block


# Rows of a precomputed file snapped per step: finalize works in float64, with two
# temporaries (8,192 rows of 512 dimensions: about 100 MB; the snap is row by row, so the
# block size changes no value).
PRECOMPUTED_BLOCK = 1 << 13


def precomputed_blocks(path: str, positions: np.ndarray) -> Iterator[np.ndarray]:
    """Grid-snapped rows `positions` (record positions) of a precomputed .npy file, a block
    of PRECOMPUTED_BLOCK rows at a time (a caller writes each and holds one block, never
    the shard; no float64 copy of more than a block)."""
    source = np.load(path, mmap_mode="r")
    for s in range(0, len(positions), PRECOMPUTED_BLOCK):
        yield finalize(source[positions[s:s + PRECOMPUTED_BLOCK]])


def load_precomputed(path: str, flag: str) -> np.ndarray:
    """A precomputed embedding file, memory-mapped: a .npy array of numbers (never
    unpickled); a damaged file or a .npz archive is one line naming the flag and file."""
    with reading(f"{flag} {path}", "a .npy array"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "pickle" not in str(exc) and "Python objects" not in str(exc):
                raise
            raise HnmError(f"{flag} {path}: an array of Python objects, which hnm never "
                           "unpickles: save the embeddings as floats") from None
    if not isinstance(arr, np.ndarray):  # np.load opens a .npz archive as an NpzFile
        arr.close()
        raise HnmError(f"{flag} {path}: a .npz archive; give a single .npy array "
                       "(numpy.save)")
    return arr


def normalisable(block: np.ndarray) -> np.ndarray:
    """Whether each row, as `grid.finalize` normalises it, comes out finite and not all
    zeros, found without snapping the rows: from the row's float64 norm (computed as
    finalize computes it) and its largest component, divided and rounded as finalize
    divides and rounds it (finite and not zero: every component is finite; the largest
    rounds to zero only when every one does)."""
    with np.errstate(all="ignore"):
        x = np.asarray(block, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1)
        largest = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x))
        unit = largest / np.where(norms > 0, norms, 1.0)
        return np.isfinite(norms) & (np.round(unit * grid_scale(x.shape[1])) != 0)


def check_precomputed(path: str, flag: str, rows: int) -> int:
    """Row count of a precomputed embedding file must match the records; returns its dim."""
    arr = load_precomputed(path, flag)
    if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] < 1:
        raise HnmError(f"{flag} {path}: expected {rows} rows (one per record) x dim, "
                       f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise HnmError(f"{flag} {path}: values must be finite floats")
    zero = []  # checked a block at a time: no copy of the whole file in memory
    for s in range(0, rows, PRECOMPUTED_BLOCK):
        block = np.asarray(arr[s:s + PRECOMPUTED_BLOCK])
        if not np.isfinite(block).all():
            raise HnmError(f"{flag} {path}: values must be finite floats")
        zero += (s + np.flatnonzero(~block.any(axis=1))).tolist()
        lost = np.flatnonzero(block.any(axis=1) & ~normalisable(block))
        if len(lost):  # overflows to inf or underflows to zero once squared
            raise HnmError(f"{flag} {path}: row {s + int(lost[0])} cannot be normalised "
                           "(its values are too large or too small for float64); scale "
                           "the embeddings")
    if len(zero):
        shown = ", ".join(map(str, zero[:5])) + (" ..." if len(zero) > 5 else "")
        raise HnmError(f"{flag} {path}: {len(zero)} row(s) are all zeros (rows {shown}); "
                       "an embedding needs a direction: give those records real embeddings "
                       "or leave them out")
    return int(arr.shape[1])


def first_rows(text_ids: np.ndarray, num_phrases: int) -> np.ndarray:
    """Row of the first occurrence of each phrase."""
    first = np.full(num_phrases, -1, dtype=np.int64)
    rows = np.arange(len(text_ids))[::-1]
    first[text_ids[::-1]] = rows  # later writes win, and reversed order makes them the first
    return first
