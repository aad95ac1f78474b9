"""The demo's aerial maps: a random layout of a road, water, fields and buildings, the
landmarks a dialog can name, and the map rendered to pixels."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[int, int]
Line = tuple[Point, ...]
RGB = tuple[int, int, int]


MAP_SCALE = 1.75  # map side / view side: each turn's view is a window panning over the map

ROOFS: dict[str, RGB] = {"red": (172, 64, 52), "grey": (134, 136, 142)}
CROPS: dict[str, RGB] = {"green": (74, 138, 58), "yellow": (204, 182, 92)}
WATER: RGB = (48, 92, 150)
ROAD: RGB = (152, 150, 144)


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
