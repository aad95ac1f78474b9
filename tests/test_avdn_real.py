"""The AVDN processed dataset as its real preprocessing writes it: the normalisation told
apart, every output row joinable by its id, an export loadable without `tokenizers`, and
the export's summary of what the training code will do with it."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import avdn_data
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from builders import FAST, cli, read_jsonl, records, snapshot, tiny_bert, tiny_clip, write_images
from PIL import Image

from hnm import outputs
from hnm.api import make
from hnm.embed import embed_images
from hnm.encoders import build_image_encoder
from hnm.readers import read_input
from hnm.storage import RunDir

# colours (0-255) of constant test images: every sampled value of an item is its colour,
# so that the share of values a normalisation maps out of range is known exactly
COLOURS = [(250, 200, 30), (10, 240, 120), (128, 128, 128), (60, 50, 40), (255, 255, 255),
           (0, 0, 0)]


def _write(root: Path, tensors: list[torch.Tensor], per_chunk: int = 3) -> Path:
    root.mkdir(parents=True)
    for k in range(0, len(tensors), per_chunk):
        items = {i: {"current_view_image": tensors[i], "answer": f"fly to waypoint {i} now",
                     "first_instruction": f"find {i}"}
                 for i in range(k, min(k + per_chunk, len(tensors)))}
        with open(root / f"chunk_{k // per_chunk}.pkl", "wb") as handle:
            pickle.dump(items, handle)
    return root


def _constant(colour: tuple[int, ...], way: str) -> torch.Tensor:
    pixels = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand(3, 12, 12) / 255
    return avdn_data.normalise(pixels.contiguous(), way).contiguous()


def _mapped(tensors: list[torch.Tensor], mean: tuple, std: tuple) -> np.ndarray:
    """Every item's colour mapped back with (mean, std), repeated as the sample holds it."""
    values = np.stack([t[:, 0, 0].numpy() for t in tensors])
    mapped = values * np.array(std, np.float64) + np.array(mean, np.float64)
    return np.repeat(mapped[:, :, None], 1024, axis=2)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("norm")
    return {way: _write(root / way, [_constant(c, way) for c in COLOURS])
            for way in ("avdn", "imagenet")} | {
        "raw": _write(root / "raw", [torch.tensor(c, dtype=torch.float32).view(3, 1, 1)
                                     .expand(3, 12, 12).contiguous() for c in COLOURS])}


def _dry_run(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc, _, err = cli(capsys, *FAST, "--annotations", data, "--output-dir", out,
                     "--dry-run", "--quiet", *extra)
    return rc, err


def test_each_normalisation_is_accepted_or_refused(capsys, tmp_path, datasets):
    """AVDN's own normalisation (0-255 units) is the default and accepted; read the ImageNet
    way, those tensors map far out of range and are refused naming the flag and avdn;
    ImageNet-normalised tensors read as avdn stay in range but dark, refused naming
    imagenet; unnormalised pixels fit no preset."""
    assert _dry_run(capsys, datasets["avdn"], tmp_path / "a") == (0, "")
    assert _dry_run(capsys, datasets["imagenet"], tmp_path / "b", "--tensor-normalization",
                    "imagenet") == (0, "")
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    avdn = tuple(tuple(v / 255 for v in part) for part in avdn_data.AVDN_RGB)
    items = [t["current_view_image"] for t in _load(datasets["avdn"]).values()]
    mapped = _mapped(items, *imagenet)
    share = np.mean((mapped < -0.25) | (mapped > 1.25))
    assert share > 0.2
    rc, err = _dry_run(capsys, datasets["avdn"], tmp_path / "c", "--tensor-normalization",
                       "imagenet")
    assert (rc, err) == (2, f"hnm: error: --tensor-normalization imagenet: maps {share:.0%} of "
                            "the sampled pixel values outside the image range (beyond [-0.25, "
                            "1.25]; 6 item(s) sampled); the tensors look normalised as avdn: "
                            "pass --tensor-normalization avdn\n")
    items = [t["current_view_image"] for t in _load(datasets["imagenet"]).values()]
    top = np.quantile(_mapped(items, *avdn), 0.999)
    assert top < 0.6
    rc, err = _dry_run(capsys, datasets["imagenet"], tmp_path / "d")
    assert (rc, err) == (2, f"hnm: error: --tensor-normalization avdn: maps the sampled pixel "
                            f"values to [0, {top:.2f}] only, the dark part of the image range "
                            "(6 item(s) sampled); the tensors look normalised as imagenet: pass"
                            " --tensor-normalization imagenet (or give these values as numbers"
                            " to keep them)\n")
    numbers = ",".join(str(v) for part in avdn for v in part)
    assert _dry_run(capsys, datasets["imagenet"], tmp_path / "e", "--tensor-normalization",
                    numbers) == (0, "")  # numbers are the user's word: only the range counts
    rc, err = _dry_run(capsys, datasets["raw"], tmp_path / "f")
    assert rc == 2 and err.endswith("; no preset (avdn, imagenet, none) fits them: give the "
                                    "mean and std they were normalised with (M1,M2,M3,S1,S2,"
                                    "S3, 0-1 units)\n"), err
    for name in "abcdef":
        assert not (tmp_path / name).exists()


def test_with_avdn_a_model_encoder_sees_the_png_files(tmp_path, one_thread):
    """Tensors made as the real preprocessing makes them (cv2's float32 pixels, C x H x W,
    minus AVDN's mean, over its std, torch.tensor): with the default preset a model
    encoder embeds them exactly as it embeds the PNG files they came from."""
    rng = np.random.default_rng(1)
    files, items = [], {}
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) for v in avdn_data.AVDN_RGB)
    for i in range(5):
        pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
        view = (pixels.astype(np.float32).transpose(2, 0, 1) - mean) / std
        items[i] = {"current_view_image": torch.tensor(view), "answer": f"answer {i}"}
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "chunk_0.pkl", "wb") as handle:
        pickle.dump(items, handle)
    config = make(None, {"annotations": str(tmp_path / "data")})
    assert config.tensor_normalization == "avdn"
    refs = read_input(config).refs
    encoder = build_image_encoder(str(tiny_clip(tmp_path / "clip")), "cpu")
    from_files, _ = embed_images(encoder, files, 2, 0, 10**8)
    from_tensors, _ = embed_images(encoder, refs, 2, 0, 10**8,
                                   normalization=config.tensor_normalization)
    assert np.array_equal(from_files, from_tensors)
    wrong, _ = embed_images(encoder, refs, 2, 0, 10**8, normalization="imagenet")
    assert not np.array_equal(from_files, wrong)


# ---------------------------------------------------------------- every row has its id


def _plain(n: int) -> list[dict]:
    """Records without an id field (and without nested values, for the tables)."""
    return [{k: v for k, v in r.items() if k not in ("id", "extra")} for r in records(n)]


def _input(root: Path, reader: str) -> tuple[Path, list]:
    """An input of 6 records whose ids are not a field; returns it and the ids expected."""
    recs = _plain(6)
    write_images(root, records(6))
    if reader == "json-keyed":
        path = root / "a.json"
        path.write_text(json.dumps({f"k{i}": r for i, r in enumerate(recs)}))
        return path, [f"k{i}" for i in range(6)]
    if reader in ("json", "jsonl"):
        path = root / f"a.{reader}"
        path.write_text(json.dumps(recs) if reader == "json" else
                        "".join(json.dumps(r) + "\n" for r in recs))
    elif reader == "csv":
        path = root / "a.csv"
        path.write_text("image,text,group\n" + "".join(
            f"{r['image']},\"{r['text']}\",{r['group']}\n" for r in recs))
    elif reader == "parquet":
        path = root / "a.parquet"
        pq.write_table(pa.Table.from_pylist(recs), path)
    else:  # webdataset: the sample keys are the ids
        path = root / "a.tar"
        with tarfile.open(path, "w") as tar:
            for i, r in enumerate(recs):
                for ext, data in (("png", (root / r["image"]).read_bytes()),
                                  ("txt", r["text"].encode()),
                                  ("json", json.dumps({"group": r["group"]}).encode())):
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path, [f"s{i:03d}" for i in range(6)]
    return path, list(range(6))


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.mark.parametrize("output", ["jsonl", "parquet"])
@pytest.mark.parametrize("reader", ["json-keyed", "json", "jsonl", "csv", "parquet",
                                    "webdataset"])
def test_every_output_row_carries_its_id(capsys, tmp_path, bert, reader, output):
    given, ids = _input(tmp_path / "in", reader)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *FAST, "--annotations", given, "--image-dir", tmp_path / "in",
                     "--output-dir", out, "--text-encoder", bert, "--blacklist", "",
                     "--group-field", "group", "--output-format", output, "--quiet")
    assert rc == 0, err
    rows = [r for _, r in outputs.read_records(RunDir(out))]
    assert [r["id"] for r in rows] == ids
    if output == "jsonl":
        assert all(next(iter(r)) == "id" for r in read_jsonl(out / "negatives.jsonl"))
    else:
        assert pq.read_schema(out / "negatives.parquet").names[0] == "id"
    text = {r["id"]: r["text"] for r in rows}
    negatives = [n for r in rows for n in r["negatives"]]
    assert negatives and all(text[n["id"]] == n["text"] for n in negatives)


# ---------------------------------------------------------------- the export


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> dict[str, Path]:
    """A dataset whose tokenizer outputs are plain dicts of tensors (loadable with torch
    alone), one item without a map_name, mined with suspects dropped (anchors left
    without a negative)."""
    root = tmp_path_factory.mktemp("export")
    tok = avdn_data.tokenizer(root / "tok")
    items = {}
    for i in range(12):
        item = avdn_data.item(i, tok)
        for key in ("tokenized_input", "tokenized_answer"):
            item[key] = dict(item[key])
        item["contrastive_data"]["tokenized_negative"] = dict(
            item["contrastive_data"]["tokenized_negative"])
        items[i] = item
    for i in range(0, 12, 3):
        del items[i]["map_name"]
    data = root / "data"
    data.mkdir()
    for k in range(2):
        with open(data / f"chunk_{k}.pkl", "wb") as handle:
            pickle.dump({i: items[i] for i in range(6 * k, 6 * k + 6)}, handle)
    out = root / "run"
    args = [*FAST, "--annotations", data, "--output-dir", out, "--text-encoder",
            tiny_bert(root / "bert"), "--blacklist", "", "--diverse-ratio", "0.5",
            "--cosine-threshold", "0.97", "--max-samples", "9", "--quiet"]
    assert __import__("hnm.cli").cli.main([str(a) for a in args]) == 0
    return {"root": root, "data": data, "out": out, "tok": root / "tok",
            "before": snapshot(data)}


def _load(folder: Path) -> dict:
    items = {}
    for k in range(2):
        with open(folder / f"chunk_{k}.pkl", "rb") as handle:
            items.update(pickle.load(handle))
    return items


def test_export_loads_without_tokenizers(capsys, mined, tmp_path):
    """tokenized_negative_2 holds the tokenizer's tensors only (no tokenizers.Encoding):
    the export unpickles where `tokenizers` cannot be imported, with the ids a slow
    tokenizer of the same vocabulary gives."""
    from transformers import BertTokenizer

    to = tmp_path / "x"
    rc, _, err = cli(capsys, "export", mined["out"], "--format", "avdn", "--to", to,
                     "--tokenizer", mined["tok"], "--max-answer-length", "10")
    assert rc == 0, err
    script = ("import pickle, sys\nsys.modules['tokenizers'] = None\n"
              "sys.modules['transformers'] = None\n"
              f"for k in (0, 1):\n    d = pickle.load(open({str(to)!r} + f'/chunk_{{k}}.pkl', "
              "'rb'))\n    for item in d.values():\n"
              "        t = item['contrastive_data'].get('tokenized_negative_2')\n"
              "        assert t is None or type(t) is dict and t['input_ids'].shape == (1, 10)\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    slow = BertTokenizer(str(mined["tok"] / "vocab.txt"))
    exported = _load(to)
    given = [item["contrastive_data"] for item in exported.values()
             if "tokenized_negative_2" in item["contrastive_data"]]
    assert given
    for data in given:
        expected = slow(data["negative_text_2"], max_length=10, padding="max_length",
                        truncation=True, return_tensors="pt")
        assert data["tokenized_negative_2"].keys() == expected.keys()
        for key in expected:
            assert torch.equal(data["tokenized_negative_2"][key], expected[key])


def _counts(run: Path) -> tuple[int, int]:
    records = [r for _, r in outputs.read_records(RunDir(run))]
    return sum(bool(r["negatives"]) for r in records), sum(not r["negatives"] for r in records)


def test_export_summary_and_missing_negatives(capsys, mined, tmp_path):
    got, without = _counts(mined["out"])
    assert got and without >= 3  # --max-samples 9 leaves 3 items unmined
    total = got + without
    mixed = ("note: the training code's default collate fails with KeyError: "
             "'negative_input_2' on a batch mixing items with and without tokenized_negative_2"
             ": pass --missing-negative lm-negative to give every item one, or leave those "
             "items out of training\n")
    tokenizer = ["--tokenizer", mined["tok"], "--max-answer-length", "12"]
    rc, out, err = cli(capsys, "export", mined["out"], "--format", "avdn", "--to",
                       tmp_path / "a", *tokenizer)
    assert (rc, err) == (0, "")
    assert out == (f"{got} of {total} item(s) got a mined negative (tokenized_negative_2), 0 "
                   f"their language-model negative again (--missing-negative lm-negative), "
                   f"{without} none (--missing-negative skip)\n{mixed}wrote {tmp_path / 'a'}\n")
    rc, out, err = cli(capsys, "export", mined["out"], "--format", "avdn", "--to",
                       tmp_path / "b")
    assert out == (f"{got} of {total} item(s) got a mined negative (negative_text_2 (no "
                   "tokenized_negative_2)), 0 their language-model negative again "
                   f"(--missing-negative lm-negative), {without} none (--missing-negative "
                   "skip)\nnote: the training code uses a mined negative only through "
                   "tokenized_negative_2: without --tokenizer it uses none of them\n"
                   f"wrote {tmp_path / 'b'}\n")
    rc, out, err = cli(capsys, "export", mined["out"], "--format", "avdn", "--to",
                       tmp_path / "c", "--missing-negative", "lm-negative", *tokenizer)
    assert (rc, err) == (0, "")
    assert out == (f"{got} of {total} item(s) got a mined negative (tokenized_negative_2), "
                   f"{without} their language-model negative again (--missing-negative "
                   "lm-negative), 0 none (--missing-negative lm-negative)\n"
                   f"wrote {tmp_path / 'c'}\n")
    originals, lm, skipped = _load(mined["data"]), _load(tmp_path / "c"), _load(tmp_path / "a")
    records = dict(outputs.read_records(RunDir(mined["out"])))
    stamp = None
    for index, item in lm.items():
        data = item["contrastive_data"]
        meta = data["validation_metadata_negative_2"]
        stamp = stamp or meta["mining_timestamp"]
        assert meta["mining_timestamp"] == stamp
        if records[index]["negatives"]:
            assert data["negative_text_2"] == skipped[index]["contrastive_data"][
                "negative_text_2"] == records[index]["negatives"][0]["text"]
            negative = originals[records[index]["negatives"][0]["id"]]
            assert meta["map_name_2"] == negative.get("map_name", "unknown")
            continue
        assert "negative_text_2" not in skipped[index]["contrastive_data"]
        own = originals[index]["contrastive_data"]
        assert data["negative_text_2"] == own["negative_text"]
        assert data["tokenized_negative_2"].keys() == own["tokenized_negative"].keys()
        assert all(torch.equal(data["tokenized_negative_2"][k], own["tokenized_negative"][k])
                   for k in own["tokenized_negative"])
        assert meta == {"negative_type_2": "lm_negative",
                        "map_name_2": originals[index].get("map_name", "unknown"),
                        "mining_timestamp": stamp, "mining_method": "lm_negative_repeated"}
    assert snapshot(mined["data"]) == mined["before"]


def test_map_name_2_of_a_negative_without_one_is_unknown(capsys, mined, tmp_path):
    rc, _, err = cli(capsys, "export", mined["out"], "--format", "avdn", "--to", tmp_path / "a")
    assert rc == 0, err
    exported = _load(tmp_path / "a")
    records = dict(outputs.read_records(RunDir(mined["out"])))
    names = {index: item["contrastive_data"]["validation_metadata_negative_2"]["map_name_2"]
             for index, item in exported.items() if records[index]["negatives"]}
    first = {index: records[index]["negatives"][0]["id"] for index in names}
    expected = {index: "unknown" if n % 3 == 0 else f"map_{n % 4}" for index, n in first.items()}
    assert names == expected and "unknown" in names.values()


def test_bad_missing_negative_choice(capsys, mined, tmp_path):
    rc, _, err = cli(capsys, "export", mined["out"], "--to", tmp_path / "t.parquet",
                     "--missing-negative", "skip")
    assert (rc, err) == (2, "hnm: error: --tokenizer, --max-answer-length and "
                            "--missing-negative: only with --format avdn\n")


# ---------------------------------------------------------------- one read, memory


def test_duplicates_are_counted_from_the_read_that_checked_them(tmp_path, monkeypatch):
    """The duplicate-image count of a chunked input reads no chunk again: each tensor was
    hashed (its values in C order, whatever its strides) when its chunk was checked; the
    count equals one made by hashing every tensor's bytes."""
    import hashlib

    from reference import duplicate_images

    from hnm.data import load_corpus
    from hnm.readers import avdn as reader

    base = [avdn_data.image(i, 12) for i in range(4)]
    strided = base[1].permute(1, 2, 0).contiguous().permute(2, 0, 1)  # H x W x C strides
    tensors = [base[0], base[1], strided, base[2], base[0].clone(), base[3]]
    data = _write(tmp_path / "d", tensors)
    ds = load_corpus(make(None, {"annotations": str(data)}))

    def no_read(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(reader, "load_items", no_read)
    counted = duplicate_images(ds.images)
    digests = [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in tensors]
    assert counted == {"rows": 6, "unreadable": 0, "duplicate_rows": 6 - len(set(digests)),
                       "groups": 2}


def test_dry_run_counts_the_chunk_each_loader_holds(capsys, tmp_path):
    """Each process reading images holds one whole chunk: the dry run says so, and the
    embed phase's memory counts the largest chunk once per such process (the worker itself
    without loaders); the other phases are unchanged."""
    from hnm.sizing import Sizes, choose_index, estimate

    data = _write(tmp_path / "d", [avdn_data.image(i, 40) for i in range(6)])
    largest = max(p.stat().st_size for p in data.glob("*.pkl"))
    rc, out, err = cli(capsys, *FAST[:2], "--annotations", data, "--output-dir",
                       tmp_path / "o", "--dry-run", "--num-workers", "2", "--cpu-workers", "1")
    assert rc == 0, err
    assert (f"Image tensors: chunks of up to {largest / 2**20:.1f} MiB, each process reading "
            "images (2 per worker) holding one whole (counted in embed below)") in out
    config = make(None, {"annotations": str(data)})
    sizes = Sizes(rows=6, phrases=6, anchors=6, dv=192, dt=384, annotation_bytes=0,
                  workers=1, device="cpu")
    choice = choose_index(config, 6, ["cpu"])
    plain = estimate(config, sizes, choice)
    for loaders, held in ((0, 1), (3, 3)):
        chunked = estimate(config, Sizes(**{**sizes.__dict__, "chunk_bytes": float(largest),
                                            "loaders": loaders}), choice)
        assert chunked[0].per_worker - plain[0].per_worker == held * largest
        assert [p.per_worker for p in chunked[1:]] == [p.per_worker for p in plain[1:]]


def test_pixels_of_tensors_with_image_strides_are_the_original_pooling(tmp_path, one_thread):
    """Tensors as the preprocessing stores them (torch.tensor of a transposed H x W x C
    array keeps its strides): the pixels features are the original's, the 8 x 8 pool of
    its stacked batch, L2-normalised, snapped to hnm's grid."""
    import torch.nn.functional as F

    from hnm.grid import finalize

    rng = np.random.default_rng(2)
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) for v in avdn_data.AVDN_RGB)
    tensors = [torch.tensor((rng.integers(0, 256, (30, 26, 3)).astype(np.float32)
                             .transpose(2, 0, 1) - mean) / std) for _ in range(5)]
    assert not any(t.is_contiguous() for t in tensors)
    refs = read_input(make(None, {"annotations": str(_write(tmp_path / "d", tensors))})).refs
    embedded, _ = embed_images(build_image_encoder("pixels", "cpu"), refs, 2, 0, 10**8)
    pooled = F.adaptive_avg_pool2d(torch.stack(tensors), (8, 8)).flatten(1)
    np.testing.assert_allclose(embedded, F.normalize(pooled, dim=1).numpy(), rtol=0,
                               atol=1e-6)
    assert np.array_equal(embedded, finalize(pooled.double().numpy()))


def test_report_thumbnails_of_tensors_are_those_of_their_images(tmp_path):
    """The gallery's thumbnail of a tensor, made from the values read, is the thumbnail of
    the image file the tensor maps back to."""
    import base64

    from hnm.readers import tensor_png
    from hnm.report_gallery import THUMB, Thumbs

    data = _write(tmp_path / "d", [avdn_data.image(i, 200) for i in range(3)])
    refs = read_input(make(None, {"annotations": str(data)})).refs
    thumbs = Thumbs(tmp_path, 10**8)
    for ref in refs:
        with Image.open(tensor_png(ref, "avdn")) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=72)
        expected = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        assert thumbs._data_uri(ref, "avdn") == expected
