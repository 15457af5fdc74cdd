"""Stage 3a: random boxes (and their location sentences) for new defects on defect-free images.

    python random_box.py --classname bottle --dataset ./dataset --outdir ./output/dataset/mask --num 100

Writes OUTDIR/CLASS/DEFECT/NNN.png (box mask, 0/255, at the size of the sample's defect-free image),
OUTDIR/CLASS/boxes.jsonl (per sample: index, class, defect_type, good_image, box_mask, boxes, text,
seed, ...) and OUTDIR/CLASS/foreground/ (the object masks the boxes were placed on).

--num is split equally over the defect types (sorted by name; the first ones take the remainder);
with --num_per_type every defect type gets --num. Sample NNN draws its boxes from
numpy.random.default_rng([--seed, NNN]) and sits on train/good image NNN % (number of good images).
Box sizes and counts follow the real anomalies of the generator's training share (--train_fraction,
as in Stage 1), widened by --jitter; at least --min_coverage of every box lies on the object.
"""

import argparse
import sys

from mvp_diff.cli_args import add_dataset_args, add_stage1_outdir_arg
from mvp_diff.dataset import load_class
from mvp_diff.errors import UsageError, cli
from mvp_diff.random_boxes import boxes_path, check_defect_types, split_num, write_box_files
from mvp_diff.run_lock import run_lock
from mvp_diff.untrusted import flag_name


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--outdir", default="./output/dataset/mask", help="where CLASS/ box masks and boxes.jsonl go (default: ./output/dataset/mask)")
    parser.add_argument("--num", type=int, default=100, help="number of samples, split equally over defect types (default: 100)")
    parser.add_argument("--num_per_type", action="store_true", help="--num samples for every defect type instead")
    parser.add_argument("--defect_types", nargs="+", default=None, help="only these defect types (default: all with masks)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same boxes (default: 0)")
    parser.add_argument("--jitter", type=float, default=0.5, help="each box side is scaled by a factor in [1/(1+J), 1+J], log-uniform (default: 0.5)")
    parser.add_argument("--min_coverage", type=float, default=0.9, help="least share of a box's area on the object (default: 0.9)")
    add_stage1_outdir_arg(parser, "--stage1_dir", "boundbox.py's CLASS/bbox/boxes.json is read from here when it exists")
    parser.add_argument("--train_fraction", type=float, default=1 / 3, help="share of each defect type whose boxes are the model (default: 1/3, as in Stage 1; 1 = all)")
    args = parser.parse_args(argv)
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.jitter < 0:
        raise UsageError(f"--jitter must be >= 0, got {args.jitter}")
    if not 0 <= args.min_coverage <= 1:
        raise UsageError(f"--min_coverage must be in [0, 1], got {args.min_coverage}")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    flag_name(args.classname, "--classname")  # it names the output folder: checked before the lock creates it
    with run_lock(boxes_path(args.outdir, args.classname).parent):
        run(args)


def run(args):
    class_data = load_class(args.dataset, args.classname, args.mask_suffix)
    defect_types = check_defect_types(args.defect_types, class_data.defect_types)
    counts = split_num(args.num, defect_types, args.num_per_type)
    counts = {d: n for d, n in counts.items() if n > 0}
    records, texture = write_box_files(args.outdir, class_data, counts, args.seed, args.jitter, args.min_coverage, args.train_fraction, args.stage1_dir)
    folder = boxes_path(args.outdir, args.classname).parent
    low = [r for r in records if min(r["fg_coverage"]) < args.min_coverage]
    if low:
        print(f"{len(low)} sample(s) have a box with less than {args.min_coverage:.0%} on the object (no room for it), e.g. #{low[0]['index']}", file=sys.stderr)
    kind = "texture: whole image" if texture else "object"
    summary = ", ".join(f"{d} {n}" for d, n in counts.items())
    print(f"{len(records)} samples ({summary}; foreground: {kind}) -> {folder}/ and {boxes_path(args.outdir, args.classname)}")


if __name__ == "__main__":
    main()
