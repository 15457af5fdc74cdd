"""Stage 3b: paint a defect into every random box and extract its precise mask.

    python inpainting.py --classname bottle --dataset ./dataset --output ./output/dataset/image --num 100 \\
        --num_inference_steps 20 --guidance_scale 3.5 --extract_mask

Reads random_box.py's MASK_DIR/CLASS/boxes.jsonl and box masks, the SD-1.5 inpainting checkpoint
(--checkpoint_dir: a diffusers folder, or a Hugging Face Hub id fetched once into the Hugging Face cache) and Stage 2's LoRA (--lora_dir, default ./output/CLASS).
Writes OUTPUT/CLASS/test/DEFECT/NNN.png, OUTPUT/CLASS/ground_truth/DEFECT/NNN_mask.png (the precise
mask with --extract_mask, else the box), OUTPUT/CLASS/manifest.jsonl, OUTPUT/CLASS/coco.json (COCO
instance segmentation) and the box masks beside the class folder, OUTPUT/CLASS_boxes/DEFECT/NNN_mask.png.
Pixels outside the boxes are the defect-free image's; images keep its size and grey/colour mode.

Sample NNN is seeded with --seeds + NNN. Reruns skip finished samples (--overwrite starts over).
Several processes share the work under `accelerate launch inpainting.py ...`.
"""

import argparse
from pathlib import Path

from mvp_diff.cli_args import ArgumentParser, add_dataset_args, non_negative_int, positive_float, positive_int
from mvp_diff.errors import UsageError, cli
from mvp_diff.extras import require_extra
from mvp_diff.run_lock import run_lock
from mvp_diff.synthesis import WRITE_WORKERS, Settings, synthesize
from mvp_diff.untrusted import flag_name


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv=None):
    from mvp_diff.masks import MASK_METHODS

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--mask_dir", default="./output/dataset/mask", help="random_box.py's --outdir (default: ./output/dataset/mask)")
    parser.add_argument("--output", default="./output/dataset/image", help="where CLASS/ of the synthetic dataset goes (default: ./output/dataset/image)")
    parser.add_argument("--num", type=int, default=None, help="how many samples of MASK_DIR/CLASS/boxes.jsonl, taking defect types in turn (default: all)")
    parser.add_argument("--checkpoint_dir", default="checkpoints/inpainting",
                        help="SD-1.5 inpainting checkpoint: a diffusers folder or a Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-inpainting (default: checkpoints/inpainting)")
    parser.add_argument("--local_files_only", action="store_true", help="never fetch a Hub id; use the Hugging Face cache only (as HF_HUB_OFFLINE=1 does)")
    parser.add_argument("--lora_dir", default=None, help="folder holding Stage 2's pytorch_lora_weights.safetensors (default: ./output/CLASS)")
    parser.add_argument("--no_lora", action="store_true", help="use the base checkpoint without Stage 2's LoRA")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA (default: 1.0)")
    parser.add_argument("--num_inference_steps", type=positive_int, default=20, help="denoising steps (default: 20)")
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="classifier-free guidance; how closely images follow the sentence (default: 3.5)")
    parser.add_argument("--strength", type=positive_float, default=1.0, help="how far the box content may move from the defect-free image, in (0, 1] (default: 1.0)")
    parser.add_argument("--seeds", "--seed", dest="seeds", type=non_negative_int, default=0, help="base seed; sample NNN uses seeds + NNN (default: 0)")
    parser.add_argument("--extract_mask", nargs="?", const=True, default=False, type=str2bool,
                        help="write the precise mask of what changed (default: off, the box is written as the mask)")
    parser.add_argument("--mask_method", choices=MASK_METHODS, default="default", help="precise-mask method; learned = the default method's terms through a small trained classifier; official = the paper's (default: default)")
    parser.add_argument("--skip_empty", action="store_true", help="drop samples whose precise mask is empty (nothing visible was drawn)")
    parser.add_argument("--batch_size", type=positive_int, default=4, help="prompts per pipeline call (default: 4)")
    parser.add_argument("--resolution", type=positive_int, default=512, help="the longer image side the model runs at, multiple of 8 (default: 512)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available; one GPU per process under accelerate launch)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="weights and activations (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--overwrite", action="store_true", help="delete this class's earlier outputs and start over")
    parser.add_argument("--write_workers", type=non_negative_int, default=WRITE_WORKERS,
                        help=f"threads that paste back, extract masks and write samples while the next batch generates (default: {WRITE_WORKERS}; 0: after each batch)")
    args = parser.parse_args(argv)
    if args.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.no_lora and args.lora_dir:
        raise UsageError("--no_lora and --lora_dir exclude each other")
    if args.extract_mask and args.mask_method == "official":
        require_extra("official", "--mask_method official (dense CRF)")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    flag_name(args.classname, "--classname")  # it names the output folder: checked before the lock creates it
    with run_lock(Path(args.output) / args.classname):  # under accelerate launch: rank 0 only
        run(args)


def run(args):
    lora = None if args.no_lora else (args.lora_dir or str(Path("./output") / args.classname))
    settings = Settings(
        checkpoint=args.checkpoint_dir,
        lora=lora,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        strength=args.strength,
        resolution=args.resolution,
        seeds=args.seeds,
        extract_mask=args.extract_mask,
        mask_method=args.mask_method,
        lora_scale=args.lora_scale,
        batch_size=args.batch_size,
        skip_empty=args.skip_empty,
    )
    state, out_dir, entries = synthesize(args.classname, args.dataset, args.mask_dir, args.output, settings, args.num, args.device, args.dtype, args.overwrite,
                                        args.local_files_only, args.write_workers)
    if state.is_main_process:
        empty = sum("empty_mask" in e.flags for e in entries)
        what = f"precise masks ({args.mask_method})" if args.extract_mask else "box masks (no --extract_mask)"
        print(f"{len(entries)} samples with {what} -> {out_dir}/ (manifest: {out_dir / 'manifest.jsonl'}; {empty} with an empty mask)")


if __name__ == "__main__":
    main()
