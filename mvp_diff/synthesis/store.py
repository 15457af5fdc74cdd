"""Stage 3's output folder, OUTPUT/CLASS/ (layout in the package docstring): which samples are done,
writing one, removing those the boxes no longer describe, and the manifest built from the entries."""

import json
import re
import shutil
from pathlib import Path

import numpy as np

from .. import untrusted
from ..coco import mask_regions, write_coco
from ..dataset import class_relative, generated_boxes_dir, move_legacy_generated_boxes
from ..errors import UserError
from ..files import atomic_write_json, save_image
from ..kill_points import kill_point
from ..manifest import MANIFEST, REQUIRED, GeneratedSample, write_manifest
from .inputs import SETTING_KEYS, PlannedSample, Settings

SAMPLES_DIR = ".samples"
SETTINGS_FILE = "settings.json"
ENTRY_NAME = re.compile(r"\d+\.json")


class SampleStore:
    """OUTPUT/CLASS/ of one class: every file Stage 3 writes or deletes there goes through here."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.roots = [self.out_dir, generated_boxes_dir(self.out_dir)]  # the folders a class is written into

    def entry_path(self, sample: PlannedSample) -> Path:
        return self.out_dir / SAMPLES_DIR / f"{sample.name}.json"

    def entry_paths(self):
        return sorted(p for p in (self.out_dir / SAMPLES_DIR).glob("*.json") if ENTRY_NAME.fullmatch(p.name))

    def read_entry(self, path: Path):
        """A finished sample's entry, or None when it cannot be read (then the sample is redone). Its
        index and file paths are checked: resuming deletes the files an outdated entry names."""
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict):
            return None
        where = lambda key: untrusted.field_at(path, field=key)  # noqa: E731
        untrusted.index(record.get("index"), where("index"))
        for key in ("image", "mask", "box_mask"):
            if record.get(key):
                untrusted.inside(self.out_dir / untrusted.relative_path(record[key], where(key)), self.roots, where(key))
        if any(k not in record for k in REQUIRED):
            return None
        return GeneratedSample.from_json(record, where)

    def matches(self, entry: GeneratedSample, sample: PlannedSample) -> bool:
        """The entry was written for this very sample (same boxes, prompt, seed, image and file name)."""
        return entry is not None and sample is not None and all(getattr(entry, k) == v for k, v in sample.identity(self.out_dir).items())

    def is_done(self, sample: PlannedSample) -> bool:
        """The sample's entry exists, describes this very sample, and its files are there."""
        entry = self.read_entry(self.entry_path(sample))
        if not self.matches(entry, sample):
            return False
        return entry.skipped or all(p.is_file() for p in sample.paths(self.out_dir))

    def write_sample(self, sample: PlannedSample, image, mask, box, settings: Settings, classname) -> GeneratedSample:
        """Files first, the entry last (each atomic): a killed run never leaves a sample marked done
        without its files."""
        image_path, mask_path, box_path = sample.paths(self.out_dir)
        for p in (image_path, mask_path, box_path):
            untrusted.inside(p, self.roots, f"sample {sample.index} output file")
        flags = list(sample.flags)
        area = int(mask.sum())
        if area == 0:
            flags.append("empty_mask")
        skipped = settings.skip_empty and area == 0
        if skipped:
            for p in (image_path, mask_path, box_path):
                p.unlink(missing_ok=True)
        else:
            save_image(image_path, image)
            kill_point("sample")
            save_image(mask_path, mask.astype(np.uint8) * 255)
            save_image(box_path, box.astype(np.uint8) * 255)
        entry = GeneratedSample.at(
            self.out_dir, sample.index, sample.defect_type, sample.name, classname, prompt=sample.prompt, seed=sample.seed, boxes=sample.boxes,
            good_image=str(sample.good_path), mask_area=area, box_area=int(box.sum()),
            mask_method=settings.mask_method if settings.extract_mask else "box", flags=flags, width=sample.width, height=sample.height,
            skipped=skipped, regions=None if skipped else mask_regions(mask),  # regions: for coco.json; left out of manifest.jsonl
        )
        atomic_write_json(self.entry_path(sample), entry.to_json(entry=True))
        return entry

    def remove_stale(self, samples) -> int:
        """Delete finished samples that the current boxes.jsonl (all its `samples`) no longer describes
        (random_box.py was rerun with other settings), files and entry, so the folder never mixes two
        sets of boxes."""
        current = {s.index: s for s in samples}
        removed = 0
        for path in self.entry_paths():
            entry = self.read_entry(path)
            if entry is not None and self.matches(entry, current.get(entry.index)):
                continue
            for file in entry.files(self.out_dir) if entry is not None else ():
                if file is not None:
                    file.unlink(missing_ok=True)
            path.unlink()
            removed += 1
        return removed

    def entries(self):
        """Every finished sample's entry, by index (an edited, unreadable one is left out)."""
        entries = [e for e in map(self.read_entry, self.entry_paths()) if e is not None]
        return sorted(entries, key=lambda e: e.index)

    def rebuild_manifest(self, defect_types=None):
        """manifest.jsonl and coco.json from every finished sample's entry, by index (skipped samples
        left out); `defect_types` fixes the COCO categories before every type has a sample."""
        entries = [e for e in self.entries() if not e.skipped]
        write_coco(self.out_dir, entries, defect_types=defect_types)
        write_manifest(self.out_dir, entries)
        return entries

    def prepare(self, settings: Settings, overwrite=False):
        """Start over with --overwrite; otherwise refuse to mix samples made with other settings."""
        out_dir = self.out_dir
        if overwrite:
            for folder in (out_dir / "test", out_dir / "ground_truth", out_dir / "bbox", out_dir / SAMPLES_DIR, generated_boxes_dir(out_dir)):
                shutil.rmtree(folder, ignore_errors=True)
            for name in (MANIFEST, "coco.json"):
                (out_dir / name).unlink(missing_ok=True)
        moved = move_legacy_generated_boxes(out_dir)
        if moved:
            self.relocate_box_entries()
            print(f"moved the box masks of {out_dir} to {moved}/ (MVTec readers take every image under {out_dir.name}/ as a sample)", flush=True)
        # Temporary files of a killed run's unfinished writes.
        for tmp in out_dir.glob("**/.*.tmp"):
            tmp.unlink(missing_ok=True)
        self.check_settings(settings)

    def check_settings(self, settings: Settings):
        path = self.out_dir / SAMPLES_DIR / SETTINGS_FILE
        wanted = settings.fingerprint()
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                saved = {}  # unreadable: treated as other settings
            if not isinstance(saved, dict):
                saved = {}
            changed = [f"{k} {saved.get(k)!r} -> {wanted[k]!r}" for k in SETTING_KEYS if saved.get(k) != wanted[k]]  # keys added later: None before
            if changed:
                raise UserError(f"{self.out_dir} holds samples made with other settings ({'; '.join(changed)}); pass --overwrite to start over or choose another --output")
        atomic_write_json(path, wanted)

    def relocate_box_entries(self):
        """Point every finished sample's `box_mask` at OUTPUT/CLASS_boxes/ after a move from CLASS/bbox/."""
        for path in self.entry_paths():
            try:
                entry = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if entry.get("box_mask", "").startswith("bbox/"):
                box = generated_boxes_dir(self.out_dir) / entry["box_mask"][len("bbox/") :]
                entry["box_mask"] = class_relative(box, self.out_dir)
                atomic_write_json(path, entry)
