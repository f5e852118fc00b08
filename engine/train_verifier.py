"""train-verifier: true pairs and hard false pairs from the run's training photos, keypoint-verified,
then the XGBoost validator fitted on their geometry.

Pairs come from what `match` will see: each sampled training photo is a query against the other
training photos (held-out individuals stay out: they are calibration data), its retrieval shortlist
gives hard false pairs, and true pairs are the same individual's photos in the shortlist (or, if the
shortlist has none, its best-scoring photo of the same individual). The held-out AUC uses folds by
individual, so no test individual is seen in training.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from core.cache import record_key
from core.errors import UserError
from core.runtime import set_threads
from core.stage import ALL
from engine.config import VerifierTrainConfig
from engine.pipeline import Engine, MatchConfig
from engine.stages import MATCHERS, STAGES, matcher_class
from keypoints.features import PRESETS as KEYPOINT_PRESETS
from keypoints.inlier_weights import InlierWeightConfig, InlierWeights, fit_inlier_weights, inlier_blocks
from keypoints.stage import KeypointStage, XFeatStage, validator_features
from keypoints.validator import INLIERS, VALIDATOR_PRESETS, Validator, heldout_auc
from keypoints.verify import FEATURE_NAMES, VERIFY_PRESETS, feature_matrix
from keypoints.whitening import WhiteningConfig, correct_matches, fit_whitening, same_flank_pairs
from keypoints.xfeat import XFeatConfig
from siamese.embed import EmbedResult
from siamese.focus import FocusMap

log = logging.getLogger(__name__)


def build_training_pairs(engine: Engine, cfg: VerifierTrainConfig):
    """(query gallery index, gallery index, same?) from shortlists among the training photos."""
    heldout = engine.run.heldout()
    g = engine.gallery
    ids = np.array(g.ids)
    train_idx = np.array([i for i in range(len(g)) if g.ids[i] not in heldout], dtype=np.int64)
    counts = {i: n for i, n in zip(*np.unique(ids[train_idx], return_counts=True))}
    eligible = np.array([i for i in train_idx if counts[g.ids[i]] >= 2], dtype=np.int64)
    if len(eligible) < 4 or len(set(ids[eligible])) < 2:
        raise UserError("train-verifier needs at least 2 training individuals with 2 or more photos")
    rng = np.random.default_rng(cfg.seed)
    queries = np.sort(rng.choice(eligible, min(cfg.max_queries, len(eligible)), replace=False))
    emb = EmbedResult(g.embeddings[queries], np.arange(len(queries)))
    records = [g.record(int(i)) for i in queries]
    # the embedding's shortlists (the validator is not fitted yet, so no keypoint votes either), searched
    # without the embedding whitening: fitted on these very photos, it would make their shortlists easier
    # (fewer hard negatives) than a new photo's
    whitening, engine.whitening = engine.whitening, None
    engine.set_gallery(g)
    try:
        shortlists = engine.pair_scores(records, emb, MatchConfig(shortlist=50, verify_top=0, votes=0),
                                        gallery_subset=train_idx)
    finally:
        engine.whitening = whitening
        engine.set_gallery(g)
    triples = []
    for q, qp in zip(queries, shortlists):
        # the pair head's order, whether or not the run holds a calibration (fitted with the verifier
        # about to be replaced): the same pairs for a run verified again as for a fresh one
        scores = engine.pre_scores(qp.stages)
        order = np.argsort(-scores, kind="stable")
        same = ids[qp.gallery_idx] == g.ids[q]
        pos = [int(qp.gallery_idx[j]) for j in order if same[j]][:2]
        neg = [int(qp.gallery_idx[j]) for j in order if not same[j]][: cfg.negatives_per_query]
        if not pos:  # the shortlist missed it: its best photo of the same individual and viewpoint
            cand = [i for i in train_idx if g.ids[i] == g.ids[q] and i != q and
                    (not g.viewpoints[q] or g.viewpoints[i] in ("", g.viewpoints[q]))]
            if cand:
                pos = [int(max(cand, key=lambda i: float(g.embeddings[i] @ g.embeddings[q])))]
        triples += [(int(q), p, 1) for p in pos] + [(int(q), n, 0) for n in neg]
    return triples


def matcher_stage(name: str, run, cfg: VerifierTrainConfig):
    """The stage of matcher `name`, unfitted."""
    vcfg = VERIFY_PRESETS[cfg.verify]
    if matcher_class(name) is KeypointStage:
        kcfg = KEYPOINT_PRESETS[cfg.keypoints]
        if cfg.focus is not None:
            kcfg = replace(kcfg, focus_keep=cfg.focus)
        return KeypointStage(run, kcfg, vcfg, None, cfg.workers, focus=FocusMap())
    return XFeatStage(run, XFeatConfig(), vcfg, None)


def fit_stage_whitening(stage: KeypointStage, engine: Engine, cfg: VerifierTrainConfig, progress: bool,
                        wcfg: WhiteningConfig = WhiteningConfig()) -> tuple[KeypointStage, dict]:
    """The SIFT stage with descriptors whitened for this catalog (keypoints.whitening), fitted on the
    correct matches between same-flank photos of the training individuals (held-out ones stay out);
    the stage unchanged, with the reason, when they give too few correspondences."""
    t0 = time.perf_counter()
    g = engine.gallery
    heldout = engine.run.heldout()
    train = [i for i in range(len(g)) if g.ids[i] not in heldout]
    local = same_flank_pairs([g.ids[i] for i in train], [g.viewpoints[i] for i in train], wcfg.max_pairs)
    pairs = [(train[a], train[b]) for a, b in local]
    kps = stage.store.get([g.record(i) for i in train], stage.workers, progress, desc="sift keypoints")
    results = stage.verify([(g.record(a), g.record(b)) for a, b in pairs], progress)
    rows_a, rows_b = [], []
    for (a, b), res in zip(pairs, results):
        ka, kb = kps.get(record_key(g.record(a))), kps.get(record_key(g.record(b)))
        if res.H is None or ka is None or kb is None:
            continue
        idx = correct_matches(ka, kb, res.H, wcfg.match_ratio, wcfg.inlier_px)
        rows_a.append(ka.desc[idx[:, 0]])
        rows_b.append(kb.desc[idx[:, 1]])
    n = int(sum(len(r) for r in rows_a))
    info = {"pairs": len(pairs), "accepted": len(rows_a), "correspondences": n}
    if n < wcfg.min_correspondences:
        log.warning("descriptor whitening skipped: %d correct matches in %d accepted of %d same-flank training "
                    "pairs (it needs %d); SIFT descriptors are matched as extracted", n, len(rows_a), len(pairs),
                    wcfg.min_correspondences)
        return stage, {**info, "fitted": False}
    rng = np.random.default_rng(cfg.seed)
    sample = np.concatenate([kp.desc[rng.permutation(len(kp.desc))[:wcfg.sample_per_photo]]
                             for i in train if (kp := kps.get(record_key(g.record(i)))) is not None and len(kp)])
    whitening = fit_whitening(np.concatenate(rows_a), np.concatenate(rows_b), sample, wcfg.eps)
    whitening.save(KeypointStage.whitening_path(engine.run))
    log.info("descriptor whitening fitted on %d correct matches (%d of %d same-flank training pairs accepted)",
             n, len(rows_a), len(pairs))
    fitted = KeypointStage(engine.run, stage.kcfg, stage.vcfg, None, stage.workers, focus=stage.focus,
                           whitening=whitening)
    return fitted, {**info, "fitted": True, "seconds": round(time.perf_counter() - t0, 1)}


@dataclass(frozen=True)
class Paths:
    run: Path


def fit_stage_inlier_weights(stage: KeypointStage, engine: Engine, triples, results, y: np.ndarray,
                             groups: np.ndarray, cfg: VerifierTrainConfig) -> tuple[InlierWeights | None, np.ndarray, dict]:
    """The model of single inliers (keypoints.inlier_weights) fitted on the inliers of the training pairs,
    and the pairs' weight features out of fold (for the validator to be fitted on)."""
    t0 = time.perf_counter()
    g = engine.gallery
    blocks = inlier_blocks(results, [(g.record(q), g.record(p)) for q, p, _ in triples],
                           lambda recs: stage.store.get(recs, stage.workers, progress=False), record_key)
    # one thread, as the validator: the same model whatever the machine's cores (~25 s on the development set)
    model, W, info = fit_inlier_weights(blocks, y, groups, InlierWeightConfig(), seed=cfg.seed)
    if model is None:
        log.warning("%s: no model of inliers (%s); the validator reads the geometry alone", stage.matcher,
                    info["reason"])
    return model, W, {**info, "seconds": round(time.perf_counter() - t0, 1)}


def choose_validator(X, y, groups, seed: int, vconf, name: str, feature_names=FEATURE_NAMES) -> dict:
    """The held-out figures of the validator to fit, with what it `uses`: the whole geometry, or the
    inlier count alone (a logistic model: keypoints.validator.INLIERS) where that scores the held-out
    pairs better by more than 0.02 of AUC. On a small catalog the whole model learns its few true pairs
    by heart (12 individuals: 0.585 against 0.638 for the count's model, and probabilities of ~0.9 for
    pairs without a geometry); on the development set it is kept (docs/measured.md)."""
    whole = heldout_auc(X, y, groups, seed=seed, cfg=vconf, feature_names=list(feature_names))
    inliers = heldout_auc(X, y, groups, seed=seed, cfg=vconf, feature_names=list(feature_names), uses=INLIERS)
    use_count = inliers["auc_validator"] > whole["auc_validator"] + 0.02
    if use_count:
        log.warning("%s: the whole geometry scores held-out pairs less well than their inlier count (AUC %.3f "
                    "against %.3f): %d true pairs are few to learn it from. The validator uses the inlier count; "
                    "more photos per individual give more true pairs", name, whole["auc_validator"],
                    inliers["auc_validator"], int(np.sum(y)))
    return {**(inliers if use_count else whole), "auc_whole_geometry": whole["auc_validator"],
            "auc_inlier_model": inliers["auc_validator"], "uses": "inliers" if use_count else "geometry"}


def main(cfg: VerifierTrainConfig, paths: Paths, threads: int | None = None, progress: bool = True,
         precision: str = "auto") -> dict:
    """The train-verifier command: a validator per local matcher, fitted on the run's training photos."""
    run_path = paths.run
    t0 = time.perf_counter()
    set_threads(threads)
    # shortlists by the stages that score every pair (the embedding's)
    engine = Engine.load(run_path, precision, stages=[s.name for s in STAGES if s.scope == ALL],
                         replaces_calibration=True)
    triples = build_training_pairs(engine, cfg)
    g = engine.gallery
    y = np.array([t[2] for t in triples])
    groups = np.array([[g.ids[q], g.ids[p]] for q, p, _ in triples])
    vconf = VALIDATOR_PRESETS[cfg.validator]
    summary = {"pairs": len(triples), "positives": int(y.sum()), "negatives": int((1 - y).sum()),
               "matchers": {}, "config": asdict(cfg)}
    # config.json's inlier_weights: matcher -> its model's file and fingerprint (a matcher not refitted
    # keeps its entry until the end, where it loses it with its validator)
    weights: dict[str, dict] = dict(engine.run.config().get("inlier_weights") or {})
    for name in cfg.matchers:
        stage = matcher_stage(name, engine.run, cfg)
        if matcher_class(name) is KeypointStage:
            old = KeypointStage.whitening_path(engine.run)
            if old.exists():
                old.unlink()  # fitted for the previous verifier; config.json below says whether one is used now
            if cfg.whitening:
                stage, summary["whitening"] = fit_stage_whitening(stage, engine, cfg, progress)
            engine.run.update_config(whitening=None)  # replaced by the stage's settings when it whitens
        engine.run.update_config(**stage.settings())
        stage.store.get([g.record(i) for i in sorted({i for q, p, _ in triples for i in (q, p)})],
                        stage.workers, progress, desc=f"{name} keypoints")
        stage.keep_inlier_idx = cfg.inlier_weights
        tv = time.perf_counter()  # keypoints are cached now: this times matching and geometry alone
        results = stage.verify([(g.record(q), g.record(p)) for q, p, _ in triples], progress)
        ms_per_pair = 1000 * (time.perf_counter() - tv) / max(1, len(triples))
        X = feature_matrix(results)
        stage.inlier_weights_path(engine.run).unlink(missing_ok=True)  # the previous verifier's
        weights.pop(name, None)
        model = None
        if cfg.inlier_weights:
            model, W, summary.setdefault("inlier_weights", {})[name] = fit_stage_inlier_weights(
                stage, engine, triples, results, y, groups, cfg)
            if model is not None:
                model.save(stage.inlier_weights_path(engine.run))
                weights[name] = {"file": stage.inlier_weights_path(engine.run).name, "fingerprint": model.fingerprint}
                X = np.concatenate([X, W], axis=1)
        engine.run.update_config(inlier_weights=dict(weights))
        names = validator_features(model is not None)
        auc = choose_validator(X, y, groups, cfg.seed, vconf, name, names)
        uses = INLIERS if auc["uses"] == "inliers" else None
        Validator(vconf, names, uses).fit(X, y, seed=cfg.seed).save(stage.validator_path(engine.run))
        summary["matchers"][name] = {
            "heldout_auc_validator": round(float(auc["auc_validator"]), 4),
            "heldout_auc_inlier_count": round(float(auc["auc_inliers"]), 4),
            "heldout_auc_whole_geometry": round(float(auc["auc_whole_geometry"]), 4),
            "heldout_auc_inlier_model": round(float(auc["auc_inlier_model"]), 4),
            "validator_uses": auc["uses"],
            "ms_per_pair": round(ms_per_pair, 2), "validator": str(stage.validator_path(engine.run))}
    for other, cls in MATCHERS.items():  # a matcher not refitted now would be scored by a stale model
        path = cls.validator_path(engine.run)
        if other not in cfg.matchers and path.exists():
            log.warning("removing %s: %s was not refitted with the others", path, other)
            path.unlink()
        if other not in cfg.matchers:
            cls.inlier_weights_path(engine.run).unlink(missing_ok=True)
    engine.run.update_config(inlier_weights={k: v for k, v in weights.items() if k in cfg.matchers})
    if engine.run.calibration_path.exists():
        log.warning("removing %s: it was fitted before this verifier (run calibrate again)",
                    engine.run.calibration_path)
        engine.run.calibration_path.unlink()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    engine.run.update_metrics("train_verifier", summary)
    return summary
