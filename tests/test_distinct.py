"""Codes of distinct keys (`hnm.distinct`): numbered by first occurrence across blocks, as a
dictionary numbers them, whatever the blocks' sizes and the digests' collisions."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hnm import distinct
from hnm.distinct import DistinctCodes


def reference(blocks: list[list[str | None]]) -> tuple[list[list[int]], list[list[int]]]:
    """Codes and first-met indexes of each block, by a dictionary."""
    codes: dict[str, int] = {}
    count, out, firsts = 0, [], []
    for keys in blocks:
        got, first = [], []
        for i, key in enumerate(keys):
            if key is None or key not in codes:
                if key is not None:
                    codes[key] = count
                got.append(count)
                first.append(i)
                count += 1
            else:
                got.append(codes[key])
        out.append(got)
        firsts.append(first)
    return out, firsts


def random_blocks(seed: int) -> list[list[str | None]]:
    rnd = random.Random(seed)
    pool = [f"phrase {i}" for i in range(rnd.choice([3, 50, 400]))] + ["", "é", "\ud800x"]
    return [[None if rnd.random() < 0.1 else rnd.choice(pool)
             for _ in range(rnd.choice([0, 1, 7, 64, 300]))] for _ in range(rnd.randrange(1, 40))]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bits", [128, 4, 0])
def test_codes_as_a_dictionary_numbers_them(seed: int, bits: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """bits: the digests' first half keeps only this many bits (4: many keys share it, 0:
    all do), so that keys told apart by the second half alone are numbered right too;
    runs merged 3 keys at a time or whole."""
    if bits < 128:
        real = distinct.digests

        def colliding(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
            high, low = real(keys)
            return high & ((1 << bits) - 1), low

        monkeypatch.setattr(distinct, "digests", colliding)
    monkeypatch.setattr(distinct, "MERGE_BLOCK", 3 if seed % 2 else 1 << 16)
    blocks = random_blocks(seed)
    want, want_first = reference(blocks)
    codes = DistinctCodes()
    for keys, expect, expect_first in zip(blocks, want, want_first):
        got, first = codes.code(keys)
        assert got.tolist() == expect
        assert first.tolist() == expect_first
    assert codes.count == 1 + max((c for b in want for c in b), default=-1)


def test_memory_is_the_digests_and_codes() -> None:
    """24 bytes a distinct key, whatever its length, in few runs."""
    codes = DistinctCodes()
    for b in range(64):
        codes.code([f"{'long words ' * 20}{b * 1000 + i}" for i in range(1000)] +
                   [f"{'long words ' * 20}{i}" for i in range(1000)])  # half met before
    assert codes.count == 64_000
    assert codes.nbytes == 24 * 64_000
    assert len(codes.runs) <= 7


@pytest.mark.parametrize("seed", range(6))
def test_phrase_uses_count_as_a_counter(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uses noted one at a time, folded a few at a time, merged across shards in any
    grouping: the same distinct count, counts, maximum and total as a Counter's."""
    from collections import Counter

    from hnm.metrics import Metrics, PhraseUses

    monkeypatch.setattr(PhraseUses, "FOLD", 7)
    rnd = random.Random(seed)
    shards = [[rnd.randrange(rnd.choice([5, 500])) for _ in range(rnd.randrange(0, 60))]
              for _ in range(rnd.randrange(1, 6))]
    parts = []
    for uses in shards:
        m = Metrics()
        for phrase in uses:
            m.phrase_uses.add(phrase)
        parts.append(m)
    total = sum(parts, start=Metrics())
    want = Counter(p for uses in shards for p in uses)
    ids, counts = total.phrase_uses.folded()
    assert dict(zip(ids.tolist(), counts.tolist())) == want
    assert ids.tolist() == sorted(want)
    summary = total.summary()
    assert summary["distinct_negative_phrases"] == len(want)
    assert summary["max_phrase_reuse"] == max(want.values(), default=0)
    assert summary["mean_phrase_reuse"] == (round(sum(want.values()) / len(want), 6)
                                            if want else None)
    regrouped = parts[0] + sum(parts[1:], start=Metrics())
    assert regrouped.phrase_uses == total.phrase_uses


def test_scratch_arrays_are_zeroed_writable_and_outlive_their_file() -> None:
    """Large ones live in a temporary file's pages (not the process's own memory); a view
    keeps them; small ones are plain arrays."""
    from hnm.scratch import SMALL, scratch_array, scratch_copy

    big = scratch_array(SMALL, np.int64)
    assert big.dtype == np.int64 and len(big) == SMALL and not big.any()
    assert not big.flags.owndata  # a view of the map
    big[::7] = np.arange(len(big[::7]))
    view = big[7:15]
    del big
    assert view.tolist() == [1] + [0] * 6 + [2]
    small = scratch_array(3, np.int32)
    assert small.flags.owndata and small.tolist() == [0, 0, 0]
    assert scratch_copy(np.arange(SMALL, dtype=np.int32)).tolist() == list(range(SMALL))
