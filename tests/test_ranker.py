"""ranker/: calibrators, fusion, per-individual aggregation, top-5 with new_individual, tau search,
open-set folds. Every case has a hand-computed answer or a brute-force / scipy reference."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import isotonic_regression, minimize

from core.metrics import NEW_INDIVIDUAL, roc_auc, score_predictions
from core.aggregate import IndividualScore, aggregate_per_individual, top5_with_new
from ranker.calibration import (IsotonicCalibrator, LogisticCalibrator, calibrator_from_dict,
                                fit_logistic, make_calibrator)
from ranker.fusion import FusionConfig, LogisticStack, MeanFusion, ScoreFusion
from ranker.threshold import (_plateau_middle, evaluate_thresholds, open_set_folds, search_threshold,
                              split_fold_images)

NEW = NEW_INDIVIDUAL


# --- calibration ------------------------------------------------------------------------------

def test_isotonic_hand_case():
    cal = IsotonicCalibrator().fit([1, 2, 3, 4], [0, 1, 0, 1])
    np.testing.assert_allclose(cal.predict([1, 2, 3, 4]), [0, 0.5, 0.5, 1])
    # linear between steps, flat inside a pooled block, clamped outside the fitted range
    np.testing.assert_allclose(cal.predict([1.5, 2.5, 3.5, 0.0, 9.0]), [0.25, 0.5, 0.75, 0, 1])
    out = cal.predict([np.nan, 2.0])
    assert np.isnan(out[0]) and out[1] == 0.5


def test_isotonic_ties_get_one_value():
    # scores 1,1 with labels 1,0 pool to 0.5 before PAV; then 2 -> 0 violates and pools with them
    cal = IsotonicCalibrator().fit([1, 1, 2, 3], [1, 0, 0, 1])
    np.testing.assert_allclose(cal.predict([1, 2, 3]), [1 / 3, 1 / 3, 1.0])


def test_isotonic_matches_scipy_on_random_data():
    rng = np.random.default_rng(0)
    s = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-2 * s))).astype(float)
    cal = IsotonicCalibrator().fit(s, y)
    order = np.argsort(s)
    ref = isotonic_regression(y[order], increasing=True).x
    np.testing.assert_allclose(cal.predict(s[order]), ref, atol=1e-12)


@pytest.mark.parametrize("kind", ["isotonic", "logistic"])
def test_calibrators_monotone_in_unit_interval(kind):
    rng = np.random.default_rng(1)
    s = rng.normal(size=500) * 3
    y = (rng.random(500) < 0.3 + 0.1 * (s > 0)).astype(int)
    cal = make_calibrator(kind).fit(s, y)
    p = cal.predict(np.linspace(-20, 20, 2001))
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) >= -1e-15)
    assert np.isnan(cal.predict(np.array([np.nan]))[0])


def test_logistic_recovers_slope_and_refuses_inversion(caplog):
    rng = np.random.default_rng(2)
    s = rng.normal(size=6000)
    y = (rng.random(6000) < 1 / (1 + np.exp(-(2.0 * s - 1.0)))).astype(int)
    cal = LogisticCalibrator().fit(s, y)
    assert cal.a == pytest.approx(2.0, abs=0.2) and cal.b == pytest.approx(-1.0, abs=0.15)
    # labels flipped: the score now anti-correlates, the slope is clamped to 0 = base rate
    inv = LogisticCalibrator().fit(s, 1 - y)
    assert inv.a == 0.0
    np.testing.assert_allclose(inv.predict([-3.0, 0.0, 3.0]), (1 - y).mean(), rtol=1e-6)
    assert "anti-correlates" in caplog.text


def test_fit_logistic_matches_scipy_minimize():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 3)) * [1.0, 5.0, 0.2] + [0.0, 2.0, -1.0]
    y = (rng.random(400) < 1 / (1 + np.exp(-(X @ [1.0, -0.3, 4.0] + 0.5)))).astype(float)
    l2 = 0.01
    w, b = fit_logistic(X, y, l2=l2)
    # reference: same objective (penalty on standardised weights) minimised by BFGS
    mu, sd = X.mean(0), X.std(0)
    Z = (X - mu) / sd

    def obj(t):
        z = Z @ t[:3] + t[3]
        return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * t[:3] @ t[:3]

    t = minimize(obj, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(w, t[:3] / sd, atol=1e-4)
    assert b == pytest.approx(t[3] - (t[:3] / sd) @ mu, abs=1e-4)


def test_fit_logistic_separable_stays_finite():
    w, b = fit_logistic(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 0, 1, 1]), l2=1e-3)
    assert np.all(np.isfinite(w)) and np.isfinite(b) and w[0] > 0


@pytest.mark.parametrize("kind", ["isotonic", "logistic"])
def test_calibrator_save_load_roundtrip(kind, tmp_path):
    rng = np.random.default_rng(4)
    s = rng.random(200)
    y = (rng.random(200) < s).astype(int)
    cal = make_calibrator(kind).fit(s, y)
    cal.save(tmp_path / "c.json")
    back = type(cal).load(tmp_path / "c.json")
    probe = np.concatenate([rng.random(100) * 1.4 - 0.2, [np.nan]])
    np.testing.assert_array_equal(back.predict(probe), cal.predict(probe))
    again = calibrator_from_dict(json.loads((tmp_path / "c.json").read_text()))
    np.testing.assert_array_equal(again.predict(probe), cal.predict(probe))


def test_calibrator_errors():
    with pytest.raises(ValueError):
        make_calibrator("platt2")
    with pytest.raises(ValueError):
        calibrator_from_dict({"kind": "nope"})
    with pytest.raises(ValueError):
        IsotonicCalibrator().fit([np.nan, np.nan], [0, 1])
    with pytest.raises(ValueError):
        IsotonicCalibrator().fit([1.0, 2.0], [0, 2])
    with pytest.raises(RuntimeError):
        LogisticCalibrator().predict([0.5])


# --- fusion -----------------------------------------------------------------------------------

def _pairs(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    perfect = y * 0.5 + rng.random(n) * 0.5          # separates the classes exactly
    random = rng.random(n)                           # carries no information
    noisy_a = y + rng.normal(scale=1.0, size=n)      # two independent, informative, imperfect stages
    noisy_b = y + rng.normal(scale=1.0, size=n)
    return y, perfect, random, noisy_a, noisy_b


@pytest.mark.parametrize("kind", ["isotonic", "logistic"])
def test_fusion_perfect_plus_random_is_no_worse(kind):
    y, perfect, random, _, _ = _pairs()
    fus = ScoreFusion(FusionConfig(calibrator=kind)).fit({"perfect": perfect, "random": random}, y)
    assert isinstance(fus.combiner, LogisticStack)
    yt, pt, rt, _, _ = _pairs(seed=1)
    fused = fus.predict({"perfect": pt, "random": rt})
    assert roc_auc(yt, pt) == 1.0
    assert roc_auc(yt, fused) >= roc_auc(yt, pt)
    w = fus.combiner.w
    assert w[0] > 10 * abs(w[1])  # the random stage barely counts


def test_fusion_of_two_informative_stages_beats_each():
    y, _, _, a, b = _pairs(3000)
    fus = ScoreFusion().fit({"a": a, "b": b}, y)
    yt, _, _, at, bt = _pairs(3000, seed=5)
    fused = fus.predict({"a": at, "b": bt})
    assert roc_auc(yt, fused) > max(roc_auc(yt, at), roc_auc(yt, bt)) + 0.02


def test_fusion_nan_means_stage_not_run():
    y, perfect, random, a, b = _pairs(1500, seed=2)
    kp = a.copy()
    kp[::2] = np.nan                                  # keypoints only ran for half the pairs
    fus = ScoreFusion().fit({"emb": b, "kp": kp}, y)
    assert fus.train_counts["per_stage_scored"] == {"emb": 1500, "kp": 750}
    emb_t = np.array([0.0, 1.0, np.nan, np.nan])
    kp_t = np.array([np.nan, 1.0, 1.0, np.nan])
    out = fus.predict({"emb": emb_t, "kp": kp_t})
    assert np.all(np.isfinite(out[:3])) and np.isnan(out[3])
    # an absent key counts as a stage that never ran
    only_emb = fus.predict({"emb": emb_t})
    assert np.isnan(only_emb[2]) and np.isfinite(only_emb[0])
    cal = {s: fus.calibrators[s].predict(v) for s, v in {"emb": emb_t, "kp": kp_t}.items()}
    assert np.isnan(cal["kp"][0]) and np.isnan(cal["emb"][2])
    with pytest.raises(ValueError):
        fus.predict({"emb": emb_t, "colour": emb_t})
    with pytest.raises(ValueError):
        fus.predict({"emb": emb_t, "kp": kp_t[:2]})


def test_fusion_falls_back_to_mean_with_few_positives():
    rng = np.random.default_rng(6)
    y = np.zeros(200, dtype=int)
    y[:8] = 1
    a, b = rng.random(200) + y, rng.random(200) + y
    b[::3] = np.nan
    fus = ScoreFusion(FusionConfig(min_positives=20)).fit({"a": a, "b": b}, y)
    assert isinstance(fus.combiner, MeanFusion)
    cal = {s: fus.calibrators[s].predict(v) for s, v in {"a": a, "b": b}.items()}
    np.testing.assert_allclose(fus.predict({"a": a, "b": b}),
                               np.nanmean(np.column_stack([cal["a"], cal["b"]]), axis=1))


def test_fusion_skips_a_stage_that_never_ran():
    y, perfect, *_ = _pairs(300)
    fus = ScoreFusion().fit({"emb": perfect, "kp": np.full(300, np.nan)}, y)
    assert fus.stages == ["emb"]


def test_fusion_roundtrip_exact(tmp_path):
    y, perfect, random, a, b = _pairs(800, seed=3)
    b[::4] = np.nan
    for kind in ("isotonic", "logistic"):
        fus = ScoreFusion(FusionConfig(calibrator=kind)).fit({"a": a, "b": b}, y, groups=np.arange(800) // 10)
        fus.save(tmp_path / "f.json")
        back = ScoreFusion.load(tmp_path / "f.json")
        probe = {"a": np.linspace(-3, 4, 50), "b": np.where(np.arange(50) % 3, np.linspace(-3, 4, 50), np.nan)}
        np.testing.assert_array_equal(back.predict(probe), fus.predict(probe))
        assert json.loads((tmp_path / "f.json").read_text())["combiner"]["kind"] == "logistic_stack"


def test_stack_weights_nonnegative():
    rng = np.random.default_rng(7)
    n = 4000
    u = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-3 * u))).astype(int)
    e = rng.normal(size=n)
    # stage 2 mostly measures stage 1's noise: alone it is (weakly) informative, but jointly the
    # best fit subtracts it, i.e. gives it a negative weight
    P = 1 / (1 + np.exp(-np.column_stack([u + e, e + 0.2 * u])))
    assert roc_auc(y, P[:, 1]) > 0.5
    st = LogisticStack()
    w_free, _ = fit_logistic(st._features(P), y)
    assert w_free[1] < 0                      # the case does exercise the constraint
    st.fit(P, y)
    assert st.w[0] > 0 and st.w[1] == 0.0


# --- aggregation and the top-5 answer ---------------------------------------------------------

def test_aggregate_takes_max_per_individual():
    ids = ["b", "a", "b", "c", "a", "d", "e"]
    scores = np.array([0.2, 0.7, 0.9, 0.7, 0.7, np.nan, 0.1])
    out = aggregate_per_individual(ids, scores)
    assert out == [IndividualScore("b", 0.9, 2), IndividualScore("a", 0.7, 1),   # first of the tied a's
                   IndividualScore("c", 0.7, 3), IndividualScore("e", 0.1, 6)]   # a before c: same score
    assert aggregate_per_individual([], np.array([])) == []
    with pytest.raises(ValueError):
        aggregate_per_individual(["a"], np.array([0.1, 0.2]))


@pytest.mark.parametrize("scores,tau,expected", [
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 0.75, ["A", "B", NEW, "C", "D"]),
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 0.95, [NEW, "A", "B", "C", "D"]),
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 0.45, ["A", "B", "C", "D", "E"]),   # all five >= tau
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 0.8, ["A", "B", NEW, "C", "D"]),    # score == tau stays ahead
    ([0.9, 0.8], 0.1, ["A", "B", NEW]),                                  # short list: new at the end
    ([], 0.5, [NEW]),
])
def test_top5_with_new(scores, tau, expected):
    ranked = [(chr(ord("A") + i), s) for i, s in enumerate(scores)]
    assert top5_with_new(ranked, tau) == expected


def test_top5_with_new_skips_duplicates_and_new_token():
    ranked = [("A", 0.9), ("A", 0.85), (NEW, 0.8), ("B", 0.7), ("C", 0.2)]
    assert top5_with_new(ranked, 0.5) == ["A", "B", NEW, "C"]
    assert top5_with_new([IndividualScore("A", 0.3, 4)], 0.5) == [NEW, "A"]


# --- threshold search -------------------------------------------------------------------------

# Hand-built: MAP@5 per tau plateau (worked out in the comments) is best on (0.6, 0.9].
HAND_QUERIES = [[("A", 0.9), ("B", 0.3)], [("C", 0.6), ("D", 0.2)], [("F", 0.5), ("E", 0.4)]]
HAND_TRUTHS = ["A", NEW, "E"]
# tau <= .2: 1, 1/3, 1/2 -> 11/18 | (.2,.3]: 1, 1/2, 1/2 -> 2/3 | (.3,.4]: same 2/3
# (.4,.5]: 1, 1/2, 1/3 -> 11/18 | (.5,.6]: 11/18 | (.6,.9]: 1, 1, 1/3 -> 7/9 | > .9: 1/2, 1, 1/3 -> 11/18


def test_search_threshold_hand_case():
    res = search_threshold(HAND_QUERIES, HAND_TRUTHS)
    assert res.tau == pytest.approx(0.75) and res.map5 == pytest.approx(7 / 9)
    assert res.new_rate == pytest.approx(2 / 3)
    curve = {round(p.tau, 4): p.map5 for p in res.curve}
    assert curve[0.25] == pytest.approx(2 / 3) and curve[0.45] == pytest.approx(11 / 18)
    assert res.curve[0].map5 == pytest.approx(11 / 18) and res.curve[-1].map5 == pytest.approx(11 / 18)
    # a user grid: best points 0.65, 0.7, 0.8 -> middle of the plateau is 0.7
    res = search_threshold(HAND_QUERIES, HAND_TRUTHS, grid=[0.1, 0.25, 0.35, 0.45, 0.55, 0.65, 0.7, 0.8, 0.95])
    assert res.tau == 0.7 and res.map5 == pytest.approx(7 / 9)


def test_search_threshold_target_new_rate():
    # new-first rate per plateau: 0 up to .5, 1/3 on (.5,.6], 2/3 on (.6,.9], 1 above .9
    assert search_threshold(HAND_QUERIES, HAND_TRUTHS, target_new_rate=0.3).tau == pytest.approx(0.55)
    assert search_threshold(HAND_QUERIES, HAND_TRUTHS, target_new_rate=0.7).tau == pytest.approx(0.75)
    res = search_threshold(HAND_QUERIES, HAND_TRUTHS, target_new_rate=1.0)
    assert res.tau > 0.9 and res.new_rate == 1.0 and res.map5 == pytest.approx(11 / 18)
    # rate 0 holds on four plateaus; the two with 11/18 lose to (.2,.4] with 2/3
    res = search_threshold(HAND_QUERIES, HAND_TRUTHS, target_new_rate=0.0)
    assert 0.2 < res.tau <= 0.4 and res.map5 == pytest.approx(2 / 3) and res.new_rate == 0.0


def test_plateau_middle_rule():
    g = np.arange(8.0)
    assert _plateau_middle(g, np.array([1, 0, 1, 1, 1, 0, 0, 0], bool)) == 3       # widest run, its middle
    assert _plateau_middle(g, np.array([1, 1, 0, 0, 0, 1, 1, 0], bool)) == 0       # equal spans: lower run, lower middle
    assert _plateau_middle(np.array([0, 1, 2, 10.0]), np.array([1, 1, 1, 1], bool)) == 2  # middle in tau, not in count


def test_threshold_sweep_matches_brute_force():
    rng = np.random.default_rng(8)
    names = [f"id{i}" for i in range(12)]
    queries, truths = [], []
    for q in range(60):
        n = int(rng.integers(0, 8))
        ranked = [(str(rng.choice(names)), float(np.round(rng.random(), 2))) for _ in range(n)]
        if q % 7 == 0 and ranked:
            ranked[0] = (ranked[0][0], float("nan"))
        if q % 5 == 0:
            ranked.sort(key=lambda r: -r[1])  # most sorted, some not: both follow top5_with_new
        queries.append(ranked)
        truths.append(NEW if rng.random() < 0.3 else str(rng.choice(names)))
    grid = np.unique(np.round(np.linspace(-0.05, 1.05, 60), 3))
    map5, rate = evaluate_thresholds(queries, truths, grid)
    for g, m, r in zip(grid, map5, rate):
        preds = {i: top5_with_new(q, g) for i, q in enumerate(queries)}
        ref = score_predictions(dict(enumerate(truths)), preds)
        assert m == pytest.approx(ref["map5"], abs=1e-12)
        assert r == pytest.approx(np.mean([p[0] == NEW for p in preds.values()]), abs=1e-12)


def test_search_threshold_errors():
    with pytest.raises(ValueError):
        search_threshold([], [])
    with pytest.raises(ValueError):
        search_threshold(HAND_QUERIES, HAND_TRUTHS[:2])
    with pytest.raises(ValueError):
        search_threshold(HAND_QUERIES, HAND_TRUTHS, target_new_rate=1.5)


# --- open-set folds ---------------------------------------------------------------------------

def test_open_set_folds_partition_individuals():
    inds = [f"w{i:02d}" for i in range(10)] * 3   # one entry per image, repeats allowed
    folds = open_set_folds(inds, 3, seed=1)
    unseen = [set(f.unseen) for f in folds]
    assert sorted(len(u) for u in unseen) == [3, 3, 4]
    assert set().union(*unseen) == set(inds) and sum(len(u) for u in unseen) == 10
    for f in folds:
        assert set(f.unseen).isdisjoint(f.seen) and set(f.unseen) | set(f.seen) == set(inds)
    assert open_set_folds(inds, 3, seed=1) == folds
    assert open_set_folds(inds, 3, seed=2) != folds
    with pytest.raises(ValueError):
        open_set_folds(["a", "b"], 3)


def test_split_fold_images():
    # a: 3 images, b: 1 image, c: 2 images, d: 4 images
    image_ind = ["a", "b", "a", "c", "d", "d", "a", "c", "d", "d"]
    folds = open_set_folds(image_ind, 2, seed=0)
    for fold in folds:
        sp = split_fold_images(image_ind, fold, seed=3)
        gal_ind = {image_ind[i] for i in sp.gallery}
        assert gal_ind == set(fold.seen)                       # unseen: no photo in the gallery
        assert set(sp.gallery).isdisjoint(sp.queries)
        for i, t in zip(sp.queries, sp.truths):
            assert t == (NEW if image_ind[i] in fold.unseen else image_ind[i])
        # one query per individual, except a seen singleton which stays in the gallery only
        expected = len(fold.unseen) + sum(1 for s in fold.seen if image_ind.count(s) > 1)
        assert len(sp.queries) == expected
        if "b" in fold.seen:
            assert image_ind.index("b") in sp.gallery
        every = split_fold_images(image_ind, fold, seed=3, queries_per_seen=None, queries_per_unseen=None)
        n_unseen_imgs = sum(image_ind.count(u) for u in fold.unseen)
        assert len(every.queries) == n_unseen_imgs + sum(image_ind.count(s) - 1 for s in fold.seen)
        assert len(every.gallery) == len(fold.seen)
    with pytest.raises(ValueError):
        split_fold_images(image_ind + ["zz"], folds[0])


def test_top2mean_averages_each_individuals_two_best_photos():
    ids = ["a", "a", "a", "b", "c", "c"]
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.6, np.nan])
    ranked = aggregate_per_individual(ids, scores, "top2mean")
    assert [(r.individual_id, round(r.score, 6), r.best_gallery_index) for r in ranked] == \
        [("b", 0.8, 3), ("a", 0.7, 0), ("c", 0.6, 4)]  # b: one photo; a: (0.9 + 0.5) / 2; c: NaN ignored
    assert [r.individual_id for r in aggregate_per_individual(ids, scores)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_per_individual(ids, scores, "median")


def test_k_reciprocal_rescore_hand_computed():
    """k = 2; gallery neighbours 0:[1,2] 1:[0,2] 2:[3,0] 3:[2,1] give the reciprocal sets
    R0={0,1,2} R1={0,1} R2={0,2,3} R3={2,3}. The query's best photo (1, 0.9) does not reach photo 1's
    k-th neighbour (0.95): not reciprocal; photo 3 (0.8 >= 0.7) is, so R(q)={3}. Jaccard: 0, 1/2, 0,
    1/3; with lam 0.3 the look-alike 1 (0.63) falls behind photo 3 (0.71)."""
    from ranker.rerank import gallery_reciprocal_sets, k_reciprocal_rescore

    sets = gallery_reciprocal_sets(np.array([[1, 2], [0, 2], [3, 0], [2, 1]]))
    assert sets == [{0, 1, 2}, {0, 1}, {0, 2, 3}, {2, 3}]
    kth = np.array([0.5, 0.95, 0.6, 0.7])
    s, i = k_reciprocal_rescore(np.array([0.9, 0.8, 0.7, 0.2]), np.array([1, 3, 0, 2]), kth, sets, k=2)
    assert i.tolist() == [3, 1, 0, 2]
    np.testing.assert_allclose(s, [0.71, 0.63, 0.49, 0.14 + 0.3 / 3])
    # nothing reciprocal: the order and the (scaled) scores stay
    s, i = k_reciprocal_rescore(np.array([0.9, 0.8]), np.array([1, 0]), np.ones(4), sets, k=2)
    assert i.tolist() == [1, 0] and np.allclose(s, [0.63, 0.56])


def test_default_fusion_is_logistic_calibration_and_the_mean_on_small_held_out_sets():
    """What calibrate uses by default (measured on the development set: ranker.fusion.FusionConfig):
    a held-out set of a few dozen queries gives far fewer than 200 positive pairs, so the mean."""
    from engine.calibrate import CalibrateConfig

    assert FusionConfig().calibrator == CalibrateConfig().calibrator == "logistic"
    rng = np.random.default_rng(8)
    y = (np.arange(3000) % 50 == 0).astype(int)  # 60 positives among 3000 shortlist pairs
    a, b = rng.random(3000) + y, rng.random(3000) + y
    assert isinstance(ScoreFusion().fit({"a": a, "b": b}, y).combiner, MeanFusion)
