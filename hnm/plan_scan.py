"""The input as the launcher plans it, in bounded memory.

Planning reads the input twice, a block at a time (`data.scan`), and never holds it:

1. `summarize`, before anything is written: every check of the input, and what planning
   needs of it (`InputSummary`: the scan's facts, each mined row's record position, the
   image files' fingerprint, the largest AVDN chunk, and the few images that lie right
   in one of the run's own folders), each block let go as the next is read;
2. `write_store`, once every check passed and the run directory's lock is held: the same
   scan again (the images known good already are not checked again), its blocks written
   into the run's columnar store (`corpus_write`), which is moved in only when this pass
   found the input as the first did. An input of one short block (fewer than PLAN_BLOCK
   records) is not read again: the first pass keeps its block (`InputSummary.held`),
   which the launcher holds at that size anyway, and the store is written from it.

Between blocks the launcher holds numbers per row, no Python object per row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hnm.blocks import Block, Facts
from hnm.callbacks import Progress, no_progress
from hnm.checks import stat_line
from hnm.config import Config
from hnm.corpus_write import write_corpus
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
    # the scan's only block, where the input was one short block: the store is written
    # from it (`write_store`), then it is let go
    held: list[Block] = field(default_factory=list, compare=False, repr=False)

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

    def planned_skip(self) -> list[int]:
        """The record positions this pass left out (what the store's pass is given)."""
        return list(self.skipped.get("missing_image", []))


def summarize(config: Config, skip: list[int] | None = None,
              progress: Progress = no_progress) -> InputSummary:
    """The input read and checked a block at a time (`data.scan`: its errors, in its
    order), summed up for planning. `skip`: as `data.scan`'s (a resumed run's)."""
    reading = scan(config, skip, progress, size=PLAN_BLOCK)
    folders = {f for name in RUN_FOLDERS
               if (f := identity(Path(config.output_dir) / name)) is not None}
    inside: dict[str, bool] = {}  # an image's folder -> one of the run's (few folders)
    stats = hashlib.sha256()
    chunks: set[Path] = set()
    near: list[Path] = []
    held: list[Block] = []
    for b, block in enumerate(reading.blocks()):
        held = [block] if b == 0 and len(block.records) < PLAN_BLOCK else []
        for k in np.flatnonzero(block.keep).tolist():
            image = block.images[k]
            if isinstance(image, Path):
                stats.update(stat_line(image.absolute()))
                if folders:
                    parent = str(image.parent)
                    if parent not in inside:
                        inside[parent] = identity(parent) in folders
                    if inside[parent]:
                        near.append(image)
            elif isinstance(image, ImageRef) and holds_tensor(image):
                chunks.add(image.shard.path)
        del block
    facts = reading.facts
    assert facts is not None  # set once every block was given
    return InputSummary(
        facts, stats.hexdigest()[:16], float(max((p.stat().st_size for p in chunks), default=0)),
        tuple(near), held)


def write_store(run: RunDir, config: Config, skip: list[int],
                check: Callable[[Facts], None], planned: InputSummary | None = None) -> None:
    """The run's columnar store from a second scan of the input (`skip`: the record
    positions planned as left out, so no image is checked again); `check` is given the
    scan's facts before the store is moved in, and refuses an input that changed.
    `planned`: the first pass's summary; where it holds the input's only block, the store
    is written from that block, and the block let go."""
    if planned is not None and planned.held:
        blocks, facts = list(planned.held), planned.facts
        planned.held.clear()
        write_corpus(run, config, blocks, lambda: facts)
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
