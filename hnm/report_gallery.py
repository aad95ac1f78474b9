"""The report's gallery: anchors beside their negatives, and the suspected false negatives,
with small inline thumbnails."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from hnm.config import Config
from hnm.corpus import ColumnarCorpus
from hnm.data import too_large
from hnm.errors import HnmError
from hnm.lifecycle import run_corpus
from hnm.outcome import REASON_LABELS
from hnm.pages import esc
from hnm.plan import Plan
from hnm.readers import ImageRef, holds_tensor, image_stream, read_tensor, to_image
from hnm.report_scan import Scan, Suspects
from hnm.storage import RunDir

THUMB = 112  # longest side of a gallery thumbnail, in pixels
BLOCK = 4096  # records whose image keys are read at a time


class Thumbs:
    """Small inline JPEG thumbnails, each image read once (inside `image_limit`)."""

    def __init__(self, image_dir: Path, max_pixels: int) -> None:
        self.image_dir = image_dir
        self.max_pixels = max_pixels
        self.cache: dict[str, str | None] = {}
        self.missing: set[str] = set()

    def html(self, image: str) -> str:
        if image not in self.cache:
            self.cache[image] = self._data_uri(self.image_dir / image)
        uri = self.cache[image]
        if uri is None:
            self.missing.add(image)
            return f"<div class='noimg'>image not shown<br>{esc(image)}</div>"
        return f"<img class='thumb' src='{uri}' alt='{esc(image)}'>"

    def find_in(self, config: Config, plan: Plan, ds: ColumnarCorpus | None, keys: set[str]
                ) -> None:
        """Thumbnails of images held in the input's shards, named in the records by their
        keys: read in input order (a Parquet column streams once), a block of records at a
        time."""
        if ds is None:
            try:
                ds = run_corpus(RunDir(config.output_dir), config, plan)
            except HnmError:
                return  # the input moved or changed: its images show as not found
        f = config.fields
        for start in range(0, len(ds), BLOCK):
            rows = np.arange(start, min(len(ds), start + BLOCK))
            for row, record in zip(rows, ds.records.take(ds.positions[rows])):
                key = record.get(f.image)
                if key in keys and key not in self.cache:
                    self.cache[key] = self._data_uri(ds.images[int(row)],
                                                     config.tensor_normalization)

    def _data_uri(self, source: Path | ImageRef, normalization: str = "imagenet") -> str | None:
        from PIL import Image

        try:
            # a tensor: the image it was made from, straight from the values read (no
            # image file is written and decoded again)
            with to_image(read_tensor(source), normalization) if holds_tensor(source) \
                    else Image.open(image_stream(source)) as img:
                if too_large(img, self.max_pixels):
                    return None
                img.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a fraction of the size
                img = img.convert("RGB")
                img.thumbnail((THUMB, THUMB))
                buffer = io.BytesIO()
                img.save(buffer, "JPEG", quality=72)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None  # a missing, damaged or huge image must not stop the report
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def shown_images(config: Config, scan: Scan, suspects: Suspects) -> set[str]:
    """The image of every anchor and negative the page shows."""
    f = config.fields
    shown = {n["image"] for r in scan.records.values() for n in r.get("negatives") or []}
    shown |= {r[f.image] for r in scan.records.values() if isinstance(r.get(f.image), str)}
    for s in suspects.by_text + suspects.by_visual:
        shown |= {s["anchor_image"], s["negative"]["image"]}
    return shown


def gallery(config: Config, scan: Scan, thumbs: Thumbs) -> str:
    sections = [
        ("Random sample", f"{len(scan.sample)} anchors drawn with seed {config.seed}",
         scan.sample),
        ("Borderline: highest text similarity", "hard negatives closest to saying the same",
         scan.high_text),
        ("Borderline: lowest visual similarity", "hard negatives that look least alike",
         scan.low_visual),
        ("Anchors without a negative", "the first ones in input order", scan.failed),
    ]
    out = ["<h2>Gallery</h2>"]
    for title, note, positions in sections:
        out.append(f"<h3>{esc(title)}</h3><p class='muted'>{esc(note)}</p>")
        cases = "".join(case(config, p, scan.records[p], thumbs) for p in positions)
        out.append(f"<div class='cases'>{cases}</div>" if positions else "<p>None.</p>")
    return "".join(out)


def case(config: Config, position: int, record: dict, thumbs: Thumbs) -> str:
    """One anchor beside its negatives."""
    f = config.fields
    anchor = item(thumbs, record[f.image], record.get(f.id, f"record {position}"),
                  record[f.text], "anchor", "")
    negatives = [negative_item(thumbs, n) for n in record.get("negatives") or []]
    if not negatives:
        reason = (record.get("outcome") or {}).get("reason")
        why = f"<br><span class='muted'>{esc(REASON_LABELS[reason])}</span>" \
            if reason in REASON_LABELS else ""
        negatives = [f"<div class='none'>no negative found{why}</div>"]
    return f"<div class='case'>{anchor}{''.join(negatives)}</div>"


def negative_item(thumbs: Thumbs, n: dict) -> str:
    detail = f"step {n['threshold_step']}" if n["type"] == "hard" else \
        f"cluster {n.get('anchor_cluster')}→{n.get('negative_cluster')}"
    tags = f"<span class='tag {n['type']}'>{n['type']}</span> "
    if n.get("suspect"):
        tags += "<span class='tag suspect'>suspect</span> "
    meta = (f"{tags}{esc(detail)}<br>text {n['text_similarity']:.3f} · "
            f"visual {n['visual_similarity']:.3f}")
    return item(thumbs, n["image"], n["id"], n["text"], "negative", meta)


def item(thumbs: Thumbs, image: str, rid: Any, text: str, kind: str, meta: str) -> str:
    return (f"<div class='item {kind}'>{thumbs.html(image)}<div><div class='meta'>{esc(rid)}"
            f"</div><div class='text'>{esc(text)}</div><div class='meta'>{meta}</div></div>"
            "</div>")


def suspect_table(config: Config, suspects: Suspects, thumbs: Thumbs) -> str:
    """Every suspect counted; those most alike their anchor shown beside it."""
    dropped = "; removed from the output (--drop-suspect-negatives)" \
        if config.drop_suspect_negatives else ""
    out = [f"<h2>Suspected false negatives</h2><p class='muted'>text similarity above "
           f"{config.audit_text_similarity} or visual similarity above "
           f"{config.audit_visual_similarity}; {suspects.total} in all{dropped}; every one "
           f"is listed in suspects.jsonl</p>"]
    for title, shown in (("Texts that say the same as the anchor's", suspects.by_text),
                         ("Images that nearly duplicate the anchor's", suspects.by_visual)):
        out.append(f"<h3>{esc(title)}</h3><p class='muted'>the {len(shown)} most alike</p>")
        cases = "".join(suspect_case(thumbs, s) for s in shown)
        out.append(f"<div class='cases'>{cases}</div>" if shown else "<p>None.</p>")
    return "".join(out)


def suspect_case(thumbs: Thumbs, s: dict) -> str:
    anchor = item(thumbs, s["anchor_image"], s["anchor_id"], s["anchor_text"], "anchor",
                  "suspect for: " + esc(", ".join(s["reasons"])))
    return f"<div class='case'>{anchor}{negative_item(thumbs, s['negative'])}</div>"
