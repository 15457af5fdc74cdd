"""Stage 1a: one training record (defect image, box mask, location sentence) per real anomaly.

    python location_describer.py --classname bottle --dataset ./dataset --outdir ./script

Writes OUTDIR/CLASS/CLASS_train.jsonl (first third of each defect type, by file name: the anomalies
the generator may learn from) and OUTDIR/CLASS/CLASS_test.jsonl (the rest, held out for evaluation).
Dataset paths in the records are relative to the record's `dataset_root` (absolute), the box mask
to its `bbox_root` (OUTDIR, absolute). The dataset is only read.
"""

from pathlib import Path

from mvp_diff.cli_args import ArgumentParser, add_box_args, add_dataset_args, add_stage1_outdir_arg
from mvp_diff.errors import cli
from mvp_diff.files import atomic_write_jsonl
from mvp_diff.records import build_records, load_class_boxes, records_paths
from mvp_diff.run_lock import run_lock
from mvp_diff.untrusted import flag_name


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    add_stage1_outdir_arg(parser)
    parser.add_argument("--train_fraction", type=float, default=1 / 3, help="share of each defect type that trains the generator (default: 1/3)")
    add_box_args(parser)
    return parser.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    flag_name(args.classname, "--classname")  # it names the output folder: checked before the lock creates it
    with run_lock(Path(args.outdir) / args.classname):
        run(args)


def run(args):
    class_data, boxes = load_class_boxes(args, use_saved=True)
    train, test = build_records(class_data, boxes, args.train_fraction, args.outdir)
    train_path, test_path = records_paths(args.outdir, args.classname)
    atomic_write_jsonl(train_path, train)
    atomic_write_jsonl(test_path, test)
    print(f"{len(train)} train records -> {train_path}")
    print(f"{len(test)} test records -> {test_path}")


if __name__ == "__main__":
    main()
