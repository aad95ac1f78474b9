"""The run directory: every file name, atomic writes and done-markers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# phase -> the folder holding its files and markers
PHASE_DIRS = {"embed": "embeddings", "tables": "tables", "candidates": "candidates"}


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Write to a temporary sibling, then rename over `path`; nothing half-written remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as handle:
        np.save(handle, array, allow_pickle=False)


@contextmanager
def atomic_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> Iterator[np.ndarray]:
    """A .npy file filled in place through a memory map, renamed over `path` when done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_open(path) as handle:  # straight to the file: no second copy in memory
        np.savez(handle, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class RunDir:
    """Where each of a run's files lives; every phase's output is vouched for by a marker."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    plan = property(lambda self: self.root / "plan.json")
    negatives = property(lambda self: self.root / "negatives.jsonl")
    suspects = property(lambda self: self.root / "suspects.jsonl")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.html")
    sweep_html = property(lambda self: self.root / "sweep.html")
    sweep_json = property(lambda self: self.root / "sweep.json")
    logs = property(lambda self: self.root / "logs")
    tables_dir = property(lambda self: self.root / PHASE_DIRS["tables"])

    def image_embeddings(self, shard: int) -> Path:
        return self.root / PHASE_DIRS["embed"] / f"image_{shard:05d}.npy"

    def text_embeddings(self, shard: int) -> Path:
        return self.root / PHASE_DIRS["embed"] / f"text_{shard:05d}.npy"

    def table(self, name: str) -> Path:
        """One array of the tables phase: visual, text, eligible, clusters, centroids."""
        return self.tables_dir / f"{name}.npy"

    @property
    def ivf(self) -> Path:
        """The tables phase's FAISS IVF index (runs with --index ivf)."""
        return self.tables_dir / "ivf.faiss"

    def candidates(self, shard: int) -> Path:
        return self.root / PHASE_DIRS["candidates"] / f"shard_{shard:05d}.npz"

    def log(self, shard: int | None) -> Path:
        """A shard's log; the tables phase (shard None) has its own."""
        return self.logs / ("tables.log" if shard is None else f"shard_{shard:05d}.log")

    def marker(self, phase: str, shard: int | None = None) -> Path:
        name = "done" if shard is None else f"done_{shard:05d}"
        return self.root / PHASE_DIRS[phase] / name

    def is_done(self, phase: str, shard: int | None = None) -> bool:
        return self.marker(phase, shard).exists()

    def mark_done(self, phase: str, shard: int | None = None, info: Any = None) -> None:
        """Written last, after the files it vouches for were renamed into place."""
        write_json(self.marker(phase, shard), info or {})

    def read_marker(self, phase: str, shard: int | None = None) -> dict[str, Any]:
        return read_json(self.marker(phase, shard))

    def clear_phase(self, phase: str) -> None:
        folder = self.root / PHASE_DIRS[phase]
        if folder.exists():
            shutil.rmtree(folder)

    def results(self) -> tuple[Path, ...]:
        """What the reduce phase and the tools derive from a run's phases."""
        return (self.negatives, self.suspects, self.metrics, self.report, self.sweep_html,
                self.sweep_json)
