"""WebDataset tar shards: samples of members sharing a key; images read at their offsets."""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hnm.config import Fields
from hnm.decoding import reading, unique_keys
from hnm.errors import HnmError
from hnm.readers.base import SURROGATE, ImageRef, Part, Shard

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif")  # a tar sample's image: the first present
TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset: key up to the first dot


def tar_parts(shard: Shard, fields: Fields, size: int) -> Iterator[Part]:
    """Samples grouped by key (the member name up to its first dot, as WebDataset does), in
    parts of at most `size`, member by member. The image is the first of .jpg .jpeg .png
    .webp .tif; the text the .json field named by --text-field, else the .txt member; other
    fields (group, id) come from the .json. Only headers and the small text members are
    read: images stay in the file until needed."""
    path = shard.path
    records: list[dict[str, Any]] = []
    refs: list[ImageRef | None] = []
    surrogates, held, start = False, {fields.image}, 0
    with open(path, "rb") as handle:
        for key, members in _tar_samples(path):
            meta, escaped = _sample_meta(path, handle, key, members)
            surrogates |= escaped
            held.update(meta)
            record = {} if fields.id in meta else {fields.id: key}
            record.update(meta)
            if fields.text not in meta and "txt" in members:
                record[fields.text] = _member_text(path, handle, members["txt"], key)
                if fields.text == Fields.text:  # a text field the user names is a .json one
                    held.add(fields.text)
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                raise HnmError(f"{path}: sample '{key}' has no image (none of "
                               f"{', '.join('.' + e for e in IMAGE_EXTS)})")
            info = members[ext]
            ref = ImageRef(shard, info.offset_data, info.size, info.name)
            record[fields.image] = ref.key
            records.append(record)
            refs.append(ref)
            if len(records) == size:
                yield Part(records, refs, surrogates=surrogates, found=frozenset(held),
                           start=start)
                records, refs, surrogates, start = [], [], False, start + size
    if records or not start:  # an empty shard still says what it holds
        yield Part(records, refs, surrogates=surrogates, found=frozenset(held), start=start)


def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Members grouped into samples in archive order, each given once its last member was
    read; a damaged archive is one line. Headers are read one at a time and not kept."""
    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    with reading(path, "tar shard") as place:
        try:
            size = path.stat().st_size
            with tarfile.open(path, "r:") as archive:
                while (info := archive.next()) is not None:
                    archive.members.clear()  # tarfile keeps every header read: not here
                    place.where = f"member {_member_name(path, info)!r}"
                    if not info.isfile():
                        continue
                    if info.offset_data + info.size > size:
                        raise HnmError(f"{path}: truncated tar archive: member '{info.name}' "
                                       "ends past the end of the file")
                    match = TAR_KEY.match(info.name)
                    if match is None:
                        continue  # no extension: not part of a sample
                    name, ext = match.group(1), match.group(2).lower()
                    if name != key:
                        if key is not None:
                            yield key, members
                        key, members = name, {}
                    members[ext] = info
                end = archive.offset
            with open(path, "rb") as handle:
                handle.seek(end)
                marker = handle.read(tarfile.BLOCKSIZE)
        except tarfile.ReadError as exc:
            if key is None and _compressed(path):
                raise HnmError(f"{path}: a compressed tar archive; hnm reads images at their "
                               "offsets in uncompressed .tar shards: decompress it first "
                               "(e.g. gunzip)") from None
            raise HnmError(f"{path}: not a readable tar archive{_after(key)}: {exc}") from None
        except OSError as exc:
            raise HnmError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if marker != bytes(tarfile.BLOCKSIZE):  # a tar ends with zero blocks: was it cut short?
            raise HnmError(f"{path}: truncated tar archive: no end-of-archive marker"
                           f"{_after(key)}")
    if key is not None:
        yield key, members


def _member_name(path: Path, info: tarfile.TarInfo) -> str:
    """The member's name, which must be UTF-8: it becomes the image's key in every output
    (tarfile keeps other bytes as lone surrogates, which no output can hold)."""
    try:
        info.name.encode("utf-8")
    except UnicodeEncodeError:
        raw = info.name.encode("utf-8", "surrogateescape")
        raise HnmError(f"{path}: member name {raw!r} is not valid UTF-8") from None
    return info.name


# gzip, bzip2, xz and zstd files start with these bytes
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


def _compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(6).startswith(COMPRESSED_MAGIC)


def _after(key: str | None) -> str:
    return f" after sample '{key}'" if key is not None else ""


def _member(path: Path, handle: BinaryIO, info: tarfile.TarInfo) -> bytes:
    handle.seek(info.offset_data)
    data = handle.read(info.size)
    if len(data) != info.size:
        raise HnmError(f"{path}: truncated tar archive: member '{info.name}' is cut short")
    return data


def _member_text(path: Path, handle: BinaryIO, info: tarfile.TarInfo, key: str) -> str:
    try:
        return _member(path, handle, info).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HnmError(f"{path}: sample '{key}': {info.name} is not valid UTF-8 "
                       f"(byte {exc.start})") from None


def _sample_meta(path: Path, handle: BinaryIO, key: str, members: dict[str, tarfile.TarInfo]
                 ) -> tuple[dict[str, Any], bool]:
    """The sample's .json object (empty without one), and whether it escapes a surrogate."""
    if "json" not in members:
        return {}, False
    text = _member_text(path, handle, members["json"], key)
    with reading(path, "tar shard", f"sample '{key}'"):  # e.g. nested too deeply
        try:
            meta = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as exc:
            raise HnmError(f"{path}: sample '{key}': malformed JSON in {members['json'].name}: "
                           f"{exc.msg}") from None
    if not isinstance(meta, dict):
        raise HnmError(f"{path}: sample '{key}': {members['json'].name} is not an object")
    return meta, bool(SURROGATE.search(text))


# ---------------------------------------------------------------- image bytes, on demand


class TarImages:
    """`read_image` for a tar shard: a member's bytes read at its offset."""

    def __init__(self, shard: Shard) -> None:
        self.fd = os.open(shard.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def read(self, ref: ImageRef) -> bytes:
        data = os.pread(self.fd, ref.size, ref.at)  # no shared file position: thread-safe
        if len(data) != ref.size:
            raise OSError(f"{ref.shard.path}: truncated tar archive: member '{ref.member}' "
                          "is cut short")
        return data
