"""What the kernel says about this machine's memory (Linux's /proc/meminfo), read in one place."""

from __future__ import annotations


def available_kib(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in KiB: memory the kernel can give without swapping; None when it
    cannot be read (not Linux, or no such line)."""
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def available_memory_gb(meminfo: str = "/proc/meminfo") -> float | None:
    """MemAvailable in GiB; None when it cannot be read."""
    kib = available_kib(meminfo)
    return None if kib is None else kib / 2**20
