"""OUTPUT_DIR/report.html: self-contained, faithful to the run, and readable in a browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from synthetic import make_dataset, mine_args

from hnm import report
from hnm.cli import main
from hnm.config import Config
from hnm.lifecycle import load_run_config
from hnm.plan import read_plan
from hnm.report_charts import reuse_rows
from hnm.report_gallery import THUMB
from hnm.report_scan import BORDERLINE, FAILED, SAMPLE, SUSPECTS, scan_negatives
from hnm.storage import RunDir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run whose audit finds suspects and drops them, leaving anchors without."""
    root = tmp_path_factory.mktemp("report")
    paths = make_dataset(root / "data", n=260, seed=5)
    assert main(mine_args(paths, root / "run", "--audit-text-similarity", "0.35",
                          "--drop-suspect-negatives", "--min-visual-similarity", "0.7")) == 0
    return root / "run"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "negatives.jsonl").read_text().splitlines()]


def _section(page: str, title: str) -> str:
    """The HTML of one gallery section, up to the next heading."""
    start = page.index(f"<h3>{title}</h3>")
    return page[start:page.index("<h", start + 4)]


def test_report_is_written_before_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = report.write_report
    seen = []

    def spy(run: RunDir, *args):
        seen.append(run.metrics.exists())  # metrics.json, written last, marks the run done
        return real(run, *args)

    monkeypatch.setattr(report, "write_report", spy)
    paths = make_dataset(tmp_path / "data", n=60)
    assert main(mine_args(paths, tmp_path / "run")) == 0
    assert seen == [False]
    assert (tmp_path / "run/report.html").stat().st_size > 0


def test_report_is_self_contained(run: Path):
    page = (run / "report.html").read_text()
    assert not re.search(r"<script|<link|<iframe|@import|@font-face", page, re.I)
    # the only URL is SVG's namespace name, which is never fetched
    assert set(re.findall(r"https?://[^'\"\s)]+", page)) == {"http://www.w3.org/2000/svg"}
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    for s in set(sources):
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as img:
            assert max(img.size) <= THUMB
    assert len(sources) <= (SAMPLE + 2 * BORDERLINE + FAILED) * 2 + SUSPECTS * 2


def test_headline_and_plots_show_the_metrics(run: Path):
    page = (run / "report.html").read_text()
    g = json.loads((run / "metrics.json").read_text())["global"]
    assert f"<b>{g['success_rate'] * 100:.1f}%</b>" in page
    assert f"<b>{g['hard_negatives']} / {g['diverse_negatives']}</b>" in page
    assert f"<b>{g['hard_text_similarity']['mean']:.3f}</b>" in page
    # each histogram bar carries its count: they add up to the negatives of each kind
    text_plot = page[page.index("Text similarity to the anchor"):page.index("</svg>")]
    bars = re.findall(r"<title>(hard|diverse): (\d+)</title>", text_plot)
    assert sum(int(c) for k, c in bars if k == "hard") == g["hard_negatives"]
    assert sum(int(c) for k, c in bars if k == "diverse") == g["diverse_negatives"]
    for label in ("τ", "τ+0.09", "τ+0.18", "min visual", "audit"):
        assert f">{label}</text>" in page
    for step, count in g["hard_threshold_steps"].items():
        name = step if step == "fallback" else f"step {step}"
        assert re.search(rf">{name}</text>.*?>{count} \(", page)


def test_phrase_reuse_counts_agree_with_the_metrics(run: Path):
    config = load_run_config(RunDir(run))
    plan = read_plan(RunDir(run))
    scan = scan_negatives(RunDir(run), config, plan)
    g = json.loads((run / "metrics.json").read_text())["global"]
    assert sum(scan.reuse.values()) == g["distinct_negative_phrases"]
    assert sum(n * c for n, c in scan.reuse.items()) == g["negatives"]
    assert max(scan.reuse) == g["max_phrase_reuse"]


def test_gallery_shows_the_borderline_and_failed_anchors(run: Path):
    records = _records(run)
    hard = {i: [n for n in r["negatives"] if n["type"] == "hard"] for i, r in enumerate(records)}
    by_text = sorted((i for i in hard if hard[i]),
                     key=lambda i: (-max(n["text_similarity"] for n in hard[i]), i))
    by_visual = sorted((i for i in hard if hard[i]),
                       key=lambda i: (min(n["visual_similarity"] for n in hard[i]), i))
    failed = [i for i, r in enumerate(records) if not r["negatives"]]
    assert len(failed) > 2  # dropping suspects left some anchors without a negative
    page = (run / "report.html").read_text()
    sections = {"Borderline: highest text similarity": by_text[:BORDERLINE],
                "Borderline: lowest visual similarity": by_visual[:BORDERLINE],
                "Anchors without a negative": failed[:FAILED]}
    for title, rows in sections.items():
        shown = re.findall(r"<div class='item anchor'>.*?<div class='meta'>([^<]*)</div>",
                           _section(page, title))
        assert shown == [records[i]["id"] for i in rows], title
    sample = re.findall(r"<div class='item anchor'>.*?<div class='meta'>([^<]*)</div>",
                        _section(page, "Random sample"))
    assert len(sample) == SAMPLE == len(set(sample))


def test_suspects_most_alike_are_shown(run: Path):
    page = (run / "report.html").read_text()
    s = json.loads((run / "metrics.json").read_text())["global"]["suspect_negatives"]
    assert s["total"] > 0 and s["text_similarity"] > 0
    assert f"{s['total']} in all" in page
    listed = [json.loads(line) for line in (run / "suspects.jsonl").open()]
    for title, reason, key in (("Texts that say the same", "text", "text_similarity"),
                               ("Images that nearly duplicate", "visual", "visual_similarity")):
        ranked = sorted((x for x in listed if reason in x["reasons"]),
                        key=lambda x: -x["negative"][key])[:SUSPECTS // 2]
        section = page[page.index(f"<h3>{title}"):]
        section = section[:section.index("<h", 4)]
        shown = re.findall(r"<div class='item negative'>.*?<div class='meta'>([^<]*)</div>",
                           section)
        assert shown == [x["negative"]["id"] for x in ranked], title


def test_rendering_is_deterministic(run: Path, tmp_path: Path):
    first = (run / "report.html").read_text()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_text() == first


def test_missing_images_become_placeholders(tmp_path: Path):
    paths = make_dataset(tmp_path / "data", n=60, seed=6)
    assert main(mine_args(paths, tmp_path / "run")) == 0
    shutil.rmtree(tmp_path / "data/images")
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run/report.html").read_text()
    assert "<img " not in page and "image not shown" in page


def test_report_command_needs_a_finished_run(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a finished hnm run" in err and err.count("\n") == 1


def test_config_without_new_keys_still_loads(run: Path, tmp_path: Path):
    """A run directory from before the audit existed: its config.yaml lacks the keys."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    text = (old / "config.yaml").read_text()
    (old / "config.yaml").write_text(re.sub(r"(?m)^(audit_|drop_suspect).*\n", "", text))
    config = load_run_config(RunDir(old))
    assert config.audit_text_similarity == Config().audit_text_similarity
    assert config.output_dir == str(old)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package "
                    "`chromium`): the in-browser check of report.html is skipped")
@pytest.mark.slow
def test_report_renders_in_a_browser(run: Path, tmp_path: Path):
    """Chromium loads the page offline: every thumbnail decodes and every plot is drawn."""
    probe = ("<script>addEventListener('load', () => { const b = document.body.dataset;"
             " const imgs = [...document.images]; b.images = imgs.length;"
             " b.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
             " const plots = [...document.querySelectorAll('svg.plot')];"
             " b.plots = plots.length; b.drawn = plots.filter(s =>"
             " s.getBoundingClientRect().width > 100 && s.querySelector('rect, line')).length;"
             " b.cases = document.querySelectorAll('.case').length; });</script>")
    page = tmp_path / "probe.html"
    page.write_text((run / "report.html").read_text().replace("</body>", probe + "</body>"))
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    body = dict(re.findall(r'data-(\w+)="(\d+)"', re.search(r"<body[^>]*>", out).group(0)))
    source = (run / "report.html").read_text()
    assert int(body["images"]) == source.count("<img ") > 0
    assert body["decoded"] == body["images"]
    assert body["plots"] == body["drawn"] == str(source.count("<svg class='plot'")) != "0"
    assert int(body["cases"]) == source.count("<div class='case'>")


def test_phrase_reuse_bars_group_the_long_tail():
    reuse = Counter({1: 5, 2: 3, 11: 1, 12: 4, 30: 2})
    rows = reuse_rows(reuse)
    assert [label for label, _, _ in rows] == [f"{n}×" for n in range(1, 12)] + ["12+×"]
    assert [value for _, value, _ in rows] == [5, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 6]


@pytest.mark.parametrize("seed", range(8))
def test_anchor_positions_are_the_first_records_not_skipped(seed: int) -> None:
    """Computed from the skipped records (unsorted, repeated, out of range) as the list of
    every record not skipped, cut at num_anchors, gives them; `in` as that list's."""
    import random

    from hnm.report_scan import AnchorPositions

    rnd = random.Random(seed)
    n = rnd.choice([0, 1, 5, 40, 300])
    skipped = [rnd.randrange(-2, n + 3) for _ in range(rnd.randrange(0, n + 2))]
    anchors = rnd.choice([0, 1, n // 2, n, n + 5])
    gone = set(skipped)
    want = [p for p in range(n) if p not in gone][:anchors]
    got = AnchorPositions(n, skipped, anchors)
    assert len(got) == len(want)
    assert got.at(list(range(len(want)))).tolist() == want
    assert [p for p in range(-3, n + 4) if p in got] == want
