"""A synthetic image-text dataset with precomputed embeddings: runs without any model.

Made to reach every path of the audit: paraphrased answers (text near-duplicates), repeated
image files and byte-identical copies (visual duplicates), short answers (ineligible).
`python tests/synthetic.py OUT --n 10000` writes one for timing runs.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

DIRS = ("north", "south", "east", "west", "northeast", "southwest")
THINGS = ("red roof", "grey building", "small lake", "yellow field", "bridge", "crossroads")
MOVES = ("fly", "keep going", "turn and head", "go a little further", "descend and move")


def _phrases(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct answers, most of them long enough to be eligible."""
    out: dict[str, None] = {}
    while len(out) < count:
        d, t, m = rng.choice(DIRS), rng.choice(THINGS), rng.choice(MOVES)
        extra = " until you see the " + str(rng.choice(THINGS)) if rng.random() < 0.4 else ""
        out[f"{m} {d} toward the {t}{extra} ({len(out)})"] = None
    return list(out)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _png(colour: np.ndarray, pattern: np.ndarray, size: int) -> bytes:
    pixels = np.clip(colour[None, None, :] + pattern[:size, :size, None], 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_dataset(root: Path, n: int = 240, seed: int = 0, image_size: int = 24,
                 dims: tuple[int, int] = (24, 32)) -> dict:
    """Write ROOT/annotations.jsonl, ROOT/images/*.png, ROOT/{image,text}_embeddings.npy.

    `dims`: widths of the saved (visual, text) embeddings; wider ones are random
    projections of the same vectors, for realistic search costs.
    Returns the paths as a dict (annotations, image_dir, image_embeddings, text_embeddings).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    num_scenes = max(2, n // 20)
    phrases = _phrases(rng, max(4, n))
    # answers about one scene are alike (similarity near 0.4), others near 0.15; a few
    # paraphrase their neighbour (0.75 to 0.97): hard negatives reach every threshold step
    home = rng.integers(0, num_scenes, len(phrases))
    topic = rng.normal(size=(num_scenes, 32))
    T = _unit(0.5 * rng.normal(size=(1, 32)) + 0.7 * topic[home]
              + rng.normal(size=(len(phrases), 32)))
    para = np.flatnonzero(rng.random(len(phrases)) < 0.1)
    para = para[para > 0]
    home[para] = home[para - 1]
    spread = rng.uniform(0.04, 0.15, size=(len(para), 1))
    T[para] = _unit(T[para - 1] + spread * rng.normal(size=(len(para), 32)))
    scene = rng.integers(0, num_scenes, n)
    by_scene = [np.flatnonzero(home == s) for s in range(num_scenes)]
    text_ids = np.array([rng.choice(by_scene[s]) if len(by_scene[s]) and rng.random() < 0.9
                         else rng.integers(0, len(phrases)) for s in scene])
    protos = rng.normal(size=(num_scenes, 24))
    V = _unit(protos[scene] + 0.45 * rng.normal(size=(n, 24)))
    records, colours = [], rng.integers(30, 220, size=(num_scenes, 3))
    pattern = rng.integers(-25, 25, size=(image_size, image_size))
    for i in range(n):
        text = phrases[text_ids[i]] if rng.random() > 0.05 else "yes"
        image = f"images/{i:05d}.png"
        reuse = i > 0 and rng.random() < 0.04  # the same file again, or a byte copy of it
        if reuse:
            j = int(rng.integers(0, i))
            V[i] = V[j]
            image = records[j]["image"] if rng.random() < 0.5 else image
            data = (root / records[j]["image"]).read_bytes()
        else:
            data = _png(colours[scene[i]].astype(float) + 20 * V[i, :3], pattern, image_size)
        if image == f"images/{i:05d}.png":
            (root / image).write_bytes(data)
        records.append({"id": f"s{i:05d}", "image": image, "text": text,
                        "group": f"g{i // 4}", "extra": i})
    text_rows = T[text_ids]
    text_rows[[r["text"] == "yes" for r in records]] = _unit(rng.normal(size=(32,)))
    (root / "annotations.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    np.save(root / "image_embeddings.npy", _widen(rng, V, dims[0]))
    np.save(root / "text_embeddings.npy", _widen(rng, text_rows, dims[1]))
    return {"annotations": str(root / "annotations.jsonl"), "image_dir": str(root),
            "image_embeddings": str(root / "image_embeddings.npy"),
            "text_embeddings": str(root / "text_embeddings.npy")}


def _widen(rng: np.random.Generator, x: np.ndarray, dim: int) -> np.ndarray:
    return x if dim == x.shape[1] else _unit(x @ rng.normal(size=(x.shape[1], dim)))


def mine_args(paths: dict, output_dir: Path, *extra: str) -> list[str]:
    """The `hnm mine` command line for a synthetic dataset (no model, no blacklist)."""
    return ["mine", "--annotations", paths["annotations"], "--image-dir", paths["image_dir"],
            "--image-embeddings", paths["image_embeddings"], "--text-embeddings",
            paths["text_embeddings"], "--blacklist", "", "--output-dir", str(output_dir),
            "--n-clusters", "8", "--quiet", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dims", default="24,32", help="visual,text embedding widths")
    args = parser.parse_args()
    dims = tuple(int(d) for d in args.dims.split(","))
    paths = make_dataset(args.out, args.n, args.seed, dims=dims)
    print("hnm " + shlex.join(mine_args(paths, args.out / "run")))


if __name__ == "__main__":
    main()
