"""The AVDN processed dataset: read through the allow-list, mined, exported in its own layout."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import avdn_data
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from builders import FAST, REPO, cli, fails, read_jsonl, snapshot, tiny_bert, tiny_clip
from transformers import BatchEncoding

from hnm import pickles
from hnm.api import make
from hnm.cli import main
from hnm.config import Config
from hnm.embed import embed_images
from hnm.encoders import build_image_encoder
from hnm.grid import finalize
from hnm.readers import read_input

# The tiny random text encoder finds every pair of texts alike: a threshold this high lets
# hard negatives through, beside the diverse ones.
MINING = ["--blacklist", "", "--diverse-ratio", "0.5", "--cosine-threshold", "0.97",
          "--precision", "fp32", "--quiet"]
META = {"hard": {"negative_type_2", "map_name_2", "mining_timestamp", "mining_method",
                 "text_similarity", "visual_similarity"},
        "diverse": {"negative_type_2", "map_name_2", "mining_timestamp", "mining_method",
                    "anchor_cluster", "negative_cluster", "visual_similarity"}}


class Mined:
    """A generated processed dataset (3 chunks of 4 items), its run and its export."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = avdn_data.write(root / "processed", chunks=3, per_chunk=4,
                                    tok=avdn_data.tokenizer(root / "tokenizer"))
        self.before = snapshot(self.data)
        self.out = root / "run"
        run([*FAST, "--annotations", self.data, "--output-dir", self.out,
             "--text-encoder", tiny_bert(root / "bert"), "--num-negatives", "2", *MINING])
        self.export = root / "export"
        run(["export", self.out, "--format", "avdn", "--to", self.export,
             "--tokenizer", root / "tokenizer", "--max-answer-length", "10"])

    def originals(self) -> dict[int, dict]:
        items = {}
        for k in range(3):
            with open(self.data / f"chunk_{k}.pkl", "rb") as handle:
                items.update(pickle.load(handle))
        return items


def run(args: list) -> None:
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Mined:
    return Mined(tmp_path_factory.mktemp("avdn"))


def test_records_keep_the_index_and_every_plain_field(mined):
    records = read_jsonl(mined.out / "negatives.jsonl")
    assert [r["id"] for r in records] == list(range(12))  # the item's key, written first
    assert all(next(iter(r)) == "id" for r in records)
    first = records[5]
    assert set(first) == {"id", "answer", "question", "first_instruction", "dialog_context",
                          "map_name", "current_view_image", "negatives", "outcome"}
    assert first["current_view_image"] == "chunk_1.pkl/5"
    ids = [n["id"] for r in records for n in r["negatives"]]
    assert set(ids) <= set(range(12)) and ids
    kinds = {n["type"] for r in records for n in r["negatives"]}
    assert kinds == {"hard", "diverse"}


def test_export_in_its_own_layout(mined):
    """Same files, keys and items; the three fields added to every anchor from its first
    negative; everything else, the language-model negative included, as it was."""
    records = read_jsonl(mined.out / "negatives.jsonl")
    originals = mined.originals()
    chunks = ["chunk_0.pkl", "chunk_1.pkl", "chunk_2.pkl"]
    assert sorted(p.name for p in mined.export.iterdir()) == [".hnm-export.json", *chunks]
    assert json.loads((mined.export / ".hnm-export.json").read_text()) == {
        "format": "hnm export", "version": 1, "kind": "avdn", "files": chunks}
    tok = avdn_data.tokenizer(mined.root / "tokenizer_again")
    # the original's format, datetime.now().isoformat(): local time to the microsecond, of
    # the moment the run wrote its records
    mtime_ns = json.loads((mined.out / "done.json").read_text())["files"]["negatives.jsonl"][2]
    stamp = (datetime.fromtimestamp(mtime_ns // 10**9)
             + timedelta(microseconds=mtime_ns // 1000 % 10**6)).isoformat(
                 timespec="microseconds")
    assert len(stamp) == 26
    added = 0
    for k in range(3):
        with open(mined.export / f"chunk_{k}.pkl", "rb") as handle:
            chunk = pickle.load(handle)
        assert list(chunk) == list(range(4 * k, 4 * k + 4))
        for index, item in chunk.items():
            original, negatives = originals[index], records[index]["negatives"]
            assert set(item) == set(original)
            assert torch.equal(item["current_view_image"], original["current_view_image"])
            for field in ("tokenized_input", "tokenized_answer"):
                assert type(item[field]) is BatchEncoding
                assert item[field].keys() == original[field].keys()
                assert all(torch.equal(item[field][key], original[field][key])
                           for key in original[field])
                assert item[field].encodings[0].ids == original[field].encodings[0].ids
            plain = ("answer", "question", "first_instruction", "dialog_context", "map_name")
            assert all(item[f] == original[f] for f in plain)
            data, before = item["contrastive_data"], original["contrastive_data"]
            assert data["negative_text"] == before["negative_text"]
            assert torch.equal(data["tokenized_negative"]["input_ids"],
                               before["tokenized_negative"]["input_ids"])
            if not negatives:  # an anchor without a negative is left as it was
                assert set(data) == set(before)
                continue
            added += 1
            n = negatives[0]
            assert data["negative_text_2"] == n["text"]
            expected = tok(n["text"], max_length=10, padding="max_length", truncation=True,
                           return_tensors="pt")
            assert type(data["tokenized_negative_2"]) is dict  # tensors only, no Encoding
            assert data["tokenized_negative_2"].keys() == expected.keys()
            assert torch.equal(data["tokenized_negative_2"]["input_ids"], expected["input_ids"])
            assert torch.equal(data["tokenized_negative_2"]["attention_mask"],
                               expected["attention_mask"])
            meta = data["validation_metadata_negative_2"]
            assert set(meta) == META[n["type"]]
            assert meta["negative_type_2"] == n["type"]
            assert meta["map_name_2"] == originals[n["id"]]["map_name"]
            assert meta["mining_method"] == {"hard": "hard_negative_knn",
                                             "diverse": "diverse_negative_clustering"}[n["type"]]
            for key in META[n["type"]] & set(n):
                assert meta[key] == n[key]
            assert meta["mining_timestamp"] == stamp
    assert added == sum(bool(r["negatives"]) for r in records) >= 8
    assert snapshot(mined.data) == mined.before


def test_export_again_is_byte_identical_and_refuses_its_target(mined, capsys, tmp_path):
    again = tmp_path / "again"
    rc, _, err = cli(capsys, "export", mined.out, "--format", "avdn", "--to", again,
                     "--tokenizer", mined.root / "tokenizer", "--max-answer-length", "10")
    assert rc == 0, err
    assert snapshot(again).keys() == snapshot(mined.export).keys()
    for name in snapshot(again):
        assert (again / name).read_bytes() == (mined.export / name).read_bytes()
    before = snapshot(again)
    rc, _, err = cli(capsys, "export", mined.out, "--format", "avdn", "--to", again)
    assert (rc, err) == (2, f"hnm: error: --to {again}: holds an earlier export; pass "
                            "--overwrite to replace it\n")
    assert snapshot(again) == before
    rc, _, err = cli(capsys, "export", mined.out, "--format", "avdn", "--to", again,
                     "--overwrite")  # without a tokenizer: no tokenized_negative_2
    assert rc == 0, err
    with open(again / "chunk_2.pkl", "rb") as handle:
        data = pickle.load(handle)[9]["contrastive_data"]
    assert "negative_text_2" in data and "tokenized_negative_2" not in data
    assert not list(tmp_path.glob(".*"))  # no staging folder left


def test_an_export_that_fails_on_its_last_chunk_leaves_the_target_as_it_was(
        mined, capsys, tmp_path, monkeypatch):
    """Built beside the target and moved in only when complete: a new target stays absent,
    a complete earlier export (replaced with --overwrite) stays as it was."""
    from test_safety import failing_write

    to = tmp_path / "again"
    for flags in ((), ("--overwrite",)):
        before = snapshot(tmp_path)
        with failing_write(monkeypatch, "chunk_2.pkl"):
            rc, _, err = cli(capsys, "export", mined.out, "--format", "avdn", "--to", to,
                             *flags)
        assert rc == 2 and err.count("\n") == 1 and err.endswith(
            "/chunk_2.pkl: cannot write: No space left on device\n"), err
        assert snapshot(tmp_path) == before
        rc, _, err = cli(capsys, "export", mined.out, "--format", "avdn", "--to", to,
                         "--tokenizer", mined.root / "tokenizer", "--max-answer-length", "10",
                         *flags)
        assert rc == 0, err
        assert {n: (to / n).read_bytes() for n in os.listdir(to)} == {
            n: (mined.export / n).read_bytes() for n in os.listdir(mined.export)}


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "{data}"], "--to {data}: holds an input of the run ({data}/chunk_0.pkl); an "
                         "export never replaces one: choose another --to"),
    (["--to", "{tmp}/x", "--tokenizer", "{tmp}"], "--tokenizer: needs --max-answer-length N "
     "(at least 1), the answer length limit of the training code"),
    (["--to", "{tmp}/x", "--tokenizer", "{tmp}/none", "--max-answer-length", "8"],
     "--tokenizer {tmp}/none: not a folder (a local Hugging Face tokenizer)"),
])
def test_export_refusals(mined, capsys, tmp_path, args, message):
    values = {"data": mined.data, "tmp": tmp_path}
    rc, _, err = cli(capsys, "export", mined.out, "--format", "avdn",
                     *[a.format(**values) for a in args])
    assert (rc, err) == (2, f"hnm: error: {message.format(**values)}\n")
    assert snapshot(mined.data) == mined.before and not (tmp_path / "x").exists()


def test_pixels_features_are_the_original_pooling(mined):
    """The original script: 8x8 adaptive average pool of the tensor, flattened, L2 norm."""
    tensors = torch.stack([mined.originals()[i]["current_view_image"] for i in range(12)])
    original = F.normalize(F.adaptive_avg_pool2d(tensors, (8, 8)).flatten(1), dim=1)
    embedded = np.load(mined.out / "embeddings" / "image_00000.npy")
    assert embedded.shape == (12, 192)
    np.testing.assert_allclose(embedded, original.numpy(), rtol=0, atol=1e-6)
    pooled = F.adaptive_avg_pool2d(tensors, (8, 8)).flatten(1).double().numpy()
    assert np.array_equal(embedded, finalize(pooled))  # the same values, snapped to hnm's grid


def test_model_encoders_see_the_images_the_tensors_came_from(tmp_path, one_thread):
    """--tensor-normalization maps a tensor back to its image: a model encoder embeds the
    tensors as it embeds the image files they were made from."""
    from PIL import Image

    rng = np.random.default_rng(0)
    mean, std = (np.array(v, dtype=np.float32).reshape(3, 1, 1) for v in avdn_data.IMAGENET)
    files, items = [], {}
    for i in range(4):
        pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
        chw = pixels.transpose(2, 0, 1).astype(np.float32) / 255
        items[i] = {"current_view_image": torch.from_numpy((chw - mean) / std),
                    "answer": f"answer number {i}"}
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "chunk_0.pkl", "wb") as handle:
        pickle.dump(items, handle)
    refs = read_input(make(None, {"annotations": str(tmp_path / "data")})).refs
    encoder = build_image_encoder(str(tiny_clip(tmp_path / "clip")), "cpu")
    from_files, _ = embed_images(encoder, files, 2, 0, 10**8)
    from_tensors, _ = embed_images(encoder, refs, 2, 0, 10**8, normalization="imagenet")
    assert np.array_equal(from_files, from_tensors)
    other, _ = embed_images(encoder, refs, 2, 0, 10**8, normalization="0.5,0.25")
    assert not np.array_equal(from_files, other)


def test_loader_processes_read_their_own_chunks(mined, one_thread):
    """Forked DataLoader processes each unpickle the chunks they need: the same embeddings
    as one process reading them all."""
    refs = read_input(make(None, {"annotations": str(mined.data)})).refs
    encoder = build_image_encoder("pixels", "cpu")
    alone, _ = embed_images(encoder, refs, 4, 0, 10**8)
    loaders, _ = embed_images(encoder, refs, 4, 2, 10**8)
    assert np.array_equal(alone, loaders)
    assert np.array_equal(alone, np.load(mined.out / "embeddings" / "image_00000.npy"))


def test_triplets_of_a_run_on_tensors_hold_png_images(mined, capsys, tmp_path):
    from PIL import Image

    from hnm.readers.avdn import to_image

    rc, _, err = cli(capsys, "export", mined.out, "--to", tmp_path / "t.parquet")
    assert rc == 0, err
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    originals = mined.originals()
    assert len(rows) == sum(len(r["negatives"]) for r in read_jsonl(mined.out /
                                                                      "negatives.jsonl"))
    for row in rows[:3]:
        image = Image.open(io.BytesIO(row["negative_image"]))
        expected = to_image(originals[row["negative_id"]]["current_view_image"], "avdn")
        assert image.format == "PNG" and np.array_equal(np.asarray(image), np.asarray(expected))


def test_split_configs_read_processed_datasets(mined, capsys):
    """The shipped AVDN configs name text and group only: image and id come from the
    format, and their --image-dir (image files) is not needed."""
    rc, out, err = cli(capsys, "--config", REPO / "configs" / "val_seen.yaml", "--annotations",
                       mined.data, "--visual-encoder", "pixels", "--dry-run")
    assert rc == 0, err
    assert "Input: avdn, 3 file(s)" in out


def test_avdn_field_defaults_and_normalization_flag(tmp_path):
    (tmp_path / "chunk_0.pkl").write_bytes(b"")
    fields = make(None, {"annotations": str(tmp_path)}).fields
    assert (fields.image, fields.text, fields.group) == (
        "current_view_image", "answer", "first_instruction")
    given = make(None, {"annotations": str(tmp_path), "fields": {"text": "question"}})
    assert (given.fields.image, given.fields.text) == ("current_view_image", "question")
    assert make(None, {"annotations": "a.json"}).fields.image == "image"
    assert Config(tensor_normalization="0.5,0.25").tensor_normalization == "0.5,0.25"


def _chunks(root: Path, **changes) -> Path:
    """Two tiny chunks, with `changes` applied to item 1."""
    tok = avdn_data.tokenizer(root / "tok")
    items = {i: avdn_data.item(i, tok) for i in range(4)}
    items[1].update(changes)
    (root / "data").mkdir()
    for k in range(2):
        with open(root / "data" / f"chunk_{k}.pkl", "wb") as handle:
            pickle.dump({i: items[i] for i in range(2 * k, 2 * k + 2)}, handle)
    return root / "data"


class _Touch:
    """An object whose unpickling runs a shell command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_pickle_that_runs_a_command_is_refused(capsys, tmp_path):
    planted = tmp_path / "planted"
    data = _chunks(tmp_path, dialog_context=_Touch(planted))
    message = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", data],
                    f"{data}/chunk_0.pkl")
    assert message == (f"{data}/chunk_0.pkl: refused to unpickle '{os.system.__module__}."
                       "system': not a data-only type on hnm's allow-list (README: Coming "
                       "from add_hard_negatives.py)")
    assert not planted.exists()


@pytest.mark.parametrize(("tensor", "why"), [
    (torch.zeros(16, 16), "has shape 16x16; an image tensor is C x H x W"),
    (torch.zeros(3, 16, 16, dtype=torch.uint8), "holds torch.uint8; an image tensor holds "
                                                 "floats (a normalised image)"),
    (torch.zeros(1, 16, 16), "has shape 1x16x16; expected 3 channels of at least 8x8 pixels"),
    (torch.zeros(3, 4, 16), "has shape 3x4x16; expected 3 channels of at least 8x8 pixels"),
    (torch.full((3, 8, 8), float("nan")), "holds NaN or infinite values"),
    ("image.png", "holds str, not an image tensor"),
])
def test_bad_image_tensors_name_the_item(capsys, tmp_path, tensor, why):
    data = _chunks(tmp_path, current_view_image=tensor)
    message = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", data])
    assert message == f"{data}/chunk_0.pkl: item 1: 'current_view_image' {why}"


def test_bad_normalization_flag(capsys, tmp_path):
    message = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", tmp_path,
                                                         "--tensor-normalization", "0.5"])
    assert message == ("--tensor-normalization: must be avdn, imagenet, none, MEAN,STD or "
                       "M1,M2,M3,S1,S2,S3 with non-zero STDs, got '0.5'")


def test_tensors_of_every_dtype_are_rebuilt_without_torch_load(monkeypatch):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    base = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    values = {str(t): base.to(t) for t in (torch.float32, torch.float64, torch.float16,
                                           torch.bfloat16, torch.int64, torch.uint8, torch.bool)}
    values["view"] = base[1, :, 1:3]
    values["array"] = np.arange(5.0)
    for protocol in (2, 4, 5):
        read = pickles.load(io.BytesIO(pickle.dumps(values, protocol=protocol)))
        for key, value in values.items():
            if key == "array":
                assert np.array_equal(read[key], value)
            else:
                assert read[key].dtype == value.dtype and torch.equal(read[key], value), key


def test_batch_encodings_are_read_without_transformers(tmp_path):
    """A BatchEncoding (with a fast tokenizer's encodings) reads as a plain mapping in a
    process that never imports transformers, and is written back as a BatchEncoding."""
    tok = avdn_data.tokenizer(tmp_path / "tok")
    encoded = tok(["fly north"], max_length=5, padding="max_length", return_tensors="pt")
    (tmp_path / "in.pkl").write_bytes(pickle.dumps({"t": encoded}))
    script = ("import sys, pickle; from hnm import pickles\n"
              f"d = pickles.load(open({str(tmp_path / 'in.pkl')!r}, 'rb'))\n"
              "assert isinstance(d['t'], dict) and d['t']['input_ids'].shape == (1, 5)\n"
              "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules\n"
              f"pickles.dump(d, open({str(tmp_path / 'out.pkl')!r}, 'wb'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    back = pickle.loads((tmp_path / "out.pkl").read_bytes())["t"]
    assert type(back) is BatchEncoding and back.encodings[0].ids == encoded.encodings[0].ids
    assert torch.equal(back["input_ids"], encoded["input_ids"])
