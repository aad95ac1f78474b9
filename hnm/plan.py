"""The plan phase: validate every input, then create or resume the run directory with its
typed plan (shard ranges on the batch grid)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm import schema
from hnm.blacklist import read_blacklist
from hnm.callbacks import Progress, no_progress
from hnm.capacity_text import dry_run_lines as capacity_lines
from hnm.config import EMBEDDING_KEYS, Config, check_joint, config_hash, has_joint_space
from hnm.data import Corpus, file_stats
from hnm.embed import check_precomputed
from hnm.encoders import BUILTIN_TEXT, BUILTIN_VISUAL, check_encoder_name, describe_encoder
from hnm.errors import HnmError
from hnm.joint import OPEN_CLIP, TIMM, check_spec
from hnm.placement import Placement, run_sizes
from hnm.plan_scan import InputSummary, summarize
from hnm.readers import reads_tensors
from hnm.sizing import IndexChoice, estimate, memory_lines
from hnm.storage import RunDir, read_json
from hnm.version import __version__

# Bumped whenever the run directory's layout or plan.json changes meaning.
PLAN_VERSION = 4
# Phrases are short: a text batch this large costs little memory, and with phrases in
# length order (embed.phrase_order) it holds few distinct token counts, so few passes.
TEXT_BATCH = 256


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
    shards: tuple[ShardPlan, ...]
    placement: Placement  # devices, workers, precision and index, decided once
    input_format: str = "json"  # as detected (hnm.readers) or given by --input-format
    input_files: int = 1
    images: str = ""  # the mined image files' fingerprint when planned (image_fingerprint)
    source: str = ""  # the annotations' digest when planned

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def precision(self) -> str:
        return self.placement.precision

    @property
    def index(self) -> IndexChoice:
        return self.placement.index

    def planned_from(self, ds: Corpus | InputSummary) -> bool:
        """Whether `ds` holds the annotations this run was planned from (their digest)."""
        return self.source == ds.source_sha256[:16]

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        shards = tuple(ShardPlan(**{**s, **{k: tuple(s[k]) for k in ("rows", "phrases",
                                                                     "anchors")}})
                       for s in data["shards"])
        if data["version"] == 3:
            data = _placed(data, shards)
        if not data.get("source"):  # planned before `source` existed (hnm 0.1), whose run
            data = {**data, "source": data["run_key"][-16:]}  # key ends with it; until 1.0
        return cls(**{**data, "version": PLAN_VERSION, "skipped": tuple(data["skipped"]),
                      "shards": shards, "placement": Placement.from_json(data["placement"])})


def _placed(data: dict[str, Any], shards: tuple[ShardPlan, ...]) -> dict[str, Any]:
    """A plan of version 3 (hnm 0.1) read as version 4: its precision, index and workers
    gathered into a placement (threads and loaders are placed again when it resumes, as
    every resumed run is). Read until hnm 1.0, so that runs started before the upgrade
    resume."""
    data = dict(data)
    data["placement"] = {
        "devices": [s.device for s in shards], "precision": data.pop("precision"),
        "precision_reason": "as planned", "index": data.pop("index", asdict(IndexChoice())),
        "workers_note": data.pop("workers_note", "")}
    return data


def read_plan(run: RunDir) -> Plan:
    """The run's plan; a damaged plan, or one of another layout version, is one line
    saying what to do."""
    again = "rerun with --overwrite to start this run again"
    data = read_json(run.plan, again, limit=None)
    version = data.get("version") if isinstance(data, dict) else None
    if version not in (3, PLAN_VERSION):  # 3: hnm 0.1's (Plan.from_json)
        raise HnmError(f"{run.plan}: written by another version of hnm (plan version "
                       f"{version}, this hnm reads {PLAN_VERSION}); {again}")
    why = schema.problem(data, schema.PLAN)
    if why is not None:
        raise HnmError(f"{run.plan}: damaged ({why}); {again}")
    try:
        return Plan.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HnmError(f"{run.plan}: damaged ({type(exc).__name__}: {exc}); {again}") from None


def make_shards(n: int, k: int, grain: int = 1, front: bool = False) -> list[tuple[int, int]]:
    """k contiguous ranges covering [0, n), boundaries on multiples of `grain`; with fewer
    blocks than ranges, the empty ranges come first, or last if `front`."""
    blocks = -(-n // grain)
    edges = [min(n, (-(-i * blocks // k) if front else i * blocks // k) * grain)
             for i in range(k)] + [n]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def shard_count(n: int, workers: int, shard_rows: int, grain: int) -> int:
    """Shards of `n` rows: one per worker, more where a shard would pass `shard_rows` rows
    (but never more than the batches: a shard holds at least one)."""
    return max(workers, min(-(-n // max(1, shard_rows)), -(-n // grain)))


def follow_inputs(ds: Corpus | InputSummary, k: int, grain: int, limit: int | None = None
                  ) -> list[tuple[int, int]]:
    """k contiguous row ranges on the batch grid whose edges are the input files' edges
    nearest an even split (snapped to the grid), so that a worker reads the images of its
    own files; an even split where there are fewer files than shards, or where following
    the files would make a range longer than `limit` rows (rounded up to the grid)."""
    n = len(ds)
    if len(ds.shard_ends) < k:
        return make_shards(n, k, grain)
    ranges = _file_edges(ds, k, grain)
    if limit is not None and max(e - s for s, e in ranges) > -(-limit // grain) * grain:
        return make_shards(n, k, grain)
    return ranges


def _file_edges(ds: Corpus | InputSummary, k: int, grain: int) -> list[tuple[int, int]]:
    n = len(ds)
    bounds = ds.rows_before(np.asarray(ds.shard_ends, np.int64))  # rows before each file's end
    edges = [0]
    for w in range(1, k):
        nearest = int(bounds[np.argmin(np.abs(bounds - w * n / k))])
        edges.append(max(edges[-1], min(n, round(nearest / grain) * grain)))
    edges.append(n)
    return list(zip(edges[:-1], edges[1:]))


def run_keys(config: Config, ds: InputSummary, precision: str) -> dict[str, str]:
    """Identity of the run's results, and of its embeddings alone: the config, the
    precision it resolved to, the annotations' bytes, the bytes of every other input file
    it names, and the size and modification time of every image file (cheap: an edited,
    added or restored image is noticed without reading it)."""
    source = ds.source_sha256[:16]  # last, where plans of hnm 0.1 kept it (Plan.from_json)
    images = ds.image_files
    embed = config_hash(config, EMBEDDING_KEYS) + precision + _digest(
        config.image_embeddings, config.text_embeddings) + images + source
    run = config_hash(config) + precision + _digest(
        config.image_embeddings, config.text_embeddings, config.blacklist) + images + source
    return {"run_key": run, "embed_key": embed}


def input_digest(config: Config) -> str:
    """The digest of the input files as they are now (what `Corpus.source_sha256` holds
    once they are read), from their bytes alone: no record is parsed."""
    from hnm.readers.files import digest, find_shards

    return digest(*find_shards(config))


def check_unchanged(config: Config, plan: Plan, ds: Any, where: Path,
                    shown: bool = False) -> None:
    """Refuse to show or export the run in `where` when its annotations or its images
    changed or vanished since it was planned (what a rerun of `mine` would notice).
    `ds`: the run's corpus (a store holds the digest of the input as planned: the input's
    files are read again). `shown`: for a page that shows the images of a run on
    precomputed embeddings, which needs none of them: every image gone is shown as gone,
    not refused."""
    if plan.source != input_digest(config)[:16]:
        raise HnmError(f"{config.annotations}: changed since the run in {where}; its "
                       "negatives no longer match the records")
    if shown and config.image_embeddings and not any(
            isinstance(p, Path) and p.is_file() for p in ds.images):
        return
    if plan.images and plan.images != image_fingerprint(ds):
        gone = next((p for p in ds.images if isinstance(p, Path) and not p.is_file()), None)
        what = f"{gone} is gone" if gone else "an image file was edited, replaced or added"
        raise HnmError(f"--image-dir {config.image_dir}: images changed since the run in "
                       f"{where} ({what}); rerun the mining command with --overwrite to mine "
                       "them again")


def image_fingerprint(ds: Any) -> str:
    """The absolute path, size and modification time of every image file the run mines,
    hashed (data.file_stats), read a block at a time: the same from whatever folder it is
    computed. Also where the images came as precomputed embeddings: an export still
    writes the image files."""
    return file_stats(p.absolute() if isinstance(p, Path) else p  # type: ignore[arg-type]
                       for p in ds.images)


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


def validate_inputs(config: Config, progress: Progress = no_progress, stage: bool = False
                    ) -> InputSummary:
    """Every input check that can fail, before anything is written: the input read a
    block at a time (`plan_scan.summarize`), what planning needs of it returned (`stage`:
    the run's store staged as it is read)."""
    check_joint(config)
    for flag, name, builtins, pre in (
            ("--visual-encoder", config.visual_encoder, BUILTIN_VISUAL,
             config.image_embeddings or config.joint_model),
            ("--text-encoder", config.text_encoder, BUILTIN_TEXT,
             config.text_embeddings or config.text_encoder == "joint")):
        if not pre:
            try:
                if name.startswith((OPEN_CLIP, TIMM)):
                    check_spec(flag, name)
                else:
                    check_encoder_name(name, builtins)
            except HnmError as exc:
                raise HnmError(f"{flag}: {exc}".replace(f"{flag}: {flag} ", f"{flag} ")) \
                    from None
    if config.joint_model:
        check_spec("--joint-model", config.joint_model)
    if config.image_dir and not config.image_embeddings and not Path(config.image_dir).is_dir() \
            and not reads_tensors(config):  # an AVDN processed dataset holds its images
        raise HnmError(f"--image-dir {config.image_dir}: not a directory")
    read_blacklist(config.blacklist)
    ds = summarize(config, progress=progress, stage=stage)
    try:
        if config.num_negatives > max(1, len(ds) - 1):  # more than the selection can find
            raise HnmError(f"--num-negatives: at most {max(1, len(ds) - 1)} (the mined "
                           f"rows other than the anchor), got {config.num_negatives}")
        dims = {flag: check_precomputed(path, flag, ds.num_records)
                for flag, path in (("--image-embeddings", config.image_embeddings),
                                   ("--text-embeddings", config.text_embeddings)) if path}
        if config.joint_space and len(set(dims.values())) > 1:
            raise HnmError("--joint-space: the image embeddings have {} dimensions, the "
                           "text embeddings {}; one space has one width".format(
                               *dims.values()))
    except BaseException:
        ds.let_go()
        raise
    return ds


def provenance(config: Config, precision: str | None = None) -> dict[str, Any]:
    """Encoder names and versions, the precision, the config hash and hnm's version."""
    visual = "precomputed: " + config.image_embeddings if config.image_embeddings \
        else describe_encoder(config.joint_model or config.visual_encoder)
    text = "precomputed: " + config.text_embeddings if config.text_embeddings \
        else describe_encoder(config.joint_model if config.text_encoder == "joint"
                              else config.text_encoder)
    return {"hnm_version": __version__, "config_hash": config_hash(config),
            "visual_encoder": visual, "text_encoder": text,
            **({"joint_space": describe_encoder(config.joint_model) if config.joint_model
                else "precomputed: one model's image and text embeddings"}
               if has_joint_space(config) else {}),
            "precision": precision or config.precision}


def new_plan(config: Config, ds: InputSummary, placement: Placement, keep: Plan | None = None
             ) -> Plan:
    """Shard ranges over rows, distinct phrases and anchors: one shard per worker of the
    placement, or more where a shard would pass --shard-rows rows (`shard_count`; the
    workers take them in turn, shard s placed on worker s % workers).

    `keep`: an earlier plan whose embeddings are kept: its row and phrase ranges and its
    batch grids are reused as they are.
    """
    devices = placement.devices
    if keep:
        rows = [s.rows for s in keep.shards]
        phrases = [s.phrases for s in keep.shards]
        batch, text_batch = keep.batch_size, keep.text_batch_size
    else:
        batch, text_batch = config.batch_size, max(config.batch_size, TEXT_BATCH)
        k = shard_count(len(ds), len(devices), config.shard_rows, batch)
        rows = follow_inputs(ds, k, batch, config.shard_rows)
        # the first shards take the phrases: the tables phase runs where shard 0 ran (the
        # first free worker, or rank 0) and finds the text encoder loaded for the blacklist
        phrases = make_shards(ds.num_phrases, k, text_batch, front=True)
    anchors = make_shards(ds.num_anchors, len(rows))
    shards = tuple(ShardPlan(s, tuple(rows[s]), tuple(phrases[s]), anchors[s],
                             devices[s % len(devices)]) for s in range(len(rows)))
    return Plan(version=PLAN_VERSION, **run_keys(config, ds, placement.precision),
                num_rows=len(ds), num_anchors=ds.num_anchors, num_phrases=ds.num_phrases,
                num_records=ds.num_records,
                skipped=tuple(ds.skipped.get("missing_image", [])), batch_size=batch,
                workdir=str(Path.cwd()), text_batch_size=text_batch, shards=shards,
                placement=placement, input_format=ds.input_format,
                input_files=max(1, len(ds.shard_ends)), images=ds.fingerprint,
                source=ds.source_sha256[:16])


def dry_run_lines(config: Config, ds: InputSummary, placement: Placement) -> list[str]:
    """What a run would do, with memory estimates, from validated inputs only."""
    devices = placement.devices
    sizes = run_sizes(config, ds, placement)
    n, u, a = sizes.rows, sizes.phrases, sizes.anchors
    shards = make_shards(a, len(devices))
    gib = 2.0**30
    return [
        f"Dry run: {ds.num_records} records, {n} candidates, {a} anchors, {u} distinct "
        f"answers, {len(ds.skipped.get('missing_image', []))} skipped",
        f"Input: {ds.input_format}, {max(1, len(ds.shard_ends))} file(s)",
        f"Shards: {len(devices)} on {', '.join(sorted(set(devices)))}: "
        + ", ".join(f"[{s}, {e})" for s, e in shards),
        f"Embeddings: images {n} x {sizes.dv} ({n * sizes.dv * 4 / gib:.3f} GiB), texts "
        f"{u} x {sizes.dt} ({u * sizes.dt * 4 / gib:.3f} GiB)",
        placement.precision_line(),
        placement.workers_line() + (f" ({placement.workers_note})"
                                     if placement.workers_note else ""),
        f"Index: {placement.index.describe()}",
        *([f"Image tensors: chunks of up to {sizes.chunk_bytes / 2**20:.1f} MiB, each "
           f"process reading images ({max(1, sizes.loaders)} per worker) holding one whole "
           "(counted in embed below)"] if sizes.chunk_bytes else []),
        *memory_lines(estimate(config, sizes, placement.index)),
        *capacity_lines(config, sizes, placement.index.kind),
        "Nothing was written.",
    ]
