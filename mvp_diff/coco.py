"""COCO instance-segmentation export of a generated class folder, for detection and instance-
segmentation code (pycocotools, detectron2, mmdetection, torchvision's CocoDetection):

    OUTPUT/CLASS/coco.json

One category per defect type (ids 1.. in name order), one image per sample (id = sample index + 1,
`file_name` relative to coco.json, e.g. test/DEFECT/NNN.png) and one annotation per 8-connected region
of the sample's precise mask: uncompressed RLE (`{"size": [h, w], "counts": [...]}`, column-major,
exact to the pixel even for regions of a few pixels), `bbox` [x, y, width, height], `area` in pixels,
`iscrowd` 0. A sample with an empty mask is an image without annotations.

inpainting.py rewrites the file as samples finish (with its manifest); `python -m mvp_diff.coco
OUTPUT/CLASS` rebuilds it from manifest.jsonl and the mask files.
"""

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from .errors import UserError, cli
from .files import atomic_write_text, read_mask
from .manifest import MANIFEST, read_manifest

COCO_FILE = "coco.json"


def rle_counts(region) -> list:
    """COCO's uncompressed run-length counts of a bool HxW array: column-major runs, starting with
    the zeros (0 when the first pixel is set)."""
    flat = np.asarray(region, dtype=bool).flatten(order="F")
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    counts = np.diff(np.concatenate([[0], changes, [flat.size]]))
    if len(counts) > 1 and counts[-1] == 0:
        counts = counts[:-1]
    return [int(c) for c in counts]


def mask_regions(mask) -> list:
    """One dict per 8-connected region of a mask: its RLE segmentation, bbox and area."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        regions.append({"segmentation": {"size": [height, width], "counts": rle_counts(labels == label)}, "bbox": [x, y, w, h], "area": area})
    return regions


def sample_regions(class_dir: Path, sample) -> list:
    """Regions of a GeneratedSample: cached in its entry when inpainting.py wrote it, else from its mask."""
    if sample.regions is not None:
        return sample.regions
    return mask_regions(read_mask(Path(class_dir) / sample.mask))


def coco_dataset(class_dir: Path, entries, classname=None, defect_types=None) -> dict:
    """The COCO dict of a generated class folder's samples (GeneratedSample)."""
    class_dir = Path(class_dir)
    classname = classname or (entries[0].classname if entries else None) or class_dir.name
    names = sorted(set(defect_types or ()) | {e.defect_type for e in entries})
    category = {name: i for i, name in enumerate(names, 1)}
    images, annotations = [], []
    for entry in sorted(entries, key=lambda e: e.index):
        image_id = entry.index + 1
        images.append({"id": image_id, "file_name": entry.image, "width": entry.width, "height": entry.height})
        for region in sample_regions(class_dir, entry):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[entry.defect_type], "iscrowd": 0, **region})
    return {
        "info": {"description": f"MvP-Diff synthetic {classname} defects with precise masks", "version": "1.0"},
        "licenses": [],
        "categories": [{"id": i, "name": name, "supercategory": classname} for name, i in category.items()],
        "images": images,
        "annotations": annotations,
    }


def write_coco(class_dir: Path, entries, classname=None, defect_types=None) -> Path:
    """CLASS/coco.json, atomically (compact JSON: RLE counts make it large)."""
    path = Path(class_dir) / COCO_FILE
    atomic_write_text(path, json.dumps(coco_dataset(class_dir, entries, classname, defect_types), separators=(",", ":")) + "\n")
    return path


def rebuild_coco(class_dir: Path) -> Path:
    """coco.json from manifest.jsonl and the mask files alone."""
    class_dir = Path(class_dir)
    manifest = class_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{manifest}: not found; is {class_dir} a class folder written by inpainting.py (OUTPUT/CLASS)?")
    entries = read_manifest(manifest)
    for lineno, entry in entries:
        entry.regions = None  # from the mask files, not from a field of a shared file
        if entry.width is None or entry.height is None:
            raise UserError(f"{manifest}:{lineno}: lacks width, height; rerun inpainting.py")
    return write_coco(class_dir, [entry for _, entry in entries])


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mvp_diff.coco", description="Rebuild OUTPUT/CLASS/coco.json from its manifest.jsonl and masks.")
    parser.add_argument("class_dirs", nargs="+", help="generated class folders, e.g. ./output/dataset/image/bottle")
    args = parser.parse_args(argv)
    for folder in args.class_dirs:
        path = rebuild_coco(Path(folder))
        data = json.loads(path.read_text())
        print(f"{len(data['images'])} images, {len(data['annotations'])} regions, {len(data['categories'])} categories -> {path}")


if __name__ == "__main__":
    main()
