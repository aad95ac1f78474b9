"""The Python API: `hnm.mine` runs the same pipeline as the command line, `hnm.load_run`
opens a finished run; errors are `hnm.HnmError` with the command line's one-line messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hnm import lifecycle
from hnm.boundary import boundary
from hnm.config import Config, load_config
from hnm.errors import HnmError
from hnm.readers import detect_format


class Run(lifecycle.Run):
    """A finished run directory: its resolved config, its metrics and its records; and
    its training rows (`export`)."""

    @boundary
    def export(self, to: str | Path, format: str = "triplets", overwrite: bool = False
               ) -> Path:
        """Training-ready rows (see `hnm export`): a .parquet or .jsonl file, or a folder of
        WebDataset shards; an existing one is replaced only with `overwrite`."""
        from hnm.export import export

        return export(self.dir, format, to, overwrite)


@boundary
def mine(config_or_path: Config | dict[str, Any] | str | Path | None = None,
         **overrides: Any) -> Run | None:
    """Mine negatives as `hnm mine` does; returns the finished run (None after a dry run).

    `config_or_path`: a Config, a mapping of config keys, or a YAML file; `overrides`:
    config keys (`annotations=..., output_dir=..., fields={"text": "answer"}`), applied last.
    """
    from hnm.run import driver

    config = make(config_or_path, overrides)
    driver.run(config)
    return None if config.dry_run else load_run(config.output_dir)


def make(config_or_path: Config | dict[str, Any] | str | Path | None,
         overrides: dict[str, Any]) -> Config:
    """The config a run uses: defaults, then the YAML file or mapping, then `overrides`."""
    overrides = dict(overrides)
    for given in (config_or_path, overrides):
        fields = given.get("fields") if isinstance(given, dict) else None
        if fields is not None and not isinstance(fields, dict):
            raise HnmError(f"fields: must be a mapping of id/image/text/group to field names, "
                           f"got {type(fields).__name__}")
    if not isinstance(config_or_path, Config | dict):
        return load_config(config_or_path, overrides, detect_format=detect_format)
    values = config_or_path.to_dict() if isinstance(config_or_path, Config) \
        else dict(config_or_path)
    fields = {**(values.pop("fields", None) or {}), **(overrides.pop("fields", None) or {})}
    return load_config(None, {**values, **overrides, **({"fields": fields} if fields else {})},
                       detect_format=detect_format)


@boundary
def load_run(output_dir: str | Path) -> Run:
    """Open a finished run directory: its results must be what its final marker
    (done.json) vouches for — sizes and checksums, as a rerun of the mining command checks
    them."""
    found = lifecycle.load_run(output_dir)
    return Run(found.dir, found.config, found.metrics)
