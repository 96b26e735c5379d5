"""`fedsynth bench`: speed and memory goals as ratios measured in one run on this machine.

Ratios, not seconds, so that they mean the same on a laptop and on a hospital's GPU box.
Networks are built from the config with fresh weights: timing does not depend on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

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


MEASURES: dict[str, Callable[[Config], float]] = {
    "ddim_speedup_over_ddpm": ddim_speedup_over_ddpm,
}
