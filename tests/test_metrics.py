import json

import pytest

from core.metrics import NEW_INDIVIDUAL as NEW, average_precision_at_5, roc_auc, score_predictions


def test_map5_hand_computed():
    truth = {"q1": "a", "q2": "b", "q3": NEW, "q4": "d"}
    pred = {"q1": ["a", "x", "y", "z", "w"],     # rank 1 -> 1
            "q2": ["x", "y", "b", "z", "w"],     # rank 3 -> 1/3
            "q3": ["x", NEW, "y", "z", "w"],     # rank 2 -> 1/2
            "q4": ["x", "y", "z", "w", "v", "d"]}  # rank 6 is past the top 5 -> 0
    s = score_predictions(truth, pred)
    assert s["map5"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 0) / 4)
    assert s["top1"] == pytest.approx(0.25) and s["top5"] == pytest.approx(0.75)
    # nobody answered new_individual first: precision 0 by convention, recall 0 of 1
    assert s["new_precision"] == 0 and s["new_recall"] == 0
    assert average_precision_at_5("b", pred["q2"]) == pytest.approx(1 / 3)


def test_new_individual_precision_recall():
    truth = {"a": NEW, "b": NEW, "c": "x", "d": "y"}
    pred = {"a": [NEW, "x"], "b": ["x", NEW], "c": [NEW, "x"], "d": ["y"]}
    s = score_predictions(truth, pred)
    assert s["new_precision"] == pytest.approx(0.5) and s["new_recall"] == pytest.approx(0.5)
    assert s["new_f1"] == pytest.approx(0.5) and s["missing"] == 0
    # known animals: c has its answer second (behind new_individual), d first
    assert s["known_top1"] == pytest.approx(0.5) and s["known_top5"] == pytest.approx(1.0)
    assert score_predictions({"a": "x"}, {})["missing"] == 1


def test_roc_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1, 0, 1], [1, 1, 1, 1]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0], [3, 2, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])


def test_closed_set_figures_ignore_new_individuals_and_tau():
    """The ablation's closed_* rows rank known queries with new_individual never proposed."""
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    from core.catalog import Record
    from engine.matching import evaluate_pairs, format_metrics
    from engine.pipeline import Engine, MatchConfig, QueryPairs

    gallery = SimpleNamespace(ids=["a", "b", "c"], paths=["ga", "gb", "gc"], bbox=lambda i: None)
    engine = SimpleNamespace(gallery=gallery, default_scores=lambda st: st["embedding"],
                             ablation_scorers=lambda cfg: [("embedding", lambda st: st["embedding"], 0.9)])
    engine.rank = Engine.rank.__get__(engine)

    def query(name, scores):
        return QueryPairs(Record(name, Path(name), None), np.arange(3), {"embedding": np.array(scores)})

    # q1 (truth a) ranks a second, q2 (truth b) first; q3 is a new individual. Every score is under
    # tau = 0.9, so the open-set answer is new_individual first for all three.
    pairs = [query("q1", [0.5, 0.6, 0.1]), query("q2", [0.2, 0.8, 0.3]), query("q3", [0.4, 0.3, 0.2])]
    rows = evaluate_pairs(engine, pairs, {"q1": "a", "q2": "b", "q3": NEW}, MatchConfig())
    emb = rows["embedding"]
    assert emb["map5"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)  # a and b in third and second place
    assert emb["known_top1"] == 0 and emb["known_top5"] == 1  # both known animals in third and second place
    assert emb["closed_map5"] == pytest.approx((1 / 2 + 1) / 2)
    assert emb["closed_top1"] == pytest.approx(1 / 2)
    # only a new individual: the known-animal figures have nothing to measure (n/a, JSON null)
    only_new = evaluate_pairs(engine, pairs[2:], {"q3": NEW}, MatchConfig())["embedding"]
    assert [only_new[k] for k in ("known_top1", "known_top5", "closed_map5", "closed_top1")] == [None] * 4
    assert only_new["new_recall"] == 1 and only_new["map5"] == 1
    table = format_metrics({"embedding": only_new})
    assert "n/a" in next(line for line in table.splitlines() if line.startswith("closed MAP@5"))
    assert "NaN" not in json.dumps(only_new)


def test_figures_about_no_queries_are_none():
    """Known-animal figures without known queries, new recall and F1 without new ones: None, where
    the protocol's scorer prints 0; precision with nothing answered new stays 0 by convention."""
    only_known = score_predictions({"q1": "a", "q2": "b"}, {"q1": ["a"], "q2": [NEW, "b"]})
    assert only_known["new_recall"] is None and only_known["new_f1"] is None
    assert only_known["new_precision"] == 0 and only_known["known_top5"] == 1
    only_new = score_predictions({"q1": NEW}, {"q1": ["a", NEW]})
    assert only_new["known_top1"] is None and only_new["known_top5"] is None
    assert only_new["new_recall"] == 0 and only_new["new_f1"] == 0 and only_new["map5"] == pytest.approx(1 / 2)


def test_right_animal_places_known_answers():
    """Each known query lands in the place its scores, verification and geometry make it; new ones
    are not counted."""
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    from core.catalog import Record
    from core.stage import ALL, TOP
    from engine.matching import PLACES, right_animal_places
    from engine.pipeline import QueryPairs

    ids = list("abcdefg")  # one photo each, gallery indices 0-6
    engine = SimpleNamespace(gallery=SimpleNamespace(ids=ids, bbox=lambda i: None), default_scores=lambda st: st["embedding"],
                             stages=[SimpleNamespace(name="embedding", scope=ALL),
                                     SimpleNamespace(name="keypoints", scope=TOP)])
    nan = np.nan

    def query(name, emb, kp, inliers_g=None, idx=tuple(range(7))):
        evidence = {} if inliers_g is None else {6: {"inliers": inliers_g, "inliers_xy": np.zeros((0, 4))}}
        return QueryPairs(Record(name, Path(name), None), np.array(idx),
                          {"embedding": np.array(emb, float), "keypoints": np.array(kp, float)}, evidence)

    low_g = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1]  # g seventh
    pairs = [query("q1", [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [nan] * 7),  # a first
             query("q2", [0.9, 0.7, 0.8, 0.1, 0.1, 0.1, 0.1], [nan] * 7),  # b third
             query("q3", low_g, [nan] * 6 + [0.2], inliers_g=12),  # g verified, geometry found, seventh
             query("q4", low_g, [nan] * 6 + [0.1], inliers_g=0),  # g verified, no geometry
             query("q5", low_g, [0.9] * 6 + [nan]),  # g shortlisted, never verified
             query("q6", low_g[:6], [nan] * 6, idx=range(6)),  # g not in the shortlist
             query("q7", low_g, [nan] * 7)]  # a new individual: not counted
    truth = {"q1": "a", "q2": "b", "q3": "g", "q4": "g", "q5": "g", "q6": "g", "q7": NEW}
    counts = right_animal_places(engine, pairs, truth)
    assert list(counts) == list(PLACES) and all(v == 1 for v in counts.values())
