"""A run's inputs known by what they are, not by how they are spelled: files and folders
compared by device and inode, so that a second name for the same folder (a symbolic link
on the way, a bind mount, `..`) is still the input it names. No command deletes or
replaces an input of the run it works on: `hnm mine` refuses a run directory whose files
would replace one, `hnm export` a target that is one or holds one, and every write of the
run's area checks again (`hnm.safety.Area.inputs`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hnm.config import Config
from hnm.errors import HnmError
from hnm.readers import find_shards

Identity = tuple[int, int]  # (device, inode)


def identity(path: str | Path, follow: bool = True) -> Identity | None:
    """The file or folder at `path` as (device, inode); None where nothing is there."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def input_paths(config: Config, images: Iterable[Any]) -> list[Path]:
    """Every file the run reads: annotations or shards, image files, embeddings, blacklist."""
    files = [s.path for s in find_shards(config)[1]]
    files += [p for p in images if isinstance(p, Path)]
    files += [Path(p) for p in (config.image_embeddings, config.text_embeddings,
                                config.blacklist) if p]
    return files


class Inputs:
    """The files a run reads, and every folder that holds one (up to the root), by identity;
    the folders named as inputs (--image-dir, a folder of --annotations) count too.

    Held per folder, not per file: `images` (a sequence read again at will, such as a
    corpus store's column) is gone through once here, and again only for the files of a
    folder asked about that holds inputs (`files_in`)."""

    def __init__(self, config: Config, images: Iterable[Any]) -> None:
        self.images = images
        self.shards = [s.path for s in find_shards(config)[1]]  # the annotations
        self.files = input_paths(config, ())[len(self.shards):]  # embeddings, blacklist
        self.holders: dict[Identity, Path] = {}  # every folder holding an input, deep down
        self.parents: dict[str, Identity | None] = {}  # a few folders hold every image
        for path in self._paths():
            parent = str(path.parent)
            if parent not in self.parents:
                self.parents[parent] = identity(parent)
                self._holders(Path(parent), path)
        self.folders = {f for f in self.parents.values() if f is not None}
        for folder in (config.image_dir, config.annotations):
            if folder and os.path.isdir(folder):
                self._holders(Path(folder), Path(folder))

    def _paths(self) -> Iterator[Path]:
        yield from self.shards  # in `input_paths`'s order
        yield from (p for p in self.images if isinstance(p, Path))
        yield from self.files

    def _holders(self, folder: Path, example: Path) -> None:
        here = Path(os.path.realpath(folder))
        for level in (here, *here.parents):
            found = identity(level)
            if found is None or found in self.holders:
                return
            self.holders[found] = example

    def held_by(self, folder: Path) -> Path | None:
        """An input inside `folder` (or `folder` itself, named as an input), if any."""
        found = identity(folder)
        return None if found is None else self.holders.get(found)

    def files_in(self, folders: Iterable[Path]) -> dict[Identity, Path]:
        """The inputs that lie right in one of `folders`, by their identity."""
        wanted = {found for folder in folders
                  if (found := identity(folder)) is not None and found in self.folders}
        out: dict[Identity, Path] = {}
        if wanted:
            for path in self._paths():
                if self.parents.get(str(path.parent)) in wanted and \
                        (found := identity(path)) is not None:
                    out[found] = path
        return out


def refuse_inputs(area: Any, names: Iterable[str], inputs: dict[Identity, Path],
                  flag: str) -> None:
    """One line naming the first of `names` (below the area's root) that is one of
    `inputs`: a file the command would delete or replace."""
    for name in names:
        found = identity(area.root / name, follow=False)
        if found is not None and found in inputs:
            raise HnmError(f"{flag} {area.root}: {name} there is an input of this run "
                           f"({inputs[found]}); hnm never deletes or replaces an input: "
                           "choose another directory")


RUN_FOLDERS = ("", "embeddings", "tables", "candidates", "logs")  # where a run writes


def guard_run(run: Any, config: Config, images: Iterable[Any]) -> None:
    """Refuse a run directory where a file the run may write or delete (a name of hnm's
    layout that is there now) is one of the run's inputs; then let the run's area refuse
    any such write too."""
    folders = [run.root / name for name in RUN_FOLDERS]
    if not any(f.is_dir() for f in folders):
        return  # a new run directory: nothing there to replace
    found = Inputs(config, images).files_in(f for f in folders if f.is_dir())
    if found:
        names = [f"{sub}/{n}" if sub else n for sub, folder in zip(RUN_FOLDERS, folders)
                 if folder.is_dir() for n in sorted(os.listdir(folder))]
        refuse_inputs(run, [n for n in names if run.owns(n)], found, "--output-dir")
    run.inputs = found
