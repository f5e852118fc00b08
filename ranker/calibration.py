"""Score calibrators: map one stage's raw score (cosine, pair-head probability, validator
probability) to P(same individual), monotone non-decreasing and in [0, 1].

NaN means "this stage did not run for this pair" (e.g. keypoints only verify the top-V): it is
dropped when fitting and passed through as NaN by `predict`, so that fusion decides what a missing
stage means instead of a calibrator silently inventing a probability.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy.special import expit

from core.metrics import roc_auc
from core.runfolder import atomic_write_json

log = logging.getLogger(__name__)


class JsonFile:
    """save/load through to_dict/from_dict, in plain JSON written atomically."""

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))


class Calibrator(Protocol):
    kind: str

    def fit(self, scores, labels, name: str = "") -> "Calibrator": ...
    def predict(self, scores) -> np.ndarray: ...
    def to_dict(self) -> dict: ...


def _finite_pairs(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("labels must be 0 or 1")
    keep = ~np.isnan(s)
    if np.any(np.isinf(s[keep])):
        raise ValueError("scores must be finite or NaN (NaN = stage not run)")
    if not keep.any():
        raise ValueError("no non-NaN score to fit a calibrator on")
    return s[keep], y[keep]


class IsotonicCalibrator(JsonFile):
    """Isotonic regression (pool-adjacent-violators); predicts by linear interpolation between
    the fitted steps, constant beyond the fitted range."""

    kind = "isotonic"

    def __init__(self) -> None:
        self.x_: np.ndarray | None = None
        self.y_: np.ndarray | None = None

    def fit(self, scores, labels, name: str = "") -> "IsotonicCalibrator":
        s, y = _finite_pairs(scores, labels)
        # scikit-learn pools equal scores first and keeps both ends of every constant block, so
        # interpolating between its thresholds rises only between blocks
        from sklearn.isotonic import IsotonicRegression  # (imported when fitting: `--help` starts faster)

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(s, y)
        self.x_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_ = np.clip(np.asarray(iso.y_thresholds_, dtype=np.float64), 0.0, 1.0)
        return self

    def predict(self, scores) -> np.ndarray:
        if self.x_ is None:
            raise RuntimeError("IsotonicCalibrator is not fitted")
        s = np.asarray(scores, dtype=np.float64)
        out = np.interp(s, self.x_, self.y_)  # np.interp clamps beyond the ends
        out = np.clip(out, 0.0, 1.0)
        out[np.isnan(s)] = np.nan
        return out

    def to_dict(self) -> dict:
        if self.x_ is None:
            raise RuntimeError("IsotonicCalibrator is not fitted")
        return {"kind": self.kind, "x": self.x_.tolist(), "y": self.y_.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "IsotonicCalibrator":
        c = cls()
        c.x_ = np.asarray(d["x"], dtype=np.float64)
        c.y_ = np.asarray(d["y"], dtype=np.float64)
        return c



def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-3,
                 sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression (scikit-learn's, lbfgs) on standardised columns.

    Minimises mean weighted log-loss + l2/2 * |w|^2 (the intercept is not penalised), which keeps
    perfectly separable data finite. Returns (w, b) on the raw scale."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    y = np.asarray(y, dtype=np.float64)
    n, k = X.shape
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    sw = sw / sw.sum()
    mu = sw @ X
    sd = np.sqrt(sw @ (X - mu) ** 2)
    sd[sd < 1e-12] = 1.0  # constant column: its weight is pinned to 0 by the penalty
    if y.min() == y.max():  # one class: the base rate, no slope
        p = float(np.clip(y[0], 1e-6, 1 - 1e-6))
        return np.zeros(k), float(np.log(p / (1 - p)))
    # sum(sw) = 1, so C = 1 / l2 gives mean log-loss + l2/2 |w|^2
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0 / l2, tol=1e-10, max_iter=1000).fit((X - mu) / sd, y, sample_weight=sw)
    w = lr.coef_.ravel() / sd
    b = float(lr.intercept_[0] - w @ mu)
    return w, b


class LogisticCalibrator(JsonFile):
    """Platt scaling: P = sigmoid(a * score + b), fitted by penalised Newton.

    The slope is constrained to a >= 0 so the map stays monotone non-decreasing: a stage whose
    score falls when pairs are more alike is a bug upstream, and a calibrator that quietly
    inverted it would hide the bug. Such a fit falls back to the base rate (a = 0) with a warning."""

    kind = "logistic"

    def __init__(self, l2: float = 1e-3) -> None:
        self.l2 = l2
        self.a: float | None = None
        self.b: float | None = None

    def fit(self, scores, labels, name: str = "") -> "LogisticCalibrator":
        s, y = _finite_pairs(scores, labels)
        w, b = fit_logistic(s, y, l2=self.l2)
        a = float(w[0])
        if a < 0:
            # a slightly negative slope is noise on an uninformative stage; a strong one is a bug
            strong = 0 < y.sum() < y.size and roc_auc(y, s) < 0.4
            log.log(logging.WARNING if strong else logging.INFO,
                    "logistic calibrator%s: score anti-correlates with labels (slope %.3g); using the base rate "
                    "instead (a constant: the stage no longer ranks, in the fusion or alone)",
                    f" of the {name} stage" if name else "", a)
            pbar = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
            a, b = 0.0, float(np.log(pbar / (1 - pbar)))
        self.a, self.b = a, float(b)
        return self

    def predict(self, scores) -> np.ndarray:
        if self.a is None:
            raise RuntimeError("LogisticCalibrator is not fitted")
        s = np.asarray(scores, dtype=np.float64)
        return expit(self.a * s + self.b)  # expit(NaN) is NaN

    def to_dict(self) -> dict:
        if self.a is None:
            raise RuntimeError("LogisticCalibrator is not fitted")
        return {"kind": self.kind, "a": self.a, "b": self.b, "l2": self.l2}

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticCalibrator":
        c = cls(l2=float(d.get("l2", 1e-3)))
        c.a, c.b = float(d["a"]), float(d["b"])
        return c



CALIBRATORS = {"isotonic": IsotonicCalibrator, "logistic": LogisticCalibrator}


def make_calibrator(kind: str) -> IsotonicCalibrator | LogisticCalibrator:
    """A fresh, unfitted calibrator of the named kind ("isotonic" or "logistic")."""
    try:
        return CALIBRATORS[kind]()
    except KeyError:
        raise ValueError(f"unknown calibrator {kind!r}; choose from {sorted(CALIBRATORS)}") from None


def calibrator_from_dict(d: dict) -> IsotonicCalibrator | LogisticCalibrator:
    """Rebuild a fitted calibrator from its `to_dict()`."""
    kind = d.get("kind")
    if kind not in CALIBRATORS:
        raise ValueError(f"unknown calibrator kind {kind!r} in saved calibration")
    return CALIBRATORS[kind].from_dict(d)
