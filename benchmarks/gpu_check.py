"""The GPU check behind benchmarks/gpu_check.sh: on one CUDA machine, with nothing downloaded, build a
full-size SD-1.5 inpainting checkpoint with random weights in the release layout, then

  tests       run the test suite on CUDA;
  train_step  time the Stage 2 LoRA step at 512 px, batch 6, fp16 (gradient scaler), with and without
              gradient checkpointing, cached latents against re-encoding every step, with the peak GPU
              memory of each (benchmarks/train_step.py);
  multi_gpu   20 steps of `sh train_diffusion.sh` with 2 processes (when 2 GPUs exist);
  generation  Stage 3 (synthesize, as inpainting.py runs it, with --extract_mask and writing) at
              512 px, 20 steps, guidance 3.5, fp16, batch 1/4/8, against one pipeline call per image
              with each sample finished in turn (the original loop);

and write every figure with the GPU's name and the library versions to benchmarks/results/gpu.md
(rewritten after each part, so a stopped run keeps what it measured).

    sh benchmarks/gpu_check.sh                                  # all parts, under 8 minutes on one H100
    sh benchmarks/gpu_check.sh --parts train_step,generation
"""

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mvp_diff.cli_args import ArgumentParser, positive_int
from mvp_diff.errors import UsageError, UserError, cli

REPO = Path(__file__).resolve().parents[1]

PARTS = ("tests", "train_step", "multi_gpu", "generation")
WORK = REPO / "benchmarks" / "_work" / "gpu"
GOAL_MEMORY_GB = 12  # the seed settings (batch 6, fp16, no gradient checkpointing) fit a 12 GB GPU
GOAL_CACHE_SPEEDUP = 2.0
GOAL_BATCH_SPEEDUP = 5.0
GOAL_IMAGES_PER_S = 8.0  # on an H100/H200-class GPU


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default: {','.join(PARTS)})")
    p.add_argument("--num", type=positive_int, default=48, help="Stage 3 samples per timing (default: 48)")
    p.add_argument("--batch_sizes", type=positive_int, nargs="+", default=[1, 4, 8], help="Stage 3 batch sizes (default: 1 4 8)")
    p.add_argument("--train_steps", type=positive_int, default=5, help="LoRA steps per timing of the train_step part (default: 5)")
    p.add_argument("--test_timeout", type=positive_int, default=300, help="seconds the test suite may take (default: 300)")
    p.add_argument("--work", default=str(WORK), help=f"scratch folder: checkpoint, data, outputs (default: {WORK.relative_to(REPO)})")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.md"), help="results file (default: benchmarks/results/gpu.md)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        raise UsageError(f"--parts {args.parts!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if args.num < max(args.batch_sizes):
        raise UsageError(f"--num {args.num} and --batch_sizes {args.batch_sizes}: batch sizes must be >= 1 and at most --num")
    args.parts = parts
    return args


def versions():
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "CUDA": torch.version.cuda, "cuDNN": torch.backends.cudnn.version(),
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__}


def run(cmd, timeout, env=None, cwd=REPO):
    """(exit code, seconds, output tail) of a command; a timeout is exit code 124."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    return code, time.perf_counter() - start, output[-4000:]


def part_tests(args, results):
    code, seconds, output = run([sys.executable, "-m", "pytest", "-q", "-x", "tests"], args.test_timeout)
    summary = [line for line in output.splitlines() if " passed" in line or " failed" in line or " error" in line]
    results["tests"] = dict(exit_code=code, seconds=seconds, summary=summary[-1] if summary else output.strip().splitlines()[-1:])


def part_train_step(args, results):
    from benchmarks.train_step import main as train_step

    rows = []
    for checkpointing in (False, True):
        argv = ["--models", "full", "--device", "cuda", "--mixed_precision", "fp16", "--batch_size", "6", "--resolution", "512",
                "--steps", str(args.train_steps), "--repeats", "2"] + (["--gradient_checkpointing"] if checkpointing else [])
        r = train_step(argv)[0]
        rows.append(dict(gradient_checkpointing=checkpointing, **r))
        import torch

        torch.cuda.empty_cache()
    results["train_step"] = rows


def stage1(work):
    """The demo dataset and its Stage 1 records under `work` (for the 2-process training)."""
    from mvp_diff.demo_data import build_demo_dataset

    build_demo_dataset(work / "dataset", classes=("bottle",))
    for script in (["location_describer.py", "--outdir", str(work / "script")], ["boundbox.py"]):
        code, _, output = run([sys.executable, str(REPO / script[0]), "--classname", "bottle", "--dataset", str(work / "dataset"), *script[1:]], 300)
        if code:
            raise RuntimeError(f"{script[0]} failed: {output.strip().splitlines()[-1:]}")


def part_multi_gpu(args, results, checkpoint):
    import torch

    work = Path(args.work)
    if torch.cuda.device_count() < 2:
        results["multi_gpu"] = dict(skipped=f"{torch.cuda.device_count()} GPU on this machine; 2-process training needs 2")
        return
    stage1(work)
    out = work / "train_2gpu"
    env = dict(NUM_GPUS="2", MODEL_NAME=str(checkpoint), DATASET=str(work / "dataset"), SCRIPT_DIR=str(work / "script"), OUTPUT_DIR=str(out),
               PYTHON=sys.executable, ACCELERATE=f"{shlex.quote(sys.executable)} -m accelerate.commands.launch")
    command = ["sh", str(REPO / "train_diffusion.sh"), "--max_train_steps", "20", "--report_to", "none"]
    if (out / "bottle").exists():
        command += ["--resume_from_checkpoint", "latest"]  # a rerun: the script refuses to silently start over
    code, seconds, output = run(command, 600, env)
    loss_csv = out / "bottle" / "logs" / "loss.csv"
    steps = len(loss_csv.read_text().splitlines()) - 1 if loss_csv.is_file() else 0
    results["multi_gpu"] = dict(exit_code=code, seconds=seconds, steps=steps, command="NUM_GPUS=2 " + shlex.join(command[:2] + command[2:4]),
                                validation=sorted(p.name for p in (out / "bottle" / "validation").glob("*.png")),
                                error=None if code == 0 else output.strip().splitlines()[-1:])


def part_generation(args, results, checkpoint):
    import torch

    import random_box
    from benchmarks.generate import large_dataset
    from mvp_diff.synthesis import WRITE_WORKERS, Settings, load_pipeline, synthesize

    work = Path(args.work)
    dataset = large_dataset(900)  # MVTec bottle's size
    mask_dir = work / "boxes"
    random_box.main(["--classname", "bottle", "--dataset", str(dataset), "--outdir", str(mask_dir), "--num", str(args.num)])
    device = torch.device("cuda")
    pipe = load_pipeline(checkpoint, device, torch.float16)

    def timed(batch_size, write_workers, num=args.num, name=None):
        settings = Settings(checkpoint=str(checkpoint), lora=None, num_inference_steps=20, guidance_scale=3.5, resolution=512,
                            extract_mask=True, batch_size=batch_size)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        synthesize("bottle", dataset, mask_dir, work / (name or f"stage3_b{batch_size}_w{write_workers}"), settings, num=num, device="cuda",
                   dtype="fp16", overwrite=True, write_workers=write_workers, pipe=pipe)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return dict(batch_size=batch_size, write_workers=write_workers, seconds=seconds, images_per_s=num / seconds,
                    peak_gib=torch.cuda.max_memory_allocated() / 2**30)

    timed(max(args.batch_sizes), WRITE_WORKERS, num=max(args.batch_sizes), name="stage3_warmup")  # kernels, allocator
    baseline = timed(1, 0)
    rows = [timed(b, WRITE_WORKERS) for b in args.batch_sizes]
    results["generation"] = dict(num=args.num, baseline=baseline, rows=rows)


def report(results, args):
    r = results
    lines = ["## GPU check (benchmarks/gpu_check.sh)", "",
             f"Command: `sh benchmarks/gpu_check.sh{' ' + shlex.join(sys.argv[1:]) if sys.argv[1:] else ''}`  ",
             f"Date: {r['date']}  ",
             f"GPU: {r['gpu']} x{r['gpu_count']}, {r['gpu_memory_gib']:.0f} GiB; CPU cores: {os.cpu_count()}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    c = r.get("checkpoint")
    if c:
        lines += [f"Checkpoint: full-size SD-1.5 inpainting, random weights, release layout (fp32 and fp16 variant files), built in {c['seconds']:.0f} s: "
                  + ", ".join(f"{k} {v:.1f} M" for k, v in c["parameters"].items()) + " parameters.", ""]
    t = r.get("tests")
    if t:
        lines += ["### Test suite on CUDA", "", f"`python -m pytest -q -x tests`: exit code {t['exit_code']}, {t['seconds']:.0f} s: {t['summary']}", ""]
    rows = r.get("train_step")
    if rows:
        lines += ["### Stage 2 LoRA step, 512 px, batch 6, fp16 with gradient scaler (`benchmarks/train_step.py --models full`)", "",
                  "All three models resident as in training; peak = torch.cuda.max_memory_allocated during the timed steps.", "",
                  "| gradient checkpointing | cached latents: s/step | img/s | peak GiB | re-encoding every step: s/step | img/s | peak GiB | cached speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in rows:
            lines.append(f"| {'on' if x['gradient_checkpointing'] else 'off'} | {x['cached']:.3f} | {6 / x['cached']:.1f} | {x['cached_peak_gib']:.2f} | "
                         f"{x['reencode']:.3f} | {6 / x['reencode']:.1f} | {x['reencode_peak_gib']:.2f} | x{x['reencode'] / x['cached']:.2f} |")
        seed = rows[0]
        fits = seed["cached_peak_gib"] * 2**30 <= GOAL_MEMORY_GB * 1e9
        lines += ["", f"Goal: the seed settings (no gradient checkpointing, cached) fit {GOAL_MEMORY_GB} GB: {seed['cached_peak_gib'] * 2**30 / 1e9:.1f} GB, "
                  f"{'met' if fits else 'NOT met'}. Goal: cached step >= {GOAL_CACHE_SPEEDUP:.0f}x re-encoding: x{seed['reencode'] / seed['cached']:.2f}, "
                  f"{'met' if seed['reencode'] / seed['cached'] >= GOAL_CACHE_SPEEDUP else 'NOT met'}.", ""]
    m = r.get("multi_gpu")
    if m:
        lines += ["### 2-process training (`NUM_GPUS=2 sh train_diffusion.sh --max_train_steps 20`)", ""]
        if "skipped" in m:
            lines.append(f"Skipped: {m['skipped']}.")
        else:
            lines.append(f"Exit code {m['exit_code']}, {m['steps']} steps logged, {m['seconds']:.0f} s in all (loading, encoding, validation "
                         f"{', '.join(m['validation']) or 'none'} included)" + (f"; error: {m['error']}" if m["error"] else "") + ".")
        lines.append("")
    g = r.get("generation")
    if g:
        b = g["baseline"]
        lines += [f"### Stage 3, {g['num']} samples, 512 px, 20 steps, guidance 3.5, fp16, `--extract_mask`, images 900 px", "",
                  "Whole `synthesize` runs as inpainting.py makes them (paste-back, precise masks, three PNGs and the entry per sample, "
                  "manifest), pipeline loaded once beforehand.", "",
                  "| run | batch | writer threads | s | img/s | peak GiB | speed-up |", "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| one pipeline call per image, samples finished in turn (original loop) | 1 | 0 | {b['seconds']:.1f} | {b['images_per_s']:.2f} | {b['peak_gib']:.1f} | x1.00 |"]
        for x in g["rows"]:
            lines.append(f"| MvP-Diff | {x['batch_size']} | {x['write_workers']} | {x['seconds']:.1f} | {x['images_per_s']:.2f} | {x['peak_gib']:.1f} | "
                         f"x{x['images_per_s'] / b['images_per_s']:.2f} |")
        best = max(g["rows"], key=lambda x: x["images_per_s"])
        ratio = best["images_per_s"] / b["images_per_s"]
        lines += ["", f"Goals: >= {GOAL_BATCH_SPEEDUP:.0f}x the original loop: x{ratio:.2f}, {'met' if ratio >= GOAL_BATCH_SPEEDUP else 'NOT met'}; "
                  f">= {GOAL_IMAGES_PER_S:.0f} img/s on an H100/H200-class GPU: {best['images_per_s']:.2f}, "
                  f"{'met' if best['images_per_s'] >= GOAL_IMAGES_PER_S else 'NOT met'}.", ""]
    for part, error in r.get("errors", {}).items():
        lines.append(f"Part {part} failed: {error}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (Path(args.work) / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


@cli
def main(argv=None):
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA device found: benchmarks/gpu_check.sh measures the GPU path and needs one (CPU figures: benchmarks/RESULTS.md)")
    from benchmarks.full_size import COMPLETE, build_release_checkpoint

    Path(args.work).mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), gpu=props.name, gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=props.total_memory / 2**30, versions=versions(), errors={})
    start = time.perf_counter()
    checkpoint = build_release_checkpoint(Path(args.work) / "sd15_inpainting_random")
    results["checkpoint"] = dict(seconds=time.perf_counter() - start, parameters=json.loads((checkpoint / COMPLETE).read_text()))
    print(f"checkpoint: {checkpoint} ({results['checkpoint']['seconds']:.0f} s)", flush=True)
    report(results, args)
    for part in args.parts:
        print(f"--- {part}", flush=True)
        start = time.perf_counter()
        try:
            if part == "tests":
                part_tests(args, results)
            elif part == "train_step":
                part_train_step(args, results)
            elif part == "multi_gpu":
                part_multi_gpu(args, results, checkpoint)
            else:
                part_generation(args, results, checkpoint)
        except (Exception, SystemExit) as err:  # one part failing must not lose the others' figures
            results["errors"][part] = f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"{part} failed: {results['errors'][part]}", file=sys.stderr, flush=True)
        print(f"{part}: {time.perf_counter() - start:.0f} s", flush=True)
        report(results, args)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
