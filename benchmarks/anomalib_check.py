"""Do anomalib's own readers load our folders? The dataset after Stage 1 and Stage 3's generated class
folder, through anomalib's `MVTecADDataset` and `FolderDataset`, every sample decoded; and anomalib's
sample lists compared with the rule the test suite applies (tests/anomalib_rule.py). The earlier
layouts (box masks inside the class folders) are loaded too, to show what failed.

Needs anomalib, which the project does not depend on; it runs in its own environment:

    python -m venv /path/anomalib-venv
    /path/anomalib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib
    /path/anomalib-venv/bin/python -m benchmarks.anomalib_check --classname bottle --dataset ./dataset \\
        --stage1_dir ./script --generated ./output/dataset/image

It imports nothing from mvp_diff (whose dependencies that environment lacks).
"""

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from tests.anomalib_rule import anomalib_mvtec_ad_samples


def defect_dirs(class_dir):
    return sorted(p for p in (class_dir / "test").iterdir() if p.is_dir() and p.name != "good")


def decode_all(dataset):
    """Every item through anomalib's __getitem__; (samples, anomalous, with mask, mask pixels > 0 in every anomalous one)."""
    anomalous = with_mask = nonempty = 0
    for i in range(len(dataset)):
        item = dataset[i]
        if int(item.gt_label):
            anomalous += 1
            if item.gt_mask is not None:
                with_mask += 1
                nonempty += int(item.gt_mask.any())
                assert tuple(item.gt_mask.shape[-2:]) == tuple(item.image.shape[-2:]), (item.image_path, item.gt_mask.shape, item.image.shape)
    return len(dataset), anomalous, with_mask, nonempty


def pairs_of(samples):
    return sorted((str(Path(r["image_path"])), str(Path(r["mask_path"])) if r["mask_path"] else None) for r in samples)


def check(name, load, rule=None):
    """One table row: what anomalib loaded, or the exception it raised; whether our rule agrees."""
    try:
        dataset = load()
        n, anomalous, masked, nonempty = decode_all(dataset)
        status = f"loads: {n} samples, {anomalous} anomalous, {masked} with a mask ({nonempty} non-empty)"
        agree = ""
        if rule is not None:
            ours = pairs_of(rule())
            theirs = sorted((str(Path(p)), str(Path(m)) if isinstance(m, str) and m else None) for p, m in zip(dataset.samples.image_path, dataset.samples.mask_path))
            agree = "same (image, mask) pairs" if ours == theirs else f"DIFFERENT: {len(ours)} vs {len(theirs)}"
    except Exception as err:  # what a user would see
        status = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
        agree = ""
        if rule is not None:
            try:
                rule()
                agree = "rule loads it: DIFFERENT"
            except Exception as rule_err:
                agree = f"rule fails too ({type(rule_err).__name__})"
    print(f"| {name} | {status} | {agree} |", flush=True)
    return status.startswith("loads")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classname", required=True)
    parser.add_argument("--dataset", required=True, help="MVTec-layout dataset root after Stage 1")
    parser.add_argument("--stage1_dir", required=True, help="Stage 1's --outdir (its CLASS/bbox/ box masks build the earlier dataset layout)")
    parser.add_argument("--generated", required=True, help="inpainting.py's --output")
    args = parser.parse_args()

    import anomalib
    from anomalib.data.datasets import FolderDataset, MVTecADDataset

    c = args.classname
    data, gen = Path(args.dataset).resolve(), Path(args.generated).resolve()
    real, made = data / c, gen / c
    print(f"anomalib {anomalib.__version__}, Python {platform.python_version()}, class {c}\n")
    print("| folder and reader | anomalib | tests/anomalib_rule.py vs anomalib |")
    print("|---|---|---|")
    ok = []
    for split in ("train", "test"):
        ok.append(check(f"dataset after Stage 1, MVTecADDataset split={split}", lambda s=split: MVTecADDataset(root=data, category=c, split=s),
                        lambda s=split: anomalib_mvtec_ad_samples(real, s)))
    ok.append(check("dataset after Stage 1, FolderDataset split=test",
                    lambda: FolderDataset(name=c, root=real, normal_dir="train/good", normal_test_dir="test/good",
                                          abnormal_dir=[f"test/{d.name}" for d in defect_dirs(real)],
                                          mask_dir=[f"ground_truth/{d.name}" for d in defect_dirs(real)], split="test")))
    ok.append(check("generated folder, MVTecADDataset split=test", lambda: MVTecADDataset(root=gen, category=c, split="test"),
                    lambda: anomalib_mvtec_ad_samples(made, "test")))
    ok.append(check("generated folder + dataset's train/good, FolderDataset split=test",
                    lambda: FolderDataset(name=c, normal_dir=real / "train" / "good", normal_test_dir=real / "test" / "good",
                                          abnormal_dir=[made / "test" / d.name for d in defect_dirs(made)],
                                          mask_dir=[made / "ground_truth" / d.name for d in defect_dirs(made)], split="test")))
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp)
        shutil.copytree(real, old / "dataset" / c)
        shutil.copytree(Path(args.stage1_dir) / c / "bbox", old / "dataset" / c / "bbox")
        check("earlier layout: dataset with CLASS/bbox/ (Stage 1 wrote there), MVTecADDataset split=test",
              lambda: MVTecADDataset(root=old / "dataset", category=c, split="test"), lambda: anomalib_mvtec_ad_samples(old / "dataset" / c, "test"))
        shutil.copytree(made, old / "generated" / c, ignore=shutil.ignore_patterns(".samples"))
        shutil.copytree(gen / f"{c}_boxes", old / "generated" / c / "bbox")
        check("earlier layout: generated CLASS/bbox/DEFECT/NNN_mask.png, MVTecADDataset split=test",
              lambda: MVTecADDataset(root=old / "generated", category=c, split="test"), lambda: anomalib_mvtec_ad_samples(old / "generated" / c, "test"))
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
