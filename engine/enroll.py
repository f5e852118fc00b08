"""The enroll command: add confirmed photos to the gallery (embeddings, local features, index)
without retraining. From a labelled catalog, or from the review page's decisions.csv."""
from __future__ import annotations

import csv
import io
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.catalog import Record, format_bbox, id_problem, load_catalog, read_rows, row_record, warn_lookalikes
from core.errors import UserError
from core.gallery import Gallery
from core.metrics import NEW_INDIVIDUAL
from core.runfolder import RunFolder, atomic_write_bytes, check_writable
from core.runtime import set_threads
from engine.config import MatchConfig
from engine.matching import counted, skipped_note
from engine.pipeline import Engine

DECISION_COLUMNS = ("image", "decision", "individual_id", "note", "viewpoint", "bbox")  # the last three optional
DECISIONS = ("match", "new", "unsure")


@dataclass(frozen=True)
class Paths:
    catalog: Path | None  # confirmed photos (image,individual_id[,viewpoint][,bbox])
    run: Path
    images: Path | None = None
    decisions: Path | None = None  # or the review page's decisions.csv


def refuse(path: Path, problems: list[str]) -> None:
    """Every problem of an input file, one per line; nothing is enrolled until all are fixed."""
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {path}, nothing enrolled:\n  " + "\n  ".join(problems))


def decided_records(path: Path, images: Path | None, known: set[str],
                    in_gallery: dict[str, str] | None = None) -> tuple[list[Record], int]:
    """The photos of a decisions.csv to enroll ("match" and "new" rows) and the number of "unsure"
    ones. Every problem is listed (file:line), so one pass fixes them all. A photo already in the
    gallery (`in_gallery`: resolved path -> individual) under the decided individual is kept (enroll
    leaves it out as already there: a second run of the same decisions is not an error). The photo's
    viewpoint and box, where the file has them (the review page writes those the queries catalog
    gave), go with it into the gallery."""
    in_gallery = in_gallery or {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"decisions file {path} does not exist")
    root = Path(images) if images is not None else path.parent
    rows = read_rows(path, DECISION_COLUMNS[:3], DECISION_COLUMNS[3:])
    problems, records, unsure = [], [], 0
    seen: Counter = Counter()

    def enrolled(row: dict, where: str, line: int, image: str, ident: str) -> None:
        """A photo to enroll, with the viewpoint and box of its row (a bad box is one more problem)."""
        try:
            records.append(row_record(row, where, line, image, root / image, ident))
        except UserError as e:
            problems.append(str(e))

    for line, row in rows:
        where = f"{path}:{line}"
        image, decision, ident = row.get("image", ""), row.get("decision", "").lower(), row.get("individual_id", "")
        seen[image] += 1
        if not image:
            problems.append(f"{where}: empty image")
        elif seen[image] == 2:
            problems.append(f"{where}: image {image} has more than one decision")
        elif decision not in DECISIONS:
            problems.append(f"{where}: decision {row.get('decision', '')!r} is not one of {', '.join(DECISIONS)}")
        elif decision == "unsure":
            unsure += 1
        elif not ident:
            problems.append(f"{where}: decision {decision} needs an individual_id")
        elif ident not in known and (problem := id_problem(ident)):  # (an older run's gallery may hold such IDs)
            problems.append(f"{where}: {problem}")
        elif ident == NEW_INDIVIDUAL:
            problems.append(f"{where}: decision {decision} needs the animal's own individual_id ({NEW_INDIVIDUAL} "
                            "is the engine's answer for an animal the gallery lacks, not an ID to give it)")
        elif (was := in_gallery.get(str((root / image).resolve()))) is not None:
            if was != ident:
                problems.append(f"{where}: image {image} is already in the gallery as individual {was}, not {ident}")
            else:
                enrolled(row, where, line, image, ident)
        elif decision == "match" and ident not in known:
            problems.append(f"{where}: individual {ident} is not in the run's gallery (for a new individual "
                            "the decision is 'new')")
        elif decision == "new" and ident in known:
            problems.append(f"{where}: individual {ident} is already in the gallery (decision 'match' adds a "
                            "photo of a known one; a new individual needs a name not yet used)")
        elif not (root / image).is_file():
            problems.append(f"{where}: image {image} not found (looked for {root / image})")
        else:
            enrolled(row, where, line, image, ident)
    refuse(path, problems)
    return records, unsure


# a photo's embedding and that of a copy of its file (another name, another folder) agree to 6 decimals in one
# precision, to 0.9996 between fp32 and bf16 (a gallery embedded on a CPU with bf16, enrolled on one without);
# two photos of the development set's galleries reach at most 0.856, of the demo's sample 0.78: this finds
# copies, not look-alikes
SAME_PHOTO_COSINE = 0.998


def copies_in_gallery(gallery: Gallery, embeddings: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each new photo (its row of `embeddings`), the gallery index of a photo it is a copy of (its
    embedding the same: the same pixels and crop), or -1."""
    out = np.full(len(embeddings), -1, np.int64)
    if len(gallery) == 0:
        return out
    G = np.asarray(gallery.embeddings, np.float32)
    for a in range(0, len(embeddings), chunk):
        S = np.asarray(embeddings[a:a + chunk], np.float32) @ G.T
        best = S.argmax(axis=1)
        hit = S[np.arange(len(best)), best] >= SAME_PHOTO_COSINE
        out[a:a + chunk][hit] = best[hit]
    return out


def write_added(run_dir: Path, records: list[Record]) -> Path:
    """Append the catalog rows (image,individual_id,viewpoint,bbox) of the photos just enrolled, by the
    file's own column names (a file begun before the bbox column gets it in its header). A photo the file
    lists already is listed once, as enrolled now: enroll writes this file before the gallery, so an enroll
    stopped between the two and run again (with an ID corrected meanwhile) finds its photos here."""
    out = RunFolder(run_dir).enrolled_path  # appended run after run
    old = out.read_text(encoding="utf-8-sig") if out.is_file() else ""
    header, _, body = old.partition("\n")
    columns = next(csv.reader([header]), []) if header.strip() else []
    columns = [c.strip() for c in columns] or ["image", "individual_id", "viewpoint"]
    if "bbox" not in columns:  # a file begun before the column: its rows read it as empty
        columns.append("bbox")
    now = {str(Path(r.path).resolve()) for r in records}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in csv.DictReader(io.StringIO(body), fieldnames=columns):
        if (row.get("image") or "").strip() not in now:  # a row of a photo enrolled now is written anew (its ID
            w.writerow(row)                              # corrected since an enroll that stopped, say)
    for r in records:
        w.writerow({"image": str(Path(r.path).resolve()), "individual_id": r.individual_id,
                    "viewpoint": r.viewpoint or "", "bbox": format_bbox(r.bbox)})
    atomic_write_bytes(out, buf.getvalue().encode("utf-8"))
    return out


def main(cfg: MatchConfig, paths: Paths, threads: int | None = None, progress: bool = True,
         precision: str = "auto") -> str:
    t0 = time.perf_counter()
    if paths.catalog is None and paths.decisions is None:
        raise UserError("enroll needs --catalog (labelled photos) or --decisions (the review page's decisions.csv)")
    if paths.catalog is not None and paths.decisions is not None:
        raise UserError("enroll takes --catalog (labelled photos) or --decisions (the review page's decisions.csv), "
                        "not both")
    set_threads(threads)
    engine = Engine.load(paths.run, precision)
    listing = engine.run.enrolled_path  # (refused before any work where it cannot be written)
    if listing.is_dir():
        raise UserError(f"{listing} is a folder: enroll lists the photos it adds in a file of that name; move the "
                        "folder away")
    check_writable(listing, "the list of enrolled photos")
    unsure = 0
    source = paths.catalog or paths.decisions
    in_gallery = {str(Path(p).resolve()): ident for p, ident in zip(engine.gallery.paths, engine.gallery.ids)}
    if paths.decisions is not None:
        given, unsure = decided_records(paths.decisions, paths.images, set(engine.gallery.ids), in_gallery)
    else:
        given = load_catalog(paths.catalog, paths.images).records
        clash = [f"{paths.catalog}:{r.line}: image {r.image} is already in the gallery as individual "
                 f"{in_gallery[k]}, not {r.individual_id}" for r in given
                 if (k := str(Path(r.path).resolve())) in in_gallery and in_gallery[k] != r.individual_id]
        refuse(paths.catalog, clash)
    records = [r for r in given if str(Path(r.path).resolve()) not in in_gallery]
    warn_lookalikes({r.individual_id for r in records}, engine.gallery.ids, f"{source} and the gallery")
    already = len(given) - len(records)
    extra = f", {unsure} unsure left out" if unsure else ""
    if not given:
        return f"nothing to enroll: {source} has no confirmed photos{extra}"
    if not records:
        return (f"nothing to enroll: all {already} confirmed photos of {source} are already in the gallery"
                f"{extra}")
    emb = engine.embed(records, cfg, progress, "embedding new photos")
    if len(emb.ok) == 0 and already and emb.known_unreadable == len(emb.skipped):
        # enrolled before, bar the photos that earlier run found unreadable (and reported)
        return (f"nothing new to enroll: {already} confirmed photos of {source} are already in the gallery and "
                f"the other {len(records)} could not be read (first: {emb.skipped[0][1]}){extra}")
    if len(emb.ok) == 0:
        raise UserError(f"none of the {len(records)} photos could be read (first: {emb.skipped[0][1]})")
    added, vectors = [records[i] for i in emb.ok], emb.embeddings
    # a copy of a gallery photo (another file name): refused under another individual, as the photo itself
    # is; under its own individual it is there already
    copies = copies_in_gallery(engine.gallery, vectors)
    refuse(source, [f"{source}:{r.line}: image {r.image} is the same photo as {engine.gallery.paths[j]} in the "
                    f"gallery, of individual {engine.gallery.ids[j]}, not {r.individual_id}"
                    for r, j in zip(added, copies) if j >= 0 and engine.gallery.ids[j] != r.individual_id])
    if (copies >= 0).any():
        keep = np.flatnonzero(copies < 0)
        already += len(added) - len(keep)
        added, vectors = [added[i] for i in keep], vectors[keep]
        if not added:
            return (f"nothing to enroll: the {counted(already, 'confirmed photo')} of {source} are already in the "
                    f"gallery (copies of its photos too){skipped_note(emb)}{extra}")
    before = set(engine.gallery.ids)
    gallery = engine.gallery.extend(Gallery.from_records(added, vectors))
    for stage in engine.stages:  # local features now, so the first match does not pay for them
        if hasattr(stage, "store"):
            stage.store.get(added, stage.workers, progress=progress, desc=f"{stage.name} of new photos")
    # the record of what was enrolled first, the gallery then: stopped between the two (Ctrl-C, a full disk),
    # the photos are listed for a new training's catalog, and a second enroll adds them to the gallery
    rows = write_added(engine.run.path, added)
    gallery.save(engine.run.gallery_path, engine.run.images_root())
    new_ids = {r.individual_id for r in added} - before
    skipped = skipped_note(emb) + (f", {already} already in the gallery" if already else "") + extra
    return (f"enrolled {counted(len(added), 'photo')} ({counted(len(new_ids), 'new individual')}{skipped}); "
            f"gallery now {len(gallery)} photos of {len(set(gallery.ids))} individuals; rows added to {rows} "
            f"({time.perf_counter() - t0:.1f} s)")
