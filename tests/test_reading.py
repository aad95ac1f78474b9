"""What the user names must exist, and every file hnm reads either decodes or is named in one
line (exit 2, nothing written): field mappings, mixed formats, undecodable configs and
blacklists, deep nesting, damaged arrays, tar member names, values Parquet cannot write."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import FAST, cli, dataset, fails, records, write_annotations

from hnm.config import Config, Fields
from hnm.data import MAX_DEPTH, load_corpus
from hnm.decoding import one_line
from hnm.outcome import Outcomes
from hnm.outputs import JSON_COLUMNS, read_records, write_negatives
from hnm.storage import RunDir

# records written with no anchor among them: their fields are what is tested
NO_ANCHORS = Outcomes.concat([])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    dataset(root, n=6)
    return root


def base(root: Path, name: str = "annotations.json") -> list:
    return ["--annotations", root / name, "--image-dir", root, "--dry-run"]


def png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40, 60, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path: Path, keys: list[str], meta: dict | None = None) -> Path:
    """Samples {key}.png and {key}.txt (and {key}.json holding `meta`); names may hold
    bytes that are not UTF-8, given as surrogate escapes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for i, key in enumerate(keys):
            members = {"png": png(i), "txt": records(len(keys))[i]["text"].encode()}
            if meta is not None:
                members["json"] = json.dumps(meta).encode()
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


# ---------------------------------------------------------------- field mappings


@pytest.mark.parametrize(("flag", "name", "hint"), [
    ("--id-field", "key", "fields: extra, group, id, image, text"),
    ("--group-field", "grp", "did you mean 'group'? fields: extra, group, id, image, text"),
    ("--text-field", "Text", "did you mean 'text'? fields: extra, group, id, image, text"),
    ("--image-field", "images", "did you mean 'image'? fields: extra, group, id, image, text"),
])
def test_a_field_no_record_has_is_refused(capsys, data, tmp_path, flag, name, hint):
    msg = fails(capsys, data, tmp_path / "out", [*base(data), flag, name])
    assert msg == (f"{flag} {name}: no record of {data / 'annotations.json'} has a field "
                   f"'{name}' ({hint})")


def test_a_field_named_in_the_config_file(capsys, data, tmp_path):
    config = data / "c.yaml"
    config.write_text("fields: {group: first_instruction}\n")
    msg = fails(capsys, data, tmp_path / "out", [*base(data), "--config", config])
    assert msg.startswith("--group-field first_instruction: no record of ")


def test_a_tar_sample_json_must_hold_a_named_field(capsys, tmp_path):
    """In tar shards the id falls back to the sample key and the text to the .txt member:
    a field the user names must still be in some sample's .json."""
    shard = write_tar(tmp_path / "in" / "00000.tar", ["a", "b", "c"], {"group": "g"})
    for flag, name, held in (("--id-field", "uid", "group, image, text"),
                             ("--text-field", "caption", "group, image"),
                             ("--group-field", "dialog", "group, image, text")):
        msg = fails(capsys, tmp_path / "in", tmp_path / "out",
                    ["--annotations", shard, "--dry-run", flag, name])
        assert msg == f"{flag} {name}: no record of {shard} has a field '{name}' (fields: {held})"


def test_records_without_a_named_field_keep_todays_meaning(data):
    """Some records without the group field: each is its own group; without the id field:
    its position is its id (a name that no record has is refused instead)."""
    recs = records(6)
    del recs[1]["group"], recs[0]["group"], recs[4]["id"]
    write_annotations(data / "annotations.json", recs)
    ds = load_corpus(Config(annotations=str(data / "annotations.json"), image_dir=str(data),
                             fields=Fields(group="group")))
    assert ds.ids == ["r0", "r1", "r2", "r3", 4, "r5"]
    assert list(ds.groups) == [0, 1, 2, 2, 3, 3]


# ---------------------------------------------------------------- files of two formats


def test_a_folder_or_glob_of_two_formats_is_refused(capsys, data, tmp_path):
    mixed = data / "mixed"
    recs = records(6)
    write_annotations(mixed / "a.json", recs[:3])
    (mixed / "b.tsv").write_text("text\timage\n" + "".join(
        f"{r['text']}\t{r['image']}\n" for r in recs[3:]))
    for given in (mixed, f"{mixed}/*"):
        msg = fails(capsys, data, tmp_path / "out",
                    ["--annotations", given, "--image-dir", data, "--dry-run"])
        assert msg == (f"--annotations {given}: holds annotations in 2 formats, json "
                       "(a.json), tsv (b.tsv); hnm reads one at a time: name the files of "
                       "one format (a glob) or pass --input-format")
    rc, out, err = cli(capsys, *FAST, "--annotations", f"{mixed}/*.json", "--image-dir", data,
                       "--output-dir", tmp_path / "out", "--dry-run")
    assert rc == 0 and "Input: json, 1 file(s)" in out, err


def test_img2dataset_statistics_beside_parquet_shards(capsys, data, tmp_path):
    """`00000_stats.json` beside `00000.parquet` is metadata, not a second format."""
    folder = data / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "extra"}
                                         for r in records(6)]), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text('{"count": 6}')
    rc, out, err = cli(capsys, *FAST, "--annotations", folder, "--image-dir", data,
                       "--output-dir", tmp_path / "out", "--dry-run")
    assert rc == 0 and "Input: parquet, 1 file(s)" in out, err


# ---------------------------------------------------------------- undecodable files


@pytest.mark.parametrize(("raw", "why"), [
    (b"k_nn: 5\n# caf\xe9\n", "cannot read config: not valid UTF-8 (byte 13)"),
    ("k_nn: 5\n".encode("utf-16"), "cannot read config: not valid UTF-8 (byte 0)"),
    (b"k_nn: " + b"[" * 600 + b"]" * 600 + b"\n", "cannot read config: nested too deeply"),
    (b"1: 2\n", "config key 1: a key must be a name"),
])
def test_undecodable_config(capsys, data, tmp_path, raw, why):
    config = data / "c.yaml"
    config.write_bytes(raw)
    msg = fails(capsys, data, tmp_path / "out", [*base(data), "--config", config])
    assert msg == f"{config}: {why}"


def test_undecodable_blacklist(capsys, data, tmp_path):
    blacklist = data / "blacklist.txt"
    blacklist.write_bytes(b"yes\ncaf\xe9\n")
    msg = fails(capsys, data, tmp_path / "out", [*base(data), "--blacklist", blacklist])
    assert msg == f"--blacklist {blacklist}: cannot read: not valid UTF-8 (byte 7)"


@pytest.mark.parametrize(("name", "text", "why"), [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "cannot read annotations: nested too deeply"),
    ("deep.jsonl", '{"id": 1}\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "cannot read annotations (line 2): nested too deeply"),
])
def test_annotations_nested_too_deeply_to_decode(capsys, data, tmp_path, name, text, why):
    (data / name).write_text(text)
    assert fails(capsys, data, tmp_path / "out", base(data, name)) == f"{data / name}: {why}"


def test_records_nested_deeper_than_the_outputs_write(capsys, data, tmp_path):
    """A value that decodes but that writing the outputs would fail on is refused while
    planning; MAX_DEPTH levels are fine."""
    def nest(depth: int) -> list:
        value: list = []
        for _ in range(depth - 1):
            value = [value]
        return value

    recs = records(6)
    recs[2]["extra"] = nest(MAX_DEPTH)
    write_annotations(data / "annotations.json", recs)
    rc, _, err = cli(capsys, *FAST, *base(data), "--output-dir", tmp_path / "out")
    assert rc == 0, err
    recs[2]["extra"] = {"a": nest(MAX_DEPTH)}
    write_annotations(data / "annotations.json", recs)
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert msg == (f"{data / 'annotations.json'}: record 2 (id 'r2'): field 'extra' is "
                   f"nested more than {MAX_DEPTH} levels deep")


def test_a_tar_sample_json_nested_too_deeply(capsys, tmp_path):
    shard = tmp_path / "in" / "00000.tar"
    shard.parent.mkdir()
    deep = ("[" * 4000 + "]" * 4000).encode()
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as archive:
        for ext, payload in (("png", png(0)), ("json", b'{"x": ' + deep + b"}")):
            info = tarfile.TarInfo(f"a.{ext}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    msg = fails(capsys, tmp_path / "in", tmp_path / "out",
                ["--annotations", shard, "--dry-run"])
    assert msg == f"{shard}: cannot read tar shard (sample 'a'): nested too deeply"


# ---------------------------------------------------------------- embedding arrays


@pytest.mark.parametrize(("kind", "why"), [
    ("npz", "a .npz archive; give a single .npy array (numpy.save)"),
    ("objects", "an array of Python objects, which hnm never unpickles: save the embeddings "
                "as floats"),
    ("truncated", "cannot read a .npy array: EOF: reading array header, expected 118 bytes "
                  "got 80"),
    ("header", "cannot read a .npy array: malformed (EOF in multi-line statement)"),
    ("strings", "values must be finite floats"),
])
def test_damaged_or_mistyped_arrays(capsys, data, tmp_path, kind, why):
    path = data / "emb.npy"
    if kind == "npz":
        path = data / "emb.npz"
        np.savez(path, x=np.ones((6, 4), np.float32))
    elif kind == "objects":
        np.save(path, np.array([[1.0, "x"]] * 6, dtype=object), allow_pickle=True)
    elif kind == "strings":
        np.save(path, np.full((6, 4), "a"))
    else:
        np.save(path, np.ones((6, 4), np.float32))
        raw = path.read_bytes()
        path.write_bytes(raw[:90] if kind == "truncated" else raw.replace(b"}", b" ", 1))
    for flag in ("--image-embeddings", "--text-embeddings"):
        msg = fails(capsys, data, tmp_path / "out", [*base(data), flag, path])
        assert msg == f"{flag} {path}: {why}"


# ---------------------------------------------------------------- tar member names


def test_tar_member_name_that_is_not_utf8(capsys, tmp_path):
    """Refused while planning (the name is the image's key in every output), not found
    when the outputs are written."""
    shard = write_tar(tmp_path / "in" / "00000.tar", ["a", "b\udcff", "c"])
    msg = fails(capsys, tmp_path / "in", tmp_path / "out", ["--annotations", shard,
                                                            "--dry-run"])
    assert msg == f"{shard}: member name b'b\\xff.png' is not valid UTF-8"


# ---------------------------------------------------------------- what the outputs write


@pytest.mark.parametrize("value", [{}, [{}], {"a": {}}, {"a": [{}, {}]}])
def test_parquet_output_writes_what_parquet_cannot_hold_as_json(tmp_path, data, value):
    """A field whose values have no Parquet form (an object without fields) is JSON text,
    read back as negatives.jsonl holds it."""
    recs = records(6)
    for r in recs:
        r["extra"] = value
    write_annotations(data / "annotations.json", recs)
    config = Config(annotations=str(data / "annotations.json"), image_dir=str(data),
                    output_format="parquet")
    ds = load_corpus(config)
    run = RunDir(tmp_path / "run")
    run.sign(run.layout(1))  # hnm writes only in a folder its signature makes a run
    write_negatives(config, run, ds, [], NO_ANCHORS)
    meta = pq.ParquetFile(run.negatives_parquet).schema_arrow.metadata
    assert json.loads(meta[JSON_COLUMNS.encode()]) == ["extra"]
    assert [r for _, r in read_records(run)] == [{**r, "negatives": []} for r in recs]


# ---------------------------------------------------------------- one line, always


def test_user_text_in_a_message_stays_on_one_line(capsys, data, tmp_path):
    """A field name holding a line break or a lone surrogate is escaped in the message."""
    recs = records(6)
    for r in recs:
        r["te\nxt\ud800"] = r.pop("text")
    (data / "annotations.json").write_text(json.dumps(recs))
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert msg.endswith("fields: extra, group, id, image, te\\nxt\\ud800)")
    assert one_line("plain é 😀") == "plain é 😀"


def test_names_that_are_not_utf8(capsys, data, tmp_path):
    """A file name or a flag value the run's files could not hold (the command line keeps
    such bytes as lone surrogates) is refused, naming it."""
    folder = data / "shards"
    folder.mkdir()
    write_annotations(folder / "a.json", records(6)[:3])
    (Path(os.fsdecode(bytes(folder) + b"/b\xff.json"))).write_text(json.dumps(records(6)[3:]))
    msg = fails(capsys, data, tmp_path / "out", ["--annotations", folder, "--image-dir", data,
                                                 "--dry-run"])
    assert msg == f"--annotations {folder}: file name b'b\\xff.json' is not valid UTF-8"
    msg = fails(capsys, data, tmp_path / "out", [*base(data), "--group-field", "g\udcff"])
    assert msg == "--group-field: b'g\\xff' is not valid UTF-8"


@pytest.mark.parametrize("name", ["img/\x00.png", "i" * 5000])
def test_image_paths_no_file_can_have(capsys, data, tmp_path, name):
    """A NUL byte or a name too long for the file system: a missing image, never an
    internal error (with --on-missing-image skip, the record is left out)."""
    recs = records(6)
    recs[2]["image"] = name
    write_annotations(data / "annotations.json", recs)
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert "1 image file(s) missing or unreadable" in msg and "(missing)" in msg
    rc, out, err = cli(capsys, *FAST, *base(data), "--output-dir", tmp_path / "out",
                       "--on-missing-image", "skip")
    assert rc == 0, err
