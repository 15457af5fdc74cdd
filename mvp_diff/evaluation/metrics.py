"""Pixel and image metrics of anomaly maps, from one sort of the scores.

All pixels of all test images are pooled (as the field reports them). The ROC and precision-recall
points are taken at every distinct score, so AUROC and AP equal scikit-learn's `roc_auc_score` and
`average_precision_score`; F1-max is the best F1 over those thresholds and IoU is measured at the
same threshold (pooled: IoU = TP / (TP + FP + FN)). Undefined values (no positives or no negatives)
are NaN.
"""

import math

import numpy as np


def _counts(scores, labels):
    """(tps, fps, thresholds) at each distinct score, from the highest score down."""
    scores = np.asarray(scores, dtype=np.float64).ravel()  # unsigned or bool scores would wrap on negation
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.size != labels.size:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # end of each run of equal scores
    tps = np.cumsum(labels, dtype=np.int64)[last]
    fps = last + 1 - tps
    return tps, fps, scores[last]


def auroc(scores, labels):
    return _auroc(*_counts(scores, labels))


def _auroc(tps, fps, _thresholds):
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return math.nan
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(scores, labels):
    """Sum over thresholds of (recall step) x precision, as scikit-learn defines it."""
    return _average_precision(*_counts(scores, labels))


def _average_precision(tps, fps, _thresholds):
    if tps.size == 0 or tps[-1] == 0:
        return math.nan
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores, labels):
    """(best F1, its threshold, IoU at that threshold); a pixel is positive when score >= threshold."""
    return _f1_max(*_counts(scores, labels))


def _f1_max(tps, fps, thresholds):
    if tps.size == 0 or tps[-1] == 0:
        return math.nan, math.nan, math.nan
    positives = tps[-1]
    f1 = 2 * tps / (tps + fps + positives)  # = 2PR / (P + R)
    best = int(np.argmax(f1))
    iou = tps[best] / (fps[best] + positives)  # TP / (TP + FP + FN)
    return float(f1[best]), float(thresholds[best]), float(iou)


def iou_at(scores, labels, threshold):
    """Pooled IoU of (score >= threshold) against the labels; NaN when both are empty."""
    pred = np.asarray(scores).ravel() >= threshold
    labels = np.asarray(labels).ravel().astype(bool)
    union = np.count_nonzero(pred | labels)
    return float(np.count_nonzero(pred & labels) / union) if union else math.nan


def segmentation_metrics(maps, masks, image_labels=None, val_threshold=None):
    """Metrics of anomaly maps (N x H x W, higher = more anomalous) against bool masks (N x H x W).

    Image labels default to "mask has a pixel"; the image score is the maximum of its map.
    `val_threshold` (chosen on validation data) adds `iou_val_threshold`.
    """
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ")
    labels = masks.reshape(len(masks), -1).any(1) if image_labels is None else np.asarray(image_labels).astype(bool)
    image_scores = maps.reshape(len(maps), -1).max(1)
    counts = _counts(maps, masks)  # one sort of all pixels serves the three pixel metrics
    f1, threshold, iou = _f1_max(*counts)
    out = {
        "pixel_auroc": _auroc(*counts),
        "pixel_ap": _average_precision(*counts),
        "pixel_f1_max": f1,
        "iou": iou,
        "threshold": threshold,
        "image_auroc": auroc(image_scores, labels),
        "image_ap": average_precision(image_scores, labels),
    }
    if val_threshold is not None:
        out["iou_val_threshold"] = iou_at(maps, masks, val_threshold)
    return out
