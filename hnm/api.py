"""The Python API: `hnm.mine` runs the same pipeline as the command line, `hnm.load_run`
opens a finished run; errors are `hnm.HnmError` with the command line's one-line messages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hnm.config import Config, load_config
from hnm.errors import HnmError
from hnm.storage import RunDir, read_json


@dataclass(frozen=True)
class Run:
    """A finished run directory: its resolved config, its metrics and its records."""

    dir: Path
    config: Config
    metrics: dict[str, Any]

    def records(self) -> Iterator[dict[str, Any]]:
        """Every input record in input order, with its `negatives` (read as you go)."""
        from hnm.outputs import read_records

        for _, record in read_records(RunDir(self.dir)):
            yield record

    def suspects(self) -> Iterator[dict[str, Any]]:
        """Every suspected false negative, with its anchor (suspects.jsonl)."""
        import json

        with open(RunDir(self.dir).suspects, "rb") as handle:
            for line in handle:
                yield json.loads(line)

    def export(self, to: str | Path, format: str = "triplets") -> Path:
        """Training-ready rows (see `hnm export`): a .parquet or .jsonl file, or a folder of
        WebDataset shards."""
        from hnm.export import export

        return export(self.dir, format, to)


def mine(config_or_path: Config | dict[str, Any] | str | Path | None = None,
         **overrides: Any) -> Run | None:
    """Mine negatives as `hnm mine` does; returns the finished run (None after a dry run).

    `config_or_path`: a Config, a mapping of config keys, or a YAML file; `overrides`:
    config keys (`annotations=..., output_dir=..., fields={"text": "answer"}`), applied last.
    """
    from hnm import driver

    config = make(config_or_path, overrides)
    driver.run(config)
    return None if config.dry_run else load_run(config.output_dir)


def make(config_or_path: Config | dict[str, Any] | str | Path | None,
         overrides: dict[str, Any]) -> Config:
    """The config a run uses: defaults, then the YAML file or mapping, then `overrides`."""
    overrides = dict(overrides)
    if not isinstance(config_or_path, Config | dict):
        return load_config(config_or_path, overrides)
    values = config_or_path.to_dict() if isinstance(config_or_path, Config) \
        else dict(config_or_path)
    fields = {**(values.pop("fields", None) or {}), **(overrides.pop("fields", None) or {})}
    return load_config(None, {**values, **overrides, **({"fields": fields} if fields else {})})


def load_run(output_dir: str | Path) -> Run:
    """Open a finished run directory."""
    from hnm.report import load_run_config

    run = RunDir(output_dir)
    config = load_run_config(run)
    for path in (run.plan, run.records(config.output_format), run.metrics):
        if not path.exists():
            raise HnmError(f"{run.root}: no {path.name}; not a finished hnm run "
                           "(rerun the mining command to finish it)")
    return Run(run.root, config, read_json(run.metrics))
