"""Stage 3a: random boxes for new defects, drawn from the real boxes of a class and placed on the object.

Diversity: each sample copies the number of boxes of a random real anomaly of its defect type; each
box takes the width and height (relative to the image) of a random real box of that type, and each
side is then scaled by its own factor drawn log-uniformly in [1/(1+jitter), 1+jitter], so new sizes
and aspect ratios appear. Plausibility: a box is placed uniformly among the positions where at least
`min_coverage` of its area lies on the foreground of the sample's defect-free image and it does not
overlap the sample's other boxes; when no position fits, the box shrinks (same aspect ratio) and
tries again, and at its smallest it takes the best-covered position (its coverage is recorded).

Foreground: per image, the pixels whose colour is far from the image's border colour (relative to the
border's own spread), then opening, hole filling and small-region removal. A class is treated as a
texture (foreground = the whole image) when its border is not a plain background or nothing separates.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from .boxes import box_mask
from .dataset import ClassData, good_image_for, relative_to_root, split_anomalies
from .errors import UsageError, UserError
from .files import atomic_write_jsonl, image_size, read_rgb, save_image
from .progress import progress_bar
from .prompts import describe
from .records import DEFAULT_OUTDIR, BoxParams, anomaly_key, compute_boxes, load_saved_boxes

WORK_SIZE = 256  # foreground is estimated at this size (longer side), then scaled back
BORDER = 0.03  # width of the frame whose median colour is the background, as a fraction of the side
MIN_CONTRAST = 10.0  # least RGB distance from the background colour that counts as object
MAX_BORDER_SPREAD = 40.0  # border colours spread wider than this (RGB distance): no plain background
MIN_SIDE = 1 / 32  # smallest box side, as a fraction of the image side (2 latent cells at 512 px)
SHRINK = 0.8
MAX_SHRINKS = 8


# --- real box statistics ---------------------------------------------------------------------------


@dataclass
class BoxStats:
    """Real boxes of one defect type, relative to their image size."""

    samples: list  # per real anomaly: [(w / W, h / H), ...]

    @property
    def pool(self):
        return [wh for sample in self.samples for wh in sample]


def real_box_stats(class_data: ClassData, train_fraction=1 / 3, params: BoxParams = None, stage1_dir=DEFAULT_OUTDIR):
    """{defect type: BoxStats} from the real anomalies the generator may learn from (the first
    `train_fraction` of each type, as in Stage 1), using boundbox.py's boxes (in `stage1_dir`) when it
    has run."""
    boxes = load_saved_boxes(class_data, stage1_dir)
    if boxes is None:
        boxes, _ = compute_boxes(class_data, params or BoxParams(), progress=False)
    stats = {}
    for defect in class_data.defect_types:
        train, _ = split_anomalies(class_data.anomalies[defect], train_fraction)
        samples = []
        for anomaly in train:
            found = boxes.get(anomaly_key(anomaly)) or []
            if found:
                width, height = image_size(anomaly.mask)
                samples.append([((x1 - x0) / width, (y1 - y0) / height) for x0, y0, x1, y1 in found])
        if samples:
            stats[defect] = BoxStats(samples)
    return stats


def split_num(num, defect_types, per_type=False):
    """{defect type: count}: `num` each with `per_type`, else `num` split equally (the first types in
    sorted order take one more when it does not divide)."""
    if per_type:
        return {d: num for d in defect_types}
    base, extra = divmod(num, len(defect_types))
    return {d: base + (1 if i < extra else 0) for i, d in enumerate(defect_types)}


# --- foreground ------------------------------------------------------------------------------------


def _border_pixels(arr, frame):
    return np.concatenate([arr[:frame].reshape(-1, arr.shape[-1]), arr[-frame:].reshape(-1, arr.shape[-1]),
                           arr[frame:-frame, :frame].reshape(-1, arr.shape[-1]), arr[frame:-frame, -frame:].reshape(-1, arr.shape[-1])])


def object_mask(image):
    """(bool object mask at the work size, spread of the border colours) of one RGB image.

    The border frame is taken as background: a pixel is on the object when its colour is further from
    the frame's median colour than twice the frame's own 98th-percentile distance (and at least
    MIN_CONTRAST), so the threshold follows the background's noise, not the object's texture.
    """
    height, width = image.shape[:2]
    scale = WORK_SIZE / max(height, width)
    small = image if scale >= 1 else cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    small = cv2.medianBlur(np.ascontiguousarray(small), 3).astype(np.float32)  # noise out, edges kept in place
    frame = max(2, round(BORDER * max(small.shape[:2])))
    border = _border_pixels(small, frame)
    background = np.median(border, axis=0)
    spread = float(np.percentile(np.linalg.norm(border - background, axis=1), 98))
    mask = np.linalg.norm(small - background, axis=2) > max(2.0 * spread, MIN_CONTRAST)
    # Cleanup: specks out, holes in (dark parts inside the object), small islands out.
    k = max(3, round(0.015 * max(mask.shape)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel) > 0
    mask = ndimage.binary_fill_holes(mask)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = areas >= max(0.1 * areas.max(), 0.002 * mask.size)
        mask = np.concatenate([[False], keep])[labels]
    # Antialiased edge pixels pass the threshold: one pixel in, so boxes stay on the object proper.
    mask = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return mask, spread


def is_texture(class_data: ClassData, max_images=16):
    """Whether the class has no plain background, judged on up to `max_images` evenly spaced train
    images (the same ones whatever the number of samples): the border colours vary too much, or the
    object found covers almost nothing or almost everything."""
    goods = class_data.train_good
    picks = sorted({goods[round(i * (len(goods) - 1) / max(1, max_images - 1))] for i in range(min(max_images, len(goods)))})
    found = [object_mask(read_rgb(p)) for p in picks]
    fraction = float(np.median([m.mean() for m, _ in found]))
    spread = float(np.median([s for _, s in found]))
    return bool(spread > MAX_BORDER_SPREAD or fraction > 0.95 or fraction < 0.01)


def foreground(image, texture=False):
    """Bool foreground mask of one RGB image at its own size: all True for a texture, or when nothing
    stands out on this image."""
    height, width = image.shape[:2]
    mask = None if texture else object_mask(image)[0]
    return full_size(mask, width, height)


def full_size(mask, width, height):
    """A work-size object mask scaled to the image (None or a nearly empty mask: the whole image)."""
    if mask is None or mask.mean() < 0.01:
        return np.ones((height, width), bool)
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


# --- placement -------------------------------------------------------------------------------------


def _window_sums(integral, w, h):
    """Sum of every w x h window (rows: top y, columns: left x) from a cv2.integral table."""
    return integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]


def place_box(rng, foreground, occupied, w, h, min_coverage=0.9, min_side=1):
    """[x0, y0, x1, y1] of a w x h box (shrunk when needed) with at least `min_coverage` of its area on
    `foreground` and none on `occupied`; falls back to the best-covered position. Also returns the
    box's foreground coverage."""
    height, width = foreground.shape
    fg_int = cv2.integral(foreground.astype(np.uint8), sdepth=cv2.CV_64F)
    occ_int = cv2.integral(occupied.astype(np.uint8), sdepth=cv2.CV_64F)
    best = None
    for _ in range(MAX_SHRINKS + 1):
        w, h = min(w, width), min(h, height)
        cover = _window_sums(fg_int, w, h) / float(w * h)
        free = _window_sums(occ_int, w, h) == 0
        ys, xs = np.nonzero((cover >= min_coverage) & free)
        if len(xs):
            i = rng.integers(len(xs))
            return [int(xs[i]), int(ys[i]), int(xs[i]) + w, int(ys[i]) + h], float(cover[ys[i], xs[i]])
        score = np.where(free, cover, cover - 1.0)  # prefer free positions, then coverage
        y, x = np.unravel_index(np.argmax(score), score.shape)
        if best is None or cover[y, x] > best[1]:
            best = ([int(x), int(y), int(x) + w, int(y) + h], float(cover[y, x]))
        if w <= min_side and h <= min_side:
            break
        w, h = max(min_side, round(w * SHRINK)), max(min_side, round(h * SHRINK))
    return best


def sample_boxes(rng, stats: BoxStats, foreground, jitter=0.5, min_coverage=0.9):
    """Boxes for one sample on an image with this foreground; returns (boxes, coverages)."""
    height, width = foreground.shape
    min_side = max(2, math.ceil(MIN_SIDE * min(width, height)))
    count = len(stats.samples[rng.integers(len(stats.samples))])
    pool = stats.pool
    limit = math.log1p(jitter)
    occupied = np.zeros_like(foreground, dtype=bool)
    boxes, coverages = [], []
    for _ in range(count):
        rw, rh = pool[rng.integers(len(pool))]
        rw *= math.exp(rng.uniform(-limit, limit))
        rh *= math.exp(rng.uniform(-limit, limit))
        w = int(np.clip(round(rw * width), min_side, width))
        h = int(np.clip(round(rh * height), min_side, height))
        box, cover = place_box(rng, foreground, occupied, w, h, min_coverage, min_side)
        x0, y0, x1, y1 = box
        occupied[y0:y1, x0:x1] = True
        boxes.append(box)
        coverages.append(round(cover, 4))
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0]))
    return [boxes[i] for i in order], [coverages[i] for i in order]


# --- the whole stage -------------------------------------------------------------------------------


def index_width(total):
    return max(3, len(str(max(total - 1, 0))))


def random_box_records(class_data: ClassData, counts, seed=0, jitter=0.5, min_coverage=0.9, train_fraction=1 / 3, progress=True, stage1_dir=DEFAULT_OUTDIR):
    """(records, {good image: work-size object mask or None}, whether the class is a texture).

    Sample `index` (global, defect types in sorted order) uses the generator
    `numpy.random.default_rng([seed, index])` and the defect-free image `train/good[index % n]`.
    """
    stats = real_box_stats(class_data, train_fraction, stage1_dir=stage1_dir)
    missing = [d for d in counts if d not in stats]
    if missing:
        raise UserError(f"{class_data.root}: no real boxes for defect type(s) {', '.join(missing)} in the training share; check their masks")
    total = sum(counts.values())
    texture = is_texture(class_data)
    goods = sorted({good_image_for(class_data, i) for i in range(min(total, len(class_data.train_good)))})
    # Work-size masks only (a few KB each); each sample scales its image's mask up.
    objects = {path: None if texture else object_mask(read_rgb(path))[0] for path in goods}

    root = class_data.dataset_root.resolve()
    width_digits = index_width(total)
    records = []
    index = 0
    bar = progress_bar(total=total, desc=f"random boxes {class_data.name}", disable=not progress)
    for defect in sorted(counts):
        for _ in range(counts[defect]):
            good = good_image_for(class_data, index)
            width, height = image_size(good)
            rng = np.random.default_rng([seed, index])
            boxes, coverage = sample_boxes(rng, stats[defect], full_size(objects[good], width, height), jitter, min_coverage)
            records.append(
                {
                    "index": index,
                    "class": class_data.name,
                    "defect_type": defect,
                    "dataset_root": str(root),
                    "good_image": relative_to_root(good, root),
                    "box_mask": f"{defect}/{index:0{width_digits}d}.png",
                    "boxes": boxes,
                    "fg_coverage": coverage,
                    "width": width,
                    "height": height,
                    "text": describe(class_data.name, defect, boxes, width, height),
                    "seed": seed,
                }
            )
            index += 1
            bar.update()
    bar.close()
    return records, objects, texture


def boxes_path(outdir, classname) -> Path:
    return Path(outdir) / classname / "boxes.jsonl"


def check_defect_types(requested, known):
    """The requested defect types (comma- or space-separated), after checking each is known."""
    if not requested:
        return list(known)
    wanted = [d for item in requested for d in item.split(",") if d]
    unknown = [d for d in wanted if d not in known]
    if unknown:
        raise UsageError(f"--defect_types: unknown {', '.join(unknown)}; known defect types: {', '.join(known)}")
    return sorted(set(wanted))


def write_box_files(outdir, class_data: ClassData, counts, seed=0, jitter=0.5, min_coverage=0.9, train_fraction=1 / 3, stage1_dir=DEFAULT_OUTDIR):
    """Draw the records and write OUTDIR/CLASS/: box masks, foreground masks and boxes.jsonl, then
    remove the box masks of an earlier, larger run (they would pass for current ones). Returns
    (records, texture)."""
    records, objects, texture = random_box_records(class_data, counts, seed, jitter, min_coverage, train_fraction, stage1_dir=stage1_dir)
    folder = boxes_path(outdir, class_data.name).parent
    for record in records:
        save_image(folder / record["box_mask"], box_mask(record["boxes"], record["height"], record["width"]))
    for good, mask in objects.items():
        width, height = image_size(good)
        save_image(folder / "foreground" / f"{good.stem}.png", full_size(mask, width, height).astype("uint8") * 255)
    atomic_write_jsonl(boxes_path(outdir, class_data.name), records)
    current = {folder / r["box_mask"] for r in records}
    for path in folder.glob("*/*.png"):
        if path.parent.name != "foreground" and re.fullmatch(r"\d+\.png", path.name) and path not in current:
            path.unlink()
    return records, texture
