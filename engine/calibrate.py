"""calibrate: fit score calibrators, the fusion and the new_individual threshold on open-set folds.

Data: the held-out individuals of the run that neither the Siamese network nor the verifier trained
on, and that did not choose the training epoch either (heldout.json "calibration": all of them,
but for the validation half where the best epoch by validation was kept instead of averaged weights). They are split by
individual into folds; in fold f the fold's individuals are "new" (all their photos leave the
gallery, and their photos are queries with truth new_individual) and every photo of each other
held-out individual is a query against the rest of the gallery (its own photo left out), which
keeps every training individual as a distractor, as in real use. Every photo rather than one per
individual: one per individual gave 60 queries and 59 matching pairs on the development set, on
which a stage could look anti-correlated by chance and be dropped from the fusion.
For each fold, the calibrators + fusion and tau are fitted on the other folds and scored on this
one (per-fold figures and their spread); then everything is refitted on all folds and saved in
calibration.json, with a tau per single stage too (for the ablation table of `evaluate`).
The per-fold figures read high: a held-out individual's photos are known queries in every fold
but its own, so the fit scored on a fold has seen queries of the same animals (on the development
set the folds' MAP@5 was 0.730 / 0.695 against 0.673 / 0.685 on the protocol's test queries, and a
boosted fusion looked far better on the folds than on the test queries: docs/measured.md).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.catalog import queryable
from core.errors import UserError
from core.metrics import NEW_INDIVIDUAL, score_predictions
from core.runfolder import atomic_write_json
from core.runtime import set_threads
from core.stage import is_active
from engine.pipeline import CALIBRATION_VERSION, Engine, MatchConfig, QueryPairs, scoring_files
from core.aggregate import aggregate_per_individual
from ranker.fusion import FUSED, FusionConfig, ScoreFusion, calibrated_scorers
from ranker.threshold import open_set_folds, search_threshold, split_fold_images
from siamese.embed import EmbedResult

log = logging.getLogger(__name__)
# Below this many held-out individuals, tau is a guess: say so (on held-out cow faces, tau fitted on
# 12 new individuals made the engine answer new_individual for 136 of 222 queries where 48 were new).
# Their photos are not independent evidence, so the count is of individuals, not of queries.
MIN_NEW_INDIVIDUALS = 30
TAU_RULES = {"map5": "best MAP@5", "fold_min": "few individuals: the lowest fold tau",
             "rate": "the expected share of new animals"}


@dataclass(frozen=True)
class CalibrateConfig:
    folds: int = 3  # each fold's individuals are the new animals: about 1/folds of the queries
    # photos per held-out individual used as queries in each fold (None: every photo; one per
    # individual left 60 queries and 59 matching pairs on the development set, too few to fit on)
    queries_per_individual: int | None = None
    calibrator: str = FusionConfig.calibrator  # logistic or isotonic: see ranker.fusion.FusionConfig
    target_new_rate: float | None = None  # choose tau to answer new_individual this often instead
    seed: int = 0


def individuals_needed(cfg: CalibrateConfig) -> int:
    """Calibration individuals calibrate needs: one per fold, and at least two."""
    return max(2, cfg.folds)


def epoch_chosen(epochs: int, average_from: float | None) -> bool:
    """Whether held-out individuals choose the network (the best epoch by their validation MAP@5):
    those cannot calibrate. Averaged weights (`average_from`) and an untrained run are chosen by none.
    From a TrainConfig's `epochs` and `average_from`, or a run folder's recorded ones."""
    return epochs > 0 and average_from is None


def heldout_needed(chosen: bool, cfg: CalibrateConfig = CalibrateConfig()) -> int:
    """Individuals train-siamese must hold out for calibrate to run: a training that keeps its best
    epoch by validation (`chosen`: `epoch_chosen`, e.g. `bench/accuracy.py --network best`) gives the
    smaller half of them to that choice."""
    return 2 * individuals_needed(cfg) - 1 if chosen else individuals_needed(cfg)


def heldout_fraction_needed(eligible: int, chosen: bool, cfg: CalibrateConfig = CalibrateConfig()) -> float:
    """The smallest `train-siamese --heldout-fraction` (to the hundredth) that holds out
    `heldout_needed` among `eligible` individuals (those with 2 or more photos)."""
    return math.ceil(100 * heldout_needed(chosen, cfg) / max(1, eligible)) / 100


def fold_pairs(engine: Engine, cfg: CalibrateConfig, mcfg: MatchConfig, progress: bool):
    """Per fold: the query shortlists (all stages scored) and the truths.

    In a fold, the fold's individuals leave the gallery and up to `cfg.queries_per_individual` of
    their photos are queries (truth new_individual); up to as many photos of every other held-out
    individual with at least two photos are queries against the rest of the gallery (each query's
    own photo left out, the individual's other photos kept, as in real use)."""
    g = engine.gallery
    if not engine.run.heldout_path.is_file():  # (train-siamese always writes it)
        raise UserError(f"{engine.run.heldout_path} is missing: it names the individuals train-siamese held out of "
                        "training, on which calibrate fits; put it back from a copy of the run folder, or train "
                        f"again (`cli.py train-siamese --catalog YOUR_CATALOG.csv --out {engine.run.path} "
                        "--overwrite`)")
    heldout = engine.run.calibration_individuals()
    h_idx = np.array([i for i in range(len(g)) if g.ids[i] in heldout], dtype=np.int64)
    if len(set(g.ids[i] for i in h_idx)) < individuals_needed(cfg):
        eligible = len(queryable(g.ids))
        # half of the held-out individuals chose the epoch of a network kept as its best epoch (not averaged;
        # a run folder from before averaged weights records none)
        train = engine.run.config().get("train") or {}
        chosen = epoch_chosen(train.get("epochs") or 0, train.get("average_from"))
        have = len(set(g.ids[i] for i in h_idx))
        train_again = (f"train again with --heldout-fraction {heldout_fraction_needed(eligible, chosen, cfg):.2f} "
                       f"--overwrite (your gallery has {eligible} individuals with 2 or more photos)")
        remedy = (f"Calibrate with --folds {have}, or {train_again}" if 2 <= have < cfg.folds
                  else train_again[0].upper() + train_again[1:])
        raise UserError(f"calibrate needs at least {individuals_needed(cfg)} held-out individuals (one per fold, "
                        f"--folds); this run has {have}: train-siamese held out "
                        f"too few{' (half of them chose the training epoch)' if chosen else ''}. {remedy}")
    folds = open_set_folds([g.ids[i] for i in h_idx], cfg.folds, cfg.seed)
    n = cfg.queries_per_individual
    out = []
    for fold in folds:
        split = split_fold_images([g.ids[i] for i in h_idx], fold, cfg.seed, queries_per_seen=n,
                                  queries_per_unseen=n)
        queries = h_idx[split.queries]
        unseen = set(fold.unseen)
        subset = np.array([i for i in range(len(g)) if g.ids[i] not in unseen], dtype=np.int64)
        emb = EmbedResult(g.embeddings[queries], np.arange(len(queries)))
        pairs = engine.pair_scores([g.record(int(i)) for i in queries], emb, mcfg, gallery_subset=subset,
                                   progress=progress, own=queries)
        out.append((pairs, list(split.truths)))
    return out


def _stage_arrays(pairs: list[QueryPairs], stages: list[str]):
    scores = {s: np.concatenate([qp.stages.get(s, np.full(len(qp.gallery_idx), np.nan)) for qp in pairs])
              for s in stages}
    return scores


def _labels_groups(engine: Engine, pairs: list[QueryPairs]):
    y = np.concatenate([[engine.gallery.ids[g] == qp.record.individual_id for g in qp.gallery_idx] for qp in pairs])
    groups = np.concatenate([[k] * len(qp.gallery_idx) for k, qp in enumerate(pairs)])
    return y.astype(float), groups


def _ranked(engine: Engine, pairs: list[QueryPairs], scorer) -> list[list[tuple[str, float]]]:
    return [[(r[0], r[1]) for r in aggregate_per_individual([engine.gallery.ids[g] for g in qp.gallery_idx],
                                                             np.asarray(scorer(qp.stages), float))]
            for qp in pairs]


def fit_scorers(engine: Engine, pairs: list[QueryPairs], truths: list[str], stages: list[str],
                cfg: CalibrateConfig) -> tuple[ScoreFusion, dict[str, float]]:
    """Calibrators + fusion on these pairs, and a tau for the fused score and each single stage."""
    y, groups = _labels_groups(engine, pairs)
    fusion = ScoreFusion(FusionConfig(calibrator=cfg.calibrator, seed=cfg.seed)).fit(
        _stage_arrays(pairs, stages), y, groups)
    taus = {}
    for name, scorer in calibrated_scorers(fusion).items():
        res = search_threshold(_ranked(engine, pairs, scorer), truths, target_new_rate=cfg.target_new_rate)
        taus[name] = float(res.tau)
    return fusion, taus


def tau_rule(cfg: CalibrateConfig, n_individuals: int) -> str:
    """How tau is chosen: "rate" (the share of new_individual answers the user expects), "map5" (the
    best MAP@5 over all folds), or, with fewer than MIN_NEW_INDIVIDUALS calibration individuals,
    "fold_min": the lowest of that tau and the taus chosen on each fold's complement. Few new animals
    make MAP@5's best tau a guess that errs towards answering new_individual too often (the cow faces
    above); the lowest fold tau is the most cautious choice the data supports. On the development
    set (then 20 calibration individuals, 4 networks) it measured level with the MAP@5 tau (see docs/measured.md)."""
    if cfg.target_new_rate is not None:
        return "rate"
    return "map5" if n_individuals >= MIN_NEW_INDIVIDUALS else "fold_min"


@dataclass(frozen=True)
class Paths:
    run: Path


FEW_INDIVIDUALS_REMEDY = ("hold out more individuals (train-siamese --heldout-fraction) or set the expected share "
                          "of new animals (calibrate --new-rate)")


def main(cfg: CalibrateConfig, paths: Paths, mcfg: MatchConfig = MatchConfig(), threads: int | None = None,
         progress: bool = True, precision: str = "auto", remedy: str = FEW_INDIVIDUALS_REMEDY) -> dict:
    """The calibrate command. `mcfg`: the shortlist, verify-top, votes and individual weight (None:
    INDIVIDUAL_WEIGHT) that `match` will use (recorded with the calibration). `remedy`: what the
    warning about too few held-out individuals advises (the demo has its own options)."""
    run = paths.run
    t0 = time.perf_counter()
    set_threads(threads)
    mcfg = mcfg.to_fit()  # the default weight, whatever the calibration it replaces had
    engine = Engine.load(run, precision, replaces_calibration=True)
    data = fold_pairs(engine, cfg, mcfg, progress)
    # only the stages that score under these settings (the votes stage only where votes are counted:
    # its scores are all missing otherwise)
    settings = engine.match_settings(mcfg)
    stages = [s.name for s in engine.stages if is_active(s, settings)]
    per_fold = []
    for f, (pairs, truths) in enumerate(data):
        train_pairs = [qp for k, (p, _) in enumerate(data) if k != f for qp in p]
        train_truths = [t for k, (_, ts) in enumerate(data) if k != f for t in ts]
        fusion, taus = fit_scorers(engine, train_pairs, train_truths, stages, cfg)
        row = {}
        for name, scorer in calibrated_scorers(fusion).items():
            results = engine.rank(pairs, taus[name], scorer)
            m = score_predictions({str(k): t for k, t in enumerate(truths)},
                                  {str(k): r.predictions for k, r in enumerate(results)})
            row[name] = {"map5": m["map5"], "top1": m["top1"], "new_f1": m["new_f1"], "tau": taus[name]}
        per_fold.append(row)
    all_pairs = [qp for p, _ in data for qp in p]
    all_truths = [t for _, ts in data for t in ts]
    fusion, taus = fit_scorers(engine, all_pairs, all_truths, stages, cfg)
    names = list(per_fold[0])
    summary = {name: {"map5_mean": float(np.mean([r[name]["map5"] for r in per_fold])),
                      "map5_std": float(np.std([r[name]["map5"] for r in per_fold])),
                      "new_f1_mean": float(np.mean([r[name]["new_f1"] for r in per_fold]))} for name in names}
    n_new = sum(t == NEW_INDIVIDUAL for t in all_truths)
    n_individuals = len(engine.run.calibration_individuals())  # each is new in exactly one fold
    fold_taus = [r[FUSED]["tau"] for r in per_fold]
    rule = tau_rule(cfg, n_individuals)
    fitted_taus = dict(taus)  # on all folds: MAP@5's best (or the rate's)
    if rule == "fold_min":
        # a fold whose fit dropped a stage has no tau for it
        taus = {name: min([tau] + [r[name]["tau"] for r in per_fold if name in r]) for name, tau in taus.items()}
        log.warning("tau rests on %d new-individual queries of %d individuals only (fold taus %s; all folds "
                    "together %.3f): it may not hold on new photos, so the lowest of these is used (%.3f: "
                    "new_individual is answered less often); %s", n_new, n_individuals,
                    ", ".join(f"{t:.3f}" for t in fold_taus), fitted_taus[FUSED], taus[FUSED], remedy)
    calibration = {"kind": "calibration", "version": CALIBRATION_VERSION, "stages": stages, "fusion": fusion.to_dict(),
                   "tau": taus, "tau_rule": rule, "tau_all_folds": fitted_taus, "config": asdict(cfg),
                   "match": engine.calibration_match(mcfg), "per_fold": per_fold,
                   "summary": summary, "queries": len(all_truths), "new_queries": n_new,
                   "individuals": n_individuals, "fitted_for": scoring_files(engine.run),
                   "tau_folds": {"values": fold_taus, "std": float(np.std(fold_taus))}}
    atomic_write_json(engine.run.calibration_path, calibration)
    engine.run.update_metrics("calibrate", {"summary": summary, "tau": taus,
                                            "seconds": round(time.perf_counter() - t0, 1)})
    calibration["seconds"] = time.perf_counter() - t0
    return calibration
