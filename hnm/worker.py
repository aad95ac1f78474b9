"""One shard's work inside one process: embed its rows, then mine its anchors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Config
from hnm.data import Dataset, ImageFiles, Progress, anchor_uniforms, load_dataset, no_progress
from hnm.encoders import build_image_encoder, build_text_encoder, finalize
from hnm.errors import HnmError
from hnm.index import build_index
from hnm.miner import Tables, farthest, hard_candidates, scatter
from hnm.storage import RunDir, read_json, write_npy, write_npz

log = logging.getLogger("hnm.worker")


@dataclass(frozen=True)
class Job:
    """What a worker needs to run one shard: plain, picklable values only."""

    config: Config
    shard: int
    device: str = "cpu"


def _shard_plan(run: RunDir, shard: int) -> dict[str, Any]:
    return read_json(run.plan)["shards"][shard]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _planned_skips(run: RunDir) -> list[int]:
    return read_json(run.plan)["skipped"]


def _torch_setup(device: str) -> Any:
    """Settings that make an embedding independent of the process that computed it."""
    import torch

    torch.manual_seed(0)
    if device == "cpu":
        # CPU kernels split reductions by thread count: one thread per worker process
        # keeps embeddings bitwise identical for any --cpu-workers
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(device)


def embed_shard(job: Job, ds: Dataset | None = None, progress: Progress = no_progress) -> dict:
    """Embed the shard's images and distinct texts; write both arrays, then the marker."""
    run = RunDir(job.config.output_dir)
    part = _shard_plan(run, job.shard)
    ds = ds or load_dataset(job.config, _planned_skips(run))
    t0 = time.perf_counter()
    rows = np.arange(*part["rows"])
    images = _image_embeddings(job, ds, rows, progress)
    t1 = time.perf_counter()
    texts = _text_embeddings(job, ds, range(*part["phrases"]), progress)
    t2 = time.perf_counter()
    write_npy(run.image_embeddings(job.shard), images)
    write_npy(run.text_embeddings(job.shard), texts)
    info = {"embed_images": t1 - t0, "embed_texts": t2 - t1, "device": job.device,
            "peak_rss_mb": round(peak_rss_mb(), 1)}
    run.mark_done("embed", job.shard, info)
    return info


def _image_embeddings(job: Job, ds: Dataset, rows: np.ndarray, progress: Progress) -> np.ndarray:
    c = job.config
    if c.image_embeddings:
        full = np.load(c.image_embeddings, mmap_mode="r")
        return finalize(full[ds.positions[rows]])
    import torch
    from torch.utils.data import DataLoader

    device = _torch_setup(job.device)
    encoder = build_image_encoder(c.visual_encoder, device)
    files = ImageFiles([ds.images[i] for i in rows], encoder.preprocess)
    loader = DataLoader(files, batch_size=c.batch_size, num_workers=c.num_workers,
                        shuffle=False, pin_memory=device.type == "cuda")
    parts, done = [], 0
    with torch.inference_mode():
        for batch in loader:
            parts.append(encoder.encode(batch))
            done += len(batch)
            progress("embed", done, len(rows))
    return finalize(np.concatenate(parts)) if parts else np.zeros((0, 1), np.float32)


def _text_embeddings(job: Job, ds: Dataset, phrases: range, progress: Progress) -> np.ndarray:
    c = job.config
    if c.text_embeddings:
        full = np.load(c.text_embeddings, mmap_mode="r")
        first = first_rows(ds.text_ids, len(ds.phrases))
        return finalize(full[ds.positions[first[phrases.start:phrases.stop]]])
    return embed_texts(c.text_encoder, [ds.phrases[i] for i in phrases], job.device,
                       c.batch_size)


def embed_texts(name: str, texts: list[str], device: str, batch_size: int) -> np.ndarray:
    """Grid-snapped embeddings of `texts` with the named text encoder."""
    import torch

    if not texts:
        return np.zeros((0, 1), np.float32)
    encoder = build_text_encoder(name, _torch_setup(device))
    with torch.inference_mode():
        parts = [encoder.encode(texts[s:s + batch_size])
                 for s in range(0, len(texts), batch_size)]
    return finalize(np.concatenate(parts))


def first_rows(text_ids: np.ndarray, num_phrases: int) -> np.ndarray:
    """Row of the first occurrence of each phrase."""
    first = np.full(num_phrases, -1, dtype=np.int64)
    rows = np.arange(len(text_ids))[::-1]
    first[text_ids[::-1]] = rows  # later writes win, and reversed order makes them the first
    return first


def load_tables(run: RunDir, ds: Dataset) -> Tables:
    """The index phase's arrays, memory-mapped, with the dataset's row facts."""
    d = run.index_dir
    return Tables(
        V=np.load(d / "visual.npy", mmap_mode="r"), T=np.load(d / "text.npy", mmap_mode="r"),
        text_ids=ds.text_ids, groups=ds.groups,
        eligible=np.load(d / "eligible.npy")[ds.text_ids],
        clusters=np.load(d / "clusters.npy"),
    )


def candidates_shard(job: Job, ds: Dataset | None = None,
                     progress: Progress = no_progress) -> dict:
    """Hard and diverse candidate lists of the shard's anchors against the whole index."""
    c = job.config
    run = RunDir(c.output_dir)
    part = _shard_plan(run, job.shard)
    ds = ds or load_dataset(c, _planned_skips(run))
    tab = load_tables(run, ds)
    t0 = time.perf_counter()
    anchors = np.arange(*part["anchors"])
    diverse_first = anchor_uniforms([ds.ids[i] for i in anchors], c.seed) < c.diverse_ratio
    arrays, kind = mine_candidates(c, tab, anchors, job.device, progress,
                                   diverse_first=diverse_first)
    write_npz(run.candidates(job.shard), arrays)
    info = {"search": time.perf_counter() - t0, "device": job.device, "index": kind,
            "peak_rss_mb": round(peak_rss_mb(), 1)}
    run.mark_done("candidates", job.shard, info)
    return info


def mine_candidates(c: Config, tab: Tables, anchors: np.ndarray, device: str = "cpu",
                    progress: Progress = no_progress, batch: int = 2048,
                    diverse_first: np.ndarray | None = None
                    ) -> tuple[dict[str, np.ndarray], str]:
    """Candidate arrays of `anchors` (flat, with offsets), and the index kind used.

    Diverse lists cost a second exhaustive search, so they are computed only for anchors
    that will surely try diverse: `diverse_first` (u_a < diverse_ratio; None: all) and
    those without a single hard candidate. Any other anchor whose hard strategy fails
    gets its list from the selection pass's exact wider search, so the picks are the same.
    """
    index = build_index(np.asarray(tab.V), device)
    pool_rows = np.flatnonzero(tab.eligible)
    pool = build_index(np.asarray(tab.V[pool_rows]), device) if len(pool_rows) else None
    wanted = np.ones(len(anchors), bool) if diverse_first is None else diverse_first
    hard, div, complete = [], [], []
    for s in range(0, len(anchors), batch):
        a = anchors[s:s + batch]
        h = hard_candidates(index, tab, a, c.k_nn, c.min_visual_similarity, c.cosine_threshold)
        need = wanted[s:s + batch] | (np.diff(h.offsets) == 0)
        if pool is None:
            d, comp = _empty_lists(len(a))
        else:
            sub, sub_complete = farthest(pool, pool_rows, tab, a[need], c.diverse_pool)
            d, comp = scatter(sub, need), np.zeros(len(a), bool)
            comp[need] = sub_complete
        hard.append(h)
        div.append(d)
        complete.append(comp)
        progress("search", s + len(a), len(anchors))
    arrays = {**_pack("hard", hard), **_pack("diverse", div),
              "diverse_complete": np.concatenate(complete) if complete else np.zeros(0, bool)}
    return arrays, index.kind


def _empty_lists(n: int) -> tuple[Any, np.ndarray]:
    from hnm.miner import Ragged

    z = np.zeros(0)
    return Ragged(np.zeros(n + 1, np.int64), z.astype(np.int64), z, z), np.ones(n, bool)


def _pack(name: str, parts: list) -> dict[str, np.ndarray]:
    """Concatenate per-batch ragged lists into flat arrays with global offsets."""
    sizes = [np.diff(p.offsets) for p in parts]
    counts = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    cat = lambda key: np.concatenate([getattr(p, key) for p in parts]) if parts \
        else np.zeros(0)  # noqa: E731
    return {f"{name}_offsets": offsets, f"{name}_rows": cat("rows").astype(np.int64),
            f"{name}_vis": cat("vis"), f"{name}_txt": cat("txt")}


def check_precomputed(path: str, flag: str, rows: int) -> int:
    """Row count of a precomputed embedding file must match the records; returns its dim."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise HnmError(f"{flag} {path}: cannot read a .npy array: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] < 1:
        raise HnmError(f"{flag} {path}: expected {rows} rows (one per record) x dim, "
                       f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise HnmError(f"{flag} {path}: values must be finite floats")
    return int(arr.shape[1])


def log_to(path: Path) -> None:
    """Send this process's log records to its shard log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("hnm")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
