"""Matching: queries -> embeddings -> faiss shortlist -> per-individual ranking -> top-5.

Later stages (pair head, keypoint verifier, calibrated fusion) plug into `Engine.score`.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.catalog import Record
from engine.errors import UserError
from engine.gallery import Gallery
from engine.metrics import NEW_INDIVIDUAL
from engine.runfolder import RunFolder, atomic_write_bytes, atomic_write_json, read_json
from engine.runtime import torch_device
from ranker.aggregate import aggregate_per_individual, top5_with_new
from siamese.embed import EmbedResult, embed_records, normalize_features
from siamese.index import EmbeddingIndex
from siamese.model import ModelConfig, SiameseNet
from siamese.precision import resolve as resolve_precision

log = logging.getLogger(__name__)

# Until `calibrate` has run, `new_individual` goes before the first candidate whose cosine
# similarity (of centred embeddings) is below this. On the nyala development set the pretrained
# mobilenetv2_100's best cosine per query lies between 0.25 and 0.61 (median 0.44).
DEFAULT_TAU = 0.50
# Once the pair head is trained, before calibration: its probability P(same individual).
DEFAULT_TAU_PROBABILITY = 0.5


@dataclass(frozen=True)
class MatchConfig:
    shortlist: int = 50  # K: gallery images proposed by the embedding index per query
    verify_top: int = 20  # V: gallery images per query checked by the keypoint verifier
    tau: float | None = None  # None: calibration.json's, else DEFAULT_TAU
    batch_size: int = 32
    workers: int = 2


@dataclass
class Candidate:
    individual_id: str
    score: float  # the score the ranking used
    gallery_index: int  # best-matching gallery photo of this individual
    gallery_image: str
    stages: dict[str, float | None] = field(default_factory=dict)  # each stage's score, None: not run
    evidence: dict = field(default_factory=dict)  # e.g. keypoint inliers, for a person to check


@dataclass
class QueryPairs:
    """One query's shortlist: gallery photo indices and each stage's score for them."""
    record: Record
    gallery_idx: np.ndarray  # (k,) int
    stages: dict[str, np.ndarray]  # stage -> (k,) float, NaN where the stage did not run
    evidence: dict[int, dict] = field(default_factory=dict)  # gallery index -> e.g. keypoint inliers


@dataclass
class QueryResult:
    record: Record
    name: str
    predictions: list[str]
    candidates: list[Candidate]

    @property
    def confidence(self) -> float:
        return self.candidates[0].score if self.candidates else 0.0


def save_model(model: SiameseNet, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_model(path: Path, device: torch.device | None = None) -> SiameseNet:
    if not Path(path).is_file():
        raise UserError(f"{path} not found: the run folder has no model (run `cli.py train-siamese`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = SiameseNet(ModelConfig.from_dict(ckpt["config"]), load_pretrained=False)
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError, EOFError, ValueError) as e:
        raise UserError(f"{path} cannot be loaded ({e.__class__.__name__}): rebuild the run with "
                        f"`cli.py train-siamese`") from None
    return model.to(device or torch_device()).eval()


class Engine:
    """A loaded run folder, ready to match."""

    def __init__(self, run: RunFolder, model: SiameseNet, gallery: Gallery, config: dict):
        self.run, self.model, self.gallery, self.config = run, model, gallery, config
        self.index = EmbeddingIndex(gallery.embeddings, gallery.viewpoints)
        self.verifier = None
        if run.verifier_path.is_file():
            from keypoints.validator import Validator

            from keypoints.verify import FEATURE_NAMES

            try:
                self.verifier = Validator.load(run.verifier_path, expected_features=FEATURE_NAMES)
            except ValueError as e:
                raise UserError(f"{run.verifier_path} does not fit this engine ({e}): run train-verifier "
                                f"again") from None
        self.calibration = read_json(run.calibration_path) if run.calibration_path.is_file() else None
        self.scorers: dict = {}
        if self.calibration is not None:
            from ranker.calibrate import calibrated_scorers
            from ranker.fusion import ScoreFusion

            self.scorers = calibrated_scorers(ScoreFusion.from_dict(self.calibration["fusion"]))

    def keypoint_store(self):
        from keypoints.features import config_from_dict
        from keypoints.store import KeypointStore

        return KeypointStore(self.run.cache_dir / "keypoints", config_from_dict(self.config["keypoints"]))

    def verify_config(self):
        from keypoints.verify import VerifyConfig

        return VerifyConfig.from_dict(self.config["verify"])

    def verify(self, pairs: list[QueryPairs], emb: EmbedResult, cfg: MatchConfig, progress: bool = False) -> None:
        """Keypoint-verify each query's top-V gallery photos (by the score so far); adds the
        validator's P(same | geometry) as stage "keypoints" and the inliers as evidence."""
        from keypoints.store import verify_record_pairs
        from keypoints.verify import feature_matrix

        todo = []
        for qi, qp in enumerate(pairs):
            order = np.argsort(-self.pre_scores(qp.stages), kind="stable")[: cfg.verify_top]
            todo += [(qi, int(j)) for j in order]
            qp.stages["keypoints"] = np.full(len(qp.gallery_idx), np.nan)
        if not todo:
            return
        record_pairs = [(pairs[qi].record, self.gallery.record(int(pairs[qi].gallery_idx[j]))) for qi, j in todo]
        results = verify_record_pairs(self.keypoint_store(), record_pairs, self.verify_config(), cfg.workers,
                                      progress)
        probs = self.verifier.predict(feature_matrix(results))
        for (qi, j), res, p in zip(todo, results, probs):
            qp = pairs[qi]
            qp.stages["keypoints"][j] = p
            qp.evidence[int(qp.gallery_idx[j])] = {
                "inliers": res.n_inliers,
                # compact until written: a match keeps these for every query it answers
                "inliers_xy": np.round(res.inliers_xy, 1).astype(np.float32) if res.n_inliers else
                np.zeros((0, 4), np.float32)}

    @classmethod
    def load(cls, run_path: Path, precision: str = "auto") -> "Engine":
        """The run folder's engine, its network in `precision` (auto: chosen for this machine)."""
        run = RunFolder(run_path)
        config = run.config()
        model = load_model(run.weights_path)
        engine = cls(run, model, Gallery.load(run.gallery_path), config)
        engine.precision = resolve_precision(model, precision, config.get("precision"))
        return engine

    def embed(self, records: Sequence[Record], cfg: MatchConfig, progress: bool = True,
              desc: str = "embedding queries") -> EmbedResult:
        return embed_records(self.model, records, self.run.cache_dir / "embeddings", cfg.batch_size,
                             cfg.workers, progress, desc)

    @property
    def trained(self) -> bool:
        return bool(self.config.get("train", {}).get("epochs", 0))

    def stage_order(self) -> list[str]:
        """Stages this run has, cheapest first."""
        return ["embedding"] + (["siamese"] if self.trained else [])

    def tau(self, cfg: MatchConfig) -> float:
        if cfg.tau is not None:
            return cfg.tau
        if self.calibration is not None:
            fitted = self.calibration.get("match", {})
            if fitted and (fitted.get("shortlist"), fitted.get("verify_top")) != (cfg.shortlist, cfg.verify_top):
                log.warning("calibrated with --shortlist %s --verify-top %s; these settings differ, so the "
                            "calibrated threshold may not fit", fitted.get("shortlist"), fitted.get("verify_top"))
            return float(self.calibration["tau"]["fused"])
        return DEFAULT_TAU if not self.trained else DEFAULT_TAU_PROBABILITY

    def pair_scores(self, records: Sequence[Record], emb: EmbedResult, cfg: MatchConfig,
                    gallery_subset: np.ndarray | None = None, progress: bool = False) -> list[QueryPairs]:
        """Every stage's score for each query's shortlist of gallery photos (optionally only among
        `gallery_subset`, gallery indices: calibration folds hide part of the gallery)."""
        recs = [records[i] for i in emb.ok]
        if not recs:
            return []
        views = [r.viewpoint for r in recs]
        if gallery_subset is None:
            k = min(cfg.shortlist, len(self.gallery))
            # one extra neighbour so that dropping the query's own photo (evaluate on gallery photos) leaves k
            sims, idx = self.index.search(emb.embeddings, k + 1, views)
        else:
            k = min(cfg.shortlist, len(gallery_subset))
            sub = EmbeddingIndex(self.gallery.embeddings[gallery_subset],
                                 [self.gallery.viewpoints[g] for g in gallery_subset])
            sims, sub_idx = sub.search(emb.embeddings, k + 1, views)
            idx = np.where(sub_idx >= 0, gallery_subset[np.maximum(sub_idx, 0)], -1)
        gallery_paths = np.array(self.gallery.paths)
        device = next(self.model.parameters()).device
        g_emb = torch.from_numpy(self.gallery.embeddings).to(device)
        out = []
        for qi, rec in enumerate(recs):
            keep = idx[qi] >= 0
            keep &= gallery_paths[np.maximum(idx[qi], 0)] != str(Path(rec.path).resolve())
            g_idx, g_sim = idx[qi][keep][:k], sims[qi][keep][:k]
            stages = {"embedding": g_sim.astype(np.float64)}
            if self.trained and len(g_idx):
                q = torch.from_numpy(emb.embeddings[qi]).to(device)
                with torch.no_grad():
                    logit = self.model.pair_logit(q.expand(len(g_idx), -1), g_emb[torch.from_numpy(g_idx)])
                stages["siamese"] = torch.sigmoid(logit.float()).cpu().numpy().astype(np.float64)
            out.append(QueryPairs(rec, g_idx, stages))
        if self.verifier is not None and cfg.verify_top > 0:
            self.verify(out, emb, cfg, progress)
        return out

    def pre_scores(self, stages: dict[str, np.ndarray]) -> np.ndarray:
        """Before verification (and without calibration): the pair head's probability once trained,
        else the cosine."""
        return stages["siamese"] if "siamese" in stages else stages["embedding"]

    def default_scores(self, stages: dict[str, np.ndarray]) -> np.ndarray:
        """The ranking score: the calibrated fusion of every stage when `calibrate` has run."""
        return self.scorers["fused"](stages) if self.scorers else self.pre_scores(stages)

    def ablation_scorers(self, cfg: MatchConfig) -> list[tuple[str, object, float]]:
        """(name, scorer, tau) for each single stage this run has, and the fusion: side by side."""
        if self.calibration is not None:
            return [(name, scorer, cfg.tau if cfg.tau is not None else float(self.calibration["tau"][name]))
                    for name, scorer in self.scorers.items()]
        rows = [("embedding", lambda st: st["embedding"], cfg.tau if cfg.tau is not None else DEFAULT_TAU)]
        if self.trained:
            rows.append(("siamese", lambda st: st["siamese"],
                         cfg.tau if cfg.tau is not None else DEFAULT_TAU_PROBABILITY))
        return rows

    def rank(self, pairs: Sequence[QueryPairs], tau: float, scorer=None) -> list[QueryResult]:
        """Per-individual max of each pair's score, then top-5 with new_individual inserted at tau."""
        scorer = scorer or self.default_scores
        out = []
        for qp in pairs:
            scores = np.asarray(scorer(qp.stages), dtype=np.float64)
            ranked = aggregate_per_individual([self.gallery.ids[g] for g in qp.gallery_idx], scores)
            cands = []
            for ind, sc, b in ranked[:5]:
                g = int(qp.gallery_idx[b])
                stage_vals = {name: (None if np.isnan(v[b]) else float(v[b])) for name, v in qp.stages.items()}
                cands.append(Candidate(ind, float(sc), g, self.gallery.paths[g], stage_vals,
                                       dict(qp.evidence.get(g, {}))))
            out.append(QueryResult(qp.record, qp.record.image, top5_with_new(ranked, tau), cands))
        return out

    def score(self, records: Sequence[Record], emb: EmbedResult, cfg: MatchConfig) -> list[QueryResult]:
        return self.rank(self.pair_scores(records, emb, cfg), self.tau(cfg))


def write_predictions(results: Sequence[QueryResult], out_csv: Path, extra: dict | None = None) -> Path:
    """`image,predictions` CSV (Kaggle format) and a JSON with the same stem holding the evidence."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "predictions"])
    for r in results:
        w.writerow([r.name, " ".join(r.predictions)])
    atomic_write_bytes(out_csv, buf.getvalue().encode("utf-8"))
    json_path = Path(out_csv).with_suffix(".json")
    atomic_write_json(json_path, {
        **(extra or {}),
        "new_individual_token": NEW_INDIVIDUAL,
        "queries": [{
            "image": r.name, "path": str(r.record.path), "predictions": r.predictions,
            "candidates": [{
                "individual_id": c.individual_id, "score": round(c.score, 6), "gallery_image": c.gallery_image,
                **{f"{k}_score": None if v is None else round(float(v), 6) for k, v in c.stages.items()},
                **{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in c.evidence.items()},
            } for c in r.candidates],
        } for r in results],
    })
    return json_path


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
    gallery.save(run.gallery_path)
    return gallery, emb
