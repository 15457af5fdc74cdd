"""Mask precision benchmark: how well does each mask method recover a defect whose true mask is known?

Pairs are built from photographs that ship with scikit-image (colour and grey), cropped and
resized to --size px. For each pair:
  1. one or two defect shapes (blob, scratch or spots) are drawn, each in a random rectangle; the
     shape is the true mask and its box is the shape's bounding box grown by a margin of 2 px plus
     up to 10% of the rectangle's side (a generator fills the box it is given);
  2. the shape is painted with one look: darker, brighter, tinted (colour images only), other texture
     (a patch of another photograph at the local mean brightness) or blurred; edges are feathered;
     placements where under 60% of the shape changes by 10 grey levels or more are redrawn (an
     invisible defect has no true mask);
  3. the painted image goes through a VAE-like degradation (Gaussian blur sigma 0.4-0.9, per-channel
     gain +-3% and offset +-3 levels, Gaussian noise sigma 1-3 levels) plus a smooth low-frequency
     shift of up to +-8 levels, and the defect-free image is pasted back outside the boxes, as
     inpainting.py does.
Grey photographs stay single-channel (HxW) throughout. Unchanged controls (the same boxes, only the
degradation) count how often a method marks something where nothing was drawn.
Two true masks, each with its own table: the painted shape, and the changed pixels (the pixels of
the shape where the painting changed the image by 10 grey levels (VISIBLE) or more in some
channel, measured before the degradation; blurring a flat area changes nothing there).
Methods: the box itself as the mask (the "mask drift" baseline), the paper's method ("official")
and the default method. Reports mean IoU (overall, per look, per grey/colour, per shape), the
share of the shape that visibly changed (the most any method that compares images can reach
against the painted shape), false alarms on the controls, and milliseconds per image. --strength
scales the degradation (a stress test: 2 doubles blur, noise, jitter and shift). --official_num N
runs the slow official method on the first N pairs only (its column is marked with *, and all
methods are compared on those N pairs too).

    python benchmarks/mask_precision.py --num 200 --seed 0
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvp_diff.masks import MASK_METHODS, extract_mask  # noqa: E402

COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
GREY = ("camera", "brick", "grass", "gravel", "coins", "moon")
LOOKS = ("darker", "brighter", "tinted", "texture", "blurred")
SHAPES = ("blob", "scratch", "spots")
# A change of at least this many grey levels (largest over R, G, B) counts as visible. It is the
# generator's own test for an invisible placement; about 4 deltaE at mid grey, well above the just
# noticeable 2.3 and above the degradation's noise (sigma up to 3 levels).
VISIBLE = 10
TRUTHS = (
    "the painted shape",
    f"the changed pixels (the painted shape where the painting changed the image by >= {VISIBLE} levels)",
)


def load_photos(size):
    """name -> uint8 HxWx3 (colour) or HxW (grey), centre-cropped square and resized to size."""
    photos = {}
    for name in COLOUR + GREY:
        img = getattr(data, name)()
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        photos[name] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return photos


def smooth_noise(rng, h, w, sigma):
    field = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


def draw_shape(rng, kind, bh, bw):
    """bool bh x bw mask of one defect shape inside a box."""
    m = np.zeros((bh, bw), np.uint8)
    if kind == "blob":
        yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
        r = np.sqrt(((yy - bh / 2) / (bh / 2)) ** 2 + ((xx - bw / 2) / (bw / 2)) ** 2)
        field = 1.0 - r + 0.35 * smooth_noise(rng, bh, bw, max(2.0, min(bh, bw) / 8))
        m = (field > rng.uniform(0.25, 0.45)).astype(np.uint8)
    elif kind == "scratch":
        for _ in range(rng.integers(1, 3)):
            # quadratic curve from one side of the box to the other
            p0 = np.array([rng.uniform(0, 0.2), rng.uniform(0, 1)])
            p2 = np.array([rng.uniform(0.8, 1), rng.uniform(0, 1)])
            p1 = np.array([rng.uniform(0.3, 0.7), rng.uniform(0, 1)])
            if rng.random() < 0.5:
                p0, p1, p2 = p0[::-1], p1[::-1], p2[::-1]
            t = np.linspace(0, 1, 50)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            pts = np.round(pts * [bw - 1, bh - 1]).astype(np.int32)
            cv2.polylines(m, [pts], False, 1, thickness=int(rng.integers(3, 9)))
    else:  # spots
        for _ in range(rng.integers(3, 9)):
            r = int(rng.integers(4, 10))
            cv2.circle(m, (int(rng.integers(r, max(r + 1, bw - r))), int(rng.integers(r, max(r + 1, bh - r)))), r, 1, -1)
    return m > 0


def paint(rng, img, shape_mask, look, photos, name):
    """The image with the defect painted over shape_mask (feathered edge)."""
    f = img.astype(np.float32)
    colour = f.ndim == 3
    if look == "darker":
        new = f * rng.uniform(0.45, 0.7)
    elif look == "brighter":
        new = f + (255 - f) * rng.uniform(0.3, 0.55)
    elif look == "tinted":  # hue change at about the same luminance
        gains = rng.uniform(0.5, 1.5, 3)
        gains /= gains @ [0.299, 0.587, 0.114]
        new = f * gains
    elif look == "texture":
        others = [k for k in photos if k != name]
        src = photos[others[rng.integers(len(others))]].astype(np.float32)
        if colour and src.ndim == 2:
            src = np.repeat(src[..., None], 3, axis=2)
        if not colour and src.ndim == 3:
            src = src @ np.float32([0.299, 0.587, 0.114])
        dy, dx = rng.integers(0, f.shape[0] // 2, 2)
        src = np.roll(src, (int(dy), int(dx)), axis=(0, 1))
        sel = shape_mask
        axes = (0,) if colour else None
        new = src - src[sel].mean(axis=axes) + f[sel].mean(axis=axes)
    else:  # blurred
        new = cv2.GaussianBlur(f, (0, 0), rng.uniform(2.5, 5.0))
    alpha = cv2.GaussianBlur(shape_mask.astype(np.float32), (0, 0), 1.0)
    if colour:
        alpha = alpha[..., None]
    return np.clip(f * (1 - alpha) + new * alpha, 0, 255)


def degrade(rng, f, box, strength=1.0):
    """VAE-like round trip of the whole image, a smooth low-frequency shift inside the boxes, and the
    defect-free image pasted back outside them. `strength` scales every amplitude."""
    colour = f.ndim == 3
    shape = (1, 1, 3) if colour else ()
    g = cv2.GaussianBlur(f, (0, 0), strength * rng.uniform(0.4, 0.9))
    gain = 1 + strength * rng.uniform(-0.03, 0.03, 3 if colour else 1)
    offset = strength * rng.uniform(-3, 3, 3 if colour else 1)
    g = g * gain.astype(np.float32).reshape(shape) + offset.astype(np.float32).reshape(shape)
    g = g + rng.normal(0, strength * rng.uniform(1, 3), g.shape).astype(np.float32)
    h, w = box.shape
    shift = cv2.resize(smooth_noise(rng, h // 8 + 1, w // 8 + 1, 3), (w, h), interpolation=cv2.INTER_CUBIC)
    shift *= strength * rng.uniform(2, 8) / (np.abs(shift).max() + 1e-6)
    g = g + (shift[..., None] if colour else shift)
    g = np.where(box[..., None] if colour else box, g, f)
    return np.clip(np.round(g), 0, 255).astype(np.uint8)


def make_pair(rng, photos, look=None, strength=1.0):
    """(anomaly uint8, normal uint8, box uint8 0/255, true mask bool, info dict)."""
    names = list(photos)
    while True:
        name = names[rng.integers(len(names))]
        normal = photos[name]
        colour = normal.ndim == 3
        looks = LOOKS if colour else tuple(x for x in LOOKS if x != "tinted")
        lk = look if look else looks[rng.integers(len(looks))]
        if lk not in looks:
            continue
        kind = SHAPES[rng.integers(len(SHAPES))]
        size = normal.shape[0]
        box = np.zeros(normal.shape[:2], bool)
        truth = np.zeros(normal.shape[:2], bool)
        painted = normal.astype(np.float32)
        nbox = 1 if rng.random() < 0.75 else 2
        ok = True
        for _ in range(nbox):
            for _try in range(50):
                bh, bw = (int(v) for v in rng.integers(size * 0.08, size * 0.4, 2))
                y, x = int(rng.integers(0, size - bh)), int(rng.integers(0, size - bw))
                if box[max(0, y - 8) : y + bh + 8, max(0, x - 8) : x + bw + 8].any():
                    continue
                shape = np.zeros_like(truth)
                shape[y : y + bh, x : x + bw] = draw_shape(rng, kind, bh, bw)
                if shape.sum() < 30:
                    continue
                new = paint(rng, painted, shape, lk, photos, name)
                change = np.abs(new - normal.astype(np.float32))
                if change.ndim == 3:
                    change = change.max(axis=2)
                if (change[shape] >= VISIBLE).mean() >= 0.6:
                    # The generator fills the box it is given, so the box hugs the defect with a margin.
                    ys, xs = np.nonzero(shape)
                    m = int(2 + rng.uniform(0, 0.1) * max(bh, bw))
                    box[max(0, ys.min() - m) : ys.max() + 1 + m, max(0, xs.min() - m) : xs.max() + 1 + m] = True
                    painted = new
                    truth |= shape
                    break
            else:
                ok = False
                break
        if ok:
            # The second truth: the pixels of the shape that the painting visibly changed, measured
            # before the degradation (which is not part of the defect).
            change = np.abs(painted - normal.astype(np.float32))
            changed = truth & ((change.max(axis=2) if colour else change) >= VISIBLE)
            visible = float(changed.sum() / truth.sum())
            anomaly = degrade(rng, painted, box, strength)
            info = {"image": name, "colour": colour, "look": lk, "shape": kind, "boxes": nbox, "visible": visible}
            return anomaly, normal, box.astype(np.uint8) * 255, truth, changed, info


def iou(pred, truth):
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=200, help="number of pairs (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (default: 512)")
    parser.add_argument("--strength", type=float, default=1.0, help="scale of the VAE-like degradation (default: 1.0)")
    parser.add_argument("--methods", nargs="+", default=["box", "official", "default"], choices=["box", *MASK_METHODS])
    parser.add_argument(
        "--official_num",
        type=int,
        default=None,
        help="run the official method (slow: its dense CRF) on the first N pairs only (default: all)",
    )
    args = parser.parse_args()
    if args.num < 1:
        parser.error("--num must be at least 1")
    if args.official_num is not None and args.official_num < 1:
        parser.error("--official_num must be at least 1")

    photos = load_photos(args.size)
    rng = np.random.default_rng(args.seed)
    pairs = [make_pair(rng, photos, strength=args.strength) for _ in tqdm(range(args.num), desc="pairs")]
    # Unchanged controls: the same boxes, only the degradation. A method should return an empty mask.
    crng = np.random.default_rng([args.seed, 1])
    controls = [degrade(crng, p[1].astype(np.float32), p[2] > 0, args.strength) for p in pairs]

    limit = {m: args.num for m in args.methods}
    if "official" in limit and args.official_num:
        limit["official"] = min(args.num, args.official_num)
    # per method: pair index -> (IoU with the painted shape, IoU with the changed pixels)
    scores = {m: {} for m in args.methods}
    times = {m: 0.0 for m in args.methods}
    alarms = {m: [] for m in args.methods}
    for k, (pair, control) in enumerate(tqdm(list(zip(pairs, controls)), desc="masks")):
        anomaly, normal, box, truth, changed, _ = pair
        for m in args.methods:
            if k >= limit[m]:
                continue
            t0 = time.perf_counter()
            pred = box > 0 if m == "box" else extract_mask(anomaly, normal, box, method=m)
            times[m] += time.perf_counter() - t0
            scores[m][k] = (iou(pred, truth), iou(pred, changed))
            false = box > 0 if m == "box" else extract_mask(control, normal, box, method=m)
            alarms[m].append(false.sum() / (box > 0).sum())

    infos = [p[5] for p in pairs]
    groups = [("all", lambda i: True)]
    groups += [(f"look={lk}", lambda i, lk=lk: i["look"] == lk) for lk in LOOKS]
    groups += [("grey", lambda i: not i["colour"]), ("colour", lambda i: i["colour"])]
    groups += [(f"shape={s}", lambda i, s=s: i["shape"] == s) for s in SHAPES]
    names = [f"{m}*" if limit[m] < args.num else m for m in args.methods]

    print(f"{args.num} pairs at {args.size} px, seed {args.seed}, degradation strength {args.strength}")
    for t, title in enumerate(TRUTHS):
        print(f"\nmean IoU with {title}")
        print(f"| {'group':<16} | {'n':>4} | {'visible':>7} | " + " | ".join(f"{m:>9}" for m in names) + " |")
        print(f"|{'-' * 18}|{'-' * 6}|{'-' * 9}|" + "|".join("-" * 11 for _ in names) + "|")
        for label, test in groups:
            idx = [k for k, i in enumerate(infos) if test(i)]
            if idx:
                cells = []
                for m in args.methods:
                    values = [scores[m][k][t] for k in idx if k in scores[m]]
                    cells.append(f"{np.mean(values):>9.3f}" if values else f"{'-':>9}")
                visible = np.mean([infos[k]["visible"] for k in idx])
                print(f"| {label:<16} | {len(idx):>4} | {visible:>7.3f} | " + " | ".join(cells) + " |")
    print()
    rows = {
        "unchanged: hit %": lambda m: f"{100 * np.mean(np.array(alarms[m]) > 0):>9.1f}",
        "unchanged: area%": lambda m: f"{100 * np.mean(alarms[m]):>9.2f}",
        "ms per image": lambda m: f"{1000 * times[m] / limit[m]:>9.2f}",
    }
    for label, cell in rows.items():
        print(f"| {label:<16} | {'':>4} | {'':>7} | " + " | ".join(cell(m) for m in args.methods) + " |")
    print(f"'visible': mean share of the painted shape that changed by >= {VISIBLE} grey levels")
    print("unchanged: share of unchanged controls with a non-empty mask, and mean masked share of the box")
    for m in args.methods:
        if limit[m] < args.num:
            # The same pairs for every method, so that the subset's comparison is fair.
            same = " | ".join(
                f"{o} " + "/".join(f"{np.mean([scores[o][k][t] for k in range(limit[m])]):.3f}" for t in range(len(TRUTHS)))
                for o in args.methods
            )
            print(f"{m}* ran on the first {limit[m]} pairs only; on those pairs, IoU painted/changed: {same}")
    if "official" in times and "default" in times and times["default"] > 0:
        speed = (times["official"] / limit["official"]) / (times["default"] / limit["default"])
        print(f"default is {speed:.1f}x faster than official")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")


if __name__ == "__main__":
    main()
