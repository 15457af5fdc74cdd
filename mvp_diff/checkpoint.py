"""Stable Diffusion inpainting checkpoints in diffusers layout: finding (a folder or a Hugging Face Hub
id), checking and loading them, and the inference pipeline both Stage 2 validation and Stage 3 use.
The tiny random checkpoint the demo and the tests run on is built by `demo_checkpoint`.
"""

import json
import os
import re
from pathlib import Path

from .errors import UserError

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # Stage 2 writes it, Stage 3 loads it

def check_checkpoint(path, flag="--pretrained_model_name_or_path", inpainting=True) -> Path:
    """The checkpoint folder, after checking that every component is there (and the UNet takes 9
    input channels when `inpainting`). Raises UserError listing what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: checkpoint folder not found; put the SD-1.5 inpainting checkpoint (diffusers layout) there")
    missing = [c for c in REQUIRED_COMPONENTS if not (path / c).is_dir() or not any((path / c).iterdir())]
    if missing:
        raise UserError(f"{flag} {path}: checkpoint lacks {', '.join(m + '/' for m in missing)} (needs {', '.join(REQUIRED_COMPONENTS)})")
    config = path / "unet" / "config.json"
    if not config.is_file():
        raise UserError(f"{config}: not found; {path} is not a diffusers checkpoint")
    try:
        in_channels = json.loads(config.read_text()).get("in_channels")
    except json.JSONDecodeError as err:
        raise UserError(f"{config}: unreadable ({err.msg})")
    if inpainting and in_channels != 9:
        raise UserError(f"{path}: its UNet takes {in_channels} input channels, not 9; use an inpainting checkpoint (e.g. SD-1.5 inpainting)")
    return path


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face Hub spells repository ids


def is_offline(local_files_only=False):
    """--local_files_only, or HF_HUB_OFFLINE set (huggingface_hub's own switch)."""
    from huggingface_hub import constants

    return bool(local_files_only) or bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name_or_path, flag="--pretrained_model_name_or_path", local_files_only=False, variant=None) -> Path:
    """The local folder of a checkpoint given as a folder or as a Hub id (e.g.
    stable-diffusion-v1-5/stable-diffusion-inpainting). A Hub id is resolved by diffusers' own
    `DiffusionPipeline.download` into the Hugging Face cache (HF_HOME / HF_HUB_CACHE), fetching on first
    use unless offline; the safety checker and feature extractor are never fetched (unused)."""
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.exists() or not HUB_ID.match(text) or text.startswith("."):
        return check_checkpoint(path, flag)
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging

    offline = is_offline(local_files_only)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "offline, using the cache" notices are not news to the user
    try:
        folder = StableDiffusionInpaintPipeline.download(text, local_files_only=offline, variant=variant,
                                                          safety_checker=None, feature_extractor=None)
    except Exception as err:  # huggingface_hub and requests raise many types (offline, 401, 404, timeouts)
        why = "not in the Hugging Face cache and fetching is off (HF_HUB_OFFLINE / --local_files_only)" if offline else \
            f"could not fetch it from the Hugging Face Hub ({err.__class__.__name__})"
        raise UserError(f"{flag} {text}: no such folder, and {why}; place the files by hand: "
                        f"huggingface-cli download {text} --local-dir checkpoints/inpainting on a machine with internet, "
                        f"copy that folder here and pass {flag} checkpoints/inpainting")
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return check_checkpoint(folder, f"{flag} {text} ->")


def pick_variant(checkpoint: Path, dtype):
    """"fp16" when the UNet ships fp16 variant files and either fp16 is asked for or no full-precision
    weights exist (the layout of the SD-1.5 inpainting release), else None."""
    import torch

    names = [p.name for p in (Path(checkpoint) / "unet").iterdir() if p.name.startswith("diffusion_pytorch_model")]
    has_fp16 = any(".fp16." in n for n in names)
    has_plain = any(".fp16." not in n for n in names)
    return "fp16" if has_fp16 and (dtype == torch.float16 or not has_plain) else None


def load_scheduler(path):
    """The checkpoint's own inference scheduler (the class its scheduler_config.json names)."""
    import diffusers

    config = diffusers.PNDMScheduler.load_config(str(path), subfolder="scheduler")
    cls = getattr(diffusers, config.get("_class_name", ""), None) or diffusers.PNDMScheduler
    return cls.from_config(config)


def load_components(path, variant=None, dtype=None, device="cpu"):
    """{scheduler, tokenizer, text_encoder, vae, unet} of a checkpoint folder, each model frozen and
    explicitly on `device` and `dtype`: libraries disagree on the default (transformers keeps the dtype a
    config names, e.g. float16, while diffusers loads float32), and mixed dtypes fail at the first call.
    Needs no model_index.json, safety_checker/ or feature_extractor/."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = dtype or torch.float32
    path = str(path)
    loaded = {}
    for name, load in (
        ("scheduler", lambda: load_scheduler(path)),
        ("tokenizer", lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")),
        ("text_encoder", lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, dtype=dtype)),
        ("vae", lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, dtype=dtype)),
        ("unet", lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, dtype=dtype)),
    ):
        try:
            loaded[name] = load()
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{Path(path) / name}: cannot load ({reason})")
    for name in ("text_encoder", "vae", "unet"):
        loaded[name].requires_grad_(False)
        loaded[name].to(device, dtype=dtype)
    return loaded


def inpaint_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """The StableDiffusionInpaintPipeline of Stage 2 validation and Stage 3, built from loaded models:
    no safety checker (its outputs would be blacked-out defect images), nothing read from disk."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
