"""Child processes that never outlive their parent."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

# set once SIGTERM arrived: a failure that follows is part of stopping, not a reason to retry
stopping = threading.Event()


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
