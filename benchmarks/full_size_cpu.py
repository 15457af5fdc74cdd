"""The user's commands on a checkpoint shaped like the one users have, on a CPU: a full-size SD-1.5
inpainting checkpoint with random weights in the release layout (benchmarks/full_size.py), then one
Stage 2 step and one Stage 3 image at 512 px through the top-level scripts (train_diffusion.py,
random_box.py, inpainting.py --extract_mask), each in its own process with its wall time and peak
resident memory. Needs about 10 GB of memory and 10 GB of disk; minutes on a few cores.

    OMP_NUM_THREADS=2 python -m benchmarks.full_size_cpu      # appends to benchmarks/results/full_size_cpu.md
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


WORK = REPO / "benchmarks" / "_work" / "full_size_cpu"


def measured(name, args, cwd):
    """Run a script; (seconds, peak RSS in GB). Stops with its output when it fails."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"full_size_cpu.py: error: {name} failed:\n{output[-3000:]}")
    print(f"{name}: {seconds:.0f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GB", flush=True)
    return seconds, usage.ru_maxrss / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_inference_steps", type=int, default=4, help="denoising steps of the Stage 3 image (default: 4)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "full_size_cpu.md"))
    args = p.parse_args(argv)
    from mvp_diff.demo_data import build_demo_dataset

    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    dataset = build_demo_dataset(WORK / "dataset", classes=("bottle",))
    checkpoint = WORK / "sd15_inpainting_random"
    rows = [("build the checkpoint (release layout, fp32 + fp16 files)", *measured("build", [REPO / "benchmarks" / "full_size.py", checkpoint], WORK))]
    measured("stage 1", [REPO / "location_describer.py", "--classname", "bottle", "--dataset", dataset, "--outdir", WORK / "script"], WORK)
    measured("stage 1 boxes", [REPO / "boundbox.py", "--classname", "bottle", "--dataset", dataset], WORK)
    rows.append(("Stage 2: load, encode 4 records once, 1 LoRA step (batch 1, fp32), save", *measured("stage 2", [
        REPO / "train_diffusion.py", "--pretrained_model_name_or_path", checkpoint, "--train_data_dir", dataset / "bottle",
        "--train_file", WORK / "script" / "bottle" / "bottle_train.jsonl", "--train_batch_size", 1, "--gradient_accumulation_steps", 1,
        "--max_train_steps", 1, "--resolution", 512, "--learning_rate", "1e-07", "--lr_scheduler", "constant", "--seed", 0,
        "--output_dir", WORK / "output", "--prediction_type", "epsilon", "--snr_gamma", 10, "--report_to", "none",
        *(["--resume_from_checkpoint", "latest"] if (WORK / "output" / "bottle").exists() else [])], WORK)))
    measured("random boxes", [REPO / "random_box.py", "--classname", "bottle", "--dataset", dataset, "--outdir", WORK / "mask", "--num", 1], WORK)
    rows.append((f"Stage 3: load with the LoRA, 1 image at 512 px ({args.num_inference_steps} steps, guidance 3.5, fp32), precise mask, write",
                 *measured("stage 3", [REPO / "inpainting.py", "--classname", "bottle", "--dataset", dataset, "--mask_dir", WORK / "mask",
                                       "--output", WORK / "image", "--num", 1, "--checkpoint_dir", checkpoint, "--lora_dir", WORK / "output" / "bottle",
                                       "--num_inference_steps", args.num_inference_steps, "--guidance_scale", 3.5, "--extract_mask", "--overwrite"], WORK)))
    import torch

    lines = ["## Full-size checkpoint on a CPU (benchmarks/full_size_cpu.py)", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python -m benchmarks.full_size_cpu"
             f"{' --num_inference_steps ' + str(args.num_inference_steps) if args.num_inference_steps != 4 else ''}`  ",
             f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU, torch {torch.__version__}, load average {load:.1f} at start "
             f"(shared with other jobs).", "",
             "SD-1.5 inpainting architecture with random weights (UNet 859.5 M, 9 input channels; VAE 83.7 M; CLIP-L text encoder 123.1 M; "
             "safety checker 304.0 M, never loaded), saved as the release is (fp32 files and fp16 variant files, the release tokenizer "
             "files, no tokenizer.json). Each step is the top-level script in its own process; time includes starting Python and loading.", "",
             "| step | wall time (s) | peak RSS (GB) |", "| --- | --- | --- |"]
    lines += [f"| {name} | {seconds:.0f} | {rss:.2f} |" for name, seconds, rss in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
