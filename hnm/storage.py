"""The run directory: every file name, atomic writes, verified done-markers, the lock."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hnm import schema
from hnm.decoding import first_line
from hnm.errors import HnmError
from hnm.safety import Area, cannot_write, link_refused, move_in
from hnm.version import __version__

# phase -> the folder holding its files and markers
PHASE_DIRS = {"embed": "embeddings", "tables": "tables", "candidates": "candidates"}
# Every name a run directory may hold (paths from its root): the only files hnm writes
# or deletes there.
RUN_FILES = re.compile(r"""(?x)
    (config\.yaml | plan\.json | negatives\.(jsonl|parquet) | suspects\.jsonl | metrics\.json
     | report\.html | sweep\.(html|json) | done\.json | \.hnm\.lock | \.hnm-run\.json)
  | embeddings/((image|text|cross)_\d{5,}\.npy | done_\d{5,})
  | tables/((visual|text|cross|eligible|clusters|centroids)\.npy | ivf(_\d{5,})?\.faiss | done)
  | candidates/(shard_\d{5,}\.npz | done_\d{5,})
  | logs/(hnm\.log | tables\.log | shard_\d{5,}\.log | \.(crashed|held)_\w+)
  | corpus(\.new|\.old)?/(meta\.json | (records|phrases)\.arrow
                     | (positions|text_ids|groups|uniforms)\.npy)""")
CORPUS_FILES = ("meta.json", "records.arrow", "phrases.arrow", "positions.npy",
                "text_ids.npy", "groups.npy", "uniforms.npy")
SIGNATURE = "hnm run directory"  # the format marker of .hnm-run.json
# what done.json must vouch for (one name of each): the results the reduce phase writes
RESULTS = (("negatives.jsonl", "negatives.parquet"), ("suspects.jsonl",), ("metrics.json",))
SIGNATURE_VERSION = 1
TABLES = ("visual", "text", "eligible", "clusters", "centroids")


def owns_run_file(rel: str) -> bool:
    """Whether `rel` (from a run directory's root) is a name of hnm's layout."""
    return RUN_FILES.fullmatch(rel) is not None


def file_digest(path: Path) -> list[Any]:
    """[size, sha256, mtime_ns] of a file, as markers record them."""
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        return [st.st_size, hashlib.file_digest(handle, "sha256").hexdigest(), st.st_mtime_ns]


def read_json(path: Path, what: str = "rerun with --overwrite to write it again",
              shape: Any = schema.ANY, limit: int | None = schema.MAX_BYTES) -> Any:
    """A JSON file hnm wrote, of the shape `shape` describes (hnm.schema) and at most
    `limit` bytes; damage is one line naming the file and `what` to do."""
    data, why = parse_json(path, shape, limit)
    if why == "missing":
        raise HnmError(f"{path}: missing; {what}")
    if why is not None:
        raise HnmError(f"{path}: damaged ({why}); {what}")
    return data


def parse_json(path: Path, shape: Any = schema.ANY, limit: int | None = schema.MAX_BYTES
               ) -> tuple[Any, str | None]:
    """(the value, None), or (None, why it cannot be used: "missing", or the damage)."""
    try:
        if limit is not None and (size := path.stat().st_size) > limit:
            return None, f"{size:,} bytes, more than a file hnm writes holds"
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except RecursionError:
        return None, "nested too deeply"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, _reason(exc)
    why = schema.problem(data, shape)
    return (None, why) if why is not None else (data, None)


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON at line {exc.lineno}: {exc.msg}"
    return getattr(exc, "strerror", None) or first_line(str(exc))


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """An array hnm wrote (memory-mapped if asked); damage is one line naming the file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise HnmError(f"{path}: damaged or missing ({_reason(exc)}); rerun the mining "
                       "command (it computes it again)") from None


@contextmanager
def npz_members(path: Path) -> Iterator[NpzMembers]:
    """An .npz archive hnm wrote, its members read one at a time when asked for."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise HnmError(f"{path}: damaged ({_reason(exc)}); rerun with --overwrite") from None
    with data:
        yield NpzMembers(path, data)


class NpzMembers:
    """The members of an open .npz archive (`npz_members`); damage is one line naming the
    file."""

    def __init__(self, path: Path, data: Any) -> None:
        self.path, self.data = path, data
        self.names = list(data.files)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.data[name]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise HnmError(f"{self.path}: damaged ({_reason(exc)}); rerun with "
                           "--overwrite") from None


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


class RunDir(Area):
    """Where each of a run's files lives; every phase's output is vouched for by a marker
    that records the size and checksum of each file it vouches for. Every file of the run
    is written through it (`hnm.safety.Area`), and only names of the layout (RUN_FILES)."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, owns_run_file)
        self.signed = False

    def relative(self, path: str | Path) -> tuple[str, ...]:
        """Below the root, a name of the layout, and — but for the signature and the
        lock — in a folder that hnm's signature makes a run."""
        parts = super().relative(path)
        if not self.signed and "/".join(parts) not in (".hnm-run.json", ".hnm.lock"):
            if self.manifest() is None:
                raise HnmError(f"{self.root}: not an hnm run directory (it carries no hnm "
                               "signature); hnm writes nothing there")
            self.signed = True
        return parts

    def write_json(self, path: Path, data: Any) -> None:
        self.write_text(path, json_text(data))

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
    signature = property(lambda self: self.root / ".hnm-run.json")  # what makes it a run
    logs = property(lambda self: self.root / "logs")
    tables_dir = property(lambda self: self.root / PHASE_DIRS["tables"])
    corpus_dir = property(lambda self: self.root / "corpus")  # the columnar corpus
    corpus_stage = property(lambda self: self.root / "corpus.new")  # where it is built

    def discard_corpus(self, folder: Path) -> None:
        """Delete a corpus folder's files (only the store's names) and the folder."""
        for name in CORPUS_FILES:
            self.remove(folder / name)
        self.remove_folder(folder)

    def move_corpus_in(self) -> None:
        """The staged store in the place of `corpus/`, in one rename (the store it
        replaces, if any, is deleted after)."""
        stage, to = self.corpus_stage, self.corpus_dir
        for path in (stage, to):
            self.relative(path / CORPUS_FILES[0])
            if path.is_symlink():
                raise link_refused(path)
        try:
            earlier = move_in(stage, to, self.root / "corpus.old")
        except OSError as exc:
            raise cannot_write(to, exc) from None
        if earlier is not None:
            self.discard_corpus(earlier)

    def records(self, output_format: str) -> Path:
        """Every record with its negatives, in the run's --output-format."""
        return self.negatives_parquet if output_format == "parquet" else self.negatives

    def image_embeddings(self, shard: int) -> Path:
        return self.root / PHASE_DIRS["embed"] / f"image_{shard:05d}.npy"

    def text_embeddings(self, shard: int) -> Path:
        return self.root / PHASE_DIRS["embed"] / f"text_{shard:05d}.npy"

    def cross_embeddings(self, shard: int) -> Path:
        """The joint model's text embeddings, where the text rule uses another encoder."""
        return self.root / PHASE_DIRS["embed"] / f"cross_{shard:05d}.npy"

    def table(self, name: str) -> Path:
        """One array of the tables phase: visual, text, eligible, clusters, centroids."""
        return self.tables_dir / f"{name}.npy"

    @property
    def ivf(self) -> Path:
        """The tables phase's FAISS IVF index (runs with --index ivf)."""
        return self.tables_dir / "ivf.faiss"

    def ivf_part(self, part: int) -> Path:
        """The IVF index of one part of the rows (runs with --index-parts above 1)."""
        return self.tables_dir / f"ivf_{part:05d}.faiss"

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
        self.write_marker(self.marker(phase, shard), info, files)

    def read_marker(self, phase: str, shard: int | None = None) -> dict[str, Any]:
        return read_json(self.marker(phase, shard))

    def results(self) -> tuple[Path, ...]:
        """What the reduce phase and the tools derive from a run's phases."""
        return (self.done, self.negatives, self.negatives_parquet, self.suspects,
                self.metrics, self.report, self.sweep_html, self.sweep_json)

    def write_marker(self, path: Path, info: dict[str, Any], files: list[Path]) -> None:
        """A marker: `info` plus [size, sha256, mtime] of each file it vouches for (paths
        from the root)."""
        digests = {f.relative_to(self.root).as_posix(): file_digest(f) for f in files}
        self.write_json(path, {**info, "files": digests})

    def layout(self, shards: int, parts: int = 1) -> list[str]:
        """Every name a run of `shards` shards (and `parts` index parts) may write (its
        manifest), from the root."""
        names = ["config.yaml", "plan.json", "done.json", "negatives.jsonl",
                 "negatives.parquet", "suspects.jsonl", "metrics.json", "report.html",
                 "sweep.html", "sweep.json", "tables/done", "tables/ivf.faiss",
                 "logs/hnm.log", "logs/tables.log"]
        names += [f"tables/{name}.npy" for name in (*TABLES, "cross")]
        names += [f"tables/ivf_{p:05d}.faiss" for p in range(parts if parts > 1 else 0)]
        names += [f"corpus/{name}" for name in CORPUS_FILES]
        for s in range(shards):
            names += [f"embeddings/image_{s:05d}.npy", f"embeddings/text_{s:05d}.npy",
                      f"embeddings/cross_{s:05d}.npy",
                      f"embeddings/done_{s:05d}", f"candidates/shard_{s:05d}.npz",
                      f"candidates/done_{s:05d}", f"logs/shard_{s:05d}.log"]
        return names

    def sign(self, manifest: list[str]) -> None:
        """Make the folder an hnm run: hnm's format marker and version, and the names the
        run writes (what --overwrite may delete)."""
        self.write_json(self.signature, {"format": SIGNATURE, "version": SIGNATURE_VERSION,
                                         "hnm_version": __version__, "files": manifest})

    def manifest(self) -> list[str] | None:
        """The names the signature lists (only those of hnm's layout), or None where the
        folder carries no valid signature: then it is not an hnm run."""
        data, why = parse_json(self.signature, schema.SIGNATURE, 16 << 20)
        if why is not None or data["format"] != SIGNATURE:
            return None
        return [f for f in data["files"] if isinstance(f, str) and owns_run_file(f)]


def verify_marker(path: Path, root: Path, checksums: bool = True,
                  required: tuple[tuple[str, ...], ...] = ()) -> str | None:
    """Why the marker at `path` cannot be trusted (damaged, not vouching for one of each of
    `required`'s names, or a file it vouches for is missing, of another size or of other
    content), or None.

    Without `checksums`, a file is read only when its modification time changed (a copy
    of the run directory without times, or an edit): its size and time vouch for it.
    """
    data, why = parse_json(path, schema.MARKER, 64 << 20)
    if why is not None:
        return f"{path} is damaged ({why})"
    files = data["files"]
    if any(owns_run_file(name) is False or "/.." in f"/{name}" for name in files):
        return f"{path} is damaged (it names a file outside the run's layout)"
    for names in required:
        if not any(name in files for name in names):
            return f"{path} does not vouch for {names[0]}"
    items = [(root / name, size, digest, mtime) for name, (size, digest, mtime) in files.items()]
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
        run.ensure_root()
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
        run.remove(run.lock_file)
        os.close(fd)  # closing releases the flock


def _locked_fd(run: RunDir, name: str) -> int:
    """An fd of the lock file holding its flock; raises HnmError when another run holds it."""
    while True:
        fd = run.lock_fd(run.lock_file)
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
