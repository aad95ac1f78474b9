"""A task's memory set by its shard, and a shard by --shard-rows: the arrays written block
by block (the bytes numpy.save and numpy.savez write), the plan's cut, and the embed task's
peak following its block, not its shard."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_dataset
from test_engine import random_case
from test_formats import _ds

from hnm import embed, engine, reduce
from hnm.config import Config
from hnm.engine import Candidates, candidate_blocks, find_candidates
from hnm.grid import finalize
from hnm.kmeans import kmeans
from hnm.lifecycle import prepare
from hnm.miner import Arrays, eligible_phrases
from hnm.placement import Offer
from hnm.plan import follow_inputs, shard_count
from hnm.run import worker
from hnm.safety import Area, NpyRows
from hnm.storage import RunDir

# ---------------------------------------------------------------- writing block by block


@pytest.mark.parametrize("array", [
    np.arange(35 * 6, dtype=np.float32).reshape(35, 6) / 7,
    np.arange(40, dtype=np.int64),
    (np.arange(36) % 3 == 0).reshape(12, 3),
    np.zeros((0, 4), np.int32),
], ids=["float32", "int64", "bool", "empty"])
def test_rows_written_block_by_block_are_the_bytes_numpy_save_writes(tmp_path, array):
    area = Area(tmp_path)
    with area.npy_rows(tmp_path / "a.npy", len(array)) as out:
        for s in range(0, len(array), 8):
            out.add(array[s:s + 8])
        if not len(array):
            out.add(array)
    saved = io.BytesIO()
    np.save(saved, array, allow_pickle=False)
    assert (tmp_path / "a.npy").read_bytes() == saved.getvalue()


def test_no_block_is_the_empty_table_hnm_writes_and_a_short_file_is_never_renamed(tmp_path):
    area = Area(tmp_path)
    with area.npy_rows(tmp_path / "empty.npy", 0):
        pass
    saved = io.BytesIO()
    np.save(saved, np.zeros((0, 1), np.float32))
    assert (tmp_path / "empty.npy").read_bytes() == saved.getvalue()
    with pytest.raises(ValueError, match="4 rows written of the 5 announced"), \
            area.npy_rows(tmp_path / "short.npy", 5) as out:
        out.add(np.ones((4, 2), np.float32))
    rows = NpyRows(io.BytesIO(), 5)
    rows.add(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="a block of"):
        rows.add(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="more than the 5 rows announced"):
        rows.add(np.ones((4, 2), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.npy"]  # no temporary left


def _same(a: Candidates, b: Candidates) -> bool:
    return all(np.array_equal(x, y, equal_nan=True)
               for x, y in zip(a.to_arrays().values(), b.to_arrays().values()))


@pytest.mark.parametrize("seed", [3, 11, 29])
def test_candidate_files_written_block_by_block_read_back_whole_and_in_windows(
        tmp_path, monkeypatch, seed):
    """Blocks of 7 anchors, each written into the shard's file as it is found: the file
    reads back as the lists found at once, whole and in reduce windows of any size; a
    file of one unnumbered block (as earlier releases wrote) reads as that block; a file
    without blocks holds no anchor."""
    V, T, text_ids, groups, phrases, blacklist, config, n = random_case(seed)
    clusters, _ = kmeans(V, config.n_clusters, config.seed)
    eligible = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                                config.blacklist_similarity)
    tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters)
    whole, _ = find_candidates(config, tab, np.arange(n))
    monkeypatch.setattr(engine, "ANCHOR_BATCH", 7)
    area, path = Area(tmp_path), tmp_path / "shard.npz"
    with area.npz_members(path) as put:
        for b, block in enumerate(candidate_blocks(config, tab, np.arange(n))):
            for name, array in block.blocks_to_file(b).items():
                put(name, array)
    with zipfile.ZipFile(path) as z:
        assert len(z.namelist()) == -(-n // 7) * len(engine.MEMBERS)
    assert _same(reduce.read_candidates(path), whole)
    for size in (1, 7, 10, n):
        monkeypatch.setattr(engine, "REDUCE_WINDOW", size)
        with ExitStack() as files:
            got = list(reduce.windows(files, path))
        assert [len(w) for w in got[:-1]] == [max(7, -(-size // 7) * 7)] * (len(got) - 1)
        assert _same(Candidates.concat(got), whole)
    np.savez(tmp_path / "old.npz", **whole.to_arrays())
    assert _same(reduce.read_candidates(tmp_path / "old.npz"), whole)
    with area.npz_members(tmp_path / "none.npz"):
        pass
    assert len(reduce.read_candidates(tmp_path / "none.npz")) == 0


# ---------------------------------------------------------------- the plan's cut


def test_shards_are_cut_by_rows_beyond_one_per_worker():
    assert shard_count(1000, 2, 262_144, 64) == 2  # small: one per worker, as always
    assert shard_count(1_000_000, 2, 262_144, 64) == 4
    assert shard_count(40, 2, 8, 8) == 5
    assert shard_count(40, 2, 3, 8) == 5  # never more shards than batches
    assert shard_count(40, 8, 8, 8) == 8  # never fewer than workers (some empty)


def test_shards_follow_the_files_only_where_no_shard_passes_the_limit():
    ds = _ds((100, 200, 300, 400))
    assert follow_inputs(ds, 2, 10, limit=200) == [(0, 200), (200, 400)]
    uneven = _ds((50, 350, 400))  # following the files: [50, 400) holds too many rows
    assert follow_inputs(uneven, 2, 10) == [(0, 50), (50, 400)]
    assert follow_inputs(uneven, 2, 10, limit=200) == [(0, 200), (200, 400)]


# ---------------------------------------------------------------- the embed task's memory


def _embed_peak(data: dict, out: Path, shard_rows: int) -> tuple[int, int]:
    """Peak traced bytes of embedding shard 0 (of `shard_rows` rows), and the bytes of its
    image table."""
    config = Config(annotations=data["annotations"], image_dir=data["image_dir"],
                    image_embeddings=data["image_embeddings"],
                    text_embeddings=data["text_embeddings"], output_dir=str(out),
                    blacklist="", cpu_workers=1, batch_size=64, shard_rows=shard_rows)
    _, _, plan, _ = prepare(config, Offer(["cpu"]), lambda: None, lambda _: None)
    assert plan.shards[0].rows == (0, shard_rows)
    ctx = worker.Context(config, "cpu")
    ctx.corpus.positions, ctx.corpus.text_ids, ctx.phrase_order  # noqa: B018  (opened once)
    tracemalloc.start()
    try:
        worker.embed_shard(ctx, 0, lambda *a: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    written = np.load(RunDir(out).image_embeddings(0))
    source = np.load(data["image_embeddings"])
    assert np.array_equal(written, finalize(source[:shard_rows]))
    return peak, written.nbytes


def test_the_embed_task_holds_a_block_not_its_shard(tmp_path, monkeypatch):
    """Shards of 256 and 1024 rows of 512-wide embeddings, written in blocks of 32 rows:
    the peak is the same, and below the larger shard's table (which the task once held
    whole, beside its float64 block)."""
    data = make_dataset(tmp_path / "data", n=1024, seed=5, image_size=8, dims=(512, 16))
    monkeypatch.setattr(embed, "PRECOMPUTED_BLOCK", 32)
    small, _ = _embed_peak(data, tmp_path / "small", 256)
    large, table = _embed_peak(data, tmp_path / "large", 1024)
    assert table == 1024 * 512 * 4
    assert large < table / 2
    assert large < small * 1.2 + 64 * 1024
