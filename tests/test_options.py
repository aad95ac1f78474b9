"""The declarations of hnm.options: the Config, the flags, the checks, the identity sets and
README's table all agree with them."""

from __future__ import annotations

import dataclasses
import runpy
import types
import typing

import pytest
from builders import REPO, cli

import hnm
from hnm.api import make
from hnm.cli import _overrides, build_parser
from hnm.config import Config, Fields, config_hash
from hnm.errors import HnmError
from hnm.options import (
    BY_KEY,
    EMBEDDING_KEYS,
    IDENTITY_DEFAULTS,
    OPTIONS,
    RENAMED,
    RUNTIME_ONLY,
    Option,
)


def _kind(hint: typing.Any) -> type:
    """A Config field's type without None: str, int, float, bool, tuple or Fields."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return typing.get_origin(hint) or hint


def test_config_and_declarations_agree_both_ways():
    hints = typing.get_type_hints(Config)
    config, fields = Config(), Fields()
    declared = {o.key: (o.kind, o.default) for o in OPTIONS}
    written = {f.name: (_kind(hints[f.name]), getattr(config, f.name))
               for f in dataclasses.fields(Config) if f.name != "fields"}
    written |= {f"fields.{f.name}": (str, getattr(fields, f.name))
                for f in dataclasses.fields(Fields)}
    assert declared == written
    assert _kind(hints["fields"]) is Fields
    assert len(BY_KEY) == len(OPTIONS)


def test_identity_sets_are_those_runs_were_made_with():
    """A change here gives existing runs another identity: they would start again."""
    runtime = {"output_dir", "num_workers", "gpu_id", "gpu_ids", "num_gpus", "cpu_workers",
               "max_retries", "stall_timeout", "quiet", "overwrite", "batch_size", "dry_run",
               "precision", "index_parts", "shard_rows"}
    assert runtime == RUNTIME_ONLY
    assert sorted(EMBEDDING_KEYS) == sorted((
        "annotations", "image_dir", "fields", "on_missing_image", "visual_encoder",
        "text_encoder", "image_embeddings", "text_embeddings", "input_format", "hf_split",
        "tensor_normalization", "joint_model"))
    assert IDENTITY_DEFAULTS == {"tensor_normalization": "imagenet", "joint_model": None,
                                 "joint_space": False, "max_cross_score_ratio": None,
                                 "min_cross_score_margin": None, "pq_bytes": None}
    config = Config(annotations="a.json", tensor_normalization="none", k_nn=5)
    assert (config_hash(Config()), config_hash(Config(), EMBEDDING_KEYS)) == (
        "84f86cd9f269aaad", "773420187951e67d")
    assert (config_hash(config), config_hash(config, EMBEDDING_KEYS)) == (
        "7c8c66c94eab0c2b", "a2301eb6c985a7df")


def _other_value(o: Option) -> tuple[str, typing.Any]:
    """A valid value of the option other than its default: as typed, as the Config holds it."""
    if o.rule and o.rule.choices:
        choice = next(c for c in o.rule.choices if c != o.default)
        return choice, choice
    if o.key in ("tensor_normalization", "gpu_ids"):
        return {"tensor_normalization": ("none", "none"), "gpu_ids": ("1,3", (1, 3))}[o.key]
    if o.kind is int:
        return str((o.default or 0) + 2), (o.default or 0) + 2
    return {float: ("0.5", 0.5), str: ("x", "x"), bool: ("", True)}[o.kind]


def test_every_flag_reaches_its_config_field():
    argv = ["mine"]
    for o in OPTIONS:
        argv += [o.flag] if o.kind is bool else [o.flag, _other_value(o)[0]]
    config = make(None, _overrides(build_parser().parse_args(argv)))
    for o in OPTIONS:
        name, _, part = o.key.partition(".")
        got = getattr(getattr(config, name), part) if part else getattr(config, name)
        assert got == _other_value(o)[1] != o.default, o.key


def test_the_parser_has_a_flag_for_each_option_and_no_other():
    mine = build_parser()._subparsers._group_actions[0].choices["mine"]
    flags = {s for a in mine._actions for s in a.option_strings}
    expected = {"-h", "--help", "--config", "--diverse-pool"}
    for o in OPTIONS:
        expected |= {o.flag, f"--no-{o.flag[2:]}"} if o.negatable else {o.flag}
    assert flags == expected


def test_help_quotes_the_defaults(capsys):
    rc, out, _ = cli(capsys, "mine", "-h")
    text = " ".join(out.split())
    assert rc == 0
    for phrase in ("number of k-NN neighbours (default: 30)", "(default: 0.3)",
                   "(default: 200000000)", "retried; 0: never (default: 1800)",
                   "(default: sized from the cores)", "(default: efficientnet-lite0)"):
        assert phrase in text


@pytest.mark.parametrize("values, message", [
    ({"k_nn": 0}, "--k-nn: must be at least 1, got 0"),
    ({"cpu_workers": 0}, "--cpu-workers: must be at least 1, got 0"),
    ({"cosine_threshold": 1.5}, "--cosine-threshold: must be within [-1, 1], got 1.5"),
    ({"audit_visual_similarity": -2}, "--audit-visual-similarity: must be within [-1, 1], "
     "got -2.0"),
    ({"diverse_ratio": 1.01}, "--diverse-ratio: must be within [0, 1], got 1.01"),
    ({"min_answer_length": -1}, "--min-answer-length: must not be negative, got -1"),
    ({"stall_timeout": -1}, "--stall-timeout: must not be negative, got -1.0"),
    ({"seed": 2**31}, "--seed: must be within [0, 2147483647] (a 32-bit seed), "
     "got 2147483648"),
    ({"max_samples": 0}, "--max-samples: out of range: 0"),
    ({"gpu_id": -1}, "--gpu-id: out of range: -1"),
    ({"gpu_ids": "1,1"}, "--gpu-ids: must list distinct GPU indices (0 or more), got [1, 1]"),
    ({"index": "hnsw"}, "--index: must be 'exact', 'ivf', 'ivfpq', 'ivfsq' or 'auto', got "
     "'hnsw'"),
    ({"on_missing_image": "warn"}, "--on-missing-image: must be 'error' or 'skip', "
     "got 'warn'"),
    ({"precision": "fp8"}, "--precision: must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ({"output_format": "csv"}, "--output-format: must be one of jsonl, parquet, got 'csv'"),
    ({"input_format": "xml"}, "--input-format: must be one of json, jsonl, csv, tsv, parquet, "
     "webdataset, hf, avdn, got 'xml'"),
    ({"fields": {"group": "\udcff"}}, "--group-field: b'\\xff' is not valid UTF-8"),
])
def test_range_errors_read_as_they_did(values, message):
    with pytest.raises(HnmError) as caught:
        make(None, values)
    assert str(caught.value) == message


def test_the_former_name_is_read_until_its_removal(tmp_path):
    (tmp_path / "c.yaml").write_text("diverse_pool: 5\n")
    assert make(str(tmp_path / "c.yaml"), {}).diverse_candidates == 5
    ns = build_parser().parse_args(["mine", "--diverse-pool", "6"])
    assert make(None, _overrides(ns)).diverse_candidates == 6
    assert RENAMED == {"diverse_pool": "diverse_candidates"}
    removal = BY_KEY["diverse_candidates"].former.removed_in
    assert tuple(map(int, removal.split("."))) > tuple(map(int, hnm.__version__.split(".")))


def test_readme_table_is_the_declarations():
    tool = runpy.run_path(str(REPO / "tools" / "options_table.py"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert tool["readme_table"](readme) == tool["markdown"](), \
        "README's option table is out of date: python tools/options_table.py --write"
