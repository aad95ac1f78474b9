"""GPU discovery through NVML; the parent process never initialises CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hnm.config import Config
from hnm.errors import HnmError
from hnm.host import available_kib


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: `index` is its CUDA ordinal inside this process's visible set."""

    index: int
    nvml_index: int
    name: str
    total_gb: float
    free_gb: float
    compute_capability: tuple[int, int] | None = None


def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def _visible(count: int, nvml: Any) -> list[int]:
    """NVML indices in CUDA_VISIBLE_DEVICES order (indices or UUIDs); all when unset."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    uuids = {}
    for i in range(count):
        uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
        uuids[uuid.decode() if isinstance(uuid, bytes) else uuid] = i
    out = []
    for item in (x.strip() for x in env.split(",") if x.strip()):
        index = int(item) if item.isdigit() else next(
            (i for u, i in uuids.items() if u.startswith(item)), None)
        if index is None or not 0 <= index < count:
            break  # CUDA stops at the first invalid entry too
        out.append(index)
    return out


def discover() -> tuple[list[Gpu], str | None]:
    """Visible GPUs, or an empty list and the reason there are none."""
    try:
        nvml = _nvml()
    except Exception as exc:  # the library is missing, or no driver: both mean CPU mode
        return [], f"NVML unavailable ({type(exc).__name__}: {exc})"
    try:
        count = nvml.nvmlDeviceGetCount()
        gpus = []
        for cuda_index, i in enumerate(_visible(count, nvml)):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(Gpu(cuda_index, i, name, mem.total / 2**30, mem.free / 2**30,
                            _capability(nvml, handle)))
    finally:
        nvml.nvmlShutdown()
    if not gpus:
        why = "CUDA_VISIBLE_DEVICES hides every GPU" if count else "NVML reports no GPU"
        return [], why
    return gpus, None


def _capability(nvml: Any, handle: Any) -> tuple[int, int] | None:
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except Exception:  # an old driver or library: the capability stays unknown
        return None


def memory_used_gb(nvml_index: int) -> float | None:
    """Memory in use on one GPU, for the progress view; None when NVML cannot say."""
    try:
        nvml = _nvml()
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
            return nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
        finally:
            nvml.nvmlShutdown()
    except Exception:
        return None


def choose_devices(config: Config, gpus: list[Gpu]) -> list[str]:
    """Devices the run uses, from --gpu-id / --gpu-ids / --num-gpus.

    Without any GPU the run falls back to CPU workers (as the original script did), even
    when GPUs were asked for; with too few GPUs it is an error listing what exists.
    """
    if not gpus:
        return ["cpu"] * cpu_workers(config)[0]
    wanted = _wanted(config)
    if wanted is None:
        return [f"cuda:{g.index}" for g in gpus]
    missing = [i for i in wanted if i >= len(gpus)]
    if missing:
        present = ", ".join(f"{g.index} ({g.name})" for g in gpus)
        raise HnmError(f"{_flag(config)}: asks for GPU(s) {missing} but only {len(gpus)} "
                       f"exist: {present}")
    return [f"cuda:{i}" for i in wanted]


# Peak resident memory of a CPU worker with both built-in encoders loaded (about 1.1 GiB
# measured on the demo), plus room for its share of the candidates phase.
CPU_WORKER_GB = 1.5
# What one more CPU worker process costs before it works: spawning it and importing torch,
# FAISS and hnm (measured with bench/bench_orchestrator.py --small: one worker against two
# on a run whose work takes under a second). Models load in every worker as they would in
# a single process, so they are not part of it.
WORKER_START_SECONDS = 3.0


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset set)."""
    return len(os.sched_getaffinity(0))


def available_memory_gb(meminfo: str = "/proc/meminfo") -> float | None:
    """Memory the kernel can give without swapping; None when it cannot be read."""
    kib = available_kib(meminfo)
    return None if kib is None else kib / 2**20


def cpu_workers(config: Config) -> tuple[int, str | None]:
    """CPU worker processes: --cpu-workers, or one per usable core as far as memory allows
    (then also why fewer than the cores)."""
    if config.cpu_workers is not None:
        return config.cpu_workers, None
    cores = usable_cores()
    memory = available_memory_gb()
    fits = cores if memory is None else max(1, int(memory // CPU_WORKER_GB))
    if fits < cores:
        return fits, (f"{memory:.1f} GiB of memory available, about {CPU_WORKER_GB} GiB "
                      f"per worker: {fits} of {cores} usable cores used")
    return cores, None


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


def describe(gpus: list[Gpu], reason: str | None, devices: list[str],
             config: Config | None = None) -> list[str]:
    """The guide's "Detected N GPU(s)" lines, or why the run uses CPU workers."""
    if not gpus:
        fewer = cpu_workers(config)[1] if config is not None else None
        return [f"No GPU: {reason}. Running on {len(devices)} CPU worker(s)."
                + (f" ({fewer})" if fewer else "")]
    lines = [f"Detected {len(gpus)} GPU(s): {[g.index for g in gpus]}"]
    lines += [f"   GPU {g.index}: {g.name}, {g.total_gb:.1f} GB ({g.free_gb:.1f} GB free)"
              for g in gpus]
    used = [d for d in devices if d.startswith("cuda")]
    lines.append(f"Using {len(used)} GPU(s): {', '.join(used)}")
    return lines
