"""The shape of a run's own files (.hnm-run.json, done.json and the phase markers,
plan.json, metrics.json), checked before any of their values is used: a file edited,
damaged or planted is one line naming it, never a traceback.

A schema is a Python value: a type (int, float, str, bool; float takes an int too), a list
of one schema (a list of those), a tuple of schemas (a list of exactly those), a dict of
key -> schema (an object with those keys; keys of `Optional` values may be missing; other
keys are left as they are), `Map(schema)` (an object of any text keys), or `ANY` (any JSON
value, nested at most MAX_DEPTH levels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32  # levels of lists and objects in a value of a run file
MAX_BYTES = 256 << 20  # a run file larger than this is not one hnm wrote (plan.json aside)


@dataclass(frozen=True)
class Map:
    """An object whose keys are any text, each value of `values`."""

    values: Any


@dataclass(frozen=True)
class Optional:
    """A key that may be missing."""

    schema: Any


ANY = object()
NAMES = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def problem(value: Any, schema: Any, where: str = "") -> str | None:
    """Why `value` does not have the shape `schema` describes (naming where in it), or None."""
    stack: list[tuple[Any, Any, str]] = [(value, schema, where)]
    while stack:
        value, schema, where = stack.pop()
        at = f" at {where}" if where else ""
        if schema is ANY:
            if _depth(value) > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels{at}"
        elif isinstance(schema, type):
            if not _is(value, schema):
                return f"expected {NAMES[schema]}{at}, got {_kind(value)}"
        elif isinstance(schema, list | tuple):
            if not isinstance(value, list):
                return f"expected a list{at}, got {_kind(value)}"
            if isinstance(schema, tuple) and len(value) != len(schema):
                return f"expected a list of {len(schema)}{at}, got {len(value)} items"
            for i, item in enumerate(value):
                stack.append((item, schema[i] if isinstance(schema, tuple) else schema[0],
                              f"{where}[{i}]"))
        elif isinstance(schema, Map):
            if not isinstance(value, dict):
                return f"expected an object{at}, got {_kind(value)}"
            stack.extend((v, schema.values, f"{where}.{k}") for k, v in value.items())
        else:
            if not isinstance(value, dict):
                return f"expected an object{at}, got {_kind(value)}"
            for key, inner in schema.items():
                if key not in value:
                    if isinstance(inner, Optional):
                        continue
                    return f"no '{key}'{at}"
                inner = inner.schema if isinstance(inner, Optional) else inner
                stack.append((value[key], inner, f"{where}.{key}" if where else key))
    return None


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    for kind, name in NAMES.items():
        if type(value) is kind:
            return name
    return {list: "a list", dict: "an object", type(None): "null"}.get(type(value), "?")


def _depth(value: Any) -> int:
    """Levels of lists and objects (counting stops past MAX_DEPTH)."""
    depth, level = 0, [value]
    while depth <= MAX_DEPTH:
        containers = [x for x in level if isinstance(x, list | dict)]
        if not containers:
            break
        depth += 1
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]
    return depth


# ---------------------------------------------------------------- hnm's run files

SIGNATURE = {"format": str, "version": int, "files": [str]}
MARKER = {"files": Map((int, str, int))}  # done.json and the phases' markers
SHARD = {"shard": int, "rows": (int, int), "phrases": (int, int), "anchors": (int, int),
         "device": str}
PLAN = {"version": int, "run_key": str, "embed_key": str, "num_rows": int,
        "num_anchors": int, "num_phrases": int, "num_records": int, "skipped": [int],
        "batch_size": int, "workdir": str, "text_batch_size": int, "shards": [SHARD],
        "placement": Optional(Map(ANY)), "input_format": Optional(str),
        "input_files": Optional(int), "images": Optional(str), "source": Optional(str)}
METRICS = Map(ANY)
