"""Per-round validation of the global model on PUBLIC held-out data only.

Private data never enters validation: the held-out set is public (in a simulation, phantom
subjects of the public profile drawn with another seed, so the checkpoint never saw them).
Each round the same noise and timesteps (a fixed generator) give a diffusion loss that is
comparable across rounds, and the same attributes and seed give a montage of generated
volumes, so a reader can see whether finetuning improves or damages anatomy.

Public data cannot tell whether the sites' data helped. A simulation knows its sites'
profiles and passes in a `SiteDomainFactory` (fedsynth.simulations.site_domain) whose
check measures the global model on held-out subjects of each. Only a simulation can: in a real
study the sites' data never reaches the coordinator, and a site that measured this on its
own data would have to spend privacy to report it; nothing under server/ offers that.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedsynth.common.checkpoint import Pretrained, load_pretrained
from fedsynth.common.config import Config
from fedsynth.common.data import SiteManifest, open_site
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


class SiteDomainCheck(Protocol):
    """What a simulation measures of the global model on held-out subjects of its sites'
    profiles (fedsynth.simulations.site_domain.SiteDomain); reported as outside the
    guarantee and never available for real sites."""

    def loss(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """site name -> held-out diffusion loss of the UNet `weights` (each round)."""
        ...

    def final_fidelity(
        self, round_number: int, weights: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, dict[str, float]]]:
        """{"0": public checkpoint's, "N": round N's `weights`'} site -> distances of
        samples to held-out volumes (at the end of a study)."""
        ...

    def ceiling_share(
        self, phantoms: Path, public: dict[str, float], final: dict[str, float]
    ) -> dict:
        """The study's share of the non-private ceiling's gain in site-domain loss (round 0
        `public` -> last round `final`), per site and on the mean, when the ceiling of the
        simulated sites in `phantoms` has been computed; always with "note", one line to
        log (without a ceiling: the command that computes it)."""
        ...


# the check on a loaded public checkpoint (shared with public validation: one model copy)
SiteDomainFactory = Callable[[Pretrained], SiteDomainCheck]


def encode_folder(
    pretrained: Pretrained, folder: Path, config: Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SiteManifest]:
    """(volumes (N, 1, H, W, D), latents (N, C, h, w, d), attributes (N, A), manifest) of a
    folder's volumes."""
    dataset, manifest = open_site(folder, config.data, show_progress=False, keep_volumes=True)
    items = [dataset[i] for i in range(len(dataset))]
    device = next(pretrained.autoencoder.parameters()).device
    volumes = torch.stack([v for v, _ in items])
    latents = torch.cat([pretrained.encode(v[None].to(device)) for v in volumes])
    return volumes, latents, torch.stack([a for _, a in items]).to(device), manifest


class Validator:
    """Held-out public latents and attributes, encoded once with the frozen autoencoder."""

    def __init__(self, checkpoint: Path, data: Path, config: Config) -> None:
        self.pretrained = load_pretrained(checkpoint, resolve_device(config.device))
        self.config, self.seed = config, config.seed
        self.device = next(self.pretrained.unet.parameters()).device
        volumes, self.latents, self.attributes, manifest = encode_folder(
            self.pretrained, data, config
        )
        self.rows = [dict(r.attributes) for r in manifest.records][:MONTAGE_VOLUMES]
        self.volumes = volumes[: len(self.rows)]

    @torch.no_grad()
    def reconstruction(self, png: Path) -> float:
        """The held-out volumes and their autoencoder reconstructions (no diffusion) in a
        montage to `png`, real above reconstruction; returns the mean absolute error
        (intensity in [0, 1]). Next to the rounds' sample montages it shows where quality
        is lost: in the frozen autoencoder or in the diffusion model."""
        latents = self.latents[: len(self.rows)]
        rebuilt = self.pretrained.decode(latents).clamp(0, 1).cpu()
        error = float((rebuilt - self.volumes).abs().mean())
        volumes, titles = [], []
        for i, (real, back, row) in enumerate(zip(self.volumes, rebuilt, self.rows, strict=True)):
            volumes += [real[0].numpy(), back[0].numpy()]
            name = f"held-out {i + 1}"
            titles += [volume_title(name, row), f"{name}: autoencoder reconstruction"]
        montage(png, volumes, titles, self.config)
        return error

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


def validation_text(entry: dict) -> str:
    """A round's validation for its log line: public loss, (round 0) the autoencoder's
    reconstruction error, then site-domain losses."""
    parts = []
    if entry.get("loss") is not None:
        parts.append(f"validation loss {entry['loss']:.4f}")
    if entry.get("reconstruction_mae") is not None:
        parts.append(f"autoencoder reconstruction MAE {entry['reconstruction_mae']:.4f}")
    if entry.get("site_domain"):
        losses = " ".join(f"{k} {v:.4f}" for k, v in entry["site_domain"].items())
        parts.append(f"site-domain loss (simulation only) {losses}")
    return "; ".join(parts)
