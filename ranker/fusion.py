"""Fusion of the calibrated stage scores into one P(same individual) per (query, gallery) pair.

`ScoreFusion` holds one calibrator per stage and a combiner:
- `LogisticStack`: logistic regression over the logits of the calibrated scores plus one
  "stage not run" indicator per stage (a missing stage contributes logit 0 = no evidence, and its
  indicator learns what being skipped says, e.g. keypoints only run on the top-V shortlist);
- `MeanFusion`: nanmean of the calibrated scores, used when there is too little data to fit the
  stack (fewer than `FusionConfig.min_positives` positive or `min_negatives` negative pairs: the
  usual case with a held-out set of a few dozen individuals) or when there is a single stage.

A pair for which no stage produced a score has no fused probability: NaN.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.special import expit, logit

from ranker.calibration import JsonFile, calibrator_from_dict, fit_logistic, make_calibrator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionConfig:
    # "logistic" (Platt: strictly monotone, so a stage's own ranking keeps its resolution) or "isotonic"
    # (steps: with few positives many pairs tie). On the development set, logistic lifted every single
    # stage's closed-set top-1 (e.g. the siamese 0.104 -> 0.146 and 0.083 -> 0.118 on seeds 0 and 1).
    calibrator: str = "logistic"
    # Below these counts a learned stack overfits; the mean of calibrated scores is safer. Measured on the
    # development set (held-out calibration sets of 40-60 queries, 15-60 positive pairs): the stack put a
    # negative weight on the keypoints on one seed and the engine's closed-set top-1 fell to 0.06-0.07,
    # under the keypoint stage alone (0.17-0.21); the mean gave 0.19-0.23 on both seeds.
    min_positives: int = 200
    min_negatives: int = 20
    l2: float = 1e-3
    # The stack is trained on out-of-fold calibrated scores: isotonic fits its own training
    # data almost perfectly, and a stack fitted on those in-sample values would over-trust it.
    cross_fit_folds: int = 5
    seed: int = 0


class LogisticStack(JsonFile):
    """Logistic regression over k calibrated probabilities (NaN = stage not run).

    Features: logit(clip(p, eps, 1-eps)) with 0 where missing, then one missing indicator per
    stage. Score weights are kept >= 0 (a feature that gets a negative weight is dropped and the
    model refitted) so that a stage agreeing more never lowers the fused probability."""

    kind = "logistic_stack"

    def __init__(self, l2: float = 1e-3, eps: float = 1e-3) -> None:
        self.l2 = l2
        self.eps = eps
        self.w: np.ndarray | None = None  # 2k weights: k score logits, then k indicators
        self.b: float | None = None

    def _features(self, P: np.ndarray) -> np.ndarray:
        P = np.asarray(P, dtype=np.float64)
        if P.ndim != 2:
            raise ValueError("LogisticStack expects an (n, k) array of calibrated scores")
        miss = np.isnan(P)
        z = logit(np.clip(np.where(miss, 0.5, P), self.eps, 1 - self.eps))
        return np.hstack([z, miss.astype(np.float64)])

    def fit(self, P, labels) -> "LogisticStack":
        X = self._features(P)
        y = np.asarray(labels, dtype=np.float64)
        k = X.shape[1] // 2
        active = np.ones(X.shape[1], dtype=bool)
        while True:
            w_act, b = fit_logistic(X[:, active], y, l2=self.l2)
            w = np.zeros(X.shape[1])
            w[active] = w_act
            negative = np.flatnonzero(w[:k] < 0)
            if negative.size == 0:
                break
            log.info("fusion stack: dropping stage columns %s with negative weight", negative.tolist())
            active[negative] = False
        self.w, self.b = w, float(b)
        return self

    def predict(self, P) -> np.ndarray:
        if self.w is None:
            raise RuntimeError("LogisticStack is not fitted")
        X = self._features(P)
        if X.shape[1] != self.w.size:
            raise ValueError(f"LogisticStack fitted on {self.w.size // 2} stages, got {X.shape[1] // 2}")
        return expit(X @ self.w + self.b)

    def to_dict(self) -> dict:
        if self.w is None:
            raise RuntimeError("LogisticStack is not fitted")
        return {"kind": self.kind, "w": self.w.tolist(), "b": self.b, "l2": self.l2, "eps": self.eps}

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticStack":
        s = cls(l2=float(d["l2"]), eps=float(d["eps"]))
        s.w, s.b = np.asarray(d["w"], dtype=np.float64), float(d["b"])
        return s



class MeanFusion(JsonFile):
    """Mean of the calibrated scores that exist for a pair; nothing to fit."""

    kind = "mean"

    def fit(self, P=None, labels=None) -> "MeanFusion":
        return self

    def predict(self, P) -> np.ndarray:
        P = np.asarray(P, dtype=np.float64)
        out = np.full(P.shape[0], np.nan)
        has = ~np.isnan(P).all(axis=1)
        out[has] = np.nanmean(P[has], axis=1)
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> "MeanFusion":
        return cls()


COMBINERS = {"logistic_stack": LogisticStack, "mean": MeanFusion}


def _fold_of(labels: np.ndarray, groups, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per pair: by group when given (pairs of one query stay together), otherwise
    stratified by label."""
    rng = np.random.default_rng(seed)
    n = labels.size
    if groups is not None:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        perm = rng.permutation(inv.max() + 1)
        return perm[inv] % n_folds
    fold = np.empty(n, dtype=np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        fold[idx[rng.permutation(idx.size)]] = np.arange(idx.size) % n_folds
    return fold


class ScoreFusion(JsonFile):
    """Per-stage calibrators + a combiner: stage scores in, fused P(same) out.

    `fit(stage_scores, labels)` takes a dict stage name -> raw scores (one per pair, NaN where the
    stage did not run). At predict time a stage absent from the dict counts as not run."""

    kind = "score_fusion"
    version = 1

    def __init__(self, config: FusionConfig = FusionConfig()) -> None:
        self.config = config
        self.stages: list[str] = []
        self.calibrators: dict = {}
        self.combiner: LogisticStack | MeanFusion | None = None
        self.train_counts: dict = {}

    def _matrix(self, stage_scores: Mapping[str, np.ndarray]) -> np.ndarray:
        unknown = set(stage_scores) - set(self.stages)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; fitted on {self.stages}")
        given = {s: np.asarray(v, dtype=np.float64).ravel() for s, v in stage_scores.items()}
        lengths = {v.size for v in given.values()}
        if len(lengths) != 1:
            raise ValueError("no stage scores given" if not lengths
                             else f"stage score arrays differ in length: {sorted(lengths)}")
        n = lengths.pop()
        return np.column_stack([given.get(s, np.full(n, np.nan)) for s in self.stages])

    def fit(self, stage_scores: Mapping[str, np.ndarray], labels, groups: Sequence | None = None) -> "ScoreFusion":
        """Fit calibrators on all pairs, and the stack on out-of-fold calibrated scores.
        `groups` (e.g. the query image of each pair) keeps correlated pairs in one fold."""
        cfg = self.config
        y = np.asarray(labels, dtype=np.float64).ravel()
        self.stages = []
        for name, s in stage_scores.items():
            s = np.asarray(s, dtype=np.float64).ravel()
            if s.size != y.size:
                raise ValueError(f"stage {name!r}: {s.size} scores for {y.size} labels")
            if np.isnan(s).all():
                log.warning("stage %r has no score for any training pair; it is left out", name)
                continue
            self.stages.append(name)
        if not self.stages:
            raise ValueError("no stage has any score to fit on")
        if groups is not None and len(groups) != y.size:
            raise ValueError(f"{len(groups)} groups for {y.size} labels")
        raw = self._matrix({s: stage_scores[s] for s in self.stages})

        self.calibrators = {}
        for j, name in enumerate(self.stages):
            self.calibrators[name] = make_calibrator(cfg.calibrator).fit(raw[:, j], y, name=name)

        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        self.train_counts = {"pairs": int(y.size), "positives": n_pos, "negatives": n_neg,
                             "per_stage_scored": {s: int((~np.isnan(raw[:, j])).sum())
                                                  for j, s in enumerate(self.stages)}}
        if len(self.stages) < 2 or n_pos < cfg.min_positives or n_neg < cfg.min_negatives:
            log.info("fusion: mean of calibrated scores (%d stage(s), %d positives, %d negatives)",
                     len(self.stages), n_pos, n_neg)
            self.combiner = MeanFusion()
            return self

        oof = np.full_like(raw, np.nan)
        if cfg.cross_fit_folds >= 2:
            fold = _fold_of(y, groups, cfg.cross_fit_folds, cfg.seed)
            for f in range(cfg.cross_fit_folds):
                test = fold == f
                if not test.any():
                    continue
                for j in range(len(self.stages)):
                    try:
                        cal = make_calibrator(cfg.calibrator).fit(raw[~test, j], y[~test])
                    except ValueError:
                        continue  # stage never ran in the other folds: leave these as missing
                    oof[test, j] = cal.predict(raw[test, j])
        else:
            oof = self.calibrated_matrix(raw)
        self.combiner = LogisticStack(l2=cfg.l2).fit(oof, y)
        log.info("fusion: logistic stack over %s, weights %s", self.stages, np.round(self.combiner.w, 3).tolist())
        return self

    def calibrated_matrix(self, raw: np.ndarray) -> np.ndarray:
        return np.column_stack([self.calibrators[s].predict(raw[:, j]) for j, s in enumerate(self.stages)])

    def predict(self, stage_scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Fused P(same individual) per pair; NaN where no stage has a score."""
        if self.combiner is None:
            raise RuntimeError("ScoreFusion is not fitted")
        P = self.calibrated_matrix(self._matrix(stage_scores))
        out = self.combiner.predict(P)
        out[np.isnan(P).all(axis=1)] = np.nan
        return out

    def to_dict(self) -> dict:
        if self.combiner is None:
            raise RuntimeError("ScoreFusion is not fitted")
        return {"kind": self.kind, "version": self.version, "config": asdict(self.config),
                "stages": list(self.stages),
                "calibrators": {s: self.calibrators[s].to_dict() for s in self.stages},
                "combiner": self.combiner.to_dict(), "train_counts": self.train_counts}

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreFusion":
        if d.get("kind") != cls.kind:
            raise ValueError(f"not a saved ScoreFusion (kind={d.get('kind')!r})")
        f = cls(FusionConfig(**d["config"]))
        f.stages = list(d["stages"])
        f.calibrators = {s: calibrator_from_dict(d["calibrators"][s]) for s in f.stages}
        comb = d["combiner"]
        if comb.get("kind") not in COMBINERS:
            raise ValueError(f"unknown combiner {comb.get('kind')!r}")
        f.combiner = COMBINERS[comb["kind"]].from_dict(comb)
        f.train_counts = d.get("train_counts", {})
        return f


FUSED = "fused"


def calibrated_scorers(fusion: ScoreFusion) -> dict:
    """name -> function(stages dict) -> per-pair score: each calibrated stage, and the fused one."""
    def single(stage):
        return lambda st: fusion.calibrators[stage].predict(st[stage]) if stage in st else np.full(
            len(next(iter(st.values()))), np.nan)

    def fused(st):
        return fusion.predict({s: v for s, v in st.items() if s in fusion.stages})

    return {**{s: single(s) for s in fusion.stages}, FUSED: fused}
