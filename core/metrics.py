"""Scoring of predictions: MAP@5 as in the Kaggle humpback/Happywhale competitions, top-k,
new-individual precision/recall/F1, and ROC AUC for pair classifiers."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

NEW_INDIVIDUAL = "new_individual"


def average_precision_at_5(truth: str, predictions: Sequence[str]) -> float:
    """1/rank of the true ID within the first five predictions, 0 if absent."""
    top = list(predictions)[:5]
    return 1.0 / (top.index(truth) + 1) if truth in top else 0.0


def score_predictions(truth: Mapping[str, str], predictions: Mapping[str, Sequence[str]]) -> dict:
    """MAP@5, top-1, top-5, new-individual precision / recall / F1 (of answering `new_individual`
    first), as the evaluation protocol's scorer computes them. A query with no prediction counts as
    wrong. A figure about queries there are none of is None ("n/a"), where the protocol's scorer
    prints 0: the known-animal figures without known animals, new recall and F1 without new ones.
    New precision when nothing was answered `new_individual` is 0 by convention, as there."""
    n = len(truth)
    if n == 0:
        raise ValueError("no labelled queries to score")
    ap = top1 = top5 = 0.0
    tp = fp = fn = 0
    missing = 0
    known = known_top1 = known_top5 = 0
    for image, tid in truth.items():
        pred = predictions.get(image)
        if pred is None:
            missing += 1
            pred = []
        pred = list(pred)[:5]
        ap += average_precision_at_5(tid, pred)
        top5 += tid in pred
        top1 += bool(pred) and pred[0] == tid
        said_new = bool(pred) and pred[0] == NEW_INDIVIDUAL
        if tid == NEW_INDIVIDUAL:
            tp += said_new
            fn += not said_new
        else:
            fp += said_new
            known += 1
            known_top1 += bool(pred) and pred[0] == tid
            known_top5 += tid in pred
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else None
    return {
        "queries": n,
        "missing": missing,
        "map5": ap / n,
        "top1": top1 / n,
        "top5": top5 / n,
        "known_top1": known_top1 / known if known else None,
        "known_top5": known_top5 / known if known else None,  # the right animal among the five answers
        "new_precision": prec,
        "new_recall": rec,
        "new_f1": None if rec is None else 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "new_share_truth": (tp + fn) / n,
    }


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (scikit-learn's; ties count half)."""
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("AUC needs both positive and negative pairs")
    from sklearn.metrics import roc_auc_score  # (imported when used: `--help` starts faster)

    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))
