"""engine/report.py: the self-contained HTML report."""
from __future__ import annotations

import base64
import re

import cv2
import numpy as np
import pytest

from core.metrics import NEW_INDIVIDUAL
from engine.report import ReportCandidate, ReportConfig, ReportQuery, draw_matches, load_rgb, write_report

DATA_URI = re.compile(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')


def _decode(b64: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64, validate=True), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def _texture(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _saturated(img_bgr) -> np.ndarray:
    return cv2.cvtColor(img_bgr, cv2.COLOR_BGR2HSV)[:, :, 1] > 80


def test_draw_matches_scales_coordinates():
    q = np.full((100, 200, 3), 128, np.uint8)       # query scaled x2.4 to 240 rows
    g = np.full((400, 300, 3), 128, np.uint8)       # gallery scaled x0.6
    pic = draw_matches(q, g, np.array([[50.0, 50.0, 150.0, 200.0]]), height=240)
    assert pic.shape == (240, 480 + 8 + 180, 3)
    sat = cv2.cvtColor(pic, cv2.COLOR_RGB2HSV)[:, :, 1] > 80
    a, b = (120, 120), (480 + 8 + 90, 120)           # (x, y) of both ends in the picture
    assert sat[a[1], a[0]] and sat[b[1], b[0]]
    assert sat[120, (a[0] + b[0]) // 2]              # on the line
    assert not sat[30, 30] and not sat[200, 600]     # away from it the grey images are untouched


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
                    [cand('W"3', 0.41, tmp_path / "nowhere.jpg", "g<3>.jpg")], [NEW_INDIVIDUAL, 'W"3']),
        ReportQuery(tmp_path / "unreadable.jpg", "doubt.jpg", "W9", 0.05,
                    [cand("W4", 0.05, disk, "g4.jpg", inl), cand("W9", 0.04, disk, "g9.jpg")], None),
        ReportQuery(_texture(100, 150, 3), "unlabelled.jpg", None, float("nan"), [], None),
    ]
    out = write_report(tmp_path / "r.html", entries, title="Test <run>")
    return out.read_text(encoding="utf-8")


def test_one_section_per_query_sorted_by_confidence(report):
    assert report.count('<section class="query"') == 4
    conf = re.findall(r'<section class="query" id="q-(\d+)" data-confidence="([^"]+)"', report)
    assert [c[0] for c in conf] == ["0", "1", "2", "3"]
    assert [c[1] for c in conf] == ["not run", "0.050000", "0.410000", "0.970000"]  # NaN = most doubtful
    assert all(f'href="#q-{i}"' in report for i in range(4))
    assert "4 queries" in report and "3 with known truth, 2 right at rank 1" in report


def test_images_are_valid_inline_jpegs(report):
    assert "http://" not in report and "https://" not in report
    assert re.findall(r'src="(?!data:)', report) == []
    uris = DATA_URI.findall(report)
    # readable photos: 3 queries + 4 candidates (two are missing or unreadable files)
    imgs = [_decode(u) for u in uris]
    thumbs = [im for im in imgs if max(im.shape[:2]) <= 240]
    assert len(thumbs) == 7
    assert {im.shape for im in thumbs} >= {(180, 240, 3), (144, 240, 3), (200, 200, 3), (100, 150, 3)}
    matches = [im for im in imgs if max(im.shape[:2]) > 240]
    # one match picture: the doubtful query's photo is unreadable, so only "sure.jpg" gets one
    assert len(matches) == 1 and matches[0].shape == (240, 320 + 8 + 160, 3)
    assert _saturated(matches[0]).sum() > 100      # lines drawn over two grey images


def test_text_is_escaped_and_truth_marked(report):
    assert "<script>" not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;.jpg" in report
    assert "W&quot;3" in report and "g&lt;3&gt;.jpg" in report and "Test &lt;run&gt;" in report
    assert report.count('class="cand correct"') == 2            # W1 on "sure", W9 on "doubt"
    assert "image unavailable" in report                        # unreadable photos: placeholder
    assert "not run" in report                                  # keypoints stage None
    assert "3 keypoint inliers" in report


def _photo_like(h, w, seed):
    # smooth shapes plus sensor grain, roughly like a photo for JPEG's purposes
    base = cv2.resize(_texture(h // 16, w // 16, seed), (w, h), interpolation=cv2.INTER_CUBIC)
    grain = np.random.default_rng(seed).normal(scale=6.0, size=base.shape)
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def test_report_size_is_small(tmp_path):
    entries = [ReportQuery(_photo_like(600, 800, i), f"q{i}", None, i / 10,
                           [ReportCandidate(f"W{j}", 0.5, {"embedding": 0.5}, _photo_like(480, 640, 10 + j),
                                            f"g{j}", np.array([[10.0, 10, 20, 20]] * 30)) for j in range(5)])
               for i in range(3)]
    out = write_report(tmp_path / "r.html", entries, "size", ReportConfig())
    text = out.read_text()
    assert text.count('<figure class="match">') == 15
    uris = DATA_URI.findall(text)
    assert len(uris) == 18 + 15
    # thumbnails and match pictures, not the photos: a few tens of kB each at JPEG quality 80
    assert max(len(u) for u in uris) < 60_000 and out.stat().st_size < 33 * 30_000
