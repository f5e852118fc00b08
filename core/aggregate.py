"""From per-image scores to the per-individual ranking and the Kaggle-style top-5 answer."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from core.metrics import NEW_INDIVIDUAL


class IndividualScore(NamedTuple):
    individual_id: str
    score: float
    best_gallery_index: int  # index into the gallery arrays of the image that gave `score`


AGGREGATES = ("max", "top2mean")


def aggregate_per_individual(gallery_ids: Sequence[str], scores: np.ndarray,
                             how: str = "max") -> list[IndividualScore]:
    """One entry per individual, sorted by score descending: the max of its images' scores, or with
    `how="top2mean"` the mean of its two best (its best alone when it has one scored image).

    Ties are broken deterministically: between individuals by ID (ascending), between images of
    one individual by the lowest gallery index. NaN scores (no stage scored the pair) carry no
    evidence and are ignored; an individual with only NaN scores is left out."""
    ids = np.asarray(gallery_ids, dtype=object)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if ids.size != s.size:
        raise ValueError(f"{ids.size} gallery ids for {s.size} scores")
    best: dict[str, tuple[float, int]] = {}
    for i in np.flatnonzero(~np.isnan(s)):
        key = str(ids[i])
        v = float(s[i])
        cur = best.get(key)
        # strict > keeps the first (lowest) index among equal scores
        if cur is None or v > cur[0]:
            best[key] = (v, int(i))
    if how == "top2mean":
        second: dict[str, float] = {}
        for i in np.flatnonzero(~np.isnan(s)):
            key = str(ids[i])
            if int(i) != best[key][1]:
                second[key] = max(second.get(key, -np.inf), float(s[i]))
        best = {k: ((v + second[k]) / 2 if k in second else v, i) for k, (v, i) in best.items()}
    elif how != "max":
        raise ValueError(f"unknown aggregation {how!r}: choose among {', '.join(AGGREGATES)}")
    out = [IndividualScore(k, v, i) for k, (v, i) in best.items()]
    out.sort(key=lambda r: (-r.score, r.individual_id))
    return out


def top5_with_new(ranked: Sequence[tuple], tau: float) -> list[str]:
    """The answer tokens: `new_individual` inserted before the first candidate whose score < tau.

    `ranked` holds (individual_id, score, ...) tuples sorted by score descending. A candidate with
    score == tau stays ahead of `new_individual`. If the first five candidates all reach tau,
    `new_individual` is appended only when fewer than five are listed. At most five tokens, no
    duplicates."""
    out: list[str] = []
    new_placed = False
    for cand in ranked:
        ident, score = str(cand[0]), float(cand[1])
        if len(out) >= 5:
            break
        if ident == NEW_INDIVIDUAL or ident in out:
            continue
        if not new_placed and score < tau:
            out.append(NEW_INDIVIDUAL)
            new_placed = True
            if len(out) >= 5:
                break
        out.append(ident)
    if not new_placed and len(out) < 5:
        out.append(NEW_INDIVIDUAL)
    return out
