"""The tiny random SD-1.5 inpainting checkpoint the demo and the tests run on, built next to the demo
data (`demo_data`) whose words its tokenizer knows.

It has the real SD-1.5 inpainting structure (9-channel UNet, 4-channel KL VAE with 8x downsampling,
CLIP text encoder and BPE tokenizer, PNDM scheduler, safety checker and feature extractor folders)
with small, randomly initialised weights, so every code path runs on a CPU in seconds without
downloading anything.
"""

import json
from pathlib import Path

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
    write_release_tokenizer(Path(path) / "tokenizer")
    return Path(path)


def write_release_tokenizer(folder: Path):
    """Replace the saved tokenizer with the files the SD-1.5 release ships (vocab.json, merges.txt and
    two configs, no tokenizer.json), so loading is exercised on the layout users download."""
    for f in folder.iterdir():
        f.unlink()
    _tiny_vocab_files(folder, tiny_words())
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, indent=2))
