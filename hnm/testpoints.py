"""Named points a run reaches, where a test acts on it at a moment the run chose.

``HNM_TEST_CRASH=POINT:SHARD[:HOW]`` makes the first process to reach POINT for SHARD
(once per run directory) act there. Points, in the order a run reaches them:

- ``embed``, ``tables``, ``candidates``: a task starts, before any of its work (the
  tables phase's shard is ``None``);
- ``embed-batch``: inside the image embedding loop, once the first batch is embedded: the
  loop's DataLoader workers (if any) are alive, have delivered a batch and hold more
  (their pids are in the held file, as ``loaders``);
- ``search``: inside the candidates search, once the first block of anchors is searched;
- ``reduce``: inside the reduce, once the selection pass has taken shard SHARD's lists;
- ``event``: a pool worker sending an event about shard SHARD to its parent (with
  ``kill``: half of the event's bytes are written first, as a process killed in the
  middle of sending leaves them).

HOW: ``kill`` (the default: SIGKILL this process), ``stall`` (hang alive, reporting no
progress), ``hold`` (write ``logs/.held_POINT_SHARD``, a JSON object naming this process
and the point's facts, then wait alive and reporting progress until
``logs/.release_POINT_SHARD`` exists) or ``raise`` (an exception, as a failing task
raises). A test never chooses its moment by the clock: it waits for the held file, acts,
then releases the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hnm.safety import Area

VARIABLE = "HNM_TEST_CRASH"
POINTS = ("embed", "tables", "candidates", "embed-batch", "search", "reduce", "event")
_task: list[tuple[Path, int | None]] = []  # the running task's logs folder and shard


def _nothing() -> None:
    pass


@contextlib.contextmanager
def task(logs: Path, shard: int | None) -> Iterator[None]:
    """Points reached inside this block belong to `shard`, marked in `logs`."""
    _task.append((Path(logs), shard))
    try:
        yield
    finally:
        _task.pop()


def wanted() -> tuple[str, str, str] | None:
    """(point, shard, how) asked for by the environment, or None (the usual case)."""
    value = os.environ.get(VARIABLE)
    if not value:
        return None
    point, _, rest = value.partition(":")
    shard, _, how = rest.partition(":")
    return point, shard, how or "kill"


def reach(point: str, progress: Callable[[], None] = _nothing,
          at: tuple[Path, int | None] | None = None,
          facts: Callable[[], dict[str, Any]] = dict) -> None:
    """This process reached `point` of the running task's shard (or of `at`: a logs folder
    and a shard): act there if a test asked. `facts`, asked only then: what the held file
    tells the test."""
    asked = wanted()
    if asked is None or asked[0] != point or not (at or _task):
        return
    logs, shard = at or _task[-1]
    if asked[1] != str(shard):
        return
    name = f"{point}_{shard}"
    flag, area = logs / f".reached_{name}", Area(logs)
    if flag.exists():  # once per run directory: the retried task goes on
        return
    os.close(area.append(flag))  # (a shard runs in one process at a time)
    how = asked[2]
    progress()
    if how == "hold":
        _hold(area, name, progress, {"pid": os.getpid(), "point": point, **facts()})
    elif how == "raise":
        raise RuntimeError(f"{VARIABLE}: raised at {point} of shard {shard}")
    elif how == "stall":
        while True:
            time.sleep(1)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _hold(area: Area, name: str, progress: Callable[[], None], facts: dict) -> None:
    area.write_text(area.root / f".held_{name}", json.dumps(facts))  # whole when it appears
    release = area.root / f".release_{name}"
    while not release.exists():
        progress()
        time.sleep(0.05)
