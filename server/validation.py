"""Per-round validation of the global model on PUBLIC held-out data only.

Private data never enters validation: the held-out set is public (in a simulation, phantom
subjects of the public profile drawn with another seed, so the checkpoint never saw them).
Each round the same noise and timesteps (a fixed generator) give a diffusion loss that is
comparable across rounds, and the same attributes and seed give a montage of generated
volumes, so a reader can see whether finetuning improves or damages anatomy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.config import Config
from fedsynth.common.data import open_site
from fedsynth.common.diffusion import (
    per_sample_loss,
    sample_latents,
    sampling_scheduler,
    training_scheduler,
)
from fedsynth.common.models import latent_shape, resolve_device
from fedsynth.common.sampling import montage, volume_title

LOSS_DRAWS = 4  # noise/timestep draws per held-out volume (fixed across rounds)
MONTAGE_VOLUMES = 4


class Validator:
    """Held-out public latents and attributes, encoded once with the frozen autoencoder."""

    def __init__(self, checkpoint: Path, data: Path, config: Config) -> None:
        self.pretrained = load_pretrained(checkpoint, resolve_device(config.device))
        self.config, self.seed = config, config.seed
        self.device = next(self.pretrained.unet.parameters()).device
        dataset, manifest = open_site(data, config.data, show_progress=False)
        items = [dataset[i] for i in range(len(dataset))]
        volumes = torch.stack([v for v, _ in items]).to(self.device)
        self.latents = torch.cat([self.pretrained.encode(v[None]) for v in volumes])
        self.attributes = torch.stack([a for _, a in items]).to(self.device)
        self.rows = [dict(r.attributes) for r in manifest.records][:MONTAGE_VOLUMES]

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor], png: Path) -> float:
        """The held-out diffusion loss of `weights`; a montage of their samples to `png`."""
        unet = self.pretrained.unet
        unet.load_state_dict(weights)
        unet.eval()
        scheduler = training_scheduler(self.config.diffusion)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        losses = [
            per_sample_loss(unet, scheduler, self.latents, self.attributes, 0.0, generator)
            for _ in range(LOSS_DRAWS)
        ]
        loss = float(torch.cat(losses).mean())
        sampling = self.config.sampling
        chain = sampling_scheduler(self.config.diffusion, sampling.scheduler, sampling.steps)
        latents = sample_latents(
            unet,
            chain,
            self.attributes[: len(self.rows)],
            latent_shape(self.config),
            sampling.guidance_scale,
            torch.Generator(self.device).manual_seed(self.seed),
        )
        volumes = self.pretrained.decode(latents).clamp(0, 1)[:, 0].cpu().numpy()
        titles = [volume_title(f"held-out {i + 1}", r) for i, r in enumerate(self.rows)]
        montage(png, list(np.asarray(volumes)), titles, self.config)
        return loss
