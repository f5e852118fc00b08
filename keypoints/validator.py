"""The XGBoost validator: P(same individual | geometry of the keypoint match).

Saved as one JSON file (`verifier.json`): our header (format, version, feature names, settings)
plus XGBoost's own JSON model embedded as a raw string, so the booster is loaded byte-for-byte
as XGBoost wrote it and predictions round-trip exactly.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xgboost as xgb

from core.metrics import roc_auc
from core.runfolder import atomic_path

log = logging.getLogger(__name__)

FORMAT = "keypoint-verifier"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ValidatorConfig:
    # Shallow, regularised trees: the geometry signal is weak on hard photos and training sets are
    # a few hundred to a few thousand pairs. On 400 real nyala pairs (folds by individual, 3 seeds)
    # the held-out AUC was 0.57 with depth 4 / min_child_weight 2, 0.62 with these settings.
    n_estimators: int = 300
    max_depth: int = 2
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.6
    min_child_weight: float = 5.0
    reg_lambda: float = 1.0
    n_jobs: int = 1  # explicit: XGBoost would otherwise take every core of a shared machine
    device: str = "auto"  # "auto": cuda when XGBoost was built with it and torch sees a GPU


VALIDATOR_PRESETS: dict[str, ValidatorConfig] = {
    "default": ValidatorConfig(),
    "small": ValidatorConfig(n_estimators=100, max_depth=2, learning_rate=0.1),
    # for tens of thousands of pairs, where interactions between features can be learned
    "large": ValidatorConfig(n_estimators=500, max_depth=4, colsample_bytree=0.8, min_child_weight=2.0),
}


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if not xgb.build_info().get("USE_CUDA", False):
        return "cpu"
    try:
        import torch  # lazily: heavy, and only its GPU probe is needed here
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


# What a validator may use instead of the whole geometry: the inlier count alone, in a logistic
# model (XGBoost's linear booster: no trees, so no ties between counts). On a small catalog (tens
# of individuals) the full model can learn its few true pairs by heart and score held-out pairs
# worse than their inlier count does; train-verifier then keeps this one (engine.train_verifier).
INLIERS = ("n_inliers",)


class Validator:
    """fit / predict / save / load around an XGBoost booster (binary logistic). `uses`: the features
    it looks at among `feature_names`, in a linear model (None: all of them, in trees); `X` always has
    every feature's column."""

    def __init__(self, cfg: ValidatorConfig = ValidatorConfig(), feature_names: Sequence[str] | None = None,
                 uses: Sequence[str] | None = None):
        self.cfg = cfg
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.uses = list(uses) if uses is not None else None
        self.booster: xgb.Booster | None = None
        self.seed: int | None = None

    def _columns(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """X restricted to the features the model uses, and their names."""
        names = self.feature_names
        if self.uses is None:
            return X, names
        missing = [u for u in self.uses if u not in names]
        if missing:
            raise ValueError(f"the validator uses {', '.join(missing)}, which the features lack")
        return X[:, [names.index(u) for u in self.uses]], self.uses

    def _params(self, seed: int) -> dict:
        c = self.cfg
        return {
            "objective": "binary:logistic",
            "eval_metric": "auc",
            "tree_method": "hist",
            "max_depth": c.max_depth,
            "eta": c.learning_rate,
            "subsample": c.subsample,
            "colsample_bytree": c.colsample_bytree,
            "min_child_weight": c.min_child_weight,
            "lambda": c.reg_lambda,
            "nthread": c.n_jobs,
            "seed": int(seed),
            "device": pick_device(c.device),
        }

    def _check_width(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
        if self.feature_names is not None and X.shape[1] != len(self.feature_names):
            raise ValueError(f"X has {X.shape[1]} columns, the validator expects {len(self.feature_names)}")
        return X

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int = 0) -> "Validator":
        if self.feature_names is None:
            self.feature_names = [f"f{i}" for i in range(np.asarray(X).shape[1])]
        X = self._check_width(X)
        y = np.asarray(y).astype(np.float32).ravel()
        if len(y) != len(X):
            raise ValueError(f"{len(X)} rows in X but {len(y)} labels")
        if len(np.unique(y)) < 2:
            raise ValueError("the validator needs both same and different pairs to learn from")
        X, names = self._columns(X)
        d = xgb.DMatrix(X, label=y, feature_names=names, nthread=self.cfg.n_jobs)
        params = self._params(seed)
        if self.uses is not None:  # a logistic model of these few features
            params = {**{k: v for k, v in params.items() if k in ("objective", "eval_metric", "nthread", "seed")},
                      "booster": "gblinear", "updater": "coord_descent", "lambda": self.cfg.reg_lambda,
                      "eta": 0.5, "device": "cpu"}
        self.booster = xgb.train(params, d, num_boost_round=self.cfg.n_estimators)
        # predictions on the CPU, so a model trained on a GPU predicts the same after save/load
        self.booster.set_param({"device": "cpu"})
        self.seed = int(seed)
        log.info("validator fitted on %d pairs (%d same), device=%s", len(y), int(y.sum()), params["device"])
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """P(same individual) per row, float64."""
        if self.booster is None:
            raise RuntimeError("the validator is not fitted")
        X = self._check_width(X)
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        X, names = self._columns(X)
        d = xgb.DMatrix(X, feature_names=names, nthread=self.cfg.n_jobs)
        return self.booster.predict(d).astype(np.float64)

    def to_json(self) -> dict:
        if self.booster is None:
            raise RuntimeError("the validator is not fitted")
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "xgboost_version": xgb.__version__,
            "feature_names": self.feature_names,
            "uses": self.uses,
            "config": asdict(self.cfg),
            "seed": self.seed,
            "booster_json": bytes(self.booster.save_raw(raw_format="json")).decode("utf-8"),
        }

    def save(self, path: str | Path) -> Path:
        """Write one JSON file atomically (temporary name in the same folder, then rename)."""
        path = Path(path)
        # core's atomic writer, as for every file of a run folder: the file gets the user's usual
        # permissions (a temporary file from tempfile.mkstemp would stay readable by its owner only)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_json(), fh)
        return path

    @classmethod
    def from_json(cls, doc: dict, expected_features: Sequence[str] | None = None) -> "Validator":
        if doc.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format={doc.get('format')!r})")
        if int(doc.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"{FORMAT} version {doc['version']} is newer than this code ({FORMAT_VERSION})")
        names = list(doc["feature_names"])
        if expected_features is not None and list(expected_features) != names:
            raise ValueError("the saved validator was trained on other features than this code computes; "
                             "run train-verifier again")
        cfg_fields = {k: v for k, v in doc.get("config", {}).items() if k in ValidatorConfig.__dataclass_fields__}
        v = cls(ValidatorConfig(**cfg_fields), names, doc.get("uses"))  # a file without it: every feature
        booster = xgb.Booster()
        booster.load_model(bytearray(doc["booster_json"].encode("utf-8")))
        booster.set_param({"device": "cpu", "nthread": v.cfg.n_jobs})
        v.booster = booster
        v.seed = doc.get("seed")
        return v

    @classmethod
    def load(cls, path: str | Path, expected_features: Sequence[str] | None = None) -> "Validator":
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(json.load(fh), expected_features)


def group_folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """(distinct group values, fold number of each): shuffled with `seed`, dealt round-robin."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(uniq))
    fold_of = np.empty(len(uniq), dtype=np.int64)
    fold_of[perm] = np.arange(len(uniq)) % n_folds
    return uniq, fold_of


def heldout_auc(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, n_folds: int = 5,
                cfg: ValidatorConfig = ValidatorConfig(), feature_names: Sequence[str] | None = None,
                baseline_feature: str = "n_inliers", uses: Sequence[str] | None = None) -> dict:
    """Out-of-fold AUC of the validator (using `uses` of the features: see Validator) with folds by
    individual, next to the AUC of the raw inlier count on the same pairs.

    `groups` is (n,) — one individual per pair, e.g. the query's — or (n, 2) — both individuals of
    the pair. With (n, 2) a pair is tested in the fold of its first individual and the model of that
    fold is trained only on pairs that involve none of the fold's individuals, so no test individual
    is ever seen in training."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y).astype(int).ravel()
    g = np.asarray(groups)
    if g.ndim == 1:
        g = g[:, None]
    if len(g) != len(X) or len(y) != len(X):
        raise ValueError("X, y and groups must have the same number of rows")
    names = list(feature_names) if feature_names is not None else None
    if names is None:
        from keypoints.verify import FEATURE_NAMES  # the usual case: features of verify_pair
        names = list(FEATURE_NAMES)
    if len(names) != X.shape[1]:
        raise ValueError(f"{len(names)} feature names for {X.shape[1]} columns")
    uniq, fold_of = group_folds(g.ravel(), n_folds, seed)
    folds = fold_of[np.searchsorted(uniq, g)]  # (n, k): fold of each individual of each pair
    oof = np.full(len(y), np.nan)
    used = 0
    for f in range(n_folds):
        test = folds[:, 0] == f
        train = ~np.any(folds == f, axis=1)
        if not test.any():
            continue
        if len(np.unique(y[train])) < 2:
            oof[test] = y[train].mean() if train.any() else 0.5
            log.warning("fold %d: training pairs of one class only; constant prediction", f)
            continue
        v = Validator(cfg, names, uses).fit(X[train], y[train], seed=seed + f)
        oof[test] = v.predict(X[test])
        used += 1
    base = X[:, names.index(baseline_feature)]
    return {
        "auc_validator": roc_auc(y, oof),
        "auc_inliers": roc_auc(y, base),
        "n_pairs": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int((1 - y).sum()),
        "n_folds_fitted": used,
        "oof_scores": oof,
    }
