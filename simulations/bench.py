"""`fedsynth bench`: speed and memory goals as ratios measured in one run on this machine.

Ratios, not seconds, so that they mean the same on a laptop and on a hospital's GPU box.
Networks are built from the config with fresh weights: timing does not depend on them.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from fedsynth.client.budget import sample_rate
from fedsynth.client.dp_trainer import step_timings, train_round
from fedsynth.common.config import Config
from fedsynth.common.diffusion import sample_latents, sampling_scheduler
from fedsynth.common.models import ConditionedUNet, build_autoencoder, latent_shape, resolve_device


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ddim_speedup_over_ddpm(config: Config) -> float:
    """Wall time of one volume by full DDPM (all training timesteps) over DDIM (sampling.steps),
    both with classifier-free guidance and decoding."""
    device = resolve_device(config.device)
    unet = ConditionedUNet(config).to(device).eval()
    autoencoder = build_autoencoder(config).to(device).eval()
    attributes = torch.rand(1, len(config.data.attributes), device=device)
    shape = latent_shape(config)

    def one_volume(kind: str) -> Callable[[], object]:
        scheduler = sampling_scheduler(config.diffusion, kind, config.sampling.steps)
        guidance = config.sampling.guidance_scale

        def run() -> object:
            with torch.no_grad():
                latents = sample_latents(unet, scheduler, attributes, shape, guidance)
                return autoencoder.decode_stage_2_outputs(latents)

        return run

    one_volume("ddim")()  # warm-up
    return _seconds(one_volume("ddpm")) / _seconds(one_volume("ddim"))


SITE_SUBJECTS = 20  # a phantom site's default size; each subject has an ED and an ES volume


def _site(config: Config, subjects: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random latents and attributes standing in for a site's cache (timing ignores values)."""
    generator = torch.Generator().manual_seed(config.seed)
    latents = torch.randn((2 * subjects, *latent_shape(config)), generator=generator)
    attributes = torch.rand((2 * subjects, len(config.data.attributes)), generator=generator)
    return latents, attributes, torch.arange(subjects).repeat_interleave(2)


def dp_step_over_nonprivate(config: Config) -> float:
    """One DP-SGD step over one plain step, same model, trainable subset and batch: the
    config's expected batch of subjects (two volumes each), split into physical batches."""
    subjects = max(1, round(sample_rate(config.privacy, SITE_SUBJECTS) * SITE_SUBJECTS))
    device = resolve_device(config.device)
    timings = step_timings(
        config, ConditionedUNet(config), *_site(config, subjects), repeats=3, device=device
    )
    return timings["dp_over_nonprivate"]


def _site_round_peak_mb(config: Config) -> float:
    """In a fresh process: one local round at a default-sized site; peak memory in MiB."""
    device = resolve_device(config.device)
    rate = sample_rate(config.privacy, SITE_SUBJECTS)
    unet = ConditionedUNet(config)
    train_round(
        unet, *_site(config, SITE_SUBJECTS), config, 1.0, rate,
        config.privacy.local_steps, seed=config.seed, device=device,
    )  # fmt: skip
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def site_peak_memory_mb(config: Config) -> float:
    """Peak memory of a site's training round: GPU memory allocated on CUDA, otherwise the
    whole process's resident set (Python, torch and the model included), measured in a
    process of its own so nothing else this command did counts."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_site_round_peak_mb, config).result()


MEASURES: dict[str, Callable[[Config], float]] = {
    "ddim_speedup_over_ddpm": ddim_speedup_over_ddpm,
    "dp_step_over_nonprivate": dp_step_over_nonprivate,
    "site_peak_memory_mb": site_peak_memory_mb,
}
