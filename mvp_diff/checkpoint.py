"""Stable Diffusion inpainting checkpoints in diffusers layout: finding (a folder or a Hugging Face Hub
id), checking and loading them, the inference pipeline both Stage 2 validation and Stage 3 use, and
a tiny random checkpoint.

The tiny checkpoint has the real SD-1.5 inpainting structure (9-channel UNet, 4-channel KL VAE with
8x downsampling, CLIP text encoder and BPE tokenizer, PNDM scheduler, safety checker and feature
extractor folders) with small, randomly initialised weights, so every code path runs on a CPU in
seconds without downloading anything.
"""

import json
import os
import re
from pathlib import Path

from .errors import UserError

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # Stage 2 writes it, Stage 3 loads it

# The scheduler config of the SD-1.5 inpainting release.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)


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


def _byte_symbols():
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) uses for the bytes 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _tiny_vocab_files(folder: Path, words):
    """vocab.json and merges.txt for a CLIP byte-level BPE with whole-word merges for `words`."""
    base = _byte_symbols()
    vocab = base + [c + "</w>" for c in base]
    merges = []
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def tiny_words():
    """Words of the location sentences, so the tiny tokenizer sees them as single tokens."""
    from .demo_data import DEMO_CLASSES
    from .prompts import LOCATIONS, NUMBER_WORDS, SIZE_WORDS

    words = {"with", "at", "the", "and", "defect", "defects", "a", "photo", "of"}
    words.update(w for row in LOCATIONS for phrase in row for w in phrase.split())
    words.update(w for _, w in SIZE_WORDS)
    words.update(NUMBER_WORDS.values())
    for classname, spec in DEMO_CLASSES.items():
        words.add(classname)
        words.update(w for d in spec["defects"] for w in d.split("_"))
    return words


def build_tiny_inpainting_checkpoint(path, seed=0, safe_serialization=True, variant=None, dtype=None):
    """Save a tiny random SD-inpainting pipeline at `path` with `save_pretrained` and return the path.
    `dtype=torch.float16, variant="fp16"` gives the shape of a copy saved after loading in fp16: fp16
    weight files only, and a text-encoder config that names float16."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=9,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # attention only at the coarser level keeps 512 px runs fast on a CPU
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.18215,
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = _tiny_vocab_files(Path(tmp), tiny_words())
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    safety_config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32,
    )
    safety_checker = StableDiffusionSafetyChecker(safety_config)
    feature_extractor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=True,
    )
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=safe_serialization, variant=variant)
    _write_release_tokenizer(Path(path) / "tokenizer")
    return Path(path)


def _write_release_tokenizer(folder: Path):
    """Replace the saved tokenizer with the files the SD-1.5 release ships (vocab.json, merges.txt and
    two configs, no tokenizer.json), so loading is exercised on the layout users download."""
    for f in folder.iterdir():
        f.unlink()
    _tiny_vocab_files(folder, tiny_words())
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, indent=2))
