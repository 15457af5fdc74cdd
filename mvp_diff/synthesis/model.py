"""Stage 3 model side: the inpainting pipeline (checkpoint, LoRA checks and fusing), one batched
generation, the paste-back into the original, the VAE round trips and the precise mask."""

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..checkpoint import LORA_WEIGHT_NAME, check_checkpoint, inpaint_pipeline, load_components, pick_variant
from ..errors import UsageError, UserError
from .inputs import Settings


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
    if not lora_file(path).is_file():
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
        weights = lora_file(lora)
        folder, weight_name = weights.parent, weights.name
        try:
            pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name="mvp_diff")
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"--lora_dir {lora}: cannot load the LoRA ({err.__class__.__name__}: {str(err).splitlines()[0]})")
        if "mvp_diff" not in pipe.get_list_adapters().get("unet", []):
            raise UserError(f"--lora_dir {lora}: {weight_name} holds no UNet LoRA weights for this checkpoint")
        trained_as = trained_prediction_type(folder)
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
    from ..latent_cache import resize_pair

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


def precise_mask(good, box, generated, settings: Settings, reference=None, pipeline_input=None):
    """The defect's mask at the original image's size (the box with --extract_mask off).

    Measured where the generator worked: between its output `generated` and the very input it was
    given (pipeline_inputs: the original and the box resized as in training), the generator's pixels
    inside that box and the input's outside, as paste_back combines them; then resized to the
    original size (bilinear, at half) within the original box. At the original size the generated
    pixels are a bicubic enlargement that lacks the original's fine detail all over the box, which
    the learned method took for change (mask benchmark, tune split, 1024 px images generated at 512:
    mean IoU 0.607 measured at 1024, 0.689 at 512; the default method 0.643 and 0.642;
    benchmarks/results/masks.md), and the smaller images cost less. There the round trip's blur and
    noise keep their own size in pixels whatever --resolution is (extract_mask's at_generator_size).
    `reference`: the input's VAE round trip at the pipeline's size (vae_round_trips), or None.
    `pipeline_input`: the (image, box mask) pipeline_inputs gave the generator (None: made again).
    Grey originals are compared in grey (the generated colours' luma, as paste_back keeps them)."""
    if not settings.extract_mask:
        return box.copy()
    from ..masks import extract_mask, resize_mask

    image, small_box = pipeline_input or pipeline_inputs(good, box, (generated.shape[1], generated.shape[0]))
    small_box = np.asarray(small_box) > 0
    if good.ndim == 2:
        image, generated = np.asarray(image.convert("L")), np.asarray(Image.fromarray(generated).convert("L"))
        reference = None if reference is None else np.asarray(Image.fromarray(reference).convert("L"))
    image = np.asarray(image)
    inside = small_box[..., None] if image.ndim == 3 else small_box

    def pasted(x):
        return np.where(inside, x, image)

    reference = None if reference is None else pasted(reference)
    mask = extract_mask(pasted(generated), image, small_box, method=settings.mask_method, reference=reference, at_generator_size=True)
    return resize_mask(mask, box.shape) & box


def resolve_device(device=None, dtype="auto"):
    """(accelerate PartialState, torch device, torch dtype) for this process: under `accelerate launch`
    each process takes its own GPU; fp16 on CUDA and fp32 on CPU unless --dtype says otherwise."""
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
