"""The phases that run once: plan the shards, build the index, reduce into the outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hnm import __version__, audit, report
from hnm.blacklist import read_blacklist
from hnm.config import EMBEDDING_KEYS, Config, config_hash, dump_yaml
from hnm.data import Dataset, Progress, anchor_uniforms, load_dataset, no_progress, normalize
from hnm.encoders import (
    BUILTIN_TEXT,
    BUILTIN_VISUAL,
    check_encoder_name,
    describe_encoder,
    embedding_dim,
)
from hnm.errors import HnmError
from hnm.index import build_index, kmeans
from hnm.metrics import Metrics
from hnm.miner import MARGIN, Ragged, Tables, eligible_phrases, farthest
from hnm.select import Pick, Rules, Selector
from hnm.storage import RunDir, atomic_open, read_json, read_npz, write_json, write_npy, write_text
from hnm.worker import check_precomputed, embed_texts, load_tables, mine_candidates

PLAN_VERSION = 1


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


def write_plan(config: Config, run: RunDir, ds: Dataset, num_shards: int,
               devices: list[str], grain: int, keep: list[dict] | None = None
               ) -> dict[str, Any]:
    """Shard ranges over rows, distinct phrases and anchors; written with the config.

    `keep`: an earlier plan's shards whose embeddings are kept: their row and phrase
    ranges are reused as they are (they were cut on that run's batch grid).
    """
    if keep:
        num_shards = len(keep)
        rows = [tuple(s["rows"]) for s in keep]
        phrases = [tuple(s["phrases"]) for s in keep]
    else:
        rows = make_shards(len(ds), num_shards, grain)
        phrases = make_shards(len(ds.phrases), num_shards, grain)
    anchors = make_shards(ds.num_anchors, num_shards)
    plan = {
        "version": PLAN_VERSION, **run_keys(config, ds), "num_rows": len(ds),
        "num_anchors": ds.num_anchors, "num_phrases": len(ds.phrases),
        "num_records": len(ds.records), "skipped": ds.skipped.get("missing_image", []),
        "shards": [{"shard": s, "rows": rows[s], "phrases": phrases[s], "anchors": anchors[s],
                    "device": devices[s % len(devices)]} for s in range(num_shards)],
    }
    write_text(run.config, dump_yaml({**config.to_dict(), "provenance": provenance(config)}))
    write_json(run.plan, plan)
    return plan


def index_phase(config: Config, run: RunDir, ds: Dataset, num_shards: int,
                device: str = "cpu") -> dict[str, float]:
    """Concatenate all embeddings; eligibility and k-means clusters, computed once."""
    t0 = time.perf_counter()
    # a shard can hold no rows (more workers than batches): its arrays are empty
    V = np.concatenate([e for s in range(num_shards)
                        if len(e := np.load(run.image_embeddings(s)))])
    T = np.concatenate([e for s in range(num_shards)
                        if len(e := np.load(run.text_embeddings(s)))])
    eligible = eligible_phrases(T, ds.phrases, _blacklist_vectors(config, device),
                                config.min_answer_length, config.blacklist_similarity)
    eligible &= ~_exact_blacklisted(config, ds)
    t1 = time.perf_counter()
    labels, centroids = kmeans(V, config.n_clusters, config.seed)
    t2 = time.perf_counter()
    d = run.index_dir
    for name, array in (("visual", V), ("text", T), ("eligible", eligible),
                        ("clusters", labels), ("centroids", centroids)):
        write_npy(d / f"{name}.npy", array)
    info = {"index": t1 - t0, "cluster": t2 - t1}
    run.mark_done("index", None, info)
    return info


def _blacklist_vectors(config: Config, device: str) -> np.ndarray | None:
    """Blacklist embeddings from the text encoder (precomputed texts: exact matches only,
    since their embedding space is unknown)."""
    phrases = [normalize(p) for p in read_blacklist(config.blacklist)]
    if not phrases or config.text_embeddings:
        return None
    return embed_texts(config.text_encoder, phrases, device, config.batch_size)


def _exact_blacklisted(config: Config, ds: Dataset) -> np.ndarray:
    """Precomputed text embeddings: blacklisted phrases are matched exactly instead."""
    if not config.text_embeddings:
        return np.zeros(len(ds.phrases), bool)
    banned = {normalize(p) for p in read_blacklist(config.blacklist)}
    return np.array([p in banned for p in ds.phrases], dtype=bool)


def unpack_candidates(z: dict[str, np.ndarray]) -> tuple[Ragged, Ragged, np.ndarray]:
    """Flat candidate arrays back into (hard, diverse, diverse_complete)."""
    lists = [Ragged(z[f"{k}_offsets"], z[f"{k}_rows"], z[f"{k}_vis"], z[f"{k}_txt"])
             for k in ("hard", "diverse")]
    return lists[0], lists[1], z["diverse_complete"]


def mine_arrays(config: Config, tab: Tables, phrases: list[str], u: np.ndarray,
                num_anchors: int) -> list[list[Pick]]:
    """The whole engine on in-memory arrays: candidates, then the selection pass."""
    anchors = np.arange(num_anchors)
    arrays, _ = mine_candidates(config, tab, anchors,
                                diverse_first=u[:num_anchors] < config.diverse_ratio)
    hard, diverse, complete = unpack_candidates(arrays)
    selector = make_selector(config, tab, phrases)
    picks = selector.run(anchors, u[:num_anchors], hard, diverse, complete, Metrics())
    return audit.audit_picks(config, anchors, u[:num_anchors], picks, Metrics(), tab.text_ids,
                             phrases).picks


class Widener:
    """Exact wider diverse lists for anchors whose saved list ran out of free candidates.

    A list does not depend on the phrase state, so it is computed for a block of upcoming
    anchors at once: one matrix product for the block costs far less than one
    memory-bound matrix-vector product per anchor, and anchors that exhaust their lists
    tend to come in runs (the same far-away phrases get used up).
    """

    def __init__(self, tab: Tables, first_pool: int, device: str = "cpu", block: int = 64
                 ) -> None:
        self.first_pool = first_pool
        # rows are gathered often: in memory rather than memory-mapped
        self.tab = dataclasses.replace(tab, V=np.asarray(tab.V), T=np.asarray(tab.T))
        self.device = device
        self.block = block
        self.pool_rows = np.flatnonzero(tab.eligible)
        self.index: Any = None
        self.cache: dict[int, tuple[int, Any, bool]] = {}  # anchor -> (pool, list, complete)

    def __call__(self, anchor: int, pool: int) -> tuple[Any, bool]:
        hit = self.cache.get(anchor)
        if hit is None or hit[0] < pool:
            self._compute(anchor, pool)
            hit = self.cache[anchor]
        return hit[1], hit[2]

    def _compute(self, anchor: int, pool: int) -> None:
        if self.index is None:
            self.index = build_index(np.asarray(self.tab.V[self.pool_rows]), self.device)
        # anchors are selected in row order: earlier entries are never asked for again
        self.cache = {a: v for a, v in self.cache.items() if a >= anchor}
        # a second widening of one anchor is rare: only the first is worth computing ahead
        ahead = self.block if pool <= self.first_pool else 1
        block = np.arange(anchor, min(anchor + ahead, len(self.tab.V)))
        block = block[[self.cache.get(a, (0,))[0] < pool for a in block.tolist()]]
        lists, complete = farthest(self.index, self.pool_rows, self.tab, block, pool)
        for i, a in enumerate(block.tolist()):
            self.cache[a] = (pool, lists.get(i), bool(complete[i]))


def make_selector(config: Config, tab: Tables, phrases: list[str], device: str = "cpu"
                  ) -> Selector:
    """The selection pass, with an exact wider search for exhausted diverse lists."""
    rules = Rules(config.cosine_threshold, config.min_visual_similarity, config.diverse_ratio,
                  config.fallback_phrase_reuse_limit, config.num_negatives)
    return Selector(tab, phrases, rules, config.sliding_window_size,
                    Widener(tab, 4 * config.diverse_pool, device),
                    config.diverse_pool)


def select_all(config: Config, run: RunDir, ds: Dataset, plan: dict, u: np.ndarray,
               progress: Progress = no_progress) -> tuple[list[list[Pick]], list[Metrics]]:
    """Walk every shard's anchors in input order through one selector."""
    tab = load_tables(run, ds)
    selector = make_selector(config, tab, ds.phrases)
    picks: list[list[Pick]] = []
    parts = []
    for part in plan["shards"]:
        hard, diverse, complete = unpack_candidates(read_npz(run.candidates(part["shard"])))
        anchors = np.arange(*part["anchors"])
        metrics = Metrics()
        picks += selector.run(anchors, u[anchors], hard, diverse, complete, metrics)
        parts.append(metrics)
        progress("select", len(picks), ds.num_anchors)
    return picks, parts


def negative_record(config: Config, ds: Dataset, pick: Pick) -> dict[str, Any]:
    """SPEC §8: what one negative carries (similarities rounded to 6 decimals)."""
    record = ds.records[ds.positions[pick.row]]
    out = {"id": ds.ids[pick.row], "text": record[config.fields.text],
           "image": record[config.fields.image], "type": pick.kind,
           "text_similarity": round(pick.txt, 6), "visual_similarity": round(pick.vis, 6),
           "suspect": audit.is_suspect(config, pick)}
    if pick.kind == "hard":
        out["threshold_step"] = pick.step
    else:
        out["anchor_cluster"] = pick.anchor_cluster
        out["negative_cluster"] = pick.negative_cluster
    return out


def write_negatives(config: Config, run: RunDir, ds: Dataset, picks: list[list[Pick]],
                    progress: Progress = no_progress) -> None:
    """Every input record, unchanged and in input order, plus its `negatives`."""
    by_position = {int(ds.positions[a]): p for a, p in enumerate(picks)}
    with atomic_open(run.negatives, "w") as handle:
        for pos, record in enumerate(ds.records):
            negs = [negative_record(config, ds, p) for p in by_position.get(pos, [])]
            handle.write(json.dumps({**record, "negatives": negs}, ensure_ascii=False) + "\n")
            if pos % 5000 == 0:
                progress("write", pos, len(ds.records))
    progress("write", len(ds.records), len(ds.records))


def reduce_phase(config: Config, run: RunDir, ds: Dataset, plan: dict,
                 timing: dict[str, float], progress: Progress = no_progress,
                 started: float | None = None) -> dict[str, Any]:
    """Select, audit, write negatives.jsonl, suspects.jsonl and report.html, then
    metrics.json (written last: the run is done). `started`: perf_counter() at the start
    of this invocation, for its wall time."""
    t0 = time.perf_counter()
    u = anchor_uniforms(ds.ids[:ds.num_anchors], config.seed)  # drawn once, used by both
    picks, parts = select_all(config, run, ds, plan, u, progress)
    picks, parts, suspects = audit.audit_run(config, ds, plan, picks, parts, u)
    t1 = time.perf_counter()
    write_negatives(config, run, ds, picks, progress)
    audit.write_suspects(config, run, ds, suspects)
    timing.update(select=t1 - t0, write=time.perf_counter() - t1)
    wall = time.perf_counter() - started if started is not None else sum(timing.values())
    metrics = metrics_document(config, ds, plan, parts, timing, wall)
    report.write_report(run, config, metrics, plan)
    write_json(run.metrics, metrics)
    return metrics


def metrics_document(config: Config, ds: Dataset, plan: dict, parts: list[Metrics],
                     timing: dict[str, float], wall: float) -> dict[str, Any]:
    """Global figures from merged counts, never averages of per-shard averages."""
    total = sum(parts, start=Metrics())
    summary = total.summary()
    summary["distinct_answers"] = len(ds.phrases)
    summary["phrase_diversity_vs_data"] = round(summary["distinct_negative_phrases"]
                                                / len(ds.phrases), 6)
    summary["skipped_missing_image"] = len(ds.skipped.get("missing_image", []))
    summary["records"] = len(ds.records)
    summary["candidates"] = len(ds)
    summary["duplicate_images"] = audit.duplicate_images(ds.images)
    shards = [{"shard": s["shard"], "device": s["device"], **m.shard_summary(),
               "seconds": round(s.get("seconds", 0.0), 3),
               "peak_rss_mb": s.get("peak_rss_mb")}
              for s, m in zip(plan["shards"], parts)]
    return {"global": summary,
            "timing": {k: round(v, 3) for k, v in timing.items()},
            "wall_seconds": round(wall, 3),
            "throughput_anchors_per_s": round(ds.num_anchors / wall, 2) if wall else None,
            "shards": shards, "provenance": provenance(config)}


def phase_timing(run: RunDir, plan: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase, summed over shards, from the markers; also records on the plan
    each shard's actual device and seconds for the per-shard metrics."""
    out = {"embed_images": 0.0, "embed_texts": 0.0, "search": 0.0}
    for part in plan["shards"]:
        embed = read_json(run.marker("embed", part["shard"]))
        mined = read_json(run.marker("candidates", part["shard"]))
        out["embed_images"] += embed.get("embed_images", 0.0)
        out["embed_texts"] += embed.get("embed_texts", 0.0)
        out["search"] += mined.get("search", 0.0)
        part["device"] = mined.get("device", part["device"])
        part["peak_rss_mb"] = max(embed.get("peak_rss_mb", 0.0), mined.get("peak_rss_mb", 0.0))
        part["seconds"] = sum(embed.get(k, 0.0) for k in ("embed_images", "embed_texts")) \
            + mined.get("search", 0.0)
    index = read_json(run.marker("index"))
    out["index"] = index.get("index", 0.0)
    out["cluster"] = index.get("cluster", 0.0)
    return out


def dry_run_lines(config: Config, ds: Dataset, devices: list[str]) -> list[str]:
    """What a run would do, with memory estimates, from validated inputs only."""
    dv = _dim(config.image_embeddings, config.visual_encoder)
    dt = _dim(config.text_embeddings, config.text_encoder)
    n, u, a = len(ds), len(ds.phrases), ds.num_anchors
    shards = make_shards(a, len(devices))
    per_anchor = (min(config.k_nn, n) + config.diverse_pool + 2 * MARGIN) * 24
    gib = 2.0**30
    return [
        f"Dry run: {len(ds.records)} records, {n} candidates, {a} anchors, {u} distinct "
        f"answers, {len(ds.skipped.get('missing_image', []))} skipped",
        f"Shards: {len(devices)} on {', '.join(sorted(set(devices)))}: "
        + ", ".join(f"[{s}, {e})" for s, e in shards),
        f"Embeddings: images {n} x {dv} ({n * dv * 4 / gib:.3f} GiB), texts {u} x {dt} "
        f"({u * dt * 4 / gib:.3f} GiB)",
        f"Index: exact inner product, {2 * n * dv * 4 / gib:.3f} GiB per worker (all rows + "
        f"the eligible pool); candidates about {a * per_anchor / gib:.3f} GiB on disk",
        "Nothing was written.",
    ]


def _dim(precomputed: str | None, encoder: str) -> int:
    if precomputed:
        return int(np.load(precomputed, mmap_mode="r").shape[1])
    return embedding_dim(encoder)


def previous_plan(run: RunDir) -> dict[str, Any] | None:
    return read_json(run.plan) if run.plan.exists() else None


def is_complete(run: RunDir) -> bool:
    return run.metrics.exists() and run.negatives.exists()


def remove_outputs(run: RunDir, keep_embeddings: bool) -> None:
    """Clear phases that a new config invalidates."""
    for phase in (("index", "candidates") if keep_embeddings else
                  ("embed", "index", "candidates")):
        run.clear_phase(phase)
    derived = ("report.html", "suspects.jsonl", "sweep.html", "sweep.json")  # of the old run
    for path in (run.negatives, run.metrics, *(run.root / name for name in derived)):
        path.unlink(missing_ok=True)


def prepare(config: Config, num_shards: int, devices: list[str], grain: int,
            progress: Progress = no_progress) -> tuple[Dataset, dict[str, Any], str]:
    """Validate inputs, then create or resume the run directory. Returns (ds, plan, state)."""
    run = RunDir(config.output_dir)
    blocker = next((p for p in (run.root, *run.root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise HnmError(f"--output-dir {config.output_dir}: {blocker} is a file, not a directory")
    old = previous_plan(run)
    if old and config.annotations:
        # resuming the same run: its inputs were validated when it was planned, and its
        # key covers their bytes, so the (slow) decoding of every image is not redone
        ds = load_dataset(config, old.get("skipped", []))
        if old.get("run_key") == run_keys(config, ds)["run_key"]:
            return ds, old, "complete" if is_complete(run) else "resume"
    ds = validate_inputs(config, progress)
    keys = run_keys(config, ds)
    if old and old.get("run_key") == keys["run_key"]:
        return ds, old, "complete" if is_complete(run) else "resume"
    if old and not config.overwrite:
        raise HnmError(f"--output-dir {config.output_dir}: holds a run with a different "
                       "config or input; pass --overwrite to replace it, or choose another "
                       "directory")
    same = bool(old) and old.get("embed_key") == keys["embed_key"]
    if run.root.exists() and any(run.root.iterdir()):
        if not old and not config.overwrite:
            raise HnmError(f"--output-dir {config.output_dir}: exists and is not an hnm run "
                           "directory; choose another or pass --overwrite")
        # nothing of another run may be trusted, except embeddings of the same inputs
        remove_outputs(run, keep_embeddings=same)
    plan = write_plan(config, run, ds, num_shards, devices, grain,
                      keep=old["shards"] if same else None)
    return ds, plan, "new"
