"""What running into an output directory does — start, resume, refuse or replace — decided
by one pure function from what the directory holds (`Survey`), the run's identity and
--overwrite; `plan.prepare` carries the decision out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hnm.plan import Plan


@dataclass(frozen=True)
class Survey:
    """What an output directory holds, read before deciding (no decision in here)."""

    holds: tuple[str, ...] = ()  # its names, the lock left out (empty: missing or empty)
    manifest: tuple[str, ...] | None = None  # the names its signature lists; None: unsigned
    plan: Plan | None = None  # its plan.json, when this hnm reads it
    plan_error: str | None = None  # why its plan.json cannot be read
    has_plan: bool = False
    has_config: bool = False


@dataclass(frozen=True)
class Refuse:
    """Stop with this one-line message; nothing is written."""

    message: str


@dataclass(frozen=True)
class Resume:
    """The same run: finish what is left of it (or nothing, when it is complete)."""

    plan: Plan


@dataclass(frozen=True)
class Start:
    """Plan the run afresh: first delete the files of `clear` (the earlier run's manifest),
    keeping the embeddings of `keep` (an earlier plan of the same inputs) if given."""

    clear: tuple[str, ...] = ()
    keep: Plan | None = None


Action = Refuse | Resume | Start


def decide(survey: Survey, keys: dict[str, str] | None, overwrite: bool, output_dir: str
           ) -> Action | None:
    """What to do with the directory. With `keys` None (the inputs not read yet), only the
    refusals that do not depend on them are decided (None: nothing refused yet)."""
    if survey.holds and survey.manifest is None:
        shown = ", ".join(survey.holds[:3]) + (f" and {len(survey.holds) - 3} more"
                                               if len(survey.holds) > 3 else "")
        return Refuse(f"--output-dir {output_dir}: exists and is not an hnm run directory "
                      f"(it holds {shown}); choose another directory")
    if survey.plan_error and not overwrite:
        return Refuse(survey.plan_error)
    if keys is None:
        return None
    old = survey.plan
    if old and old.run_key == keys["run_key"]:
        return Resume(old)
    if old and not overwrite:
        return Refuse(f"--output-dir {output_dir}: holds a run with a different config or "
                      "input; pass --overwrite to replace it, or choose another directory")
    if not old and (survey.has_plan or survey.has_config) and not overwrite:
        return Refuse(f"--output-dir {output_dir}: holds an unfinished hnm run without its "
                      "plan.json; pass --overwrite to start it again")
    keep = old if old and old.embed_key == keys["embed_key"] else None
    return Start(survey.manifest or (), keep)
