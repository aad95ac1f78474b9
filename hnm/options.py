"""Every setting of a run declared once: its flag, help, default, checks, YAML key and role.

The flags of `hnm mine` (hnm.cli), the range checks and the identity sets (hnm.config) and
README's option table (`python tools/options_table.py --write`) are all made from `OPTIONS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INPUT_FORMATS = ("json", "jsonl", "csv", "tsv", "parquet", "webdataset", "hf", "avdn")
OUTPUT_FORMATS = ("jsonl", "parquet")

# --shard-rows: what a worker's search and the reduce hold follows the shard: a shard's
# candidate lists (about 3 KB an anchor), held once by the worker that searched them and
# with their masks by the reduce, stay under about 0.6 GB (bench_scale: the reduce held
# 515 MiB with shards of 65,536 rows, 821 MiB with 150,000, 1,277 MiB with 250,000).
SHARD_ROWS = 1 << 17

# A setting's role in the run's identity (hnm.config.config_hash): RUNTIME settings choose
# how the work is done, not what is computed, so changing one resumes a run instead of
# starting it again; EMBEDDINGS settings decide the embeddings (and so the results too);
# RESULTS settings decide the mined results only.
Role = Literal["runtime", "embeddings", "results"]
RUNTIME: Role = "runtime"
EMBEDDINGS: Role = "embeddings"
RESULTS: Role = "results"

# the argument groups of `hnm mine -h`, in this order
INPUTS = "inputs and outputs"
ENCODERS = "encoders"
MINING = "mining"
AUDIT = "false-negative audit"
DEVICES = "devices and processes"


@dataclass(frozen=True)
class Rule:
    """The values a setting accepts, and how an error and README's table say so."""

    holds: Callable[[Any], bool]
    says: str  # the error after the flag's name; {value} is the value given
    span: str  # README's "values" column
    choices: tuple[str, ...] = ()  # argparse's choices, where the values are a list

    def error(self, value: Any) -> str | None:
        """The error message for `value`, or None where it is accepted (None always is:
        the types are checked where the values are read)."""
        if value is None or self.holds(value):
            return None
        return self.says.format(value=value)


def within(low: float, high: float, why: str = "") -> Rule:
    """From `low` to `high`, both included; `why` follows the interval in the error."""
    return Rule(lambda v: low <= v <= high, f"must be within [{low}, {high}]{why}, got {{value}}",
                f"[{low}, {high}]")


def at_least(low: int, says: str = "") -> Rule:
    """`low` or more; `says`: the error of older flags, whose wording is kept."""
    if not says:
        says = ("must not be negative" if low == 0 else f"must be at least {low}") + \
            ", got {value}"
    return Rule(lambda v: v >= low, says, f"≥ {low}")


def one_of(choices: tuple[str, ...], quoted: bool = False) -> Rule:
    """`quoted`: the error lists the choices as 'a', 'b' or 'c' (else: one of a, b, c)."""
    listed = (", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}" if quoted
              else "one of " + ", ".join(choices))
    return Rule(lambda v: v in choices, f"must be {listed}, got {{value!r}}",
                ", ".join(f"`{c}`" for c in choices), choices)


@dataclass(frozen=True)
class Former:
    """A former name of a setting, still read (config files and run directories of older
    runs, its hidden flag) until the version named."""

    key: str
    removed_in: str


@dataclass(frozen=True)
class Option:
    """One setting of a run."""

    key: str  # the Config field and YAML key; `fields.X` is X of the `fields` mapping
    kind: type  # str, int, float, bool, or tuple (comma-separated integers)
    default: Any
    help: str  # `hnm mine -h`, which adds the default
    role: Role = RESULTS
    rule: Rule | None = None  # checks across settings are code, in hnm.config.validate
    default_text: str = ""  # what a default computed at run time (None) comes to
    metavar: str = ""  # how README's table names the value
    doc: str = ""  # README's wording, where it says more than `help`
    flag: str = ""  # from the key unless given
    negatable: bool = False  # a switch with a --no- form
    former: Former | None = None
    # added after runs existed: left out of the identity while at its default, so that
    # every run made before it keeps its identity
    omitted_at_default: bool = False
    group: str = ""

    def __post_init__(self) -> None:
        if not self.flag:
            object.__setattr__(self, "flag", "--" + self.key.replace("_", "-"))

    @property
    def name(self) -> str:
        """The Config field."""
        return self.key.split(".")[0]

    @property
    def dest(self) -> str:
        """The flag's argparse name, and the name its errors are filed under."""
        return self.flag[2:].replace("-", "_")

    def shown_default(self) -> str:
        """The default as the help and README say it ('' where there is none to say)."""
        if self.default_text or self.kind is bool or self.default is None:
            return self.default_text
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def help_text(self) -> str:
        """The flag's help in `hnm mine -h`: the help, then the default."""
        shown = self.shown_default()
        return f"{self.help} (default: {shown})" if shown else self.help


def _group(group: str, *options: Option) -> tuple[Option, ...]:
    return tuple(dataclasses.replace(o, group=group) for o in options)


_SIMILARITY = within(-1, 1)
_POSITIVE = at_least(1)
_COUNT = at_least(0)
_IN_RANGE = at_least(1, "out of range: {value}")  # older flags' wording of _POSITIVE

OPTIONS: tuple[Option, ...] = (
    *_group(
        INPUTS,
        Option("annotations", str, None, "a file, a folder or a glob of shards: JSON/JSONL, "
               "CSV/TSV, Parquet, WebDataset .tar, Hugging Face save_to_disk, AVDN .pkl chunks",
               EMBEDDINGS, metavar="PATH", doc="a file, a folder or a glob of shards in any "
               "input format (see *Inputs*)"),
        Option("input_format", str, None, "read --annotations as this format", EMBEDDINGS,
               one_of(INPUT_FORMATS), default_text="from the names", metavar="F"),
        Option("tensor_normalization", str, "imagenet", "image tensors (avdn): avdn, "
               "imagenet, none, MEAN,STD or M1,M2,M3,S1,S2,S3; maps them back to images for "
               "the model encoders", EMBEDDINGS, metavar="N", omitted_at_default=True,
               default_text="avdn",
               doc="how image tensors (`avdn` input) were normalised: `avdn` (AVDN's "
               "preprocessing), `imagenet`, `none`, `MEAN,STD` or `M1,M2,M3,S1,S2,S3` (0-1 "
               "units); the model encoders see the images mapped back with it, and a "
               "normalisation that maps them outside the image range is refused (see *Coming "
               "from add_hard_negatives.py*)"),
        Option("hf_split", str, None, "split of a Hugging Face DatasetDict", EMBEDDINGS,
               metavar="NAME", doc="the split of a Hugging Face `DatasetDict`"),
        Option("image_dir", str, ".", "folder image paths are relative to", EMBEDDINGS,
               metavar="DIR"),
        Option("output_dir", str, "hnm_output", "run directory (resumable)", RUNTIME,
               metavar="DIR", doc="the run directory; rerunning the same command resumes it"),
        Option("split", str, "train", "dataset split name (train, val_seen, ...)",
               metavar="NAME"),
        Option("max_samples", int, None, "mine only the first N anchors", rule=_IN_RANGE),
        Option("on_missing_image", str, "error", "a record whose image is missing or "
               "unreadable stops the run (error) or is dropped (skip)", EMBEDDINGS,
               one_of(("error", "skip"), quoted=True),
               doc="`skip`: drop records whose image is missing or unreadable (counted in the "
               "metrics)"),
        Option("max_image_pixels", int, 200_000_000, "larger images count as unreadable",
               rule=_POSITIVE, doc="larger images count as unreadable, in checks, embedding "
               "and the report"),
        Option("output_format", str, "jsonl", "negatives.jsonl or negatives.parquet",
               rule=one_of(OUTPUT_FORMATS), metavar="F"),
        *(Option(f"fields.{name}", str, name, f"record field holding the {name}", EMBEDDINGS,
                 flag=f"--{name}-field", metavar="NAME")
          for name in ("id", "image", "text", "group")),
    ),
    *_group(
        ENCODERS,
        Option("visual_encoder", str, "efficientnet-lite0", "efficientnet-lite0 | pixels | "
               "timm:NAME | open_clip:ARCH[:PRETRAINED] | HF model folder or id", EMBEDDINGS,
               metavar="E", doc="`efficientnet-lite0`, `pixels` (the original 8×8 pooled "
               "pixels), `timm:NAME`, `open_clip:ARCH[:PRETRAINED]`, or a Hugging Face "
               "CLIP/SigLIP model folder or id"),
        Option("text_encoder", str, "minilm", "minilm | joint | HF model folder or id",
               EMBEDDINGS, metavar="E", doc="`minilm` (all-MiniLM-L6-v2), `joint` (the "
               "`--joint-model`'s text side) or a Hugging Face sentence-encoder folder or id"),
        *(Option(f"{kind}_embeddings", str, None, "precomputed .npy, one row/record",
                 EMBEDDINGS, metavar="FILE.npy", doc=f"precomputed {kind} embeddings, one row "
                 "per record in input order") for kind in ("image", "text")),
        Option("joint_model", str, None, "one image-text model for images and cross scores: HF "
               "CLIP/SigLIP folder or id, open_clip:ARCH[:PRETRAINED]", EMBEDDINGS,
               metavar="SPEC", omitted_at_default=True, doc="one image–text model embeds the "
               "images (in place of `--visual-encoder`) and, in its joint space, the texts for "
               "cross scores: a Hugging Face CLIP/SigLIP folder or id, or "
               "`open_clip:ARCH[:PRETRAINED]` (see *Joint image–text space*)"),
        Option("joint_space", bool, False, "the precomputed image and text embeddings come "
               "from one image-text model (cross scores)", omitted_at_default=True),
        # RUNTIME, yet some kernels round differently for other batch sizes: a run keeps the
        # batch grid it was first planned with (Plan.batch_size) whatever the flag says
        Option("batch_size", int, 64, "batch size", RUNTIME, _POSITIVE),
        Option("num_workers", int, None, "data-loading processes per GPU", RUNTIME, _COUNT,
               default_text="sized from the cores"),
        # in the identity as resolved (Plan.precision): "auto" and the precision it chooses
        # on this hardware are the same run
        Option("precision", str, "auto", "what the encoders compute in (auto: bf16 where the "
               "hardware runs it natively, else fp32)", RUNTIME, one_of(PRECISIONS),
               doc="what both encoders compute in; `auto` is bf16 where the hardware runs it "
               "natively (CPUs with AVX512-BF16 or AMX, GPUs with bf16 tensor cores, compute "
               "capability 8.0+), else fp32"),
    ),
    *_group(
        MINING,
        Option("k_nn", int, 30, "number of k-NN neighbours", rule=_POSITIVE),
        Option("cosine_threshold", float, 0.3, "text similarity threshold", rule=_SIMILARITY),
        Option("min_visual_similarity", float, 0.30, "minimum visual similarity of hard "
               "negatives", rule=_SIMILARITY),
        Option("diverse_ratio", float, 0.3, "share of anchors trying diverse first",
               rule=within(0, 1)),
        Option("min_answer_length", int, 20, "minimum answer length of a negative",
               rule=_COUNT),
        Option("fallback_phrase_reuse_limit", int, 3, "phrase reuse limit in fallback",
               rule=_POSITIVE),
        Option("sliding_window_size", int, 1000, "phrases remembered for reuse limits",
               rule=_POSITIVE),
        Option("blacklist_similarity", float, 0.75, "max similarity to a blacklist phrase",
               rule=_SIMILARITY),
        Option("max_cross_score_ratio", float, None, "a joint space: skip a candidate whose "
               "text scores with the anchor's image above this share of the anchor's own "
               "image-caption score (0.95 a starting point)", rule=within(0, 1),
               default_text="off", omitted_at_default=True),
        Option("min_cross_score_margin", float, None, "a joint space: skip a candidate whose "
               "cross score is within this margin of the anchor's own score",
               rule=within(0, 2), default_text="off", omitted_at_default=True),
        Option("n_clusters", int, 30, "k-means clusters for diverse negatives", rule=_POSITIVE),
        Option("num_negatives", int, 1, "negatives per anchor", rule=_POSITIVE),
        Option("diverse_candidates", int, 64, "diverse candidates kept per anchor",
               rule=_POSITIVE, doc="diverse candidates kept per anchor; only speed depends "
               "on it", former=Former("diverse_pool", removed_in="1.0")),
        Option("seed", int, 0, "seed of strategy draws and k-means",
               rule=within(0, 2**31 - 1, " (a 32-bit seed)"), metavar="S"),
        Option("index", str, "auto", "search index: exact, ivf (FAISS IVF proposals, rescored "
               "exactly; recall measured), ivfpq / ivfsq (proposals from PQ / 8-bit codes of "
               "the IVF lists, rescored exactly), or auto (exact up to a size, then IVF, "
               "codes where its lists do not fit)",
               rule=one_of(("exact", "ivf", "ivfpq", "ivfsq", "auto"), quoted=True),
               doc="the search index (see below)"),
        Option("ivf_nlist", int, None, "IVF lists", rule=_IN_RANGE, default_text="~sqrt(rows)"),
        Option("ivf_nprobe", int, None, "IVF lists probed per query (more: higher recall, "
               "slower)", rule=_IN_RANGE, default_text="from the number of lists"),
        Option("index_parts", int, None, "split the search index into this many parts of "
               "consecutive rows, searched one at a time and merged exactly: a worker holds "
               "one part's index, not the whole; the results do not change", RUNTIME,
               _POSITIVE, metavar="N", default_text="one per 131,072 rows",
               doc="parts of the search index (consecutive rows, even split): each search "
               "opens one part at a time and merges the lists exactly, so a worker's index "
               "memory is one part's (IVF lists on the host: the parts memory-mapped "
               "together, each list scanned across them); the results do not change. Fixed "
               "when the run is planned (a resumed run keeps its parts)"),
        Option("pq_bytes", int, None, "bytes of a row's PQ code (--index ivfpq): its "
               "sub-quantisers of 8 bits; a divisor of the image embedding dimension",
               rule=_IN_RANGE, default_text="~dim/8", omitted_at_default=True),
        Option("blacklist", str, None, "file, one phrase per line ('' disables)",
               metavar="FILE", doc="phrases negatives must not resemble (one per line; an "
               "empty file disables the filter)"),
    ),
    *_group(
        AUDIT,
        Option("audit_text_similarity", float, 0.8, "a negative whose text similarity to its "
               "anchor is above this is suspect", rule=_SIMILARITY),
        Option("audit_visual_similarity", float, 0.98, "a negative whose visual similarity to "
               "its anchor is above this is suspect", rule=_SIMILARITY),
        Option("drop_suspect_negatives", bool, False, "remove suspect negatives from the "
               "output; their anchors may be left without one"),
    ),
    *_group(
        DEVICES,
        Option("gpu_id", int, None, "single-GPU mode on this GPU", RUNTIME,
               at_least(0, "out of range: {value}")),
        Option("gpu_ids", tuple, None, "comma-separated GPU indices", RUNTIME, metavar="0,2,5"),
        Option("num_gpus", int, None, "GPUs to use", RUNTIME, _IN_RANGE, default_text="all"),
        Option("cpu_workers", int, None, "CPU worker processes", RUNTIME, _POSITIVE,
               default_text="as many as the work is worth",
               doc="CPU worker processes where there is no GPU (by default one per usable "
               "core as memory allows, fewer where starting one would cost more than it "
               "saves, never more than the run's batches; the run prints why)"),
        Option("shard_rows", int, SHARD_ROWS, "rows of a shard at most (on the batch "
               "grid): a run of more rows is cut into more shards than workers, which take "
               "them in turn; the results do not change", RUNTIME, _POSITIVE, metavar="N",
               doc="the most rows in a shard (rounded up to the batch grid): a worker's "
               "memory follows its shard, so a larger run is cut into more shards than "
               "workers, each taken by the next free worker (under torchrun shard s runs on "
               "rank s % world); the negatives do not change. Fixed when the run is planned"),
        Option("max_retries", int, 2, "retries of a failed shard", RUNTIME, _COUNT),
        Option("stall_timeout", float, 1800.0, "seconds without progress before a worker is "
               "stopped and its shard retried; 0: never", RUNTIME, _COUNT, metavar="S"),
        Option("quiet", bool, False, "only the final summary", RUNTIME, negatable=True),
        Option("dry_run", bool, False, "validate every input and print the plan; embed nothing",
               RUNTIME),
        Option("overwrite", bool, False, "replace a run with another config in --output-dir",
               RUNTIME, negatable=True),
    ),
)

BY_KEY = {o.key: o for o in OPTIONS}
# former names of config keys, still read: the former key -> the key
RENAMED = {o.former.key: o.key for o in OPTIONS if o.former}
RUNTIME_ONLY = frozenset(o.name for o in OPTIONS if o.role == RUNTIME)
EMBEDDING_KEYS = tuple(dict.fromkeys(o.name for o in OPTIONS if o.role == EMBEDDINGS))
IDENTITY_DEFAULTS = {o.key: o.default for o in OPTIONS if o.omitted_at_default}


def markdown() -> str:
    """README's option table (section "Mining a split"): every flag of `hnm mine`, one row
    each."""
    lines = ["| flag | YAML key | default | values | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(o)) + " |")
    return "\n".join(lines) + "\n"


def _cells(o: Option) -> list[str]:
    value = o.metavar or ("|".join(o.rule.choices) if o.rule and o.rule.choices
                          else {int: "N", float: "X"}.get(o.kind, "TEXT"))
    flag = f"`{o.flag}`" if o.kind is bool else f"`{o.flag} {value}`"
    if o.negatable:
        flag += f", `--no-{o.flag[2:]}`"
    key = f"`fields: {{{o.key.split('.')[1]}: …}}`" if "." in o.key else f"`{o.key}`"
    default = o.shown_default() or ("off" if o.kind is bool else "—")
    literal = o.default is not None and not o.default_text and o.kind is not bool
    meaning = o.doc or o.help
    if o.former:
        meaning += (f"; its former name `--{o.former.key.replace('_', '-')}` (YAML "
                    f"`{o.former.key}`) is read until {o.former.removed_in}")
    return [flag, key, f"`{default}`" if literal else default, o.rule.span if o.rule else "",
            meaning]

