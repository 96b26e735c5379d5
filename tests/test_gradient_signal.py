"""One step's signal-to-noise and the cosine between mean gradients: the estimators."""

from __future__ import annotations

import math

import pytest
import torch

from fedsynth.client.dp_trainer import group_by_subject
from fedsynth.common.diffusion import per_sample_loss, training_scheduler
from fedsynth.common.models import ConditionedUNet, latent_shape
from fedsynth.simulations.gradient_signal import (
    Draw,
    clipped_sums,
    cosine,
    signal_to_noise,
    weight_masks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_batches_give_the_signal_without_the_batches_own_noise():
    """Each batch is the signal plus noise of 3 times its norm; their dot product keeps
    only the signal: the estimate is within a few percent of the truth, while one batch's
    own norm is about 3 times too large."""
    d, generator = 200_000, torch.Generator().manual_seed(0)
    signal = torch.randn(d, generator=generator, dtype=torch.float64)
    signal *= 10.0 / signal.norm()  # norm 10
    first = signal + 30.0 / math.sqrt(d) * torch.randn(d, generator=generator, dtype=torch.float64)
    second = signal + 30.0 / math.sqrt(d) * torch.randn(d, generator=generator, dtype=torch.float64)
    noise_std = 0.5  # the step's noise: norm 0.5 sqrt(d)
    truth = 10.0 / (noise_std * math.sqrt(d))
    assert signal_to_noise(first, second, noise_std) == pytest.approx(truth, rel=0.05)
    assert first.norm() / (noise_std * math.sqrt(d)) > 2.5 * truth
    # opposite signals: the estimate is negative, not the root of a negative number
    assert signal_to_noise(first, -second, noise_std) == pytest.approx(-truth, rel=0.05)


def test_the_cosine_of_two_populations_means_comes_back_through_their_noise():
    d, generator = 1_000_000, torch.Generator().manual_seed(1)
    u = torch.randn(d, generator=generator, dtype=torch.float64)
    w = torch.randn(d, generator=generator, dtype=torch.float64)
    v = 0.5 * u / u.norm() + math.sqrt(0.75) * (w - (w @ u) / (u @ u) * u) / w.norm()
    u = u / u.norm()  # cos(u, v) = 0.5 up to w's chance overlap with u

    def batches(mean):
        return tuple(
            mean + 5 / math.sqrt(d) * torch.randn(d, generator=generator, dtype=torch.float64)
            for _ in "ab"
        )

    a, b = batches(u), batches(v)
    assert float(torch.cosine_similarity(a[0], b[0], dim=0)) < 0.05  # the noise hides it
    assert cosine(a, b) == pytest.approx(float(u @ v / v.norm()), abs=0.06)
    assert cosine(a, a) == pytest.approx(1.0, abs=0.06)


def test_each_subject_adds_at_most_one_clip_per_weight_set(tiny_config):
    torch.manual_seed(0)
    unet = ConditionedUNet(tiny_config)
    with torch.no_grad():  # MONAI zero-initialises output layers: wake them
        for param in unet.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(std=0.05)
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn((6, *latent_shape(tiny_config)), generator=generator)
    attributes = torch.rand((6, len(tiny_config.data.attributes)), generator=generator)
    data = group_by_subject(latents, attributes, torch.tensor([0, 0, 1, 2, 2, 3]))
    masks = weight_masks(unet, "norms")
    assert set(masks) == {"all", "norms"} and 0 < masks["norms"].sum() < masks["all"].sum()
    clip, steps = tiny_config.privacy.max_grad_norm, tiny_config.diffusion.train_timesteps
    one = clipped_sums(unet, tiny_config, data, [0], Draw(1, (0, steps)), masks, generator)
    for name, mask in masks.items():
        assert one[name].numel() == mask.sum()
        assert float(one[name].norm()) == pytest.approx(clip, rel=1e-6)  # clipped: norm C
    four = clipped_sums(unet, tiny_config, data, range(4), Draw(2, (0, steps)), masks, generator)
    assert all(clip < float(four[n].norm()) <= 4 * clip + 1e-9 for n in masks)


def test_a_band_draws_timesteps_only_there(tiny_config):
    """band=None and the whole range draw the same; a one-step band differs from both."""
    scheduler = training_scheduler(tiny_config.diffusion)
    torch.manual_seed(0)
    unet = ConditionedUNet(tiny_config).eval()
    latents = torch.randn((8, *latent_shape(tiny_config)))
    attributes = torch.rand((8, len(tiny_config.data.attributes)))

    def loss(band):
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return per_sample_loss(unet, scheduler, latents, attributes, 0.0, generator, band)

    whole = (0, scheduler.num_train_timesteps)
    assert torch.equal(loss(None), loss(whole))
    late = loss((whole[1] - 1, whole[1]))
    assert not torch.allclose(late, loss(None))
    assert torch.allclose(late, loss((whole[1] - 1, whole[1])))
