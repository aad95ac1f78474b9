"""The readers package stays below the rest of hnm: its modules import only base modules
and each other, at module level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

READERS = Path(__file__).absolute().parents[1] / "hnm" / "readers"
BASE = {"hnm.config", "hnm.errors", "hnm.decoding", "hnm.pickles"}


def hnm_imports(source: str) -> set[str]:
    """Every hnm module the code imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hnm")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hnm"):
            found |= {f"{node.module}.{alias.name}" if node.module == "hnm" else node.module
                      for alias in node.names}
    return found


def outside(module: str) -> bool:
    return module not in BASE and not module.startswith("hnm.readers")


@pytest.mark.parametrize("path", sorted(READERS.glob("*.py")), ids=lambda p: p.name)
def test_readers_import_only_base_modules_and_each_other(path: Path):
    assert sorted(filter(outside, hnm_imports(path.read_text(encoding="utf-8")))) == []


@pytest.mark.parametrize(("code", "found"), [
    ("from hnm.readers.base import Shard", set()),
    ("from hnm import pickles", set()),
    ("def f():\n    from hnm.avdn import export", {"hnm.avdn"}),
    ("import hnm.storage", {"hnm.storage"}),
    ("from hnm import outputs, errors", {"hnm.outputs"})])
def test_the_scan_sees_an_upward_import(code, found):
    assert set(filter(outside, hnm_imports(code))) == found
