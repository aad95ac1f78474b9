"""Scale benchmark: whole runs through launch.py from precomputed embeddings, at 100k-1M
samples with realistic phrase reuse, and a templated-captions case (a few hundred captions
shared by tens of thousands of images); wall time, time per phase, peak memory, recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 65536  # rows generated per step: keeps the generator's own memory small

# ---------------------------------------------------------------- realistic data

SYLLABLES = "ba ro ne ti ku la mo si de vu ga pe lo ri na to".split()
AFFIRMATIONS = ("yes", "okay", "turn left", "keep going", "go straight")


def _words(rng: np.random.Generator, count: int) -> list[str]:
    """Pseudo-words of 2-3 syllables (about 6 characters, like real answer words)."""
    return sorted({"".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
                   for _ in range(count)})


def _phrases(rng: np.random.Generator, words: list[str], count: int) -> list[str]:
    """Distinct answers of every length class: < 20 characters (too short), < 60, < 100, more."""
    out: dict[str, None] = {}
    lengths = (1, 2, 4, 6, 9, 12, 16, 22)
    while len(out) < count:
        need = count - len(out)
        sizes = rng.choice(lengths, size=need)
        picks = rng.integers(0, len(words), size=int(sizes.sum()))
        for phrase in np.split(picks, np.cumsum(sizes)[:-1]):
            out[" ".join(words[w] for w in phrase)] = None
    return list(out)[:count]


def _bag_of_words(phrases: list[str], rng: np.random.Generator, dim: int) -> np.ndarray:
    """Text embeddings: idf-weighted mean word vector plus a weak shared direction (phrases
    sharing rare words are alike, frequent words matter less, as with sentence encoders)."""
    index: dict[str, int] = {}
    tokens = [np.array([index.setdefault(w, len(index)) for w in p.split()], np.int64)
              for p in phrases]
    words = list(index)
    df = np.bincount(np.concatenate([np.unique(t) for t in tokens]), minlength=len(words))
    idf = np.log(len(phrases) / np.maximum(df, 1)) + 0.1
    vectors = rng.normal(size=(len(words), dim)) * idf[:, None]
    common = rng.normal(size=dim) * float(np.median(np.linalg.norm(vectors, axis=1))) * 0.3
    out = np.zeros((len(phrases), dim), np.float32)
    for s in range(0, len(phrases), BLOCK):
        part = tokens[s:s + BLOCK]
        flat = np.concatenate(part)
        owner = np.repeat(np.arange(len(part)), [len(t) for t in part])
        block = np.zeros((len(part), dim))
        np.add.at(block, owner, vectors[flat])
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:s + BLOCK] = block + common / np.linalg.norm(common) * 0.3
    return out


def realistic(root: Path, n: int, dim: int, text_dim: int, seed: int) -> dict[str, str]:
    """Dialogs of 5 samples over places and scene types; answers reused Zipf-like (about
    half of the samples' answers are distinct), ~3% short affirmations."""
    rng = np.random.default_rng(seed)
    words = _words(rng, 600)
    vocab = _phrases(rng, words, n) + list(AFFIRMATIONS)
    weights = 1.0 / (np.arange(n) + 0.05 * n)
    text_ids = rng.choice(n, size=n, p=weights / weights.sum())
    banned = rng.random(n) < 0.03
    text_ids[banned] = n + rng.integers(0, len(AFFIRMATIONS), int(banned.sum()))
    used, text_ids = np.unique(text_ids, return_inverse=True)
    phrases = [vocab[i] for i in used]
    T = _bag_of_words(phrases, rng, text_dim)
    groups = np.arange(n) // 5
    places = max(1, n // 100)  # ~20 dialogs per place, 30 scene types
    scene_of_place = rng.integers(0, 30, places)
    place_of_group = rng.integers(0, places, groups[-1] + 1)
    scene = rng.normal(size=(30, dim)).astype(np.float32)
    place = rng.normal(size=(places, dim)).astype(np.float32)
    image = _open(root / "image_embeddings.npy", (n, dim))
    text = _open(root / "text_embeddings.npy", (n, text_dim))
    for s in range(0, n, BLOCK):  # BLOCK is a multiple of 5: a dialog never straddles blocks
        g = groups[s:s + BLOCK]
        where = place_of_group[g]
        dialog = rng.normal(size=(g[-1] - g[0] + 1, dim)).astype(np.float32)[g - g[0]]
        image[s:s + BLOCK] = (scene[scene_of_place[where]] + 0.7 * place[where]
                              + 0.5 * dialog + 0.9 * rng.normal(size=(len(g), dim)))
        text[s:s + BLOCK] = T[text_ids[s:s + BLOCK]]
    image.flush()
    text.flush()
    with open(root / "annotations.jsonl", "w", encoding="utf-8") as out:
        for s in range(0, n, BLOCK):
            out.write("".join(json.dumps({"id": i, "image": f"img/{i}.jpg",
                                          "text": phrases[text_ids[i]], "group": int(groups[i])})
                              + "\n" for i in range(s, min(n, s + BLOCK))))
    return _paths(root)


# ---------------------------------------------------------------- templated captions

SCENES = {  # scene type -> (what is there, where it is)
    "farmland": ("a piece of farmland", "green fields"), "parking": ("cars", "the parking lot"),
    "residential": ("houses", "the residential area"), "river": ("a river", "the trees"),
    "forest": ("many trees", "the forest"), "beach": ("the sea", "a beach"),
    "airport": ("planes", "the airport"), "port": ("boats", "the port"),
    "bridge": ("a bridge", "the river"), "church": ("a church", "the square"),
    "desert": ("sand", "the desert"), "industrial": ("factories", "the industrial area"),
    "meadow": ("grass", "the meadow"), "mountain": ("mountains", "the valley"),
    "park": ("a park", "the city"), "playground": ("a playground", "the school"),
    "pond": ("a pond", "the grass"), "railway": ("railway tracks", "the station"),
    "stadium": ("a stadium", "the buildings"), "storage": ("storage tanks", "the plant"),
    "square": ("a square", "the buildings"), "school": ("a school", "the houses"),
    "resort": ("a resort", "the pool"), "viaduct": ("a viaduct", "the roads"),
    "center": ("tall buildings", "the center"), "commercial": ("shops", "the street"),
    "dense": ("dense buildings", "the block"), "sparse": ("sparse houses", "the land"),
    "baseball": ("a baseball field", "the trees"), "bareland": ("bare land", "the roads"),
}
TEMPLATES = ("There is {what} .", "There is {what} near {where} .",
             "Lots of {what} in {where} .", "Many {what} are around {where} .",
             "Some {what} are next to {where} .", "{what} surrounded by {where} .",
             "It is {what} in {where} .", "We can see {what} and {where} .",
             "A large area of {what} .", "{what} with {where} nearby .",
             "Several {what} beside {where} .")


def templated(root: Path, n: int, dim: int, text_dim: int, seed: int, base: int = 1600,
              noise: float = 0.05) -> dict[str, str]:
    """`base` images of 30 scene types, each captioned with one of its type's ~11 captions
    (~320 distinct in all), replicated with small visual noise up to n samples; every sample
    is its own group (as the first caption of each image of an aerial captioning set)."""
    rng = np.random.default_rng(seed)
    captions = [[t.format(what=w, where=p) for t in TEMPLATES] for w, p in SCENES.values()]
    flat = [c for per in captions for c in per]
    T = _bag_of_words([c.lower() for c in flat], rng, text_dim)
    kinds = rng.integers(0, len(SCENES), base)
    caption = kinds * len(TEMPLATES) + rng.integers(0, len(TEMPLATES), base)
    scene = rng.normal(size=(len(SCENES), dim))
    images = scene[kinds] + 0.8 * rng.normal(size=(base, dim))
    image = _open(root / "image_embeddings.npy", (n, dim))
    text = _open(root / "text_embeddings.npy", (n, text_dim))
    rows = np.arange(n) % base
    for s in range(0, n, BLOCK):
        r = rows[s:s + BLOCK]
        image[s:s + BLOCK] = images[r] + noise * rng.normal(size=(len(r), dim))
        text[s:s + BLOCK] = T[caption[r]]
    image.flush()
    text.flush()
    with open(root / "annotations.jsonl", "w", encoding="utf-8") as out:
        out.write("".join(json.dumps({"id": i, "image": f"img/{rows[i]}.jpg",
                                      "text": flat[caption[rows[i]]]}) + "\n"
                          for i in range(n)))
    return _paths(root)


def _open(path: Path, shape: tuple[int, int]) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _paths(root: Path) -> dict[str, str]:
    return {"annotations": str(root / "annotations.jsonl"),
            "image_embeddings": str(root / "image_embeddings.npy"),
            "text_embeddings": str(root / "text_embeddings.npy")}
