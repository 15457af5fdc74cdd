"""DRAEM-style synthetic anomalies (Zavrtanik et al., ICCV 2021): a thresholded, rotated Perlin-noise
mask through which an augmented texture is blended into a defect-free image. No GPU, no training: a
baseline for the evaluation and a quick generator in its own right.

    python -m mvp_diff.draem --classname bottle --dataset ./dataset --out ./output/draem --num 100

writes the same MVTec layout as inpainting.py (OUT/CLASS/test/draem/NNN.png, ground_truth/draem/
NNN_mask.png, OUT/CLASS/manifest.jsonl, box masks OUT/CLASS_boxes/draem/NNN_mask.png), so evaluate.py reads it as --generated.
The texture source is --anomaly_source_path (DRAEM used the DTD textures) or, by default, the other
defect-free training images of the class. Masks are exact: a pixel is in the mask iff it changed.
"""

import argparse
import math
import zlib
from pathlib import Path

import cv2
import numpy as np

from .boxes import box_mask, boxes_from_mask
from .dataset import generated_paths, load_class, move_legacy_generated_boxes
from .errors import UsageError, UserError, cli
from .files import IMAGE_EXTENSIONS, is_grey, read_mask, read_rgb, save_image
from .manifest import GeneratedSample, write_manifest
from .progress import progress_bar

DEFECT_TYPE = "draem"


def perlin_noise(shape, res, rng):
    """2-D Perlin noise of `shape` (H, W) with res = (cells along y, cells along x); values about
    in [-1, 1] (scaled by sqrt 2 as DRAEM does)."""
    height, width = shape
    ry, rx = res
    ys = np.arange(height) * ry / height
    xs = np.arange(width) * rx / width
    yi, xi = ys.astype(int), xs.astype(int)
    yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]
    angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)

    def corner(oy, ox):
        g = grads[yi[:, None] + oy, xi[None, :] + ox]
        return g[..., 0] * (yf - oy) + g[..., 1] * (xf - ox)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(yf), fade(xf)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return math.sqrt(2) * (top * (1 - u) + bottom * u)


def perlin_mask(shape, rng, min_scale=0, max_scale=6, threshold=0.5):
    """DRAEM's mask: noise with 2^[min, max) cells per axis, rotated by -90..90 degrees, > threshold."""
    res = (2 ** int(rng.integers(min_scale, max_scale)), 2 ** int(rng.integers(min_scale, max_scale)))
    noise = perlin_noise(shape, res, rng).astype(np.float32)
    angle = rng.uniform(-90, 90)
    matrix = cv2.getRotationMatrix2D((shape[1] / 2, shape[0] / 2), angle, 1.0)
    noise = cv2.warpAffine(noise, matrix, (shape[1], shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return noise > threshold


def _augment(texture, rng, n=3):
    """Three of DRAEM's ten source augmentations (VitjanZ/DRAEM data_loader.py: gamma, brightness,
    sharpness, hue, solarize with p 0.5, posterize, invert, autocontrast, equalize, rotate +-45),
    reimplemented with numpy/OpenCV/PIL."""

    def gamma(x):
        return 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(0.5, 2.0)

    def brightness(x):
        return x * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)

    def hue(x):
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 50))) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 50)), 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)

    def sharpness(x):  # imgaug's pillike.EnhanceSharpness: PIL's enhancer, factor in (0, 2)
        from PIL import Image, ImageEnhance

        image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
        return np.asarray(ImageEnhance.Sharpness(image).enhance(rng.uniform(0.0, 2.0))).astype(np.float32)

    def solarize(x):  # imgaug's Solarize(0.5, threshold=(32, 128)): applied to half of the images
        if rng.random() < 0.5:
            return x
        t = rng.uniform(32, 128)
        return np.where(x >= t, 255.0 - x, x)

    def posterize(x):
        bits = int(rng.integers(4, 8))
        return (np.clip(x, 0, 255).astype(np.uint8) >> (8 - bits) << (8 - bits)).astype(np.float32)

    def invert(x):
        return 255.0 - x

    def autocontrast(x):
        lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
        return (x - lo) * (255.0 / np.maximum(hi - lo, 1.0))

    def equalize(x):
        u8 = np.clip(x, 0, 255).astype(np.uint8)
        return np.stack([cv2.equalizeHist(u8[..., c]) for c in range(3)], -1).astype(np.float32)

    def rotate(x):
        h, w = x.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-45, 45), 1.0)
        return cv2.warpAffine(x, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)

    ops = [gamma, brightness, sharpness, hue, solarize, posterize, invert, autocontrast, equalize, rotate]
    out = texture.astype(np.float32)
    for i in rng.choice(len(ops), size=n, replace=False):
        out = ops[i](out)
    return np.clip(out, 0, 255)


def draem_anomaly(image, texture, rng, beta_range=(0.0, 0.8), min_area=16, tries=50):
    """(anomalous uint8 image, bool mask) from a uint8 HxWx3 image and a texture of any size.

    In the mask: (1 - beta) * augmented texture + beta * image; outside it the image is untouched. The
    mask is then cut to the pixels that really changed, so it matches the image exactly. Redraws until
    at least `min_area` pixels changed."""
    height, width = image.shape[:2]
    texture = cv2.resize(texture, (width, height), interpolation=cv2.INTER_AREA if texture.shape[0] > height else cv2.INTER_LINEAR)
    grey = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    base = image.astype(np.float32)
    for _ in range(tries):
        mask = perlin_mask((height, width), rng)
        if mask.sum() < min_area:
            continue
        source = _augment(texture, rng)
        if grey:  # keep grey classes grey
            source = np.repeat(source.mean(axis=2, keepdims=True), 3, axis=2)
        beta = rng.uniform(*beta_range)
        blended = np.where(mask[..., None], (1 - beta) * source + beta * base, base)
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        mask &= (out != image).any(axis=2)
        if mask.sum() >= min_area:
            return out, mask
    raise RuntimeError(f"no anomaly of at least {min_area} changed pixels in {tries} tries")


def source_images(anomaly_source_path):
    """Texture files under a folder (searched recursively, as DTD nests them)."""
    root = Path(anomaly_source_path)
    if not root.is_dir():
        raise UserError(f"--anomaly_source_path {root}: folder not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise UserError(f"--anomaly_source_path {root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def sample_paths(class_dir: Path, index: int, defect_type=DEFECT_TYPE):
    return generated_paths(class_dir, defect_type, f"{index:03d}")


def write_draem_samples(good_images, class_dir, num, seed=0, sources=None, defect_type=DEFECT_TYPE, progress=True):
    """Write `num` DRAEM-style samples under `class_dir` in MVTec layout plus manifest.jsonl; returns
    their GeneratedSample list.

    Sample i depends only on (seed, i), so a rerun skips finished samples and yields the same set.
    Sources default to the good images themselves (another one than the base when there are two)."""
    if not good_images:
        raise UserError(f"{class_dir}: no defect-free images to synthesize on")
    class_dir = Path(class_dir)
    move_legacy_generated_boxes(class_dir)  # box masks of an earlier version's CLASS/bbox/
    records = []
    for i in progress_bar(range(num), desc=f"DRAEM-style {class_dir.name}", disable=not progress):
        image_path, mask_path, box_path = sample_paths(class_dir, i, defect_type)
        base = good_images[i % len(good_images)]
        rng = np.random.default_rng([seed, i, zlib.crc32(class_dir.name.encode())])  # classes differ
        pool = sources or [g for g in good_images if g != base] or good_images
        source = pool[int(rng.integers(len(pool)))]
        if image_path.is_file() and mask_path.is_file() and box_path.is_file():
            mask = read_mask(mask_path)
        else:
            image = read_rgb(base)
            out, mask = draem_anomaly(image, read_rgb(source), rng)
            grey = is_grey(base)
            boxes, _ = boxes_from_mask(mask, min_area=1)
            save_image(box_path, box_mask(boxes, *mask.shape))
            save_image(mask_path, mask.astype(np.uint8) * 255)
            save_image(image_path, out[..., 0] if grey else out)  # image last: its presence marks a finished sample
        boxes, _ = boxes_from_mask(mask, min_area=1)
        height, width = mask.shape
        records.append(GeneratedSample.at(
            class_dir, i, defect_type, image_path.stem, seed=[seed, i], boxes=boxes, good_image=str(Path(base).resolve()), mask_area=int(mask.sum()),
            mask_method="draem_perlin", flags=[], width=width, height=height, source_image=str(Path(source).resolve()),
        ))  # fmt: skip
    write_manifest(class_dir, records)
    return records


def parse_args(argv=None):
    from .cli_args import add_dataset_args

    parser = argparse.ArgumentParser(prog="python -m mvp_diff.draem", description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--out", default="./output/draem", help="output root; samples go to OUT/CLASS/ (default: ./output/draem)")
    parser.add_argument("--num", type=int, default=100, help="number of samples (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anomaly_source_path", default=None, help="folder of texture images (e.g. DTD); default: the class's train/good images")
    return parser.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    class_data = load_class(args.dataset, args.classname, args.mask_suffix, require_anomalies=False)
    sources = source_images(args.anomaly_source_path) if args.anomaly_source_path else None
    class_dir = Path(args.out) / args.classname
    write_draem_samples(class_data.train_good, class_dir, args.num, args.seed, sources)
    print(f"{args.num} DRAEM-style samples -> {class_dir}/ (evaluate with --generated {args.out})")


if __name__ == "__main__":
    main()
