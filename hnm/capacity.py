"""What a run of a given size needs before it runs (`hnm plan`, `hnm mine --dry-run`): each
phase's memory per process, split into private pages and the memory-mapped file pages it
touches, each GPU's memory, and the run directory's disk per kind of file, with the plain
index and with compressed codes side by side; what does not fit and what would.

The model is of the design where processes hold only numeric per-row columns (the corpus
is a columnar store memory-mapped from the run directory), the index is split into parts
(one part held per process at a time), compressed codes are rescored exactly, and the
reduce streams one shard's lists at a time. Every cost is a named constant below, in one
place, so that measured runs can adjust it (`compare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hnm import ivf
from hnm.config import Config
from hnm.engine import ANCHOR_BATCH, REDUCE_WINDOW
from hnm.index import BUILD_PEAK, GPU_SHARE
from hnm.ivf import ADD_ROWS, ASSIGN_SCORES, ivf_shape, probe_batch
from hnm.kmeans import KMEANS_SAMPLE, LABEL_BLOCK
from hnm.sizing import (
    AUTO_EXACT_ROWS,
    CANDIDATE_BYTES,
    ENCODER_BYTES,
    GIB,
    IVF_TRAIN_PER_LIST,
    RECORD_OVERHEAD,
    candidate_bytes,
)

MIB = 2.0**20
# --- per-row and per-dimension layouts (NumPy, FAISS, Arrow) ---
FLOAT = 4  # a float32 table's value: flat index = N x d x 4 bytes
ID_BYTES = 8  # FAISS's idx_t kept beside each vector of an IVF list: N x (d x 4 + 8)
# Product quantiser: 8-bit codes of m sub-quantisers, m the largest divisor of d not above
# d/8 (FAISS splits d evenly) unless --pq-bytes: N x (m + 8).
CODEBOOK_CENTROIDS = 256  # 8-bit codes: 256 centroids per sub-quantiser (PQ: 256 x d x 4)
# The store's numeric columns every process maps (corpus/*.npy): a row's input position,
# phrase id, group code (int64) and anchor uniform (float64).
COLUMN_BYTES = 4 * 8
CLUSTER_BYTES = 8  # tables/clusters.npy: a k-means label per row (int64)
ELIGIBLE_BYTES = 1  # tables/eligible.npy: a bool per distinct phrase
ARROW_OFFSET_BYTES = 4  # Arrow's int32 offset of each string value
# corpus/records.arrow: each record as JSON text, its id, image path and shard reference, a
# string column each; the id and path beside the record: ~8 and ~40 characters (assumed).
STORE_STRINGS, STORE_EXTRA_BYTES = 4, 48
PHRASE_BYTES = 60  # one distinct phrase's text (corpus/phrases.arrow), assumed
# --- processes (measured here: RssAnon after the imports, bench/README's machine) ---
# A worker: hnm's worker modules, NumPy, FAISS and torch imported: 154 MiB measured; on
# precomputed embeddings, exact search (torch never imported) an idle worker held 72-115 MiB.
PROCESS_BYTES = 160 * MIB
BARE_PROCESS_BYTES = 110 * MIB
# The launcher (CLI, driver, pyarrow, live view, pool queues; torch only for GPU workers):
# 88-95 MiB measured waiting at 1 M and 3 M rows, after planning (bench_scale).
LAUNCHER_BYTES = 90 * MIB
# --- planning: reading the input in blocks, checks in bounded memory ---
SCAN_ROWS = 1 << 14  # records of one block being read and checked (plan_scan.PLAN_BLOCK)
# The store staged as it is read: a batch (corpus.BATCH_ROWS records) as Python strings,
# then Arrow arrays; copies of its bytes fitted: 226 / 230 MiB at 1 M / 3 M rows.
STAGE_ROWS, STAGE_COPIES = 1 << 16, 11.5
# Scratch (hnm.scratch, mapped files): the ids seen (checks.IdSet, 8-byte hashes), a distinct
# phrase's digest and code (DistinctCodes, 24 bytes), twice while two runs merge.
PLAN_ROW_BYTES = 2 * 8
PLAN_PHRASE_BYTES = 2 * 24
# --- embedding ---
LOADERS_PER_GPU = 8  # data-loading processes of a GPU worker (placement: 72 cores, 8 GPUs)
IMAGE_BYTES = 3 * 224 * 224 * FLOAT  # one decoded image tensor of a batch
PREFETCH = 2  # batches each data-loading process keeps ready (torch's prefetch_factor)
# Activations of one image during inference on a GPU: assumed (no GPU has run hnm yet).
GPU_IMAGE_BYTES = 8 * MIB
# The shard's embeddings are written a block at a time as they are made
# (safety.NpyRows): a worker holds one block of them, not its shard; precomputed rows are
# snapped EMBED_BLOCK_ROWS at a time in float64 with two temporaries (embed.PRECOMPUTED_BLOCK).
EMBED_BLOCK_ROWS = 1 << 13
# --- candidates and reduce ---
# Where a worker searches compressed codes: on the host, memory-mapped (ivf.CodesIndex),
# not on its GPU. IVF lists go to the GPU a list at a time (no build peak); an exact part
# is built there at FAISS's build peak (index.BUILD_PEAK).
CODES_ON_GPU = False
# A worker writes each block's lists as they are found (engine.ANCHOR_BATCH anchors, IVF's
# batch on an IVF index): LIST_COPIES block lists with the search's temporaries (19 MiB
# traced for an exact search of 100,000 anchors), and per anchor and list it probes
# IVF_PROBE_BYTES (its best rows, their selection): fitted to bench_scale's 0.3 / 1 M rows.
LIST_COPIES, IVF_PROBE_BYTES = 3, 1536
REDUCE_LIST_COPIES = 1  # the reduce judges REDUCE_WINDOW anchors' lists at a time
# In the reduce, private: a row's eligibility, an anchor's share of the negatives' phrase
# counts (metrics.PhraseUses, 16 bytes; the report's, 8); scratch: FreeRows' 4-byte arrays.
FREE_ROW_BYTES, ANCHOR_STATE_BYTES = 1, 16 + 8
SCRATCH_ROW_BYTES = 5 * 4
# Per distinct phrase in the reduce, private: free and eligible flags; scratch: row and
# histogram starts, length, limit, window count, three FreeRows temporaries.
PHRASE_STATE_BYTES = 1 + 1
SCRATCH_PHRASE_BYTES = 8 + 8 + 8 + 1 + 4 + 3 * 8
ROW_GROUP_ROWS = 1 << 16  # output rows written at once
# One negative in an output line (its id, text, image, scores, strategy): measured 470
# bytes a line for records of 145 bytes (tests/synthetic.py, 2,000 rows, one negative).
NEGATIVE_BYTES = 330
# candidates/shard_NNNNN.npz: row (int64), vis and txt (float64) per listed row, what the
# fixed rules removed before each hard row (4 x int32), and per anchor two offsets
# (int64), the complete flag and the fixed rules' counts (5 x int32).
HARD_BEFORE_BYTES = 4 * 4
ANCHOR_BYTES = 2 * 8 + 1 + 5 * 4
REPORT_BYTES = 8 * MIB  # report.html with its thumbnails, metrics.json, suspects
# --- fitting ---
HOST_SHARE = 0.9  # of a machine's memory for private pages (the rest: kernel, page cache)
PARTS_LIMIT = 1 << 16  # the most index parts the planner considers
COMPRESSED = ("ivfpq", "ivfsq")
INDEXES = ("auto", "exact", "ivf", *COMPRESSED)
TOLERANCE = 0.25  # predicted within this share of the measured figure


@dataclass(frozen=True)
class Shape:
    """What a run's needs depend on. A rank is a machine (torchrun's node) running one
    worker per GPU, or `cpu_workers` without GPUs."""

    rows: int
    image_dim: int
    text_dim: int
    ranks: int = 1
    gpus_per_rank: int = 0
    cpu_workers: int = 1
    loaders: int | None = None  # per worker; None: LOADERS_PER_GPU on GPUs, none on CPU
    parts: int | None = 1  # None: the fewest that fit
    index: str = "auto"
    distinct_texts: float = 0.5  # distinct texts per row
    record_bytes: int = 300  # one input record's bytes
    anchors: int | None = None  # None: every row
    encoders: bool = True  # False: precomputed embeddings
    host_memory: float | None = None  # bytes per machine
    gpu_memory: float | None = None  # bytes per GPU
    config: Config = field(default_factory=Config)

    @property
    def workers(self) -> int:
        """Workers of one machine."""
        return self.gpus_per_rank or self.cpu_workers

    @property
    def phrases(self) -> int:
        return max(1, round(self.rows * self.distinct_texts))


@dataclass(frozen=True)
class Process:
    """One kind of process in one phase: how many run on a machine at once, and each
    one's bytes."""

    phase: str
    process: str
    count: int
    private: float
    mapped: float
    gpu: float = 0.0


@dataclass(frozen=True)
class Estimate:
    """One index choice's needs."""

    index: str
    parts: int
    processes: list[Process]
    disk: dict[str, float]
    machine: float  # the most private memory one machine holds at once
    problems: list[str]

    def peak(self, process: str) -> float:
        return max((p.private for p in self.processes if p.process == process), default=0.0)

    def gpu(self) -> float:
        return max((p.gpu for p in self.processes), default=0.0)

    def to_json(self) -> dict:
        return {"index": self.index, "parts": self.parts, "machine": round(self.machine),
                "processes": [{"phase": p.phase, "process": p.process, "count": p.count,
                               "private": round(p.private), "mapped": round(p.mapped),
                               "gpu": round(p.gpu)} for p in self.processes],
                "disk": {k: round(v) for k, v in self.disk.items()},
                "problems": self.problems}


def amount(nbytes: float) -> str:
    """Bytes in words: TiB, GiB, MiB or KiB with one decimal."""
    for unit, scale in (("TiB", 2.0**40), ("GiB", GIB), ("MiB", MIB)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1024:.1f} KiB" if nbytes else "0"


def plain_index(shape: Shape) -> str:
    """The index without compressed codes: `--index auto` as sizing.choose_index resolves
    it on the device kind (exact up to AUTO_EXACT_ROWS), IVF lists for a compressed one."""
    if shape.index in COMPRESSED:
        return "ivf"
    if shape.index == "auto":
        kind = "cuda" if shape.gpus_per_rank else "cpu"
        return "exact" if shape.rows <= AUTO_EXACT_ROWS[kind] else "ivf"
    return shape.index


def compressed_index(shape: Shape) -> str:
    return shape.index if shape.index in COMPRESSED else "ivfpq"


def nlist(shape: Shape) -> int:
    return min(shape.config.ivf_nlist or ivf_shape(shape.rows)[0], shape.rows)


def code_bytes(index: str, d: int, pq: int | None = None) -> float:
    """Bytes one row takes in an index: the vector (flat) or, in IVF lists, the vector or
    its code plus its id (`ivf.code_bytes`); `pq`: --pq-bytes."""
    if index == "exact":
        return d * FLOAT
    return float(ivf.code_bytes(index, d, pq))


def index_fixed(index: str, d: int, lists: int) -> float:
    """An index's bytes whatever its rows: IVF centroids, PQ codebooks, SQ ranges."""
    if index == "exact":
        return 0.0
    books = {"ivf": 0.0, "ivfpq": CODEBOOK_CENTROIDS * d * FLOAT, "ivfsq": 2 * d * FLOAT}
    return lists * d * FLOAT + books[index]


def estimate(shape: Shape, index: str, parts: int) -> Estimate:
    """One index choice's memory per process, GPU and disk (upper bounds: every mapped
    page a process may touch is counted as touched)."""
    s, c = shape, shape.config
    n, u, dv, dt = s.rows, s.phrases, s.image_dim, s.text_dim
    anchors = min(s.anchors or n, n)
    total_workers = s.ranks * s.workers
    # shards of at most --shard-rows rows, one per worker at least (plan.shard_count)
    shards = max(total_workers, -(-n // max(1, c.shard_rows)))
    shard_rows = -(-n // shards)
    shard_anchors = -(-anchors // shards)
    part_rows = -(-n // parts)
    lists = nlist(s) if index != "exact" else 0
    on_gpu = s.gpus_per_rank > 0
    loaders = 0 if not s.encoders else (LOADERS_PER_GPU if on_gpu else 0) \
        if s.loaders is None else s.loaders
    base = PROCESS_BYTES if s.encoders else BARE_PROCESS_BYTES
    # IVF lists are scanned with torch on a GPU (ivf.IvfIndex), with NumPy on the host
    searching = PROCESS_BYTES if index != "exact" and on_gpu else base
    visual, text = n * dv * FLOAT, u * dt * FLOAT
    columns = n * COLUMN_BYTES
    block = EMBED_BLOCK_ROWS * max(dv, dt) * 8.0 * 3
    per_anchor = candidate_bytes(c, n)
    probes = 0 if index == "exact" else \
        min(c.ivf_nprobe or ivf_shape(n)[1], lists or 1)  # lists an anchor probes
    batch = ANCHOR_BATCH if index == "exact" else probe_batch(probes)  # anchors at once
    window = REDUCE_WINDOW + batch
    row_bytes = code_bytes(index, dv, getattr(c, "pq_bytes", None))
    part_index = part_rows * row_bytes + index_fixed(index, dv, lists)
    encoders = ENCODER_BYTES if s.encoders else 0.0

    plan = Process("plan", "launcher", 1, LAUNCHER_BYTES + SCAN_ROWS * s.record_bytes
                   * RECORD_OVERHEAD + STAGE_ROWS * (s.record_bytes + STORE_EXTRA_BYTES)
                   * STAGE_COPIES, n * PLAN_ROW_BYTES + u * PLAN_PHRASE_BYTES)
    embed = Process("embed", "worker", s.workers,
                    base + encoders + (c.batch_size * IMAGE_BYTES if s.encoders else 0.0) + block,
                    shard_rows * (s.record_bytes + COLUMN_BYTES),
                    encoders + c.batch_size * GPU_IMAGE_BYTES if on_gpu and s.encoders else 0.0)
    loader = Process("embed", "loader", s.workers * loaders,
                     base + PREFETCH * c.batch_size * IMAGE_BYTES,
                     shard_rows * (s.record_bytes + COLUMN_BYTES) / max(1, loaders))
    # IVF: a part's lists, ADD_ROWS rows added and ASSIGN_SCORES scores (2 copies) at a
    # time, k-means' sample mapped (scratch); clusters: a sample block (kmeans.LABEL_BLOCK)
    train = 0.0 if index == "exact" else part_index + ASSIGN_SCORES * FLOAT * 2 \
        + min(part_rows, ADD_ROWS) * dv * FLOAT
    sample = 0.0 if index == "exact" else min(n, IVF_TRAIN_PER_LIST * lists) * dv * FLOAT
    kmeans = min(n, KMEANS_SAMPLE, LABEL_BLOCK) * dv * FLOAT * 2
    tables = Process("tables", "worker", 1, searching + max(kmeans, train),
                     visual + text + columns + sample)
    # one exact part on a CPU: FAISS's copy of the table; several: each in the mapped table
    held = part_index if index == "exact" and not on_gpu and parts == 1 else 0.0
    gpu_index = BUILD_PEAK * part_index if index == "exact" else \
        part_index if index == "ivf" or CODES_ON_GPU else 0.0
    candidates = Process("candidates", "worker", s.workers,
                         searching + held + min(shard_anchors, batch)
                         * (LIST_COPIES * per_anchor + probes * IVF_PROBE_BYTES),
                         visual + text + columns + (0.0 if index == "exact" else part_index),
                         gpu_index if on_gpu else 0.0)
    reduce = Process("reduce", "launcher", 1,
                     LAUNCHER_BYTES + REDUCE_LIST_COPIES * min(shard_anchors, window) * per_anchor
                     + n * FREE_ROW_BYTES + anchors * ANCHOR_STATE_BYTES
                     + u * PHRASE_STATE_BYTES + ROW_GROUP_ROWS * _line_bytes(s),
                     visual + text + columns + n * s.record_bytes
                     + n * SCRATCH_ROW_BYTES + u * SCRATCH_PHRASE_BYTES)
    processes = [plan, embed, *([loader] if loader.count else []), tables, candidates, reduce]
    disk = {
        "corpus store": n * (s.record_bytes + STORE_EXTRA_BYTES + COLUMN_BYTES
                             + ARROW_OFFSET_BYTES * STORE_STRINGS)
        + u * (PHRASE_BYTES + ARROW_OFFSET_BYTES),
        "embeddings": visual + text,
        "tables": visual + text + n * CLUSTER_BYTES + u * ELIGIBLE_BYTES
        + c.n_clusters * dv * FLOAT,
        "index": 0.0 if index == "exact" else n * row_bytes + parts * index_fixed(
            index, dv, lists),
        "candidates": anchors * (min(c.k_nn, n) * (CANDIDATE_BYTES + HARD_BEFORE_BYTES)
                                 + c.diverse_candidates * CANDIDATE_BYTES + ANCHOR_BYTES),
        "outputs": anchors * _line_bytes(s) + REPORT_BYTES,
    }
    machine = max(phase_totals(processes, s.workers, base).values())
    est = Estimate(index, parts, processes, disk, machine, [])
    return replace(est, problems=problems(s, est))


def _line_bytes(s: Shape) -> float:
    """One output line: the anchor's record and its negatives."""
    return s.record_bytes + s.config.num_negatives * NEGATIVE_BYTES


def phase_totals(processes: list[Process], workers: int, base: float = PROCESS_BYTES
                 ) -> dict[str, float]:
    """The private memory machine 0 holds in each phase: the phase's processes there, the
    launcher beside the workers, the idle workers at their base."""
    totals: dict[str, float] = {}
    for p in processes:
        totals[p.phase] = totals.get(p.phase, 0.0) + p.count * p.private
    for phase in totals:
        if not any(p.phase == phase and p.process == "launcher" for p in processes):
            totals[phase] += LAUNCHER_BYTES
        busy = sum(p.count for p in processes if p.phase == phase and p.process == "worker")
        totals[phase] += (workers - busy) * base
    return totals


def problems(s: Shape, est: Estimate) -> list[str]:
    """What does not fit and why, a line each."""
    out = []
    if s.host_memory is not None and est.machine > HOST_SHARE * s.host_memory:
        totals = phase_totals(est.processes, s.workers,
                              PROCESS_BYTES if s.encoders else BARE_PROCESS_BYTES)
        worst = max((p for p in est.processes if totals[p.phase] == est.machine),
                    key=lambda p: p.count * p.private)
        out.append(f"does not fit: a machine holds {amount(est.machine)} of private memory "
                   f"at once (the {worst.phase} phase: {worst.count} {worst.process}(s) of "
                   f"{amount(worst.private)}), more than {HOST_SHARE:.0%} of --host-memory "
                   f"{amount(s.host_memory)}")
    if s.gpu_memory is not None and s.gpus_per_rank:
        for p in est.processes:
            share = GPU_SHARE if p.phase == "candidates" else 1.0
            if p.gpu > share * s.gpu_memory:
                what = "the index part at its build peak, twice the table" \
                    if est.index == "exact" and p.phase == "candidates" else \
                    "the index part" if p.phase == "candidates" else "the encoders and a batch"
                out.append(f"does not fit: the {p.phase} phase needs {amount(p.gpu)} per GPU "
                           f"({what}), more than {share:.0%} of --gpu-memory "
                           f"{amount(s.gpu_memory)}")
    return out


def fewest_parts(shape: Shape, index: str) -> int:
    """The fewest parts (a power of two) with which `index` fits; 1 where nothing is
    checked, PARTS_LIMIT where none fits."""
    parts = 1
    while parts < PARTS_LIMIT and estimate(shape, index, parts).problems:
        parts *= 2
    return parts


def plan(shape: Shape) -> list[Estimate]:
    """The plain index and the compressed one, each in `shape.parts` parts or the fewest
    that fit."""
    out = []
    for index in (plain_index(shape), compressed_index(shape)):
        parts = shape.parts or fewest_parts(shape, index)
        out.append(estimate(shape, index, min(parts, shape.rows)))
    return out


def chosen(shape: Shape, estimates: list[Estimate]) -> Estimate:
    """The estimate of the index the flags ask for (compressed for ivfpq, ivfsq)."""
    return estimates[1] if shape.index in COMPRESSED else estimates[0]


def remedies(shape: Shape, est: Estimate) -> list[str]:
    """What would make `est` fit, a line each: one change alone where one does, else
    parts and machines together; nothing where it fits."""
    if not est.problems:
        return []

    def fits(index: str = est.index, parts: int = est.parts, **change: float) -> bool:
        return not estimate(replace(shape, **change), index, parts).problems

    out, steps = [], [1 << i for i in range(PARTS_LIMIT.bit_length())]
    parts = next((p for p in steps if p > est.parts and fits(parts=p)), None)
    if parts:
        out.append(f"would fit: --parts {parts} (each worker holds 1/{parts} of the index)")
    packed = compressed_index(shape)
    parts = next((p for p in steps if p >= est.parts and fits(packed, p)), None) \
        if est.index not in COMPRESSED else None
    if parts:
        more = f" --parts {parts}" if parts != est.parts else ""
        out.append(f"would fit: --index {packed}{more} (compressed codes, rescored exactly "
                   "from the mapped table)")
    ranks = next((r * shape.ranks for r in steps[1:] if fits(ranks=r * shape.ranks)), None)
    if ranks:
        out.append(f"would fit: --ranks {ranks} (a smaller share of the rows per worker)")
    host = -(-est.machine / HOST_SHARE // GIB) * GIB
    if shape.host_memory is not None and fits(host_memory=host):
        out.append(f"would fit: --host-memory {host / GIB:.0f}G")
    gpu = -(-max(p.gpu / (GPU_SHARE if p.phase == "candidates" else 1.0)
                 for p in est.processes) // GIB) * GIB
    if shape.gpu_memory is not None and shape.gpus_per_rank and fits(gpu_memory=gpu):
        out.append(f"would fit: --gpu-memory {gpu / GIB:.0f}G")
    if out:
        return out
    for index in dict.fromkeys((est.index, packed)):  # the fewest machines, then parts
        both = next(((p, r * shape.ranks) for r in steps for p in steps
                     if fits(index, p, ranks=r * shape.ranks)), None)
        if both:
            flag = f"--index {index} " if index != est.index else ""
            out.append(f"would fit: {flag}--parts {both[0]} --ranks {both[1]}")
    return out or ["would fit: nothing the planner tries (parts, compressed codes, machines "
                   f"up to {PARTS_LIMIT:,} times as many each); more memory per machine"]


def predict(shape: Shape) -> dict[str, float]:
    """The figures a measured run is compared with (`compare`): the peak private memory
    of the launcher and of a worker, and of machine 0, for the index the flags ask for.

    For a benchmark on precomputed embeddings with W CPU workers:
    `compare({"launch": ..., "worker": max(workers), "machine": ...}, predict(Shape(rows=N,
    image_dim=512, text_dim=384, cpu_workers=W, encoders=False, record_bytes=B,
    distinct_texts=U / N, index=KIND, parts=P)))` (measured: anonymous pages at the peak)."""
    est = chosen(shape, plan(shape))
    return {"launch": est.peak("launcher"), "worker": est.peak("worker"),
            "machine": est.machine}


def compare(measured: dict[str, float], predicted: dict[str, float],
            tolerance: float = TOLERANCE) -> list[str]:
    """A line per process: predicted and measured bytes and their ratio, and whether the
    prediction is within `tolerance` of the measurement."""
    lines = []
    for name in [*predicted, *(k for k in measured if k not in predicted)]:
        p, m = predicted.get(name), measured.get(name)
        if p is None or m is None:
            lines.append(f"{name}: " + (f"measured {amount(m)}, not predicted" if p is None
                                        else f"predicted {amount(p)}, not measured"))
            continue
        ratio = m / p if p else float("inf")
        verdict = "within" if abs(ratio - 1) <= tolerance else "off by more than"
        lines.append(f"{name}: predicted {amount(p)}, measured {amount(m)}, "
                     f"measured/predicted {ratio:.2f} ({verdict} {tolerance:.0%})")
    return lines
