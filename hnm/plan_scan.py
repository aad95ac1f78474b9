"""The input as the launcher plans it, in bounded memory.

Planning reads the input once, a block at a time (`data.scan`), and never holds it:

1. `summarize`, before anything is written to the run: every check of the input, and
   what planning needs of it (`InputSummary`: the scan's facts, the image files'
   fingerprint, the largest AVDN chunk, and the few images that lie right in one of the
   run's own folders), each block let go as the next is read; where a run will need its
   columnar store, each block is also written into it as it comes, staged in unnamed
   scratch files (`corpus_write.CorpusWriter`: the run directory is not locked yet);
2. `write_store`, once every check passed and the run directory's lock is held: the
   staged store copied into the run and moved in. Where nothing was staged (a finished
   run whose store is missing), the input is scanned again into the store, which moves
   in only when this scan found the input as planned.

Between blocks the launcher holds numbers per row, no Python object per row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hnm.blocks import Facts
from hnm.callbacks import Progress, no_progress
from hnm.checks import stat_line
from hnm.config import Config
from hnm.corpus_write import CorpusWriter, write_corpus
from hnm.data import scan
from hnm.errors import HnmError
from hnm.inputs import RUN_FOLDERS, identity
from hnm.readers import ImageRef, holds_tensor
from hnm.storage import RunDir

PLAN_BLOCK = 16_384  # records a planning block holds: the launcher's own memory for them


@dataclass(frozen=True)
class InputSummary:
    """What planning needs of the input (the names of `data.Corpus` where they are the
    same things)."""

    facts: Facts
    fingerprint: str  # `plan.image_fingerprint` of the mined rows' images
    chunk_bytes: float  # the largest AVDN chunk holding a mined row's image (bytes)
    # mined rows' image files lying right in one of the run's folders (`inputs.guard_run`)
    near: tuple[Path, ...] = ()
    # the store written while the input was read (`corpus_write.CorpusWriter` into
    # scratch files, where asked): `write_store` moves it into the run, or `let_go`
    staged: list[CorpusWriter] = field(default_factory=list, compare=False, repr=False)

    def __len__(self) -> int:
        return self.facts.num_rows

    @property
    def num_records(self) -> int:
        return self.facts.num_records

    @property
    def num_phrases(self) -> int:
        return self.facts.num_phrases

    @property
    def num_anchors(self) -> int:
        return self.facts.num_anchors

    @property
    def skipped(self) -> dict[str, list[int]]:
        return self.facts.skipped

    @property
    def source_sha256(self) -> str:
        return self.facts.source_sha256

    @property
    def input_format(self) -> str:
        return self.facts.input_format

    @property
    def shard_ends(self) -> tuple[int, ...]:
        return self.facts.shard_ends

    @property
    def image_files(self) -> str:
        return self.facts.image_files

    def rows_before(self, positions: np.ndarray) -> np.ndarray:
        """The count of rows before each record position: every record not skipped is a
        row (no array of the rows' positions is held)."""
        skipped = np.sort(np.asarray(self.planned_skip(), np.int64))
        positions = np.asarray(positions, np.int64)
        return positions - np.searchsorted(skipped, positions, "left")

    def let_go(self) -> None:
        """The staged store's scratch files closed (where it was not moved in)."""
        for writer in self.staged:
            writer.abort()
        self.staged.clear()

    def planned_skip(self) -> list[int]:
        """The record positions this pass left out (what the store's pass is given)."""
        return list(self.skipped.get("missing_image", []))


def summarize(config: Config, skip: list[int] | None = None,
              progress: Progress = no_progress, stage: bool = False) -> InputSummary:
    """The input read and checked a block at a time (`data.scan`: its errors, in its
    order), summed up for planning. `skip`: as `data.scan`'s (a resumed run's).
    `stage`: the run's store written as the blocks come, into scratch files
    (`InputSummary.staged`), for `write_store` to move in."""
    reading = scan(config, skip, progress, size=PLAN_BLOCK)
    folders = {f for name in RUN_FOLDERS
               if (f := identity(Path(config.output_dir) / name)) is not None}
    inside: dict[str, bool] = {}  # an image's folder -> one of the run's (few folders)
    stats = hashlib.sha256()
    chunks: set[Path] = set()
    near: list[Path] = []
    writer = CorpusWriter(None, config) if stage else None
    cwd = os.getcwd()  # Path.absolute() asks for it again at every image
    try:
        for block in reading.blocks():
            if writer is not None:
                writer.add(block)
            for k in np.flatnonzero(block.keep).tolist():
                image = block.images[k]
                if isinstance(image, Path):
                    name = str(image)
                    stats.update(stat_line(absolute(name, image.is_absolute(), cwd)))
                    if folders:
                        parent = os.path.dirname(name) or "."  # str(image.parent)
                        if parent not in inside:
                            inside[parent] = identity(parent) in folders
                        if inside[parent]:
                            near.append(image)
                elif isinstance(image, ImageRef) and holds_tensor(image):
                    chunks.add(image.shard.path)
            del block
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    facts = reading.facts
    assert facts is not None  # set once every block was given
    return InputSummary(
        facts, stats.hexdigest()[:16],
        float(max((p.stat().st_size for p in chunks), default=0)), tuple(near),
        [writer] if writer is not None else [])


def absolute(name: str, is_absolute: bool, cwd: str) -> str:
    """str(Path(name).absolute()) with the working folder `cwd` given (a path as pathlib
    writes it: no "." part, no trailing separator)."""
    if is_absolute:
        return name
    return cwd if name == "." else os.path.join(cwd, name)


def write_store(run: RunDir, config: Config, skip: list[int],
                check: Callable[[Facts], None], planned: InputSummary | None = None) -> None:
    """The run's columnar store: where the first pass staged it (`planned.staged`), moved
    in (`check` is given that pass's facts first); else from a second scan of the input
    (`skip`: the record positions planned as left out, so no image is checked again),
    whose facts `check` is given before the store is moved in (it refuses an input that
    changed)."""
    if planned is not None and planned.staged:
        writer = planned.staged.pop()
        try:
            check(planned.facts)
        except BaseException:
            writer.abort()
            raise
        writer.finish_into(run, planned.facts)
        return
    reading = scan(config, skip, size=PLAN_BLOCK)

    def facts() -> Facts:
        assert reading.facts is not None
        check(reading.facts)
        return reading.facts

    write_corpus(run, config, reading.blocks(), facts)


def same_input(config: Config, planned: Facts) -> Callable[[Facts], None]:
    """A `write_store` check: the input is what the first pass read."""
    def check(found: Facts) -> None:
        if found != planned:
            raise HnmError(f"{config.annotations}: changed while the run was planned; run "
                           "the mining command again")
    return check
