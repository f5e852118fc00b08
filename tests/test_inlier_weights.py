"""The model of single inliers (keypoints.inlier_weights): rows, fitting out of fold, the file, and the
inlier indices a verification keeps (and its cache), on hand-made data with known answers."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from keypoints.features import Keypoints, KeypointConfig, extract_keypoints
from keypoints.inlier_weights import (POSITION_COLUMNS, WEIGHT_FEATURES, InlierWeightConfig, InlierWeights,
                                      fit_inlier_weights, inlier_rows, summarise)
from keypoints.verify import verify_pair

WIDTH = 8  # descriptor width of the hand-made keypoints


def test_an_accepted_verification_names_the_keypoints_of_its_inliers(photos):
    kps = {k: extract_keypoints(v) for k, v in photos.items()}
    same = verify_pair(kps["a1"], kps["a2"])
    assert same.reject == "" and same.n_inliers >= 10
    assert same.inlier_idx.shape == (same.n_inliers, 2)
    # each row of inliers_xy is the query's and the gallery's keypoint the indices name
    assert np.array_equal(kps["a1"].xy[same.inlier_idx[:, 0]], same.inliers_xy[:, :2])
    assert np.array_equal(kps["a2"].xy[same.inlier_idx[:, 1]], same.inliers_xy[:, 2:])
    assert verify_pair(kps["a1"], kps["b"]).inlier_idx is None  # no geometry, no inliers


def keypoints(desc: np.ndarray, xy: np.ndarray, size=(100, 200)) -> Keypoints:
    return Keypoints(np.asarray(xy, np.float32), np.asarray(desc, np.float32), size)


def test_rows_hold_both_descriptors_and_positions_as_a_share_of_each_photo():
    kq = keypoints(np.eye(3, WIDTH), [[0, 0], [50, 25], [200, 100]], size=(100, 200))  # h 100, w 200
    kg = keypoints(2 * np.eye(2, WIDTH), [[40, 10], [10, 40]], size=(50, 40))  # h 50, w 40
    rows = inlier_rows(kq, kg, np.array([[1, 0], [2, 1]]))
    assert rows.shape == (2, 2 * WIDTH + POSITION_COLUMNS) and rows.dtype == np.float32
    assert np.array_equal(rows[:, :WIDTH], np.eye(3, WIDTH)[[1, 2]])
    assert np.array_equal(rows[:, WIDTH:2 * WIDTH], 2 * np.eye(2, WIDTH))
    pos = rows[:, 2 * WIDTH:]
    # x / w, y / h in the query, in the gallery, then |x / w - 0.5| of each
    assert np.allclose(pos[0], [0.25, 0.25, 1.0, 0.2, 0.25, 0.5])
    assert np.allclose(pos[1], [1.0, 1.0, 0.25, 0.8, 0.5, 0.25])
    assert np.allclose(summarise(np.array([0.2, 0.4, 1.0]), [2, 0, 1]), [[0.3, 0.6], [0, 0], [1.0, 1.0]])


def pattern_pairs(n_pairs: int = 120, seed: int = 0):
    """Pairs of 8 individuals: a true pair's inliers are on its individual's own pattern (descriptor
    dimension 0 high), a false pair's on a part every animal shares (dimension 1 high), a few of each
    kind in every pair so that counts alone say little."""
    rng = np.random.default_rng(seed)
    blocks, y, groups = [], [], []
    for i in range(n_pairs):
        same = i % 2 == 0
        m = int(rng.integers(6, 12))
        own = rng.random(m) < (0.8 if same else 0.2)
        desc = rng.normal(0, 0.1, (m, WIDTH))
        desc[own, 0] += 1.0
        desc[~own, 1] += 1.0
        xy = rng.random((m, 2)) * [200, 100]
        kq, kg = keypoints(desc, xy), keypoints(desc + rng.normal(0, 0.05, desc.shape), xy)
        blocks.append(inlier_rows(kq, kg, np.stack([np.arange(m)] * 2, axis=1)))
        y.append(int(same))
        a = f"ind{i % 8}"
        groups.append([a, a if same else f"ind{(i + 3) % 8}"])
    return blocks, np.array(y), np.array(groups)


def test_the_pattern_weighs_more_than_what_every_animal_shares():
    blocks, y, groups = pattern_pairs()
    cfg = InlierWeightConfig(n_estimators=50, min_pairs=10)
    model, W, info = fit_inlier_weights(blocks, y, groups, cfg, seed=0)
    assert model is not None and info["fitted"] and W.shape == (len(blocks), len(WEIGHT_FEATURES))
    assert info["pairs_with_inliers_true"] == info["pairs_with_inliers_false"] == 60
    own = np.zeros((1, 2 * WIDTH + POSITION_COLUMNS), np.float32)
    own[0, 0] = own[0, WIDTH] = 1.0
    shared = np.zeros_like(own)
    shared[0, 1] = shared[0, WIDTH + 1] = 1.0
    assert model.predict(own)[0] > 0.6 > 0.4 > model.predict(shared)[0]
    # out of fold, the mean weight of a true pair's inliers is above a false pair's, and the sum is the
    # mean times the count
    assert W[y == 1, 0].mean() > W[y == 0, 0].mean() + 0.2
    counts = np.array([len(b) for b in blocks])
    assert np.allclose(W[:, 1], W[:, 0] * counts, atol=1e-4)


def test_too_few_pairs_with_inliers_give_no_model_and_say_why():
    blocks, y, groups = pattern_pairs(n_pairs=30)
    blocks = [b if i % 3 else b[:0] for i, b in enumerate(blocks)]  # a third of the pairs without inliers
    model, W, info = fit_inlier_weights(blocks, y, groups, InlierWeightConfig(min_pairs=20))
    assert model is None and not info["fitted"] and not W.any()
    assert info["reason"] == "10 true and 10 false training pairs with inliers; it needs 20 of each"


def test_the_file_gives_the_same_weights_and_fingerprint(tmp_path):
    blocks, y, groups = pattern_pairs(n_pairs=40)
    model, _, _ = fit_inlier_weights(blocks, y, groups, InlierWeightConfig(n_estimators=20, min_pairs=5))
    back = InlierWeights.load(model.save(tmp_path / "inlier_weights.json"))
    X = np.concatenate(blocks)
    assert np.array_equal(model.predict(X), back.predict(X)) and back.fingerprint == model.fingerprint
    with pytest.raises(ValueError, match="width 5"):
        back.predict(X[:, :5])
    (tmp_path / "other.json").write_text('{"format": "keypoint-verifier"}')
    with pytest.raises(ValueError, match="not an inlier-weights file"):
        InlierWeights.load(tmp_path / "other.json")


def test_pair_cache_keeps_inlier_indices_and_reverifies_entries_cached_without_them(photos, tmp_path):
    """A result cached before the indices were kept is verified again by a stage that reads them, and
    kept as it was by one that does not."""
    from core.catalog import Record
    from core.runfolder import RunFolder
    from keypoints.stage import KeypointStage, _from_arrays, _pair_key, _to_arrays
    from keypoints.verify import VerifyConfig

    recs = {}
    for name in ("a1", "a2"):
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), photos[name][:, :, ::-1])
        recs[name] = Record(image=path.name, path=path, individual_id="A")
    stage = KeypointStage(RunFolder(tmp_path / "run"), KeypointConfig(focus_keep=1.0), VerifyConfig(), None)
    pair = (recs["a1"], recs["a2"])
    fresh = stage.verify([pair])[0]
    assert fresh.n_inliers >= 10 and fresh.inlier_idx.shape == (fresh.n_inliers, 2)
    back = _from_arrays(_to_arrays(fresh))
    assert np.array_equal(back.inlier_idx, fresh.inlier_idx)
    # as a result from before the indices were kept: the same entry without them
    old = {k: v for k, v in _to_arrays(fresh).items() if k != "inlier_idx"}
    stage.pairs.add({_pair_key(*pair): old})
    assert stage.verify([pair])[0].inlier_idx is None  # a stage without a model of inliers keeps it
    stage.keep_inlier_idx = True
    again = stage.verify([pair])[0]
    assert np.array_equal(again.inlier_idx, fresh.inlier_idx)
    assert "inlier_idx" in stage.pairs.get({_pair_key(*pair)})[_pair_key(*pair)]  # and caches it anew


def test_a_stage_reads_weights_a_chunk_of_pairs_at_a_time_with_the_same_result(photos, tmp_path, monkeypatch):
    """The validator's input of a stage with a model of inliers: the geometry, then the mean and sum of
    the inlier weights, the same whether the photos' keypoints are read for all pairs at once or pair by
    pair (the chunk bounds memory on large batches)."""
    import keypoints.inlier_weights as weights_module
    from core.catalog import Record
    from core.runfolder import RunFolder
    from keypoints.stage import KeypointStage
    from keypoints.verify import FEATURE_NAMES, VerifyConfig, feature_matrix

    recs = {}
    for name in ("a1", "a2", "b"):
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), photos[name][:, :, ::-1])
        recs[name] = Record(image=path.name, path=path, individual_id=name[0])
    rng = np.random.default_rng(0)
    X = rng.random((400, 2 * 128 + POSITION_COLUMNS)).astype(np.float32)
    model = InlierWeights.fit(X, (X[:, 0] > 0.5).astype(int), InlierWeightConfig(n_estimators=5))
    stage = KeypointStage(RunFolder(tmp_path / "run"), KeypointConfig(focus_keep=1.0), VerifyConfig(), None,
                          inlier_weights=model)
    pairs = [(recs[q], recs[g]) for q, g in [("a1", "a2"), ("a1", "b"), ("a2", "a1"), ("b", "a2")]]
    results = stage.verify(pairs)
    whole = stage.features(results, pairs)
    monkeypatch.setattr(weights_module, "WEIGHT_CHUNK", 1)
    assert np.array_equal(stage.features(results, pairs), whole)
    assert whole.shape == (4, len(FEATURE_NAMES) + len(WEIGHT_FEATURES))
    assert np.array_equal(whole[:, :len(FEATURE_NAMES)], feature_matrix(results))
    n = np.array([r.n_inliers for r in results])
    assert n[0] >= 10 and n[2] >= 10 and n[1] == n[3] == 0  # A-A matched both ways, A-B not
    mean, total = whole[:, len(FEATURE_NAMES)], whole[:, len(FEATURE_NAMES) + 1]
    assert np.all(mean[n > 0] > 0) and not mean[n == 0].any() and np.allclose(total, mean * n, rtol=1e-5)
