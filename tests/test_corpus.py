"""The columnar corpus: what planning writes into the run directory, read back by every
phase after it exactly as `data.load_corpus` gives it, in bounded memory."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import avdn_data
import numpy as np
import pytest
from builders import cli, records
from reference import duplicate_images as duplicates_in_memory
from synthetic import make_dataset, mine_args

from hnm import demo, outputs, plan_scan
from hnm.config import Config, Fields
from hnm.corpus import BATCH_ROWS, ColumnarCorpus, open_corpus, problem
from hnm.corpus_images import duplicate_images
from hnm.corpus_write import blocks_of, facts_of, store_corpus, write_corpus
from hnm.data import Corpus, anchor_uniforms, load_corpus
from hnm.embed import phrase_order
from hnm.errors import HnmError
from hnm.miner import text_lengths
from hnm.outcome import RULES, Outcomes
from hnm.readers import ImageRef
from hnm.select import Pick
from hnm.storage import RunDir

DEMO = Fields(text="answer", group="first_instruction")


def new_run(root: Path) -> RunDir:
    run = RunDir(root)
    run.ensure_root()
    run.sign([])
    return run


def same_corpus(store: ColumnarCorpus, ds: Corpus, seed: int) -> None:
    """The store holds exactly what the in-memory corpus holds."""
    assert list(store.records) == ds.records
    assert list(store.record_ids) == list(ds.record_ids)
    assert [(type(i), i) for i in store.ids] == [(type(i), i) for i in ds.ids]
    assert list(store.images) == ds.images
    got = [(im.shard, im.at, im.size, im.member, im.digest) if isinstance(im, ImageRef)
           else im for im in store.images]
    assert got == [(im.shard, im.at, im.size, im.member, im.digest)
                   if isinstance(im, ImageRef) else im for im in ds.images]
    assert list(store.phrases) == ds.phrases
    # the phrases' lengths counted by the column (no string built) and by len, and so the
    # order they are embedded in
    assert text_lengths(store.phrases).tolist() == [len(p) for p in ds.phrases]
    assert np.array_equal(phrase_order(store.phrases), phrase_order(ds.phrases))
    for name in ("positions", "text_ids", "groups"):
        assert np.array_equal(getattr(store, name), getattr(ds, name))
    assert np.array_equal(store.uniforms, anchor_uniforms(ds.ids, seed))
    assert (len(store), store.num_anchors, store.skipped, store.source_sha256,
            store.input_format, store.shard_ends, store.image_files) == \
        (len(ds), ds.num_anchors, ds.skipped, ds.source_sha256, ds.input_format,
         ds.shard_ends, ds.image_files)
    # by index, slices and from the end, as a list gives them
    n = len(ds)
    assert store.ids[n - 1] == ds.ids[-1] == store.ids[-1]
    assert store.images[1:n:2] == ds.images[1:n:2]
    assert store.records[::-3] == ds.records[::-3]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    paths = {fmt: demo.make_demo(root / fmt, num_dialogs=12, fmt=fmt, per_shard=25)
             for fmt in demo.FORMATS}
    recs = json.loads(paths["json"].read_text())
    lines = [",".join(recs[0])] + [",".join(json.dumps(v) if not isinstance(v, str)
                                            else f'"{v}"' for v in r.values()) for r in recs]
    paths["csv"] = root / "json" / "annotations.csv"
    paths["csv"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["avdn"] = avdn_data.write(root / "avdn")
    return paths


@pytest.mark.parametrize("fmt", [*demo.FORMATS, "csv", "avdn"])
def test_the_store_gives_what_load_corpus_gives(inputs, tmp_path, fmt):
    given = inputs[fmt]
    fields = Fields(image="current_view_image", text="answer",
                    group="first_instruction") if fmt == "avdn" else DEMO
    config = Config(annotations=str(given), fields=fields, seed=11,
                    image_dir=str(given.parent), output_dir=str(tmp_path / "run"),
                    max_samples=40, tensor_normalization="avdn")
    ds = load_corpus(config)
    store_corpus(new_run(tmp_path / "run"), config, ds)
    same_corpus(open_corpus(RunDir(tmp_path / "run")), ds, config.seed)


def test_skipped_records_numbers_and_small_batches(tmp_path):
    """Records left out of mining keep their place; ids 7 and "8" keep their types; the
    store's batches hold BATCH_ROWS rows whatever the blocks handed on."""
    recs = records(9)
    for i, r in enumerate(recs):
        r["id"] = i if i % 2 else str(i)
    for i in range(9):
        if i not in (2, 5):
            demo_image = tmp_path / "img" / f"{i}.png"
            demo_image.parent.mkdir(exist_ok=True)
            from builders import write_image
            write_image(demo_image, i)
    (tmp_path / "a.json").write_text(json.dumps(recs))
    config = Config(annotations=str(tmp_path / "a.json"), image_dir=str(tmp_path),
                    on_missing_image="skip", output_dir=str(tmp_path / "run"))
    ds = load_corpus(config)
    assert ds.skipped == {"missing_image": [2, 5]}
    run = new_run(tmp_path / "run")
    write_corpus(run, config, blocks_of(ds, size=2), lambda: facts_of(ds, "id"))
    store = open_corpus(run)
    same_corpus(store, ds, config.seed)
    assert np.array_equal(store.row_of_positions(np.arange(9)),
                          [0, 1, -1, 2, 3, -1, 4, 5, 6])
    assert store.row_of_ids(["8", "0", 7]).tolist() == [6, 0, 5]
    with pytest.raises(KeyError):
        store.row_of_ids(["7"])  # 7 is a number


# values of one field, in blocks of two records: what Parquet would write for them
MIXED = {
    "widened": [1, 2, 2.5, None],
    "fields_gathered": [{"a": 1}, {"a": 2}, {"b": "x"}, None],
    "empty_then_full": [{}, {}, {"a": 1}, {"a": 2}],
    "only_empty": [{}, {}, {}, None],
    "number_and_text": [1, 2, "x", "y"],
    "true_and_real": [True, None, 1.5, 2.5],
    "lists_widened": [[1], [], [2.5], None],
    "missing_in_a_block": [None, None, "a", "b"],
    "never_set": [None, None, None, None],
    "huge": [1, 2, 2**64, 3],
}


def test_output_types_block_by_block_are_those_of_every_value(tmp_path):
    recs = [{"id": f"r{i}", "image": f"{i}.png", "text": f"text {i}"} for i in range(4)]
    for name, values in MIXED.items():
        for r, v in zip(recs, values):
            if not (name == "missing_in_a_block" and v is None):
                r[name] = v
    ds = Corpus(records=recs, positions=np.arange(4), ids=[r["id"] for r in recs],
                images=[Path(r["image"]) for r in recs], phrases=[r["text"] for r in recs],
                text_ids=np.arange(4), groups=np.arange(4), num_anchors=4, skipped={},
                source_sha256="0" * 64, record_ids=tuple(r["id"] for r in recs))
    config = Config(output_dir=str(tmp_path / "run"))
    run = new_run(tmp_path / "run")
    write_corpus(run, config, blocks_of(ds, size=2), lambda: facts_of(ds, "id"))
    got, _ = outputs.parquet_schema(open_corpus(run))
    expected, _ = outputs.parquet_schema(Corpus(**{**ds.__dict__}))  # one block: every value
    assert got == expected and got.metadata == expected.metadata
    for name in MIXED:  # the reference: pyarrow over every value at once
        kind = outputs._arrow_type([r.get(name) for r in recs])
        assert got.field(name).type == (kind or got.field(name).type)
        assert (name in json.loads(got.metadata[b"hnm.json_columns"])) == (kind is None)


def test_a_damaged_store_is_written_again_on_resume_and_refused_when_read(tmp_path, capsys):
    paths = make_dataset(tmp_path / "data", 60, seed=1, dims=(8, 8))
    out = tmp_path / "run"
    assert cli(capsys, *mine_args(paths, out))[0] == 0
    run = RunDir(out)
    before = {p.name: p.read_bytes() for p in run.corpus_dir.iterdir()}
    records_file = run.corpus_dir / "records.arrow"
    with open(records_file, "r+b") as handle:
        handle.truncate(100)
    assert problem(run) == f"{records_file}: damaged (size 100, written " \
        f"{len(before['records.arrow'])})"
    with pytest.raises(HnmError) as caught:
        open_corpus(run)
    assert str(caught.value) == f"{records_file}: damaged (size 100, written " \
        f"{len(before['records.arrow'])}); rerun the mining command (it writes it again)"
    args = [a for a in mine_args(paths, out) if a != "--quiet"]
    rc, text, err = cli(capsys, *args)
    assert rc == 0, err
    assert f"{records_file}: damaged (size 100, written {len(before['records.arrow'])}): " \
        "writing the run's corpus again" in text + err
    assert {p.name: p.read_bytes() for p in run.corpus_dir.iterdir()} == before
    (run.corpus_dir / "meta.json").write_text("{not json")
    with pytest.raises(HnmError) as caught:
        open_corpus(run)
    message = str(caught.value)
    assert message.startswith(f"{run.corpus_dir / 'meta.json'}: damaged (not valid JSON")
    assert "\n" not in message
    # `hnm report` writes a damaged store again from the unchanged input
    assert cli(capsys, "report", str(out))[0] == 0
    assert {p.name: p.read_bytes() for p in run.corpus_dir.iterdir()} == before


def big_corpus(n: int) -> Corpus:
    recs = [{"id": f"rec-{i}", "image": f"img/{i}.png", "text": f"a caption number {i}",
             "group": f"g{i // 3}", "extra": {"turn": i, "tags": ["a", "b", i]}}
            for i in range(n)]
    return Corpus(records=recs, positions=np.arange(n), ids=[r["id"] for r in recs],
                  images=[Path("/data") / r["image"] for r in recs],
                  phrases=[r["text"] for r in recs], text_ids=np.arange(n),
                  groups=np.arange(n) // 3, num_anchors=n, skipped={},
                  source_sha256="0" * 64, record_ids=tuple(r["id"] for r in recs))


def test_reading_a_shard_costs_the_shard_not_the_corpus(tmp_path):
    n, shard = 200_000, (120_000, 122_000)
    config = Config(output_dir=str(tmp_path / "run"))
    run = new_run(tmp_path / "run")
    ds = big_corpus(n)
    store_corpus(run, config, ds)
    expected_ids, expected_images = ds.ids[slice(*shard)], ds.images[slice(*shard)]
    del ds
    tracemalloc.start()
    try:
        store = open_corpus(run)
        rows = np.arange(*shard)
        ids, images = store.ids.take(rows), store.images[slice(*shard)]
        total = int(store.positions.sum() + store.text_ids.sum() + store.groups.sum())
        u = float(store.uniforms[rows].sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids == expected_ids and images == expected_images
    assert total == n * (n - 1) + int((np.arange(n) // 3).sum())
    assert 0 < u < len(rows)
    # a shard's ids and paths (~100 bytes each as Python objects, read a batch at a
    # time), plus a fixed part: far below the records (~1 kB each over the corpus)
    assert peak < 600 * (shard[1] - shard[0]) + (2 << 20), peak


def written_peak(tmp_path: Path, n: int, shards: int, per_shard: int) -> int:
    """Python's peak allocation while a RecordWriter writes `shards` shards of
    `per_shard` anchors (two picks each) over a corpus of n records."""
    config = Config(output_dir=str(tmp_path / f"run{n}"), num_negatives=2)
    run = new_run(tmp_path / f"run{n}")
    store_corpus(run, config, big_corpus(n))
    store = open_corpus(run)
    tracemalloc.start()
    try:
        with outputs.RecordWriter(config, run, store) as out:
            for s in range(shards):
                anchors = np.arange(s * per_shard, (s + 1) * per_shard)
                picks = [[Pick(int((a * 7 + 1) % n), "hard", 0.5, 0.25, 0),
                          Pick(int((a * 13 + 2) % n), "diverse", 0.1, 0.2, None, 1, 2)]
                         for a in anchors]
                why = Outcomes(np.full(per_shard, -1), np.zeros(per_shard, np.int64),
                               np.zeros((per_shard, len(RULES)), np.int64),
                               np.ones(per_shard, bool))
                out.shard(anchors, picks, why)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_the_writer_holds_a_shard_not_the_run(tmp_path):
    """The outputs are written as each shard's picks come: at a fixed shard size, four
    times the records and shards cost the writer no more memory."""
    small = written_peak(tmp_path, 6_000, 4, 1_500)
    large = written_peak(tmp_path, 24_000, 16, 1_500)
    assert large < 1.3 * small, (small, large)
    lines = (tmp_path / "run24000" / "negatives.jsonl").read_text().splitlines()
    assert len(lines) == 24_000
    first = json.loads(lines[0])
    assert first["negatives"][0]["id"] == "rec-1" and first["outcome"]["reason"] is None


def test_duplicate_images_in_bounded_memory_count_as_before(tmp_path):
    from builders import write_image

    for i in range(6):
        write_image(tmp_path / f"{i}.png", i % 3)  # 0-2 and 3-5 alike
    (tmp_path / "same.png").write_bytes((tmp_path / "0.png").read_bytes())
    paths = [tmp_path / f"{i}.png" for i in (0, 1, 2, 3, 0, 4)] + \
        [tmp_path / "same.png", tmp_path / "gone.png", tmp_path / "5.png"]
    ds = Corpus(records=[{} for _ in paths], positions=np.arange(len(paths)),
                ids=list(range(len(paths))), images=paths, phrases=["x"],
                text_ids=np.zeros(len(paths), np.int64), groups=np.arange(len(paths)),
                num_anchors=len(paths), skipped={}, source_sha256="0")
    assert duplicate_images(ds) == duplicates_in_memory(paths)
    assert duplicate_images(ds)["unreadable"] == 1


def test_store_batches_are_full_batches(tmp_path):
    ds = big_corpus(BATCH_ROWS + 10)
    run = new_run(tmp_path / "run")
    write_corpus(run, Config(output_dir=str(run.root)), blocks_of(ds, size=999),
                 lambda: facts_of(ds, "id"))
    store = open_corpus(run)
    reader = store._reader("records")
    assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == \
        [BATCH_ROWS, 10]
    assert store.records[BATCH_ROWS - 1: BATCH_ROWS + 1] == \
        ds.records[BATCH_ROWS - 1: BATCH_ROWS + 1]


@pytest.mark.parametrize("fmt", [*demo.FORMATS, "avdn"])
@pytest.mark.parametrize("block", [7, 16_384])
def test_the_store_staged_by_the_first_read_is_a_second_scans(inputs, tmp_path, monkeypatch,
                                                              fmt, block):
    """The first pass stages the store as it reads (in one block or several): moved into
    a run it is, file for file, the store a second scan writes; its scratch files are let
    go once moved in, or unused."""
    monkeypatch.setattr(plan_scan, "PLAN_BLOCK", block)
    given = inputs[fmt]
    fields = Fields(image="current_view_image", text="answer",
                    group="first_instruction") if fmt == "avdn" else DEMO
    config = Config(annotations=str(given), fields=fields, seed=5,
                    image_dir=str(given.parent), output_dir=str(tmp_path / "unused"),
                    tensor_normalization="avdn")
    summary = plan_scan.summarize(config, stage=True)
    assert len(summary.staged) == 1
    stores = {}
    for how, planned in (("staged", summary), ("again", None)):
        run = new_run(tmp_path / how)
        plan_scan.write_store(run, config, summary.planned_skip(),
                              plan_scan.same_input(config, summary.facts), planned)
        stores[how] = {p.relative_to(run.root / "corpus"): p.read_bytes()
                       for p in sorted((run.root / "corpus").rglob("*")) if p.is_file()}
        assert sorted(p.name for p in run.root.iterdir()) == [".hnm-run.json", "corpus"]
    assert not summary.staged
    assert stores["staged"] == stores["again"] and len(stores["staged"]) > 3
    assert plan_scan.summarize(config).staged == []  # nothing staged unless asked
    unused = plan_scan.summarize(config, stage=True)
    files = unused.staged[0].files.values()
    unused.let_go()
    assert not unused.staged and all(f.closed for f in files)


def test_a_staged_store_that_fails_its_check_is_not_moved_in(inputs, tmp_path):
    config = Config(annotations=str(inputs["jsonl"]), fields=DEMO, seed=5,
                    image_dir=str(inputs["jsonl"].parent), output_dir=str(tmp_path / "x"))
    summary = plan_scan.summarize(config, stage=True)
    files = summary.staged[0].files.values()
    run = new_run(tmp_path / "run")

    def refuse(facts):
        raise HnmError("changed")

    with pytest.raises(HnmError, match="changed"):
        plan_scan.write_store(run, config, [], refuse, summary)
    assert not (run.root / "corpus").exists() and not (run.root / "corpus.new").exists()
    assert all(f.closed for f in files)


@pytest.mark.parametrize("seed", range(6))
def test_char_lengths_count_characters_as_python(seed: int) -> None:
    """From an Arrow column's buffers (plain and large strings, sliced or not): each
    string's length in characters, as `len` counts them, for any mix of 1- to 4-byte
    characters and empty strings."""
    import random

    import pyarrow as pa

    from hnm.corpus import char_lengths

    rnd = random.Random(seed)
    alphabet = ["a", "é", "中", "😀", " ", "\u0301", "\n"]
    values = ["".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 12)))
              for _ in range(rnd.randrange(0, 40))]
    for kind in (pa.string(), pa.large_string()):
        column = pa.array(values, kind)
        for cut in (0, min(3, len(values))):
            assert char_lengths(column.slice(cut)).tolist() == [len(v) for v in values[cut:]]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("pass_rows", [1, 3, 1 << 20])
def test_duplicate_images_in_buckets_count_as_in_memory(tmp_path, monkeypatch, seed,
                                                         pass_rows):
    """Rows' images spread over buckets (one to a bucket, a few, all in one): the same
    counts as the in-memory reference, for files of equal bytes under other names, equal
    sizes with other bytes, missing files, a shard's images of unknown size and rows
    that repeat an image."""
    import random

    from hnm import corpus_images

    monkeypatch.setattr(corpus_images, "PASS_ROWS", pass_rows)
    rnd = random.Random(seed)
    contents = [bytes([k]) * rnd.choice([3, 4, 5]) for k in range(6)]
    files = []
    for i in range(rnd.randrange(1, 12)):
        path = tmp_path / f"{i}.bin"
        if rnd.random() < 0.85:
            path.write_bytes(rnd.choice(contents))
        files.append(path)
    import hashlib

    from hnm.readers.base import Shard

    shard = Shard(tmp_path / "s.parquet", "s.parquet", "parquet", "image")
    for k in range(rnd.randrange(0, 6)):  # a shard's images: sizes unknown until read
        data = rnd.choice(contents)
        files.append(ImageRef(shard, k, rnd.choice([-1, len(data)]), str(k),
                              hashlib.sha256(data).hexdigest()))
    (tmp_path / "folder").mkdir()
    files.append(tmp_path / "folder")  # a folder, not an image file: unreadable
    paths = [rnd.choice(files) for _ in range(rnd.randrange(1, 30))]
    ds = Corpus(records=[{} for _ in paths], positions=np.arange(len(paths)),
                ids=list(range(len(paths))), images=paths, phrases=["x"],
                text_ids=np.zeros(len(paths), np.int64), groups=np.arange(len(paths)),
                num_anchors=len(paths), skipped={}, source_sha256="0")
    want = duplicates_in_memory(paths)
    assert duplicate_images(ds) == want
    # the same rows from a run's store: files named relative to the run's working
    # folder (some by their absolute paths), counted from their stored names
    relative = [p.relative_to(tmp_path) if isinstance(p, Path) and rnd.random() < 0.5
                else p for p in paths]
    ds = dataclasses.replace(ds, images=relative, record_ids=tuple(ds.ids))
    run = new_run(tmp_path / "run")
    write_corpus(run, Config(output_dir=str(run.root)), blocks_of(ds, size=7),
                 lambda: facts_of(ds, "id"))
    assert duplicate_images(open_corpus(run, str(tmp_path))) == want


def test_gather_equals_arrow_take_on_generated_row_sets() -> None:
    """A column's values at ascending rows (runs, repeats, gaps near and far) are Arrow's
    take's, whichever way they are read."""
    import pyarrow as pa

    from hnm.corpus import _gather

    rng = np.random.default_rng(5)
    column = pa.array([None if i % 7 == 3 else f"v{i}é" for i in range(500)], pa.string())
    cases = [np.arange(10, 60), np.arange(499, 500), np.array([0, 0, 1, 2]),
             np.array([0, 0, 2]), np.array([3, 499])]
    for _ in range(200):
        lo = int(rng.integers(0, 500))
        span = int(rng.integers(1, 501 - lo))
        count = int(rng.integers(1, 2 * span + 1))
        cases.append(np.sort(rng.integers(lo, lo + span, count)))
    for local in cases:
        assert _gather(column, local) == column.take(pa.array(local)).to_pylist()


def _json_value(rnd, depth: int = 0):
    """A generated JSON value: nested containers, unicode and escapes, floats at the
    edges of their text, large integers."""
    kinds = ["str", "int", "float", "bool", "none"] + (["list", "dict"] if depth < 3 else [])
    kind = rnd.choice(kinds)
    if kind == "str":
        return "".join(rnd.choice(['a', 'é', '"', '\\', '\n', '\u2028', '😀', ' ', 'negatives'])
                       for _ in range(rnd.randrange(0, 6)))
    if kind == "int":
        return rnd.choice([0, -1, 7, 2**63, -(2**70)])
    if kind == "float":
        return rnd.choice([0.1, -0.0, 1e300, 5e-324, float("nan"), float("inf"), 1 / 3])
    if kind == "bool":
        return rnd.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [_json_value(rnd, depth + 1) for _ in range(rnd.randrange(0, 4))]
    return {rnd.choice(["k", "ü", "negatives", "outcome", "x y"]) + str(i):
            _json_value(rnd, depth + 1) for i in range(rnd.randrange(0, 4))}


@pytest.mark.parametrize("seed", range(6))
def test_negatives_lines_from_the_store_equal_those_from_records_in_memory(tmp_path, seed):
    """negatives.jsonl written from a run's store (each record's stored JSON text with
    its negatives and outcome spliced in) is byte for byte what writing the records
    read into memory gives, for generated records: every kind of JSON value, members
    named `negatives` or `outcome` of their own, empty records left out of mining."""
    import random

    rnd = random.Random(seed)
    n = 30
    recs: list[dict] = []
    for i in range(n):
        if rnd.random() < 0.15:
            recs.append({} if rnd.random() < 0.5 else {"id": f"r{i}", "only": 1})
            continue
        rec = {"id": f"r{i}", "image": f"img/{i}.png", "text": f"caption {i % 7}"}
        for _ in range(rnd.randrange(0, 4)):
            rec[rnd.choice(["extra", "negatives", "outcome", "ä", "meta"])] = _json_value(rnd)
        recs.append(rec)
    mined = [i for i, r in enumerate(recs) if "text" in r]
    ds = Corpus(records=recs, positions=np.asarray(mined), ids=[recs[i]["id"] for i in mined],
                images=[Path(recs[i]["image"]) for i in mined], phrases=["x"],
                text_ids=np.zeros(len(mined), np.int64), groups=np.arange(len(mined)),
                num_anchors=len(mined), skipped={}, source_sha256="0" * 64,
                record_ids=tuple(r.get("id", f"r{i}") for i, r in enumerate(recs)))
    if any("id" not in r for r in recs):  # every record of the store's splice has an id
        ds = dataclasses.replace(ds, records=[r or {"id": f"r{i}"} for i, r in enumerate(recs)])
    anchors = np.arange(rnd.randrange(1, len(mined) + 1))
    picks = [[Pick(int(rnd.randrange(len(mined))), "hard", rnd.random(), rnd.random(), 0)]
             * rnd.randrange(0, 3) for _ in anchors]
    why = Outcomes(np.full(len(anchors), -1), np.zeros(len(anchors), np.int64),
                   np.zeros((len(anchors), len(RULES)), np.int64), np.ones(len(anchors), bool))
    written = []
    for name, source in (("memory", lambda run: ds), ("store", open_corpus)):
        config = Config(output_dir=str(tmp_path / name), num_negatives=2)
        run = new_run(tmp_path / name)
        store_corpus(run, config, ds)
        with outputs.RecordWriter(config, run, source(run)) as out:
            out.shard(anchors, picks, why)
        written.append((tmp_path / name / "negatives.jsonl").read_bytes())
    assert written[0] == written[1]
    assert written[0].count(b"\n") == n
