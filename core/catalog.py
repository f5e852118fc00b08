"""The catalog CSV: `image,individual_id` plus optional `species`, `viewpoint`, `bbox`.

`image` is a path relative to the images folder (default: the CSV's own folder). `bbox` is
`x,y,w,h` in pixels and crops the photo before anything else. `species` is read to check that an ID
names one animal (the same ID under two species is refused); queries are not told apart by species,
so a gallery of several species is matched as one (give each species its own run to keep them apart).
Other columns are kept and ignored.
Every problem is reported with the file and line it comes from.
"""
from __future__ import annotations

import csv
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from core.errors import UserError
from core.metrics import NEW_INDIVIDUAL

log = logging.getLogger(__name__)

REQUIRED = ("image", "individual_id")
OPTIONAL = ("viewpoint", "bbox", "species")  # read where the header names them (lower-case)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# photo formats a folder of new photos may hold that are not read: skipped with a warning
UNREAD_PHOTO_SUFFIXES = {".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".psd", ".dng", ".cr2", ".cr3", ".nef",
                         ".arw", ".orf", ".rw2", ".raf", ".pef", ".srw"}


@dataclass(frozen=True)
class Record:
    image: str  # as written in the CSV
    path: Path  # resolved file
    individual_id: str | None  # None for unlabelled queries
    viewpoint: str | None = None
    bbox: tuple[int, int, int, int] | None = None
    line: int = 0  # 1-based line in the CSV (the header is line 1)
    key: str | None = None  # cache key recorded when the photo entered a gallery (see core/cache.py)

    @property
    def line_note(self) -> str:
        """After a message about the photo: " (line N of its CSV)" where a catalog lists it, "" for one of a folder."""
        return f" (line {self.line} of its CSV)" if self.line else ""


@dataclass
class Catalog:
    source: Path | None
    records: list[Record] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def individuals(self) -> list[str]:
        return sorted({r.individual_id for r in self.records if r.individual_id is not None})


def _parse_bbox(text: str, where: str) -> tuple[int, int, int, int] | None:
    text = text.strip().strip('"').strip("[]()")
    if not text:
        return None
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        x, y, w, h = (int(round(float(p))) for p in parts)
    except (ValueError, OverflowError):  # OverflowError: inf
        raise UserError(f"{where}: bbox {text!r} is not four numbers x,y,w,h") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise UserError(f"{where}: bbox {text!r} needs x,y >= 0 and w,h > 0")
    return x, y, w, h


def id_problem(ident: str) -> str | None:
    """Why `ident` cannot be an individual ID, or None: the predictions CSV lists the five answers separated
    by spaces, so an ID holding a space (or a tab) would read as two."""
    if any(c.isspace() for c in ident):
        return (f"individual_id {ident!r} holds a space: the predictions list IDs separated by spaces, so an ID "
                f"cannot hold one (write it e.g. {'_'.join(ident.split())})")
    return None


def lookalikes(ids: Iterable[str], known: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(id, other) pairs of distinct IDs that differ only in letter case or in how their accents are encoded
    (Unicode NFC / NFD: `Zoé` typed on two systems): most likely one animal spelled twice. Among `ids` and
    between `ids` and `known` (e.g. a gallery's); each id once, with the first other found."""
    def key(ident: str) -> str:
        return unicodedata.normalize("NFC", ident).casefold()

    first: dict[str, str] = {}
    for ident in sorted(set(known)):
        first.setdefault(key(ident), ident)
    out = []
    for ident in sorted(set(ids) - set(known)):
        other = first.setdefault(key(ident), ident)
        if other != ident:
            out.append((ident, other))
    return out


def warn_lookalikes(ids: Iterable[str], known: Iterable[str] = (), where: str = "the catalog") -> None:
    """A warning naming the `lookalikes` (up to five), each of which is taken as an animal of its own."""
    pairs = lookalikes(ids, known)
    if pairs:
        shown = ", ".join(f"{a!r} / {b!r}" for a, b in pairs[:5]) + (", ..." if len(pairs) > 5 else "")
        log.warning("%d individual ID(s) in %s differ from another only in letter case or accent encoding, and each "
                    "is taken as an animal of its own: %s (spell each animal one way)", len(pairs), where, shown)


def queryable(ids: Iterable[str]) -> list[str]:
    """The individuals of a gallery whose photos are of `ids` that have 2 or more photos, so that one
    can be a query against the others (sorted): those train-siamese may hold out of training."""
    return sorted(i for i, n in Counter(ids).items() if n >= 2)


def format_bbox(bbox: tuple[int, int, int, int] | None) -> str:
    """A bbox as the catalog writes it ("x,y,w,h"; empty for none), which row_record reads back."""
    return "" if bbox is None else ",".join(str(int(v)) for v in bbox)


def row_record(row: dict[str, str], where: str, line: int, image: str, path: Path,
               individual_id: str | None) -> Record:
    """The photo of a CSV row with the row's viewpoint (lower-case) and bbox, read as the catalog
    reads them (also from decisions.csv); a bad bbox raises UserError naming `where`."""
    return Record(image=image, path=path, individual_id=individual_id,
                  viewpoint=(row.get("viewpoint") or "").lower() or None,
                  bbox=_parse_bbox(row.get("bbox", ""), where), line=line)


def _not_utf8(csv_path: Path, error: UnicodeDecodeError) -> str:
    """Where a CSV stops being UTF-8 (the line), and what it was saved as when that is plain."""
    raw = Path(csv_path).read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return f"{csv_path}: saved as UTF-16; save it as UTF-8 (in a spreadsheet: CSV UTF-8)"
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # (a UTF-8 BOM: lines count from after it)
    try:
        raw.decode("utf-8")
        at = ""
    except UnicodeDecodeError as e:
        at = ":" + str(raw[:e.start].count(b"\n") + 1)
    return (f"{csv_path}{at}: not a UTF-8 text CSV ({error.reason}; a file saved as Latin-1 or Windows-1252 "
            f"reads so): save it as UTF-8 (in a spreadsheet: CSV UTF-8)")


def read_rows(csv_path: Path, required: tuple[str, ...],
              optional: tuple[str, ...] = ()) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a UTF-8 CSV with a header naming at least `required`; cells stripped.
    Errors name the file (and the columns found, with a hint for a semicolon- or tab-separated file,
    or for a column named in other case, e.g. `Image`; one of the `optional` ones, e.g. `Viewpoint`,
    would otherwise be read as no column at all)."""
    with open(csv_path, "rb") as f:
        if f.read(4) in (b"PK\x03\x04", b"\xd0\xcf\x11\xe0"):  # zip (.xlsx) or OLE (.xls) signature
            raise UserError(f"{csv_path}: a spreadsheet workbook (.xlsx, .xls), not a CSV: save it as CSV UTF-8")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = []
            for raw in reader:  # line_num counts physical lines: right after blank or multi-line cells
                # more (non-empty) cells than the header names: a comma inside an unquoted cell cut it
                if None in raw and any((c or "").strip() for c in raw[None]):
                    raise UserError(f"{csv_path}:{reader.line_num}: {len(columns) + len(raw[None])} cells where the "
                                    f"header has {len(columns)} ({', '.join(columns)}); a cell holding a comma "
                                    f"(a file name, a bbox) must be in double quotes")
                row = {(key or "").strip(): (val or "").strip() if isinstance(val, str) else ""
                       for key, val in raw.items()}
                if any(row.values()):  # a row of empty cells (",,", as spreadsheets save them) is no row
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError as e:
        raise UserError(_not_utf8(csv_path, e)) from None
    except csv.Error as e:
        raise UserError(f"{csv_path}: malformed CSV ({e})") from None
    twice = next((c for c in (*required, *optional) if columns.count(c) > 1), None)
    if twice is not None:  # csv reads the last such cell of each row: the first column would be ignored
        at = [str(k + 1) for k, c in enumerate(columns) if c == twice]
        raise UserError(f"{csv_path}: the header names column {twice} {len(at)} times (columns {', '.join(at)}): "
                        "keep one of them, or rename the others")
    missing = [c for c in required if c not in columns]
    # names are lower-case: `Image` is not `image`
    cased = [(c, k) for k in (*missing, *optional) for c in columns if c != k and c.lower() == k]
    rename = "column names are lower-case: rename " + ", ".join(f"{c} to {k}" for c, k in cased)
    if missing:
        found = ", ".join(columns) if columns else "none (empty file?)"
        sep = next((name for ch, name in ((";", "semicolon"), ("\t", "tab")) if len(columns) == 1 and ch in columns[0]),
                   None)
        hint = f"; the file looks {sep}-separated: save it with commas as the delimiter" if sep else ""
        if cased and not sep:
            hint = f"; {rename}"
        raise UserError(f"{csv_path}: missing column(s) {', '.join(missing)}; columns found: {found}{hint}")
    if not rows:
        raise UserError(f"{csv_path}: no rows after the header")
    if cased:
        raise UserError(f"{csv_path}: {rename}")
    return rows


def load_catalog(csv_path: Path, images_dir: Path | None = None, require_labels: bool = True,
                 check_files: bool = True, allow_new: bool = False, what: str = "catalog") -> Catalog:
    """`allow_new`: labelled queries (evaluate) may carry the truth `new_individual`. `what`: the file as
    the user gave it, in errors (e.g. "--queries")."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        raise UserError(f"{what} {csv_path} is a folder: give the CSV file that lists its photos")
    if not csv_path.is_file():
        raise UserError(f"{what} {csv_path} does not exist")
    root = Path(images_dir) if images_dir is not None else csv_path.parent
    if not root.is_dir():
        raise UserError(f"images folder {root} does not exist")
    rows = read_rows(csv_path, REQUIRED if require_labels else ("image",), OPTIONAL)
    records, missing = [], []
    species: dict[str, tuple[str, int]] = {}  # individual -> (species, line) where the catalog names one
    for line, row in rows:
        where = f"{csv_path}:{line}"
        image = row.get("image", "")
        if not image:
            raise UserError(f"{where}: empty image path")
        ind = row.get("individual_id", "") or None
        if require_labels and ind is None:
            raise UserError(f"{where}: empty individual_id for image {image}")
        if require_labels and ind == NEW_INDIVIDUAL and not allow_new:
            raise UserError(f"{where}: {NEW_INDIVIDUAL!r} is the answer token for unseen animals, "
                            f"not an individual ID")
        if require_labels and (problem := id_problem(ind)):  # (a --queries CSV's labels are not read)
            raise UserError(f"{where}: {problem}")
        kind = row.get("species", "")
        if require_labels and kind and ind != NEW_INDIVIDUAL:
            other, at = species.setdefault(ind, (kind, line))
            if other.casefold() != kind.casefold():
                raise UserError(f"{where}: individual {ind} is a {kind} here and a {other} on line {at}: an ID names "
                                f"one animal in a gallery (photos are not told apart by species: give each species "
                                f"its own run, or each animal its own ID, e.g. {kind}-{ind})")
        path = root / image
        if check_files and not path.is_file():
            missing.append((where, image, path))
            continue
        records.append(row_record(row, where, line, image, path, ind))
    if missing:
        where, image, path = missing[0]
        more = (f"; {len(missing)} photos of {csv_path.name} not found, on lines "
                f"{', '.join(w.rsplit(':', 1)[1] for w, _, _ in missing[:10])}{', ...' if len(missing) > 10 else ''}"
                if len(missing) > 1 else "")
        raise UserError(f"{where}: image {image} not found (looked for {path}){more}")
    dup = [img for img, n in Counter(r.image for r in records).items() if n > 1]
    if dup:
        at = [r.line for r in records if r.image == dup[0]]
        raise UserError(f"{csv_path}:{at[1]}: image {dup[0]} is listed more than once (lines "
                        f"{', '.join(map(str, at))}; {len(dup)} duplicated path(s)); one row per photo")
    if check_files:  # one photo under two spellings ("a.jpg", "./a.jpg", an absolute path, a link)
        first: dict[str, Record] = {}
        for r in records:
            same = first.setdefault(os.path.normcase(os.path.realpath(r.path)), r)
            if same is not r:
                raise UserError(f"{csv_path}:{r.line}: image {r.image} is the photo of line {same.line} "
                                f"({same.image}) under another path; one row per photo")
    return Catalog(source=csv_path, records=records)


# folders that systems and file servers make beside the user's photos (a Synology NAS keeps a thumbnail of each
# photo in @eaDir/, macOS's zip files a copy of each in __MACOSX/): never photos to match
# (compared in any case: NTFS spells the recycle bin $Recycle.Bin, FAT $RECYCLE.BIN)
SYSTEM_FOLDERS = {name.casefold() for name in ("@eaDir", "#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot",
                                               "__MACOSX", "$RECYCLE.BIN", "System Volume Information")}


def _files_below(folder: Path) -> list[Path]:
    """Every file below `folder`, through linked folders too (each real folder once), and links to nothing,
    hidden files (".DS_Store", "._x.jpg" of macOS) and the folders of SYSTEM_FOLDERS left out."""
    out, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.casefold() not in SYSTEM_FOLDERS)
        # (a link to nothing is listed too: a photo of the folder the user expects answered, said unreadable)
        out += [Path(top) / n for n in names if not n.startswith(".") and (
            os.path.isfile(os.path.join(top, n)) or not os.path.exists(os.path.join(top, n)))]
    return out


def catalog_from_folder(folder: Path) -> Catalog:
    """Unlabelled queries: every image file below `folder` (sorted, recursive)."""
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"test folder {folder} is a file: give the folder that holds the new photos")
    if not folder.is_dir():
        raise UserError(f"test folder {folder} does not exist")
    found = _files_below(folder)
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
    # photos of a type not read here are said (a warning); other files (notes, CSVs, this engine's
    # predictions and review pages) are not photos, and only counted in the log
    other = Counter(p.suffix.lower() for p in found if p.suffix.lower() not in IMAGE_SUFFIXES)
    photos = {k: n for k, n in other.items() if k in UNREAD_PHOTO_SUFFIXES}
    if photos:
        log.warning("%d photo(s) in %s are of a type not read here, skipped: %s (read: %s; convert them to JPEG)",
                    sum(photos.values()), folder, ", ".join(f"{n} {suffix}" for suffix, n in sorted(photos.items())),
                    ", ".join(sorted(IMAGE_SUFFIXES)))
    if sum(other.values()) > sum(photos.values()):
        log.info("%d file(s) in %s that are not photos skipped", sum(other.values()) - sum(photos.values()), folder)
    # the thumbnails of a review page written into the folder (`match --report`: X.html + X_files/)
    # are not new photos
    pages = {d for p in files for d in p.parents
             if d.name.endswith("_files") and folder in d.parents and d.with_name(d.name[:-6] + ".html").is_file()}
    if pages:
        kept = [p for p in files if not any(d in p.parents for d in pages)]
        log.info("%d thumbnail(s) of review pages in %s skipped (%s)", len(files) - len(kept), folder,
                 ", ".join(sorted(str(d.relative_to(folder)) for d in pages)))
        files = kept
    if not files:
        raise UserError(f"test folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Catalog(source=None, records=[Record(image=p.relative_to(folder).as_posix(), path=p,
                                                individual_id=None) for p in files])
