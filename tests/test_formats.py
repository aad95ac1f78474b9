"""Every input format gives the same negatives; Parquet output; bad shards fail on one line."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import DEMO_FIELDS, FAST, cli, fails, read_jsonl, records, snapshot, tiny_bert
from PIL import Image

from hnm import demo, outputs
from hnm.cli import main
from hnm.config import Config, Fields
from hnm.data import Corpus, load_corpus
from hnm.plan import follow_inputs, read_plan
from hnm.readers import ImageRef
from hnm.storage import RunDir

PER_SHARD = 25  # 60 demo records: three shards of 25, 25 and 10
# The tiny random text encoder finds every pair of texts alike (0.7-0.99): a threshold
# this high lets some hard negatives through.
MINING = ["--blacklist", "", "--diverse-ratio", "0.5", "--cosine-threshold", "0.97"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The same 60 demo records (12 dialogs) in every input format: --annotations values."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {fmt: demo.make_demo(root, num_dialogs=12, fmt=fmt, per_shard=PER_SHARD)
             for fmt in demo.FORMATS}
    recs = json.loads(paths["json"].read_text())
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n",
                            quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
        writer.writerows([list(recs[0])] + [list(r.values()) for r in recs])
        paths[fmt] = root / f"annotations.{fmt}"
        paths[fmt].write_text(buffer.getvalue(), encoding="utf-8")
    return paths


def mine(capsys, given: Path, out: Path, bert: Path, *extra) -> Path:
    rc, _, err = cli(capsys, *FAST, "--annotations", given,
                     "--image-dir", given.parent,
                     "--output-dir", out, *DEMO_FIELDS, "--text-encoder", bert, *MINING,
                     *extra)
    assert rc == 0, err
    return out


def picked(out: Path) -> list[list[tuple]]:
    """For every record, in order: its negatives' ids, types and similarities."""
    return [[(n["id"], n["type"], n["text_similarity"], n["visual_similarity"])
             for n in r["negatives"]] for _, r in outputs.read_records(RunDir(out))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs, bert) -> Path:
    """The run of the JSON file and image files."""
    out = tmp_path_factory.mktemp("runs") / "json"
    args = [*FAST, "--annotations", inputs["json"], "--image-dir", inputs["json"].parent,
            "--output-dir", out, *DEMO_FIELDS, "--text-encoder", bert, *MINING, "--quiet"]
    assert main([str(a) for a in args]) == 0
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet", "webdataset", "hf"])
def test_every_format_gives_the_same_negatives(capsys, tmp_path, inputs, bert, reference,
                                               fmt):
    out = mine(capsys, inputs[fmt], tmp_path / fmt, bert)
    expected = picked(reference)
    kinds = Counter(n[1] for negs in expected for n in negs)
    assert kinds["hard"] > 10 and kinds["diverse"] > 10
    assert picked(out) == expected
    plan = read_plan(RunDir(out))
    assert (plan.input_format, plan.input_files) == (
        "json" if fmt == "jsonl" else fmt, 3 if fmt in ("parquet", "webdataset", "hf") else 1)
    page = (out / "report.html").read_text()  # thumbnails found from the image keys too
    assert page.count("data:image/jpeg") == \
        (reference / "report.html").read_text().count("data:image/jpeg") > 50
    assert "image not found" not in page


@pytest.mark.processes
def test_shards_with_two_workers_give_the_same_bytes(capsys, tmp_path, inputs, bert):
    """Workers follow the input shards (on the batch grid), and each one's DataLoader
    processes stream the Parquet column themselves: any worker count, the same bytes."""
    one = mine(capsys, inputs["parquet"], tmp_path / "one", bert, "--batch-size", "5")
    two = mine(capsys, inputs["parquet"], tmp_path / "two", bert, "--batch-size", "5",
               "--cpu-workers", "2", "--num-workers", "2")
    assert (one / "negatives.jsonl").read_bytes() == (two / "negatives.jsonl").read_bytes()
    assert [s.rows for s in read_plan(RunDir(two)).shards] == [(0, 25), (25, 60)]


def test_records_of_shard_formats_hold_image_keys(inputs):
    """No bytes in the records: the image field holds `<shard>/<member or row>`."""
    fields = Fields(text="answer", group="first_instruction")
    for fmt, key in (("parquet", "part-00001.parquet/0"), ("webdataset", "00001.tar/d005_t1.png"),
                     ("hf", "data-00001-of-00003.arrow/0")):
        ds = load_corpus(Config(annotations=str(inputs[fmt]), fields=fields))
        assert ds.records[PER_SHARD if fmt != "hf" else 20]["image"] == key
        assert isinstance(ds.images[0], ImageRef)
        assert ds.images[0].key == ds.records[0]["image"]
        assert all(isinstance(v, str | int) for r in ds.records for v in r.values())


# ---------------------------------------------------------------- where workers read


def _ds(ends: tuple[int, ...], skipped: tuple[int, ...] = ()) -> Corpus:
    keep = np.array([i for i in range(ends[-1]) if i not in skipped])
    n = len(keep)
    return Corpus([{}] * ends[-1], keep, list(range(n)), [Path()] * n, ["x"],
                   np.zeros(n, np.int64), np.arange(n), n, {}, "", "parquet", ends)


@pytest.mark.parametrize(("ends", "k", "grain", "expected"), [
    ((100, 200, 300, 400), 2, 10, [(0, 200), (200, 400)]),
    ((100, 200, 300, 400), 4, 10, [(0, 100), (100, 200), (200, 300), (300, 400)]),
    ((100, 200, 300, 400), 4, 64, [(0, 128), (128, 192), (192, 320), (320, 400)]),
    ((100, 200, 300, 400, 500), 4, 1, [(0, 100), (100, 200), (200, 400), (400, 500)]),
    ((100, 400), 4, 10, [(0, 100), (100, 200), (200, 300), (300, 400)]),  # too few files
    ((400,), 1, 10, [(0, 400)]),
])
def test_workers_follow_the_input_files(ends, k, grain, expected):
    assert follow_inputs(_ds(ends), k, grain) == expected


def test_skipped_records_move_the_file_edges():
    ds = _ds((10, 20, 30), skipped=(0, 1, 15))  # rows: 8 in the first file, 9, 10
    assert follow_inputs(ds, 3, 1) == [(0, 8), (8, 17), (17, 27)]


# ---------------------------------------------------------------- finding the input


def test_folder_and_glob_and_format_flag(capsys, tmp_path, inputs):
    """A folder with tar shards and Parquet metadata (as img2dataset writes) is read as
    WebDataset; a glob or --input-format picks the Parquet files instead."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in [*inputs["webdataset"].iterdir(), *inputs["parquet"].iterdir()]:
        os.link(path, folder / path.name)
    (folder / "00000_stats.json").write_text("{}")
    fields = Fields(text="answer", group="first_instruction")
    found = {}
    for name, given, fmt in (("folder", folder, None),
                                   ("glob", folder / "part-*.parquet", None),
                                   ("flag", folder, "parquet")):
        ds = load_corpus(Config(annotations=str(given), input_format=fmt,
                                 fields=fields))
        found[name] = (ds.input_format, len(ds.shard_ends), ds.ids[:2])
    assert found == {"folder": ("webdataset", 3, ["d000_t1", "d000_t2"]),
                     "glob": ("parquet", 3, ["d000_t1", "d000_t2"]),
                     "flag": ("parquet", 3, ["d000_t1", "d000_t2"])}
    rc, out, err = cli(capsys, *FAST, "--annotations", folder, *DEMO_FIELDS, "--dry-run")
    assert rc == 0, err
    assert "Input: webdataset, 3 file(s)" in out


@pytest.mark.parametrize(("given", "message"), [
    ("nothing-*.tar", "--annotations {root}/nothing-*.tar: no file matches"),
    ("empty", "{root}/empty: cannot read annotations: a folder holding no .json, .jsonl, "
              ".csv, .tsv, .parquet, .tar or .pkl file and no Hugging Face dataset"),
])
def test_inputs_that_name_nothing(capsys, tmp_path, given, message):
    (tmp_path / "empty").mkdir()
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", tmp_path / given])
    assert msg == message.format(root=tmp_path)


# ---------------------------------------------------------------- bad shards


def _copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("cut", ["inside", "boundary"])
def test_truncated_tar(capsys, tmp_path, inputs, cut):
    shards = _copy(inputs["webdataset"], tmp_path / "in")
    shard = shards / "00001.tar"
    raw = shard.read_bytes()
    with tarfile.open(shard) as archive:
        member = archive.getmember("d007_t3.png")
    end = member.offset_data + member.size
    shard.write_bytes(raw[:end - 100] if cut == "inside" else raw[:-(-end // 512) * 512])
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", shards, *DEMO_FIELDS])
    if cut == "inside":
        assert msg == (f"{shard}: truncated tar archive: member 'd007_t3.png' ends past the "
                       "end of the file")
    else:
        assert msg == f"{shard}: truncated tar archive: no end-of-archive marker after " \
                      "sample 'd007_t3'"


def test_compressed_tar_shard(capsys, tmp_path, inputs):
    import gzip

    shards = _copy(inputs["webdataset"], tmp_path / "in")
    shard = shards / "00001.tar"
    packed = shards / "00001.tar.gz"
    packed.write_bytes(gzip.compress(shard.read_bytes()))
    shard.unlink()
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", packed,
                                                     "--input-format", "webdataset",
                                                     *DEMO_FIELDS])
    assert msg == (f"{packed}: a compressed tar archive; hnm reads images at their offsets "
                   "in uncompressed .tar shards: decompress it first (e.g. gunzip)")


def test_tar_samples_without_an_image_or_with_bad_json(capsys, tmp_path):
    from hnm.writers import write_tar_shards

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    good = {"png": png.getvalue(), "txt": b"fly north along the road to the lake"}
    for name, sample, message in (
            ("noimage", {"txt": b"fly north along the road"},
             "sample 'b' has no image (none of .jpg, .jpeg, .png, .webp, .tif)"),
            ("badjson", {**good, "json": b"{'group': 1}"},
             "sample 'b': malformed JSON in b.json: Expecting property name enclosed in "
             "double quotes"),
            ("notext", {"png": png.getvalue()}, "record 1 (id 'b') has no text field 'text'")):
        shards = tmp_path / name
        write_tar_shards(shards, [("a", good), ("b", sample)], 10)
        msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", shards])
        assert msg == f"{shards / '00000.tar'}: {message}"


def test_parquet_without_the_text_column(capsys, tmp_path, inputs):
    shards = _copy(inputs["parquet"], tmp_path / "in")
    path = shards / "part-00002.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["answer"]), path)
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", shards, *DEMO_FIELDS])
    assert msg == (f"{path}: no text column 'answer' (columns: id, image, first_instruction, "
                   "map_name, turn)")


def test_undecodable_image_in_a_byte_column(capsys, tmp_path, inputs, bert):
    shards = _copy(inputs["parquet"], tmp_path / "in")
    path = shards / "part-00001.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[3] = images[3][:200]  # a PNG cut short: its header parses, its data does not
    images[4] = None  # no image at all
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, pa.binary()))
    pq.write_table(table, path)
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", shards, *DEMO_FIELDS])
    assert msg == (f"{shards}: 2 image(s) missing or unreadable: {path}[row 3] (unreadable), "
                   f"{path}[row 4] (missing) (--on-missing-image skip drops them)")
    out = mine(capsys, shards, tmp_path / "out", bert, "--on-missing-image", "skip")
    rows = read_jsonl(out / "negatives.jsonl")
    assert [r["negatives"] for r in rows[28:30]] == [[], []]
    assert json.loads((out / "metrics.json").read_text())["global"][
        "skipped_missing_image"] == 2


def test_hugging_face_splits(capsys, tmp_path, inputs):
    import datasets

    single = datasets.load_from_disk(str(inputs["hf"]))
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": single, "test": single.select(range(10))}).save_to_disk(
        str(both))
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", both, *DEMO_FIELDS])
    assert msg == f"--hf-split: {both} holds the splits train, test; choose one"
    fields = Fields(text="answer", group="first_instruction")
    ds = load_corpus(Config(annotations=str(both), hf_split="test", fields=fields))
    assert len(ds) == 10 and ds.records[0]["image"] == "data-00000-of-00001.arrow/0"


def test_hugging_face_without_the_datasets_package(capsys, tmp_path, inputs, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", inputs["hf"]])
    assert msg == (f"--annotations {inputs['hf']}: a Hugging Face dataset; reading it needs "
                   "the 'datasets' package: pip install 'hnm[hf]'")


def test_cc3m_style_tsv_and_quoted_csv(tmp_path):
    root = tmp_path
    recs = records(4)
    for r in recs:
        Image.new("RGB", (8, 8)).save(root / f"{r['id']}.png")
    tsv = root / "cc3m.tsv"
    tsv.write_text("".join(f"{r['text']} \"quoted\"\t{r['id']}.png\n" for r in recs))
    ds = load_corpus(Config(annotations=str(tsv), image_dir=str(root)))
    assert ds.ids == [0, 1, 2, 3]
    assert ds.records[1] == {"text": recs[1]["text"] + ' "quoted"', "image": "r1.png"}
    quoted = root / "a.csv"
    quoted.write_text('id,text,image\nx,"a, b\nc",r0.png\ny,plain,r1.png\n')
    ds = load_corpus(Config(annotations=str(quoted), image_dir=str(root)))
    assert ds.records == [{"id": "x", "text": "a, b\nc", "image": "r0.png"},
                          {"id": "y", "text": "plain", "image": "r1.png"}]


@pytest.mark.parametrize(("text", "message"), [
    ("id,text,image\nx,a,r0.png\ny,b\n", "{path}: line 3 has 2 fields, the header 3"),
    ("a\tb\tc\n", "{path}: the first row must name the columns (it has no 'text' and "
                  "'image'), or every row must be `caption, image`"),
    ("caption\thttps://example.com/1.jpg\n", "{path}: record 0 (id 0): image "
     "'https://example.com/1.jpg' is a URL; hnm reads local files: download the images "
     "first (e.g. with img2dataset)"),
])
def test_bad_tables(capsys, tmp_path, text, message):
    path = tmp_path / ("a.csv" if "," in text else "a.tsv")
    path.write_text(text)
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", path])
    assert msg == message.format(path=path)


def test_duplicate_ids_across_shards(capsys, tmp_path, inputs):
    shards = _copy(inputs["parquet"], tmp_path / "in")
    first, last = shards / "part-00000.parquet", shards / "part-00002.parquet"
    table = pq.read_table(last)
    ids = table.column("id").to_pylist()
    ids[4] = "d001_t2"
    pq.write_table(table.set_column(0, "id", pa.array(ids)), last)
    msg = fails(capsys, tmp_path, tmp_path / "out", ["--annotations", shards, *DEMO_FIELDS])
    assert msg == f"{last}: duplicate id 'd001_t2' in record 4 and {first} record 6"


def test_a_rewritten_shard_is_a_new_input(capsys, tmp_path, inputs, bert):
    """The run's identity covers every shard (name, size, modification time)."""
    shards = _copy(inputs["webdataset"], tmp_path / "in")
    out = mine(capsys, shards, tmp_path / "out", bert)
    shard = shards / "00002.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    before = snapshot(out)
    rc, _, err = cli(capsys, *FAST, "--annotations", shards, "--output-dir", out, *DEMO_FIELDS,
                     "--text-encoder", bert, *MINING)
    assert rc == 2 and "holds a run with a different config or input" in err
    assert snapshot(out) == before


# ---------------------------------------------------------------- Parquet output


def test_parquet_output(capsys, tmp_path, inputs, bert, reference, monkeypatch):
    """One row per record in row groups, negatives a list of structs; read back, the
    same records as negatives.jsonl's."""
    monkeypatch.setattr(outputs, "ROW_GROUP", 16)
    out = mine(capsys, inputs["json"], tmp_path / "out", bert, "--output-format", "parquet")
    assert not (out / "negatives.jsonl").exists()
    handle = pq.ParquetFile(out / "negatives.parquet")
    assert handle.metadata.num_rows == 60 and handle.metadata.num_row_groups == 4
    negative = handle.schema_arrow.field("negatives").type.value_type
    assert [f.name for f in negative] == ["id", "text", "image", "type", "text_similarity",
                                          "visual_similarity", "suspect", "threshold_step",
                                          "anchor_cluster", "negative_cluster"]
    got = [r for _, r in outputs.read_records(RunDir(out))]
    assert got == read_jsonl(reference / "negatives.jsonl")
    assert (out / "report.html").stat().st_size > 10_000


def test_parquet_output_of_mixed_records(capsys, tmp_path, bert):
    """Fields whose values have no one type (and mixed ids) are JSON text, read back."""
    from builders import write_images

    recs = records(8)  # "extra" holds lists mixing text and numbers
    recs[3]["id"] = 3
    recs[5]["only_here"] = [1.5, None]
    write_images(tmp_path, recs)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs))
    runs = {}
    for fmt in ("jsonl", "parquet"):
        rc, _, err = cli(capsys, *FAST, "--annotations", path, "--image-dir", tmp_path,
                         "--output-dir", tmp_path / fmt, "--text-encoder", bert,
                         "--blacklist", "", "--output-format", fmt)
        assert rc == 0, err
        runs[fmt] = [r for _, r in outputs.read_records(RunDir(tmp_path / fmt))]
    assert sum(bool(r["negatives"]) for r in runs["jsonl"]) > 0
    nulls = [{**r, "only_here": r.get("only_here")} for r in runs["jsonl"]]
    assert runs["parquet"] == nulls  # a field some records lack reads back as null
