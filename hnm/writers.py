"""Writing samples (fields and image bytes) as WebDataset tar shards, Parquet files or a
Hugging Face dataset: the demo's formats, `hnm export`'s and the benchmarks'."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from hnm.errors import HnmError
from hnm.safety import Area


def tar_add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member with fixed metadata, so that the same samples give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def write_tar_shards(folder: Path, samples: Iterable[tuple[str, dict[str, bytes]]],
                     per_shard: int, area: Area | None = None) -> list[Path]:
    """(key, {extension: bytes}) samples into folder/00000.tar, 00001.tar, ... (written
    through `area`: by default the folder, created for them)."""
    area = area or Area(folder)
    area.ensure_root()
    paths = []
    for number, chunk in enumerate(chunks(samples, per_shard)):
        path = folder / f"{number:05d}.tar"
        with area.open(path) as handle, tarfile.open(fileobj=handle, mode="w",
                                                       format=tarfile.USTAR_FORMAT) as archive:
            for key, members in chunk:
                for ext, data in members.items():
                    tar_add(archive, f"{key}.{ext}", data)
        paths.append(path)
    return paths


def write_parquet_files(folder: Path, rows: Iterable[dict[str, Any]], per_file: int,
                        row_group: int) -> list[Path]:
    """Rows into folder/part-00000.parquet, ... (types inferred from each file's rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    area = Area(folder)
    area.ensure_root()
    paths = []
    for number, chunk in enumerate(chunks(rows, per_file)):
        path = folder / f"part-{number:05d}.parquet"
        with area.open(path) as handle:
            pq.write_table(pa.Table.from_pylist(chunk), handle, row_group_size=row_group)
        paths.append(path)
    return paths


def write_hf(folder: Path, rows: list[dict[str, Any]], image: str, num_shards: int) -> Path:
    """A Hugging Face dataset (`save_to_disk`) whose `image` column is an `Image` feature."""
    try:
        import datasets
    except ImportError:
        raise HnmError("writing a Hugging Face dataset needs the 'datasets' package: "
                       "pip install 'hnm[hf]'") from None
    datasets.disable_progress_bars()
    table = datasets.Dataset.from_list(rows)
    table = table.cast_column(image, datasets.Image())
    table.save_to_disk(str(folder), num_shards=num_shards)
    return folder
