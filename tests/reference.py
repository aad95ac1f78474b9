"""A deliberately plain implementation of SPEC §3-7: loops over full similarity matrices."""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hnm.checks import is_file
from hnm.readers import ImageRef, payload


def cross_rejects(cfg, cross, own, ratio=None, margin=None):
    """The positive-aware rule on one pair: cross above ratio * own, or within margin of
    own (ratio and margin: the config's unless given)."""
    ratio = cfg.max_cross_score_ratio if ratio is None else ratio
    margin = cfg.min_cross_score_margin if margin is None else margin
    return (ratio is not None and cross > ratio * own) or \
        (margin is not None and cross > own - margin)


def reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u, cfg,
                   searched=None, first_lists=None, outcomes=None, C=None):
    """Returns, per anchor, a list of (row, kind, detail) exactly as SPEC §3-7 describes.

    V: (N, dv) visual embeddings; T: (U, dt) phrase embeddings; blacklist: (B, dt) or None.
    cfg: an hnm Config (its mining fields are read). detail: the threshold step for hard
    negatives, (anchor_cluster, negative_cluster) for diverse ones.

    With an approximate (IVF) index: searched(a) lists the rows N(a) is taken from (those of
    the lists probed for a); first_lists(a) is a's diverse candidate list, whose free rows
    are tried first (per cluster condition) before every row is.
    outcomes: a list that receives each anchor's `reference_outcome`.
    C: (U, dv) phrase embeddings in V's space (a joint space): the cross rule of the config
    applies, cross(a, j) = V[a] . C[pid[j]] against own(a) = cross(a, a).
    """
    n = len(V)
    sv = np.asarray(V, np.float64) @ np.asarray(V, np.float64).T
    st = np.asarray(T, np.float64) @ np.asarray(T, np.float64).T
    pid = list(text_ids)
    sc = None if C is None else np.asarray(V, np.float64) @ np.asarray(C, np.float64).T

    def cross_out(a, j, **rule):
        return sc is not None and cross_rejects(cfg, sc[a, pid[j]], sc[a, pid[a]], **rule)
    eligible = []
    for j in range(n):
        ok = len(phrases[pid[j]]) >= cfg.min_answer_length
        if blacklist is not None and len(blacklist):
            sims = [float(np.dot(np.asarray(T[pid[j]], np.float64), np.asarray(b, np.float64)))
                    for b in blacklist]
            ok = ok and max(sims) <= cfg.blacklist_similarity
        eligible.append(ok)
    window = OrderedDict()

    def count(p):
        return window.get(p, 0)

    def use(p):
        if p in window:
            window[p] += 1
        else:
            if len(window) >= cfg.sliding_window_size:
                window.popitem(last=False)
            window[p] = 1

    def std_limit(p):
        length = len(phrases[p])
        return 1 if length < 60 else 2 if length < 100 else 3

    def classify(a, j, taken, threshold, limit):
        """The first SPEC §5 rule that skips neighbour j (None: j is taken)."""
        if sv[a, j] < cfg.min_visual_similarity:
            return "min_visual"
        if groups[j] == groups[a]:
            return "same_group"
        if not eligible[j]:
            return "ineligible"
        # too similar at every step, then the cross rule, then this step's threshold
        if st[pid[a], pid[j]] >= cfg.cosine_threshold + 0.18:
            return "text_similar"
        if cross_out(a, j):
            return "cross_score"
        if st[pid[a], pid[j]] >= threshold:
            return "text_similar"
        if pid[j] in taken:
            return "repeated_phrase"
        if count(pid[j]) >= limit(pid[j]):
            return "phrase_cap"
        return None

    def hard(a, taken):
        """(row, step) or None, and what the scan skipped: before the pick in the pass
        that took it, or in all of N(a) (its loosest standard pass) when none did."""
        pool = range(n) if searched is None else searched(a)
        others = sorted((j for j in pool if j != a), key=lambda j: (-sv[a, j], j))
        neighbours = others[:cfg.k_nn]
        tau = cfg.cosine_threshold
        passes = [(step, t, std_limit) for step, t in enumerate((tau, tau + 0.09, tau + 0.18))]
        passes.append(("fallback", tau, lambda p: cfg.fallback_phrase_reuse_limit))
        for step, t, limit in passes:
            rules = [classify(a, j, taken, t, limit) for j in neighbours]
            if None in rules:
                k = rules.index(None)
                return (neighbours[k], step), Counter(rules[:k])
        loosest = [classify(a, j, taken, tau + 0.18, std_limit) for j in neighbours]
        return None, Counter(loosest)

    def diverse(a, taken):
        cands = [j for j in range(n) if j != a and groups[j] != groups[a] and eligible[j]
                 and count(pid[j]) < std_limit(pid[j]) and pid[j] not in taken]
        other = [j for j in cands if clusters[j] != clusters[a]]
        if first_lists is not None:
            own = [j for j in cands if clusters[j] == clusters[a]]
            for pool in (other, own):
                listed = [j for j in first_lists(a) if j in set(pool)]
                if listed or pool:
                    j = listed[0] if listed else min(pool, key=lambda j: (sv[a, j], j))
                    return j, (int(clusters[a]), int(clusters[j]))
            return None
        pool = other or cands
        if not pool:
            return None
        j = min(pool, key=lambda j: (sv[a, j], j))
        return j, (int(clusters[a]), int(clusters[j]))

    out = []
    for a in range(len(u)):
        order = ("diverse", "hard") if u[a] < cfg.diverse_ratio else ("hard", "diverse")
        picks, taken, skipped, scanned, ended = [], set(), Counter(), False, None
        for _ in range(cfg.num_negatives):
            found = None
            for kind in order:
                if kind == "hard":
                    found, skips = hard(a, taken)
                    skipped += skips
                    scanned = True
                    ended = skips
                else:
                    found = diverse(a, taken)
                if found:
                    found = (found[0], kind, found[1])
                    break
            if not found:
                break
            use(pid[found[0]])
            taken.add(pid[found[0]])
            picks.append(found)
        out.append(picks)
        if outcomes is not None:
            audit = {} if cfg.max_cross_score_ratio is not None or \
                cfg.min_cross_score_margin is not None else {"ratio": 0.95}
            suspect = [st[pid[a], pid[j]] > cfg.audit_text_similarity
                       or sv[a, j] > cfg.audit_visual_similarity
                       or cross_out(a, j, **audit) for j, _, _ in picks]
            outcomes.append(reference_outcome(cfg, suspect, ended, skipped, scanned,
                                              any(groups[j] != groups[a] and eligible[j]
                                                  for j in range(n))))
    return out


def reference_outcome(cfg, suspect, ended, skipped, scanned, diverse_possible):
    """README's rule for an anchor's outcome, from whether each of its picks is suspect:
    (reason, missing, skipped or None)."""
    asked = cfg.num_negatives
    picks = suspect
    kept = [s for s in suspect if not (cfg.drop_suspect_negatives and s)]
    reason = None
    if len(picks) < asked:
        for rule in ("phrase_cap", "repeated_phrase"):
            if ended[rule]:
                reason = rule
                break
        else:
            reason = "no_diverse" if diverse_possible else next(
                (r for r in ("cross_score", "text_similar", "ineligible", "same_group")
                 if ended[r]),
                "min_visual")
    if len(kept) < len(picks) and (len(picks) == asked or not kept):
        reason = "suspect_dropped"
    return reason, asked - len(kept), dict(skipped) if scanned else None


def duplicate_images(images: list[Path | ImageRef]) -> dict[str, int]:
    """Rows whose image holds the same bytes as an earlier row's (by SHA-256), over a list
    of images in memory: what `corpus_images.duplicate_images` counts from a store.

    Only images whose size another image shares are read: a unique size cannot repeat.
    Images in Parquet shards have no size until read: those are all read.
    """
    sizes: dict[Any, int | None] = {p: _size(p) for p in dict.fromkeys(images)}
    same_size = Counter(s for s in sizes.values() if s is not None and s >= 0)
    keys: dict[Any, Any] = {}
    for p, size in sizes.items():
        if size is None:
            keys[p] = None
        elif size >= 0 and same_size[size] == 1:
            keys[p] = ("image", p)  # the only image of its size: equal only to itself
        else:
            keys[p] = _sha256(p)
    rows: dict[Any, int] = defaultdict(int)
    for p in images:
        if keys[p] is not None:
            rows[keys[p]] += 1
    readable = sum(rows.values())
    return {"rows": len(images), "unreadable": len(images) - readable,
            "duplicate_rows": readable - len(rows),
            "groups": sum(c > 1 for c in rows.values())}


def _size(image: Path | ImageRef) -> int | None:
    """Bytes of the image; -1: unknown until read; None: unreadable."""
    if isinstance(image, ImageRef):
        return image.size
    try:
        return image.stat().st_size if is_file(image) else None
    except OSError:
        return None


def _sha256(image: Path | ImageRef) -> str | None:
    if isinstance(image, ImageRef) and image.digest is not None:
        return image.digest  # hashed when the reader had its bytes in hand
    try:
        data = payload(image)
        if isinstance(data, Path):
            data = data.read_bytes()
    except (OSError, ValueError):  # pyarrow's read errors derive from these too
        return None
    return None if data is None else hashlib.sha256(data).hexdigest()
