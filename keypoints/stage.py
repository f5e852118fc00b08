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
from functools import partial
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from core.cache import FeatureCache, record_key
from core.catalog import Record
from core.errors import UserError
from core.executor import current_executor
from core.gallery import Gallery
from core.stage import TOP, PairBatch, StageContext, StageOutput
from keypoints.features import Keypoints, config_from_dict, config_to_dict, extract_keypoints
from keypoints.inlier_weights import WEIGHT_FEATURES, InlierWeights, inlier_blocks
from keypoints.store import KeypointStore, WhitenedStore, verify_record_pairs
from keypoints.validator import Validator
from keypoints.verify import FEATURE_NAMES, SAME_PHOTO_PROBABILITY, PairResult, VerifyConfig, feature_matrix, same_photo
from keypoints.whitening import Whitening

log = logging.getLogger(__name__)
_KP_QUERY, _KP_GALLERY = FEATURE_NAMES.index("log_kp_query"), FEATURE_NAMES.index("log_kp_gallery")
WHITENING_FILE = "whitening.npz"  # in the run folder, written by train-verifier


def _pair_key(q: Record, g: Record) -> str | None:
    kq, kg = record_key(q), record_key(g)
    return None if kq is None or kg is None else f"{kq}||{kg}"


def validator_features(inlier_weights: bool) -> list[str]:
    """The validator's features: the geometry's, then with a model of inliers the weights' summary."""
    return list(FEATURE_NAMES) + (list(WEIGHT_FEATURES) if inlier_weights else [])


def load_recorded(run, entry: dict | None, loader, what: str):
    """The file a config.json entry {"file", "fingerprint"} names in the run folder, read by `loader` and
    checked against the fingerprint recorded with it; None without an entry."""
    if not entry:
        return None
    path = run.path / entry["file"]
    try:
        obj = loader(path)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e.__class__.__name__}: {e}): run train-verifier again") from None
    if obj.fingerprint != entry["fingerprint"]:
        raise UserError(f"{path} is not the {what} config.json records (fingerprint {obj.fingerprint}, "
                        f"expected {entry['fingerprint']}): run train-verifier again")
    return obj


def _to_arrays(r: PairResult) -> dict[str, np.ndarray]:
    return {"features": r.features.astype(np.float32),
            "H": np.full((3, 3), np.nan) if r.H is None else np.asarray(r.H, np.float64),
            "inliers_xy": np.asarray(r.inliers_xy, np.float32).reshape(-1, 4),
            "counts": np.array([r.n_inliers, r.n_matches], np.int64),
            "reject": np.frombuffer(r.reject.encode(), np.uint8),
            "inlier_idx": np.zeros((0, 2), np.int32) if r.inlier_idx is None else np.asarray(r.inlier_idx, np.int32)}


def _from_arrays(a: dict[str, np.ndarray]) -> PairResult:
    H = None if np.isnan(a["H"]).any() else a["H"]
    idx = a.get("inlier_idx")  # absent from results cached before the indices were kept
    return PairResult(a["features"], H, a["inliers_xy"], int(a["counts"][0]), int(a["counts"][1]),
                      bytes(a["reject"]).decode(), None if idx is None else np.asarray(idx, np.int64).reshape(-1, 2))


class KeypointStage:
    """A local-feature matcher as a stage (SIFT here; `XFeatStage` below): features per photo and
    verification results per pair through the run's caches, P(same) from its XGBoost validator."""
    name = "keypoints"
    matcher = "sift"  # as `--matchers` names it
    scope = TOP
    default_tau = 0.5  # a probability
    pairs_dir = "pairs"  # under the run's cache/
    features_dir = "keypoints"  # per-photo features, under the run's cache/ (also the cache's name)
    evidence_prefix = ""  # the SIFT stage's evidence keeps its historical names (inliers, inliers_xy)
    inlier_weights_file = "inlier_weights.json"  # in the run folder, written by train-verifier

    def __init__(self, run, kcfg, vcfg: VerifyConfig, validator: Validator | None, workers: int = 2,
                 executor=None, focus=None, whitening: Whitening | None = None,
                 inlier_weights: InlierWeights | None = None):
        self.kcfg, self.vcfg, self.validator, self.workers = kcfg, vcfg, validator, workers
        # the model of single inliers (keypoints.inlier_weights) whose features the validator reads too
        self.inlier_weights = inlier_weights
        # results need their inlier indices (cached ones from before they were kept are verified again):
        # with a model of inliers, and while train-verifier fits one
        self.keep_inlier_idx = inlier_weights is not None
        # descriptors as matched: whitened for the catalog (keypoints.whitening) or as extracted
        self.whitening = whitening
        self.executor = executor  # core.executor: None or local = this process, ray = tasks
        # where the animal is (siamese.focus.FocusMap), for settings that keep keypoints there only
        focused = getattr(kcfg, "focus_keep", 1.0) < 1
        if focused and focus is None:
            raise ValueError(f"keypoint settings with focus_keep {kcfg.focus_keep} need a focus map")
        self.focus = focus if focused else None
        self.store = self.make_store(run)
        self.pairs = FeatureCache(run.cache_dir / self.pairs_dir, "pairs:" + json.dumps(self.config(), sort_keys=True))

    def make_store(self, run) -> KeypointStore:
        name = self.features_dir + (f"+focus:{self.focus.name}" if self.focus else "")
        raw = KeypointStore(run.cache_dir / self.features_dir, self.kcfg, self.extractor(self.kcfg, self.focus),
                            name=name)
        if self.whitening is None:
            return raw
        return WhitenedStore(run.cache_dir / f"{self.features_dir}-whitened", raw, self.whitening, name=name)

    @staticmethod
    def whitening_path(run):
        return run.path / WHITENING_FILE

    @staticmethod
    def extractor(kcfg, focus=None):
        return partial(extract_keypoints, cfg=kcfg, focus=focus)

    @staticmethod
    def pair_fn_for(kcfg):
        return None  # verify_pair: RootSIFT matching

    def pair_fn(self):
        return self.pair_fn_for(self.kcfg)

    @classmethod
    def validator_path(cls, run):
        return run.verifier_path

    @classmethod
    def inlier_weights_path(cls, run):
        return run.path / cls.inlier_weights_file

    @classmethod
    def load_inlier_weights(cls, run, config: dict) -> InlierWeights | None:
        """The model of single inliers config.json names for this matcher, checked against its fingerprint;
        None for a run whose verifier was fitted without one."""
        return load_recorded(run, (config.get("inlier_weights") or {}).get(cls.matcher), InlierWeights.load,
                             "model of inliers")

    @classmethod
    def configs(cls, config: dict):
        """(extraction, verification) settings recorded in config.json by train-verifier."""
        return config_from_dict(config["keypoints"]), VerifyConfig.from_dict(config["verify"])

    def settings(self) -> dict:
        """What train-verifier records in config.json for `configs` (and `load`) to read back."""
        out = {"keypoints": config_to_dict(self.kcfg), "verify": self.vcfg.to_dict()}
        if self.whitening is not None:  # (absent rather than null: the fingerprints of runs without one stay)
            out["whitening"] = {"file": WHITENING_FILE, "fingerprint": self.whitening.fingerprint,
                                "correspondences": self.whitening.correspondences}
        return out

    @classmethod
    def load_whitening(cls, run, config: dict) -> Whitening | None:
        """The whitening config.json names, checked against its fingerprint."""
        return load_recorded(run, config.get("whitening"), Whitening.load, "whitening")

    @classmethod
    def load(cls, ctx: StageContext) -> "KeypointStage | None":
        path = cls.validator_path(ctx.run)
        if not path.is_file():
            return None
        weights = cls.load_inlier_weights(ctx.run, ctx.config)
        try:
            validator = Validator.load(path, expected_features=validator_features(weights is not None))
        except ValueError as e:
            raise UserError(f"{path} does not fit this engine ({e}): run train-verifier again") from None
        return cls(ctx.run, *cls.configs(ctx.config), validator, ctx.workers, ctx.executor, ctx.focus,
                   cls.load_whitening(ctx.run, ctx.config), weights)

    def config(self) -> dict:
        """The settings (the pair cache's fingerprint, and the vote index's): extraction, verification,
        whitening, focus map."""
        return {**self.settings(), **({"focus": self.focus.name} if self.focus else {})}

    def verify(self, pairs: Sequence[tuple[Record, Record]], progress: bool = False) -> list[PairResult]:
        """Verification results of (query, gallery) record pairs, through the pair cache."""
        keys = [_pair_key(q, g) for q, g in pairs]
        cached = {k: _from_arrays(v) for k, v in self.pairs.get({k for k in keys if k}).items()}
        if self.keep_inlier_idx:  # cached before the inlier indices were kept: verified again
            cached = {k: r for k, r in cached.items() if not (r.n_inliers and r.inlier_idx is None)}
        todo = [i for i, k in enumerate(keys) if k is None or k not in cached]
        if (self.executor or current_executor()).remote:
            fresh = self._verify_remote([pairs[i] for i in todo], progress)
        else:
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

    def _verify_remote(self, pairs: Sequence[tuple[Record, Record]], progress: bool) -> list[PairResult]:
        """Chunks of pairs as tasks of the remote executor: each gets the cached features of its
        photos, extracts the missing ones and verifies; the driver caches what comes back."""
        chunks = [pairs[i:i + REMOTE_CHUNK] for i in range(0, len(pairs), REMOTE_CHUNK)]
        known_bad = set(self.store.cache.unreadable())

        def tasks():
            for part in chunks:
                recs = {}
                for rec in (r for pair in part for r in pair):
                    recs.setdefault(record_key(rec), rec)
                recs.pop(None, None)
                yield {"pairs": part, "cached": self.store.cache.get(set(recs)),
                       "skip": {k for k in recs if k in known_bad}}

        results, new, failed = [], {}, {}
        with tqdm(total=len(pairs), desc=f"verifying ({self.name}, ray)", unit="pair", disable=not progress,
                  leave=False) as bar:
            for part, (res, extracted, bad) in zip(chunks, (self.executor or current_executor()).map(
                    verify_chunk, tasks(), type(self).__name__, self.kcfg, self.vcfg, self.focus,
                    self.whitening)):
                results += res
                new.update(extracted)
                failed.update(bad)
                if len(new) >= 512:  # bounded loss if the driver is killed
                    self.store.cache.add(new)
                    new = {}
                bar.update(len(part))
        for message in failed.values():
            log.warning("no keypoints: %s", message)
        self.store.cache.add(new)
        self.store.cache.add_unreadable(failed)
        return results

    def score(self, batch: PairBatch, gallery: Gallery, progress: bool = False) -> StageOutput:
        record_pairs = [(batch.queries[qp], gallery.record(int(g))) for qp, g in zip(batch.query_pos,
                                                                                    batch.gallery_idx)]
        results = self.verify(record_pairs, progress)
        X = self.features(results, record_pairs)
        probs = self.validator.predict(X) if results else np.zeros(0)
        # a copy of a gallery photo is certain, whatever the validator makes of its geometry (verify.same_photo)
        copies = same_photo(X)
        probs = np.where(copies, np.maximum(probs, SAME_PHOTO_PROBABILITY), probs)
        evidence = [{
            "inliers": res.n_inliers,
            # compact until written: a match keeps these for every query it answers
            "inliers_xy": np.round(res.inliers_xy, 1).astype(np.float32) if res.n_inliers else
            np.zeros((0, 4), np.float32)} for res in results]
        if self.evidence_prefix:
            evidence = [{self.evidence_prefix + k: v for k, v in e.items()} for e in evidence]
        for e, copy in zip(evidence, copies):
            if copy:  # (one key whichever matcher saw it: the predictions JSON and the review page say so)
                e["same_photo"] = True
        return StageOutput(np.asarray(probs, dtype=np.float64), evidence)

    def features(self, results: Sequence[PairResult], record_pairs: Sequence[tuple[Record, Record]]) -> np.ndarray:
        """The validator's input for verification `results` of `record_pairs`: `validator_features` columns."""
        X = feature_matrix(results)
        if self.inlier_weights is None or not len(X):
            return X
        blocks = inlier_blocks(results, record_pairs, lambda recs: self.store.get(recs, self.workers, progress=False),
                               record_key)
        return np.concatenate([X, self.inlier_weights.pair_features(blocks)], axis=1)


class XFeatStage(KeypointStage):
    """XFeat keypoints matched by LighterGlue, then the same double homography and validator recipe."""
    name = "xfeat"
    matcher = "xfeat"
    pairs_dir = "pairs-xfeat"
    features_dir = "xfeat"
    evidence_prefix = "xfeat_"
    inlier_weights_file = "inlier_weights-xfeat.json"

    def __init__(self, run, kcfg, vcfg: VerifyConfig, validator: Validator | None, workers: int = 1,
                 executor=None, focus=None, whitening=None, inlier_weights: InlierWeights | None = None):
        # torch runs its own threads inside each extraction and match: one photo or pair at a time;
        # LighterGlue matches XFeat's own descriptors: no whitening
        super().__init__(run, kcfg, vcfg, validator, workers=1, executor=executor, inlier_weights=inlier_weights)

    @classmethod
    def load_whitening(cls, run, config: dict) -> None:
        return None

    @staticmethod
    def extractor(kcfg, focus=None):  # XFeat keeps its own keypoints: no focus
        from keypoints.xfeat import extract_xfeat

        return partial(extract_xfeat, cfg=kcfg)

    @staticmethod
    def pair_fn_for(kcfg):
        from keypoints.xfeat import make_verify_fn

        return make_verify_fn(kcfg)

    @classmethod
    def validator_path(cls, run):
        return run.path / "verifier-xfeat.json"

    @classmethod
    def configs(cls, config: dict):
        from keypoints.xfeat import XFeatConfig

        return XFeatConfig(**config["xfeat"]["extract"]), VerifyConfig.from_dict(config["xfeat"]["verify"])

    def settings(self) -> dict:
        return {"xfeat": {"extract": asdict(self.kcfg), "verify": self.vcfg.to_dict()}}


REMOTE_CHUNK = 64  # pairs per Ray task: ~0.7 s of work for SIFT, far above a task's overhead
_WORKER_TOOLS: dict = {}


def verify_chunk(task: dict, stage_class: str, kcfg, vcfg: VerifyConfig, focus=None,
                 whitening: Whitening | None = None) -> tuple[list, dict, dict]:
    """A Ray task: the features of the chunk's photos (cached ones given, the others extracted here,
    whitened where the stage whitens) and the verification of its pairs. Returns (results in pair
    order, new features, unreadable photos with the reason)."""
    from core.executor import kill_once_hook
    from keypoints.store import decode_side, extract_arrays
    from keypoints.verify import verify_pairs

    kill_once_hook()
    cls = {c.__name__: c for c in (KeypointStage, XFeatStage)}[stage_class]
    tool_key = (stage_class, json.dumps(config_to_dict(kcfg), sort_keys=True), focus and focus.name)
    if tool_key not in _WORKER_TOOLS:  # XFeat's networks (and the focus map's) load once per worker
        _WORKER_TOOLS.clear()
        _WORKER_TOOLS[tool_key] = (cls.extractor(kcfg, focus), cls.pair_fn_for(kcfg))
    raw_extract, pair_fn = _WORKER_TOOLS[tool_key]
    extract = raw_extract if whitening is None else whitening.extractor(raw_extract)
    arrays = dict(task["cached"])
    new, failed = {}, {}
    for q, g in task["pairs"]:
        for rec in (q, g):
            key = record_key(rec)
            if key is None or key in arrays or key in failed or key in task["skip"]:
                continue
            a, message, permanent = extract_arrays(rec, extract, decode_side(kcfg))
            if a is not None:
                arrays[key] = new[key] = a
            elif permanent:
                failed[key] = message
    empty = Keypoints.empty((1, 1))
    kps = {k: Keypoints.from_arrays(v) for k, v in arrays.items()}
    keyed = [(record_key(q), record_key(g)) for q, g in task["pairs"]]
    results = verify_pairs(keyed, {k: kps.get(k, empty) for pair in keyed for k in pair}, vcfg, 1,
                           **({"pair_fn": pair_fn} if pair_fn else {}))
    return results, new, failed
