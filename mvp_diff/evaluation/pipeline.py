"""One evaluation run under one protocol (protocols.py): for each class and each generator,
generation quality, the protocol's downstream settings and the gallery images; then the report.
Finished parts are cached under OUT/work/PROTOCOL/ with a fingerprint of their inputs, so a rerun (or
a run killed half way) only redoes what changed."""

import functools
import json
import math
import platform
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoint import is_offline
from ..draem import write_draem_samples
from ..errors import UserError
from ..files import read_mask
from .cache import reuse_or_compute
from .classification import RESNET34, classification_accuracy
from .data import LabeledImage, check_no_leak, first_share, has_box, load_generated, real_split
from .gallery import gallery_for_class
from .generation_quality import Lpips, lpips_nets, quality_for_class
from .protocols import PROTOCOLS, Protocol
from .quality import (
    IS_SIZE,
    nanmean,
    require_weights,
)
from .results import ClassResult, EvaluationResult, SegmentationResult, SettingResult
from .segmentation import PairDataset, TrainConfig, all_metrics, evaluate_model, predict, train_model

DOWNSTREAM_SETTINGS = {
    "a": "real train-split anomalies only",
    "b": "(a) + generated, precise masks",
    "c": "(a) + generated, box masks",
    "d": "(a) + DRAEM-style synthetic",
    "g": "generated only (at most 500 per defect type)",
    "s": "generated + the real generator-train anomalies",
}
PER_GENERATOR = ("b", "c", "g", "s")  # one model per generator
PARTS = ("quality", "classification", "segmentation", "gallery")


@dataclass
class EvalConfig:
    classnames: list
    dataset: str
    generated: dict = None  # name -> folder, in report order
    out: str = "./output/evaluation"
    mask_suffix: str = "_mask"
    parts: tuple = PARTS
    protocol: Protocol = PROTOCOLS["mvpdiff"]
    overrides: dict = field(default_factory=dict)  # budget flags that differ from the protocol: {flag: (protocol, used)}
    settings: tuple = None  # default: the protocol's
    seed: int = 0
    device: str = "cpu"
    train_fraction: float = 1 / 3
    val_fraction: float = 0.25
    train: TrainConfig = None  # default: the protocol's budget
    draem_num: int = None  # default: as many as usable generated pairs, else 200
    anomaly_source_path: str = None
    isc_splits: int = 10
    inception_weights: str = None
    lpips_size: int = 256
    lpips_net: str = "auto"
    ic_cluster_size: int = 50
    ic_cluster_cap: int = 200
    quality_batch_size: int = 32
    classify_epochs: int = 30  # AnomalyDiffusion's train-classification.py
    gallery_n: int = 12
    testing: bool = False  # random weights: for the test suite only
    local_files_only: bool = False  # never fetch pretrained weights (as HF_HUB_OFFLINE=1)
    command: str = ""

    def __post_init__(self):
        if isinstance(self.generated, (str, Path)):
            self.generated = {"ours": str(self.generated)}
        self.generated = dict(self.generated or {})
        self.settings = tuple(self.settings or self.protocol.settings)
        if self.train is None:
            self.train = train_config(self.protocol, device=self.device, seed=self.seed)


def train_config(protocol: Protocol, **kwargs):
    """The downstream training budget a protocol defines (kwargs: device, seed, workers, ...)."""
    return TrainConfig(
        image_size=protocol.image_size, epochs=protocol.epochs, base_channels=protocol.base_channels, decoder=protocol.decoder,
        init=protocol.init, fixed_steps_per_epoch=protocol.steps_per_epoch, selection=protocol.selection,
        image_score_pool=protocol.image_score_pool, **kwargs,
    )  # fmt: skip


def versions():
    from importlib.metadata import PackageNotFoundError, version

    import sklearn
    import torchvision

    def installed(package):  # torch-fidelity and lpips are the optional `eval` extra
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {
        "mvp_diff": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch-fidelity": installed("torch-fidelity"),
        "lpips": installed("lpips"),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def classification_for_class(cfg, split, generated, path):
    train = {d: [s.image for s in v] for d, v in generated.items()}
    test = {d: [s.image for s in v] for d, v in split.test_anomalies.items()}
    size = cfg.train.image_size
    inputs = {"epochs": cfg.classify_epochs, "size": size, "seed": cfg.seed, "testing": cfg.testing, "test": {d: [str(p) for p in v] for d, v in test.items()}}
    files = [f for v in train.values() for f in v]
    compute = functools.partial(classification_accuracy, train, test, cfg.device, cfg.classify_epochs, size, seed=cfg.seed, testing=cfg.testing)
    return reuse_or_compute(path, inputs, files, compute)


# --- segmentation --------------------------------------------------------------------------------


def _items_key(items):
    return [[str(s.image), str(s.mask), bool(box)] for s, box in items]


def draem_samples(cfg, split, work, num):
    """The DRAEM-style pool for setting (d): made on train-side good images only; textures from
    --anomaly_source_path (DRAEM: DTD) or else the class's other train/good images."""
    sources = None
    if cfg.anomaly_source_path:
        from ..draem import source_images

        sources = source_images(cfg.anomaly_source_path)
    goods = [s.image for s in split.train_good]
    # A folder per (seed, good images, sources): a rerun with other inputs never reuses old samples.
    made_from = zlib.crc32(json.dumps([cfg.seed, [str(p) for p in goods], [str(p) for p in sources or []]]).encode())
    class_dir = work.parent.parent / "draem" / f"{split.class_data.name}-{made_from:08x}"
    records = write_draem_samples(goods, class_dir, num, cfg.seed, sources)
    return [LabeledImage(class_dir / r.image, class_dir / r.mask, "draem") for r in records]


def usable_pairs(name, gen_name, generated, cap, notes):
    """Generated samples with a non-empty mask, at most `cap` per defect type (first by file name)."""
    usable, n_empty = [], 0
    for samples in generated.values():
        kept = [s for s in samples if read_mask(s.mask).any()]
        n_empty += len(samples) - len(kept)
        usable += kept[:cap] if cap else kept
    if n_empty:
        notes.append(f"{name} ({gen_name}): {n_empty} generated sample(s) with an empty precise mask left out")
    return usable


def training_mixes(cfg, split, generated, work, notes):
    """{setting key: [(sample, use box mask)]} of the protocol's settings; per-generator settings are
    keyed SETTING:GENERATOR."""
    name = split.class_data.name
    real = [(s, False) for s in split.flat(split.train_anomalies)]
    usable = {g: usable_pairs(name, g, samples, cfg.protocol.max_generated_per_type, notes) for g, samples in generated.items()}
    mixes = {}
    for key in cfg.settings:
        if key == "a":
            mixes["a"] = real
        elif key == "d":
            num = cfg.draem_num or max((len(u) for u in usable.values()), default=0) or 200
            mixes["d"] = real + [(s, False) for s in draem_samples(cfg, split, work, num)]
        elif not generated:
            notes.append(f"{name}: setting ({key}) skipped: no generated pairs (pass --generated)")
        for g, pairs in usable.items() if key in PER_GENERATOR else ():
            if key == "c" and not all(has_box(s) for s in pairs):
                notes.append(f"{name}: setting (c) skipped for {g}: {sum(not has_box(s) for s in pairs)} sample(s) have no box mask (CLASS_boxes/DEFECT/NNN_mask.png) and no boxes in manifest.jsonl")
                continue
            with_real = real if key in ("b", "c", "s") else []
            mixes[f"{key}:{g}"] = with_real + [(s, key == "c") for s in pairs]
    if not real and "a" in mixes:
        notes.append(f"{name}: no real train-split anomalies to train on; setting (a) skipped")
    return {k: v for k, v in mixes.items() if v}


def peer_selection(test_set, tcfg):
    """An after_epoch hook that scores the test set every epoch and keeps the epoch AnomalyDiffusion's
    train-localization.py keeps (best image AUROC + pixel AUROC + pixel AP + AUPRO). Reported beside
    the honest number, labelled as chosen on the test set; it never changes the model."""
    best = {}

    def after_epoch(model, epoch):
        maps = predict(model, test_set(), tcfg, desc="test-selected")
        m = all_metrics(maps, test_set().masks, test_set().labels, tcfg.image_score_pool)
        total = sum(0.0 if math.isnan(m[k]) else m[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"))
        if not best or total > best["sum"]:
            best.update(epoch=epoch, sum=total, metrics=m)

    return after_epoch, best


def segmentation_for_class(cfg, split, generated, work, notes):
    name = split.class_data.name
    tcfg = cfg.train
    if not split.flat(split.test_anomalies):
        notes.append(f"{name}: the real test split has no anomalies; downstream segmentation skipped")
        return None
    mixes = training_mixes(cfg, split, generated, work, notes)
    n_real = len(split.flat(split.train_anomalies))
    base = {k: v for k, v in asdict(tcfg).items() if k not in ("device", "num_workers")}
    split_key = {"good": [str(s.image) for s in split.train_good], "val": _items_key([(s, False) for s in split.val_set()]),
                 "test": _items_key([(s, False) for s in split.test_set()]), "peer": cfg.protocol.peer_selection}  # fmt: skip

    @functools.cache
    def good_and_val():  # loaded only when a setting is not cached
        return (PairDataset(split.train_good, tcfg.image_size, tcfg.num_workers, desc=f"{name}: train/good"),
                PairDataset(split.val_set(), tcfg.image_size, tcfg.num_workers, desc=f"{name}: validation"))  # fmt: skip

    @functools.cache
    def test_set():  # read only after the first model is final (or by a peer's test-set selection)
        return PairDataset(split.test_set(), tcfg.image_size, tcfg.num_workers, desc=f"{name}: test")

    def run_setting(key, items):
        good_set, val_set = good_and_val()
        anomaly_set = PairDataset(items, tcfg.image_size, tcfg.num_workers, desc=f"{name} ({key}): anomalies")
        hook, peer = peer_selection(test_set, tcfg) if cfg.protocol.peer_selection else (None, None)
        model, selection = train_model(good_set, anomaly_set, val_set, tcfg, desc=f"{name} ({key})", after_epoch=hook)
        if peer:
            selection["peer_selected"] = {"rule": cfg.protocol.peer_selection, "epoch": peer["epoch"], "metrics": peer["metrics"]}
        overall, per_defect = evaluate_model(model, test_set(), tcfg, selection["val_threshold"], desc=f"{name} ({key}): test")
        real = n_real if key.split(":")[0] in ("a", "b", "c", "d", "s") else 0
        counts = {"good": len(good_set), "real": real, "added": len(items) - real}
        return SettingResult(metrics=overall, per_defect=per_defect, selection=selection, train_counts=counts)

    results = {}
    for key, items in mixes.items():
        files = [f for s, box in items for f in (s.image, s.mask, s.box_mask if box else None) if f is not None]
        inputs = {"train": base, "split": split_key, "items": _items_key(items)}
        path = work / "segmentation" / f"{key.replace(':', '-')}.json"
        results[key] = reuse_or_compute(path, inputs, files, functools.partial(run_setting, key, items), SettingResult)
    first = next(iter(results.values()), None)
    return SegmentationResult(
        settings=results, steps=first.selection["steps"] if first else 0, steps_per_epoch=first.selection["steps_per_epoch"] if first else 0
    )


# --- run -----------------------------------------------------------------------------------------


def check_weights(cfg):
    """Fail before any work when the quality part needs weights that are not there."""
    if cfg.generated and not cfg.testing and {"quality", "classification"} & set(cfg.parts):
        quality = "quality" in cfg.parts
        require_weights(quality, set(lpips_nets(cfg).values()) if quality else (), cfg.inception_weights,
                          [RESNET34] if "classification" in cfg.parts else [], offline=is_offline(cfg.local_files_only))  # fmt: skip


def load_generators(cfg, split, notes):
    """{generator name: {defect: [LabeledImage]}} and {generator name: its class folder}."""
    name = split.class_data.name
    generated, folders = {}, {}
    for gen_name, path in cfg.generated.items():
        if Path(path).resolve() == Path(cfg.dataset).resolve():
            raise UserError(f"--generated {path} is the real dataset; pass the generated images' folder")
        folder, samples, gen_notes = load_generated(path, name, cfg.mask_suffix, cfg.dataset)
        check_no_leak(split, folder, samples)
        notes += gen_notes
        absent = [d for d in split.class_data.defect_types if d not in samples]
        if absent:
            notes.append(f"{name} ({gen_name}): no generated folder for real defect type(s) {', '.join(absent)} under {folder}")
        no_good = sum(s.good_image is None for v in samples.values() for s in v)
        if no_good and (folder / "test").is_dir():
            notes.append(f"{name} ({gen_name}): {no_good} generated sample(s) without a defect-free image in manifest.jsonl (gallery shows none for them)")
        generated[gen_name], folders[gen_name] = samples, str(folder)
    return generated, folders


def unpainted_validation(split, generated, notes):
    """Validation good images no generator painted on: a generated sample made from a validation
    image would tie selection to (b)/(c). The validation anomalies are the generator-train share
    (the generator saw them all), a bias the report states; the test set carries none of it."""
    painted = {s.good_image.resolve() for samples in generated.values() for v in samples.values() for s in v if s.good_image is not None}
    kept = [s for s in split.val_good if s.image.resolve() not in painted]
    if len(kept) < len(split.val_good):
        notes.append(f"{split.class_data.name}: {len(split.val_good) - len(kept)} validation good image(s) left out of model selection: a generator painted on them")
        split.val_good = kept


def split_note(cfg, split):
    """Under a floor(n/3) protocol, the test anomalies Stage 1's ceil(n/3) gave this project's generator."""
    if cfg.protocol.split_rounding != "floor" or not cfg.generated:
        return None
    seen = sum(len(first_share(a, cfg.train_fraction, "ceil")[0]) - len(split.generator_train[d]) for d, a in split.class_data.anomalies.items())
    if seen:
        return (f"{split.class_data.name}: this protocol splits floor(n/3); Stage 1 trains this project's generator on ceil(n/3), "
                f"so {seen} test anomal{'y' if seen == 1 else 'ies'} may have been seen by a generator trained with Stage 1's default")  # fmt: skip
    return None


def class_means(classes):
    """Mean over classes of every metric, per setting and per generator's quality (the published
    tables are class averages); a class without a value is left out of that mean."""
    seg, quality = {}, {}
    for c in classes.values():
        for key, r in (c.segmentation.settings if c.segmentation else {}).items():
            for metric, value in r.metrics.items():
                seg.setdefault(key, {}).setdefault(metric, []).append(value)
        for g, q in (c.quality or {}).items():
            for metric, value in q.mean.items():
                quality.setdefault(g, {}).setdefault(metric, []).append(value)
        for g, r in (c.classification or {}).items():
            quality.setdefault(g, {}).setdefault("classification_accuracy", []).append(r["accuracy"])
    mean = lambda d: {k: {m: nanmean(v) for m, v in rows.items()} for k, rows in d.items()}  # noqa: E731
    return {"classes": len(classes), "segmentation": mean(seg), "quality": mean(quality)}


def evaluate(cfg: EvalConfig):
    check_weights(cfg)
    out = Path(cfg.out)
    protocol = cfg.protocol
    lpips_cache = Lpips(cfg)
    # A protocol that selects no epoch on validation trains on the whole train side.
    val_fraction = cfg.val_fraction if protocol.selection == "validation" else 0.0
    classes = {}
    for name in cfg.classnames:
        work = out / "work" / protocol.name / name
        split = real_split(cfg.dataset, name, cfg.mask_suffix, cfg.train_fraction, val_fraction, cfg.seed, protocol.split_rounding)
        notes = list(split.notes)
        generated, folders = load_generators(cfg, split, notes)
        unpainted_validation(split, generated, notes)
        if note := split_note(cfg, split):
            notes.append(note)
        result = ClassResult(counts=split.counts(), generated=folders,
                             generated_counts={g: {d: len(v) for d, v in s.items()} for g, s in generated.items()}, notes=notes)  # fmt: skip
        if "quality" in cfg.parts:
            if generated:
                result.quality = {g: quality_for_class(cfg, split, s, work / "quality" / g, lpips_cache, notes) for g, s in generated.items()}
            else:
                notes.append(f"{name}: generation quality skipped: no --generated folder")
        if "classification" in cfg.parts and generated:
            result.classification = {g: classification_for_class(cfg, split, s, work / "classification" / f"{g}.json") for g, s in generated.items()}
        if "segmentation" in cfg.parts:
            result.segmentation = segmentation_for_class(cfg, split, generated, work, notes)
        if "gallery" in cfg.parts and generated:
            result.gallery = gallery_for_class(cfg, next(iter(generated.values())), out)
        classes[name] = result
    described = {
        "name": protocol.name,
        "definition": asdict(protocol),
        "overrides": {k: {"protocol": a, "used": b} for k, (a, b) in cfg.overrides.items()},
        "command": cfg.command,
        "seed": cfg.seed,
        "device": cfg.device,
        "train_fraction": cfg.train_fraction,
        "val_fraction": val_fraction,
        "train": {k: v for k, v in asdict(cfg.train).items() if k not in ("device",)},
        "settings": {k: DOWNSTREAM_SETTINGS[k] for k in cfg.settings},
        "generators": list(cfg.generated),
        "isc_splits": cfg.isc_splits,
        "is_size": IS_SIZE,
        "lpips_size": cfg.lpips_size,
        "lpips_nets": lpips_nets(cfg),
        "ic_cluster_size": cfg.ic_cluster_size,
        "ic_cluster_cap": cfg.ic_cluster_cap,
        "classify_epochs": cfg.classify_epochs,
        "anomaly_source_path": cfg.anomaly_source_path,
        "random_weights_for_testing": cfg.testing,
    }
    return EvaluationResult(protocol=described, versions=versions(), classes=classes, mean=class_means(classes))
