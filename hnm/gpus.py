"""GPU discovery through NVML; the parent process never initialises CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


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
