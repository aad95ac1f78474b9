"""What a run writes for its users: every record with its negatives, and the suspects."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from hnm.audit import Suspect, is_suspect
from hnm.config import Config
from hnm.data import Dataset, Progress, no_progress
from hnm.select import Pick
from hnm.storage import RunDir, atomic_open

PRECISION = 6  # decimals of the similarities written (the choices use the exact values)
PROGRESS_EVERY = 5000  # records written between progress reports (a report costs a refresh)


def similarity(value: float) -> float:
    """As written: rounded, and within [-1, 1] (a unit vector's grid snap can round its
    square norm just past 1)."""
    return min(1.0, max(-1.0, round(value, PRECISION)))


def negative_record(config: Config, ds: Dataset, pick: Pick) -> dict[str, Any]:
    """SPEC §8: what one negative carries."""
    record = ds.records[ds.positions[pick.row]]
    out = {"id": ds.ids[pick.row], "text": record[config.fields.text],
           "image": record[config.fields.image], "type": pick.kind,
           "text_similarity": similarity(pick.txt),
           "visual_similarity": similarity(pick.vis),
           "suspect": is_suspect(config, pick)}
    if pick.kind == "hard":
        out["threshold_step"] = pick.step
    else:
        out["anchor_cluster"] = pick.anchor_cluster
        out["negative_cluster"] = pick.negative_cluster
    return out


def write_negatives(config: Config, run: RunDir, ds: Dataset, picks: list[list[Pick]],
                    progress: Progress = no_progress) -> None:
    """Every input record, unchanged and in input order, plus its `negatives` (picks[a]:
    anchor row a's)."""
    by_position = {int(ds.positions[a]): p for a, p in enumerate(picks)}
    with atomic_open(run.negatives, "w") as handle:
        for pos, record in enumerate(ds.records):
            negs = [negative_record(config, ds, p) for p in by_position.get(pos, [])]
            handle.write(json.dumps({**record, "negatives": negs}, ensure_ascii=False) + "\n")
            if pos % PROGRESS_EVERY == 0:
                progress("write", pos, len(ds.records))
    progress("write", len(ds.records), len(ds.records))


def write_suspects(config: Config, run: RunDir, ds: Dataset, suspects: Iterable[Suspect]
                   ) -> None:
    """OUTPUT_DIR/suspects.jsonl: every suspect, dropped or not, with its anchor."""
    f = config.fields
    with atomic_open(run.suspects, "w") as handle:
        for s in suspects:
            record = ds.records[ds.positions[s.anchor]]
            line = {"anchor_id": ds.ids[s.anchor], "anchor_text": record[f.text],
                    "anchor_image": record[f.image], "reasons": list(s.reasons),
                    "dropped": s.dropped, "negative": negative_record(config, ds, s.pick)}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
