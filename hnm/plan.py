"""The plan phase: validate every input, then create or resume the run directory with its
typed plan (shard ranges on the batch grid)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm import __version__
from hnm.blacklist import read_blacklist
from hnm.config import EMBEDDING_KEYS, Config, config_hash, dump_yaml
from hnm.data import Dataset, Progress, load_dataset, no_progress
from hnm.embed import check_precomputed
from hnm.encoders import (
    BUILTIN_TEXT,
    BUILTIN_VISUAL,
    check_encoder_name,
    describe_encoder,
    embedding_dim,
)
from hnm.errors import HnmError
from hnm.sizing import IndexChoice, Sizes, choose_index, estimate, memory_lines
from hnm.storage import PHASE_DIRS, RunDir, read_json, write_json, write_text

# Bumped whenever the run directory's layout or plan.json changes meaning.
PLAN_VERSION = 2
LEGACY_DIRS = ("index",)  # folders of older layouts, removed by --overwrite


@dataclass(frozen=True)
class ShardPlan:
    """One shard: half-open ranges of rows, distinct phrases and anchors, and its device."""

    shard: int
    rows: tuple[int, int]
    phrases: tuple[int, int]
    anchors: tuple[int, int]
    device: str


@dataclass(frozen=True)
class Plan:
    """What plan.json holds: the run's identity, its sizes and its shards."""

    version: int
    run_key: str  # identity of the results: config and the bytes of every input file
    embed_key: str  # identity of the embeddings alone
    num_rows: int
    num_anchors: int
    num_phrases: int
    num_records: int
    skipped: tuple[int, ...]  # record positions left out (missing images, with skip)
    batch_size: int  # the embedding batch grid, fixed when the embeddings were planned
    shards: tuple[ShardPlan, ...]
    index: IndexChoice = IndexChoice()  # the search index, chosen once for the whole run

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        shards = tuple(ShardPlan(**{**s, **{k: tuple(s[k]) for k in ("rows", "phrases",
                                                                     "anchors")}})
                       for s in data["shards"])
        index = IndexChoice(**data["index"]) if "index" in data else IndexChoice()
        return cls(**{**data, "skipped": tuple(data["skipped"]), "shards": shards,
                      "index": index})


def read_plan(run: RunDir) -> Plan:
    """The run's plan; a plan of another layout version is one line saying what to do."""
    data = read_json(run.plan)
    version = data.get("version") if isinstance(data, dict) else None
    if version != PLAN_VERSION:
        raise HnmError(f"{run.plan}: written by another version of hnm (plan version "
                       f"{version}, this hnm reads {PLAN_VERSION}); rerun with --overwrite "
                       "to start this run again")
    return Plan.from_json(data)


def make_shards(n: int, k: int, grain: int = 1) -> list[tuple[int, int]]:
    """k contiguous ranges covering [0, n), boundaries on multiples of `grain`."""
    blocks = -(-n // grain)
    edges = [min(n, (i * blocks // k) * grain) for i in range(k)] + [n]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def run_keys(config: Config, ds: Dataset) -> dict[str, str]:
    """Identity of the run's results, and of its embeddings alone: the config, the
    annotations' bytes, and the bytes of every other input file it names."""
    source = ds.source_sha256[:16]  # last, where `hnm sweep` looks for it
    embed = config_hash(config, EMBEDDING_KEYS) + _digest(
        config.image_embeddings, config.text_embeddings) + source
    run = config_hash(config) + _digest(
        config.image_embeddings, config.text_embeddings, config.blacklist) + source
    return {"run_key": run, "embed_key": embed}


def _digest(*paths: str | None) -> str:
    """Short hash of the named files' contents (editing a file in place changes it)."""
    h = hashlib.sha256()
    for path in paths:
        if path and Path(path).is_file():
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def validate_inputs(config: Config, progress: Progress = no_progress) -> Dataset:
    """Every input check that can fail, before anything is written."""
    for flag, name, builtins, pre in (
            ("--visual-encoder", config.visual_encoder, BUILTIN_VISUAL, config.image_embeddings),
            ("--text-encoder", config.text_encoder, BUILTIN_TEXT, config.text_embeddings)):
        if not pre:
            try:
                check_encoder_name(name, builtins)
            except HnmError as exc:
                raise HnmError(f"{flag}: {exc}") from None
    if config.image_dir and not config.image_embeddings and not Path(config.image_dir).is_dir():
        raise HnmError(f"--image-dir {config.image_dir}: not a directory")
    read_blacklist(config.blacklist)
    ds = load_dataset(config, progress=progress)
    for flag, path in (("--image-embeddings", config.image_embeddings),
                       ("--text-embeddings", config.text_embeddings)):
        if path:
            check_precomputed(path, flag, len(ds.records))
    return ds


def provenance(config: Config) -> dict[str, Any]:
    """Encoder names and versions, the config hash and hnm's version."""
    visual = "precomputed: " + config.image_embeddings if config.image_embeddings \
        else describe_encoder(config.visual_encoder)
    text = "precomputed: " + config.text_embeddings if config.text_embeddings \
        else describe_encoder(config.text_encoder)
    return {"hnm_version": __version__, "config_hash": config_hash(config),
            "visual_encoder": visual, "text_encoder": text}


def new_plan(config: Config, ds: Dataset, devices: list[str], keep: Plan | None = None
             ) -> Plan:
    """Shard ranges over rows, distinct phrases and anchors, one shard per device.

    `keep`: an earlier plan whose embeddings are kept: its row and phrase ranges and its
    batch grid are reused as they are.
    """
    if keep:
        rows = [s.rows for s in keep.shards]
        phrases = [s.phrases for s in keep.shards]
        batch = keep.batch_size
    else:
        batch = config.batch_size
        rows = make_shards(len(ds), len(devices), batch)
        phrases = make_shards(len(ds.phrases), len(devices), batch)
    anchors = make_shards(ds.num_anchors, len(rows))
    shards = tuple(ShardPlan(s, tuple(rows[s]), tuple(phrases[s]), anchors[s],
                             devices[s % len(devices)]) for s in range(len(rows)))
    return Plan(version=PLAN_VERSION, **run_keys(config, ds), num_rows=len(ds),
                num_anchors=ds.num_anchors, num_phrases=len(ds.phrases),
                num_records=len(ds.records),
                skipped=tuple(ds.skipped.get("missing_image", [])), batch_size=batch,
                shards=shards, index=choose_index(config, len(ds), devices))


def write_plan(config: Config, run: RunDir, plan: Plan) -> None:
    """config.yaml (the resolved config, its provenance and the index chosen), then
    plan.json."""
    write_text(run.config, dump_yaml({**config.to_dict(), "provenance": provenance(config),
                                      "index_choice": dataclasses.asdict(plan.index)}))
    write_json(run.plan, plan.to_json())


def is_complete(run: RunDir) -> bool:
    return run.metrics.exists() and run.negatives.exists()


def remove_outputs(run: RunDir, keep_embeddings: bool) -> None:
    """Clear what a new config invalidates (and folders of older layouts)."""
    for phase in PHASE_DIRS:
        if phase != "embed" or not keep_embeddings:
            run.clear_phase(phase)
    for name in LEGACY_DIRS:
        folder = run.root / name
        if folder.is_dir():
            shutil.rmtree(folder)
    for path in run.results():
        path.unlink(missing_ok=True)


def _previous(run: RunDir, config: Config) -> Plan | None:
    """The directory's plan, if it holds one this hnm reads; an older one is replaced only
    with --overwrite."""
    if not run.plan.exists():
        return None
    try:
        return read_plan(run)
    except HnmError:
        if config.overwrite:
            return None
        raise


def prepare(config: Config, devices: list[str], progress: Progress = no_progress
            ) -> tuple[Dataset, Plan, str]:
    """Validate inputs, then create or resume the run directory.

    Returns the dataset, the plan and the state: "new", "resume" or "complete".
    """
    run = RunDir(config.output_dir)
    blocker = next((p for p in (run.root, *run.root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise HnmError(f"--output-dir {config.output_dir}: {blocker} is a file, not a directory")
    old = _previous(run, config)
    if old and config.annotations:
        # resuming the same run: its inputs were validated when it was planned, and its
        # key covers their bytes, so the (slow) decoding of every image is not redone
        ds = load_dataset(config, list(old.skipped))
        if old.run_key == run_keys(config, ds)["run_key"]:
            return ds, old, "complete" if is_complete(run) else "resume"
    ds = validate_inputs(config, progress)
    keys = run_keys(config, ds)
    if old and old.run_key == keys["run_key"]:
        return ds, old, "complete" if is_complete(run) else "resume"
    if old and not config.overwrite:
        raise HnmError(f"--output-dir {config.output_dir}: holds a run with a different "
                       "config or input; pass --overwrite to replace it, or choose another "
                       "directory")
    same = bool(old) and old.embed_key == keys["embed_key"]
    if run.root.exists() and any(run.root.iterdir()):
        if not old and not config.overwrite:
            raise HnmError(f"--output-dir {config.output_dir}: exists and is not an hnm run "
                           "directory; choose another or pass --overwrite")
        # nothing of another run may be trusted, except embeddings of the same inputs
        remove_outputs(run, keep_embeddings=same)
    plan = new_plan(config, ds, devices, keep=old if same else None)
    write_plan(config, run, plan)
    return ds, plan, "new"


def dry_run_lines(config: Config, ds: Dataset, devices: list[str]) -> list[str]:
    """What a run would do, with memory estimates, from validated inputs only."""
    sizes = run_sizes(config, ds, devices)
    n, u, a = sizes.rows, sizes.phrases, sizes.anchors
    shards = make_shards(a, len(devices))
    gib = 2.0**30
    choice = choose_index(config, n, devices)
    return [
        f"Dry run: {len(ds.records)} records, {n} candidates, {a} anchors, {u} distinct "
        f"answers, {len(ds.skipped.get('missing_image', []))} skipped",
        f"Shards: {len(devices)} on {', '.join(sorted(set(devices)))}: "
        + ", ".join(f"[{s}, {e})" for s, e in shards),
        f"Embeddings: images {n} x {sizes.dv} ({n * sizes.dv * 4 / gib:.3f} GiB), texts "
        f"{u} x {sizes.dt} ({u * sizes.dt * 4 / gib:.3f} GiB)",
        f"Index: {choice.describe()}",
        *memory_lines(estimate(config, sizes, choice)),
        "Nothing was written.",
    ]


def run_sizes(config: Config, ds: Dataset, devices: list[str]) -> Sizes:
    """The sizes a run's memory depends on."""
    path = Path(config.annotations or "")
    return Sizes(rows=len(ds), phrases=len(ds.phrases), anchors=ds.num_anchors,
                 dv=_dim(config.image_embeddings, config.visual_encoder),
                 dt=_dim(config.text_embeddings, config.text_encoder),
                 annotation_bytes=path.stat().st_size if path.is_file() else 0,
                 workers=len(devices),
                 device="cuda" if any(d.startswith("cuda") for d in devices) else "cpu")


def _dim(precomputed: str | None, encoder: str) -> int:
    if precomputed:
        return int(np.load(precomputed, mmap_mode="r").shape[1])
    return embedding_dim(encoder)

