"""Keypoint extraction, matching and the double homography, on images whose answer is known."""
from __future__ import annotations

from dataclasses import asdict, replace

import cv2
import numpy as np
import pytest

from keypoints.features import (KeypointConfig, Keypoints, PRESETS, config_from_dict, config_to_dict, extract_keypoints, extract_many,
                                root_sift)
from keypoints.homography import HomographyConfig, apply_h, double_homography
from keypoints.matching import match_descriptors
from keypoints.verify import (FEATURE_NAMES, N_FEATURES, VERIFY_PRESETS, VerifyConfig, feature_matrix, same_photo,
                             verify_pair, verify_pairs)
from tests.conftest import NYALA, PHOTO_SIZE as SIZE

F = {n: i for i, n in enumerate(FEATURE_NAMES)}


def corners(h: int, w: int) -> np.ndarray:
    return np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=float)


@pytest.fixture(scope="module")
def kps(photos):
    return {k: extract_keypoints(v) for k, v in photos.items()}


# ---------------------------------------------------------------------------- extraction
def test_root_sift_is_sqrt_of_l1_normalised():
    d = np.random.default_rng(0).integers(0, 256, (20, 128)).astype(np.float32)
    r = root_sift(d)
    np.testing.assert_allclose(r, np.sqrt(d / d.sum(1, keepdims=True)), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, rtol=1e-5)


def test_keypoint_positions_are_in_original_pixels():
    # one dark blob on a large light image: downscaled 4x for SIFT, it must come back where drawn
    img = np.full((1536, 2048), 200, np.uint8)
    cv2.circle(img, (1400, 600), 60, 40, -1)
    img = cv2.GaussianBlur(img, (0, 0), 8)
    kp = extract_keypoints(img, KeypointConfig(max_side=512, clahe_clip=0))
    assert kp.image_size == (1536, 2048)
    assert len(kp) >= 1
    d = np.linalg.norm(kp.xy - [1400, 600], axis=1)
    assert d.min() < 4.0  # 1 working pixel = 4 original pixels


def _is_subset(small: Keypoints, big: Keypoints) -> bool:
    """Every keypoint of `small` is one of `big` (same position and descriptor)."""
    for xy, desc in zip(small.xy, small.desc):
        near = np.linalg.norm(big.xy - xy, axis=1) < 1e-3
        if not near.any() or np.abs(big.desc[near] - desc).max(axis=1).min() > 1e-5:
            return False
    return True


@pytest.mark.parametrize("preset", ["default", "rotation-invariant"])
def test_keypoint_cap_keeps_the_strongest_subset(photos, preset):
    full = extract_keypoints(photos["a1"], replace(PRESETS[preset], max_keypoints=0))
    k50 = extract_keypoints(photos["a1"], replace(PRESETS[preset], max_keypoints=50))
    k100 = extract_keypoints(photos["a1"], replace(PRESETS[preset], max_keypoints=100))
    assert len(full) > 100 and len(k50) == 50 and len(k100) == 100
    # ranked by one score: the 50 strongest are among the 100 strongest, which are among all
    assert _is_subset(k50, k100) and _is_subset(k100, full)
    # stored strongest first: truncating a cached set is the same as extracting with a lower cap
    assert _is_subset(k100.top(50), k50) and _is_subset(full.top(100), k100)


def test_arrays_round_trip(kps):
    k = kps["a1"]
    back = Keypoints.from_arrays(k.to_arrays())
    assert np.array_equal(back.xy, k.xy) and np.array_equal(back.desc, k.desc)
    assert back.image_size == k.image_size and back.desc.dtype == np.float32
    half = Keypoints.from_arrays(k.to_arrays(desc_dtype="float16"))
    assert np.abs(half.desc - k.desc).max() < 1e-3


def test_gray_and_rgb_input_agree(photos):
    gray = cv2.cvtColor(photos["a1"], cv2.COLOR_RGB2GRAY)
    a, b = extract_keypoints(photos["a1"]), extract_keypoints(gray)
    assert np.array_equal(a.xy, b.xy) and np.array_equal(a.desc, b.desc)


def test_parallel_extraction_matches_serial(photos):
    ims = list(photos.values())
    serial = [extract_keypoints(im) for im in ims]
    par = extract_many(ims, workers=2)
    assert all(np.array_equal(s.desc, p.desc) and np.array_equal(s.xy, p.xy) for s, p in zip(serial, par))


@pytest.mark.parametrize("image", [
    np.full((200, 300, 3), 128, np.uint8),  # blank
    np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8),  # tiny
    np.zeros((1, 1), np.uint8),
    cv2.circle(np.full((120, 120), 220, np.uint8), (60, 60), 15, 30, -1),  # one blob: a handful of keypoints
], ids=["blank", "tiny", "one_pixel", "one_blob"])
def test_poor_images_give_no_error_and_no_geometry(image, kps):
    k = extract_keypoints(image)
    assert k.xy.shape == (len(k), 2) and k.desc.shape == (len(k), 128)
    assert len(k) < 10
    for q, g in [(k, kps["a1"]), (kps["a1"], k), (k, k)]:
        r = verify_pair(q, g)
        assert r.H is None and r.n_inliers == 0 and r.reject
        assert r.features.shape == (N_FEATURES,) and np.all(np.isfinite(r.features))
        assert r.features[F["n_inliers_accepted"]] == 0 and r.features[F["has_h"]] == 0


def test_rejects_bad_input_types():
    with pytest.raises(ValueError):
        extract_keypoints(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError):
        extract_keypoints(np.zeros((10, 10, 2), np.uint8))


# ---------------------------------------------------------------------------- matching
def brute_force_matches(a: np.ndarray, b: np.ndarray, ratio: float) -> set[tuple[int, int]]:
    d = np.linalg.norm(a[:, None].astype(np.float64) - b[None], axis=2)
    order = np.argsort(d, axis=1)
    out = set()
    for i in range(len(a)):
        j, j2 = order[i, 0], order[i, 1]
        if d[i, j] < ratio * d[i, j2] and np.argmin(d[:, j]) == i:
            out.add((i, int(j)))
    return out


def test_matching_agrees_with_brute_force():
    rng = np.random.default_rng(3)
    b = root_sift(rng.random((300, 128)).astype(np.float32) ** 4)
    perm = rng.permutation(300)[:200]
    a = root_sift((b[perm] ** 2 + rng.normal(0, 0.002, (200, 128))).clip(0).astype(np.float32))
    a = np.concatenate([a, root_sift(rng.random((50, 128)).astype(np.float32) ** 4)])  # 50 with no partner
    m = match_descriptors(a, b, ratio=0.8, mutual=True)
    got = {tuple(p) for p in m.idx.tolist()}
    assert got == brute_force_matches(a, b, 0.8)
    assert {(i, int(perm[i])) for i in range(200)} >= {p for p in got if p[0] < 200}
    assert len(got) > 150  # most true partners survive the ratio test
    np.testing.assert_allclose(m.dist, np.linalg.norm(a[m.idx[:, 0]] - b[m.idx[:, 1]], axis=1), atol=1e-4)


def test_ratio_and_mutual_checks():
    e = np.eye(128, dtype=np.float32)
    # a0 has two equally close candidates in b: ambiguous, the ratio test drops it
    b = np.stack([e[0], e[0], e[5], e[9]])
    a = np.stack([e[0], e[5] * 0.9 + e[6] * 0.1])
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    m = match_descriptors(a, b, ratio=0.8)
    assert m.idx.tolist() == [[1, 2]]
    # two a's whose nearest is the same b: the mutual check keeps only the closer one
    b2 = np.stack([e[0], e[50]])
    a2 = np.stack([e[0] * 0.99 + e[1] * 0.01, e[0] * 0.9 + e[1] * 0.1])
    a2 /= np.linalg.norm(a2, axis=1, keepdims=True)
    assert match_descriptors(a2, b2, ratio=0.9, mutual=True).idx.tolist() == [[0, 0]]
    assert match_descriptors(a2, b2, ratio=0.9, mutual=False).idx.tolist() == [[0, 0], [1, 0]]
    # fewer than 2 descriptors in b: ratio test undefined, no match rather than an error
    assert len(match_descriptors(a, b[:1])) == 0 and len(match_descriptors(a[:0], b)) == 0


# ---------------------------------------------------------------------------- homography on points
def _points(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-200, 200, (n, 2))


def test_double_homography_recovers_a_known_h_among_outliers():
    H = np.array([[1.05, 0.1, 12.0], [-0.08, 0.97, -7.0], [2e-4, -1e-4, 1.0]])
    src = _points(120)
    dst = apply_h(H, src) + np.random.default_rng(1).normal(0, 0.5, (120, 2))
    dst[80:] = _points(40, seed=2)  # a third are outliers
    g = double_homography(src, dst, (512, 512))
    assert g.reject == ""
    assert g.inliers[:80].sum() >= 76 and g.inliers[80:].sum() <= 2
    c = corners(512, 512) - 255.5
    assert np.abs(apply_h(g.H, c) - apply_h(H, c)).max() < 3.0
    assert np.median(g.errors) < 1.5 and g.errors.max() < HomographyConfig().second_threshold


@pytest.mark.parametrize("name,make_dst,reason", [
    ("shrunk", lambda s: s * 0.1, "scale"),
    ("stretched", lambda s: s @ np.array([[3.0, 0.0], [0.0, 1 / 3]]), "shear"),  # det 1, aniso 1/9
])
def test_impossible_geometry_is_rejected(name, make_dst, reason):
    src = _points(60)
    g = double_homography(src, make_dst(src), (512, 512))
    assert g.reject == reason, name


@pytest.mark.parametrize("method", ["magsac", "ransac"])
def test_mirrored_points_are_rejected(method):
    src = _points(60)
    cfg = HomographyConfig(first_method=method, second_method=method)
    g = double_homography(src, src * [-1, 1], (512, 512), cfg)
    if method == "magsac":
        # USAC refuses orientation-reversing samples outright: there is no fit to flag
        assert g.H is None and g.reject == "no_fit"
    else:
        assert g.reject == "mirrored" and g.stats["flip"] and g.stats["det"] < 0


def test_collinear_and_too_few_points_do_not_raise():
    t = np.linspace(-200, 200, 40)
    line = np.stack([t, 0.5 * t], axis=1)
    g = double_homography(line, line + 3.0, (512, 512))
    assert g.reject != ""
    g = double_homography(_points(3), _points(3), (512, 512))
    assert g.H is None and g.reject == "too_few_matches"
    same = np.zeros((30, 2))
    assert double_homography(same, same, (512, 512)).reject != ""


# ---------------------------------------------------------------------------- verify_pair on images
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_known_warp_is_recovered(photos, preset):
    h, w = SIZE
    H = np.array([[0.92, 0.08, 10.0], [-0.05, 0.96, 6.0], [3e-4, -2e-4, 1.0]])
    warped = cv2.warpPerspective(photos["a1"], H, (w, h), borderMode=cv2.BORDER_REFLECT)
    kcfg = PRESETS[preset]
    r = verify_pair(extract_keypoints(photos["a1"], kcfg), extract_keypoints(warped, kcfg),
                    VERIFY_PRESETS.get(preset, VERIFY_PRESETS["default"]))
    assert r.reject == "" and r.H is not None
    assert np.abs(apply_h(r.H, corners(h, w)) - apply_h(H, corners(h, w))).max() < 3.0
    assert r.n_inliers >= 100 and r.features[F["inlier_ratio"]] > 0.8
    # the drawn inliers are in original pixels and obey the true H
    assert r.inliers_xy.shape == (r.n_inliers, 4)
    err = np.linalg.norm(apply_h(H, r.inliers_xy[:, :2]) - r.inliers_xy[:, 2:], axis=1)
    assert np.median(err) < 1.5


def test_h_is_in_original_pixels_when_images_differ_in_size(photos):
    # the same photo at 2x against itself: H must be diag(0.5, 0.5) (centre-aligned pixels)
    big = cv2.resize(photos["a1"], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    cfg = KeypointConfig(max_side=1024)
    r = verify_pair(extract_keypoints(big, cfg), extract_keypoints(photos["a1"], cfg))
    assert r.H is not None
    h, w = big.shape[:2]
    expect = (corners(h, w) + 0.5) / 2 - 0.5
    assert np.abs(apply_h(r.H, corners(h, w)) - expect).max() < 3.0
    assert abs(r.features[F["log_scale"]]) < 0.05  # unit frames: same framing, scale ~1


def test_same_individual_beats_different_individual(kps):
    same = verify_pair(kps["a1"], kps["a2"])
    diff = verify_pair(kps["a1"], kps["b"])
    assert same.reject == "" and same.n_inliers >= 10
    assert diff.n_inliers == 0 and diff.H is None
    # at Lowe's classic 0.8 the putative matches alone separate them; the default 0.9 keeps more
    # ambiguous matches (repeated stripes) and leaves the separation to the geometry, as above
    strict = VerifyConfig(ratio=0.8)
    assert verify_pair(kps["a1"], kps["a2"], strict).features[F["n_matches"]] > \
        2 * verify_pair(kps["a1"], kps["b"], strict).features[F["n_matches"]]


def test_mirrored_pattern_is_not_a_match(photos, kps):
    flipped = extract_keypoints(cv2.flip(photos["a1"], 1))
    r = verify_pair(kps["a1"], flipped)
    twin = verify_pair(kps["a1"], kps["a1"])
    assert twin.n_inliers >= 100
    # either no geometry at all, or one flagged as mirrored: never an accepted match
    assert r.H is None and r.n_inliers == 0
    assert r.features[F["n_inliers_accepted"]] == 0


def resaved(image: np.ndarray, scale: float = 0.9, quality: int = 85) -> np.ndarray:
    """The photo saved again: resized and JPEG-compressed."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return cv2.imdecode(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_UNCHANGED)


def test_same_photo_is_told_from_another_photo_of_the_animal(photos, kps):
    """One photo twice (the same file, or saved again smaller) is `same_photo`; two photos of one animal
    and photos of two animals are not."""
    copy = extract_keypoints(resaved(photos["a1"]))
    X = feature_matrix([verify_pair(kps["a1"], kps["a1"]), verify_pair(kps["a1"], copy),
                        verify_pair(kps["a1"], kps["a2"]), verify_pair(kps["a1"], kps["b"])])
    assert same_photo(X).tolist() == [True, True, False, False], X[:, [F["n_inliers_accepted"], F["inlier_ratio"],
                                                                      F["inlier_frac"]]]


def test_verify_pairs_keeps_order_and_equals_serial(kps):
    pairs = [("a1", "a2"), ("a1", "b"), ("b", "a2"), ("a2", "a1"), ("a1", "a1")]
    serial = [verify_pair(kps[q], kps[g]) for q, g in pairs]
    par = verify_pairs(pairs, kps, VERIFY_PRESETS["default"], workers=2)
    assert np.array_equal(feature_matrix(serial), feature_matrix(par))
    assert [r.n_inliers for r in serial] == [r.n_inliers for r in par]
    assert feature_matrix(par).shape == (5, N_FEATURES) and feature_matrix(par).dtype == np.float32
    assert verify_pairs(pairs[:2], lambda k: kps[k])[1].n_inliers == serial[1].n_inliers


def test_verify_record_pairs_in_chunks_equals_one_pass(photos, tmp_path):
    """match reads keypoints a chunk of pairs at a time (bounded memory): same results, same order."""
    from core.catalog import Record
    from keypoints.store import KeypointStore, verify_record_pairs

    recs = {}
    for name, img in photos.items():
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), img[:, :, ::-1])
        recs[name] = Record(image=path.name, path=path, individual_id=name[0])
    pairs = [(recs[q], recs[g]) for q, g in [("a1", "a2"), ("a1", "b"), ("b", "a2"), ("a2", "a1"), ("b", "b")]]
    store = KeypointStore(tmp_path / "kp", PRESETS["default"])
    whole = verify_record_pairs(store, pairs, VERIFY_PRESETS["default"], progress=False)
    chunked = verify_record_pairs(store, pairs, VERIFY_PRESETS["default"], progress=False, chunk=2)
    assert np.array_equal(feature_matrix(whole), feature_matrix(chunked))
    assert [r.n_inliers for r in whole] == [r.n_inliers for r in chunked]
    assert whole[0].n_inliers > whole[1].n_inliers  # A-A beats A-B: the pairs are not all alike


def test_verify_config_round_trips_through_a_dict():
    import json

    for cfg in VERIFY_PRESETS.values():
        assert VerifyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert config_from_dict(json.loads(json.dumps(asdict(PRESETS["fast"])))) == PRESETS["fast"]


# ---------------------------------------------------------------------------- real photos
# Same individual, same flank, different sightings, checked by eye: the matches lie on the stripes.
REAL_SAME = [("images/test/15/218_rightphoto.jpg", "images/test/15/28_rightphoto.jpg"),
             ("images/train/74/172_leftphoto.jpg", "images/train/74/98_leftphoto.jpg")]
REAL_DIFFERENT = [("images/test/15/218_rightphoto.jpg", "images/test/7/192_rightphoto.jpg"),
                  ("images/test/15/28_rightphoto.jpg", "images/test/7/251_rightphoto.jpg"),
                  ("images/train/74/172_leftphoto.jpg", "images/test/1/14_leftphoto.jpg"),
                  ("images/train/74/98_leftphoto.jpg", "images/test/1/328_leftphoto.jpg")]


@pytest.mark.realdata
def test_real_nyala_pairs():
    if not (NYALA / "catalog.csv").is_file():
        pytest.skip(f"real nyala photos not found at {NYALA} (set NYALA_DATA to their folder)")
    from core.images import load_image

    names = sorted({p for pair in REAL_SAME + REAL_DIFFERENT for p in pair})
    images = {n: load_image(NYALA / n) for n in names}
    kp = dict(zip(names, extract_many(list(images.values()), workers=2)))
    same = verify_pairs(REAL_SAME, kp, workers=2)
    diff = verify_pairs(REAL_DIFFERENT, kp, workers=2)
    # measured: 25 and 16 accepted inliers for the same animal, 0 for every different one
    assert all(r.reject == "" and r.n_inliers >= 10 for r in same), [(r.n_inliers, r.reject) for r in same]
    assert all(r.n_inliers == 0 and r.H is None for r in diff), [(r.n_inliers, r.reject) for r in diff]
    # each photo against itself and against itself saved again smaller: the same photo; never the pairs above
    smaller = [(n, resaved(images[n], scale, quality)) for n in names[:3] for scale, quality in ((0.9, 85), (0.5, 75))]
    copies = extract_many([image for _, image in smaller], workers=2)
    twice = feature_matrix([verify_pair(kp[n], kp[n]) for n in names[:3]] +
                           [verify_pair(kp[n], c) for (n, _), c in zip(smaller, copies)])
    assert same_photo(twice).all(), twice[:, [F["n_inliers_accepted"], F["inlier_ratio"], F["inlier_frac"]]]
    assert not same_photo(feature_matrix(same + diff)).any()


def test_loading_lighterglue_leaves_kornias_lightglue_defaults_alone():
    from kornia.feature.lightglue import LightGlue

    from keypoints import xfeat

    before = dict(LightGlue.default_conf)
    xfeat._models.clear()
    _, lighterglue = xfeat._load()
    assert LightGlue.default_conf == before
    assert lighterglue.net.conf.input_dim == 64 and lighterglue.net.conf.n_layers == 6  # its own config kept


def test_upright_descriptors_are_not_rotation_invariant(photos):
    """Upright SIFT (the default preset) describes every keypoint at angle 0: a photo's translated and
    slightly warped copy still matches, a copy turned by 90 degrees no longer does (the rotation-
    invariant default matches both), and no location and scale is described twice."""
    up, default = PRESETS["default"], PRESETS["rotation-invariant"]
    # a run from before the setting (no "upright" recorded) keeps its caches and reads as extracted
    assert up.upright and "upright" not in config_to_dict(default) and config_from_dict(config_to_dict(default)) == default
    assert config_from_dict(config_to_dict(up)) == up
    h, w = SIZE
    H = np.array([[0.97, 0.03, 12.0], [-0.02, 0.98, 5.0], [1e-4, -1e-4, 1.0]])
    warped = cv2.warpPerspective(photos["a1"], H, (w, h), borderMode=cv2.BORDER_REFLECT)
    turned = cv2.rotate(photos["a1"], cv2.ROTATE_90_CLOCKWISE)
    n = {}
    for name, cfg in (("up", up), ("rotation-invariant", default)):
        a = extract_keypoints(photos["a1"], cfg)
        n[name] = [verify_pair(a, extract_keypoints(x, cfg)).features[F["n_matches"]] for x in (warped, turned)]
        if cfg.upright:
            assert len({(round(x, 1), round(y, 1)) for x, y in a.xy}) > 0.9 * len(a)
    # measured: 597 and 628 putative matches on the warped copy, 52 and 870 on the turned one
    assert n["up"][0] >= 100 and n["rotation-invariant"][0] >= 100
    assert n["rotation-invariant"][1] >= 100 and n["up"][1] < 0.2 * n["rotation-invariant"][1]


def test_keypoints_of_a_reduced_photo_are_placed_in_the_full_photo():
    from core.images import Reduction

    kp = Keypoints(np.array([[0, 0], [10, 5]], np.float32), np.ones((2, 128), np.float32) / np.sqrt(128), (30, 50))
    full = kp.in_photo(Reduction((120, 200), 4, (1.5, -2.5)))
    assert full.image_size == (120, 200) and full.xy.tolist() == [[1.5, -2.5], [41.5, 17.5]]
    assert kp.in_photo(Reduction((30, 50))) is kp


def test_a_large_jpeg_is_extracted_reduced_with_positions_in_full_photo_pixels(photos, tmp_path):
    from PIL import Image

    from core.catalog import Record
    from core.images import load_image
    from keypoints.store import extract_arrays

    # an odd-sized photo, stored turned (EXIF orientation 6), with a bbox at odd offsets
    big = cv2.resize(photos["a1"], (3001, 2253), interpolation=cv2.INTER_CUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(big).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "big.jpg", quality=95, exif=exif)
    rec = Record(image="big.jpg", path=tmp_path / "big.jpg", individual_id=None, bbox=(7, 5, 2990, 2245))
    cfg = replace(PRESETS["default"], focus_keep=1.0)
    full = extract_keypoints(load_image(rec.path, rec.bbox), cfg)
    seen = []

    def extract(image):
        seen.append(image.shape)
        return extract_keypoints(image, cfg)

    arrays, message, _ = extract_arrays(rec, extract, min_side=cfg.max_side)
    reduced = Keypoints.from_arrays(arrays)
    assert seen == [(560, 747, 3)]  # decoded at 1/4 (the shorter side stays >= 512), the box inside
    assert message == "" and reduced.image_size == full.image_size == (2245, 2990)
    assert 0.8 < len(reduced) / len(full) < 1.25
    # found on the same 512-pixel working image: most keypoints within two photo pixels of the full
    # decode's (a working pixel is ~6), and no shift between the two (the partly empty blocks of
    # the odd sides lie at the start of the displayed x axis: 3 px if not accounted for)
    dist = np.linalg.norm(reduced.xy[:, None] - full.xy[None], axis=2)
    near = dist.min(axis=1) < 2
    assert near.mean() > 0.8
    shift = (reduced.xy[near] - full.xy[dist.argmin(axis=1)[near]]).mean(axis=0)
    assert np.all(np.abs(shift) < 0.1), shift
