"""Tests for the synthetic AVDN-style demo dataset generator."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from hnm import demo

FIELDS = {"id", "image", "answer", "first_instruction", "map_name", "turn"}


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo.make_demo(out)
    return out


@pytest.fixture(scope="module")
def records(default_dir: Path) -> list[dict]:
    return json.loads((default_dir / "annotations.json").read_text(encoding="utf-8"))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dialog(record: dict) -> str:
    return record["id"].split("_")[0]


def test_generation_is_byte_identical(default_dir: Path, tmp_path: Path) -> None:
    demo.make_demo(tmp_path / "again")
    first, second = _files(default_dir), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_rerun_into_same_dir_is_idempotent(tmp_path: Path) -> None:
    path = demo.make_demo(tmp_path, num_dialogs=4)
    before = _files(tmp_path)
    mtime = path.stat().st_mtime_ns
    assert demo.make_demo(tmp_path, num_dialogs=4) == path
    assert _files(tmp_path) == before
    assert path.stat().st_mtime_ns == mtime  # unchanged files are not rewritten


def test_records_and_fields(default_dir: Path, records: list[dict]) -> None:
    assert len(records) == 300
    assert all(set(r) == FIELDS for r in records)
    assert len({r["id"] for r in records}) == len(records)
    assert records[0]["id"] == "d000_t1" and records[0]["image"] == "images/d000_t1.png"
    assert all(r["image"] == f"images/{r['id']}.png" for r in records)
    assert {r["turn"] for r in records} == {1, 2, 3, 4, 5}
    text = (default_dir / "annotations.json").read_text(encoding="utf-8")
    assert text == json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def test_images_exist_and_open(default_dir: Path, records: list[dict]) -> None:
    for r in records:
        with Image.open(default_dir / r["image"]) as img:
            assert img.format == "PNG"
            assert img.size == (96, 96)
            assert img.mode == "RGB"


def test_dialogs_form_groups(records: list[dict]) -> None:
    by_dialog: dict[str, set[str]] = defaultdict(set)
    for r in records:
        by_dialog[_dialog(r)].add(r["first_instruction"])
    assert len(by_dialog) == 60
    assert all(len(instr) == 1 for instr in by_dialog.values())
    sizes = Counter(r["first_instruction"] for r in records)
    assert len(sizes) == 60 and set(sizes.values()) == {5}  # one group key per dialog


def test_short_answer_share(records: list[dict]) -> None:
    short = [r["answer"] for r in records if len(r["answer"]) < 20]
    assert 0.05 <= len(short) / len(records) <= 0.15
    assert set(short) <= set(demo.SHORT_ANSWERS)


def test_exact_duplicate_answers_across_dialogs(records: list[dict]) -> None:
    dialogs: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if len(r["answer"]) >= 20:
            dialogs[r["answer"]].add(_dialog(r))
    assert sum(len(d) > 1 for d in dialogs.values()) >= 3


def test_byte_identical_images_across_dialogs(default_dir: Path, records: list[dict]) -> None:
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_hash[hashlib.sha256((default_dir / r["image"]).read_bytes()).hexdigest()].append(r)
    pairs = [rs for rs in by_hash.values() if len({_dialog(r) for r in rs}) > 1]
    assert len(pairs) >= 2
    # a hard case: the same pixels are paired with different instructions
    assert any(len({r["answer"] for r in rs}) > 1 for rs in pairs)


def test_paraphrases_across_dialogs(records: list[dict]) -> None:
    """One (direction, goal) said with different follow-up wordings in different dialogs."""
    wordings: dict[tuple[str, str], set[tuple[int, str]]] = defaultdict(set)
    for k, template in enumerate(demo.KEEP + demo.NEAR):
        pattern = re.escape(template).replace(r"\{dir\}", "(?P<dir>[a-z]+)")
        pattern = pattern.replace(r"\{target\}", "(?P<target>the [a-z -]+?)")
        for r in records:
            m = re.fullmatch(pattern, r["answer"])
            if m:
                wordings[(m["dir"], m["target"])].add((k, _dialog(r)))
    assert any(len({k for k, _ in w}) > 1 and len({d for _, d in w}) > 1
               for w in wordings.values())


def test_main_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert demo.main([str(out), "--num-dialogs", "3", "--seed", "5"]) == 0
    records = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    assert len(records) == 15
    assert all((out / r["image"]).is_file() for r in records)
    assert "annotations.json" in capsys.readouterr().out


def test_main_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main([str(tmp_path), "--turns-per-dialog", "1"])
    assert exc.value.code == 2


def test_seed_changes_output(tmp_path: Path) -> None:
    a = demo.make_demo(tmp_path / "a", num_dialogs=3, seed=1).read_bytes()
    b = demo.make_demo(tmp_path / "b", num_dialogs=3, seed=2).read_bytes()
    assert a != b


@pytest.mark.parametrize(("fmt", "files"), [
    ("jsonl", ["annotations.jsonl", "images"]),
    ("parquet", ["parquet/part-00000.parquet", "parquet/part-00001.parquet"]),
    ("webdataset", ["webdataset/00000.tar", "webdataset/00001.tar"]),
    ("hf", ["hf/data-00000-of-00002.arrow", "hf/data-00001-of-00002.arrow"]),
])
def test_every_input_format(tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str,
                            files: list[str]) -> None:
    """`python -m hnm.demo DIR --format F`: the shard formats hold the images themselves."""
    assert demo.main([str(tmp_path), "--num-dialogs", "2", "--format", fmt,
                      "--per-shard", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote 10 records to ") and out.endswith(f"{fmt}\n")
    assert all((tmp_path / f).exists() for f in files)
    assert (tmp_path / "images").exists() == (fmt == "jsonl")
