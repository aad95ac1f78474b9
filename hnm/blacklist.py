"""Phrases no negative may resemble (SPEC §3): affirmations, confirmations, bare motion words."""

from __future__ import annotations

from pathlib import Path

from hnm.decoding import reading

DEFAULT_BLACKLIST = (
    # short affirmations
    "yes", "yeah", "yep", "yes exactly", "exactly", "that's right", "that is right", "right",
    "correct", "that's correct", "sure", "ok", "okay", "affirmative", "indeed",
    # generic confirmations
    "you are on the right track", "you're going the right way", "keep going",
    "that is the destination", "you are correct", "good job", "well done",
    "yes, you are right", "no", "not yet", "i don't know",
    # bare motion words
    "go", "turn", "move", "fly", "straight ahead", "go straight", "go ahead", "go forward",
    "move forward", "keep straight", "turn left", "turn right", "turn around", "go left",
    "go right", "go back", "go north", "go south", "go east", "go west",
)


def read_blacklist(path: str | None) -> list[str]:
    """The built-in list, or one phrase per line of `path` (an empty file disables it)."""
    if path is None:
        return list(DEFAULT_BLACKLIST)
    if not path:  # `--blacklist ''` disables the filter
        return []
    with reading(f"--blacklist {path}"):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]
