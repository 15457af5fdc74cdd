"""Pixel and image metrics of anomaly maps, from one sort of the scores.

All pixels of all test images are pooled (as the field reports them). The ROC and precision-recall
points are taken at every distinct score, so AUROC and AP equal scikit-learn's `roc_auc_score` and
`average_precision_score`; F1-max is the best F1 over those thresholds. The pooled IoU at that same
threshold is F1 / (2 - F1), so it carries no information beyond F1-max; the IoUs worth reporting are
`per_image_best_iou` (SeaS/LFD) and the IoU at a threshold chosen on validation data (`iou_at`).
AUPRO is the per-region overlap curve's area up to a false-positive rate of 0.3. Undefined values
(no positives or no negatives) are NaN.
"""

import math

import cv2
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


# sjtuplayer/anomalydiffusion test-localization.py: pixel F1-max over the 21 thresholds 0, 0.05, ..., 1
# with `score > t` and an epsilon of 1e-8 in every ratio, on maps in [0, 1] (softmax scores).
PEER_F1_THRESHOLDS = np.arange(0.0, 1.0 + 1e-3, 0.05)


def f1_max_at_thresholds(scores, labels, thresholds=PEER_F1_THRESHOLDS, eps=1e-8):
    """Best pixel F1 over fixed thresholds, a pixel positive when score > threshold (AnomalyDiffusion's
    rule; it differs from f1_max, which takes every threshold and `>=`)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    best = -math.inf
    for t in thresholds:
        predicted = scores > t
        tp = np.logical_and(labels, predicted).sum()
        precision, recall = tp / (predicted.sum() + eps), tp / (labels.sum() + eps)
        best = max(best, 2 * precision * recall / (precision + recall + eps))
    return float(best)


def image_f1_max(labels, scores):
    """Best F1 of image scores against image labels over every threshold, as AnomalyDiffusion
    (`test-localization.py`) and LFD (`models/_LFD.py`) take it from scikit-learn's
    `precision_recall_curve`; note the (labels, scores) order of those callers."""
    return _f1_max(*_counts(scores, labels))[0]


def per_image_best_iou(scores, gt_masks):
    """SeaS's IoU, computed by its segmentation model LFD (HUST-SLOW/LFD `utils/utils.py` `iou_curve`,
    called per test image in `models/_LFD.py`): for every test image with a defect, the best
    TP / (TP + FP + FN) over all thresholds at its own distinct scores (pixel positive when
    score >= threshold), averaged over those images; defect-free images take no part.

    `scores` and `gt_masks` are N x H x W. NaN when no image has a defect pixel."""
    scores = np.asarray(scores, dtype=np.float64)
    gt_masks = np.asarray(gt_masks).astype(bool)
    if scores.shape != gt_masks.shape:
        raise ValueError(f"scores {scores.shape} and masks {gt_masks.shape} differ")
    best = []
    for image_scores, mask in zip(scores, gt_masks):
        if mask.any():
            tps, fps, _ = _counts(image_scores, mask)
            best.append(float(np.max(tps / (fps + tps[-1]))))  # TP + FN = all positives
    return float(np.mean(best)) if best else math.nan


def _regions(gt_masks):
    """(region id per pixel, 0 = defect-free, 1..K), number of regions K, pixels per region) of
    N x H x W masks; regions are 8-connected components of each image's mask, as in both references."""
    ids = np.zeros(gt_masks.shape, np.int64)
    count = 0
    for image_ids, mask in zip(ids, gt_masks):
        n, labelled = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        image_ids[...] = np.where(labelled > 0, labelled + count, 0)
        count += n - 1
    return ids, count, np.bincount(ids.ravel(), minlength=count + 1)


def aupro(scores, gt_masks, fpr_limit=0.3):
    """Area under the per-region overlap (PRO) curve up to `fpr_limit`, divided by `fpr_limit`.

    At a threshold t, PRO is the mean over all ground-truth regions (8-connected components of each
    image's mask, all images pooled) of the fraction of the region's pixels with score >= t, and the
    FPR is the fraction of all defect-free pixels with score >= t. This is the definition of
    anomalib (`src/anomalib/metrics/aupro.py`, default exact thresholds) and of the MVTec code that
    AnomalyDiffusion ships (`unet_utils/au_pro_util.py`, `calculate_au_pro` with integration limit
    0.3, divided by 0.3). Here the curve is exact: one point at every distinct score (both
    references resample or subsample it), from (0, 0), integrated by trapezoids with the point at
    `fpr_limit` linearly interpolated.

    `scores` and `gt_masks` are N x H x W. NaN when there is no region or no defect-free pixel."""
    scores = np.asarray(scores, dtype=np.float64)
    gt_masks = np.asarray(gt_masks).astype(bool)
    if scores.shape != gt_masks.shape:
        raise ValueError(f"scores {scores.shape} and masks {gt_masks.shape} differ")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit {fpr_limit} is not in (0, 1]")
    ids, n_regions, sizes = _regions(gt_masks.reshape((-1,) + gt_masks.shape[-2:]))
    ids = ids.ravel()
    n_normal = int(sizes[0])
    if n_regions == 0 or n_normal == 0:
        return math.nan
    # each region pixel adds 1 / (its region's size x number of regions) to PRO when it turns positive
    weight = np.where(ids > 0, 1.0 / (sizes[ids] * n_regions), 0.0)
    order = np.argsort(-scores.ravel(), kind="stable")
    sorted_scores = scores.ravel()[order]
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]  # end of each tie run
    pro = np.r_[0.0, np.cumsum(weight[order])[last]]
    fpr = np.r_[0.0, np.cumsum(ids[order] == 0)[last] / n_normal]
    end = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first point at or past the limit
    x, y = fpr[:end], pro[:end]
    y_limit = y[-1] + (pro[end] - y[-1]) * (fpr_limit - x[-1]) / (fpr[end] - x[-1])
    x, y = np.r_[x, fpr_limit], np.r_[y, y_limit]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def iou_at(scores, labels, threshold):
    """Pooled IoU of (score >= threshold) against the labels; NaN when both are empty."""
    pred = np.asarray(scores).ravel() >= threshold
    labels = np.asarray(labels).ravel().astype(bool)
    union = np.count_nonzero(pred | labels)
    return float(np.count_nonzero(pred & labels) / union) if union else math.nan


def segmentation_metrics(maps, masks, image_labels=None, val_threshold=None):
    """Metrics of anomaly maps (N x H x W, higher = more anomalous) against bool masks (N x H x W).

    Image labels default to "mask has a pixel"; the image score is the maximum of its map.
    `val_threshold` (chosen on validation data) adds `iou_val_threshold`. "iou" is the pooled IoU at
    the test set's F1-max threshold, i.e. pixel_f1_max / (2 - pixel_f1_max): kept for existing
    readers, not a metric of its own; "per_image_iou" is SeaS/LFD's IoU.
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
        "per_image_iou": per_image_best_iou(maps, masks),
        "aupro": aupro(maps, masks),
        "image_auroc": auroc(image_scores, labels),
        "image_ap": average_precision(image_scores, labels),
        "image_f1_max": image_f1_max(labels, image_scores),
    }
    if val_threshold is not None:
        out["iou_val_threshold"] = iou_at(maps, masks, val_threshold)
    return out
