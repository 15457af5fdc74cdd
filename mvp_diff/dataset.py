"""MVTec AD layout for one class: good images, anomalies per defect type and their masks.

    DATASET/CLASS/train/good/000.png
    DATASET/CLASS/test/good/000.png
    DATASET/CLASS/test/DEFECT/000.png
    DATASET/CLASS/ground_truth/DEFECT/000_mask.png

Every command only reads the dataset folder; what Stage 1 derives from it (box masks, boxes.json,
records) goes under Stage 1's --outdir (`mvp_diff.records`).
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import untrusted
from .errors import UsageError, UserError
from .files import IMAGE_EXTENSIONS, image_size, read_mask

GOOD = "good"
BBOX_DIR = "bbox"  # Stage 1 box masks: STAGE1_OUTDIR/CLASS/bbox/ (earlier versions wrote DATASET/CLASS/bbox/)
BOXES_SUFFIX = "_boxes"  # Stage 3 box masks: OUTPUT/CLASS_boxes/, beside the generated class folder


@dataclass
class Anomaly:
    defect_type: str
    image: Path
    mask: Path

    @property
    def stem(self):
        return self.image.stem


@dataclass
class ClassData:
    root: Path  # DATASET/CLASS
    name: str
    train_good: list
    test_good: list
    anomalies: dict  # defect type -> [Anomaly] sorted by file name, empty masks left out
    empty_masks: list = field(default_factory=list)  # Anomaly entries whose mask has no pixel

    @property
    def dataset_root(self):
        return self.root.parent

    @property
    def defect_types(self):
        return sorted(self.anomalies)

    def all_anomalies(self):
        return [a for d in self.defect_types for a in self.anomalies[d]]

    @property
    def legacy_bbox_dir(self) -> Path:
        """Where boundbox.py wrote box masks inside the dataset before it left the dataset untouched."""
        return self.root / BBOX_DIR


def image_files(folder: Path):
    """Image files of a folder sorted by name (hidden files and other extensions ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_classes(dataset_root):
    root = Path(dataset_root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train" / GOOD).is_dir()) if root.is_dir() else []


def class_dir(dataset_root, classname) -> Path:
    """DATASET/CLASS, with errors that say what exists."""
    root = Path(dataset_root)
    untrusted.flag_name(classname, "--classname")
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found; unzip MVTec AD there or pass --dataset")
    folder = root / classname
    if not (folder / "train" / GOOD).is_dir():
        known = list_classes(root)
        hint = f"classes found in {root}: {', '.join(known)}" if known else f"no class folders with train/good/ found in {root}"
        raise UsageError(f"unknown --classname {classname!r}; {hint}")
    return folder


def masks_by_stem(mask_dir: Path, mask_suffix="_mask", strict=True):
    """{image stem: mask file} of the masks in `mask_dir` named STEM + suffix + extension; with
    `strict`, a file named otherwise is an error."""
    masks = {}
    for m in image_files(mask_dir):
        if not m.stem.endswith(mask_suffix):
            if strict:
                raise UserError(f"{m}: mask name does not end with {mask_suffix!r}; rename it or pass --mask_suffix")
            continue
        masks[m.stem[: len(m.stem) - len(mask_suffix)]] = m
    return masks


def pair_masks(images, mask_dir: Path, mask_suffix="_mask"):
    """{image: its mask} for images of one defect type; a mask without an image, an image without a
    mask, or a size mismatch is an error naming the files."""
    masks = masks_by_stem(mask_dir, mask_suffix)
    stems = {im.stem for im in images}
    orphans = sorted(str(m) for stem, m in masks.items() if stem not in stems)
    if orphans:
        raise UserError(f"mask without an image: {orphans[0]}" + (f" (+{len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    pairs = {}
    for im in images:
        mask = masks.get(im.stem)
        if mask is None:
            raise UserError(f"{im}: no mask {Path(mask_dir) / (im.stem + mask_suffix)}.* for this image")
        if image_size(im) != image_size(mask):
            raise UserError(f"{im} is {image_size(im)} but its mask {mask} is {image_size(mask)} (width, height); they must match")
        pairs[im] = mask
    return pairs


def load_class(dataset_root, classname, mask_suffix="_mask", require_anomalies=True) -> ClassData:
    """Read and check one class. Pairing and sizes are checked up front; empty masks are set aside."""
    root = class_dir(dataset_root, classname)
    train_good = image_files(root / "train" / GOOD)
    if not train_good:
        raise UserError(f"{root / 'train' / GOOD}: no defect-free training images")
    test_good = image_files(root / "test" / GOOD)

    anomalies, empty = {}, []
    test_dir, gt_dir = root / "test", root / "ground_truth"
    defect_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir() and p.name != GOOD) if test_dir.is_dir() else []
    for ddir in defect_dirs:
        images = image_files(ddir)
        found = []
        for im, mask in pair_masks(images, gt_dir / ddir.name, mask_suffix).items():
            anomaly = Anomaly(ddir.name, im, mask)
            (found if read_mask(mask).any() else empty).append(anomaly)
        if found:
            anomalies[ddir.name] = found
    if require_anomalies and not anomalies:
        raise UserError(f"{root}: no anomalies with non-empty masks under test/DEFECT/ and ground_truth/DEFECT/")
    return ClassData(root, classname, train_good, test_good, anomalies, empty)


def split_anomalies(anomalies, train_fraction=1 / 3):
    """First `train_fraction` of a defect type (sorted by name, rounded up, at least one) trains the
    generator; the rest is held out for downstream testing (the field's protocol)."""
    if not 0 < train_fraction <= 1:
        raise UsageError(f"--train_fraction must be in (0, 1], got {train_fraction}")
    ordered = sorted(anomalies, key=lambda a: a.image.name)
    n_train = min(len(ordered), max(1, math.ceil(len(ordered) * train_fraction - 1e-9)))
    return ordered[:n_train], ordered[n_train:]


def good_image_for(class_data: ClassData, index: int) -> Path:
    """Deterministic defect-free partner: cycles through train/good by index."""
    return class_data.train_good[index % len(class_data.train_good)]


def generated_boxes_dir(class_dir: Path) -> Path:
    """OUTPUT/CLASS_boxes/: box masks of the generated class folder OUTPUT/CLASS. Outside it, because
    MVTec readers (anomalib's `make_mvtec_ad_dataset`, and others) take every image under CLASS/ as a
    sample whose split is its grandparent folder's name."""
    class_dir = Path(class_dir)
    return class_dir.parent / f"{class_dir.name}{BOXES_SUFFIX}"


def generated_paths(class_dir: Path, defect_type: str, name: str):
    """(image, precise mask, box mask) of a synthetic sample, as every generator here writes it:
    CLASS/test/DEFECT/NAME.png, CLASS/ground_truth/DEFECT/NAME_mask.png (the MVTec layout; nothing
    else with an image extension lives under CLASS/) and CLASS_boxes/DEFECT/NAME_mask.png."""
    class_dir = Path(class_dir)
    return (
        class_dir / "test" / defect_type / f"{name}.png",
        class_dir / "ground_truth" / defect_type / f"{name}_mask.png",
        generated_boxes_dir(class_dir) / defect_type / f"{name}_mask.png",
    )


def class_relative(path: Path, class_dir: Path) -> str:
    """A generated file's path as manifests store it: relative to CLASS/ (box masks: ../CLASS_boxes/...)."""
    return Path(os.path.relpath(Path(path), Path(class_dir))).as_posix()


def move_legacy_generated_boxes(class_dir: Path):
    """Earlier versions kept box masks in OUTPUT/CLASS/bbox/; move them to OUTPUT/CLASS_boxes/.
    Returns the new folder when something moved. Refuses (one line) when both exist."""
    class_dir = Path(class_dir)
    old, new = class_dir / BBOX_DIR, generated_boxes_dir(class_dir)
    if not old.is_dir():
        return None
    if new.exists():
        raise UserError(f"{old} (box masks, earlier layout) and {new} both exist; delete {old} or rerun with --overwrite")
    old.rename(new)
    return new


# Record fields stored relative to another root than `dataset_root`: Stage 1's box masks live under
# its --outdir, never in the dataset.
RECORD_ROOTS = {"bbox_mask": "bbox_root"}


def record_path(record, key, moved_root=None, where=None) -> Path:
    """Absolute path of a record field stored relative to its root (`dataset_root`, or `bbox_root` for
    `bbox_mask`). When that file is gone (the folder was moved) and `moved_root` holds the same
    relative path, that one. Either way the path must stay inside the root it is read from (no `..` or
    absolute path out of it): a record names files of its own folders only. `where` names the record
    in errors (`FILE line N`)."""
    where = where or "record"
    root_key = RECORD_ROOTS.get(key, "dataset_root")
    value = untrusted.relative_path(record.get(key), untrusted.field_at(where, field=key))
    own_root = record.get(root_key)
    if own_root is not None:
        untrusted.relative_path(own_root, untrusted.field_at(where, field=root_key))
    roots = [Path(r) for r in (own_root, moved_root) if r is not None] or [Path(".")]
    # An absolute value replaces the root: it counts for the root(s) it lies in.
    candidates = [root / value for root in roots if untrusted.is_inside(root / value, root)]
    if not candidates:
        untrusted.outside(value, roots, untrusted.field_at(where, field=key))
    return next((path for path in candidates if path.exists()), candidates[0])


def relative_to_root(path: Path, dataset_root: Path) -> str:
    return Path(path).resolve().relative_to(Path(dataset_root).resolve()).as_posix()
