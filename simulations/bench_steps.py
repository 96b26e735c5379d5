"""A site's DP-SGD step and its plain step, set up side by side so that `fedsynth bench`
can time them in turn (bench_timing.py) rather than one after the other.

Both are the trainer's own code (client/dp_trainer.py): the DP step is `train_round`'s
loop (`_run_steps`, every given subject in the batch), the plain step `nonprivate_step`,
with the config's trainable subset, per-sample-gradient mode and physical batch size, on
a fresh UNet of the config each (timing does not depend on the weights) and random
latents standing in for a site's cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedsynth.client.dp_trainer import (
    _base_optimizer,
    _generator,
    _run_steps,
    _training_on,
    group_by_subject,
    make_private,
    nonprivate_step,
    release,
    trainable_parameters,
)
from fedsynth.common.config import Config
from fedsynth.common.models import ConditionedUNet, latent_shape

SEED = 0  # the steps' sampling, diffusion and noise streams (timing ignores the values)


def site_tensors(config: Config, subjects: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random latents and attributes standing in for a site's cache (two volumes a
    subject; timing ignores values)."""
    generator = torch.Generator().manual_seed(config.seed)
    latents = torch.randn((2 * subjects, *latent_shape(config)), generator=generator)
    attributes = torch.rand((2 * subjects, len(config.data.attributes)), generator=generator)
    return latents, attributes, torch.arange(subjects).repeat_interleave(2)


@dataclass(frozen=True)
class Step:
    """One step, ready to run again and again, and what it trains."""

    run: Callable[[], object]
    info: dict


@contextmanager
def dp_step(config: Config, subjects: int, device: torch.device) -> Iterator[Step]:
    """One DP-SGD step of `subjects` subjects (all in the batch), Opacus attached for as
    long as the context lasts."""
    data = group_by_subject(*site_tensors(config, subjects))
    unet = ConditionedUNet(config)
    with _training_on(unet, device):
        private = make_private(unet, config, 1.0, data.n_subjects, _generator(SEED, 2, device))
        try:
            info = {
                "subjects": data.n_subjects,
                "volumes": int(data.mask.sum()),
                "trainable": config.privacy.trainable,
                "trainable_parameters": sum(p.numel() for p in private.optimizer.params),
                "grad_sample_mode": config.privacy.grad_sample_mode,
                "max_physical_batch_size": config.privacy.max_physical_batch_size,
            }
            yield Step(lambda: _run_steps(private, data, config, 1.0, 1, SEED, device), info)
        finally:
            release(private)


@contextmanager
def plain_step(config: Config, subjects: int, device: torch.device) -> Iterator[Step]:
    """One plain step (the same loss and physical batches, a plain backward) of
    `subjects` subjects on the config's trainable subset."""
    data = group_by_subject(*site_tensors(config, subjects))
    unet = ConditionedUNet(config)
    with _training_on(unet, device):
        params = trainable_parameters(unet, config.privacy.trainable)
        training = config.training
        optimizer = _base_optimizer(
            params, training.finetune_optimizer, training.finetune_learning_rate
        )
        generator = _generator(SEED, 1, device)
        everyone = torch.arange(data.n_subjects)
        info = {"subjects": data.n_subjects, "trainable_parameters": sum(p.numel() for p in params)}
        yield Step(
            lambda: nonprivate_step(unet, optimizer, data, everyone, config, generator, device),
            info,
        )
