"""The plan phase: validate every input, then create or resume the run directory with its
typed plan (shard ranges on the batch grid)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm import __version__
from hnm.blacklist import read_blacklist
from hnm.callbacks import Progress, no_progress
from hnm.config import EMBEDDING_KEYS, Config, config_hash, dump_yaml
from hnm.data import Dataset, file_stats, load_dataset
from hnm.embed import check_precomputed
from hnm.encoders import (
    BUILTIN_TEXT,
    BUILTIN_VISUAL,
    check_encoder_name,
    describe_encoder,
    embedding_dim,
)
from hnm.errors import HnmError
from hnm.gpus import fit_to_work
from hnm.precision import resolve
from hnm.readers import reads_tensors
from hnm.rerun import Refuse, Resume, Start, Survey, decide
from hnm.sizing import IndexChoice, Sizes, choose_index, estimate, memory_lines, work_seconds
from hnm.storage import RunDir, read_json, verify_marker

# Bumped whenever the run directory's layout or plan.json changes meaning.
PLAN_VERSION = 3
# Phrases are short: a text batch this large costs little memory, and with phrases in
# length order (embed.phrase_order) it holds few distinct token counts, so few passes.
TEXT_BATCH = 256
LEGACY_DIRS = ("index",)  # folders of older layouts, removed by --overwrite


@dataclass(frozen=True)
class ShardPlan:
    """One shard: half-open ranges of rows, distinct phrases (positions in
    embed.phrase_order) and anchors, and its device."""

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
    workdir: str  # the folder the run was started from: relative input paths start there
    text_batch_size: int  # the grid of phrases, in embed.phrase_order
    precision: str  # what the encoders compute in (fp32, bf16, fp16), resolved once
    shards: tuple[ShardPlan, ...]
    input_format: str = "json"  # as detected (hnm.readers) or given by --input-format
    input_files: int = 1
    index: IndexChoice = IndexChoice()  # the search index, chosen once for the whole run
    workers_note: str = ""  # why fewer CPU workers than cores, when the work is small
    images: str = ""  # the mined image files' fingerprint when planned (image_fingerprint)
    source: str = ""  # the annotations' digest when planned

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
    """The run's plan; a damaged plan, or one of another layout version, is one line
    saying what to do."""
    again = "rerun with --overwrite to start this run again"
    data = read_json(run.plan, again)
    version = data.get("version") if isinstance(data, dict) else None
    if version != PLAN_VERSION:
        raise HnmError(f"{run.plan}: written by another version of hnm (plan version "
                       f"{version}, this hnm reads {PLAN_VERSION}); {again}")
    try:
        return Plan.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise HnmError(f"{run.plan}: damaged ({type(exc).__name__}: {exc}); {again}") from None


def make_shards(n: int, k: int, grain: int = 1, front: bool = False) -> list[tuple[int, int]]:
    """k contiguous ranges covering [0, n), boundaries on multiples of `grain`; with fewer
    blocks than ranges, the empty ranges come first, or last if `front`."""
    blocks = -(-n // grain)
    edges = [min(n, (-(-i * blocks // k) if front else i * blocks // k) * grain)
             for i in range(k)] + [n]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def follow_inputs(ds: Dataset, k: int, grain: int) -> list[tuple[int, int]]:
    """k contiguous row ranges on the batch grid whose edges are the input files' edges
    nearest an even split (snapped to the grid), so that a worker reads the images of its
    own files; an even split where there are fewer files than workers."""
    n = len(ds)
    if len(ds.shard_ends) < k:
        return make_shards(n, k, grain)
    bounds = np.searchsorted(ds.positions, ds.shard_ends)  # rows before each file's end
    edges = [0]
    for w in range(1, k):
        nearest = int(bounds[np.argmin(np.abs(bounds - w * n / k))])
        edges.append(max(edges[-1], min(n, round(nearest / grain) * grain)))
    edges.append(n)
    return list(zip(edges[:-1], edges[1:]))


def run_keys(config: Config, ds: Dataset, precision: str) -> dict[str, str]:
    """Identity of the run's results, and of its embeddings alone: the config, the
    precision it resolved to, the annotations' bytes, the bytes of every other input file
    it names, and the size and modification time of every image file (cheap: an edited,
    added or restored image is noticed without reading it)."""
    source = ds.source_sha256[:16]  # last, where `hnm sweep` looks for it
    images = ds.image_files
    embed = config_hash(config, EMBEDDING_KEYS) + precision + _digest(
        config.image_embeddings, config.text_embeddings) + images + source
    run = config_hash(config) + precision + _digest(
        config.image_embeddings, config.text_embeddings, config.blacklist) + images + source
    return {"run_key": run, "embed_key": embed}


def check_unchanged(config: Config, plan: Plan, ds: Dataset, where: Path) -> None:
    """Refuse to show or export the run in `where` when its annotations or its images
    changed or vanished since it was planned (what a rerun of `mine` would notice)."""
    source = ds.source_sha256[:16]
    if (plan.source or plan.run_key[-16:]) != source:
        raise HnmError(f"{config.annotations}: changed since the run in {where}; its "
                       "negatives no longer match the records")
    if plan.images and plan.images != image_fingerprint(ds):
        gone = next((p for p in ds.images if isinstance(p, Path) and not p.is_file()), None)
        what = f"{gone} is gone" if gone else "an image file was edited, replaced or added"
        raise HnmError(f"--image-dir {config.image_dir}: images changed since the run in "
                       f"{where} ({what}); rerun the mining command with --overwrite to mine "
                       "them again")


def image_fingerprint(ds: Dataset) -> str:
    """The absolute path, size and modification time of every image file the run mines,
    hashed (data.file_stats): the same from whatever folder it is computed; "" where the
    images came as precomputed embeddings."""
    if not ds.image_files:
        return ""
    return file_stats([p.absolute() if isinstance(p, Path) else p for p in ds.images])


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
    if config.image_dir and not config.image_embeddings and not Path(config.image_dir).is_dir() \
            and not reads_tensors(config):  # an AVDN processed dataset holds its images
        raise HnmError(f"--image-dir {config.image_dir}: not a directory")
    read_blacklist(config.blacklist)
    ds = load_dataset(config, progress=progress)
    for flag, path in (("--image-embeddings", config.image_embeddings),
                       ("--text-embeddings", config.text_embeddings)):
        if path:
            check_precomputed(path, flag, len(ds.records))
    return ds


def provenance(config: Config, precision: str | None = None) -> dict[str, Any]:
    """Encoder names and versions, the precision, the config hash and hnm's version."""
    visual = "precomputed: " + config.image_embeddings if config.image_embeddings \
        else describe_encoder(config.visual_encoder)
    text = "precomputed: " + config.text_embeddings if config.text_embeddings \
        else describe_encoder(config.text_encoder)
    return {"hnm_version": __version__, "config_hash": config_hash(config),
            "visual_encoder": visual, "text_encoder": text,
            "precision": precision or config.precision}


def new_plan(config: Config, ds: Dataset, devices: list[str], precision: str,
             keep: Plan | None = None) -> Plan:
    """Shard ranges over rows, distinct phrases and anchors, one shard per device (CPU
    workers: no more than the rows keep busy).

    `keep`: an earlier plan whose embeddings are kept: its row and phrase ranges and its
    batch grids are reused as they are.
    """
    note = ""
    if keep:
        rows = [s.rows for s in keep.shards]
        phrases = [s.phrases for s in keep.shards]
        batch, text_batch = keep.batch_size, keep.text_batch_size
    else:
        devices, note = fit_workers(config, ds, devices)
        batch, text_batch = config.batch_size, max(config.batch_size, TEXT_BATCH)
        rows = follow_inputs(ds, len(devices), batch)
        # the first shards take the phrases: the tables phase runs where shard 0 ran (the
        # first free worker, or rank 0) and finds the text encoder loaded for the blacklist
        phrases = make_shards(len(ds.phrases), len(devices), text_batch, front=True)
    anchors = make_shards(ds.num_anchors, len(rows))
    shards = tuple(ShardPlan(s, tuple(rows[s]), tuple(phrases[s]), anchors[s],
                             devices[s % len(devices)]) for s in range(len(rows)))
    return Plan(version=PLAN_VERSION, **run_keys(config, ds, precision), num_rows=len(ds),
                num_anchors=ds.num_anchors, num_phrases=len(ds.phrases),
                num_records=len(ds.records),
                skipped=tuple(ds.skipped.get("missing_image", [])), batch_size=batch,
                workdir=str(Path.cwd()), text_batch_size=text_batch, precision=precision,
                shards=shards, input_format=ds.input_format,
                input_files=max(1, len(ds.shard_ends)),
                index=choose_index(config, len(ds), devices), workers_note=note,
                images=image_fingerprint(ds), source=ds.source_sha256[:16])


def write_plan(config: Config, run: RunDir, plan: Plan) -> None:
    """config.yaml (the resolved config, its provenance and the index chosen), then
    plan.json."""
    run.write_text(run.config, dump_yaml({**config.to_dict(),
                                          "provenance": provenance(config, plan.precision),
                                          "index_choice": dataclasses.asdict(plan.index)}))
    run.write_json(run.plan, plan.to_json())


# kept when a run is replaced: rewritten by the new plan, or appended to
KEPT = ("config.yaml", "plan.json", ".hnm-run.json", ".hnm.lock")


def remove_outputs(run: RunDir, manifest: tuple[str, ...], keep_embeddings: bool) -> None:
    """Clear what a new config invalidates: only the files the earlier run's manifest
    lists (a file of anyone else's, even inside hnm's folders, stays)."""
    for name in manifest:
        if name in KEPT or name.startswith("logs/") or \
                (keep_embeddings and name.startswith("embeddings/")):
            continue
        run.remove(run.root / name)
    for folder in ("tables", "candidates", "embeddings", *LEGACY_DIRS):
        run.remove_folder(run.root / folder)  # only where nothing else is left in it


def survey(run: RunDir) -> Survey:
    """What the output directory holds. A folder is an hnm run only by its signature
    (.hnm-run.json); one that holds a plan.json this hnm reads and its config.yaml, from
    before signatures, is adopted as one (its manifest: the layout of its plan)."""
    if not run.root.is_dir():
        return Survey()
    holds = tuple(sorted(p.name for p in run.root.iterdir() if p.name != run.lock_file.name))
    manifest = run.manifest()
    if manifest is None and not (run.plan.exists() and run.config.exists()):
        return Survey(holds)
    plan, error = None, None
    if run.plan.exists():
        try:
            plan = read_plan(run)
        except HnmError as exc:
            error = str(exc)
    if manifest is None:
        if plan is None:
            return Survey(holds)
        manifest = run.layout(len(plan.shards))
    return Survey(holds, tuple(manifest), plan, error, run.plan.exists(), run.config.exists())


def check_phases(run: RunDir, plan: Plan, say: Callable[[str], Any], checksums: bool) -> None:
    """Forget every phase output whose files are not what its marker vouches for (a
    damaged, truncated or missing file): that shard's phase runs again."""
    markers = [("embed", s.shard) for s in plan.shards] + [("tables", None)] + \
        [("candidates", s.shard) for s in plan.shards]
    for phase, shard in markers:
        path = run.marker(phase, shard)
        if path.exists() and (why := verify_marker(path, run.root, checksums)):
            what = f"shard {shard}'s {phase} output" if shard is not None else "the tables"
            say(f"{why}: computing {what} again")
            run.remove(path)


def finished(run: RunDir, say: Callable[[str], Any]) -> bool:
    """Whether the results are there and are what the final marker vouches for."""
    if not run.done.exists():
        return False
    why = verify_marker(run.done, run.root)
    if why:
        say(f"{why}: writing the results again")
        run.remove(run.done)
    return why is None


def _state(run: RunDir, plan: Plan, say: Callable[[str], Any]) -> str:
    """"complete" when the results verify (checksums) and so do the phases' files (their
    sizes and times, which `hnm sweep` reads), else "resume" with every damaged phase
    output forgotten."""
    if finished(run, say):
        check_phases(run, plan, say, checksums=False)
        if all(run.is_done(p, s.shard) for s in plan.shards for p in ("embed", "candidates")) \
                and run.is_done("tables"):
            return "complete"
        run.remove(run.done)
    check_phases(run, plan, say, checksums=True)
    return "resume"


def prepare(config: Config, devices: list[str], lock: Callable[[], Any],
            say: Callable[[str], Any], progress: Progress = no_progress
            ) -> tuple[Dataset, Plan, str]:
    """Validate inputs, then — under the run directory's lock, taken by `lock()` —
    create, resume or replace the run. Nothing is written before every check passed.

    Returns the dataset, the plan and the state: "new", "resume" or "complete".
    """
    run = RunDir(config.output_dir)
    blocker = next((p for p in (run.root, *run.root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise HnmError(f"--output-dir {config.output_dir}: {blocker} is a file, not a directory")
    before = survey(run)
    if isinstance(refused := decide(before, None, config.overwrite, config.output_dir), Refuse):
        raise HnmError(refused.message)
    old = before.plan
    ds = None
    precision = resolve(config.precision, devices).precision
    if old and config.annotations:
        # resuming the same run: its inputs were validated when it was planned, and its
        # key covers them, so the (slow) decoding of every image is not redone
        ds = load_dataset(config, list(old.skipped))
        if old.run_key != run_keys(config, ds, precision)["run_key"]:
            ds = None
    ds = ds or validate_inputs(config, progress)
    lock()
    now = survey(run)  # again, now that no other run can change it
    action = decide(now, run_keys(config, ds, precision), config.overwrite, config.output_dir)
    if isinstance(action, Refuse):
        raise HnmError(action.message)
    if (gone := run.remove_temporary()):
        say(f"Removed {gone} temporary file(s) left by an interrupted run")
    if isinstance(action, Resume):
        if run.manifest() is None:  # adopted from before signatures
            run.sign(list(now.manifest or ()))
        return ds, action.plan, _state(run, action.plan, say)
    return ds, start(config, run, ds, devices, precision, action, say), "new"


def start(config: Config, run: RunDir, ds: Dataset, devices: list[str], precision: str,
          action: Start, say: Callable[[str], Any]) -> Plan:
    """Replace what an earlier run left (only its manifest's files; its embeddings where
    `action.keep`), sign the directory with the new manifest, write the plan."""
    plan = new_plan(config, ds, devices, precision, keep=action.keep)
    run.sign(sorted(set(action.clear) | set(run.layout(len(plan.shards)))))
    if action.keep:
        check_phases(run, action.keep, say, checksums=True)
    # nothing of another run may be trusted, except embeddings of the same inputs
    remove_outputs(run, action.clear, keep_embeddings=action.keep is not None)
    write_plan(config, run, plan)
    return plan


def dry_run_lines(config: Config, ds: Dataset, devices: list[str]) -> list[str]:
    """What a run would do, with memory estimates, from validated inputs only."""
    devices = fit_workers(config, ds, devices)[0]
    sizes = run_sizes(config, ds, devices)
    n, u, a = sizes.rows, sizes.phrases, sizes.anchors
    shards = make_shards(a, len(devices))
    gib = 2.0**30
    choice = choose_index(config, n, devices)
    return [
        f"Dry run: {len(ds.records)} records, {n} candidates, {a} anchors, {u} distinct "
        f"answers, {len(ds.skipped.get('missing_image', []))} skipped",
        f"Input: {ds.input_format}, {max(1, len(ds.shard_ends))} file(s)",
        f"Shards: {len(devices)} on {', '.join(sorted(set(devices)))}: "
        + ", ".join(f"[{s}, {e})" for s, e in shards),
        f"Embeddings: images {n} x {sizes.dv} ({n * sizes.dv * 4 / gib:.3f} GiB), texts "
        f"{u} x {sizes.dt} ({u * sizes.dt * 4 / gib:.3f} GiB)",
        resolve(config.precision, devices).line(),
        f"Index: {choice.describe()}",
        *memory_lines(estimate(config, sizes, choice)),
        "Nothing was written.",
    ]


def run_sizes(config: Config, ds: Dataset, devices: list[str]) -> Sizes:
    """The sizes a run's memory depends on."""
    devices = fit_workers(config, ds, devices)[0]
    path = Path(config.annotations or "")
    return Sizes(rows=len(ds), phrases=len(ds.phrases), anchors=ds.num_anchors,
                 dv=_dim(config.image_embeddings, config.visual_encoder),
                 dt=_dim(config.text_embeddings, config.text_encoder),
                 annotation_bytes=path.stat().st_size if path.is_file() else 0,
                 workers=len(devices),
                 device="cuda" if any(d.startswith("cuda") for d in devices) else "cpu")


def fit_workers(config: Config, ds: Dataset, devices: list[str]) -> tuple[list[str], str]:
    """The devices a run keeps busy (CPU workers: as many as its work is worth and its
    batches allow, see `gpus.fit_to_work`), and why fewer than offered."""
    dv = _dim(config.image_embeddings, config.visual_encoder)
    return fit_to_work(config, devices, work_seconds(config, len(ds), len(ds.phrases), dv),
                       batches=-(-len(ds) // config.batch_size))


def _dim(precomputed: str | None, encoder: str) -> int:
    if precomputed:
        return int(np.load(precomputed, mmap_mode="r").shape[1])
    return embedding_dim(encoder)

