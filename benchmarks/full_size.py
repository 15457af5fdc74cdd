"""The SD-1.5 inpainting architecture at full size with random weights (nothing downloaded), and a
checkpoint folder in the layout of the release (runwayml/stable-diffusion-inpainting, diffusers
format): every component's config and fp32 weights, fp16 variant files beside them
(`*.fp16.safetensors`), model_index.json, the PNDM scheduler, a CLIP BPE tokenizer as the release
ships it (vocab.json, merges.txt and two configs; the tiny builder's vocabulary: ids only, speed and
shapes are the same), the feature extractor and, optionally, the safety checker.

    python -m benchmarks.full_size checkpoints/random_sd15_inpainting       # about 4.5 GB (fp32 + fp16)

UNet 859.5 M parameters (9 input channels), VAE 83.7 M, CLIP-L text encoder 123.1 M, safety checker
(CLIP-L vision) 304.0 M.
"""

import argparse
import json
from pathlib import Path

# The release's configs (unet/config.json, vae/config.json, text_encoder/config.json).
SD15_UNET = dict(in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                 projection_dim=768, hidden_act="quick_gelu")
# The safety checker's CLIP ViT-L/14 vision tower (the release's safety_checker/config.json).
SD15_SAFETY_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14)
COMPLETE = ".complete"  # written last: a folder without it is a build that did not finish


def tokenizer():
    """A CLIP tokenizer in the release's file layout (the tiny builder's vocabulary)."""
    import tempfile

    from transformers import CLIPTokenizer

    from mvp_diff.demo_checkpoint import write_release_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_release_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def components(unet_config=SD15_UNET, vae_config=SD15_VAE, text_config=SD15_TEXT, safety_vision=SD15_SAFETY_VISION, seed=0):
    """The pipeline's components with random weights; built under `with torch.device("meta"):` they
    hold shapes only (fast: configs and parameter counts). safety_vision=None: no safety checker."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    from mvp_diff.demo_checkpoint import SD15_SCHEDULER

    tok = tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    parts = dict(unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**vae_config), text_encoder=CLIPTextModel(CLIPTextConfig(**text_config, **ids)),
                 tokenizer=tok, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
                 feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}), safety_checker=None)
    if safety_vision is not None:
        text = {k: text_config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
        parts["safety_checker"] = StableDiffusionSafetyChecker(CLIPConfig(text_config={**text, **ids}, vision_config=safety_vision,
                                                                          projection_dim=text_config["projection_dim"]))
    return parts


def parameter_counts(parts):
    """Millions of parameters per model component."""
    return {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in parts.items() if hasattr(model, "parameters")}


def build_release_checkpoint(path, safety_checker=True, seed=0, **configs):
    """Write the random full-size checkpoint (or, with `configs`, a smaller one of the same layout) at
    `path`; a complete earlier build is kept. Returns the path."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    if not safety_checker:
        configs["safety_vision"] = None
    parts = components(seed=seed, **configs)
    pipe = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=parts["safety_checker"] is not None)
    pipe.save_pretrained(path, safe_serialization=True)  # fp32 weights, configs, model_index.json
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        model = parts[name]
        if model is None:
            continue
        # The release's configs are the fp32 ones (text_encoder: "torch_dtype": "float32"); saving
        # the fp16 variant must not rewrite them.
        configs_before = {p: p.read_text() for p in (path / name).glob("*.json")}
        model.to(torch.float16).save_pretrained(path / name, safe_serialization=True, variant="fp16")
        model.to(torch.float32)
        for p, text in configs_before.items():
            p.write_text(text)
    from mvp_diff.demo_checkpoint import write_release_tokenizer

    write_release_tokenizer(path / "tokenizer")
    (path / COMPLETE).write_text(json.dumps(parameter_counts(parts)) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="folder to write the checkpoint to")
    p.add_argument("--no_safety_checker", action="store_true", help="leave safety_checker/ out (Stage 2 and 3 never run it)")
    args = p.parse_args(argv)
    path = build_release_checkpoint(args.path, safety_checker=not args.no_safety_checker)
    print(f"{path}: {(path / COMPLETE).read_text().strip()} (M parameters)")


if __name__ == "__main__":
    main()
