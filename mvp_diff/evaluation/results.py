"""What an evaluation run produces, one small dataclass per level. The pipeline builds them, the cache
stores them as JSON and reads them back into the same classes, report.py reads them by attribute and
metrics.json is `EvaluationResult.to_json()`. Metric rows stay plain {name: value} dicts: the metric
set differs between protocols and the report prints whatever a row holds."""

import math
from dataclasses import asdict, dataclass, field, is_dataclass

import numpy as np


def clean(obj):
    """JSON-safe copy: dataclasses become dicts, NaN and inf become null."""
    if is_dataclass(obj):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


@dataclass
class QualityResult:
    """IS and IC-LPIPS of one class's generated images: a row per defect type and their mean."""

    per_defect: dict  # defect -> {"n", "is", "is_std", "is_splits", "ic_lpips_ojha", "ic_lpips_dfmgan", "ic_lpips_seas", ...}
    mean: dict
    lpips_nets: dict  # IC-LPIPS variant -> backbone


@dataclass
class SettingResult:
    """One downstream model: its test metrics, per defect type too, how it was selected, what it saw."""

    metrics: dict
    per_defect: dict
    selection: dict
    train_counts: dict


@dataclass
class SegmentationResult:
    settings: dict  # setting key -> SettingResult, in report order
    steps: int = 0
    steps_per_epoch: int = 0


@dataclass
class ClassResult:
    counts: dict  # defect -> {"generator_train", "downstream_train", "validation", "test"}
    generated: dict = field(default_factory=dict)  # generator name -> its class folder
    generated_counts: dict = field(default_factory=dict)  # generator name -> {defect: samples}
    quality: dict = None  # generator name -> QualityResult
    classification: dict = None  # generator name -> {"accuracy", "types", "n_test", "per_type"}
    segmentation: SegmentationResult = None
    gallery: list = None
    notes: list = field(default_factory=list)


@dataclass
class EvaluationResult:
    protocol: dict  # what was run, as the report states it
    versions: dict
    classes: dict  # classname -> ClassResult
    mean: dict = field(default_factory=dict)  # over classes: {"classes", "segmentation": {setting: metrics}, "quality": {generator: means}}

    def to_json(self):
        return clean(self)
