"""What a pickle may build, and what it may cost (for hnm.pickles' unpickler).

Every global a pickle names is one of hnm's own constructors, each checking every argument
against the bytes the pickle actually holds: a dtype is a plain number or text type of its
true size, an array's data is exactly its shape times its item size, a tensor is a view that
stays inside its storage and holds no more elements than it, and nothing is allocated that
the file does not contain (no size-only constructor: `bytearray(n)`, `set(range(n))`,
`torch.Size(range(n))`, an empty tensor). What they build is paid from a `Budget` sized by
the file, so that a small pickle cannot claim a large amount of memory.
"""

from __future__ import annotations

import contextvars
import math
import re
import sys
from collections import OrderedDict
from typing import Any

import numpy as np

SLACK = 64 << 20  # bytes any pickle may build beyond FACTOR times its size
FACTOR = 32
MAX_DIMS = 16  # dimensions of an array, a tensor or a torch.Size
MAX_TEXT_ITEM = 1 << 20  # characters of one element of a text array
SAFE_INT = 1 << 61  # integers below this (in size) hash to distinct values


class Rejected(Exception):
    """A pickle asks for something hnm does not build: the message says what."""


class Budget:
    """The bytes a pickle may build: FACTOR times its size plus SLACK; `pay` refuses more."""

    def __init__(self, size: int) -> None:
        self.limit, self.spent = FACTOR * size + SLACK, 0

    def pay(self, amount: int, what: str) -> None:
        self.spent += amount
        if self.spent > self.limit:
            raise Rejected(f"{what} would take its contents past {self.limit:,} bytes, more "
                           f"than the file's size pays for ({FACTOR} x its size + "
                           f"{SLACK >> 20} MiB)")


current: contextvars.ContextVar[Budget] = contextvars.ContextVar("budget")


def pay(amount: int, what: str) -> None:
    """Pay for what a constructor builds from the budget of the pickle being read."""
    current.get().pay(amount, what)


def hashable(key: Any, where: str) -> Any:
    """A key of a dict or an element of a set: text, bytes, None, a bool or an integer that
    hashes to itself, so that no file can make every key collide (a quadratic build)."""
    kind = type(key)
    if kind in (str, bytes, bool) or key is None or (kind is int and -SAFE_INT < key < SAFE_INT):
        return key
    shown = "a large integer" if kind is int else f"a {kind.__name__}"
    raise Rejected(f"{where} holds {shown} as a key (keys are text, bytes or integers below "
                   "2**61)")


def _ints(value: Any, what: str, low: int = 0) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > MAX_DIMS or not all(
            type(v) is int and low <= v < 1 << 62 for v in value):
        raise Rejected(f"{what} must be at most {MAX_DIMS} integers of at least {low}, "
                       f"got {_short(value)}")
    return tuple(value)


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, int | float | str | bytes | tuple | list | None) \
        else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


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


def kept(base: type, module: str, name: str) -> type:
    """The stand-in class of one named class (one per name, so that it can be written back)."""
    key = (module, name)
    if key not in _kept_classes:
        _kept_classes[key] = type(name, (base,), {"origin": key, "__module__": __name__})
    return _kept_classes[key]


# ---------------------------------------------------------------- builtins


def make_set(items: Any = (), frozen: bool = False) -> Any:
    """set(...) / frozenset(...) of items the pickle holds (a list, tuple or set)."""
    if not isinstance(items, list | tuple | set | frozenset):
        raise Rejected(f"set({_short(items)}): a set is built from the items the file holds")
    pay(64 + 16 * len(items), "a set")
    for item in items:
        hashable(item, "a set")
    return frozenset(items) if frozen else set(items)


def make_frozenset(items: Any = ()) -> Any:
    return make_set(items, frozen=True)


def make_bytearray(data: Any = b"", encoding: str | None = None) -> bytearray:
    """bytearray(bytes) or bytearray(text, 'latin-1') (protocols 0-2): never bytearray(n)."""
    if isinstance(data, str) and encoding in ("latin-1", "latin1"):
        data = data.encode("latin1")
    if not isinstance(data, bytes | bytearray) or (encoding is not None and
                                                    not isinstance(data, bytes)):
        raise Rejected(f"bytearray({_short(data)}): a bytearray is built from bytes the file "
                       "holds")
    pay(len(data), "a bytearray")
    return bytearray(data)


def make_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise Rejected(f"complex({_short(real)}, {_short(imag)}): two numbers expected")
    return complex(real, imag)


def make_slice(*args: Any) -> slice:
    if not 1 <= len(args) <= 3 or not all(v is None or type(v) is int for v in args):
        raise Rejected("slice(...) takes one to three integers or None")
    return slice(*args)


def make_range(*args: Any) -> range:
    """A range, paid for as the list it stands for."""
    if not 1 <= len(args) <= 3 or not all(type(v) is int for v in args) or 0 in args[2:]:
        raise Rejected(f"range{_short(args)}: one to three integers, a non-zero step")
    made = range(*args)
    pay(8 * max(0, (made.stop - made.start + made.step - (1 if made.step > 0 else -1))
                // made.step), "a range")
    return made


def make_ordered_dict(items: Any = ()) -> OrderedDict:
    """OrderedDict() (its items come after) or OrderedDict of [key, value] pairs."""
    if not isinstance(items, list | tuple) or not all(
            isinstance(p, list | tuple) and len(p) == 2 for p in items):
        raise Rejected("OrderedDict(...) takes a list of key-value pairs")
    pay(104 * len(items), "an OrderedDict")
    return OrderedDict((hashable(k, "an OrderedDict"), v) for k, v in items)


def latin1(text: Any, encoding: str = "latin1") -> bytes:
    """_codecs.encode as protocol 0-2 pickles use it for bytes (nothing else)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Rejected(f"_codecs.encode({_short(text)}, {_short(encoding)}): only text to "
                       "latin1 bytes")
    return text.encode("latin1")


# ---------------------------------------------------------------- NumPy


class Marker:
    """A class a pickle names only to say what to build (numpy.ndarray, torch.Tensor): not
    callable, and refused anywhere else."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NDARRAY, TENSOR = Marker("numpy.ndarray"), Marker("torch.Tensor")
DTYPE_SPEC = re.compile(r"^([<>|=]?)(b1|[iu][1248]|f[248]|c(?:8|16)|[US][0-9]{1,7})$")


class Pending:
    """An object that pickle's BUILD completes (its state): until then a placeholder that
    the unpickler replaces, wherever the pickle stored it, by what `build` returns."""

    def __init__(self) -> None:
        self.memo_keys: list[Any] = []

    def build(self, state: Any) -> Any:
        raise NotImplementedError


class PendingDtype(Pending):
    """numpy.dtype(spec, align, copy): a plain number or text type; its state may set only
    the byte order (and must state the size the type has)."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        super().__init__()
        match = DTYPE_SPEC.match(spec) if isinstance(spec, str) else None
        if match is None or type(align) is not bool or type(copy) is not bool:
            raise Rejected(f"numpy.dtype({_short(spec)}): only booleans, integers, floats, "
                           "complex numbers and fixed-size text")
        self.real = np.dtype(spec)
        if self.real.kind == "U" and self.real.itemsize > 4 * MAX_TEXT_ITEM:
            raise Rejected(f"numpy.dtype({spec!r}): text items of more than "
                           f"{MAX_TEXT_ITEM:,} characters")

    def build(self, state: Any) -> np.dtype:
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
                and all(type(v) is int for v in state[5:])
                and state[5] in (-1, self.real.itemsize)):
            raise Rejected(f"numpy.dtype({self.real.str!r}) given the state {_short(state)}; "
                           "only its byte order and its own size may be stated")
        order = state[1]
        return self.real if order in ("|", "=") else self.real.newbyteorder(order)


def real_dtype(dtype: Any, what: str) -> np.dtype:
    if isinstance(dtype, PendingDtype):
        return dtype.real
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcUS" or dtype.hasobject:
        raise Rejected(f"{what} of {_short(dtype)}, which is not a numpy.dtype hnm built")
    return dtype


def array_from(data: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool,
               what: str) -> np.ndarray:
    """An array of `shape` holding exactly the bytes given (copied: writable, owned)."""
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, bytes | bytearray):
        raise Rejected(f"{what}: its data must be bytes, got {_short(data)}")
    count = math.prod(shape)
    if len(data) != count * dtype.itemsize:
        raise Rejected(f"{what} of shape {shape} and dtype {dtype.str} needs "
                       f"{count * dtype.itemsize:,} bytes of data; the file holds {len(data):,}")
    pay(len(data) + 112, what)
    flat = np.frombuffer(data, dtype, count=count) if count else np.empty(0, dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


class PendingArray(Pending):
    """numpy's _reconstruct(ndarray, (0,), b'b'): the array its state then describes."""

    def __init__(self, cls: Any, shape: Any, typecode: Any) -> None:
        super().__init__()
        if cls is not NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
            raise Rejected("numpy _reconstruct of anything but a plain numpy.ndarray")

    def build(self, state: Any) -> np.ndarray:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
                and type(state[3]) is bool):
            raise Rejected(f"a numpy array given the state {_short(state)}")
        shape = _ints(state[1], "a numpy array's shape")
        dtype = real_dtype(state[2], "a numpy array")
        return array_from(state[4], dtype, shape, state[3], "a numpy array")


def frombuffer(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's _frombuffer (arrays of protocol 5 pickles)."""
    if order not in ("C", "F"):
        raise Rejected(f"numpy _frombuffer with the order {_short(order)}")
    return array_from(data, real_dtype(dtype, "a numpy array"),
                      _ints(shape, "a numpy array's shape"), order == "F", "a numpy array")


def scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar(dtype, bytes): one value of exactly the type's size."""
    real = real_dtype(dtype, "a numpy scalar")
    return array_from(data, real, (), False, "a numpy scalar")[()]


# ---------------------------------------------------------------- torch


class Storage:
    """A torch storage read from the file's bytes (torch.storage._load_from_bytes): what a
    tensor is a view of, never a value of its own."""

    def __init__(self, flat: Any) -> None:
        pay(flat.numel() * flat.element_size(), "a tensor storage")
        self.flat = flat


def torch_size(dims: Any = ()) -> Any:
    """torch.Size of at most MAX_DIMS integers the file holds (never a range)."""
    import torch

    if isinstance(dims, range):
        raise Rejected("torch.Size(range(...)): a size is built from the integers the file "
                       "holds")
    return torch.Size(_ints(dims, "torch.Size"))


def tensor_view(storage: Any, offset: Any, size: Any, stride: Any,
                requires_grad: Any = False, hooks: Any = None, metadata: Any = None) -> Any:
    """torch._utils._rebuild_tensor_v2 (and _rebuild_tensor): a view of a storage read from
    the file's bytes that stays inside it and holds no more elements than it (no stride-0
    or overlapping view that multiplies one value into a large tensor). Read as data: the
    autograd flag and hooks are not kept."""

    if not isinstance(storage, Storage):
        raise Rejected("a tensor view of something other than a storage read from the file")
    storage = storage.flat
    shape, strides = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if type(offset) is not int or len(shape) != len(strides) or offset < 0:
        raise Rejected(f"a tensor of size {_short(size)}, stride {_short(stride)} and offset "
                       f"{_short(offset)}")
    numel, total = math.prod(shape), storage.numel()
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        spread = any(s == 0 and n > 1 for n, s in zip(shape, strides))
        if last >= total or numel > total - offset or spread:
            raise Rejected(f"a tensor of size {shape} and stride {strides} from offset {offset}"
                           f" claims more than its storage of {total:,} elements holds")
    if type(requires_grad) is not bool or not (hooks is None or hooks == {}) or not (
            metadata is None or metadata == {}):
        raise Rejected("a tensor with autograd hooks or metadata (hnm reads tensors as data)")
    pay(numel * storage.element_size() + 80, "a tensor")
    return storage.as_strided(shape, strides, offset)


def tensor_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2, for plain tensors only."""
    if func is not tensor_view or new_type is not TENSOR or not isinstance(args, tuple):
        raise Rejected("a tensor subclass or a rebuild other than a plain tensor's")
    if not (state is None or state == {}):
        raise Rejected("a tensor carrying attributes (hnm reads tensors as data)")
    return tensor_view(*args)


# ---------------------------------------------------------------- the whole


MAX_DEPTH = 100  # levels of containers a pickle may hold (as the readers of text formats)
_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, slice, range,
           np.generic, np.dtype)


def check(root: Any, limit: int) -> None:
    """Refuse, in one line, what the objects of a pickle are as a whole: nested more than
    MAX_DEPTH levels, a container holding itself, an object never given its state, a value
    that is not data, or more bytes than `limit` when every reference is followed (shared
    references are paid each time: a walk of the records meets each)."""
    import torch

    sizes: dict[int, int] = {}
    path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        obj, done = stack.pop()
        key = id(obj)
        if done:
            path.discard(key)
            sizes[key] = _own(obj) + sum(sizes[id(c)] for c in _children(obj))
            if sizes[key] > limit:
                raise Rejected(f"its objects, followed through every reference, hold "
                                      f"more than {limit:,} bytes, more than the file's size "
                                      "pays for")
            continue
        if key in sizes:
            continue
        if key in path:
            raise Rejected("a container that holds itself (a cycle)")
        if isinstance(obj, _LEAVES) or type(obj) is torch.Tensor or type(obj) is np.ndarray:
            sizes[key] = _own(obj)
            continue
        if not isinstance(obj, list | tuple | dict | set | frozenset | Kept):
            what = "an object never given its state" if isinstance(obj, Pending) \
                else f"a {type(obj).__name__}"
            raise Rejected(f"holds {what}, which is not data")
        if len(path) >= MAX_DEPTH:
            raise Rejected(f"containers nested more than {MAX_DEPTH} levels deep")
        path.add(key)
        stack.append((obj, True))
        stack.extend((c, False) for c in _children(obj))


def _children(obj: Any) -> list:
    if isinstance(obj, dict):
        kept = [obj.args, obj.state] if isinstance(obj, KeptMapping) else []
        return [*obj.keys(), *obj.values(), *kept]
    if isinstance(obj, Kept):
        return [obj.args, obj.state]
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    return []


def _own(obj: Any) -> int:
    """Bytes an object holds itself: its data for tensors and arrays, its text, its slots."""
    if isinstance(obj, str | bytes | bytearray):
        return len(obj) + 8
    if isinstance(obj, np.ndarray):
        return obj.nbytes + 112
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size() + 80
    if isinstance(obj, range):
        return 8 * len(obj) + 48
    return sys.getsizeof(obj) if isinstance(obj, list | tuple | dict | set | frozenset) else 24
