"""Stage 3 inputs: generation settings, random_box.py's box records, and the samples to generate."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .. import untrusted
from ..dataset import class_relative, generated_paths, record_path
from ..errors import UsageError, UserError
from ..files import image_size, read_image, read_jsonl_numbered, read_mask
from ..random_boxes import boxes_path

# Where Stage 3 measures its masks (precise_mask); part of the mask version: masks measured at the
# original size before it are not mixed with these.
MASK_MEASURED_AT = "at the pipeline size"
# Settings that change what a sample looks like; a folder never mixes two of them.
SETTING_KEYS = ("checkpoint", "lora", "lora_sha256", "lora_scale", "num_inference_steps", "guidance_scale", "strength", "resolution", "seeds", "extract_mask", "mask_method", "mask_version")


@dataclass
class Settings:
    checkpoint: str
    lora: str  # folder holding pytorch_lora_weights.safetensors, or None for the base model
    lora_sha256: str = None  # the LoRA's weights: a retrained LoRA is a new setting
    num_inference_steps: int = 20
    guidance_scale: float = 3.5
    strength: float = 1.0
    resolution: int = 512
    seeds: int = 0
    extract_mask: bool = False
    mask_method: str = "default"
    lora_scale: float = 1.0
    batch_size: int = 4
    skip_empty: bool = False

    @property
    def mask_version(self):  # a changed mask method, or where it measures, is a changed setting
        from ..masks import mask_method_version

        return f"{mask_method_version(self.mask_method)}, {MASK_MEASURED_AT}" if self.extract_mask else None

    def fingerprint(self):
        return {k: getattr(self, k) for k in SETTING_KEYS}


@dataclass
class PlannedSample:
    """A sample to inpaint, as a boxes.jsonl record describes it (sizes read when its files are checked)."""

    index: int
    name: str  # NNN
    defect_type: str
    prompt: str
    seed: int
    boxes: list
    good_path: Path
    box_path: Path
    width: int = None
    height: int = None
    flags: list = field(default_factory=list)

    def paths(self, out_dir: Path):
        """(image, mask, box mask) paths under OUTPUT/CLASS."""
        return generated_paths(out_dir, self.defect_type, self.name)

    def identity(self, out_dir: Path) -> dict:
        """The manifest fields that say which sample this is: an entry with other values is another sample."""
        return {"defect_type": self.defect_type, "prompt": self.prompt, "seed": self.seed, "boxes": self.boxes,
                "good_image": str(self.good_path), "image": class_relative(self.paths(out_dir)[0], out_dir)}


def load_box_records(mask_dir, classname, dataset):
    path = boxes_path(mask_dir, classname)
    if not path.is_file():
        raise UserError(
            f"no boxes for class {classname}: {path} not found; run first: "
            f"python random_box.py --classname {classname} --dataset {dataset} --outdir {mask_dir} --num N"
        )
    numbered = read_jsonl_numbered(path)
    if not numbered:
        raise UserError(f"{path}: no samples; rerun random_box.py")
    seen = {}
    for lineno, record in numbered:
        missing = [k for k in ("index", "defect_type", "good_image", "box_mask", "boxes", "text") if k not in record]
        if missing:
            raise UserError(f"{path}:{lineno}: lacks {', '.join(missing)}; rerun random_box.py")
        check_box_record(record, classname, dataset, path, lineno)
        if record["index"] in seen:
            raise UserError(f"{path} lines {seen[record['index']]} and {lineno} are both sample {record['index']}; rerun random_box.py")
        seen[record["index"]] = lineno
    return [record for _, record in numbered]


def check_box_record(record, classname, dataset, path, lineno):
    """Every name, number and path of a boxes.jsonl record checked before any becomes a file name."""
    field = lambda key: untrusted.field_at(path, lineno, key)
    untrusted.index(record["index"], field("index"))
    untrusted.component(record["defect_type"], field("defect_type"))
    untrusted.text(record["text"], field("text"))
    if "class" in record and untrusted.component(record["class"], field("class")) != classname:
        raise UserError(f"{field('class')} = {record['class']!r} is not class {classname!r}; pass the right --classname or --mask_dir")
    if "seed" in record:
        untrusted.seed(record["seed"], field("seed"))
    box_mask = untrusted.relative_path(record["box_mask"], field("box_mask"))
    untrusted.inside(path.parent / box_mask, path.parent, field("box_mask"))
    untrusted.component(box_mask.stem, field("box_mask"))  # names the sample's output files
    record_path(record, "good_image", dataset, where=f"{path} line {lineno}")
    if "width" in record or "height" in record:
        width, height = untrusted.size(record.get("width"), field("width")), untrusted.size(record.get("height"), field("height"))
        untrusted.boxes(record["boxes"], width, height, field("boxes"))
    else:
        untrusted.boxes(record["boxes"], math.inf, math.inf, field("boxes"))


def select_records(records, num=None, path="boxes.jsonl"):
    """The first `num` samples taking defect types in turn (all when num is None), in index order."""
    if num is None:
        return sorted(records, key=lambda r: r["index"])
    if num < 1:
        raise UsageError(f"--num must be >= 1, got {num}")
    if num > len(records):
        raise UserError(f"--num {num} but {path} holds {len(records)} samples; rerun random_box.py with --num {num}")
    by_type = {}
    for record in sorted(records, key=lambda r: r["index"]):
        by_type.setdefault(record["defect_type"], []).append(record)
    queues = [list(v) for _, v in sorted(by_type.items())]
    chosen = []
    while len(chosen) < num:
        for queue in queues:
            if queue and len(chosen) < num:
                chosen.append(queue.pop(0))
    return sorted(chosen, key=lambda r: r["index"])


def plan_sample(record, mask_dir, classname, dataset, seeds) -> PlannedSample:
    """The sample a (checked) boxes.jsonl record describes; its files are not read."""
    return PlannedSample(
        index=int(record["index"]),
        name=Path(record["box_mask"]).stem,  # NNN as random_box.py numbered it
        defect_type=record["defect_type"],
        prompt=record["text"],
        seed=seeds + int(record["index"]),
        boxes=record["boxes"],
        good_path=record_path(record, "good_image", dataset).resolve(),
        box_path=Path(mask_dir) / classname / record["box_mask"],  # checked to stay in the folder by load_box_records
    )


def build_samples(records, mask_dir, classname, dataset, seeds, warn=print):
    """Samples with their files checked (sizes read from headers only)."""
    samples = []
    for record in records:
        sample = plan_sample(record, mask_dir, classname, dataset, seeds)
        good, box_path = sample.good_path, sample.box_path
        if not good.is_file():
            raise UserError(f"{record_path(record, 'good_image', dataset)}: defect-free image of sample {record['index']} not found; rerun random_box.py with this --dataset")
        if not box_path.is_file():
            raise UserError(f"{box_path}: box mask not found; rerun random_box.py --classname {classname} --outdir {mask_dir}")
        sample.width, sample.height = width, height = image_size(good)
        untrusted.boxes(record["boxes"], width, height, f"{boxes_path(mask_dir, classname)}: sample {record['index']}, boxes on {good.name}")
        if image_size(box_path) != (width, height):
            warn(f"warning: {box_path} is {image_size(box_path)} but {record_path(record, 'good_image', dataset)} is {(width, height)} (width, height); resizing the box mask")
            sample.flags.append("box_mask_resized")
        samples.append(sample)
    return samples


def load_good(sample: PlannedSample):
    """The defect-free image as saved: HxW uint8 for grey images, else HxWx3 RGB."""
    return read_image(sample.good_path)


def load_box(sample: PlannedSample):
    box = read_mask(sample.box_path)
    if box.shape != (sample.height, sample.width):
        box = cv2.resize(box.astype(np.uint8), (sample.width, sample.height), interpolation=cv2.INTER_NEAREST) > 0
    if not box.any():
        raise UserError(f"{sample.box_path}: empty box mask; rerun random_box.py")
    return box
