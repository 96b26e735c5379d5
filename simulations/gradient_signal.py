"""How much of one DP-SGD step is the sites' signal, and how alike the sites' signals are.

At a site, one step adds Gaussian noise of norm about sigma C sqrt(d) (noise multiplier
sigma, clip C, d trained weights) to the sum of about B clipped per-subject gradients.
The part of that sum that generalises is B times the population's mean clipped gradient;
its squared norm is estimated without bias as the dot product of the sums of two
independent batches (their draws and subjects differ, so only the mean survives in
expectation). Their ratio is one step's signal-to-noise. The same estimator gives the
cosine between two populations' mean gradients: (<A1, B2> + <A2, B1>) / 2 over
sqrt(<A1, A2> <B1, B2>).
Simulation only: it reads the phantom sites' gradients without noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedsynth.client.budget import sample_rate
from fedsynth.client.dp_trainer import SubjectData, group_by_subject, rows_of
from fedsynth.common.config import Config
from fedsynth.common.diffusion import per_sample_loss, training_scheduler
from fedsynth.common.models import ConditionedUNet, trainable_names
from fedsynth.simulations.arms import StudyContext, StudySetup, summary
from fedsynth.simulations.federated import noise_multiplier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Draw:
    """How each subject's gradient is drawn: `draws` (noise, timestep) draws per volume
    (noise multiplicity), timesteps in `band` = [low, high)."""

    draws: int
    band: tuple[int, int]


def clipped_sums(
    unet: ConditionedUNet,
    config: Config,
    data: SubjectData,
    subjects: Iterable[int],
    draw: Draw,
    subsets: dict[str, torch.Tensor],
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Per subset (a bool mask over the flattened UNet weights): the sum over `subjects`
    of each subject's gradient on that subset, clipped to `privacy.max-grad-norm` (float64,
    shape (mask.sum(),)). A subject's loss is the mean over its volumes and draws, as
    DP-SGD's (client/dp_trainer.py)."""
    params = list(unet.requires_grad_(True).parameters())
    scheduler = training_scheduler(config.diffusion)
    clip = config.privacy.max_grad_norm
    sums = {
        name: torch.zeros(int(mask.sum()), dtype=torch.float64) for name, mask in subsets.items()
    }
    for subject in subjects:
        rows = rows_of(data, torch.tensor([subject]), torch.device("cpu"), draw.draws)
        losses = per_sample_loss(
            unet,
            scheduler,
            rows.latents,
            rows.attributes,
            config.diffusion.condition_dropout,
            generator,
            draw.band,
        )
        loss = (losses * rows.weight).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).flatten()
                for g, p in zip(grads, params, strict=True)
            ]
        ).double()
        for name, mask in subsets.items():
            part = flat[mask]
            sums[name] += part * min(1.0, clip / (float(part.norm()) + 1e-12))
    return sums


def signal_to_noise(first: torch.Tensor, second: torch.Tensor, noise_std: float) -> float:
    """sqrt(<first, second>) (signed: a negative estimate stays negative) over the noise's
    norm `noise_std` sqrt(d): one step's signal-to-noise from two batches' clipped sums."""
    dot = float(first @ second)
    return math.copysign(math.sqrt(abs(dot)), dot) / (noise_std * math.sqrt(first.numel()))


def cosine(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The cosine between two populations' mean gradients from two batches of each: the
    two cross products averaged (symmetric in a and b), over the root of each one's own."""
    across = (float(a[0] @ b[1]) + float(a[1] @ b[0])) / 2
    return across / math.sqrt(abs(float(a[0] @ a[1]) * float(b[0] @ b[1])))


def weight_masks(unet: ConditionedUNet, trainable: str) -> dict[str, torch.Tensor]:
    """Bool masks over the flattened UNet weights: every weight, and the config's subset."""
    names = set(trainable_names(unet, trainable))
    subset = torch.cat([torch.full((p.numel(),), n in names) for n, p in unet.named_parameters()])
    masks = {"all": torch.ones_like(subset)}
    if trainable != "all":
        masks[trainable] = subset
    return masks


def _draws(timesteps: int) -> list[Draw]:
    """1, 4 and 16 draws over every timestep, then 4 draws in each quarter of them."""
    every = (0, timesteps)
    quarters = [(k * timesteps // 4, (k + 1) * timesteps // 4) for k in range(4)]
    return [Draw(1, every), Draw(4, every), Draw(16, every)] + [Draw(4, q) for q in quarters]


def signal(setup: StudySetup) -> dict:
    """`fedsynth study signal`: at the public checkpoint, one DP-SGD step's signal-to-noise
    at the first site (two batches of the config's expected batch; the noise multiplier
    it plans for the study) over every UNet weight and over the config's trainable subset,
    by noise multiplicity and timestep band; and the cosines between the sites' and the
    public subjects' mean clipped gradients (one draw per volume). Per seed."""
    started, context = time.perf_counter(), StudyContext(setup)
    config = setup.config
    unet = context.pretrained.unet
    unet.load_state_dict(context.public)
    unet.train()
    masks = weight_masks(unet, config.privacy.trainable)
    populations = {name: context.sites[name] for name in context.names}
    populations["public"] = context.public_latents()
    data = {
        name: group_by_subject(s.latents, s.attributes, s.subjects)
        for name, s in populations.items()
    }
    first = context.names[0]
    n = data[first].n_subjects
    batch = max(1, min(round(sample_rate(config.privacy, n) * n), n // 2))
    sigma = noise_multiplier(config, n)
    noise_std = sigma * config.privacy.max_grad_norm

    def two_batches(name: str, draw: Draw, subsets: dict, generator: torch.Generator) -> list:
        """The clipped sums of two disjoint batches of `name`'s subjects."""
        size = min(batch, data[name].n_subjects // 2)
        chosen = [range(k * size, (k + 1) * size) for k in (0, 1)]
        return [clipped_sums(unet, config, data[name], c, draw, subsets, generator) for c in chosen]

    runs = []
    every = Draw(1, (0, config.diffusion.train_timesteps))
    for seed in setup.seeds:
        generator = torch.Generator().manual_seed(seed)
        steps = []
        for draw in _draws(config.diffusion.train_timesteps):
            log.info(
                "signal (seed %d): %s, %d draws per volume, timesteps %d-%d (%.0f s)",
                seed,
                first,
                draw.draws,
                *draw.band,
                time.perf_counter() - started,
            )
            first_sums, second_sums = two_batches(first, draw, masks, generator)
            steps.append(
                {
                    "draws": draw.draws,
                    "band": list(draw.band),
                    "snr": {
                        s: signal_to_noise(first_sums[s], second_sums[s], noise_std) for s in masks
                    },
                    "batch_cosine": {
                        s: float(torch.cosine_similarity(first_sums[s], second_sums[s], dim=0))
                        for s in masks
                    },
                }
            )
        means = {}
        for name in data:
            log.info(
                "signal (seed %d): %s's mean gradient (%.0f s)",
                seed,
                name,
                time.perf_counter() - started,
            )
            pair = two_batches(name, every, {"all": masks["all"]}, generator)
            means[name] = [b["all"] for b in pair]
        cosines = {a: {b: cosine(means[a], means[b]) for b in means} for a in means}
        runs.append({"seed": seed, "steps": steps, "cosines": cosines})
    return summary(
        "signal",
        setup,
        started,
        site=first,
        batch=batch,
        noise_multiplier=sigma,
        weights={name: int(mask.sum()) for name, mask in masks.items()},
        runs=runs,
    )
