"""A generated AVDN processed dataset, in the layout the original script reads: pickled
chunks of index -> item, image tensors, tokenizer outputs and a language-model negative."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from builders import VOCAB, answer

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# AVDN's preprocessing (data/Normalizer.py): (pixels 0-255 - RGB_MEAN) / RGB_STD
AVDN_RGB = ((60.134, 49.697, 40.746), (29.99, 24.498, 22.046))


def normalise(pixels: Any, way: str = "avdn") -> Any:
    """A C x H x W float array or tensor of pixels in [0, 1], normalised as AVDN's
    preprocessing does (in 0-255 units) or the ImageNet way (0-1 units)."""
    import numpy as np

    mean, std = (np.array(v, np.float32).reshape(3, 1, 1)
                 for v in (AVDN_RGB if way == "avdn" else IMAGENET))
    scale = 255 if way == "avdn" else 1
    if hasattr(pixels, "numpy"):
        import torch

        mean, std = torch.from_numpy(mean), torch.from_numpy(std)
    return (pixels * scale - mean) / std


def tokenizer(folder: Path) -> Any:
    """A fast word-piece tokenizer over the tests' small vocabulary, saved in `folder`."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    return tok


def image(seed: int, size: int = 16, way: str = "avdn") -> Any:
    """A C x H x W tensor of a noisy colour that depends on the seed, normalised as AVDN's
    preprocessing does (or `way` imagenet)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2
    pixels = (base + (torch.rand(3, size, size, generator=g) - 0.5) * 0.3).clamp(0, 1)
    return normalise(pixels, way)


def item(i: int, tok: Any) -> dict[str, Any]:
    """One processed item, as the training code's preprocessing writes it."""
    def encode(text: str, length: int) -> Any:
        return tok(text, max_length=length, padding="max_length", truncation=True,
                   return_tensors="pt")

    text = answer(i)
    negative = f"keep flying south and stop above the lake, then land {i}"
    return {"current_view_image": image(i), "answer": text,
            "question": f"where do I go from waypoint {i}?",
            "first_instruction": f"find the building number {i // 2}",
            "dialog_context": [f"turn {t}" for t in range(i % 3)], "map_name": f"map_{i % 4}",
            "tokenized_input": encode(f"where do i go {i}", 12),
            "tokenized_answer": encode(text, 12),
            "contrastive_data": {"negative_text": negative,
                                 "tokenized_negative": encode(negative, 12)}}


def write(root: Path, chunks: int = 3, per_chunk: int = 4, tok: Any = None) -> Path:
    """`root/chunk_{k}.pkl`, each a pickled dict of `per_chunk` items keyed by their global
    index; returns `root`."""
    tok = tok or tokenizer(root.parent / f"{root.name}_tokenizer")
    root.mkdir(parents=True, exist_ok=True)
    for k in range(chunks):
        items = {i: item(i, tok) for i in range(k * per_chunk, (k + 1) * per_chunk)}
        with open(root / f"chunk_{k}.pkl", "wb") as handle:
            pickle.dump(items, handle)
    return root
