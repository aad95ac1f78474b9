"""The GPU path on a machine without a GPU, against fakes that fail where a GPU would
(tests/fake_gpu.py): FAISS's k limit and float16 rounding, the index's memory at its build
peak, measured once the encoders are gone, the fit checked before any embedding, the
worker's device and numbering, MIG devices, bf16 on older GPUs, NVML in the live view."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fake_gpu import MIB, FakeCuda, FakeFaiss, FakeNvml, GpuClonerOptions
from synthetic import make_dataset, mine_args

from hnm import cli, gpus, placement, precision, progress
from hnm import index as hindex
from hnm.config import Config
from hnm.errors import HnmError
from hnm.grid import finalize
from hnm.index import FaissFlatIP, build_index
from hnm.lifecycle import load_run_config
from hnm.miner import nearest
from hnm.run import pool as hpool
from hnm.run import worker
from hnm.storage import RunDir


def bunches(n: int = 400, dim: int = 8, seed: int = 0, noise: float = 1e-3) -> np.ndarray:
    """Rows in three tight bunches: hundreds of near-ties per anchor."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    return finalize(centres[rng.integers(0, 3, n)] + noise * rng.normal(size=(n, dim)))


def brute_nearest(V: np.ndarray, k: int) -> list[list[int]]:
    """N(a) by the SPEC: the k highest exact (float64) similarities, self out, ties by row."""
    sv = V.astype(np.float64) @ V.astype(np.float64).T
    return [sorted((j for j in range(len(V)) if j != a), key=lambda j: (-sv[a, j], j))[:k]
            for a in range(len(V))]


def lists(rows: np.ndarray) -> list[list[int]]:
    return [[int(r) for r in row if r >= 0] for row in rows]


@pytest.fixture
def gpu(monkeypatch):
    """Two fake GPUs of 64 MiB under torch.cuda and faiss (FAISS's resources made anew)."""
    cuda = FakeCuda([64 * MIB, 64 * MIB]).install(monkeypatch)
    faiss = FakeFaiss(cuda).install(monkeypatch)
    monkeypatch.setattr(hindex, "_GPU_RESOURCES", {})
    return cuda, faiss


# --- the fake itself refuses what FAISS refuses


def test_the_fake_refuses_what_faiss_on_a_gpu_refuses(gpu):
    cuda, faiss = gpu
    options = GpuClonerOptions()
    with pytest.raises(AttributeError):
        options.useFloat16Storage = True  # not a FAISS option
    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 1, faiss.IndexFlatIP(8))
    index.add(bunches(100))
    with pytest.raises(RuntimeError, match="k must be <= 2048 \\(requested 2049\\)"):
        index.search(bunches(2), 2049)  # above the limit, even with 100 rows
    big = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(1024))
    rows = np.ones((4096, 1024), np.float32)  # 16 MiB a block
    for _ in range(2):
        big.add(rows)
    assert cuda.peak[0] == 48 * MIB  # 16 MiB and then 32: both alive while copying
    with pytest.raises(RuntimeError, match="cudaMalloc error out of memory"):
        big.add(rows)  # 32 MiB held, 48 more asked of 64


# --- FAISS's k limit


def test_k_past_the_rows_is_never_asked_of_a_gpu_index_above_its_limit(gpu):
    """A search for more results than there are rows asks FAISS for the rows there are:
    with 60 rows, k = 3000 is not refused, and the lists are the exact ones."""
    V = bunches(60)
    index = FaissFlatIP(V, gpu=0)
    D, I = index.search(V[:5], 3000)
    assert I.shape == (5, 3000) and (I[:, 60:] == -1).all() and np.isneginf(D[:, 60:]).all()
    assert lists(nearest(index, V, np.arange(60), 59, -np.inf)[0]) == brute_nearest(V, 59)


def test_searches_above_the_gpu_limit_go_to_the_hosts_exact_search(monkeypatch, gpu):
    """With FAISS's limit at 64, N(a) among hundreds of near-ties widens past it on the
    host, and is still the exact list."""
    cuda, _ = gpu
    faiss = FakeFaiss(cuda, max_k=64).install(monkeypatch)
    V = bunches(400)
    index = FaissFlatIP(V, gpu=0, max_k=faiss.max_k)
    wide = []
    search = index.wide.search
    monkeypatch.setattr(index.wide, "search", lambda xq, k: wide.append(k) or search(xq, k))
    got, _ = nearest(index, V, np.arange(len(V)), 30, -np.inf)
    assert lists(got) == brute_nearest(V, 30)
    assert wide and min(wide) > 64


# --- float16 storage


def test_float16_rounding_changes_the_nearest_order_and_rescoring_restores_it(gpu):
    V = bunches(400, noise=3e-4)
    index = build_index(V, "cuda:0", float16=True)
    assert index.kind == "faiss-gpu-fp16"
    exact = brute_nearest(V, 20)
    _, proposed = index.index.search(V, 21)  # FAISS's own order, self included
    proposed = [[int(r) for r in row if r != a][:20] for a, row in enumerate(proposed)]
    changed = sum(p != e for p, e in zip(proposed, exact))
    assert changed > 100  # float16 (vectors and queries) reorders most lists
    assert lists(nearest(index, V, np.arange(len(V)), 20, -np.inf)[0]) == exact


# --- memory: the build peak, measured once the encoders are gone


def test_the_index_is_budgeted_at_its_build_peak(gpu, monkeypatch):
    """A table of 16 MiB on a GPU with 24 MiB free fits (0.8 of it is 19.2 MiB) but its
    build does not (appended 2 MiB at a time, the last append holds 30 MiB): it goes to
    float16, whose build peaks at 15 MiB."""
    cuda, _ = gpu
    monkeypatch.setattr(hindex, "ADD_ROWS", 512)
    cuda.faiss[:] = [40 * MIB, 40 * MIB]  # someone else's
    V = np.ones((4096, 1024), np.float32)
    assert hindex.placement(V.nbytes, "cuda:0") == ("cuda:0", True)
    with pytest.raises(RuntimeError, match="out of memory"):
        FaissFlatIP(V, gpu=0)  # what the 0.8 of the free memory, without the peak, chose
    assert build_index(V, "cuda:1", float16=True).kind == "faiss-gpu-fp16"
    assert cuda.peak[1] == (40 + 7 + 8) * MIB


@pytest.fixture
def finished_run(tmp_path):
    """A small finished CPU run on precomputed embeddings, with its candidate lists."""
    paths = make_dataset(tmp_path / "data", n=60, seed=5, dims=(256, 32))
    out = tmp_path / "run"
    assert cli.main(mine_args(paths, out, "--cpu-workers", "1", "--index", "exact")) == 0
    return out


def test_a_gpu_worker_releases_its_encoders_before_it_measures_and_mines(gpu, finished_run,
                                                                         monkeypatch):
    """The encoders of the embed phase hold most of the GPU: read with them (or with
    torch's cache of their memory) the table would go to float16; read after, it is kept
    in float32, and the candidate lists are the CPU worker's."""
    cuda, _ = gpu
    config = load_run_config(RunDir(finished_run))
    run = RunDir(finished_run)
    before = np.load(run.candidates(0))
    before = {k: before[k] for k in before.files}
    ctx = worker.Context(config, "cuda:1")
    table = np.load(run.table("visual")).nbytes
    held = 64 * MIB - int(hindex.BUILD_PEAK * table / 0.8) + 1024  # less than the peak left
    ctx.__dict__["image_encoder"] = cuda.tensor(1, held // 2)
    ctx.__dict__["text_encoder"] = cuda.tensor(1, held - held // 2)
    info = worker.candidates_shard(ctx, 0, lambda *_: None)
    assert info["index"] == "faiss-gpu"
    assert "image_encoder" not in ctx.__dict__ and cuda.live[1] == cuda.cached[1] == 0
    after = np.load(run.candidates(0))
    assert set(after.files) == set(before)
    for key in before:
        assert np.array_equal(after[key], before[key], equal_nan=True), key
    assert cuda.contexts == {1}  # nothing ran on GPU 0


def test_without_set_device_first_faiss_opens_a_context_on_gpu_0(gpu, finished_run):
    """What the worker's set_device prevents: FAISS's first use of its resources allocates
    pinned memory on the current device."""
    cuda, _ = gpu
    V = np.load(RunDir(finished_run).table("visual"))
    build_index(V, "cuda:1")
    assert cuda.contexts == {0, 1}
    cuda.contexts.clear()
    hindex._GPU_RESOURCES.clear()
    worker.Context(load_run_config(RunDir(finished_run)), "cuda:1")
    assert cuda.current == 1
    build_index(V, "cuda:1")
    assert cuda.contexts == {1}


def test_a_worker_refuses_an_exact_index_its_gpu_cannot_hold_in_one_line(gpu, finished_run):
    """The GPU filled since the run was planned (another job): the candidates phase stops
    with one line naming the flag, instead of failing inside FAISS."""
    cuda, _ = gpu
    ctx = worker.Context(load_run_config(RunDir(finished_run)), "cuda:0")
    cuda.faiss[0] = 64 * MIB - 40_000  # 40,000 bytes free; the table is 61,440
    with pytest.raises(HnmError) as err:
        ctx.search_index
    assert str(err.value) == ("--index: an exact index of 60 rows needs 120.0 KiB while it is "
                              "built (60.0 KiB in float16), more than 80% of what cuda:0 has "
                              "free; use --index ivf")


def test_a_run_checks_that_its_index_fits_the_gpus_before_embedding(monkeypatch, tmp_path,
                                                                     capsys):
    """Not only --dry-run: a real run on a GPU too small for its exact index stops while
    planning, before any worker starts or any embedding is written."""
    nvml = FakeNvml(["Small GPU"], total_gb=0.002)  # 2 MiB free
    monkeypatch.setattr(gpus, "_nvml", lambda: nvml.nvmlInit() or nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hpool.WorkerPool, "__enter__",
                        lambda self: pytest.fail("workers started"))
    paths = make_dataset(tmp_path / "data", n=1000, seed=1, dims=(512, 32))
    out = tmp_path / "run"
    status = cli.main(mine_args(paths, out, "--index", "exact"))
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert err == ("hnm: error: --index: an exact index of this table needs 3.9 MiB per GPU "
                   "while it is built (2.0 MiB in float16), more than 80% of the 2.0 MiB "
                   "free on the fullest GPU used; use --index ivf")
    assert not list((out / "embeddings").glob("*.npy"))


# --- the workers' devices


def test_gpu_workers_number_gpus_as_nvml_does(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    hpool.WorkerPool(Config(), ["cpu", "cpu"], None)
    assert hpool.os.environ["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    hpool.WorkerPool(Config(), ["cuda:0", "cuda:1"], None)
    assert hpool.os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_a_torchrun_rank_numbers_gpus_as_nvml_does(gpu, monkeypatch):
    from hnm.run import distributed

    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert distributed._device(1) == "cuda:1"
    assert distributed.os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


@pytest.fixture
def mig_nvml(monkeypatch):
    nvml = FakeNvml(["NVIDIA A100-SXM4-40GB"] * 2,
                    migs={1: [("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 20 * 2**30),
                              ("NVIDIA A100-SXM4-40GB MIG 2g.10gb", 10 * 2**30)]})
    monkeypatch.setattr(gpus, "_nvml", lambda: nvml.nvmlInit() or nvml)
    return nvml


def test_a_mig_device_in_cuda_visible_devices_is_the_runs_gpu(mig_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0101")
    found, reason = gpus.discover()
    assert reason is None
    assert found == [gpus.Gpu(0, 1, "NVIDIA A100-SXM4-40GB MIG 2g.10gb", 10.0, 10.0, (8, 0), 1)]
    offered = placement.offer(Config())
    assert offered.devices == ["cuda:0"] and offered.nvml == {"cuda:0": (1, 1)}
    assert mig_nvml.inits == 0


@pytest.mark.parametrize("env,message", [
    ("MIG-0100,MIG-0101", "CUDA_VISIBLE_DEVICES=MIG-0100,MIG-0101: a CUDA process can use "
                          "one MIG device only, listed alone, and this lists 2 devices; list "
                          "one MIG device (hnm then runs one worker on it) or whole GPUs"),
    ("0,MIG-0101", "CUDA_VISIBLE_DEVICES=0,MIG-0101: a CUDA process can use one MIG device "
                   "only, listed alone, and this lists 2 devices; list one MIG device (hnm "
                   "then runs one worker on it) or whole GPUs"),
    ("MIG-9999", "CUDA_VISIBLE_DEVICES=MIG-9999: NVML knows no such MIG device (MIG "
                 "devices: MIG-0100-ef01, MIG-0101-ef01); name one by its MIG-<uuid>"),
])
def test_mig_devices_cuda_cannot_use_are_refused_in_one_line(mig_nvml, monkeypatch, env,
                                                             message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    with pytest.raises(HnmError) as err:
        placement.offer(Config())
    assert str(err.value) == message
    assert mig_nvml.inits == 0


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    nvml = FakeNvml(["Tesla V100-SXM2-16GB"] * 2, capability=(7, 0))
    monkeypatch.setattr(gpus, "_nvml", lambda: nvml.nvmlInit() or nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    message = ("--precision bf16: cuda:0 (Tesla V100-SXM2-16GB) is of compute capability 7.0, "
               "without bf16 (8.0 and later have it); use --precision fp16 or fp32")
    with pytest.raises(HnmError) as err:
        precision.resolve("bf16", ["cuda:0", "cuda:1"])
    assert str(err.value) == message
    assert precision.resolve("fp16", ["cuda:0"]).precision == "fp16"
    assert precision.resolve("bf16", ["cpu"]).precision == "bf16"  # a CPU emulates it
    paths = make_dataset(tmp_path / "data", n=40, seed=2)
    assert cli.main(mine_args(paths, tmp_path / "run", "--precision", "bf16",
                              "--dry-run")) != 0
    assert capsys.readouterr().err.strip() == f"hnm: error: {message}"


def test_the_live_view_opens_nvml_once_per_run(monkeypatch):
    nvml = FakeNvml(["A", "B"])
    monkeypatch.setattr(gpus, "_nvml", lambda: nvml.nvmlInit() or nvml)
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    view = progress.ProgressView([{"shard": 0, "device": "cuda:0"},
                                  {"shard": 1, "device": "cuda:1"}], "live",
                                 {"cuda:0": (0, None), "cuda:1": (1, None)})
    view.console.file = io.StringIO()
    with view:
        for second in range(30):  # 30 seconds of progress, 4 refreshes a second
            for quarter in range(4):
                clock[0] = second + quarter / 4
                view.progress(second % 2, "embed", second, 30)
        assert view._memory == {"cuda:0": 0.0, "cuda:1": 1.0}
    assert (nvml.opened, nvml.inits) == (1, 0)  # opened once, and shut down with the view
