"""Downstream segmentation: what a set of anomaly image-mask pairs is worth to a supervised model.

Model: the discriminative sub-network of DRAEM (Zavrtanik et al., ICCV 2021), a U-Net with six
encoder stages (base, 2x, 4x, 8x, 8x, 8x channels; five 2x poolings) and skip connections, trained
with DRAEM's focal loss (gamma 2) and Adam (lr 1e-4, x0.2 at 80% and 90% of the steps). DRAEM feeds it
the image concatenated with a reconstruction from a second network; we train no reconstruction network,
so the input is the image alone (3 channels), as the synthesis papers' "U-Net on generated pairs"
protocol does.

Training: every batch is half defect-free train images (mask all zero) and half anomaly pairs, drawn
from two seeded streams. One epoch = enough steps to show every train/good image once, so every
setting gets the same number of steps whatever its number of anomaly pairs. After every
`val_every` epochs the model is scored on the validation set (carved from the training side, see
data.real_split) and the best pixel AP is kept. The test set is only read after training, once.
"""

import copy
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..files import read_mask, read_rgb
from ..progress import progress_bar
from .data import read_box_mask
from .metrics import (
    aupro,
    auroc,
    average_precision,
    f1_max,
    f1_max_at_thresholds,
    image_f1_max,
    per_image_best_iou,
    segmentation_metrics,
)

# --- model ---------------------------------------------------------------------------------------


def _double_conv(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


def _up(cin, cout):
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class DiscriminativeUNet(nn.Module):
    """DRAEM's discriminative sub-network: input sides must be multiples of 32; returns logits
    (N, out_channels, H, W), channel 1 = anomalous.

    decoder="draem" is DRAEM's own (DiscriminativeSubNetwork in AnomalyDiffusion's
    unet_utils/model_unet.py): level i decodes to widths[i-1] (b, b, 2b, 4b, 8b), 28.4 M parameters at
    b = 64. decoder="wide" decodes every level to its skip's width, 36.9 M parameters."""

    def __init__(self, in_channels=3, out_channels=2, base_channels=64, decoder="wide"):
        super().__init__()
        b = base_channels
        widths = [b, 2 * b, 4 * b, 8 * b, 8 * b, 8 * b]
        out = widths[:5] if decoder == "wide" else [b, b, 2 * b, 4 * b, 8 * b]
        self.encoder = nn.ModuleList(_double_conv(cin, cout) for cin, cout in zip([in_channels] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2)
        # decoder: up from level i+1 to out[i], then fuse with level i's skip
        below = out[1:] + [widths[5]]
        self.ups = nn.ModuleList(_up(below[i], out[i]) for i in reversed(range(5)))
        self.fuse = nn.ModuleList(_double_conv(out[i] + widths[i], out[i]) for i in reversed(range(5)))
        self.head = nn.Conv2d(b, out_channels, 3, padding=1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(self.ups, self.fuse):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def draem_init(module):
    """DRAEM's and AnomalyDiffusion's weights_init (train-localization.py): conv weights N(0, 0.02),
    BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def focal_loss(logits, target, gamma=2.0, smooth=1e-5):
    """DRAEM's focal loss on the softmax of `logits` (N, 2, H, W) against a 0/1 `target` (N, 1, H, W);
    the one-hot target is clamped to [smooth, 1 - smooth] as there."""
    prob = logits.float().softmax(dim=1)
    one_hot = torch.cat([1 - target, target], dim=1).clamp(smooth, 1 - smooth)
    pt = (one_hot * prob).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


# --- data ----------------------------------------------------------------------------------------


def load_pair(sample, size, use_box=False):
    """(uint8 HxWx3 image, bool HxW mask) resized to size x size. Masks are resized by area and a
    pixel counts as defect when at least half of it is covered (so pixel metrics are measured at
    `size`, the model's resolution, as the field does at 256)."""
    image = read_rgb(sample.image)
    down = image.shape[0] > size or image.shape[1] > size
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)
    if sample.mask is None:
        return image, np.zeros((size, size), bool)
    mask = read_box_mask(sample) if use_box else read_mask(sample.mask)
    mask = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)
    return image, mask >= 0.5


class PairDataset(Dataset):
    """Samples (with an optional box flag) preloaded at `size`; items are (image float 3xSxS in [0, 1],
    mask float 1xSxS, image label)."""

    def __init__(self, items, size, num_workers=0, desc="loading"):
        self.items = [(item, False) if not isinstance(item, tuple) else item for item in items]
        self.size = size
        threads = max(1, num_workers)
        with ThreadPoolExecutor(threads) as pool:
            jobs = pool.map(lambda pair: load_pair(pair[0], size, pair[1]), self.items)
            loaded = list(progress_bar(jobs, total=len(self.items), desc=desc, leave=False, disable=len(self.items) < 50))
        self.images = np.stack([im for im, _ in loaded]) if loaded else np.zeros((0, size, size, 3), np.uint8)
        self.masks = np.stack([m for _, m in loaded]) if loaded else np.zeros((0, size, size), bool)
        self.labels = np.array([s.is_anomaly for s, _ in self.items], bool)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255.0
        mask = torch.from_numpy(self.masks[i]).float()[None]
        return image, mask, int(self.labels[i])


class HalfHalfBatchSampler(Sampler):
    """`steps` batches of `half` indices from [0, n_good) and `half` from [n_good, n_good + n_anomaly),
    each stream a sequence of seeded permutations (the good stream is the same in every setting)."""

    def __init__(self, n_good, n_anomaly, half, steps, seed):
        self.n_good, self.n_anomaly, self.half, self.steps, self.seed = n_good, n_anomaly, half, steps, seed

    @staticmethod
    def _stream(n, rng):
        while True:
            yield from rng.permutation(n).tolist()

    def __iter__(self):
        good = self._stream(self.n_good, np.random.default_rng([self.seed, 0]))
        anomaly = self._stream(self.n_anomaly, np.random.default_rng([self.seed, 1]))
        for _ in range(self.steps):
            yield [next(good) for _ in range(self.half)] + [self.n_good + next(anomaly) for _ in range(self.half)]

    def __len__(self):
        return self.steps


# --- training ------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    image_size: int = 256
    epochs: int = 100
    batch_size: int = 8
    base_channels: int = 64
    lr: float = 1e-4
    val_every: int = 1
    num_workers: int = 0
    mixed_precision: str = "bf16"  # training autocast, on CUDA only
    # Scores in float32 by default: bf16 keeps 8 mantissa bits, which collapses the anomaly maps' distinct
    # values (measured: 187,697 distinct pixel scores -> 2,124) and with them the threshold sweep.
    predict_mixed_precision: str = "no"
    device: str = "cpu"
    seed: int = 0
    decoder: str = "wide"
    init: str = "pytorch"  # or "normal": draem_init
    fixed_steps_per_epoch: int = None  # None: enough to show every train/good image once
    selection: str = "validation"  # or "last"
    image_score_pool: int = 1

    def steps_per_epoch(self, n_good):
        return self.fixed_steps_per_epoch or max(1, math.ceil(n_good / (self.batch_size // 2)))


def _autocast(cfg, mode=None):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode or cfg.mixed_precision)
    enabled = torch.device(cfg.device).type == "cuda" and dtype is not None
    return torch.autocast("cuda", dtype=dtype or torch.float16, enabled=enabled)


@torch.no_grad()
def predict(model, dataset, cfg, desc="predict"):
    """Anomaly maps (N, S, S) float32 in [0, 1] of a PairDataset."""
    model.eval()
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    maps = []
    for images, _, _ in progress_bar(loader, desc=desc, leave=False, disable=len(loader) < 5):
        with _autocast(cfg, cfg.predict_mixed_precision):
            logits = model(images.to(cfg.device))
        maps.append(logits.float().softmax(dim=1)[:, 1].cpu().numpy())
    return np.concatenate(maps) if maps else np.zeros((0, cfg.image_size, cfg.image_size), np.float32)


def train_model(good_set, anomaly_set, val_set, cfg: TrainConfig, desc="train", after_epoch=None):
    """Train on half good / half anomaly batches; keep the epoch with the best validation pixel AP
    (cfg.selection "validation") or the last one ("last").

    Takes the training and validation data only: the test set cannot take part in model selection.
    `after_epoch(model, epoch)` lets a protocol whose peer selects on the test set record that
    number beside the honest one; it cannot change the weights returned.
    Returns (model with the selected weights, selection info)."""
    if cfg.image_size % 32:
        raise ValueError(f"image size {cfg.image_size} is not a multiple of 32")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # same initial weights in every setting
    model = DiscriminativeUNet(3, 2, cfg.base_channels, cfg.decoder)
    if cfg.init == "normal":
        model.apply(draem_init)
    model = model.to(device)
    half = max(1, cfg.batch_size // 2)
    steps_per_epoch = cfg.steps_per_epoch(len(good_set))
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.8 * total), int(0.9 * total)], gamma=0.2)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.mixed_precision == "fp16")

    train_set = torch.utils.data.ConcatDataset([good_set, anomaly_set])
    sampler = HalfHalfBatchSampler(len(good_set), len(anomaly_set), half, total, cfg.seed)
    loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )  # fmt: skip
    can_select = cfg.selection == "validation" and val_set is not None and len(val_set) > 0 and val_set.labels.any() and val_set.masks.any()
    best = {"epoch": cfg.epochs, "val_pixel_ap": math.nan, "val_threshold": None}
    best_state, history = None, []
    model.train()
    bar = progress_bar(loader, total=total, desc=desc)
    for step, (images, masks, _) in enumerate(bar, 1):
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with _autocast(cfg):
            logits = model(images)
        loss = focal_loss(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        epoch, end_of_epoch = divmod(step, steps_per_epoch)
        if end_of_epoch == 0 and after_epoch is not None:
            after_epoch(model, epoch)
            model.train()
        if end_of_epoch == 0 and can_select and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            maps = predict(model, val_set, cfg, desc="validate")
            ap = average_precision(maps, val_set.masks)
            _, threshold, _ = f1_max(maps, val_set.masks)
            history.append({"epoch": epoch, "val_pixel_ap": ap})
            if best_state is None or ap > best["val_pixel_ap"]:
                best = {"epoch": epoch, "val_pixel_ap": ap, "val_threshold": threshold}
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            model.train()
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    best.update(steps=total, steps_per_epoch=steps_per_epoch, history=history, selected_on="validation pixel AP" if can_select else "last epoch" if cfg.selection == "last" else "last epoch (no validation anomalies)")
    return model, best


def image_scores(maps, pool=1):
    """Max of each map after a pool x pool average (AnomalyDiffusion/DRAEM: 21, stride 1, zero padding)."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    if pool > 1:
        t = torch.nn.functional.avg_pool2d(t, pool, stride=1, padding=pool // 2)
    return t.flatten(1).max(1).values.numpy()


def all_metrics(maps, masks, labels, pool=1, val_threshold=None):
    """Every metric the protocols print, for one set of maps."""
    out = segmentation_metrics(maps, masks, labels, val_threshold)
    scores = image_scores(maps, pool)
    out["image_auroc"] = auroc(scores, labels)
    out["image_ap"] = average_precision(scores, labels)
    out["image_f1_max"] = image_f1_max(labels, scores)
    out["pixel_f1_max_21"] = f1_max_at_thresholds(maps, masks)
    out["aupro"] = aupro(maps, masks)
    out["iou_per_image"] = per_image_best_iou(maps[labels], masks[labels]) if labels.any() else math.nan
    return out


def evaluate_model(model, test_set, cfg, val_threshold=None, desc="test"):
    """Metrics on the test set, overall and per defect type (that type's anomalies with all good images)."""
    maps = predict(model, test_set, cfg, desc=desc)
    overall = all_metrics(maps, test_set.masks, test_set.labels, cfg.image_score_pool, val_threshold)
    defects = np.array([s.defect_type for s, _ in test_set.items])
    per_defect = {}
    good = ~test_set.labels
    for defect in sorted(set(defects[test_set.labels])):
        keep = (defects == defect) | good
        per_defect[defect] = {"n": int((defects == defect).sum())}
        per_defect[defect] |= all_metrics(maps[keep], test_set.masks[keep], test_set.labels[keep], cfg.image_score_pool, val_threshold)
    return overall, per_defect

