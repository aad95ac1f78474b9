"""One image–text model for both sides, in its own joint space; timm image models.

A joint model embeds images (its image tower, preprocessing and projection) and texts (its
tokenizer, text tower and projection), so that an image and a caption can be scored against
each other: Hugging Face CLIP / SigLIP (`get_image_features` / `get_text_features`) and
open_clip (`encode_image` / `encode_text`). `timm:NAME` is an image encoder alone.

Specs: a Hugging Face folder or id; `open_clip:ARCH[:PRETRAINED]` (an open_clip tag or a
checkpoint file; without it, random weights); `timm:NAME[:PRETRAINED]` (`pretrained`: timm's
own weights from the hub cache, or a checkpoint file; without it, random weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from hnm import encoders
from hnm.encoders import (
    HFVisionEncoder,
    _hf_config,
    _package_version,
    _pick_tensor,
    check_encoder_name,
)
from hnm.errors import HnmError
from hnm.precision import autocast

OPEN_CLIP, TIMM = "open_clip:", "timm:"
OPEN_CLIP_SCHEMAS = ("local-dir:", "hf-hub:")
log = logging.getLogger("hnm")


def _split(spec: str, prefix: str) -> tuple[str, str | None]:
    """'PREFIX NAME[:PRETRAINED]' -> (NAME, PRETRAINED or None); open_clip's own
    `local-dir:FOLDER` and `hf-hub:ORG/REPO` names hold their weights."""
    rest = spec[len(prefix):]
    if prefix == OPEN_CLIP and rest.startswith(OPEN_CLIP_SCHEMAS):
        return rest, None
    name, _, pretrained = rest.partition(":")
    if not name:
        raise HnmError(f"'{spec}': expected {prefix}NAME[:PRETRAINED]")
    return name, pretrained or None


def _import(package: str, pip: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise HnmError(f"{package} is not usable ({exc}); pip install {pip} (hnm's `joint` "
                       "extra; it needs torchvision built for the installed torch)") from None


def _forward(model: Any, device: Any, precision: str, fn: Any, *args: Any) -> np.ndarray:
    import torch

    with torch.inference_mode(), autocast(device, precision):
        return _pick_tensor(fn(*args)).float().double().cpu().numpy()


class JointText:
    """A joint model's text side, as a text encoder (hnm.encoders.TextEncoder)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.name = owner.name
        self.version = owner.version
        self.truncated = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.owner.encode_texts(texts, self)


class HFJointModel(HFVisionEncoder):
    """A Hugging Face CLIP / SigLIP model: the image side as HFVisionEncoder (its own
    processor), the text side through its tokenizer and `get_text_features`."""

    def __init__(self, source: str, device: Any, precision: str = "fp32") -> None:
        super().__init__(source, device, precision)
        from transformers import AutoTokenizer

        if not (hasattr(self.model, "get_text_features")
                and hasattr(self.model, "get_image_features")):
            raise HnmError(f"--joint-model {source}: {type(self.model).__name__} has no text "
                           "and image towers in one space (a CLIP or SigLIP model is)")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        text = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = int(getattr(text, "max_position_embeddings", 77))
        # SigLIP was trained on texts padded to its full length (and pools the last token)
        self.pad_full = "siglip" in str(getattr(self.model.config, "model_type", ""))
        self.text = JointText(self)

    def encode_texts(self, texts: list[str], side: JointText) -> np.ndarray:
        """Texts of equal token length go through together (none padded, unless the model
        pads to its full length): an embedding never depends on its batch."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"]
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            side.truncated += len(seq) > self.max_length
            groups.setdefault(min(len(seq), self.max_length), []).append(i)
        out = None
        for rows in groups.values():
            batch = self.tokenizer([texts[i] for i in rows], truncation=True,
                                   max_length=self.max_length, return_tensors="pt",
                                   padding="max_length" if self.pad_full else True
                                   ).to(self.device)
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            part = _forward(self.model, self.device, self.precision,
                            lambda b: self.model.get_text_features(**b), batch)
            out = np.empty((len(texts), part.shape[1])) if out is None else out
            out[rows] = part
        return out if out is not None else np.zeros((0, 1))


class OpenClipModel:
    """An open_clip model: its own eval transform, tokenizer, encode_image / encode_text."""

    draft_size = None

    def __init__(self, spec: str, device: Any, precision: str = "fp32") -> None:
        open_clip = _import("open_clip", "open_clip_torch")
        arch, pretrained = _split(spec, OPEN_CLIP)
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device)
        except (RuntimeError, ValueError, OSError) as exc:
            raise HnmError(f"--joint-model {spec}: {str(exc).splitlines()[0][:160]}") from None
        if pretrained is None and not arch.startswith(OPEN_CLIP_SCHEMAS):
            log.warning("%s: no pretrained weights named; random weights", spec)
        self.model = model.eval()
        self.transform = transform
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device, self.precision, self.name = device, precision, spec
        weights = pretrained or ("its own" if arch.startswith(OPEN_CLIP_SCHEMAS) else "random")
        self.version = f"{arch} {weights} (open_clip " \
            f"{_package_version('open_clip_torch')})"
        self.text = JointText(self)

    def preprocess(self, image: Any) -> Any:
        return self.transform(image)

    def encode(self, batch: Any) -> np.ndarray:
        return _forward(self.model, self.device, self.precision, self.model.encode_image,
                        batch.to(self.device))

    def encode_texts(self, texts: list[str], side: JointText) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)  # padded to the context length
        return _forward(self.model, self.device, self.precision, self.model.encode_text,
                        tokens)


class TimmEncoder:
    """A timm image model (image side only): pooled features, timm's eval transform."""

    draft_size = None

    def __init__(self, spec: str, device: Any, precision: str = "fp32") -> None:
        timm = _import("timm", "timm")
        name, pretrained = _split(spec, TIMM)
        kwargs: dict[str, Any] = {"num_classes": 0}
        if pretrained and pretrained != "pretrained":
            kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
        try:
            model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
        except (RuntimeError, ValueError, OSError) as exc:
            raise HnmError(f"--visual-encoder {spec}: {str(exc).splitlines()[0][:160]}") \
                from None
        if not pretrained:
            log.warning("%s: no pretrained weights named; random weights", spec)
        self.model = model.eval().to(device)
        config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**config)
        self.device, self.precision, self.name = device, precision, spec
        self.version = f"{name} {pretrained or 'random'} (timm {_package_version('timm')})"

    def preprocess(self, image: Any) -> Any:
        return self.transform(image)

    def encode(self, batch: Any) -> np.ndarray:
        return _forward(self.model, self.device, self.precision, self.model,
                        batch.to(self.device))


def build_joint_model(spec: str, device: Any, precision: str = "fp32") -> Any:
    """The joint model of `spec` (image encoder itself; `.text`: its text side)."""
    if spec.startswith(OPEN_CLIP):
        return OpenClipModel(spec, device, precision)
    if spec.startswith(TIMM):
        raise HnmError(f"--joint-model {spec}: a timm model has no text side; give it as "
                       "--visual-encoder")
    return HFJointModel(spec, device, precision)


def build_image_encoder(name: str, device: Any, precision: str = "fp32") -> Any:
    """--visual-encoder: timm:NAME, open_clip:ARCH (its image side), else hnm.encoders."""
    if name.startswith(TIMM):
        return TimmEncoder(name, device, precision)
    if name.startswith(OPEN_CLIP):
        return OpenClipModel(name, device, precision)
    return encoders.build_image_encoder(name, device, precision)


def check_spec(flag: str, spec: str) -> None:
    """Fail early on a spec that cannot load: a missing package, an unknown architecture,
    a missing checkpoint file, a Hugging Face folder that is not an image–text model."""
    if flag == "--joint-model" and spec.startswith(TIMM):
        raise HnmError(f"--joint-model {spec}: a timm model has no text side; give it as "
                       "--visual-encoder")
    for prefix, package, pip in ((OPEN_CLIP, "open_clip", "open_clip_torch"),
                                 (TIMM, "timm", "timm")):
        if spec.startswith(prefix):
            name, pretrained = _split(spec, prefix)
            module = _import(package, pip)
            if name.startswith("local-dir:"):
                if not (Path(name[10:]) / "open_clip_config.json").is_file():
                    raise HnmError(f"{flag} {spec}: no open_clip_config.json in {name[10:]}")
            elif prefix == OPEN_CLIP and not name.startswith("hf-hub:") \
                    and name not in module.list_models():
                raise HnmError(f"{flag} {spec}: unknown open_clip architecture '{name}'")
            if prefix == TIMM and not module.is_model(name):
                raise HnmError(f"{flag} {spec}: unknown timm model '{name}'")
            if pretrained and ("/" in pretrained or pretrained.endswith(
                    (".bin", ".pt", ".pth", ".safetensors"))) and not Path(pretrained).is_file():
                raise HnmError(f"{flag} {spec}: no checkpoint file {pretrained}")
            return
    if flag == "--visual-encoder":
        check_encoder_name(spec, ("efficientnet-lite0", "pixels"))
        return
    config = _hf_config(spec)
    if not hasattr(config, "text_config") or not hasattr(config, "vision_config"):
        raise HnmError(f"{flag} {spec}: {type(config).__name__} is not an image–text model "
                       "(CLIP or SigLIP: a text and a vision config)")
