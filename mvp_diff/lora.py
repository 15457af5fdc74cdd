"""The LoRA adapter of Stage 2 on disk: adding it to the UNet, its weight file
(`pytorch_lora_weights.safetensors`, as diffusers' `load_lora_weights` reads it) and the resumable
training checkpoints (`checkpoint-STEP/`) that hold it."""

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import LORA_WEIGHT_NAME
from .errors import UserError
from .kill_points import kill_point

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
