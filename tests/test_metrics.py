"""Metrics against independent computations: scikit-learn, brute force over every threshold with
scipy's connected components, and small hand-computed cases."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import jaccard_score, precision_recall_curve

from mvp_diff.evaluation import metrics


def _blobs(rng, n=4, h=16, w=14):
    """Masks with several 8-connected regions of different sizes per image, one defect-free image,
    and maps that score defects higher on average, rounded so that many scores tie."""
    masks = np.zeros((n, h, w), bool)
    for i in range(n - 1):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            masks[i, y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = True
    masks[1, 0, 0] = masks[1, 1, 1] = True  # diagonal neighbours: one region under 8-connectivity
    maps = np.round(rng.random((n, h, w)) * 0.7 + 0.4 * masks, 2)
    return maps, masks


def _brute_aupro(maps, masks, limit):
    """PRO curve point by point: label regions with scipy, threshold at every distinct score."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3), int))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    keep = fpr <= limit
    x, y = fpr[keep], pro[keep]
    after = np.flatnonzero(~keep)[0]
    y_limit = np.interp(limit, [fpr[after - 1], fpr[after]], [pro[after - 1], pro[after]])
    x, y = np.r_[x, limit], np.r_[y, y_limit]
    return np.trapezoid(y, x) / limit


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("limit", [0.3, 0.05])
def test_aupro_matches_brute_force(seed, limit):
    maps, masks = _blobs(np.random.default_rng(seed))
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(_brute_aupro(maps, masks, limit), abs=1e-3)


def test_aupro_hand_computed():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True  # region A: 1 pixel
    masks[0, 2:4, 2:4] = True  # region B: 4 pixels
    perfect = masks.astype(float)
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    assert metrics.aupro(1 - perfect, masks) == pytest.approx(0.0)
    # A found first (PRO 1/2 at FPR 0), then 2 of 11 defect-free pixels (FPR 2/11), then B: the
    # curve is flat at 1/2 up to 2/11 and 1 after, regions weigh alike whatever their size
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0], maps[0, 0, 2:4], maps[0, 2:4, 2:4] = 1.0, 0.9, 0.8
    expected = (0.5 * 2 / 11 + 1.0 * (0.3 - 2 / 11)) / 0.3  # the vertical step adds no area
    assert metrics.aupro(maps, masks) == pytest.approx(expected)
    assert math.isnan(metrics.aupro(maps, np.zeros_like(masks)))
    with pytest.raises(ValueError):
        metrics.aupro(maps, masks, fpr_limit=1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_best_iou_matches_brute_force(seed):
    maps, masks = _blobs(np.random.default_rng(seed))
    expected = []
    for image, mask in zip(maps, masks):
        if mask.any():  # defect-free images take no part
            expected.append(max(jaccard_score(mask.ravel(), image.ravel() >= t) for t in np.unique(image)))
    assert metrics.per_image_best_iou(maps, masks) == pytest.approx(np.mean(expected))
    maps[-1] = 1.0  # a defect-free image scored as all defect changes nothing
    assert metrics.per_image_best_iou(maps, masks) == pytest.approx(np.mean(expected))


def test_per_image_best_iou_hand_computed():
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]], [[0, 0, 0, 0]]], bool)
    maps = np.array([[[0.9, 0.5, 0.7, 0.1]], [[0.2, 0.2, 0.2, 0.2]], [[0.0, 0.0, 0.0, 0.0]]])
    # image 0: >= 0.9 gives 1/2, >= 0.7 gives 1/3, >= 0.5 gives 2/3; image 1: all tie, 1/4
    assert metrics.per_image_best_iou(maps, masks) == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert math.isnan(metrics.per_image_best_iou(maps, np.zeros_like(masks)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_f1_max_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.random(40) + 0.3 * labels, 1)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / (precision + recall)
    assert metrics.image_f1_max(labels, scores) == pytest.approx(np.max(f1[np.isfinite(f1)]))


def test_pooled_iou_at_f1_max_is_f1_over_two_minus_f1():
    maps, masks = _blobs(np.random.default_rng(5))
    out = metrics.segmentation_metrics(maps, masks)
    f1 = out["pixel_f1_max"]
    assert out["iou"] == pytest.approx(f1 / (2 - f1))
    assert out["aupro"] == pytest.approx(metrics.aupro(maps, masks))
    assert out["per_image_iou"] == pytest.approx(metrics.per_image_best_iou(maps, masks))
    assert out["image_f1_max"] == pytest.approx(metrics.image_f1_max(masks.any((1, 2)), maps.max((1, 2))))


def test_peer_f1_uses_21_thresholds_and_strict_greater():
    """AnomalyDiffusion's pixel F1-max (test-localization.py): thresholds 0, 0.05, ..., 1, `score > t`.
    A hand-made case where `>=` at every threshold would reach F1 1 but the peer's rule cannot."""
    scores = np.array([0.5, 0.5, 0.2, 0.0])
    labels = np.array([1, 1, 0, 0], bool)
    # t = 0.2: > keeps the two 0.5s exactly -> F1 1; t = 0.5: nothing positive.
    assert metrics.f1_max_at_thresholds(scores, labels) == pytest.approx(1.0, abs=1e-6)
    labels = np.array([1, 1, 1, 0], bool)  # the 0.2 pixel is positive too: best is t = 0.15 (> keeps all three)
    assert metrics.f1_max_at_thresholds(scores, labels) == pytest.approx(1.0, abs=1e-6)
    labels = np.array([1, 0, 0, 0], bool)  # ties at 0.5 cannot be split: P = 1/2, R = 1
    assert metrics.f1_max_at_thresholds(scores, labels) == pytest.approx(2 / 3, abs=1e-6)
    rng = np.random.default_rng(0)
    scores, labels = rng.random(500), rng.random(500) < 0.3
    brute = max(
        2 * (labels & (scores > t)).sum() / ((scores > t).sum() + labels.sum()) if (scores > t).any() else 0.0
        for t in np.arange(0, 1.0001, 0.05)
    )
    assert metrics.f1_max_at_thresholds(scores, labels) == pytest.approx(brute, abs=1e-6)
