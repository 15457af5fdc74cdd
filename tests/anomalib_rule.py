"""anomalib's rule for reading an MVTec AD class folder, in plain Python (no pandas, no anomalib), so
that the tests can check our folders against it; benchmarks/anomalib_check.py checks it against the
real package."""

from pathlib import Path


def anomalib_mvtec_ad_samples(class_root, split=None, extensions=(".png", ".PNG")):
    """anomalib's exact MVTec AD rule, without pandas: `make_mvtec_ad_dataset` of anomalib 2.7
    (open-edge-platform/anomalib, src/anomalib/data/datasets/image/mvtecad.py), which
    `MVTecADDataset(root, category, split)` calls on ROOT/CATEGORY. Every image anywhere under the
    class folder is a sample whose split is its grandparent folder and label its parent folder; the
    ground_truth/ files, sorted by path, become the masks of the sorted non-"good" test samples; every
    non-"good" sample must then have a mask whose stem contains its own stem."""
    root = Path(class_root)
    rows = [(str(root), *f.parts[-3:]) for f in root.glob(r"**/*") if f.suffix in extensions and f.resolve().is_relative_to(root.resolve())]
    if not rows:
        raise RuntimeError(f"Found 0 images in {root}")
    samples = [{"split": s, "label": lab, "image_path": f"{p}/{s}/{lab}/{n}", "label_index": int(lab != "good")} for p, s, lab, n in rows]
    masks = sorted((x for x in samples if x["split"] == "ground_truth"), key=lambda x: x["image_path"])
    samples = sorted((x for x in samples if x["split"] != "ground_truth"), key=lambda x: x["image_path"])
    for x in samples:
        x["mask_path"] = None
    abnormal_test = [x for x in samples if x["split"] == "test" and x["label_index"] == 1]
    if len(abnormal_test) != len(masks):  # pandas: "Must have equal len keys and value when setting with an iterable"
        raise ValueError(f"{len(abnormal_test)} anomalous test images but {len(masks)} masks")
    for x, m in zip(abnormal_test, masks):
        x["mask_path"] = m["image_path"]
    for x in samples:
        if x["label_index"] == 1 and Path(x["image_path"]).stem not in Path(x["mask_path"]).stem:  # Path(None): TypeError, as in anomalib
            raise ValueError("Mismatch between anomalous images and ground truth masks")
    return [x for x in samples if x["split"] == split] if split else samples
