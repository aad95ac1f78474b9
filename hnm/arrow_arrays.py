"""Arrow arrays built from their buffers, and the Arrow type of plain Python values found
without `pa.array`: `pa.array` (and every function that converts Python or NumPy values,
`take` with a NumPy index among them) imports pandas where it is installed, half a second
in every process that calls it. The types and values are exactly `pa.array`'s; values
that are not plain strings, integers, floats or booleans are left to it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

INT64 = (-(1 << 63), (1 << 63) - 1)


def int_array(values: np.ndarray) -> Any:
    """An int64 Arrow array of the values."""
    import pyarrow as pa

    data = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


def string_array(values: Sequence[str | None]) -> Any:
    """An Arrow string array of the values (None: null), as `pa.array(values, pa.string())`
    gives it."""
    import pyarrow as pa

    encoded = [b"" if v is None else v.encode("utf-8") for v in values]
    ends = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=ends[1:])
    if ends[-1] >= 2**31:  # past 32-bit offsets: Arrow's own conversion decides
        return pa.array(list(values), pa.string())
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    nulls = int(len(values) - valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [bitmap, pa.py_buffer(ends.astype(np.int32)),
                                  pa.py_buffer(b"".join(encoded))], null_count=nulls)


def plain_type(values: Sequence[Any]) -> Any:
    """The Arrow type `pa.array(values)` infers where every value that is not None is a
    str, or every one an int in int64's range, a float, or a bool (the same Python type);
    None where that is not so (then ask `pa.array`)."""
    import pyarrow as pa

    kinds = {type(v) for v in values if v is not None}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is str:
        return pa.string()
    if kind is float:
        return pa.float64()
    if kind is bool:
        return pa.bool_()
    if kind is int and all(INT64[0] <= v <= INT64[1] for v in values if v is not None):
        return pa.int64()
    return None
