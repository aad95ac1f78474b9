"""Codes for distinct keys, numbered by first occurrence, in memory set by the keys' count
and not their text: a key is held as its 128-bit BLAKE2b digest in sorted runs (24 bytes a
distinct key, where a dictionary of the texts took about 200; large runs in scratch arrays,
`scratch`, not the process's own memory).

Two keys are one exactly when their digests are: a 128-bit collision among a billion keys
has a chance of about 10^-21. Runs are searched on the digest's first 64 bits and the
rest compared, so that a collision of those 64 bits alone (about 10^-2 among a billion
keys) is still told apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from hnm.scratch import scratch_array


def digests(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The keys' 128-bit digests, as two int64 halves (high, low)."""
    raw = b"".join(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                   for k in keys)
    both = np.frombuffer(raw, np.int64).reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


MERGE_BLOCK = 1 << 16  # keys placed at once while two runs merge


class DistinctCodes:
    """Codes 0, 1, 2, ... for keys given a block at a time, a key's code the count of
    distinct keys before its first occurrence. Keys may also be left out of the numbering
    (`code` with `own`): each such one takes a code of its own, in turn."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (high, low, code)
        self.count = 0

    def code(self, keys: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Each key's code (a None: a new code of its own), and the indexes of the keys
        that were met for the first time (None ones included), ascending."""
        n = len(keys)
        named = np.fromiter((k is not None for k in keys), bool, n)
        at = np.flatnonzero(named)
        out = np.empty(n, np.int64)
        high, low = digests([keys[i] for i in at.tolist()])  # type: ignore[misc]
        # the block's distinct keys (sorted by digest), each one's first index and members
        order = np.lexsort((low, high))
        h, lo = high[order], low[order]
        begins = np.ones(len(order), bool)
        begins[1:] = (h[1:] != h[:-1]) | (lo[1:] != lo[:-1])
        starts, member = np.flatnonzero(begins), np.cumsum(begins) - 1
        first = at[order[starts]]  # lexsort is stable: a group's first member is its first
        known = self._find(h[starts], lo[starts])
        # new codes in order of first occurrence, None keys among them
        fresh = np.sort(np.concatenate([first[known < 0], np.flatnonzero(~named)]))
        codes_at = np.full(n, -1, np.int64)
        codes_at[fresh] = self.count + np.arange(len(fresh))
        self.count += len(fresh)
        unique_codes = np.where(known >= 0, known, codes_at[first])
        out[at[order]] = unique_codes[member]
        out[~named] = codes_at[~named]
        new = known < 0
        self._add(h[starts][new], lo[starts][new], unique_codes[new])
        return out, fresh

    def _find(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """The code of each (sorted) digest, or -1."""
        found = np.full(len(high), -1, np.int64)
        for rh, rl, rc in self.runs:
            left = np.searchsorted(rh, high, "left")
            right = np.searchsorted(rh, high, "right")
            one = np.flatnonzero(right - left == 1)
            hit = one[rl[left[one]] == low[one]]
            found[hit] = rc[left[hit]]
            for i in np.flatnonzero(right - left > 1).tolist():  # a 64-bit collision
                same = np.flatnonzero(rl[left[i]:right[i]] == low[i])
                if len(same):
                    found[i] = rc[left[i] + same[0]]
        return found

    def _add(self, high: np.ndarray, low: np.ndarray, codes: np.ndarray) -> None:
        """New digests (sorted by `high`) into the runs: a run merged with the ones before
        it no larger than twice its size (about log2 of the blocks' count of runs)."""
        if not len(high):
            return
        self.runs.append((high, low, codes))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (h1, l1, c1), (h2, l2, c2) = self.runs.pop(), self.runs.pop()
            # the two sorted runs merged, MERGE_BLOCK keys at a time: each key's place
            # among the other run's (the earlier run's first among equals)
            merged = tuple(scratch_array(len(h1) + len(h2), np.int64) for _ in range(3))
            for run, other, side in (((h2, l2, c2), h1, "left"), ((h1, l1, c1), h2, "right")):
                for s in range(0, len(run[0]), MERGE_BLOCK):
                    keys = run[0][s:s + MERGE_BLOCK]
                    at = np.searchsorted(other, keys, side) + np.arange(s, s + len(keys))
                    for out, values in zip(merged, run):
                        out[at] = values[s:s + MERGE_BLOCK]
            self.runs.append(merged)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes + lo.nbytes + c.nbytes for h, lo, c in self.runs)
