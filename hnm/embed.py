"""Images and texts into grid-snapped embeddings (encoders from `hnm.encoders`), or
precomputed embeddings read and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hnm.data import Progress, no_progress
from hnm.encoders import ImageEncoder, TextEncoder, finalize
from hnm.errors import HnmError


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
    """Map-style dataset of preprocessed images for a torch DataLoader."""

    def __init__(self, paths: list[Path], preprocess: Any) -> None:
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                return self.preprocess(img.convert("RGB"))
        except Exception as exc:  # any decoder failure is this file's fault, not a crash
            raise HnmError(f"{self.paths[i]}: cannot decode image: {exc}") from None


def embed_images(encoder: ImageEncoder, paths: list[Path], batch_size: int, num_workers: int,
                 progress: Progress = no_progress) -> np.ndarray:
    """Grid-snapped embeddings of the image files, batch by batch in order."""
    import torch
    from torch.utils.data import DataLoader

    if not paths:
        return np.zeros((0, 1), np.float32)
    loader = DataLoader(ImageFiles(paths, encoder.preprocess), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False,
                        pin_memory=torch.device(encoder.device).type == "cuda")
    parts, done = [], 0
    with torch.inference_mode():
        for batch in loader:
            parts.append(finalize(encoder.encode(batch)))  # row by row: no float64 shard
            done += len(batch)
            progress("embed", done, len(paths))
    return np.concatenate(parts)


def embed_texts(encoder: TextEncoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Grid-snapped embeddings of `texts`, in order."""
    import torch

    if not texts:
        return np.zeros((0, 1), np.float32)
    with torch.inference_mode():
        parts = [finalize(encoder.encode(texts[s:s + batch_size]))
                 for s in range(0, len(texts), batch_size)]
    return np.concatenate(parts)


# Rows of a precomputed file snapped per step: finalize works in float64.
PRECOMPUTED_BLOCK = 1 << 16


def precomputed(path: str, positions: np.ndarray) -> np.ndarray:
    """Grid-snapped rows `positions` (record positions) of a precomputed .npy file, a block
    at a time (no float64 copy of the whole shard)."""
    source = np.load(path, mmap_mode="r")
    out = np.empty((len(positions), source.shape[1]), np.float32)
    for s in range(0, len(positions), PRECOMPUTED_BLOCK):
        out[s:s + PRECOMPUTED_BLOCK] = finalize(source[positions[s:s + PRECOMPUTED_BLOCK]])
    return out


def check_precomputed(path: str, flag: str, rows: int) -> int:
    """Row count of a precomputed embedding file must match the records; returns its dim."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise HnmError(f"{flag} {path}: cannot read a .npy array: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] < 1:
        raise HnmError(f"{flag} {path}: expected {rows} rows (one per record) x dim, "
                       f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) or not all(
            np.isfinite(arr[s:s + PRECOMPUTED_BLOCK]).all()
            for s in range(0, rows, PRECOMPUTED_BLOCK)):
        raise HnmError(f"{flag} {path}: values must be finite floats")
    return int(arr.shape[1])


def first_rows(text_ids: np.ndarray, num_phrases: int) -> np.ndarray:
    """Row of the first occurrence of each phrase."""
    first = np.full(num_phrases, -1, dtype=np.int64)
    rows = np.arange(len(text_ids))[::-1]
    first[text_ids[::-1]] = rows  # later writes win, and reversed order makes them the first
    return first
