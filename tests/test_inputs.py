"""Bad input fails early on one line naming the culprit; good input of every format loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import (
    DEMO_FIELDS,
    FAST,
    answer,
    cli,
    dataset,
    fails,
    launch,
    read_jsonl,
    records,
    snapshot,
    tiny_bert,
    tiny_clip,
    write_annotations,
    write_images,
)

from hnm.config import Config, Fields
from hnm.data import load_corpus
from hnm.demo import make_demo


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Six caption-style records with their image files, in tmp_path/in."""
    dataset(tmp_path / "in")
    return tmp_path / "in"


def base(root: Path, name: str = "annotations.json") -> list:
    return ["--annotations", root / name, "--image-dir", root]


# ---------------------------------------------------------------- annotation files


def test_missing_annotations(capsys, data, tmp_path):
    msg = fails(capsys, data, tmp_path / "out", base(data, "nope.json"), "nope.json")
    assert msg == f"{data / 'nope.json'}: cannot read annotations: No such file or directory"


def test_unreadable_annotations_directory(capsys, data, tmp_path):
    (data / "folder.json").mkdir()
    fails(capsys, data, tmp_path / "out", base(data, "folder.json"), "folder.json",
          "cannot read annotations")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_annotations_permissions(capsys, data, tmp_path):
    (data / "annotations.json").chmod(0)
    try:
        fails(capsys, data, tmp_path / "out", base(data), "annotations.json",
              "Permission denied")
    finally:
        (data / "annotations.json").chmod(0o644)


def test_no_annotations_flag(capsys, data, tmp_path):
    fails(capsys, data, tmp_path / "out", ["--image-dir", data], "--annotations")


def test_malformed_json_names_file_and_line(capsys, data, tmp_path):
    (data / "annotations.json").write_text('[\n {"id": "a", "image": "img/0.png",\n'
                                           '  "text": "x" "y"}\n]\n')
    msg = fails(capsys, data, tmp_path / "out", base(data), "annotations.json")
    assert msg.startswith(f"{data / 'annotations.json'}: malformed JSON at line 3")


def test_jsonl_with_a_bad_line(capsys, data, tmp_path):
    recs = records(4)
    lines = [json.dumps(r) for r in recs]
    lines[2] = lines[2][:-1]  # drop the closing brace of record 2 (line 3)
    (data / "bad.jsonl").write_text("\n".join(lines) + "\n")
    msg = fails(capsys, data, tmp_path / "out", base(data, "bad.jsonl"), "bad.jsonl")
    assert msg.startswith(f"{data / 'bad.jsonl'}: malformed JSON on line 3")


def test_annotations_that_are_not_utf8(capsys, data, tmp_path):
    recs = records(3)
    recs[1]["text"] = "Fly to the café next to the lake and land there."
    (data / "latin1.json").write_bytes(json.dumps(recs, ensure_ascii=False).encode("latin-1"))
    msg = fails(capsys, data, tmp_path / "out", base(data, "latin1.json"))
    assert msg.startswith(f"{data / 'latin1.json'}: not valid UTF-8 (byte ")


def test_utf8_with_a_byte_order_mark_loads(tmp_path):
    recs = records(3)
    recs[0]["text"] = "Fly to the café next to the lake and land there."
    write_images(tmp_path, recs)
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, ensure_ascii=False).encode())
    assert _load(path, tmp_path).records == recs


def test_jsonl_with_line_separators_inside_strings(capsys, tmp_path, models):
    """Only "\\n" ends a JSONL line: U+2028, U+0085 and the other characters that
    str.splitlines breaks at are text inside a JSON string; hnm reads back what it writes."""
    recs = records(6)
    recs[3]["text"] = "Fly north\u2028then land near the lake\x85by the road\x1c, waypoint 3"
    recs[1]["extra"] = {"note": "a\u2029b\x0bc\x0cd\re"}
    write_images(tmp_path, recs)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                    encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # raw, not escaped
    assert _load(path, tmp_path).records == recs
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *FAST, "--annotations", path, "--image-dir", tmp_path,
                     "--output-dir", out, "--text-encoder", models / "bert", "--blacklist", "")
    assert rc == 0, err
    again = _load(out / "negatives.jsonl", tmp_path)
    assert [{k: v for k, v in r.items() if k not in ("negatives", "outcome")}
            for r in again.records] == recs


@pytest.mark.parametrize(("fmt", "field"), [("json", "text"), ("json", "extra"),
                                            ("jsonl", "group")])
def test_lone_surrogate_is_refused_when_loading(capsys, data, tmp_path, fmt, field):
    """A "\\ud800" escape is valid JSON but not Unicode: refused before anything is
    written, naming the record and the field, not a crash while writing the outputs."""
    recs = records(6)
    recs[2][field] = "SURROGATE"
    path = write_annotations(data / f"annotations.{fmt}", recs, fmt)
    path.write_text(path.read_text().replace('"SURROGATE"', '"bad \\ud800 text"'))
    msg = fails(capsys, data, tmp_path / "out", base(data, path.name))
    assert msg == (f"{path}: record 2 (id 'r2'): field '{field}' holds a lone surrogate "
                   "('\\ud800'), which is not valid Unicode")


def test_escaped_surrogate_pairs_load(tmp_path):
    recs = records(3)
    recs[1]["text"] = "EMOJI"
    write_images(tmp_path, recs)
    path = write_annotations(tmp_path / "a.json", recs)
    path.write_text(path.read_text().replace('"EMOJI"', '"land by the tent \\ud83c\\udfd5 now"'))
    assert _load(path, tmp_path).records[1]["text"] == "land by the tent \U0001f3d5 now"


def test_json_that_is_not_records(capsys, data, tmp_path):
    (data / "annotations.json").write_text("42\n")
    fails(capsys, data, tmp_path / "out", base(data), "annotations.json")


def test_record_that_is_not_an_object(capsys, data, tmp_path):
    write_annotations(data / "annotations.json", [*records(2), ["not", "a", "record"]])
    msg = fails(capsys, data, tmp_path / "out", base(data), "annotations.json")
    assert msg.endswith("record 2 is not an object")


def test_empty_annotations(capsys, data, tmp_path):
    write_annotations(data / "annotations.json", [])
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert msg == f"{data / 'annotations.json'}: no records"


# ---------------------------------------------------------------- records


@pytest.mark.parametrize("field", ["text", "image"])
def test_record_without_a_field(capsys, data, tmp_path, field):
    recs = records(6)
    del recs[3][field]
    write_annotations(data / "annotations.json", recs)
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert msg == f"{data / 'annotations.json'}: record 3 (id 'r3') has no {field} field '{field}'"


def test_record_without_a_mapped_text_field(capsys, tmp_path):
    root = tmp_path / "in"
    recs = records(5, text="answer")
    del recs[4]["answer"]
    write_images(root, recs)
    write_annotations(root / "annotations.json", recs)
    msg = fails(capsys, root, tmp_path / "out", [*base(root), "--text-field", "answer"])
    assert msg.endswith("record 4 (id 'r4') has no text field 'answer'")
    # the mapping is what is asked for: without it the default name 'text' is missing
    msg = fails(capsys, root, tmp_path / "out", base(root))
    assert msg == (f"--text-field text: no record of {root / 'annotations.json'} has a field "
                   "'text' (fields: answer, extra, group, id, image)")


@pytest.mark.parametrize("value", [42, "", "   ", None, ["a list"]])
def test_text_must_be_a_non_empty_string(capsys, data, tmp_path, value):
    recs = records(6)
    recs[2]["text"] = value
    write_annotations(data / "annotations.json", recs)
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert msg == (f"{data / 'annotations.json'}: record 2 (id 'r2'): text field 'text' must "
                   f"be a non-empty string, got {value!r}")


def test_image_field_must_be_a_string(capsys, data, tmp_path):
    recs = records(6)
    recs[5]["image"] = 5
    write_annotations(data / "annotations.json", recs)
    fails(capsys, data, tmp_path / "out", base(data), "record 5", "image field 'image'")


def test_duplicate_ids(capsys, data, tmp_path):
    recs = records(6)
    recs[4]["id"] = "r1"
    write_annotations(data / "annotations.json", recs)
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert msg == f"{data / 'annotations.json'}: duplicate id 'r1' in records 1 and 4"


def test_bad_id_type(capsys, data, tmp_path):
    recs = records(6)
    recs[1]["id"] = {"nested": 1}
    write_annotations(data / "annotations.json", recs)
    fails(capsys, data, tmp_path / "out", base(data), "record 1", "id must be")


# ---------------------------------------------------------------- image files


def test_missing_images_name_the_first_few_and_the_count(capsys, tmp_path):
    root = tmp_path / "in"
    dataset(root, n=8)
    for i in (1, 2, 4, 6, 7):
        (root / f"img/{i}.png").unlink()
    msg = fails(capsys, root, tmp_path / "out", base(root))
    shown = ", ".join(f"{root / f'img/{i}.png'} (missing)" for i in (1, 2, 4))
    assert msg == (f"{root / 'annotations.json'}: 5 image file(s) missing or unreadable: "
                   f"{shown} and 2 more (--on-missing-image skip drops them)")


def test_corrupt_images(capsys, data, tmp_path):
    (data / "img/1.png").write_bytes(b"this is not a png")
    whole = (data / "img/3.png").read_bytes()
    (data / "img/3.png").write_bytes(whole[: len(whole) // 2])  # header fine, data cut
    msg = fails(capsys, data, tmp_path / "out", base(data))
    assert msg.startswith(f"{data / 'annotations.json'}: 2 image file(s) missing or unreadable:")
    assert f"{data / 'img/1.png'} (unreadable), {data / 'img/3.png'} (unreadable)" in msg


def test_image_dir_that_does_not_exist(capsys, data, tmp_path):
    fails(capsys, data, tmp_path / "out",
          ["--annotations", data / "annotations.json", "--image-dir", data / "elsewhere"],
          "--image-dir", "elsewhere")


def test_every_image_missing_even_with_skip(capsys, data, tmp_path):
    for p in (data / "img").iterdir():
        p.unlink()
    msg = fails(capsys, data, tmp_path / "out", [*base(data), "--on-missing-image", "skip"])
    assert msg == f"{data / 'annotations.json'}: no record has a usable image"


@pytest.mark.parametrize("where", ["file", "file/run"])
def test_output_dir_that_is_a_file(capsys, data, tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    rc, _, err = cli(capsys, *FAST, *base(data), "--output-dir", tmp_path / where)
    assert rc == 2
    assert err.startswith("hnm: error: --output-dir") and len(err.splitlines()) == 1
    assert (tmp_path / "file").read_text() == "not a folder"


def test_output_dir_that_exists_stays_empty(capsys, data, tmp_path):
    (tmp_path / "out").mkdir()
    fails(capsys, data, tmp_path / "out", base(data, "nope.json"), "nope.json")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo(root, num_dialogs=12)
    return root


def test_skip_missing_images(capsys, demo_root, tmp_path):
    root = tmp_path / "in"
    annotations = root / "annotations.json"
    shutil.copytree(demo_root, root)
    recs = json.loads(annotations.read_text())
    # point three records at broken files: missing, not an image, truncated
    broken = {1: "gone.png", 7: "garbage.png", 12: "cut.png"}
    (root / "bad").mkdir()
    (root / "bad/garbage.png").write_bytes(b"GIF89a nonsense")
    whole = (demo_root / recs[12]["image"]).read_bytes()
    (root / "bad/cut.png").write_bytes(whole[:200])
    for i, name in broken.items():
        recs[i]["image"] = f"bad/{name}"
    write_annotations(annotations, recs)
    before = snapshot(root)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *FAST, *base(root), *DEMO_FIELDS, "--output-dir", out,
                     "--on-missing-image", "skip")
    assert rc == 0, err
    assert snapshot(root) == before
    rows = read_jsonl(out / "negatives.jsonl")
    assert [{k: v for k, v in r.items() if k not in ("negatives", "outcome")} for r in rows] == recs
    skipped_ids = {recs[i]["id"] for i in broken}
    for i, row in enumerate(rows):
        if i in broken:
            assert row["negatives"] == []
        assert not skipped_ids & {n["id"] for n in row["negatives"]}
    g = json.loads((out / "metrics.json").read_text())["global"]
    assert g["skipped_missing_image"] == 3
    assert g["anchors"] == len(recs) - 3
    assert sum(bool(r["negatives"]) for r in rows) == g["successes"] > 40


# ---------------------------------------------------------------- precomputed embeddings


@pytest.mark.parametrize("flag", ["--image-embeddings", "--text-embeddings"])
@pytest.mark.parametrize("shape", [(5, 8), (7, 8), (6,), (6, 0), (6, 8, 1)])
def test_embedding_files_of_the_wrong_shape(capsys, data, tmp_path, flag, shape):
    path = tmp_path / "emb.npy"
    np.save(path, np.ones(shape, np.float32))
    msg = fails(capsys, data, tmp_path / "out", [*base(data), flag, path])
    assert msg == (f"{flag} {path}: expected 6 rows (one per record) x dim, "
                   f"got shape {shape}")


@pytest.mark.parametrize("flag", ["--image-embeddings", "--text-embeddings"])
def test_embedding_files_unreadable_or_not_finite(capsys, data, tmp_path, flag):
    path = tmp_path / "emb.npy"
    path.write_text("not numpy")
    fails(capsys, data, tmp_path / "out", [*base(data), flag, path], flag, str(path))
    fails(capsys, data, tmp_path / "out", [*base(data), flag, tmp_path / "none.npy"], flag,
          "none.npy")
    values = np.ones((6, 4))
    values[3, 1] = np.nan
    np.save(path, values)
    fails(capsys, data, tmp_path / "out", [*base(data), flag, path], flag, "finite")


# ---------------------------------------------------------------- flags and config files


@pytest.mark.parametrize(("args", "message"), [
    (["--k-nn", "0"], "--k-nn: must be at least 1, got 0"),
    (["--cosine-threshold", "1.5"], "--cosine-threshold: must be within [-1, 1], got 1.5"),
    (["--cosine-threshold", "nan"], "--cosine-threshold: must be within [-1, 1], got nan"),
    (["--min-visual-similarity", "-1.01"],
     "--min-visual-similarity: must be within [-1, 1], got -1.01"),
    (["--blacklist-similarity", "2"], "--blacklist-similarity: must be within [-1, 1], got 2.0"),
    (["--diverse-ratio", "1.1"], "--diverse-ratio: must be within [0, 1], got 1.1"),
    (["--diverse-ratio", "-0.1"], "--diverse-ratio: must be within [0, 1], got -0.1"),
    (["--batch-size", "-1"], "--batch-size: must be at least 1, got -1"),
    (["--num-negatives", "0"], "--num-negatives: must be at least 1, got 0"),
    (["--n-clusters", "0"], "--n-clusters: must be at least 1, got 0"),
    (["--sliding-window-size", "0"], "--sliding-window-size: must be at least 1, got 0"),
    (["--fallback-phrase-reuse-limit", "0"],
     "--fallback-phrase-reuse-limit: must be at least 1, got 0"),
    (["--min-answer-length", "-1"], "--min-answer-length: must not be negative, got -1"),
    (["--num-workers", "-2"], "--num-workers: must not be negative, got -2"),
    (["--max-samples", "0"], "--max-samples: out of range: 0"),
    (["--cpu-workers", "0"], "--cpu-workers: must be at least 1, got 0"),
    (["--max-retries", "-1"], "--max-retries: must not be negative, got -1"),
])
def test_out_of_range_flags(capsys, data, tmp_path, args, message):
    assert fails(capsys, data, tmp_path / "out", [*base(data), *args]) == message


def test_bad_flag_is_not_blamed_on_the_config_file(capsys, data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("k_nn: 5\ncosine_threshold: 0.2\n")
    msg = fails(capsys, data, tmp_path / "out",
                ["--config", config, *base(data), "--cosine-threshold", "3"])
    assert msg == "--cosine-threshold: must be within [-1, 1], got 3.0"


@pytest.mark.parametrize(("args", "culprit"), [
    (["--k-nn", "ten"], "--k-nn"),
    (["--cosine-threshold", "high"], "--cosine-threshold"),
    (["--on-missing-image", "ignore"], "--on-missing-image"),
    (["--no-such-flag", "1"], "--no-such-flag"),
])
def test_flags_argparse_rejects(capsys, data, tmp_path, args, culprit):
    fails(capsys, data, tmp_path / "out", [*base(data), *args], culprit)


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("k_nn: 5\nbogus_key: 1\n", "unknown config key 'bogus_key'"),
    ("k_nn: five\n", "config key 'k_nn': expected int, got 'five'"),
    ("k_nn: 2.5\n", "config key 'k_nn': expected int, got 2.5"),
    ("k_nn: true\n", "config key 'k_nn': expected int, got True"),
    ("cosine_threshold: '0.3'\n", "config key 'cosine_threshold': expected float, got '0.3'"),
    ("quiet: 1\n", "config key 'quiet': expected bool, got 1"),
    ("text_encoder: 7\n", "config key 'text_encoder': expected str, got 7"),
    ("fields: {txt: answer}\n", "config key 'fields.txt': unknown (known: group, id, image, "
                                "text)"),
    ("fields: answer\n", "config key 'fields': expected a mapping, got 'answer'"),
    ("k_nn: 0\n", "--k-nn: must be at least 1, got 0"),
    ("- k_nn\n", "a config file must hold a mapping of keys to values"),
    ("k_nn: [1\n", "invalid YAML"),
])
def test_config_file_errors_name_the_file_and_key(capsys, data, tmp_path, yaml_text, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    msg = fails(capsys, data, tmp_path / "out", ["--config", config, *base(data)])
    assert msg.startswith(f"{config}: ") and message in msg, msg


def test_config_file_that_does_not_exist(capsys, data, tmp_path):
    fails(capsys, data, tmp_path / "out", ["--config", tmp_path / "none.yaml", *base(data)],
          "none.yaml", "cannot read config")


@pytest.mark.parametrize("flag", ["--visual-encoder", "--text-encoder"])
@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "not_a_folder"])
def test_unknown_encoder(capsys, data, tmp_path, flag, name):
    msg = fails(capsys, data, tmp_path / "out", [*base(data), flag, name])
    assert msg.startswith(f"{flag}: encoder '{name}' is neither a built-in encoder nor a "
                          "readable local model folder")
    assert msg.endswith("hub models need network access: download the model elsewhere and "
                        "pass its folder")


def test_encoder_folder_that_holds_no_model(capsys, data, tmp_path):
    fails(capsys, data, tmp_path / "out", [*base(data), "--text-encoder", data / "img"],
          "--text-encoder", str(data / "img"), "network access")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Tiny CLIP and BERT folders, plus broken copies: no weights, no tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tiny_clip(root / "clip")
    tiny_bert(root / "bert")
    for name, source, files in (("noweights", "clip", ["config.json"]),
                                ("notokenizer", "bert", ["config.json", "model.safetensors"])):
        (root / name).mkdir()
        for f in files:
            shutil.copy(root / source / f, root / name / f)
    return root


@pytest.mark.parametrize(("flag", "folder", "message"), [
    ("--visual-encoder", "noweights", "encoder folder '{}' holds no model weights (looked for "
                                      "model.safetensors, "),
    ("--text-encoder", "notokenizer", "encoder folder '{}' holds no tokenizer (looked for "
                                      "tokenizer.json, "),
    ("--text-encoder", "clip", "encoder '{}' is not a text model (CLIPVisionConfig)"),
    ("--visual-encoder", "bert", "encoder '{}' is a text model (BertConfig), not a vision model"),
])
def test_encoder_folder_that_cannot_serve(capsys, data, tmp_path, models, flag, folder, message):
    """Caught before anything is written, not as a traceback from a worker."""
    msg = fails(capsys, data, tmp_path / "out", [*base(data), flag, models / folder])
    assert msg.startswith(f"{flag}: " + message.format(models / folder)), msg


def test_blacklist_file_that_does_not_exist(capsys, data, tmp_path):
    fails(capsys, data, tmp_path / "out", [*base(data), "--blacklist", tmp_path / "bl.txt"],
          "--blacklist", "bl.txt")


@pytest.mark.processes
def test_error_through_launch_py(data, tmp_path):
    """The real command: one line on stderr, status 2, nothing written."""
    recs = records(6)
    recs[2]["id"] = recs[0]["id"]
    write_annotations(data / "annotations.json", recs)
    before = snapshot(data)
    proc = launch("--annotations", data / "annotations.json", "--image-dir", data,
                  "--output-dir", tmp_path / "out", timeout=600)
    assert proc.returncode == 2
    assert proc.stderr == (f"hnm: error: {data / 'annotations.json'}: duplicate id 'r0' in "
                           "records 0 and 2\n")
    assert not (tmp_path / "out").exists()
    assert snapshot(data) == before


# ---------------------------------------------------------------- formats and field mapping


def _load(annotations: Path, root: Path, **kw) -> object:
    return load_corpus(Config(annotations=str(annotations), image_dir=str(root), **kw))


def test_formats_load_the_same_samples(tmp_path):
    recs = records(5)
    write_images(tmp_path, recs)
    as_list = _load(write_annotations(tmp_path / "list.json", recs), tmp_path)
    as_jsonl = _load(write_annotations(tmp_path / "lines.jsonl", recs, "jsonl"), tmp_path)
    keyed = {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in recs}
    as_dict = _load(write_annotations(tmp_path / "dict.json", keyed), tmp_path)
    for ds in (as_list, as_jsonl, as_dict):
        assert ds.ids == [f"r{i}" for i in range(5)]
        assert ds.images == [tmp_path / f"img/{i}.png" for i in range(5)]
        assert ds.phrases == [answer(i).lower() for i in range(5)]
        assert ds.groups.tolist() == [0, 0, 1, 1, 2]
    assert as_list.records == as_jsonl.records == recs
    assert as_dict.records == list(keyed.values())  # the records, unchanged: no id added


def test_jsonl_without_the_suffix_and_blank_lines(tmp_path):
    recs = records(3)
    write_images(tmp_path, recs)
    path = tmp_path / "annotations.txt"
    path.write_text("\n".join(json.dumps(r) for r in recs).replace("\n", "\n\n") + "\n")
    assert _load(path, tmp_path).records == recs
    # one line: a single record, not a dict of records keyed by id
    path = tmp_path / "one.ndjson"
    path.write_text(json.dumps(recs[0]) + "\n")
    assert _load(path, tmp_path).records == recs[:1]


def test_absolute_image_paths(tmp_path):
    recs = records(3)
    write_images(tmp_path / "elsewhere", recs)
    recs[1]["image"] = str(tmp_path / "elsewhere" / recs[1]["image"])
    (tmp_path / "dir").mkdir()
    ds = _load(write_annotations(tmp_path / "a.json", recs), tmp_path / "dir",
               on_missing_image="skip")
    assert ds.images == [tmp_path / "elsewhere/img/1.png"]
    assert ds.skipped == {"missing_image": [0, 2]}


def test_missing_id_is_the_position_and_missing_group_is_its_own(tmp_path):
    recs = [{"image": f"img/{i}.png", "text": answer(i)} for i in range(4)]
    recs[2]["group"] = "same"
    recs[3]["group"] = "same"
    write_images(tmp_path, recs)
    ds = _load(write_annotations(tmp_path / "a.json", recs), tmp_path)
    assert ds.ids == [0, 1, 2, 3]
    assert ds.groups.tolist() == [0, 1, 2, 2]
    # a dict keyed by id: the keys are the ids
    keyed = {f"k{i}": r for i, r in enumerate(recs)}
    assert _load(write_annotations(tmp_path / "d.json", keyed), tmp_path).ids == [
        "k0", "k1", "k2", "k3"]


def test_avdn_style_field_mapping(tmp_path):
    recs = [{"id": i, "image": f"img/{i}.png", "answer": f"  Fly   NORTH to {answer(i)} ",
             "first_instruction": f"goal {i // 3}", "map_name": "map_001", "turn": i}
            for i in range(6)]
    write_images(tmp_path, recs)
    path = write_annotations(tmp_path / "a.json", recs)
    ds = _load(path, tmp_path, fields=Fields(text="answer", group="first_instruction"))
    assert ds.phrases[0] == f"fly north to {answer(0).lower()}"  # normalized
    assert ds.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.ids == list(range(6))


@pytest.mark.parametrize("fmt", ["jsonl", "dict"])
def test_every_format_mines_the_same_negatives(capsys, tmp_path, models, fmt):
    """A JSON list, JSONL and a dict keyed by id (no id field) give the same negatives and
    the same rows."""
    root = tmp_path / "in"
    recs = records(8)
    write_images(root, recs)
    runs = {}
    keyed = {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in recs}
    for name, data, kind in (("list", recs, "json"), (fmt, keyed if fmt == "dict" else recs,
                                                      "jsonl" if fmt == "jsonl" else "json")):
        path = write_annotations(root / f"{name}.{kind}", data, kind)
        rc, _, err = cli(capsys, *FAST, "--annotations", path, "--image-dir", root,
                         "--output-dir", tmp_path / name, "--text-encoder", models / "bert",
                         "--blacklist", "", "--diverse-ratio", "0.5")
        assert rc == 0, err
        runs[name] = read_jsonl(tmp_path / name / "negatives.jsonl")
    assert sum(bool(r["negatives"]) for r in runs["list"]) > 0
    assert [r["negatives"] for r in runs[fmt]] == [r["negatives"] for r in runs["list"]]
    # keyed by id, a record's row carries its key as its id, first: the same rows
    assert [{k: v for k, v in r.items() if k not in ("negatives", "outcome")}
            for r in runs[fmt]] == recs
    assert all(next(iter(r)) == "id" for r in runs[fmt])


def test_extra_fields_pass_through_in_input_order(capsys, tmp_path):
    root = tmp_path / "in"
    recs = records(8, text="answer")
    recs[3]["nested"] = {"deep": [1, 2.5, None, "ünïcode"], "flag": False}
    recs.reverse()  # input order is not id order
    write_images(root, recs)
    path = write_annotations(root / "a.jsonl", recs, "jsonl")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *FAST, "--annotations", path, "--image-dir", root,
                     "--output-dir", out, "--text-field", "answer", "--blacklist", "")
    assert rc == 0, err
    rows = read_jsonl(out / "negatives.jsonl")
    assert [{k: v for k, v in r.items() if k not in ("negatives", "outcome")} for r in rows] == recs
    assert all(list(r)[:-2] == list(rec) for r, rec in zip(rows, recs))  # key order kept
    assert all(list(r)[-2:] == ["negatives", "outcome"] for r in rows)
    assert sum(bool(r["negatives"]) for r in rows) > 0
    for r in rows:
        for n in r["negatives"]:  # a negative's text and image are its record's own
            source = next(x for x in recs if x["id"] == n["id"])
            assert (n["text"], n["image"]) == (source["answer"], source["image"])
            assert source["group"] != r["group"]


def test_input_file_and_images_are_never_modified_by_a_run(capsys, data, tmp_path):
    before = snapshot(data)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *FAST, *base(data), "--output-dir", out)
    assert rc == 0, err
    assert snapshot(data) == before
    assert (out / "negatives.jsonl").exists()
