"""Images and texts into grid-snapped embeddings (encoders from `hnm.encoders`), or
precomputed embeddings read and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hnm.data import Progress, image_limit, no_progress, too_large
from hnm.encoders import ImageEncoder, TextEncoder, finalize
from hnm.errors import HnmError
from hnm.process import loader_worker_init
from hnm.readers import ImageRef, image_stream


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
    images held as bytes in shards (each loader process reads its own)."""

    def __init__(self, paths: list[Path | ImageRef], preprocess: Any, max_pixels: int) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        try:
            with image_limit(self.max_pixels), Image.open(image_stream(self.paths[i])) as img:
                if (why := too_large(img, self.max_pixels)):
                    raise ValueError(why)
                return self.preprocess(img.convert("RGB"))
        except Exception as exc:  # any decoder failure is this file's fault, not a crash
            raise HnmError(f"{self.paths[i]}: cannot decode image: {exc}") from None


def embed_images(encoder: ImageEncoder, paths: list[Path], batch_size: int, num_workers: int,
                 max_pixels: int, progress: Progress = no_progress) -> np.ndarray:
    """Grid-snapped embeddings of the image files, batch by batch in order."""
    import torch
    from torch.utils.data import DataLoader

    if not paths:
        return np.zeros((0, 1), np.float32)
    quiet_loader_deaths()
    loader = DataLoader(ImageFiles(paths, encoder.preprocess, max_pixels), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False,
                        pin_memory=torch.device(encoder.device).type == "cuda",
                        worker_init_fn=loader_worker_init if num_workers else None)
    parts, done = [], 0
    with torch.inference_mode():
        for batch in loader:
            parts.append(encoder.encode(batch))
            done += len(batch)
            progress("embed", done, len(paths))
    return finalize(np.concatenate(parts))


def quiet_loader_deaths() -> None:
    """Keep torch from installing its SIGCHLD handler, which raises "DataLoader worker is
    killed" inside whatever code runs when one dies — even the clean-up of a run being
    stopped by SIGTERM. A dead loader worker is still reported, by the DataLoader's own
    liveness check, as an ordinary error of the task (which is then retried)."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True


def embed_texts(encoder: TextEncoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Grid-snapped embeddings of `texts`, in order."""
    import torch

    if not texts:
        return np.zeros((0, 1), np.float32)
    with torch.inference_mode():
        parts = [encoder.encode(texts[s:s + batch_size])
                 for s in range(0, len(texts), batch_size)]
    return finalize(np.concatenate(parts))


def precomputed(path: str, positions: np.ndarray) -> np.ndarray:
    """Grid-snapped rows `positions` (record positions) of a precomputed .npy file."""
    return finalize(np.load(path, mmap_mode="r")[positions])


def check_precomputed(path: str, flag: str, rows: int) -> int:
    """Row count of a precomputed embedding file must match the records; returns its dim."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise HnmError(f"{flag} {path}: cannot read a .npy array: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] < 1:
        raise HnmError(f"{flag} {path}: expected {rows} rows (one per record) x dim, "
                       f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise HnmError(f"{flag} {path}: values must be finite floats")
    zero = np.flatnonzero(~np.any(arr, axis=1))
    if len(zero):
        shown = ", ".join(map(str, zero[:5].tolist())) + (" ..." if len(zero) > 5 else "")
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
