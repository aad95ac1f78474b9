"""Arrow arrays from buffers and plain types (`hnm.arrow_arrays`): exactly what `pa.array`
gives, for generated values of every plain kind and their edges."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hnm.arrow_arrays import int_array, plain_type, string_array

EDGES: list[Any] = [0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**70, 0.0, -0.0,
                    float("nan"), float("inf"), 1.5, True, False, "", "é", "中文", "😀",
                    None, [1], {"a": 1}, b"x"]


def values(rnd: random.Random) -> list[Any]:
    pool = rnd.choice([EDGES, [v for v in EDGES if isinstance(v, str) or v is None],
                       [v for v in EDGES if type(v) is int or v is None],
                       [v for v in EDGES if type(v) is float or v is None]])
    return [rnd.choice(pool) for _ in range(rnd.randrange(0, 12))]


@pytest.mark.parametrize("seed", range(60))
def test_plain_type_is_arrows_or_none(seed: int) -> None:
    """Where a type is given it is pa.array's; none is given only where the values are not
    of one plain kind, or are integers past int64."""
    vals = values(random.Random(seed))
    kind = plain_type(vals)
    try:
        arrow = pa.array(vals).type
    except (pa.ArrowException, TypeError, OverflowError, ValueError):
        arrow = None
    if kind is not None:
        assert kind == arrow, vals
    else:
        plain = {type(v) for v in vals if v is not None}
        assert len(plain) != 1 or plain == {int} and any(
            not -(2**63) <= v < 2**63 for v in vals if v is not None), vals


@pytest.mark.parametrize("seed", range(20))
def test_string_array_is_pa_array(seed: int) -> None:
    rnd = random.Random(seed)
    vals = [rnd.choice([None, "", "a", "é", "😀 x", "line\nbreak"])
            for _ in range(rnd.randrange(0, 40))]
    got = string_array(vals)
    got.validate(full=True)
    assert got.equals(pa.array(vals, pa.string()))
    assert got.to_pylist() == vals


def test_int_array_is_pa_array() -> None:
    data = np.array([0, -5, 2**62, 7], np.int64)
    assert int_array(data).equals(pa.array(data))
    assert int_array(data[::2]).to_pylist() == [0, 2**62]
