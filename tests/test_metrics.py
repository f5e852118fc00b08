import pytest

from engine.metrics import NEW_INDIVIDUAL as NEW, average_precision_at_5, roc_auc, score_predictions


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
    assert score_predictions({"a": "x"}, {})["missing"] == 1


def test_roc_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1, 0, 1], [1, 1, 1, 1]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0], [3, 2, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])
