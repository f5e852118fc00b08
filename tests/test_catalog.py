import logging
import os
import unicodedata

import pytest

from core.catalog import catalog_from_folder, load_catalog, lookalikes
from core.errors import UserError


def write(tmp_path, text, images=("a.jpg", "b.jpg")):
    for name in images:
        (tmp_path / name).write_bytes(b"x")
    p = tmp_path / "catalog.csv"
    p.write_text(text)
    return p


def test_valid_catalog_with_optional_columns(tmp_path):
    p = write(tmp_path, "image,individual_id,viewpoint,bbox,notes\na.jpg,w1,left,\"1,2,30,40\",x\nb.jpg,w2,,,\n")
    cat = load_catalog(p)
    assert [r.individual_id for r in cat.records] == ["w1", "w2"]
    assert cat.records[0].viewpoint == "left" and cat.records[1].viewpoint is None
    assert cat.records[0].bbox == (1, 2, 30, 40) and cat.records[1].bbox is None
    assert cat.records[1].line == 3 and cat.records[0].path == tmp_path / "a.jpg"
    assert cat.individuals() == ["w1", "w2"]


def test_missing_column_names_the_columns_found(tmp_path):
    p = write(tmp_path, "image,animal\na.jpg,w1\n")
    with pytest.raises(UserError, match=r"missing column\(s\) individual_id; columns found: image, animal"):
        load_catalog(p)


def test_empty_individual_id_names_the_line(tmp_path):
    p = write(tmp_path, "image,individual_id\na.jpg,w1\nb.jpg,\n")
    with pytest.raises(UserError, match=r"catalog.csv:3: empty individual_id for image b.jpg"):
        load_catalog(p)


def test_missing_image_names_the_line_and_path(tmp_path):
    p = write(tmp_path, "image,individual_id\na.jpg,w1\nnope.jpg,w2\n")
    with pytest.raises(UserError, match=r"catalog.csv:3: image nope.jpg not found") as e:
        load_catalog(p)
    assert "photos of catalog.csv not found" not in str(e.value)  # (only one is missing)
    # every missing photo's line, in one message: one pass fixes them all
    p = write(tmp_path, "image,individual_id\nnope1.jpg,w1\na.jpg,w1\nnope2.jpg,w2\nnope3.jpg,w3\n")
    with pytest.raises(UserError, match=r"catalog.csv:2: image nope1.jpg not found \(looked for .*\); 3 photos of "
                                        r"catalog.csv not found, on lines 2, 4, 5$"):
        load_catalog(p)


@pytest.mark.parametrize("ident", ["Big Mama", "F 01", "a\tb"])
def test_an_id_holding_a_space_is_refused(tmp_path, ident):
    """The predictions CSV lists five IDs separated by spaces: `Big Mama` would read as two."""
    p = write(tmp_path, f'image,individual_id\na.jpg,w1\nb.jpg,"{ident}"\n')
    with pytest.raises(UserError, match=r"catalog.csv:3: individual_id .* holds a space: the predictions list IDs "
                                        rf"separated by spaces, so an ID cannot hold one \(write it e.g. {ident.split()[0]}_"):
        load_catalog(p)
    # (a --queries CSV's labels are not read: a labelled catalog given as one is read for its photos)
    assert len(load_catalog(p, require_labels=False)) == 2


def test_a_column_named_twice_is_refused(tmp_path):
    """csv would read the last of the two: the IDs of the first column would be ignored without a word."""
    p = write(tmp_path, "image,individual_id,notes,individual_id\na.jpg,w1,old tag,TMP-17\n")
    with pytest.raises(UserError, match=r"catalog.csv: the header names column individual_id 2 times \(columns 2, "
                                        r"4\): keep one of them"):
        load_catalog(p)
    # other columns are kept and ignored, twice too
    assert load_catalog(write(tmp_path, "image,individual_id,note,note\na.jpg,w1,x,y\n")).records[0].individual_id == "w1"


def test_an_id_under_two_species_is_refused(tmp_path):
    p = write(tmp_path, "image,individual_id,species\na.jpg,F01,zebra\nb.jpg,F01,giraffe\n")
    with pytest.raises(UserError, match=r"catalog.csv:3: individual F01 is a giraffe here and a zebra on line 2: an ID "
                                        r"names one animal .*e.g. giraffe-F01"):
        load_catalog(p)
    assert len(load_catalog(p, require_labels=False)) == 2  # (a --queries CSV's labels are not read)
    p = write(tmp_path, "image,individual_id,species\na.jpg,F01,zebra\nb.jpg,F01,Zebra\n")  # (one species)
    assert [r.individual_id for r in load_catalog(p).records] == ["F01", "F01"]


def test_bad_bbox_and_duplicates(tmp_path):
    p = write(tmp_path, "image,individual_id,bbox\na.jpg,w1,\"1,2,x,4\"\n")
    with pytest.raises(UserError, match=r":2: bbox .* is not four numbers"):
        load_catalog(p)
    p = write(tmp_path, "image,individual_id\na.jpg,w1\nb.jpg,w1\na.jpg,w2\n")
    with pytest.raises(UserError, match=r":4: image a.jpg is listed more than once \(lines 2, 4"):
        load_catalog(p)
    # one photo under another spelling of its path: the same photo twice, under two IDs
    (tmp_path / "sub").mkdir()
    if os.name != "nt":
        os.symlink(tmp_path / "a.jpg", tmp_path / "link.jpg")
    for twin in ("./a.jpg", "sub/../a.jpg", str(tmp_path / "a.jpg")) + (("link.jpg",) if os.name != "nt" else ()):
        p = write(tmp_path, f"image,individual_id\na.jpg,w1\nb.jpg,w1\n{twin},w2\n")
        with pytest.raises(UserError, match=r"catalog.csv:4: image .*(a|link).jpg is the photo of line 2 \(a.jpg\) "
                                            r"under another path; one row per photo"):
            load_catalog(p)


def test_row_with_more_cells_than_the_header_names_the_line(tmp_path):
    # an unquoted bbox: its commas split it into four cells, and the row would be read shifted
    p = write(tmp_path, "image,individual_id,bbox\na.jpg,w1,\"1,2,3,4\"\nb.jpg,w2,1,2,30,40\n")
    with pytest.raises(UserError, match=r"catalog.csv:3: 6 cells where the header has 3 \(image, individual_id, "
                                        r"bbox\); a cell holding a comma .* must be in double quotes"):
        load_catalog(p)
    # trailing empty cells (as spreadsheets export them) are no extra data, and rows of empty cells no rows
    p = write(tmp_path, "image,individual_id\na.jpg,w1,,\n,,\nb.jpg,w2\n,\n")
    assert [(r.individual_id, r.line) for r in load_catalog(p).records] == [("w1", 2), ("w2", 4)]


@pytest.mark.parametrize("sep,name", [(";", "semicolon"), ("\t", "tab")])
def test_semicolon_or_tab_separated_catalog_gets_a_delimiter_hint(tmp_path, sep, name):
    p = write(tmp_path, f"image{sep}individual_id\na.jpg{sep}w1\n")
    with pytest.raises(UserError, match=f"{name}-separated: save it with commas"):
        load_catalog(p)


def test_capitalised_column_names_get_a_hint(tmp_path):
    p = write(tmp_path, "Image,Individual_ID,viewpoint\na.jpg,w1,left\n")
    with pytest.raises(UserError, match="missing column.s. image, individual_id; .*column names are lower-case: "
                                        "rename Image to image, Individual_ID to individual_id"):
        load_catalog(p)
    p = write(tmp_path, "image,individual_id,Viewpoint\na.jpg,w1,left\n")  # an optional one: not ignored
    with pytest.raises(UserError, match="column names are lower-case: rename Viewpoint to viewpoint"):
        load_catalog(p, check_files=False)


def test_images_folder_option_and_missing_catalog(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    p = tmp_path / "c.csv"
    p.write_text("image,individual_id\na.jpg,w1\n")
    assert load_catalog(p, tmp_path / "imgs").records[0].path == tmp_path / "imgs" / "a.jpg"
    with pytest.raises(UserError, match="does not exist"):
        load_catalog(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="catalog .*imgs is a folder: give the CSV file that lists its photos"):
        load_catalog(tmp_path / "imgs")


def test_a_catalog_not_saved_as_utf8_names_its_line_and_the_fix(tmp_path):
    p = tmp_path / "catalog.csv"
    p.write_bytes("image,individual_id\na.jpg,w1\nb.jpg,Müller\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"catalog.csv:3: not a UTF-8 text CSV .*Latin-1.*save it as UTF-8"):
        load_catalog(p, check_files=False)
    p.write_text("image,individual_id\na.jpg,w1\n", encoding="utf-16")
    with pytest.raises(UserError, match=r"catalog.csv: saved as UTF-16; save it as UTF-8"):
        load_catalog(p, check_files=False)
    p.write_bytes(b"\xef\xbb\xbf" + "image,individual_id\na.jpg,w1\nb.jpg,Müller\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"catalog.csv:3: not a UTF-8"):  # (lines counted after a BOM too)
        load_catalog(p, check_files=False)
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # an .xlsx renamed .csv
    with pytest.raises(UserError, match=r"catalog.csv: a spreadsheet workbook \(.xlsx, .xls\), not a CSV"):
        load_catalog(p, check_files=False)


def test_query_folder(tmp_path):
    with pytest.raises(UserError, match="has no images"):
        catalog_from_folder(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.PNG").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert [r.image for r in catalog_from_folder(tmp_path).records] == ["a.jpg", "sub/b.PNG"]
    # what a NAS or an unzipped archive adds beside the photos: thumbnails and copies, not new photos
    for extra in ("@eaDir/a.jpg/SYNOPHOTO_THUMB_S.jpg", "sub/@eaDir/b.PNG/SYNOPHOTO_THUMB_M.jpg",
                  "__MACOSX/sub/b.PNG", "$RECYCLE.BIN/old.jpg", "$Recycle.Bin/older.jpg"):
        (tmp_path / extra).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / extra).write_bytes(b"x")
    assert [r.image for r in catalog_from_folder(tmp_path).records] == ["a.jpg", "sub/b.PNG"]


@pytest.mark.skipif(os.name == "nt", reason="folder links need privileges on Windows")
def test_query_folder_follows_linked_folders_and_counts_what_it_skips(tmp_path, caplog):
    q, elsewhere = tmp_path / "q", tmp_path / "elsewhere"
    (q / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for f in (q / "a.jpg", q / "sub" / "b.jpg", elsewhere / "c.jpg", q / "anim.gif", q / "x.heic", q / "._a.jpg"):
        f.write_bytes(b"x")
    (q / "notes.txt").write_text("x")
    os.symlink(elsewhere, q / "linked")
    os.symlink(q, q / "sub" / "loop")  # a link back up the tree: each real folder is read once
    os.symlink(tmp_path / "moved.jpg", q / "gone.jpg")  # a link to nothing: listed (matching says it is unreadable)
    with caplog.at_level(logging.WARNING):
        records = catalog_from_folder(q).records
    assert [r.image for r in records] == ["a.jpg", "gone.jpg", "linked/c.jpg", "sub/b.jpg"]  # no hidden "._a.jpg"
    assert "2 photo(s) in" in caplog.text and "type not read here, skipped: 1 .gif, 1 .heic (read: " in caplog.text
    assert ".txt" not in caplog.text  # (not a photo: only counted at the info level)


def test_a_utf8_bom_is_read_as_usual(tmp_path):
    p = write(tmp_path, "\ufeffimage,individual_id\na.jpg,w1\n")
    assert [(r.image, r.individual_id) for r in load_catalog(p).records] == [("a.jpg", "w1")]


def test_lookalike_ids_differ_only_in_case_or_accent_encoding():
    nfc, nfd = unicodedata.normalize("NFC", "Zoé"), unicodedata.normalize("NFD", "Zoé")
    assert nfc != nfd
    assert lookalikes(["IND001", "ind002", nfd, "F1"], ["ind001", nfc, "F-1"]) == [("IND001", "ind001"), (nfd, nfc)]
    assert lookalikes(["A", "a", "b"]) == [("a", "A")]
    assert lookalikes(["ind001"], ["ind001"]) == []  # (the same ID is no lookalike)
