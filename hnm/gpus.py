"""GPU discovery through NVML; the parent process never initialises CUDA."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from hnm.errors import HnmError

# NVML numbers GPUs by PCI bus; CUDA, unless told otherwise, fastest first. The workers are
# told to number them as NVML does, so that `cuda:N` is the GPU discovery called N.
DEVICE_ORDER = ("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: `index` is its CUDA ordinal inside this process's visible set;
    `mig`: the MIG slot under NVML's GPU `nvml_index`, where it is a MIG device."""

    index: int
    nvml_index: int
    name: str
    total_gb: float
    free_gb: float
    compute_capability: tuple[int, int] | None = None
    mig: int | None = None


def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries() -> list[str] | None:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if env is None else [x.strip() for x in env.split(",") if x.strip()]


def _visible(count: int, nvml: Any) -> list[int]:
    """NVML indices in CUDA_VISIBLE_DEVICES order (indices or UUIDs); all when unset."""
    entries = _entries()
    if entries is None:
        return list(range(count))
    uuids = {_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))): i
             for i in range(count)}
    out = []
    for item in entries:
        index = int(item) if item.isdigit() else next(
            (i for u, i in uuids.items() if u.startswith(item)), None)
        if index is None or not 0 <= index < count:
            break  # CUDA stops at the first invalid entry too
        out.append(index)
    return out


def _migs(count: int, nvml: Any) -> dict[str, tuple[int, int]]:
    """Every MIG device NVML knows: its UUID -> (its GPU's NVML index, its slot)."""
    found = {}
    for i in range(count):
        parent = nvml.nvmlDeviceGetHandleByIndex(i)
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(parent)
        except Exception:  # no MIG support on this GPU or driver
            continue
        for slot in range(slots):
            try:
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
            except Exception:  # an empty slot
                continue
            found[_text(nvml.nvmlDeviceGetUUID(handle))] = (i, slot)
    return found


def _visible_mig(count: int, nvml: Any, entries: list[str]) -> tuple[int, int]:
    """The one MIG device CUDA_VISIBLE_DEVICES names: (NVML index of its GPU, its slot).
    A CUDA process enumerates a single MIG device, so a list of several (or of a MIG
    device and GPUs) is refused, as is a MIG device NVML does not know."""
    env = ",".join(entries)
    if len(entries) > 1:
        raise HnmError(f"CUDA_VISIBLE_DEVICES={env}: a CUDA process can use one MIG device "
                       f"only, listed alone, and this lists {len(entries)} devices; list one "
                       "MIG device (hnm then runs one worker on it) or whole GPUs")
    migs = _migs(count, nvml)
    where = next((v for u, v in migs.items() if u.startswith(entries[0])), None)
    if where is None:
        known = ", ".join(sorted(migs)) or "none"
        raise HnmError(f"CUDA_VISIBLE_DEVICES={env}: NVML knows no such MIG device (MIG "
                       f"devices: {known}); name one by its MIG-<uuid>")
    return where


def discover() -> tuple[list[Gpu], str | None]:
    """Visible GPUs, or an empty list and the reason there are none. A MIG device in
    CUDA_VISIBLE_DEVICES is used as the run's one GPU (or refused, one line naming the
    variable, where CUDA could not use it)."""
    try:
        nvml = _nvml()
    except Exception as exc:  # the library is missing, or no driver: both mean CPU mode
        return [], f"NVML unavailable ({type(exc).__name__}: {exc})"
    try:
        count = nvml.nvmlDeviceGetCount()
        entries = _entries() or []
        if any(e.startswith("MIG-") for e in entries):
            gpus = [_mig_gpu(nvml, *_visible_mig(count, nvml, entries))]
        else:
            gpus = [_gpu(nvml, cuda_index, i, nvml.nvmlDeviceGetHandleByIndex(i))
                    for cuda_index, i in enumerate(_visible(count, nvml))]
    finally:
        nvml.nvmlShutdown()
    if not gpus:
        why = "CUDA_VISIBLE_DEVICES hides every GPU" if count else "NVML reports no GPU"
        return [], why
    return gpus, None


def _gpu(nvml: Any, cuda_index: int, nvml_index: int, handle: Any,
         capability_of: Any = None, mig: int | None = None) -> Gpu:
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    return Gpu(cuda_index, nvml_index, _text(nvml.nvmlDeviceGetName(handle)),
               mem.total / 2**30, mem.free / 2**30,
               _capability(nvml, handle if capability_of is None else capability_of), mig)


def _mig_gpu(nvml: Any, nvml_index: int, slot: int) -> Gpu:
    """A MIG device as the run's GPU cuda:0: its own name and memory, its GPU's capability."""
    parent = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
    handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
    return _gpu(nvml, 0, nvml_index, handle, parent, slot)


def _capability(nvml: Any, handle: Any) -> tuple[int, int] | None:
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except Exception:  # an old driver or library: the capability stays unknown
        return None


def worker_environment() -> dict[str, str]:
    """What the environment of a GPU worker must hold: CUDA numbering GPUs as NVML does.
    Any other CUDA_DEVICE_ORDER is replaced (with it, `cuda:N` could be another GPU than
    the one discovery measured)."""
    return dict([DEVICE_ORDER])


class MemoryReader:
    """Memory in use on GPUs, for the progress view: NVML opened once, on the first
    reading, and shut down by `close` (not once per reading)."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handles: dict[tuple[int, int | None], Any] = {}
        self.failed = False

    def used_gb(self, nvml_index: int, mig: int | None = None) -> float | None:
        """GiB in use on one GPU (or MIG device); None when NVML cannot say."""
        if self.failed:
            return None
        try:
            if self.nvml is None:
                self.nvml = _nvml()
            key = (nvml_index, mig)
            if key not in self.handles:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(nvml_index)
                if mig is not None:
                    handle = self.nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig)
                self.handles[key] = handle
            return self.nvml.nvmlDeviceGetMemoryInfo(self.handles[key]).used / 2**30
        except Exception:  # no library, or a GPU that stopped answering: no readings
            self.failed = self.nvml is None
            return None

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):  # a library that went away: nothing to free
                self.nvml.nvmlShutdown()
            self.nvml = None
            self.handles.clear()
