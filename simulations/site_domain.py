"""Simulation only: the global model measured on held-out subjects of each site's profile.

A simulation knows its sites' profiles, so it draws held-out phantom subjects of each
(another seed: no site trained on them). `SiteDomain` is the check a simulated study passes
to the server (server/validation.py `SiteDomainCheck`, built on the server's model copy):
the fixed-noise diffusion loss every round and, at the end, the fidelity of samples and
the share of the non-private ceiling's gain (simulations/ceiling_summary.py); the
in-process studies use it too, and `fidelity_spread`: the Frechet distances of samples for
every held-out volume, repeated over sampling seeds so that their spread is stated. A real
study cannot look at site data without spending privacy, so nothing here exists for one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from fedsynth.common.anatomy import VolumeMeter
from fedsynth.common.checkpoint import UNET, Pretrained, file_sha256
from fedsynth.common.config import Config, pretraining_hash
from fedsynth.common.diffusion import fixed_noise_losses, sample_latents, sampling_scheduler
from fedsynth.common.evaluation import fidelity
from fedsynth.common.feature_net import FeatureNets, feature_net_path, load_feature_nets
from fedsynth.common.io import PUBLIC_MODE, atomic_write_text
from fedsynth.common.models import latent_shape
from fedsynth.common.sampling import agreement_only, requested_vs_measured
from fedsynth.server.validation import encode_folder
from fedsynth.simulations.ceiling import CeilingPlan, plan_facts
from fedsynth.simulations.ceiling_summary import CeilingSummaries, share_of_ceiling

log = logging.getLogger(__name__)

SITE_DOMAIN_DRAWS = 8  # stratified fixed (noise, timestep) draws per site-domain volume
FIDELITY_VOLUMES = 10  # per site, `flwr run`'s end: the first held-out volumes (5 subjects) sampled
FIDELITY_SEEDS = 3  # sampling seeds of a study's `fidelity_spread` (every held-out volume)
SAMPLE_BATCH = 40  # volumes sampled at once (memory)
FRECHET = {"frechet_3d": "volume_features", "frechet_2d": "slice_features"}


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
        # the public checkpoint's weights, before any round's are loaded into the UNet
        self.public = {k: v.clone() for k, v in pretrained.unet.state_dict().items()}
        sites = sorted(
            (f for f in Path(folder).iterdir() if f.is_dir() and _site_number(f) > 0),
            key=_site_number,
        )
        self.config, self.seed, self.folder = config, config.seed, Path(folder)
        encoded = {f.name: encode_folder(pretrained, f, config) for f in sites}
        self.sites = {name: e[:3] for name, e in encoded.items()}
        self.rows = {
            name: [dict(r.attributes) for r in e[3].records] for name, e in encoded.items()
        }
        self.subjects = {name: [r.subject for r in e[3].records] for name, e in encoded.items()}

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

    def sample(
        self, unet: torch.nn.Module, attributes: torch.Tensor, seed: int | None = None
    ) -> torch.Tensor:
        """One volume (N, 1, H, W, D) in [0, 1] per attribute row (DDIM with the config's
        steps and guidance), in batches of SAMPLE_BATCH drawn from one generator seeded by
        `seed` (None: config.seed)."""
        sampling = self.config.sampling
        chain = sampling_scheduler(self.config.diffusion, sampling.scheduler, sampling.steps)
        generator = torch.Generator(attributes.device)
        generator.manual_seed(self.seed if seed is None else seed)
        volumes = []
        for start in range(0, len(attributes), SAMPLE_BATCH):
            latents = sample_latents(
                unet,
                chain,
                attributes[start : start + SAMPLE_BATCH],
                latent_shape(self.config),
                sampling.guidance_scale,
                generator,
            )
            volumes.append(self.pretrained.decode(latents).clamp(0, 1).cpu())
        return torch.cat(volumes)

    def sampling_seeds(self, count: int = FIDELITY_SEEDS) -> list[int]:
        """The sampling seeds of `fidelity_spread`: config.seed and the next count - 1."""
        return [self.seed + k for k in range(count)]

    @torch.no_grad()
    def fidelity_spread(
        self, weights: dict[str, torch.Tensor], nets: FeatureNets, seeds: Sequence[int]
    ) -> dict[str, dict[str, dict]]:
        """Per site and metric (FRECHET: volume and slice features): the Frechet distance
        between ALL held-out volumes of the site and one volume sampled for each one's
        attributes, once per sampling seed in `seeds` (at least two): {"values": one per
        seed, "mean", "sd" (sample sd over seeds)}; under "mean", the same of the sites'
        mean per seed. The spread is that of sampling one model, which a difference
        between two models must exceed to mean anything."""
        if len(seeds) < 2:
            raise ValueError(f"a spread needs at least two sampling seeds, got {len(seeds)}")
        unet = self.load(weights)
        values: dict[str, dict[str, list[float]]] = {}
        for site, (real, _, conditions) in self.sites.items():
            reference = {key: getattr(nets, name)(real) for key, name in FRECHET.items()}
            values[site] = {key: [] for key in FRECHET}
            for seed in seeds:
                synthetic = self.sample(unet, conditions, seed)
                for key, name in FRECHET.items():
                    measured = fidelity(reference[key], getattr(nets, name)(synthetic), seed)
                    values[site][key].append(measured["frechet_distance"])
        values["mean"] = {
            key: [statistics.fmean(v[key][k] for v in values.values()) for k in range(len(seeds))]
            for key in FRECHET
        }
        return {
            site: {key: spread(series) for key, series in metrics.items()}
            for site, metrics in values.items()
        }

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

    def final_fidelity(
        self, round_number: int, weights: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, dict[str, float]]]:
        """`fidelity` of the public checkpoint ("0", cached) and of round `round_number`'s
        `weights`, each site's Frechet distance logged."""
        nets = load_feature_nets(self.pretrained.folder)
        result = {
            "0": self.public_fidelity(self.public, nets),
            str(round_number): self.fidelity(weights, nets),
        }
        for site, final in result[str(round_number)].items():
            start = result["0"][site]
            log.info(
                "%s Frechet distance to held-out volumes (3D features): public checkpoint "
                "%.3f, round %d %.3f",
                site,
                start["frechet_3d"],
                round_number,
                final["frechet_3d"],
            )
        return result

    def ceiling_summaries(
        self, phantoms: Path, plan: CeilingPlan | None = None
    ) -> CeilingSummaries:
        """Where the non-private ceiling of the sites in `phantoms`, measured by this
        check, is summarised (simulations/ceiling_summary.py), keyed by what it depends on:
        this public UNet, the phantom sites, these held-out subjects, the pretraining
        config it trains with, the ceiling's `plan` and this check's draws."""
        facts = {
            "unet": file_sha256(self.pretrained.folder / UNET),
            "phantoms": f"{phantoms.parent.name}/{phantoms.name}",
            "held_out": f"{self.folder.parent.name}/{self.folder.name}",
            "pretraining": pretraining_hash(self.config),
            "plan": plan_facts(plan or CeilingPlan(), self.config),
            "draws": SITE_DOMAIN_DRAWS,
        }
        return CeilingSummaries(self.folder, facts)

    def ceiling_share(
        self, phantoms: Path, public: dict[str, float], final: dict[str, float]
    ) -> dict:
        """The study's share of the ceiling's gain (share_of_ceiling) from its site-domain
        loss at round 0 (`public`) and its last round (`final`), when the ceiling of the
        sites in `phantoms` has been computed; otherwise a note naming the command."""
        return share_of_ceiling(self.ceiling_summaries(phantoms).read(), public, final)


def spread(values: list[float]) -> dict:
    """{"values", "mean", "sd"}: the values, their mean and sample standard deviation."""
    return {"values": values, "mean": statistics.fmean(values), "sd": statistics.stdev(values)}
