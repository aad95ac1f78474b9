"""Pickles read without running their code: an explicit allow-list of data-only constructors,
and a writer that puts back what was read (for the AVDN processed dataset, hnm.avdn).

Unpickling calls whatever the file names; this unpickler resolves a name only when it is on
`allowed()`, every other one is refused (`Refused`), so that a pickle can rebuild tensors,
arrays and containers and nothing else. Torch tensors are rebuilt from their bytes by hnm
itself: torch's own route (`torch.storage._load_from_bytes`) calls `torch.load` unrestricted.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

# torch.save's legacy format (what pickling a storage embeds) starts with this number
TORCH_MAGIC = 0x1950A86A20F9469CFC6C
# legacy storage classes named in that format -> element type
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32",
                  "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                  "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                  "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


class Refused(Exception):
    """A pickle names a global that is not on the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class Kept:
    """An object of a class hnm never constructs (a fast tokenizer's `tokenizers.Encoding`):
    its class's name, arguments and state are kept, and written back as they came."""

    origin: tuple[str, str] = ("", "")

    def __new__(cls, *args: Any) -> Kept:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{'.'.join(self.origin)} (kept as read)>"


class KeptMapping(dict):
    """A tokenizer's `BatchEncoding`, read as the plain mapping of its data (input_ids,
    attention_mask, ...) without importing transformers; its whole state is kept, and it is
    written back as a BatchEncoding."""

    origin: tuple[str, str] = ("", "")

    def __new__(cls, *args: Any) -> KeptMapping:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any) -> None:  # called when a pickle calls the class itself
        if args and isinstance(args[0], dict):
            self.update(args[0])

    def __setstate__(self, state: Any) -> None:
        self.state = state
        if isinstance(state, dict) and isinstance(state.get("data"), dict):
            self.update(state["data"])


_kept_classes: dict[tuple[str, str], type] = {}


def _kept(base: type, module: str, name: str) -> type:
    """The stand-in class of one named class (one per name, so that it can be written back)."""
    key = (module, name)
    if key not in _kept_classes:
        _kept_classes[key] = type(name, (base,), {"origin": key, "__module__": __name__})
    return _kept_classes[key]


# ---------------------------------------------------------------- torch tensors, safely


class _StorageRef:
    def __init__(self, dtype: str, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Header(pickle.Unpickler):
    """The plain values of torch's legacy format: numbers, a dict of sizes, a list of keys."""

    def find_class(self, module: str, name: str) -> Any:
        raise Refused(module, name)


class _StorageRecord(pickle.Unpickler):
    """The record of one storage: its class (the element type) and its key."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise Refused(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and pid[5] is None):
            raise pickle.UnpicklingError(f"unexpected storage record {pid!r}")
        return _StorageRef(pid[1].dtype, str(pid[2]), int(pid[4]))


def storage_from_bytes(data: bytes) -> Any:
    """A pickled torch storage (torch.save's legacy format) as a flat tensor on the CPU,
    read without torch.load: plain values, then the storage's record, then its raw bytes."""
    import torch

    f = io.BytesIO(data)
    if _Header(f).load() != TORCH_MAGIC:
        raise pickle.UnpicklingError("a pickled torch storage without torch's magic number")
    _Header(f).load()  # format version
    info = _Header(f).load()
    order = "<" if not isinstance(info, dict) or info.get("little_endian", True) else ">"
    ref = _StorageRecord(f).load()
    keys = _Header(f).load()
    if not isinstance(ref, _StorageRef) or keys != [ref.key]:
        raise pickle.UnpicklingError("a pickled torch storage holding something else")
    numel = int.from_bytes(f.read(8), "little" if order == "<" else "big")
    bfloat = ref.dtype == "bfloat16"
    dtype = np.dtype("uint16" if bfloat else ref.dtype).newbyteorder(order)
    if numel != ref.numel or len(data) - f.tell() < numel * dtype.itemsize:
        raise pickle.UnpicklingError("a pickled torch storage cut short")
    # one copy, straight from the pickle's bytes, in this machine's byte order
    values = np.frombuffer(data, dtype, count=numel, offset=f.tell())
    flat = torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))
    return flat.view(torch.bfloat16) if bfloat else flat


def rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple,
                   requires_grad: bool = False, hooks: Any = None, metadata: Any = None) -> Any:
    """torch._utils._rebuild_tensor_v2 (and _rebuild_tensor): a view of the storage."""
    tensor = storage.as_strided(tuple(size), tuple(stride), int(offset))
    return tensor.requires_grad_(bool(requires_grad)) if tensor.is_floating_point() else tensor


def rebuild_from_type(func: Callable, new_type: Any, args: tuple, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2, for plain tensors only."""
    import torch

    if new_type is not torch.Tensor or func not in (rebuild_tensor,):
        raise pickle.UnpicklingError("a tensor subclass, which hnm does not rebuild")
    return func(*args)


# ---------------------------------------------------------------- the allow-list


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode as protocol 0-2 pickles use it for bytes (nothing else)."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (protocols 0 and 1), for the stand-in classes only."""
    if not (isinstance(cls, type) and issubclass(cls, Kept | KeptMapping)):
        raise pickle.UnpicklingError("copyreg._reconstructor of a class hnm does not build")
    obj = cls.__new__(cls)
    if isinstance(obj, dict) and isinstance(state, dict):
        obj.update(state)
    return obj


def _numpy() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core
    names = {}
    for package in ("numpy.core", "numpy._core"):
        names[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        names[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        names[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    names[("numpy", "ndarray")] = np.ndarray
    names[("numpy", "dtype")] = np.dtype
    return names


def _torch() -> dict[tuple[str, str], Any]:
    import torch

    return {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
            ("torch._tensor", "_rebuild_from_type_v2"): rebuild_from_type,
            ("torch.storage", "_load_from_bytes"): storage_from_bytes,
            ("torch._tensor", "Tensor"): torch.Tensor, ("torch", "Tensor"): torch.Tensor,
            ("torch", "Size"): torch.Size}


BUILTINS = {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex,
            "slice": slice, "range": range}
# classes read through a stand-in: (module, name) -> stand-in base class
STAND_INS = {("transformers.tokenization_utils_base", "BatchEncoding"): KeptMapping,
             ("transformers.tokenization_utils", "BatchEncoding"): KeptMapping,
             ("tokenizers", "Encoding"): Kept}
_allowed: dict[tuple[str, str], Any] = {}


def allowed() -> dict[tuple[str, str], Any]:
    """Every global a pickle may name, and what hnm gives it instead (built once)."""
    if not _allowed:
        _allowed.update({(m, n): f for m in ("builtins", "__builtin__")
                         for n, f in BUILTINS.items()})
        _allowed.update({("collections", "OrderedDict"): OrderedDict,
                         ("_codecs", "encode"): _latin1,
                         ("copyreg", "_reconstructor"): _reconstructor,
                         ("copy_reg", "_reconstructor"): _reconstructor,
                         **_numpy(), **_torch()})
        _allowed.update({key: _kept(base, *key) for key, base in STAND_INS.items()})
    return _allowed


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the names on the allow-list; anything else raises `Refused`."""

    def find_class(self, module: str, name: str) -> Any:
        found = allowed().get((module, name))
        if found is None:
            raise Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids (a torch.save file?) are not read")


def load(handle: BinaryIO) -> Any:
    """One pickle from an open file, through the allow-list."""
    return SafeUnpickler(handle).load()


# ---------------------------------------------------------------- writing back


class _Blob:
    """A storage to be written as torch pickles one: `_load_from_bytes(legacy bytes)`."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Writer(pickle._Pickler):  # the Python pickler: the only one that lets a class be
    # written under a name other than where it lives (the stand-ins under their originals)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Kept | KeptMapping):
            return copyreg.__newobj__, (type(obj), *obj.args), obj.state
        if isinstance(obj, _Blob):
            import torch.storage

            return torch.storage._load_from_bytes, (obj.data,)
        if type(obj).__module__ == "torch" and type(obj).__name__ == "Tensor":
            return _tensor_reduce(obj)
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        origin = getattr(obj, "origin", None)
        if not (isinstance(obj, type) and issubclass(obj, Kept | KeptMapping) and origin):
            return super().save_global(obj, name)
        self.save(origin[0])
        self.save(origin[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def _tensor_reduce(tensor: Any) -> tuple:
    """What pickling a tensor writes, with its storage as torch.save's legacy format under
    the key "0" (torch names it by a memory address: the bytes would differ every time)."""
    import torch._utils

    t = tensor.detach().cpu().contiguous()
    stride = tuple(t.stride())
    hooks: OrderedDict = OrderedDict()
    return torch._utils._rebuild_tensor_v2, (_Blob(storage_bytes(t)), 0, tuple(t.shape),
                                             stride, tensor.requires_grad, hooks)


class _StorageStub:
    pass


def storage_bytes(t: Any) -> bytes:
    """A contiguous CPU tensor's data as a pickled torch storage (torch.save's legacy
    format): magic number, format version, system info, the storage's record, its key,
    then its element count and raw bytes."""
    import sys

    import torch

    name = next(n for n, d in STORAGE_DTYPES.items() if getattr(torch, d) == t.dtype)
    raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
    out = io.BytesIO()
    info = {"protocol_version": 1001, "little_endian": sys.byteorder == "little",
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
    for value in (TORCH_MAGIC, 1001, info):
        pickle.dump(value, out, protocol=2)
    stub = _StorageStub()
    record = pickle.Pickler(out, protocol=2)
    record.persistent_id = lambda obj: (  # type: ignore[method-assign]
        ("storage", getattr(torch, name), "0", "cpu", t.numel(), None) if obj is stub else None)
    record.dump(stub)
    pickle.dump(["0"], out, protocol=2)
    out.write(t.numel().to_bytes(8, sys.byteorder))
    out.write(raw)
    return out.getvalue()


def dump(obj: Any, handle: BinaryIO, protocol: int = 4) -> None:
    """Pickle `obj` as `pickle.dump` would, stand-ins written back as their own classes and
    tensors with fixed storage keys, so that the same objects always give the same bytes."""
    _Writer(handle, protocol).dump(obj)
