"""The one schema of a generated sample, as every generator here writes it (Stage 3, DRAEM-style,
the Crop&Paste stand-in) and the evaluation and the COCO export read it: one JSON object a line of
OUTPUT/CLASS/manifest.jsonl, and Stage 3's per-sample entries OUTPUT/CLASS/.samples/NNN.json.

    index        int         sample number (COCO image id - 1)
    class        str         class name
    defect_type  str         DEFECT of test/DEFECT/
    prompt       str|null    the text the generator was given (null: none)
    seed         int|list    what the sample was drawn from
    boxes        list|null   [[x0, y0, x1, y1], ...] in pixels of the image
    image, mask, box_mask    paths relative to CLASS/ (box masks: ../CLASS_boxes/DEFECT/NNN_mask.png)
    good_image   str|null    absolute path of the defect-free image it was made from
    mask_area    int         pixels in the mask
    mask_method  str         how the mask was made (box, default, official, draem_perlin, paste)
    flags        list        notes such as empty_mask, box_mask_resized
    width, height int        image size
    box_area, source_image   optional (Stage 3, DRAEM); skipped, regions: per-sample entries only

Reading checks every name, path and number (`untrusted`): manifests are shared and downloaded, and
their names become file names.
"""

import math
from dataclasses import dataclass, fields
from pathlib import Path

from . import untrusted
from .dataset import class_relative, generated_paths
from .errors import UserError
from .files import atomic_write_jsonl, read_jsonl_numbered

MANIFEST = "manifest.jsonl"
REQUIRED = ("index", "defect_type", "image", "mask")
OPTIONAL = ("box_area", "source_image", "skipped", "regions")  # left out of the JSON when unset
ENTRY_ONLY = ("skipped", "regions")  # kept in .samples/NNN.json, not in manifest.jsonl


@dataclass
class GeneratedSample:
    index: int
    classname: str
    defect_type: str
    prompt: str = None
    seed: object = None
    boxes: list = None
    image: str = None
    mask: str = None
    box_mask: str = None
    good_image: str = None
    mask_area: int = None
    box_area: int = None
    mask_method: str = None
    flags: list = None
    width: int = None
    height: int = None
    source_image: str = None
    skipped: bool = False
    regions: list = None

    @classmethod
    def at(cls, class_dir: Path, index, defect_type, name, classname=None, **values):
        """A sample of `class_dir` (class: its folder name unless given) whose files are
        test/DEFECT/NAME.png and its masks (`generated_paths`)."""
        image, mask, box = generated_paths(class_dir, defect_type, name)
        return cls(index=index, classname=classname or Path(class_dir).name, defect_type=defect_type, image=class_relative(image, class_dir),
                   mask=class_relative(mask, class_dir), box_mask=class_relative(box, class_dir), **values)

    def files(self, class_dir: Path):
        """(image, mask, box mask) paths; box mask None when the sample has none."""
        class_dir = Path(class_dir)
        return class_dir / self.image, class_dir / self.mask, None if self.box_mask is None else class_dir / self.box_mask

    def to_json(self, entry=False) -> dict:
        """The JSON object, keys in schema order; `entry`: with the per-sample-entry-only keys."""
        record = {"class" if f.name == "classname" else f.name: getattr(self, f.name) for f in fields(self)}
        for key in OPTIONAL:
            if record[key] is None or record[key] is False or (key in ENTRY_ONLY and not entry):
                del record[key]
        return record

    @classmethod
    def from_json(cls, record, where):
        """A sample from its JSON object; `where(key)` names the file, line and field for errors."""
        untrusted.json_object(record, where(None))
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise UserError(f"{where(None)}: lacks {', '.join(missing)}; regenerate the folder (inpainting.py, python -m mvp_diff.draem)")
        untrusted.index(record["index"], where("index"))
        for key in ("class", "defect_type"):
            if record.get(key) is not None:
                untrusted.component(record[key], where(key))
        for key in ("image", "mask", "box_mask", "good_image", "source_image"):
            if record.get(key) is not None:
                untrusted.relative_path(record[key], where(key))
        if record.get("prompt") is not None:
            untrusted.text(record["prompt"], where("prompt"))
        width, height = (untrusted.size(record[k], where(k)) if record.get(k) is not None else None for k in ("width", "height"))
        if record.get("boxes") is not None:
            untrusted.boxes(record["boxes"], width or math.inf, height or math.inf, where("boxes"))
        values = {f.name: record.get("class" if f.name == "classname" else f.name, f.default) for f in fields(cls)}
        return cls(**values)


def read_manifest(path):
    """[(line number, GeneratedSample)] of a manifest.jsonl, every field checked."""
    path = Path(path)
    return [(lineno, GeneratedSample.from_json(record, lambda key, n=lineno: untrusted.field_at(path, n, key)))
            for lineno, record in read_jsonl_numbered(path)]


def write_manifest(class_dir: Path, samples) -> Path:
    """CLASS/manifest.jsonl, atomically, samples by index."""
    path = Path(class_dir) / MANIFEST
    atomic_write_jsonl(path, [s.to_json() for s in sorted(samples, key=lambda s: s.index)])
    return path
