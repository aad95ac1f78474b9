"""The Python API (`hnm.mine`, `hnm.load_run`) and `hnm export`'s training-ready rows."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from builders import DEMO_CONFIG, FAST, REPO, cli, read_jsonl, snapshot, tiny_bert

import hnm
from hnm.config import Config, Fields
from hnm.demo import make_demo

# As tests/test_formats.py: a threshold that lets the tiny random text encoder find hard
# negatives too.
MINING = {"visual_encoder": "pixels", "num_workers": 0, "blacklist": "",
          "cosine_threshold": 0.97, "diverse_ratio": 0.5, "quiet": True}


def flags(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in (
        [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)])]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    bert = tiny_bert(tmp_path_factory.mktemp("bert"))
    return {"json": make_demo(root, num_dialogs=12),
            "webdataset": make_demo(root, num_dialogs=12, fmt="webdataset", per_shard=25),
            "root": root, "bert": bert}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str, hnm.Run]:
    """The demo mined through the API, from image files and from WebDataset shards."""
    out = tmp_path_factory.mktemp("runs")
    return {fmt: hnm.mine(DEMO_CONFIG, annotations=str(data[fmt]), image_dir=str(data["root"]),
                          output_dir=str(out / fmt), text_encoder=str(data["bert"]), **MINING)
            for fmt in ("json", "webdataset")}


def test_mine_is_the_command_line(capsys, tmp_path, data, runs):
    run = runs["json"]
    assert isinstance(run, hnm.Run) and run.dir.name == "json"
    assert run.metrics == json.loads((run.dir / "metrics.json").read_text())
    assert list(run.records()) == read_jsonl(run.dir / "negatives.jsonl")
    assert run.config.fields == Fields(text="answer", group="first_instruction")
    rc, _, err = cli(capsys, "--config", DEMO_CONFIG, "--annotations", data["json"],
                     "--image-dir", data["root"], "--output-dir", tmp_path / "cli",
                     "--text-encoder", data["bert"], *flags(MINING))
    assert rc == 0, err
    assert (tmp_path / "cli/negatives.jsonl").read_bytes() == \
        (run.dir / "negatives.jsonl").read_bytes()
    again = hnm.load_run(run.dir)
    assert again.config == run.config and again.metrics == run.metrics
    suspects = list(again.suspects())
    assert len(suspects) == run.metrics["global"]["suspect_negatives"]["total"]


def test_mine_takes_a_config_or_a_mapping(tmp_path, data, runs):
    values = {"annotations": str(data["json"]), "image_dir": str(data["root"]),
              "text_encoder": str(data["bert"]), "fields": {"text": "answer"}, **MINING}
    as_config = hnm.mine(Config(**{**values, "fields": Fields(text="answer")}),
                         output_dir=str(tmp_path / "config"),
                         fields={"group": "first_instruction"})
    as_mapping = hnm.mine(values, output_dir=str(tmp_path / "mapping"),
                          fields={"group": "first_instruction"})
    expected = (runs["json"].dir / "negatives.jsonl").read_bytes()
    for run in (as_config, as_mapping):
        assert (run.dir / "negatives.jsonl").read_bytes() == expected
    assert hnm.mine(values, output_dir=str(tmp_path / "dry"), dry_run=True) is None
    assert not (tmp_path / "dry").exists()


def test_errors_are_hnm_errors_with_the_command_line_message(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(hnm.HnmError) as raised:
        hnm.mine(annotations=str(missing), output_dir=str(tmp_path / "out"), **MINING)
    rc, _, err = cli(capsys, *FAST, "--annotations", missing, "--output-dir", tmp_path / "out")
    assert rc == 2 and err == f"hnm: error: {raised.value}\n"
    with pytest.raises(hnm.HnmError, match="not an hnm run directory"):
        hnm.load_run(tmp_path)
    with pytest.raises(hnm.HnmError, match="--k-nn: must be at least 1, got 0"):
        hnm.mine(k_nn=0)


# ---------------------------------------------------------------- hnm export


def _image(data: dict, record_image: str) -> bytes:
    return (data["root"] / record_image).read_bytes()


def expected_triplets(data: dict, run: hnm.Run) -> list[dict]:
    by_id = {r["id"]: r for r in run.records()}
    return [{"anchor_id": r["id"], "anchor_image": _image(data, r["image"]),
             "anchor_text": r["answer"], "negative_id": n["id"],
             "negative_image": _image(data, by_id[n["id"]]["image"]),
             "negative_text": n["text"], "type": n["type"],
             "text_similarity": n["text_similarity"],
             "visual_similarity": n["visual_similarity"], "suspect": n["suspect"]}
            for r in run.records() for n in r["negatives"]]


def test_export_triplets_and_pairs_to_parquet(capsys, tmp_path, data, runs):
    run = runs["json"]
    rc, out, err = cli(capsys, "export", run.dir, "--to", tmp_path / "t.parquet")
    assert rc == 0 and out == f"wrote {tmp_path / 't.parquet'}\n", err
    triplets = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert triplets == expected_triplets(data, run)
    assert {t["type"] for t in triplets} == {"hard", "diverse"}
    pairs_path = run.export(tmp_path / "p.parquet", "pairs")
    pairs = pq.read_table(pairs_path).to_pylist()
    expected = []
    for t in triplets:
        if not expected or expected[-1]["anchor_id"] != t["anchor_id"]:
            expected.append({"anchor_id": t["anchor_id"], "id": t["anchor_id"],
                             "image": t["anchor_image"], "text": t["anchor_text"],
                             "type": "anchor", "text_similarity": None,
                             "visual_similarity": None})
        expected.append({"anchor_id": t["anchor_id"], "id": t["negative_id"],
                         "image": t["negative_image"], "text": t["negative_text"],
                         "type": t["type"], "text_similarity": t["text_similarity"],
                         "visual_similarity": t["visual_similarity"]})
    assert pairs == expected


def test_export_is_the_same_from_shards_and_from_files(tmp_path, runs):
    for kind in ("triplets", "pairs"):
        files = runs["json"].export(tmp_path / f"files-{kind}.parquet", kind)
        shards = runs["webdataset"].export(tmp_path / f"shards-{kind}.parquet", kind)
        assert files.read_bytes() == shards.read_bytes()
        runs["json"].export(tmp_path / f"files-{kind}", kind)
        runs["webdataset"].export(tmp_path / f"shards-{kind}", kind)
        assert snapshot(tmp_path / f"files-{kind}").keys() == {".hnm-export.json", "00000.tar"}
        assert (tmp_path / f"files-{kind}/.hnm-export.json").read_bytes() == \
            (tmp_path / f"shards-{kind}/.hnm-export.json").read_bytes()
        assert (tmp_path / f"files-{kind}/00000.tar").read_bytes() == \
            (tmp_path / f"shards-{kind}/00000.tar").read_bytes()


def test_export_jsonl_names_the_image_files(tmp_path, data, runs):
    run = runs["json"]
    rows = read_jsonl(run.export(tmp_path / "t.jsonl"))
    expected = expected_triplets(data, run)
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert Path(row.pop("anchor_image")).read_bytes() == want.pop("anchor_image")
        assert Path(row.pop("negative_image")).read_bytes() == want.pop("negative_image")
        assert row == want


def test_export_webdataset_pairs_read_like_img2dataset_shards(tmp_path, data, runs):
    """`{key}.png`, `{key}.txt`, `{key}.json`: what open_clip's WebDataset loader reads."""
    run = runs["json"]
    folder = run.export(tmp_path / "pairs", "pairs")
    pairs = pq.read_table(run.export(tmp_path / "p.parquet", "pairs")).to_pylist()
    with tarfile.open(folder / "00000.tar") as archive:
        names = archive.getnames()
        assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
        for k, pair in enumerate(pairs):
            assert archive.extractfile(f"{k:09d}.png").read() == pair.pop("image")
            assert archive.extractfile(f"{k:09d}.txt").read().decode() == pair["text"]
            assert json.loads(archive.extractfile(f"{k:09d}.json").read()) == pair


@pytest.mark.parametrize(("case", "message"), [
    ("jsonl_of_shards", "--to {to}: a JSONL file names image files, and this run's images "
                        "are held in its input shards: export to a .parquet file or a folder"),
    ("folder_not_empty", "--to {to}: exists and is not an empty folder or an earlier hnm "
                         "export (one carries .hnm-export.json and nothing else): choose "
                         "another --to"),
    ("not_a_run", "{run}: no config.yaml; not an hnm run directory"),
])
def test_export_errors(capsys, tmp_path, runs, case, message):
    run = runs["webdataset"].dir if case != "not_a_run" else tmp_path / "empty"
    to = tmp_path / ("t.jsonl" if case == "jsonl_of_shards" else "folder")
    if case == "folder_not_empty":
        to.mkdir()
        (to / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, "export", run, "--to", to)
    assert rc == 2 and err == f"hnm: error: {message.format(to=to, run=run)}\n"
    assert snapshot(tmp_path) == before


def test_readme_dataloader_reads_the_export(tmp_path, runs, monkeypatch):
    """The README's PyTorch example, run as written on an export of the demo."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(# hnm export RUN --format triplets.*?)```", readme,
                     re.S).group(1)
    runs["json"].export(tmp_path / "triplets.parquet")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    anchors, anchor_texts, negatives, negative_texts = scope["batch"]
    assert anchors.shape[1:] == negatives.shape[1:] == (3, 224, 224)
    assert len(anchor_texts) == len(negative_texts) == anchors.shape[0] > 0
