"""GPUs for tests on a machine without one: NVML, torch.cuda and FAISS's GPU API, faked as
far as hnm uses them and faithful where a GPU run would fail.

- `FakeNvml`: GPUs (and MIG devices) with names, UUIDs, memory and compute capability;
  counts every nvmlInit.
- `FakeCuda`: torch.cuda's device, memory and context behaviour. Each GPU has a capacity;
  memory is taken by FAISS (`alloc`) and by torch (live tensors, and freed blocks that
  torch's caching allocator keeps until `empty_cache`), and `mem_get_info` reports what
  the driver would. A CUDA call that names no device works on the current device and
  opens its context (as cudaHostAlloc, cudaMalloc... do): `contexts` lists the GPUs a
  process touched.
- `FakeFaiss`: the `faiss` module with its GPU API. `GpuClonerOptions` has FAISS's fields
  and no others (setting another raises, as SWIG objects do); a GPU index refuses any k
  above FAISS's selection limit (2048), stores vectors and rounds queries to float16 when
  `useFloat16` is set (scores accumulate in float32), takes its vectors' memory from the
  GPU (an append reallocates: old and new storage live together, so a build peaks at
  about twice the table) and fails as cudaMalloc does when the GPU is full.
  `StandardGpuResources` allocates its pinned host buffer on the current device when it
  first serves a device (FAISS's cudaHostAlloc), opening that device's context.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import numpy as np

# FAISS's GPU k-selection limit (faiss/gpu/utils/DeviceDefs.cuh: GPU_MAX_SELECTION_K)
GPU_MAX_SELECTION_K = 2048
MIB = 2**20


class FakeNvml(types.SimpleNamespace):
    """Enough of pynvml: GPUs with names, UUIDs, memory, compute capability, and MIG
    devices (`migs`: NVML index -> list of (name, total bytes) slots)."""

    def __init__(self, names: list[str], total_gb: float = 11.0,
                 capability: tuple[int, int] | None = (8, 0),
                 migs: dict[int, list[tuple[str, int]]] | None = None) -> None:
        super().__init__(names=names, total=int(total_gb * 2**30), inits=0, opened=0,
                         capability=capability, migs=migs or {})

    def nvmlInit(self):
        self.inits += 1
        self.opened += 1

    def nvmlShutdown(self):
        if self.inits == 0:
            raise RuntimeError("NVML_ERROR_UNINITIALIZED")
        self.inits -= 1

    def _check(self):
        if self.inits <= 0:
            raise RuntimeError("NVML_ERROR_UNINITIALIZED")

    def nvmlDeviceGetCount(self):
        self._check()
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i):
        self._check()
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):
        return self.names[h[1]] if h[0] == "gpu" else self.migs[h[1]][h[2]][0]

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h[1]:04d}-abcd" if h[0] == "gpu" else f"MIG-{h[1]:02d}{h[2]:02d}-ef01"

    def nvmlDeviceGetMemoryInfo(self, h):
        self._check()
        if h[0] == "mig":
            total = self.migs[h[1]][h[2]][1]
            return types.SimpleNamespace(total=total, free=total, used=0)
        return types.SimpleNamespace(total=self.total, free=self.total - 2**30 * h[1],
                                     used=2**30 * h[1])

    def nvmlDeviceGetCudaComputeCapability(self, h):
        if h[0] != "gpu" or self.capability is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.capability

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        if h[1] not in self.migs:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, slot):
        if slot >= len(self.migs.get(h[1], [])):
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return ("mig", h[1], slot)


class FakeCuda:
    """torch.cuda's devices, memory and contexts (see the module's docstring)."""

    def __init__(self, totals: list[int]) -> None:
        self.total = list(totals)
        self.faiss = [0] * len(totals)  # bytes FAISS holds
        self.live = [0] * len(totals)  # bytes of live torch tensors
        self.cached = [0] * len(totals)  # freed by torch, kept by its caching allocator
        self.peak = [0] * len(totals)
        self.current = 0
        self.contexts: set[int] = set()

    def _index(self, device: Any = None) -> int:
        if device is None:
            self.contexts.add(self.current)  # no device named: the current one's context
            return self.current
        index = device if isinstance(device, int) else device.index
        if index is None:
            index = self.current
        if not 0 <= index < len(self.total):
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.contexts.add(index)
        return index

    def in_use(self, gpu: int) -> int:
        return self.faiss[gpu] + self.live[gpu] + self.cached[gpu]

    # torch.cuda's functions
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(self.total)

    def current_device(self) -> int:
        return self.current

    def set_device(self, device: Any) -> None:
        self.current = self._index(device)

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        gpu = self._index(device)
        return self.total[gpu] - self.in_use(gpu), self.total[gpu]

    def empty_cache(self) -> None:
        self.cached = [0] * len(self.total)

    # what the fakes allocate
    def alloc(self, gpu: int, nbytes: int) -> None:
        """FAISS's cudaMalloc: fails as it does when the GPU is full."""
        if self.in_use(gpu) + nbytes > self.total[gpu]:
            raise RuntimeError(
                f"Error in virtual void* faiss::gpu::StandardGpuResourcesImpl::allocMemory("
                f"const faiss::gpu::AllocRequest&): Error: 'err == cudaSuccess' failed: "
                f"StandardGpuResources: alloc fail type IVFLists dev {gpu} space Device "
                f"stream 0 size {nbytes} bytes (cudaMalloc error out of memory [2])")
        self.faiss[gpu] += nbytes
        self.peak[gpu] = max(self.peak[gpu], self.in_use(gpu))

    def free(self, gpu: int, nbytes: int) -> None:
        self.faiss[gpu] -= nbytes

    def tensor(self, gpu: int, nbytes: int) -> TorchMemory:
        """A torch allocation held by the returned object: once it is garbage, its bytes
        stay in torch's cache until empty_cache."""
        if self.in_use(gpu) + nbytes > self.total[gpu]:
            raise RuntimeError("CUDA out of memory")
        self.live[gpu] += nbytes
        self.peak[gpu] = max(self.peak[gpu], self.in_use(gpu))
        return TorchMemory(self, gpu, nbytes)

    def install(self, monkeypatch: Any) -> FakeCuda:
        import torch

        for name in ("is_available", "device_count", "current_device", "set_device",
                     "mem_get_info", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self


class TorchMemory:
    """Memory of a torch tensor on a fake GPU (an encoder's weights, say)."""

    def __init__(self, cuda: FakeCuda, gpu: int, nbytes: int) -> None:
        weakref.finalize(self, TorchMemory._release, cuda, gpu, nbytes)

    @staticmethod
    def _release(cuda: FakeCuda, gpu: int, nbytes: int) -> None:
        cuda.live[gpu] -= nbytes
        cuda.cached[gpu] += nbytes


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores of each row, best first (ties: lower row first), padded with
    -inf / -1 past the rows there are."""
    n = scores.shape[1]
    order = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=1)[:, :k]
    D = np.take_along_axis(scores, order, 1).astype(np.float32)
    I = order.astype(np.int64)
    if k > n:
        D = np.pad(D, ((0, 0), (0, k - n)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, k - n)), constant_values=-1)
    return D, I


class IndexFlatIP:
    """faiss.IndexFlatIP on the host: float32 inner products."""

    def __init__(self, d: int) -> None:
        self.d = d
        self.ntotal = 0
        self.xb = np.zeros((0, d), np.float32)

    def _rows(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise AssertionError(f"assert d == self.d failed: got {x.shape}, d={self.d}")
        return x

    def add(self, x: np.ndarray) -> None:
        self.xb = np.concatenate([self.xb, self._rows(x)])
        self.ntotal = len(self.xb)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            raise AssertionError("k > 0 failed")
        return _topk(self._rows(xq) @ self.xb.T, k)


class GpuClonerOptions:
    """faiss.GpuClonerOptions: FAISS's fields, and no others."""

    __slots__ = ("indicesOptions", "useFloat16CoarseQuantizer", "useFloat16",
                 "usePrecomputed", "reserveVecs", "storeTransposed", "verbose",
                 "allowCpuCoarseQuantizer", "use_cuvs")

    def __init__(self) -> None:
        self.indicesOptions = 1  # INDICES_64_BIT
        self.useFloat16CoarseQuantizer = False
        self.useFloat16 = False
        self.usePrecomputed = False
        self.reserveVecs = 0
        self.storeTransposed = False
        self.verbose = False
        self.allowCpuCoarseQuantizer = False
        self.use_cuvs = False


class GpuIndexFlatIP(IndexFlatIP):
    """A flat inner-product index on a fake GPU (see the module's docstring)."""

    def __init__(self, faiss: FakeFaiss, gpu: int, d: int, float16: bool) -> None:
        super().__init__(d)
        self.cuda, self.gpu, self.float16 = faiss.cuda, gpu, float16
        self.max_k = faiss.max_k
        self.itemsize = 2 if float16 else 4
        self.stored = 0  # bytes of vectors held on the GPU

    def add(self, x: np.ndarray) -> None:
        x = self._rows(x)
        size = (self.ntotal + len(x)) * self.d * self.itemsize
        self.cuda.alloc(self.gpu, size)  # the new storage, while the old one still lives
        self.cuda.free(self.gpu, self.stored)
        self.stored = size
        rows = x.astype(np.float16) if self.float16 else x
        self.xb = np.concatenate([self.xb, rows.astype(np.float32)])
        self.ntotal = len(self.xb)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > self.max_k:
            raise RuntimeError(
                "Error in void faiss::gpu::bfKnnOnDevice(...): Error: "
                f"'k <= GPU_MAX_SELECTION_K' failed: k must be <= {self.max_k} "
                f"(requested {k})")
        q = self._rows(xq)
        if self.float16:  # FAISS converts the queries to half as well
            q = q.astype(np.float16).astype(np.float32)
        return _topk(q @ self.xb.T, k)

    def __del__(self) -> None:
        self.cuda.free(self.gpu, self.stored)
        self.stored = 0


class FakeFaiss(types.ModuleType):
    """The `faiss` module, with a GPU API over `cuda` (a FakeCuda)."""

    def __init__(self, cuda: FakeCuda, max_k: int = GPU_MAX_SELECTION_K) -> None:
        super().__init__("faiss")
        self.cuda, self.max_k = cuda, max_k
        self.resources: list[Any] = []
        self.IndexFlatIP = IndexFlatIP
        self.GpuClonerOptions = GpuClonerOptions
        outer = self

        class StandardGpuResources:
            def __init__(self) -> None:
                self.devices: set[int] = set()
                outer.resources.append(self)

            def serve(self, gpu: int) -> None:
                if gpu not in self.devices:
                    cuda._index()  # the pinned host buffer: cudaHostAlloc, current device
                    self.devices.add(gpu)

        self.StandardGpuResources = StandardGpuResources

    def omp_set_num_threads(self, threads: int) -> None:
        pass

    def index_cpu_to_gpu(self, res: Any, gpu: int, index: IndexFlatIP,
                         options: GpuClonerOptions | None = None) -> GpuIndexFlatIP:
        if not isinstance(res, self.StandardGpuResources):
            raise TypeError("in method 'index_cpu_to_gpu', argument 1 of type "
                            "'faiss::gpu::GpuResourcesProvider *'")
        if type(index) is not IndexFlatIP:
            raise RuntimeError("this fake clones flat inner-product indexes only")
        res.serve(gpu)
        self.cuda._index(gpu)  # FAISS works on `gpu` inside a DeviceScope
        options = options or GpuClonerOptions()
        out = GpuIndexFlatIP(self, gpu, index.d, bool(options.useFloat16))
        if index.ntotal:
            out.add(index.xb)
        return out

    def install(self, monkeypatch: Any) -> FakeFaiss:
        import sys

        monkeypatch.setitem(sys.modules, "faiss", self)
        return self
