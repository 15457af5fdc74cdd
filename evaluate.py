"""Evaluate synthetic anomaly data under a named protocol: IS and IC-LPIPS of the generated images,
and what a downstream segmentation model reaches with them.

    python evaluate.py --classname bottle --dataset ./dataset --generated ./output/dataset/image --out ./output/evaluation
    python evaluate.py --protocol anomalydiffusion --classname all --dataset ./dataset \
        --generated ours=./output/dataset/image --generated anomalydiffusion=./anomalydiffusion_data

--generated is Stage 3's output (GENERATED/CLASS/test/DEFECT/NNN.png with ground_truth/DEFECT/
NNN_mask.png, the box masks beside it in GENERATED/CLASS_boxes/DEFECT/NNN_mask.png), any MVTec-layout folder of images and masks,
or AnomalyDiffusion's released layout (CLASS/DEFECT/image/N.jpg with CLASS/DEFECT/mask/N.jpg); give it
several times as NAME=PATH to compare generators side by side under one protocol.

--protocol mvpdiff (ours): split ceil(n/3) as Stage 1; (a) real train-split anomalies, (b) (a) +
generated pairs with their precise masks, (c) (a) + the same images with box masks, (d) (a) +
DRAEM-style synthetic anomalies; epoch selected on a validation split of the training side.
--protocol anomalydiffusion: split floor(n/3); generated pairs only (at most 500 per type) + train/good,
DRAEM's U-Net and budget; last epoch, and beside it the peer's test-set-selected epoch, labelled.
--protocol seas: split floor(n/3); generated + real generator-train anomalies; fixed last epoch;
per-image IoU. Every model is tested on the held-out real anomalies plus test/good.

Writes OUT/report.md, OUT/metrics.json, OUT/plot.png and OUT/gallery.html. Finished parts are cached
under OUT/work/, so a rerun only redoes what changed. IS and IC-LPIPS need the pretrained Inception,
AlexNet and VGG16 weights, defect-type accuracy the ResNet-34 weights, in the torch hub cache:
fetched there on first use, as torchvision and torch-fidelity do; with HF_HUB_OFFLINE=1 or
--local_files_only nothing is fetched.
"""

import argparse
import shlex
import sys

import torch

from mvp_diff.cli_args import ArgumentParser, add_dataset_args, non_negative_int, positive_float, positive_int
from mvp_diff.errors import UsageError, cli
from mvp_diff.evaluation.data import dataset_classes
from mvp_diff.evaluation.pipeline import DOWNSTREAM_SETTINGS, PARTS, EvalConfig, evaluate, train_config
from mvp_diff.evaluation.protocols import PROTOCOLS
from mvp_diff.evaluation.report import write_report
from mvp_diff.extras import require_extra
from mvp_diff.run_lock import run_lock
from mvp_diff.untrusted import flag_name


def csv_list(choices, flag):
    def parse(value):
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{flag}: unknown {', '.join(bad) or 'empty list'}; choose from {','.join(choices)}")
        return items

    return parse


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_dataset_args(parser)
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="mvpdiff", help="mvpdiff (ours, default), anomalydiffusion or seas")
    parser.add_argument("--generated", action="append", default=None, metavar="[NAME=]PATH",
                        help="generated data root (Stage 3's --output); repeat as NAME=PATH for several generators")  # fmt: skip
    parser.add_argument("--out", default="./output/evaluation", help="report folder (default: ./output/evaluation)")
    parser.add_argument("--parts", type=csv_list(PARTS, "--parts"), default=list(PARTS), help=f"comma list of {','.join(PARTS)} (default: all)")
    parser.add_argument("--settings", type=csv_list(tuple(DOWNSTREAM_SETTINGS), "--settings"), default=None, help="downstream settings to run, comma list (default: the protocol's)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--train_fraction", type=float, default=1 / 3, help="share of each defect type that may train the generator (default: 1/3)")
    parser.add_argument("--val_fraction", type=float, default=0.25, help="share of the training side held out for model selection (default: 0.25)")
    seg = parser.add_argument_group("downstream segmentation")
    seg.add_argument("--image_size", type=positive_int, default=None, help="model input and metric resolution, a multiple of 32 (default: the protocol's, 256)")
    seg.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the protocol's; mvpdiff 100, one epoch shows every train/good image once)")
    seg.add_argument("--batch_size", type=positive_int, default=8, help="half defect-free, half anomaly pairs (default: 8)")
    seg.add_argument("--base_channels", type=positive_int, default=None, help="U-Net width (default: the protocol's; DRAEM: 64)")
    seg.add_argument("--learning_rate", type=positive_float, default=1e-4)
    seg.add_argument("--val_every", type=positive_int, default=1, help="validate every N epochs (default: 1)")
    seg.add_argument("--num_workers", type=non_negative_int, default=0, help="data loader workers and image loading threads (default: 0)")
    seg.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="bf16", help="training autocast on CUDA (default: bf16; ignored on CPU)")
    seg.add_argument("--predict_mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                     help="autocast of test-time inference on CUDA (default: no, float32 scores; half precision collapses distinct scores)")
    seg.add_argument("--draem_num", type=positive_int, default=None, help="DRAEM-style samples for (d) (default: as many as the usable generated pairs, else 200)")
    seg.add_argument("--anomaly_source_path", default=None, help="texture folder for (d), e.g. DTD (default: the class's train/good images)")
    qual = parser.add_argument_group("generation quality")
    qual.add_argument("--isc_splits", type=positive_int, default=10, help="Inception Score splits (default: 10; fewer under 10 images per split)")
    qual.add_argument("--local_files_only", action="store_true", help="never download pretrained weights (as HF_HUB_OFFLINE=1 does)")
    qual.add_argument("--inception_weights", default=None, help="torch-fidelity Inception weights file (default: the torch hub cache)")
    qual.add_argument("--lpips_size", type=positive_int, default=256, help="images are resized to this for LPIPS (default: 256)")
    qual.add_argument("--lpips_net", choices=["auto", "alex", "vgg"], default="auto", help="auto: each IC-LPIPS variant's own (Ojha et al. vgg, DFMGAN alex, SeaS vgg)")
    qual.add_argument("--ic_cluster_size", type=positive_int, default=50, help="IC-LPIPS (Ojha et al.): random members per cluster (default: 50)")
    qual.add_argument("--ic_cluster_cap", type=positive_int, default=200, help="IC-LPIPS (DFMGAN): members kept per cluster (default: 200)")
    qual.add_argument("--classify_epochs", type=positive_int, default=30, help="defect-type classifier epochs (AnomalyDiffusion: 30)")
    qual.add_argument("--gallery_n", type=non_negative_int, default=12, help="samples per class in gallery.html (default: 12)")
    # Test suite only: untrained networks for IS/IC-LPIPS (the report is marked); never for real numbers.
    parser.add_argument("--random_weights_for_testing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def generators(values):
    """{name: path} from --generated values PATH or NAME=PATH (an unnamed one is "ours")."""
    named = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name, path = (name.strip(), path) if sep and name.strip() and "/" not in name else ("ours", value)
        if name in named:
            raise UsageError(f"--generated {value}: the name {name!r} is given twice; write NAME=PATH with distinct names")
        flag_name(name, f"--generated {value}: NAME")  # it names report columns and cache folders
        named[name] = path
    return named


def classnames(args):
    if args.classname.strip() == "all":
        return dataset_classes(args.dataset)
    return [c.strip() for c in args.classname.split(",") if c.strip()]


def check_args(args):
    if args.lpips_size < 64:
        raise UsageError(f"--lpips_size must be >= 64 (the LPIPS networks pool it down), got {args.lpips_size}")
    if not [c for c in args.classname.split(",") if c.strip()]:
        raise UsageError("--classname: no class given")
    if args.image_size and args.image_size % 32:
        raise UsageError(f"--image_size must be a multiple of 32 (the U-Net pools five times), got {args.image_size}")
    if args.batch_size < 2 or args.batch_size % 2:
        raise UsageError(f"--batch_size must be even and >= 2 (half good, half anomalies), got {args.batch_size}")
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    allowed = PROTOCOLS[args.protocol].settings
    if args.settings and set(args.settings) - set(allowed):
        raise UsageError(f"--settings: protocol {args.protocol} runs {','.join(allowed)}, not {','.join(sorted(set(args.settings) - set(allowed)))}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


@cli
def main(argv=None):
    args = parse_args(argv)
    device = check_args(args)
    with run_lock(args.out):
        run(args, device, argv)


def run(args, device, argv=None):
    if "quality" in args.parts:
        require_extra("eval", "--parts quality (IS, IC-LPIPS)", "pass --parts segmentation,gallery")
    protocol, overrides = PROTOCOLS[args.protocol].with_budget(epochs=args.epochs, image_size=args.image_size, base_channels=args.base_channels)
    train = train_config(
        protocol, batch_size=args.batch_size, lr=args.learning_rate, val_every=args.val_every, num_workers=args.num_workers,
        mixed_precision=args.mixed_precision, predict_mixed_precision=args.predict_mixed_precision, device=device, seed=args.seed,
    )  # fmt: skip
    cfg = EvalConfig(
        classnames=classnames(args), protocol=protocol, overrides=overrides,
        dataset=args.dataset, generated=generators(args.generated), out=args.out, mask_suffix=args.mask_suffix,
        parts=tuple(args.parts), settings=tuple(args.settings or protocol.settings), seed=args.seed, device=device,
        train_fraction=args.train_fraction, val_fraction=args.val_fraction, train=train,
        draem_num=args.draem_num, anomaly_source_path=args.anomaly_source_path, isc_splits=args.isc_splits,
        inception_weights=args.inception_weights, lpips_size=args.lpips_size, lpips_net=args.lpips_net,
        ic_cluster_size=args.ic_cluster_size, ic_cluster_cap=args.ic_cluster_cap, quality_batch_size=max(args.batch_size, 8),
        classify_epochs=args.classify_epochs, gallery_n=args.gallery_n, testing=args.random_weights_for_testing,
        local_files_only=args.local_files_only,
        command="python evaluate.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
    )  # fmt: skip
    results = evaluate(cfg)
    report = write_report(args.out, results)
    headline = protocol.metrics[0]
    for name, c in results.classes.items():
        seg = c.segmentation.settings if c.segmentation else {}
        values = ", ".join(f"({k}) {100 * (r.metrics[headline] or 0):.1f}" for k, r in seg.items())
        line = f"{name} [{protocol.name}]: {headline} {values}" if values else f"{name} [{protocol.name}]:"
        for g, q in (c.quality or {}).items():
            line += f"; {g}: IS {q.mean['is']:.2f}, IC-LPIPS (SeaS) {q.mean['ic_lpips_seas']:.3f}"
        print(line)
    print(f"report -> {report}")


if __name__ == "__main__":
    main()
