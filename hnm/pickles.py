"""Pickles read without running their code: an explicit allow-list of data-only constructors,
and a writer that puts back what was read (for the AVDN processed dataset, hnm.avdn).

Unpickling calls whatever the file names; this unpickler resolves a name only when it is on
`allowed()`, every other one is refused (`Refused`), and each allowed name is one of hnm's
own constructors (hnm.pickle_values) that builds data from bytes the file holds, so that a
pickle can rebuild tensors, arrays and containers and nothing else. It is Python's own
unpickler with every opcode checked: nothing is called but those constructors, state goes
only to what hnm builds, and every allocation is paid from a budget the file's size sets
(`Rejected` says what was refused). Torch tensors are rebuilt from their bytes by hnm
itself: torch's own route (`torch.storage._load_from_bytes`) calls `torch.load` unrestricted.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from hnm import pickle_values as values
from hnm.pickle_values import Kept, KeptMapping, Rejected  # noqa: F401 (for the readers)

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


# ---------------------------------------------------------------- the allow-list


def storage_from_bytes(data: Any) -> values.Storage:
    """A pickled torch storage (torch.save's legacy format), read without torch.load: plain
    values, then the storage's record, then its raw bytes, all through this unpickler."""
    import torch

    if not isinstance(data, bytes):
        raise values.Rejected("a torch storage is read from bytes")
    f = io.BytesIO(data)
    if _Unpickler(f, {}).load() != TORCH_MAGIC:
        raise values.Rejected("a pickled torch storage without torch's magic number")
    _Unpickler(f, {}).load()  # format version
    info = _Unpickler(f, {}).load()
    order = "<" if not isinstance(info, dict) or info.get("little_endian", True) else ">"
    record = _Unpickler(f, {("torch", n): d for n, d in STORAGE_DTYPES.items()}, True).load()
    keys = _Unpickler(f, {}).load()
    if not (isinstance(record, tuple) and len(record) == 6 and record[0] == "storage"
            and record[1] in STORAGE_DTYPES.values() and type(record[4]) is int
            and record[5] is None and keys == [record[2]]):
        raise values.Rejected("a pickled torch storage holding something else")
    numel = int.from_bytes(f.read(8), "little" if order == "<" else "big")
    bfloat = record[1] == "bfloat16"
    dtype = np.dtype("uint16" if bfloat else record[1]).newbyteorder(order)
    if numel != record[4] or len(data) - f.tell() < numel * dtype.itemsize:
        raise values.Rejected("a pickled torch storage cut short")
    # one copy, straight from the pickle's bytes, in this machine's byte order
    flat = np.frombuffer(data, dtype, count=numel, offset=f.tell())
    flat = torch.from_numpy(flat.astype(dtype.newbyteorder("="), copy=True))
    return values.Storage(flat.view(torch.bfloat16) if bfloat else flat)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (protocols 0 and 1), for the stand-in classes only."""
    if not (isinstance(cls, type) and issubclass(cls, Kept | KeptMapping)):
        raise values.Rejected("copyreg._reconstructor of a class hnm does not build")
    obj = cls.__new__(cls)
    if isinstance(obj, dict) and isinstance(state, dict):
        for key, value in state.items():
            obj[values.hashable(key, "a mapping")] = value
    return obj


def _numpy() -> dict[tuple[str, str], Any]:
    names: dict[tuple[str, str], Any] = {}
    for package in ("numpy.core", "numpy._core"):
        names[(f"{package}.multiarray", "_reconstruct")] = values.PendingArray
        names[(f"{package}.multiarray", "scalar")] = values.scalar
        names[(f"{package}.numeric", "_frombuffer")] = values.frombuffer
    names[("numpy", "ndarray")] = values.NDARRAY
    names[("numpy", "dtype")] = values.PendingDtype
    return names


TORCH = {("torch._utils", "_rebuild_tensor_v2"): values.tensor_view,
         ("torch._utils", "_rebuild_tensor"): values.tensor_view,
         ("torch._tensor", "_rebuild_from_type_v2"): values.tensor_from_type,
         ("torch.storage", "_load_from_bytes"): storage_from_bytes,
         ("torch._tensor", "Tensor"): values.TENSOR, ("torch", "Tensor"): values.TENSOR,
         ("torch", "Size"): values.torch_size}
BUILTINS = {"set": values.make_set, "frozenset": values.make_frozenset,
            "bytearray": values.make_bytearray, "complex": values.make_complex,
            "slice": values.make_slice, "range": values.make_range}
# classes read through a stand-in: (module, name) -> stand-in base class
STAND_INS = {("transformers.tokenization_utils_base", "BatchEncoding"): KeptMapping,
             ("transformers.tokenization_utils", "BatchEncoding"): KeptMapping,
             ("tokenizers", "Encoding"): Kept}
_allowed: dict[tuple[str, str], Any] = {}


def allowed() -> dict[tuple[str, str], Any]:
    """Every global a pickle may name, and the hnm constructor it gets instead (built once)."""
    if not _allowed:
        _allowed.update({(m, n): f for m in ("builtins", "__builtin__")
                         for n, f in BUILTINS.items()})
        _allowed.update({("collections", "OrderedDict"): values.make_ordered_dict,
                         ("_codecs", "encode"): values.latin1,
                         ("copyreg", "_reconstructor"): _reconstructor,
                         ("copy_reg", "_reconstructor"): _reconstructor,
                         **_numpy(), **TORCH})
        _allowed.update({key: values.kept(base, *key) for key, base in STAND_INS.items()})
    return _allowed


# ---------------------------------------------------------------- the unpickler

# what an opcode allocates beyond the bytes it reads (a new list, dict, set, mark or memo
# entry); the rest cost at most a pointer and an object header
_COSTS = {op[0]: cost for op, cost in (
    (pickle.EMPTY_LIST, 64), (pickle.LIST, 64), (pickle.EMPTY_DICT, 64), (pickle.DICT, 64),
    (pickle.EMPTY_SET, 216), (pickle.FROZENSET, 216), (pickle.MARK, 64), (pickle.PUT, 64),
    (pickle.BINPUT, 64), (pickle.LONG_BINPUT, 64), (pickle.MEMOIZE, 64))}
_KEPT = (Kept, KeptMapping)


def _charged(op: int, original: Callable) -> Callable:
    """An opcode's handler that first pays what the opcode allocates."""
    cost = _COSTS.get(op, 32)

    def charged(self: pickle._Unpickler) -> None:
        values.pay(cost, "the pickle's objects")
        original(self)
    return charged


def _unread(self: pickle._Unpickler) -> None:
    raise values.Rejected("an opcode that calls a constructor hnm does not offer "
                          "(NEWOBJ_EX or an extension code)")


def _unknown(self: pickle._Unpickler) -> None:
    raise pickle.UnpicklingError("an unknown opcode")


class _Unpickler(pickle._Unpickler):  # the Python unpickler: every opcode can be checked
    """Resolves only the names in `names` (each an hnm constructor); calls nothing else,
    gives state (BUILD) only to what hnm builds, adds items only to plain containers with
    keys that hash apart, and pays for every opcode's allocation from the current budget."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, names: dict[tuple[str, str], Any],
                 records: bool = False) -> None:
        super().__init__(file)
        self.names, self.records = names, records
        self.callables = {id(v): f"{m}.{n}" for (m, n), v in names.items() if callable(v)}

    def find_class(self, module: str, name: str) -> Any:
        found = self.names.get((module, name))
        if found is None:
            raise Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self.records:  # a storage's record in torch's legacy format
            return pid
        raise values.Rejected("persistent ids (a torch.save file?) are not read")

    for _op, _original in list(dispatch.items()):
        dispatch[_op] = _charged(_op, _original)

    def _call(self, func: Any, args: Any) -> Any:
        name = self.callables.get(id(func))
        if name is None or not isinstance(args, tuple):
            raise values.Rejected(f"a call of {_name(func)}, which is not an hnm constructor")
        try:
            return func(*args)
        except TypeError:
            raise values.Rejected(f"{name} called with arguments it does not take") from None

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args, cls = self.stack.pop(), self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, _KEPT)):
            raise values.Rejected(f"{_name(cls)}.__new__, which hnm does not call")
        if not isinstance(args, tuple):
            raise values.Rejected(f"{_name(cls)}.__new__ without a tuple of arguments")
        self.append(cls.__new__(cls, *args))

    def _instantiate(self, klass: Any, args: Any) -> None:
        self.append(self._call(klass, tuple(args)))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, values.Pending):
            built = self.stack[-1] = inst.build(state)
            for key in inst.memo_keys:
                if self.memo.get(key) is inst:
                    self.memo[key] = built
        elif isinstance(inst, _KEPT):
            inst.__setstate__(state)
        else:
            raise values.Rejected(f"state given to {_name(inst)}: only the objects hnm "
                                  "builds take state")

    def _memo(self, key: Any) -> None:
        obj = self.memo[key] = self.stack[-1]
        if isinstance(obj, values.Pending):
            obj.memo_keys.append(key)

    def load_put(self) -> None:
        self._memo(int(self.readline()[:-1]))

    def load_binput(self) -> None:
        self._memo(self.read(1)[0])

    def load_long_binput(self) -> None:
        self._memo(int.from_bytes(self.read(4), "little"))

    def load_memoize(self) -> None:
        self._memo(len(self.memo))

    def load_bytearray8(self) -> None:
        size = int.from_bytes(self.read(8), "little")
        data = self.read(size)
        if len(data) != size:
            raise values.Rejected(f"a bytearray of {size:,} bytes cut short")
        self.append(bytearray(data))

    def _items(self, target: Any, items: list, pairs: bool) -> None:
        if pairs:
            if type(target) not in (dict, OrderedDict) and not isinstance(target, KeptMapping):
                raise values.Rejected(f"items set on {_name(target)}, not a mapping")
            if len(items) % 2:
                raise values.Rejected("a dict given a key without its value")
            values.pay(24 * len(items), "a dict")
            for i in range(0, len(items), 2):
                target[values.hashable(items[i], "a dict")] = items[i + 1]
        elif type(target) is list:
            target.extend(items)
        else:
            raise values.Rejected(f"items appended to {_name(target)}, not a list")

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._items(self.stack[-1], items, True)

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._items(self.stack[-1], [key, value], True)

    def load_dict(self) -> None:
        made: dict = {}
        self._items(made, self.pop_mark(), True)
        self.append(made)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._items(self.stack[-1], items, False)

    def load_append(self) -> None:
        value = self.stack.pop()
        self._items(self.stack[-1], [value], False)

    def load_additems(self) -> None:
        items, target = self.pop_mark(), self.stack[-1]
        if type(target) is not set:
            raise values.Rejected(f"items added to {_name(target)}, not a set")
        target.update(values.make_set(items))

    def load_frozenset(self) -> None:
        self.append(values.make_frozenset(self.pop_mark()))

    for _op, _name_ in ((pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"),
                        (pickle.BUILD, "load_build"), (pickle.PUT, "load_put"),
                        (pickle.BINPUT, "load_binput"), (pickle.LONG_BINPUT, "load_long_binput"),
                        (pickle.MEMOIZE, "load_memoize"), (pickle.BYTEARRAY8, "load_bytearray8"),
                        (pickle.SETITEMS, "load_setitems"), (pickle.SETITEM, "load_setitem"),
                        (pickle.DICT, "load_dict"), (pickle.APPENDS, "load_appends"),
                        (pickle.APPEND, "load_append"), (pickle.ADDITEMS, "load_additems"),
                        (pickle.FROZENSET, "load_frozenset")):
        dispatch[_op[0]] = _charged(_op[0], locals()[_name_])
    for _op in (pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _unread
    for _op in set(range(256)) - set(dispatch):
        dispatch[_op] = _unknown
    del _op, _name_, _original


def _name(obj: Any) -> str:
    if isinstance(obj, values.Marker):
        return obj.name
    return getattr(obj, "__qualname__", None) or f"a {type(obj).__name__}"


class _Bounded:
    """A file read no further than its size: a length in the pickle past the end reads what
    is there (and fails as cut short), never allocating the length it claims."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle, self.left = handle, size

    def read(self, n: int = -1) -> bytes:
        data = self.handle.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.handle.readline(self.left)
        self.left -= len(line)
        return line


def load(handle: BinaryIO) -> Any:
    """One pickle from an open file, through the allow-list, its objects paid from a budget
    the file's size sets, then checked whole (`check`)."""
    start = handle.tell()
    size = handle.seek(0, io.SEEK_END) - start
    handle.seek(start)
    budget = values.Budget(size)
    token = values.current.set(budget)
    try:
        data = _Unpickler(_Bounded(handle, size), allowed()).load()
        values.check(data, budget.limit)
        return data
    finally:
        values.current.reset(token)


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
