"""The engine: a loaded run folder that matches queries.

Queries -> embeddings -> faiss shortlist -> each of the run's stages (engine.stages) scores its
pairs -> per-individual ranking (calibrated fusion once `calibrate` has run) -> top-5 with
new_individual.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.aggregate import aggregate_per_individual, top5_with_new
from core.cache import record_key
from core.catalog import Record, id_problem
from core.errors import UserError
from core.gallery import Gallery
from core.metrics import NEW_INDIVIDUAL
from core.runfolder import RunFolder, atomic_write_bytes, atomic_write_json, read_json
from core.stage import ALL, PairBatch, StageContext, is_active
from engine.config import MatchConfig
from engine.stages import MATCHERS, load_stages
from keypoints.features import DESC_DIM, Keypoints
from keypoints.inlier_weights import relative_xy
from keypoints.votes import VoteConfig, VoteIndex
from ranker.fusion import FUSED, ScoreFusion, calibrated_scorers
from ranker.rerank import gallery_reciprocal_sets, k_reciprocal_rescore
from siamese.embed import EmbedResult, embed_records, normalize_features
from siamese.focus import FocusMap
from siamese.index import EmbeddingIndex, IndividualMeans, load_embedding_whitening
from siamese.model import SiameseNet, load_model
from siamese.precision import resolve as resolve_precision

log = logging.getLogger(__name__)
# deepest search for a shortlist with a cap per individual (faiss GPU indexes return at most 2048)
CAP_MAX_DEPTH = 2048
# above this many gallery photos keypoint votes are off: their index (IVF-Flat, 1000 RootSIFT
# descriptors of 0.5 KB per photo) would take ~10 GB of memory
VOTES_MAX_PHOTOS = 20_000
# --complete checks at most this many photos of one individual per query (those nearest the query in the
# embedding): a catalog may hold hundreds of one animal (the development set: at most ~15 per flank)
COMPLETE_PHOTOS = 10
# How voted photos meet --verify-top, recorded in calibration.json's "match": they share its V checks
# (verify_picks). Calibrations fitted when they were verified on top of V have no "votes_rule".
VOTES_RULE = "share_v"


def votes_rule_stale(match: dict | None) -> bool:
    """Whether calibration.json's "match" was fitted with votes under an earlier VOTES_RULE."""
    return bool(match) and match.get("votes", 0) > 0 and match.get("votes_rule") != VOTES_RULE


def match_settings_of(cfg: MatchConfig, votes_available: bool, vote_weights_available: bool = True,
                      verifier_available: bool = True) -> dict:
    """The settings a calibration holds for (recorded in calibration.json's "match", compared by
    `Engine.tau`): votes count only where the run can count them (`Engine.votes_available`), and are
    weighted only where counted and the run has a model of inliers (`vote_weights_available`), photos are
    completed only where a local matcher checks them (`verifier_available`, and V > 0); an
    individual weight or vote weighting of None is `calibrate`'s (`MatchConfig.to_fit`;
    `Engine.match_settings` gives the engine's own)."""
    fit = cfg.to_fit()
    votes = cfg.votes if votes_available else 0
    return {"shortlist": cfg.shortlist, "verify_top": cfg.verify_top, "per_individual": cfg.per_individual,
            "votes": votes, "individual_weight": float(fit.individual_weight),
            "vote_weights": bool(fit.vote_weights and votes > 0 and vote_weights_available),
            "complete": cfg.complete if cfg.verify_top > 0 and verifier_available else 0}


# settings calibration.json's "match" did not record before they existed, and what each was then: off
SETTINGS_ADDED = {"per_individual": 0, "votes": 0, "individual_weight": 0, "vote_weights": False, "complete": 0}


def fitted_settings(match: dict | None, now: dict) -> dict:
    """The settings of calibration.json's "match" record, keyed like `now` (`match_settings_of`):
    calibrations from before --per-individual, --votes, --individual-weight and --vote-weights had none
    of them (off: `SETTINGS_ADDED`); no record at all reads as `now`."""
    return {k: match.get(k, SETTINGS_ADDED.get(k)) for k in now} if match else now


@dataclass
class Candidate:
    individual_id: str
    score: float  # the score the ranking used
    gallery_index: int  # best-matching gallery photo of this individual
    gallery_image: str
    stages: dict[str, float | None] = field(default_factory=dict)  # each stage's score, None: not run
    # e.g. keypoint inliers, for a person to check: positions in the photos as the stages saw them
    # (after a catalog bbox's crop); `write_predictions` places them in the whole photos
    evidence: dict = field(default_factory=dict)
    gallery_bbox: tuple[int, int, int, int] | None = None  # the gallery photo's catalog bbox


def alternate(order: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`order` (positions, all of them) with `other` (some of them) interleaved: order[0], other[0],
    order[1], other[1], ..., then the rest of `order`; each position once, where it first appears."""
    m = len(other)
    both = np.empty(len(order) + m, np.int64)
    both[0:2 * m:2], both[1:2 * m:2], both[2 * m:] = order[:m], other, order[m:]
    _, first = np.unique(both, return_index=True)
    return both[np.sort(first)]


@dataclass
class QueryPairs:
    """One query's shortlist: gallery photo indices and each stage's score for them."""
    record: Record
    gallery_idx: np.ndarray  # (k,) int
    stages: dict[str, np.ndarray]  # stage -> (k,) float, NaN where the stage did not run
    evidence: dict[int, dict] = field(default_factory=dict)  # gallery index -> e.g. keypoint inliers
    similarity: np.ndarray | None = None  # (k,) the shortlist search's cosine
    # (k,) the cosine to the mean of each photo's individual's photos of its viewpoint (IndividualMeans;
    # None: not computed, individual weight 0)
    individual: np.ndarray | None = None
    voted: np.ndarray | None = None  # positions of the photos keypoint votes proposed, most votes first
    votes: np.ndarray | None = None  # (k,) each photo's keypoint votes (None: not counted)
    # what `complete` needs to add photos after the shortlist: the query's own photo(s) (gallery indices,
    # never matched with it), every gallery photo's keypoint votes (None: not counted; dropped once
    # `pair_scores` is done), its embedding as searched
    hidden: np.ndarray | None = None
    gallery_votes: np.ndarray | None = None
    query_emb: np.ndarray | None = None

    def append(self, photos: np.ndarray, similarity: np.ndarray, individual: np.ndarray | None = None) -> None:
        """Gallery `photos` join the shortlist after its photos, with their cosine (`similarity`) and, where
        the shortlist has them, their cosine to their individual's mean (`individual`) and their votes
        (`gallery_votes`); no stage has scored them yet (NaN)."""
        self.gallery_idx = np.concatenate([self.gallery_idx, photos])
        self.similarity = np.concatenate([self.similarity, np.asarray(similarity, np.float64)])
        if self.individual is not None:
            self.individual = np.concatenate([self.individual, individual])
        if self.votes is not None:
            self.votes = np.concatenate([self.votes, self.gallery_votes[photos]])
        for name in self.stages:
            self.stages[name] = np.concatenate([self.stages[name], np.full(len(photos), np.nan)])


@dataclass
class QueryResult:
    record: Record
    name: str
    predictions: list[str]
    candidates: list[Candidate]


def scoring_paths(run: RunFolder) -> list[Path]:
    """The files of the run that the stages' scores depend on, where present: the network, the embedding's
    whitening, and each local matcher's validator, model of inliers and descriptor whitening."""
    paths = [run.weights_path, run.embedding_whitening_path]
    for cls in MATCHERS.values():
        paths += [cls.validator_path(run), cls.inlier_weights_path(run)]
        if hasattr(cls, "whitening_path"):
            paths.append(cls.whitening_path(run))
    return [p for p in dict.fromkeys(paths) if p.is_file()]


def scoring_files(run: RunFolder) -> dict[str, str]:
    """SHA-1 of each of `scoring_paths`. `calibrate` records them: its calibrators, fusion and tau hold
    for these files only."""
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in scoring_paths(run)}


def calibration_changes(run: RunFolder, calibration: dict) -> list[str]:
    """The files (`scoring_files`) that differ from those the calibration was fitted for, each said as
    "NAME missing", "NAME added" or "NAME changed"; none for a calibration from before the record."""
    fitted = calibration.get("fitted_for")
    if fitted is None:
        return []
    if not isinstance(fitted, dict):
        raise UserError(f"{run.calibration_path} is malformed (fitted_for is not a mapping): `cli.py calibrate` "
                        "writes it anew")
    now = scoring_files(run)
    return [f"{name} {'missing' if name not in now else 'added' if name not in fitted else 'changed'}"
            for name in sorted(set(fitted) | set(now)) if fitted.get(name) != now.get(name)]


def check_calibration_fits(run: RunFolder, calibration: dict) -> None:
    """Refuse a calibration fitted for other files than the run's (`calibration_changes`): one copied from
    another run, or kept after a verifier or network was removed or replaced by hand. Its fused scores
    would rank on weights of stages that are not there, and its tau would not fit them (on the demo, with
    verifier.json removed, every known query was answered new_individual)."""
    changes = calibration_changes(run, calibration)
    if changes:
        raise UserError(f"{run.calibration_path} was fitted for other files than this run's ({', '.join(changes)}): "
                        f"`cli.py calibrate --run {run.path}` fits it again")


CALIBRATION_VERSION = 1  # calibration.json's "version"


def read_calibration(path: Path) -> tuple[dict, dict]:
    """calibration.json and its calibrated scorers; UserError (naming what writes it anew) when it
    cannot be read or lacks what the scorers need."""
    calibration = read_json(path)
    version = calibration.get("version") if isinstance(calibration, dict) else None
    if version is not None and version != CALIBRATION_VERSION:
        raise UserError(f"{path} is of format version {version}, this engine reads version {CALIBRATION_VERSION}: "
                        "`cli.py calibrate` writes it anew")
    try:
        scorers = calibrated_scorers(ScoreFusion.from_dict(calibration["fusion"]))
        float(calibration["tau"]["fused"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path} is malformed ({e.__class__.__name__}: {e}): `cli.py calibrate` writes it "
                        f"anew") from None
    return calibration, scorers


class Engine:
    """A loaded run folder, ready to match: its network, gallery, index, stages and calibration."""

    def __init__(self, run: RunFolder, model: SiameseNet, gallery: Gallery, config: dict,
                 stages: Sequence[str] | None = None, replaces_calibration: bool = False):
        """`replaces_calibration` (calibrate, train-verifier): an unreadable calibration.json is set aside
        with a warning, not refused, as the command writes it anew (or removes it)."""
        self.run, self.model, self.config = run, model, config
        # the embedding's whitening for search, or None
        self.whitening = load_embedding_whitening(run, gallery.embeddings.shape[1])
        self.stages = load_stages(StageContext(run, config, gallery, model, focus=FocusMap()), stages)
        self.seconds: dict[str, float] = defaultdict(float)  # time spent in the shortlist and each stage
        self.scorers: dict = {}
        self._warned_settings: set = set()  # match settings `tau` has already warned about (once each)
        self._warned_views: set = set()  # query viewpoints the gallery lacks, warned about (once each)
        self.set_gallery(gallery)
        self.calibration = None
        if run.calibration_path.is_file():
            try:
                self.calibration, self.scorers = read_calibration(run.calibration_path)
                check_calibration_fits(run, self.calibration)
            except UserError as e:
                if not replaces_calibration:
                    raise
                self.calibration, self.scorers = None, {}  # (read, but for other files: not used either)
                log.warning("%s; set aside (it is replaced)", e)

    def set_gallery(self, gallery: Gallery) -> None:
        """Match against `gallery`: its embeddings as searched (`searchable`) and their index; what
        was found in the previous gallery is forgotten."""
        self.gallery = gallery
        self.search_embeddings = self.searchable(gallery.embeddings)
        self.index = EmbeddingIndex(self.search_embeddings, gallery.viewpoints)
        self._reciprocal: dict = {}  # (k, gallery subset) -> the gallery's k-th neighbour similarity and sets
        self._votes: VoteIndex | None = None  # keypoint votes over the gallery, built when first needed
        self._by_path: tuple | None = None  # (gallery, its indices by path): photos_by_path
        self._by_individual: dict[str, np.ndarray] | None = None  # photos_by_individual
        self._means: IndividualMeans | None = None  # each individual's mean embedding, built when first needed

    def searchable(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings as the shortlist search compares them: whitened where the run has a whitening
        (`siamese.index.fit_embedding_whitening`), else as they are. The pair head reads them as they are."""
        return embeddings if self.whitening is None else self.whitening.apply(embeddings)

    @classmethod
    def load(cls, run_path: Path, precision: str = "auto", stages: Sequence[str] | None = None,
             replaces_calibration: bool = False) -> "Engine":
        """The run folder's engine, its network in `precision` (auto: chosen for this machine), with
        the run's stages (only those named in `stages`, if given); `replaces_calibration`: see `Engine`."""
        run = RunFolder(run_path)
        config = run.config()
        model = load_model(run.weights_path)
        engine = cls(run, model, Gallery.load(run.gallery_path, run.images_root()), config, stages,
                     replaces_calibration)
        engine.precision = resolve_precision(model, precision, config.get("precision"))
        spaced = sorted(i for i in set(engine.gallery.ids) if id_problem(i))  # (each individual once)
        if spaced:  # (catalogs holding such IDs are refused since; a run trained before keeps them)
            log.warning("%d individual ID(s) of the gallery hold a space (%s): in the predictions CSV, whose five IDs "
                        "are separated by spaces, each reads as two; train again from a catalog whose IDs hold none "
                        "(e.g. %s)", len(spaced), ", ".join(repr(i) for i in spaced[:3]) + (", ..." if len(spaced) > 3
                                                                                               else ""),
                        "_".join(spaced[0].split()))
        return engine

    def warn_if_uncalibrated(self) -> None:
        """For match and evaluate: without calibrate, the stages are not fused by what was learned
        on held-out individuals and tau is a default."""
        if self.calibration is None and self.stage_order():
            unused = [s.name for s in self.stages if s.scope != ALL]
            log.warning("%s is not calibrated: photos are ranked by the %s stage alone%s and new_individual comes "
                        "at its default threshold; run `cli.py calibrate --run %s` first", self.run.path,
                        self.stage_order()[-1], f" ({', '.join(unused)} unused)" if unused else "", self.run.path)

    def embed(self, records: Sequence[Record], cfg: MatchConfig, progress: bool = True,
              desc: str = "embedding queries") -> EmbedResult:
        return embed_records(self.model, records, self.run.cache_dir / "embeddings", cfg.batch_size,
                             cfg.workers, progress, desc)

    @property
    def trained(self) -> bool:
        return bool(self.config.get("train", {}).get("epochs", 0))

    def stage(self, name: str):
        return next((s for s in self.stages if s.name == name), None)

    def stage_order(self) -> list[str]:
        """The run's stages that score every shortlisted pair, cheapest first."""
        return [s.name for s in self.stages if s.scope == ALL]

    def tau(self, cfg: MatchConfig) -> float:
        if cfg.tau is not None:
            return cfg.tau
        if self.calibration is not None:
            match = self.calibration.get("match")
            now = self.match_settings(cfg)
            fitted = fitted_settings(match, now)
            if fitted != now and tuple(now.items()) not in self._warned_settings:
                # a command asks for tau several times (ranking, predictions file, review page): say it once
                self._warned_settings.add(tuple(now.items()))

                # only the settings that differ, and not those that follow from another (no votes weighed
                # without votes, no photos completed without checks)
                differ = [k for k in now if fitted[k] != now[k]]
                implied = {"vote_weights": "votes", "complete": "verify_top"}
                differ = [k for k in differ if not (k in implied and implied[k] in differ
                                                    and not (now[implied[k]] and fitted[implied[k]]))]

                def flags(d):
                    return " ".join((f"--{'' if d[k] else 'no-'}{k.replace('_', '-')}" if isinstance(d[k], bool)
                                     else f"--{k.replace('_', '-')} {d[k]}") for k in differ)
                log.warning("calibrated with %s; these settings differ (%s), so the calibrated threshold may "
                            "not fit", flags(fitted), flags(now))
            if now["votes"] and votes_rule_stale(match) and "votes_rule" not in self._warned_settings:
                self._warned_settings.add("votes_rule")
                log.warning("calibrated by an earlier engine that verified the voted photos on top of --verify-top "
                            "(they now share its checks), so the calibrated threshold may not fit: run calibrate "
                            "again")
            return float(self.calibration["tau"]["fused"])
        return self.stage(self.stage_order()[-1]).default_tau

    def shortlist(self, records: Sequence[Record], emb: EmbedResult, cfg: MatchConfig,
                  gallery_subset: np.ndarray | None = None, own: np.ndarray | None = None,
                  progress: bool = False) -> list[QueryPairs]:
        """Each query's K nearest gallery photos (optionally only among `gallery_subset`, gallery
        indices: calibration folds hide part of the gallery), the query's own photo left out: the
        gallery photo at the same path, and `own[i]` (gallery index, -1: none) for query `emb.ok[i]`.
        With `cfg.per_individual` N > 0, at most N photos of one individual (its nearest), found by
        searching deeper (up to CAP_MAX_DEPTH photos) until K remain. With `cfg.votes` L > 0, the L
        photos with the most keypoint votes follow (`add_votes`; the cap does not apply to them, and
        they carry the query's cosine as searched (`searchable`), without query expansion or
        re-ranking). Where the individual weight is above 0 (`individual_weight`), each photo's
        `qp.individual`: the query's cosine (as searched) to the mean of the photo's individual's
        photos of its viewpoint, among the same photos, the query's own left out."""
        t0 = time.perf_counter()
        recs = [records[i] for i in emb.ok]
        if not recs:
            return []
        views = [r.viewpoint for r in recs]
        if gallery_subset is None:
            self.warn_unknown_views(views)
            k = min(cfg.shortlist, len(self.gallery))
            index, to_gallery = self.index, None
        else:
            k = min(cfg.shortlist, len(gallery_subset))
            index = EmbeddingIndex(self.search_embeddings[gallery_subset],
                                   [self.gallery.viewpoints[g] for g in gallery_subset])
            to_gallery = gallery_subset
        # each query's own photo(s): the gallery photo at its path and own[i]; never shortlisted or voted for
        by_path = self.photos_by_path()
        hidden = [np.array(by_path.get(str(Path(r.path).resolve()), [])
                           + ([int(own[qi])] if own is not None and own[qi] >= 0 else []), np.int64)
                  for qi, r in enumerate(recs)]
        # the same as a (queries, most hidden) matrix, -2 padded (-1 is search's "not found")
        hidden_m = np.full((len(recs), max(1, max(len(h) for h in hidden))), -2, np.int64)
        for qi, h in enumerate(hidden):
            hidden_m[qi, :len(h)] = h

        query_emb = self.searchable(emb.embeddings)

        def search(q, depth):
            sims, idx = index.search(q, depth, views)
            if cfg.rerank > 0:
                sims, idx = self.k_reciprocal(index, to_gallery, sims, idx, cfg.rerank)
            if to_gallery is not None:
                idx = np.where(idx >= 0, to_gallery[np.maximum(idx, 0)], -1)
            return sims, idx

        def not_own(idx):  # found, and not the query's own photo
            return (idx >= 0) & ~(idx[:, :, None] == hidden_m[:, None, :]).any(axis=2)

        # one extra neighbour so that dropping the query's own photo (evaluate on gallery photos) leaves
        # k; with a cap per individual, deeper until k remain after the cap in every row, or the row's
        # photos run out (-1 padding: its viewpoint's photos, a fold's subset, IVF's probed lists)
        max_depth = min(index.n, CAP_MAX_DEPTH)
        depth = k + 1 if cfg.per_individual <= 0 else min(4 * (k + 1), max_depth)
        while True:
            sims, idx = search(query_emb, depth)
            if cfg.query_expansion > 0:
                sims, idx = search(self.expand_queries(query_emb, sims, idx, not_own(idx),
                                                       cfg.query_expansion), depth)
            keep = not_own(idx)
            if cfg.per_individual <= 0:
                break
            keep &= self.within_cap(idx, keep, cfg.per_individual)
            short = (keep.sum(axis=1) < k) & (idx >= 0).all(axis=1)
            if not short.any():
                break
            if depth >= max_depth:
                log.info("--per-individual %d: %d queries keep fewer than %d photos among their %d nearest",
                         cfg.per_individual, int(short.sum()), k, depth)
                break
            depth = min(4 * depth, max_depth)
        pairs = [QueryPairs(rec, idx[qi][keep[qi]][:k], {}, similarity=sims[qi][keep[qi]][:k].astype(np.float64),
                            hidden=hidden[qi], query_emb=query_emb[qi])
                 for qi, rec in enumerate(recs)]
        self.seconds["shortlist"] += time.perf_counter() - t0
        if cfg.votes > 0:
            self.add_votes(pairs, cfg, gallery_subset, progress)
        if self.individual_weight(cfg) > 0:
            t0 = time.perf_counter()
            means = self.individual_means()
            for qi, qp in enumerate(pairs):
                qp.individual = means.cosines(query_emb[qi], qp.gallery_idx, hidden[qi], gallery_subset)
            self.seconds["shortlist"] += time.perf_counter() - t0
        return pairs

    def warn_unknown_views(self, views: Sequence[str | None]) -> None:
        """A warning (once per viewpoint) for queries of a viewpoint the gallery has no photo of: they
        meet only the gallery photos without a viewpoint (`EmbeddingIndex.meets`), if any."""
        known = self.index.views
        if not known and any(views) and None not in self._warned_views:
            self._warned_views.add(None)  # (None: the warning about a gallery without viewpoints)
            log.warning("the queries give viewpoints but no gallery photo has one: every photo is compared with "
                        "the whole gallery")
        missing = Counter(v for v in views if v and known and v not in known and v not in self._warned_views)
        if not missing:
            return
        self._warned_views.update(missing)
        n_free = int(self.index.meets(next(iter(missing))).sum())  # (the same photos for any view it lacks)
        log.warning("%d query photo(s) of a viewpoint no gallery photo has (%s; the gallery's: %s) meet only the "
                    "%d gallery photo(s) without a viewpoint%s", sum(missing.values()),
                    ", ".join(f"{v}: {n}" for v, n in sorted(missing.items())), ", ".join(known), n_free,
                    "" if n_free else f", so they are answered {NEW_INDIVIDUAL}")

    def photos_by_path(self) -> dict[str, list[int]]:
        """Gallery indices by photo path (built once per gallery)."""
        if self._by_path is None or self._by_path[0] is not self.gallery:
            by_path: dict[str, list[int]] = defaultdict(list)
            for g, p in enumerate(self.gallery.paths):
                by_path[p].append(g)
            self._by_path = (self.gallery, dict(by_path))
        return self._by_path[1]

    def gallery_mask(self, gallery_subset: np.ndarray | None) -> np.ndarray:
        """(gallery,) True for the photos of `gallery_subset` (gallery indices; None: all)."""
        if gallery_subset is None:
            return np.ones(len(self.gallery), bool)
        mask = np.zeros(len(self.gallery), bool)
        mask[gallery_subset] = True
        return mask

    def may_meet(self, qp: QueryPairs, members: np.ndarray) -> np.ndarray:
        """(gallery,) the photos query `qp` may be matched with: among `members` (`gallery_mask`), those of
        its viewpoint (`EmbeddingIndex.meets`), never its own photo(s) (`qp.hidden`). The keypoint votes and
        `complete` meet the same photos as the embedding's search."""
        allowed = members & self.index.meets(qp.record.viewpoint)
        allowed[qp.hidden] = False
        return allowed

    def photos_by_individual(self) -> dict[str, np.ndarray]:
        """Gallery indices by individual (built once per gallery)."""
        if self._by_individual is None:
            by: dict[str, list[int]] = defaultdict(list)
            for g, ind in enumerate(self.gallery.ids):
                by[ind].append(g)
            self._by_individual = {k: np.array(v, np.int64) for k, v in by.items()}
        return self._by_individual

    def votes_available(self) -> bool:
        """Keypoint votes need the SIFT stage (its descriptors) and a gallery small enough for the
        index in memory (VOTES_MAX_PHOTOS)."""
        if self.stage("keypoints") is None:
            return False
        if len(self.gallery) > VOTES_MAX_PHOTOS:
            if "votes" not in self._warned_settings:
                self._warned_settings.add("votes")
                log.warning("keypoint votes are off above %d gallery photos (their index takes ~0.5 MB of memory "
                            "per photo; this gallery has %d): the embedding's shortlist only", VOTES_MAX_PHOTOS,
                            len(self.gallery))
            return False
        return True

    def calibration_match(self, cfg: MatchConfig) -> dict:
        """What calibration.json records under "match": the settings and the votes' rule."""
        return {**self.match_settings(cfg), "votes_rule": VOTES_RULE}

    def match_settings(self, cfg: MatchConfig) -> dict:
        """The settings a calibration holds for (`match_settings_of`), under this run and gallery."""
        return match_settings_of(replace(cfg, individual_weight=self.individual_weight(cfg),
                                         vote_weights=self.vote_weights(cfg)), self.votes_available(),
                                 self.vote_model() is not None, any(s.scope != ALL for s in self.stages))

    def vote_model(self):
        """The model of inliers that weighs keypoint votes: the SIFT stage's, where train-verifier fitted one."""
        stage = self.stage("keypoints")
        return None if stage is None else stage.inlier_weights

    def calibrated_setting(self, cfg: MatchConfig, name: str, uncalibrated):
        """A calibrated match setting (`MatchConfig` field `name`): the setting's where given, else the
        calibration's, which is off (`SETTINGS_ADDED`) for a calibration from before the setting existed
        (it was fitted without it), else `uncalibrated`."""
        value = getattr(cfg, name)
        if value is not None:
            return value
        if self.calibration is not None:
            return (self.calibration.get("match") or {}).get(name, SETTINGS_ADDED[name])
        return uncalibrated

    def vote_weights(self, cfg: MatchConfig) -> bool:
        """Whether keypoint votes are weighted by the model of inliers (`MatchConfig.vote_weights`,
        `calibrated_setting`: on without calibration, off for a calibration from before the setting, whose
        votes stage was calibrated on plain votes); only where the run has the model (`vote_model`)."""
        return bool(self.calibrated_setting(cfg, "vote_weights", True)) and self.vote_model() is not None

    def individual_weight(self, cfg: MatchConfig) -> float:
        """The share of the embedding stage's score that is the cosine to the candidate individual's mean
        (`MatchConfig.individual_weight`, `calibrated_setting`: 0 without calibration and for a calibration
        from before the setting, whose fusion was fitted on the photo's cosine alone)."""
        return float(self.calibrated_setting(cfg, "individual_weight", 0.0))

    def individual_means(self) -> IndividualMeans:
        """Each individual's mean embedding per viewpoint over the gallery (built once per gallery)."""
        if self._means is None:
            self._means = IndividualMeans(self.search_embeddings, self.gallery.ids, self.gallery.viewpoints)
        return self._means

    def vote_index(self, progress: bool = False) -> VoteIndex | None:
        """The keypoint vote index over the gallery (keypoints.votes), loaded from the run's cache or
        built when first needed (the gallery's keypoints extracted where not cached); None where
        votes are not available."""
        if not self.votes_available():
            return None
        if self._votes is None:
            stage = self.stage("keypoints")
            bad = stage.store.cache.unreadable()

            def keypoints(part):
                kps = stage.store.get(part, stage.workers, progress=progress and len(part) > 1,
                                      desc="gallery keypoints")
                # None: missing for now (the index is then not saved); empty: a photo that cannot be read
                return [kps[k] if (k := record_key(r)) in kps else
                        (Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, DESC_DIM), np.float32), (0, 0))
                         if k in bad else None) for r in part]
            self._votes = VoteIndex.from_store(self.gallery.records(), keypoints, VoteConfig(),
                                               self.run.cache_dir / "votes", json.dumps(stage.config(), sort_keys=True))
        return self._votes

    def add_votes(self, pairs: Sequence[QueryPairs], cfg: MatchConfig, gallery_subset: np.ndarray | None,
                  progress: bool = False) -> None:
        """Each query's `cfg.votes` gallery photos with the most keypoint votes (at least one) join its
        shortlist (after the embedding's photos, with the query's cosine as searched; those already in it
        stay where they are), in `qp.voted` for `verify_picks`; every shortlisted photo gets its vote count
        (the `votes` stage). A query meets the same photos as in the embedding's search (`may_meet`).
        Loading or building the vote index counts as the votes' time."""
        t0 = time.perf_counter()
        index = self.vote_index(progress)
        self.seconds["votes"] += time.perf_counter() - t0
        if index is None or not pairs:
            return
        stage = self.stage("keypoints")
        weights = self.vote_model() if self.vote_weights(cfg) else None
        t0 = time.perf_counter()
        kps = stage.store.get([qp.record for qp in pairs], stage.workers, progress=False)
        t1 = time.perf_counter()
        self.seconds["keypoints"] += t1 - t0  # the queries' keypoints: the keypoint stage's work, done early
        members = self.gallery_mask(gallery_subset)
        for qp in pairs:
            kp = kps.get(record_key(qp.record))
            if kp is None or not len(kp):
                continue
            votes = index.votes(kp.desc, self.may_meet(qp, members), relative_xy(kp), weights)
            top = np.argsort(-votes, kind="stable")[: cfg.votes]
            top = top[votes[top] > 0]
            new = top[~np.isin(top, qp.gallery_idx)]
            if len(new):
                qp.append(new, self.search_embeddings[new] @ qp.query_emb)
            position = {int(g): j for j, g in enumerate(qp.gallery_idx)}
            qp.voted = np.array([position[int(g)] for g in top], dtype=np.int64)
            qp.votes = votes[qp.gallery_idx]
            qp.gallery_votes = votes
        self.seconds["votes"] += time.perf_counter() - t1

    def within_cap(self, idx: np.ndarray, keep: np.ndarray, cap: int) -> np.ndarray:
        """Per row of ranked gallery indices, True where the photo's individual has had fewer than
        `cap` kept photos before it."""
        ids = np.asarray(self.gallery.ids, dtype=object)
        out = np.zeros_like(keep)
        for q in range(len(idx)):
            seen: dict[str, int] = {}
            for j in np.flatnonzero(keep[q]):
                ind = ids[idx[q, j]]
                if seen.get(ind, 0) < cap:
                    seen[ind] = seen.get(ind, 0) + 1
                    out[q, j] = True
        return out

    def k_reciprocal(self, index: EmbeddingIndex, members: np.ndarray | None, sims: np.ndarray, idx: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
        """The shortlists (indices into `index`, over the gallery photos `members`, None: all) re-scored
        by k-reciprocal re-ranking (`ranker.rerank`); the gallery's own neighbour lists are searched
        once per gallery subset and k."""
        key = (k, None if members is None else hashlib.sha1(members.tobytes()).hexdigest())
        if key not in self._reciprocal:
            views = [self.gallery.viewpoints[g] for g in (members if members is not None else range(len(self.gallery)))]
            gs, gi = index.search(index.embeddings, k + 1, views)
            own = gi == np.arange(len(gi))[:, None]
            own[~own.any(axis=1), -1] = True  # a duplicate photo ranked above itself: drop the last instead
            gs, gi = gs[~own].reshape(len(gi), -1), gi[~own].reshape(len(gi), -1)
            kth = np.where(gi[:, -1] >= 0, gs[:, -1], -np.inf)
            self._reciprocal = {key: (kth, gallery_reciprocal_sets(gi))}  # one index at a time
        kth, sets = self._reciprocal[key]
        out_s, out_i = np.empty_like(sims), np.empty_like(idx)
        for q in range(len(sims)):
            ok = idx[q] >= 0
            s, i = k_reciprocal_rescore(sims[q][ok], idx[q][ok], kth, sets, k)
            out_s[q], out_i[q] = np.concatenate([s, sims[q][~ok]]), np.concatenate([i, idx[q][~ok]])
        return out_s, out_i

    def expand_queries(self, q: np.ndarray, sims: np.ndarray, idx: np.ndarray, keep: np.ndarray, n: int) -> np.ndarray:
        """Query expansion: each query averaged with its `n` best gallery photos (`keep`: the
        neighbours that are not its own photo), weighted by similarity (alpha-QE, alpha = 3), then
        re-normalised."""
        out = q.astype(np.float32).copy()
        for i in range(len(q)):
            top, w = idx[i][keep[i]][:n], np.clip(sims[i][keep[i]][:n], 0, None) ** 3
            out[i] += (w[:, None] * self.search_embeddings[top]).sum(axis=0)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def pair_scores(self, records: Sequence[Record], emb: EmbedResult, cfg: MatchConfig,
                    gallery_subset: np.ndarray | None = None, progress: bool = False,
                    own: np.ndarray | None = None) -> list[QueryPairs]:
        """Every stage's score for each query's shortlist of gallery photos (`shortlist`). A TOP
        stage scores each query's V pairs of `verify_picks` (NaN elsewhere); with `cfg.complete` N, the
        photos of the N best checked individuals not checked yet (`complete`) are then checked too, those
        it adds to the shortlist scored by every stage. The embedding stage's score is the shortlist's
        cosine to the photo, blended with the cosine to the photo's individual's mean (`qp.individual`)
        by `individual_weight`."""
        pairs = self.shortlist(records, emb, cfg, gallery_subset, own, progress)  # (it books its seconds)
        running = [s for s in self.stages if s.scope == ALL or cfg.verify_top > 0]
        for stage in running:
            for qp in pairs:
                qp.stages[stage.name] = np.full(len(qp.gallery_idx), np.nan)
            self.score_stage(stage, pairs, [np.arange(len(qp.gallery_idx)) if stage.scope == ALL else
                                            self.verify_picks(qp, cfg.verify_top) for qp in pairs], cfg,
                             emb.embeddings, progress)
        if cfg.complete > 0 and any(s.scope != ALL for s in running):
            added, unchecked = self.complete(pairs, cfg, gallery_subset)
            for stage in running:  # the added photos by every stage; the shortlisted ones by the TOP stages
                self.score_stage(stage, pairs, added if stage.scope == ALL else
                                 [np.concatenate([u, a]) for u, a in zip(unchecked, added)], cfg, emb.embeddings,
                                 progress)
        for qp in pairs:
            qp.gallery_votes = None  # (a gallery's worth per query: calibrate keeps thousands of shortlists)
        return pairs

    def score_stage(self, stage, pairs: Sequence[QueryPairs], picks: Sequence[np.ndarray], cfg: MatchConfig,
                    query_embeddings: np.ndarray, progress: bool = False) -> None:
        """`stage`'s scores (and evidence) of the pairs at positions `picks[q]` of each query's shortlist
        (`query_embeddings`: the queries' as the network gives them, one row per query of `pairs`)."""
        if not sum(len(p) for p in picks):
            return
        weight = self.individual_weight(cfg)
        # the embedding's score of each pair: the cosine to the photo, `weight` of it to its individual's mean
        similarity = [qp.similarity if qp.individual is None else (1 - weight) * qp.similarity + weight * qp.individual
                      for qp in pairs]
        qpos = np.concatenate([np.full(len(p), qi) for qi, p in enumerate(picks)]).astype(np.int64)
        pos = np.concatenate(picks).astype(np.int64)
        batch = PairBatch([qp.record for qp in pairs], query_embeddings, qpos,
                          np.array([pairs[q].gallery_idx[j] for q, j in zip(qpos, pos)], dtype=np.int64),
                          np.array([similarity[q][j] for q, j in zip(qpos, pos)], dtype=np.float64),
                          np.array([np.nan if pairs[q].votes is None else pairs[q].votes[j]
                                    for q, j in zip(qpos, pos)], dtype=np.float64))
        t0 = time.perf_counter()
        out = stage.score(batch, self.gallery, progress)
        self.seconds[stage.name] += time.perf_counter() - t0
        for i, (q, j) in enumerate(zip(qpos, pos)):
            qp = pairs[q]
            qp.stages[stage.name][j] = out.scores[i]
            if out.evidence is not None:
                qp.evidence.setdefault(int(qp.gallery_idx[j]), {}).update(out.evidence[i])

    def complete(self, pairs: Sequence[QueryPairs], cfg: MatchConfig,
                 gallery_subset: np.ndarray | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The photos of the `cfg.complete` individuals whose checked photos scored best (each pair's best
        TOP-stage score, per individual its best photo) that no TOP stage has checked yet and that the query
        may meet (its viewpoint, `gallery_subset`, never its own photo), at most COMPLETE_PHOTOS per
        individual (those nearest the query in the embedding). Those not in the shortlist join it (after
        its photos). Returns per query the positions of the added photos (for every stage to score) and
        of the shortlisted ones not checked yet (for the TOP stages). The shortlist holds one or two photos
        of most candidates, often not the one taken closest to the query's angle and distance. The added
        photos carry the query's cosine as searched (without query expansion or re-ranking), like voted ones."""
        t0 = time.perf_counter()
        verifying = [s.name for s in self.stages if s.scope != ALL]
        by_individual = self.photos_by_individual()
        members = self.gallery_mask(gallery_subset)
        means = self.individual_means() if any(qp.individual is not None for qp in pairs) else None
        added, unchecked = [], []
        for qp in pairs:
            got = [qp.stages[name] for name in verifying if name in qp.stages]
            best = np.fmax.reduce(np.stack(got)) if got else np.full(len(qp.gallery_idx), np.nan)
            ranked = aggregate_per_individual([self.gallery.ids[g] for g in qp.gallery_idx], best)[:cfg.complete]
            allowed = self.may_meet(qp, members)
            allowed[qp.gallery_idx[~np.isnan(best)]] = False  # checked already
            position = {int(g): j for j, g in enumerate(qp.gallery_idx)}
            new, old = [], []
            for r in ranked:
                photos = by_individual[r.individual_id]
                photos = photos[allowed[photos]]
                if len(photos) > COMPLETE_PHOTOS:
                    near = np.argsort(-(self.search_embeddings[photos] @ qp.query_emb), kind="stable")
                    photos = np.sort(photos[near[:COMPLETE_PHOTOS]])
                for g in photos.tolist():
                    (old.append(position[g]) if g in position else new.append(g))
            new = np.array(new, np.int64)
            start = len(qp.gallery_idx)
            if len(new):
                qp.append(new, self.search_embeddings[new] @ qp.query_emb, None if qp.individual is None else
                          means.cosines(qp.query_emb, new, qp.hidden, gallery_subset))
            added.append(np.arange(start, len(qp.gallery_idx)))
            unchecked.append(np.array(old, np.int64))
        self.seconds["shortlist"] += time.perf_counter() - t0
        return added, unchecked

    def verify_picks(self, qp: QueryPairs, v: int) -> np.ndarray:
        """The positions in `qp`'s shortlist of the V photos a TOP stage verifies: the ranking by
        `pre_scores`, alternating with the photos keypoint votes proposed (most votes first; a photo
        in both counts once) where votes were counted. V is the number of verifications per query
        with or without votes."""
        order = np.argsort(-self.pre_scores(qp.stages), kind="stable")
        return (order if qp.voted is None else alternate(order, qp.voted))[:v]

    def pre_scores(self, stages: dict[str, np.ndarray]) -> np.ndarray:
        """Without calibration: the score of the last stage that scored every pair (the pair head's
        probability once trained, else the cosine)."""
        return stages[[name for name in self.stage_order() if name in stages][-1]]

    def default_scores(self, stages: dict[str, np.ndarray]) -> np.ndarray:
        """The ranking score: the calibrated fusion of every stage when `calibrate` has run."""
        return self.scorers["fused"](stages) if self.scorers else self.pre_scores(stages)

    def ablation_scorers(self, cfg: MatchConfig) -> list[tuple[str, object, float]]:
        """(name, scorer, tau) for each single stage that scores under `cfg`, and the fusion: side by
        side. A stage left out (--matchers) or idle under these settings (the votes with --votes 0)
        has no column: it would only show the scores of nothing."""
        settings = self.match_settings(cfg)
        running = {s.name for s in self.stages if is_active(s, settings)}
        if self.calibration is not None:
            return [(name, scorer, cfg.tau if cfg.tau is not None else float(self.calibration["tau"][name]))
                    for name, scorer in self.scorers.items() if name in running | {FUSED}]
        return [(s.name, (lambda st, n=s.name: st[n]), cfg.tau if cfg.tau is not None else s.default_tau)
                for s in self.stages if s.scope == ALL and s.name in running]

    def rank(self, pairs: Sequence[QueryPairs], tau: float, scorer=None, aggregate: str = "max") -> list[QueryResult]:
        """Per-individual max (or `aggregate`) of each pair's score, then top-5 with new_individual
        inserted at tau."""
        scorer = scorer or self.default_scores
        out = []
        for qp in pairs:
            scores = np.asarray(scorer(qp.stages), dtype=np.float64)
            ranked = aggregate_per_individual([self.gallery.ids[g] for g in qp.gallery_idx], scores, aggregate)
            cands = []
            for ind, sc, b in ranked[:5]:
                g = int(qp.gallery_idx[b])
                stage_vals = {name: (None if np.isnan(v[b]) else float(v[b])) for name, v in qp.stages.items()}
                cands.append(Candidate(ind, float(sc), g, self.gallery.paths[g], stage_vals,
                                       dict(qp.evidence.get(g, {})), self.gallery.bbox(g)))
            out.append(QueryResult(qp.record, qp.record.image, top5_with_new(ranked, tau), cands))
        return out


def evidence_path(out_csv: Path) -> Path:
    """The JSON of evidence `write_predictions` writes beside the predictions CSV: `X.csv` -> `X.json`; a name
    that does not end in .csv keeps all of it (`survey_2024.05` -> `survey_2024.05.json`: not the
    `survey_2024.json` that `survey_2024.06` would share)."""
    out_csv = Path(out_csv)
    if out_csv.suffix.lower() == ".csv":
        return out_csv.with_suffix(".json")
    return out_csv.with_name(out_csv.name + ".json")


def write_predictions(results: Sequence[QueryResult], out_csv: Path, extra: dict | None = None,
                      unreadable: Sequence[tuple[Record, str]] = ()) -> Path:
    """`image,predictions` CSV (Kaggle format) and a JSON with the same stem holding the evidence.

    A photo that could not be read keeps its row, with empty predictions (the JSON says why), so a
    join on `image` downstream sees every photo; rows follow the order of the inputs."""
    rows = [(r.record, " ".join(r.predictions)) for r in results] + [(rec, "") for rec, _ in unreadable]
    if unreadable:  # back in input order: CSV line, or the sorted paths of a folder
        rows.sort(key=lambda row: (row[0].line, row[0].image))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "predictions"])
    for rec, preds in rows:
        w.writerow([rec.image, preds])
    atomic_write_bytes(out_csv, buf.getvalue().encode("utf-8"))
    json_path = evidence_path(out_csv)
    atomic_write_json(json_path, {
        **(extra or {}),
        "new_individual_token": NEW_INDIVIDUAL,
        "inliers_xy": INLIERS_XY,
        "skipped": [{"image": rec.image, "reason": reason} for rec, reason in unreadable],
        "queries": [{
            "image": r.name, "path": os.path.abspath(r.record.path), "predictions": r.predictions,
            **({"bbox": list(r.record.bbox)} if r.record.bbox else {}),
            "candidates": [{
                "individual_id": c.individual_id, "score": round(c.score, 6), "gallery_image": c.gallery_image,
                **({"gallery_bbox": list(c.gallery_bbox)} if c.gallery_bbox else {}),
                **{f"{k}_score": None if v is None else round(float(v), 6) for k, v in c.stages.items()},
                **{k: _in_photos(v, r.record.bbox, c.gallery_bbox) if k.endswith("inliers_xy") else
                   v.tolist() if isinstance(v, np.ndarray) else v for k, v in c.evidence.items()},
            } for c in r.candidates],
        } for r in results],
    })
    return json_path


INLIERS_XY = ("x, y in the query photo, x, y in the gallery photo: pixels of each whole photo as displayed "
              "(EXIF orientation applied), from its top-left corner, a catalog bbox's offset included")


def _in_photos(xy, query_bbox, gallery_bbox) -> list:
    """Inlier rows (x_q, y_q, x_g, y_g) found on the bbox crops, placed in the whole photos."""
    xy = np.asarray(xy, np.float64).reshape(-1, 4).copy()
    for cols, bbox in (((0, 1), query_bbox), ((2, 3), gallery_bbox)):
        if bbox is not None:
            xy[:, cols] += (max(0, bbox[0]), max(0, bbox[1]))  # the crop starts inside the photo
    return np.round(xy, 1).tolist()


def build_gallery(run: RunFolder, model: SiameseNet, records: Sequence[Record], cfg: MatchConfig,
                  progress: bool = True, set_center: bool = False) -> tuple[Gallery, EmbedResult]:
    """Embed the gallery photos and save gallery.h5; unreadable photos are left out and reported.

    With `set_center`, the embedding centre becomes the mean of the gallery's features."""
    emb = embed_records(model, records, run.cache_dir / "embeddings", cfg.batch_size, cfg.workers,
                        progress, "embedding gallery")
    if len(emb.ok) == 0:
        raise UserError("no gallery photo could be read: nothing to match against")
    if set_center:
        model.center.copy_(torch.from_numpy(emb.features.mean(axis=0)).to(model.center.device))
        emb.embeddings = normalize_features(model, emb.features)
    gallery = Gallery.from_records([records[i] for i in emb.ok], emb.embeddings)
    gallery.save(run.gallery_path, run.images_root())
    return gallery, emb
