"""argparse pieces shared by the stage scripts."""

import argparse


def add_dataset_args(parser: argparse.ArgumentParser, classname_required=True):
    parser.add_argument("--classname", required=classname_required, help="object class, e.g. bottle")
    parser.add_argument(
        "--dataset", "--dataset_dir", dest="dataset", default="./dataset", help="dataset root in MVTec AD layout (default: ./dataset)"
    )
    parser.add_argument("--mask_suffix", default="_mask", help="ground-truth mask name is STEM + suffix + extension (default: _mask)")


def add_stage1_outdir_arg(parser: argparse.ArgumentParser, flag="--outdir", what="records (CLASS/CLASS_{train,test}.jsonl), box masks (CLASS/bbox/DEFECT/) and CLASS/bbox/boxes.json"):
    parser.add_argument(flag, default="./script", help=f"Stage 1 output folder: {what} (default: ./script); the dataset is only read")


def add_box_args(parser: argparse.ArgumentParser):
    parser.add_argument("--min_area", type=non_negative_int("--min_area"), default=10, help="drop mask regions under this many pixels (default: 10)")
    parser.add_argument("--merge_gap", type=non_negative_int("--merge_gap"), default=0, help="regions fewer than this many pixels apart share a box (default: 0)")
    parser.add_argument("--margin", type=non_negative_int("--margin"), default=0, help="grow every box by this many pixels, clipped to the image (default: 0)")


def non_negative_int(flag):
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {value!r}")
        if number < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 0, got {number}")
        return number

    return parse
