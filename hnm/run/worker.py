"""One task inside one process: read a phase's inputs, compute (`embed`, `tables`,
`engine`), write its files, then its marker. Everything a worker builds once — the plan,
the dataset, the encoders, the tables and the search index — is kept for the shards that
follow."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from hnm import embed, tables, testpoints
from hnm.callbacks import Progress
from hnm.config import Config
from hnm.corpus import ColumnarCorpus, open_corpus
from hnm.encoders import build_text_encoder
from hnm.engine import candidate_blocks
from hnm.index import SearchIndex, set_threads
from hnm.joint import build_image_encoder, build_joint_model
from hnm.miner import Arrays
from hnm.plan import Plan, read_plan
from hnm.process import release_memory
from hnm.storage import RunDir

log = logging.getLogger("hnm.run.worker")


@dataclass(frozen=True)
class Task:
    """One unit of work: a phase of one shard, or the tables phase (shard None)."""

    phase: str  # "embed" | "tables" | "candidates"
    shard: int | None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Context:
    """What one worker process builds once and keeps between its tasks."""

    def __init__(self, config: Config, device: str, ds: ColumnarCorpus | None = None
                 ) -> None:
        self.config = config
        self.device = device
        self.run = RunDir(config.output_dir)
        self.startup = 0.0  # seconds spent loading models, not yet reported in a marker
        if ds is not None:
            self.__dict__["corpus"] = ds
        if device.startswith("cuda"):
            # first: any CUDA call made before (FAISS's too) would open a context on GPU 0
            import torch

            torch.cuda.set_device(torch.device(device))

    @cached_property
    def plan(self) -> Plan:
        return read_plan(self.run)

    @cached_property
    def corpus(self) -> ColumnarCorpus:
        """The run's columnar corpus, memory-mapped: a task reads its shard's rows."""
        return open_corpus(self.run)

    @cached_property
    def joint(self) -> Any:
        """The --joint-model, loaded once for both of its sides."""
        with self._loading():
            return build_joint_model(self.config.joint_model, embed.torch_setup(self.device),
                                     self.plan.precision)

    @cached_property
    def image_encoder(self) -> Any:
        if self.config.joint_model:
            return self.joint
        with self._loading():
            return build_image_encoder(self.config.visual_encoder,
                                       embed.torch_setup(self.device), self.plan.precision)

    @cached_property
    def text_encoder(self) -> Any:
        if self.config.text_encoder == "joint":
            return self.joint.text
        with self._loading():
            return build_text_encoder(self.config.text_encoder,
                                      embed.torch_setup(self.device), self.plan.precision)

    @contextlib.contextmanager
    def _loading(self) -> Iterator[None]:
        """Count a model's loading (and the first import of torch) as start-up."""
        t0 = time.perf_counter()
        yield
        self.startup += time.perf_counter() - t0

    @cached_property
    def phrase_order(self) -> np.ndarray:
        return embed.phrase_order(self.corpus.phrases)

    @cached_property
    def arrays(self) -> Arrays:
        return tables.load_arrays(self.run, self.corpus, self.config)

    @cached_property
    def search_index(self) -> SearchIndex:
        """The run's search index over every row, built (or loaded) once per process and
        used for all of its shards."""
        if self.device == "cpu":  # the CPU worker processes share the machine's cores
            set_threads(self.plan.placement.threads)
        else:  # the encoders' GPU memory is the index's now (free memory is read after)
            self.release_encoders()
        return tables.open_index(self.run, self.plan.index, self.arrays.V, self.device,
                                 self.plan.placement.index_parts)

    def release_encoders(self) -> None:
        """Drop the encoders (built again if a later task needs them)."""
        for name in ("image_encoder", "text_encoder", "joint"):
            self.__dict__.pop(name, None)

    def embed_blacklist(self, phrases: list[str]) -> np.ndarray:
        """Blacklist phrases through the run's text encoder, on the run's text batch grid."""
        return embed.embed_texts(self.text_encoder, phrases, self.plan.text_batch_size)


def run_task(ctx: Context, task: Task, progress: Progress) -> dict[str, Any]:
    """Execute one task in this process; the same code whatever runs it."""
    with testpoints.task(ctx.run.logs, task.shard):
        testpoints.reach(task.phase, lambda: progress(task.phase, 0, 1))
        with shard_log(ctx.run, task):
            log.info("%s %s on %s", task.phase, "tables" if task.shard is None
                     else f"shard {task.shard}", ctx.device)
            info = PHASES[task.phase](ctx, task.shard, _search_point(progress))
            log.info("done: %s", info)
    release_memory()  # a worker waiting for its next task (or the reduce) holds none
    return info


def _search_point(progress: Progress) -> Progress:
    """`progress`, reaching the `search` test point once a block of anchors is searched."""

    def reported(phase: str, done: int, total: int) -> None:
        progress(phase, done, total)
        if phase == "search":
            testpoints.reach("search", lambda: progress(phase, done, total))

    return reported


def embed_shard(ctx: Context, shard: int, progress: Progress) -> dict[str, Any]:
    """Embed the shard's images and distinct texts (in embed.phrase_order), each array
    written block by block as it is made (a worker holds a block, not its shard), then the
    marker."""
    c, ds, part, run = ctx.config, ctx.corpus, ctx.plan.shards[shard], ctx.run
    rows = np.arange(*part.rows)
    phrases = ctx.phrase_order[part.phrases[0]:part.phrases[1]]
    image_encoder = None if c.image_embeddings or not len(rows) else ctx.image_encoder
    text_encoder = None if c.text_embeddings or not len(phrases) else ctx.text_encoder
    t0 = time.perf_counter()
    waited = [0.0]
    if image_encoder is None:
        images = embed.precomputed_blocks(c.image_embeddings, ds.positions[rows]) \
            if c.image_embeddings else iter(())
    else:
        images = embed.image_batches(image_encoder, ds.images.take(rows), ctx.plan.batch_size,
                                     ctx.plan.placement.loaders, c.max_image_pixels, progress,
                                     c.tensor_normalization, waited)
    zeros = _write_blocks(run, run.image_embeddings(shard), len(rows), images)
    if image_encoder is not None:
        log.info("%d images in %.1fs, %.1fs of it waiting for data (%d loader workers)",
                 len(rows), time.perf_counter() - t0, waited[0], ctx.plan.placement.loaders)
    t1 = time.perf_counter()
    if c.text_embeddings:
        first = embed.first_rows(ds.text_ids, len(ds.phrases))[phrases]
        texts = embed.precomputed_blocks(c.text_embeddings, ds.positions[first])
    else:
        texts = _phrase_batches(ctx, text_encoder, ds, phrases)
    zeros += _write_blocks(run, run.text_embeddings(shard), len(phrases), texts)
    files = [run.image_embeddings(shard), run.text_embeddings(shard)]
    if tables.cross_table(c):  # the joint model's texts, beside the text encoder's
        cross = _phrase_batches(ctx, ctx.joint.text if len(phrases) else None, ds, phrases)
        _write_blocks(run, run.cross_embeddings(shard), len(phrases), cross)
        files.append(run.cross_embeddings(shard))
    t2 = time.perf_counter()
    if zeros:  # e.g. an all-black image with --visual-encoder pixels
        log.warning("%d embedding(s) are all zeros: similarity 0 to everything", zeros)
    info = {"embed_images": t1 - t0, "embed_texts": t2 - t1, "data_wait": waited[0],
            "startup": ctx.startup, "device": ctx.device,
            "peak_rss_mb": round(peak_rss_mb(), 1), "zero_embeddings": zeros}
    ctx.startup = 0.0  # reported once, by the first task that loaded the models
    run.mark_done("embed", shard, info, files)
    return info


def _write_blocks(run: RunDir, path: Path, rows: int, blocks: Iterator[np.ndarray]) -> int:
    """Write `blocks` (`rows` rows in all) into the .npy file `path` as they come; the
    number of rows that are all zeros."""
    zeros = 0
    with run.npy_rows(path, rows) as out:
        for block in blocks:
            out.add(block)
            zeros += int((~block.any(axis=1)).sum())
    return zeros


def _phrase_batches(ctx: Context, encoder: Any, ds: ColumnarCorpus, phrases: np.ndarray
                    ) -> Iterator[np.ndarray]:
    """The phrases' embeddings a text batch at a time (none without an encoder)."""
    if encoder is None:
        return
    encoder.truncated = 0
    for s in range(0, len(phrases), ctx.plan.text_batch_size):
        yield from embed.text_batches(encoder, ds.phrases.take(
            phrases[s:s + ctx.plan.text_batch_size]), ctx.plan.text_batch_size)
    if encoder.truncated:
        log.warning("%d text(s) longer than the text encoder's %d tokens were cut to fit",
                    encoder.truncated, encoder.max_length)


def tables_once(ctx: Context, _: None, progress: Progress) -> dict[str, Any]:
    """The tables phase in this process (`tables.compute`), then its marker."""
    info, files = tables.compute(ctx.config, ctx.run, ctx.plan, ctx.corpus.phrases,
                                 ctx.phrase_order, ctx.embed_blacklist, progress)
    info["startup"] = ctx.startup
    ctx.startup = 0.0
    info["peak_rss_mb"] = round(peak_rss_mb(), 1)
    ctx.run.mark_done("tables", None, info, files)
    return info


def candidates_shard(ctx: Context, shard: int, progress: Progress) -> dict[str, Any]:
    """Hard and diverse candidate lists of the shard's anchors against every row."""
    c, ds, part = ctx.config, ctx.corpus, ctx.plan.shards[shard]
    t0 = time.perf_counter()
    tab, index = ctx.arrays, ctx.search_index
    t1 = time.perf_counter()
    anchors = np.arange(*part.anchors)
    diverse_first = ds.anchor_uniforms(c.seed, anchors) < c.diverse_ratio
    # each block's lists written as they are found: a worker holds one block, not its shard
    with ctx.run.npz_members(ctx.run.candidates(shard)) as put:
        for b, block in enumerate(candidate_blocks(c, tab, anchors, ctx.device, progress,
                                                   diverse_first, index)):
            for name, array in block.blocks_to_file(b).items():
                put(name, array)
    info = {"search": time.perf_counter() - t1, "load_index": t1 - t0, "device": ctx.device,
            "index": index.kind, "peak_rss_mb": round(peak_rss_mb(), 1)}
    ctx.run.mark_done("candidates", shard, info, [ctx.run.candidates(shard)])
    return info


PHASES = {"embed": embed_shard, "tables": tables_once, "candidates": candidates_shard}


@contextlib.contextmanager
def shard_log(run: RunDir, task: Task) -> Iterator[None]:
    """Send hnm's log records to the task's log file while it runs."""
    stream = os.fdopen(run.append(run.log(task.shard)), "a", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hnm")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    except Exception:
        log.exception("%s failed", task.phase)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        stream.close()
