"""How a run fits its machine: which index `--index auto` picks, and the memory each phase
needs per worker (host and GPU), checked before anything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hnm.config import Config
from hnm.errors import HnmError
from hnm.host import available_kib
from hnm.index import BUILD_PEAK, GPU_SHARE, faiss_available
from hnm.ivf import ivf_shape
from hnm.kmeans import KMEANS_SAMPLE
from hnm.miner import MARGIN

# Exact search costs N^2 x d: up to these many rows it takes minutes (about 4 minutes for
# 100,000 rows of 512 dimensions on 2 CPU cores; a GPU is ~1000x faster), above them IVF.
AUTO_EXACT_ROWS = {"cpu": 100_000, "cuda": 2_000_000}
IVF_TRAIN_PER_LIST = 64  # k-means sample rows per IVF list (FAISS asks for at least 39)
# A diverse list wants rows far from the anchor, not its exact neighbourhood: the lists of
# the centroids farthest from it hold them, so its search probes this many times fewer.
FAR_SHARE = 4
RECALL_ANCHORS = 1000  # anchors whose IVF hard lists are compared with an exact search
# Python objects of the loaded annotations, per byte of the file and per row (ids, paths,
# phrase and group codes): measured 1.1 GiB for a million short JSONL records (126 MiB).
RECORD_OVERHEAD, ROW_BYTES = 3.0, 750
PICK_BYTES = 400  # one anchor's negatives in the reducer (Python objects)
CANDIDATE_BYTES = 24  # one candidate: row (int64), vis and txt (float64)
GIB = 2.0**30
# Both encoders of a worker (models, their buffers), on its host or its GPU.
ENCODER_BYTES = 1.5 * GIB


@dataclass(frozen=True)
class IndexChoice:
    """The search index of a run, chosen once when it is planned."""

    kind: str = "exact"  # "exact" | "ivf"
    reason: str = "exact search (the SPEC's)"
    nlist: int = 0  # ivf: lists
    nprobe: int = 0  # ivf: lists probed per query
    far_nprobe: int = 0  # ivf: lists probed for a diverse list (the farthest rows)

    def describe(self) -> str:
        shape = f", {self.nlist} lists, {self.nprobe} probed per query, {self.far_nprobe} " \
            "for the farthest rows" if self.kind == "ivf" else ""
        return f"{self.kind}{shape} ({self.reason})"


def device_kind(devices: list[str]) -> str:
    return "cuda" if any(d.startswith("cuda") for d in devices) else "cpu"


def choose_index(config: Config, rows: int, devices: list[str]) -> IndexChoice:
    """`--index`, with `auto` resolved by the table's size on the device at hand."""
    kind = device_kind(devices)
    limit = AUTO_EXACT_ROWS[kind]
    if config.index == "exact":
        return IndexChoice("exact", "--index exact")
    if config.index == "auto" and rows <= limit:
        return IndexChoice("exact", f"auto: {rows:,} rows, at most {limit:,} for exact search "
                                    f"on {kind}")
    if not faiss_available():  # IVF is FAISS's; exact search also runs on torch
        if config.index == "ivf":
            raise HnmError("--index ivf needs the faiss package (pip install faiss-cpu, or a "
                           "faiss GPU build); use --index exact without it")
        return IndexChoice("exact", f"auto: {rows:,} rows, above {limit:,}, but faiss is "
                                    "not installed (IVF needs it)")
    reason = "--index ivf" if config.index == "ivf" else \
        f"auto: {rows:,} rows, above {limit:,} for exact search on {kind}"
    nlist, nprobe = ivf_shape(rows)
    nlist = min(config.ivf_nlist or nlist, rows)
    nprobe = min(config.ivf_nprobe or min(nprobe, nlist), nlist)
    return IndexChoice("ivf", reason, nlist, nprobe, max(1, nprobe // FAR_SHARE))


# One core's speed at each kind of work, for deciding how many CPU workers a run is worth
# (hnm.placement.fit_to_work). Measured on the developers' machine with bench/bench_embed.py and
# bench/bench_orchestrator.py --small; only their order of magnitude matters.
IMAGES_PER_CORE_SECOND = {"efficientnet-lite0": 30.0, "pixels": 500.0}
MODEL_IMAGES_PER_CORE_SECOND = 10.0  # a Hugging Face vision model
PHRASES_PER_CORE_SECOND = 400.0  # all-MiniLM-L6-v2; other text models count as this
SEARCH_FLOPS_PER_CORE_SECOND = 1e11  # exact search and rescoring, every row against every row


def work_seconds(config: Config, rows: int, phrases: int, dv: int) -> float:
    """One core's time for a run's embedding and search: what more workers could share."""
    images = 0.0 if config.image_embeddings else rows / IMAGES_PER_CORE_SECOND.get(
        config.visual_encoder, MODEL_IMAGES_PER_CORE_SECOND)
    texts = 0.0 if config.text_embeddings else phrases / PHRASES_PER_CORE_SECOND
    return images + texts + 2.0 * rows * rows * dv / SEARCH_FLOPS_PER_CORE_SECOND


@dataclass(frozen=True)
class Sizes:
    """What the memory of a run depends on."""

    rows: int
    phrases: int
    anchors: int
    dv: int
    dt: int
    annotation_bytes: int
    workers: int
    device: str  # "cpu" | "cuda"
    # image tensors (AVDN chunks): the largest chunk's bytes, which each process reading
    # images (each loader, or the worker itself) unpickles and holds whole; loaders a worker
    chunk_bytes: float = 0.0
    loaders: int = 0


@dataclass(frozen=True)
class PhaseMemory:
    """Bytes one phase needs: private to each worker, memory-mapped files shared by the
    workers of a machine, and on each worker's GPU."""

    phase: str
    per_worker: float
    shared: float
    gpu: float
    workers: int

    def total(self) -> float:
        return self.per_worker * self.workers + self.shared


def block_bytes(dv: int, dt: int) -> float:
    """A block of rows a phase computes on: float64, with its temporaries."""
    return (1 << 16) * max(dv, dt) * 8.0 * 3


def candidate_bytes(config: Config, rows: int) -> float:
    """One anchor's candidate lists: its hard list (k_nn), its diverse list, and the
    margins a search takes to be certain of the order at the cut (`miner.MARGIN`)."""
    return (min(config.k_nn, rows) + config.diverse_candidates + 2 * MARGIN) * CANDIDATE_BYTES


def estimate(config: Config, s: Sizes, choice: IndexChoice) -> list[PhaseMemory]:
    """Peak memory of each phase (upper bounds: mapped pages are counted as resident)."""
    dataset = s.annotation_bytes * RECORD_OVERHEAD + s.rows * ROW_BYTES
    visual, text = s.rows * s.dv * 4.0, s.phrases * s.dt * 4.0
    shard_rows = -(-s.rows // s.workers)
    block = block_bytes(s.dv, s.dt)
    encoders = 0.0 if config.image_embeddings and config.text_embeddings else ENCODER_BYTES
    precomputed = (s.rows * s.dv * 4.0 if config.image_embeddings else 0.0) \
        + (s.rows * s.dt * 4.0 if config.text_embeddings else 0.0)  # read where they lie
    shard_cands = -(-s.anchors // s.workers) * candidate_bytes(config, s.rows)
    index = visual + s.rows * 8.0  # an exact copy, or the IVF lists (vectors and ids)
    # on a GPU an exact index peaks at BUILD_PEAK tables while it is built (no ids there)
    gpu_index = BUILD_PEAK * visual if choice.kind == "exact" else index
    train = 0.0
    if choice.kind == "ivf":
        train = min(s.rows, IVF_TRAIN_PER_LIST * choice.nlist) * s.dv * 4.0
    kmeans_sample = min(s.rows, KMEANS_SAMPLE) * s.dv * 4.0 * 2
    on_gpu = s.device == "cuda"
    held = s.chunk_bytes * max(1, s.loaders)  # one chunk a process reading images
    return [
        PhaseMemory("embed", dataset + shard_rows * s.dv * 4.0 + block + encoders + held,
                    precomputed, encoders if on_gpu else 0.0, s.workers),
        PhaseMemory("tables", dataset + block + max(kmeans_sample, train + index),
                    visual + text, 0.0, 1),
        PhaseMemory("candidates",
                    dataset + shard_cands + (index if choice.kind == "exact" and not on_gpu
                                             else 0.0) + block,
                    visual + text + (index if choice.kind == "ivf" else 0.0),
                    gpu_index if on_gpu else 0.0, s.workers),
        PhaseMemory("reduce", dataset + shard_cands + s.rows * 40.0 + s.anchors * PICK_BYTES,
                    visual + text, 0.0, 1),
    ]


def host_available() -> float:
    """Bytes of memory available to a new process on this machine (Linux: MemAvailable)."""
    kib = available_kib()
    if kib is not None:
        return float(kib) * 1024
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_lines(phases: list[PhaseMemory]) -> list[str]:
    """One line per phase, for --dry-run."""
    lines = ["Memory per phase (GiB, upper bounds; 'mapped': table files the workers share, "
             "paged by the kernel):"]
    for p in phases:
        gpu = f"; GPU {p.gpu / GIB:.2f} per worker" if p.gpu else ""
        lines.append(f"  {p.phase}: host {p.per_worker / GIB:.2f} per worker x {p.workers} "
                     f"+ mapped {p.shared / GIB:.2f} = {p.total() / GIB:.2f}{gpu}")
    return lines


def size_text(nbytes: float) -> str:
    """A size for a message: GiB with one decimal, MiB or KiB below (small GPUs, MIG
    slices and small tables)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2.0**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def check_fits(phases: list[PhaseMemory], host: float, gpu_gib: float | None,
               choice: IndexChoice, devices: list[str]) -> None:
    """Refuse, in one line naming the flag to change, a plan that cannot fit: memory private
    to the workers beyond what the host has available, or an exact index too large for a
    GPU even in float16 (`gpu_gib`: the least free memory of the GPUs used; the index is
    counted at its build peak, the encoders being released by then). (Mapped table files
    are paged by the kernel: they only slow a run down when they exceed the memory.)"""
    if gpu_gib is not None and choice.kind == "exact":
        need = next((p.gpu for p in phases if p.phase == "candidates"), 0.0)
        if need / 2 > GPU_SHARE * gpu_gib * GIB:
            raise HnmError(f"--index: an exact index of this table needs {size_text(need)} "
                           f"per GPU while it is built ({size_text(need / 2)} in float16), "
                           f"more than {GPU_SHARE:.0%} of the {size_text(gpu_gib * GIB)} free "
                           "on the fullest GPU used; use --index ivf")
    worst = max(phases, key=lambda p: p.per_worker * p.workers)
    private = worst.per_worker * worst.workers
    if private <= host:
        return
    if worst.workers > 1:
        flag = "--num-gpus" if device_kind(devices) == "cuda" else "--cpu-workers"
        advice = f"use fewer workers ({flag})"
    elif choice.kind == "exact":
        flag, advice = "--index", "use --index ivf"
    else:
        flag, advice = "--max-samples", "mine fewer anchors (--max-samples)"
    raise HnmError(f"{flag}: the {worst.phase} phase needs about {private / GIB:.1f} GiB of "
                   f"host memory ({worst.workers} worker(s)), more than the "
                   f"{host / GIB:.1f} GiB available; {advice}")
