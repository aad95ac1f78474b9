"""README's "Past one machine" table, made by the capacity planner (`hnm plan`) itself.

    python tools/capacity_table.py          # print it
    python tools/capacity_table.py --write  # replace the table in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from hnm import capacity
from hnm.cli import build_parser, plan_shape

README = Path(__file__).absolute().parents[1] / "README.md"
START = "<!-- capacity table: written by tools/capacity_table.py -->\n"
END = "<!-- end of capacity table -->\n"
# Machines of 8 GPUs of 80 GB and 1 TiB of memory, CLIP-sized image embeddings and
# MiniLM-sized texts, the index in as few parts as fit.
MACHINE = "--image-dim 512 --text-dim 384 --gpus-per-rank 8 --host-memory 1T --gpu-memory 80G " \
    "--parts auto"
SCENARIOS = (f"--rows 1M --ranks 1 {MACHINE}", f"--rows 100M --ranks 4 {MACHINE}",
             f"--rows 1B --ranks 16 {MACHINE}")
HEAD = ("| rows | machines × GPUs | index | parts | launcher (private) | worker (private) | "
        "GPU | machine 0 (private) | disk | fits |\n|---|---|---|---|---|---|---|---|---|---|\n")


def markdown() -> str:
    """The commands, then a row per size and index: peak private memory of the launcher,
    of a worker and of machine 0, each GPU's peak, the run directory's disk."""
    commands = "```bash\n" + "".join(f"hnm plan {args}\n" for args in SCENARIOS) + "```\n"
    rows = []
    for args in SCENARIOS:
        shape = plan_shape(build_parser().parse_args(["plan", *args.split()]))
        for est in capacity.plan(shape):
            a = capacity.amount
            rows.append(f"| {shape.rows:,} | {shape.ranks} × {shape.gpus_per_rank} | "
                        f"{est.index} | {est.parts:,} | {a(est.peak('launcher'))} | "
                        f"{a(est.peak('worker'))} | {a(est.gpu())} | {a(est.machine)} | "
                        f"{a(sum(est.disk.values()))} | "
                        f"{'no: ' + '; '.join(est.problems) if est.problems else 'yes'} |\n")
    return commands + "\n" + HEAD + "".join(rows)


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
