"""What every Stage 2 micro-batch trains on, as a pure function of (seed, micro-step, position in the
global batch): resume and any process count repeat one uninterrupted single-process run exactly."""

import math
from functools import lru_cache

import numpy as np
import torch


class SampleStream:
    """Which records, flips, latent samples, noise and timesteps every micro-batch gets.

    Epoch e visits the records in a permutation drawn from (seed, e); when the record count is not a
    multiple of the global batch, the order wraps around to fill the last batch (as torch's
    DistributedSampler pads), so every batch is full even when the batch is larger than the data.
    Micro-batches run on across epoch boundaries. Process p of P takes the p-th slice of each global
    batch, and the sample at global position j of micro-step m draws all its randomness from its own
    generator seeded by (seed, m, j): nothing depends on the process count or on earlier steps.
    """

    def __init__(self, seed, num_records, global_batch_size, latent_shape, num_variants=1, num_train_timesteps=1000, noise_offset=0.0):
        self.seed = seed
        self.num_records = num_records
        self.global_batch_size = global_batch_size
        self.latent_shape = tuple(latent_shape)
        self.num_variants = num_variants
        self.num_train_timesteps = num_train_timesteps
        self.noise_offset = noise_offset
        self.micro_batches_per_epoch = math.ceil(num_records / global_batch_size)

    @lru_cache(maxsize=4)  # noqa: B019  (one stream per run; it lives as long as the run)
    def order(self, epoch):
        perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_records)
        return np.resize(perm, self.micro_batches_per_epoch * self.global_batch_size)

    def epoch_of(self, micro_step):
        return micro_step // self.micro_batches_per_epoch

    def records(self, micro_step):
        epoch, k = divmod(micro_step, self.micro_batches_per_epoch)
        return self.order(epoch)[k * self.global_batch_size : (k + 1) * self.global_batch_size]

    def generator(self, micro_step, position):
        state = np.random.SeedSequence([self.seed, 1, micro_step, position]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def draw(self, micro_step, position):
        """(flip variant, unit noise for the image latents, for the masked-image latents, diffusion noise, timestep)."""
        g = self.generator(micro_step, position)
        variant = int(torch.randint(self.num_variants, (1,), generator=g)) if self.num_variants > 1 else 0
        eps_image = torch.randn(self.latent_shape, generator=g)
        eps_masked = torch.randn(self.latent_shape, generator=g)
        noise = torch.randn(self.latent_shape, generator=g)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((self.latent_shape[0], 1, 1), generator=g)
        timestep = int(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
        return variant, eps_image, eps_masked, noise, timestep

    def batch(self, cache, micro_step, rank=0, per_device=None):
        """This process's share of a micro-batch, on the CPU: dict of latents, masked_latents, mask,
        text, noise, timesteps."""
        per_device = per_device or self.global_batch_size
        records = self.records(micro_step)
        positions = range(rank * per_device, (rank + 1) * per_device)
        draws = [self.draw(micro_step, j) for j in positions]
        variants = [d[0] for d in draws]
        eps_image, eps_masked, noise = (torch.stack([d[i] for d in draws]) for i in (1, 2, 3))
        latents, masked, mask, text = cache.batch(records[rank * per_device : (rank + 1) * per_device], variants, eps_image, eps_masked)
        timesteps = torch.tensor([d[4] for d in draws], dtype=torch.long)
        return dict(latents=latents, masked_latents=masked, mask=mask, text=text, noise=noise, timesteps=timesteps)
