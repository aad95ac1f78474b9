"""Deterministic generator of a small synthetic AVDN-style aerial navigation demo dataset."""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hnm import writers
from hnm.safety import Area

Point = tuple[int, int]
Line = tuple[Point, ...]
RGB = tuple[int, int, int]

MAP_SCALE = 1.75  # map side / view side: each turn's view is a window panning over the map
SHORT_SHARE = 0.09  # share of records whose answer is a short affirmation or motion word
EXACT_TWIN, PERTURBED_TWIN = 3, 7  # dialog index mod 10 that re-flies the previous dialog's map
FORMATS = ("json", "jsonl", "parquet", "webdataset", "hf")
SHARD_RECORDS = 100  # records per shard file: the default demo (300 records) has three

ROOFS: dict[str, RGB] = {"red": (172, 64, 52), "grey": (134, 136, 142)}
CROPS: dict[str, RGB] = {"green": (74, 138, 58), "yellow": (204, 182, 92)}
WATER: RGB = (48, 92, 150)
ROAD: RGB = (152, 150, 144)
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


@dataclass(frozen=True)
class Building:
    x: int
    y: int
    w: int
    h: int
    roof: str


@dataclass(frozen=True)
class Field:
    box: tuple[int, int, int, int]
    crop: str
    angle: float
    period: float


@dataclass(frozen=True)
class Water:
    kind: str  # "lake" (box is its ellipse) or "river" (line, width)
    box: tuple[int, int, int, int]
    line: Line
    width: int


@dataclass(frozen=True)
class Road:
    kind: str  # "straight", "crossing" or "curved"
    axis: str  # "ns" or "ew" (a crossing uses both)
    lines: tuple[Line, ...]
    width: int


@dataclass(frozen=True)
class Scene:
    size: int  # side of one view in pixels; the map is MAP_SCALE times larger
    ground: RGB
    fields: tuple[Field, ...]
    water: Water | None
    road: Road
    buildings: tuple[Building, ...]
    start: Point  # top-left corner of the first view
    targets: tuple[int, int]  # landmark indices: the base dialog's and its twin's goal
    noise_seed: int


@dataclass(frozen=True)
class Landmark:
    phrase: str
    x: float
    y: float


def map_side(size: int) -> int:
    return round(size * MAP_SCALE)


# ---------------------------------------------------------------- scene layout


def _wave(rng: np.random.Generator, m: int, axis: str, amp: float, cycles: float) -> Line:
    """A line across the map; amp=0 is straight, cycles=0.5 a single bend, more a meander."""
    t = np.linspace(0.0, m, 41)
    pos = rng.uniform(0.3, 0.7) * m
    phase = 0.0 if cycles == 0.5 else rng.uniform(0.0, 2 * math.pi)
    across = pos + amp * np.sin(2 * math.pi * cycles * t / m + phase)
    pts = zip(across, t, strict=True) if axis == "ns" else zip(t, across, strict=True)
    return tuple((round(float(x)), round(float(y))) for x, y in pts)


def _road(rng: np.random.Generator, m: int) -> Road:
    kind = str(rng.choice(["straight", "crossing", "curved"]))
    axis = str(rng.choice(["ns", "ew"]))
    width = max(3, round(m * 0.035))
    if kind == "crossing":
        lines = (_wave(rng, m, "ns", 0.0, 0.0), _wave(rng, m, "ew", 0.0, 0.0))
    elif kind == "curved":
        bend = rng.uniform(0.12, 0.22) * m * rng.choice([-1.0, 1.0])
        lines = (_wave(rng, m, axis, bend, 0.5),)
    else:
        lines = (_wave(rng, m, axis, 0.0, 0.0),)
    return Road(kind, axis, lines, width)


def _water(rng: np.random.Generator, m: int, road: Road) -> Water | None:
    roll = rng.uniform()
    if roll < 0.45:
        cx, cy = rng.uniform(0.2, 0.8, size=2) * m
        rx, ry = rng.uniform(0.08, 0.16, size=2) * m
        box = (round(cx - rx), round(cy - ry), round(cx + rx), round(cy + ry))
        return Water("lake", box, (), 0)
    if roll < 0.8:
        # rivers run across the road's direction so that the two usually meet at a bridge
        axis = "ew" if road.axis == "ns" else "ns"
        line = _wave(rng, m, axis, rng.uniform(0.03, 0.08) * m, float(rng.uniform(0.8, 1.6)))
        return Water("river", (0, 0, 0, 0), line, max(4, round(m * 0.05)))
    return None


def _fields(rng: np.random.Generator, m: int) -> tuple[Field, ...]:
    fields = []
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = (rng.uniform(0.0, 0.75, size=2) * m).round().astype(int)
        w, h = (rng.uniform(0.15, 0.35, size=2) * m).round().astype(int)
        crop = str(rng.choice(list(CROPS)))
        fields.append(Field((int(x0), int(y0), int(min(m, x0 + w)), int(min(m, y0 + h))),
                            crop, float(rng.uniform(0, math.pi)), float(rng.uniform(3, 6))))
    return tuple(fields)


def _clear(x: float, y: float, gap: float, road: Road, water: Water | None) -> bool:
    """Whether a building at (x, y) keeps `gap` pixels off roads, rivers and lakes."""
    lines = [(line, road.width) for line in road.lines]
    if water is not None and water.kind == "river":
        lines.append((water.line, water.width))
    for line, width in lines:
        d = np.hypot(*(np.asarray(line, dtype=float) - (x, y)).T).min()
        if d < gap + width / 2:
            return False
    if water is not None and water.kind == "lake":
        x0, y0, x1, y1 = water.box
        rx, ry = (x1 - x0) / 2 + gap, (y1 - y0) / 2 + gap
        return ((x - (x0 + x1) / 2) / rx) ** 2 + ((y - (y0 + y1) / 2) / ry) ** 2 > 1
    return True


def _buildings(rng: np.random.Generator, m: int, road: Road, water: Water | None,
               ) -> tuple[Building, ...]:
    out: list[Building] = []
    for _ in range(int(rng.integers(2, 6))):
        for _try in range(30):  # rejection sampling keeps roofs off roads and water
            x, y = rng.uniform(0.08, 0.92, size=2) * m
            w, h = rng.uniform(0.05, 0.11, size=2) * m
            gap = max(w, h) / 2 + 2
            apart = all(math.hypot(x - b.x, y - b.y) > gap + max(b.w, b.h) / 2 for b in out)
            if apart and _clear(x, y, gap, road, water):
                roof = str(rng.choice(list(ROOFS)))
                out.append(Building(round(x), round(y), round(w), round(h), roof))
                break
    return tuple(out)


def landmarks(scene: Scene) -> list[Landmark]:
    """Nameable things on the map, in a fixed order so twins can refer to them by index."""
    marks = [Landmark(f"the {b.roof}-roofed building", b.x, b.y) for b in scene.buildings]
    if scene.water is not None and scene.water.kind == "lake":
        x0, y0, x1, y1 = scene.water.box
        marks.append(Landmark("the lake", (x0 + x1) / 2, (y0 + y1) / 2))
    elif scene.water is not None:
        marks.append(Landmark("the river", *scene.water.line[len(scene.water.line) // 2]))
    if scene.road.kind == "crossing":
        marks.append(Landmark("the crossroads", scene.road.lines[0][0][0],
                              scene.road.lines[1][0][1]))
    for f in scene.fields:
        marks.append(Landmark(f"the {f.crop} field", (f.box[0] + f.box[2]) / 2,
                              (f.box[1] + f.box[3]) / 2))
    return marks


def _pick_targets(rng: np.random.Generator, scene: Scene) -> tuple[int, int]:
    """Two goals far from the start view, with different names so twins' answers differ."""
    marks = landmarks(scene)
    cx, cy = scene.start[0] + scene.size / 2, scene.start[1] + scene.size / 2
    dist = [math.hypot(mk.x - cx, mk.y - cy) for mk in marks]
    far = [i for i, d in enumerate(dist) if d > 0.45 * scene.size]
    rest = [int(i) for i in np.argsort(dist)[::-1]]  # farthest first
    order = [int(i) for i in rng.permutation(far)] if far else rest
    first = order[0]
    other = [i for i in order + rest if marks[i].phrase != marks[first].phrase]
    return first, (other[0] if other else order[-1])


def make_scene(rng: np.random.Generator, size: int) -> Scene:
    """Random map layout: one road network, maybe water, fields and a few buildings."""
    m = map_side(size)
    road = _road(rng, m)
    water = _water(rng, m, road)
    r, g, b = (int(c) for c in rng.integers(-10, 11, size=3) + (118, 126, 88))
    fields = _fields(rng, m)
    buildings = _buildings(rng, m, road, water)
    span = m - size
    corner = rng.integers(0, 2, size=2) * span  # start in a corner: long flights, varied routes
    jitter = rng.integers(0, max(1, span // 6), size=2)
    sx, sy = (int(v) for v in np.abs(corner - jitter))
    scene = Scene(size, (r, g, b), fields, water, road, buildings, (sx, sy), (0, 0),
                  int(rng.integers(2**31)))
    return replace(scene, targets=_pick_targets(rng, scene))


def perturb(rng: np.random.Generator, scene: Scene) -> Scene:
    """A near-identical re-flight of a map: tinted ground, one roof recoloured, start nudged."""
    r, g, b = (int(np.clip(c + d, 0, 255))
               for c, d in zip(scene.ground, rng.integers(-6, 7, size=3), strict=True))
    buildings = list(scene.buildings)
    k = int(rng.integers(len(buildings))) if buildings else -1
    if k >= 0:
        flipped = "grey" if buildings[k].roof == "red" else "red"
        buildings[k] = replace(buildings[k], roof=flipped)
    span = map_side(scene.size) - scene.size
    sx, sy = (int(np.clip(v + d, 0, span))
              for v, d in zip(scene.start, rng.integers(-3, 4, size=2), strict=True))
    return replace(scene, ground=(r, g, b), buildings=tuple(buildings), start=(sx, sy),
                   noise_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------- rendering


def _ground(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Base soil colour with smooth blotches, as float RGB of the whole map."""
    m = map_side(scene.size)
    coarse = Image.fromarray(rng.normal(0.0, 1.0, (6, 6)).astype(np.float32))
    blotch = np.asarray(coarse.resize((m, m), Image.Resampling.BILINEAR))
    base = np.asarray(scene.ground, dtype=np.float32)
    return base + blotch[..., None] * np.array([7.0, 9.0, 5.0], dtype=np.float32)


def _paint_fields(arr: np.ndarray, fields: tuple[Field, ...]) -> None:
    for f in fields:
        x0, y0, x1, y1 = f.box
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        # crop rows: a stripe pattern at the field's own angle
        phase = (xx * math.cos(f.angle) + yy * math.sin(f.angle)) * (2 * math.pi / f.period)
        shade = 1.0 + 0.08 * np.sin(phase)
        arr[y0:y1, x0:x1] = np.asarray(CROPS[f.crop], dtype=np.float32) * shade[..., None]


def _draw_features(img: Image.Image, scene: Scene) -> None:
    draw = ImageDraw.Draw(img)
    water = scene.water
    if water is not None and water.kind == "lake":
        draw.ellipse(water.box, fill=WATER, outline=(70, 104, 80), width=2)
    elif water is not None:
        draw.line(water.line, fill=WATER, width=water.width, joint="curve")
    for line in scene.road.lines:
        draw.line(line, fill=ROAD, width=scene.road.width, joint="curve")
        draw.line(line, fill=(196, 194, 180), width=1)  # centre marking
    for b in scene.buildings:
        x0, y0, x1, y1 = b.x - b.w // 2, b.y - b.h // 2, b.x + b.w // 2, b.y + b.h // 2
        draw.rectangle((x0 + 2, y0 + 2, x1 + 2, y1 + 2), fill=(58, 60, 52))  # shadow
        draw.rectangle((x0, y0, x1, y1), fill=ROOFS[b.roof])
        ridge = ((x0, b.y), (x1, b.y)) if b.w >= b.h else ((b.x, y0), (b.x, y1))
        draw.line(ridge, fill=tuple(c - 30 for c in ROOFS[b.roof]), width=1)


def render_map(scene: Scene) -> np.ndarray:
    """The whole map as uint8 RGB; views are crops of it so overlapping turns agree."""
    rng = np.random.default_rng(scene.noise_seed)
    arr = _ground(scene, rng)
    _paint_fields(arr, scene.fields)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    _draw_features(img, scene)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, arr.shape)
    return np.clip(noisy.round(), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG with fixed options and no metadata chunks, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


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
