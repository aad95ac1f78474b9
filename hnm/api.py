"""The Python API: `hnm.mine` runs the same pipeline as the command line, `hnm.load_run`
opens a finished run; errors are `hnm.HnmError` with the command line's one-line messages."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hnm.config import Config, load_config
from hnm.errors import HnmError, InternalError
from hnm.storage import RunDir, read_json, verify_marker

F = TypeVar("F", bound=Callable[..., Any])


def boundary(fn: F) -> F:
    """A public API function: its arguments are checked against its annotations, and it
    raises nothing but HnmError — a bad argument or a damaged run with the command line's
    one line, a bug as InternalError (the original exception as its cause). Generators
    are guarded while they are iterated."""
    signature = inspect.signature(fn)
    hints = {k: v for k, v in typing.get_type_hints(fn).items() if k != "return"}

    def check(args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise HnmError(f"{fn.__name__}(): {exc}") from None
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name != "self" and kind not in (kind.VAR_KEYWORD, kind.VAR_POSITIONAL) \
                    and not _conforms(value, hints.get(name, Any)):
                raise HnmError(f"{fn.__name__}(): {name} must be {_describe(hints[name])}, "
                               f"got {type(value).__name__}")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            check(args, kwargs)
            with _as_hnm_error():
                yield from fn(*args, **kwargs)
        return typing.cast(F, generator)

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check(args, kwargs)
        with _as_hnm_error():
            return fn(*args, **kwargs)
    return typing.cast(F, guarded)


class _as_hnm_error:
    """HnmError passes as it is; any other Exception becomes an InternalError."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, HnmError) or not isinstance(exc, Exception):
            return False
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InternalError(f"internal error: {type(exc).__name__}: {first}") from exc


def _conforms(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type (unions, generics by their origin)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is None or hint is type(None):
        return "None"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


@dataclass(frozen=True)
class Run:
    """A finished run directory: its resolved config, its metrics and its records."""

    dir: Path
    config: Config
    metrics: dict[str, Any]

    @boundary
    def records(self) -> Iterator[dict[str, Any]]:
        """Every input record in input order, with its `negatives` (read as you go)."""
        from hnm.outputs import read_records

        for _, record in read_records(RunDir(self.dir)):
            yield record

    @boundary
    def suspects(self) -> Iterator[dict[str, Any]]:
        """Every suspected false negative, with its anchor (suspects.jsonl)."""
        import json

        path = RunDir(self.dir).suspects
        again = "rerun the mining command to write it again"
        try:
            handle = open(path, "rb")  # noqa: SIM115  (closed below, once read)
        except OSError as exc:
            raise HnmError(f"{path}: cannot be read ({exc.strerror}); {again}") from None
        with handle:
            for number, line in enumerate(handle, start=1):
                try:
                    yield json.loads(line)
                except ValueError:
                    raise HnmError(f"{path}: damaged at line {number}; {again}") from None

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
    from hnm import driver

    config = make(config_or_path, overrides)
    driver.run(config)
    return None if config.dry_run else load_run(config.output_dir)


def make(config_or_path: Config | dict[str, Any] | str | Path | None,
         overrides: dict[str, Any]) -> Config:
    """The config a run uses: defaults, then the YAML file or mapping, then `overrides`."""
    from hnm.readers import detect_format

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
    from hnm.report import load_run_config

    run = RunDir(output_dir)
    config = load_run_config(run)
    for path in (run.plan, run.records(config.output_format), run.metrics, run.done):
        if not path.exists():
            raise HnmError(f"{run.root}: no {path.name}; not a finished hnm run "
                           "(rerun the mining command to finish it)")
    if why := verify_marker(run.done, run.root):
        raise HnmError(f"{why}; rerun the mining command to write the results again")
    metrics = read_json(run.metrics, "rerun the mining command to write it again")
    if not isinstance(metrics, dict):
        raise HnmError(f"{run.metrics}: damaged (not a JSON object); rerun the mining "
                       "command to write it again")
    return Run(run.root, config, metrics)
