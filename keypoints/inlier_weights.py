"""What one inlier says about identity: P(the correspondence comes from a true pair | its two
descriptors and where it sits in both photos), learned by train-verifier from its own pairs.

Parts every animal of a species shares (a head, horns, legs) and background seen at one place match
between different individuals with a consistent geometry: on the development set, new individuals'
best false matches carry 10 to 30 inliers on heads, horns and bushes, as many as a true match on the
coat pattern. Their descriptors and positions differ from the pattern's; a model of single inliers
learns that difference from train-verifier's true and false pairs, and the mean and the sum of its
probability over a pair's inliers join the validator's features (`WEIGHT_FEATURES`).

Saved as one JSON file (`inlier_weights.json`, `inlier_weights-xfeat.json`) like the validator: a header
and XGBoost's JSON model as a string, so the booster loads byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import xgboost as xgb

from core.runfolder import atomic_write_json
from keypoints.features import Keypoints
from keypoints.validator import group_folds

log = logging.getLogger(__name__)

FORMAT = "inlier-weights"
FORMAT_VERSION = 1
# the validator's features a model adds, after keypoints.verify.FEATURE_NAMES
WEIGHT_FEATURES: tuple[str, ...] = ("inlier_weight_mean", "inlier_weight_sum")
POSITION_COLUMNS = 6  # x, y in the query photo and in the gallery photo (over width, height), |x - 0.5| of each
WEIGHT_CHUNK = 128  # pairs whose photos' keypoints are read at once (`inlier_blocks`)


@dataclass(frozen=True)
class InlierWeightConfig:
    n_estimators: int = 200
    max_depth: int = 4
    learning_rate: float = 0.1
    subsample: float = 0.8
    colsample_bytree: float = 0.5
    min_child_weight: float = 5.0
    n_jobs: int = 1  # explicit, as the validator's
    # fewer true or false pairs with inliers than this: no model (the validator keeps the geometry alone)
    min_pairs: int = 20
    folds: int = 5  # train-verifier's pairs get out-of-fold weights (folds by individual) for the validator


def relative_xy(kp: Keypoints) -> np.ndarray:
    """(n, 2) float32: each keypoint's x and y as a share of its photo's width and height."""
    h, w = kp.image_size
    return (np.asarray(kp.xy, np.float32) / np.array([max(w, 1), max(h, 1)], np.float32)).astype(np.float32)


def rows_from(desc_query: np.ndarray, desc_gallery: np.ndarray, xy_query: np.ndarray,
              xy_gallery: np.ndarray) -> np.ndarray:
    """The model's rows of m correspondences, given both sides' descriptors and `relative_xy` positions
    ((m, width) and (m, 2) each): both descriptors, both positions, then |x - 0.5| of each."""
    pq, pg = np.asarray(xy_query, np.float32), np.asarray(xy_gallery, np.float32)
    return np.concatenate([desc_query, desc_gallery, pq, pg, np.abs(pq[:, :1] - 0.5), np.abs(pg[:, :1] - 0.5)],
                          axis=1).astype(np.float32)


def inlier_rows(kp_query: Keypoints, kp_gallery: Keypoints, idx: np.ndarray) -> np.ndarray:
    """(m, 2 x width + POSITION_COLUMNS) float32: for each inlier (`idx` rows: query keypoint, gallery
    keypoint), both descriptors and both positions as a share of their photo's width and height."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1, 2)
    return rows_from(kp_query.desc[idx[:, 0]], kp_gallery.desc[idx[:, 1]], relative_xy(kp_query)[idx[:, 0]],
                     relative_xy(kp_gallery)[idx[:, 1]])


def summarise(weights: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """(n, len(WEIGHT_FEATURES)) float32: mean and sum of each pair's inlier weights (`counts` of them
    in order; a pair without inliers gets zeros)."""
    counts = np.asarray(counts, dtype=np.int64)
    pair = np.repeat(np.arange(len(counts)), counts)
    total = np.bincount(pair, weights=np.asarray(weights, np.float64), minlength=len(counts))
    return np.stack([total / np.maximum(counts, 1), total], axis=1).astype(np.float32)


class InlierWeights:
    """The fitted model of single inliers (an XGBoost booster) and the width of the rows it reads."""

    def __init__(self, booster: xgb.Booster, width: int, cfg: InlierWeightConfig = InlierWeightConfig(),
                 info: dict | None = None):
        self.booster, self.width, self.cfg, self.info = booster, int(width), cfg, dict(info or {})
        self.booster.set_param({"nthread": cfg.n_jobs})

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, cfg: InlierWeightConfig = InlierWeightConfig(), seed: int = 0,
            info: dict | None = None) -> "InlierWeights":
        X = np.asarray(X, np.float32)
        params = {"objective": "binary:logistic", "eval_metric": "logloss", "max_depth": cfg.max_depth,
                  "eta": cfg.learning_rate, "subsample": cfg.subsample, "colsample_bytree": cfg.colsample_bytree,
                  "min_child_weight": cfg.min_child_weight, "nthread": cfg.n_jobs, "seed": seed,
                  "tree_method": "hist"}
        booster = xgb.train(params, xgb.DMatrix(X, label=np.asarray(y, np.float32), nthread=cfg.n_jobs),
                            cfg.n_estimators)
        return cls(booster, X.shape[1], cfg, info)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """P(true pair) of each row of `X` (rows of `inlier_rows`)."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.width:
            raise ValueError(f"inlier rows of width {X.shape[1] if X.ndim == 2 else X.shape}, the model reads "
                             f"{self.width} (descriptors of another matcher?)")
        if not len(X):
            return np.zeros(0)
        return np.asarray(self.booster.inplace_predict(X), np.float64)

    def pair_features(self, blocks: Sequence[np.ndarray | None]) -> np.ndarray:
        """`summarise` of the weights of each pair's inliers, given each pair's `inlier_rows` (`inlier_blocks`;
        None: no inliers or a photo without keypoints, zeros); one prediction for all."""
        blocks = [np.zeros((0, self.width), np.float32) if b is None else b for b in blocks]
        if not blocks:
            return np.zeros((0, len(WEIGHT_FEATURES)), np.float32)
        return summarise(self.predict(np.concatenate(blocks)), [len(b) for b in blocks])

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(bytes(self.booster.save_raw(raw_format="json"))).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """One JSON file, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": FORMAT, "version": FORMAT_VERSION, "xgboost_version": xgb.__version__,
                                 "width": self.width, "config": asdict(self.cfg), "info": self.info,
                                 "booster_json": bytes(self.booster.save_raw(raw_format="json")).decode("utf-8")})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "InlierWeights":
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        if doc.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} file (format={doc.get('format')!r})")
        if int(doc.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"{FORMAT} version {doc['version']} is newer than this code ({FORMAT_VERSION})")
        booster = xgb.Booster()
        booster.load_model(bytearray(doc["booster_json"].encode("utf-8")))
        booster.set_param({"device": "cpu"})
        fields = {k: v for k, v in doc.get("config", {}).items() if k in InlierWeightConfig.__dataclass_fields__}
        return cls(booster, doc["width"], InlierWeightConfig(**fields), doc.get("info"))


def fit_inlier_weights(blocks: Sequence[np.ndarray], y: np.ndarray, groups: np.ndarray,
                       cfg: InlierWeightConfig = InlierWeightConfig(), seed: int = 0,
                       ) -> tuple[InlierWeights | None, np.ndarray, dict]:
    """The model of single inliers fitted on the pairs' inlier rows (`blocks[i]`: pair i's `inlier_rows`,
    empty or None without inliers; each row labelled with its pair's `y`), and the pairs' weight features out of
    fold: pair i's from a model that saw no pair of an individual in i's query fold (folds by individual
    over `groups`, (n, 2) individuals of each pair, as keypoints.validator.heldout_auc deals them), so the
    validator fitted on them sees weights as they come for new photos. None and zeros, with the reason
    in the summary, when fewer than `cfg.min_pairs` true or false pairs have inliers."""
    y = np.asarray(y).astype(int).ravel()
    counts = np.array([0 if b is None else len(b) for b in blocks], dtype=np.int64)
    has = counts > 0
    n_true, n_false = int(np.sum(has & (y == 1))), int(np.sum(has & (y == 0)))
    info = {"pairs_with_inliers_true": n_true, "pairs_with_inliers_false": n_false, "inliers": int(counts.sum())}
    zeros = np.zeros((len(blocks), len(WEIGHT_FEATURES)), np.float32)
    if min(n_true, n_false) < cfg.min_pairs:
        return None, zeros, {**info, "fitted": False,
                             "reason": f"{n_true} true and {n_false} false training pairs with inliers; it needs "
                                                       f"{cfg.min_pairs} of each"}
    X = np.concatenate([b for b in blocks if b is not None and len(b)])
    row_pair = np.repeat(np.arange(len(blocks)), counts)
    row_y = y[row_pair]
    g = np.asarray(groups).reshape(len(blocks), -1)
    uniq, fold_of = group_folds(g.ravel(), cfg.folds, seed)
    folds = fold_of[np.searchsorted(uniq, g)]
    oof = np.zeros(len(X))
    for f in range(cfg.folds):
        test = folds[row_pair, 0] == f
        train = ~np.any(folds[row_pair] == f, axis=1)
        if not test.any():
            continue
        if len(np.unique(row_y[train])) < 2:
            oof[test] = row_y[train].mean() if train.any() else 0.5
            continue
        oof[test] = InlierWeights.fit(X[train], row_y[train], cfg, seed + f).predict(X[test])
    model = InlierWeights.fit(X, row_y, cfg, seed, info={**info, "rows_true": int(row_y.sum()),
                                                         "rows_false": int((1 - row_y).sum())})
    return model, summarise(oof, counts), {**model.info, "fitted": True, "fingerprint": model.fingerprint}


def inlier_blocks(results: Sequence, pairs: Sequence[tuple], keypoints: Callable[[Sequence], dict],
                  key: Callable) -> list[np.ndarray | None]:
    """The `inlier_rows` of verification `results` of record `pairs` (None for a pair without inliers or a
    photo without keypoints), for fitting the model (train-verifier) and for its pair features (the
    stage): the keypoints of the photos of pairs with inliers read through `keypoints(records) -> {key:
    Keypoints}` (`key(record)` their key) WEIGHT_CHUNK pairs at a time, so memory stays bounded however
    many pairs a batch holds (a calibration scores all its folds' pairs at once)."""
    blocks = []
    for start in range(0, len(results), WEIGHT_CHUNK):
        part = list(zip(results[start:start + WEIGHT_CHUNK], pairs[start:start + WEIGHT_CHUNK]))
        wanted = {}
        for res, (q, g) in part:
            if res.n_inliers and res.inlier_idx is not None:
                for rec in (q, g):
                    wanted.setdefault(key(rec), rec)
        wanted.pop(None, None)
        kps = keypoints(list(wanted.values())) if wanted else {}
        for res, (q, g) in part:
            kq, kg = kps.get(key(q)), kps.get(key(g))
            ok = res.n_inliers and res.inlier_idx is not None and kq is not None and kg is not None
            blocks.append(inlier_rows(kq, kg, res.inlier_idx) if ok else None)
    return blocks
