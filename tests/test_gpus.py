"""GPU discovery: the real machine (no NVML library here) and NVML faked to report GPUs."""

from __future__ import annotations

import types

import pytest

from hnm import cli, gpus, placement
from hnm.config import Config
from hnm.demo import make_demo
from hnm.errors import HnmError


class FakeNvml(types.SimpleNamespace):
    """Just enough of pynvml: GPUs with names, UUIDs and memory."""

    def __init__(self, names: list[str], total_gb: float = 11.0) -> None:
        super().__init__(names=names, total=int(total_gb * 2**30), inits=0)

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.inits -= 1

    def nvmlDeviceGetCount(self):
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.names[h]

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:04d}-abcd"

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=self.total, free=self.total - 2**30 * h,
                                     used=2**30 * h)


@pytest.fixture
def fake(monkeypatch):
    nvml = FakeNvml(["RTX 2080 Ti"] * 4)
    monkeypatch.setattr(gpus, "_nvml", lambda: nvml.nvmlInit() or nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return nvml


def test_without_the_nvml_library_the_run_says_why_and_uses_cpu_workers(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found, reason = gpus.discover()
    assert found == [] and "NVML" in reason
    offered = placement.offer(Config(cpu_workers=3, num_gpus=8))
    assert offered.devices == ["cpu"] * 3
    assert offered.lines == [f"No GPU: {reason}. Running on 3 CPU worker(s)."]


def test_faked_gpus_are_listed_like_the_guide(fake):
    found, reason = gpus.discover()
    assert reason is None and [g.index for g in found] == [0, 1, 2, 3]
    lines = placement.offer(Config()).lines
    assert lines[0] == "Detected 4 GPU(s): [0, 1, 2, 3]"
    assert lines[1] == "   GPU 0: RTX 2080 Ti, 11.0 GB (11.0 GB free)"
    assert lines[-1] == "Using 4 GPU(s): cuda:0, cuda:1, cuda:2, cuda:3"
    assert fake.inits == 0, "NVML must be shut down after discovery"


def test_cuda_visible_devices_is_honoured(fake, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-0000")
    found, _ = gpus.discover()
    assert [(g.index, g.nvml_index) for g in found] == [(0, 2), (1, 0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    found, reason = gpus.discover()
    assert found == [] and "CUDA_VISIBLE_DEVICES" in reason


@pytest.mark.parametrize("config,devices", [
    (Config(), ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    (Config(num_gpus=2), ["cuda:0", "cuda:1"]),
    (Config(gpu_id=3), ["cuda:3"]),
    (Config(gpu_ids=(0, 2)), ["cuda:0", "cuda:2"]),
])
def test_device_choice(fake, config, devices):
    assert placement.choose_gpus(config, gpus.discover()[0]) == devices


def test_more_gpus_than_present_is_an_error_listing_them(fake):
    with pytest.raises(HnmError) as err:
        placement.choose_gpus(Config(num_gpus=8), gpus.discover()[0])
    assert str(err.value) == ("--num-gpus: asks for GPU(s) [4, 5, 6, 7] but only 4 exist: "
                              "0 (RTX 2080 Ti), 1 (RTX 2080 Ti), 2 (RTX 2080 Ti), "
                              "3 (RTX 2080 Ti)")


def test_dry_run_plans_one_shard_per_faked_gpu_and_writes_nothing(fake, tmp_path, capsys):
    make_demo(tmp_path / "data", num_dialogs=4, turns_per_dialog=3, image_size=32)
    out = tmp_path / "run"
    status = cli.main(["--annotations", str(tmp_path / "data/annotations.json"),
                       "--image-dir", str(tmp_path / "data"), "--text-field", "answer",
                       "--output-dir", str(out), "--num-gpus", "3", "--dry-run"])
    text = capsys.readouterr().out
    assert status == 0
    assert "Detected 4 GPU(s): [0, 1, 2, 3]" in text
    assert "Dry run: 12 records, 12 candidates, 12 anchors" in text
    assert "Shards: 3 on cuda:0, cuda:1, cuda:2: [0, 4), [4, 8), [8, 12)" in text
    assert not out.exists()


@pytest.mark.parametrize("ids", [(), (-1,), (0, 0)])
def test_gpu_ids_must_be_distinct_indices(ids):
    with pytest.raises(HnmError) as err:
        Config(gpu_ids=ids)
    assert str(err.value).startswith("--gpu-ids: must list distinct GPU indices")


def test_the_placement_is_decided_once_stored_and_decided_again_on_resume(tmp_path, capsys,
                                                                           monkeypatch):
    """NVML is asked once per run and the placement computed once; the plan holds it (the
    workers read it there), and a resumed run places its workers again on its own flags."""
    from synthetic import make_dataset, mine_args

    from hnm.storage import RunDir

    asked, placed = [], []
    discover, place = gpus.discover, placement.place
    monkeypatch.setattr(gpus, "discover", lambda: asked.append(1) or discover())
    monkeypatch.setattr("hnm.lifecycle.place", lambda *a, **k: placed.append(1) or place(*a, **k))
    monkeypatch.setattr(placement, "usable_cores", lambda: 6)
    paths = make_dataset(tmp_path / "data", n=40, seed=3)
    out = tmp_path / "run"
    assert cli.main(mine_args(paths, out, "--cpu-workers", "2")) == 0
    assert (len(asked), len(placed)) == (1, 1)
    assert json_placement(out) == {"devices": ["cpu", "cpu"], "threads": 3, "loaders": 0}
    RunDir(out).done.unlink()  # the results are to be written again: the run resumes
    assert cli.main(mine_args(paths, out, "--cpu-workers", "1")) == 0
    assert json_placement(out) == {"devices": ["cpu"], "threads": 6, "loaders": 0}


def json_placement(out) -> dict:
    import json

    placed = json.loads((out / "plan.json").read_text())["placement"]
    return {k: placed[k] for k in ("devices", "threads", "loaders")}
