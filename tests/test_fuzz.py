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
import shutil
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



# ---------------------------------------------------------------- hostile pickles

HUGE = [-1, 0, 1, 3, 2**16, 2**31 - 1, 2**31, 2**33, 2**40, 2**62, 2**63, 2**64 + 5]


def _int(n: int) -> bytes:
    """A pickle fragment pushing the integer n."""
    if -(2**31) <= n < 2**31:
        return b"J" + n.to_bytes(4, "little", signed=True)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _str(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")
    return b"X" + len(data).to_bytes(4, "little") + data


def _bytes(b: bytes) -> bytes:
    return b"B" + len(b).to_bytes(4, "little") + b


def _global(name: str) -> bytes:
    module, _, attr = name.rpartition(".")
    return b"c" + f"{module}\n{attr}\n".encode()


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _list(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def _call(name: str, *args: bytes) -> bytes:
    return _global(name) + _tuple(*args) + b"R"


def _storage(values: list[float], dtype: str = "float32", numel: int | None = None) -> bytes:
    """torch.storage._load_from_bytes of a storage's legacy bytes (numel as claimed)."""
    import torch

    from hnm import pickles

    raw = pickles.storage_bytes(torch.tensor(values, dtype=getattr(torch, dtype)))
    if numel is not None:  # the count written just before the raw values
        at = len(raw) - len(values) * torch.tensor([], dtype=getattr(torch, dtype)
                                                   ).element_size() - 8
        raw = raw[:at] + (numel % 2**64).to_bytes(8, "little") + raw[at + 8:]
    return _call("torch.storage._load_from_bytes", _bytes(raw))


def _view(storage: bytes, offset: int, size: tuple, stride: tuple, extra: bytes = b"") -> bytes:
    return _call("torch._utils._rebuild_tensor_v2", storage, _int(offset),
                 _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89",
                 _call("collections.OrderedDict"), extra)


def _dtype(rng: random.Random) -> bytes:
    spec = rng.choice(["f8", "f4", "i8", "u1", "b1", "U3", "S2", "O8", "V8", "M8", "f16",
                       "c16", "U99999999", ">f8"])
    order = rng.choice(["<", ">", "|", "="])
    size = rng.choice([-1, -1, 8, 4, 2**31 - 1, 0, 12])
    state = _tuple(_int(3), _str(order), b"N", b"N", b"N", _int(size), _int(-1), _int(0))
    if rng.random() < 0.2:  # a structured type, or another state version
        state = _tuple(_int(rng.choice([3, 4, 1])), _str("<"), _tuple(_str("f8"), _int(2)),
                       _tuple(_str("a")), b"N", _int(size), _int(-1), _int(0))
    return _call("numpy.dtype", _str(spec), b"\x89", b"\x88") + state + b"b"


def hostile_value(rng: random.Random) -> bytes:
    """A pickle fragment attacking one allowed global (or the opcodes) with hostile
    arguments: sizes without content, views past their storage, dtypes that lie about
    their size, state given to what hnm did not build, shared references that explode when
    walked, nesting, cycles, colliding keys."""
    n = rng.choice(HUGE)
    kind = rng.randrange(22)
    if kind == 0:
        return _call(f"builtins.{rng.choice(['bytearray', 'set', 'frozenset'])}", _int(n))
    if kind == 1:
        inner = _call("builtins.range", _int(n))
        return _call(rng.choice(["builtins.set", "builtins.frozenset", "torch.Size",
                                 "builtins.bytearray", "collections.OrderedDict"]), inner)
    if kind == 2:
        return _call("torch.Size", _list(*[_int(rng.choice(HUGE)) for _ in range(rng.randrange(
            0, 40))]))
    if kind == 3:
        return _call("builtins.range", *[_int(rng.choice(HUGE)) for _ in range(rng.randrange(
            1, 4))])
    if kind == 4:  # an array whose dtype's state claims another size, or data that lies
        data = bytes(rng.choice([0, 8, 16, 24, 7]))
        shape = _tuple(*[_int(rng.choice([0, 1, 3, n])) for _ in range(rng.randrange(0, 3))])
        state = _tuple(_int(1), shape, _dtype(rng), rng.choice([b"\x89", b"\x88", _int(1)]),
                       _bytes(data) if rng.random() < 0.8 else _list(b"N"))
        array = _call("numpy._core.multiarray._reconstruct", _global("numpy.ndarray"),
                      _tuple(_int(0)), _bytes(b"b"))
        return array + state + b"b"
    if kind == 5:
        return _call("numpy._core.numeric._frombuffer", _bytes(bytes(rng.choice([0, 8, 9]))),
                     _dtype(rng), _tuple(_int(n)), _str(rng.choice(["C", "F", "K"])))
    if kind == 6:
        return _call("numpy.core.multiarray.scalar", _dtype(rng),
                     _bytes(bytes(rng.choice([0, 1, 8, 16]))))
    if kind == 7:  # views: stride 0, past the end, negative, overlapping, huge
        size = tuple(rng.choice([1, 3, 8, 12000, n]) for _ in range(rng.randrange(0, 4)))
        stride = tuple(rng.choice([0, 1, -1, n, 2**40]) for _ in size)
        return _view(_storage([1.0, 2.0, 3.0]), rng.choice([0, 2, 3, -1, n]), size, stride)
    if kind == 8:
        return _view(_storage([0.5] * 4, rng.choice(["float32", "float64", "int64"]),
                              numel=rng.choice([4, 5, n])), 0, (4,), (1,))
    if kind == 9:  # uninitialised memory: the classes called or built directly
        cls = rng.choice(["torch.Tensor", "torch._tensor.Tensor", "numpy.ndarray"])
        args = _tuple(_tuple(_int(rng.choice([3, 2**20, n]))))
        return _global(cls) + args + rng.choice([b"R", b"\x81"])
    if kind == 10:
        return _call("torch._tensor._rebuild_from_type_v2",
                     _global(rng.choice(["torch._utils._rebuild_tensor_v2", "builtins.set"])),
                     _global(rng.choice(["torch.Tensor", "numpy.ndarray"])),
                     _tuple(_storage([1.0] * 3), _int(0), _tuple(_int(3)), _tuple(_int(1))),
                     rng.choice([b"N", b"}", b"}" + _str("a") + _int(1) + b"s"]))
    if kind == 11:
        return _call(rng.choice(["collections.OrderedDict", "copyreg._reconstructor",
                                 "_codecs.encode", "builtins.complex", "builtins.slice"]),
                     *[rng.choice([_int(n), _str("x" * rng.randrange(5)), _list(_int(1)),
                                   _global("builtins.set"), b"N"])
                       for _ in range(rng.randrange(0, 4))])
    if kind == 12:  # state given to what hnm did not build
        target = rng.choice([_call("collections.OrderedDict"), b"]", _view(
            _storage([1.0]), 0, (1,), (1,)), _call("builtins.set", _list())])
        return target + b"}" + _str(rng.choice(["__class__", "x", "data"])) + _int(n) + b"s" + \
            rng.choice([b"b", _tuple(_int(1), _int(2)) + b"b"])
    if kind == 13:  # items added to what is not a plain container
        target = rng.choice([_call("builtins.bytearray", _bytes(b"ab")), _view(
            _storage([1.0, 2.0]), 0, (2,), (1,)), _call("builtins.range", _int(3))])
        return target + rng.choice([b"(" + _int(0) + _int(n) + b"u", b"(" + _int(n) + b"e",
                                    _int(0) + _int(1) + b"s"])
    if kind == 14:  # a memo index, a frame or a length past anything the file holds
        index = rng.choice([2**31 - 1, 2**32 - 1, 2**20])
        return rng.choice([b"N" + b"r" + index.to_bytes(4, "little"),
                           b"\x96" + (n % 2**64).to_bytes(8, "little") + b"ab",
                           b"\x8e" + (n % 2**64).to_bytes(8, "little") + b"ab",
                           b"\x95" + (n % 2**64).to_bytes(8, "little") + b"N"])
    if kind == 15:  # lists of shared references: small in the file, vast when walked
        levels, width = rng.choice([(3, 100), (6, 30), (20, 2), (40, 2)])
        out = _str("x" * rng.choice([1, 1000])) + b"r" + (10**6).to_bytes(4, "little")
        for level in range(1, levels + 1):
            out += _list(*[b"j" + (10**6 + level - 1).to_bytes(4, "little")] * width) + \
                b"r" + (10**6 + level).to_bytes(4, "little")
        return b"(" + out + b"1" + b"j" + (10**6 + levels).to_bytes(4, "little")
    if kind == 16:  # nested past the limit
        depth = rng.choice([99, 101, 1000, 100_000])
        return b"]" * depth + b"a" * (depth - 1)
    if kind == 17:  # a cycle
        return b"]r" + (10**6).to_bytes(4, "little") + b"j" + (10**6).to_bytes(4, "little") + \
            b"a"
    if kind == 18:  # keys that share one hash (a quadratic dict or set)
        keys = [_int(k * (2**61 - 1)) if rng.random() < 0.5 else _tuple(_int(k), _int(-k))
                for k in range(1, rng.choice([10, 3000]))]
        if rng.random() < 0.5:
            return b"}(" + b"".join(k + b"N" for k in keys) + b"u"
        return _call("builtins.frozenset", _list(*keys))
    if kind == 19:  # opcodes that allocate more than they hold
        return b"(" + rng.choice([b"\x8f", b"}", b"]", b"("]) * rng.choice([10, 10**5]) + b"l"
    if kind == 20:  # an image tensor expanded from one value, or of a type no phase takes
        return _view(_storage([0.5], rng.choice(["float32", "float16", "int64", "bool"])),
                     0, (3, rng.choice([8, 12000]), rng.choice([8, 12000])), (0, 0, 0))
    return _call(rng.choice(["builtins.eval", "os.system", "torch.empty", "numpy.empty",
                             "torch.storage.UntypedStorage", "builtins.getattr"]), _int(n))


def hostile_chunk(rng: random.Random) -> bytes:
    """A chunk of one item whose image or another field is a hostile value (or whose bytes
    are a valid chunk's, mutated)."""
    import torch

    from hnm import pickles

    image = io.BytesIO()
    pickles.dump(torch.full((3, 8, 8), 0.25), image, protocol=2)
    image_frag = image.getvalue()[2:-1]  # without PROTO and STOP
    attack = hostile_value(rng)
    field, other = ("current_view_image", b"N") if rng.random() < 0.3 else ("extra", image_frag)
    item = b"}(" + _str(field) + attack + _str("current_view_image" if field == "extra"
                                               else "extra") + other + \
        _str("answer") + _str("fly north") + _str("first_instruction") + _str("go") + b"u"
    data = b"\x80\x02}(" + _int(0) + item + b"u."
    return mutate_bytes(rng, data) if rng.random() < 0.1 else data


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_limited(args: list[Any], err: Path, check_export: Path | None) -> tuple[int, int]:
    """hnm's CLI on `args` in a forked child under a memory limit (1 GiB beyond what the
    process holds) and a CPU-time limit; returns (exit status, peak memory growth in KiB).
    A child killed by a signal (a crash, or past a limit) is a failure of the case."""
    import resource

    from hnm.cli import main

    start = err.with_suffix(".rss")
    pid = os.fork()
    if pid == 0:  # the child: limits, the CLI, and then what an export reads of the chunk
        code = 3
        try:
            start.write_text(str(_rss_kib()))
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            pages = int(Path("/proc/self/statm").read_text().split()[0])
            vm = pages * os.sysconf("SC_PAGE_SIZE") + (1 << 30)
            resource.setrlimit(resource.RLIMIT_AS, (vm, vm))
            resource.setrlimit(resource.RLIMIT_CPU, (120, 120))  # a safety net of minutes
            sys.stderr = open(err, "w", encoding="utf-8")  # noqa: SIM115
            code = main([str(a) for a in args])
            if code == 0 and check_export is not None:
                from hnm import pickles
                from hnm.readers.avdn import load_items

                items = load_items(check_export)
                pickles.dump(items, io.BytesIO())
                for item in items.values():
                    for value in item.values():
                        if hasattr(value, "numpy"):
                            value.contiguous().numpy().tobytes()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    assert os.WIFEXITED(status), f"killed by signal {os.WTERMSIG(status)}"
    return os.WEXITSTATUS(status), max(0, usage.ru_maxrss - int(start.read_text()))


PEAKS: dict[str, tuple[int, str]] = {}  # surface -> (worst peak growth in KiB, its case)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="cases run in forked children")
def test_hostile_pickles(tmp_path):
    """Each allowed global (and the opcodes around them) attacked with hostile arguments:
    a dry run reads the chunk and exits 0 (and then the chunk reads and writes back as an
    export does) or 2 with one line naming the chunk; never a crash, never past 1 GiB or a
    minute of CPU, never a refusal for running out of memory."""
    for case, rng in cases("pickles", 40):
        folder = tmp_path / case.replace("/", "_")
        folder.mkdir()
        chunk = folder / "chunk_0.pkl"
        chunk.write_bytes(hostile_chunk(rng))
        err = tmp_path / "err.txt"
        pixels = ["--max-image-pixels", str(rng.choice([32, 64, 10**6]))]
        rc, peak = run_limited([*FAST, "--annotations", folder, "--output-dir",
                                tmp_path / "out", "--dry-run", *pixels], err, chunk)
        message = err.read_text(encoding="utf-8")
        where = f"{case}: exit {rc}, {message!r}"
        assert rc in (0, 2), where
        assert not (tmp_path / "out").exists(), where
        if rc == 2:
            assert message.count("\n") == 1 and message.startswith(f"hnm: error: {chunk}: ")
            assert "MemoryError" not in message and "RecursionError" not in message, where
            assert "Traceback" not in message and "internal error" not in message, where
        assert peak < 512 << 10, f"{where}: peak memory grew by {peak} KiB"
        if peak >= PEAKS.get("pickles", (-1, ""))[0]:
            PEAKS["pickles"] = (peak, case)
        COUNTS.setdefault("pickles", Counter())["ok" if rc == 0 else "refused"] += 1
        if os.environ.get("HNM_FUZZ_SHOW"):
            print(f"{case}: rc {rc} peak {peak} KiB {message[:200]!r}", file=sys.__stderr__)
    report("pickles")
    print(f"fuzz pickles: worst peak memory growth {PEAKS['pickles'][0]} KiB "
          f"({PEAKS['pickles'][1]})")


def _dtype_resized() -> bytes:
    """An array of 2 float64 whose (shared) dtype is then told it is 1 MiB an element: read
    outside the buffer when the array is used, before hnm built its own dtypes."""
    dtype = _call("numpy.dtype", _str("f8"), b"\x89", b"\x88") + b"r" + _int(10**6)[1:] + \
        _tuple(_int(3), _str("<"), b"N", b"N", b"N", _int(-1), _int(-1), _int(0)) + b"b"
    array = _call("numpy._core.multiarray._reconstruct", _global("numpy.ndarray"),
                  _tuple(_int(0)), _bytes(b"b"))
    state = _tuple(_int(1), _tuple(_int(2)), dtype, b"\x89", _bytes(bytes(16)))
    resize = b"j" + _int(10**6)[1:] + _tuple(_int(3), _str("<"), b"N", b"N", b"N",
                                             _int(1 << 20), _int(-1), _int(0)) + b"b0"
    return array + state + b"b" + resize


REPORTED = {  # the examples of the report: what each now says
    "dtype resized": (_dtype_resized(), "state given to a Float64DType"),
    "uninitialised tensor": (_global("torch.Tensor") + _tuple(_int(1 << 20)) + b"R",
                             "a call of torch.Tensor, which is not an hnm constructor"),
    "uninitialised __new__": (_global("torch._tensor.Tensor") + _tuple(_int(1 << 20)) +
                              b"\x81", "torch.Tensor.__new__, which hnm does not call"),
    "bytearray(n)": (_call("builtins.bytearray", _int(8 << 30)),
                     "bytearray(8589934592): a bytearray is built from bytes the file holds"),
    "set(range(n))": (_call("builtins.set", _call("builtins.range", _int(10**9))),
                      "a range would take its contents past"),
    "torch.Size(range(n))": (_call("torch.Size", _call("builtins.range", _int(10**8))),
                             "a range would take its contents past"),
    "stride-0 image": (_view(_storage([0.5]), 0, (3, 12000, 12000), (0, 0, 0)),
                       "a tensor of size (3, 12000, 12000) and stride (0, 0, 0) from offset 0 "
                       "claims more than its storage of 1 elements holds"),
    "shared references": (b"(" + _str("x" * 1000) + b"r" + _int(10**6)[1:] + b"".join(
        _list(*[b"j" + _int(10**6 + k)[1:]] * 30) + b"r" + _int(10**6 + k + 1)[1:]
        for k in range(6)) + b"1j" + _int(10**6 + 6)[1:],
        "its objects, followed through every reference, hold more than"),
    "nesting": (b"]" * 5000 + b"a" * 4999, "containers nested more than 100 levels deep"),
    "memo index": (b"Nr\xff\xff\xff\x7f", None),  # 16 GiB of memo in the C unpickler
}


@pytest.mark.parametrize("name", list(REPORTED))
def test_the_reported_pickles(tmp_path, name):
    """Each pickle of the report, as the image of an item or another field: refused in one
    line naming the chunk (or read), within 512 MiB of memory and without a crash."""
    attack, why = REPORTED[name]
    image = io.BytesIO()
    from hnm import pickles

    pickles.dump(__import__("torch").full((3, 8, 8), 0.25), image, protocol=2)
    item = b"}(" + _str("extra") + attack + _str("current_view_image") + \
        image.getvalue()[2:-1] + _str("answer") + _str("a") + _str("first_instruction") + \
        _str("b") + b"u"
    (tmp_path / "data").mkdir()
    chunk = tmp_path / "data" / "chunk_0.pkl"
    chunk.write_bytes(b"\x80\x02}(" + _int(0) + item + b"u.")
    rc, peak = run_limited([*FAST, "--annotations", tmp_path / "data", "--output-dir",
                            tmp_path / "out", "--dry-run"], tmp_path / "err.txt", chunk)
    message = (tmp_path / "err.txt").read_text(encoding="utf-8")
    assert peak < 512 << 10, peak
    if why is None:
        assert rc == 0, message
    else:
        assert rc == 2 and message.count("\n") == 1, message
        assert message.startswith(f"hnm: error: {chunk}: refused to unpickle: {why}"), message


# ---------------------------------------------------------------- a run's own files

RUN_FILES = [".hnm-run.json", "done.json", "plan.json", "metrics.json", "tables/done",
             "embeddings/done_00000", "candidates/done_00000"]


def run_file_bytes(rng: random.Random, original: bytes) -> bytes:
    """A run file edited, damaged or planted: its bytes mutated, one of its values given
    another type or a nested or enormous one, its keys removed, or another value whole."""
    roll = rng.random()
    if roll < 0.3:
        return mutate_bytes(rng, original)
    data = json.loads(original)
    if roll < 0.85 and isinstance(data, dict):
        for _ in range(rng.randrange(1, 3)):
            key = rng.choice([*data, "files", "version"])
            inner = data.get(key)
            if isinstance(inner, dict) and inner and rng.random() < 0.5:
                name = rng.choice(list(inner))
                inner[name] = rng.choice([value(rng), [1, "x"], [2**70, "x", 1], None, {}])
            elif rng.random() < 0.2:
                data.pop(key, None)
            else:
                data[key] = rng.choice([value(rng), {}, [], nested(rng.choice([40, 5000])),
                                        "x" * rng.choice([10, 10**6])])
        return dumps(data)
    return dumps(rng.choice([value(rng), [], {}, {"files": {}}, nested(10_000)]))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[Any]]:
    """A tiny finished run (pixels encoder) and the command line that made it."""
    root = tmp_path_factory.mktemp("fuzzrun")
    for i in range(N):
        (root / "img").mkdir(exist_ok=True)
        (root / f"img/{i}.png").write_bytes(png(i))
    (root / "annotations.json").write_bytes(dumps(records(N)))
    args = [*FAST, "--annotations", root / "annotations.json", "--image-dir", root,
            "--blacklist", "", "--cpu-workers", "1", "--quiet", "--output-dir", root / "run"]
    from hnm.cli import main

    assert main([str(a) for a in args]) == 0
    return root / "run", args


def test_damaged_run_files(capsys, tmp_path, finished_run):
    """A run file damaged in any way: `hnm export` (a finished run opened) and the mining
    command again (a run resumed) each finish, or stop with one line naming the file or
    the run directory; never a traceback, never the damaged file's results trusted."""
    original, args = finished_run
    for case, rng in cases("run-files", 14):
        run = tmp_path / case.replace("/", "_")
        shutil.copytree(original, run)
        name = rng.choice(RUN_FILES)
        (run / name).write_bytes(run_file_bytes(rng, (original / name).read_bytes()))
        for command in (["export", run, "--to", tmp_path / "rows.parquet", "--overwrite"],
                        [*args[:-1], run]):
            rc, _, err = cli(capsys, *command)
            where = f"{case} ({name}): {command[0]} exit {rc}, {err[:300]!r}"
            assert rc in (0, 2), where
            if rc == 2:
                assert err.count("\n") == 1 and err.startswith("hnm: error: "), where
                assert str(run) in err and "Traceback" not in err, where
            elif command[0] == "export":  # only results that verify are exported
                assert read_records_count(run) == N, where
            COUNTS.setdefault("run-files", Counter())["ok" if rc == 0 else "refused"] += 1
    report("run-files")


def read_records_count(run: Path) -> int:
    return sum(1 for _ in read_records(RunDir(run)))


def test_an_empty_final_marker_vouches_for_nothing(capsys, tmp_path, finished_run):
    original, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    (run / "done.json").write_text('{"files": {}}')
    records_file = run / "negatives.jsonl"
    records_file.write_bytes(records_file.read_bytes()[:-40])  # cut short
    rc, _, err = cli(capsys, "export", run, "--to", tmp_path / "rows.parquet")
    assert (rc, err) == (2, f"hnm: error: {run}/done.json does not vouch for negatives.jsonl;"
                            " rerun the mining command to write the results again\n")


@pytest.mark.parametrize(("n", "refused"), [(N - 1, False), (N, True), (10**9, True)])
def test_more_negatives_than_rows_is_refused_while_planning(capsys, tmp_path, root, n, refused):
    """Before, 10**9 passed the dry run and failed at the end of the run allocating
    anchors x 10**9 slots."""
    ann = root / "annotations.json"
    ann.write_bytes(dumps(records(N)))
    rc, _, err = cli(capsys, *FAST, "--annotations", ann, "--image-dir", root, "--blacklist",
                     "", "--output-dir", tmp_path / "out", "--dry-run", "--num-negatives", n)
    assert (rc, err) == ((2, f"hnm: error: --num-negatives: at most {N - 1} (the mined rows "
                             f"other than the anchor), got {n}\n") if refused else (0, ""))


def test_ids_that_are_one_id_as_text_are_refused(capsys, tmp_path, root):
    """7 and "7" were two ids while mining and one in a Parquet export (ids of both kinds
    are written as text): refused while planning, naming both records."""
    recs = records(N)
    recs[1]["id"], recs[4]["id"] = 7, "7"
    ann = root / "annotations.json"
    ann.write_bytes(dumps(recs))
    rc, _, err = cli(capsys, *FAST, "--annotations", ann, "--image-dir", root, "--blacklist",
                     "", "--output-dir", tmp_path / "out", "--dry-run")
    assert (rc, err) == (2, f"hnm: error: {ann}: ids 7 and '7', one id once written as text, "
                            "in records 1 and 4\n")


# ---------------------------------------------------------------- text that expands

def alias_yaml(rng: random.Random) -> tuple[bytes, int]:
    """A config whose aliases stand for `fanout ** depth` values ("billion laughs"), under
    a key hnm knows or not, some referring to themselves; returns its bytes and that count."""
    fanout, depth = rng.randrange(1, 12), rng.randrange(1, 12)
    lines = [f"l0: &l0 [{', '.join(['lol'] * fanout)}]"]
    for d in range(1, depth):
        lines.append(f"l{d}: &l{d} [{', '.join([f'*l{d - 1}'] * fanout)}]")
    top = f"*l{depth - 1}"
    where = rng.choice(["key", "fields", "list", "self"])
    if where == "fields":
        lines.append(f"fields: {{text: {top}}}")
    elif where == "list":
        lines.append(f"cpu_workers: [{top}, {top}]")
    elif where == "self":
        lines.insert(0, "loop: &loop [1, *loop]")
    return ("\n".join(lines) + "\n").encode(), fanout ** depth


def _values(data: Any) -> int:
    """Values `data` stands for, each shared one counted every time it is reached."""
    if isinstance(data, dict):
        return 1 + sum(_values(k) + _values(v) for k, v in data.items())
    if isinstance(data, list):
        return 1 + sum(map(_values, data))
    return 1


def test_yaml_aliases_expand_no_further_than_the_file(capsys, tmp_path, root):
    """Before, a 400-byte config whose aliases stood for 10**9 values was expanded by
    whatever walked it; now the aliases are counted as composed, within a budget of twice
    the file's bytes, and one referring to itself is refused."""
    from hnm.decoding import load_yaml

    ann = root / "annotations.json"
    ann.write_bytes(dumps(records(N)))
    for case, rng in cases("yaml-aliases", 12, share=4):
        path = root / "config.yaml"
        data, values = alias_yaml(rng)
        path.write_bytes(data)
        outcome = check(capsys, "yaml-aliases", case, ["--config", path, "--annotations",
                                                       ann, "--image-dir", root],
                        [str(path)], tmp_path)
        assert outcome == "refused", case  # every generated config holds a key hnm refuses
        budget = 2 * len(data) + 1000
        if b"*loop" in data:
            with pytest.raises(ValueError, match="refers to the value that holds it"):
                load_yaml(data.decode())
            continue
        import yaml
        if values <= 10**5:  # the reference: yaml.safe_load's result, walked
            values = _values(yaml.safe_load(data))
        if values > budget:
            with pytest.raises(ValueError, match=f"more than {budget} values"):
                load_yaml(data.decode())
        else:  # within the budget: what yaml.safe_load makes of it
            assert load_yaml(data.decode()) == yaml.safe_load(data), case
    report("yaml-aliases")


# ---------------------------------------------------------------- one name, two meanings

def _with_key_twice(record: dict[str, Any], key: str, again: Any) -> str:
    """A JSON object holding `key` twice: json.loads keeps the second value silently."""
    body = json.dumps(record)
    return "{" + json.dumps(key) + ": " + json.dumps(again) + ", " + body[1:]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "tsv", "parquet", "yaml", "tar"])
def test_names_given_twice_are_refused(capsys, tmp_path, root, fmt):
    """A key given twice in one JSON object or YAML mapping, a column named twice in a CSV,
    TSV or Parquet header, or a config option given under both of its spellings (k-nn and
    k_nn): before, the last one won silently (exit 0); now one line naming the file and the
    name."""
    recs = plain_records()
    for case, rng in cases(f"twice-{fmt}", 6):
        at = rng.randrange(N)
        key = rng.choice([*recs[at], "note", "é"])
        again = rng.choice([recs[at].get(key, "x"), "other", 3])  # the same value too
        record = {**recs[at], key: recs[at].get(key, "x")}
        args: list[Any] = ["--image-dir", root]
        if fmt in ("json", "jsonl"):
            lines = [json.dumps(r) if i != at else _with_key_twice(record, key, again)
                     for i, r in enumerate(recs)]
            path = root / f"annotations.{fmt}"
            path.write_text("[" + ", ".join(lines) + "]" if fmt == "json"
                            else "\n".join(lines) + "\n")
            shown = f"key {key!r} given twice"
        elif fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            names = list(dict.fromkeys([*recs[0], key]))
            names.insert(rng.randrange(len(names) + 1), key)
            path = root / f"annotations.{fmt}"
            path.write_text("\n".join([sep.join(names)] + [
                sep.join(str(r.get(n, again)) for n in names) for r in recs]) + "\n")
            shown = f"column {key!r} is named twice"
        elif fmt == "parquet":
            names = list(dict.fromkeys([*recs[0], key]))
            columns = [pa.array([str(r.get(n, again)) for r in recs]) for n in names]
            names.append(key)
            columns.append(pa.array([str(again)] * N))
            path = root / "annotations.parquet"
            pq.write_table(pa.Table.from_arrays(columns, names=names), path)
            shown = f"column {key!r} is named twice"
        elif fmt == "yaml":
            option = rng.choice(["k_nn", "batch_size", "seed"])
            spellings = rng.choice([(option, option), (option, option.replace("_", "-"))])
            path = root / "config.yaml"
            path.write_text(f"{spellings[0]}: 3\nindex: exact\n{spellings[1]}: 4\n")
            args += ["--config", path]
            shown = f"key {option!r} given twice" if spellings[0] == spellings[1] else \
                f"config keys {spellings[0]!r} and {spellings[1]!r} name one option"
            path, ann = root / "annotations.json", path
            path.write_bytes(dumps(recs))
            path = ann
        else:
            path = root / "00000.tar"
            with tarfile.open(path, "w") as tar:
                for i, r in enumerate(recs):
                    meta = _with_key_twice(record, key, again) if i == at else json.dumps(r)
                    for name, data in ((f"s{i}.png", png(i)), (f"s{i}.json", meta.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            shown = f"key {key!r} given twice"
            args = []
        if fmt not in ("yaml",):
            args = ["--annotations", path, *args]
        else:
            args = ["--annotations", root / "annotations.json", *args]
        check(capsys, f"twice-{fmt}", case, args, [str(path)], tmp_path)
        _, _, err = cli(capsys, *FAST, "--output-dir", tmp_path / "out", "--dry-run", *args)
        assert err.startswith(f"hnm: error: {path}") and shown in err, (case, err)
    report(f"twice-{fmt}")


SPELLINGS = [
    ("café", "cafe\u0301"),  # NFC and NFD
    ("Å", "A\u030a"), ("\u212b", "Å"),  # the angstrom sign's NFC is Å
    ("x1", " x1"), ("x1", "x1\t"), ("x1", "x1\u00a0"), ("x1", "\u3000x1\n"),
    ("한", "\u1112\u1161\u11ab"),  # a Hangul syllable and its jamo
]


@pytest.mark.parametrize("first,second", SPELLINGS)
def test_ids_one_reader_cannot_tell_apart_are_refused(capsys, tmp_path, root, first, second):
    """Ids that differ only in Unicode normalisation or surrounding blank space print the
    same and mean one record to whoever types them: before, two records (exit 0); now
    refused while planning, naming both records with the difference escaped. Ids that
    differ in case stay two ids: no output of hnm merges them."""
    for where in range(2):
        recs = records(N)
        a, b = (1, 4) if where == 0 else (3, 2)
        recs[a]["id"], recs[b]["id"] = first, second
        ann = root / "annotations.json"
        ann.write_bytes(dumps(recs, escaped=where == 0))
        rc, _, err = cli(capsys, *FAST, "--annotations", ann, "--image-dir", root,
                         "--blacklist", "", "--output-dir", tmp_path / "out", "--dry-run")
        lo, hi = sorted((a, b))
        x, y = (first, second) if a < b else (second, first)
        assert (rc, err) == (2, f"hnm: error: {ann}: ids {ascii(x)} and {ascii(y)}, which "
                                "differ only in Unicode normalisation or surrounding blank "
                                f"space, in records {lo} and {hi}\n"), err
        assert not (tmp_path / "out").exists()


def test_ids_that_differ_in_case_are_two_ids(capsys, tmp_path, root):
    recs = records(N)
    recs[1]["id"], recs[4]["id"] = "Café", "café"
    ann = root / "annotations.json"
    ann.write_bytes(dumps(recs))
    rc, _, err = cli(capsys, *FAST, "--annotations", ann, "--image-dir", root,
                     "--blacklist", "", "--output-dir", tmp_path / "out", "--dry-run")
    assert (rc, err) == (0, "")


# ---------------------------------------------------------------- values past the computation

def extreme_rows(rng: random.Random) -> np.ndarray:
    """Embeddings of a float dtype whose rows reach the ends of its range: huge, subnormal,
    mixed, negative; a few rows scaled so that their squares overflow or underflow."""
    dtype = np.dtype(rng.choice(["f2", "f4", "f8", ">f8", ">f4"]))
    info = np.finfo(dtype)
    arr = np.random.default_rng(rng.randrange(2**32)).standard_normal((N, 4))
    arr[arr == 0] = 1.0
    for _ in range(rng.randrange(0, 3)):
        row = rng.randrange(N)
        scale = rng.choice([float(info.max) / 4, float(info.tiny), float(info.tiny) / 8,
                            float(info.smallest_subnormal) if hasattr(info, "smallest_subnormal")
                            else float(info.tiny), 1e-160, 1e160, 1e154, 1e-154])
        arr[row] = arr[row] / np.abs(arr[row]).max() * scale
    with np.errstate(over="ignore"):  # a float16 row past its range: made its largest
        return np.nan_to_num(arr.astype(dtype), nan=1.0, posinf=float(info.max),
                             neginf=-float(info.max))


def test_normalisable_rows_are_those_finalize_snaps_to_finite_nonzero_rows():
    """The planning check's shortcut (a row's norm and largest component) against
    snapping every row (`grid.finalize`): the same rows, on generated extreme rows of every
    dtype and widths from 1 to 4,096 (where the grid is coarsest)."""
    from hnm.embed import normalisable
    from hnm.grid import finalize

    for case, rng in cases("normalisable", 200):
        arr = extreme_rows(rng)
        width = rng.choice([1, 2, 4, 4096])
        wide = np.repeat(arr, width // arr.shape[1] or 1, axis=1)[:, :width]
        if rng.random() < 0.3:  # one large component among tiny ones
            wide[:, 1:] *= rng.choice([1e-3, 1e-9, 1e-300])
        with np.errstate(all="ignore"):
            unit = finalize(wide)
        want = np.isfinite(unit).all(axis=1) & unit.any(axis=1)
        assert np.array_equal(normalisable(wide), want), case


@pytest.mark.parametrize("flag", ["--image-embeddings", "--text-embeddings"])
def test_embedding_rows_past_float64_are_refused(capsys, tmp_path, root, flag):
    """A row a float dtype holds but whose squares overflow float64 (1e300) or underflow to
    zero (1e-320) was normalised to all zeros or NaN and mined silently (exit 0); now it is
    refused while planning, naming the flag, file and row. The reference: the row's sum of
    squares in float64, which a row can be normalised by only when finite and positive."""
    ann = root / "annotations.json"
    ann.write_bytes(dumps(records(N)))
    for case, rng in cases(f"extreme{flag}", 10):
        arr = extreme_rows(rng)
        path = root / "emb.npy"
        np.save(path, arr)
        with np.errstate(all="ignore"):
            squares = (arr.astype(np.float64) ** 2).sum(axis=1)
        zero = ~arr.astype(bool).any(axis=1)
        bad = np.flatnonzero(~zero & ~(np.isfinite(squares) & (squares > 0)))
        outcome = check(capsys, f"extreme{flag}", case, [flag, path, "--annotations", ann,
                                                         "--image-dir", root], [flag], tmp_path)
        _, _, err = cli(capsys, *FAST, "--output-dir", tmp_path / "out", "--dry-run", flag,
                        path, "--annotations", ann, "--image-dir", root)
        if zero.any():
            assert "are all zeros" in err, (case, err)
        elif len(bad):
            assert outcome == "refused" and f"{path}: row {bad[0]} cannot be normalised" in err
        else:
            assert outcome == "ok", (case, err)
    report(f"extreme{flag}")


# ---------------------------------------------------------------- what the images were

@pytest.mark.parametrize("change", ["edited", "touched", "removed", "another", "moved"])
def test_images_of_a_precomputed_run_changed_before_export(capsys, tmp_path, root, change):
    """A run of precomputed image embeddings recorded nothing of its image files: an export
    after one was edited or removed wrote the new bytes, or none, with exit 0. Now the plan
    holds their fingerprint (path, size, mtime) as for every run, and the export is refused
    in one line, and so is the report (which shows them as gone only when every image is
    gone, tests/test_report.py); a file moved and reached through a link is the same
    image."""
    ann = root / "annotations.json"
    ann.write_bytes(dumps(records(N)))
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((N, 4)).astype("f4"))
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *FAST, "--annotations", ann, "--image-dir", root, "--blacklist",
                     "", "--image-embeddings", emb, "--output-dir", out, "--quiet")
    assert rc == 0, err
    rc, _, err = cli(capsys, "export", out, "--to", tmp_path / "before.parquet")
    assert (rc, err) == (0, "")
    image = root / "img/2.png"
    if change == "edited":
        image.write_bytes(png(40))
    elif change == "touched":
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    elif change == "removed":
        image.unlink()
    elif change == "another":  # a link to another image
        (tmp_path / "other.png").write_bytes(png(40))
        image.unlink()
        image.symlink_to(tmp_path / "other.png")
    else:  # the same file, moved and linked to: the same image, exported as it was
        image.rename(tmp_path / "moved.png")
        image.symlink_to(tmp_path / "moved.png")
        rc, _, err = cli(capsys, "export", out, "--to", tmp_path / "after.parquet")
        assert (rc, err) == (0, "")
        after = pq.read_table(tmp_path / "after.parquet")
        assert after.equals(pq.read_table(tmp_path / "before.parquet"))
        return
    rc, _, err = cli(capsys, "export", out, "--to", tmp_path / "after.parquet")
    what = f"{image} is gone" if change == "removed" else \
        "an image file was edited, replaced or added"
    assert (rc, err) == (2, f"hnm: error: --image-dir {root}: images changed since the run in"
                            f" {out} ({what}); rerun the mining command with --overwrite to "
                            "mine them again\n")
    assert not (tmp_path / "after.parquet").exists()
    before = snapshot(out)
    rc, _, report_err = cli(capsys, "report", out)  # it would show the new image as the run's
    assert (rc, report_err) == (2, err) and snapshot(out) == before
