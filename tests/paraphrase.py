"""A synthetic set where some captions are paraphrases of other images' captions, built so
that only the cross-score rule can catch them.

Images come in small visual clusters (hard negatives exist); each record has its own group
and its own caption. The joint space: each caption lies near its own image (own scores
about 0.8), a neighbour's caption scores lower with an image than its own does. The
sentence space (the text rule's) is random: it sees no relation at all. Planted: for some
anchors a, a's nearest visual neighbour b becomes nearly the same view (visual similarity
about 0.9) captioned, in the joint space only, with a paraphrase of a's caption — b's text
describes a's image as well as a's own caption, yet neither the text rule (sentence
space), nor the audit's text or visual thresholds can tell.
"""

from __future__ import annotations

import numpy as np

from hnm.grid import finalize


def paraphrase_case(n: int = 600, planted: int = 60, seed: int = 0, dim: int = 32,
                    cluster: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    scenes = rng.normal(size=(n // cluster + 1, dim))
    V = finalize(scenes[np.arange(n) // cluster] + 0.6 * rng.normal(size=(n, dim)))
    C = V.astype(np.float64) + 0.3 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    C = C / np.linalg.norm(C, axis=1, keepdims=True)
    T = finalize(rng.normal(size=(n, 64)))
    sv = V.astype(np.float64) @ V.astype(np.float64).T
    np.fill_diagonal(sv, -np.inf)
    pairs: dict[int, int] = {}
    for a in rng.permutation(n).tolist():
        if len(pairs) == planted:
            break
        b = int(np.argmax(sv[a]))
        if a in pairs or b in pairs or a in pairs.values() or b in pairs.values():
            continue
        pairs[a] = b
    V = V.astype(np.float64)
    for a, b in pairs.items():
        # b: nearly the same view as a (visual similarity about 0.9, under the audit's
        # 0.98), captioned with a paraphrase of a's caption (in the joint space)
        V[b] = V[a] + 0.45 * rng.normal(size=dim) / np.sqrt(dim)
        C[b] = C[a] + 0.05 * rng.normal(size=dim) / np.sqrt(dim)
    V = finalize(V)
    phrases = [f"caption number {i} of the synthetic set" for i in range(n)]
    return {"V": V, "T": T, "C": finalize(C), "text_ids": np.arange(n),
            "groups": np.arange(n), "phrases": phrases, "pairs": pairs}


def mine_case(case: dict, config) -> list:
    """The engine's negatives of every row (all anchors), with a joint space."""
    from hnm.data import anchor_uniforms
    from hnm.engine import find_candidates, make_selector, select_negatives
    from hnm.kmeans import kmeans
    from hnm.miner import Arrays

    n = len(case["V"])
    clusters, _ = kmeans(case["V"], config.n_clusters, config.seed)
    tab = Arrays(case["V"], case["T"], case["text_ids"], case["groups"], np.ones(n, bool),
                 clusters, case["C"])
    u = anchor_uniforms([f"r{i}" for i in range(n)], config.seed)
    anchors = np.arange(n)
    cands, _ = find_candidates(config, tab, anchors, diverse_first=u < config.diverse_ratio)
    (done,) = select_negatives(config, make_selector(config, tab, case["phrases"]),
                               [(anchors, cands)], u)
    return done


def caught_missed_wrong(case: dict, off, on, on_config) -> dict[str, int]:
    """Rule off vs on: false negatives (a paraphrase partner mined as the negative) with
    the rule off; caught (gone with it on); missed (a partner still mined with it on);
    the rows the rule removes from the anchors' N(a), partners and others (wrongly); the
    skips counted in the outcomes; anchors whose negatives changed otherwise (through the
    phrase state: a phrase one anchor takes in place of its partner's is not free for a
    later one)."""
    partner = {**case["pairs"], **{b: a for a, b in case["pairs"].items()}}
    rows_off = [[p.row for p in r] for r in off.picks]
    rows_on = [[p.row for p in r] for r in on.picks]
    fn_off = {a for a, r in enumerate(rows_off) if partner.get(a) in r}
    missed = {a for a, r in enumerate(rows_on) if partner.get(a) in r}
    # what the rule removes from each N(a) (k_nn, min_visual_similarity), by brute force
    V, C = (np.asarray(case[k], np.float64) for k in ("V", "C"))
    sv = V @ V.T
    np.fill_diagonal(sv, -np.inf)
    removed_partner = removed_other = 0
    for a in range(len(V)):
        near = np.argsort(-sv[a], kind="stable")[:on_config.k_nn]
        near = near[sv[a, near] >= on_config.min_visual_similarity]
        out = near[V[a] @ C[near].T > on_config.max_cross_score_ratio * (V[a] @ C[a])]
        removed_partner += int(np.sum(out == partner.get(a, -1)))
        removed_other += int(np.sum(out != partner.get(a, -1)))
    changed = {a for a in range(len(rows_off)) if rows_off[a] != rows_on[a]}
    return {"planted_pairs": len(case["pairs"]), "false_negatives_off": len(fn_off),
            "caught": len(fn_off - missed), "missed": len(missed),
            "partner_rows_removed": removed_partner, "wrongly_removed_rows": removed_other,
            "cross_skips_counted": int(on.outcomes.skipped[:, 4].sum()),
            "other_anchors_changed": len(changed - fn_off)}


def write_case(root, case: dict) -> dict:
    """The case as precomputed embeddings of one joint space (the text file holds the
    joint-space captions C) for `hnm mine --joint-space`; returns mine_args' paths."""
    import json
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "annotations.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(case["phrases"]):
            handle.write(json.dumps({"id": f"s{i}", "image": f"img{i}.png", "text": text,
                                     "group": int(case["groups"][i])}) + "\n")
    np.save(root / "image_embeddings.npy", np.asarray(case["V"], np.float32))
    np.save(root / "text_embeddings.npy", np.asarray(case["C"], np.float32)[case["text_ids"]])
    return {"annotations": str(root / "annotations.jsonl"), "image_dir": str(root),
            "image_embeddings": str(root / "image_embeddings.npy"),
            "text_embeddings": str(root / "text_embeddings.npy")}
