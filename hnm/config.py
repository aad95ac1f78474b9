"""Typed run configuration: dataclass defaults, then YAML, then command-line overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hnm.decoding import first_line, load_yaml, reading
from hnm.errors import HnmError
from hnm.options import (  # the identity sets, made from the declarations
    EMBEDDING_KEYS,  # noqa: F401  (read from here by hnm.plan)
    IDENTITY_DEFAULTS,
    OPTIONS,
    RENAMED,
    RUNTIME_ONLY,
    SHARD_ROWS,
    Option,
)


@dataclass(frozen=True)
class Fields:
    """Names of the record fields that hold each sample attribute."""

    id: str = "id"
    image: str = "image"
    text: str = "text"
    group: str = "group"


@dataclass(frozen=True)
class Config:
    """Everything that defines a run. Defaults are the guide's. Each field's flag, checks
    and role in the run's identity are declared in hnm.options, which agrees with the
    fields and defaults here (tests/test_options.py)."""

    # inputs and outputs
    annotations: str | None = None
    input_format: str | None = None  # None: detected from the names (hnm.readers)
    hf_split: str | None = None
    image_dir: str = "."
    output_dir: str = "hnm_output"
    split: str = "train"
    fields: Fields = field(default_factory=Fields)
    max_samples: int | None = None
    on_missing_image: str = "error"
    # larger images are refused like unreadable ones: a 200 MP RGB image decodes to 600 MB
    max_image_pixels: int = 200_000_000
    output_format: str = "jsonl"
    # encoders
    visual_encoder: str = "efficientnet-lite0"
    text_encoder: str = "minilm"
    image_embeddings: str | None = None
    text_embeddings: str | None = None
    # one image-text model for both sides (hnm.joint); joint_space: the precomputed image
    # and text embeddings come from one such model
    joint_model: str | None = None
    joint_space: bool = False
    batch_size: int = 64
    num_workers: int | None = None  # data-loading processes per GPU; None: sized from the cores
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (hnm.precision)
    # how image tensors (the AVDN processed dataset) were normalised: mapped back to images
    # with it for the model encoders (avdn | imagenet | none | MEAN,STD); an AVDN input
    # gets avdn where the config does not say (load_config)
    tensor_normalization: str = "imagenet"
    # mining (SPEC §3-7)
    k_nn: int = 30
    cosine_threshold: float = 0.3
    min_visual_similarity: float = 0.30
    diverse_ratio: float = 0.3
    min_answer_length: int = 20
    fallback_phrase_reuse_limit: int = 3
    sliding_window_size: int = 1000
    blacklist: str | None = None
    blacklist_similarity: float = 0.75
    # the positive-aware rule (miner.CrossRule), with a joint space only
    max_cross_score_ratio: float | None = None
    min_cross_score_margin: float | None = None
    n_clusters: int = 30
    num_negatives: int = 1
    diverse_candidates: int = 64
    seed: int = 0
    # search index (hnm.index): exact, ivf / ivfpq / ivfsq (approximate proposals), or auto
    index: str = "auto"
    ivf_nlist: int | None = None  # None: about sqrt(rows)
    ivf_nprobe: int | None = None  # None: from the number of lists
    index_parts: int | None = None  # the index in parts (hnm.parts); None: by rows
    pq_bytes: int | None = None  # ivfpq: bytes of a row's code; None: about dim / 8
    # false-negative audit (hnm.audit): negatives this close to their anchor are suspect
    audit_text_similarity: float = 0.8
    audit_visual_similarity: float = 0.98
    drop_suspect_negatives: bool = False
    # devices and processes
    gpu_id: int | None = None
    gpu_ids: tuple[int, ...] | None = None
    num_gpus: int | None = None
    cpu_workers: int | None = None  # None: as many as the work is worth (hnm.placement)
    shard_rows: int = SHARD_ROWS  # a shard's rows at most (hnm.plan.new_plan)
    max_retries: int = 2
    # a worker that reports no progress for this long is stopped and its shard retried
    # (0: never); long enough for the slowest single step (one batch, one k-means)
    stall_timeout: float = 1800.0
    # behaviour of the run itself
    quiet: bool = False
    overwrite: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-friendly dictionary of every field."""
        out = dataclasses.asdict(self)
        if self.gpu_ids is not None:
            out["gpu_ids"] = list(self.gpu_ids)
        return out


# The field mapping of the AVDN processed dataset, under any the config gives
AVDN_FIELDS = {"image": "current_view_image", "text": "answer", "group": "first_instruction"}
# Per-channel (mean, std) of each named --tensor-normalization, in 0-1 units. avdn: AVDN's
# preprocessing (AnsweringAgentNormalizer: (pixels 0-255 - RGB_MEAN) / RGB_STD)
AVDN_RGB = ((60.134, 49.697, 40.746), (29.99, 24.498, 22.046))
TENSOR_NORMALIZATIONS = {"avdn": tuple(tuple(v / 255 for v in part) for part in AVDN_RGB),
                         "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                         "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


class ConfigError(HnmError):
    """A bad config value; `key` names the field, so the YAML is blamed only for its own."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag.replace('_', '-')}: {message}", flag)


def validate(c: Config) -> None:
    """Reject out-of-range values, naming the flag."""
    values = [(o, _value(c, o)) for o in OPTIONS]
    for option, value in values:
        # paths and names end up in the run's files, which hold UTF-8 only; the command
        # line keeps other bytes as lone surrogates
        if isinstance(value, str) and not _utf8(value):
            _check(False, option.dest, f"{value.encode('utf-8', 'surrogateescape')!r} is not "
                   "valid UTF-8")
    for option, value in values:
        error = option.rule.error(value) if option.rule else None
        if error:
            raise ConfigError(f"{option.flag}: {error}", option.dest)
    if c.gpu_ids is not None:
        _check(len(c.gpu_ids) > 0 and min(c.gpu_ids) >= 0
               and len(set(c.gpu_ids)) == len(c.gpu_ids), "gpu_ids",
               f"must list distinct GPU indices (0 or more), got {list(c.gpu_ids)}")
    tensor_normalization(c.tensor_normalization)


def check_joint(c: Config) -> None:
    """The joint model, the joint space and the cross rule agree with the other settings
    (checked before a run, with its inputs: one setting alone is never wrong)."""
    if c.joint_model:
        _check(c.visual_encoder == "efficientnet-lite0" and not c.image_embeddings,
               "joint_model", "gives the images' embeddings: leave out --visual-encoder and "
               "--image-embeddings")
    _check(c.text_encoder != "joint" or bool(c.joint_model), "text_encoder",
           "'joint' needs --joint-model")
    _check(c.text_encoder != "joint" or not c.text_embeddings, "text_encoder",
           "'joint' embeds the texts: leave out --text-embeddings")
    _check(not c.joint_space or bool(c.image_embeddings and c.text_embeddings), "joint_space",
           "needs both --image-embeddings and --text-embeddings (from one image-text model)")
    if c.max_cross_score_ratio is not None or c.min_cross_score_margin is not None:
        flag = "max_cross_score_ratio" if c.max_cross_score_ratio is not None \
            else "min_cross_score_margin"
        _check(bool(c.joint_model) or c.joint_space, flag, "needs a joint image-text space: "
               "--joint-model, or precomputed embeddings with --joint-space")


def has_joint_space(c: Config) -> bool:
    """Whether the run's images and texts are embedded in one space (cross scores exist)."""
    return bool(c.joint_model) or c.joint_space


def _value(c: Config, option: Option) -> Any:
    """The value of an option in a config (`fields.X`: X of its fields)."""
    name, _, part = option.key.partition(".")
    return getattr(getattr(c, name), part) if part else getattr(c, name)


def tensor_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of --tensor-normalization: avdn, imagenet, none, `MEAN,STD`
    (every channel) or `M1,M2,M3,S1,S2,S3`."""
    if text in TENSOR_NORMALIZATIONS:
        return TENSOR_NORMALIZATIONS[text]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    _check(len(values) in (2, 6) and all(v == v for v in values) and all(values[len(values) // 2:]),
           "tensor_normalization", "must be avdn, imagenet, none, MEAN,STD or "
           f"M1,M2,M3,S1,S2,S3 with non-zero STDs, got {text!r}")
    if len(values) == 2:
        return (values[0],) * 3, (values[1],) * 3
    return tuple(values[:3]), tuple(values[3:])


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one YAML value against its dataclass type, converting where lossless."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(t for t in options if t is not type(None))
        origin = typing.get_origin(hint)
    if hint is Fields:
        return _fields(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(_is_int(v) for v in value):
            return tuple(int(v) for v in value)
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif hint is int and _is_int(value) and not isinstance(value, str):
        return int(value)
    elif hint in (str, bool) and isinstance(value, hint):
        return value
    raise HnmError(f"config key '{key}': expected {_type_name(hint)}, got {value!r}")


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _fields(value: Any) -> Fields:
    if isinstance(value, Fields):
        return value
    if not isinstance(value, dict):
        raise HnmError(f"config key 'fields': expected a mapping, got {value!r}")
    known = {f.name for f in dataclasses.fields(Fields)}
    for key, name in value.items():
        if key not in known:
            known_list = ", ".join(sorted(known))
            raise HnmError(f"config key 'fields.{key}': unknown (known: {known_list})")
        if not isinstance(name, str) or not name:
            raise HnmError(f"config key 'fields.{key}': expected a field name, got {name!r}")
    return dataclasses.replace(Fields(), **value)


def make_config(values: dict[str, Any]) -> Config:
    """Build a Config from a flat mapping, naming unknown keys and wrong types."""
    hints = typing.get_type_hints(Config)
    known = {f.name for f in dataclasses.fields(Config)}
    kwargs = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        key = RENAMED.get(key, key)
        if key not in known:
            raise ConfigError(f"unknown config key '{raw_key}'", key)
        try:
            kwargs[key] = _coerce(key, value, hints[key])
        except HnmError as exc:
            raise ConfigError(str(exc), key) from None
    return Config(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping."""
    path = Path(path)
    with reading(path, "config"):  # bad bytes, nesting too deep: one line naming the file
        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise HnmError(f"{path}: invalid YAML: {first_line(str(exc))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HnmError(f"{path}: a config file must hold a mapping of keys to values")
    named: dict[str, str] = {}
    for key in data:
        if not isinstance(key, str):
            raise HnmError(f"{path}: config key {key!r}: a key must be a name")
        option = RENAMED.get(key.replace("-", "_"), key.replace("-", "_"))
        if option in named:  # k-nn and k_nn: one option given twice
            raise HnmError(f"{path}: config keys {named[option]!r} and {key!r} name one "
                           "option; give it once")
        named[option] = key
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any], *,
                detect_format: Callable[[str], str | None]) -> Config:
    """Defaults, then the YAML file (if any), then overrides (flags). `detect_format`: the
    format --annotations is read as, where its names tell (hnm.readers.detect_format): the
    AVDN processed dataset's field mapping has its own defaults."""
    values: dict[str, Any] = dict(read_yaml(path)) if path else {}
    from_yaml = {k.replace("-", "_") for k in values} - {
        k.replace("-", "_") for k in overrides if k != "fields"}
    fields_override = overrides.pop("fields", None)
    values.update(overrides)
    if fields_override:
        base = values.get("fields") or {}
        if not isinstance(base, dict):
            raise HnmError(f"{path}: config key 'fields': expected a mapping, got {base!r}")
        values["fields"] = {**base, **fields_override}
    if _reads_avdn(values, detect_format):
        values["fields"] = {**AVDN_FIELDS, **(values.get("fields") or {})}
        # AVDN's own normalisation, named in the config (and so in the run's identity:
        # a run made when the default was imagenet is not taken for one made with avdn)
        given = {RENAMED.get(k.replace("-", "_"), k.replace("-", "_")) for k in values}
        if "tensor_normalization" not in given:
            values["tensor_normalization"] = "avdn"
    try:
        return make_config(values)
    except HnmError as exc:
        # name the YAML file only when the value at fault came from it, not from a flag
        if not path or getattr(exc, "key", None) not in from_yaml:
            raise
        raise HnmError(f"{path}: {exc}") from None


def _reads_avdn(values: dict[str, Any], detect_format: Callable[[str], str | None]) -> bool:
    """Whether the input is an AVDN processed dataset: --input-format avdn, or pickles by
    the names."""
    fmt, given = values.get("input_format"), values.get("annotations")
    if fmt is not None or not isinstance(given, str):
        return fmt == "avdn"
    return detect_format(given) == "avdn"


def config_hash(c: Config, keys: typing.Iterable[str] | None = None) -> str:
    """Stable hash of the fields that define results (all but runtime-only ones)."""
    data = c.to_dict()
    chosen = keys if keys is not None else [k for k in data if k not in RUNTIME_ONLY]
    chosen = [k for k in chosen if k not in IDENTITY_DEFAULTS or data[k] != IDENTITY_DEFAULTS[k]]
    blob = json.dumps({k: data[k] for k in sorted(chosen)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text with keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
