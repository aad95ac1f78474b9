"""The capacity planner (`hnm plan`, hnm/capacity.py): its figures against layouts computed
by hand, its monotonicity, its lines, the command line, README's table."""

from __future__ import annotations

import json
import runpy
from dataclasses import replace
from pathlib import Path

import pytest
from builders import cli
from synthetic import make_dataset, mine_args

from hnm import capacity
from hnm.capacity import Shape, estimate
from hnm.capacity_text import lines, to_json

REPO = Path(__file__).absolute().parents[1]
MIB = 2**20
SMALL = Shape(rows=1000, image_dim=512, text_dim=384)


def phase(est: capacity.Estimate, name: str, process: str = "worker") -> capacity.Process:
    return next(p for p in est.processes if p.phase == name and p.process == process)


def test_a_small_case_against_the_layouts_computed_by_hand():
    exact, ivf, pq, sq = (estimate(SMALL, kind, 1) for kind in ("exact", "ivf", "ivfpq",
                                                                "ivfsq"))
    # a flat index of 1000 x 512 float32 is 2,048,000 bytes, FAISS's copy private to the
    # worker on CPU; IVF lists hold 1000 x (512 x 4 + 8) bytes and 32 centroids (ivf_shape:
    # about sqrt(1000) lists, a power of two) of 512 x 4; PQ 64 bytes a row (512 / 8) and
    # its codebooks 256 x 512 x 4; SQ8 512 bytes a row and two 512-float ranges. An IVF
    # search keeps each of its 1000 anchors' best rows of each of the 8 lists it probes.
    assert phase(exact, "candidates").private - phase(ivf, "candidates").private == \
        2_048_000 - 1000 * 8 * capacity.IVF_PROBE_BYTES
    assert ivf.disk["index"] == 1000 * 2056 + 32 * 2048 == 2_121_536
    assert pq.disk["index"] == 1000 * 72 + 32 * 2048 + 256 * 2048 == 661_824
    assert sq.disk["index"] == 1000 * 520 + 32 * 2048 + 2 * 2048 == 589_632
    assert exact.disk["index"] == 0
    # FAISS splits d evenly: the largest divisor of d not above d / 8
    assert capacity.code_bytes("ivfpq", 500) == 50 + 8
    assert capacity.code_bytes("ivfpq", 768) == 96 + 8
    # an IVF index is memory-mapped from its file: in "mapped", not private
    assert phase(ivf, "candidates").mapped - phase(exact, "candidates").mapped == 2_121_536
    # 500 distinct texts (half the rows) of 384 float32, 1000 images of 512
    assert exact.disk["embeddings"] == 1000 * 512 * 4 + 500 * 384 * 4 == 2_816_000
    # tables: the same two tables, a k-means label per row (int64), an eligible flag per
    # phrase, 30 centroids
    assert exact.disk["tables"] == 2_816_000 + 1000 * 8 + 500 + 30 * 512 * 4
    # candidate lists per anchor: k_nn 30 hard rows of 24 bytes (row, two float64 scores)
    # and 16 (what the fixed rules removed before each: 4 x int32), 64 diverse of 24, two
    # int64 offsets, a flag and 5 int32 counts
    assert exact.disk["candidates"] == 1000 * (30 * 40 + 64 * 24 + 16 + 1 + 20) == 2_773_000
    # the corpus store: a record of 300 bytes with its id and image again and 4 Arrow
    # offsets, the numeric columns; 500 distinct phrases with their offsets
    assert exact.disk["corpus store"] == 1000 * (300 + capacity.STORE_EXTRA_BYTES + 4 * 4
                                                 + capacity.COLUMN_BYTES) \
        + 500 * (capacity.PHRASE_BYTES + 4)


def test_gpu_memory_of_the_index_part_as_sizing_counts_it():
    gpus = replace(SMALL, gpus_per_rank=1, encoders=False)
    # an exact index at FAISS's build peak, twice the table, in each part
    assert phase(estimate(gpus, "exact", 1), "candidates").gpu == 4_096_000
    assert phase(estimate(gpus, "exact", 2), "candidates").gpu == 2_048_000
    # IVF lists copied a list at a time: no build peak; compressed codes searched on the host
    assert phase(estimate(gpus, "ivf", 1), "candidates").gpu == 2_121_536
    assert phase(estimate(gpus, "ivfpq", 1), "candidates").gpu == 0
    assert phase(estimate(gpus, "exact", 1), "embed").gpu == 0  # precomputed: no encoders
    assert phase(estimate(replace(gpus, encoders=True), "exact", 1), "embed").gpu == \
        capacity.ENCODER_BYTES + 64 * capacity.GPU_IMAGE_BYTES


def test_an_embed_worker_on_precomputed_embeddings():
    shape = replace(SMALL, encoders=False, gpus_per_rank=1)
    embed = phase(estimate(shape, "exact", 1), "embed")
    # no torch, no encoders, no data loading: the process and a float64 block of 8,192
    # rows with two temporaries; the shard's embeddings are written block by block
    assert embed.private == capacity.BARE_PROCESS_BYTES + 8192 * 512 * 8 * 3
    assert [p.process for p in estimate(shape, "exact", 1).processes if p.phase == "embed"] \
        == ["worker"]


def test_the_reduce_holds_one_window_and_the_selection_state():
    shape = replace(SMALL, ranks=2, cpu_workers=2)
    reduce = phase(estimate(shape, "ivf", 1), "reduce", "launcher")
    # a window's lists in memory, here a shard's 250 anchors (fewer than a window): k_nn
    # 30 + 64 diverse + 2 x 16 margins, 24 bytes each
    assert reduce.private == capacity.LAUNCHER_BYTES \
        + capacity.REDUCE_LIST_COPIES * 250 * (30 + 64 + 32) * 24 \
        + 1000 * (capacity.FREE_ROW_BYTES + capacity.ANCHOR_STATE_BYTES) \
        + 500 * capacity.PHRASE_STATE_BYTES \
        + capacity.ROW_GROUP_ROWS * (300 + capacity.NEGATIVE_BYTES)
    # the per-row and per-phrase selection state in scratch files: mapped, not private
    plan = phase(estimate(shape, "ivf", 1), "plan", "launcher")
    assert reduce.mapped - plan.mapped > 1000 * capacity.SCRATCH_ROW_BYTES \
        + 500 * capacity.SCRATCH_PHRASE_BYTES
    assert plan.mapped == 1000 * capacity.PLAN_ROW_BYTES + 500 * capacity.PLAN_PHRASE_BYTES


def test_more_parts_ranks_and_compressed_codes_need_less():
    big = Shape(rows=10_000_000, image_dim=768, text_dim=384, gpus_per_rank=4)
    for kind in ("exact", "ivf"):
        cands = [phase(estimate(big, kind, p), "candidates") for p in (1, 2, 8, 64)]
        assert all(a.gpu > b.gpu for a, b in zip(cands, cands[1:]))
    for kind in ("ivf", "ivfpq", "ivfsq"):  # each worker maps one part's lists
        cands = [phase(estimate(big, kind, p), "candidates") for p in (1, 2, 8, 64)]
        assert all(a.mapped > b.mapped for a, b in zip(cands, cands[1:]))
    cpu = replace(big, gpus_per_rank=0, cpu_workers=4)
    # one exact part is FAISS's copy of the table; several are searched where they lie
    cands = [phase(estimate(cpu, "exact", p), "candidates").private for p in (1, 2, 8, 64)]
    assert cands[0] - cands[1] == 10_000_000 * 768 * 4 and len(set(cands[1:])) == 1
    tables = [phase(estimate(cpu, "ivf", p), "tables").private for p in (1, 4, 16)]
    assert tables == sorted(tables, reverse=True)
    # shards of at most --shard-rows rows, each searched a block of anchors at a time: a
    # worker's memory is the same on 1, 2 or 4 machines and at 10 or 30 million rows, and
    # with smaller shards (a block's lists, not a shard's)
    for name in ("embed", "candidates"):
        shares = [phase(estimate(replace(big, rows=n, ranks=r), "ivf", 1), name).private
                  for n in (10_000_000, 30_000_000) for r in (1, 2, 4)]
        assert max(shares) / min(shares) < 1.02  # shards differ by the rounding of N / shards
    small = replace(big, config=replace(big.config, shard_rows=1 << 16))
    assert phase(estimate(small, "ivf", 1), "candidates").private \
        == phase(estimate(big, "ivf", 1), "candidates").private
    disk = [estimate(big, kind, 1).disk["index"] for kind in ("ivf", "ivfsq", "ivfpq")]
    assert disk == sorted(disk, reverse=True)
    gpu = [phase(estimate(big, kind, 1), "candidates").gpu for kind in ("ivf", "ivfsq",
                                                                        "ivfpq")]
    assert gpu == sorted(gpu, reverse=True)


def test_what_does_not_fit_and_what_would():
    shape = replace(SMALL, gpus_per_rank=1, encoders=False, index="exact",
                    host_memory=2.0**40, gpu_memory=2 * MIB)
    plain, packed = capacity.plan(shape)
    assert plain.problems == [
        "does not fit: the candidates phase needs 3.9 MiB per GPU (the index part at its "
        "build peak, twice the table), more than 80% of --gpu-memory 2.0 MiB"]
    assert packed.problems == []
    assert capacity.remedies(shape, plain) == [
        "would fit: --parts 4 (each worker holds 1/4 of the index)",
        "would fit: --index ivfpq (compressed codes, rescored exactly from the mapped table)",
        "would fit: --gpu-memory 1G"]
    assert capacity.fewest_parts(shape, "exact") == 4
    assert capacity.plan(replace(shape, parts=None))[0].parts == 4  # --parts auto


def test_a_machine_too_small_names_the_phase_and_the_memory_that_would_do():
    shape = replace(SMALL, cpu_workers=4, host_memory=512 * MIB)
    est = capacity.plan(shape)[0]
    embed = phase(est, "embed")
    # machine 0 in the embed phase: four workers beside the launcher
    assert est.machine == 4 * embed.private + capacity.LAUNCHER_BYTES
    assert est.problems == [
        f"does not fit: a machine holds {capacity.amount(est.machine)} of private memory at "
        f"once (the embed phase: 4 worker(s) of {capacity.amount(embed.private)}), more "
        "than 90% of --host-memory 512.0 MiB"]
    need = -(-est.machine / 0.9 // 2**30)
    assert capacity.remedies(shape, est) == [f"would fit: --host-memory {need:.0f}G"]
    assert capacity.remedies(shape, replace(est, problems=[])) == []


def test_at_a_billion_rows_parts_or_codes_make_it_fit_on_as_many_machines():
    """Shards of bounded size: a worker's memory no longer shrinks with more machines, and
    nothing that does not fit asks for them; more parts or compressed codes do."""
    shape = Shape(rows=10**9, image_dim=512, text_dim=384, ranks=8, gpus_per_rank=8,
                  parts=4, host_memory=512 * 2.0**30, gpu_memory=80 * 2.0**30)
    est = capacity.plan(shape)[0]
    assert est.index == "ivf" and len(est.problems) == 2
    assert capacity.remedies(shape, est) == [
        "would fit: --parts 32 (each worker holds 1/32 of the index)",
        "would fit: --index ivfpq (compressed codes, rescored exactly from the mapped table)"]

    def fits(index: str, parts: int, ranks: int) -> bool:
        return not estimate(replace(shape, ranks=ranks), index, parts).problems

    assert fits("ivf", 32, 8) and fits("ivfpq", 4, 8) and not fits("ivf", 16, 8)
    assert not fits("ivf", 4, 64)  # more machines alone: the same part on each worker


def test_compare_prints_the_ratio_per_process():
    assert capacity.compare({"launch": 110 * MIB, "worker": 300 * MIB, "loader": 1.0},
                            {"launch": 100 * MIB, "worker": 200 * MIB, "machine": 2**30}) == [
        "launch: predicted 100.0 MiB, measured 110.0 MiB, measured/predicted 1.10 (within 25%)",
        "worker: predicted 200.0 MiB, measured 300.0 MiB, measured/predicted 1.50 (off by "
        "more than 25%)",
        "machine: predicted 1.0 GiB, not measured",
        "loader: measured 0.0 KiB, not predicted"]
    predicted = capacity.predict(replace(SMALL, cpu_workers=2, encoders=False))
    assert set(predicted) == {"launch", "worker", "machine"}
    assert predicted["machine"] >= predicted["worker"] * 2


def test_tables_fit_the_width_and_show_both_indexes():
    shape = replace(SMALL, gpus_per_rank=2)
    text = lines(shape, capacity.plan(shape), 60)
    table = [line for line in text if line.startswith("  ")]
    assert table and max(len(line) for line in table) <= 60
    assert "Index: exact, 2,048 bytes a row, 1 part(s)" in text
    assert "Index: ivfpq (compressed codes, rescored exactly), 32 lists, 72 bytes a row, " \
        "1 part(s)" in text
    assert text[-1] == "Nothing checked: give --host-memory (and --gpu-memory) to see what fits."


def plan_cli(capsys, *args: str) -> tuple[int, str, str]:
    return cli(capsys, "plan", *args)


@pytest.mark.parametrize("args, message", [
    ((), "--rows: required (the rows to mine, such as 1000000 or 100M)"),
    (("--rows", "ten"), "--rows: must be a positive integer, got 'ten'"),
    (("--rows", "0"), "--rows: must be a positive integer, got '0'"),
    (("--rows", "-5"), "--rows: must be a positive integer, got '-5'"),
    (("--rows", "1M", "--image-dim", "0"), "--image-dim: must be a positive integer, got '0'"),
    (("--rows", "1M", "--ranks", "2.5"), "--ranks: must be a positive integer, got '2.5'"),
    (("--rows", "1M", "--gpus-per-rank", "-1"),
     "--gpus-per-rank: must be an integer of at least 0, got '-1'"),
    (("--rows", "1M", "--host-memory", "lots"),
     "--host-memory: must be a size such as 256G, got 'lots'"),
    (("--rows", "1M", "--gpus-per-rank", "1", "--gpu-memory", "0G"),
     "--gpu-memory: must be a size such as 256G, got '0G'"),
    (("--rows", "1M", "--gpu-memory", "80G"), "--gpu-memory: only with GPUs (--gpus-per-rank N)"),
    (("--rows", "1M", "--gpus-per-rank", "8", "--cpu-workers", "2"),
     "--cpu-workers: only for machines without GPUs (--gpus-per-rank 0)"),
    (("--rows", "1M", "--parts", "none"), "--parts: must be a positive integer, got 'none'"),
    (("--rows", "1M", "--index", "hnsw"),
     "--index: one of auto, exact, ivf, ivfpq, ivfsq, got 'hnsw'"),
    (("--rows", "1M", "--distinct-texts", "0"),
     "--distinct-texts: must be a number in (0, 1], got '0'"),
    (("--rows", "1M", "--record-bytes", "x"), "--record-bytes: must be a positive integer, "
                                              "got 'x'"),
])
def test_bad_flags_are_one_line_naming_the_flag(capsys, args, message):
    rc, out, err = plan_cli(capsys, *args)
    assert (rc, out, err) == (2, "", f"hnm: error: {message}\n")


@pytest.mark.parametrize("rows, size, expected_rows, expected_bytes", [
    ("1000000", "1073741824", 1_000_000, 2**30), ("100M", "1G", 10**8, 2**30),
    ("1B", "1.5T", 10**9, 1.5 * 2**40), ("2k", "256GiB", 2000, 256 * 2**30),
    ("1_000", "80gb", 1000, 80 * 2**30), ("7", "512M", 7, 512 * 2**20)])
def test_rows_and_sizes_are_read_with_their_units(rows, size, expected_rows, expected_bytes):
    from hnm.cli import build_parser, plan_shape

    shape = plan_shape(build_parser().parse_args(["plan", "--rows", rows, "--host-memory",
                                                  size]))
    assert (shape.rows, shape.host_memory) == (expected_rows, expected_bytes)


def test_the_command_prints_the_plan_and_its_json(capsys):
    args = ("--rows", "2K", "--gpus-per-rank", "1", "--precomputed", "--index", "exact",
            "--host-memory", "1T", "--gpu-memory", "880K")
    rc, out, err = plan_cli(capsys, *args)
    assert rc == 0 and err == ""
    text = out.splitlines()
    assert text[0] == "Plan for 2,000 rows (1,000 distinct texts, records of 300 bytes), " \
        "512-d images, 384-d texts, on 1 machine(s) x 1 GPU(s): 1 worker(s)"
    # a GPU index part may take 80% of 880 KiB, 720,896 bytes: an exact part of 2000 / 16
    # rows (twice 256,000 bytes at its build peak); PQ codes stay on the host
    assert text[-5:] == [
        "exact: does not fit: the candidates phase needs 7.8 MiB per GPU (the index part at "
        "its build peak, twice the table), more than 80% of --gpu-memory 880.0 KiB",
        "ivfpq: fits",
        "would fit: --parts 16 (each worker holds 1/16 of the index)",
        "would fit: --index ivfpq (compressed codes, rescored exactly from the mapped table)",
        "would fit: --gpu-memory 1G"]
    rc, out, _ = plan_cli(capsys, *args, "--json")
    shape = Shape(rows=2000, image_dim=512, text_dim=384, gpus_per_rank=1, encoders=False,
                  index="exact", host_memory=2.0**40, gpu_memory=880 * 1024)
    assert rc == 0 and json.loads(out) == to_json(shape, capacity.plan(shape))
    processes = json.loads(out)["estimates"][0]["processes"]
    assert [p["phase"] for p in processes] == ["plan", "embed", "tables", "candidates",
                                               "reduce"]  # precomputed: no data loading
    assert processes[3] == {
        "phase": "candidates", "process": "worker", "count": 1,
        "private": round(phase(estimate(shape, "exact", 1), "candidates").private),
        "mapped": round(phase(estimate(shape, "exact", 1), "candidates").mapped),
        "gpu": 2 * 2000 * 512 * 4}


def test_the_settings_come_from_a_runs_config(tmp_path: Path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("k_nn: 10\ndiverse_candidates: 20\nnum_negatives: 3\n")
    rc, out, _ = plan_cli(capsys, "--rows", "1000", "--config", path, "--json")
    disk = json.loads(out)["estimates"][0]["disk"]
    assert rc == 0 and disk["candidates"] == 1000 * (10 * 40 + 20 * 24 + 37)
    assert disk["outputs"] == 1000 * (300 + 3 * capacity.NEGATIVE_BYTES) + capacity.REPORT_BYTES
    path.write_text("k_nn: 0\n")
    rc, out, err = plan_cli(capsys, "--rows", "1000", "--config", path)
    assert (rc, out, err) == (2, "", f"hnm: error: {path}: --k-nn: must be at least 1, got 0\n")


def test_readme_table_is_the_planners():
    tool = runpy.run_path(str(REPO / "tools" / "capacity_table.py"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert tool["readme_table"](readme) == tool["markdown"](), \
        "README's capacity table is out of date: python tools/capacity_table.py --write"


def test_dry_run_prints_the_planners_lines_for_the_real_input(tmp_path: Path, capsys):
    paths = make_dataset(tmp_path / "data", n=60, seed=1)
    rc, text, _ = cli(capsys, *mine_args(paths, tmp_path / "run", "--dry-run",
                                         "--cpu-workers", "2"))
    assert rc == 0 and not (tmp_path / "run").exists()
    shown = text.split("Capacity (as hnm plan models it):\n", 1)[1].splitlines()
    rows = [line.split() for line in shown]
    assert next(r[:3] for r in rows if r[:2] == ["embed", "worker"]) == ["embed", "worker", "2"]
    assert next(r[:3] for r in rows if r[:1] == ["reduce"]) == ["reduce", "launcher", "1"]
    assert shown[0] == "  Index: exact, 96 bytes a row, 1 part(s)"  # 24-d images
    assert shown[-1] == "Nothing was written."
