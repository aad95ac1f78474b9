"""The tables phase: one table of every row (embeddings, eligibility, clusters), computed
once and memory-mapped by the phases after it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hnm.blacklist import read_blacklist
from hnm.config import Config
from hnm.data import Dataset, normalize
from hnm.miner import Tables, eligible_phrases
from hnm.storage import RunDir, read_npy

TABLES = ("visual", "text", "eligible", "clusters", "centroids")


def merge(paths: list) -> np.ndarray:
    """Shards' arrays in shard order (a shard can hold no rows: more workers than batches)."""
    return np.concatenate([e for path in paths if len(e := read_npy(path))])


def eligibility(config: Config, T: np.ndarray, phrases: list[str],
                embed_blacklist: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """SPEC §3 per distinct phrase. Precomputed text embeddings live in an unknown space,
    so blacklist phrases are then matched exactly instead of by similarity."""
    banned = [normalize(p) for p in read_blacklist(config.blacklist)]
    if config.text_embeddings:
        banned_set = set(banned)
        exact = np.array([p in banned_set for p in phrases], dtype=bool)
        return eligible_phrases(T, phrases, None, config.min_answer_length,
                                config.blacklist_similarity) & ~exact
    vectors = embed_blacklist(banned) if banned else None
    return eligible_phrases(T, phrases, vectors, config.min_answer_length,
                            config.blacklist_similarity)


def load_tables(run: RunDir, ds: Dataset) -> Tables:
    """The tables phase's arrays, memory-mapped, with the dataset's row facts."""
    return Tables(
        V=read_npy(run.table("visual"), mmap=True),
        T=read_npy(run.table("text"), mmap=True),
        text_ids=ds.text_ids, groups=ds.groups,
        eligible=read_npy(run.table("eligible"))[ds.text_ids],
        clusters=read_npy(run.table("clusters")),
    )
