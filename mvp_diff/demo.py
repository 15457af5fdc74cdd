"""The whole pipeline on the embedded default: a generated MVTec-layout dataset and a tiny random
SD-inpainting checkpoint, no downloads, minutes on a CPU.

    python -m mvp_diff.demo                 # everything (stages 1-3 and the evaluation), into ./demo
    python -m mvp_diff.demo --stages 1      # dataset, checkpoint and Stage 1 only

Inside the work folder it lays out what the README expects (dataset/, checkpoints/inpainting/,
script/, output/) and runs the README's commands there, as written, with a few flags added to keep
the run small (resolution, steps, counts).
"""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .cli_args import ArgumentParser, non_negative_int, positive_int
from .demo_checkpoint import build_tiny_inpainting_checkpoint
from .demo_data import DEMO_CLASSES, build_demo_dataset
from .errors import UsageError, UserError, cli
from .training_inputs import seed_training_args

REPO = Path(__file__).resolve().parents[1]


def stage_commands(classname, args):
    """{stage number: [argv, ...]}: the README's commands plus the demo's size flags."""
    c = classname
    return {
        1: [
            ["location_describer.py", "--classname", c, "--dataset", "./dataset", "--outdir", "./script"],
            ["boundbox.py", "--classname", c, "--dataset", "./dataset"],
        ],
        2: [
            ["train_diffusion.py", *seed_training_args(c),
             # demo size: a short run at low resolution
             "--resolution", str(args.resolution), "--max_train_steps", str(args.max_train_steps)],
        ],
        3: [
            ["random_box.py", "--classname", c, "--dataset", "./dataset", "--outdir", "./output/dataset/mask", "--num", str(args.num)],
            ["inpainting.py", "--classname", c, "--dataset", "./dataset", "--output", "./output/dataset/image", "--num", str(args.num),
             "--num_inference_steps", "20", "--guidance_scale", "3.5", "--extract_mask",
             "--resolution", str(args.resolution)],
        ],
        4: [
            # Downstream segmentation and the gallery; IS and IC-LPIPS need pretrained weights (README).
            ["evaluate.py", "--classname", c, "--dataset", "./dataset", "--generated", "./output/dataset/image",
             "--out", f"./output/evaluation/{c}", "--parts", "segmentation,gallery",
             "--image_size", "64", "--base_channels", "8", "--epochs", str(args.eval_epochs), "--learning_rate", "1e-3"],
        ],
    }


def run(argv, cwd):
    cmd = [sys.executable, str(REPO / argv[0]), *argv[1:]]
    print(f"\n$ python {shlex.join(argv)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # the tiny model gains nothing from more threads
    started = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise UserError(f"demo stopped: `python {shlex.join(argv)}` exited with {proc.returncode} (run in {cwd})")
    print(f"  ({time.time() - started:.1f} s)", flush=True)


def parse_args(argv=None):
    parser = ArgumentParser(description="Run MvP-Diff end to end on a generated dataset and a tiny checkpoint.")
    parser.add_argument("--workdir", default="./demo", help="where dataset/, checkpoints/, script/, output/ go (default: ./demo)")
    parser.add_argument("--classes", nargs="+", default=list(DEMO_CLASSES), help=f"demo classes (default: {' '.join(DEMO_CLASSES)})")
    parser.add_argument("--stages", default="1,2,3,4", help="comma-separated stages to run; 4 = evaluation (default: 1,2,3,4)")
    parser.add_argument("--resolution", type=positive_int, default=128, help="training and generation resolution (default: 128)")
    parser.add_argument("--max_train_steps", type=positive_int, default=10, help="Stage 2 steps per class (default: 10)")
    parser.add_argument("--num", type=positive_int, default=8, help="synthetic samples per class (default: 8)")
    parser.add_argument("--eval_epochs", type=positive_int, default=20, help="epochs of the downstream segmentation models (default: 20)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the generated dataset and checkpoint (default: 0)")
    return parser.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    unknown = sorted(set(args.classes) - set(DEMO_CLASSES))
    if unknown:
        raise UsageError(f"--classes: unknown demo class {unknown[0]!r}; choose from {', '.join(DEMO_CLASSES)}")
    try:
        stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        stages = [0]
    if not stages or not set(stages) <= {1, 2, 3, 4}:
        raise UsageError(f"--stages must list stages among 1,2,3,4, got {args.stages!r}")
    work = Path(args.workdir).resolve()
    started = time.time()
    print(f"demo dataset -> {work / 'dataset'}", flush=True)
    build_demo_dataset(work / "dataset", seed=args.seed)
    checkpoint = work / "checkpoints" / "inpainting"
    if not (checkpoint / "model_index.json").is_file():
        print(f"tiny SD-inpainting checkpoint -> {checkpoint}", flush=True)
        build_tiny_inpainting_checkpoint(checkpoint, seed=args.seed)
    for classname in args.classes:
        commands = stage_commands(classname, args)
        for stage in stages:
            for argv in commands[stage]:
                run(argv, work)

    print(f"\ndemo finished in {time.time() - started:.0f} s. Everything is under {work}:")
    print(f"  dataset (MVTec layout)       {work / 'dataset'}")
    print(f"  tiny checkpoint              {checkpoint}")
    print(f"  Stage 1 records              {work / 'script'}/CLASS/CLASS_{{train,test}}.jsonl, box masks CLASS/bbox/ (the dataset is only read)")
    if 2 in stages:
        print(f"  Stage 2 LoRA and checkpoints {work / 'output'}/CLASS/")
    if 3 in stages:
        print(f"  Stage 3 random boxes         {work / 'output/dataset/mask'}/CLASS/")
        for classname in args.classes:
            print(f"  {'synthetic ' + classname + ' defects':<29}{work / 'output/dataset/image' / classname}"
                  "  (test/DEFECT/NNN.png, ground_truth/DEFECT/NNN_mask.png, manifest.jsonl, coco.json;"
                  f" box masks in {classname}_boxes/)")
    if 4 in stages:
        for classname in args.classes:
            report = work / "output" / "evaluation" / classname
            print(f"  {'evaluation of ' + classname:<29}{report / 'report.md'}, {report / 'gallery.html'}")


if __name__ == "__main__":
    main()
