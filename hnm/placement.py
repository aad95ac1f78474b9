"""Where a run's work runs, decided once: the devices this machine offers (`offer`, at the
start of a run), then — once the inputs are known — the workers the run keeps busy, the
threads and data-loading processes of each, the precision and the search index
(`place`). The result, `Placement`, is printed, stored in the plan and read by every
worker; nothing else works any of it out.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hnm import gpus, host, precision, sizing
from hnm.config import Config
from hnm.encoders import embedding_dim
from hnm.errors import HnmError
from hnm.gpus import Gpu
from hnm.parts import index_parts
from hnm.plan_scan import InputSummary
from hnm.sizing import (
    IndexChoice,
    Sizes,
    check_fits,
    choose_index,
    estimate,
    work_seconds,
)

# Peak resident memory of a CPU worker with both built-in encoders loaded (about 1.1 GiB
# measured on the demo), plus room for its share of the candidates phase.
CPU_WORKER_GB = 1.5
# What one more CPU worker process costs before it works: spawning it and importing torch,
# FAISS and hnm (measured with bench/bench_orchestrator.py --small: one worker against two
# on a run whose work takes under a second). Models load in every worker as they would in
# a single process, so they are not part of it.
WORKER_START_SECONDS = 3.0
# Data-loading processes of one GPU worker at most: past this many, decoding outpaces any
# single GPU, and each one holds its own copy of the dataset's paths and a queue of batches.
MAX_LOADER_WORKERS = 16


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset set)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Offer:
    """What this machine offers a run: its GPUs (or why none), the devices the flags ask
    for (CPU workers: as many as cores and memory allow), and the lines saying so."""

    devices: list[str]
    gpus: list[Gpu] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def nvml(self) -> dict[str, tuple[int, int | None]]:
        """Device name -> NVML index and MIG slot, for the progress view's memory readings."""
        return {f"cuda:{g.index}": (g.nvml_index, g.mig) for g in self.gpus}


def offer(config: Config) -> Offer:
    """This machine's offer: NVML asked once, the device flags applied. Without any GPU
    the run falls back to CPU workers (as the original script did), even when GPUs were
    asked for."""
    found, reason = gpus.discover()
    if not found:
        count, fewer = cpu_workers(config)
        return Offer(["cpu"] * count, [], [f"No GPU: {reason}. Running on {count} CPU "
                                           "worker(s)." + (f" ({fewer})" if fewer else "")])
    devices = choose_gpus(config, found)
    return Offer(devices, found, describe(found, devices))


def ranks_offer(device: str, world: int, leader: bool) -> Offer:
    """Under torchrun every rank is a worker on its own device (the leader's kind, whose
    GPUs the leader asks NVML about to resolve the precision)."""
    found = gpus.discover()[0] if leader and device.startswith("cuda") else []
    return Offer([device] * world, found)


def choose_gpus(config: Config, found: list[Gpu]) -> list[str]:
    """The GPUs the run uses, from --gpu-id / --gpu-ids / --num-gpus; too few GPUs is an
    error listing what exists."""
    wanted = _wanted(config)
    if wanted is None:
        return [f"cuda:{g.index}" for g in found]
    missing = [i for i in wanted if i >= len(found)]
    if missing:
        present = ", ".join(f"{g.index} ({g.name})" for g in found)
        raise HnmError(f"{_flag(config)}: asks for GPU(s) {missing} but only {len(found)} "
                       f"exist: {present}")
    return [f"cuda:{i}" for i in wanted]


def cpu_workers(config: Config) -> tuple[int, str | None]:
    """CPU worker processes: --cpu-workers, or one per usable core as far as memory allows
    (then also why fewer than the cores)."""
    if config.cpu_workers is not None:
        return config.cpu_workers, None
    cores = usable_cores()
    memory = host.available_memory_gb()
    fits = cores if memory is None else max(1, int(memory // CPU_WORKER_GB))
    if fits < cores:
        return fits, (f"{memory:.1f} GiB of memory available, about {CPU_WORKER_GB} GiB "
                      f"per worker: {fits} of {cores} usable cores used")
    return cores, None


def describe(found: list[Gpu], devices: list[str]) -> list[str]:
    """The guide's "Detected N GPU(s)" lines."""
    lines = [f"Detected {len(found)} GPU(s): {[g.index for g in found]}"]
    lines += [f"   GPU {g.index}: {g.name}, {g.total_gb:.1f} GB ({g.free_gb:.1f} GB free)"
              for g in found]
    used = [d for d in devices if d.startswith("cuda")]
    lines.append(f"Using {len(used)} GPU(s): {', '.join(used)}")
    return lines


def _wanted(config: Config) -> list[int] | None:
    if config.gpu_ids is not None:
        return list(config.gpu_ids)
    if config.gpu_id is not None:
        return [config.gpu_id]
    if config.num_gpus is not None:
        return list(range(config.num_gpus))
    return None


def _flag(config: Config) -> str:
    if config.gpu_ids is not None:
        return "--gpu-ids"
    return "--gpu-id" if config.gpu_id is not None else "--num-gpus"


@dataclass(frozen=True)
class Placement:
    """How a run uses its machine, decided once when it is planned (`place`)."""

    devices: tuple[str, ...] = ("cpu",)  # a worker each, the shards spread over them
    threads: int = 1  # search threads of each CPU worker process
    loaders: int = 0  # data-loading processes of each worker
    precision: str = "fp32"  # what the encoders compute in; part of the run's identity
    precision_reason: str = "--precision"
    index: IndexChoice = IndexChoice()  # the search index over every row
    workers_note: str = ""  # why fewer CPU workers than offered, when the work is small
    index_parts: int = 1  # the index in parts of consecutive rows (hnm.parts), as planned

    def precision_line(self) -> str:
        """The precision and why, as `precision.Choice` says it."""
        return precision.Choice(self.precision, self.precision_reason).line()

    def workers_line(self) -> str:
        """Each worker's share of the machine, as printed."""
        kinds = ", ".join(sorted(set(self.devices)))
        threads = f"{self.threads} search thread(s) and " if "cpu" in self.devices else ""
        return (f"Workers: {len(self.devices)} on {kinds}, each with {threads}{self.loaders} "
                "data-loading process(es)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Placement:
        return cls(**{**data, "devices": tuple(data["devices"]),
                      "index": IndexChoice(**data["index"])})


def place(config: Config, offered: Offer, ds: InputSummary, shards: int | None = None
          ) -> Placement:
    """The run's placement on what is offered: CPU workers as many as its work is worth
    and its batches allow (`fit_to_work`), or `shards` workers at most where the shards
    are already cut (embeddings kept from an earlier plan)."""
    if shards is not None:
        devices, note = offered.devices[:shards], ""
    else:
        devices, note = fit_to_work(config, offered.devices, _work(config, ds),
                                    batches=-(-len(ds) // config.batch_size))
    chosen = precision.resolve(config.precision, devices, offered.gpus)
    placed = Placement(tuple(devices), *_processes(config, devices), chosen.precision,
                       chosen.reason, IndexChoice(), note,
                       index_parts(config.index_parts, len(ds)))
    return replace(placed, index=choose_index(config, len(ds), devices,
                                              lambda: run_sizes(config, ds, placed)))


def resumed(stored: Placement, offered: Offer, config: Config, shards: int) -> Placement:
    """A resumed run's placement: its workers, their threads and loaders placed again on
    what this machine and these flags offer (a worker each for as many shards as there
    are); its precision and index, which are the run's identity, as planned."""
    devices = offered.devices[:shards]
    threads, loaders = _processes(config, devices)
    return replace(stored, devices=tuple(devices), threads=threads, loaders=loaders,
                   workers_note="")


def _processes(config: Config, devices: list[str]) -> tuple[int, int]:
    """Threads and data-loading processes of each worker: the machine's cores shared by
    the workers on it (torchrun says how many; else one per device, CPU workers one per
    shard)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or \
        (len(devices) if devices[0] == "cpu" else len(set(devices)))
    return max(1, usable_cores() // local), loader_workers(config.num_workers, devices[0],
                                                           local)


def loader_workers(requested: int | None, device: str, workers: int) -> int:
    """Data-loading processes of one worker: --num-workers, or on a GPU the cores left to
    each of the machine's `workers` after its own process; none on CPU, where model
    workers already fill every core and decoding costs a few percent of an image's time."""
    if requested is not None:
        return requested
    if not device.startswith("cuda"):
        return 0
    return max(1, min(MAX_LOADER_WORKERS, usable_cores() // max(1, workers) - 1))


def fit_to_work(config: Config, devices: list[str], work: float,
                batches: int | None = None) -> tuple[list[str], str]:
    """Without --cpu-workers, the number of CPU workers that finishes `work` (seconds of
    one core, `hnm.sizing.work_seconds`) soonest, when every worker but a lone one (which
    runs in the parent) costs WORKER_START_SECONDS to start: small runs stay in one
    process. Never more workers than `batches` (shards are cut on the batch grid: a worker
    past them would embed nothing). Also why fewer workers than devices, or "" when none
    are dropped."""
    if config.cpu_workers is not None or any(d != "cpu" for d in devices):
        return devices, ""

    def finish(workers: int) -> float:
        return (WORKER_START_SECONDS if workers > 1 else 0.0) + work / workers

    most = len(devices) if batches is None else max(1, min(len(devices), batches))
    best = min(range(1, most + 1), key=finish)  # the fewest workers on a tie
    if best == len(devices):
        return devices, ""
    return devices[:best], (f"about {work:.1f} s of work for one core keeps {best} CPU "
                            f"worker(s) busy; another takes about {WORKER_START_SECONDS:.0f} "
                            "s to start")


def _work(config: Config, ds: InputSummary) -> float:
    return work_seconds(config, len(ds), ds.num_phrases, _dim(
        config.image_embeddings, config.joint_model or config.visual_encoder))


def run_sizes(config: Config, ds: InputSummary, placement: Placement) -> Sizes:
    """The sizes a run's memory depends on."""
    path = Path(config.annotations or "")
    return Sizes(rows=len(ds), phrases=ds.num_phrases, anchors=ds.num_anchors,
                 dv=_dim(config.image_embeddings, config.joint_model or config.visual_encoder),
                 dt=_dim(config.text_embeddings, config.text_encoder),
                 annotation_bytes=path.stat().st_size if path.is_file() else 0,
                 workers=len(placement.devices),
                 device="cuda" if any(d.startswith("cuda") for d in placement.devices)
                 else "cpu", chunk_bytes=ds.chunk_bytes, loaders=placement.loaders)


def check_memory(config: Config, ds: InputSummary, placement: Placement,
                 offered: Offer | None = None) -> None:
    """Refuse a plan whose phases cannot fit this machine (one line naming the flag): its
    host memory, and the GPUs `offered` where an exact index must fit each one used."""
    check_fits(estimate(config, run_sizes(config, ds, placement), placement.index),
               sizing.host_available(), gpu_free_gib(offered, placement.devices),
               placement.index, list(placement.devices))


def gpu_free_gib(offered: Offer | None, devices: tuple[str, ...] | list[str]
                 ) -> float | None:
    """The least free memory (GiB, as NVML saw it when the run started) of the GPUs the
    run uses; None without any."""
    used = {d for d in devices if d.startswith("cuda")}
    free = [g.free_gb for g in (offered.gpus if offered else []) if f"cuda:{g.index}" in used]
    return min(free, default=None)


def _dim(precomputed: str | None, encoder: str) -> int:
    if precomputed:
        return int(np.load(precomputed, mmap_mode="r").shape[1])
    return embedding_dim(encoder)
