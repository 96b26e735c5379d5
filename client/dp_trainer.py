"""DP-SGD finetuning of the latent UNet on one site's cached latents, with Opacus.

The privacy unit is the subject (docs/privacy.md, "The privacy model"): Poisson sampling picks
subjects, and each sampled subject contributes one clipped gradient per step, however many
volumes (ED, ES, repeats) it has. Its loss is the mean of its volumes' diffusion losses.
Opacus computes per-row gradients (`p.grad_sample`, rows = volumes); before
`DPOptimizer.step()` reads them, the rows of each subject are summed, so clipping and the
noise calibration act on subjects. Ghost clipping never materialises per-row gradients,
only their norms; there a subject is clipped by the sum of its rows' norms (a triangle
bound: exact for one-volume subjects, conservative for two or more).

The noise multiplier is given: the caller plans it with an accountant, this module does
not account. Everything random (sampling, diffusion noise and timesteps, DP noise) comes
from torch generators seeded by `seed`. A site's real rounds pass `seed=None`: the seed is
then 63 bits from the operating system's CSPRNG (`secrets`), never stored or sent, because
whoever knows the seed can regenerate the noise and subtract it. Tests and benchmarks pass
a seed to be reproducible. The generators themselves (Mersenne Twister on CPU, Philox on
CUDA) are not cryptographic: the noise is as unpredictable as that secret seed.

The DP optimizer always runs Opacus' `secure_mode` noise path: each Gaussian is drawn as
the sum of four draws halved (Holohan & Braghin, arXiv:2107.10138, section 5.1), which
defeats the floating-point attacks on the Gaussian mechanism (arXiv:2112.05307). That path
needs no torchcsprng: the package would only give Opacus' PrivacyEngine a /dev/urandom
generator, which this module does not use (and Opacus 1.6 skips its own torchcsprng tests
as incompatible with current PyTorch). Seeded runs take the same path, reproducibly.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from opacus.data_loader import wrap_collate_with_empty
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from fedsynth.common.config import Config
from fedsynth.common.diffusion import per_sample_loss, training_scheduler
from fedsynth.common.errors import FedsynthError
from fedsynth.common.models import ConditionedUNet, trainable_names

log = logging.getLogger(__name__)

OptimizerName = Literal["adamw", "sgd"]
# what DPOptimizer leaves on parameters besides the grad-sample attributes Opacus cleans
_OPTIMIZER_PARAM_ATTRS = ("summed_grad",)


@dataclass(frozen=True)
class SubjectData:
    """A site's latents grouped by subject, padded to the most volumes any subject has."""

    latents: torch.Tensor  # (S, V, C, H, W, D)
    attributes: torch.Tensor  # (S, V, A)
    mask: torch.Tensor  # (S, V) bool, True where a real volume sits

    @property
    def n_subjects(self) -> int:
        return self.latents.shape[0]

    @property
    def max_volumes(self) -> int:
        return self.latents.shape[1]


@dataclass(frozen=True)
class RowBatch:
    """Sampled subjects flattened to volume rows for the UNet forward."""

    latents: torch.Tensor  # (R, C, H, W, D)
    attributes: torch.Tensor  # (R, A)
    subject: torch.Tensor  # (R,) index of the row's subject within the batch, 0..k-1
    weight: torch.Tensor  # (R,) 1 / volumes of the row's subject: a subject's loss is a mean
    n_subjects: int

    def subject_losses(self, row_losses: torch.Tensor) -> torch.Tensor:
        """(k,) mean volume loss per subject."""
        out = torch.zeros(self.n_subjects, device=row_losses.device, dtype=row_losses.dtype)
        return out.index_add_(0, self.subject, row_losses.detach() * self.weight)


@dataclass
class PrivateUNet:
    """A UNet with Opacus attached: the grad-sample module and its DP optimizer."""

    unet: ConditionedUNet
    module: AbstractGradSampleModule
    optimizer: DPOptimizer
    mode: str
    max_grad_norm: float


@dataclass(frozen=True)
class RoundResult:
    """What one round did, its noise multiplier, sample rate and steps as Opacus ran them;
    `mean_loss` is computed from private data: keep it at the site."""

    steps: int
    noise_multiplier: float
    sample_rate: float
    mean_loss: float
    subjects_per_step: tuple[int, ...]
    empty_steps: int
    trainable: str
    grad_sample_mode: str
    trainable_parameters: int
    seconds: float
    # the site optimiser's state_dict after the round (moments of noisy gradients only)
    optimizer_state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def group_by_subject(
    latents: torch.Tensor, attributes: torch.Tensor, subjects: torch.Tensor
) -> SubjectData:
    """Pad each subject's volumes into one record, so Poisson sampling picks subjects.

    Records follow ascending subject id; a subject's volumes keep their input order.
    """
    _check_inputs(latents, attributes, subjects)
    ids, inverse, counts = torch.unique(subjects, return_inverse=True, return_counts=True)
    n, v = len(ids), int(counts.max())
    order = torch.argsort(inverse, stable=True)
    slot = torch.empty_like(inverse)
    starts = torch.cumsum(counts, 0) - counts
    slot[order] = torch.arange(len(inverse)) - starts[inverse[order]]
    padded = latents.new_zeros((n, v, *latents.shape[1:]))
    padded[inverse, slot] = latents
    attrs = attributes.new_zeros((n, v, attributes.shape[1]))
    attrs[inverse, slot] = attributes
    mask = torch.zeros((n, v), dtype=torch.bool)
    mask[inverse, slot] = True
    return SubjectData(padded, attrs, mask)


def _check_inputs(latents: torch.Tensor, attributes: torch.Tensor, subjects: torch.Tensor) -> None:
    """Refuse inputs that would silently train on the wrong rows or units."""
    rows = latents.shape[0]
    if latents.dim() != 5:
        raise FedsynthError(f"latents must be (volumes, C, H, W, D), got {tuple(latents.shape)}")
    if attributes.dim() != 2 or attributes.shape[0] != rows:
        raise FedsynthError(f"attributes must be ({rows}, A), got {tuple(attributes.shape)}")
    if subjects.dim() != 1 or subjects.shape[0] != rows:
        raise FedsynthError(f"subjects must be ({rows},), got {tuple(subjects.shape)}")
    if subjects.dtype.is_floating_point or subjects.dtype == torch.bool:
        raise FedsynthError(f"subject ids must be integers, got {subjects.dtype}")
    if rows == 0:
        raise FedsynthError("no volumes to train on")
    if not torch.isfinite(attributes).all() or attributes.min() < 0 or attributes.max() > 1:
        raise FedsynthError("attributes must be scaled to [0, 1] by their declared ranges")


def rows_of(
    data: SubjectData, indices: torch.Tensor, device: torch.device, draws: int = 1
) -> RowBatch:
    """The real (unpadded) volumes of the subjects `indices`, with each row's subject, each
    volume `draws` times (its own noise and timestep per copy): a subject's loss is then the
    mean over its volumes and draws, whose gradient varies less before it is clipped (noise
    multiplicity, Dockhorn et al. 2023, "Differentially Private Diffusion Models", sec. 3.2).
    The subject still gives one clipped gradient per step: no privacy cost."""
    mask = data.mask[indices]
    batch_subject, slot = mask.nonzero(as_tuple=True)
    counts = mask.sum(dim=1)
    batch_subject, slot = batch_subject.repeat(draws), slot.repeat(draws)
    picked = indices[batch_subject]
    return RowBatch(
        latents=data.latents[picked, slot].to(device),
        attributes=data.attributes[picked, slot].to(device),
        subject=batch_subject.to(device),
        weight=(1.0 / (draws * counts[batch_subject].float())).to(device),
        n_subjects=len(indices),
    )


def trainable_parameters(unet: ConditionedUNet, trainable: str) -> list[nn.Parameter]:
    """Set requires_grad for the config's subset (`common.models.trainable_names`, which
    says why each); fewer parameters mean less noise each. Returns them in model order."""
    names = set(trainable_names(unet, trainable))
    chosen = []
    for name, param in unet.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            chosen.append(param)
    return chosen


class GivenGradients(Protocol):
    """Subjects without volumes whose per-subject gradient is given, not computed: the
    privacy audit's canaries (simulations/canaries.py). They join the site's subjects
    after its own (indices n..n+size-1), are Poisson-sampled, clipped and noised with
    them; nothing else uses this."""

    @property
    def size(self) -> int: ...

    def gradients(
        self, sampled: torch.Tensor, params: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """Per trained weight, the gradients (k, *shape) of the given subjects `sampled`
        (k,), indices 0..size-1."""
        ...


def _add_given(private: PrivateUNet, given: GivenGradients, sampled: torch.Tensor) -> None:
    """Append the sampled given subjects' gradients to this physical batch's per-subject
    gradients, where Opacus clips them with the rest; ghost mode has only the clipped sum,
    so there each given gradient is clipped here (scaled to norm <= the clip) and added."""
    params = {n: p for n, p in private.unet.named_parameters() if p.requires_grad}
    rows = given.gradients(sampled, params)
    if private.mode == "ghost":
        norms = torch.stack([r.flatten(1).norm(dim=1) for r in rows.values()]).norm(dim=0)
        scale = (private.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    for name, param in params.items():
        if private.mode == "ghost":
            clipped = (rows[name] * scale.view(-1, *[1] * param.dim())).sum(0)
            param.grad = clipped + (0 if param.grad is None else param.grad)
        else:
            grad_sample = param.grad_sample  # type: ignore[attr-defined]  # set by Opacus
            param.grad_sample = torch.cat([grad_sample, rows[name]])  # type: ignore[attr-defined]


def _generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    """An independent, reproducible stream per purpose (sampling, diffusion, DP noise)."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def _base_optimizer(
    params: list[nn.Parameter], name: OptimizerName, lr: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":  # as in public pretraining
        return torch.optim.AdamW(params, lr=lr)
    raise FedsynthError(f"optimizer must be adamw or sgd, got {name!r}")


def make_private(
    unet: ConditionedUNet,
    config: Config,
    noise_multiplier: float,
    expected_batch_size: float,
    noise_generator: torch.Generator | None = None,
    optimizer: OptimizerName | None = None,
    learning_rate: float | None = None,
) -> PrivateUNet:
    """Attach Opacus to `unet` in place (hooks on its modules; undo with `release`).

    Rows are weighted and summed by our loss (GSM reduction "sum"), while the optimizer
    divides the noisy sum by `expected_batch_size`, as DP-SGD's mean (train_round gives
    q m: the expected subjects per step of the site's public size m, see there).
    """
    privacy = config.privacy
    params = trainable_parameters(unet, privacy.trainable)
    mode = privacy.grad_sample_mode
    extra = {"max_grad_norm": privacy.max_grad_norm} if mode == "ghost" else {}
    module = prepare_module(unet, mode, loss_reduction="sum", **extra)
    optimizer_class = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
    training = config.training
    base = _base_optimizer(
        params,
        training.finetune_optimizer if optimizer is None else optimizer,
        training.finetune_learning_rate if learning_rate is None else learning_rate,
    )
    dp_optimizer = optimizer_class(
        base,
        noise_multiplier=noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=True,  # the floating-point-attack-safe noise (see the module docstring)
    )
    return PrivateUNet(unet, module, dp_optimizer, mode, privacy.max_grad_norm)


def release(private: PrivateUNet) -> None:
    """Remove Opacus' hooks and attributes so the UNet is a plain module again."""
    private.optimizer.zero_grad(set_to_none=True)
    private.module.cleanup()
    for module in private.unet.modules():
        for attr in ("activations", "max_batch_len", "ft_compute_sample_grad"):
            if attr in module.__dict__:
                delattr(module, attr)
    for param in private.unet.parameters():
        for attr in _OPTIMIZER_PARAM_ATTRS:
            if hasattr(param, attr):
                delattr(param, attr)


def _row_losses(
    model: nn.Module, rows: RowBatch, config: Config, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-volume diffusion loss (R,), with the config's condition dropout."""
    scheduler = training_scheduler(config.diffusion)
    return per_sample_loss(
        model,  # type: ignore[arg-type]  # the grad-sample wrapper forwards to the UNet
        scheduler,
        rows.latents,
        rows.attributes,
        config.diffusion.condition_dropout,
        generator,
    )


@contextmanager
def _quiet_first_layer() -> Iterator[None]:
    """Silence torch's note that the token layer's inputs need no gradient.

    Opacus hooks every layer with a full backward hook; the AttributeTokens layer takes
    the (constant) attributes, so torch warns on every backward. Opacus only needs the
    output gradients there, so the warning is noise.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _sum_rows_by_subject(param: nn.Parameter, rows: RowBatch) -> None:
    """Turn Opacus' per-volume gradients into per-subject ones, before clipping reads them."""
    # Opacus sets grad_sample on each parameter; torch's Parameter stub does not declare it
    grad_sample = param.grad_sample  # type: ignore[attr-defined]
    if not isinstance(grad_sample, torch.Tensor):  # a list would mean accumulated batches
        raise RuntimeError(f"expected one per-sample gradient tensor, got {type(grad_sample)}")
    summed = grad_sample.new_zeros((rows.n_subjects, *grad_sample.shape[1:]))
    param.grad_sample = summed.index_add_(0, rows.subject, grad_sample[: len(rows.subject)])  # type: ignore[attr-defined]


def subject_backward(
    private: PrivateUNet, rows: RowBatch, config: Config, generator: torch.Generator | None
) -> torch.Tensor:
    """Backward one physical batch so the optimizer sees one gradient per subject.

    Returns each subject's loss (k,). Per-sample modes leave `p.grad_sample` of shape
    (k, *p.shape); ghost mode leaves `p.grad` = sum of subject-clipped gradients.
    """
    params = private.optimizer.params
    if rows.n_subjects == 0:  # empty Poisson batch: nothing to clip, noise still follows
        for param in params:
            if private.mode == "ghost":
                param.grad = torch.zeros_like(param)
            else:
                param.grad_sample = param.new_zeros((0, *param.shape))
        return torch.zeros(0)
    row_losses = _row_losses(private.module, rows, config, generator)
    weighted = row_losses * rows.weight
    if private.mode == "ghost":
        _ghost_backward(private, rows, weighted)
    else:
        with _quiet_first_layer():
            weighted.sum().backward()
        for param in params:
            _sum_rows_by_subject(param, rows)
    return rows.subject_losses(row_losses)


def _ghost_backward(private: PrivateUNet, rows: RowBatch, weighted: torch.Tensor) -> None:
    """Opacus' two-pass ghost clipping, with the clip factor shared by a subject's rows.

    Ghost clipping gives per-row gradient norms only; a subject's gradient norm is bounded
    by the sum of its rows' norms, so scaling all its rows by C / that sum keeps the
    subject's contribution within C (exact for one-volume subjects).
    """
    module = private.module
    assert isinstance(module, GradSampleModuleFastGradientClipping)
    with _quiet_first_layer():
        weighted.sum().backward(retain_graph=True)
    private.optimizer.zero_grad()
    row_norms = module.get_norm_sample()
    bound = row_norms.new_zeros(rows.n_subjects).index_add_(0, rows.subject, row_norms)
    coefficient = (private.max_grad_norm / (bound + 1e-6)).clamp(max=1.0)
    module.disable_hooks()
    try:
        with _quiet_first_layer():
            (weighted * coefficient[rows.subject].detach()).sum().backward()
    finally:
        module.enable_hooks()


def _physical_size(config: Config, data: SubjectData) -> int:
    """Subjects per physical batch: at most max-physical-batch-size rows (volumes times
    loss draws) per forward, and never less than one whole subject (its rows must share one
    backward to be summed)."""
    rows_per_subject = data.max_volumes * config.privacy.loss_draws
    return max(1, config.privacy.max_physical_batch_size // rows_per_subject)


def _poisson_loader(
    n_subjects: int, sample_rate: float, steps: int, generator: torch.Generator
) -> DataLoader:
    """Opacus' Poisson sampler over subject indices, exactly `steps` logical batches."""
    sampler = UniformWithReplacementSampler(
        num_samples=n_subjects, sample_rate=sample_rate, generator=generator, steps=steps
    )
    collate = wrap_collate_with_empty(
        collate_fn=default_collate, sample_empty_shapes=[(0,)], dtypes=[torch.long]
    )
    return DataLoader(
        TensorDataset(torch.arange(n_subjects)), batch_sampler=sampler, collate_fn=collate
    )


@contextmanager
def _training_on(unet: ConditionedUNet, device: torch.device) -> Iterator[None]:
    """Train on `device` in train mode; give the UNet back where and as it was."""
    home = next(unet.parameters()).device
    was_training = unet.training
    flags = [p.requires_grad for p in unet.parameters()]
    unet.to(device).train()
    try:
        yield
    finally:
        for param, flag in zip(unet.parameters(), flags, strict=True):
            param.requires_grad_(flag)
        unet.to(home).train(was_training)


def train_round(
    unet: ConditionedUNet,
    latents: torch.Tensor,
    attributes: torch.Tensor,
    subjects: torch.Tensor,
    config: Config,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    seed: int | None,
    device: torch.device | str = "cpu",
    optimizer: OptimizerName | None = None,
    learning_rate: float | None = None,
    public_subjects: int | None = None,
    given: GivenGradients | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> RoundResult:
    """Run `steps` DP-SGD steps on one site's data; `unet` is updated in place.

    latents (N, C, H, W, D), attributes (N, A) in [0, 1], subjects (N,) integer ids.
    The optimizer (None: `training.finetune-optimizer`) starts fresh, or from
    `optimizer_state`: the `optimizer_state` of this site's previous RoundResult (FedAvg
    sends weights, not optimizer state, so only the site can keep it; a state kept for
    other weights or another optimiser is logged and not used). The moments are computed from
    the noisy gradients only: keeping them is post-processing of DP-SGD's output.

    `public_subjects`: the size m <= n the site publishes (client/public_size.py; None: n).
    The noisy sum of clipped gradients is divided by q m, not q n: a normaliser that
    depends on n would scale the update's noise (std sigma C / (q n), which a model's
    millions of weights estimate closely) and so give n away; q m is public. The signal,
    a sum of about q n clipped gradients, still scales as n / m (with plain SGD the
    update's size shows it): a channel through DP-SGD's output, see client/public_size.py.
    `given`: the privacy audit's canaries, counted among the site's subjects (None: none).
    """
    if not 0 < sample_rate <= 1:
        raise FedsynthError(f"sample rate must be in (0, 1], got {sample_rate}")
    if noise_multiplier < 0 or steps < 0:
        raise FedsynthError("noise multiplier and steps must be >= 0")
    if seed is None:
        seed = secrets.randbits(63)
    device = torch.device(device)
    data = group_by_subject(latents, attributes, subjects)
    total = data.n_subjects + (0 if given is None else given.size)
    size = total if public_subjects is None else public_subjects
    if not 1 <= size <= total:
        raise FedsynthError(f"public size {size} must be from 1 to the site's {total} subjects")
    started = time.perf_counter()
    with _training_on(unet, device):
        private = make_private(
            unet,
            config,
            noise_multiplier,
            expected_batch_size=sample_rate * size,
            noise_generator=_generator(seed, 2, device),
            optimizer=optimizer,
            learning_rate=learning_rate,
        )
        if optimizer_state and not _load_optimizer_state(private, optimizer_state):
            log.warning(
                "the kept optimiser state is for other trainable weights or another "
                "optimiser: this round starts it fresh"
            )
        try:
            losses, sizes, used_rate = _run_steps(
                private, data, config, sample_rate, steps, seed, device, given
            )
        finally:
            release(private)
    return RoundResult(  # what Opacus' sampler and optimizer really ran with
        steps=len(sizes),
        noise_multiplier=private.optimizer.noise_multiplier,
        sample_rate=used_rate,
        mean_loss=float(torch.cat(losses).mean()) if sum(sizes) else math.nan,
        subjects_per_step=tuple(sizes),
        empty_steps=sizes.count(0),
        trainable=config.privacy.trainable,
        grad_sample_mode=private.mode,
        trainable_parameters=sum(p.numel() for p in private.optimizer.params),
        seconds=time.perf_counter() - started,
        optimizer_state=_optimizer_state(private),
    )


def _optimizer_state(private: PrivateUNet) -> dict[str, Any]:
    """The base optimiser's state_dict (AdamW's step, exp_avg, exp_avg_sq per weight),
    detached on the CPU and cloned: the next round's `optimizer_state`."""
    base = private.optimizer.original_optimizer
    state = base.state_dict()
    return {
        "optimizer": type(base).__name__,
        "state": {
            index: {
                k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                for k, v in slots.items()
            }
            for index, slots in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def _fits(saved: dict[str, Any], base: torch.optim.Optimizer, params: list) -> bool:
    """Whether `saved` (see _optimizer_state) was kept for this optimiser's class, groups
    and weight shapes; a malformed state does not fit."""
    try:
        groups, state = saved["param_groups"], saved["state"]
        if saved["optimizer"] != type(base).__name__:
            return False
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in base.param_groups]:
            return False
        return all(
            int(index) < len(params)
            and all(
                v.shape == params[int(index)].shape
                for k, v in slots.items()
                if isinstance(v, torch.Tensor) and k != "step"
            )
            for index, slots in state.items()
        )
    except (KeyError, TypeError, AttributeError, ValueError):
        return False


def _load_optimizer_state(private: PrivateUNet, saved: dict[str, Any]) -> bool:
    """Continue the base optimiser from `saved` (see _optimizer_state), keeping this round's
    learning rate; False (nothing loaded) if it was kept for other weights (another
    trainable subset or model) or another optimiser."""
    base = private.optimizer.original_optimizer
    if not _fits(saved, base, private.optimizer.params):
        return False
    groups, state = saved["param_groups"], saved["state"]
    rates = [group["lr"] for group in base.param_groups]
    base.load_state_dict({"state": state, "param_groups": groups})
    for group, rate in zip(base.param_groups, rates, strict=True):
        group["lr"] = rate
    return True


def _run_steps(
    private: PrivateUNet,
    data: SubjectData,
    config: Config,
    sample_rate: float,
    steps: int,
    seed: int,
    device: torch.device,
    given: GivenGradients | None = None,
) -> tuple[list[torch.Tensor], list[int], float]:
    """The Poisson-sampled loop; BatchMemoryManager splits big logical batches.

    Returns the subject losses, the subjects of each noised step and the sampler's rate.
    """
    sampling = _generator(seed, 0, torch.device("cpu"))
    own = data.n_subjects
    loader = _poisson_loader(
        own + (0 if given is None else given.size), sample_rate, steps, sampling
    )
    diffusion_generator = _generator(seed, 1, device)
    losses: list[torch.Tensor] = []
    counter = _StepCounter()
    private.optimizer.attach_step_hook(counter.on_step)
    with BatchMemoryManager(
        data_loader=loader,
        max_physical_batch_size=_physical_size(config, data),
        optimizer=private.optimizer,
    ) as physical_loader:
        for (indices,) in physical_loader:
            rows = rows_of(data, indices[indices < own], device, config.privacy.loss_draws)
            losses.append(subject_backward(private, rows, config, diffusion_generator).cpu())
            counter.pending += rows.n_subjects
            if given is not None and bool((indices >= own).any()):
                _add_given(private, given, indices[indices >= own] - own)
                counter.pending += int((indices >= own).sum())
            private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)
    sampler = loader.batch_sampler
    assert isinstance(sampler, UniformWithReplacementSampler)  # _poisson_loader's
    return losses, counter.sizes, sampler.sample_rate


class _StepCounter:
    """Subjects per logical step; DPOptimizer calls `on_step` only when noise was added."""

    def __init__(self) -> None:
        self.pending = 0
        self.sizes: list[int] = []

    def on_step(self, _optimizer: DPOptimizer) -> None:
        self.sizes.append(self.pending)
        self.pending = 0


def nonprivate_step(
    unet: ConditionedUNet,
    optimizer: torch.optim.Optimizer,
    data: SubjectData,
    indices: torch.Tensor,
    config: Config,
    generator: torch.Generator | None,
    device: torch.device,
) -> float:
    """The same loss and physical batches as a DP step, with a plain backward: the baseline
    for DP's cost. Returns the mean subject loss."""
    chunks = torch.tensor_split(
        indices, max(1, math.ceil(len(indices) / _physical_size(config, data)))
    )
    total = 0.0
    for chunk in chunks:
        rows = rows_of(data, chunk, device, config.privacy.loss_draws)
        row_losses = _row_losses(unet, rows, config, generator)
        ((row_losses * rows.weight).sum() / len(indices)).backward()
        total += float(rows.subject_losses(row_losses).sum())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(indices)
