"""README's option table, made from the declarations in hnm/options.py.

    python tools/options_table.py          # print it
    python tools/options_table.py --write  # replace the table in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from hnm.options import markdown

README = Path(__file__).absolute().parents[1] / "README.md"
START = "<!-- options table: written by tools/options_table.py -->\n"
END = "<!-- end of options table -->\n"


def readme_table(text: str) -> str:
    """The table between README's markers."""
    return text.split(START, 1)[1].split(END, 1)[0]


def write(path: Path = README) -> None:
    text = path.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    path.write_text(before + START + markdown() + END + rest.split(END, 1)[1], encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(markdown(), end="")
