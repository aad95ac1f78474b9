"""`hnm sweep` gives exactly what reruns with other thresholds give, without embedding."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_dataset, mine_args
from test_engine import random_case

from hnm import sweep
from hnm.cli import main
from hnm.config import Config
from hnm.index import build_index
from hnm.kmeans import kmeans
from hnm.miner import Arrays, cut, eligible_phrases, hard_candidates, neighbours

# figures of the dataset rather than of the selection: a sweep does not recompute them
DATASET_KEYS = {"distinct_answers", "skipped_missing_image", "records", "candidates",
                "duplicate_images", "zero_embeddings",
                # work done, not a result: which diverse lists were computed ahead depends
                # on the run's own thresholds, the rest come from the exact wider search
                "diverse_widened_searches"}


def _global(run: Path) -> dict:
    g = json.loads((run / "metrics.json").read_text())["global"]
    return {k: v for k, v in g.items() if k not in DATASET_KEYS}


@pytest.mark.parametrize("extra", [
    (),
    ("--cpu-workers", "2", "--drop-suspect-negatives", "--audit-text-similarity", "0.3",
     "--sliding-window-size", "40"),
], ids=["one-shard", "two-shards-drop"])
def test_sweep_equals_reruns(tmp_path: Path, extra: tuple[str, ...]):
    paths = make_dataset(tmp_path / "data", n=200, seed=1)
    base = tmp_path / "base"
    assert main(mine_args(paths, base, *extra)) == 0
    if extra:  # the case reaches what it is there for: two shards, suspects dropped
        assert len(json.loads((base / "plan.json").read_text())["shards"]) == 2
        assert _global(base)["suspect_negatives"]["dropped"] > 0
    result = sweep.sweep(base, [0.15, 0.3, 0.45], [0.1, 0.3, 0.6])
    points = {(p["cosine_threshold"], p["min_visual_similarity"]): p["global"]
              for p in result["points"]}
    assert len(points) == 9
    assert {k: v for k, v in points[(0.3, 0.3)].items() if k not in DATASET_KEYS} == \
        _global(base)  # the run's own point
    for tau, mvs in ((0.45, 0.1), (0.15, 0.6)):
        rerun = tmp_path / f"rerun_{tau}_{mvs}"
        assert main(mine_args(paths, rerun, *extra, "--cosine-threshold", str(tau),
                              "--min-visual-similarity", str(mvs))) == 0
        assert points[(tau, mvs)] == _global(rerun)
    # the grid is worth testing only if its points differ
    assert len({json.dumps(g, sort_keys=True) for g in points.values()}) >= 6


def test_cut_lists_equal_a_direct_search():
    """Cutting the loosest neighbour lists down equals searching with each point's values,
    the fixed rules' counts included."""
    for seed in range(40):
        V, T, text_ids, groups, phrases, blacklist, config, n = random_case(seed)
        clusters, _ = kmeans(V, config.n_clusters, config.seed)
        eligible = eligible_phrases(T, phrases, blacklist, config.min_answer_length,
                                    config.blacklist_similarity)
        tab = Arrays(V, T, text_ids, groups, eligible[text_ids], clusters)
        index, anchors = build_index(V), np.arange(n)
        loose = neighbours(index, tab, anchors, config.k_nn, -1.0)
        for tau, mvs in ((0.6, -1.0), (0.1, 0.0), (-0.2, 0.5), (0.3, 0.9)):
            want = hard_candidates(index, tab, anchors, config.k_nn, mvs, tau)
            got = cut(loose, tau, mvs)
            assert np.array_equal(got.before, want.before)
            assert np.array_equal(got.fixed, want.fixed)
            for field in dataclasses.fields(want.lists):
                assert np.array_equal(getattr(got.lists, field.name),
                                      getattr(want.lists, field.name))


def templated(root: Path, n: int = 160, seed: int = 5) -> dict:
    """The synthetic dataset with templated captions: 8 of them, each used by many rows."""
    paths = make_dataset(root, n=n, seed=seed)
    rng = np.random.default_rng(seed)
    lines = Path(paths["annotations"]).read_text().splitlines()
    which = rng.integers(0, 8, len(lines))
    records = [{**json.loads(line), "text": f"there is a piece of scene number {k}"}
               for line, k in zip(lines, which.tolist())]
    Path(paths["annotations"]).write_text("".join(json.dumps(r) + "\n" for r in records))
    T = rng.normal(size=(8, 32))  # texts near orthogonal: below the threshold, fallback counts
    np.save(paths["text_embeddings"], (T / np.linalg.norm(T, axis=1, keepdims=True))[which])
    return paths


KNOBS = ("--fallback-phrase-reuse-limit", "--sliding-window-size", "--diverse-ratio")


def test_sweep_of_the_selection_knobs_equals_reruns(tmp_path: Path):
    """Fallback limits, window sizes and diverse ratios, answered from the saved lists."""
    paths = templated(tmp_path / "data")
    base = tmp_path / "base"
    assert main(mine_args(paths, base)) == 0
    assert _global(base)["failures"] > 20  # the captions run out: reasons to look at
    grid = {"fallback_phrase_reuse_limit": [1, 3, 6], "sliding_window_size": [6, 1000],
            "diverse_ratio": [0.3, 1.0]}
    result = sweep.sweep(base, **grid)
    assert result["cosine_thresholds"] == [0.3] and result["min_visual_similarities"] == [0.3]
    points = {(p["fallback_phrase_reuse_limit"], p["sliding_window_size"], p["diverse_ratio"]):
              p["global"] for p in result["points"]}
    assert len(points) == 12
    assert {k: v for k, v in points[(3, 1000, 0.3)].items() if k not in DATASET_KEYS} == \
        _global(base)
    for values in ((6, 1000, 1.0), (1, 6, 0.3)):
        rerun = tmp_path / "rerun_{}_{}_{}".format(*values)
        flags = [x for knob, v in zip(KNOBS, values) for x in (knob, str(v))]
        assert main(mine_args(paths, rerun, *flags)) == 0
        assert points[values] == _global(rerun)
    assert len({json.dumps(g, sort_keys=True) for g in points.values()}) >= 8
    reasons = {r for g in points.values() for r, c in g["failure_reasons"].items() if c}
    assert "phrase_cap" in reasons
    head, rows = sweep.rows_of(result)
    assert head[:5] == ["cosine threshold", "min visual sim", "fallback limit", "window size",
                        "diverse ratio"]
    assert "no negative: phrase caps" in head
    page = sweep.render_html(result)
    assert page.count("<table class='heat'>") == 2 * 2  # per figure: limit x window, by ratio


def test_default_grid_surrounds_the_run():
    assert sweep.default_grid(0.3) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert sweep.default_grid(0.95) == [0.75, 0.85, 0.95, 1.0]
    assert sweep.default_grid(-1.0) == [-1.0, -0.9, -0.8]


def test_sweep_embeds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = make_dataset(tmp_path / "data", n=80, seed=2)
    run = tmp_path / "run"
    # a real image encoder (no weights needed), so the run itself does embed images
    args = mine_args(paths, run)
    i = args.index("--image-embeddings")
    del args[i:i + 2]
    assert main([*args, "--visual-encoder", "pixels", "--num-workers", "0"]) == 0

    def no_model(*_args, **_kwargs):
        raise AssertionError("sweep must not embed anything")

    for module in ("hnm.encoders", "hnm.run.worker"):
        for name in ("build_image_encoder", "build_text_encoder"):
            monkeypatch.setattr(f"{module}.{name}", no_model)
    monkeypatch.setattr("hnm.embed.embed_texts", no_model)
    monkeypatch.setattr("hnm.embed.embed_images", no_model)
    result = sweep.sweep(run, [0.2, 0.5], [0.1])
    assert len(result["points"]) == 2


def test_sweep_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    paths = make_dataset(tmp_path / "data", n=80, seed=4)
    run = tmp_path / "run"
    assert main(mine_args(paths, run)) == 0
    capsys.readouterr()
    assert main(["sweep", str(run), "--cosine-thresholds", "0.2,0.3",
                 "--min-visual-similarities", "0.1,0.3,0.5"]) == 0
    out = capsys.readouterr().out
    assert "hnm sweep" in out and "6 points" in out
    saved = json.loads((run / "sweep.json").read_text())
    assert [(p["cosine_threshold"], p["min_visual_similarity"]) for p in saved["points"]] == \
        [(t, m) for t in (0.2, 0.3) for m in (0.1, 0.3, 0.5)]
    page = (run / "sweep.html").read_text()
    assert len(re.findall(r"<table class='heat'>", page)) == 2
    assert page.count("class='run'") == 2  # the run's own point, outlined in both maps
    rates = [f"{p['global']['success_rate']:.1%}" for p in saved["points"]]
    assert all(f">{r}</td>" in page for r in rates)


@pytest.mark.parametrize("argv, message", [
    (["--cosine-thresholds", "0.2,x"], "--cosine-thresholds: expected comma-separated"),
    (["--min-visual-similarities", "1.5"], "--min-visual-similarities: expected numbers "
                                           "within [-1, 1]"),
    (["--fallback-phrase-reuse-limits", "2,2.5"], "--fallback-phrase-reuse-limits: expected "
                                                  "comma-separated whole numbers"),
    (["--sliding-window-sizes", "0,10"], "--sliding-window-sizes: expected whole numbers of "
                                         "at least 1"),
    (["--diverse-ratios", "0.5,1.2"], "--diverse-ratios: expected numbers within [0, 1]"),
])
def test_sweep_rejects_bad_grids(tmp_path: Path, capsys, argv, message):
    assert main(["sweep", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sweep_needs_a_run_directory(tmp_path: Path, capsys):
    assert main(["sweep", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no finished tables phase" in err and err.count("\n") == 1


def test_sweep_of_a_run_interrupted_before_its_candidates(tmp_path: Path):
    """Without saved candidate lists everything is searched, with the same results."""
    paths = make_dataset(tmp_path / "data", n=120, seed=8)
    run = tmp_path / "run"
    assert main(mine_args(paths, run)) == 0
    grid = ([0.2, 0.3], [0.3, 0.5])  # within the run's values: the saved lists serve
    whole = sweep.sweep(run, *grid)
    looser = sweep.sweep(run, [0.2, 0.3, 0.5], [0.1, 0.3, 0.5])
    for marker in (run / "candidates").glob("done_*"):
        marker.unlink()
    assert sweep.sweep(run, *grid)["points"] == whole["points"]
    assert sweep.sweep(run, [0.2, 0.3, 0.5], [0.1, 0.3, 0.5])["points"] == looser["points"]


@pytest.fixture(scope="module")
def wide_sweep(tmp_path_factory) -> dict:
    """A sweep varying every knob, with anchors stopped by several reasons: more columns
    than 80 characters hold."""
    root = tmp_path_factory.mktemp("wide")
    paths = make_dataset(root / "data", n=80, seed=4)
    assert main(mine_args(paths, root / "run", "--min-answer-length", "30")) == 0
    c = Config()  # the run's own values, and one other each
    return sweep.sweep(root / "run", [c.cosine_threshold, 0.6], [c.min_visual_similarity, 0.7],
                       fallback_phrase_reuse_limit=[c.fallback_phrase_reuse_limit, 1],
                       sliding_window_size=[c.sliding_window_size, 5],
                       diverse_ratio=[c.diverse_ratio, 0.9])


def _printed(result: dict, width: int) -> list[str]:
    import io

    from rich.console import Console

    out = io.StringIO()
    sweep.print_table(result, Console(file=out, width=width))  # a pipe: no terminal
    return out.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 100, 400])
def test_the_sweep_table_fits_its_width_and_keeps_every_value(wide_sweep, width):
    """Printed to a pipe or a log at 80 columns (or any width): no line longer, no value
    cut, every point's every figure found in the row of its number, the run's own point
    marked with '*'."""
    lines = _printed(wide_sweep, width)
    assert max(map(len, lines)) <= width
    assert "…" not in "\n".join(lines)
    head, rows = sweep.rows_of(wide_sweep)
    # every knob, every figure and a failure reason: a wide grid
    assert len(head) == 13 and head[-1].startswith("no negative: ")
    names = sweep.shown_knobs(wide_sweep) + list(sweep.COLUMNS)
    found: dict[str, list[str]] = {}
    tables = [i for i, line in enumerate(lines) if line.startswith("hnm sweep: what a rerun")]
    for start in tables:
        rule = next(i for i in range(start, len(lines)) if lines[i].startswith("-----"))
        for line in lines[rule + 1:rule + 1 + len(rows)]:
            key, *cells = line.split()
            found[key] = found.get(key, []) + cells
    own = [sweep.is_run_point(wide_sweep, p) for p in wide_sweep["points"]]
    assert sum(own) == 1
    for i, (row, mine) in enumerate(zip(rows, own)):
        expected = [sweep._cell_text(names[k] if k < len(names) else "", v)
                    for k, v in enumerate(row)]
        assert found[f"{i + 1}{'*' if mine else ''}"] == expected
    assert (len(tables) > 1) == (width < 200)
    assert lines[-1].endswith("(*: the run's own values)")
