"""How embedding runs: precision, CPU workers, data loading, JPEG decoding, phrase order,
models loaded once per process."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from builders import DEMO_FIELDS, cli, write_image
from PIL import Image
from test_encoders import BATCH_TEXTS, make_images, on_the_grid
from test_encoders import embed_images as raw_image_features
from test_encoders import embed_texts as raw_text_features
from test_gpus import FakeNvml

from hnm import embed, gpus, host, placement, precision, sizing
from hnm.config import Config, Fields
from hnm.demo import make_demo
from hnm.encoders import build_image_encoder, build_text_encoder
from hnm.errors import HnmError
from hnm.grid import finalize
from hnm.lifecycle import prepare
from hnm.placement import Offer
from hnm.plan import TEXT_BATCH, make_shards
from hnm.run import worker
from hnm.storage import RunDir

CPU = torch.device("cpu")


# ---------------------------------------------------------------- precision


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return path


@pytest.mark.parametrize("flags,native", [("", False), ("avx512f", False),
                                          ("avx512f avx512_bf16", True),
                                          ("amx_tile amx_bf16", True)])
def test_auto_precision_on_cpu_follows_the_native_bf16_flags(monkeypatch, tmp_path, flags,
                                                              native):
    monkeypatch.setenv(precision.CPUINFO_ENV, str(cpuinfo(tmp_path, flags)))
    choice = precision.resolve("auto", ["cpu", "cpu"])
    assert choice.precision == ("bf16" if native else "fp32")
    assert choice.reason.startswith("auto: this CPU has")
    assert precision.resolve("fp16", ["cpu"]) == precision.Choice("fp16", "--precision")


def test_auto_precision_without_readable_cpu_flags_stays_fp32(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.CPUINFO_ENV, str(tmp_path / "missing"))
    assert precision.resolve("auto", ["cpu"]) == precision.Choice(
        "fp32", f"auto: {tmp_path / 'missing'} unreadable, so no native bf16 assumed")


@pytest.mark.parametrize("capabilities,want", [([(8, 0), (9, 0)], "bf16"),
                                               ([(8, 6), (7, 5)], "fp32"),
                                               ([None, (9, 0)], "fp32")])
def test_auto_precision_on_gpus_needs_bf16_tensor_cores_on_every_gpu(monkeypatch, capabilities,
                                                                      want):
    def capability(handle: int) -> tuple[int, int]:
        if capabilities[handle] is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return capabilities[handle]

    nvml = FakeNvml(["A", "B"])
    nvml.nvmlDeviceGetCudaComputeCapability = capability
    monkeypatch.setattr(gpus, "_nvml", lambda: nvml.nvmlInit() or nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert precision.resolve("auto", ["cuda:0", "cuda:1"]).precision == want
    assert precision.resolve("auto", ["cuda:0"]).precision == (
        "bf16" if capabilities[0] and capabilities[0] >= (8, 0) else "fp32")


def test_unknown_precision_is_a_one_line_error(capsys, tmp_path):
    rc, _, err = cli(capsys, "--annotations", tmp_path / "a.json", "--precision", "int8")
    assert rc == 2
    assert "argument --precision: invalid choice: 'int8'" in err
    with pytest.raises(HnmError, match=r"^--precision: must be one of auto, fp32, bf16, fp16, "
                                       r"got 'fp64'$"):
        Config(precision="fp64")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo(root, num_dialogs=3, turns_per_dialog=3, image_size=32)
    return root


def mine(capsys, demo: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    return cli(capsys, "--annotations", demo / "annotations.json", "--image-dir", demo,
               *DEMO_FIELDS, "--output-dir", out, "--visual-encoder", "pixels",
               "--blacklist", "", *flags)


def test_the_resolved_precision_is_printed_stored_and_part_of_the_run(capsys, demo, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(precision, "_cpu_bf16", lambda _: (False, "no bf16 here"))
    out = tmp_path / "run"
    rc, stdout, err = mine(capsys, demo, out)
    assert rc == 0, err
    assert "Precision: fp32 (auto: no bf16 here)" in stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["precision"] == "auto" and saved["provenance"]["precision"] == "fp32"
    assert json.loads((out / "plan.json").read_text())["placement"]["precision"] == "fp32"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["precision"] == "fp32"
    # what auto chose here, asked for by name, is the same run
    assert "Nothing to do" in mine(capsys, demo, out, "--precision", "fp32")[1]
    # another precision is another run: refused without --overwrite, then embedded anew
    rc, _, err = mine(capsys, demo, out, "--precision", "bf16")
    assert rc == 2 and "holds a run with a different config" in err
    marker = out / "embeddings/done_00000"
    before = marker.stat().st_mtime_ns
    rc, stdout, err = mine(capsys, demo, out, "--precision", "bf16", "--overwrite")
    assert rc == 0, err
    assert "Precision: bf16 (--precision)" in stdout
    assert marker.stat().st_mtime_ns != before
    assert json.loads((out / "metrics.json").read_text())["provenance"]["precision"] == "bf16"
    # on hardware where auto means bf16, auto resumes that run
    monkeypatch.setattr(precision, "_cpu_bf16", lambda _: (True, "bf16 here"))
    assert "Nothing to do" in mine(capsys, demo, out)[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"))[:8]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = finalize(a).astype(np.float64), finalize(b).astype(np.float64)
    return np.sum(fa * fb, axis=1)


def close_to_fp32_and_on_the_grid(build, name: str, features, inputs, batch: int,
                                  grid_batch: int, split: int) -> None:
    """bf16 features of `name` within a cosine of 0.99 of fp32 ones (batches of `batch`),
    and independent of where a shard starts (on_the_grid)."""
    fp32, bf16 = build(name, CPU), build(name, CPU, "bf16")
    assert cosines(features(fp32, inputs, batch), features(bf16, inputs, batch)).min() > 0.99
    on_the_grid(features, bf16, inputs, grid_batch, split)


def test_bf16_image_features_stay_close_to_fp32_and_on_the_grid(images, one_thread):
    few = images[:4]  # bf16 is emulated, and slow, on CPUs without it
    close_to_fp32_and_on_the_grid(build_image_encoder, "efficientnet-lite0",
                                  raw_image_features, few, 2, 2, 2)


def test_bf16_text_features_stay_close_to_fp32_and_on_the_grid(one_thread):
    close_to_fp32_and_on_the_grid(build_text_encoder, "minilm", raw_text_features,
                                  BATCH_TEXTS, 8, 4, 8)


def test_pixels_ignore_the_precision(images):
    assert np.array_equal(raw_image_features(build_image_encoder("pixels", CPU), images, 4),
                          raw_image_features(build_image_encoder("pixels", CPU, "bf16"),
                                             images, 4))



def test_efficientnet_runs_channels_last_with_batch_norms_folded_in_fp32():
    for kind, norms in (("fp32", 0), ("bf16", 49)):
        model = build_image_encoder("efficientnet-lite0", CPU, kind).model
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == norms
        weight = model._blocks[0]._depthwise_conv.weight
        assert weight.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- CPU workers


def test_cpu_workers_default_to_every_usable_core(monkeypatch):
    monkeypatch.setattr(placement, "usable_cores", lambda: 6)
    monkeypatch.setattr(host, "available_memory_gb", lambda: 64.0)
    monkeypatch.setattr(gpus, "discover", lambda: ([], "no NVML"))
    assert placement.cpu_workers(Config()) == (6, None)
    assert placement.cpu_workers(Config(cpu_workers=2)) == (2, None)
    assert placement.offer(Config()) == placement.Offer(["cpu"] * 6, [], [
        "No GPU: no NVML. Running on 6 CPU worker(s)."])


def test_fewer_cpu_workers_when_memory_is_short_and_the_line_says_why(monkeypatch):
    monkeypatch.setattr(placement, "usable_cores", lambda: 8)
    monkeypatch.setattr(host, "available_memory_gb", lambda: 4.7)
    monkeypatch.setattr(gpus, "discover", lambda: ([], "no NVML"))
    assert placement.offer(Config()) == placement.Offer(["cpu"] * 3, [], [
        "No GPU: no NVML. Running on 3 CPU worker(s). (4.7 GiB of memory available, about "
        "1.5 GiB per worker: 3 of 8 usable cores used)"])


def test_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    3145728 kB\n")
    assert host.available_memory_gb(str(meminfo)) == 3.0
    assert host.available_memory_gb(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("work,cores,want", [(0.5, 4, 1), (3.9, 4, 1), (4.1, 4, 4),
                                             (5.9, 2, 1), (6.1, 2, 2), (100.0, 3, 3)])
def test_default_cpu_workers_are_what_the_work_is_worth(work, cores, want):
    """A worker beyond the first costs WORKER_START_SECONDS: the count that finishes first."""
    assert placement.WORKER_START_SECONDS == 3.0
    devices = ["cpu"] * cores
    chosen, why = placement.fit_to_work(Config(), devices, work)
    assert chosen == ["cpu"] * want
    assert why == ("" if want == cores else
                   f"about {work:.1f} s of work for one core keeps {want} CPU worker(s) busy; "
                   "another takes about 3 s to start")
    assert placement.fit_to_work(Config(cpu_workers=cores), devices, work) == (devices, "")
    # shards are cut on the batch grid: never more workers than batches
    assert placement.fit_to_work(Config(), devices, work, batches=1)[0] == ["cpu"]
    two = 2 if work > 2 * placement.WORKER_START_SECONDS else 1  # 3 + work / 2 < work
    assert placement.fit_to_work(Config(), devices, work, batches=2)[0] == ["cpu"] * two
    assert placement.fit_to_work(Config(), ["cuda:0", "cuda:1"], work) == (["cuda:0", "cuda:1"], "")


def test_work_is_estimated_from_what_the_run_computes():
    search = 2.0 * 8000 * 8000 * 512 / sizing.SEARCH_FLOPS_PER_CORE_SECOND
    precomputed = Config(image_embeddings="i.npy", text_embeddings="t.npy")
    assert sizing.work_seconds(precomputed, 8000, 3000, 512) == pytest.approx(search)
    models = sizing.work_seconds(Config(), 8000, 3000, 512)
    assert models == pytest.approx(search + 8000 / 30.0 + 3000 / 400.0)
    assert sizing.work_seconds(Config(visual_encoder="pixels"), 8000, 3000, 512) == \
        pytest.approx(search + 8000 / 500.0 + 3000 / 400.0)


@pytest.mark.parametrize("requested,device,local_workers,want", [
    (None, "cpu", 1, 0), (3, "cpu", 1, 3), (None, "cuda:0", 1, 15), (None, "cuda:1", 2, 7),
    (None, "cuda:0", 16, 1), (0, "cuda:0", 1, 0)])
def test_loader_workers_are_sized_from_the_cores(monkeypatch, requested, device, local_workers,
                                                 want):
    monkeypatch.setattr(placement, "usable_cores", lambda: 16)
    assert placement.loader_workers(requested, device, local_workers) == want
    monkeypatch.setattr(placement, "usable_cores", lambda: 96)
    assert placement.loader_workers(None, "cuda:0", 1) == placement.MAX_LOADER_WORKERS


# ---------------------------------------------------------------- decoding


def size_seen(path: Path, draft: int | None) -> tuple[int, int]:
    return embed.ImageFiles([path], lambda img: img.size, 10**9, draft)[0]


def test_large_jpegs_are_decoded_reduced_and_alike_every_time(tmp_path):
    big, small, png = tmp_path / "big.jpg", tmp_path / "small.jpg", tmp_path / "big.png"
    write_image(big, 1, size=500)
    Image.open(big).resize((1000, 470)).save(big, quality=90)
    write_image(small, 2, size=300)
    Image.open(small).save(small, quality=90)
    write_image(png, 3, size=1000)
    assert size_seen(big, 224) == (500, 235)  # both sides stay at least 224
    assert size_seen(big, 100) == (250, 118)
    assert size_seen(big, None) == (1000, 470)
    assert size_seen(small, 224) == (300, 300)  # not twice the size: decoded whole
    assert size_seen(png, 224) == (1000, 1000)  # DCT scaling is a JPEG matter
    with Image.open(big) as img:
        img.draft("RGB", (224, 224))
        want = np.asarray(img.convert("RGB"))
    files = embed.ImageFiles([big, big], lambda img: np.asarray(img), 10**9, 224)
    assert np.array_equal(files[0], want) and np.array_equal(files[1], want)


# ---------------------------------------------------------------- phrase order


def test_phrases_are_embedded_shortest_first_and_returned_in_their_order(tmp_path):
    from hnm import tables

    phrases = ["a longer phrase", "ab", "mid size", "xy", "the longest phrase of all"]
    order = embed.phrase_order(phrases)
    assert [phrases[i] for i in order] == ["ab", "xy", "mid size", "a longer phrase",
                                           "the longest phrase of all"]
    embedded = np.array([[len(phrases[i])] for i in order], np.float32)  # the shards' rows
    shards = [tmp_path / "text_00000.npy", tmp_path / "text_00001.npy"]
    np.save(shards[0], embedded[:2])
    np.save(shards[1], embedded[2:])
    table = tables.merge(shards, tmp_path / "text.npy", order)  # as the tables phase does
    assert table[:, 0].tolist() == [len(p) for p in phrases]


def test_phrase_shards_sit_on_the_text_grid_and_fill_the_first_shards():
    assert make_shards(196, 2, TEXT_BATCH, front=True) == [(0, 196), (196, 196)]
    assert make_shards(196, 2, TEXT_BATCH) == [(0, 0), (0, 196)]
    for n, k in ((600, 3), (1000, 4), (257, 2)):
        edges = [s for s, _ in make_shards(n, k, TEXT_BATCH, front=True)]
        assert all(e % TEXT_BATCH == 0 for e in edges)


# ---------------------------------------------------------------- models once per process


def test_a_worker_loads_each_model_once_and_reports_it_once(demo, tmp_path, monkeypatch):
    config = Config(annotations=str(demo / "annotations.json"), image_dir=str(demo),
                    output_dir=str(tmp_path / "run"),
                    fields=Fields(text="answer", group="first_instruction"),
                    visual_encoder="pixels", blacklist="", cpu_workers=3, batch_size=2,
                    precision="fp32")
    prepare(config, Offer(["cpu"] * 3), lambda: None, lambda _: None)
    loads = []
    real = worker.build_image_encoder
    monkeypatch.setattr(worker, "build_image_encoder",
                        lambda *a: loads.append(a) or real(*a))
    ctx = worker.Context(config, "cpu")
    infos = [worker.run_task(ctx, worker.Task("embed", s), lambda *a: None) for s in range(3)]
    assert len(loads) == 1 and loads[0][2] == "fp32"
    assert infos[0]["startup"] > 0 and infos[1]["startup"] == infos[2]["startup"] == 0
    assert all(i["data_wait"] >= 0 for i in infos)
    assert "waiting for data (0 loader workers)" in RunDir(config.output_dir).log(1).read_text()


def test_loader_processes_on_few_cores_print_no_torch_advice(tmp_path, monkeypatch):
    """Two loader processes on a one-core machine: torch's warning about the count would
    break the terminal's one line per event; the embeddings are those of no loader."""
    paths = []
    for i in range(4):
        write_image(tmp_path / f"{i}.png", i)
        paths.append(tmp_path / f"{i}.png")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    encoder = build_image_encoder("pixels", "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, _ = embed.embed_images(encoder, paths, 2, 2, 10**8)
    assert not [w for w in caught if embed.LOADER_ADVICE in str(w.message)]
    alone, _ = embed.embed_images(encoder, paths, 2, 0, 10**8)
    assert np.array_equal(loaded, alone)
