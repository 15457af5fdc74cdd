"""Training examples encoded once: what the frozen VAE and text encoder make of each Stage 1 record.

Per record and flip variant: the VAE latent *distribution* (mean, std) of the defect image and of the
image with its box blanked, and the box mask at latent size; per record: the sentence's text
embedding. The training loop draws latents from the cached distributions with its own per-sample
generators, which is exactly what encoding every step would do (`latent_dist.sample()` is
`mean + std * randn`), without running the VAE and text encoder again.

Images are prepared as `StableDiffusionInpaintPipeline` prepares them at inference: its
`VaeImageProcessor`s resize to the training resolution, the mask is binarised at 0.5, the masked image
is `image * (mask < 0.5)` and the mask is brought to latent size with `F.interpolate` (nearest).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import read_mask, read_rgb
from .progress import progress_bar

# torch.flip dims of each variant: none, horizontal, vertical, both
FLIP_DIMS = {"none": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}


def flip_variants(hflip=False, vflip=False):
    """Variant names to cache; drawing one uniformly is an independent 50% flip per enabled axis."""
    names = ["none"]
    if hflip:
        names.append("hflip")
    if vflip:
        names.append("vflip")
    if hflip and vflip:
        names.append("hvflip")
    return names


def image_processors(vae_scale_factor=8):
    from diffusers.image_processor import VaeImageProcessor

    image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    mask_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return image_processor, mask_processor


def load_pil(image_path, mask_path):
    """(RGB image, L mask 0/255) as PIL; grey and 16-bit images become RGB."""
    image = Image.fromarray(read_rgb(image_path))
    mask = Image.fromarray(read_mask(mask_path).astype(np.uint8) * 255)
    return image, mask


def resize_pair(image, mask, size):
    """(RGB image, 0/255 mask) PIL images at `size` (w, h), resized as the inpainting pipeline's own
    processors do (Lanczos; the mask binarised at half), so training, validation and Stage 3 agree."""
    image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    mask = mask.convert("L").resize(size, Image.Resampling.LANCZOS).point(lambda v: 255 if v >= 128 else 0)
    return image, mask


class ExampleImages(torch.utils.data.Dataset):
    """(pixel values in [-1, 1] 3xHxW, binary mask 1xHxW) of (image, box mask) path pairs."""

    def __init__(self, pairs, resolution, vae_scale_factor=8):
        self.pairs = list(pairs)
        self.resolution = resolution
        self.vae_scale_factor = vae_scale_factor

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image_processor, mask_processor = image_processors(self.vae_scale_factor)
        image, mask = load_pil(*self.pairs[i])
        size = dict(height=self.resolution, width=self.resolution)
        return image_processor.preprocess(image, **size)[0], mask_processor.preprocess(mask, **size)[0]


@torch.no_grad()
def encode_text(text_encoder, tokenizer, texts, device, batch_size=32):
    """Text encoder hidden states (the pipeline's prompt embeddings) of `texts`, float32 on the CPU."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(texts[i : i + batch_size], max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out)


@dataclass
class LatentCache:
    image_mean: torch.Tensor  # N x V x C x h x w, unscaled VAE latent distribution of the defect image
    image_std: torch.Tensor
    masked_mean: torch.Tensor  # same, of the image with its box blanked
    masked_std: torch.Tensor
    mask: torch.Tensor  # N x V x 1 x h x w, box mask at latent size
    text: torch.Tensor  # N x L x D, prompt embeddings
    scaling_factor: float
    variants: tuple

    @property
    def num_records(self):
        return self.image_mean.shape[0]

    @property
    def latent_shape(self):
        return tuple(self.image_mean.shape[2:])

    def batch(self, records, variants, eps_image, eps_masked):
        """(latents, masked-image latents, mask, text) of a batch, latents drawn with the given unit noise
        exactly as `DiagonalGaussianDistribution.sample()` draws them, times the VAE scaling factor."""
        r, v = torch.as_tensor(records), torch.as_tensor(variants)
        latents = (self.image_mean[r, v] + self.image_std[r, v] * eps_image) * self.scaling_factor
        masked = (self.masked_mean[r, v] + self.masked_std[r, v] * eps_masked) * self.scaling_factor
        return latents, masked, self.mask[r, v], self.text[r]


@torch.no_grad()
def build_latent_cache(vae, text_encoder, tokenizer, pairs, texts, resolution, variants=("none",), device="cpu", dtype=torch.float32,
                       batch_size=8, num_workers=0, progress=True):
    """Encode every (image, box mask) pair in every flip variant, and every text, once."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    loader = torch.utils.data.DataLoader(ExampleImages(pairs, resolution, factor), batch_size=batch_size, num_workers=num_workers)
    latent_size = (resolution // factor, resolution // factor)
    fields = {k: [] for k in ("image_mean", "image_std", "masked_mean", "masked_std", "mask")}
    for pixels, masks in progress_bar(loader, desc="encoding training images", disable=not progress):
        masked_pixels = pixels * (masks < 0.5)
        per_variant = {k: [] for k in fields}
        for name in variants:
            dims = FLIP_DIMS[name]
            p, mp, m = (t.flip(dims) if dims else t for t in (pixels, masked_pixels, masks))
            dist = vae.encode(torch.cat([p, mp]).to(device, dtype)).latent_dist
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
            n = len(p)
            per_variant["image_mean"].append(mean[:n])
            per_variant["image_std"].append(std[:n])
            per_variant["masked_mean"].append(mean[n:])
            per_variant["masked_std"].append(std[n:])
            per_variant["mask"].append(F.interpolate(m, size=latent_size))
        for k in fields:
            fields[k].append(torch.stack(per_variant[k], dim=1))
    tensors = {k: torch.cat(v) for k, v in fields.items()}
    text = encode_text(text_encoder, tokenizer, list(texts), device)
    return LatentCache(**tensors, text=text, scaling_factor=float(vae.config.scaling_factor), variants=tuple(variants))
