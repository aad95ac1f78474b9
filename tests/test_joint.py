"""One image-text model for both sides: its embeddings are the model's own joint-space
features; a run with it records cross and own scores, the same for any worker count; the
settings that cannot go together are one-line errors."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import DEMO_FIELDS, cli, read_jsonl, tiny_bert, tiny_joint_clip, tiny_open_clip
from PIL import Image

from hnm.demo import make_demo
from hnm.grid import finalize
from hnm.joint import build_image_encoder, build_joint_model

CPU = torch.device("cpu")
TEXTS = ["fly north along the road", "turn left past the red building",
         "land near the small lake", "fly north along the road until you reach the bridge"]


def usable(package: str) -> str | None:
    """Why `package` cannot be imported here (None: it can). open_clip and timm need a
    torchvision built for the installed torch: without one the tests skip, saying so."""
    try:
        importlib.import_module(package)
    except ImportError as exc:
        return f"{package} is not usable here ({exc}): pip install hnm's `joint` extra"
    return None


needs_open_clip = pytest.mark.skipif(usable("open_clip") is not None,
                                     reason=str(usable("open_clip")))
needs_timm = pytest.mark.skipif(usable("timm") is not None, reason=str(usable("timm")))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pictures(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((30 + 7 * i, 41, 3)) * 255).astype(np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_joint_clip(tmp_path_factory.mktemp("joint_clip"))


def test_hf_clip_embeds_both_sides_in_its_own_joint_space(clip_dir):
    """Images through the folder's processor and get_image_features, texts through its
    tokenizer and get_text_features: the model's own image_embeds and text_embeds."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    joint = build_joint_model(str(clip_dir), CPU)
    images = pictures()
    got_images = finalize(joint.encode(torch.stack([joint.preprocess(i) for i in images])))
    got_texts = finalize(joint.text.encode(TEXTS))
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    pixels = CLIPImageProcessor.from_pretrained(clip_dir)(images=images,
                                                         return_tensors="pt")["pixel_values"]
    want_texts = []
    with torch.no_grad():
        for text in TEXTS:  # one at a time: nothing padded
            out = model(**tokenizer([text], return_tensors="pt"), pixel_values=pixels[:1])
            want_texts.append(out.text_embeds[0].double().numpy())
        want_images = model(**tokenizer(TEXTS[:1], return_tensors="pt"),
                            pixel_values=pixels).image_embeds.double().numpy()
    assert np.abs(got_images - unit(want_images)).max() <= 1e-6
    assert np.abs(got_texts - unit(np.stack(want_texts))).max() <= 1e-6
    # a text's embedding does not depend on the other texts of its batch
    alone = np.concatenate([finalize(joint.text.encode([t])) for t in TEXTS])
    assert np.abs(alone - got_texts).max() <= 1e-6


@needs_open_clip
def test_open_clip_embeds_both_sides_in_its_own_joint_space(tmp_path):
    import open_clip

    folder = tiny_open_clip(tmp_path / "oc")
    spec = f"open_clip:local-dir:{folder}"
    joint = build_joint_model(spec, CPU)
    assert joint.name == spec and "open_clip" in joint.version
    images = pictures()
    got_images = finalize(joint.encode(torch.stack([joint.preprocess(i) for i in images])))
    got_texts = finalize(joint.text.encode(TEXTS))
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        want_images = model.eval().encode_image(torch.stack([transform(i) for i in images]))
        want_texts = model.encode_text(tokenizer(TEXTS))
    assert np.abs(got_images - unit(want_images.double().numpy())).max() <= 1e-6
    assert np.abs(got_texts - unit(want_texts.double().numpy())).max() <= 1e-6


@needs_timm
def test_timm_image_encoder_is_the_models_pooled_features():
    import timm

    encoder = build_image_encoder("timm:resnet18", CPU)
    assert "random" in encoder.version
    images = pictures(3)
    got = finalize(encoder.encode(torch.stack([encoder.preprocess(i) for i in images])))
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    model.load_state_dict(encoder.model.state_dict())
    with torch.no_grad():
        want = model(torch.stack([encoder.preprocess(i) for i in images])).double().numpy()
    assert got.shape == (3, 512) and np.abs(got - unit(want)).max() <= 1e-6


def _run(capsys, annotations: Path, data: Path, out: Path, *extra) -> tuple[int, str]:
    rc, _, err = cli(capsys, "--annotations", annotations, "--image-dir", data, *DEMO_FIELDS,
                     "--output-dir", out, "--num-workers", "0", "--blacklist", "",
                     "--precision", "fp32", *extra)
    return rc, err


def test_demo_run_with_a_joint_model(capsys, clip_dir, tmp_path):
    """The joint model embeds the images and (--text-encoder joint) the texts: negatives
    carry their cross score and their anchor's own, exact to the model's embeddings;
    1 and 2 workers write the same bytes; a separate sentence encoder for the text rule
    adds a table of the joint model's texts."""
    data = tmp_path / "data"
    annotations = make_demo(data, num_dialogs=6)
    flags = ("--joint-model", clip_dir, "--text-encoder", "joint", "--min-cross-score-margin",
             "0.02", "--min-visual-similarity", "-1", "--cosine-threshold", "0.9")
    outs = [tmp_path / "one", tmp_path / "two"]
    for out, workers in zip(outs, ("1", "2")):
        rc, err = _run(capsys, annotations, data, out, *flags, "--cpu-workers", workers)
        assert rc == 0, err
    assert (outs[0] / "negatives.jsonl").read_bytes() == (outs[1] / "negatives.jsonl").read_bytes()
    rows = read_jsonl(outs[0] / "negatives.jsonl")
    V = np.load(outs[0] / "tables" / "visual.npy").astype(np.float64)
    T = np.load(outs[0] / "tables" / "text.npy").astype(np.float64)
    assert not (outs[0] / "tables" / "cross.npy").exists()  # the text table is the joint one
    records = json.loads(annotations.read_text())
    phrase = {}
    for r in records:
        phrase.setdefault(" ".join(r["answer"].lower().split()), len(phrase))
    row = {r["id"]: i for i, r in enumerate(records)}
    negs = 0
    for i, r in enumerate(rows):
        for n in r["negatives"]:
            j = row[n["id"]]
            pa, pj = (phrase[" ".join(records[k]["answer"].lower().split())] for k in (i, j))
            assert n["cross_score"] == round(float(V[i] @ T[pj]), 6)
            assert n["own_score"] == round(float(V[i] @ T[pa]), 6)
            if n["type"] == "hard":  # the margin rule let it through
                assert V[i] @ T[pj] <= V[i] @ T[pa] - 0.02
            negs += 1
    assert negs > 0
    skipped = sum((r["outcome"]["skipped"] or {}).get("cross_score", 0) for r in rows)
    metrics = json.loads((outs[0] / "metrics.json").read_text())
    assert metrics["global"]["skipped"]["cross_score"] == skipped > 0
    assert metrics["provenance"]["joint_space"].startswith(f"{clip_dir}: ")
    # the joint model beside a sentence encoder: the text rule in the sentence space, the
    # cross scores in the joint one (a table of its own)
    bert = tiny_bert(tmp_path / "bert")
    out = tmp_path / "sep"
    rc, err = _run(capsys, annotations, data, out, "--joint-model", clip_dir,
                   "--text-encoder", bert, "--max-cross-score-ratio", "0.95")
    assert rc == 0, err
    C = np.load(out / "tables" / "cross.npy")
    assert np.array_equal(C, T.astype(np.float32))  # the same joint texts
    assert np.load(out / "tables" / "text.npy").shape[1] == 32  # BERT's


@pytest.mark.parametrize("extra, message", [
    (("--max-cross-score-ratio", "0.95"), "--max-cross-score-ratio: needs a joint image-text "
     "space: --joint-model, or precomputed embeddings with --joint-space"),
    (("--text-encoder", "joint"), "--text-encoder: 'joint' needs --joint-model"),
    (("--joint-space",), "--joint-space: needs both --image-embeddings and --text-embeddings "
     "(from one image-text model)"),
    (("--joint-model", "JOINT", "--visual-encoder", "pixels"), "--joint-model: gives the "
     "images' embeddings: leave out --visual-encoder and --image-embeddings"),
    (("--joint-model", "BERT"), "--joint-model BERT: BertConfig is not an image–text model "
     "(CLIP or SigLIP: a text and a vision config)"),
    (("--joint-model", "timm:resnet18"), "--joint-model timm:resnet18: a timm model has no "
     "text side; give it as --visual-encoder"),
])
def test_settings_that_cannot_go_together(capsys, clip_dir, tmp_path, extra, message):
    data = tmp_path / "data"
    annotations = make_demo(data, num_dialogs=2)
    bert = str(tiny_bert(tmp_path / "bert")) if "BERT" in extra else ""
    extra = [bert if e == "BERT" else str(clip_dir) if e == "JOINT" else e for e in extra]
    message = message.replace("BERT", bert)
    rc, err = _run(capsys, annotations, data, tmp_path / "out", *extra)
    assert rc == 2 and err.strip() == f"hnm: error: {message}", err
    assert not (tmp_path / "out").exists()
