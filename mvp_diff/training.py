"""Stage 2: LoRA fine-tuning of the SD-1.5 inpainting UNet on Stage 1 records.

Each record gives the target (the defect image), the condition (its box mask, and the image with the
box blanked) and the text (the location sentence). The structure is that of diffusers'
`examples/text_to_image/train_text_to_image_lora.py` (accelerate, peft LoRA, min-SNR weighting),
with three changes:

- The frozen VAE and text encoder run once, before training (`latent_cache`); each step samples
  latents from the cached distributions.
- Which records a step trains on and all of its noise are a pure function of (seed, micro-step,
  position in the global batch): a resumed run repeats an uninterrupted one exactly, and N processes
  with batch B train on exactly what one process with batch N*B trains on.
- Checkpoints are written to a temp folder and renamed; only the LoRA weights are saved, never the
  frozen UNet.
"""

import contextlib
import logging
import math
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from .progress import progress_bar

from . import untrusted
from .checkpoint import LORA_WEIGHT_NAME, inpaint_pipeline, load_components, load_scheduler, pick_variant, resolve_checkpoint
from .dataset import record_path
from .errors import UsageError, UserError
from .files import atomic_write_json, atomic_write_text, image_size, read_jsonl_numbered, read_rgb, save_image
from .kill_points import kill_point
from .latent_cache import build_latent_cache, flip_variants, load_pil, resize_pair

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOSS_CSV_HEADER = "step,epoch,loss,lr\n"

logger = logging.getLogger("mvp_diff.training")


# --------------------------------------------------------------------------------------------- inputs


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
    """Flag values a user can get wrong; raised before anything heavy is loaded."""
    positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps", "rank",
                "validation_epochs", "num_validation_images", "validation_inference_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}; try {max(8, args.resolution // 8 * 8)}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.lr_warmup_steps < 0 or args.dataloader_num_workers < 0 or args.noise_offset < 0 or args.max_grad_norm < 0:
        raise UsageError("--lr_warmup_steps, --dataloader_num_workers, --noise_offset and --max_grad_norm must be >= 0")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise UsageError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
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


# ------------------------------------------------------------------------------------ sample stream


class SampleStream:
    """Which records, flips, latent samples, noise and timesteps every micro-batch gets.

    Epoch e visits the records in a permutation drawn from (seed, e); when the record count is not a
    multiple of the global batch, the order wraps around to fill the last batch (as torch's
    DistributedSampler pads), so every batch is full even when the batch is larger than the data.
    Micro-batches run on across epoch boundaries. Process p of P takes the p-th slice of each global
    batch, and the sample at global position j of micro-step m draws all its randomness from its own
    generator seeded by (seed, m, j): nothing depends on the process count or on earlier steps.
    """

    def __init__(self, seed, num_records, global_batch_size, latent_shape, num_variants=1, num_train_timesteps=1000, noise_offset=0.0):
        self.seed = seed
        self.num_records = num_records
        self.global_batch_size = global_batch_size
        self.latent_shape = tuple(latent_shape)
        self.num_variants = num_variants
        self.num_train_timesteps = num_train_timesteps
        self.noise_offset = noise_offset
        self.micro_batches_per_epoch = math.ceil(num_records / global_batch_size)

    @lru_cache(maxsize=4)
    def order(self, epoch):
        perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_records)
        return np.resize(perm, self.micro_batches_per_epoch * self.global_batch_size)

    def epoch_of(self, micro_step):
        return micro_step // self.micro_batches_per_epoch

    def records(self, micro_step):
        epoch, k = divmod(micro_step, self.micro_batches_per_epoch)
        return self.order(epoch)[k * self.global_batch_size : (k + 1) * self.global_batch_size]

    def generator(self, micro_step, position):
        state = np.random.SeedSequence([self.seed, 1, micro_step, position]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def draw(self, micro_step, position):
        """(flip variant, unit noise for the image latents, for the masked-image latents, diffusion noise, timestep)."""
        g = self.generator(micro_step, position)
        variant = int(torch.randint(self.num_variants, (1,), generator=g)) if self.num_variants > 1 else 0
        eps_image = torch.randn(self.latent_shape, generator=g)
        eps_masked = torch.randn(self.latent_shape, generator=g)
        noise = torch.randn(self.latent_shape, generator=g)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((self.latent_shape[0], 1, 1), generator=g)
        timestep = int(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
        return variant, eps_image, eps_masked, noise, timestep

    def batch(self, cache, micro_step, rank=0, per_device=None):
        """This process's share of a micro-batch, on the CPU: dict of latents, masked_latents, mask,
        text, noise, timesteps."""
        per_device = per_device or self.global_batch_size
        records = self.records(micro_step)
        positions = range(rank * per_device, (rank + 1) * per_device)
        draws = [self.draw(micro_step, j) for j in positions]
        variants = [d[0] for d in draws]
        eps_image, eps_masked, noise = (torch.stack([d[i] for d in draws]) for i in (1, 2, 3))
        latents, masked, mask, text = cache.batch(records[rank * per_device : (rank + 1) * per_device], variants, eps_image, eps_masked)
        timesteps = torch.tensor([d[4] for d in draws], dtype=torch.long)
        return dict(latents=latents, masked_latents=masked, mask=mask, text=text, noise=noise, timesteps=timesteps)


# --------------------------------------------------------------------------------------------- loss


def diffusion_loss(unet, noise_scheduler, batch, snr_gamma=None):
    """Inpainting denoising loss of one batch (min-SNR weighted when `snr_gamma` is set)."""
    from diffusers.training_utils import compute_snr

    latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"unknown prediction type {prediction_type!r}; pass --prediction_type epsilon or v_prediction")
    # Channel order of StableDiffusionInpaintPipeline: noisy latents, mask, masked-image latents.
    unet_input = torch.cat([noisy_latents, batch["mask"], batch["masked_latents"]], dim=1)
    model_pred = unet(unet_input, timesteps, batch["text"], return_dict=False)[0]
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    # Min-SNR weighting (arXiv:2303.09556), as in diffusers' examples.
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


# --------------------------------------------------------------------------------------------- LoRA


def add_lora(unet, rank):
    """peft LoRA on the attention projections; lora_alpha = rank, so the saved file loads with scale 1."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
    return unet


def prepare_lora_unet(unet, rank, gradient_checkpointing=False):
    """Add the LoRA with float32 weights (the frozen rest may be half precision: fp16/bf16 updates of
    small LoRA weights lose precision), optionally gradient checkpointing; returns the trainable params."""
    from diffusers.training_utils import cast_training_params

    add_lora(unet, rank)
    cast_training_params(unet, dtype=torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return [p for p in unet.parameters() if p.requires_grad]


def lora_layers(unet):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def write_lora(directory, unet):
    """`directory/pytorch_lora_weights.safetensors`, loadable by `pipe.load_lora_weights(directory)`.
    The adapter config goes in the file's metadata, so its alpha is never guessed at load time."""
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline.save_lora_weights(
        save_directory=str(directory),
        unet_lora_layers=lora_layers(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )


def save_lora(directory, unet):
    """write_lora, atomically: written beside the target and renamed over it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".lora-"))
    try:
        write_lora(tmp, unet)
        os.replace(tmp / LORA_WEIGHT_NAME, directory / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory / LORA_WEIGHT_NAME


def load_lora_into(unet, directory):
    """Set the LoRA weights of a peft UNet from a folder written by write_lora."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict, _ = StableDiffusionInpaintPipeline.lora_state_dict(str(directory))
    unet_state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")})
    try:
        result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    except RuntimeError as err:
        raise UserError(f"{directory}: LoRA weights do not fit this UNet (another --rank or model?): {str(err).splitlines()[0]}")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UserError(f"{directory}: LoRA weights do not fit this UNet ({len(unexpected)} unexpected keys, e.g. {unexpected[0]})")


# -------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(out_dir):
    """[(step, path)] of complete checkpoints, oldest first. Temp folders of an interrupted save are
    named `.checkpoint-*` and never match."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def remove_stale_temps(out_dir):
    """Leftovers of a run killed while saving a checkpoint or the LoRA weights."""
    for p in [*Path(out_dir).glob(".checkpoint-*"), *Path(out_dir).glob(".lora-*")]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator, out_dir, step, total_limit=None):
    """accelerate state (LoRA, optimizer, lr scheduler, RNG, step counter) to `out_dir/checkpoint-STEP`.

    Written to `.checkpoint-STEP.tmp` and renamed once complete, so `latest` never sees a half-written
    folder; only then are the oldest checkpoints beyond `total_limit` removed."""
    out_dir = Path(out_dir)
    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except OSError as err:  # e.g. disk full: no half-written checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{final}: cannot write the checkpoint ({err.strerror or err}); nothing partial was left; "
                        f"free some space and rerun with --resume_from_checkpoint latest")
    kill_point("checkpoint")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            old = out_dir / f".checkpoint-{step}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if total_limit:
            for _, path in list_checkpoints(out_dir)[:-total_limit]:
                doomed = out_dir / f".{path.name}.delete"
                os.replace(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(value, out_dir):
    """(step, path) to resume from, or None for `latest` when there is no checkpoint yet."""
    if value == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(value)
    if not path.is_dir():
        path = Path(out_dir) / path.name
    match = CHECKPOINT_RE.match(path.name)
    if not path.is_dir() or not match:
        known = ", ".join(p.name for _, p in list_checkpoints(out_dir)) or "none"
        raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint folder (checkpoints in {out_dir}: {known})")
    return int(match.group(1)), path


# --------------------------------------------------------------------------------------- validation


def _row(example, resolution, result_fn):
    size = (resolution, resolution)
    good, mask = resize_pair(*load_pil(example.good_image, example.bbox_mask), size)
    anomaly = Image.fromarray(read_rgb(example.image)).resize(size, Image.LANCZOS)
    result = result_fn(good, mask)
    m = (np.asarray(mask) > 127)[..., None]
    shaded = np.where(m, 0.6 * np.asarray(good) + 0.4 * np.array([255, 0, 0]), np.asarray(good)).astype(np.uint8)
    return [np.asarray(anomaly), shaded, np.asarray(result.convert("RGB"))]


def validation_grid(pipeline, examples, resolution, num_inference_steps, guidance_scale, seed, autocast=contextlib.nullcontext):
    """One row per example: its real defect image, the defect-free image with the box shaded, and the
    defect the current LoRA inpaints in that box (pixels outside the box pasted back)."""
    rows = []
    for i, example in enumerate(examples):
        def inpaint(good, mask):
            generator = torch.Generator(device=pipeline.device).manual_seed(seed + i)
            with autocast():
                image = pipeline(prompt=example.text, image=good, mask_image=mask, height=resolution, width=resolution,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator).images[0]
            return pipeline.image_processor.apply_overlay(mask, good, image)

        rows.append(np.concatenate(_row(example, resolution, inpaint), axis=1))
    return np.concatenate(rows, axis=0)


# --------------------------------------------------------------------------------------------- train


def _versions():
    import accelerate
    import diffusers
    import peft
    import transformers

    from . import __version__

    return {"mvp_diff": __version__, "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__}


def _reset_loss_log(path, keep_until_step):
    """The loss CSV of this run: rows up to the resumed step kept, the rest (a stopped run's tail) dropped."""
    rows = []
    if keep_until_step and path.is_file():
        for line in path.read_text().splitlines()[1:]:
            try:
                if int(line.split(",", 1)[0]) <= keep_until_step:
                    rows.append(line + "\n")
            except ValueError:
                continue
    atomic_write_text(path, LOSS_CSV_HEADER + "".join(rows))


def train(args):
    """Run Stage 2 as configured by train_diffusion.py's flags; returns the trained (unwrapped) UNet."""
    inputs = prepare_inputs(args)  # every input error before the heavy imports and model loading
    out_dir = inputs.out_dir

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    log_with = None
    if args.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            pass  # the CSV log below is always written
    # Several processes on a machine without CUDA: tell accelerate to use gloo on the CPU (it otherwise
    # runs every process as a separate single-process job).
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / args.logging_dir)),
        cpu=cpu_ddp,
    )
    is_main = accelerator.is_main_process
    if not accelerator.is_local_main_process:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    say = logger.info if is_main else logger.debug

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)  # LoRA init only: data order and noise come from SampleStream

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)

    # Frozen weights, all on one dtype (half precision under mixed precision); the trainable LoRA
    # weights stay in float32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    variant = args.variant or pick_variant(inputs.checkpoint, weight_dtype)
    models = load_components(inputs.checkpoint, variant, weight_dtype, device)
    tokenizer, text_encoder, vae, unet = (models[k] for k in ("tokenizer", "text_encoder", "vae", "unet"))
    noise_scheduler = DDPMScheduler.from_config(models["scheduler"].config)  # training adds noise the DDPM way
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    prepare_lora_unet(unet, args.rank, args.gradient_checkpointing)

    variants = flip_variants(args.random_hflip, args.random_vflip)
    say(f"encoding {len(inputs.train)} training records x {len(variants)} flip variant(s) once with the frozen VAE and text encoder")
    cache = build_latent_cache(vae, text_encoder, tokenizer, [(e.image, e.bbox_mask) for e in inputs.train], [e.text for e in inputs.train],
                               args.resolution, variants, device, weight_dtype, num_workers=args.dataloader_num_workers,
                               progress=accelerator.is_local_main_process)

    num_processes, rank = accelerator.num_processes, accelerator.process_index
    stream = SampleStream(args.seed, cache.num_records, args.train_batch_size * num_processes, cache.latent_shape, len(variants),
                          noise_scheduler.config.num_train_timesteps, args.noise_offset)
    accum = args.gradient_accumulation_steps
    micro_per_epoch = stream.micro_batches_per_epoch
    max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * micro_per_epoch / accum)

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate = learning_rate * accum * args.train_batch_size * num_processes
    params = [p for p in unet.parameters() if p.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # accelerate steps a prepared scheduler once per process: scale its horizon likewise (as diffusers does).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                                 num_training_steps=max_train_steps * num_processes)

    def unwrap(model):
        model = accelerator.unwrap_model(model)
        return model._orig_mod if hasattr(model, "_orig_mod") else model

    # Checkpoints hold the LoRA weights only, not the frozen 860M-parameter UNet.
    def save_model_hook(models_, weights, output_dir):
        for model in models_:
            if is_main and hasattr(unwrap(model), "peft_config"):
                write_lora(output_dir, unwrap(model))
            if weights:
                weights.pop()

    def load_model_hook(models_, input_dir):
        while models_:
            model = unwrap(models_.pop())
            if hasattr(model, "peft_config"):
                load_lora_into(model, input_dir)
                cast_training_params(model, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    global_step = 0
    if inputs.resume:
        global_step, path = inputs.resume
        say(f"resuming from {path} (step {global_step})")
        accelerator.load_state(str(path))
    elif args.resume_from_checkpoint:
        say(f"no checkpoint in {out_dir} yet; starting a new run")

    loss_csv = out_dir / args.logging_dir / "loss.csv"
    if is_main:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        atomic_write_json(out_dir / "run_config.json", {
            "args": config, "classname": inputs.classname, "train_records": cache.num_records, "flip_variants": variants,
            "num_processes": num_processes, "global_batch_size": stream.global_batch_size * accum,
            "micro_batches_per_epoch": micro_per_epoch, "max_train_steps": max_train_steps, "learning_rate": learning_rate,
            "mixed_precision": accelerator.mixed_precision, "weight_variant": variant, "versions": _versions(),
        })
        _reset_loss_log(loss_csv, global_step)
        if log_with:
            accelerator.init_trackers("mvp_diff", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    say(f"{cache.num_records} train records, {num_processes} process(es) x batch {args.train_batch_size} x accumulation {accum}; "
        f"{micro_per_epoch} micro-batch(es) per epoch; {max_train_steps} optimization steps; learning rate {learning_rate:g}")

    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else contextlib.nullcontext
    pipeline = None
    validated_epoch = None  # every process keeps it alike, so all or none enter validate() and its barrier

    def validate(epoch):
        nonlocal pipeline, validated_epoch
        validated_epoch = epoch
        if is_main and inputs.validation:
            if pipeline is None:
                pipeline = inpaint_pipeline(unwrap(unet), vae, text_encoder, tokenizer, load_scheduler(inputs.checkpoint))
                # Sample the way the LoRA was trained (the checkpoint's own scheduler may predict otherwise).
                pipeline.scheduler.register_to_config(prediction_type=noise_scheduler.config.prediction_type)
            grid = validation_grid(pipeline, inputs.validation, args.resolution, args.validation_inference_steps,
                                   args.validation_guidance_scale, args.seed, autocast)
            save_image(out_dir / "validation" / f"epoch-{epoch}.png", grid)
        accelerator.wait_for_everyone()

    last_checkpoint = list_checkpoints(out_dir)[-1][1] if list_checkpoints(out_dir) else None
    progress = progress_bar(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process, leave=True)
    unet.train()
    while global_step < max_train_steps:
        step_loss = 0.0
        for a in range(accum):
            micro_step = global_step * accum + a
            batch = stream.batch(cache, micro_step, rank, args.train_batch_size)
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.accumulate(unet):
                loss = diffusion_loss(unet, noise_scheduler, batch, args.snr_gamma)
                mean_loss = accelerator.reduce(loss.detach().clone(), reduction="mean")
                if not torch.isfinite(mean_loss):
                    # All processes see the same reduced loss, so all stop here together.
                    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
                    raise UserError(f"loss is {mean_loss.item()} at step {global_step + 1} (epoch {stream.epoch_of(micro_step) + 1}); "
                                    f"stopped without saving; {kept}. Lower --learning_rate (or use --mixed_precision bf16/no) "
                                    f"and resume with --resume_from_checkpoint latest")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step_loss += mean_loss.item() / accum
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation out of step with optimization steps")
        global_step += 1
        epochs_before, epochs_done = (global_step - 1) * accum // micro_per_epoch, global_step * accum // micro_per_epoch
        epoch = global_step * accum / micro_per_epoch  # epochs done, fractional
        lr = lr_scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(epoch=f"{epoch:.1f}", loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if is_main:
            with open(loss_csv, "a") as f:
                f.write(f"{global_step},{epoch:.4f},{step_loss:.8g},{lr:.8g}\n")
            if log_with:
                accelerator.log({"train_loss": step_loss, "lr": lr}, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            last_checkpoint = save_checkpoint(accelerator, out_dir, global_step, args.checkpoints_total_limit)
        if epochs_done // args.validation_epochs > epochs_before // args.validation_epochs:
            validate(epochs_done // args.validation_epochs * args.validation_epochs)
    progress.close()

    accelerator.wait_for_everyone()
    final_epoch = max_train_steps * accum // micro_per_epoch
    if is_main:
        path = save_lora(out_dir, unwrap(unet))
        say(f"LoRA weights -> {path}")
    if inputs.validation and validated_epoch != final_epoch:
        validate(final_epoch)
    accelerator.end_training()
    return unwrap(unet)
