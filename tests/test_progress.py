"""The terminal view: a live table on terminals, a line per event elsewhere, nothing if quiet."""

from __future__ import annotations

import io

from rich.console import Console

from hnm.progress import ProgressView, choose_mode

SHARDS = [{"shard": 0, "device": "cuda:0"}, {"shard": 1, "device": "cuda:1"}]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_quiet():
    assert choose_mode(False, Tty()) == "live"
    assert choose_mode(False, io.StringIO()) == "plain"
    assert choose_mode(True, Tty()) == "quiet"


def render(view: ProgressView) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(view._table())
    return console.export_text()


def test_live_table_has_a_row_per_shard_and_a_total():
    view = ProgressView(SHARDS, "live", nvml={})
    view.started(0, "embed", "cuda:0")
    view.progress(0, "embed", 30, 100)
    view.started(1, "candidates", "cuda:1")
    view.progress(1, "candidates", 50, 50)
    view.finished(1, "candidates")
    view.failed(0, "embed", "worker exited with code -9", retrying=True)
    text = render(view)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "cuda:0" in lines["0"] and "retry" in lines["0"] and "30/100" in lines["0"]
    assert "done" in lines["1"] and "50/50" in lines["1"]
    assert "80/150" in lines["total"]


def test_a_live_table_of_many_shards_shows_those_at_work_and_counts_the_others():
    view = ProgressView([{"shard": s, "device": "cpu"} for s in range(40)], "live")
    for s in range(3):
        view.started(s, "candidates", "cpu")
        view.progress(s, "candidates", 10, 10)
        view.finished(s, "candidates")
    view.started(3, "candidates", "cpu")
    view.progress(3, "candidates", 4, 10)
    view.started(4, "embed", "cpu")
    text = render(view)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert {"3", "4", "others", "total"} <= set(lines) and "0" not in lines and "5" not in lines
    assert "35 waiting, 3 done" in lines["others"]
    assert "34/40" in lines["total"]
    assert "others" not in render(ProgressView(SHARDS, "live"))


def test_plain_mode_prints_a_line_per_event(capsys):
    view = ProgressView(SHARDS, "plain")
    view.started(0, "embed", "cuda:0")
    view.progress(0, "embed", 10, 20)
    view.finished(0, "embed")
    view.failed(1, "candidates", "boom", retrying=False)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "GPU 0 (shard 0) started embed"
    assert out[1].startswith("GPU 0 (shard 0) finished embed in ")
    assert out[2] == "GPU 1 (shard 1) failed in candidates: boom (giving up)"
    assert len(out) == 3


def test_quiet_mode_prints_nothing(capsys):
    view = ProgressView(SHARDS, "quiet")
    view.started(0, "embed", "cuda:0")
    view.finished(0, "embed")
    view.say("hello")
    assert capsys.readouterr().out == ""
