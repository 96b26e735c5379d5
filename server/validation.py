"""Per-round validation of the global model on PUBLIC held-out data only, and, in a
simulation only, its loss on held-out subjects of each site's profile.

Private data never enters validation: the held-out set is public (in a simulation, phantom
subjects of the public profile drawn with another seed, so the checkpoint never saw them).
Each round the same noise and timesteps (a fixed generator) give a diffusion loss that is
comparable across rounds, and the same attributes and seed give a montage of generated
volumes, so a reader can see whether finetuning improves or damages anatomy.

Public data cannot tell whether the sites' data helped. A simulation knows its sites'
profiles, so it draws held-out phantom subjects of each (another seed: no site trained on
them) and `SiteDomain` measures the global model on them every round (and its samples at
the end of a study). Only a
simulation can: in a real study the sites' data never reaches the coordinator, and a
site that measured this on its own data would have to spend privacy to report it. Nothing
here offers that for real sites (server/study.py sets `site_domain` only from a simulation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from fedsynth.common.anatomy import VolumeMeter
from fedsynth.common.checkpoint import UNET, Pretrained, file_sha256, load_pretrained
from fedsynth.common.config import Config
from fedsynth.common.data import open_site
from fedsynth.common.diffusion import (
    fixed_noise_losses,
    per_sample_loss,
    sample_latents,
    sampling_scheduler,
    training_scheduler,
)
from fedsynth.common.evaluation import fidelity
from fedsynth.common.feature_net import FeatureNets, feature_net_path
from fedsynth.common.io import PUBLIC_MODE, atomic_write_text
from fedsynth.common.models import latent_shape, resolve_device
from fedsynth.common.sampling import (
    agreement_only,
    montage,
    requested_vs_measured,
    volume_title,
)

LOSS_DRAWS = 4  # noise/timestep draws per held-out volume (fixed across rounds)
MONTAGE_VOLUMES = 4
SITE_DOMAIN_DRAWS = 8  # stratified fixed (noise, timestep) draws per site-domain volume
FIDELITY_VOLUMES = 10  # per site: the first held-out volumes (5 subjects, ED + ES) sampled


def _encoded(pretrained: Pretrained, folder: Path, config: Config):
    """(volumes (N, 1, H, W, D), latents (N, C, h, w, d), attributes (N, A), manifest) of a
    folder's volumes."""
    dataset, manifest = open_site(folder, config.data, show_progress=False, keep_volumes=True)
    items = [dataset[i] for i in range(len(dataset))]
    device = next(pretrained.autoencoder.parameters()).device
    volumes = torch.stack([v for v, _ in items])
    latents = torch.cat([pretrained.encode(v[None].to(device)) for v in volumes])
    return volumes, latents, torch.stack([a for _, a in items]).to(device), manifest


def _site_number(folder: Path) -> int:
    suffix = folder.name.removeprefix("site-")
    return int(suffix) if suffix.isdigit() else -1


class SiteDomain:
    """Simulation only: the model measured on held-out subjects of each site's profile
    (`folder`/site-1..K, as the phantom generator writes them).

    `loss`: the fixed-noise diffusion loss, lower is better; compare a round with round 0
    (the public checkpoint). Each call uses the same noise and timesteps (seeded by
    config.seed), so rounds are comparable. `fidelity`: one volume sampled for each held-out
    volume's attributes, against those volumes in the evaluation feature spaces.
    """

    def __init__(self, pretrained: Pretrained, folder: Path, config: Config) -> None:
        self.pretrained = pretrained
        sites = sorted(
            (f for f in Path(folder).iterdir() if f.is_dir() and _site_number(f) > 0),
            key=_site_number,
        )
        self.config, self.seed, self.folder = config, config.seed, Path(folder)
        encoded = {f.name: _encoded(pretrained, f, config) for f in sites}
        self.sites = {name: e[:3] for name, e in encoded.items()}
        self.rows = {
            name: [dict(r.attributes) for r in e[3].records] for name, e in encoded.items()
        }

    def load(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        unet = self.pretrained.unet
        unet.load_state_dict(weights)
        return unet.eval()

    def loss(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean loss of the UNet `weights` per site name, over its held-out volumes."""
        unet = self.load(weights)
        return {
            site: float(
                fixed_noise_losses(
                    unet,
                    self.config.diffusion,
                    latents,
                    attributes,
                    self.seed,
                    SITE_DOMAIN_DRAWS,
                ).mean()
            )
            for site, (_, latents, attributes) in self.sites.items()
        }

    @torch.no_grad()
    def fidelity(self, weights: dict[str, torch.Tensor], nets: FeatureNets) -> dict[str, dict]:
        """Per site: Frechet distance and kernel MMD^2 (volume and slice features) between
        the first FIDELITY_VOLUMES held-out volumes and as many sampled for their attributes
        (DDIM with the config's steps and guidance, seeded by config.seed). A small cohort:
        the distances compare models on one set, they are not a release's evaluation."""
        unet, out = self.load(weights), {}
        for site, (real, _, conditions) in self.sites.items():
            volumes = real[:FIDELITY_VOLUMES]
            synthetic = self.sample(unet, conditions[:FIDELITY_VOLUMES])
            out[site] = {}
            for key, features in (("3d", nets.volume_features), ("2d", nets.slice_features)):
                measured = fidelity(features(volumes), features(synthetic), self.seed)
                out[site][f"frechet_{key}"] = measured["frechet_distance"]
                out[site][f"mmd2_{key}"] = measured["mmd2"]
        return out

    def sample(self, unet: torch.nn.Module, attributes: torch.Tensor) -> torch.Tensor:
        """One volume (N, 1, H, W, D) in [0, 1] per attribute row, in one batch (DDIM with
        the config's steps and guidance, seeded by config.seed)."""
        sampling = self.config.sampling
        chain = sampling_scheduler(self.config.diffusion, sampling.scheduler, sampling.steps)
        generator = torch.Generator(attributes.device).manual_seed(self.seed)
        latents = sample_latents(
            unet,
            chain,
            attributes,
            latent_shape(self.config),
            sampling.guidance_scale,
            generator,
        )
        return self.pretrained.decode(latents).clamp(0, 1).cpu()

    @torch.no_grad()
    def controllability(
        self, weights: dict[str, torch.Tensor] | None, meter: VolumeMeter
    ) -> dict[str, dict[str, float]]:
        """LV and RV cavity volumes requested (each held-out volume's attributes, every
        site, EDV at ED and ESV at ES) against those `meter` measures on one volume sampled
        for them: per side Pearson r, MAE (mL) and n. `weights` None measures the real
        held-out volumes instead (the meter's own error)."""
        rows = [row for site in self.sites for row in self.rows[site]]
        if weights is None:
            volumes = torch.cat([real for real, _, _ in self.sites.values()])
        else:
            unet = self.load(weights)
            volumes = torch.cat([self.sample(unet, a) for _, _, a in self.sites.values()])
        return agreement_only(requested_vs_measured(meter, volumes, rows))

    def public_fidelity(self, weights: dict[str, torch.Tensor], nets: FeatureNets) -> dict:
        """`fidelity` of the public checkpoint's `weights`, computed once per checkpoint,
        sampling settings and seed, and kept next to the held-out subjects (a simulation's
        cache): every study of one simulation starts from it."""
        facts = {
            "unet": file_sha256(self.pretrained.folder / UNET),
            "feature_net": file_sha256(feature_net_path(self.pretrained.folder)),
            "sampling": dataclasses.asdict(self.config.sampling),
            "seed": self.seed,
            "volumes": FIDELITY_VOLUMES,
        }
        key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
        path = self.folder / f".public-fidelity-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = self.fidelity(weights, nets)
        atomic_write_text(path, json.dumps(result) + "\n", PUBLIC_MODE)
        return result


class Validator:
    """Held-out public latents and attributes, encoded once with the frozen autoencoder."""

    def __init__(self, checkpoint: Path, data: Path, config: Config) -> None:
        self.pretrained = load_pretrained(checkpoint, resolve_device(config.device))
        self.config, self.seed = config, config.seed
        self.device = next(self.pretrained.unet.parameters()).device
        volumes, self.latents, self.attributes, manifest = _encoded(self.pretrained, data, config)
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
