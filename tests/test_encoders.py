"""Encoders: each built-in and the Hugging Face path against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import DEMO_FIELDS, cli, read_jsonl, tiny_bert, tiny_clip, write_image
from PIL import Image

from hnm.data import normalize
from hnm.demo import make_demo
from hnm.embed import ImageFiles
from hnm.encoders import build_image_encoder, build_text_encoder
from hnm.grid import finalize

CPU = torch.device("cpu")
TEXTS = ["Fly north along the road until you reach the red roof.",
         "turn left", "Land on the yellow field next to the river bridge, please.",
         "go", "Keep flying south; the lake is further on.", "You made it, land here.",
         "Almost there, the grey building is just east of you.", "stop above the bridge",
         "Head west and stop at the crossroads close to the lake.", "yes"]


def grid_step(dim: int) -> float:
    """The spacing of finalize's grid for `dim` components (its rounding is half of it)."""
    return 2.0 ** -min(24, (53 - int(np.ceil(np.log2(max(2, dim))))) // 2)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"))


def make_images(root: Path) -> list[Path]:
    """Twenty-one images: several sizes, non-square, grey-scale and RGBA ones among them."""
    paths = []
    for i in range(21):
        path = root / f"{i}.png"
        write_image(path, i, size=(17, 24, 96, 250)[i % 4])
        if i % 5 == 1:
            Image.open(path).resize((40, 23)).save(path)
        if i % 7 == 2:
            Image.open(path).convert("L").save(path)
        if i % 7 == 3:
            Image.open(path).convert("RGBA").save(path)
        paths.append(path)
    return paths



def embed_images(encoder, paths: list[Path], batch_size: int) -> np.ndarray:
    """Raw features, read and batched the way the pipeline does it (ImageFiles + DataLoader)."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths, encoder.preprocess, 10**9),
                                         batch_size=batch_size, shuffle=False)
    with torch.inference_mode():
        return np.concatenate([encoder.encode(batch) for batch in loader])


def embed_texts(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([encoder.encode(texts[s:s + batch_size])
                               for s in range(0, len(texts), batch_size)])


# ---------------------------------------------------------------- finalize


def test_finalize_gives_unit_rows_with_exact_dot_products():
    rng = np.random.default_rng(1)
    for dim in (3, 16, 192, 384, 1280):
        raw = rng.normal(size=(40, dim)) * rng.uniform(0.01, 100, size=(40, 1))
        X = finalize(raw)
        assert X.dtype == np.float32 and X.shape == raw.shape
        step = grid_step(dim)
        assert np.array_equal(np.round(X.astype(np.float64) / step) * step, X)  # on the grid
        assert np.abs(X - unit(raw)).max() <= step / 2
        assert np.allclose(np.linalg.norm(X.astype(np.float64), axis=1), 1.0,
                           atol=np.sqrt(dim) * step)
        X64 = X.astype(np.float64)
        by_blas = X64 @ X64.T
        by_fsum = np.array([[np.sum(X64[i] * X64[j]) for j in range(5)] for i in range(5)])
        reversed_order = np.array([[sum((X64[i] * X64[j])[::-1].tolist()) for j in range(5)]
                                   for i in range(5)])
        assert np.array_equal(by_blas[:5, :5], by_fsum)
        assert np.array_equal(by_fsum, reversed_order)


def test_finalize_keeps_zero_rows_and_rejects_other_shapes():
    X = finalize(np.array([[0.0, 0.0], [3.0, 4.0]]))
    assert X.tolist() == [[0.0, 0.0], [0.6000000238418579, 0.800000011920929]]
    with pytest.raises(ValueError, match="2-D"):
        finalize(np.ones(3))


# ---------------------------------------------------------------- pixels


def pixels_reference(path: Path) -> np.ndarray:
    """SPEC §2 in numpy: resize to 224 (bilinear), /255, 8x8 average pool per channel,
    flatten channel-major, L2-normalise."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((224, 224), Image.BILINEAR)
    x = np.asarray(rgb, np.float64).transpose(2, 0, 1) / 255.0  # (3, 224, 224)
    pooled = x.reshape(3, 8, 28, 8, 28).mean(axis=(2, 4))  # (3, 8, 8)
    return unit(pooled.reshape(1, -1))[0]


def test_pixels_equals_a_numpy_computation(images):
    encoder = build_image_encoder("pixels", CPU)
    got = finalize(embed_images(encoder, images, 8))
    want = np.stack([pixels_reference(p) for p in images])
    assert got.shape == (len(images), 192)
    assert np.abs(got - want).max() <= 1e-6  # float32 pooling, then the grid


def test_pixels_does_not_depend_on_the_batch(images):
    encoder = build_image_encoder("pixels", CPU)
    by4 = embed_images(encoder, images, 4)
    for size in (1, 7, len(images)):
        assert np.array_equal(by4, embed_images(encoder, images, size))  # raw, not finalized


# ---------------------------------------------------------------- offline defaults


@pytest.fixture(scope="module")
def efficientnet():
    return build_image_encoder("efficientnet-lite0", CPU)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm", CPU)


def test_efficientnet_gives_finite_unit_vectors(efficientnet, images):
    X = finalize(embed_images(efficientnet, images[:6], 6))
    assert X.shape == (6, 1280)
    assert np.isfinite(X).all()
    assert np.allclose(np.linalg.norm(X.astype(np.float64), axis=1), 1.0, atol=1e-4)
    assert len({row.tobytes() for row in X}) == 6  # different images, different vectors


def test_efficientnet_input_scaling(efficientnet, images):
    with Image.open(images[0]) as img:
        x = efficientnet.preprocess(img.convert("RGB"))
        rgb = np.asarray(img.convert("RGB").resize((224, 224), Image.BILINEAR), np.float64)
    assert tuple(x.shape) == (3, 224, 224)
    assert np.array_equal(x.numpy(), ((rgb.transpose(2, 0, 1) - 127) / 128).astype(np.float32))


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Bitwise equal after finalize (what the pipeline keeps), with the difference if not."""
    fa, fb = finalize(a), finalize(b)
    rows = int((fa != fb).any(axis=1).sum())
    assert rows == 0, (f"raw max |diff| {np.abs(a - b).max():.3g}; {rows} of {len(a)} rows "
                       f"differ after finalize, by up to {np.abs(fa - fb).max():.3g}")


def on_the_grid(embed, encoder, items: list, batch: int, split: int) -> None:
    """What the pipeline relies on: with one batch size, where a shard starts (a multiple of
    the batch size) changes nothing. (Different batch sizes may differ in the last bits on
    CPU kernels; the plan keeps one batch grid for every worker.)"""
    whole = embed(encoder, items, batch)
    parts = np.concatenate([embed(encoder, items[:split], batch),
                            embed(encoder, items[split:], batch)])
    assert_same(whole, parts)


def test_efficientnet_does_not_depend_on_the_shard(one_thread, efficientnet, images):
    on_the_grid(embed_images, efficientnet, images, 4, 8)


def test_minilm_gives_finite_unit_vectors(minilm):
    T = finalize(embed_texts(minilm, [normalize(t) for t in TEXTS], 32))
    assert T.shape == (len(TEXTS), 384)
    assert np.isfinite(T).all()
    assert np.allclose(np.linalg.norm(T.astype(np.float64), axis=1), 1.0, atol=1e-4)


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(minilm):
    texts = ["fly north along the road until you reach the red building.",
             "head north following the road and stop at the red-roofed house.",
             "the recipe needs two cups of flour and a pinch of salt."]
    T = finalize(embed_texts(minilm, texts, 8)).astype(np.float64)
    paraphrase, unrelated = T[0] @ T[1], T[0] @ T[2]
    assert paraphrase > 0.6 > 0.2 > unrelated


BATCH_TEXTS = [normalize(t) for t in TEXTS] * 2 + ["a b c", "one more sentence to embed"]


def test_minilm_does_not_depend_on_the_shard(one_thread, minilm):
    on_the_grid(embed_texts, minilm, BATCH_TEXTS, 4, 8)


# ---------------------------------------------------------------- Hugging Face folders


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def test_hf_vision_folder_equals_the_models_own_computation(clip_dir, images):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = build_image_encoder(str(clip_dir), CPU)
    assert encoder.name == str(clip_dir) and "CLIPVisionModelWithProjection" in encoder.version
    got = finalize(embed_images(encoder, images, 5))
    # the folder ships an image processor: the encoder must use it as it is
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    rgb = []
    for p in images:
        with Image.open(p) as img:
            rgb.append(img.convert("RGB"))
    with torch.no_grad():
        pixels = processor(images=rgb, return_tensors="pt")["pixel_values"]
        want = unit(model(pixel_values=pixels).image_embeds.double().numpy())
    assert got.shape == (len(images), 16)
    assert np.abs(got - want).max() <= 1e-6


def test_hf_vision_folder_does_not_depend_on_the_shard(one_thread, clip_dir, images):
    on_the_grid(embed_images, build_image_encoder(str(clip_dir), CPU), images, 4, 8)


def test_hf_text_folder_does_not_depend_on_the_shard(one_thread, bert_dir):
    """On one batch grid, where a shard starts changes nothing. (Across batch sizes a
    matrix product of another height may round differently in the last bit on some CPUs:
    the plan keeps one grid for the whole run.)"""
    on_the_grid(embed_texts, build_text_encoder(str(bert_dir), CPU), BATCH_TEXTS, 4, 8)


def test_hf_text_folder_equals_mean_pooled_hidden_states(bert_dir):
    from transformers import AutoTokenizer, BertModel

    encoder = build_text_encoder(str(bert_dir), CPU)
    texts = [normalize(t) for t in TEXTS]
    got = finalize(embed_texts(encoder, texts, 4))
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    model = BertModel.from_pretrained(bert_dir).eval()
    want = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding, a plain mean over the tokens
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            want.append(hidden.double().mean(dim=0).numpy())
    assert got.shape == (len(texts), 32)
    assert np.abs(got - unit(np.stack(want))).max() <= 1e-6


def test_run_with_hf_folders_for_both_encoders(capsys, clip_dir, bert_dir, tmp_path):
    data = tmp_path / "data"
    annotations = make_demo(data, num_dialogs=4)
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "--annotations", annotations, "--image-dir", data,
                          *DEMO_FIELDS, "--output-dir", out, "--visual-encoder", clip_dir,
                          "--text-encoder", bert_dir, "--num-workers", "0",
                          # random weights make every text alike: diverse negatives only
                          "--diverse-ratio", "1", "--blacklist", "")
    assert rc == 0, err
    assert "Hard negative mining completed" in stdout
    records = json.loads(annotations.read_text())
    rows = read_jsonl(out / "negatives.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert sum(bool(r["negatives"]) for r in rows) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    provenance = metrics["provenance"]
    assert provenance["visual_encoder"].startswith(f"{clip_dir}: ")
    assert provenance["text_encoder"].startswith(f"{bert_dir}: ")


def test_text_longer_than_the_trained_length_is_cut_and_counted(bert_dir, tmp_path):
    """sentence_bert_config.json's max_seq_length is the limit, as sentence-transformers
    uses it; a longer text is embedded from its first tokens and counted."""
    import shutil

    folder = tmp_path / "bert"
    shutil.copytree(bert_dir, folder)
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 6}')
    encoder = build_text_encoder(str(folder), CPU)
    assert encoder.max_length == 6
    long, short = "fly north along the road to the red roof", "fly north along the"
    got = embed_texts(encoder, [long, short], 2)
    assert encoder.truncated == 1  # [CLS] + 5 words + [SEP] > 6: cut; the short one fits
    cut = encoder.tokenizer.decode(encoder.tokenizer(long)["input_ids"][1:5])
    assert np.allclose(got[0], embed_texts(encoder, [cut], 1)[0], atol=1e-6)
    assert build_text_encoder(str(bert_dir), CPU).max_length == 512  # the model's own limit
