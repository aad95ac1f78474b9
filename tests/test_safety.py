"""The data-safety contract (README, "Data safety"): every write goes through hnm.safety,
never through a link, never outside its folder; a folder is an hnm run only by hnm's
signature; --overwrite deletes only the run's own files; an export never replaces an
input or anything in a run directory; the Python API raises only HnmError."""

from __future__ import annotations

import ast
import errno
import inspect
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from builders import REPO, cli, snapshot
from synthetic import make_dataset, mine_args

import hnm
from hnm.errors import HnmError
from hnm.placement import Placement
from hnm.plan import Plan
from hnm.rerun import Refuse, Resume, Start, Survey, decide
from hnm.storage import RunDir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("data"), n=40, seed=5)


def image_args(data: dict, out: Path, *extra: str) -> list[str]:
    """Images embedded by the run (pixels), so that the run fingerprints the image files."""
    args = mine_args(data, out, "--visual-encoder", "pixels", "--num-workers", "0", *extra)
    at = args.index("--image-embeddings")
    return args[:at] + args[at + 2:]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A finished run whose images were embedded from their files."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert hnm.cli.main(image_args(data, out, "--cpu-workers", "1", "--batch-size", "16")) == 0
    return out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hnm: "), err
    return lines[0]


# ---------------------------------------------------------------- every write, one module

# calls that write, move or delete files, by name (pathlib, numpy, tempfile, logging...)
WRITING = {"write_text", "write_bytes", "mkdir", "makedirs", "unlink", "rmdir", "rmtree",
           "touch", "save", "savez", "savez_compressed", "mkstemp", "mkdtemp",
           "TemporaryFile", "NamedTemporaryFile", "FileHandler", "open_memmap", "symlink",
           "hardlink_to", "symlink_to", "write_index", "to_parquet", "chmod", "tofile"}
# only as os.*, shutil.* or pq.* (str.replace, array.copy and a ParquetWriter's write_table
# into a handle are no file writes)
MODULE_WRITING = {"replace", "rename", "remove", "link", "truncate", "copy", "copy2",
                  "copyfile", "copytree", "move", "write_table"}
OPEN_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC")
# receivers that are hnm.safety areas (a RunDir is one)
AREAS = {"run", "area", "ctx.run", "self.area"}
# where a write may happen outside hnm.safety, and why
ALLOWED = {
    ("writers.py", "save_to_disk"): "the datasets package writes a Hugging Face dataset "
                                    "itself (demo and benchmarks, into a new folder)",
    ("tables.py", "write_index"): "faiss writes through a handle hnm.safety opened",
    ("writers.py", "write_table"): "pyarrow writes through a handle hnm.safety opened",
    ("cli.py", "open"): "/dev/null over stdout when the reader of a pipe left",
    ("demo_scene.py", "save"): "a PNG into an in-memory buffer",
    ("report_gallery.py", "save"): "a JPEG thumbnail into an in-memory buffer",
    ("readers/avdn.py", "save"): "an image tensor as a PNG into an in-memory buffer",
    ("pickles.py", "save"): "the pickler writing an object into the stream it was given",
}


def writes_outside_safety() -> list[str]:
    found = []
    for path in sorted((REPO / "hnm").rglob("*.py")):  # packages (hnm/run, ...) too
        module = path.relative_to(REPO / "hnm").as_posix()
        if module == "safety.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _writes(node, module) and \
                    (module, _name(node)) not in ALLOWED:
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)[:60]}")
    return found


def _name(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else \
        getattr(node.func, "id", "")


def _writes(node: ast.Call, module: str) -> bool:
    name = _name(node)
    owner = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else None
    if owner in AREAS or (module == "storage.py" and owner == "self"):
        return False
    if name == "open":
        if owner == "os":
            return any(flag in ast.unparse(node) for flag in OPEN_FLAGS)
        return owner is None and _write_mode(node)
    return name in WRITING or (owner in ("os", "shutil", "pq") and name in MODULE_WRITING)


def _write_mode(node: ast.Call) -> bool:
    mode = node.args[1] if len(node.args) > 1 else next(
        (k.value for k in node.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")


def test_no_write_bypasses_the_safety_module():
    assert writes_outside_safety() == []


@pytest.mark.parametrize(("code", "writes"), [
    ("os.replace(a, b)", True), ("open(p, 'w')", True), ("open(p, 'rb')", False),
    ("Path(p).write_text('')", True), ("p.unlink()", True), ("shutil.rmtree(p)", True),
    ("np.save(p, a)", True), ("os.open(p, os.O_WRONLY | os.O_CREAT)", True),
    ("os.open(p, os.O_RDONLY)", False), ("text.replace('a', 'b')", False),
    ("run.write_text(p, '')", False), ("tempfile.mkstemp()", True),
    ("pq.write_table(t, p)", True), ("writer.write_table(t)", False)])
def test_the_guard_sees_a_write(code, writes):
    assert _writes(ast.parse(code).body[0].value, "x.py") == writes


# ---------------------------------------------------------------- links, generated per name

def signed(tmp_path: Path, shards: int = 2) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.ensure_root()
    run.sign(run.layout(shards))
    return run


def write_one(run: RunDir, rel: str) -> None:
    """Write `rel` the way hnm writes a file of its kind."""
    path = run.root / rel
    if rel.endswith(".log"):
        import os
        os.close(run.append(path))
    elif rel.endswith(".npy"):
        with run.npy(path, (2, 3), np.float32) as array:
            array[:] = 1
    else:
        run.write_text(path, "hnm\n")


def layout_names() -> list[str]:
    return RunDir("x").layout(2)


@pytest.mark.parametrize("rel", layout_names())
def test_a_link_planted_at_any_run_file_is_refused(tmp_path, rel):
    run = signed(tmp_path)
    victim = tmp_path / "outside.txt"
    victim.write_text("precious")
    (run.root / rel).parent.mkdir(parents=True, exist_ok=True)
    (run.root / rel).symlink_to(victim)
    with pytest.raises(HnmError) as caught:
        write_one(run, rel)
    assert str(caught.value) == f"{run.root / rel}: is a symbolic link; hnm never writes " \
        "through a link (remove it, or choose another directory)"
    assert victim.read_text() == "precious" and (run.root / rel).is_symlink()


@pytest.mark.parametrize("folder", ["embeddings", "tables", "candidates", "logs"])
def test_a_linked_folder_is_refused(tmp_path, folder):
    run = signed(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (run.root / folder).symlink_to(outside, target_is_directory=True)
    for rel in (n for n in layout_names() if n.startswith(folder + "/")):
        with pytest.raises(HnmError, match=f"^{run.root / folder}: is a symbolic link"):
            write_one(run, rel)
    assert list(outside.iterdir()) == []


def test_writes_stay_inside_and_on_hnm_names(tmp_path):
    run = signed(tmp_path)
    for path, why in ((tmp_path / "x.json", "outside"), (run.root / "../x.json", "outside"),
                      (run.root / "notes.txt", "not a file hnm writes"),
                      (run.root / "embeddings/mine.npy", "not a file hnm writes")):
        with pytest.raises(HnmError, match=why):
            run.write_text(path, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_unsigned_folder_is_never_written(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")
    with pytest.raises(HnmError, match="not an hnm run directory"):
        run.write_text(run.config, "x")
    assert (tmp_path / "config.yaml").read_text() == "lr: 0.1\n"


def test_a_leftover_temporary_is_removed_and_a_user_dotfile_is_not(tmp_path):
    run = signed(tmp_path)
    (run.root / "embeddings").mkdir()
    left = run.root / "embeddings" / ".image_00000.npy.ab12.tmp"
    left.write_text("killed")
    mine = [run.root / ".notes.x.tmp", run.root / "embeddings" / ".mine.txt.ab12.tmp"]
    for path in mine:
        path.write_text("mine")
    assert run.remove_temporary() == 1
    assert not left.exists() and all(p.read_text() == "mine" for p in mine)


def test_a_planted_link_in_a_finished_run_is_refused_end_to_end(data, finished, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    victim = tmp_path / "victim.jsonl"
    victim.write_text("precious")
    (out / "negatives.jsonl").unlink()
    (out / "negatives.jsonl").symlink_to(victim)
    (out / "done.json").unlink()  # the results are written again
    rc, _, err = cli(capsys, *image_args(data, out))
    assert rc == 2
    assert one_line(err) == f"hnm: error: {out / 'negatives.jsonl'}: is a symbolic link; " \
        "hnm never writes through a link (remove it, or choose another directory)"
    assert victim.read_text() == "precious"
    # --overwrite deletes the run's own files: the link, never what it points to
    assert hnm.cli.main(image_args(data, out, "--k-nn", "7", "--overwrite")) == 0
    assert victim.read_text() == "precious" and not (out / "negatives.jsonl").is_symlink()


# ---------------------------------------------------------------- what is a run

LOOK_ALIKES = {
    "own config": {"config.yaml": "lr: 0.1\n", "embeddings/vectors.npy": "user data"},
    "own plan": {"plan.json": '{"version": 3, "shards": []}', "metrics.json": "{}"},
    "plan and config": {"plan.json": "{}", "config.yaml": "a: 1\n"},
    "results": {"negatives.jsonl": "{}\n", "done.json": "{}"},
    "forged signature": {".hnm-run.json": '{"format": "mine", "version": 1, "files": []}',
                         "config.yaml": "x: 1\n"},
    "damaged signature": {".hnm-run.json": "{", "tables/visual.npy": "x"},
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", LOOK_ALIKES)
def test_a_look_alike_folder_is_not_a_run(data, tmp_path, capsys, case, overwrite):
    out = tmp_path / "mine"
    for rel, text in LOOK_ALIKES[case].items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    before = snapshot(out)
    flags = ("--overwrite",) if overwrite else ()
    rc, _, err = cli(capsys, *mine_args(data, out, *flags))
    line = one_line(err)
    assert rc == 2 and line.startswith(f"hnm: error: --output-dir {out}: exists and is not "
                                       "an hnm run directory (it holds ")
    assert line.endswith("; choose another directory") and "--overwrite" not in line
    assert snapshot(out) == before


def test_overwrite_deletes_only_the_runs_own_files(data, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    mine = {"notes.txt": "a", "embeddings/notes.txt": "b", "tables/mine.npy": "c",
            "candidates/shard_00099.npz": "d", "embeddings/image_00007.npy": "e",
            "logs/mine.log": "f", "index/mine.txt": "g"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    # another embedding model: nothing of the earlier run is kept
    assert hnm.cli.main(image_args(data, out, "--batch-size", "8", "--overwrite",
                                   "--image-embeddings", data["image_embeddings"])) == 0
    assert {rel: (out / rel).read_text() for rel in mine} == mine
    assert json.loads((out / "plan.json").read_text())["batch_size"] == 8


# ---------------------------------------------------------------- rerun decisions

PLAN = Plan(version=4, run_key="r1", embed_key="e1", num_rows=1, num_anchors=1,
            num_phrases=1, num_records=1, skipped=(), batch_size=1, workdir="/",
            text_batch_size=1, shards=(), placement=Placement())
KEYS = {"run_key": "r1", "embed_key": "e1"}
OTHER = {"run_key": "r2", "embed_key": "e1"}
NEW_EMBED = {"run_key": "r2", "embed_key": "e2"}
RUN = ("config.yaml", "plan.json")
DECISIONS = [  # survey, keys, overwrite -> the decision
    (Survey(), KEYS, False, Start()),
    (Survey(holds=("a",)), KEYS, True, Refuse("not an hnm run")),
    (Survey(holds=("a",)), None, False, Refuse("not an hnm run")),
    (Survey(RUN, RUN, PLAN, None, True, True), KEYS, False, Resume(PLAN)),
    (Survey(RUN, RUN, PLAN, None, True, True), KEYS, True, Resume(PLAN)),
    (Survey(RUN, RUN, PLAN, None, True, True), OTHER, False, Refuse("different config")),
    (Survey(RUN, RUN, PLAN, None, True, True), OTHER, True, Start(RUN, PLAN)),
    (Survey(RUN, RUN, PLAN, None, True, True), NEW_EMBED, True, Start(RUN, None)),
    (Survey(RUN, RUN, None, "plan.json: damaged; rerun with --overwrite", True, True), None, False,
     Refuse("damaged")),
    (Survey(RUN, RUN, None, "plan.json: damaged", True, True), KEYS, True, Start(RUN, None)),
    (Survey(RUN, RUN, None, None, False, True), KEYS, False, Refuse("without its plan.json")),
    (Survey(RUN, RUN, None, None, False, True), KEYS, True, Start(RUN, None)),
    (Survey((".hnm-run.json",), (), None, None, False, False), KEYS, False, Start()),
    (Survey(RUN, RUN, PLAN, None, True, True), None, False, None),
]


@pytest.mark.parametrize(("survey", "keys", "overwrite", "expected"), DECISIONS)
def test_what_a_rerun_does(survey, keys, overwrite, expected):
    got = decide(survey, keys, overwrite, "OUT")
    if isinstance(expected, Refuse):
        assert isinstance(got, Refuse) and expected.message in got.message, got
        assert ("--overwrite" in got.message) == (survey.manifest is not None)
    else:
        assert got == expected


# ---------------------------------------------------------------- export

@pytest.fixture
def run(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def export(capsys, run: Path, to: Path, *flags: str) -> tuple[int, str]:
    rc, _, err = cli(capsys, "export", run, "--to", to, *flags)
    return rc, err


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_export_replaces_an_existing_file_only_with_overwrite(capsys, run, tmp_path, suffix):
    to = tmp_path / f"rows{suffix}"
    to.write_text("mine")
    (tmp_path / f".rows{suffix}.dead.tmp").write_text("left by a kill")
    rc, err = export(capsys, run, to)
    assert rc == 2 and one_line(err) == f"hnm: error: --to {to}: exists; pass --overwrite " \
        "to replace it"
    assert to.read_text() == "mine"
    rc, err = export(capsys, run, to, "--overwrite")
    assert rc == 0, err
    assert to.read_bytes() != b"mine" and not list(tmp_path.glob(".rows*.tmp"))


def test_export_never_replaces_an_input_or_a_run_file(capsys, data, run, finished, tmp_path):
    image = sorted((Path(data["image_dir"]) / "images").iterdir())[0]
    cases = {
        Path(data["annotations"]): "is an input of the run",
        Path(data["text_embeddings"]): "is an input of the run",
        image: "is an input of the run",
        Path(data["image_dir"]): "holds an input of the run",
        finished / "negatives.jsonl": f"inside the hnm run directory {finished}",
        run / "x.parquet": f"inside the hnm run directory {run}",
        run / "logs" / "rows": f"inside the hnm run directory {run}",
    }
    before = snapshot(Path(data["annotations"]).parent), snapshot(finished)
    for to, why in cases.items():
        for flags in ((), ("--overwrite",)):
            rc, err = export(capsys, run, to, *flags)
            assert rc == 2 and why in one_line(err), (to, err)
    assert (snapshot(Path(data["annotations"]).parent), snapshot(finished)) == before


def test_export_refuses_a_link_and_a_foreign_folder(capsys, run, tmp_path):
    victim = tmp_path / "victim.parquet"
    victim.write_text("precious")
    link = tmp_path / "link.parquet"
    link.symlink_to(victim)
    rc, err = export(capsys, run, link, "--overwrite")
    assert rc == 2 and "is a symbolic link" in one_line(err)
    for names in (("00000.tar", "holiday.jpg"), ("00000.tar", "00001.tar")):
        folder = tmp_path / "-".join(names)  # a look-alike of an export is not one
        folder.mkdir()
        for name in names:
            (folder / name).write_text("x")
        before = snapshot(folder)
        rc, err = export(capsys, run, folder, "--overwrite")
        assert rc == 2 and one_line(err) == (
            f"hnm: error: --to {folder}: exists and is not an empty folder or an earlier hnm "
            "export (one carries .hnm-export.json and nothing else): choose another --to")
        assert snapshot(folder) == before
    assert victim.read_text() == "precious"


def test_export_replaces_an_earlier_folder_export_with_overwrite(capsys, run, tmp_path):
    folder = tmp_path / "shards"
    assert export(capsys, run, folder)[0] == 0
    first = (folder / "00000.tar").read_bytes()
    rc, err = export(capsys, run, folder)
    assert rc == 2 and "holds an earlier export; pass --overwrite" in one_line(err)
    assert export(capsys, run, folder, "--overwrite")[0] == 0
    assert (folder / "00000.tar").read_bytes() == first


@pytest.mark.parametrize("change", ["edited", "vanished"])
def test_export_and_report_refuse_changed_images(capsys, data, tmp_path, change):
    images = tmp_path / "images"
    shutil.copytree(data["image_dir"], images)
    out = tmp_path / "run"
    assert hnm.cli.main(image_args({**data, "image_dir": str(images)}, out)) == 0
    image = sorted((images / "images").iterdir())[3]
    if change == "edited":
        image.write_bytes(image.read_bytes() + b"\0")
    else:
        image.unlink()
    for command in (["export", out, "--to", tmp_path / "t.parquet"], ["report", out]):
        rc, _, err = cli(capsys, *command)
        line = one_line(err)
        assert rc == 2 and f"images changed since the run in {out}" in line, line
        assert change != "vanished" or f"{image} is gone" in line
    assert not (tmp_path / "t.parquet").exists()


# ---------------------------------------------------------------- the Python API

def public_calls(run: hnm.Run) -> dict:
    return {"mine": hnm.mine, "load_run": hnm.load_run, "records": run.records,
            "suspects": run.suspects, "export": run.export}


WRONG = [123, 4.5, b"bytes", ["list"], object()]


def test_every_public_function_is_guarded(finished):
    run = hnm.load_run(finished)
    for name, fn in public_calls(run).items():
        assert hasattr(fn, "__wrapped__"), name  # hnm.api.boundary
    assert set(hnm.__all__) == {"HnmError", "Run", "load_run", "mine"}


@pytest.mark.parametrize("value", WRONG, ids=lambda v: type(v).__name__)
def test_wrong_argument_types_raise_hnm_error(finished, tmp_path, value):
    run = hnm.load_run(finished)
    for name, fn in public_calls(run).items():
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for param in params:
            args = {p.name: str(tmp_path / "x.parquet") for p in params
                    if p.default is inspect.Parameter.empty}
            with pytest.raises(HnmError, match=rf"^{name}\(\): {param.name} must be "):
                result = fn(**{**args, param.name: value})
                list(result) if name in ("records", "suspects") else None
    with pytest.raises(HnmError, match="^fields: must be a mapping"):
        hnm.mine(output_dir=str(tmp_path / "o"), fields=5)
    with pytest.raises(HnmError, match=r"^load_run\(\): "):
        hnm.load_run()
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "o").exists()


DAMAGE = {
    "negatives cut short": lambda r: (r / "negatives.jsonl").write_bytes(
        (r / "negatives.jsonl").read_bytes()[:-30]),
    "negatives edited": lambda r: (r / "negatives.jsonl").write_bytes(
        (r / "negatives.jsonl").read_bytes().replace(b'"', b"'", 1)),
    "no done.json": lambda r: (r / "done.json").unlink(),
    "done.json garbage": lambda r: (r / "done.json").write_text("["),
    "metrics garbage": lambda r: (r / "metrics.json").write_text("{"),
    "no suspects": lambda r: (r / "suspects.jsonl").unlink(),
    "config garbage": lambda r: (r / "config.yaml").write_text("k_nn: [\n"),
    "config not a mapping": lambda r: (r / "config.yaml").write_text("- 1\n"),
    "plan garbage": lambda r: (r / "plan.json").write_text("{"),
    "no plan": lambda r: (r / "plan.json").unlink(),
    "no metrics": lambda r: (r / "metrics.json").unlink(),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_run_raises_hnm_error_with_the_cli_line(capsys, run, tmp_path, case):
    DAMAGE[case](run)
    with pytest.raises(HnmError) as caught:
        opened = hnm.load_run(run)
        list(opened.records()), list(opened.suspects())
    message = str(caught.value)
    assert "\n" not in message and not message.startswith("internal error"), message
    rc, err = export(capsys, run, tmp_path / "t.parquet")
    assert rc == 2 and one_line(err) == f"hnm: error: {message}"


# ---------------------------------------------------------------- the last guard

def test_a_bug_before_the_run_directory_exists_names_where_its_details_went(
        data, tmp_path, capsys, monkeypatch):
    def broken(*_a, **_k):
        raise KeyError("boom")

    monkeypatch.setattr("hnm.lifecycle.validate_inputs", broken)
    out = tmp_path / "new"
    rc, _, err = cli(capsys, *mine_args(data, out))
    line = one_line(err)
    assert rc == 1 and line.startswith("hnm: internal error: KeyError: 'boom' — details in ")
    details = Path(line.rsplit(" — details in ", 1)[1])
    assert details.parent == Path(tempfile.gettempdir())
    assert "Traceback" in details.read_text() and "KeyError: 'boom'" in details.read_text()
    details.unlink()
    assert not out.exists()


def test_a_run_from_before_signatures_is_adopted(data, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / ".hnm-run.json").unlink()
    rc, stdout, err = cli(capsys, *image_args(data, out, "--no-quiet"))
    assert rc == 0 and "Nothing to do" in stdout, err
    assert RunDir(out).manifest() == RunDir(out).layout(1)


def test_suspects_of_a_run_without_them_is_one_line(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    run = hnm.load_run(out)
    (out / "suspects.jsonl").unlink()
    with pytest.raises(HnmError, match=r"suspects.jsonl: cannot be read \(No such file"):
        list(run.suspects())


def test_export_creates_the_folders_of_a_new_target_after_its_checks(capsys, run, tmp_path):
    to = tmp_path / "new" / "deeper" / "rows.jsonl"
    assert export(capsys, run, to) == (0, "")
    assert len(to.read_text().splitlines()) > 0
    rc, err = export(capsys, run, tmp_path / "other" / "rows.jsonl", "--format", "nope")
    assert rc == 2 and not (tmp_path / "other").exists()


@contextmanager
def second_name(folder: Path, where: Path, how: str) -> Iterator[Path]:
    """Another name for `folder`: a symbolic link to it, or a bind mount of it (as root)."""
    alias = where / f"alias-{how}"
    if how == "symlink":
        alias.symlink_to(folder, target_is_directory=True)
        yield alias
        return
    alias.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(folder), str(alias)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a bind mount needs root and mount(8)")
    try:
        yield alias
    finally:
        subprocess.run(["umount", str(alias)], check=True)


@pytest.mark.parametrize("how", ["symlink", "bind"])
def test_export_knows_an_input_by_any_name(capsys, data, run, tmp_path, how):
    root = Path(data["annotations"]).parent
    before = snapshot(root)
    with second_name(root, tmp_path, how) as alias:
        cases = {alias / "annotations.jsonl": "is", alias / "text_embeddings.npy": "is",
                 alias / "images": "holds"}
        if how == "bind":  # (a link itself is refused as a link)
            cases[alias] = "holds"
        for to, how_much in cases.items():
            for flags in ((), ("--overwrite",)):
                rc, err = export(capsys, run, to, *flags)
                assert rc == 2 and one_line(err).startswith(
                    f"hnm: error: --to {to}: {how_much} an input of the run ("), (to, err)
        assert snapshot(root) == before


@pytest.mark.parametrize("how", ["symlink", "bind"])
def test_mine_never_replaces_an_input_in_its_output_dir(capsys, data, run, tmp_path, how):
    """A finished run's negatives.jsonl (or embeddings) given as the input of a new run into
    the same directory, under another name: --overwrite refuses before writing anything."""
    shutil.copy(data["text_embeddings"], run / "embeddings/text_00000.npy")  # the user's
    before = snapshot(run)
    with second_name(run, tmp_path, how) as alias:
        for flag, name in (("--annotations", "negatives.jsonl"),
                           ("--text-embeddings", "embeddings/text_00000.npy")):
            args = image_args(data, alias, "--overwrite", "--n-clusters", "4")
            args[args.index(flag) + 1] = str(alias / name)
            rc, _, err = cli(capsys, *args)
            assert rc == 2 and one_line(err) == (
                f"hnm: error: --output-dir {alias}: {name} there is an input of this run "
                f"({alias / name}); hnm never deletes or replaces an input: choose another "
                "directory"), err
    assert snapshot(run) == before


@contextmanager
def failing_write(monkeypatch, name: str) -> Iterator[None]:
    """Writing the file `name` fails as a full disk does (when it is flushed to disk)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        yield


@pytest.mark.parametrize("kind", ["triplets", "pairs"])
def test_a_folder_export_that_fails_on_its_last_shard_leaves_the_target_as_it_was(
        capsys, run, tmp_path, monkeypatch, kind):
    monkeypatch.setattr("hnm.export.PER_SHARD", 25)
    assert export(capsys, run, tmp_path / "count", "--format", kind)[0] == 0
    shards = sorted(n for n in os.listdir(tmp_path / "count") if n.endswith(".tar"))
    assert len(shards) > 1
    to = tmp_path / "shards"
    for flags in ((), ("--overwrite",)):  # a new target; a complete earlier export
        before = snapshot(tmp_path)
        with failing_write(monkeypatch, shards[-1]):
            rc, err = export(capsys, run, to, "--format", kind, *flags)
        assert rc == 2 and one_line(err).endswith(
            f"/{shards[-1]}: cannot write: No space left on device"), err
        assert snapshot(tmp_path) == before  # no shard, no staging folder left
        assert export(capsys, run, to, "--format", kind, *flags)[0] == 0
        assert {name: data for name, (data, _) in snapshot(to).items()} == {
            name: data for name, (data, _) in snapshot(tmp_path / "count").items()}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_file_export_that_fails_leaves_the_earlier_one(capsys, run, tmp_path, monkeypatch,
                                                         suffix):
    to = tmp_path / f"rows{suffix}"
    assert export(capsys, run, to)[0] == 0
    before = snapshot(tmp_path)
    with failing_write(monkeypatch, to.name):
        rc, err = export(capsys, run, to, "--format", "pairs", "--overwrite")
    assert (rc, one_line(err)) == (2, f"hnm: error: {to}: cannot write: No space left on "
                                      "device")
    assert snapshot(tmp_path) == before
