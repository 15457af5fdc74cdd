"""Peak memory and time of one LoRA training step of the full-size SD-1.5 inpainting UNet (859.5M
parameters, random weights built from config, nothing downloaded), on cached latents as
train_diffusion.py trains, with and without gradient checkpointing. Each configuration runs in its
own process, so its peak resident memory (ru_maxrss) is its own.

    python -m benchmarks.train_memory                                            # CPU, 512 px, batch 1
    python -m benchmarks.train_memory --device cuda --mixed_precision fp16 --batch_size 6

On the CPU the figure is peak RSS of the whole process (weights, activations, LoRA optimizer state,
Python); on a GPU it is torch.cuda.max_memory_allocated. --with_encoders also keeps the frozen VAE and
text encoder resident, as a training run does for its validation passes.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



def child(args):
    import resource

    import torch

    from benchmarks.full_size import SD15_TEXT, SD15_UNET, SD15_VAE
    from benchmarks.train_step import production_step
    from mvp_diff.lora import prepare_lora_unet

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvp_diff.demo_checkpoint import SD15_SCHEDULER

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    started = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    params_m = sum(p.numel() for p in unet.parameters()) / 1e6
    unet.requires_grad_(False)
    unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    encoders = []
    if args.with_encoders:
        encoders = [AutoencoderKL(**SD15_VAE).to(device, dtype), CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).to(device, dtype)]
    params = prepare_lora_unet(unet, args.rank, args.gradient_checkpointing)
    unet.train()
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    step = production_step(unet, scheduler, params, args.mixed_precision, device)
    build_s = time.perf_counter() - started
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    size, b = args.resolution // 8, args.batch_size
    g = torch.Generator().manual_seed(0)
    batch = dict(latents=torch.randn((b, 4, size, size), generator=g), masked_latents=torch.randn((b, 4, size, size), generator=g),
                 mask=(torch.rand((b, 1, size, size), generator=g) > 0.7).float(), text=torch.randn((b, 77, 768), generator=g),
                 noise=torch.randn((b, 4, size, size), generator=g), timesteps=torch.randint(0, 1000, (b,), generator=g))
    batch = {k: v.to(device) for k, v in batch.items()}
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    result = dict(gradient_checkpointing=args.gradient_checkpointing, unet_params_m=params_m,
                  encoder_params_m=sum(p.numel() for m in encoders for p in m.parameters()) / 1e6, lora_params_m=sum(p.numel() for p in params) / 1e6,
                  build_s=build_s, rss_after_build_gb=rss_built, step_s=times[-1], first_step_s=times[0],
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, loss=float(loss))
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="steps per configuration; the last one is timed (default: 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--with_encoders", action="store_true", help="keep the VAE and text encoder resident too")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--configs", default="0,1", help="gradient checkpointing off/on to run (default: 0,1)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gradient_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    print(f"SD-1.5 inpainting UNet + LoRA rank {args.rank}, {args.resolution} px, batch {args.batch_size}, device {args.device}, "
          f"{args.mixed_precision}, encoders resident: {args.with_encoders}")
    print("| gradient checkpointing | step (s) | images/s | peak RSS (GB) | RSS after build (GB) | peak GPU (GB) |")
    print("|---|---:|---:|---:|---:|---:|")
    given = list(argv if argv is not None else sys.argv[1:])
    passthrough = []  # the parent's flags for each child, less --configs and its value
    while given:
        flag = given.pop(0)
        if flag == "--configs":
            given = given[1:]
        elif not flag.startswith("--configs="):
            passthrough.append(flag)
    for gc in (int(c) for c in args.configs.split(",")):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_memory", *passthrough, "--child", "--gradient_checkpointing", str(gc)], capture_output=True, text=True, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"| {'on' if gc else 'off'} | failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] } | | | | |")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        gpu = f"{r['peak_cuda_gb']:.2f}" if "peak_cuda_gb" in r else "-"
        print(f"| {'on' if gc else 'off'} | {r['step_s']:.2f} | {args.batch_size / r['step_s']:.2f} | {r['peak_rss_gb']:.2f} | "
              f"{r['rss_after_build_gb']:.2f} | {gpu} |", flush=True)
        print(f"  ({r['unet_params_m']:.1f}M UNet parameters, {r['lora_params_m']:.2f}M LoRA, built in {r['build_s']:.0f} s, "
              f"first step {r['first_step_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
