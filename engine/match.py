"""The match command: rank the known individuals for every photo of a folder."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from core.catalog import IMAGE_SUFFIXES
from core.errors import UserError
from core.metrics import NEW_INDIVIDUAL
from core.runfolder import check_writable
from core.runtime import set_threads
from engine.config import MatchConfig
from engine.matching import counted, match_records, query_records, skipped_note
from engine.pipeline import Engine, evidence_path, write_predictions
from engine.report import check_report_path, thumbnails_folder
from engine.stages import stage_names


@dataclass(frozen=True)
class Paths:
    test_dir: Path  # folder of new photos
    run: Path
    out: Path  # predictions CSV; the evidence JSON goes beside it
    queries: Path | None = None  # CSV image,viewpoint (paths relative to test_dir)
    report: Path | None = None  # HTML review page


def check_not_inputs(paths: Paths, records) -> None:
    """Refuse, before any work, an output that would replace what match reads: a file of the run folder
    (its own files and caches live there), a photo or the --queries CSV. (A review page may be written
    among the photos: the next match skips the thumbnails of X.html in X_files/.)"""
    run = Path(paths.run).resolve()
    photos = {Path(r.path).resolve() for r in records}
    queries = Path(paths.queries).resolve() if paths.queries is not None else None
    outputs = [("--out", paths.out), ("the evidence JSON of --out", evidence_path(paths.out))]
    if paths.report is not None:
        outputs += [("--report", paths.report), ("the thumbnails of --report", thumbnails_folder(paths.report))]
    for option, path in outputs:
        where = Path(path).resolve()
        if where == run or run in where.parents:
            raise UserError(f"{option} {path} is inside the run folder {paths.run}, which holds the engine's own "
                            "files: write it elsewhere")
        if where in photos or where == queries:
            raise UserError(f"{option} {path} is {'the --queries CSV' if where == queries else 'one of the photos'} "
                            "match reads: write it elsewhere")
    if paths.report is not None:  # the page replaces its thumbnail folder: never one that holds the photos
        folder = thumbnails_folder(paths.report).resolve()
        inside = next((p for p in sorted(photos) + ([queries] if queries else []) if folder in p.parents), None)
        if inside is not None:
            raise UserError(f"--report {paths.report} keeps its thumbnails in {thumbnails_folder(paths.report)}, "
                            f"which holds what match reads ({inside}) and would be replaced: choose another name "
                            "for the page")


def main(cfg: MatchConfig, paths: Paths, threads: int | None = None, progress: bool = True,
         precision: str = "auto") -> str:
    t0 = time.perf_counter()
    set_threads(threads)
    out, report = paths.out, paths.report
    if str(out) == "-":
        raise UserError("--out -: match writes a CSV file and its evidence JSON beside it, not to the terminal: give a "
                        "file name (e.g. predictions.csv)")
    if Path(out).suffix.lower() == ".json" or Path(out).suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"--out {out}: the predictions are a CSV (e.g. {Path(out).with_suffix('.csv').name}); the "
                        "evidence JSON goes beside it")
    check_writable(out)
    evidence = evidence_path(out)
    if evidence.is_dir():
        raise UserError(f"--out {out}: the evidence JSON goes beside it, at {evidence}, which is a folder: "
                        f"move that folder or choose another --out")
    check_writable(evidence, "the evidence JSON of --out")
    if report is not None:
        check_report_path(report)
        check_writable(report, "--report")
        taken = {Path(out).resolve(): "--out", evidence.resolve(): "the evidence JSON"}
        if Path(report).resolve() in taken:
            raise UserError(f"--report {report} is {taken[Path(report).resolve()]}'s path: give the review page "
                            f"its own file name (e.g. {Path(out).with_name(Path(out).stem + '_review.html')})")
    records = query_records(paths.test_dir, paths.queries)
    check_not_inputs(paths, records)
    engine = Engine.load(paths.run, precision, stage_names(cfg.matchers))
    engine.warn_if_uncalibrated()
    results, emb = match_records(engine, records, cfg, progress)
    if report is not None:  # replaced below: a stop before then (Ctrl-C) leaves no page of earlier answers
        Path(report).unlink(missing_ok=True)  # beside these predictions
    json_path = write_predictions(results, out, {"run": str(paths.run), "tau": engine.tau(cfg)},
                                  unreadable=emb.skipped)
    if report is not None:
        from engine.review import write_review

        json_path = f"{json_path}, {write_review(engine, results, report, engine.tau(cfg), unreadable=emb.skipped)}"
    n_new = sum(1 for r in results if r.predictions[:1] == [NEW_INDIVIDUAL])
    # photos the catalog holds already (a copy, or the photo saved again): worth knowing before enrolling them
    n_copies = sum(1 for r in results if any(c.evidence.get("same_photo") for c in r.candidates))
    copies = f", {n_copies} the same photo as a gallery photo (same_photo in the JSON)" if n_copies else ""
    dt = time.perf_counter() - t0
    return (f"matched {counted(len(results), 'photo')} ({n_new} new_individual first{copies}{skipped_note(emb)}) "
            f"in {dt:.1f} s -> {out}, {json_path}")
