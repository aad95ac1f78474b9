"""Folder exports built beside their target and moved in only when complete.

An export folder is written whole into a staging folder next to it (`.NAME.RANDOM.tmp`,
marked by a signature as hnm's own), signed (`.hnm-export.json`: its format and the names
it holds), then put in the target's place in one rename: an exchange where the system
offers it (the earlier export then lies in the staging folder, and is deleted), else the
earlier export moved aside first. An export that fails leaves the target as it was and
removes its staging folder; one killed leaves a staging folder that the next export to the
same target removes. An earlier export is known by its signature, never by file names:
`--overwrite` replaces only a folder signed as an hnm export holding nothing else.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hnm.errors import HnmError
from hnm.safety import TEMPORARY, Area, cannot_write, discard_folder, move_in, new_folder

SIGNATURE = ".hnm-export.json"
FORMAT = "hnm export"
MAX_SIGNATURE = 1 << 20  # bytes: a signature lists names, no more


def signed_names(folder: Path) -> list[str] | None:
    """The names an export's signature in `folder` lists, or None where there is no valid
    signature (then the folder is not an hnm export)."""
    path = folder / SIGNATURE
    try:
        if path.is_symlink() or path.stat().st_size > MAX_SIGNATURE:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    names = data.get("files")
    if not isinstance(names, list) or not all(
            isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
        return None
    return names


def check_earlier(to: Path, overwrite: bool) -> None:
    """A folder target may exist only empty, or as an earlier export (signed, holding
    nothing but the names it lists) with `overwrite`."""
    if not to.exists():
        return
    if not to.is_dir():
        raise HnmError(f"--to {to}: exists and is not an empty folder")
    names = [n for n in os.listdir(to) if not TEMPORARY.fullmatch(n)]
    if not names:
        return
    listed = signed_names(to)
    if listed is None or any(n != SIGNATURE and n not in listed for n in names):
        raise HnmError(f"--to {to}: exists and is not an empty folder or an earlier hnm "
                       f"export (one carries {SIGNATURE} and nothing else): choose another "
                       "--to")
    if not overwrite:
        raise HnmError(f"--to {to}: holds an earlier export; pass --overwrite to replace it")


@contextmanager
def staged(to: Path, owns: Callable[[str], bool], kind: str) -> Iterator[Area]:
    """An area beside `to` to build the export in; when the block succeeds it is signed
    and moved to `to` (replacing the earlier export there), when it fails it is removed."""
    stage = to.parent / f".{to.name}.{secrets.token_hex(4)}.tmp"
    try:
        if to.parent.is_dir():
            _remove_leftovers(to)
        new_folder(stage)
    except OSError as exc:
        raise cannot_write(to, exc) from None
    area = Area(stage, lambda rel: rel == SIGNATURE or owns(rel))
    try:
        area.write_text(stage / SIGNATURE, _signature([], kind, staging=True))
        yield area
        names = sorted(n for n in os.listdir(stage) if n != SIGNATURE
                       and not TEMPORARY.fullmatch(n))
        area.write_text(stage / SIGNATURE, _signature(names, kind))
        try:
            earlier = move_in(stage, to, to.parent / f".{to.name}.{secrets.token_hex(4)}.tmp")
        except OSError as exc:
            raise cannot_write(to, exc) from None
    except BaseException:
        discard_folder(stage)
        raise
    if earlier is not None:
        discard_folder(earlier)


def _signature(names: list[str], kind: str, staging: bool = False) -> str:
    data = {"format": FORMAT, "version": 1, "kind": kind, "files": names}
    return json.dumps({**data, "staging": True} if staging else data, indent=1) + "\n"


def _remove_leftovers(to: Path) -> None:
    """The staging folders an export to `to` killed mid-way left (signed by hnm)."""
    pattern = re.compile(rf"\.{re.escape(to.name)}\.[0-9a-f]{{8}}\.tmp")
    for name in os.listdir(to.parent):
        path = to.parent / name
        if pattern.fullmatch(name) and path.is_dir() and not path.is_symlink() \
                and signed_names(path) is not None:
            discard_folder(path)
