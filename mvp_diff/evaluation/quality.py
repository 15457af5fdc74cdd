"""Generation quality: Inception Score (torch-fidelity) and IC-LPIPS (lpips), per defect type.

IS: images resized to 256x256 first, as the peers do, then torch-fidelity (which resizes to 299).

IC-LPIPS has incompatible definitions in the field; each is computed and named after its source:
  Ojha et al. (WisconsinAIVision/few-shot-gan-adaptation, feat_cluster.py; the rule AnomalyDiffusion
      cites): clusters = the real anomalies that trained the generator; each generated image joins
      its nearest one by LPIPS; per cluster, up to 50 random members, mean LPIPS over their pairs;
      clusters with fewer than two members are NaN; NaN-mean over clusters. VGG at 256x256.
  DFMGAN (Ldhlwh/DFMGAN, metrics/lpips.py): clusters = all real anomalies of the type; a cluster
      keeps its first 200 members; clusters with fewer than two members count 0; plain mean. AlexNet.
  SeaS (Dan5N/SeaS, utils/metrics/metrics_lpips.py): DFMGAN's rule with VGG, a cap of 140 members
      and the first 1000 generated images. The published 0.32 / 0.34 come from SeaS's table.

Pretrained weights come from the torch hub cache (torch.hub.get_dir()/checkpoints/), fetched there on
first use as torchvision and torch-fidelity do; offline, a missing file is an error that names it. `testing=True` builds the networks with
random weights instead; it exists for the test suite and its numbers mean nothing.
"""

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..files import read_rgb
from ..progress import progress_bar

TESTING_EXTRACTOR = "mvp-diff-random-testing"
LPIPS_NETS = {"ojha": "vgg", "dfmgan": "alex", "seas": "vgg"}  # each variant's reference script's backbone
IC_LPIPS_KEYS = {variant: f"ic_lpips_{variant}" for variant in LPIPS_NETS}
IC_LPIPS_SOURCES = {"ojha": "Ojha et al.", "dfmgan": "DFMGAN", "seas": "SeaS"}
SEAS_CLUSTER_CAP, SEAS_IMAGES = 140, 1000
IS_SIZE = 256

# torchvision trunks that lpips loads; lpips ships its own linear layers (lpips/weights/v0.1/NET.pth)
LPIPS_TRUNKS = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


def hub_checkpoint(filename) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def inception_weights(path=None):
    """(path of torch-fidelity's Inception weights, its URL); `path` overrides the hub cache."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return (Path(path) if path else hub_checkpoint(URL_INCEPTION_V3.rsplit("/", 1)[-1])), URL_INCEPTION_V3


def _absent_weights(need_is=True, lpips_nets=(), inception_path=None, extra=()):
    """[(path, URL or None)] of every pretrained file that is not where the libraries look; URL None
    for files that cannot be fetched (a user-given path, lpips' own layers). `extra`: more (hub cache
    file name, URL) pairs."""
    absent = [(hub_checkpoint(name), url) for name, url in extra if not hub_checkpoint(name).is_file()]
    if need_is:
        path, url = inception_weights(inception_path)
        if not path.is_file():
            absent.append((path, None if inception_path else url))
    for net in sorted(set(lpips_nets)):
        name, url = LPIPS_TRUNKS[net]
        path = hub_checkpoint(name)
        if not path.is_file():
            absent.append((path, url))
        import lpips

        linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        if not linear.is_file():
            absent.append((linear, None))
    return absent


def _describe(path, url):
    if url:
        return f"{path} (from {url})"
    if path.parent.name == "v0.1":  # lpips' own linear layers
        return f"{path} (ships with the lpips package: pip install --force-reinstall lpips)"
    return str(path)


def missing_weights(need_is=True, lpips_nets=(), inception_path=None, extra=()):
    """['FILE (download URL)'] for every pretrained file that is not where the libraries look."""
    return [_describe(path, url) for path, url in _absent_weights(need_is, lpips_nets, inception_path, extra)]


def require_weights(need_is=True, lpips_nets=(), inception_path=None, extra=(), offline=False):
    """Fetch missing pretrained files into the torch hub cache, where and as torchvision and
    torch-fidelity fetch them; when fetching is off (`offline`) or fails, one error naming every file."""
    failed, reason = [], None
    for path, url in _absent_weights(need_is, lpips_nets, inception_path, extra):
        if url is None or offline:
            failed.append((path, url))
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except (OSError, ValueError, RuntimeError) as err:  # URLError, HTTPError and timeouts are OSErrors
            failed.append((path, url))
            reason = reason or f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if failed:
        why = "fetching is off (HF_HUB_OFFLINE / --local_files_only)" if offline else f"could not download them ({reason})" if reason else "not found"
        raise UserError(
            f"pretrained weights missing and {why}: put " + "; ".join(_describe(p, u) for p, u in failed)
            + " (TORCH_HOME moves the cache; --parts segmentation,gallery skips IS, IC-LPIPS and classification)"
        )


# --- Inception Score -----------------------------------------------------------------------------


def logits_extractor_base():
    """A torch-fidelity feature extractor base that provides only `logits_unbiased` (what IS reads);
    subclasses define forward(uint8 images) -> (N x 1008 logits,)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class LogitsExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("logits_unbiased",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits_unbiased"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    return LogitsExtractor


def _testing_extractor_class():
    class RandomTestingExtractor(logits_extractor_base()):
        """Stand-in for Inception with random (seeded) weights: uint8 images -> 1008 logits. Tests only."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            gen = torch.Generator().manual_seed(0)
            self.conv1 = nn.Conv2d(3, 8, 5, stride=4)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
            self.fc = nn.Linear(16, 1008)
            for p in self.parameters():
                p.data = torch.randn(p.shape, generator=gen) * 0.5

        def forward(self, x):
            x = F.interpolate((x.float() - 128) / 128, size=(64, 64), mode="bilinear", align_corners=False)
            x = F.relu(self.conv2(F.relu(self.conv1(x))))
            return (self.fc(x.mean(dim=(2, 3))),)

    return RandomTestingExtractor


def register_extractor(name, cls):
    """Register a torch-fidelity feature extractor once (tests add their own)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, cls)


def isc_splits_for(n, splits=10):
    """torch-fidelity's default of 10 splits, fewer for small sets (at least 10 images per split)."""
    return max(1, min(splits, n // 10))


def inception_score(files, device="cpu", batch_size=32, splits=10, weights_path=None, testing=False, extractor=None, num_workers=0):
    """(IS mean, IS std, splits used) of image files with torch-fidelity's Inception Score."""
    import torch_fidelity
    from torch_fidelity.datasets import ImagesPathDataset
    from torchvision.transforms.functional import pil_to_tensor

    kwargs = {}
    if extractor is None and testing:
        register_extractor(TESTING_EXTRACTOR, _testing_extractor_class())
        extractor = TESTING_EXTRACTOR
    if extractor is None:
        extractor = "inception-v3-compat"
        kwargs["feature_extractor_weights_path"] = str(inception_weights(weights_path)[0])
    used = isc_splits_for(len(files), splits)
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    from PIL import Image

    def transforms(im):  # the peers resize to 256 before Inception; torch-fidelity then goes to 299
        return pil_to_tensor(im.convert("RGB").resize((IS_SIZE, IS_SIZE), Image.BILINEAR))

    result = torch_fidelity.calculate_metrics(
        input1=ImagesPathDataset([str(f) for f in files], transforms),
        isc=True,
        isc_splits=used,
        feature_extractor=extractor,
        cuda=device.type == "cuda",
        batch_size=batch_size,
        cache=False,
        save_cpu_ram=num_workers == 0,
        verbose=False,
        **kwargs,
    )
    return result["inception_score_mean"], result["inception_score_std"], used


# --- IC-LPIPS ------------------------------------------------------------------------------------


def load_lpips(net, device="cpu", testing=False, offline=False):
    """lpips.LPIPS with its pretrained trunk, or (testing) a seeded random trunk."""
    import lpips

    if not testing:
        require_weights(need_is=False, lpips_nets=[net], offline=offline)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pnet_rand=testing, verbose=False).to(device).eval()


class LpipsMatrix:
    """Pairwise LPIPS of two image sets, each image through the network once.

    LPIPS(x, y) = sum over layers l and channels c of w_lc * mean over pixels of (f_l(x) - f_l(y))^2,
    f normalised over channels (lpips' own layers and weights). The square expands into per-image
    terms and one matrix product per channel, so n x m distances cost n + m forward passes instead of
    2nm; equal to `model(x, y)` up to float rounding (tested). Features of the second set are kept in
    chunks of at most `budget_mb`."""

    def __init__(self, model, device="cpu", batch_size=16, budget_mb=2048):
        self.model, self.device, self.batch_size, self.budget = model, torch.device(device), batch_size, budget_mb * 2**20
        self.weights = [lin.model[-1].weight.detach().flatten().float() for lin in model.lins]

    @torch.no_grad()
    def features(self, images):
        """[(N, C_l, HW_l)] per layer for uint8 images (N, 3, S, S), channel-normalised."""
        import lpips

        out = None
        for start in range(0, len(images), self.batch_size):
            x = images[start : start + self.batch_size].to(self.device).float() / 127.5 - 1
            feats = self.model.net.forward(self.model.scaling_layer(x))
            feats = [lpips.normalize_tensor(f.float()).flatten(2) for f in feats]
            out = feats if out is None else [torch.cat([a, b]) for a, b in zip(out, feats)]
        return out

    @torch.no_grad()
    def _block(self, fx, fy):
        total = 0
        for w, a, b in zip(self.weights, fx, fy):
            hw = a.shape[2]
            sq_a = (a * a).sum(2) / hw  # (n, C)
            sq_b = (b * b).sum(2) / hw  # (m, C)
            cross = torch.bmm(a.permute(1, 0, 2), b.permute(1, 2, 0)) / hw  # (C, n, m)
            per_channel = sq_a.T[:, :, None] + sq_b.T[:, None, :] - 2 * cross
            total = total + (w[:, None, None] * per_channel.clamp_min(0)).sum(0)
        return total

    def __call__(self, xs, ys):
        """(len xs, len ys) numpy matrix of LPIPS distances between uint8 image batches."""
        if len(xs) == 0 or len(ys) == 0:
            return np.zeros((len(xs), len(ys)))
        first = self.features(ys[:1])
        per_image = sum(f.numel() * 4 for f in first)
        chunk = max(1, int(self.budget // per_image))
        out = np.zeros((len(xs), len(ys)))
        for y0 in range(0, len(ys), chunk):
            fy = self.features(ys[y0 : y0 + chunk])
            for x0 in range(0, len(xs), self.batch_size):
                fx = self.features(xs[x0 : x0 + self.batch_size])
                out[x0 : x0 + self.batch_size, y0 : y0 + chunk] = self._block(fx, fy).cpu().numpy()
        return out


def load_images(paths, size, desc="images"):
    """uint8 tensor (N, 3, size, size), resized bilinearly (grey images become 3 equal channels)."""
    from PIL import Image

    out = []
    for p in progress_bar(paths, desc=desc, leave=False, disable=len(paths) < 50):
        image = Image.fromarray(read_rgb(p)).resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return torch.stack(out) if out else torch.zeros((0, 3, size, size), dtype=torch.uint8)


def nearest(distances, generated, real):
    """Index of the nearest real image (first on ties) for every generated one."""
    return distances(generated, real).argmin(axis=1)


def nanmean(values):
    """Mean of the finite values (None and NaN left out); NaN when there are none."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _mean_pairwise(distances, images, members):
    sub = images[torch.as_tensor(members)]
    d = distances(sub, sub)
    return float(d[np.triu_indices(len(members), k=1)].mean())


def _cluster_values(distances, generated, real, choose, lonely, desc):
    """Each generated image joins its nearest real image; per cluster, the mean pairwise distance of
    the members `choose` keeps (`lonely` under two). Returns (values, cluster sizes before choosing)."""
    assign = nearest(distances, generated, real)
    values, sizes = [], []
    for k in progress_bar(range(len(real)), desc=desc, leave=False, disable=len(real) < 5):
        members = np.flatnonzero(assign == k)
        sizes.append(int(len(members)))
        members = choose(members)
        values.append(_mean_pairwise(distances, generated, members) if len(members) >= 2 else lonely)
    return values, sizes


def ic_lpips_ojha(distances, generated, real_train, rng, cluster_size=50):
    """Ojha et al. (feat_cluster.py). `distances(xs, ys)` -> matrix. Returns (score, per-cluster values, cluster sizes)."""
    if len(real_train) == 0 or len(generated) == 0:
        return math.nan, [], []
    values, sizes = _cluster_values(distances, generated, real_train, lambda m: rng.permutation(m)[:cluster_size].tolist(), math.nan, "IC-LPIPS (a)")
    return nanmean(values), values, sizes


def ic_lpips_dfmgan(distances, generated, real_all, cap=200):
    """DFMGAN (metrics/lpips.py); SeaS with VGG, cap 140, first 1000 images. Returns (score, per-cluster values, cluster sizes before the cap)."""
    if len(real_all) == 0 or len(generated) == 0:
        return math.nan, [], []
    values, sizes = _cluster_values(distances, generated, real_all, lambda m: m[:cap].tolist(), 0.0, "IC-LPIPS (b)")
    return float(np.mean(values)), values, sizes
