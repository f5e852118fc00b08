"""What the match, evaluate and enroll commands share: query records, chunked matching, the
ablation table and its scoring."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from core.aggregate import aggregate_per_individual
from core.catalog import Record, catalog_from_folder, load_catalog
from core.errors import UserError
from core.metrics import NEW_INDIVIDUAL, score_predictions
from core.stage import ALL
from engine.pipeline import Engine, MatchConfig, QueryResult

METRIC_ROWS = (("MAP@5", "map5"), ("top-1", "top1"), ("top-5", "top5"), ("known top-1", "known_top1"),
               ("known top-5", "known_top5"),
               ("new precision", "new_precision"), ("new recall", "new_recall"), ("new F1", "new_f1"),
               ("closed MAP@5", "closed_map5"), ("closed top-1", "closed_top1"))

log = logging.getLogger(__name__)


def query_records(test_dir: Path, queries_csv: Path | None) -> list[Record]:
    if queries_csv is None:
        return catalog_from_folder(test_dir).records
    if not Path(test_dir).is_dir():
        raise UserError(f"test folder {test_dir} does not exist")
    catalog = load_catalog(queries_csv, test_dir, require_labels=False, what="--queries")
    if not any(r.viewpoint for r in catalog.records):
        log.warning("%s gives no viewpoint (a 'viewpoint' column, e.g. left/right): every photo is compared with "
                    "the whole gallery", queries_csv)
    listed = {Path(r.path).resolve() for r in catalog.records}
    others = [r for r in catalog_from_folder(test_dir).records if Path(r.path).resolve() not in listed]
    if others:
        log.warning("%d photo(s) of %s are not in %s and are not matched (e.g. %s)", len(others), test_dir,
                    queries_csv, others[0].image)
    return catalog.records


def embed_queries(engine: Engine, records: list[Record], cfg: MatchConfig, progress: bool):
    emb = engine.embed(records, cfg, progress)
    if len(emb.ok) == 0:
        raise UserError(f"none of the {len(records)} query photos could be read (first: {emb.skipped[0][1]})")
    return emb


def match_pairs(engine: Engine, records: list[Record], cfg: MatchConfig, progress: bool):
    """Every stage's scores on each query's shortlist (not yet ranked)."""
    emb = embed_queries(engine, records, cfg, progress)
    return engine.pair_scores(records, emb, cfg, progress=progress), emb


def match_records(engine: Engine, records: list[Record], cfg: MatchConfig, progress: bool, chunk: int = 128):
    """The answers for `records`, scored and ranked `chunk` queries at a time: only the answers
    (top-5 with their evidence) are kept, so memory grows little with the number of queries."""
    emb = embed_queries(engine, records, cfg, progress)
    tau = engine.tau(cfg)
    results = []
    for start in range(0, len(emb.ok), chunk):
        part = replace(emb, ok=emb.ok[start:start + chunk], embeddings=emb.embeddings[start:start + chunk],
                       features=None)
        results += engine.rank(engine.pair_scores(records, part, cfg, progress=progress), tau)
    return results, emb


def counted(n: int, noun: str) -> str:
    """"1 photo", "2 photos": a count and its noun, plural but for one."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def skipped_note(emb, outcome: str = "skipped") -> str:
    return f", {len(emb.skipped)} unreadable photo(s) {outcome}" if emb.skipped else ""


def format_metrics(rows: dict[str, dict]) -> str:
    """A table with one column per method (e.g. {"embedding": metrics, "fused": metrics})."""
    names = list(rows)
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["metric".ljust(14) + "".join(n.rjust(width) for n in names)]
    for label, key in METRIC_ROWS:
        lines.append(label.ljust(14) + "".join(
            ("n/a" if rows[n][key] is None else f"{rows[n][key]:.3f}").rjust(width) for n in names))
    return "\n".join(lines)


def evaluate_results(results: list[QueryResult], truth: dict[str, str]) -> dict:
    return score_predictions(truth, {r.name: r.predictions for r in results})


def evaluate_pairs(engine: Engine, pairs, truth: dict[str, str], cfg: MatchConfig) -> dict[str, dict]:
    """The ablation: each stage's ranking of the same shortlists (and the fusion), scored.

    `closed_*` score the retrieval alone: the queries whose individual is in the gallery, ranked
    with new_individual never proposed. The open-set figures on a data set where the right
    individual is rarely first are mostly credit for answering new_individual; these are not."""
    known = {k: v for k, v in truth.items() if v != NEW_INDIVIDUAL}
    known_pairs = [qp for qp in pairs if qp.record.image in known]
    rows = {}
    scorers = [(n, s, t, "max") for n, s, t in engine.ablation_scorers(cfg)]
    # a query-time option on the engine's own score: each individual's two best photos, averaged
    n, s, t, _ = scorers[-1]
    for name, scorer, tau, how in scorers + [(f"{n}:top2mean", s, t, "top2mean")]:
        rows[name] = evaluate_results(engine.rank(pairs, tau, scorer, how), truth)
        closed = (evaluate_results(engine.rank(known_pairs, -math.inf, scorer, how), known) if known
                  else {"map5": None, "top1": None})  # no known queries: nothing to measure
        rows[name].update(closed_map5=closed["map5"], closed_top1=closed["top1"])
    return rows


# where the right animal of a known query ends up in the engine's closed-set ranking, and, below the
# fifth place, how far its photos got (right_animal_places)
PLACES = ("first", "2nd-5th", "lower, geometry found", "lower, no geometry", "shortlisted, not verified",
          "not shortlisted")


def right_animal_places(engine: Engine, pairs, truth: dict[str, str]) -> dict[str, int]:
    """For the known queries (truth in the gallery): how many have their individual first, 2nd-5th
    or lower in the engine's ranking (new_individual never proposed), and of the others why: a
    verified photo of it with an accepted keypoint geometry (inliers) but outranked; verified
    without any; none of its photos among the verified ones (--verify-top); none in the shortlist
    at all (--shortlist, --votes). Tells which setting could still help and where only a better
    matcher would."""
    counts = dict.fromkeys(PLACES, 0)
    verifying = [s.name for s in engine.stages if s.scope != ALL]
    for qp in pairs:
        t = truth.get(qp.record.image, NEW_INDIVIDUAL)
        if t == NEW_INDIVIDUAL:
            continue
        ids = [engine.gallery.ids[g] for g in qp.gallery_idx]
        mine = np.array([i == t for i in ids], dtype=bool)
        if not mine.any():
            counts["not shortlisted"] += 1
            continue
        ranked = [r.individual_id for r in aggregate_per_individual(ids, engine.default_scores(qp.stages))]
        place = ranked.index(t) if t in ranked else len(ranked)
        if place < 5:
            counts["first" if place == 0 else "2nd-5th"] += 1
        elif not any((~np.isnan(qp.stages[s][mine])).any() for s in verifying if s in qp.stages):
            counts["shortlisted, not verified"] += 1
        elif any(v > 0 for g in qp.gallery_idx[mine] for k, v in qp.evidence.get(int(g), {}).items()
                 if k.endswith("inliers")):
            counts["lower, geometry found"] += 1
        else:
            counts["lower, no geometry"] += 1
    return counts


def format_places(counts: dict[str, int]) -> str:
    n = sum(counts.values())
    return (f"the right animal of the {n} known queries (closed set): " +
            ", ".join(f"{k} {v}" for k, v in counts.items()))


def truths_in_gallery(gallery, records: list[Record]) -> dict[str, str]:
    """The right answer for each labelled query: its individual if the gallery holds a photo of it
    other than the query itself (which is never matched with itself), else new_individual."""
    photos: dict[str, set[str]] = {}
    for path, ind in zip(gallery.paths, gallery.ids):
        photos.setdefault(ind, set()).add(path)
    return {r.image: r.individual_id if photos.get(r.individual_id, set()) - {str(Path(r.path).resolve())}
            else NEW_INDIVIDUAL for r in records}
