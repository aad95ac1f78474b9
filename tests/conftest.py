"""Test setup: offline, CPU, the tests folder importable (for the reference).

The suite's rule on time: no test decides pass or fail by the clock. A test that acts on a
running run (a signal, a kill, a look at its processes) does so at a named point the run
reaches and waits at (hnm.testpoints, through tests/points.py), then releases it; it never
sleeps, and never polls the process tree for a moment to act. A wait for processes to end
is woken by their exit (pidfd). Every timeout left is a safety net of minutes
(points.SAFETY_S) that a healthy run on the slowest supported machine never meets. Tests
that start processes are marked `processes`; `make test-stress` runs them three times with
a core kept busy, then on one core.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_thread():
    """The pipeline's CPU setting (hnm.embed.torch_setup): one torch thread per worker."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Modules whose every test starts processes (launch.py, worker pools, torchrun): with the
# tests marked `slow` by hand elsewhere, `make test-fast` leaves them out.
PROCESS_MODULES = {"test_orchestrator", "test_processes"}
# Modules whose tests start, signal or kill processes: `processes` (make test-stress), with
# the tests marked so by hand elsewhere.
STRESSED_MODULES = PROCESS_MODULES | {"test_reliability"}


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if item.module.__name__ in PROCESS_MODULES:
            item.add_marker(pytest.mark.slow)
        if item.module.__name__ in STRESSED_MODULES:
            item.add_marker(pytest.mark.processes)
