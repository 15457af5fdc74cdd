"""What precise masks are worth downstream: one set of synthetic training pairs, labelled four ways,
trains the evaluation's own segmenter; each model is scored on held-out real anomalies.

Data: a dataset where every real defect's true mask is known (by default the demo classes, built
larger than the demo's own: --demo_anomalies per defect type), split as the evaluation splits it
(`real_split`: the generator-train third, a validation part carved from it, the test two thirds).
Pairs: for each pair a train/good image gets boxes drawn as Stage 3 draws them (`sample_boxes`:
sizes from the real boxes of the defect type, jittered, placed on the object); into each box a
defect region of a generator-train anomaly (validation anomalies excluded) is pasted, scaled to
--fill of the box (so the defect is smaller than its box, as an inpainted defect is), then the image
goes through the VAE-like round trip (`generated_image`) of `benchmarks/mask_precision.py` inside the boxes, with the
defect-free image outside them, as inpainting.py leaves it. The same degraded images are labelled:

    true      the pasted pixels that changed (the ceiling)
    precise   extract_mask(degraded image, defect-free image, box), default method (what Stage 3 gives)
    box       the box mask ("mask drift")
    official  extract_mask(..., method="official") (the paper's published method)

The learned mask method's masks are made on the same pairs and compared with the true mask (the
report's mask IoU line), but not trained on.

Training and metrics: `segmentation.train_model` and `evaluate_model` (DRAEM's discriminative U-Net, half good / half
pairs per batch, selection on validation pixel AP, one test pass; width, decoder, learning rate and steps between
validations are `TrainConfig` fields) on train/good + the pairs only (no
real anomalies, so the labels are the only difference), the same steps and seed for the four labels;
test metrics from `metrics.segmentation_metrics`. Seeds change the pairs, the initial weights and
the batch order. Results per job are cached under --out (a rerun resumes).

    python -m benchmarks.mask_value --out output/mask_value
"""

import json
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from benchmarks.mask_precision import generated_image, iou
from mvp_diff.boxes import box_mask, mask_regions
from mvp_diff.cli_args import ArgumentParser, positive_int
from mvp_diff.dataset import list_classes, load_class
from mvp_diff.demo_data import build_demo_dataset
from mvp_diff.errors import UsageError, UserError, cli
from mvp_diff.evaluation.data import LabeledImage, real_split
from mvp_diff.evaluation.segmentation import PairDataset
from mvp_diff.files import (
    atomic_write_json,
    atomic_write_text,
    read_image,
    read_mask,
    save_image,
)
from mvp_diff.masks import extract_mask, mask_method_version
from mvp_diff.random_boxes import foreground, is_texture, real_box_stats, sample_boxes

LABELS = ("true", "precise", "box", "official")
# Also compared with the true mask on the same pairs, not trained on: the learned mask method.
MEASURED_ONLY = ("learned",)
METRICS = (("pixel_ap", "pixel AP"), ("pixel_f1_max", "F1-max"), ("per_image_iou", "per-image IoU"), ("aupro", "AUPRO"))


# --- pairs ---------------------------------------------------------------------------------------


def defect_regions(anomalies):
    """[(image crop, bool mask crop)] of every mask region (8-connected, >= 10 px) of these anomalies."""
    regions = []
    for sample in anomalies:
        image, mask = read_image(sample.image), read_mask(sample.mask)
        labels, found = mask_regions(mask)
        for (x0, y0, x1, y1), area, label in found:
            if area >= 10:
                regions.append((image[y0:y1, x0:x1], labels[y0:y1, x0:x1] == label))
    return regions


def paste_into_box(rng, image, box, region, fill):
    """Paste `region` scaled to `fill` x the box (aspect kept) at a random place inside the box;
    returns the pixels that changed."""
    crop, mask = region
    x0, y0, x1, y1 = box
    if (x1 - x0 > y1 - y0) != (mask.shape[1] > mask.shape[0]):  # a long defect lies along its box
        crop, mask = np.rot90(crop), np.rot90(mask)
    scale = fill * min((x1 - x0) / mask.shape[1], (y1 - y0) / mask.shape[0])
    w, h = max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (w, h), interpolation=interpolation)
    small = cv2.resize(mask.astype(np.float32), (w, h), interpolation=interpolation) >= 0.5
    # a thin defect (a thread) can vanish when shrunk by area: then keep its nearest-neighbour pixels
    mask = small if small.any() else cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    x = x0 + int(rng.integers(0, x1 - x0 - w + 1))
    y = y0 + int(rng.integers(0, y1 - y0 - h + 1))
    window = image[y : y + h, x : x + w]
    before = window.copy()
    window[mask] = crop[mask]
    changed = np.zeros(image.shape[:2], bool)
    changed[y : y + h, x : x + w] = mask & (window != before).reshape(h, w, -1).any(axis=2)
    return changed


def make_pairs(split, num, seed, folder, fill, jitter):
    """Write `num` pairs (defect types in turn) under `folder`: image/NNNN.png and LABEL/NNNN.png for
    each label; returns [{defect_type, good_image, image, LABEL: path, ...}] and each label's mean IoU
    with the true mask."""
    class_data = split.class_data
    stats = real_box_stats(class_data)
    texture = is_texture(class_data)
    regions = {d: defect_regions(split.train_anomalies[d]) for d in class_data.defect_types}
    defects = [d for d in class_data.defect_types if regions[d] and d in stats]
    if not defects:
        raise UserError(f"{class_data.root}: no generator-train anomaly with a mask region of 10 px or more to paste")
    pairs, ious = [], {k: [] for k in LABELS + MEASURED_ONLY}
    for i in range(num):
        defect = defects[i % len(defects)]
        rng = np.random.default_rng([seed, i])
        for _try in range(20):  # redraw the rare pair whose pasted defect changed nothing
            good_path = split.train_good[int(rng.integers(len(split.train_good)))].image
            good = read_image(good_path)
            boxes, _ = sample_boxes(rng, stats[defect], foreground(np.dstack([good] * 3) if good.ndim == 2 else good, texture), jitter)
            painted = good.copy()
            true = np.zeros(good.shape[:2], bool)
            for box in boxes:
                true |= paste_into_box(rng, painted, box, regions[defect][int(rng.integers(len(regions[defect])))], fill)
            if true.any():
                break
        box = box_mask(boxes, *good.shape[:2])
        degraded = generated_image(rng, painted.astype(np.float32), good, box > 0)
        masks = {
            "true": true,
            "precise": extract_mask(degraded, good, box, method="default"),
            "box": box > 0,
            "official": extract_mask(degraded, good, box, method="official"),
        }
        for label in MEASURED_ONLY:
            ious[label].append(iou(extract_mask(degraded, good, box, method=label), true))
        name = f"{i:04d}.png"
        pair = {"defect_type": defect, "good_image": str(good_path), "image": str(folder / "image" / name)}
        save_image(pair["image"], degraded)
        for label, mask in masks.items():
            pair[label] = str(folder / label / name)
            save_image(pair[label], mask.astype(np.uint8) * 255)
            ious[label].append(iou(mask, true))
        pairs.append(pair)
    return pairs, {k: float(np.mean(v)) for k, v in ious.items()}


def pairs_job(job):
    """The pairs of one class and seed, made once (their manifest records the settings)."""
    folder = Path(job["out"]) / "pairs" / job["classname"] / f"seed{job['seed']}"
    manifest = folder / "pairs.json"
    settings = {k: job[k] for k in ("num_pairs", "fill", "jitter", "dataset", "mask_versions")}
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved["settings"] == settings:
            return saved
    start = time.time()
    split = real_split(job["dataset"], job["classname"], job["mask_suffix"])
    pairs, ious = make_pairs(split, job["num_pairs"], job["seed"], folder, job["fill"], job["jitter"])
    saved = {"settings": settings, "pairs": pairs, "label_iou": ious, "seconds": round(time.time() - start, 1)}
    atomic_write_json(manifest, saved)
    return saved


# --- training ------------------------------------------------------------------------------------


def train_job(job):
    """One (class, seed, label) run of the evaluation's training and test; cached as JSON."""
    import torch

    from mvp_diff.evaluation.segmentation import TrainConfig, evaluate_model, train_model

    torch.set_num_threads(1)
    path = Path(job["path"])
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("job") == job:
            return saved
    split = real_split(job["dataset"], job["classname"], job["mask_suffix"])
    cfg = TrainConfig(**job["train"])
    pairs = [LabeledImage(Path(p["image"]), Path(p[job["label"]]), p["defect_type"]) for p in job["pairs"]]
    size = cfg.image_size
    desc = f"{job['classname']} {job['label']} seed {cfg.seed}"
    start, cpu_start = time.time(), time.process_time()
    model, selection = train_model(PairDataset(split.train_good, size), PairDataset(pairs, size), PairDataset(split.val_set(), size), cfg, desc=desc)
    metrics, _ = evaluate_model(model, PairDataset(split.test_set(), size), cfg, selection["val_threshold"], desc=f"{desc}: test")
    result = {"job": job, "metrics": metrics, "selection": selection, "seconds": round(time.time() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1)}
    atomic_write_json(path, result)
    return result


# --- report --------------------------------------------------------------------------------------


def _cell(values, digits=1):
    values = 100 * np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return "-"
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values, ddof=1) if len(values) > 1 else 0:.{digits}f}"


def gap_closed(true, precise, box):
    """(precise - box) / (true - box); NaN when the true mask does not beat the box."""
    return (precise - box) / (true - box) if true - box > 1e-9 else math.nan


def summarise(results, classes, seeds):
    """{class or 'overall': {label: {metric: [value per seed]}}}; 'overall' is the class mean per seed."""
    table = {c: {lab: {m: [results[(c, s, lab)]["metrics"][m] for s in seeds] for m, _ in METRICS} for lab in LABELS} for c in classes}
    table["overall"] = {lab: {m: list(np.mean([table[c][lab][m] for c in classes], axis=0)) for m, _ in METRICS} for lab in LABELS}
    return table


def report(args, table, label_ious, chance, seeds, seconds):
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± sample standard deviation over seeds, in %."]
    for group, by_label in table.items():
        lines += ["", f"**{group}**" + ("" if group == "overall" else f" (chance pixel AP = defect share of test pixels: {100 * chance[group]:.1f}; mask IoU of each label with the true mask, mean over pairs and seeds: "
                                                                          + ", ".join(f"{lab} {np.mean(label_ious[group][lab]):.2f}" for lab in LABELS)
                                                                          + "".join(f"; {lab} (IoU only, not trained on) {np.mean(label_ious[group][lab]):.2f}" for lab in MEASURED_ONLY) + ")"), ""]
        lines += ["| label | " + " | ".join(name for _, name in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
        for lab in LABELS:
            lines.append(f"| {lab} | " + " | ".join(_cell(by_label[lab][m]) for m, _ in METRICS) + " |")
        gaps, diffs = [], []
        for m, name in METRICS:
            t, p, b = (np.array(by_label[lab][m]) for lab in ("true", "precise", "box"))
            gap = gap_closed(t.mean(), p.mean(), b.mean())
            gaps.append(f"{name} " + ("n/a (true not above box)" if math.isnan(gap) else f"{gap:+.2f}"))
            diffs.append(f"{name} {_cell(p - b)}")
        lines += ["", "precise - box, paired by seed: " + ", ".join(diffs), "", "gap closed (precise - box) / (true - box), from the means: " + ", ".join(gaps)]
    ranks = []
    for s_i, seed in enumerate(seeds):
        order = sorted(LABELS, key=lambda lab: -table["overall"][lab]["pixel_ap"][s_i])
        ranks.append(f"seed {seed}: " + " > ".join(order))
    lines += ["", "Ranking by overall pixel AP: " + "; ".join(ranks), "", f"Total time {seconds / 60:.1f} min."]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="./output/mask_value", help="work folder: pairs, per-run results, report.md (default: ./output/mask_value)")
    parser.add_argument("--dataset", default=None, help="MVTec-layout dataset with true masks (default: the demo classes, built under --out)")
    parser.add_argument("--classname", default=None, help="comma-separated classes (default: every class of the dataset)")
    parser.add_argument("--mask_suffix", default="_mask")
    parser.add_argument("--demo_anomalies", type=positive_int, default=24, help="demo anomalies per defect type (default: 24)")
    parser.add_argument("--demo_train_good", type=positive_int, default=30, help="demo train/good images (default: 30)")
    parser.add_argument("--demo_test_good", type=positive_int, default=12, help="demo test/good images (default: 12)")
    parser.add_argument("--num_pairs", type=positive_int, default=32, help="synthetic pairs per class and seed (default: 32)")
    parser.add_argument("--fill", type=float, default=0.75, help="pasted defect's size as a share of its box side (default: 0.75)")
    parser.add_argument("--jitter", type=float, default=0.5, help="box size jitter, as random_box.py --jitter (default: 0.5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--image_size", type=int, default=96, help="segmenter input size, a multiple of 32 (default: 96)")
    parser.add_argument("--base_channels", type=int, default=8, help="segmenter width (default: 8)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="validations, one every --steps_per_epoch steps (default: 8)")
    parser.add_argument("--steps_per_epoch", type=positive_int, default=20, help="steps between validations (default: 20)")
    parser.add_argument("--decoder", default="draem", choices=("wide", "draem"), help="segmenter decoder (TrainConfig.decoder; default: draem)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Adam learning rate (default: 2e-3)")
    parser.add_argument("--workers", type=positive_int, default=2, help="training processes in parallel, one thread each (default: 2)")
    args = parser.parse_args(argv)
    if args.image_size < 32 or args.image_size % 32:
        raise UsageError(f"--image_size must be a positive multiple of 32, got {args.image_size}")
    if not 0 < args.fill <= 1:
        raise UsageError(f"--fill must be in (0, 1], got {args.fill}")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out)
    if args.dataset is None:
        args.dataset = str(build_demo_dataset(out / "dataset", n_train_good=args.demo_train_good, n_test_good=args.demo_test_good, n_anomalies=args.demo_anomalies))
    classes = args.classname.split(",") if args.classname else list_classes(args.dataset)
    if not classes:
        raise UserError(f"--dataset {args.dataset}: no CLASS/train/good/ folders; pass a dataset in MVTec AD layout")
    for classname in classes:
        load_class(args.dataset, classname, args.mask_suffix)  # a missing class or mask fails here, in one line
    train = {"image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size, "base_channels": args.base_channels, "lr": args.learning_rate,
             "decoder": args.decoder, "fixed_steps_per_epoch": args.steps_per_epoch}
    # The mask methods' versions: pairs and runs made with other masks are made again, not reused.
    versions = {m: mask_method_version(m) for m in ("default", "official", *MEASURED_ONLY)}
    common = {"dataset": str(Path(args.dataset).resolve()), "mask_suffix": args.mask_suffix, "mask_versions": versions}
    pair_jobs = [common | {"out": str(out), "classname": c, "seed": s, "num_pairs": args.num_pairs, "fill": args.fill, "jitter": args.jitter}
                 for c in classes for s in args.seeds]  # fmt: skip
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        made = dict(zip([(j["classname"], j["seed"]) for j in pair_jobs], pool.map(pairs_job, pair_jobs)))
        print(f"pairs ready ({time.time() - start:.0f} s)", flush=True)
        label_ious = {c: {lab: [made[(c, s)]["label_iou"][lab] for s in args.seeds] for lab in LABELS + MEASURED_ONLY} for c in classes}
        # seed by seed, so that the first seed's runs (a sanity check of the budget) finish first
        jobs = [common | {"classname": c, "label": lab, "pairs": made[(c, s)]["pairs"], "train": train | {"seed": s},
                          "path": str(out / "runs" / c / f"seed{s}_{lab}.json")}
                for s in args.seeds for c in classes for lab in LABELS]  # fmt: skip
        done = list(pool.map(train_job, jobs))
    results = {(j["classname"], j["train"]["seed"], j["label"]): r for j, r in zip(jobs, done)}
    table = summarise(results, classes, args.seeds)
    chance = {c: float(PairDataset(real_split(args.dataset, c, args.mask_suffix).test_set(), args.image_size).masks.mean()) for c in classes}
    text = report(args, table, label_ious, chance, args.seeds, time.time() - start)
    steps = done[0]["selection"]["steps"]
    # wall time depends on the machine's load; the runs' CPU time says what they cost on an idle machine
    cpu_minutes = sum(r.get("cpu_seconds", math.nan) for r in done) / 60
    text += (f"\n\n{steps} steps per run ({args.epochs} epochs), {args.image_size} px, base channels {args.base_channels}, {args.decoder} decoder, batch {args.batch_size}, "
             f"learning rate {args.learning_rate:g}, {args.num_pairs} pairs per class and seed; the {len(done)} training runs used {cpu_minutes:.1f} CPU minutes in all. "
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}.")  # fmt: skip
    atomic_write_json(out / "summary.json", {"args": vars(args), "table": table, "label_iou": label_ious})
    atomic_write_text(out / "report.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
