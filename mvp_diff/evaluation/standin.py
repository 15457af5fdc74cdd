"""A stand-in for Stage 3's output, made without a diffusion model: the real generator-train
anomalies of each defect type pasted, at their own place, onto other defect-free train images
(the field's "Crop&Paste" baseline). Same layout and manifest fields as inpainting.py writes, masks
exact, and no test-split image is touched, so it exercises the whole evaluation honestly.

    python -m mvp_diff.evaluation.standin --classname bottle --dataset ./dataset --out ./output/standin --num 20
"""

import argparse
from pathlib import Path

import numpy as np

from ..boxes import box_mask, boxes_from_mask
from ..cli_args import add_dataset_args
from ..dataset import load_class, split_anomalies
from ..errors import UsageError, cli
from ..files import is_grey, read_mask, read_rgb, save_image
from ..manifest import GeneratedSample, write_manifest
from ..progress import progress_bar
from ..prompts import describe


def build_standin(dataset, classname, out, num=10, seed=0, train_fraction=1 / 3, mask_suffix="_mask"):
    """Write `num` pasted samples per defect type under OUT/CLASS/; returns the class folder."""
    class_data = load_class(dataset, classname, mask_suffix)
    folder = Path(out) / classname
    rng = np.random.default_rng(seed)
    records = []
    for defect in class_data.defect_types:
        sources, _ = split_anomalies(class_data.anomalies[defect], train_fraction)
        for i in progress_bar(range(num), desc=f"stand-in {classname}/{defect}"):
            source = sources[i % len(sources)]
            good_path = class_data.train_good[int(rng.integers(len(class_data.train_good)))]
            good, image, mask = read_rgb(good_path), read_rgb(source.image), read_mask(source.mask)
            if good.shape != image.shape:
                continue
            out_image = good.copy()
            out_image[mask] = image[mask]
            mask &= (out_image != good).any(axis=2)
            boxes, _ = boxes_from_mask(mask, min_area=1)
            height, width = mask.shape
            sample = GeneratedSample.at(
                folder, len(records), defect, f"{i:03d}", prompt=describe(classname, defect, boxes, width, height) if boxes else None, seed=seed,
                boxes=boxes or None, good_image=str(Path(good_path).resolve()), mask_area=int(mask.sum()), mask_method="paste",
                flags=[] if mask.any() else ["empty_mask"], width=width, height=height,
            )  # fmt: skip
            image_path, mask_path, box_path = sample.files(folder)
            save_image(mask_path, mask.astype(np.uint8) * 255)
            save_image(box_path, box_mask(boxes, height, width))
            save_image(image_path, out_image[..., 0] if is_grey(good_path) else out_image)
            records.append(sample)
    write_manifest(folder, records)
    return folder


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mvp_diff.evaluation.standin", description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--out", default="./output/standin")
    parser.add_argument("--num", type=int, default=10, help="samples per defect type (default: 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    for classname in args.classname.split(","):
        folder = build_standin(args.dataset, classname.strip(), args.out, args.num, args.seed, mask_suffix=args.mask_suffix)
        print(f"stand-in generated data -> {folder}")


if __name__ == "__main__":
    main()
