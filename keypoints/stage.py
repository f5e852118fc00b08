"""The SIFT/RootSIFT verifier as a scoring stage: the top-V pairs of each query are matched, a
double homography is fitted (MAGSAC), and the XGBoost validator turns the geometry into
P(same individual).

Two caches under the run folder: keypoints per photo (cache/keypoints/, see keypoints.store) and,
like hloc's matches file, verification results per pair (cache/pairs/), keyed by both photos' cache
keys and fingerprinted by the extraction and verification settings: `train-verifier`, `calibrate`,
`evaluate` and `match` never compute the same pair's geometry twice.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Sequence

import numpy as np

from core.cache import FeatureCache, record_key
from core.catalog import Record
from core.errors import UserError
from core.gallery import Gallery
from core.stage import TOP, PairBatch, StageContext, StageOutput
from keypoints.features import KeypointConfig, config_from_dict
from keypoints.store import KeypointStore, verify_record_pairs
from keypoints.validator import Validator
from keypoints.verify import FEATURE_NAMES, PairResult, VerifyConfig, feature_matrix

log = logging.getLogger(__name__)
_KP_QUERY, _KP_GALLERY = FEATURE_NAMES.index("log_kp_query"), FEATURE_NAMES.index("log_kp_gallery")


def _pair_key(q: Record, g: Record) -> str | None:
    kq, kg = record_key(q), record_key(g)
    return None if kq is None or kg is None else f"{kq}||{kg}"


def _to_arrays(r: PairResult) -> dict[str, np.ndarray]:
    return {"features": r.features.astype(np.float32),
            "H": np.full((3, 3), np.nan) if r.H is None else np.asarray(r.H, np.float64),
            "inliers_xy": np.asarray(r.inliers_xy, np.float32).reshape(-1, 4),
            "counts": np.array([r.n_inliers, r.n_matches], np.int64),
            "reject": np.frombuffer(r.reject.encode(), np.uint8)}


def _from_arrays(a: dict[str, np.ndarray]) -> PairResult:
    H = None if np.isnan(a["H"]).any() else a["H"]
    return PairResult(a["features"], H, a["inliers_xy"], int(a["counts"][0]), int(a["counts"][1]),
                      bytes(a["reject"]).decode())


class KeypointStage:
    name = "keypoints"
    scope = TOP
    default_tau = 0.5  # a probability

    def __init__(self, run, kcfg: KeypointConfig, vcfg: VerifyConfig, validator: Validator | None,
                 workers: int = 2):
        self.kcfg, self.vcfg, self.validator, self.workers = kcfg, vcfg, validator, workers
        self.store = KeypointStore(run.cache_dir / "keypoints", kcfg)
        self.pairs = FeatureCache(run.cache_dir / "pairs", "pairs:" + json.dumps(self.config(), sort_keys=True))

    @classmethod
    def load(cls, ctx: StageContext) -> "KeypointStage | None":
        run = ctx.run
        if not run.verifier_path.is_file():
            return None
        try:
            validator = Validator.load(run.verifier_path, expected_features=FEATURE_NAMES)
        except ValueError as e:
            raise UserError(f"{run.verifier_path} does not fit this engine ({e}): run train-verifier "
                            f"again") from None
        return cls(run, config_from_dict(ctx.config["keypoints"]), VerifyConfig.from_dict(ctx.config["verify"]),
                   validator, ctx.workers)

    def config(self) -> dict:
        return {"keypoints": asdict(self.kcfg), "verify": self.vcfg.to_dict()}

    def verify(self, pairs: Sequence[tuple[Record, Record]], progress: bool = False) -> list[PairResult]:
        """Verification results of (query, gallery) record pairs, through the pair cache."""
        keys = [_pair_key(q, g) for q, g in pairs]
        cached = {k: _from_arrays(v) for k, v in self.pairs.get({k for k in keys if k}).items()}
        todo = [i for i, k in enumerate(keys) if k is None or k not in cached]
        fresh = verify_record_pairs(self.store, [pairs[i] for i in todo], self.vcfg, self.workers, progress)
        new = {}
        for i, res in zip(todo, fresh):
            # a pair with a photo that had no keypoints (unreadable, perhaps only for now) is not kept
            if keys[i] and res.features[_KP_QUERY] > 0 and res.features[_KP_GALLERY] > 0:
                new[keys[i]] = _to_arrays(res)
        self.pairs.add(new)
        by_pos = dict(zip(todo, fresh))
        return [by_pos[i] if i in by_pos else cached[keys[i]] for i in range(len(pairs))]

    def score(self, batch: PairBatch, gallery: Gallery, progress: bool = False) -> StageOutput:
        record_pairs = [(batch.queries[qp], gallery.record(int(g))) for qp, g in zip(batch.query_pos,
                                                                                    batch.gallery_idx)]
        results = self.verify(record_pairs, progress)
        probs = self.validator.predict(feature_matrix(results)) if results else np.zeros(0)
        evidence = [{
            "inliers": res.n_inliers,
            # compact until written: a match keeps these for every query it answers
            "inliers_xy": np.round(res.inliers_xy, 1).astype(np.float32) if res.n_inliers else
            np.zeros((0, 4), np.float32)} for res in results]
        return StageOutput(np.asarray(probs, dtype=np.float64), evidence)
