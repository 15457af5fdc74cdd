"""Bounding boxes from ground-truth masks, and filled box masks."""

import cv2
import numpy as np


def mask_regions(mask: np.ndarray):
    """Connected regions (8-connectivity) of a bool mask: (label image, [(box, area, label), ...])."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        regions.append(([x, y, x + w, y + h], area, i))
    return labels, regions


def box_gap(a, b) -> int:
    """Background pixels between two boxes along the larger axis (0 when they touch or overlap)."""
    gx = max(b[0] - a[2], a[0] - b[2], 0)
    gy = max(b[1] - a[3], a[1] - b[3], 0)
    return max(gx, gy)


def _region_gap(region_a, region_b) -> int:
    """Background pixels between two regions (Chebyshev distance of their nearest pixels minus one)."""
    dist = cv2.distanceTransform((~region_a).astype(np.uint8), cv2.DIST_C, 3)
    return int(dist[region_b].min()) - 1


def union_box(a, b):
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


def boxes_from_mask(mask, min_area=10, merge_gap=0, margin=0):
    """Boxes `[x0, y0, x1, y1]` (x1/y1 exclusive) of a bool mask, and how many regions were dropped.

    One box per 8-connected region. Regions with fewer than `min_area` pixels are dropped; regions
    fewer than `merge_gap` background pixels apart share one box; `margin` grows every box, clipped to
    the image.
    """
    mask = np.asarray(mask).astype(bool)
    height, width = mask.shape
    labels, regions = mask_regions(mask)
    kept = [r for r in regions if r[1] >= min_area]
    dropped = len(regions) - len(kept)

    # Union-find over regions; the box gap is a lower bound of the region gap, so it prunes pairs.
    parent = list(range(len(kept)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if merge_gap > 0:
        for i in range(len(kept)):
            for j in range(i + 1, len(kept)):
                # Pixel masks only for pairs whose boxes are close: noisy masks have many regions.
                if box_gap(kept[i][0], kept[j][0]) < merge_gap and _region_gap(labels == kept[i][2], labels == kept[j][2]) < merge_gap:
                    parent[find(i)] = find(j)
    groups = {}
    for i, (box, _, _) in enumerate(kept):
        root = find(i)
        groups[root] = union_box(groups[root], box) if root in groups else list(box)

    boxes = []
    for x0, y0, x1, y1 in sorted(groups.values(), key=lambda b: (b[1], b[0])):
        boxes.append([max(0, x0 - margin), max(0, y0 - margin), min(width, x1 + margin), min(height, y1 + margin)])
    return boxes, dropped


def box_mask(boxes, height, width) -> np.ndarray:
    """uint8 0/255 mask with every box filled."""
    out = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        out[int(y0) : int(y1), int(x0) : int(x1)] = 255
    return out
