"""The evaluate command: every stage's ranking of labelled queries, scored side by side."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from core.catalog import load_catalog, warn_lookalikes
from core.metrics import NEW_INDIVIDUAL
from core.runtime import set_threads
from core.stage import ALL
from engine.config import MatchConfig
from engine.matching import (embed_queries, evaluate_pairs, evaluate_results, format_metrics, format_places,
                             right_animal_places, skipped_note, truths_in_gallery)
from engine.pipeline import Engine
from engine.stages import stage_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    catalog: Path  # labelled queries (image,individual_id[,viewpoint])
    run: Path
    images: Path | None = None  # image root (default: the catalog's folder)


def save_evaluation(engine: Engine, cfg: MatchConfig, catalog: Path, tau: float, metrics: dict, table: dict,
                    **more) -> None:
    """metrics.json's "evaluate" (evaluate's, or the demo's): the figures with the match settings they
    were measured with (as calibration.json records them, plus the re-ranking options and the local
    matchers), so that another evaluation, which replaces them, can be told apart."""
    settings = {**engine.match_settings(cfg), "query_expansion": cfg.query_expansion, "rerank": cfg.rerank,
                "matchers": [s.name for s in engine.stages if s.scope != ALL]}
    engine.run.update_metrics("evaluate", {"catalog": str(catalog), "tau": tau, "settings": settings, **metrics,
                                           "ablation": table, **more})


def main(cfg: MatchConfig, paths: Paths, threads: int | None = None, progress: bool = True,
         precision: str = "auto") -> str:
    t0 = time.perf_counter()
    set_threads(threads)
    catalog = load_catalog(paths.catalog, paths.images, allow_new=True)
    engine = Engine.load(paths.run, precision, stage_names(cfg.matchers))
    engine.warn_if_uncalibrated()
    truth = truths_in_gallery(engine.gallery, catalog.records)
    labelled = {r.individual_id for r in catalog.records} - {NEW_INDIVIDUAL}
    warn_lookalikes(labelled, engine.gallery.ids, f"{paths.catalog} and the gallery")
    if labelled and not labelled & set(engine.gallery.ids):
        log.warning("none of the %d individuals of %s is in the gallery: every photo is scored as a new individual "
                    "(is it the catalog of this run's animals?)", len(labelled), paths.catalog)
    te = time.perf_counter()
    emb = embed_queries(engine, catalog.records, cfg, progress)
    seconds = {"embed": time.perf_counter() - te}
    pairs = engine.pair_scores(catalog.records, emb, cfg, progress=progress)
    table = evaluate_pairs(engine, pairs, truth, cfg)
    metrics = evaluate_results(engine.rank(pairs, engine.tau(cfg)), truth)
    places = right_animal_places(engine, pairs, truth)
    per_query = {k: v / max(1, len(pairs)) for k, v in {**seconds, **engine.seconds}.items()}
    save_evaluation(engine, cfg, paths.catalog, engine.tau(cfg), metrics, table, right_animal=places,
                    seconds_per_query=per_query)
    n_new = sum(1 for t in truth.values() if t == NEW_INDIVIDUAL)
    dt = time.perf_counter() - t0
    answer = "fused" if engine.calibration is not None else engine.stage_order()[-1]
    return (format_metrics(table) + f"\nthe engine answers with: {answer}" +
            (f"\n{format_places(places)}" if sum(places.values()) else "") +
            "\nseconds per query: " + ", ".join(f"{k} {v:.3f}" for k, v in per_query.items()) +
            f"\nevaluated {len(truth)} labelled photos ({n_new} of individuals absent from the gallery"
            # an unreadable photo has no answer: the figures count it as wrong, as the protocol's scorer does
            f"{skipped_note(emb, 'counted as wrong answers')}) in {dt:.1f} s; figures saved in "
            f"{engine.run.metrics_path}")
