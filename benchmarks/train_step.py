"""Training step time: this project's loop (latents drawn from the one-time cache) against a loop that
re-encodes every step (the original design: VAE-encode the defect image, the masked image and an
unused defect-free image, and run the text encoder, every step), in one run, on the same model, batch
and records.

    python -m benchmarks.train_step                                 # tiny and mid-size models, 256 px
    python -m benchmarks.train_step --models mid --resolution 512 --batch_size 2
    python -m benchmarks.train_step --models full --device cuda --mixed_precision fp16 --batch_size 6 --resolution 512

Models (random weights, nothing downloaded): `tiny` is the tests' checkpoint; `mid` a scaled-down SD
(UNet blocks 128/256/256, VAE blocks 64/128/128/128, 6-layer 512-wide text encoder); `full` the SD-1.5
inpainting architecture (GPU). The re-encoding loop gets its images already decoded and resized in
memory, so only the VAE and text-encoder work counts against it. Both loops run train_diffusion.py's
own optimisation step (`mvp_diff.training.training_step` under accelerate; fp16 through accelerate's
gradient scaler); timings are interleaved and the median counts. On CUDA each loop's peak memory
(torch.cuda.max_memory_allocated, all models resident as in training) is reported too.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.full_size import SD15_TEXT, SD15_UNET, SD15_VAE
from mvp_diff.latent_cache import ExampleImages, build_latent_cache
from mvp_diff.lora import prepare_lora_unet
from mvp_diff.sample_stream import SampleStream
from mvp_diff.training import training_step

REPO = Path(__file__).resolve().parents[1]

WORK = REPO / "benchmarks" / "_work" / "training"


def production_step(unet, noise_scheduler, params, mixed_precision, device):
    """train_diffusion.py's optimisation step on this model: `mvp_diff.training.training_step` under
    accelerate with the run's mixed precision (fp16: accelerate's gradient scaler), min-SNR loss,
    clipping and AdamW. Returns step(batch) -> loss."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        return training_step(accelerator, unet, noise_scheduler, optimizer, lr_scheduler, [batch], snr_gamma=10, max_grad_norm=1.0)

    return step


MID_UNET = dict(in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(128, 256, 256), cross_attention_dim=512, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=32)
MID_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128, 128),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215)
MID_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, max_position_embeddings=77, projection_dim=512)


def tiny_checkpoint():
    from mvp_diff.demo_checkpoint import build_tiny_inpainting_checkpoint

    path = WORK / "tiny_inpainting"
    if not (path / "model_index.json").is_file():
        build_tiny_inpainting_checkpoint(path)
    return path


def build_models(name):
    """(unet, vae, text_encoder, tokenizer, noise_scheduler) of a model size, random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ckpt = tiny_checkpoint()
    tokenizer = CLIPTokenizer.from_pretrained(ckpt, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(ckpt, subfolder="scheduler")
    torch.manual_seed(0)
    if name == "tiny":
        unet = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(ckpt, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(ckpt, subfolder="text_encoder")
    else:
        unet_cfg, vae_cfg, text_cfg = (SD15_UNET, SD15_VAE, SD15_TEXT) if name == "full" else (MID_UNET, MID_VAE, MID_TEXT)
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
        ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**ids, **text_cfg}))
    return unet, vae, text_encoder, tokenizer, scheduler


def records():
    """(image, box mask, defect-free image, sentence) of the demo bottle's anomalies."""
    from mvp_diff.dataset import load_class, record_path
    from mvp_diff.demo_data import build_demo_dataset
    from mvp_diff.records import BoxParams, build_records, compute_boxes, write_box_masks

    root = WORK / "dataset"
    if not (root / "bottle").is_dir():
        build_demo_dataset(root, classes=("bottle",))
    class_data = load_class(root, "bottle")
    boxes, _ = compute_boxes(class_data, BoxParams(), progress=False)
    write_box_masks(class_data, boxes, BoxParams(), WORK / "script", progress=False)
    train, test = build_records(class_data, boxes, outdir=WORK / "script")
    return [tuple(record_path(r, k) for k in ("image", "bbox_mask", "good_image")) + (r["text"],) for r in train + test]


def bench(name, args):
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    unet, vae, text_encoder, tokenizer, scheduler = build_models(name)
    unet.requires_grad_(False), vae.requires_grad_(False), text_encoder.requires_grad_(False)
    for model in (unet, vae, text_encoder):
        model.to(device) if dtype == torch.float32 else model.to(device, dtype)
    params = prepare_lora_unet(unet, 4, args.gradient_checkpointing)
    unet.train()
    optimize = production_step(unet, scheduler, params, args.mixed_precision, device)

    data = records()
    started = time.perf_counter()
    cache = build_latent_cache(vae, text_encoder, tokenizer, [(d[0], d[1]) for d in data], [d[3] for d in data], args.resolution,
                               device=device, dtype=dtype, progress=False)
    cache_seconds = time.perf_counter() - started
    stream = SampleStream(0, len(data), args.batch_size, cache.latent_shape)
    # The re-encoding loop's inputs, decoded and resized once so that only the encoders count.
    pixels, masks = zip(*[ExampleImages([(d[0], d[1])], args.resolution)[0] for d in data])
    goods = [ExampleImages([(d[2], d[1])], args.resolution)[0][0] for d in data]
    pixels, masks, goods = torch.stack(pixels), torch.stack(masks), torch.stack(goods)
    ids = tokenizer([d[3] for d in data], max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids

    def cached_step(m):
        optimize(stream.batch(cache, m, 0, args.batch_size))

    def reencode_step(m):
        idx = torch.as_tensor(stream.records(m)[: args.batch_size])
        g = torch.Generator().manual_seed(m)
        with torch.no_grad():
            pix, mask, good = pixels[idx].to(device, dtype), masks[idx].to(device, dtype), goods[idx].to(device, dtype)
            latents = vae.encode(pix).latent_dist.sample() * vae.config.scaling_factor
            masked_latents = vae.encode(pix * (mask < 0.5)).latent_dist.sample() * vae.config.scaling_factor
            vae.encode(good).latent_dist.sample()  # the original encoded a defect-free image every step, unused
            text = text_encoder(ids[idx].to(device))[0]
        shape = latents.shape
        optimize(dict(latents=latents.float(), masked_latents=masked_latents.float(), mask=F.interpolate(mask.float(), size=shape[-2:]),
                      text=text.float(), noise=torch.randn(shape, generator=g), timesteps=torch.randint(0, 1000, (shape[0],), generator=g)))

    peaks = {cached_step: 0.0, reencode_step: 0.0}  # GiB, CUDA only

    def timed(step, m):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for i in range(args.steps):
            step(m + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks[step] = max(peaks[step], torch.cuda.max_memory_allocated() / 2**30)
        return (time.perf_counter() - t) / args.steps

    cached_step(0), reencode_step(0)  # warm-up
    cached, reencoded = [], []
    for r in range(args.repeats):
        cached.append(timed(cached_step, 1 + 2 * r * args.steps))
        reencoded.append(timed(reencode_step, 1 + (2 * r + 1) * args.steps))
    count = lambda model: sum(p.numel() for p in model.parameters()) / 1e6  # noqa: E731
    return dict(model=name, unet=count(unet), vae=count(vae), text=count(text_encoder), records=len(data), cache_s=cache_seconds,
                cached=statistics.median(cached), reencode=statistics.median(reencoded),
                cached_peak_gib=peaks[cached_step] if device.type == "cuda" else None,
                reencode_peak_gib=peaks[reencode_step] if device.type == "cuda" else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=("tiny", "mid", "full"))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps per timing (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timings per loop; the median counts (default: 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.resolution} px, batch {args.batch_size}, {args.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}")
    print("| model | UNet / VAE / text (M params) | cache (one-time, s) | cached step (s) | re-encode step (s) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    results = []
    for name in args.models:
        r = bench(name, args)
        results.append(r)
        print(f"| {r['model']} | {r['unet']:.1f} / {r['vae']:.1f} / {r['text']:.1f} | {r['cache_s']:.2f} ({r['records']} records) | "
              f"{r['cached']:.3f} | {r['reencode']:.3f} | {r['reencode'] / r['cached']:.2f}x |", flush=True)
        if r["cached_peak_gib"] is not None:
            print(f"  peak GPU memory (max_memory_allocated): cached {r['cached_peak_gib']:.2f} GiB, re-encode {r['reencode_peak_gib']:.2f} GiB", flush=True)
    if args.json:
        settings = {k: getattr(args, k) for k in ("resolution", "batch_size", "steps", "repeats", "device", "mixed_precision", "gradient_checkpointing")}
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
