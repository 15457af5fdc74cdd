"""Stage 1b: ground-truth masks -> filled bounding-box masks.

    python boundbox.py --classname bottle --dataset ./dataset

Writes OUTDIR/CLASS/bbox/DEFECT/STEM_mask.png (0/255, the size of the mask) and
OUTDIR/CLASS/bbox/boxes.json (--outdir, default ./script: beside the Stage 1 records). One box per
8-connected region; see --min_area, --merge_gap, --margin. The dataset is only read.
"""

import sys
from pathlib import Path

from mvp_diff.cli_args import ArgumentParser, add_box_args, add_dataset_args, add_stage1_outdir_arg
from mvp_diff.errors import cli
from mvp_diff.records import BoxParams, bbox_dir, load_class_boxes, write_box_masks
from mvp_diff.run_lock import run_lock
from mvp_diff.untrusted import flag_name


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    add_stage1_outdir_arg(parser)
    add_box_args(parser)
    return parser.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    flag_name(args.classname, "--classname")  # it names the output folder: checked before the lock creates it
    with run_lock(Path(args.outdir) / args.classname):  # the Stage 1 folder, shared with location_describer.py
        run(args)


def run(args):
    class_data, boxes = load_class_boxes(args)
    for key, found in boxes.items():
        if not found:
            print(f"{key}: no region left after --min_area {args.min_area}; no box mask written", file=sys.stderr)
    path = write_box_masks(class_data, boxes, BoxParams(args.min_area, args.merge_gap, args.margin), args.outdir)
    n = sum(len(b) for b in boxes.values())
    print(f"{n} boxes of {len(boxes)} anomalies -> {bbox_dir(args.outdir, args.classname)}/ and {path}")


if __name__ == "__main__":
    main()
