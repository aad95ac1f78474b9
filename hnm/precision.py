"""The precision encoders run in: `auto` is resolved once, by the leader, from the hardware,
and every worker embeds in what the plan says."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hnm import gpus
from hnm.errors import HnmError

# CPU flags of native bf16 arithmetic; without them bf16 is emulated and slower than fp32
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 tensor cores arrived with Ampere (compute capability 8.0)
GPU_BF16_CAPABILITY = (8, 0)
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# Where the CPU's flags are read: HNM_CPUINFO names another file of the same form, to see
# what `auto` chooses on another kind of CPU (the test suite runs once per kind this way).
CPUINFO_ENV = "HNM_CPUINFO"


@dataclass(frozen=True)
class Choice:
    """The precision the run embeds in, and why."""

    precision: str
    reason: str

    def line(self) -> str:
        return f"Precision: {self.precision} ({self.reason})"


def resolve(requested: str, devices: list[str], found: list[gpus.Gpu] | None = None
            ) -> Choice:
    """`requested` as given, or for "auto": bf16 where every device runs it natively
    (`found`: the GPUs NVML reported, asked again when not given)."""
    if requested == "bf16" and devices and all(d.startswith("cuda") for d in devices):
        _refuse_bf16(devices, gpus.discover()[0] if found is None else found)
    if requested != "auto":
        return Choice(requested, "--precision")
    if devices and all(d.startswith("cuda") for d in devices):
        native, why = _gpus_bf16(devices, gpus.discover()[0] if found is None else found)
    else:
        native, why = _cpu_bf16(Path(os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo"))
    return Choice("bf16" if native else "fp32", f"auto: {why}")


def _cpu_bf16(cpuinfo: Path) -> tuple[bool, str]:
    try:
        flags = next((line.split(":", 1)[1].split() for line in
                      cpuinfo.read_text().splitlines() if line.startswith("flags")), [])
    except OSError:
        return False, f"{cpuinfo} unreadable, so no native bf16 assumed"
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, "this CPU has no native bf16 (AVX512-BF16 or AMX)"


def _gpus_bf16(devices: list[str], found: list[gpus.Gpu]) -> tuple[bool, str]:
    capability = {f"cuda:{g.index}": g.compute_capability for g in found}
    used = [capability.get(d) for d in dict.fromkeys(devices)]
    if any(c is None for c in used):
        return False, "a GPU's compute capability is unknown"
    low = min(used)
    if low >= GPU_BF16_CAPABILITY:
        return True, "every GPU has bf16 tensor cores"
    return False, f"a GPU of compute capability {low[0]}.{low[1]} has no bf16 tensor cores"


def _refuse_bf16(devices: list[str], found: list[gpus.Gpu]) -> None:
    """--precision bf16 on a GPU older than Ampere: one line naming it (torch would run
    without complaint, emulating bf16 far slower, or fail inside a kernel)."""
    by_device = {f"cuda:{g.index}": g for g in found}
    for device in dict.fromkeys(devices):
        gpu = by_device.get(device)
        if gpu is not None and gpu.compute_capability is not None \
                and gpu.compute_capability < GPU_BF16_CAPABILITY:
            major, minor = gpu.compute_capability
            raise HnmError(f"--precision bf16: {device} ({gpu.name}) is of compute capability "
                           f"{major}.{minor}, without bf16 (8.0 and later have it); use "
                           "--precision fp16 or fp32")


def autocast(device: Any, precision: str) -> Any:
    """The context a forward pass runs in: fp32 as it is, else torch's autocast."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, DTYPES[precision]))
