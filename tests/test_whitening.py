"""Learned descriptor whitening (keypoints.whitening) and its keypoint store, with known answers."""
import cv2
import numpy as np
import pytest

from core.cache import record_key
from core.catalog import Record
from keypoints.features import Keypoints, KeypointConfig
from keypoints.store import KeypointStore, WhitenedStore
from keypoints.whitening import Whitening, correct_matches, fit_whitening, same_flank_pairs


def nuisance_pairs(n, rng, dim=16, signal=8):
    """Descriptors whose first `signal` dimensions identify a point and whose others change a lot
    between two photos of it (light, pose): correct matches differ mostly where it does not matter."""
    base = rng.normal(size=(n, dim))
    a = base + np.concatenate([rng.normal(0, 0.1, (n, signal)), rng.normal(0, 3.0, (n, dim - signal))], 1)
    b = base + np.concatenate([rng.normal(0, 0.1, (n, signal)), rng.normal(0, 3.0, (n, dim - signal))], 1)
    return a, b


def nn_accuracy(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.argmax(a @ b.T, axis=1) == np.arange(len(a))))


def test_whitening_learns_which_directions_tell_points_apart():
    rng = np.random.default_rng(0)
    train_a, train_b = nuisance_pairs(3000, rng)
    w = fit_whitening(train_a, train_b, np.concatenate([train_a, train_b]))
    test_a, test_b = nuisance_pairs(300, np.random.default_rng(1))
    raw, white = nn_accuracy(test_a, test_b), nn_accuracy(w.apply(test_a), w.apply(test_b))
    assert raw < 0.5 and white > 0.95, (raw, white)
    out = w.apply(test_a)
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert w.apply(np.zeros((0, 16), np.float32)).shape == (0, 16)
    assert w.correspondences == 3000
    with pytest.raises(ValueError):
        fit_whitening(train_a[:5], train_b[:4], train_a)


def test_whitening_round_trip_and_fingerprint(tmp_path):
    rng = np.random.default_rng(0)
    a, b = nuisance_pairs(500, rng)
    w = fit_whitening(a, b, a)
    w.save(tmp_path / "w.npz")
    back = Whitening.load(tmp_path / "w.npz")
    assert back.fingerprint == w.fingerprint and back.correspondences == 500
    assert np.array_equal(back.apply(a), w.apply(a))
    other = fit_whitening(a, b, a, eps=0.1)
    assert other.fingerprint != w.fingerprint


def test_correct_matches_are_those_the_homography_maps():
    rng = np.random.default_rng(3)
    n = 60
    xy = rng.uniform(10, 300, (n, 2)).astype(np.float32)
    desc = np.abs(rng.normal(size=(n, 128))).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    H = np.array([[1.1, 0.05, 12.0], [-0.04, 0.95, -7.0], [0, 0, 1]])
    moved = cv2.perspectiveTransform(xy.reshape(-1, 1, 2).astype(np.float64), H).reshape(-1, 2).astype(np.float32)
    # the last 10 points of b sit elsewhere: their descriptors match, their places do not
    moved[50:] += 40.0
    order = rng.permutation(n)
    a = Keypoints(xy, desc, (320, 320))
    b = Keypoints(moved[order], desc[order], (320, 320))
    idx = correct_matches(a, b, H, ratio=0.95, px=5.0)
    assert len(idx) == 50
    assert np.all(order[idx[:, 1]] == idx[:, 0]) and set(idx[:, 0]) == set(range(50))


def test_same_flank_pairs():
    ids = ["a", "a", "a", "b", "b", "c"]
    views = ["left", "left", "right", "", "right", "left"]
    assert same_flank_pairs(ids, views, 100) == [(0, 1), (3, 4)]
    assert same_flank_pairs(ids, views, 1) == [(0, 1)]


def test_whitened_store_extracts_once_and_reads_its_own_cache(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        records.append(Record(image=path.name, path=path, individual_id="x"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    records.append(Record(image=bad.name, path=bad, individual_id="x"))
    calls = []

    def extract(image):
        calls.append(1)
        d = np.abs(np.random.default_rng(len(calls)).normal(size=(20, 16))).astype(np.float32)
        return Keypoints(np.zeros((20, 2), np.float32), d / np.linalg.norm(d, axis=1, keepdims=True), image.shape[:2])

    a, b = nuisance_pairs(400, rng)
    w = fit_whitening(a, b, a)
    raw = KeypointStore(tmp_path / "raw", KeypointConfig(), extract)
    got = raw.get(records[:1], progress=False)  # one photo already in the source's cache
    white = WhitenedStore(tmp_path / "white", raw, w)
    out = white.get(records, progress=False)
    assert len(calls) == 3  # the cached one was not extracted again; the unreadable one has none
    assert set(out) == {record_key(r) for r in records[:3]}
    k0 = record_key(records[0])
    expected = w.apply(got[k0].desc)
    assert np.allclose(out[k0].desc, expected, atol=2e-3)  # stored as float16, like every keypoint cache
    assert record_key(records[3]) in white.cache.unreadable()  # the votes read it there
    again = WhitenedStore(tmp_path / "white", raw, w).get(records, progress=False)
    assert len(calls) == 3 and all(np.array_equal(again[k].desc, out[k].desc) for k in out)
    # another whitening is another cache
    other = fit_whitening(a, b, a, eps=0.1)
    WhitenedStore(tmp_path / "white", raw, other).get(records[:1], progress=False)
    assert len(calls) == 3  # from the source's cache, whitened anew


def test_a_ray_task_whitens_what_it_extracts(tmp_path):
    """keypoints.stage.verify_chunk (what a Ray worker runs) whitens the photos it extracts, so the
    driver caches them as the local path would."""
    import csv

    from engine.synthetic import make_dataset
    from keypoints.features import extract_keypoints
    from keypoints.stage import verify_chunk
    from keypoints.verify import VerifyConfig

    catalog = make_dataset(tmp_path / "s", n_individuals=1, photos_per_individual=2, seed=3, size=(96, 128))
    rows = list(csv.DictReader(open(catalog)))
    recs = [Record(image=r["image"], path=catalog.parent / r["image"], individual_id=r["individual_id"]) for r in rows]
    kcfg = KeypointConfig(focus_keep=1.0)
    a, b = nuisance_pairs(400, np.random.default_rng(0), dim=128, signal=64)
    w = fit_whitening(a, b, a)
    task = {"pairs": [(recs[0], recs[1])], "cached": {}, "skip": set()}
    results, new, failed = verify_chunk(task, "KeypointStage", kcfg, VerifyConfig(), None, w)
    assert len(results) == 1 and not failed and set(new) == {record_key(r) for r in recs}
    raw = extract_keypoints(cv2.cvtColor(cv2.imread(str(recs[0].path)), cv2.COLOR_BGR2RGB), kcfg)
    got = Keypoints.from_arrays(new[record_key(recs[0])])
    assert len(got) == len(raw) > 0
    assert np.allclose(got.desc, w.apply(raw.desc), atol=2e-3)
