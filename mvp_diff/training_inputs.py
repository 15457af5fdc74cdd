"""Stage 2's inputs, all checked before a model is loaded: the flags, the Stage 1 records (every file
they name), the checkpoint folder and the run to resume."""

from dataclasses import dataclass
from pathlib import Path

import torch

from . import untrusted
from .checkpoint import resolve_checkpoint
from .dataset import record_path
from .errors import UsageError, UserError
from .files import image_size, read_jsonl_numbered
from .lora import list_checkpoints, resolve_resume


@dataclass
class Example:
    image: Path  # the defect image
    bbox_mask: Path
    text: str
    good_image: Path = None  # defect-free image (validation inpaints on it)


@dataclass
class Inputs:
    classname: str
    out_dir: Path  # OUTPUT_DIR/CLASS
    checkpoint: Path
    train: list
    validation: list
    resume: tuple = None  # (step, checkpoint folder) to resume from


def check_args(args):
    """What the flags' argparse types cannot check alone; raised before anything heavy is loaded."""
    if args.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}; try {max(8, args.resolution // 8 * 8)}")
    if resolve_mixed_precision(args.mixed_precision) == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a CUDA GPU; use --mixed_precision bf16 or no on this machine")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401  (availability check)
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag)")


def resolve_mixed_precision(value):
    """--mixed_precision auto: fp16 on CUDA, no on CPU. fp16 rather than bf16 because SD-1.5 is released
    in fp16 (the frozen weights lose nothing), every CUDA GPU runs it at full speed, and it keeps 3 more
    mantissa bits than bf16; the gradient scaler covers its range and the LoRA weights stay float32.
    On CPU half precision is slower than float32."""
    if value in (None, "auto"):
        return "fp16" if torch.cuda.is_available() else "no"
    return value


def class_name(args):
    if args.classname:
        return untrusted.flag_name(args.classname, "--classname")
    if args.train_data_dir:
        return untrusted.flag_name(Path(args.train_data_dir).name, "--train_data_dir's folder name")
    raise UsageError("pass --classname (or --train_data_dir DATASET/CLASS)")


def default_train_file(classname):
    """Stage 1's output for the class, relative to the working directory (as the README runs it)."""
    return Path("script") / classname / f"{classname}_train.jsonl"


def load_examples(path, flag, classname, data_root, with_good_image=False, limit=None):
    """Examples of a Stage 1 .jsonl, every file checked up front (each error names the file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: not found; run location_describer.py --classname {classname} --dataset DATASET --outdir ./script first")
    records = read_jsonl_numbered(path)
    if not records:
        raise UserError(f"{flag} {path}: no records; rerun location_describer.py (does the class have anomalies with non-empty masks?)")
    examples = []
    keys = ("image", "bbox_mask", "text", "dataset_root", "bbox_root") + (("good_image",) if with_good_image else ())
    for i, (lineno, record) in enumerate(records[:limit] if limit else records, 1):
        missing = [k for k in keys if not record.get(k)]
        if missing:
            raise UserError(f"{path}: record {i} lacks {', '.join(missing)}; regenerate it with location_describer.py")
        where = f"{path} line {lineno}"
        untrusted.text(record["text"], untrusted.field_at(where, field="text"))
        for key in ("class", "defect_type"):
            if key in record:
                untrusted.component(record[key], untrusted.field_at(where, field=key))
        if record.get("class", classname) != classname:
            raise UserError(f"{path}: record {i} is of class {record['class']!r}, not {classname!r}; check --classname / --train_data_dir")
        image = record_path(record, "image", data_root, where)
        if not image.is_file():
            raise UserError(f"{image}: anomaly image of record {i} in {path} not found (moved dataset? pass --train_data_dir DATASET/{classname})")
        # Box masks sit beside the records (Stage 1's --outdir), which may have moved with them.
        stage1_dir = path.parent.parent
        bbox = record_path(record, "bbox_mask", stage1_dir, where)
        if not bbox.is_file():
            root = data_root or Path(record["dataset_root"])
            raise UserError(f"{bbox}: box mask of record {i} in {path} not found; run: python boundbox.py --classname {classname} --dataset {root} --outdir {stage1_dir}")
        if image_size(image) != image_size(bbox):
            raise UserError(f"{where}: image {image} is {image_size(image)} but its box mask {bbox} is {image_size(bbox)} (width, height); rerun boundbox.py")
        good = None
        if with_good_image:
            good = record_path(record, "good_image", data_root, where)
            if not good.is_file():
                raise UserError(f"{good}: defect-free image of record {i} in {path} not found")
        examples.append(Example(image, bbox, record["text"], good))
    return examples


def prepare_inputs(args) -> Inputs:
    """Every check that needs no model: flags, checkpoint folder, train and validation records."""
    check_args(args)
    classname = class_name(args)
    data_root = None
    if args.train_data_dir:
        if not Path(args.train_data_dir).is_dir():
            raise UserError(f"--train_data_dir {args.train_data_dir}: folder not found")
        data_root = Path(args.train_data_dir).parent
    train_file = args.train_file or default_train_file(classname)
    train = load_examples(train_file, "--train_file", classname, data_root)
    validation = []
    if args.validation_file:
        validation = load_examples(args.validation_file, "--validation_file", classname, data_root, True, args.num_validation_images)
    out_dir = Path(args.output_dir) / classname
    resume = None
    if args.resume_from_checkpoint:
        resume = resolve_resume(args.resume_from_checkpoint, out_dir)
    elif list_checkpoints(out_dir):
        latest = list_checkpoints(out_dir)[-1][1]
        raise UserError(f"{latest} exists from an earlier run; pass --resume_from_checkpoint latest to continue it, "
                        f"or use another --output_dir (or delete {out_dir})")
    # Last: a Hub id may be fetched here, after every cheaper check has passed.
    checkpoint = resolve_checkpoint(args.pretrained_model_name_or_path, local_files_only=getattr(args, "local_files_only", False),
                                    variant=args.variant)
    return Inputs(classname, out_dir, checkpoint, train, validation, resume)


def seed_training_args(classname="bottle"):
    """train_diffusion.py's flags of the paper's run: the README's Stage 2 command, which
    train_diffusion.sh launches, the demo runs (shortened) and the tests check."""
    return ["--pretrained_model_name_or_path", "checkpoints/inpainting", "--train_data_dir", f"./dataset/{classname}",
            "--train_batch_size", "6", "--gradient_accumulation_steps", "4", "--num_train_epochs", "1000", "--checkpointing_steps", "500",
            "--learning_rate", "1e-07", "--lr_scheduler", "constant", "--seed", "0", "--validation_epochs", "100",
            "--validation_file", f"./script/{classname}/{classname}_test.jsonl", "--output_dir", "./output", "--prediction_type", "epsilon",
            "--scale_lr", "--snr_gamma", "10"]
