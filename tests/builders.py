"""Small datasets, tiny random Hugging Face models and CLI helpers shared by the tests."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hnm.cli import main
from hnm.index import faiss_available

FAST = ["--visual-encoder", "pixels", "--num-workers", "0"]
# IVF indexes and FAISS's own API need FAISS; hnm runs without it (`make test-machines`)
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="FAISS is not installed")
REPO = Path(__file__).absolute().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEMO_FIELDS = ["--text-field", "answer", "--group-field", "first_instruction"]

SUBJECTS = ("the red roof", "the grey building", "the small lake", "the yellow field",
            "the river bridge", "the road crossing", "the green field", "the parking lot")
MOTIONS = ("fly north along the road to reach", "turn left and continue toward",
           "go east past the trees until", "land on the far side of",
           "keep flying south and stop above", "circle once and descend near")


def answer(i: int) -> str:
    """A distinct answer longer than the default minimum answer length."""
    return (f"{MOTIONS[i % len(MOTIONS)]} {SUBJECTS[(i // len(MOTIONS)) % len(SUBJECTS)]}, "
            f"waypoint {i}")


def records(n: int, text: str = "text", image: str = "image") -> list[dict[str, Any]]:
    """Caption-style records r0..r{n-1}; pairs share a group; one extra field each."""
    return [{"id": f"r{i}", image: f"img/{i}.png", text: answer(i), "group": f"g{i // 2}",
             "extra": {"turn": i, "tags": ["a", i]}} for i in range(n)]


def write_image(path: Path, seed: int, size: int = 24) -> None:
    """A noise PNG whose colour balance depends on the seed (so images differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=3)
    noise = rng.integers(-40, 40, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)


def write_images(root: Path, recs: list[dict[str, Any]], image: str = "image") -> None:
    for i, r in enumerate(recs):
        if isinstance(r.get(image), str):
            write_image(root / r[image], i)


def write_annotations(path: Path, recs: Any, fmt: str = "json") -> Path:
    """JSON (list or dict, whatever `recs` is) or JSONL (one record a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    else:
        path.write_text(json.dumps(recs, indent=1), encoding="utf-8")
    return path


def dataset(root: Path, n: int = 6, fmt: str = "json", **names: str) -> Path:
    """Records plus image files under `root`; returns the annotation file."""
    recs = records(n, **names)
    write_images(root, recs, names.get("image", "image"))
    return write_annotations(root / f"annotations.{fmt}", recs, fmt)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under `root` (to prove inputs were not touched)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One record a line; lines end at "\\n" only, as hnm writes them."""
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def cli(capsys: Any, *args: Any) -> tuple[int, str, str]:
    """hnm.cli.main in this process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse exits instead of returning
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys: Any, root: Path, out: Path, args: list, *culprits: str) -> str:
    """Run the CLI, expecting exit status 2, one error line naming every culprit, no output
    files and untouched inputs. Returns the message after 'hnm: error: '."""
    before = snapshot(root)
    existed = out.exists()
    rc, stdout, err = cli(capsys, *FAST, "--output-dir", out, *args)
    assert rc == 2, (stdout, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("hnm: error: "), err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, err)
    if existed:
        assert not any(out.iterdir()), sorted(out.iterdir())
    else:
        assert not out.exists()
    assert snapshot(root) == before
    return lines[0][len("hnm: error: "):]


def launch(*args: Any, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python launch.py ARGS` from the repository root, the way a user types it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "launch.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- tiny random HF models

VOCAB = ("[PAD] [UNK] [CLS] [SEP] [MASK] fly north south east west along road river lake "
         "field red grey roof building bridge turn left right go keep land near far the to "
         "of and on you are reach stop above small big green yellow").split()


def tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP-style vision tower with projection, and its processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8,
                              projection_dim=16)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
                       ).save_pretrained(folder)
    return folder


def tiny_joint_clip(folder: Path) -> Path:
    """A randomly initialised CLIP with both towers and projections (one joint space), a
    word-piece tokenizer from the small vocab (its [SEP] ends a text, as CLIP's end token
    does), and an image processor."""
    import torch
    from transformers import BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    text = {"vocab_size": len(VOCAB), "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 40,
            "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "projection_dim": 16}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 16}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False
                       ).save_pretrained(folder)
    return folder


def tiny_open_clip(folder: Path) -> Path:
    """A randomly initialised open_clip ViT of a few layers, saved as open_clip's own
    `local-dir:` folder (config and weights; open_clip's bundled tokenizer)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                          "patch_size": 8},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4,
                        "layers": 2}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    model = open_clip.create_model(f"local-dir:{folder}")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def tiny_bert(folder: Path) -> Path:
    """A randomly initialised BERT with a word-piece tokenizer built from a small vocab."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def traced_peak(action: Any) -> int:
    """The most bytes Python held at once (tracemalloc) while `action()` ran."""
    gc.collect()
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def mapping_of(address: int) -> str | None:
    """The file /proc/self/maps names for the mapping holding `address` (None: anonymous
    memory, the process's own)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < stop:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None

