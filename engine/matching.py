"""The match and evaluate commands: read the inputs, run the engine, write the outputs, summarise."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from core.catalog import Record, catalog_from_folder, load_catalog
from core.errors import UserError
from core.runfolder import check_writable
from core.gallery import Gallery
from core.metrics import NEW_INDIVIDUAL, score_predictions
from engine.pipeline import Engine, MatchConfig, QueryResult, write_predictions
from engine.stages import stage_names
from core.runtime import set_threads

METRIC_ROWS = (("MAP@5", "map5"), ("top-1", "top1"), ("top-5", "top5"), ("known top-1", "known_top1"),
               ("new precision", "new_precision"), ("new recall", "new_recall"), ("new F1", "new_f1"),
               ("closed MAP@5", "closed_map5"), ("closed top-1", "closed_top1"))


def query_records(test_dir: Path, queries_csv: Path | None) -> list[Record]:
    if queries_csv is None:
        return catalog_from_folder(test_dir).records
    if not Path(test_dir).is_dir():
        raise UserError(f"test folder {test_dir} does not exist")
    return load_catalog(queries_csv, test_dir, require_labels=False).records


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


def _skipped_note(emb) -> str:
    return f", {len(emb.skipped)} unreadable photo(s) skipped" if emb.skipped else ""


def run_match(test_dir: Path, run: Path, out: Path, queries_csv: Path | None = None, shortlist: int = MatchConfig.shortlist,
              tau: float | None = None, threads: int | None = None, progress: bool = True,
              report: Path | None = None, verify_top: int = MatchConfig.verify_top, precision: str = "auto",
              matchers: tuple[str, ...] | None = None) -> str:
    t0 = time.perf_counter()
    set_threads(threads)
    if Path(out).suffix.lower() == ".json":
        raise UserError(f"--out {out}: the predictions are a CSV; the evidence JSON goes beside it")
    check_writable(out)
    if report is not None:
        check_writable(report, "--report")
    records = query_records(test_dir, queries_csv)
    engine = Engine.load(run, precision, stage_names(matchers))
    cfg = MatchConfig(shortlist=shortlist, tau=tau, verify_top=verify_top)
    results, emb = match_records(engine, records, cfg, progress)
    json_path = write_predictions(results, out, {"run": str(run), "tau": engine.tau(cfg)}, unreadable=emb.skipped)
    if report is not None:
        from engine.review import write_review

        json_path = f"{json_path}, {write_review(engine, results, report, engine.tau(cfg))}"
    n_new = sum(1 for r in results if r.predictions[:1] == [NEW_INDIVIDUAL])
    dt = time.perf_counter() - t0
    return (f"matched {len(results)} photos ({n_new} new_individual first{_skipped_note(emb)}) in {dt:.1f} s "
            f"-> {out}, {json_path}")


def format_metrics(rows: dict[str, dict]) -> str:
    """A table with one column per method (e.g. {"embedding": metrics, "fused": metrics})."""
    names = list(rows)
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["metric".ljust(14) + "".join(n.rjust(width) for n in names)]
    for label, key in METRIC_ROWS:
        lines.append(label.ljust(14) + "".join(f"{rows[n][key]:.3f}".rjust(width) for n in names))
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
    for name, scorer, tau in engine.ablation_scorers(cfg):
        rows[name] = evaluate_results(engine.rank(pairs, tau, scorer), truth)
        closed = (evaluate_results(engine.rank(known_pairs, -math.inf, scorer), known) if known
                  else {"map5": math.nan, "top1": math.nan})
        rows[name].update(closed_map5=closed["map5"], closed_top1=closed["top1"])
    return rows


def truths_in_gallery(gallery, records: list[Record]) -> dict[str, str]:
    """The right answer for each labelled query: its individual if the gallery holds a photo of it
    other than the query itself (which is never matched with itself), else new_individual."""
    photos: dict[str, set[str]] = {}
    for path, ind in zip(gallery.paths, gallery.ids):
        photos.setdefault(ind, set()).add(path)
    return {r.image: r.individual_id if photos.get(r.individual_id, set()) - {str(Path(r.path).resolve())}
            else NEW_INDIVIDUAL for r in records}


def run_evaluate(catalog_csv: Path, run: Path, images: Path | None = None, shortlist: int = MatchConfig.shortlist,
                 tau: float | None = None, threads: int | None = None, progress: bool = True,
                 precision: str = "auto", matchers: tuple[str, ...] | None = None,
                 verify_top: int = MatchConfig.verify_top) -> str:
    t0 = time.perf_counter()
    set_threads(threads)
    catalog = load_catalog(catalog_csv, images, allow_new=True)
    engine = Engine.load(run, precision, stage_names(matchers))
    truth = truths_in_gallery(engine.gallery, catalog.records)
    cfg = MatchConfig(shortlist=shortlist, tau=tau, verify_top=verify_top)
    te = time.perf_counter()
    emb = embed_queries(engine, catalog.records, cfg, progress)
    seconds = {"embed": time.perf_counter() - te}
    pairs = engine.pair_scores(catalog.records, emb, cfg, progress=progress)
    table = evaluate_pairs(engine, pairs, truth, cfg)
    metrics = evaluate_results(engine.rank(pairs, engine.tau(cfg)), truth)
    per_query = {k: v / max(1, len(pairs)) for k, v in {**seconds, **engine.seconds}.items()}
    engine.run.update_metrics("evaluate", {"catalog": str(catalog_csv), "tau": engine.tau(cfg), **metrics,
                                           "ablation": table, "seconds_per_query": per_query})
    n_new = sum(1 for t in truth.values() if t == NEW_INDIVIDUAL)
    dt = time.perf_counter() - t0
    answer = "fused" if engine.calibration is not None else list(table)[-1]
    return (format_metrics(table) + f"\nthe engine answers with: {answer}"
            "\nseconds per query: " + ", ".join(f"{k} {v:.3f}" for k, v in per_query.items()) +
            f"\nevaluated {len(truth)} labelled photos ({n_new} of individuals absent from the gallery"
            f"{_skipped_note(emb)}) in {dt:.1f} s; figures saved in {engine.run.metrics_path}")


def run_enroll(catalog_csv: Path, run: Path, images: Path | None = None, threads: int | None = None,
               progress: bool = True, precision: str = "auto") -> str:
    """Add confirmed photos to the gallery (embeddings, keypoints, index) without retraining."""
    t0 = time.perf_counter()
    set_threads(threads)
    catalog = load_catalog(catalog_csv, images)
    engine = Engine.load(run, precision)
    present = set(engine.gallery.paths)
    records = [r for r in catalog.records if str(Path(r.path).resolve()) not in present]
    already = len(catalog.records) - len(records)
    if not records:
        return f"nothing to enroll: all {already} photos of {catalog_csv} are already in the gallery"
    emb = engine.embed(records, MatchConfig(), progress, "embedding new photos")
    if len(emb.ok) == 0:
        raise UserError(f"none of the {len(records)} photos could be read (first: {emb.skipped[0][1]})")
    added = [records[i] for i in emb.ok]
    before = set(engine.gallery.ids)
    gallery = engine.gallery.extend(Gallery.from_records(added, emb.embeddings))
    kp = engine.stage("keypoints")
    if kp is not None:  # keypoints now, so the first match does not pay for them
        kp.store.get(added, progress=progress, desc="keypoints of new photos")
    gallery.save(engine.run.gallery_path)
    new_ids = {r.individual_id for r in added} - before
    skipped = _skipped_note(emb) + (f", {already} already in the gallery" if already else "")
    return (f"enrolled {len(added)} photos ({len(new_ids)} new individuals{skipped}); gallery now "
            f"{len(gallery)} photos of {len(set(gallery.ids))} individuals ({time.perf_counter() - t0:.1f} s)")
