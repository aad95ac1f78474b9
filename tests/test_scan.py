"""The input read and checked a block at a time: every format's blocks are its records in
order, a scan's blocks and facts are `load_corpus`'s Corpus, every fault is found with its
one-line message wherever the blocks cut the input, and memory is a block's, not N's."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from pathlib import Path
from typing import Any

import avdn_data
import numpy as np
import pytest
from builders import records, traced_peak, write_images

from hnm import demo
from hnm.api import make
from hnm.checks import IdSet
from hnm.config import Config, Fields
from hnm.data import MAX_DEPTH, load_corpus, scan
from hnm.errors import HnmError
from hnm.readers import Input, read_blocks, read_input
from hnm.readers import base as reader_base
from hnm.readers.base import decode

DEMO = Fields(text="answer", group="first_instruction")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Config]:
    """The same 20 demo records in every format (several files each where the format has
    shards), and an AVDN processed dataset: the config reading each."""
    root = tmp_path_factory.mktemp("inputs")
    configs = {fmt: Config(annotations=str(demo.make_demo(root, num_dialogs=4, fmt=fmt,
                                                          per_shard=7)),
                           image_dir=str(root), fields=DEMO) for fmt in demo.FORMATS}
    recs = json.loads(Path(configs["json"].annotations).read_text())
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n",
                            quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
        writer.writerows([list(recs[0])] + [[str(v) for v in r.values()] for r in recs])
        path = root / f"annotations.{fmt}"
        path.write_text(buffer.getvalue(), encoding="utf-8")
        configs[fmt] = Config(annotations=str(path), image_dir=str(root), fields=DEMO)
    data = avdn_data.write(root / "processed", chunks=3, per_chunk=5)
    configs["avdn"] = make(None, {"annotations": str(data)})
    keyed = root / "keyed.json"  # a dict of records keyed by id
    keyed.write_text(json.dumps({f"k{i}": {k: v for k, v in r.items() if k != "id"}
                                 for i, r in enumerate(recs)}))
    configs["keyed"] = Config(annotations=str(keyed), image_dir=str(root), fields=DEMO)
    return configs


FORMATS = ["json", "jsonl", "csv", "tsv", "parquet", "webdataset", "hf", "avdn", "keyed"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_blocks_of_every_format_are_the_input_in_order(inputs, fmt, size):
    config = inputs[fmt]
    whole = read_input(config)
    source = Input(config)
    blocks = list(source.blocks(size))
    assert [b.start for b in blocks] == list(range(0, len(whole.records), size))
    assert all(len(b) == size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= size
    assert [r for b in blocks for r in b.records] == whole.records
    for name in ("refs", "keys"):
        got = [x for b in blocks for x in (getattr(b, name) or [None] * len(b))]
        assert got == (getattr(whole, name) or [None] * len(whole.records)), name
    assert (tuple(source.ends), source.digest, source.found, source.surrogates) == \
        (whole.ends, whole.digest, whole.found, whole.surrogates)
    assert (source.sample is None) == (whole.sample is None)
    if whole.sample is not None:
        assert np.array_equal(source.sample, whole.sample)
    # every record where `Source.locate` puts it
    for b in blocks:
        assert [source.locate(b.start + k) for k in range(len(b))] == \
            [whole.locate(b.start + k) for k in range(len(b))]
    assert [r for b in read_blocks(config, size=size) for r in b.records] == whole.records


def test_records_read_in_blocks_are_the_files_records(inputs):
    """Against the files themselves: JSON's records, JSONL's lines, the CSV's rows."""
    recs = json.loads(Path(inputs["json"].annotations).read_text())
    path = Path(inputs["jsonl"].annotations)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    for fmt, expected in (("json", recs), ("jsonl", lines)):
        assert [r for b in read_blocks(inputs[fmt], size=2) for r in b.records] == expected
    rows = list(csv.DictReader(io.StringIO(Path(inputs["csv"].annotations).read_text())))
    assert [r for b in read_blocks(inputs["csv"], size=4) for r in b.records] == rows


def test_text_read_in_small_pieces_is_the_same(tmp_path, monkeypatch):
    """Pieces of a few bytes (lines longer than a piece, a BOM, CRLF, quoted newlines):
    the same records, and a byte that is not UTF-8 named at the same offset."""
    recs = [{"id": f"r{i}", "image": f"{i}.png", "text": f"caption é {i}\u2028x"}
            for i in range(9)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n"
                                                for r in recs).encode())
    table = tmp_path / "a.csv"
    table.write_bytes(b"\xef\xbb\xbfid,image,text\r\n" + "".join(
        f'r{i},{i}.png,"two\nlines {i}"\r\n' for i in range(9)).encode())
    expected = {jsonl: read_input(Config(annotations=str(jsonl))).records,
                table: read_input(Config(annotations=str(table))).records}
    assert expected[jsonl] == recs and expected[table][8]["text"] == "two\nlines 8"
    monkeypatch.setattr(reader_base, "PIECE_BYTES", 7)
    for path, got in expected.items():
        assert [r for b in read_blocks(Config(annotations=str(path)), size=2)
                for r in b.records] == got
        raw = path.read_bytes()
        bad = raw[:len(raw) - 30] + b"\xff" + raw[len(raw) - 30:]
        path.write_bytes(bad)
        kind = "JSON" if path == jsonl else "CSV"
        with pytest.raises(HnmError) as whole:
            decode(path, bad, kind)
        with pytest.raises(HnmError) as pieces:
            load_corpus(Config(annotations=str(path)))
        assert str(pieces.value) == str(whole.value)
        assert f"(byte {len(raw) - 33})" in str(whole.value)


@pytest.mark.parametrize("name", ["a.ndjson", "a.txt"])
def test_a_file_not_named_json_is_told_apart_as_before(tmp_path, name):
    """Not named .json or .jsonl: one object of records is a dict keyed by id, one line of
    a record a record, several lines JSONL."""
    path = tmp_path / name
    cases = [({"a": {"text": "x"}, "b": {"text": "y"}}, [{"text": "x"}, {"text": "y"}]),
             ({"text": "x", "n": 1}, [{"text": "x", "n": 1}])]
    for value, expected in cases:
        path.write_text("\n" + json.dumps(value) + "\n\n")
        assert read_input(Config(annotations=str(path))).records == expected
    path.write_text('{"text": "x"}\n  \n{"text": "y"}\n')
    assert [r for b in read_blocks(Config(annotations=str(path)), size=1)
            for r in b.records] == [{"text": "x"}, {"text": "y"}]


# ---------------------------------------------------------------- scan vs load_corpus


def _same_corpus(config: Config, size: int, skip: list[int] | None = None) -> None:
    ds = load_corpus(config, skip)
    reading = scan(config, skip, size=size)
    blocks = list(reading.blocks())
    facts = reading.facts
    assert [len(b) for b in blocks[:-1]] == [size] * (len(blocks) - 1)
    assert [r for b in blocks for r in b.records] == ds.records
    assert tuple(i for b in blocks for i in b.ids) == ds.record_ids
    mined = [b.start + k for b in blocks for k in np.flatnonzero(b.keep)]
    assert mined == ds.positions.tolist()
    assert [b.ids[k] for b in blocks for k in np.flatnonzero(b.keep)] == ds.ids
    assert [b.images[k] for b in blocks for k in np.flatnonzero(b.keep)] == ds.images
    assert [p for b in blocks for p in b.new_phrases] == ds.phrases
    assert np.concatenate([b.text_ids for b in blocks]).tolist() == ds.text_ids.tolist()
    assert np.concatenate([b.groups for b in blocks]).tolist() == ds.groups.tolist()
    assert (facts.num_records, facts.num_rows, facts.num_phrases, facts.num_anchors,
            facts.skipped, facts.source_sha256, facts.input_format, facts.shard_ends,
            facts.image_files) == \
        (len(ds.records), len(ds), len(ds.phrases), ds.num_anchors, ds.skipped,
         ds.source_sha256, ds.input_format, ds.shard_ends, ds.image_files)
    assert facts.adds_id == any(config.fields.id not in r for r in ds.records)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_scan_is_load_corpus_in_blocks(inputs, fmt):
    config = inputs[fmt]
    ds = load_corpus(config)
    assert len(ds.phrases) > 1 and len(set(ds.groups.tolist())) > 1
    for size in (1, 3, 8):
        _same_corpus(config, size)
    _same_corpus(config, 4, skip=[1, 5, 6, 11])


def _brute_force(recs: list[dict[str, Any]], kept: list[int]) -> tuple[list, list, list]:
    """Phrases by first occurrence over the mined rows, their ids, and group codes by
    first occurrence (a row without a group its own group), computed directly."""
    phrases: list[str] = []
    codes: list[Any] = []
    text_ids, groups = [], []
    for pos in kept:
        phrase = " ".join(recs[pos]["text"].lower().split())
        if phrase not in phrases:
            phrases.append(phrase)
        text_ids.append(phrases.index(phrase))
        value = recs[pos].get("group")
        key = ("row", pos) if value is None else json.dumps(value, sort_keys=True)
        if key not in codes:
            codes.append(key)
        groups.append(codes.index(key))
    return phrases, text_ids, groups


def test_skipped_images_phrases_and_groups_across_blocks(tmp_path):
    """Missing images skipped, phrases repeated and groups met again in later blocks, rows
    without a group, --max-samples: the same as computed directly."""
    recs = records(23)
    for i, r in enumerate(recs):
        r["text"] = ["Fly  North", "fly north", "land", f"hover {i % 4}"][i % 4]
        if i % 3 == 0:
            del r["group"]
        elif i % 5 == 0:
            r["group"] = {"b": [1, 2], "a": "g0"}
    write_images(tmp_path, recs)
    for i in (2, 9, 10, 22):
        (tmp_path / recs[i]["image"]).unlink()
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    config = Config(annotations=str(ann), image_dir=str(tmp_path), on_missing_image="skip",
                    max_samples=15)
    for size in (1, 4, 7, 100):
        _same_corpus(config, size)
    ds = load_corpus(config)
    kept = [i for i in range(23) if i not in (2, 9, 10, 22)]
    phrases, text_ids, groups = _brute_force(recs, kept)
    assert (ds.phrases, ds.text_ids.tolist(), ds.groups.tolist()) == (phrases, text_ids, groups)
    assert ds.positions.tolist() == kept and ds.skipped == {"missing_image": [2, 9, 10, 22]}
    assert ds.num_anchors == 15
    with pytest.raises(HnmError) as exc:
        list(scan(Config(annotations=str(ann), image_dir=str(tmp_path)), size=3).blocks())
    assert str(exc.value).startswith(f"{ann}: 4 image file(s) missing or unreadable: "
                                     f"{tmp_path / recs[2]['image']} (missing), ")
    assert str(exc.value).endswith(" and 1 more (--on-missing-image skip drops them)")


# ---------------------------------------------------------------- faults in later blocks

SIZE = 3  # records a block: the fault sits in block k, its partner (if any) in block 0


def _faulty(fault: str, pos: int) -> tuple[list[dict[str, Any]], str, Fields]:
    """Records with one fault at `pos` and the message expected (`{path}` for the file)."""
    recs = [{"id": f"r{i}", "image": f"img/{i}.png", "text": f"caption {i}"}
            for i in range(4 * SIZE)]
    fields = Fields()
    if fault == "duplicate id":
        recs[pos]["id"] = "r1"
        return recs, f"{{path}}: duplicate id 'r1' in records 1 and {pos}", fields
    if fault == "id as text":
        recs[1]["id"], recs[pos]["id"] = 7, "7"
        return recs, (f"{{path}}: ids 7 and '7', one id once written as text, in records 1 "
                      f"and {pos}"), fields
    if fault == "NFC":
        recs[1]["id"] = unicodedata.normalize("NFC", "café")
        recs[pos]["id"] = unicodedata.normalize("NFD", "café") + " "
        return recs, (f"{{path}}: ids 'caf\\xe9' and 'cafe\\u0301 ', which differ only in "
                      "Unicode normalisation or surrounding blank space, in records 1 and "
                      f"{pos}"), fields
    if fault == "missing text":
        del recs[pos]["text"]
        return recs, f"{{path}}: record {pos} (id 'r{pos}') has no text field 'text'", fields
    if fault == "mapping":
        fields = Fields(text="caption")
        return recs, ("--text-field caption: no record of {path} has a field 'caption' "
                      "(fields: id, image, text)"), fields
    if fault == "URL":
        recs[pos]["image"] = "https://example.com/a.png"
        return recs, (f"{{path}}: record {pos} (id 'r{pos}'): image "
                      "'https://example.com/a.png' is a URL; hnm reads local files: download "
                      "the images first (e.g. with img2dataset)"), fields
    if fault == "surrogate":
        recs[pos]["note"] = "\ud800"
        return recs, (f"{{path}}: record {pos} (id 'r{pos}'): field 'note' holds a lone "
                      "surrogate ('\\ud800'), which is not valid Unicode"), fields
    if fault == "nesting":
        deep: Any = 1
        for _ in range(MAX_DEPTH + 1):
            deep = [deep]
        recs[pos]["extra"] = deep
        return recs, (f"{{path}}: record {pos} (id 'r{pos}'): field 'extra' is nested more "
                      f"than {MAX_DEPTH} levels deep"), fields
    raise AssertionError(fault)


FAULTS = ["duplicate id", "id as text", "NFC", "missing text", "mapping", "URL", "surrogate",
          "nesting"]


@pytest.mark.parametrize("block", [0, 1, 3])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_in_a_later_block_is_found_with_its_message(tmp_path, fault, block):
    pos = block * SIZE + 2
    recs, message, fields = _faulty(fault, pos)
    write_images(tmp_path, recs)
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    config = Config(annotations=str(ann), image_dir=str(tmp_path), fields=fields)
    expected = message.format(path=ann)
    with pytest.raises(HnmError) as whole:
        load_corpus(config)
    assert str(whole.value) == expected
    reading = scan(config, size=SIZE)
    given = []
    with pytest.raises(HnmError) as blocks:
        for b in reading.blocks():
            given.append(b.start)
    assert str(blocks.value) == expected and reading.facts is None
    if fault != "mapping":  # the blocks before the fault were handed on
        assert given == list(range(0, block * SIZE, SIZE))


def test_a_field_missing_in_early_blocks_only_waits_for_the_mapping(tmp_path):
    """--id-field named: the records of the first blocks lack it (ids are then
    positions), a later one holds it; and a record without the text field before any record
    with it is that record's error, not the mapping's."""
    recs = [{"image": f"img/{i}.png", "text": f"caption {i}"} for i in range(10)]
    recs[8]["key"] = "k8"
    del recs[1]["text"]
    write_images(tmp_path, recs)
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    config = Config(annotations=str(ann), image_dir=str(tmp_path), fields=Fields(id="key"))
    expected = f"{ann}: record 1 (id 1) has no text field 'text'"
    for size in (2, 3, 100):
        with pytest.raises(HnmError) as exc:
            list(scan(config, size=size).blocks())
        assert str(exc.value) == expected


def test_ids_of_one_hash_are_told_apart_exactly(tmp_path, monkeypatch):
    """Every id given the same hash: distinct ids still pass (the earlier ones read again to
    compare), and a duplicate is still found, naming both records."""
    recs = [{"id": f"r{i}", "image": f"img/{i}.png", "text": f"caption {i}"}
            for i in range(8)]
    write_images(tmp_path, recs)
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    config = Config(annotations=str(ann), image_dir=str(tmp_path))
    reference = load_corpus(config)
    monkeypatch.setattr(IdSet, "hashes", staticmethod(
        lambda texts: np.zeros(len(texts), np.int64)))
    _same_corpus(config, 3)
    assert load_corpus(config).ids == reference.ids
    recs[6]["id"] = "r1 "
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(HnmError) as exc:
        list(scan(config, size=2).blocks())
    assert str(exc.value) == (f"{ann}: ids 'r1' and 'r1 ', which differ only in Unicode "
                              "normalisation or surrounding blank space, in records 1 and 6")


def test_the_id_set_finds_every_earlier_equal_hash():
    """Against brute force: random hashes added block by block (runs merged as they go):
    the block's own earlier equals, and whether an earlier block had each hash."""
    rng = np.random.default_rng(0)
    ids = IdSet()
    seen: list[int] = []
    for _ in range(40):
        block = rng.integers(0, 300, int(rng.integers(0, 30)))
        within, earlier = ids.repeats(block)
        expected = {}
        for i, h in enumerate(block.tolist()):
            same = [j for j, x in enumerate(block[:i].tolist()) if x == h]
            if same:
                expected[i] = same
        assert within == expected
        assert earlier.tolist() == [h in seen for h in block.tolist()]
        ids.add(block)
        seen += block.tolist()
    assert len(ids.runs) < 10 and ids.nbytes == 8 * len(seen)


# ---------------------------------------------------------------- memory



def _scan_peaks(folder: Path, n: int) -> tuple[int, int]:
    """The peak of a scan of n records (blocks of 2,048 let go as they are handed on) and
    of load_corpus's."""
    folder.mkdir()
    ann = folder / "big.jsonl"
    with open(ann, "w") as handle:
        for i in range(n):
            handle.write(f'{{"id": "r{i}", "image": "{i}.jpg", "text": "caption {i % 5000}"}}\n')
    config = Config(annotations=str(ann), image_embeddings=str(folder / "x.npy"))
    reading = scan(config, size=2048)

    def stream() -> None:
        for block in reading.blocks():  # as a writer would: each block let go once written
            assert len(block) == 2048 or block.start == n - n % 2048
            del block

    streamed = traced_peak(stream)
    assert reading.facts.num_rows == n and reading.facts.num_phrases == 5000
    return streamed, traced_peak(lambda: load_corpus(config))


def test_a_scan_holds_a_block_not_the_input(tmp_path):
    """From 20,000 records to 60,000, a scan's peak grows by a small part of what
    load_corpus's grows by (a few numbers per record, no record: measured a tenth to a
    third, with the collector's timing; held records would grow it as much)."""
    small, large = _scan_peaks(tmp_path / "small", 20_000), _scan_peaks(tmp_path / "large", 60_000)
    streamed, whole = large[0] - small[0], large[1] - small[1]
    assert streamed < whole / 2, (small, large)


def test_anchor_uniforms_are_the_specs_hash_of_seed_and_id():
    """u_a: the first 8 bytes of BLAKE2b("{seed}\\0{json.dumps(id)}"), big-endian, / 2^64,
    for ids of every JSON type (the str and int fast paths give json.dumps' text)."""
    import hashlib

    from hnm.data import anchor_uniforms

    rng = np.random.default_rng(9)
    ids: list[Any] = ["", "r0", "é\u2028\"\\\n", "\U0001F600x", True, False, None, 0, -7,
                      2**64 + 3, -(2**70), 1.5, -0.0, 1e300, [1, "a"], {"k": [None]}]
    ids += ["".join(chr(int(c)) for c in rng.integers(1, 0x3000, rng.integers(0, 12)))
            for _ in range(300)]
    ids += [int(v) for v in rng.integers(-2**62, 2**62, 300)]
    for seed in (0, 42, -3):
        want = [int.from_bytes(hashlib.blake2b(f"{seed}\0{json.dumps(i)}".encode(),
                                               digest_size=8).digest(), "big") / 2.0**64
                for i in ids]
        got = anchor_uniforms(ids, seed)
        assert got.dtype == np.float64 and got.tolist() == want
    assert anchor_uniforms([], 1).shape == (0,)
