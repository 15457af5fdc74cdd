"""The gallery's images: up to `gallery_n` generated samples per class, spread over the defect types,
each with its mask (and box, and defect-free image) as thumbnails beside the report."""

import cv2
import numpy as np

from ..files import read_mask, read_rgb, save_image
from .data import has_box, read_box_mask


def _thumb(image, size=256):
    h, w = image.shape[:2]
    scale = size / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) if scale < 1 else image


def overlay(image, mask, colour, fill=0.35):
    """Image with the mask tinted and outlined in `colour` (RGB)."""
    out = image.astype(np.float32)
    out[mask] = out[mask] * (1 - fill) + np.array(colour, np.float32) * fill
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), max(1, round(max(mask.shape) / 256)))
    return out


def gallery_for_class(cfg, generated, out_dir):
    """Write the gallery images of up to `gallery_n` samples (spread over defect types) and return
    their entries with paths relative to out_dir."""
    rng = np.random.default_rng([cfg.seed, 3])
    queues = {d: [samples[i] for i in rng.permutation(len(samples))] for d, samples in sorted(generated.items())}
    picked = []
    while len(picked) < cfg.gallery_n and any(queues.values()):
        for d in list(queues):
            if queues[d] and len(picked) < cfg.gallery_n:
                picked.append(queues[d].pop(0))
    entries = []
    for s in picked:
        image = read_rgb(s.image)
        mask = read_mask(s.mask)
        stem = f"{s.defect_type}_{s.image.stem}"
        folder = out_dir / "gallery" / s.image.parents[2].name
        entry = {"defect_type": s.defect_type, "name": s.image.name, "prompt": s.prompt, "mask_area": int(mask.sum())}
        files = {"image": _thumb(image), "mask": _thumb(overlay(image, mask, (255, 40, 40)))}
        if has_box(s):
            files["box"] = _thumb(overlay(image, read_box_mask(s), (40, 220, 40), fill=0.15))
        if s.good_image is not None:
            files["good"] = _thumb(read_rgb(s.good_image))
        for kind, array in files.items():
            path = folder / f"{stem}_{kind}.png"
            save_image(path, array)
            entry[kind] = path.relative_to(out_dir).as_posix()
        entries.append(entry)
    return entries
