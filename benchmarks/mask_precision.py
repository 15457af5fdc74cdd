"""Mask precision benchmark: how well does each mask method recover a defect whose true mask is known?

Two splits, fixed here and never mixed: "tune" (the photographs and generated texture family that
settings may be chosen on) and "held-out" (other photographs, another texture family, other seeds:
never used to choose anything; its figures are the headline). Each pair:
  1. a source image: a random square crop (50-100 % of the short side) of a photograph that ships
     with scikit-image, resized to --size px, or a generated texture; grey sources are stored
     single-channel or, half the time, as 3-channel RGB (R = G = B);
  2. one or two defect shapes (blob, scratch 3-8 px, thin scratch 1-2 px, spots), each in a random
     rectangle; the shape is the true mask, its box the shape's bounding box plus a margin;
  3. one look: darker, brighter, tinted (3-channel only), faint (a brightness change of only 12-22
     levels: close to the background), texture (another source's patch at the local mean) or
     blurred; edges feathered; placements where under 60 % of the shape changes by VISIBLE levels
     are redrawn;
  4. a VAE-like round trip of the painted image, spatially varying: blur whose sigma drifts between
     two values in 0.3-1.4 across the image, per-channel gain +-4 % and offset +-4 levels, noise of
     1-4 levels modulated 0.5-1.5x across the image, a smooth shift of up to +-10 levels (partly per
     channel); then JPEG at quality 90, 75 or 60 (or none, a quarter of the pairs) and the
     defect-free image pasted back outside the boxes, as inpainting.py does. That is the "blur"
     model, the one every setting was chosen under. `--degradation resample` swaps in a second
     model built unlike it and never used to choose anything (resample_round_trip: softening by
     area downscaling and cubic upscaling, a tone curve and saturation change, signal-dependent
     grain, multiplicative shading; Pillow JPEG with 4:2:0 or 4:4:4 colour, or WebP): does a
     method tuned under one model of the VAE hold under another?
With --resolution the pairs are made at the generator's size and enlarged (PIL bicubic) into the
boxes of the full-size original, as Stage 3 meets them on MVTec AD's 700-1024 px images; masks are
then measured as Stage 3 measures them, at the generator's size and resized (--measure_at image:
at the original's size, as the previous version did). Pairs made at their own size are measured as
the generator's own output (extract_mask's at_generator_size): at --size over 512 the methods'
sizes stay at their 512 px values, as the round trip's blur and noise do.
The VAE-round-trip reference (`extract_mask(..., reference=)`, what Stage 3 computes as
vae.decode(vae.encode(good))) is simulated as the same degradation of the defect-free image, drawn
independently (no JPEG: Stage 3 keeps it in memory). Unchanged controls (same boxes, only the
degradation and JPEG) count how often a method marks something where nothing was drawn.

Two true masks: the painted shape, and the changed pixels (the shape's pixels that the painting
changed by >= VISIBLE levels in some channel, measured before the degradation).
Methods: the box as the mask ("mask drift"), a ceiling ("ceiling": the painting's change after the
round trip's blur and gain alone, without its noise, drift or JPEG, thresholded at the level best for
each pair: what thresholding a perfectly measured change could reach), the paper's method ("official", on the first
--official_num pairs of each split: its dense CRF is slow), "default" without and with the
reference ("default+ref"), and "learned" (a per-pixel classifier over the default method's terms,
trained by train_mask_head.py on other draws of the tune split only), without and with it. Time: milliseconds per image on one thread (cv2 threads = 1), as a
ratio to the official method and to a fixed reference operation (a 512x512x3 float32 Gaussian
blur, sigma 2) timed in the same run.

    python -m benchmarks.mask_precision --num 150 --official_num 20
    python -m benchmarks.mask_precision --num 100 --splits held-out --degradation resample
    python -m benchmarks.mask_precision --num 60 --splits held-out --size 1024 --resolution 512
"""

import argparse
import io
import os
import platform
import sys
import time

import cv2
import numpy as np
from PIL import Image
from skimage import data
from tqdm import tqdm

from mvp_diff.masks import extract_mask, resize_mask

# Fixed splits. The tune photographs are those earlier settings were chosen on; the held-out ones,
# the generated "weave" family and the held-out seed were never used to choose anything.
SPLITS = {
    "tune": {
        "colour": ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina"),
        "grey": ("camera", "brick", "grass", "gravel", "coins", "moon"),
        "texture": "noise",
        "seed": 1,
    },
    "held-out": {
        "colour": ("hubble_deep_field", "stereo_motorcycle", "colorwheel"),
        "grey": ("cell", "clock", "page", "text", "checkerboard"),
        "texture": "weave",
        "seed": 2,
    },
}
LOOKS = ("darker", "brighter", "tinted", "faint", "texture", "blurred")
SHAPES = ("blob", "scratch", "thin", "spots")
JPEG_QUALITIES = (None, 90, 75, 60)
# A change of at least this many grey levels (largest over R, G, B) counts as visible: about 4
# deltaE at mid grey, well above the just noticeable 2.3.
VISIBLE = 10
TRUTHS = ("the painted shape", f"the changed pixels (>= {VISIBLE} levels before the degradation)")
METHODS = ("box", "ceiling", "official", "default", "default+ref", "learned", "learned+ref")


def photograph(name):
    img = getattr(data, name)()
    img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left image
    return img[..., :3] if img.ndim == 3 else img


def smooth_noise(rng, h, w, sigma):
    field = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


def smooth_field(rng, h, w):
    """A smooth field in 0..1 varying over about an eighth of the image."""
    f = cv2.resize(smooth_noise(rng, h // 16 + 2, w // 16 + 2, 1.5), (w, h), interpolation=cv2.INTER_CUBIC)
    return (f - f.min()) / (f.max() - f.min() + 1e-6)


def generated_texture(rng, family, size, colour):
    """A highly textured image: band-limited noise ("noise") or woven gratings ("weave")."""
    if family == "noise":
        img = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), rng.uniform(0.8, 2.5))
        img = img / img.std() * rng.uniform(15, 35)
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        img = np.zeros((size, size), np.float32)
        for _ in range(2):
            angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
            img += np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        img = img * rng.uniform(12, 30) + rng.normal(0, rng.uniform(2, 6), img.shape)
    img = img + rng.uniform(70, 180) + 20 * smooth_noise(rng, size, size, size / 6)
    if colour:
        img = img[..., None] * rng.uniform(0.7, 1.2, 3).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def source_image(rng, split, photos, size):
    """(uint8 image, name, kind): kind is colour, grey, grey-rgb or a texture."""
    spec = SPLITS[split]
    names = list(spec["colour"]) + list(spec["grey"]) + ["texture"]
    name = names[rng.integers(len(names))]
    if name == "texture":
        colour = rng.random() < 0.5
        img = generated_texture(rng, spec["texture"], size, colour)
    else:
        full = photos[name]
        h, w = full.shape[:2]
        s = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = cv2.resize(full[y : y + s, x : x + s], (size, size), interpolation=cv2.INTER_AREA)
        colour = img.ndim == 3
    kind = "colour" if colour else "grey"
    if not colour and rng.random() < 0.5:
        img, kind = np.repeat(img[..., None], 3, axis=2), "grey-rgb"
    return img, name, kind


def draw_shape(rng, kind, bh, bw):
    """bool bh x bw mask of one defect shape inside a box."""
    m = np.zeros((bh, bw), np.uint8)
    if kind == "blob":
        yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
        r = np.sqrt(((yy - bh / 2) / (bh / 2)) ** 2 + ((xx - bw / 2) / (bw / 2)) ** 2)
        field = 1.0 - r + 0.35 * smooth_noise(rng, bh, bw, max(2.0, min(bh, bw) / 8))
        m = (field > rng.uniform(0.25, 0.45)).astype(np.uint8)
    elif kind in ("scratch", "thin"):
        for _ in range(rng.integers(1, 3)):
            # quadratic curve from one side of the box to the other
            p0 = np.array([rng.uniform(0, 0.2), rng.uniform(0, 1)])
            p2 = np.array([rng.uniform(0.8, 1), rng.uniform(0, 1)])
            p1 = np.array([rng.uniform(0.3, 0.7), rng.uniform(0, 1)])
            if rng.random() < 0.5:
                p0, p1, p2 = p0[::-1], p1[::-1], p2[::-1]
            t = np.linspace(0, 1, 80)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            pts = np.round(pts * [bw - 1, bh - 1]).astype(np.int32)
            thickness = int(rng.integers(1, 3) if kind == "thin" else rng.integers(3, 9))
            cv2.polylines(m, [pts], False, 1, thickness=thickness)
    else:  # spots
        for _ in range(rng.integers(3, 9)):
            r = int(rng.integers(4, 10))
            cv2.circle(m, (int(rng.integers(r, max(r + 1, bw - r))), int(rng.integers(r, max(r + 1, bh - r)))), r, 1, -1)
    return m > 0


def paint(rng, f, shape_mask, look, other, thin):
    """float32 image with the defect painted over shape_mask (feathered edge)."""
    colour = f.ndim == 3
    if look == "darker":
        new = f * rng.uniform(0.45, 0.7)
    elif look == "brighter":
        new = f + (255 - f) * rng.uniform(0.3, 0.55)
    elif look == "faint":  # close to the background: a small, uniform brightness change
        new = f + rng.choice([-1, 1]) * rng.uniform(12, 22)
    elif look == "tinted":  # hue change at about the same luminance
        gains = rng.uniform(0.5, 1.5, 3)
        new = f * (gains / (gains @ [0.299, 0.587, 0.114])).astype(np.float32)
    elif look == "texture":
        src = other.astype(np.float32)
        if colour and src.ndim == 2:
            src = np.repeat(src[..., None], 3, axis=2)
        if not colour and src.ndim == 3:
            src = src @ np.float32([0.299, 0.587, 0.114])
        axes = (0,) if colour else None
        new = src - src[shape_mask].mean(axis=axes) + f[shape_mask].mean(axis=axes)
    else:  # blurred
        new = cv2.GaussianBlur(f, (0, 0), rng.uniform(2.5, 5.0))
    alpha = cv2.GaussianBlur(shape_mask.astype(np.float32), (0, 0), 0.5 if thin else 1.0)
    alpha = np.minimum(alpha / alpha.max(), 1.0) if thin else alpha  # a 1 px line keeps its full change
    if colour:
        alpha = alpha[..., None]
    return np.clip(f * (1 - alpha) + new * alpha, 0, 255)


def round_trip(rng, f, strength=1.0, clean=None):
    """VAE-like round trip of a float32 image, spatially varying (see the module docstring). With
    `clean` (the defect-free float32 image): (round trip, the change f - clean as the round trip's
    blur and gain alone leave it: no noise, drift or JPEG; the same draws)."""
    h, w = f.shape[:2]
    colour = f.ndim == 3
    chans = 3 if colour else 1
    expand = (lambda x: x[..., None]) if colour else (lambda x: x)
    s1, s2 = strength * np.sort(rng.uniform(0.3, 1.4, 2))
    mix = expand(smooth_field(rng, h, w))

    def blur(x):
        return cv2.GaussianBlur(x, (0, 0), s1) * (1 - mix) + cv2.GaussianBlur(x, (0, 0), s2) * mix

    g = blur(f)
    shape = (1, 1, 3) if colour else ()
    gain = (1 + strength * rng.uniform(-0.04, 0.04, chans)).astype(np.float32).reshape(shape)
    g = g * gain
    g = g + (strength * rng.uniform(-4, 4, chans)).astype(np.float32).reshape(shape)
    level = strength * rng.uniform(1, 4) * (0.5 + expand(smooth_field(rng, h, w)))
    g = g + rng.standard_normal(g.shape).astype(np.float32) * level
    amp = strength * rng.uniform(2, 10)
    common = smooth_field(rng, h, w) * 2 - 1
    if colour:
        shift = np.stack([0.7 * common + 0.3 * (smooth_field(rng, h, w) * 2 - 1) for _ in range(3)], axis=2)
    else:
        shift = common
    if clean is None:
        return g + amp * shift
    return g + amp * shift, blur(f - clean) * gain


def resample_round_trip(rng, f, strength=1.0, clean=None):
    """The held-out degradation model: a round trip built unlike round_trip, to test whether a method
    tuned under one model of the VAE holds under another. Softening by resampling (area
    downscaling by 1.3-2.6x and cubic upscaling, two factors mixed across the image: a decoder
    drawing from a coarser representation), a tone curve (per-channel gamma 0.93-1.07) and, on
    colour, a saturation change of up to 8 %; signal-dependent noise (grain 1-2 px); a smooth
    multiplicative shading of up to 6 %. With `clean`: (round trip, the change f - clean as the
    softening and tone curve alone leave it; the same draws)."""
    h, w = f.shape[:2]
    colour = f.ndim == 3
    expand = (lambda x: x[..., None]) if colour else (lambda x: x)
    factors = 1 + strength * np.sort(rng.uniform(0.3, 1.6, 2))
    mix = expand(smooth_field(rng, h, w))
    gamma = (1 + strength * rng.uniform(-0.07, 0.07, 3 if colour else 1)).astype(np.float32)
    saturation = np.float32(1 + strength * rng.uniform(-0.08, 0.08))

    def soften(x):
        out = []
        for factor in factors:
            small = cv2.resize(x, (max(8, round(w / factor)), max(8, round(h / factor))), interpolation=cv2.INTER_AREA)
            out.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))
        return out[0] * (1 - mix) + out[1] * mix

    def tone(x):
        x = np.clip(x, 0, 255)
        if colour:
            grey = x @ np.float32([0.299, 0.587, 0.114])
            x = np.clip(grey[..., None] + saturation * (x - grey[..., None]), 0, 255)
        return 255 * (x / 255) ** gamma.reshape((1, 1, 3) if colour else ())

    softened = tone(soften(f))
    grain = cv2.GaussianBlur(rng.standard_normal(softened.shape).astype(np.float32), (0, 0), rng.uniform(0.5, 1.0))
    grain /= grain.std() + 1e-6
    g = softened + grain * strength * (rng.uniform(0.5, 1.5) + rng.uniform(0.05, 0.15) * np.sqrt(softened))
    g = g * (1 + strength * rng.uniform(0.02, 0.06) * expand(smooth_field(rng, h, w) * 2 - 1))
    if clean is None:
        return g
    return g, softened - tone(soften(clean))


# Models of the generator's round trip: "blur" is the one every setting was chosen under;
# "resample" was never used to choose anything.
ROUND_TRIPS = {"blur": round_trip, "resample": resample_round_trip}
DEGRADATIONS = tuple(ROUND_TRIPS)


def draw_compression(rng, degradation):
    """The compression both images of a pair get: for "blur", OpenCV JPEG at quality 90, 75 or 60,
    or none (a quarter of the pairs); for "resample", Pillow JPEG at a quality in 55-95 with 4:2:0
    or 4:4:4 colour, or WebP at 70-95, or none (a quarter each). None: not compressed."""
    if degradation == "blur":
        return JPEG_QUALITIES[rng.integers(len(JPEG_QUALITIES))]
    kind = ("none", "jpeg420", "jpeg444", "webp")[rng.integers(4)]
    return None if kind == "none" else (kind, int(rng.integers(70, 96) if kind == "webp" else rng.integers(55, 96)))


def compress(g, compression):
    """uint8 image g after draw_compression's `compression`: an OpenCV JPEG quality, or (Pillow
    format, quality), or None."""
    if compression is None:
        return g
    if not isinstance(compression, tuple):
        _, buf = cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, int(compression)])
        return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    kind, quality = compression
    buf = io.BytesIO()
    if kind == "webp":
        Image.fromarray(g).save(buf, "WEBP", quality=quality)
    else:
        Image.fromarray(g).save(buf, "JPEG", quality=quality, subsampling=2 if kind == "jpeg420" else 0)
    return np.asarray(Image.open(buf).convert("RGB" if g.ndim == 3 else "L"))


def generated_image(rng, painted, normal, box, strength=1.0, jpeg=None, clean=None, degradation="blur"):
    """The painted image's round trip under the `degradation` model, compressed as `jpeg` says
    (draw_compression; None: not), with the defect-free image pasted back outside the boxes. With
    `clean`: (image, the round trip's change)."""
    trip = ROUND_TRIPS[degradation](rng, painted, strength, clean)
    g, change = trip if clean is not None else (trip, None)
    g = compress(np.clip(np.round(g), 0, 255).astype(np.uint8), jpeg)
    image = np.where(box[..., None] if normal.ndim == 3 else box, g, normal)
    return image if clean is None else (image, change)


def make_pair(rng, split, photos, size, strength=1.0, degradation="blur", resolution=None):
    """dict: anomaly, normal, reference, control (uint8), box (uint8 0/255), truth, changed,
    blurred_change (the painting's change after the round trip's blur and gain alone, float32), info.
    resolution: the generator's size, when it is not `size` (see at_image_size)."""
    work = resolution or size
    while True:
        native, name, kind = source_image(rng, split, photos, size)
        normal = native if work == size else np.asarray(Image.fromarray(native).resize((work, work), Image.Resampling.LANCZOS))
        colour = normal.ndim == 3
        looks = LOOKS if colour else tuple(x for x in LOOKS if x != "tinted")
        look = looks[rng.integers(len(looks))]
        other = source_image(rng, split, photos, work)[0] if look == "texture" else None
        if other is not None:
            other = np.roll(other, tuple(int(v) for v in rng.integers(0, work // 2, 2)), axis=(0, 1))
        shape_kind = SHAPES[rng.integers(len(SHAPES))]
        box = np.zeros(normal.shape[:2], bool)
        truth = np.zeros(normal.shape[:2], bool)
        nf = normal.astype(np.float32)
        painted = nf
        ok = True
        for _ in range(1 if rng.random() < 0.75 else 2):
            for _try in range(50):
                bh, bw = (int(v) for v in rng.integers(work * 0.08, work * 0.4, 2))
                y, x = int(rng.integers(0, work - bh)), int(rng.integers(0, work - bw))
                if box[max(0, y - 8) : y + bh + 8, max(0, x - 8) : x + bw + 8].any():
                    continue
                shape = np.zeros_like(truth)
                shape[y : y + bh, x : x + bw] = draw_shape(rng, shape_kind, bh, bw)
                if shape.sum() < 30:
                    continue
                new = paint(rng, painted, shape, look, other, shape_kind == "thin")
                change = np.abs(new - nf)
                change = change.max(axis=2) if colour else change
                if (change[shape] >= VISIBLE).mean() >= 0.6:
                    # The generator fills the box it is given, so the box hugs the defect with a margin.
                    ys, xs = np.nonzero(shape)
                    m = int(2 + rng.uniform(0, 0.1) * max(bh, bw))
                    box[max(0, ys.min() - m) : ys.max() + 1 + m, max(0, xs.min() - m) : xs.max() + 1 + m] = True
                    painted, truth = new, truth | shape
                    break
            else:
                ok = False
                break
        if not ok:
            continue
        change = np.abs(painted - nf)
        changed = truth & ((change.max(axis=2) if colour else change) >= VISIBLE)
        jpeg = draw_compression(rng, degradation)
        anomaly, blurred_change = generated_image(rng, painted, normal, box, strength, jpeg, clean=nf, degradation=degradation)
        blurred_change = np.abs(blurred_change)
        control = generated_image(rng, nf, normal, box, strength, jpeg, degradation=degradation)
        reference = np.clip(np.round(ROUND_TRIPS[degradation](rng, nf, strength)), 0, 255).astype(np.uint8)
        info = {"image": name, "kind": kind, "look": look, "shape": shape_kind, "jpeg": jpeg, "visible": float(changed.sum() / truth.sum())}
        pair = {
            "anomaly": anomaly, "normal": normal, "reference": reference, "control": control, "box": box.astype(np.uint8) * 255,
            "truth": truth, "changed": changed, "blurred_change": blurred_change.max(axis=2) if colour else blurred_change, "info": info,
        }
        return pair if work == size else at_image_size(pair, native)


def at_image_size(pair, native):
    """The pair as Stage 3 hands it to extract_mask when the generator works at another size than
    the image's (MVTec AD's 700-1024 px images, generated at --resolution 512): the defect-free image
    is the original `native`; the generated image (and the reference) are resized back with PIL's
    bicubic and pasted into the boxes, as mvp_diff/synthesis/model.py's paste_back does; the boxes
    and truths are resized to the image (nearest for the boxes, bilinear at half for the truths).
    "generated": the pair at the generator's size, where Stage 3 measures its masks (predict)."""
    size = native.shape[1], native.shape[0]
    box = cv2.resize(pair["box"], size, interpolation=cv2.INTER_NEAREST) > 0
    inside = box[..., None] if native.ndim == 3 else box

    def pasted(image):
        return np.where(inside, np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)), native)

    return {
        "anomaly": pasted(pair["anomaly"]), "normal": native, "reference": pasted(pair["reference"]), "control": pasted(pair["control"]),
        "box": box.astype(np.uint8) * 255, "truth": resize_mask(pair["truth"], box.shape) & box, "changed": resize_mask(pair["changed"], box.shape) & box,
        "blurred_change": cv2.resize(pair["blurred_change"], size, interpolation=cv2.INTER_LINEAR), "info": {**pair["info"], "resolution": pair["box"].shape[0]},
        "generated": pair,
    }


def iou(pred, truth):
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0


CEILING_LEVELS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30)


def ceiling_mask(pair, image):
    """What a perfect change detector could reach: the round trip's blurred change without its
    noise, drift or JPEG, thresholded at the level best for this pair's painted shape (grey levels,
    largest channel). An unchanged box has no change: an empty mask."""
    if image is not pair["anomaly"]:
        return np.zeros(pair["truth"].shape, bool)
    inside = pair["box"] > 0
    masks = [(pair["blurred_change"] >= t) & inside for t in CEILING_LEVELS]
    return max(masks, key=lambda m: iou(m, pair["truth"]))


MEASURE_AT = ("resolution", "image", "image-as-generated")


def predict(method, pair, image, measure_at="resolution"):
    """`method`'s mask of `image` (the pair's anomaly or control), as extract_mask measures the
    generator's own output (at_generator_size) unless told the images were enlarged since. A pair
    generated at another size (make_pair's `resolution`) is measured, by `measure_at`: "resolution"
    as Stage 3 measures it (mvp_diff/synthesis/model.py's precise_mask), at the generator's size,
    the mask then resized to the image; "image" on the enlarged images, as such; "image-as-generated"
    on the enlarged images taken for the generator's own output (what not to do: it shows why
    extract_mask needs to know)."""
    box = pair["box"]
    if method == "box":
        return box > 0
    if method == "ceiling":
        return ceiling_mask(pair, image)
    name, _, ref = method.partition("+")
    small = pair.get("generated")
    if small is None or measure_at != "resolution":
        return extract_mask(image, pair["normal"], box, method=name, reference=pair["reference"] if ref else None, at_generator_size=small is None or measure_at == "image-as-generated")
    image = small["anomaly"] if image is pair["anomaly"] else small["control"]
    mask = extract_mask(image, small["normal"], small["box"], method=name, reference=small["reference"] if ref else None, at_generator_size=True)
    return resize_mask(mask, box.shape) & (box > 0)


def score_split(pairs, methods, official_num, measure_at="resolution"):
    """per method: {pair index: (IoU painted, IoU changed)}, false-alarm shares, seconds per image."""
    scores, alarms, times = {m: {} for m in methods}, {m: [] for m in methods}, {m: [] for m in [*methods, "yardstick"]}
    for m in methods:  # warm-up: imports and first-call set-up are not per-image costs
        predict(m, pairs[0], pairs[0]["anomaly"], measure_at)
    for k, pair in enumerate(tqdm(pairs, desc="masks", leave=False)):
        for m in methods:
            if m == "official" and k >= official_num:
                continue
            t0 = time.perf_counter()
            pred = predict(m, pair, pair["anomaly"], measure_at)
            times[m].append(time.perf_counter() - t0)
            truth = pair["truth"]
            hit = (pred & truth).sum()
            precision, recall = (hit / pred.sum() if pred.any() else 1.0), hit / truth.sum()
            scores[m][k] = (iou(pred, truth), iou(pred, pair["changed"]), float(precision), float(recall))
            false = predict(m, pair, pair["control"], measure_at)
            alarms[m].append(false.sum() / (pair["box"] > 0).sum())
        times["yardstick"].append(yardstick_seconds(pair["anomaly"].shape[0]))
    return scores, alarms, times


def groups():
    out = [("all", lambda i: True)]
    out += [(f"look={lk}", lambda i, lk=lk: i["look"] == lk) for lk in LOOKS]
    out += [(f"source={s}", lambda i, s=s: i["kind"] == s) for s in ("colour", "grey", "grey-rgb")]
    out += [("source=texture", lambda i: i["image"] == "texture")]
    out += [(f"shape={s}", lambda i, s=s: i["shape"] == s) for s in SHAPES]
    out += [("jpeg=none", lambda i: i["jpeg"] is None), ("jpeg=60", lambda i: i["jpeg"] == 60)]
    return out


def report(split, pairs, methods, scores, alarms, times, official_num):
    infos = [p["info"] for p in pairs]
    names = [f"{m}*" if m == "official" and official_num < len(pairs) else m for m in methods]
    means = {}
    for t, title in enumerate(TRUTHS):
        print(f"\n[{split}] mean IoU with {title}")
        print(f"| {'group':<16} | {'n':>4} | {'visible':>7} | " + " | ".join(f"{m:>11}" for m in names) + " |")
        print(f"|{'-' * 18}|{'-' * 6}|{'-' * 9}|" + "|".join("-" * 13 for _ in names) + "|")
        for label, test in groups():
            idx = [k for k, i in enumerate(infos) if test(i)]
            if not idx:
                continue
            cells = []
            for m in methods:
                values = [scores[m][k][t] for k in idx if k in scores[m]]
                means[(m, t, label)] = float(np.mean(values)) if values else float("nan")
                cells.append(f"{np.mean(values):>11.3f}" if values else f"{'-':>11}")
            visible = np.mean([infos[k]["visible"] for k in idx])
            print(f"| {label:<16} | {len(idx):>4} | {visible:>7.3f} | " + " | ".join(cells) + " |")
    print(f"\n[{split}] precision / recall against the painted shape (share of the mask inside it / share of it found)")
    print(f"| {'group':<16} | {'n':>4} | {'visible':>7} | " + " | ".join(f"{m:>11}" for m in names) + " |")
    for label, test in groups()[1:]:
        idx = [k for k, i in enumerate(infos) if test(i)]
        if label.startswith(("shape=", "look=")) and idx:
            cells = []
            for m in methods:
                values = [scores[m][k] for k in idx if k in scores[m]]
                cells.append(f"{np.mean([v[2] for v in values]):.2f} / {np.mean([v[3] for v in values]):.2f}" if values else "-")
            visible = np.mean([infos[k]["visible"] for k in idx])
            print(f"| {label:<16} | {len(idx):>4} | {visible:>7.3f} | " + " | ".join(f"{c:>11}" for c in cells) + " |")
    print()
    rows = {
        # Where the IoU is lost: marked pixels outside the painted shape, or painted pixels missed.
        "precision (shape)": lambda m: f"{np.mean([v[2] for v in scores[m].values()]):>11.3f}",
        "recall (shape)": lambda m: f"{np.mean([v[3] for v in scores[m].values()]):>11.3f}",
        "unchanged: hit %": lambda m: f"{100 * np.mean(np.array(alarms[m]) > 0):>11.1f}",
        "unchanged: area%": lambda m: f"{100 * np.mean(alarms[m]):>11.2f}",
        "ms per image": lambda m: f"{1000 * np.mean(times[m]):>11.2f}",
    }
    for label, cell in rows.items():
        print(f"| {label:<17}| {'':>4} | {'':>7} | " + " | ".join(cell(m) for m in methods) + " |")
    if "official" in methods and official_num < len(pairs):
        same = " | ".join(
            f"{o} " + "/".join(f"{np.mean([scores[o][k][t] for k in range(official_num)]):.3f}" for t in range(len(TRUTHS)))
            for o in methods
        )
        print(f"official* ran on the first {official_num} pairs only; on those pairs, IoU painted/changed: {same}")
    return means


def yardstick_seconds(size, repeats=5):
    """Median seconds of a fixed operation (size x size x 3 float32 Gaussian blur, sigma 2), timed
    beside every pair so that it sees the same machine load: times as its multiples compare across
    machines."""
    img = np.random.default_rng(0).random((size, size, 3), dtype=np.float32)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cv2.GaussianBlur(img, (0, 0), 2.0)
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def time_round_trip(checkpoint, size, steps=20, repeats=3):
    """(ms of Stage 3's reference, one VAE encode + decode, ms of one generation at `steps` steps)
    per sample, with the pipeline Stage 3 loads, at size x size px, on this process's threads."""
    from PIL import Image

    from mvp_diff.synthesis import Settings, generate, load_pipeline, vae_round_trips

    pipe = load_pipeline(checkpoint)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((size // 2, size // 2), 255, np.uint8), size // 4))
    settings = Settings(checkpoint=str(checkpoint), lora=None, num_inference_steps=steps)
    timed = {"round trip": lambda: vae_round_trips(pipe, [image]), "generation": lambda: generate(pipe, ["a defect"], [image], [mask], [0], (size, size), settings)}
    ms = {}
    for name, call in timed.items():
        call()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            call()
        ms[name] = 1000 * (time.perf_counter() - t0) / repeats
    return ms["round trip"], ms["generation"]


def draw_pairs(rng, split, photos, args):
    """args.num pairs of the split from `rng`; with --looks / --shapes only those of the given looks
    and shapes, the others drawn and skipped (without them: the very pairs the benchmark always drew)."""
    pairs, drawn = [], 0
    with tqdm(total=args.num, desc=f"{split} pairs", leave=False) as progress:
        while len(pairs) < args.num:
            if drawn >= 100 * args.num:
                sys.exit(f"--looks / --shapes: only {len(pairs)} of {drawn} {split} pairs drawn matched; widen the choice (tinted needs colour images)")
            pair = make_pair(rng, split, photos, args.size, args.strength, args.degradation, args.resolution)
            drawn += 1
            if (args.looks is None or pair["info"]["look"] in args.looks) and (args.shapes is None or pair["info"]["shape"] in args.shapes):
                pairs.append(pair)
                progress.update()
    return pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=150, help="pairs per split (default: 150)")
    parser.add_argument("--seed", type=int, default=0, help="offset added to both splits' fixed seeds (default: 0)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (default: 512)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="the generator's size: pairs are painted and round-tripped at it, then resized back to --size and pasted into the boxes, as Stage 3 does with MVTec AD's larger images (default: --size, no resizing)",
    )
    parser.add_argument(
        "--measure_at",
        default="resolution",
        choices=MEASURE_AT,
        help="with --resolution: measure masks at the generator's size and resize them to the image, as Stage 3 does; or on the enlarged images, as such (image) or taken for the generator's own output (image-as-generated) (default: resolution)",
    )
    parser.add_argument("--strength", type=float, default=1.0, help="scale of the VAE-like degradation (default: 1.0)")
    parser.add_argument(
        "--degradation",
        default="blur",
        choices=DEGRADATIONS,
        help="model of the generator's round trip: blur (the one settings were chosen under) or resample (never used to choose anything) (default: blur)",
    )
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--looks", nargs="+", default=None, choices=LOOKS, help="keep only pairs of these looks, drawn from the same stream, the others skipped: to study one kind of defect (default: all)")
    parser.add_argument("--shapes", nargs="+", default=None, choices=SHAPES, help="keep only pairs of these defect shapes, as --looks (default: all)")
    parser.add_argument("--official_num", type=int, default=20, help="run the official method (slow: its dense CRF) on the first N pairs of each split (default: 20)")
    parser.add_argument(
        "--round_trip_checkpoint",
        default=None,
        help="also time Stage 3's reference (one VAE encode + decode per sample) against one generation with this checkpoint",
    )
    args = parser.parse_args()
    if args.num < 1:
        parser.error("--num must be at least 1")
    if args.resolution is not None and not 64 <= args.resolution <= args.size:
        parser.error(f"--resolution must be between 64 and --size ({args.size}); the generator works at or below the image size")
    if args.official_num < 1 and "official" in args.methods:
        parser.error("--official_num must be at least 1 while --methods includes official; leave official out to skip it")
    cv2.setNumThreads(1)  # one core: the time per image is a single-thread figure

    photos = {n: photograph(n) for spec in SPLITS.values() for n in spec["colour"] + spec["grey"]}
    only = "; ".join(f"{name} {' '.join(kept)}" for name, kept in (("only looks", args.looks), ("only shapes", args.shapes)) if kept)
    if only:
        print(f"{only} (the split's other draws skipped)")
    generated = f", generated at {args.resolution} px and resized back, masks measured at the {args.measure_at}'s size" if args.resolution and args.resolution != args.size else ""
    print(f"{args.num} pairs per split at {args.size} px{generated}, {args.degradation} degradation at strength {args.strength}, one thread")
    results = {}
    for split in args.splits:
        spec = SPLITS[split]
        seed = spec["seed"] + args.seed
        print(f"\n== {split}: seed {seed}; colour {', '.join(spec['colour'])}; grey {', '.join(spec['grey'])}; generated {spec['texture']} textures")
        rng = np.random.default_rng(seed)
        pairs = draw_pairs(rng, split, photos, args)
        official_num = min(args.official_num, args.num)
        scores, alarms, times = score_split(pairs, args.methods, official_num, args.measure_at)
        results[split] = (report(split, pairs, args.methods, scores, alarms, times, official_num), alarms, times)

    headline = "held-out" if "held-out" in results else args.splits[0]
    means, alarms, times = results[headline]
    blur_ms = 1000 * np.mean(times["yardstick"])
    print(f"\nreference operation ({args.size}x{args.size}x3 float32 Gaussian blur, sigma 2, timed beside each pair): {blur_ms:.2f} ms")
    print(f"\nHEADLINE ({headline}, {args.size} px): mean IoU painted / changed, worst look, unchanged boxes with a mask, ms per image")
    for m in args.methods:
        look_means = {lk: means[(m, 0, f"look={lk}")] for lk in LOOKS if not np.isnan(means.get((m, 0, f"look={lk}"), np.nan))}
        worst = min(look_means, key=look_means.get)
        ms = 1000 * np.mean(times[m])
        line = (
            f"  {m:<11} {means[(m, 0, 'all')]:.3f} / {means[(m, 1, 'all')]:.3f}   worst {worst} "
            f"{means[(m, 0, f'look={worst}')]:.3f} / {means[(m, 1, f'look={worst}')]:.3f}   "
            f"unchanged {100 * np.mean(np.array(alarms[m]) > 0):.1f} %   {ms:.2f} ms = {ms / blur_ms:.1f}x the reference operation"
        )
        if "official" in times and m != "official" and ms > 0:
            line += f", {1000 * np.mean(times['official']) / ms:.0f}x faster than official"
        print(line)
    if args.round_trip_checkpoint:
        trip, gen = time_round_trip(args.round_trip_checkpoint, args.size)
        print(f"Stage 3 reference with {args.round_trip_checkpoint} at {args.size} px: {trip:.1f} ms per sample (VAE encode + decode), one 20-step generation {gen:.1f} ms: {100 * trip / gen:.1f} % of it")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, opencv {cv2.__version__}")


if __name__ == "__main__":
    main()
