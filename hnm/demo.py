"""Deterministic generator of a small synthetic AVDN-style aerial navigation demo dataset:
the dialogs' instructions, the records and their images, and `python -m hnm.demo` (the maps
the drone flies over are drawn in `demo_scene`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from hnm import writers
from hnm.demo_scene import (
    Landmark,
    Point,
    Road,
    Scene,
    landmarks,
    make_scene,
    map_side,
    perturb,
    png_bytes,
    render_map,
)
from hnm.safety import Area

SHORT_SHARE = 0.09  # share of records whose answer is a short affirmation or motion word
EXACT_TWIN, PERTURBED_TWIN = 3, 7  # dialog index mod 10 that re-flies the previous dialog's map
FORMATS = ("json", "jsonl", "parquet", "webdataset", "hf")
SHARD_RECORDS = 100  # records per shard file: the default demo (300 records) has three

DIRECTIONS = ("east", "northeast", "north", "northwest",
              "west", "southwest", "south", "southeast")

# Several wordings per meaning, so that paraphrases of one instruction occur across dialogs.
FIRST = ("Fly {dir}{road} until you reach {target} {rel}.",
         "Head {dir}{road} and stop at {target} {rel}.",
         "Go {dir}{road}; your destination is {target} {rel}.",
         "Your goal is {target} {rel}, so fly {dir}{road}.")
KEEP = ("Keep flying {dir}, {target} is still ahead.",
        "Continue {dir}, you have not reached {target} yet.",
        "Go further {dir} toward {target}.",
        "Stay on course {dir}; {target} is further on.")
NEAR = ("You are close, move a little {dir} to {target}.",
        "Almost there, {target} is just {dir} of you.",
        "Nudge {dir} a bit, {target} is right there.")
LAND = ("Stop here, you are above {target}. Land now.",
        "This is {target} {rel}, please land.",
        "You made it, land on {target}.")
LAND_OFF = ("Land just {dir} of here, on {target}.",
            "Descend onto {target}, slightly {dir} of you.")
NEXT_TO = ("next to", "beside", "close to")
SHORT_ANSWERS = ("yes", "Yes.", "Exactly.", "That's right", "Correct.",
                 "go straight", "turn left", "turn right", "Keep going", "Yes, go ahead.")


# ---------------------------------------------------------------- language


def direction(dx: float, dy: float) -> str:
    """Compass word for an image-space offset (north is up, i.e. negative y)."""
    sector = round(math.atan2(-dy, dx) / (math.pi / 4)) % 8
    return DIRECTIONS[sector]


def _road_clause(road: Road, way: str) -> str:
    if road.kind == "curved":
        return " following the curved road"
    along = {"ns": ("north", "south"), "ew": ("east", "west")}
    axes = ("ns", "ew") if road.kind == "crossing" else (road.axis,)
    return " along the road" if any(way in along[a] for a in axes) else ""


def _relation(marks: list[Landmark], target: int, prep: str) -> str:
    """Where the goal is, by its nearest differently-named landmark."""
    goal = marks[target]
    others = [mk for mk in marks if mk.phrase != goal.phrase]
    if not others:
        return "on the map"
    near = min(others, key=lambda mk: math.hypot(mk.x - goal.x, mk.y - goal.y))
    return f"{prep} {near.phrase}"


def _first_instruction(rng: np.random.Generator, scene: Scene, target: int, used: set[str],
                       ) -> str:
    """Opening instruction; unique per dialog because it is the dialog's group key."""
    marks = landmarks(scene)
    goal = marks[target]
    cx, cy = scene.start[0] + scene.size / 2, scene.start[1] + scene.size / 2
    way = direction(goal.x - cx, goal.y - cy)
    slots = {"dir": way, "road": _road_clause(scene.road, way), "target": goal.phrase}
    options = [t.format(rel=_relation(marks, target, p), **slots)
               for t in FIRST for p in NEXT_TO]
    for i in rng.permutation(len(options)):
        text = options[int(i)][0].upper() + options[int(i)][1:]
        if text.lower() not in used:
            break
    else:  # every wording taken by earlier dialogs: name the start corner too
        half = map_side(scene.size) / 2
        text = f"{text} Take off from the {direction(cx - half, cy - half)} side."
    used.add(text.lower())
    return text


def _turn_answer(rng: np.random.Generator, scene: Scene, target: int, view: Point,
                 last: bool) -> str:
    """Follow-up instruction from where the goal appears relative to the current view."""
    marks = landmarks(scene)
    goal = marks[target]
    dx, dy = goal.x - (view[0] + scene.size / 2), goal.y - (view[1] + scene.size / 2)
    dist = math.hypot(dx, dy) / scene.size
    # the last turn always lands; earlier turns say "keep going" until the goal is near
    near_pool = LAND if dist <= 0.15 else LAND_OFF
    pool = near_pool if last else (KEEP if dist > 0.4 else NEAR)
    rel = _relation(marks, target, str(rng.choice(NEXT_TO)))
    text = str(rng.choice(pool)).format(dir=direction(dx, dy), target=goal.phrase, rel=rel)
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------- dataset


def _views(scene: Scene, target: int, turns: int) -> list[Point]:
    """The drone's view corners: a straight flight from the start to centred on the goal."""
    goal = landmarks(scene)[target]
    span = map_side(scene.size) - scene.size
    end = (np.clip(goal.x - scene.size / 2, 0, span), np.clip(goal.y - scene.size / 2, 0, span))
    (x0, y0), (x1, y1) = scene.start, end
    steps = [t / (turns - 1) for t in range(turns)]
    return [(round(x0 + (x1 - x0) * f), round(y0 + (y1 - y0) * f)) for f in steps]


def _dialog_scene(seed: int, index: int, size: int) -> tuple[Scene, int, int]:
    """Scene, goal landmark and map number of a dialog; some dialogs re-fly the previous map."""
    kind = index % 10
    source = index - 1 if kind in (EXACT_TWIN, PERTURBED_TWIN) else index
    base = make_scene(np.random.default_rng([seed, 1, source]), size)
    if source == index:
        return base, base.targets[0], source
    if kind == EXACT_TWIN:  # same pixels at the first turn, different goal
        return base, base.targets[1], source
    return perturb(np.random.default_rng([seed, 2, index]), base), base.targets[1], source


def _dialog(seed: int, index: int, turns: int, size: int, used: set[str],
            cache: dict[Scene, np.ndarray]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    scene, target, map_id = _dialog_scene(seed, index, size)
    if scene not in cache:
        cache[scene] = render_map(scene)
    rng = np.random.default_rng([seed, 3, index])
    first = _first_instruction(rng, scene, target, used)
    records, images = [], {}
    for t, (x, y) in enumerate(_views(scene, target, turns), start=1):
        rid = f"d{index:03d}_t{t}"
        answer = first if t == 1 else _turn_answer(rng, scene, target, (x, y), t == turns)
        images[f"images/{rid}.png"] = png_bytes(cache[scene][y:y + size, x:x + size])
        records.append({"id": rid, "image": f"images/{rid}.png", "answer": answer,
                        "first_instruction": first, "map_name": f"map_{map_id:03d}",
                        "turn": t})
    return records, images


def _shorten(rng: np.random.Generator, records: list[dict[str, Any]], turns: int) -> None:
    """Replace ~SHORT_SHARE of mid-dialog answers by terse replies a quality filter drops."""
    eligible = [i for i, r in enumerate(records) if 1 < r["turn"] < turns]
    count = min(len(eligible), round(SHORT_SHARE * len(records)))
    for i in sorted(int(k) for k in rng.choice(eligible, size=count, replace=False)):
        records[i]["answer"] = str(rng.choice(SHORT_ANSWERS))


def _write_bytes(area: Area, path: Path, data: bytes) -> None:
    """Replace a file atomically; an unchanged file is left untouched."""
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return
    area.write_bytes(path, data)


def generate(num_dialogs: int = 60, turns_per_dialog: int = 5, image_size: int = 96,
             seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The demo's records, and its PNG images by their `image` field."""
    if num_dialogs < 1 or turns_per_dialog < 2 or image_size < 32:
        raise ValueError("need num_dialogs >= 1, turns_per_dialog >= 2 and image_size >= 32")
    records: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}
    used: set[str] = set()
    cache: dict[Scene, np.ndarray] = {}
    for index in range(num_dialogs):
        recs, pngs = _dialog(seed, index, turns_per_dialog, image_size, used, cache)
        records += recs
        images.update(pngs)
    _shorten(np.random.default_rng([seed, 4]), records, turns_per_dialog)
    return records, images


def make_demo(out_dir: Path, num_dialogs: int = 60, turns_per_dialog: int = 5,
              image_size: int = 96, seed: int = 0, fmt: str = "json",
              per_shard: int = SHARD_RECORDS) -> Path:
    """Write the demo in one input format; return what --annotations takes.

    json / jsonl: OUT_DIR/images/*.png and OUT_DIR/annotations.json(l); parquet:
    OUT_DIR/parquet/part-*.parquet; webdataset: OUT_DIR/webdataset/*.tar; hf:
    OUT_DIR/hf (save_to_disk). The shard formats hold the PNG bytes themselves (Parquet
    and hf in the `image` column, WebDataset as `{id}.png`, the other fields in `{id}.json`),
    `per_shard` records a file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    records, images = generate(num_dialogs, turns_per_dialog, image_size, seed)
    out_dir = Path(out_dir)
    if fmt in ("json", "jsonl"):
        return _write_files(out_dir, records, images, fmt)
    if fmt == "webdataset":
        samples = ((r["id"], {"png": images[r["image"]], "json": _meta(r)}) for r in records)
        writers.write_tar_shards(out_dir / fmt, samples, per_shard)
        return out_dir / fmt
    rows = [{**r, "image": images[r["image"]]} for r in records]
    if fmt == "parquet":
        writers.write_parquet_files(out_dir / fmt, rows, per_shard, per_shard)
        return out_dir / fmt
    return writers.write_hf(out_dir / fmt, rows, "image", -(-len(rows) // per_shard))


def _meta(record: dict[str, Any]) -> bytes:
    rest = {k: v for k, v in record.items() if k != "image"}
    return json.dumps(rest, ensure_ascii=False).encode("utf-8")


def _write_files(out_dir: Path, records: list[dict[str, Any]], images: dict[str, bytes],
                 fmt: str) -> Path:
    area = Area(out_dir)
    area.ensure_root()
    for name, data in images.items():
        _write_bytes(area, out_dir / name, data)
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=1, sort_keys=False, ensure_ascii=False) + "\n"
    path = out_dir / f"annotations.{fmt}"
    _write_bytes(area, path, text.encode("utf-8"))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hnm.demo",
        description="Write a small synthetic AVDN-style aerial navigation dataset.")
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument("--num-dialogs", type=int, default=60)
    parser.add_argument("--turns-per-dialog", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default="json",
                        help="json (default: annotations.json and image files), jsonl, or "
                        "shards holding the images: parquet, webdataset, hf")
    parser.add_argument("--per-shard", type=int, default=SHARD_RECORDS,
                        help=f"records per shard file ({SHARD_RECORDS})")
    args = parser.parse_args(argv)
    try:
        path = make_demo(args.out_dir, args.num_dialogs, args.turns_per_dialog,
                         args.image_size, args.seed, args.format, args.per_shard)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.num_dialogs * args.turns_per_dialog} records to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
