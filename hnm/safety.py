"""The data-safety contract, in one place: every file hnm writes, appends to or deletes goes
through an `Area`.

An area is a folder hnm was given (a run directory, an export's target, the demo's folder)
and the names in it that are hnm's. Through it, hnm
- writes only inside that folder, and only names the area owns;
- never through a symbolic link: every folder below the root is opened with O_NOFOLLOW,
  and a link found where hnm would write is refused in one line naming it;
- writes atomically: a temporary sibling (`.NAME.RANDOM.tmp`), renamed over the name when
  complete, removed when not; the leftovers of a killed process are removed by
  `remove_temporary` on the next run or export.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np

from hnm.errors import HnmError

# errors that mean "this place cannot be written", reported as one line, not a traceback
WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO,
                errno.ENOTDIR, errno.EISDIR)
TMP_SUFFIX = ".tmp"  # temporary files: ".NAME.RANDOM.tmp"
TEMPORARY = re.compile(r"\.(.+)\.[^./]+\.tmp")  # group 1: the name it was to become
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def cannot_write(path: Path, exc: OSError) -> HnmError:
    return HnmError(f"{path}: cannot write: {exc.strerror or exc}")


def link_refused(path: Path) -> HnmError:
    return HnmError(f"{path}: is a symbolic link; hnm never writes through a link (remove "
                    "it, or choose another directory)")


def owns_anything(rel: str) -> bool:
    """The owner of a folder hnm creates for itself (the demo's data)."""
    return True


class Area:
    """A folder hnm writes in, and which names below it are hnm's (`owns`, given the path
    relative to the root with '/' separators)."""

    def __init__(self, root: str | Path, owns: Callable[[str], bool] = owns_anything) -> None:
        self.root = Path(root)
        self.owns = owns
        # the files of the command's input that could lie here, by (device, inode): never
        # replaced, deleted or appended to, whatever name reaches them (hnm.inputs)
        self.inputs: dict[tuple[int, int], Path] = {}

    def _not_input(self, folder: int, name: str, path: Path) -> None:
        """One line naming `path` when the file there is an input of the command."""
        if not self.inputs:
            return
        try:
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) in self.inputs:
            raise HnmError(f"{path}: is an input of this run "
                           f"({self.inputs[(st.st_dev, st.st_ino)]}); hnm never deletes or "
                           "replaces an input")

    # ---- where: a path below the root, its folders opened without following links

    def relative(self, path: str | Path) -> tuple[str, ...]:
        """The parts of `path` below the root; a path elsewhere, or a name hnm does not own
        here, is refused (it would be a bug: callers name their files from the root)."""
        root, full = os.path.abspath(self.root), os.path.abspath(path)
        rel = os.path.relpath(full, root)
        parts = tuple(Path(rel).parts)
        if not parts or parts[0] in (os.pardir, os.curdir) or Path(rel).is_absolute():
            raise HnmError(f"{path}: outside {self.root}; hnm writes nowhere else")
        if not self.owns("/".join(parts)):
            raise HnmError(f"{path}: not a file hnm writes; it is left as it is")
        return parts

    def _folder(self, parts: tuple[str, ...], create: bool) -> int:
        """An fd of root/parts..., each folder below the root opened without following a
        link (created first if `create`, the root too)."""
        try:
            if create:
                self.ensure_root()
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not create:
                raise
            raise cannot_write(self.root, exc) from None
        for i, part in enumerate(parts):
            here = self.root.joinpath(*parts[:i + 1])
            try:
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                self._refuse_link(fd, part, here)
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.ENOENT and not create:
                    raise  # nothing there: the caller's business (nothing to delete)
                raise cannot_write(here, exc) from None
            except HnmError:
                os.close(fd)
                raise
            os.close(fd)
            fd = inner
        return fd

    @staticmethod
    def _refuse_link(folder: int, name: str, path: Path) -> None:
        """One line naming `path` when it is a symbolic link."""
        try:
            st = os.lstat(name, dir_fd=folder)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise link_refused(path)

    def ensure_root(self) -> None:
        """Create the root (and the folders above it) where missing; raises OSError."""
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- writing

    @contextmanager
    def open(self, path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
        """A file written through a temporary sibling, renamed over `path` when the block
        succeeds and removed when it fails: nothing half-written remains. The file gets the
        mode a plain open() would give it (0666 less the umask)."""
        parts = self.relative(path)
        folder = self._folder(parts[:-1], create=True)
        name = parts[-1]
        tmp = f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            self._refuse_link(folder, name, Path(path))
            fd = create(tmp, folder, "+" in mode)
        except OSError as exc:
            os.close(folder)
            raise cannot_write(Path(path), exc) from None
        except HnmError:
            os.close(folder)
            raise
        try:
            with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            self._refuse_link(folder, name, Path(path))
            self._not_input(folder, name, Path(path))
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError as exc:
            _unlink(tmp, folder)
            if exc.errno in WRITE_ERRORS:
                raise cannot_write(Path(path), exc) from None
            raise
        except BaseException:
            _unlink(tmp, folder)
            raise
        finally:
            os.close(folder)

    def write_bytes(self, path: str | Path, data: bytes) -> None:
        with self.open(path) as handle:
            handle.write(data)

    def write_text(self, path: str | Path, text: str) -> None:
        with self.open(path, "w") as handle:
            handle.write(text)

    def write_npy(self, path: str | Path, array: np.ndarray) -> None:
        with self.open(path) as handle:
            np.save(handle, array, allow_pickle=False)

    def write_npz(self, path: str | Path, arrays: dict[str, np.ndarray]) -> None:
        with self.open(path) as handle:  # straight to the file: no second copy in memory
            np.savez(handle, **arrays)

    @contextmanager
    def npy_rows(self, path: str | Path, rows: int) -> Iterator[NpyRows]:
        """A .npy file of `rows` rows written a block at a time as they are made (the same
        bytes as numpy.save of the whole), renamed over `path` once every row is written."""
        with self.open(path) as handle:
            out = NpyRows(handle, rows)
            yield out
            out.finish()

    @contextmanager
    def npz_members(self, path: str | Path) -> Iterator[Callable[[str, np.ndarray], None]]:
        """An .npz archive written member by member as the caller's arrays come (each
        stored as numpy.savez stores it), renamed over `path` when the block ends: the
        caller holds one member at a time, never the whole archive."""
        import zipfile

        with self.open(path) as handle, zipfile.ZipFile(
                handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            def put(name: str, array: np.ndarray) -> None:
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array),
                                              allow_pickle=False)

            yield put

    @contextmanager
    def npy(self, path: str | Path, shape: tuple[int, ...], dtype: Any) -> Iterator[np.ndarray]:
        """A .npy file filled in place through a memory map, renamed over `path` when done."""
        dtype = np.dtype(dtype)
        with self.open(path, "w+b") as handle:
            np.lib.format.write_array_header_1_0(handle, {
                "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": tuple(shape)})
            handle.flush()
            if int(np.prod(shape)) == 0:
                yield np.zeros(shape, dtype)
                return
            array = np.memmap(handle, dtype=dtype, mode="r+", offset=handle.tell(), shape=shape)
            yield array
            array.flush()
            del array

    def append(self, path: str | Path) -> int:
        """An fd appending to `path` (a log), created if missing, never through a link."""
        parts = self.relative(path)
        folder = self._folder(parts[:-1], create=True)
        try:
            self._refuse_link(folder, parts[-1], Path(path))
            self._not_input(folder, parts[-1], Path(path))
            return os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o666, dir_fd=folder)
        except OSError as exc:
            raise cannot_write(Path(path), exc) from None
        finally:
            os.close(folder)

    def lock_fd(self, path: str | Path) -> int:
        """An fd of the lock file (read and write), created if missing, never through a link."""
        parts = self.relative(path)
        folder = self._folder(parts[:-1], create=False)
        try:
            self._refuse_link(folder, parts[-1], Path(path))
            return os.open(parts[-1], os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o666, dir_fd=folder)
        finally:
            os.close(folder)

    def scratch(self, folder: str | Path) -> IO[bytes]:
        """An unnamed temporary file in `folder`, the root or a folder below it (gone when
        closed, or when hnm dies)."""
        rel = os.path.relpath(os.path.abspath(folder), os.path.abspath(self.root))
        if rel.split(os.sep)[0] == os.pardir:
            raise HnmError(f"{folder}: outside {self.root}; hnm writes nowhere else")
        parts = () if rel == os.curdir else tuple(Path(rel).parts)
        os.close(self._folder(parts, create=True))  # there, and no link on the way
        try:
            return tempfile.TemporaryFile(dir=folder, prefix=".hnm-scratch-")
        except OSError as exc:
            raise cannot_write(Path(folder), exc) from None

    # ---- deleting

    def remove(self, path: str | Path) -> bool:
        """Delete a file hnm owns here (a link there: the link, never its target)."""
        parts = self.relative(path)
        try:
            folder = self._folder(parts[:-1], create=False)
        except FileNotFoundError:
            return False
        try:
            st = os.lstat(parts[-1], dir_fd=folder)
            if stat.S_ISDIR(st.st_mode):
                return False
            self._not_input(folder, parts[-1], Path(path))
            os.unlink(parts[-1], dir_fd=folder)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(folder)

    def remove_folder(self, path: str | Path) -> bool:
        """Delete a folder below the root if it is empty (what is left in it stays)."""
        parts = tuple(Path(os.path.relpath(os.path.abspath(path),
                                           os.path.abspath(self.root))).parts)
        if not parts or parts[0] == os.pardir:
            raise HnmError(f"{path}: outside {self.root}; hnm deletes nothing there")
        try:
            folder = self._folder(parts[:-1], create=False)
        except FileNotFoundError:
            return False
        try:
            os.rmdir(parts[-1], dir_fd=folder)
            return True
        except OSError:
            return False  # missing, a link, or not empty: left as it is
        finally:
            os.close(folder)

    def remove_temporary(self, deep: bool = True) -> int:
        """Delete the temporary files of a process killed mid-write (only those of names
        this area owns; in its root alone unless `deep`); call under the lock."""
        gone = 0
        for here, folders, files in os.walk(self.root):  # never descends into links
            if not deep:
                folders.clear()
            rel = Path(here).relative_to(self.root)
            folders[:] = [f for f in folders if not os.path.islink(os.path.join(here, f))]
            for name in files:
                match = TEMPORARY.fullmatch(name)
                if match and self.owns((rel / match.group(1)).as_posix()):
                    path = Path(here) / name
                    if not path.is_symlink() and path.is_file():
                        path.unlink(missing_ok=True)
                        gone += 1
        return gone


class NpyRows:
    """The rows of a .npy array written to `handle` block by block: its header (the shape
    `rows` x the first block's columns, its dtype) when the first block comes, then each
    block's bytes; `finish` checks every row came. No block: a (0, 1) float32 array, as
    hnm writes an empty embedding table."""

    def __init__(self, handle: IO[bytes], rows: int) -> None:
        self.handle, self.rows, self.written = handle, rows, 0
        self.form: tuple[np.dtype, tuple[int, ...]] | None = None

    def add(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block)
        form = (block.dtype, block.shape[1:])
        if self.form is None:
            self.form = form
            np.lib.format.write_array_header_1_0(self.handle, {
                "descr": np.lib.format.dtype_to_descr(block.dtype), "fortran_order": False,
                "shape": (self.rows, *block.shape[1:])})
        elif form != self.form:
            raise ValueError(f"a block of {form}, after blocks of {self.form}")
        if self.written + len(block) > self.rows:
            raise ValueError(f"more than the {self.rows} rows announced")
        self.written += len(block)
        self.handle.write(block.data if block.size else b"")

    def finish(self) -> None:
        if self.form is None and not self.rows:
            self.add(np.zeros((0, 1), np.float32))
        if self.written != self.rows:
            raise ValueError(f"{self.written} rows written of the {self.rows} announced")


def new_folder(path: Path) -> None:
    """A new folder (its parents created where missing); raises OSError, FileExistsError
    where something is there already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()


def discard_folder(folder: Path) -> None:
    """Delete a folder that is hnm's own (an export's staging folder, or an earlier export
    moved into one): its files, never through a link, then the folder; what cannot go
    stays."""
    with suppress(OSError):
        for name in os.listdir(folder):
            if stat.S_ISREG(os.lstat(folder / name).st_mode):
                (folder / name).unlink()
        folder.rmdir()


def move_in(stage: Path, to: Path, aside: Path) -> Path | None:
    """Put the folder `stage` in the place of `to` in one rename; returns where what `to`
    held is now (to be discarded), or None. `to` missing or an empty folder: a rename;
    else an exchange of the two (renameat2), or where the system lacks one, `to` renamed
    to `aside` first. Raises OSError."""
    if to.is_dir() and not to.is_symlink() and not os.listdir(to):
        to.rmdir()
    if not os.path.lexists(to):
        os.rename(stage, to)
        return None
    if _exchange(stage, to):
        return stage
    os.rename(to, aside)
    os.rename(stage, to)
    return aside


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (renameat2 with RENAME_EXCHANGE, Linux 3.15+)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def create(name: str, folder: int, readable: bool) -> int:
    """A new file `name` in the folder of fd `folder` (never an existing file, never a
    link), open for writing (and reading if `readable`), mode 0666 less the umask."""
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder)


def _unlink(name: str, folder: int) -> None:
    with suppress(OSError):
        os.unlink(name, dir_fd=folder)


def scratch_file() -> IO[bytes]:
    """An unnamed temporary file in the system's temporary folder ($TMPDIR): working
    state too large for a process's own memory (`hnm.scratch`). It has no name, so it
    is gone when closed, or when hnm dies, and nothing of the user's can be reached
    through it."""
    return tempfile.TemporaryFile(prefix="hnm-")


def details_file(text: str) -> Path:
    """A new file in the system's temporary folder holding `text` (an internal error's
    details where no run directory exists yet); returns its path."""
    fd, name = tempfile.mkstemp(prefix="hnm-internal-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(name)
