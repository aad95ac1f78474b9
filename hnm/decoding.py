"""Reading a user's file: any failure to decode it becomes one line naming the file."""

from __future__ import annotations

import csv
import struct
import sys
import tarfile
import tokenize
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from hnm.errors import HnmError

# What decoders raise for bad bytes, bad structure or bad nesting (json, yaml, csv, tarfile,
# numpy's header, pyarrow, PIL): each is an input's fault when only the decoding runs inside
# `reading`. hnm's own errors are not among them: they pass through unchanged.
DECODING: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, OSError, EOFError, RecursionError, MemoryError,
    NotImplementedError, ArithmeticError, SyntaxError, struct.error, zipfile.BadZipFile,
    tarfile.TarError, csv.Error, yaml.YAMLError, tokenize.TokenError)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    """pyarrow's own error class, when pyarrow is loaded (never imported for this)."""
    lib = sys.modules.get("pyarrow.lib")
    return (lib.ArrowException,) if lib is not None else ()


def reason(exc: BaseException) -> str:
    """A decoding failure in a few words, without the decoder's internals."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid {exc.encoding.upper().replace('UTF-8-SIG', 'UTF-8')} " \
               f"(byte {exc.start})"
    if isinstance(exc, MemoryError):
        return "too large to hold in memory"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return f"a number of more than {sys.get_int_max_str_digits()} digits"
    if isinstance(exc, tokenize.TokenError | SyntaxError) and exc.args:
        return f"malformed ({exc.args[0]})"  # a header parsed as a literal (.npy)
    first = first_line(str(exc).strip())[:200]
    return first or type(exc).__name__


class Place:
    """Where in the file the decoding is: a loop sets `where` as it goes (a line, a row)."""

    def __init__(self, where: str = "") -> None:
        self.where = where


@contextmanager
def reading(label: Any, what: str = "", where: str = "",
            also: tuple[type[BaseException], ...] = ()) -> Iterator[Place]:
    """Turn a decoding failure inside the block into `LABEL: cannot read WHAT (WHERE): why`.

    `label` names the file (with its flag where the user gave it as one), `where` the
    record, row, line or member (or the yielded Place's, set while looping); `also`: a
    decoder's own error classes. Only the decoding goes inside the block, so that a bug in
    hnm's own logic around it still shows as one.
    """
    place = Place(where)
    try:
        yield place
    except HnmError:
        raise
    except (*DECODING, *_arrow_errors(), *also) as exc:
        raise HnmError(f"{label}: cannot read{' ' + what if what else ''}"
                       f"{f' ({place.where})' if place.where else ''}: {reason(exc)}") from None


def one_line(message: str) -> str:
    """A message as one printable line: user text inside it (a field name, a key) may hold
    line breaks, control or format characters and lone surrogates, which are escaped."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in message)


def first_line(message: str) -> str:
    """The first line of a message, e.g. an exception's (a library's may run on for many
    lines), its surrounding blank space left out; empty when it has none."""
    return (message.strip().splitlines() or [""])[0]


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (`object_pairs_hook`): json keeps the
    last of two values of one key silently, which makes the record mean two things."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {one_line(repr(key))} given twice in one object")
    return obj


def load_yaml(text: str) -> Any:
    """YAML (safe tags only) that means one thing and holds no more than its bytes: a key
    given twice in one mapping, an alias that refers to itself and aliases that expand past
    a budget proportional to the text ("billion laughs") raise ValueError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded(node, {}, set(), 2 * len(text) + 1000)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded(node: yaml.Node, sizes: dict[int, int], open_: set[int], budget: int) -> int:
    """Values `node` stands for once its aliases are expanded (each node counted once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ValueError("an alias refers to the value that holds it")
    open_.add(id(node))
    size = 1
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for key, item in node.value:
            if isinstance(key, yaml.ScalarNode):
                name = (key.tag, key.value)
                if name in keys:
                    raise ValueError(f"key {one_line(repr(key.value))} given twice in one "
                                     "mapping")
                keys.add(name)
            size += _expanded(key, sizes, open_, budget) + _expanded(item, sizes, open_, budget)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded(item, sizes, open_, budget) for item in node.value)
    if size > budget:
        raise ValueError(f"aliases expand it to more than {budget} values")
    open_.discard(id(node))
    sizes[id(node)] = size
    return size
