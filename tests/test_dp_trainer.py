"""DP-SGD site trainer: subjects are the privacy unit, clipping, noise, empty batches, export."""

from __future__ import annotations

import copy
import dataclasses
import math

import opacus.optimizers.optimizer as opacus_optimizer
import opacus.optimizers.optimizer_fast_gradient_clipping as opacus_ghost_optimizer
import pytest
import torch

from fedsynth.client import dp_trainer
from fedsynth.client.dp_trainer import (
    group_by_subject,
    make_private,
    rows_of,
    subject_backward,
    train_round,
)
from fedsynth.common.config import Config
from fedsynth.common.diffusion import per_sample_loss, training_scheduler
from fedsynth.common.errors import FedsynthError
from fedsynth.common.models import ConditionedUNet, latent_shape

# volumes 0,1 -> subject 10 (ED and ES); 2 -> 11; 3,4 -> 12; 5 -> 13
SUBJECTS = torch.tensor([10, 10, 11, 12, 12, 13])


pytestmark = pytest.mark.usefixtures("one_thread")


def with_privacy(config: Config, **changes) -> Config:
    return dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **changes))


def with_dropout(config: Config, rate: float = 0.5) -> Config:
    """Classifier-free guidance dropout high enough that a few rows hold both cases."""
    return dataclasses.replace(
        config, diffusion=dataclasses.replace(config.diffusion, condition_dropout=rate)
    )


def both_values(keep: torch.Tensor) -> bool:
    return bool((keep == 0).any() and (keep == 1).any())


def awake_unet(config: Config, seed: int = 0) -> ConditionedUNet:
    """MONAI zero-initialises output layers, which would zero every attention gradient."""
    torch.manual_seed(seed)
    unet = ConditionedUNet(config)
    with torch.no_grad():
        for param in unet.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(std=0.05)
    return unet


def site_data(config: Config, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, *latent_shape(config)), generator=generator)
    attributes = torch.rand((n, len(config.data.attributes)), generator=generator)
    return latents, attributes


def flat_params(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def is_attention(name: str) -> bool:
    return name.startswith("tokens.") or ".attention" in name


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).pow(2).flatten(1).mean(1)


def diffusion_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet is trained to predict, as in per_sample_loss."""
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


def subject_gradients_alone(
    unet: ConditionedUNet, rows, config: Config, seed: int
) -> list[torch.Tensor]:
    """Each subject's gradient from a plain backward on its own volumes only.

    Replays the draws of per_sample_loss (noise, timesteps, keep) for the whole batch, so
    each subject sees the noise the trainer drew for it, then runs its rows alone.
    """
    scheduler = training_scheduler(config.diffusion)
    n = len(rows.latents)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows.latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (n,), generator=generator)
    keep = (torch.rand(n, generator=generator) >= config.diffusion.condition_dropout).float()
    # the replay must match per_sample_loss, or the comparison below means nothing
    with torch.no_grad():
        noisy = scheduler.add_noise(rows.latents, noise, timesteps)
        target = diffusion_target(scheduler, rows.latents, noise, timesteps)
        replayed = mse(unet(noisy, timesteps, rows.attributes, keep), target)
        dropout = config.diffusion.condition_dropout
        again = torch.Generator().manual_seed(seed)
        drawn = per_sample_loss(unet, scheduler, rows.latents, rows.attributes, dropout, again)
    torch.testing.assert_close(replayed, drawn)
    assert both_values(keep)  # kept and dropped attributes: the case the comparison is for
    params = [p for p in unet.parameters() if p.requires_grad]
    grads = []
    for s in range(rows.n_subjects):
        idx = (rows.subject == s).nonzero().flatten()
        noisy = scheduler.add_noise(rows.latents[idx], noise[idx], timesteps[idx])
        pred = unet(noisy, timesteps[idx], rows.attributes[idx], keep[idx])
        loss = mse(pred, target[idx]).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return grads


def test_grouping_pads_subjects_and_weights_their_volumes(tiny_config):
    latents, attributes = site_data(tiny_config)
    data = group_by_subject(latents, attributes, SUBJECTS)
    assert data.n_subjects == 4 and data.max_volumes == 2
    assert data.mask.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    torch.testing.assert_close(data.latents[2, 1], latents[4])
    torch.testing.assert_close(data.attributes[3, 0], attributes[5])
    rows = rows_of(data, torch.tensor([0, 3]), torch.device("cpu"))
    torch.testing.assert_close(rows.latents, latents[[0, 1, 5]])
    assert rows.subject.tolist() == [0, 0, 1] and rows.weight.tolist() == [0.5, 0.5, 1.0]
    shuffled = group_by_subject(latents[:5], attributes[:5], torch.tensor([12, 10, 11, 10, 12]))
    torch.testing.assert_close(shuffled.latents[0], latents[[1, 3]])
    torch.testing.assert_close(shuffled.latents[2], latents[[0, 4]])
    assert shuffled.mask.tolist() == [[True, True], [True, False], [True, True]]
    empty = rows_of(data, torch.zeros(0, dtype=torch.long), torch.device("cpu"))
    assert empty.n_subjects == 0 and len(empty.latents) == 0


def test_bad_inputs_are_refused(tiny_config):
    latents, attributes = site_data(tiny_config)
    with pytest.raises(FedsynthError, match=r"\[0, 1\]"):
        group_by_subject(latents, attributes * 50, SUBJECTS)
    with pytest.raises(FedsynthError, match="integers"):
        group_by_subject(latents, attributes, SUBJECTS.float())
    with pytest.raises(FedsynthError, match="subjects must be"):
        group_by_subject(latents, attributes, SUBJECTS[:4])


def test_loss_draws_repeat_each_volume_and_keep_a_subject_one_unit(tiny_config):
    latents, attributes = site_data(tiny_config)
    data = group_by_subject(latents, attributes, SUBJECTS)
    rows = rows_of(data, torch.tensor([0, 3]), torch.device("cpu"), draws=3)
    assert len(rows.latents) == 9  # (2 + 1 volumes) x 3 draws
    assert sorted(rows.subject.tolist()) == [0] * 6 + [1] * 3
    per_subject = torch.zeros(2).index_add_(0, rows.subject, rows.weight)
    torch.testing.assert_close(per_subject, torch.ones(2))  # a subject's loss is a mean
    four = with_privacy(tiny_config, loss_draws=4, max_physical_batch_size=16)
    assert dp_trainer._physical_size(four, data) == 2  # 16 rows: 2 subjects x 2 volumes x 4


def test_loss_draws_steady_a_subjects_gradient_at_the_same_clip(tiny_config):
    """Noise multiplicity: averaging K (noise, timestep) draws per volume before clipping
    shrinks the spread of a subject's gradient over draws, about as 1 / sqrt(K)."""
    latents, attributes = site_data(tiny_config)
    data = group_by_subject(latents, attributes, SUBJECTS)
    unet = awake_unet(tiny_config)
    params = [p for p in unet.parameters() if p.requires_grad]

    def spread(draws: int) -> float:
        grads = []
        for seed in range(12):
            rows = rows_of(data, torch.tensor([0]), torch.device("cpu"), draws)
            losses = dp_trainer._row_losses(
                unet, rows, tiny_config, torch.Generator().manual_seed(seed)
            )
            grad = torch.autograd.grad((losses * rows.weight).sum(), params)
            grads.append(torch.cat([g.flatten() for g in grad]))
        stacked = torch.stack(grads)
        return float((stacked - stacked.mean(0)).norm(dim=1).mean())

    one, eight = spread(1), spread(8)
    assert eight < 0.6 * one, (one, eight)  # 1 / sqrt(8) = 0.35


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
@pytest.mark.parametrize("trainable", ["all", "attention", "norms"])
def test_per_subject_gradients_match_a_loop_over_subjects(tiny_config, mode, trainable):
    config = with_privacy(with_dropout(tiny_config), grad_sample_mode=mode, trainable=trainable)
    unet = awake_unet(config)
    reference = copy.deepcopy(unet)
    latents, attributes = site_data(config)
    rows = rows_of(group_by_subject(latents, attributes, SUBJECTS), torch.arange(4), "cpu")
    assert rows.subject.tolist() == [0, 0, 1, 2, 2, 3]  # the subjects of volumes 0..5
    private = make_private(unet, config, noise_multiplier=0.0, expected_batch_size=4.0)
    subject_backward(private, rows, config, torch.Generator().manual_seed(7))
    per_subject = torch.cat(
        [p.grad_sample.flatten(1) for p in unet.parameters() if p.requires_grad], dim=1
    )
    assert per_subject.shape[0] == 4  # one gradient per subject, not per volume

    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    for name, p in reference.named_parameters():
        p.requires_grad_(name in names)
    expected = subject_gradients_alone(reference, rows, config, seed=7)
    for s, grad in enumerate(expected):
        assert grad.norm() > 0
        torch.testing.assert_close(per_subject[s], grad, rtol=1e-4, atol=1e-6)


def one_step_update(config: Config, subjects: torch.Tensor, n_volumes: int = 2, **kwargs):
    """Weights moved by one SGD step (lr = expected batch, so the update is the noisy sum),
    the round's result, the UNet and the keep-mask its forwards drew."""
    unet = awake_unet(config)
    before = flat_params(unet)
    latents, attributes = site_data(config, n=n_volumes)
    n_subjects = len(subjects.unique())
    kept = []  # the guidance keep-mask of each forward
    unet.register_forward_pre_hook(lambda _, inputs: kept.append(inputs[3]))
    args = {"noise_multiplier": 0.0, "sample_rate": 1.0, "steps": 1, "seed": 3} | kwargs
    result = train_round(
        unet,
        latents,
        attributes,
        subjects,
        config,
        optimizer="sgd",
        learning_rate=args["sample_rate"] * n_subjects,
        **args,
    )
    return before - flat_params(unet), result, unet, torch.cat(kept)


@pytest.mark.parametrize("mode", ["functorch", "hooks", "ghost"])
def test_a_two_volume_subject_moves_a_step_by_at_most_one_clip(tiny_config, mode):
    clip = 1e-3  # far below the raw gradient norms, so clipping binds
    config = with_privacy(
        with_dropout(tiny_config), grad_sample_mode=mode, trainable="all", max_grad_norm=clip
    )
    one_subject, result, _, keep = one_step_update(config, torch.tensor([5, 5]), seed=1)
    assert result.subjects_per_step == (1,)
    assert both_values(keep)  # one volume with its attributes, one with the null tokens
    assert one_subject.norm() <= clip * (1 + 1e-4)
    if mode != "ghost":  # ghost bounds a subject by the sum of its volumes' norms
        assert one_subject.norm() >= clip * 0.999
    two_subjects, result, _, keep = one_step_update(config, torch.tensor([5, 6]), seed=1)
    assert result.subjects_per_step == (2,) and both_values(keep)
    # the same two volumes as two subjects: two clipped gradients, up to 2 clips
    assert clip * 1.2 < two_subjects.norm() <= 2 * clip * (1 + 1e-4)


@pytest.mark.parametrize("mode", ["functorch", "hooks", "ghost"])
def test_a_subject_whose_attributes_are_dropped_moves_a_step_by_one_clip(tiny_config, mode):
    # a learned null token away from zero: its gradient weighs in the subject's norm, so
    # clipping by the norm of a kept row's gradient (the old tokens) moved it 1.001-1.003 clips
    clip = 1e-3
    config = with_privacy(
        with_dropout(tiny_config), grad_sample_mode=mode, trainable="attention", max_grad_norm=clip
    )
    unet = awake_unet(config)
    with torch.no_grad():
        unet.tokens.null.fill_(3.0)
    kept = []
    unet.register_forward_pre_hook(lambda _, inputs: kept.append(inputs[3]))
    before = flat_params(unet)
    latents, attributes = site_data(config, n=1)
    result = train_round(
        unet,
        latents,
        attributes,
        torch.tensor([5]),
        config,
        0.0,
        1.0,
        1,
        seed=0,
        optimizer="sgd",
        learning_rate=1.0,
    )
    assert result.subjects_per_step == (1,) and torch.cat(kept).tolist() == [0.0]
    moved = (before - flat_params(unet)).norm()
    # one volume: every mode clips it exactly (ghost too), by its true gradient's norm
    assert clip * 0.999 <= moved <= clip * (1 + 1e-4)


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_update_is_the_sum_of_per_subject_gradients_each_clipped_to_the_bound(tiny_config, mode):
    # ghost is exact only for one-volume subjects, so this uses one volume per subject
    subjects = SUBJECTS if mode == "functorch" else torch.arange(6)
    config = with_privacy(
        with_dropout(tiny_config), grad_sample_mode="functorch", trainable="attention"
    )
    unet = awake_unet(config)
    reference = copy.deepcopy(unet)
    latents, attributes = site_data(config)
    data = group_by_subject(latents, attributes, subjects)
    rows = rows_of(data, torch.arange(data.n_subjects), "cpu")

    names = {n for n, p in unet.named_parameters() if is_attention(n)}
    for name, p in reference.named_parameters():
        p.requires_grad_(name in names)
    raw = torch.stack(subject_gradients_alone(reference, rows, config, seed=11))
    norms = raw.norm(dim=1)
    clip = float(norms.median())  # some subjects clipped, some left as they are
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    expected = (raw * (clip / norms).clamp(max=1.0)[:, None]).sum(0)

    config = with_privacy(config, grad_sample_mode=mode, max_grad_norm=clip)
    private = make_private(
        unet, config, 0.0, expected_batch_size=1.0, optimizer="sgd", learning_rate=1.0
    )
    subject_backward(private, rows, config, torch.Generator().manual_seed(11))
    private.optimizer.step()
    # the gradient the optimizer applied (no noise, expected batch 1): the clipped sum
    applied = torch.cat([p.grad.flatten() for p in private.optimizer.params])
    scale = float(expected.abs().max())
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-5 * scale)
    clipped = raw * (clip / norms).clamp(max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()


@dataclasses.dataclass(frozen=True)
class NoiseDraw:
    """One call of Opacus' noise function, as the DP optimizer made it."""

    std: float
    generator: torch.Generator | None
    secure_mode: bool


@pytest.fixture
def noise_draws(monkeypatch) -> list[NoiseDraw]:
    """Every Gaussian noise draw Opacus' optimizers make (one per parameter per step)."""
    draws: list[NoiseDraw] = []
    real = opacus_optimizer._generate_noise

    def spy(std, reference, generator=None, secure_mode=False):
        draws.append(NoiseDraw(std, generator, secure_mode))
        return real(std, reference, generator=generator, secure_mode=secure_mode)

    for module in (opacus_optimizer, opacus_ghost_optimizer):
        monkeypatch.setattr(module, "_generate_noise", spy)
    return draws


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_real_round_draws_its_noise_on_the_secure_path_from_a_secret_seed(
    tiny_config, monkeypatch, noise_draws, mode
):
    secret_seeds = []
    randbits = dp_trainer.secrets.randbits
    monkeypatch.setattr(
        dp_trainer.secrets,
        "randbits",
        lambda k: secret_seeds.append(randbits(k)) or secret_seeds[-1],
    )
    config = with_privacy(tiny_config, trainable="attention", grad_sample_mode=mode)
    latents, attributes = site_data(config)
    unet = awake_unet(config)
    result = train_round(unet, latents, attributes, SUBJECTS, config, 1.0, 0.5, 2, seed=None)
    tensors = sum(is_attention(name) for name, _ in unet.named_parameters())
    assert result.steps == 2 and len(noise_draws) == 2 * tensors
    assert all(draw.secure_mode for draw in noise_draws)  # the floating-point-safe draws
    [seed] = secret_seeds  # 63 bits from the OS CSPRNG, drawn once for the round
    [generator] = {draw.generator for draw in noise_draws}
    assert generator is not None and generator is not torch.default_generator
    assert generator.initial_seed() == dp_trainer._generator(seed, 2, "cpu").initial_seed()


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_noise_has_std_sigma_times_clip_over_expected_batch(tiny_config, mode):
    sigma, clip, expected_batch = 0.8, 0.5, 2.5
    config = with_privacy(tiny_config, trainable="all", max_grad_norm=clip, grad_sample_mode=mode)
    unet = awake_unet(config)
    private = make_private(
        unet,
        config,
        sigma,
        expected_batch_size=expected_batch,
        noise_generator=torch.Generator().manual_seed(0),
        optimizer="sgd",
        learning_rate=1.0,
    )
    latents, attributes = site_data(config)
    data = group_by_subject(latents, attributes, SUBJECTS)
    before = flat_params(unet)
    # a forced empty batch: zero gradient, so the update is the noise alone
    subject_backward(private, rows_of(data, torch.zeros(0, dtype=torch.long), "cpu"), config, None)
    private.optimizer.step()
    noise = before - flat_params(unet)
    n = noise.numel()
    assert n > 100_000
    # n * s^2 / std^2 is chi-square(n): relative sd of s^2 is sqrt(2 / n), ~0.2% here
    target = sigma * clip / expected_batch
    chi2 = float((noise.double() ** 2).sum()) / target**2
    z = (chi2 - n) / math.sqrt(2 * n)
    assert abs(z) < 4
    assert abs(float(noise.mean())) < 5 * target / math.sqrt(n)
    wrong = float((noise.double() ** 2).sum()) / (1.2 * target) ** 2
    assert abs((wrong - n) / math.sqrt(2 * n)) > 4  # a 1.2x sigma would be caught


def test_noise_on_a_real_batch_is_sigma_clip_over_q_n(tiny_config):
    config = with_privacy(tiny_config, trainable="attention", max_grad_norm=0.3)
    run = {"n_volumes": 6, "sample_rate": 0.5, "seed": 0}  # 4 subjects: q n = 2
    quiet, *_ = one_step_update(config, SUBJECTS, **run)
    noisy, result, *_ = one_step_update(config, SUBJECTS, noise_multiplier=1.5, **run)
    # 3 subjects drawn, not q n = 2: noise over the real batch would have std 2/3 sigma C
    assert result.subjects_per_step == (3,)
    noise = (noisy - quiet)[noisy != 0]  # same draws but the noise; lr = q n: std = sigma C
    assert noise.numel() > 50_000
    ratio = float(noise.std()) / (1.5 * 0.3)
    assert abs(ratio - 1) < 0.015 and abs(ratio - 1.2) > 0.1


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_runs_with_the_planned_sigma_rate_and_steps(
    tiny_config, monkeypatch, noise_draws, mode
):
    """What Opacus was really given, read from its sampler and optimizer, is the plan (the
    ledger line a site writes) and what the round reports."""
    samplers = []

    class RecordingSampler(dp_trainer.UniformWithReplacementSampler):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            samplers.append(self)

    monkeypatch.setattr(dp_trainer, "UniformWithReplacementSampler", RecordingSampler)
    divisors = []
    scale_grad = opacus_optimizer.DPOptimizer.scale_grad

    def spy_scale_grad(self) -> None:
        divisors.append(self.expected_batch_size)
        scale_grad(self)

    monkeypatch.setattr(opacus_optimizer.DPOptimizer, "scale_grad", spy_scale_grad)
    sigma, q, steps, clip = 1.37, 0.5, 3, 0.25
    config = with_privacy(
        tiny_config, trainable="attention", grad_sample_mode=mode, max_grad_norm=clip
    )
    latents, attributes = site_data(config)
    unet = awake_unet(config)
    result = train_round(unet, latents, attributes, SUBJECTS, config, sigma, q, steps, seed=5)
    [sampler] = samplers
    assert (sampler.num_samples, sampler.sample_rate, sampler.steps) == (4, q, steps)
    tensors = sum(is_attention(name) for name, _ in unet.named_parameters())
    assert len(noise_draws) == steps * tensors  # every step drew noise, once per tensor
    assert all(draw.std == pytest.approx(sigma * clip) for draw in noise_draws)
    assert divisors == [q * 4] * steps  # the noisy sum is divided by q n, not the batch
    assert (result.noise_multiplier, result.sample_rate, result.steps) == (sigma, q, steps)


def test_the_noisy_sum_is_divided_by_the_public_size_not_the_count(tiny_config, monkeypatch):
    """A site that publishes m < n subjects samples its n at the planned q and divides by
    q m: a divisor q n would scale the update's noise by 1/n and so show n."""
    samplers, divisors = [], []

    class RecordingSampler(dp_trainer.UniformWithReplacementSampler):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            samplers.append(self)

    scale_grad = opacus_optimizer.DPOptimizer.scale_grad

    def spy_scale_grad(self) -> None:
        divisors.append(self.expected_batch_size)
        scale_grad(self)

    monkeypatch.setattr(dp_trainer, "UniformWithReplacementSampler", RecordingSampler)
    monkeypatch.setattr(opacus_optimizer.DPOptimizer, "scale_grad", spy_scale_grad)
    config = with_privacy(tiny_config, trainable="attention")
    latents, attributes = site_data(config)
    q, steps = 0.5, 2
    train_round(
        awake_unet(config),
        latents,
        attributes,
        SUBJECTS,
        config,
        1.0,
        q,
        steps,
        seed=1,
        public_subjects=3,
    )
    [sampler] = samplers
    assert (sampler.num_samples, sampler.sample_rate) == (4, q)  # all 4 subjects, at q
    assert divisors == [q * 3] * steps
    with pytest.raises(FedsynthError, match="public size 5 must be from 1 to the site's 4"):
        train_round(
            awake_unet(config),
            latents,
            attributes,
            SUBJECTS,
            config,
            1.0,
            q,
            1,
            seed=1,
            public_subjects=5,
        )


def test_poisson_sampling_over_many_steps_has_the_planned_rate():
    n, q, steps = 10, 0.3, 4000
    loader = dp_trainer._poisson_loader(n, q, steps, torch.Generator().manual_seed(0))
    batches = [indices for (indices,) in loader]
    assert len(batches) == steps and any(len(b) == 0 for b in batches)
    counts = torch.bincount(torch.cat(batches), minlength=n)
    trials = n * steps
    sd = math.sqrt(trials * q * (1 - q))  # the total is Binomial(n * steps, q)
    assert abs(int(counts.sum()) - trials * q) < 4 * sd
    assert 0.05 * trials * q > 6 * sd  # so a rate 5% off would be caught
    per_subject_sd = math.sqrt(steps * q * (1 - q))  # each subject alike
    assert (counts - steps * q).abs().max() < 4.5 * per_subject_sd


def test_empty_poisson_batches_are_steps_with_noise_only(tiny_config):
    config = with_privacy(tiny_config, trainable="attention")
    latents, attributes = site_data(config)
    unet = awake_unet(config)
    before = flat_params(unet)
    result = train_round(
        unet,
        latents,
        attributes,
        SUBJECTS,
        config,
        noise_multiplier=1.0,
        sample_rate=1e-9,
        steps=3,
        seed=0,
        optimizer="sgd",
        learning_rate=1e-9,
    )
    assert result.steps == 3 and result.empty_steps == 3
    assert result.subjects_per_step == (0, 0, 0) and math.isnan(result.mean_loss)
    moved = flat_params(unet) - before
    assert torch.isfinite(moved).all() and (moved != 0).any()
    # no noise: an empty step leaves plain SGD weights as they were
    result = train_round(
        unet,
        latents,
        attributes,
        SUBJECTS,
        config,
        noise_multiplier=0.0,
        sample_rate=1e-9,
        steps=2,
        seed=0,
        optimizer="sgd",
    )
    assert torch.equal(flat_params(unet) - before, moved)


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_big_logical_batches_split_into_physical_ones_with_one_noise_draw(tiny_config, mode):
    clip, sigma, q = 0.2, 1.0, 0.4
    config = with_privacy(
        tiny_config, trainable="attention", max_grad_norm=clip, grad_sample_mode=mode
    )
    latents, attributes = site_data(config)
    kwargs = {"noise_multiplier": sigma, "sample_rate": q, "steps": 4, "seed": 4}
    updates, results, volumes_seen = [], [], []
    for physical in (8, 2):  # 2: one subject (up to two volumes) per forward
        unet = awake_unet(config)
        hook = unet.unet.register_forward_pre_hook(
            lambda _, args: volumes_seen.append(len(args[0]))
        )
        before = flat_params(unet)
        results.append(
            train_round(
                unet,
                latents,
                attributes,
                SUBJECTS,
                with_privacy(config, max_physical_batch_size=physical),
                optimizer="sgd",
                learning_rate=q * 4,
                **kwargs,
            )
        )
        hook.remove()
        updates.append(before - flat_params(unet))
    assert results[0].subjects_per_step == results[1].subjects_per_step
    sampled = sum(results[0].subjects_per_step)
    assert results[0].empty_steps > 0 and sampled >= 3  # both kinds of step happen
    assert max(volumes_seen[-sampled:]) <= 2 and max(volumes_seen) > 2
    # the runs differ only by diffusion draws inside each subject's clipped gradient (each
    # at most one clip); a noise drawn per physical batch would differ by ~ sigma C sqrt(d)
    difference = (updates[0] - updates[1]).norm()
    assert difference <= 2 * sampled * clip * (1 + 1e-4)
    assert updates[0].norm() > 50 * sampled * clip


def norm_names(unet: torch.nn.Module) -> set[str]:
    """The parameters of normalisation layers (by module type, not by name) and tokens."""
    names = {n for n, _ in unet.named_parameters() if n.startswith("tokens.")}
    for prefix, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            names |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
    return names


def test_a_subset_leaves_other_weights_bit_identical(tiny_config):
    latents, attributes = site_data(tiny_config)
    changed, counted = {}, {}
    for trainable in ("attention", "norms", "all"):
        config = with_privacy(tiny_config, trainable=trainable)
        unet = awake_unet(config)
        before = {n: p.detach().clone() for n, p in unet.named_parameters()}
        result = train_round(
            unet,
            latents,
            attributes,
            SUBJECTS,
            config,
            noise_multiplier=1.0,
            sample_rate=0.5,
            steps=2,
            seed=0,
        )
        assert all(p.requires_grad for p in unet.parameters())  # flags given back
        changed[trainable] = {
            n for n, p in unet.named_parameters() if not torch.equal(p, before[n])
        }
        counted[trainable] = result.trainable_parameters
    names = set(before)
    attention = {n for n in names if is_attention(n)}
    norms = norm_names(unet)
    assert "tokens.scale" in attention and any("attn2.to_k" in n for n in attention)
    assert any(".norm1.weight" in n for n in norms) and any("out.0.bias" in n for n in norms)
    assert changed["attention"] == attention
    assert changed["norms"] == norms
    assert changed["all"] == names
    for trainable, subset in (("attention", attention), ("norms", norms), ("all", names)):
        assert counted[trainable] == sum(before[n].numel() for n in subset)
    assert counted["norms"] < counted["attention"] < counted["all"]


def test_exported_weights_are_a_plain_unet_and_rounds_are_deterministic(tiny_config):
    config = with_privacy(tiny_config, trainable="all", grad_sample_mode="hooks")
    latents, attributes = site_data(config)
    states = []
    for seed in (0, 0, 1, None, None):
        unet = awake_unet(config)
        train_round(
            unet,
            latents,
            attributes,
            SUBJECTS,
            config,
            noise_multiplier=1.0,
            sample_rate=0.5,
            steps=2,
            seed=seed,
        )
        states.append(unet.state_dict())
    fresh = ConditionedUNet(config)
    assert list(states[0]) == list(fresh.state_dict())
    fresh.load_state_dict(states[0], strict=True)
    for module in unet.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not hasattr(module, "activations") and not hasattr(
            module, "autograd_grad_sample_hooks"
        )
    for param in unet.parameters():
        assert param.grad is None
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample"):
            assert not hasattr(param, attr)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])
    # a site's real rounds (seed None) draw a fresh secret seed: the noise cannot be replayed
    assert any(not torch.equal(states[3][k], states[4][k]) for k in states[3])


def test_the_sites_optimizer_is_the_configs_unless_the_caller_names_one(tiny_config):
    """training.finetune-optimizer decides what a site steps with: a round under an sgd
    config moves the weights exactly as one that asks for sgd, and differently from the
    same round under adamw (whose first step is about lr in every moved coordinate, SGD's
    the mean clipped gradient times lr)."""

    def training(name: str) -> Config:
        chosen = dataclasses.replace(tiny_config.training, finetune_optimizer=name)
        return with_privacy(dataclasses.replace(tiny_config, training=chosen), trainable="norms")

    def moved(config: Config, **kwargs) -> torch.Tensor:
        unet = awake_unet(config)
        before = flat_params(unet)
        latents, attributes = site_data(config, n=4)
        train_round(
            unet,
            latents,
            attributes,
            torch.arange(4),
            config,
            0.0,
            1.0,
            1,
            seed=2,
            learning_rate=1e-3,
            **kwargs,
        )
        return before - flat_params(unet)

    sgd, adamw = training("sgd"), training("adamw")
    by_sgd_config = moved(sgd)
    assert by_sgd_config.abs().max() > 0
    torch.testing.assert_close(by_sgd_config, moved(adamw, optimizer="sgd"), rtol=0, atol=0)
    by_adamw_config = moved(adamw)
    torch.testing.assert_close(by_adamw_config, moved(sgd, optimizer="adamw"), rtol=0, atol=0)
    stepped = by_adamw_config.abs() > 1e-4  # adamw: about lr wherever a gradient was not 0
    assert stepped.sum() > 100
    assert by_adamw_config[stepped].abs().median() == pytest.approx(1e-3, rel=0.05)
    assert by_sgd_config[stepped].abs().median() < 5e-4  # sgd: lr times a gradient < 1


@pytest.mark.parametrize("mode", ["functorch", "hooks", "ghost"])
def test_given_gradients_are_clipped_and_summed_like_a_subjects(tiny_config, mode):
    """The privacy audit's canaries (simulations/canaries.py), given at 10 clips: in every
    mode each moves its weight by exactly one clip (one SGD step at rate = the expected
    batch, noise 0), beside what the real subjects move, which they leave alone."""
    from fedsynth.simulations.canaries import make_canaries

    clip = 1e-3
    config = with_privacy(tiny_config, grad_sample_mode=mode, trainable="all", max_grad_norm=clip)
    shapes = {n: p.shape for n, p in awake_unet(config).named_parameters()}
    canaries = make_canaries(shapes, 6, 10 * clip, seed=2)
    latents, attributes = site_data(config)
    moved = {}
    for given in (None, canaries):
        unet = awake_unet(config)
        total = 4 + (0 if given is None else given.size)
        train_round(
            unet, latents, attributes, SUBJECTS, config, 0.0, 1.0, 1, seed=3,
            optimizer="sgd", learning_rate=float(total), given=given,
        )  # fmt: skip
        start = awake_unet(config).state_dict()
        moved[given is None] = {k: start[k] - v for k, v in unet.state_dict().items()}
    assert 0 < canaries.size < 6  # some canaries in, some out
    for c in range(6):
        name, k = canaries.names[c], int(canaries.flat[c])
        extra = moved[False][name].flatten()[k] - moved[True][name].flatten()[k]
        expected = float(canaries.signs[c]) * clip if canaries.included[c] else 0.0
        assert float(extra) == pytest.approx(expected, abs=clip * 1e-3)
