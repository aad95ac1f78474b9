"""The reduce phase: one ordered selection pass over every shard's candidates, then the
run's outputs — negatives.jsonl, suspects.jsonl, report.html and, last, metrics.json."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm import engine, report, testpoints
from hnm.callbacks import Progress, no_progress
from hnm.config import Config
from hnm.corpus import ColumnarCorpus
from hnm.corpus_images import duplicate_images
from hnm.engine import Candidates, make_selector, select_negatives
from hnm.metrics import Metrics, phrase_diversity_vs_data
from hnm.outputs import RecordWriter
from hnm.plan import Plan, provenance
from hnm.storage import RunDir, npz_members
from hnm.tables import load_arrays


@dataclass(frozen=True)
class ShardWork:
    """What one shard's workers reported in their markers."""

    device: str
    seconds: float
    peak_rss_mb: float | None
    zero_embeddings: int  # all-zero rows its encoders produced
    startup: float = 0.0  # loading models in the process that embedded it (0: loaded before)
    data_wait: float = 0.0  # of its embed_images seconds, those the model waited for data


def read_work(run: RunDir, plan: Plan) -> tuple[dict[str, float], list[ShardWork]]:
    """Seconds per phase (summed over shards) and each shard's work, from the markers."""
    phases = {"startup": 0.0, "embed_images": 0.0, "data_wait": 0.0, "embed_texts": 0.0,
              "search": 0.0}
    shards = []
    for part in plan.shards:
        embed = run.read_marker("embed", part.shard)
        mined = run.read_marker("candidates", part.shard)
        for key, marker in (("startup", embed), ("embed_images", embed), ("data_wait", embed),
                            ("embed_texts", embed), ("search", mined)):
            phases[key] += marker.get(key, 0.0)
        shards.append(ShardWork(
            device=mined.get("device", part.device),
            seconds=embed.get("embed_images", 0.0) + embed.get("embed_texts", 0.0)
            + mined.get("search", 0.0),
            peak_rss_mb=max(embed.get("peak_rss_mb", 0.0), mined.get("peak_rss_mb", 0.0)),
            zero_embeddings=embed.get("zero_embeddings", 0),
            startup=embed.get("startup", 0.0), data_wait=embed.get("data_wait", 0.0)))
    tables = run.read_marker("tables")
    phases.update(tables=tables.get("tables", 0.0), cluster=tables.get("cluster", 0.0))
    phases["startup"] += tables.get("startup", 0.0)
    if "index" in tables:  # an IVF index was trained
        phases["index"] = tables["index"]
    return phases, shards


def index_summary(run: RunDir, plan: Plan) -> dict[str, Any]:
    """The search index the run used, why, and (IVF) the recall measured in the tables
    phase."""
    out: dict[str, Any] = dataclasses.asdict(plan.index)
    if plan.index.ivf:
        out["recall"] = run.read_marker("tables").get("recall")
    return out


def reduce_phase(config: Config, run: RunDir, ds: ColumnarCorpus, plan: Plan,
                 timing: dict[str, float], progress: Progress = no_progress,
                 started: float | None = None) -> dict[str, Any]:
    """Select and audit, write the outputs, then metrics.json (written last: the run is
    done). `timing`: seconds of the phases before; `started`: perf_counter() at the start
    of this invocation, for its wall time."""
    t0 = time.perf_counter()
    tab = load_arrays(run, ds, config)
    u = ds.anchor_uniforms(config.seed, range(ds.num_anchors))
    selector = make_selector(config, tab, ds.phrases)
    parts, selected, written = [], 0, 0.0
    # a shard's lists are read and judged a window at a time, and each window's records
    # and suspects are written as its picks come: no list or pick is held past its window
    with ExitStack() as files, RecordWriter(config, run, ds, progress) as out:
        shards = ((np.arange(*s.anchors), windows(files, run.candidates(s.shard)))
                  for s in plan.shards)
        for done in select_negatives(config, selector, shards, u):
            t = time.perf_counter()
            out.shard(done.anchors, done.picks, done.outcomes, done.suspects)
            written += time.perf_counter() - t
            selected += len(done.picks)
            progress("select", selected, ds.num_anchors)
            if done.last:
                shard = plan.shards[len(parts)].shard
                parts.append(done.metrics)
                files.close()  # the shard's candidate file
                testpoints.reach("reduce", at=(run.logs, shard))
        t = time.perf_counter()
    t1 = time.perf_counter()
    written += t1 - t
    phases, work = read_work(run, plan)
    timing = {**timing, **phases, "select": t1 - t0 - written, "write": written}
    wall = time.perf_counter() - started if started is not None else sum(timing.values())
    metrics = metrics_document(config, ds, plan, parts, work, timing, wall)
    metrics["index"] = index_summary(run, plan)
    report.write_report(run, config, metrics, plan, ds)
    run.write_json(run.metrics, metrics)
    run.write_marker(run.done, {}, [run.records(config.output_format), run.suspects,
                                    run.report, run.metrics])
    return metrics


def windows(files: ExitStack, path: Path) -> Iterator[Candidates]:
    """A candidate file's lists, engine.REDUCE_WINDOW anchors (or a block more) at a time, each
    read when the one before has been judged; the file stays open in `files`."""
    members = files.enter_context(npz_members(path))
    held: list[Candidates] = []
    for block in Candidates.from_file(members):
        held.append(block)
        if sum(map(len, held)) >= engine.REDUCE_WINDOW:
            yield Candidates.concat(held)
            held = []
    if held:
        yield Candidates.concat(held)


def read_candidates(path: Path) -> Candidates:
    """A shard's candidate lists, whole."""
    with npz_members(path) as members:
        return Candidates.concat(list(Candidates.from_file(members)))


def metrics_document(config: Config, ds: ColumnarCorpus, plan: Plan, parts: list[Metrics],
                     work: list[ShardWork], timing: dict[str, float], wall: float
                     ) -> dict[str, Any]:
    """Global figures from merged counts, never averages of per-shard averages."""
    total = sum(parts, start=Metrics())
    summary = total.summary()
    summary["distinct_answers"] = len(ds.phrases)
    summary["phrase_diversity_vs_data"] = phrase_diversity_vs_data(summary, len(ds.phrases))
    summary["skipped_missing_image"] = len(ds.skipped.get("missing_image", []))
    summary["records"] = len(ds.records)
    summary["candidates"] = len(ds)
    summary["duplicate_images"] = duplicate_images(ds)
    summary["zero_embeddings"] = sum(w.zero_embeddings for w in work)
    shards = [{"shard": s.shard, "device": w.device, **m.shard_summary(),
               "seconds": round(w.seconds, 3), "peak_rss_mb": w.peak_rss_mb,
               "startup_seconds": round(w.startup, 3),
               "data_wait_seconds": round(w.data_wait, 3)}
              for s, w, m in zip(plan.shards, work, parts)]
    wall = round(wall, 3)  # the throughput is the figures' own: anchors / wall_seconds
    return {"global": summary,
            "timing": {k: round(v, 3) for k, v in timing.items()},
            "wall_seconds": wall,
            "throughput_anchors_per_s": round(ds.num_anchors / wall, 2) if wall else None,
            "shards": shards, "provenance": provenance(config, plan.precision)}
