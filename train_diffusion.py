"""Stage 2: LoRA fine-tuning of the SD-1.5 inpainting UNet on Stage 1's records (defect image, box
mask, location sentence).

    sh train_diffusion.sh          # the paper's run (the README's Stage 2 command) on NUM_GPUS GPUs
    python train_diffusion.py --help

Reads ./script/CLASS/CLASS_train.jsonl (--train_file) and the box masks boundbox.py wrote. Writes, under
OUTPUT_DIR/CLASS/: pytorch_lora_weights.safetensors (for StableDiffusionInpaintPipeline.load_lora_weights),
checkpoint-STEP/ (resume with --resume_from_checkpoint latest), run_config.json, logs/loss.csv and
validation/epoch-E.png. Several GPUs: `accelerate launch` it, or run train_diffusion.sh.
Flags are named as in diffusers' examples/text_to_image/train_text_to_image_lora.py.
"""

import argparse
import logging
from pathlib import Path

from mvp_diff.cli_args import ArgumentParser, non_negative_float, non_negative_int, positive_float, positive_int
from mvp_diff.errors import cli
from mvp_diff.run_lock import run_lock

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="SD-1.5 inpainting checkpoint: a diffusers folder, or a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-inpainting) "
                        "fetched once into the Hugging Face cache")
    p.add_argument("--local_files_only", action="store_true", help="never fetch a Hub id; use the Hugging Face cache only (as HF_HUB_OFFLINE=1 does)")
    p.add_argument("--variant", default=None, help="weight file variant of the checkpoint, e.g. fp16 (default: fp16 when the UNet has only fp16 files)")
    p.add_argument("--train_data_dir", default=None, help="DATASET/CLASS; names the class, and locates the images if the dataset moved since Stage 1")
    p.add_argument("--classname", default=None, help="object class (default: the name of --train_data_dir)")
    p.add_argument("--train_file", default=None, help="Stage 1 train records (default: ./script/CLASS/CLASS_train.jsonl)")
    p.add_argument("--validation_file", default=None, help="Stage 1 records to inpaint for validation (their defect-free image and box)")
    p.add_argument("--num_validation_images", type=positive_int, default=4, help="validate on the first K records of --validation_file (default: 4)")
    p.add_argument("--validation_epochs", type=positive_int, default=100, help="validate every N epochs, and at the end (default: 100)")
    p.add_argument("--validation_inference_steps", type=positive_int, default=20, help="denoising steps of a validation image (default: 20)")
    p.add_argument("--validation_guidance_scale", type=float, default=3.5, help="guidance scale of validation images (default: 3.5)")
    p.add_argument("--output_dir", default="./output", help="outputs go to OUTPUT_DIR/CLASS/ (default: ./output)")
    p.add_argument("--logging_dir", default="logs", help="log folder inside OUTPUT_DIR/CLASS (default: logs)")
    p.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "none"),
                   help="also log to tensorboard when it is installed (logs/loss.csv is always written)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the LoRA init, data order and noise (default: 0)")
    p.add_argument("--resolution", type=positive_int, default=512, help="images and box masks are resized to RESxRES; a multiple of 8 (default: 512)")
    p.add_argument("--random_hflip", "--random_flip", action="store_true", help="flip half the samples left-right")
    p.add_argument("--random_vflip", action="store_true", help="flip half the samples upside down")
    p.add_argument("--train_batch_size", type=positive_int, default=6,
                   help="batch per process (default: 6); a batch larger than the data repeats records (the epoch's order wraps around)")
    p.add_argument("--num_train_epochs", type=positive_int, default=100)
    p.add_argument("--max_train_steps", type=positive_int, default=None, help="optimization steps; overrides --num_train_epochs")
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations in backward: less memory, slower")
    p.add_argument("--learning_rate", type=positive_float, default=1e-4)
    p.add_argument("--scale_lr", action="store_true", help="multiply the learning rate by batch x accumulation x processes")
    p.add_argument("--lr_scheduler", default="constant", choices=SCHEDULERS)
    p.add_argument("--lr_warmup_steps", type=non_negative_int, default=500)
    p.add_argument("--snr_gamma", type=positive_float, default=None, help="min-SNR loss weighting gamma (the paper: 10)")
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW")
    p.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    p.add_argument("--dataloader_num_workers", type=non_negative_int, default=0, help="worker processes reading images for the one-time encoding pass")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-08)
    p.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="gradient clipping norm; 0 turns it off")
    p.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction"), help="default: the checkpoint scheduler's")
    p.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="frozen weights and autocast (default: auto = fp16 on CUDA, no on CPU)")
    p.add_argument("--checkpointing_steps", type=positive_int, default=500, help="save a resumable checkpoint every N steps (default: 500)")
    p.add_argument("--checkpoints_total_limit", type=positive_int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-STEP folder, or `latest`")
    p.add_argument("--noise_offset", type=non_negative_float, default=0, help="scale of the noise offset")
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (default: 4)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by torch.distributed launchers")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    from mvp_diff.training import train
    from mvp_diff.training_inputs import class_name

    with run_lock(Path(args.output_dir) / class_name(args)):  # under accelerate launch: rank 0 only
        train(args)


if __name__ == "__main__":
    main()
