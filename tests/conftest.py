"""Test setup: offline, CPU, the tests folder importable (for the reference)."""

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


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if item.module.__name__ in PROCESS_MODULES:
            item.add_marker(pytest.mark.slow)
