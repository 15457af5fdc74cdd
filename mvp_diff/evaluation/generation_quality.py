"""Generation quality of one class: IS and the three IC-LPIPS variants of each defect type's generated
images (quality.py computes them), cached per defect type."""

import functools
import math
import zlib

import numpy as np

from ..checkpoint import is_offline
from .cache import reuse_or_compute
from .quality import (
    IC_LPIPS_KEYS,
    IS_SIZE,
    LPIPS_NETS,
    SEAS_CLUSTER_CAP,
    SEAS_IMAGES,
    LpipsMatrix,
    ic_lpips_dfmgan,
    ic_lpips_ojha,
    inception_score,
    load_images,
    load_lpips,
    nanmean,
)
from .results import QualityResult


def lpips_nets(cfg):
    """{IC-LPIPS variant: backbone}: each reference script's own unless --lpips_net forces one."""
    if cfg.lpips_net == "auto":
        return dict(LPIPS_NETS)
    return dict.fromkeys(LPIPS_NETS, cfg.lpips_net)


class Lpips:
    """LPIPS networks built once per run."""

    def __init__(self, cfg):
        self.cfg, self.models = cfg, {}

    def distance(self, net):
        if net not in self.models:
            model = load_lpips(net, self.cfg.device, self.cfg.testing, offline=is_offline(self.cfg.local_files_only))
            self.models[net] = LpipsMatrix(model, self.cfg.device, self.cfg.quality_batch_size)
        return self.models[net]


def quality_row(cfg, defect, files, real_train, real_all, lpips_cache):
    """IS and the three IC-LPIPS variants of one defect type's generated images."""
    nets = lpips_nets(cfg)
    is_mean, is_std, splits = inception_score(
        files, cfg.device, cfg.quality_batch_size, cfg.isc_splits, cfg.inception_weights, cfg.testing, num_workers=cfg.train.num_workers
    )
    row = {"n": len(files), "is": is_mean, "is_std": is_std, "is_splits": splits} | dict.fromkeys(IC_LPIPS_KEYS.values(), math.nan)
    if real_all:
        gen = load_images(files, cfg.lpips_size, desc=f"{defect}: generated")
        real = load_images(real_all, cfg.lpips_size)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(defect.encode())])
        row["ic_lpips_ojha"], _, row["clusters_ojha"] = ic_lpips_ojha(
            lpips_cache.distance(nets["ojha"]), gen, load_images(real_train, cfg.lpips_size), rng, cfg.ic_cluster_size
        )
        row["ic_lpips_dfmgan"], _, row["clusters_dfmgan"] = ic_lpips_dfmgan(lpips_cache.distance(nets["dfmgan"]), gen, real, cfg.ic_cluster_cap)
        row["ic_lpips_seas"], _, row["clusters_seas"] = ic_lpips_dfmgan(
            lpips_cache.distance(nets["seas"]), gen[: SEAS_IMAGES], real, SEAS_CLUSTER_CAP
        )
    return row


def quality_for_class(cfg, split, generated, work, lpips_cache, notes):
    nets = lpips_nets(cfg)
    params = {k: getattr(cfg, k) for k in ("isc_splits", "lpips_size", "ic_cluster_size", "ic_cluster_cap", "seed", "testing", "inception_weights")}
    rows = {}
    for defect, samples in generated.items():
        real_train = [s.image for s in split.generator_train.get(defect, [])]
        real_all = [a.image for a in split.class_data.anomalies.get(defect, [])]
        files = [s.image for s in samples]
        inputs = {**params, "nets": nets, "defect": defect, "real_train": [str(p) for p in real_train], "is_size": IS_SIZE}
        compute = functools.partial(quality_row, cfg, defect, files, real_train, real_all, lpips_cache)
        rows[defect] = reuse_or_compute(work / "quality" / f"{defect}.json", inputs, files + real_all, compute)
        if not real_all:
            notes.append(f"{split.class_data.name}/{defect}: no real anomalies of this type; IC-LPIPS skipped for it")
    mean = {k: nanmean([r[k] for r in rows.values()]) for k in ("is", *IC_LPIPS_KEYS.values())}
    mean["n"] = sum(r["n"] for r in rows.values())
    return QualityResult(per_defect=rows, mean=mean, lpips_nets=nets)
