"""The latent diffusion objective and samplers, on MONAI's DDPM and DDIM schedulers.

The training loss is returned per sample (reduced over every axis but the batch), so the
same function serves public pretraining (mean over the batch) and DP-SGD, which clips each
sample's gradient. Sampling uses classifier-free guidance:
eps = eps_null + scale * (eps_cond - eps_null); scale 0 is unconditional, 1 conditional.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from fedsynth.common.config import DiffusionConfig
from fedsynth.common.models import ConditionedUNet


def _schedule_args(cfg: DiffusionConfig) -> dict:
    args: dict = {"num_train_timesteps": cfg.train_timesteps, "schedule": cfg.schedule}
    if cfg.schedule != "cosine":
        args |= {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
    return args


def training_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(**_schedule_args(cfg), prediction_type=cfg.prediction_type)


def sampling_scheduler(
    cfg: DiffusionConfig, kind: str, steps: int
) -> DDIMScheduler | DDPMScheduler:
    """DDIM (deterministic, few steps) or DDPM (the full chain) over the training schedule."""
    scheduler: DDIMScheduler | DDPMScheduler
    if kind == "ddim":
        scheduler = DDIMScheduler(
            **_schedule_args(cfg), prediction_type=cfg.prediction_type, clip_sample=False
        )
    else:
        scheduler = DDPMScheduler(
            **_schedule_args(cfg), prediction_type=cfg.prediction_type, clip_sample=False
        )
    scheduler.set_timesteps(steps if kind == "ddim" else cfg.train_timesteps)
    return scheduler


def per_sample_loss(
    unet: ConditionedUNet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    attributes: torch.Tensor,
    condition_dropout: float,
    generator: torch.Generator | None = None,
    band: tuple[int, int] | None = None,
) -> torch.Tensor:
    """DDPM loss of each sample (shape (B,)), with attributes dropped at the given rate;
    timesteps uniform over [0, T), or over `band` = [low, high) (simulations/gradient_signal.py
    compares bands)."""
    batch = latents.shape[0]
    device = latents.device
    low, high = (0, scheduler.num_train_timesteps) if band is None else band
    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = torch.randint(low, high, (batch,), generator=generator, device=device)
    keep = (torch.rand(batch, generator=generator, device=device) >= condition_dropout).float()
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    prediction = unet(noisy, timesteps, attributes, keep)
    target = prediction_target(scheduler, latents, noise, timesteps)
    return (prediction - target).pow(2).flatten(1).mean(dim=1)


def prediction_target(
    scheduler: DDIMScheduler | DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet is trained to predict for these latents, noise and timesteps: the
    noise (epsilon), the velocity (v, Salimans & Ho 2022) or the clean sample."""
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


@torch.no_grad()
def sample_latents(
    unet: ConditionedUNet,
    scheduler: DDIMScheduler | DDPMScheduler,
    attributes: torch.Tensor,
    shape: tuple[int, ...],
    guidance_scale: float,
    generator: torch.Generator | None = None,
    on_step: Callable[[], object] | None = None,
) -> torch.Tensor:
    """Run the reverse chain from noise for a batch of attribute vectors (B, A)."""
    device = attributes.device
    batch = attributes.shape[0]
    x = torch.randn((batch, *shape), generator=generator, device=device)
    keep = torch.cat([torch.ones(batch, device=device), torch.zeros(batch, device=device)])
    both = torch.cat([attributes, attributes])
    for t in scheduler.timesteps:
        timesteps = torch.full((2 * batch,), int(t), device=device, dtype=torch.long)
        cond, null = unet(torch.cat([x, x]), timesteps, both, keep).chunk(2)
        eps = null + guidance_scale * (cond - null)
        x, _ = scheduler.step(eps, int(t), x, generator=generator)
        if on_step is not None:
            on_step()
    return x


@torch.no_grad()
def fixed_noise_draw_losses(
    unet: ConditionedUNet,
    cfg: DiffusionConfig,
    latents: torch.Tensor,
    attributes: torch.Tensor,
    seed: int,
    draws: int = 8,
    batch_size: int = 16,
) -> torch.Tensor:
    """Diffusion loss per volume and fixed (noise, timestep) draw, (N, draws) float64.

    Unlike `per_sample_loss`, which draws noise per row, every volume (and every model given
    the same seed) sees the same noise tensors and timesteps, so differences between
    subjects and between models are not differences of noise. Timesteps are stratified: draw
    k lies in the k-th of `draws` equal parts of the schedule. Conditional (attributes
    kept), as the model mostly trained. latents (N, C, H, W, D), attributes (N, A) in [0, 1].
    The draws depend on the seed alone, so calls on parts of a set equal one on the whole.
    """
    scheduler = training_scheduler(cfg)
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    steps = scheduler.num_train_timesteps
    fixed = []
    for k in range(draws):
        noise = torch.randn((1, *latents.shape[1:]), generator=generator)
        t = int((k + float(torch.rand((), generator=generator))) * steps / draws)
        fixed.append((noise.to(device), min(t, steps - 1)))
    unet.eval()
    losses = torch.zeros((len(latents), draws), dtype=torch.float64)
    for rows in torch.arange(len(latents)).split(batch_size):
        x, a = latents[rows].to(device), attributes[rows].to(device)
        for k, (noise, t) in enumerate(fixed):
            eps = noise.expand_as(x)
            timesteps = torch.full((len(rows),), t, device=device, dtype=torch.long)
            noisy = scheduler.add_noise(original_samples=x, noise=eps, timesteps=timesteps)
            prediction = unet(noisy, timesteps, a)
            target = prediction_target(scheduler, x, eps, timesteps)
            losses[rows, k] = (prediction - target).pow(2).flatten(1).mean(1).double().cpu()
    return losses


def fixed_noise_losses(
    unet: ConditionedUNet,
    cfg: DiffusionConfig,
    latents: torch.Tensor,
    attributes: torch.Tensor,
    seed: int,
    draws: int = 8,
    batch_size: int = 16,
) -> torch.Tensor:
    """Diffusion loss per volume (N,), the mean of `fixed_noise_draw_losses` over its draws."""
    return fixed_noise_draw_losses(unet, cfg, latents, attributes, seed, draws, batch_size).mean(1)
