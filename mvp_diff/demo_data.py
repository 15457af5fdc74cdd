"""A small dataset in the exact MVTec AD layout, built from photographs that ship with scikit-image
plus procedural defects whose masks are exact (a pixel is in the mask iff the defect changed it).

Classes:
- `bottle`: RGB 256x256, one object seen from above in every image (a cup's rim and interior, turned
  by any angle and shifted a few pixels, as MVTec AD's bottles are) on a plain dark background, so
  that a foreground exists. Defects: `broken_large` (a dark irregular chip), `contamination` (1-3 tinted spots).
- `grid`: single-channel grey 224x224 crops of a brick texture. Defects: `broken` (a patch of another
  texture), `thread` (1-2 thin bright curves).
"""

from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

from .files import atomic_write_text, save_image

DEMO_CLASSES = {
    "bottle": {"size": 256, "defects": ("broken_large", "contamination")},
    "grid": {"size": 224, "defects": ("broken", "thread")},
}


def _light(image, rng, low=0.88, high=1.12):
    """Global brightness/contrast change, as lighting varies between shots."""
    gain, bias = rng.uniform(low, high), rng.uniform(-8, 8)
    return np.clip(image.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)


def _bottle_good(rng, size):
    # One object seen again and again, as in MVTec AD: the cup's interior (its rim and crema) seen
    # from above, centred within a few pixels and turned by any angle, like a bottle's top view.
    texture = skdata.coffee()  # 400x600 RGB; the cup's interior is centred near (290, 140)
    centre = (290 + rng.uniform(-4, 4), 140 + rng.uniform(-4, 4))
    turn = cv2.getRotationMatrix2D(centre, rng.uniform(0, 360), size / 320)  # the rim at the disc's edge
    turn[:, 2] += (size / 2 - centre[0], size / 2 - centre[1])
    crop = cv2.warpAffine(texture, turn, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    yy, xx = np.mgrid[:size, :size]
    cx, cy = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
    r = np.hypot(xx - cx, yy - cy)
    radius = size * 0.36
    rings = (0.85 + 0.15 * np.cos(r / radius * 9.0))[..., None]  # the bottle's rim and neck
    disc = np.clip(crop.astype(np.float32) * rings, 0, 255)
    background = np.full((size, size, 3), (22, 24, 28), np.float32) + rng.normal(0, 2, (size, size, 3))
    alpha = np.clip(radius - r + 0.5, 0, 1)[..., None]  # antialiased edge
    image = np.clip(disc * alpha + background * (1 - alpha), 0, 255).astype(np.uint8)
    foreground = r < radius - 4
    return _light(image, rng), foreground


def _grid_good(rng, size):
    texture = skdata.brick()  # 512x512 grey
    y, x = rng.integers(0, texture.shape[0] - size), rng.integers(0, texture.shape[1] - size)
    return _light(texture[y : y + size, x : x + size], rng), np.ones((size, size), bool)


def _blob(rng, size, centre, radius):
    """Irregular filled polygon around `centre`."""
    n = 9
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.0, n)
    pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1).astype(np.int32)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def _curve(rng, size, foreground, thickness=2):
    mask = np.zeros((size, size), np.uint8)
    ys, xs = np.nonzero(foreground)
    i = rng.integers(len(xs))
    p = np.array([xs[i], ys[i]], float)
    direction = rng.uniform(0, 2 * np.pi)
    points = [p.copy()]
    for _ in range(int(rng.integers(8, 14))):
        direction += rng.normal(0, 0.35)
        p = p + 5 * np.array([np.cos(direction), np.sin(direction)])
        points.append(p.copy())
    cv2.polylines(mask, [np.array(points, np.int32)], False, 1, thickness)
    return mask.astype(bool) & foreground


def _point_inside(rng, foreground, margin):
    inner = cv2.erode(foreground.astype(np.uint8), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)).astype(bool)
    ys, xs = np.nonzero(inner if inner.any() else foreground)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def _add_defect(image, foreground, defect, rng):
    """(defect image, exact bool mask)."""
    size = image.shape[0]
    out = image.astype(np.float32).copy()
    if defect == "broken_large":
        mask = _blob(rng, size, _point_inside(rng, foreground, 24), rng.uniform(14, 24)) & foreground
        out[mask] = out[mask] * 0.25 + rng.normal(0, 4, (int(mask.sum()), 3))
    elif defect == "contamination":
        mask = np.zeros(foreground.shape, bool)
        for _ in range(int(rng.integers(1, 4))):  # several separate regions in some masks
            mask |= _blob(rng, size, _point_inside(rng, foreground, 10), rng.uniform(4, 8)) & foreground
        out[mask] = out[mask] * 0.5 + np.array([90.0, 60.0, 10.0])
    elif defect == "broken":
        mask = _blob(rng, size, _point_inside(rng, foreground, 20), rng.uniform(12, 20))
        other = cv2.resize(skdata.gravel(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
        out[mask] = other[mask] * 0.6 + 100.0
    elif defect == "thread":
        mask = np.zeros(foreground.shape, bool)
        for _ in range(int(rng.integers(1, 3))):
            mask |= _curve(rng, size, foreground)
        out[mask] = 235.0 + rng.normal(0, 3, int(mask.sum()))
    else:
        raise ValueError(f"unknown demo defect {defect}")
    out = np.clip(out, 0, 255).astype(np.uint8)
    mask &= np.any((out != image).reshape(size, size, -1), axis=2)  # exact: only pixels that changed
    return out, mask


def build_class(root, classname, n_train_good=10, n_test_good=4, n_anomalies=6, seed=0):
    spec = DEMO_CLASSES[classname]
    size = spec["size"]
    make_good = _bottle_good if classname == "bottle" else _grid_good
    rng = np.random.default_rng([seed, list(DEMO_CLASSES).index(classname)])
    folder = Path(root) / classname
    for split, count in (("train", n_train_good), ("test", n_test_good)):
        for i in range(count):
            save_image(folder / split / "good" / f"{i:03d}.png", make_good(rng, size)[0])
    for defect in spec["defects"]:
        for i in range(n_anomalies):
            good, foreground = make_good(rng, size)
            image, mask = _add_defect(good, foreground, defect, rng)
            save_image(folder / "test" / defect / f"{i:03d}.png", image)
            save_image(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return folder


def build_demo_dataset(root, classes=tuple(DEMO_CLASSES), n_train_good=10, n_test_good=4, n_anomalies=6, seed=0):
    """Build (or reuse, when already complete with the same settings) the demo dataset under `root`."""
    root = Path(root)
    stamp = f"classes={','.join(classes)} train={n_train_good} test={n_test_good} anomalies={n_anomalies} seed={seed}\n"
    marker = root / ".mvp_diff_demo"
    if marker.is_file() and marker.read_text() == stamp:
        return root
    for classname in classes:
        build_class(root, classname, n_train_good, n_test_good, n_anomalies, seed)
    atomic_write_text(marker, stamp)
    return root
