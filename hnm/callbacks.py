"""The progress callback every long stage accepts, and the one that shows nothing."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def no_progress(stage: str, done: int, total: int) -> None:
    """The progress callback of callers that show none."""
