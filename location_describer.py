"""Stage 1a: one training record (defect image, box mask, location sentence) per real anomaly.

    python location_describer.py --classname bottle --dataset ./dataset --outdir ./script

Writes OUTDIR/CLASS/CLASS_train.jsonl (first third of each defect type, by file name: the anomalies
the generator may learn from) and OUTDIR/CLASS/CLASS_test.jsonl (the rest, held out for evaluation).
Paths in the records are relative to the record's `dataset_root` (absolute).
"""

import argparse
import sys

from mvp_diff.cli_args import add_box_args, add_dataset_args
from mvp_diff.dataset import load_class
from mvp_diff.errors import cli
from mvp_diff.files import atomic_write_jsonl
from mvp_diff.records import BoxParams, build_records, compute_boxes, load_saved_boxes, records_paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--outdir", default="./script", help="where CLASS/CLASS_{train,test}.jsonl go (default: ./script)")
    parser.add_argument("--train_fraction", type=float, default=1 / 3, help="share of each defect type that trains the generator (default: 1/3)")
    add_box_args(parser)
    return parser.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    class_data = load_class(args.dataset, args.classname, args.mask_suffix)
    for anomaly in class_data.empty_masks:
        print(f"skipped {anomaly.image}: its mask {anomaly.mask} is empty", file=sys.stderr)
    # Boxes from boundbox.py when it has run (so both stages agree), else computed the same way.
    boxes = load_saved_boxes(class_data)
    if boxes is None:
        boxes, notes = compute_boxes(class_data, BoxParams(args.min_area, args.merge_gap, args.margin))
        for anomaly, dropped in notes:
            print(f"{anomaly.mask}: dropped {dropped} region(s) under {args.min_area} px", file=sys.stderr)
    train, test = build_records(class_data, boxes, args.train_fraction)
    train_path, test_path = records_paths(args.outdir, args.classname)
    atomic_write_jsonl(train_path, train)
    atomic_write_jsonl(test_path, test)
    print(f"{len(train)} train records -> {train_path}")
    print(f"{len(test)} test records -> {test_path}")


if __name__ == "__main__":
    main()
