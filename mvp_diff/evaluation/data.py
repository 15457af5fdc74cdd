"""What the evaluation reads: the real split (the same function Stage 1 uses, so it cannot drift) and
a generated folder in MVTec layout (Stage 3's output, or any other generator's).

Generated folder, per class (GENERATED/CLASS/ or the class folder itself):
    CLASS/test/DEFECT/NNN.png                generated image          (required)
    CLASS/ground_truth/DEFECT/NNN_mask.png   its precise mask         (required)
    CLASS/manifest.jsonl                     per-sample fields        (optional: prompts, boxes, good_image)
    CLASS_boxes/DEFECT/NNN_mask.png          its box mask, beside CLASS/ (optional: setting (c) needs it
                                             or the manifest's boxes)
or the layout AnomalyDiffusion released its generated data in (sjtuplayer/anomalydiffusion,
unet_utils/data_loader.py reads it so): DEFECT/image/N.jpg with DEFECT/mask/N.jpg (JPEG masks, cut at
half by read_mask).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import untrusted
from ..boxes import box_mask
from ..dataset import (
    BBOX_DIR,
    GOOD,
    ClassData,
    generated_boxes_dir,
    image_files,
    load_class,
    masks_by_stem,
    pair_masks,
    split_anomalies,
)
from ..errors import UserError
from ..files import image_size, read_mask
from ..manifest import MANIFEST, read_manifest


@dataclass
class LabeledImage:
    """One image with its pixel mask (None: defect-free, all zero)."""

    image: Path
    mask: Path = None
    defect_type: str = GOOD
    box_mask: Path = None  # generated samples only
    good_image: Path = None  # the defect-free image it was made from, when known
    boxes: list = None
    prompt: str = None

    @property
    def is_anomaly(self):
        return self.mask is not None


@dataclass
class RealSplit:
    """The real data of one class, split the field's way, plus the validation part we carve out."""

    class_data: ClassData
    generator_train: dict  # defect -> [LabeledImage]: first third, may have trained the generator
    train_anomalies: dict  # defect -> [LabeledImage]: generator_train minus validation
    val_anomalies: dict  # defect -> [LabeledImage]
    test_anomalies: dict  # defect -> [LabeledImage]: the other two thirds, never seen by any generator
    train_good: list  # [LabeledImage] train/good minus validation
    val_good: list
    test_good: list  # test/good
    notes: list = field(default_factory=list)

    def flat(self, part):
        return [s for d in sorted(part) for s in part[d]]

    def test_set(self):
        return self.flat(self.test_anomalies) + self.test_good

    def val_set(self):
        return self.flat(self.val_anomalies) + self.val_good

    def counts(self):
        return {
            d: {
                "generator_train": len(self.generator_train.get(d, [])),
                "downstream_train": len(self.train_anomalies.get(d, [])),
                "validation": len(self.val_anomalies.get(d, [])),
                "test": len(self.test_anomalies.get(d, [])),
            }
            for d in self.class_data.defect_types
        } | {
            GOOD: {"downstream_train": len(self.train_good), "validation": len(self.val_good), "test": len(self.test_good)}
        }


def _held_out(items, fraction, rng, keep=1):
    """(kept, held) with ceil(fraction * n) held out at random, never leaving fewer than `keep`."""
    n_held = min(max(0, len(items) - keep), math.ceil(len(items) * fraction - 1e-9))
    order = rng.permutation(len(items))
    held = sorted(order[:n_held])
    kept = sorted(order[n_held:])
    return [items[i] for i in kept], [items[i] for i in held]


def first_share(anomalies, fraction=1 / 3, rounding="ceil"):
    """(first, rest) of one defect type sorted by file name. "ceil" is Stage 1's rule (what trained
    this project's generator, at least one); "floor" is AnomalyDiffusion's and SeaS's (floor(n/3))."""
    if rounding == "ceil":
        return split_anomalies(anomalies, fraction)
    ordered = sorted(anomalies, key=lambda a: a.image.name)
    n_first = math.floor(len(ordered) * fraction + 1e-9)
    return ordered[:n_first], ordered[n_first:]


def real_split(dataset, classname, mask_suffix="_mask", train_fraction=1 / 3, val_fraction=0.25, seed=0, rounding="ceil") -> RealSplit:
    """Generator-train share vs. test rest by `first_share`; the validation set for model selection is
    carved from the training side only (part of the generator-train anomalies and of train/good), the
    same for every setting."""
    class_data = load_class(dataset, classname, mask_suffix)
    rng = np.random.default_rng([seed, 7])
    gen_train, train, val, test, notes = {}, {}, {}, {}, []
    for defect in class_data.defect_types:
        first, rest = first_share(class_data.anomalies[defect], train_fraction, rounding)
        first = [LabeledImage(a.image, a.mask, defect) for a in first]
        gen_train[defect] = first
        train[defect], val[defect] = _held_out(first, val_fraction, rng)
        test[defect] = [LabeledImage(a.image, a.mask, defect) for a in rest]
        if not rest:
            notes.append(f"{classname}/{defect}: no real anomalies left for the test split ({len(first)} in all); its test row is skipped")
        if not val[defect] and val_fraction > 0:
            notes.append(f"{classname}/{defect}: only {len(first)} generator-train anomaly; none held out for validation")
    for anomaly in class_data.empty_masks:
        notes.append(f"{anomaly.image}: empty mask; left out as Stage 1 does")
    goods = [LabeledImage(p) for p in class_data.train_good]
    train_good, val_good = _held_out(goods, val_fraction, rng)
    test_good = [LabeledImage(p) for p in class_data.test_good]
    return RealSplit(class_data, gen_train, train, val, test, train_good, val_good, test_good, notes)


def dataset_classes(dataset):
    """Every class folder of a dataset (one with train/good/), sorted: what --classname all means."""
    root = Path(dataset)
    names = sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir()) if root.is_dir() else []
    if not names:
        raise UserError(f"--dataset {root}: no class folders with train/{GOOD}/ (--classname all needs them)")
    return names


def generated_class_dir(generated, classname) -> Path:
    root = Path(generated)
    if not root.is_dir():
        raise UserError(f"--generated {root}: folder not found; pass Stage 3's --output folder (e.g. ./output/dataset/image)")
    if (root / classname / "test").is_dir() or _anomalydiffusion_defects(root / classname):
        return root / classname
    if _anomalydiffusion_defects(root) and root.name == classname:  # that layout's class folder itself
        return root
    if (root / "test").is_dir():  # the class folder itself: its manifest must not name another class
        manifest = root / MANIFEST
        named = {entry.classname for _, entry in read_manifest(manifest)} - {None} if manifest.is_file() else set()
        named = named or {root.name}  # no class in a manifest: the folder's name says it
        if named != {classname}:
            raise UserError(f"--generated {root} holds {', '.join(sorted(named))} samples, not {classname}; pass the folder above it or the {classname} folder")
        return root
    raise UserError(
        f"--generated {root}: no {classname}/test/ folder; expected Stage 3's layout "
        f"{root}/{classname}/test/DEFECT/NNN.png with {root}/{classname}/ground_truth/DEFECT/NNN_mask.png, "
        f"or AnomalyDiffusion's {root}/{classname}/DEFECT/image/N.jpg with {root}/{classname}/DEFECT/mask/N.jpg"
    )


def _manifest_index(folder: Path):
    """{(defect_type, image file name): (line number, GeneratedSample)} from manifest.jsonl (its fields
    checked by `read_manifest`: generated folders are shared and downloaded, and their names become
    gallery and report paths), or {} without one."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    return {(entry.defect_type, Path(entry.image).name): (lineno, entry) for lineno, entry in read_manifest(path)}


def _good_image(folder, value, dataset, where):
    """The defect-free image a manifest names, which must lie in the dataset or the generated folder.
    Without a dataset to check against (library use), one outside the folder is not read."""
    if not value:
        return None
    path = Path(value) if Path(value).is_absolute() else folder / value
    if dataset is None and not untrusted.is_inside(path, folder):
        return None
    return untrusted.inside(path, [folder, dataset], where)


def _anomalydiffusion_defects(folder: Path):
    """DEFECT folders of AnomalyDiffusion's layout (DEFECT/image/ beside DEFECT/mask/), or []."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "image").is_dir() and (p / "mask").is_dir())


def _load_anomalydiffusion(folder: Path):
    samples = {}
    for ddir in _anomalydiffusion_defects(folder):
        images = image_files(ddir / "image")
        if not images:
            raise UserError(f"{ddir / 'image'}: no generated images in this defect-type folder; generate some or remove it")
        pairs = pair_masks(images, ddir / "mask", mask_suffix="")  # same file name as the image
        samples[ddir.name] = [LabeledImage(im, mask, ddir.name) for im, mask in pairs.items()]
    return folder, samples, [f"{folder}: AnomalyDiffusion layout (DEFECT/image, DEFECT/mask), which has no box masks"]


def _manifest_boxes(entry, image, where):
    """The manifest's boxes of a sample, checked against its image."""
    if entry is None or entry.boxes is None:
        return None
    width, height = image_size(image)
    return untrusted.boxes(entry.boxes, width, height, where)


def load_generated(generated, classname, mask_suffix="_mask", dataset=None):
    """{defect: [LabeledImage]} of a generated folder, and notes. Pairing and sizes are checked up front;
    a manifest's defect-free images must lie in `dataset` or the generated folder."""
    folder = generated_class_dir(generated, classname)
    if (folder / BBOX_DIR).is_dir():
        raise UserError(f"{folder / BBOX_DIR}: box masks in the earlier layout (MVTec readers take them for samples); "
                        f"rerun the command that made them (inpainting.py, python -m mvp_diff.draem) to move them to {generated_boxes_dir(folder)}/, or move the folder there")
    if not (folder / "test").is_dir():
        return _load_anomalydiffusion(folder)
    manifest = _manifest_index(folder)
    test_dir, gt_dir = folder / "test", folder / "ground_truth"
    defect_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir() and p.name != GOOD)
    if not defect_dirs:
        raise UserError(f"{test_dir}: no defect-type folders with generated images")
    samples, notes = {}, []
    n_box_from_manifest = 0
    for ddir in defect_dirs:
        images = image_files(ddir)
        if not images:
            raise UserError(f"{ddir}: no generated images in this defect-type folder; generate some or remove it")
        pairs = pair_masks(images, gt_dir / ddir.name, mask_suffix)
        boxes = box_mask_files(folder, ddir.name, mask_suffix)
        found = []
        for im, mask in pairs.items():
            box = boxes.get(im.stem)
            if box is not None and image_size(box) != image_size(im):
                raise UserError(f"{im} is {image_size(im)} but its box mask {box} is {image_size(box)} (width, height); they must match")
            lineno, entry = manifest.get((ddir.name, im.name), (None, None))
            good = _good_image(folder, entry and entry.good_image, dataset, untrusted.field_at(folder / MANIFEST, lineno, "good_image"))
            found.append(
                LabeledImage(
                    im,
                    mask,
                    ddir.name,
                    box_mask=box,
                    good_image=good if good is not None and good.is_file() else None,
                    boxes=_manifest_boxes(entry, im, untrusted.field_at(folder / MANIFEST, lineno, "boxes")),
                    prompt=entry and entry.prompt,
                )
            )
            if found[-1].box_mask is None and found[-1].boxes:
                n_box_from_manifest += 1
        samples[ddir.name] = found
    if n_box_from_manifest:
        notes.append(f"{folder}: {n_box_from_manifest} box mask(s) drawn from the boxes in {MANIFEST} (no {generated_boxes_dir(folder).name}/DEFECT/*{mask_suffix}.png files)")
    return folder, samples, notes


def box_mask_files(folder: Path, defect: str, mask_suffix="_mask"):
    """{image stem: box mask file} of one generated defect type (the one place that knows where
    box masks live)."""
    return masks_by_stem(generated_boxes_dir(folder) / defect, mask_suffix, strict=False)


def read_box_mask(sample: LabeledImage):
    """bool box mask of a generated sample: its CLASS_boxes/DEFECT/NNN_mask.png, else drawn from the manifest's boxes."""
    if sample.box_mask is not None:
        return read_mask(sample.box_mask)
    width, height = image_size(sample.image)
    return box_mask(sample.boxes, height, width) > 0


def has_box(sample: LabeledImage):
    return sample.box_mask is not None or bool(sample.boxes)


def check_no_leak(split: RealSplit, generated_dir: Path, generated: dict):
    """A generated folder must not be the dataset itself, nor be made from test images."""
    if generated_dir.resolve() == split.class_data.root.resolve():
        raise UserError(f"--generated {generated_dir} is the real dataset's class folder; pass the generated images' folder")
    test_files = {s.image.resolve() for s in split.test_set()}
    for samples in generated.values():
        for s in samples:
            if s.good_image is not None and s.good_image.resolve() in test_files:
                raise UserError(f"{s.image} was generated from test image {s.good_image}; the test set must stay unseen: regenerate from train/good")
            if s.image.resolve() in test_files:
                raise UserError(f"{s.image} is a real test image; the test set must stay unseen")
