"""Stage 1: boxes of every real anomaly and its training record (image, box mask, sentence).

Everything goes under Stage 1's --outdir (default ./script); the dataset is only read:

    OUTDIR/CLASS/CLASS_train.jsonl, CLASS_test.jsonl   records (location_describer.py)
    OUTDIR/CLASS/bbox/DEFECT/STEM_mask.png             filled box masks (boundbox.py)
    OUTDIR/CLASS/bbox/boxes.json                       all boxes and the flags that made them
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import untrusted
from .boxes import box_mask, boxes_from_mask
from .dataset import BBOX_DIR, ClassData, good_image_for, load_class, relative_to_root, split_anomalies
from .errors import UserError
from .files import atomic_write_json, image_size, read_mask, save_image
from .progress import progress_bar
from .prompts import describe

DEFAULT_OUTDIR = "./script"


@dataclass
class BoxParams:
    min_area: int = 10
    merge_gap: int = 0
    margin: int = 0

    def as_dict(self):
        return {"min_area": self.min_area, "merge_gap": self.merge_gap, "margin": self.margin}


def anomaly_key(anomaly) -> str:
    return f"{anomaly.defect_type}/{anomaly.stem}"


def bbox_dir(outdir, classname) -> Path:
    return Path(outdir) / classname / BBOX_DIR


def boxes_json_path(outdir, classname) -> Path:
    return bbox_dir(outdir, classname) / "boxes.json"


def bbox_mask_path(outdir, class_data: ClassData, anomaly) -> Path:
    return bbox_dir(outdir, class_data.name) / anomaly.defect_type / anomaly.mask.name


def compute_boxes(class_data: ClassData, params: BoxParams, progress=True):
    """{`defect/stem`: boxes} for every anomaly, plus the list of (anomaly, dropped regions) notes."""
    boxes, notes = {}, []
    for anomaly in progress_bar(class_data.all_anomalies(), desc=f"boxes {class_data.name}", disable=not progress):
        found, dropped = boxes_from_mask(read_mask(anomaly.mask), params.min_area, params.merge_gap, params.margin)
        if dropped:
            notes.append((anomaly, dropped))
        boxes[anomaly_key(anomaly)] = found
    return boxes, notes


def write_box_masks(class_data: ClassData, boxes, params: BoxParams, outdir=DEFAULT_OUTDIR, progress=True):
    """Filled box masks under OUTDIR/CLASS/bbox/DEFECT/ and OUTDIR/CLASS/bbox/boxes.json (paths in it
    relative to OUTDIR, like the records' `bbox_mask`); returns the json path."""
    entries = {}
    for anomaly in progress_bar(class_data.all_anomalies(), desc=f"box masks {class_data.name}", disable=not progress):
        key = anomaly_key(anomaly)
        width, height = image_size(anomaly.mask)
        out = bbox_mask_path(outdir, class_data, anomaly)
        if boxes[key]:
            save_image(out, box_mask(boxes[key], height, width))
        entries[key] = {"boxes": boxes[key], "width": width, "height": height, "bbox_mask": relative_to_root(out, outdir)}
    path = boxes_json_path(outdir, class_data.name)
    atomic_write_json(path, {"class": class_data.name, "params": params.as_dict(), "anomalies": entries})
    return path


def load_saved_boxes(class_data: ClassData, outdir=DEFAULT_OUTDIR, params: BoxParams = None):
    """Boxes written by boundbox.py into OUTDIR, or None when it has not run. With `params`, boxes
    made with other --min_area/--merge_gap/--margin are an error: records and box masks must describe
    the same boxes."""
    path = boxes_json_path(outdir, class_data.name)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        boxes = {key: entry["boxes"] for key, entry in saved["anomalies"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err}); rerun boundbox.py")
    check_saved_boxes(path, saved, class_data.name)
    if params is not None and saved.get("params") != params.as_dict():
        made = " ".join(f"--{k} {v}" for k, v in (saved.get("params") or {}).items())
        raise UserError(f"{path} was made with {made or 'other flags'}; rerun boundbox.py with the flags given here, or pass the same ones")
    return boxes


def check_saved_boxes(path, saved, classname):
    """Every name and box of a boxes.json checked before use (the file may have been edited or shared)."""
    if "class" in saved and untrusted.component(saved["class"], untrusted.field_at(path, field="class")) != classname:
        raise UserError(f"{path} holds boxes of class {saved['class']!r}, not {classname!r}; rerun boundbox.py")
    for key, entry in saved["anomalies"].items():
        at = f"{path}: anomaly {json.dumps(key)}"
        untrusted.json_object(entry, at)
        width = untrusted.size(entry.get("width"), untrusted.field_at(at, field="width"))
        height = untrusted.size(entry.get("height"), untrusted.field_at(at, field="height"))
        for found in untrusted.json_list(entry["boxes"], untrusted.field_at(at, field="boxes")):
            untrusted.box(found, width, height, untrusted.field_at(at, field="boxes"))


def build_records(class_data: ClassData, boxes, train_fraction=1 / 3, outdir=DEFAULT_OUTDIR):
    """(train, test) record lists; anomalies whose boxes are all dropped are left out. Dataset files
    are relative to `dataset_root`, the box mask to `bbox_root` (OUTDIR), both absolute."""
    root = class_data.dataset_root.resolve()
    bbox_root = Path(outdir).resolve()
    splits = {"train": [], "test": []}
    index = 0
    for defect in class_data.defect_types:
        train, test = split_anomalies(class_data.anomalies[defect], train_fraction)
        for split, members in (("train", train), ("test", test)):
            for anomaly in members:
                if anomaly_key(anomaly) not in boxes:
                    raise UserError(f"{boxes_json_path(outdir, class_data.name)} has no boxes for {anomaly.image}; rerun boundbox.py")
                found = boxes[anomaly_key(anomaly)]
                if not found:
                    continue
                width, height = image_size(anomaly.image)
                splits[split].append(
                    {
                        "class": class_data.name,
                        "defect_type": defect,
                        "split": split,
                        "dataset_root": str(root),
                        "image": relative_to_root(anomaly.image, root),
                        "gt_mask": relative_to_root(anomaly.mask, root),
                        "bbox_root": str(bbox_root),
                        "bbox_mask": relative_to_root(bbox_mask_path(outdir, class_data, anomaly), bbox_root),
                        "good_image": relative_to_root(good_image_for(class_data, index), root),
                        "boxes": found,
                        "width": width,
                        "height": height,
                        "text": describe(class_data.name, defect, found, width, height),
                    }
                )
                index += 1
    return splits["train"], splits["test"]


def records_paths(outdir, classname):
    folder = Path(outdir) / classname
    return folder / f"{classname}_train.jsonl", folder / f"{classname}_test.jsonl"


def load_class_boxes(args, use_saved=False):
    """(ClassData, boxes) for a Stage 1 script's parsed args; reports skipped masks and dropped regions
    on stderr. With `use_saved`, boundbox.py's boxes.json wins when it exists, so both scripts agree."""
    class_data = load_class(args.dataset, args.classname, args.mask_suffix)
    if class_data.legacy_bbox_dir.is_dir():
        print(
            f"note: {class_data.legacy_bbox_dir}/ was written into the dataset by an earlier version of boundbox.py; "
            f"box masks now go to {bbox_dir(args.outdir, args.classname)}/ and nothing reads the old folder: you may delete it",
            file=sys.stderr,
        )
    for anomaly in class_data.empty_masks:
        print(f"skipped {anomaly.image}: its mask {anomaly.mask} is empty", file=sys.stderr)
    params = BoxParams(args.min_area, args.merge_gap, args.margin)
    boxes = load_saved_boxes(class_data, args.outdir, params) if use_saved else None
    if boxes is None:
        boxes, notes = compute_boxes(class_data, params)
        for anomaly, dropped in notes:
            print(f"{anomaly.mask}: dropped {dropped} region(s) under {args.min_area} px", file=sys.stderr)
    return class_data, boxes
