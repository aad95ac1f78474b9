"""Generated bad inputs for every surface a user hands hnm: each run either succeeds or
stops with exit 2 and one line `hnm: error: ...` naming the file (or the flag) at fault,
writing nothing; never an internal error, a traceback or a file elsewhere.

A seeded mutator of valid files: bytes truncated, flipped, inserted, deleted, repeated or
re-encoded, values nested or given other types, names and shapes changed. Every case is
drawn from its own seed (surface, number), so a failure names the case that reproduces it.
`make test` runs a few cases a surface; `make fuzz` (HNM_FUZZ_EXAMPLES=N) many more.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import FAST, cli, records, snapshot
from PIL import Image

from hnm.config import Config, Fields
from hnm.data import load_corpus
from hnm.errors import HnmError
from hnm.outcome import Outcomes
from hnm.outputs import read_records, write_negatives
from hnm.storage import RunDir

# records written with no anchor among them: their fields are what is tested
NO_ANCHORS = Outcomes.concat([])

# cases per surface: a few in `make test`, HNM_FUZZ_EXAMPLES in `make fuzz`
EXAMPLES = int(os.environ.get("HNM_FUZZ_EXAMPLES", "0"))
N = 6  # records of every base input
COUNTS: dict[str, Counter] = {}  # surface -> outcomes, printed by `make fuzz`


# ---------------------------------------------------------------- generating values


def text(rng: random.Random) -> str:
    """Text from the corners of Unicode: controls, NUL, quotes, separators, astral."""
    pool = ["a", "é", "\x00", "\t", "\n", "\r", '"', "'", ",", "\\", "\u2028", "\u0085",
            "\ufeff", "\ud800", "😀", "\u202e", " ", "{", "[", "\x7f", "﷐", "img/0.png", "/",
            "..", "i" * 300]
    return "".join(rng.choice(pool) for _ in range(rng.randrange(0, 12)))


def value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type, some nested past what hnm accepts."""
    kind = rng.randrange(12 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 7, 2**31, 2**63, 2**70, -(2**64)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("nan"), float("inf")])
    if kind in (4, 5, 6):
        return text(rng)
    if kind == 7:
        return {}
    if kind == 8:
        return []
    if kind == 9:
        return nested(rng.choice([2, 99, 100, 101, 150, 900, 990, 3000]))
    if kind == 10:
        return [value(rng, depth + 1) for _ in range(rng.randrange(1, 4))]
    return {text(rng) or "k": value(rng, depth + 1) for _ in range(rng.randrange(1, 4))}


def nested(depth: int) -> Any:
    out: Any = []
    for i in range(depth - 1):
        out = [out] if i % 2 else {"x": out}
    return out


def mutate_records(rng: random.Random, recs: list[dict[str, Any]]) -> Any:
    """Records with fields retyped, removed or renamed, or another container altogether."""
    recs = copy.deepcopy(recs)
    for _ in range(rng.randrange(1, 4)):
        record = rng.choice(recs)
        name = rng.choice([*record, "extra", "new", text(rng)])
        roll = rng.random()
        if roll < 0.6:
            record[name] = value(rng)
        elif roll < 0.8:
            record.pop(name, None)
        else:
            record[text(rng) or "k"] = record.pop(name, None)
    if rng.random() < 0.1:
        return rng.choice([value(rng), {str(i): value(rng) for i in range(3)}, recs[0], []])
    return recs


def dumps(data: Any, escaped: bool = True) -> bytes:
    """JSON bytes of any generated value (deep ones too); non-ASCII text escaped or raw,
    lone surrogates as they would be written by a careless encoder."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        return json.dumps(data, ensure_ascii=escaped).encode("utf-8", "surrogatepass")
    finally:
        sys.setrecursionlimit(limit)


# ---------------------------------------------------------------- mutating bytes


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One to three edits of the bytes: the classic damaged, mis-encoded or mangled file."""
    for _ in range(rng.randrange(1, 4)):
        n = len(data)
        at = rng.randrange(n + 1)
        end = min(n, at + rng.randrange(1, 64))
        kind = rng.randrange(9)
        if kind == 0:
            data = data[:at]
        elif kind == 1 and n:
            b = bytearray(data)
            for _ in range(rng.randrange(1, 9)):
                b[rng.randrange(n)] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif kind == 2:
            junk = rng.choice([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b'"', b"[" * 5000,
                               b"{", b"\r\n", b"\t", b",", bytes(rng.randrange(256)
                                                                 for _ in range(8))])
            data = data[:at] + junk + data[at:]
        elif kind == 3:
            data = data[:at] + data[end:]
        elif kind == 4:
            data = data[:end] + data[at:end] * rng.randrange(2, 5) + data[end:]
        elif kind == 5:
            encoding = rng.choice(["utf-16", "utf-16-be", "utf-32", "latin-1", "cp1252"])
            data = data.decode("utf-8", "replace").encode(encoding, "replace")
        elif kind == 6:
            data = rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\x00"]) + data
        elif kind == 7:
            data = b""
        else:
            depth = rng.choice([100, 1000, 100_000])
            data = data[:at] + b"[" * depth + b"]" * depth + data[at:]
    return data


# ---------------------------------------------------------------- checking an outcome


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, 90, 20)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Images img/0.png ... for the records (builders.records) under tmp_path/in."""
    folder = tmp_path / "in"
    for i in range(N):
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / f"img/{i}.png").write_bytes(png(i))
    return folder


def check(capsys: Any, surface: str, case: str, args: list[Any], named: list[str],
          tmp_path: Path) -> str:
    """Run `hnm --dry-run ARGS`: exit 0, or exit 2 with one line naming one of `named`;
    nothing written anywhere under tmp_path. Returns the outcome, counted per surface."""
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, *FAST, "--output-dir", out, "--dry-run", *args)
    lines = err.splitlines()
    where = f"{surface} case {case}: exit {rc}, {err!r}"
    assert rc in (0, 2), where
    assert snapshot(tmp_path) == before and not out.exists(), where
    outcome = "ok"
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("hnm: error: "), where
        assert "internal error" not in err and "Traceback" not in err, where
        assert any(name in lines[0] for name in named), where
        outcome = "refused"
        if os.environ.get("HNM_FUZZ_SHOW"):
            print(f"{case}: {lines[0][:300]}", file=sys.__stderr__)
    COUNTS.setdefault(surface, Counter())[outcome] += 1
    return outcome


def cases(surface: str, default: int, share: int = 1) -> list[tuple[str, random.Random]]:
    """The surface's cases: `default` in `make test`, HNM_FUZZ_EXAMPLES / share in `make fuzz`."""
    count = max(1, EXAMPLES // share) if EXAMPLES else default
    return [(f"{surface}/{i}", random.Random(f"{surface}/{i}")) for i in range(count)]


def report(surface: str) -> None:
    counts = COUNTS.get(surface, Counter())
    print(f"\nfuzz {surface}: {sum(counts.values())} cases, {dict(sorted(counts.items()))}")


# ---------------------------------------------------------------- annotation files


def plain_records() -> list[dict[str, Any]]:
    """The base records with flat fields only (a column each in CSV or Parquet)."""
    recs = records(N)
    for r in recs:
        r.pop("extra")
    return recs


def annotation_bytes(rng: random.Random, fmt: str) -> bytes:
    """A mutated annotation file of `fmt` (json, jsonl, csv, tsv)."""
    recs = plain_records()
    if rng.random() < 0.5:
        data = mutate_records(rng, recs)
        if fmt == "json":
            return dumps(data, rng.random() < 0.5)
        if fmt == "jsonl":
            items = data if isinstance(data, list) else [data]
            return b"".join(dumps(r, rng.random() < 0.5) + b"\n" for r in items)
        recs = data if isinstance(data, list) and all(isinstance(r, dict) for r in data) \
            else recs
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        names = list(dict.fromkeys(k for r in recs for k in r))
        rows = [sep.join(names)] + [sep.join(_cell(r.get(k), fmt) for k in names) for r in recs]
        base = ("\n".join(rows) + "\n").encode("utf-8", "surrogatepass")
    elif fmt == "jsonl":
        base = b"".join(dumps(r, rng.random() < 0.5) + b"\n" for r in recs)
    else:
        base = dumps(recs, rng.random() < 0.5)
    return mutate_bytes(rng, base)


def _cell(v: Any, fmt: str) -> str:
    s = v if isinstance(v, str) else dumps(v).decode("utf-8", "surrogatepass")
    if fmt == "csv" and any(c in s for c in ',"\n\r'):
        return '"' + s.replace('"', '""') + '"'
    return s.replace("\t", " ").replace("\n", " ")


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "tsv"])
def test_annotation_files(capsys, tmp_path, root, fmt):
    for case, rng in cases(f"annotations-{fmt}", 10):
        path = root / f"annotations.{fmt}"
        path.write_bytes(annotation_bytes(rng, fmt))
        skip = ["--on-missing-image", "skip"] if rng.random() < 0.3 else []
        check(capsys, f"annotations-{fmt}", case,
              ["--annotations", path, "--image-dir", root, *skip], [str(path)], tmp_path)
    report(f"annotations-{fmt}")


def parquet_bytes(rng: random.Random) -> bytes:
    """A Parquet file of the records (images as bytes or paths), its types or bytes mutated."""
    recs = plain_records()
    if rng.random() < 0.5:
        for i, r in enumerate(recs):
            r["image"] = png(i)
    if rng.random() < 0.6:
        data = mutate_records(rng, recs)
        recs = data if isinstance(data, list) and data and all(
            isinstance(r, dict) for r in data) else recs
    try:
        table = pa.Table.from_pylist(recs)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        table = pa.Table.from_pylist(plain_records())  # values of no one Arrow type
    buffer = io.BytesIO()
    try:
        pq.write_table(table, buffer)
    except pa.ArrowException:  # e.g. a struct without fields: no Parquet form
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(plain_records()), buffer)
    data = buffer.getvalue()
    return mutate_bytes(rng, data) if rng.random() < 0.5 else data


def test_parquet_files(capsys, tmp_path, root):
    for case, rng in cases("annotations-parquet", 8):
        path = root / "part-00000.parquet"
        path.write_bytes(parquet_bytes(rng))
        check(capsys, "annotations-parquet", case,
              ["--annotations", path, "--image-dir", root], [str(path)], tmp_path)
    report("annotations-parquet")


def tar_bytes(rng: random.Random, mutated: bool = True) -> bytes:
    """A WebDataset shard ({key}.png, {key}.txt, {key}.json), its members or bytes mutated."""
    buffer = io.BytesIO()
    chance = rng.random if mutated else (lambda: 1.0)
    with tarfile.open(fileobj=buffer, mode="w", format=rng.choice(
            [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
            encoding="utf-8", errors="surrogateescape") as archive:
        for i, r in enumerate(records(N)):
            key = r["id"]
            members = {"png": png(i), "txt": r["text"].encode(),
                       "json": dumps({"id": key, "group": r["group"]})}
            if chance() < 0.3:
                ext = rng.choice(list(members))
                members[ext] = mutate_bytes(rng, members[ext]) if rng.random() < 0.5 \
                    else dumps(value(rng), rng.random() < 0.5)
            if chance() < 0.15:
                key = rng.choice(["\udcff\udcfe", "a/b", "../x", "", "k.k", "\x00", "é"]) + key
            if chance() < 0.1:
                members.pop(rng.choice(list(members)))
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                if chance() < 0.05:
                    info.type = rng.choice([tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])
                    info.linkname = "/etc/passwd"
                    info.size = 0
                archive.addfile(info, io.BytesIO(data if info.isfile() else b""))
    data = buffer.getvalue()
    return mutate_bytes(rng, data) if chance() < 0.5 else data


def test_tar_shards(capsys, tmp_path, root):
    for case, rng in cases("annotations-webdataset", 10):
        path = root / "00000.tar"
        path.write_bytes(tar_bytes(rng))
        check(capsys, "annotations-webdataset", case, ["--annotations", path],
              [str(path)], tmp_path)
    report("annotations-webdataset")


def test_hf_datasets(capsys, tmp_path, root):
    """A dataset saved with save_to_disk, its Arrow file or its JSON files mutated."""
    pytest.importorskip("datasets")
    from hnm.writers import write_hf

    clean = write_hf(tmp_path / "hf-clean", [{**r, "image": png(i)} for i, r in
                                            enumerate(plain_records())], "image", 1)
    files = sorted(p.name for p in clean.iterdir())
    for case, rng in cases("annotations-hf", 4):
        folder = root / "hf"
        folder.mkdir(exist_ok=True)
        for name in files:
            (folder / name).write_bytes((clean / name).read_bytes())
        target = folder / rng.choice(files)
        target.write_bytes(mutate_bytes(rng, target.read_bytes()))
        check(capsys, "annotations-hf", case, ["--annotations", folder],
              [str(folder)], tmp_path)
    report("annotations-hf")


# ---------------------------------------------------------------- config, blacklist, arrays


CONFIG = {"k_nn": 5, "cosine_threshold": 0.3, "fields": {"text": "text"}, "batch_size": 4,
          "index": "exact", "n_clusters": 3, "seed": 1}
# keys a generated config leaves alone: they name other files, or would leave --dry-run
OTHER_FILES = {"annotations", "image_dir", "output_dir", "blacklist", "image_embeddings",
               "text_embeddings", "visual_encoder", "text_encoder", "dry_run", "overwrite",
               "quiet", "hf_split", "input_format"}


def config_bytes(rng: random.Random) -> bytes:
    import yaml

    values: dict[Any, Any] = dict(CONFIG)
    if rng.random() < 0.5:
        keys = [k for k in Config.__dataclass_fields__ if k not in OTHER_FILES]
        for _ in range(rng.randrange(1, 4)):
            key = rng.choice([*keys, "fields", text(rng), 3, None])
            values[key] = rng.choice([value(rng), {"text": value(rng)}, "1,2", -1, 10**30,
                                      {rng.choice([1, None, 2.5]): 1}])
        try:
            data = yaml.safe_dump(values, allow_unicode=True).encode("utf-8", "surrogatepass")
        except (yaml.YAMLError, RecursionError):
            data = yaml.safe_dump(CONFIG).encode()
    else:
        data = yaml.safe_dump(CONFIG).encode()
    if rng.random() < 0.5:
        data = mutate_bytes(rng, data)
    if rng.random() < 0.1:
        data = rng.choice([b"a: &a [*a]\n", b"k_nn: !!binary aGk=\n", b"- 1\n", b"!!set {a}\n",
                           b"k_nn: !!python/object:os.system x\n", b"? [1]\n: 2\n"])
    return data


def test_config_files(capsys, tmp_path, root):
    ann = root / "annotations.json"
    ann.write_bytes(dumps(records(N)))
    for case, rng in cases("config", 12):
        path = root / "config.yaml"
        path.write_bytes(config_bytes(rng))
        check(capsys, "config", case, ["--config", path, "--annotations", ann,
                                       "--image-dir", root],
              [str(path), *(f"--{kind}-field" for kind in Fields.__annotations__)], tmp_path)
    report("config")


def test_blacklists(capsys, tmp_path, root):
    ann = root / "annotations.json"
    ann.write_bytes(dumps(records(N)))
    for case, rng in cases("blacklist", 6):
        path = root / "blacklist.txt"
        lines = ["yes", "go north", text(rng), text(rng)]
        path.write_bytes(mutate_bytes(rng, "\n".join(lines).encode("utf-8", "surrogatepass")))
        check(capsys, "blacklist", case, ["--blacklist", path, "--annotations", ann,
                                          "--image-dir", root], ["--blacklist"], tmp_path)
    report("blacklist")


def array_file(rng: random.Random, path: Path) -> Path:
    """A .npy (or .npz) embedding file of another dtype, shape or contents, or damaged."""
    shape = rng.choice([(N, 4), (N, 4), (N,), (N, 0), (N + 1, 4), (N, 2, 2), (0, 4), ()])
    dtype = rng.choice(["f4", "f8", "f2", ">f4", "i4", "?", "c8", "U3", "O", "M8[s]",
                        [("a", "f4")], "V4"])
    try:
        arr = np.ones(shape, dtype=dtype) if dtype != "O" else np.array(
            [[1.0, "x"]] * N, dtype=object)
    except (TypeError, ValueError):
        arr = np.ones((N, 4), "f4")
    if arr.dtype.kind == "f" and arr.size and rng.random() < 0.3:
        arr.flat[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, 0.0])
    if rng.random() < 0.15:
        path = path.with_suffix(".npz")
        np.savez(path, embeddings=arr)
    else:
        np.save(path, arr, allow_pickle=arr.dtype == object)
    if rng.random() < 0.4:
        path.write_bytes(mutate_bytes(rng, path.read_bytes()))
    return path


@pytest.mark.parametrize("flag", ["--image-embeddings", "--text-embeddings"])
def test_embedding_arrays(capsys, tmp_path, root, flag):
    ann = root / "annotations.json"
    ann.write_bytes(dumps(records(N)))
    for case, rng in cases(f"arrays{flag}", 8):
        path = array_file(rng, root / f"emb{case.split('/')[-1]}.npy")
        check(capsys, f"arrays{flag}", case, [flag, path, "--annotations", ann,
                                              "--image-dir", root], [flag], tmp_path)
        path.unlink()
    report(f"arrays{flag}")


# ---------------------------------------------------------------- field mappings


def test_field_mappings(capsys, tmp_path, root):
    """Any name for any field, on each kind of source: a name no record holds is refused
    naming the flag and the input."""
    recs = records(N)
    ann = root / "annotations.json"
    ann.write_bytes(dumps(recs))
    tar = root / "00000.tar"
    tar.write_bytes(tar_bytes(random.Random("base"), mutated=False))
    names = ["id", "image", "text", "group", "extra", "ID", "txt", "grp", "key", "é", " ", "\udcff",
             "negatives", "image.path", "0"]
    for case, rng in cases("fields", 12):
        given, base = rng.choice([(ann, ["--image-dir", root]), (tar, [])])
        flags = []
        for kind in rng.sample(["id", "image", "text", "group"], rng.randrange(1, 3)):
            flags += [f"--{kind}-field", rng.choice(names)]
        outcome = check(capsys, "fields", case, ["--annotations", given, *base, *flags],
                        [str(given), *flags[::2]], tmp_path)
        if outcome == "ok":  # every name given is held by some record (or by default)
            named = dict(zip(flags[::2], flags[1::2]))
            held = {k for r in recs for k in r} | {"id", "group"}
            if given == tar:  # a sample's image is its image member, its key in that field
                held.add(named.pop("--image-field", "image"))
            assert set(named.values()) <= held, (case, flags)
    report("fields")


# ---------------------------------------------------------------- what later phases write


def test_records_the_outputs_can_write(tmp_path, root):
    """Records that planning accepts are written by the outputs, JSONL and Parquet, and
    read back the same: no value fails at the end of a run."""
    for case, rng in cases("outputs", 16):
        data = mutate_records(rng, records(N))
        ann = root / "annotations.json"
        ann.write_bytes(dumps(data, rng.random() < 0.5))
        config = Config(annotations=str(ann), image_dir=str(root), fields=Fields())
        try:
            ds = load_corpus(config)
        except HnmError as exc:
            assert str(ann) in str(exc), (case, str(exc))
            COUNTS.setdefault("outputs", Counter())["refused"] += 1
            continue
        run = RunDir(tmp_path / case.replace("/", "_"))
        run.sign(run.layout(1))  # hnm writes only in a folder its signature makes a run
        write_negatives(config, run, ds, [], NO_ANCHORS)
        as_jsonl = [r for _, r in read_records(run)]
        write_negatives(Config(annotations=str(ann), output_format="parquet"), run, ds, [],
                        NO_ANCHORS)
        run.negatives.unlink()
        as_parquet = [r for _, r in read_records(run)]
        add = any("id" not in r for r in ds.records)  # then every row names its id
        expected = [{**r, **({"id": rid} if add else {}), "negatives": []}
                    for r, rid in zip(ds.records, ds.record_ids)]
        assert json.dumps(as_jsonl, sort_keys=True) == json.dumps(expected, sort_keys=True), \
            case
        assert len(as_parquet) == len(as_jsonl), case
        COUNTS.setdefault("outputs", Counter())["ok"] += 1
    report("outputs")


@pytest.mark.skipif(not EXAMPLES, reason="whole runs: `make fuzz` only")
def test_whole_runs(capsys, tmp_path, root):
    """Whole tiny runs (pixels encoder) of generated records, both output formats."""
    for case, rng in cases("runs", 0, share=5):
        ann = root / "annotations.json"
        ann.write_bytes(dumps(mutate_records(rng, records(N)), rng.random() < 0.5))
        out = tmp_path / case.replace("/", "_")
        fmt = rng.choice(["jsonl", "parquet"])
        rc, _, err = cli(capsys, *FAST, "--annotations", ann, "--image-dir", root,
                         "--output-dir", out, "--blacklist", "", "--cpu-workers", "1",
                         "--quiet", "--output-format", fmt)
        assert rc in (0, 2), (case, err)
        if rc == 2:
            assert err.count("\n") == 1 and str(ann) in err and not out.exists(), (case, err)
        else:
            assert "Exception ignored" not in err and "Traceback" not in err, (case, err)
            assert len(list(read_records(RunDir(out)))) == N, case
        COUNTS.setdefault("runs", Counter())["ok" if rc == 0 else "refused"] += 1
    report("runs")

