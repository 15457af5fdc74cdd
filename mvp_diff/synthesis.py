"""Stage 3b: inpaint a defect into each random box of a defect-free image, keep every pixel outside the
boxes from the original, extract the precise mask and write an MVTec-layout dataset:

    OUTPUT/CLASS/test/DEFECT/NNN.png                generated image, at the original size and mode
    OUTPUT/CLASS/ground_truth/DEFECT/NNN_mask.png   precise mask (the box with --extract_mask off)
    OUTPUT/CLASS/manifest.jsonl                     one line per sample
    OUTPUT/CLASS/coco.json                          COCO instance segmentation of the samples (`coco`)
    OUTPUT/CLASS_boxes/DEFECT/NNN_mask.png          box mask: outside CLASS/, whose only images are
                                                    the MVTec pairs (readers glob every image there)
    OUTPUT/CLASS/.samples/NNN.json                  the sample's manifest entry, written last: a
                                                    sample is done when it exists with its files
    OUTPUT/CLASS/.samples/settings.json             generation settings of the folder

Sample NNN uses the seed `--seeds + NNN` through its own generator, so its image does not depend on
the batch size, the number of processes, or which other samples run.
"""

import hashlib
import json
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

import cv2
import numpy as np
from PIL import Image

from . import untrusted
from .checkpoint import LORA_WEIGHT_NAME, check_checkpoint, inpaint_pipeline, load_components, pick_variant, resolve_checkpoint
from .coco import mask_regions, write_coco
from .dataset import class_relative, generated_boxes_dir, generated_paths, move_legacy_generated_boxes, record_path
from .errors import UsageError, UserError
from .random_boxes import boxes_path
from .files import atomic_write_json, atomic_write_jsonl, image_size, read_image, read_jsonl_numbered, read_mask, save_image
from .kill_points import kill_point

SAMPLES_DIR = ".samples"
SETTINGS = "settings.json"
MANIFEST_EVERY = 30.0  # seconds between manifest rewrites during a run
WRITE_WORKERS = 4  # threads finishing samples while the next batch generates (0: in the main thread)
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
    def mask_version(self):  # a changed mask method is a changed setting
        from .masks import mask_method_version

        return mask_method_version(self.mask_method) if self.extract_mask else None

    def fingerprint(self):
        return {k: getattr(self, k) for k in SETTING_KEYS}


@dataclass
class Sample:
    index: int
    name: str  # NNN
    defect_type: str
    prompt: str
    seed: int
    boxes: list
    good_path: Path
    box_path: Path
    width: int
    height: int
    flags: list = field(default_factory=list)

    def paths(self, out_dir: Path):
        """(image, mask, box mask) paths under OUTPUT/CLASS."""
        return generated_paths(out_dir, self.defect_type, self.name)


# --- inputs ----------------------------------------------------------------------------------------


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


def build_samples(records, mask_dir, classname, dataset, seeds, warn=print):
    """Samples with their files checked (sizes read from headers only)."""
    folder = Path(mask_dir) / classname
    samples = []
    for record in records:
        good = record_path(record, "good_image", dataset)
        if not good.is_file():
            raise UserError(f"{good}: defect-free image of sample {record['index']} not found; rerun random_box.py with this --dataset")
        box_path = folder / record["box_mask"]  # checked to stay in the folder by load_box_records
        if not box_path.is_file():
            raise UserError(f"{box_path}: box mask not found; rerun random_box.py --classname {classname} --outdir {mask_dir}")
        width, height = image_size(good)
        untrusted.boxes(record["boxes"], width, height, f"{boxes_path(mask_dir, classname)}: sample {record['index']}, boxes on {good.name}")
        sample = Sample(
            index=int(record["index"]),
            name=Path(record["box_mask"]).stem,  # NNN as random_box.py numbered it
            defect_type=record["defect_type"],
            prompt=record["text"],
            seed=seeds + int(record["index"]),
            boxes=record["boxes"],
            good_path=good.resolve(),
            box_path=box_path,
            width=width,
            height=height,
        )
        if image_size(box_path) != (width, height):
            warn(f"warning: {box_path} is {image_size(box_path)} but {good} is {(width, height)} (width, height); resizing the box mask")
            sample.flags.append("box_mask_resized")
        samples.append(sample)
    return samples


def load_good(sample: Sample):
    """The defect-free image as saved: HxW uint8 for grey images, else HxWx3 RGB."""
    return read_image(sample.good_path)


def load_box(sample: Sample):
    box = read_mask(sample.box_path)
    if box.shape != (sample.height, sample.width):
        box = cv2.resize(box.astype(np.uint8), (sample.width, sample.height), interpolation=cv2.INTER_NEAREST) > 0
    if not box.any():
        raise UserError(f"{sample.box_path}: empty box mask; rerun random_box.py")
    return box


# --- model -----------------------------------------------------------------------------------------


def lora_file(lora) -> Path:
    lora = Path(lora)
    return lora if lora.is_file() else lora / LORA_WEIGHT_NAME


def weights_sha256(path) -> str:
    """Hash of a safetensors file's tensors (names and values). Not of the file: its metadata lists
    the LoRA's target modules in an order that changes from run to run."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise UserError(f"{path}: cannot read the LoRA weights ({err.__class__.__name__}: {err}); retrain it with train_diffusion.py")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


def trained_prediction_type(lora_dir: Path):
    """--prediction_type of the Stage 2 run that wrote this LoRA (its run_config.json), if known."""
    try:
        return json.loads((Path(lora_dir) / "run_config.json").read_text())["args"].get("prediction_type")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None


def check_lora(lora_dir, classname):
    """The folder holding the LoRA weights; a missing one names the Stage 2 command."""
    path = Path(lora_dir)
    if path.is_file():
        return path
    if not (path / LORA_WEIGHT_NAME).is_file():
        raise UserError(
            f"--lora_dir {path}: no {LORA_WEIGHT_NAME}; train it first (python train_diffusion.py --pretrained_model_name_or_path "
            f"checkpoints/inpainting --train_data_dir ./dataset/{classname} --output_dir {path.parent} ...) or pass --no_lora for the base model"
        )
    return path


def load_pipeline(checkpoint, device="cpu", dtype=None, lora=None, lora_scale=1.0):
    """The inference pipeline (`inpaint_pipeline`) of a local diffusers folder (.safetensors or .bin
    weights, fp16 variant files), every model on `dtype`; the LoRA (if any) fused into the UNet."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    dtype = dtype or torch.float32
    path = check_checkpoint(checkpoint, flag="--checkpoint_dir")
    # Loading bars and notices would bury the run's own progress.
    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    # A folder with .bin weights only makes diffusers log an "error" before it falls back to them.
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        pipe = inpaint_pipeline(**load_components(path, pick_variant(path, dtype), dtype))
    finally:
        diffusers_logging.set_verbosity_error()
    if lora is not None:
        lora = Path(lora)
        folder, weight_name = lora_file(lora).parent, lora_file(lora).name
        try:
            pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name="mvp_diff")
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"--lora_dir {lora}: cannot load the LoRA ({err.__class__.__name__}: {str(err).splitlines()[0]})")
        if "mvp_diff" not in pipe.get_list_adapters().get("unet", []):
            raise UserError(f"--lora_dir {lora}: {weight_name} holds no UNet LoRA weights for this checkpoint")
        trained_as = trained_prediction_type(lora_file(lora).parent)
        if trained_as:  # a LoRA trained with --prediction_type v_prediction must be sampled that way
            pipe.scheduler.register_to_config(prediction_type=trained_as)
        # Fused weights cost nothing per step; the adapter layers are then dropped.
        pipe.fuse_lora(components=["unet"], lora_scale=lora_scale)
        pipe.unload_lora_weights()
    return pipe.to(device)


# --- generation ------------------------------------------------------------------------------------


def processing_size(width, height, resolution):
    """(w, h) the pipeline runs at: the longer side at `resolution`, both multiples of 8."""
    scale = resolution / max(width, height)
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


def as_rgb(image):
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


def pipeline_inputs(good, box, size):
    """Defect-free image and box mask at the pipeline's size, resized as in training."""
    from .latent_cache import resize_pair

    return resize_pair(Image.fromarray(as_rgb(good)), Image.fromarray(box.astype(np.uint8) * 255), size)


def generate(pipe, prompts, images, masks, seeds, size, settings: Settings):
    """One pipeline call for a batch of the same size; one generator per sample. uint8 HxWx3 arrays."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(
            prompt=list(prompts),
            image=list(images),
            mask_image=list(masks),
            height=size[1],
            width=size[0],
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            strength=settings.strength,
            generator=generators,
            output_type="np",
        ).images
    return [(np.clip(o, 0.0, 1.0) * 255.0).round().astype(np.uint8) for o in out]


def paste_back(generated, good, box):
    """The generated pixels inside the box, at the original size; every other pixel is the original's.
    Grey originals stay grey (luma of the generated colours)."""
    height, width = box.shape
    up = Image.fromarray(generated).resize((width, height), Image.Resampling.BICUBIC)
    if good.ndim == 2:
        up = up.convert("L")
    out = good.copy()
    out[box] = np.asarray(up)[box]
    return out


def vae_round_trips(pipe, images):
    """The pipeline inputs' own VAE round trips (encode, decode), uint8 HxWx3: inside the box the
    generated pixels come from the VAE decoder, so this, not the defect-free image, is what they
    look like where nothing was painted (the mask's reference)."""
    import torch

    vae = pipe.vae
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(list(images)).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    out = pipe.image_processor.postprocess(decoded.float(), output_type="np")
    return [(np.clip(o, 0.0, 1.0) * 255.0).round().astype(np.uint8) for o in out]


def precise_mask(anomaly, good, box, settings: Settings, reference=None):
    if not settings.extract_mask:
        return box.copy()
    from .masks import extract_mask

    return extract_mask(anomaly, good, box.astype(np.uint8) * 255, method=settings.mask_method, reference=reference) & box


# --- outputs and resume ----------------------------------------------------------------------------


def entry_path(out_dir: Path, sample: Sample) -> Path:
    return out_dir / SAMPLES_DIR / f"{sample.name}.json"


def expected_fields(sample: Sample):
    return {"defect_type": sample.defect_type, "prompt": sample.prompt, "seed": sample.seed, "boxes": sample.boxes, "good_image": str(sample.good_path)}


def output_roots(out_dir: Path):
    """The folders Stage 3 writes a class into: OUTPUT/CLASS/ and its box masks' OUTPUT/CLASS_boxes/."""
    return [out_dir, generated_boxes_dir(out_dir)]


def read_entry(out_dir: Path, path: Path):
    """A finished sample's entry, or None when it cannot be read (then the sample is redone). Its
    index and file paths are checked: resuming deletes the files an outdated entry names."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict):
        return None
    untrusted.index(entry.get("index"), untrusted.field_at(path, field="index"))
    for key in ("image", "mask", "box_mask"):
        if entry.get(key):
            value = untrusted.relative_path(entry[key], untrusted.field_at(path, field=key))
            untrusted.inside(out_dir / value, output_roots(out_dir), untrusted.field_at(path, field=key))
    return entry


def is_done(out_dir: Path, sample: Sample) -> bool:
    """The sample's entry exists, describes this very sample, and its files are there."""
    entry = read_entry(out_dir, entry_path(out_dir, sample))
    if entry is None:
        return False
    if any(entry.get(k) != v for k, v in expected_fields(sample).items()):
        return False
    return bool(entry.get("skipped")) or all(p.is_file() for p in sample.paths(out_dir))


def write_sample(out_dir: Path, sample: Sample, image, mask, box, settings: Settings, classname):
    """Files first, the entry last (each atomic): a killed run never leaves a sample marked done
    without its files."""
    image_path, mask_path, box_path = sample.paths(out_dir)
    for p in (image_path, mask_path, box_path):
        untrusted.inside(p, output_roots(out_dir), f"sample {sample.index} output file")
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
    entry = {
        "index": sample.index,
        "class": classname,
        "defect_type": sample.defect_type,
        "prompt": sample.prompt,
        "seed": sample.seed,
        "boxes": sample.boxes,
        "image": image_path.relative_to(out_dir).as_posix(),
        "mask": mask_path.relative_to(out_dir).as_posix(),
        "box_mask": class_relative(box_path, out_dir),
        "good_image": str(sample.good_path),
        "mask_area": area,
        "box_area": int(box.sum()),
        "mask_method": settings.mask_method if settings.extract_mask else "box",
        "flags": flags,
        "width": sample.width,
        "height": sample.height,
    }
    if skipped:
        entry["skipped"] = True
    else:
        entry["regions"] = mask_regions(mask)  # for coco.json; left out of manifest.jsonl
    atomic_write_json(entry_path(out_dir, sample), entry)
    return entry


def remove_stale_samples(out_dir: Path, records, seeds):
    """Delete finished samples that the current boxes.jsonl no longer describes (random_box.py was
    rerun with other settings), files and entry, so the folder never mixes two sets of boxes."""
    current = {int(r["index"]): r for r in records}
    removed = 0
    for path in sorted((out_dir / SAMPLES_DIR).glob("*.json")):
        if not re.fullmatch(r"\d+\.json", path.name):
            continue
        entry = read_entry(out_dir, path) or {}
        record = current.get(entry.get("index"))
        if record is not None and (entry.get("defect_type"), entry.get("prompt"), entry.get("boxes"), entry.get("seed")) == (
            record["defect_type"], record["text"], record["boxes"], seeds + int(record["index"])
        ) and Path(entry.get("image", "")).stem == Path(record["box_mask"]).stem:
            continue
        for key in ("image", "mask", "box_mask"):
            if entry.get(key):
                (out_dir / entry[key]).unlink(missing_ok=True)
        path.unlink()
        removed += 1
    return removed


def rebuild_manifest(out_dir: Path, defect_types=None):
    """manifest.jsonl and coco.json from every finished sample's entry, by index (skipped samples
    left out); `defect_types` fixes the COCO categories before every type has a sample."""
    entries = []
    for path in (out_dir / SAMPLES_DIR).glob("*.json"):
        if re.fullmatch(r"\d+\.json", path.name):
            entry = read_entry(out_dir, path)
            if entry is not None:  # a half-written entry cannot exist (atomic writes); an edited one is skipped
                entries.append(entry)
    entries = [e for e in sorted(entries, key=lambda e: e["index"]) if not e.get("skipped")]
    write_coco(out_dir, entries, defect_types=defect_types)
    entries = [{k: v for k, v in e.items() if k != "regions"} for e in entries]
    atomic_write_jsonl(out_dir / "manifest.jsonl", entries)
    return entries


def relocate_box_entries(out_dir: Path):
    """Point every finished sample's `box_mask` at OUTPUT/CLASS_boxes/ after a move from CLASS/bbox/."""
    for path in (out_dir / SAMPLES_DIR).glob("*.json"):
        if not re.fullmatch(r"\d+\.json", path.name):
            continue
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if entry.get("box_mask", "").startswith("bbox/"):
            box = generated_boxes_dir(out_dir) / entry["box_mask"][len("bbox/") :]
            entry["box_mask"] = class_relative(box, out_dir)
            atomic_write_json(path, entry)


def prepare_output(out_dir: Path, settings: Settings, overwrite=False):
    """Start over with --overwrite; otherwise refuse to mix samples made with other settings."""
    if overwrite:
        for folder in (out_dir / "test", out_dir / "ground_truth", out_dir / "bbox", out_dir / SAMPLES_DIR, generated_boxes_dir(out_dir)):
            shutil.rmtree(folder, ignore_errors=True)
        for name in ("manifest.jsonl", "coco.json"):
            (out_dir / name).unlink(missing_ok=True)
    moved = move_legacy_generated_boxes(out_dir)
    if moved:
        relocate_box_entries(out_dir)
        print(f"moved the box masks of {out_dir} to {moved}/ (MVTec readers take every image under {out_dir.name}/ as a sample)", flush=True)
    # Temporary files of a killed run's unfinished writes.
    for tmp in out_dir.glob("**/.*.tmp"):
        tmp.unlink(missing_ok=True)
    path = out_dir / SAMPLES_DIR / SETTINGS
    wanted = settings.fingerprint()
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = {}  # unreadable: treated as other settings
        if not isinstance(saved, dict):
            saved = {}
        if any(saved.get(k) != wanted[k] for k in SETTING_KEYS):  # keys added later: None before
            changed = [f"{k} {saved.get(k)!r} -> {wanted[k]!r}" for k in SETTING_KEYS if saved.get(k) != wanted[k]]
            raise UserError(f"{out_dir} holds samples made with other settings ({'; '.join(changed)}); pass --overwrite to start over or choose another --output")
    atomic_write_json(path, wanted)


def batches(samples, batch_size, resolution):
    """Lists of samples of the same pipeline size, at most `batch_size` each, in index order."""
    groups = {}
    for s in samples:
        groups.setdefault(processing_size(s.width, s.height, resolution), []).append(s)
    out = []
    for size, group in groups.items():
        for i in range(0, len(group), batch_size):
            out.append((size, group[i : i + batch_size]))
    return sorted(out, key=lambda b: b[1][0].index)


def finish_sample(out_dir: Path, sample: Sample, good, box, generated, settings: Settings, classname, reference=None):
    """Everything after the pipeline call: paste-back, precise mask, the sample's files and entry.
    `reference`: the defect-free image's VAE round trip (see vae_round_trips), or None."""
    image = paste_back(generated, good, box)
    mask = precise_mask(image, good, box, settings, None if reference is None else paste_back(reference, good, box))
    return write_sample(out_dir, sample, image, mask, box, settings, classname)


class SampleWriter:
    """Runs `finish` (finish_sample) on `workers` threads while the main thread generates the next
    batch: the GPU no longer waits for paste-back, mask extraction, PNG encoding and fsyncs. The
    queue holds at most `max_pending` samples, so a killed run loses only the samples in flight (each
    sample's entry is still written last). The first failure stops the writers and is raised in the
    main thread at its next submit() or at close(). workers=0 finishes each sample in the main thread."""

    def __init__(self, finish, workers=WRITE_WORKERS, max_pending=4):
        self.finish = finish
        self.failure = None  # (sample, exception) of the first failed write
        self.stopping = False  # the main thread stopped: queued samples are dropped
        self.queue = Queue(maxsize=max(1, max_pending))
        self.threads = [threading.Thread(target=self._work, name=f"sample-writer-{i}", daemon=True) for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _work(self):
        while (job := self.queue.get()) is not None:
            if self.failure is None and not self.stopping:  # after a failure the run stops anyway
                try:
                    self.finish(*job)
                except Exception as err:  # re-raised in the main thread
                    self.failure = self.failure or (job[0], err)

    def submit(self, sample, *args):
        self.check()
        if self.threads:
            self.queue.put((sample, *args))
            return
        try:
            self.finish(sample, *args)
        except Exception as err:
            self.failure = (sample, err)
            self.check()

    def check(self):
        if self.failure is None:
            return
        sample, err = self.failure
        if isinstance(err, UserError):  # a failed atomic write names its file; say which sample and what next
            raise UserError(f"writing sample {sample.defect_type}/{sample.name} failed: {err}; generation stopped; fix that and rerun to resume") from err
        if isinstance(err, OSError):  # disk full, permissions, a file where a folder should be
            raise UserError(f"writing sample {sample.defect_type}/{sample.name} failed ({err.__class__.__name__}: {err}); "
                            f"generation stopped; fix that and rerun to resume") from err
        raise RuntimeError(f"writing sample {sample.defect_type}/{sample.name} failed") from err

    def close(self, drop_pending=False):
        """Wait for the queued samples (or drop them) and stop the threads; raises the first failure."""
        self.stopping = drop_pending
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        if not drop_pending:
            self.check()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(drop_pending=exc_type is not None)


def run_batch(pipe, size, samples, settings: Settings, out_dir: Path, classname, writer: SampleWriter = None):
    """Generate one batch and hand each sample to `writer` (finished here when None)."""
    goods = [load_good(s) for s in samples]
    boxes = [load_box(s) for s in samples]
    inputs = [pipeline_inputs(g, b, size) for g, b in zip(goods, boxes)]
    generated = generate(pipe, [s.prompt for s in samples], [i for i, _ in inputs], [m for _, m in inputs], [s.seed for s in samples], size, settings)
    # The VAE round trips run here, on the pipeline's device; the writer threads only do CPU work.
    references = vae_round_trips(pipe, [i for i, _ in inputs]) if settings.extract_mask else [None] * len(samples)
    for sample, good, box, gen, ref in zip(samples, goods, boxes, generated, references):
        if writer is None:
            finish_sample(out_dir, sample, good, box, gen, settings, classname, ref)
        else:
            writer.submit(sample, good, box, gen, ref)


# --- the whole stage -------------------------------------------------------------------------------


def resolve_device(device=None, dtype="auto"):
    """(torch device, torch dtype) for this process: under `accelerate launch` each process takes
    its own GPU; fp16 on CUDA and fp32 on CPU unless --dtype says otherwise."""
    import torch
    from accelerate import PartialState

    # On CPU, PartialState only joins the other processes when told it runs on CPU.
    cpu = (device is not None and torch.device(device).type == "cpu") or (device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if device is None:
        device = state.device
    else:
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device found; use --device cpu")
            if device.index is None and state.num_processes > 1:
                device = torch.device("cuda", state.local_process_index)
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = dtypes[dtype]
    return state, device, dtype


def synthesize(classname, dataset, mask_dir, output, settings: Settings, num=None, device=None, dtype="auto", overwrite=False,
               local_files_only=False, write_workers=WRITE_WORKERS, pipe=None):
    """Generate every selected sample not yet done; returns (PartialState, OUTPUT/CLASS, manifest entries).
    `write_workers` threads finish samples while the next batch generates (0: one after another);
    `pipe`: a pipeline load_pipeline already returned for these settings (benchmarks time runs without loading)."""
    import torch

    from .dataset import class_dir
    from .progress import progress_bar

    class_dir(dataset, classname)  # a clear error for an unknown class or dataset
    all_records = load_box_records(mask_dir, classname, dataset)
    records = select_records(all_records, num, boxes_path(mask_dir, classname))
    state, device, torch_dtype = resolve_device(device, dtype)
    hub_variant = "fp16" if torch_dtype == torch.float16 else None  # what a Hub id fetches: half the download in fp16
    settings.checkpoint = str(resolve_checkpoint(settings.checkpoint, "--checkpoint_dir", local_files_only, hub_variant).resolve())
    if settings.lora is not None:
        settings.lora = str(check_lora(settings.lora, classname).resolve())
        settings.lora_sha256 = weights_sha256(lora_file(settings.lora))
    warn = (lambda msg: print(msg, flush=True)) if state.is_main_process else (lambda msg: None)
    samples = build_samples(records, mask_dir, classname, dataset, settings.seeds, warn)
    out_dir = Path(output) / classname
    defect_types = sorted({r["defect_type"] for r in records})
    if state.is_main_process:
        prepare_output(out_dir, settings, overwrite)
        stale = remove_stale_samples(out_dir, all_records, settings.seeds)
        if stale:
            print(f"removed {stale} earlier sample(s) that {boxes_path(mask_dir, classname)} no longer holds", flush=True)
    state.wait_for_everyone()
    pending = [s for s in samples if not is_done(out_dir, s)]
    state.wait_for_everyone()  # every process has scanned before any writes
    mine = pending[state.process_index :: state.num_processes]
    if state.is_main_process:
        print(f"{len(samples) - len(pending)} of {len(samples)} samples already done; generating {len(pending)} on {state.num_processes} process(es)", flush=True)
    if mine:
        pipe = pipe or load_pipeline(settings.checkpoint, device, torch_dtype, settings.lora, settings.lora_scale)
        bar = progress_bar(total=len(mine), desc=f"inpainting {classname}", disable=not state.is_main_process)
        written = time.monotonic()

        def finish(sample, good, box, generated, reference):
            finish_sample(out_dir, sample, good, box, generated, settings, classname, reference)

        with SampleWriter(finish, write_workers, max_pending=settings.batch_size) as writer:
            for size, batch in batches(mine, settings.batch_size, settings.resolution):
                run_batch(pipe, size, batch, settings, out_dir, classname, writer)
                # The per-sample entries are what resuming relies on; the manifest follows them at most
                # MANIFEST_EVERY seconds late (rewriting it after every batch would cost O(N^2)).
                if state.is_main_process and time.monotonic() - written > MANIFEST_EVERY:
                    rebuild_manifest(out_dir, defect_types)
                    written = time.monotonic()
                bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    entries = rebuild_manifest(out_dir, defect_types) if state.is_main_process else []
    return state, out_dir, entries
