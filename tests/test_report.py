"""engine/report.py: the review page (its data, thumbnails and size), and the page itself in
headless Chromium: rendering, decisions by keyboard, storage across a reload, the CSV export."""
from __future__ import annotations

import base64
import csv
import json
import re

import cv2
import numpy as np
import pytest

from core.metrics import NEW_INDIVIDUAL
from engine.report import ReportCandidate, ReportConfig, ReportQuery, load_rgb, write_report


def page_data(html: str) -> dict:
    m = re.search(r'<script id="review-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def _texture(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def test_load_rgb_variants(tmp_path):
    rgb = _texture(40, 60, 0)
    p = tmp_path / "x.png"
    cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(load_rgb(p), rgb)                 # BGR on disk -> RGB back
    assert load_rgb(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert load_rgb(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert load_rgb(tmp_path / "bad.jpg") is None
    assert load_rgb(tmp_path / "missing.jpg") is None
    assert load_rgb(None) is None


@pytest.fixture
def report(tmp_path):
    disk = _texture(300, 500, 1)
    path_img = tmp_path / "gallery one.png"
    cv2.imwrite(str(path_img), cv2.cvtColor(disk, cv2.COLOR_RGB2BGR))
    grey_q = np.full((480, 640, 3), 128, np.uint8)
    grey_g = np.full((600, 400, 3), 128, np.uint8)
    inl = np.array([[100, 100, 50, 60], [500, 400, 300, 500], [320, 240, 200, 300]], float)

    def cand(ident, fused, img, name, inliers=None):
        return ReportCandidate(ident, fused, {"embedding": 0.8, "pair": fused, "keypoints": None},
                               img, name, inliers)

    entries = [
        ReportQuery(grey_q, "sure.jpg", "W1", 0.97,
                    [cand("W1", 0.97, grey_g, "g1.jpg", inl), cand("W2", 0.2, path_img, "g2.jpg")],
                    ["W1", NEW_INDIVIDUAL, "W2"]),
        ReportQuery(_texture(200, 200, 2), "<script>alert(1)</script>&.jpg", NEW_INDIVIDUAL, 0.41,
                    [cand('W"3', 0.41, tmp_path / "nowhere.jpg", "g<3>.jpg")], [NEW_INDIVIDUAL, 'W"3'],
                    viewpoint="left", bbox="10,20,150,90"),
        ReportQuery(tmp_path / "unreadable.jpg", "doubt.jpg", "W9", 0.05,
                    [cand("W4", 0.05, disk, "g4.jpg", inl), cand("W9", 0.04, disk, "g9.jpg")], None),
        ReportQuery(_texture(100, 150, 3), "unlabelled.jpg", None, float("nan"), [], None),
    ]
    return write_report(tmp_path / "r.html", entries, title="Test <run>")


def test_queries_sorted_by_confidence_with_their_evidence(report):
    html = report.read_text(encoding="utf-8")
    data = page_data(html)
    names = [q["name"] for q in data["queries"]]
    assert names == ["unlabelled.jpg", "doubt.jpg", "<script>alert(1)</script>&.jpg", "sure.jpg"]  # NaN first
    assert "4 queries · 3 with known truth, 2 right at rank 1" in html
    sure = data["queries"][3]
    assert sure["answer"] == ["W1", NEW_INDIVIDUAL, "W2"] and sure["truth"] == "W1"
    w1 = sure["candidates"][0]
    assert w1["stages"] == {"embedding": 0.8, "pair": 0.97, "keypoints": None} and w1["n_inliers"] == 3
    # inliers in thumbnail pixels: query 480x640 -> 168x224 (x0.35), gallery 600x400 -> 176x117 (x0.2933)
    assert w1["thumb"]["w"] == 117 and sure["thumb"]["w"] == 224
    first = np.frombuffer(base64.b64decode(w1["inliers"]), np.uint8).reshape(-1, 4)
    assert first.shape == (3, 4) and first[0].tolist() == [35, 35, 15, 18]  # 35.0, 35.0, 14.6, 17.6
    assert data["queries"][1]["truth_missing"] is False and data["queries"][0]["candidates"] == []
    assert data["queries"][1]["thumb"] is None  # unreadable photo: the page shows a placeholder


def test_thumbnails_are_small_webp_files_stored_once(report):
    folder = report.with_name("r_files")
    files = sorted(folder.iterdir())
    # readable photos: 3 queries + 2 distinct gallery photos (the texture `disk` is shown 3 times,
    # once from its file, stored once; two candidates are a missing and an unreadable file)
    shapes = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        assert f.suffix == ".webp" and img is not None
        shapes.append(img.shape[:2])
    assert len(files) == 5, shapes
    assert max(max(s) for s in shapes) <= 224
    data = page_data(report.read_text())
    srcs = {c["thumb"]["src"] for q in data["queries"] for c in q["candidates"] if c["thumb"]}
    assert all(s.startswith("r_files/") for s in srcs)


def test_text_is_escaped_and_nothing_is_fetched(report):
    html = report.read_text()
    assert html.count("</script>") == 2                   # the data cannot close its element
    assert "<script>alert" not in html and "Test &lt;run&gt;" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no URL outside the page's folder


def test_rewriting_replaces_the_folder(report, tmp_path):
    (tmp_path / "r_files" / ".DS_Store").write_bytes(b"")  # what a file browser leaves there is no reason to refuse
    again = write_report(report, [ReportQuery(_texture(50, 50, 9), "one.jpg", None, 0.5, [])])
    assert len(list(again.with_name("r_files").iterdir())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r_files")]  # no temp folder left


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    """`<stem>_files/` is replaced only where it holds an earlier page's thumbnails, never the user's files."""
    from core.errors import UserError
    (tmp_path / "r_files").mkdir()
    for mine in ("notes.txt", "photo.webp"):  # (a WebP photo of the user's is not named like a thumbnail)
        (tmp_path / "r_files" / mine).write_text("mine")
        with pytest.raises(UserError, match="which holds other files"):
            write_report(tmp_path / "r.html", [ReportQuery(_texture(50, 50, 9), "one.jpg", None, 0.5, [])])
        assert (tmp_path / "r_files" / mine).read_text() == "mine" and not (tmp_path / "r.html").exists()
        (tmp_path / "r_files" / mine).unlink()


def test_200_queries_of_real_photos_fit_in_6_mb(nyala, tmp_path):
    """Worst case: every candidate a different gallery photo (no thumbnail shared)."""
    files = sorted((nyala / "images").rglob("*.jpg"))
    assert len(files) >= 1200
    entries = [ReportQuery(files[i], f"q{i}", None, i / 200,
                           [ReportCandidate(f"W{j}", 0.5, {"embedding": 0.5}, files[200 + 5 * i + j],
                                            f"g{j}", np.array([[10.0, 10, 20, 20]] * 30)) for j in range(5)])
               for i in range(200)]
    out = write_report(tmp_path / "r.html", entries, "size")
    page = out.stat().st_size
    total = page + sum(f.stat().st_size for f in out.with_name("r_files").iterdir())
    assert total <= 6e6 and page < 0.5e6, (page, total)  # measured 0.3 MB + 5.2 MB of thumbnails


# ---------------------------------------------------------------- in a real browser
def open_page(browser, path, tmp_path):
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    return ctx, page, errors


def test_page_renders_and_records_decisions_by_keyboard(browser, report, tmp_path):
    ctx, page, errors = open_page(browser, report, tmp_path)
    try:
        assert page.locator("section.query").count() == 4
        assert "4 of 4" not in page.text_content("#progress")
        # first query (unlabelled, no candidates): unsure with u; second (doubt.jpg): candidate 2 with 2
        page.keyboard.press("u")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("2")
        page.keyboard.press("ArrowDown")  # the escaped name: a new individual typed after n
        page.keyboard.press("n")
        page.keyboard.type("Nyx, the 2nd")
        page.keyboard.press("Enter")
        page.locator("#q-2 [data-field=note]").fill('says "hi"')
        page.locator("#q-2 [data-field=note]").press("Enter")
        assert page.text_content("#progress") == "3 of 4 decided"
        assert page.locator("#q-1 figure.chosen").count() == 1
        assert page.locator("#q-3 .evidence svg line").count() == 3  # rank 1 of sure.jpg: 3 inliers drawn
        page.reload()  # decisions survive in the browser's storage
        assert page.text_content("#progress") == "3 of 4 decided"
        # (spaces become _: an ID holds none, the predictions list IDs separated by spaces)
        assert page.locator("#q-2 [data-field=new-name]").input_value() == "Nyx,_the_2nd"
        with page.expect_download() as dl:
            page.click("#export")
        assert dl.value.suggested_filename == "decisions.csv"
        target = tmp_path / "decisions.csv"
        dl.value.save_as(target)
        rows = list(csv.DictReader(open(target, newline="", encoding="utf-8")))
        assert [(r["image"], r["decision"], r["individual_id"], r["note"]) for r in rows] == [
            ("unlabelled.jpg", "unsure", "", ""), ("doubt.jpg", "match", "W9", ""),
            ("<script>alert(1)</script>&.jpg", "new", "Nyx,_the_2nd", 'says "hi"')]
        # the photo's viewpoint and box as the queries catalog gave them, for enroll
        assert [(r["viewpoint"], r["bbox"]) for r in rows] == [("", ""), ("", ""), ("left", "10,20,150,90")]
        assert errors == []
    finally:
        ctx.close()


def test_pages_of_queries_and_first_screen_time(browser, tmp_path):
    entries = [ReportQuery(_texture(120, 160, i), f"q{i:03d}.jpg", None, i / 50,
                           [ReportCandidate(f"W{j}", 0.5, {"embedding": 0.5}, _texture(90, 120, 100 + j), f"g{j}")
                            for j in range(5)]) for i in range(50)]
    path = write_report(tmp_path / "p.html", entries, config=ReportConfig(page_size=20))
    ctx, page, errors = open_page(browser, path, tmp_path)
    try:
        assert page.locator("section.query").count() == 20  # one page rendered, not all 50
        assert page.text_content("#pageinfo") == "page 1 of 3"
        page.keyboard.press("ArrowRight")
        assert page.text_content("#pageinfo") == "page 2 of 3"
        assert page.locator("section.query h2").first.text_content() == "21. q020.jpg"
        page.keyboard.press("ArrowLeft")
        assert page.locator("section.query.current h2").text_content() == "1. q000.jpg"
        assert errors == []
    finally:
        ctx.close()


def test_a_reduced_photo_places_inliers_by_its_full_size(tmp_path):
    # a 1200x1600 photo given as its 300x400 reduction: thumbnails from the reduction, inlier lines
    # at the places of the full photo (x 800 -> half the 224-pixel thumbnail)
    small = _texture(300, 400, 4)
    inl = np.array([[800.0, 600.0, 800.0, 600.0]])
    entry = ReportQuery((small, (1200, 1600)), "q.jpg", "W1", 0.9,
                        [ReportCandidate("W1", 0.9, {}, lambda: (small, (1200, 1600)), "g.jpg", inl, "g")])
    data = page_data(write_report(tmp_path / "r.html", [entry]).read_text())
    q = data["queries"][0]
    assert q["thumb"]["w"] == 224 and q["candidates"][0]["thumb"]["w"] == 176
    line = np.frombuffer(base64.b64decode(q["candidates"][0]["inliers"]), np.uint8).tolist()
    assert line == [112, 84, 88, 66]
