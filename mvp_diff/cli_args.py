"""argparse pieces shared by the stage scripts: a parser whose errors are one line, flag types that
check their range, and the flags several scripts share."""

import argparse

from .errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag raises UsageError (one line on stderr through `@cli`, exit 2)
    instead of printing the usage block and the error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def _checked(convert, kind, ok, bound):
    def parse(value):
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {value!r}") from None
        if not ok(number):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return number

    parse.__name__ = f"{kind} {bound}"
    return parse


positive_int = _checked(int, "an integer", lambda n: n >= 1, ">= 1")
non_negative_int = _checked(int, "an integer", lambda n: n >= 0, ">= 0")
positive_float = _checked(float, "a number", lambda x: x > 0, "> 0")
non_negative_float = _checked(float, "a number", lambda x: x >= 0, ">= 0")


def add_dataset_args(parser: argparse.ArgumentParser, classname_required=True):
    parser.add_argument("--classname", required=classname_required, help="object class, e.g. bottle")
    parser.add_argument(
        "--dataset", "--dataset_dir", dest="dataset", default="./dataset", help="dataset root in MVTec AD layout (default: ./dataset)"
    )
    parser.add_argument("--mask_suffix", default="_mask", help="ground-truth mask name is STEM + suffix + extension (default: _mask)")


STAGE1_OUTPUTS = "records (CLASS/CLASS_{train,test}.jsonl), box masks (CLASS/bbox/DEFECT/) and CLASS/bbox/boxes.json"


def add_stage1_outdir_arg(parser: argparse.ArgumentParser, flag="--outdir", what=STAGE1_OUTPUTS):
    parser.add_argument(flag, default="./script", help=f"Stage 1 output folder: {what} (default: ./script); the dataset is only read")


def add_box_args(parser: argparse.ArgumentParser):
    parser.add_argument("--min_area", type=non_negative_int, default=10, help="drop mask regions under this many pixels (default: 10)")
    parser.add_argument("--merge_gap", type=non_negative_int, default=0, help="regions fewer than this many pixels apart share a box (default: 0)")
    parser.add_argument("--margin", type=non_negative_int, default=0, help="grow every box by this many pixels, clipped to the image (default: 0)")
