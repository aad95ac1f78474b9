"""The Python API's boundary: arguments checked against the annotations, and nothing but
`HnmError` raised (a bug becomes `errors.InternalError`)."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from hnm.decoding import first_line
from hnm.errors import HnmError, InternalError

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
        first = first_line(str(exc))[:200]
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
