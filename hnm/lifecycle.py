"""A run's life in one place: what running into an output directory does (decided by the
pure `rerun.decide`), carried out under the directory's lock — start, resume, replace —
and opening a finished run again (`Run`, `load_run`, `load_run_config`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hnm import schema
from hnm.blocks import Facts
from hnm.boundary import boundary
from hnm.callbacks import Progress, no_progress
from hnm.config import Config, dump_yaml, make_config, read_yaml
from hnm.corpus import ColumnarCorpus, open_corpus, problem
from hnm.errors import HnmError
from hnm.inputs import guard_run
from hnm.outputs import read_records
from hnm.placement import Offer, Placement, place, resumed
from hnm.plan import Plan, new_plan, provenance, read_plan, run_keys, validate_inputs
from hnm.plan_scan import InputSummary, same_input, summarize, write_store
from hnm.process import release_memory
from hnm.rerun import Refuse, Resume, Start, Survey, decide
from hnm.storage import RESULTS, RunDir, read_json, run_lock, verify_marker

# config keys holding paths, relative to the folder the run was started from
PATH_KEYS = ("annotations", "image_dir", "image_embeddings", "text_embeddings", "blacklist")


def write_plan(config: Config, run: RunDir, plan: Plan) -> None:
    """config.yaml (the resolved config, its provenance and the index chosen), then
    plan.json."""
    run.write_text(run.config, dump_yaml({**config.to_dict(),
                                          "provenance": provenance(config, plan.precision),
                                          "index_choice": dataclasses.asdict(plan.index)}))
    run.write_json(run.plan, plan.to_json())


# kept when a run is replaced: rewritten by the new plan, or appended to
KEPT = ("config.yaml", "plan.json", ".hnm-run.json", ".hnm.lock")


def remove_outputs(run: RunDir, manifest: tuple[str, ...], keep_embeddings: bool) -> None:
    """Clear what a new config invalidates: only the files the earlier run's manifest
    lists (a file of anyone else's, even inside hnm's folders, stays)."""
    for name in manifest:
        if name in KEPT or name.startswith("logs/") or \
                (keep_embeddings and name.startswith("embeddings/")):
            continue
        run.remove(run.root / name)
    for folder in ("tables", "candidates", "embeddings", "corpus"):
        run.remove_folder(run.root / folder)  # only where nothing else is left in it


def survey(run: RunDir) -> Survey:
    """What the output directory holds. A folder is an hnm run only by its signature
    (.hnm-run.json); one that holds a plan.json this hnm reads and its config.yaml, from
    before signatures, is adopted as one (its manifest: the layout of its plan; adopted
    until hnm 1.0)."""
    if not run.root.is_dir():
        return Survey()
    holds = tuple(sorted(p.name for p in run.root.iterdir() if p.name != run.lock_file.name))
    manifest = run.manifest()
    if manifest is None and not (run.plan.exists() and run.config.exists()):
        return Survey(holds)
    plan, error = None, None
    if run.plan.exists():
        try:
            plan = read_plan(run)
        except HnmError as exc:
            error = str(exc)
    if manifest is None:
        if plan is None:
            return Survey(holds)
        manifest = run.layout(len(plan.shards), plan.placement.index_parts)
    return Survey(holds, tuple(manifest), plan, error, run.plan.exists(), run.config.exists())


def check_phases(run: RunDir, plan: Plan, say: Callable[[str], Any], checksums: bool) -> None:
    """Forget every phase output whose files are not what its marker vouches for (a
    damaged, truncated or missing file): that shard's phase runs again."""
    markers = [("embed", s.shard) for s in plan.shards] + [("tables", None)] + \
        [("candidates", s.shard) for s in plan.shards]
    for phase, shard in markers:
        path = run.marker(phase, shard)
        if path.exists() and (why := verify_marker(path, run.root, checksums)):
            what = f"shard {shard}'s {phase} output" if shard is not None else "the tables"
            say(f"{why}: computing {what} again")
            run.remove(path)


def finished(run: RunDir, say: Callable[[str], Any]) -> bool:
    """Whether the results are there and are what the final marker vouches for."""
    if not run.done.exists():
        return False
    why = verify_marker(run.done, run.root, required=RESULTS)
    if why:
        say(f"{why}: writing the results again")
        run.remove(run.done)
    return why is None


def _state(run: RunDir, plan: Plan, say: Callable[[str], Any]) -> str:
    """"complete" when the results verify (checksums) and so do the phases' files (their
    sizes and times, which `hnm sweep` reads), else "resume" with every damaged phase
    output forgotten."""
    if finished(run, say):
        check_phases(run, plan, say, checksums=False)
        if all(run.is_done(p, s.shard) for s in plan.shards for p in ("embed", "candidates")) \
                and run.is_done("tables"):
            return "complete"
        run.remove(run.done)
    check_phases(run, plan, say, checksums=True)
    return "resume"


def prepare(config: Config, offered: Offer, lock: Callable[[], Any],
            say: Callable[[str], Any], progress: Progress = no_progress
            ) -> tuple[ColumnarCorpus, InputSummary, Plan, str]:
    """Validate inputs and place the run on what this machine offers, then — under the
    run directory's lock, taken by `lock()` — create, resume or replace the run. Nothing
    is written before every check passed. The input is read once, a block at a time, and
    never held (`hnm.plan_scan`): checked and planned, and staged as the run's columnar
    corpus (`hnm.corpus`) where that is new, damaged or missing, which is moved into the
    run under the lock.

    Returns the corpus store, what planning knew of the input, the plan and the state:
    "new", "resume" or "complete".
    """
    ds, plan, state = _validated(config, offered, lock, say, progress)
    run = RunDir(config.output_dir)
    if state != "new" and (why := problem(run)) is not None:
        say(f"{why}: writing the run's corpus again")
        write_store(run, config, list(plan.skipped), _as_planned(config, plan, run), ds)
        if "corpus/meta.json" not in (run.manifest() or []):  # planned before the store
            run.sign(sorted(set(run.manifest() or []) | set(run.layout(len(plan.shards)))))
    ds.let_go()  # a store staged but not needed (one that verifies was there)
    release_memory()
    return open_corpus(run), ds, plan, state


def run_corpus(run: RunDir, config: Config, plan: Plan) -> ColumnarCorpus:
    """A finished run's corpus store (`hnm report`, `export`, `sweep`); one written
    before the store existed, or damaged since, is written again from the input first."""
    if problem(run) is not None:  # the input read again, a block at a time
        write_store(run, config, list(plan.skipped), _as_planned(config, plan, run))
        if "corpus/meta.json" not in (run.manifest() or []):
            run.sign(sorted(set(run.manifest() or []) | set(run.layout(len(plan.shards)))))
        release_memory()
    return open_corpus(run, plan.workdir)


def _as_planned(config: Config, plan: Plan, run: RunDir) -> Callable[[Facts], None]:
    """A `plan_scan.write_store` check: the input read again is the one `plan` was
    planned from (its digest, its rows)."""
    def check(facts: Facts) -> None:
        if plan.source != facts.source_sha256[:16] or plan.num_rows != facts.num_rows:
            raise HnmError(f"{config.annotations}: changed since the run in {run.root}; "
                           "its negatives no longer match the records")
    return check


def _validated(config: Config, offered: Offer, lock: Callable[[], Any],
               say: Callable[[str], Any], progress: Progress = no_progress
               ) -> tuple[InputSummary, Plan, str]:
    """`prepare` up to the decision carried out: the input's summary, the plan, the
    state."""
    run = RunDir(config.output_dir)
    blocker = next((p for p in (run.root, *run.root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise HnmError(f"--output-dir {config.output_dir}: {blocker} is a file, not a directory")
    before = survey(run)
    if isinstance(refused := decide(before, None, config.overwrite, config.output_dir), Refuse):
        raise HnmError(refused.message)
    old = before.plan
    if old and config.annotations:
        # resuming the same run: its inputs were validated when it was planned, and its
        # key covers them, so the (slow) decoding of every image is not redone
        # its store staged while read only where it must be written again
        ds = summarize(config, list(old.skipped), progress, stage=problem(run) is not None)
        try:
            placement = place(config, offered, ds)
            if old.run_key == run_keys(config, ds, placement.precision)["run_key"]:
                return _prepare(config, run, ds, placement, offered, lock, say)
        except BaseException:
            ds.let_go()
            raise
        ds.let_go()
    ds = validate_inputs(config, progress, stage=True)
    try:
        return _prepare(config, run, ds, place(config, offered, ds), offered, lock, say)
    except BaseException:
        ds.let_go()
        raise


def _prepare(config: Config, run: RunDir, ds: InputSummary, placement: Placement,
             offered: Offer, lock: Callable[[], Any], say: Callable[[str], Any]
             ) -> tuple[InputSummary, Plan, str]:
    """The decision on validated inputs, carried out under the lock."""
    guard_run(run, config, ds.near)  # before the lock file is written
    lock()
    now = survey(run)  # again, now that no other run can change it
    action = decide(now, run_keys(config, ds, placement.precision), config.overwrite,
                    config.output_dir)
    if isinstance(action, Refuse):
        raise HnmError(action.message)
    if (gone := run.remove_temporary()):
        say(f"Removed {gone} temporary file(s) left by an interrupted run")
    if isinstance(action, Resume):
        if run.manifest() is None:  # adopted from before signatures (read until hnm 1.0)
            run.sign(list(now.manifest or ()))
        return ds, *_resume(config, run, action.plan, offered, say)
    if action.keep:  # the shards are cut already: a worker each, as far as offered
        placement = place(config, offered, ds, shards=len(action.keep.shards))
    return ds, start(config, run, ds, placement, action, say), "new"


def _resume(config: Config, run: RunDir, plan: Plan, offered: Offer,
            say: Callable[[str], Any]) -> tuple[Plan, str]:
    """The plan as it resumes: its workers, threads and loaders placed again on this
    machine and these flags (the precision and the index are the run's identity), and
    saved when they changed."""
    state = _state(run, plan, say)
    if state == "complete":
        return plan, state
    placement = resumed(plan.placement, offered, config, len(plan.shards))
    if placement != plan.placement:
        plan = dataclasses.replace(plan, placement=placement)
        run.write_json(run.plan, plan.to_json())
    return plan, state


def start(config: Config, run: RunDir, ds: InputSummary, placement: Placement,
          action: Start, say: Callable[[str], Any]) -> Plan:
    """Replace what an earlier run left (only its manifest's files; its embeddings where
    `action.keep`), sign the directory with the new manifest, write the corpus store (the
    input read again, found as planned) and the plan."""
    plan = new_plan(config, ds, placement, keep=action.keep)
    layout = run.layout(len(plan.shards), plan.placement.index_parts)
    run.sign(sorted(set(action.clear) | set(layout)))
    if action.keep:
        check_phases(run, action.keep, say, checksums=True)
    # nothing of another run may be trusted, except embeddings of the same inputs
    remove_outputs(run, action.clear, keep_embeddings=action.keep is not None)
    write_store(run, config, ds.planned_skip(), same_input(config, ds.facts), ds)
    write_plan(config, run, plan)
    return plan


class Lease:
    """The leader's hold on a run directory: `prepare` takes its lock once the inputs
    passed every check, and it is held until the lease ends (the run finished or
    stopped)."""

    def __init__(self, config: Config, say: Callable[[str], Any]) -> None:
        self.config, self.say = config, say
        self.run = RunDir(config.output_dir)
        self.corpus: ColumnarCorpus | None = None  # the run's corpus store, once prepared
        self.summary: InputSummary | None = None  # what planning knew of the input
        self.held = contextlib.ExitStack()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.held.close()

    def prepare(self, offered: Offer, progress: Progress = no_progress) -> tuple[Plan, str]:
        """Create, resume or replace the run (`prepare`); its plan and state."""
        def lock() -> None:
            self.held.enter_context(run_lock(self.run, self.say))

        self.corpus, self.summary, plan, state = prepare(self.config, offered, lock,
                                                         self.say, progress)
        return plan, state


@dataclass(frozen=True)
class Run:
    """A finished run directory: its resolved config, its metrics and its records
    (`hnm.Run` adds its export)."""

    dir: Path
    config: Config
    metrics: dict[str, Any]

    @boundary
    def records(self) -> Iterator[dict[str, Any]]:
        """Every input record in input order, with its `negatives` (read as you go)."""
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


def load_run(output_dir: str | Path) -> Run:
    """Open a finished run directory: its results must be what its final marker
    (done.json) vouches for — sizes and checksums, as a rerun of the mining command checks
    them."""
    run = RunDir(output_dir)
    config = load_run_config(run)
    for path in (run.plan, run.records(config.output_format), run.metrics, run.done):
        if not path.exists():
            raise HnmError(f"{run.root}: no {path.name}; not a finished hnm run "
                           "(rerun the mining command to finish it)")
    results = ((run.records(config.output_format).name,), *RESULTS[1:])
    if why := verify_marker(run.done, run.root, required=results):
        raise HnmError(f"{why}; rerun the mining command to write the results again")
    metrics = read_json(run.metrics, "rerun the mining command to write it again",
                        schema.METRICS)
    return Run(run.root, config, metrics)


def load_run_config(run: RunDir) -> Config:
    """The run's config from its config.yaml (provenance left out), its relative input
    paths resolved from the folder the run was started from, wherever this runs."""
    if not run.config.exists():
        raise HnmError(f"{run.root}: no config.yaml; not an hnm run directory")
    values = read_yaml(run.config)
    if not isinstance(values, dict):
        raise HnmError(f"{run.config}: damaged; rerun the mining command with --overwrite")
    values.pop("provenance", None)
    values.pop("index_choice", None)  # the plan's, recorded beside the config
    values["output_dir"] = str(run.root)  # the folder may have moved since the run
    if run.plan.exists():
        workdir = Path(read_plan(run).workdir)
        for key in PATH_KEYS:
            if isinstance(values.get(key), str) and values[key]:
                values[key] = str(workdir / values[key])  # an absolute path stays as it is
    try:
        return make_config(values)
    except HnmError as exc:
        raise HnmError(f"{run.config}: {exc}; rerun the mining command with --overwrite") \
            from None
