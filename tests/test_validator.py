"""The XGBoost validator: learns a separable rule, round-trips exactly, splits honestly by individual."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from core.metrics import roc_auc
from keypoints.validator import (VALIDATOR_PRESETS, Validator, ValidatorConfig, group_folds, heldout_auc,
                                 pick_device)
from keypoints.verify import FEATURE_NAMES, N_FEATURES

# every setting explicit, so the measured figures below do not drift with the defaults
SMALL = ValidatorConfig(n_estimators=60, max_depth=3, learning_rate=0.2, subsample=0.8, colsample_bytree=0.8,
                        min_child_weight=2.0, reg_lambda=1.0, n_jobs=1, device="cpu")
NAMES = list(FEATURE_NAMES)
INL = NAMES.index("n_inliers")


def geometry_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Same pairs have many inliers and a small reprojection error, different pairs few; the other
    columns are noise. Separable up to a little label noise."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    X = rng.normal(0, 1, (n, N_FEATURES)).astype(np.float32)
    X[:, INL] = np.where(y, rng.poisson(30, n), rng.poisson(3, n))
    X[:, NAMES.index("reproj_mean")] = np.where(y, rng.uniform(0.5, 2, n), rng.uniform(1.5, 6, n))
    return X, y.astype(int)


@pytest.mark.parametrize("preset", sorted(VALIDATOR_PRESETS))
def test_learns_a_separable_rule(preset):
    X, y = geometry_like(400, 0)
    Xt, yt = geometry_like(300, 1)
    v = Validator(VALIDATOR_PRESETS[preset], NAMES).fit(X, y, seed=0)
    p = v.predict(Xt)
    assert p.dtype == np.float64 and p.shape == (300,) and np.all((p >= 0) & (p <= 1))
    assert roc_auc(yt, p) > 0.97
    assert p[yt == 1].mean() > 0.8 and p[yt == 0].mean() < 0.2


def test_save_load_round_trips_predictions_exactly(tmp_path):
    X, y = geometry_like(300, 2)
    v = Validator(SMALL, NAMES).fit(X, y, seed=3)
    path = v.save(tmp_path / "run" / "verifier.json")
    assert path.name == "verifier.json" and [p.name for p in path.parent.iterdir()] == ["verifier.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not owner-only, as a tempfile.mkstemp file is
    doc = json.loads(path.read_text())
    assert doc["format"] == "keypoint-verifier" and doc["feature_names"] == NAMES
    json.loads(doc["booster_json"])  # XGBoost's own JSON model, embedded as written
    back = Validator.load(path, expected_features=FEATURE_NAMES)
    Xt, _ = geometry_like(200, 4)
    assert np.array_equal(back.predict(Xt), v.predict(Xt))
    assert back.cfg == v.cfg and back.seed == 3


def test_same_seed_same_model():
    X, y = geometry_like(300, 5)
    a = Validator(SMALL, NAMES).fit(X, y, seed=7).predict(X)
    b = Validator(SMALL, NAMES).fit(X, y, seed=7).predict(X)
    assert np.array_equal(a, b)


def test_refuses_what_it_cannot_use(tmp_path):
    X, y = geometry_like(100, 6)
    with pytest.raises(ValueError):
        Validator(SMALL, NAMES).fit(X, np.zeros(100))  # one class
    v = Validator(SMALL, NAMES).fit(X, y)
    with pytest.raises(ValueError):
        v.predict(X[:, :-1])  # wrong width
    path = v.save(tmp_path / "verifier.json")
    with pytest.raises(ValueError):
        Validator.load(path, expected_features=NAMES[:-1] + ["something_else"])
    with pytest.raises(RuntimeError):
        Validator(SMALL, NAMES).predict(X)
    assert len(v.predict(X[:0])) == 0


def test_device_is_cpu_without_a_cuda_build():
    import xgboost

    if not xgboost.build_info().get("USE_CUDA", False):
        assert pick_device("auto") == "cpu"
    assert pick_device("cpu") == "cpu"


def test_group_folds_deal_every_group_once():
    groups = np.array(list("aabbbcddeeeffg"))
    uniq, fold = group_folds(groups, 3, seed=0)
    assert list(uniq) == list("abcdefg")
    assert sorted(np.bincount(fold, minlength=3).tolist()) == [2, 2, 3]


def test_heldout_auc_is_honest_about_memorised_individuals():
    # The label is a property of the individual, and four noise columns identify the individual
    # (as appearance would): a model can memorise individuals but learn nothing that transfers.
    # Split by individual, the held-out AUC must stay near chance (measured 0.45); split by row
    # (each row its own group) it looks excellent (measured 0.99).
    rng = np.random.default_rng(0)
    n_ind, per = 60, 8
    ind = np.repeat(np.arange(n_ind), per)
    y = (rng.random(n_ind) < 0.5).astype(int)[ind]
    X = rng.normal(0, 1, (len(ind), N_FEATURES)).astype(np.float32)
    X[:, :4] = rng.normal(0, 1, (n_ind, 4))[ind]  # id-like columns
    honest = heldout_auc(X, y, ind, seed=0, cfg=SMALL)
    leaky = heldout_auc(X, y, np.arange(len(ind)), seed=0, cfg=SMALL)
    assert honest["auc_validator"] < 0.65
    assert leaky["auc_validator"] > 0.95
    assert honest["auc_inliers"] == pytest.approx(roc_auc(y, X[:, INL]))
    assert honest["n_pos"] + honest["n_neg"] == len(y) and np.all(np.isfinite(honest["oof_scores"]))


def test_heldout_auc_beats_the_inlier_count_when_other_features_carry_signal():
    X, y = geometry_like(500, 8)
    # make the inlier count weak, the reprojection error strong
    rng = np.random.default_rng(9)
    X[:, INL] = rng.poisson(10, len(y))
    groups = np.stack([rng.integers(0, 50, len(y)), rng.integers(0, 50, len(y))], axis=1)
    out = heldout_auc(X, y, groups, seed=1, cfg=SMALL)
    assert out["auc_validator"] > 0.85 and abs(out["auc_inliers"] - 0.5) < 0.1
    assert out["n_folds_fitted"] == 5


def test_a_validator_of_the_inlier_count_alone_ranks_as_the_count_and_round_trips(tmp_path):
    from keypoints.validator import INLIERS

    X, y = geometry_like(300, 6)
    v = Validator(SMALL, NAMES, INLIERS).fit(X, y, seed=0)
    Xt, _ = geometry_like(200, 7)
    p = v.predict(Xt)
    # a logistic model of the count: the same order as the count, whatever the other columns say
    order = np.argsort(Xt[:, INL], kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-12) and p.max() > 0.9 and p.min() < 0.1
    noisy = Xt.copy()
    noisy[:, [i for i in range(N_FEATURES) if i != INL]] = 99
    assert np.allclose(v.predict(noisy), p)
    back = Validator.load(v.save(tmp_path / "verifier.json"), expected_features=FEATURE_NAMES)
    assert back.uses == ["n_inliers"] and np.array_equal(back.predict(Xt), p)
    assert Validator(SMALL, NAMES).fit(X, y, seed=0).uses is None  # the whole geometry by default
