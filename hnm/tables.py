"""The tables phase: one table of every row (embeddings, eligibility, clusters, and the IVF
index of runs that use one), computed once and memory-mapped by the phases after it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hnm.blacklist import read_blacklist
from hnm.callbacks import Progress, no_progress
from hnm.config import Config, has_joint_space
from hnm.corpus import ColumnarCorpus
from hnm.data import Corpus, normalize
from hnm.engine import exact_parts, recall_at_k, recall_sample
from hnm.errors import HnmError
from hnm.index import BUILD_PEAK, GPU_SHARE, SearchIndex, build_index, placement
from hnm.ivf import IvfIndex, add_rows, load_ivf, search_index, train_ivf
from hnm.kmeans import kmeans
from hnm.miner import Arrays, eligible_phrases
from hnm.parts import PartedIndex, part_edges
from hnm.plan import Plan
from hnm.safety import Area
from hnm.sizing import IVF_TRAIN_PER_LIST, RECALL_ANCHORS, IndexChoice, size_text
from hnm.storage import RunDir, read_npy

TABLES = ("visual", "text", "eligible", "clusters", "centroids")
COPY_ROWS = 1 << 16  # rows copied per step while merging: the table is never held in memory


def merge(paths: list, out: Path, order: np.ndarray | None = None, area: Area | None = None
          ) -> np.ndarray:
    """Shards' arrays in shard order into one .npy file, streamed; returns it memory-mapped.

    With `order`, the i-th row read goes to row order[i] (rows embedded in
    embed.phrase_order, put back in the phrases' own order). A shard can hold no rows
    (more workers than batches). `area`: where `out` is written (its folder by default).
    """
    parts = [part for path in paths if len(part := read_npy(path, mmap=True))]
    rows = sum(len(p) for p in parts)
    area = area or Area(out.parent, lambda rel: rel == out.name)
    with area.npy(out, (rows, parts[0].shape[1]), np.float32) as table:
        start = 0
        for part in parts:
            for s in range(0, len(part), COPY_ROWS):
                block = part[s:s + COPY_ROWS]
                if order is None:
                    table[start:start + len(block)] = block
                else:
                    table[order[start:start + len(block)]] = block
                start += len(block)
    return read_npy(out, mmap=True)


def compute(config: Config, run: RunDir, plan: Plan, phrases: list[str],
            phrase_order: np.ndarray, embed_blacklist: Callable[[list[str]], np.ndarray],
            progress: Progress = no_progress) -> tuple[dict[str, Any], list[Path]]:
    """All shards' embeddings into one table each (streamed, never whole in memory);
    eligibility, k-means clusters and, for an IVF run, its index and measured recall.
    Returns the timings and the files written, for the phase's marker."""
    shards = range(len(plan.shards))
    t0 = time.perf_counter()
    V = merge([run.image_embeddings(s) for s in shards], run.table("visual"), area=run)
    T = merge([run.text_embeddings(s) for s in shards], run.table("text"), phrase_order,
              area=run)
    if cross_table(config):
        merge([run.cross_embeddings(s) for s in shards], run.table("cross"), phrase_order,
              area=run)
    progress("tables", 1, 3)
    eligible = eligibility(config, T, phrases, embed_blacklist)
    progress("tables", 2, 3)
    t1 = time.perf_counter()
    labels, centroids = kmeans(V, config.n_clusters, config.seed)
    t2 = time.perf_counter()
    progress("tables", 3, 3)
    info: dict[str, Any] = {"tables": t1 - t0, "cluster": t2 - t1}
    files = [run.table(name) for name in TABLES + (("cross",) if cross_table(config) else ())]
    if plan.index.ivf:
        parts = plan.placement.index_parts
        info.update(build_ivf(run, V, plan.index, config, plan.num_anchors, parts))
        files += ivf_files(run, parts, len(V))
    for name, array in zip(TABLES[2:], (eligible, labels, centroids)):
        run.write_npy(run.table(name), array)
    return info, files


def eligibility(config: Config, T: np.ndarray, phrases: list[str],
                embed_blacklist: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """SPEC §3 per distinct phrase. Precomputed text embeddings live in an unknown space,
    so blacklist phrases are then matched exactly instead of by similarity."""
    banned = [normalize(p) for p in read_blacklist(config.blacklist)]
    if config.text_embeddings:
        eligible = eligible_phrases(T, phrases, None, config.min_answer_length,
                                    config.blacklist_similarity)
        if banned:  # every phrase read only where there is something to match
            banned_set = set(banned)
            eligible &= ~np.fromiter((p in banned_set for p in phrases), bool, len(phrases))
        return eligible
    vectors = embed_blacklist(banned) if banned else None
    return eligible_phrases(T, phrases, vectors, config.min_answer_length,
                            config.blacklist_similarity)


def cross_table(config: Config) -> bool:
    """Whether the joint model's texts need a table of their own: the text rule uses
    another encoder (with --text-encoder joint, the text table is in the joint space)."""
    return bool(config.joint_model) and config.text_encoder != "joint"


def load_arrays(run: RunDir, ds: Corpus | ColumnarCorpus, config: Config) -> Arrays:
    """The tables phase's arrays, memory-mapped, with the dataset's row facts (a corpus
    store's columns are memory-mapped too); with a joint space, the texts in it
    (miner.Arrays.C)."""
    # plain array views of the maps (no copy): a memmap's own indexing costs tens of
    # microseconds a call, paid on every small gather of the selection pass
    T = np.asarray(read_npy(run.table("text"), mmap=True))
    C = np.asarray(read_npy(run.table("cross"), mmap=True)) if cross_table(config) \
        else T if has_joint_space(config) else None
    return Arrays(
        V=np.asarray(read_npy(run.table("visual"), mmap=True)), T=T,
        text_ids=np.asarray(ds.text_ids), groups=np.asarray(ds.groups),
        eligible=read_npy(run.table("eligible"))[ds.text_ids],
        clusters=np.asarray(read_npy(run.table("clusters"), mmap=True)), C=C,
    )


def ivf_files(run: RunDir, parts: int, rows: int) -> list[Path]:
    """The IVF index files of a run: one, or one per part."""
    parts = len(part_edges(rows, parts)) - 1  # at most one a row
    return [run.ivf] if parts <= 1 else [run.ivf_part(p) for p in range(parts)]


def build_ivf(run: RunDir, V: np.ndarray, choice: IndexChoice, config: Config,
              num_anchors: int, parts: int = 1) -> dict[str, Any]:
    """Train the run's IVF index once (seeded), save it (in parts: the coarse quantizer
    trained once, one file per part holding its rows' lists), and measure the recall of
    its neighbour lists against exact search on a seeded sample of anchors."""
    import faiss

    t0 = time.perf_counter()
    sample = IVF_TRAIN_PER_LIST * choice.nlist
    parts = len(part_edges(len(V), parts)) - 1  # at most one a row
    if parts <= 1:
        _write_index(run, run.ivf, train_ivf(V, choice.nlist, config.seed, sample,
                                             choice.kind, config.pq_bytes))
    else:
        trained = train_ivf(V, choice.nlist, config.seed, sample, choice.kind,
                            config.pq_bytes, rows=(0, 0))
        edges = part_edges(len(V), parts)
        for p, (start, stop) in enumerate(zip(edges[:-1].tolist(), edges[1:].tolist())):
            part = faiss.clone_index(trained)  # one part's lists in memory at a time
            add_rows(part, V, start, stop)
            _write_index(run, run.ivf_part(p), part)
            del part
    t1 = time.perf_counter()
    anchors = recall_sample(num_anchors, config.seed, RECALL_ANCHORS)
    # measured as the workers will use it: memory-mapped, not held twice
    recall = recall_at_k(open_index(run, choice, V, "cpu", parts), V, anchors, config.k_nn)
    return {"index": t1 - t0, "recall": {**recall, "seconds": round(time.perf_counter() - t1, 3)}}


def _write_index(run: RunDir, path: Path, index: Any) -> None:
    import faiss

    with run.open(path) as handle:
        faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))


def open_index(run: RunDir, choice: IndexChoice, V: np.ndarray, device: str, parts: int = 1
               ) -> SearchIndex:
    """The run's search index over every row on `device`: exact, or the saved IVF index
    (never trained again). On a GPU it is kept in float32, or in float16 where float32
    does not fit; IVF lists that fit neither are scanned on the host (codes: always on
    the host). In `parts` parts (the plan's --index-parts): IVF float32 lists scanned on
    the host are mapped together and scanned a list at a time across the parts
    (`ivf.IvfIndex`: a query's rows of one list in one product); any other index is a
    `parts.PartedIndex` opening one part's index at a time."""
    edges = part_edges(V.shape[0], parts)
    rows = int(np.diff(edges).max()) if V.shape[0] else 0  # the largest part's
    nbytes = float(rows) * V.shape[1] * 4
    if choice.ivf:  # its lists are copied one at a time: no build peak
        target, float16 = placement(nbytes, device, peak=1.0) or ("cpu", False)
        if len(edges) <= 2:
            return search_index(load_ivf(str(run.ivf)), choice.nprobe, target, float16,
                                choice.far_nprobe)
        if choice.kind == "ivf" and target == "cpu":  # every part mapped, scanned list by list
            return IvfIndex([load_ivf(str(run.ivf_part(p))) for p in range(len(edges) - 1)],
                            choice.nprobe, far_nprobe=choice.far_nprobe, starts=edges[:-1])
        return PartedIndex(edges, lambda p: search_index(
            load_ivf(str(run.ivf_part(p))), choice.nprobe, target, float16,
            choice.far_nprobe))
    where = placement(nbytes, device)
    if where is None:
        peak = BUILD_PEAK * nbytes
        raise HnmError(f"--index: an exact index of {rows} rows needs "
                       f"{size_text(peak)} while it is built ({size_text(peak / 2)} in "
                       f"float16), more than {GPU_SHARE:.0%} of what {device} has free; use "
                       "--index ivf")
    if len(edges) <= 2:
        return build_index(V, device, float16=where[1])
    if not device.startswith("cuda"):  # searched where it lies: nothing copied
        return exact_parts(V, parts)
    return PartedIndex(edges, lambda p: build_index(V[edges[p]:edges[p + 1]], device,
                                                    float16=where[1]))
