"""Precise defect masks: the pixels inside the box where a generated image differs from the
defect-free image it was painted on.

Three methods:
- "default": colour difference in CIELAB (sees brightness, colour and grey-level changes),
  tolerant to the blur, noise and smooth colour drift a VAE round trip leaves, plus a
  loss-of-local-contrast term and a loss-of-fine-structure (band-pass) term for texture changes
  and blur; hysteresis threshold on absolute
  levels (an unchanged box gives an empty mask; a region seeded only on the defect-free image's
  edges, where a round trip's errors gather, is dropped), borders where the score falls off (for
  a tint, where its colour change falls under 0.45 of its peak), speck removal, small-hole
  filling. numpy/OpenCV only; about four times a 512x512 colour Gaussian blur
  per 512 px image (benchmarks/results/masks.md).
- "learned": the default method's terms, at several scales, fed to a tiny per-pixel classifier
  (mask_head.npz, 4 KB, trained by benchmarks/train_mask_head.py on the mask benchmark's tune
  split only, with the terms of default method version 3: heads retrained on later terms marked
  more unchanged boxes), then hysteresis on its probability and the same clean-up; boxes smaller
  than any it was trained on go to the default method. numpy only.
- "official": the paper's algorithm (1 - cosine similarity of RGB vectors, min-max
  normalisation, Otsu, small-region removal, dense CRF) with the published code's numeric bugs
  fixed. Blind to grey images and to brightness-only changes by design; kept for comparison.
"""

import functools
import hashlib
import inspect
from pathlib import Path

import cv2
import numpy as np

from .errors import UsageError, UserError

MASK_METHODS = ("default", "official", "learned")
# Bumped whenever a method's masks change for the same inputs: Stage 3 never mixes two versions.
MASK_METHOD_VERSIONS = {"default": "7", "official": "1", "learned": "5"}


def mask_method_version(method):
    """The method's version; for "learned", with the digest of its weights file."""
    version = MASK_METHOD_VERSIONS.get(method, "?")
    if method == "learned" and MASK_HEAD.is_file():
        version += "-" + hashlib.sha256(MASK_HEAD.read_bytes()).hexdigest()[:12]
    return f"{method} {version}"


def extract_mask(anomaly, normal, box, method="default", reference=None, at_generator_size=False, **options) -> np.ndarray:
    """Bool HxW mask of the defect: pixels inside `box` where `anomaly` differs from `normal`.

    anomaly, normal: uint8 HxWx3 (RGB) or HxW (grey) arrays of the same size; box: HxW mask, nonzero
    inside the box(es) (0/255 as written on disk). The result is always inside the box and empty when
    nothing visible changed. reference: optional, the defect-free image after the generator's own
    VAE round trip (`vae.decode(vae.encode(normal))`, same size): inside the box the generated
    pixels come from the VAE decoder, so what the round trip alone explains is not a defect. The
    default method takes a pixel as changed only when neither image explains it; the official
    method compares with the reference instead of `normal`. at_generator_size: the images are the
    generator's output at the size it made them, not enlarged since (Stage 3 measures there): a VAE
    round trip's blur and noise then keep their size in pixels however large the image, and the
    sizes of the default and learned methods stop growing at 512 px. False (the default): they grow
    with images over 512 px, as on an image enlarged from a 512 px generation, where capping them
    marked 11 of 40 unchanged boxes (benchmarks/results/masks.md). `options` are the chosen
    method's keyword arguments. The default and learned methods measure each box (8-connected region of
    `box`) on its own (each_box); the official method, the paper's, the whole image at once.
    """
    if method not in _METHODS:
        raise UsageError(f"--mask_method: unknown method {method!r}; choose one of {', '.join(MASK_METHODS)}")
    func = _METHODS[method]
    allowed = _method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"mask method {method!r} has no option {', '.join(unknown)}; its options: {', '.join(allowed)}")
    anomaly, normal, box, reference = prepare_inputs(anomaly, normal, box, reference)
    if not box.any():
        return np.zeros(box.shape, dtype=bool)
    if method == "official":  # the paper's algorithm normalises over the whole image
        return func(anomaly, normal, box, reference=reference, **options) & box
    scale = _size_scale(box.shape, at_generator_size)
    mask = np.zeros(box.shape, dtype=bool)
    for one in each_box(box):
        mask |= func(anomaly, normal, one, reference=reference, scale=scale, **options)
    return mask & box


def resize_mask(mask, shape):
    """Bool mask `mask` resized to `shape` (h, w): bilinear, kept where at least half covered (a
    mask measured where the generator worked, on the image at the original size)."""
    return cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR) >= 0.5


def each_box(box):
    """The boxes of a non-empty bool box mask (its 8-connected regions), one image-sized bool mask
    each. The default and learned methods measure every box on its own: its own ring gives the
    drift, blur and noise it allows for, a defect in one box neither raises another's thresholds
    nor removes its small regions, and the work stays within each box's own rectangle (two boxes
    far apart would otherwise share one large crop)."""
    rows, cols = _bounds(box)  # label only the boxes' bounding rectangle: the whole image costs more
    count, labels = cv2.connectedComponents(box[rows, cols].astype(np.uint8), connectivity=8)
    if count <= 2:
        return [box]
    boxes = []
    for i in range(1, count):
        one = np.zeros_like(box)
        one[rows, cols] = labels == i
        boxes.append(one)
    return boxes


@functools.cache
def _method_options(method):
    """The keyword options a mask method takes (its parameters after the images)."""
    return [p for p in inspect.signature(_METHODS[method]).parameters if p not in ("anomaly", "normal", "box", "reference", "scale")]


def prepare_inputs(anomaly, normal, box, reference=None):
    """(anomaly, normal, bool box, reference) checked as extract_mask takes them: uint8, one size,
    all grey or all RGB (a grey image beside RGB ones is compared as RGB)."""
    anomaly, normal, box = _check_inputs(anomaly, normal, box)
    if reference is not None:
        reference = _as_image(reference, "reference")
        if reference.shape[:2] != normal.shape[:2]:
            raise UserError(f"reference image is {_size(reference)} but the defect-free image is {_size(normal)}; pass its VAE round trip at the same size")
        if reference.ndim != normal.ndim:
            anomaly, normal, reference = _rgb(anomaly), _rgb(normal), _rgb(reference)
    return anomaly, normal, box, reference


# ---------------------------------------------------------------------------------------------
# inputs


def _as_image(array, name):
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA: alpha carries no defect
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise UserError(f"{name} image must be HxW (grey) or HxWx3 (RGB), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        # Other integer types are fine when in range; floats are ambiguous (0..1 or 0..255).
        if not np.issubdtype(arr.dtype, np.integer) or arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"{name} image must be uint8 (0..255), got {arr.dtype}")
        arr = arr.astype(np.uint8)
    return arr


def _size(arr):
    return f"{arr.shape[1]}x{arr.shape[0]}"


def _check_inputs(anomaly, normal, box):
    anomaly = _as_image(anomaly, "anomaly")
    normal = _as_image(normal, "normal")
    box = np.asarray(box)
    if box.ndim == 3:
        box = box.max(axis=2)
    if box.ndim != 2:
        raise UserError(f"box mask must be HxW, got shape {box.shape}")
    if anomaly.shape[:2] != normal.shape[:2]:
        raise UserError(
            f"anomaly image is {_size(anomaly)} but the defect-free image is {_size(normal)}; resize one to the other's size"
        )
    if box.shape != anomaly.shape[:2]:
        raise UserError(
            f"box mask is {_size(box)} but the images are {_size(anomaly)}; resize the box mask to the image size"
        )
    if anomaly.ndim != normal.ndim:  # one grey, one RGB: compare both as RGB
        anomaly, normal = _rgb(anomaly), _rgb(normal)
    return anomaly, normal, box > 0


def _rgb(arr):
    return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)


def _hysteresis(score, low, high, seeds=None):
    """Bool mask of the 4-connected regions above `low` that reach above `high` (as
    skimage.filters.apply_hysteresis_threshold, with OpenCV's faster labelling). seeds: another
    score that must reach above `high` instead, at a pixel of the region (default: `score`)."""
    seeds = score if seeds is None else seeds
    above = score > min(low, high)
    count, labels = cv2.connectedComponents(above.astype(np.uint8), connectivity=4)
    if count <= 1:
        return np.zeros(score.shape, dtype=bool)
    seeded = np.zeros(count, dtype=bool)
    seeded[labels[seeds > high]] = True  # pixels not above `low` have label 0: cleared below
    seeded[0] = False
    return seeded[labels]


def _fill_holes(mask):
    """`mask` with its holes filled (as scipy.ndimage.binary_fill_holes: background not
    4-connected to the border), by a flood fill of the background from outside."""
    height, width = mask.shape
    outside = np.zeros((height + 2, width + 2), np.uint8)
    outside[1:-1, 1:-1] = mask
    cv2.floodFill(outside, None, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2


def _remove_small(mask, min_area, min_fraction=0.1):
    """Drop 8-connected regions under `min_area` pixels or under `min_fraction` of the largest one."""
    # connectedComponentsWithStats costs several times the labelling alone: count the areas here.
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, dtype=bool)
    areas = np.bincount(labels.ravel(), minlength=n)[1:]
    keep = (areas >= min_area) & (areas >= min_fraction * areas.max())
    return np.concatenate([[False], keep])[labels]


# ---------------------------------------------------------------------------------------------
# default method


def _lab(img):
    """float32 CIELAB HxWx3 (L 0..100); grey images give HxW L only (a = b = 0 carries nothing)."""
    if img.ndim == 2:
        return cv2.cvtColor(cv2.merge([img.astype(np.float32) / 255.0] * 3), cv2.COLOR_RGB2Lab)[..., 0].copy()
    return cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _blur(img, sigma):
    return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) if sigma > 0 else img


def _delta(a, b):
    """Per-pixel Euclidean distance of two Lab images (CIE76 deltaE)."""
    d = a - b
    return np.sqrt(np.einsum("hwc,hwc->hw", d, d)) if d.ndim == 3 else np.abs(d)


def _min_delta(pairs):
    """The smallest _delta over (x, y) pairs of images."""
    return np.minimum.reduce([_delta(x, y) for x, y in pairs]) if len(pairs) > 1 else _delta(*pairs[0])


def _local_std(lum, sigma):
    mean = _blur(lum, sigma)
    return np.sqrt(np.maximum(_blur(lum * lum, sigma) - mean * mean, 0.0))


def _ring(inside, width):
    """The band of `width` pixels just inside the border of the box mask."""
    k = 2 * int(width) + 1
    core = cv2.erode(inside.astype(np.uint8), np.ones((k, k), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return inside & (core == 0)


def _remove_drift(a, n, inside, ring, max_bias):
    """`a` less the smooth offset of the signed Lab difference `a` - `n` inside the box (the drift
    of a VAE round trip); a new array.

    Fitted as a plane per channel, by trimmed least squares on the ring just inside the box border
    (a generated defect fills the box's interior; the ring is mostly unchanged), from the ring
    pixels that differ by at most 1.5 x `max_bias`, and capped at `max_bias`, so that a defect that
    covers part of the ring too cannot be explained away. One box: extract_mask measures each box
    on its own.
    """
    ys, xs = np.nonzero(ring)
    values = (a[ys, xs] - n[ys, xs]).reshape(len(ys), -1).T.astype(np.float64)  # channels x ring pixels
    # Ring pixels changed by more than a drift can are the defect: leave them out, and fit nothing
    # in a channel where they are most of the ring.
    keep = np.abs(values) <= 1.5 * max_bias
    fitted = np.flatnonzero(keep.sum(axis=1) >= max(8, 0.25 * len(ys)))
    a = a.copy()
    if not len(fitted):
        return a
    values, keep = values[fitted], keep[fitted]
    cy, cx = ys.mean(), xs.mean()
    design = np.stack([np.ones(len(ys)), (ys - cy) / 100.0, (xs - cx) / 100.0])
    for _ in range(3):  # refit without the ring pixels the defect touches
        coef = _plane_fits(design, values, keep)
        resid = np.abs(values - coef @ design)
        keep &= resid <= np.array([[max(2.0 * _median(r[k]), 1e-3)] for r, k in zip(resid, keep)])
    # Only over the box's bounding rectangle: the crop's margin has no drift removed.
    rows, cols = _bounds(inside)
    gy = ((np.arange(rows.start, rows.stop) - cy) / 100.0)[:, None]
    gx = ((np.arange(cols.start, cols.stop) - cx) / 100.0)[None, :]
    region = inside[rows, cols]
    rectangle = region.all()  # a box drawn as a rectangle: no pixel to pick out
    channels = a[rows, cols][..., None] if a.ndim == 2 else a[rows, cols]
    for (c0, c1, c2), c in zip(coef, fitted):
        drift = np.clip(c0 + gy * c1 + gx * c2, -max_bias, max_bias).astype(np.float32)
        if rectangle:
            channels[..., c] -= drift
        else:
            channels[..., c][region] -= drift[region]
    return a


def _median(values):
    """float median of a non-empty 1-D array, as np.median gives it, without its overhead (this
    runs a dozen times per box on a few thousand values)."""
    half = len(values) // 2
    if len(values) % 2:
        return float(np.partition(values, half)[half])
    low, high = np.partition(values, (half - 1, half))[half - 1 : half + 1]
    return float((low + high) / 2)


def _plane_fits(design, values, keep):
    """Least-squares coefficients (C x 3) of `design` (3 x N) for each row of `values` (C x N) over
    its `keep` pixels, by the normal equations: 3 x 3 solves, all rows at once, far cheaper than an
    SVD on thousands of ring pixels and as exact here, the design being centred and scaled."""
    weight = keep.astype(np.float64)
    gram = np.stack([(weight * d) @ design.T for d in design], axis=1)  # C x 3 x 3
    rhs = (weight * values) @ design.T
    try:
        return np.linalg.solve(gram, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:  # ring pixels on one line: fall back to the minimum-norm fits
        return np.stack([np.linalg.lstsq(design[:, k].T, v[k], rcond=None)[0] for v, k in zip(values, keep)])


def _default(
    anomaly,
    normal,
    box,
    reference=None,
    scale=None,
    low=2.0,
    high=5.0,
    noise_factor=(4.0, 7.0),
    seed_edge=0.1,
    smooth=0.7,
    chroma_smooth=3.0,
    blur_tolerance=(0.8, 1.2, 1.6),
    contrast_weight=16.0,
    contrast_tolerance=0.3,
    contrast_blur=0.7,
    ring_explained=4.0,
    structure_weight=6.0,
    structure_sigma=1.0,
    structure_tolerance=0.1,
    max_bias=6.0,
    edge=0.65,
    edge_width=3,
    min_area=12,
    min_fraction=0.05,
    max_hole=250,
    tint=0.45,
    tint_ratio=0.35,
    tint_window=15,
    tint_band=5,
):
    """Changed pixels inside the box.

    The change score (CIELAB deltaE units; about 2.3 is just noticeable) is the larger of:
    - the colour difference of the lightly smoothed images after removing a smooth drift fitted on
      the ring just inside the box border, and the smallest over a blurred copy of the defect-free
      image (a VAE round trip blurs a little; it does not sharpen, so blurring the generated image
      instead would only explain away thin and faint defects);
    - `contrast_weight` x the loss of local contrast beyond `contrast_tolerance` (log ratio of local
      standard deviations of L): texture smoothed out or replaced at the same mean colour. The
      defect-free image's contrast is taken after blurring it by `contrast_blur` x the blur the
      ring shows (below): the round trip's own blur lowers fine contrast without any defect. Only
      when that blur explains the ring to within `ring_explained` deltaE (median): a ring left far
      from explained is covered by the defect, and the blur seen there is the defect's;
    - `structure_weight` x the loss of band-pass (sigma `structure_sigma`, 2 x that) energy of L
      against the normal image blurred as the ring says the round trip blurred, beyond
      `structure_tolerance` of it (see _structure_change); 0 turns it off.

    low/high: hysteresis thresholds; a region must reach `high` and grows down to `low`. Both are
    raised to noise_factor x the typical score on the box's ring when that is noisier (noise
    estimate capped at 1.5 deltaE, so a defect covering the whole box still shows).
    seed_edge: a region's seed must reach `high` after subtracting seed_edge x that noise estimate
    x the defect-free image's lightness gradient there (L units per pixel, largest within 1 px):
    the round trip's errors (blur, resampling, JPEG ringing) gather on edges and grow with its
    noise, so a region seeded on edges alone is an artifact. Growth down to `low` is unchanged.
    Chosen on the tune split (benchmarks/results/masks.md); 0 turns it off.
    smooth: Gaussian sigma (pixels at 512 px; all sizes scale with the image) on images and score.
    chroma_smooth: the colour difference is also taken with the colour (a, b) channels smoothed
    this much, and the smaller one counts: JPEG keeps colour at half resolution and the VAE's
    latent at an eighth, so fine colour detail differs without a defect.
    blur_tolerance: candidate sigmas of the blurred copies; the one that best explains the ring is
    used (the blur of the round trip varies). max_bias: largest drift removed, per Lab channel.
    edge: a region's border sits where its score falls to this fraction of the score nearby, not
    at `low`, so that soft edges do not fatten the mask. The score there is taken before its final
    `smooth`ing, which steadies detection but would widen the mask again. Above one half because
    the reference (the mean score of the region nearby) sits below the plateau on thin shapes,
    whose blurred profile never reaches it. A low `low` with this border lets a faint defect grow
    to its edge while `high` alone decides whether anything is marked (low 2, edge 0.65: chosen on
    the tune split, benchmarks/results/masks.md). edge_width (pixels at 512 px): only this band along a
    region's outer border is trimmed (about the width of a blurred rim); the inside stays whole,
    as a changed texture scores unevenly there.
    min_area (pixels at 512 px) and min_fraction (of the largest region): smaller regions are
    removed (the paper drops regions under 0.1 of the largest; 0.05 keeps small spots beside a
    large one). max_hole (pixels at 512 px): holes up to this size are filled (not drawn loops).
    tint: in a region whose change is mostly colour (its summed |change of L| under `tint_ratio`
    x its summed colour difference), keep only pixels whose unsmoothed score reaches this fraction
    of the highest score within `tint_window` pixels (at 512 px): a tint spreads past its border
    (JPEG and the VAE keep colour at lower resolution) and fades slowly, and its soft rim keeps the
    local mean low, so the `edge` rule alone leaves it too wide. Only the band of `tint_band`
    pixels (at 512 px) along the region's outer border is cut: a colour texture scores unevenly
    inside (cut throughout, a changed texture of colour noise fell from IoU 0.96 to 0.75). Grey
    images and lightness changes are never touched. Chosen on the tune split
    (benchmarks/results/masks.md); 0 turns it off.

    Over 80 lines because of its signature and this description of each tuned parameter; the body
    is one pass of about 50 lines (score, thresholds, edge trim, clean-up) that reads best whole.
    """
    parts = {}  # the score before its final smoothing places the border
    crop, inside, ring, scale, score = _box_crop_for(anomaly, normal, reference, box, parts, scale)
    settings = _score_settings(scale, smooth, chroma_smooth, blur_tolerance, contrast_weight, contrast_tolerance, contrast_blur, ring_explained, structure_weight, structure_sigma, structure_tolerance, max_bias)
    if score is None or settings != _default_settings(scale):
        score = _unexplained_score(anomaly[crop], normal[crop], None if reference is None else reference[crop], inside, ring, settings, parts)

    noise = min(_median(score[ring]) if ring.any() else 0.0, MAX_RING_NOISE)
    low, high = max(low, noise_factor[0] * noise), max(high, noise_factor[1] * noise)
    seeds = score - seed_edge * noise * _edge_strength(parts["normal_lightness"], scale) if seed_edge * noise > 0 else None
    mask = _hysteresis(score, low, high, seeds)
    if not mask.any():
        return np.zeros(box.shape, dtype=bool)

    if edge > 0:
        # Border: in the band along each region's border, keep pixels whose unsmoothed score
        # reaches `edge` x the mean score of the region nearby (twice, so the first pass's soft rim
        # does not lower the reference).
        found, sigma = mask, 4.0 * scale
        band = 2 * int(round(edge_width * scale)) + 1
        solid = _fill_holes(found).astype(np.uint8)  # holes' rims are not borders
        core = cv2.erode(solid, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (band, band))) > 0
        for _ in range(2):
            weight = mask.astype(np.float32)
            ref = _blur(score * weight, sigma) / np.maximum(_blur(weight, sigma), 1e-6)
            mask = found & (core | (parts["unsmoothed"] >= np.maximum(low, edge * ref)))

    if tint > 0:
        mask = _trim_tint(mask, found if edge > 0 else mask, parts, scale, tint, tint_ratio, tint_window, tint_band)

    out = np.zeros(box.shape, dtype=bool)
    out[crop] = _tidy(mask, inside, scale, min_area, min_fraction, max_hole)
    return out


# The most of the ring's typical change score (deltaE) the default method takes for the round trip's
# noise: a defect that covers the ring, or the whole box, would otherwise raise its own thresholds.
MAX_RING_NOISE = 1.5


def _trim_tint(mask, regions, parts, scale, tint, ratio, window, band):
    """`mask` with the rims of tinted regions cut (see _default's `tint`): in each 8-connected
    region of `regions` whose summed |change of L| is under `ratio` x its summed colour difference,
    pixels in the outer `band` (pixels at 512 px) whose unsmoothed score is under `tint` x the
    highest within `window` are dropped."""
    count, labels = cv2.connectedComponents(regions.astype(np.uint8), connectivity=8)
    lightness = np.bincount(labels.ravel(), np.abs(parts["lightness"]).ravel(), minlength=count)
    colour = np.bincount(labels.ravel(), parts["colour"].ravel(), minlength=count)
    tinted = lightness < ratio * colour
    tinted[0] = False
    if not tinted.any():
        return mask
    k = max(3, int(round(window * scale)) | 1)
    peak = cv2.dilate(np.where(regions, parts["unsmoothed"], 0).astype(np.float32), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    b = 2 * int(round(band * scale)) + 1
    inner = cv2.erode(_fill_holes(regions).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (b, b))) > 0
    return mask & (~tinted[labels] | inner | (parts["unsmoothed"] >= tint * peak))


def _edge_strength(lightness, scale):
    """Gradient magnitude of the defect-free image's CIELAB lightness (L units per pixel, as
    _change_score smoothed it), the largest within 1 px (at 512 px): where a round trip's errors
    gather."""
    strength = cv2.magnitude(cv2.Sobel(lightness, cv2.CV_32F, 1, 0), cv2.Sobel(lightness, cv2.CV_32F, 0, 1)) * np.float32(1 / 8)
    k = max(3, int(round(3 * scale)) | 1)
    return cv2.dilate(strength, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))


def _tidy(mask, inside, scale, min_area, min_fraction, max_hole):
    """Close 1-2 px gaps, fill small holes, drop specks (sizes in pixels at 512 px)."""
    k = max(3, int(round(3 * scale)) | 1)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0
    # Fill small holes (texture with a few unchanged pixels), not the inside of a drawn loop.
    holes = _fill_holes(mask) & ~mask
    if holes.any():
        mask |= holes & ~_remove_small(holes, max_hole * scale * scale, 0.0)
    return _remove_small(mask & inside, min_area * scale * scale, min_fraction)


def _bounds(mask):
    """(row slice, column slice) of the bounding rectangle of a non-empty bool mask (projections:
    far cheaper than np.nonzero on a whole image)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _size_scale(shape, at_generator_size=False):
    """Sizes are given for 512 px images: the factor for an image of this shape (at most 1 for the
    generator's own output, see extract_mask)."""
    scale = max(0.5, max(shape[:2]) / 512.0)
    return min(scale, 1.0) if at_generator_size else scale


# On an image under 448 px the sizes shrink with the image only while the box's ring is quiet. A
# round trip's blur, noise and JPEG blocks keep their size in pixels on a small image (they shrink
# only when the generated image was scaled down to it), and windows smaller than them let them
# through as specks. A ring whose 99th-percentile change score passes NOISY_RING (deltaE) shows
# them; the sizes then stay at NOISY_SCALE. Both chosen on the mask benchmark's tune split at 256 px
# (benchmarks/results/masks.md). A defect reaching the ring passes it too: such a box is measured at
# NOISY_SCALE, which costs a little on fine shapes and never adds specks.
NOISY_SCALE = 0.875
NOISY_RING = 2.5


def _box_crop_for(anomaly, normal, reference, box, parts=None, scale=None):
    """(*_box_crop(box, scale), score): the size scale kept at NOISY_SCALE on a small image whose
    ring is noisy. score: the change score with the default settings at the returned scale when the
    check computed it (its terms in `parts`), else None."""
    crop, inside, ring, scale = _box_crop(box, scale)
    if scale >= NOISY_SCALE or not ring.any():
        return crop, inside, ring, scale, None
    score = _unexplained_score(anomaly[crop], normal[crop], None if reference is None else reference[crop], inside, ring, _default_settings(scale), parts)
    if np.percentile(score[ring], 99) > NOISY_RING:
        if parts is not None:
            parts.clear()
        return (*_box_crop(box, NOISY_SCALE), None)
    return crop, inside, ring, scale, score


def _box_crop(box, scale=None):
    """(crop slices, box inside the crop, ring just inside its border, size scale to 512 px): work on
    the boxes' bounding rectangle plus a margin for the filters. scale: None for the image's own."""
    height, width = box.shape
    scale = _size_scale(box.shape) if scale is None else scale
    rows, cols = _bounds(box)
    pad = int(np.ceil(8 * scale))
    y0, y1 = max(0, rows.start - pad), min(height, rows.stop + pad)
    x0, x1 = max(0, cols.start - pad), min(width, cols.stop + pad)
    inside = box[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), inside, _ring(inside, max(2, round(3 * scale))), scale


def _score_settings(scale, smooth, chroma_smooth, blur_tolerance, contrast_weight, contrast_tolerance, contrast_blur, ring_explained, structure_weight, structure_sigma, structure_tolerance, max_bias):
    """The default method's score parameters, grouped as _change_score takes them after its images."""
    return (scale, (smooth, chroma_smooth), blur_tolerance, (contrast_weight, contrast_tolerance, contrast_blur, ring_explained), (structure_weight, structure_sigma, structure_tolerance), max_bias)


def _unexplained_score(anomaly, normal, reference, inside, ring, settings, parts=None):
    """_change_score against `normal`, and with a reference the smaller of it and the score against
    the reference, term by term in `parts`: changed only where neither image explains it."""
    scale, (smooth, _) = settings[:2]
    a = _smooth_lab(anomaly, smooth * scale)  # once for both comparisons
    score = _change_score(a, _smooth_lab(normal, smooth * scale), inside, ring, *settings, parts=parts)
    if reference is not None:
        other = None if parts is None else {}
        score = np.minimum(score, _change_score(a, _smooth_lab(reference, smooth * scale), inside, ring, *settings, parts=other))
        if parts is not None:
            for k in ("colour", "contrast", "structure", "unsmoothed"):
                parts[k] = np.minimum(parts[k], other[k])
            parts["lightness"] = np.where(np.abs(other["lightness"]) < np.abs(parts["lightness"]), other["lightness"], parts["lightness"])
    return score


def _smooth_lab(img, sigma):
    return _blur(_lab(img), sigma)


def _change_score(a, n, inside, ring, scale, smooth, blur_tolerance, contrast, structure, max_bias, parts=None):
    """Per-pixel change score (deltaE units), 0 outside the box, of the generated image `a` against
    the defect-free one `n`, both as _smooth_lab gives them (smoothed by `smooth`[0] x `scale`).
    `parts`: a dict to receive the terms before they are combined (colour, contrast, structure;
    the mask head's features) and the score before its final smoothing (unsmoothed; the border
    rule's)."""
    smooth, chroma_smooth = smooth

    # Colour/brightness change after removing the smooth drift, tolerant to a mild blur of the
    # generated image: the smallest difference to the defect-free image blurred over the levels, so
    # a defocused copy scores low. Only that direction: blurring the generated image too (as an
    # earlier version did) spreads a 1-2 px line to a third of its contrast and hides it.
    a = _remove_drift(a, n, inside, ring, max_bias)
    pairs = [(a, n)]
    if a.ndim == 3 and chroma_smooth > smooth:
        # Fine colour detail lost (JPEG, VAE) differs at the fine scale only; a changed colour at
        # both. The smaller of the two keeps a thin tinted line thin.
        coarse = [x.copy() for x in (a, n)]
        for x in coarse:
            x[..., 1:] = _blur(np.ascontiguousarray(x[..., 1:]), chroma_smooth * scale)
        pairs.append(tuple(coarse))
    # The blur level is chosen on the ring: the smallest sigma that explains it (10% margin). Each
    # level is judged on the ring's pixels alone; the whole box is compared at the chosen one.
    sharp = _min_delta(pairs)
    at_ring = np.flatnonzero(ring)  # taking by index is several times faster than by bool mask
    ring_pixels = [_pixels(x, at_ring) for x, _ in pairs]
    sharp_ring = sharp.ravel()[at_ring]
    best = None
    for sigma in np.atleast_1d(blur_tolerance):
        blurred = [_blur(y, sigma * scale) for _, y in pairs] if sigma > 0 else None
        ring_diff = sharp_ring
        if blurred is not None:
            ring_diff = np.minimum(ring_diff, _min_delta([(x, _pixels(b, at_ring)) for x, b in zip(ring_pixels, blurred)])[:, 0])
        level = _median(ring_diff) if ring.any() else 0.0
        if best is None or level < 0.9 * best[0]:
            best = (level, blurred, sigma)
    diff = sharp if best[1] is None else np.minimum(sharp, _min_delta([(x, b) for (x, _), b in zip(pairs, best[1])]))

    # Loss of local contrast: texture smoothed out or replaced at the same mean colour. Only the
    # loss counts: a gain also appears just outside the edge of any brightness change. Measured
    # against the defect-free image blurred by part of the ring's blur level: unblurred, a fine
    # texture's contrast lost to the round trip alone marked unchanged boxes (a third of the false
    # alarms on the mask benchmark's tune split; benchmarks/results/masks.md). Not when that level
    # leaves the ring far from explained: a blurred defect covering the ring would explain itself.
    contrast_weight, contrast_tolerance, contrast_blur, ring_explained = contrast
    la, ln = (a, n) if a.ndim == 2 else (a[..., 0], n[..., 0])
    eps = 2.0  # L units: below this, contrast is flat whatever the ratio
    round_trip_blur = contrast_blur * best[2] * scale if best[0] <= ring_explained else 0.0
    loss = np.log((_local_std(_blur(ln, round_trip_blur), 2 * scale) + eps) / (_local_std(la, 2 * scale) + eps))
    texture = contrast_weight * np.maximum(loss - contrast_tolerance, 0.0)
    score = np.maximum(diff, texture)

    weight, sigma, tolerance = structure
    if weight > 0:
        # Against the normal image blurred as much as the ring says the round trip blurred.
        ref = _blur(ln, best[2] * scale)
        structure_loss = weight * _structure_change(la, ref, sigma * scale, tolerance)
        score = np.maximum(score, structure_loss)
    if parts is not None:
        parts.update(colour=diff, contrast=texture, structure=structure_loss if weight > 0 else np.zeros_like(diff), lightness=la - ln, unsmoothed=score, normal_lightness=ln)

    score = _blur(score, smooth * scale)
    score[~inside] = 0.0
    return score


def _pixels(img, index):
    """The pixels of `img` at flat `index`, as an image one pixel wide."""
    return img.reshape(-1, *img.shape[2:])[index][:, None]


def _structure_change(la, ln, sigma, tolerance):
    """Local loss of fine structure (L units): texture blurred away or flattened.

    Band-pass (difference of Gaussians, `sigma` and 2 x `sigma`) responses of both L channels, where
    smooth drift vanishes and noise is small. Score: (1 - `tolerance`) x the local RMS of the normal
    image's response (the rest a mild blur or gain can explain) minus that of the anomaly's.
    """
    bpa = _blur(la, sigma) - _blur(la, 2 * sigma)
    bpn = _blur(ln, sigma) - _blur(ln, 2 * sigma)
    window = 2 * sigma
    own = np.sqrt(_blur(bpn * bpn, window))
    # Only a loss counts: a brightness step adds band-pass energy just outside its edge.
    return np.maximum((1.0 - tolerance) * own - np.sqrt(_blur(bpa * bpa, window)), 0.0)


# ---------------------------------------------------------------------------------------------
# learned method: a tiny per-pixel classifier over the default method's terms

MASK_HEAD = Path(__file__).with_name("mask_head.npz")
FEATURES = (
    "score", "colour", "contrast", "structure", "score blurred 1.5", "score blurred 4", "score blurred 8",
    "score / 3x3 max", "score / 7x7 max", "ring noise", "score / ring noise", "box 99th percentile",
    "lightness change", "background contrast", "lightness ridge", "score above its surroundings",
)


def mask_features(anomaly, normal, box, reference=None, scale=None):
    """(features N x len(FEATURES) float32, crop slices, box inside the crop, size scale) for the N
    pixels inside the box, in the crop's row-major order. Inputs as `extract_mask` checks them; one
    box (as each_box gives them: the drift is fitted on its ring as one box). scale: as
    extract_mask gives it (None: the image's own)."""
    parts = {}
    crop, inside, ring, scale, score = _box_crop_for(anomaly, normal, reference, box, parts, scale)
    if score is None:
        score = _unexplained_score(anomaly[crop], normal[crop], None if reference is None else reference[crop], inside, ring, _default_settings(scale), parts)
    noise = _median(score[ring]) if ring.any() else 0.0
    peak = float(np.percentile(score[inside], 99))
    light = parts["lightness"]
    # Ridge of the lightness change: a thin line keeps its core after the round trip's spread.
    sigma = scale
    dyy = _blur(np.gradient(np.gradient(light, axis=0), axis=0), sigma)
    dxx = _blur(np.gradient(np.gradient(light, axis=1), axis=1), sigma)
    dxy = _blur(np.gradient(np.gradient(light, axis=0), axis=1), sigma)
    ridge = 0.5 * np.abs(dxx + dyy) + np.sqrt(0.25 * (dxx - dyy) ** 2 + dxy**2)
    k3, k7 = np.ones((3, 3), np.uint8), np.ones((7, 7), np.uint8)
    ln = _lab(normal[crop])
    ln = ln if ln.ndim == 2 else ln[..., 0]
    columns = [
        _log1p(score),
        _log1p(parts["colour"]),
        _log1p(parts["contrast"]),
        _log1p(parts["structure"]),
        _log1p(_blur(score, 1.5 * scale)),
        _log1p(_blur(score, 4 * scale)),
        _log1p(_blur(score, 8 * scale)),
        score / (cv2.dilate(score, k3) + 0.5),
        score / (cv2.dilate(score, k7) + 0.5),
        np.full_like(score, _log1p(noise)),
        _log1p(score / (noise + 0.3)),
        np.full_like(score, _log1p(peak)),
        np.tanh(_blur(light, 0.7 * scale) / 10.0),
        _log1p(_local_std(ln, 2 * scale)),
        _log1p(ridge),
        _log1p(np.maximum(score - _blur(score, 3 * scale), 0.0)),
    ]
    return np.stack([c[inside] for c in columns], axis=1).astype(np.float32), crop, inside, scale


def _log1p(x):
    """log(1 + x) for x >= 0: numpy's log1p is not vectorised and takes several times as long, and
    its extra precision near 0 is lost on these features anyway."""
    return np.log(x + 1.0)


@functools.cache
def _default_settings(scale):
    """The default method's score settings, as _change_score takes them (read from the signatures
    once per scale: this runs on every box)."""
    defaults = {k: v.default for k, v in inspect.signature(_default).parameters.items()}
    names = list(inspect.signature(_score_settings).parameters)[1:]
    return _score_settings(scale, *(defaults[k] for k in names))


_HEAD_CACHE = {}


def load_mask_head(path=MASK_HEAD):
    """dict of the classifier's arrays: feature mean/std, layers w1 b1 w2 b2, thresholds low/high."""
    path = Path(path)
    if path not in _HEAD_CACHE:
        if not path.is_file():
            raise UserError(f"{path}: mask head weights not found; run python benchmarks/train_mask_head.py")
        with np.load(path) as f:
            head = {k: f[k] for k in f.files}
        if int(head["num_features"]) != len(FEATURES):
            raise UserError(f"{path}: made for {int(head['num_features'])} features, this code computes {len(FEATURES)}; rerun python benchmarks/train_mask_head.py")
        _HEAD_CACHE[path] = head
    return _HEAD_CACHE[path]


def mask_head_probability(features, head):
    """Per-pixel defect probability: one hidden layer (ReLU), sigmoid output, float32 numpy."""
    x = (features - head["mean"]) / head["std"]
    hidden = np.maximum(x @ head["w1"] + head["b1"], 0.0)
    logit = hidden @ head["w2"] + head["b2"]
    return 1.0 / (1.0 + np.exp(-np.clip(logit[:, 0], -30, 30)))


def _learned(anomaly, normal, box, reference=None, scale=None, low=None, high=None, min_area=12, min_fraction=0.05, max_hole=250, weights=None, min_box=20, ring_covered=True):
    """Changed pixels inside the box by a per-pixel classifier (mvp_diff/mask_head.npz, trained by
    benchmarks/train_mask_head.py on generated pairs of the benchmark's tune split only) over the
    default method's terms at several scales (FEATURES). low/high: hysteresis thresholds on its
    probability (None: those chosen with the weights); weights: another weights file. min_box
    (pixels): a box whose shorter side is under it is measured by the default method instead: the
    head never saw one (its training boxes' shorter sides were 19 px and up), and in so small a box
    its ring and blurred-score inputs describe the defect, not its surroundings
    (benchmarks/results/masks.md); 0 turns it off. ring_covered: a box whose ring's typical change
    score passes the default method's noise cap (MAX_RING_NOISE) is measured by the default method
    too: there the defect most likely covers the ring, as when the generator fills its whole box,
    which the head never saw (it then marked nothing); False turns it off."""
    rows, cols = _bounds(box)
    if min(rows.stop - rows.start, cols.stop - cols.start) < min_box:
        return _default(anomaly, normal, box, reference, scale)
    head = load_mask_head(weights or MASK_HEAD)
    low = float(head["low"]) if low is None else low
    high = float(head["high"]) if high is None else high
    features, crop, inside, scale = mask_features(anomaly, normal, box, reference, scale)
    if ring_covered and len(features) and np.expm1(features[0, FEATURES.index("ring noise")]) > MAX_RING_NOISE:
        return _default(anomaly, normal, box, reference, scale)
    prob = np.zeros(inside.shape, np.float32)
    prob[inside] = mask_head_probability(features, head)
    return threshold_probability(prob, crop, inside, box.shape, low, high, min_area, min_fraction, max_hole, scale)


def threshold_probability(prob, crop, inside, shape, low, high, min_area=12, min_fraction=0.05, max_hole=250, scale=None):
    """Bool mask of image `shape` from the probability over the crop: hysteresis (a region must
    reach `high`, grows down to `low`), then gaps closed, small holes filled, specks removed.
    scale: the size scale the features used (None: the image's own)."""
    mask = _hysteresis(prob, low, high)
    out = np.zeros(shape, dtype=bool)
    if mask.any():
        out[crop] = _tidy(mask, inside, _size_scale(shape) if scale is None else scale, min_area, min_fraction, max_hole)
    return out


# ---------------------------------------------------------------------------------------------
# official method


def _official(anomaly, normal, box, reference=None, min_fraction=0.1, crf=True, iterations=1, confidence=0.9):
    """The paper's algorithm, numerically corrected.

    1 - cosine similarity of the RGB vectors of each pixel, min-max normalised over the image,
    kept inside the box; Otsu threshold on the full-precision in-box values (the published code
    quantised the map to three grey levels first); regions under `min_fraction` of the largest
    removed; then a dense CRF (Gaussian sxy 2 compat 3, bilateral sxy 2 srgb 5 compat 3,
    `iterations` mean-field steps) whose unary gives `confidence` to the thresholded label (the
    published code's uint8 overflow left it at about 0.5 everywhere). Grey pixels (R = G = B) and
    brightness-only changes have cosine 1: this method does not see them.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        if crf:
            raise UserError("--mask_method official needs the pydensecrf module: pip install pydensecrf2")
    from skimage.filters import threshold_otsu

    if reference is not None:
        normal = reference
    a = _rgb(anomaly).astype(np.float64)
    n = _rgb(normal).astype(np.float64)
    dot = np.einsum("hwc,hwc->hw", a, n)
    norms = np.linalg.norm(a, axis=2) * np.linalg.norm(n, axis=2)
    # Black pixels have no direction: cosine 1 (no evidence of change).
    cos = np.where(norms > 0, dot / np.maximum(norms, 1e-12), 1.0)
    dist = 1.0 - np.clip(cos, -1.0, 1.0)
    span = dist.max() - dist.min()
    if span <= 0:
        return np.zeros(box.shape, dtype=bool)
    dist = (dist - dist.min()) / span
    values = dist[box]
    if values.max() <= values.min():
        return np.zeros(box.shape, dtype=bool)
    mask = (dist > threshold_otsu(values)) & box
    mask = _remove_small(mask, 1, min_fraction)
    if not crf or not mask.any():
        return mask

    height, width = box.shape
    prob_fg = np.where(mask, confidence, 1.0 - confidence)
    prob_fg[~box] = 0.0
    probs = np.stack([1.0 - prob_fg, prob_fg]).astype(np.float32)
    model = dcrf.DenseCRF2D(width, height, 2)
    model.setUnaryEnergy(unary_from_softmax(probs, clip=1e-5))
    model.addPairwiseGaussian(sxy=2, compat=3)
    model.addPairwiseBilateral(sxy=2, srgb=5, rgbim=np.ascontiguousarray(_rgb(anomaly)), compat=3)
    q = np.asarray(model.inference(iterations)).reshape(2, height, width)
    return (q[1] > q[0]) & box


_METHODS = {"default": _default, "official": _official, "learned": _learned}
