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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import inpaint_pipeline, load_components, load_scheduler, pick_variant
from .errors import UserError
from .files import atomic_write_json, atomic_write_text, read_rgb, save_image
from .latent_cache import build_latent_cache, flip_variants, load_pil, resize_pair
from .lora import (
    list_checkpoints,
    load_lora_into,
    prepare_lora_unet,
    remove_stale_temps,
    save_checkpoint,
    save_lora,
    write_lora,
)
from .progress import progress_bar
from .sample_stream import SampleStream
from .training_inputs import prepare_inputs, resolve_mixed_precision

LOSS_CSV_HEADER = "step,epoch,loss,lr\n"

logger = logging.getLogger("mvp_diff.training")


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
        def inpaint(good, mask, text=example.text, seed=seed + i):
            generator = torch.Generator(device=pipeline.device).manual_seed(seed)
            with autocast():
                image = pipeline(prompt=text, image=good, mask_image=mask, height=resolution, width=resolution,
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



class NonFiniteLoss(Exception):
    """The loss (averaged over processes, so every process raises it together) is inf or nan."""

    def __init__(self, loss, micro_batch):
        super().__init__(f"loss {loss}")
        self.loss, self.micro_batch = loss, micro_batch


def training_step(accelerator, unet, noise_scheduler, optimizer, lr_scheduler, micro_batches, snr_gamma=None, max_grad_norm=0.0):
    """One optimization step over `accelerator.gradient_accumulation_steps` micro-batches: loss,
    backward, gradient clipping, optimizer and learning-rate step, as accelerate runs them (under fp16
    its gradient scaler scales the loss, unscales before clipping and skips steps with inf gradients).
    Returns the loss averaged over processes and micro-batches; raises NonFiniteLoss before the
    backward pass of a non-finite one, so nothing bad reaches the weights."""
    accum = accelerator.gradient_accumulation_steps
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step_loss = 0.0
    for i, batch in enumerate(micro_batches):
        with accelerator.accumulate(unet):
            loss = diffusion_loss(unet, noise_scheduler, batch, snr_gamma)
            mean_loss = accelerator.reduce(loss.detach().clone(), reduction="mean")
            if not torch.isfinite(mean_loss):
                raise NonFiniteLoss(mean_loss.item(), i)
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        step_loss += mean_loss.item() / accum
    if not accelerator.sync_gradients:
        raise RuntimeError("gradient accumulation out of step with optimization steps")
    return step_loss


def make_accelerator(args, out_dir):
    """The Accelerator of a run, and the tracker it logs to (None: only logs/loss.csv)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None
    if args.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            pass  # the CSV log is always written
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
    if not accelerator.is_local_main_process:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    return accelerator, log_with


def make_optimizer(args, params, num_processes, max_train_steps):
    """(AdamW, its learning-rate scheduler, the learning rate) of the flags."""
    from diffusers.optimization import get_scheduler

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate = learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes
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
    return optimizer, lr_scheduler, learning_rate


def unwrap(accelerator, model):
    model = accelerator.unwrap_model(model)
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def save_lora_only(accelerator):
    """Checkpoints hold the LoRA weights only, not the frozen 860M-parameter UNet."""
    from diffusers.training_utils import cast_training_params

    def save_model_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process and hasattr(unwrap(accelerator, model), "peft_config"):
                write_lora(output_dir, unwrap(accelerator, model))
            if weights:
                weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            model = unwrap(accelerator, models.pop())
            if hasattr(model, "peft_config"):
                load_lora_into(model, input_dir)
                cast_training_params(model, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


class Validation:
    """Validation grids of the current LoRA (main process; the others wait at its barrier). `epoch`
    is kept alike by every process, so all or none enter it."""

    def __init__(self, accelerator, args, inputs, unet, models, noise_scheduler):
        self.accelerator, self.args, self.inputs = accelerator, args, inputs
        self.unet, self.models, self.noise_scheduler = unet, models, noise_scheduler
        self.autocast = accelerator.autocast if accelerator.mixed_precision != "no" else contextlib.nullcontext
        self.pipeline = None
        self.epoch = None  # last validated

    def __call__(self, epoch):
        self.epoch = epoch
        args, inputs = self.args, self.inputs
        if self.accelerator.is_main_process and inputs.validation:
            if self.pipeline is None:
                m = self.models
                self.pipeline = inpaint_pipeline(unwrap(self.accelerator, self.unet), m["vae"], m["text_encoder"], m["tokenizer"],
                                                 load_scheduler(inputs.checkpoint))
                # Sample the way the LoRA was trained (the checkpoint's own scheduler may predict otherwise).
                self.pipeline.scheduler.register_to_config(prediction_type=self.noise_scheduler.config.prediction_type)
            grid = validation_grid(self.pipeline, inputs.validation, args.resolution, args.validation_inference_steps,
                                   args.validation_guidance_scale, args.seed, self.autocast)
            save_image(inputs.out_dir / "validation" / f"epoch-{epoch}.png", grid)
        self.accelerator.wait_for_everyone()


def write_run_config(args, inputs, run):
    """run_config.json: the flags and what they came to (records, batches, steps, precision, versions)."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(inputs.out_dir / "run_config.json", {"args": config, "classname": inputs.classname, **run, "versions": _versions()})
    return config


def log_step(accelerator, log_with, loss_csv, progress, step, epoch, loss, lr):
    progress.update(1)
    progress.set_postfix(epoch=f"{epoch:.1f}", loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if accelerator.is_main_process:
        with open(loss_csv, "a") as f:
            f.write(f"{step},{epoch:.4f},{loss:.8g},{lr:.8g}\n")
        if log_with:
            accelerator.log({"train_loss": loss, "lr": lr}, step=step)


def prepare_models(args, inputs, accelerator, say):
    """The frozen models on one dtype (half precision under mixed precision) with the float32 LoRA
    added to the UNet, the DDPM noise scheduler training adds noise with, and the latent cache of the
    train records: (models, noise_scheduler, LoRA params, cache, weight variant, flip variants)."""
    from diffusers import DDPMScheduler

    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    variant = args.variant or pick_variant(inputs.checkpoint, weight_dtype)
    models = load_components(inputs.checkpoint, variant, weight_dtype, device)
    noise_scheduler = DDPMScheduler.from_config(models["scheduler"].config)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    params = prepare_lora_unet(models["unet"], args.rank, args.gradient_checkpointing)
    variants = flip_variants(args.random_hflip, args.random_vflip)
    say(f"encoding {len(inputs.train)} training records x {len(variants)} flip variant(s) once with the frozen VAE and text encoder")
    cache = build_latent_cache(models["vae"], models["text_encoder"], models["tokenizer"], [(e.image, e.bbox_mask) for e in inputs.train],
                               [e.text for e in inputs.train], args.resolution, variants, device, weight_dtype,
                               num_workers=args.dataloader_num_workers, progress=accelerator.is_local_main_process)
    return models, noise_scheduler, params, cache, variant, variants


def train(args):
    """Run Stage 2 as configured by train_diffusion.py's flags; returns the trained (unwrapped) UNet.
    Setup (models, latent cache, optimizer, resume), then the loop, then the final LoRA file."""
    inputs = prepare_inputs(args)  # every input error before the heavy imports and model loading
    out_dir = inputs.out_dir
    from accelerate.utils import set_seed

    accelerator, log_with = make_accelerator(args, out_dir)
    is_main, device = accelerator.is_main_process, accelerator.device
    say = logger.info if is_main else logger.debug
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)  # LoRA init only: data order and noise come from SampleStream
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)

    models, noise_scheduler, params, cache, variant, variants = prepare_models(args, inputs, accelerator, say)
    unet = models["unet"]
    num_processes, rank, accum = accelerator.num_processes, accelerator.process_index, args.gradient_accumulation_steps
    stream = SampleStream(args.seed, cache.num_records, args.train_batch_size * num_processes, cache.latent_shape, len(variants),
                          noise_scheduler.config.num_train_timesteps, args.noise_offset)
    micro_per_epoch = stream.micro_batches_per_epoch
    max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * micro_per_epoch / accum)
    optimizer, lr_scheduler, learning_rate = make_optimizer(args, params, num_processes, max_train_steps)
    save_lora_only(accelerator)
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
        config = write_run_config(args, inputs, {
            "train_records": cache.num_records, "flip_variants": variants, "num_processes": num_processes,
            "global_batch_size": stream.global_batch_size * accum, "micro_batches_per_epoch": micro_per_epoch,
            "max_train_steps": max_train_steps, "learning_rate": learning_rate, "mixed_precision": accelerator.mixed_precision,
            "weight_variant": variant})
        _reset_loss_log(loss_csv, global_step)
        if log_with:
            accelerator.init_trackers("mvp_diff", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    say(f"{cache.num_records} train records, {num_processes} process(es) x batch {args.train_batch_size} x accumulation {accum}; "
        f"{micro_per_epoch} micro-batch(es) per epoch; {max_train_steps} optimization steps; learning rate {learning_rate:g}")

    validate = Validation(accelerator, args, inputs, unet, models, noise_scheduler)
    last_checkpoint = list_checkpoints(out_dir)[-1][1] if list_checkpoints(out_dir) else None
    progress = progress_bar(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process, leave=True)
    unet.train()
    while global_step < max_train_steps:
        first = global_step * accum  # micro-step
        micro_batches = ({k: v.to(device) for k, v in stream.batch(cache, first + a, rank, args.train_batch_size).items()} for a in range(accum))
        try:
            loss = training_step(accelerator, unet, noise_scheduler, optimizer, lr_scheduler, micro_batches, args.snr_gamma, args.max_grad_norm)
        except NonFiniteLoss as bad:
            kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise UserError(f"loss is {bad.loss} at step {global_step + 1} (epoch {stream.epoch_of(first + bad.micro_batch) + 1}); "
                            f"stopped without saving; {kept}. Lower --learning_rate (or use --mixed_precision bf16/no) "
                            f"and resume with --resume_from_checkpoint latest") from None
        global_step += 1
        epochs_before, epochs_done = (global_step - 1) * accum // micro_per_epoch, global_step * accum // micro_per_epoch
        log_step(accelerator, log_with, loss_csv, progress, global_step, global_step * accum / micro_per_epoch, loss, lr_scheduler.get_last_lr()[0])
        if global_step % args.checkpointing_steps == 0:
            last_checkpoint = save_checkpoint(accelerator, out_dir, global_step, args.checkpoints_total_limit)
        if epochs_done // args.validation_epochs > epochs_before // args.validation_epochs:
            validate(epochs_done // args.validation_epochs * args.validation_epochs)
    progress.close()

    accelerator.wait_for_everyone()
    final_epoch = max_train_steps * accum // micro_per_epoch
    if is_main:
        say(f"LoRA weights -> {save_lora(out_dir, unwrap(accelerator, unet))}")
    if inputs.validation and validate.epoch != final_epoch:
        validate(final_epoch)
    accelerator.end_training()
    return unwrap(accelerator, unet)
