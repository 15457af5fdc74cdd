"""One evaluation run: for each class, generation quality, the four downstream settings and the
gallery images; then the report. Finished parts are cached under OUT/work/ with a fingerprint of
their inputs, so a rerun (or a run killed half way) only redoes what changed."""

import hashlib
import json
import math
import platform
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import __version__
from ..draem import synthesize
from ..errors import UserError
from ..files import atomic_write_json, read_mask, read_rgb, save_image
from . import quality as Q
from .data import Sample, check_no_leak, has_box, load_generated, read_box_mask, real_split
from .segmentation import PairDataset, TrainConfig, evaluate_model, train_model

SETTINGS = {
    "a": "real train-split anomalies only",
    "b": "(a) + generated, precise masks",
    "c": "(a) + generated, box masks",
    "d": "(a) + DRAEM-style synthetic",
}
PARTS = ("quality", "segmentation", "gallery")


@dataclass
class EvalConfig:
    classnames: list
    dataset: str
    generated: str = None
    out: str = "./output/evaluation"
    mask_suffix: str = "_mask"
    parts: tuple = PARTS
    settings: tuple = tuple(SETTINGS)
    seed: int = 0
    device: str = "cpu"
    train_fraction: float = 1 / 3
    val_fraction: float = 0.25
    train: TrainConfig = field(default_factory=TrainConfig)
    draem_num: int = None  # default: as many as usable generated pairs, else 200
    anomaly_source_path: str = None
    isc_splits: int = 10
    inception_weights: str = None
    lpips_size: int = 256
    lpips_net: str = "auto"
    ic_cluster_size: int = 50
    ic_cluster_cap: int = 200
    quality_batch_size: int = 32
    gallery_n: int = 12
    testing: bool = False  # random weights: for the test suite only
    command: str = ""


def lpips_nets(cfg):
    """(backbone of variant a, of variant b): each reference script's own unless --lpips_net forces one."""
    if cfg.lpips_net == "auto":
        return Q.LPIPS_NET_A, Q.LPIPS_NET_B
    return cfg.lpips_net, cfg.lpips_net


def fingerprint(obj, files=()):
    """sha1 of a JSON-able object plus (path, size, mtime) of files: what a cached result depends on."""
    h = hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached(path: Path, key):
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if saved.get("fingerprint") == key:
            return saved["result"]
    return None


def store(path: Path, key, result):
    atomic_write_json(path, {"fingerprint": key, "result": result})
    return result


def versions():
    import sklearn
    import torch_fidelity
    import torchvision

    from importlib.metadata import version

    return {
        "mvp_diff": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch-fidelity": torch_fidelity.__version__,
        "lpips": version("lpips"),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


# --- quality -------------------------------------------------------------------------------------


class _Lpips:
    """LPIPS networks built once per run."""

    def __init__(self, cfg):
        self.cfg, self.models = cfg, {}

    def distance(self, net):
        if net not in self.models:
            model = Q.load_lpips(net, self.cfg.device, self.cfg.testing)
            self.models[net] = Q.LpipsMatrix(model, self.cfg.device, self.cfg.quality_batch_size)
        return self.models[net]


def quality_for_class(cfg, split, generated, work, lpips_cache, notes):
    net_a, net_b = lpips_nets(cfg)
    params = {k: getattr(cfg, k) for k in ("isc_splits", "lpips_size", "ic_cluster_size", "ic_cluster_cap", "seed", "testing", "inception_weights")}
    rows = {}
    for defect, samples in generated.items():
        real_train = [s.image for s in split.generator_train.get(defect, [])]
        real_all = [a.image for a in split.class_data.anomalies.get(defect, [])]
        files = [s.image for s in samples]
        key = fingerprint({**params, "nets": [net_a, net_b], "defect": defect, "real_train": [str(p) for p in real_train]}, files + real_all)
        path = work / "quality" / f"{defect}.json"
        row = cached(path, key)
        if row is None:
            is_mean, is_std, splits = Q.inception_score(
                files, cfg.device, cfg.quality_batch_size, cfg.isc_splits, cfg.inception_weights, cfg.testing, num_workers=cfg.train.num_workers
            )
            row = {"n": len(files), "is": is_mean, "is_std": is_std, "is_splits": splits, "ic_lpips_a": math.nan, "ic_lpips_b": math.nan}
            if real_all:
                gen = Q.load_images(files, cfg.lpips_size, desc=f"{defect}: generated")
                rng = np.random.default_rng([cfg.seed, zlib.crc32(defect.encode())])
                row["ic_lpips_a"], _, sizes_a = Q.ic_lpips_anomalydiffusion(
                    lpips_cache.distance(net_a), gen, Q.load_images(real_train, cfg.lpips_size), rng, cfg.ic_cluster_size
                )
                row["ic_lpips_b"], _, sizes_b = Q.ic_lpips_dfmgan(
                    lpips_cache.distance(net_b), gen, Q.load_images(real_all, cfg.lpips_size), cfg.ic_cluster_cap
                )
                row.update(clusters_a=sizes_a, clusters_b=sizes_b)
            store(path, key, row)
        if not real_all:
            notes.append(f"{split.class_data.name}/{defect}: no real anomalies of this type; IC-LPIPS skipped for it")
        rows[defect] = row
    mean = {k: Q.nanmean([r[k] for r in rows.values()]) for k in ("is", "ic_lpips_a", "ic_lpips_b")}
    mean["n"] = sum(r["n"] for r in rows.values())
    return {"per_defect": rows, "mean": mean, "lpips_net_a": net_a, "lpips_net_b": net_b}


# --- segmentation --------------------------------------------------------------------------------


def _items_key(items):
    return [[str(s.image), str(s.mask), bool(box)] for s, box in items]


def draem_samples(cfg, split, work, num):
    """The DRAEM-style pool for setting (d): made on train-side good images only."""
    sources = None
    if cfg.anomaly_source_path:
        from ..draem import source_images

        sources = source_images(cfg.anomaly_source_path)
    goods = [s.image for s in split.train_good]
    # A folder per (seed, good images, sources): a rerun with other inputs never reuses old samples.
    made_from = zlib.crc32(json.dumps([cfg.seed, [str(p) for p in goods], [str(p) for p in sources or []]]).encode())
    class_dir = work / "draem" / f"{split.class_data.name}-{made_from:08x}"
    records = synthesize(goods, class_dir, num, cfg.seed, sources)
    return [Sample(class_dir / r["paths"]["image"], class_dir / r["paths"]["mask"], "draem") for r in records]


def segmentation_for_class(cfg, split, generated, work, notes):
    name = split.class_data.name
    tcfg = cfg.train
    if not split.flat(split.test_anomalies):
        notes.append(f"{name}: the real test split has no anomalies; downstream segmentation skipped")
        return None
    real = [(s, False) for s in split.flat(split.train_anomalies)]
    usable, n_empty = [], 0
    for samples in (generated or {}).values():
        for s in samples:
            if read_mask(s.mask).any():
                usable.append(s)
            else:
                n_empty += 1
    if n_empty:
        notes.append(f"{name}: {n_empty} generated sample(s) with an empty precise mask left out of (b) and (c)")
    pools = {"a": real}
    if "b" in cfg.settings:
        if usable:
            pools["b"] = real + [(s, False) for s in usable]
        else:
            notes.append(f"{name}: setting (b) skipped: no generated pairs (pass --generated)")
    if "c" in cfg.settings:
        boxed = [s for s in usable if has_box(s)]
        if usable and len(boxed) == len(usable):
            pools["c"] = real + [(s, True) for s in boxed]
        elif usable:
            notes.append(f"{name}: setting (c) skipped: {len(usable) - len(boxed)} generated sample(s) have no bbox/DEFECT/NNN_mask.png and no boxes in manifest.jsonl")
        else:
            notes.append(f"{name}: setting (c) skipped: no generated pairs (pass --generated)")
    if "d" in cfg.settings:
        num = cfg.draem_num or len(usable) or 200
        pools["d"] = real + [(s, False) for s in draem_samples(cfg, split, work, num)]
    if not real:
        notes.append(f"{name}: no real train-split anomalies to train on; setting (a) skipped")
    pools = {k: v for k, v in pools.items() if k in cfg.settings and v}

    base = {k: v for k, v in asdict(tcfg).items() if k not in ("device", "num_workers")}
    split_key = {"good": [str(s.image) for s in split.train_good], "val": _items_key([(s, False) for s in split.val_set()]),
                 "test": _items_key([(s, False) for s in split.test_set()])}  # fmt: skip
    todo = {}
    results = {}
    for key, items in pools.items():
        files = [f for s, box in items for f in (s.image, s.mask, s.box_mask if box else None) if f is not None]
        fp = fingerprint({"train": base, "split": split_key, "items": _items_key(items)}, files)
        path = work / "segmentation" / f"{key}.json"
        hit = cached(path, fp)
        if hit is not None:
            results[key] = hit
        else:
            todo[key] = (items, fp, path)
    if todo:
        good_set = PairDataset(split.train_good, tcfg.image_size, tcfg.num_workers, desc=f"{name}: train/good")
        val_set = PairDataset(split.val_set(), tcfg.image_size, tcfg.num_workers, desc=f"{name}: validation")
        test_set = None
        for key, (items, fp, path) in todo.items():
            anomaly_set = PairDataset(items, tcfg.image_size, tcfg.num_workers, desc=f"{name} ({key}): anomalies")
            model, selection = train_model(good_set, anomaly_set, val_set, tcfg, desc=f"{name} ({key})")
            if test_set is None:  # read only now, after the first model is final
                test_set = PairDataset(split.test_set(), tcfg.image_size, tcfg.num_workers, desc=f"{name}: test")
            overall, per_defect = evaluate_model(model, test_set, tcfg, selection["val_threshold"], desc=f"{name} ({key}): test")
            counts = {"good": len(good_set), "real": len(real), "added": len(items) - len(real)}
            results[key] = store(path, fp, {"metrics": overall, "per_defect": per_defect, "selection": selection, "train_counts": counts})
    ordered = {k: results[k] for k in SETTINGS if k in results}
    first = next(iter(ordered.values()), None)
    steps = first["selection"]["steps"] if first else 0
    return {"settings": ordered, "steps": steps, "steps_per_epoch": first["selection"]["steps_per_epoch"] if first else 0}


# --- gallery -------------------------------------------------------------------------------------


def _thumb(image, size=256):
    h, w = image.shape[:2]
    scale = size / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) if scale < 1 else image


def overlay(image, mask, colour, fill=0.35):
    """Image with the mask tinted and outlined in `colour` (RGB)."""
    out = image.astype(np.float32)
    out[mask] = out[mask] * (1 - fill) + np.array(colour, np.float32) * fill
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), max(1, round(max(mask.shape) / 256)))
    return out


def gallery_for_class(cfg, generated, out_dir):
    """Write the gallery images of up to `gallery_n` samples (spread over defect types) and return
    their entries with paths relative to out_dir."""
    rng = np.random.default_rng([cfg.seed, 3])
    queues = {d: [samples[i] for i in rng.permutation(len(samples))] for d, samples in sorted(generated.items())}
    picked = []
    while len(picked) < cfg.gallery_n and any(queues.values()):
        for d in list(queues):
            if queues[d] and len(picked) < cfg.gallery_n:
                picked.append(queues[d].pop(0))
    entries = []
    for s in picked:
        image = read_rgb(s.image)
        mask = read_mask(s.mask)
        stem = f"{s.defect_type}_{s.image.stem}"
        folder = out_dir / "gallery" / s.image.parents[2].name
        entry = {"defect_type": s.defect_type, "name": s.image.name, "prompt": s.prompt, "mask_area": int(mask.sum())}
        files = {"image": _thumb(image), "mask": _thumb(overlay(image, mask, (255, 40, 40)))}
        if has_box(s):
            files["box"] = _thumb(overlay(image, read_box_mask(s), (40, 220, 40), fill=0.15))
        if s.good_image is not None:
            files["good"] = _thumb(read_rgb(s.good_image))
        for kind, array in files.items():
            path = folder / f"{stem}_{kind}.png"
            save_image(path, array)
            entry[kind] = path.relative_to(out_dir).as_posix()
        entries.append(entry)
    return entries


# --- run -----------------------------------------------------------------------------------------


def check_weights(cfg):
    """Fail before any work when the quality part needs weights that are not there."""
    if "quality" in cfg.parts and cfg.generated and not cfg.testing:
        Q.require_weights(True, set(lpips_nets(cfg)), cfg.inception_weights)


def evaluate(cfg: EvalConfig):
    check_weights(cfg)
    out = Path(cfg.out)
    if cfg.generated and Path(cfg.generated).resolve() == Path(cfg.dataset).resolve():
        raise UserError(f"--generated {cfg.generated} is the real dataset; pass the generated images' folder")
    lpips_cache = _Lpips(cfg)
    classes = {}
    for name in cfg.classnames:
        work = out / "work" / name
        split = real_split(cfg.dataset, name, cfg.mask_suffix, cfg.train_fraction, cfg.val_fraction, cfg.seed)
        notes = list(split.notes)
        generated, gen_dir = None, None
        if cfg.generated:
            gen_dir, generated, gen_notes = load_generated(cfg.generated, name, cfg.mask_suffix, cfg.dataset)
            check_no_leak(split, gen_dir, generated)
            notes += gen_notes
            absent = [d for d in split.class_data.defect_types if d not in generated]
            if absent:
                notes.append(f"{name}: no generated folder for real defect type(s) {', '.join(absent)} under {gen_dir / 'test'}")
            no_good = sum(s.good_image is None for v in generated.values() for s in v)
            if no_good:
                notes.append(f"{name}: {no_good} generated sample(s) without a defect-free image in manifest.jsonl (gallery shows none for them)")
        result = {"counts": split.counts(), "generated": str(gen_dir) if gen_dir else None,
                  "generated_counts": {d: len(v) for d, v in (generated or {}).items()}}  # fmt: skip
        if "quality" in cfg.parts:
            if generated:
                result["quality"] = quality_for_class(cfg, split, generated, work, lpips_cache, notes)
            else:
                notes.append(f"{name}: generation quality skipped: no --generated folder")
        if "segmentation" in cfg.parts:
            result["segmentation"] = segmentation_for_class(cfg, split, generated, work, notes)
        if "gallery" in cfg.parts and generated:
            result["gallery"] = gallery_for_class(cfg, generated, out)
        result["notes"] = notes
        classes[name] = result
    protocol = {
        "command": cfg.command,
        "seed": cfg.seed,
        "device": cfg.device,
        "train_fraction": cfg.train_fraction,
        "val_fraction": cfg.val_fraction,
        "train": {k: v for k, v in asdict(cfg.train).items() if k not in ("device",)},
        "settings": {k: SETTINGS[k] for k in cfg.settings},
        "isc_splits": cfg.isc_splits,
        "lpips_size": cfg.lpips_size,
        "lpips_nets": dict(zip(("a", "b"), lpips_nets(cfg))),
        "ic_cluster_size": cfg.ic_cluster_size,
        "ic_cluster_cap": cfg.ic_cluster_cap,
        "random_weights_for_testing": cfg.testing,
    }
    return {"protocol": protocol, "versions": versions(), "classes": classes}
