"""Arrays of per-row working state held in memory-mapped temporary files: their pages
belong to the file (the kernel writes them back and drops them as memory is needed),
not to the process, so a process's own memory does not grow with the rows' count.

The files are unnamed (`safety.scratch_file`, in $TMPDIR): nothing is left behind
when the process ends, however it ends. $TMPDIR should be on a disk, not in memory
(tmpfs): there the pages would be memory again.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from hnm.safety import scratch_file

SMALL = 1 << 16  # bytes below which an array stays in memory (a page table costs more)


def scratch_array(n: int, dtype: Any) -> np.ndarray:
    """A zeroed, writable array of n values whose pages are a temporary file's (a plain
    array where it is small). It lives as long as any view of it."""
    dtype = np.dtype(dtype)
    size = n * dtype.itemsize
    if size < SMALL:
        return np.zeros(n, dtype)
    with scratch_file() as handle:
        handle.truncate(size)
        pages = mmap.mmap(handle.fileno(), size)  # the map keeps the file's pages
    return np.frombuffer(pages, dtype)


def scratch_copy(values: np.ndarray) -> np.ndarray:
    """A 1-d array's values in a scratch array."""
    out = scratch_array(len(values), values.dtype)
    out[:] = values
    return out
