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
    """A local-feature matcher as a stage (SIFT here; `XFeatStage` below): features per photo and
    verification results per pair through the run's caches, P(same) from its XGBoost validator."""
    name = "keypoints"
    matcher = "sift"  # as `--matchers` names it
    scope = TOP
    default_tau = 0.5  # a probability
    pairs_dir = "pairs"  # under the run's cache/
    evidence_prefix = ""  # the SIFT stage's evidence keeps its historical names (inliers, inliers_xy)

    def __init__(self, run, kcfg, vcfg: VerifyConfig, validator: Validator | None, workers: int = 2):
        self.kcfg, self.vcfg, self.validator, self.workers = kcfg, vcfg, validator, workers
        self.store = self.make_store(run)
        self.pairs = FeatureCache(run.cache_dir / self.pairs_dir, "pairs:" + json.dumps(self.config(), sort_keys=True))

    def make_store(self, run) -> KeypointStore:
        return KeypointStore(run.cache_dir / "keypoints", self.kcfg)

    def pair_fn(self):
        return None  # verify_pair: RootSIFT matching

    @classmethod
    def validator_path(cls, run):
        return run.verifier_path

    @classmethod
    def configs(cls, config: dict):
        """(extraction, verification) settings recorded in config.json by train-verifier."""
        return config_from_dict(config["keypoints"]), VerifyConfig.from_dict(config["verify"])

    def settings(self) -> dict:
        """What train-verifier records in config.json for `configs` to read back."""
        return {"keypoints": asdict(self.kcfg), "verify": self.vcfg.to_dict()}

    @classmethod
    def load(cls, ctx: StageContext) -> "KeypointStage | None":
        path = cls.validator_path(ctx.run)
        if not path.is_file():
            return None
        try:
            validator = Validator.load(path, expected_features=FEATURE_NAMES)
        except ValueError as e:
            raise UserError(f"{path} does not fit this engine ({e}): run train-verifier again") from None
        return cls(ctx.run, *cls.configs(ctx.config), validator, ctx.workers)

    def config(self) -> dict:
        return self.settings()

    def verify(self, pairs: Sequence[tuple[Record, Record]], progress: bool = False) -> list[PairResult]:
        """Verification results of (query, gallery) record pairs, through the pair cache."""
        keys = [_pair_key(q, g) for q, g in pairs]
        cached = {k: _from_arrays(v) for k, v in self.pairs.get({k for k in keys if k}).items()}
        todo = [i for i, k in enumerate(keys) if k is None or k not in cached]
        fresh = verify_record_pairs(self.store, [pairs[i] for i in todo], self.vcfg, self.workers, progress,
                                    pair_fn=self.pair_fn())
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
        if self.evidence_prefix:
            evidence = [{self.evidence_prefix + k: v for k, v in e.items()} for e in evidence]
        return StageOutput(np.asarray(probs, dtype=np.float64), evidence)


class XFeatStage(KeypointStage):
    """XFeat keypoints matched by LighterGlue, then the same double homography and validator recipe."""
    name = "xfeat"
    matcher = "xfeat"
    pairs_dir = "pairs-xfeat"
    evidence_prefix = "xfeat_"

    def __init__(self, run, kcfg, vcfg: VerifyConfig, validator: Validator | None, workers: int = 1):
        # torch runs its own threads inside each extraction and match: one photo or pair at a time
        super().__init__(run, kcfg, vcfg, validator, workers=1)

    def make_store(self, run) -> KeypointStore:
        from keypoints.xfeat import extract_xfeat

        return KeypointStore(run.cache_dir / "xfeat", self.kcfg, lambda image: extract_xfeat(image, self.kcfg),
                             name="xfeat")

    def pair_fn(self):
        from keypoints.xfeat import make_verify_fn

        return make_verify_fn(self.kcfg)

    @classmethod
    def validator_path(cls, run):
        return run.path / "verifier-xfeat.json"

    @classmethod
    def configs(cls, config: dict):
        from keypoints.xfeat import XFeatConfig

        return XFeatConfig(**config["xfeat"]["extract"]), VerifyConfig.from_dict(config["xfeat"]["verify"])

    def settings(self) -> dict:
        return {"xfeat": {"extract": asdict(self.kcfg), "verify": self.vcfg.to_dict()}}
