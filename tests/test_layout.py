"""The layout holds together: every import of hnm in the scripts the suite does not run
(benchmarks, tools, the launcher) names a module and a name that exist, and no module of
hnm outgrows what a reader takes in at once."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("bench/*.py"), *REPO.glob("tools/*.py"), REPO / "launch.py"])
MAX_LINES = 450


def hnm_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every `import hnm...` and `from hnm... import name`, in functions
    too."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hnm":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "hnm"]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_hnm_import_of_a_script_resolves(path: Path):
    for module, name in hnm_imports(path):
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):
            importlib.import_module(f"{module}.{name}")  # a submodule, or ImportError


def test_the_import_scan_sees_imports_inside_functions(tmp_path: Path):
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from hnm.index import nowhere\n")
    (module, name), = hnm_imports(script)
    with pytest.raises(ImportError):
        importlib.import_module(f"{module}.{name}")


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {p.relative_to(REPO).as_posix(): n for p in (REPO / "hnm").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
