"""Child processes that never outlive their parent."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

# set once SIGTERM arrived: a failure that follows is part of stopping, not a reason to retry
stopping = threading.Event()


def release_memory() -> None:
    """Give what was freed back to the system: objects in reference cycles (they may
    still hold memory maps) collected, and the free blocks glibc keeps of many small
    allocations (records read while planning, an index's lists) returned."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).malloc_trim(0)


def settle_imports() -> None:
    """Leave what is alive now (the modules imported, and the objects they made) out of
    the garbage collector's scans for the rest of the process: a collection then walks
    the objects a run makes, not every module's, and costs a few ms, not tens. They are
    still freed when nothing refers to them."""
    import gc

    gc.freeze()


def die_with_parent() -> None:
    """Make the kernel kill this process (SIGKILL) the moment its parent dies, whatever
    kills the parent; exit now if the parent is already gone. Linux only (elsewhere the
    workers' own parent checks remain)."""
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def loader_worker_init(_worker_id: int) -> None:
    """A DataLoader worker: dies with the process it loads for, and leaves its process
    group, so that Ctrl-C or a SIGTERM sent to the run's group reaches only that process,
    which then stops its loaders itself (were a loader to die of the signal first, the stop
    would look like a loader crash). SIGTERM sent to the loader alone still ends it."""
    die_with_parent()
    os.setpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, if forked
