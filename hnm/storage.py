"""The run directory: every file name, atomic writes, verified done-markers, the lock."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hnm.errors import HnmError

# phase -> the folder holding its files and markers
PHASE_DIRS = {"embed": "embeddings", "tables": "tables", "candidates": "candidates"}
# errors that mean "this place cannot be written", reported as one line, not a traceback
WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO,
                errno.ENOTDIR, errno.EISDIR)
TMP_SUFFIX = ".tmp"  # atomic_open's temporary files: ".NAME.RANDOM.tmp"


def umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cannot_write(path: Path, exc: OSError) -> HnmError:
    return HnmError(f"{path}: cannot write: {exc.strerror or exc}")


@contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary sibling of `path`, renamed over it when the block succeeds and removed
    when it fails: nothing half-written remains. The file gets the mode a plain open()
    would give it (0666 less the umask)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600 files
        os.close(fd)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in WRITE_ERRORS:
            raise cannot_write(path, exc) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """A file written through a temporary sibling, renamed over `path` when done."""
    encoding = None if "b" in mode else "utf-8"
    with _replacing(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def file_digest(path: Path) -> list[Any]:
    """[size, sha256, mtime_ns] of a file, as markers record them."""
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        return [st.st_size, hashlib.file_digest(handle, "sha256").hexdigest(), st.st_mtime_ns]


def write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str = "rerun with --overwrite to write it again") -> Any:
    """A JSON file hnm wrote; damage is one line naming the file and `what` to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HnmError(f"{path}: missing; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HnmError(f"{path}: damaged ({_reason(exc)}); {what}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON at line {exc.lineno}: {exc.msg}"
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as handle:
        np.save(handle, array, allow_pickle=False)


@contextmanager
def atomic_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> Iterator[np.ndarray]:
    """A .npy file filled in place through a memory map, renamed over `path` when done."""
    with _replacing(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_open(path) as handle:  # straight to the file: no second copy in memory
        np.savez(handle, **arrays)


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """An array hnm wrote (memory-mapped if asked); damage is one line naming the file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise HnmError(f"{path}: damaged or missing ({_reason(exc)}); rerun the mining "
                       "command (it computes it again)") from None


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise HnmError(f"{path}: damaged ({_reason(exc)}); rerun with --overwrite") from None


class RunDir:
    """Where each of a run's files lives; every phase's output is vouched for by a marker
    that records the size and checksum of each file it vouches for."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    plan = property(lambda self: self.root / "plan.json")
    negatives = property(lambda self: self.root / "negatives.jsonl")
    negatives_parquet = property(lambda self: self.root / "negatives.parquet")
    suspects = property(lambda self: self.root / "suspects.jsonl")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.html")
    sweep_html = property(lambda self: self.root / "sweep.html")
    sweep_json = property(lambda self: self.root / "sweep.json")
    done = property(lambda self: self.root / "done.json")  # the final marker: results written
    lock_file = property(lambda self: self.root / ".hnm.lock")
    logs = property(lambda self: self.root / "logs")
    tables_dir = property(lambda self: self.root / PHASE_DIRS["tables"])

    def records(self, output_format: str) -> Path:
        """Every record with its negatives, in the run's --output-format."""
        return self.negatives_parquet if output_format == "parquet" else self.negatives

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

    def mark_done(self, phase: str, shard: int | None, info: dict[str, Any],
                  files: list[Path]) -> None:
        """Written last, after the files it vouches for were renamed into place."""
        write_marker(self.marker(phase, shard), info, files, self.root)

    def read_marker(self, phase: str, shard: int | None = None) -> dict[str, Any]:
        return read_json(self.marker(phase, shard))

    def clear_phase(self, phase: str) -> None:
        folder = self.root / PHASE_DIRS[phase]
        if folder.exists():
            shutil.rmtree(folder)

    def results(self) -> tuple[Path, ...]:
        """What the reduce phase and the tools derive from a run's phases."""
        return (self.done, self.negatives, self.negatives_parquet, self.suspects,
                self.metrics, self.report, self.sweep_html, self.sweep_json)

    def remove_temporary(self) -> int:
        """Delete atomic_open's leftovers (a process killed mid-write); call under the lock."""
        gone = 0
        for path in self.root.rglob(f".*{TMP_SUFFIX}"):
            if path.is_file():
                path.unlink(missing_ok=True)
                gone += 1
        return gone


def write_marker(path: Path, info: dict[str, Any], files: list[Path], root: Path) -> None:
    """A marker: `info` plus [size, sha256, mtime] of each file it vouches for (paths from
    root)."""
    digests = {f.relative_to(root).as_posix(): file_digest(f) for f in files}
    write_json(path, {**info, "files": digests})


def verify_marker(path: Path, root: Path, checksums: bool = True) -> str | None:
    """Why the marker at `path` cannot be trusted (damaged, or a file it vouches for is
    missing, of another size or of other content), or None.

    Without `checksums`, a file is read only when its modification time changed (a copy
    of the run directory without times, or an edit): its size and time vouch for it.
    """
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        items = [(root / name, int(size), str(digest), int(mtime))
                 for name, (size, digest, mtime) in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return f"{path} is damaged ({_reason(exc)})"
    for file, size, digest, mtime in items:
        if not file.is_file():
            return f"{file} is missing"
        st = file.stat()
        if st.st_size != size:
            return f"{file} is damaged (size {st.st_size}, written {size})"
        if (checksums or st.st_mtime_ns != mtime) and file_digest(file)[1] != digest:
            return f"{file} is damaged (its checksum differs from the one written)"
    return None


@contextmanager
def run_lock(run: RunDir, notice: Callable[[str], Any], name: str = "--output-dir"
             ) -> Iterator[None]:
    """Hold OUTPUT_DIR/.hnm.lock (host and pid inside) for as long as the block runs.

    The lock is an flock on that file, which the kernel releases when its holder dies in
    any way, so a lock left by a killed run is taken over (with a notice). A second run
    meanwhile gets one line naming the holder. `name`: how messages call the directory.
    """
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        fd = _locked_fd(run, name)
    except OSError as exc:
        raise HnmError(f"{name} {run.root}: cannot write: {exc.strerror or exc}") from None
    try:
        stale = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if stale:
            notice(f"Taking over the lock of an hnm run that is gone ({_holder(stale)})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        run.lock_file.unlink(missing_ok=True)
        os.close(fd)  # closing releases the flock


def _locked_fd(run: RunDir, name: str) -> int:
    """An fd of the lock file holding its flock; raises HnmError when another run holds it."""
    while True:
        fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            raise HnmError(f"{name} {run.root}: in use by another hnm run "
                           f"({_holder(holder)}); wait for it to end, or stop it") from None
        try:  # the holder may have removed the file between our open and our flock
            if os.fstat(fd).st_ino == os.stat(run.lock_file).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(text: str) -> str:
    try:
        data = json.loads(text)
        return f"pid {data['pid']} on {data['host']}, since {data['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
