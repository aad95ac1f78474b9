"""An image's bytes, read from its shard when needed (files are kept open per
process, a few at a time)."""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from hnm.readers.avdn import ChunkImages
from hnm.readers.base import ImageRef, Shard
from hnm.readers.hf import ArrowImages
from hnm.readers.parquet import ParquetImages
from hnm.readers.webdataset import TarImages

# Shards kept open by one process: enough for a batch that spans shards, few enough to
# stay far below the open-file limit however many shards the input has.
OPEN_SHARDS = 16
# (process, shard path) -> reader, least recently used first; keyed by process because a
# forked DataLoader worker must open its own handles.
_open: OrderedDict[tuple[int, Path], Any] = OrderedDict()


def _opened(shard: Shard) -> Any:
    key = (os.getpid(), shard.path)
    if key in _open:
        _open.move_to_end(key)
    else:
        while len(_open) >= OPEN_SHARDS:
            (pid, _), reader = _open.popitem(last=False)
            if pid == os.getpid():
                reader.close()
        _open[key] = OPENERS[shard.fmt](shard)
    return _open[key]


# each shard format holding images: what opens a shard, whose `read(ref)` gives an image's
# bytes and `close()` lets the shard go
OPENERS: dict[str, Callable[[Shard], Any]] = {
    "webdataset": TarImages, "parquet": ParquetImages, "hf": ArrowImages,
    "avdn": ChunkImages}


def read_image(ref: ImageRef) -> bytes | None:
    """An image's bytes (None: the row holds no image). Fast read in input order; random
    order is fast too, except in Parquet, where it restarts the column's stream."""
    return _opened(ref.shard).read(ref)


def holds_tensor(source: Path | ImageRef) -> bool:
    """Whether the image is a tensor (an AVDN processed dataset's item), not encoded bytes."""
    return isinstance(source, ImageRef) and source.shard.fmt == "avdn"


def payload(source: Path | ImageRef) -> Path | bytes | None:
    """What PIL decodes: the file's path, or the image's bytes read from its shard."""
    return source if isinstance(source, Path) else read_image(source)


def image_stream(source: Path | ImageRef) -> Path | BinaryIO:
    """An image file's path, or its bytes in memory: what `PIL.Image.open` takes."""
    data = payload(source)
    if data is None:
        raise OSError("the row holds no image")
    return data if isinstance(data, Path) else io.BytesIO(data)
