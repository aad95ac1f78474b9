"""The capacity planner's report (`hnm.capacity.plan`): lines for `hnm plan` and
`hnm mine --dry-run`, tables fitting the terminal, and the same as JSON."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from typing import Any

from hnm.capacity import (
    COMPRESSED,
    INDEXES,
    Estimate,
    Shape,
    amount,
    chosen,
    code_bytes,
    nlist,
    plan,
    remedies,
)
from hnm.columns import tables
from hnm.config import Config
from hnm.parts import index_parts
from hnm.sizing import Sizes

DEFAULT_RECORD_BYTES = 300  # where the input's size per record is not known (folders)


def describe(shape: Shape) -> str:
    """The shape in one line."""
    s = shape
    on = f"{s.gpus_per_rank} GPU(s)" if s.gpus_per_rank else f"{s.cpu_workers} CPU worker(s)"
    return (f"{s.rows:,} rows ({s.phrases:,} distinct texts, records of {s.record_bytes:,} "
            f"bytes), {s.image_dim}-d images, {s.text_dim}-d texts, on {s.ranks} machine(s) "
            f"x {on}: {s.ranks * s.workers:,} worker(s)")


def index_text(shape: Shape, est: Estimate) -> str:
    """An index choice in words."""
    lists = f", {nlist(shape):,} lists" if est.index != "exact" else ""
    codes = " (compressed codes, rescored exactly)" if est.index in COMPRESSED else ""
    row = code_bytes(est.index, shape.image_dim, getattr(shape.config, "pq_bytes", None))
    row = f", {row:,.0f} bytes a row"
    return f"{est.index}{codes}{lists}{row}, {est.parts:,} part(s)"


def lines(shape: Shape, estimates: list[Estimate], width: int = 100, hint: bool = True
          ) -> list[str]:
    """The report of `hnm plan` and `hnm mine --dry-run`: memory per process, disk, what
    fits."""
    names = [e.index for e in estimates]
    gpu = shape.gpus_per_rank > 0
    labels = ["phase and process", "per machine"]
    for name in names:
        labels += [f"{name} private", f"{name} mapped"] + ([f"{name} GPU"] if gpu else [])
    rows = []
    for i, p in enumerate(estimates[0].processes):
        row = [f"{p.phase} {p.process}", f"{p.count:,}"]
        for e in estimates:
            q = e.processes[i]
            row += [amount(q.private), amount(q.mapped)] + \
                ([amount(q.gpu) if q.gpu else "-"] if gpu else [])
        rows.append(row)
    rows.append(["machine 0, at once", ""] + sum(
        ([amount(e.machine), ""] + ([""] if gpu else []) for e in estimates), []))
    out = [f"Plan for {describe(shape)}",
           *(f"Index: {index_text(shape, e)}" for e in estimates),
           "Memory per process (private: its own pages; mapped: file pages it may touch, "
           "shared and paged by the kernel):"]
    for table in tables(labels, rows, 2, width):
        out += ["  " + line for line in table]
    disk = [[kind] + [amount(e.disk[kind]) for e in estimates]
            for kind in estimates[0].disk]
    disk.append(["total"] + [amount(sum(e.disk.values())) for e in estimates])
    out.append("Disk of the run directory:")
    for table in tables(["files"] + names, disk, 1, width):
        out += ["  " + line for line in table]
    if shape.host_memory is None and shape.gpu_memory is None:
        return out + hint * ["Nothing checked: give --host-memory (and --gpu-memory) to see what "
                      "fits."]
    for name, e in zip(names, estimates):
        out += [f"{name}: {p}" for p in e.problems] or [f"{name}: fits"]
    return out + remedies(shape, chosen(shape, estimates))


def to_json(shape: Shape, estimates: list[Estimate]) -> dict[str, Any]:
    """The report for machines: the shape, each index choice's bytes, what would fit."""
    return {"shape": {k: v for k, v in asdict(shape).items() if k != "config"},
            "estimates": [e.to_json() for e in estimates],
            "remedies": remedies(shape, chosen(shape, estimates))}


def run_shape(config: Config, sizes: Sizes, index: str) -> Shape:
    """The shape of a planned run (`hnm mine --dry-run`): its rows, phrases, widths,
    workers and index on this one machine."""
    gpus = sizes.workers if sizes.device == "cuda" else 0
    rows = max(1, sizes.rows)
    return Shape(rows=rows, image_dim=sizes.dv, text_dim=sizes.dt, gpus_per_rank=gpus,
                 cpu_workers=max(1, sizes.workers), loaders=sizes.loaders,
                 parts=index_parts(config.index_parts, rows),
                 index=index if index in INDEXES else "auto",
                 distinct_texts=sizes.phrases / rows,
                 record_bytes=max(1, round(sizes.annotation_bytes / rows))
                 if sizes.annotation_bytes else DEFAULT_RECORD_BYTES,
                 anchors=sizes.anchors,
                 encoders=not (config.image_embeddings and config.text_embeddings),
                 config=config)


def dry_run_lines(config: Config, sizes: Sizes, index: str, width: int | None = None
                  ) -> list[str]:
    """The planner's lines for a run's real input, as `hnm plan` prints them (tables as
    wide as the terminal)."""
    shape = run_shape(config, sizes, index)
    width = width or shutil.get_terminal_size((100, 24)).columns
    return ["Capacity (as hnm plan models it):"] + [
        "  " + line for line in lines(shape, plan(shape), width - 2, hint=False)[1:]]
