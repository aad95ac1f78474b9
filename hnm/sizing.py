"""How a run fits its machine: which index `--index auto` picks, and the memory each phase
needs per worker (host and GPU), checked before anything runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from hnm.config import Config
from hnm.errors import HnmError
from hnm.host import available_kib
from hnm.index import BUILD_PEAK, GPU_SHARE, faiss_available
from hnm.ivf import code_bytes, ivf_shape
from hnm.kmeans import KMEANS_SAMPLE
from hnm.miner import MARGIN
from hnm.parts import index_parts

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
# Indexes of lists a query probes (hnm.ivf): float32 rows, PQ codes, 8-bit scalar codes.
IVF_KINDS = ("ivf", "ivfpq", "ivfsq")
# Both encoders of a worker (models, their buffers), on its host or its GPU.
ENCODER_BYTES = 1.5 * GIB


@dataclass(frozen=True)
class IndexChoice:
    """The search index of a run, chosen once when it is planned."""

    kind: str = "exact"  # "exact" | "ivf" | "ivfpq" | "ivfsq"
    reason: str = "exact search (the SPEC's)"
    nlist: int = 0  # ivf: lists
    nprobe: int = 0  # ivf: lists probed per query
    far_nprobe: int = 0  # ivf: lists probed for a diverse list (the farthest rows)

    @property
    def ivf(self) -> bool:
        """An index of lists (float32 rows or compressed codes) trained in the tables
        phase, its recall measured."""
        return self.kind in IVF_KINDS

    def describe(self) -> str:
        shape = f", {self.nlist} lists, {self.nprobe} probed per query, {self.far_nprobe} " \
            "for the farthest rows" if self.ivf else ""
        return f"{self.kind}{shape} ({self.reason})"


def device_kind(devices: list[str]) -> str:
    return "cuda" if any(d.startswith("cuda") for d in devices) else "cpu"


def choose_index(config: Config, rows: int, devices: list[str],
                 sizes: Callable[[], Sizes] | None = None) -> IndexChoice:
    """`--index`, with `auto` resolved by the table's size on the device at hand and, where
    it takes IVF, by the memory the plan has for the index (`index_room`; `sizes`: the
    run's, asked only then): compressed codes where the float32 lists would not fit."""
    kind = device_kind(devices)
    limit = AUTO_EXACT_ROWS[kind]
    if config.index == "exact":
        return IndexChoice("exact", "--index exact")
    if config.index == "auto" and rows <= limit:
        return IndexChoice("exact", f"auto: {rows:,} rows, at most {limit:,} for exact search "
                                    f"on {kind}")
    if not faiss_available():  # IVF is FAISS's; exact search also runs on torch
        if config.index != "auto":
            raise HnmError(f"--index {config.index} needs the faiss package (pip install "
                           "faiss-cpu, or a faiss GPU build); use --index exact without it")
        return IndexChoice("exact", f"auto: {rows:,} rows, above {limit:,}, but faiss is "
                                    "not installed (IVF needs it)")
    chosen, reason = (config.index, f"--index {config.index}") if config.index != "auto" \
        else ("ivf", f"auto: {rows:,} rows, above {limit:,} for exact search on {kind}")
    if sizes is not None and (config.index == "auto" or chosen == "ivfpq"):
        s = sizes()
        check_pq_bytes(config, s.dv)
        if config.index == "auto":
            chosen, reason = fit_codes(config, s, index_room(config, s, host_available()),
                                       reason)
    nlist, nprobe = ivf_shape(rows)
    nlist = min(config.ivf_nlist or nlist, rows)
    nprobe = min(config.ivf_nprobe or min(nprobe, nlist), nlist)
    return IndexChoice(chosen, reason, nlist, nprobe, max(1, nprobe // FAR_SHARE))


def check_pq_bytes(config: Config, dim: int) -> None:
    """--pq-bytes must split the image embeddings' components evenly (FAISS's PQ)."""
    if config.pq_bytes is not None and dim % config.pq_bytes:
        raise HnmError(f"--pq-bytes: must divide the image embedding dimension {dim}, got "
                       f"{config.pq_bytes}")


def fit_codes(config: Config, s: Sizes, room: float, reason: str) -> tuple[str, str]:
    """IVF where its float32 lists fit `room` bytes, else 8-bit codes where they fit, else
    PQ codes; and the reason, saying so."""
    lists, sq = (s.rows * float(code_bytes(k, s.dv)) for k in ("ivf", "ivfsq"))
    if lists <= room:
        return "ivf", reason
    left = f"the {size_text(max(room, 0.0))} the plan has for the index"
    if sq <= room:
        return "ivfsq", (f"{reason}; IVF lists of {size_text(lists)} would not fit {left}, "
                         f"8-bit codes of {size_text(sq)} do")
    pq = s.rows * float(code_bytes("ivfpq", s.dv, config.pq_bytes))
    return "ivfpq", (f"{reason}; IVF lists of {size_text(lists)} and 8-bit codes of "
                     f"{size_text(sq)} would not fit {left}: PQ codes of {size_text(pq)}")


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
    note: str = ""  # what the line adds (the index's parts)

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
    dataset, block = _dataset(s), _block(s)
    visual, text = s.rows * s.dv * 4.0, s.phrases * s.dt * 4.0
    shard_rows = -(-s.rows // s.workers)
    encoders = 0.0 if config.image_embeddings and config.text_embeddings else ENCODER_BYTES
    precomputed = (s.rows * s.dv * 4.0 if config.image_embeddings else 0.0) \
        + (s.rows * s.dt * 4.0 if config.text_embeddings else 0.0)  # read where they lie
    shard_cands = -(-s.anchors // s.workers) * candidate_bytes(config, s.rows)
    # an exact copy, or the IVF lists (vectors or codes, and ids)
    per_row = float(code_bytes(choice.kind if choice.ivf else "ivf", s.dv, config.pq_bytes))
    index = s.rows * per_row
    parts = index_parts(config.index_parts, s.rows)
    note = ""
    if parts > 1:  # one part's index held at a time; an exact part is searched where it lies
        part_rows = -(-s.rows // parts)
        index = part_rows * per_row
        note = f"index in {parts} parts of {part_rows:,} rows, {size_text(index)} each"
    # on a GPU an exact index peaks at BUILD_PEAK tables while it is built (no ids there);
    # codes are searched on the host
    gpu_index = BUILD_PEAK * (visual if parts == 1 else index) if choice.kind == "exact" \
        else index if choice.kind == "ivf" else 0.0
    train = _train(s, choice)
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
                                             and parts == 1 else 0.0) + block,
                    visual + text + (index if choice.ivf else 0.0),
                    gpu_index if on_gpu else 0.0, s.workers, note),
        PhaseMemory("reduce", dataset + shard_cands + s.rows * 40.0 + s.anchors * PICK_BYTES,
                    visual + text, 0.0, 1),
    ]


def _dataset(s: Sizes) -> float:
    return s.annotation_bytes * RECORD_OVERHEAD + s.rows * ROW_BYTES


def _block(s: Sizes) -> float:
    return block_bytes(s.dv, s.dt)


def _train(s: Sizes, choice: IndexChoice) -> float:
    """The IVF index's training sample (k-means of its lists, its codec)."""
    return min(s.rows, IVF_TRAIN_PER_LIST * choice.nlist) * s.dv * 4.0 if choice.ivf else 0.0


def index_room(config: Config, s: Sizes, host: float) -> float:
    """Bytes the plan has for an IVF index's lists on a host with `host` bytes available:
    what is left by the phases holding the index besides it — the tables phase builds it
    in its own memory (beside its training sample), the candidates phase maps it beside
    the tables and every worker's own memory."""
    nlist = min(config.ivf_nlist or ivf_shape(s.rows)[0], s.rows)
    probe = IndexChoice("ivf", nlist=nlist)
    candidates = next(p for p in estimate(config, s, probe) if p.phase == "candidates")
    lists = s.rows * float(code_bytes("ivf", s.dv))
    return host - max(_dataset(s) + _block(s) + _train(s, probe),
                      candidates.total() - lists)


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
        note = f"; {p.note}" if p.note else ""
        lines.append(f"  {p.phase}: host {p.per_worker / GIB:.2f} per worker x {p.workers} "
                     f"+ mapped {p.shared / GIB:.2f} = {p.total() / GIB:.2f}{gpu}{note}")
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
