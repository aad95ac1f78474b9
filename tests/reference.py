"""A deliberately plain implementation of SPEC §3-7: loops over full similarity matrices."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def reference_mine(V, T, text_ids, groups, phrases, clusters, blacklist, u, cfg,
                   searched=None, first_lists=None):
    """Returns, per anchor, a list of (row, kind, detail) exactly as SPEC §3-7 describes.

    V: (N, dv) visual embeddings; T: (U, dt) phrase embeddings; blacklist: (B, dt) or None.
    cfg: an hnm Config (its mining fields are read). detail: the threshold step for hard
    negatives, (anchor_cluster, negative_cluster) for diverse ones.

    With an approximate (IVF) index: searched(a) lists the rows N(a) is taken from (those of
    the lists probed for a); first_lists(a) is a's diverse candidate list, whose free rows
    are tried first (per cluster condition) before every row is.
    """
    n = len(V)
    sv = np.asarray(V, np.float64) @ np.asarray(V, np.float64).T
    st = np.asarray(T, np.float64) @ np.asarray(T, np.float64).T
    pid = list(text_ids)
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

    def hard(a, taken):
        pool = range(n) if searched is None else searched(a)
        others = sorted((j for j in pool if j != a), key=lambda j: (-sv[a, j], j))
        neighbours = others[:cfg.k_nn]
        tau = cfg.cosine_threshold
        for step, t in enumerate((tau, tau + 0.09, tau + 0.18)):
            for j in neighbours:
                if sv[a, j] < cfg.min_visual_similarity:
                    break
                if groups[j] == groups[a] or not eligible[j] or pid[j] in taken:
                    continue
                if count(pid[j]) >= std_limit(pid[j]) or st[pid[a], pid[j]] >= t:
                    continue
                return j, step
        for j in neighbours:
            if sv[a, j] < cfg.min_visual_similarity:
                break
            if groups[j] == groups[a] or not eligible[j] or pid[j] in taken:
                continue
            if count(pid[j]) >= cfg.fallback_phrase_reuse_limit or st[pid[a], pid[j]] >= tau:
                continue
            return j, "fallback"
        return None

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
        picks, taken = [], set()
        for _ in range(cfg.num_negatives):
            found = None
            for kind in order:
                found = hard(a, taken) if kind == "hard" else diverse(a, taken)
                if found:
                    found = (found[0], kind, found[1])
                    break
            if not found:
                break
            use(pid[found[0]])
            taken.add(pid[found[0]])
            picks.append(found)
        out.append(picks)
    return out
