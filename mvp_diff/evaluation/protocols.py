"""The downstream protocols, one small definition each, read from the code that produced the
published numbers. A protocol fixes what the segmenter trains on, how the real anomalies are split,
the model and its budget, how the reported epoch is chosen and which metrics are printed. Numbers are
comparable only within one protocol: the report places each published figure in its protocol's
section and nowhere else.

Budget flags (--epochs, --image_size, --base_channels) override a protocol for smoke runs; the report
lists every override next to the protocol's name.
"""

from dataclasses import dataclass, field, replace

PIXEL = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
IMAGE = ("image_auroc", "image_ap", "image_f1_max")


@dataclass(frozen=True)
class Protocol:
    name: str
    reference: str  # the files this definition is read from
    split_rounding: str  # "ceil" or "floor": how many of a defect type's anomalies (sorted by name) trained the generator
    settings: tuple  # downstream training mixes, see pipeline.DOWNSTREAM_SETTINGS
    max_generated_per_type: int = None  # generated pairs per defect type in a training mix (None: all)
    epochs: int = 100
    steps_per_epoch: int = None  # None: ceil(train/good / half batch), so every setting gets the same steps
    image_size: int = 256
    base_channels: int = 64
    decoder: str = "wide"  # "draem": DRAEM's decoder (28.4 M parameters at width 64); "wide": skip-width decoder (36.9 M)
    init: str = "pytorch"  # "normal": DRAEM's weights_init, conv N(0, 0.02), BatchNorm N(1, 0.02)
    selection: str = "validation"  # honest choice: "validation" (best val. pixel AP) or "last" (fixed last epoch)
    peer_selection: str = None  # the peer's own rule when it reads the test set, reported beside the honest number
    image_score_pool: int = 1  # image score = max of the map average-pooled with this window (1: raw max)
    metrics: tuple = PIXEL + IMAGE
    published: dict = field(default_factory=dict)  # {"AnomalyDiffusion": {"pixel_auroc": 0.991, ...}}
    notes: tuple = ()

    def with_budget(self, **overrides):
        """(protocol with the given budget values, {flag: (protocol value, used value)} that differ)."""
        changed = {k: (getattr(self, k), v) for k, v in overrides.items() if v is not None and v != getattr(self, k)}
        return replace(self, **{k: v for k, (_, v) in changed.items()}), changed


PROTOCOLS = {
    # Ours: the generator saw the first ceil(n/3) (Stage 1's records), so those are the train side and
    # the rest the test set; model selection on a validation split of the train side, never the test set.
    "mvpdiff": Protocol(
        name="mvpdiff",
        reference="this project (evaluate.py)",
        split_rounding="ceil",
        settings=("a", "b", "c", "d"),
        metrics=PIXEL + ("iou_per_image", "iou_val_threshold") + IMAGE,
    ),
    # sjtuplayer/anomalydiffusion: unet_utils/data_loader.py (MVTec_Anomaly_Detection: generated pairs,
    # length=500 per type, with train/good), train-localization.py (DiscriminativeSubNetwork from
    # unet_utils/model_unet.py, weights_init N(0, 0.02), Adam 1e-4, bs 8, 200 epochs of ceil(500/8) = 63
    # steps, MultiStepLR at 80%/90%, the checkpoint kept is the epoch with the best image AUROC + pixel
    # AUROC + pixel AP + AUPRO on the test set), test-localization.py (256x256, image score = max of the
    # 21x21 average-pooled map, AUPRO). Split: the first floor(n/3) of each type trained the generator.
    "anomalydiffusion": Protocol(
        name="anomalydiffusion",
        reference="sjtuplayer/anomalydiffusion train-localization.py, test-localization.py, unet_utils/data_loader.py",
        split_rounding="floor",
        settings=("g",),
        max_generated_per_type=500,
        epochs=200,
        steps_per_epoch=63,
        decoder="draem",
        init="normal",
        selection="last",
        peer_selection="test: best image AUROC + pixel AUROC + pixel AP + AUPRO",
        image_score_pool=21,
        metrics=("pixel_auroc", "pixel_ap", "pixel_f1_max_21", "pixel_f1_max", "aupro") + IMAGE,
        published={"AnomalyDiffusion (its paper, MVTec AD mean)": {"pixel_auroc": 0.991, "pixel_ap": 0.814, "pixel_f1_max_21": 0.763}},
        notes=("Pixel F1-max (21 thr.) is the peer's rule: thresholds 0, 0.05, ..., 1 with `>`; pixel F1-max takes every threshold.",),
    ),
    # Dan5N/SeaS with its segmenter HUST-SLOW/LFD (models/_LFD.py, utils/utils.py, datasets/mvtec_ad.py):
    # segmenters train on the generated pairs + the first floor(n/3) real anomalies + train/good and are
    # tested at a fixed epoch; IoU = per anomalous test image the best IoU over thresholds, averaged over
    # anomalous images. SeaS's 57.66 averages three segmenters (BiSeNet V2, UPerNet, LFD); here DRAEM's
    # U-Net stands in for them, so the protocol's data and metric match, its model does not.
    "seas": Protocol(
        name="seas",
        reference="Dan5N/SeaS; HUST-SLOW/LFD models/_LFD.py, utils/utils.py, datasets/mvtec_ad.py",
        split_rounding="floor",
        settings=("s",),
        decoder="draem",
        selection="last",
        metrics=("iou_per_image",) + PIXEL + IMAGE,
        published={"SeaS (its paper, MVTec AD mean of three segmenters)": {"iou_per_image": 0.5766}},
        notes=("Segmenter: DRAEM's U-Net stands in for SeaS's BiSeNet V2 / UPerNet / LFD.",),
    ),
}

# Generation quality as published (SeaS's table, MVTec AD mean); IS on 256 px images, IC-LPIPS (SeaS).
PUBLISHED_QUALITY = {
    "AnomalyDiffusion (SeaS's table)": {"is": 1.80, "ic_lpips_seas": 0.32},
    "SeaS (SeaS's table)": {"is": 1.88, "ic_lpips_seas": 0.34},
}
